//! Fault injection against a real API server (`make e2e-faults`, needs `KUBECONFIG`).
//!
//! Every scenario runs the operator binary on the host, scoped to a fresh namespace, on a fleet
//! of three mirrors with known credential values (`public`: the public sample — five upstreams,
//! edge, client auth, cleanup, node config; `private`: two upstreams with credentials; `small`:
//! one upstream, no options), injects its fault, and then requires [`converged`]:
//!
//! - the children in the namespace are *exactly* what `render` builds from the mirrors and
//!   Secrets as they are on the server (kind and name: nothing missing, no orphan, no duplicate),
//!   each with one controller owner reference to its mirror;
//! - their content is the desired one: every ConfigMap's data (so the node config carries every
//!   registry, pointing at the live Services' cluster IPs), workload replicas, images and pod
//!   template annotations (config checksums), CronJob schedules;
//! - the status is truthful: `observedGeneration` = `generation`, Ready exactly when every proxy
//!   and the edge have a ready replica and the node config is applied (the summary line counts
//!   Ready mirrors: on a cluster without room for the Pods they stay Pending), per-upstream
//!   endpoints equal to the Services' cluster IPs and ready replicas equal to the Deployments',
//!   node counts equal to the DaemonSet's.
//!
//! After each scenario [`no_credential_leaks`] scans every operator log (debug level), every
//! Event in the namespace and every non-Secret object for every credential value the scenario
//! used (plain and base64).
//!
//! Scenarios: `operator_killed_mid_reconcile` (20 SIGKILLs at random points while the fleet
//! changes, each followed by a restart and convergence), `leader_killed` (two replicas, SIGKILL
//! the leader mid-change, 3 times), `conflicting_hand_edits` (a second writer edits and deletes
//! children while the spec changes), `watches_stalled` (the operator frozen with SIGSTOP while
//! the fleet changes and children are edited, then resumed), `api_server_restart` (the
//! kube-apiserver stopped for 10 s and restarted with its arguments by
//! `tests/e2e_faults/restart-apiserver.sh`, while the fleet changes before and after: every watch
//! and connection drops). The last runs only with `MIRRORFLEET_FAULTS_APISERVER=1` (set by
//! `make e2e-faults`; it disturbs every user of the cluster) and then needs the k8s harness's
//! pid file.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use mirrorfleet::render::{render_str, RenderOptions};
use serde_json::{json, Value};

// ---------------------------------------------------------------- kubectl

mod support;
use support::http::get_local as http_get;

use support::free_port;
use support::kubectl::{
    create_namespace, delete_test_namespace, install_crd, kubectl, kubectl_ok as must, require_cluster,
};

/// kubectl that may fail (the API server may be down, the object gone): the output if it worked.
fn try_kubectl(args: &[&str], stdin: Option<&str>) -> Option<String> {
    let out = kubectl(args, stdin);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn list(ns: &str, kinds: &str) -> Result<Vec<Value>, String> {
    let out = kubectl(&["-n", ns, "get", kinds, "-o", "json"], None);
    if !out.status.success() {
        return Err(format!("kubectl get {kinds}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(v["items"].as_array().cloned().unwrap_or_default())
}

fn apply_json(ns: &str, obj: &Value) {
    must(
        &["-n", ns, "apply", "--server-side", "--force-conflicts", "--field-manager", "faults", "-f", "-"],
        Some(&obj.to_string()),
    );
}

fn metric(port: u16, name: &str) -> Option<u64> {
    let (_, body) = http_get(port, "/metrics")?;
    Some(mirrorfleet::controller::metrics::sum_series(&body, name))
}

/// xorshift64*: a seeded, dependency-free source of "random points".
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn seed() -> u64 {
    let s = std::env::var("FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("faults: seed {s} (FAULTS_SEED={s} replays the same points)");
    s | 1
}

// ---------------------------------------------------------------- the operator

struct Operator {
    name: String,
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Operator {
    fn start(name: &str, ns: &str, leader_elect: bool) -> Self {
        let port = free_port();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-faults");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{ns}-{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_mirrorfleet"))
            .args(["run", "--watch-namespace", ns, "--lease-namespace", ns, "--identity", name])
            .args(["--admin-addr", &format!("127.0.0.1:{port}"), "--lease-duration-seconds", "6"])
            .args(["--leader-elect", if leader_elect { "true" } else { "false" }])
            .args(["--node-removal-timeout-seconds", "300"])
            // Debug level: the leak scan reads what an operator at its most verbose would log.
            .env("RUST_LOG", "debug,hyper=info,h2=info,tower=info,rustls=info")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
            .spawn()
            .expect("start the operator");
        eprintln!("faults: operator {name} pid {} admin :{port} log {}", child.id(), log.display());
        Operator { name: name.into(), child, port, log }
    }

    fn leader(&self) -> bool {
        metric(self.port, "mirrorfleet_leader") == Some(1)
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([sig, &self.child.id().to_string()]).status();
    }

    fn kill9(&mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    fn tail(&self) -> String {
        support::log_tail(&self.log, 30)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if self.alive() {
            self.signal("-CONT");
            self.signal("-TERM");
            let start = Instant::now();
            while self.alive() && start.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.alive() {
                self.kill9();
            }
        }
        if std::thread::panicking() {
            eprintln!("--- operator {} log (last lines) ---\n{}", self.name, self.tail());
        }
    }
}

// ---------------------------------------------------------------- the fleet

/// One scenario's namespace, its credential values, and the operator logs to scan.
struct Fleet {
    ns: String,
    creds: Vec<String>,
    rng: Rng,
    generation: u64,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        delete_test_namespace(&self.ns);
    }
}

const PUBLIC: &str = include_str!("../config/samples/public-mirrors.yaml");

impl Fleet {
    fn new(scenario: &str) -> Self {
        install_crd();
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 100_000_000;
        let ns = format!("mf-faults-{scenario}-{stamp}");
        create_namespace(&ns);
        let mut fleet = Fleet { ns, creds: Vec::new(), rng: Rng(seed()), generation: 0 };
        let ns = fleet.ns.clone();
        // The public sample, with its Secrets' values replaced by ones this run can look for.
        for doc in serde_yaml::Deserializer::from_str(PUBLIC) {
            let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            v["metadata"]["namespace"] = json!(ns);
            if v["kind"] == "Secret" {
                let keys: Vec<String> = v["stringData"].as_object().unwrap().keys().cloned().collect();
                for k in keys {
                    v["stringData"][&k] = json!(fleet.credential(&k));
                }
            }
            apply_json(&ns, &v);
        }
        let pem = "-----BEGIN CERTIFICATE-----\nTUlSUk9SRkxFRVQ=\n-----END CERTIFICATE-----\n";
        apply_json(
            &ns,
            &json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": "mirror-tls"}, "stringData": {"tls.crt": pem, "tls.key": pem}}),
        );
        let (user, password) = (fleet.credential("user"), fleet.credential("password"));
        apply_json(
            &ns,
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "private-creds"},
                "stringData": {"username": user, "password": password}}),
        );
        apply_json(
            &ns,
            &json!({"apiVersion": "mirrorfleet.io/v1alpha1", "kind": "RegistryMirror",
                "metadata": {"name": "private"},
                "spec": {"upstreams": [
                    {"name": "corp", "registry": "registry.corp.example.com", "remoteURL": "https://registry.corp.example.com",
                     "credentialsSecretRef": {"name": "private-creds"}},
                    {"name": "hub", "registry": "docker.io", "remoteURL": "https://registry-1.docker.io",
                     "credentialsSecretRef": {"name": "private-creds"}}],
                    "proxy": {"replicas": 1}}}),
        );
        apply_json(
            &ns,
            &json!({"apiVersion": "mirrorfleet.io/v1alpha1", "kind": "RegistryMirror",
                "metadata": {"name": "small"},
                "spec": {"upstreams": [{"name": "quay", "registry": "quay.io", "remoteURL": "https://quay.io"}],
                    "proxy": {"replicas": 1}}}),
        );
        fleet
    }

    /// A fresh, recognisable credential value (long enough not to occur by chance).
    fn credential(&mut self, what: &str) -> String {
        let v = format!("faultcred-{what}-{:012x}", self.rng.below(1 << 48));
        self.creds.push(v.clone());
        v
    }

    /// One random change of desired state: children created, deleted, rolled or reconfigured.
    fn mutate(&mut self) -> String {
        self.generation += 1;
        let ns = self.ns.clone();
        let patch = |name: &str, p: Value| {
            try_kubectl(&["-n", &ns, "patch", "registrymirror", name, "--type=merge", "-p", &p.to_string()], None)
        };
        let what = match self.rng.below(8) {
            0 => {
                let r = 1 + self.rng.below(3);
                patch("public", json!({"spec": {"proxy": {"replicas": r}}}));
                format!("public replicas {r}")
            }
            1 => {
                // Drop or restore the last upstream (gcr): five children appear or go.
                let m: Value =
                    serde_json::from_str(&must(&["-n", &ns, "get", "registrymirror/public", "-o", "json"], None))
                        .unwrap();
                let mut ups = m["spec"]["upstreams"].as_array().unwrap().clone();
                if ups.iter().any(|u| u["name"] == "gcr") {
                    ups.retain(|u| u["name"] != "gcr");
                } else {
                    ups.push(json!({"name": "gcr", "registry": "gcr.io", "remoteURL": "https://gcr.io"}));
                }
                patch("public", json!({"spec": {"upstreams": ups}}));
                format!("public upstreams {}", ups.len())
            }
            2 => {
                let m: Value =
                    serde_json::from_str(&must(&["-n", &ns, "get", "registrymirror/small", "-o", "json"], None))
                        .unwrap();
                if m["spec"]["edge"].is_null() {
                    patch("small", json!({"spec": {"edge": {"domain": "small.example.com", "replicas": 1}}}));
                    "small edge on".into()
                } else {
                    patch("small", json!({"spec": {"edge": null}}));
                    "small edge off".into()
                }
            }
            3 => {
                let m: Value =
                    serde_json::from_str(&must(&["-n", &ns, "get", "registrymirror/public", "-o", "json"], None))
                        .unwrap();
                if m["spec"]["cleanup"].is_null() {
                    patch("public", json!({"spec": {"cleanup": {"schedule": "0 3 * * 0"}}}));
                    "public cleanup on".into()
                } else {
                    patch("public", json!({"spec": {"cleanup": null}}));
                    "public cleanup off".into()
                }
            }
            4 => {
                let p = self.credential("rotated");
                try_kubectl(
                    &[
                        "-n",
                        &ns,
                        "patch",
                        "secret/private-creds",
                        "--type=merge",
                        "-p",
                        &json!({"stringData": {"password": p}}).to_string(),
                    ],
                    None,
                );
                "private credential rotated".into()
            }
            5 => {
                let p = self.credential("ci");
                try_kubectl(
                    &[
                        "-n",
                        &ns,
                        "patch",
                        "secret/mirror-users",
                        "--type=merge",
                        "-p",
                        &json!({"stringData": {"ci": p}}).to_string(),
                    ],
                    None,
                );
                "client password rotated".into()
            }
            6 => {
                let ttl = format!("{}h", 1 + self.rng.below(200));
                patch("private", json!({"spec": {"proxy": {"ttl": ttl}}}));
                format!("private ttl {ttl}")
            }
            _ => {
                let fb = self.rng.below(2) == 0;
                patch("public", json!({"spec": {"nodeConfig": {"fallbackToUpstream": fb}}}));
                format!("public fallbackToUpstream {fb}")
            }
        };
        eprintln!("faults: change {}: {what}", self.generation);
        what
    }

    /// Hand edits of children, as another client would make them.
    fn hand_edit(&mut self) -> String {
        let ns = self.ns.clone();
        let k = |args: &[&str]| try_kubectl(&[&["-n", ns.as_str()][..], args].concat(), None);
        match self.rng.below(6) {
            0 => {
                k(&["scale", "deployment/public-proxy-ghcr", "--replicas=4"]);
                "scaled public-proxy-ghcr".into()
            }
            1 => {
                k(&[
                    "patch",
                    "configmap/public-node-config",
                    "--type=merge",
                    "-p",
                    r#"{"data":{"node-config.json":"{}"}}"#,
                ]);
                "emptied the node config".into()
            }
            2 => {
                k(&["delete", "service/small-proxy-quay", "--wait=false"]);
                "deleted small-proxy-quay".into()
            }
            3 => {
                k(&["delete", "configmap/private-proxy-corp", "--wait=false"]);
                "deleted private-proxy-corp's ConfigMap".into()
            }
            4 => {
                k(&["set", "image", "daemonset/public-node-agent", "*=example.invalid/evil:1"]);
                "re-imaged the node agent".into()
            }
            _ => {
                k(&["label", "--overwrite", "deployment/private-proxy-hub", "app.kubernetes.io/component=hacked"]);
                "relabelled private-proxy-hub".into()
            }
        }
    }
}

// ---------------------------------------------------------------- convergence

const KINDS: &str = "serviceaccounts,roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io,secrets,configmaps,persistentvolumeclaims,networkpolicies.networking.k8s.io,services,deployments.apps,daemonsets.apps,cronjobs.batch";

fn strip(mut v: Value) -> Value {
    if let Some(m) = v["metadata"].as_object_mut() {
        for k in
            ["managedFields", "resourceVersion", "uid", "creationTimestamp", "generation", "finalizers", "annotations"]
        {
            m.remove(k);
        }
    }
    v.as_object_mut().unwrap().remove("status");
    v
}

/// Checks the namespace against the desired state; Err says what differs.
fn converged(ns: &str, nodes: i64) -> Result<String, String> {
    let mirrors = list(ns, "registrymirrors")?;
    let all = list(ns, KINDS)?;
    let secrets: Vec<&Value> = all.iter().filter(|o| o["kind"] == "Secret").collect();
    let live: BTreeMap<(String, String), &Value> = all
        .iter()
        .filter(|o| {
            o["metadata"]["labels"]["app.kubernetes.io/managed-by"].is_string()
                || o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["kind"] == "RegistryMirror"))
        })
        .filter(|o| !(o["kind"] == "ServiceAccount" && o["metadata"]["name"] == "default"))
        .map(|o| ((o["kind"].as_str().unwrap().to_string(), o["metadata"]["name"].as_str().unwrap().to_string()), o))
        .collect();
    let services: BTreeMap<String, &Value> = all
        .iter()
        .filter(|o| o["kind"] == "Service")
        .map(|o| (o["metadata"]["name"].as_str().unwrap().to_string(), o))
        .collect();
    let mut want: BTreeMap<(String, String), (Value, String)> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut ready_mirrors = 0;
    for m in &mirrors {
        let name = m["metadata"]["name"].as_str().unwrap();
        if !m["metadata"]["deletionTimestamp"].is_null() {
            return Err(format!("{name} is being deleted"));
        }
        // What the controller would learn from the Services: their cluster IPs.
        let mut endpoints = BTreeMap::new();
        for u in m["spec"]["upstreams"].as_array().unwrap() {
            let up = u["name"].as_str().unwrap();
            let svc =
                services.get(&format!("{name}-proxy-{up}")).ok_or(format!("Service {name}-proxy-{up} missing"))?;
            endpoints.insert(up.to_string(), format!("http://{}:5000", svc["spec"]["clusterIP"].as_str().unwrap()));
        }
        let mut input = String::new();
        for s in &secrets {
            input.push_str(&serde_yaml::to_string(&strip((*s).clone())).unwrap());
            input.push_str("---\n");
        }
        input.push_str(&serde_yaml::to_string(&strip(m.clone())).unwrap());
        let opts = RenderOptions { namespace: ns.into(), endpoints: endpoints.clone(), ..RenderOptions::default() };
        let rendered = render_str(&input, &opts).map_err(|e| format!("render {name}: {e}"))?;
        let mine: Vec<&mirrorfleet::render::Rendered> =
            rendered.iter().filter(|r| r.mirror.metadata.name.as_deref() == Some(name)).collect();
        for doc in mirrorfleet::render::children_documents(&mine[0].fleet.children, true) {
            let v: Value = serde_yaml::from_str(&doc).unwrap();
            let key = (v["kind"].as_str().unwrap().to_string(), v["metadata"]["name"].as_str().unwrap().to_string());
            want.insert(key, (v, name.to_string()));
        }

        // Status is truthful.
        let st = &m["status"];
        if st["observedGeneration"] != m["metadata"]["generation"] {
            problems.push(format!(
                "{name}: observedGeneration {} != generation {}",
                st["observedGeneration"], m["metadata"]["generation"]
            ));
        }
        let cond = |t: &str| {
            st["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == t)).cloned().unwrap_or_default()
        };
        // Ready must say what the live workloads say: every proxy and the edge have a ready
        // replica, and the node config is applied. (Whether Pods get to run is the cluster's
        // business: a test cluster short of room leaves them Pending, and Ready must then be False.)
        let dep_ready = |d: &str| {
            live.get(&("Deployment".into(), d.to_string()))
                .is_some_and(|d| d["status"]["readyReplicas"].as_i64().unwrap_or(0) >= 1)
        };
        let mut live_ready = m["spec"]["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| dep_ready(&format!("{name}-proxy-{}", u["name"].as_str().unwrap())));
        if !m["spec"]["edge"].is_null() {
            live_ready &= dep_ready(&format!("{name}-edge"));
        }
        live_ready &= cond("NodesConfigured")["status"] == "True";
        let ready = cond("Ready");
        if (ready["status"] == "True") != live_ready {
            problems.push(format!(
                "{name}: Ready {} ({} {}) but the workloads say {live_ready}",
                ready["status"], ready["reason"], ready["message"]
            ));
        }
        if live_ready {
            ready_mirrors += 1;
        }
        let spec_ups: Vec<&str> =
            m["spec"]["upstreams"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
        let st_ups: Vec<&str> =
            st["upstreams"].as_array().into_iter().flatten().map(|u| u["name"].as_str().unwrap_or("")).collect();
        if spec_ups != st_ups {
            problems.push(format!("{name}: status upstreams {st_ups:?} != spec {spec_ups:?}"));
        }
        for u in st["upstreams"].as_array().into_iter().flatten() {
            let up = u["name"].as_str().unwrap_or("");
            if u["endpoint"].as_str() != endpoints.get(up).map(String::as_str) {
                problems.push(format!(
                    "{name}: status endpoint of {up} {} != Service {:?}",
                    u["endpoint"],
                    endpoints.get(up)
                ));
            }
            let dep = live.get(&("Deployment".into(), format!("{name}-proxy-{up}")));
            let live_ready = dep.map(|d| d["status"]["readyReplicas"].as_i64().unwrap_or(0)).unwrap_or(-1);
            if u["readyReplicas"].as_i64().unwrap_or(0) != live_ready {
                problems.push(format!(
                    "{name}: status readyReplicas of {up} {} != Deployment's {live_ready}",
                    u["readyReplicas"]
                ));
            }
        }
        if !m["spec"]["nodeConfig"].is_null() {
            let ds = live.get(&("DaemonSet".into(), format!("{name}-node-agent")));
            let desired = ds.map(|d| d["status"]["desiredNumberScheduled"].as_i64().unwrap_or(-1)).unwrap_or(-1);
            if st["nodes"]["desired"].as_i64() != Some(desired) || desired != nodes {
                problems.push(format!(
                    "{name}: status nodes {} vs DaemonSet desired {desired}, {nodes} nodes",
                    st["nodes"]
                ));
            }
        }
    }

    // Exactly the desired children.
    let want_keys: BTreeSet<_> = want.keys().cloned().collect();
    let live_keys: BTreeSet<_> = live.keys().cloned().collect();
    for k in want_keys.difference(&live_keys) {
        problems.push(format!("missing {}/{}", k.0, k.1));
    }
    for k in live_keys.difference(&want_keys) {
        problems.push(format!("orphan {}/{}", k.0, k.1));
    }
    let uids: BTreeMap<&str, &str> = mirrors
        .iter()
        .map(|m| (m["metadata"]["name"].as_str().unwrap(), m["metadata"]["uid"].as_str().unwrap()))
        .collect();
    for (key, (desired, owner)) in &want {
        let Some(obj) = live.get(key) else { continue };
        let id = format!("{}/{}", key.0, key.1);
        let controllers: Vec<&Value> = obj["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["controller"] == true)
            .collect();
        if controllers.len() != 1 || controllers[0]["uid"].as_str() != uids.get(owner.as_str()).copied() {
            problems.push(format!("{id}: controller owner references {controllers:?}, want {owner}"));
        }
        if obj["metadata"]["labels"] != desired["metadata"]["labels"] {
            problems.push(format!("{id}: labels {} != {}", obj["metadata"]["labels"], desired["metadata"]["labels"]));
        }
        let same = |path: &str| {
            let p = format!("/{}", path.replace('.', "/"));
            let (mut a, b) = (obj.pointer(&p).cloned(), desired.pointer(&p));
            if let (Some(a), Some(b), true) = (a.as_mut(), b, path.ends_with("containers")) {
                // The API server fills defaults the builders leave out (imagePullPolicy,
                // terminationMessagePath, protocol, ...): compare the fields the builders set.
                prune_to(a, b);
            }
            if let (Some(Value::Object(a)), true) = (a.as_mut(), path.ends_with("annotations")) {
                a.remove("mirrorfleet.io/secret-versions"); // checked against the live Secrets above
            }
            (a.as_ref() == b)
                .then_some(())
                .ok_or_else(|| format!("{id}: {path} {} != desired {}", short(a.as_ref()), short(b)))
        };
        let checks: &[&str] = match key.0.as_str() {
            "ConfigMap" => &["data"],
            "Deployment" => &["spec.replicas", "spec.template.spec.containers", "spec.template.metadata.annotations"],
            "DaemonSet" => &["spec.template.spec.containers", "spec.template.metadata.annotations"],
            "CronJob" => &["spec.schedule", "spec.suspend"],
            "Service" => &["spec.selector"],
            _ => &[],
        };
        // The Secrets' resourceVersions the pods were rolled for (render has no cluster, so it
        // leaves this out): each must be the live Secret's, or a rotated credential was missed.
        let versions = obj["spec"]["template"]["metadata"]["annotations"]["mirrorfleet.io/secret-versions"].as_str();
        for pair in versions.into_iter().flat_map(|v| v.split(',')) {
            let (secret, rv) = pair.split_once('=').unwrap_or((pair, ""));
            let live_rv = secrets
                .iter()
                .find(|s| s["metadata"]["name"] == secret)
                .and_then(|s| s["metadata"]["resourceVersion"].as_str());
            if live_rv != Some(rv) {
                problems.push(format!("{id}: rolled for Secret {secret} at {rv}, live is {live_rv:?}"));
            }
        }
        for c in checks {
            if let Err(e) = same(c) {
                problems.push(e);
            }
        }
    }
    if problems.is_empty() {
        Ok(format!("{} mirrors ({ready_mirrors} Ready), {} children", mirrors.len(), want.len()))
    } else {
        Err(problems.join("\n  "))
    }
}

fn short(v: Option<&Value>) -> String {
    let s = v.map(|v| v.to_string()).unwrap_or_else(|| "(absent)".into());
    if s.len() > 300 {
        format!("{}…", &s[..300])
    } else {
        s
    }
}

/// `live` reduced to the keys `want` has, recursively (a key `want` has and `live` lacks stays lacking).
fn prune_to(live: &mut Value, want: &Value) {
    match (live, want) {
        (Value::Object(l), Value::Object(w)) => {
            l.retain(|k, _| w.contains_key(k));
            for (k, wv) in w {
                if let Some(lv) = l.get_mut(k) {
                    prune_to(lv, wv);
                }
            }
        }
        (Value::Array(l), Value::Array(w)) => {
            for (lv, wv) in l.iter_mut().zip(w) {
                prune_to(lv, wv);
            }
        }
        _ => {}
    }
}

fn wait_converged(ns: &str, what: &str, timeout: Duration) -> Duration {
    let nodes = must(&["get", "nodes", "-o", "name"], None).lines().count() as i64;
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match converged(ns, nodes) {
            Ok(summary) => {
                // Converged twice in a row, a second apart: not a passing moment mid-reconcile.
                std::thread::sleep(Duration::from_secs(1));
                if let Ok(again) = converged(ns, nodes) {
                    eprintln!("faults: {what}: converged after {:.1}s ({again})", start.elapsed().as_secs_f64());
                    let _ = summary;
                    return start.elapsed();
                }
            }
            Err(e) => last = e,
        }
        assert!(start.elapsed() < timeout, "faults: {what}: not converged after {timeout:?}:\n  {last}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// No credential value (plain or base64) in any operator log line, Event, or non-Secret object.
fn no_credential_leaks(fleet: &Fleet, logs: &[std::path::PathBuf]) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let forms: Vec<String> = fleet.creds.iter().flat_map(|c| [c.clone(), b64.encode(c)]).collect();
    assert!(forms.len() >= 8, "the scenario used credentials to look for");
    let mut scanned = 0usize;
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap();
        scanned += text.lines().count();
        for f in &forms {
            assert!(!text.contains(f.as_str()), "{} contains a credential ({f})", log.display());
        }
    }
    let events = must(&["-n", &fleet.ns, "get", "events", "-o", "json"], None);
    for f in &forms {
        assert!(!events.contains(f.as_str()), "an Event carries a credential");
    }
    let objects = list(&fleet.ns, &format!("registrymirrors,{}", KINDS.replace("secrets,", ""))).unwrap();
    let text = serde_json::to_string(&objects).unwrap();
    for f in &forms {
        assert!(!text.contains(f.as_str()), "a non-Secret object carries a credential");
    }
    let n_events = serde_json::from_str::<Value>(&events).unwrap()["items"].as_array().map_or(0, Vec::len);
    eprintln!(
        "faults: no credential ({} values) in {scanned} log lines, {n_events} Events, {} objects",
        fleet.creds.len(),
        objects.len()
    );
}

fn logs_of(ops: &[&Operator]) -> Vec<std::path::PathBuf> {
    ops.iter().map(|o| o.log.clone()).collect()
}

/// How long the fleet may take to converge once a restarted API server is back
/// (`FAULTS_RESTART_CONVERGE_SECONDS`, 30): the watches relist within seconds, and a relist
/// triggers the reconciles that repair what changed while they were down.
static AFTER_RESTART: std::sync::LazyLock<Duration> = std::sync::LazyLock::new(|| {
    Duration::from_secs(
        std::env::var("FAULTS_RESTART_CONVERGE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30),
    )
});

/// How long a scenario may take to converge after its fault (`FAULTS_CONVERGE_SECONDS`, 180).
static CONVERGE: std::sync::LazyLock<Duration> = std::sync::LazyLock::new(|| {
    Duration::from_secs(std::env::var("FAULTS_CONVERGE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(180))
});

fn wait_ready(op: &Operator) {
    let start = Instant::now();
    while http_get(op.port, "/readyz").map(|r| r.0) != Some(200) {
        assert!(start.elapsed() < Duration::from_secs(60), "operator {} not ready:\n{}", op.name, op.tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------- scenarios

#[test]
#[ignore = "needs a cluster: make e2e-faults"]
fn operator_killed_mid_reconcile() {
    require_cluster();
    let mut fleet = Fleet::new("kill");
    let mut op = Operator::start("op-0", &fleet.ns, false);
    wait_converged(&fleet.ns, "initial fleet", *CONVERGE);
    let mut logs = vec![op.log.clone()];
    let (mut in_flight, kills) = (0, 20);
    for i in 1..=kills {
        let what = fleet.mutate();
        // A random point of the reconciles the change starts: not before a random delay, and
        // once a reconcile is seen in flight (they take ~20..500 ms), polled every few ms; if
        // none is seen within 1.5 s, at the end of that.
        let not_before = Duration::from_millis(fleet.rng.below(250));
        let started = Instant::now();
        let busy = loop {
            let busy = metric(op.port, "mirrorfleet_reconcile_in_flight").unwrap_or(0) > 0;
            if (busy && started.elapsed() >= not_before) || started.elapsed() >= Duration::from_millis(1500) {
                break busy;
            }
            std::thread::sleep(Duration::from_millis(3));
        };
        let delay = started.elapsed().as_millis();
        in_flight += usize::from(busy);
        op.kill9();
        eprintln!("faults: kill {i}/{kills}: SIGKILL {delay} ms after '{what}' (reconcile in flight: {busy})");
        // Sometimes the fleet changes while no operator runs.
        if fleet.rng.below(3) == 0 {
            fleet.mutate();
        }
        op = Operator::start(&format!("op-{i}"), &fleet.ns, false);
        logs.push(op.log.clone());
        wait_converged(&fleet.ns, &format!("restart {i}"), *CONVERGE);
    }
    eprintln!("faults: {kills} kills, {in_flight} with a reconcile in flight at the kill");
    assert!(
        in_flight >= kills / 2,
        "too few kills landed mid-reconcile ({in_flight}/{kills}): the scenario did not test what it says"
    );
    no_credential_leaks(&fleet, &logs);
}

#[test]
#[ignore = "needs a cluster: make e2e-faults"]
fn leader_killed() {
    require_cluster();
    let mut fleet = Fleet::new("leader");
    let mut a = Operator::start("op-a0", &fleet.ns, true);
    let mut b = Operator::start("op-b0", &fleet.ns, true);
    let mut logs = vec![a.log.clone(), b.log.clone()];
    wait_converged(&fleet.ns, "initial fleet", *CONVERGE);
    for round in 1..=3 {
        let start = Instant::now();
        while !a.leader() && !b.leader() {
            assert!(start.elapsed() < Duration::from_secs(30), "no leader");
            std::thread::sleep(Duration::from_millis(200));
        }
        if b.leader() {
            std::mem::swap(&mut a, &mut b);
        }
        assert!(!b.leader(), "two leaders");
        wait_ready(&b);
        fleet.mutate();
        fleet.mutate();
        std::thread::sleep(Duration::from_millis(fleet.rng.below(1000)));
        a.kill9();
        let killed = Instant::now();
        eprintln!("faults: round {round}: SIGKILL to leader {}", a.name);
        while !b.leader() {
            assert!(killed.elapsed() < Duration::from_secs(30), "standby {} never took over:\n{}", b.name, b.tail());
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("faults: round {round}: {} leads {:.1}s after the kill", b.name, killed.elapsed().as_secs_f64());
        wait_converged(&fleet.ns, &format!("round {round} after takeover"), *CONVERGE);
        a = Operator::start(&format!("op-a{round}"), &fleet.ns, true);
        logs.push(a.log.clone());
        wait_ready(&a);
        assert!(!a.leader(), "the restarted replica must stand by");
    }
    drop((a, b));
    no_credential_leaks(&fleet, &logs);
}

#[test]
#[ignore = "needs a cluster: make e2e-faults"]
fn conflicting_hand_edits() {
    require_cluster();
    let mut fleet = Fleet::new("edits");
    let op = Operator::start("op", &fleet.ns, false);
    wait_converged(&fleet.ns, "initial fleet", *CONVERGE);
    for round in 1..=3 {
        // 15 s of a second writer fighting the operator while the spec changes too.
        let stop = Instant::now() + Duration::from_secs(15);
        let mut edits = 0;
        while Instant::now() < stop {
            let what = fleet.hand_edit();
            edits += 1;
            if fleet.rng.below(4) == 0 {
                fleet.mutate();
            }
            if edits % 10 == 0 {
                eprintln!("faults: round {round}: {edits} hand edits (last: {what})");
            }
            std::thread::sleep(Duration::from_millis(fleet.rng.below(300)));
        }
        eprintln!("faults: round {round}: {edits} hand edits in 15 s");
        wait_converged(&fleet.ns, &format!("round {round} after the edits stopped"), *CONVERGE);
    }
    let logs = logs_of(&[&op]);
    drop(op);
    no_credential_leaks(&fleet, &logs);
}

#[test]
#[ignore = "needs a cluster: make e2e-faults"]
fn watches_stalled() {
    require_cluster();
    let mut fleet = Fleet::new("stall");
    let op = Operator::start("op", &fleet.ns, false);
    wait_converged(&fleet.ns, "initial fleet", *CONVERGE);
    for round in 1..=3 {
        op.signal("-STOP");
        let frozen = 10 + fleet.rng.below(20);
        eprintln!("faults: round {round}: operator frozen (SIGSTOP) for {frozen} s");
        let until = Instant::now() + Duration::from_secs(frozen);
        while Instant::now() < until {
            fleet.mutate();
            fleet.hand_edit();
            std::thread::sleep(Duration::from_secs(2));
        }
        op.signal("-CONT");
        wait_converged(&fleet.ns, &format!("round {round} after SIGCONT"), *CONVERGE);
    }
    let logs = logs_of(&[&op]);
    drop(op);
    no_credential_leaks(&fleet, &logs);
}

#[test]
#[ignore = "needs a cluster: make e2e-faults"]
fn api_server_restart() {
    require_cluster();
    let home = std::env::var("K8S_HARNESS_HOME")
        .unwrap_or_else(|_| format!("{}/k8s-harness", std::env::var("HOME").unwrap_or_default()));
    let pid_file = std::path::Path::new(&home).join("run/kube-apiserver.pid");
    // Restarting the API server disturbs everyone using the cluster: only when asked for.
    assert!(
        std::env::var_os("MIRRORFLEET_FAULTS_APISERVER").is_some(),
        "api_server_restart restarts the cluster's API server: run it with `make e2e-faults` (MIRRORFLEET_FAULTS_APISERVER=1)"
    );
    assert!(pid_file.exists(), "MIRRORFLEET_FAULTS_APISERVER is set but {} does not exist", pid_file.display());
    let mut fleet = Fleet::new("apiserver");
    let mut op = Operator::start("op", &fleet.ns, true);
    wait_converged(&fleet.ns, "initial fleet", *CONVERGE);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e_faults/restart-apiserver.sh");
    for round in 1..=2 {
        fleet.mutate();
        fleet.mutate();
        std::thread::sleep(Duration::from_millis(fleet.rng.below(800)));
        let out = Command::new(script).env("K8S_HARNESS_HOME", &home).output().unwrap();
        eprint!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "restarting the API server failed");
        // The operator survives the outage (it may lose and regain the Lease meanwhile).
        assert!(op.alive(), "the operator exited during the API server outage:\n{}", op.tail());
        // The script returns once the server answers /readyz again: from here on, the clock.
        let back = Instant::now();
        fleet.mutate();
        let edit = fleet.hand_edit();
        eprintln!("faults: round {round}: after the restart, {edit}");
        wait_converged(&fleet.ns, &format!("round {round} after the API server came back"), *AFTER_RESTART);
        eprintln!(
            "faults: round {round}: converged {:.1}s after the API server was back",
            back.elapsed().as_secs_f64()
        );
        let start = Instant::now();
        while !op.leader() {
            assert!(start.elapsed() < Duration::from_secs(30), "the operator did not lead again:\n{}", op.tail());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let logs = logs_of(&[&op]);
    drop(op);
    no_credential_leaks(&fleet, &logs);
}
