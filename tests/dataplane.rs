//! Tier 2: the rendered configs run in the real components on 127.0.0.1.
//!
//! - each generated registry `config.yml` starts the real Distribution registry, which answers
//!   `/v2/` (401 without credentials when client auth is on, 200 with the operator's bcrypt
//!   htpasswd), serves the probe path and metrics, and proxies the upstream;
//! - the generated Envoy bootstrap + LDS + CDS pass real Envoy's validation and, run for real,
//!   redirect HTTP to HTTPS, route HTTPS by Host to the right upstream's backend and reload a
//!   changed LDS from the ConfigMap directory without a restart;
//! - each generated hosts.toml is accepted by real containerd, and the pull reaches the mirror
//!   (asserted in the mirror's access log, not on ctr's exit code).
//!
//! Only addresses and paths are changed for a local run (pod ports and mount paths do not exist
//! on a test host); every other byte is what `mirrorfleet render` produced.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mirrorfleet::build::node::{hosts_toml, NodeConfig, NODE_CONFIG_KEY};
use mirrorfleet::render::{render_str, RenderOptions, Rendered};
use support::*;

const LOG_WAIT: Duration = Duration::from_secs(10);

fn render(yaml: &str, endpoints: &[(&str, String)]) -> Rendered {
    let opts = RenderOptions {
        namespace: "mirrors".into(),
        endpoints: endpoints.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        ..RenderOptions::default()
    };
    let mut all = render_str(yaml, &opts).unwrap_or_else(|e| panic!("render failed: {e}"));
    assert_eq!(all.len(), 1);
    all.remove(0)
}

fn secret_value(r: &Rendered, name: &str, key: &str) -> String {
    let s =
        r.fleet.children.secrets.iter().find(|s| s.metadata.name.as_deref() == Some(name)).expect("secret rendered");
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

fn users_secret() -> &'static str {
    "apiVersion: v1\nkind: Secret\nmetadata: {name: users, namespace: mirrors}\nstringData: {ci: ci-password, nodes: nodes-password}\n---\n"
}

/// A mirror with two upstreams whose remote is the local `upstream` registry.
fn mirror_yaml(upstream_url: &str, extra: &str) -> String {
    format!(
        "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: dp, namespace: mirrors}}\nspec:\n  upstreams:\n  \
         - {{name: dockerhub, registry: docker.io, remoteURL: \"{upstream_url}\"}}\n  \
         - {{name: ghcr, registry: ghcr.io, remoteURL: \"{upstream_url}\"}}\n{extra}"
    )
}

#[test]
fn generated_registry_configs_run_in_real_distribution_with_client_auth() {
    if !tools_available(&["docker-registry", "umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let upstream = Upstream::start();
    let image = build_test_image(tmp.path(), "cached", 1, 8 * 1024);
    upstream.push(&image, "v1");

    let yaml = format!(
        "{}{}",
        users_secret(),
        mirror_yaml(
            &upstream.url(),
            "  clientAuth: {usersSecretRef: {name: users}, nodeUser: nodes}\n  nodeConfig: {}\n"
        )
    );
    let r = render(&yaml, &[]);
    // The htpasswd file is the operator's own bcrypt output, not one made by a reference tool.
    let htpasswd = tmp.path().join("htpasswd");
    fs::write(&htpasswd, secret_value(&r, "dp-htpasswd", "htpasswd")).unwrap();

    let deployment = &r.fleet.children.deployments[0];
    let probe = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
        .readiness_probe
        .clone()
        .unwrap()
        .http_get
        .unwrap();
    let probe_path = probe.path.unwrap();
    let probe_on_debug_port = match probe.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => name == "metrics",
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port) => port == 5001,
    };

    for upstream_name in ["dockerhub", "ghcr"] {
        let config = &r.fleet.files[&format!("proxy/{upstream_name}/config.yml")];
        let local = patch_registry_config(config, &free_addr(), &tmp.path().join(upstream_name), Some(&htpasswd));
        let proxy = Registry::start(&local);

        let anonymous = http_get(proxy.addr(), "/v2/", &[]);
        assert_eq!(anonymous.status, 401, "{upstream_name}: /v2/ without credentials");
        let challenge = anonymous.header("www-authenticate").unwrap_or_default().to_string();
        assert!(challenge.contains("Basic realm=\"mirrorfleet dp\""), "{challenge}");
        for (user, password) in [("ci", "ci-password"), ("nodes", "nodes-password")] {
            let ok = http_get(proxy.addr(), "/v2/", &[("Authorization", &basic_auth(user, password))]);
            assert_eq!(ok.status, 200, "{upstream_name}: /v2/ as {user}");
        }
        let wrong = http_get(proxy.addr(), "/v2/", &[("Authorization", &basic_auth("ci", "nodes-password"))]);
        assert_eq!(wrong.status, 401, "{upstream_name}: wrong password");

        // The pods' probe answers without credentials (kubelet has none), on the port it names.
        let probe_addr = if probe_on_debug_port { proxy.debug_addr().unwrap() } else { proxy.addr() };
        assert_eq!(http_get(probe_addr, &probe_path, &[]).status, 200, "probe {probe_path} on {probe_addr}");
        // Prometheus metrics on the debug port the Service exposes as `metrics`.
        let metrics = http_get(proxy.debug_addr().expect("debug addr"), "/metrics", &[]);
        assert_eq!(metrics.status, 200);
        assert!(metrics.text().contains("registry_http_requests_total"));

        // Pull-through: the proxy fetches the manifest from its remoteURL.
        let manifest = http_get(
            proxy.addr(),
            "/v2/library/cached/manifests/v1",
            &[
                ("Authorization", &basic_auth("ci", "ci-password")),
                ("Accept", "application/vnd.oci.image.manifest.v1+json"),
            ],
        );
        assert_eq!(manifest.status, 200, "{upstream_name}: manifest via proxy: {}", manifest.text());
        assert!(upstream.wait_log("/v2/library/cached/manifests/v1", LOG_WAIT));
    }
}

#[test]
fn generated_registry_config_without_client_auth_is_open() {
    if !tools_available(&["docker-registry"]) {
        return;
    }
    let tmp = tempdir();
    let upstream = Upstream::start();
    let r = render(&mirror_yaml(&upstream.url(), ""), &[]);
    let config = &r.fleet.files["proxy/dockerhub/config.yml"];
    let proxy = Registry::start(&patch_registry_config(config, &free_addr(), tmp.path(), None));
    assert_eq!(http_get(proxy.addr(), "/v2/", &[]).status, 200);
    assert!(proxy.log().contains("Registry configured as a proxy cache"), "{}", proxy.log());
}

/// Maps the pod's listen ports and the proxies' Service names to local ones.
struct EnvoyLocal {
    ports: BTreeMap<u64, u16>,
    backends: BTreeMap<String, String>,
}

impl EnvoyLocal {
    fn rewrite(&self, yaml: &str) -> String {
        fn walk(v: &mut serde_yaml::Value, me: &EnvoyLocal) {
            match v {
                serde_yaml::Value::Mapping(map) => {
                    if let Some(serde_yaml::Value::Mapping(sa)) = map.get_mut("socket_address") {
                        let addr = sa.get("address").and_then(|a| a.as_str()).unwrap_or_default().to_string();
                        let port = sa.get("port_value").and_then(|p| p.as_u64()).unwrap_or_default();
                        if let Some(backend) = me.backends.get(&addr) {
                            let (host, p) = backend.rsplit_once(':').unwrap();
                            sa.insert("address".into(), host.into());
                            sa.insert("port_value".into(), p.parse::<u64>().unwrap().into());
                        } else if let Some(local) = me.ports.get(&port) {
                            assert!(addr == "0.0.0.0" || addr == "127.0.0.1", "unexpected listen address {addr}");
                            sa.insert("address".into(), "127.0.0.1".into());
                            sa.insert("port_value".into(), (*local as u64).into());
                        } else {
                            panic!("socket address {addr}:{port} is neither a known port nor a proxy Service");
                        }
                    }
                    map.values_mut().for_each(|v| walk(v, me));
                }
                serde_yaml::Value::Sequence(items) => items.iter_mut().for_each(|v| walk(v, me)),
                _ => {}
            }
        }
        let mut doc: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        walk(&mut doc, self);
        serde_yaml::to_string(&doc).unwrap()
    }
}

fn curl_status(curl: &Path, url: &str, resolve: &str, cacert: &Path) -> (u16, String) {
    let out = run(
        Command::new(curl)
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--resolve", resolve, "--cacert"])
            .arg(cacert)
            .arg(url),
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut parts = text.split_whitespace();
    let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("curl: {}", describe_output(&out)));
    (code, parts.next().unwrap_or_default().to_string())
}

#[test]
fn generated_envoy_config_validates_routes_by_host_and_reloads() {
    if !tools_available(&["envoy", "docker-registry", "openssl", "curl"]) {
        return;
    }
    let curl = tool("curl").unwrap();
    let tmp = tempdir();
    let (hub_backend, ghcr_backend, quay_backend) = (Upstream::start(), Upstream::start(), Upstream::start());
    let spec_with = |ghcr_host: Option<&str>, quay: bool| {
        let ghcr = match ghcr_host {
            Some(h) => format!(", host: {h}"),
            None => String::new(),
        };
        let quay = if quay { "- {name: quay, registry: quay.io, remoteURL: \"https://quay.io\"}\n  " } else { "" };
        format!(
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: dp, namespace: mirrors}}\nspec:\n  \
             upstreams:\n  - {{name: dockerhub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}}\n  \
             - {{name: ghcr, registry: ghcr.io, remoteURL: \"https://ghcr.io\"{ghcr}}}\n  {quay}\
             edge: {{domain: mirror.test, tlsSecretRef: {{name: tls}}}}\n"
        )
    };
    let spec = |ghcr_host: Option<&str>| spec_with(ghcr_host, false);
    let r = render(&spec(None), &[]);
    let (bootstrap, lds, cds) =
        (&r.fleet.files["edge/envoy.yaml"], &r.fleet.files["edge/lds.yaml"], &r.fleet.files["edge/cds.yaml"]);

    let (admin, admin_proxy, http, https) = (free_port(), free_port(), free_port(), free_port());
    let local = EnvoyLocal {
        ports: BTreeMap::from([(9901, admin), (9902, admin_proxy), (8080, http), (8443, https)]),
        backends: BTreeMap::from([
            ("dp-proxy-dockerhub.mirrors.svc.cluster.local".to_string(), hub_backend.addr().to_string()),
            ("dp-proxy-ghcr.mirrors.svc.cluster.local".to_string(), ghcr_backend.addr().to_string()),
            ("dp-proxy-quay.mirrors.svc.cluster.local".to_string(), quay_backend.addr().to_string()),
        ]),
    };
    let tls_dir = tmp.path().join("tls");
    fs::create_dir_all(&tls_dir).unwrap();
    let (crt, _key) = self_signed_cert(
        &tls_dir,
        &["dockerhub.mirror.test", "ghcr.mirror.test", "hub2.mirror.test", "quay.mirror.test"],
    );
    let config_dir = tmp.path().join("config");
    let localize = |yaml: &str| {
        let y = local.rewrite(yaml);
        let y = rewrite_path_prefix(&y, "/etc/envoy/config", &config_dir);
        rewrite_path_prefix(&y, "/etc/envoy/tls", &tls_dir)
    };
    let (bootstrap, lds, cds) = (localize(bootstrap), localize(lds), localize(cds));

    // Validation mode does not read path-based xDS: fold LDS/CDS in to have them checked too.
    let folded = tmp.path().join("folded.yaml");
    fs::write(&folded, fold_dynamic_into_static(&bootstrap, &lds, &cds)).unwrap();
    Envoy::validate(&folded).unwrap_or_else(|e| panic!("envoy --mode validate rejected the rendered config: {e}"));

    // Run for real from the ConfigMap-style directory, as the pod does.
    let mut cm =
        ConfigMapDir::create(&config_dir, &[("envoy.yaml", &bootstrap), ("lds.yaml", &lds), ("cds.yaml", &cds)]);
    let envoy = Envoy::start(&config_dir, "envoy.yaml");
    let pid = envoy.pid();
    assert!(envoy.listeners().contains("https::"), "{}", envoy.listeners());

    // Plain HTTP redirects to HTTPS.
    let redirect = http_get(format!("127.0.0.1:{http}"), "/v2/", &[("Host", "dockerhub.mirror.test")]);
    assert_eq!(redirect.status, 301);
    assert_eq!(redirect.header("location"), Some("https://dockerhub.mirror.test/v2/"));

    // HTTPS routes by Host: each upstream's requests reach its own backend only.
    let url = |host: &str, path: &str| format!("https://{host}:{https}{path}");
    let resolve = |host: &str| format!("{host}:{https}:127.0.0.1");
    let (code, version) = curl_status(
        &curl,
        &url("dockerhub.mirror.test", "/v2/hub-only/tags/list"),
        &resolve("dockerhub.mirror.test"),
        &crt,
    );
    assert_eq!(code, 404, "the backend registry answers (no such repository)");
    assert_eq!(version, "2", "ALPN negotiates HTTP/2 on the edge");
    assert!(hub_backend.wait_log("hub-only", LOG_WAIT));
    let (code, _) =
        curl_status(&curl, &url("ghcr.mirror.test", "/v2/ghcr-only/tags/list"), &resolve("ghcr.mirror.test"), &crt);
    assert_eq!(code, 404);
    assert!(ghcr_backend.wait_log("ghcr-only", LOG_WAIT));
    assert!(!hub_backend.log().contains("ghcr-only") && !ghcr_backend.log().contains("hub-only"));
    let (code, _) = curl_status(&curl, &url("hub2.mirror.test", "/v2/"), &resolve("hub2.mirror.test"), &crt);
    assert_eq!(code, 404, "unknown host gets the catch-all 404");
    assert_eq!(http_get(format!("127.0.0.1:{admin_proxy}"), "/ready", &[]).status, 200, "readiness via admin proxy");
    assert_eq!(http_get(format!("127.0.0.1:{admin_proxy}"), "/quitquitquit", &[]).status, 404, "admin not exposed");

    // A changed host reaches Envoy through the watched directory: no restart.
    let changed = render(&spec(Some("hub2.mirror.test")), &[]);
    assert_eq!(changed.fleet.files["edge/envoy.yaml"], r.fleet.files["edge/envoy.yaml"], "bootstrap unchanged");
    let lds_ok = envoy.stat("listener_manager.lds.update_success").unwrap();
    cm.update(&[
        ("envoy.yaml", &bootstrap),
        ("lds.yaml", &localize(&changed.fleet.files["edge/lds.yaml"])),
        ("cds.yaml", &localize(&changed.fleet.files["edge/cds.yaml"])),
    ]);
    assert!(envoy.wait_stat_at_least("listener_manager.lds.update_success", lds_ok + 1, LOG_WAIT));
    let served = wait_until(LOG_WAIT, || {
        let (code, _) =
            curl_status(&curl, &url("hub2.mirror.test", "/v2/moved/tags/list"), &resolve("hub2.mirror.test"), &crt);
        (code == 404 && ghcr_backend.log().contains("moved")).then_some(())
    });
    assert!(served.is_some(), "the new host routes to ghcr's backend after the reload");

    // An added upstream whose route (lds.yaml) reaches Envoy before its cluster (cds.yaml), as
    // happens on a real node where the kubelet swaps both files at once and Envoy reads them in
    // either order: the listener must not be rejected for the unknown cluster, or the new host
    // stays unrouted until some later change (seen on a real node, tests/e2e_node.rs).
    let added = render(&spec_with(Some("hub2.mirror.test"), true), &[]);
    let (lds_added, cds_added) =
        (localize(&added.fleet.files["edge/lds.yaml"]), localize(&added.fleet.files["edge/cds.yaml"]));
    let lds_ok = envoy.stat("listener_manager.lds.update_success").unwrap();
    let cds_before = localize(&changed.fleet.files["edge/cds.yaml"]);
    cm.update(&[("envoy.yaml", &bootstrap), ("lds.yaml", &lds_added), ("cds.yaml", &cds_before)]);
    assert!(
        envoy.wait_stat_at_least("listener_manager.lds.update_success", lds_ok + 1, LOG_WAIT),
        "the listener naming a cluster Envoy does not have yet was rejected:\n{}",
        envoy.log()
    );
    cm.update(&[("envoy.yaml", &bootstrap), ("lds.yaml", &lds_added), ("cds.yaml", &cds_added)]);
    let served = wait_until(LOG_WAIT, || {
        let (code, _) =
            curl_status(&curl, &url("quay.mirror.test", "/v2/added/tags/list"), &resolve("quay.mirror.test"), &crt);
        (code == 404 && quay_backend.log().contains("added")).then_some(())
    });
    assert!(served.is_some(), "the added upstream's host routes to its backend once its cluster arrives");
    assert_eq!(envoy.pid(), pid, "Envoy was not restarted");
}

fn node_config(r: &Rendered) -> NodeConfig {
    let cm = r
        .fleet
        .children
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("dp-node-config"))
        .expect("node config map");
    serde_json::from_str(&cm.data.as_ref().unwrap()[NODE_CONFIG_KEY]).unwrap()
}

/// Pulls `docker.io/library/<image>:v1` with the rendered hosts.toml and returns the mirror's log.
fn pull_through(node_extra: &str, client_auth: bool) {
    let tmp = tempdir();
    let name = if client_auth { "authpull" } else { "pull" };
    let upstream = Upstream::start();
    let image = build_test_image(tmp.path(), name, 2, 16 * 1024);
    upstream.push(&image, "v1");
    let auth = if client_auth { "  clientAuth: {usersSecretRef: {name: users}, nodeUser: nodes}\n" } else { "" };
    let yaml =
        format!("{}{}", users_secret(), mirror_yaml(&upstream.url(), &format!("{auth}  nodeConfig: {node_extra}\n")));

    // Render once to get the proxy config, start it, then render with its address as the endpoint
    // nodes use (the controller fills in the Service's cluster IP the same way).
    let first = render(&yaml, &[]);
    let htpasswd = tmp.path().join("htpasswd");
    if client_auth {
        fs::write(&htpasswd, secret_value(&first, "dp-htpasswd", "htpasswd")).unwrap();
    }
    let config = &first.fleet.files["proxy/dockerhub/config.yml"];
    let mirror = Registry::start(&patch_registry_config(
        config,
        &free_addr(),
        &tmp.path().join("cache"),
        client_auth.then_some(htpasswd.as_path()),
    ));
    let r = render(&yaml, &[("dockerhub", format!("http://{}", mirror.addr()))]);

    let hosts = tmp.path().join("certs.d");
    let file = if client_auth {
        // The agent adds the header from the node-auth Secret; do what it does.
        let cfg = node_config(&r);
        let entry = cfg.registries.iter().find(|e| e.registry == "docker.io").unwrap();
        hosts_toml(&cfg.mirror, entry, Some(&secret_value(&r, "dp-node-auth", "authorization")))
    } else {
        r.fleet.files["nodes/containerd/certs.d/docker.io/hosts.toml"].clone()
    };
    write_hosts_toml(&hosts, "docker.io", &file);

    let containerd = Containerd::start();
    let image_ref = format!("docker.io/library/{name}:v1");
    let out = containerd.pull(&image_ref, &hosts, &[]);
    let manifest = format!("/v2/library/{name}/manifests/v1");
    assert!(
        wait_until(LOG_WAIT, || mirror
            .log()
            .lines()
            .any(|l| l.contains(&manifest) && l.contains("\" 200 "))
            .then_some(()))
        .is_some(),
        "the pull never reached the mirror with success\nhosts.toml:\n{file}\nctr: {}\nmirror log:\n{}",
        describe_output(&out),
        mirror.log()
    );
    assert!(out.status.success(), "ctr pull: {}", describe_output(&out));
    assert!(containerd.image_refs().contains(&image_ref));
    if client_auth {
        assert!(file.contains("Authorization"), "header written");
        assert!(
            !mirror.log().lines().any(|l| l.contains(&manifest) && l.contains("\" 401 ")),
            "no unauthenticated attempt"
        );
    }
}

#[test]
fn generated_hosts_toml_sends_containerd_pulls_to_the_mirror() {
    if !Containerd::available() || !tools_available(&["docker-registry", "umoci", "skopeo"]) {
        return;
    }
    pull_through("{fallbackToUpstream: true}", false);
}

#[test]
fn generated_mirror_only_hosts_toml_is_honoured_by_containerd() {
    if !Containerd::available() || !tools_available(&["docker-registry", "umoci", "skopeo"]) {
        return;
    }
    pull_through("{fallbackToUpstream: false}", false);
}

#[test]
fn hosts_toml_with_the_node_auth_header_pulls_through_client_auth() {
    if !Containerd::available() || !tools_available(&["docker-registry", "umoci", "skopeo"]) {
        return;
    }
    pull_through("{fallbackToUpstream: true}", true);
}
