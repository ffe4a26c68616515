//! https mirrors (`via: Edge`): the agent's probe verifies the mirror's certificate against the
//! CA bundle the agent process sees, exactly like a pull would, so a mirror the node cannot
//! verify is reported and withdrawn rather than counted as reachable. Real Distribution with TLS
//! on 127.0.0.1, a throw-away CA made with openssl; `SSL_CERT_FILE` stands in for the image's
//! CA bundle.
//! Run: `nice cargo test --test agent_probe_tls`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::agent::{node_config_json, NodeAgent};
use support::*;

/// A CA and a `localhost` server certificate it signed: (ca.crt, tls.crt, tls.key).
fn ca_and_server_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = tool("openssl").unwrap();
    let t = Duration::from_secs(30);
    let p = |name: &str| dir.join(name);
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run_ok(
        Command::new(&openssl)
            .args(["req", "-x509", "-days", "2", "-subj", "/CN=mirrorfleet test CA"])
            .args(ec)
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.crt")),
        t,
    );
    run_ok(
        Command::new(&openssl)
            .args(["req", "-subj", "/CN=localhost"])
            .args(ec)
            .arg("-keyout")
            .arg(p("tls.key"))
            .arg("-out")
            .arg(p("tls.csr")),
        t,
    );
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_ok(
        Command::new(&openssl)
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(p("tls.csr"))
            .arg("-CA")
            .arg(p("ca.crt"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("ext.cnf"))
            .arg("-out")
            .arg(p("tls.crt")),
        t,
    );
    (p("ca.crt"), p("tls.crt"), p("tls.key"))
}

#[test]
fn an_https_mirror_is_reachable_only_when_its_certificate_verifies() {
    if !tools_available(&["docker-registry", "openssl"]) {
        return;
    }
    let pki = tempdir();
    let (ca, crt, key) = ca_and_server_cert(pki.path());
    let storage = tempdir();
    let port = free_port();
    let config = format!(
        "{}  tls:\n    certificate: {}\n    key: {}\n",
        registry_config(&format!("127.0.0.1:{port}"), storage.path()),
        crt.display(),
        key.display()
    );
    let _mirror = Registry::start(&config);
    let url = format!("https://localhost:{port}");
    let hub = Some("https://registry-1.docker.io");

    // Trusting the CA: reachable, entry written with the https host.
    let certs = tempdir();
    let cfg = node_config_json("mirrors/edge", certs.path(), &[("docker.io", &url, hub)]);
    let mut trusted = NodeAgent::start_with_env("edge", Some(&cfg), &[], &[("SSL_CERT_FILE", &ca)]);
    trusted.wait_status("configured over TLS", Duration::from_secs(15), |v| v["ready"] == true);
    let text = std::fs::read_to_string(certs.path().join("docker.io/hosts.toml")).unwrap();
    assert!(text.contains(&format!("[host.\"{url}\"]")), "{text}");

    // Not trusting it (an empty bundle): the probe fails on the certificate, nothing is written.
    let empty = pki.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let certs2 = tempdir();
    let cfg = node_config_json("mirrors/edge", certs2.path(), &[("docker.io", &url, hub)]);
    let mut untrusted = NodeAgent::start_with_env("edge", Some(&cfg), &[], &[("SSL_CERT_FILE", &empty)]);
    let status =
        untrusted.wait_status("reported", Duration::from_secs(15), |v| v["problems"].to_string().contains("withdrawn"));
    let problems = status["problems"].to_string();
    eprintln!("untrusted mirror reported as: {problems}");
    assert!(problems.to_lowercase().contains("certificate") || problems.contains("issuer"), "{problems}");
    assert!(!certs2.path().join("docker.io/hosts.toml").exists());
}
