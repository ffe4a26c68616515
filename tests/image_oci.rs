//! `make image-oci` (umoci, no Docker) builds the same image as the Dockerfile: the binary at the
//! same path, the same user, entrypoint and default command, CA certificates, and every shared
//! library the binary needs — shown by running the binary inside the unpacked root filesystem.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the Dockerfile's final stage sets: (binary destination, user, entrypoint, cmd).
fn dockerfile_final_stage() -> (String, String, Vec<String>, Vec<String>) {
    let text = fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).expect("a FROM line");
    let stage = &lines[last_from..];
    let find = |prefix: &str| stage.iter().find_map(|l| l.strip_prefix(prefix)).map(str::trim).map(str::to_string);
    let copy = find("COPY --from=build ").expect("COPY of the binary");
    let dest = copy.split_whitespace().last().unwrap().to_string();
    let user = find("USER ").expect("USER");
    let exec_form = |s: String| -> Vec<String> { serde_json::from_str(&s).expect("exec form JSON array") };
    (dest, user, exec_form(find("ENTRYPOINT ").expect("ENTRYPOINT")), exec_form(find("CMD ").expect("CMD")))
}

/// The `hack/oci-image.sh` arguments of the Makefile's `image-oci` recipe, as flag -> values.
fn makefile_image_oci_args() -> Vec<(String, String)> {
    let text = fs::read_to_string(root().join("Makefile")).unwrap();
    let start = text.find("\nimage-oci:").expect("an image-oci target") + 1;
    let recipe: String = text[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('\t'))
        .map(|l| l.trim().trim_end_matches('\\').to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let call = recipe.split("hack/oci-image.sh").nth(1).expect("the recipe calls hack/oci-image.sh");
    let words: Vec<&str> = call.split_whitespace().collect();
    words.chunks(2).map(|p| (p[0].to_string(), p.get(1).unwrap_or(&"").to_string())).collect()
}

#[test]
fn image_oci_recipe_matches_the_dockerfile() {
    let (dest, user, entrypoint, cmd) = dockerfile_final_stage();
    let args = makefile_image_oci_args();
    let get = |flag: &str| args.iter().filter(|(f, _)| f == flag).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert_eq!(get("--user"), vec![user]);
    assert_eq!(get("--entrypoint"), entrypoint);
    assert_eq!(get("--cmd"), cmd);
    let bins = get("--bin");
    assert_eq!(bins.len(), 1, "one binary: {bins:?}");
    assert_eq!(bins[0].split_once(':').unwrap().1, dest, "the binary's path in the image");
    assert_eq!(get("--out"), vec!["target/image/mirrorfleet-oci.tar".to_string()]);
}

/// Builds the image the recipe's way from this build's binary and inspects the archive.
#[test]
fn oci_image_script_builds_a_runnable_image_with_the_dockerfiles_config() {
    if !support::tools_available(&["umoci", "tar"]) {
        return;
    }
    let (dest, user, entrypoint, cmd) = dockerfile_final_stage();
    let dir = support::tempdir();
    let tar = dir.path().join("image.tar");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_mirrorfleet"));
    let mut build = Command::new(root().join("hack/oci-image.sh"));
    build.arg("--out").arg(&tar).args(["--ref", "localhost/mirrorfleet/mirrorfleet:test", "--user", &user]);
    build.args(["--entrypoint", &entrypoint[0]]);
    for c in &cmd {
        build.args(["--cmd", c]);
    }
    build.arg("--bin").arg(format!("{}:{dest}", bin.display()));
    support::run_ok(&mut build, Duration::from_secs(300));

    let layout = dir.path().join("layout");
    fs::create_dir_all(&layout).unwrap();
    support::run_ok(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&layout), Duration::from_secs(60));
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "test");
    let manifest = blob_json(&layout, index["manifests"][0]["digest"].as_str().unwrap());
    let config = blob_json(&layout, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["config"]["User"], user.as_str());
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(entrypoint));
    assert_eq!(config["config"]["Cmd"], serde_json::json!(cmd));
    assert_eq!(config["os"], "linux");

    // The root filesystem: the binary, its libraries, CA certificates, the nonroot user.
    let rootfs = dir.path().join("rootfs");
    fs::create_dir_all(&rootfs).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let blob = blob_path(&layout, layer["digest"].as_str().unwrap());
        support::run_ok(Command::new("tar").arg("-xzf").arg(&blob).arg("-C").arg(&rootfs), Duration::from_secs(120));
    }
    let inside = |p: &str| rootfs.join(p.trim_start_matches('/'));
    assert!(inside(&dest).is_file(), "{dest} missing");
    assert!(inside("/etc/ssl/certs/ca-certificates.crt").is_file(), "CA certificates missing");
    let passwd = fs::read_to_string(inside("/etc/passwd")).unwrap();
    assert!(passwd.contains(":65532:65532:"), "no user 65532 in /etc/passwd:\n{passwd}");
    let ldd = Command::new("ldd").arg(&bin).output().unwrap();
    for lib in
        String::from_utf8_lossy(&ldd.stdout).lines().filter_map(|l| l.split("=> ").nth(1)?.split_whitespace().next())
    {
        assert!(inside(lib).exists(), "{lib} (needed by the binary) missing from the image");
    }
    // Running it inside the image proves nothing is missing (root only: chroot).
    if support::is_root() {
        let out =
            support::run(Command::new("chroot").arg(&rootfs).arg(&dest).arg("--version"), Duration::from_secs(30));
        assert!(out.status.success(), "the binary does not run inside the image: {}", support::describe_output(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("mirrorfleet"));
    } else {
        eprintln!("SKIP (partly): not root, so the binary was not run inside the image");
    }
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
}

fn blob_json(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(&fs::read(blob_path(layout, digest)).unwrap()).unwrap()
}
