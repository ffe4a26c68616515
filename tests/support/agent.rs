//! The real node agent binary (`mirrorfleet node-agent --from-dir`) as a child process, fed
//! through a config directory the way the ConfigMap would feed it, plus a way to make a mirror
//! port blackhole new connections (iptables), which is what a dead mirror node looks like to
//! containerd: SYNs go unanswered and every dial waits out its 30 s timeout.

use super::{run, tempdir, tool, wait_until, Proc};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;
use tempfile::TempDir;

/// The `mirrorfleet` binary Cargo built for this test run.
pub fn mirrorfleet_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mirrorfleet"))
}

/// Writes `node-config.json` into `dir` atomically (as a ConfigMap update would appear).
pub fn write_node_config(dir: &Path, config: &serde_json::Value) {
    let tmp = dir.join(".node-config.json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(config).unwrap()).unwrap();
    fs::rename(&tmp, dir.join("node-config.json")).unwrap();
}

/// A node-config document as the controller renders it (`NodeConfig` JSON).
pub fn node_config_json(
    mirror_ref: &str,
    certs_dir: &Path,
    registries: &[(&str, &str, Option<&str>)],
) -> serde_json::Value {
    serde_json::json!({
        "mirror": mirror_ref,
        "containerd": {"certsDir": certs_dir.display().to_string()},
        "authenticate": false,
        "registries": registries.iter().map(|(registry, mirror, fallback)| serde_json::json!({
            "registry": registry,
            "upstream": registry.split('.').next().unwrap(),
            "mirror": mirror,
            "fallback": fallback,
            // What ships (spec.nodeConfig.containerd.dialTimeout's default): every real-containerd
            // test also shows containerd 1.6 keeps using an entry that carries the key.
            "dialTimeout": "1s",
        })).collect::<Vec<_>>(),
    })
}

pub struct NodeAgent {
    // Field order: the process dies before its directories go.
    proc: Proc,
    config_dir: PathBuf,
    status_dir: PathBuf,
    _dir: TempDir,
}

impl NodeAgent {
    /// Starts `mirrorfleet node-agent --mirror NAME --from-dir <dir> --status-dir <dir> EXTRA..`
    /// with `config` already in place (`None`: no config yet).
    pub fn start(mirror_name: &str, config: Option<&serde_json::Value>, extra: &[&str]) -> NodeAgent {
        NodeAgent::start_with_env(mirror_name, config, extra, &[])
    }

    /// [`NodeAgent::start`] with extra environment variables (e.g. `SSL_CERT_FILE`).
    pub fn start_with_env(
        mirror_name: &str,
        config: Option<&serde_json::Value>,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> NodeAgent {
        let dir = tempdir();
        let config_dir = dir.path().join("config");
        let status_dir = dir.path().join("status");
        fs::create_dir_all(&config_dir).unwrap();
        if let Some(c) = config {
            write_node_config(&config_dir, c);
        }
        let mut cmd = Command::new(mirrorfleet_bin());
        cmd.args(["node-agent", "--mirror", mirror_name, "--node-name", "test-node"])
            .arg("--from-dir")
            .arg(&config_dir)
            .arg("--status-dir")
            .arg(&status_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        for var in ["POD_NAMESPACE", "POD_NAME", "NODE_IP", "MIRRORFLEET_CONFIG_MAP", "MIRRORFLEET_AUTH_SECRET"] {
            cmd.env_remove(var);
        }
        let proc = Proc::spawn("node-agent", cmd, &dir.path().join("agent.log"));
        NodeAgent { proc, config_dir, status_dir, _dir: dir }
    }

    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    pub fn status_dir(&self) -> &Path {
        &self.status_dir
    }

    pub fn set_config(&self, config: &serde_json::Value) {
        write_node_config(&self.config_dir, config);
    }

    /// Writes (or with `None` removes) the `authorization` file, the node-auth Secret's stand-in.
    pub fn set_authorization(&self, header: Option<&str>) {
        let path = self.config_dir.join("authorization");
        match header {
            Some(h) => {
                fs::write(&path, h).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            }
            None => {
                let _ = fs::remove_file(&path);
            }
        }
    }

    /// The agent's `status.json`, once written.
    pub fn status(&self) -> Option<serde_json::Value> {
        let text = fs::read_to_string(self.status_dir.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until the status satisfies `pred`; panics with the agent's log otherwise.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let status_dir = self.status_dir.clone();
        self.proc.wait_ready(what, timeout, || {
            let text = fs::read_to_string(status_dir.join("status.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            pred(&v).then_some(v)
        })
    }

    /// `mirrorfleet node-agent-ready --status-dir ..`, as the kubelet runs it.
    pub fn readiness(&self) -> Output {
        run(
            Command::new(mirrorfleet_bin()).arg("node-agent-ready").arg("--status-dir").arg(&self.status_dir),
            Duration::from_secs(10),
        )
    }

    /// SIGTERM, as the kubelet sends it on a rollout; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.proc.pid().expect("agent running");
        let out = run(Command::new("kill").args(["-TERM", &pid.to_string()]), Duration::from_secs(5));
        assert!(out.status.success(), "kill -TERM {pid}");
        match self.proc.poll_ready(Duration::from_secs(10), || None::<()>) {
            Err(Some(status)) => status,
            _ => self.proc.fail("did not exit within 10 s of SIGTERM"),
        }
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

/// Runs the agent once (`--once`) over `config_dir`, returning its output (60 s timeout).
pub fn run_agent_once(mirror_name: &str, config_dir: &Path, status_dir: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(mirrorfleet_bin());
    cmd.args(["node-agent", "--once", "--mirror", mirror_name])
        .arg("--from-dir")
        .arg(config_dir)
        .arg("--status-dir")
        .arg(status_dir)
        .args(extra)
        .env_remove("POD_NAMESPACE")
        .env_remove("MIRRORFLEET_CONFIG_MAP");
    run(&mut cmd, Duration::from_secs(60))
}

/// Drops new TCP connections to `127.0.0.1:<port>` (SYNs only; established ones live on) until
/// dropped. Needs root and iptables; check [`Blackhole::available`] first.
pub struct Blackhole {
    port: u16,
}

impl Blackhole {
    /// Same contract as [`tool`]: panics under CI, SKIPs locally.
    pub fn available() -> bool {
        tool("iptables").is_some() && super::is_root()
    }

    fn rule(op: &str, port: u16) -> Output {
        run(
            Command::new(tool("iptables").expect("iptables")).args([
                "-w",
                op,
                "OUTPUT",
                "-o",
                "lo",
                "-p",
                "tcp",
                "-d",
                "127.0.0.1",
                "--dport",
                &port.to_string(),
                "--syn",
                "-j",
                "DROP",
            ]),
            Duration::from_secs(10),
        )
    }

    pub fn port(port: u16) -> Blackhole {
        let out = Self::rule("-I", port);
        assert!(out.status.success(), "iptables -I failed: {}", super::describe_output(&out));
        Blackhole { port }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let out = Self::rule("-D", self.port);
        if !out.status.success() {
            eprintln!("WARNING: could not remove the iptables rule for port {}", self.port);
        }
    }
}

/// Waits up to `timeout` for `path` to exist (`true`) or be gone (`false`); returns how long it took.
pub fn wait_path(path: &Path, exists: bool, timeout: Duration) -> Option<Duration> {
    let start = std::time::Instant::now();
    wait_until(timeout, || (path.exists() == exists).then_some(())).map(|()| start.elapsed())
}
