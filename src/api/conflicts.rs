//! Two mirrors must not configure the same registry on the same node: both node agents would want
//! `certs.d/<registry>/hosts.toml` (and the same CRI-O and Docker entries), and which one a node
//! ends up with would depend on which agent wrote first.
//!
//! Nodes come and go, so the rule is about what the mirrors' `nodeConfig.nodeSelector`s can
//! select, not about the nodes there are now: two selectors overlap unless some label key has
//! different values in them (an empty selector selects every node). The mirror that came first
//! (oldest `creationTimestamp`, then namespace/name) keeps the registry; the other is refused until
//! the selectors become exclusive (a fleet per region: `topology.kubernetes.io/region`) or one of
//! them stops serving the registry. Mirrors being deleted do not count: their agents are removing
//! their files.

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::RegistryMirror;

/// Whether a node could carry every label of both selectors (matchLabels only, as
/// `nodeConfig.nodeSelector` is).
pub fn selectors_overlap(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    a.iter().all(|(key, value)| b.get(key).is_none_or(|other| other == value))
}

/// The registries both mirrors serve, in `a`'s order.
pub fn shared_registries(a: &RegistryMirror, b: &RegistryMirror) -> Vec<String> {
    a.spec
        .upstreams
        .iter()
        .filter(|u| b.spec.upstreams.iter().any(|o| o.registry == u.registry))
        .map(|u| u.registry.clone())
        .collect()
}

/// A conflict of one mirror with another, seen from the first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConflict {
    /// `namespace/name` of the other mirror.
    pub other: String,
    /// The registries both configure on nodes both may select.
    pub registries: Vec<String>,
    /// The other mirror came first: this one is refused.
    pub other_first: bool,
}

/// At most this many registries are named in a conflict message; the rest are counted. Conditions
/// and Events are cut at 1,024 characters, and the advice at the end must survive that.
const NAMED_REGISTRIES: usize = 5;

impl NodeConflict {
    /// The message for the mirror that is refused.
    pub fn refusal(&self) -> String {
        format!(
            "RegistryMirror {} already configures {} on nodes this mirror's nodeConfig.nodeSelector also \
             selects: make the two nodeSelectors exclusive (one mirror per region: \
             topology.kubernetes.io/region) or serve {} from one mirror only",
            self.other,
            self.named_registries(),
            if self.registries.len() == 1 { "it" } else { "them" },
        )
    }

    /// The message for the mirror that keeps the registries.
    pub fn kept(&self) -> String {
        format!(
            "RegistryMirror {} also asks to configure {} on nodes this mirror selects; it is refused, this mirror \
             keeps {}",
            self.other,
            self.named_registries(),
            if self.registries.len() == 1 { "it" } else { "them" },
        )
    }

    /// `a, b, c` or, past [`NAMED_REGISTRIES`], `a, b, c, d, e and 120 more registries`.
    fn named_registries(&self) -> String {
        let named = self.registries.iter().take(NAMED_REGISTRIES).map(String::as_str).collect::<Vec<_>>().join(", ");
        match self.registries.len().saturating_sub(NAMED_REGISTRIES) {
            0 => named,
            more => format!("{named} and {more} more registries"),
        }
    }
}

/// `namespace/name`.
pub fn reference(mirror: &RegistryMirror) -> String {
    format!("{}/{}", mirror.namespace().unwrap_or_default(), mirror.name_any())
}

/// Older first: creation time (a mirror without one, as in `render`, after those with one), then
/// namespace and name.
fn precedence(mirror: &RegistryMirror) -> (bool, Option<i64>, String) {
    let created = mirror.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second());
    (created.is_none(), created, reference(mirror))
}

/// Whether a mirror takes part: it configures nodes and is not going away.
fn configures_nodes(mirror: &RegistryMirror) -> bool {
    mirror.spec.node_config.is_some() && mirror.metadata.deletion_timestamp.is_none()
}

/// The conflicts of `mirror` with each of `others` (itself, if among them, is skipped).
pub fn node_conflicts<'a>(
    mirror: &RegistryMirror,
    others: impl IntoIterator<Item = &'a RegistryMirror>,
) -> Vec<NodeConflict> {
    let Some(node) = mirror.spec.node_config.as_ref().filter(|_| configures_nodes(mirror)) else {
        return Vec::new();
    };
    let me = reference(mirror);
    let mut out: Vec<NodeConflict> = others
        .into_iter()
        .filter(|o| configures_nodes(o) && reference(o) != me)
        .filter_map(|other| {
            let other_node = other.spec.node_config.as_ref()?;
            if !selectors_overlap(&node.node_selector, &other_node.node_selector) {
                return None;
            }
            let registries = shared_registries(mirror, other);
            (!registries.is_empty()).then(|| NodeConflict {
                other: reference(other),
                registries,
                other_first: precedence(other) < precedence(mirror),
            })
        })
        .collect();
    out.sort_by(|a, b| a.other.cmp(&b.other));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(ns_name: &str, created: Option<i64>, registries: &[&str], selector: &str) -> RegistryMirror {
        let (ns, name) = ns_name.split_once('/').unwrap();
        let upstreams: String = registries
            .iter()
            .enumerate()
            .map(|(i, r)| format!("  - {{name: u{i}, registry: {r}, remoteURL: \"https://{r}\"}}\n"))
            .collect();
        let created = created.map(|s| format!(", creationTimestamp: \"{}\"", jiff_time(s))).unwrap_or_default();
        serde_yaml::from_str(&format!(
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\n\
             metadata: {{name: {name}, namespace: {ns}{created}}}\n\
             spec:\n  upstreams:\n{upstreams}  nodeConfig: {{nodeSelector: {selector}}}\n"
        ))
        .unwrap()
    }

    fn jiff_time(s: i64) -> String {
        k8s_openapi::jiff::Timestamp::from_second(s).unwrap().to_string()
    }

    fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_overlap_unless_a_key_differs() {
        let all = sel(&[]);
        let eu = sel(&[("topology.kubernetes.io/region", "eu")]);
        let us = sel(&[("topology.kubernetes.io/region", "us")]);
        let gpu = sel(&[("pool", "gpu")]);
        let eu_gpu = sel(&[("topology.kubernetes.io/region", "eu"), ("pool", "gpu")]);
        for (a, b, overlap) in [
            (&all, &all, true),
            (&all, &eu, true),
            (&eu, &eu, true),
            (&eu, &us, false),
            (&eu, &gpu, true), // a node in eu may be a gpu node
            (&eu_gpu, &us, false),
            (&eu_gpu, &gpu, true),
        ] {
            assert_eq!(selectors_overlap(a, b), overlap, "{a:?} / {b:?}");
            assert_eq!(selectors_overlap(b, a), overlap, "symmetric: {b:?} / {a:?}");
        }
    }

    #[test]
    fn the_older_mirror_keeps_the_registry_and_the_newer_is_refused() {
        let old = mirror("mirrors/hub", Some(1_000), &["docker.io", "ghcr.io"], "{}");
        let new = mirror("team/hub", Some(2_000), &["quay.io", "docker.io"], "{}");
        let mine = node_conflicts(&new, [&old, &new]);
        assert_eq!(
            mine,
            [NodeConflict { other: "mirrors/hub".into(), registries: vec!["docker.io".into()], other_first: true }]
        );
        assert!(mine[0].refusal().contains("mirrors/hub already configures docker.io"), "{}", mine[0].refusal());
        let theirs = node_conflicts(&old, [&old, &new]);
        assert_eq!(
            theirs,
            [NodeConflict { other: "team/hub".into(), registries: vec!["docker.io".into()], other_first: false }]
        );
        assert!(theirs[0].kept().contains("team/hub also asks to configure docker.io"));
        // Same second: namespace/name decides, the same way from both sides.
        let a = mirror("a/m", Some(5), &["docker.io"], "{}");
        let b = mirror("b/m", Some(5), &["docker.io"], "{}");
        assert!(!node_conflicts(&a, [&b])[0].other_first && node_conflicts(&b, [&a])[0].other_first);
        // Without creation times (render): namespace/name.
        let a = mirror("a/m", None, &["docker.io"], "{}");
        let b = mirror("b/m", None, &["docker.io"], "{}");
        assert!(node_conflicts(&b, [&a])[0].other_first);
        // A mirror the API server created comes before one that does not exist yet.
        let stored = mirror("z/m", Some(5), &["docker.io"], "{}");
        assert!(node_conflicts(&a, [&stored])[0].other_first);
    }

    #[test]
    fn a_long_conflict_names_five_registries_and_keeps_its_advice_short() {
        let many: Vec<String> = (0..125).map(|i| format!("registry{i}.example.com")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let old = mirror("mirrors/hub", Some(1), &many, "{}");
        let new = mirror("team/hub", Some(2), &many, "{}");
        let refusal = node_conflicts(&new, [&old])[0].refusal();
        assert!(
            refusal.contains("registry3.example.com, registry4.example.com and 120 more registries on nodes"),
            "{refusal}"
        );
        assert!(!refusal.contains("registry5.example.com"), "{refusal}");
        assert!(refusal.ends_with("or serve them from one mirror only") && refusal.len() < 1024, "{refusal}");
        let kept = node_conflicts(&old, [&new])[0].kept();
        assert!(kept.contains("and 120 more registries on nodes this mirror selects") && kept.len() < 1024, "{kept}");
    }

    #[test]
    fn exclusive_selectors_other_registries_deletions_and_no_node_config_are_no_conflict() {
        let eu = mirror("mirrors/eu", Some(1), &["docker.io"], "{topology.kubernetes.io/region: eu}");
        let us = mirror("mirrors/us", Some(2), &["docker.io"], "{topology.kubernetes.io/region: us}");
        assert!(node_conflicts(&us, [&eu]).is_empty(), "one mirror per region");
        let ghcr = mirror("mirrors/ghcr", Some(2), &["ghcr.io"], "{}");
        assert!(node_conflicts(&ghcr, [&eu]).is_empty());
        let mut going = mirror("mirrors/old", Some(0), &["docker.io"], "{}");
        going.metadata.deletion_timestamp = going.metadata.creation_timestamp.clone();
        assert!(node_conflicts(&us, [&going]).is_empty(), "a deleted mirror's agents are removing its files");
        assert!(node_conflicts(&going, [&us]).is_empty());
        let mut no_nodes = mirror("mirrors/plain", Some(0), &["docker.io"], "{}");
        no_nodes.spec.node_config = None;
        assert!(node_conflicts(&us, [&no_nodes]).is_empty());
        assert!(node_conflicts(&no_nodes, [&us]).is_empty());
        // The same mirror twice in the list (the store holds it too) is not a conflict.
        assert!(node_conflicts(&us, [&us, &us.clone()]).is_empty());
    }
}
