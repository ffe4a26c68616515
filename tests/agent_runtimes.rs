//! The node agent's opt-in runtimes against the REAL clients: skopeo 1.9 (containers/image, the
//! library CRI-O and Podman use) reading the agent's `registries.conf.d` drop-in, and dockerd
//! 20.10 reading the `daemon.json` the agent merged into. Pulls are asserted in the mirror's
//! access log; the admin's own daemon.json settings must survive a write and a removal.
//!
//! Needs skopeo, umoci, docker-registry; the Docker test also dockerd (apt docker.io) and root.
//! Run: `nice cargo test --test agent_runtimes -- --test-threads=2`.

mod support;

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::agent::{node_config_json, wait_path, NodeAgent};
use support::dockerd::Dockerd;
use support::*;

const MIRROR: &str = "mirrors/public";
const HUB: &str = "https://registry-1.docker.io";
const WAIT: Duration = Duration::from_secs(15);

struct Fleet {
    mirror: Registry,
    _upstream: Upstream,
    _dirs: Vec<tempfile::TempDir>,
}

fn fleet(image: &str) -> Fleet {
    let upstream = Upstream::start();
    let img_dir = tempdir();
    upstream.push(&build_test_image(img_dir.path(), image, 1, 16 * 1024), "v1");
    let storage = tempdir();
    let config = format!("{}proxy:\n  remoteurl: {}\n", registry_config(&free_addr(), storage.path()), upstream.url());
    Fleet { mirror: Registry::start(&config), _upstream: upstream, _dirs: vec![img_dir, storage] }
}

fn skopeo_inspect_raw(skopeo: &Skopeo, home: &Path, conf: &Path, image: &str) -> std::process::Output {
    let mut cmd = skopeo.command();
    // containers/image reads drop-ins from /etc/containers/registries.conf.d and, because the
    // main file is given explicitly, from $HOME/.config/containers/registries.conf.d.
    cmd.env("HOME", home).arg("--registries-conf").arg(conf).args(["inspect", "--raw"]).arg(image);
    run(&mut cmd, Duration::from_secs(60))
}

#[test]
fn skopeo_pulls_through_the_mirror_with_the_agents_registries_conf_drop_in() {
    if !tools_available(&["skopeo", "umoci", "docker-registry"]) {
        return;
    }
    let mut f = fleet("crioimg");
    let home = tempdir();
    let drop_in_dir = home.path().join(".config/containers/registries.conf.d");
    let main_conf = home.path().join("registries.conf");
    fs::write(&main_conf, "unqualified-search-registries = []\n").unwrap();
    let certs = tempdir();
    let mut config = node_config_json(MIRROR, certs.path(), &[("docker.io", &f.mirror.url(), Some(HUB))]);
    config["crio"] = json!({"dropInDir": drop_in_dir.display().to_string()});
    let mut agent = NodeAgent::start("public", Some(&config), &["--probe-interval-ms", "500"]);
    agent.wait_status("configured", WAIT, |v| v["ready"] == true);
    let drop_in = drop_in_dir.join("mirrorfleet-mirrors-public.conf");
    let text = fs::read_to_string(&drop_in).unwrap();
    assert!(text.starts_with("# managed-by: mirrorfleet (RegistryMirror mirrors/public)"), "{text}");

    let skopeo = Skopeo::new();
    let out = skopeo_inspect_raw(&skopeo, home.path(), &main_conf, "docker://docker.io/library/crioimg:v1");
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        f.mirror.wait_log("GET /v2/library/crioimg/manifests/v1", Duration::from_secs(10)),
        "skopeo did not use the mirror:\n{}",
        f.mirror.log()
    );

    // Dead mirror: the drop-in is withdrawn, so containers/image goes straight to docker.io.
    f.mirror.stop();
    let gone = wait_path(&drop_in, false, Duration::from_secs(10));
    assert!(gone.is_some(), "drop-in not withdrawn; agent log:\n{}", agent.log());
    let out = skopeo_inspect_raw(&skopeo, home.path(), &main_conf, "docker://docker.io/library/crioimg:v1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("registry-1.docker.io"), "{}", describe_output(&out));
    assert!(!stderr.contains(f.mirror.addr()), "the withdrawn mirror was still tried:\n{stderr}");
}

#[test]
fn dockerd_pulls_through_the_mirror_merged_into_daemon_json_and_removal_restores_the_admins_file() {
    if !Dockerd::available() || !tools_available(&["skopeo", "umoci", "docker-registry"]) {
        return;
    }
    let f = fleet("dockimg");
    let etc = tempdir();
    let daemon_json = etc.path().join("daemon.json");
    // The admin's file: settings the agent must keep, including a mirror of their own.
    let admin = json!({
        "log-level": "info",
        "max-concurrent-downloads": 2,
        "registry-mirrors": ["https://admin-mirror.example.invalid"],
        "features": {"buildkit": false},
    });
    fs::write(&daemon_json, serde_json::to_string_pretty(&admin).unwrap()).unwrap();
    let certs = tempdir();
    let mut config = node_config_json(MIRROR, certs.path(), &[("docker.io", &f.mirror.url(), Some(HUB))]);
    config["docker"] = json!({"daemonJson": daemon_json.display().to_string()});
    let mut agent = NodeAgent::start("public", Some(&config), &[]);
    agent.wait_status("configured", WAIT, |v| v["ready"] == true);

    let merged: Value = serde_json::from_str(&fs::read_to_string(&daemon_json).unwrap()).unwrap();
    let mut want = admin.clone();
    want["registry-mirrors"] = json!(["https://admin-mirror.example.invalid", f.mirror.url()]);
    assert_eq!(merged, want, "only our mirror added");
    let record = etc.path().join(".mirrorfleet-mirrors-public.json");
    assert!(fs::read_to_string(&record).unwrap().contains(&f.mirror.url()));

    let dockerd = Dockerd::start(&daemon_json);
    assert!(dockerd.mirrors().iter().any(|m| m.trim_end_matches('/') == f.mirror.url()), "{:?}", dockerd.mirrors());
    let out = dockerd.docker(&["pull", "docker.io/library/dockimg:v1"]);
    assert!(out.status.success(), "{}\n{}", describe_output(&out), dockerd.log());
    assert!(
        f.mirror.wait_log("/v2/library/dockimg/manifests/", Duration::from_secs(10)),
        "dockerd did not use the mirror:\n{}",
        f.mirror.log()
    );

    // Mirror deleted: exactly our entry goes; dockerd picks that up on SIGHUP.
    let mut removing = config.clone();
    removing["removing"] = json!(true);
    agent.set_config(&removing);
    agent.wait_status("removed", WAIT, |v| v["report"]["removing"] == true && v["appliedChecksum"].is_string());
    let after: Value = serde_json::from_str(&fs::read_to_string(&daemon_json).unwrap()).unwrap();
    assert_eq!(after, admin, "the admin's daemon.json, value for value");
    assert!(!record.exists(), "record removed with the last entry");
    dockerd.reload();
    let mirrors = wait_until(Duration::from_secs(10), || {
        let m = dockerd.mirrors();
        (!m.iter().any(|m| m.contains(f.mirror.addr()))).then_some(m)
    });
    assert!(mirrors.is_some(), "dockerd still lists our mirror after SIGHUP: {:?}", dockerd.mirrors());
}
