//! `make bench-cluster`: the controller against a real API server (`KUBECONFIG`).
//!
//! 1. Create -> converged for a 5-upstream mirror, median of 20 (`BENCH_LATENCY_RUNS`): the time
//!    from the create request until the status says every child is applied and observed
//!    (`observedGeneration` = 1 with all five upstreams listed, written after the last apply),
//!    and until Ready=True (which also waits for the cluster's own controllers to schedule and
//!    start the proxy Pods).
//! 2. A fleet of 100 mirrors (`BENCH_FLEET`) of 5 upstreams each, their proxies pinned to no
//!    node (see below): time until every one has converged, then the operator's API writes over
//!    a quiet period of `BENCH_QUIET_SECONDS` (default 600) with nothing changing (target 0), by
//!    verb and kind, and its resident memory (VmRSS, VmHWM).
//!
//! Runs the release binary of this crate with leader election on, scoped to a fresh namespace
//! that is deleted at the end. Without `KUBECONFIG` it says so and exits 0.

#[path = "support/operator.rs"]
mod operator;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{DeleteParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client};
use mirrorfleet::api::RegistryMirror;
use operator::{memory_kib, mirror, Operator};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn converged(m: Option<&RegistryMirror>) -> bool {
    m.and_then(|m| m.status.as_ref()).is_some_and(|s| s.observed_generation == Some(1) && s.upstreams.len() == 5)
}

fn ready(m: Option<&RegistryMirror>) -> bool {
    m.and_then(|m| m.status.as_ref())
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn metric(operator: &Operator, name: &str) -> u64 {
    mirrorfleet::controller::metrics::sum_series(&operator.metrics(), name)
}

fn metric_f64(operator: &Operator, name: &str) -> f64 {
    operator
        .metrics()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `mirrorfleet_api_writes_total{verb,kind}` series -> count.
fn write_breakdown(operator: &Operator) -> std::collections::BTreeMap<String, u64> {
    operator
        .metrics()
        .lines()
        .filter(|l| l.starts_with("mirrorfleet_api_writes_total{"))
        .filter_map(|l| {
            let (series, n) = l.rsplit_once(' ')?;
            Some((series.to_string(), n.parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// resourceVersion of every fleet mirror (any write to it, status included, changes it).
async fn fleet_versions(mirrors: &Api<RegistryMirror>) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    Ok(mirrors
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|m| Some((m.metadata.name?, m.metadata.resource_version?)))
        .filter(|(n, _)| n.starts_with("fleet-"))
        .collect())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !operator::should_run(
        "cluster bench: run it with `make bench-cluster`",
        "SKIP: no KUBECONFIG; the cluster benchmark needs a cluster",
    ) {
        return Ok(());
    }
    operator::install_crd()?;
    Command::new("kubectl")
        .args(["wait", "--for=condition=Established", "--timeout=60s", "crd/registrymirrors.mirrorfleet.io"])
        .stdout(Stdio::null())
        .status()?;

    let client = &Client::try_default().await?;
    operator::in_fresh_namespace(client, "mf-bench", |ns| async move { run(client, &ns).await }).await
}

async fn run(client: &Client, ns: &str) -> anyhow::Result<()> {
    let operator =
        Operator::start(ns, &["--lease-namespace", ns], "leading", |op| metric(op, "mirrorfleet_leader") == 1).await?;
    println!("{operator}");
    let mirrors: Api<RegistryMirror> = Api::namespaced(client.clone(), ns);

    // 1. create -> converged / Ready, one mirror at a time.
    let runs = env_num("BENCH_LATENCY_RUNS", 20) as usize;
    let (mut to_converged, mut to_ready) = (Vec::new(), Vec::new());
    let mut not_ready = 0;
    for i in 0..runs {
        let name = format!("lat-{i}");
        let t0 = Instant::now();
        mirrors.create(&PostParams::default(), &mirror(&name, ns, true)).await?;
        tokio::time::timeout(Duration::from_secs(60), await_condition(mirrors.clone(), &name, converged)).await??;
        to_converged.push(t0.elapsed());
        // Ready needs room for five Pods; a shared cluster may be full, so this part may be cut.
        match tokio::time::timeout(Duration::from_secs(30), await_condition(mirrors.clone(), &name, ready)).await {
            Ok(r) => {
                r?;
                to_ready.push(t0.elapsed());
            }
            Err(_) => not_ready += 1,
        }
        mirrors.delete(&name, &DeleteParams::background()).await?;
    }
    println!(
        "create -> children applied and status observed, 5 upstreams: median {} (min {}, max {}) over {runs}",
        ms(median(to_converged.clone())),
        ms(*to_converged.iter().min().unwrap()),
        ms(*to_converged.iter().max().unwrap())
    );
    if to_ready.is_empty() {
        println!("create -> Ready=True: never within 30 s ({not_ready} runs; the cluster had no room for the Pods)");
    } else {
        println!(
            "create -> Ready=True (includes scheduling and the kubelet), 5 upstreams: median {} (min {}, max {}) over {}; {not_ready} not Ready within 30 s",
            ms(median(to_ready.clone())),
            ms(*to_ready.iter().min().unwrap()),
            ms(*to_ready.iter().max().unwrap()),
            to_ready.len()
        );
    }

    // 2. A fleet: all Ready, then quiet.
    let fleet = env_num("BENCH_FLEET", 100) as usize;
    let t0 = Instant::now();
    for i in 0..fleet {
        mirrors.create(&PostParams::default(), &mirror(&format!("fleet-{i}"), ns, false)).await?;
    }
    // The fleet's proxies are pinned to a node label no node has: 500 proxy Pods do not fit a
    // small test cluster (3 fake nodes hold 330), and Pods that get scheduled whenever other
    // tests free room would change the fleet's status during the quiet period. Unschedulable,
    // every Deployment stays as it is; the controller's work (apply, list, status) is the same.
    for i in 0..fleet {
        let name = format!("fleet-{i}");
        tokio::time::timeout(Duration::from_secs(900), await_condition(mirrors.clone(), &name, converged)).await??;
    }
    println!(
        "{fleet} mirrors x 5 upstreams converged (children applied, status observed) after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // Let the cluster's controllers settle (ReplicaSets, Pods marked unschedulable).
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (rss, hwm) = memory_kib(operator.pid);
    println!(
        "operator memory with {fleet} mirrors: VmRSS {:.1} MiB, peak VmHWM {:.1} MiB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    let quiet = env_num("BENCH_QUIET_SECONDS", 600);
    let status_before = fleet_versions(&mirrors).await?;
    let breakdown_before = write_breakdown(&operator);
    let writes_before = metric(&operator, "mirrorfleet_api_writes_total");
    let reconciles_before = metric(&operator, "mirrorfleet_reconcile_total");
    let lease_before = metric(&operator, "mirrorfleet_leader_lease_writes_total");
    tokio::time::sleep(Duration::from_secs(quiet)).await;
    let writes = metric(&operator, "mirrorfleet_api_writes_total") - writes_before;
    let reconciles = metric(&operator, "mirrorfleet_reconcile_total") - reconciles_before;
    let lease = metric(&operator, "mirrorfleet_leader_lease_writes_total") - lease_before;
    let status_after = fleet_versions(&mirrors).await?;
    let changed = status_before.iter().filter(|(k, v)| status_after.get(*k) != Some(*v)).count();
    let (rss_end, hwm_end) = memory_kib(operator.pid);
    println!(
        "quiet {quiet} s, {fleet} unchanged mirrors: {writes} API writes by reconciles ({reconciles} reconciles ran); \
         {lease} Lease renewals (leader election, counted apart)"
    );
    println!("mirrors whose object changed during the quiet period: {changed}/{fleet}");
    let breakdown_after = write_breakdown(&operator);
    for (series, n) in &breakdown_after {
        let during = n - breakdown_before.get(series).copied().unwrap_or(0);
        if during > 0 {
            println!("  during the quiet period: {series} {during}");
        }
    }
    println!(
        "operator memory after the quiet period: VmRSS {:.1} MiB, peak VmHWM {:.1} MiB",
        rss_end as f64 / 1024.0,
        hwm_end as f64 / 1024.0
    );
    let sum = metric_f64(&operator, "mirrorfleet_reconcile_duration_seconds_sum");
    let count = metric_f64(&operator, "mirrorfleet_reconcile_duration_seconds_count");
    if count > 0.0 {
        println!("reconcile duration: mean {:.1} ms over {count} reconciles", sum / count * 1000.0);
    }
    Ok(())
}
