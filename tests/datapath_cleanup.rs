//! Tier 2, issue 5: cache cleanup on real registry storage, as the rendered proxy pods do it.
//!
//! The cleanup Job (`mirrorfleet cleanup`) rolls each proxy Deployment with a cleanup request;
//! every new replica's `cache-cleanup` init container (`mirrorfleet cleanup-replica`, the
//! operator image) cleans its storage before the registry starts (see `src/build/cleanup.rs`).
//! These tests run that init container — the rendered args and env, with only the storage path
//! mapped to the test host — with this build's binary against the storage of a real
//! Distribution 2.8 proxy that cached real pulls through the TLS edge, check the result with
//! Distribution's own `garbage-collect --dry-run`, and replay the rollout steps the Deployment
//! controller would take while clients pull:
//!
//! - `garbageCollect` on a persistent claim (stopped registry, `Recreate`): after a tag moved
//!   upstream, the superseded manifest and its layers go and disk usage falls by at least their
//!   size; the registry's dry-run finds nothing left (no orphan blob, no untagged manifest);
//!   tagged images pull from the cache without upstream traffic; the collected image still
//!   pulls (re-fetched upstream); a cached multi-arch image keeps its platform manifest and
//!   layers (Distribution's own `--delete-untagged` would delete them: shown here too);
//! - `garbageCollect` on shared storage (ReadWriteMany) under a replica that keeps serving,
//!   while clients pull and a cold pull of another image is in flight: no request fails, the
//!   superseded layers go, the fresh image stays cached;
//! - `purge`: the cache is emptied and refilled from upstream on the next pull;
//! - a rolling replacement (emptyDir, maxSurge 1 / maxUnavailable 0) while clients pull in a
//!   loop and slow layer downloads are in flight on the replicas being replaced: no request
//!   fails, every download completes intact (the rendered `http.draintimeout` at work).
//!
//! Only a cluster shows the rest: the Deployment controller and kube-proxy doing these steps
//! (the edge's CDS stands in for the Service's endpoints here), and the kubelet deleting an
//! emptyDir volume with its pod.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Container;
use mirrorfleet::build::cleanup::{ReplicaCleanup, CLEANUP_INIT_CONTAINER, CLEANUP_REQUEST_ANNOTATION};
use support::datapath::fleet::{count_access, CI_USER};
use support::datapath::{Fleet, FleetOptions, Storage};
use support::Skopeo;
use support::*;

fn init_container(fleet: &Fleet, upstream: &str) -> Container {
    let name = format!("dp-proxy-{upstream}");
    let d =
        fleet.rendered.fleet.children.deployments.iter().find(|d| d.metadata.name.as_deref() == Some(&name)).unwrap();
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.init_containers
        .iter()
        .flatten()
        .find(|c| c.name == CLEANUP_INIT_CONTAINER)
        .expect("the proxy Deployment has the cache-cleanup init container")
        .clone()
}

/// Sets the modification time of everything below `dir` to an hour ago: content older than
/// the collector's safety margin (ten minutes), as a cache between pulls and a nightly run is.
fn age(dir: &Path) {
    let past = std::time::SystemTime::now() - Duration::from_secs(3600);
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                age(&e.path());
            }
            let _ = fs::File::open(e.path()).and_then(|f| f.set_modified(past));
        }
    }
}

/// Runs the rendered `cache-cleanup` init container for `request` on `storage`, as the kubelet
/// would start it in a new proxy pod (the operator image: this build's `mirrorfleet`), and
/// returns its report.
fn run_cleanup(fleet: &Fleet, upstream: &str, request: &str, storage: &Path) -> ReplicaCleanup {
    let init = init_container(fleet, upstream);
    assert!(init.command.is_none(), "the operator image's entrypoint is mirrorfleet");
    let args = init.args.clone().unwrap();
    assert_eq!(args, ["cleanup-replica", "--storage-root", "/var/lib/registry"]);
    let mounts: BTreeMap<String, String> =
        init.volume_mounts.iter().flatten().map(|m| (m.mount_path.clone(), m.name.clone())).collect();
    assert_eq!(mounts.get("/var/lib/registry").map(String::as_str), Some("cache"), "{mounts:?}");
    let env = init.env.clone().unwrap();
    assert_eq!(env.len(), 1);
    let field = env[0].value_from.as_ref().and_then(|f| f.field_ref.as_ref()).expect("downward API");
    assert_eq!(env[0].name, "MIRRORFLEET_CLEANUP_REQUEST");
    assert_eq!(field.field_path, format!("metadata.annotations['{CLEANUP_REQUEST_ANNOTATION}']"));
    assert_eq!(init.termination_message_path.as_deref(), Some("/dev/termination-log"));

    let report_file = fleet.dir().join(format!("termination-log-{}", request.replace('/', "-")));
    let _ = fs::remove_file(&report_file);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mirrorfleet"));
    cmd.args(&args[..2])
        .arg(storage)
        .arg("--report-file")
        .arg(&report_file)
        .env("MIRRORFLEET_CLEANUP_REQUEST", request);
    let out = run_ok(&mut cmd, Duration::from_secs(120));
    let message = fs::read_to_string(&report_file).expect("the init container wrote its termination message");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().last().unwrap_or_default(), message.trim(), "the log shows the report too");
    serde_json::from_str(message.trim()).unwrap_or_else(|e| panic!("report {message:?}: {e}"))
}

/// Bytes in regular files below `dir` (an independent check of the script's `du`).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                tree_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

fn blob_path(storage: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    storage.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
}

/// Config and layer digests of the single image in an OCI layout: every blob a pull fetches.
fn blobs(layout: &Path) -> Vec<String> {
    let manifest_digest = oci_manifest_digest(layout);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(&manifest_digest[7..])).unwrap()).unwrap();
    let mut out = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    out.extend(layers(layout));
    out
}

/// Layer digests of the single image in an OCI layout.
fn layers(layout: &Path) -> Vec<String> {
    let manifest_digest = oci_manifest_digest(layout);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(&manifest_digest[7..])).unwrap()).unwrap();
    manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

/// `(blobs, manifests)` Distribution's `garbage-collect --dry-run [--delete-untagged]` would
/// still delete: an independent check of the cache's consistency after a cleanup.
fn gc_dry_run(config: &Path, delete_untagged: bool) -> (u64, u64) {
    let mut cmd = Command::new(tool("docker-registry").unwrap());
    cmd.args(["garbage-collect", "--dry-run"]);
    if delete_untagged {
        cmd.arg("--delete-untagged");
    }
    let out = run_ok(cmd.arg(config), Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text.lines().find(|l| l.contains("blobs marked")).unwrap_or_else(|| panic!("{text}"));
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 3, "{line}");
    (nums[1], nums[2])
}

fn pull(fleet: &Fleet, image_ref: &str, tag: &str) -> String {
    let dest = fleet.dir().join(format!("pull-{tag}"));
    let out = fleet.skopeo_pull(image_ref, CI_USER, &dest);
    assert!(out.status.success(), "pull {image_ref}: {}", describe_output(&out));
    let index: serde_json::Value = serde_json::from_slice(&fs::read(dest.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_string()
}

/// Lets the proxy finish writing what it streamed (the access log line comes after the body).
fn settle() {
    std::thread::sleep(Duration::from_millis(700));
}

const MIB: usize = 1024 * 1024;

#[test]
fn garbage_collect_frees_superseded_content_keeps_tagged_images_and_refetches_on_demand() {
    if !support::datapath::fleet::available() {
        return;
    }
    let mut fleet = Fleet::start(FleetOptions { cleanup_policy: "garbageCollect", storage: Storage::Pvc });
    let hub = "dockerhub";
    // v1 of "app", then a new v1 upstream (the tag moves, as `latest` does), plus another image.
    let old = build_test_image(&fleet.dir().join("old"), "app", 3, MIB);
    let new = build_test_image(&fleet.dir().join("new"), "app", 3, MIB + 4096);
    let keep = build_test_image(fleet.dir(), "keep", 1, MIB / 2);
    fleet.upstream(hub).push(&old, "v1");
    let old_digest = pull(&fleet, "docker.io/library/app:v1", "old");
    assert_eq!(old_digest, oci_manifest_digest(&old));
    fleet.upstream(hub).push(&new, "v1");
    fleet.upstream(hub).push(&keep, "v1");
    assert_eq!(
        pull(&fleet, "docker.io/library/app:v1", "new"),
        oci_manifest_digest(&new),
        "the proxy followed the tag"
    );
    pull(&fleet, "docker.io/library/keep:v1", "keep");
    settle();

    let storage = fleet.cache_dir(hub);
    let config = fleet.dir().join("proxy-config.yml");
    fs::copy(fleet.proxy(hub).config_path(), &config).unwrap();
    for layer in layers(&old).iter().chain(&layers(&new)) {
        assert!(blob_path(&storage, layer).exists(), "{layer} cached before the cleanup");
    }
    // The registry's own view: the superseded manifest is untagged garbage.
    assert!(gc_dry_run(&config, true).1 >= 1, "the old manifest is untagged");
    age(&storage);
    let bytes_before = tree_bytes(&storage);

    // Recreate: the old pod stops, the new pod's init container collects, the registry starts.
    fleet.stop_proxy(hub);
    let report = run_cleanup(&fleet, hub, "garbageCollect/run1", &storage);
    fleet.start_proxy(hub);
    eprintln!("cleanup report: {report:?}; files {bytes_before} B before");

    assert_eq!(report.action, "garbageCollected", "{report:?}");
    assert_eq!(report.error, None);
    let (before, after) = (report.bytes_before.unwrap(), report.bytes_after.unwrap());
    assert!(before >= after + 3 * MIB as u64, "disk usage fell by at least the superseded layers: {before} -> {after}");
    let bytes_after = tree_bytes(&storage);
    assert!(bytes_after + 3 * MIB as u64 <= bytes_before, "files: {bytes_before} -> {bytes_after}");
    for layer in layers(&old) {
        assert!(!blob_path(&storage, &layer).exists(), "superseded layer {layer} is gone");
    }
    for layer in layers(&new).iter().chain(&layers(&keep)) {
        assert!(blob_path(&storage, layer).exists(), "tagged layer {layer} is kept");
    }
    // Consistent by the registry's own tool: nothing unreferenced, no untagged manifest left.
    assert_eq!(gc_dry_run(&config, false), (0, 0), "no orphan blob left");
    assert_eq!(gc_dry_run(&config, true), (0, 0), "no untagged manifest left");

    // Tagged images pull from the cache without any upstream blob request.
    let gets = fleet.upstream_blob_gets(hub);
    assert_eq!(pull(&fleet, "docker.io/library/app:v1", "after-new"), oci_manifest_digest(&new));
    pull(&fleet, "docker.io/library/keep:v1", "after-keep");
    settle();
    assert_eq!(fleet.upstream_blob_gets(hub), gets, "kept content was served from the cache");
    // The collected image still pulls (by digest), re-fetched from upstream.
    let by_digest = format!("docker.io/library/app@{old_digest}");
    assert_eq!(pull(&fleet, &by_digest, "after-old"), old_digest);
    settle();
    assert!(fleet.upstream_blob_gets(hub) >= gets + 3, "the collected layers came from upstream again");

    // A later restart of the pod with the same request does not clean again.
    fleet.stop_proxy(hub);
    let again = run_cleanup(&fleet, hub, "garbageCollect/run1", &storage);
    fleet.start_proxy(hub);
    assert_eq!(again.action, "alreadyDone", "{again:?}");
}

#[test]
fn purge_empties_the_cache_and_the_next_pull_refills_it_from_upstream() {
    if !support::datapath::fleet::available() {
        return;
    }
    let mut fleet = Fleet::start(FleetOptions { cleanup_policy: "purge", storage: Storage::Pvc });
    let hub = "dockerhub";
    let image = build_test_image(fleet.dir(), "purged", 2, MIB);
    fleet.upstream(hub).push(&image, "v1");
    let digest = pull(&fleet, "docker.io/library/purged:v1", "first");
    settle();
    let storage = fleet.cache_dir(hub);
    assert!(tree_bytes(&storage) > 2 * MIB as u64);

    fleet.stop_proxy(hub);
    let report = run_cleanup(&fleet, hub, "purge/run1", &storage);
    fleet.start_proxy(hub);
    assert_eq!(report.action, "purged", "{report:?}");
    assert!(report.bytes_before.unwrap() > 2 * MIB as u64, "{report:?}");
    assert!(report.bytes_after.unwrap() < 64 * 1024, "{report:?}");
    assert!(!storage.join("docker").exists(), "the cache is empty");

    let gets = fleet.upstream_blob_gets(hub);
    assert_eq!(pull(&fleet, "docker.io/library/purged:v1", "again"), digest, "a purged image still pulls");
    settle();
    assert!(fleet.upstream_blob_gets(hub) >= gets + 2, "refilled from upstream");
    assert!(tree_bytes(&storage) > 2 * MIB as u64, "and cached again");

    // A failed cleanup is reported (with the reason), not fatal to the pod.
    let broken = run_cleanup(&fleet, hub, "compact/run2", &storage);
    assert_eq!(broken.action, "failed", "{broken:?}");
    assert!(broken.error.as_deref().is_some_and(|e| e.contains("unknown cleanup policy")), "{broken:?}");
}

fn kill_term(pid: u32) {
    run_ok(Command::new("kill").args(["-TERM", &pid.to_string()]), Duration::from_secs(5));
}

/// Whether a child has exited (a zombie until its owner reaps it).
fn exited(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.split_whitespace().nth(2) == Some("Z")).unwrap_or(true)
}

#[test]
fn rolling_cleanup_of_two_replicas_fails_no_request_and_completes_downloads_in_flight() {
    if !support::datapath::fleet::available() || !tools_available(&["curl"]) {
        return;
    }
    let hub = "dockerhub";
    let mut fleet = Fleet::start(FleetOptions { cleanup_policy: "garbageCollect", storage: Storage::EmptyDir });
    // Two replicas behind the edge, as the Deployment (replicas: 2) has them.
    let r1 = fleet.start_replica(hub, &fleet.dir().join("replica-1"));
    let r0_addr = fleet.proxy(hub).addr().to_string();
    fleet.set_backends(hub, &[&r0_addr, r1.addr()]);

    let small = build_test_image(fleet.dir(), "rolling", 2, MIB);
    // Larger than what loopback socket buffers and Envoy absorb, so transfers really are in flight.
    let big = build_test_image(fleet.dir(), "bigone", 1, 40 * MIB);
    fleet.upstream(hub).push(&small, "v1");
    fleet.upstream(hub).push(&big, "v1");
    let small_layers = layers(&small);
    let big_layer = layers(&big)[0].clone();
    let big_size = fs::metadata(big.join("blobs/sha256").join(&big_layer[7..])).unwrap().len();
    pull(&fleet, "docker.io/library/rolling:v1", "warm-small");
    pull(&fleet, "docker.io/library/bigone:v1", "warm-big");
    settle();

    // Clients: pull the small image's manifest and layers in a loop until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let fleet = Arc::new(Mutex::new(fleet));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, requests, failures, fleet) = (stop.clone(), requests.clone(), failures.clone(), fleet.clone());
            let mut paths = vec!["/v2/library/rolling/manifests/v1".to_string()];
            paths.extend(small_layers.iter().map(|l| format!("/v2/library/rolling/blobs/{l}")));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for path in &paths {
                        // The lock only guards access to the struct; curl runs outside it.
                        let (host, port, ca) = {
                            let f = fleet.lock().unwrap();
                            (f.edge_host("dockerhub"), f.https_port, f.ca_cert.clone())
                        };
                        let result = curl_direct(&host, port, &ca, path, &[]);
                        requests.fetch_add(1, Ordering::SeqCst);
                        match result {
                            Ok((200, _, _)) => {}
                            Ok((status, _, _)) => failures.lock().unwrap().push(format!("{path}: HTTP {status}")),
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                }
            })
        })
        .collect();
    // Slow downloads of the big layer (about 20 s each), in flight while replicas are replaced.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let fleet = fleet.clone();
            let path = format!("/v2/library/bigone/blobs/{big_layer}");
            std::thread::spawn(move || {
                let (host, port, ca) = {
                    let f = fleet.lock().unwrap();
                    (f.edge_host("dockerhub"), f.https_port, f.ca_cert.clone())
                };
                curl_direct(&host, port, &ca, &path, &["--limit-rate", "2M"])
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));

    // The rollout: for each old replica, a new one (cleaned by its init container) comes up and
    // becomes an endpoint, then the old one leaves the endpoints and gets SIGTERM.
    let request = "garbageCollect/rolling";
    let mut olds: Vec<(String, u32)> = vec![(r0_addr.clone(), fleet.lock().unwrap().proxy(hub).pid().unwrap())];
    olds.push((r1.addr().to_string(), r1.pid().unwrap()));
    let mut current: Vec<String> = olds.iter().map(|(a, _)| a.clone()).collect();
    let mut new_replicas = Vec::new();
    let started = Instant::now();
    for (i, (old_addr, old_pid)) in olds.iter().enumerate() {
        let mut f = fleet.lock().unwrap();
        let storage = f.dir().join(format!("new-replica-{i}"));
        fs::create_dir_all(&storage).unwrap();
        let report = run_cleanup(&f, hub, request, &storage);
        assert_eq!(report.action, "empty", "a new emptyDir replica has nothing to clean: {report:?}");
        let replica = f.start_replica(hub, &storage);
        current.push(replica.addr().to_string());
        let refs: Vec<&str> = current.iter().map(String::as_str).collect();
        f.set_backends(hub, &refs);
        current.retain(|a| a != old_addr);
        let refs: Vec<&str> = current.iter().map(String::as_str).collect();
        f.set_backends(hub, &refs);
        drop(f);
        // preStop pause (endpoint removal reaching every node), then SIGTERM: the registry drains.
        std::thread::sleep(Duration::from_secs(1));
        kill_term(*old_pid);
        new_replicas.push(replica);
    }
    let mut drained_for = Vec::new();
    for (_, pid) in &olds {
        let since = Instant::now();
        assert!(
            wait_until(Duration::from_secs(40), || exited(*pid).then_some(())).is_some(),
            "old replica {pid} did not stop within draintimeout"
        );
        drained_for.push(since.elapsed());
    }
    let rollout = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let slow_results: Vec<_> = slow.into_iter().map(|t| t.join().unwrap()).collect();

    let f = fleet.lock().unwrap();
    let failures = failures.lock().unwrap();
    let total = requests.load(Ordering::SeqCst);
    eprintln!("rolling cleanup: {total} client requests over {rollout:?}, {} failed", failures.len());
    assert!(total >= 20, "the clients made too few requests ({total}) to mean anything");
    assert!(failures.is_empty(), "requests failed during the rolling cleanup: {failures:#?}");
    for r in &slow_results {
        let (status, len, digest) = r.as_ref().unwrap_or_else(|e| panic!("a download in flight broke: {e}"));
        assert_eq!((*status, *len, digest.as_str()), (200, big_size, big_layer.as_str()), "download intact");
    }
    let graceful = f.proxy(hub).log().contains("stopping server gracefully") as usize
        + r1.log().contains("stopping server gracefully") as usize;
    assert_eq!(graceful, 2, "both old replicas drained on SIGTERM");
    eprintln!("old replicas exited {drained_for:?} after the rollout's last SIGTERM");
    assert!(
        drained_for[0] + drained_for[1] > Duration::from_secs(3),
        "the old replicas stayed up while their downloads finished: {drained_for:?}"
    );
    // The new replicas serve (their caches filled from upstream on demand).
    for r in &new_replicas {
        assert!(count_access(&r.log(), "/v2/library/rolling/", 200) > 0, "new replica {} served", r.addr());
    }
}

/// `curl` GET through the edge (TLS, Host routing, Basic auth): `(status, bytes, sha256)`.
fn curl_direct(host: &str, port: u16, ca: &Path, path: &str, extra: &[&str]) -> Result<(u16, u64, String), String> {
    let name = host.split_once(':').unwrap().0;
    let out = run(
        Command::new(tool("curl").unwrap())
            .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--resolve", &format!("{name}:{port}:127.0.0.1")])
            .args(["-u", &format!("{}:{}", CI_USER.0, CI_USER.1)])
            .args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
            .args(extra)
            .arg("--cacert")
            .arg(ca)
            .arg(format!("https://{host}{path}")),
        Duration::from_secs(90),
    );
    if !out.status.success() {
        return Err(format!("curl {path}: {}", describe_output(&out).chars().take(600).collect::<String>()));
    }
    let split = out.stdout.iter().rposition(|b| *b == b'\n').unwrap();
    let body = &out.stdout[..split];
    let status: u16 = String::from_utf8_lossy(&out.stdout[split + 1..]).trim().parse().unwrap();
    use sha2::Digest;
    Ok((status, body.len() as u64, format!("sha256:{}", hex::encode(sha2::Sha256::digest(body)))))
}

/// Writes `bytes` as a blob of an OCI layout; returns its digest.
fn write_blob(layout: &Path, bytes: &[u8]) -> String {
    use sha2::Digest;
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    format!("sha256:{hex}")
}

/// An OCI layout `dir/multi` whose one image is an index of two platform manifests (each with
/// its own layer): what most Docker Hub images are. Returns (layout, index digest, [amd64, arm64]).
fn multi_arch_image(dir: &Path) -> (PathBuf, String, [String; 2]) {
    let amd64 = build_test_image(&dir.join("amd64"), "multi", 1, MIB / 2);
    let arm64 = build_test_image(&dir.join("arm64"), "multi", 1, MIB / 2 + 512);
    let layout = dir.join("multi");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::copy(amd64.join("oci-layout"), layout.join("oci-layout")).unwrap();
    let mut entries = Vec::new();
    let mut digests = Vec::new();
    for (src, arch) in [(&amd64, "amd64"), (&arm64, "arm64")] {
        for blob in fs::read_dir(src.join("blobs/sha256")).unwrap().flatten() {
            fs::copy(blob.path(), layout.join("blobs/sha256").join(blob.file_name())).unwrap();
        }
        let digest = oci_manifest_digest(src);
        let size = fs::metadata(src.join("blobs/sha256").join(&digest[7..])).unwrap().len();
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
            "platform": {"architecture": arch, "os": "linux"}}));
        digests.push(digest);
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}))
    .unwrap();
    let index_digest = write_blob(&layout, &index);
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": index.len()}]});
    fs::write(layout.join("index.json"), top.to_string()).unwrap();
    (layout, index_digest, [digests[0].clone(), digests[1].clone()])
}

#[test]
fn garbage_collect_keeps_the_platform_manifests_of_a_cached_multi_arch_image() {
    if !support::datapath::fleet::available() {
        return;
    }
    let mut fleet = Fleet::start(FleetOptions { cleanup_policy: "garbageCollect", storage: Storage::Pvc });
    let hub = "dockerhub";
    let (layout, index_digest, [amd64, _arm64]) = multi_arch_image(&fleet.dir().join("multi-src"));
    let creds = format!("{}:{}", support::datapath::fleet::HUB_CREDS.0, support::datapath::fleet::HUB_CREDS.1);
    let out = Skopeo::new().copy(
        &format!("oci:{}", layout.display()),
        &format!("docker://{}/library/multi:v1", fleet.upstream(hub).addr()),
        &["--all", "--dest-tls-verify=false", "--dest-creds", &creds],
    );
    assert!(out.status.success(), "push the index: {}", describe_output(&out));
    // A node pulls its platform: the proxy caches the (tagged) index, the amd64 manifest (not
    // tagged itself) and its blobs.
    assert_eq!(pull(&fleet, "docker.io/library/multi:v1", "multi"), amd64);
    settle();
    let storage = fleet.cache_dir(hub);
    let config = fleet.dir().join("proxy-config.yml");
    fs::copy(fleet.proxy(hub).config_path(), &config).unwrap();
    assert!(blob_path(&storage, &index_digest).exists() && blob_path(&storage, &amd64).exists());
    // Distribution's own `--delete-untagged` would take the platform manifest and its layers.
    assert_eq!(gc_dry_run(&config, true), (2, 1), "2.8 would collect the amd64 manifest's blobs");
    age(&storage);
    let amd64_layers = layers(&fleet.dir().join("multi-src/amd64/multi"));

    fleet.stop_proxy(hub);
    let report = run_cleanup(&fleet, hub, "garbageCollect/multi", &storage);
    assert_eq!(report.action, "garbageCollected", "{report:?}");
    for digest in [&index_digest, &amd64].into_iter().chain(&amd64_layers) {
        assert!(blob_path(&storage, digest).exists(), "{digest} of the cached multi-arch image survived the GC");
    }
    assert_eq!(gc_dry_run(&config, false), (0, 0), "no orphan blob left");
    // With the upstream gone, the image still pulls: nothing of it was collected. (The proxy
    // starts first: 2.8 panics at start when its remote is unreachable.)
    fleet.start_proxy(hub);
    fleet.upstream_mut(hub).stop();
    assert_eq!(pull(&fleet, "docker.io/library/multi:v1", "multi-offline"), amd64);
}

/// Pulls `paths` through the edge in a loop until `stop`; returns (requests, failures).
fn client_loop(
    host: String,
    port: u16,
    ca: PathBuf,
    paths: Vec<String>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut n, mut failures) = (0, Vec::new());
        while !stop.load(Ordering::SeqCst) {
            for path in &paths {
                n += 1;
                match curl_direct(&host, port, &ca, path, &[]) {
                    Ok((200, _, _)) => {}
                    Ok((status, _, _)) => failures.push(format!("{path}: HTTP {status}")),
                    Err(e) => failures.push(e),
                }
            }
        }
        (n, failures)
    })
}

#[test]
fn garbage_collect_on_shared_storage_under_a_serving_replica_fails_no_request_and_spares_fresh_pulls() {
    if !support::datapath::fleet::available() || !tools_available(&["curl"]) {
        return;
    }
    // ReadWriteMany: the first new replica collects the storage the old replicas serve from.
    let fleet = Fleet::start(FleetOptions { cleanup_policy: "garbageCollect", storage: Storage::Pvc });
    let hub = "dockerhub";
    let old = build_test_image(&fleet.dir().join("old"), "app", 3, MIB);
    let new = build_test_image(&fleet.dir().join("new"), "app", 2, MIB + 4096);
    let fresh = build_test_image(fleet.dir(), "fresh", 2, MIB);
    fleet.upstream(hub).push(&old, "v1");
    pull(&fleet, "docker.io/library/app:v1", "old");
    fleet.upstream(hub).push(&new, "v1");
    fleet.upstream(hub).push(&fresh, "v1");
    pull(&fleet, "docker.io/library/app:v1", "new");
    settle();
    let storage = fleet.cache_dir(hub);
    age(&storage);

    let stop = Arc::new(AtomicBool::new(false));
    let mut paths = vec!["/v2/library/app/manifests/v1".to_string()];
    paths.extend(layers(&new).iter().map(|l| format!("/v2/library/app/blobs/{l}")));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            client_loop(fleet.edge_host(hub), fleet.https_port, fleet.ca_cert.clone(), paths.clone(), stop.clone())
        })
        .collect();
    // A cold pull of another image while the collector runs: its content is young.
    let fresh_pull = {
        let (host, port, ca) = (fleet.edge_host(hub), fleet.https_port, fleet.ca_cert.clone());
        let mut fresh_paths = vec!["/v2/library/fresh/manifests/v1".to_string()];
        fresh_paths.extend(blobs(&fresh).iter().map(|l| format!("/v2/library/fresh/blobs/{l}")));
        std::thread::spawn(move || {
            fresh_paths.iter().map(|p| curl_direct(&host, port, &ca, p, &["--limit-rate", "2M"])).collect::<Vec<_>>()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let report = run_cleanup(&fleet, hub, "garbageCollect/shared", &storage);
    let fresh_results = fresh_pull.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (mut total, mut failures) = (0, Vec::new());
    for c in clients {
        let (n, f) = c.join().unwrap();
        total += n;
        failures.extend(f);
    }

    assert_eq!(report.action, "garbageCollected", "{report:?}");
    // The cold pull keeps writing while the collector measures, so check the blobs themselves.
    assert!(report.bytes_before.unwrap() > report.bytes_after.unwrap(), "{report:?}");
    for layer in layers(&old) {
        assert!(!blob_path(&storage, &layer).exists(), "superseded layer {layer} freed under the running replica");
    }
    eprintln!("live GC: {total} client requests during it, {} failed", failures.len());
    assert!(total >= 6, "too few client requests ({total})");
    assert!(failures.is_empty(), "requests failed while the shared storage was collected: {failures:#?}");
    for r in &fresh_results {
        assert!(matches!(r, Ok((200, _, _))), "the cold pull during the collection: {r:?}");
    }
    settle();
    for blob in blobs(&fresh) {
        assert!(blob_path(&storage, &blob).exists(), "fresh blob {blob} was spared");
    }
    let gets = fleet.upstream_blob_gets(hub);
    pull(&fleet, "docker.io/library/fresh:v1", "fresh-again");
    pull(&fleet, "docker.io/library/app:v1", "app-again");
    settle();
    assert_eq!(fleet.upstream_blob_gets(hub), gets, "both images are still served from the cache");
}
