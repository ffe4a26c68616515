//! The controller's view of every child it manages: one reflector store per owned kind, fed by
//! the same watches that trigger reconciles. A reconcile reads its mirror's children from these
//! stores instead of listing them, so a steady-state reconcile costs the API server nothing and
//! a busy fleet (Deployment status churn while Pods start) costs no LISTs.
//!
//! What is kept is small: metadata only for most kinds; Services whole (their cluster IP);
//! Deployments, DaemonSets and cleanup Jobs without their Pod template (the status and replica
//! counts are what the controller reads). `managedFields`, the largest part of most objects, is
//! folded into the drift fingerprint ([`super::apply::fingerprint`]) as the object enters the
//! store and then dropped; the fingerprint rides along in an in-memory annotation
//! ([`FINGERPRINT_ANNOTATION`]) that is never sent to the API server: stored objects are only
//! read, desired objects always come from the builders.
//!
//! A store can lag behind what a reconcile just wrote: [`super::apply`] keeps the version it saw
//! before each write, so an old version still in the store is recognised as old, not as drift.
//!
//! What a watch triggers ([`triggers`]): every object an event touched, like kube-runtime's
//! `touched_objects`, except after a relist (a new watch's first list, or the list after the API
//! server answered "too old resource version", as after its restart). kube-runtime yields a
//! relist's objects one by one while the store still shows the state from before it (the store
//! takes the relist whole at its end), and never yields the objects the relist no longer has. A
//! child deleted or edited while the watch was down then triggered its mirror's reconcile only
//! against the stale store, which still showed it as applied, and nothing triggered one after the
//! store caught up: the mirror waited for the periodic requeue (5 minutes) to repair it. Here a
//! relist triggers once the store holds it, and the objects that vanished in it trigger too.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Pod, PodSpec, PodStatus, Secret, Service, ServiceAccount, ServiceSpec,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Resource as _;
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::apply::{fingerprint, Child, LiveChildren};
use super::error::{Error, Result};
use crate::api::RegistryMirror;
use crate::build::meta::{Component, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, MANAGED_BY};

/// In-memory only: the drift fingerprint of a stored object whose `managedFields` were dropped.
pub const FINGERPRINT_ANNOTATION: &str = "mirrorfleet.io/observed-fingerprint";

/// The fingerprint of a live object: computed from its `managedFields`, or carried by a stored
/// (compacted) object.
pub fn live_fingerprint(meta: &ObjectMeta) -> u64 {
    if meta.managed_fields.is_none() {
        if let Some(fp) = meta.annotations.as_ref().and_then(|a| a.get(FINGERPRINT_ANNOTATION)) {
            if let Ok(fp) = fp.parse() {
                return fp;
            }
        }
    }
    fingerprint(meta)
}

/// Keeps of an object's metadata what the controller reads: identity (name, namespace, uid,
/// resourceVersion, generation), the labels that tie it to a mirror, the controller owner
/// reference, and the drift fingerprint, into which `managedFields` is folded (see the module
/// doc). Everything else (other labels and annotations, timestamps, the other owner references)
/// goes: with thousands of children, it is most of the memory.
pub fn compact_meta(meta: &mut ObjectMeta) {
    let fp = meta.managed_fields.is_some().then(|| fingerprint(meta)).or_else(|| {
        meta.annotations.as_ref().and_then(|a| a.get(FINGERPRINT_ANNOTATION)).and_then(|f| f.parse::<u64>().ok())
    });
    meta.managed_fields = None;
    meta.annotations = fp.map(|fp| [(FINGERPRINT_ANNOTATION.to_string(), fp.to_string())].into());
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == LABEL_NAME || k == LABEL_INSTANCE || k == LABEL_COMPONENT);
    }
    if let Some(refs) = meta.owner_references.as_mut() {
        refs.retain(|r| r.controller == Some(true));
    }
    meta.creation_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.generate_name = None;
    meta.finalizers = None;
}

/// What the controller keeps of an object it watches whole.
pub trait Compact {
    fn compact(&mut self);
}

impl<K> Compact for PartialObjectMeta<K> {
    fn compact(&mut self) {
        compact_meta(&mut self.metadata);
    }
}
/// Services: the cluster IP (the nodes' endpoint).
impl Compact for Service {
    fn compact(&mut self) {
        compact_meta(&mut self.metadata);
        let cluster_ip = self.spec.take().and_then(|s| s.cluster_ip);
        self.spec = Some(ServiceSpec { cluster_ip, ..Default::default() });
        self.status = None;
    }
}
/// Deployments: desired and ready replicas.
impl Compact for Deployment {
    fn compact(&mut self) {
        compact_meta(&mut self.metadata);
        let replicas = self.spec.take().and_then(|s| s.replicas);
        self.spec = Some(DeploymentSpec { replicas, ..Default::default() });
        let ready_replicas = self.status.take().and_then(|s| s.ready_replicas);
        self.status = Some(DeploymentStatus { ready_replicas, ..Default::default() });
    }
}
/// DaemonSets: the status counts (conditions aside).
impl Compact for DaemonSet {
    fn compact(&mut self) {
        compact_meta(&mut self.metadata);
        self.spec = None;
        if let Some(status) = self.status.as_mut() {
            status.conditions = None;
        }
    }
}
impl Compact for Job {
    fn compact(&mut self) {
        compact_meta(&mut self.metadata);
        if let Some(spec) = self.spec.as_mut() {
            spec.template = Default::default();
        }
    }
}

/// Readers of every child store.
#[derive(Clone)]
pub struct ChildStores {
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pub roles: Store<PartialObjectMeta<Role>>,
    pub role_bindings: Store<PartialObjectMeta<RoleBinding>>,
    pub secrets: Store<PartialObjectMeta<Secret>>,
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub persistent_volume_claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    pub network_policies: Store<PartialObjectMeta<NetworkPolicy>>,
    pub cron_jobs: Store<PartialObjectMeta<CronJob>>,
    pub services: Store<Service>,
    pub deployments: Store<Deployment>,
    pub daemon_sets: Store<DaemonSet>,
    /// Jobs of the cleanup CronJobs.
    pub jobs: Store<Job>,
    /// Set once every store had its first list.
    ready: Arc<AtomicBool>,
}

/// The writing halves: moved into the watches by [`super::run_controller`].
pub struct ChildWriters {
    pub service_accounts: Writer<PartialObjectMeta<ServiceAccount>>,
    pub roles: Writer<PartialObjectMeta<Role>>,
    pub role_bindings: Writer<PartialObjectMeta<RoleBinding>>,
    pub secrets: Writer<PartialObjectMeta<Secret>>,
    pub config_maps: Writer<PartialObjectMeta<ConfigMap>>,
    pub persistent_volume_claims: Writer<PartialObjectMeta<PersistentVolumeClaim>>,
    pub network_policies: Writer<PartialObjectMeta<NetworkPolicy>>,
    pub cron_jobs: Writer<PartialObjectMeta<CronJob>>,
    pub services: Writer<Service>,
    pub deployments: Writer<Deployment>,
    pub daemon_sets: Writer<DaemonSet>,
    pub jobs: Writer<Job>,
}

/// Empty stores and their writers.
pub fn stores() -> (ChildStores, ChildWriters) {
    let (service_accounts, w_sa) = reflector::store();
    let (roles, w_roles) = reflector::store();
    let (role_bindings, w_rbs) = reflector::store();
    let (secrets, w_secrets) = reflector::store();
    let (config_maps, w_cms) = reflector::store();
    let (persistent_volume_claims, w_pvcs) = reflector::store();
    let (network_policies, w_nps) = reflector::store();
    let (cron_jobs, w_cjs) = reflector::store();
    let (services, w_services) = reflector::store();
    let (deployments, w_deployments) = reflector::store();
    let (daemon_sets, w_daemon_sets) = reflector::store();
    let (jobs, w_jobs) = reflector::store();
    (
        ChildStores {
            service_accounts,
            roles,
            role_bindings,
            secrets,
            config_maps,
            persistent_volume_claims,
            network_policies,
            cron_jobs,
            services,
            deployments,
            daemon_sets,
            jobs,
            ready: Arc::default(),
        },
        ChildWriters {
            service_accounts: w_sa,
            roles: w_roles,
            role_bindings: w_rbs,
            secrets: w_secrets,
            config_maps: w_cms,
            persistent_volume_claims: w_pvcs,
            network_policies: w_nps,
            cron_jobs: w_cjs,
            services: w_services,
            deployments: w_deployments,
            daemon_sets: w_daemon_sets,
            jobs: w_jobs,
        },
    )
}

/// The label selector of every object the controller manages.
pub fn owned_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY}")
}

/// The label selector of every mirror's node-agent Pods.
pub fn agent_pods_selector() -> String {
    format!("{LABEL_NAME}={},{LABEL_COMPONENT}={}", crate::build::meta::APP_NAME, Component::NodeAgent.as_str())
}

/// Node-agent Pods as the controller keeps them: which mirror (labels), which node, and whether
/// Ready (the agent's verdict on its node).
pub fn compact_agent_pod(pod: &mut Pod) {
    compact_meta(&mut pod.metadata);
    let node_name = pod.spec.take().and_then(|s| s.node_name);
    pod.spec = Some(PodSpec { node_name, ..Default::default() });
    let conditions = pod.status.take().and_then(|s| s.conditions);
    let ready = conditions.into_iter().flatten().filter(|c| c.type_ == "Ready").collect::<Vec<_>>();
    pod.status = Some(PodStatus { conditions: Some(ready), ..Default::default() });
}

/// The label selector of the cleanup CronJobs' Jobs (they carry the Job template's labels).
pub fn cleanup_jobs_selector() -> String {
    format!("{LABEL_NAME}={},{LABEL_COMPONENT}={}", crate::build::meta::APP_NAME, Component::Cleanup.as_str())
}

fn belongs_to(meta: &ObjectMeta, namespace: &str, mirror: &str) -> bool {
    meta.namespace.as_deref() == Some(namespace)
        && meta.labels.as_ref().and_then(|l| l.get(LABEL_INSTANCE)).map(String::as_str) == Some(mirror)
        && meta.labels.as_ref().and_then(|l| l.get(LABEL_NAME)).map(String::as_str)
            == Some(crate::build::meta::APP_NAME)
}

fn of_mirror<K: Resource + Clone>(store: &Store<K>, namespace: &str, mirror: &str) -> BTreeMap<String, K>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store
        .state_filter(|o| belongs_to(o.meta(), namespace, mirror))
        .into_iter()
        .map(|o| (o.name_any(), (*o).clone()))
        .collect()
}

fn metas_of<K: Resource + Clone>(store: &Store<K>, namespace: &str, mirror: &str) -> BTreeMap<String, ObjectMeta>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    of_mirror(store, namespace, mirror).into_iter().map(|(n, o)| (n, o.meta().clone())).collect()
}

impl ChildStores {
    /// Resolves once every store has its first full list.
    pub async fn wait_until_ready(&self) {
        if self.ready.load(Ordering::Acquire) {
            return;
        }
        // A store's readiness signal wakes only the last task that waited on it, and reconciles
        // wait concurrently: each waiter looks again by itself every 100 ms.
        while tokio::time::timeout(Duration::from_millis(100), self.all_ready()).await.is_err() {}
        self.ready.store(true, Ordering::Release);
    }

    async fn all_ready(&self) {
        // An error means the writer is gone (shutting down); the reconcile then reads what is
        // there, as it would anyway.
        let _ = futures::join!(
            self.service_accounts.wait_until_ready(),
            self.roles.wait_until_ready(),
            self.role_bindings.wait_until_ready(),
            self.secrets.wait_until_ready(),
            self.config_maps.wait_until_ready(),
            self.persistent_volume_claims.wait_until_ready(),
            self.network_policies.wait_until_ready(),
            self.cron_jobs.wait_until_ready(),
            self.services.wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.daemon_sets.wait_until_ready(),
            self.jobs.wait_until_ready(),
        );
    }

    /// Every child of `mirror`, as the stores have it now.
    pub fn live_children(&self, mirror: &RegistryMirror) -> LiveChildren {
        let ns = mirror.namespace().unwrap_or_default();
        let name = mirror.name_any();
        let mut live = LiveChildren {
            services: of_mirror(&self.services, &ns, &name),
            deployments: of_mirror(&self.deployments, &ns, &name),
            daemon_sets: of_mirror(&self.daemon_sets, &ns, &name),
            ..Default::default()
        };
        live.metas.insert(ServiceAccount::KIND, metas_of(&self.service_accounts, &ns, &name));
        live.metas.insert(Role::KIND, metas_of(&self.roles, &ns, &name));
        live.metas.insert(RoleBinding::KIND, metas_of(&self.role_bindings, &ns, &name));
        live.metas.insert(Secret::KIND, metas_of(&self.secrets, &ns, &name));
        live.metas.insert(ConfigMap::KIND, metas_of(&self.config_maps, &ns, &name));
        live.metas.insert(PersistentVolumeClaim::KIND, metas_of(&self.persistent_volume_claims, &ns, &name));
        live.metas.insert(NetworkPolicy::KIND, metas_of(&self.network_policies, &ns, &name));
        live.metas.insert(CronJob::KIND, metas_of(&self.cron_jobs, &ns, &name));
        let services_meta = live.services.iter().map(|(n, s)| (n.clone(), s.metadata.clone())).collect();
        live.metas.insert(Service::KIND, services_meta);
        let deployments_meta = live.deployments.iter().map(|(n, d)| (n.clone(), d.metadata.clone())).collect();
        live.metas.insert(Deployment::KIND, deployments_meta);
        let ds_meta = live.daemon_sets.iter().map(|(n, d)| (n.clone(), d.metadata.clone())).collect();
        live.metas.insert(DaemonSet::KIND, ds_meta);
        live
    }

    /// The cleanup Jobs of `mirror`.
    pub fn cleanup_jobs(&self, mirror: &RegistryMirror) -> Vec<Job> {
        let ns = mirror.namespace().unwrap_or_default();
        of_mirror(&self.jobs, &ns, &mirror.name_any()).into_values().collect()
    }
}

/// An Api in namespace `ns`, or across all namespaces.
pub fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Retry delays of a failed watch: 250 ms doubling to 5 s, ±20 % jitter, back to the start after
/// a minute without failure. kube-runtime's default goes to 30 s, which after an API server
/// restart left watches idle for half a minute after the server was back.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    pub const MIN: Duration = Duration::from_millis(250);
    pub const MAX: Duration = Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (current * 2).min(Self::MAX);
        Some(current.mul_f64(0.8 + 0.4 * fastrand::f64()))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// The backoff of every watch the controller runs.
pub fn watch_backoff() -> ResetTimerBackoff<WatchBackoff> {
    ResetTimerBackoff::new(WatchBackoff::default(), Duration::from_secs(60))
}

/// What the events of a watch feeding `store` trigger (see the module doc): every object an
/// Apply or Delete event carries, at once; after a relist, once the store holds it, every object
/// it listed and every object the store held before that it no longer lists.
pub fn triggers<K, S>(events: S, store: Store<K>) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Default + Send + Sync,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    use futures::StreamExt as _;
    // The store's contents when the relist began (it keeps them until the relist is done).
    let mut before: Option<Vec<Arc<K>>> = None;
    events
        .map(move |event| {
            let out: Vec<Result<K, watcher::Error>> = match event {
                Err(e) => vec![Err(e)],
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => vec![Ok(o)],
                Ok(watcher::Event::Init) => {
                    before = Some(store.state());
                    Vec::new()
                }
                Ok(watcher::Event::InitApply(_)) => Vec::new(),
                Ok(watcher::Event::InitDone) => {
                    let now = store.state();
                    let listed: HashSet<ObjectRef<K>> = now.iter().map(|o| ObjectRef::from_obj(&**o)).collect();
                    let mut vanished: Vec<Arc<K>> = before.take().unwrap_or_default();
                    vanished.retain(|o| !listed.contains(&ObjectRef::from_obj(&**o)));
                    // In name order, listed first: the same relist triggers in the same order.
                    let by_name =
                        |a: &Arc<K>, b: &Arc<K>| (a.namespace(), a.name_any()).cmp(&(b.namespace(), b.name_any()));
                    let (mut now, mut vanished) = (now, vanished);
                    now.sort_by(by_name);
                    vanished.sort_by(by_name);
                    now.into_iter().chain(vanished).map(|o| Ok((*o).clone())).collect()
                }
            };
            futures::stream::iter(out)
        })
        .flatten()
}

/// A metadata watch of one owned kind, feeding `writer`; yields what it triggers ([`triggers`];
/// the controller maps the objects to their owner).
pub fn watch_meta<K>(
    client: &Client,
    ns: Option<&str>,
    cfg: watcher::Config,
    writer: Writer<PartialObjectMeta<K>>,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Child,
{
    let store = writer.as_reader();
    let events = watcher(api::<PartialObjectMeta<K>>(client, ns), cfg)
        .backoff(watch_backoff())
        .modify(Compact::compact)
        .reflect(writer);
    triggers(events, store)
}

/// A watch of one owned kind kept whole (compacted), feeding `writer`; yields what it triggers.
pub fn watch_full<K>(
    client: &Client,
    ns: Option<&str>,
    cfg: watcher::Config,
    writer: Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Child + Compact,
{
    let store = writer.as_reader();
    let events = watcher(api::<K>(client, ns), cfg).backoff(watch_backoff()).modify(Compact::compact).reflect(writer);
    triggers(events, store)
}

async fn relist_meta<K: Child>(client: &Client, ns: &str) -> Result<Vec<PartialObjectMeta<K>>> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&owned_selector());
    let list = api.list_metadata(&lp).await.map_err(|e| Error::api("list", K::kind(&()), ns, e))?;
    Ok(list.items)
}

async fn relist_full<K: Child + DeserializeOwned>(client: &Client, ns: &str, selector: &str) -> Result<Vec<K>> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let list =
        api.list(&ListParams::default().labels(selector)).await.map_err(|e| Error::api("list", K::kind(&()), ns, e))?;
    Ok(list.items)
}

fn replace<K>(writer: &mut Writer<K>, objects: Vec<K>)
where
    K: Resource + Clone + Compact,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for mut o in objects {
        o.compact();
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

impl ChildWriters {
    /// Lists every child kind in `namespace` and replaces the stores' contents with it, as a
    /// watch's initial list does. For request-level tests, which have no watches.
    pub async fn relist(&mut self, client: &Client, namespace: &str) -> Result<()> {
        let owned = owned_selector();
        let cleanup = cleanup_jobs_selector();
        let (sa, roles, rbs, secrets, cms, pvcs, nps, cjs, services, deployments, daemon_sets, jobs) = futures::try_join!(
            relist_meta::<ServiceAccount>(client, namespace),
            relist_meta::<Role>(client, namespace),
            relist_meta::<RoleBinding>(client, namespace),
            relist_meta::<Secret>(client, namespace),
            relist_meta::<ConfigMap>(client, namespace),
            relist_meta::<PersistentVolumeClaim>(client, namespace),
            relist_meta::<NetworkPolicy>(client, namespace),
            relist_meta::<CronJob>(client, namespace),
            relist_full::<Service>(client, namespace, &owned),
            relist_full::<Deployment>(client, namespace, &owned),
            relist_full::<DaemonSet>(client, namespace, &owned),
            relist_full::<Job>(client, namespace, &cleanup),
        )?;
        replace(&mut self.service_accounts, sa);
        replace(&mut self.roles, roles);
        replace(&mut self.role_bindings, rbs);
        replace(&mut self.secrets, secrets);
        replace(&mut self.config_maps, cms);
        replace(&mut self.persistent_volume_claims, pvcs);
        replace(&mut self.network_policies, nps);
        replace(&mut self.cron_jobs, cjs);
        replace(&mut self.services, services);
        replace(&mut self.deployments, deployments);
        replace(&mut self.daemon_sets, daemon_sets);
        replace(&mut self.jobs, jobs);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn cm(name: &str, version: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some("ns".into());
        c.metadata.resource_version = Some(version.into());
        c
    }

    fn names(store: &Store<ConfigMap>) -> Vec<String> {
        let mut n: Vec<String> = store.state().iter().map(|c| c.name_any()).collect();
        n.sort();
        n
    }

    /// Every object a relist triggers is yielded once the store holds the relist, never before;
    /// the objects that vanished in it are yielded too; Apply, Delete and errors pass at once.
    #[tokio::test]
    async fn a_relist_triggers_once_the_store_holds_it_and_for_what_vanished() {
        let (store, writer) = reflector::store::<ConfigMap>();
        let events: Vec<Result<watcher::Event<ConfigMap>, watcher::Error>> = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(cm("a", "1"))),
            Ok(watcher::Event::InitApply(cm("b", "1"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(cm("c", "2"))),
            Err(watcher::Error::NoResourceVersion),
            // The watch is down; b is deleted and a edited meanwhile; the relist:
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(cm("a", "5"))),
            Ok(watcher::Event::InitApply(cm("c", "2"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Delete(cm("c", "6"))),
        ];
        let mut out = Box::pin(triggers(futures::stream::iter(events).reflect(writer), store.clone()));
        let mut seen = Vec::new();
        while let Some(item) = out.next().await {
            match item {
                Ok(c) => {
                    // What the reconcile it triggers reads: the store as of this object's event.
                    seen.push(format!("{}@{} store={:?}", c.name_any(), c.resource_version().unwrap(), names(&store)))
                }
                Err(e) => seen.push(format!("error: {e}")),
            }
        }
        assert_eq!(
            seen,
            [
                r#"a@1 store=["a", "b"]"#,
                r#"b@1 store=["a", "b"]"#,
                r#"c@2 store=["a", "b", "c"]"#,
                "error: no metadata.resourceVersion in watch result (does resource support watch?)",
                r#"a@5 store=["a", "c"]"#,
                r#"c@2 store=["a", "c"]"#,
                // Deleted while the watch was down: yielded as the store held it last.
                r#"b@1 store=["a", "c"]"#,
                r#"c@6 store=["a"]"#,
            ]
            .map(|s| s.to_string())
            .to_vec(),
        );
    }
}
