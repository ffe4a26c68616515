//! The upstream sidecar: an Envoy in each proxy pod that is the registry's only way to its
//! upstream (`proxy.remoteurl: http://127.0.0.1:5080`), so every upstream wait has a bound and
//! the registry starts while the upstream is down.
//!
//! Why each part (measured in issue 12, Distribution 2.8.2 and 3.1.1):
//! * Distribution pings `remoteurl/v2/` at start and panics on a transport error; the answer it
//!   gets also decides, for the life of the process, which token realm receives the upstream
//!   credentials. Envoy answers that ping itself with the upstream's challenge, its realm moved
//!   to `http://127.0.0.1:5080/_token` (same host:port as the remote URL, which Distribution
//!   3.1 requires before it sends credentials), so the registry starts and authenticates
//!   whatever the upstream does at that moment.
//! * Distribution uses Go's default transport upstream (30 s dial, no response timeout) and
//!   falls back to its cache for a tag only once the upstream request failed. Envoy fails fast
//!   instead: 1 s connect timeout, 2 s for a manifest or tag exchange, an idle timeout for blob
//!   bodies, and an unhealthy or ejected host answers 503 in under a millisecond.
//! * Pulls by digest are served from storage first and never reach this hop.
//! * The pod's registry port (5000) is this Envoy too (the `front` listener; the registry listens
//!   on loopback behind it): Distribution answers a tag it could not look up and does not hold
//!   with `manifest unknown`, the same as for a name that does not exist. The front knows better:
//!   it reads this Envoy's upstream counters around each manifest request (`front.lua`) and
//!   answers such a pull with 503 (or 429) and why, and counts the pulls it served stale and
//!   the ones that failed (the operator's `servedStale` / `failedPulls`).
//!
//! The config is static (a bootstrap only), so a change rolls the pod like `config.yml` does.
//! No credential is in it: the registry sends its Basic credentials to `/_token` through Envoy.

use k8s_openapi::api::core::v1::{Container, ContainerPort, HTTPGetAction, Probe, VolumeMount};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use super::edge::{admin_proxy, router};
use super::meta::names;
use super::pod;
use crate::api::{RegistryMirror, Upstream, UpstreamAuth, UpstreamAuthType};

/// The registry's remote: the sidecar's listener, on loopback only.
pub const LISTEN_PORT: i32 = 5080;
/// The pod's registry port: the front listener, in front of the registry.
pub const FRONT_PORT: i32 = super::proxy::REGISTRY_PORT;
/// Where the registry itself listens behind the front (loopback only).
pub const REGISTRY_LOCAL_PORT: i32 = 5004;
/// Clusters the front's Lua counts with (one local request each; Envoy's cluster stats count).
pub const STALE_CLUSTER: &str = "served_stale";
pub const FAILED_CLUSTER: &str = "failed_pulls";
/// The front's script; `@NAME@` placeholders are filled in by [`front_script`].
const FRONT_LUA: &str = include_str!("front.lua");
/// The counters the front reads around a manifest request (`/stats?filter=`): lookup failures
/// of the `lookup` virtual cluster, and why, per upstream cluster.
const FRONT_STATS: &str = r"^(vhost\.upstream\.vcluster\.lookup\.upstream_rq_(timeout|429|5xx)|cluster\.(registry|realm)\.(membership_healthy|upstream_cx_connect_fail|upstream_cx_connect_timeout|upstream_cx_none_healthy|upstream_rq_pending_failure_eject|upstream_rq_timeout|upstream_rq_429|upstream_rq_5xx))$";
/// Envoy's admin interface, loopback only.
pub const ADMIN_PORT: i32 = 5081;
/// Serves only `/ready` and `/stats/prometheus` from the admin interface, for kubelet's probes.
pub const PROBE_PORT: i32 = 5082;
pub const CONFIG_FILE: &str = "envoy.yaml";
/// Where the registry's token requests go; Envoy forwards them to the real realm.
pub const TOKEN_PATH: &str = "/_token";
/// Whole manifest or tag-list exchange, and a token request. A tag lookup of a hanging upstream
/// can pay it twice: Distribution retries a failed HEAD with a GET, and the outlier ejection of
/// the first timeout may reach the worker after the GET (seen with 3.x: 2 x 3 s). Two of these
/// must stay well inside item 1's 5 s bound for a cached tag.
pub const LOOKUP_TIMEOUT: &str = "2s";
/// No byte either way for this long ends a blob transfer (no total bound: layers are large).
pub const BLOB_IDLE_TIMEOUT: &str = "15s";
pub const CONNECT_TIMEOUT: &str = "1s";
/// One health check of the upstream (`GET /v2/`).
pub const HEALTH_CHECK_TIMEOUT: &str = "2s";
/// The system CA bundle of the Envoy image.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The sidecar container's name.
pub const CONTAINER_NAME: &str = "upstream-envoy";
/// The Envoy clusters that lead upstream: the registry, and its token service when it has one.
pub const UPSTREAM_CLUSTERS: [&str; 2] = ["registry", "realm"];
/// The virtual cluster that counts manifest and tag-list requests apart from blobs (the
/// operator's `failedLookups`, [`crate::controller::upstreams`]).
pub const LOOKUP_VCLUSTER: &str = "lookup";
/// Manifests and tag lists: the requests a tag lookup makes (routes match paths without query).
const LOOKUP_PATH: &str = "^/v2/.+/(manifests/[^/]+|tags/list)$";
/// The `lookup` virtual cluster: those, and the token request a lookup may need first (a
/// virtual cluster matches `:path` with its query).
const LOOKUP_VCLUSTER_PATH: &str = "^(/v2/.+/(manifests/[^/?]+|tags/list)|/_token)([?].*)?$";
pub const SIDECAR_REQUESTS: pod::Requests = pod::Requests { cpu: "20m", memory: "32Mi" };

/// `http://127.0.0.1:5080`: what the registry's `proxy.remoteurl` becomes with a sidecar.
pub fn local_remote_url() -> String {
    format!("http://127.0.0.1:{LISTEN_PORT}")
}

/// Scheme, host and port, host header and path of an absolute http(s) URL (validated before).
struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
    /// `host` or `host:port` when the port is not the scheme's.
    authority: String,
    /// The path without a trailing slash ("" for none).
    path: String,
    ip: bool,
}

fn endpoint(raw: &str) -> Endpoint {
    let url = url::Url::parse(raw).expect("validated URL");
    let tls = url.scheme() == "https";
    let (host, ip) = match url.host() {
        Some(url::Host::Domain(d)) => (d.to_string(), false),
        Some(url::Host::Ipv4(a)) => (a.to_string(), true),
        Some(url::Host::Ipv6(a)) => (a.to_string(), true),
        None => panic!("validated URL has a host"),
    };
    let port = url.port_or_known_default().expect("http(s) has a default port");
    // `host_str` keeps an IPv6 literal's brackets, as a Host header needs them.
    let authority = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap()),
        None => url.host_str().unwrap().to_string(),
    };
    Endpoint { tls, host, port, authority, path: url.path().trim_end_matches('/').to_string(), ip }
}

/// The Envoy bootstrap of an upstream's sidecar.
pub fn sidecar_config(mirror: &RegistryMirror, upstream: &Upstream, auth: &UpstreamAuth) -> String {
    let registry = endpoint(&upstream.remote_url);
    let mut routes = vec![ping_route(auth)];
    let mut clusters = vec![cluster("registry", &registry, &format!("{}/v2/", registry.path))];
    if let (UpstreamAuthType::Bearer, Some(realm)) = (auth.type_, &auth.realm) {
        let realm = endpoint(realm);
        let path = if realm.path.is_empty() { "/".to_string() } else { realm.path.clone() };
        routes.push(json!({
            "match": {"prefix": TOKEN_PATH},
            "route": {
                "cluster": "realm",
                "prefix_rewrite": path,
                "host_rewrite_literal": realm.authority,
                "timeout": LOOKUP_TIMEOUT,
            },
        }));
        clusters.push(cluster("realm", &realm, &path));
    }
    let forward = |timeout: &str, idle: Option<&str>| {
        let mut route = json!({"cluster": "registry", "host_rewrite_literal": registry.authority, "timeout": timeout});
        if let Some(idle) = idle {
            route["idle_timeout"] = json!(idle);
        }
        if !registry.path.is_empty() {
            // The remote URL's path prefixes every request, as Distribution would send it.
            route["regex_rewrite"] =
                json!({"pattern": {"regex": "^(.*)$"}, "substitution": format!("{}\\1", registry.path)});
        }
        route
    };
    routes.push(json!({
        "match": {"safe_regex": {"regex": LOOKUP_PATH}},
        "route": forward(LOOKUP_TIMEOUT, None),
    }));
    routes.push(json!({"match": {"prefix": "/v2/"}, "route": forward("0s", Some(BLOB_IDLE_TIMEOUT))}));

    let (admin_listener, admin_cluster) = admin_proxy(ADMIN_PORT, PROBE_PORT);
    clusters.push(admin_cluster);
    let listener = json!({
        "name": "upstream",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": LISTEN_PORT}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "upstream",
                "stream_idle_timeout": BLOB_IDLE_TIMEOUT,
                "access_log": [{
                    "name": "envoy.access_loggers.stdout",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                        // Response flags say why a request failed (UH no healthy host, UF connect
                        // failure, UT timeout); the RateLimit header tells a 429 coming.
                        "log_format": {"text_format_source": {"inline_string":
                            "[%START_TIME%] %REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %DURATION%ms upstream=%UPSTREAM_CLUSTER% tf=%UPSTREAM_TRANSPORT_FAILURE_REASON% rl=%RESP(RATELIMIT-REMAINING)% rl_limit=%RESP(RATELIMIT-LIMIT)% retry_after=%RESP(RETRY-AFTER)%\n"}},
                    },
                }],
                "route_config": {"name": "upstream", "virtual_hosts": [{
                    "name": "upstream",
                    "domains": ["*"],
                    "routes": routes,
                    "virtual_clusters": [{
                        "name": LOOKUP_VCLUSTER,
                        "headers": [{"name": ":path", "string_match": {"safe_regex": {"regex": LOOKUP_VCLUSTER_PATH}}}],
                    }],
                }]},
                "http_filters": [router()],
            },
        }]}],
    });
    clusters.push(local_cluster("local_registry", REGISTRY_LOCAL_PORT));
    for counter in [STALE_CLUSTER, FAILED_CLUSTER] {
        clusters.push(local_cluster(counter, ADMIN_PORT));
    }
    let bootstrap = json!({
        "node": {"id": names::proxy(mirror, &upstream.name), "cluster": "upstream-sidecar"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}},
        "static_resources": {
            "listeners": [listener, front_listener(&registry.authority), admin_listener],
            "clusters": clusters,
        },
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            // Only the local registry connects.
            "overload": {"global_downstream_max_connections": 10000},
        }}]},
    });
    super::to_yaml(&bootstrap)
}

/// The front script with its placeholders filled in.
pub fn front_script(upstream_authority: &str) -> String {
    let stats_path =
        format!("/stats?filter={}", url::form_urlencoded::byte_serialize(FRONT_STATS.as_bytes()).collect::<String>());
    [
        ("@UPSTREAM@", upstream_authority),
        ("@STATS_PATH@", stats_path.as_str()),
        ("@ADMIN_CLUSTER@", "admin"),
        ("@STALE_CLUSTER@", STALE_CLUSTER),
        ("@FAILED_CLUSTER@", FAILED_CLUSTER),
        ("@CONNECT_TIMEOUT@", CONNECT_TIMEOUT),
        ("@LOOKUP_TIMEOUT@", LOOKUP_TIMEOUT),
    ]
    .into_iter()
    .fold(FRONT_LUA.to_string(), |script, (placeholder, value)| script.replace(placeholder, value))
}

/// The pod's registry port: everything goes on to the registry on loopback, unbounded in time
/// (layers are large; the registry's own upstream waits are bounded by the `upstream` listener),
/// through the front script (see the module doc).
fn front_listener(upstream_authority: &str) -> Value {
    json!({
        "name": "front",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": FRONT_PORT}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "front",
                // The registry's own Server header and Host reach the client and the registry.
                "server_header_transformation": "PASS_THROUGH",
                "route_config": {"name": "front", "virtual_hosts": [{
                    "name": "front",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "local_registry", "timeout": "0s"}}],
                }]},
                "http_filters": [
                    {
                        "name": "envoy.filters.http.lua",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                            "default_source_code": {"inline_string": front_script(upstream_authority)},
                        },
                    },
                    router(),
                ],
            },
        }]}],
    })
}

/// A cluster on loopback: the registry behind the front, or the admin interface (counting).
/// Every node's pulls of this upstream meet in this pod: Envoy's default circuit breakers
/// (1,024 requests) would answer 503 beyond them.
fn local_cluster(name: &str, port: i32) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": port},
        }}}]}]},
        "circuit_breakers": {"thresholds": [{
            "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000,
        }]},
    })
}

/// The registry's ping, answered here and never forwarded.
fn ping_route(auth: &UpstreamAuth) -> Value {
    let api_version = json!({"header": {"key": "Docker-Distribution-Api-Version", "value": "registry/2.0"}});
    match auth.type_ {
        UpstreamAuthType::Bearer => json!({
            "match": {"path": "/v2/"},
            "direct_response": {"status": 401, "body": {"inline_string": "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}"}},
            "response_headers_to_add": [
                {"header": {"key": "WWW-Authenticate", "value": format!(
                    "Bearer realm=\"{}{TOKEN_PATH}\",service=\"{}\"",
                    local_remote_url(),
                    auth.service.as_deref().unwrap_or_default(),
                )}},
                api_version,
            ],
        }),
        // No challenge: the registry pings again before each tag lookup, answered here in no time.
        UpstreamAuthType::None => json!({
            "match": {"path": "/v2/"},
            "direct_response": {"status": 200, "body": {"inline_string": "{}"}},
            "response_headers_to_add": [api_version],
        }),
    }
}

/// An upstream cluster: fail fast and know it early. Health checks (statuses 200-499 are alive,
/// so 401 and 429 keep the host and the registry falls back per request) and outlier ejection on
/// the first local timeout, reset or connect failure make a dead host answer 503 at once instead
/// of each request paying a timeout; no panic routing to an unhealthy host.
fn cluster(name: &str, e: &Endpoint, health_path: &str) -> Value {
    let mut cluster = json!({
        "name": name,
        "type": if e.ip { "STATIC" } else { "LOGICAL_DNS" },
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": e.host, "port_value": e.port},
        }}}]}]},
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "outlier_detection": {
            "consecutive_gateway_failure": 1,
            "enforcing_consecutive_gateway_failure": 100,
            "consecutive_5xx": 0,
            "enforcing_consecutive_5xx": 0,
            "interval": "1s",
            "base_ejection_time": "3s",
            "max_ejection_time": "10s",
            "max_ejection_percent": 100,
        },
        "health_checks": [{
            "timeout": HEALTH_CHECK_TIMEOUT,
            "interval": "3s",
            "no_traffic_interval": "3s",
            // A dead upstream is re-probed every second: its return is seen within ~1 s.
            "unhealthy_interval": "1s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "http_health_check": {"host": e.authority, "path": health_path, "expected_statuses": [{"start": 200, "end": 500}]},
        }],
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 10, "keepalive_interval": 3, "keepalive_probes": 3}},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "60s", "max_connection_duration": "600s"},
            // HTTP/1.1: on an h2 connection the HTTP health check failed (measured).
            "explicit_http_config": {"http_protocol_options": {}},
        }},
    });
    if e.ip {
        cluster.as_object_mut().unwrap().remove("dns_lookup_family");
    }
    if e.tls {
        let san = if e.ip {
            json!({"san_type": "IP_ADDRESS", "matcher": {"exact": e.host}})
        } else {
            json!({"san_type": "DNS", "matcher": {"exact": e.host}})
        };
        let mut tls = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["http/1.1"],
                "validation_context": {"trusted_ca": {"filename": CA_BUNDLE}, "match_typed_subject_alt_names": [san]},
            },
        });
        if !e.ip {
            tls["sni"] = json!(e.host);
        }
        cluster["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": tls});
    }
    cluster
}

/// The sidecar as a native sidecar (an init container that keeps running): kubelet starts the
/// registry only once Envoy's startup probe passed, so the registry's first ping finds it.
pub fn sidecar_container(image: &str, config_mount: &VolumeMount, tmp_mount: &VolumeMount) -> Container {
    let probe = |period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".into()),
            port: IntOrString::String("envoy-admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    };
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(image.to_string()),
        restart_policy: Some("Always".into()),
        command: Some(vec!["envoy".into()]),
        args: Some(vec![
            "-c".into(),
            format!("{}/{CONFIG_FILE}", config_mount.mount_path),
            "--log-level".into(),
            "warn".into(),
            // One worker: the local registry, and the front's pulls (one worker moves GB/s).
            "--concurrency".into(),
            "1".into(),
            // The access log reaches `kubectl logs` (and the operator, after a 429) within a
            // second instead of Envoy's default 10.
            "--file-flush-interval-msec".into(),
            "1000".into(),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: FRONT_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("envoy-admin".into()),
                container_port: PROBE_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        startup_probe: Some(probe(1, 30)),
        liveness_probe: Some(probe(10, 6)),
        resources: Some(pod::resources(None, SIDECAR_REQUESTS)),
        security_context: Some(pod::restricted_container_security()),
        volume_mounts: Some(vec![config_mount.clone(), tmp_mount.clone()]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{build, Inputs, Settings};
    use k8s_openapi::api::apps::v1::Deployment;

    fn mirror(upstream: &str, extra: &str) -> RegistryMirror {
        serde_yaml::from_str(&format!(
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: m, namespace: ns}}\n\
             spec:\n  upstreams: [{upstream}]\n{extra}"
        ))
        .unwrap()
    }

    fn envoy(m: &RegistryMirror) -> Value {
        let u = &m.spec.upstreams[0];
        serde_yaml::from_str(&sidecar_config(m, u, &u.effective_auth().expect("an upstream with a sidecar"))).unwrap()
    }

    fn routes(e: &Value) -> Vec<Value> {
        e["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
            ["virtual_hosts"][0]["routes"]
            .as_array()
            .unwrap()
            .clone()
    }

    fn cluster<'a>(e: &'a Value, name: &str) -> &'a Value {
        e["static_resources"]["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
    }

    fn deployment(m: &RegistryMirror) -> Deployment {
        build(m, &Inputs::default(), &Settings::default()).unwrap().children.deployments.remove(0)
    }

    const HUB: &str = "{name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}";

    #[test]
    fn docker_hub_gets_its_known_challenge_answered_locally_with_the_realm_moved_to_the_sidecar() {
        let e = envoy(&mirror(HUB, ""));
        let routes = routes(&e);
        let ping = &routes[0];
        assert_eq!(ping["match"]["path"], "/v2/");
        assert_eq!(ping["direct_response"]["status"], 401);
        let challenge = &ping["response_headers_to_add"][0]["header"];
        assert_eq!(challenge["key"], "WWW-Authenticate");
        assert_eq!(challenge["value"], "Bearer realm=\"http://127.0.0.1:5080/_token\",service=\"registry.docker.io\"");
        // /_token goes to the real realm, with its path, Host and a bound.
        let token = &routes[1];
        assert_eq!(token["match"]["prefix"], "/_token");
        assert_eq!(token["route"]["prefix_rewrite"], "/token");
        assert_eq!(token["route"]["host_rewrite_literal"], "auth.docker.io");
        assert_eq!(token["route"]["timeout"], LOOKUP_TIMEOUT);
        // Tag and manifest lookups have a total bound; blobs only an idle one.
        assert_eq!(routes[2]["route"]["timeout"], LOOKUP_TIMEOUT);
        assert!(routes[2]["match"]["safe_regex"]["regex"].as_str().unwrap().contains("manifests"));
        assert_eq!(routes[3]["match"]["prefix"], "/v2/");
        assert_eq!(routes[3]["route"]["timeout"], "0s");
        assert_eq!(routes[3]["route"]["idle_timeout"], BLOB_IDLE_TIMEOUT);
        for r in &routes[2..] {
            assert_eq!(r["route"]["host_rewrite_literal"], "registry-1.docker.io");
        }
        // Listens on loopback only; the probe listener serves only the admin's read-only paths.
        let listeners = e["static_resources"]["listeners"].as_array().unwrap();
        assert_eq!(listeners[0]["address"]["socket_address"]["address"], "127.0.0.1");
        assert_eq!(e["admin"]["address"]["socket_address"]["address"], "127.0.0.1");
        for name in ["registry", "realm"] {
            let c = cluster(&e, name);
            assert_eq!(c["type"], "LOGICAL_DNS");
            assert_eq!(c["connect_timeout"], CONNECT_TIMEOUT);
            assert_eq!(c["common_lb_config"]["healthy_panic_threshold"]["value"], 0);
            assert_eq!(c["outlier_detection"]["consecutive_gateway_failure"], 1);
            assert_eq!(c["health_checks"][0]["http_health_check"]["expected_statuses"][0]["end"], 500);
            let tls = &c["transport_socket"]["typed_config"];
            assert_eq!(tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"], CA_BUNDLE);
            assert_eq!(tls["common_tls_context"]["alpn_protocols"][0], "http/1.1");
        }
        let registry = cluster(&e, "registry");
        assert_eq!(
            registry["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                ["port_value"],
            443
        );
        assert_eq!(registry["transport_socket"]["typed_config"]["sni"], "registry-1.docker.io");
        assert_eq!(registry["health_checks"][0]["http_health_check"]["path"], "/v2/");
        assert_eq!(cluster(&e, "realm")["transport_socket"]["typed_config"]["sni"], "auth.docker.io");
        assert_eq!(cluster(&e, "realm")["health_checks"][0]["http_health_check"]["path"], "/token");
    }

    #[test]
    fn known_public_registries_and_explicit_auth_get_a_sidecar_unknown_ones_stay_direct() {
        for (remote, realm, service) in [
            ("https://ghcr.io", "https://ghcr.io/token", "ghcr.io"),
            ("https://quay.io", "https://quay.io/v2/auth", "quay.io"),
            ("https://registry-1.docker.io/", "https://auth.docker.io/token", "registry.docker.io"),
        ] {
            let m = mirror(&format!("{{name: u, registry: r.io, remoteURL: \"{remote}\"}}"), "");
            assert_eq!(m.spec.upstreams[0].effective_auth(), Some(UpstreamAuth::bearer(realm, service)), "{remote}");
        }
        let unknown = mirror("{name: u, registry: r.io, remoteURL: \"https://registry.corp\"}", "");
        assert_eq!(unknown.spec.upstreams[0].effective_auth(), None);
        let d = deployment(&unknown);
        assert!(d.spec.unwrap().template.spec.unwrap().init_containers.is_none());
        let files = build(&unknown, &Inputs::default(), &Settings::default()).unwrap().files;
        assert!(!files.contains_key("proxy/u/envoy.yaml"));
        assert!(files["proxy/u/config.yml"].contains("remoteurl: https://registry.corp"));

        // An IP literal on a port, plain HTTP, realm elsewhere: STATIC, no TLS, Host with the port.
        let m = mirror(
            "{name: u, registry: r.io, remoteURL: \"http://10.0.0.5:5000\", auth: {realm: \"http://10.0.0.6:8080/auth/token\", service: corp}}",
            "",
        );
        let e = envoy(&m);
        let registry = cluster(&e, "registry");
        assert_eq!(registry["type"], "STATIC");
        assert!(registry.get("transport_socket").is_none());
        assert_eq!(registry["health_checks"][0]["http_health_check"]["host"], "10.0.0.5:5000");
        assert_eq!(routes(&e)[1]["route"]["prefix_rewrite"], "/auth/token");
        assert_eq!(routes(&e)[1]["route"]["host_rewrite_literal"], "10.0.0.6:8080");
        let files = build(&m, &Inputs::default(), &Settings::default()).unwrap().files;
        assert!(files["proxy/u/config.yml"].contains("remoteurl: http://127.0.0.1:5080"));
        assert_eq!(
            files["proxy/u/envoy.yaml"],
            sidecar_config(&m, &m.spec.upstreams[0], &m.spec.upstreams[0].auth.clone().unwrap())
        );
    }

    #[test]
    fn an_upstream_without_auth_gets_a_200_ping_and_no_realm() {
        let e = envoy(&mirror(
            "{name: u, registry: r.io, remoteURL: \"https://registry.corp/mirror\", auth: {type: None}}",
            "",
        ));
        let routes = routes(&e);
        assert_eq!(routes[0]["direct_response"]["status"], 200);
        assert!(routes.iter().all(|r| r["match"]["prefix"] != "/_token"));
        assert!(e["static_resources"]["clusters"].as_array().unwrap().iter().all(|c| c["name"] != "realm"));
        // The remote URL's path prefixes what is forwarded, and the health check.
        assert_eq!(routes[1]["route"]["regex_rewrite"]["substitution"], "/mirror\\1");
        assert_eq!(cluster(&e, "registry")["health_checks"][0]["http_health_check"]["path"], "/mirror/v2/");
    }

    #[test]
    fn the_front_holds_the_registry_port_and_the_registry_moves_behind_it_on_loopback() {
        let m = mirror(HUB, "");
        let e = envoy(&m);
        let listeners = e["static_resources"]["listeners"].as_array().unwrap();
        let front = listeners.iter().find(|l| l["name"] == "front").unwrap();
        assert_eq!(front["address"]["socket_address"]["address"], "0.0.0.0");
        assert_eq!(front["address"]["socket_address"]["port_value"], FRONT_PORT);
        let manager = &front["filter_chains"][0]["filters"][0]["typed_config"];
        let route = &manager["route_config"]["virtual_hosts"][0]["routes"][0];
        assert_eq!(route["match"]["prefix"], "/");
        // No total bound in front of the registry: a layer takes as long as it takes.
        assert_eq!(route["route"], json!({"cluster": "local_registry", "timeout": "0s"}));
        let filters = manager["http_filters"].as_array().unwrap();
        assert_eq!(filters[0]["name"], "envoy.filters.http.lua");
        assert_eq!(filters.last().unwrap()["name"], "envoy.filters.http.router");
        let script = filters[0]["typed_config"]["default_source_code"]["inline_string"].as_str().unwrap();
        assert_eq!(script, front_script("registry-1.docker.io"));
        assert!(!script.contains("@UPSTREAM@") && !script.contains("@STATS_PATH@") && !script.contains("@ADMIN"));
        assert!(script.contains("local UPSTREAM = \"registry-1.docker.io\""));
        // The stats filter reaches Envoy's admin URL-encoded, and names what the script reads.
        let path = script.lines().find(|l| l.starts_with("local STATS")).unwrap();
        assert!(path.contains("/stats?filter=%5E%28vhost%5C.upstream%5C.vcluster%5C.lookup"), "{path}");
        for stat in ["upstream_cx_connect_timeout", "upstream_rq_429", "membership_healthy"] {
            assert!(path.contains(stat) && script.contains(stat), "{stat}");
        }
        let local = |name: &str| {
            cluster(&e, name)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]
                .clone()
        };
        assert_eq!(local("local_registry"), json!({"address": "127.0.0.1", "port_value": REGISTRY_LOCAL_PORT}));
        for counter in [STALE_CLUSTER, FAILED_CLUSTER] {
            assert_eq!(local(counter), json!({"address": "127.0.0.1", "port_value": ADMIN_PORT}));
            assert!(script.contains(&format!("count(handle, \"{counter}\")")), "{counter}");
        }
        assert_eq!(cluster(&e, "local_registry")["circuit_breakers"]["thresholds"][0]["max_requests"], 100000);

        // The registry listens on loopback behind the front; the pod's `http` port is the sidecar's.
        let fleet = build(&m, &Inputs::default(), &Settings::default()).unwrap();
        assert!(fleet.files["proxy/hub/config.yml"].contains(&format!("addr: 127.0.0.1:{REGISTRY_LOCAL_PORT}")));
        let d = deployment(&m);
        let pod = d.spec.unwrap().template.spec.unwrap();
        let ports = |c: &Container| {
            c.ports.iter().flatten().map(|p| (p.name.clone().unwrap(), p.container_port)).collect::<Vec<_>>()
        };
        assert_eq!(ports(&pod.containers[0]), [("metrics".to_string(), crate::build::proxy::METRICS_PORT)]);
        let sidecar = pod.init_containers.unwrap().into_iter().find(|c| c.name == CONTAINER_NAME).unwrap();
        assert_eq!(ports(&sidecar), [("http".to_string(), FRONT_PORT), ("envoy-admin".to_string(), PROBE_PORT)]);
        let service =
            &fleet.children.services.iter().find(|s| s.metadata.name.as_deref() == Some("m-proxy-hub")).unwrap();
        let http = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(http.target_port, Some(IntOrString::Int(FRONT_PORT)), "by number: named sidecar ports need 1.29");

        // Without a sidecar the registry holds the port itself.
        let unknown = mirror("{name: u, registry: r.io, remoteURL: \"https://registry.corp\"}", "");
        let files = build(&unknown, &Inputs::default(), &Settings::default()).unwrap().files;
        assert!(
            files["proxy/u/config.yml"].contains(":5000") && !files["proxy/u/config.yml"].contains("127.0.0.1:5004")
        );
        let d = deployment(&unknown);
        let registry = &d.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(ports(registry)[0], ("http".to_string(), FRONT_PORT));
    }

    #[test]
    fn the_sidecar_is_a_native_sidecar_after_the_cleanup_and_its_config_rolls_the_pod() {
        let m = mirror(HUB, "  edge: {domain: mirror.example.com, image: envoy.example/envoy:v9}\n  cleanup: {}\n");
        let d = deployment(&m);
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let init = pod.init_containers.as_ref().unwrap();
        assert_eq!(init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["cache-cleanup", "upstream-envoy"]);
        let sidecar = &init[1];
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert_eq!(sidecar.image.as_deref(), Some("envoy.example/envoy:v9"), "the edge's Envoy image");
        assert!(sidecar.startup_probe.is_some());
        assert_eq!(sidecar.security_context, Some(pod::restricted_container_security()));
        assert!(sidecar.resources.as_ref().unwrap().requests.is_some());
        assert!(sidecar.env.is_none(), "no credentials in the sidecar");
        assert_eq!(sidecar.args.as_ref().unwrap()[1], "/etc/mirrorfleet/registry/envoy.yaml");
        // Without an edge: the default Envoy image.
        let d = deployment(&mirror(HUB, ""));
        let init = d.spec.unwrap().template.spec.unwrap().init_containers.unwrap();
        assert_eq!(init[0].image, Some(crate::api::default_envoy_image()));

        // The ConfigMap carries both files; a sidecar-only change changes the checksum.
        let fleet = build(&m, &Inputs::default(), &Settings::default()).unwrap();
        let cm = fleet.children.config_maps.iter().find(|c| c.metadata.name.as_deref() == Some("m-proxy-hub")).unwrap();
        let data = cm.data.as_ref().unwrap();
        assert!(data.contains_key("config.yml") && data.contains_key(CONFIG_FILE));
        let checksum = |m: &RegistryMirror| {
            deployment(m).spec.unwrap().template.metadata.unwrap().annotations.unwrap()
                ["mirrorfleet.io/config-checksum"]
                .clone()
        };
        let other = mirror(
            "{name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\", auth: {realm: \"https://auth.docker.io/token\", service: other}}",
            "  edge: {domain: mirror.example.com, image: envoy.example/envoy:v9}\n  cleanup: {}\n",
        );
        assert_ne!(checksum(&m), checksum(&other));
    }

    #[test]
    fn no_credential_reaches_the_sidecar_config() {
        let m = mirror(
            "{name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\", credentialsSecretRef: {name: hub-creds}}",
            "",
        );
        let fleet = build(&m, &Inputs::default(), &Settings::default()).unwrap();
        let envoy = &fleet.files["proxy/hub/envoy.yaml"];
        assert!(!envoy.contains("hub-creds") && !envoy.to_lowercase().contains("password"));
        let registry =
            &fleet.children.deployments[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        assert!(registry.env.as_ref().unwrap().iter().any(|e| e.name == "REGISTRY_PROXY_PASSWORD"));
    }
}
