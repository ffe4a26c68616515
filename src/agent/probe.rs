//! Mirror health, as this node sees it: a bounded, jittered `GET <mirror>/v2/` from the host
//! network (the agent runs with `hostNetwork`, so it dials the way containerd dials).
//!
//! A mirror counts as reachable when `/v2/` answers 200 or 401 (client auth on). Each probe dials
//! a fresh connection (no pooling, which would hide a dead backend) and is cut off after the
//! timeout. State changes need `fall` consecutive failures or `rise` consecutive successes, so one
//! lost packet does not withdraw a working mirror and one lucky answer does not restore a flapping
//! one. A refused connection is the exception: nothing listens (the mirror's process, or every
//! endpoint of its Service, is gone: kube-proxy rejects), which no retransmission will change, and
//! every pull meanwhile would fail on it; it withdraws the mirror at once. The first result decides at once: a restarted agent should not wait to confirm what the
//! files already say.
//!
//! https mirrors are verified against the agent's CA bundle (the image's, or `SSL_CERT_FILE`) plus,
//! for `via: Edge`, the edge CA the node config carries: the same CA the agent names in the
//! mirror's `hosts.toml`, so the probe trusts exactly what containerd will.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::build::node::edge_ca_certificates;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum Health {
    /// Not probed yet.
    Unknown,
    Up,
    Down {
        reason: String,
    },
}

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeFailure {
    pub reason: String,
    /// The connection was refused: decisive at once (see the module doc).
    pub refused: bool,
}

impl From<&str> for ProbeFailure {
    fn from(reason: &str) -> Self {
        Self { reason: reason.into(), refused: false }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ProbeSettings {
    /// Mean time between probes of one endpoint.
    pub interval: Duration,
    /// Each probe (dial + TLS + response head) is cut off after this.
    pub timeout: Duration,
    /// Consecutive failures before an Up mirror is Down.
    pub fall: u32,
    /// Consecutive successes before a Down mirror is Up.
    pub rise: u32,
    /// Fraction of `interval` added or removed at random, so a fleet of agents does not probe in
    /// lockstep after a mass restart.
    pub jitter: f64,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        // Worst case from death to withdrawal with a blackholed mirror:
        // fall * (interval * (1 + jitter) + timeout) = 2 * (2.4 s + 1.5 s) < 8 s.
        Self { interval: Duration::from_secs(2), timeout: Duration::from_millis(1500), fall: 2, rise: 2, jitter: 0.2 }
    }
}

impl ProbeSettings {
    pub fn next_delay(&self) -> Duration {
        let j = self.jitter.clamp(0.0, 0.9);
        let factor = 1.0 + j * (fastrand::f64() * 2.0 - 1.0);
        self.interval.mul_f64(factor)
    }
}

/// The hysteresis of one endpoint.
#[derive(Clone, Debug)]
pub struct Tracker {
    health: Health,
    streak: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Self { health: Health::Unknown, streak: 0 }
    }
}

impl Tracker {
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Feeds one probe result; returns true when the health changed.
    pub fn observe(&mut self, result: Result<(), ProbeFailure>, settings: &ProbeSettings) -> bool {
        let next = match (&self.health, result) {
            (Health::Unknown, Ok(())) => Some(Health::Up),
            (Health::Unknown, Err(ProbeFailure { reason, .. })) => Some(Health::Down { reason }),
            (Health::Up, Ok(())) => {
                self.streak = 0;
                None
            }
            (Health::Up, Err(ProbeFailure { reason, refused })) => {
                self.streak += 1;
                (refused || self.streak >= settings.fall.max(1)).then_some(Health::Down { reason })
            }
            (Health::Down { .. }, Ok(())) => {
                self.streak += 1;
                (self.streak >= settings.rise.max(1)).then_some(Health::Up)
            }
            (Health::Down { .. }, Err(ProbeFailure { reason, .. })) => {
                self.streak = 0;
                // Keep the latest reason without counting it as a change.
                self.health = Health::Down { reason };
                None
            }
        };
        match next {
            Some(h) => {
                self.health = h;
                self.streak = 0;
                true
            }
            None => false,
        }
    }
}

pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A probe client, or why there cannot be one (an edge CA that does not parse).
pub type ClientResult = Result<HttpsClient, String>;

/// Dials each mirror endpoint on its own schedule and publishes every endpoint's health.
pub struct Prober {
    settings: ProbeSettings,
    /// One client per extra CA (`None`: the agent's own bundle only).
    clients: BTreeMap<Option<String>, ClientResult>,
    /// Per endpoint: the extra CA its task probes with, and the task.
    tasks: BTreeMap<String, (Option<String>, JoinHandle<()>)>,
    health: watch::Sender<BTreeMap<String, Health>>,
}

/// A client trusting the agent's CA bundle and, when given, the certificates of `extra_ca`.
fn client(settings: &ProbeSettings, extra_ca: Option<&str>) -> ClientResult {
    https_client(settings.timeout, extra_ca)
}

/// An unpooled http/https client trusting the system CA bundle (the image's, or
/// `SSL_CERT_FILE`) and, when given, the certificates of `extra_ca` (the node agent's probes,
/// the operator's challenge probe).
pub fn https_client(connect_timeout: Duration, extra_ca: Option<&str>) -> ClientResult {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(pem) = extra_ca {
        for cert in edge_ca_certificates(pem).map_err(|e| format!("the edge CA in the node config {e}"))? {
            roots.add(cert).map_err(|e| format!("the edge CA in the node config: {e}"))?;
        }
    }
    if roots.is_empty() {
        // Without a CA bundle in the image, https mirrors probe as Down (unknown issuer), which
        // withdraws them: loud in the log rather than silently trusted.
        tracing::warn!("no CA certificates found; https mirrors will fail their probes");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new())
        // A pooled connection would outlive the mirror pod it was dialed to.
        .pool_max_idle_per_host(0)
        .build(connector))
}

/// `GET <endpoint>/v2/`: Ok when it answers 200 or 401 within `timeout`.
pub async fn probe_once(client: &HttpsClient, endpoint: &str, timeout: Duration) -> Result<(), ProbeFailure> {
    let url = format!("{}/v2/", endpoint.trim_end_matches('/'));
    let fail = |reason: String| ProbeFailure { reason, refused: false };
    let uri: http::Uri = url.parse().map_err(|e| fail(format!("{url} is not a URL: {e}")))?;
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, concat!("mirrorfleet-node-agent/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(fail(format!("GET {url}: no answer within {timeout:?}"))),
        Ok(Err(e)) => Err(ProbeFailure { reason: format!("GET {url}: {}", error_chain(&e)), refused: is_refusal(&e) }),
        Ok(Ok(resp)) => match resp.status().as_u16() {
            200 | 401 => Ok(()),
            other => Err(fail(format!("GET {url} answered {other}, not a registry answer (200 or 401)"))),
        },
    }
}

/// Whether an error, or one of its sources, is a refused connection.
fn is_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        next = err.source();
    }
    false
}

pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl Prober {
    pub fn new(settings: ProbeSettings) -> (Self, watch::Receiver<BTreeMap<String, Health>>) {
        let (tx, rx) = watch::channel(BTreeMap::new());
        (Self { clients: BTreeMap::new(), settings, tasks: BTreeMap::new(), health: tx }, rx)
    }

    /// Probes exactly `endpoints` from now on, each trusting its extra CA (PEM) besides the agent's
    /// bundle: new ones start at once, dropped ones stop, one whose CA changed starts over (its
    /// last health stands until the new first probe decides).
    pub fn set_endpoints<'a>(&mut self, endpoints: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) {
        let wanted: BTreeMap<String, Option<String>> =
            endpoints.into_iter().map(|(e, ca)| (e.to_string(), ca.map(str::to_string))).collect();
        self.tasks.retain(|endpoint, (ca, task)| {
            let keep = wanted.get(endpoint) == Some(ca);
            if !keep {
                task.abort();
            }
            keep
        });
        self.clients.retain(|ca, _| wanted.values().any(|w| w == ca));
        self.health.send_if_modified(|h| {
            let before = h.len();
            h.retain(|e, _| wanted.contains_key(e));
            before != h.len()
        });
        for (endpoint, ca) in wanted {
            if self.tasks.contains_key(&endpoint) {
                continue;
            }
            let settings = self.settings;
            let client = self.clients.entry(ca.clone()).or_insert_with(|| client(&settings, ca.as_deref())).clone();
            let tx = self.health.clone();
            let e = endpoint.clone();
            let task = tokio::spawn(async move {
                let mut tracker = Tracker::default();
                loop {
                    let result = match &client {
                        Ok(client) => probe_once(client, &e, settings.timeout).await,
                        Err(why) => Err(why.as_str().into()),
                    };
                    if let Err(failure) = &result {
                        tracing::debug!(endpoint = %e, reason = %failure.reason, "probe failed");
                    }
                    if tracker.observe(result, &settings) {
                        let health = tracker.health().clone();
                        match &health {
                            Health::Up => tracing::info!(endpoint = %e, "mirror reachable"),
                            Health::Down { reason } => tracing::warn!(endpoint = %e, %reason, "mirror unreachable"),
                            Health::Unknown => {}
                        }
                        tx.send_modify(|h| {
                            h.insert(e.clone(), health);
                        });
                    }
                    tokio::time::sleep(settings.next_delay()).await;
                }
            });
            self.tasks.insert(endpoint, (ca, task));
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s() -> ProbeSettings {
        ProbeSettings { fall: 2, rise: 3, ..Default::default() }
    }

    #[test]
    fn first_result_decides_then_hysteresis() {
        let mut t = Tracker::default();
        assert!(t.observe(Ok(()), &s()));
        assert_eq!(t.health(), &Health::Up);
        // one failure is not enough to withdraw
        assert!(!t.observe(Err("x".into()), &s()));
        assert!(!t.observe(Ok(()), &s()), "success resets the failure streak");
        assert!(!t.observe(Err("x".into()), &s()));
        assert!(t.observe(Err("y".into()), &s()));
        assert_eq!(t.health(), &Health::Down { reason: "y".into() });
        // rise = 3, and a failure in between starts over
        assert!(!t.observe(Ok(()), &s()));
        assert!(!t.observe(Ok(()), &s()));
        assert!(!t.observe(Err("z".into()), &s()));
        assert_eq!(t.health(), &Health::Down { reason: "z".into() });
        assert!(!t.observe(Ok(()), &s()));
        assert!(!t.observe(Ok(()), &s()));
        assert!(t.observe(Ok(()), &s()));
        assert_eq!(t.health(), &Health::Up);
    }

    #[test]
    fn a_refused_connection_withdraws_at_once() {
        let mut t = Tracker::default();
        assert!(t.observe(Ok(()), &s()));
        let refused = ProbeFailure { reason: "connection refused".into(), refused: true };
        assert!(t.observe(Err(refused), &s()), "fall = 2, but nothing listens");
        assert!(matches!(t.health(), Health::Down { .. }));
        // Coming back still takes `rise` successes.
        assert!(!t.observe(Ok(()), &s()));
    }

    #[test]
    fn unknown_goes_straight_down_on_first_failure() {
        let mut t = Tracker::default();
        assert!(t.observe(Err("refused".into()), &s()));
        assert!(matches!(t.health(), Health::Down { .. }));
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let settings = ProbeSettings { interval: Duration::from_secs(2), jitter: 0.2, ..Default::default() };
        for _ in 0..1000 {
            let d = settings.next_delay();
            assert!(d >= Duration::from_millis(1600) && d <= Duration::from_millis(2400), "{d:?}");
        }
    }

    #[tokio::test]
    async fn probe_counts_401_as_reachable_and_404_or_refused_as_not() {
        use std::io::{Read, Write};
        async fn serve(status: &'static str) -> String {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            std::thread::spawn(move || {
                for mut s in l.incoming().flatten() {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(
                        format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
                    );
                }
            });
            format!("http://{addr}")
        }
        let settings = ProbeSettings::default();
        let c = client(&settings, None).unwrap();
        assert_eq!(probe_once(&c, &serve("401 Unauthorized").await, settings.timeout).await, Ok(()));
        assert_eq!(probe_once(&c, &serve("200 OK").await, settings.timeout).await, Ok(()));
        assert!(probe_once(&c, &serve("404 Not Found").await, settings.timeout).await.is_err());
        assert!(!probe_once(&c, &serve("404 Not Found").await, settings.timeout).await.unwrap_err().refused);
        // A port nobody listens on: refused, and known as such.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let failure = probe_once(&c, &format!("http://{closed}"), settings.timeout).await.unwrap_err();
        assert!(failure.refused, "{failure:?}");
    }

    #[tokio::test]
    async fn probe_of_a_listener_that_never_answers_is_cut_off_by_the_timeout() {
        // Accepts (via the kernel backlog) but never responds: the probe must not hang.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let settings = ProbeSettings { timeout: Duration::from_millis(300), ..Default::default() };
        let started = std::time::Instant::now();
        let r = probe_once(&client(&settings, None).unwrap(), &format!("http://{addr}"), settings.timeout).await;
        let failure = r.unwrap_err();
        assert!(failure.reason.contains("no answer") && !failure.refused, "{failure:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(l);
    }
}
