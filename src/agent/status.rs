//! What the node reports: the status file the readiness probe reads, the Pod annotation the
//! controller reads, and Events people read.
//!
//! `status.json` in `--status-dir` is rewritten after every pass (at least every resync period).
//! `node-agent-ready` exits 0 only when the last pass found the node fully configured and every
//! mirror reachable, and that pass is recent: a wedged agent stops being ready on its own.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::files;

pub const STATUS_FILE: &str = "status.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub ready: bool,
    /// Why the node is not ready; empty when ready.
    pub problems: Vec<String>,
    /// `node_config_checksum` of the config last applied.
    pub applied_checksum: Option<String>,
    /// Seconds since the epoch of the pass that wrote this.
    pub updated_unix: u64,
    /// The full report of that pass (for `kubectl exec ... cat`).
    pub report: serde_json::Value,
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn write(dir: &Path, status: &Status) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(status).expect("status serializes") + "\n";
    files::write_atomic(&dir.join(STATUS_FILE), text.as_bytes(), files::MODE_PUBLIC)
}

pub fn read(dir: &Path) -> Result<Status, String> {
    let path = dir.join(STATUS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("no status yet ({}: {e})", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is corrupt: {e}", path.display()))
}

/// The readiness verdict: Ok, or the reasons to print.
pub fn check_ready(dir: &Path, max_age: Duration) -> Result<(), String> {
    let status = read(dir)?;
    let age = now_unix().saturating_sub(status.updated_unix);
    if age > max_age.as_secs() {
        return Err(format!("status is {age} s old (agent stuck?); last problems: {:?}", status.problems));
    }
    if status.ready {
        Ok(())
    } else if status.problems.is_empty() {
        Err("not ready".into())
    } else {
        Err(status.problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(ready: bool, updated_unix: u64) -> Status {
        Status {
            node: "n1".into(),
            ready,
            problems: if ready { vec![] } else { vec!["docker.io: entry withdrawn".into()] },
            applied_checksum: Some("abc".into()),
            updated_unix,
            report: serde_json::Value::Null,
        }
    }

    #[test]
    fn ready_only_when_ready_and_fresh() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_ready(d.path(), Duration::from_secs(60)).unwrap_err().contains("no status"));
        write(d.path(), &status(true, now_unix())).unwrap();
        assert_eq!(check_ready(d.path(), Duration::from_secs(60)), Ok(()));
        write(d.path(), &status(true, now_unix() - 120)).unwrap();
        assert!(check_ready(d.path(), Duration::from_secs(60)).unwrap_err().contains("old"));
        write(d.path(), &status(false, now_unix())).unwrap();
        assert!(check_ready(d.path(), Duration::from_secs(60)).unwrap_err().contains("withdrawn"));
        std::fs::write(d.path().join(STATUS_FILE), "{").unwrap();
        assert!(check_ready(d.path(), Duration::from_secs(60)).unwrap_err().contains("corrupt"));
    }
}
