//! Client authentication: the bcrypt htpasswd Secret the proxies read, and the node agent's
//! Authorization header Secret.
//!
//! bcrypt salts are derived from the mirror and the user, so re-rendering an unchanged user list
//! gives a byte-identical htpasswd (no churn, no needless proxy rollout); a changed password gives
//! a new hash. The salt is never derived from the password: the salt is readable in the hash, and
//! a fast hash of the password there would let anyone holding the htpasswd Secret test guesses at
//! SHA-256 speed instead of bcrypt's.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

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
    let ns = mirror.namespace().unwrap_or_default();
    let name = mirror.name_any();
    for (user, password) in users {
        let salt_digest = digest(&["mirrorfleet-htpasswd-salt", &ns, &name, user]);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&salt_digest[..16]);
        // In memory only, never written anywhere: the cache's key.
        let key = digest(&["mirrorfleet-htpasswd-cache", &ns, &name, user, password]);
        out.push_str(user);
        out.push(':');
        out.push_str(&bcrypt_hash(&key, salt, password));
        out.push('\n');
    }
    out
}

/// SHA-256 over length-prefixed parts.
fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// Hashes already computed, by a digest of the mirror, the user and the password (in memory
/// only). bcrypt is slow on purpose and every build of a fleet (each reconcile, each render)
/// hashes every user again; the result is a pure function of those, so each is computed once per
/// process. Bounded: cleared when it grows past [`HASH_CACHE_LIMIT`] entries.
static HASH_CACHE: Mutex<Option<HashMap<[u8; 32], String>>> = Mutex::new(None);
const HASH_CACHE_LIMIT: usize = 4096;

fn bcrypt_hash(key: &[u8; 32], salt: [u8; 16], password: &str) -> String {
    if let Some(hash) = HASH_CACHE.lock().ok().and_then(|c| c.as_ref()?.get(key).cloned()) {
        return hash;
    }
    let hash = bcrypt::hash_with_salt(password.as_bytes(), BCRYPT_COST, salt)
        .expect("bcrypt cost is valid")
        .format_for_version(bcrypt::Version::TwoY);
    if let Ok(mut cache) = HASH_CACHE.lock() {
        let cache = cache.get_or_insert_with(HashMap::new);
        if cache.len() >= HASH_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(*key, hash.clone());
    }
    hash
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror() -> RegistryMirror {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mirrorfleet.io/v1alpha1", "kind": "RegistryMirror",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"upstreams": [{"name": "hub", "registry": "docker.io", "remoteURL": "https://registry-1.docker.io"}]}
        }))
        .unwrap()
    }

    fn line(password: &str) -> String {
        let users = BTreeMap::from([("ci".to_string(), password.to_string())]);
        htpasswd(&mirror(), &users).trim_end().strip_prefix("ci:").unwrap().to_string()
    }

    #[test]
    fn hashes_verify_and_are_stable() {
        let hash = line("s3cret");
        assert!(hash.starts_with("$2y$05$"), "{hash}");
        assert!(bcrypt::verify("s3cret", &hash).unwrap());
        assert!(!bcrypt::verify("other", &hash).unwrap());
        assert_eq!(line("s3cret"), hash, "re-rendering must give the same bytes");
        assert_ne!(line("changed"), hash, "a new password must give a new hash");
    }

    /// The salt (readable in the hash: 22 characters after `$2y$05$`) depends on the mirror and
    /// the user only, so it reveals nothing about the password.
    #[test]
    fn the_salt_does_not_depend_on_the_password() {
        let salt = |h: &str| h["$2y$05$".len().."$2y$05$".len() + 22].to_string();
        let (a, b) = (line("first-password"), line("second-password"));
        assert_eq!(salt(&a), salt(&b));
        assert_ne!(a, b);
    }
}
