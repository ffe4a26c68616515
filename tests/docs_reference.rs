//! docs/reference.md is generated from the CRD's OpenAPI schema (`mirrorfleet crd`): every field
//! of spec and status with its type, whether it is required, its default, its constraints and
//! its description, plus the CEL rules. This test fails when the committed file differs;
//! `UPDATE_DOCS=1` (or `make generate`) rewrites it.

use std::fmt::Write as _;

use serde_json::Value;

const HEADER: &str = "# RegistryMirror reference

<!-- Generated from the CRD schema by tests/docs_reference.rs (`make generate`); do not edit. -->

`apiVersion: mirrorfleet.io/v1alpha1`, `kind: RegistryMirror`, namespaced, short name `regmirror`.
Every field below is checked by the API server at admission (types, bounds, patterns, enums and the
CEL rules at the end); the operator checks the rest and reports it in `status.conditions`
(Ready=False, reason InvalidSpec) with the field path. `mirrorfleet render -f FILE` runs the same
checks without a cluster.

Types: `[]` marks a list, `map` an object with free keys, `int-or-string` a quantity or number.
";

fn type_of(s: &Value) -> String {
    if s["x-kubernetes-int-or-string"] == true {
        return "int-or-string".into();
    }
    match s["type"].as_str() {
        Some("array") => format!("[]{}", type_of(&s["items"])),
        Some("object") if s["properties"].is_null() && !s["additionalProperties"].is_null() => {
            format!("map[string]{}", type_of(&s["additionalProperties"]))
        }
        Some(t) => t.to_string(),
        None if s["x-kubernetes-preserve-unknown-fields"] == true => "any".into(),
        None => "any".into(),
    }
}

fn constraints(s: &Value) -> String {
    let mut c = Vec::new();
    if let Some(e) = s["enum"].as_array() {
        c.push(format!(
            "one of {}",
            e.iter().map(|v| format!("`{}`", v.as_str().unwrap_or(&v.to_string()))).collect::<Vec<_>>().join(", ")
        ));
    }
    for (key, label) in [("minimum", "≥"), ("maximum", "≤")] {
        if let Some(v) = s[key].as_i64() {
            c.push(format!("{label} {v}"));
        }
    }
    match (s["minLength"].as_i64(), s["maxLength"].as_i64()) {
        (Some(a), Some(b)) => c.push(format!("length {a}..{b}")),
        (Some(a), None) => c.push(format!("length ≥ {a}")),
        (None, Some(b)) => c.push(format!("length ≤ {b}")),
        _ => {}
    }
    match (s["minItems"].as_i64(), s["maxItems"].as_i64()) {
        (Some(a), Some(b)) => c.push(format!("{a}..{b} items")),
        (Some(a), None) => c.push(format!("≥ {a} items")),
        (None, Some(b)) => c.push(format!("≤ {b} items")),
        _ => {}
    }
    if let Some(p) = s["pattern"].as_str() {
        c.push(format!("pattern `{p}`"));
    }
    if let Some(f) = s["format"].as_str() {
        c.push(format!("format {f}"));
    }
    if let Some(keys) = s["x-kubernetes-list-map-keys"].as_array() {
        c.push(format!(
            "unique by {}",
            keys.iter().map(|k| format!("`{}`", k.as_str().unwrap())).collect::<Vec<_>>().join(", ")
        ));
    }
    c.join("; ")
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// One row per field, depth first, in schema (alphabetical) order.
fn walk(path: &str, s: &Value, required: bool, rows: &mut Vec<[String; 5]>, rules: &mut Vec<(String, String, String)>) {
    let default = match &s["default"] {
        Value::Null => String::new(),
        v => format!("`{}`", v),
    };
    rows.push([
        format!("`{path}`"),
        format!("`{}`", type_of(s)),
        if required { "yes".into() } else { String::new() },
        cell(&default),
        cell(&format!(
            "{}{}",
            s["description"].as_str().unwrap_or_default(),
            match constraints(s) {
                c if c.is_empty() => String::new(),
                c => format!(" ({c})"),
            }
        )),
    ]);
    for rule in s["x-kubernetes-validations"].as_array().into_iter().flatten() {
        rules.push((
            path.to_string(),
            rule["rule"].as_str().unwrap_or_default().to_string(),
            rule["message"].as_str().unwrap_or_default().to_string(),
        ));
    }
    let (props, req, prefix) = if s["type"] == "array" {
        (&s["items"]["properties"], &s["items"]["required"], format!("{path}[]"))
    } else {
        (&s["properties"], &s["required"], path.to_string())
    };
    if s["type"] == "array" {
        for rule in s["items"]["x-kubernetes-validations"].as_array().into_iter().flatten() {
            rules.push((
                format!("{path}[]"),
                rule["rule"].as_str().unwrap_or_default().to_string(),
                rule["message"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    if let Some(props) = props.as_object() {
        let req: Vec<&str> = req.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        for (name, child) in props {
            walk(&format!("{prefix}.{name}"), child, req.contains(&name.as_str()), rows, rules);
        }
    }
}

fn reference() -> String {
    let crd = mirrorfleet::api::crd::crd();
    let version = &crd.spec.versions[0];
    let schema = serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
    let mut out = String::from(HEADER);
    let mut rules = Vec::new();
    for (top, title) in [("spec", "Spec"), ("status", "Status (written by the operator)")] {
        let mut rows = Vec::new();
        walk(top, &schema["properties"][top], false, &mut rows, &mut rules);
        writeln!(out, "\n## {title}\n").unwrap();
        out.push_str("| Field | Type | Required | Default | Description |\n| --- | --- | --- | --- | --- |\n");
        for r in rows.iter().skip(1) {
            writeln!(out, "| {} |", r.join(" | ")).unwrap();
        }
    }
    out.push_str(
        "\n## Rules across fields (CEL, checked at admission)\n\n| On | Rule | Message |\n| --- | --- | --- |\n",
    );
    for (path, rule, message) in rules {
        writeln!(out, "| `{path}` | `{}` | {} |", cell(&rule), cell(&message)).unwrap();
    }
    out.push_str("\n## Printer columns (`kubectl get registrymirrors`)\n\n| Column | From |\n| --- | --- |\n");
    for c in version.additional_printer_columns.iter().flatten() {
        writeln!(out, "| {} | `{}` |", c.name, c.json_path).unwrap();
    }
    out
}

#[test]
fn docs_reference_matches_the_crd_schema() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference.md");
    let generated = reference();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == generated, "docs/reference.md differs from the CRD schema; run `make generate`");
}

#[test]
fn reference_lists_every_field_of_the_schema() {
    // The generator itself: every leaf of the schema appears as a row.
    let text = reference();
    for field in [
        "`spec.upstreams[].remoteURL`",
        "`spec.upstreams[].credentialsSecretRef.passwordKey`",
        "`spec.proxy.storage.persistentVolumeClaim.accessModes`",
        "`spec.nodeConfig.fallbackToUpstream`",
        "`status.conditions[].type`",
        "`status.nodes.configured`",
    ] {
        assert!(text.contains(field), "{field} missing from the reference");
    }
    assert!(text.contains("clientAuth.nodeUser is required when nodeConfig is set"), "CEL rules missing");
}
