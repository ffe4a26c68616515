//! The kustomize base (config/default = config/crd + config/rbac + config/manager + a namespace):
//! `kubectl kustomize config/default` renders, every object is a valid Kubernetes object (unknown
//! fields refused), the CRD is the generated one, and the RBAC is the Helm chart's (rule for
//! rule; tests/chart_rbac.rs checks the chart's against what the controller does).
//!
//! config/rbac and config/manager belong to the controller's author: until both exist this test
//! prints a SKIP line naming the missing one, locally and in CI.

#[path = "chart/k8s.rs"]
mod k8s;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kustomize(kubectl: &Path, dir: &str) -> Vec<Value> {
    let out = support::run(
        Command::new(kubectl).args(["kustomize", root().join(dir).to_str().unwrap()]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "kubectl kustomize {dir}:\n{}", support::describe_output(&out));
    k8s::yaml_docs(&String::from_utf8(out.stdout).unwrap())
}

/// Every rule of the ClusterRoles and Roles in `docs`, flattened, by kind.
fn rbac(docs: &[Value]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for d in docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role") {
        for rule in d["rules"].as_array().into_iter().flatten() {
            for g in rule["apiGroups"].as_array().into_iter().flatten() {
                for r in rule["resources"].as_array().into_iter().flatten() {
                    for v in rule["verbs"].as_array().into_iter().flatten() {
                        out.entry(d["kind"].as_str().unwrap().to_string())
                            .or_default()
                            .insert(format!("{g} {r} {v} {}", rule["resourceNames"]));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn config_default_renders_valid_objects_with_the_charts_rbac() {
    let missing: Vec<&str> = ["config/rbac", "config/manager"]
        .into_iter()
        .filter(|d| !root().join(d).join("kustomization.yaml").exists())
        .collect();
    if !missing.is_empty() {
        eprintln!("SKIP: {} not written yet (the controller's part); config/default needs them", missing.join(", "));
        return;
    }
    let Some(kubectl) = support::tool("kubectl") else { return };
    let Some(helm) = support::tool("helm") else { return };
    let docs = kustomize(&kubectl, "config/default");
    k8s::validate_all(&docs, "config/default");
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for want in ["Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "Deployment"] {
        assert!(kinds.contains(want), "config/default renders no {want}: {kinds:?}");
    }
    // The CRD is the generated one.
    let crd = docs.iter().find(|d| d["kind"] == "CustomResourceDefinition").unwrap();
    let generated: Value = serde_yaml::from_str(&mirrorfleet::api::crd::crd_yaml()).unwrap();
    // kustomize prints `minimum: 1.0` as `1`: compare numbers by value.
    fn numbers_as_f64(v: &Value) -> Value {
        match v {
            Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
            Value::Array(a) => Value::Array(a.iter().map(numbers_as_f64).collect()),
            Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), numbers_as_f64(v))).collect()),
            other => other.clone(),
        }
    }
    assert!(
        numbers_as_f64(&crd["spec"]) == numbers_as_f64(&generated["spec"]),
        "config/default's CRD differs from `mirrorfleet crd`"
    );
    // Namespaced objects land in the operator's namespace.
    for d in &docs {
        let cluster_scoped = ["Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"];
        if !cluster_scoped.contains(&d["kind"].as_str().unwrap()) {
            assert_eq!(d["metadata"]["namespace"], "mirrorfleet-system", "{} {}", d["kind"], d["metadata"]["name"]);
        }
    }
    // The operator Deployment agrees with `mirrorfleet run`, runs as the ServiceAccount that the
    // RBAC binds, and is restricted.
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    k8s::check_operator_deployment(dep);
    let sa = dep["spec"]["template"]["spec"]["serviceAccountName"].as_str().expect("serviceAccountName");
    let bound = docs.iter().filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding").all(|b| {
        b["subjects"].as_array().unwrap().iter().any(|s| s["name"] == sa && s["namespace"] == "mirrorfleet-system")
    });
    assert!(bound, "every binding must name the Deployment's ServiceAccount {sa} in mirrorfleet-system");
    // The same RBAC as the chart.
    let chart = root().join("charts/mirrorfleet");
    let chart_docs = k8s::yaml_docs(&k8s::helm_ok(&helm, &["template", "mf", chart.to_str().unwrap()]));
    pretty_assertions::assert_eq!(rbac(&docs), rbac(&chart_docs), "config/default and the chart grant differently");
}
