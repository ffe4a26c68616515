//! Pure builders: a validated RegistryMirror (plus the few facts read from the cluster, in
//! [`Inputs`]) becomes every desired child object and the raw config files. Nothing here talks
//! to the API server or the file system; the same output serves `render` and the controller.

pub mod auth;
pub mod cleanup;
pub mod edge;
pub mod keeper;
pub mod meta;
pub mod network;
pub mod node;
pub mod pod;
pub mod proxy;
pub mod rbac;
pub mod sidecar;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};

use crate::api::validate::{validate, InvalidSpec, Problem};
use crate::api::{RegistryMirror, Upstream, UpstreamAuth};
use meta::{names, Component};

/// YAML text of a value: the config files inside ConfigMaps and `render`'s manifests. serde-saphyr
/// writes YAML straight from serde (no libyaml event pipeline; ~5x faster than serde_yaml here)
/// and quotes every string a YAML 1.1 reader (Go's yaml.v2, as in Distribution and kubectl) would
/// take for a bool, number, null or timestamp; tests/render_invariants.rs reads every rendered
/// document back. Multi-line strings (the config files) are literal blocks; long single-line
/// strings stay on their line, unfolded, as serde_yaml wrote them.
pub fn to_yaml<T: serde::Serialize>(value: &T) -> String {
    let mut out = String::new();
    write_yaml(&mut out, value);
    out
}

/// [`to_yaml`] appended to `out`: `render` writes every document of a mirror into one buffer
/// instead of a String per document that is then copied into the stream.
pub fn write_yaml<T: serde::Serialize>(out: &mut String, value: &T) {
    let options = serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX };
    serde_saphyr::to_fmt_writer_with_options(out, value, options).expect("serializes to YAML")
}

/// Operator-wide settings the builders need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Image of this operator; the node agent and the cleanup job run it.
    pub operator_image: String,
    /// The cluster's DNS domain, for Service names Envoy resolves.
    pub cluster_domain: String,
    /// The Services' `trafficDistribution` with `zoneLocal`: [`PREFER_CLOSE`] everywhere it
    /// exists (1.31+), [`PREFER_SAME_ZONE`], its new name, from 1.34 on ([`same_zone_value`]).
    pub same_zone_traffic: &'static str,
}

/// `trafficDistribution` for "same zone first", Kubernetes 1.31 to 1.33 (deprecated from 1.34).
pub const PREFER_CLOSE: &str = "PreferClose";
/// Its name from Kubernetes 1.34 (beta, on by default; GA in 1.35).
pub const PREFER_SAME_ZONE: &str = "PreferSameZone";

/// The `trafficDistribution` value for an API server of this minor version.
pub fn same_zone_value(minor: u32) -> &'static str {
    if minor >= 34 {
        PREFER_SAME_ZONE
    } else {
        PREFER_CLOSE
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            operator_image: format!("ghcr.io/mirrorfleet/mirrorfleet:{}", env!("CARGO_PKG_VERSION")),
            cluster_domain: "cluster.local".into(),
            same_zone_traffic: PREFER_CLOSE,
        }
    }
}

/// Facts from the cluster that shape the children. All optional: `render` runs without them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    /// User -> plain password from `clientAuth.usersSecretRef`; required when clientAuth is set.
    pub client_users: Option<BTreeMap<String, String>>,
    /// resourceVersion of each referenced Secret, so a rotation rolls the pods that read it.
    pub secret_versions: BTreeMap<String, String>,
    /// Upstream name -> `http://<cluster IP>:5000` of its proxy Service.
    pub proxy_endpoints: BTreeMap<String, String>,
    /// The `ca.crt` of the edge TLS Secret as it is there, read only for `nodeConfig.via: Edge`:
    /// the CA nodes then trust for the edge hosts. A certificate, not a credential.
    pub edge_ca: Option<String>,
    /// Upstream name -> the challenge the operator learned from the upstream, for upstreams
    /// without `auth` that are not known public registries ([`upstream_auth`]).
    pub learned_auth: BTreeMap<String, UpstreamAuth>,
}

/// The challenge an upstream's sidecar answers with: the spec's `auth`, a known public
/// registry's, else the one the operator learned. None: the proxy runs without the sidecar.
pub fn upstream_auth(upstream: &Upstream, inputs: &Inputs) -> Option<UpstreamAuth> {
    upstream.effective_auth().or_else(|| inputs.learned_auth.get(&upstream.name).cloned())
}

/// Every child object of one RegistryMirror. The apply step destructures this without `..`, so
/// adding a kind here without applying it does not compile.
#[derive(Clone, Debug, Default)]
pub struct DesiredChildren {
    pub service_accounts: Vec<ServiceAccount>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub secrets: Vec<Secret>,
    pub config_maps: Vec<ConfigMap>,
    pub persistent_volume_claims: Vec<PersistentVolumeClaim>,
    /// `spec.networkPolicy`: applied before the pods they guard.
    pub network_policies: Vec<NetworkPolicy>,
    pub services: Vec<Service>,
    pub deployments: Vec<Deployment>,
    pub daemon_sets: Vec<DaemonSet>,
    pub cron_jobs: Vec<CronJob>,
}

/// The children plus the raw files they carry, by relative path (for `render -o`).
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    pub children: DesiredChildren,
    pub files: BTreeMap<String, String>,
}

/// Validates the mirror and its inputs, then builds the fleet.
pub fn build(mirror: &RegistryMirror, inputs: &Inputs, settings: &Settings) -> Result<Fleet, InvalidSpec> {
    validate(mirror)?;
    validate_inputs(mirror, inputs)?;
    Ok(build_valid(mirror, inputs, settings))
}

/// What the inputs must provide for this spec.
pub fn validate_inputs(mirror: &RegistryMirror, inputs: &Inputs) -> Result<(), InvalidSpec> {
    let mut problems = Vec::new();
    if let Some(auth) = &mirror.spec.client_auth {
        match &inputs.client_users {
            None => problems.push(Problem {
                path: "spec.clientAuth.usersSecretRef".into(),
                message: format!("Secret {:?} is not available", auth.users_secret_ref.name),
            }),
            Some(users) if users.is_empty() => problems.push(Problem {
                path: "spec.clientAuth.usersSecretRef".into(),
                message: format!("Secret {:?} has no users", auth.users_secret_ref.name),
            }),
            Some(users) => {
                for user in users.keys() {
                    if user.is_empty() || user.contains(':') || user.chars().any(char::is_whitespace) {
                        problems.push(Problem {
                            path: "spec.clientAuth.usersSecretRef".into(),
                            message: format!("user name {user:?} cannot be written to htpasswd (no ':' or spaces)"),
                        });
                    }
                }
                if let Some(node_user) = &auth.node_user {
                    if !users.contains_key(node_user) {
                        problems.push(Problem {
                            path: "spec.clientAuth.nodeUser".into(),
                            message: format!(
                                "user {node_user:?} is not a key of Secret {:?}",
                                auth.users_secret_ref.name
                            ),
                        });
                    }
                }
            }
        }
    }
    let via_edge = mirror.spec.node_config.as_ref().is_some_and(|n| n.via == crate::api::NodeRoute::Edge);
    let tls = mirror.spec.edge.as_ref().and_then(|e| e.tls_secret_ref.as_ref());
    if let (true, Some(pem), Some(tls)) = (via_edge, &inputs.edge_ca, tls) {
        if let Err(why) = node::edge_ca_bundle(pem) {
            problems.push(Problem {
                path: "spec.edge.tlsSecretRef".into(),
                message: format!(
                    "key {:?} of Secret {:?} {why}; nodes would be told to trust it (remove the key or fix it)",
                    node::EDGE_CA_KEY,
                    tls.name
                ),
            });
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec(problems))
    }
}

/// Builds the fleet of an already validated mirror. Separate so benchmarks can time the
/// builders alone; callers outside tests use [`build`].
pub fn build_valid(mirror: &RegistryMirror, inputs: &Inputs, settings: &Settings) -> Fleet {
    let spec = &mirror.spec;
    let mut c = DesiredChildren::default();
    // One of each per upstream plus the edge's: reserved so the large structs move once.
    let per_upstream = spec.upstreams.len() + 2;
    c.config_maps.reserve(per_upstream);
    c.deployments.reserve(per_upstream);
    c.services.reserve(per_upstream);
    let mut files = BTreeMap::new();

    c.network_policies = network::network_policies(mirror, inputs);

    // Proxies and what they read.
    let htpasswd =
        spec.client_auth.as_ref().and(inputs.client_users.as_ref()).map(|users| auth::htpasswd(mirror, users));
    c.service_accounts.push(rbac::service_account(
        mirror,
        names::proxy_service_account(mirror),
        Component::Proxy,
        false,
    ));
    for upstream in &spec.upstreams {
        let auth = upstream_auth(upstream, inputs);
        let envoy = auth.as_ref().map(|auth| sidecar::sidecar_config(mirror, upstream, auth));
        let config = proxy::registry_config(mirror, upstream, envoy.is_some());
        c.config_maps.push(proxy::proxy_config_map(mirror, upstream, &config, envoy.as_deref()));
        c.deployments.push(proxy::proxy_deployment(
            mirror,
            upstream,
            &config,
            envoy.as_deref(),
            htpasswd.as_deref(),
            inputs,
            settings,
        ));
        c.services.push(proxy::proxy_service(mirror, upstream, settings));
        c.persistent_volume_claims.extend(proxy::proxy_pvc(mirror, upstream));
        files.insert(format!("proxy/{}/{}", upstream.name, proxy::CONFIG_FILE), config);
        if let Some(envoy) = envoy {
            files.insert(format!("proxy/{}/{}", upstream.name, sidecar::CONFIG_FILE), envoy);
        }
    }
    if let Some(h) = &htpasswd {
        c.secrets.push(auth::htpasswd_secret(mirror, h));
    }

    if let Some(edge) = &spec.edge {
        let envoy = edge::envoy_files(mirror, edge, &settings.cluster_domain);
        c.service_accounts.push(rbac::service_account(mirror, names::edge(mirror), Component::Edge, false));
        c.config_maps.push(edge::edge_config_map(mirror, &envoy));
        c.deployments.push(edge::edge_deployment(mirror, edge, &envoy, inputs));
        c.services.push(edge::edge_service(mirror, edge, settings));
        files.insert(format!("edge/{}", edge::BOOTSTRAP_FILE), envoy.bootstrap);
        files.insert(format!("edge/{}", edge::LDS_FILE), envoy.lds);
        files.insert(format!("edge/{}", edge::CDS_FILE), envoy.cds);
    }

    if let Some(cleanup) = &spec.cleanup {
        let name = names::cleanup(mirror);
        let proxies: Vec<String> = spec.upstreams.iter().map(|u| names::proxy(mirror, &u.name)).collect();
        c.service_accounts.push(rbac::service_account(mirror, name.clone(), Component::Cleanup, true));
        c.roles.push(rbac::role(
            mirror,
            name.clone(),
            Component::Cleanup,
            vec![
                // Find this mirror's proxy Deployments and roll them one at a time (purge).
                rbac::rule("apps", &["deployments"], &["get", "patch"], Some(proxies)),
                // Wait for the rollout: watch the proxies' pods become ready again.
                rbac::rule("", &["pods"], &["get", "list", "watch"], None),
                // Report the run's result where the controller reads it.
                rbac::rule("", &["events"], &["create", "patch"], None),
            ],
        ));
        c.role_bindings.push(rbac::role_binding(mirror, name, Component::Cleanup));
        c.cron_jobs.push(cleanup::cleanup_cron_job(mirror, cleanup, settings));
    }

    if let Some(node) = &spec.node_config {
        let name = names::node_agent(mirror);
        let config = node::node_config(mirror, node, inputs, settings);
        c.config_maps.push(node::node_config_map(mirror, &config));
        if let (Some(auth), Some(users)) = (&spec.client_auth, &inputs.client_users) {
            if let Some(password) = auth.node_user.as_ref().and_then(|u| users.get(u).map(|p| (u, p))) {
                let header = auth::basic_authorization(password.0, password.1);
                c.secrets.push(auth::node_auth_secret(mirror, &header));
            }
        }
        let mut rules = vec![
            // Follow the desired node config (watch, so changes land in seconds).
            rbac::rule("", &["configmaps"], &["get", "list", "watch"], Some(vec![names::node_config(mirror)])),
            // Report the applied config on the agent's own Pod (APPLIED_CONFIG_ANNOTATION).
            rbac::rule("", &["pods"], &["get", "patch"], None),
            // Say why a node is not configured, with the node's name.
            rbac::rule("", &["events"], &["create", "patch"], None),
        ];
        if spec.client_auth.is_some() {
            // The Authorization header nodes send to the mirrors.
            rules.push(rbac::rule("", &["secrets"], &["get", "list", "watch"], Some(vec![names::node_auth(mirror)])));
        }
        c.service_accounts.push(rbac::service_account(mirror, name.clone(), Component::NodeAgent, true));
        c.roles.push(rbac::role(mirror, name.clone(), Component::NodeAgent, rules));
        c.role_bindings.push(rbac::role_binding(mirror, name, Component::NodeAgent));
        c.daemon_sets.push(node::node_agent_daemon_set(mirror, node, settings));
        for entry in &config.registries {
            let dir = format!("nodes/containerd/certs.d/{}", entry.registry);
            let ca_file = config.edge_ca.as_ref().map(|bundle| {
                files.insert(format!("{dir}/{}", node::EDGE_CA_FILE), node::edge_ca_file(&config.mirror, bundle));
                node::edge_ca_path(&config.containerd.certs_dir, &entry.registry)
            });
            files.insert(
                format!("{dir}/hosts.toml"),
                node::hosts_toml_with_ca(&config.mirror, entry, None, ca_file.as_deref()),
            );
        }
    }

    Fleet { children: c, files }
}
