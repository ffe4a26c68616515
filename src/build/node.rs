//! Node configuration: the desired runtime files (containerd `hosts.toml` per registry) in the
//! node-config ConfigMap, and the node-agent DaemonSet that writes them on every selected node.
//!
//! The ConfigMap holds structured data, not finished files: the agent renders each file with
//! [`hosts_toml_with_ca`] so it can add the Authorization header from its Secret (credentials never
//! sit in a ConfigMap) and withdraw entries whose mirror is unreachable.
//!
//! With `via: Edge`, the `ca.crt` of the edge TLS Secret (cert-manager's key for the issuing CA),
//! when there is one, travels in the ConfigMap too: certificates only ([`edge_ca_bundle`]), never
//! `tls.key`. The agent writes it next to each `hosts.toml` ([`EDGE_CA_FILE`]) and names it as the
//! mirror host's `ca`, so containerd trusts that CA for the edge hosts only, on top of the node's
//! own CAs; the agent's probe trusts it the same way.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, HostPathVolumeSource,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use super::meta::{self, names, Component};
use super::proxy::REGISTRY_PORT;
use super::{pod, Inputs, Settings};
use crate::api::validate::effective_host;
use crate::api::{NodeConfigSpec, NodeRoute, RegistryMirror, NODE_IP_PLACEHOLDER};

/// The key of the node-config ConfigMap that holds [`NodeConfig`] as JSON.
pub const NODE_CONFIG_KEY: &str = "node-config.json";
/// First line of every file the agent writes; the agent touches no file without it.
pub const MANAGED_MARKER: &str = "# managed-by: mirrorfleet";
pub const STATUS_DIR: &str = "/run/mirrorfleet";
pub const BINARY: &str = "/usr/local/bin/mirrorfleet";
/// Where the agent sees the directory of containerd's config file (read-only).
pub const CONTAINERD_CONFIG_MOUNT: &str = "/host/containerd";
/// The key of the edge TLS Secret that holds the issuing CA (cert-manager's convention).
pub const EDGE_CA_KEY: &str = "ca.crt";
/// The file the agent writes the edge CA to, next to `hosts.toml` in `<certsDir>/<registry>/`.
pub const EDGE_CA_FILE: &str = "mirrorfleet-edge-ca.crt";
/// Annotation each agent puts on its own Pod: the [`node_config_checksum`] of the node config it
/// has written to disk. The controller compares it with the ConfigMap's to know which nodes are
/// done (needed before the finalizer is released).
pub const APPLIED_CONFIG_ANNOTATION: &str = "mirrorfleet.io/applied-config";

/// Checksum of the node-config ConfigMap's JSON, as agents report it.
pub fn node_config_checksum(node_config_json: &str) -> String {
    meta::checksum(&[node_config_json.as_bytes()])
}

/// What every node of one mirror should have. Serialized into the node-config ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    /// `namespace/name` of the RegistryMirror, written into each file's marker.
    pub mirror: String,
    pub containerd: ContainerdConfig,
    /// Whether the agent must add an Authorization header (from the node-auth Secret).
    pub authenticate: bool,
    pub registries: Vec<NodeRegistry>,
    /// Set by the controller while the mirror (or its nodeConfig) goes away: agents remove every
    /// file they wrote for this mirror and report that config as applied, then the controller
    /// releases its finalizer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
    /// CRI-O/Podman drop-in, when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crio: Option<CrioConfig>,
    /// Docker daemon.json, when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerConfig>,
    /// PEM certificates the nodes trust for the mirrors (`via: Edge` with a `ca.crt` in the edge
    /// TLS Secret): the agent writes them to [`EDGE_CA_FILE`] beside each `hosts.toml`, names that
    /// file as the mirror host's `ca`, and probes the mirrors with them.
    #[serde(default, rename = "edgeCA", skip_serializing_if = "Option::is_none")]
    pub edge_ca: Option<String>,
    /// The node-local P2P registry containerd asks first (`nodeConfig.peers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerConfig>,
}

/// `nodeConfig.peers` as the agents read it. The endpoint may hold [`NODE_IP_PLACEHOLDER`]; each
/// agent puts its node's address in ([`PeerConfig::resolve`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerConfig {
    pub endpoint: String,
    pub dial_timeout: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_header: Option<String>,
}

impl PeerConfig {
    /// The endpoint on a node with address `node_ip`; an error when the endpoint needs it and the
    /// agent was not told it.
    pub fn resolve(&self, node_ip: Option<&str>) -> Result<String, String> {
        if !self.endpoint.contains(NODE_IP_PLACEHOLDER) {
            return Ok(self.endpoint.clone());
        }
        let ip = node_ip.filter(|ip| !ip.is_empty()).ok_or_else(|| {
            format!("the peer endpoint {} needs the node's address (NODE_IP) and the agent has none", self.endpoint)
        })?;
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
        Ok(self.endpoint.replace(NODE_IP_PLACEHOLDER, &host))
    }
}

/// The peer as one `hosts.toml` is written with it: resolved, and healthy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerHost<'a> {
    pub endpoint: &'a str,
    pub dial_timeout: &'a str,
    pub registry_header: Option<&'a str>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CrioConfig {
    pub drop_in_dir: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DockerConfig {
    pub daemon_json: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerdConfig {
    pub certs_dir: String,
}

/// One registry's entry: where its mirror answers and what to fall back to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeRegistry {
    /// The registry name as in image references; also the certs.d directory name.
    pub registry: String,
    pub upstream: String,
    /// The mirror endpoint as nodes reach it (`http://<cluster IP>:5000` or `https://<edge host>`).
    pub mirror: String,
    /// The upstream server containerd falls back to ([`upstream_server`]); `None` means mirror
    /// only (air-gapped).
    pub fallback: Option<String>,
    /// containerd's `dial_timeout` for the mirror host (2.1+; older versions ignore it). Absent
    /// in node configs written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dial_timeout: Option<String>,
}

/// Where nodes should pull a registry from when the mirror is bypassed (the `hosts.toml`
/// `server`), given the upstream's `remoteURL`.
///
/// containerd (like every OCI client) talks to a registry by its name over https. The one case
/// where that is wrong and the spec says so is a registry whose `remoteURL` names the registry
/// itself over plain HTTP (`10.200.0.1:5001` at `http://10.200.0.1:5001`, an internal
/// `registry.corp:5000` over http): when the remoteURL's authority (host[:port]) is the registry
/// name, its scheme is the registry's scheme too. A remoteURL elsewhere (a pull-through of
/// `ghcr.io` from some other host) says nothing about how the registry itself answers.
pub fn upstream_server(registry: &str, remote_url: &str) -> String {
    match registry {
        // docker.io is a name, not a host: its API lives at registry-1.docker.io.
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "https://registry-1.docker.io".into(),
        other => match remote_authority(remote_url) {
            Some((scheme, authority)) if authority.iter().any(|a| a == other) => format!("{scheme}://{other}"),
            _ => format!("https://{other}"),
        },
    }
}

/// The scheme of `url` and the ways its authority can be written: `host`, `host:port` and, for a
/// port that is the scheme's default (which URL parsing drops), `host:<default port>` as well.
fn remote_authority(url: &str) -> Option<(String, Vec<String>)> {
    let url = url::Url::parse(url).ok()?;
    let host = url.host_str()?;
    let mut forms = match url.port() {
        Some(port) => vec![format!("{host}:{port}")],
        None => vec![host.to_string()],
    };
    if let (None, Some(default)) = (url.port(), url.port_or_known_default()) {
        forms.push(format!("{host}:{default}"));
    }
    Some((url.scheme().to_string(), forms))
}

pub fn node_config(mirror: &RegistryMirror, node: &NodeConfigSpec, inputs: &Inputs, settings: &Settings) -> NodeConfig {
    let ns = mirror.namespace().unwrap_or_default();
    let registries = mirror
        .spec
        .upstreams
        .iter()
        .map(|u| {
            let endpoint = match (node.via, &mirror.spec.edge) {
                (NodeRoute::Edge, Some(edge)) => format!("https://{}", effective_host(u, edge)),
                // Nodes have no cluster DNS: the controller supplies the Service's cluster IP.
                // Without it (render) the Service DNS name stands in, for review only.
                _ => inputs.proxy_endpoints.get(&u.name).cloned().unwrap_or_else(|| {
                    format!(
                        "http://{}.{ns}.svc.{}:{REGISTRY_PORT}",
                        names::proxy(mirror, &u.name),
                        settings.cluster_domain
                    )
                }),
            };
            NodeRegistry {
                registry: u.registry.clone(),
                upstream: u.name.clone(),
                mirror: endpoint,
                fallback: node.fallback_to_upstream.then(|| upstream_server(&u.registry, &u.remote_url)),
                dial_timeout: Some(node.containerd.dial_timeout.clone()),
            }
        })
        .collect();
    NodeConfig {
        mirror: format!("{ns}/{}", mirror.name_any()),
        containerd: ContainerdConfig { certs_dir: node.containerd.certs_dir.clone() },
        authenticate: mirror.spec.client_auth.is_some(),
        registries,
        removing: false,
        crio: node.crio.as_ref().map(|c| CrioConfig { drop_in_dir: c.drop_in_dir.clone() }),
        docker: node.docker.as_ref().map(|d| DockerConfig { daemon_json: d.daemon_json.clone() }),
        // Only the edge hosts are signed by the edge's CA. A ca.crt that holds no certificate is
        // refused before this (validate_inputs).
        edge_ca: match node.via {
            NodeRoute::Edge => inputs.edge_ca.as_deref().and_then(|pem| edge_ca_bundle(pem).ok()),
            NodeRoute::Service => None,
        },
        peer: node.peers.as_ref().map(|p| PeerConfig {
            endpoint: p.endpoint.clone(),
            dial_timeout: p.dial_timeout.clone(),
            registry_header: p.registry_header.clone(),
        }),
    }
}

/// The certificates in `pem` (the edge Secret's `ca.crt`), each checked to parse as a trust
/// anchor and written out again as PEM. Only `CERTIFICATE` blocks are ever copied, so nothing
/// else that sits in the key (a private key pasted by mistake) reaches a ConfigMap or a node.
pub fn edge_ca_bundle(pem: &str) -> Result<String, String> {
    use base64::Engine;
    let certs = edge_ca_certificates(pem)?;
    let mut out = String::new();
    for cert in &certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    Ok(out)
}

/// The certificates of a PEM bundle; an error when there is none or one does not parse.
pub fn edge_ca_certificates(pem: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|e| format!("certificate {} does not parse: {e}", i + 1))?;
    }
    Ok(certs)
}

/// Where the agent writes the edge CA for `registry` (a host path: the agent mounts `certsDir` at
/// the same path).
pub fn edge_ca_path(certs_dir: &str, registry: &str) -> String {
    Path::new(certs_dir).join(registry).join(EDGE_CA_FILE).display().to_string()
}

/// The first line of every file the agent owns.
pub fn marker_line(mirror_ref: &str) -> String {
    format!("{MANAGED_MARKER} (RegistryMirror {mirror_ref}); this file is rewritten and removed by mirrorfleet.")
}

/// The edge CA file: the ownership marker as a comment line, then the PEM bundle (PEM readers,
/// containerd's and openssl's included, skip text outside the BEGIN/END lines).
pub fn edge_ca_file(mirror_ref: &str, bundle: &str) -> String {
    format!("{}\n{bundle}", marker_line(mirror_ref))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// [`hosts_toml_with_ca`] for a mirror the node's own CAs verify (or a plain-HTTP one).
pub fn hosts_toml(mirror_ref: &str, entry: &NodeRegistry, authorization: Option<&str>) -> String {
    hosts_toml_with_ca(mirror_ref, entry, authorization, None)
}

/// The containerd `hosts.toml` for one registry. With a fallback, the mirror is a `[host]` tried
/// first and `server` is the real registry. Mirror-only makes the mirror the `server` as well, so
/// containerd has nothing else to try. Either way there is a `[host]` table: containerd 1.6
/// ignores a hosts.toml without one (logging only an error) and silently pulls upstream.
///
/// `ca_file` (the edge CA, [`edge_ca_path`]) is the mirror host's `ca`: containerd adds it to the
/// system pool for that host only. Mirror-only, the `server` is the mirror too and gets it as well.
pub fn hosts_toml_with_ca(
    mirror_ref: &str,
    entry: &NodeRegistry,
    authorization: Option<&str>,
    ca_file: Option<&str>,
) -> String {
    hosts_toml_with_peer(mirror_ref, entry, None, authorization, ca_file)
}

/// The `[host]` table of a healthy peer: first in the file, so containerd asks it before the
/// mirror; it answers 404 for what no peer has and containerd moves on. No Authorization header
/// (that is the mirror's); the registry header, when asked for, names the upstream.
fn peer_host_table(peer: &PeerHost, entry: &NodeRegistry) -> String {
    let host = format!("host.{}", toml_str(peer.endpoint));
    let mut out = format!("\n[{host}]\n  capabilities = [\"pull\", \"resolve\"]\n");
    out.push_str(&format!("  dial_timeout = {}\n", toml_str(peer.dial_timeout)));
    if let Some(name) = peer.registry_header {
        // The fallback is the upstream as the node sees it; mirror-only, the registry's https URL.
        let upstream = entry.fallback.clone().unwrap_or_else(|| upstream_server(&entry.registry, ""));
        // A bare key when TOML allows one (every usual header name), else a quoted one.
        let bare = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        let key = if bare { name.to_string() } else { toml_str(name) };
        out.push_str(&format!("\n[{host}.header]\n  {key} = {}\n", toml_str(&upstream)));
    }
    out
}

/// [`hosts_toml_with_ca`] with the peer (when healthy) asked before the mirror.
pub fn hosts_toml_with_peer(
    mirror_ref: &str,
    entry: &NodeRegistry,
    peer: Option<&PeerHost>,
    authorization: Option<&str>,
    ca_file: Option<&str>,
) -> String {
    let server = entry.fallback.as_deref().unwrap_or(&entry.mirror);
    let host = format!("host.{}", toml_str(&entry.mirror));
    let mut out = format!("{}\nserver = {}\n", marker_line(mirror_ref), toml_str(server));
    if let (Some(ca), None) = (ca_file, &entry.fallback) {
        out.push_str(&format!("ca = {}\n", toml_str(ca)));
    }
    if let Some(peer) = peer {
        out.push_str(&peer_host_table(peer, entry));
    }
    let ca = ca_file.map(|f| format!("ca = {}\n", toml_str(f)));
    out.push_str(&format!("\n[{host}]\n  capabilities = [\"pull\", \"resolve\"]\n"));
    if let Some(ca) = &ca {
        out.push_str(&format!("  {ca}"));
    }
    if let Some(d) = &entry.dial_timeout {
        out.push_str(&format!("  dial_timeout = {}\n", toml_str(d)));
    }
    if let Some(a) = authorization {
        out.push_str(&format!("\n[{host}.header]\n  Authorization = {}\n", toml_str(a)));
    }
    out
}

/// The `hosts.toml` of a withdrawn entry whose upstream speaks plain HTTP: the upstream alone.
/// Without a file containerd would try `https://<registry>`, which a plain-HTTP registry cannot
/// answer; an https fallback needs no file, so its withdrawn entry is removed instead.
pub fn hosts_toml_upstream_only(mirror_ref: &str, fallback: &str) -> String {
    format!(
        "{}\nserver = {fallback}\n\n[host.{fallback}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        marker_line(mirror_ref),
        fallback = toml_str(fallback)
    )
}

/// The `hosts.toml` of a withdrawn entry while the peer answers: the peer, then the upstream.
pub fn hosts_toml_peer_then_upstream(
    mirror_ref: &str,
    entry: &NodeRegistry,
    peer: &PeerHost,
    fallback: &str,
) -> String {
    let mut out = format!("{}\nserver = {}\n", marker_line(mirror_ref), toml_str(fallback));
    out.push_str(&peer_host_table(peer, entry));
    if fallback.starts_with("http://") {
        out.push_str(&format!(
            "\n[host.{fallback}]\n  capabilities = [\"pull\", \"resolve\"]\n",
            fallback = toml_str(fallback)
        ));
    }
    out
}

pub fn node_config_map(mirror: &RegistryMirror, config: &NodeConfig) -> ConfigMap {
    ConfigMap {
        metadata: meta::object_meta(mirror, names::node_config(mirror), Component::NodeAgent, None),
        data: Some(BTreeMap::from([(
            NODE_CONFIG_KEY.to_string(),
            serde_json::to_string_pretty(config).expect("node config serializes") + "\n",
        )])),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn node_agent_daemon_set(mirror: &RegistryMirror, node: &NodeConfigSpec, settings: &Settings) -> DaemonSet {
    let name = names::node_agent(mirror);
    let certs_dir = node.containerd.certs_dir.clone();
    let mut args = vec![
        "node-agent".to_string(),
        "--mirror".into(),
        mirror.name_any(),
        "--config-map".into(),
        names::node_config(mirror),
        "--status-dir".into(),
        STATUS_DIR.into(),
    ];
    if mirror.spec.client_auth.is_some() {
        args.extend(["--auth-secret".into(), names::node_auth(mirror)]);
    }
    // Host directories the agent needs besides the certs dir: containerd's config dir read-only
    // (to report a missing `config_path`), and the opt-in runtimes' directories read-write.
    let mut extra_mounts: Vec<(&str, String, String, bool)> = Vec::new();
    let containerd_config = Path::new(&node.containerd.config_file);
    if let (Some(dir), Some(file)) = (containerd_config.parent(), containerd_config.file_name()) {
        let in_pod = Path::new(CONTAINERD_CONFIG_MOUNT).join(file);
        args.extend(["--containerd-config".into(), in_pod.display().to_string()]);
        extra_mounts.push(("containerd-config", dir.display().to_string(), CONTAINERD_CONFIG_MOUNT.into(), true));
    }
    if let Some(crio) = &node.crio {
        extra_mounts.push(("crio-drop-in", crio.drop_in_dir.clone(), crio.drop_in_dir.clone(), false));
    }
    if let Some(dir) = node.docker.as_ref().and_then(|d| Path::new(&d.daemon_json).parent().map(Path::to_path_buf)) {
        // The directory, not the file: replacing daemon.json atomically is a rename within it.
        extra_mounts.push(("docker-config", dir.display().to_string(), dir.display().to_string(), false));
    }
    let container = Container {
        name: "node-agent".into(),
        image: Some(settings.operator_image.clone()),
        command: Some(vec![BINARY.into()]),
        args: Some(args),
        env: Some(
            [
                field_env("NODE_NAME", "spec.nodeName"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                field_env("POD_NAME", "metadata.name"),
            ]
            .into_iter()
            // The node's address, for a peer endpoint on it (only then: the template stays as it
            // was for mirrors without peers).
            .chain(node.peers.is_some().then(|| field_env("NODE_IP", "status.hostIP")))
            .collect(),
        ),
        // Ready means: config written and mirror reachable from this node, so the DaemonSet's
        // ready count is the number of nodes really configured.
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![BINARY.into(), "node-agent-ready".into(), "--status-dir".into(), STATUS_DIR.into()]),
            }),
            period_seconds: Some(5),
            timeout_seconds: Some(3),
            failure_threshold: Some(2),
            ..Default::default()
        }),
        resources: Some(node.resources.clone().unwrap_or_else(|| ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), Quantity("64Mi".into()))])),
            ..Default::default()
        })),
        security_context: Some(pod::node_agent_container_security()),
        volume_mounts: Some(
            [
                VolumeMount { name: "runtime-config".into(), mount_path: certs_dir.clone(), ..Default::default() },
                VolumeMount { name: "status".into(), mount_path: STATUS_DIR.into(), ..Default::default() },
            ]
            .into_iter()
            .chain(extra_mounts.iter().map(|(name, _, mount_path, read_only)| VolumeMount {
                name: (*name).into(),
                mount_path: mount_path.clone(),
                read_only: read_only.then_some(true),
                ..Default::default()
            }))
            .collect(),
        ),
        ..Default::default()
    };
    let tolerations = node
        .tolerations
        .clone()
        .unwrap_or_else(|| vec![Toleration { operator: Some("Exists".into()), ..Default::default() }]);
    DaemonSet {
        metadata: meta::object_meta(mirror, name.clone(), Component::NodeAgent, None),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(meta::selector_labels(mirror, Component::NodeAgent, None)),
                match_expressions: None,
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::String("20%".into())),
                    max_surge: None,
                }),
            }),
            revision_history_limit: Some(3),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(meta::labels(mirror, Component::NodeAgent, None)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name),
                    // Probing the mirror from the host's network, through the node's own resolver
                    // (`Default`: the node's resolv.conf and hosts file), is what containerd sees:
                    // an edge host that only cluster DNS knows would pass the probe and fail the
                    // pulls. Service endpoints are cluster IPs and the API is reached by IP.
                    host_network: Some(true),
                    dns_policy: Some("Default".into()),
                    enable_service_links: Some(false),
                    node_selector: (!node.node_selector.is_empty()).then(|| node.node_selector.clone()),
                    tolerations: Some(tolerations),
                    security_context: Some(k8s_openapi::api::core::v1::PodSecurityContext {
                        seccomp_profile: Some(k8s_openapi::api::core::v1::SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    termination_grace_period_seconds: Some(10),
                    volumes: Some(
                        vec![
                            // The runtime config directory the agent writes.
                            Volume {
                                name: "runtime-config".into(),
                                host_path: Some(HostPathVolumeSource {
                                    path: certs_dir,
                                    type_: Some("DirectoryOrCreate".into()),
                                }),
                                ..Default::default()
                            },
                            Volume {
                                name: "status".into(),
                                empty_dir: Some(EmptyDirVolumeSource {
                                    medium: Some("Memory".into()),
                                    size_limit: Some(Quantity("1Mi".into())),
                                }),
                                ..Default::default()
                            },
                        ]
                        .into_iter()
                        .chain(extra_mounts.into_iter().map(|(name, host_path, _, _)| Volume {
                            name: name.into(),
                            host_path: Some(HostPathVolumeSource {
                                path: host_path,
                                type_: Some("DirectoryOrCreate".into()),
                            }),
                            ..Default::default()
                        }))
                        .collect(),
                    ),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A CA certificate for unit tests (public part only; its key was thrown away).
#[cfg(test)]
pub(crate) const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBrjCCAVOgAwIBAgIURP2fMDZ8+DAcCS4RRNMIzEFda1gwCgYIKoZIzj0EAwIw
IzEhMB8GA1UEAwwYbWlycm9yZmxlZXQgdW5pdC10ZXN0IENBMCAXDTI2MTIwMjA3
NTcyOVoYDzIxMjYxMTA4MDc1NzI5WjAjMSEwHwYDVQQDDBhtaXJyb3JmbGVldCB1
bml0LXRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARfd4bOic6r36p7
SCdNMGkeB3gEobb1i/7rLcjDheoPjUi4wtLFzYtE1Ev1D7w7Xq505wG8FfW+CvJY
QXZNJjgRo2MwYTAdBgNVHQ4EFgQU0gAcTnYk4uTdIpEYyvFgWrswi0QwHwYDVR0j
BBgwFoAU0gAcTnYk4uTdIpEYyvFgWrswi0QwDwYDVR0TAQH/BAUwAwEB/zAOBgNV
HQ8BAf8EBAMCAgQwCgYIKoZIzj0EAwIDSQAwRgIhAJk7E6LROw2cTYKVMJ58AQRC
RWR+yxVTNoGE0I1RSBzvAiEA03kOmzGp4Q/9Vn0aFPlHMEFRq5J3GtXbXmoRgAcY
pok=
-----END CERTIFICATE-----
";

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(upstreams: &str, node_config: &str) -> RegistryMirror {
        serde_yaml::from_str(&format!(
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: m, namespace: ns}}\n\
             spec:\n  upstreams: {upstreams}\n  nodeConfig: {node_config}\n"
        ))
        .unwrap()
    }

    fn config(m: &RegistryMirror) -> NodeConfig {
        node_config(m, m.spec.node_config.as_ref().unwrap(), &Inputs::default(), &Settings::default())
    }

    #[test]
    fn the_fallback_keeps_a_plain_http_scheme_only_when_the_remote_is_the_registry_itself() {
        for (registry, remote, want) in [
            // The registry serves plain HTTP at its own name: containerd must not speak TLS to it.
            ("10.200.0.1:5001", "http://10.200.0.1:5001", "http://10.200.0.1:5001"),
            ("registry.corp:5000", "http://registry.corp:5000/", "http://registry.corp:5000"),
            ("registry.corp", "http://registry.corp", "http://registry.corp"),
            // A default port, written or not, is the same authority.
            ("registry.corp", "http://registry.corp:80", "http://registry.corp"),
            ("registry.corp:80", "http://registry.corp", "http://registry.corp:80"),
            ("registry.corp:443", "https://registry.corp", "https://registry.corp:443"),
            // https at the registry's own name: what it always was.
            ("ghcr.io", "https://ghcr.io", "https://ghcr.io"),
            ("registry.corp:5000", "https://registry.corp:5000", "https://registry.corp:5000"),
            // The remote is somewhere else (a pull-through from another host, another port): it
            // says nothing about the registry's own scheme.
            ("ghcr.io", "http://ghcr-cache.internal:5000", "https://ghcr.io"),
            ("registry.corp", "http://registry.corp:5000", "https://registry.corp"),
            ("registry.corp:5000", "http://registry.corp:5001", "https://registry.corp:5000"),
            ("registry.corp:5000", "not a url", "https://registry.corp:5000"),
            // docker.io is a name, not a host.
            ("docker.io", "https://registry-1.docker.io", "https://registry-1.docker.io"),
            ("docker.io", "http://10.0.0.9:5000", "https://registry-1.docker.io"),
        ] {
            assert_eq!(upstream_server(registry, remote), want, "{registry} at {remote}");
        }
    }

    #[test]
    fn node_config_carries_the_upstreams_scheme_into_hosts_toml() {
        let m = mirror(
            "[{name: lab, registry: \"10.200.0.1:5001\", remoteURL: \"http://10.200.0.1:5001\"},\
              {name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}]",
            "{fallbackToUpstream: true}",
        );
        let cfg = config(&m);
        assert_eq!(cfg.registries[0].fallback.as_deref(), Some("http://10.200.0.1:5001"));
        assert_eq!(cfg.registries[1].fallback.as_deref(), Some("https://registry-1.docker.io"));
        let text = hosts_toml(&cfg.mirror, &cfg.registries[0], None);
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["server"].as_str(), Some("http://10.200.0.1:5001"), "{text}");

        let air_gapped = mirror(
            "[{name: lab, registry: \"10.200.0.1:5001\", remoteURL: \"http://10.200.0.1:5001\"}]",
            "{fallbackToUpstream: false}",
        );
        assert_eq!(config(&air_gapped).registries[0].fallback, None);
    }

    fn edge_mirror(node_config: &str) -> RegistryMirror {
        serde_yaml::from_str(&format!(
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: m, namespace: ns}}\n\
             spec:\n  upstreams: [{{name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}}]\n  \
             edge: {{domain: mirror.example.com, tlsSecretRef: {{name: edge-tls}}}}\n  nodeConfig: {node_config}\n"
        ))
        .unwrap()
    }

    fn entry(fallback: Option<&str>) -> NodeRegistry {
        NodeRegistry {
            registry: "docker.io".into(),
            upstream: "hub".into(),
            mirror: "https://hub.mirror.example.com".into(),
            fallback: fallback.map(str::to_string),
            dial_timeout: None,
        }
    }

    #[test]
    fn dial_timeout_goes_in_the_mirror_host_entry_only() {
        let mut e = entry(Some("https://registry-1.docker.io"));
        assert!(!hosts_toml("ns/m", &e, None).contains("dial_timeout"));
        e.dial_timeout = Some("750ms".into());
        let text = hosts_toml("ns/m", &e, None);
        let doc: toml::Table = text.parse().unwrap();
        let host = doc["host"].as_table().unwrap().values().next().unwrap();
        assert_eq!(host["dial_timeout"].as_str(), Some("750ms"), "{text}");
        assert!(doc.get("dial_timeout").is_none(), "not on the upstream server: {text}");
    }

    #[test]
    fn hosts_toml_names_the_edge_ca_for_the_mirror_host_only() {
        let ca = edge_ca_path("/etc/containerd/certs.d", "docker.io");
        assert_eq!(ca, "/etc/containerd/certs.d/docker.io/mirrorfleet-edge-ca.crt");
        let text = hosts_toml_with_ca("ns/m", &entry(Some("https://registry-1.docker.io")), Some("Basic x"), Some(&ca));
        let doc: toml::Table = text.parse().unwrap();
        let host = &doc["host"]["https://hub.mirror.example.com"];
        assert_eq!(host["ca"].as_str(), Some(ca.as_str()), "{text}");
        assert_eq!(host["header"]["Authorization"].as_str(), Some("Basic x"));
        // The upstream is verified with the node's own CAs, not the edge's.
        assert!(doc.get("ca").is_none(), "{text}");
        assert_eq!(text.lines().next(), Some(marker_line("ns/m").as_str()));

        // Mirror-only: the server is the mirror, so it trusts the CA too.
        let text = hosts_toml_with_ca("ns/m", &entry(None), None, Some(&ca));
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["server"].as_str(), Some("https://hub.mirror.example.com"));
        assert_eq!(doc["ca"].as_str(), Some(ca.as_str()), "{text}");
        assert_eq!(doc["host"]["https://hub.mirror.example.com"]["ca"].as_str(), Some(ca.as_str()));

        // Without a CA the file is byte for byte what it always was.
        let e = entry(Some("https://registry-1.docker.io"));
        assert_eq!(hosts_toml_with_ca("ns/m", &e, None, None), hosts_toml("ns/m", &e, None));
        assert!(!hosts_toml("ns/m", &e, None).contains("ca ="));
    }

    #[test]
    fn the_edge_ca_bundle_keeps_certificates_only() {
        let key = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
        let bundle = edge_ca_bundle(&format!("# issuer\n{TEST_CA_PEM}{key}{TEST_CA_PEM}")).unwrap();
        assert_eq!(bundle, format!("{TEST_CA_PEM}{TEST_CA_PEM}"));
        assert!(!bundle.contains("PRIVATE KEY"));
        assert!(edge_ca_bundle("").unwrap_err().contains("no PEM certificate"));
        assert!(edge_ca_bundle(key).unwrap_err().contains("no PEM certificate"));
        let garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
        assert!(edge_ca_bundle(garbage).unwrap_err().contains("does not parse"), "{:?}", edge_ca_bundle(garbage));
        // The file the agent writes: our marker first, then PEM any reader accepts.
        let file = edge_ca_file("ns/m", &bundle);
        assert_eq!(file.lines().next(), Some(marker_line("ns/m").as_str()));
        assert_eq!(edge_ca_certificates(&file).unwrap().len(), 2);
    }

    #[test]
    fn via_edge_passes_the_edge_secrets_ca_to_the_nodes_and_via_service_does_not() {
        let inputs = Inputs { edge_ca: Some(format!("{TEST_CA_PEM}\n")), ..Inputs::default() };
        let edge = edge_mirror("{via: Edge}");
        let cfg = node_config(&edge, edge.spec.node_config.as_ref().unwrap(), &inputs, &Settings::default());
        assert_eq!(cfg.edge_ca.as_deref(), Some(TEST_CA_PEM));
        let json = serde_json::to_value(&cfg).unwrap();
        assert_eq!(json["edgeCA"].as_str(), Some(TEST_CA_PEM));
        let service = edge_mirror("{via: Service}");
        let cfg = node_config(&service, service.spec.node_config.as_ref().unwrap(), &inputs, &Settings::default());
        assert_eq!(cfg.edge_ca, None);
        assert!(serde_json::to_value(&cfg).unwrap().get("edgeCA").is_none(), "no key without a CA");
        // Without ca.crt: nothing, and the node trusts only its own CAs (a public CA's edge).
        let cfg = node_config(&edge, edge.spec.node_config.as_ref().unwrap(), &Inputs::default(), &Settings::default());
        assert_eq!(cfg.edge_ca, None);
    }

    #[test]
    fn render_reads_only_ca_crt_of_the_edge_secret_and_writes_the_ca_beside_hosts_toml() {
        use crate::render::{render_str, RenderOptions};
        let secret = |ca: &str| {
            format!(
                "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: edge-tls, namespace: ns}}\n\
                 stringData:\n  tls.crt: cert\n  tls.key: THE-PRIVATE-KEY\n  ca.crt: {ca}\n---\n"
            )
        };
        let spec = "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: m, namespace: ns}\n\
                    spec:\n  upstreams: [{name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}]\n  \
                    edge: {domain: mirror.example.com, tlsSecretRef: {name: edge-tls}}\n  nodeConfig: {via: Edge}\n";
        let pem = serde_json::to_string(TEST_CA_PEM).unwrap();
        let r = render_str(&format!("{}{spec}", secret(&pem)), &RenderOptions::default()).unwrap().remove(0);
        let files = &r.fleet.files;
        let ca_file = &files["nodes/containerd/certs.d/docker.io/mirrorfleet-edge-ca.crt"];
        assert_eq!(ca_file, &edge_ca_file("ns/m", TEST_CA_PEM));
        let hosts = &files["nodes/containerd/certs.d/docker.io/hosts.toml"];
        assert!(hosts.contains("  ca = \"/etc/containerd/certs.d/docker.io/mirrorfleet-edge-ca.crt\"\n"), "{hosts}");
        let cm = r.fleet.children.config_maps.iter().find(|c| c.metadata.name.as_deref() == Some("m-node-config"));
        let json = &cm.unwrap().data.as_ref().unwrap()[NODE_CONFIG_KEY];
        assert!(json.contains("edgeCA") && !json.contains("THE-PRIVATE-KEY") && !json.contains("tls.key"), "{json}");

        // A ca.crt that is no certificate is refused with the field path, not passed on.
        let Err(err) = render_str(&format!("{}{spec}", secret("not-a-cert")), &RenderOptions::default()) else {
            panic!("a ca.crt without a certificate was accepted");
        };
        let msg = err.to_string();
        assert!(msg.contains("spec.edge.tlsSecretRef") && msg.contains("ca.crt"), "{msg}");
        // cert-manager's empty ca.crt (ACME) means: no private CA.
        let r = render_str(&format!("{}{spec}", secret("\"\"")), &RenderOptions::default()).unwrap().remove(0);
        assert!(!r.fleet.files.keys().any(|k| k.ends_with(EDGE_CA_FILE)));
    }

    #[test]
    fn the_peer_endpoint_takes_the_nodes_address() {
        let peer = PeerConfig {
            endpoint: "http://${NODE_IP}:30020".into(),
            dial_timeout: "200ms".into(),
            registry_header: None,
        };
        assert_eq!(peer.resolve(Some("10.0.0.7")).unwrap(), "http://10.0.0.7:30020");
        assert_eq!(peer.resolve(Some("fd00::7")).unwrap(), "http://[fd00::7]:30020");
        assert!(peer.resolve(None).unwrap_err().contains("NODE_IP"));
        assert!(peer.resolve(Some("")).is_err());
        let fixed = PeerConfig { endpoint: "http://127.0.0.1:4001".into(), ..peer };
        assert_eq!(fixed.resolve(None).unwrap(), "http://127.0.0.1:4001");
    }
}
