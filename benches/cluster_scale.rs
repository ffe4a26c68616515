//! `make bench-scale`: how the controller's cost grows with the fleet, against a real API server.
//!
//! For each N in `BENCH_SCALE_N` (default `10,100,500`), in a fresh namespace with a fresh
//! operator (the release binary, leader election off, `RUST_LOG=warn`):
//!
//! 1. create N RegistryMirrors of 5 upstreams each, 32 requests in flight; the clock starts when
//!    the API server has accepted the last one;
//! 2. poll (one list every 500 ms) until every mirror has converged — `observedGeneration` equals
//!    `generation` and all five upstreams are in the status, which the controller writes after the
//!    last child was applied — and until every mirror is Ready (that also waits for the cluster to
//!    schedule and run 5 N proxy Pods, which a small test cluster may not have room for: the
//!    table then says how many were Ready when `BENCH_SCALE_READY_WAIT` (60 s) after convergence
//!    ran out);
//! 3. update every mirror at once (`spec.proxy.ttl`: each proxy's registry config changes, so
//!    5 N ConfigMaps and Deployments change) and measure the same.
//!
//! Per phase: seconds to converged and to all Ready, operator CPU seconds (utime + stime from
//! /proc), peak RSS (VmHWM), the operator's API writes by verb (its `mirrorfleet_api_writes_total`
//! counter) and the API server's requests by verb over the phase (`apiserver_request_total`; that
//! one counts every client of the cluster — the kube-controller-manager creating ReplicaSets and
//! Pods, the scheduler, the fake kubelet, anything else running — so it is context, not the
//! operator's share). Targets at N = 500: converged in under 60 s, peak RSS under 100 MiB.
//!
//! Without `KUBECONFIG` it says so and exits 0.

#[path = "support/operator.rs"]
mod operator;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use mirrorfleet::api::RegistryMirror;
use operator::{memory_kib, mirror, Operator};
use serde_json::json;

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn converged(m: &RegistryMirror) -> bool {
    let gen = m.metadata.generation;
    m.status.as_ref().is_some_and(|s| s.observed_generation == gen && s.upstreams.len() == 5)
}

fn ready(m: &RegistryMirror) -> bool {
    converged(m)
        && m.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Sums of a counter's series by one label's value.
fn by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let Some(rest) = rest.strip_prefix('{') else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        let key = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{label}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default();
        *out.entry(key).or_default() += value;
    }
    out
}

fn diff(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), (v - before.get(k).copied().unwrap_or(0.0)).round() as u64))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn show(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

fn apiserver_requests() -> BTreeMap<String, f64> {
    let out = Command::new("kubectl").args(["get", "--raw", "/metrics"]).output().expect("kubectl");
    by_label(&String::from_utf8_lossy(&out.stdout), "apiserver_request_total", "verb")
}

/// (CPU seconds, VmRSS MiB, VmHWM MiB) of a process.
fn usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let (rss, hwm) = memory_kib(pid);
    (ticks / clock_ticks(), rss as f64 / 1024.0, hwm as f64 / 1024.0)
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().ok();
    out.and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
}

struct Phase {
    n: usize,
    what: &'static str,
    converged: Option<f64>,
    ready: (usize, Option<f64>),
    cpu: f64,
    hwm: f64,
    writes: BTreeMap<String, u64>,
    apiserver: BTreeMap<String, u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !operator::should_run(
        "cluster scale bench: run it with `make bench-scale`",
        "SKIP: no KUBECONFIG; the scale benchmark needs a cluster",
    ) {
        return Ok(());
    }
    operator::install_crd()?;
    let client = &Client::try_default().await?;
    let sizes: Vec<usize> =
        env_str("BENCH_SCALE_N", "10,100,500").split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    let mut phases = Vec::new();
    for n in sizes {
        let prefix = format!("mf-scale-{n}");
        let result = operator::in_fresh_namespace(client, &prefix, |ns| async move { run(client, &ns, n).await }).await;
        phases.extend(result?);
        table(&phases);
    }
    Ok(())
}

fn table(phases: &[Phase]) {
    let secs = |s: Option<f64>| s.map(|s| format!("{s:.1}")).unwrap_or_else(|| "timeout".into());
    println!();
    println!("| N | phase | converged s | Ready | Ready s | CPU s | peak RSS MiB | operator writes by verb | API server requests by verb (all clients) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for p in phases {
        println!(
            "| {} | {} | {} | {}/{} | {} | {:.1} | {:.1} | {} | {} |",
            p.n,
            p.what,
            secs(p.converged),
            p.ready.0,
            p.n,
            p.ready.1.map(|s| format!("{s:.1}")).unwrap_or_else(|| "-".into()),
            p.cpu,
            p.hwm,
            show(&p.writes),
            show(&p.apiserver)
        );
    }
    println!();
}

async fn run(client: &Client, ns: &str, n: usize) -> anyhow::Result<Vec<Phase>> {
    let operator = Operator::start(ns, &["--leader-elect", "false"], "ready", |_| true).await?;
    println!("N={n}: {operator}");
    let mirrors: Api<RegistryMirror> = Api::namespaced(client.clone(), ns);
    let ready_wait = Duration::from_secs(env_str("BENCH_SCALE_READY_WAIT", "60").parse()?);
    let converge_limit = Duration::from_secs(env_str("BENCH_SCALE_TIMEOUT", "600").parse()?);
    let mut out = Vec::new();

    for what in ["create", "update all"] {
        let writes_before = by_label(&operator.metrics(), "mirrorfleet_api_writes_total", "verb");
        let api_before = apiserver_requests();
        let (cpu_before, _, _) = usage(operator.pid);
        let names: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
        futures::stream::iter(names.iter().map(|name| {
            let mirrors = mirrors.clone();
            async move {
                if what == "create" {
                    mirrors.create(&PostParams::default(), &mirror(name, ns, true)).await.map(|_| ())
                } else {
                    let patch = json!({"spec": {"proxy": {"ttl": "72h"}}});
                    mirrors.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
                }
            }
        }))
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
        let t0 = Instant::now();
        println!("N={n} {what}: API server accepted all {n}");
        let (mut t_conv, mut t_ready) = (None, None);
        let mut ready_count;
        loop {
            let list = mirrors.list(&ListParams::default()).await?;
            let conv = list.items.iter().filter(|m| converged(m)).count();
            ready_count = list.items.iter().filter(|m| ready(m)).count();
            let now = t0.elapsed().as_secs_f64();
            if t_conv.is_none() && conv == n {
                t_conv = Some(now);
                println!("N={n} {what}: all converged after {now:.1} s ({ready_count} Ready)");
            }
            if ready_count == n {
                t_ready = Some(now);
                break;
            }
            match t_conv {
                Some(c) if now - c > ready_wait.as_secs_f64() => break,
                None if t0.elapsed() > converge_limit => {
                    println!("N={n} {what}: only {conv}/{n} converged after {:.0} s", converge_limit.as_secs_f64());
                    break;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (cpu, _, hwm) = usage(operator.pid);
        let writes_after = by_label(&operator.metrics(), "mirrorfleet_api_writes_total", "verb");
        out.push(Phase {
            n,
            what,
            converged: t_conv,
            ready: (ready_count, t_ready),
            cpu: cpu - cpu_before,
            hwm,
            writes: diff(&writes_after, &writes_before),
            apiserver: diff(&apiserver_requests(), &api_before),
        });
    }
    Ok(out)
}
