//! containerd: the `certs.d/<registry>/hosts.toml` files, and whether containerd reads them.
//!
//! containerd's CRI plugin reads `<config_path>/<registry>/hosts.toml` on every pull, so a written
//! file takes effect without a restart, but only when the CRI registry `config_path` names the
//! directory the agent writes. Without it the files are dead weight and the node pulls straight
//! upstream; the agent says so (readiness, Event, log) instead of reporting success.
//!
//! The agent sees containerd's `config.toml` through a read-only mount of its directory (see
//! `node_agent_daemon_set`). `imports` are not followed: a `config_path` set only in an imported
//! drop-in is reported as unknown, not as missing.

use std::path::Path;

use serde::Serialize;

/// Whether containerd will read the files the agent writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum ConfigPathCheck {
    /// The agent was not given containerd's config file.
    NotChecked,
    /// `config_path` includes the directory the agent writes.
    Effective { config_path: String },
    /// config.toml exists but sets no `config_path`: containerd ignores certs.d.
    Missing { file: String },
    /// `config_path` is set, to other directories.
    Elsewhere { config_path: String },
    /// `config_path` together with the legacy `registry.mirrors`: the CRI plugin refuses that.
    Conflict { reason: String },
    /// Could not tell (no file, unreadable, not TOML, `imports`).
    Unknown { reason: String },
}

impl ConfigPathCheck {
    /// True when the written files certainly do not take effect.
    pub fn blocks(&self) -> bool {
        matches!(self, Self::Missing { .. } | Self::Elsewhere { .. } | Self::Conflict { .. })
    }

    pub fn describe(&self) -> String {
        match self {
            Self::NotChecked => "containerd config not checked (no --containerd-config)".into(),
            Self::Effective { config_path } => format!("containerd reads certs.d (config_path = {config_path:?})"),
            Self::Missing { file } => format!(
                "{file} sets no CRI registry config_path: containerd ignores the hosts.toml files; \
                 set config_path to the certs dir and restart containerd"
            ),
            Self::Elsewhere { config_path } => {
                format!("containerd's config_path is {config_path:?}, not the directory this agent writes")
            }
            Self::Conflict { reason } => reason.clone(),
            Self::Unknown { reason } => format!("cannot tell whether containerd reads certs.d: {reason}"),
        }
    }
}

/// Reads and checks containerd's config file at `file` against `certs_dir`.
pub fn check_config_file(file: &Path, certs_dir: &str) -> ConfigPathCheck {
    match std::fs::read_to_string(file) {
        Ok(text) => check_config(&text, &file.display().to_string(), certs_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ConfigPathCheck::Unknown {
            reason: format!(
                "{} does not exist (containerd 1.x defaults then ignore certs.d; 2.x defaults to \
                 /etc/containerd/certs.d)",
                file.display()
            ),
        },
        Err(e) => ConfigPathCheck::Unknown { reason: format!("reading {}: {e}", file.display()) },
    }
}

/// The CRI registry table for each config schema version containerd has had.
fn registry_table(doc: &toml::Table) -> Option<&toml::Table> {
    let version = doc.get("version").and_then(toml::Value::as_integer).unwrap_or(1);
    let plugins = doc.get("plugins")?.as_table()?;
    let plugin = match version {
        // containerd 2.x
        3 => plugins.get("io.containerd.cri.v1.images"),
        2 => plugins.get("io.containerd.grpc.v1.cri"),
        _ => plugins.get("cri"),
    }?;
    plugin.as_table()?.get("registry")?.as_table()
}

/// Checks config.toml text. `file` is only used in messages.
pub fn check_config(text: &str, file: &str, certs_dir: &str) -> ConfigPathCheck {
    let doc: toml::Table = match text.parse() {
        Ok(d) => d,
        Err(e) => return ConfigPathCheck::Unknown { reason: format!("{file} is not valid TOML: {e}") },
    };
    let registry = registry_table(&doc);
    let config_path = registry.and_then(|r| r.get("config_path")).and_then(toml::Value::as_str).unwrap_or("");
    let has_mirrors =
        registry.and_then(|r| r.get("mirrors")).and_then(toml::Value::as_table).is_some_and(|m| !m.is_empty());
    if config_path.is_empty() {
        let imports = doc.get("imports").and_then(toml::Value::as_array).is_some_and(|a| !a.is_empty());
        if imports {
            return ConfigPathCheck::Unknown {
                reason: format!("{file} sets no config_path but has imports, which the agent does not read"),
            };
        }
        return ConfigPathCheck::Missing { file: file.to_string() };
    }
    if has_mirrors {
        return ConfigPathCheck::Conflict {
            reason: format!(
                "{file} sets both config_path and the legacy registry.mirrors; containerd's CRI plugin \
                 refuses to start with both"
            ),
        };
    }
    let want = certs_dir.trim_end_matches('/');
    if config_path.split(':').any(|p| p.trim_end_matches('/') == want) {
        ConfigPathCheck::Effective { config_path: config_path.to_string() }
    } else {
        ConfigPathCheck::Elsewhere { config_path: config_path.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERTS: &str = "/etc/containerd/certs.d";

    fn check(text: &str) -> ConfigPathCheck {
        check_config(text, "config.toml", CERTS)
    }

    #[test]
    fn version_2_with_config_path_is_effective() {
        let t = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d/\"\n";
        assert!(matches!(check(t), ConfigPathCheck::Effective { .. }));
    }

    #[test]
    fn version_3_and_v1_layouts_are_understood() {
        let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/containerd/certs.d:/etc/docker/certs.d'\n";
        assert!(matches!(check(v3), ConfigPathCheck::Effective { .. }));
        let v1 = "[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        assert!(matches!(check(v1), ConfigPathCheck::Effective { .. }));
        // A v2 table in a v3 file is not read by containerd 2.x.
        let wrong = "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        assert!(matches!(check(wrong), ConfigPathCheck::Missing { .. }));
    }

    #[test]
    fn missing_elsewhere_conflict_and_unknown() {
        assert!(check("version = 2\n").blocks());
        assert!(matches!(check("version = 2\n"), ConfigPathCheck::Missing { .. }));
        let other = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/other\"\n";
        assert!(matches!(check(other), ConfigPathCheck::Elsewhere { .. }));
        let both = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n\
                    [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"http://m\"]\n";
        assert!(matches!(check(both), ConfigPathCheck::Conflict { .. }));
        assert!(matches!(
            check("version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n"),
            ConfigPathCheck::Unknown { .. }
        ));
        assert!(matches!(check("not = [toml"), ConfigPathCheck::Unknown { .. }));
        assert!(!check("not = [toml").blocks());
    }
}
