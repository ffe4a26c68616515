//! ServiceAccounts, Roles and RoleBindings of the children's pods. Only the cleanup job and the
//! node agent talk to the API server; the proxy and edge pods get an account with no token.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::ResourceExt;

use super::meta::{self, Component};
use crate::api::RegistryMirror;

pub fn service_account(mirror: &RegistryMirror, name: String, component: Component, automount: bool) -> ServiceAccount {
    ServiceAccount {
        metadata: meta::object_meta(mirror, name, component, None),
        automount_service_account_token: Some(automount),
        ..Default::default()
    }
}

/// A rule on core or named-group resources, optionally pinned to object names.
pub fn rule(group: &str, resources: &[&str], verbs: &[&str], names: Option<Vec<String>>) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        resource_names: names,
        ..Default::default()
    }
}

pub fn role(mirror: &RegistryMirror, name: String, component: Component, rules: Vec<PolicyRule>) -> Role {
    Role { metadata: meta::object_meta(mirror, name, component, None), rules: Some(rules) }
}

/// Binds the Role of the same name to the ServiceAccount of the same name.
pub fn role_binding(mirror: &RegistryMirror, name: String, component: Component) -> RoleBinding {
    RoleBinding {
        metadata: meta::object_meta(mirror, name.clone(), component, None),
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name: name.clone() },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: mirror.namespace(),
            ..Default::default()
        }]),
    }
}
