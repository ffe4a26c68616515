//! CRI-O, Podman, Buildah, Skopeo: one `containers-registries.conf.d` drop-in per mirror,
//! `<dropInDir>/mirrorfleet-<namespace>-<name>.conf`, wholly owned by the agent (marker on the
//! first line).
//!
//! Podman, Buildah and Skopeo read the drop-ins on every run. CRI-O caches them and re-reads on
//! SIGHUP (`systemctl reload crio`); the agent never signals a runtime, so for CRI-O a change
//! lands on its next reload.
//!
//! The format has no place for an Authorization header, so with client auth the drop-in is not
//! written (and the node reports why): credentials for the mirror host would have to come from
//! the runtime's auth file, which the agent does not manage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::apply::{routable, EntryState, RuntimeOutcome};
use super::files::{self, Owner, Removal};
use super::probe::Health;
use crate::build::node::{CrioConfig, NodeConfig, NodeRegistry};

/// `mirrorfleet-<namespace>-<name>.conf`; the namespace keeps two mirrors of the same name apart.
pub fn drop_in_path(config: &NodeConfig, crio: &CrioConfig) -> PathBuf {
    Path::new(&crio.drop_in_dir).join(format!("mirrorfleet-{}.conf", config.mirror.replace('/', "-")))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `host[:port][/path]` and whether it is plain HTTP, from a mirror URL.
fn location(mirror: &str) -> Option<(String, bool)> {
    let url = url::Url::parse(mirror).ok()?;
    let host = url.host_str()?;
    let mut loc = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let path = url.path().trim_end_matches('/');
    loc.push_str(path);
    Some((loc, url.scheme() == "http"))
}

/// The drop-in text for `entries` (registries.conf v2 syntax).
pub fn drop_in(mirror_ref: &str, entries: &[&NodeRegistry]) -> Result<String, String> {
    let mut out = format!(
        "{}\n# Podman/Buildah/Skopeo read this on every run; CRI-O on SIGHUP (systemctl reload crio).\n",
        files::marker_line(mirror_ref)
    );
    for e in entries {
        let (loc, insecure) = location(&e.mirror).ok_or_else(|| format!("mirror {:?} is not a URL", e.mirror))?;
        out.push_str(&format!("\n[[registry]]\nprefix = {}\n", toml_str(&e.registry)));
        if let Some(fallback) = &e.fallback {
            out.push_str(&format!("location = {}\n", toml_str(&e.registry)));
            // A plain-HTTP upstream (its remoteURL is http:// at the registry's own name, see
            // `upstream_server`): without this the runtime speaks TLS to it and the fallback fails.
            if fallback.starts_with("http://") {
                out.push_str("insecure = true\n");
            }
            out.push_str(&format!("\n[[registry.mirror]]\nlocation = {}\ninsecure = {insecure}\n", toml_str(&loc)));
        } else {
            // Mirror only: the mirror is the registry, nothing else is tried.
            out.push_str(&format!("location = {}\ninsecure = {insecure}\n", toml_str(&loc)));
        }
    }
    Ok(out)
}

pub fn apply(
    config: &NodeConfig,
    crio: &CrioConfig,
    authorization: Option<&str>,
    health: &BTreeMap<String, Health>,
) -> RuntimeOutcome {
    let path = drop_in_path(config, crio);
    let mut outcome = RuntimeOutcome {
        runtime: "crio".into(),
        path: path.display().to_string(),
        state: EntryState::Unchanged,
        registries: Vec::new(),
        note: Some("CRI-O applies changes on SIGHUP (systemctl reload crio); the agent never signals it".into()),
    };
    match files::owner_of(&path, &config.mirror) {
        Err(e) => {
            outcome.state = EntryState::Failed { error: format!("reading {}: {e}", path.display()) };
            return outcome;
        }
        Ok(Owner::Foreign(why)) => {
            outcome.state =
                EntryState::Conflict { reason: format!("not written by mirrorfleet ({why}); left untouched") };
            return outcome;
        }
        Ok(Owner::OtherMirror(m)) => {
            outcome.state = EntryState::Conflict { reason: format!("belongs to RegistryMirror {m}; left untouched") };
            return outcome;
        }
        Ok(Owner::Us | Owner::Absent) => {}
    }
    let entries = if config.removing { Vec::new() } else { routable(config, health) };
    let withheld = config.authenticate && !config.removing;
    if entries.is_empty() || withheld {
        let reason = if config.removing {
            None
        } else if withheld {
            Some(
                "client auth is on and registries.conf cannot carry credentials; drop-in not written \
                 (give the runtime the mirror credentials in its auth file)"
                    .to_string(),
            )
        } else {
            Some("no reachable mirror; drop-in withdrawn".to_string())
        };
        outcome.state = match files::remove_if_ours(&path, &config.mirror, false) {
            Err(e) => EntryState::Failed { error: format!("removing {}: {e}", path.display()) },
            Ok(_) if config.removing => EntryState::Removed,
            Ok(_) if withheld => EntryState::Conflict { reason: reason.unwrap_or_default() },
            Ok(_) => EntryState::Withdrawn { reason: reason.unwrap_or_default() },
        };
        return outcome;
    }
    let _ = authorization;
    let text = match drop_in(&config.mirror, &entries) {
        Ok(t) => t,
        Err(error) => {
            outcome.state = EntryState::Failed { error };
            return outcome;
        }
    };
    outcome.registries = entries.iter().map(|e| e.registry.clone()).collect();
    if files::is_current(&path, text.as_bytes(), files::MODE_PUBLIC) {
        return outcome;
    }
    outcome.state = match std::fs::create_dir_all(&crio.drop_in_dir)
        .and_then(|()| files::remove_stale_temp_files(Path::new(&crio.drop_in_dir), &config.mirror).map(|_| ()))
        .and_then(|()| files::write_atomic(&path, text.as_bytes(), files::MODE_PUBLIC))
    {
        Ok(()) => EntryState::Written,
        Err(e) => EntryState::Failed { error: format!("writing {}: {e}", path.display()) },
    };
    outcome
}

/// Removes the drop-in if it is ours; for callers outside a full pass.
pub fn remove(config: &NodeConfig, crio: &CrioConfig) -> std::io::Result<Removal> {
    files::remove_if_ours(&drop_in_path(config, crio), &config.mirror, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(registry: &str, mirror: &str, fallback: bool) -> NodeRegistry {
        NodeRegistry {
            registry: registry.into(),
            upstream: "u".into(),
            mirror: mirror.into(),
            fallback: fallback.then(|| format!("https://{registry}")),
            dial_timeout: None,
        }
    }

    #[test]
    fn drop_in_is_valid_toml_with_mirror_tables() {
        let a = entry("docker.io", "http://10.0.0.1:5000", true);
        let b = entry("ghcr.io", "https://ghcr.mirror.example.com", false);
        let text = drop_in("ns/m", &[&a, &b]).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        let regs = doc["registry"].as_array().unwrap();
        assert_eq!(regs[0]["prefix"].as_str(), Some("docker.io"));
        assert_eq!(regs[0]["location"].as_str(), Some("docker.io"));
        assert_eq!(regs[0]["mirror"][0]["location"].as_str(), Some("10.0.0.1:5000"));
        assert_eq!(regs[0]["mirror"][0]["insecure"].as_bool(), Some(true));
        assert_eq!(regs[1]["location"].as_str(), Some("ghcr.mirror.example.com"));
        assert_eq!(regs[1]["insecure"].as_bool(), Some(false));
        assert!(regs[1].get("mirror").is_none());
        assert_eq!(files::owner_of_bytes(text.as_bytes(), "ns/m"), Owner::Us);
        // An https fallback is left to the runtime's default (TLS required).
        assert!(regs[0].get("insecure").is_none());
    }

    #[test]
    fn a_plain_http_fallback_is_marked_insecure_and_an_https_one_is_not() {
        let mut plain = entry("10.200.0.1:5001", "http://10.0.0.1:5000", true);
        plain.fallback = Some("http://10.200.0.1:5001".into());
        let tls = entry("registry.corp:5000", "http://10.0.0.2:5000", true);
        let text = drop_in("ns/m", &[&plain, &tls]).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        let regs = doc["registry"].as_array().unwrap();
        assert_eq!(regs[0]["location"].as_str(), Some("10.200.0.1:5001"));
        assert_eq!(regs[0]["insecure"].as_bool(), Some(true), "{text}");
        assert_eq!(regs[0]["mirror"][0]["location"].as_str(), Some("10.0.0.1:5000"));
        assert_eq!(regs[1]["location"].as_str(), Some("registry.corp:5000"));
        assert!(regs[1].get("insecure").is_none(), "{text}");
    }
}
