//! Upstream health: what the proxies' upstream sidecars see of their upstreams, for
//! `status.upstreams[]`, the `Degraded` condition, Events and metrics.
//!
//! Each proxy pod with an upstream sidecar ([`crate::build::sidecar`]) serves the sidecar's Envoy
//! counters on `<pod IP>:5082/stats/prometheus`. Every [`MonitorOptions::interval`] the operator
//! reads them from each running proxy pod (found by a watch of proxy Pods, kept small), takes
//! the difference to its previous reading of the same pod, and keeps per mirror and upstream:
//! * reachable: the sidecar's active health check (`GET /v2/` every 3 s, every second while
//!   failing; 200-499 counts as alive, so 401 and 429 do not) — true when one proxy reaches the
//!   upstream, false when none does;
//! * the newest failure and its kind: connect timeout, connect failure (refused, reset, TLS),
//!   request timeout, 429, 5xx, 401/403 — from the cluster's and the health check's counters;
//! * counters since the running proxies started: lookups the upstream did not answer (the
//!   sidecar's `lookup` virtual cluster: manifests, tag lists and their tokens) and 429 answers;
//! * after a new 429, the upstream's rate-limit headers from that sidecar's access log (`pods/log`:
//!   Envoy counters carry no header).
//!
//! Why the sidecar's counters and not the operator probing upstreams itself: they are what the
//! proxies really got, from where they run, with their credentials, including the 429s that only
//! real pulls draw. A change of reachability or of the failure's kind triggers the mirror's
//! reconcile at once, which writes the status and the Events ([`upstream_events`]); counters
//! alone at most once a minute. Nothing read here can hold a credential: Envoy counters are
//! numbers keyed by cluster names.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use tracing::debug;

use super::metrics::Metrics;
use crate::api::{RateLimitHeaders, RegistryMirror, UpstreamError, UpstreamStatus};
use crate::build::keeper;
use crate::build::meta::{Component, APP_NAME, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_NAME, LABEL_UPSTREAM};
use crate::build::sidecar::{self, PROBE_PORT};
use crate::cache::keeper::KeeperStatus;

/// An upstream no proxy has reached for this long makes the mirror `Degraded`.
pub const DEGRADED_AFTER: Duration = Duration::from_secs(60);

/// Timings of the monitor.
#[derive(Clone, Debug)]
pub struct MonitorOptions {
    /// Between two readings of every proxy pod's sidecar counters.
    pub interval: Duration,
    /// One reading of one pod.
    pub timeout: Duration,
    /// Pods read at the same time.
    pub concurrency: usize,
    /// A change of counters alone (no change of reachability or failure kind) triggers the
    /// mirror's reconcile at most this often.
    pub counters_every: Duration,
}

impl Default for MonitorOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            // Pods answer from the cluster network in milliseconds.
            timeout: Duration::from_secs(1),
            concurrency: 32,
            counters_every: Duration::from_secs(60),
        }
    }
}

/// The counters of one sidecar's Envoy that say how its upstream fares, per cluster (`registry`,
/// and `realm` for the token service).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SidecarSample {
    pub clusters: BTreeMap<String, ClusterCounters>,
    /// Manifest, tag-list and token requests (the `lookup` virtual cluster) that failed: timeouts,
    /// locally answered 503s (upstream unreachable), 429 and 5xx answers.
    pub failed_lookups: u64,
    /// Pulls by tag the front served from the cache while the upstream failed the lookup.
    pub served_stale: u64,
    /// Manifest requests the front answered with the upstream's failure (not cached, upstream
    /// failing).
    pub failed_pulls: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterCounters {
    /// `membership_healthy`: hosts passing the health check (None: not in the output).
    pub healthy: Option<u64>,
    pub hc_failure: u64,
    pub hc_network_failure: u64,
    pub connect_fail: u64,
    pub connect_timeout: u64,
    pub rq_timeout: u64,
    /// Responses by status code (upstream answers, and the 503/504 Envoy answers for it).
    pub rq_by_code: BTreeMap<u16, u64>,
}

/// One sample of the Prometheus text format.
struct Series<'a> {
    name: &'a str,
    labels: Vec<(&'a str, &'a str)>,
    value: f64,
}

/// One line of the Prometheus text format (None for comments and blank lines).
fn parse_line(line: &str) -> Option<Series<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => {
            let body = rest.strip_suffix('}')?;
            let mut labels = Vec::new();
            // Envoy's label values here are cluster names, codes and host names: no quotes or
            // commas inside.
            for pair in body.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=')?;
                labels.push((k, v.trim_matches('"')));
            }
            (name, labels)
        }
        None => (series, Vec::new()),
    };
    Some(Series { name, labels, value })
}

/// The sidecar counters from `/stats/prometheus` output; unknown series are ignored.
pub fn parse_sidecar_stats(text: &str) -> SidecarSample {
    let mut sample = SidecarSample::default();
    for Series { name, labels, value } in text.lines().filter_map(parse_line) {
        let label = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        let n = if value.is_finite() && value > 0.0 { value as u64 } else { 0 };
        if let Some(vcluster) = label("envoy_virtual_cluster") {
            if vcluster != sidecar::LOOKUP_VCLUSTER {
                continue;
            }
            match name {
                "envoy_vhost_vcluster_upstream_rq_timeout" => sample.failed_lookups += n,
                "envoy_vhost_vcluster_upstream_rq" => {
                    let code: u16 = label("envoy_response_code").and_then(|c| c.parse().ok()).unwrap_or(0);
                    if code == 429 || code >= 500 {
                        sample.failed_lookups += n;
                    }
                }
                _ => {}
            }
            continue;
        }
        let Some(cluster) = label("envoy_cluster_name") else { continue };
        if name == "envoy_cluster_upstream_rq_total" {
            match cluster {
                sidecar::STALE_CLUSTER => sample.served_stale = n,
                sidecar::FAILED_CLUSTER => sample.failed_pulls = n,
                _ => {}
            }
        }
        if !sidecar::UPSTREAM_CLUSTERS.contains(&cluster) {
            continue;
        }
        let c = sample.clusters.entry(cluster.to_string()).or_default();
        match name {
            "envoy_cluster_membership_healthy" => c.healthy = Some(n),
            "envoy_cluster_health_check_failure" => c.hc_failure = n,
            "envoy_cluster_health_check_network_failure" => c.hc_network_failure = n,
            "envoy_cluster_upstream_cx_connect_fail" => c.connect_fail = n,
            "envoy_cluster_upstream_cx_connect_timeout" => c.connect_timeout = n,
            "envoy_cluster_upstream_rq_timeout" => c.rq_timeout = n,
            "envoy_cluster_upstream_rq" => {
                if let Some(code) = label("envoy_response_code").and_then(|c| c.parse().ok()) {
                    c.rq_by_code.insert(code, n);
                }
            }
            _ => {}
        }
    }
    sample
}

/// Kinds of upstream failure, in the order reported while the upstream is unreachable (see
/// [`assess`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    ConnectTimeout,
    ConnectFailed,
    Timeout,
    HealthCheckFailed,
    RateLimited,
    ServerError,
    Unauthorized,
}

impl FailureKind {
    /// The order among failures while the upstream is reachable: answers before connections.
    fn request_rank(self) -> u8 {
        match self {
            FailureKind::RateLimited => 0,
            FailureKind::ServerError => 1,
            FailureKind::Unauthorized => 2,
            FailureKind::Timeout => 3,
            FailureKind::ConnectTimeout => 4,
            FailureKind::ConnectFailed => 5,
            FailureKind::HealthCheckFailed => 6,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            FailureKind::ConnectTimeout => "ConnectTimeout",
            FailureKind::ConnectFailed => "ConnectFailed",
            FailureKind::Timeout => "Timeout",
            FailureKind::HealthCheckFailed => "HealthCheckFailed",
            FailureKind::RateLimited => "RateLimited",
            FailureKind::ServerError => "ServerError",
            FailureKind::Unauthorized => "Unauthorized",
        }
    }
}

/// What went wrong between two readings of one sidecar, if anything: the kind and a message.
/// `prev` is None for a pod's first reading (its counters since it started count).
pub fn assess(prev: Option<&SidecarSample>, cur: &SidecarSample) -> Option<(FailureKind, String)> {
    let mut found: Vec<(FailureKind, String)> = Vec::new();
    for (name, c) in &cur.clusters {
        let p = prev.and_then(|p| p.clusters.get(name)).cloned().unwrap_or_default();
        // A counter that went down: Envoy restarted in the pod; its counters start over.
        let d = |cur: u64, prev: u64| if cur >= prev { cur - prev } else { cur };
        let what = if name == "realm" { "the token service" } else { "the upstream" };
        let connect_timeout = d(c.connect_timeout, p.connect_timeout);
        let connect_fail = d(c.connect_fail, p.connect_fail).saturating_sub(connect_timeout);
        let hc_network = d(c.hc_network_failure, p.hc_network_failure);
        let timeouts = d(c.rq_timeout, p.rq_timeout);
        let code = |k: u16| d(*c.rq_by_code.get(&k).unwrap_or(&0), *p.rq_by_code.get(&k).unwrap_or(&0));
        let codes_in = |lo: u16, hi: u16| -> Vec<(u16, u64)> {
            c.rq_by_code
                .keys()
                .filter(|k| (lo..=hi).contains(*k))
                .map(|k| (*k, code(*k)))
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        if connect_timeout > 0 {
            found.push((
                FailureKind::ConnectTimeout,
                format!(
                    "{connect_timeout} connection(s) to {what} timed out after {} (blackholed or filtered)",
                    sidecar::CONNECT_TIMEOUT
                ),
            ));
        }
        if connect_fail > 0 {
            found.push((
                FailureKind::ConnectFailed,
                format!("{connect_fail} connection(s) to {what} failed (refused, reset or TLS)"),
            ));
        }
        if timeouts > 0 {
            found.push((
                FailureKind::Timeout,
                format!(
                    "{timeouts} request(s) to {what} unanswered within {} (connected, no response)",
                    sidecar::LOOKUP_TIMEOUT
                ),
            ));
        }
        // Health-check connections are not in the cluster's connection counters, and Envoy counts
        // a refused one and one without an answer alike: say no more than that.
        if hc_network > 0 && connect_timeout == 0 && connect_fail == 0 && timeouts == 0 {
            found.push((
                FailureKind::HealthCheckFailed,
                format!(
                    "{hc_network} health check(s) of {what} (GET /v2/) got no connection or no answer within {}",
                    sidecar::HEALTH_CHECK_TIMEOUT
                ),
            ));
        }
        let limited = code(429);
        if limited > 0 {
            found.push((FailureKind::RateLimited, format!("{limited} answer(s) 429 Too Many Requests from {what}")));
        }
        // Envoy's own 503/504 for an unreachable or unhealthy host or a timeout are counted there
        // too: they are server errors only when nothing above explains them.
        let server: Vec<(u16, u64)> = codes_in(500, 599);
        if !server.is_empty() && connect_timeout == 0 && connect_fail == 0 && timeouts == 0 && hc_network == 0 {
            found.push((FailureKind::ServerError, format!("answers {} from {what}", counts(&server))));
        } else if d(c.hc_failure, p.hc_failure) > hc_network && server.is_empty() {
            found.push((FailureKind::ServerError, format!("{what} fails its health check (GET /v2/ answers 5xx)")));
        }
        let denied = [codes_in(401, 401), codes_in(403, 403)].concat();
        if !denied.is_empty() {
            found.push((
                FailureKind::Unauthorized,
                format!(
                    "answers {} from {what} (credentials refused, or a private or missing repository)",
                    counts(&denied)
                ),
            ));
        }
    }
    // Several kinds between two readings: the one that explains the state now. A host that
    // passes its health check failed requests (a connection refused a while ago is over); one
    // that does not is failing on connections first.
    let up = reachable(cur) == Some(true);
    found.sort_by_key(|(k, _)| if up { k.request_rank() } else { *k as u8 });
    found.into_iter().next()
}

fn counts(codes: &[(u16, u64)]) -> String {
    codes.iter().map(|(code, n)| format!("{code} x{n}")).collect::<Vec<_>>().join(", ")
}

/// The rate-limit headers of the newest 429 in a sidecar's access log (the format of
/// [`sidecar::sidecar_config`]: `[time] METHOD PATH CODE FLAGS ... rl=R rl_limit=L retry_after=A`,
/// `-` for a header the upstream did not send). Values are kept only when short and printable:
/// they come from someone else's server and go into the status.
pub fn last_rate_limit(log: &str) -> Option<RateLimitHeaders> {
    log.lines().rev().find_map(|line| {
        let mut fields = line.split_whitespace();
        // [time] METHOD PATH CODE
        if fields.nth(3) != Some("429") {
            return None;
        }
        let mut headers = RateLimitHeaders::default();
        for field in line.split_whitespace() {
            let Some((key, value)) = field.split_once('=') else { continue };
            let value = (value != "-" && value.len() <= 64 && value.chars().all(|c| c.is_ascii_graphic()))
                .then(|| value.to_string());
            match key {
                "rl" => headers.remaining = value,
                "rl_limit" => headers.limit = value,
                "retry_after" => headers.retry_after = value,
                _ => {}
            }
        }
        (headers != RateLimitHeaders::default()).then_some(headers)
    })
}

/// `; RateLimit-Limit 100;w=21600, RateLimit-Remaining 0;w=21600, Retry-After 60` (what was sent).
pub fn describe_rate_limit(h: &RateLimitHeaders) -> String {
    let parts: Vec<String> =
        [("RateLimit-Limit", &h.limit), ("RateLimit-Remaining", &h.remaining), ("Retry-After", &h.retry_after)]
            .into_iter()
            .filter_map(|(name, v)| Some(format!("{name} {}", v.as_ref()?)))
            .collect();
    format!("; {}", parts.join(", "))
}

/// 429 answers counted by a sidecar, over its clusters.
fn rate_limited(sample: &SidecarSample) -> u64 {
    sample.clusters.values().map(|c| *c.rq_by_code.get(&429).unwrap_or(&0)).sum()
}

/// Whether this sidecar's Envoy reaches its upstream (None: not known from this reading).
pub fn reachable(sample: &SidecarSample) -> Option<bool> {
    let healthy = sample.clusters.get("registry")?.healthy?;
    Some(healthy > 0)
}

/// What is known of one upstream, from the readings of its proxies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpstreamHealth {
    pub reachable: Option<bool>,
    pub last_error: Option<UpstreamError>,
    pub failed_lookups: Option<i64>,
    pub rate_limited: Option<i64>,
    pub served_stale: Option<i64>,
    pub failed_pulls: Option<i64>,
    /// The proxies' caches (from their keepers), None without keepers.
    pub cache: Option<crate::api::UpstreamCache>,
}

/// One proxy pod's reading, as the aggregation needs it.
pub struct PodReading<'a> {
    pub prev: Option<&'a SidecarSample>,
    pub cur: &'a SidecarSample,
}

/// The health of one upstream from this round's readings of its proxies and what was known
/// before (its last error stays until a newer one replaces it).
pub fn aggregate(previous: Option<&UpstreamHealth>, readings: &[PodReading<'_>], now: &Time) -> UpstreamHealth {
    if readings.is_empty() {
        // No proxy read: nothing is known now.
        return UpstreamHealth { last_error: previous.and_then(|p| p.last_error.clone()), ..Default::default() };
    }
    let states: Vec<Option<bool>> = readings.iter().map(|r| reachable(r.cur)).collect();
    let reachable = if states.contains(&Some(true)) {
        Some(true)
    } else if states.contains(&Some(false)) {
        Some(false)
    } else {
        None
    };
    // A pod's first reading is its baseline: counters from before (an operator restart, a pod
    // that failed an hour ago) are not news.
    let failures: Vec<(FailureKind, String)> =
        readings.iter().filter_map(|r| r.prev.and_then(|p| assess(Some(p), r.cur))).collect();
    // The proxies' own choices ([`assess`]) agree on the order; the most common one is reported.
    let last_error = match failures
        .iter()
        .max_by_key(|(k, _)| (failures.iter().filter(|(o, _)| o == k).count(), std::cmp::Reverse(*k)))
    {
        Some((kind, message)) => {
            let seen = failures.iter().filter(|(k, _)| k == kind).count();
            let message = if readings.len() > 1 {
                format!("{message}; seen by {seen} of {} proxies", readings.len())
            } else {
                message.clone()
            };
            // The same failure going on keeps its first time (and what was read of its headers).
            let (time, rate_limit) = match previous.and_then(|p| p.last_error.as_ref()) {
                Some(e) if e.reason == kind.reason() => (e.time.clone(), e.rate_limit.clone()),
                _ => (now.clone(), None),
            };
            Some(UpstreamError { time, reason: kind.reason().into(), message, rate_limit })
        }
        None => previous.and_then(|p| p.last_error.clone()),
    };
    let sum = |f: fn(&SidecarSample) -> u64| Some(readings.iter().map(|r| f(r.cur)).sum::<u64>() as i64);
    UpstreamHealth {
        reachable,
        last_error,
        failed_lookups: sum(|s| s.failed_lookups),
        rate_limited: sum(rate_limited),
        served_stale: sum(|s| s.served_stale),
        failed_pulls: sum(|s| s.failed_pulls),
        cache: None,
    }
}

/// Fills an upstream's status from its health; `previous` is the status before (for
/// `unreachableSince`). Unknown health leaves reachability and counters out, and the last error
/// as it was.
pub fn apply_health(
    status: &mut UpstreamStatus,
    health: Option<&UpstreamHealth>,
    previous: Option<&UpstreamStatus>,
    now: &Time,
) {
    let health = health.cloned().unwrap_or_default();
    status.reachable = health.reachable;
    status.unreachable_since = match health.reachable {
        Some(false) => Some(previous.and_then(|p| p.unreachable_since.clone()).unwrap_or_else(|| now.clone())),
        _ => None,
    };
    status.last_error = health.last_error.or_else(|| previous.and_then(|p| p.last_error.clone()));
    status.failed_lookups = health.failed_lookups;
    status.rate_limited = health.rate_limited;
    status.served_stale = health.served_stale;
    status.failed_pulls = health.failed_pulls;
    // Unknown now (no keeper answered this round): the last figures stay.
    status.cache = health.cache.or_else(|| previous.and_then(|p| p.cache.clone()));
}

/// Whether an upstream has been unreachable long enough to degrade the mirror, and if not yet,
/// how long until it will.
pub fn unreachable_for(status: &UpstreamStatus, now: &Time) -> Option<Duration> {
    let since = status.unreachable_since.as_ref()?;
    Some(Duration::try_from(now.0.duration_since(since.0)).unwrap_or_default())
}

/// Events for upstreams that stopped or started being reached (`UpstreamUnreachable`,
/// `UpstreamReachable`), and for a new failure of one still reached (`Upstream<kind>`, e.g.
/// `UpstreamRateLimited`): (warning, reason, note).
pub fn upstream_events(old: &[UpstreamStatus], new: &[UpstreamStatus], now: &Time) -> Vec<(bool, String, String)> {
    let mut events = Vec::new();
    for n in new {
        let o = old.iter().find(|o| o.name == n.name);
        let was = o.and_then(|o| o.reachable);
        let error = n.last_error.as_ref().map(|e| format!("{} ({})", e.message, e.reason)).unwrap_or_default();
        match (was, n.reachable) {
            (Some(false), Some(true)) => {
                let down = o.and_then(|o| unreachable_for(o, now)).map(|d| format!(" after {}s", d.as_secs()));
                events.push((
                    false,
                    "UpstreamReachable".into(),
                    format!("upstream {} ({}) is reached again{}", n.name, n.registry, down.unwrap_or_default()),
                ));
            }
            (w, Some(false)) if w != Some(false) => events.push((
                true,
                "UpstreamUnreachable".into(),
                format!("no proxy of upstream {} reaches {}: {error}", n.name, n.registry),
            )),
            _ => {
                let old_reason = o.and_then(|o| o.last_error.as_ref()).map(|e| (&e.reason, &e.time));
                let new_reason = n.last_error.as_ref().map(|e| (&e.reason, &e.time));
                if new_reason.is_some() && new_reason != old_reason && n.reachable != Some(false) {
                    // The kind is in the reason: Events of one reason within minutes become a
                    // series that keeps its first note.
                    let reason =
                        format!("Upstream{}", n.last_error.as_ref().map(|e| e.reason.as_str()).unwrap_or("Error"));
                    events.push((true, reason, format!("upstream {} ({}): {error}", n.name, n.registry)));
                }
            }
        }
    }
    events
}

/// Per mirror (`namespace/name`), per upstream: the newest health. Shared by the monitor (which
/// writes it) and the reconciles (which read it).
#[derive(Default)]
pub struct HealthStore {
    inner: Mutex<HashMap<String, BTreeMap<String, UpstreamHealth>>>,
}

impl HealthStore {
    pub fn get(&self, mirror_key: &str) -> BTreeMap<String, UpstreamHealth> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).get(mirror_key).cloned().unwrap_or_default()
    }

    /// Replaces a mirror's health; returns whether it changed in what triggers a reconcile at
    /// once (reachability, failure kind or its time) and whether the counters changed.
    pub fn set(&self, mirror_key: &str, health: BTreeMap<String, UpstreamHealth>) -> (bool, bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old = inner.get(mirror_key);
        let summary = |h: Option<&BTreeMap<String, UpstreamHealth>>| {
            h.map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        (k.clone(), v.reachable, v.last_error.as_ref().map(|e| (e.reason.clone(), e.time.clone())))
                    })
                    .collect::<Vec<_>>()
            })
        };
        let counters = |h: Option<&BTreeMap<String, UpstreamHealth>>| {
            h.map(|h| {
                h.values()
                    .map(|v| (v.failed_lookups, v.rate_limited, v.served_stale, v.failed_pulls, v.cache.clone()))
                    .collect::<Vec<_>>()
            })
        };
        let changed = (summary(old) != summary(Some(&health)), counters(old) != counters(Some(&health)));
        inner.insert(mirror_key.to_string(), health);
        changed
    }

    pub fn forget(&self, mirror_key: &str) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).remove(mirror_key);
    }

    fn keys(&self) -> Vec<String> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }
}

/// The label selector of proxy Pods.
pub fn proxy_pod_selector() -> String {
    format!("{LABEL_NAME}={APP_NAME},{LABEL_COMPONENT}={}", Component::Proxy.as_str())
}

/// Keeps of a proxy Pod what the monitor reads: name, namespace, uid, labels, its IP and phase,
/// and whether it runs an upstream sidecar.
fn compact_pod(pod: &mut Pod) {
    let sidecar = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == sidecar::CONTAINER_NAME));
    let keeper = pod.spec.as_ref().is_some_and(|s| s.containers.iter().any(|c| c.name == keeper::CONTAINER_NAME));
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    pod.spec = None;
    if let Some(status) = pod.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            pod_ip: status.pod_ip.take(),
            ..Default::default()
        };
    }
    if sidecar {
        pod.metadata.labels.get_or_insert_default().insert(SIDECAR_MARK.into(), "true".into());
    }
    if keeper {
        pod.metadata.labels.get_or_insert_default().insert(KEEPER_MARK.into(), "true".into());
    }
}

/// Set by [`compact_pod`] on pods that run a cache keeper (never written to the API).
const KEEPER_MARK: &str = "mirrorfleet.io/-cache-keeper";

/// Set by [`compact_pod`] on pods that run the sidecar (never written to the API).
const SIDECAR_MARK: &str = "mirrorfleet.io/-upstream-sidecar";

/// Per upstream: (the pod, its sidecar's counters) of this round.
type Readings = BTreeMap<String, Vec<(PodId, SidecarSample)>>;
/// Per upstream: its keepers' statuses of this round.
type KeeperReadings = BTreeMap<String, Vec<KeeperStatus>>;

/// One mirror's readings of a round.
struct MirrorReadings {
    mirror: ObjectRef<RegistryMirror>,
    sidecars: Readings,
    keepers: KeeperReadings,
}

/// A proxy pod: uid (the key of its previous reading), namespace and name (for its log).
#[derive(Clone, Debug)]
struct PodId {
    uid: String,
    namespace: String,
    name: String,
}

/// A running proxy pod with a sidecar or a cache keeper, and which mirror and upstream it serves.
struct Target {
    pod: PodId,
    mirror: ObjectRef<RegistryMirror>,
    upstream: String,
    /// The sidecar's counters.
    url: Option<String>,
    /// The keeper's status.
    keeper_url: Option<String>,
}

impl Target {
    /// `namespace/name` of the mirror, the key of [`HealthStore`].
    fn mirror_key(&self) -> String {
        format!("{}/{}", self.pod.namespace, self.mirror.name)
    }
}

fn targets(pods: &Store<Pod>) -> Vec<Target> {
    pods.state()
        .iter()
        .filter_map(|pod| {
            let labels = pod.metadata.labels.as_ref()?;
            let (sidecar, keeper) = (labels.contains_key(SIDECAR_MARK), labels.contains_key(KEEPER_MARK));
            if !sidecar && !keeper {
                return None;
            }
            let status = pod.status.as_ref()?;
            if status.phase.as_deref() != Some("Running") || pod.metadata.deletion_timestamp.is_some() {
                return None;
            }
            let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
            let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
            let ns = pod.namespace()?;
            let name = labels.get(LABEL_INSTANCE)?;
            Some(Target {
                pod: PodId { uid: pod.uid()?, name: pod.name_any(), namespace: ns.clone() },
                mirror: ObjectRef::new(name).within(&ns),
                upstream: labels.get(LABEL_UPSTREAM)?.clone(),
                url: sidecar.then(|| format!("http://{host}:{PROBE_PORT}/stats/prometheus")),
                keeper_url: keeper.then(|| format!("http://{host}:{}/status", crate::cache::keeper::LISTEN_PORT)),
            })
        })
        .collect()
}

/// The body of a GET of `url` (a pod's sidecar or keeper), None on any failure.
async fn read_body(client: &HttpClient<HttpConnector, Empty<Bytes>>, url: &str, timeout: Duration) -> Option<Bytes> {
    let uri: hyper::Uri = url.parse().ok()?;
    let fetch = async {
        let response = client.get(uri).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        Some(response.into_body().collect().await.ok()?.to_bytes())
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}

/// The rate-limit headers of the newest 429 in a sidecar's log since the previous reading.
async fn read_rate_limit(client: &Client, pod: &PodId, interval: Duration) -> Option<RateLimitHeaders> {
    let api: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &pod.namespace);
    let params = kube::api::LogParams {
        container: Some(sidecar::CONTAINER_NAME.into()),
        since_seconds: Some(i64::try_from(interval.as_secs()).unwrap_or(60) + 5),
        tail_lines: Some(500),
        ..Default::default()
    };
    match api.logs(&pod.name, &params).await {
        Ok(log) => last_rate_limit(&log),
        Err(e) => {
            debug!(pod = %pod.name, error = %e, "reading the sidecar's log for a 429's headers");
            None
        }
    }
}

/// Watches proxy Pods and reads their sidecars every `interval`, for ever; sends the mirrors
/// whose upstream health changed to `trigger`.
pub async fn monitor(
    client: Client,
    namespace: Option<String>,
    health: Arc<HealthStore>,
    metrics: Arc<Metrics>,
    options: MonitorOptions,
    trigger: mpsc::UnboundedSender<ObjectRef<RegistryMirror>>,
) {
    let api = super::children::api::<Pod>(&client, namespace.as_deref());
    let (store, writer) = reflector::store::<Pod>();
    let cfg = crate::client::watch_config().labels(&proxy_pod_selector());
    let events = watcher(api, cfg).backoff(super::children::watch_backoff()).modify(compact_pod).reflect(writer);
    tokio::spawn(super::log_errors("Pod (proxies)", events).for_each(|_| async {}));
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(options.timeout));
    let http = HttpClient::builder(hyper_util::rt::TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
    let mut ticker = tokio::time::interval(options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut monitor = Monitor {
        client,
        health,
        metrics,
        options,
        http,
        samples: HashMap::new(),
        recent_429: HashSet::new(),
        counters: CounterThrottle::default(),
    };
    loop {
        ticker.tick().await;
        if store.wait_until_ready().await.is_err() || !monitor.round(&store, &trigger).await {
            return;
        }
    }
}

/// The monitor's state between rounds.
struct Monitor {
    client: Client,
    health: Arc<HealthStore>,
    metrics: Arc<Metrics>,
    options: MonitorOptions,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    /// Each pod's previous reading, by uid.
    samples: HashMap<String, SidecarSample>,
    /// Pods whose 429s were new in the previous round.
    recent_429: HashSet<String>,
    /// When a change of counters alone triggers each mirror.
    counters: CounterThrottle,
}

/// Which mirrors a round triggers: at once on a change of health; on a change of counters alone
/// (failed lookups, cache fill, an eviction) at most every `every`. A change held back is
/// remembered and sent when its time comes, even if nothing moved since: an eviction a few
/// seconds after the last trigger reaches the status a minute later, not at the next change.
#[derive(Default)]
struct CounterThrottle {
    sent: HashMap<String, Instant>,
    pending: HashSet<String>,
}

impl CounterThrottle {
    fn due(&mut self, key: &str, changed: bool, counters: bool, every: Duration, now: Instant) -> bool {
        if counters {
            self.pending.insert(key.to_string());
        }
        let due = changed
            || (self.pending.contains(key)
                && self.sent.get(key).is_none_or(|t| now.saturating_duration_since(*t) >= every));
        if due {
            self.sent.insert(key.to_string(), now);
            self.pending.remove(key);
        }
        due
    }

    fn forget(&mut self, key: &str) {
        self.sent.remove(key);
        self.pending.remove(key);
    }
}

impl Monitor {
    /// One round: read every sidecar, update the health of every mirror and trigger those that
    /// changed. False once the controller is gone.
    async fn round(&mut self, store: &Store<Pod>, trigger: &mpsc::UnboundedSender<ObjectRef<RegistryMirror>>) -> bool {
        let by_mirror = self.read_all(targets(store)).await;
        let now = super::status::now();
        let mut next_samples = HashMap::new();
        let mut next_recent_429 = HashSet::new();
        for (key, MirrorReadings { mirror, sidecars: upstreams, keepers }) in by_mirror {
            let before = self.health.get(&key);
            let mut after = BTreeMap::new();
            for (upstream, readings) in &upstreams {
                let mut h = self.upstream_health(before.get(upstream), readings, &now, &mut next_recent_429).await;
                h.cache = keepers.get(upstream).and_then(|k| super::caches::aggregate(k));
                self.metrics.observe_upstream(&key, upstream, &h);
                after.insert(upstream.clone(), h);
            }
            for (pod, s) in upstreams.into_values().flatten() {
                next_samples.insert(pod.uid, s);
            }
            let (changed, counters) = self.health.set(&key, after);
            let due = self.counters.due(&key, changed, counters, self.options.counters_every, Instant::now());
            if due && trigger.send(mirror).is_err() {
                return false;
            }
        }
        // Mirrors whose proxies are all gone: nothing is known of them any more.
        let live: HashSet<String> = targets(store).iter().map(Target::mirror_key).collect();
        for key in self.health.keys() {
            if !live.contains(&key) {
                self.health.forget(&key);
                self.metrics.forget_upstreams(&key);
                self.counters.forget(&key);
            }
        }
        self.samples = next_samples;
        self.recent_429 = next_recent_429;
        true
    }

    /// Reads every target's sidecar counters and keeper status; per mirror, per upstream, the
    /// pods that answered.
    async fn read_all(&self, targets: Vec<Target>) -> BTreeMap<String, MirrorReadings> {
        let timeout = self.options.timeout;
        let http = &self.http;
        let read: Vec<(Target, Option<SidecarSample>, Option<KeeperStatus>)> = futures::stream::iter(targets)
            .map(|t| async move {
                let sample = match &t.url {
                    Some(url) => read_body(http, url, timeout)
                        .await
                        .and_then(|b| std::str::from_utf8(&b).ok().map(parse_sidecar_stats)),
                    None => None,
                };
                let keeper = match &t.keeper_url {
                    Some(url) => read_body(http, url, timeout).await.and_then(|b| serde_json::from_slice(&b).ok()),
                    None => None,
                };
                (t, sample, keeper)
            })
            .buffer_unordered(self.options.concurrency)
            .collect()
            .await;
        let mut by_mirror: BTreeMap<String, MirrorReadings> = BTreeMap::new();
        for (t, sample, keeper) in read {
            let entry = by_mirror.entry(t.mirror_key()).or_insert_with(|| MirrorReadings {
                mirror: t.mirror.clone(),
                sidecars: BTreeMap::new(),
                keepers: BTreeMap::new(),
            });
            let readings = entry.sidecars.entry(t.upstream.clone()).or_default();
            match (sample, &t.url) {
                (Some(s), _) => readings.push((t.pod.clone(), s)),
                (None, Some(url)) => debug!(%url, "sidecar counters not readable"),
                (None, None) => {}
            }
            let keepers = entry.keepers.entry(t.upstream.clone()).or_default();
            match (keeper, &t.keeper_url) {
                (Some(k), _) => keepers.push(k),
                (None, Some(url)) => debug!(%url, "cache keeper status not readable"),
                (None, None) => {}
            }
        }
        by_mirror
    }

    /// One upstream's health from this round's readings; after a new 429, with the headers from
    /// that sidecar's log (a line can reach the log a second after the counter moved: a proxy
    /// whose new 429s left no headers in the previous round is looked at once more).
    async fn upstream_health(
        &self,
        before: Option<&UpstreamHealth>,
        readings: &[(PodId, SidecarSample)],
        now: &Time,
        next_recent_429: &mut HashSet<String>,
    ) -> UpstreamHealth {
        let pod_readings: Vec<PodReading<'_>> =
            readings.iter().map(|(pod, cur)| PodReading { prev: self.samples.get(&pod.uid), cur }).collect();
        let mut h = aggregate(before, &pod_readings, now);
        let new_429 = |pod: &PodId, cur: &SidecarSample| {
            self.samples.get(&pod.uid).is_some_and(|prev| rate_limited(cur) > rate_limited(prev))
        };
        next_recent_429.extend(readings.iter().filter(|(pod, cur)| new_429(pod, cur)).map(|(pod, _)| pod.uid.clone()));
        let Some(error) = h.last_error.as_mut().filter(|e| e.reason == FailureKind::RateLimited.reason()) else {
            return h;
        };
        let unread = error.rate_limit.is_none();
        let limited =
            readings.iter().find(|(pod, cur)| new_429(pod, cur) || (unread && self.recent_429.contains(&pod.uid)));
        if let Some((pod, _)) = limited {
            if let Some(headers) = read_rate_limit(&self.client, pod, self.options.interval).await {
                error.rate_limit = Some(headers);
            }
        }
        if let Some(headers) = &error.rate_limit {
            if !error.message.contains("RateLimit-") {
                error.message.push_str(&describe_rate_limit(headers));
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn a_change_of_counters_held_back_is_sent_when_due_even_if_nothing_moved_since() {
        let every = Duration::from_secs(60);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut t = CounterThrottle::default();
        // The first change of counters goes at once; a health change always does.
        assert!(t.due("m", false, true, every, at(0)));
        assert!(t.due("m", true, false, every, at(5)));
        // An eviction 10 s later is held back; the rounds after it see no change...
        assert!(!t.due("m", false, true, every, at(15)));
        assert!(!t.due("m", false, false, every, at(25)));
        assert!(!t.due("m", false, false, every, at(64)));
        // ...and it is still sent once the minute has passed, once.
        assert!(t.due("m", false, false, every, at(65)));
        assert!(!t.due("m", false, false, every, at(200)));
        // Other mirrors are throttled on their own; a forgotten mirror starts afresh.
        assert!(t.due("n", false, true, every, at(66)));
        t.forget("m");
        assert!(t.due("m", false, true, every, at(70)));
    }

    #[test]
    fn a_line_with_labels_and_one_without_parse() {
        let Series { name, labels, value } =
            parse_line(r#"envoy_cluster_upstream_rq{envoy_response_code="429",envoy_cluster_name="registry"} 3"#)
                .unwrap();
        assert_eq!(name, "envoy_cluster_upstream_rq");
        assert_eq!(labels, vec![("envoy_response_code", "429"), ("envoy_cluster_name", "registry")]);
        assert_eq!(value, 3.0);
        assert_eq!(parse_line("envoy_server_live 1").unwrap().name, "envoy_server_live");
        assert!(parse_line("# TYPE x counter").is_none());
    }

    fn sample(healthy: u64, f: impl FnOnce(&mut ClusterCounters)) -> SidecarSample {
        let mut c = ClusterCounters { healthy: Some(healthy), ..Default::default() };
        f(&mut c);
        SidecarSample {
            clusters: BTreeMap::from([("registry".to_string(), c)]),
            failed_lookups: 0,
            ..Default::default()
        }
    }

    #[test]
    fn a_connect_timeout_outranks_the_503s_envoy_answered_for_it() {
        let prev = sample(1, |_| {});
        let cur = sample(0, |c| {
            c.connect_fail = 4;
            c.connect_timeout = 4;
            c.rq_by_code.insert(503, 4);
        });
        let (kind, message) = assess(Some(&prev), &cur).unwrap();
        assert_eq!(kind, FailureKind::ConnectTimeout);
        assert!(message.contains("4 connection(s) to the upstream timed out after 1s"), "{message}");
        assert_eq!(reachable(&cur), Some(false));
    }

    #[test]
    fn counters_that_did_not_move_are_no_failure_and_a_restart_counts_from_zero() {
        let prev = sample(1, |c| {
            c.rq_by_code.insert(429, 5);
        });
        assert_eq!(assess(Some(&prev), &prev), None);
        let restarted = sample(1, |c| {
            c.rq_by_code.insert(429, 2);
        });
        assert_eq!(assess(Some(&prev), &restarted).unwrap().0, FailureKind::RateLimited);
    }

    #[test]
    fn a_429_is_rate_limited_and_a_500_a_server_error_while_the_host_stays_reachable() {
        let prev = sample(1, |_| {});
        let limited = sample(1, |c| {
            c.rq_by_code.insert(429, 1);
            c.rq_by_code.insert(200, 9);
        });
        assert_eq!(assess(Some(&prev), &limited).unwrap().0, FailureKind::RateLimited);
        assert_eq!(reachable(&limited), Some(true));
        let broken = sample(1, |c| {
            c.rq_by_code.insert(502, 2);
        });
        let (kind, message) = assess(Some(&prev), &broken).unwrap();
        assert_eq!((kind, message.as_str()), (FailureKind::ServerError, "answers 502 x2 from the upstream"));
    }

    #[test]
    fn health_checks_alone_failing_say_only_what_they_know_and_explain_envoys_503s() {
        let prev = sample(1, |_| {});
        let cur = sample(0, |c| {
            c.hc_network_failure = 3;
            c.hc_failure = 3;
            c.rq_by_code.insert(503, 4);
        });
        let (kind, message) = assess(Some(&prev), &cur).unwrap();
        assert_eq!(kind, FailureKind::HealthCheckFailed, "{message}");
        assert!(message.starts_with("3 health check(s) of the upstream (GET /v2/) got no connection"), "{message}");
        // A health check answered 5xx is the server's error.
        let failing = sample(0, |c| {
            c.hc_failure = 2;
        });
        assert_eq!(assess(Some(&prev), &failing).unwrap().0, FailureKind::ServerError);
    }

    #[test]
    fn a_reachable_host_reports_its_answers_before_a_connection_refused_a_while_ago() {
        let prev = sample(1, |_| {});
        let cur = sample(1, |c| {
            c.connect_fail = 1;
            c.rq_by_code.insert(429, 3);
        });
        assert_eq!(assess(Some(&prev), &cur).unwrap().0, FailureKind::RateLimited);
        let down = sample(0, |c| {
            c.connect_fail = 1;
            c.rq_by_code.insert(429, 3);
        });
        assert_eq!(assess(Some(&prev), &down).unwrap().0, FailureKind::ConnectFailed);
    }

    #[test]
    fn the_newest_429s_rate_limit_headers_are_read_from_the_access_log_and_only_safe_values_kept() {
        let log = "[2026-12-02T10:00:00.000Z] HEAD /v2/library/a/manifests/1 200 - 12ms upstream=registry tf=- rl=5;w=21600 rl_limit=100;w=21600 retry_after=-\n\
                   [2026-12-02T10:00:01.000Z] HEAD /v2/library/a/manifests/1 429 - 10ms upstream=registry tf=- rl=0;w=21600 rl_limit=100;w=21600 retry_after=60\n\
                   [2026-12-02T10:00:02.000Z] GET /v2/library/a/blobs/sha256:ab 200 - 3ms upstream=registry tf=- rl=- rl_limit=- retry_after=-\n";
        let h = last_rate_limit(log).unwrap();
        assert_eq!(
            (h.limit.as_deref(), h.remaining.as_deref(), h.retry_after.as_deref()),
            (Some("100;w=21600"), Some("0;w=21600"), Some("60"))
        );
        assert_eq!(
            describe_rate_limit(&h),
            "; RateLimit-Limit 100;w=21600, RateLimit-Remaining 0;w=21600, Retry-After 60"
        );
        // A 429 without the headers says nothing; an oversized value is dropped.
        assert_eq!(
            last_rate_limit("[t] GET /v2/x/manifests/1 429 - 1ms upstream=registry tf=- rl=- rl_limit=- retry_after=-"),
            None
        );
        let long = format!(
            "[t] GET /v2/x/manifests/1 429 - 1ms upstream=registry tf=- rl={} rl_limit=- retry_after=7",
            "9".repeat(65)
        );
        assert_eq!(
            last_rate_limit(&long).unwrap(),
            RateLimitHeaders { retry_after: Some("7".into()), ..Default::default() }
        );
    }

    #[test]
    fn an_established_connection_that_never_answers_is_a_timeout() {
        let prev = sample(1, |_| {});
        let cur = sample(0, |c| {
            c.hc_network_failure = 2;
            c.rq_timeout = 1;
            c.rq_by_code.insert(504, 1);
        });
        assert_eq!(assess(Some(&prev), &cur).unwrap().0, FailureKind::Timeout);
    }

    #[test]
    fn the_health_of_an_upstream_sums_its_proxies_and_keeps_a_going_failures_first_time() {
        let t0 = time("2026-12-02T10:00:00Z");
        let t1 = time("2026-12-02T10:00:10Z");
        let up = sample(1, |_| {});
        let mut down = sample(0, |c| {
            c.connect_fail = 3;
        });
        down.failed_lookups = 2;
        let first = aggregate(
            None,
            &[PodReading { prev: Some(&up), cur: &down }, PodReading { prev: Some(&up), cur: &down }],
            &t0,
        );
        assert_eq!(first.reachable, Some(false));
        assert_eq!(first.failed_lookups, Some(4));
        let e = first.last_error.clone().unwrap();
        assert_eq!((e.reason.as_str(), e.time.clone()), ("ConnectFailed", t0.clone()));
        assert!(e.message.ends_with("seen by 2 of 2 proxies"), "{}", e.message);
        let mut more = down.clone();
        more.clusters.get_mut("registry").unwrap().connect_fail = 5;
        let second = aggregate(Some(&first), &[PodReading { prev: Some(&down), cur: &more }], &t1);
        assert_eq!(second.last_error.unwrap().time, t0, "the same failure going on keeps its first time");
        // One proxy reaching it is enough.
        let mixed = aggregate(None, &[PodReading { prev: None, cur: &up }, PodReading { prev: None, cur: &down }], &t1);
        assert_eq!(mixed.reachable, Some(true));
        // No reading: unknown, the last error kept.
        let unknown = aggregate(Some(&first), &[], &t1);
        assert_eq!((unknown.reachable, unknown.failed_lookups), (None, None));
        assert!(unknown.last_error.is_some());
    }

    fn status(name: &str, reachable: Option<bool>, since: Option<&str>, error: Option<(&str, &str)>) -> UpstreamStatus {
        UpstreamStatus {
            name: name.into(),
            registry: "docker.io".into(),
            reachable,
            unreachable_since: since.map(time),
            last_error: error.map(|(reason, at)| UpstreamError {
                time: time(at),
                reason: reason.into(),
                message: "m".into(),
                rate_limit: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn events_say_when_an_upstream_is_lost_found_again_and_fails_in_a_new_way() {
        let now = time("2026-12-02T10:05:00Z");
        let up = status("hub", Some(true), None, None);
        let down =
            status("hub", Some(false), Some("2026-12-02T10:00:00Z"), Some(("ConnectTimeout", "2026-12-02T10:00:00Z")));
        let e = upstream_events(std::slice::from_ref(&up), std::slice::from_ref(&down), &now);
        assert_eq!((e.len(), e[0].0, &*e[0].1), (1, true, "UpstreamUnreachable"));
        assert!(e[0].2.contains("no proxy of upstream hub reaches docker.io: m (ConnectTimeout)"), "{}", e[0].2);
        let back = status("hub", Some(true), None, Some(("ConnectTimeout", "2026-12-02T10:00:00Z")));
        let e = upstream_events(std::slice::from_ref(&down), std::slice::from_ref(&back), &now);
        assert_eq!((e[0].0, &*e[0].1), (false, "UpstreamReachable"));
        assert!(e[0].2.ends_with("after 300s"), "{}", e[0].2);
        // Nothing new: no Event.
        assert!(upstream_events(std::slice::from_ref(&back), std::slice::from_ref(&back), &now).is_empty());
        let limited = status("hub", Some(true), None, Some(("RateLimited", "2026-12-02T10:04:00Z")));
        let e = upstream_events(std::slice::from_ref(&back), std::slice::from_ref(&limited), &now);
        assert_eq!((e[0].0, &*e[0].1), (true, "UpstreamRateLimited"));
        // Unknown (no sidecar, no reading) is not a change of reachability.
        let unknown = status("hub", None, None, None);
        assert!(upstream_events(std::slice::from_ref(&up), std::slice::from_ref(&unknown), &now).is_empty());
    }

    #[test]
    fn unreachable_since_is_kept_while_it_lasts_and_cleared_after() {
        let t0 = time("2026-12-02T10:00:00Z");
        let t1 = time("2026-12-02T10:01:30Z");
        let down = UpstreamHealth { reachable: Some(false), ..Default::default() };
        let mut first = UpstreamStatus::default();
        apply_health(&mut first, Some(&down), None, &t0);
        assert_eq!(first.unreachable_since, Some(t0.clone()));
        let mut second = UpstreamStatus::default();
        apply_health(&mut second, Some(&down), Some(&first), &t1);
        assert_eq!(second.unreachable_since, Some(t0));
        assert_eq!(unreachable_for(&second, &t1), Some(Duration::from_secs(90)));
        let mut third = UpstreamStatus::default();
        apply_health(
            &mut third,
            Some(&UpstreamHealth { reachable: Some(true), ..Default::default() }),
            Some(&second),
            &t1,
        );
        assert_eq!(third.unreachable_since, None);
    }
}
