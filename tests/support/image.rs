//! Tiny, deterministic OCI images built with umoci and pushed with skopeo,
//! so pull-through tests never need the internet.

use super::{require, run_ok, Skopeo};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// Fixed timestamp for config, history and file mtimes: same inputs, same
/// digests, so tests may hard-code nothing yet compare runs.
const EPOCH: &str = "2000-01-01T00:00:00Z";
const EPOCH_SECS: u64 = 946_684_800;

/// Builds an OCI image layout at `dir/name` holding exactly one image:
/// `layers` layers, each a single file `/layerN.bin` of `layer_bytes`
/// pseudo-random bytes seeded by (name, N), so different names never share
/// blobs and rebuilding yields identical digests.
///
/// The config says linux/<host arch> (amd64 here) so that `ctr images pull`,
/// which filters by host platform, accepts and unpacks it. Returns the
/// layout path; the repository name used by [`push_image`] is `name`.
pub fn build_test_image(dir: &Path, name: &str, layers: usize, layer_bytes: usize) -> PathBuf {
    assert!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)),
        "{name:?} is not a valid single-component repository name"
    );
    let umoci = require("umoci");
    let layout = dir.join(name);
    let src = dir.join(format!(".{name}-src"));
    let _ = fs::remove_dir_all(&layout);
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).unwrap();
    // umoci's "path:tag" syntax; the tag only exists inside the layout.
    let image = format!("{}:build", layout.display());
    let t = Duration::from_secs(60);

    run_ok(Command::new(&umoci).args(["init", "--layout"]).arg(&layout), t);
    run_ok(Command::new(&umoci).args(["new", "--image", &image]), t);
    run_ok(
        Command::new(&umoci).args([
            "config",
            "--image",
            &image,
            "--no-history",
            "--created",
            EPOCH,
            "--os",
            "linux",
            "--architecture",
            go_arch(),
            "--config.cmd",
            "/layer0.bin",
        ]),
        t,
    );
    for n in 0..layers {
        let file = src.join(format!("layer{n}.bin"));
        fs::write(&file, pseudo_random(&format!("{name}/{n}"), layer_bytes)).unwrap();
        // The tar entry records mode and mtime; pin both for stable digests.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS);
        fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
        run_ok(
            Command::new(&umoci)
                .args(["insert", "--image", &image, "--history.created", EPOCH])
                .args(["--history.created_by", "mirrorfleet build_test_image"])
                .arg(&file)
                .arg(format!("/layer{n}.bin")),
            t,
        );
    }
    fs::remove_dir_all(&src).unwrap();
    layout
}

/// Pushes the single image of `oci_layout` to
/// `docker://<registry_addr>/library/<layout dir name>:<tag>` over plain
/// HTTP, optionally with basic-auth credentials. Panics on failure.
pub fn push_image(oci_layout: &Path, tag: &str, registry_addr: &str, creds: Option<(&str, &str)>) {
    let name = oci_layout.file_name().unwrap().to_str().unwrap();
    let skopeo = Skopeo::new();
    // "oci:<dir>" without a reference selects the only image in the index.
    let src = format!("oci:{}", oci_layout.display());
    let dst = format!("docker://{registry_addr}/library/{name}:{tag}");
    let creds_arg = creds.map(|(u, p)| format!("{u}:{p}"));
    let mut extra = vec!["--dest-tls-verify=false"];
    match &creds_arg {
        Some(c) => extra.extend(["--dest-creds", c.as_str()]),
        // Never pick up credentials of whoever runs the tests.
        None => extra.push("--dest-no-creds"),
    }
    let out = skopeo.copy(&src, &dst, &extra);
    assert!(out.status.success(), "push {src} -> {dst} failed\n{}", super::describe_output(&out));
}

/// `sha256:...` digest of the single manifest in an OCI layout: what a
/// registry reports as `Docker-Content-Digest` after a push.
pub fn oci_manifest_digest(oci_layout: &Path) -> String {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(oci_layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().expect("index.json manifests");
    assert_eq!(manifests.len(), 1, "layout should hold exactly one image");
    manifests[0]["digest"].as_str().unwrap().to_string()
}

/// GOARCH spelling of the host architecture.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("unsupported test host architecture {other}"),
    }
}

/// xorshift64* stream seeded from `seed`: incompressible enough that
/// layer sizes are meaningful, and fully reproducible.
fn pseudo_random(seed: &str, len: usize) -> Vec<u8> {
    let mut state =
        seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
