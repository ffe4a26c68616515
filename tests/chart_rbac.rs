//! The operator's RBAC (the chart's templates/rbac.yaml, and config/rbac for kustomize) against
//! what the controller does, derived rather than listed by hand:
//!
//! - the reconcile's API requests: `reconcile` runs against the in-process API double
//!   (tests/controller/fake_api.rs) through create, orphan deletion, status and the finalizer
//!   path with the richest sample; every recorded request becomes (group, resource, verb);
//! - the watches `run_controller` opens (scanned from src/controller/mod.rs: each
//!   `watch_meta::<Kind>`, `watch_full::<Kind>` and `PartialObjectMeta<Kind>` watch needs
//!   list + watch);
//! - leader election (kube-lease-manager: get, create, patch of one Lease);
//! - `registrymirrors/finalizers` update, because the children's owner references set
//!   blockOwnerDeletion (the OwnerReferencesPermissionEnforcement admission plugin checks it);
//! - every rule of the Roles the builders create for node agents and cleanup jobs: Kubernetes
//!   lets the operator create a Role only if it holds every permission in it.
//!
//! Then: every need is granted, and every granted (group, resource, verb) is needed by one of
//! the above (least privilege); config/rbac grants exactly the same as the chart.

// Shared with tests/controller.rs, which uses more of it.
#[allow(dead_code)]
#[path = "controller/fake_api.rs"]
mod fake_api;
#[path = "chart/k8s.rs"]
mod k8s;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fake_api::{FakeApi, Recorded};
use k8s_openapi::api::rbac::v1::PolicyRule;
use mirrorfleet::api::RegistryMirror;
use mirrorfleet::build::{self, DesiredChildren, Settings};
use mirrorfleet::controller::counting_client;
use mirrorfleet::controller::metrics::Metrics;
use mirrorfleet::controller::reconcile::{reconcile, Context, Options};
use serde_json::{json, Value};

const NS: &str = "mirrors";
const MIRRORS: &str = "mirrorfleet.io/v1alpha1/registrymirrors";
/// Field manager of the test's own edits.
const USER: &str = "rbac-test-user";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// (API group, resource or resource/subresource, verb): one permission.
type Perm = (String, String, String);

fn perm(group: &str, resource: &str, verb: &str) -> Perm {
    (group.to_string(), resource.to_string(), verb.to_string())
}

/// A permission needed, and why (for the failure message).
#[derive(Default)]
struct Needs(BTreeMap<Perm, BTreeSet<String>>);

impl Needs {
    fn add(&mut self, p: Perm, why: impl Into<String>) {
        self.0.entry(p).or_default().insert(why.into());
    }
}

// ---------------------------------------------------------------------------------------------
// What the reconcile asks of the API server.

/// The group, resource (with `/subresource`), verb and object name of a request path.
fn request_perm(r: &Recorded) -> (Perm, Option<String>) {
    let segs: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs[0] {
        "api" => ("", &segs[2..]),
        "apis" => (segs[1], &segs[3..]),
        other => panic!("unexpected request path {other}: {}", r.path),
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 { &rest[2..] } else { rest };
    let resource = match rest {
        [res] | [res, _] => res.to_string(),
        [res, _, sub] => format!("{res}/{sub}"),
        _ => panic!("unexpected request path {}", r.path),
    };
    let name = rest.get(1).map(|s| s.to_string());
    let watch = r.query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (r.method.as_str(), &name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        (m, _) => panic!("unexpected method {m}"),
    };
    (perm(group, &resource, verb), name)
}

fn yaml_docs(text: &str) -> Vec<Value> {
    k8s::yaml_docs(text)
}

fn load_sample(api: &FakeApi, file: &str) -> String {
    let text = std::fs::read_to_string(root().join("config/samples").join(file)).unwrap();
    let mut name = String::new();
    for mut doc in yaml_docs(&text) {
        doc["metadata"]["namespace"] = json!(NS);
        match doc["kind"].as_str() {
            Some("Secret") => {
                use base64::Engine;
                let data: BTreeMap<String, String> = doc["stringData"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap())))
                    .collect();
                api.insert(
                    "/v1/secrets",
                    json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": doc["metadata"]["name"], "namespace": NS}, "data": data}),
                );
            }
            Some("RegistryMirror") => {
                name = doc["metadata"]["name"].as_str().unwrap().to_string();
                api.insert(MIRRORS, doc);
            }
            other => panic!("unexpected {other:?} in {file}"),
        }
    }
    name
}

/// Runs the reconcile through its paths with the public sample (every component on) and returns
/// every request it made.
fn reconcile_requests() -> Vec<Recorded> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let api = FakeApi::new();
        let metrics = Arc::new(Metrics::new());
        let client = counting_client(api.clone(), "default", Arc::new(|_: &str, _: &str, _: Option<&str>| {}));
        // Release the finalizer at once instead of waiting for node agents.
        let options = Options { node_removal_timeout: Duration::ZERO, ..Options::default() };
        let ctx = Arc::new(Context::new(client, Settings::default(), options, metrics, None));
        api.insert(
            "/v1/secrets",
            json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "mirror-tls", "namespace": NS},
            "data": {"tls.crt": "Q0VSVA==", "tls.key": "S0VZ"}}),
        );
        let mirror = |api: &FakeApi, name: &str| -> Arc<RegistryMirror> {
            Arc::new(serde_json::from_value(api.get(MIRRORS, NS, name).expect("mirror exists")).unwrap())
        };
        // The test's own edits go through the API as a user's would, marked by their field
        // manager so they are not counted as the controller's.
        let user = counting_client(api.clone(), "default", Arc::new(|_: &str, _: &str, _: Option<&str>| {}));
        let user_patch = |name: String, patch: Value| {
            let mirrors: kube::Api<RegistryMirror> = kube::Api::namespaced(user.clone(), NS);
            let params = kube::api::PatchParams { field_manager: Some(USER.into()), ..Default::default() };
            async move { mirrors.patch(&name, &params, &kube::api::Patch::Merge(&patch)).await.expect("user edit") }
        };
        let public = load_sample(&api, "public-mirrors.yaml");
        // Create everything, then once more (status from what was applied).
        {
            ctx.relist_children(NS).await.expect("relist");
            reconcile(mirror(&api, &public), ctx.clone()).await
        }
        .expect("first reconcile");
        {
            ctx.relist_children(NS).await.expect("relist");
            reconcile(mirror(&api, &public), ctx.clone()).await
        }
        .expect("second reconcile");
        // Persistent cache volumes, and NetworkPolicies.
        user_patch(
            public.clone(),
            json!({"spec": {"proxy": {"storage":
            {"emptyDir": null, "persistentVolumeClaim": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}}},
            "networkPolicy": {"fromNamespaces": ["ci"], "fromCIDRs": ["10.0.0.0/16"]}}}),
        )
        .await;
        {
            ctx.relist_children(NS).await.expect("relist");
            reconcile(mirror(&api, &public), ctx.clone()).await
        }
        .expect("reconcile with PVCs");
        // Drop every optional component: orphan deletion of every kind.
        let mut upstreams = mirror(&api, &public).spec.upstreams.clone();
        upstreams.pop();
        user_patch(
            public.clone(),
            json!({"spec": {"edge": null, "cleanup": null, "clientAuth": null, "nodeConfig": null, "networkPolicy": null,
            "upstreams": upstreams,
            "proxy": {"storage": {"persistentVolumeClaim": null, "emptyDir": {}}}}}),
        )
        .await;
        for _ in 0..3 {
            {
                ctx.relist_children(NS).await.expect("relist");
                reconcile(mirror(&api, &public), ctx.clone()).await
            }
            .expect("reconcile after dropping components");
        }
        // Delete a mirror with node config: node-config removal, nodes and agents looked at,
        // finalizer released.
        api.insert(
            "/v1/secrets",
            json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "ngc-creds", "namespace": NS},
            "data": {"username": "dXNlcg==", "password": "cGFzcw==", "user": "dXNlcg==", "token": "dG9r"}}),
        );
        let private = load_sample(&api, "private-upstream.yaml");
        {
            ctx.relist_children(NS).await.expect("relist");
            reconcile(mirror(&api, &private), ctx.clone()).await
        }
        .expect("private sample");
        api.insert("/v1/nodes", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}));
        user_patch(private.clone(), json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})).await;
        {
            ctx.relist_children(NS).await.expect("relist");
            reconcile(mirror(&api, &private), ctx.clone()).await
        }
        .expect("finalizing reconcile");
        assert!(api.get(MIRRORS, NS, &private).is_none(), "the scenario should end with the finalizer released");
        // Each kind was deleted at least once, so the scenario reached orphan deletion for all.
        let deleted: BTreeSet<String> =
            api.requests().iter().filter(|r| r.method == "DELETE").map(|r| request_perm(r).0 .1).collect();
        for kind in [
            "deployments",
            "services",
            "configmaps",
            "secrets",
            "daemonsets",
            "cronjobs",
            "persistentvolumeclaims",
            "networkpolicies",
            "serviceaccounts",
            "roles",
            "rolebindings",
        ] {
            assert!(deleted.contains(kind), "the scenario never deleted {kind}: {deleted:?}");
        }
        api.requests().into_iter().filter(|r| !r.query.contains(&format!("fieldManager={USER}"))).collect()
    })
}

// ---------------------------------------------------------------------------------------------
// What runs outside the reconcile, from the code.

/// (group, plural) of the kinds the controller names by Rust type.
fn kind_resource(kind: &str) -> (String, String) {
    use k8s_openapi::api::{apps, batch, core, networking, rbac};
    fn of<K: k8s_openapi::Resource>() -> (String, String) {
        (K::GROUP.to_string(), K::URL_PATH_SEGMENT.to_string())
    }
    match kind {
        "Deployment" => of::<apps::v1::Deployment>(),
        "DaemonSet" => of::<apps::v1::DaemonSet>(),
        "Service" => of::<core::v1::Service>(),
        "ConfigMap" => of::<core::v1::ConfigMap>(),
        "Secret" => of::<core::v1::Secret>(),
        "Pod" => of::<core::v1::Pod>(),
        "Node" => of::<core::v1::Node>(),
        "PersistentVolumeClaim" => of::<core::v1::PersistentVolumeClaim>(),
        "ServiceAccount" => of::<core::v1::ServiceAccount>(),
        "CronJob" => of::<batch::v1::CronJob>(),
        "NetworkPolicy" => of::<networking::v1::NetworkPolicy>(),
        "Job" => of::<batch::v1::Job>(),
        "Role" => of::<rbac::v1::Role>(),
        "RoleBinding" => of::<rbac::v1::RoleBinding>(),
        "RegistryMirror" => ("mirrorfleet.io".into(), "registrymirrors".into()),
        other => panic!("the controller watches {other}; add it to kind_resource in tests/chart_rbac.rs"),
    }
}

/// The kinds `run_controller` watches, from its source.
fn watched_kinds() -> BTreeSet<String> {
    let src = std::fs::read_to_string(root().join("src/controller/mod.rs")).unwrap();
    let re = regex::Regex::new(r"(?:watch_meta::<|watch_full::<|PartialObjectMeta<|api::<)([A-Z][A-Za-z]+)>").unwrap();
    let mut kinds: BTreeSet<String> = re.captures_iter(&src).map(|c| c[1].to_string()).collect();
    kinds.remove("K"); // the generic helper itself
    assert!(src.contains("watcher(mirrors"), "src/controller/mod.rs no longer watches mirrors as expected");
    kinds.insert("RegistryMirror".into());
    assert!(kinds.len() >= 10, "the watch scan of src/controller/mod.rs found too little: {kinds:?}");
    kinds
}

fn needs() -> Needs {
    let mut needs = Needs::default();
    for r in reconcile_requests() {
        let ((group, resource, verb), _) = request_perm(&r);
        let why = format!("reconcile: {} {}", r.method, r.path);
        // Server-side apply creates the object when it is absent: `create` as well as `patch`
        // (not for subresources, whose object exists).
        if r.method == "PATCH"
            && r.content_type.as_deref().is_some_and(|c| c.starts_with("application/apply-patch"))
            && !resource.contains('/')
        {
            needs.add(perm(&group, &resource, "create"), why.clone());
        }
        needs.add((group, resource, verb), why);
    }
    for kind in watched_kinds() {
        let (group, resource) = kind_resource(&kind);
        needs.add(perm(&group, &resource, "list"), format!("watch of {kind} in run_controller"));
        needs.add(perm(&group, &resource, "watch"), format!("watch of {kind} in run_controller"));
    }
    // kube-runtime's Recorder patches an Event it already sent (a repeat) instead of creating it.
    let reconcile_src = std::fs::read_to_string(root().join("src/controller/reconcile.rs")).unwrap();
    if reconcile_src.contains("Recorder::new") {
        needs.add(perm("events.k8s.io", "events", "create"), "kube-runtime Recorder");
        needs.add(perm("events.k8s.io", "events", "patch"), "kube-runtime Recorder (repeated Events)");
    }
    // The upstream monitor reads a proxy's sidecar log after a 429 (its rate-limit headers).
    let upstreams_src = std::fs::read_to_string(root().join("src/controller/upstreams.rs")).unwrap();
    if upstreams_src.contains(".logs(") {
        needs.add(perm("", "pods/log", "get"), "upstream monitor: a sidecar's log after a 429");
    }
    // Leader election: kube-lease-manager 0.13 gets, creates and patches its Lease (its
    // LeaseState); a new major version must be looked at again.
    let leader_src = std::fs::read_to_string(root().join("src/controller/leader.rs")).unwrap();
    if leader_src.contains("LeaseManagerBuilder") {
        let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
        assert!(
            lock.contains("name = \"kube-lease-manager\"\nversion = \"0.13."),
            "kube-lease-manager changed version: check which verbs it uses on Leases and update this test"
        );
        for verb in ["get", "create", "patch"] {
            needs.add(perm("coordination.k8s.io", "leases", verb), "leader election (kube-lease-manager)");
        }
    }
    // Children and their owner reference; child Roles need what they grant.
    let settings = Settings { operator_image: "example/mirrorfleet:test".into(), ..Settings::default() };
    for file in ["public-mirrors.yaml", "private-upstream.yaml", "minimal.yaml", "restricted.yaml", "regional.yaml"] {
        for child_role_rule in child_role_rules(file, &settings) {
            for group in child_role_rule.api_groups.iter().flatten() {
                for resource in child_role_rule.resources.iter().flatten() {
                    for verb in &child_role_rule.verbs {
                        needs.add(perm(group, resource, verb), format!("granted onward by a Role built for {file}"));
                    }
                }
            }
        }
    }
    needs
}

/// The rules of every Role the builders create for the sample `file`; asserts the children's
/// owner references block owner deletion (hence `registrymirrors/finalizers` update).
fn child_role_rules(file: &str, settings: &Settings) -> Vec<PolicyRule> {
    let text = std::fs::read_to_string(root().join("config/samples").join(file)).unwrap();
    let opts = mirrorfleet::render::RenderOptions {
        namespace: NS.into(),
        settings: settings.clone(),
        endpoints: Default::default(),
        include_secrets: true,
    };
    let rendered = mirrorfleet::render::render_str(&text, &opts).unwrap();
    let docs = k8s::yaml_docs(&mirrorfleet::render::to_yaml_stream(&rendered, true));
    let mut rules = Vec::new();
    for d in docs {
        if d["kind"] == "Role" {
            let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(d).unwrap();
            rules.extend(role.rules.unwrap_or_default());
        }
    }
    rules
}

fn block_owner_deletion_is_set() -> bool {
    let text = std::fs::read_to_string(root().join("config/samples/minimal.yaml")).unwrap();
    let mut mirror: RegistryMirror = serde_yaml::from_str(&text).unwrap();
    mirror.metadata.namespace = Some(NS.into());
    mirror.metadata.uid = Some("uid-1".into());
    let fleet = build::build(&mirror, &Default::default(), &Settings::default()).unwrap();
    let DesiredChildren { deployments, .. } = fleet.children;
    let owner = deployments[0].metadata.owner_references.as_ref().unwrap()[0].clone();
    owner.block_owner_deletion == Some(true)
}

// ---------------------------------------------------------------------------------------------
// What the manifests grant.

/// Every rule of every ClusterRole and Role in `docs`, by (kind, name).
fn granted_rules(docs: &[Value]) -> BTreeMap<(String, String), Vec<PolicyRule>> {
    docs.iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .map(|d| {
            let rules: Vec<PolicyRule> = serde_json::from_value(d["rules"].clone()).unwrap();
            ((d["kind"].as_str().unwrap().to_string(), d["metadata"]["name"].as_str().unwrap().to_string()), rules)
        })
        .collect()
}

fn allows(rules: &[PolicyRule], p: &Perm, name: Option<&str>) -> bool {
    rules.iter().any(|r| {
        let has = |list: &Option<Vec<String>>, want: &str| list.iter().flatten().any(|x| x == want || x == "*");
        has(&r.api_groups, &p.0)
            && has(&r.resources, &p.1)
            && r.verbs.iter().any(|v| v == &p.2 || v == "*")
            && match (&r.resource_names, name) {
                (None, _) => true,
                (Some(names), _) if names.is_empty() => true,
                (Some(names), Some(n)) => names.iter().any(|x| x == n),
                (Some(_), None) => false,
            }
    })
}

/// Flattened (group, resource, verb) of rules, with resourceNames kept apart.
fn flatten(rules: &[PolicyRule]) -> BTreeSet<(String, String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    let mut names = r.resource_names.clone().unwrap_or_default();
                    names.sort();
                    out.insert((g.clone(), res.clone(), v.clone(), names));
                }
            }
        }
    }
    out
}

fn helm_template(helm: &Path, set: &[&str]) -> Vec<Value> {
    let chart = root().join("charts/mirrorfleet");
    let mut args = vec!["template", "mf", chart.to_str().unwrap(), "--namespace", "mirrorfleet-system"];
    for s in set {
        args.extend(["--set", s]);
    }
    k8s::yaml_docs(&k8s::helm_ok(helm, &args))
}

#[test]
fn request_paths_map_to_rbac_verbs() {
    // The mapping the derivation rests on, on known requests.
    let rec = |method: &str, path: &str, query: &str| Recorded {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        content_type: None,
        body: None,
    };
    let cases = [
        (rec("GET", "/api/v1/namespaces/m/secrets/s", ""), ("", "secrets", "get")),
        (rec("GET", "/api/v1/namespaces/m/pods", "labelSelector=a"), ("", "pods", "list")),
        (rec("GET", "/api/v1/pods", "watch=true&resourceVersion=1"), ("", "pods", "watch")),
        (rec("GET", "/api/v1/nodes", ""), ("", "nodes", "list")),
        (rec("PATCH", "/apis/apps/v1/namespaces/m/deployments/d", ""), ("apps", "deployments", "patch")),
        (
            rec("PATCH", "/apis/mirrorfleet.io/v1alpha1/namespaces/m/registrymirrors/p/status", ""),
            ("mirrorfleet.io", "registrymirrors/status", "patch"),
        ),
        (rec("DELETE", "/api/v1/namespaces/m/configmaps/c", ""), ("", "configmaps", "delete")),
        (rec("POST", "/apis/events.k8s.io/v1/namespaces/m/events", ""), ("events.k8s.io", "events", "create")),
    ];
    for (r, (g, res, v)) in cases {
        assert_eq!(request_perm(&r).0, perm(g, res, v), "{} {}", r.method, r.path);
    }
}

#[test]
fn chart_rbac_grants_what_the_controller_needs_and_nothing_more() {
    let Some(helm) = support::tool("helm") else { return };
    let mut needs = needs();
    assert!(block_owner_deletion_is_set(), "children no longer block owner deletion: drop the finalizers rule");
    needs.add(perm("mirrorfleet.io", "registrymirrors/finalizers", "update"), "blockOwnerDeletion on children");
    let lease = "mirrorfleet-controller";

    for set in [&[][..], &["watchNamespace=mirrors"][..]] {
        let docs = helm_template(&helm, set);
        let granted = granted_rules(&docs);
        let all: Vec<PolicyRule> = granted.values().flatten().cloned().collect();
        // 1. Everything needed is granted.
        let missing: Vec<String> = needs
            .0
            .iter()
            .filter(|(p, _)| !allows(&all, p, if p.1 == "leases" { Some(lease) } else { None }))
            .map(|(p, why)| format!("{p:?} needed by {why:?}"))
            .collect();
        assert!(missing.is_empty(), "chart RBAC ({set:?}) lacks:\n  {}", missing.join("\n  "));
        // 2. Nothing is granted that nothing needs.
        let extra: Vec<String> = flatten(&all)
            .into_iter()
            .filter(|(g, r, v, _)| !needs.0.contains_key(&perm(g, r, v)))
            .map(|x| format!("{x:?}"))
            .collect();
        assert!(
            extra.is_empty(),
            "chart RBAC ({set:?}) grants what the controller never uses:\n  {}",
            extra.join("\n  ")
        );
        // 3. No wildcards, no escalate/bind/impersonate.
        for (g, r, v, _) in flatten(&all) {
            assert!(g != "*" && r != "*" && v != "*", "wildcard in chart RBAC");
            assert!(!["escalate", "bind", "impersonate"].contains(&v.as_str()), "{g}/{r}: {v}");
        }
        // 4. The Lease is the only thing the namespaced Role grants, pinned by name for get/patch.
        let leader = granted.iter().find(|((k, _), _)| k == "Role").expect("leader Role").1;
        for (g, r, v, names) in flatten(leader) {
            assert_eq!((g.as_str(), r.as_str()), ("coordination.k8s.io", "leases"));
            assert!(v == "create" || names == [lease.to_string()], "lease {v} not pinned to {lease}: {names:?}");
        }
    }
    // With watchNamespace, the main rules are bound in that namespace only.
    let docs = helm_template(&helm, &["watchNamespace=mirrors"]);
    let main = docs.iter().find(|d| d["kind"] == "RoleBinding" && d["metadata"]["namespace"] == "mirrors");
    assert!(main.is_some_and(|b| b["roleRef"]["name"] == "mf-mirrorfleet"), "no RoleBinding in the watched namespace");
    assert!(
        !docs.iter().any(|d| d["kind"] == "ClusterRoleBinding" && d["roleRef"]["name"] == "mf-mirrorfleet"),
        "watchNamespace must not bind the main ClusterRole cluster-wide"
    );
}

#[test]
fn every_chart_rbac_rule_carries_a_comment() {
    let text = std::fs::read_to_string(root().join("charts/mirrorfleet/templates/rbac.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            let above = lines[..i].iter().rev().find(|l| !l.trim().is_empty()).unwrap();
            assert!(above.trim_start().starts_with('#'), "rbac.yaml line {}: rule without a comment above it", i + 1);
        }
    }
}

#[test]
fn kustomize_rbac_is_the_charts() {
    let Some(helm) = support::tool("helm") else { return };
    let Some(kubectl) = support::tool("kubectl") else { return };
    if !root().join("config/rbac/kustomization.yaml").exists() {
        // config/rbac belongs to the controller's author; until it exists there is nothing to
        // compare (tests/chart_kustomize.rs says the same about config/default).
        eprintln!("SKIP: config/rbac/kustomization.yaml does not exist yet");
        return;
    }
    let out = support::run(
        std::process::Command::new(kubectl).args(["kustomize", root().join("config/rbac").to_str().unwrap()]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "kubectl kustomize config/rbac:\n{}", support::describe_output(&out));
    let kustomize = granted_rules(&k8s::yaml_docs(&String::from_utf8_lossy(&out.stdout)));
    let chart = granted_rules(&helm_template(&helm, &[]));
    let by_kind = |m: &BTreeMap<(String, String), Vec<PolicyRule>>| -> BTreeMap<String, BTreeSet<_>> {
        let mut out: BTreeMap<String, BTreeSet<_>> = BTreeMap::new();
        for ((kind, _), rules) in m {
            out.entry(kind.clone()).or_default().extend(flatten(rules));
        }
        out
    };
    pretty_assertions::assert_eq!(by_kind(&kustomize), by_kind(&chart), "config/rbac and the chart grant differently");
}
