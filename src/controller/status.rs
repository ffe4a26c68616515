//! The status step, as pure functions: from the applied (or live) Deployments, DaemonSet,
//! Services and cleanup Jobs to `RegistryMirrorStatus`, with `metav1.Condition`s keyed by type
//! whose `lastTransitionTime` moves only when their status does. Nothing here talks to the API.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::conflicts::NodeConflict;
use crate::api::{
    CleanupResult, LearnedAuth, NodeCounts, RegistryMirror, RegistryMirrorStatus, UpstreamAuth, UpstreamStatus,
    ZoneNodes,
};
use crate::build::cleanup::{CleanupOutcome, CleanupReport, CLEANUP_CONTAINER};
use crate::build::meta::names;
use crate::build::proxy::REGISTRY_PORT;

use super::upstreams::{self, UpstreamHealth};

pub const READY: &str = "Ready";
pub const PROXIES_AVAILABLE: &str = "ProxiesAvailable";
pub const EDGE_AVAILABLE: &str = "EdgeAvailable";
pub const NODES_CONFIGURED: &str = "NodesConfigured";
pub const DEGRADED: &str = "Degraded";
/// Present only while an upstream's credentials serve anyone ([`crate::api::validate::exposed_credentials`]).
pub const CREDENTIALS_EXPOSED: &str = "CredentialsExposed";
/// Present only while another mirror is refused for configuring this one's registries on the
/// same nodes ([`crate::api::conflicts`]); the refused one says so in its Ready condition.
pub const NODE_CONFIG_CONFLICT: &str = "NodeConfigConflict";
/// Every condition type, in the order they are written.
pub const CONDITION_TYPES: [&str; 7] =
    [READY, PROXIES_AVAILABLE, EDGE_AVAILABLE, NODES_CONFIGURED, DEGRADED, CREDENTIALS_EXPOSED, NODE_CONFIG_CONFLICT];

/// What the status is computed from.
#[derive(Clone, Copy)]
pub struct Observed<'a> {
    /// The mirror's Deployments by name (as applied in this reconcile, else as listed).
    pub deployments: &'a BTreeMap<String, Deployment>,
    /// The mirror's Services by name.
    pub services: &'a BTreeMap<String, Service>,
    /// The node-agent DaemonSet, when nodeConfig is set.
    pub daemon_set: Option<&'a DaemonSet>,
    /// Jobs of the cleanup CronJob.
    pub jobs: &'a [Job],
    /// The pods of the newest finished cleanup Job (their termination message is the report).
    pub cleanup_pods: &'a [Pod],
    /// While node config is being removed (nodeConfig dropped from the spec): nodes not done yet.
    pub removing_nodes: Option<&'a [String]>,
    /// Per upstream name: what its proxies' sidecars see of it (empty: nothing known).
    pub upstream_health: &'a BTreeMap<String, UpstreamHealth>,
    /// Mirrors refused because this one configures their registries on the same nodes first.
    pub node_conflicts: &'a [NodeConflict],
    /// The node agents per zone ([`zone_counts`]); empty when not known.
    pub node_zones: &'a [ZoneNodes],
    /// Per upstream name: the challenge learned from it ([`super::challenge`]).
    pub learned_auth: &'a BTreeMap<String, UpstreamAuth>,
}

/// Agents per zone: each agent Pod counts for the zone of its node (`zone_of`: the node's
/// `topology.kubernetes.io/zone`, `""` when it has none or is unknown), Ready ones as configured.
/// Pods not scheduled yet are not counted, as the DaemonSet does not count them.
pub fn zone_counts<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    zone_of: impl Fn(&str) -> Option<String>,
) -> Vec<ZoneNodes> {
    let mut zones: BTreeMap<String, ZoneNodes> = BTreeMap::new();
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else { continue };
        let zone = zone_of(node).unwrap_or_default();
        let ready = pod
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let entry = zones.entry(zone.clone()).or_insert_with(|| ZoneNodes { zone, ..Default::default() });
        entry.desired += 1;
        entry.configured += i32::from(ready);
    }
    zones.into_values().collect()
}

/// Now, to the second (what the API server stores).
pub fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The in-cluster endpoint of a proxy Service: `http://<cluster IP>:5000`.
pub fn endpoint(service: &Service) -> Option<String> {
    let ip = service.spec.as_ref()?.cluster_ip.as_deref()?;
    if ip.is_empty() || ip == "None" {
        return None;
    }
    // IPv6 cluster IPs need brackets in a URL.
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
    Some(format!("http://{host}:{REGISTRY_PORT}"))
}

/// Upstream name -> endpoint, for every upstream whose Service has a cluster IP.
pub fn proxy_endpoints(mirror: &RegistryMirror, services: &BTreeMap<String, Service>) -> BTreeMap<String, String> {
    mirror
        .spec
        .upstreams
        .iter()
        .filter_map(|u| {
            let svc = services.get(&names::proxy(mirror, &u.name))?;
            Some((u.name.clone(), endpoint(svc)?))
        })
        .collect()
}

struct Counts {
    desired: i32,
    ready: i32,
}

fn deployment_counts(d: Option<&Deployment>) -> Counts {
    let Some(d) = d else { return Counts { desired: 0, ready: 0 } };
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.as_ref();
    // Ready replicas of an older template still serve; a rollout in progress is not an outage.
    let ready = status.and_then(|s| s.ready_replicas).unwrap_or(0);
    Counts { desired, ready }
}

fn condition(type_: &str, ok: bool, reason: &str, message: impl Into<String>, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: truncate(message.into()),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

fn truncate(mut s: String) -> String {
    const MAX: usize = 1024;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// The status the mirror's children say it has.
/// The upstreams' part of the status: per upstream its proxy's replicas and endpoint, and what
/// its sidecars see of the upstream ([`upstreams`]).
struct Upstreams {
    statuses: Vec<UpstreamStatus>,
    /// Upstreams without a ready proxy.
    unavailable: Vec<String>,
    /// "upstream X unreachable for Ns: ..." for those no proxy has reached for DEGRADED_AFTER.
    unreachable: Vec<String>,
}

fn upstream_statuses(mirror: &RegistryMirror, obs: &Observed<'_>, now: &Time, degraded: &mut Vec<String>) -> Upstreams {
    let spec = &mirror.spec;
    let previous = mirror.status.as_ref().map(|s| s.upstreams.as_slice()).unwrap_or(&[]);
    let mut out = Upstreams { statuses: Vec::new(), unavailable: Vec::new(), unreachable: Vec::new() };
    for u in &spec.upstreams {
        let name = names::proxy(mirror, &u.name);
        let c = deployment_counts(obs.deployments.get(&name));
        let desired = if obs.deployments.contains_key(&name) { c.desired } else { spec.proxy.replicas };
        if c.ready < 1 {
            out.unavailable.push(u.name.clone());
        } else if c.ready < desired {
            degraded.push(format!("upstream {} has {}/{} ready replicas", u.name, c.ready, desired));
        }
        let mut status = UpstreamStatus {
            name: u.name.clone(),
            registry: u.registry.clone(),
            endpoint: obs.services.get(&name).and_then(endpoint),
            replicas: desired,
            ready_replicas: c.ready,
            ..Default::default()
        };
        status.learned_auth = obs.learned_auth.get(&u.name).map(|auth| LearnedAuth::new(&u.remote_url, auth));
        let before = previous.iter().find(|p| p.name == u.name);
        upstreams::apply_health(&mut status, obs.upstream_health.get(&u.name), before, now);
        if let Some(down) = upstreams::unreachable_for(&status, now).filter(|d| *d >= upstreams::DEGRADED_AFTER) {
            let why = status.last_error.as_ref().map(|e| format!(": {}", e.message)).unwrap_or_default();
            out.unreachable.push(format!(
                "no proxy of upstream {} has reached {} for {}s{why}",
                u.name,
                u.registry,
                down.as_secs()
            ));
        }
        out.statuses.push(status);
    }
    out
}

pub fn observed_status(mirror: &RegistryMirror, obs: Observed<'_>, now: &Time) -> RegistryMirrorStatus {
    let spec = &mirror.spec;
    let generation = mirror.metadata.generation;
    let mut degraded = Vec::new();

    let Upstreams { statuses: upstreams, unavailable, unreachable } =
        upstream_statuses(mirror, &obs, now, &mut degraded);
    let total = spec.upstreams.len();
    let ready_upstreams = total - unavailable.len();
    let proxies = proxies_condition(total, &unavailable, generation);
    let edge = edge_condition(mirror, &obs, &mut degraded);
    let (nodes_cond, nodes) = nodes_condition(mirror, &obs, &mut degraded);
    let ready = ready_condition([&proxies, &edge, &nodes_cond], generation);
    let degraded_cond = degraded_condition(degraded, unreachable, generation);

    let mut conditions = vec![ready, proxies, edge, nodes_cond, degraded_cond];
    conditions.extend(warning_conditions(mirror, &obs));
    let previous = mirror.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let (cache_fill, cache_hit_ratio) = super::caches::columns(&upstreams);
    RegistryMirrorStatus {
        observed_generation: generation,
        conditions: merge_conditions(previous, conditions, now),
        upstreams,
        upstreams_ready: Some(format!("{ready_upstreams}/{total}")),
        nodes_configured: nodes.as_ref().map(|n| format!("{}/{}", n.configured, n.desired)),
        nodes,
        last_cleanup: last_cleanup(obs.jobs, obs.cleanup_pods)
            .or_else(|| spec.cleanup.as_ref().and(mirror.status.as_ref()?.last_cleanup.clone())),
        cache_fill,
        cache_hit_ratio,
    }
}

/// `ProxiesAvailable`: every upstream has a ready proxy replica.
fn proxies_condition(total: usize, unavailable: &[String], generation: Option<i64>) -> Condition {
    if unavailable.is_empty() {
        condition(
            PROXIES_AVAILABLE,
            true,
            "ProxiesAvailable",
            format!("{total}/{total} upstreams have a ready proxy"),
            generation,
        )
    } else {
        condition(
            PROXIES_AVAILABLE,
            false,
            "ProxiesUnavailable",
            format!("no ready proxy for upstream {}", list(unavailable)),
            generation,
        )
    }
}

/// `EdgeAvailable`: at least one edge replica is ready; fewer than desired is `degraded`.
fn edge_condition(mirror: &RegistryMirror, obs: &Observed<'_>, degraded: &mut Vec<String>) -> Condition {
    let generation = mirror.metadata.generation;
    let Some(e) = &mirror.spec.edge else {
        return condition(EDGE_AVAILABLE, true, "EdgeNotConfigured", "spec.edge is not set", generation);
    };
    let c = deployment_counts(obs.deployments.get(&names::edge(mirror)));
    if c.ready >= 1 && c.ready < e.replicas {
        degraded.push(format!("edge has {}/{} ready replicas", c.ready, e.replicas));
    }
    if c.ready >= 1 {
        condition(
            EDGE_AVAILABLE,
            true,
            "EdgeAvailable",
            format!("{}/{} edge replicas ready", c.ready, e.replicas),
            generation,
        )
    } else {
        condition(EDGE_AVAILABLE, false, "EdgeUnavailable", "no edge replica is ready", generation)
    }
}

/// `NodesConfigured` and the node counts of the status: from the agent DaemonSet, or the removal
/// of node config in progress. Some but not all nodes configured is `degraded`.
fn nodes_condition(
    mirror: &RegistryMirror,
    obs: &Observed<'_>,
    degraded: &mut Vec<String>,
) -> (Condition, Option<NodeCounts>) {
    let generation = mirror.metadata.generation;
    let ds = match (obs.removing_nodes, &mirror.spec.node_config, obs.daemon_set) {
        (Some(pending), _, _) => {
            let message = if pending.is_empty() {
                "removing node config".to_string()
            } else {
                format!("waiting for the node agents on {} to remove their files", list(pending))
            };
            return (condition(NODES_CONFIGURED, false, "RemovingNodeConfig", message, generation), None);
        }
        (None, None, _) => {
            let cond =
                condition(NODES_CONFIGURED, true, "NodeConfigNotRequested", "spec.nodeConfig is not set", generation);
            return (cond, None);
        }
        (None, Some(_), None) => {
            let cond = condition(
                NODES_CONFIGURED,
                false,
                "NodeAgentMissing",
                "the node-agent DaemonSet does not exist yet",
                generation,
            );
            return (cond, Some(NodeCounts { desired: 0, configured: 0, zones: Vec::new() }));
        }
        (None, Some(_), Some(ds)) => ds,
    };
    let st = ds.status.clone().unwrap_or_default();
    let desired = st.desired_number_scheduled;
    let configured = st.number_ready;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    let current = st.observed_generation.unwrap_or(0) >= ds.metadata.generation.unwrap_or(0);
    let counts = Some(NodeCounts { desired, configured, zones: obs.node_zones.to_vec() });
    let cond = if desired == 0 && current {
        condition(NODES_CONFIGURED, true, "NoMatchingNodes", "no node matches nodeConfig.nodeSelector", generation)
    } else if current && configured >= desired && updated >= desired {
        condition(
            NODES_CONFIGURED,
            true,
            "NodesConfigured",
            format!("{configured}/{desired} nodes configured"),
            generation,
        )
    } else {
        if configured > 0 && configured < desired {
            degraded.push(format!("{configured}/{desired} nodes configured"));
        }
        condition(
            NODES_CONFIGURED,
            false,
            if current { "NodesNotReady" } else { "RollingOut" },
            format!("{configured}/{desired} nodes configured"),
            generation,
        )
    };
    (cond, counts)
}

/// `Ready`: the first of the conditions that is not True gives the reason; all their messages
/// together are the message.
fn ready_condition(parts: [&Condition; 3], generation: Option<i64>) -> Condition {
    let blocking: Vec<&Condition> = parts.into_iter().filter(|c| c.status != "True").collect();
    match blocking.first() {
        None => condition(READY, true, "Ready", "every proxy, the edge and the node config are available", generation),
        Some(first) => condition(
            READY,
            false,
            &first.reason,
            blocking.iter().map(|c| c.message.as_str()).collect::<Vec<_>>().join("; "),
            generation,
        ),
    }
}

/// `Degraded`: replicas missing (`degraded`) or upstreams not reached (`unreachable`).
fn degraded_condition(mut degraded: Vec<String>, unreachable: Vec<String>, generation: Option<i64>) -> Condition {
    // Missing replicas first: they are this cluster's to fix; an upstream is someone else's.
    let reason = if degraded.is_empty() { "UpstreamUnreachable" } else { "ReplicasMissing" };
    degraded.extend(unreachable);
    if degraded.is_empty() {
        condition(
            DEGRADED,
            false,
            "AsDesired",
            "every component has its desired replicas and every known upstream is reached",
            generation,
        )
    } else {
        condition(DEGRADED, true, reason, degraded.join("; "), generation)
    }
}

/// The warnings that only appear while they hold: credentials served without client auth, and
/// another mirror refused because this one keeps a registry on the same nodes.
fn warning_conditions(mirror: &RegistryMirror, obs: &Observed<'_>) -> Vec<Condition> {
    let generation = mirror.metadata.generation;
    let mut out = Vec::new();
    let exposed: Vec<String> =
        crate::api::validate::exposed_credentials(mirror).iter().map(|p| p.to_string()).collect();
    if !exposed.is_empty() {
        out.push(condition(CREDENTIALS_EXPOSED, true, "NoClientAuth", exposed.join("; "), generation));
    }
    let refused: Vec<String> = obs.node_conflicts.iter().filter(|c| !c.other_first).map(NodeConflict::kept).collect();
    if !refused.is_empty() {
        out.push(condition(NODE_CONFIG_CONFLICT, true, "OtherMirrorRefused", refused.join("; "), generation));
    }
    out
}

/// The status of a mirror the operator cannot act on (invalid spec, missing Secret): Ready is
/// False with the reason; everything else stays as last observed.
pub fn problem_status(mirror: &RegistryMirror, reason: &str, message: &str, now: &Time) -> RegistryMirrorStatus {
    let mut status = mirror.status.clone().unwrap_or_default();
    let generation = mirror.metadata.generation;
    status.observed_generation = generation;
    let ready = condition(READY, false, reason, message, generation);
    let mut new: Vec<Condition> = vec![ready];
    new.extend(status.conditions.iter().filter(|c| c.type_ != READY).cloned());
    status.conditions = merge_conditions(&status.conditions, new, now);
    status
}

/// Puts the conditions in the standard order, keeping each one's lastTransitionTime from
/// `previous` when its status did not change.
pub fn merge_conditions(previous: &[Condition], new: Vec<Condition>, now: &Time) -> Vec<Condition> {
    let mut out: Vec<Condition> = new
        .into_iter()
        .map(|mut c| {
            c.last_transition_time = match previous.iter().find(|p| p.type_ == c.type_) {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            c
        })
        .collect();
    out.sort_by_key(|c| CONDITION_TYPES.iter().position(|t| *t == c.type_).unwrap_or(usize::MAX));
    out
}

/// Conditions whose status or reason changed, for Events: (new condition, whether it is bad news).
pub fn transitions<'a>(previous: &[Condition], new: &'a [Condition]) -> Vec<(&'a Condition, bool)> {
    new.iter()
        .filter(|c| match previous.iter().find(|p| p.type_ == c.type_) {
            Some(p) => p.status != c.status || p.reason != c.reason,
            // A condition's first appearance is news only for Ready and an exposure.
            None => [READY, CREDENTIALS_EXPOSED, NODE_CONFIG_CONFLICT].contains(&c.type_.as_str()),
        })
        .map(|c| {
            let bad = if [DEGRADED, CREDENTIALS_EXPOSED, NODE_CONFIG_CONFLICT].contains(&c.type_.as_str()) {
                c.status == "True"
            } else {
                c.status != "True"
            };
            (c, bad)
        })
        .collect()
}

/// The newest finished Job of the cleanup CronJob.
/// The newest finished Job of the cleanup CronJob, and what its conditions say.
pub fn newest_finished_job(jobs: &[Job]) -> Option<(&Job, CleanupResult)> {
    jobs.iter()
        .filter_map(|job| {
            let status = job.status.as_ref()?;
            let finished = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))?;
            let succeeded = finished.type_ == "Complete";
            let time = if succeeded { status.completion_time.clone() } else { None }
                .or_else(|| finished.last_transition_time.clone())?;
            Some((
                job,
                CleanupResult {
                    time,
                    result: if succeeded { "Succeeded" } else { "Failed" }.to_string(),
                    bytes_before: None,
                    bytes_after: None,
                    message: if succeeded { None } else { finished.message.clone().map(truncate) },
                },
            ))
        })
        .max_by(|a, b| a.1.time.cmp(&b.1.time))
}

pub fn last_cleanup(jobs: &[Job], pods: &[Pod]) -> Option<CleanupResult> {
    let (job, mut result) = newest_finished_job(jobs)?;
    // The Job's pod says what the run did (build::cleanup::CleanupReport in its termination
    // message); without a pod the Job's own condition is all there is.
    let job_name = job.metadata.name.as_deref()?;
    let message = pods
        .iter()
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            labels.and_then(|l| l.get("job-name").or_else(|| l.get("batch.kubernetes.io/job-name"))).map(String::as_str)
                == Some(job_name)
        })
        .flat_map(|p| p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()))
        .filter(|c| c.name == CLEANUP_CONTAINER)
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .next_back();
    if let Some(message) = message {
        match CleanupReport::from_termination_message(&message) {
            Ok(report) => {
                result.result = match report.outcome {
                    CleanupOutcome::Succeeded => "Succeeded",
                    CleanupOutcome::Failed => "Failed",
                }
                .to_string();
                result.bytes_before = report.bytes_before.and_then(|b| i64::try_from(b).ok());
                result.bytes_after = report.bytes_after.and_then(|b| i64::try_from(b).ok());
                result.message = (!report.message.is_empty()).then(|| truncate(report.message));
            }
            // Crashed before writing a report: the message is the log tail.
            Err(_) => {
                result.result = "Failed".into();
                result.message = Some(truncate(message));
            }
        }
    }
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(name: &str, condition: &str, at: &str) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"conditions": [{"type": condition, "status": "True", "lastTransitionTime": at, "message": "exit 1"}],
                       "completionTime": if condition == "Complete" { json!(at) } else { json!(null) }}
        }))
        .unwrap()
    }

    #[test]
    fn last_cleanup_is_the_newest_finished_job() {
        let running: Job = serde_json::from_value(json!({"metadata": {"name": "r"}, "status": {"active": 1}})).unwrap();
        let jobs = [job("a", "Complete", "2026-01-01T03:00:00Z"), job("b", "Failed", "2026-01-08T03:00:00Z"), running];
        let last = last_cleanup(&jobs, &[]).unwrap();
        assert_eq!(last.result, "Failed");
        assert_eq!(last.time.0.to_string(), "2026-01-08T03:00:00Z");
        assert_eq!(last.message.as_deref(), Some("exit 1"));
        assert_eq!(last_cleanup(&jobs[..1], &[]).unwrap().result, "Succeeded");
        assert!(last_cleanup(&jobs[2..], &[]).is_none());
    }

    fn cleanup_pod(job: &str, message: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{job}-x"), "labels": {"job-name": job}},
            "status": {"containerStatuses": [{
                "name": "cleanup", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "message": message}}
            }]}
        }))
        .unwrap()
    }

    #[test]
    fn last_cleanup_carries_the_jobs_report() {
        let jobs = [job("a", "Complete", "2026-01-01T03:00:00Z"), job("b", "Complete", "2026-01-08T03:00:00Z")];
        let report = r#"{"version":1,"run":"r","policy":"purge","storage":"persistentVolumeClaim","outcome":"Succeeded",
            "startedAt":"2026-01-08T03:00:00Z","finishedAt":"2026-01-08T03:01:00Z","durationSeconds":60.0,
            "bytesBefore":1000,"bytesAfter":10,"message":"freed 990 bytes"}"#;
        // The older Job's pod is ignored; the newest finished Job's report fills the bytes.
        let pods = [cleanup_pod("a", "garbage"), cleanup_pod("b", report)];
        let last = last_cleanup(&jobs, &pods).unwrap();
        assert_eq!((last.result.as_str(), last.bytes_before, last.bytes_after), ("Succeeded", Some(1000), Some(10)));
        assert_eq!(last.message.as_deref(), Some("freed 990 bytes"));
        // A Job that crashed before writing its report: Failed, with what the pod left.
        let last = last_cleanup(&jobs[..1], &pods).unwrap();
        assert_eq!((last.result.as_str(), last.message.as_deref()), ("Failed", Some("garbage")));
    }

    #[test]
    fn endpoints_use_the_cluster_ip() {
        let svc = |ip: &str| -> Service { serde_json::from_value(json!({"spec": {"clusterIP": ip}})).unwrap() };
        assert_eq!(endpoint(&svc("10.96.4.2")).as_deref(), Some("http://10.96.4.2:5000"));
        assert_eq!(endpoint(&svc("fd00::1")).as_deref(), Some("http://[fd00::1]:5000"));
        assert_eq!(endpoint(&svc("None")), None);
    }

    /// Every reason the edge, node and summary conditions can give, from what is observed.
    #[test]
    fn conditions_follow_the_edge_and_the_node_agents() {
        let mirror: RegistryMirror = serde_yaml::from_str(
            "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\n\
             metadata: {name: m, namespace: ns, generation: 3}\n\
             spec: {upstreams: [{name: hub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}],\n\
             edge: {domain: mirror.example.com, replicas: 2}, nodeConfig: {}}\n",
        )
        .unwrap();
        let deployment = |replicas: i32, ready: i32| -> Deployment {
            serde_json::from_value(json!({"spec": {"replicas": replicas, "template": {}, "selector": {}},
                                          "status": {"readyReplicas": ready}}))
            .unwrap()
        };
        let daemon_set = |generation: i64, observed: i64, desired: i32, ready: i32, updated: i32| -> DaemonSet {
            serde_json::from_value(json!({"metadata": {"generation": generation},
                "status": {"observedGeneration": observed, "desiredNumberScheduled": desired, "numberReady": ready,
                           "updatedNumberScheduled": updated, "currentNumberScheduled": desired,
                           "numberMisscheduled": 0}}))
            .unwrap()
        };
        let reasons = |edge_ready: i32, ds: Option<DaemonSet>, removing: Option<&[String]>| {
            let deployments = BTreeMap::from([
                (names::proxy(&mirror, "hub"), deployment(2, 2)),
                (names::edge(&mirror), deployment(2, edge_ready)),
            ]);
            let (services, upstream_health, learned_auth) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
            let obs = Observed {
                deployments: &deployments,
                services: &services,
                daemon_set: ds.as_ref(),
                jobs: &[],
                cleanup_pods: &[],
                removing_nodes: removing,
                upstream_health: &upstream_health,
                node_conflicts: &[],
                node_zones: &[],
                learned_auth: &learned_auth,
            };
            let status = observed_status(&mirror, obs, &now());
            let reason = |t: &str| {
                let c = status.conditions.iter().find(|c| c.type_ == t).unwrap();
                assert_eq!(c.observed_generation, Some(3));
                format!("{}={}", c.reason, c.status)
            };
            [reason(READY), reason(EDGE_AVAILABLE), reason(NODES_CONFIGURED), reason(DEGRADED)].join(" ")
        };
        let all_ready = Some(daemon_set(4, 4, 3, 3, 3));
        assert_eq!(
            reasons(2, all_ready.clone(), None),
            "Ready=True EdgeAvailable=True NodesConfigured=True AsDesired=False"
        );
        assert_eq!(
            reasons(1, all_ready.clone(), None),
            "Ready=True EdgeAvailable=True NodesConfigured=True ReplicasMissing=True"
        );
        assert_eq!(
            reasons(0, all_ready, None),
            "EdgeUnavailable=False EdgeUnavailable=False NodesConfigured=True AsDesired=False"
        );
        assert_eq!(
            reasons(2, None, None),
            "NodeAgentMissing=False EdgeAvailable=True NodeAgentMissing=False AsDesired=False"
        );
        assert_eq!(
            reasons(2, Some(daemon_set(5, 4, 3, 3, 3)), None),
            "RollingOut=False EdgeAvailable=True RollingOut=False AsDesired=False"
        );
        assert_eq!(
            reasons(2, Some(daemon_set(4, 4, 3, 2, 3)), None),
            "NodesNotReady=False EdgeAvailable=True NodesNotReady=False ReplicasMissing=True"
        );
        assert_eq!(
            reasons(2, Some(daemon_set(4, 4, 0, 0, 0)), None),
            "Ready=True EdgeAvailable=True NoMatchingNodes=True AsDesired=False"
        );
        assert_eq!(
            reasons(2, None, Some(&["node-a".to_string()])),
            "RemovingNodeConfig=False EdgeAvailable=True RemovingNodeConfig=False AsDesired=False"
        );
    }

    #[test]
    fn transition_time_moves_only_with_status() {
        let t0 = Time(Timestamp::from_second(1_000).unwrap());
        let t1 = Time(Timestamp::from_second(2_000).unwrap());
        let first = merge_conditions(&[], vec![condition(READY, false, "A", "m", Some(1))], &t0);
        let same = merge_conditions(&first, vec![condition(READY, false, "B", "other", Some(2))], &t1);
        assert_eq!(same[0].last_transition_time, t0);
        let flipped = merge_conditions(&same, vec![condition(READY, true, "Ready", "", Some(2))], &t1);
        assert_eq!(flipped[0].last_transition_time, t1);
        assert_eq!(transitions(&same, &flipped).len(), 1);
        assert!(transitions(&flipped, &flipped).is_empty());
    }
}
