//! Mirrors related by the node-config conflict rule ([`crate::api::conflicts`]): a mirror
//! created, edited or deleted may start or end a conflict with others, so those others are
//! reconciled too. [`RelatedMirrors`] watches the mirror events and names them.

use std::collections::HashMap;

use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use tokio::sync::mpsc::UnboundedSender;

use super::status;
use crate::api::conflicts::{reference, shared_registries};
use crate::api::RegistryMirror;

/// The mirrors whose node-config conflicts may change with `mirror` (created, edited, deleted):
/// those serving one of its registries on nodes, and those whose status names a conflict now
/// (the registries `mirror` had before an edit are not known here; the conflict it was in is).
/// Without a mirror (one vanished while the watch was down): those in a conflict.
pub fn conflict_related(
    store: &Store<RegistryMirror>,
    mirror: Option<&RegistryMirror>,
) -> Vec<ObjectRef<RegistryMirror>> {
    let me = mirror.map(reference);
    let in_conflict = |m: &RegistryMirror| {
        m.status.iter().flat_map(|s| &s.conditions).any(|c| {
            // The condition on the mirror that keeps the registry; the Ready reason on the refused
            // one is the error's (the same word).
            c.type_ == status::NODE_CONFIG_CONFLICT
                || (c.type_ == status::READY && c.reason == status::NODE_CONFIG_CONFLICT)
        })
    };
    let shares = |other: &RegistryMirror| {
        mirror.is_some_and(|m| other.spec.node_config.is_some() && !shared_registries(m, other).is_empty())
    };
    store
        .state()
        .into_iter()
        .filter(|other| Some(reference(other)) != me)
        .filter(|other| shares(other) || in_conflict(other))
        .map(|other| ObjectRef::from_obj(&*other))
        .collect()
}

/// Follows the mirror watch and sends the mirrors related to each change.
///
/// The first list only records (every mirror is reconciled at start anyway: triggering each one's
/// relatives then would be quadratic in the fleet). Later, a change of generation or of deletion
/// triggers; a relist after a watch gap triggers for what changed and for what vanished meanwhile.
/// Status-only writes trigger nothing.
pub struct RelatedMirrors {
    store: Store<RegistryMirror>,
    send: UnboundedSender<ObjectRef<RegistryMirror>>,
    /// `(generation, deleting)` of every mirror as last seen.
    seen: HashMap<String, (Option<i64>, bool)>,
    /// The mirrors of the list in progress.
    listed: Vec<String>,
    started: bool,
}

impl RelatedMirrors {
    /// `store` must be the one the watch feeds (read after the event reached it).
    pub fn new(store: Store<RegistryMirror>, send: UnboundedSender<ObjectRef<RegistryMirror>>) -> Self {
        Self { store, send, seen: HashMap::new(), listed: Vec::new(), started: false }
    }

    pub fn observe(&mut self, event: &Result<watcher::Event<RegistryMirror>, watcher::Error>) {
        let (mirror, gone) = match event {
            Ok(watcher::Event::Init) => {
                self.listed.clear();
                return;
            }
            Ok(watcher::Event::InitDone) => {
                let vanished: Vec<String> = self.seen.keys().filter(|k| !self.listed.contains(k)).cloned().collect();
                for key in &vanished {
                    self.seen.remove(key);
                }
                if self.started && !vanished.is_empty() {
                    self.trigger(None);
                }
                self.started = true;
                return;
            }
            Ok(watcher::Event::InitApply(m)) => {
                self.listed.push(reference(m));
                (m, false)
            }
            Ok(watcher::Event::Apply(m)) => (m, false),
            Ok(watcher::Event::Delete(m)) => (m, true),
            Err(_) => return,
        };
        let key = reference(mirror);
        let now = (mirror.metadata.generation, mirror.metadata.deletion_timestamp.is_some());
        let changed = if gone { self.seen.remove(&key).is_some() } else { self.seen.insert(key, now) != Some(now) };
        if changed && self.started {
            self.trigger(Some(mirror));
        }
    }

    fn trigger(&self, mirror: Option<&RegistryMirror>) {
        for r in conflict_related(&self.store, mirror) {
            let _ = self.send.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    use super::*;

    fn mirror(name: &str, generation: i64, registry: &str) -> RegistryMirror {
        serde_yaml::from_str(&format!(
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\n\
             metadata: {{name: {name}, namespace: ns, generation: {generation}}}\n\
             spec: {{upstreams: [{{name: u, registry: {registry}, remoteURL: \"https://{registry}\"}}], nodeConfig: {{}}}}\n"
        ))
        .unwrap()
    }

    /// Feeds `events` to the store and the tracker in watch order; the names triggered per event.
    fn run(events: Vec<Event<RegistryMirror>>) -> Vec<Vec<String>> {
        let (store, mut writer) = reflector::store::<RegistryMirror>();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut related = RelatedMirrors::new(store, tx);
        events
            .into_iter()
            .map(|event| {
                writer.apply_watcher_event(&event);
                related.observe(&Ok(event));
                let mut names = Vec::new();
                while let Ok(r) = rx.try_recv() {
                    names.push(r.name);
                }
                names.sort();
                names
            })
            .collect()
    }

    #[test]
    fn the_first_list_records_and_later_changes_trigger_the_mirrors_sharing_a_registry() {
        let (a, b, c) = (mirror("a", 1, "docker.io"), mirror("b", 1, "docker.io"), mirror("c", 1, "ghcr.io"));
        let mut status_only = b.clone();
        status_only.status = Some(Default::default());
        let triggered = run(vec![
            Event::Init,
            Event::InitApply(a.clone()),
            Event::InitApply(b.clone()),
            Event::InitApply(c.clone()),
            Event::InitDone,
            Event::Apply(mirror("b", 2, "docker.io")),
            Event::Apply(mirror("b", 2, "docker.io")),
            Event::Apply(mirror("c", 2, "ghcr.io")),
            Event::Delete(mirror("b", 2, "docker.io")),
        ]);
        let none: Vec<String> = Vec::new();
        assert_eq!(
            triggered[..5],
            [none.clone(), none.clone(), none.clone(), none.clone(), none.clone()],
            "first list"
        );
        assert_eq!(triggered[5], ["a"], "b's edit: a shares docker.io, c does not");
        assert_eq!(triggered[6], none, "the same generation again (a status write)");
        assert_eq!(triggered[7], none, "c shares nothing");
        assert_eq!(triggered[8], ["a"], "b deleted");
    }

    #[test]
    fn a_relist_triggers_for_the_mirrors_that_vanished_during_the_gap() {
        let (a, b) = (mirror("a", 1, "docker.io"), mirror("b", 1, "docker.io"));
        let mut refused = b.clone();
        refused.status = Some(
            serde_json::from_value(serde_json::json!({"conditions": [{"type": "Ready",
            "status": "False", "reason": "NodeConfigConflict", "message": "m",
            "lastTransitionTime": "2026-12-03T00:00:00Z"}]}))
            .unwrap(),
        );
        let c = mirror("c", 1, "ghcr.io");
        let triggered = run(vec![
            Event::Init,
            Event::InitApply(a.clone()),
            Event::InitApply(refused.clone()),
            Event::InitApply(c.clone()),
            Event::InitDone,
            // The watch broke; a was deleted meanwhile.
            Event::Init,
            Event::InitApply(refused.clone()),
            Event::InitApply(c.clone()),
            Event::InitDone,
        ]);
        assert!(triggered[..8].iter().all(|t| t.is_empty()), "{triggered:?}");
        assert_eq!(triggered[8], ["b"], "the mirror refused because of a, which is gone");
    }
}
