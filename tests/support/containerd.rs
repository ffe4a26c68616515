//! A private containerd 1.6 (root required) used only to run
//! `ctr images pull --hosts-dir`, i.e. to check that rendered
//! `certs.d/<registry>/hosts.toml` files route pulls where we expect.
//!
//! Facts this relies on (verified, see notes):
//! * `ctr images pull` resolves and fetches in the *ctr* process with
//!   containerd's `remotes/docker/config` code (the same code CRI uses for
//!   `config_path`); the daemon only stores content and unpacks.
//! * a mirror is reached over plain HTTP only when its host key has the
//!   `http://` scheme; `--plain-http` and `skip_verify` do not change the
//!   scheme of hosts.toml entries.
//! * ctr unpacks with `--snapshotter` (default overlayfs) regardless of the
//!   daemon's config, so [`Containerd::pull`] passes `--snapshotter native`.

use super::{is_root, require, run, tempdir, Proc};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tempfile::TempDir;

/// Namespace used for every ctr call.
pub const NAMESPACE: &str = "test";

/// Everything but content/metadata/images/leases/snapshots(native)/diff:
/// CRI would try to set up networking and pull sandbox images, the other
/// snapshotters probe the host's filesystems, the task/runtime plugins and
/// `opt` touch /run/containerd and /opt/containerd.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.restart",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
    // containerd 2.x names (1.6 ignores names it does not know).
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    "io.containerd.nri.v1.nri",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.podsandbox.controller.v1.podsandbox",
    "io.containerd.sandbox.controller.v1.shim",
];

/// The containerd 2.x daemon given by `MIRRORFLEET_CONTAINERD2` (built outside the repository from
/// a public snapshot) and its `ctr` (`MIRRORFLEET_CTR2`, else `ctr2` or `ctr` beside it).
pub fn containerd2() -> Option<(PathBuf, PathBuf)> {
    let bin = PathBuf::from(std::env::var_os("MIRRORFLEET_CONTAINERD2")?);
    let ctr = std::env::var_os("MIRRORFLEET_CTR2").map(PathBuf::from).unwrap_or_else(|| {
        let dir = bin.parent().unwrap_or(Path::new("."));
        [dir.join("ctr2"), dir.join("ctr")].into_iter().find(|p| p.exists()).unwrap_or_else(|| dir.join("ctr2"))
    });
    assert!(bin.exists() && ctr.exists(), "MIRRORFLEET_CONTAINERD2: {} or {} missing", bin.display(), ctr.display());
    Some((bin, ctr))
}

pub struct Containerd {
    // Field order matters: the daemon must die before its root is removed.
    proc: Proc,
    ctr: PathBuf,
    socket: PathBuf,
    dir: TempDir,
}

impl Containerd {
    /// Whether containerd tests can run here: needs `containerd`, `ctr` and
    /// root. Same contract as [`tool`]: panics under CI, SKIPs locally.
    pub fn available() -> bool {
        if !super::tools_available(&["containerd", "ctr"]) {
            return false;
        }
        if !is_root() {
            if super::in_ci() {
                panic!("containerd tests must run as root in CI");
            }
            eprintln!("SKIP: containerd tests need root");
            return false;
        }
        true
    }

    /// Starts containerd with root/state/sockets in a fresh temp dir and
    /// waits (up to 20 s) until `ctr version` talks to it.
    pub fn start() -> Containerd {
        Containerd::start_with(require("containerd"), require("ctr"))
    }

    /// [`Containerd::start`] with the given daemon and ctr binaries (a containerd 2.x).
    pub fn start_with(bin: PathBuf, ctr: PathBuf) -> Containerd {
        // Unix socket paths are limited to 107 bytes; a long $TMPDIR would
        // break the grpc address, so fall back to /tmp.
        let dir = if std::env::temp_dir().as_os_str().len() > 60 {
            tempfile::Builder::new().prefix("mf-ctrd-").tempdir_in("/tmp").unwrap()
        } else {
            tempdir()
        };
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let disabled = DISABLED_PLUGINS.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "version = 2\n\
             root = {root:?}\n\
             state = {state:?}\n\
             disabled_plugins = [{disabled}]\n\
             \n[grpc]\n  address = {sock:?}\n\
             \n[ttrpc]\n  address = {ttrpc:?}\n\
             \n[debug]\n  level = \"info\"\n",
            root = d.join("root").display().to_string(),
            state = d.join("state").display().to_string(),
            sock = socket.display().to_string(),
            ttrpc = d.join("containerd.sock.ttrpc").display().to_string(),
        );
        let config_path = d.join("config.toml");
        fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config_path);
        let mut proc = Proc::spawn("containerd", cmd, &d.join("containerd.log"));
        let probe_ctr = ctr.clone();
        let probe_sock = socket.clone();
        proc.wait_ready("ctr version answers", Duration::from_secs(20), || {
            if !probe_sock.exists() {
                return None;
            }
            let out = Command::new(&probe_ctr).arg("--address").arg(&probe_sock).arg("version").output().ok()?;
            out.status.success().then_some(())
        });
        Containerd { proc, ctr, socket, dir }
    }

    /// The grpc socket (`ctr --address`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// `ctr --address SOCK --namespace test ARGS..` (60 s timeout).
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_within(args, Duration::from_secs(60))
    }

    /// [`Containerd::ctr`] with its own timeout.
    pub fn ctr_within(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address").arg(&self.socket).args(["--namespace", NAMESPACE]).args(args);
        run(&mut cmd, timeout)
    }

    /// The ctr binary this daemon is driven with.
    pub fn ctr_path(&self) -> &Path {
        &self.ctr
    }

    /// `ctr images pull --snapshotter native --hosts-dir DIR EXTRA.. IMAGE`.
    ///
    /// Returns ctr's output; assert on the *registry* logs to learn which
    /// host served the pull: ctr's exit code only says some host did.
    pub fn pull(&self, image_ref: &str, hosts_dir: &Path, extra_args: &[&str]) -> Output {
        let hosts_dir = hosts_dir.to_str().expect("utf-8 hosts dir");
        let mut args = vec!["images", "pull", "--snapshotter", "native", "--hosts-dir", hosts_dir];
        args.extend_from_slice(extra_args);
        args.push(image_ref);
        self.ctr(&args)
    }

    /// Image references currently known (`ctr images ls -q`).
    pub fn image_refs(&self) -> Vec<String> {
        let out = self.ctr(&["images", "ls", "-q"]);
        assert!(out.status.success(), "{}", super::describe_output(&out));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

/// Writes `hosts_dir/<registry_host>/hosts.toml` (the containerd
/// `config_path` layout; `registry_host` is e.g. `docker.io` or
/// `registry.k8s.io` or `_default`) and returns its path.
pub fn write_hosts_toml(hosts_dir: &Path, registry_host: &str, toml: &str) -> PathBuf {
    let dir = hosts_dir.join(registry_host);
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("hosts.toml");
    fs::write(&path, toml).unwrap();
    path
}
