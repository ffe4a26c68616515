//! The whole data path on 127.0.0.1, started from what `mirrorfleet render` produced:
//!
//! ```text
//! skopeo / ctr --TLS (test CA), Basic auth--> Envoy (rendered LDS/CDS, Host routing)
//!   --> registry proxy per upstream (rendered config.yml, the operator's htpasswd,
//!       REGISTRY_PROXY_* env resolved from the Deployment's secretKeyRefs)
//!   --> Tap (counts upstream bytes, can blackhole) --> Distribution with token auth
//!                                                       + TokenServer (credentials required)
//! ```
//!
//! Only listen addresses, backend addresses and mount paths are changed for a local run; names
//! resolve through a private `/etc/hosts` bind-mounted in a mount namespace around each client
//! (`unshare --mount`, root only), so the clients send the real edge host names.

use super::tap::Tap;
use super::token::AuthUpstream;
use crate::support::{
    describe_output, free_port, patch_registry_config, require, rewrite_path_prefix, run, run_ok, tempdir,
    ConfigMapDir, Containerd, Envoy, Registry, Skopeo,
};
use base64::Engine;
use k8s_openapi::api::core::v1::EnvVar;
use mirrorfleet::build::node::{hosts_toml, NodeConfig, NODE_CONFIG_KEY};
use mirrorfleet::render::{render_str, RenderOptions, Rendered};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tempfile::TempDir;

/// Client users of the mirror (the users Secret the operator hashes into htpasswd).
pub const CI_USER: (&str, &str) = ("ci", "ci-password");
pub const NODE_USER: (&str, &str) = ("nodes", "nodes-password");
/// The upstreams' own credentials (the `credentialsSecretRef` Secrets).
pub const HUB_CREDS: (&str, &str) = ("hub-user", "hub-secret");
pub const GHCR_CREDS: (&str, &str) = ("ghcr-user", "ghcr-secret");
pub const DOMAIN: &str = "mirror.test";
/// Upstream name -> the registry clients name in image references.
pub const UPSTREAMS: [(&str, &str); 2] = [("dockerhub", "docker.io"), ("ghcr", "ghcr.io")];

/// Which storage the rendered proxies use; only filesystem kinds can run here (no S3 server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    EmptyDir,
    Pvc,
}

pub struct FleetOptions {
    pub cleanup_policy: &'static str,
    pub storage: Storage,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions { cleanup_policy: "garbageCollect", storage: Storage::EmptyDir }
    }
}

pub struct Fleet {
    // Drop order: clients' view first, then Envoy, proxies, taps, upstreams, files.
    pub envoy: Envoy,
    pub proxies: BTreeMap<String, Registry>,
    pub taps: BTreeMap<String, Tap>,
    pub upstreams: BTreeMap<String, AuthUpstream>,
    pub rendered: Rendered,
    /// The Secrets the spec references, resolved as kubelet would: (secret, key) -> value.
    pub secrets: BTreeMap<(String, String), String>,
    pub https_port: u16,
    pub ca_cert: PathBuf,
    hosts_file: PathBuf,
    htpasswd: PathBuf,
    /// The Envoy config directory (ConfigMap layout) and the localized files in it.
    envoy_dir: ConfigMapDir,
    envoy_files: [String; 3],
    tmp: TempDir,
}

/// Whether this machine can run the data path: every tool, and root for the mount namespace
/// (and containerd). Same contract as `support::tool`: panics under CI, SKIPs locally.
pub fn available() -> bool {
    if !crate::support::tools_available(&["docker-registry", "envoy", "skopeo", "umoci", "openssl", "unshare"]) {
        return false;
    }
    Containerd::available()
}

fn mirror_yaml(remote: &BTreeMap<&str, String>, opts: &FleetOptions) -> String {
    let storage = match opts.storage {
        Storage::EmptyDir => "{emptyDir: {sizeLimit: 1Gi}}",
        Storage::Pvc => "{persistentVolumeClaim: {size: 1Gi}}",
    };
    let replicas = if opts.storage == Storage::Pvc { 1 } else { 2 };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: users, namespace: mirrors}}\n\
         stringData: {{{ci}: {ci_pw}, {node}: {node_pw}}}\n---\n\
         apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: dp, namespace: mirrors}}\nspec:\n  \
         upstreams:\n  \
         - {{name: dockerhub, registry: docker.io, remoteURL: \"{hub}\", credentialsSecretRef: {{name: hub-creds}}}}\n  \
         - {{name: ghcr, registry: ghcr.io, remoteURL: \"{ghcr}\", credentialsSecretRef: {{name: ghcr-creds, usernameKey: user, passwordKey: token}}}}\n  \
         proxy: {{replicas: {replicas}, storage: {storage}}}\n  \
         clientAuth: {{usersSecretRef: {{name: users}}, nodeUser: {node}}}\n  \
         edge: {{domain: {DOMAIN}, tlsSecretRef: {{name: edge-tls}}}}\n  \
         cleanup: {{schedule: \"0 3 * * 0\", policy: {policy}}}\n  \
         nodeConfig: {{via: Edge, fallbackToUpstream: false}}\n",
        ci = CI_USER.0,
        ci_pw = CI_USER.1,
        node = NODE_USER.0,
        node_pw = NODE_USER.1,
        hub = remote["dockerhub"],
        ghcr = remote["ghcr"],
        policy = opts.cleanup_policy,
    )
}

impl Fleet {
    pub fn start(opts: FleetOptions) -> Fleet {
        let tmp = tempdir();
        let mut upstreams = BTreeMap::new();
        upstreams.insert("dockerhub".to_string(), AuthUpstream::start(HUB_CREDS.0, HUB_CREDS.1));
        upstreams.insert("ghcr".to_string(), AuthUpstream::start(GHCR_CREDS.0, GHCR_CREDS.1));
        let taps: BTreeMap<String, Tap> = upstreams.iter().map(|(n, u)| (n.clone(), Tap::start(u.addr()))).collect();
        let remote: BTreeMap<&str, String> = taps.iter().map(|(n, t)| (n.as_str(), t.url())).collect();

        let secrets: BTreeMap<(String, String), String> = [
            ("hub-creds", "username", HUB_CREDS.0),
            ("hub-creds", "password", HUB_CREDS.1),
            ("ghcr-creds", "user", GHCR_CREDS.0),
            ("ghcr-creds", "token", GHCR_CREDS.1),
        ]
        .iter()
        .map(|(s, k, v)| ((s.to_string(), k.to_string()), v.to_string()))
        .collect();

        let opts_r = RenderOptions { namespace: "mirrors".into(), ..RenderOptions::default() };
        let mut all = render_str(&mirror_yaml(&remote, &opts), &opts_r).unwrap_or_else(|e| panic!("render: {e}"));
        let rendered = all.remove(0);

        let htpasswd = tmp.path().join("htpasswd");
        fs::write(&htpasswd, secret_value(&rendered, "dp-htpasswd", "htpasswd")).unwrap();
        let mut proxies = BTreeMap::new();
        for (name, _) in UPSTREAMS {
            let config = &rendered.fleet.files[&format!("proxy/{name}/config.yml")];
            let addr = format!("127.0.0.1:{}", free_port());
            let storage = tmp.path().join(format!("cache-{name}"));
            let local = patch_registry_config(config, &addr, &storage, Some(&htpasswd));
            let env = proxy_env(&rendered, name, &secrets);
            let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            proxies.insert(name.to_string(), Registry::start_with_env(&local, &env_ref));
        }

        // Edge TLS from a test CA, for every upstream's edge host.
        let tls_dir = tmp.path().join("tls");
        fs::create_dir_all(&tls_dir).unwrap();
        let hosts: Vec<String> = UPSTREAMS.iter().map(|(n, _)| format!("{n}.{DOMAIN}")).collect();
        let ca_cert = test_ca_and_leaf(&tls_dir, &hosts);
        let https_port = free_port();
        let ports =
            BTreeMap::from([(9901u64, free_port()), (9902, free_port()), (8080, free_port()), (8443, https_port)]);
        let backends: BTreeMap<String, String> = proxies
            .iter()
            .map(|(n, p)| (format!("dp-proxy-{n}.mirrors.svc.cluster.local"), p.addr().to_string()))
            .collect();
        let config_dir = tmp.path().join("envoy-config");
        let localize = |yaml: &str| {
            let y = localize_socket_addresses(yaml, &ports, &backends);
            let y = rewrite_path_prefix(&y, "/etc/envoy/config", &config_dir);
            rewrite_path_prefix(&y, "/etc/envoy/tls", &tls_dir)
        };
        let files = &rendered.fleet.files;
        let (bootstrap, lds, cds) =
            (localize(&files["edge/envoy.yaml"]), localize(&files["edge/lds.yaml"]), localize(&files["edge/cds.yaml"]));
        let envoy_dir =
            ConfigMapDir::create(&config_dir, &[("envoy.yaml", &bootstrap), ("lds.yaml", &lds), ("cds.yaml", &cds)]);
        let envoy = Envoy::start(&config_dir, "envoy.yaml");

        let hosts_file = tmp.path().join("etc-hosts");
        fs::write(&hosts_file, format!("127.0.0.1 localhost {}\n", hosts.join(" "))).unwrap();
        Fleet {
            envoy,
            proxies,
            taps,
            upstreams,
            rendered,
            secrets,
            https_port,
            ca_cert,
            hosts_file,
            htpasswd,
            envoy_dir,
            envoy_files: [bootstrap, lds, cds],
            tmp,
        }
    }

    /// The rendered registry config of an upstream's proxy, localized to `addr` and `storage`.
    pub fn proxy_config(&self, upstream: &str, addr: &str, storage: &Path) -> String {
        let config = &self.rendered.fleet.files[&format!("proxy/{upstream}/config.yml")];
        patch_registry_config(config, addr, storage, Some(&self.htpasswd))
    }

    /// Starts another replica of an upstream's proxy on its own address and storage, with the
    /// Deployment's environment (the Envoy endpoints are unchanged: see [`Fleet::set_backends`]).
    pub fn start_replica(&self, upstream: &str, storage: &Path) -> Registry {
        let addr = format!("127.0.0.1:{}", free_port());
        let env = proxy_env(&self.rendered, upstream, &self.secrets);
        let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Registry::start_with_env(&self.proxy_config(upstream, &addr, storage), &env_ref)
    }

    /// Stops the main replica of an upstream's proxy (its storage stays).
    pub fn stop_proxy(&mut self, upstream: &str) {
        self.proxies.get_mut(upstream).unwrap().stop();
    }

    /// Starts the main replica again on the same address and storage (after [`Fleet::stop_proxy`]).
    pub fn start_proxy(&mut self, upstream: &str) {
        let old = self.proxies.remove(upstream).unwrap();
        let config = fs::read_to_string(old.config_path()).unwrap();
        drop(old);
        let env = proxy_env(&self.rendered, upstream, &self.secrets);
        let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.proxies.insert(upstream.to_string(), Registry::start_with_env(&config, &env_ref));
    }

    /// Points the edge's cluster for `upstream` at `addrs` (the Service's ready endpoints, as
    /// the replicas come and go) through the watched CDS file, and waits until Envoy applied it.
    pub fn set_backends(&mut self, upstream: &str, addrs: &[&str]) {
        use serde_yaml::Value;
        let mut cds: Value = serde_yaml::from_str(&self.envoy_files[2]).unwrap();
        let resources = cds["resources"].as_sequence_mut().unwrap();
        let cluster = resources.iter_mut().find(|c| c["name"].as_str() == Some(upstream)).expect("cluster");
        let endpoints: Vec<Value> = addrs
            .iter()
            .map(|a| {
                let (h, p) = a.rsplit_once(':').unwrap();
                serde_yaml::to_value(serde_json::json!({"endpoint": {"address": {"socket_address": {
                    "address": h, "port_value": p.parse::<u16>().unwrap()}}}}))
                .unwrap()
            })
            .collect();
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = Value::Sequence(endpoints);
        self.envoy_files[2] = serde_yaml::to_string(&cds).unwrap();
        let before = self.envoy.stat("cluster_manager.cds.update_success").unwrap_or(0);
        let [b, l, c] = &self.envoy_files;
        self.envoy_dir.update(&[("envoy.yaml", b), ("lds.yaml", l), ("cds.yaml", c)]);
        assert!(
            self.envoy.wait_stat_at_least("cluster_manager.cds.update_success", before + 1, Duration::from_secs(10)),
            "Envoy did not apply the new endpoints"
        );
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn proxy(&self, upstream: &str) -> &Registry {
        &self.proxies[upstream]
    }

    pub fn upstream(&self, upstream: &str) -> &AuthUpstream {
        &self.upstreams[upstream]
    }

    pub fn upstream_mut(&mut self, upstream: &str) -> &mut AuthUpstream {
        self.upstreams.get_mut(upstream).unwrap()
    }

    pub fn tap(&self, upstream: &str) -> &Tap {
        &self.taps[upstream]
    }

    /// `<upstream>.mirror.test:PORT`: the edge host of an upstream as clients address it.
    pub fn edge_host(&self, upstream: &str) -> String {
        format!("{upstream}.{DOMAIN}:{}", self.https_port)
    }

    /// The cache directory of an upstream's proxy (filesystem storage).
    pub fn cache_dir(&self, upstream: &str) -> PathBuf {
        self.tmp.path().join(format!("cache-{upstream}"))
    }

    /// Wraps a client command so it runs with the fleet's `/etc/hosts` (edge names -> 127.0.0.1)
    /// in a private mount namespace; nothing outside the command sees the change.
    pub fn with_hosts(&self, cmd: &Command) -> Command {
        let mut wrapped = Command::new(require("unshare"));
        wrapped
            .args(["--mount", "sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""])
            .arg(&self.hosts_file)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        wrapped
    }

    /// `skopeo copy docker://<image_ref> oci:<dest>` the way Podman/CRI-O would pull: a
    /// registries.conf mirroring docker.io and ghcr.io to the edge hosts, credentials in an auth
    /// file (the only way skopeo sends mirror credentials), the test CA as the only trust root.
    pub fn skopeo_pull(&self, image_ref: &str, user: (&str, &str), dest: &Path) -> Output {
        self.skopeo_pull_within(image_ref, user, dest, Duration::from_secs(120))
    }

    /// [`Fleet::skopeo_pull`], killed after `timeout` (its stderr then ends with `TIMEOUT`).
    pub fn skopeo_pull_within(&self, image_ref: &str, user: (&str, &str), dest: &Path, timeout: Duration) -> Output {
        let dir = tempdir();
        let conf = dir.path().join("registries.conf");
        let mut text = String::new();
        for (name, registry) in UPSTREAMS {
            text.push_str(&format!(
                "[[registry]]\nprefix = \"{registry}\"\nlocation = \"{registry}\"\n\
                 [[registry.mirror]]\nlocation = \"{}\"\n\n",
                self.edge_host(name)
            ));
        }
        fs::write(&conf, text).unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", user.0, user.1));
        let auths: serde_json::Map<String, serde_json::Value> =
            UPSTREAMS.iter().map(|(n, _)| (self.edge_host(n), serde_json::json!({"auth": auth}))).collect();
        let authfile = dir.path().join("auth.json");
        fs::write(&authfile, serde_json::json!({"auths": auths}).to_string()).unwrap();
        let certs = dir.path().join("certs");
        fs::create_dir_all(&certs).unwrap();
        fs::copy(&self.ca_cert, certs.join("ca.crt")).unwrap();

        let skopeo = Skopeo::new();
        let mut cmd = skopeo.command();
        cmd.arg("--registries-conf")
            .arg(&conf)
            .arg("copy")
            .arg("--src-authfile")
            .arg(&authfile)
            .arg("--src-cert-dir")
            .arg(&certs)
            .arg(format!("docker://{image_ref}"))
            .arg(format!("oci:{}", dest.display()));
        run(&mut self.with_hosts(&cmd), timeout)
    }

    /// The hosts.toml the node agent writes for `registry` (rendered node config, via the edge,
    /// with the node-auth header), with the local edge port and the test CA added.
    pub fn node_hosts_toml(&self, registry: &str) -> String {
        let cm = self
            .rendered
            .fleet
            .children
            .config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some("dp-node-config"))
            .expect("node config map rendered");
        let cfg: NodeConfig = serde_json::from_str(&cm.data.as_ref().unwrap()[NODE_CONFIG_KEY]).unwrap();
        let mut entry =
            cfg.registries.iter().find(|e| e.registry == registry).expect("registry in node config").clone();
        // Pods reach the edge on 443; here it listens on a free port.
        assert!(entry.mirror.starts_with("https://") && !entry.mirror[8..].contains(':'), "{}", entry.mirror);
        entry.mirror = format!("{}:{}", entry.mirror, self.https_port);
        let header = secret_value(&self.rendered, "dp-node-auth", "authorization");
        let toml = hosts_toml(&cfg.mirror, &entry, Some(&header));
        // The node trusts the edge's CA (a public CA on real nodes; the test CA here).
        let key = format!("[host.\"{}\"]\n", entry.mirror);
        assert!(toml.contains(&key), "hosts.toml has no {key}: {toml}");
        toml.replacen(&key, &format!("{key}  ca = \"{}\"\n", self.ca_cert.display()), 1)
    }

    /// `ctr images pull` of `image_ref` with the node's hosts.toml for its registry.
    pub fn ctr_pull(&self, containerd: &Containerd, image_ref: &str) -> Output {
        let registry = image_ref.split('/').next().unwrap();
        let hosts = self.tmp.path().join(format!("certs.d-{}", fastrand_suffix()));
        crate::support::write_hosts_toml(&hosts, registry, &self.node_hosts_toml(registry));
        let mut cmd = Command::new(require("ctr"));
        cmd.arg("--address")
            .arg(containerd.socket())
            .args(["--namespace", crate::support::containerd::NAMESPACE])
            .args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(&hosts)
            .arg(image_ref);
        run(&mut self.with_hosts(&cmd), Duration::from_secs(120))
    }

    /// Proxy log lines that record a request to `path_part` with HTTP status `status`.
    pub fn proxy_requests(&self, upstream: &str, path_part: &str, status: u16) -> usize {
        count_access(&self.proxy(upstream).log(), path_part, status)
    }

    /// Upstream access-log lines for blob GETs (the bytes that cost egress).
    pub fn upstream_blob_gets(&self, upstream: &str) -> usize {
        self.upstream(upstream).log().lines().filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/")).count()
    }
}

/// Combined-format access lines (`"GET /v2/... HTTP/1.1" 200 ...`) for `path_part` and `status`.
pub fn count_access(log: &str, path_part: &str, status: u16) -> usize {
    let status = format!("\" {status} ");
    log.lines().filter(|l| l.contains(" HTTP/1.1\"") && l.contains(path_part) && l.contains(&status)).count()
}

fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A Secret's value from the rendered children (Secrets the operator generates).
pub fn secret_value(r: &Rendered, name: &str, key: &str) -> String {
    let s = r
        .fleet
        .children
        .secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("secret {name} rendered"));
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

/// The proxy container's environment as kubelet would set it: literal values, and
/// `secretKeyRef`s resolved from `secrets`. Panics on any other source, so a new kind of env
/// var in the Deployment cannot be silently dropped here.
pub fn proxy_env(r: &Rendered, upstream: &str, secrets: &BTreeMap<(String, String), String>) -> Vec<(String, String)> {
    let name = format!("dp-proxy-{upstream}");
    let d = r.fleet.children.deployments.iter().find(|d| d.metadata.name.as_deref() == Some(&name)).unwrap();
    let container = &d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    container
        .env
        .iter()
        .flatten()
        .map(|EnvVar { name, value, value_from }| {
            if let Some(v) = value {
                return (name.clone(), v.clone());
            }
            let r = value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).expect("only secretKeyRef env");
            let v = secrets
                .get(&(r.name.clone(), r.key.clone()))
                .unwrap_or_else(|| panic!("env {name}: no secret {}/{}", r.name, r.key));
            (name.clone(), v.clone())
        })
        .collect()
}

/// A test CA and a leaf for `hosts` signed by it: `dir/tls.crt` + `dir/tls.key` (the names of a
/// Kubernetes TLS Secret volume). Returns the CA certificate path.
pub fn test_ca_and_leaf(dir: &Path, hosts: &[String]) -> PathBuf {
    let openssl = require("openssl");
    let t = Duration::from_secs(30);
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let (ca_key, ca_crt) = (dir.join("ca.key"), dir.join("ca.crt"));
    run_ok(
        Command::new(&openssl)
            .args(["req", "-x509", "-days", "2", "-subj", "/CN=mirrorfleet test CA"])
            .args(ec)
            .args(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca_crt),
        t,
    );
    let csr = dir.join("tls.csr");
    run_ok(
        Command::new(&openssl)
            .args(["req", "-new", "-subj", &format!("/CN={}", hosts[0])])
            .args(ec)
            .arg("-keyout")
            .arg(dir.join("tls.key"))
            .arg("-out")
            .arg(&csr),
        t,
    );
    let ext = dir.join("leaf.ext");
    let san = hosts.iter().map(|h| format!("DNS:{h}")).collect::<Vec<_>>().join(",");
    fs::write(&ext, format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")).unwrap();
    let out = run(
        Command::new(&openssl)
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca_crt)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-CAcreateserial", "-extfile"])
            .arg(&ext)
            .arg("-out")
            .arg(dir.join("tls.crt")),
        t,
    );
    assert!(out.status.success(), "sign leaf: {}", describe_output(&out));
    ca_crt
}

/// Rewrites every `socket_address` of an Envoy config rendered for the pod: listen ports in
/// `ports` become 127.0.0.1:<local>, proxy Service names in `backends` become their local
/// `host:port`. Anything else is a test bug (a new address the harness does not know).
pub fn localize_socket_addresses(
    yaml: &str,
    ports: &BTreeMap<u64, u16>,
    backends: &BTreeMap<String, String>,
) -> String {
    use serde_yaml::Value;
    fn fix(sa: &mut serde_yaml::Mapping, ports: &BTreeMap<u64, u16>, backends: &BTreeMap<String, String>) {
        let host = sa.get("address").and_then(Value::as_str).unwrap_or_default().to_string();
        let port = sa.get("port_value").and_then(Value::as_u64).unwrap_or_default();
        let (h, p) = match (backends.get(&host), ports.get(&port)) {
            (Some(b), _) => {
                let (h, p) = b.rsplit_once(':').unwrap();
                (h.to_string(), p.parse::<u64>().unwrap())
            }
            (None, Some(local)) => ("127.0.0.1".to_string(), u64::from(*local)),
            (None, None) => panic!("unknown socket address {host}:{port} in the rendered Envoy config"),
        };
        sa.insert("address".into(), h.into());
        sa.insert("port_value".into(), p.into());
    }
    fn walk(v: &mut Value, ports: &BTreeMap<u64, u16>, backends: &BTreeMap<String, String>) {
        match v {
            Value::Mapping(m) => {
                for (k, child) in m.iter_mut() {
                    match (k.as_str(), child) {
                        (Some("socket_address"), Value::Mapping(sa)) => fix(sa, ports, backends),
                        (_, child) => walk(child, ports, backends),
                    }
                }
            }
            Value::Sequence(items) => items.iter_mut().for_each(|i| walk(i, ports, backends)),
            _ => {}
        }
    }
    let mut doc: Value = serde_yaml::from_str(yaml).expect("envoy yaml");
    walk(&mut doc, ports, backends);
    serde_yaml::to_string(&doc).unwrap()
}
