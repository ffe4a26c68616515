//! The cleanup Job's decisions as pure functions of API objects: the patch that requests a
//! cleanup, when a rollout is done, which pods are still old, what the new replicas reported,
//! and the report.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

use crate::build::cleanup::{
    CleanupOutcome, CleanupReport, ReplicaCleanup, UpstreamCleanup, CLEANUP_INIT_CONTAINER, CLEANUP_REPORT_VERSION,
    CLEANUP_REQUEST_ANNOTATION,
};

/// JSON merge patch that sets the cleanup request on the pod template, which rolls the pods.
pub fn cleanup_patch(request: &str) -> Value {
    json!({"spec": {"template": {"metadata": {"annotations": {CLEANUP_REQUEST_ANNOTATION: request}}}}})
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutState {
    Done,
    Progressing(String),
    Failed(String),
}

/// Whether the rollout started by the patch that produced `generation` is complete, the way
/// `kubectl rollout status` decides: observed, every replica updated and available, no old
/// replica counted any more.
pub fn rollout_state(d: &Deployment, generation: i64) -> RolloutState {
    let Some(status) = &d.status else { return RolloutState::Progressing("no status yet".into()) };
    if status.observed_generation.unwrap_or_default() < generation {
        return RolloutState::Progressing("the Deployment controller has not seen the change yet".into());
    }
    if let Some(c) = status.conditions.iter().flatten().find(|c| c.type_ == "Progressing") {
        if c.reason.as_deref() == Some("ProgressDeadlineExceeded") {
            return RolloutState::Failed(c.message.clone().unwrap_or_else(|| "progress deadline exceeded".into()));
        }
    }
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or_default();
    let total = status.replicas.unwrap_or_default();
    let available = status.available_replicas.unwrap_or_default();
    if updated < desired {
        RolloutState::Progressing(format!("{updated} of {desired} replicas updated"))
    } else if total > updated {
        RolloutState::Progressing(format!("{} old replicas pending termination", total - updated))
    } else if available < updated {
        RolloutState::Progressing(format!("{available} of {updated} updated replicas available"))
    } else {
        RolloutState::Done
    }
}

/// `k=v,k=v` of the Deployment's matchLabels.
pub fn selector(d: &Deployment) -> Option<String> {
    let labels = d.spec.as_ref()?.selector.match_labels.as_ref()?;
    (!labels.is_empty()).then(|| labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

fn request_of(pod: &Pod) -> Option<&str> {
    pod.metadata.annotations.as_ref()?.get(CLEANUP_REQUEST_ANNOTATION).map(String::as_str)
}

/// Pods that predate this request or are terminating: while any remain, the old caches (for
/// emptyDir, the disk to be freed) still exist.
pub fn old_pods_remaining(pods: &[Pod], request: &str) -> usize {
    pods.iter().filter(|p| request_of(p) != Some(request) || p.metadata.deletion_timestamp.is_some()).count()
}

/// What the new pods' `cache-cleanup` init containers wrote as termination messages. A message
/// that does not parse becomes a `failed` entry carrying the text, so it is never lost.
pub fn replica_reports(pods: &[Pod], request: &str) -> Vec<ReplicaCleanup> {
    pods.iter()
        .filter(|p| request_of(p) == Some(request))
        .filter_map(|p| {
            let status = p.status.as_ref()?.init_container_statuses.as_ref()?;
            let s = status.iter().find(|s| s.name == CLEANUP_INIT_CONTAINER)?;
            // A restarted pod's first run is in lastState.
            let terminated = s
                .state
                .as_ref()
                .and_then(|st| st.terminated.as_ref())
                .or_else(|| s.last_state.as_ref().and_then(|st| st.terminated.as_ref()))?;
            let message = terminated.message.clone().unwrap_or_default();
            Some(serde_json::from_str(message.trim()).unwrap_or_else(|e| ReplicaCleanup {
                request: request.into(),
                action: "failed".into(),
                bytes_before: None,
                bytes_after: None,
                seconds: 0,
                error: Some(format!("unreadable report ({e}): {}", message.chars().take(200).collect::<String>())),
            }))
        })
        .collect()
}

/// How a Deployment's rollout cleans, given the storage kind and its strategy.
pub fn method_for(storage: &str, d: &Deployment) -> String {
    let recreate = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        .is_some_and(|t| t == "Recreate");
    match storage {
        "emptyDir" => "rollingReplace",
        _ if recreate => "recreate",
        _ => "sharedStorage",
    }
    .into()
}

/// One Deployment's result from its new replicas' reports.
///
/// Bytes count the replicas that cleaned (`garbageCollected`, `purged`, `empty`); on shared
/// storage the others found the marker and report `alreadyDone`. For emptyDir the cleaned old
/// caches were never measured (`bytesBefore` is `None`) and `bytesAfter` is what the new replicas
/// hold. Missing reports or any `failed` replica make it an error.
pub fn summarize(deployment: &str, method: &str, storage: &str, replicas: Vec<ReplicaCleanup>) -> UpstreamCleanup {
    let acting: Vec<&ReplicaCleanup> =
        replicas.iter().filter(|r| matches!(r.action.as_str(), "garbageCollected" | "purged" | "empty")).collect();
    let sum = |f: fn(&ReplicaCleanup) -> Option<u64>| -> Option<u64> {
        let values: Vec<u64> = acting.iter().filter_map(|r| f(r)).collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    let bytes_before = if storage == "emptyDir" { None } else { sum(|r| r.bytes_before) };
    let bytes_after = sum(|r| r.bytes_after);
    let errors: Vec<String> = replicas
        .iter()
        .filter_map(|r| r.error.clone().or_else(|| (r.action == "failed").then(|| "failed".into())))
        .collect();
    let error = if replicas.is_empty() {
        Some("no replica reported a cleanup (is the cache-cleanup init container in the pod template?)".into())
    } else if !errors.is_empty() {
        Some(errors.join("; "))
    } else if acting.is_empty() {
        Some("no replica cleaned: every report said the request was already done or absent".into())
    } else {
        None
    };
    UpstreamCleanup { deployment: deployment.into(), method: method.into(), bytes_before, bytes_after, replicas, error }
}

/// The whole run's report from its upstreams' results.
pub fn report(
    run: String,
    policy: &str,
    storage: &str,
    started_at: String,
    finished_at: String,
    duration_seconds: f64,
    upstreams: Vec<UpstreamCleanup>,
) -> CleanupReport {
    let failed: Vec<&UpstreamCleanup> = upstreams.iter().filter(|u| u.error.is_some()).collect();
    let total = |f: fn(&UpstreamCleanup) -> Option<u64>| -> Option<u64> {
        let values: Vec<u64> = upstreams.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    let (bytes_before, bytes_after) = (total(|u| u.bytes_before), total(|u| u.bytes_after));
    let outcome = if failed.is_empty() { CleanupOutcome::Succeeded } else { CleanupOutcome::Failed };
    let freed = match (bytes_before, bytes_after) {
        (Some(b), Some(a)) => format!(", {} -> {} bytes", b, a),
        _ => String::new(),
    };
    let message = if failed.is_empty() {
        format!("{policy} of {} proxies ({storage}) succeeded{freed}", upstreams.len())
    } else {
        let why: Vec<String> =
            failed.iter().map(|u| format!("{}: {}", u.deployment, u.error.as_deref().unwrap_or_default())).collect();
        format!("{policy} failed for {} of {} proxies: {}", failed.len(), upstreams.len(), why.join("; "))
    };
    CleanupReport {
        version: CLEANUP_REPORT_VERSION,
        run,
        policy: policy.into(),
        storage: storage.into(),
        outcome,
        started_at,
        finished_at,
        duration_seconds,
        bytes_before,
        bytes_after,
        message,
        upstreams,
        truncated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use std::collections::BTreeMap;

    fn deployment(replicas: i32, observed: i64, updated: i32, total: i32, available: i32) -> Deployment {
        Deployment {
            spec: Some(DeploymentSpec { replicas: Some(replicas), ..Default::default() }),
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                updated_replicas: Some(updated),
                replicas: Some(total),
                available_replicas: Some(available),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rollout_is_done_only_when_observed_updated_available_and_no_old_replica_is_left() {
        assert!(matches!(rollout_state(&deployment(2, 4, 2, 2, 2), 5), RolloutState::Progressing(_)));
        assert!(matches!(rollout_state(&deployment(2, 5, 1, 3, 2), 5), RolloutState::Progressing(_)));
        assert!(matches!(rollout_state(&deployment(2, 5, 2, 3, 2), 5), RolloutState::Progressing(_)));
        assert!(matches!(rollout_state(&deployment(2, 5, 2, 2, 1), 5), RolloutState::Progressing(_)));
        assert_eq!(rollout_state(&deployment(2, 5, 2, 2, 2), 5), RolloutState::Done);
        let mut stuck = deployment(2, 5, 1, 3, 2);
        stuck.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet has timed out progressing".into()),
            ..Default::default()
        }]);
        assert!(matches!(rollout_state(&stuck, 5), RolloutState::Failed(m) if m.contains("timed out")));
    }

    fn pod(request: Option<&str>, deleting: bool, message: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: request.map(|r| BTreeMap::from([(CLEANUP_REQUEST_ANNOTATION.to_string(), r.to_string())])),
                deletion_timestamp: deleting.then(|| Time(k8s_openapi::jiff::Timestamp::now())),
                ..Default::default()
            },
            status: Some(PodStatus {
                init_container_statuses: message.map(|m| {
                    vec![ContainerStatus {
                        name: CLEANUP_INIT_CONTAINER.into(),
                        state: Some(ContainerState {
                            terminated: Some(ContainerStateTerminated {
                                message: Some(m.into()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const REQ: &str = "garbageCollect/20261122T030000Z";

    #[test]
    fn old_pods_are_those_without_this_request_or_terminating() {
        let pods = vec![pod(Some(REQ), false, None), pod(None, false, None), pod(Some("purge/x"), false, None)];
        assert_eq!(old_pods_remaining(&pods, REQ), 2);
        assert_eq!(old_pods_remaining(&[pod(Some(REQ), true, None)], REQ), 1);
        assert_eq!(old_pods_remaining(&[pod(Some(REQ), false, None)], REQ), 0);
    }

    #[test]
    fn replica_reports_parse_the_init_container_messages_and_keep_bad_ones_as_failures() {
        let good = format!(
            r#"{{"request":"{REQ}","action":"garbageCollected","bytesBefore":4096,"bytesAfter":1024,"seconds":2,"error":null}}"#
        );
        let pods = vec![
            pod(Some(REQ), false, Some(&good)),
            pod(Some(REQ), false, Some("panic: oops")),
            pod(None, false, Some(&good)),
        ];
        let reports = replica_reports(&pods, REQ);
        assert_eq!(reports.len(), 2, "only pods of this request");
        assert_eq!(reports[0].action, "garbageCollected");
        assert_eq!(reports[0].bytes_before, Some(4096));
        assert_eq!(reports[1].action, "failed");
        assert!(reports[1].error.as_deref().unwrap().contains("panic: oops"));
    }

    fn replica(action: &str, before: Option<u64>, after: Option<u64>) -> ReplicaCleanup {
        ReplicaCleanup {
            request: REQ.into(),
            action: action.into(),
            bytes_before: before,
            bytes_after: after,
            seconds: 1,
            error: None,
        }
    }

    #[test]
    fn summaries_count_only_replicas_that_cleaned_and_never_claim_unmeasured_bytes() {
        let shared = summarize(
            "d",
            "sharedStorage",
            "persistentVolumeClaim",
            vec![replica("garbageCollected", Some(9000), Some(4000)), replica("alreadyDone", Some(4000), Some(4000))],
        );
        assert_eq!((shared.bytes_before, shared.bytes_after, shared.error), (Some(9000), Some(4000), None));
        let empty_dir = summarize(
            "d",
            "rollingReplace",
            "emptyDir",
            vec![replica("empty", Some(0), Some(0)), replica("empty", Some(0), Some(0))],
        );
        assert_eq!((empty_dir.bytes_before, empty_dir.bytes_after), (None, Some(0)));
        assert!(summarize("d", "recreate", "persistentVolumeClaim", vec![]).error.unwrap().contains("no replica"));
        let mut failed = replica("failed", Some(1), Some(1));
        failed.error = Some("garbage-collect: boom".into());
        assert!(summarize("d", "recreate", "persistentVolumeClaim", vec![failed]).error.unwrap().contains("boom"));
    }

    #[test]
    fn the_report_fails_if_any_upstream_failed_and_fits_the_termination_message_limit() {
        let ok =
            summarize("a", "recreate", "persistentVolumeClaim", vec![replica("garbageCollected", Some(10), Some(4))]);
        let bad = summarize("b", "recreate", "persistentVolumeClaim", vec![]);
        let r = report(
            "run".into(),
            "garbageCollect",
            "persistentVolumeClaim",
            "t0".into(),
            "t1".into(),
            1.5,
            vec![ok.clone(), bad],
        );
        assert_eq!(r.outcome, CleanupOutcome::Failed);
        assert!(r.message.contains("b: no replica"), "{}", r.message);
        let r = report(
            "run".into(),
            "garbageCollect",
            "persistentVolumeClaim",
            "t0".into(),
            "t1".into(),
            1.5,
            vec![ok.clone()],
        );
        assert_eq!((r.outcome, r.bytes_before, r.bytes_after), (CleanupOutcome::Succeeded, Some(10), Some(4)));
        let back = CleanupReport::from_termination_message(&r.to_termination_message()).unwrap();
        assert_eq!(back, r);

        let many: Vec<UpstreamCleanup> = (0..128)
            .map(|i| UpstreamCleanup {
                deployment: format!("mirror-with-a-long-name-proxy-upstream-{i}"),
                ..ok.clone()
            })
            .collect();
        let big = report("run".into(), "garbageCollect", "persistentVolumeClaim", "t0".into(), "t1".into(), 1.5, many);
        let msg = big.to_termination_message();
        assert!(msg.len() <= crate::build::cleanup::TERMINATION_MESSAGE_LIMIT, "{}", msg.len());
        let back = CleanupReport::from_termination_message(&msg).unwrap();
        assert!(back.truncated && back.upstreams.is_empty());
        assert_eq!(back.bytes_before, Some(1280), "totals survive truncation");
    }

    #[test]
    fn the_patch_sets_only_the_pod_template_annotation() {
        assert_eq!(
            cleanup_patch(REQ),
            json!({"spec": {"template": {"metadata": {"annotations": {"mirrorfleet.io/cleanup-request": REQ}}}}})
        );
    }
}
