//! Prefetch (`spec.prefetch`): the keeper of every proxy replica pulls the listed images through
//! its own registry (`127.0.0.1:5000`, the path a node's pull takes, so the upstream credentials
//! stay in the registry) once the registry answers after the pod starts — after every rollout —
//! and at each time of the schedule. A pull is the manifest (by tag or digest), for an index the
//! manifests of the wanted platforms, then every config and layer, read to the end: the registry
//! caches what it serves.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde::{Deserialize, Serialize};

type Http = Client<HttpConnector, Empty<Bytes>>;

const ACCEPT: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// One prefetch round of one replica, as `/status` reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchReport {
    /// Unix seconds when the round ended.
    pub time: i64,
    pub images: usize,
    /// `reference: why` of each image that failed.
    pub failed: Vec<String>,
    /// Blob bytes read through the registry.
    pub bytes: u64,
    pub seconds: f64,
}

/// `repository:tag` / `repository@digest` (as the proxy names it) → (repository, reference).
fn split(reference: &str) -> Option<(&str, &str)> {
    reference.split_once('@').or_else(|| reference.rsplit_once(':').filter(|(_, t)| !t.contains('/')))
}

async fn get(http: &Http, url: &str, auth: Option<&str>, accept: Option<&str>) -> Result<(u16, Bytes), String> {
    let mut req = http::Request::get(url);
    if let Some(a) = auth {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    if let Some(a) = accept {
        req = req.header(http::header::ACCEPT, a);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(30), http.request(req))
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    // Layers can be large and slow to come from the upstream: read to the end, bounded per blob.
    let body = tokio::time::timeout(Duration::from_secs(600), response.into_body().collect())
        .await
        .map_err(|_| "body not read within 600 s".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

fn platform_wanted(entry: &serde_json::Value, platforms: &[String]) -> bool {
    let p = &entry["platform"];
    let name = format!("{}/{}", p["os"].as_str().unwrap_or(""), p["architecture"].as_str().unwrap_or(""));
    platforms.contains(&name)
}

/// Pulls one image through the registry at `base`; returns the blob bytes read.
pub async fn pull(
    http: &Http,
    base: &str,
    auth: Option<&str>,
    reference: &str,
    platforms: &[String],
) -> Result<u64, String> {
    let (repo, tag) = split(reference).ok_or_else(|| "not repository:tag or repository@digest".to_string())?;
    let mut manifests = vec![tag.to_string()];
    let mut bytes = 0;
    while let Some(r) = manifests.pop() {
        let (status, body) = get(http, &format!("{base}/v2/{repo}/manifests/{r}"), auth, Some(ACCEPT)).await?;
        if status != 200 {
            let why = String::from_utf8_lossy(&body).chars().take(200).collect::<String>();
            return Err(format!("manifest {r}: HTTP {status} {why}"));
        }
        let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("manifest {r}: {e}"))?;
        if let Some(children) = doc["manifests"].as_array() {
            let wanted: Vec<String> = children
                .iter()
                .filter(|c| platform_wanted(c, platforms))
                .filter_map(|c| c["digest"].as_str().map(str::to_string))
                .collect();
            if wanted.is_empty() {
                return Err(format!("index {r} has none of the platforms {}", platforms.join(", ")));
            }
            manifests.extend(wanted);
            continue;
        }
        let blobs = doc["layers"].as_array().into_iter().flatten().chain(std::iter::once(&doc["config"]));
        for digest in blobs.filter_map(|b| b["digest"].as_str()) {
            let (status, body) = get(http, &format!("{base}/v2/{repo}/blobs/{digest}"), auth, None).await?;
            if status != 200 {
                return Err(format!("blob {digest}: HTTP {status}"));
            }
            bytes += body.len() as u64;
        }
    }
    Ok(bytes)
}

/// One round over every image, one at a time (a rollout must not flood the upstream).
pub async fn round(
    http: &Http,
    base: &str,
    auth: Option<&str>,
    images: &[String],
    platforms: &[String],
) -> PrefetchReport {
    let started = Instant::now();
    let mut report = PrefetchReport { images: images.len(), ..Default::default() };
    for image in images {
        match pull(http, base, auth, image, platforms).await {
            Ok(b) => report.bytes += b,
            Err(e) => report.failed.push(format!("{image}: {e}")),
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.time = super::keeper::unix_now();
    report
}

/// When the next scheduled round is due, from now (UTC), or None for an unusable schedule.
pub fn next_run(schedule: &str) -> Option<Duration> {
    let cron: croner::Cron = schedule.parse().ok()?;
    let now = k8s_openapi::jiff::Zoned::now().with_time_zone(k8s_openapi::jiff::tz::TimeZone::UTC);
    let next = cron.find_next_occurrence(&now, false).ok()?;
    let d = next.timestamp().duration_since(now.timestamp());
    Duration::try_from(d).ok()
}
