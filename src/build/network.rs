//! `spec.networkPolicy`: one NetworkPolicy in front of the proxies and one in front of the edge.
//!
//! Each admits, on the ports it names, only: the listed namespaces and address ranges (pulls),
//! the listed metrics namespaces (the `metrics` ports), the mirror's own edge (to the proxies) and
//! the operator (the upstream sidecars' counters on [`sidecar::PROBE_PORT`]). Ingress only: the
//! proxies must reach their upstreams wherever those are. Traffic from a pod's own node (kubelet
//! probes, and on most CNIs the node's own pulls) is allowed by every policy implementation.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::meta::{self, Component, APP_NAME, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_NAME};
use super::{edge, keeper, proxy, sidecar, upstream_auth, Inputs};
use crate::api::{NetworkPolicySpec as Spec, RegistryMirror};

/// The label every namespace carries with its own name (Kubernetes 1.22 and newer).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The operator's pods, as the chart and `config/manager` label them, in any namespace.
pub const OPERATOR_COMPONENT: &str = "controller";

pub fn proxies_policy_name(mirror: &RegistryMirror) -> String {
    format!("{}-proxies", mirror.name_any())
}

pub fn edge_policy_name(mirror: &RegistryMirror) -> String {
    format!("{}-edge", mirror.name_any())
}

/// The policies of a mirror with `networkPolicy`: the proxies', and the edge's when it has one.
pub fn network_policies(mirror: &RegistryMirror, inputs: &Inputs) -> Vec<NetworkPolicy> {
    let Some(spec) = &mirror.spec.network_policy else {
        return Vec::new();
    };
    let mut out = vec![proxies_policy(mirror, spec, inputs)];
    if let Some(e) = &mirror.spec.edge {
        out.push(edge_policy(mirror, spec, e.tls()));
    }
    out
}

fn proxies_policy(mirror: &RegistryMirror, spec: &Spec, inputs: &Inputs) -> NetworkPolicy {
    let mut pullers = clients(spec);
    if mirror.spec.edge.is_some() {
        // The edge forwards every pull to the proxies' Services (same namespace).
        pullers.push(NetworkPolicyPeer {
            pod_selector: Some(match_labels(meta::selector_labels(mirror, Component::Edge, None))),
            ..Default::default()
        });
    }
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        pod_selector: Some(match_labels(BTreeMap::from([
            (LABEL_NAME.to_string(), APP_NAME.to_string()),
            (LABEL_COMPONENT.to_string(), OPERATOR_COMPONENT.to_string()),
        ]))),
        ..Default::default()
    };
    // Only proxies with an upstream sidecar have its port, only those with a cache keeper its.
    let mut operator_ports = Vec::new();
    if mirror.spec.upstreams.iter().any(|u| upstream_auth(u, inputs).is_some()) {
        operator_ports.push(tcp(IntOrString::Int(sidecar::PROBE_PORT)));
    }
    if keeper::managed(mirror) {
        operator_ports.push(tcp(IntOrString::Int(crate::cache::keeper::LISTEN_PORT)));
    }
    let rules = [
        rule(pullers, vec![tcp(IntOrString::Int(proxy::REGISTRY_PORT))]),
        (!operator_ports.is_empty()).then(|| rule(vec![operator], operator_ports)).flatten(),
        metrics_rule(spec),
    ];
    let selector = BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), mirror.name_any()),
        (LABEL_COMPONENT.to_string(), Component::Proxy.as_str().to_string()),
    ]);
    policy(mirror, proxies_policy_name(mirror), Component::Proxy, selector, rules)
}

fn edge_policy(mirror: &RegistryMirror, spec: &Spec, tls: bool) -> NetworkPolicy {
    let mut ports = vec![tcp(IntOrString::Int(edge::HTTP_PORT))];
    if tls {
        ports.push(tcp(IntOrString::Int(edge::HTTPS_PORT)));
    }
    let rules = [rule(clients(spec), ports), metrics_rule(spec)];
    let selector = meta::selector_labels(mirror, Component::Edge, None);
    policy(mirror, edge_policy_name(mirror), Component::Edge, selector, rules)
}

fn policy(
    mirror: &RegistryMirror,
    name: String,
    component: Component,
    selector: BTreeMap<String, String>,
    rules: impl IntoIterator<Item = Option<NetworkPolicyIngressRule>>,
) -> NetworkPolicy {
    // No rule at all admits nothing (beyond the node's own traffic): the policy still applies.
    let ingress = rules.into_iter().flatten().collect();
    NetworkPolicy {
        metadata: meta::object_meta(mirror, name, component, None),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(selector)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..Default::default()
        }),
    }
}

/// Who may pull: the listed namespaces' pods and the listed address ranges.
fn clients(spec: &Spec) -> Vec<NetworkPolicyPeer> {
    let mut peers: Vec<NetworkPolicyPeer> = namespaces(&spec.from_namespaces).into_iter().collect();
    peers.extend(spec.from_cidrs.iter().map(|cidr| NetworkPolicyPeer {
        ip_block: Some(IPBlock { cidr: cidr.clone(), except: None }),
        ..Default::default()
    }));
    peers
}

fn metrics_rule(spec: &Spec) -> Option<NetworkPolicyIngressRule> {
    rule(
        namespaces(&spec.metrics_from_namespaces).into_iter().collect(),
        vec![tcp(IntOrString::String("metrics".into()))],
    )
}

/// Every pod of the named namespaces; `None` for no names (an empty selector would mean all).
fn namespaces(names: &[String]) -> Option<NetworkPolicyPeer> {
    (!names.is_empty()).then(|| NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: NAMESPACE_NAME_LABEL.into(),
                operator: "In".into(),
                values: Some(names.to_vec()),
            }]),
            match_labels: None,
        }),
        ..Default::default()
    })
}

/// A rule admitting `from` on `ports`, or none when `from` is empty: the API reads an empty or
/// missing `from` as every source.
fn rule(from: Vec<NetworkPolicyPeer>, ports: Vec<NetworkPolicyPort>) -> Option<NetworkPolicyIngressRule> {
    (!from.is_empty()).then_some(NetworkPolicyIngressRule { from: Some(from), ports: Some(ports) })
}

fn tcp(port: IntOrString) -> NetworkPolicyPort {
    NetworkPolicyPort { port: Some(port), protocol: Some("TCP".into()), end_port: None }
}

fn match_labels(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector { match_labels: Some(labels), match_expressions: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{build_valid, Inputs, Settings};
    use crate::cache::keeper::LISTEN_PORT;
    use k8s_openapi::api::core::v1::PodSpec;

    fn mirror(extra: &str) -> RegistryMirror {
        serde_yaml::from_str(&format!(
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\n\
             metadata: {{name: m, namespace: mirrors, uid: 6f1c1f2e-0000-4000-8000-000000000001}}\n\
             spec:\n  upstreams:\n  - {{name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}}\n\
             \x20 - {{name: corp, registry: corp.example.com, remoteURL: \"https://corp.example.com\"}}\n{extra}"
        ))
        .unwrap()
    }

    const FULL: &str = "  edge: {domain: mirror.example.com, tlsSecretRef: {name: tls}}\n  networkPolicy:\n    \
                        fromNamespaces: [ci, build]\n    fromCIDRs: [10.20.0.0/16, \"fd00::/64\"]\n    \
                        metricsFromNamespaces: [monitoring]\n";

    fn selects(policy: &NetworkPolicy, labels: &BTreeMap<String, String>) -> bool {
        let selector = policy.spec.as_ref().unwrap().pod_selector.as_ref().unwrap();
        assert!(selector.match_expressions.is_none());
        selector.match_labels.as_ref().unwrap().iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    fn rules(policy: &NetworkPolicy) -> &[NetworkPolicyIngressRule] {
        policy.spec.as_ref().unwrap().ingress.as_deref().unwrap()
    }

    fn ports(rule: &NetworkPolicyIngressRule) -> Vec<IntOrString> {
        rule.ports.iter().flatten().map(|p| p.port.clone().unwrap()).collect()
    }

    /// Whether a container of the pod (native sidecars included) has the port.
    fn has_port(pod: &PodSpec, port: &IntOrString) -> bool {
        let containers = pod.containers.iter().chain(pod.init_containers.iter().flatten());
        containers.flat_map(|c| c.ports.iter().flatten()).any(|p| match port {
            IntOrString::Int(n) => p.container_port == *n,
            IntOrString::String(name) => p.name.as_deref() == Some(name.as_str()),
        })
    }

    #[test]
    fn no_policy_without_the_field() {
        assert!(network_policies(&mirror(""), &Inputs::default()).is_empty());
        let fleet = build_valid(&mirror(""), &Inputs::default(), &Settings::default());
        assert!(fleet.children.network_policies.is_empty());
    }

    #[test]
    fn the_proxies_admit_the_listed_clients_the_edge_and_the_operator_only() {
        let m = mirror(FULL);
        let policies = network_policies(&m, &Inputs::default());
        assert_eq!(policies.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["m-proxies", "m-edge"]);
        let proxies = &policies[0];
        assert_eq!(proxies.spec.as_ref().unwrap().policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
        let r = rules(proxies);
        assert_eq!(r.len(), 3, "{r:?}");
        // Pulls: the two namespaces by name, the two ranges, the mirror's edge pods.
        assert_eq!(ports(&r[0]), [IntOrString::Int(proxy::REGISTRY_PORT)]);
        let from = r[0].from.as_ref().unwrap();
        assert_eq!(from.len(), 4, "{from:?}");
        let ns = from[0].namespace_selector.as_ref().unwrap().match_expressions.as_ref().unwrap();
        assert_eq!(ns[0].key, NAMESPACE_NAME_LABEL);
        assert_eq!(ns[0].values.as_deref(), Some(&["ci".to_string(), "build".to_string()][..]));
        assert!(from[0].pod_selector.is_none(), "every pod of those namespaces");
        assert_eq!(from[1].ip_block.as_ref().unwrap().cidr, "10.20.0.0/16");
        assert_eq!(from[2].ip_block.as_ref().unwrap().cidr, "fd00::/64");
        assert!(from[3].namespace_selector.is_none(), "the edge: this namespace only");
        let edge_pods = from[3].pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
        assert_eq!(edge_pods, &meta::selector_labels(&m, Component::Edge, None));
        // The operator, in whatever namespace it runs, on the sidecars' and keepers' figures only.
        assert_eq!(ports(&r[1]), [IntOrString::Int(sidecar::PROBE_PORT), IntOrString::Int(LISTEN_PORT)]);
        let operator = &r[1].from.as_ref().unwrap()[0];
        assert_eq!(operator.namespace_selector, Some(LabelSelector::default()));
        assert_eq!(
            operator.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap()[LABEL_COMPONENT],
            OPERATOR_COMPONENT
        );
        // Metrics, from the monitoring namespace only.
        assert_eq!(ports(&r[2]), [IntOrString::String("metrics".into())]);
        assert_eq!(r[2].from.as_ref().unwrap().len(), 1);
        // The edge: clients on both listeners (TLS), metrics; not the operator.
        let edge = rules(&policies[1]);
        assert_eq!(edge.len(), 2);
        assert_eq!(ports(&edge[0]), [IntOrString::Int(edge::HTTP_PORT), IntOrString::Int(edge::HTTPS_PORT)]);
        assert_eq!(edge[0].from.as_ref().unwrap().len(), 3);
        assert_eq!(ports(&edge[1]), [IntOrString::String("metrics".into())]);
    }

    #[test]
    fn nothing_listed_admits_nobody_never_everybody() {
        // An empty or missing `from` means every source to the API: no rule may have one.
        for extra in [
            "  networkPolicy: {}\n",
            "  edge: {domain: mirror.example.com}\n  networkPolicy: {}\n",
            "  edge: {domain: mirror.example.com}\n  networkPolicy: {metricsFromNamespaces: [monitoring]}\n",
            "  networkPolicy: {fromCIDRs: [10.0.0.0/8]}\n",
        ] {
            let policies = network_policies(&mirror(extra), &Inputs::default());
            assert!(!policies.is_empty(), "{extra}");
            for p in &policies {
                let ingress = p.spec.as_ref().unwrap().ingress.as_ref().expect("ingress is always written");
                for rule in ingress {
                    assert!(rule.from.as_ref().is_some_and(|f| !f.is_empty()), "{extra}: {rule:?} admits everyone");
                    assert!(rule.ports.as_ref().is_some_and(|p| !p.is_empty()), "{extra}: {rule:?} opens every port");
                }
            }
        }
        let policies = network_policies(
            &mirror("  edge: {domain: mirror.example.com}\n  networkPolicy: {}\n"),
            &Inputs::default(),
        );
        assert_eq!(rules(&policies[0]).len(), 2, "edge and operator only");
        assert!(rules(&policies[1]).is_empty(), "the edge admits nobody (beyond its node)");
        assert_eq!(
            ports(&rules(&network_policies(&mirror("  networkPolicy: {}\n"), &Inputs::default())[0])[0]),
            [IntOrString::Int(5082), IntOrString::Int(LISTEN_PORT)]
        );
        // Without an upstream sidecar the operator reads only the keepers ...
        let mut plain = mirror("  networkPolicy: {}\n");
        plain.spec.upstreams.retain(|u| u.name == "corp");
        assert_eq!(ports(&rules(&network_policies(&plain, &Inputs::default())[0])[0]), [IntOrString::Int(LISTEN_PORT)]);
        // ... and on S3 storage (no keeper) nothing.
        plain.spec.proxy.storage =
            serde_json::from_value(serde_json::json!({"s3": {"bucket": "b", "region": "r"}})).unwrap();
        assert!(rules(&network_policies(&plain, &Inputs::default())[0]).is_empty());
    }

    #[test]
    fn each_policy_selects_exactly_its_pods_and_names_only_their_ports() {
        let spec = format!("{FULL}  nodeConfig: {{}}\n  cleanup: {{schedule: \"0 3 * * *\"}}\n");
        let m = mirror(&spec);
        let fleet = build_valid(&m, &Inputs::default(), &Settings::default());
        let policies = &fleet.children.network_policies;
        assert_eq!(policies.len(), 2);
        let mut other = mirror(&spec);
        other.metadata.name = Some("other".into());
        let other_fleet = build_valid(&other, &Inputs::default(), &Settings::default());
        let mut pods: BTreeMap<String, Vec<PodSpec>> = BTreeMap::new();
        for d in &fleet.children.deployments {
            let template = d.spec.as_ref().unwrap().template.clone();
            let labels = template.metadata.unwrap().labels.unwrap();
            let component = labels[LABEL_COMPONENT].as_str();
            let mine: Vec<&NetworkPolicy> = policies.iter().filter(|p| selects(p, &labels)).collect();
            assert_eq!(mine.len(), 1, "{} is selected by one policy", d.name_any());
            let want = if component == "edge" { "m-edge" } else { "m-proxies" };
            assert_eq!(mine[0].name_any(), want);
            pods.entry(want.to_string()).or_default().push(template.spec.unwrap());
        }
        assert_eq!(pods["m-proxies"].len(), 2);
        // Every port a policy names is a port of a pod it selects (the sidecar port: of docker.io's).
        for policy in policies {
            for port in rules(policy).iter().flat_map(ports) {
                let selected = &pods[&policy.name_any()];
                assert!(selected.iter().any(|pod| has_port(pod, &port)), "{} names {port:?}", policy.name_any());
            }
        }
        for d in &other_fleet.children.deployments {
            let labels = d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.clone().unwrap();
            assert!(!policies.iter().any(|p| selects(p, &labels)), "m's policies select {}", d.name_any());
        }
        // The agents and the cleanup job are not selected (they serve nothing).
        assert_eq!(fleet.children.daemon_sets.len(), 1);
        for ds in &fleet.children.daemon_sets {
            let labels = ds.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.clone().unwrap();
            assert!(!policies.iter().any(|p| selects(p, &labels)));
        }
        assert_eq!(fleet.children.cron_jobs.len(), 1);
        for cj in &fleet.children.cron_jobs {
            let job = cj.spec.as_ref().unwrap().job_template.spec.as_ref().unwrap();
            let labels = job.template.metadata.as_ref().unwrap().labels.clone().unwrap();
            assert!(!policies.iter().any(|p| selects(p, &labels)));
        }
    }
}
