//! Per upstream: the Distribution registry config, its ConfigMap, the proxy Deployment, its
//! Service, and (for PVC storage) its PersistentVolumeClaim.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    Lifecycle, LifecycleHandler, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, Probe, SecretKeySelector, SecretVolumeSource, Service,
    ServicePort, ServiceSpec, SleepAction, TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::json;

use super::meta::{self, names, Component};
use super::{cleanup, keeper, pod, sidecar, Inputs, Settings};
use crate::api::{default_envoy_image, RegistryMirror, Upstream, ZONE_LABEL};

pub const REGISTRY_PORT: i32 = 5000;
pub const METRICS_PORT: i32 = 5001;
pub const CONFIG_DIR: &str = "/etc/mirrorfleet/registry";
pub const CONFIG_FILE: &str = "config.yml";
pub const STORAGE_DIR: &str = "/var/lib/registry";
pub const HTPASSWD_DIR: &str = "/auth";
pub const HTPASSWD_FILE: &str = "htpasswd";
/// How long a stopping registry keeps serving its open connections (`http.draintimeout`).
pub const DRAIN_SECONDS: i64 = 30;
/// How long a terminating proxy pod keeps accepting new connections before SIGTERM, while its
/// removal from the Service's endpoints reaches every node.
pub const PRE_STOP_SECONDS: i64 = 5;
/// Requests of the registry container (and its cleanup init container) without
/// `proxy.resources`.
pub const PROXY_REQUESTS: pod::Requests = pod::Requests { cpu: "100m", memory: "128Mi" };

/// The Distribution `config.yml` for one upstream's proxy. Secrets are not in it: upstream and
/// S3 credentials reach the registry as `REGISTRY_PROXY_*` / `REGISTRY_STORAGE_S3_*` env vars.
/// With an upstream sidecar (`sidecar`), the registry reaches its upstream only through it.
pub fn registry_config(mirror: &RegistryMirror, upstream: &Upstream, sidecar: bool) -> String {
    let spec = &mirror.spec;
    let storage = &spec.proxy.storage;
    let managed = keeper::managed(mirror);
    let mut storage_cfg = json!({"delete": {"enabled": true}});
    if !managed {
        // With a cache keeper, blobs leave the storage behind the registry's back: it must look
        // at the storage on every request, not at descriptors it remembers.
        storage_cfg["cache"] = json!({"blobdescriptor": "inmemory"});
    }
    if let Some(s3) = &storage.s3 {
        let root = match s3.root_directory.as_deref().map(|r| r.trim_matches('/')) {
            Some(r) if !r.is_empty() => format!("/{r}/{}", upstream.name),
            _ => format!("/{}/{}", mirror.name_any(), upstream.name),
        };
        let mut s3_cfg = json!({"region": s3.region, "bucket": s3.bucket, "rootdirectory": root});
        if let Some(endpoint) = &s3.endpoint {
            s3_cfg["regionendpoint"] = json!(endpoint);
            // Path-style requests (`ENDPOINT/BUCKET/KEY`): an S3-compatible service is reached
            // by its endpoint's own name (a Service, an IP), which has no `BUCKET.` subdomain.
            // 2.8 sends them whenever an endpoint is set; 3.x only with this key (default false:
            // `BUCKET.ENDPOINT`, which does not resolve).
            s3_cfg["forcepathstyle"] = json!(true);
        }
        storage_cfg["s3"] = s3_cfg;
        // Nodes and Envoy may not reach the bucket; serve blobs through the proxy itself.
        storage_cfg["redirect"] = json!({"disable": true});
    } else {
        storage_cfg["filesystem"] = json!({"rootdirectory": STORAGE_DIR});
    }
    let mut cfg = json!({
        "version": "0.1",
        "log": {
            "level": "info",
            "formatter": "text",
            "fields": {"service": "registry", "mirror": mirror.name_any(), "upstream": upstream.name},
        },
        "storage": null,
        "http": {
            // With a sidecar, its front listener holds the pod's registry port.
            "addr": if sidecar { format!("127.0.0.1:{}", sidecar::REGISTRY_LOCAL_PORT) } else { format!(":{REGISTRY_PORT}") },
            // On SIGTERM, finish the layer downloads in flight instead of cutting them (a
            // rollout or a cleanup replaces replicas); below terminationGracePeriodSeconds.
            "draintimeout": format!("{DRAIN_SECONDS}s"),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
            "debug": {
                "addr": format!(":{METRICS_PORT}"),
                "prometheus": {"enabled": true, "path": "/metrics"},
            },
        },
        "health": {"storagedriver": {"enabled": true, "interval": "10s", "threshold": 3}},
        "proxy": {
            "remoteurl": if sidecar { sidecar::local_remote_url() } else { upstream.remote_url.clone() },
            // With a keeper, expiry counts from the last pull (`cache.ttl`), not from the first
            // caching: 0 turns Distribution 3's own expiry off (2.8 ignores the key: 7 days).
            "ttl": if managed { "0s".to_string() } else { spec.proxy.ttl.clone() },
        },
    });
    if managed {
        cfg["notifications"] = keeper::notifications();
    }
    cfg["storage"] = storage_cfg; // moved in: `json!` would copy it
    if spec.client_auth.is_some() {
        cfg["auth"] = json!({"htpasswd": {
            "realm": format!("mirrorfleet {}", mirror.name_any()),
            "path": format!("{HTPASSWD_DIR}/{HTPASSWD_FILE}"),
        }});
    }
    super::to_yaml(&cfg)
}

/// The registry's `config.yml` and, with a sidecar, the sidecar's Envoy bootstrap.
pub fn proxy_config_map(
    mirror: &RegistryMirror,
    upstream: &Upstream,
    config: &str,
    sidecar: Option<&str>,
) -> ConfigMap {
    let mut data = BTreeMap::from([(CONFIG_FILE.to_string(), config.to_string())]);
    if let Some(envoy) = sidecar {
        data.insert(sidecar::CONFIG_FILE.to_string(), envoy.to_string());
    }
    ConfigMap {
        metadata: meta::object_meta(
            mirror,
            names::proxy(mirror, &upstream.name),
            Component::Proxy,
            Some(&upstream.name),
        ),
        data: Some(data),
        ..Default::default()
    }
}

pub fn proxy_service(mirror: &RegistryMirror, upstream: &Upstream, settings: &Settings) -> Service {
    // The registry port by number: it is the registry's, or the upstream sidecar's front (a
    // named port on a native sidecar resolves only from Kubernetes 1.29 on).
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(if port == REGISTRY_PORT {
            IntOrString::Int(port)
        } else {
            IntOrString::String(name.into())
        }),
        protocol: Some("TCP".into()),
        app_protocol: Some("http".into()),
        ..Default::default()
    };
    Service {
        metadata: meta::object_meta(
            mirror,
            names::proxy(mirror, &upstream.name),
            Component::Proxy,
            Some(&upstream.name),
        ),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(meta::selector_labels(mirror, Component::Proxy, Some(&upstream.name))),
            ports: Some(vec![port("http", REGISTRY_PORT), port("metrics", METRICS_PORT)]),
            traffic_distribution: traffic_distribution(mirror, settings),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn proxy_pvc(mirror: &RegistryMirror, upstream: &Upstream) -> Option<PersistentVolumeClaim> {
    let pvc = mirror.spec.proxy.storage.persistent_volume_claim.as_ref()?;
    Some(PersistentVolumeClaim {
        metadata: meta::object_meta(
            mirror,
            names::proxy(mirror, &upstream.name),
            Component::Proxy,
            Some(&upstream.name),
        ),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(pvc.access_modes.clone()),
            storage_class_name: pvc.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), pvc.size.clone())])),
                limits: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.into(), key: key.into(), optional: Some(false) }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn proxy_deployment(
    mirror: &RegistryMirror,
    upstream: &Upstream,
    config: &str,
    sidecar_config: Option<&str>,
    htpasswd: Option<&str>,
    inputs: &Inputs,
    settings: &Settings,
) -> Deployment {
    let spec = &mirror.spec;
    let name = names::proxy(mirror, &upstream.name);
    let selector = meta::selector_labels(mirror, Component::Proxy, Some(&upstream.name));

    // Distribution 3 exports OpenTelemetry traces to localhost:4318 unless told otherwise, and
    // logs a failed export every 5 s in a pod with no collector (seen on a real node); 2.8
    // ignores the variable.
    let mut env = vec![EnvVar { name: "OTEL_TRACES_EXPORTER".into(), value: Some("none".into()), value_from: None }];
    let mut secret_versions = Vec::new();
    if let Some(creds) = &upstream.credentials_secret_ref {
        env.push(secret_env("REGISTRY_PROXY_USERNAME", &creds.name, &creds.username_key));
        env.push(secret_env("REGISTRY_PROXY_PASSWORD", &creds.name, &creds.password_key));
        secret_versions.push(&creds.name);
    }
    if let Some(s3) = &spec.proxy.storage.s3 {
        if let Some(creds) = &s3.credentials_secret_ref {
            env.push(secret_env("REGISTRY_STORAGE_S3_ACCESSKEY", &creds.name, "accessKey"));
            env.push(secret_env("REGISTRY_STORAGE_S3_SECRETKEY", &creds.name, "secretKey"));
            secret_versions.push(&creds.name);
        }
    }

    let (mut volumes, mut mounts) = pod::config_and_tmp_volumes(&name, CONFIG_DIR);
    let (config_mount, tmp_mount) = (mounts[0].clone(), mounts[1].clone());
    let storage = &spec.proxy.storage;
    if let Some(e) = &storage.empty_dir {
        volumes.push(Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(e.size_limit.clone()), medium: None }),
            ..Default::default()
        });
    } else if storage.persistent_volume_claim.is_some() {
        volumes.push(Volume {
            name: "cache".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: name.clone(),
                read_only: None,
            }),
            ..Default::default()
        });
    }
    if storage.s3.is_none() {
        mounts.push(VolumeMount { name: "cache".into(), mount_path: STORAGE_DIR.into(), ..Default::default() });
    }
    if spec.client_auth.is_some() {
        volumes.push(Volume {
            name: "htpasswd".into(),
            secret: Some(SecretVolumeSource { secret_name: Some(names::htpasswd(mirror)), ..Default::default() }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "htpasswd".into(),
            mount_path: HTPASSWD_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }

    // Pods read their config at start, so any change to what they read must roll them.
    let mut checksummed = vec![config.as_bytes()];
    checksummed.extend(sidecar_config.map(str::as_bytes));
    let mut annotations =
        BTreeMap::from([("mirrorfleet.io/config-checksum".to_string(), meta::checksum(&checksummed))]);
    if let Some(h) = htpasswd {
        annotations.insert("mirrorfleet.io/htpasswd-checksum".into(), meta::checksum(&[h.as_bytes()]));
    }
    // Secret env vars are fixed at container start; the Secrets' resourceVersions (not their
    // contents) make a rotation roll the pods.
    let versions: Vec<String> = secret_versions
        .iter()
        .filter_map(|s| inputs.secret_versions.get(s.as_str()).map(|v| format!("{s}={v}")))
        .collect();
    if !versions.is_empty() {
        annotations.insert("mirrorfleet.io/secret-versions".into(), versions.join(","));
    }

    // Distribution serves its storage health check on the debug listener only (the main port
    // answers /debug/health with 404), and without authentication, which kubelet lacks.
    let probe = |initial: i32, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/debug/health".into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(initial),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Default::default()
    };
    // With a cleanup schedule, each new replica cleans its filesystem cache before serving
    // (see cleanup.rs; s3 is not cleaned).
    let mut init_containers = match (&spec.cleanup, mounts.iter().find(|m| m.mount_path == STORAGE_DIR)) {
        (Some(_), Some(cache)) => vec![cleanup::cleanup_init_container(mirror, settings, cache)],
        _ => Vec::new(),
    };
    // After the cleanup (which needs no upstream), before the registry (whose first act is a
    // ping of its remote, the sidecar).
    if sidecar_config.is_some() {
        let image = spec.edge.as_ref().map_or_else(default_envoy_image, |e| e.image.clone());
        init_containers.push(sidecar::sidecar_container(&image, &config_mount, &tmp_mount));
    }
    let keeper = match mounts.iter().find(|m| m.mount_path == STORAGE_DIR) {
        Some(cache) if keeper::managed(mirror) => Some(keeper::keeper_container(mirror, upstream, settings, cache)),
        _ => None,
    };
    let container = Container {
        name: "registry".into(),
        image: Some(spec.proxy.image.clone()),
        // The image's entrypoint runs `registry serve <file>` for a *.yml argument (2.x and 3.x).
        args: Some(vec![format!("{CONFIG_DIR}/{CONFIG_FILE}")]),
        env: (!env.is_empty()).then_some(env),
        // With a sidecar, the registry port is its front's (the registry is on loopback).
        ports: Some(
            [("http", REGISTRY_PORT), ("metrics", METRICS_PORT)]
                .into_iter()
                .filter(|(name, _)| sidecar_config.is_none() || *name != "http")
                .map(|(name, port)| ContainerPort {
                    name: Some(name.into()),
                    container_port: port,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: PRE_STOP_SECONDS }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        readiness_probe: Some(probe(2, 5, 3)),
        liveness_probe: Some(probe(10, 10, 6)),
        resources: Some(pod::resources(spec.proxy.resources.as_ref(), PROXY_REQUESTS)),
        security_context: Some(pod::restricted_container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };

    // A ReadWriteOnce claim cannot be mounted by the old and the new pod at once.
    let single_writer =
        storage.persistent_volume_claim.as_ref().is_some_and(|p| !p.access_modes.iter().any(|m| m == "ReadWriteMany"));
    let strategy = if single_writer {
        DeploymentStrategy { type_: Some("Recreate".into()), rolling_update: None }
    } else {
        // Never drop below the desired count: a pull in flight must find a ready proxy.
        DeploymentStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDeployment {
                max_surge: Some(IntOrString::Int(1)),
                max_unavailable: Some(IntOrString::Int(0)),
            }),
        }
    };

    Deployment {
        metadata: meta::object_meta(mirror, name, Component::Proxy, Some(&upstream.name)),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.proxy.replicas),
            selector: LabelSelector { match_labels: Some(selector.clone()), match_expressions: None },
            strategy: Some(strategy),
            revision_history_limit: Some(3),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(meta::labels(mirror, Component::Proxy, Some(&upstream.name))),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::proxy_service_account(mirror)),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod::restricted_pod_security()),
                    init_containers: (!init_containers.is_empty()).then_some(init_containers),
                    containers: std::iter::once(container).chain(keeper).collect(),
                    volumes: Some(volumes),
                    node_selector: (!spec.proxy.node_selector.is_empty()).then(|| spec.proxy.node_selector.clone()),
                    tolerations: (!spec.proxy.tolerations.is_empty()).then(|| spec.proxy.tolerations.clone()),
                    termination_grace_period_seconds: Some(60),
                    topology_spread_constraints: spread_over_zones(mirror, &selector),
                    affinity: Some(spread_over_nodes(selector)),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// With `zoneLocal`: replicas of one Deployment spread over zones, one at most ahead of another
/// (counted per rollout: `pod-template-hash`), as a preference (`ScheduleAnyway`): a cluster
/// with one zone, or nodes without the label, schedules as before.
pub fn spread_over_zones(
    mirror: &RegistryMirror,
    selector: &BTreeMap<String, String>,
) -> Option<Vec<TopologySpreadConstraint>> {
    mirror.spec.zone_local.then(|| {
        vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: ZONE_LABEL.into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector { match_labels: Some(selector.clone()), match_expressions: None }),
            match_label_keys: Some(vec!["pod-template-hash".into()]),
            ..Default::default()
        }]
    })
}

/// With `zoneLocal`, a Service's clients go to endpoints in their own zone when it has some.
pub fn traffic_distribution(mirror: &RegistryMirror, settings: &Settings) -> Option<String> {
    mirror.spec.zone_local.then(|| settings.same_zone_traffic.to_string())
}

/// Prefer replicas of one upstream on different nodes, so a node loss keeps the cache serving.
pub fn spread_over_nodes(selector: BTreeMap<String, String>) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector { match_labels: Some(selector), match_expressions: None }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                },
            }]),
            required_during_scheduling_ignored_during_execution: None,
        }),
        ..Default::default()
    }
}
