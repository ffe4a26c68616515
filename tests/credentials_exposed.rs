//! An upstream that pulls with credentials, on a mirror without `clientAuth`, serves its private
//! images to every pod that reaches the mirror. `render` warns on stderr; the controller's status
//! carries the `CredentialsExposed` condition, and its first appearance is a Warning Event.

use std::process::Command;

use mirrorfleet::api::validate::exposed_credentials;
use mirrorfleet::controller::status::{observed_status, transitions, Observed, CREDENTIALS_EXPOSED};
use mirrorfleet::render::{render_str, RenderOptions};

fn mirror(sample: &str) -> mirrorfleet::api::RegistryMirror {
    let text = std::fs::read_to_string(format!("{}/config/samples/{sample}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    render_str(&text, &RenderOptions::default()).unwrap().remove(0).mirror
}

#[test]
fn credentials_without_client_auth_are_named_per_upstream() {
    let corp = mirror("private-upstream.yaml");
    let exposed = exposed_credentials(&corp);
    let paths: Vec<&str> = exposed.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["spec.upstreams[0].credentialsSecretRef", "spec.upstreams[1].credentialsSecretRef"]);
    assert!(exposed[0].message.contains("corp-registry-creds") && exposed[0].message.contains("clientAuth"));
    // Client auth in front, or no credentials at all: nothing to say.
    assert!(exposed_credentials(&mirror("public-mirrors.yaml")).is_empty());
    assert!(exposed_credentials(&mirror("minimal.yaml")).is_empty());
}

#[test]
fn a_network_policy_answers_the_warning_unless_it_admits_everyone() {
    let vendor = mirror("restricted.yaml");
    assert!(vendor.spec.client_auth.is_none() && vendor.spec.upstreams[0].credentials_secret_ref.is_some());
    assert!(exposed_credentials(&vendor).is_empty(), "only the listed namespaces and ranges reach it");
    for open in ["0.0.0.0/0", "::/0"] {
        let mut wide = vendor.clone();
        wide.spec.network_policy.as_mut().unwrap().from_cidrs.push(open.into());
        assert_eq!(exposed_credentials(&wide).len(), 1, "{open} admits everyone");
    }
    let mut none = vendor.clone();
    none.spec.network_policy = None;
    assert_eq!(exposed_credentials(&none).len(), 1);
}

#[test]
fn the_status_carries_the_condition_and_its_first_appearance_is_a_warning() {
    let corp = mirror("private-upstream.yaml");
    let empty = Default::default();
    let services = Default::default();
    let health = Default::default();
    let learned = Default::default();
    let obs = Observed {
        deployments: &empty,
        services: &services,
        daemon_set: None,
        jobs: &[],
        cleanup_pods: &[],
        removing_nodes: None,
        upstream_health: &health,
        node_conflicts: &[],
        node_zones: &[],
        learned_auth: &learned,
    };
    let now = mirrorfleet::controller::status::now();
    let status = observed_status(&corp, obs, &now);
    let cond = status.conditions.iter().find(|c| c.type_ == CREDENTIALS_EXPOSED).expect("the condition");
    assert_eq!((cond.status.as_str(), cond.reason.as_str()), ("True", "NoClientAuth"));
    assert!(cond.message.contains("\"corp\"") && cond.message.contains("\"ngc\""), "{}", cond.message);
    let events = transitions(&[], &status.conditions);
    assert!(events.iter().any(|(c, bad)| c.type_ == CREDENTIALS_EXPOSED && *bad), "a Warning Event");

    // Without the exposure the condition is absent (the other five stay as they are).
    let public = mirror("public-mirrors.yaml");
    let status = observed_status(&public, obs, &now);
    assert!(status.conditions.iter().all(|c| c.type_ != CREDENTIALS_EXPOSED));
    assert_eq!(status.conditions.len(), 5);
}

#[test]
fn render_prints_a_warning_and_still_renders() {
    let sample = format!("{}/config/samples/private-upstream.yaml", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_mirrorfleet")).args(["render", "-f", &sample]).output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("warning: RegistryMirror mirrors/corp: spec.upstreams[").count(), 2, "{stderr}");
    assert!(!out.stdout.is_empty());
}
