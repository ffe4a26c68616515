//! Rendered manifests, checked as Kubernetes objects: each document is deserialized into its
//! k8s-openapi type (or, for the prometheus-operator kinds, a typed subset of their API with
//! unknown fields refused), and every field the type does not know is an error. A misspelt or
//! misplaced key (`imagePullPolicy` one level too deep, `readinessProbe.httpget`) fails here,
//! where the API server would silently drop it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// Every non-empty document of a YAML stream, as JSON values.
pub fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{text}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn typed<T: DeserializeOwned>(doc: &Value) -> Result<(), String> {
    let mut unknown = Vec::new();
    let parsed: Result<T, _> = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        doc.clone(),
        // k8s-openapi's Option wrappers show up as `?` segments; drop them.
        &mut |path: serde_ignored::Path| {
            unknown.push(path.to_string().split('.').filter(|s| *s != "?").collect::<Vec<_>>().join("."))
        },
    ));
    match parsed {
        Err(e) => Err(format!("{}: {}", e.path(), e.inner())),
        Ok(_) if !unknown.is_empty() => Err(format!("unknown fields: {}", unknown.join(", "))),
        Ok(_) => Ok(()),
    }
}

/// Checks one rendered object; the error names the field.
pub fn validate(doc: &Value) -> Result<(), String> {
    use k8s_openapi::api::{apps, core, networking, policy, rbac};
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    if doc["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        return Err("no metadata.name".into());
    }
    match (api_version, kind) {
        ("v1", "ServiceAccount") => typed::<core::v1::ServiceAccount>(doc),
        ("v1", "Service") => typed::<core::v1::Service>(doc),
        ("v1", "ConfigMap") => typed::<core::v1::ConfigMap>(doc),
        ("v1", "Namespace") => typed::<core::v1::Namespace>(doc),
        ("apps/v1", "Deployment") => typed::<apps::v1::Deployment>(doc),
        ("policy/v1", "PodDisruptionBudget") => typed::<policy::v1::PodDisruptionBudget>(doc),
        ("networking.k8s.io/v1", "NetworkPolicy") => typed::<networking::v1::NetworkPolicy>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => typed::<rbac::v1::ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => typed::<rbac::v1::ClusterRoleBinding>(doc),
        ("rbac.authorization.k8s.io/v1", "Role") => typed::<rbac::v1::Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => typed::<rbac::v1::RoleBinding>(doc),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            typed::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(doc)
        }
        ("mirrorfleet.io/v1alpha1", "RegistryMirror") => typed::<mirrorfleet::api::RegistryMirror>(doc),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => typed::<monitoring::ServiceMonitor>(doc),
        ("monitoring.coreos.com/v1", "PodMonitor") => typed::<monitoring::PodMonitor>(doc),
        ("monitoring.coreos.com/v1", "PrometheusRule") => typed::<monitoring::PrometheusRule>(doc),
        (a, k) => Err(format!("{a} {k}: no type to check this kind against; add it to tests/chart/k8s.rs")),
    }
}

/// Every rendered object validated; panics listing all problems.
pub fn validate_all(docs: &[Value], what: &str) {
    let problems: Vec<String> = docs
        .iter()
        .filter_map(|d| {
            validate(d).err().map(|e| format!("{} {}: {e}", d["kind"].as_str().unwrap_or("?"), d["metadata"]["name"]))
        })
        .collect();
    assert!(problems.is_empty(), "{what}: invalid objects:\n  {}", problems.join("\n  "));
}

/// The part of the prometheus-operator API (monitoring.coreos.com/v1) the chart uses, with
/// unknown fields refused. Field names follow the operator's Go types (json tags).
pub mod monitoring {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

    /// apiVersion, kind, metadata and a typed spec, nothing else.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Object<S> {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: S,
    }
    pub type ServiceMonitor = Object<ServiceMonitorSpec>;
    pub type PodMonitor = Object<PodMonitorSpec>;
    pub type PrometheusRule = Object<RuleFile>;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ServiceMonitorSpec {
        pub selector: LabelSelector,
        pub namespace_selector: Option<NamespaceSelector>,
        pub endpoints: Vec<Endpoint>,
        pub job_label: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PodMonitorSpec {
        pub selector: LabelSelector,
        pub namespace_selector: Option<NamespaceSelector>,
        pub pod_metrics_endpoints: Vec<Endpoint>,
    }
    /// The fields a ServiceMonitor's `endpoints` and a PodMonitor's `podMetricsEndpoints` share.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Endpoint {
        pub port: Option<String>,
        pub path: Option<String>,
        pub scheme: Option<String>,
        pub interval: Option<String>,
        pub scrape_timeout: Option<String>,
        pub relabelings: Option<Vec<RelabelConfig>>,
        pub metric_relabelings: Option<Vec<RelabelConfig>>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct NamespaceSelector {
        pub any: Option<bool>,
        pub match_names: Option<Vec<String>>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct RelabelConfig {
        pub source_labels: Option<Vec<String>>,
        pub separator: Option<String>,
        pub target_label: Option<String>,
        pub regex: Option<String>,
        pub modulus: Option<u64>,
        pub replacement: Option<String>,
        pub action: Option<String>,
    }
    /// Also the shape of a Prometheus rule file (files/alerts.yaml).
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RuleFile {
        pub groups: Vec<RuleGroup>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RuleGroup {
        pub name: String,
        pub interval: Option<String>,
        pub rules: Vec<Rule>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Rule {
        pub alert: Option<String>,
        pub record: Option<String>,
        pub expr: String,
        #[serde(rename = "for")]
        pub for_: Option<String>,
        pub labels: Option<BTreeMap<String, String>>,
        pub annotations: Option<BTreeMap<String, String>>,
    }
}

/// `helm` with the chart directory's parent as working directory; panics on failure.
pub fn helm_ok(helm: &Path, args: &[&str]) -> String {
    let out = super::support::run(Command::new(helm).args(args), Duration::from_secs(120));
    assert!(out.status.success(), "helm {args:?} failed:\n{}", super::support::describe_output(&out));
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// Env vars `mirrorfleet run` reads, with their defaults, from its clap definition.
pub fn run_env_vars() -> BTreeMap<String, Option<String>> {
    use clap::Args;
    let cmd = mirrorfleet::controller::RunArgs::augment_args(clap::Command::new("run"));
    cmd.get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            let default = a.get_default_values().first().and_then(|d| d.to_str()).map(String::from);
            Some((env, default))
        })
        .collect()
}

/// The operator Deployment (chart or kustomize) agrees with `mirrorfleet run` and meets the
/// restricted Pod Security Standard; returns its container's env vars by name.
pub fn check_operator_deployment(dep: &Value) -> BTreeMap<String, Value> {
    let flags = run_env_vars();
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["args"], serde_json::json!(["run"]));
    // Every env var set is one `mirrorfleet run` reads (a typo would be ignored silently),
    // except the well-known ones the process reads itself.
    let list = c["env"].as_array().expect("env");
    let env: BTreeMap<String, Value> =
        list.iter().map(|e| (e["name"].as_str().unwrap().to_string(), e.clone())).collect();
    assert_eq!(env.len(), list.len(), "duplicate env vars");
    for name in env.keys() {
        assert!(
            flags.contains_key(name) || ["RUST_LOG", "RUST_BACKTRACE", "POD_NAMESPACE"].contains(&name.as_str()),
            "the Deployment sets {name}, which `mirrorfleet run` does not read"
        );
    }
    for needed in ["POD_NAME", "POD_NAMESPACE", "MIRRORFLEET_OPERATOR_IMAGE", "MIRRORFLEET_LEADER_ELECT"] {
        assert!(env.contains_key(needed), "{needed} not set");
    }
    // The admin server listens where the probes look.
    let addr = env["MIRRORFLEET_ADMIN_ADDR"]["value"].as_str().unwrap();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let admin = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "admin").expect("admin port");
    assert_eq!(admin["containerPort"], serde_json::json!(port));
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    // Restricted Pod Security Standard.
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(sc["privileged"].is_null() || sc["privileged"] == false);
    assert!(pod["hostNetwork"].is_null() && pod["hostPID"].is_null());
    // Leader election is on whenever more than one replica runs.
    let replicas = dep["spec"]["replicas"].as_i64().unwrap();
    let elect = env["MIRRORFLEET_LEADER_ELECT"]["value"].as_str().unwrap();
    assert!(replicas == 1 || elect == "true", "{replicas} replicas without leader election");
    env
}
