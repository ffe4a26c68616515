//! The Envoy edge: bootstrap, LDS and CDS files in one ConfigMap, the Deployment and the Service.
//!
//! Listeners and clusters are file-based xDS read from the mounted ConfigMap directory with a
//! `watched_directory`: the kubelet swaps the directory's `..data` symlink when the ConfigMap
//! changes and Envoy reloads them without a restart (so the Deployment carries no checksum of
//! them; only the bootstrap is hashed). Image layers are large, so nothing buffers bodies and
//! routes have no overall timeout, only an idle timeout.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, HTTPGetAction, PodSpec, PodTemplateSpec, Probe, SecretVolumeSource, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::{json, Map, Value};

use super::meta::{self, names, Component};
use super::proxy::{spread_over_nodes, spread_over_zones, traffic_distribution, REGISTRY_PORT};
use super::{pod, Inputs, Settings};
use crate::api::validate::effective_host;
use crate::api::{EdgeSpec, RegistryMirror};

pub const HTTP_PORT: i32 = 8080;
pub const HTTPS_PORT: i32 = 8443;
/// Serves only `/ready` and `/stats/prometheus` from the admin interface, which itself listens on
/// 127.0.0.1 so nothing outside the pod can reach its mutating endpoints.
pub const ADMIN_PROXY_PORT: i32 = 9902;
pub const ADMIN_PORT: i32 = 9901;
pub const CONFIG_DIR: &str = "/etc/envoy/config";
pub const TLS_DIR: &str = "/etc/envoy/tls";
pub const BOOTSTRAP_FILE: &str = "envoy.yaml";
pub const LDS_FILE: &str = "lds.yaml";
pub const CDS_FILE: &str = "cds.yaml";
/// Requests of the Envoy container without `edge.resources`.
pub const ENVOY_REQUESTS: pod::Requests = pod::Requests { cpu: "50m", memory: "64Mi" };

/// The three Envoy files, rendered once and shared by the ConfigMap, the Deployment's checksum
/// and `render -o`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyFiles {
    pub bootstrap: String,
    pub lds: String,
    pub cds: String,
}

fn yaml(v: &Value) -> String {
    super::to_yaml(v)
}

/// Where the edge finds a proxy: its Service's DNS name.
pub fn proxy_address(mirror: &RegistryMirror, upstream: &str, cluster_domain: &str) -> String {
    format!("{}.{}.svc.{cluster_domain}", names::proxy(mirror, upstream), mirror.namespace().unwrap_or_default())
}

pub fn envoy_files(mirror: &RegistryMirror, edge: &EdgeSpec, cluster_domain: &str) -> EnvoyFiles {
    EnvoyFiles {
        bootstrap: yaml(&envoy_bootstrap(mirror)),
        lds: yaml(&resources(envoy_listeners(mirror, edge))),
        cds: yaml(&resources(envoy_clusters(mirror, cluster_domain))),
    }
}

/// `{"resources": [...]}`, moving the list in (`json!` would copy every element).
fn resources(list: Vec<Value>) -> Value {
    Value::Object(Map::from_iter([("resources".to_string(), Value::Array(list))]))
}

/// `{"filters": [filter]}` plus `extra` entries, moving the filter in.
fn filter_chain(filter: Value, extra: Option<(&str, Value)>) -> Value {
    let mut chain = Map::from_iter([("filters".to_string(), Value::Array(vec![filter]))]);
    if let Some((key, value)) = extra {
        chain.insert(key.to_string(), value);
    }
    Value::Object(chain)
}

fn path_source(file: &str) -> Value {
    json!({
        "resource_api_version": "V3",
        "path_config_source": {
            "path": format!("{CONFIG_DIR}/{file}"),
            "watched_directory": {"path": CONFIG_DIR},
        },
    })
}

pub(crate) fn router() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
}

fn stdout_access_log() -> Value {
    json!([{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"},
    }])
}

/// A listener on all interfaces that serves only `/ready` and `/stats/prometheus` of the admin
/// interface (which listens on 127.0.0.1 so nothing outside the pod reaches its mutating
/// endpoints), and the cluster it forwards to.
pub(crate) fn admin_proxy(admin_port: i32, proxy_port: i32) -> (Value, Value) {
    let admin_route = |path: &str| json!({"match": {"path": path}, "route": {"cluster": "admin"}});
    let listener = json!({
        "name": "admin-proxy",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": proxy_port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "admin_proxy",
                "route_config": {"name": "admin-proxy", "virtual_hosts": [{
                    "name": "admin-proxy",
                    "domains": ["*"],
                    "routes": [admin_route("/ready"), admin_route("/stats/prometheus")],
                }]},
                "http_filters": [router()],
            },
        }]}],
    });
    let cluster = json!({
        "name": "admin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "admin", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": admin_port},
        }}}]}]},
    });
    (listener, cluster)
}

pub fn envoy_bootstrap(mirror: &RegistryMirror) -> Value {
    let (admin_listener, admin_cluster) = admin_proxy(ADMIN_PORT, ADMIN_PROXY_PORT);
    json!({
        "node": {"id": names::edge(mirror), "cluster": names::edge(mirror)},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}},
        "dynamic_resources": {"lds_config": path_source(LDS_FILE), "cds_config": path_source(CDS_FILE)},
        "static_resources": {"listeners": [admin_listener], "clusters": [admin_cluster]},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            // Registry clients keep few, long-lived connections; a generous global cap still
            // keeps a misbehaving client from exhausting the pod.
            "overload": {"global_downstream_max_connections": 50000},
        }}]},
    })
}

fn connection_manager(stat_prefix: &str, virtual_hosts: Vec<Value>) -> Value {
    let mut manager = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "use_remote_address": true,
            "normalize_path": true,
            "merge_slashes": true,
            "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
            // Layers take minutes on slow links: no whole-request deadline, only idleness.
            "request_timeout": "0s",
            "stream_idle_timeout": "300s",
            "common_http_protocol_options": {"idle_timeout": "3600s", "headers_with_underscores_action": "REJECT_REQUEST"},
            // Envoy reads lds.yaml and cds.yaml in no fixed order when the ConfigMap changes:
            // with the default validation an added upstream's route reaches it before its
            // cluster, the whole listener update is rejected ("unknown cluster") and never
            // retried, because the file does not change again (seen on a real node). Unvalidated,
            // the route answers 503 for the moment until the cluster is there.
            "route_config": {"name": stat_prefix, "validate_clusters": false, "virtual_hosts": null},
            "http_filters": [router()],
            "access_log": stdout_access_log(),
        },
    });
    // Moved in afterwards: `json!` would copy every virtual host.
    manager["typed_config"]["route_config"]["virtual_hosts"] = Value::Array(virtual_hosts);
    manager
}

/// One virtual host per upstream that forwards to its proxy, plus a catch-all 404.
fn mirror_virtual_hosts(mirror: &RegistryMirror, edge: &EdgeSpec) -> Vec<Value> {
    let mut hosts: Vec<Value> = mirror
        .spec
        .upstreams
        .iter()
        .map(|u| {
            let host = effective_host(u, edge);
            json!({
                "name": u.name,
                "domains": [host, format!("{host}:*")],
                "routes": [{
                    "match": {"prefix": "/"},
                    "route": {"cluster": u.name, "timeout": "0s", "idle_timeout": "300s"},
                }],
            })
        })
        .collect();
    hosts.push(json!({
        "name": "unknown-host",
        "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "no mirror is configured for this host\n"}}}],
    }));
    hosts
}

pub fn envoy_listeners(mirror: &RegistryMirror, edge: &EdgeSpec) -> Vec<Value> {
    let listener = |name: &str, port: i32, chain: Value| {
        let mut listener = json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": name,
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            // Flow control instead of buffering: a slow client slows its upstream read.
            "per_connection_buffer_limit_bytes": 1_048_576,
            "filter_chains": null,
        });
        listener["filter_chains"] = Value::Array(vec![chain]);
        listener
    };
    let http_hosts = if edge.redirects() {
        vec![json!({
            "name": "https-redirect",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "redirect": {"https_redirect": true}}],
        })]
    } else {
        mirror_virtual_hosts(mirror, edge)
    };
    let mut listeners = vec![listener("http", HTTP_PORT, filter_chain(connection_manager("http", http_hosts), None))];
    if edge.tls() {
        listeners.push(listener(
            "https",
            HTTPS_PORT,
            filter_chain(
                connection_manager("https", mirror_virtual_hosts(mirror, edge)),
                Some(("transport_socket", json!({
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "common_tls_context": {
                            "alpn_protocols": ["h2", "http/1.1"],
                            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                            "tls_certificates": [{
                                "certificate_chain": {"filename": format!("{TLS_DIR}/tls.crt")},
                                "private_key": {"filename": format!("{TLS_DIR}/tls.key")},
                            }],
                        },
                    },
                }))),
            ),
        ));
    }
    listeners
}

pub fn envoy_clusters(mirror: &RegistryMirror, cluster_domain: &str) -> Vec<Value> {
    mirror
        .spec
        .upstreams
        .iter()
        .map(|u| {
            json!({
                "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                "name": u.name,
                "type": "STRICT_DNS",
                "dns_lookup_family": "V4_PREFERRED",
                "connect_timeout": "5s",
                "per_connection_buffer_limit_bytes": 1_048_576,
                "load_assignment": {"cluster_name": u.name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": proxy_address(mirror, &u.name, cluster_domain), "port_value": REGISTRY_PORT},
                }}}]}]},
                "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 60}},
            })
        })
        .collect()
}

pub fn edge_config_map(mirror: &RegistryMirror, files: &EnvoyFiles) -> ConfigMap {
    ConfigMap {
        metadata: meta::object_meta(mirror, names::edge(mirror), Component::Edge, None),
        data: Some(BTreeMap::from([
            (BOOTSTRAP_FILE.to_string(), files.bootstrap.clone()),
            (LDS_FILE.to_string(), files.lds.clone()),
            (CDS_FILE.to_string(), files.cds.clone()),
        ])),
        ..Default::default()
    }
}

pub fn edge_deployment(mirror: &RegistryMirror, edge: &EdgeSpec, files: &EnvoyFiles, inputs: &Inputs) -> Deployment {
    let name = names::edge(mirror);
    let selector = meta::selector_labels(mirror, Component::Edge, None);
    let (mut volumes, mut mounts) = pod::config_and_tmp_volumes(&name, CONFIG_DIR);
    let mut ports = vec![
        ContainerPort {
            name: Some("http".into()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        },
        ContainerPort {
            name: Some("metrics".into()),
            container_port: ADMIN_PROXY_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        },
    ];
    if let Some(tls) = &edge.tls_secret_ref {
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource { secret_name: Some(tls.name.clone()), ..Default::default() }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        ports.push(ContainerPort {
            name: Some("https".into()),
            container_port: HTTPS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        });
    }
    let probe = Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(3),
        timeout_seconds: Some(2),
        ..Default::default()
    };
    let container = Container {
        name: "envoy".into(),
        image: Some(edge.image.clone()),
        command: Some(vec!["envoy".into()]),
        args: Some(vec![
            "-c".into(),
            format!("{CONFIG_DIR}/{BOOTSTRAP_FILE}"),
            "--log-level".into(),
            "info".into(),
            "--drain-time-s".into(),
            "30".into(),
        ]),
        ports: Some(ports),
        readiness_probe: Some(probe.clone()),
        liveness_probe: Some(Probe { initial_delay_seconds: Some(10), failure_threshold: Some(6), ..probe }),
        resources: Some(pod::resources(edge.resources.as_ref(), ENVOY_REQUESTS)),
        security_context: Some(pod::restricted_container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    // Listeners and clusters reload from the watched directory; only a bootstrap change restarts.
    let mut annotations = BTreeMap::from([(
        "mirrorfleet.io/bootstrap-checksum".to_string(),
        meta::checksum(&[files.bootstrap.as_bytes()]),
    )]);
    // Envoy reads the certificate files at start; a renewed certificate (the Secret's
    // resourceVersion, never its content) rolls the edge, one pod at a time.
    if let Some(version) = edge.tls_secret_ref.as_ref().and_then(|t| inputs.secret_versions.get(&t.name)) {
        let name = &edge.tls_secret_ref.as_ref().unwrap().name;
        annotations.insert("mirrorfleet.io/secret-versions".into(), format!("{name}={version}"));
    }
    Deployment {
        metadata: meta::object_meta(mirror, name, Component::Edge, None),
        spec: Some(DeploymentSpec {
            replicas: Some(edge.replicas),
            selector: LabelSelector { match_labels: Some(selector.clone()), match_expressions: None },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            revision_history_limit: Some(3),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(meta::labels(mirror, Component::Edge, None)),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::edge(mirror)),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod::restricted_pod_security()),
                    containers: vec![container],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(45),
                    node_selector: (!edge.node_selector.is_empty()).then(|| edge.node_selector.clone()),
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

pub fn edge_service(mirror: &RegistryMirror, edge: &EdgeSpec, settings: &Settings) -> Service {
    let port = |name: &str, port: i32, target: &str| ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(target.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut ports = vec![port("http", 80, "http")];
    if edge.tls() {
        ports.push(port("https", 443, "https"));
    }
    // No metrics port here: a LoadBalancer would publish it. Prometheus scrapes the pods'
    // `metrics` port (a PodMonitor) instead.
    let mut metadata = meta::object_meta(mirror, names::edge(mirror), Component::Edge, None);
    if !edge.service.annotations.is_empty() {
        metadata.annotations = Some(edge.service.annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(edge.service.type_.as_str().into()),
            selector: Some(meta::selector_labels(mirror, Component::Edge, None)),
            ports: Some(ports),
            traffic_distribution: traffic_distribution(mirror, settings),
            ..Default::default()
        }),
        ..Default::default()
    }
}
