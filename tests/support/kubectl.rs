//! `kubectl` for the cluster tier: tests that run only when `KUBECONFIG` names a cluster.

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// Cluster tests are `#[ignore]`d (plain `cargo test` lists them as ignored, never as passed) and
/// run through `make e2e`, `make e2e-faults` or `make e2e-node` with `--ignored`: asked to run,
/// a missing cluster is a failure.
pub fn require_cluster() {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "this test needs a cluster: set KUBECONFIG (make e2e / make e2e-node run it with the k8s harness)"
    );
}

/// `kubectl ARGS` with `stdin` piped in.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is on PATH");
    let mut pipe = child.stdin.take().unwrap();
    if let Some(input) = stdin {
        pipe.write_all(input.as_bytes()).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

/// [`kubectl`], panicking with the output unless it succeeds; returns stdout.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(out.status.success(), "kubectl {args:?}\n{}", super::describe_output(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Installs (or updates) the RegistryMirror CRD from `crds/` and waits until it is served.
pub fn install_crd() {
    let crd = format!("{}/crds/registrymirrors.mirrorfleet.io.yaml", env!("CARGO_MANIFEST_DIR"));
    kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", &crd], None);
    kubectl_ok(&["wait", "--for=condition=Established", "--timeout=60s", "crd/registrymirrors.mirrorfleet.io"], None);
}

/// Creates the namespace `name`.
pub fn create_namespace(name: &str) {
    kubectl_ok(&["create", "namespace", name], None);
}

/// Deletes the namespace `ns` without waiting, after releasing the finalizers of the mirrors in
/// it (no operator runs any more to do that, and `kubectl patch` has no --all). Unless
/// `MIRRORFLEET_E2E_KEEP` is set, which keeps it for a look.
pub fn delete_test_namespace(ns: &str) {
    if std::env::var_os("MIRRORFLEET_E2E_KEEP").is_some() {
        eprintln!("keeping namespace {ns} (MIRRORFLEET_E2E_KEEP)");
        return;
    }
    let _ = kubectl(&["delete", "namespace", ns, "--wait=false"], None);
    let names = kubectl(&["-n", ns, "get", "registrymirrors", "-o", "name"], None);
    for name in String::from_utf8_lossy(&names.stdout).lines().filter(|l| !l.is_empty()) {
        let _ = kubectl(&["-n", ns, "patch", name, "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#], None);
    }
}
