//! Bad input: a table of invalid RegistryMirrors. Each must be rejected with a message naming the
//! field — by the CRD schema (OpenAPI structure and CEL rules, evaluated here against the very
//! schema `mirrorfleet crd` prints) wherever the API server can say it, and always by `render`
//! (the same validation the controller runs before building anything).

mod common;

use mirrorfleet::render::{render_str, RenderOptions};
use serde_json::Value;

use common::cases::{base, cases, Admission, USERS};

fn opts() -> RenderOptions {
    RenderOptions { namespace: "mirrors".into(), ..RenderOptions::default() }
}

fn render(v: &Value) -> Result<(), String> {
    let input = format!("{USERS}---\n{}", serde_yaml::to_string(v).unwrap());
    render_str(&input, &opts()).map(|_| ()).map_err(|e| e.to_string())
}

fn crd_schema() -> Value {
    let crd = mirrorfleet::api::crd::crd();
    serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

/// What the API server would say, as far as it can be evaluated off-cluster: the OpenAPI
/// structure (types, patterns, bounds, enums, required) and every CEL rule.
fn admission(schema: &Value, obj: &Value) -> Result<(), String> {
    let mut errors = Vec::new();
    let validator = jsonschema::draft4::new(schema).expect("CRD schema compiles as JSON schema");
    for e in validator.iter_errors(obj) {
        errors.push(format!("{}: {}", e.instance_path(), e));
    }
    if errors.is_empty() {
        // The API server runs CEL only on structurally valid objects.
        if let Err(cel) = kube::core::cel::Validator::new().validate(schema, obj, None) {
            errors.extend(cel.into_vec().into_iter().map(|e| format!("{}: {}", e.field_path, e.message)));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// `spec.upstreams[0].name` and `/spec/upstreams/0/name` name the same field.
fn json_pointer(path: &str) -> String {
    format!("/{}", path.replace("[", ".").replace("]", "").replace('.', "/"))
}

#[test]
fn the_valid_base_passes_schema_and_render() {
    admission(&crd_schema(), &base()).expect("base passes the schema");
    render(&base()).expect("base renders");
}

#[test]
fn every_invalid_spec_is_rejected_with_a_message_naming_the_field() {
    let schema = crd_schema();
    let cases = cases();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in &cases {
        let mut v = base();
        (case.edit)(&mut v);

        match render(&v) {
            Ok(()) => failures.push(format!("{}: render accepted it", case.what)),
            Err(msg) => {
                if !msg.contains(case.path) || !msg.contains(case.message) {
                    failures.push(format!(
                        "{}: render said {msg:?}, want {:?} and {:?}",
                        case.what, case.path, case.message
                    ));
                }
            }
        }

        let at_admission = admission(&schema, &v);
        match case.admission {
            Admission::Schema => match at_admission {
                Ok(()) => failures.push(format!("{}: the CRD schema accepts it", case.what)),
                Err(msg) => {
                    // The schema's message names the field, as a JSON pointer, a CEL field path, or
                    // (for rules on a parent) in its text.
                    let leaf = case.path.rsplit('.').next().unwrap().split('[').next().unwrap();
                    if !(msg.contains(&json_pointer(case.path)) || msg.contains(case.path) || msg.contains(leaf)) {
                        failures.push(format!("{}: schema said {msg:?}, which does not name {}", case.what, case.path));
                    }
                }
            },
            Admission::ListMapKey => {
                let upstreams = &schema["properties"]["spec"]["properties"]["upstreams"];
                if upstreams["x-kubernetes-list-type"] != "map" || upstreams["x-kubernetes-list-map-keys"][0] != "name"
                {
                    failures.push(format!("{}: upstreams is not a list-map keyed by name", case.what));
                }
            }
            Admission::UnknownField => {
                let proxy = &schema["properties"]["spec"]["properties"]["proxy"];
                if !proxy["x-kubernetes-preserve-unknown-fields"].is_null() || !proxy["additionalProperties"].is_null()
                {
                    failures.push(format!("{}: spec.proxy keeps unknown fields", case.what));
                }
            }
            Admission::Operator => {
                if let Err(msg) = at_admission {
                    failures.push(format!(
                        "{}: marked operator-only, but the schema rejects it ({msg}); mark it Schema",
                        case.what
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// The API server refuses a CRD whose CEL rules may cost too much on the largest object the
/// schema admits; the estimate here uses the same bounds (maxItems, maxLength).
#[test]
fn cel_rules_fit_the_api_server_cost_budget() {
    fn walk(schema: &Value, path: &str, out: &mut Vec<String>) {
        if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
            let compiled = kube::core::cel::compile_schema(schema);
            for r in rules {
                let rule = r["rule"].as_str().unwrap();
                for w in kube::core::cel::estimate_rule_cost(rule, &compiled) {
                    out.push(format!("{path}: {rule}: {}", w.message));
                }
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), out);
            }
        }
        if schema["items"].is_object() {
            walk(&schema["items"], &format!("{path}[]"), out);
        }
    }
    let mut warnings = Vec::new();
    walk(&crd_schema(), "", &mut warnings);
    assert!(warnings.is_empty(), "{}", warnings.join("\n"));
}
