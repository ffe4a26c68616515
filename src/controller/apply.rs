//! The apply step: given a mirror's live children (from the watches' stores, [`super::children`]),
//! server-side apply what the builders want (one field manager, `force`), and delete the children
//! the spec no longer asks for. Nothing is deleted that lacks this mirror's controller owner
//! reference.
//!
//! No-op detection: for every child the controller remembers (in memory) a hash of the desired
//! object it last applied and a fingerprint of the live object right after that apply: its uid and
//! its `managedFields` entries, less the status subresource's. A child is applied again only when
//! the desired hash changes or the fingerprint does (someone else wrote the object, or it is gone),
//! so a steady-state reconcile sends no write at all. Status updates by other controllers (ready
//! replicas) do not count as a change. After a restart the memory is empty and every child is
//! applied once; server-side apply of an unchanged object changes nothing on the server.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions, PropagationPolicy};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::children::live_fingerprint;
use super::error::{redact_secret_values, Error, Result};

/// The one field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "mirrorfleet";

/// Server-side apply, taking over fields someone else changed by hand.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ChildKey {
    kind: &'static str,
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    /// Hash of the desired object last applied.
    desired: u64,
    /// Fingerprint of the object the API server answered that apply with.
    live: u64,
    /// resourceVersion the controller's view had before that apply (None: it had none), so a
    /// store that has not caught up with the write yet is not mistaken for drift.
    prior_version: Option<String>,
    at: Instant,
    /// The view has shown the applied object since: from then on a difference is drift.
    seen: bool,
}

/// How long a store may lag behind a write before the difference counts as drift. A reconcile
/// that trusted a lagging store asks to run again after this long.
pub const STORE_LAG: Duration = Duration::from_secs(15);

/// What the controller last applied, per child (see the module doc).
#[derive(Default)]
pub struct ApplyCache(Mutex<HashMap<ChildKey, Record>>);

impl ApplyCache {
    fn get(&self, key: &ChildKey) -> Option<Record> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }
    fn put(&self, key: ChildKey, record: Record) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key, record);
    }
    fn mark_seen(&self, key: &ChildKey) {
        if let Some(rec) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get_mut(key) {
            rec.seen = true;
        }
    }
    fn forget(&self, key: &ChildKey) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
    /// Forgets every child of one namespace whose name starts with `prefix` (a deleted mirror).
    pub fn forget_prefix(&self, namespace: &str, prefix: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| !(k.namespace == namespace && k.name.starts_with(prefix)));
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// uid plus every managedFields entry except the status subresource's.
pub fn fingerprint(meta: &ObjectMeta) -> u64 {
    let mut h = DefaultHasher::new();
    meta.uid.hash(&mut h);
    for entry in meta.managed_fields.iter().flatten() {
        // Status writes by other controllers are not drift; `scale` (kubectl scale) is.
        if entry.subresource.as_deref() == Some("status") {
            continue;
        }
        entry.manager.hash(&mut h);
        entry.operation.hash(&mut h);
        entry.api_version.hash(&mut h);
        entry.time.as_ref().map(|t| t.0.to_string()).hash(&mut h);
        entry.fields_v1.as_ref().map(|f| f.0.to_string()).hash(&mut h);
    }
    h.finish()
}

fn desired_hash(body: &serde_json::Value) -> u64 {
    let mut h = DefaultHasher::new();
    body.to_string().hash(&mut h);
    h.finish()
}

/// A child kind the controller manages.
pub trait Child:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + k8s_openapi::Resource
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
}
impl<K> Child for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// Every child of one mirror as the controller's watches have it now ([`super::children`]), by
/// kind and name. Metadata only, except the kinds whose status or spec the controller reads back
/// (Services for their cluster IP, Deployments and DaemonSets for their ready counts).
#[derive(Clone, Debug, Default)]
pub struct LiveChildren {
    pub metas: BTreeMap<&'static str, BTreeMap<String, ObjectMeta>>,
    pub services: BTreeMap<String, Service>,
    pub deployments: BTreeMap<String, Deployment>,
    pub daemon_sets: BTreeMap<String, DaemonSet>,
}

impl LiveChildren {
    pub fn meta<K: Child>(&self, name: &str) -> Option<&ObjectMeta> {
        self.metas.get(kind_of::<K>()).and_then(|m| m.get(name))
    }

    fn of_kind<K: Child>(&self) -> impl Iterator<Item = (&String, &ObjectMeta)> {
        self.metas.get(kind_of::<K>()).into_iter().flatten()
    }
}

fn kind_of<K: Child>() -> &'static str {
    <K as k8s_openapi::Resource>::KIND
}

/// Applies and deletes the children of one mirror, remembering what it wrote.
pub struct Applier<'a> {
    client: &'a Client,
    namespace: &'a str,
    cache: &'a ApplyCache,
    live: &'a LiveChildren,
    /// `Kind/name` of every object applied (written) in this reconcile.
    applied: Mutex<Vec<String>>,
    /// `Kind/name` of every object deleted in this reconcile.
    deleted: Mutex<Vec<String>>,
    /// Desired hash of what this applier applied: `live` predates it.
    done: Mutex<HashMap<ChildKey, u64>>,
    /// Whether an object was taken as unchanged because `live` had not caught up with an
    /// earlier write yet.
    trusted_lag: AtomicBool,
}

impl<'a> Applier<'a> {
    pub fn new(client: &'a Client, namespace: &'a str, cache: &'a ApplyCache, live: &'a LiveChildren) -> Self {
        Self {
            client,
            namespace,
            cache,
            live,
            applied: Mutex::default(),
            deleted: Mutex::default(),
            done: Mutex::default(),
            trusted_lag: AtomicBool::new(false),
        }
    }

    /// Whether this reconcile took a lagging view for the truth somewhere; the reconcile then
    /// looks again after [`STORE_LAG`].
    pub fn trusted_lag(&self) -> bool {
        self.trusted_lag.load(Ordering::Relaxed)
    }

    /// Whether the object `key` (desired hash `desired`, live as `live`) needs no write.
    fn unchanged(&self, key: &ChildKey, desired: u64, live: Option<&ObjectMeta>) -> bool {
        if self.done.lock().unwrap_or_else(|e| e.into_inner()).get(key) == Some(&desired) {
            return true;
        }
        let Some(rec) = self.cache.get(key) else { return false };
        if rec.desired != desired {
            return false;
        }
        if live.is_some_and(|m| live_fingerprint(m) == rec.live) {
            if !rec.seen {
                self.cache.mark_seen(key);
            }
            return true;
        }
        // The view still shows the object as it was before the last write (or not at all, when
        // that write created it), and has not shown the write since: the watch has not
        // delivered it yet.
        let lagging = live.map(|m| m.resource_version.clone()) == Some(rec.prior_version.clone())
            || (live.is_none() && rec.prior_version.is_none());
        if lagging && !rec.seen && rec.at.elapsed() < STORE_LAG {
            self.trusted_lag.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Applies every object of one kind that changed (concurrently); returns the applied
    /// objects as the API server answered, by name. Unchanged objects are skipped.
    pub async fn apply<K: Child>(&self, objects: &[K]) -> Result<BTreeMap<String, K>> {
        let kind = K::kind(&());
        let mut pending = Vec::new();
        for obj in objects {
            let name = obj.name_any();
            let mut body = serde_json::to_value(obj).map_err(|source| Error::Serialize {
                kind: kind.to_string(),
                name: name.clone(),
                source,
            })?;
            // Apply bodies carry apiVersion and kind; k8s-openapi's Serialize writes them, but be
            // explicit so an apply can never go out without.
            body["apiVersion"] = K::api_version(&()).as_ref().into();
            body["kind"] = kind.as_ref().into();
            let key = ChildKey { kind: kind_of::<K>(), namespace: self.namespace.to_string(), name: name.clone() };
            let desired = desired_hash(&body);
            let live = self.live.meta::<K>(&name);
            if !self.unchanged(&key, desired, live) {
                let prior_version = live.and_then(|m| m.resource_version.clone());
                pending.push((key, name, body, desired, prior_version));
            }
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), self.namespace);
        let params = apply_params();
        let results = try_join_all(pending.into_iter().map(|(key, name, body, desired, prior_version)| {
            let api = api.clone();
            let params = params.clone();
            async move {
                let applied = api.patch(&name, &params, &Patch::Apply(&body)).await.map_err(|e| {
                    let e = if kind_of::<K>() == "Secret" { redact_secret_values(e, &body) } else { e };
                    Error::child_write("apply", K::kind(&()), name.clone(), e)
                })?;
                Ok::<_, Error>((key, name, desired, prior_version, applied))
            }
        }))
        .await?;
        let mut out = BTreeMap::new();
        for (key, name, desired, prior_version, applied) in results {
            self.done.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), desired);
            let record =
                Record { desired, live: fingerprint(applied.meta()), prior_version, at: Instant::now(), seen: false };
            self.cache.put(key, record);
            self.applied.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{kind}/{name}"));
            out.insert(name, applied);
        }
        Ok(out)
    }

    /// Deletes every live child of kind `K` that is not in `desired`, is controlled by the
    /// mirror with `owner_uid`, and is not `kept`.
    pub async fn delete_orphans<K: Child>(
        &self,
        desired: &[K],
        owner_uid: &str,
        kept: impl Fn(&ObjectMeta) -> bool,
    ) -> Result<()> {
        let wanted: BTreeSet<String> = desired.iter().map(ResourceExt::name_any).collect();
        let orphans: Vec<(String, Option<String>)> = self
            .live
            .of_kind::<K>()
            .filter(|(name, meta)| !wanted.contains(*name) && controlled_by(meta, owner_uid) && !kept(meta))
            .map(|(name, meta)| (name.clone(), meta.uid.clone()))
            .collect();
        let api: Api<K> = Api::namespaced(self.client.clone(), self.namespace);
        for (name, uid) in orphans {
            // The uid precondition makes sure the object deleted is the one listed, not a
            // namesake created since.
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                preconditions: Some(Preconditions { uid, resource_version: None }),
                ..DeleteParams::default()
            };
            // Gone already (or replaced): a lagging view, nothing deleted by this reconcile.
            let deleted = match api.delete(&name, &dp).await {
                Ok(_) => true,
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => false,
                Err(e) => return Err(Error::child_write("delete", K::kind(&()), name, e)),
            };
            self.cache.forget(&ChildKey {
                kind: kind_of::<K>(),
                namespace: self.namespace.to_string(),
                name: name.clone(),
            });
            if deleted {
                self.deleted.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{}/{name}", K::kind(&())));
            }
        }
        Ok(())
    }

    /// `Kind/name` of what this reconcile applied and deleted.
    pub fn into_writes(self) -> (Vec<String>, Vec<String>) {
        let take = |m: Mutex<Vec<String>>| m.into_inner().unwrap_or_else(|e| e.into_inner());
        (take(self.applied), take(self.deleted))
    }
}

/// The label selector of one component's objects of a mirror (its Pods, its Jobs).
pub fn component_selector(mirror: &crate::api::RegistryMirror, component: crate::build::meta::Component) -> String {
    crate::build::meta::selector_labels(mirror, component, None)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `meta` carries a controller owner reference to the object with `uid`.
pub fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|r| r.controller == Some(true) && r.uid == uid)
}
