//! skopeo with a private, permissive signature policy, so tests never depend
//! on (or are broken by) the host's /etc/containers.
//!
//! skopeo 1.9.3 gotchas (see notes): the registries.conf to use must be given
//! with the hidden global flag `--registries-conf FILE`, the
//! `CONTAINERS_REGISTRIES_CONF` env var is ignored; and plain `inspect`
//! lists tags from the *primary* location, never a mirror, so with no
//! internet use `--no-tags` or `--raw`.

use super::{require, run, tempdir};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tempfile::TempDir;

pub struct Skopeo {
    bin: PathBuf,
    dir: TempDir,
}

impl Skopeo {
    pub fn new() -> Skopeo {
        let bin = require("skopeo");
        let dir = tempdir();
        fs::write(dir.path().join("policy.json"), r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
        fs::create_dir(dir.path().join("registries.d")).unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        Skopeo { bin, dir }
    }

    /// `skopeo` with the private policy, an empty registries.d (no
    /// signature-storage lookups) and a private tmpdir; add global flags
    /// such as `--registries-conf` before the subcommand.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--policy")
            .arg(self.dir.path().join("policy.json"))
            .arg("--registries.d")
            .arg(self.dir.path().join("registries.d"))
            .arg("--tmpdir")
            .arg(self.dir.path().join("tmp"));
        cmd
    }

    /// `skopeo --registries-conf CONF inspect EXTRA.. IMAGE`, e.g. to prove a
    /// rendered registries.conf routes `docker://docker.io/...` to a mirror.
    pub fn inspect(&self, image: &str, registries_conf: &Path, extra: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.arg("--registries-conf").arg(registries_conf).arg("inspect").args(extra).arg(image);
        run(&mut cmd, Duration::from_secs(60))
    }

    /// `skopeo copy EXTRA.. SRC DST`.
    pub fn copy(&self, src: &str, dst: &str, extra: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.arg("copy").args(extra).arg(src).arg(dst);
        run(&mut cmd, Duration::from_secs(120))
    }
}

/// One-shot [`Skopeo::inspect`].
pub fn skopeo_inspect(image: &str, registries_conf: &Path, extra: &[&str]) -> Output {
    Skopeo::new().inspect(image, registries_conf, extra)
}
