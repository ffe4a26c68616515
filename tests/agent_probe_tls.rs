//! https mirrors (`via: Edge`): the agent's probe verifies the mirror's certificate against the
//! CA bundle the agent process sees plus the edge CA the node config carries (the edge TLS
//! Secret's `ca.crt`), exactly like a pull with the agent's `hosts.toml` would, so a mirror the node
//! cannot verify is reported and withdrawn rather than counted as reachable. Real Distribution
//! with TLS on 127.0.0.1, a throw-away CA made with openssl; `SSL_CERT_FILE` stands in for the
//! image's CA bundle.
//! Run: `nice cargo test --test agent_probe_tls`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
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

/// A registry serving TLS at `https://localhost:<port>` with a certificate from a private CA.
struct TlsMirror {
    _registry: Registry,
    url: String,
    /// The private CA's certificate.
    ca: PathBuf,
    /// Holds the PKI and the registry's storage.
    dir: tempfile::TempDir,
}

fn tls_mirror() -> TlsMirror {
    let dir = tempdir();
    let (ca, crt, key) = ca_and_server_cert(dir.path());
    let storage = dir.path().join("storage");
    let port = free_port();
    let config = format!(
        "{}  tls:\n    certificate: {}\n    key: {}\n",
        registry_config(&format!("127.0.0.1:{port}"), &storage),
        crt.display(),
        key.display()
    );
    let registry = Registry::start(&config);
    TlsMirror { _registry: registry, url: format!("https://localhost:{port}"), ca, dir }
}

#[test]
fn an_https_mirror_is_reachable_only_when_its_certificate_verifies() {
    if !tools_available(&["docker-registry", "openssl"]) {
        return;
    }
    let mirror = tls_mirror();
    let (ca, url) = (&mirror.ca, &mirror.url);
    let hub = Some("https://registry-1.docker.io");

    // Trusting the CA: reachable, entry written with the https host.
    let certs = tempdir();
    let cfg = node_config_json("mirrors/edge", certs.path(), &[("docker.io", url, hub)]);
    let mut trusted = NodeAgent::start_with_env("edge", Some(&cfg), &[], &[("SSL_CERT_FILE", ca)]);
    trusted.wait_status("configured over TLS", Duration::from_secs(15), |v| v["ready"] == true);
    let text = std::fs::read_to_string(certs.path().join("docker.io/hosts.toml")).unwrap();
    assert!(text.contains(&format!("[host.\"{url}\"]")), "{text}");

    // Not trusting it (an empty bundle): the probe fails on the certificate, nothing is written.
    let empty = mirror.dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let certs2 = tempdir();
    let cfg = node_config_json("mirrors/edge", certs2.path(), &[("docker.io", url, hub)]);
    let mut untrusted = NodeAgent::start_with_env("edge", Some(&cfg), &[], &[("SSL_CERT_FILE", &empty)]);
    let status =
        untrusted.wait_status("reported", Duration::from_secs(15), |v| v["problems"].to_string().contains("withdrawn"));
    let problems = status["problems"].to_string();
    eprintln!("untrusted mirror reported as: {problems}");
    assert!(problems.to_lowercase().contains("certificate") || problems.contains("issuer"), "{problems}");
    assert!(!certs2.path().join("docker.io/hosts.toml").exists());
}

/// `via: Edge` with a `ca.crt` in the edge TLS Secret: the node config carries that CA. The agent's
/// own bundle (an empty one here) does not know it, yet the probe succeeds because it trusts the
/// config's CA too; the agent writes the CA beside `hosts.toml` as its own file and names it as the
/// mirror's `ca` there, and takes both away (with the directory) when the mirror is removed.
#[test]
fn the_edge_ca_in_the_node_config_is_trusted_by_the_probe_written_beside_hosts_toml_and_removed() {
    if !tools_available(&["docker-registry", "openssl"]) {
        return;
    }
    let mirror = tls_mirror();
    let pem = std::fs::read_to_string(&mirror.ca).unwrap();
    let empty = mirror.dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let certs = tempdir();
    let mut cfg = node_config_json(
        "mirrors/edge",
        certs.path(),
        &[("docker.io", &mirror.url, Some("https://registry-1.docker.io"))],
    );
    cfg["edgeCA"] = json!(pem);
    let mut agent = NodeAgent::start_with_env("edge", Some(&cfg), &[], &[("SSL_CERT_FILE", &empty)]);
    let status = agent.wait_status("configured over TLS with the edge CA", Duration::from_secs(15), |v| {
        v["ready"] == true || v["problems"].to_string().contains("withdrawn")
    });
    assert_eq!(status["ready"], true, "the probe did not trust the node config's CA: {status}");

    let dir = certs.path().join("docker.io");
    let ca_file = dir.join("mirrorfleet-edge-ca.crt");
    let written = std::fs::read_to_string(&ca_file).unwrap();
    assert_eq!(
        written,
        format!("# managed-by: mirrorfleet (RegistryMirror mirrors/edge); this file is rewritten and removed by mirrorfleet.\n{pem}")
    );
    assert_eq!(std::fs::metadata(&ca_file).unwrap().permissions().mode() & 0o777, 0o644);
    // openssl reads it as the CA it is, marker line and all.
    let out = run_ok(
        Command::new(tool("openssl").unwrap()).args(["x509", "-noout", "-subject", "-in"]).arg(&ca_file),
        Duration::from_secs(10),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("mirrorfleet test CA"), "{}", describe_output(&out));
    let text = std::fs::read_to_string(dir.join("hosts.toml")).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    assert_eq!(doc["host"][mirror.url.as_str()]["ca"].as_str(), Some(ca_file.to_str().unwrap()), "{text}");
    assert!(doc.get("ca").is_none(), "the upstream keeps the node's own CAs: {text}");

    cfg["removing"] = json!(true);
    agent.set_config(&cfg);
    agent.wait_status("removed", Duration::from_secs(15), |v| {
        v["report"]["removing"] == true && v["appliedChecksum"].is_string()
    });
    assert!(!dir.exists(), "hosts.toml, the CA and the directory the agent made are gone");
}
