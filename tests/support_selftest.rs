//! Self-test of tests/support: proves each tier-2 helper really starts,
//! talks to and cleans up its component, and pins down the component
//! behaviour the operator's rendered configs rely on (containerd hosts.toml
//! mirror semantics, Envoy file-based xDS reloads, registry proxy mode).
//!
//! Run: `nice cargo test --test support_selftest -- --test-threads=2`.
//! Tests SKIP (pass with a message) when a tool is missing, except under
//! `CI=true`, where a missing tool fails the test.

mod support;

use pretty_assertions::assert_eq;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

const LOG_WAIT: Duration = Duration::from_secs(10);

/// A registry config shaped like the operator's rendered ConfigMap
/// (tests/golden): container ports and mount paths, which
/// `patch_registry_config` must rewrite, plus the storage health check.
fn pod_registry_config(extra: &str) -> String {
    format!(
        "health:\n  storagedriver:\n    enabled: true\n    interval: 10s\n    threshold: 3\n\
         http:\n  addr: :5000\n  debug:\n    addr: :5001\n    prometheus:\n      enabled: true\n      path: /metrics\n\
         \x20 headers:\n    X-Content-Type-Options:\n    - nosniff\n\
         log:\n  fields:\n    service: registry\n  formatter: text\n  level: info\n\
         storage:\n  cache:\n    blobdescriptor: inmemory\n  delete:\n    enabled: true\n\
         \x20 filesystem:\n    rootdirectory: /var/lib/registry\n\
         version: '0.1'\n\
         {extra}"
    )
}

fn assert_success(what: &str, out: &std::process::Output) {
    assert!(out.status.success(), "{what} failed\n{}", describe_output(out));
}

#[test]
fn tool_finds_binaries_and_reports_missing_ones() {
    assert!(tool("sh").is_some(), "sh must be on PATH");
    let missing = std::panic::catch_unwind(|| tool("mirrorfleet-no-such-tool"));
    if in_ci() {
        let msg = *missing.expect_err("must panic in CI").downcast::<String>().unwrap();
        assert_eq!(msg, "mirrorfleet-no-such-tool is required in CI: install it in .ci/run");
    } else {
        assert_eq!(missing.expect("must not panic outside CI"), None);
    }
    // The pip envoy is not on PATH; tool() must still find it.
    if let Some(envoy) = tool("envoy") {
        let out = run(std::process::Command::new(envoy).arg("--version"), Duration::from_secs(20));
        assert_success("envoy --version", &out);
    }
}

#[test]
fn free_port_is_bindable_and_never_repeats() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut unique = ports.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ports.len());
    TcpListener::bind(("127.0.0.1", ports[0])).expect("free port must be bindable");
}

/// Serves one canned response per connection on a local port.
fn canned_server(responses: Vec<&'static str>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for (stream, resp) in listener.incoming().zip(responses) {
            let mut stream: TcpStream = stream.unwrap();
            let mut buf = [0u8; 4096];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            // Echo the Host header so the test can check it was sent.
            let req = String::from_utf8_lossy(&req);
            let host = req.lines().find_map(|l| l.strip_prefix("Host: ")).unwrap_or("").to_string();
            let resp = resp.replace("{host}", &host);
            stream.write_all(resp.as_bytes()).unwrap();
        }
    });
    addr
}

#[test]
fn http_client_parses_length_chunked_and_head_responses() {
    let addr = canned_server(vec![
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Host: {host}\r\n\r\nhello-ignored",
        "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n6;ext=1\r\npedia!\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
        "HTTP/1.0 503 Service Unavailable\r\n\r\nuntil eof",
    ]);
    let r = http_get(&addr, "/", &[("Host", "a.test")]);
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    assert_eq!(r.header("x-host"), Some("a.test"));
    let r = http_get(&addr, "/", &[]);
    assert_eq!((r.status, r.text().as_str()), (404, "wikipedia!"));
    let r = http_request("HEAD", &addr, "/", &[], &[]).unwrap();
    assert_eq!((r.status, r.body.len()), (200, 0));
    let r = wait_http(&addr, "/", Duration::from_secs(5)).unwrap();
    assert_eq!((r.status, r.text().as_str()), (503, "until eof"));

    assert_eq!(basic_auth("alice", "s3cret"), "Basic YWxpY2U6czNjcmV0");
    assert_eq!(basic_auth("a", "b"), "Basic YTpi");
    let refused = wait_http(format!("127.0.0.1:{}", free_port()), "/", Duration::from_millis(200));
    assert!(refused.is_err());
}

#[test]
fn registry_starts_and_answers_v2() {
    let Some(_) = tool("docker-registry") else {
        return;
    };
    let upstream = Upstream::start();
    let r = http_get(upstream.addr(), "/v2/", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Docker-Distribution-Api-Version"), Some("registry/2.0"));
    assert!(upstream.wait_log("\"GET /v2/ HTTP/1.1\" 200", LOG_WAIT), "{}", upstream.log());
}

#[test]
fn patch_registry_config_rewrites_only_local_addresses_and_paths() {
    let pod = pod_registry_config(
        "auth:\n  htpasswd:\n    realm: mirror\n    path: /auth/htpasswd\n\
         proxy:\n  remoteurl: https://registry-1.docker.io\n  ttl: 168h\n",
    );
    let patched =
        patch_registry_config(&pod, "127.0.0.1:1234", Path::new("/tmp/x/data"), Some(Path::new("/tmp/x/htpasswd")));
    let mut got: serde_yaml::Value = serde_yaml::from_str(&patched).unwrap();
    let debug = got["http"]["debug"]["addr"].as_str().unwrap().to_string();
    assert!(debug.starts_with("127.0.0.1:") && debug != "127.0.0.1:1234", "{debug}");

    // Undo exactly the four documented rewrites: what remains must equal
    // the input, proving nothing else was touched.
    got["http"]["addr"] = ":5000".into();
    got["http"]["debug"]["addr"] = ":5001".into();
    got["storage"]["filesystem"]["rootdirectory"] = "/var/lib/registry".into();
    got["auth"]["htpasswd"]["path"] = "/auth/htpasswd".into();
    let want: serde_yaml::Value = serde_yaml::from_str(&pod).unwrap();
    assert_eq!(got, want);

    // A config with auth but no local htpasswd would make 2.8 create one.
    let no_htpasswd =
        std::panic::catch_unwind(|| patch_registry_config(&pod, "127.0.0.1:1", Path::new("/tmp/x"), None));
    assert!(no_htpasswd.is_err());
}

#[test]
fn registry_htpasswd_auth_debug_metrics_and_authenticated_push() {
    if !tools_available(&["docker-registry", "htpasswd", "umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let htpasswd = tmp.path().join("htpasswd");
    write_htpasswd(&htpasswd, &[("alice", "s3cret"), ("bob", "hunter2")]);
    let config = patch_registry_config(
        &pod_registry_config("auth:\n  htpasswd:\n    realm: mirror\n    path: /auth/htpasswd\n"),
        &free_addr(),
        &tmp.path().join("data"),
        Some(&htpasswd),
    );
    let reg = Registry::start(&config);

    let anon = http_get(reg.addr(), "/v2/", &[]);
    assert_eq!(anon.status, 401);
    assert_eq!(anon.header("WWW-Authenticate"), Some("Basic realm=\"mirror\""));
    let auth = basic_auth("alice", "s3cret");
    assert_eq!(http_get(reg.addr(), "/v2/", &[("Authorization", &auth)]).status, 200);
    let wrong = basic_auth("bob", "wrong");
    assert_eq!(http_get(reg.addr(), "/v2/", &[("Authorization", &wrong)]).status, 401);

    // http.debug.prometheus works on 2.8 (on the debug listener only).
    let metrics = http_get(reg.debug_addr().unwrap(), "/metrics", &[]);
    assert_eq!(metrics.status, 200);
    assert!(metrics.text().contains("registry_http_requests_total"));

    let img = build_test_image(tmp.path(), "authpush", 1, 1024);
    push_image(&img, "v1", reg.addr(), Some(("bob", "hunter2")));
    let manifest = http_get(
        reg.addr(),
        "/v2/library/authpush/manifests/v1",
        &[("Authorization", &auth), ("Accept", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(manifest.status, 200);
    assert_eq!(manifest.header("Docker-Content-Digest"), Some(oci_manifest_digest(&img).as_str()));
    assert!(reg.wait_log("auth.user.name=bob", LOG_WAIT));
}

#[test]
fn test_image_is_deterministic_and_pushable() {
    if !tools_available(&["docker-registry", "umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let a = build_test_image(&tmp.path().join("one"), "determ", 2, 10_000);
    let b = build_test_image(&tmp.path().join("two"), "determ", 2, 10_000);
    let other = build_test_image(tmp.path(), "other", 2, 10_000);
    assert_eq!(oci_manifest_digest(&a), oci_manifest_digest(&b));
    assert_ne!(oci_manifest_digest(&a), oci_manifest_digest(&other));

    let upstream = Upstream::start();
    upstream.push(&a, "v1");
    upstream.push(&a, "v2");
    let r = http_get(
        upstream.addr(),
        "/v2/library/determ/manifests/v2",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Docker-Content-Digest"), Some(oci_manifest_digest(&a).as_str()));
    let manifest: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config = http_get(upstream.addr(), &format!("/v2/library/determ/blobs/{config_digest}"), &[]);
    let config: serde_json::Value = serde_json::from_slice(&config.body).unwrap();
    assert_eq!(config["os"], "linux");
    assert_eq!(config["created"], "2000-01-01T00:00:00Z");
}

#[test]
fn registry_proxy_mode_pulls_through_and_ignores_3x_ttl() {
    if !tools_available(&["docker-registry", "umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let upstream = Upstream::start();
    let img = build_test_image(tmp.path(), "proxied", 1, 2048);
    upstream.push(&img, "v1");
    // proxy.ttl is a 3.x key; 2.8 must start anyway (it ignores unknown
    // keys) with its fixed 7-day TTL.
    let proxy = Registry::start(&patch_registry_config(
        &pod_registry_config(&format!("proxy:\n  remoteurl: {}\n  ttl: 1h\n", upstream.url())),
        &free_addr(),
        &tmp.path().join("cache"),
        None,
    ));
    assert!(proxy.log().contains(&format!("Registry configured as a proxy cache to {}", upstream.url())));
    let accept = [("Accept", "application/vnd.oci.image.manifest.v1+json")];
    for _ in 0..2 {
        let r = http_get(proxy.addr(), "/v2/library/proxied/manifests/v1", &accept);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(upstream.wait_log("/v2/library/proxied/manifests/v1", LOG_WAIT));
    // Pushes are refused by a pull-through cache.
    let push = http_request("POST", proxy.addr(), "/v2/library/x/blobs/uploads/", &[], &[]);
    assert_eq!(push.unwrap().status, 405);
    let vars = proxy.debug_vars();
    assert!(vars["registry"]["proxy"]["manifests"]["Requests"].as_u64().unwrap() >= 2);
}

#[test]
fn registry_28_proxy_does_not_start_while_remote_is_unreachable() {
    let Some(_) = tool("docker-registry") else { return };
    let tmp = tempdir();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let config = patch_registry_config(
        &pod_registry_config(&format!("proxy:\n  remoteurl: {dead}\n")),
        &free_addr(),
        &tmp.path().join("cache"),
        None,
    );
    // 2.8 pings <remoteurl>/v2/ while building the app and panics on
    // failure: a mirror pod crash-loops while its upstream is unreachable.
    let err = std::panic::catch_unwind(|| Registry::start(&config)).err().expect("registry must not come up");
    let msg = err.downcast::<String>().unwrap();
    assert!(msg.contains("exited"), "{msg}");
    assert!(msg.contains(&format!("panic: Get \"{dead}/v2/\"")), "{msg}");
}

/// Distribution (2.8 and 3.x alike) registers proxy credentials only for
/// *Bearer* token realms found at startup; an upstream using plain Basic
/// auth never receives them. Private upstreams must therefore offer token
/// auth (Docker Hub, Harbor, GHCR, GitLab do).
#[test]
fn registry_proxy_sends_no_credentials_to_basic_auth_upstream() {
    if !tools_available(&["docker-registry", "htpasswd", "umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let htpasswd = tmp.path().join("htpasswd");
    write_htpasswd(&htpasswd, &[("puller", "pullpass")]);
    let upstream = Registry::start(&patch_registry_config(
        &pod_registry_config("auth:\n  htpasswd:\n    realm: upstream\n    path: /auth/htpasswd\n"),
        &free_addr(),
        &tmp.path().join("upstream"),
        Some(&htpasswd),
    ));
    let img = build_test_image(tmp.path(), "private", 1, 1024);
    push_image(&img, "v1", upstream.addr(), Some(("puller", "pullpass")));
    // As in the pod, credentials come from env, not from config.yml; the
    // log-level override proves the env reaches the process.
    let proxy = Registry::start_with_env(
        &patch_registry_config(
            &pod_registry_config(&format!("proxy:\n  remoteurl: {}\n", upstream.url())),
            &free_addr(),
            &tmp.path().join("cache"),
            None,
        ),
        &[
            ("REGISTRY_PROXY_USERNAME", "puller"),
            ("REGISTRY_PROXY_PASSWORD", "pullpass"),
            ("REGISTRY_LOG_LEVEL", "debug"),
        ],
    );
    assert!(proxy.log().contains("level=debug"));
    let r = http_get(
        proxy.addr(),
        "/v2/library/private/manifests/v1",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(upstream.wait_log("\"HEAD /v2/library/private/manifests/v1 HTTP/1.1\" 401", LOG_WAIT));
    // The only authenticated requests are skopeo's push, none from the proxy.
    let proxy_authenticated =
        upstream.log().lines().any(|l| l.contains("auth.user.name=puller") && l.contains("Go-http-client"));
    assert!(!proxy_authenticated, "{}", upstream.log());
}

fn docker_io_mirror_hosts_toml(mirror: &str, header: Option<&str>) -> String {
    let mut toml = format!(
        "server = \"https://registry-1.docker.io\"\n\n\
         [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    );
    if let Some(auth) = header {
        toml.push_str(&format!("\n  [host.\"http://{mirror}\".header]\n    Authorization = \"{auth}\"\n"));
    }
    toml
}

#[test]
fn containerd_pulls_docker_io_through_http_proxy_mirror() {
    if !Containerd::available() || !tools_available(&["docker-registry", "umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let upstream = Upstream::start();
    let img = build_test_image(tmp.path(), "pullthrough", 2, 32 * 1024);
    upstream.push(&img, "v1");
    let proxy = Registry::start(&patch_registry_config(
        &pod_registry_config(&format!("proxy:\n  remoteurl: {}\n", upstream.url())),
        &free_addr(),
        &tmp.path().join("cache"),
        None,
    ));
    let containerd = Containerd::start();
    let hosts = tmp.path().join("certs.d");
    write_hosts_toml(&hosts, "docker.io", &docker_io_mirror_hosts_toml(proxy.addr(), None));

    // No --plain-http: the http:// scheme of the host key is what matters.
    let out = containerd.pull("docker.io/library/pullthrough:v1", &hosts, &[]);

    // The mirror, not registry-1.docker.io, must have served the manifest;
    // ctr appends ?ns=<upstream registry> to mirror requests.
    assert!(
        proxy.wait_log("\"HEAD /v2/library/pullthrough/manifests/v1?ns=docker.io HTTP/1.1\" 200", LOG_WAIT),
        "manifest request never reached the proxy\nctr: {}\nproxy log:\n{}",
        describe_output(&out),
        proxy.log()
    );
    assert!(upstream.wait_log("/v2/library/pullthrough/manifests/v1", LOG_WAIT));
    assert_success("ctr pull", &out);
    assert!(containerd.image_refs().contains(&"docker.io/library/pullthrough:v1".to_string()));
}

#[test]
fn containerd_hosts_toml_header_authorizes_mirror() {
    if !Containerd::available() || !tools_available(&["docker-registry", "htpasswd", "umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let htpasswd = tmp.path().join("htpasswd");
    write_htpasswd(&htpasswd, &[("alice", "s3cret")]);
    let mirror = Registry::start(&patch_registry_config(
        &pod_registry_config("auth:\n  htpasswd:\n    realm: mirror\n    path: /auth/htpasswd\n"),
        &free_addr(),
        &tmp.path().join("data"),
        Some(&htpasswd),
    ));
    let img = build_test_image(tmp.path(), "private", 1, 4096);
    push_image(&img, "v1", mirror.addr(), Some(("alice", "s3cret")));
    let containerd = Containerd::start();
    let hosts = tmp.path().join("certs.d");
    let head = "\"HEAD /v2/library/private/manifests/v1?ns=docker.io HTTP/1.1\"";

    write_hosts_toml(&hosts, "docker.io", &docker_io_mirror_hosts_toml(mirror.addr(), None));
    let out = containerd.pull("docker.io/library/private:v1", &hosts, &[]);
    assert!(!out.status.success(), "pull without credentials must fail");
    assert!(mirror.wait_log(&format!("{head} 401"), LOG_WAIT), "{}", mirror.log());

    let auth = basic_auth("alice", "s3cret");
    write_hosts_toml(&hosts, "docker.io", &docker_io_mirror_hosts_toml(mirror.addr(), Some(&auth)));
    let out = containerd.pull("docker.io/library/private:v1", &hosts, &[]);
    assert!(mirror.wait_log(&format!("{head} 200"), LOG_WAIT), "{}", mirror.log());
    assert_success("ctr pull with header", &out);
}

/// Pins containerd 1.6 hosts.toml behaviour the renderer must respect.
#[test]
fn containerd_16_hosts_toml_quirks() {
    if !Containerd::available() || !tools_available(&["docker-registry", "umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let mirror = Upstream::start();
    let img = build_test_image(tmp.path(), "quirks", 1, 1024);
    mirror.push(&img, "v1");
    let containerd = Containerd::start();
    let hosts = tmp.path().join("certs.d");
    let image = "docker.io/library/quirks:v1";
    let manifest = "/v2/library/quirks/manifests/v1";
    let m = mirror.addr();

    // 1. A host key without scheme means https; neither --plain-http nor
    //    skip_verify downgrades it, so an http-only mirror is never used.
    write_hosts_toml(
        &hosts,
        "docker.io",
        &format!("[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"),
    );
    let out = containerd.pull(image, &hosts, &["--plain-http"]);
    assert!(!out.status.success());
    assert!(!mirror.log().contains("\"containerd/"), "{}", mirror.log());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("server gave HTTP response to HTTPS client"),
        "{}",
        describe_output(&out)
    );

    // 2. A file with no [host] table fails to decode ("invalid `host`
    //    tree", containerd#10027, logged only at error level) and the
    //    default endpoint registry-1.docker.io is used instead.
    write_hosts_toml(&hosts, "docker.io", &format!("server = \"http://{m}\"\n"));
    let out = containerd.pull(image, &hosts, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid `host` tree"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!mirror.log().contains("\"containerd/"), "{}", mirror.log());

    // 3. An empty [host] stub (the k3s workaround) makes `server` apply.
    write_hosts_toml(&hosts, "docker.io", &format!("server = \"http://{m}\"\n\n[host]\n"));
    let out = containerd.pull(image, &hosts, &[]);
    let served_to_containerd = wait_until(LOG_WAIT, || {
        let log = mirror.log();
        log.lines().any(|l| l.contains(&format!("\"HEAD {manifest}")) && l.contains("\"containerd/")).then_some(())
    });
    assert!(served_to_containerd.is_some(), "{}", mirror.log());
    assert_success("ctr pull via server + [host] stub", &out);
}

/// A listener routing by Host header (`<name>.test`) to clusters of the
/// same name, in the file-based DiscoveryResponse format.
fn lds_yaml(listener: &str, port: u16, vhosts: &[(&str, &str)]) -> String {
    let mut vh = String::new();
    for (i, (domain, cluster)) in vhosts.iter().enumerate() {
        // Clients may send "host:port"; "*" already matches everything.
        let domains = if *domain == "*" { "\"*\"".to_string() } else { format!("\"{domain}\", \"{domain}:*\"") };
        vh.push_str(&format!(
            "          - name: vh{i}\n            domains: [{domains}]\n            routes:\n            - match: {{ prefix: \"/\" }}\n              route: {{ cluster: {cluster} }}\n"
        ));
    }
    format!(
        r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: {listener}
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {port} }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: ingress
        route_config:
          name: local
          virtual_hosts:
{vh}        http_filters:
        - name: envoy.filters.http.router
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    )
}

fn cds_yaml(clusters: &[(&str, &str)], extra_field: &str) -> String {
    let mut out = String::from("resources:\n");
    for (name, addr) in clusters {
        let (host, port) = addr.split_once(':').unwrap();
        out.push_str(&format!(
            r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {name}
  type: STATIC
  connect_timeout: 1s{extra_field}
  load_assignment:
    cluster_name: {name}
    endpoints:
    - lb_endpoints:
      - endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {port} }} }} }}
"#
        ));
    }
    out
}

/// Bootstrap with admin on `admin_port` and LDS/CDS read from `cm_dir`,
/// reloaded when the directory sees a rename (ConfigMap `..data` swap).
fn bootstrap_yaml(admin_port: u16, cm_dir: &Path) -> String {
    let d = cm_dir.display();
    format!(
        "node: {{ id: selftest, cluster: selftest }}\n\
         admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}\n\
         dynamic_resources:\n\
         \x20 lds_config:\n    resource_api_version: V3\n    path_config_source:\n      path: {d}/lds.yaml\n      watched_directory: {{ path: {d} }}\n\
         \x20 cds_config:\n    resource_api_version: V3\n    path_config_source:\n      path: {d}/cds.yaml\n      watched_directory: {{ path: {d} }}\n"
    )
}

#[test]
fn envoy_validates_and_routes_by_host_header() {
    if !tools_available(&["envoy", "docker-registry"]) {
        return;
    }
    let tmp = tempdir();
    let (a, b) = (Upstream::start(), Upstream::start());
    let port = free_port();
    let lds = lds_yaml("ingress", port, &[("a.test", "backend_a"), ("b.test", "backend_b")]);
    let cds = cds_yaml(&[("backend_a", a.addr()), ("backend_b", b.addr())], "");
    let cm = ConfigMapDir::create(&tmp.path().join("xds"), &[("lds.yaml", &lds), ("cds.yaml", &cds)]);
    let bootstrap = bootstrap_yaml(free_port(), cm.path());
    fs::write(tmp.path().join("bootstrap.yaml"), &bootstrap).unwrap();

    Envoy::validate(&tmp.path().join("bootstrap.yaml")).unwrap();
    let folded = fold_dynamic_into_static(&bootstrap, &lds, &cds);
    let parsed: serde_yaml::Value = serde_yaml::from_str(&folded).unwrap();
    assert!(parsed.get("dynamic_resources").is_none(), "{folded}");
    let clusters = &parsed["static_resources"]["clusters"];
    assert_eq!(clusters[1]["name"].as_str(), Some("backend_b"));
    assert!(clusters[0].get("@type").is_none(), "{folded}");
    assert_eq!(parsed["static_resources"]["listeners"][0]["name"].as_str(), Some("ingress"));
    fs::write(tmp.path().join("folded.yaml"), &folded).unwrap();
    Envoy::validate(&tmp.path().join("folded.yaml")).unwrap();
    // Folding is what makes validate see the dynamic resources at all.
    let bad_cds = cds_yaml(&[("backend_a", a.addr())], "\n  no_such_field: 1");
    fs::write(tmp.path().join("bad.yaml"), fold_dynamic_into_static(&bootstrap, &lds, &bad_cds)).unwrap();
    let err = Envoy::validate(&tmp.path().join("bad.yaml")).unwrap_err();
    assert!(err.contains("no_such_field"), "{err}");

    let envoy = Envoy::start(tmp.path(), "bootstrap.yaml");
    assert!(envoy.listeners().contains(&format!("ingress::127.0.0.1:{port}")));
    let listener = format!("127.0.0.1:{port}");

    let r = http_get(&listener, "/v2/probe-one/tags/list", &[("Host", "a.test")]);
    assert_eq!(r.status, 404, "registry answers NAME_UNKNOWN: {}", r.text());
    assert!(a.wait_log("/v2/probe-one/tags/list", LOG_WAIT));
    let r = http_get(&listener, "/v2/probe-two/tags/list", &[("Host", "b.test:8080")]);
    assert_eq!(r.status, 404);
    assert!(b.wait_log("/v2/probe-two/tags/list", LOG_WAIT));
    // No virtual host matches: Envoy itself answers 404, nobody is called.
    let r = http_get(&listener, "/v2/probe-three/tags/list", &[("Host", "c.test")]);
    assert_eq!(r.status, 404);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!a.log().contains("probe-two") && !a.log().contains("probe-three"));
    assert!(!b.log().contains("probe-one") && !b.log().contains("probe-three"));
    assert!(envoy.stats().contains("cluster.backend_a.upstream_rq_total: 1"));
}

#[test]
fn envoy_reloads_configmap_symlink_swap_without_restart() {
    if !tools_available(&["envoy", "docker-registry"]) {
        return;
    }
    let tmp = tempdir();
    let (a, b) = (Upstream::start(), Upstream::start());
    let port = free_port();
    let listener = format!("127.0.0.1:{port}");
    let mut cm = ConfigMapDir::create(
        &tmp.path().join("xds"),
        &[
            ("lds.yaml", &lds_yaml("ingress-v1", port, &[("*", "backend")])),
            ("cds.yaml", &cds_yaml(&[("backend", a.addr())], "")),
        ],
    );
    fs::write(tmp.path().join("bootstrap.yaml"), bootstrap_yaml(free_port(), cm.path())).unwrap();
    let envoy = Envoy::start(tmp.path(), "bootstrap.yaml");
    let pid = envoy.pid();
    assert!(envoy.listeners().contains("ingress-v1::"));
    assert_eq!(http_get(&listener, "/v2/before-swap/tags/list", &[]).status, 404);
    assert!(a.wait_log("before-swap", LOG_WAIT));

    let lds_ok = envoy.stat("listener_manager.lds.update_success").unwrap();
    let cds_ok = envoy.stat("cluster_manager.cds.update_success").unwrap();
    let started = Instant::now();
    cm.update(&[
        ("lds.yaml", &lds_yaml("ingress-v2", port, &[("*", "backend")])),
        ("cds.yaml", &cds_yaml(&[("backend", b.addr())], "")),
    ]);
    let t = Duration::from_secs(10);
    assert!(envoy.wait_stat_at_least("cluster_manager.cds.update_success", cds_ok + 1, t));
    assert!(envoy.wait_stat_at_least("listener_manager.lds.update_success", lds_ok + 1, t));
    eprintln!("symlink swap applied after {:?}", started.elapsed());
    assert!(wait_until(t, || envoy.listeners().contains("ingress-v2::").then_some(())).is_some());
    assert_eq!(http_get(&listener, "/v2/after-swap/tags/list", &[]).status, 404);
    assert!(b.wait_log("after-swap", LOG_WAIT));
    assert!(!a.log().contains("after-swap"));

    // With --reject-unknown-dynamic-fields a typo is rejected and the last
    // good config keeps serving.
    cm.update(&[
        ("lds.yaml", &lds_yaml("ingress-v2", port, &[("*", "backend")])),
        ("cds.yaml", &cds_yaml(&[("backend", a.addr())], "\n  no_such_field: 1")),
    ]);
    assert!(envoy.wait_stat_at_least("cluster_manager.cds.update_rejected", 1, t));
    assert_eq!(http_get(&listener, "/v2/after-reject/tags/list", &[]).status, 404);
    assert!(b.wait_log("after-reject", LOG_WAIT));
    assert_eq!(envoy.pid(), pid, "must not restart");
}

#[test]
fn skopeo_inspect_uses_registries_conf_mirror() {
    if !tools_available(&["docker-registry", "umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let upstream = Upstream::start();
    let img = build_test_image(tmp.path(), "inspected", 1, 512);
    upstream.push(&img, "v1");
    let conf = tmp.path().join("registries.conf");
    fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"registry-1.docker.io\"\n\n\
             [[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
            upstream.addr()
        ),
    )
    .unwrap();
    // --no-tags: tag listing ignores mirrors and would hit docker.io.
    let out = skopeo_inspect("docker://docker.io/library/inspected:v1", &conf, &["--no-tags"]);
    assert_success("skopeo inspect", &out);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["Digest"], oci_manifest_digest(&img).as_str());
    assert!(upstream.wait_log("\"skopeo/", LOG_WAIT));
}

#[test]
fn processes_and_temp_dirs_are_cleaned_up_even_on_panic() {
    let Some(_) = tool("docker-registry") else {
        return;
    };
    let gone = |pid: u32, addr: &str, dir: &Path| {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} still exists");
        assert!(TcpStream::connect(addr).is_err(), "{addr} still accepts");
        assert!(!dir.exists(), "{} not removed", dir.display());
    };

    let reg = Upstream::start();
    let (pid, addr) = (reg.pid().unwrap(), reg.addr().to_string());
    let dir = reg.config_path().parent().unwrap().to_path_buf();
    drop(reg);
    gone(pid, &addr, &dir);

    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let reg = Upstream::start();
        let dir = reg.config_path().parent().unwrap().to_path_buf();
        *seen.lock().unwrap() = Some((reg.pid().unwrap(), reg.addr().to_string(), dir));
        panic!("deliberate panic with a live registry");
    }));
    assert!(result.is_err());
    let (pid, addr, dir) = seen.lock().unwrap().take().unwrap();
    gone(pid, &addr, &dir);
}

/// Rendered configs reference pod mount paths; validate mode needs them to
/// exist: `path_config_source.path` must exist even though validate does not
/// load it, and TLS key/cert files are read. Folding plus
/// `rewrite_path_prefix` plus `self_signed_cert` gets a rendered edge config
/// through `envoy --mode validate` on the test host.
#[test]
fn envoy_validate_of_pod_config_needs_local_paths() {
    if !tools_available(&["envoy", "openssl"]) {
        return;
    }
    let tmp = tempdir();
    let bootstrap = bootstrap_yaml(free_port(), Path::new("/etc/envoy/config"));
    fs::write(tmp.path().join("pod.yaml"), &bootstrap).unwrap();
    let err = Envoy::validate(&tmp.path().join("pod.yaml")).unwrap_err();
    assert!(err.contains("'/etc/envoy/config/cds.yaml' does not exist"), "{err}");

    let lds = format!(
        r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: https
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
  filter_chains:
  - transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
        common_tls_context:
          tls_certificates:
          - certificate_chain: {{ filename: /etc/envoy/tls/tls.crt }}
            private_key: {{ filename: /etc/envoy/tls/tls.key }}
    filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: tls
        cluster: backend
"#,
        port = free_port()
    );
    let cds = cds_yaml(&[("backend", "127.0.0.1:1")], "");
    let folded = fold_dynamic_into_static(&bootstrap, &lds, &cds);
    fs::write(tmp.path().join("folded.yaml"), &folded).unwrap();
    let err = Envoy::validate(&tmp.path().join("folded.yaml")).unwrap_err();
    assert!(err.contains("/etc/envoy/tls/tls."), "{err}");

    let tls = tmp.path().join("tls");
    fs::create_dir(&tls).unwrap();
    self_signed_cert(&tls, &["docker.mirror.test", "ghcr.mirror.test"]);
    let local = rewrite_path_prefix(&folded, "/etc/envoy/tls", &tls);
    assert!(local.contains(&format!("{}/tls.key", tls.display())));
    fs::write(tmp.path().join("local.yaml"), &local).unwrap();
    Envoy::validate(&tmp.path().join("local.yaml")).unwrap();
}
