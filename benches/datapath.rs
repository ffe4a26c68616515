//! `make bench`: data-path figures on 127.0.0.1, with the same rendered fleet as
//! `tests/datapath.rs` (token-auth upstream, registry proxy with htpasswd, Envoy with TLS).
//!
//! The client is curl fetching what a pull fetches — the manifest by tag, then the config and
//! every layer by digest — over one connection (curl reuses it for all URLs of a run), bodies
//! discarded. It is a blob-fetch client, not a runtime: no decompression, no unpacking, so
//! the figures are the data path's own. Three ways:
//!
//! - cold: through Envoy and the proxy with an empty cache (the proxy restarted on a wiped
//!   storage before each run), so every blob comes from the upstream;
//! - warm via the proxy only: plain HTTP to the proxy, everything from its cache;
//! - warm via Envoy + proxy: HTTPS (HTTP/2) through the edge to the same proxy.
//!
//! For a ~50 MB single-layer image and a 20-layer image (20 x 2.5 MB). Printed: median wall
//! time and throughput per way, upstream bytes per pull (counted by a TCP tap between proxy
//! and upstream), and the warm Envoy/direct throughput ratio (target: at least 0.8).
//!
//! Needs docker-registry, envoy, skopeo, umoci, openssl and curl; without them it says what is
//! missing and exits 0 (under CI=true it fails, as the tests do).

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::datapath::fleet::CI_USER;
use support::datapath::{Fleet, FleetOptions, Storage};
use support::{build_test_image, oci_manifest_digest, run, tool, tools_available};

const MB: usize = 1_000_000;

/// Paths a pull fetches for the single image in `layout` (`library/<name>:v1`).
fn pull_paths(layout: &Path) -> Vec<String> {
    let name = layout.file_name().unwrap().to_str().unwrap();
    let digest = oci_manifest_digest(layout);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap()).unwrap();
    let mut paths = vec![format!("/v2/library/{name}/manifests/v1")];
    paths.push(format!("/v2/library/{name}/blobs/{}", manifest["config"]["digest"].as_str().unwrap()));
    for l in manifest["layers"].as_array().unwrap() {
        paths.push(format!("/v2/library/{name}/blobs/{}", l["digest"].as_str().unwrap()));
    }
    paths
}

enum Via<'a> {
    Proxy(&'a str),
    Edge { host: String, port: u16, ca: &'a Path },
}

/// Fetches every path with one curl (one connection); returns (seconds, body bytes).
fn fetch(via: &Via, paths: &[String]) -> (f64, u64) {
    let mut cmd = Command::new(tool("curl").unwrap());
    cmd.args(["-sS", "--fail", "-u", &format!("{}:{}", CI_USER.0, CI_USER.1)])
        .args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
        .args(["-w", "%{size_download}\\n"]);
    // Extra curl flags for experiments, e.g. MIRRORFLEET_BENCH_CURL_ARGS=--http1.1.
    if let Ok(extra) = std::env::var("MIRRORFLEET_BENCH_CURL_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    let base = match via {
        Via::Proxy(addr) => format!("http://{addr}"),
        Via::Edge { host, port, ca } => {
            let name = host.split_once(':').unwrap().0;
            cmd.args(["--resolve", &format!("{name}:{port}:127.0.0.1"), "--cacert"]).arg(ca);
            format!("https://{host}")
        }
    };
    for p in paths {
        cmd.args(["-o", "/dev/null"]).arg(format!("{base}{p}"));
    }
    let started = Instant::now();
    let out = run(&mut cmd, Duration::from_secs(300));
    let took = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "fetch failed: {}", support::describe_output(&out));
    let bytes = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse::<u64>().ok()).sum();
    (took, bytes)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Figures {
    seconds: f64,
    mb_per_s: f64,
    upstream_bytes: u64,
}

fn measure(runs: usize, mut once: impl FnMut() -> (f64, u64, u64)) -> Figures {
    let (mut secs, mut rates, mut upstream) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (s, bytes, up) = once();
        secs.push(s);
        rates.push(bytes as f64 / MB as f64 / s);
        upstream.push(up as f64);
    }
    Figures { seconds: median(secs), mb_per_s: median(rates), upstream_bytes: median(upstream) as u64 }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    if !tools_available(&["docker-registry", "envoy", "skopeo", "umoci", "openssl", "curl"]) {
        eprintln!("datapath bench skipped: tools missing (see .ci/run)");
        return;
    }
    let hub = "dockerhub";
    let mut fleet = Fleet::start(FleetOptions { cleanup_policy: "purge", storage: Storage::Pvc });
    let images = [
        ("single-layer ~50 MB", build_test_image(fleet.dir(), "bench1", 1, 50 * MB)),
        ("20 layers x 2.5 MB", build_test_image(fleet.dir(), "bench20", 20, 5 * MB / 2)),
    ];
    for (_, layout) in &images {
        fleet.upstream(hub).push(layout, "v1");
    }
    let runs_cold = 3;
    let runs_warm = 9;
    // These machines are shared: the load says how much the figures can be trusted.
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "data path, medians (cold: {runs_cold} runs, warm: {runs_warm} runs); client: curl, one connection per pull"
    );
    println!("load average {} on {cores} cores", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!("{:<22} {:<22} {:>9} {:>10} {:>16}", "image", "way", "seconds", "MB/s", "upstream B/pull");
    for (label, layout) in &images {
        let paths = pull_paths(layout);
        let (host, port, ca) = (fleet.edge_host(hub), fleet.https_port, fleet.ca_cert.clone());
        let edge = || Via::Edge { host: host.clone(), port, ca: &ca };

        let cold = measure(runs_cold, || {
            fleet.stop_proxy(hub);
            let _ = fs::remove_dir_all(fleet.cache_dir(hub));
            fleet.start_proxy(hub);
            let before = fleet.tap(hub).bytes_from_upstream();
            let (s, b) = fetch(&edge(), &paths);
            // Let the proxy's second upstream read of each blob (2.8 reads it twice) finish.
            std::thread::sleep(Duration::from_millis(500));
            (s, b, fleet.tap(hub).bytes_from_upstream() - before)
        });
        // Warm runs alternate direct and edge, so load from other processes on this shared
        // machine hits both alike; the ratio is taken per pair, then the median of the pairs.
        let (mut direct_runs, mut edge_runs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs_warm {
            let before = fleet.tap(hub).bytes_from_upstream();
            let (sd, bd) = fetch(&Via::Proxy(fleet.proxy(hub).addr()), &paths);
            let (se, be) = fetch(&edge(), &paths);
            let up = (fleet.tap(hub).bytes_from_upstream() - before) / 2;
            direct_runs.push((sd, bd, up));
            edge_runs.push((se, be, up));
            ratios.push((be as f64 / se) / (bd as f64 / sd));
        }
        let mut it = direct_runs.into_iter();
        let direct = measure(runs_warm, || it.next().unwrap());
        let mut it = edge_runs.into_iter();
        let via_edge = measure(runs_warm, || it.next().unwrap());
        for (way, f) in
            [("cold (edge + proxy)", &cold), ("warm, proxy only", &direct), ("warm, edge + proxy", &via_edge)]
        {
            println!("{label:<22} {way:<22} {:>9.3} {:>10.1} {:>16}", f.seconds, f.mb_per_s, f.upstream_bytes);
        }
        let ratio = median(ratios);
        println!(
            "{label:<22} warm edge/direct throughput ratio: {ratio:.2} (target >= 0.80: {})",
            if ratio >= 0.8 { "met" } else { "NOT met" }
        );
    }
}
