//! Semantic validation: everything the CRD schema enforces, checked again for `render` (which
//! has no API server), plus what the schema cannot express (defaults-derived names, cron field
//! ranges, URL parsing, referenced Secrets).
//!
//! Every problem names its field path, and all problems are reported at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use regex::Regex;
use std::sync::LazyLock;

use super::reference::ImageRef;
use super::*;

/// One thing wrong with a spec, at a field path such as `spec.upstreams[2].remoteURL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems found in one RegistryMirror.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec(pub Vec<Problem>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "{}", lines.join("; "))
    }
}

static RE_LABEL: LazyLock<Regex> = LazyLock::new(|| Regex::new(DNS1123_LABEL).unwrap());
static RE_SUBDOMAIN: LazyLock<Regex> = LazyLock::new(|| Regex::new(DNS1123_SUBDOMAIN).unwrap());
static RE_REGISTRY: LazyLock<Regex> = LazyLock::new(|| Regex::new(REGISTRY_NAME).unwrap());
static RE_HOST: LazyLock<Regex> = LazyLock::new(|| Regex::new(HOST_NAME).unwrap());
static RE_DURATION: LazyLock<Regex> = LazyLock::new(|| Regex::new(GO_DURATION).unwrap());
static RE_ABS_DIR: LazyLock<Regex> = LazyLock::new(|| Regex::new(ABS_DIR).unwrap());
static RE_PEER: LazyLock<Regex> = LazyLock::new(|| Regex::new(PEER_ENDPOINT).unwrap());
static RE_HEADER: LazyLock<Regex> = LazyLock::new(|| Regex::new(HEADER_NAME).unwrap());
static RE_QUANTITY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?$").unwrap());
static RE_MIRROR_NAME: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[a-z]([-a-z0-9]*[a-z0-9])?$").unwrap());

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem { path: path.into(), message: message.into() });
    }
}

/// Checks a RegistryMirror as the API server and the operator together would.
pub fn validate(mirror: &RegistryMirror) -> Result<(), InvalidSpec> {
    let mut p = Problems::default();
    let name = mirror.metadata.name.as_deref().unwrap_or("");
    if name.is_empty() {
        p.add("metadata.name", "is required");
    } else if !RE_MIRROR_NAME.is_match(name) || name.len() > MAX_MIRROR_NAME {
        p.add(
            "metadata.name",
            format!("{name:?} must start with a letter, be a DNS-1035 label and at most {MAX_MIRROR_NAME} characters"),
        );
    }
    if mirror.metadata.namespace.as_deref().unwrap_or("").is_empty() {
        p.add("metadata.namespace", "is required");
    }
    let spec = &mirror.spec;
    validate_upstreams(name, spec, &mut p);
    validate_proxy(&spec.proxy, &mut p);
    if let Some(cache) = &spec.cache {
        validate_cache(spec, cache, &mut p);
    }
    if let Some(prefetch) = &spec.prefetch {
        validate_prefetch(spec, prefetch, &mut p);
    }
    if let Some(auth) = &spec.client_auth {
        secret_name(&auth.users_secret_ref.name, "spec.clientAuth.usersSecretRef.name", &mut p);
        if spec.node_config.is_some() && auth.node_user.is_none() {
            p.add("spec.clientAuth.nodeUser", "is required when nodeConfig is set: the node agent must authenticate");
        }
    }
    if let Some(edge) = &spec.edge {
        if !RE_HOST.is_match(&edge.domain) || edge.domain.len() > 200 {
            p.add("spec.edge.domain", format!("{:?} is not a DNS host name with at least two labels", edge.domain));
        }
        if let Some(tls) = &edge.tls_secret_ref {
            secret_name(&tls.name, "spec.edge.tlsSecretRef.name", &mut p);
        }
        if edge.https_redirect == Some(true) && !edge.tls() {
            p.add("spec.edge.httpsRedirect", "httpsRedirect needs tlsSecretRef");
        }
        replicas(edge.replicas, "spec.edge.replicas", &mut p);
        if edge.image.trim().is_empty() {
            p.add("spec.edge.image", "must not be empty");
        }
    }
    if let Some(cleanup) = &spec.cleanup {
        if let Err(e) = check_cron(&cleanup.schedule) {
            p.add("spec.cleanup.schedule", format!("{:?} is not a valid cron schedule: {e}", cleanup.schedule));
        }
    }
    if let Some(node) = &spec.node_config {
        dial_timeout(&node.containerd.dial_timeout, "spec.nodeConfig.containerd.dialTimeout", &mut p);
        if let Some(peers) = &node.peers {
            dial_timeout(&peers.dial_timeout, "spec.nodeConfig.peers.dialTimeout", &mut p);
            let port_ok = peers
                .endpoint
                .rsplit_once(':')
                .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
                .is_none_or(|(_, port)| port.parse::<u16>().is_ok_and(|n| n > 0));
            if !RE_PEER.is_match(&peers.endpoint) || !port_ok {
                p.add(
                    "spec.nodeConfig.peers.endpoint",
                    format!(
                        "{:?} is not http(s)://host[:port] (host: a name, an IP or {NODE_IP_PLACEHOLDER})",
                        peers.endpoint
                    ),
                );
            }
            if let Some(h) = &peers.registry_header {
                if !RE_HEADER.is_match(h) {
                    p.add("spec.nodeConfig.peers.registryHeader", format!("{h:?} is not an HTTP header name"));
                }
            }
        }
        if !RE_ABS_DIR.is_match(&node.containerd.certs_dir) {
            p.add(
                "spec.nodeConfig.containerd.certsDir",
                format!("{:?} must be an absolute directory path", node.containerd.certs_dir),
            );
        }
        // The agent mounts these files' directories from the host (daemon.json's read-write), so a
        // file directly under / would mount the host's root filesystem (found by tests/prop_render.rs).
        let files = [
            ("spec.nodeConfig.containerd.configFile", Some(&node.containerd.config_file)),
            ("spec.nodeConfig.docker.daemonJson", node.docker.as_ref().map(|d| &d.daemon_json)),
        ];
        for (path, file) in files {
            if let Some(file) = file.filter(|f| std::path::Path::new(f).parent() == Some(std::path::Path::new("/"))) {
                p.add(
                    path,
                    format!("{file:?} is directly under /: the node agent would mount the host's root directory"),
                );
            }
        }
        if node.via == NodeRoute::Edge && !spec.edge.as_ref().is_some_and(EdgeSpec::tls) {
            p.add("spec.nodeConfig.via", "Edge needs edge with tlsSecretRef");
        }
    }
    if let Some(policy) = &spec.network_policy {
        validate_network_policy(policy, &mut p);
    }
    if p.0.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec(p.0))
    }
}

fn validate_cache(spec: &RegistryMirrorSpec, cache: &CacheSpec, p: &mut Problems) {
    if !(1..=100).contains(&cache.high_watermark) {
        p.add("spec.cache.highWatermark", format!("{} is out of range 1..100 (percent)", cache.high_watermark));
    }
    if !(0..=99).contains(&cache.low_watermark) || cache.low_watermark >= cache.high_watermark {
        p.add(
            "spec.cache.lowWatermark",
            format!("{} must be a percent below highWatermark ({})", cache.low_watermark, cache.high_watermark),
        );
    }
    if go_duration(&cache.ttl).is_none() {
        p.add("spec.cache.ttl", format!("{:?} is not a Go duration (like 168h, or 0s for never)", cache.ttl));
    }
    if cache.pins.len() > 64 {
        p.add("spec.cache.pins", "at most 64 pins");
    }
    for (i, pin) in cache.pins.iter().enumerate() {
        let path = format!("spec.cache.pins[{i}]");
        match ImageRef::parse(pin) {
            Err(e) => p.add(path, e),
            Ok(r) if r.upstream(spec).is_none() => {
                p.add(path, format!("registry {:?} is not one of this mirror's upstreams", r.registry))
            }
            Ok(_) => {}
        }
    }
}

fn validate_prefetch(spec: &RegistryMirrorSpec, prefetch: &PrefetchSpec, p: &mut Problems) {
    if prefetch.images.is_empty() || prefetch.images.len() > 64 {
        p.add("spec.prefetch.images", "1 to 64 images");
    }
    for (i, image) in prefetch.images.iter().enumerate() {
        let path = format!("spec.prefetch.images[{i}]");
        match ImageRef::parse(image) {
            Err(e) => p.add(path, e),
            Ok(r) if r.upstream(spec).is_none() => {
                p.add(path, format!("registry {:?} is not one of this mirror's upstreams", r.registry))
            }
            Ok(_) => {}
        }
    }
    if let Some(schedule) = &prefetch.schedule {
        if let Err(e) = check_cron(schedule) {
            p.add("spec.prefetch.schedule", format!("{schedule:?} is not a valid cron schedule: {e}"));
        }
    }
    for (i, platform) in prefetch.platforms.iter().enumerate() {
        let ok = platform.split_once('/').is_some_and(|(os, arch)| {
            !os.is_empty()
                && !arch.is_empty()
                && platform.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'/')
        });
        if !ok {
            p.add(
                format!("spec.prefetch.platforms[{i}]"),
                format!("{platform:?} is not os/architecture (linux/amd64)"),
            );
        }
    }
    if spec.proxy.storage.s3.is_some() {
        p.add(
            "spec.prefetch",
            "prefetch needs emptyDir or persistentVolumeClaim storage: the proxies' cache keepers run it",
        );
    }
    if spec.client_auth.as_ref().is_some_and(|a| a.node_user.is_none()) {
        p.add(
            "spec.prefetch",
            "prefetch with clientAuth needs clientAuth.nodeUser: the prefetch authenticates as that user",
        );
    }
}

/// A containerd `dial_timeout`: Go syntax, 100ms to 30s.
fn dial_timeout(value: &str, path: &str, p: &mut Problems) {
    match go_duration(value) {
        None => p.add(path, format!("{value:?} is not a Go duration (like 500ms or 2s)")),
        Some(d) if !(Duration::from_millis(100)..=Duration::from_secs(30)).contains(&d) => {
            p.add(path, "dialTimeout must be from 100ms to 30s")
        }
        Some(_) => {}
    }
}

fn validate_network_policy(policy: &NetworkPolicySpec, p: &mut Problems) {
    let lists = [
        ("spec.networkPolicy.fromNamespaces", &policy.from_namespaces),
        ("spec.networkPolicy.metricsFromNamespaces", &policy.metrics_from_namespaces),
    ];
    for (path, list) in lists {
        for (i, ns) in list.iter().enumerate() {
            if !RE_LABEL.is_match(ns) || ns.len() > 63 {
                p.add(format!("{path}[{i}]"), format!("{ns:?} is not a namespace name (a DNS-1123 label)"));
            }
        }
    }
    for (i, cidr) in policy.from_cidrs.iter().enumerate() {
        if let Err(e) = check_cidr(cidr) {
            p.add(format!("spec.networkPolicy.fromCIDRs[{i}]"), e);
        }
    }
}

/// An IPv4 or IPv6 network in CIDR notation, with the host bits zero (what a NetworkPolicy's
/// `ipBlock.cidr` means; `10.0.0.1/8` is refused with the network address it probably meant).
pub fn check_cidr(cidr: &str) -> Result<std::net::IpAddr, String> {
    let (addr, prefix) =
        cidr.split_once('/').ok_or_else(|| format!("{cidr:?} is not a CIDR (address/prefix length)"))?;
    let addr: std::net::IpAddr =
        addr.parse().map_err(|_| format!("{cidr:?} is not a CIDR: {addr:?} is not an IP address"))?;
    let bits: u32 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u32 = prefix
        .parse()
        .ok()
        .filter(|n| *n <= bits)
        .ok_or_else(|| format!("{cidr:?} is not a CIDR: the prefix length must be 0 to {bits}"))?;
    let network = match addr {
        std::net::IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            std::net::IpAddr::V4((u32::from(a) & mask).into())
        }
        std::net::IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            std::net::IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    if network != addr {
        return Err(format!("{cidr:?} has host bits set: the network is {network}/{prefix}"));
    }
    Ok(addr)
}

fn validate_upstreams(mirror_name: &str, spec: &RegistryMirrorSpec, p: &mut Problems) {
    if spec.upstreams.is_empty() {
        p.add("spec.upstreams", "at least one upstream is required");
    }
    if spec.upstreams.len() > MAX_UPSTREAMS {
        p.add("spec.upstreams", format!("at most {MAX_UPSTREAMS} upstreams, got {}", spec.upstreams.len()));
    }
    let mut names = BTreeSet::new();
    let mut registries = BTreeMap::new();
    let mut hosts: BTreeMap<String, usize> = BTreeMap::new();
    for (i, u) in spec.upstreams.iter().enumerate() {
        let at = |field: &str| format!("spec.upstreams[{i}].{field}");
        if !RE_LABEL.is_match(&u.name) || u.name.len() > 40 {
            p.add(at("name"), format!("{:?} must be a DNS-1123 label of at most 40 characters", u.name));
        } else if !names.insert(u.name.as_str()) {
            p.add(at("name"), format!("duplicate upstream name {:?}", u.name));
        }
        if !mirror_name.is_empty() && mirror_name.len() + u.name.len() > MAX_MIRROR_PLUS_UPSTREAM {
            p.add(
                at("name"),
                format!("metadata.name plus upstream name must be at most {MAX_MIRROR_PLUS_UPSTREAM} characters"),
            );
        }
        if !RE_REGISTRY.is_match(&u.registry) || u.registry.len() > 253 {
            p.add(at("registry"), format!("{:?} is not a registry host name (host or host:port)", u.registry));
        } else if let Some(first) = registries.insert(u.registry.as_str(), i) {
            p.add(at("registry"), format!("registry {:?} is already used by upstreams[{first}]", u.registry));
        }
        match url::Url::parse(&u.remote_url) {
            Ok(parsed) if !matches!(parsed.scheme(), "http" | "https") => {
                p.add(at("remoteURL"), format!("scheme {:?} is not http or https", parsed.scheme()))
            }
            Ok(parsed) if parsed.host_str().unwrap_or("").is_empty() => p.add(at("remoteURL"), "has no host"),
            Ok(_) if u.remote_url.contains('?') || u.remote_url.contains('#') => {
                p.add(at("remoteURL"), "must not carry a query or fragment")
            }
            Ok(_) if u.remote_url.len() > 2048 => p.add(at("remoteURL"), "is longer than 2048 characters"),
            Ok(_) => {}
            Err(e) => p.add(at("remoteURL"), format!("{:?} is not an absolute URL: {e}", u.remote_url)),
        }
        if let Some(creds) = &u.credentials_secret_ref {
            secret_name(&creds.name, &at("credentialsSecretRef.name"), p);
        }
        if let Some(auth) = &u.auth {
            validate_upstream_auth(u, auth, &at("auth"), p);
        }
        if let Some(host) = &u.host {
            if !RE_HOST.is_match(host) || host.len() > 253 {
                p.add(at("host"), format!("{host:?} is not a DNS host name with at least two labels"));
            }
        }
        if let Some(edge) = &spec.edge {
            let host = effective_host(u, edge);
            if let Some(first) = hosts.insert(host.clone(), i) {
                p.add(at("host"), format!("edge host {host:?} is already used by upstreams[{first}]"));
            }
        }
    }
}

fn validate_upstream_auth(u: &Upstream, auth: &UpstreamAuth, at: &str, p: &mut Problems) {
    match auth.type_ {
        UpstreamAuthType::Bearer => {
            match auth.realm.as_deref().map(|r| (r, url::Url::parse(r))) {
                None => p.add(format!("{at}.realm"), "is required for type Bearer"),
                Some((_, Ok(u)))
                    if !matches!(u.scheme(), "http" | "https") || u.host_str().unwrap_or("").is_empty() =>
                {
                    p.add(format!("{at}.realm"), "must be an absolute http:// or https:// URL")
                }
                Some((r, Ok(_))) if r.contains('?') || r.contains('#') || r.len() > 2048 => {
                    p.add(format!("{at}.realm"), "must not carry a query or fragment, at most 2048 characters")
                }
                Some((_, Ok(_))) => {}
                Some((r, Err(e))) => p.add(format!("{at}.realm"), format!("{r:?} is not an absolute URL: {e}")),
            }
            match auth.service.as_deref() {
                None => p.add(format!("{at}.service"), "is required for type Bearer"),
                Some(s)
                    if s.is_empty()
                        || s.len() > 253
                        || s.contains('"')
                        || s.contains('\\')
                        || s.contains(char::is_whitespace) =>
                {
                    p.add(
                        format!("{at}.service"),
                        format!("{s:?} must be 1-253 characters without quotes, backslashes or spaces"),
                    )
                }
                Some(_) => {}
            }
        }
        UpstreamAuthType::None => {
            if auth.realm.is_some() || auth.service.is_some() {
                p.add(format!("{at}.type"), "type None takes neither realm nor service");
            }
            if u.credentials_secret_ref.is_some() {
                p.add(
                    format!("{at}.type"),
                    "auth type None sends no credentials: remove credentialsSecretRef or describe the token realm",
                );
            }
        }
    }
}

/// Upstreams whose private images the mirror hands to anyone who reaches it: they pull with
/// credentials and `clientAuth` is not set, so every pod that can open a connection to the proxy
/// (or the edge) gets them without a password. Not an error — a mirror for one trusted namespace
/// may want exactly that — but worth a Warning: `render` prints these, the controller shows them
/// as the `CredentialsExposed` condition and a Warning Event.
///
/// A `networkPolicy` that admits no range of everyone (`0.0.0.0/0`, `::/0`) answers it too: then
/// only the namespaces and ranges the user listed reach the proxies.
pub fn exposed_credentials(mirror: &RegistryMirror) -> Vec<Problem> {
    if mirror.spec.client_auth.is_some() {
        return Vec::new();
    }
    let open_to_all = |policy: &NetworkPolicySpec| policy.from_cidrs.iter().any(|c| c.ends_with("/0"));
    if mirror.spec.network_policy.as_ref().is_some_and(|policy| !open_to_all(policy)) {
        return Vec::new();
    }
    mirror
        .spec
        .upstreams
        .iter()
        .enumerate()
        .filter_map(|(i, u)| {
            let secret = &u.credentials_secret_ref.as_ref()?.name;
            Some(Problem {
                path: format!("spec.upstreams[{i}].credentialsSecretRef"),
                message: format!(
                    "upstream {:?} pulls with the credentials in Secret {secret:?} and spec.clientAuth is not set: \
                     every pod that reaches the mirror gets this upstream's private images without a password \
                     (set clientAuth, or spec.networkPolicy to keep other pods away)",
                    u.name
                ),
            })
        })
        .collect()
}

/// The edge virtual host an upstream is served at.
pub fn effective_host(upstream: &Upstream, edge: &EdgeSpec) -> String {
    upstream.host.clone().unwrap_or_else(|| format!("{}.{}", upstream.name, edge.domain))
}

fn validate_proxy(proxy: &ProxySpec, p: &mut Problems) {
    if proxy.image.trim().is_empty() {
        p.add("spec.proxy.image", "must not be empty");
    }
    replicas(proxy.replicas, "spec.proxy.replicas", p);
    if !RE_DURATION.is_match(&proxy.ttl) {
        p.add("spec.proxy.ttl", format!("{:?} is not a duration such as 168h or 30m", proxy.ttl));
    }
    let s = &proxy.storage;
    let kinds = [s.empty_dir.is_some(), s.persistent_volume_claim.is_some(), s.s3.is_some()];
    if kinds.iter().filter(|k| **k).count() != 1 {
        p.add("spec.proxy.storage", "exactly one of emptyDir, persistentVolumeClaim or s3 must be set");
    }
    if let Some(e) = &s.empty_dir {
        quantity(&e.size_limit.0, "spec.proxy.storage.emptyDir.sizeLimit", p);
    }
    if let Some(pvc) = &s.persistent_volume_claim {
        quantity(&pvc.size.0, "spec.proxy.storage.persistentVolumeClaim.size", p);
        if pvc.access_modes.is_empty() {
            p.add("spec.proxy.storage.persistentVolumeClaim.accessModes", "must not be empty");
        }
        for (i, mode) in pvc.access_modes.iter().enumerate() {
            if !matches!(mode.as_str(), "ReadWriteOnce" | "ReadWriteMany" | "ReadWriteOncePod") {
                p.add(
                    format!("spec.proxy.storage.persistentVolumeClaim.accessModes[{i}]"),
                    format!("{mode:?} is not ReadWriteOnce, ReadWriteMany or ReadWriteOncePod"),
                );
            }
        }
        if proxy.replicas > 1 && !pvc.access_modes.iter().any(|m| m == "ReadWriteMany") {
            p.add(
                "spec.proxy.replicas",
                "more than one proxy replica on persistentVolumeClaim storage needs accessModes [ReadWriteMany]",
            );
        }
    }
    if let Some(s3) = &s.s3 {
        if s3.bucket.len() < 3 || s3.bucket.len() > 63 {
            p.add("spec.proxy.storage.s3.bucket", "must be 3 to 63 characters");
        }
        if s3.region.is_empty() {
            p.add("spec.proxy.storage.s3.region", "is required");
        }
        if let Some(endpoint) = &s3.endpoint {
            if !url::Url::parse(endpoint).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
                p.add("spec.proxy.storage.s3.endpoint", format!("{endpoint:?} is not an http:// or https:// URL"));
            }
        }
        if let Some(creds) = &s3.credentials_secret_ref {
            secret_name(&creds.name, "spec.proxy.storage.s3.credentialsSecretRef.name", p);
        }
    }
}

fn replicas(n: i32, path: &str, p: &mut Problems) {
    if !(1..=20).contains(&n) {
        p.add(path, format!("{n} is out of range 1..20"));
    }
}

fn secret_name(name: &str, path: &str, p: &mut Problems) {
    if !RE_SUBDOMAIN.is_match(name) || name.len() > 253 {
        p.add(path, format!("{name:?} is not a valid Secret name"));
    }
}

fn quantity(q: &str, path: &str, p: &mut Problems) {
    if !RE_QUANTITY.is_match(q) {
        p.add(path, format!("{q:?} is not a quantity such as 20Gi"));
    }
}

/// Checks a five-field cron expression (or an `@` macro) the way the CronJob controller reads it.
pub fn check_cron(expr: &str) -> Result<(), String> {
    let expr = expr.trim();
    if let Some(m) = expr.strip_prefix('@') {
        return match m {
            "yearly" | "annually" | "monthly" | "weekly" | "daily" | "midnight" | "hourly" => Ok(()),
            _ => Err(format!("unknown macro @{m}")),
        };
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!("expected 5 fields (minute hour day-of-month month day-of-week), got {}", fields.len()));
    }
    const MONTHS: &[&str] = &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    const DAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let specs: [(&str, u32, u32, &[&str], u32); 5] = [
        ("minute", 0, 59, &[], 0),
        ("hour", 0, 23, &[], 0),
        ("day-of-month", 1, 31, &[], 0),
        ("month", 1, 12, MONTHS, 1),
        ("day-of-week", 0, 7, DAYS, 0),
    ];
    for (field, (what, lo, hi, names, name_base)) in fields.iter().zip(specs) {
        let value = |s: &str| -> Result<u32, String> {
            if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
                return Ok(i as u32 + name_base);
            }
            let v: u32 = s.parse().map_err(|_| format!("{what}: {s:?} is not a number"))?;
            if v < lo || v > hi {
                return Err(format!("{what}: {v} is out of range {lo}-{hi}"));
            }
            Ok(v)
        };
        for item in field.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            if let Some(step) = step {
                match step.parse::<u32>() {
                    Ok(s) if s > 0 => {}
                    _ => return Err(format!("{what}: step {step:?} must be a positive number")),
                }
            }
            if range == "*" || range == "?" {
                continue;
            }
            match range.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (value(a)?, value(b)?);
                    if a > b {
                        return Err(format!("{what}: range {a}-{b} is backwards"));
                    }
                }
                None => {
                    value(range)?;
                }
            }
        }
    }
    Ok(())
}

/// A Go duration (`time.ParseDuration` syntax without sign: `1h30m`, `1.5s`, `500ms`) as a
/// [`Duration`]; None when it is not one.
pub fn go_duration(s: &str) -> Option<Duration> {
    if !RE_DURATION.is_match(s) {
        return None;
    }
    static PART: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h)").unwrap());
    let mut total = 0f64;
    for c in PART.captures_iter(s) {
        let n: f64 = c[1].parse().ok()?;
        let unit = match &c[2] {
            "ns" => 1e-9,
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            _ => 3600.0,
        };
        total += n * unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::{check_cidr, check_cron, go_duration, Duration};

    #[test]
    fn cidrs_are_networks() {
        for ok in ["10.0.0.0/8", "192.168.1.7/32", "0.0.0.0/0", "fd00::/64", "::/0", "2001:db8::1/128"] {
            assert!(check_cidr(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("10.0.0.0", "not a CIDR"),
            ("10.0.0/8", "not an IP address"),
            ("10.0.0.0/33", "0 to 32"),
            ("fd00::/129", "0 to 128"),
            ("10.0.0.0/-1", "0 to 32"),
            ("10.1.2.3/16", "the network is 10.1.0.0/16"),
            ("fd00::1/64", "the network is fd00::/64"),
            ("host.example/24", "not an IP address"),
        ] {
            let e = check_cidr(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn go_durations_parse_as_go_does() {
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("2h"), Some(Duration::from_secs(7200)));
        for bad in ["", "1", "1 s", "s", "-1s", "1.s", "1d"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cron_accepts_what_the_cronjob_controller_accepts() {
        for ok in ["0 3 * * 0", "*/15 * * * *", "0 0 1,15 * mon-fri", "30 2 * jan-mar 7", "@weekly"] {
            assert_eq!(check_cron(ok), Ok(()), "{ok}");
        }
        for bad in
            ["0 3 * *", "61 * * * *", "0 24 * * *", "0 0 0 * *", "* * * 13 *", "*/0 * * * *", "5-1 * * * *", "@often"]
        {
            assert!(check_cron(bad).is_err(), "{bad} should be rejected");
        }
    }
}
