//! The validate step's cluster half: the Secrets a mirror names must exist and hold the keys the
//! spec needs. Reads the client users (to write htpasswd), the edge CA nodes trust with
//! `via: Edge` (`ca.crt` of the edge TLS Secret, a certificate) and every referenced Secret's
//! resourceVersion (so a rotation rolls the pods that read it). Values never leave this step
//! except as `Inputs::client_users` and `Inputs::edge_ca`; errors name Secrets and keys, never
//! values.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use super::error::{Error, Result};
use crate::api::RegistryMirror;
use crate::build::Inputs;
use crate::render::{edge_ca_input, secret_strings};

/// One Secret the spec references: where, which, and the keys it must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    pub field: String,
    pub name: String,
    pub keys: Vec<String>,
}

/// Every Secret a mirror references, in spec order.
pub fn secret_uses(mirror: &RegistryMirror) -> Vec<SecretUse> {
    let spec = &mirror.spec;
    let mut uses = Vec::new();
    if let Some(auth) = &spec.client_auth {
        uses.push(SecretUse {
            field: "spec.clientAuth.usersSecretRef".into(),
            name: auth.users_secret_ref.name.clone(),
            // The node user's key is checked with the users themselves (build::validate_inputs),
            // which names spec.clientAuth.nodeUser.
            keys: Vec::new(),
        });
    }
    for (i, u) in spec.upstreams.iter().enumerate() {
        if let Some(c) = &u.credentials_secret_ref {
            uses.push(SecretUse {
                field: format!("spec.upstreams[{i}].credentialsSecretRef"),
                name: c.name.clone(),
                keys: vec![c.username_key.clone(), c.password_key.clone()],
            });
        }
    }
    if let Some(s3) = &spec.proxy.storage.s3 {
        if let Some(c) = &s3.credentials_secret_ref {
            uses.push(SecretUse {
                field: "spec.proxy.storage.s3.credentialsSecretRef".into(),
                name: c.name.clone(),
                keys: vec!["accessKey".into(), "secretKey".into()],
            });
        }
    }
    if let Some(tls) = spec.edge.as_ref().and_then(|e| e.tls_secret_ref.as_ref()) {
        uses.push(SecretUse {
            field: "spec.edge.tlsSecretRef".into(),
            name: tls.name.clone(),
            keys: vec!["tls.crt".into(), "tls.key".into()],
        });
    }
    uses
}

/// Whether the mirror references the Secret `name` (in its own namespace).
pub fn references_secret(mirror: &RegistryMirror, name: &str) -> bool {
    secret_uses(mirror).iter().any(|u| u.name == name)
}

/// Reads the referenced Secrets into [`Inputs`] (proxy endpoints are filled in later).
pub async fn read_inputs(client: &Client, mirror: &RegistryMirror) -> Result<Inputs> {
    let ns = mirror.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut fetched: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    let mut inputs = Inputs::default();
    for u in secret_uses(mirror) {
        if !fetched.contains_key(&u.name) {
            let secret = api.get_opt(&u.name).await.map_err(|e| Error::api("get", "Secret", u.name.clone(), e))?;
            fetched.insert(u.name.clone(), secret);
        }
        let Some(secret) = fetched.get(&u.name).and_then(Option::as_ref) else {
            return Err(Error::SecretMissing { field: u.field, name: u.name });
        };
        let has = |key: &str| {
            secret.data.as_ref().is_some_and(|d| d.contains_key(key))
                || secret.string_data.as_ref().is_some_and(|d| d.contains_key(key))
        };
        if let Some(key) = u.keys.iter().find(|k| !has(k)) {
            return Err(Error::SecretKeyMissing { field: u.field, name: u.name, key: key.clone() });
        }
        if let Some(rv) = secret.resource_version() {
            inputs.secret_versions.insert(u.name.clone(), rv);
        }
    }
    if let Some(auth) = &mirror.spec.client_auth {
        inputs.client_users = fetched.get(&auth.users_secret_ref.name).and_then(Option::as_ref).map(secret_strings);
    }
    inputs.edge_ca = edge_ca_input(mirror, |name| fetched.get(name).and_then(Option::as_ref));
    Ok(inputs)
}
