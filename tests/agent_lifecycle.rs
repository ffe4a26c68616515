//! The node agent across its own lifecycle, with the real binary and a real registry as the
//! mirror: a restart (a DaemonSet rollout) must not touch working files, a file someone deletes
//! comes back on the next resync, and the credential never leaks into the status or the log.
//! Run: `nice cargo test --test agent_lifecycle -- --test-threads=2`.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use serde_json::json;
use support::agent::{node_config_json, wait_path, NodeAgent};
use support::*;

const MIRROR: &str = "mirrors/public";
const HUB: &str = "https://registry-1.docker.io";
const WAIT: Duration = Duration::from_secs(15);

#[test]
fn a_restarted_agent_leaves_working_files_untouched() {
    if !tools_available(&["docker-registry"]) {
        return;
    }
    let mirror = Upstream::start();
    let certs = tempdir();
    let config = node_config_json(MIRROR, certs.path(), &[("docker.io", &mirror.url(), Some(HUB))]);
    let mut first = NodeAgent::start("public", Some(&config), &[]);
    first.wait_status("configured", WAIT, |v| v["ready"] == true);
    let hosts = certs.path().join("docker.io/hosts.toml");
    let before = fs::metadata(&hosts).unwrap();
    assert!(first.terminate().success());

    // Watch the file while the new agent starts: it must never disappear (no withdraw-then-
    // restore blip while the new agent has not probed yet) and must not be rewritten.
    let mut second = NodeAgent::start("public", Some(&config), &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        assert!(hosts.exists(), "the file vanished during the restart; log:\n{}", second.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    second.wait_status("configured again", WAIT, |v| v["ready"] == true);
    let after = fs::metadata(&hosts).unwrap();
    assert_eq!((after.ino(), after.mtime_nsec(), after.mtime()), (before.ino(), before.mtime_nsec(), before.mtime()));
}

#[test]
fn a_deleted_file_is_restored_on_the_next_resync() {
    if !tools_available(&["docker-registry"]) {
        return;
    }
    let mirror = Upstream::start();
    let certs = tempdir();
    let config = node_config_json(MIRROR, certs.path(), &[("docker.io", &mirror.url(), Some(HUB))]);
    let mut agent = NodeAgent::start("public", Some(&config), &["--resync-seconds", "1"]);
    agent.wait_status("configured", WAIT, |v| v["ready"] == true);
    let hosts = certs.path().join("docker.io/hosts.toml");
    fs::remove_file(&hosts).unwrap();
    let took = wait_path(&hosts, true, Duration::from_secs(5));
    assert!(took.is_some(), "not restored; log:\n{}", agent.log());
}

#[test]
fn the_credential_stays_out_of_the_status_and_the_log() {
    if !tools_available(&["docker-registry"]) {
        return;
    }
    let mirror = Upstream::start();
    let certs = tempdir();
    let mut config = node_config_json(MIRROR, certs.path(), &[("docker.io", &mirror.url(), Some(HUB))]);
    config["authenticate"] = json!(true);
    let mut agent = NodeAgent::start("public", Some(&config), &[]);
    let header = basic_auth("nodes", "very-secret-password");
    agent.set_authorization(Some(&header));
    agent.wait_status("configured", WAIT, |v| v["ready"] == true);
    assert!(fs::read_to_string(certs.path().join("docker.io/hosts.toml")).unwrap().contains(&header));
    let status = fs::read_to_string(agent.status_dir().join("status.json")).unwrap();
    let encoded = header.trim_start_matches("Basic ");
    assert!(!status.contains(encoded), "status.json carries the credential:\n{status}");
    assert!(!agent.log().contains(encoded), "the log carries the credential:\n{}", agent.log());
}
