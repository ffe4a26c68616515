//! The Helm chart (charts/mirrorfleet), with the real `helm`: `helm lint --strict` and
//! `helm template` with the default values and every example values file in ci/; every rendered
//! object checked against its Kubernetes type with unknown fields refused; values.schema.json
//! refusing misspelt keys; every value documented and the README's values table in sync with
//! values.yaml (`UPDATE_CHART_README=1` or `make generate` rewrites it); the operator Deployment
//! agreeing with `mirrorfleet run` (env vars, admin port, probes) and meeting the `restricted`
//! Pod Security Standard; the PodMonitors selecting the pods the builders make.
//!
//! helm missing: SKIP locally, a failure under CI=true (.ci/install-helm.sh installs it).

#[path = "chart/k8s.rs"]
mod k8s;
mod support;
#[path = "chart/values_doc.rs"]
mod values_doc;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/mirrorfleet")
}

/// `None` stands for the default values; then every ci/*-values.yaml.
fn values_files() -> Vec<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .expect("charts/mirrorfleet/ci")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "expected the example values files in ci/: {files:?}");
    std::iter::once(None).chain(files.into_iter().map(Some)).collect()
}

fn template(helm: &Path, values: Option<&Path>, extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec!["template", "mf", chart.to_str().unwrap(), "--namespace", "mirrorfleet-system"];
    let v;
    if let Some(values) = values {
        v = values.display().to_string();
        args.extend(["-f", &v]);
    }
    args.extend(extra);
    k8s::yaml_docs(&k8s::helm_ok(helm, &args))
}

fn find<'a>(docs: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"].as_str().unwrap_or_default().ends_with(name_suffix))
        .unwrap_or_else(|| panic!("no {kind} *{name_suffix} rendered"))
}

#[test]
fn lint_and_template_every_values_file() {
    let Some(helm) = support::tool("helm") else { return };
    let chart = chart();
    for values in values_files() {
        let label = values.as_ref().map_or("default values".to_string(), |p| p.display().to_string());
        let mut lint = vec!["lint", "--strict", chart.to_str().unwrap()];
        let v = values.as_ref().map(|p| p.display().to_string());
        if let Some(v) = &v {
            lint.extend(["-f", v]);
        }
        let out = k8s::helm_ok(&helm, &lint);
        assert!(out.contains("0 chart(s) failed"), "{label}: {out}");

        let docs = template(&helm, values.as_deref(), &[]);
        k8s::validate_all(&docs, &label);
        // Names are unique per kind (helm would happily render two of the same).
        let mut seen = BTreeSet::new();
        for d in &docs {
            let key =
                (d["kind"].to_string(), d["metadata"]["namespace"].to_string(), d["metadata"]["name"].to_string());
            assert!(seen.insert(key.clone()), "{label}: {key:?} rendered twice");
        }
        // Every object carries the chart's labels (so `helm uninstall` and selectors find them).
        for d in &docs {
            let labels = &d["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/name"], "mirrorfleet", "{label}: {} unlabelled", d["kind"]);
            assert_eq!(labels["app.kubernetes.io/instance"], "mf", "{label}: {} unlabelled", d["kind"]);
        }
        // Every namespaced object lands in the release namespace (or the watched one).
        for d in &docs {
            let kind = d["kind"].as_str().unwrap();
            if matches!(kind, "ClusterRole" | "ClusterRoleBinding") {
                assert!(d["metadata"]["namespace"].is_null(), "{label}: cluster-scoped {kind} with a namespace");
            } else {
                assert!(d["metadata"]["namespace"].is_string(), "{label}: {kind} without namespace");
            }
        }
    }
}

#[test]
fn packaged_chart_installs_the_same_and_leaves_test_files_out() {
    let Some(helm) = support::tool("helm") else { return };
    let dir = support::tempdir();
    let chart = chart();
    k8s::helm_ok(&helm, &["package", chart.to_str().unwrap(), "-d", dir.path().to_str().unwrap()]);
    let tgz = dir.path().join(format!("mirrorfleet-{}.tgz", env!("CARGO_PKG_VERSION")));
    let listing = support::run_ok(Command::new("tar").arg("-tzf").arg(&tgz), Duration::from_secs(30));
    let files = String::from_utf8(listing.stdout).unwrap();
    for want in [
        "mirrorfleet/values.schema.json",
        "mirrorfleet/crds/",
        "mirrorfleet/files/alerts.yaml",
        "mirrorfleet/README.md",
    ] {
        assert!(files.lines().any(|l| l.starts_with(want)), "{want} missing from the package:\n{files}");
    }
    assert!(!files.lines().any(|l| l.starts_with("mirrorfleet/ci/")), "ci/ values files are packaged:\n{files}");
    let from_dir = k8s::helm_ok(&helm, &["template", "mf", chart.to_str().unwrap()]);
    let from_tgz = k8s::helm_ok(&helm, &["template", "mf", tgz.to_str().unwrap()]);
    assert_eq!(from_dir, from_tgz, "the packaged chart renders differently");
}

#[test]
fn crds_folder_renders_the_generated_crd() {
    let Some(helm) = support::tool("helm") else { return };
    let docs = template(&helm, None, &["--include-crds"]);
    let crds: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "CustomResourceDefinition").collect();
    assert_eq!(crds.len(), 1, "the chart ships exactly the RegistryMirror CRD");
    k8s::validate(crds[0]).unwrap();
    assert_eq!(crds[0]["metadata"]["name"], "registrymirrors.mirrorfleet.io");
}

#[test]
fn the_validator_refuses_unknown_and_mistyped_fields() {
    // The check above is only worth something if it can fail: a misplaced and a mistyped key.
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c", "imagePullPolicy": "Always",
            "readinessProbe": {"httpget": {"path": "/readyz", "port": 8080}}}]}}}});
    let err = k8s::validate(&deployment).unwrap_err();
    assert!(err.contains("readinessProbe.httpget"), "{err}");
    let mistyped = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
        "spec": {"ports": [{"port": "eighty"}]}});
    let err = k8s::validate(&mistyped).unwrap_err();
    assert!(err.contains("spec.ports[0].port"), "{err}");
    let monitor = json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
        "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "metrics", "targetPort": 5001}]}});
    assert!(k8s::validate(&monitor).unwrap_err().contains("targetPort"));
    let unknown_kind = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
    assert!(k8s::validate(&unknown_kind).is_err());
}

#[test]
fn schema_refuses_misspelt_keys() {
    let Some(helm) = support::tool("helm") else { return };
    let chart = chart();
    let chart = chart.to_str().unwrap();
    // The control: a correctly spelt key renders.
    k8s::helm_ok(&helm, &["template", "mf", chart, "--set", "metrics.serviceMonitor.enabled=true"]);
    for (set, key) in [
        ("replicaCont=3", "replicaCont"),
        ("metrics.serviceMonitr.enabled=true", "serviceMonitr"),
        ("image.pullpolicy=Always", "pullpolicy"),
        ("leaderElection.leaseDurationSecond=30", "leaseDurationSecond"),
    ] {
        let out =
            support::run(Command::new(&helm).args(["template", "mf", chart, "--set", set]), Duration::from_secs(60));
        assert!(!out.status.success(), "--set {set} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && err.contains("additional properties"), "--set {set}: {err}");
    }
    // Wrong types and values are refused too.
    for set in ["replicaCount=two", "logging.format=xml", "image.pullPolicy=Sometimes", "adminPort=0"] {
        let out =
            support::run(Command::new(&helm).args(["template", "mf", chart, "--set", set]), Duration::from_secs(60));
        assert!(!out.status.success(), "--set {set} was accepted");
    }
    // extraEnv cannot silently shadow a variable the chart sets from a value.
    let out = support::run(
        Command::new(&helm).args(["template", "mf", chart, "--set", "extraEnv[0].name=MIRRORFLEET_CONCURRENCY"]),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "extraEnv shadowing MIRRORFLEET_CONCURRENCY was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("extraEnv sets MIRRORFLEET_CONCURRENCY"));
    // ... for every variable the chart sets (the template's list must keep up with the env).
    let docs = k8s::yaml_docs(&k8s::helm_ok(&helm, &["template", "mf", chart, "--set", "watchNamespace=x"]));
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    for e in dep["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap() {
        let set = format!("extraEnv[0].name={}", e["name"].as_str().unwrap());
        let out =
            support::run(Command::new(&helm).args(["template", "mf", chart, "--set", &set]), Duration::from_secs(60));
        assert!(!out.status.success(), "extraEnv may shadow {}", e["name"]);
    }
    // Two active controllers would fight: more replicas need leader election.
    let out = support::run(
        Command::new(&helm).args(["template", "mf", chart, "--set", "leaderElection.enabled=false"]),
        Duration::from_secs(60),
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("leaderElection"));
}

#[test]
fn values_are_documented_and_the_schema_lists_exactly_them() {
    let text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    let values: Value = serde_yaml::from_str(&text).unwrap();
    let rows = values_doc::rows(&text, &values).unwrap_or_else(|e| panic!("values.yaml: {e}"));
    assert!(rows.len() > 40, "only {} documented values?", rows.len());
    // Schema and values.yaml describe the same keys, down to the documented level.
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap()).unwrap();
    for row in &rows {
        let mut node = &schema;
        for part in row.key.split('.') {
            assert_eq!(
                node["additionalProperties"],
                json!(false),
                "schema object above {} allows unknown keys",
                row.key
            );
            node = &node["properties"][part];
            assert!(!node.is_null(), "values.schema.json lacks {}", row.key);
        }
    }
    fn schema_keys(node: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Some(props) = node["properties"].as_object() {
            for (k, v) in props {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.push(key.clone());
                schema_keys(v, &key, out);
            }
        }
    }
    let mut keys = Vec::new();
    schema_keys(&schema, "", &mut keys);
    let documented: BTreeSet<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    for key in keys {
        let covered = documented
            .iter()
            .any(|d| key == *d || key.starts_with(&format!("{d}.")) || d.starts_with(&format!("{key}.")));
        assert!(covered, "values.schema.json has {key}, which values.yaml does not document");
    }
}

#[test]
fn readme_values_table_matches_values_yaml() {
    let text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    let values: Value = serde_yaml::from_str(&text).unwrap();
    let rows = values_doc::rows(&text, &values).unwrap();
    let table = values_doc::markdown_table(&rows);
    let readme_path = chart().join("README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let updated = values_doc::replace_between_markers(&readme, &table).expect("README.md lacks the values markers");
    if std::env::var_os("UPDATE_CHART_README").is_some() {
        std::fs::write(&readme_path, &updated).unwrap();
        return;
    }
    assert!(readme == updated, "charts/mirrorfleet/README.md's values table is stale; run `make generate`");
}

#[test]
fn deployment_matches_mirrorfleet_run_and_is_restricted() {
    let Some(helm) = support::tool("helm") else { return };
    let flags = k8s::run_env_vars();
    assert!(flags.contains_key("MIRRORFLEET_ADMIN_ADDR"), "{flags:?}");

    for values in values_files() {
        let docs = template(&helm, values.as_deref(), &[]);
        let dep = find(&docs, "Deployment", "mirrorfleet");
        let env = k8s::check_operator_deployment(dep);
        // The metrics Service (when there is one) targets the same port.
        if let Some(svc) = docs.iter().find(|d| d["kind"] == "Service") {
            assert_eq!(svc["spec"]["ports"][0]["targetPort"], "admin");
            assert_eq!(svc["spec"]["selector"], dep["spec"]["selector"]["matchLabels"]);
        }
        // The pods run as the ServiceAccount the chart binds (or the one named for outside RBAC).
        let sa = dep["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap();
        for binding in docs.iter().filter(|d| d["kind"].as_str().is_some_and(|k| k.ends_with("RoleBinding"))) {
            assert_eq!(binding["subjects"][0]["name"], sa, "{binding}");
        }
        let elect = env["MIRRORFLEET_LEADER_ELECT"]["value"].as_str().unwrap();
        // The lease the RBAC allows is the lease the operator uses.
        if elect == "true" && docs.iter().any(|d| d["kind"] == "Role") {
            let lease = env["MIRRORFLEET_LEASE_NAME"]["value"].as_str().unwrap();
            let role = find(&docs, "Role", "-leader");
            assert!(role["rules"].to_string().contains(&format!("\"{lease}\"")), "{role}");
            assert_eq!(env["MIRRORFLEET_LEASE_NAMESPACE"]["value"], "mirrorfleet-system");
        }
    }
    // Defaults: two replicas, a PDB that lets one go.
    let docs = template(&helm, None, &[]);
    assert_eq!(find(&docs, "Deployment", "mirrorfleet")["spec"]["replicas"], 2);
    assert_eq!(find(&docs, "PodDisruptionBudget", "mirrorfleet")["spec"]["maxUnavailable"], 1);
    // The default admin port is the one `mirrorfleet run` defaults to.
    let default_addr = flags["MIRRORFLEET_ADMIN_ADDR"].clone().unwrap();
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap();
    assert!(default_addr.ends_with(&format!(":{}", values["adminPort"])), "{default_addr} vs adminPort");
}

#[test]
fn pod_monitors_select_the_pods_the_operator_creates() {
    let Some(helm) = support::tool("helm") else { return };
    let docs = template(&helm, None, &["--set", "metrics.podMonitors.enabled=true"]);
    // The sample with every component, as the builders render it.
    let sample = std::fs::read_to_string(root().join("config/samples/public-mirrors.yaml")).unwrap();
    let opts = mirrorfleet::render::RenderOptions {
        namespace: "mirrors".into(),
        settings: Default::default(),
        endpoints: Default::default(),
        include_secrets: false,
    };
    let rendered = mirrorfleet::render::render_str(&sample, &opts).unwrap();
    let children = k8s::yaml_docs(&mirrorfleet::render::to_yaml_stream(&rendered, false));
    for (component, path) in [("proxy", "/metrics"), ("edge", "/stats/prometheus")] {
        let monitor = find(&docs, "PodMonitor", &format!("-{component}"));
        let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["path"], path);
        let pods: Vec<&Value> = children
            .iter()
            .filter(|d| d["kind"] == "Deployment")
            .map(|d| &d["spec"]["template"])
            .filter(|t| selector.iter().all(|(k, v)| &t["metadata"]["labels"][k] == v))
            .collect();
        assert!(!pods.is_empty(), "the {component} PodMonitor selects no pod the operator creates");
        for t in pods {
            let ports: Vec<&Value> = t["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .collect();
            assert!(
                ports.iter().any(|p| p["name"] == endpoint["port"]),
                "{component} pods have no port named {}: {ports:?}",
                endpoint["port"]
            );
        }
        // The operator's own pods are never selected.
        let dep = find(&docs, "Deployment", "mirrorfleet");
        let own = &dep["spec"]["template"]["metadata"]["labels"];
        assert!(!selector.iter().all(|(k, v)| &own[k] == v));
    }
}

#[test]
fn alert_rules_and_dashboard_are_well_formed() {
    // files/alerts.yaml is a Prometheus rule file: typed, unknown keys refused.
    let text = std::fs::read_to_string(chart().join("files/alerts.yaml")).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let rules = k8s::validate(&json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "alerts"}, "spec": doc}));
    rules.unwrap_or_else(|e| panic!("files/alerts.yaml: {e}"));
    let names: Vec<&str> = doc["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for want in [
        "RegistryMirrorNotReady",
        "RegistryMirrorNodesUnconfigured",
        "RegistryMirrorCleanupFailed",
        "RegistryMirrorUpstreamErrors",
    ] {
        assert!(names.contains(&want), "alert {want} missing: {names:?}");
    }
    // Metrics the alerts and the dashboard use exist where they come from: the operator's own
    // names from its registry, the status metrics from files/kube-state-metrics.yaml.
    let dash = std::fs::read_to_string(chart().join("files/grafana-dashboard.json")).unwrap();
    let dash_json: Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    assert_eq!(dash_json["uid"], "mirrorfleet");
    // Labelled families print only once they have a series: give each one.
    let m = mirrorfleet::controller::metrics::Metrics::new();
    m.observe_reconcile(Duration::from_millis(3), Some("Api"));
    m.count_request("POST", "/api/v1/namespaces/m/configmaps", None);
    let health = mirrorfleet::controller::upstreams::UpstreamHealth {
        reachable: Some(true),
        failed_lookups: Some(0),
        rate_limited: Some(0),
        served_stale: Some(0),
        failed_pulls: Some(0),
        ..Default::default()
    };
    m.observe_upstream("m/a", "hub", &health);
    let operator = m.encode();
    let ksm: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("files/kube-state-metrics.yaml")).unwrap()).unwrap();
    let ksm_resource = &ksm["spec"]["resources"][0];
    let prefix = ksm_resource["metricNamePrefix"].as_str().unwrap();
    let ksm_names: BTreeSet<String> = ksm_resource["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{prefix}_{}", m["name"].as_str().unwrap()))
        .collect();
    let metric = regex::Regex::new(r"\b(mirrorfleet_[a-z_]*[a-z])").unwrap();
    // Comments may speak of metric families; expressions and queries must name real metrics.
    let alert_exprs: String = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    for (what, body) in [("files/alerts.yaml", alert_exprs.as_str()), ("files/grafana-dashboard.json", dash.as_str())] {
        for m in metric.captures_iter(body).map(|c| c[1].to_string()).collect::<BTreeSet<_>>() {
            let base = m.trim_end_matches("_bucket").trim_end_matches("_total");
            let known = ksm_names.contains(&m)
                || operator
                    .lines()
                    .any(|l| l.starts_with(&format!("# TYPE {base} ")) || l.starts_with(&format!("# TYPE {m} ")));
            assert!(known, "{what} uses {m}, which neither the operator nor the kube-state-metrics config exposes");
        }
    }
    // Every dashboard panel has a query, and the ids are unique.
    let panels = dash_json["panels"].as_array().unwrap();
    let ids: BTreeSet<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len());
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(!p["targets"].as_array().unwrap().is_empty(), "panel {} has no query", p["title"]);
    }
}

#[test]
fn chart_version_and_app_version_follow_the_crate() {
    let chart: Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"), "Chart.yaml appVersion != Cargo.toml version");
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"), "Chart.yaml version != Cargo.toml version");
}

#[test]
fn dockerfile_puts_the_binary_where_pods_run_it() {
    // The image is not built in the tests (no container engine); what the builders and the chart
    // rely on is checked in the Dockerfile's text.
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile.split("\nFROM ").collect();
    assert!(stages.len() >= 3, "multi-stage: a build stage and a runtime stage");
    let last = stages.last().unwrap();
    let binary = mirrorfleet::build::node::BINARY;
    // The node agent's command and the cleanup CronJob's args (no command: the entrypoint).
    assert!(last.contains(&format!(" {binary}\n")), "the runtime stage does not copy the binary to {binary}");
    assert!(last.contains(&format!("ENTRYPOINT [\"{binary}\"]")), "ENTRYPOINT must be {binary}");
    // Non-root by default, and no shell: the chart's probes are HTTP, nothing execs a shell.
    assert!(last.contains("USER 65532"), "runtime stage must run as non-root");
    assert!(
        last.starts_with("gcr.io/distroless/"),
        "runtime stage must be distroless: {}",
        last.lines().next().unwrap()
    );
    // `mirrorfleet render` embeds config/samples: the build context must carry it.
    assert!(dockerfile.contains("COPY config/samples config/samples"));
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for needed in ["src", "benches", "config", "Cargo.toml", "Cargo.lock"] {
        assert!(!ignore.lines().any(|l| l.trim_end_matches('/') == needed), ".dockerignore drops {needed}");
    }
    // The chart's default image is the one the builders default to for node agents and cleanup.
    let chart_values = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    assert!(chart_values.contains("repository: ghcr.io/mirrorfleet/mirrorfleet"));
    assert!(mirrorfleet::build::Settings::default().operator_image.starts_with("ghcr.io/mirrorfleet/mirrorfleet:"));
}

/// Unit tests of files/alerts.yaml, run by promtool: each alert fires on the series it is about,
/// after its `for`, with its labels and rendered annotations, and stays quiet on healthy series.
const ALERT_TESTS: &str = r#"
evaluation_interval: 1m
tests:
- interval: 1m
  input_series:
  - series: 'mirrorfleet_registrymirror_status_condition{condition="Ready",namespace="mirrors",registrymirror="public",reason="ProxiesUnavailable"}'
    values: '0x30'
  - series: 'mirrorfleet_registrymirror_status_condition{condition="Ready",namespace="mirrors",registrymirror="ok",reason="Ready"}'
    values: '1x30'
  - series: 'mirrorfleet_registrymirror_nodes_desired{namespace="mirrors",registrymirror="public"}'
    values: '12x40'
  - series: 'mirrorfleet_registrymirror_nodes_configured{namespace="mirrors",registrymirror="public"}'
    values: '9x40'
  - series: 'mirrorfleet_registrymirror_nodes_desired{namespace="mirrors",registrymirror="ok"}'
    values: '12x40'
  - series: 'mirrorfleet_registrymirror_nodes_configured{namespace="mirrors",registrymirror="ok"}'
    values: '12x40'
  - series: 'mirrorfleet_registrymirror_last_cleanup_result{namespace="mirrors",registrymirror="public",result="Failed"}'
    values: '1x10'
  - series: 'mirrorfleet_registrymirror_last_cleanup_result{namespace="mirrors",registrymirror="ok",result="Failed"}'
    values: '0x10'
  - series: 'registry_http_requests_total{namespace="mirrors",mirror="public",upstream="dockerhub",code="200",handler="blob",method="get"}'
    values: '0+90x40'
  - series: 'registry_http_requests_total{namespace="mirrors",mirror="public",upstream="dockerhub",code="503",handler="blob",method="get"}'
    values: '0+10x40'
  - series: 'registry_http_requests_total{namespace="mirrors",mirror="public",upstream="ghcr",code="200",handler="blob",method="get"}'
    values: '0+90x40'
  - series: 'mirrorfleet_leader{pod="a"}'
    values: '0x20'
  - series: 'mirrorfleet_upstream_reachable{namespace="mirrors",mirror="public",upstream="dockerhub"}'
    values: '1x3 0x20'
  - series: 'mirrorfleet_upstream_reachable{namespace="mirrors",mirror="public",upstream="ghcr"}'
    values: '1x23'
  - series: 'mirrorfleet_upstream_failed_pulls{namespace="mirrors",mirror="public",upstream="dockerhub"}'
    values: '0x3 0+2x20'
  - series: 'mirrorfleet_upstream_failed_pulls{namespace="mirrors",mirror="public",upstream="ghcr"}'
    values: '4x23'
  - series: 'mirrorfleet_leader{pod="b"}'
    values: '0x20'
  alert_rule_test:
  - eval_time: 10m
    alertname: RegistryMirrorNotReady
    exp_alerts: []
  - eval_time: 20m
    alertname: RegistryMirrorNotReady
    exp_alerts:
    - exp_labels: {severity: warning, condition: Ready, namespace: mirrors, registrymirror: public, reason: ProxiesUnavailable}
      exp_annotations:
        summary: RegistryMirror mirrors/public is not Ready
        description: 'Ready has been False for 15 minutes (reason ProxiesUnavailable). Run `kubectl -n mirrors describe registrymirror public`: the conditions and Events say which part is missing.'
  - eval_time: 25m
    alertname: RegistryMirrorNodesUnconfigured
    exp_alerts: []
  - eval_time: 35m
    alertname: RegistryMirrorNodesUnconfigured
    exp_alerts:
    - exp_labels: {severity: warning, namespace: mirrors, registrymirror: public}
      exp_annotations:
        summary: 3 nodes do not use RegistryMirror mirrors/public
        description: "Nodes that should pull through the mirror have not applied its runtime config for 30 minutes; they pull from the upstream registries directly (or fail, when fallbackToUpstream is false). The node agents' Events and logs say why (for containerd, often a missing config_path)."
  - eval_time: 8m
    alertname: RegistryMirrorCleanupFailed
    exp_alerts:
    - exp_labels: {severity: warning, namespace: mirrors, registrymirror: public, result: Failed}
      exp_annotations:
        summary: The last cache cleanup of mirrors/public failed
        description: "The cache keeps growing until a cleanup succeeds. See the cleanup Job's logs (`kubectl -n mirrors logs job/<the newest public-cleanup job>`) and status.lastCleanup.message."
  - eval_time: 30m
    alertname: RegistryMirrorUpstreamErrors
    exp_alerts:
    - exp_labels: {severity: warning, namespace: mirrors, mirror: public, upstream: dockerhub}
      exp_annotations:
        summary: 10% of requests to upstream dockerhub of mirrors/public fail
        description: "The registry proxy answers with 5xx: the upstream registry errors, rate-limits or cannot be reached (check the proxy's logs and its credentialsSecretRef)."
  - eval_time: 6m
    alertname: RegistryMirrorUpstreamUnreachable
    exp_alerts: []
  - eval_time: 9m
    alertname: RegistryMirrorUpstreamUnreachable
    exp_alerts:
    - exp_labels: {severity: warning, namespace: mirrors, mirror: public, upstream: dockerhub}
      exp_annotations:
        summary: No proxy of mirrors/public reaches upstream dockerhub
        description: "Cached tags are still served (status.upstreams[].servedStale counts them); pulls of images the mirror does not hold fail with 503 and the reason. status.upstreams[].lastError says what the proxies get (timeout, refused, 5xx)."
  - eval_time: 6m
    alertname: RegistryMirrorPullsFailingUpstream
    exp_alerts: []
  - eval_time: 20m
    alertname: RegistryMirrorPullsFailingUpstream
    exp_alerts:
    - exp_labels: {severity: warning, namespace: mirrors, mirror: public, upstream: dockerhub}
      exp_annotations:
        summary: Pulls through mirrors/public fail because upstream dockerhub does
        description: "20 manifest requests in the last 10 minutes were answered 503 (or 429) because the upstream failed and the image was not cached. status.upstreams[].lastError says why; spec.prefetch keeps images pods need in the cache ahead of such outages."
  - eval_time: 15m
    alertname: MirrorfleetOperatorNoLeader
    exp_alerts:
    - exp_labels: {severity: critical}
      exp_annotations:
        summary: No mirrorfleet operator replica holds the leader Lease
        description: "Nothing reconciles RegistryMirrors: spec changes, rotated credentials and node changes are not acted on. Check the operator Pods and their logs."
"#;

#[test]
fn alerts_fire_as_documented_and_dashboard_queries_parse() {
    let Some(promtool) = support::tool("promtool") else { return };
    let alerts = chart().join("files/alerts.yaml");
    let dir = support::tempdir();
    let check = support::run(Command::new(&promtool).arg("check").arg("rules").arg(&alerts), Duration::from_secs(60));
    assert!(check.status.success(), "promtool check rules:\n{}", support::describe_output(&check));

    let tests = dir.path().join("alerts_test.yaml");
    std::fs::write(&tests, format!("rule_files: [{:?}]\n{ALERT_TESTS}", alerts.display().to_string())).unwrap();
    let out = support::run(Command::new(&promtool).arg("test").arg("rules").arg(&tests), Duration::from_secs(60));
    assert!(out.status.success(), "promtool test rules:\n{}", support::describe_output(&out));

    // Every dashboard query, with Grafana's variables filled in, parses as PromQL (as a recording
    // rule, which promtool checks).
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("files/grafana-dashboard.json")).unwrap()).unwrap();
    let mut rules = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m")
                .replace("$namespace", ".*")
                .replace("$mirror", ".*");
            rules.push(json!({"record": format!("dashboard:panel{}:{}", panel["id"], target["refId"].as_str().unwrap()), "expr": expr}));
        }
    }
    assert!(rules.len() > 20, "{} dashboard queries?", rules.len());
    let file = dir.path().join("dashboard_rules.yaml");
    std::fs::write(&file, serde_yaml::to_string(&json!({"groups": [{"name": "dashboard", "rules": rules}]})).unwrap())
        .unwrap();
    let out = support::run(Command::new(&promtool).arg("check").arg("rules").arg(&file), Duration::from_secs(60));
    assert!(out.status.success(), "dashboard queries do not parse:\n{}", support::describe_output(&out));
}
