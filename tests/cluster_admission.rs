//! Cluster tier (`make e2e`, needs `KUBECONFIG`): the CRD on a real API server admits every
//! sample and rejects the bad-input table exactly where tests/invalid_specs.rs says the schema
//! does — including what cannot be evaluated off-cluster (list-map key uniqueness, the API
//! server's own CEL cost estimate when the CRD is installed).
//!
//! `#[ignore]`d: plain `cargo test` lists it as ignored (CI has no API server); `make e2e` runs it
//! with `--ignored`, and there a missing `KUBECONFIG` fails.

mod common;
mod support;

use std::process::Output;

use common::cases::{base, cases, Admission};
use support::kubectl::{kubectl, require_cluster};

const NAMESPACE: &str = "mirrorfleet-admission";

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dry_run(obj: &serde_json::Value) -> Result<(), String> {
    let out = kubectl(&["apply", "--server-side", "--dry-run=server", "-f", "-"], Some(&obj.to_string()));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

#[test]
#[ignore = "needs a cluster: make e2e"]
fn real_api_server_admits_samples_and_rejects_the_bad_input_table() {
    require_cluster();
    let root = env!("CARGO_MANIFEST_DIR");
    ok(
        &kubectl(&["apply", "--server-side", "-f", &format!("{root}/crds/registrymirrors.mirrorfleet.io.yaml")], None),
        "install CRD",
    );
    ok(
        &kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd/registrymirrors.mirrorfleet.io"], None),
        "CRD established",
    );
    let ns = kubectl(&["create", "namespace", NAMESPACE], None);
    assert!(ns.status.success() || String::from_utf8_lossy(&ns.stderr).contains("AlreadyExists"));

    for name in common::SAMPLES {
        let text = common::sample_text(name);
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            v["metadata"]["namespace"] = NAMESPACE.into();
            dry_run(&v).unwrap_or_else(|e| panic!("sample {name} refused by the API server: {e}"));
        }
    }

    let mut v = base();
    v["metadata"]["namespace"] = NAMESPACE.into();
    dry_run(&v).expect("the valid base is admitted");

    let mut failures = Vec::new();
    for case in cases() {
        let mut v = base();
        (case.edit)(&mut v);
        v["metadata"]["namespace"] = NAMESPACE.into();
        let result = dry_run(&v);
        match (case.admission, result) {
            (Admission::Schema | Admission::ListMapKey, Ok(())) => {
                failures.push(format!("{}: admitted, but the schema should refuse it", case.what))
            }
            (Admission::Schema | Admission::ListMapKey, Err(msg)) => {
                let leaf = case.path.rsplit('.').next().unwrap().split('[').next().unwrap();
                if !msg.contains(leaf) {
                    failures
                        .push(format!("{}: refused, but the message does not name {}: {msg}", case.what, case.path));
                }
            }
            (Admission::UnknownField, Ok(())) => failures.push(format!("{}: unknown field admitted", case.what)),
            (Admission::UnknownField, Err(msg)) => {
                if !(msg.contains("field not declared in schema") || msg.contains("unknown field"))
                    || !msg.contains(case.path.rsplit('.').next().unwrap())
                {
                    failures.push(format!("{}: refused for another reason: {msg}", case.what));
                }
            }
            (Admission::Operator, Ok(())) => {}
            (Admission::Operator, Err(msg)) => {
                failures.push(format!("{}: marked operator-only but the API server refuses it: {msg}", case.what))
            }
        }
    }
    let _ = kubectl(&["delete", "namespace", NAMESPACE, "--wait=false"], None);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
