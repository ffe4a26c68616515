//! The reconcile pipeline for one RegistryMirror: validate (spec and referenced Secrets) ->
//! build (the pure builders) -> apply (server-side apply, orphans deleted by label selection) ->
//! status (computed from what was applied, written only when it changed). Node config removal
//! and the finalizer are in [`super::nodes`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, info_span, warn, Instrument};

use super::apply::{apply_params, Applier, ApplyCache, STORE_LAG};
use super::children::{self, ChildStores, ChildWriters, Compact};
use super::error::{Error, ErrorClass, Result};
use super::inputs::read_inputs;
use super::metrics::Metrics;
use super::nodes::{self, Removal};
use super::status::{self, Observed};
use super::upstreams::{self, HealthStore};
use crate::api::conflicts::{self, NodeConflict};
use crate::api::{RegistryMirror, RegistryMirrorStatus, ZoneNodes, ZONE_LABEL};
use crate::build::meta::{names, Component, LABEL_COMPONENT, LABEL_INSTANCE};
use crate::build::{self, DesiredChildren, Settings};

/// Timings of the reconcile loop.
#[derive(Clone, Debug)]
pub struct Options {
    /// Requeue after a successful reconcile (drift the watches missed is repaired by then).
    pub requeue: Duration,
    /// How often to look again while waiting for node agents to remove their files.
    pub removal_poll: Duration,
    /// Release the finalizer after this long even if some agents never reported.
    pub node_removal_timeout: Duration,
    /// First retry after a transient error; doubles per failure, up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Reading the proxies' upstream sidecars ([`upstreams::monitor`]); None: not read.
    pub upstream_monitor: Option<upstreams::MonitorOptions>,
    /// Asking upstreams without `auth` for their challenge ([`super::challenge`]).
    pub learn_challenges: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            requeue: Duration::from_secs(300),
            removal_poll: Duration::from_secs(5),
            node_removal_timeout: Duration::from_secs(600),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            upstream_monitor: Some(upstreams::MonitorOptions::default()),
            learn_challenges: true,
        }
    }
}

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub options: Options,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub cache: ApplyCache,
    /// Every child, as the watches have it ([`children`]).
    pub children: ChildStores,
    /// The stores' writing halves, until the watches take them.
    writers: Mutex<Option<ChildWriters>>,
    /// Per mirror: the newest finished cleanup Job's uid and its pods (their reports do not
    /// change once the Job has finished, so they are listed once).
    cleanup_reports: Mutex<HashMap<String, (String, Vec<Pod>)>>,
    /// Per mirror: its Services as last applied, for their cluster IPs while the Service store
    /// has not caught up with them yet.
    applied_services: Mutex<HashMap<String, BTreeMap<String, Service>>>,
    failures: Mutex<HashMap<String, u32>>,
    /// What the proxies' upstream sidecars see of each upstream ([`super::upstreams::monitor`]).
    pub upstream_health: Arc<HealthStore>,
    /// Challenges learned from upstreams without `auth` ([`super::challenge`]).
    pub challenges: super::challenge::Challenges,
    removal_started: Mutex<HashMap<String, Instant>>,
    /// Every mirror the controller watches, for the rule that two mirrors do not configure one
    /// registry on one node ([`conflicts`]). Unset (request-level tests): listed when needed.
    mirrors: OnceLock<Store<RegistryMirror>>,
    /// Node-agent Pods (node name and readiness) and Nodes (labels), for the nodes per zone in
    /// the status. Unset (request-level tests): listed when needed.
    agent_pods: OnceLock<Store<Pod>>,
    nodes: OnceLock<Store<PartialObjectMeta<Node>>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        options: Options,
        metrics: Arc<Metrics>,
        reporter_instance: Option<String>,
    ) -> Self {
        let reporter =
            kube::runtime::events::Reporter { controller: "mirrorfleet".into(), instance: reporter_instance };
        let (children, writers) = children::stores();
        Self {
            children,
            writers: Mutex::new(Some(writers)),
            cleanup_reports: Mutex::default(),
            applied_services: Mutex::default(),
            challenges: super::challenge::Challenges::new(options.learn_challenges),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            options,
            metrics,
            cache: ApplyCache::default(),
            failures: Mutex::default(),
            upstream_health: Arc::default(),
            removal_started: Mutex::default(),
            mirrors: OnceLock::new(),
            agent_pods: OnceLock::new(),
            nodes: OnceLock::new(),
        }
    }

    /// Hands the watches' stores of node-agent Pods and Nodes to the reconciles (once).
    pub fn set_node_stores(&self, agent_pods: Store<Pod>, nodes: Store<PartialObjectMeta<Node>>) {
        let _ = self.agent_pods.set(agent_pods);
        let _ = self.nodes.set(nodes);
    }

    /// The mirror's node agents per zone of their nodes ([`status::zone_counts`]).
    async fn node_zones(&self, mirror: &RegistryMirror) -> Result<Vec<ZoneNodes>> {
        if mirror.spec.node_config.is_none() {
            return Ok(Vec::new());
        }
        let ns = mirror.namespace().unwrap_or_default();
        let name = mirror.name_any();
        let mine = |p: &Pod| {
            p.metadata.namespace.as_deref() == Some(ns.as_str())
                && p.labels().get(LABEL_INSTANCE).map(String::as_str) == Some(name.as_str())
                && p.labels().get(LABEL_COMPONENT).map(String::as_str) == Some(Component::NodeAgent.as_str())
        };
        let pods: Vec<Pod> = match self.agent_pods.get() {
            Some(store) => store.state().iter().filter(|p| mine(p)).map(|p| (**p).clone()).collect(),
            None => {
                let selector = format!("{},{LABEL_INSTANCE}={name}", children::agent_pods_selector());
                Api::<Pod>::namespaced(self.client.clone(), &ns)
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map_err(|e| Error::api("list", "Pod", "", e))?
                    .items
            }
        };
        if pods.is_empty() {
            return Ok(Vec::new());
        }
        let zones: HashMap<String, String> = match self.nodes.get() {
            Some(store) => store.state().iter().map(|n| (n.name_any(), zone_label(&n.metadata))).collect(),
            None => Api::<Node>::all(self.client.clone())
                .list_metadata(&ListParams::default())
                .await
                .map_err(|e| Error::api("list", "Node", "", e))?
                .items
                .iter()
                .map(|n| (n.name_any(), zone_label(&n.metadata)))
                .collect(),
        };
        Ok(status::zone_counts(&pods, |node| zones.get(node).cloned()))
    }

    /// Hands the controller's mirror store to the reconciles (once).
    pub fn set_mirror_store(&self, store: Store<RegistryMirror>) {
        let _ = self.mirrors.set(store);
    }

    /// The conflicts of `mirror`'s node config with every other mirror's ([`conflicts`]): from the
    /// controller's store, or, without one, from a list.
    async fn node_conflicts(&self, mirror: &RegistryMirror) -> Result<Vec<NodeConflict>> {
        if mirror.spec.node_config.is_none() {
            return Ok(Vec::new());
        }
        if let Some(store) = self.mirrors.get() {
            // The whole first list, or a mirror listed late would be missed (its own list event
            // does not trigger relatives). Readiness wakes only the last waiter: look again.
            while tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await.is_err() {}
            let all = store.state();
            return Ok(conflicts::node_conflicts(mirror, all.iter().map(|m| m.as_ref())));
        }
        let all = Api::<RegistryMirror>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::api("list", "RegistryMirror", "", e))?;
        Ok(conflicts::node_conflicts(mirror, all.items.iter()))
    }

    /// Drops what is remembered of a mirror that is gone (or going): its apply records, Service
    /// IPs, cleanup reports, failure count and removal clock.
    pub fn forget_mirror(&self, namespace: &str, name: &str) {
        let k = format!("{namespace}/{name}");
        self.cache.forget_prefix(namespace, &format!("{name}-"));
        self.cleanup_reports.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
        self.applied_services.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
        self.removal_started.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
        self.upstream_health.forget(&k);
    }

    /// Hands the child stores' writers to the watches (once; None after that).
    pub fn take_child_writers(&self) -> Option<ChildWriters> {
        self.writers.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Fills the child stores from a list of every child kind in `namespace`, as the watches'
    /// first list would: for request-level tests, which run reconciles without watches.
    pub async fn relist_children(&self, namespace: &str) -> anyhow::Result<()> {
        let Some(mut writers) = self.take_child_writers() else {
            anyhow::bail!("the child stores are fed by the watches; there is nothing to relist into");
        };
        let result = writers.relist(&self.client, namespace).await.map_err(anyhow::Error::from);
        *self.writers.lock().unwrap_or_else(|e| e.into_inner()) = Some(writers);
        result
    }

    async fn event(&self, mirror: &RegistryMirror, type_: EventType, reason: &str, action: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(note, 1024)),
            action: action.into(),
            secondary: None,
        };
        // An Event that cannot be written must not fail the reconcile.
        if let Err(e) = self.recorder.publish(&event, &mirror.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish Event");
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn key(mirror: &RegistryMirror) -> String {
    format!("{}/{}", mirror.namespace().unwrap_or_default(), mirror.name_any())
}

/// The Controller's reconcile function: the pipeline, timed and counted, in a span that names
/// the mirror.
pub async fn reconcile(mirror: Arc<RegistryMirror>, ctx: Arc<Context>) -> Result<Action> {
    let span = info_span!("reconcile", namespace = %mirror.namespace().unwrap_or_default(), name = %mirror.name_any());
    async move {
        ctx.metrics.reconciles.inc();
        ctx.metrics.in_flight.inc();
        let started = Instant::now();
        let mut result = reconcile_mirror(&mirror, &ctx).await;
        // A child that cannot be written (an admission webhook, a quota, missing RBAC, an API
        // server in trouble) keeps the mirror from converging: say so in the status, then retry
        // with backoff all the same.
        if let Err(e) = result {
            result = Err(if e.shows_in_ready() && mirror.metadata.deletion_timestamp.is_none() {
                report_problem(&mirror, &ctx, e).await
            } else {
                e
            });
        }
        ctx.metrics.in_flight.dec();
        ctx.metrics.observe_reconcile(started.elapsed(), result.as_ref().err().map(Error::reason));
        match &result {
            Ok(action) => {
                ctx.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&key(&mirror));
                debug!(took_ms = started.elapsed().as_millis() as u64, ?action, "reconciled");
            }
            Err(e) => warn!(error = %e, reason = e.reason(), "reconcile failed"),
        }
        result
    }
    .instrument(span)
    .await
}

/// The Controller's error policy: an invalid spec waits for a change (the watches on the mirror
/// and on its Secrets bring it); anything else retries with per-object exponential backoff.
pub fn error_policy(mirror: Arc<RegistryMirror>, error: &Error, ctx: Arc<Context>) -> Action {
    match error.class() {
        ErrorClass::WaitForChange => Action::await_change(),
        ErrorClass::Transient => {
            let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
            let n = failures.entry(key(&mirror)).or_insert(0);
            *n = n.saturating_add(1);
            Action::requeue(backoff(&ctx.options, *n))
        }
    }
}

/// `min * 2^(failures-1)`, capped at `max`.
pub fn backoff(options: &Options, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    options.min_backoff.saturating_mul(factor).min(options.max_backoff)
}

async fn reconcile_mirror(mirror: &RegistryMirror, ctx: &Context) -> Result<Action> {
    let ns = mirror.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let uid = mirror.uid().ok_or(Error::MissingMetadata("uid"))?;

    if mirror.metadata.deletion_timestamp.is_some() {
        return finalize(mirror, ctx).await;
    }

    // Validate: the spec, then the Secrets it names. Nothing is written for a spec the operator
    // cannot act on, except the status and an Event saying why.
    let prepared = async {
        crate::api::validate::validate(mirror)?;
        let inputs = read_inputs(&ctx.client, mirror).await?;
        build::validate_inputs(mirror, &inputs)?;
        Ok::<_, Error>(inputs)
    }
    .await;
    let mut inputs = match prepared {
        Ok(inputs) => inputs,
        Err(e) if e.class() == ErrorClass::WaitForChange => return Err(report_problem(mirror, ctx, e).await),
        Err(e) => return Err(e),
    };
    // Upstreams without `auth`: the challenge as learned before (status) or asked now.
    inputs.learned_auth = ctx.challenges.learned(mirror);
    // A registry another mirror already configures on nodes this one selects: refused, nothing
    // written, until the other goes or one of them changes (the mirror watch brings that).
    let node_conflicts = ctx.node_conflicts(mirror).await?;
    if let Some(first) = node_conflicts.iter().find(|c| c.other_first) {
        return Err(report_problem(mirror, ctx, Error::NodeConfigConflict(first.refusal())).await);
    }

    let removing_nodes = mirror.spec.node_config.is_none() && nodes::has_finalizer(mirror);
    if mirror.spec.node_config.is_some() && !nodes::has_finalizer(mirror) {
        // Before any node agent can write a file.
        nodes::add_finalizer(&ctx.client, mirror).await?;
    }

    // Build, with the proxies' cluster IPs as the nodes' endpoints. Children are read from the
    // watches' stores, complete once each has had its first list.
    ctx.children.wait_until_ready().await;
    let live = ctx.children.live_children(mirror);
    let mut known_services =
        ctx.applied_services.lock().unwrap_or_else(|e| e.into_inner()).remove(&key(mirror)).unwrap_or_default();
    known_services.extend(live.services.clone());
    inputs.proxy_endpoints = status::proxy_endpoints(mirror, &known_services);
    let mut fleet = match build::build(mirror, &inputs, &ctx.settings) {
        Ok(f) => f,
        Err(e) => return Err(report_problem(mirror, ctx, e.into()).await),
    };

    // Apply, in two concurrent waves. Nodes reach a proxy by its Service's cluster IP, which
    // exists only once the Service does, so the first wave is everything except the node
    // config and the workloads; when a cluster IP is new, the fleet is built again with it. The
    // second wave is the node config and the workloads, after what they read. Within each wave
    // the RoleBindings wait for their Roles ([`apply_rbac`]).
    let applier = Applier::new(&ctx.client, &ns, &ctx.cache, &live);
    let node_config_name = names::node_config(mirror);
    let (early_config_maps, _): (Vec<_>, Vec<_>) = fleet
        .children
        .config_maps
        .iter()
        .cloned()
        .partition(|cm| cm.metadata.name.as_deref() != Some(node_config_name.as_str()));
    let c = &fleet.children;
    let (applied_services, ..) = futures::try_join!(
        applier.apply(&c.services),
        apply_rbac(&applier, &c.service_accounts, &c.roles, &c.role_bindings),
        applier.apply(&c.secrets),
        applier.apply(&early_config_maps),
        applier.apply(&c.persistent_volume_claims),
        applier.apply(&c.network_policies),
    )?;
    let mut services = known_services;
    services.extend(applied_services);
    let endpoints = status::proxy_endpoints(mirror, &services);
    if endpoints != inputs.proxy_endpoints {
        inputs.proxy_endpoints = endpoints;
        fleet = build::build(mirror, &inputs, &ctx.settings).map_err(Error::from)?;
    }
    // Destructured without `..`: a kind added to DesiredChildren must be handled here.
    let DesiredChildren {
        service_accounts,
        roles,
        role_bindings,
        secrets,
        config_maps,
        persistent_volume_claims,
        network_policies,
        services: desired_services,
        deployments,
        daemon_sets,
        cron_jobs,
    } = fleet.children;
    // Objects of the first wave are skipped here unless the second build changed them.
    let (_, _, _, _, _, _, applied_deployments, applied_daemon_sets, _) = futures::try_join!(
        apply_rbac(&applier, &service_accounts, &roles, &role_bindings),
        applier.apply(&secrets),
        applier.apply(&config_maps),
        applier.apply(&persistent_volume_claims),
        applier.apply(&network_policies),
        applier.apply(&desired_services),
        applier.apply(&deployments),
        applier.apply(&daemon_sets),
        applier.apply(&cron_jobs),
    )?;
    let mut observed_deployments = live.deployments.clone();
    observed_deployments.extend(applied_deployments);
    let mut observed_daemon_sets: BTreeMap<String, DaemonSet> = live.daemon_sets.clone();
    observed_daemon_sets.extend(applied_daemon_sets);

    // Orphans: workloads first, then what they read. While node config is being removed the
    // node agent and its config stay, so the agents can clean up.
    let keep = |meta: &ObjectMeta| {
        removing_nodes
            && meta.labels.as_ref().and_then(|l| l.get(LABEL_COMPONENT)).map(String::as_str)
                == Some(Component::NodeAgent.as_str())
    };
    futures::try_join!(
        applier.delete_orphans(&cron_jobs, &uid, keep),
        applier.delete_orphans(&daemon_sets, &uid, keep),
        applier.delete_orphans(&deployments, &uid, keep),
    )?;
    futures::try_join!(
        applier.delete_orphans(&desired_services, &uid, keep),
        applier.delete_orphans(&persistent_volume_claims, &uid, keep),
        applier.delete_orphans(&network_policies, &uid, keep),
        applier.delete_orphans(&config_maps, &uid, keep),
        applier.delete_orphans(&secrets, &uid, keep),
        applier.delete_orphans(&role_bindings, &uid, keep),
        applier.delete_orphans(&roles, &uid, keep),
        applier.delete_orphans(&service_accounts, &uid, keep),
    )?;
    let trusted_lag = applier.trusted_lag();
    let remembered: BTreeMap<String, Service> = desired_services
        .iter()
        .filter_map(|d| {
            let mut svc = services.get(&d.name_any())?.clone();
            svc.compact();
            Some((d.name_any(), svc))
        })
        .collect();
    ctx.applied_services.lock().unwrap_or_else(|e| e.into_inner()).insert(key(mirror), remembered);
    let (applied, deleted) = applier.into_writes();

    // nodeConfig dropped from the spec: the node agents remove their files first.
    let mut removal_pending = None;
    // A view that lagged behind an earlier write was trusted: look again once it must have
    // caught up, so a child removed meanwhile is not missed until the long requeue.
    let mut requeue = if trusted_lag { STORE_LAG.min(ctx.options.requeue) } else { ctx.options.requeue };
    if removing_nodes {
        match node_removal(mirror, ctx, None).await? {
            Removal::Done => {
                nodes::remove_finalizer(&ctx.client, mirror).await?;
                ctx.removal_started.lock().unwrap_or_else(|e| e.into_inner()).remove(&key(mirror));
                ctx.event(
                    mirror,
                    EventType::Normal,
                    "NodeConfigRemoved",
                    "RemoveNodeConfig",
                    "node agents removed their files".into(),
                )
                .await;
            }
            Removal::Waiting(pending) => {
                removal_pending = Some(pending);
                requeue = ctx.options.removal_poll;
            }
        }
    }

    // Status, from what was applied and observed. Not from a view that has not caught up with
    // this controller's own writes: that would report children as missing that exist (the
    // reconcile that follows, within STORE_LAG, writes it).
    if !trusted_lag {
        let jobs = if mirror.spec.cleanup.is_some() { ctx.children.cleanup_jobs(mirror) } else { Vec::new() };
        let cleanup_pods = cleanup_report_pods(ctx, mirror, &jobs).await?;
        let upstream_health = ctx.upstream_health.get(&key(mirror));
        let node_zones = ctx.node_zones(mirror).await?;
        let observed = Observed {
            deployments: &observed_deployments,
            services: &services,
            daemon_set: observed_daemon_sets.get(&names::node_agent(mirror)),
            jobs: &jobs,
            cleanup_pods: &cleanup_pods,
            removing_nodes: removal_pending.as_deref(),
            upstream_health: &upstream_health,
            node_conflicts: &node_conflicts,
            node_zones: &node_zones,
            learned_auth: &inputs.learned_auth,
        };
        let now = status::now();
        let new_status = status::observed_status(mirror, observed, &now);
        // An upstream lost less than DEGRADED_AFTER ago: look again when it will have been.
        if let Some(due) = new_status
            .upstreams
            .iter()
            .filter_map(|u| upstreams::unreachable_for(u, &now))
            .filter(|d| *d < upstreams::DEGRADED_AFTER)
            .map(|d| upstreams::DEGRADED_AFTER - d + Duration::from_secs(1))
            .min()
        {
            requeue = requeue.min(due);
        }
        write_status(mirror, ctx, new_status).await?;
    }

    // Events last: they tell, they do not gate.
    if !applied.is_empty() {
        info!(count = applied.len(), objects = ?applied, "applied");
        let note = format!("applied {}: {}", applied.len(), applied.join(", "));
        ctx.event(mirror, EventType::Normal, "Applied", "Apply", note).await;
    }
    if !deleted.is_empty() {
        info!(objects = ?deleted, "deleted children the spec no longer asks for");
        let note = format!("deleted {}: {}", deleted.len(), deleted.join(", "));
        ctx.event(mirror, EventType::Normal, "Deleted", "Delete", note).await;
    }
    Ok(Action::requeue(requeue))
}

/// Applies ServiceAccounts and Roles, then, once the API server has answered for them, the
/// RoleBindings that reference them. Without the `bind` verb (the chart does not grant it), the
/// API server writes a RoleBinding only after resolving its Role to check that the controller
/// holds every permission in it; a Role still in flight in the same wave cannot be resolved, and
/// the binding fails with NotFound on every reconcile.
async fn apply_rbac(
    applier: &Applier<'_>,
    service_accounts: &[ServiceAccount],
    roles: &[Role],
    role_bindings: &[RoleBinding],
) -> Result<()> {
    futures::try_join!(applier.apply(service_accounts), applier.apply(roles))?;
    applier.apply(role_bindings).await?;
    Ok(())
}

/// A Node's `topology.kubernetes.io/zone`, `""` without it.
fn zone_label(meta: &ObjectMeta) -> String {
    meta.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).cloned().unwrap_or_default()
}

/// Writes Ready=False with the problem (and an Event when it is news) and hands the error back.
async fn report_problem(mirror: &RegistryMirror, ctx: &Context, error: Error) -> Error {
    let new_status = status::problem_status(mirror, error.ready_reason(), &error.ready_message(), &status::now());
    if let Err(e) = write_status(mirror, ctx, new_status).await {
        warn!(error = %e, "could not write the status of a mirror that cannot converge");
    }
    error
}

/// Writes the status when it differs from the mirror's, and an Event per condition transition.
async fn write_status(mirror: &RegistryMirror, ctx: &Context, new: RegistryMirrorStatus) -> Result<()> {
    let old = mirror.status.clone().unwrap_or_default();
    if mirror.status.as_ref() == Some(&new) {
        return Ok(());
    }
    let ns = mirror.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<RegistryMirror> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": RegistryMirror::api_version(&()),
        "kind": RegistryMirror::kind(&()),
        "status": new,
    });
    api.patch_status(&mirror.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await
        .map_err(|e| Error::api("apply", "RegistryMirror/status", mirror.name_any(), e))?;
    for (condition, bad) in status::transitions(&old.conditions, &new.conditions) {
        let type_ = if bad { EventType::Warning } else { EventType::Normal };
        let note = format!("{} is {}: {}", condition.type_, condition.status, condition.message);
        ctx.event(mirror, type_, &condition.reason, "UpdateStatus", note).await;
    }
    let cache_events = super::caches::events(&old.upstreams, &new.upstreams);
    for (bad, reason, note) in
        upstreams::upstream_events(&old.upstreams, &new.upstreams, &status::now()).into_iter().chain(cache_events)
    {
        let type_ = if bad { EventType::Warning } else { EventType::Normal };
        ctx.event(mirror, type_, &reason, "ObserveUpstream", note).await;
    }
    Ok(())
}

/// The pods of the newest finished cleanup Job: their termination message is the run's report.
/// Nothing is listed while no Job has finished, and each finished Job's pods are listed once.
async fn cleanup_report_pods(ctx: &Context, mirror: &RegistryMirror, jobs: &[Job]) -> Result<Vec<Pod>> {
    let Some((job, _)) = status::newest_finished_job(jobs) else { return Ok(Vec::new()) };
    let job_uid = job.uid().unwrap_or_default();
    let cached = ctx.cleanup_reports.lock().unwrap_or_else(|e| e.into_inner()).get(&key(mirror)).cloned();
    if let Some((uid, pods)) = cached {
        if uid == job_uid {
            return Ok(pods);
        }
    }
    let ns = mirror.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let selector = format!("job-name={}", job.name_any());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| Error::api("list", "Pod", selector, e))?
        .items;
    ctx.cleanup_reports.lock().unwrap_or_else(|e| e.into_inner()).insert(key(mirror), (job_uid, pods.clone()));
    Ok(pods)
}

/// Node-config removal with the timeout applied: past it, the removal counts as done and a
/// Warning Event names the nodes that never reported. `since` is when removal began (the
/// deletion timestamp), else the first time this controller saw it pending.
async fn node_removal(mirror: &RegistryMirror, ctx: &Context, since: Option<Timestamp>) -> Result<Removal> {
    let removal = nodes::remove_node_config(&ctx.client, mirror).await?;
    let Removal::Waiting(pending) = &removal else { return Ok(removal) };
    let elapsed = match since {
        Some(t) => Duration::try_from(Timestamp::now().duration_since(t)).unwrap_or_default(),
        None => ctx
            .removal_started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key(mirror))
            .or_insert_with(Instant::now)
            .elapsed(),
    };
    if elapsed < ctx.options.node_removal_timeout {
        info!(nodes = ?pending, "waiting for node agents to remove their files");
        return Ok(removal);
    }
    ctx.event(
        mirror,
        EventType::Warning,
        "NodeConfigRemovalTimedOut",
        "RemoveNodeConfig",
        format!(
            "released after {}s without confirmation from the node agents on: {}; their mirror files may remain",
            elapsed.as_secs(),
            pending.join(", ")
        ),
    )
    .await;
    Ok(Removal::Done)
}

/// A mirror being deleted: remove node config everywhere, then release the finalizer. Owner
/// references and the garbage collector remove every child after that.
async fn finalize(mirror: &RegistryMirror, ctx: &Context) -> Result<Action> {
    if !nodes::has_finalizer(mirror) {
        return Ok(Action::await_change());
    }
    let since = mirror.metadata.deletion_timestamp.as_ref().map(|t| t.0);
    match node_removal(mirror, ctx, since).await? {
        Removal::Done => {
            nodes::remove_finalizer(&ctx.client, mirror).await?;
            ctx.forget_mirror(&mirror.namespace().unwrap_or_default(), &mirror.name_any());
            info!("node config removed; finalizer released");
            Ok(Action::await_change())
        }
        Removal::Waiting(pending) => {
            let mut status = mirror.status.clone().unwrap_or_default();
            let message = format!("waiting for the node agents on {} to remove their files", pending.join(", "));
            let new = status::problem_status(mirror, "RemovingNodeConfig", &message, &status::now());
            status.conditions = new.conditions;
            write_status(mirror, ctx, status).await?;
            Ok(Action::requeue(ctx.options.removal_poll))
        }
    }
}
