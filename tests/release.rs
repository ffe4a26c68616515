//! What a release publishes, checked before a tag is pushed (.github/workflows/release.yml does
//! the publishing and cannot run here):
//! - `make install-yaml` holds exactly the objects `kubectl kustomize config/default` yields, with
//!   the operator image replaced everywhere it is named;
//! - one version everywhere a release reads it: Cargo.toml, the chart, the default images, and a
//!   CHANGELOG.md section (the release notes).

#[path = "chart/k8s.rs"]
mod k8s;
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn default_image() -> String {
    format!("ghcr.io/mirrorfleet/mirrorfleet:{VERSION}")
}

#[test]
fn install_yaml_is_config_default_with_the_release_image() {
    let Some(kubectl) = support::tool("kubectl") else { return };
    let Some(_make) = support::tool("make") else { return };
    let dir = support::tempdir();
    let out = dir.path().join("install.yaml");
    let image = "registry.example.com/fork/mirrorfleet:9.9.9";
    support::run_ok(
        Command::new("make").current_dir(root()).args([
            "-s",
            "install-yaml",
            &format!("IMAGE={image}"),
            &format!("INSTALL_YAML={}", out.display()),
        ]),
        Duration::from_secs(120),
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with(&format!("# mirrorfleet {image}: kubectl apply --server-side -f install.yaml\n")));
    assert!(!text.contains(&default_image()), "the default image is left somewhere in install.yaml");
    // The image is the Deployment's and the one its pods hand to node agents and cleanup Jobs.
    assert_eq!(text.matches(image).count(), 3, "header, container image, MIRRORFLEET_OPERATOR_IMAGE");

    let kustomized = support::run_ok(
        Command::new(&kubectl).args(["kustomize", root().join("config/default").to_str().unwrap()]),
        Duration::from_secs(60),
    );
    let want = k8s::yaml_docs(&String::from_utf8(kustomized.stdout).unwrap());
    let got = k8s::yaml_docs(&text.replace(image, &default_image()));
    let ids = |docs: &[Value]| -> Vec<String> {
        docs.iter()
            .map(|d| format!("{} {}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
            .collect()
    };
    assert!(ids(&got).iter().any(|i| i.starts_with("CustomResourceDefinition ")), "{:?}", ids(&got));
    pretty_assertions::assert_eq!(ids(&got), ids(&want));
    assert!(got == want, "install.yaml's objects differ from config/default's");
}

#[test]
fn one_version_everywhere_a_release_reads_it() {
    let chart = read("charts/mirrorfleet/Chart.yaml");
    let chart: serde_yaml::Value = serde_yaml::from_str(&chart).unwrap();
    assert_eq!(chart["version"].as_str(), Some(VERSION), "Chart.yaml version");
    assert_eq!(chart["appVersion"].as_str(), Some(VERSION), "Chart.yaml appVersion");
    // The default images are the release's (the builders' default and config/manager).
    assert_eq!(mirrorfleet::build::Settings::default().operator_image, default_image());
    let manager = read("config/manager/manager.yaml");
    assert_eq!(manager.matches(&default_image()).count(), 2, "config/manager names {}", default_image());
    // The release notes: the workflow refuses a tag without its CHANGELOG section.
    let changelog = read("CHANGELOG.md");
    assert!(changelog.contains(&format!("\n## [{VERSION}]\n")), "CHANGELOG.md has no section [{VERSION}]");
    assert!(changelog.contains("\n## [Unreleased]\n"), "CHANGELOG.md keeps an [Unreleased] section on top");
}

/// The workflows call make targets and scripts; a rename must not break a release nobody can
/// rehearse here.
#[test]
fn workflows_call_targets_and_files_that_exist() {
    let makefile = read("Makefile");
    for wf in ["ci.yml", "release.yml"] {
        let text = read(&format!(".github/workflows/{wf}"));
        let commands: String = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
        for target in commands.split("make ").skip(1).filter_map(|rest| rest.split_whitespace().next()) {
            let target = target.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-');
            assert!(makefile.contains(&format!("\n{target}:")), "{wf} runs `make {target}`, which the Makefile lacks");
        }
        for path in [".ci/run", ".ci/install-helm.sh", "CHANGELOG.md", "crds/registrymirrors.mirrorfleet.io.yaml"] {
            if text.contains(path) {
                assert!(root().join(path).exists(), "{wf} names {path}");
            }
        }
    }
    // Every platform the release builds is one the Dockerfile can cross-compile for.
    let release = read(".github/workflows/release.yml");
    let dockerfile = read("Dockerfile");
    for arch in ["amd64", "arm64"] {
        assert!(release.contains(&format!("linux/{arch}")), "release.yml builds no linux/{arch}");
        assert!(dockerfile.contains(&format!("{arch}) triple=")), "the Dockerfile cannot build {arch}");
    }
}
