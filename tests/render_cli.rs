//! The `mirrorfleet` binary as users run it: the README's first command, `render -o`, and
//! the invalid-input contract (every problem listed, exit 1, nothing written).

use std::process::Command;

fn mirrorfleet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mirrorfleet"))
}

#[test]
fn render_without_a_file_renders_the_embedded_sample() {
    let out = mirrorfleet().arg("render").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("kind: DaemonSet") && stdout.contains("name: public-edge"));
    assert!(!stdout.contains("change-me"), "sample passwords are redacted");
}

#[test]
fn render_to_a_directory_writes_manifests_and_raw_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = mirrorfleet()
        .args(["render", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/config/samples/public-mirrors.yaml"), "-o"])
        .arg(dir.path())
        .args(["--endpoint", "dockerhub=http://10.96.0.10:5000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["manifests.yaml", "proxy/dockerhub/config.yml", "edge/envoy.yaml", "edge/lds.yaml", "edge/cds.yaml"] {
        assert!(dir.path().join(f).is_file(), "{f} written");
    }
    let hosts = std::fs::read_to_string(dir.path().join("nodes/containerd/certs.d/docker.io/hosts.toml")).unwrap();
    assert!(hosts.contains("[host.\"http://10.96.0.10:5000\"]"), "{hosts}");
}

#[test]
fn invalid_input_lists_every_problem_exits_1_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.yaml");
    std::fs::write(
        &input,
        "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: bad}\nspec:\n  upstreams:\n  \
         - {name: Hub, registry: docker.io, remoteURL: ftp://x}\n  - {name: hub2, registry: docker.io, remoteURL: https://x}\n  \
         proxy: {replicas: 0, ttl: soon}\n",
    )
    .unwrap();
    let target = dir.path().join("out");
    let out = mirrorfleet().args(["render", "-f"]).arg(&input).arg("-o").arg(&target).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for want in [
        "spec.upstreams[0].name",
        "spec.upstreams[0].remoteURL",
        "spec.upstreams[1].registry",
        "spec.proxy.replicas",
        "spec.proxy.ttl",
    ] {
        assert!(stderr.contains(want), "{want} missing from:\n{stderr}");
    }
    assert!(!target.exists(), "nothing written");
    assert!(out.stdout.is_empty());

    let out = mirrorfleet().args(["render", "-f"]).arg(dir.path().join("missing.yaml")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));

    std::fs::write(&input, "kind: [unclosed\n").unwrap();
    let out = mirrorfleet().args(["render", "-f"]).arg(&input).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("document 1"));
}

#[test]
fn crd_subcommand_prints_the_committed_crd() {
    let out = mirrorfleet().arg("crd").output().unwrap();
    assert!(out.status.success());
    let committed =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/registrymirrors.mirrorfleet.io.yaml")).unwrap();
    assert_eq!(out.stdout, committed);
}

/// `--kubernetes-version` picks the Services' `trafficDistribution` value as the operator does
/// from the API server's version: the new name from 1.34, the old one before.
#[test]
fn the_kubernetes_version_picks_the_same_zone_traffic_value() {
    let render = |args: &[&str]| {
        let out = mirrorfleet().arg("render").args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let count = |text: &str, value: &str| text.matches(&format!("trafficDistribution: {value}\n")).count();
    let (ok, default, _) = render(&[]);
    assert!(ok);
    let services = default.matches("\nkind: Service\n").count();
    assert!(services >= 3, "{services}");
    assert_eq!(count(&default, "PreferClose"), services, "without a version: the name every 1.31+ reads");
    for (version, value) in [("1.33", "PreferClose"), ("1.34", "PreferSameZone"), ("v1.36.2", "PreferSameZone")] {
        let (ok, out, err) = render(&["--kubernetes-version", version]);
        assert!(ok, "{version}: {err}");
        assert_eq!(count(&out, value), services, "{version}");
    }
    let (ok, _, err) = render(&["--kubernetes-version", "34"]);
    assert!(!ok && err.contains("not a Kubernetes version like 1.34"), "{err}");
}
