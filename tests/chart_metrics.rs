//! The metrics the chart's dashboard and alerts query exist where the chart scrapes them, on the
//! real components with the configs the operator renders (the data-path fleet: Distribution
//! proxies and the Envoy edge on 127.0.0.1): after a pull through the edge, the edge's
//! admin-proxy listener (the pods' `metrics` port, which the edge PodMonitor scrapes) serves
//! /stats/prometheus and /ready and nothing else of the admin API, and every `envoy_*` and
//! `registry_*` name (and label) used in files/alerts.yaml and files/grafana-dashboard.json is
//! in what Envoy and the proxy's debug listener (`metrics` port, /metrics) serve.
//!
//! Distribution here is Debian's 2.8; the `registry_proxy_*` hit/miss/bytes counters exist only
//! in Distribution 3 (the image the operator deploys by default, registry:3.1.1), so they are
//! checked against the list below, not against a running 2.8, and the test says so.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use support::datapath::fleet::CI_USER;
use support::datapath::{Fleet, FleetOptions};
use support::*;

/// Distribution 3's proxy counters (registry/proxy/proxymetrics.go; label `type` = blob|manifest).
const DISTRIBUTION3_ONLY: &[&str] = &[
    "registry_proxy_requests_total",
    "registry_proxy_hits_total",
    "registry_proxy_misses_total",
    "registry_proxy_pulled_bytes_total",
    "registry_proxy_pushed_bytes_total",
];

fn chart_file(name: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/mirrorfleet/files").join(name))
        .unwrap()
}

/// Metric names with `prefix` used by the alerts' expressions and the dashboard's queries.
fn used(prefix: &str) -> BTreeSet<String> {
    let alerts: String = chart_file("alerts.yaml").lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    let text = format!("{alerts}\n{}", chart_file("grafana-dashboard.json"));
    let re = regex::Regex::new(&format!(r"\b({prefix}[a-z0-9_]*[a-z0-9])\b")).unwrap();
    // Envoy's label names share the prefix; the label checks below cover them.
    let labels = ["envoy_cluster_name", "envoy_response_code_class", "envoy_http_conn_manager_prefix"];
    re.captures_iter(&text).map(|c| c[1].to_string()).filter(|n| !labels.contains(&n.as_str())).collect()
}

/// Whether the exposition has samples of `name` carrying every label in `labels`.
fn has(exposition: &str, name: &str, labels: &[&str]) -> bool {
    exposition.lines().filter(|l| !l.starts_with('#')).any(|l| {
        let (series, _) = l.split_once(' ').unwrap_or((l, ""));
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        metric == name && labels.iter().all(|label| rest.contains(&format!("{label}=\"")))
    })
}

#[test]
fn dashboard_and_alert_metrics_exist_on_real_envoy_and_registry() {
    if !support::datapath::fleet::available() {
        return;
    }
    let fleet = Fleet::start(FleetOptions::default());
    let layout = build_test_image(fleet.dir(), "metricsimage", 2, 64 * 1024);
    fleet.upstream("dockerhub").push(&layout, "v1");
    let out = fleet.skopeo_pull("docker.io/library/metricsimage:v1", CI_USER, &fleet.dir().join("pull"));
    assert!(out.status.success(), "pull through the edge: {}", describe_output(&out));

    // The edge's `metrics` port: the rendered admin-proxy listener, found in Envoy's listeners.
    let listeners = fleet.envoy.listeners();
    let admin_proxy = listeners
        .lines()
        .find_map(|l| l.strip_prefix("admin-proxy::"))
        .unwrap_or_else(|| panic!("no admin-proxy listener:\n{listeners}"))
        .trim()
        .to_string();
    let stats = http_get(&admin_proxy, "/stats/prometheus", &[]);
    assert_eq!(stats.status, 200, "GET /stats/prometheus on the metrics port");
    assert_eq!(http_get(&admin_proxy, "/ready", &[]).status, 200);
    for hidden in ["/config_dump", "/clusters", "/quitquitquit"] {
        assert_ne!(http_get(&admin_proxy, hidden, &[]).status, 200, "{hidden} must not be exposed on the metrics port");
    }
    let envoy = String::from_utf8(stats.body).unwrap();
    for name in used("envoy_") {
        let labels: &[&str] = match name.as_str() {
            "envoy_cluster_upstream_rq_xx" => &["envoy_cluster_name", "envoy_response_code_class"],
            "envoy_http_downstream_rq_xx" => &["envoy_http_conn_manager_prefix", "envoy_response_code_class"],
            n if n.starts_with("envoy_cluster_") => &["envoy_cluster_name"],
            _ => &[],
        };
        assert!(has(&envoy, &name, labels), "Envoy serves no {name} with labels {labels:?}");
    }
    // The upstream clusters are named after the upstreams (the dashboard's legend).
    assert!(has(&envoy, "envoy_cluster_upstream_rq_total", &[]) && envoy.contains("envoy_cluster_name=\"dockerhub\""));

    // The proxy's `metrics` port.
    let proxy = fleet.proxy("dockerhub");
    let metrics = http_get(proxy.debug_addr().expect("the rendered config has a debug listener"), "/metrics", &[]);
    assert_eq!(metrics.status, 200);
    let registry = String::from_utf8(metrics.body).unwrap();
    let mut unverified = Vec::new();
    for name in used("registry_") {
        if DISTRIBUTION3_ONLY.contains(&name.as_str()) && !has(&registry, &name, &[]) {
            unverified.push(name);
            continue;
        }
        let labels: &[&str] = match name.as_str() {
            "registry_http_requests_total" => &["code", "handler", "method"],
            "registry_http_request_duration_seconds_bucket" => &["handler", "le"],
            _ => &[],
        };
        assert!(has(&registry, &name, labels), "the registry serves no {name} with labels {labels:?}");
    }
    if !unverified.is_empty() {
        eprintln!(
            "NOTE: {unverified:?} exist in Distribution 3 only; this registry is 2.8, so they were not seen served"
        );
    }
}
