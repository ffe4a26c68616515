//! Cache cleanup: the CronJob, the proxies' cleanup init container, and the report format.
//!
//! # How a cleanup runs
//!
//! The cache lives inside the proxy pods (emptyDir), on their claim (persistentVolumeClaim) or in
//! a bucket (s3); the cleanup Job can reach none of them directly. So the Job
//! (`mirrorfleet cleanup`, run by the CronJob from the operator image) rolls the proxy
//! Deployments one after the other, and each *new* replica cleans before it serves:
//!
//! 1. the Job patches the pod template annotation [`CLEANUP_REQUEST_ANNOTATION`] of one proxy
//!    Deployment to `<policy>/<run id>` (the controller's server-side apply never owns that key,
//!    so it survives reconciles, like `kubectl rollout restart`'s);
//! 2. the Deployment rolls with its own strategy: `maxSurge 1, maxUnavailable 0` for emptyDir,
//!    RWX claims and s3, so old replicas serve until each new one is ready; `Recreate` for a
//!    ReadWriteOnce claim (one replica: a short gap, the same as any config change of it);
//! 3. every new pod's init container `cache-cleanup` (the operator image, `mirrorfleet
//!    cleanup-replica`, see `crate::cleanup::local`) runs before the registry starts:
//!    `garbageCollect` deletes what no tag of the cache reaches any more, `purge` empties the
//!    storage; it writes a [`ReplicaCleanup`] as its termination message and always exits 0, so
//!    a failed cleanup never keeps a proxy down;
//! 4. the Job waits for the rollout, reads the new pods' [`ReplicaCleanup`]s, and moves on.
//!
//! What `garbageCollect` frees: manifests no tag reaches any more (an old `latest` after the tag
//! moved upstream) and every blob only they referenced, following image indexes to their
//! platform manifests. It is not `registry garbage-collect`: without `--delete-untagged` that
//! frees nearly nothing in a pull-through cache, and with it Distribution 2.8 deletes the
//! platform manifests of every cached multi-arch image (untagged; only their index is) and their
//! layers (`tests/datapath_cleanup.rs` shows both). The registry's own TTL expiry (a fixed 7 days
//! in 2.8, `proxy.ttl` in 3.x) deletes expired blobs itself.
//!
//! What each storage kind frees:
//! * emptyDir: the old pods' volumes, deleted with them (both policies; a new pod starts
//!   empty, so `garbageCollect` on emptyDir is in effect a purge, one replica at a time);
//! * persistentVolumeClaim (ReadWriteOnce, one replica, `Recreate`): the registry is stopped
//!   while the init container collects, which is what Distribution's GC requires;
//! * persistentVolumeClaim (ReadWriteMany): the first new replica collects the shared storage
//!   while older replicas still serve from it (the others find the request done). A proxy cache
//!   tolerates this: only unreachable content goes, nothing younger than ten minutes is touched
//!   (a pull may be writing it), and a blob missing from the cache is fetched upstream again;
//! * s3: not cleaned. The operator image has no S3 client and `registry garbage-collect` is
//!   unsafe here (see above); the Job refuses with a message saying so. A bucket lifecycle rule
//!   is the way for now (untested: the tests have no S3 server).
//!
//! Proxies also stop gracefully (`http.draintimeout` plus a preStop pause, see `proxy.rs`), so a
//! layer download in flight on a replacement's predecessor completes.
//!
//! # The report the controller reads (`status.lastCleanup`)
//!
//! The Job's container writes one [`CleanupReport`] as compact JSON to its termination message
//! (`/dev/termination-log`, policy `FallbackToLogsOnError`). The controller reads it from the
//! newest finished Job of the CronJob (label `app.kubernetes.io/component=cleanup`):
//! `pod.status.containerStatuses[name="cleanup"].state.terminated.message`, parsed with
//! [`CleanupReport::from_termination_message`]. If that fails (the Job crashed before writing a
//! report, so the message is the log tail) the result is `Failed` with the text as message. The
//! Job also records an Event on the RegistryMirror (reason `CleanupSucceeded`/`CleanupFailed`).
//! Kubernetes caps termination messages at 4096 bytes: [`CleanupReport::to_termination_message`]
//! drops per-upstream details (`truncated: true`) before the totals.

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, PodTemplateSpec, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use super::meta::{self, names, Component};
use super::proxy::{PROXY_REQUESTS, STORAGE_DIR};
use super::{pod, Settings};
use crate::api::{CleanupSpec, RegistryMirror, StorageSpec};

/// Pod template annotation of a proxy Deployment: `<policy>/<run id>` of the cleanup its new
/// pods perform. Set only by the cleanup Job; never by the builders.
pub const CLEANUP_REQUEST_ANNOTATION: &str = "mirrorfleet.io/cleanup-request";
/// Name of the proxies' init container that cleans the cache.
pub const CLEANUP_INIT_CONTAINER: &str = "cache-cleanup";
/// Requests of the cleanup Job's container without `cleanup.resources`.
pub const CLEANUP_REQUESTS: pod::Requests = pod::Requests { cpu: "50m", memory: "64Mi" };
/// Name of the cleanup Job's container (whose termination message is the [`CleanupReport`]).
pub const CLEANUP_CONTAINER: &str = "cleanup";
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// Kubernetes truncates termination messages beyond this many bytes.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// The storage kind, as the Job's `--storage` flag spells it.
pub fn storage_kind(storage: &StorageSpec) -> &'static str {
    if storage.s3.is_some() {
        "s3"
    } else if storage.persistent_volume_claim.is_some() {
        "persistentVolumeClaim"
    } else {
        "emptyDir"
    }
}

/// What one new proxy replica's `cache-cleanup` init container reports (its termination
/// message, written by `mirrorfleet cleanup-replica`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCleanup {
    /// `<policy>/<run id>`; empty when the pod started without a request.
    pub request: String,
    /// `none`, `alreadyDone`, `empty`, `garbageCollected`, `purged` or `failed`.
    pub action: String,
    /// Disk usage (allocated blocks) of the replica's storage before and after, in bytes;
    /// `None` when there was nothing to measure.
    pub bytes_before: Option<u64>,
    pub bytes_after: Option<u64>,
    pub seconds: u64,
    pub error: Option<String>,
}

/// The outcome of a whole cleanup run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CleanupOutcome {
    /// Every proxy Deployment rolled and every new replica cleaned.
    Succeeded,
    /// At least one Deployment did not roll in time or a replica reported an error.
    Failed,
}

/// One proxy Deployment's part of a run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamCleanup {
    pub deployment: String,
    /// `rollingReplace` (emptyDir: old replicas' volumes go with them), `recreate` (a
    /// ReadWriteOnce claim), or `sharedStorage` (RWX claim, s3: the first new replica cleans).
    pub method: String,
    pub bytes_before: Option<u64>,
    pub bytes_after: Option<u64>,
    pub replicas: Vec<ReplicaCleanup>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The result of `mirrorfleet cleanup`: the Job container's termination message, the source of
/// `status.lastCleanup`. Field names are the JSON keys (camelCase). `version` changes only with
/// an incompatible change of this format.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CleanupReport {
    pub version: u32,
    /// The run id (UTC, `20261122T030000Z`), also in every replica's request.
    pub run: String,
    /// `garbageCollect` or `purge`.
    pub policy: String,
    /// `emptyDir`, `persistentVolumeClaim` or `s3`.
    pub storage: String,
    pub outcome: CleanupOutcome,
    /// RFC 3339 start and end.
    pub started_at: String,
    pub finished_at: String,
    pub duration_seconds: f64,
    /// Sums over the upstreams whose storage could be measured. For emptyDir `bytesBefore` is
    /// `None`: the old cache is gone with its pod before anyone could measure it (its disk is
    /// freed by the kubelet). For s3 both are `None`.
    pub bytes_before: Option<u64>,
    pub bytes_after: Option<u64>,
    /// One line for humans and Events.
    pub message: String,
    /// Per-upstream details; dropped (and `truncated` set) when the message would exceed the
    /// termination-message limit.
    #[serde(default)]
    pub upstreams: Vec<UpstreamCleanup>,
    #[serde(default)]
    pub truncated: bool,
}

/// The report format version written by this build.
pub const CLEANUP_REPORT_VERSION: u32 = 1;

impl CleanupReport {
    /// Compact JSON that fits the termination-message limit (details dropped if needed).
    pub fn to_termination_message(&self) -> String {
        let full = serde_json::to_string(self).expect("report serializes");
        if full.len() <= TERMINATION_MESSAGE_LIMIT {
            return full;
        }
        let mut short = self.clone();
        short.upstreams.clear();
        short.truncated = true;
        short.message = short.message.chars().take(1024).collect();
        serde_json::to_string(&short).expect("report serializes")
    }

    /// Parses a termination message written by [`CleanupReport::to_termination_message`].
    pub fn from_termination_message(message: &str) -> Result<CleanupReport, serde_json::Error> {
        serde_json::from_str(message.trim())
    }
}

/// The `cache-cleanup` init container of a proxy Deployment, for filesystem storage (emptyDir,
/// persistentVolumeClaim) when `spec.cleanup` is set: the operator image running `mirrorfleet
/// cleanup-replica` on the cache volume, with the request from the pod template annotation.
pub fn cleanup_init_container(mirror: &RegistryMirror, settings: &Settings, cache_mount: &VolumeMount) -> Container {
    let (_, tmp_mount) = pod::tmp_volume();
    Container {
        name: CLEANUP_INIT_CONTAINER.into(),
        image: Some(settings.operator_image.clone()),
        args: Some(vec!["cleanup-replica".into(), "--storage-root".into(), STORAGE_DIR.into()]),
        env: Some(vec![EnvVar {
            name: "MIRRORFLEET_CLEANUP_REQUEST".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{CLEANUP_REQUEST_ANNOTATION}']"),
                    api_version: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        // In the proxy's place, before it starts: the proxy's resources.
        resources: Some(pod::resources(mirror.spec.proxy.resources.as_ref(), PROXY_REQUESTS)),
        security_context: Some(pod::restricted_container_security()),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("File".into()),
        volume_mounts: Some(vec![cache_mount.clone(), tmp_mount]),
        ..Default::default()
    }
}

pub fn cleanup_cron_job(mirror: &RegistryMirror, cleanup: &CleanupSpec, settings: &Settings) -> CronJob {
    let (tmp, tmp_mount) = pod::tmp_volume();
    let mut args = vec![
        "cleanup".to_string(),
        "--namespace".into(),
        mirror.namespace().unwrap_or_default(),
        "--mirror".into(),
        mirror.name_any(),
        "--policy".into(),
        cleanup.policy.as_str().into(),
        // The Role allows only named Deployments (no list), so the Job is told which.
        "--storage".into(),
        storage_kind(&mirror.spec.proxy.storage).into(),
    ];
    for upstream in &mirror.spec.upstreams {
        args.push("--deployment".into());
        args.push(names::proxy(mirror, &upstream.name));
    }
    let container = Container {
        name: CLEANUP_CONTAINER.into(),
        image: Some(settings.operator_image.clone()),
        args: Some(args),
        resources: Some(pod::resources(cleanup.resources.as_ref(), CLEANUP_REQUESTS)),
        security_context: Some(pod::restricted_container_security()),
        // The CleanupReport the controller reads; a crash leaves the log tail instead.
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
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
                    // A retry would roll every proxy again; the next schedule is the retry.
                    backoff_limit: Some(0),
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
