//! The cache cleanup CronJob. It runs `mirrorfleet cleanup` from the operator image, which works
//! through the API server on this mirror's proxies only (its Role is pinned to their names).

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use super::meta::{self, names, Component};
use super::{pod, Settings};
use crate::api::{CleanupSpec, RegistryMirror};

pub fn cleanup_cron_job(mirror: &RegistryMirror, cleanup: &CleanupSpec, settings: &Settings) -> CronJob {
    let (tmp, tmp_mount) = pod::tmp_volume();
    let container = Container {
        name: "cleanup".into(),
        image: Some(settings.operator_image.clone()),
        args: Some(vec![
            "cleanup".into(),
            "--namespace".into(),
            mirror.namespace().unwrap_or_default(),
            "--mirror".into(),
            mirror.name_any(),
            "--policy".into(),
            cleanup.policy.as_str().into(),
        ]),
        security_context: Some(pod::restricted_container_security()),
        volume_mounts: Some(vec![tmp_mount]),
        ..Default::default()
    };
    CronJob {
        metadata: meta::object_meta(mirror, names::cleanup(mirror), Component::Cleanup, None),
        spec: Some(CronJobSpec {
            schedule: cleanup.schedule.clone(),
            time_zone: cleanup.time_zone.clone(),
            suspend: Some(cleanup.suspend),
            // Two cleanups of one cache at once would fight over the same replicas.
            concurrency_policy: Some("Forbid".into()),
            starting_deadline_seconds: Some(3600),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(meta::labels(mirror, Component::Cleanup, None)),
                    ..Default::default()
                }),
                spec: Some(JobSpec {
                    backoff_limit: Some(2),
                    active_deadline_seconds: Some(3 * 3600),
                    ttl_seconds_after_finished: Some(7 * 24 * 3600),
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: Some(meta::labels(mirror, Component::Cleanup, None)),
                            ..Default::default()
                        }),
                        spec: Some(PodSpec {
                            service_account_name: Some(names::cleanup(mirror)),
                            restart_policy: Some("Never".into()),
                            security_context: Some(pod::restricted_pod_security()),
                            containers: vec![container],
                            volumes: Some(vec![tmp]),
                            ..Default::default()
                        }),
                    },
                    ..Default::default()
                }),
            },
        }),
        ..Default::default()
    }
}
