//! A private dockerd 20.10 (root required): vfs storage, no bridge, no iptables, its own
//! data-root, exec-root, pidfile and socket, configured by a daemon.json the test controls, so
//! `registry-mirrors` written by the node agent can be exercised with real pulls.
//!
//! Flags and daemon.json must not name the same setting (dockerd refuses to start), so the flags
//! here cover only isolation and the file is left to the test.

use super::{is_root, require, run, tempdir, tool, Proc};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tempfile::TempDir;

pub struct Dockerd {
    // Field order: the daemon dies before its directories go.
    proc: Proc,
    docker: PathBuf,
    socket: PathBuf,
    dir: TempDir,
}

/// The docker CLI that matches the packaged daemon (Debian's docker.io puts it in /usr/bin; a
/// newer client elsewhere on PATH also works, it negotiates the API version).
fn docker_cli() -> PathBuf {
    let packaged = PathBuf::from("/usr/bin/docker");
    if packaged.exists() {
        packaged
    } else {
        require("docker")
    }
}

impl Dockerd {
    /// Needs dockerd, docker and root. Same contract as [`tool`]: panics under CI, SKIPs locally.
    pub fn available() -> bool {
        let tools = tool("dockerd").is_some() & tool("docker").is_some();
        if !tools {
            return false;
        }
        if !is_root() {
            if super::in_ci() {
                panic!("dockerd tests must run as root in CI");
            }
            eprintln!("SKIP: dockerd tests need root");
            return false;
        }
        true
    }

    /// Starts dockerd with `--config-file config_file` and waits (up to 60 s) for `docker version`.
    pub fn start(config_file: &Path) -> Dockerd {
        let bin = require("dockerd");
        // Unix socket paths are limited to 107 bytes.
        let dir = if std::env::temp_dir().as_os_str().len() > 40 {
            tempfile::Builder::new().prefix("mf-dockerd-").tempdir_in("/tmp").unwrap()
        } else {
            tempdir()
        };
        let d = dir.path();
        let socket = d.join("docker.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("--config-file")
            .arg(config_file)
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .args(["--storage-driver", "vfs", "--bridge", "none", "--iptables=false", "--ip-masq=false"]);
        let mut proc = Proc::spawn("dockerd", cmd, &d.join("dockerd.log"));
        let docker = docker_cli();
        let (cli, sock) = (docker.clone(), socket.clone());
        proc.wait_ready("docker version answers", Duration::from_secs(60), || {
            let out = Command::new(&cli)
                .arg("--host")
                .arg(format!("unix://{}", sock.display()))
                .arg("version")
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
        Dockerd { proc, docker, socket, dir }
    }

    /// `docker --host unix://SOCK ARGS..` (120 s timeout).
    pub fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.docker);
        cmd.arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.path());
        run(&mut cmd, Duration::from_secs(120))
    }

    /// The daemon's current `registry-mirrors` (`docker info`).
    pub fn mirrors(&self) -> Vec<String> {
        let out = self.docker(&["info", "--format", "{{json .RegistryConfig.Mirrors}}"]);
        assert!(out.status.success(), "{}", super::describe_output(&out));
        serde_json::from_slice::<Option<Vec<String>>>(&out.stdout).unwrap().unwrap_or_default()
    }

    /// SIGHUP: dockerd re-reads the reloadable part of its config file (registry-mirrors is).
    pub fn reload(&self) {
        let pid = self.proc.pid().expect("dockerd running").to_string();
        let out = run(Command::new("kill").args(["-HUP", &pid]), Duration::from_secs(5));
        assert!(out.status.success(), "{}", super::describe_output(&out));
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}
