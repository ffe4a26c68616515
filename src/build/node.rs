//! Node configuration: the desired runtime files (containerd `hosts.toml` per registry) in the
//! node-config ConfigMap, and the node-agent DaemonSet that writes them on every selected node.
//!
//! The ConfigMap holds structured data, not finished files: the agent renders each file with
//! [`hosts_toml`] so it can add the Authorization header from its Secret (credentials never sit in
//! a ConfigMap) and withdraw entries whose mirror is unreachable.

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
use crate::api::{NodeConfigSpec, NodeRoute, RegistryMirror};

/// The key of the node-config ConfigMap that holds [`NodeConfig`] as JSON.
pub const NODE_CONFIG_KEY: &str = "node-config.json";
/// First line of every file the agent writes; the agent touches no file without it.
pub const MANAGED_MARKER: &str = "# managed-by: mirrorfleet";
pub const STATUS_DIR: &str = "/run/mirrorfleet";
pub const BINARY: &str = "/usr/local/bin/mirrorfleet";
/// Where the agent sees the directory of containerd's config file (read-only).
pub const CONTAINERD_CONFIG_MOUNT: &str = "/host/containerd";
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
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The containerd `hosts.toml` for one registry. With a fallback, the mirror is a `[host]` tried
/// first and `server` is the real registry. Mirror-only makes the mirror the `server` as well, so
/// containerd has nothing else to try. Either way there is a `[host]` table: containerd 1.6
/// ignores a hosts.toml without one (logging only an error) and silently pulls upstream.
pub fn hosts_toml(mirror_ref: &str, entry: &NodeRegistry, authorization: Option<&str>) -> String {
    let server = entry.fallback.as_deref().unwrap_or(&entry.mirror);
    let host = format!("host.{}", toml_str(&entry.mirror));
    let mut out = format!(
        "{MANAGED_MARKER} (RegistryMirror {mirror_ref}); this file is rewritten and removed by mirrorfleet.\n\
         server = {}\n\n[{host}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        toml_str(server)
    );
    if let Some(a) = authorization {
        out.push_str(&format!("\n[{host}.header]\n  Authorization = {}\n", toml_str(a)));
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
        env: Some(vec![
            field_env("NODE_NAME", "spec.nodeName"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_NAME", "metadata.name"),
        ]),
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
                    // Probing the mirror from the host's network is what containerd will see.
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
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
}
