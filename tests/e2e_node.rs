//! Real-node tier (`make e2e-node`): the fleet as a user runs it, every child a real pod on the
//! k8s harness's real node (kubelet, containerd, runc, CNI, kube-proxy), and the node's own
//! containerd pulling through it.
//!
//! Set-up (once, by the first step that needs it): the images — the operator's from
//! `make image-oci`, a registry-proxy image from Debian's Distribution 2.8 binary (or the 3.x
//! binary `MIRRORFLEET_REGISTRY_V3` names, with `MIRRORFLEET_E2E_NODE_PROXY=v3`), an Envoy image
//! from pip's binary, and test images that exist nowhere else — are built with umoci and imported
//! into the node; two private upstream registries (Distribution with Bearer-token auth) run on the
//! node's address, each holding a test image; `helm install` of the chart with the local operator
//! image into a namespace enforcing the `restricted` Pod Security Standard; one RegistryMirror
//! with two upstreams, credentials, client auth, a TLS edge, cleanup and node config pointed at the
//! real containerd.
//!
//! The steps run in order (`--test-threads=1`; libtest runs them sorted by name) and each fails
//! when its part is broken. The last one deletes the mirror and tears everything down.
//!
//! Names: the upstream registries are `NODE_IP:PORT` (the harness's node address, which pods reach
//! and nothing off this machine answers); the edge hosts are `<upstream>.mirror.test`, resolved on
//! the machine through marked `/etc/hosts` lines (the node's containerd and the hostNetwork agent
//! read it; the lines go at the end).

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::datapath::token::{AuthUpstream, TOKEN_SERVICE};
use support::kubectl::{kubectl, kubectl_ok, require_cluster};
use support::node::{app_image, envoy_image, registry_image, EtcHosts, RealNode};
use support::{describe_output, run, tempdir};

const SYSTEM_NS: &str = "mf-node-system";
const NS: &str = "mf-node-e2e";
const RELEASE: &str = "mirrorfleet";
const MIRROR: &str = "fleet";
const DOMAIN: &str = "mirror.test";
const OPERATOR_IMAGE: &str = "localhost/mirrorfleet/mirrorfleet:e2e";
const ENVOY_IMAGE: &str = "localhost/mirrorfleet-e2e/envoy:e2e";
/// Client users of the mirror, and the upstreams' own credentials.
const CI_USER: (&str, &str) = ("ci", "ci-password");
const NODE_USER: &str = "nodes";
const NODE_PASSWORDS: [&str; 2] = ["nodes-password", "nodes-password-rotated"];
const UPSTREAM_CREDS: [(&str, &str, &str); 3] = [
    ("alpha", "alpha-user", "alpha-secret"),
    ("beta", "beta-user", "beta-secret"),
    ("gamma", "gamma-user", "gamma-secret"),
];
const TIMEOUT: Duration = Duration::from_secs(240);

struct Fixture {
    node: RealNode,
    etc_hosts: EtcHosts,
    upstreams: BTreeMap<String, AuthUpstream>,
    proxy_image: String,
    tmp: tempfile::TempDir,
    figures: Vec<String>,
}

impl Fixture {
    /// The upstream's name as clients write it: its front on the node's address, where the
    /// registry and its token realm share one host:port.
    fn registry(&self, upstream: &str) -> String {
        self.upstreams[upstream].public_addr().to_string()
    }

    /// The test image held by `upstream` only.
    fn app(&self, upstream: &str) -> String {
        format!("{}/e2e/{upstream}-app:1", self.registry(upstream))
    }

    fn figure(&mut self, line: String) {
        eprintln!("e2e-node FIGURE: {line}");
        self.figures.push(line);
    }
}

static FIXTURE: OnceLock<Mutex<Option<Fixture>>> = OnceLock::new();

/// The shared fleet, set up by the first step that asks for it.
fn fixture() -> MutexGuard<'static, Option<Fixture>> {
    require_cluster();
    let mut guard = FIXTURE.get_or_init(|| Mutex::new(None)).lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        // The upstreams are child processes that die with the thread that spawned them
        // (PDEATHSIG, see support::Proc), and each test runs on its own thread: set up on one
        // that lives as long as the test binary.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(set_up));
            loop {
                std::thread::park();
            }
        });
        *guard = Some(rx.recv().unwrap().unwrap_or_else(|e| std::panic::resume_unwind(e)));
    }
    guard
}

fn proxy_variant() -> (String, PathBuf) {
    match std::env::var("MIRRORFLEET_E2E_NODE_PROXY").as_deref() {
        Ok("v3") => {
            let bin = std::env::var("MIRRORFLEET_REGISTRY_V3").expect(
                "MIRRORFLEET_E2E_NODE_PROXY=v3 needs MIRRORFLEET_REGISTRY_V3 (a Distribution 3.x registry binary)",
            );
            let version = version_of(&[&bin, "--version"]);
            eprintln!("e2e-node: proxy image from {bin} ({version})");
            ("localhost/mirrorfleet-e2e/registry:v3".into(), bin.into())
        }
        _ => {
            let bin = support::require("docker-registry");
            eprintln!(
                "e2e-node: proxy image from {} ({})",
                bin.display(),
                version_of(&[bin.to_str().unwrap(), "--version"])
            );
            ("localhost/mirrorfleet-e2e/registry:v2".into(), bin)
        }
    }
}

fn version_of(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().expect("run for version");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn set_up() -> Fixture {
    let node = RealNode::from_env();
    let helm = support::require("helm");
    tear_down_cluster_objects(&helm, &node);
    let etc_hosts = EtcHosts::new("mirrorfleet-e2e-node");
    let tmp = tempdir();

    // Images: nothing here may be fetched from off this machine.
    let operator_tar = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/image/mirrorfleet-oci.tar");
    assert!(operator_tar.exists(), "{} is missing: run `make image-oci` (make e2e-node does)", operator_tar.display());
    node.import(OPERATOR_IMAGE, &operator_tar);
    let (proxy_image, registry_bin) = proxy_variant();
    node.import(&proxy_image, &registry_image(tmp.path(), &proxy_image, &registry_bin));
    let envoy = support::require("envoy");
    eprintln!(
        "e2e-node: Envoy image from {} ({})",
        envoy.display(),
        version_of(&[envoy.to_str().unwrap(), "--version"])
    );
    node.import(ENVOY_IMAGE, &envoy_image(tmp.path(), ENVOY_IMAGE, &envoy));

    // Private upstreams on the node's address, each with an image nobody else has.
    let mut upstreams = BTreeMap::new();
    for (name, user, password) in UPSTREAM_CREDS {
        let up = AuthUpstream::start_on(&node.ip, user, password);
        let image = format!("localhost/e2e/{name}-app:1");
        let tar = app_image(tmp.path(), &image, &format!("{name} {}", std::process::id()));
        let dst = format!("docker://{}/e2e/{name}-app:1", up.addr());
        let creds = format!("{user}:{password}");
        let out = support::Skopeo::new().copy(
            &format!("oci-archive:{}", tar.display()),
            &dst,
            &["--dest-tls-verify=false", "--dest-creds", &creds],
        );
        assert!(out.status.success(), "push {dst}: {}", describe_output(&out));
        upstreams.insert(name.to_string(), up);
    }

    // The operator, as a user installs it.
    for (ns, level) in [(SYSTEM_NS, "restricted"), (NS, "privileged")] {
        kubectl_ok(&["create", "namespace", ns], None);
        kubectl_ok(&["label", "namespace", ns, &format!("pod-security.kubernetes.io/enforce={level}")], None);
    }
    let started = Instant::now();
    let out = run(
        Command::new(&helm)
            .args(["install", RELEASE, concat!(env!("CARGO_MANIFEST_DIR"), "/charts/mirrorfleet")])
            .args([
                "-n",
                SYSTEM_NS,
                "--set",
                "image.repository=localhost/mirrorfleet/mirrorfleet",
                "--set",
                "image.tag=e2e",
                "--set",
                &format!("watchNamespace={NS}"),
                "--set",
                "logging.level=info\\,mirrorfleet=debug\\,kube=warn",
                "--wait",
                "--timeout",
                "240s",
            ]),
        Duration::from_secs(300),
    );
    assert!(out.status.success(), "helm install: {}\n{}", describe_output(&out), describe(SYSTEM_NS));
    eprintln!("e2e-node: helm install --wait: {:.1}s", started.elapsed().as_secs_f64());

    let mut fx = Fixture { node, etc_hosts, upstreams, proxy_image, tmp, figures: Vec::new() };
    apply_mirror(&fx, &["alpha", "beta"], NODE_PASSWORDS[0]);
    let started = Instant::now();
    wait_for("the mirror Ready", TIMEOUT, || (condition("Ready").as_deref() == Some("True")).then_some(()));
    fx.figure(format!(
        "create -> Ready on the real node (2 upstreams, edge, node agent): {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    fx
}

/// `upstreams[].auth` of a test upstream: its token challenge, so each proxy runs the upstream
/// sidecar (its realm is on the upstream's own host:port, [`AuthUpstream::start_on`]).
fn sidecar_auth(addr: &str) -> String {
    format!("auth: {{realm: \"http://{addr}/token\", service: {TOKEN_SERVICE}}}")
}

fn mirror_yaml(fx: &Fixture, upstreams: &[&str], via: &str, proxy_node_selector: &str) -> String {
    let ups: Vec<String> = upstreams
        .iter()
        .map(|u| {
            let addr = fx.registry(u);
            // gamma has no `auth`: the operator learns its challenge (step 07).
            let auth = if *u == "gamma" { String::new() } else { format!(", {}", sidecar_auth(&addr)) };
            format!(
                "  - {{name: {u}, registry: \"{addr}\", remoteURL: \"http://{addr}\", credentialsSecretRef: {{name: {u}-creds}}{auth}}}\n",
            )
        })
        .collect();
    format!(
        "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: {MIRROR}, namespace: {NS}}}\nspec:\n\
         \x20 upstreams:\n{ups}\
         \x20 proxy: {{image: \"{proxy}\", replicas: 1, storage: {{emptyDir: {{sizeLimit: 1Gi}}}}, nodeSelector: {{{proxy_node_selector}}}}}\n\
         \x20 clientAuth: {{usersSecretRef: {{name: users}}, nodeUser: {NODE_USER}}}\n\
         \x20 edge: {{image: \"{ENVOY_IMAGE}\", domain: {DOMAIN}, tlsSecretRef: {{name: edge-tls}}}}\n\
         \x20 cleanup: {{schedule: \"0 3 * * 0\", policy: garbageCollect}}\n\
         \x20 nodeConfig:\n\
         \x20   via: {via}\n\
         \x20   containerd: {{certsDir: \"{certs}\", configFile: \"{config}\"}}\n",
        ups = ups.concat(),
        proxy = fx.proxy_image,
        certs = fx.node.certs_dir.display(),
        config = fx.node.containerd_config.display(),
    )
}

/// The Secrets and the mirror (two upstreams at first).
fn apply_mirror(fx: &Fixture, upstreams: &[&str], node_password: &str) {
    let mut secrets = String::new();
    for (name, user, password) in UPSTREAM_CREDS {
        secrets += &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-creds, namespace: {NS}}}\n\
             stringData: {{username: {user}, password: {password}}}\n---\n"
        );
    }
    secrets += &users_secret(node_password);
    // Edge TLS from a test CA for every upstream's edge host; ca.crt as cert-manager writes it.
    let tls = fx.tmp.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let hosts: Vec<String> = UPSTREAM_CREDS.iter().map(|(n, _, _)| format!("{n}.{DOMAIN}")).collect();
    let ca = support::datapath::fleet::test_ca_and_leaf(&tls, &hosts);
    kubectl_ok(&["apply", "-f", "-"], Some(&secrets));
    let mut create = Command::new("kubectl");
    create.args(["-n", NS, "create", "secret", "generic", "edge-tls", "--type=kubernetes.io/tls"]);
    create.arg(format!("--from-file=tls.crt={}", tls.join("tls.crt").display()));
    create.arg(format!("--from-file=tls.key={}", tls.join("tls.key").display()));
    create.arg(format!("--from-file=ca.crt={}", ca.display()));
    let out = run(&mut create, Duration::from_secs(30));
    assert!(out.status.success(), "create edge-tls: {}", describe_output(&out));
    kubectl_ok(&["apply", "-f", "-"], Some(&mirror_yaml(fx, upstreams, "Service", "")));
}

fn users_secret(node_password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: users, namespace: {NS}}}\n\
         stringData: {{{}: {}, {NODE_USER}: {node_password}}}\n",
        CI_USER.0, CI_USER.1
    )
}

// ---------------------------------------------------------------------------------------------
// Cluster helpers

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&kubectl_ok(args, None)).unwrap()
}

fn mirror() -> Value {
    json(&["-n", NS, "get", "registrymirror", MIRROR, "-o", "json"])
}

fn condition(type_: &str) -> Option<String> {
    let m = mirror();
    let c = m["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?.clone();
    Some(c["status"].as_str()?.to_string())
}

fn pods(ns: &str, selector: &str) -> Vec<Value> {
    json(&["-n", ns, "get", "pods", "-l", selector, "-o", "json"])["items"].as_array().cloned().unwrap_or_default()
}

fn selector(component: &str) -> String {
    format!("app.kubernetes.io/instance={MIRROR},app.kubernetes.io/component={component}")
}

fn pod_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["metadata"]["deletionTimestamp"].is_null()
        && p["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let v = support::wait_until(timeout, f)
        .unwrap_or_else(|| panic!("e2e-node: timed out after {timeout:?} waiting for: {what}\n{}", describe(NS)));
    eprintln!("e2e-node: {what}: {:.1}s", start.elapsed().as_secs_f64());
    v
}

/// What a person would look at when a step times out.
fn describe(ns: &str) -> String {
    let mut out = String::new();
    for args in [
        vec!["get", "registrymirrors,deploy,ds,pods,svc,jobs", "-o", "wide"],
        vec!["get", "registrymirrors", "-o", "yaml"],
        vec!["get", "events", "--sort-by=.lastTimestamp"],
    ] {
        let mut a = vec!["-n", ns];
        a.extend(args);
        let o = kubectl(&a, None);
        out += &format!(
            "$ kubectl {}\n{}{}\n",
            a.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    out
}

fn logs(ns: &str, selector: &str, container: &str) -> String {
    let o = kubectl(
        &["-n", ns, "logs", "-l", selector, "-c", container, "--tail=-1", "--prefix", "--max-log-requests=10"],
        None,
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn proxy_log(upstream: &str) -> String {
    logs(NS, &format!("{},mirrorfleet.io/upstream={upstream}", selector("proxy")), "registry")
}

/// Access-log lines of a Distribution log (combined format) for `path_part`: (remote IP, line).
fn access_lines(log: &str, path_part: &str) -> Vec<(String, String)> {
    log.lines()
        .filter(|l| l.contains(" HTTP/1.1\"") && l.contains(path_part))
        .map(|l| {
            // `kubectl logs --prefix` puts `[pod/...] ` first.
            let l = if l.starts_with("[pod/") { l.split_once("] ").map_or(l, |(_, rest)| rest) } else { l };
            (l.split_whitespace().next().unwrap_or_default().to_string(), l.to_string())
        })
        .collect()
}

/// Blob GETs the upstream served: (client IP, request line), as its front recorded them.
fn upstream_blob_gets(fx: &Fixture, upstream: &str, repo: &str) -> Vec<(String, String)> {
    let prefix = format!("GET /v2/{repo}/blobs/");
    fx.upstreams[upstream].front_requests().into_iter().filter(|(_, line)| line.starts_with(&prefix)).collect()
}

/// A Pod running `image` on the node; returns the kubelet's pull time when it pulled.
/// A restricted pod running `image`, pulled if not present.
fn app_pod(name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"e2e-node": "app"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    })
}

fn run_pod(name: &str, image: &str) -> Option<f64> {
    let _ = kubectl(&["-n", NS, "delete", "pod", name, "--ignore-not-found", "--wait=true", "--grace-period=1"], None);
    let pod = app_pod(name, image);
    kubectl_ok(&["apply", "-f", "-"], Some(&pod.to_string()));
    wait_for(&format!("pod {name} ({image}) Running"), TIMEOUT, || {
        let p = json(&["-n", NS, "get", "pod", name, "-o", "json"]);
        let waiting = &p["status"]["containerStatuses"][0]["state"]["waiting"];
        if let Some(reason) = waiting["reason"].as_str() {
            assert!(
                !matches!(reason, "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName"),
                "pod {name}: {reason}: {}\n{}",
                waiting["message"],
                describe(NS)
            );
        }
        pod_ready(&p).then_some(())
    });
    let events = events_of(name, "Pulled");
    kubectl_ok(&["-n", NS, "delete", "pod", name, "--wait=true", "--grace-period=1"], None);
    events["items"].as_array()?.iter().rev().find_map(|e| pull_seconds(e["message"].as_str()?))
}

/// "Successfully pulled image \"x\" in 1.234s (1.234s including waiting)..." -> 1.234
fn pull_seconds(message: &str) -> Option<f64> {
    let rest = message.split(" in ").nth(1)?;
    let d = rest.split_whitespace().next()?;
    parse_go_duration(d)
}

fn parse_go_duration(d: &str) -> Option<f64> {
    if let Some(ms) = d.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    let (m, s) = match d.split_once('m') {
        Some((m, s)) => (m.parse::<f64>().ok()?, s),
        None => (0.0, d),
    };
    Some(m * 60.0 + s.strip_suffix('s')?.parse::<f64>().ok()?)
}

fn cluster_ip(service: &str) -> String {
    json(&["-n", NS, "get", "svc", service, "-o", "json"])["spec"]["clusterIP"].as_str().unwrap().to_string()
}

fn tear_down_cluster_objects(helm: &std::path::Path, node: &RealNode) {
    if kubectl(&["get", "namespace", NS], None).status.success() {
        let _ = kubectl(&["-n", NS, "delete", "registrymirrors", "--all", "--wait=false"], None);
        // No operator may be left to release the finalizer.
        let _ = kubectl(
            &["-n", NS, "patch", "registrymirror", MIRROR, "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#],
            None,
        );
    }
    let _ = Command::new(helm).args(["uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout", "120s"]).output();
    for ns in [NS, SYSTEM_NS] {
        let _ = kubectl(&["delete", "namespace", ns, "--ignore-not-found", "--wait=true", "--timeout=180s"], None);
    }
    // A run killed half-way leaves its agents' files behind (no agent is left to remove them):
    // only files marked as this test namespace's.
    if let Ok(dirs) = std::fs::read_dir(node.certs_dir.as_path()) {
        for dir in dirs.flatten() {
            let dir = dir.path();
            let marked = std::fs::read_to_string(dir.join("hosts.toml"))
                .is_ok_and(|t| t.starts_with(&format!("# managed-by: mirrorfleet (RegistryMirror {NS}/")));
            if marked {
                eprintln!("e2e-node: removing {} left by an earlier run", dir.display());
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The steps

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step01_helm_installed_operator_runs_ready_from_the_local_image() {
    let _fx = fixture();
    let ps = pods(SYSTEM_NS, "app.kubernetes.io/name=mirrorfleet");
    assert!(!ps.is_empty(), "no operator pods\n{}", describe(SYSTEM_NS));
    for p in &ps {
        assert!(pod_ready(p), "operator pod not Running/Ready: {}", p["status"]);
        assert_eq!(p["spec"]["containers"][0]["image"], OPERATOR_IMAGE);
        assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0, "the operator restarted");
    }
    // Pods really run: the operator answers its own probes and logs its leadership.
    let log = logs(SYSTEM_NS, "app.kubernetes.io/name=mirrorfleet", "operator");
    assert!(!log.contains("forbidden"), "the operator hit RBAC refusals:\n{log}");
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step02_every_child_pod_is_ready_by_its_own_probes_and_status_tells_the_truth() {
    let fx = fixture();
    let fx = fx.as_ref().unwrap();
    for component in ["proxy", "edge", "node-agent"] {
        let ps = pods(NS, &selector(component));
        assert!(!ps.is_empty(), "no {component} pods\n{}", describe(NS));
        for p in &ps {
            assert!(pod_ready(p), "{component} pod {} not Running/Ready\n{}", p["metadata"]["name"], describe(NS));
            for c in p["spec"]["containers"].as_array().unwrap() {
                assert!(!c["readinessProbe"].is_null(), "{component} container {} has no readiness probe", c["name"]);
                assert!(
                    !c["resources"]["requests"].is_null(),
                    "{component} container {} has no resource requests",
                    c["name"]
                );
            }
            for c in p["status"]["containerStatuses"].as_array().unwrap() {
                assert_eq!(c["ready"], true, "{component} container {} not ready", c["name"]);
            }
        }
    }
    let m = mirror();
    let status = &m["status"];
    assert_eq!(status["observedGeneration"], m["metadata"]["generation"]);
    for u in status["upstreams"].as_array().unwrap() {
        let name = u["name"].as_str().unwrap();
        let ready = pods(NS, &format!("{},mirrorfleet.io/upstream={name}", selector("proxy")))
            .iter()
            .filter(|p| pod_ready(p))
            .count();
        assert_eq!(u["readyReplicas"], ready as i64, "status.upstreams[{name}].readyReplicas vs pods");
        let ip = cluster_ip(&format!("{MIRROR}-proxy-{name}"));
        assert_eq!(u["endpoint"], format!("http://{ip}:5000"));
        assert_eq!(u["registry"], fx.registry(name));
    }
    let agents = pods(NS, &selector("node-agent")).iter().filter(|p| pod_ready(p)).count();
    assert_eq!(status["nodes"]["configured"], agents as i64);
    assert_eq!(status["nodes"]["desired"], 1);
    // What `kubectl get regmirror` prints.
    let table = kubectl_ok(&["-n", NS, "get", "regmirror", MIRROR, "--no-headers"], None);
    let cols: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(&cols[..4], &[MIRROR, "True", "2/2", "1/1"], "kubectl get regmirror: {table}");
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step03_node_agent_wrote_hosts_toml_into_the_real_containerd_config_path() {
    let fx = fixture();
    let fx = fx.as_ref().unwrap();
    for u in ["alpha", "beta"] {
        let toml = fx.node.hosts_toml(&fx.registry(u)).unwrap_or_else(|| panic!("no hosts.toml for {u}"));
        assert!(toml.starts_with("# managed-by: mirrorfleet"), "{toml}");
        let ip = cluster_ip(&format!("{MIRROR}-proxy-{u}"));
        assert!(toml.contains(&format!("[host.\"http://{ip}:5000\"]")), "{u}: mirror host missing:\n{toml}");
        assert!(toml.contains(&format!("server = \"http://{}\"", fx.registry(u))), "{u}: fallback:\n{toml}");
        assert!(toml.contains("Authorization = \"Basic "), "{u}: no client auth header");
    }
    // The agent's report (what `kubectl exec <agent> -- cat /run/mirrorfleet/status.json` would
    // print, if the image had a `cat`): read from the Pod's emptyDir on the node.
    let agent = &pods(NS, &selector("node-agent"))[0];
    let status = fx.node.pod_volume_file(agent["metadata"]["uid"].as_str().unwrap(), "status", "status.json");
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    let check = &status["report"]["containerd"];
    assert!(
        check["state"] == "effective" && check["config_path"] == fx.node.certs_dir.display().to_string(),
        "the agent did not report the real containerd's config_path as effective: {status:#}"
    );
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step04_a_pod_whose_image_is_only_upstream_starts_through_the_proxy_then_from_its_cache() {
    let mut guard = fixture();
    let fx = guard.as_mut().unwrap();
    let image = fx.app("alpha");
    let repo = "e2e/alpha-app";
    assert!(!fx.node.has_image(&image), "{image} is on the node before the test");
    let cold = run_pod("cold", &image).expect("the kubelet pulled");
    let proxy_ips: Vec<String> = pods(NS, &format!("{},mirrorfleet.io/upstream=alpha", selector("proxy")))
        .iter()
        .map(|p| p["status"]["podIP"].as_str().unwrap().to_string())
        .collect();
    let plog = proxy_log("alpha");
    assert!(
        !access_lines(&plog, &format!("/v2/{repo}/manifests/1")).is_empty(),
        "the proxy served no manifest:\n{plog}"
    );
    let up = upstream_blob_gets(fx, "alpha", repo);
    assert!(!up.is_empty(), "the upstream served no blob");
    for (ip, line) in &up {
        assert!(proxy_ips.contains(ip) || ip.starts_with("10.244."), "the upstream saw {ip}, not the proxy: {line}");
        assert_ne!(ip, &fx.node.ip, "the node pulled from the upstream directly: {line}");
    }
    let tokens = fx.upstreams["alpha"].token_server().requests();
    assert!(
        tokens.iter().any(|t| t.granted && t.user.as_deref() == Some("alpha-user")),
        "the proxy used no upstream credentials"
    );

    // Warm: the image gone from the node, pulled again, served from the mirror's cache.
    fx.node.remove_image(&image);
    let before = upstream_blob_gets(fx, "alpha", repo).len();
    let warm = run_pod("warm", &image).expect("the kubelet pulled again");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(upstream_blob_gets(fx, "alpha", repo).len(), before, "the warm pull fetched blobs from the upstream");
    fx.node.remove_image(&image);

    // Direct, for comparison: the same image from the upstream with no mirror in between.
    let direct_dir = fx.tmp.path().join("direct-certs");
    let reg = fx.registry("alpha");
    std::fs::create_dir_all(direct_dir.join(&reg)).unwrap();
    // containerd 1.6 refuses a hosts.toml without a [host] table ("invalid `host` tree").
    std::fs::write(
        direct_dir.join(&reg).join("hosts.toml"),
        format!("server = \"http://{reg}\"\n\n[host.\"http://{reg}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    let started = Instant::now();
    let out = fx.node.pull_with(&image, &direct_dir, Some("alpha-user:alpha-secret"));
    let direct = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "direct pull: {}", describe_output(&out));
    fx.node.remove_image(&image);
    fx.figure(format!(
        "node pull of {image} (kubelet's 'Pulled' time): cold through the mirror {cold:.3}s, warm from its cache {warm:.3}s; direct from the upstream (ctr pull) {direct:.3}s"
    ));
}

/// `status.upstreams[name=upstream]` of the main mirror (Null while absent).
fn upstream_status(upstream: &str) -> Value {
    let m = mirror();
    m["status"]["upstreams"]
        .as_array()
        .and_then(|us| us.iter().find(|u| u["name"] == upstream).cloned())
        .unwrap_or_default()
}

/// The upstream's status as the operator has it: (reachable, lastError.reason).
fn upstream_state(upstream: &str) -> (Option<bool>, Option<String>) {
    let u = upstream_status(upstream);
    (u["reachable"].as_bool(), u["lastError"]["reason"].as_str().map(str::to_string))
}

/// Events in the test namespace about the object `name` with `reason`.
fn events_of(name: &str, reason: &str) -> Value {
    let selector = format!("involvedObject.name={name},reason={reason}");
    json(&["-n", NS, "get", "events", "--field-selector", &selector, "-o", "json"])
}

fn mirror_events(reason: &str) -> Vec<String> {
    events_of(MIRROR, reason)["items"]
        .as_array()
        .map(|items| {
            items.iter().filter_map(|e| e["message"].as_str().or(e["note"].as_str()).map(str::to_string)).collect()
        })
        .unwrap_or_default()
}

/// A GET of a manifest through the upstream's proxy Service (as the node's user): (seconds,
/// "status body").
fn uncached_answer(upstream: &str, repo: &str, tag: &str) -> (f64, String) {
    use base64::Engine;
    let endpoint = upstream_status(upstream)["endpoint"].as_str().expect("the proxy endpoint").to_string();
    let addr = endpoint.trim_start_matches("http://").to_string();
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{NODE_USER}:{}", NODE_PASSWORDS[0]))
    );
    let started = Instant::now();
    let r = support::http_get(&addr, &format!("/v2/{repo}/manifests/{tag}"), &[("Authorization", auth.as_str())]);
    (started.elapsed().as_secs_f64(), format!("{} {}", r.status, r.text()))
}

/// Runs a pod whose image cannot be pulled: (seconds until the kubelet reported the failure, its
/// message).
fn failing_pull(name: &str, image: &str) -> (f64, String) {
    let _ = kubectl(&["-n", NS, "delete", "pod", name, "--ignore-not-found", "--wait=true", "--grace-period=1"], None);
    let pod = app_pod(name, image);
    let started = Instant::now();
    kubectl_ok(&["apply", "-f", "-"], Some(&pod.to_string()));
    let message = wait_for(&format!("pod {name} ({image}) failing its pull"), TIMEOUT, || {
        let events = events_of(name, "Failed");
        events["items"].as_array()?.iter().find_map(|e| {
            let m = e["message"].as_str()?;
            m.contains("Failed to pull image").then(|| m.to_string())
        })
    });
    let took = started.elapsed().as_secs_f64();
    let _ = kubectl(&["-n", NS, "delete", "pod", name, "--wait=true", "--grace-period=1"], None);
    (took, message)
}

/// Drops new connections from the proxy pods (and anyone) to one port on the node's address
/// (iptables INPUT), until dropped: the upstream blackholed for the pods.
struct NodePortBlackhole {
    ip: String,
    port: String,
}

impl NodePortBlackhole {
    fn rule(&self, op: &str) -> std::process::Output {
        let iptables = support::require("iptables");
        run(
            Command::new(iptables)
                .args(["-w", op, "INPUT", "-p", "tcp", "-d", &self.ip, "--dport", &self.port, "--syn", "-j", "DROP"]),
            Duration::from_secs(10),
        )
    }

    fn start(addr: &str) -> NodePortBlackhole {
        let (ip, port) = addr.rsplit_once(':').unwrap();
        let b = NodePortBlackhole { ip: ip.into(), port: port.into() };
        let out = b.rule("-I");
        assert!(out.status.success(), "iptables -I: {}", describe_output(&out));
        b
    }
}

impl Drop for NodePortBlackhole {
    fn drop(&mut self) {
        let _ = self.rule("-D");
    }
}

/// Issue 12 on the real node: the proxies' upstream sidecars tell the operator what they see, a
/// blackholed upstream shows in the status and Events and degrades the mirror after a minute,
/// cached tags keep pulling on the node meanwhile, and all of it clears when the upstream is back.
#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step04b_an_upstream_outage_shows_in_status_while_the_node_keeps_pulling_cached_tags() {
    let mut guard = fixture();
    let fx = guard.as_mut().unwrap();
    let sidecars: Vec<Value> = pods(NS, &format!("{},mirrorfleet.io/upstream=alpha", selector("proxy")));
    assert!(
        sidecars.iter().all(|p| p["spec"]["initContainers"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == "upstream-envoy" && c["restartPolicy"] == "Always"))),
        "the alpha proxies run no upstream sidecar"
    );
    wait_for("alpha reachable in the status", Duration::from_secs(60), || {
        (upstream_state("alpha").0 == Some(true)).then_some(())
    });
    let image = fx.app("alpha");

    let blackhole = NodePortBlackhole::start(&fx.registry("alpha"));
    let cut = Instant::now();
    // Step 04 cached the image: the node pulls it by tag through the proxy while the upstream is dark.
    fx.node.remove_image(&image);
    let cached = run_pod("outage", &image).expect("the kubelet pulled the cached image");
    fx.node.remove_image(&image);
    // An image the proxy never cached: the proxy pod's front answers 503 and says why, fast.
    let (uncached, said) = uncached_answer("alpha", "e2e/alpha-never-cached", "1");
    assert!(uncached <= 10.0, "uncached manifest answered after {uncached:.1}s: {said}");
    assert!(
        said.starts_with("503 ")
            && said.contains("e2e/alpha-never-cached:1 is not in this mirror's cache and its upstream"),
        "{said}"
    );
    // The kubelet's pull of it: containerd reports the mirror's 503 (then tries the upstream
    // itself, blackholed here too).
    let (kubelet_failed, kubelet_said) =
        failing_pull("outage-uncached", &format!("{}/e2e/alpha-never-cached:1", fx.registry("alpha")));
    assert!(kubelet_said.contains("503 Service Unavailable"), "the kubelet's pull error: {kubelet_said}");
    let (reachable, reason) = wait_for("alpha unreachable in the status", Duration::from_secs(60), || {
        let (r, reason) = upstream_state("alpha");
        (r == Some(false)).then_some((r, reason))
    });
    let seen = cut.elapsed().as_secs_f64();
    // New connections are dropped: a connect timeout, or, once the host is marked down and
    // requests stop trying it, only the failed health checks.
    assert!(
        matches!(reason.as_deref(), Some("ConnectTimeout" | "HealthCheckFailed")),
        "{:?}",
        mirror()["status"]["upstreams"]
    );
    assert_eq!(reachable, Some(false));
    assert_eq!(upstream_state("beta").0, Some(true), "beta is not touched");
    let warned = wait_for("Event UpstreamUnreachable", Duration::from_secs(30), || {
        let e = mirror_events("UpstreamUnreachable");
        (!e.is_empty()).then_some(e)
    });
    assert!(warned[0].contains("alpha"), "{warned:?}");
    wait_for("Degraded=True UpstreamUnreachable", Duration::from_secs(120), || {
        let m = mirror();
        let c = m["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Degraded")?.clone();
        (c["status"] == "True" && c["reason"] == "UpstreamUnreachable").then_some(())
    });
    let degraded = cut.elapsed().as_secs_f64();
    assert_eq!(condition("Ready").as_deref(), Some("True"), "an upstream outage does not unready the mirror");

    drop(blackhole);
    let back = Instant::now();
    wait_for("alpha reachable again", Duration::from_secs(60), || {
        (upstream_state("alpha").0 == Some(true)).then_some(())
    });
    let recovered = back.elapsed().as_secs_f64();
    wait_for("Degraded=False", Duration::from_secs(60), || {
        (condition("Degraded").as_deref() == Some("False")).then_some(())
    });
    assert!(!mirror_events("UpstreamReachable").is_empty(), "no Event UpstreamReachable");
    let alpha = upstream_status("alpha");
    assert!(alpha["failedLookups"].as_i64().unwrap_or(0) >= 1, "the outage's lookups were not counted: {alpha}");
    // The pull served stale and the ones that failed (counters reach the status within a minute).
    let alpha = wait_for("servedStale and failedPulls in the status", Duration::from_secs(90), || {
        let alpha = upstream_status("alpha");
        (alpha["servedStale"].as_i64().unwrap_or(0) >= 1 && alpha["failedPulls"].as_i64().unwrap_or(0) >= 2)
            .then_some(alpha)
    });
    fx.figure(format!(
        "upstream blackholed (iptables DROP on the node): cached tag pulled on the node in {cached:.3}s (kubelet's 'Pulled'); \
         uncached manifest answered 503 with the reason in {uncached:.3}s, the kubelet's pull failed after {kubelet_failed:.1}s; \
         status reachable=false after {seen:.1}s, Degraded after {degraded:.1}s; reachable again {recovered:.1}s after the upstream returned; \
         servedStale {}, failedPulls {}",
        alpha["servedStale"], alpha["failedPulls"]
    ));
}

/// A rate-limited upstream (429 with Docker Hub's headers, from the upstream's own front) on the
/// real node: cached tags keep pulling, the upstream stays reachable, and the status carries the
/// 429 with its headers, read by the operator from the sidecar's log.
#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step04c_a_rate_limited_upstream_shows_its_headers_in_status_while_cached_tags_pull() {
    let mut guard = fixture();
    let fx = guard.as_mut().unwrap();
    let image = fx.app("alpha");
    wait_for("alpha reachable", Duration::from_secs(60), || (upstream_state("alpha").0 == Some(true)).then_some(()));
    fx.upstreams["alpha"].answer_with(Some(429));
    let limited = Instant::now();
    fx.node.remove_image(&image);
    let cached = run_pod("limited", &image).expect("the kubelet pulled the cached image");
    fx.node.remove_image(&image);
    let error = wait_for("lastError RateLimited with its headers", Duration::from_secs(60), || {
        let alpha = upstream_status("alpha");
        (alpha["lastError"]["reason"] == "RateLimited" && !alpha["lastError"]["rateLimit"].is_null())
            .then(|| alpha["lastError"].clone())
    });
    let seen = limited.elapsed().as_secs_f64();
    fx.upstreams["alpha"].answer_with(None);
    assert_eq!(error["rateLimit"]["remaining"], "0;w=21600", "{error}");
    assert_eq!(error["rateLimit"]["limit"], "100;w=21600", "{error}");
    assert_eq!(error["rateLimit"]["retryAfter"], "60", "{error}");
    assert_eq!(upstream_state("alpha").0, Some(true), "a 429 leaves the upstream reachable");
    let alpha = upstream_status("alpha");
    assert!(alpha["rateLimited"].as_i64().unwrap_or(0) >= 1, "{alpha}");
    assert!(
        mirror_events("UpstreamRateLimited")
            .iter()
            .any(|e| e.contains("429") && e.contains("RateLimit-Remaining 0;w=21600")),
        "no UpstreamRateLimited Event with the headers: {:?}",
        mirror_events("UpstreamRateLimited")
    );
    fx.figure(format!(
        "upstream answering 429: cached tag pulled on the node in {cached:.3}s; lastError RateLimited with the headers in the status after {seen:.1}s"
    ));
}

/// Issue 12, item 2, on the real node: a proxy whose cache is on a PersistentVolumeClaim starts
/// while its upstream is blackholed (the sidecar answers the registry's start-up ping) and serves
/// what the volume holds; the upstream's return brings uncached pulls back.
#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step04d_a_proxy_on_a_pvc_starts_while_its_upstream_is_dark_and_serves_its_cache() {
    const PV: &str = "mf-e2e-persist";
    const CLASS: &str = "mf-e2e-hostpath";
    let mut guard = fixture();
    let fx = guard.as_mut().unwrap();
    let _ = kubectl(&["delete", "pv", PV, "--ignore-not-found", "--wait=false"], None);
    // A hostPath volume on the node, bound by class: the harness has no provisioner.
    let dir = fx.tmp.path().join("persist-pv");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let pv = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": PV},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": CLASS,
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": dir.to_str().unwrap(), "type": "Directory"}},
    });
    kubectl_ok(&["apply", "-f", "-"], Some(&pv.to_string()));
    let addr = fx.registry("alpha");
    let yaml = format!(
        "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: persist, namespace: {NS}}}\nspec:\n\
         \x20 upstreams:\n\
         \x20 - {{name: alpha, registry: \"{addr}\", remoteURL: \"http://{addr}\", credentialsSecretRef: {{name: alpha-creds}}, {auth}}}\n\
         \x20 proxy: {{image: \"{proxy}\", replicas: 1, storage: {{persistentVolumeClaim: {{size: 1Gi, storageClassName: {CLASS}}}}}}}\n\
         \x20 edge: {{image: \"{ENVOY_IMAGE}\", domain: persist.test}}\n",
        auth = sidecar_auth(&addr),
        proxy = fx.proxy_image,
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&yaml));
    let ready = || {
        let m = json(&["-n", NS, "get", "registrymirror", "persist", "-o", "json"]);
        m["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "ProxiesAvailable" && c["status"] == "True"))
    };
    wait_for("persist's proxy available", TIMEOUT, || ready().then_some(()));
    // The node pulls through this proxy only (its own hosts dir), so the cache is filled.
    let hosts = fx.tmp.path().join("persist-certs");
    let ip = cluster_ip("persist-proxy-alpha");
    std::fs::create_dir_all(hosts.join(&addr)).unwrap();
    std::fs::write(
        hosts.join(&addr).join("hosts.toml"),
        format!("server = \"http://{addr}\"\n\n[host.\"http://{ip}:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"1s\"\n"),
    )
    .unwrap();
    let image = fx.app("alpha");
    fx.node.remove_image(&image);
    let out = fx.node.pull_with(&image, &hosts, None);
    assert!(out.status.success(), "pull through persist: {}", describe_output(&out));
    fx.node.remove_image(&image);

    // Dark upstream, then a new proxy pod (the old one deleted): it starts and serves the volume.
    let blackhole = NodePortBlackhole::start(&addr);
    let selector = "app.kubernetes.io/instance=persist,app.kubernetes.io/component=proxy";
    let old: Vec<String> =
        pods(NS, selector).iter().filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_string)).collect();
    kubectl_ok(&["-n", NS, "delete", "pod", "-l", selector, "--wait=true", "--grace-period=1"], None);
    let started = Instant::now();
    wait_for("a new persist proxy Ready with the upstream dark", TIMEOUT, || {
        pods(NS, selector)
            .iter()
            .any(|p| pod_ready(p) && !old.iter().any(|u| p["metadata"]["uid"] == u.as_str()))
            .then_some(())
    });
    let start = started.elapsed().as_secs_f64();
    // Ready is the pod's own view. The Service's ClusterIP refuses connections until kube-proxy
    // has the new endpoint, as for any Service whose only pod was replaced; a pull right after
    // Ready once failed on that (containerd then tried the blackholed upstream).
    support::wait_http(format!("{ip}:5000"), "/v2/", TIMEOUT)
        .unwrap_or_else(|e| panic!("persist's Service never answered after its new pod was Ready: {e}"));
    let serving = started.elapsed().as_secs_f64() - start;
    let pulled = Instant::now();
    let out = fx.node.pull_with(&image, &hosts, None);
    let cached = pulled.elapsed().as_secs_f64();
    assert!(out.status.success(), "cached pull from the restarted proxy, upstream dark: {}", describe_output(&out));
    fx.node.remove_image(&image);
    let restarts: i64 = pods(NS, selector)
        .iter()
        .flat_map(|p| p["status"]["containerStatuses"].as_array().cloned().unwrap_or_default())
        .map(|c| c["restartCount"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(restarts, 0, "the registry crash-looped while the upstream was dark:\n{}", describe(NS));
    drop(blackhole);
    kubectl_ok(&["-n", NS, "delete", "registrymirror", "persist", "--wait=true", "--timeout=120s"], None);
    let _ = kubectl(&["-n", NS, "delete", "pvc", "-l", "app.kubernetes.io/instance=persist", "--wait=true"], None);
    let _ = kubectl(&["delete", "pv", PV, "--wait=true"], None);
    fx.figure(format!(
        "proxy on a PVC, upstream blackholed: new pod Ready {start:.1}s after the old one was deleted (0 restarts), its Service answering {serving:.1}s later; cached tag pulled by the node (ctr) in {cached:.3}s"
    ));
}

/// The `keep` mirror of step 04f: one upstream, an 8Mi emptyDir, marks 70/40, the given `pins`
/// (an edge only for its image: the upstream sidecar runs `edge.image`, the only Envoy on the node).
fn keep_mirror_yaml(fx: &Fixture, pins: &[String]) -> String {
    let addr = fx.registry("alpha");
    let pins = serde_json::to_string(pins).unwrap();
    format!(
        "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: keep, namespace: {NS}}}\nspec:\n\
         \x20 upstreams:\n\
         \x20 - {{name: alpha, registry: \"{addr}\", remoteURL: \"http://{addr}\", credentialsSecretRef: {{name: alpha-creds}}, {auth}}}\n\
         \x20 proxy: {{image: \"{proxy}\", replicas: 1, storage: {{emptyDir: {{sizeLimit: 8Mi}}}}}}\n\
         \x20 edge: {{image: \"{ENVOY_IMAGE}\", domain: keep.test}}\n\
         \x20 cache: {{highWatermark: 70, lowWatermark: 40, pins: {pins}}}\n\
         \x20 prefetch: {{images: [\"{addr}/e2e/fill0:1\"]}}\n",
        auth = sidecar_auth(&addr),
        proxy = fx.proxy_image,
    )
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step04f_a_proxy_cache_filled_past_twice_its_empty_dir_limit_keeps_its_pod() {
    const IMAGES: usize = 12;
    const SELECTOR: &str = "app.kubernetes.io/instance=keep,app.kubernetes.io/component=proxy";
    let mut guard = fixture();
    let fx = guard.as_mut().unwrap();
    let addr = fx.registry("alpha");
    let (_, user, password) = UPSTREAM_CREDS[0];
    // 12 images of one incompressible 1.5 MiB layer: 18 MiB through an 8 MiB emptyDir.
    let images: Vec<String> = (0..IMAGES)
        .map(|i| {
            let name = format!("fill{i}");
            let layout = support::build_test_image(fx.tmp.path(), &name, 1, 1536 * 1024);
            // Pushed to the registry itself, not through the front (which pulls go through).
            let dst = format!("docker://{}/e2e/{name}:1", fx.upstreams["alpha"].addr());
            let creds = format!("{user}:{password}");
            let out = support::Skopeo::new().copy(
                &format!("oci:{}", layout.display()),
                &dst,
                &["--dest-tls-verify=false", "--dest-creds", &creds],
            );
            assert!(out.status.success(), "push {dst}: {}", describe_output(&out));
            format!("{addr}/e2e/{name}:1")
        })
        .collect();
    kubectl_ok(&["apply", "-f", "-"], Some(&keep_mirror_yaml(fx, &[])));
    let available = || {
        let m = json(&["-n", NS, "get", "registrymirror", "keep", "-o", "json"]);
        m["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "ProxiesAvailable" && c["status"] == "True"))
    };
    wait_for("keep's proxy available", TIMEOUT, || available().then_some(()));
    let hosts = fx.tmp.path().join("keep-certs");
    let ip = cluster_ip("keep-proxy-alpha");
    std::fs::create_dir_all(hosts.join(&addr)).unwrap();
    std::fs::write(
        hosts.join(&addr).join("hosts.toml"),
        format!(
            "server = \"http://{addr}\"\n\n[host.\"http://{ip}:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    let uid_of_ready = || pods(NS, SELECTOR).iter().find(|p| pod_ready(p)).map(|p| p["metadata"]["uid"].clone());
    let evicted = || {
        pods(NS, SELECTOR).iter().any(|p| p["status"]["reason"] == "Evicted")
            || kubectl_ok(&["-n", NS, "get", "events", "--field-selector", "reason=Evicted", "-o", "name"], None)
                .lines()
                .any(|l| l.contains("keep-proxy-alpha"))
    };
    // Pulls the images through the proxy, straight into the node's containerd, then drops them
    // from the node again (only the proxy's cache keeps them). In the control (`control`), the
    // kubelet may evict the pod before the last pull: the pulls stop there. Returns the seconds
    // taken and the images pulled.
    let fill = |fx: &Fixture, control: bool| {
        let started = Instant::now();
        let mut pulled = 0;
        for image in &images {
            let out = fx.node.pull_with(image, &hosts, None);
            if !out.status.success() && control && evicted() {
                break;
            }
            assert!(out.status.success(), "pull {image} through keep: {}\n{}", describe_output(&out), describe(NS));
            pulled += 1;
            fx.node.remove_image(image);
            std::thread::sleep(Duration::from_millis(500));
        }
        (started.elapsed().as_secs_f64(), pulled)
    };

    let uid = uid_of_ready().expect("a ready keep proxy");
    // The prefetch ran in the new pod: in the status, and as an Event.
    let prefetch = wait_for("keep's prefetch in the status", TIMEOUT, || {
        let m = json(&["-n", NS, "get", "registrymirror", "keep", "-o", "json"]);
        let p = m["status"]["upstreams"][0]["cache"]["lastPrefetch"].clone();
        p.is_object().then_some(p)
    });
    assert_eq!((prefetch["images"].as_i64(), prefetch["failed"].as_i64()), (Some(1), Some(0)), "{prefetch}");
    wait_for("a Prefetched Event", TIMEOUT, || {
        kubectl_ok(&["-n", NS, "get", "events", "--field-selector", "reason=Prefetched", "-o", "name"], None)
            .lines()
            .next()
            .map(|_| ())
    });
    let (took, _) = fill(fx, false);
    // The operator reads the keeper every 10 s; the kubelet measures emptyDir volumes once a
    // minute (volumeStatsAggPeriod) and checks limits every 10 s: watch for two minutes.
    let cache = wait_for("keep's status shows an eviction", TIMEOUT, || {
        let m = json(&["-n", NS, "get", "registrymirror", "keep", "-o", "json"]);
        let c = m["status"]["upstreams"][0]["cache"].clone();
        c["lastEviction"].is_object().then_some(c)
    });
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(120) {
        assert!(!evicted(), "the kubelet evicted the keep proxy although its keeper ran:\n{}", describe(NS));
        assert_eq!(uid_of_ready().as_ref(), Some(&uid), "the keep proxy pod changed:\n{}", describe(NS));
        std::thread::sleep(Duration::from_secs(5));
    }
    let keeper_log = kubectl_ok(&["-n", NS, "logs", "deploy/keep-proxy-alpha", "-c", "cache-keeper"], None);
    let evictions = keeper_log.lines().filter(|l| l.contains("evicted the least recently pulled")).count();
    assert!(evictions >= 1, "{keeper_log}");
    let columns = kubectl_ok(&["-n", NS, "get", "registrymirror", "keep"], None);
    assert!(columns.lines().next().is_some_and(|h| h.contains("CACHE") && h.contains("HITS")), "{columns}");
    fx.figure(format!(
        "cache keeper, 8Mi emptyDir: {IMAGES} images of 1.5 MiB (18 MiB) pulled by the node through the proxy in {took:.1}s; \
         {evictions} evictions, the pod kept 120 s after (same uid, never evicted); status cache: fill {}%, last eviction {} bytes / {} images; \
         prefetch of 1 image after the rollout: {} bytes",
        cache["fillPercent"], cache["lastEviction"]["bytes"], cache["lastEviction"]["images"], prefetch["bytes"]
    ));

    // Negative control: the same pulls with every image pinned (nothing the keeper may evict) get
    // the pod evicted by the kubelet, so the check above can fail. (highWatermark 100 is no
    // control: above 100 % of the declared sizeLimit the keeper still evicts, within seconds.)
    kubectl_ok(&["apply", "-f", "-"], Some(&keep_mirror_yaml(fx, &images)));
    wait_for("keep's proxy rolled with every image pinned", TIMEOUT, || {
        uid_of_ready().filter(|u| *u != uid).and_then(|_| available().then_some(()))
    });
    let started = Instant::now();
    let (_, pulled) = fill(fx, true);
    wait_for("the kubelet evicts the keep proxy (control: every image pinned)", Duration::from_secs(240), || {
        evicted().then_some(())
    });
    fx.figure(format!(
        "control, all {IMAGES} images pinned: the kubelet evicted the proxy pod {:.0}s after the pulls began \
         ({pulled} of {IMAGES} pulled before it; 8Mi emptyDir)",
        started.elapsed().as_secs_f64()
    ));
    kubectl_ok(&["-n", NS, "delete", "registrymirror", "keep", "--wait=true", "--timeout=120s"], None);
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step04e_a_peer_on_the_node_is_asked_first_and_a_dead_one_is_left_out() {
    let mut guard = fixture();
    let fx = guard.as_mut().unwrap();
    // A stand-in for the node's P2P registry (Spegel): a plain Distribution registry on the node's
    // address holding one image the upstream does not have, 404 for the rest.
    let storage = tempdir();
    let addr = format!("{}:{}", fx.node.ip, support::free_port());
    let mut peer = support::Registry::start(&support::registry_config(&addr, storage.path()));
    let registry = fx.registry("alpha");
    let peer_only = format!("{registry}/e2e/peer-only:1");
    let tar = app_image(fx.tmp.path(), "localhost/e2e/peer-only:1", &format!("peer {}", std::process::id()));
    let out = support::Skopeo::new().copy(
        &format!("oci-archive:{}", tar.display()),
        &format!("docker://{addr}/e2e/peer-only:1"),
        &["--dest-tls-verify=false"],
    );
    assert!(out.status.success(), "push to the peer: {}", describe_output(&out));
    let port = addr.rsplit(':').next().unwrap();
    let patch = json!({"spec": {"nodeConfig": {"peers": {"endpoint": format!("http://${{NODE_IP}}:{port}")}}}});
    kubectl_ok(&["-n", NS, "patch", "registrymirror", MIRROR, "--type=merge", "-p", &patch.to_string()], None);
    let peer_host = format!("[host.\"http://{addr}\"]");
    let started = Instant::now();
    wait_for("the agent names the peer first", TIMEOUT, || {
        let toml = fx.node.hosts_toml(&registry)?;
        let (p, m) = (toml.find(&peer_host)?, toml.find(":5000\"]")?);
        (p < m).then_some(())
    });
    let named = started.elapsed().as_secs_f64();
    wait_for("the mirror Ready with the peer", TIMEOUT, || {
        (condition("Ready").as_deref() == Some("True")).then_some(())
    });

    // Only the peer has it: the node's pull works only if the peer is asked.
    let by_peer = run_pod("by-peer", &peer_only).expect("the kubelet pulled from the peer");
    assert!(peer.log().contains("GET /v2/e2e/peer-only/manifests/"), "the peer was not asked:\n{}", peer.log());
    fx.node.remove_image(&peer_only);
    // The peer lacks alpha's image: its 404, then the mirror.
    let image = fx.app("alpha");
    fx.node.remove_image(&image);
    let by_mirror = run_pod("peer-miss", &image).expect("the kubelet pulled through the mirror");
    assert!(peer.log().contains("/v2/e2e/alpha-app/manifests/1"), "the peer was not asked first:\n{}", peer.log());
    fx.node.remove_image(&image);

    // The peer dies: the agent leaves it out; the node stays configured.
    peer.stop();
    let stopped = Instant::now();
    wait_for("the dead peer left out", TIMEOUT, || {
        let toml = fx.node.hosts_toml(&registry)?;
        (!toml.contains(&peer_host) && toml.contains(":5000\"]")).then_some(())
    });
    let left_out = stopped.elapsed().as_secs_f64();
    assert_eq!(condition("Ready").as_deref(), Some("True"), "a dead peer made the mirror unready");
    fx.figure(format!(
        "peer on the node: named first in hosts.toml {named:.1}s after the spec edit; node pull (kubelet's 'Pulled') of an \
         image only the peer has {by_peer:.3}s, of one it lacks (peer 404, then the mirror's cache) {by_mirror:.3}s; \
         stopped peer left out after {left_out:.1}s"
    ));

    // Back to the mirror without peers for the steps that follow.
    let patch = json!({"spec": {"nodeConfig": {"peers": null}}});
    kubectl_ok(&["-n", NS, "patch", "registrymirror", MIRROR, "--type=merge", "-p", &patch.to_string()], None);
    wait_for("the mirror Ready without the peer", TIMEOUT, || {
        let m = mirror();
        let current = m["status"]["observedGeneration"] == m["metadata"]["generation"];
        (current && condition("Ready").as_deref() == Some("True")).then_some(())
    });
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step05_a_dead_proxy_is_withdrawn_and_the_node_pulls_upstream_then_it_is_restored() {
    let mut guard = fixture();
    let fx = guard.as_mut().unwrap();
    let reg = fx.registry("alpha");
    let image = fx.app("alpha");
    let sel = format!("{},mirrorfleet.io/upstream=alpha", selector("proxy"));
    // Proxies that cannot come back: a node selector no node has, and the old ReplicaSet gone
    // (the Deployment keeps an old pod while the new one cannot start).
    let old_rs: Vec<String> = json(&["-n", NS, "get", "rs", "-l", &sel, "-o", "json"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&mirror_yaml(fx, &["alpha", "beta"], "Service", "e2e-node/nowhere: \"true\"")),
    );
    // Whatever happens below, the next steps get schedulable proxies back.
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = kubectl(&["apply", "-f", "-"], Some(&self.0));
        }
    }
    let restore = Restore(mirror_yaml(fx, &["alpha", "beta"], "Service", ""));
    wait_for("a new proxy ReplicaSet", TIMEOUT, || {
        let rs = json(&["-n", NS, "get", "rs", "-l", &sel, "-o", "json"]);
        rs["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| !old_rs.contains(&r["metadata"]["name"].as_str().unwrap().to_string()))
            .then_some(())
    });
    let dead_at = Instant::now();
    for rs in &old_rs {
        kubectl_ok(&["-n", NS, "delete", "rs", rs, "--wait=false"], None);
    }
    // A pull right away, before the agent had time to react. The upstream is private: a node
    // that bypasses the mirror needs the upstream's credentials (an imagePullSecret), given here.
    let creds = Some("alpha-user:alpha-secret");
    let started = Instant::now();
    let out = fx.node.pull_as(&image, creds);
    let before_withdrawal = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "pull with a dead mirror: {}", describe_output(&out));
    fx.node.remove_image(&image);
    let mirror_host = format!("[host.\"http://{}:5000\"]", cluster_ip(&format!("{MIRROR}-proxy-alpha")));
    let withdrawn = wait_for("the agent withdrew the dead mirror", Duration::from_secs(30), || {
        // A plain-HTTP upstream keeps a file naming the upstream alone (else containerd would
        // try https); an https one would have no file.
        let toml = fx.node.hosts_toml(&reg);
        (!toml.is_some_and(|t| t.contains(&mirror_host))).then(|| dead_at.elapsed().as_secs_f64())
    });
    assert!(withdrawn < 10.0, "withdrawal took {withdrawn:.1}s (> 10 s)");
    let direct_before = upstream_direct_lines(fx, "alpha");
    let started = Instant::now();
    let out = fx.node.pull_as(&image, creds);
    let after_withdrawal = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "pull after withdrawal: {}", describe_output(&out));
    // Distribution writes its access line after the response: give it a moment.
    let went_upstream = support::wait_until(Duration::from_secs(5), || {
        (upstream_direct_lines(fx, "alpha") > direct_before).then_some(())
    });
    assert!(went_upstream.is_some(), "the node did not go to the upstream");
    fx.node.remove_image(&image);
    fx.figure(format!(
        "dead mirror (pods gone): withdrawn after {withdrawn:.1}s; a node pull took {before_withdrawal:.3}s before the withdrawal, {after_withdrawal:.3}s after (straight upstream)"
    ));

    drop(restore);
    let ip = cluster_ip(&format!("{MIRROR}-proxy-alpha"));
    wait_for("the mirror entry restored", TIMEOUT, || {
        fx.node.hosts_toml(&reg).filter(|t| t.contains(&format!("[host.\"http://{ip}:5000\"]"))).map(|_| ())
    });
    wait_for("the mirror Ready again", TIMEOUT, || (condition("Ready").as_deref() == Some("True")).then_some(()));
}

/// Upstream requests that came from the node itself (a pull that bypassed the mirror).
fn upstream_direct_lines(fx: &Fixture, upstream: &str) -> usize {
    // HEAD too: a pull whose blobs are still in the node's content store only resolves the tag.
    fx.upstreams[upstream]
        .front_requests()
        .iter()
        .filter(|(ip, line)| ip == &fx.node.ip && line.contains(" /v2/"))
        .count()
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step06_a_rotated_client_password_rolls_the_proxies_and_nodes_keep_pulling() {
    let fx = fixture();
    let fx = fx.as_ref().unwrap();
    let reg = fx.registry("beta");
    let image = fx.app("beta");
    let sel = format!("{},mirrorfleet.io/upstream=beta", selector("proxy"));
    let before: Vec<String> =
        pods(NS, &sel).iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_string()).collect();
    kubectl_ok(&["apply", "-f", "-"], Some(&users_secret(NODE_PASSWORDS[1])));
    use base64::Engine;
    let header = base64::engine::general_purpose::STANDARD.encode(format!("{NODE_USER}:{}", NODE_PASSWORDS[1]));
    wait_for("the node's header rotated", TIMEOUT, || {
        fx.node.hosts_toml(&reg).filter(|t| t.contains(&header)).map(|_| ())
    });
    wait_for("the proxies rolled and Ready", TIMEOUT, || {
        let now = pods(NS, &sel);
        (now.iter().all(pod_ready)
            && !now.is_empty()
            && now.iter().all(|p| !before.contains(&p["metadata"]["name"].as_str().unwrap().to_string())))
        .then_some(())
    });
    wait_for("the mirror Ready", TIMEOUT, || (condition("Ready").as_deref() == Some("True")).then_some(()));
    run_pod("after-rotation", &image).expect("pulled");
    let plog = proxy_log("beta");
    assert!(!access_lines(&plog, "/v2/e2e/beta-app/manifests/1").is_empty(), "beta's proxy served nothing:\n{plog}");
    fx.node.remove_image(&image);
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step07_an_added_upstream_is_served_by_envoy_without_a_restart_and_its_challenge_is_learned() {
    let mut guard = fixture();
    let fx = guard.as_mut().unwrap();
    let edge_before = pods(NS, &selector("edge"));
    kubectl_ok(&["apply", "-f", "-"], Some(&mirror_yaml(fx, &["alpha", "beta", "gamma"], "Service", "")));
    let added = Instant::now();
    wait_for("gamma's proxy Ready", TIMEOUT, || {
        pods(NS, &format!("{},mirrorfleet.io/upstream=gamma", selector("proxy"))).iter().any(pod_ready).then_some(())
    });
    // gamma has no `auth` and is no known registry: the operator asks it for its challenge, keeps
    // it in the status and rolls gamma's proxy onto the upstream sidecar with it.
    let learned = wait_for("gamma's challenge in status.upstreams[].learnedAuth", TIMEOUT, || {
        let gamma = upstream_status("gamma");
        (!gamma["learnedAuth"].is_null()).then(|| gamma["learnedAuth"].clone())
    });
    assert_eq!(learned["remoteURL"], format!("http://{}", fx.registry("gamma")), "{learned}");
    assert_eq!(learned["type"], "Bearer", "{learned}");
    assert_eq!(learned["service"], TOKEN_SERVICE, "{learned}");
    assert!(learned["realm"].as_str().is_some_and(|r| r.ends_with("/token")), "{learned}");
    wait_for("gamma's proxies Ready with the upstream sidecar", TIMEOUT, || {
        let ps = pods(NS, &format!("{},mirrorfleet.io/upstream=gamma", selector("proxy")));
        let with_sidecar = |p: &Value| {
            p["spec"]["initContainers"].as_array().is_some_and(|cs| cs.iter().any(|c| c["name"] == "upstream-envoy"))
        };
        (!ps.is_empty() && ps.iter().all(|p| pod_ready(p) && with_sidecar(p))).then_some(())
    });
    let learned_in = added.elapsed().as_secs_f64();
    let edge_ip = cluster_ip(&format!("{MIRROR}-edge"));
    let ca = fx.tmp.path().join("tls/ca.crt");
    wait_for("Envoy serves gamma.mirror.test", TIMEOUT, || {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cacert"])
            .arg(&ca)
            .args([
                "--resolve",
                &format!("gamma.{DOMAIN}:443:{edge_ip}"),
                "-u",
                &format!("{}:{}", CI_USER.0, CI_USER.1),
            ])
            .arg(format!("https://gamma.{DOMAIN}/v2/e2e/gamma-app/manifests/1"))
            .args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stdout) == "200").then_some(())
    });
    let edge_after = pods(NS, &selector("edge"));
    let ids = |ps: &[Value]| -> Vec<(String, i64)> {
        ps.iter()
            .map(|p| {
                (
                    p["metadata"]["uid"].as_str().unwrap().to_string(),
                    p["status"]["containerStatuses"][0]["restartCount"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(ids(&edge_before), ids(&edge_after), "the Envoy pods were replaced or restarted");
    wait_for("the mirror Ready with 3 upstreams", TIMEOUT, || {
        (condition("Ready").as_deref() == Some("True") && mirror()["status"]["upstreamsReady"] == "3/3").then_some(())
    });
    // The gamma manifest above came through the learned sidecar, with gamma's credentials. Every
    // gamma proxy pod's log: the Service sent the edge's fetch to one of the replicas
    // (`logs deploy/...` reads a single pod, which failed a run when it was the other one).
    let plog = Command::new("kubectl")
        .args(["-n", NS, "logs", "-l", &format!("{},mirrorfleet.io/upstream=gamma", selector("proxy"))])
        .args(["-c", "upstream-envoy", "--prefix", "--tail=-1"])
        .output()
        .unwrap();
    let plog = String::from_utf8_lossy(&plog.stdout).to_string();
    assert!(
        plog.lines().any(|l| l.contains("/v2/e2e/gamma-app/manifests/1 200")) && plog.contains("GET /_token"),
        "gamma's sidecar did not fetch the manifest with a token:\n{plog}"
    );
    fx.figure(format!(
        "upstream without auth added: challenge learned and its proxy Ready with the sidecar {learned_in:.1}s after the apply"
    ));
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step08_via_edge_the_node_pulls_over_tls_through_envoy_trusting_the_edge_ca() {
    let fx = fixture();
    let fx = fx.as_ref().unwrap();
    let edge_ip = cluster_ip(&format!("{MIRROR}-edge"));
    let names: Vec<String> = ["alpha", "beta", "gamma"].iter().map(|u| format!("{u}.{DOMAIN}")).collect();
    fx.etc_hosts.set(&edge_ip, &names);
    // The kubelet copies the node's /etc/hosts into a hostNetwork pod when it starts it, so the
    // agent sees these names only once restarted (a real edge domain is in DNS, which it reads
    // live, as containerd does).
    kubectl_ok(&["-n", NS, "delete", "pod", "-l", &selector("node-agent"), "--wait=true"], None);
    kubectl_ok(&["apply", "-f", "-"], Some(&mirror_yaml(fx, &["alpha", "beta", "gamma"], "Edge", "")));
    let reg = fx.registry("gamma");
    wait_for("hosts.toml points at the edge", TIMEOUT, || {
        fx.node.hosts_toml(&reg).filter(|t| t.contains(&format!("[host.\"https://gamma.{DOMAIN}\"]"))).map(|_| ())
    });
    wait_for("the mirror Ready via the edge", TIMEOUT, || {
        (condition("Ready").as_deref() == Some("True")).then_some(())
    });
    let image = fx.app("gamma");
    // Requests for the image that containerd (not step 7's curl) sent through Envoy.
    let from_node = || {
        let log = logs(NS, &selector("edge"), "envoy");
        log.lines().filter(|l| l.contains("/v2/e2e/gamma-app/manifests/1") && l.contains("\"containerd/")).count()
    };
    let before = from_node();
    run_pod("via-edge", &image).expect("pulled via the edge");
    let edge_lines = wait_for("Envoy's access log of the node's pull", Duration::from_secs(10), || {
        let n = from_node();
        (n > before).then_some(n)
    });
    assert!(edge_lines > before);
    let plog = proxy_log("gamma");
    assert!(
        plog.lines().any(|l| l.contains("/v2/e2e/gamma-app/manifests/1") && l.contains("\"containerd/")),
        "gamma's proxy served the node's pull through Envoy nothing:\n{plog}"
    );
    fx.node.remove_image(&image);
    // Back to the Services for the steps after this one.
    kubectl_ok(&["apply", "-f", "-"], Some(&mirror_yaml(fx, &["alpha", "beta", "gamma"], "Service", "")));
    wait_for("hosts.toml back on the Service", TIMEOUT, || {
        fx.node.hosts_toml(&reg).filter(|t| t.contains("[host.\"http://")).map(|_| ())
    });
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step09_a_cleanup_job_from_the_cronjob_completes_while_pulls_keep_working() {
    let fx = fixture();
    let fx = fx.as_ref().unwrap();
    let image = fx.app("alpha");
    // Something in the cache to clean.
    let out = fx.node.pull(&image);
    assert!(out.status.success(), "{}", describe_output(&out));
    let _ = kubectl(&["-n", NS, "delete", "job", "cleanup-now", "--ignore-not-found"], None);
    kubectl_ok(&["-n", NS, "create", "job", "cleanup-now", &format!("--from=cronjob/{MIRROR}-cleanup")], None);
    let started = Instant::now();
    let mut pulls = 0;
    let done = loop {
        fx.node.remove_image(&image);
        let out = fx.node.pull(&image);
        assert!(out.status.success(), "a pull during the cleanup failed: {}\n{}", describe_output(&out), describe(NS));
        pulls += 1;
        let job = json(&["-n", NS, "get", "job", "cleanup-now", "-o", "json"]);
        if job["status"]["succeeded"].as_i64() == Some(1) {
            break started.elapsed();
        }
        assert!(job["status"]["failed"].as_i64().unwrap_or(0) == 0, "the cleanup Job failed\n{}", describe(NS));
        assert!(started.elapsed() < TIMEOUT, "the cleanup Job did not complete\n{}", describe(NS));
    };
    fx.node.remove_image(&image);
    eprintln!("e2e-node: cleanup Job completed in {:.1}s with {pulls} pulls meanwhile, all served", done.as_secs_f64());
    let last = wait_for("status.lastCleanup", TIMEOUT, || {
        let m = mirror();
        let l = m["status"]["lastCleanup"].clone();
        (l["result"] == "Succeeded").then_some(l)
    });
    eprintln!("e2e-node: status.lastCleanup = {last}");
    // An emptyDir cache is cleaned by replacing the replicas (each new one starts empty and
    // reports what it holds after its own clean-up); the old replicas' usage is not measured,
    // so bytesBefore is absent by design (src/cleanup/rollout.rs), bytesAfter is there.
    assert!(last["bytesAfter"].is_i64(), "lastCleanup without bytesAfter: {last}");
    assert!(last["bytesBefore"].is_null(), "an emptyDir cleanup cannot know bytesBefore: {last}");
    let job_log = logs(NS, "job-name=cleanup-now", "cleanup");
    assert!(!job_log.contains('\u{1b}'), "colour escapes in the Job's log:\n{job_log}");
    // The pods rolled by the cleanup are all back.
    wait_for("the mirror Ready after the cleanup", TIMEOUT, || {
        (condition("Ready").as_deref() == Some("True")).then_some(())
    });
}

/// The figure the README quotes: a second mirror shaped like the public sample (five upstreams,
/// edge, client auth, cleanup, node config), from `kubectl apply` to Ready, on the real node.
#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step10_a_five_upstream_mirror_goes_ready_and_is_deleted_cleanly() {
    let mut guard = fixture();
    let fx = guard.as_mut().unwrap();
    let remote = fx.registry("alpha");
    let ups: String = (1..=5)
        .map(|i| format!("  - {{name: up{i}, registry: \"up{i}.five.test\", remoteURL: \"http://{remote}\", credentialsSecretRef: {{name: alpha-creds}}, {}}}\n", sidecar_auth(&remote)))
        .collect();
    let yaml = format!(
        "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: five, namespace: {NS}}}\nspec:\n\
         \x20 upstreams:\n{ups}\
         \x20 proxy: {{image: \"{proxy}\", replicas: 1, storage: {{emptyDir: {{sizeLimit: 1Gi}}}}}}\n\
         \x20 clientAuth: {{usersSecretRef: {{name: users}}, nodeUser: {NODE_USER}}}\n\
         \x20 edge: {{image: \"{ENVOY_IMAGE}\", domain: five.test, tlsSecretRef: {{name: edge-tls}}}}\n\
         \x20 cleanup: {{schedule: \"0 3 * * 0\", policy: garbageCollect}}\n\
         \x20 nodeConfig:\n\
         \x20   containerd: {{certsDir: \"{certs}\", configFile: \"{config}\"}}\n",
        proxy = fx.proxy_image,
        certs = fx.node.certs_dir.display(),
        config = fx.node.containerd_config.display(),
    );
    let started = Instant::now();
    kubectl_ok(&["apply", "-f", "-"], Some(&yaml));
    wait_for("five Ready", TIMEOUT, || {
        let m = json(&["-n", NS, "get", "registrymirror", "five", "-o", "json"]);
        let ready = m["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        ready.then_some(())
    });
    let took = started.elapsed().as_secs_f64();
    fx.figure(format!(
        "create -> Ready on the real node, 5 upstreams + edge + client auth + cleanup + node agent: {took:.1}s"
    ));
    assert!(fx.node.hosts_toml("up1.five.test").is_some(), "five's node config not written");
    kubectl_ok(&["-n", NS, "delete", "registrymirror", "five", "--wait=true", "--timeout=240s"], None);
    for i in 1..=5 {
        assert!(fx.node.hosts_toml(&format!("up{i}.five.test")).is_none(), "up{i}.five.test/hosts.toml left behind");
    }
}

#[test]
#[ignore = "needs a cluster with a real node: make e2e-node"]
fn step11_deleting_the_mirror_removes_the_nodes_files_and_every_child() {
    let mut guard = fixture();
    let fx = guard.take().unwrap();
    let registries: Vec<String> = ["alpha", "beta", "gamma"].iter().map(|u| fx.registry(u)).collect();
    kubectl_ok(&["-n", NS, "delete", "registrymirror", MIRROR, "--wait=false"], None);
    wait_for("the mirror gone (finalizer released)", TIMEOUT, || {
        (!kubectl(&["-n", NS, "get", "registrymirror", MIRROR], None).status.success()).then_some(())
    });
    for r in &registries {
        assert!(fx.node.hosts_toml(r).is_none(), "{r}/hosts.toml left on the node");
    }
    wait_for("no child left", TIMEOUT, || {
        let left = kubectl_ok(
            &[
                "-n",
                NS,
                "get",
                "deploy,ds,svc,cm,secret,cronjob,job,sa,role,rolebinding",
                "-l",
                &format!("app.kubernetes.io/instance={MIRROR}"),
                "-o",
                "name",
            ],
            None,
        );
        left.trim().is_empty().then_some(())
    });
    for f in &fx.figures {
        eprintln!("e2e-node FIGURE: {f}");
    }
    let helm = support::require("helm");
    tear_down_cluster_objects(&helm, &fx.node);
    drop(fx);
}
