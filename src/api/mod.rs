//! The `RegistryMirror` custom resource (`mirrorfleet.io/v1alpha1`): spec, status and the CRD.
//!
//! Everything the API server can check is in the schema (patterns, bounds, enums, CEL rules);
//! what it cannot (referenced Secrets, names derived from defaults) lives in [`validate`].

// kube's printcolumn(...) entries repeat `type_ = "string"`, which this lint mistakes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod conflicts;
pub mod crd;
pub mod fields;
pub mod reference;
pub mod validate;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// DNS-1123 label: what Kubernetes accepts as a Service/Deployment name segment.
pub const DNS1123_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// DNS-1123 subdomain: what Kubernetes accepts as a Secret name.
pub const DNS1123_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// An absolute directory path without a trailing slash or whitespace.
pub const ABS_DIR: &str = r"^/[^\s:]*[^/\s:]$";
/// A registry name as clients write it in an image reference: host name with optional port.
pub const REGISTRY_NAME: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(:[0-9]{1,5})?$";
/// A DNS host name (lower case, at least one dot is not required: `localhost`-style names are
/// rejected by the edge rules separately because Envoy needs a routable virtual host).
pub const HOST_NAME: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$";
/// Go `time.ParseDuration` syntax, as Distribution reads `proxy.ttl`.
pub const GO_DURATION: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";
/// A peer endpoint: http(s), a host name, IP or the `${NODE_IP}` placeholder, an optional port,
/// nothing after.
pub const PEER_ENDPOINT: &str =
    r"^https?://(\$\{NODE_IP\}|[a-z0-9]([-a-z0-9.]*[a-z0-9])?|\[[0-9a-fA-F:.]+\])(:[0-9]{1,5})?$";
/// An HTTP header name (RFC 9110 token).
pub const HEADER_NAME: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";
/// The placeholder of [`PeersSpec::endpoint`] for the node's own address.
pub const NODE_IP_PLACEHOLDER: &str = "${NODE_IP}";
/// The shape of an IPv4 or IPv6 CIDR; [`validate`] parses it (CEL's `isCIDR` needs Kubernetes 1.31).
pub const CIDR: &str = r"^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*)/[0-9]{1,3}$";
/// Five-field cron or one of the `@` macros the CronJob controller understands.
pub const CRON_SCHEDULE: &str = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$";

/// A full image reference: registry host (with optional port), repository, and a tag or a
/// sha256 digest.
pub const IMAGE_REFERENCE: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?(:[0-9]{1,5})?/[a-z0-9]+([._/-][a-z0-9]+)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[a-f0-9]{64})$";

/// The upstream list bound. The CEL rule that keeps registries unique is quadratic in the list
/// length and the API server rejects a CRD whose estimated rule cost is too high; 128 upstream
/// registries is far beyond any real fleet and keeps that rule comfortably inside the budget.
pub const MAX_UPSTREAMS: usize = 128;
/// Length budget for names: child objects are named `<mirror>-proxy-<upstream>` and must stay a
/// valid 63-character DNS label; CronJob names must leave room for the Job suffix (52).
pub const MAX_MIRROR_NAME: usize = 40;
pub const MAX_MIRROR_PLUS_UPSTREAM: usize = 56;

/// A fleet of pull-through registry mirrors and the node configuration that points container
/// runtimes at them.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "mirrorfleet.io",
    version = "v1alpha1",
    kind = "RegistryMirror",
    namespaced,
    status = "RegistryMirrorStatus",
    shortname = "regmirror",
    category = "mirrorfleet",
    doc = "A fleet of pull-through registry mirrors and the node configuration that points container runtimes at them.",
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(
        name = "Upstreams",
        type_ = "string",
        description = "upstreams with ready proxies / all",
        json_path = ".status.upstreamsReady"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        description = "nodes configured / desired",
        json_path = ".status.nodesConfigured"
    ),
    printcolumn(
        name = "Cache",
        type_ = "string",
        description = "fill of the fullest proxy cache",
        json_path = ".status.cacheFill"
    ),
    printcolumn(
        name = "Hits",
        type_ = "string",
        description = "blob hit ratio of the proxy caches",
        json_path = ".status.cacheHitRatio"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.nodeConfig) || !has(self.clientAuth) || has(self.clientAuth.nodeUser)",
     "message": "clientAuth.nodeUser is required when nodeConfig is set: the node agent must authenticate",
     "fieldPath": ".clientAuth"},
    {"rule": "!has(self.nodeConfig) || !has(self.nodeConfig.via) || self.nodeConfig.via != 'Edge' || (has(self.edge) && has(self.edge.tlsSecretRef))",
     "message": "nodeConfig.via Edge needs edge with tlsSecretRef",
     "fieldPath": ".nodeConfig.via"},
    {"rule": "!has(self.proxy) || !has(self.proxy.storage) || !has(self.proxy.storage.persistentVolumeClaim) || !has(self.proxy.replicas) || self.proxy.replicas == 1 || 'ReadWriteMany' in self.proxy.storage.persistentVolumeClaim.accessModes",
     "message": "more than one proxy replica on persistentVolumeClaim storage needs accessModes [ReadWriteMany]",
     "fieldPath": ".proxy.replicas"},
    {"rule": "!has(self.prefetch) || !has(self.proxy) || !has(self.proxy.storage) || !has(self.proxy.storage.s3)",
     "message": "prefetch needs emptyDir or persistentVolumeClaim storage: the proxies' cache keepers run it",
     "fieldPath": ".prefetch"},
    {"rule": "!has(self.prefetch) || !has(self.clientAuth) || has(self.clientAuth.nodeUser)",
     "message": "prefetch with clientAuth needs clientAuth.nodeUser: the prefetch authenticates as that user",
     "fieldPath": ".prefetch"}
]))]
pub struct RegistryMirrorSpec {
    /// One pull-through cache per entry. Names and registries are unique in the list.
    #[schemars(length(min = 1, max = 128))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
        "x-kubernetes-validations" = [
            {"rule": "self.all(u, self.exists_one(v, v.registry == u.registry))",
             "message": "each registry may appear in only one upstream"},
            {"rule": "self.all(u, !has(u.host) || self.exists_one(v, has(v.host) && v.host == u.host))",
             "message": "each edge host may be used by only one upstream"}
        ]
    ))]
    pub upstreams: Vec<Upstream>,

    /// The registry-proxy pods (Distribution registry in proxy mode), one Deployment per upstream.
    #[serde(default)]
    pub proxy: ProxySpec,

    /// Optional htpasswd authentication in front of every proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,

    /// Optional Envoy edge proxy: one endpoint, host-based routing to the proxies, TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<EdgeSpec>,

    /// Optional scheduled cache cleanup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<CleanupSpec>,

    /// Optional node agent that points every selected node's container runtime at the mirrors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_config: Option<NodeConfigSpec>,

    /// Optional NetworkPolicies in front of the proxies and the edge: only the edge, the operator,
    /// the listed namespaces and the listed address ranges reach them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,

    /// The proxies' cache management (filesystem storage: `emptyDir` and `persistentVolumeClaim`):
    /// watermarks, expiry by last pull and pins, carried out by a `cache-keeper` container in every
    /// proxy pod. Unset: the defaults below. An `s3` bucket is not managed (its lifecycle rules and
    /// `proxy.ttl` are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,

    /// Images every proxy replica caches ahead of their first pull: after each rollout and on a
    /// schedule, through the proxy itself (the upstream credentials stay there), by its cache
    /// keeper. Needs filesystem storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<PrefetchSpec>,

    /// Zone-local serving: the replicas of each proxy and of the edge spread over zones
    /// (`topology.kubernetes.io/zone`, best effort), and their Services send each client to
    /// endpoints in its own zone when that zone has some (`trafficDistribution`: `PreferSameZone`
    /// from Kubernetes 1.34, `PreferClose` on 1.31-1.33; 1.30 drops the field and routes to every
    /// endpoint). `false`:
    /// every endpoint, whatever its zone.
    #[serde(default = "default_true")]
    pub zone_local: bool,
}

/// What every proxy replica fetches before anyone pulls it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchSpec {
    /// Full references with the upstream's registry, by tag or digest
    /// (`docker.io/library/nginx:1.27`).
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 255, "pattern": IMAGE_REFERENCE}))]
    pub images: Vec<String>,
    /// Cron schedule (UTC) of further rounds, besides the one after each rollout; unset: after
    /// rollouts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[schemars(regex(pattern = CRON_SCHEDULE))]
    pub schedule: Option<String>,
    /// Platforms fetched from a multi-platform image (`os/architecture`).
    #[serde(default = "default_prefetch_platforms")]
    #[schemars(length(min = 1, max = 8))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 64, "pattern": "^[a-z0-9]+/[a-z0-9]+$"}))]
    pub platforms: Vec<String>,
}

fn default_prefetch_platforms() -> Vec<String> {
    vec!["linux/amd64".into(), "linux/arm64".into()]
}

/// What each proxy replica keeps. Access recency comes from the registry itself: it notifies the
/// `cache-keeper` container of every manifest and blob it serves (Distribution notifications).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.lowWatermark) || !has(self.highWatermark) || self.lowWatermark < self.highWatermark",
     "message": "lowWatermark must be below highWatermark",
     "fieldPath": ".lowWatermark"},
    {"rule": "!has(self.lowWatermark) || has(self.highWatermark) || self.lowWatermark < 80",
     "message": "lowWatermark must be below highWatermark (default 80)",
     "fieldPath": ".lowWatermark"},
    {"rule": "has(self.lowWatermark) || !has(self.highWatermark) || self.highWatermark > 60",
     "message": "highWatermark must be above lowWatermark (default 60)",
     "fieldPath": ".highWatermark"}
]))]
pub struct CacheSpec {
    /// Percent of the cache volume (the `emptyDir`'s `sizeLimit`, the claim's capacity) above
    /// which the least recently pulled images are evicted. 100: evict by size only once the cache
    /// is larger than the whole volume (an `emptyDir` past its `sizeLimit`, which the kubelet
    /// would evict the pod for).
    #[serde(default = "default_high_watermark")]
    #[schemars(range(min = 1, max = 100))]
    pub high_watermark: i32,
    /// Percent of the volume an eviction brings the cache down to.
    #[serde(default = "default_low_watermark")]
    #[schemars(range(min = 0, max = 99))]
    pub low_watermark: i32,
    /// Images not pulled for this long are evicted, whatever the fill (Go duration; `0s`: never).
    /// Every pull restarts the clock; Distribution's own expiry (counted from the first caching)
    /// is turned off for 3.x proxies (2.8 cannot turn it off: 7 days).
    #[serde(default = "default_cache_ttl")]
    #[schemars(regex(pattern = GO_DURATION))]
    pub ttl: String,
    /// Images never evicted: full references with the upstream's registry, by tag or digest
    /// (`docker.io/library/nginx:1.27`, `ghcr.io/org/app@sha256:...`). A tag pins what it points
    /// to in the cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 255, "pattern": IMAGE_REFERENCE}))]
    pub pins: Vec<String>,
}

impl Default for CacheSpec {
    fn default() -> Self {
        Self {
            high_watermark: default_high_watermark(),
            low_watermark: default_low_watermark(),
            ttl: default_cache_ttl(),
            pins: Vec::new(),
        }
    }
}

fn default_high_watermark() -> i32 {
    80
}
fn default_low_watermark() -> i32 {
    60
}
fn default_cache_ttl() -> String {
    "168h".into()
}

/// Who may reach the mirror's pods. The operator renders one NetworkPolicy for the proxies and,
/// with an edge, one for the edge; both admit only what is listed here, plus the edge (to the
/// proxies) and the operator (the upstream sidecars' counters). Kubelet probes and traffic from a
/// pod's own node are allowed by every policy implementation; node pulls from other nodes come
/// from the nodes' addresses, so list them in `fromCIDRs` (a CNI that does not filter host traffic
/// lets them through anyway). Without a policy implementation in the cluster, nothing is enforced.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Namespaces (by name) whose pods may pull through the proxies and the edge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL)))]
    pub from_namespaces: Vec<String>,
    /// Address ranges that may pull, as CIDRs (`10.0.0.0/16`, `fd00::/64`): the nodes' addresses,
    /// and clients outside the cluster that use the edge.
    #[serde(default, rename = "fromCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 3, max = 43), regex(pattern = CIDR)))]
    pub from_cidrs: Vec<String>,
    /// Namespaces (by name) whose pods may scrape the `metrics` ports (Prometheus).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL)))]
    pub metrics_from_namespaces: Vec<String>,
}

/// One upstream registry and its pull-through cache.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.auth) || !has(self.auth.type) || self.auth.type != 'None' || !has(self.credentialsSecretRef)",
     "message": "auth type None sends no credentials: remove credentialsSecretRef or describe the token realm",
     "fieldPath": ".auth.type"}
]))]
pub struct Upstream {
    /// Short name, a DNS-1123 label; names the proxy's Deployment, Service and ConfigMap.
    #[schemars(length(min = 1, max = 40), regex(pattern = DNS1123_LABEL))]
    pub name: String,

    /// The registry name clients use in image references (`docker.io`, `ghcr.io`,
    /// `registry.example.com:5000`); node config maps this name to the mirror.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(pattern = REGISTRY_NAME))]
    pub registry: String,

    /// Where the proxy fetches from (`https://registry-1.docker.io` for docker.io).
    #[serde(rename = "remoteURL")]
    #[schemars(length(min = 8, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''",
         "message": "remoteURL must be an absolute http:// or https:// URL"},
        {"rule": "!self.contains('?') && !self.contains('#')",
         "message": "remoteURL must not carry a query or fragment"}
    ]))]
    pub remote_url: String,

    /// Secret in the mirror's namespace with the upstream username and password. It stays in
    /// that Secret; proxy pods read it through `secretKeyRef` environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretRef>,

    /// How the upstream authenticates, which the proxy's Envoy sidecar must know to answer the
    /// registry's `/v2/` ping itself (so the proxy starts, and bounds its waits, while the
    /// upstream is down). Known for `registry-1.docker.io`, `ghcr.io` and `quay.io`. Unset on
    /// another upstream: the registry talks to it directly, without the sidecar (unbounded waits
    /// on a dead upstream, as Distribution alone has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<UpstreamAuth>,

    /// Virtual host on the edge for this upstream; defaults to `<name>.<edge.domain>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 253))]
    #[schemars(regex(pattern = HOST_NAME))]
    pub host: Option<String>,
}

/// The challenge an upstream answers on `/v2/`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.type) || self.type == 'Bearer' ? (has(self.realm) && has(self.service)) : (!has(self.realm) && !has(self.service))",
     "message": "type Bearer needs realm and service; type None takes neither"}
]))]
pub struct UpstreamAuth {
    /// `Bearer`: token auth (Docker Hub, GHCR, Quay, Harbor, Distribution with `auth: token`).
    /// `None`: the upstream answers `/v2/` with 200 and needs no token.
    #[serde(default, rename = "type")]
    pub type_: UpstreamAuthType,
    /// The token realm of the upstream's `WWW-Authenticate: Bearer realm=...` challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 8, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != '' && !self.contains('?') && !self.contains('#')",
         "message": "realm must be an absolute http:// or https:// URL without query or fragment"}
    ]))]
    pub realm: Option<String>,
    /// The `service` of that challenge (Docker Hub: `registry.docker.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r#"^[^"\\\s]+$"#))]
    pub service: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum UpstreamAuthType {
    #[default]
    Bearer,
    None,
}

impl UpstreamAuth {
    pub fn bearer(realm: &str, service: &str) -> Self {
        Self { type_: UpstreamAuthType::Bearer, realm: Some(realm.into()), service: Some(service.into()) }
    }
}

impl Upstream {
    /// The upstream's challenge: the spec's `auth`, else the known one of a public registry
    /// (by the remote URL's host), else `None` (unknown: no sidecar).
    pub fn effective_auth(&self) -> Option<UpstreamAuth> {
        if let Some(auth) = &self.auth {
            return Some(auth.clone());
        }
        let host = url::Url::parse(&self.remote_url).ok()?.host_str()?.to_ascii_lowercase();
        KNOWN_UPSTREAM_AUTH
            .iter()
            .find(|(h, _, _)| *h == host)
            .map(|(_, realm, service)| UpstreamAuth::bearer(realm, service))
    }
}

/// Token realms and services of public registries, by the remote URL's host.
pub const KNOWN_UPSTREAM_AUTH: [(&str, &str, &str); 3] = [
    ("registry-1.docker.io", "https://auth.docker.io/token", "registry.docker.io"),
    ("ghcr.io", "https://ghcr.io/token", "ghcr.io"),
    ("quay.io", "https://quay.io/v2/auth", "quay.io"),
];

/// A Secret holding a username and a password under the given keys.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Secret name (same namespace as the RegistryMirror).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub name: String,
    /// Key of the username.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253))]
    pub username_key: String,
    /// Key of the password.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// A reference to a Secret by name, in the mirror's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    /// Secret name (same namespace as the RegistryMirror).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub name: String,
}

/// The registry-proxy pods.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// Distribution registry image. The default, 3.1.1, and Debian's 2.8.2 are the versions the
    /// real-node tests run (`proxy.ttl` needs 3.x).
    #[serde(default = "default_proxy_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Replicas per upstream.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 20))]
    pub replicas: i32,
    /// Cache storage: exactly one kind.
    #[serde(default)]
    pub storage: StorageSpec,
    /// How long cached content is kept before the registry re-validates it upstream (Go
    /// duration, registry 3.x).
    #[serde(default = "default_ttl")]
    #[schemars(regex(pattern = GO_DURATION))]
    pub ttl: String,
    /// Container resources of each proxy pod (and of its `cache-cleanup` init container, which
    /// runs in its place). Unset: requests of 100m CPU and 128Mi memory, no limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector for the proxy pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the proxy pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// The zone label every cloud provider sets on its nodes.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The region label, for one mirror per region (`proxy.nodeSelector`, `nodeConfig.nodeSelector`).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            image: default_proxy_image(),
            replicas: default_replicas(),
            storage: StorageSpec::default(),
            ttl: default_ttl(),
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
        }
    }
}

pub fn default_proxy_image() -> String {
    "docker.io/library/registry:3.1.1".into()
}
fn default_replicas() -> i32 {
    2
}
fn default_ttl() -> String {
    "168h".into()
}

/// Where each proxy keeps its cache. Exactly one of the fields is set.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.emptyDir) ? 1 : 0) + (has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.s3) ? 1 : 0) == 1",
     "message": "exactly one of emptyDir, persistentVolumeClaim or s3 must be set"}
]))]
pub struct StorageSpec {
    /// Pod-local cache, lost when the pod goes away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirStorage>,
    /// One PersistentVolumeClaim per upstream, created and owned by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PvcStorage>,
    /// An S3 (or S3-compatible) bucket shared by all replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Storage>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self { empty_dir: Some(EmptyDirStorage::default()), persistent_volume_claim: None, s3: None }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDirStorage {
    /// Upper bound of the cache on each pod's node.
    #[serde(default = "default_size_limit")]
    pub size_limit: Quantity,
}

impl Default for EmptyDirStorage {
    fn default() -> Self {
        Self { size_limit: default_size_limit() }
    }
}

fn default_size_limit() -> Quantity {
    Quantity("20Gi".into())
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.accessModes.all(m, m in ['ReadWriteOnce', 'ReadWriteMany', 'ReadWriteOncePod'])",
     "message": "accessModes may contain ReadWriteOnce, ReadWriteMany or ReadWriteOncePod"}
]))]
pub struct PvcStorage {
    /// Requested size of each claim.
    pub size: Quantity,
    /// StorageClass of the claims; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Access modes; more than one proxy replica needs ReadWriteMany.
    #[serde(default = "default_access_modes")]
    #[schemars(length(min = 1, max = 3))]
    pub access_modes: Vec<String>,
}

fn default_access_modes() -> Vec<String> {
    vec!["ReadWriteOnce".into()]
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Storage {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Region.
    #[schemars(length(min = 1, max = 64))]
    pub region: String,
    /// Endpoint of an S3-compatible service (MinIO, Ceph); AWS when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "isURL(self) && url(self).getScheme() in ['http', 'https']",
         "message": "endpoint must be an http:// or https:// URL"}
    ]))]
    pub endpoint: Option<String>,
    /// Prefix inside the bucket; each upstream gets its own sub-directory below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_directory: Option<String>,
    /// Secret with the access key and secret key; keys `accessKey` and `secretKey`. When unset the
    /// pods use their ambient identity (IRSA, instance profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// htpasswd authentication for clients of the mirrors.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientAuth {
    /// Secret whose keys are user names and whose values are plain passwords; the operator
    /// writes the bcrypt htpasswd file into a Secret of its own.
    pub users_secret_ref: SecretRef,
    /// The user (a key of that Secret) the node agent authenticates as. Required with nodeConfig.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_user: Option<String>,
}

/// The Envoy edge proxy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.httpsRedirect) || !self.httpsRedirect || has(self.tlsSecretRef)",
     "message": "httpsRedirect needs tlsSecretRef"}
]))]
pub struct EdgeSpec {
    /// Base domain; an upstream without `host` is served at `<name>.<domain>`.
    #[schemars(length(min = 3, max = 200))]
    #[schemars(regex(pattern = HOST_NAME))]
    pub domain: String,
    /// kubernetes.io/tls Secret with the certificate for the edge hosts. Without it the edge
    /// serves plain HTTP only. With `nodeConfig.via: Edge`, its optional `ca.crt` (cert-manager's
    /// key for the issuing CA) is the CA the nodes trust for the edge hosts, on top of their own:
    /// certificates only are passed on, never `tls.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<SecretRef>,
    /// Redirect plain HTTP to HTTPS; defaults to true when TLS is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_redirect: Option<bool>,
    /// Envoy image, also of the proxies' upstream sidecars. The default is the version the tests
    /// run (1.40.0), which the sidecars use without an edge.
    #[serde(default = "default_envoy_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Envoy replicas.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 20))]
    pub replicas: i32,
    /// The edge Service.
    #[serde(default)]
    pub service: EdgeServiceSpec,
    /// Container resources of each Envoy pod. Unset: requests of 50m CPU and 64Mi memory, no
    /// limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector for the Envoy pods (a regional mirror: `topology.kubernetes.io/region`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

impl EdgeSpec {
    pub fn tls(&self) -> bool {
        self.tls_secret_ref.is_some()
    }
    pub fn redirects(&self) -> bool {
        self.tls() && self.https_redirect.unwrap_or(true)
    }
}

pub fn default_envoy_image() -> String {
    "docker.io/envoyproxy/envoy:v1.40.0".into()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: EdgeServiceType,
    /// Extra annotations for the Service (load-balancer settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum EdgeServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl EdgeServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The cache cleanup CronJob.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CleanupSpec {
    /// Cron schedule (five fields, or @daily-style macros).
    #[serde(default = "default_schedule")]
    #[schemars(length(min = 1, max = 128))]
    #[schemars(regex(pattern = CRON_SCHEDULE))]
    pub schedule: String,
    /// IANA time zone of the schedule; the controller manager's zone when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// What a run does.
    #[serde(default)]
    pub policy: CleanupPolicy,
    /// Pause the schedule.
    #[serde(default)]
    pub suspend: bool,
    /// Container resources of the cleanup Job's pod (it rolls the proxies and waits; each
    /// proxy's own `cache-cleanup` init container does the cleaning, with the proxy's
    /// resources). Unset: requests of 50m CPU and 64Mi memory, no limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_schedule() -> String {
    "0 3 * * 0".into()
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CleanupPolicy {
    /// Remove what the cache no longer references (expired or untagged content).
    #[default]
    GarbageCollect,
    /// Empty the cache.
    Purge,
}

impl CleanupPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GarbageCollect => "garbageCollect",
            Self::Purge => "purge",
        }
    }
}

/// The node agent DaemonSet.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfigSpec {
    /// Nodes to configure; every node when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the agent; defaults to tolerating every taint, so tainted nodes pull
    /// through the mirrors too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// containerd settings (the default runtime).
    #[serde(default)]
    pub containerd: ContainerdSpec,
    /// Keep the upstream registry as the last resort. False gives mirror-only config
    /// (air-gapped clusters): a dead mirror then fails pulls instead of bypassing it. The
    /// upstream is `https://<registry>` (docker.io: `https://registry-1.docker.io`), except when
    /// an upstream's `remoteURL` host[:port] is its registry name: then the remoteURL's scheme is
    /// kept, so a plain-HTTP registry (`http://10.200.0.1:5001`) is reached over HTTP.
    #[serde(default = "default_true")]
    pub fallback_to_upstream: bool,
    /// How nodes reach the mirrors: the proxy Services' cluster IPs, or the edge hosts.
    #[serde(default)]
    pub via: NodeRoute,
    /// Container resources of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// CRI-O, Podman, Buildah and Skopeo: a `registries.conf.d` drop-in per mirror. Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crio: Option<CrioSpec>,
    /// Docker: the docker.io mirror in `daemon.json` `registry-mirrors`, merged with the file's
    /// other settings. Off unless set. dockerd reads it on start or SIGHUP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerSpec>,
    /// A peer-to-peer registry on each node (Spegel, Dragonfly) that containerd asks first, before
    /// the mirror and the upstream: a layer another node of the cluster already has comes from
    /// there. Health-gated like the mirror: the agent leaves it out while it does not answer.
    /// containerd only (`hosts.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<PeersSpec>,
}

/// The node-local P2P endpoint.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeersSpec {
    /// The P2P tool's registry endpoint as containerd on the node reaches it, `http(s)://host:port`;
    /// `${NODE_IP}` stands for the node's address (the agent fills it in). Spegel:
    /// `http://${NODE_IP}:30020`; Dragonfly: `http://127.0.0.1:4001`.
    #[schemars(length(min = 8, max = 256), regex(pattern = PEER_ENDPOINT))]
    pub endpoint: String,
    /// `dial_timeout` of the peer's `[host]` entry (containerd 2.1+): what a dead peer may cost a
    /// request before containerd tries the mirror. A Go duration from 100ms to 30s.
    #[serde(default = "default_peer_dial_timeout")]
    #[schemars(length(min = 2, max = 32), regex(pattern = GO_DURATION))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "duration(self) >= duration('100ms') && duration(self) <= duration('30s')",
         "message": "dialTimeout must be from 100ms to 30s"}
    ]))]
    pub dial_timeout: String,
    /// A header containerd sends the peer with the registry's upstream URL, for tools that need
    /// to know where a registry really is (Dragonfly: `X-Dragonfly-Registry`). Unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = HEADER_NAME))]
    pub registry_header: Option<String>,
}

fn default_peer_dial_timeout() -> String {
    "200ms".into()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrioSpec {
    /// The drop-in directory on the host; the agent writes `mirrorfleet-<namespace>-<name>.conf`.
    #[serde(default = "default_crio_drop_in_dir")]
    #[schemars(length(min = 2, max = 512), regex(pattern = ABS_DIR))]
    pub drop_in_dir: String,
}

fn default_crio_drop_in_dir() -> String {
    "/etc/containers/registries.conf.d".into()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DockerSpec {
    /// dockerd's config file on the host. The agent mounts its directory.
    #[serde(default = "default_daemon_json")]
    #[schemars(length(min = 2, max = 512), regex(pattern = ABS_DIR))]
    pub daemon_json: String,
}

fn default_daemon_json() -> String {
    "/etc/docker/daemon.json".into()
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerdSpec {
    /// containerd's `config_path` on the host; the agent writes `<certsDir>/<registry>/hosts.toml`.
    #[serde(default = "default_certs_dir")]
    #[schemars(length(min = 2, max = 512), regex(pattern = ABS_DIR))]
    pub certs_dir: String,
    /// containerd's config file on the host, read (through a read-only mount of its directory) so
    /// the agent can report a containerd whose CRI `config_path` is not `certsDir`, which would
    /// ignore every file the agent writes.
    #[serde(default = "default_containerd_config_file")]
    #[schemars(length(min = 2, max = 512), regex(pattern = ABS_DIR))]
    pub config_file: String,
    /// How long containerd (2.1 and newer) waits for a connection to the mirror before it tries
    /// the next host (the upstream, with `fallbackToUpstream`), written as `dial_timeout` in the
    /// mirror's `[host]` entry; a Go duration from 100ms to 30s. Without it a dead mirror costs
    /// every request Go's 30 s dial timeout until the agent withdraws the entry. containerd 1.6
    /// and 1.7 ignore the key (tested with the real containerd 1.6).
    #[serde(default = "default_dial_timeout")]
    #[schemars(length(min = 2, max = 32), regex(pattern = GO_DURATION))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "duration(self) >= duration('100ms') && duration(self) <= duration('30s')",
         "message": "dialTimeout must be from 100ms to 30s"}
    ]))]
    pub dial_timeout: String,
}

impl Default for ContainerdSpec {
    fn default() -> Self {
        Self {
            certs_dir: default_certs_dir(),
            config_file: default_containerd_config_file(),
            dial_timeout: default_dial_timeout(),
        }
    }
}

/// One lost SYN is retransmitted after 1 s: a mirror that has not answered within a second is
/// taken for dead for this request (the agent's probe decides for the next ones).
fn default_dial_timeout() -> String {
    "1s".into()
}

fn default_containerd_config_file() -> String {
    "/etc/containerd/config.toml".into()
}

fn default_certs_dir() -> String {
    "/etc/containerd/certs.d".into()
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum NodeRoute {
    /// `http://<cluster IP>:5000` of each proxy Service (nodes have no cluster DNS).
    #[default]
    Service,
    /// `https://<edge host>` (needs edge with TLS and node-resolvable DNS for the hosts). A
    /// private CA reaches the nodes as the edge TLS Secret's `ca.crt`.
    Edge,
}

/// Observed state, computed from the applied children.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, ProxiesAvailable, EdgeAvailable, NodesConfigured, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Per upstream: where the proxy answers and how many replicas are ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub upstreams: Vec<UpstreamStatus>,
    /// "ready/total" upstreams, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstreams_ready: Option<String>,
    /// Node agent counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
    /// "configured/desired" nodes, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_configured: Option<String>,
    /// The most recent finished cleanup run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cleanup: Option<CleanupResult>,
    /// Fill of the fullest proxy cache, percent of its volume (`kubectl get` column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_fill: Option<String>,
    /// Blob hit ratio of all proxies together, percent (Distribution 3.x; `kubectl get` column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hit_ratio: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    pub name: String,
    pub registry: String,
    /// In-cluster endpoint of the proxy (`http://<cluster IP>:5000`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub replicas: i32,
    pub ready_replicas: i32,
    /// Whether the proxies reach the upstream, as their upstream sidecars' health checks (every
    /// 3 s) see it: true when one proxy does, false when none does. Absent while unknown (no
    /// sidecar, no proxy running, or their stats not reachable from the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    /// Since when no proxy reaches the upstream (kept while it stays unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<Time>,
    /// The newest upstream failure the proxies saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<UpstreamError>,
    /// Tag and manifest lookups (and the token requests they need) the upstream did not answer
    /// (timeout, refused, 429, 5xx), summed
    /// over the running proxies since they started. Each was served from the cache when the
    /// proxy held the tag, and failed the pull otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_lookups: Option<i64>,
    /// Upstream answers 429 (rate limited), summed over the running proxies since they started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limited: Option<i64>,
    /// Pulls by tag served from the cache while the upstream failed their lookup (the tag may be
    /// older than upstream's), summed over the running proxies since they started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_stale: Option<i64>,
    /// Manifest requests that failed because the upstream failed and the image was not cached
    /// (answered 503 or 429 saying why), summed over the running proxies since they started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_pulls: Option<i64>,
    /// The proxies' caches, as their cache keepers report them (filesystem storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<UpstreamCache>,
    /// The upstream's challenge as the operator learned it, for an upstream without `auth` that
    /// is not a known public registry: its proxies run the upstream sidecar with it. Kept here so
    /// a restarted operator renders the same proxies while the upstream is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned_auth: Option<LearnedAuth>,
}

/// A challenge learned from `GET <remoteURL>/v2/`: 401 with `WWW-Authenticate: Bearer realm=...,
/// service=...` (type Bearer), or 200 (type None). Plain fields, no CEL: a status array's rules
/// count against the CRD's whole validation budget, and the operator checked the values.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LearnedAuth {
    /// The remote URL it was learned from: another remoteURL is learned again.
    #[serde(rename = "remoteURL")]
    #[schemars(length(max = 2048))]
    pub remote_url: String,
    #[serde(default, rename = "type")]
    pub type_: UpstreamAuthType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub realm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub service: Option<String>,
}

impl LearnedAuth {
    pub fn new(remote_url: &str, auth: &UpstreamAuth) -> Self {
        Self {
            remote_url: remote_url.to_string(),
            type_: auth.type_,
            realm: auth.realm.clone(),
            service: auth.service.clone(),
        }
    }

    /// The challenge, as `upstreams[].auth` would say it.
    pub fn auth(&self) -> UpstreamAuth {
        UpstreamAuth { type_: self.type_, realm: self.realm.clone(), service: self.service.clone() }
    }
}

/// One upstream's caches, summed over the proxy replicas whose keeper answered.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamCache {
    /// Bytes on the replicas' cache volumes.
    pub bytes: i64,
    /// Size of those volumes (each the smaller of the declared size and the filesystem's).
    pub capacity_bytes: i64,
    /// Fill of the fullest replica, percent of its volume.
    pub fill_percent: i32,
    /// Images cached, at the replicas' last inventories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<i64>,
    /// Blob requests served from the cache / fetched from the upstream since the replicas
    /// started (Distribution 3.x counts them; 2.8 counts every blob as a hit, so none then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hits: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub misses: Option<i64>,
    /// `hits / (hits + misses)`, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit_ratio_percent: Option<i32>,
    /// Blob bytes served from the cache (Distribution 3.x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_served_from_cache: Option<i64>,
    /// The newest eviction of any replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_eviction: Option<CacheEviction>,
    /// The newest prefetch round of any replica (`spec.prefetch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_prefetch: Option<CachePrefetch>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePrefetch {
    pub time: Time,
    /// Images of the round, and how many failed.
    pub images: i64,
    pub failed: i64,
    /// Blob bytes read through the proxy.
    pub bytes: i64,
    /// Replicas that finished a round (each prefetches into its own cache).
    pub replicas: i64,
    /// What failed, if anything (`reference: why`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheEviction {
    pub time: Time,
    pub bytes: i64,
    pub images: i64,
    /// Of `images`, how many went for not being pulled within `cache.ttl`.
    pub expired: i64,
    /// Some of the evicted images (`repository:tag` or `repository@digest`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// An upstream failure, as the proxies' upstream sidecars counted it. Never holds a credential.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamError {
    /// When the operator first saw it (its scrape of the sidecars' counters).
    pub time: Time,
    /// ConnectTimeout, ConnectFailed, Timeout, HealthCheckFailed, RateLimited, Unauthorized or
    /// ServerError.
    pub reason: String,
    pub message: String,
    /// With `RateLimited`: the rate-limit headers of the newest 429, from the sidecar's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitHeaders>,
}

/// What an upstream said of its rate limit in a 429 answer (absent headers stay unset).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitHeaders {
    /// `RateLimit-Limit`, e.g. `100;w=21600` (Docker Hub: pulls per 6 hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// `RateLimit-Remaining`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<String>,
    /// `Retry-After` (seconds or an HTTP date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    pub desired: i32,
    pub configured: i32,
    /// The same per zone of the nodes the agents run on (`topology.kubernetes.io/zone`; `""` for
    /// nodes without the label), as far as the operator has seen the agents' pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<ZoneNodes>,
}

/// Node agents in one zone.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZoneNodes {
    pub zone: String,
    /// Agents scheduled on nodes of the zone.
    pub desired: i32,
    /// Those Ready: their node is configured.
    pub configured: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CleanupResult {
    pub time: Time,
    /// Succeeded or Failed.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_before: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_after: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
