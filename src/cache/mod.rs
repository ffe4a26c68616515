//! The proxies' cache management: `mirrorfleet cache-keeper`, a container in every proxy pod
//! with filesystem storage (emptyDir or PersistentVolumeClaim).
//!
//! * Recency: the registry notifies the keeper of every manifest and blob it serves
//!   (Distribution notifications to `127.0.0.1`); the keeper stamps the pulled manifest's
//!   revision link (and the blob's layer link) in the storage with the time of the pull. The
//!   stamp lives with the cache (it survives keeper restarts, and replicas sharing a
//!   ReadWriteMany claim see each other's pulls).
//! * Eviction ([`evict`]): an image (a manifest, with its platform manifests for an index, and
//!   their config and layers) is the unit. Above the high watermark the least recently pulled
//!   unpinned images go until the low watermark is reached; images not pulled for `ttl` go
//!   whatever the fill. A blob still referenced by an image that stays is never deleted.
//! * Serving during eviction: the registry reads the storage on every request (the keeper's
//!   proxies run without Distribution's in-memory blob descriptor cache), so an evicted image is
//!   simply not cached any more: the next pull fetches it from the upstream again. A blob being
//!   streamed while it is deleted keeps streaming (an open file outlives its name).

pub mod evict;
pub mod keeper;
pub mod layout;
pub mod prefetch;
