//! Cluster tier (`make e2e`, needs `KUBECONFIG`): the chart on a real API server.
//!
//! 0. Every values file's rendering, config/default and the docs/gitops manifests pass the API
//!    server's strict validation (server-side dry run, unknown fields refused); the
//!    prometheus-operator, Argo CD and Flux kinds only where their CRDs are installed (the test
//!    says when they are not).
//! 1. `helm install --wait` of charts/mirrorfleet (watching one namespace, so it leaves the
//!    cluster's other mirrors alone) into a namespace that enforces the `restricted` Pod Security
//!    Standard brings the operator Deployment to Available. On a cluster
//!    whose kubelet is simulated (the harness this was written on) no container runs: the pods are
//!    only marked Running and Ready. So:
//! 2. the real controller (`mirrorfleet run`, this build) runs on the host with a token of the
//!    chart's ServiceAccount: every API call it makes is authorized by the chart's RBAC and
//!    nothing else. A sample RegistryMirror goes Ready (its proxy Deployment becomes available
//!    through the cluster's controllers), and the log has no `forbidden`.
//! 3. `helm upgrade --reset-then-reuse-values` (as docs/upgrading.md says) rolls the operator and
//!    keeps the install's overrides; `helm uninstall` leaves no object of the release behind but
//!    the Lease the operator made (the CRD stays, by Helm's design).

#[path = "chart/k8s.rs"]
mod k8s;
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::kubectl::{kubectl, kubectl_ok, require_cluster};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Deletes the namespaces and the release even when the test fails half-way.
struct Cleanup {
    helm: PathBuf,
    release: String,
    namespaces: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ns = &self.namespaces[0];
        let _ = Command::new(&self.helm).args(["uninstall", &self.release, "-n", ns, "--wait"]).output();
        for ns in &self.namespaces {
            let _ = kubectl(&["delete", "namespace", ns, "--wait=false", "--ignore-not-found"], None);
        }
    }
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&kubectl_ok(args, None)).unwrap()
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    support::wait_until(timeout, &mut f).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

#[test]
#[ignore = "needs a cluster: make e2e"]
fn helm_install_runs_the_operator_with_the_charts_rbac_and_uninstall_leaves_nothing() {
    require_cluster();
    let helm = support::require("helm");
    let id = std::process::id();
    let (release, ns, mirrors_ns) = (format!("mfe2e{id}"), format!("mf-chart-{id}"), format!("mf-chart-mirrors-{id}"));
    let _cleanup =
        Cleanup { helm: helm.clone(), release: release.clone(), namespaces: vec![ns.clone(), mirrors_ns.clone()] };
    kubectl_ok(&["create", "namespace", &mirrors_ns], None);
    // The operator's namespace enforces the `restricted` Pod Security Standard: the API server
    // refuses the operator's pods (and `--wait` times out) unless the chart meets it.
    kubectl_ok(&["create", "namespace", &ns], None);
    kubectl_ok(&["label", "namespace", &ns, "pod-security.kubernetes.io/enforce=restricted"], None);

    // 1. Install and wait for the Deployment.
    let chart = root().join("charts/mirrorfleet");
    let started = Instant::now();
    let out = support::run(
        Command::new(&helm)
            .args(["install", &release, chart.to_str().unwrap(), "-n", &ns, "--create-namespace"])
            .args(["--set", &format!("watchNamespace={mirrors_ns}"), "--wait", "--timeout", "180s"]),
        Duration::from_secs(240),
    );
    assert!(out.status.success(), "helm install:\n{}", support::describe_output(&out));
    eprintln!("helm install --wait took {:?}", started.elapsed());
    let deploy_name = format!("{release}-mirrorfleet");
    let deploy = json(&["-n", &ns, "get", "deployment", &deploy_name, "-o", "json"]);
    assert_eq!(deploy["status"]["availableReplicas"], 2, "{}", deploy["status"]);
    for (kind, name) in [
        ("serviceaccount", deploy_name.clone()),
        ("service", format!("{deploy_name}-metrics")),
        ("poddisruptionbudget", deploy_name.clone()),
        ("role", format!("{deploy_name}-leader")),
        ("rolebinding", format!("{deploy_name}-leader")),
    ] {
        kubectl_ok(&["-n", &ns, "get", kind, &name], None);
    }
    kubectl_ok(&["-n", &mirrors_ns, "get", "rolebinding", &deploy_name], None);
    kubectl_ok(&["get", "clusterrole", &deploy_name], None);

    // 2. The real controller, as the chart's ServiceAccount.
    let token = kubectl_ok(&["-n", &ns, "create", "token", &deploy_name, "--duration", "1h"], None);
    let cfg = json(&["config", "view", "--raw", "--minify", "-o", "json"]);
    let cluster = &cfg["clusters"][0]["cluster"];
    let dir = support::tempdir();
    let kubeconfig = dir.path().join("kubeconfig");
    let sa_config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token.trim()}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa", "namespace": ns}}],
    });
    std::fs::write(&kubeconfig, serde_json::to_string(&sa_config).unwrap()).unwrap();
    let admin = support::free_addr();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mirrorfleet"));
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", &kubeconfig)
        .env("MIRRORFLEET_ADMIN_ADDR", &admin)
        .env("MIRRORFLEET_WATCH_NAMESPACE", &mirrors_ns)
        .env("MIRRORFLEET_LEASE_NAMESPACE", &ns)
        .env("POD_NAME", format!("host-{id}"))
        .env("MIRRORFLEET_LOG_FORMAT", "text")
        .env("RUST_LOG", "info,kube=warn");
    let mut controller = support::Proc::spawn("controller", cmd, &dir.path().join("controller.log"));
    controller.wait_ready("/readyz", Duration::from_secs(60), || {
        support::http_request("GET", &admin, "/readyz", &[], &[]).ok().filter(|r| r.status == 200)
    });

    let sample = std::fs::read_to_string(root().join("config/samples/minimal.yaml")).unwrap();
    kubectl_ok(&["-n", &mirrors_ns, "apply", "-f", "-"], Some(&sample));
    let ready = wait_for("RegistryMirror minimal Ready", Duration::from_secs(120), || {
        let m = json(&["-n", &mirrors_ns, "get", "registrymirror", "minimal", "-o", "json"]);
        let conditions = m["status"]["conditions"].as_array().cloned().unwrap_or_default();
        conditions.into_iter().find(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    eprintln!("mirror Ready: {ready}");
    // The metrics the dashboard reads are served, and the leader counted its writes.
    let metrics = String::from_utf8(support::http_get(&admin, "/metrics", &[]).body).unwrap();
    assert!(metrics.contains("mirrorfleet_leader 1"), "{metrics}");
    let lease = json(&["-n", &ns, "get", "lease", "mirrorfleet-controller", "-o", "json"]);
    assert_eq!(lease["spec"]["holderIdentity"], format!("host-{id}"));
    // Delete the mirror while the controller runs, then stop it.
    kubectl_ok(&["-n", &mirrors_ns, "delete", "registrymirror", "minimal", "--wait=true", "--timeout=60s"], None);
    controller.stop();
    let log = controller.log();
    // kube's API errors read "... is forbidden: User ... cannot ..." (reason Forbidden).
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the controller was refused something with the chart's RBAC:\n{log}"
    );

    // An upgrade as docs/upgrading.md runs it (new chart defaults, the user's overrides kept)
    // rolls the operator without touching immutable fields.
    let generation =
        json(&["-n", &ns, "get", "deployment", &deploy_name, "-o", "json"])["metadata"]["generation"].clone();
    let out = support::run(
        Command::new(&helm)
            .args(["upgrade", &release, chart.to_str().unwrap(), "-n", &ns, "--reset-then-reuse-values"])
            .args(["--set", "logging.level=debug", "--wait", "--timeout", "180s"]),
        Duration::from_secs(240),
    );
    assert!(out.status.success(), "helm upgrade:\n{}", support::describe_output(&out));
    let upgraded = json(&["-n", &ns, "get", "deployment", &deploy_name, "-o", "json"]);
    assert_ne!(upgraded["metadata"]["generation"], generation, "the upgrade did not change the Deployment");
    assert_eq!(upgraded["status"]["availableReplicas"], 2);
    let env = upgraded["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(env.contains(&format!("\"{mirrors_ns}\"")), "--reset-then-reuse-values lost watchNamespace: {env}");

    // 3. Uninstall: nothing of the release remains.
    let out =
        support::run(Command::new(&helm).args(["uninstall", &release, "-n", &ns, "--wait"]), Duration::from_secs(120));
    assert!(out.status.success(), "helm uninstall:\n{}", support::describe_output(&out));
    let selector = format!("app.kubernetes.io/instance={release}");
    let left = wait_for("the release's objects to go", Duration::from_secs(60), || {
        let namespaced = kubectl_ok(
            &[
                "get",
                "deploy,rs,pods,svc,sa,cm,secrets,roles,rolebindings,pdb,networkpolicies",
                "-A",
                "-l",
                &selector,
                "-o",
                "name",
            ],
            None,
        );
        let cluster = kubectl_ok(&["get", "clusterroles,clusterrolebindings", "-l", &selector, "-o", "name"], None);
        let all = format!("{namespaced}{cluster}");
        all.trim().is_empty().then_some(all)
    });
    assert!(left.trim().is_empty());
    // What Helm cannot remove: the leader Lease, which the operator creates at run time
    // (docs/upgrading.md says so; it goes with the namespace).
    let leases = kubectl_ok(&["-n", &ns, "get", "leases", "-o", "name"], None);
    assert_eq!(leases.trim(), "lease.coordination.k8s.io/mirrorfleet-controller", "unexpected leftovers: {leases}");
    let upgrading = std::fs::read_to_string(root().join("docs/upgrading.md")).unwrap();
    assert!(
        upgrading.contains("Lease `mirrorfleet-controller`"),
        "docs/upgrading.md must mention the Lease left behind"
    );
    // The CRD stays (Helm never deletes crds/), with it any RegistryMirrors elsewhere.
    kubectl_ok(&["get", "crd", "registrymirrors.mirrorfleet.io"], None);
}

/// `kubectl apply --dry-run=server --validate=strict` of `docs`: the API server's own checks,
/// unknown fields refused.
fn server_dry_run(docs: Vec<Value>, what: &str) {
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs});
    let out = kubectl(&["apply", "--dry-run=server", "--validate=strict", "-f", "-"], Some(&list.to_string()));
    assert!(out.status.success(), "the API server refuses {what}:\n{}", support::describe_output(&out));
}

#[test]
#[ignore = "needs a cluster: make e2e"]
fn every_values_file_passes_strict_server_side_validation() {
    require_cluster();
    let helm = support::require("helm");
    let ns = format!("mf-chart-dryrun-{}", std::process::id());
    let _cleanup = Cleanup { helm: helm.clone(), release: "unused".into(), namespaces: vec![ns.clone()] };
    kubectl_ok(&["create", "namespace", &ns], None);
    let monitoring = kubectl(
        &[
            "get",
            "crd",
            "servicemonitors.monitoring.coreos.com",
            "podmonitors.monitoring.coreos.com",
            "prometheusrules.monitoring.coreos.com",
        ],
        None,
    )
    .status
    .success();
    if !monitoring {
        eprintln!("SKIP (partly): the prometheus-operator CRDs are not installed; ServiceMonitor, PodMonitor and PrometheusRule are not dry-run");
    }
    let chart = root().join("charts/mirrorfleet");
    let mut files: Vec<Option<PathBuf>> = vec![None];
    for entry in std::fs::read_dir(chart.join("ci")).unwrap() {
        files.push(Some(entry.unwrap().path()));
    }
    for values in files {
        let mut args =
            vec!["template".to_string(), "dryrun".into(), chart.display().to_string(), "-n".into(), ns.clone()];
        args.extend(["--set".into(), format!("watchNamespace={ns}")]);
        if let Some(v) = &values {
            args.extend(["-f".into(), v.display().to_string()]);
        }
        let out = support::run(Command::new(&helm).args(&args), Duration::from_secs(60));
        assert!(out.status.success(), "helm template:\n{}", support::describe_output(&out));
        let docs: Vec<Value> = k8s::yaml_docs(&String::from_utf8(out.stdout).unwrap())
            .into_iter()
            .filter(|d| monitoring || d["apiVersion"] != "monitoring.coreos.com/v1")
            .collect();
        server_dry_run(docs, &format!("the chart rendered with {values:?}"));
    }
    // The GitOps examples, against the Argo CD and Flux CRDs where they are installed.
    for file in ["argocd-application.yaml", "flux-helmrelease.yaml", "argocd-cm-health.yaml"] {
        let text = std::fs::read_to_string(root().join("docs/gitops").join(file)).unwrap();
        let mut items = Vec::new();
        for mut d in k8s::yaml_docs(&text) {
            let api_version = d["apiVersion"].as_str().unwrap_or_default().to_string();
            let kind = d["kind"].as_str().unwrap().to_string();
            let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or_default();
            if !group.is_empty()
                && !group.ends_with("k8s.io")
                && !kubectl(&["explain", &kind, "--api-version", &api_version], None).status.success()
            {
                eprintln!("SKIP (partly): {api_version} {kind} is not served here; not dry-run ({file})");
                continue;
            }
            d["metadata"]["namespace"] = Value::String(ns.clone());
            items.push(d);
        }
        // A file whose every kind is unserved here (Argo CD's Application on a cluster without
        // Argo CD) has nothing left to dry-run; `kubectl apply` would refuse an empty list.
        if !items.is_empty() {
            server_dry_run(items, file);
        }
    }
    // The kustomize base too, moved into the test's namespace (a dry-run namespace does not
    // exist for the objects in it).
    let kustomized = kubectl_ok(&["kustomize", root().join("config/default").to_str().unwrap()], None);
    let items: Vec<Value> = k8s::yaml_docs(&kustomized)
        .into_iter()
        .filter(|d| d["kind"] != "Namespace")
        .map(|mut d| {
            if d["metadata"]["namespace"] == "mirrorfleet-system" {
                d["metadata"]["namespace"] = Value::String(ns.clone());
            }
            d
        })
        .collect();
    server_dry_run(items, "config/default");
}
