//! The `cache-keeper` container of each proxy pod with filesystem storage (see
//! [`crate::cache`]): the registry notifies it of every pull, it keeps the cache between the
//! mirror's watermarks and serves the cache's figures to the operator.

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Probe, SecretKeySelector, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::proxy::{METRICS_PORT, STORAGE_DIR};
use super::{pod, Settings};
use crate::api::reference::ImageRef;
use crate::api::{RegistryMirror, Upstream};
use crate::cache::keeper::{EVENTS_PORT, LISTEN_PORT};

pub const CONTAINER_NAME: &str = "cache-keeper";
pub const PORT_NAME: &str = "cache";
pub const KEEPER_REQUESTS: pod::Requests = pod::Requests { cpu: "10m", memory: "32Mi" };

/// Whether the mirror's proxies get a keeper: filesystem storage (an S3 bucket has no volume to
/// keep under a size, and its lifecycle rules expire content).
pub fn managed(mirror: &RegistryMirror) -> bool {
    mirror.spec.proxy.storage.s3.is_none()
}

/// The `notifications` section of the registry config: every pull reported to the keeper.
pub fn notifications() -> serde_json::Value {
    json!({
        "endpoints": [{
            "name": CONTAINER_NAME,
            "url": format!("http://127.0.0.1:{EVENTS_PORT}/events"),
            "timeout": "1s",
            "threshold": 5,
            "backoff": "1s",
        }],
    })
}

/// `20Gi`, `500M`, `1e9` → bytes (what the kubelet compares an emptyDir's usage with).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "m" => 1e-3,
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some((number * factor) as u64)
}

fn keeper_args(mirror: &RegistryMirror, upstream: &Upstream) -> Vec<String> {
    let cache = mirror.spec.cache.clone().unwrap_or_default();
    let storage = &mirror.spec.proxy.storage;
    let capacity = storage
        .empty_dir
        .as_ref()
        .map(|e| &e.size_limit.0)
        .or(storage.persistent_volume_claim.as_ref().map(|p| &p.size.0))
        .and_then(|q| quantity_bytes(q))
        .unwrap_or(0);
    let mut args = vec![
        "cache-keeper".to_string(),
        format!("--root={STORAGE_DIR}"),
        format!("--capacity-bytes={capacity}"),
        format!("--high-watermark={}", cache.high_watermark),
        format!("--low-watermark={}", cache.low_watermark),
        format!("--ttl={}", cache.ttl),
        format!("--events-addr=127.0.0.1:{EVENTS_PORT}"),
        format!("--listen-addr=0.0.0.0:{LISTEN_PORT}"),
        format!("--registry-debug=127.0.0.1:{METRICS_PORT}"),
    ];
    args.extend(pins_of(&cache.pins, mirror, upstream).into_iter().map(|p| format!("--pin={p}")));
    if let Some(prefetch) = &mirror.spec.prefetch {
        let images = pins_of(&prefetch.images, mirror, upstream);
        if !images.is_empty() {
            args.extend(images.into_iter().map(|i| format!("--prefetch={i}")));
            args.extend(prefetch.schedule.iter().map(|s| format!("--prefetch-schedule={s}")));
            args.extend(prefetch.platforms.iter().map(|p| format!("--prefetch-platform={p}")));
            let user = mirror.spec.client_auth.as_ref().and_then(|a| a.node_user.as_ref());
            args.extend(user.map(|u| format!("--prefetch-user={u}")));
        }
    }
    args
}

/// The prefetch user's password (the users Secret, key = `clientAuth.nodeUser`), for keepers that
/// prefetch through a registry with client auth.
fn prefetch_env(mirror: &RegistryMirror, upstream: &Upstream) -> Option<Vec<EnvVar>> {
    let prefetch = mirror.spec.prefetch.as_ref()?;
    if pins_of(&prefetch.images, mirror, upstream).is_empty() {
        return None;
    }
    let auth = mirror.spec.client_auth.as_ref()?;
    let user = auth.node_user.as_ref()?;
    Some(vec![EnvVar {
        name: "MIRRORFLEET_PREFETCH_PASSWORD".into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: auth.users_secret_ref.name.clone(),
                key: user.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }])
}

/// The references of `refs` that name `upstream`'s registry, as its proxy names them.
pub fn pins_of(refs: &[String], mirror: &RegistryMirror, upstream: &Upstream) -> Vec<String> {
    refs.iter()
        .filter_map(|p| ImageRef::parse(p).ok())
        .filter(|r| r.upstream(&mirror.spec).is_some_and(|u| u.name == upstream.name))
        .map(|r| r.in_proxy())
        .collect()
}

/// `/healthz` of the keeper: it answers once it listens (a pod whose keeper is not up does not
/// serve: its cache would grow unwatched).
fn health_probe(initial: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::String(PORT_NAME.into()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(initial),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        timeout_seconds: Some(3),
        ..Default::default()
    }
}

/// The keeper container: the operator's image, the cache volume, restricted like the registry
/// (same uid, so it may delete what the registry wrote).
pub fn keeper_container(
    mirror: &RegistryMirror,
    upstream: &Upstream,
    settings: &Settings,
    cache_mount: &VolumeMount,
) -> Container {
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(settings.operator_image.clone()),
        args: Some(keeper_args(mirror, upstream)),
        env: prefetch_env(mirror, upstream),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.into()),
            container_port: LISTEN_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(health_probe(2, 10)),
        liveness_probe: Some(health_probe(5, 20)),
        resources: Some(pod::resources(None, KEEPER_REQUESTS)),
        security_context: Some(pod::restricted_container_security()),
        volume_mounts: Some(vec![cache_mount.clone()]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(extra: &str) -> RegistryMirror {
        serde_yaml::from_str(&format!(
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: m, namespace: n}}\nspec:\n\
             \x20 upstreams:\n\
             \x20 - {{name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}}\n\
             \x20 - {{name: ghcr, registry: ghcr.io, remoteURL: \"https://ghcr.io\"}}\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn each_keeper_gets_its_upstreams_pins_and_prefetch_and_the_password_only_by_secret_reference() {
        let m = mirror(
            "  clientAuth: {usersSecretRef: {name: users}, nodeUser: nodes}\n\
             \x20 cache: {pins: [docker.io/nginx:1.27]}\n\
             \x20 prefetch: {images: [docker.io/library/alpine:3.20, ghcr.io/org/app:v1], schedule: \"0 4 * * *\"}\n",
        );
        let settings = Settings::default();
        let mount = VolumeMount { name: "cache".into(), mount_path: STORAGE_DIR.into(), ..Default::default() };
        let hub = keeper_container(&m, &m.spec.upstreams[0], &settings, &mount);
        let args = hub.args.unwrap();
        for want in [
            "--pin=library/nginx:1.27",
            "--prefetch=library/alpine:3.20",
            "--prefetch-schedule=0 4 * * *",
            "--prefetch-user=nodes",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
        }
        assert!(!args.iter().any(|a| a.contains("org/app")), "ghcr's image in docker.io's keeper: {args:?}");
        let env = hub.env.unwrap();
        let secret = env[0].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((env[0].value.as_ref(), secret.name.as_str(), secret.key.as_str()), (None, "users", "nodes"));
        // Without prefetch images for it, a keeper needs no password.
        let plain = mirror("  prefetch: {images: [ghcr.io/org/app:v1]}\n");
        assert_eq!(keeper_container(&plain, &plain.spec.upstreams[0], &settings, &mount).env, None);
    }

    #[test]
    fn quantities_read_as_the_kubelet_reads_them() {
        assert_eq!(quantity_bytes("20Gi"), Some(20 << 30));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(quantity_bytes("1e9"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("12345"), Some(12345));
        assert_eq!(quantity_bytes("20GB"), None);
    }
}
