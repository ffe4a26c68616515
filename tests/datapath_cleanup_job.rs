//! The cleanup Job (`mirrorfleet cleanup`) at the request level, against the in-process API
//! double of the controller tests (`controller/fake_api.rs`), with the test playing the
//! Deployment controller and kubelet: when a proxy Deployment's pod template gets a cleanup
//! request, its old pods go and new ones come up whose `cache-cleanup` init container
//! reported, then the Deployment's status says the rollout is done.
//!
//! Shown: the rendered CronJob's args parse with the real CLI; the Job patches one Deployment
//! at a time (a JSON merge patch of the pod template annotation only, under its own field
//! manager) and waits for each rollout before the next; the report (termination message and
//! file) adds up the replicas' reports; a Deployment that never rolls fails the run with its
//! name in the message while the others still count; s3 is refused without touching anything;
//! the outcome is recorded as an Event on the RegistryMirror.
//!
//! Not shown (needs a cluster, `make e2e`): a real Deployment controller's rollout and a real
//! kubelet running the init container in the operator image.

// Shared with tests/controller.rs, which uses more of it.
#[allow(dead_code)]
#[path = "controller/fake_api.rs"]
mod fake_api;

use std::time::Duration;

use clap::Parser;
use fake_api::FakeApi;
use mirrorfleet::build::cleanup::{
    CleanupOutcome, CleanupReport, ReplicaCleanup, CLEANUP_INIT_CONTAINER, CLEANUP_REQUEST_ANNOTATION,
};
use mirrorfleet::cleanup::CleanupArgs;
use mirrorfleet::render::{render_str, RenderOptions, Rendered};
use serde_json::{json, Value};

const NS: &str = "mirrors";
const DEPLOYMENTS: &str = "apps/v1/deployments";
const PODS: &str = "/v1/pods";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    Cleanup(CleanupArgs),
}

fn render(storage: &str) -> Rendered {
    let yaml = format!(
        "apiVersion: mirrorfleet.io/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: dp, namespace: {NS}}}\nspec:\n  \
         upstreams:\n  - {{name: dockerhub, registry: docker.io, remoteURL: \"https://registry-1.docker.io\"}}\n  \
         - {{name: ghcr, registry: ghcr.io, remoteURL: \"https://ghcr.io\"}}\n  \
         proxy: {{replicas: 2, storage: {storage}}}\n  cleanup: {{schedule: \"0 3 * * 0\", policy: garbageCollect}}\n"
    );
    let opts = RenderOptions { namespace: NS.into(), ..RenderOptions::default() };
    render_str(&yaml, &opts).unwrap_or_else(|e| panic!("{e}")).remove(0)
}

/// The Job's args as the rendered CronJob gives them, parsed by the real CLI definition.
fn job_args(r: &Rendered, report_file: &std::path::Path, timeout_seconds: u64) -> CleanupArgs {
    let cron = &r.fleet.children.cron_jobs[0];
    let pod = cron.spec.as_ref().unwrap().job_template.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    assert_eq!(container.termination_message_path.as_deref(), Some("/dev/termination-log"));
    assert_eq!(container.termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));
    let mut argv = vec!["mirrorfleet".to_string()];
    argv.extend(container.args.clone().unwrap());
    argv.extend(["--report-file".into(), report_file.display().to_string()]);
    argv.extend(["--rollout-timeout-seconds".into(), timeout_seconds.to_string()]);
    match Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).command {
        Cmd::Cleanup(a) => a,
    }
}

/// Stores the rendered proxy Deployments, rolled out, each with two running pods.
fn seed(api: &FakeApi, r: &Rendered) {
    for d in &r.fleet.children.deployments {
        let mut d = serde_json::to_value(d).unwrap();
        d["status"] = json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2});
        let d = api.insert(DEPLOYMENTS, d);
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        for i in 0..2 {
            api.insert(PODS, pod(&d, &format!("{name}-old-{i}"), None));
        }
    }
}

fn pod(deployment: &Value, name: &str, report: Option<&ReplicaCleanup>) -> Value {
    let template = &deployment["spec"]["template"]["metadata"];
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": template["labels"], "annotations": template["annotations"]},
        "spec": {"containers": [{"name": "registry"}]}});
    if let Some(report) = report {
        pod["status"] = json!({"initContainerStatuses": [{"name": CLEANUP_INIT_CONTAINER, "ready": false,
            "restartCount": 0, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": 0, "message": serde_json::to_string(report).unwrap()}}}]});
    }
    pod
}

/// The Deployment controller and kubelet: rolls every Deployment in `rolls` whose template
/// changed, one poll at a time, until `stop`.
fn play_controllers(api: FakeApi, rolls: Vec<String>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        for name in &rolls {
            let d = api.get(DEPLOYMENTS, NS, name).unwrap();
            let generation = d["metadata"]["generation"].as_i64().unwrap();
            let observed = d["status"]["observedGeneration"].as_i64().unwrap();
            let Some(request) = d["spec"]["template"]["metadata"]["annotations"][CLEANUP_REQUEST_ANNOTATION].as_str()
            else {
                continue;
            };
            if observed >= generation {
                continue;
            }
            for i in 0..2 {
                api.remove(PODS, NS, &format!("{name}-old-{i}"));
                let report = ReplicaCleanup {
                    request: request.to_string(),
                    action: "empty".into(),
                    bytes_before: Some(4096),
                    bytes_after: Some(4096),
                    seconds: 0,
                    error: None,
                };
                api.insert(PODS, pod(&d, &format!("{name}-new-{i}"), Some(&report)));
            }
            api.edit(DEPLOYMENTS, NS, name, "kube-controller-manager", Some("status"), |d| {
                d["status"] = json!({"observedGeneration": generation, "replicas": 2, "updatedReplicas": 2,
                                     "availableReplicas": 2});
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_job(api: &FakeApi, args: &CleanupArgs, rolls: &[&str]) -> CleanupReport {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sim = {
        let (api, rolls, stop) = (api.clone(), rolls.iter().map(|s| s.to_string()).collect(), stop.clone());
        std::thread::spawn(move || play_controllers(api, rolls, stop))
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let report = runtime.block_on(async {
        let client = kube::Client::new(api.clone(), NS);
        mirrorfleet::cleanup::run(client, args).await
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sim.join().unwrap();
    report
}

fn patches(api: &FakeApi) -> Vec<fake_api::Recorded> {
    api.requests().into_iter().filter(|r| r.method == "PATCH").collect()
}

fn events(api: &FakeApi) -> Vec<Value> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
        .map(|r| r.body.unwrap())
        .collect()
}

#[test]
fn the_job_rolls_each_proxy_in_turn_and_reports_what_the_replicas_cleaned() {
    let api = FakeApi::new();
    let r = render("{emptyDir: {}}");
    seed(&api, &r);
    let tmp = tempfile::tempdir().unwrap();
    let report_file = tmp.path().join("termination-log");
    let args = job_args(&r, &report_file, 30);
    assert_eq!(args.deployments, ["dp-proxy-dockerhub", "dp-proxy-ghcr"]);
    assert_eq!((args.storage.as_str(), args.policy.as_str()), ("emptyDir", "garbageCollect"));

    let report = run_job(&api, &args, &["dp-proxy-dockerhub", "dp-proxy-ghcr"]);
    assert_eq!(report.outcome, CleanupOutcome::Succeeded, "{report:#?}");
    assert_eq!(report.upstreams.len(), 2);
    for (u, name) in report.upstreams.iter().zip(["dp-proxy-dockerhub", "dp-proxy-ghcr"]) {
        assert_eq!((u.deployment.as_str(), u.method.as_str(), u.replicas.len()), (name, "rollingReplace", 2));
        assert_eq!((u.bytes_before, u.bytes_after), (None, Some(8192)), "emptyDir: old caches were not measured");
    }
    assert_eq!((report.bytes_before, report.bytes_after), (None, Some(16384)));
    let request = format!("garbageCollect/{}", report.run);

    // One merge patch per Deployment, only the annotation, under the Job's field manager; the
    // second only after the first Deployment's rollout was seen complete.
    let all = api.requests();
    let patch_at: Vec<usize> = all.iter().enumerate().filter(|(_, r)| r.method == "PATCH").map(|(i, _)| i).collect();
    assert_eq!(patch_at.len(), 2, "{:#?}", patches(&api));
    for i in &patch_at {
        let p = &all[*i];
        assert_eq!(p.content_type.as_deref(), Some("application/merge-patch+json"));
        assert!(p.query.contains("fieldManager=mirrorfleet-cleanup"), "{}", p.query);
        assert_eq!(
            p.body.as_ref().unwrap(),
            &json!({"spec": {"template": {"metadata": {"annotations": {CLEANUP_REQUEST_ANNOTATION: request}}}}})
        );
    }
    assert!(
        all[patch_at[0]].path.ends_with("/dp-proxy-dockerhub") && all[patch_at[1]].path.ends_with("/dp-proxy-ghcr")
    );
    let pod_lists_between =
        all[patch_at[0]..patch_at[1]].iter().filter(|r| r.method == "GET" && r.path.ends_with("/pods")).count();
    assert!(pod_lists_between >= 1, "the first proxy's pods were checked before the second was touched");
    assert!(api.get(PODS, NS, "dp-proxy-ghcr-old-0").is_none() && api.get(PODS, NS, "dp-proxy-ghcr-new-0").is_some());

    // The report survives the termination-message round trip (`main` writes it), and an Event.
    let back = CleanupReport::from_termination_message(&report.to_termination_message()).unwrap();
    assert_eq!(back, report);
    let ev = events(&api);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["reason"], "CleanupSucceeded");
    assert_eq!(
        ev[0]["involvedObject"],
        json!({"apiVersion": "mirrorfleet.io/v1alpha1", "kind": "RegistryMirror", "name": "dp", "namespace": NS})
    );
}

#[test]
fn a_proxy_that_never_rolls_fails_the_run_with_its_name_and_the_others_still_count() {
    let api = FakeApi::new();
    let r = render("{emptyDir: {}}");
    seed(&api, &r);
    let tmp = tempfile::tempdir().unwrap();
    let args = job_args(&r, &tmp.path().join("log"), 3);
    let report = run_job(&api, &args, &["dp-proxy-dockerhub"]); // ghcr's rollout is stuck
    assert_eq!(report.outcome, CleanupOutcome::Failed);
    assert!(report.upstreams[0].error.is_none(), "{report:#?}");
    let stuck = report.upstreams[1].error.as_deref().unwrap();
    assert!(stuck.contains("dp-proxy-ghcr did not roll within"), "{stuck}");
    assert!(
        report.message.contains("1 of 2 proxies") && report.message.contains("dp-proxy-ghcr"),
        "{}",
        report.message
    );
    assert_eq!(events(&api)[0]["reason"], "CleanupFailed");
    assert_eq!(events(&api)[0]["type"], "Warning");
}

#[test]
fn s3_storage_is_refused_without_touching_the_proxies() {
    let api = FakeApi::new();
    let r = render("{s3: {bucket: cache, region: eu-west-1}}");
    seed(&api, &r);
    let pod_spec = r.fleet.children.deployments[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    // (The upstream sidecar is an init container too.)
    let init = pod_spec.init_containers.iter().flatten();
    assert!(init.clone().all(|c| c.name != "cache-cleanup"), "no cleanup init container on s3");
    let tmp = tempfile::tempdir().unwrap();
    let args = job_args(&r, &tmp.path().join("log"), 3);
    assert_eq!(args.storage, "s3");
    let report = run_job(&api, &args, &[]);
    assert_eq!(report.outcome, CleanupOutcome::Failed);
    assert!(report.message.contains("s3"), "{}", report.message);
    assert!(patches(&api).is_empty(), "nothing was rolled");
    assert_eq!(events(&api)[0]["reason"], "CleanupFailed");
}
