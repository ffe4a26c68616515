//! What the cluster benches (`cluster`, `cluster_scale`) share: the `--bench`/`KUBECONFIG`
//! gate, the CRD, a fresh namespace per run, the test mirror, and the operator itself — the
//! release binary of this crate, started with its admin server on a free local port, read over
//! plain HTTP, and stopped with SIGTERM when dropped.
//!
//! Included by each bench with `#[path = "support/operator.rs"] mod operator;`; being in a
//! subdirectory, it is not a bench target of its own.

use std::fmt;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use mirrorfleet::api::RegistryMirror;
use serde_json::json;

/// Whether to run: only under `cargo bench` (`--bench`) and with a cluster (`KUBECONFIG`);
/// otherwise prints `usage` or `skip` and says no.
pub fn should_run(usage: &str, skip: &str) -> bool {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs benches once without --bench: nothing to do here.
        println!("{usage}");
        return false;
    }
    if std::env::var_os("KUBECONFIG").is_none() {
        println!("{skip}");
        return false;
    }
    true
}

/// Installs (server-side apply) the RegistryMirror CRD of this tree.
pub fn install_crd() -> anyhow::Result<()> {
    let root = env!("CARGO_MANIFEST_DIR");
    let status = Command::new("kubectl")
        .args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &format!("{root}/crds/registrymirrors.mirrorfleet.io.yaml"),
        ])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "installing the CRD");
    Ok(())
}

/// Runs `run` in a new namespace `{prefix}-{unix seconds}`, which is deleted afterwards
/// (in the background, whatever `run` returned).
pub async fn in_fresh_namespace<T, F, Fut>(client: &Client, prefix: &str, run: F) -> anyhow::Result<T>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let ns = format!("{prefix}-{stamp}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}}))?).await?;
    let result = run(ns.clone()).await;
    let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
    result
}

/// A 5-upstream mirror; `schedulable: false` pins its proxies to a node label no node has.
pub fn mirror(name: &str, ns: &str, schedulable: bool) -> RegistryMirror {
    let proxy = if schedulable {
        json!({"replicas": 1})
    } else {
        json!({"replicas": 1, "nodeSelector": {"mirrorfleet.io/bench": "no-such-node"}})
    };
    let upstreams: Vec<_> = (0..5)
        .map(|i| json!({"name": format!("u{i}"), "registry": format!("registry{i}.example.com"), "remoteURL": format!("https://registry{i}.example.com")}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "mirrorfleet.io/v1alpha1", "kind": "RegistryMirror",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"upstreams": upstreams, "proxy": proxy}
    }))
    .unwrap()
}

/// (VmRSS, VmHWM) of a process, in KiB; 0 for what cannot be read.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The operator, running `mirrorfleet run` for one namespace; SIGTERM and wait on drop.
pub struct Operator {
    child: Child,
    pub pid: u32,
    pub port: u16,
    pub log: PathBuf,
}

impl Operator {
    /// Starts `mirrorfleet run --watch-namespace <ns> <args…> --admin-addr 127.0.0.1:<free port>`
    /// (`RUST_LOG=warn`, stderr to `<CARGO_TARGET_TMPDIR>/<ns>-operator.log`) and waits up to
    /// 30 s for `/readyz` to answer 200 and then `up` to hold; `state` names that in the error.
    pub async fn start(
        ns: &str,
        args: &[&str],
        state: &str,
        up: impl Fn(&Operator) -> bool,
    ) -> anyhow::Result<Operator> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{ns}-operator.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_mirrorfleet"))
            .args(["run", "--watch-namespace", ns])
            .args(args)
            .args(["--admin-addr", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let operator = Operator { pid: child.id(), child, port, log };
        let start = Instant::now();
        while operator.get("/readyz").is_none() || !up(&operator) {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "operator not {state} after 30s; see {}",
                operator.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(operator)
    }

    /// `GET path` from the admin server: the whole answer (status line, headers, body) if 200.
    pub fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let ok = buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200");
        ok.then_some(buf)
    }

    /// The admin server's `/metrics`, empty when it does not answer.
    pub fn metrics(&self) -> String {
        self.get("/metrics").unwrap_or_default()
    }
}

/// `operator pid <pid>, admin :<port>, log <path>`
impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "operator pid {}, admin :{}, log {}", self.pid, self.port, self.log.display())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}
