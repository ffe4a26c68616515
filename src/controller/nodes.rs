//! The one thing that lives outside the API server: files the node agents wrote on the nodes.
//! A mirror with `spec.nodeConfig` carries the finalizer [`FINALIZER`]. When the mirror is
//! deleted, or nodeConfig is dropped from its spec, the controller rewrites the node-config
//! ConfigMap with `removing: true` and no registries, waits until every agent Pod running on a
//! Node that still exists reports that config as applied ([`APPLIED_CONFIG_ANNOTATION`]), and
//! only then releases the finalizer. Pods on vanished nodes do not block; after a timeout the
//! finalizer is released anyway, with a Warning Event naming the nodes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::apply::{apply_params, component_selector, controlled_by};
use super::error::{Error, Result};
use crate::api::RegistryMirror;
use crate::build::meta::{names, object_meta, Component};
use crate::build::node::{self, APPLIED_CONFIG_ANNOTATION, NODE_CONFIG_KEY};

pub const FINALIZER: &str = "mirrorfleet.io/node-config";

pub fn has_finalizer(mirror: &RegistryMirror) -> bool {
    mirror.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds the finalizer. The resourceVersion in the merge patch makes it fail (409, retried)
/// rather than overwrite a finalizer list someone changed meanwhile.
pub async fn add_finalizer(client: &Client, mirror: &RegistryMirror) -> Result<()> {
    let mut finalizers = mirror.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    patch_finalizers(client, mirror, finalizers, "add finalizer").await
}

pub async fn remove_finalizer(client: &Client, mirror: &RegistryMirror) -> Result<()> {
    let finalizers: Vec<String> = mirror.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    patch_finalizers(client, mirror, finalizers, "remove finalizer").await
}

async fn patch_finalizers(
    client: &Client,
    mirror: &RegistryMirror,
    finalizers: Vec<String>,
    verb: &'static str,
) -> Result<()> {
    let ns = mirror.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let name = mirror.name_any();
    let api: Api<RegistryMirror> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": mirror.resource_version()}});
    match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        // Already gone: nothing left to hold.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::api(verb, "RegistryMirror", name, e)),
    }
}

/// Where the removal of node config stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Every live agent reported the removal (or there is nothing to remove).
    Done,
    /// Nodes whose agent has not yet reported the removal.
    Waiting(Vec<String>),
}

/// Writes the removal config (once) and checks which agents have applied it.
pub async fn remove_node_config(client: &Client, mirror: &RegistryMirror) -> Result<Removal> {
    let ns = mirror.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let uid = mirror.uid().ok_or(Error::MissingMetadata("uid"))?;
    let cm_name = names::node_config(mirror);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let Some(cm) = cms.get_opt(&cm_name).await.map_err(|e| Error::api("get", "ConfigMap", cm_name.clone(), e))? else {
        // Agents never had a config to write.
        return Ok(Removal::Done);
    };
    if !controlled_by(&cm.metadata, &uid) {
        return Ok(Removal::Done);
    }
    let current = cm.data.as_ref().and_then(|d| d.get(NODE_CONFIG_KEY)).cloned().unwrap_or_default();
    // Edited as JSON, not as NodeConfig, so every field the agent reads (runtimes included)
    // survives as the builders wrote it; only the registries go and `removing` is set.
    let mut config: serde_json::Value = serde_json::from_str(&current).unwrap_or_else(|_| json!({}));
    if !config.is_object() {
        config = json!({});
    }
    let done = config.get("removing") == Some(&json!(true))
        && config.get("registries").and_then(|r| r.as_array()).is_some_and(|r| r.is_empty());
    let json = if done {
        current
    } else {
        config["removing"] = json!(true);
        config["registries"] = json!([]);
        if config.get("mirror").is_none() {
            config["mirror"] = json!(format!("{ns}/{}", mirror.name_any()));
        }
        let data = serde_json::to_string_pretty(&config).map_err(|source| Error::Serialize {
            kind: "ConfigMap".into(),
            name: cm_name.clone(),
            source,
        })? + "\n";
        let desired = ConfigMap {
            metadata: object_meta(mirror, cm_name.clone(), Component::NodeAgent, None),
            data: Some(BTreeMap::from([(NODE_CONFIG_KEY.to_string(), data)])),
            ..ConfigMap::default()
        };
        let applied = cms
            .patch(&cm_name, &apply_params(), &Patch::Apply(&desired))
            .await
            .map_err(|e| Error::child_write("apply", "ConfigMap", cm_name.clone(), e))?;
        applied.data.and_then(|mut d| d.remove(NODE_CONFIG_KEY)).unwrap_or_default()
    };
    let want = node::node_config_checksum(&json);

    let selector = component_selector(mirror, Component::NodeAgent);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| Error::api("list", "Pod", selector.clone(), e))?;
    let nodes: Api<Node> = Api::all(client.clone());
    let nodes: BTreeSet<String> = nodes
        .list_metadata(&ListParams::default())
        .await
        .map_err(|e| Error::api("list", "Node", "", e))?
        .items
        .into_iter()
        .map(|n| n.name_any())
        .collect();
    Ok(match pending_nodes(&pods.items, &nodes, &want) {
        p if p.is_empty() => Removal::Done,
        p => Removal::Waiting(p),
    })
}

/// Nodes whose agent Pod runs, on a Node that exists, without having applied `checksum`.
pub fn pending_nodes(pods: &[Pod], nodes: &BTreeSet<String>, checksum: &str) -> Vec<String> {
    let mut out: Vec<String> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            let applied = p.annotations().get(APPLIED_CONFIG_ANNOTATION).map(String::as_str);
            (nodes.contains(&node) && applied != Some(checksum)).then_some(node)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}
