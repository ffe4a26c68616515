//! `mirrorfleet cleanup-replica`: what a new proxy replica's `cache-cleanup` init container does
//! to the registry's filesystem storage before the registry starts (see
//! [`crate::build::cleanup`] for the whole design).
//!
//! `garbageCollect` is a mark-and-sweep over Distribution's storage layout
//! (`docker/registry/v2/{repositories,blobs}`), written here rather than run as `registry
//! garbage-collect` because the registry's own tool cannot clean a pull-through cache safely:
//! without `--delete-untagged` it keeps every manifest ever cached (an old manifest whose tag
//! moved upstream is never freed), and with it, Distribution 2.8 deletes the platform manifests
//! of every cached multi-arch image — they are untagged; only their index is — and then their
//! layers. This collector keeps exactly what a tag reaches:
//!
//! 1. per repository, the manifests reachable from its tags, following image indexes and
//!    manifest lists to their platform manifests;
//! 2. the blobs those manifests reference (config, layers, the manifests themselves);
//! 3. it deletes the other manifest revisions, the layer links to unmarked blobs, and the
//!    unmarked blobs — but nothing younger than `min_age`, so content a pull is writing right
//!    now on shared storage is never taken from under it.
//!
//! `purge` deletes the whole `docker/` tree. Both report disk usage (allocated blocks) before
//! and after, as a [`ReplicaCleanup`].

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::build::cleanup::ReplicaCleanup;
use crate::cache::layout::{blob_dir, disk_usage, is_sha256, linked_digests, read_link, references, repositories, V2};

/// The last request carried out on this storage (so a pod restart does not clean again).
pub const MARKER_FILE: &str = ".mirrorfleet-cleanup";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub manifests_kept: usize,
    pub manifests_deleted: usize,
    pub blobs_kept: usize,
    pub blobs_deleted: usize,
    /// Blobs unmarked but younger than `min_age`, left for the next run.
    pub blobs_too_young: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Report what would go, delete nothing.
    pub dry_run: bool,
    /// Never delete a blob or revision modified more recently than this.
    pub min_age: Duration,
}

fn older_than(path: &Path, cutoff: SystemTime) -> bool {
    fs::metadata(path).and_then(|m| m.modified()).map(|t| t <= cutoff).unwrap_or(true)
}

fn remove(path: &Path, dry_run: bool) -> io::Result<()> {
    if dry_run {
        return Ok(());
    }
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Mark-and-sweep of the storage below `root` (the registry's `rootdirectory`).
pub fn garbage_collect(root: &Path, opts: GcOptions) -> io::Result<GcStats> {
    let v2 = root.join(V2);
    let cutoff = SystemTime::now() - opts.min_age;
    let mut stats = GcStats::default();
    let mut repos = Vec::new();
    repositories(&v2.join("repositories"), &mut repos);

    let mut marked: BTreeSet<String> = BTreeSet::new();
    for repo in &repos {
        let manifests = repo.join("_manifests");
        let tags = fs::read_dir(manifests.join("tags")).map(|it| it.flatten().collect::<Vec<_>>()).unwrap_or_default();
        let mut queue: VecDeque<String> =
            tags.iter().filter_map(|t| read_link(&t.path().join("current/link"))).collect();
        let mut reachable = BTreeSet::new();
        while let Some(digest) = queue.pop_front() {
            if !reachable.insert(digest.clone()) {
                continue;
            }
            let (children, blobs) = references(&v2, &digest);
            queue.extend(children);
            marked.extend(blobs);
        }
        for revision in linked_digests(&manifests.join("revisions")) {
            let dir = manifests.join("revisions/sha256").join(&revision[7..]);
            if reachable.contains(&revision) {
                stats.manifests_kept += 1;
            } else if older_than(&dir, cutoff) {
                remove(&dir, opts.dry_run)?;
                stats.manifests_deleted += 1;
            } else {
                // Young: a pull may be tagging it right now; keep it and what it references.
                stats.manifests_kept += 1;
                reachable.insert(revision.clone());
                let (children, blobs) = references(&v2, &revision);
                marked.extend(children);
                marked.extend(blobs);
            }
        }
        marked.extend(reachable);
    }

    // Layer links to blobs that go, so the repository does not claim what it no longer has.
    for repo in &repos {
        for digest in linked_digests(&repo.join("_layers")) {
            let dir = repo.join("_layers/sha256").join(&digest[7..]);
            if !marked.contains(&digest) && older_than(&dir, cutoff) && older_than(&blob_dir(&v2, &digest), cutoff) {
                remove(&dir, opts.dry_run)?;
            }
        }
    }

    let Ok(prefixes) = fs::read_dir(v2.join("blobs/sha256")) else { return Ok(stats) };
    for prefix in prefixes.flatten() {
        for blob in fs::read_dir(prefix.path())?.flatten() {
            let digest = format!("sha256:{}", blob.file_name().to_string_lossy());
            if !is_sha256(&digest) || marked.contains(&digest) {
                stats.blobs_kept += 1;
            } else if !older_than(&blob.path(), cutoff) || !older_than(&blob.path().join("data"), cutoff) {
                stats.blobs_too_young += 1;
            } else {
                remove(&blob.path(), opts.dry_run)?;
                stats.blobs_deleted += 1;
            }
        }
    }
    Ok(stats)
}

/// Deletes everything the registry stored below `root` (the marker file stays).
pub fn purge(root: &Path) -> io::Result<()> {
    remove(&root.join("docker"), false)
}

/// Runs `request` (`<policy>/<run id>`, empty for none) on the storage at `root` and returns
/// the replica's report. Never fails: errors are in the report, so the pod still starts.
pub fn clean_replica(root: &Path, request: &str, min_age: Duration) -> ReplicaCleanup {
    let started = Instant::now();
    let policy = request.split('/').next().unwrap_or_default();
    let report = |action: &str, before: Option<u64>, error: Option<String>| ReplicaCleanup {
        request: request.to_string(),
        action: action.to_string(),
        bytes_before: before,
        bytes_after: root.is_dir().then(|| disk_usage(root)),
        seconds: started.elapsed().as_secs(),
        error,
    };
    if request.is_empty() {
        return report("none", None, None);
    }
    let marker = root.join(MARKER_FILE);
    if fs::read_to_string(&marker).is_ok_and(|done| done == request) {
        return report("alreadyDone", root.is_dir().then(|| disk_usage(root)), None);
    }
    let before = root.is_dir().then(|| disk_usage(root));
    let result = match policy {
        "garbageCollect" if !root.join(V2).join("repositories").is_dir() => Ok("empty"),
        "garbageCollect" => garbage_collect(root, GcOptions { dry_run: false, min_age })
            .map(|stats| {
                tracing::info!(?stats, "garbage collected");
                "garbageCollected"
            })
            .map_err(|e| format!("garbage collection: {e}")),
        "purge" => purge(root).map(|()| "purged").map_err(|e| format!("purge: {e}")),
        other => Err(format!("unknown cleanup policy {other:?}")),
    };
    match result {
        Ok(action) => {
            if root.is_dir() {
                if let Err(e) = fs::write(&marker, request) {
                    return report(action, before, Some(format!("writing {}: {e}", marker.display())));
                }
            }
            report(action, before, None)
        }
        Err(e) => report("failed", before, Some(e)),
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct CleanupReplicaArgs {
    /// The registry's storage root (its `storage.filesystem.rootdirectory`).
    #[arg(long)]
    pub storage_root: PathBuf,
    /// `<policy>/<run id>`; empty means nothing to do. The init container gets it from the pod
    /// template annotation through the downward API.
    #[arg(long, env = "MIRRORFLEET_CLEANUP_REQUEST", default_value = "")]
    pub request: String,
    /// Where the report goes (the container's terminationMessagePath).
    #[arg(long, default_value = crate::build::cleanup::TERMINATION_MESSAGE_PATH)]
    pub report_file: PathBuf,
    /// Keep content modified more recently than this many seconds (shared storage: a pull may
    /// be writing it right now).
    #[arg(long, default_value_t = 600)]
    pub min_age_seconds: u64,
}

/// Entry point of `mirrorfleet cleanup-replica`: always exits 0 (a failed cleanup must not keep
/// the proxy from starting); the report says what happened.
pub fn main(args: CleanupReplicaArgs) -> std::process::ExitCode {
    // Pod logs are files, not terminals: no colour escapes in them.
    let ansi = std::io::IsTerminal::is_terminal(&io::stderr());
    let _ = tracing_subscriber::fmt().with_writer(io::stderr).with_ansi(ansi).with_target(false).try_init();
    let report = clean_replica(&args.storage_root, &args.request, Duration::from_secs(args.min_age_seconds));
    let message = serde_json::to_string(&report).expect("report serializes");
    println!("{message}");
    if let Err(e) = fs::write(&args.report_file, &message) {
        eprintln!("error: writing the report to {}: {e}", args.report_file.display());
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::layout::testing::Store;

    fn all_old() -> GcOptions {
        GcOptions { dry_run: false, min_age: Duration::ZERO }
    }

    #[test]
    fn keeps_what_tags_reach_through_indexes_and_deletes_the_rest() {
        let s = Store::new();
        let (l1, l2, cfg) = (s.blob(b"layer-1"), s.blob(b"layer-2"), s.blob(b"config"));
        let amd64 = s.manifest("library/multi", &[&l1], &cfg);
        let arm64 = s.manifest("library/multi", &[&l2], &cfg);
        let index = s.index("library/multi", &[&amd64, &arm64]);
        s.tag("library/multi", "v1", &index);
        // A superseded manifest (its tag moved) with a layer only it used, and an orphan blob.
        let (gone_layer, kept_layer) = (s.blob(b"old-layer"), s.blob(b"shared-layer"));
        let old = s.manifest("library/app", &[&gone_layer, &kept_layer], &cfg);
        let new = s.manifest("library/app", &[&kept_layer], &cfg);
        s.tag("library/app", "latest", &new);
        let orphan = s.blob(b"never referenced");

        let dry = garbage_collect(s.0.path(), GcOptions { dry_run: true, ..all_old() }).unwrap();
        assert_eq!((dry.manifests_deleted, dry.blobs_deleted), (1, 3));
        assert!(s.has(&old) && s.has(&orphan), "a dry run deletes nothing");

        let stats = garbage_collect(s.0.path(), all_old()).unwrap();
        assert_eq!((stats.manifests_deleted, stats.blobs_deleted), (1, 3), "{stats:?}");
        for kept in [&l1, &l2, &cfg, &amd64, &arm64, &index, &new, &kept_layer] {
            assert!(s.has(kept), "{kept} is reachable from a tag");
        }
        for gone in [&old, &gone_layer, &orphan] {
            assert!(!s.has(gone), "{gone} is not");
        }
        let app = s.v2().join("repositories/library/app");
        assert!(!app.join(format!("_manifests/revisions/sha256/{}", &old[7..])).exists());
        assert!(!app.join(format!("_layers/sha256/{}", &gone_layer[7..])).exists(), "its layer link goes too");
        assert!(app.join(format!("_layers/sha256/{}", &kept_layer[7..])).exists());
        assert_eq!(garbage_collect(s.0.path(), all_old()).unwrap().blobs_deleted, 0, "a second run finds nothing");
    }

    #[test]
    fn young_content_is_left_for_the_next_run() {
        let s = Store::new();
        let cfg = s.blob(b"config");
        let layer = s.blob(b"fresh layer of a pull in progress");
        let untagged = s.manifest("library/x", &[&layer], &cfg);
        let orphan = s.blob(b"just written");
        let stats =
            garbage_collect(s.0.path(), GcOptions { dry_run: false, min_age: Duration::from_secs(600) }).unwrap();
        assert_eq!((stats.manifests_deleted, stats.blobs_deleted), (0, 0), "{stats:?}");
        assert!(stats.blobs_too_young >= 1);
        assert!(s.has(&untagged) && s.has(&layer) && s.has(&orphan));
    }

    #[test]
    fn a_replica_reports_each_outcome_and_does_a_request_once() {
        let s = Store::new();
        let root = s.0.path();
        assert_eq!(clean_replica(root, "", Duration::ZERO).action, "none");
        assert_eq!(clean_replica(root, "garbageCollect/r1", Duration::ZERO).action, "empty");
        let cfg = s.blob(&[7u8; 10_000]);
        let m = s.manifest("library/y", &[], &cfg);
        let _ = m;
        let r = clean_replica(root, "purge/r2", Duration::ZERO);
        assert_eq!(r.action, "purged");
        assert!(r.bytes_before.unwrap() > r.bytes_after.unwrap() + 8_000, "{r:?}");
        assert!(!root.join("docker").exists());
        assert_eq!(clean_replica(root, "purge/r2", Duration::ZERO).action, "alreadyDone");
        let bad = clean_replica(root, "compact/r3", Duration::ZERO);
        assert_eq!(bad.action, "failed");
        assert!(bad.error.unwrap().contains("unknown cleanup policy"));
    }
}
