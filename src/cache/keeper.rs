//! `mirrorfleet cache-keeper`: the process in every proxy pod with filesystem storage.
//!
//! * `POST /events` on `--events-addr` (loopback: only the registry in the pod reaches it):
//!   Distribution's notification envelopes; every `pull` stamps what was pulled
//!   ([`evict::stamp_pull`]).
//! * Every `--interval`, and at once when the blobs pulled since the last look could have
//!   crossed the high watermark: the storage's disk usage against the volume; above the high
//!   watermark, an eviction down to the low one. Every `--ttl-check`, an eviction of what was not
//!   pulled for `--ttl`.
//! * `GET /metrics` (Prometheus text) and `GET /status` (JSON, read by the operator for the
//!   mirror's status) on `--listen-addr`: fill, capacity, last eviction, pulls seen, and the
//!   registry's own proxy counters (hits, misses, bytes served from the cache), read from its
//!   debug listener's Prometheus `/metrics` (Distribution 3.x; see [`proxy_counters`] for 2.8).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde::{Deserialize, Serialize};

use super::evict::{self, Limits, Unit};
use crate::api::reference::Target;
use crate::api::validate::go_duration;

pub const LISTEN_PORT: i32 = 5002;
pub const EVENTS_PORT: i32 = 5003;

#[derive(clap::Args, Debug, Clone)]
pub struct KeeperArgs {
    /// The registry's `rootdirectory`.
    #[arg(long, default_value = "/var/lib/registry")]
    pub root: PathBuf,
    /// The volume's declared size in bytes (an emptyDir's sizeLimit, a claim's request); the
    /// filesystem's size when smaller or when 0.
    #[arg(long, default_value_t = 0)]
    pub capacity_bytes: u64,
    /// Percent of the capacity above which the least recently pulled images are evicted.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub high_watermark: u8,
    /// Percent of the capacity an eviction goes down to.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub low_watermark: u8,
    /// Images not pulled for this long are evicted (Go duration; 0s: never).
    #[arg(long, default_value = "168h")]
    pub ttl: String,
    /// An image never evicted, as the proxy names it: `repository:tag` or `repository@digest`.
    #[arg(long = "pin")]
    pub pins: Vec<String>,
    /// Where the registry posts its notifications.
    #[arg(long, default_value = "127.0.0.1:5003")]
    pub events_addr: SocketAddr,
    /// Where /metrics and /status are served.
    #[arg(long, default_value = "0.0.0.0:5002")]
    pub listen_addr: SocketAddr,
    /// The registry's debug listener (its proxy counters at /metrics).
    #[arg(long, default_value = "127.0.0.1:5001")]
    pub registry_debug: String,
    /// How often the fill is measured (Go duration).
    #[arg(long, default_value = "10s")]
    pub interval: String,
    /// How often images past their ttl are looked for (Go duration).
    #[arg(long, default_value = "5m")]
    pub ttl_check: String,
    /// An image to fetch through the registry after start and on the schedule, as the proxy
    /// names it (`repository:tag`, `repository@digest`).
    #[arg(long = "prefetch")]
    pub prefetch: Vec<String>,
    /// Cron schedule (UTC) of further prefetch rounds.
    #[arg(long)]
    pub prefetch_schedule: Option<String>,
    /// Platforms of a multi-platform image to fetch (`os/architecture`).
    #[arg(long = "prefetch-platform", default_values_t = ["linux/amd64".to_string(), "linux/arm64".to_string()])]
    pub prefetch_platforms: Vec<String>,
    /// The registry user the prefetch authenticates as; its password in MIRRORFLEET_PREFETCH_PASSWORD.
    #[arg(long)]
    pub prefetch_user: Option<String>,
    /// The registry the prefetch pulls through.
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub registry_addr: String,
}

/// The last eviction, as `/status` reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Eviction {
    /// Unix seconds.
    pub time: i64,
    pub bytes: u64,
    pub images: usize,
    /// Of `images`, how many went for their age.
    pub expired: usize,
    /// Up to 10 of the evicted images (`repository:tag` or `repository@digest`).
    pub names: Vec<String>,
    pub seconds: f64,
}

/// The registry's own pull-through counters (Distribution 3's `registry_proxy_*` metrics).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCounters {
    pub blob_hits: u64,
    pub blob_misses: u64,
    pub manifest_hits: u64,
    pub manifest_misses: u64,
    /// Bytes of blobs served from the cache.
    pub bytes_served_from_cache: u64,
    /// Bytes of blobs fetched from the upstream.
    pub bytes_from_upstream: u64,
}

/// What `GET /status` answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeeperStatus {
    pub bytes: u64,
    pub capacity_bytes: u64,
    pub high_watermark_bytes: u64,
    pub low_watermark_bytes: u64,
    /// Images in the cache at the last inventory (None before the first).
    pub images: Option<usize>,
    pub pulls_recorded: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    pub evicted_images: u64,
    pub last_eviction: Option<Eviction>,
    pub last_error: Option<String>,
    pub registry: Option<ProxyCounters>,
    /// The last prefetch round (`--prefetch`).
    pub prefetch: Option<super::prefetch::PrefetchReport>,
}

struct Shared {
    status: Mutex<KeeperStatus>,
    /// Bytes of blobs written by pulls since the last measurement, and when that was.
    pulled_since: Mutex<(u64, SystemTime)>,
    wake: tokio::sync::Notify,
    root: PathBuf,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    action: String,
    #[serde(default)]
    target: EventTarget,
}

#[derive(Deserialize, Default)]
struct EventTarget {
    #[serde(default)]
    repository: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default, rename = "mediaType")]
    media_type: String,
}

/// Parsed `--pin` values: (repository, tag or digest).
pub fn parse_pins(pins: &[String]) -> Result<Vec<(String, Target)>, String> {
    pins.iter()
        .map(|p| {
            if let Some((repo, digest)) = p.split_once('@') {
                Ok((repo.to_string(), Target::Digest(digest.to_string())))
            } else if let Some((repo, tag)) = p.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
                Ok((repo.to_string(), Target::Tag(tag.to_string())))
            } else {
                Err(format!("--pin {p:?}: expected repository:tag or repository@sha256:..."))
            }
        })
        .collect()
}

fn filesystem_size(root: &Path) -> u64 {
    rustix::fs::statvfs(root).map(|s| s.f_blocks * s.f_frsize).unwrap_or(0)
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// One look at the storage: measure, and evict when over the high mark or when `ttl_due`.
/// Blocking (walks the storage); run it off the async threads.
pub fn look(args: &KeeperArgs, pins: &[(String, Target)], ttl: Option<Duration>, ttl_due: bool) -> LookResult {
    let started = Instant::now();
    let usage = super::layout::disk_usage(&args.root);
    // The smaller of the declared size (an emptyDir's sizeLimit, a claim's request) and the
    // filesystem's: an emptyDir lives on the node's disk, a claim may be bound to a larger volume.
    let capacity = match (args.capacity_bytes, filesystem_size(&args.root)) {
        (0, fs) => fs,
        (declared, 0) => declared,
        (declared, fs) => declared.min(fs),
    };
    let high = capacity / 100 * u64::from(args.high_watermark);
    let low = capacity / 100 * u64::from(args.low_watermark);
    let mut out = LookResult { usage, capacity, high, low, images: None, eviction: None, error: None };
    if usage <= high && !(ttl_due && ttl.is_some()) {
        return out;
    }
    let inv = evict::scan(&args.root);
    let limits = Limits { high, low, expire_before: ttl.map(|t| SystemTime::now() - t) };
    let pinned = |u: &Unit| pins.iter().any(|(repo, target)| u.pinned_by(repo, target));
    let plan = evict::plan(&inv, usage, limits, pinned);
    let images = inv.units.iter().filter(|u| u.root.is_some()).count();
    out.images = Some(images - plan.units.iter().filter(|&&i| inv.units[i].root.is_some()).count());
    if plan.units.is_empty() {
        if usage > high {
            out.error = Some(format!(
                "the cache holds {usage} bytes, over the high watermark ({high}), and nothing more can be evicted (pins)"
            ));
        }
        return out;
    }
    match evict::apply(&args.root, &inv, &plan) {
        Ok(freed) => {
            out.usage = usage.saturating_sub(freed);
            out.eviction = Some(Eviction {
                time: unix_now(),
                bytes: freed,
                images: plan.units.len(),
                expired: plan.expired,
                names: plan.units.iter().take(10).map(|&i| inv.units[i].name()).collect(),
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Err(e) => out.error = Some(format!("eviction failed: {e}")),
    }
    out
}

#[derive(Debug)]
pub struct LookResult {
    pub usage: u64,
    pub capacity: u64,
    pub high: u64,
    pub low: u64,
    pub images: Option<usize>,
    pub eviction: Option<Eviction>,
    pub error: Option<String>,
}

async fn events(State(shared): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    let Ok(envelope) = serde_json::from_slice::<Envelope>(&body) else { return StatusCode::BAD_REQUEST };
    let mut recorded = 0;
    let mut blob_bytes = 0;
    let since = shared.pulled_since.lock().unwrap().1;
    for e in envelope.events.iter().filter(|e| e.action == "pull") {
        // A blob written since the last measurement grew the cache (hits do not: they must not
        // make a busy, nearly full cache measure itself all the time).
        let new =
            !e.target.media_type.contains("manifest") && evict::blob_is_new(&shared.root, &e.target.digest, since);
        if evict::stamp_pull(&shared.root, &e.target.repository, &e.target.digest) {
            recorded += 1;
        }
        if new {
            blob_bytes += e.target.size;
        }
    }
    let wake = {
        let mut status = shared.status.lock().unwrap();
        status.pulls_recorded += recorded;
        let mut pulled = shared.pulled_since.lock().unwrap();
        pulled.0 += blob_bytes;
        status.bytes + pulled.0 > status.high_watermark_bytes && status.capacity_bytes > 0
    };
    if wake {
        shared.wake.notify_one();
    }
    StatusCode::OK
}

async fn status(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let body = serde_json::to_string(&*shared.status.lock().unwrap()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let s = shared.status.lock().unwrap().clone();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus_text(&s))
}

/// The status as Prometheus metrics.
pub fn prometheus_text(s: &KeeperStatus) -> String {
    let r = s.registry.as_ref();
    let rows: [(&str, &str, &str, Option<u64>); 14] = [
        ("bytes", "gauge", "Disk usage of the cache.", Some(s.bytes)),
        ("capacity_bytes", "gauge", "Size of the cache volume.", Some(s.capacity_bytes)),
        ("high_watermark_bytes", "gauge", "Evictions start above this.", Some(s.high_watermark_bytes)),
        ("low_watermark_bytes", "gauge", "Evictions go down to this.", Some(s.low_watermark_bytes)),
        ("images", "gauge", "Images in the cache at the last inventory.", s.images.map(|n| n as u64)),
        (
            "pulls_recorded_total",
            "counter",
            "Pulls the registry reported and the keeper stamped.",
            Some(s.pulls_recorded),
        ),
        ("evictions_total", "counter", "Evictions carried out.", Some(s.evictions)),
        ("evicted_bytes_total", "counter", "Bytes freed by evictions.", Some(s.evicted_bytes)),
        ("evicted_images_total", "counter", "Images (and lone blobs) evicted.", Some(s.evicted_images)),
        (
            "last_eviction_timestamp_seconds",
            "gauge",
            "When the last eviction ran.",
            s.last_eviction.as_ref().map(|e| e.time as u64),
        ),
        ("blob_hits_total", "counter", "Blob requests the registry served from the cache.", r.map(|r| r.blob_hits)),
        (
            "blob_misses_total",
            "counter",
            "Blob requests the registry fetched from the upstream.",
            r.map(|r| r.blob_misses),
        ),
        (
            "served_bytes_total",
            "counter",
            "Blob bytes the registry served from the cache.",
            r.map(|r| r.bytes_served_from_cache),
        ),
        (
            "upstream_bytes_total",
            "counter",
            "Blob bytes the registry fetched from the upstream.",
            r.map(|r| r.bytes_from_upstream),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        if let Some(v) = value {
            out.push_str(&format!("# HELP mirrorfleet_cache_{name} {help}\n# TYPE mirrorfleet_cache_{name} {kind}\nmirrorfleet_cache_{name} {v}\n"));
        }
    }
    out
}

/// Distribution 3's Prometheus text (its debug listener's `/metrics`) → its proxy counters
/// (`registry_proxy_{hits,misses,pushed_bytes,pulled_bytes}_total{type="blob"|"manifest"}`).
/// None without them: Distribution 2.8 publishes its proxy counters only as expvar, and counts
/// every blob it serves — fetched from the upstream or not — as a hit, so it cannot give a hit
/// ratio.
pub fn proxy_counters(prometheus: &str) -> Option<ProxyCounters> {
    let value = |name: &str, kind: &str| -> Option<u64> {
        let prefix = format!("registry_proxy_{name}_total{{type=\"{kind}\"}} ");
        prometheus
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    Some(ProxyCounters {
        blob_hits: value("hits", "blob")?,
        blob_misses: value("misses", "blob")?,
        manifest_hits: value("hits", "manifest").unwrap_or(0),
        manifest_misses: value("misses", "manifest").unwrap_or(0),
        bytes_served_from_cache: value("pushed_bytes", "blob").unwrap_or(0),
        bytes_from_upstream: value("pulled_bytes", "blob").unwrap_or(0),
    })
}

async fn read_registry(http: &Client<HttpConnector, Empty<Bytes>>, addr: &str) -> Option<ProxyCounters> {
    let uri: http::Uri = format!("http://{addr}/metrics").parse().ok()?;
    let response = tokio::time::timeout(Duration::from_secs(2), http.get(uri)).await.ok()?.ok()?;
    let body = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect()).await.ok()?.ok()?;
    proxy_counters(&String::from_utf8_lossy(&body.to_bytes()))
}

pub fn main(args: KeeperArgs) -> ExitCode {
    // Pod logs are files, not terminals: no colour escapes in them.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_target(false).try_init();
    let problems: Vec<String> =
        [("--ttl", &args.ttl), ("--interval", &args.interval), ("--ttl-check", &args.ttl_check)]
            .into_iter()
            .filter(|(_, v)| go_duration(v).is_none())
            .map(|(k, v)| format!("{k} {v:?} is not a Go duration"))
            .chain(parse_pins(&args.pins).err())
            .chain(
                (args.low_watermark >= args.high_watermark)
                    .then(|| "--low-watermark must be below --high-watermark".into()),
            )
            .collect();
    if !problems.is_empty() {
        eprintln!("cache-keeper: {}", problems.join("; "));
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cache-keeper: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cache-keeper stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: KeeperArgs) -> anyhow::Result<()> {
    let pins = parse_pins(&args.pins).map_err(anyhow::Error::msg)?;
    let ttl = go_duration(&args.ttl).filter(|d| !d.is_zero());
    let interval = go_duration(&args.interval).unwrap_or(Duration::from_secs(10)).max(Duration::from_millis(100));
    let ttl_check = go_duration(&args.ttl_check).unwrap_or(Duration::from_secs(300));
    let shared = Arc::new(Shared {
        status: Mutex::new(KeeperStatus::default()),
        pulled_since: Mutex::new((0, SystemTime::now())),
        wake: tokio::sync::Notify::new(),
        root: args.root.clone(),
    });
    let events_listener = tokio::net::TcpListener::bind(args.events_addr).await?;
    let listener = tokio::net::TcpListener::bind(args.listen_addr).await?;
    tracing::info!(root = %args.root.display(), events = %args.events_addr, listen = %args.listen_addr,
        high = args.high_watermark, low = args.low_watermark, ttl = %args.ttl, pins = pins.len(), "cache keeper started");
    let events_app = Router::new().route("/events", post(events)).with_state(shared.clone());
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared.clone());
    tokio::spawn(async move { axum::serve(events_listener, events_app).await });
    tokio::spawn(async move { axum::serve(listener, app).await });
    if !args.prefetch.is_empty() {
        tokio::spawn(prefetch_loop(args.clone(), shared.clone()));
    }

    let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build::<_, Empty<Bytes>>(HttpConnector::new());
    let mut last_ttl_check: Option<Instant> = None;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let ttl_due = last_ttl_check.is_none_or(|t| t.elapsed() >= ttl_check);
        if ttl_due {
            last_ttl_check = Some(Instant::now());
        }
        let (a, p) = (args.clone(), pins.clone());
        *shared.pulled_since.lock().unwrap() = (0, SystemTime::now());
        let result = tokio::task::spawn_blocking(move || look(&a, &p, ttl, ttl_due)).await?;
        let registry = read_registry(&http, &args.registry_debug).await;
        {
            let mut s = shared.status.lock().unwrap();
            s.bytes = result.usage;
            s.capacity_bytes = result.capacity;
            s.high_watermark_bytes = result.high;
            s.low_watermark_bytes = result.low;
            if result.images.is_some() {
                s.images = result.images;
            }
            if registry.is_some() {
                s.registry = registry;
            }
            if let Some(e) = &result.error {
                tracing::warn!(error = %e, "cache keeper");
            }
            s.last_error = result.error.clone();
            if let Some(e) = result.eviction {
                tracing::info!(bytes = e.bytes, images = e.images, expired = e.expired, seconds = e.seconds,
                    evicted = %e.names.join(" "), usage = result.usage, "evicted the least recently pulled images");
                s.evictions += 1;
                s.evicted_bytes += e.bytes;
                s.evicted_images += e.images as u64;
                s.last_eviction = Some(e);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shared.wake.notified() => tokio::time::sleep(Duration::from_millis(200)).await,
            _ = terminate.recv() => return Ok(()),
        }
    }
}

/// After the registry answers, one prefetch round; then one at each time of the schedule.
async fn prefetch_loop(args: KeeperArgs, shared: Arc<Shared>) {
    let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build::<_, Empty<Bytes>>(HttpConnector::new());
    let base = format!("http://{}", args.registry_addr);
    let auth = match (&args.prefetch_user, std::env::var("MIRRORFLEET_PREFETCH_PASSWORD")) {
        (Some(user), Ok(password)) => Some(crate::build::auth::basic_authorization(user, &password)),
        _ => None,
    };
    // Any answer to /v2/ (401 included) means the registry serves.
    while read_status(&http, &format!("{base}/v2/")).await.is_none() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    loop {
        let report =
            super::prefetch::round(&http, &base, auth.as_deref(), &args.prefetch, &args.prefetch_platforms).await;
        if report.failed.is_empty() {
            tracing::info!(images = report.images, bytes = report.bytes, seconds = report.seconds, "prefetched");
        } else {
            tracing::warn!(images = report.images, failed = %report.failed.join("; "), "prefetch failed for some images");
        }
        shared.status.lock().unwrap().prefetch = Some(report);
        let Some(wait) = args.prefetch_schedule.as_deref().and_then(super::prefetch::next_run) else { return };
        tokio::time::sleep(wait).await;
    }
}

async fn read_status(http: &Client<HttpConnector, Empty<Bytes>>, url: &str) -> Option<u16> {
    let uri: http::Uri = url.parse().ok()?;
    let response = tokio::time::timeout(Duration::from_secs(2), http.get(uri)).await.ok()?.ok()?;
    Some(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_3_counters_are_read_from_its_prometheus_text() {
        let text = "# TYPE registry_proxy_hits_total counter\nregistry_proxy_hits_total{type=\"blob\"} 3\n\
            registry_proxy_hits_total{type=\"manifest\"} 1\nregistry_proxy_misses_total{type=\"blob\"} 2\n\
            registry_proxy_pushed_bytes_total{type=\"blob\"} 300\nregistry_proxy_pulled_bytes_total{type=\"blob\"} 2e+02\n";
        let c = proxy_counters(text).unwrap();
        assert_eq!((c.blob_hits, c.blob_misses, c.bytes_served_from_cache, c.bytes_from_upstream), (3, 2, 300, 200));
        assert_eq!(c.manifest_hits, 1);
        assert_eq!(proxy_counters("go_goroutines 12\n"), None, "2.8: no proxy counters in Prometheus");
    }

    #[test]
    fn pins_are_repository_and_tag_or_digest() {
        let d = format!("sha256:{}", "b".repeat(64));
        let pins = parse_pins(&["library/nginx:1.27".into(), format!("org/app@{d}")]).unwrap();
        assert_eq!(pins[0], ("library/nginx".into(), Target::Tag("1.27".into())));
        assert_eq!(pins[1], ("org/app".into(), Target::Digest(d)));
        assert!(parse_pins(&["nginx".into()]).is_err());
    }

    #[test]
    fn metrics_name_what_the_status_holds() {
        let text = prometheus_text(&KeeperStatus { bytes: 7, capacity_bytes: 10, ..Default::default() });
        assert!(text.contains("mirrorfleet_cache_bytes 7\n") && text.contains("mirrorfleet_cache_capacity_bytes 10\n"));
    }
}
