//! `kubectl` for the cluster tier: tests that run only when `KUBECONFIG` names a cluster.

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// True when a cluster is given. Without one the test SKIPs, except that `MIRRORFLEET_E2E`
/// (set by `make e2e`) turns a missing `KUBECONFIG` into a failure.
pub fn cluster_available() -> bool {
    let have = std::env::var_os("KUBECONFIG").is_some();
    if !have {
        assert!(std::env::var_os("MIRRORFLEET_E2E").is_none(), "MIRRORFLEET_E2E is set but KUBECONFIG is not");
        eprintln!("SKIP: no KUBECONFIG; the cluster tier runs with `make e2e`");
    }
    have
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
