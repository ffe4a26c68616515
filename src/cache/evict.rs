//! What an eviction removes from a proxy's filesystem storage, and removing it.
//!
//! The unit is an image: a manifest that no other manifest of its repository references (a
//! single-platform manifest, or an index with the platform manifests cached below it), its
//! config and layers. Its last pull is the newest stamp on its manifests' revision links (the
//! keeper stamps them on every pull, [`stamp_pull`]); content cached before the keeper saw any
//! pull counts from when it was cached. Blobs no image references — a replica serves layers of
//! images whose manifests another replica served — are units of their own, stamped through their
//! layer links.
//!
//! [`plan`] is pure: the units, their sizes, the fill and the limits in, the units and blobs to
//! delete out. A blob goes only when no unit that stays references it. [`apply`] deletes in the
//! order that keeps every intermediate state servable: tags, then manifest revisions, then layer
//! links, then the blobs themselves.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::layout::{blob_dir, disk_usage, linked_digests, read_link, references, repositories, V2};
use crate::api::reference::Target;

/// One evictable unit of the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// Repository path below `repositories/` (`library/nginx`).
    pub repository: String,
    /// The image's top manifest; `None` for a blob no cached manifest references.
    pub root: Option<String>,
    /// Manifests of the image cached in this repository (the root and its platform manifests).
    pub manifests: BTreeSet<String>,
    /// Config and layer digests the manifests reference (whether cached here or not).
    pub blobs: BTreeSet<String>,
    /// Tags of the repository that point at the root.
    pub tags: Vec<String>,
    /// Every repository holding a layer link to this unit's blob (blob units only).
    pub linked_from: Vec<String>,
    pub last_pulled: SystemTime,
    /// Disk usage of the unit's tag, revision and layer-link directories (a third of an image's
    /// footprint for small images).
    pub link_bytes: u64,
}

impl Unit {
    /// Everything stored for the unit: its manifests' blobs and the config and layers.
    pub fn content(&self) -> impl Iterator<Item = &String> {
        self.manifests.iter().chain(&self.blobs)
    }

    /// `repository:tag`-style name for logs and status: the first tag, else the digest.
    pub fn name(&self) -> String {
        match (&self.root, self.tags.first()) {
            (_, Some(tag)) => format!("{}:{tag}", self.repository),
            (Some(root), None) => format!("{}@{root}", self.repository),
            (None, None) => format!("{} blob {}", self.repository, self.blobs.first().map_or("", |b| b.as_str())),
        }
    }

    /// Whether a pin (repository and tag or digest inside the proxy) names this unit.
    pub fn pinned_by(&self, repository: &str, target: &Target) -> bool {
        self.repository == repository
            && match target {
                Target::Tag(t) => self.tags.iter().any(|x| x == t),
                Target::Digest(d) => self.manifests.contains(d),
            }
    }
}

/// The storage as units, with the disk usage of each stored blob.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    pub units: Vec<Unit>,
    pub blob_bytes: BTreeMap<String, u64>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn revision_link(repo: &Path, digest: &str) -> PathBuf {
    repo.join("_manifests/revisions/sha256").join(&digest[7..]).join("link")
}

fn layer_link(repo: &Path, digest: &str) -> PathBuf {
    repo.join("_layers/sha256").join(&digest[7..]).join("link")
}

/// Reads the storage below `root` (the registry's `rootdirectory`) into units.
pub fn scan(root: &Path) -> Inventory {
    let v2 = root.join(V2);
    let repos_dir = v2.join("repositories");
    let mut repos = Vec::new();
    repositories(&repos_dir, &mut repos);
    repos.sort();
    let mut units = Vec::new();
    let mut referenced: BTreeSet<String> = BTreeSet::new();
    let mut layer_links: BTreeMap<String, Vec<(String, SystemTime, u64)>> = BTreeMap::new();
    for repo in &repos {
        let name = repo.strip_prefix(&repos_dir).unwrap_or(repo).to_string_lossy().into_owned();
        let revisions: BTreeSet<String> = linked_digests(&repo.join("_manifests/revisions")).into_iter().collect();
        let refs: BTreeMap<&String, (Vec<String>, Vec<String>)> =
            revisions.iter().map(|d| (d, references(&v2, d))).collect();
        let children: BTreeSet<&String> = refs.values().flat_map(|(c, _)| c).collect();
        let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for tag in fs::read_dir(repo.join("_manifests/tags")).into_iter().flatten().flatten() {
            if let Some(d) = read_link(&tag.path().join("current/link")) {
                tags.entry(d).or_default().push(tag.file_name().to_string_lossy().into_owned());
            }
        }
        for top in revisions.iter().filter(|d| !children.contains(d)) {
            let mut manifests = BTreeSet::new();
            let mut blobs = BTreeSet::new();
            let mut queue = VecDeque::from([top.clone()]);
            while let Some(d) = queue.pop_front() {
                if !revisions.contains(&d) || !manifests.insert(d.clone()) {
                    continue;
                }
                let (c, b) = &refs[&d];
                queue.extend(c.iter().cloned());
                blobs.extend(b.iter().cloned());
            }
            let last_pulled = manifests
                .iter()
                .filter_map(|d| modified(&revision_link(repo, d)))
                .max()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            referenced.extend(manifests.iter().cloned());
            referenced.extend(blobs.iter().cloned());
            let mut unit_tags = tags.remove(top).unwrap_or_default();
            unit_tags.sort();
            let link_bytes = unit_tags.iter().map(|t| disk_usage(&repo.join("_manifests/tags").join(t))).sum::<u64>()
                + manifests.iter().map(|d| disk_usage(revision_link(repo, d).parent().unwrap())).sum::<u64>()
                + blobs.iter().map(|d| disk_usage(layer_link(repo, d).parent().unwrap())).sum::<u64>();
            units.push(Unit {
                repository: name.clone(),
                root: Some(top.clone()),
                manifests,
                blobs,
                tags: unit_tags,
                linked_from: Vec::new(),
                last_pulled,
                link_bytes,
            });
        }
        for d in linked_digests(&repo.join("_layers")) {
            let link = layer_link(repo, &d);
            let at = modified(&link).unwrap_or(SystemTime::UNIX_EPOCH);
            layer_links.entry(d).or_default().push((name.clone(), at, disk_usage(link.parent().unwrap())));
        }
    }
    for (digest, links) in layer_links {
        if referenced.contains(&digest) || !blob_dir(&v2, &digest).exists() {
            continue;
        }
        units.push(Unit {
            repository: links[0].0.clone(),
            root: None,
            manifests: BTreeSet::new(),
            blobs: BTreeSet::from([digest]),
            tags: Vec::new(),
            last_pulled: links.iter().map(|(_, t, _)| *t).max().unwrap_or(SystemTime::UNIX_EPOCH),
            link_bytes: links.iter().map(|(_, _, b)| b).sum(),
            linked_from: links.into_iter().map(|(r, _, _)| r).collect(),
        });
    }
    let mut blob_bytes = BTreeMap::new();
    for d in units.iter().flat_map(Unit::content) {
        if !blob_bytes.contains_key(d) {
            let dir = blob_dir(&v2, d);
            if dir.exists() {
                blob_bytes.insert(d.clone(), disk_usage(&dir));
            }
        }
    }
    Inventory { units, blob_bytes }
}

/// The limits an eviction works to.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Above this many bytes, evict ...
    pub high: u64,
    /// ... down to this many.
    pub low: u64,
    /// Units last pulled before this go whatever the fill.
    pub expire_before: Option<SystemTime>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Indices into the inventory's units, oldest pull first.
    pub units: Vec<usize>,
    /// Of those, how many went for their age (the rest for the fill).
    pub expired: usize,
    /// Blobs no remaining unit references.
    pub blobs: BTreeSet<String>,
    /// What the eviction frees (the blobs and the units' link directories).
    pub bytes: u64,
}

/// Chooses what to evict. `usage`: the storage's disk usage now; `pinned`: units never evicted.
pub fn plan(inv: &Inventory, usage: u64, limits: Limits, pinned: impl Fn(&Unit) -> bool) -> Plan {
    let mut refs: BTreeMap<&String, usize> = BTreeMap::new();
    for d in inv.units.iter().flat_map(Unit::content) {
        *refs.entry(d).or_default() += 1;
    }
    let mut order: Vec<usize> = (0..inv.units.len()).filter(|&i| !pinned(&inv.units[i])).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&inv.units[a], &inv.units[b]);
        (a.last_pulled, &a.repository, &a.root, &a.blobs).cmp(&(b.last_pulled, &b.repository, &b.root, &b.blobs))
    });
    let mut out = Plan::default();
    let over = usage > limits.high;
    for i in order {
        let unit = &inv.units[i];
        let expired = limits.expire_before.is_some_and(|t| unit.last_pulled < t);
        let for_fill = over && usage.saturating_sub(out.bytes) > limits.low;
        if !(expired || for_fill) {
            // Oldest first: once a unit is neither expired nor needed for the fill, none after is.
            break;
        }
        out.units.push(i);
        out.expired += usize::from(expired);
        out.bytes += unit.link_bytes;
        for d in unit.content() {
            let n = refs.get_mut(d).expect("counted above");
            *n -= 1;
            if *n == 0 {
                if let Some(bytes) = inv.blob_bytes.get(d) {
                    out.bytes += bytes;
                    out.blobs.insert(d.clone());
                }
            }
        }
    }
    out
}

/// Removes `path` and everything below it; returns its disk usage (0 if it was gone).
fn remove_dir(path: &Path) -> io::Result<u64> {
    let bytes = disk_usage(path);
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(bytes),
    }
}

/// Deletes what `plan` chose from the storage below `root`. Returns the bytes actually freed
/// (disk usage of everything deleted).
pub fn apply(root: &Path, inv: &Inventory, plan: &Plan) -> io::Result<u64> {
    let v2 = root.join(V2);
    let repos = v2.join("repositories");
    let evicted: BTreeSet<usize> = plan.units.iter().copied().collect();
    // What the remaining units of each repository still need.
    let mut kept: BTreeSet<(&str, &String)> = BTreeSet::new();
    for (_, u) in inv.units.iter().enumerate().filter(|(i, _)| !evicted.contains(i)) {
        for d in u.content() {
            kept.insert((&u.repository, d));
            for r in &u.linked_from {
                kept.insert((r, d));
            }
        }
    }
    let units = || plan.units.iter().map(|&i| &inv.units[i]);
    let mut freed = 0;
    for u in units() {
        let repo = repos.join(&u.repository);
        for tag in &u.tags {
            let dir = repo.join("_manifests/tags").join(tag);
            // Only if the tag still points here: a pull may have moved it since the scan.
            if read_link(&dir.join("current/link")).as_ref() == u.root.as_ref() {
                freed += remove_dir(&dir)?;
            }
        }
    }
    for u in units() {
        let repo = repos.join(&u.repository);
        for d in u.manifests.iter().filter(|d| !kept.contains(&(u.repository.as_str(), *d))) {
            freed += remove_dir(&repo.join("_manifests/revisions/sha256").join(&d[7..]))?;
        }
    }
    for u in units() {
        let repos_of_unit = std::iter::once(&u.repository).chain(&u.linked_from);
        for r in repos_of_unit {
            for d in u.blobs.iter().filter(|d| !kept.contains(&(r.as_str(), *d))) {
                freed += remove_dir(&repos.join(r).join("_layers/sha256").join(&d[7..]))?;
            }
        }
    }
    for d in &plan.blobs {
        freed += remove_dir(&blob_dir(&v2, d))?;
    }
    Ok(freed)
}

/// Whether the blob was written since `since` (or is not written yet: Distribution 2.8 stores a
/// fetched blob after it answered): a pull that grew the cache, not one served from it.
pub fn blob_is_new(root: &Path, digest: &str, since: SystemTime) -> bool {
    if !super::layout::is_sha256(digest) {
        return false;
    }
    modified(&blob_dir(&root.join(V2), digest).join("data")).is_none_or(|t| t >= since)
}

/// Records a pull the registry reported: stamps the manifest's revision link (or the blob's layer
/// link) in `repository` with the current time. Returns false when the storage holds neither (a
/// pull the registry answered without caching, e.g. a failure upstream).
pub fn stamp_pull(root: &Path, repository: &str, digest: &str) -> bool {
    if !super::layout::is_sha256(digest) || repository.split('/').any(|c| c.is_empty() || c.starts_with('.')) {
        return false;
    }
    let repo = root.join(V2).join("repositories").join(repository);
    let now = SystemTime::now();
    [revision_link(&repo, digest), layer_link(&repo, digest)]
        .iter()
        .any(|link| fs::OpenOptions::new().write(true).open(link).and_then(|f| f.set_modified(now)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::layout::testing::Store;
    use std::time::Duration;

    fn set_pulled(store: &Store, repo: &str, manifest: &str, secs_ago: u64) {
        let link = store.v2().join(format!("repositories/{repo}/_manifests/revisions/sha256/{}/link", &manifest[7..]));
        let f = fs::OpenOptions::new().write(true).open(link).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs_ago)).unwrap();
    }

    /// Three images of ~`n` KiB each, none sharing a layer but `shared`, pulled a, b, c oldest first.
    fn three_images(store: &Store) -> [String; 3] {
        let shared = store.blob(&vec![7u8; 4096]);
        let mut out = Vec::new();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let layer = store.blob(&vec![i as u8; 64 * 1024]);
            let config = store.blob(format!("config {name}").as_bytes());
            let m = store.manifest(&format!("lib/{name}"), &[&shared, &layer], &config);
            store.tag(&format!("lib/{name}"), "v1", &m);
            set_pulled(store, &format!("lib/{name}"), &m, 300 - 100 * i as u64);
            out.push(m);
        }
        out.try_into().unwrap()
    }

    fn remaining(store: &Store) -> Vec<String> {
        let mut names: Vec<String> = scan(store.0.path()).units.iter().map(Unit::name).collect();
        names.sort();
        names
    }

    #[test]
    fn the_least_recently_pulled_go_first_down_to_the_low_mark() {
        let store = Store::new();
        let [a, b, c] = three_images(&store);
        let inv = scan(store.0.path());
        assert_eq!(inv.units.len(), 3);
        let usage = disk_usage(store.0.path());
        // Room for about one image less: the oldest (a) goes, then the fill is under the mark.
        let limits = Limits { high: usage - 1, low: usage - 60 * 1024, expire_before: None };
        let p = plan(&inv, usage, limits, |_| false);
        assert_eq!(p.units.iter().map(|&i| inv.units[i].root.clone().unwrap()).collect::<Vec<_>>(), vec![a.clone()]);
        assert!(p.bytes >= 64 * 1024, "{p:?}");
        let before = disk_usage(store.0.path());
        let freed = apply(store.0.path(), &inv, &p).unwrap();
        assert_eq!(freed, p.bytes);
        assert_eq!(disk_usage(store.0.path()), before - freed);
        assert_eq!(remaining(&store), vec!["lib/b:v1", "lib/c:v1"]);
        assert!(!store.has(&a));
        assert!(store.has(&b) && store.has(&c));
        // The layer a shared with b and c stays.
        let inv = scan(store.0.path());
        assert!(inv.units.iter().all(|u| u.blobs.iter().all(|d| store.has(d))));
        // Pulling b now makes c the oldest.
        assert!(stamp_pull(store.0.path(), "lib/b", &b));
        let inv = scan(store.0.path());
        let usage = disk_usage(store.0.path());
        let p = plan(&inv, usage, Limits { high: usage - 1, low: usage - 1, expire_before: None }, |_| false);
        assert_eq!(inv.units[p.units[0]].root.as_ref(), Some(&c));
    }

    #[test]
    fn under_the_high_mark_nothing_goes_and_pins_stay_over_it() {
        let store = Store::new();
        let [a, _, _] = three_images(&store);
        let inv = scan(store.0.path());
        let usage = disk_usage(store.0.path());
        let p = plan(&inv, usage, Limits { high: usage, low: 0, expire_before: None }, |_| false);
        assert_eq!(p, Plan::default());
        // Over the mark with a pin on a (by tag): b and c go, a stays.
        let pin = Target::Tag("v1".into());
        let p = plan(&inv, usage, Limits { high: 0, low: 0, expire_before: None }, |u| u.pinned_by("lib/a", &pin));
        apply(store.0.path(), &inv, &p).unwrap();
        assert_eq!(remaining(&store), vec!["lib/a:v1"]);
        assert!(store.has(&a));
        let pin = Target::Digest(a.clone());
        let inv = scan(store.0.path());
        let p = plan(&inv, usage, Limits { high: 0, low: 0, expire_before: None }, |u| u.pinned_by("lib/a", &pin));
        assert!(p.units.is_empty());
    }

    #[test]
    fn expiry_counts_from_the_last_pull() {
        let store = Store::new();
        let [a, b, c] = three_images(&store);
        let inv = scan(store.0.path());
        // a pulled 300 s ago, b 200 s ago, c 100 s ago; a ttl of 250 s takes a only.
        let limits =
            Limits { high: u64::MAX, low: 0, expire_before: Some(SystemTime::now() - Duration::from_secs(250)) };
        let p = plan(&inv, 0, limits, |_| false);
        assert_eq!((p.units.len(), p.expired), (1, 1));
        assert_eq!(inv.units[p.units[0]].root.as_ref(), Some(&a));
        // A pull renews b: with a ttl of 150 s, a (300 s) goes; b (just pulled) and c (100 s) stay.
        stamp_pull(store.0.path(), "lib/b", &b);
        let inv = scan(store.0.path());
        let limits =
            Limits { high: u64::MAX, low: 0, expire_before: Some(SystemTime::now() - Duration::from_secs(150)) };
        let p = plan(&inv, 0, limits, |_| false);
        let gone: Vec<_> = p.units.iter().map(|&i| inv.units[i].root.clone().unwrap()).collect();
        assert_eq!(gone, vec![a]);
        assert!(!gone.contains(&c));
    }

    #[test]
    fn an_index_goes_with_its_platform_manifests_and_lone_blobs_are_units() {
        let store = Store::new();
        let l1 = store.blob(&[1u8; 2048]);
        let l2 = store.blob(&[2u8; 2048]);
        let cfg = store.blob(b"cfg");
        let m1 = store.manifest("lib/multi", &[&l1], &cfg);
        let m2 = store.manifest("lib/multi", &[&l2], &cfg);
        let idx = store.index("lib/multi", &[&m1, &m2]);
        store.tag("lib/multi", "latest", &idx);
        // A layer this replica served without ever serving its manifest.
        let lone = store.blob(&[9u8; 4096]);
        fs::create_dir_all(store.v2().join(format!("repositories/lib/other/_layers/sha256/{}", &lone[7..]))).unwrap();
        fs::write(store.v2().join(format!("repositories/lib/other/_layers/sha256/{}/link", &lone[7..])), &lone)
            .unwrap();
        fs::create_dir_all(store.v2().join("repositories/lib/other/_manifests")).unwrap();
        let inv = scan(store.0.path());
        assert_eq!(inv.units.len(), 2, "{:?}", inv.units);
        let image = inv.units.iter().find(|u| u.root.is_some()).unwrap();
        assert_eq!(image.manifests, BTreeSet::from([idx.clone(), m1.clone(), m2.clone()]));
        let p = plan(&inv, 1 << 40, Limits { high: 0, low: 0, expire_before: None }, |_| false);
        assert_eq!(p.units.len(), 2);
        apply(store.0.path(), &inv, &p).unwrap();
        for d in [&idx, &m1, &m2, &l1, &l2, &cfg, &lone] {
            assert!(!store.has(d), "{d} left");
        }
        assert!(scan(store.0.path()).units.is_empty());
        // Pinning the platform manifest by digest keeps the whole index.
        let store = Store::new();
        let m1 = store.manifest("lib/multi", &[&store.blob(b"x")], &store.blob(b"c"));
        let idx = store.index("lib/multi", &[&m1]);
        let inv = scan(store.0.path());
        let pin = Target::Digest(m1.clone());
        let p =
            plan(&inv, 1 << 40, Limits { high: 0, low: 0, expire_before: None }, |u| u.pinned_by("lib/multi", &pin));
        assert!(p.units.is_empty() && store.has(&idx));
    }

    #[test]
    fn stamps_refuse_paths_outside_the_repositories() {
        let store = Store::new();
        let [a, _, _] = three_images(&store);
        assert!(!stamp_pull(store.0.path(), "../../etc", &a));
        assert!(!stamp_pull(store.0.path(), "lib/a", "sha256:zz"));
        assert!(!stamp_pull(store.0.path(), "lib/none", &a));
        assert!(stamp_pull(store.0.path(), "lib/a", &a));
    }
}
