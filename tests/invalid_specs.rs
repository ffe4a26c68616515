//! Bad input: a table of invalid RegistryMirrors. Each must be rejected with a message naming the
//! field — by the CRD schema (OpenAPI structure and CEL rules, evaluated here against the very
//! schema `mirrorfleet crd` prints) wherever the API server can say it, and always by `render`
//! (the same validation the controller runs before building anything).

use mirrorfleet::render::{render_str, RenderOptions};
use serde_json::Value;

const USERS: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: users, namespace: mirrors}
stringData: {ci: ci-password, nodes: nodes-password}
"#;

const BASE: &str = r#"
apiVersion: mirrorfleet.io/v1alpha1
kind: RegistryMirror
metadata: {name: fleet, namespace: mirrors}
spec:
  upstreams:
  - {name: dockerhub, registry: docker.io, remoteURL: "https://registry-1.docker.io"}
  - {name: ghcr, registry: ghcr.io, remoteURL: "https://ghcr.io"}
  proxy:
    replicas: 2
    storage: {emptyDir: {sizeLimit: 10Gi}}
  clientAuth: {usersSecretRef: {name: users}, nodeUser: nodes}
  edge: {domain: mirror.example.com, tlsSecretRef: {name: tls}}
  cleanup: {schedule: "0 3 * * 0"}
  nodeConfig: {fallbackToUpstream: true}
"#;

/// Who catches a mistake at admission.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Admission {
    /// The OpenAPI part or a CEL rule of the CRD schema.
    Schema,
    /// The API server's list-map key uniqueness (`x-kubernetes-list-map-keys`), not evaluable here;
    /// the test checks the schema declares it.
    ListMapKey,
    /// Nothing at admission: the operator reports it (Ready=False) and render refuses.
    Operator,
}

struct Case {
    what: &'static str,
    edit: fn(&mut Value),
    path: &'static str,
    message: &'static str,
    admission: Admission,
}

fn up(v: &mut Value, i: usize) -> &mut Value {
    &mut v["spec"]["upstreams"][i]
}

fn cases() -> Vec<Case> {
    use Admission::*;
    vec![
        Case {
            what: "upstream name not a DNS label",
            edit: |v| up(v, 0)["name"] = "Docker_Hub".into(),
            path: "spec.upstreams[0].name",
            message: "DNS-1123 label",
            admission: Schema,
        },
        Case {
            what: "duplicate upstream name",
            edit: |v| up(v, 1)["name"] = "dockerhub".into(),
            path: "spec.upstreams[1].name",
            message: "duplicate upstream name",
            admission: ListMapKey,
        },
        Case {
            what: "duplicate registry",
            edit: |v| up(v, 1)["registry"] = "docker.io".into(),
            path: "spec.upstreams[1].registry",
            message: "already used",
            admission: Schema,
        },
        Case {
            what: "registry with a path",
            edit: |v| up(v, 0)["registry"] = "docker.io/library".into(),
            path: "spec.upstreams[0].registry",
            message: "not a registry host name",
            admission: Schema,
        },
        Case {
            what: "remoteURL with a non-http scheme",
            edit: |v| up(v, 0)["remoteURL"] = "ftp://registry-1.docker.io".into(),
            path: "spec.upstreams[0].remoteURL",
            message: "scheme",
            admission: Schema,
        },
        Case {
            what: "remoteURL without a scheme",
            edit: |v| up(v, 0)["remoteURL"] = "registry-1.docker.io/v2".into(),
            path: "spec.upstreams[0].remoteURL",
            message: "not an absolute URL",
            admission: Schema,
        },
        Case {
            what: "remoteURL with a query",
            edit: |v| up(v, 0)["remoteURL"] = "https://registry-1.docker.io/?x=1".into(),
            path: "spec.upstreams[0].remoteURL",
            message: "query",
            admission: Schema,
        },
        Case {
            what: "remoteURL of the wrong type",
            edit: |v| up(v, 0)["remoteURL"] = 443.into(),
            path: "spec.upstreams[0].remoteURL",
            message: "invalid type",
            admission: Schema,
        },
        Case {
            what: "no upstreams",
            edit: |v| v["spec"]["upstreams"] = Value::Array(vec![]),
            path: "spec.upstreams",
            message: "at least one upstream",
            admission: Schema,
        },
        Case {
            what: "proxy replicas zero",
            edit: |v| v["spec"]["proxy"]["replicas"] = 0.into(),
            path: "spec.proxy.replicas",
            message: "out of range",
            admission: Schema,
        },
        Case {
            what: "proxy replicas unbounded",
            edit: |v| v["spec"]["proxy"]["replicas"] = 500.into(),
            path: "spec.proxy.replicas",
            message: "out of range",
            admission: Schema,
        },
        Case {
            what: "two storage kinds",
            edit: |v| {
                v["spec"]["proxy"]["storage"]["s3"] = serde_json::json!({"bucket": "cache", "region": "eu-west-1"})
            },
            path: "spec.proxy.storage",
            message: "exactly one of",
            admission: Schema,
        },
        Case {
            what: "no storage kind",
            edit: |v| v["spec"]["proxy"]["storage"] = serde_json::json!({}),
            path: "spec.proxy.storage",
            message: "exactly one of",
            admission: Schema,
        },
        Case {
            what: "ttl not a duration",
            edit: |v| v["spec"]["proxy"]["ttl"] = "7 days".into(),
            path: "spec.proxy.ttl",
            message: "not a duration",
            admission: Schema,
        },
        Case {
            what: "size limit not a quantity",
            edit: |v| v["spec"]["proxy"]["storage"]["emptyDir"]["sizeLimit"] = "lots".into(),
            path: "spec.proxy.storage.emptyDir.sizeLimit",
            message: "not a quantity",
            admission: Operator,
        },
        Case {
            what: "several replicas on a ReadWriteOnce claim",
            edit: |v| v["spec"]["proxy"]["storage"] = serde_json::json!({"persistentVolumeClaim": {"size": "50Gi"}}),
            path: "spec.proxy.replicas",
            message: "ReadWriteMany",
            admission: Schema,
        },
        Case {
            what: "unknown access mode",
            edit: |v| {
                v["spec"]["proxy"]["storage"] =
                    serde_json::json!({"persistentVolumeClaim": {"size": "50Gi", "accessModes": ["ReadOnlyMany"]}})
            },
            path: "spec.proxy.storage.persistentVolumeClaim.accessModes[0]",
            message: "ReadOnlyMany",
            admission: Schema,
        },
        Case {
            what: "cron schedule with four fields",
            edit: |v| v["spec"]["cleanup"]["schedule"] = "0 3 * *".into(),
            path: "spec.cleanup.schedule",
            message: "expected 5 fields",
            admission: Schema,
        },
        Case {
            what: "cron minute out of range",
            edit: |v| v["spec"]["cleanup"]["schedule"] = "61 3 * * 0".into(),
            path: "spec.cleanup.schedule",
            message: "out of range 0-59",
            admission: Operator,
        },
        Case {
            what: "unknown cleanup policy",
            edit: |v| v["spec"]["cleanup"]["policy"] = "delete-everything".into(),
            path: "spec.cleanup.policy",
            message: "unknown variant",
            admission: Schema,
        },
        Case {
            what: "edge domain with one label",
            edit: |v| v["spec"]["edge"]["domain"] = "localhost".into(),
            path: "spec.edge.domain",
            message: "at least two labels",
            admission: Schema,
        },
        Case {
            what: "https redirect without TLS",
            edit: |v| {
                v["spec"]["edge"].as_object_mut().unwrap().remove("tlsSecretRef");
                v["spec"]["edge"]["httpsRedirect"] = true.into();
            },
            path: "spec.edge.httpsRedirect",
            message: "needs tlsSecretRef",
            admission: Schema,
        },
        Case {
            what: "two upstreams on one edge host",
            edit: |v| {
                up(v, 0)["host"] = "hub.example.com".into();
                up(v, 1)["host"] = "hub.example.com".into();
            },
            path: "spec.upstreams[1].host",
            message: "already used",
            admission: Schema,
        },
        Case {
            what: "explicit host equal to another upstream's default host",
            edit: |v| up(v, 0)["host"] = "ghcr.mirror.example.com".into(),
            path: "spec.upstreams[1].host",
            message: "already used",
            admission: Operator,
        },
        Case {
            what: "node config with client auth but no node user",
            edit: |v| {
                v["spec"]["clientAuth"].as_object_mut().unwrap().remove("nodeUser");
            },
            path: "spec.clientAuth.nodeUser",
            message: "required when nodeConfig",
            admission: Schema,
        },
        Case {
            what: "node user missing from the users Secret",
            edit: |v| v["spec"]["clientAuth"]["nodeUser"] = "robot".into(),
            path: "spec.clientAuth.nodeUser",
            message: "not a key of Secret",
            admission: Operator,
        },
        Case {
            what: "users Secret missing",
            edit: |v| v["spec"]["clientAuth"]["usersSecretRef"]["name"] = "nowhere".into(),
            path: "spec.clientAuth.usersSecretRef",
            message: "not available",
            admission: Operator,
        },
        Case {
            what: "nodes via edge without TLS",
            edit: |v| {
                v["spec"]["edge"].as_object_mut().unwrap().remove("tlsSecretRef");
                v["spec"]["nodeConfig"]["via"] = "Edge".into();
            },
            path: "spec.nodeConfig.via",
            message: "needs edge with tlsSecretRef",
            admission: Schema,
        },
        Case {
            what: "relative certs dir",
            edit: |v| v["spec"]["nodeConfig"]["containerd"] = serde_json::json!({"certsDir": "etc/containerd/certs.d"}),
            path: "spec.nodeConfig.containerd.certsDir",
            message: "absolute directory",
            admission: Schema,
        },
        Case {
            what: "mirror name starting with a digit",
            edit: |v| v["metadata"]["name"] = "1fleet".into(),
            path: "metadata.name",
            message: "start with a letter",
            admission: Schema,
        },
        Case {
            what: "mirror name too long",
            edit: |v| v["metadata"]["name"] = "a".repeat(41).into(),
            path: "metadata.name",
            message: "at most 40",
            admission: Schema,
        },
        Case {
            what: "mirror plus upstream name too long",
            edit: |v| {
                v["metadata"]["name"] = "a".repeat(30).into();
                up(v, 0)["name"] = "b".repeat(30).into();
            },
            path: "spec.upstreams[0].name",
            message: "at most 56",
            admission: Schema,
        },
        Case {
            what: "misspelt field",
            edit: |v| {
                v["spec"]["proxy"]["replica"] = 3.into();
            },
            path: "spec.proxy.replica",
            message: "unknown field",
            admission: Operator,
        },
    ]
}

fn base() -> Value {
    serde_yaml::from_str(BASE).unwrap()
}

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
