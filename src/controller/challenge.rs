//! Learning an upstream's challenge: for an upstream without `auth` that is not a known public
//! registry, the operator asks `GET <remoteURL>/v2/` itself and takes what the answer says —
//! 401 with `WWW-Authenticate: Bearer realm="...",service="..."`, or 200 (no token) — so that
//! upstream's proxies run the upstream sidecar too (bounded waits, start while the upstream is
//! down, the front's reasons and counters; see [`crate::build::sidecar`]).
//!
//! The sidecar answers the registry's start-up ping with this challenge, so it must be known
//! before the proxy starts, whatever the upstream does then. What was learned is kept in
//! `status.upstreams[].learnedAuth` (with the remote URL it came from): a restarted operator
//! renders the same proxies while the upstream is down, and only a new remote URL is asked
//! again. An upstream that cannot be asked (down, filtered, Basic auth, an odd answer) runs
//! without the sidecar, as before, and is asked again after [`RETRY_AFTER`]. Nothing is sent but
//! the GET: no credentials. `--learn-upstream-challenges=false` turns the asking off.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc::UnboundedSender;

use crate::agent::probe::{error_chain, https_client, HttpsClient};
use crate::api::{RegistryMirror, UpstreamAuth, UpstreamAuthType};

/// One question's bound (connect and answer).
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// An upstream that could not be asked is asked again after this.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

/// The challenge in a `/v2/` answer, or why there is none to take.
pub fn parse_challenge(status: u16, www_authenticate: Option<&str>) -> Result<UpstreamAuth, String> {
    match status {
        200 => Ok(UpstreamAuth { type_: UpstreamAuthType::None, realm: None, service: None }),
        401 => {
            let header = www_authenticate.ok_or("401 without a WWW-Authenticate header")?;
            let (scheme, params) = header.trim().split_once(char::is_whitespace).unwrap_or((header.trim(), ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(format!("a {scheme} challenge (only Bearer token auth is learned; set upstreams[].auth)"));
            }
            let params = auth_params(params);
            let realm = params.get("realm").ok_or("a Bearer challenge without realm")?;
            let service = params.get("service").ok_or("a Bearer challenge without service")?;
            let url = url::Url::parse(realm).map_err(|e| format!("realm {realm:?} is not a URL: {e}"))?;
            if !matches!(url.scheme(), "http" | "https")
                || url.host_str().unwrap_or_default().is_empty()
                || realm.contains(['?', '#'])
                || realm.len() > 2048
            {
                return Err(format!("realm {realm:?} is not an absolute http(s) URL without query"));
            }
            if service.is_empty()
                || service.len() > 253
                || service.contains(|c: char| c == '"' || c == '\\' || c.is_whitespace())
            {
                return Err(format!("service {service:?} is not usable"));
            }
            Ok(UpstreamAuth::bearer(realm, service))
        }
        other => Err(format!("answered {other}, not a registry's 200 or 401")),
    }
}

/// `key="value"` (or `key=token`) pairs of a challenge, keys lower-cased.
fn auth_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim(), &after[end..]),
                None => (after.trim(), ""),
            }
        };
        out.insert(key, value.to_string());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// Asks one upstream.
pub async fn ask(client: &HttpsClient, remote_url: &str) -> Result<UpstreamAuth, String> {
    let url = format!("{}/v2/", remote_url.trim_end_matches('/'));
    let uri: http::Uri = url.parse().map_err(|e| format!("{url} is not a URL: {e}"))?;
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, concat!("mirrorfleet/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(TIMEOUT, client.request(req)).await {
        Err(_) => Err(format!("GET {url}: no answer within {TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("GET {url}: {}", error_chain(&e))),
        Ok(Ok(resp)) => {
            let header = resp.headers().get(http::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok());
            parse_challenge(resp.status().as_u16(), header).map_err(|e| format!("GET {url}: {e}"))
        }
    }
}

/// Upstream name -> challenge, from the mirror's status: what was learned from an upstream that
/// still has no `auth`, is not a known public registry, and has the same remote URL.
pub fn learned_in_status(mirror: &RegistryMirror) -> BTreeMap<String, UpstreamAuth> {
    let Some(status) = &mirror.status else { return BTreeMap::new() };
    mirror
        .spec
        .upstreams
        .iter()
        .filter(|u| u.effective_auth().is_none())
        .filter_map(|u| {
            let learned = status.upstreams.iter().find(|s| s.name == u.name)?.learned_auth.as_ref()?;
            (learned.remote_url == u.remote_url).then(|| (u.name.clone(), learned.auth()))
        })
        .collect()
}

/// What the operator knows of one remote URL's challenge.
#[derive(Clone, Debug)]
enum Asked {
    /// Being asked; the mirrors to reconcile when the answer is in.
    InFlight(Vec<ObjectRef<RegistryMirror>>),
    Learned(UpstreamAuth),
    Failed(Instant),
}

/// The operator's learned challenges. A reconcile never waits for an upstream: it takes what is
/// known (the status, or an answer already in), and the questions still needed are asked in the
/// background; an answer triggers the mirror's reconcile, which writes it to the status.
pub struct Challenges {
    enabled: bool,
    /// [`RETRY_AFTER`], shorter in tests.
    retry_after: Duration,
    client: Result<HttpsClient, String>,
    /// Remote URL -> what is known of it.
    asked: Arc<Mutex<HashMap<String, Asked>>>,
    trigger: OnceLock<UnboundedSender<ObjectRef<RegistryMirror>>>,
}

impl Challenges {
    /// `enabled`: ask upstreams at all (otherwise only what the status holds is used).
    pub fn new(enabled: bool) -> Self {
        Self::with_retry(enabled, RETRY_AFTER)
    }

    /// [`Challenges::new`] asking a failed remote URL again after `retry_after`.
    pub fn with_retry(enabled: bool, retry_after: Duration) -> Self {
        Self {
            enabled,
            retry_after,
            client: https_client(TIMEOUT, None),
            asked: Arc::default(),
            trigger: OnceLock::new(),
        }
    }

    /// Where an answer's mirror reconcile is sent (the controller's trigger stream), once.
    pub fn set_trigger(&self, trigger: UnboundedSender<ObjectRef<RegistryMirror>>) {
        let _ = self.trigger.set(trigger);
    }

    /// Upstream name -> challenge, for every upstream of `mirror` that has no `auth` and is not
    /// a known public registry: from the mirror's status when learned from the same remote URL,
    /// else an answer already in. Those still unknown are asked in the background. The answer
    /// triggers the reconcile of every mirror that waited for it; a failed ask triggers them
    /// [`RETRY_AFTER`] later, and that reconcile asks again.
    pub fn learned(&self, mirror: &RegistryMirror) -> BTreeMap<String, UpstreamAuth> {
        let mut out = learned_in_status(mirror);
        let unknown: Vec<_> = mirror
            .spec
            .upstreams
            .iter()
            .filter(|u| u.effective_auth().is_none() && !out.contains_key(&u.name))
            .collect();
        if unknown.is_empty() || !self.enabled {
            return out;
        }
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        for upstream in unknown {
            let mirror_ref = ObjectRef::from_obj(mirror);
            match asked.get_mut(&upstream.remote_url) {
                Some(Asked::Learned(auth)) => {
                    out.insert(upstream.name.clone(), auth.clone());
                }
                Some(Asked::InFlight(waiting)) => {
                    if !waiting.contains(&mirror_ref) {
                        waiting.push(mirror_ref);
                    }
                }
                Some(Asked::Failed(at)) if at.elapsed() < self.retry_after => {}
                _ => {
                    let client = match &self.client {
                        Ok(client) => client.clone(),
                        Err(error) => {
                            tracing::warn!(%error, "no client to learn upstream challenges");
                            continue;
                        }
                    };
                    asked.insert(upstream.remote_url.clone(), Asked::InFlight(vec![mirror_ref]));
                    let (state, url, name) = (self.asked.clone(), upstream.remote_url.clone(), upstream.name.clone());
                    let (trigger, retry_after) = (self.trigger.get().cloned(), self.retry_after);
                    tokio::spawn(async move {
                        let answer = ask(&client, &url).await;
                        let learned = answer.is_ok();
                        let next = match answer {
                            Ok(auth) => {
                                tracing::info!(upstream = %name, ?auth, "learned the upstream's challenge: its proxies run the upstream sidecar");
                                Asked::Learned(auth)
                            }
                            Err(error) => {
                                tracing::info!(upstream = %name, %error, "could not learn the upstream's challenge: its proxies run without the upstream sidecar (set upstreams[].auth); asking again in {retry_after:?}");
                                Asked::Failed(Instant::now())
                            }
                        };
                        let waiting = match state.lock().unwrap_or_else(|e| e.into_inner()).insert(url, next) {
                            Some(Asked::InFlight(waiting)) => waiting,
                            _ => Vec::new(),
                        };
                        let Some(trigger) = trigger else { return };
                        if !learned {
                            tokio::time::sleep(retry_after).await;
                        }
                        for mirror in waiting {
                            let _ = trigger.send(mirror);
                        }
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_challenge_is_learned_in_any_order_and_case_with_extra_params() {
        for header in [
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com""#,
            r#"bearer service="registry.example.com", realm="https://auth.example.com/token", scope="repository:x:pull""#,
            r#"Bearer realm=https://auth.example.com/token,service=registry.example.com"#,
        ] {
            assert_eq!(
                parse_challenge(401, Some(header)),
                Ok(UpstreamAuth::bearer("https://auth.example.com/token", "registry.example.com")),
                "{header}"
            );
        }
        assert_eq!(parse_challenge(200, None).unwrap().type_, UpstreamAuthType::None);
    }

    /// A remote URL nothing listens on yet: the failed ask triggers the waiting mirrors after the
    /// retry delay, and their reconcile asks again and learns it once the upstream answers.
    #[tokio::test]
    async fn a_failed_ask_triggers_the_waiting_mirrors_later_and_is_asked_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mirror = |name: &str| -> RegistryMirror {
            serde_yaml::from_str(&format!(
                "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\n\
                 metadata: {{name: {name}, namespace: ns}}\n\
                 spec: {{upstreams: [{{name: corp, registry: corp.example, remoteURL: \"http://{addr}\"}}]}}\n"
            ))
            .unwrap()
        };
        let (a, b) = (mirror("a"), mirror("b"));
        let challenges = Challenges::with_retry(true, Duration::from_millis(300));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        challenges.set_trigger(tx);
        assert!(challenges.learned(&a).is_empty() && challenges.learned(&b).is_empty());
        let started = Instant::now();
        let mut triggered = Vec::new();
        while triggered.len() < 2 {
            let r = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a trigger").unwrap();
            triggered.push(r.name);
        }
        triggered.sort();
        assert_eq!(triggered, ["a", "b"], "both mirrors waited for that remote URL");
        assert!(started.elapsed() >= Duration::from_millis(300), "triggered before the retry delay");

        // The upstream answers now (a registry without auth: 200).
        let server = std::net::TcpListener::bind(addr).unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for mut conn in server.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
            }
        });
        assert!(challenges.learned(&a).is_empty(), "asked again; the answer comes in the background");
        let r = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a trigger").unwrap();
        assert_eq!(r.name, "a");
        assert_eq!(challenges.learned(&b)["corp"].type_, UpstreamAuthType::None);
    }

    #[test]
    fn what_the_sidecar_cannot_answer_is_not_learned() {
        for (status, header, why) in [
            (401, Some(r#"Basic realm="corp""#), "Basic challenge"),
            (401, None, "without a WWW-Authenticate"),
            (401, Some(r#"Bearer service="s""#), "without realm"),
            (401, Some(r#"Bearer realm="https://a/token""#), "without service"),
            (401, Some(r#"Bearer realm="/token",service="s""#), "not a URL"),
            (401, Some(r#"Bearer realm="ftp://a/token",service="s""#), "absolute http(s)"),
            (401, Some(r#"Bearer realm="https://a/token?x=1",service="s""#), "absolute http(s)"),
            (401, Some(r#"Bearer realm="https://a/token",service="a b""#), "not usable"),
            (404, None, "answered 404"),
            (503, None, "answered 503"),
        ] {
            let err = parse_challenge(status, header).unwrap_err();
            assert!(err.contains(why), "{status} {header:?}: {err}");
        }
    }
}
