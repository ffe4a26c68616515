//! Names, labels and owner references shared by every child.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::RegistryMirror;

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_UPSTREAM: &str = "mirrorfleet.io/upstream";
pub const APP_NAME: &str = "mirrorfleet";
pub const MANAGED_BY: &str = "mirrorfleet-operator";

/// Where `render` puts a uid when the input has none: the objects are for review, and an owner
/// reference to a uid that exists nowhere makes the garbage collector remove anything applied
/// by mistake, which is the safe failure.
pub const PLACEHOLDER_UID: &str = "00000000-0000-0000-0000-000000000000";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Proxy,
    Edge,
    Auth,
    Cleanup,
    NodeAgent,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Proxy => "proxy",
            Component::Edge => "edge",
            Component::Auth => "auth",
            Component::Cleanup => "cleanup",
            Component::NodeAgent => "node-agent",
        }
    }
}

/// The labels that select a component's pods (stable: Deployment selectors are immutable).
pub fn selector_labels(
    mirror: &RegistryMirror,
    component: Component,
    upstream: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), mirror.name_any()),
        (LABEL_COMPONENT.to_string(), component.as_str().to_string()),
    ]);
    if let Some(u) = upstream {
        labels.insert(LABEL_UPSTREAM.to_string(), u.to_string());
    }
    labels
}

/// Every label a child carries: the selector labels plus managed-by.
pub fn labels(mirror: &RegistryMirror, component: Component, upstream: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = selector_labels(mirror, component, upstream);
    labels.insert(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string());
    labels
}

/// The label selector that finds every child of a mirror (for orphan deletion).
pub fn children_selector(mirror: &RegistryMirror) -> String {
    format!("{LABEL_NAME}={APP_NAME},{LABEL_INSTANCE}={},{LABEL_MANAGED_BY}={MANAGED_BY}", mirror.name_any())
}

pub fn owner_reference(mirror: &RegistryMirror) -> OwnerReference {
    OwnerReference {
        api_version: RegistryMirror::api_version(&()).into_owned(),
        kind: RegistryMirror::kind(&()).into_owned(),
        name: mirror.name_any(),
        uid: mirror.metadata.uid.clone().unwrap_or_else(|| PLACEHOLDER_UID.to_string()),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Metadata of a child: name, namespace, labels and the controller owner reference.
pub fn object_meta(mirror: &RegistryMirror, name: String, component: Component, upstream: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: mirror.namespace(),
        labels: Some(labels(mirror, component, upstream)),
        owner_references: Some(vec![owner_reference(mirror)]),
        ..ObjectMeta::default()
    }
}

/// Names of the children, in one place so builders and the controller agree.
pub mod names {
    use super::*;
    pub fn proxy(mirror: &RegistryMirror, upstream: &str) -> String {
        format!("{}-proxy-{upstream}", mirror.name_any())
    }
    pub fn proxy_service_account(mirror: &RegistryMirror) -> String {
        format!("{}-proxy", mirror.name_any())
    }
    pub fn htpasswd(mirror: &RegistryMirror) -> String {
        format!("{}-htpasswd", mirror.name_any())
    }
    pub fn edge(mirror: &RegistryMirror) -> String {
        format!("{}-edge", mirror.name_any())
    }
    pub fn cleanup(mirror: &RegistryMirror) -> String {
        format!("{}-cleanup", mirror.name_any())
    }
    pub fn node_agent(mirror: &RegistryMirror) -> String {
        format!("{}-node-agent", mirror.name_any())
    }
    pub fn node_config(mirror: &RegistryMirror) -> String {
        format!("{}-node-config", mirror.name_any())
    }
    pub fn node_auth(mirror: &RegistryMirror) -> String {
        format!("{}-node-auth", mirror.name_any())
    }
}

/// Hex SHA-256, used for checksum annotations that roll pods when their config changes.
pub fn checksum(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    hex::encode(h.finalize())
}
