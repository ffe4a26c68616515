//! `mirrorfleet node-agent`: makes one node's container runtimes use one RegistryMirror's
//! mirrors, and says truthfully whether they do.
//!
//! The agent follows the desired node config ([`source`]), probes each mirror from the node
//! ([`probe`]), and after every change runs one pass ([`apply`]) that writes, withdraws or removes
//! only files it owns ([`files`]): containerd `hosts.toml` ([`containerd`]), and when enabled a
//! CRI-O/Podman drop-in ([`crio`]) and Docker's `daemon.json` ([`docker`]). Each pass ends with the
//! readiness status file, the applied-config Pod annotation and, when the verdict changes, a log
//! line and an Event naming the node ([`status`]).
//!
//! Lifecycle: SIGTERM leaves every file in place (a rollout replaces the agent; the node keeps
//! pulling through the mirror meanwhile). Files go away only when the config says `removing`
//! (the controller sets it while the mirror is deleted), or when the config stops listing a
//! registry; on start, files of this mirror the config no longer lists are removed too.

pub mod apply;
pub mod containerd;
pub mod crio;
pub mod docker;
pub mod files;
pub mod probe;
pub mod source;
pub mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::build::node::{node_config_checksum, NodeConfig, APPLIED_CONFIG_ANNOTATION, STATUS_DIR};
use probe::{Health, ProbeSettings, Prober};
use source::Desired;

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Name of the RegistryMirror this agent serves (its node config must name it).
    #[arg(long, env = "MIRRORFLEET_MIRROR")]
    pub mirror: String,
    /// The node-config ConfigMap to watch, in the Pod's namespace.
    #[arg(long, env = "MIRRORFLEET_CONFIG_MAP", required_unless_present = "from_dir")]
    pub config_map: Option<String>,
    /// Secret with the Authorization header (key `authorization`), when client auth is on.
    #[arg(long, env = "MIRRORFLEET_AUTH_SECRET")]
    pub auth_secret: Option<String>,
    /// Read `node-config.json` (and `authorization`) from this directory instead of the API.
    #[arg(long, env = "MIRRORFLEET_FROM_DIR", conflicts_with_all = ["config_map", "auth_secret"])]
    pub from_dir: Option<PathBuf>,
    /// Namespace of the agent's Pod (and of the ConfigMap and Secret).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// This node's name, for Events and logs.
    #[arg(long, env = "NODE_NAME", default_value = "unknown-node")]
    pub node_name: String,
    /// This node's address: `${NODE_IP}` in a peer endpoint (`nodeConfig.peers`).
    #[arg(long, env = "NODE_IP")]
    pub node_ip: Option<String>,
    /// The agent's Pod, which it annotates with the applied config's checksum.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Where the readiness status is written.
    #[arg(long, env = "MIRRORFLEET_STATUS_DIR", default_value = STATUS_DIR)]
    pub status_dir: PathBuf,
    /// containerd's config.toml as mounted in the agent (checked for `config_path`).
    #[arg(long, env = "MIRRORFLEET_CONTAINERD_CONFIG")]
    pub containerd_config: Option<PathBuf>,
    /// Mean time between probes of one mirror, in milliseconds (jittered by ±20 %).
    #[arg(long, env = "MIRRORFLEET_PROBE_INTERVAL_MS", default_value_t = 2000)]
    pub probe_interval_ms: u64,
    /// Cut-off of one probe, in milliseconds.
    #[arg(long, env = "MIRRORFLEET_PROBE_TIMEOUT_MS", default_value_t = 1500)]
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes before a mirror's entries are withdrawn.
    #[arg(long, env = "MIRRORFLEET_PROBE_FALL", default_value_t = 2)]
    pub probe_fall: u32,
    /// Consecutive good probes before a withdrawn mirror is restored.
    #[arg(long, env = "MIRRORFLEET_PROBE_RISE", default_value_t = 2)]
    pub probe_rise: u32,
    /// Re-check every file at least this often (someone may have deleted one), in seconds.
    #[arg(long, env = "MIRRORFLEET_RESYNC_SECONDS", default_value_t = 30)]
    pub resync_seconds: u64,
    /// Apply once (after the first probe of every mirror) and exit: 0 when applied.
    #[arg(long)]
    pub once: bool,
    /// Test hook: abort after a temp file is written and before it is renamed into place.
    #[arg(long, hide = true)]
    pub fault_abort_before_rename: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReadyArgs {
    #[arg(long, env = "MIRRORFLEET_STATUS_DIR", default_value = STATUS_DIR)]
    pub status_dir: PathBuf,
    /// A status older than this (seconds) is not ready: the agent is stuck.
    #[arg(long, default_value_t = 90)]
    pub max_age_seconds: u64,
}

/// `mirrorfleet node-agent-ready`: exit 0 only when the node is configured and its mirrors
/// reachable; otherwise print why (the kubelet shows it in the probe's Event).
pub fn ready_main(args: ReadyArgs) -> std::process::ExitCode {
    match status::check_ready(&args.status_dir, Duration::from_secs(args.max_age_seconds)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("{why}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `mirrorfleet node-agent`.
pub fn main(args: AgentArgs) -> std::process::ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,hyper=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Pod logs are files, not terminals: no colour escapes in them.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Reports to the API: the applied-config annotation and Events.
struct Reporter {
    client: Client,
    namespace: String,
    pod: Option<String>,
    node: String,
    annotated: Option<String>,
}

impl Reporter {
    async fn annotate(&mut self, checksum: &str) {
        if self.annotated.as_deref() == Some(checksum) {
            return;
        }
        let Some(pod) = &self.pod else {
            tracing::warn!("POD_NAME not set: cannot report the applied config on the Pod");
            self.annotated = Some(checksum.to_string());
            return;
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {APPLIED_CONFIG_ANNOTATION: checksum}}});
        match pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(pod, checksum, "reported the applied node config on the Pod");
                self.annotated = Some(checksum.to_string());
            }
            // Retried on the next pass (at the latest after the resync period).
            Err(e) => tracing::warn!(pod, error = %e, "annotating the Pod with the applied config"),
        }
    }

    async fn event(&self, regarding: ObjectReference, warning: bool, reason: &str, message: &str) {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let prefix = regarding.name.clone().unwrap_or_else(|| "mirrorfleet".into());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}.")),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            involved_object: regarding,
            reason: Some(reason.into()),
            // The API caps messages at 1 KiB.
            message: Some(message.chars().take(1000).collect()),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            source: Some(EventSource {
                component: Some("mirrorfleet-node-agent".into()),
                host: Some(self.node.clone()),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            reporting_component: Some("mirrorfleet.io/node-agent".into()),
            reporting_instance: Some(self.node.clone()),
            ..Default::default()
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            tracing::warn!(error = %e, reason, "publishing an Event");
        }
    }
}

/// Memory between passes: only changes are logged and published.
#[derive(Default)]
struct Last {
    problems: Option<Vec<String>>,
}

struct Agent {
    args: AgentArgs,
    prober: Prober,
    reporter: Option<Reporter>,
    last: Last,
}

async fn run(args: AgentArgs) -> anyhow::Result<std::process::ExitCode> {
    files::set_abort_before_rename(args.fault_abort_before_rename);
    let (tx, mut desired) = watch::channel(Desired::default());
    let reporter = match (&args.from_dir, &args.config_map) {
        (Some(dir), _) => {
            tokio::spawn(source::from_dir(dir.clone(), tx));
            None
        }
        (None, Some(cm)) => {
            let client = crate::client::infer().await.context("connecting to the Kubernetes API")?;
            let namespace =
                args.namespace.clone().context("POD_NAMESPACE (--namespace) is required with --config-map")?;
            tracing::info!(namespace, config_map = cm, auth_secret = ?args.auth_secret, "watching the node config");
            tokio::spawn(source::from_api(client.clone(), namespace.clone(), cm.clone(), args.auth_secret.clone(), tx));
            Some(Reporter {
                client,
                namespace,
                pod: args.pod_name.clone(),
                node: args.node_name.clone(),
                annotated: None,
            })
        }
        (None, None) => anyhow::bail!("either --config-map or --from-dir is required"),
    };
    let settings = ProbeSettings {
        interval: Duration::from_millis(args.probe_interval_ms.max(100)),
        timeout: Duration::from_millis(args.probe_timeout_ms.max(50)),
        fall: args.probe_fall.max(1),
        rise: args.probe_rise.max(1),
        ..ProbeSettings::default()
    };
    let (prober, mut health) = Prober::new(settings);
    let mut agent = Agent { args, prober, reporter, last: Last::default() };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut resync = tokio::time::interval(Duration::from_secs(agent.args.resync_seconds.max(1)));
    let once_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    tracing::info!(mirror = agent.args.mirror, node = agent.args.node_name, "node agent started");
    loop {
        tokio::select! {
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: leaving this node's files in place");
                return Ok(std::process::ExitCode::SUCCESS);
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted: leaving this node's files in place");
                return Ok(std::process::ExitCode::SUCCESS);
            }
            changed = desired.changed() => changed.context("the config source stopped")?,
            _ = health.changed() => {}
            _ = resync.tick() => {}
            _ = tokio::time::sleep_until(once_deadline), if agent.args.once => {
                anyhow::bail!("--once: no complete config and probe results within 30 s");
            }
        }
        let d = desired.borrow_and_update().clone();
        let h = health.borrow_and_update().clone();
        if let Some(applied) = agent.pass(&d, &h).await {
            if agent.args.once {
                return Ok(if applied { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE });
            }
        }
    }
}

impl Agent {
    /// One pass. Returns `Some(applied)` when a config was processed, `None` while waiting.
    async fn pass(&mut self, desired: &Desired, health: &BTreeMap<String, Health>) -> Option<bool> {
        if !desired.synced {
            // Until the first list of the ConfigMap (and Secret) answers, say so to the readiness
            // probe instead of leaving it with no status at all (e.g. while RBAC denies the watch).
            let problem = "waiting for the node config from the API (first list not answered yet)".to_string();
            self.finish(desired, None, vec![problem], None, true).await;
            return None;
        }
        let Some(json) = &desired.config_json else {
            let what = match &self.args.from_dir {
                Some(dir) => format!("{}/{}", dir.display(), crate::build::node::NODE_CONFIG_KEY),
                None => format!("ConfigMap {}", self.args.config_map.as_deref().unwrap_or_default()),
            };
            let problem = format!("{what} not found; the node's files are left as they are");
            self.finish(desired, None, vec![problem], None, false).await;
            return None;
        };
        let config: NodeConfig = match serde_json::from_str(json) {
            Ok(c) => c,
            Err(e) => {
                let problem = format!("the node config is not valid ({e}); the node's files are left as they are");
                self.finish(desired, None, vec![problem], None, false).await;
                return None;
            }
        };
        if config.mirror.rsplit('/').next() != Some(self.args.mirror.as_str()) {
            let problem = format!(
                "the node config is for RegistryMirror {}, not {}; nothing written",
                config.mirror, self.args.mirror
            );
            self.finish(desired, None, vec![problem], None, false).await;
            return None;
        }
        let edge_ca = config.edge_ca.as_deref();
        let peer = config.peer.as_ref().map(|p| p.resolve(self.args.node_ip.as_deref()));
        let peer_probe = peer.as_ref().and_then(|p| p.as_deref().ok());
        self.prober.set_endpoints(
            config
                .registries
                .iter()
                .map(|r| (r.mirror.as_str(), edge_ca))
                // The peer is the node's own P2P registry: the node's CAs, not the edge's.
                .chain(peer_probe.map(|e| (e, None)))
                .filter(|_| !config.removing),
        );
        let unprobed = config.registries.iter().map(|r| r.mirror.as_str()).chain(peer_probe);
        if self.args.once && !config.removing && { unprobed }.any(|e| !health.contains_key(e)) {
            return None;
        }
        let report = apply::apply(&apply::Inputs {
            config: &config,
            authorization: desired.authorization.as_deref(),
            health,
            containerd_config: self.args.containerd_config.as_deref(),
            peer_endpoint: peer.as_ref().map(|p| p.as_deref().map_err(String::as_str)),
        });
        for r in &report.registries {
            match &r.state {
                apply::EntryState::Written => {
                    tracing::info!(registry = r.registry, mirror = r.mirror, "wrote hosts.toml")
                }
                apply::EntryState::Removed => {
                    tracing::info!(registry = r.registry, "removed hosts.toml (mirror removed)")
                }
                apply::EntryState::Withdrawn { reason } if health.get(&r.mirror).is_some() => {
                    tracing::debug!(registry = r.registry, reason, "entry withdrawn")
                }
                _ => {}
            }
        }
        for rt in &report.runtimes {
            if matches!(rt.state, apply::EntryState::Written | apply::EntryState::Removed) {
                tracing::info!(runtime = rt.runtime, path = rt.path, state = ?rt.state, note = ?rt.note, "updated");
            }
        }
        for stale in &report.removed_stale {
            tracing::info!(registry = stale, "removed hosts.toml the config no longer lists");
        }
        let applied = report.applied();
        let checksum = node_config_checksum(json);
        self.finish(desired, applied.then_some(checksum.as_str()), report.problems(), Some(&report), false).await;
        Some(applied)
    }

    /// Status file, annotation, log and Event for the end of a pass.
    async fn finish(
        &mut self,
        desired: &Desired,
        applied_checksum: Option<&str>,
        problems: Vec<String>,
        report: Option<&apply::Report>,
        transient: bool,
    ) {
        let ready = problems.is_empty();
        let status = status::Status {
            node: self.args.node_name.clone(),
            ready,
            problems: problems.clone(),
            applied_checksum: applied_checksum.map(str::to_string),
            updated_unix: status::now_unix(),
            report: report.map(|r| serde_json::to_value(r).expect("report serializes")).unwrap_or_default(),
        };
        if let Err(e) = status::write(&self.args.status_dir, &status) {
            tracing::error!(dir = %self.args.status_dir.display(), error = %e, "writing the status file");
        }
        if let (Some(reporter), Some(checksum)) = (self.reporter.as_mut(), applied_checksum) {
            reporter.annotate(checksum).await;
        }
        // Right after start the config is not listed yet and every mirror is "not probed yet",
        // for a few milliseconds; that is not news, so it is neither logged nor published.
        let transient = transient
            || report
                .is_some_and(|r| r.registries.iter().any(|o| matches!(o.state, apply::EntryState::Pending { .. })));
        if transient || self.last.problems.as_ref() == Some(&problems) {
            return;
        }
        let was_problem = self.last.problems.as_ref().is_some_and(|p| !p.is_empty());
        self.last.problems = Some(problems.clone());
        let node = &self.args.node_name;
        if ready {
            tracing::info!(node, "node configured: every mirror entry written and reachable");
        } else {
            for p in &problems {
                tracing::warn!(node, problem = p, "node not configured");
            }
        }
        let Some(reporter) = &self.reporter else { return };
        let regarding = match (&desired.owner, &reporter.pod) {
            (Some(owner), _) => source::object_reference(owner, &reporter.namespace),
            (None, Some(pod)) => source::pod_reference(&reporter.namespace, pod),
            (None, None) => return,
        };
        if ready {
            if was_problem {
                reporter.event(regarding, false, "NodeConfigured", &format!("node {node}: configured")).await;
            }
        } else {
            let message = format!("node {node}: {}", problems.join("; "));
            reporter.event(regarding, true, "NodeNotConfigured", &message).await;
        }
    }
}
