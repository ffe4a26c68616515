//! One pass of the agent: from the desired node config, the node-auth header and the mirrors'
//! health to the files on disk, and a [`Report`] of what this node now has.
//!
//! Rules, in the order they are checked for each registry:
//! 1. a path that is not ours (no marker, another mirror's marker, a symlink) is never touched;
//!    the registry is reported as a conflict;
//! 2. `removing` (the mirror is going away): our files are removed, nothing else;
//! 3. client auth is on but the node-auth Secret is not there yet: nothing is written (a mirror
//!    that answers 401 only costs every pull a round trip);
//! 4. with a fallback, a mirror probed Down is withdrawn (our file removed) so pulls go straight
//!    upstream instead of waiting on a dead dial — for a plain-HTTP upstream the file is rewritten
//!    to name the upstream alone, since without one containerd would speak TLS to it; an unprobed
//!    mirror leaves the file as it is;
//!    mirror-only (air-gapped) entries are never withdrawn: there is nothing to fall back to;
//! 5. otherwise the file is written if its bytes or mode differ.
//!
//! With a peer (`nodeConfig.peers`) probed Up, every file names it first, before the mirror (or,
//! while the mirror is withdrawn, before the upstream); a peer that is Down or not probed yet is
//! left out. The peer is a shortcut, not a requirement: its health never makes the node unready.
//!
//! With an edge CA in the config (`via: Edge`), each entry is two files: the CA
//! (`mirrorfleet-edge-ca.crt`, marked like the rest) and the `hosts.toml` naming it as the
//! mirror's `ca`. The CA is written before the `hosts.toml` that needs it and removed after it,
//! so containerd never reads a `ca` path that is not there (it would fail the pull, not skip the
//! mirror); a CA file that is not ours is a conflict like a foreign `hosts.toml`.
//!
//! Afterwards every `certs.d/*/hosts.toml` (and edge CA) carrying this mirror's marker that the
//! config no longer lists is removed (stale after a config change or a restart).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde::Serialize;

use super::containerd::{self, ConfigPathCheck};
use super::files::{self, Owner, Removal};
use super::probe::Health;
use super::{crio, docker};
use crate::build::node::{
    edge_ca_certificates, edge_ca_file, edge_ca_path, hosts_toml_peer_then_upstream, hosts_toml_upstream_only,
    hosts_toml_with_peer, NodeConfig, NodeRegistry, PeerHost, EDGE_CA_FILE,
};

/// What this pass did to one registry's entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum EntryState {
    Written,
    Unchanged,
    /// Not on disk on purpose (mirror down, credentials missing); pulls go upstream.
    Withdrawn {
        reason: String,
    },
    /// Left as it was until the mirror has been probed once.
    Pending {
        reason: String,
    },
    /// Someone else's file is in the way; left untouched.
    Conflict {
        reason: String,
    },
    Failed {
        error: String,
    },
    /// Removed because the mirror is going away.
    Removed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryOutcome {
    pub registry: String,
    pub mirror: String,
    pub health: Health,
    #[serde(flatten)]
    pub state: EntryState,
}

/// One opt-in runtime (CRI-O drop-in, Docker daemon.json).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeOutcome {
    pub runtime: String,
    pub path: String,
    #[serde(flatten)]
    pub state: EntryState,
    /// Registries the file routes to a mirror right now.
    pub registries: Vec<String>,
    /// Caveat to say even when all is well (e.g. "needs SIGHUP").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub mirror: String,
    pub removing: bool,
    pub registries: Vec<RegistryOutcome>,
    pub runtimes: Vec<RuntimeOutcome>,
    pub containerd: ConfigPathCheck,
    /// `certs.d` entries of this mirror removed because the config no longer lists them.
    pub removed_stale: Vec<String>,
    /// Errors not tied to one registry (unreadable certs dir, ...).
    pub errors: Vec<String>,
    /// The peer, when the config has one: where it is on this node and whether it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerOutcome>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerOutcome {
    pub endpoint: String,
    /// Up: named first in every file; otherwise left out.
    pub health: Health,
}

impl Report {
    /// The config was processed: every decision was carried out (conflicts and withdrawals are
    /// decisions; I/O failures are not). What the Pod annotation reports to the controller.
    pub fn applied(&self) -> bool {
        self.errors.is_empty()
            && !self.registries.iter().any(|r| matches!(r.state, EntryState::Failed { .. }))
            && !self.runtimes.iter().any(|r| matches!(r.state, EntryState::Failed { .. }))
    }

    /// Why this node is not fully configured; empty means ready.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.removing {
            out.push(format!("RegistryMirror {} is being removed; its files are gone from this node", self.mirror));
            return out;
        }
        for r in &self.registries {
            match &r.state {
                EntryState::Written | EntryState::Unchanged => {
                    if let Health::Down { reason } = &r.health {
                        out.push(format!(
                            "{}: mirror {} unreachable ({reason}); mirror-only, pulls fail",
                            r.registry, r.mirror
                        ));
                    }
                }
                EntryState::Withdrawn { reason } => out.push(format!("{}: entry withdrawn: {reason}", r.registry)),
                EntryState::Pending { reason } => out.push(format!("{}: {reason}", r.registry)),
                EntryState::Conflict { reason } => out.push(format!("{}: {reason}", r.registry)),
                EntryState::Failed { error } => out.push(format!("{}: {error}", r.registry)),
                EntryState::Removed => {}
            }
        }
        for rt in &self.runtimes {
            match &rt.state {
                EntryState::Conflict { reason } | EntryState::Pending { reason } => {
                    out.push(format!("{} {}: {reason}", rt.runtime, rt.path))
                }
                EntryState::Failed { error } => out.push(format!("{} {}: {error}", rt.runtime, rt.path)),
                _ => {}
            }
        }
        if self.containerd.blocks() {
            out.push(self.containerd.describe());
        }
        out.extend(self.errors.iter().cloned());
        out
    }
}

/// Everything one pass needs.
pub struct Inputs<'a> {
    pub config: &'a NodeConfig,
    /// The Authorization header value from the node-auth Secret.
    pub authorization: Option<&'a str>,
    pub health: &'a BTreeMap<String, Health>,
    /// containerd's config.toml as mounted into the agent, when given.
    pub containerd_config: Option<&'a Path>,
    /// The peer's endpoint on this node ([`crate::build::node::PeerConfig::resolve`]), when the
    /// config has a peer.
    pub peer_endpoint: Option<Result<&'a str, &'a str>>,
}

impl Inputs<'_> {
    /// The peer as files name it: only while it answers.
    fn peer_host(&self) -> Option<PeerHost<'_>> {
        let peer = self.config.peer.as_ref()?;
        let endpoint = self.peer_endpoint?.ok()?;
        (self.health.get(endpoint) == Some(&Health::Up)).then_some(PeerHost {
            endpoint,
            dial_timeout: &peer.dial_timeout,
            registry_header: peer.registry_header.as_deref(),
        })
    }
}

/// What the file for `entry` should be, or why there is none.
enum Want {
    /// `withdrawn`: the file names the upstream only, because the mirror is down (the reason).
    File {
        content: String,
        mode: u32,
        withdrawn: Option<String>,
    },
    Absent {
        reason: String,
    },
    Keep {
        reason: String,
    },
}

fn want_for(inputs: &Inputs, entry: &NodeRegistry, health: &Health) -> Want {
    let header = if inputs.config.authenticate {
        match inputs.authorization {
            Some(a) => Some(a),
            None => return Want::Absent { reason: "waiting for the node-auth Secret (client auth is on)".into() },
        }
    } else {
        None
    };
    let peer = inputs.peer_host();
    if entry.fallback.is_some() {
        match health {
            Health::Down { reason } => {
                let reason = format!("mirror {} unreachable ({reason}); pulls go upstream", entry.mirror);
                return match entry.fallback.as_deref() {
                    Some(upstream) if peer.is_some() => Want::File {
                        content: hosts_toml_peer_then_upstream(
                            &inputs.config.mirror,
                            entry,
                            peer.as_ref().expect("checked"),
                            upstream,
                        ),
                        mode: files::MODE_PUBLIC,
                        withdrawn: Some(reason),
                    },
                    Some(upstream) if upstream.starts_with("http://") => Want::File {
                        content: hosts_toml_upstream_only(&inputs.config.mirror, upstream),
                        mode: files::MODE_PUBLIC,
                        withdrawn: Some(reason),
                    },
                    _ => Want::Absent { reason },
                };
            }
            Health::Unknown => return Want::Keep { reason: format!("mirror {} not probed yet", entry.mirror) },
            Health::Up => {}
        }
    }
    let mode = if header.is_some() { files::MODE_SECRET } else { files::MODE_PUBLIC };
    let config = inputs.config;
    let ca_path = config.edge_ca.as_ref().map(|_| edge_ca_path(&config.containerd.certs_dir, &entry.registry));
    let content = hosts_toml_with_peer(&config.mirror, entry, peer.as_ref(), header, ca_path.as_deref());
    Want::File { content, mode, withdrawn: None }
}

/// The healthy-enough entries other runtimes should route to their mirror: with a fallback only
/// Up mirrors; mirror-only entries always.
pub fn routable<'a>(config: &'a NodeConfig, health: &BTreeMap<String, Health>) -> Vec<&'a NodeRegistry> {
    config.registries.iter().filter(|e| e.fallback.is_none() || health.get(&e.mirror) == Some(&Health::Up)).collect()
}

pub fn apply(inputs: &Inputs) -> Report {
    let config = inputs.config;
    let mut report = Report {
        mirror: config.mirror.clone(),
        removing: config.removing,
        registries: Vec::new(),
        runtimes: Vec::new(),
        containerd: match inputs.containerd_config {
            Some(file) if !config.removing => containerd::check_config_file(file, &config.containerd.certs_dir),
            _ => ConfigPathCheck::NotChecked,
        },
        removed_stale: Vec::new(),
        errors: Vec::new(),
        peer: None,
    };
    match inputs.peer_endpoint.filter(|_| !config.removing) {
        Some(Ok(endpoint)) => {
            let health = inputs.health.get(endpoint).cloned().unwrap_or(Health::Unknown);
            report.peer = Some(PeerOutcome { endpoint: endpoint.to_string(), health });
        }
        Some(Err(why)) => report.errors.push(why.to_string()),
        None => {}
    }
    let certs = Path::new(&config.containerd.certs_dir);
    let mut listed = BTreeSet::new();
    // The controller only sends certificates; anything else would make containerd fail every
    // pull of the registry rather than skip the mirror, so it is never written.
    let ca_error = config.edge_ca.as_deref().and_then(|pem| edge_ca_certificates(pem).err());
    if !config.removing {
        if let Err(e) = fs::create_dir_all(certs) {
            report.errors.push(format!("creating {}: {e}", certs.display()));
        }
        for entry in &config.registries {
            let health = inputs.health.get(&entry.mirror).cloned().unwrap_or(Health::Unknown);
            let state = match &ca_error {
                Some(why) => EntryState::Failed { error: format!("the node config's edge CA {why}; nothing written") },
                None => apply_entry(inputs, certs, entry, &health),
            };
            if files::safe_component(&entry.registry) {
                listed.insert(entry.registry.clone());
            }
            report.registries.push(RegistryOutcome {
                registry: entry.registry.clone(),
                mirror: entry.mirror.clone(),
                health,
                state,
            });
        }
    }
    remove_unlisted(certs, &config.mirror, &listed, &mut report);
    if let Some(c) = &config.crio {
        report.runtimes.push(crio::apply(config, c, inputs.authorization, inputs.health));
    }
    if let Some(d) = &config.docker {
        report.runtimes.push(docker::apply(config, d, inputs.health));
    }
    report
}

fn apply_entry(inputs: &Inputs, certs: &Path, entry: &NodeRegistry, health: &Health) -> EntryState {
    let mirror_ref = &inputs.config.mirror;
    if !files::safe_component(&entry.registry) {
        return EntryState::Failed {
            error: format!("registry name {:?} is not a safe directory name", entry.registry),
        };
    }
    let dir = certs.join(&entry.registry);
    if fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        return EntryState::Conflict {
            reason: format!("{} exists and is not a directory; left untouched", dir.display()),
        };
    }
    let path = dir.join("hosts.toml");
    match files::owner_of(&path, mirror_ref) {
        Err(e) => return EntryState::Failed { error: format!("reading {}: {e}", path.display()) },
        Ok(Owner::Foreign(why)) => {
            return EntryState::Conflict {
                reason: format!("{} was not written by mirrorfleet ({why}); left untouched", path.display()),
            }
        }
        Ok(Owner::OtherMirror(other)) => {
            return EntryState::Conflict {
                reason: format!("{} belongs to RegistryMirror {other}; left untouched", path.display()),
            }
        }
        Ok(Owner::Us | Owner::Absent) => {}
    }
    let ca_path = dir.join(EDGE_CA_FILE);
    // The edge CA file we want there, if any.
    let ca_content = inputs.config.edge_ca.as_ref().map(|bundle| edge_ca_file(mirror_ref, bundle));
    let ca_ours = match files::owner_of(&ca_path, mirror_ref) {
        Err(e) => return EntryState::Failed { error: format!("reading {}: {e}", ca_path.display()) },
        Ok(Owner::Us) => true,
        Ok(Owner::Absent) => false,
        // Someone else's file under our name: in the way only when we need to write a CA.
        Ok(Owner::Foreign(why)) if ca_content.is_some() => {
            return EntryState::Conflict {
                reason: format!("{} was not written by mirrorfleet ({why}); left untouched", ca_path.display()),
            }
        }
        Ok(Owner::OtherMirror(other)) if ca_content.is_some() => {
            return EntryState::Conflict {
                reason: format!("{} belongs to RegistryMirror {other}; left untouched", ca_path.display()),
            }
        }
        Ok(_) => false,
    };
    if let Err(e) = files::remove_stale_temp_files(&dir, mirror_ref) {
        return EntryState::Failed { error: format!("cleaning temp files in {}: {e}", dir.display()) };
    }
    match want_for(inputs, entry, health) {
        Want::Keep { reason } => EntryState::Pending { reason },
        Want::Absent { reason } => match remove_entry(&dir, mirror_ref) {
            Ok(Removal::Removed | Removal::Absent) => EntryState::Withdrawn { reason },
            // Lost a race with someone writing the file between our checks.
            Ok(Removal::Kept(_)) => {
                EntryState::Conflict { reason: format!("{} changed hands; left untouched", path.display()) }
            }
            Err(e) => EntryState::Failed { error: format!("removing {}: {e}", path.display()) },
        },
        Want::File { content, mode, withdrawn } => {
            let ca_current = match &ca_content {
                Some(ca) => files::is_current(&ca_path, ca.as_bytes(), files::MODE_PUBLIC),
                None => !ca_ours,
            };
            if ca_current && files::is_current(&path, content.as_bytes(), mode) {
                return match withdrawn {
                    Some(reason) => EntryState::Withdrawn { reason },
                    None => EntryState::Unchanged,
                };
            }
            // The CA first: the hosts.toml that names it must never be there without it.
            let result = fs::create_dir_all(&dir)
                .and_then(|()| match &ca_content {
                    Some(ca) if !ca_current => files::write_atomic(&ca_path, ca.as_bytes(), files::MODE_PUBLIC),
                    _ => Ok(()),
                })
                .and_then(|()| {
                    if files::is_current(&path, content.as_bytes(), mode) {
                        Ok(())
                    } else {
                        files::write_atomic(&path, content.as_bytes(), mode)
                    }
                })
                // A CA the config no longer carries goes once no hosts.toml names it.
                .and_then(|()| match (&ca_content, ca_ours) {
                    (None, true) => files::remove_if_ours(&ca_path, mirror_ref, false).map(drop),
                    _ => Ok(()),
                });
            match (result, withdrawn) {
                (Ok(()), Some(reason)) => EntryState::Withdrawn { reason },
                (Ok(()), None) => EntryState::Written,
                (Err(e), _) => EntryState::Failed { error: format!("writing {}: {e}", path.display()) },
            }
        }
    }
}

/// Removes our `hosts.toml` in `dir`, then our edge CA (never before the file that names it),
/// then `dir` itself if that left it empty (a `certs.d/<registry>` dir the agent created; anything
/// else living there, an admin's `ca.crt`, keeps it). Returns what became of the `hosts.toml`.
fn remove_entry(dir: &Path, mirror_ref: &str) -> std::io::Result<Removal> {
    let hosts = files::remove_if_ours(&dir.join("hosts.toml"), mirror_ref, false)?;
    if matches!(hosts, Removal::Kept(_)) {
        // Someone else's hosts.toml may name the CA file; leave both.
        return Ok(hosts);
    }
    let ca = files::remove_if_ours(&dir.join(EDGE_CA_FILE), mirror_ref, false)?;
    if hosts == Removal::Removed || ca == Removal::Removed {
        let _ = fs::remove_dir(dir);
    }
    Ok(hosts)
}

/// Removes this mirror's `hosts.toml` from every `certs.d` subdirectory not in `listed`.
fn remove_unlisted(certs: &Path, mirror_ref: &str, listed: &BTreeSet<String>, report: &mut Report) {
    let entries = match fs::read_dir(certs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            report.errors.push(format!("listing {}: {e}", certs.display()));
            return;
        }
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if listed.contains(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path().join("hosts.toml");
        if let Err(e) = files::remove_stale_temp_files(&entry.path(), mirror_ref) {
            report.errors.push(format!("cleaning temp files in {}: {e}", entry.path().display()));
        }
        match remove_entry(&entry.path(), mirror_ref) {
            Ok(Removal::Removed) => {
                if report.removing {
                    report.registries.push(RegistryOutcome {
                        registry: name.clone(),
                        mirror: String::new(),
                        health: Health::Unknown,
                        state: EntryState::Removed,
                    });
                } else {
                    report.removed_stale.push(name);
                }
            }
            Ok(_) => {}
            Err(e) => report.errors.push(format!("removing {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::node::{edge_ca_file, hosts_toml, ContainerdConfig, TEST_CA_PEM};
    use std::os::unix::fs::PermissionsExt;

    const ME: &str = "mirrors/public";

    fn config(certs: &Path, fallback: bool) -> NodeConfig {
        NodeConfig {
            mirror: ME.into(),
            containerd: ContainerdConfig { certs_dir: certs.display().to_string() },
            authenticate: false,
            registries: vec![
                NodeRegistry {
                    registry: "docker.io".into(),
                    upstream: "dockerhub".into(),
                    mirror: "http://10.0.0.1:5000".into(),
                    fallback: fallback.then(|| "https://registry-1.docker.io".into()),
                    dial_timeout: None,
                },
                NodeRegistry {
                    registry: "ghcr.io".into(),
                    upstream: "ghcr".into(),
                    mirror: "http://10.0.0.2:5000".into(),
                    fallback: fallback.then(|| "https://ghcr.io".into()),
                    dial_timeout: None,
                },
            ],
            removing: false,
            crio: None,
            docker: None,
            edge_ca: None,
            peer: None,
        }
    }

    fn all(h: Health) -> BTreeMap<String, Health> {
        ["http://10.0.0.1:5000", "http://10.0.0.2:5000"].iter().map(|e| (e.to_string(), h.clone())).collect()
    }

    fn run(cfg: &NodeConfig, auth: Option<&str>, health: &BTreeMap<String, Health>) -> Report {
        apply(&Inputs { config: cfg, authorization: auth, health, containerd_config: None, peer_endpoint: None })
    }

    fn states(r: &Report) -> Vec<(&str, &EntryState)> {
        r.registries.iter().map(|o| (o.registry.as_str(), &o.state)).collect()
    }

    #[test]
    fn writes_then_is_idempotent_and_ready() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), true);
        let r = run(&cfg, None, &all(Health::Up));
        assert_eq!(states(&r), vec![("docker.io", &EntryState::Written), ("ghcr.io", &EntryState::Written)]);
        assert!(r.applied() && r.problems().is_empty(), "{:?}", r.problems());
        let text = fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap();
        assert_eq!(text, hosts_toml(ME, &cfg.registries[0], None));
        let r = run(&cfg, None, &all(Health::Up));
        assert_eq!(states(&r), vec![("docker.io", &EntryState::Unchanged), ("ghcr.io", &EntryState::Unchanged)]);
    }

    #[test]
    fn auth_header_file_is_0600_and_missing_secret_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), true);
        cfg.authenticate = true;
        let r = run(&cfg, None, &all(Health::Up));
        assert!(r.registries.iter().all(|o| matches!(o.state, EntryState::Withdrawn { .. })));
        assert!(!d.path().join("docker.io/hosts.toml").exists());
        assert!(!r.problems().is_empty());
        run(&cfg, Some("Basic dTpw"), &all(Health::Up));
        let p = d.path().join("docker.io/hosts.toml");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(fs::read_to_string(&p).unwrap().contains("Authorization = \"Basic dTpw\""));
    }

    #[test]
    fn down_mirror_is_withdrawn_with_fallback_but_kept_mirror_only() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), true);
        run(&cfg, None, &all(Health::Up));
        let down = all(Health::Down { reason: "refused".into() });
        let r = run(&cfg, None, &down);
        assert!(r.registries.iter().all(|o| matches!(o.state, EntryState::Withdrawn { .. })));
        assert!(!d.path().join("docker.io/hosts.toml").exists());
        assert!(!d.path().join("docker.io").exists(), "the directory we created goes too");
        run(&cfg, None, &all(Health::Up));
        assert!(d.path().join("docker.io/hosts.toml").exists(), "restored");

        let only = config(d.path(), false);
        let r = run(&only, None, &down);
        assert!(r.registries.iter().all(|o| o.state == EntryState::Written), "{r:?}");
        assert!(r.problems().iter().any(|p| p.contains("mirror-only")));
    }

    #[test]
    fn down_mirror_of_a_plain_http_upstream_leaves_a_file_naming_the_upstream_alone() {
        // Without a file containerd would try https://10.200.0.1:5001, which a plain-HTTP
        // registry answers with "server gave HTTP response to HTTPS client" (seen on a real node).
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), true);
        cfg.registries[0].registry = "10.200.0.1:5001".into();
        cfg.registries[0].fallback = Some("http://10.200.0.1:5001".into());
        cfg.authenticate = true;
        run(&cfg, Some("Basic bm9kZXM6cHc="), &all(Health::Up));
        let path = d.path().join("10.200.0.1:5001/hosts.toml");
        assert!(fs::read_to_string(&path).unwrap().contains("[host.\"http://10.0.0.1:5000\"]"));
        let r = run(&cfg, Some("Basic bm9kZXM6cHc="), &all(Health::Down { reason: "refused".into() }));
        assert!(r.registries.iter().all(|o| matches!(o.state, EntryState::Withdrawn { .. })), "{r:?}");
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, hosts_toml_upstream_only(ME, "http://10.200.0.1:5001"));
        assert!(text.contains("server = \"http://10.200.0.1:5001\""), "{text}");
        assert!(!text.contains("10.0.0.1") && !text.contains("Authorization"), "no mirror, no header: {text}");
        assert!(!d.path().join("docker.io").exists(), "https fallbacks are still withdrawn by removal");
        // Steady while down; the mirror back restores the entry.
        let again = run(&cfg, Some("Basic bm9kZXM6cHc="), &all(Health::Down { reason: "refused".into() }));
        assert!(again.registries.iter().all(|o| matches!(o.state, EntryState::Withdrawn { .. })));
        run(&cfg, Some("Basic bm9kZXM6cHc="), &all(Health::Up));
        assert!(fs::read_to_string(&path).unwrap().contains("[host.\"http://10.0.0.1:5000\"]"), "restored");
    }

    #[test]
    fn unprobed_mirror_leaves_existing_file_alone() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), true);
        run(&cfg, None, &all(Health::Up));
        let before = fs::read(d.path().join("docker.io/hosts.toml")).unwrap();
        let r = run(&cfg, None, &BTreeMap::new());
        assert!(r.registries.iter().all(|o| matches!(o.state, EntryState::Pending { .. })));
        assert_eq!(fs::read(d.path().join("docker.io/hosts.toml")).unwrap(), before);
    }

    #[test]
    fn foreign_and_other_mirror_files_are_conflicts_left_byte_identical() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), true);
        fs::create_dir_all(d.path().join("docker.io")).unwrap();
        fs::create_dir_all(d.path().join("ghcr.io")).unwrap();
        let foreign = b"server = \"https://registry-1.docker.io\"\n[host.\"http://mine:5000\"]\n";
        fs::write(d.path().join("docker.io/hosts.toml"), foreign).unwrap();
        let other = format!("{}\nserver = \"x\"\n", files::marker_line("team/other"));
        fs::write(d.path().join("ghcr.io/hosts.toml"), &other).unwrap();
        for health in [Health::Up, Health::Down { reason: "x".into() }] {
            let r = run(&cfg, None, &all(health));
            assert!(r.registries.iter().all(|o| matches!(o.state, EntryState::Conflict { .. })), "{r:?}");
            assert_eq!(fs::read(d.path().join("docker.io/hosts.toml")).unwrap(), foreign);
            assert_eq!(fs::read_to_string(d.path().join("ghcr.io/hosts.toml")).unwrap(), other);
        }
        let mut removing = cfg.clone();
        removing.removing = true;
        run(&removing, None, &all(Health::Up));
        assert_eq!(fs::read(d.path().join("docker.io/hosts.toml")).unwrap(), foreign);
        assert_eq!(fs::read_to_string(d.path().join("ghcr.io/hosts.toml")).unwrap(), other);
    }

    #[test]
    fn stale_entries_of_this_mirror_go_and_removal_takes_only_ours() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), true);
        run(&cfg, None, &all(Health::Up));
        // Someone else's registry dir with their own file, and another mirror's file.
        fs::create_dir_all(d.path().join("quay.io")).unwrap();
        fs::write(d.path().join("quay.io/hosts.toml"), "server = \"https://quay.io\"\n").unwrap();
        fs::create_dir_all(d.path().join("gcr.io")).unwrap();
        fs::write(d.path().join("gcr.io/hosts.toml"), format!("{}\n", files::marker_line("x/y"))).unwrap();
        cfg.registries.pop();
        let r = run(&cfg, None, &all(Health::Up));
        assert_eq!(r.removed_stale, vec!["ghcr.io".to_string()]);
        assert!(!d.path().join("ghcr.io").exists());
        cfg.removing = true;
        let r = run(&cfg, None, &all(Health::Up));
        assert!(r.applied());
        assert_eq!(states(&r), vec![("docker.io", &EntryState::Removed)]);
        assert!(!d.path().join("docker.io").exists());
        assert!(d.path().join("quay.io/hosts.toml").exists() && d.path().join("gcr.io/hosts.toml").exists());
    }

    #[test]
    fn removal_as_the_controller_sends_it_without_registries_still_removes_everything_ours() {
        // The controller's removal config keeps the mirror and runtimes but drops the registries.
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), true);
        run(&cfg, None, &all(Health::Up));
        let removing = NodeConfig { registries: Vec::new(), removing: true, ..cfg };
        let r = run(&removing, None, &BTreeMap::new());
        assert!(r.applied() && r.problems().len() == 1, "{r:?}");
        let removed: Vec<&str> = r.registries.iter().map(|o| o.registry.as_str()).collect();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0, "nothing of ours left");
    }

    /// `config` with https edge mirrors and the test CA, as the controller sends it for `via: Edge`.
    fn edge_config(certs: &Path, fallback: bool) -> NodeConfig {
        let mut cfg = config(certs, fallback);
        for (e, host) in cfg.registries.iter_mut().zip(["https://hub.mirror.test", "https://ghcr.mirror.test"]) {
            e.mirror = host.into();
        }
        cfg.edge_ca = Some(TEST_CA_PEM.into());
        cfg
    }

    fn edge_health(h: Health) -> BTreeMap<String, Health> {
        ["https://hub.mirror.test", "https://ghcr.mirror.test"].iter().map(|e| (e.to_string(), h.clone())).collect()
    }

    #[test]
    fn the_edge_ca_is_written_beside_hosts_toml_and_named_as_the_mirrors_ca() {
        let d = tempfile::tempdir().unwrap();
        let cfg = edge_config(d.path(), true);
        let r = run(&cfg, None, &edge_health(Health::Up));
        assert!(r.applied() && r.problems().is_empty(), "{r:?}");
        let ca = d.path().join("docker.io/mirrorfleet-edge-ca.crt");
        assert_eq!(fs::read_to_string(&ca).unwrap(), edge_ca_file(ME, TEST_CA_PEM));
        assert_eq!(files::owner_of(&ca, ME).unwrap(), Owner::Us);
        assert_eq!(fs::metadata(&ca).unwrap().permissions().mode() & 0o777, 0o644);
        let text = fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["host"]["https://hub.mirror.test"]["ca"].as_str(), Some(ca.to_str().unwrap()), "{text}");
        let r = run(&cfg, None, &edge_health(Health::Up));
        assert!(r.registries.iter().all(|o| o.state == EntryState::Unchanged), "{r:?}");

        // A CA rotation rewrites the CA file; the hosts.toml is already right.
        let mut rotated = cfg.clone();
        rotated.edge_ca = Some(format!("{TEST_CA_PEM}{TEST_CA_PEM}"));
        let r = run(&rotated, None, &edge_health(Health::Up));
        assert!(r.registries.iter().all(|o| o.state == EntryState::Written), "{r:?}");
        assert_eq!(fs::read_to_string(&ca).unwrap(), edge_ca_file(ME, &format!("{TEST_CA_PEM}{TEST_CA_PEM}")));

        // The config stops carrying a CA (the key left the Secret): hosts.toml first, then the CA.
        let mut plain = cfg.clone();
        plain.edge_ca = None;
        run(&plain, None, &edge_health(Health::Up));
        assert!(!ca.exists());
        assert!(!fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap().contains("ca ="));
    }

    #[test]
    fn the_edge_ca_goes_with_its_hosts_toml_on_withdrawal_staleness_and_removal() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = edge_config(d.path(), true);
        run(&cfg, None, &edge_health(Health::Up));
        let r = run(&cfg, None, &edge_health(Health::Down { reason: "refused".into() }));
        assert!(r.registries.iter().all(|o| matches!(o.state, EntryState::Withdrawn { .. })), "{r:?}");
        assert!(!d.path().join("docker.io").exists(), "hosts.toml, CA and the directory we created are gone");
        run(&cfg, None, &edge_health(Health::Up));
        assert!(d.path().join("ghcr.io/mirrorfleet-edge-ca.crt").exists());
        // An admin's file in the same directory keeps it (and is never touched).
        fs::write(d.path().join("docker.io/ca.crt"), "admin's").unwrap();
        cfg.registries.pop();
        let r = run(&cfg, None, &edge_health(Health::Up));
        assert_eq!(r.removed_stale, vec!["ghcr.io".to_string()]);
        assert!(!d.path().join("ghcr.io").exists());
        cfg.removing = true;
        run(&cfg, None, &BTreeMap::new());
        let left: Vec<_> = fs::read_dir(d.path().join("docker.io")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["ca.crt"]);
    }

    #[test]
    fn a_foreign_file_under_the_ca_name_is_a_conflict_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let cfg = edge_config(d.path(), true);
        fs::create_dir_all(d.path().join("docker.io")).unwrap();
        let foreign = d.path().join("docker.io/mirrorfleet-edge-ca.crt");
        fs::write(&foreign, "someone's PEM\n").unwrap();
        let r = run(&cfg, None, &edge_health(Health::Up));
        assert!(matches!(r.registries[0].state, EntryState::Conflict { .. }), "{r:?}");
        assert_eq!(r.registries[1].state, EntryState::Written);
        assert!(!d.path().join("docker.io/hosts.toml").exists(), "no hosts.toml naming a CA we did not write");
        // Without a CA in the config the file is not in our way, and still not ours to touch.
        let mut plain = cfg.clone();
        plain.edge_ca = None;
        let r = run(&plain, None, &edge_health(Health::Up));
        assert_eq!(r.registries[0].state, EntryState::Written, "{r:?}");
        plain.removing = true;
        run(&plain, None, &BTreeMap::new());
        assert_eq!(fs::read_to_string(&foreign).unwrap(), "someone's PEM\n");
    }

    #[test]
    fn an_edge_ca_that_is_no_certificate_is_never_written() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = edge_config(d.path(), true);
        cfg.edge_ca = Some("not a certificate".into());
        let r = run(&cfg, None, &edge_health(Health::Up));
        assert!(r.registries.iter().all(|o| matches!(o.state, EntryState::Failed { .. })), "{r:?}");
        assert!(!r.applied());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn path_tricks_in_registry_names_fail_without_touching_anything() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), true);
        cfg.registries[0].registry = "../escape".into();
        let r = run(&cfg, None, &all(Health::Up));
        assert!(matches!(r.registries[0].state, EntryState::Failed { .. }));
        assert!(!d.path().parent().unwrap().join("escape").exists());
        assert!(!r.applied());
    }

    const PEER: &str = "http://10.0.0.9:30020";

    fn with_peer(cfg: &mut NodeConfig, header: Option<&str>) {
        cfg.peer = Some(crate::build::node::PeerConfig {
            endpoint: "http://${NODE_IP}:30020".into(),
            dial_timeout: "200ms".into(),
            registry_header: header.map(str::to_string),
        });
    }

    fn run_with_peer(cfg: &NodeConfig, health: &BTreeMap<String, Health>, peer: Result<&str, &str>) -> Report {
        apply(&Inputs { config: cfg, authorization: None, health, containerd_config: None, peer_endpoint: Some(peer) })
    }

    /// The `[host."..."]` tables of a hosts.toml, in file order (containerd's order of trying).
    fn hosts_in_order(text: &str) -> Vec<String> {
        text.lines().filter_map(|l| l.strip_prefix("[host.\"")?.strip_suffix("\"]").map(str::to_string)).collect()
    }

    #[test]
    fn a_healthy_peer_comes_first_then_the_mirror_then_the_upstream() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), true);
        with_peer(&mut cfg, None);
        let mut health = all(Health::Up);
        health.insert(PEER.into(), Health::Up);
        let r = run_with_peer(&cfg, &health, Ok(PEER));
        assert!(r.applied() && r.problems().is_empty(), "{:?}", r.problems());
        assert_eq!(r.peer, Some(PeerOutcome { endpoint: PEER.into(), health: Health::Up }));
        let text = fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap();
        assert_eq!(hosts_in_order(&text), [PEER, "http://10.0.0.1:5000"], "{text}");
        assert!(text.contains("server = \"https://registry-1.docker.io\""), "{text}");
        let peer_table = &text[text.find(PEER).unwrap()..text.find("http://10.0.0.1:5000").unwrap()];
        assert!(peer_table.contains("dial_timeout = \"200ms\"") && !peer_table.contains("header"), "{peer_table}");
        toml::from_str::<toml::Value>(&text).expect("valid TOML");
    }

    #[test]
    fn a_dead_or_unprobed_peer_is_left_out_and_the_node_stays_ready() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), true);
        with_peer(&mut cfg, None);
        for peer_health in [Health::Down { reason: "connection refused".into() }, Health::Unknown] {
            let mut health = all(Health::Up);
            health.insert(PEER.into(), peer_health.clone());
            let r = run_with_peer(&cfg, &health, Ok(PEER));
            assert!(r.problems().is_empty(), "a peer is a shortcut, never a requirement: {:?}", r.problems());
            let text = fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap();
            assert_eq!(hosts_in_order(&text), ["http://10.0.0.1:5000"], "{peer_health:?}: {text}");
            assert_eq!(text, hosts_toml(ME, &cfg.registries[0], None));
        }
    }

    #[test]
    fn with_the_mirror_withdrawn_a_healthy_peer_still_comes_before_the_upstream() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), true);
        with_peer(&mut cfg, Some("X-Dragonfly-Registry"));
        let mut health = all(Health::Down { reason: "i/o timeout".into() });
        health.insert(PEER.into(), Health::Up);
        let r = run_with_peer(&cfg, &health, Ok(PEER));
        assert!(r.registries.iter().all(|o| matches!(o.state, EntryState::Withdrawn { .. })), "{:?}", states(&r));
        let text = fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap();
        assert_eq!(hosts_in_order(&text), [PEER], "the dead mirror is gone, the upstream is the server: {text}");
        assert!(text.contains("server = \"https://registry-1.docker.io\""), "{text}");
        // Dragonfly learns where the registry really is; the header carries no credential.
        assert!(text.contains("X-Dragonfly-Registry = \"https://registry-1.docker.io\""), "{text}");
        // The peer dies too: the file goes, as without a peer (containerd asks the upstream).
        health.insert(PEER.into(), Health::Down { reason: "refused".into() });
        run_with_peer(&cfg, &health, Ok(PEER));
        assert!(!d.path().join("docker.io/hosts.toml").exists());
    }

    #[test]
    fn a_peer_endpoint_the_agent_cannot_resolve_is_a_problem_and_the_mirror_is_still_written() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), true);
        with_peer(&mut cfg, None);
        let r = run_with_peer(&cfg, &all(Health::Up), Err("the peer endpoint needs NODE_IP"));
        assert!(r.problems().iter().any(|p| p.contains("needs NODE_IP")), "{:?}", r.problems());
        let text = fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap();
        assert_eq!(hosts_in_order(&text), ["http://10.0.0.1:5000"]);
    }
}
