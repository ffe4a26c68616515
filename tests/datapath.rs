//! Tier 2, issue 5: the data path end to end, from rendered config.
//!
//! A credentials-required upstream (Distribution with `auth: token` and a Bearer-token service),
//! the rendered registry proxies (pull-through, upstream credentials from the Deployment's
//! `secretKeyRef` env, the operator's bcrypt htpasswd) and the rendered Envoy edge (TLS from a
//! test CA, Host routing for two upstreams). Clients: skopeo (registries.conf mirror + auth file)
//! and containerd (`ctr` with the node agent's hosts.toml: edge host, Authorization header).
//!
//! Every claim is checked where it happens: on the proxies' and the upstreams' access logs, the
//! token service's request log and the tap that counts upstream bytes — never on a client's exit
//! status alone (containerd and skopeo fall back to other hosts and name one failure of many).

mod support;

use std::fs;
use std::time::{Duration, Instant};

use support::datapath::fleet::{count_access, CI_USER, HUB_CREDS};
use support::datapath::{Fleet, FleetOptions, TapMode};
use support::*;

const LOG_WAIT: Duration = Duration::from_secs(10);

fn image(fleet: &Fleet, upstream: &str, name: &str, layers: usize, bytes: usize) -> String {
    let layout = build_test_image(fleet.dir(), name, layers, bytes);
    fleet.upstream(upstream).push(&layout, "v1");
    oci_manifest_digest(&layout)
}

fn pulled_digest(dest: &std::path::Path) -> String {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(dest.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_string()
}

/// Waits until the proxy's access log shows `path` answered with `status`.
fn wait_proxy(fleet: &Fleet, upstream: &str, path: &str, status: u16) -> bool {
    wait_until(LOG_WAIT, || (fleet.proxy_requests(upstream, path, status) > 0).then_some(())).is_some()
}

#[test]
fn pulls_through_tls_edge_and_proxy_with_both_auth_layers_and_serve_warm_pulls_from_cache() {
    if !support::datapath::fleet::available() {
        return;
    }
    let fleet = Fleet::start(FleetOptions::default());
    let digest = image(&fleet, "dockerhub", "dpimage", 3, 256 * 1024);
    let ghcr_digest = image(&fleet, "ghcr", "ghcrimage", 1, 64 * 1024);
    // The pushes used the upstream credentials; forget them so only the proxy's requests count.
    let pushes = fleet.upstream("dockerhub").token_server().requests().len();

    // Cold pull, skopeo, via docker.io -> dockerhub.mirror.test (TLS, Basic auth) -> proxy.
    let dest = fleet.dir().join("pull-1");
    let out = fleet.skopeo_pull("docker.io/library/dpimage:v1", CI_USER, &dest);
    assert!(out.status.success(), "cold pull through the edge: {}", describe_output(&out));
    assert_eq!(pulled_digest(&dest), digest, "the pulled image is the upstream's");
    assert!(
        wait_proxy(&fleet, "dockerhub", "/v2/library/dpimage/manifests/", 200),
        "{}",
        fleet.proxy("dockerhub").log()
    );
    assert!(fleet.envoy.log().contains("dockerhub.mirror.test"), "Envoy routed by Host: {}", fleet.envoy.log());
    assert!(!fleet.proxy("ghcr").log().contains("dpimage"), "Host routing sent docker.io pulls to ghcr's proxy");

    // Upstream side: credentials were required, and the proxy sent the ones from its Secret.
    let token_requests = fleet.upstream("dockerhub").token_server().requests();
    let proxy_tokens: Vec<_> = token_requests[pushes..].iter().collect();
    assert!(!proxy_tokens.is_empty(), "the proxy never asked the token service");
    for r in &proxy_tokens {
        assert_eq!(r.user.as_deref(), Some(HUB_CREDS.0), "token request without the upstream credentials: {r:?}");
        assert!(r.granted, "{r:?}");
    }
    // The proxy writes a blob to storage while streaming it, and Distribution 2.8 may fetch a
    // blob a second time for that (seen in CI: the last duplicate logged after the pull ended):
    // wait for those to land before counting what the cold pull fetched.
    std::thread::sleep(Duration::from_millis(1000));
    let cold_blob_gets = fleet.upstream_blob_gets("dockerhub");
    assert!(cold_blob_gets >= 4, "3 layers + config fetched upstream, got {cold_blob_gets} blob GETs");
    let cold_bytes = fleet.tap("dockerhub").bytes_from_upstream();
    assert!(cold_bytes > 3 * 256 * 1024, "cold pull moved only {cold_bytes} bytes from upstream");

    // Warm pull: served from the cache, no blob request upstream (the tag is still checked there).
    let dest2 = fleet.dir().join("pull-2");
    let out = fleet.skopeo_pull("docker.io/library/dpimage:v1", CI_USER, &dest2);
    assert!(out.status.success(), "warm pull: {}", describe_output(&out));
    assert_eq!(pulled_digest(&dest2), digest);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        fleet.upstream_blob_gets("dockerhub"),
        cold_blob_gets,
        "warm pull fetched blobs upstream:\n{}",
        fleet.upstream("dockerhub").log()
    );
    let warm_bytes = fleet.tap("dockerhub").bytes_from_upstream() - cold_bytes;
    assert!(warm_bytes < 64 * 1024, "warm pull moved {warm_bytes} bytes from upstream");
    eprintln!("cold pull: {cold_blob_gets} upstream blob GETs, {cold_bytes} B; warm pull: 0 blob GETs, {warm_bytes} B");

    // The second upstream, by its own Host, through its own proxy and credentials.
    let dest3 = fleet.dir().join("pull-ghcr");
    let out = fleet.skopeo_pull("ghcr.io/library/ghcrimage:v1", CI_USER, &dest3);
    assert!(out.status.success(), "ghcr pull: {}", describe_output(&out));
    assert_eq!(pulled_digest(&dest3), ghcr_digest);
    assert!(wait_proxy(&fleet, "ghcr", "/v2/library/ghcrimage/manifests/", 200));
    assert!(!fleet.proxy("dockerhub").log().contains("ghcrimage"));
    let ghcr_tokens = fleet.upstream("ghcr").token_server().requests();
    assert!(ghcr_tokens.iter().any(|r| r.user.as_deref() == Some("ghcr-user") && r.granted));

    // containerd, as a node pulls: the agent's hosts.toml (edge host + Authorization header).
    let containerd = Containerd::start();
    let out = fleet.ctr_pull(&containerd, "docker.io/library/dpimage:v1");
    assert!(
        out.status.success(),
        "ctr pull: {}\nhosts.toml:\n{}",
        describe_output(&out),
        fleet.node_hosts_toml("docker.io")
    );
    assert!(containerd.image_refs().contains(&"docker.io/library/dpimage:v1".to_string()));
    let ctr_lines: Vec<String> = fleet
        .proxy("dockerhub")
        .log()
        .lines()
        .filter(|l| l.contains("containerd/") && l.contains(" HTTP/1.1\""))
        .map(str::to_string)
        .collect();
    assert!(ctr_lines.iter().any(|l| l.contains("/manifests/") && l.contains("\" 200 ")), "{ctr_lines:#?}");
    assert!(!ctr_lines.iter().any(|l| l.contains("\" 401 ")), "the header is sent up front: {ctr_lines:#?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fleet.upstream_blob_gets("dockerhub"), cold_blob_gets, "containerd's pull was served from the cache");
}

#[test]
fn a_wrong_client_password_is_refused_with_401_by_the_proxy() {
    if !support::datapath::fleet::available() || !tools_available(&["curl"]) {
        return;
    }
    let fleet = Fleet::start(FleetOptions::default());
    image(&fleet, "dockerhub", "secretimage", 1, 16 * 1024);
    let upstream_before = fleet.upstream("dockerhub").token_server().requests().len();

    let dest = fleet.dir().join("pull");
    let out = fleet.skopeo_pull("docker.io/library/secretimage:v1", ("ci", "not-the-password"), &dest);
    assert!(!out.status.success(), "a wrong password pulled: {}", describe_output(&out));
    assert!(wait_proxy(&fleet, "dockerhub", "/v2/", 401), "{}", fleet.proxy("dockerhub").log());
    assert_eq!(fleet.proxy_requests("dockerhub", "secretimage", 200), 0, "nothing served to a wrong password");
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(stderr.contains("401") || stderr.contains("unauthorized"), "skopeo says why: {stderr}");

    // The 401 is the proxy's (Basic challenge with the mirror's realm) passed through Envoy.
    let curl = tool("curl").unwrap();
    let host = fleet.edge_host("dockerhub");
    let (name, port) = host.split_once(':').unwrap();
    let out = run(
        std::process::Command::new(curl)
            .args(["-sS", "-D", "-", "-o", "/dev/null", "--resolve", &format!("{name}:{port}:127.0.0.1")])
            .args(["-u", "ci:not-the-password", "--cacert"])
            .arg(&fleet.ca_cert)
            .arg(format!("https://{host}/v2/library/secretimage/manifests/v1")),
        Duration::from_secs(20),
    );
    let headers = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(headers.starts_with("http/2 401"), "{headers}");
    assert!(headers.contains("www-authenticate: basic realm=\"mirrorfleet dp\""), "{headers}");
    // No token was asked for on behalf of a refused client.
    assert_eq!(fleet.upstream("dockerhub").token_server().requests().len(), upstream_before);
    assert_eq!(count_access(&fleet.upstream("dockerhub").log(), "secretimage/manifests", 200), 0);
}

#[test]
fn upstream_down_cached_images_still_pull_and_uncached_fail_fast() {
    if !support::datapath::fleet::available() {
        return;
    }
    let mut fleet = Fleet::start(FleetOptions::default());
    let digest = image(&fleet, "dockerhub", "cachedimage", 2, 128 * 1024);
    image(&fleet, "dockerhub", "neverpulled", 1, 16 * 1024);
    let out = fleet.skopeo_pull("docker.io/library/cachedimage:v1", CI_USER, &fleet.dir().join("warmup"));
    assert!(out.status.success(), "warm-up pull: {}", describe_output(&out));
    let containerd = Containerd::start();
    std::thread::sleep(Duration::from_millis(500));

    fleet.upstream_mut("dockerhub").stop();
    // The cached tag keeps being served, to skopeo and to containerd.
    let dest = fleet.dir().join("offline");
    let out = fleet.skopeo_pull("docker.io/library/cachedimage:v1", CI_USER, &dest);
    assert!(out.status.success(), "cached pull with the upstream down: {}", describe_output(&out));
    assert_eq!(pulled_digest(&dest), digest);
    let out = fleet.ctr_pull(&containerd, "docker.io/library/cachedimage:v1");
    assert!(out.status.success(), "ctr cached pull with the upstream down: {}", describe_output(&out));

    // An uncached image: a clear error, quickly.
    let started = Instant::now();
    let out = fleet.skopeo_pull("docker.io/library/neverpulled:v1", CI_USER, &fleet.dir().join("uncached"));
    let took = started.elapsed();
    assert!(!out.status.success(), "an uncached image pulled with the upstream down");
    assert!(took < Duration::from_secs(30), "uncached pull took {took:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("uncached, upstream refused ({took:?}): {err}");
    assert!(wait_until(LOG_WAIT, || {
        fleet
            .proxy("dockerhub")
            .log()
            .lines()
            .any(|l| l.contains("neverpulled/manifests/v1") && !l.contains("\" 200 "))
            .then_some(())
    })
    .is_some());

    // The upstream comes back: the cached image is still served, now re-validated upstream.
    fleet.upstream_mut("dockerhub").restart();
    let out = fleet.skopeo_pull("docker.io/library/neverpulled:v1", CI_USER, &fleet.dir().join("back"));
    assert!(out.status.success(), "pull after the upstream returned: {}", describe_output(&out));
}

/// KNOWN LIMITATION, pinned so a fix shows up as a failing test: an upstream that accepts
/// connections but never answers (a stuck load balancer, a half-dead route) makes Distribution
/// 2.8 hang on tag resolution — its proxy asks the remote first and has no upstream timeout —
/// so even a *cached* tag hangs; a pull by digest is served from the cache at once. An upstream
/// that refuses connections is handled well (see the test above). The fix is an egress hop with
/// timeouts between proxy and remote: the upstream sidecar, which the operator renders when it
/// knows the upstream's challenge (`upstreams[].auth`, or a known public registry). This fleet's
/// upstreams set no `auth`, so they run without it; `tests/upstream_sidecar.rs` has the fix.
#[test]
fn known_limitation_a_blackholed_upstream_stalls_tag_pulls_but_not_digest_pulls() {
    if !support::datapath::fleet::available() {
        return;
    }
    let fleet = Fleet::start(FleetOptions::default());
    let digest = image(&fleet, "dockerhub", "stallimage", 1, 64 * 1024);
    let out = fleet.skopeo_pull("docker.io/library/stallimage:v1", CI_USER, &fleet.dir().join("warmup"));
    assert!(out.status.success(), "warm-up pull: {}", describe_output(&out));
    std::thread::sleep(Duration::from_millis(300));
    fleet.tap("dockerhub").set_mode(TapMode::Blackhole);

    let by_digest = format!("docker.io/library/stallimage@{digest}");
    let started = Instant::now();
    let out = fleet.skopeo_pull(&by_digest, CI_USER, &fleet.dir().join("digest"));
    assert!(out.status.success(), "cached pull by digest, upstream blackholed: {}", describe_output(&out));
    assert!(started.elapsed() < Duration::from_secs(10), "by digest took {:?}", started.elapsed());

    let bound = Duration::from_secs(8);
    let out = fleet.skopeo_pull_within("docker.io/library/stallimage:v1", CI_USER, &fleet.dir().join("tag"), bound);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TIMEOUT"),
        "a cached tag pull with a blackholed upstream no longer stalls (fixed? then assert it succeeds): {}",
        describe_output(&out)
    );
}
