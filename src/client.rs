//! The Kubernetes API client every subcommand talks through, and the watch settings that go with
//! it. Two timeouts must agree:
//!
//! - Every request has a read timeout ([`API_READ_TIMEOUT`]): a request caught by an API server
//!   restart on a half-closed connection is dropped and made again instead of hanging for good
//!   (kube sets none by default).
//! - Every watch asks the API server to end it after [`WATCH_TIMEOUT_SECONDS`], shorter than that
//!   read timeout. A watch of a kind nothing changes may send nothing at all until the server ends
//!   it (bookmarks are not guaranteed in a quiet cluster); with kube-runtime's default of 290 s
//!   the read timeout cut every idle watch after 75 s as if its connection were dead. The watcher
//!   resumes an ended watch from its last resourceVersion, without a new list.
//!
//! kube-runtime's own idle detection (the watch timeout plus 5 s) also stays below the read
//! timeout, so a dead watch is restarted by the watcher before the client gives up on it.

use std::time::Duration;

use anyhow::Context as _;
use kube::runtime::watcher;

/// How long a response may go silent before the request is dropped and made again.
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(75);

/// Seconds after which the API server ends a watch (`timeoutSeconds`); see the module doc.
pub const WATCH_TIMEOUT_SECONDS: u32 = 60;

/// The margin kube-runtime's watcher adds to the watch timeout before it takes a silent watch
/// for dead (`WATCH_IDLE_TIMEOUT_MARGIN` in kube-runtime's watcher; not exported).
pub const WATCHER_IDLE_MARGIN: Duration = Duration::from_secs(5);

/// The base of every watch: ended by the server before [`API_READ_TIMEOUT`]. Add selectors to it;
/// never start from `watcher::Config::default()`, whose 290 s outlasts the read timeout.
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT_SECONDS)
}

/// Whether a watch with `cfg` ends (by the server, or by the watcher's idle detection) before
/// the client's read timeout would cut it.
pub fn watch_ends_before_read_timeout(cfg: &watcher::Config) -> bool {
    // kube-runtime's default when no timeout is set.
    let server = Duration::from_secs(u64::from(cfg.timeout.unwrap_or(290)));
    server > Duration::ZERO && server + WATCHER_IDLE_MARGIN < API_READ_TIMEOUT
}

/// `config` with the read timeout set, unless the caller chose one.
pub fn with_read_timeout(mut config: kube::Config) -> kube::Config {
    if config.read_timeout.is_none() {
        config.read_timeout = Some(API_READ_TIMEOUT);
        // Counted from when the request was sent, not from when its pooled connection idled.
        config.reset_reader_on_write = true;
    }
    config
}

/// A client from the in-cluster config or KUBECONFIG, with the read timeout: for the node agent
/// and the cleanup Job (the controller adds request counting, [`crate::controller`]).
pub async fn infer() -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer().await.context("finding the cluster (in-cluster config or KUBECONFIG)")?;
    kube::Client::try_from(with_read_timeout(config)).context("building the API client")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every watch the operator and the node agent build, by what it watches.
    fn every_watch_config() -> Vec<(String, watcher::Config)> {
        let mut all: Vec<(String, watcher::Config)> = crate::controller::WatchConfigs::default()
            .all()
            .into_iter()
            .map(|(what, cfg)| (format!("controller: {what}"), cfg.clone()))
            .collect();
        // Both of the agent's watches (its ConfigMap, its Secret) are built by `named`.
        all.push(("node agent: one object by name".into(), crate::agent::source::named("node-config")));
        all
    }

    #[test]
    fn every_watch_ends_before_the_read_timeout_cuts_it() {
        let all = every_watch_config();
        assert!(all.len() >= 6, "{} watch configs found", all.len());
        for (what, cfg) in &all {
            assert!(
                watch_ends_before_read_timeout(cfg),
                "{what}: a watch of {:?} s is cut by the {:?} read timeout while idle",
                cfg.timeout,
                API_READ_TIMEOUT
            );
        }
        // kube-runtime's default (290 s) would be cut: the check itself can fail.
        assert!(!watch_ends_before_read_timeout(&watcher::Config::default()));
        assert!(!watch_ends_before_read_timeout(&watcher::Config::default().timeout(0)));
    }

    #[test]
    fn the_read_timeout_is_set_unless_chosen() {
        let config = || kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        assert_eq!(with_read_timeout(config()).read_timeout, Some(API_READ_TIMEOUT));
        let mut chosen = config();
        chosen.read_timeout = Some(Duration::from_secs(5));
        assert_eq!(with_read_timeout(chosen).read_timeout, Some(Duration::from_secs(5)));
    }

    /// A watch added later cannot miss the invariant by starting from kube-runtime's default.
    #[test]
    fn no_watch_config_starts_from_the_default_outside_this_module() {
        fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    rust_files(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let this = src.join("client.rs");
        let offenders: Vec<_> = files
            .iter()
            .filter(|f| **f != this)
            .filter(|f| std::fs::read_to_string(f).unwrap().contains("watcher::Config::default()"))
            .collect();
        assert!(offenders.is_empty(), "use crate::client::watch_config() in {offenders:?}");
    }
}
