//! Docker: the docker.io mirror in `daemon.json` `registry-mirrors` (dockerd only mirrors Docker
//! Hub). daemon.json belongs to the node's admin, so the agent merges: it parses the file, adds or
//! removes only the mirror URLs it added itself, and keeps every other key and entry. What it added
//! is recorded next to the file in `.mirrorfleet-<namespace>-<name>.json` (marker on the first
//! line), so removal takes exactly that back, even across restarts. A URL the admin had listed
//! already is the admin's and is never recorded or removed.
//!
//! The record is written before daemon.json (listing the union of old and new additions), so a
//! crash between the two can only make the agent remove an entry it might have added, never leave
//! one it added unrecorded. daemon.json is rewritten with sorted keys (serde_json's map order),
//! which keeps every value but not the original key order or formatting.
//!
//! dockerd reads `registry-mirrors` on start and on SIGHUP (`systemctl reload docker`); the agent
//! never signals it. Docker always falls back to Docker Hub, so there is no mirror-only mode.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::apply::{routable, EntryState, RuntimeOutcome};
use super::files::{self, Owner};
use super::probe::Health;
use crate::build::node::{DockerConfig, NodeConfig};

const KEY: &str = "registry-mirrors";

pub fn record_path(config: &NodeConfig, docker: &DockerConfig) -> PathBuf {
    let dir = Path::new(&docker.daemon_json).parent().unwrap_or(Path::new("/"));
    dir.join(format!(".mirrorfleet-{}.json", config.mirror.replace('/', "-")))
}

/// The mirror URLs this mirror's agent recorded as its own additions.
fn read_record(path: &Path, mirror_ref: &str) -> Result<Vec<String>, String> {
    match files::owner_of(path, mirror_ref).map_err(|e| format!("reading {}: {e}", path.display()))? {
        Owner::Absent => Ok(Vec::new()),
        Owner::Us => {
            let text = fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            let json = text.split_once('\n').map(|(_, rest)| rest).unwrap_or("");
            let v: Value = serde_json::from_str(json).map_err(|e| format!("{} is corrupt: {e}", path.display()))?;
            Ok(v.get(KEY)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default())
        }
        other => Err(format!("{} exists and is not this mirror's record ({other:?})", path.display())),
    }
}

fn write_record(path: &Path, mirror_ref: &str, added: &[String]) -> io::Result<()> {
    if added.is_empty() {
        return files::remove_if_ours(path, mirror_ref, false).map(|_| ());
    }
    let body = serde_json::json!({ KEY: added });
    let text = format!("{}\n{}\n", files::marker_line(mirror_ref), body);
    if files::is_current(path, text.as_bytes(), files::MODE_PUBLIC) {
        return Ok(());
    }
    files::write_atomic(path, text.as_bytes(), files::MODE_PUBLIC)
}

/// The merge itself, pure: `daemon` is the parsed daemon.json (an object), `ours_before` what we
/// had added, `want` what we want present. Returns the new object and what we now own.
pub fn merge(
    mut daemon: Map<String, Value>,
    ours_before: &[String],
    want: &[String],
) -> Result<(Map<String, Value>, Vec<String>), String> {
    let current: Vec<String> = match daemon.get(KEY) {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(|| format!("{KEY} holds a non-string: {i}")))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(format!("{KEY} is not a list: {other}")),
    };
    let mut next: Vec<String> =
        current.iter().filter(|m| !ours_before.contains(m) || want.contains(m)).cloned().collect();
    let mut ours = Vec::new();
    for w in want {
        if !current.contains(w) {
            next.push(w.clone());
            ours.push(w.clone());
        } else if ours_before.contains(w) {
            ours.push(w.clone());
        }
        // Otherwise the admin listed it: theirs, never recorded.
    }
    if next != current {
        if next.is_empty() {
            daemon.remove(KEY);
        } else {
            daemon.insert(KEY.into(), Value::Array(next.into_iter().map(Value::String).collect()));
        }
    }
    Ok((daemon, ours))
}

pub fn apply(config: &NodeConfig, docker: &DockerConfig, health: &BTreeMap<String, Health>) -> RuntimeOutcome {
    let path = Path::new(&docker.daemon_json);
    let record = record_path(config, docker);
    let mut outcome = RuntimeOutcome {
        runtime: "docker".into(),
        path: path.display().to_string(),
        state: EntryState::Unchanged,
        registries: Vec::new(),
        note: Some("dockerd reads registry-mirrors on start or SIGHUP (systemctl reload docker)".into()),
    };
    let fail = |mut o: RuntimeOutcome, state| {
        o.state = state;
        o
    };
    let ours_before = match read_record(&record, &config.mirror) {
        Ok(v) => v,
        Err(reason) => return fail(outcome, EntryState::Conflict { reason }),
    };
    let want: Vec<String> = if config.removing {
        Vec::new()
    } else {
        routable(config, health)
            .into_iter()
            .filter(|e| e.registry == "docker.io")
            .map(|e| e.mirror.trim_end_matches('/').to_string())
            .collect()
    };
    let (existing, mode) = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => (None, files::MODE_PUBLIC),
        Err(e) => return fail(outcome, EntryState::Failed { error: format!("reading {}: {e}", path.display()) }),
        Ok(m) if !m.is_file() => {
            return fail(outcome, EntryState::Conflict { reason: "not a regular file; left untouched".into() })
        }
        Ok(m) => match fs::read(path) {
            Ok(bytes) => (Some(bytes), m.permissions().mode() & 0o7777),
            Err(e) => return fail(outcome, EntryState::Failed { error: format!("reading {}: {e}", path.display()) }),
        },
    };
    let daemon = match &existing {
        None => Map::new(),
        Some(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Map::new(),
        Some(bytes) => match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return fail(outcome, EntryState::Conflict { reason: "not a JSON object; left untouched".into() }),
            Err(e) => {
                return fail(outcome, EntryState::Conflict { reason: format!("not valid JSON ({e}); left untouched") })
            }
        },
    };
    let before = daemon.clone();
    let (next, ours) = match merge(daemon, &ours_before, &want) {
        Ok(r) => r,
        Err(reason) => return fail(outcome, EntryState::Conflict { reason: format!("{reason}; left untouched") }),
    };
    outcome.registries = if want.is_empty() { Vec::new() } else { vec!["docker.io".into()] };
    let mut intent: Vec<String> = ours_before.clone();
    intent.extend(ours.iter().filter(|o| !ours_before.contains(o)).cloned());
    let result = (|| -> io::Result<bool> {
        if next == before {
            write_record(&record, &config.mirror, &ours)?;
            return Ok(false);
        }
        write_record(&record, &config.mirror, &intent)?;
        let text = serde_json::to_string_pretty(&Value::Object(next)).expect("JSON serializes") + "\n";
        files::write_atomic(path, text.as_bytes(), mode)?;
        write_record(&record, &config.mirror, &ours)?;
        Ok(true)
    })();
    outcome.state = match result {
        Ok(true) if config.removing => EntryState::Removed,
        Ok(true) => EntryState::Written,
        Ok(false) if config.removing => EntryState::Removed,
        Ok(false) if want.is_empty() && !config.removing => {
            EntryState::Withdrawn { reason: "no reachable docker.io mirror".into() }
        }
        Ok(false) => EntryState::Unchanged,
        Err(e) => EntryState::Failed { error: format!("writing {}: {e}", path.display()) },
    };
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn merge_adds_keeps_foreign_and_removes_only_ours() {
        let daemon = obj(json!({"log-driver": "journald", "registry-mirrors": ["https://admin.example"]}));
        let (next, ours) = merge(daemon, &[], &["http://10.0.0.1:5000".into()]).unwrap();
        assert_eq!(next["registry-mirrors"], json!(["https://admin.example", "http://10.0.0.1:5000"]));
        assert_eq!(next["log-driver"], json!("journald"));
        assert_eq!(ours, vec!["http://10.0.0.1:5000".to_string()]);
        let (back, ours) = merge(next, &ours, &[]).unwrap();
        assert_eq!(back, obj(json!({"log-driver": "journald", "registry-mirrors": ["https://admin.example"]})));
        assert!(ours.is_empty());
    }

    #[test]
    fn an_entry_the_admin_listed_is_never_ours() {
        let daemon = obj(json!({"registry-mirrors": ["http://10.0.0.1:5000"]}));
        let (next, ours) = merge(daemon.clone(), &[], &["http://10.0.0.1:5000".into()]).unwrap();
        assert_eq!(next, daemon);
        assert!(ours.is_empty());
        let (after_removal, _) = merge(next, &ours, &[]).unwrap();
        assert_eq!(after_removal, daemon);
    }

    #[test]
    fn malformed_lists_are_refused() {
        assert!(merge(obj(json!({"registry-mirrors": "x"})), &[], &[]).is_err());
        assert!(merge(obj(json!({"registry-mirrors": [1]})), &[], &[]).is_err());
    }
}
