//! `mirrorfleet render`: a file with RegistryMirrors (and optionally the Secrets they reference)
//! becomes every child manifest and config file, with no cluster. The GitOps and dry-run path.
//!
//! Input problems are collected for every document first; nothing is written unless all pass.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::ResourceExt;
use serde::Serialize;

use crate::api::validate::{InvalidSpec, Problem};
use crate::api::RegistryMirror;
use crate::build::{self, DesiredChildren, Fleet, Inputs, Settings};

/// The sample rendered when no file is given.
pub const EMBEDDED_SAMPLE: &str = include_str!("../config/samples/public-mirrors.yaml");

#[derive(Clone, Debug)]
pub struct RenderOptions {
    pub namespace: String,
    pub settings: Settings,
    /// Upstream name -> mirror endpoint for node config (what the controller learns from Services).
    pub endpoints: BTreeMap<String, String>,
    /// Print Secret data instead of redacting it.
    pub include_secrets: bool,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            settings: Settings::default(),
            endpoints: BTreeMap::new(),
            include_secrets: false,
        }
    }
}

/// Why a render failed: input that is not YAML, or specs with problems (all of them listed).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("document {doc}: {message}")]
    Parse { doc: usize, message: String },
    #[error("{}", format_invalid(.0))]
    Invalid(Vec<(String, InvalidSpec)>),
    #[error("the input holds no RegistryMirror (apiVersion mirrorfleet.io/v1alpha1, kind RegistryMirror)")]
    NoMirror,
}

fn format_invalid(list: &[(String, InvalidSpec)]) -> String {
    let mut out = String::new();
    for (who, invalid) in list {
        let _ = writeln!(out, "RegistryMirror {who} is invalid:");
        for p in &invalid.0 {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out.trim_end().to_string()
}

/// One rendered mirror.
pub struct Rendered {
    pub mirror: RegistryMirror,
    pub fleet: Fleet,
}

/// Parses every document, validates every mirror, and builds every fleet.
pub fn render_str(input: &str, opts: &RenderOptions) -> Result<Vec<Rendered>, RenderError> {
    let mut mirrors = Vec::new();
    let mut secrets: BTreeMap<String, Secret> = BTreeMap::new();
    let mut invalid = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let doc_no = i + 1;
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| RenderError::Parse { doc: doc_no, message: e.to_string() })?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api_version = value.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("");
        match (api_version, kind) {
            ("mirrorfleet.io/v1alpha1", "RegistryMirror") => {
                // Unknown fields are reported (a typo must not silently fall back to a default),
                // with the field probably meant; type errors keep the path they occur at.
                match crate::api::fields::parse_mirror(value) {
                    Ok((mut mirror, mut problems)) => {
                        if mirror.metadata.namespace.is_none() {
                            mirror.metadata.namespace = Some(opts.namespace.clone());
                        }
                        let who = describe(&mirror, doc_no);
                        if let Err(e) = crate::api::validate::validate(&mirror) {
                            problems.extend(e.0);
                        }
                        if problems.is_empty() {
                            mirrors.push((doc_no, mirror));
                        } else {
                            invalid.push((who, InvalidSpec(problems)));
                        }
                    }
                    Err(e) => invalid.push((format!("in document {doc_no}"), e)),
                }
            }
            ("v1", "Secret") => {
                let secret: Secret = serde_yaml::from_value(value)
                    .map_err(|e| RenderError::Parse { doc: doc_no, message: format!("Secret: {e}") })?;
                let ns = secret.namespace().unwrap_or_else(|| opts.namespace.clone());
                secrets.insert(format!("{ns}/{}", secret.name_any()), secret);
            }
            ("mirrorfleet.io/v1alpha1", other) => {
                return Err(RenderError::Parse {
                    doc: doc_no,
                    message: format!("unknown kind {other:?} in mirrorfleet.io/v1alpha1"),
                })
            }
            _ => {} // Other objects (Namespaces, ...) pass through untouched by render.
        }
    }

    // Two mirrors of the input that would configure one registry on the same nodes: the later
    // one (as the operator judges it: creation time, then namespace/name) is refused.
    let all: Vec<&RegistryMirror> = mirrors.iter().map(|(_, m)| m).collect();
    let refusals: Vec<Option<Problem>> = mirrors
        .iter()
        .map(|(_, m)| {
            let first =
                crate::api::conflicts::node_conflicts(m, all.iter().copied()).into_iter().find(|c| c.other_first)?;
            Some(Problem { path: "spec.nodeConfig.nodeSelector".into(), message: first.refusal() })
        })
        .collect();
    let mut kept = Vec::new();
    for ((doc_no, mirror), refusal) in mirrors.into_iter().zip(refusals) {
        match refusal {
            Some(problem) => invalid.push((describe(&mirror, doc_no), InvalidSpec(vec![problem]))),
            None => kept.push((doc_no, mirror)),
        }
    }
    let mirrors = kept;

    // Mirrors build independently (bcrypt hashing is most of a small fleet's cost).
    let built = par_map(&mirrors, |(_, mirror)| {
        build::build(mirror, &inputs_from_secrets(mirror, &secrets, opts), &opts.settings)
    });
    let mut out = Vec::new();
    for ((doc_no, mirror), result) in mirrors.into_iter().zip(built) {
        match result {
            Ok(fleet) => out.push(Rendered { mirror, fleet }),
            Err(e) => invalid.push((describe(&mirror, doc_no), e)),
        }
    }
    if !invalid.is_empty() {
        return Err(RenderError::Invalid(invalid));
    }
    if out.is_empty() {
        return Err(RenderError::NoMirror);
    }
    Ok(out)
}

fn describe(mirror: &RegistryMirror, doc: usize) -> String {
    format!("{}/{} (document {doc})", mirror.namespace().unwrap_or_default(), mirror.name_any())
}

/// Reads what render can know of the cluster: Secrets given in the same input.
fn inputs_from_secrets(mirror: &RegistryMirror, secrets: &BTreeMap<String, Secret>, opts: &RenderOptions) -> Inputs {
    let ns = mirror.namespace().unwrap_or_default();
    let client_users = mirror.spec.client_auth.as_ref().and_then(|auth| {
        let secret = secrets.get(&format!("{ns}/{}", auth.users_secret_ref.name))?;
        Some(secret_strings(secret))
    });
    let edge_ca = edge_ca_input(mirror, |name| secrets.get(&format!("{ns}/{name}")));
    Inputs {
        client_users,
        secret_versions: BTreeMap::new(),
        proxy_endpoints: opts.endpoints.clone(),
        edge_ca,
        // A mirror read back from the cluster carries what the operator learned in its status.
        learned_auth: crate::controller::challenge::learned_in_status(mirror),
    }
}

/// [`Inputs::edge_ca`]: the edge TLS Secret's `ca.crt`, only with `nodeConfig.via: Edge` (no other
/// key of that Secret is read). `secret` looks a Secret up by name in the mirror's namespace.
pub fn edge_ca_input<'a>(mirror: &RegistryMirror, secret: impl Fn(&str) -> Option<&'a Secret>) -> Option<String> {
    let node = mirror.spec.node_config.as_ref()?;
    if node.via != crate::api::NodeRoute::Edge {
        return None;
    }
    let tls = mirror.spec.edge.as_ref()?.tls_secret_ref.as_ref()?;
    let secret = secret(&tls.name)?;
    let key = crate::build::node::EDGE_CA_KEY;
    let value = match secret.string_data.as_ref().and_then(|d| d.get(key)) {
        Some(v) => v.clone(),
        None => String::from_utf8_lossy(&secret.data.as_ref()?.get(key)?.0).into_owned(),
    };
    // cert-manager leaves ca.crt empty when the issuer does not know its CA (ACME).
    (!value.trim().is_empty()).then_some(value)
}

/// A Secret's `data` and `stringData` as strings (stringData wins, as in the API server).
pub fn secret_strings(secret: &Secret) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> =
        secret.data.iter().flatten().map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned())).collect();
    out.extend(secret.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// The children as YAML documents, in the order they are applied.
pub fn children_documents(children: &DesiredChildren, include_secrets: bool) -> Vec<String> {
    let mut out = Vec::new();
    for_each_child(children, include_secrets, &mut |child| out.push(child.to_yaml()));
    out
}

/// One child object of any kind, to serialize without knowing its type.
trait Child {
    fn to_yaml(&self) -> String {
        let mut out = String::new();
        self.write_yaml(&mut out);
        out
    }
    fn write_yaml(&self, out: &mut String);
}

impl<T: Serialize> Child for T {
    fn write_yaml(&self, out: &mut String) {
        build::write_yaml(out, self)
    }
}

/// `f` on every child, in the order they are applied; Secrets redacted unless `include_secrets`.
fn for_each_child(children: &DesiredChildren, include_secrets: bool, f: &mut dyn FnMut(&dyn Child)) {
    let DesiredChildren {
        service_accounts,
        roles,
        role_bindings,
        secrets,
        config_maps,
        persistent_volume_claims,
        network_policies,
        services,
        deployments,
        daemon_sets,
        cron_jobs,
    } = children;
    fn each<T: Serialize>(f: &mut dyn FnMut(&dyn Child), items: &[T]) {
        for item in items {
            f(item);
        }
    }
    each(f, service_accounts);
    each(f, roles);
    each(f, role_bindings);
    if include_secrets {
        each(f, secrets);
    } else {
        for secret in secrets {
            f(&redact(secret));
        }
    }
    each(f, config_maps);
    each(f, persistent_volume_claims);
    each(f, network_policies);
    each(f, services);
    each(f, deployments);
    each(f, daemon_sets);
    each(f, cron_jobs);
}

/// Replaces Secret values so render output can be pasted into a review or a log safely.
fn redact(secret: &Secret) -> Secret {
    let mut s = secret.clone();
    if let Some(data) = s.data.as_mut() {
        for v in data.values_mut() {
            *v = ByteString(b"<redacted: render --include-secrets shows it>".to_vec());
        }
    }
    s
}

/// All rendered mirrors as one multi-document YAML stream.
pub fn to_yaml_stream(rendered: &[Rendered], include_secrets: bool) -> String {
    yaml_stream_parts(rendered, include_secrets).concat()
}

/// [`to_yaml_stream`] in one part per mirror, in order, for a caller that writes them out one
/// after the other (no copy of the whole stream). Every document of a mirror is serialized
/// straight into its part.
pub fn yaml_stream_parts(rendered: &[Rendered], include_secrets: bool) -> Vec<String> {
    par_map(rendered, |r| {
        // A proxy Deployment, the bulk of a fleet, is ~5 KB: one allocation instead of a dozen
        // doublings for most fleets.
        let c = &r.fleet.children;
        let mut out = String::with_capacity(4096 * (c.deployments.len() + c.config_maps.len() + c.services.len() + 8));
        for_each_child(&r.fleet.children, include_secrets, &mut |child| {
            out.push_str("---\n");
            child.write_yaml(&mut out);
        });
        out
    })
}

/// `f` over `items` on up to `available_parallelism` threads, results in the items' order. A
/// fleet of one mirror runs on the calling thread.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> =
            items.chunks(chunk).map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>())).collect();
        handles.into_iter().flat_map(|h| h.join().expect("render worker panicked")).collect()
    })
}

/// Writes `manifests.yaml` and the raw config files under `dir` (one sub-directory per mirror
/// when the input holds several).
pub fn write_dir(rendered: &[Rendered], dir: &Path, include_secrets: bool) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    let many = rendered.len() > 1;
    for r in rendered {
        let base = if many {
            dir.join(format!("{}-{}", r.mirror.namespace().unwrap_or_default(), r.mirror.name_any()))
        } else {
            dir.to_path_buf()
        };
        std::fs::create_dir_all(&base)?;
        let manifests = base.join("manifests.yaml");
        std::fs::write(&manifests, to_yaml_stream(std::slice::from_ref(r), include_secrets))?;
        written.push(manifests);
        for (rel, content) in &r.fleet.files {
            let path = base.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, content)?;
            written.push(path);
        }
    }
    Ok(written)
}
