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
