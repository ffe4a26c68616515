//! The GitOps examples in docs/gitops: the Helm values in the Argo CD Application and the Flux
//! HelmRelease render with the chart (values.schema.json refuses typos there too), and the Argo CD
//! health check for RegistryMirror, run by a real Lua 5.4 against statuses the operator writes,
//! says Healthy, Progressing or Degraded as documented; every reason the controller puts on a
//! False Ready condition is classified in the script.

#[path = "chart/k8s.rs"]
mod k8s;
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mirrorfleet::api::RegistryMirror;
use mirrorfleet::controller::status::problem_status;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gitops(file: &str) -> String {
    std::fs::read_to_string(root().join("docs/gitops").join(file)).unwrap()
}

fn render_values(helm: &std::path::Path, values: &Value, what: &str) -> Vec<Value> {
    let dir = support::tempdir();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, serde_yaml::to_string(values).unwrap()).unwrap();
    let chart = root().join("charts/mirrorfleet");
    let docs = k8s::yaml_docs(&k8s::helm_ok(
        helm,
        &["template", "mirrorfleet", chart.to_str().unwrap(), "-f", file.to_str().unwrap()],
    ));
    k8s::validate_all(&docs, what);
    docs
}

#[test]
fn gitops_helm_values_render_with_the_chart() {
    let Some(helm) = support::tool("helm") else { return };
    let argo = k8s::yaml_docs(&gitops("argocd-application.yaml"));
    let app = argo.iter().find(|d| d["spec"]["source"]["path"] == "charts/mirrorfleet").expect("operator Application");
    assert_eq!(app["spec"]["source"]["helm"]["releaseName"], "mirrorfleet");
    let docs = render_values(&helm, &app["spec"]["source"]["helm"]["valuesObject"], "Argo CD values");
    assert!(docs.iter().any(|d| d["kind"] == "ServiceMonitor"), "the Application asks for a ServiceMonitor");

    let flux = k8s::yaml_docs(&gitops("flux-helmrelease.yaml"));
    let release = flux.iter().find(|d| d["kind"] == "HelmRelease").expect("HelmRelease");
    assert_eq!(release["spec"]["chart"]["spec"]["chart"], "./charts/mirrorfleet");
    let docs = render_values(&helm, &release["spec"]["values"], "Flux values");
    assert!(docs.iter().any(|d| d["kind"] == "PrometheusRule"));
}

#[test]
fn argocd_cm_carries_the_health_script_verbatim() {
    let cm = k8s::yaml_docs(&gitops("argocd-cm-health.yaml"));
    let script = cm[0]["data"]["resource.customizations.health.mirrorfleet.io_RegistryMirror"].as_str().unwrap();
    assert_eq!(script, gitops("registrymirror-health.lua"), "argocd-cm-health.yaml and the .lua file differ");
}

/// A JSON value as a Lua table constructor.
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => {
            format!(
                "{{{}}}",
                m.iter().map(|(k, v)| format!("[{k:?}] = {}", lua_literal(v))).collect::<Vec<_>>().join(", ")
            )
        }
    }
}

/// Runs the health script on `obj` as Argo CD does (a global `obj`, the script's return value).
fn health(lua: &std::path::Path, obj: &Value) -> (String, String) {
    let dir = support::tempdir();
    let main = dir.path().join("main.lua");
    std::fs::write(
        &main,
        format!(
            "obj = {}\nlocal hs = dofile({:?})\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
            lua_literal(obj),
            root().join("docs/gitops/registrymirror-health.lua").display().to_string()
        ),
    )
    .unwrap();
    let out = support::run_ok(Command::new(lua).arg(&main), Duration::from_secs(10));
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

fn mirror(generation: i64) -> RegistryMirror {
    let mut m: RegistryMirror =
        serde_yaml::from_str(&std::fs::read_to_string(root().join("config/samples/minimal.yaml")).unwrap()).unwrap();
    m.metadata.namespace = Some("mirrors".into());
    m.metadata.generation = Some(generation);
    m
}

fn with_status(m: &RegistryMirror, status: Value) -> Value {
    let mut obj = serde_json::to_value(m).unwrap();
    obj["status"] = status;
    obj
}

fn cond(type_: &str, status: &str, reason: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": format!("{reason} message"),
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

/// Reasons the controller puts on a condition whose status is False (hence on Ready=False, which
/// carries the first blocking condition's reason), and the reasons of its errors.
fn false_reasons() -> Vec<String> {
    let status = std::fs::read_to_string(root().join("src/controller/status.rs")).unwrap();
    let status = status.split("#[cfg(test)]").next().unwrap();
    let re = regex::Regex::new(
        r#"(?s)condition\(\s*[A-Z_]+,\s*false,\s*(?:if [^{]+\{ "(\w+)" \} else \{ "(\w+)" \}|"(\w+)")"#,
    )
    .unwrap();
    let mut reasons: Vec<String> = re
        .captures_iter(status)
        .flat_map(|c| [c.get(1), c.get(2), c.get(3)].into_iter().flatten().map(|m| m.as_str().to_string()))
        .filter(|r| r != "AsDesired")
        .collect();
    let errors = std::fs::read_to_string(root().join("src/controller/error.rs")).unwrap();
    let re = regex::Regex::new(r#"=> "(\w+)","#).unwrap();
    reasons.extend(re.captures_iter(&errors).map(|c| c[1].to_string()));
    assert!(reasons.len() >= 10, "the scan found too few reasons: {reasons:?}");
    reasons.sort();
    reasons.dedup();
    reasons
}

#[test]
fn health_check_classifies_what_the_operator_writes() {
    let Some(lua) = support::tool("lua5.4") else { return };
    let m = mirror(3);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let cases: Vec<(&str, Value, &str)> = vec![
        ("no status yet", serde_json::to_value(&m).unwrap(), "Progressing"),
        (
            "an older generation observed",
            with_status(&m, json!({"observedGeneration": 2, "conditions": [cond("Ready", "True", "Ready")]})),
            "Progressing",
        ),
        (
            "ready",
            with_status(
                &m,
                json!({"observedGeneration": 3, "conditions": [cond("Ready", "True", "Ready"),
                cond("Degraded", "False", "AsDesired")]}),
            ),
            "Healthy",
        ),
        (
            "ready with replicas missing",
            with_status(
                &m,
                json!({"observedGeneration": 3, "conditions": [cond("Ready", "True", "Ready"),
                cond("Degraded", "True", "ReplicasMissing")]}),
            ),
            "Progressing",
        ),
        (
            "proxies starting",
            with_status(
                &m,
                json!({"observedGeneration": 3, "conditions": [cond("Ready", "False", "ProxiesUnavailable")]}),
            ),
            "Progressing",
        ),
        (
            "invalid spec, as the operator writes it",
            with_status(
                &m,
                serde_json::to_value(problem_status(&m, "InvalidSpec", "spec.upstreams[0].name: bad", &now)).unwrap(),
            ),
            "Degraded",
        ),
        (
            "missing Secret, as the operator writes it",
            with_status(&m, serde_json::to_value(problem_status(&m, "SecretMissing", "no Secret x", &now)).unwrap()),
            "Degraded",
        ),
        (
            "a reason nobody knows",
            with_status(&m, json!({"observedGeneration": 3, "conditions": [cond("Ready", "False", "Mystery")]})),
            "Degraded",
        ),
    ];
    for (what, obj, want) in &cases {
        let (got, message) = health(&lua, obj);
        assert_eq!(&got, want, "{what}: {message}");
    }
    let mut deleting = serde_json::to_value(&m).unwrap();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    assert_eq!(health(&lua, &deleting).0, "Progressing");

    // Every reason the controller can put on Ready=False is classified on purpose.
    let script = gitops("registrymirror-health.lua");
    for reason in false_reasons() {
        assert!(
            script.contains(&format!("{reason} = true")),
            "the health check does not classify reason {reason}: add it to `converging` or `needs_person`"
        );
    }
}
