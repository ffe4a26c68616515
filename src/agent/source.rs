//! Where the desired node config comes from.
//!
//! - The API (in the cluster): watches of the node-config ConfigMap and the node-auth Secret, each
//!   narrowed to one object by a `metadata.name` field selector (which is also what lets the Role
//!   name the objects in `resourceNames`). A change reaches the agent as soon as the API server
//!   sends the watch event, not after the kubelet's ConfigMap-volume sync (up to a minute or more).
//! - A directory (`--from-dir`, tests and debugging): `node-config.json` and an optional
//!   `authorization` file, polled every 100 ms.
//!
//! Both publish a [`Desired`] on a watch channel; the agent reacts to every change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;

use crate::build::auth::NODE_AUTH_KEY;
use crate::build::node::NODE_CONFIG_KEY;

pub const AUTH_FILE: &str = "authorization";

/// The latest desired state. `config_json` is `None` while the ConfigMap (or file) is missing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub config_json: Option<String>,
    pub authorization: Option<String>,
    /// The RegistryMirror that owns the ConfigMap: what Events are about.
    pub owner: Option<OwnerReference>,
    /// False until every source has delivered its first state.
    pub synced: bool,
}

/// Polls `dir` and publishes changes until the receiver is gone.
pub async fn from_dir(dir: PathBuf, tx: watch::Sender<Desired>) {
    loop {
        publish(&tx, read_dir_state(&dir));
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `next` only when it differs, so the agent wakes only for real changes.
fn publish(tx: &watch::Sender<Desired>, next: Desired) {
    tx.send_if_modified(|d| {
        let changed = *d != next;
        if changed {
            *d = next;
        }
        changed
    });
}

fn read_dir_state(dir: &Path) -> Desired {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    Desired {
        config_json: read(NODE_CONFIG_KEY),
        authorization: read(AUTH_FILE).map(|a| a.trim().to_string()).filter(|a| !a.is_empty()),
        owner: None,
        synced: true,
    }
}

/// The state of one watched object: `None` = does not exist; `Some` = latest version.
fn track<K>(state: &mut Option<Option<K>>, pending: &mut Option<K>, event: Event<K>) -> bool {
    match event {
        Event::Init => {
            *pending = None;
            false
        }
        Event::InitApply(obj) => {
            *pending = Some(obj);
            false
        }
        Event::InitDone => {
            *state = Some(pending.take());
            true
        }
        Event::Apply(obj) => {
            *state = Some(Some(obj));
            true
        }
        Event::Delete(_) => {
            *state = Some(None);
            true
        }
    }
}

/// The agent's watches (its node-config ConfigMap, its auth Secret): one object by name, ended by
/// the server before the client's read timeout ([`crate::client`]).
pub(crate) fn named(name: &str) -> watcher::Config {
    crate::client::watch_config().fields(&format!("metadata.name={name}"))
}

/// Watches the ConfigMap (and the Secret, when given) and publishes changes.
pub async fn from_api(
    client: Client,
    namespace: String,
    config_map: String,
    auth_secret: Option<String>,
    tx: watch::Sender<Desired>,
) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);
    let mut cm_events = watcher(cms, named(&config_map)).default_backoff().boxed();
    let mut secret_events = match &auth_secret {
        Some(name) => watcher(secrets, named(name)).default_backoff().boxed(),
        None => futures::stream::pending().boxed(),
    };
    let (mut cm_state, mut cm_pending) = (None::<Option<ConfigMap>>, None);
    // Without a Secret to watch, its state is "synced, absent" from the start.
    let mut secret_state: Option<Option<Secret>> = if auth_secret.is_some() { None } else { Some(None) };
    let mut secret_pending = None;
    loop {
        let changed = tokio::select! {
            ev = cm_events.next() => match ev {
                Some(Ok(ev)) => track(&mut cm_state, &mut cm_pending, ev),
                Some(Err(e)) => { tracing::warn!(error = %e, config_map, "watching the node-config ConfigMap"); false }
                None => return,
            },
            ev = secret_events.next() => match ev {
                Some(Ok(ev)) => track(&mut secret_state, &mut secret_pending, ev),
                Some(Err(e)) => { tracing::warn!(error = %e, "watching the node-auth Secret"); false }
                None => return,
            },
        };
        if !changed {
            continue;
        }
        let cm = cm_state.as_ref().and_then(Option::as_ref);
        let next = Desired {
            config_json: cm.and_then(|c| c.data.as_ref()).and_then(|d| d.get(NODE_CONFIG_KEY)).cloned(),
            authorization: secret_state
                .as_ref()
                .and_then(Option::as_ref)
                .and_then(|s| s.data.as_ref())
                .and_then(|d| d.get(NODE_AUTH_KEY))
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
                .filter(|a| !a.is_empty()),
            owner: cm.and_then(|c| c.owner_references().iter().find(|o| o.controller == Some(true)).cloned()),
            synced: cm_state.is_some() && secret_state.is_some(),
        };
        publish(&tx, next);
        if tx.is_closed() {
            return;
        }
    }
}

/// An [`OwnerReference`] as the `involvedObject` of an Event.
pub fn object_reference(owner: &OwnerReference, namespace: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(owner.api_version.clone()),
        kind: Some(owner.kind.clone()),
        name: Some(owner.name.clone()),
        namespace: Some(namespace.to_string()),
        uid: Some(owner.uid.clone()),
        ..Default::default()
    }
}

/// The agent's own Pod as an Event's `involvedObject`, when no owner is known.
pub fn pod_reference(namespace: &str, pod: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(k8s_openapi::api::core::v1::Pod::api_version(&()).into()),
        kind: Some("Pod".into()),
        name: Some(pod.to_string()),
        namespace: Some(namespace.to_string()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_without_objects_means_absent_and_delete_clears() {
        let mut state: Option<Option<u32>> = None;
        let mut pending = None;
        assert!(!track(&mut state, &mut pending, Event::Init));
        assert!(track(&mut state, &mut pending, Event::InitDone));
        assert_eq!(state, Some(None));
        assert!(track(&mut state, &mut pending, Event::Apply(3)));
        assert_eq!(state, Some(Some(3)));
        // A relist after a dropped watch replaces the state only at InitDone.
        assert!(!track(&mut state, &mut pending, Event::Init));
        assert!(!track(&mut state, &mut pending, Event::InitApply(4)));
        assert_eq!(state, Some(Some(3)));
        assert!(track(&mut state, &mut pending, Event::InitDone));
        assert_eq!(state, Some(Some(4)));
        assert!(track(&mut state, &mut pending, Event::Delete(4)));
        assert_eq!(state, Some(None));
    }

    #[test]
    fn dir_state_trims_the_header_and_ignores_empty() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_dir_state(d.path()).config_json, None);
        std::fs::write(d.path().join(NODE_CONFIG_KEY), "{}").unwrap();
        std::fs::write(d.path().join(AUTH_FILE), "  \n").unwrap();
        let s = read_dir_state(d.path());
        assert_eq!((s.config_json.as_deref(), s.authorization), (Some("{}"), None));
        std::fs::write(d.path().join(AUTH_FILE), "Basic abc\n").unwrap();
        assert_eq!(read_dir_state(d.path()).authorization.as_deref(), Some("Basic abc"));
    }
}
