//! `make bench-cache`: the cache keeper's eviction on a large store, and what expiry by last pull
//! saves over Distribution's expiry by first caching.
//!
//! 1. **Eviction.** A store in Distribution's filesystem layout is written to a temporary
//!    directory: `BENCH_CACHE_IMAGES` images (default 2,000) of two layers of
//!    `BENCH_CACHE_LAYER_KIB` KiB (default 256: about 1.2 GiB on disk, 8,000 blobs with the configs and
//!    manifests), every image pulled at a different time. From the full store, an eviction to a
//!    low mark of 60 % (the high mark set just under the fill): time of the inventory, of the
//!    choice, of the deletion, and the bytes freed. Three rounds (a fresh store each), medians.
//! 2. **Expiry replay.** A pull sequence of 90 days (seeded, so every run replays the same one):
//!    300 images with Zipf-like popularity (image k pulled with weight 1/(k+1)), 400 pulls a day
//!    at random times. Both rules with a ttl of 7 days, counting the pulls that must go upstream
//!    (a miss): Distribution's (an image expires 7 days after it was cached, whether pulled since
//!    or not — its scheduler sets the expiry only when it caches, `registry/proxy`) and the
//!    keeper's (`evict::plan` with `expire_before` = now - 7 days, checked every 5 minutes, the
//!    keeper's default, on units whose last pull is the newest pull).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use mirrorfleet::cache::evict::{self, Limits, Unit};
use mirrorfleet::cache::layout::disk_usage;
use sha2::{Digest, Sha256};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn write_link(dir: &Path, digest: &str, at: SystemTime) {
    fs::create_dir_all(dir).unwrap();
    let link = dir.join("link");
    fs::write(&link, digest).unwrap();
    fs::OpenOptions::new().write(true).open(&link).unwrap().set_modified(at).unwrap();
}

fn write_blob(v2: &Path, bytes: &[u8]) -> String {
    let d = digest(bytes);
    let dir = v2.join("blobs/sha256").join(&d[7..9]).join(&d[7..]);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("data"), bytes).unwrap();
    d
}

/// Writes `images` images of two layers of `layer` bytes; image i last pulled i seconds after
/// the epoch of the run (so image 0 is the least recently pulled).
fn build_store(root: &Path, images: usize, layer: usize) {
    let v2 = root.join("docker/registry/v2");
    let start = SystemTime::now() - Duration::from_secs(images as u64 + 60);
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..images {
        let repo = v2.join(format!("repositories/bench/img{i}"));
        let at = start + Duration::from_secs(i as u64);
        let mut data = vec![0u8; layer];
        let mut layers = Vec::new();
        for _ in 0..2 {
            rng.fill(&mut data);
            let d = write_blob(&v2, &data);
            write_link(&repo.join("_layers/sha256").join(&d[7..]), &d, at);
            layers.push(d);
        }
        let config = write_blob(&v2, format!("{{\"image\":{i}}}").as_bytes());
        write_link(&repo.join("_layers/sha256").join(&config[7..]), &config, at);
        let manifest = serde_json::json!({"schemaVersion": 2, "config": {"digest": config},
            "layers": layers.iter().map(|l| serde_json::json!({"digest": l})).collect::<Vec<_>>()});
        let m = write_blob(&v2, manifest.to_string().as_bytes());
        write_link(&repo.join("_manifests/revisions/sha256").join(&m[7..]), &m, at);
        write_link(&repo.join("_manifests/tags/v1/current"), &m, at);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn eviction() {
    let images = env_usize("BENCH_CACHE_IMAGES", 2000);
    let layer = env_usize("BENCH_CACHE_LAYER_KIB", 256) * 1024;
    let (mut scan, mut choose, mut delete, mut freed_all) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut line = String::new();
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        build_store(dir.path(), images, layer);
        let written = t.elapsed();
        let usage = disk_usage(dir.path());
        let t = Instant::now();
        let inv = evict::scan(dir.path());
        scan.push(t.elapsed().as_secs_f64());
        let blobs = inv.blob_bytes.len();
        let limits = Limits { high: usage - 1, low: usage / 10 * 6, expire_before: None };
        let t = Instant::now();
        let plan = evict::plan(&inv, usage, limits, |_: &Unit| false);
        choose.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let freed = evict::apply(dir.path(), &inv, &plan).unwrap();
        delete.push(t.elapsed().as_secs_f64());
        freed_all.push(freed as f64);
        // The oldest go: every evicted image is older than every kept one.
        let gone: BTreeSet<usize> = plan.units.clone().into_iter().collect();
        let newest_gone = gone.iter().map(|&i| inv.units[i].last_pulled).max().unwrap();
        let oldest_kept = (0..inv.units.len()).filter(|i| !gone.contains(i)).map(|i| inv.units[i].last_pulled).min();
        assert!(oldest_kept.is_none_or(|k| k > newest_gone), "not least recently pulled first");
        line = format!(
            "store: {images} images, {blobs} blobs, {:.2} GiB on disk (written in {:.1}s); evicted {} images, freed {:.2} GiB, {:.2} GiB left",
            usage as f64 / (1u64 << 30) as f64,
            written.as_secs_f64(),
            plan.units.len(),
            freed as f64 / (1u64 << 30) as f64,
            disk_usage(dir.path()) as f64 / (1u64 << 30) as f64,
        );
        println!(
            "round {round}: {line}; inventory {:.3}s, choice {:.4}s, deletion {:.3}s",
            scan[round], choose[round], delete[round]
        );
    }
    println!(
        "eviction (median of 3): inventory {:.3}s, choice {:.4}s, deletion {:.3}s, total {:.3}s — {line}",
        median(scan.clone()),
        median(choose.clone()),
        median(delete.clone()),
        median(scan.iter().zip(&choose).zip(&delete).map(|((a, b), c)| a + b + c).collect()),
    );
}

/// The replay: upstream fetches under Distribution's rule and the keeper's, same sequence.
fn replay() {
    const DAYS: u64 = 90;
    const IMAGES: usize = 300;
    const PULLS_PER_DAY: usize = 400;
    const TTL: u64 = 7 * 86400;
    const CHECK: u64 = 300;
    let mut rng = fastrand::Rng::with_seed(42);
    let weights: Vec<f64> = (0..IMAGES).map(|k| 1.0 / (k as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let mut pulls: Vec<(u64, usize)> = Vec::new();
    for day in 0..DAYS {
        for _ in 0..PULLS_PER_DAY {
            let mut x = rng.f64() * total;
            let image = weights.iter().position(|w| {
                x -= w;
                x <= 0.0
            });
            pulls.push((day * 86400 + rng.u64(0..86400), image.unwrap_or(IMAGES - 1)));
        }
    }
    pulls.sort();

    // Distribution: cached_at per image; expired (removed) once now >= cached_at + ttl.
    let mut cached_at: Vec<Option<u64>> = vec![None; IMAGES];
    let mut distribution_misses = 0;
    for &(t, i) in &pulls {
        match cached_at[i] {
            Some(c) if t < c + TTL => {}
            _ => {
                distribution_misses += 1;
                cached_at[i] = Some(t);
            }
        }
    }

    // The keeper: units with last pull; every CHECK seconds, evict::plan removes the expired.
    let epoch = SystemTime::UNIX_EPOCH;
    let unit = |i: usize, last: u64| Unit {
        repository: format!("img{i}"),
        root: Some(format!("sha256:{i:064}")),
        manifests: BTreeSet::from([format!("sha256:{i:064}")]),
        blobs: BTreeSet::new(),
        tags: vec!["v1".into()],
        linked_from: Vec::new(),
        last_pulled: epoch + Duration::from_secs(last),
        link_bytes: 0,
    };
    let mut last_pull: Vec<Option<u64>> = vec![None; IMAGES];
    let mut keeper_misses = 0;
    let mut next_check = CHECK;
    for &(t, i) in &pulls {
        while next_check <= t {
            let inv = evict::Inventory {
                units: (0..IMAGES).filter_map(|k| last_pull[k].map(|l| unit(k, l))).collect(),
                blob_bytes: Default::default(),
            };
            let limits = Limits {
                high: u64::MAX,
                low: 0,
                expire_before: Some(epoch + Duration::from_secs(next_check.saturating_sub(TTL))),
            };
            for u in evict::plan(&inv, 0, limits, |_: &Unit| false).units {
                let k: usize = inv.units[u].repository[3..].parse().unwrap();
                last_pull[k] = None;
            }
            next_check += CHECK;
        }
        if last_pull[i].is_none() {
            keeper_misses += 1;
        }
        last_pull[i] = Some(t);
    }
    println!(
        "expiry replay: {} pulls of {IMAGES} images over {DAYS} days (Zipf-like, seed 42), ttl 7 days: upstream fetches {distribution_misses} with Distribution's rule (from first caching), {keeper_misses} with expiry by last pull: {:.2}x fewer ({} saved)",
        pulls.len(),
        distribution_misses as f64 / keeper_misses as f64,
        distribution_misses - keeper_misses
    );
}

fn main() {
    replay();
    eviction();
}
