//! Distribution's filesystem storage layout (`docker/registry/v2` below `rootdirectory`), read
//! by the cleanup init container ([`crate::cleanup::local`]) and the cache keeper
//! ([`super::keeper`]): repositories, their tags, manifest revisions and layer links, and the
//! global blob store.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where Distribution's filesystem driver keeps everything, below `rootdirectory`.
pub const V2: &str = "docker/registry/v2";
/// Disk usage of `path` in bytes (allocated 512-byte blocks, like `du`), 0 if it is missing.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + fs::read_dir(path).map(|it| it.flatten().map(|e| disk_usage(&e.path())).sum()).unwrap_or(0)
}

pub fn read_link(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let digest = text.trim();
    is_sha256(digest).then(|| digest.to_string())
}

pub fn is_sha256(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub fn blob_dir(v2: &Path, digest: &str) -> PathBuf {
    let hex = &digest[7..];
    v2.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Directories below `repositories/` that are repositories (hold `_manifests`).
pub fn repositories(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        let name = e.file_name();
        if name == "_manifests" {
            out.push(dir.to_path_buf());
        } else if !name.to_string_lossy().starts_with('_') {
            repositories(&p, out);
        }
    }
}

/// `sha256:` digests named by the `<dir>/sha256/<hex>/link` files below `dir`.
pub fn linked_digests(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir.join("sha256")) else { return Vec::new() };
    entries.flatten().filter_map(|e| read_link(&e.path().join("link"))).collect()
}

/// What a manifest references: (child manifests, other blobs). Unknown or unreadable content
/// references nothing (its blob is still kept, being reachable itself).
pub fn references(v2: &Path, digest: &str) -> (Vec<String>, Vec<String>) {
    let Ok(bytes) = fs::read(blob_dir(v2, digest).join("data")) else { return (Vec::new(), Vec::new()) };
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return (Vec::new(), Vec::new()) };
    let digests = |list: &serde_json::Value, key: &str| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d[key].as_str().filter(|s| is_sha256(s)).map(str::to_string))
            .collect()
    };
    let children = digests(&doc["manifests"], "digest");
    let mut blobs = digests(&doc["layers"], "digest");
    blobs.extend(digests(&doc["fsLayers"], "blobSum")); // schema 1
    blobs.extend(doc["config"]["digest"].as_str().filter(|s| is_sha256(s)).map(str::to_string));
    (children, blobs)
}

#[cfg(test)]
pub mod testing {
    use super::*;
    use sha2::{Digest, Sha256};

    /// A storage tree in Distribution's layout, built by hand.
    pub struct Store(pub tempfile::TempDir);

    #[allow(clippy::new_without_default)] // a temporary directory per store, never a shared default
    impl Store {
        pub fn new() -> Store {
            Store(tempfile::tempdir().unwrap())
        }
        pub fn v2(&self) -> PathBuf {
            self.0.path().join(V2)
        }
        pub fn blob(&self, bytes: &[u8]) -> String {
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
            let dir = blob_dir(&self.v2(), &digest);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("data"), bytes).unwrap();
            digest
        }
        pub fn link(&self, dir: PathBuf, digest: &str) {
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("link"), digest).unwrap();
        }
        pub fn manifest(&self, repo: &str, layers: &[&str], config: &str) -> String {
            let body = serde_json::json!({"schemaVersion": 2, "config": {"digest": config},
                "layers": layers.iter().map(|l| serde_json::json!({"digest": l})).collect::<Vec<_>>()});
            let digest = self.blob(body.to_string().as_bytes());
            self.revision(repo, &digest);
            for l in layers.iter().chain([&config]) {
                self.link(self.v2().join(format!("repositories/{repo}/_layers/sha256/{}", &l[7..])), l);
            }
            digest
        }
        pub fn index(&self, repo: &str, children: &[&str]) -> String {
            let body = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": children.iter().map(|c| serde_json::json!({"digest": c})).collect::<Vec<_>>()});
            let digest = self.blob(body.to_string().as_bytes());
            self.revision(repo, &digest);
            digest
        }
        pub fn revision(&self, repo: &str, digest: &str) {
            self.link(
                self.v2().join(format!("repositories/{repo}/_manifests/revisions/sha256/{}", &digest[7..])),
                digest,
            );
        }
        pub fn tag(&self, repo: &str, tag: &str, digest: &str) {
            self.link(self.v2().join(format!("repositories/{repo}/_manifests/tags/{tag}/current")), digest);
        }
        pub fn has(&self, digest: &str) -> bool {
            blob_dir(&self.v2(), digest).exists()
        }
    }
}
