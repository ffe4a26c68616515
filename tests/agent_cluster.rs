//! Cluster tier: the node agent binary, run on this host, against a REAL Kubernetes API server
//! (`KUBECONFIG`), with the ServiceAccount, Role and RoleBinding that `mirrorfleet render`
//! produces, so the API-watch path is proven under the agent's real, least-privilege RBAC:
//! a ConfigMap change reaches the node's file in well under the 2 s target, the applied
//! checksum lands on the agent's Pod, and an unconfigurable node shows up as an Event naming it.
//!
//! Skipped (with a message) unless `KUBECONFIG` is set, including under CI, which has no
//! cluster; `make e2e` runs it. Needs `kubectl` and `docker-registry` (the mirror the agent probes).
//! Run: `KUBECONFIG=... nice cargo test --test agent_cluster -- --nocapture`.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::kubectl::require_cluster;

use mirrorfleet::build::node::{node_config_checksum, APPLIED_CONFIG_ANNOTATION, NODE_CONFIG_KEY};
use serde::Deserialize;
use serde_json::{json, Value};
use support::agent::mirrorfleet_bin;
use support::kubectl::{kubectl, kubectl_ok};
use support::*;

const MIRROR: &str = "e2e";
const NODE: &str = "fake-node-1";

/// A namespace of our own, deleted (without waiting) on drop.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.0, "--wait=false"], None);
    }
}

fn render(ns: &str, endpoint: &str, client_auth: bool) -> Vec<Value> {
    let mut spec = format!(
        "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: {MIRROR}, namespace: {ns}}}\n\
         spec:\n  upstreams: [{{name: dockerhub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}}]\n\
         \x20 nodeConfig: {{}}\n"
    );
    if client_auth {
        spec.push_str("  clientAuth: {usersSecretRef: {name: users}, nodeUser: nodes}\n");
        spec.push_str(&format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: users, namespace: {ns}}}\nstringData: {{nodes: first-password}}\n"
        ));
    }
    let dir = tempdir();
    let file = dir.path().join("mirror.yaml");
    fs::write(&file, spec).unwrap();
    let out = run(
        Command::new(mirrorfleet_bin())
            .args(["render", "--include-secrets", "-n", ns, "--endpoint", &format!("dockerhub={endpoint}")])
            .arg("-f")
            .arg(&file),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", describe_output(&out));
    serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// What the operator would create for the agent (its ServiceAccount, Role, RoleBinding, node
/// config and, with client auth, node-auth Secret), exactly as rendered but with the certs dir
/// moved to `certs`, plus the agent's Pod object (the fake kubelet "runs" it; the agent itself
/// runs on this host). Owner references point at a RegistryMirror that does not exist here
/// (the garbage collector would delete the objects), so they are dropped.
fn deploy(ns: &str, endpoint: &str, certs: &Path, client_auth: bool) {
    let mut docs = render(ns, endpoint, client_auth);
    docs.retain(|d| {
        let kind = d["kind"].as_str().unwrap_or_default();
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        matches!(kind, "ServiceAccount" | "Role" | "RoleBinding") && name == "e2e-node-agent"
            || kind == "ConfigMap" && name == "e2e-node-config"
            || kind == "Secret" && name == "e2e-node-auth"
    });
    assert_eq!(docs.len(), 4 + usize::from(client_auth), "rendered agent objects");
    for d in &mut docs {
        d["metadata"].as_object_mut().unwrap().remove("ownerReferences");
        if d["kind"] == "ConfigMap" {
            let mut config: Value = serde_json::from_str(d["data"][NODE_CONFIG_KEY].as_str().unwrap()).unwrap();
            config["containerd"]["certsDir"] = json!(certs.display().to_string());
            d["data"][NODE_CONFIG_KEY] = json!(serde_json::to_string_pretty(&config).unwrap() + "\n");
        }
    }
    let stream: String = docs.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap())).collect();
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&stream));
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: e2e-node-agent-x, namespace: {ns}}}\nspec:\n  nodeName: {NODE}\n  \
         serviceAccountName: e2e-node-agent\n  containers: [{{name: node-agent, image: mirrorfleet:test}}]\n"
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&pod));
}

/// `mirrorfleet node-agent` as the DaemonSet runs it, authenticated as its ServiceAccount.
fn start_agent(ns: &str, dir: &Path, auth_secret: Option<&str>) -> Proc {
    let kubeconfig = service_account_kubeconfig(ns, "e2e-node-agent", dir);
    let mut cmd = Command::new(mirrorfleet_bin());
    cmd.args(["node-agent", "--mirror", MIRROR, "--config-map", "e2e-node-config", "--resync-seconds", "5"])
        .arg("--status-dir")
        .arg(dir.join("status"))
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", ns)
        .env("POD_NAME", "e2e-node-agent-x")
        .env("NODE_NAME", NODE)
        .env("RUST_LOG", "info");
    if let Some(secret) = auth_secret {
        cmd.args(["--auth-secret", secret]);
    }
    Proc::spawn("node-agent", cmd, &dir.join("agent.log"))
}

/// A kubeconfig that authenticates as the agent's ServiceAccount (a TokenRequest token).
fn service_account_kubeconfig(ns: &str, sa: &str, dir: &Path) -> std::path::PathBuf {
    let token = kubectl_ok(&["create", "token", sa, "-n", ns, "--duration", "1h"], None);
    let admin: Value =
        serde_json::from_str(&kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"], None)).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "agent", "user": {"token": token.trim()}}],
        "contexts": [{"name": "agent", "context": {"cluster": "c", "user": "agent", "namespace": ns}}],
        "current-context": "agent",
    });
    let path = dir.join("agent.kubeconfig");
    fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    path
}

fn config_map_json(ns: &str) -> Value {
    serde_json::from_str(&kubectl_ok(
        &["get", "configmap", &format!("{MIRROR}-node-config"), "-n", ns, "-o", "json"],
        None,
    ))
    .unwrap()
}

fn set_node_config(ns: &str, config: &Value) {
    let data = serde_json::to_string_pretty(config).unwrap() + "\n";
    let patch = json!({"data": {NODE_CONFIG_KEY: data}});
    kubectl_ok(
        &[
            "patch",
            "configmap",
            &format!("{MIRROR}-node-config"),
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
        ],
        None,
    );
}

fn events(ns: &str) -> Vec<Value> {
    let list: Value = serde_json::from_str(&kubectl_ok(&["get", "events", "-n", ns, "-o", "json"], None)).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "needs a cluster: make e2e"]
fn api_watch_moves_config_changes_to_disk_in_seconds_under_the_rendered_rbac() {
    require_cluster();
    if !tools_available(&["kubectl", "docker-registry"]) {
        return;
    }
    let ns = Namespace(format!("agent-e2e-{}", std::process::id()));
    kubectl_ok(&["create", "namespace", &ns.0], None);
    let mirror = Upstream::start();
    let certs = tempdir();

    deploy(&ns.0, &mirror.url(), certs.path(), false);
    let dir = tempdir();
    let mut agent = start_agent(&ns.0, dir.path(), None);
    let hosts = certs.path().join("docker.io/hosts.toml");
    agent.wait_ready("docker.io/hosts.toml written", Duration::from_secs(20), || hosts.exists().then_some(()));
    assert!(fs::read_to_string(&hosts).unwrap().contains(&mirror.url()));

    // The applied checksum on the Pod equals the ConfigMap's.
    let cm = config_map_json(&ns.0);
    let want = node_config_checksum(cm["data"][NODE_CONFIG_KEY].as_str().unwrap());
    let annotation = |ns: &str| -> Option<String> {
        let pod: Value =
            serde_json::from_str(&kubectl_ok(&["get", "pod", "e2e-node-agent-x", "-n", ns, "-o", "json"], None))
                .unwrap();
        pod["metadata"]["annotations"][APPLIED_CONFIG_ANNOTATION].as_str().map(str::to_string)
    };
    agent.wait_ready("Pod annotated", Duration::from_secs(20), || {
        (annotation(&ns.0).as_deref() == Some(&want)).then_some(())
    });

    // ConfigMap change -> file on disk, repeatedly: add and drop quay.io.
    let base: Value = serde_json::from_str(cm["data"][NODE_CONFIG_KEY].as_str().unwrap()).unwrap();
    let mut with_quay = base.clone();
    with_quay["registries"].as_array_mut().unwrap().push(json!({
        "registry": "quay.io", "upstream": "quay", "mirror": mirror.url(), "fallback": "https://quay.io"
    }));
    let quay = certs.path().join("quay.io/hosts.toml");
    let (mut appear, mut vanish) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        // The clock starts before kubectl starts: an upper bound on the API-to-disk latency.
        let t0 = Instant::now();
        set_node_config(&ns.0, &with_quay);
        agent.wait_ready("quay.io written", Duration::from_secs(10), || quay.exists().then_some(()));
        appear.push(t0.elapsed());
        let t0 = Instant::now();
        set_node_config(&ns.0, &base);
        agent.wait_ready("quay.io removed", Duration::from_secs(10), || (!quay.exists()).then_some(()));
        vanish.push(t0.elapsed());
    }
    eprintln!("ConfigMap change -> file written: median {:?} (all {appear:?})", median(appear.clone()));
    eprintln!("ConfigMap change -> file removed: median {:?} (all {vanish:?})", median(vanish.clone()));
    assert!(median(appear) < Duration::from_secs(2) && median(vanish) < Duration::from_secs(2));

    // A registry someone else configured: not overwritten, reported as an Event naming the node.
    fs::create_dir_all(certs.path().join("ghcr.io")).unwrap();
    fs::write(certs.path().join("ghcr.io/hosts.toml"), "server = \"https://ghcr.io\"\n").unwrap();
    let mut with_ghcr = base.clone();
    with_ghcr["registries"].as_array_mut().unwrap().push(json!({
        "registry": "ghcr.io", "upstream": "ghcr", "mirror": mirror.url(), "fallback": "https://ghcr.io"
    }));
    set_node_config(&ns.0, &with_ghcr);
    let event = agent.wait_ready("NodeNotConfigured Event", Duration::from_secs(20), || {
        events(&ns.0)
            .into_iter()
            .find(|e| e["reason"] == "NodeNotConfigured" && e["message"].to_string().contains("ghcr.io"))
    });
    let message = event["message"].as_str().unwrap();
    let noise: Vec<Value> =
        events(&ns.0).into_iter().filter(|e| e["message"].to_string().contains("not probed")).collect();
    assert!(noise.is_empty(), "start-up is not news: {noise:?}");
    assert!(message.contains(&format!("node {NODE}")) && message.contains("ghcr.io"), "{message}");
    assert_eq!(event["type"], "Warning");
    assert_eq!(fs::read_to_string(certs.path().join("ghcr.io/hosts.toml")).unwrap(), "server = \"https://ghcr.io\"\n");

    // Removal: files go, and the removing config's checksum is reported as applied.
    let mut removing = with_ghcr.clone();
    removing["removing"] = json!(true);
    set_node_config(&ns.0, &removing);
    let removing_sum = node_config_checksum(config_map_json(&ns.0)["data"][NODE_CONFIG_KEY].as_str().unwrap());
    agent.wait_ready("removal reported", Duration::from_secs(20), || {
        (annotation(&ns.0).as_deref() == Some(&removing_sum)).then_some(())
    });
    assert!(!hosts.exists(), "our file removed");
    assert!(certs.path().join("ghcr.io/hosts.toml").exists(), "the foreign file stays");
    assert!(!agent.log().contains("Forbidden"), "RBAC denied something:\n{}", agent.log());
    // The DaemonSet limits the agent to 64 MiB; this is the unoptimised test build.
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("agent peak RSS with API watches: {peak_kib} KiB");
    assert!(peak_kib < 48 * 1024, "{peak_kib} KiB is too close to the 64 MiB limit");
}

#[test]
#[ignore = "needs a cluster: make e2e"]
fn client_auth_header_arrives_from_the_watched_secret_and_a_rotation_rewrites_it() {
    require_cluster();
    if !tools_available(&["kubectl", "docker-registry"]) {
        return;
    }
    let ns = Namespace(format!("agent-e2e-auth-{}", std::process::id()));
    kubectl_ok(&["create", "namespace", &ns.0], None);
    let mirror = Upstream::start();
    let certs = tempdir();
    deploy(&ns.0, &mirror.url(), certs.path(), true);
    let dir = tempdir();
    let mut agent = start_agent(&ns.0, dir.path(), Some("e2e-node-auth"));
    let hosts = certs.path().join("docker.io/hosts.toml");
    let first = basic_auth("nodes", "first-password");
    agent.wait_ready("hosts.toml with the header", Duration::from_secs(20), || {
        fs::read_to_string(&hosts).ok().filter(|t| t.contains(&first)).map(|_| ())
    });
    assert_eq!(fs::metadata(&hosts).unwrap().permissions().mode() & 0o777, 0o600);

    // The operator rotates the node password: the Secret changes, the file follows.
    let second = basic_auth("nodes", "second-password");
    let patch = json!({"stringData": {"authorization": second}});
    let t0 = Instant::now();
    kubectl_ok(&["patch", "secret", "e2e-node-auth", "-n", &ns.0, "--type", "merge", "-p", &patch.to_string()], None);
    agent.wait_ready("rotated header", Duration::from_secs(10), || {
        fs::read_to_string(&hosts).ok().filter(|t| t.contains(&second)).map(|_| ())
    });
    let took = t0.elapsed();
    eprintln!("Secret change -> header rewritten in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(!fs::read_to_string(&hosts).unwrap().contains(&first));
    assert!(!agent.log().contains("Forbidden"), "RBAC denied something:\n{}", agent.log());
    assert!(!agent.log().contains(&second), "the credential must not be logged");
}
