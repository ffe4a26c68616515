//! Issue 12 with `spec.proxy.storage.s3`: a proxy whose cache is a bucket starts while its
//! upstream is down, serves what the bucket already holds (by tag and by digest), fails fast on
//! what it does not, and pulls new images once the upstream is back — with Distribution 2.8
//! (Debian's `docker-registry`) and 3.x (the binary `MIRRORFLEET_REGISTRY_V3` names).
//!
//! ```text
//! skopeo --> registry proxy (rendered config.yml: storage.s3 --> moto_server)
//!   --> Envoy sidecar (rendered envoy.yaml) --> Tap --> Distribution with token auth
//!                                           \--> TokenServer (credentials required)
//! ```
//!
//! The S3 server is moto's (`pip install 'moto[server]'`): missing, the test SKIPs, or fails
//! under `CI=true`. The proxy has no other storage: after the warm-up pull it is stopped, the
//! upstream is faulted (`blackhole`: iptables DROP of new connections to the upstream and its
//! realm and the tap swallowing what is open; `refused`: nothing listens), and a new registry
//! process, whose only state is the bucket, is started.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mirrorfleet::build::{proxy, sidecar};
use mirrorfleet::render::{render_str, RenderOptions, Rendered};
use support::agent::Blackhole;
use support::datapath::faulty::{distribution_binaries, port_of, FaultyUpstream};
use support::datapath::fleet::{localize_socket_addresses, proxy_env};
use support::datapath::token::{TokenRequest, TOKEN_SERVICE};
use support::s3::MotoS3;
use support::*;

const CREDS: (&str, &str) = ("hub-user", "hub-secret");
/// moto checks no signature; the keys still travel as the pod's env (`REGISTRY_STORAGE_S3_*`).
const S3_KEYS: (&str, &str) = ("mirrorfleet-access", "mirrorfleet-secret");
const REGION: &str = "us-east-1";
/// The bounds of `tests/upstream_sidecar.rs`: a cached image within this plus the warm-pull
/// time; an uncached image fails within `UNCACHED_BOUND`.
const CACHED_EXTRA: Duration = Duration::from_secs(5);
const UNCACHED_BOUND: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Blackhole,
    Refused,
}

fn mirror_yaml(remote: &str, realm: &str, endpoint: &str, bucket: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: hub-creds, namespace: mirrors}}\n\
         stringData: {{username: {u}, password: {p}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: s3-creds, namespace: mirrors}}\n\
         stringData: {{accessKey: {ak}, secretKey: {sk}}}\n---\n\
         apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: dp, namespace: mirrors}}\nspec:\n  \
         upstreams:\n  \
         - name: dockerhub\n    registry: docker.io\n    remoteURL: \"{remote}\"\n    \
           credentialsSecretRef: {{name: hub-creds}}\n    auth: {{realm: \"{realm}\", service: {TOKEN_SERVICE}}}\n  \
         proxy:\n    replicas: 1\n    storage:\n      s3: {{bucket: {bucket}, region: {REGION}, endpoint: \"{endpoint}\", \
           credentialsSecretRef: {{name: s3-creds}}}}\n",
        u = CREDS.0,
        p = CREDS.1,
        ak = S3_KEYS.0,
        sk = S3_KEYS.1,
    )
}

/// Every `port_value` of a `socket_address` in an Envoy config, whatever listener or cluster it
/// belongs to (so a listener added to the sidecar is localized without naming it here).
fn socket_ports(envoy_yaml: &str) -> Vec<u64> {
    use serde_yaml::Value;
    fn walk(v: &Value, out: &mut Vec<u64>) {
        match v {
            Value::Mapping(m) => {
                for (k, child) in m {
                    if k.as_str() == Some("socket_address") {
                        if let Some(p) = child.get("port_value").and_then(Value::as_u64) {
                            out.push(p);
                        }
                    } else {
                        walk(child, out);
                    }
                }
            }
            Value::Sequence(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&serde_yaml::from_str(envoy_yaml).expect("envoy yaml"), &mut out);
    out
}

/// One proxy (the given Distribution binary) with its sidecar, both from what `render` produced
/// with `storage.s3` on moto, in front of a token-auth upstream reached through a tap.
struct Bed<'s> {
    // Drop order: proxy, sidecar, upstream.
    proxy: Option<Registry>,
    envoy: Option<Envoy>,
    up: FaultyUpstream,
    s3: &'s MotoS3,
    bucket: String,
    registry_bin: PathBuf,
    rendered: Rendered,
    /// Pod port -> local port, for every port the rendered files listen on or dial locally;
    /// the upstream's (tap and realm) map to themselves.
    ports: BTreeMap<u64, u16>,
    /// The registry's own `http.addr` port in the rendered config.
    registry_port: u64,
    tmp: tempfile::TempDir,
}

impl<'s> Bed<'s> {
    fn start(registry_bin: &Path, s3: &'s MotoS3, bucket: &str) -> Bed<'s> {
        let tmp = tempdir();
        s3.create_bucket(bucket);
        let up = FaultyUpstream::start(CREDS.0, CREDS.1);
        let opts = RenderOptions { namespace: "mirrors".into(), ..RenderOptions::default() };
        let yaml = mirror_yaml(&up.url(), &up.upstream().token_server().realm(), &s3.endpoint(), bucket);
        let mut all = render_str(&yaml, &opts).unwrap_or_else(|e| panic!("render: {e}"));
        let rendered = all.remove(0);
        let files = &rendered.fleet.files;

        // The upstream's addresses are real and stay; every other port moves to a free one.
        let keep = [port_of(up.addr()), port_of(up.upstream().token_server().addr())];
        let mut ports = BTreeMap::new();
        for p in socket_ports(&files["proxy/dockerhub/envoy.yaml"]) {
            let local = keep.iter().copied().find(|k| u64::from(*k) == p).unwrap_or_else(free_port);
            ports.entry(p).or_insert(local);
        }
        let cfg: serde_yaml::Value = serde_yaml::from_str(&files["proxy/dockerhub/config.yml"]).unwrap();
        let registry_port = u64::from(port_of(cfg["http"]["addr"].as_str().expect("http.addr")));
        ports.entry(registry_port).or_insert_with(free_port);
        // The pod's registry port (the registry's own, or whatever fronts it in the pod).
        ports.entry(proxy::REGISTRY_PORT as u64).or_insert_with(free_port);

        let mut bed = Bed {
            proxy: None,
            envoy: None,
            up,
            s3,
            bucket: bucket.to_string(),
            registry_bin: registry_bin.to_path_buf(),
            rendered,
            ports,
            registry_port,
            tmp,
        };
        bed.start_proxy();
        bed
    }

    fn local_remote(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[&(sidecar::LISTEN_PORT as u64)])
    }

    /// Where clients pull: the pod's registry port, localized.
    fn proxy_addr(&self) -> String {
        format!("127.0.0.1:{}", self.ports[&(proxy::REGISTRY_PORT as u64)])
    }

    /// The bucket prefix of this upstream's storage (`rootdirectory` without its leading `/`).
    fn s3_root(&self) -> String {
        let cfg: serde_yaml::Value =
            serde_yaml::from_str(&self.rendered.fleet.files["proxy/dockerhub/config.yml"]).unwrap();
        cfg["storage"]["s3"]["rootdirectory"].as_str().expect("storage.s3.rootdirectory").trim_start_matches('/').into()
    }

    /// The config the registry runs: the rendered one with only addresses localized. Checks that
    /// it is S3 through and through (no local storage to fall back on).
    fn registry_config(&self) -> String {
        let files = &self.rendered.fleet.files;
        let config = files["proxy/dockerhub/config.yml"].replace(&sidecar::local_remote_url(), &self.local_remote());
        assert!(config.contains(&self.local_remote()), "the registry's remote is the sidecar: {config}");
        let addr = format!("127.0.0.1:{}", self.ports[&self.registry_port]);
        let unused = self.tmp.path().join("no-filesystem-storage");
        let local = patch_registry_config(&config, &addr, &unused, None);
        let cfg: serde_yaml::Value = serde_yaml::from_str(&local).unwrap();
        let s3 = &cfg["storage"]["s3"];
        assert_eq!(s3["bucket"].as_str(), Some(self.bucket.as_str()), "{local}");
        assert_eq!(s3["region"].as_str(), Some(REGION), "{local}");
        assert_eq!(s3["regionendpoint"].as_str(), Some(self.s3.endpoint().as_str()), "{local}");
        // 3.x sends `BUCKET.ENDPOINT` requests without it (and panics at start: no such host).
        assert_eq!(s3["forcepathstyle"].as_bool(), Some(true), "path-style requests to the endpoint: {local}");
        assert!(cfg["storage"].get("filesystem").is_none(), "a filesystem storage besides s3: {local}");
        local
    }

    /// Starts the sidecar, then the registry (the order the native sidecar gives in the pod);
    /// how long each took to answer (Envoy's `/ready` LIVE, the registry's `/v2/`).
    fn start_proxy(&mut self) -> (Duration, Duration) {
        let started = Instant::now();
        let files = &self.rendered.fleet.files;
        let envoy_yaml = localize_socket_addresses(&files["proxy/dockerhub/envoy.yaml"], &self.ports, &BTreeMap::new())
            .replace(&sidecar::local_remote_url(), &self.local_remote());
        let dir = self.tmp.path().join(format!("sidecar-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(sidecar::CONFIG_FILE), envoy_yaml).unwrap();
        self.envoy = Some(Envoy::start(&dir, sidecar::CONFIG_FILE));
        let envoy = started.elapsed();

        let started = Instant::now();
        let local = self.registry_config();
        let secrets = BTreeMap::from([
            (("hub-creds".to_string(), "username".to_string()), CREDS.0.to_string()),
            (("hub-creds".to_string(), "password".to_string()), CREDS.1.to_string()),
            (("s3-creds".to_string(), "accessKey".to_string()), S3_KEYS.0.to_string()),
            (("s3-creds".to_string(), "secretKey".to_string()), S3_KEYS.1.to_string()),
        ]);
        let env = proxy_env(&self.rendered, "dockerhub", &secrets);
        assert!(
            env.iter().any(|(k, v)| k == "REGISTRY_STORAGE_S3_ACCESSKEY" && v == S3_KEYS.0),
            "the S3 keys reach the registry as env: {env:?}"
        );
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.proxy = Some(Registry::start_bin(&self.registry_bin, &local, &env));
        (envoy, started.elapsed())
    }

    fn stop_proxy(&mut self) {
        self.proxy = None;
        self.envoy = None;
    }

    /// Waits until the pod's registry port answers `GET /v2/` with 200 (`Registry::start_bin`
    /// returns on any answer).
    fn wait_v2_ok(&self) {
        let addr = self.proxy_addr();
        let ok = wait_until(Duration::from_secs(20), || {
            http_request("GET", &addr, "/v2/", &[], &[]).ok().filter(|r| r.status == 200)
        });
        assert!(ok.is_some(), "/v2/ never answered 200 on {addr}:\n{}", self.proxy_log());
    }

    fn push(&self, name: &str) -> String {
        let layout = build_test_image(self.tmp.path(), name, 1, 64 * 1024);
        self.up.upstream().push(&layout, "v1");
        oci_manifest_digest(&layout)
    }

    /// `skopeo copy` from the proxy; (output, time).
    fn pull(&self, reference: &str) -> (std::process::Output, Duration) {
        let dest = self.tmp.path().join(format!("pull-{}", free_port()));
        let started = Instant::now();
        let out = Skopeo::new().copy(
            &format!("docker://{}/library/{reference}", self.proxy_addr()),
            &format!("oci:{}", dest.display()),
            &["--src-tls-verify=false"],
        );
        (out, started.elapsed())
    }

    /// Blob data files in the bucket under this upstream's root.
    fn s3_blobs(&self, min: usize) -> Vec<String> {
        let prefix = format!("{}/docker/registry/v2/blobs/", self.s3_root());
        self.s3.wait_keys(&self.bucket, &prefix, "/data", min, Duration::from_secs(15))
    }

    /// Blob contents the bucket served (moto's access log: `GET /BUCKET/ROOT/.../blobs/.../data`).
    fn s3_blob_reads(&self) -> usize {
        let path = format!("\"GET /{}/{}/docker/registry/v2/blobs/", self.bucket, self.s3_root());
        self.s3
            .log()
            .lines()
            .filter(|l| l.contains(&path) && l.contains("/data") && (l.contains("\" 200 ") || l.contains("\" 206 ")))
            .count()
    }

    /// Registry requests the upstream answered.
    fn upstream_requests(&self) -> usize {
        self.up.requests()
    }

    /// Token requests the registry made.
    fn tokens(&self) -> Vec<TokenRequest> {
        self.up.tokens()
    }

    /// Sets a fault; the returned guard (with the upstream's own state) undoes it.
    fn fault(&mut self, fault: Fault) -> Option<Box<dyn std::any::Any>> {
        match fault {
            Fault::Blackhole => Some(self.up.blackhole()),
            Fault::Refused => {
                self.up.refuse();
                None
            }
        }
    }

    /// Undoes a fault and waits until the sidecar sees the upstream healthy again.
    fn clear(&mut self, guard: Option<Box<dyn std::any::Any>>) {
        self.up.restore(guard, self.envoy.as_ref().expect("the sidecar runs"));
    }

    fn proxy_log(&self) -> String {
        let envoy = self.envoy.as_ref().map(Envoy::log).unwrap_or_default();
        let moto = self.s3.log();
        let moto: Vec<&str> = moto.lines().collect();
        format!(
            "registry:\n{}\nsidecar:\n{envoy}\nmoto (last 40 lines):\n{}",
            self.proxy.as_ref().map(Registry::log).unwrap_or_default(),
            moto[moto.len().saturating_sub(40)..].join("\n")
        )
    }
}

/// Every missing component gets its SKIP line (or, under `CI=true`, fails the test).
fn available() -> bool {
    let tools = tools_available(&["docker-registry", "envoy", "skopeo", "umoci", "openssl"]);
    let moto = MotoS3::available();
    let iptables = Blackhole::available();
    if !moto {
        eprintln!("SKIP S3 storage: moto_server is missing (pip install 'moto[server]')");
    }
    tools && moto && iptables
}

fn assert_ok(what: &str, out: &std::process::Output, bed: &Bed) {
    assert!(out.status.success(), "{what}: {}\n{}", describe_output(out), bed.proxy_log());
}

/// The error a client sees: the `msg` of skopeo's last stderr line (the whole line if it has none).
fn error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().trim();
    line.split_once("msg=\"").map_or(line, |(_, m)| m.strip_suffix('"').unwrap_or(m)).to_string()
}

#[test]
fn an_s3_backed_proxy_starts_while_its_upstream_is_down_serves_the_bucket_and_pulls_once_it_is_back() {
    if !available() {
        return;
    }
    let s3 = MotoS3::start();
    let mut figures = Vec::new();
    for (version, bin) in distribution_binaries() {
        for fault in [Fault::Blackhole, Fault::Refused] {
            let bucket = format!("cache-{}-{}", version.replace('.', ""), format!("{fault:?}").to_lowercase());
            let mut bed = Bed::start(&bin, &s3, &bucket);
            let digest = bed.push("cached");
            bed.push("later");
            let (out, cold) = bed.pull("cached:v1");
            assert_ok(&format!("[{version}] cold pull"), &out, &bed);
            std::thread::sleep(Duration::from_millis(500));
            let (out, warm) = bed.pull("cached:v1");
            assert_ok(&format!("[{version}] warm pull"), &out, &bed);
            // The cache is in the bucket: the layer, the config and the manifest.
            let blobs = bed.s3_blobs(3);
            bed.stop_proxy();

            let guard = bed.fault(fault);
            let before = bed.upstream_requests();
            let reads_before = bed.s3_blob_reads();
            let started = Instant::now();
            let (envoy_up, registry_up) = bed.start_proxy(); // panics unless the registry answers /v2/
            bed.wait_v2_ok();
            let start = started.elapsed();
            let (out, cached) = bed.pull("cached:v1");
            assert_ok(&format!("[{version}] cached tag after a start with the upstream {fault:?}"), &out, &bed);
            assert!(cached <= warm + CACHED_EXTRA, "[{version}] {fault:?}: cached tag took {cached:?} (warm {warm:?})");
            let (out, by_digest) = bed.pull(&format!("cached@{digest}"));
            assert_ok(&format!("[{version}] by digest after a start with the upstream {fault:?}"), &out, &bed);
            assert!(
                by_digest <= warm + CACHED_EXTRA,
                "[{version}] {fault:?}: by digest took {by_digest:?} (warm {warm:?})"
            );
            let (out, uncached) = bed.pull("later:v1");
            assert!(!out.status.success(), "[{version}] {fault:?}: an uncached image pulled\n{}", bed.proxy_log());
            assert!(uncached <= UNCACHED_BOUND, "[{version}] {fault:?}: uncached took {uncached:?}");
            let err = error_line(&out);
            // The sidecar's front says the upstream failed, not "manifest unknown".
            assert!(
                err.contains("503 Service Unavailable") && !err.contains("manifest unknown"),
                "[{version}] {fault:?}: {}",
                describe_output(&out)
            );
            // Nothing got through to the upstream registry: the fault is real, and what was
            // served came from the bucket.
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(bed.upstream_requests(), before, "[{version}] {fault:?} let requests through");
            // Two pulls of a config and a layer: their contents came out of the bucket.
            let reads = bed.s3_blob_reads() - reads_before;
            assert!(reads >= 2, "[{version}] {fault:?}: {reads} blob reads from the bucket\n{}", bed.proxy_log());
            eprintln!(
                "[{version}] s3, started with the upstream {fault:?}: /v2/ 200 in {start:?} (sidecar LIVE \
                 {envoy_up:?}, registry {registry_up:?}); cached tag {cached:?} (cold {cold:?}, warm {warm:?}), \
                 by digest {by_digest:?}, uncached fails in {uncached:?}: {err}; {reads} blob reads from the bucket"
            );

            bed.clear(guard);
            let tokens_before = bed.tokens().len();
            let back = Instant::now();
            let out = wait_until(Duration::from_secs(15), || {
                let (out, took) = bed.pull("later:v1");
                out.status.success().then_some(took)
            });
            let Some(took) = out else {
                panic!("[{version}] {fault:?}: no pull after the upstream returned:\n{}", bed.proxy_log());
            };
            let recovered = back.elapsed();
            // With the upstream's credentials, and into the bucket.
            let tokens = bed.tokens();
            let new: Vec<_> = tokens[tokens_before..].iter().collect();
            assert!(
                new.iter().any(|t| t.user.as_deref() == Some(CREDS.0) && t.granted),
                "[{version}] {fault:?}: no authenticated token after recovery: {new:?}"
            );
            let after = bed.s3_blobs(blobs.len() + 2);
            eprintln!(
                "[{version}] s3, upstream {fault:?} cleared: new image pulled in {took:?} ({recovered:?} after \
                 the sidecar saw it healthy); bucket blobs {} -> {}",
                blobs.len(),
                after.len()
            );
            figures.push(format!(
                "| {version} | {fault:?} | {:.2} ({:.2} + {:.2}) | {:.2} | {:.2} | {:.2} | {:.2} | {err} |",
                start.as_secs_f64(),
                envoy_up.as_secs_f64(),
                registry_up.as_secs_f64(),
                warm.as_secs_f64(),
                cached.as_secs_f64(),
                by_digest.as_secs_f64(),
                uncached.as_secs_f64()
            ));
        }
    }
    eprintln!(
        "| Distribution | upstream | start s (sidecar + registry) | warm s | cached tag s | by digest s | uncached s | error |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for row in figures {
        eprintln!("{row}");
    }
}
