//! Client authentication: the bcrypt htpasswd Secret the proxies read, and the node agent's
//! Authorization header Secret.
//!
//! bcrypt salts are derived from the mirror, the user and the password, so re-rendering an
//! unchanged user list gives a byte-identical htpasswd (no churn, no needless proxy rollout) and
//! a changed password gives a new hash.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::meta::{self, names, Component};
use super::proxy::HTPASSWD_FILE;
use crate::api::RegistryMirror;

/// bcrypt work factor. Distribution checks the password of *every* request (each blob of each
/// pull) against the hash, so the cost is paid per request; 5 is what `htpasswd -B` uses by
/// default. The hashes live in a Secret, which is the real protection.
pub const BCRYPT_COST: u32 = 5;

/// One htpasswd line per user, sorted by user name.
pub fn htpasswd(mirror: &RegistryMirror, users: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (user, password) in users {
        let mut h = Sha256::new();
        for part in
            ["mirrorfleet-htpasswd", &mirror.namespace().unwrap_or_default(), &mirror.name_any(), user, password]
        {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        let digest = h.finalize();
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&digest[..16]);
        let hash = bcrypt::hash_with_salt(password.as_bytes(), BCRYPT_COST, salt)
            .expect("bcrypt cost is valid")
            .format_for_version(bcrypt::Version::TwoY);
        out.push_str(user);
        out.push(':');
        out.push_str(&hash);
        out.push('\n');
    }
    out
}

pub fn htpasswd_secret(mirror: &RegistryMirror, htpasswd: &str) -> Secret {
    Secret {
        metadata: meta::object_meta(mirror, names::htpasswd(mirror), Component::Auth, None),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(HTPASSWD_FILE.to_string(), ByteString(htpasswd.as_bytes().to_vec()))])),
        ..Default::default()
    }
}

/// `Basic base64(user:password)`: what the node agent writes into hosts.toml (mode 0600).
pub fn basic_authorization(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

pub const NODE_AUTH_KEY: &str = "authorization";

pub fn node_auth_secret(mirror: &RegistryMirror, authorization: &str) -> Secret {
    Secret {
        metadata: meta::object_meta(mirror, names::node_auth(mirror), Component::NodeAgent, None),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(NODE_AUTH_KEY.to_string(), ByteString(authorization.as_bytes().to_vec()))])),
        ..Default::default()
    }
}
