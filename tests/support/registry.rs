//! Real Distribution registries (`docker-registry serve`, 2.8.x on Debian).
//!
//! Distribution 2.8 quirks that shape these helpers (details in the notes):
//! * unknown config keys are ignored silently (e.g. `proxy.ttl`, which only
//!   3.x understands), so "it started" proves little about a config;
//! * a missing htpasswd file is *created* with user `docker` and a random
//!   password, hence [`Registry::start`] refuses the Kubernetes mount paths;
//! * the access-log line is written after the response, so assert on the
//!   log with [`Registry::wait_log`], not right after a request returns.

use super::{free_addr, free_port, require, run_ok, tempdir, wait_until, Proc};
use serde_yaml::Value;
use std::fs;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

/// Paths a Kubernetes-rendered config points at, which must never be used
/// on the host running the tests.
const POD_ROOT_DIR: &str = "/var/lib/registry";
const POD_HTPASSWD: &str = "/auth/htpasswd";

pub struct Registry {
    // Field order matters: the process must die before its dir is removed.
    proc: Proc,
    addr: String,
    debug_addr: Option<String>,
    config_path: PathBuf,
    _dir: TempDir,
}

impl Registry {
    /// Starts `docker-registry serve` on the given full config text.
    ///
    /// `http.addr` must already be a loopback `127.0.0.1:PORT` (see
    /// [`patch_registry_config`] for configs rendered for pods). Waits until
    /// `/v2/` answers with any status (up to 20 s), panicking with the log.
    pub fn start(config_yaml: &str) -> Registry {
        Registry::start_with_env(config_yaml, &[])
    }

    /// [`Registry::start`] with extra environment, e.g. the pod's
    /// `REGISTRY_PROXY_USERNAME`/`REGISTRY_PROXY_PASSWORD`, which override the
    /// config file. Inherited `REGISTRY_*` and `AWS_*` variables are removed so a
    /// developer's shell cannot change the config under test (2.8's S3 driver
    /// panics at start on an inherited `AWS_CA_BUNDLE`).
    pub fn start_with_env(config_yaml: &str, env: &[(&str, &str)]) -> Registry {
        Registry::start_bin(&require("docker-registry"), config_yaml, env)
    }

    /// [`Registry::start_with_env`] with another Distribution binary (3.x: `registry serve`
    /// takes the same arguments).
    pub fn start_bin(bin: &Path, config_yaml: &str, env: &[(&str, &str)]) -> Registry {
        let cfg: Value = serde_yaml::from_str(config_yaml).expect("registry config is not YAML");
        let addr = yaml_str(&cfg, &["http", "addr"]).expect("registry config lacks http.addr");
        // Loopback, or the real node's address (the harness's NODE_IP: pods reach it, nothing
        // off this machine does).
        let node_ip = std::env::var("NODE_IP").ok().filter(|ip| !ip.is_empty()).map(|ip| format!("{ip}:"));
        assert!(
            addr.starts_with("127.0.0.1:")
                || addr.starts_with("localhost:")
                || node_ip.as_deref().is_some_and(|ip| addr.starts_with(ip)),
            "http.addr {addr:?} is not a loopback address (or $NODE_IP); use patch_registry_config"
        );
        // Guard against configs rendered for pods touching the host.
        assert_ne!(
            yaml_str(&cfg, &["storage", "filesystem", "rootdirectory"]).as_deref(),
            Some(POD_ROOT_DIR),
            "refusing to run a registry on the host's {POD_ROOT_DIR}; use patch_registry_config"
        );
        assert_ne!(
            yaml_str(&cfg, &["auth", "htpasswd", "path"]).as_deref(),
            Some(POD_HTPASSWD),
            "registry 2.8 would create {POD_HTPASSWD} on the host; use patch_registry_config"
        );
        let debug_addr = yaml_str(&cfg, &["http", "debug", "addr"]);

        let dir = tempdir();
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config_yaml).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config_path);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") || key.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        let mut proc = Proc::spawn(&format!("registry@{addr}"), cmd, &dir.path().join("registry.log"));
        proc.wait_ready("GET /v2/ answers", Duration::from_secs(20), || {
            super::http_request("GET", &addr, "/v2/", &[], &[]).ok()
        });
        Registry { proc, addr, debug_addr, config_path, _dir: dir }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://127.0.0.1:PORT`, e.g. for `proxy.remoteurl` or hosts.toml.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http.debug.addr` if configured (serves `/metrics`, `/debug/vars`).
    pub fn debug_addr(&self) -> Option<&str> {
        self.debug_addr.as_deref()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Whole app + access log (the combined-format access lines look like
    /// `127.0.0.1 - - [..] "GET /v2/library/x/manifests/v1?ns=docker.io HTTP/1.1" 200 ...`).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Waits until the log contains `needle`. Needed because the access log
    /// line is written only after the response has been sent.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle).then_some(())).is_some()
    }

    /// expvar JSON from the debug server. In proxy mode
    /// `registry.proxy.{manifests,blobs}.{Requests,Hits,Misses}` count
    /// pull-through traffic, which 2.8 does not export to Prometheus.
    pub fn debug_vars(&self) -> serde_json::Value {
        let addr = self.debug_addr.as_deref().expect("no http.debug.addr configured");
        let resp = super::http_get(addr, "/debug/vars", &[]);
        assert_eq!(resp.status, 200, "{}", resp.text());
        serde_json::from_slice(&resp.body).expect("expvar JSON")
    }

    /// Kills the registry; the log stays readable until drop.
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

/// A plain (non-proxy) registry with its own filesystem storage: the
/// stand-in for docker.io and friends in pull-through tests. Derefs to
/// [`Registry`].
pub struct Upstream {
    registry: Registry,
    _storage: TempDir,
}

impl Upstream {
    pub fn start() -> Upstream {
        let storage = tempdir();
        let registry = Registry::start(&registry_config(&free_addr(), storage.path()));
        Upstream { registry, _storage: storage }
    }

    /// Pushes an OCI layout built by [`super::build_test_image`] as
    /// `library/<name>:<tag>` (anonymous).
    pub fn push(&self, oci_layout: &Path, tag: &str) {
        super::push_image(oci_layout, tag, self.addr(), None);
    }
}

impl Deref for Upstream {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.registry
    }
}

impl std::ops::DerefMut for Upstream {
    fn deref_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }
}

/// Minimal local config: filesystem storage, deletes enabled, fixed
/// `http.secret` (silences the random-secret warning). Append further
/// top-level sections (`proxy:`, `auth:`) as text if needed.
pub fn registry_config(addr: &str, root_dir: &Path) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: info\n\
         storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n  secret: mirrorfleet-tier2\n",
        root = root_dir.display()
    )
}

/// Rewrites a registry config rendered for a pod so it runs locally,
/// touching ONLY:
/// * `http.addr` (`:5000`) -> `addr`
/// * `http.debug.addr` (`:5001`), if present -> another free 127.0.0.1 port
/// * `storage.filesystem.rootdirectory`, if present -> `root_dir`
/// * `auth.htpasswd.path`, if present -> `htpasswd_path` (required then,
///   because 2.8 would otherwise create `/auth/htpasswd` on the host)
///
/// Everything else round-trips through `serde_yaml::Value` unchanged in
/// meaning and key order (comments and quoting style are not preserved).
pub fn patch_registry_config(yaml: &str, addr: &str, root_dir: &Path, htpasswd_path: Option<&Path>) -> String {
    let mut cfg: Value = serde_yaml::from_str(yaml).expect("registry config is not YAML");
    *yaml_get_mut(&mut cfg, &["http", "addr"]).expect("config lacks http.addr") = addr.into();
    if let Some(debug) = yaml_get_mut(&mut cfg, &["http", "debug", "addr"]) {
        *debug = format!("127.0.0.1:{}", free_port()).into();
    }
    if let Some(root) = yaml_get_mut(&mut cfg, &["storage", "filesystem", "rootdirectory"]) {
        *root = root_dir.display().to_string().into();
    }
    match (yaml_get_mut(&mut cfg, &["auth", "htpasswd", "path"]), htpasswd_path) {
        (Some(path), Some(local)) => *path = local.display().to_string().into(),
        (Some(_), None) => panic!("config uses auth.htpasswd: pass a local htpasswd_path"),
        (None, Some(_)) => panic!("htpasswd_path given but config has no auth.htpasswd.path"),
        (None, None) => {}
    }
    serde_yaml::to_string(&cfg).unwrap()
}

/// Writes a bcrypt htpasswd file (`htpasswd -Bbn`, the only hash format
/// Distribution accepts) with the given users.
pub fn write_htpasswd(path: &Path, users: &[(&str, &str)]) {
    let bin = require("htpasswd");
    let mut content = String::new();
    for (user, pass) in users {
        let out = run_ok(Command::new(&bin).args(["-Bbn", user, pass]), Duration::from_secs(10));
        // htpasswd -n prints "user:hash\n\n"; keep one line per user.
        content.push_str(String::from_utf8(out.stdout).unwrap().trim());
        content.push('\n');
    }
    fs::write(path, content).unwrap();
}

fn yaml_get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn yaml_get_mut<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

fn yaml_str(v: &Value, path: &[&str]) -> Option<String> {
    yaml_get(v, path).and_then(Value::as_str).map(str::to_string)
}
