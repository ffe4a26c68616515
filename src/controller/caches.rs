//! The proxies' caches in the mirror's status: what each replica's cache keeper reports
//! (`GET /status`, [`KeeperStatus`]), summed per upstream, and the fill and hit-ratio columns of
//! `kubectl get registrymirrors`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::api::{CacheEviction, CachePrefetch, UpstreamCache, UpstreamStatus};
use crate::cache::keeper::KeeperStatus;
use crate::cache::prefetch::PrefetchReport;

/// One upstream's caches from its replicas' keepers; None when no keeper answered.
pub fn aggregate(replicas: &[KeeperStatus]) -> Option<UpstreamCache> {
    if replicas.is_empty() {
        return None;
    }
    let sum = |f: fn(&KeeperStatus) -> u64| replicas.iter().map(f).sum::<u64>() as i64;
    let fill = |s: &KeeperStatus| (s.bytes * 100).checked_div(s.capacity_bytes).unwrap_or(0) as i32;
    let counted: Vec<_> = replicas.iter().filter_map(|s| s.registry).collect();
    let (hits, misses) = if counted.is_empty() {
        (None, None)
    } else {
        (
            Some(counted.iter().map(|r| r.blob_hits).sum::<u64>() as i64),
            Some(counted.iter().map(|r| r.blob_misses).sum::<u64>() as i64),
        )
    };
    let images: Vec<u64> = replicas.iter().filter_map(|s| s.images.map(|n| n as u64)).collect();
    let last = replicas.iter().filter_map(|s| s.last_eviction.as_ref()).max_by_key(|e| e.time);
    let rounds: Vec<&PrefetchReport> = replicas.iter().filter_map(|s| s.prefetch.as_ref()).collect();
    let newest = rounds.iter().max_by_key(|r| r.time);
    Some(UpstreamCache {
        bytes: sum(|s| s.bytes),
        capacity_bytes: sum(|s| s.capacity_bytes),
        fill_percent: replicas.iter().map(fill).max().unwrap_or(0),
        images: (!images.is_empty()).then(|| images.iter().sum::<u64>() as i64),
        hits,
        misses,
        hit_ratio_percent: ratio(hits, misses),
        bytes_served_from_cache: (!counted.is_empty())
            .then(|| counted.iter().map(|r| r.bytes_served_from_cache).sum::<u64>() as i64),
        last_eviction: last.map(|e| CacheEviction {
            time: time(e.time),
            bytes: e.bytes as i64,
            images: e.images as i64,
            expired: e.expired as i64,
            names: e.names.clone(),
        }),
        last_prefetch: newest.map(|r| CachePrefetch {
            time: time(r.time),
            images: r.images as i64,
            failed: r.failed.len() as i64,
            bytes: r.bytes as i64,
            replicas: rounds.len() as i64,
            message: r.failed.join("; ").chars().take(1000).collect(),
        }),
    })
}

fn time(unix: i64) -> Time {
    Time(Timestamp::from_second(unix).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Events for prefetch rounds newer than the last status showed: (warning, reason, note).
pub fn events(old: &[UpstreamStatus], new: &[UpstreamStatus]) -> Vec<(bool, String, String)> {
    let prefetch = |u: &UpstreamStatus| u.cache.as_ref().and_then(|c| c.last_prefetch.clone());
    let mut out = Vec::new();
    for n in new {
        let Some(p) = prefetch(n) else { continue };
        let before = old.iter().find(|o| o.name == n.name).and_then(prefetch);
        if before.as_ref().is_some_and(|b| b.time == p.time) {
            continue;
        }
        if p.failed == 0 {
            out.push((
                false,
                "Prefetched".to_string(),
                format!("upstream {}: {} images ({} bytes) cached ahead of use", n.name, p.images, p.bytes),
            ));
        } else {
            out.push((
                true,
                "PrefetchFailed".to_string(),
                format!("upstream {}: {} of {} images not prefetched: {}", n.name, p.failed, p.images, p.message),
            ));
        }
    }
    out
}

fn ratio(hits: Option<i64>, misses: Option<i64>) -> Option<i32> {
    let (h, m) = (hits?, misses?);
    (h + m > 0).then(|| (h * 100 / (h + m)) as i32)
}

/// The `Cache` and `Hits` columns: the fullest cache of any upstream, and the hit ratio of all
/// together.
pub fn columns(upstreams: &[UpstreamStatus]) -> (Option<String>, Option<String>) {
    let caches: Vec<&UpstreamCache> = upstreams.iter().filter_map(|u| u.cache.as_ref()).collect();
    let fill = caches.iter().map(|c| c.fill_percent).max().map(|f| format!("{f}%"));
    let sum = |f: fn(&UpstreamCache) -> Option<i64>| {
        let v: Vec<i64> = caches.iter().filter_map(|c| f(c)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<i64>())
    };
    let hits = ratio(sum(|c| c.hits), sum(|c| c.misses)).map(|r| format!("{r}%"));
    (fill, hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::keeper::{Eviction, ProxyCounters};

    fn replica(bytes: u64, capacity: u64, hits: Option<(u64, u64)>, evicted_at: Option<i64>) -> KeeperStatus {
        KeeperStatus {
            bytes,
            capacity_bytes: capacity,
            images: Some(3),
            registry: hits.map(|(h, m)| ProxyCounters { blob_hits: h, blob_misses: m, ..Default::default() }),
            last_eviction: evicted_at.map(|t| Eviction { time: t, bytes: 10, images: 1, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn replicas_sum_the_fullest_sets_the_fill_and_the_newest_eviction_wins() {
        assert_eq!(aggregate(&[]), None);
        let c =
            aggregate(&[replica(30, 100, Some((9, 1)), Some(100)), replica(90, 100, Some((1, 9)), Some(200))]).unwrap();
        assert_eq!((c.bytes, c.capacity_bytes, c.fill_percent, c.images), (120, 200, 90, Some(6)));
        assert_eq!((c.hits, c.misses, c.hit_ratio_percent), (Some(10), Some(10), Some(50)));
        assert_eq!(c.last_eviction.unwrap().time.0.as_second(), 200);
        // Distribution 2.8 replicas: no counters, no ratio.
        let c = aggregate(&[replica(1, 10, None, None)]).unwrap();
        assert_eq!((c.hits, c.hit_ratio_percent, c.last_eviction), (None, None, None));
    }

    #[test]
    fn a_new_prefetch_round_is_an_event_and_a_failed_one_a_warning() {
        let round = |time: i64, failed: Vec<String>| KeeperStatus {
            prefetch: Some(PrefetchReport { time, images: 2, failed, bytes: 5, seconds: 1.0 }),
            ..Default::default()
        };
        let up = |k: &[KeeperStatus]| UpstreamStatus { name: "hub".into(), cache: aggregate(k), ..Default::default() };
        let first = up(&[round(100, vec![]), round(90, vec![])]);
        assert_eq!(first.cache.as_ref().unwrap().last_prefetch.as_ref().unwrap().replicas, 2);
        let e = events(&[], std::slice::from_ref(&first));
        assert_eq!((e.len(), e[0].0, e[0].1.as_str()), (1, false, "Prefetched"));
        assert!(events(std::slice::from_ref(&first), std::slice::from_ref(&first)).is_empty());
        let failed = up(&[round(200, vec!["x:1: manifest 1: HTTP 404".into()])]);
        let e = events(std::slice::from_ref(&first), std::slice::from_ref(&failed));
        assert_eq!((e[0].0, e[0].1.as_str()), (true, "PrefetchFailed"));
        assert!(e[0].2.contains("1 of 2") && e[0].2.contains("HTTP 404"), "{e:?}");
    }

    #[test]
    fn the_columns_show_the_fullest_cache_and_the_ratio_of_all() {
        let up = |cache: Option<UpstreamCache>| UpstreamStatus { cache, ..Default::default() };
        let a = aggregate(&[replica(50, 100, Some((3, 1)), None)]);
        let b = aggregate(&[replica(70, 100, Some((1, 3)), None)]);
        assert_eq!(columns(&[up(a), up(b), up(None)]), (Some("70%".into()), Some("50%".into())));
        assert_eq!(columns(&[up(None)]), (None, None));
    }
}
