//! `make bench-agent`: how fast the node agent (the real binary, default probe settings) turns
//! events into files on disk. Prints medians (and min/max) over repeated runs:
//!
//! - node-config change -> `hosts.toml` written, and -> removed (`--from-dir`, which polls every
//!   100 ms; the API watch path is measured by `make e2e`, tests/agent_cluster.rs);
//! - mirror death -> entry withdrawn, for a refused connection (process gone) and, when root
//!   and iptables are available, a blackholed port (node gone: SYNs unanswered, each probe waits
//!   out its 1.5 s timeout);
//! - mirror back -> entry restored.
//!
//! Targets (issue 4): config change under 2 s, death to withdrawal under 10 s.
//! The mirror here is an in-process `/v2/` responder, so only the agent is measured.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::agent::{node_config_json, wait_path, Blackhole, NodeAgent};

/// Answers every request with `200 {}` on a fixed port until stopped (then: connection refused).
struct FakeMirror {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeMirror {
    fn start(port: u16) -> FakeMirror {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind mirror port");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                        let mut buf = [0u8; 2048];
                        let _ = s.read(&mut buf);
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        FakeMirror { port, stop, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for FakeMirror {
    fn drop(&mut self) {
        self.stop();
    }
}

fn report(label: &str, mut times: Vec<Duration>, target: Option<Duration>) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = times[times.len() / 2];
    let verdict = match target {
        Some(t) if median < t => format!("   target < {:.0} ms: met", ms(t)),
        Some(t) => format!("   target < {:.0} ms: MISSED", ms(t)),
        None => String::new(),
    };
    println!(
        "{label:<44} median {:>8.1} ms   min {:>8.1} ms   max {:>8.1} ms   ({} runs){verdict}",
        ms(median),
        ms(times[0]),
        ms(*times.last().unwrap()),
        times.len()
    );
}

fn wait(path: &Path, exists: bool, what: &str, agent: &NodeAgent) -> Duration {
    wait_path(path, exists, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{what}: not within 30 s; agent log:\n{}", agent.log()))
}

/// Death -> withdrawal and back -> restoration, `runs` times.
fn death_cycles(
    runs: usize,
    hosts: &Path,
    agent: &NodeAgent,
    mut kill: impl FnMut(),
    mut revive: impl FnMut(),
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut withdraw, mut restore) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        wait(hosts, true, "entry present", agent);
        // Let the agent settle into its steady probing rhythm, as a long-running agent would be.
        std::thread::sleep(Duration::from_millis(2500));
        kill();
        withdraw.push(wait(hosts, false, "withdrawal", agent));
        revive();
        restore.push(wait(hosts, true, "restoration", agent));
    }
    (withdraw, restore)
}

fn main() {
    // `cargo test --all-targets` (make test) also runs bench binaries, without `--bench`: this
    // one takes minutes, so it only measures when cargo bench asks.
    if !std::env::args().any(|a| a == "--bench") {
        println!("agent bench: skipped (run `make bench-agent`)");
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let death_runs: usize = std::env::var("BENCH_DEATH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let port = support::free_port();
    let mirror = Some(FakeMirror::start(port));
    let url = mirror.as_ref().unwrap().url();
    let certs = support::tempdir();
    let hub = Some("https://registry-1.docker.io");
    let base = node_config_json("bench/agent", certs.path(), &[("docker.io", &url, hub)]);
    let agent = NodeAgent::start("agent", Some(&base), &[]);
    let hosts = certs.path().join("docker.io/hosts.toml");
    wait(&hosts, true, "first write", &agent);

    // Config change -> file.
    let (mut written, mut removed) = (Vec::new(), Vec::new());
    for k in 0..runs {
        let registry = format!("r{k}.example.com");
        let mut with = base.clone();
        with["registries"].as_array_mut().unwrap().push(serde_json::json!({
            "registry": registry, "upstream": format!("r{k}"), "mirror": url, "fallback": format!("https://{registry}")
        }));
        let file = certs.path().join(&registry).join("hosts.toml");
        let t0 = Instant::now();
        agent.set_config(&with);
        wait(&file, true, "write after config change", &agent);
        written.push(t0.elapsed());
        let t0 = Instant::now();
        agent.set_config(&base);
        wait(&file, false, "removal after config change", &agent);
        removed.push(t0.elapsed());
    }
    report("node-config change -> hosts.toml written", written, Some(Duration::from_secs(2)));
    report("node-config change -> hosts.toml removed", removed, Some(Duration::from_secs(2)));
    // The DaemonSet's default memory limit is 64 MiB.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
    let kib = |key: &str| {
        status.lines().find(|l| l.starts_with(key)).unwrap_or(key).trim_start_matches(key).trim().to_string()
    };
    println!("agent memory after {} config changes: VmRSS {}, peak VmHWM {}", 2 * runs, kib("VmRSS:"), kib("VmHWM:"));

    // Mirror process gone: connection refused.
    let mirror = std::cell::RefCell::new(mirror);
    let (withdraw, restore) = death_cycles(
        death_runs,
        &hosts,
        &agent,
        || mirror.borrow_mut().take().unwrap().stop(),
        || *mirror.borrow_mut() = Some(FakeMirror::start(port)),
    );
    report("mirror refused -> entry withdrawn", withdraw, Some(Duration::from_secs(10)));
    report("mirror back -> entry restored", restore, None);

    // Mirror node gone: SYNs dropped.
    if Blackhole::available() {
        let hole = std::cell::RefCell::new(None);
        let (withdraw, restore) = death_cycles(
            death_runs,
            &hosts,
            &agent,
            || *hole.borrow_mut() = Some(Blackhole::port(port)),
            || drop(hole.borrow_mut().take()),
        );
        report("mirror blackholed -> entry withdrawn", withdraw, Some(Duration::from_secs(10)));
        report("blackhole lifted -> entry restored", restore, None);
    } else {
        println!("mirror blackholed -> entry withdrawn: skipped (needs root and iptables)");
    }
}
