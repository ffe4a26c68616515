//! `mirrorfleet cleanup`: the cache cleanup Job (run by the mirror's CronJob).
//!
//! The design (why a rolling replacement, what each storage kind frees, and the
//! [`CleanupReport`] the controller reads) is documented in [`crate::build::cleanup`]. This
//! module is the Job's side: roll each proxy Deployment in turn with a cleanup request, wait
//! until its old replicas are gone, collect what the new replicas' `cache-cleanup` init
//! containers reported, and write the report to the termination log.
//!
//! The decisions are pure functions ([`rollout`]) tested without a cluster; the loop in
//! [`run`] only reads and patches through the API server. What the tests cannot show without a
//! cluster: the Deployment controller's rollout itself, kube-proxy's endpoint propagation (the
//! preStop pause covers it), and the kubelet deleting an emptyDir with its pod.

pub mod local;
pub mod rollout;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::build::cleanup::{
    CleanupOutcome, CleanupReport, UpstreamCleanup, CLEANUP_REPORT_VERSION, TERMINATION_MESSAGE_PATH,
};
use rollout::{cleanup_patch, method_for, old_pods_remaining, replica_reports, rollout_state, summarize, RolloutState};

/// Field manager of the Job's patches (distinct from the controller's, so server-side apply
/// never takes the cleanup annotation away).
pub const FIELD_MANAGER: &str = "mirrorfleet-cleanup";

#[derive(clap::Args, Debug, Clone)]
pub struct CleanupArgs {
    /// Namespace of the RegistryMirror and its proxies.
    #[arg(long, env = "MIRRORFLEET_NAMESPACE")]
    pub namespace: String,
    /// Name of the RegistryMirror (for the Event and the report).
    #[arg(long)]
    pub mirror: String,
    /// `garbageCollect` (what the cache no longer references) or `purge` (everything).
    #[arg(long, value_parser = ["garbageCollect", "purge"])]
    pub policy: String,
    /// Storage kind of the proxies: emptyDir, persistentVolumeClaim or s3.
    #[arg(long, default_value = "emptyDir", value_parser = ["emptyDir", "persistentVolumeClaim", "s3"])]
    pub storage: String,
    /// A proxy Deployment to clean; repeat for each (cleaned one after another, in this order).
    #[arg(long = "deployment", required = true)]
    pub deployments: Vec<String>,
    /// Where the report goes (the container's terminationMessagePath).
    #[arg(long, default_value = TERMINATION_MESSAGE_PATH)]
    pub report_file: PathBuf,
    /// Give up on one Deployment's rollout after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub rollout_timeout_seconds: u64,
}

/// Entry point of the subcommand: runs the cleanup, writes the report, exits 0 only on success.
pub fn main(args: CleanupArgs) -> ExitCode {
    // Pod logs are files, not terminals: no colour escapes in them.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_target(false).init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(async {
        match crate::client::infer().await {
            Ok(client) => run(client, &args).await,
            Err(e) => failed_before_start(&args, format!("no Kubernetes client: {e:#}")),
        }
    });
    let message = report.to_termination_message();
    println!("{message}");
    if let Err(e) = std::fs::write(&args.report_file, &message) {
        eprintln!("error: writing the report to {}: {e}", args.report_file.display());
    }
    match report.outcome {
        CleanupOutcome::Succeeded => ExitCode::SUCCESS,
        CleanupOutcome::Failed => ExitCode::FAILURE,
    }
}

/// The run id: the start time in UTC, e.g. `20261122T030000Z`.
pub fn run_id(at: Timestamp) -> String {
    at.strftime("%Y%m%dT%H%M%SZ").to_string()
}

fn failed_before_start(args: &CleanupArgs, message: String) -> CleanupReport {
    let now = Timestamp::now();
    CleanupReport {
        version: CLEANUP_REPORT_VERSION,
        run: run_id(now),
        policy: args.policy.clone(),
        storage: args.storage.clone(),
        outcome: CleanupOutcome::Failed,
        started_at: now.to_string(),
        finished_at: now.to_string(),
        duration_seconds: 0.0,
        bytes_before: None,
        bytes_after: None,
        message,
        upstreams: Vec::new(),
        truncated: false,
    }
}

/// Cleans every Deployment in turn and returns the report (never fails: failures are in it).
pub async fn run(client: Client, args: &CleanupArgs) -> CleanupReport {
    if args.storage == "s3" {
        let report = failed_before_start(
            args,
            "cleanup of s3 storage is not implemented: the operator image has no S3 client and \
             `registry garbage-collect` is unsafe for a pull-through cache; use a bucket lifecycle rule"
                .into(),
        );
        record_event(&client, args, &report).await;
        return report;
    }
    let started = Timestamp::now();
    let clock = Instant::now();
    let run = run_id(started);
    let request = format!("{}/{run}", args.policy);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &args.namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &args.namespace);
    let timeout = Duration::from_secs(args.rollout_timeout_seconds);

    let mut upstreams = Vec::new();
    for name in &args.deployments {
        tracing::info!(deployment = %name, %request, "cleaning");
        let result = clean_deployment(&deployments, &pods, name, &request, &args.storage, timeout).await;
        let entry = result.unwrap_or_else(|error| {
            tracing::warn!(deployment = %name, %error, "cleanup failed");
            UpstreamCleanup {
                deployment: name.clone(),
                method: String::new(),
                bytes_before: None,
                bytes_after: None,
                replicas: Vec::new(),
                error: Some(error),
            }
        });
        upstreams.push(entry);
    }
    let report = rollout::report(
        run,
        &args.policy,
        &args.storage,
        started.to_string(),
        Timestamp::now().to_string(),
        clock.elapsed().as_secs_f64(),
        upstreams,
    );
    record_event(&client, args, &report).await;
    report
}

async fn clean_deployment(
    deployments: &Api<Deployment>,
    pods: &Api<Pod>,
    name: &str,
    request: &str,
    storage: &str,
    timeout: Duration,
) -> Result<UpstreamCleanup, String> {
    let current = deployments.get(name).await.map_err(|e| format!("reading Deployment {name}: {e}"))?;
    let method = method_for(storage, &current);
    let selector = rollout::selector(&current).ok_or_else(|| format!("Deployment {name} has no matchLabels"))?;
    let patched = deployments
        .patch(
            name,
            &PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
            &Patch::Merge(cleanup_patch(request)),
        )
        .await
        .map_err(|e| format!("requesting the cleanup on Deployment {name}: {e}"))?;
    let generation = patched.metadata.generation.unwrap_or_default();

    let deadline = Instant::now() + timeout;
    loop {
        let d = deployments.get(name).await.map_err(|e| format!("reading Deployment {name}: {e}"))?;
        match rollout_state(&d, generation) {
            RolloutState::Done => break,
            RolloutState::Failed(why) => return Err(format!("Deployment {name} did not roll: {why}")),
            RolloutState::Progressing(why) if Instant::now() >= deadline => {
                return Err(format!("Deployment {name} did not roll within {timeout:?}: {why}"))
            }
            RolloutState::Progressing(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
    // The rollout is done when the new replicas are available; the old ones (and with them an
    // emptyDir cache) are gone only after their drain. Wait for that too, so "freed" is true.
    let list = ListParams::default().labels(&selector);
    let current_pods = loop {
        let list = pods.list(&list).await.map_err(|e| format!("listing the pods of {name}: {e}"))?;
        if old_pods_remaining(&list.items, request) == 0 {
            break list.items;
        }
        if Instant::now() >= deadline {
            return Err(format!("old replicas of {name} still running after {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    Ok(summarize(name, &method, storage, replica_reports(&current_pods, request)))
}

/// Records the result on the RegistryMirror as an Event (best effort: the report is the record).
async fn record_event(client: &Client, args: &CleanupArgs, report: &CleanupReport) {
    let (reason, type_) = match report.outcome {
        CleanupOutcome::Succeeded => ("CleanupSucceeded", "Normal"),
        CleanupOutcome::Failed => ("CleanupFailed", "Warning"),
    };
    let now = Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-cleanup-", args.mirror)),
            namespace: Some(args.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("mirrorfleet.io/v1alpha1".into()),
            kind: Some("RegistryMirror".into()),
            name: Some(args.mirror.clone()),
            namespace: Some(args.namespace.clone()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(report.message.chars().take(1024).collect()),
        type_: Some(type_.into()),
        source: Some(EventSource { component: Some(FIELD_MANAGER.into()), host: None }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        action: Some("Cleanup".into()),
        reporting_component: Some(FIELD_MANAGER.into()),
        reporting_instance: Some(std::env::var("HOSTNAME").unwrap_or_else(|_| FIELD_MANAGER.into())),
        count: Some(1),
        ..Default::default()
    };
    let events: Api<Event> = Api::namespaced(client.clone(), &args.namespace);
    if let Err(e) = events.create(&PostParams::default(), &event).await {
        tracing::warn!(error = %e, "could not record the cleanup Event");
    }
}
