//! Files on the node: ownership markers, atomic writes and careful removal.
//!
//! Every file the agent owns starts with [`MANAGED_MARKER`] followed by
//! `(RegistryMirror <namespace>/<name>)`. The agent reads that first line before it replaces or
//! removes anything, and never follows a symlink: a file without the marker (or marked for another
//! RegistryMirror) is someone else's and is reported, never touched.
//!
//! Writes go to a temp file in the same directory, are fsynced, then renamed over the target and
//! the directory is fsynced: a reader (containerd reads `hosts.toml` on every pull) sees either
//! the old or the new file, and a crash at any point leaves the old file intact. A crash can leave
//! a temp file behind; [`remove_stale_temp_files`] clears ours on the next run.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::build::node::MANAGED_MARKER;

/// Mode of files without credentials (containerd, Podman and Docker read them as root anyway).
pub const MODE_PUBLIC: u32 = 0o644;
/// Mode of files carrying an Authorization header.
pub const MODE_SECRET: u32 = 0o600;
/// Infix of the agent's temp files: `.<target name>.mirrorfleet-<random>.tmp`.
const TEMP_INFIX: &str = ".mirrorfleet-";
const TEMP_SUFFIX: &str = ".tmp";
/// Longest first line we read when checking ownership; markers are short.
const MAX_MARKER_LINE: usize = 4096;

/// Fault injection for the crash-safety test (hidden `--fault-abort-before-rename` flag): abort
/// the process after the temp file is durable and before it is renamed over the target.
static ABORT_BEFORE_RENAME: AtomicBool = AtomicBool::new(false);

pub fn set_abort_before_rename(on: bool) {
    ABORT_BEFORE_RENAME.store(on, Ordering::SeqCst);
}

pub use crate::build::node::marker_line;

/// Who a file belongs to, judged by its first line only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// No file (or directory entry) at the path.
    Absent,
    /// Carries our marker for this RegistryMirror.
    Us,
    /// Carries the marker of another RegistryMirror (`namespace/name`).
    OtherMirror(String),
    /// Anything else: no marker, a symlink, a directory, unreadable bytes.
    Foreign(String),
}

/// The mirror reference in a marker line, `None` when the line is not a marker.
pub fn parse_marker(first_line: &str) -> Option<&str> {
    let rest = first_line.strip_prefix(MANAGED_MARKER)?;
    let rest = rest.strip_prefix(" (RegistryMirror ")?;
    let end = rest.find(')')?;
    let mirror = &rest[..end];
    (!mirror.is_empty() && mirror.split('/').count() == 2 && !mirror.contains(char::is_whitespace)).then_some(mirror)
}

/// Ownership of `content` (a whole file's bytes) for `mirror_ref`.
pub fn owner_of_bytes(content: &[u8], mirror_ref: &str) -> Owner {
    let first = content.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = &first[..first.len().min(MAX_MARKER_LINE)];
    let Ok(line) = std::str::from_utf8(first) else {
        return Owner::Foreign("first line is not UTF-8".into());
    };
    match parse_marker(line.trim_end_matches('\r')) {
        Some(m) if m == mirror_ref => Owner::Us,
        Some(m) => Owner::OtherMirror(m.to_string()),
        None => Owner::Foreign("no mirrorfleet marker on the first line".into()),
    }
}

/// Ownership of the file at `path`, without following symlinks.
pub fn owner_of(path: &Path, mirror_ref: &str) -> io::Result<Owner> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Owner::Absent),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return Ok(Owner::Foreign("a symlink".into()));
    }
    if !meta.is_file() {
        return Ok(Owner::Foreign("not a regular file".into()));
    }
    let content = fs::read(path)?;
    Ok(owner_of_bytes(&content, mirror_ref))
}

/// True when `path` holds exactly `content` with permission bits `mode`.
pub fn is_current(path: &Path, content: &[u8], mode: u32) -> bool {
    match (fs::symlink_metadata(path), fs::read(path)) {
        (Ok(meta), Ok(existing)) => meta.is_file() && meta.permissions().mode() & 0o7777 == mode && existing == content,
        _ => false,
    }
}

/// A temp file holding the new content, durable on disk but not yet in place.
#[derive(Debug)]
pub struct Staged {
    temp: PathBuf,
    target: PathBuf,
}

fn temp_path(target: &Path) -> io::Result<PathBuf> {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no file name", target.display())))?;
    let random: u64 = fastrand::u64(..);
    Ok(target.with_file_name(format!(".{name}{TEMP_INFIX}{random:016x}{TEMP_SUFFIX}")))
}

/// Writes `content` to a fresh temp file next to `target` with `mode`, and fsyncs it.
pub fn stage(target: &Path, content: &[u8], mode: u32) -> io::Result<Staged> {
    let temp = temp_path(target)?;
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp)?;
        // The mode given to open() is filtered by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(Staged { temp, target: target.to_path_buf() }),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

impl Staged {
    /// Renames the temp file over the target and makes the rename durable.
    pub fn commit(self) -> io::Result<()> {
        if ABORT_BEFORE_RENAME.load(Ordering::SeqCst) {
            eprintln!("fault injection: aborting before renaming {}", self.temp.display());
            std::process::abort();
        }
        if let Err(e) = fs::rename(&self.temp, &self.target) {
            let _ = fs::remove_file(&self.temp);
            return Err(e);
        }
        sync_parent(&self.target)
    }

    pub fn temp_path(&self) -> &Path {
        &self.temp
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// [`stage`] then [`Staged::commit`].
pub fn write_atomic(target: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    stage(target, content, mode)?.commit()
}

/// What [`remove_if_ours`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    Removed,
    Absent,
    /// Not ours; left alone.
    Kept(Owner),
}

/// Removes `path` only if it carries our marker for `mirror_ref`, then removes its directory
/// if that became empty (a `certs.d/<registry>` dir the agent created).
pub fn remove_if_ours(path: &Path, mirror_ref: &str, remove_empty_parent: bool) -> io::Result<Removal> {
    match owner_of(path, mirror_ref)? {
        Owner::Absent => Ok(Removal::Absent),
        Owner::Us => {
            fs::remove_file(path)?;
            sync_parent(path)?;
            if remove_empty_parent {
                if let Some(dir) = path.parent() {
                    // Fails (and is meant to) when anything else lives there, e.g. a ca.crt.
                    let _ = fs::remove_dir(dir);
                }
            }
            Ok(Removal::Removed)
        }
        other => Ok(Removal::Kept(other)),
    }
}

/// Removes temp files left in `dir` by an agent of `mirror_ref` that died between writing and
/// renaming. Temp files of other mirrors and foreign files are left alone.
pub fn remove_stale_temp_files(dir: &Path, mirror_ref: &str) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with('.') && name.contains(TEMP_INFIX) && name.ends_with(TEMP_SUFFIX)) {
            continue;
        }
        if owner_of(&entry.path(), mirror_ref)? == Owner::Us {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A single path component that is safe to join under a directory the agent writes:
/// no separators, not `.`/`..`, no NUL, not hidden.
pub fn safe_component(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::node::{hosts_toml, NodeRegistry};

    const ME: &str = "mirrors/public";

    #[test]
    fn hosts_toml_from_the_builder_carries_our_marker() {
        let entry = NodeRegistry {
            registry: "docker.io".into(),
            upstream: "dockerhub".into(),
            mirror: "http://10.0.0.1:5000".into(),
            fallback: None,
            dial_timeout: None,
        };
        let text = hosts_toml(ME, &entry, None);
        assert_eq!(owner_of_bytes(text.as_bytes(), ME), Owner::Us);
        assert_eq!(owner_of_bytes(text.as_bytes(), "other/mirror"), Owner::OtherMirror(ME.into()));
        assert_eq!(text.lines().next().unwrap(), marker_line(ME));
    }

    #[test]
    fn markers_that_only_look_alike_are_foreign() {
        for line in [
            "",
            "# managed-by: mirrorfleet",
            "# managed-by: mirrorfleet (RegistryMirror )",
            "# managed-by: mirrorfleet (RegistryMirror mirrors)",
            "# managed-by: mirrorfleet (RegistryMirror a/b/c)",
            "  # managed-by: mirrorfleet (RegistryMirror mirrors/public)",
            "server = \"https://registry-1.docker.io\"",
        ] {
            assert!(matches!(owner_of_bytes(line.as_bytes(), ME), Owner::Foreign(_)), "{line:?} should be foreign");
        }
        // The marker must be on the FIRST line; further down it means nothing.
        let sneaky = format!("server = \"x\"\n{}\n", marker_line(ME));
        assert!(matches!(owner_of_bytes(sneaky.as_bytes(), ME), Owner::Foreign(_)));
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts.toml");
        write_atomic(&p, b"one", MODE_SECRET).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        write_atomic(&p, b"two", MODE_PUBLIC).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(is_current(&p, b"two", MODE_PUBLIC));
        assert!(!is_current(&p, b"two", MODE_SECRET));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn staged_but_not_committed_leaves_old_file_and_temp_is_cleaned_later() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts.toml");
        let old = format!("{}\nold\n", marker_line(ME));
        write_atomic(&p, old.as_bytes(), MODE_PUBLIC).unwrap();
        let staged = stage(&p, format!("{}\nnew\n", marker_line(ME)).as_bytes(), MODE_PUBLIC).unwrap();
        let temp = staged.temp_path().to_path_buf();
        drop(staged); // the "crash": never renamed
        assert_eq!(fs::read_to_string(&p).unwrap(), old);
        assert!(temp.exists());
        // Someone else's file that happens to look like a temp name is not ours to delete.
        let foreign_temp = dir.path().join(".hosts.toml.mirrorfleet-0000.tmp");
        fs::write(&foreign_temp, "not ours").unwrap();
        assert_eq!(remove_stale_temp_files(dir.path(), ME).unwrap(), 1);
        assert!(!temp.exists());
        assert!(foreign_temp.exists());
    }

    #[test]
    fn removal_only_takes_marked_files() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("docker.io");
        fs::create_dir(&reg).unwrap();
        let p = reg.join("hosts.toml");
        fs::write(&p, "server = \"https://registry-1.docker.io\"\n").unwrap();
        assert!(matches!(remove_if_ours(&p, ME, true).unwrap(), Removal::Kept(Owner::Foreign(_))));
        fs::write(&p, format!("{}\n", marker_line("other/mirror"))).unwrap();
        assert_eq!(remove_if_ours(&p, ME, true).unwrap(), Removal::Kept(Owner::OtherMirror("other/mirror".into())));
        fs::write(&p, format!("{}\n", marker_line(ME))).unwrap();
        fs::write(reg.join("ca.crt"), "cert").unwrap();
        assert_eq!(remove_if_ours(&p, ME, true).unwrap(), Removal::Removed);
        assert!(reg.exists(), "the directory still holds someone's ca.crt");
        assert_eq!(remove_if_ours(&p, ME, true).unwrap(), Removal::Absent);
    }

    #[test]
    fn symlinks_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.toml");
        fs::write(&real, format!("{}\n", marker_line(ME))).unwrap();
        let link = dir.path().join("hosts.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(owner_of(&link, ME).unwrap(), Owner::Foreign(_)));
        assert!(matches!(remove_if_ours(&link, ME, false).unwrap(), Removal::Kept(_)));
        assert!(real.exists() && link.exists());
    }

    #[test]
    fn unsafe_components_are_refused() {
        for bad in ["", ".", "..", "../etc", "a/b", ".hidden", "a\0b", "x\ny"] {
            assert!(!safe_component(bad), "{bad:?}");
        }
        for good in ["docker.io", "registry.example.com:5000", "_default"] {
            assert!(safe_component(good), "{good:?}");
        }
    }
}
