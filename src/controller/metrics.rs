//! Prometheus metrics of the controller, served on `/metrics` by the admin server.
//!
//! `mirrorfleet_api_writes_total` is counted by a tower layer on the controller's API client
//! ([`Metrics::count_request`]), so no write can bypass it; the leader-election client is
//! separate and its Lease renewals are counted in `mirrorfleet_leader_lease_writes_total`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::upstreams::UpstreamHealth;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub namespace: String,
    pub mirror: String,
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub verb: String,
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub api_writes: Family<WriteLabels, Counter>,
    pub lease_writes: Counter,
    pub in_flight: Gauge,
    pub mirrors: Gauge,
    pub leader: Gauge,
    pub upstream_reachable: Family<UpstreamLabels, Gauge>,
    pub upstream_failed_lookups: Family<UpstreamLabels, Gauge>,
    pub upstream_rate_limited: Family<UpstreamLabels, Gauge>,
    pub upstream_served_stale: Family<UpstreamLabels, Gauge>,
    pub upstream_failed_pulls: Family<UpstreamLabels, Gauge>,
    /// The upstream series written, so a mirror's can be removed.
    upstream_series: Mutex<BTreeSet<UpstreamLabels>>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Counter::default();
        registry.register("mirrorfleet_reconcile", "Reconciles started", reconciles.clone());
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mirrorfleet_reconcile_errors",
            "Reconciles that failed, by reason",
            reconcile_errors.clone(),
        );
        // 1 ms .. ~16 s
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "mirrorfleet_reconcile_duration_seconds",
            "Time of one reconcile",
            reconcile_duration.clone(),
        );
        let api_writes = Family::<WriteLabels, Counter>::default();
        registry.register(
            "mirrorfleet_api_writes",
            "Write requests (create, apply, patch, update, delete) the controller sent to the API server, by verb and resource",
            api_writes.clone(),
        );
        let lease_writes = Counter::default();
        registry.register(
            "mirrorfleet_leader_lease_writes",
            "Write requests of leader election (Lease renewals), kept apart from mirrorfleet_api_writes_total",
            lease_writes.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "mirrorfleet_reconcile_in_flight",
            "Reconciles running now (kube-runtime does not expose its pending queue; this is the busy part of it)",
            in_flight.clone(),
        );
        let mirrors = Gauge::default();
        registry.register("mirrorfleet_mirrors", "RegistryMirrors the controller knows", mirrors.clone());
        let leader = Gauge::default();
        registry.register("mirrorfleet_leader", "1 while this replica holds the leader Lease", leader.clone());
        let upstream_reachable = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "mirrorfleet_upstream_reachable",
            "1 while a proxy's upstream sidecar reaches the upstream (health check), 0 while none does; absent while unknown",
            upstream_reachable.clone(),
        );
        let upstream_failed_lookups = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "mirrorfleet_upstream_failed_lookups",
            "Tag and manifest lookups the upstream did not answer (timeout, refused, 429, 5xx), summed over the running proxies since they started",
            upstream_failed_lookups.clone(),
        );
        let upstream_rate_limited = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "mirrorfleet_upstream_rate_limited",
            "Upstream answers 429, summed over the running proxies since they started",
            upstream_rate_limited.clone(),
        );
        let upstream_served_stale = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "mirrorfleet_upstream_served_stale",
            "Pulls by tag served from the cache while the upstream failed their lookup, summed over the running proxies since they started",
            upstream_served_stale.clone(),
        );
        let upstream_failed_pulls = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "mirrorfleet_upstream_failed_pulls",
            "Manifest requests failed because the upstream failed and the image was not cached, summed over the running proxies since they started",
            upstream_failed_pulls.clone(),
        );
        Self {
            registry,
            upstream_reachable,
            upstream_failed_lookups,
            upstream_rate_limited,
            upstream_served_stale,
            upstream_failed_pulls,
            upstream_series: Mutex::default(),
            reconciles,
            reconcile_errors,
            reconcile_duration,
            api_writes,
            lease_writes,
            in_flight,
            mirrors,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// The text exposition format of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn observe_reconcile(&self, took: Duration, error_reason: Option<&str>) {
        self.reconcile_duration.observe(took.as_secs_f64());
        if let Some(reason) = error_reason {
            self.reconcile_errors.get_or_create(&ReasonLabels { reason: reason.to_string() }).inc();
        }
    }

    /// Counts a request if it writes. Called by the client's tower layer for every request.
    pub fn count_request(&self, method: &str, path: &str, content_type: Option<&str>) {
        if let Some(labels) = write_labels(method, path, content_type) {
            self.api_writes.get_or_create(&labels).inc();
        }
    }

    /// Sum of `mirrorfleet_api_writes_total` over every label (tests and benchmarks).
    pub fn api_writes_total(&self) -> u64 {
        // Family has no iterator; the encoded text is the one stable view of every series.
        sum_series(&self.encode(), "mirrorfleet_api_writes_total")
    }

    /// Sets an upstream's series from its health (`namespace/name` of the mirror).
    pub fn observe_upstream(&self, mirror_key: &str, upstream: &str, health: &UpstreamHealth) {
        let (namespace, mirror) = mirror_key.split_once('/').unwrap_or(("", mirror_key));
        let labels = UpstreamLabels { namespace: namespace.into(), mirror: mirror.into(), upstream: upstream.into() };
        match health.reachable {
            Some(r) => {
                self.upstream_reachable.get_or_create(&labels).set(i64::from(r));
            }
            None => {
                self.upstream_reachable.remove(&labels);
            }
        }
        for (family, value) in [
            (&self.upstream_failed_lookups, health.failed_lookups),
            (&self.upstream_rate_limited, health.rate_limited),
            (&self.upstream_served_stale, health.served_stale),
            (&self.upstream_failed_pulls, health.failed_pulls),
        ] {
            match value {
                Some(v) => {
                    family.get_or_create(&labels).set(v);
                }
                None => {
                    family.remove(&labels);
                }
            }
        }
        self.upstream_series.lock().unwrap_or_else(|e| e.into_inner()).insert(labels);
    }

    /// Removes every upstream series of a mirror.
    pub fn forget_upstreams(&self, mirror_key: &str) {
        let (namespace, mirror) = mirror_key.split_once('/').unwrap_or(("", mirror_key));
        let mut series = self.upstream_series.lock().unwrap_or_else(|e| e.into_inner());
        series.retain(|l| {
            let gone = l.namespace == namespace && l.mirror == mirror;
            if gone {
                self.upstream_reachable.remove(l);
                self.upstream_failed_lookups.remove(l);
                self.upstream_rate_limited.remove(l);
                self.upstream_served_stale.remove(l);
                self.upstream_failed_pulls.remove(l);
            }
            !gone
        });
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Sums every sample of one metric in a text exposition.
pub fn sum_series(text: &str, metric: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// `verb` and `kind` (the resource, with `/status` for the subresource) of a write request;
/// `None` for reads.
pub fn write_labels(method: &str, path: &str, content_type: Option<&str>) -> Option<WriteLabels> {
    let verb = match method {
        "POST" => "create",
        "PUT" => "update",
        "DELETE" => "delete",
        "PATCH" if content_type.is_some_and(|c| c.starts_with("application/apply-patch")) => "apply",
        "PATCH" => "patch",
        _ => return None,
    };
    Some(WriteLabels { verb: verb.to_string(), kind: resource_of(path) })
}

/// The resource a request path addresses: `/apis/apps/v1/namespaces/ns/deployments/x/status`
/// gives `deployments/status`.
pub fn resource_of(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Skip "api/v1" or "apis/<group>/<version>".
    let rest = match segs.first() {
        Some(&"api") => segs.get(2..),
        Some(&"apis") => segs.get(3..),
        _ => None,
    }
    .unwrap_or(&[]);
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 { &rest[2..] } else { rest };
    match rest {
        [] => "unknown".into(),
        [resource] | [resource, _] => resource.to_string(),
        [resource, _, sub, ..] => format!("{resource}/{sub}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_requests() {
        let l = write_labels(
            "PATCH",
            "/apis/apps/v1/namespaces/m/deployments/a?fieldManager=x",
            Some("application/apply-patch+yaml"),
        )
        .unwrap();
        assert_eq!((l.verb.as_str(), l.kind.as_str()), ("apply", "deployments"));
        let l = write_labels(
            "PATCH",
            "/apis/mirrorfleet.io/v1alpha1/namespaces/m/registrymirrors/p/status",
            Some("application/merge-patch+json"),
        )
        .unwrap();
        assert_eq!((l.verb.as_str(), l.kind.as_str()), ("patch", "registrymirrors/status"));
        let l = write_labels("POST", "/apis/events.k8s.io/v1/namespaces/m/events", None).unwrap();
        assert_eq!((l.verb.as_str(), l.kind.as_str()), ("create", "events"));
        let l = write_labels("DELETE", "/api/v1/namespaces/m/configmaps/c", None).unwrap();
        assert_eq!((l.verb.as_str(), l.kind.as_str()), ("delete", "configmaps"));
        assert_eq!(resource_of("/api/v1/nodes"), "nodes");
        assert!(write_labels("GET", "/api/v1/namespaces/m/configmaps", None).is_none());
    }

    #[test]
    fn counts_writes_and_sums_them() {
        let m = Metrics::new();
        m.count_request("GET", "/api/v1/namespaces/m/secrets/s", None);
        assert_eq!(m.api_writes_total(), 0);
        m.count_request("DELETE", "/api/v1/namespaces/m/configmaps/c", None);
        m.count_request("POST", "/api/v1/namespaces/m/configmaps", None);
        m.count_request("POST", "/api/v1/namespaces/m/configmaps", None);
        assert_eq!(m.api_writes_total(), 3);
        let text = m.encode();
        assert!(text.contains(r#"mirrorfleet_api_writes_total{verb="create",kind="configmaps"} 2"#), "{text}");
        assert!(text.contains("mirrorfleet_reconcile_total 0"), "{text}");
    }

    #[test]
    fn upstream_series_follow_the_health_and_go_with_the_mirror() {
        let m = Metrics::new();
        let down = UpstreamHealth {
            reachable: Some(false),
            failed_lookups: Some(7),
            rate_limited: Some(0),
            ..Default::default()
        };
        m.observe_upstream("ns/a", "hub", &down);
        m.observe_upstream("ns/b", "quay", &UpstreamHealth::default());
        let text = m.encode();
        assert!(
            text.contains(r#"mirrorfleet_upstream_reachable{namespace="ns",mirror="a",upstream="hub"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mirrorfleet_upstream_failed_lookups{namespace="ns",mirror="a",upstream="hub"} 7"#),
            "{text}"
        );
        assert!(!text.contains(r#"mirror="b""#), "unknown health writes no series: {text}");
        m.forget_upstreams("ns/a");
        assert!(!m.encode().contains(r#"mirror="a""#));
    }
}
