//! `mirrorfleet run`: the controller that keeps every RegistryMirror's fleet converged.
//!
//! - [`reconcile`]: the pipeline validate -> build -> apply -> status, and the error policy.
//! - [`inputs`]: the referenced Secrets (existence, keys, users, resourceVersions).
//! - [`apply`]: server-side apply with no-op detection, and orphan deletion by label selection.
//! - [`status`]: status and conditions as pure functions of the observed children.
//! - [`nodes`]: the finalizer and the removal of node config before it is released.
//! - [`metrics`], [`admin`]: Prometheus metrics and the `/metrics` `/livez` `/readyz` server.
//! - [`leader`]: leader election on a Lease, so replicas can stand by.
//! - [`upstreams`]: what the proxies' upstream sidecars see of each upstream, read from their
//!   counters, for the status, Degraded, Events and metrics.
//!
//! Watches: RegistryMirrors (full objects; only changes to the spec, deletion, finalizers, labels
//! or annotations trigger a reconcile, not the controller's own status writes); every owned kind,
//! filtered by the managed-by label, each into a store the reconciles read instead of listing
//! ([`children`]: metadata only, except Services, Deployments and DaemonSets, compacted); the
//! Secrets mirrors reference (metadata-only, mapped back to the mirrors that name them, so a
//! rotated credential rolls the proxies); the node-agent Pods (their applied-config annotation
//! releases the finalizer); cleanup Jobs (for `status.lastCleanup`, into a store too).
//!
//! Every watch restarts with backoff after an error, and every API request has a read timeout
//! ([`crate::client::API_READ_TIMEOUT`]), so a watch or request caught by an API server restart
//! is dropped and made again instead of waiting forever on a dead connection. Every watch is
//! ended by the server before that timeout ([`WatchConfigs`]), so an idle one is never cut.

pub mod admin;
pub mod apply;
pub mod caches;
pub mod challenge;
pub mod children;
pub mod error;
pub mod inputs;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod reconcile;
pub mod related;
pub mod status;
pub mod upstreams;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use children::api;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ListParams;
use kube::client::{Body, ClientBuilder};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{predicates, watcher, Controller, Predicate, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::api::RegistryMirror;
use crate::build::meta::LABEL_INSTANCE;
use crate::build::Settings;
use metrics::Metrics;
use reconcile::{error_policy, reconcile, Context, Options};

/// Flags of `mirrorfleet run`; each is also an environment variable.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Watch RegistryMirrors in this namespace only; all namespaces when unset.
    #[arg(long, env = "MIRRORFLEET_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Image of this operator, which the node agents and cleanup jobs run.
    #[arg(long, env = "MIRRORFLEET_OPERATOR_IMAGE")]
    pub operator_image: Option<String>,
    /// Cluster DNS domain.
    #[arg(long, default_value = "cluster.local", env = "MIRRORFLEET_CLUSTER_DOMAIN")]
    pub cluster_domain: String,
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(long, default_value = "0.0.0.0:8080", env = "MIRRORFLEET_ADMIN_ADDR")]
    pub admin_addr: SocketAddr,
    /// Elect a leader on a Lease, so several replicas can run with one active.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "MIRRORFLEET_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, default_value = "mirrorfleet-controller", env = "MIRRORFLEET_LEASE_NAME")]
    pub lease_name: String,
    /// Namespace of the leader Lease; the Pod's namespace (POD_NAMESPACE) or the kubeconfig's.
    #[arg(long, env = "MIRRORFLEET_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Seconds a leader holds the Lease without renewing it; a standby takes over after that
    /// at the latest (at once when the leader shuts down cleanly and releases it).
    #[arg(long, default_value_t = 15, env = "MIRRORFLEET_LEASE_DURATION_SECONDS")]
    pub lease_duration_seconds: u64,
    /// This replica's identity in the Lease; the Pod name (POD_NAME), else host name and pid.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds between reconciles of an unchanged mirror (watches trigger the rest).
    #[arg(long, default_value_t = 300, env = "MIRRORFLEET_REQUEUE_SECONDS")]
    pub requeue_seconds: u64,
    /// Seconds to wait for node agents to remove their files before releasing the finalizer.
    #[arg(long, default_value_t = 600, env = "MIRRORFLEET_NODE_REMOVAL_TIMEOUT_SECONDS")]
    pub node_removal_timeout_seconds: u64,
    /// Seconds between two readings of the proxies' upstream-sidecar counters (upstream
    /// reachability, last error, failed lookups in the status); 0 turns the readings off.
    #[arg(long, default_value_t = 10, env = "MIRRORFLEET_UPSTREAM_CHECK_SECONDS")]
    pub upstream_check_seconds: u64,
    /// Ask upstreams without `upstreams[].auth` (and not a known public registry) for their
    /// challenge (`GET <remoteURL>/v2/`), so their proxies run the upstream sidecar too.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "MIRRORFLEET_LEARN_UPSTREAM_CHALLENGES")]
    pub learn_upstream_challenges: bool,
    /// Mirrors reconciled at the same time.
    #[arg(long, default_value_t = 8, env = "MIRRORFLEET_CONCURRENCY")]
    pub concurrency: u16,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], env = "MIRRORFLEET_LOG_FORMAT")]
    pub log_format: String,
}

/// Entry point of `mirrorfleet run`.
pub fn main(args: RunArgs) -> ExitCode {
    init_tracing(&args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,kube_lease_manager=warn"));
    // Pod logs are files, not terminals: no colour escapes in them.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if format == "json" { builder.json().try_init() } else { builder.try_init() };
}

type CountFn = Arc<dyn Fn(&str, &str, Option<&str>) + Send + Sync>;

/// A tower layer that shows every request (method, path, content type) to `count` first.
fn count_layer(
    count: CountFn,
) -> tower::util::MapRequestLayer<impl Fn(http::Request<Body>) -> http::Request<Body> + Clone> {
    tower::util::MapRequestLayer::new(move |req: http::Request<Body>| {
        let content_type = req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        count(req.method().as_str(), req.uri().path(), content_type);
        req
    })
}

/// A client on `service` (tests pass an in-process API double) whose requests `count` sees.
pub fn counting_client<S>(service: S, namespace: &str, count: CountFn) -> Client
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
{
    ClientBuilder::new(service, namespace).with_layer(&count_layer(count)).build()
}

/// A client with the read timeout of [`crate::client`] whose requests `count` sees.
fn make_client(config: &kube::Config, count: CountFn) -> anyhow::Result<Client> {
    let config = crate::client::with_read_timeout(config.clone());
    let builder = ClientBuilder::try_from(config).context("building the API client")?;
    Ok(builder.with_layer(&count_layer(count)).build())
}

/// Every watch the controller runs, configured in one place. Each starts from
/// [`crate::client::watch_config`]: the API server ends it before the client's read timeout, so a
/// watch of a kind nothing changes is not cut as dead every 75 s.
#[derive(Clone, Debug)]
pub struct WatchConfigs {
    pub mirrors: watcher::Config,
    /// Every Secret (metadata only), mapped to the mirrors that name it.
    pub referenced_secrets: watcher::Config,
    pub node_agents: watcher::Config,
    /// Every owned kind, by the managed-by label.
    pub owned: watcher::Config,
    pub cleanup_jobs: watcher::Config,
    /// Every Node (metadata only): their zones.
    pub nodes: watcher::Config,
}

impl Default for WatchConfigs {
    fn default() -> Self {
        let base = crate::client::watch_config;
        Self {
            mirrors: base(),
            referenced_secrets: base(),
            node_agents: base().labels(&children::agent_pods_selector()),
            owned: base().labels(&children::owned_selector()),
            cleanup_jobs: base().labels(&children::cleanup_jobs_selector()),
            nodes: base(),
        }
    }
}

impl WatchConfigs {
    /// Every config with what it watches. Destructured without `..`: a new one must be listed.
    pub fn all(&self) -> Vec<(&'static str, &watcher::Config)> {
        let Self { mirrors, referenced_secrets, node_agents, owned, cleanup_jobs, nodes } = self;
        vec![
            ("RegistryMirrors", mirrors),
            ("referenced Secrets", referenced_secrets),
            ("node-agent Pods", node_agents),
            ("owned children", owned),
            ("cleanup Jobs", cleanup_jobs),
            ("Nodes", nodes),
        ]
    }
}

/// Fails with a clear message when the RegistryMirror CRD is not installed.
pub async fn check_crd(client: &Client, namespace: Option<&str>) -> anyhow::Result<()> {
    let api: Api<RegistryMirror> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "the RegistryMirror CRD (registrymirrors.mirrorfleet.io) is not installed in this cluster; \
             install it with `mirrorfleet crd | kubectl apply -f -` or the Helm chart, then start again"
        ),
        Err(e) => Err(anyhow::Error::new(e)
            .context("listing RegistryMirrors (is the API server reachable, and may this account list them?)")),
    }
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    // Resolves once the value is true or the sender is gone.
    let _ = rx.wait_for(|v| *v).await;
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = kube::Config::infer().await.context("finding the cluster (in-cluster config or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::new());
    let m = metrics.clone();
    let client = make_client(&config, Arc::new(move |method, path, ct| m.count_request(method, path, ct)))?;
    check_crd(&client, args.watch_namespace.as_deref()).await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown signal received; finishing running reconciles");
        let _ = shutdown_tx.send(true);
    });
    let admin = tokio::spawn(admin::serve(args.admin_addr, metrics.clone(), wait_for(shutdown_rx.clone())));

    let mut settings = Settings { cluster_domain: args.cluster_domain.clone(), ..Settings::default() };
    if let Some(image) = &args.operator_image {
        settings.operator_image = image.clone();
    }
    match client.apiserver_version().await {
        Ok(info) => {
            // "1.34", "34+" on some distributions.
            let minor: u32 = info.minor.trim_end_matches('+').parse().unwrap_or(0);
            settings.same_zone_traffic = crate::build::same_zone_value(minor);
            info!(version = %info.git_version, traffic_distribution = settings.same_zone_traffic, "API server");
        }
        Err(e) => warn!(error = %e, "API server version unknown; Services get trafficDistribution PreferClose"),
    }
    let options = Options {
        requeue: Duration::from_secs(args.requeue_seconds),
        node_removal_timeout: Duration::from_secs(args.node_removal_timeout_seconds),
        learn_challenges: args.learn_upstream_challenges,
        upstream_monitor: (args.upstream_check_seconds > 0).then(|| upstreams::MonitorOptions {
            interval: Duration::from_secs(args.upstream_check_seconds),
            ..Default::default()
        }),
        ..Options::default()
    };
    let identity = args.identity.clone().unwrap_or_else(default_identity);

    let lost_leadership = Arc::new(AtomicBool::new(false));
    let mut lease_task = None;
    let stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>> = if args.leader_elect {
        let namespace = args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| config.default_namespace.clone());
        let lm = metrics.clone();
        let lease_client = make_client(
            &config,
            Arc::new(move |method, path, ct| {
                if metrics::write_labels(method, path, ct).is_some() {
                    lm.lease_writes.inc();
                }
            }),
        )?;
        let (mut leader_rx, task) =
            leader::start(lease_client, &args.lease_name, &namespace, &identity, args.lease_duration_seconds).await?;
        lease_task = Some(task);
        // A standby is healthy and ready to take over: ready, but not reconciling.
        metrics.set_ready(true);
        info!(lease = %args.lease_name, %namespace, %identity, "waiting to become leader");
        let mut shutdown = shutdown_rx.clone();
        tokio::select! {
            r = leader_rx.wait_for(|leader| *leader) => { r.context("leader election stopped")?; }
            _ = shutdown.wait_for(|v| *v) => { info!("shut down while standing by"); return finish(admin, None).await; }
        }
        info!("became leader");
        metrics.set_ready(false);
        metrics.leader.set(1);
        let lost = lost_leadership.clone();
        let shutdown = wait_for(shutdown_rx.clone());
        Box::pin(async move {
            let lost_fut = async move {
                let _ = leader_rx.wait_for(|leader| !*leader).await;
                lost.store(true, Ordering::SeqCst);
                error!("lost the leader Lease; stopping");
            };
            tokio::select! { _ = lost_fut => {}, _ = shutdown => {} }
        })
    } else {
        // Alone, so leading.
        metrics.leader.set(1);
        Box::pin(wait_for(shutdown_rx.clone()))
    };

    let ctx = Arc::new(Context::new(client.clone(), settings, options, metrics.clone(), Some(identity)));
    run_controller(client, args.watch_namespace.as_deref(), args.concurrency, ctx, stop).await;
    metrics.leader.set(0);
    metrics.set_ready(false);
    if lost_leadership.load(Ordering::SeqCst) {
        finish(admin, lease_task).await?;
        anyhow::bail!("lost leadership");
    }
    finish(admin, lease_task).await
}

async fn finish(
    admin: tokio::task::JoinHandle<std::io::Result<()>>,
    lease_task: Option<
        tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError>>,
    >,
) -> anyhow::Result<()> {
    // The lease task releases the Lease once its receivers are gone (so a standby takes over at
    // once); give it a moment.
    if let Some(task) = lease_task {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => info!("leader Lease released"),
            Ok(Ok(Err(e))) => warn!(error = %e, "releasing the leader Lease"),
            Ok(Err(e)) => warn!(error = %e, "leader election task failed"),
            Err(_) => warn!("leader Lease not released within 5s"),
        }
    }
    match tokio::time::timeout(Duration::from_secs(5), admin).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(anyhow::Error::new(e).context("admin server")),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("admin server task")),
        Err(_) => Ok(()),
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    let host = if host.is_empty() { "mirrorfleet".to_string() } else { host };
    format!("{host}-{}", std::process::id())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the controller");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The mirror a labelled object belongs to (node-agent Pods, cleanup Jobs).
fn mirror_of_labels<K: kube::Resource>(obj: &K) -> Option<ObjectRef<RegistryMirror>> {
    let instance = obj.meta().labels.as_ref()?.get(LABEL_INSTANCE)?;
    Some(ObjectRef::new(instance).within(obj.meta().namespace.as_deref()?))
}

/// Logs a watch's errors and drops them. Each watch already retries with its own backoff; an
/// error reaching the Controller would instead pause every trigger at once (kube-runtime backs
/// off the merged trigger stream), which after an API server restart stalled all watches for
/// minutes while one stale error after another drained.
fn log_errors<K>(
    what: &'static str,
    stream: impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Send + 'static,
{
    stream.filter_map(move |r| async move {
        match r {
            Ok(o) => Some(Ok(o)),
            Err(e) => {
                warn!(watch = what, error = %e, "watch failed; retrying with backoff");
                None
            }
        }
    })
}

/// What a watch without a store of the controller's triggers ([`children::triggers`]), through
/// a store kept for that alone.
fn triggered_by<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    children::triggers(events.reflect(writer), store)
}

/// A predicate that changes when the mirror starts being deleted.
fn deletion(mirror: &RegistryMirror) -> Option<u64> {
    Some(u64::from(mirror.metadata.deletion_timestamp.is_some()))
}

/// Nodes' labels, for their zones; no reconcile follows a Node (a zone label seldom changes: the
/// next reconcile reads it). Only name, zone label and resourceVersion are kept.
fn watch_node_zones(
    client: &Client,
    config: watcher::Config,
) -> (reflector::Store<PartialObjectMeta<Node>>, tokio::task::JoinHandle<()>) {
    let (node_store, node_writer) = reflector::store::<PartialObjectMeta<Node>>();
    let node_watch = watcher(Api::<PartialObjectMeta<Node>>::all(client.clone()), config)
        .backoff(children::watch_backoff())
        .modify(|n: &mut PartialObjectMeta<Node>| {
            let zone = n.metadata.labels.take().and_then(|mut l| l.remove(crate::api::ZONE_LABEL));
            n.metadata = ObjectMeta {
                name: n.metadata.name.take(),
                labels: zone.map(|z| [(crate::api::ZONE_LABEL.to_string(), z)].into()),
                resource_version: n.metadata.resource_version.take(),
                ..Default::default()
            };
        })
        .reflect(node_writer);
    let task = tokio::spawn(log_errors("Node", node_watch.applied_objects()).for_each(|_| async {}));
    (node_store, task)
}

/// Marks the operator ready (`/readyz`, the `ready` metric) once the mirrors are listed, then
/// keeps the mirror count metric current.
fn report_readiness(
    store: reflector::Store<RegistryMirror>,
    metrics: Arc<metrics::Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Polled with a timeout: the store's readiness signal wakes only its last waiter (the
        // controller's own), so a second waiter must look again by itself.
        loop {
            match tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    metrics.set_ready(true);
                    info!("first sync done; ready");
                    break;
                }
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
        loop {
            metrics.mirrors.set(store.state().len() as i64);
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
}

/// Runs the controller until `stop` resolves; running reconciles finish first.
pub async fn run_controller(
    client: Client,
    ns: Option<&str>,
    concurrency: u16,
    ctx: Arc<Context>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let mirrors: Api<RegistryMirror> = api(&client, ns);
    let (store, writer) = reflector::store::<RegistryMirror>();
    // The controller's own status writes do not trigger another reconcile; everything else a
    // reconcile reads from the mirror does.
    let changed = predicates::generation
        .combine(predicates::finalizers)
        .combine(predicates::labels)
        .combine(predicates::annotations)
        .combine(deletion);
    let cfg = WatchConfigs::default();
    let mirror_events = watcher(mirrors, cfg.mirrors.clone())
        .backoff(children::watch_backoff())
        // managedFields are never read here (writes are server-side applies): not kept.
        .modify(|m: &mut RegistryMirror| m.metadata.managed_fields = None)
        .reflect(writer);
    // A mirror created, deleted or edited may start or end a node-config conflict with others:
    // they are reconciled too.
    let (related_tx, related_rx) = tokio::sync::mpsc::unbounded_channel();
    let mirror_events = mirror_events.inspect({
        let mut related = related::RelatedMirrors::new(store.clone(), related_tx);
        move |event| related.observe(event)
    });
    let related_triggers =
        futures::stream::unfold(related_rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    ctx.set_mirror_store(store.clone());
    // After a relist, the reconcile must read the relisted spec, not the one from before it.
    let mirror_stream = children::triggers(mirror_events, store.clone()).predicate_filter(changed, Default::default());
    let mirror_stream = log_errors("RegistryMirror", mirror_stream);
    let controller = Controller::for_stream(mirror_stream, store.clone());

    let Some(w) = ctx.take_child_writers() else {
        error!("the child stores are already fed by another controller; not starting");
        return;
    };
    // Stores of their own only so that a relist also triggers for what vanished in it (a
    // referenced Secret or an agent Pod deleted while the watch was down).
    let secrets = triggered_by(
        watcher(api::<PartialObjectMeta<Secret>>(&client, ns), cfg.referenced_secrets.clone())
            .backoff(children::watch_backoff())
            .modify(children::Compact::compact),
    );
    let secrets = log_errors("Secret (referenced)", secrets);
    let secret_store = store.clone();
    // Agent Pods whole (compacted to node name and readiness): the nodes per zone in the status.
    let (agent_store, agent_writer) = reflector::store::<Pod>();
    let agents = children::triggers(
        watcher(api::<Pod>(&client, ns), cfg.node_agents.clone())
            .backoff(children::watch_backoff())
            .modify(children::compact_agent_pod)
            .reflect(agent_writer),
        agent_store.clone(),
    );
    let agents = log_errors("Pod (node agents)", agents);
    let (node_store, node_task) = watch_node_zones(&client, cfg.nodes.clone());
    ctx.set_node_stores(agent_store, node_store);
    let owned_cfg = || cfg.owned.clone();
    let jobs = log_errors("Job (cleanup)", children::watch_full::<Job>(&client, ns, cfg.cleanup_jobs.clone(), w.jobs));

    // Upstream health changes trigger their mirror's reconcile, which writes them to the status.
    let (health_tx, health_rx) = tokio::sync::mpsc::unbounded_channel();
    // So does a learned upstream challenge.
    ctx.challenges.set_trigger(health_tx.clone());
    let monitor = ctx.options.upstream_monitor.clone().map(|options| {
        tokio::spawn(upstreams::monitor(
            client.clone(),
            ns.map(str::to_string),
            ctx.upstream_health.clone(),
            ctx.metrics.clone(),
            options,
            health_tx,
        ))
    });
    let health_triggers = futures::stream::unfold(health_rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });

    let ready_task = report_readiness(store.clone(), ctx.metrics.clone());

    controller
        .owns_stream(log_errors(
            "Deployment",
            children::watch_full::<Deployment>(&client, ns, owned_cfg(), w.deployments),
        ))
        .owns_stream(log_errors("Service", children::watch_full::<Service>(&client, ns, owned_cfg(), w.services)))
        .owns_stream(log_errors(
            "DaemonSet",
            children::watch_full::<DaemonSet>(&client, ns, owned_cfg(), w.daemon_sets),
        ))
        .owns_stream(log_errors(
            "ConfigMap",
            children::watch_meta::<ConfigMap>(&client, ns, owned_cfg(), w.config_maps),
        ))
        .owns_stream(log_errors("Secret", children::watch_meta::<Secret>(&client, ns, owned_cfg(), w.secrets)))
        .owns_stream(log_errors("CronJob", children::watch_meta::<CronJob>(&client, ns, owned_cfg(), w.cron_jobs)))
        .owns_stream(log_errors(
            "PersistentVolumeClaim",
            children::watch_meta::<PersistentVolumeClaim>(&client, ns, owned_cfg(), w.persistent_volume_claims),
        ))
        .owns_stream(log_errors(
            "NetworkPolicy",
            children::watch_meta::<NetworkPolicy>(&client, ns, owned_cfg(), w.network_policies),
        ))
        .owns_stream(log_errors(
            "ServiceAccount",
            children::watch_meta::<ServiceAccount>(&client, ns, owned_cfg(), w.service_accounts),
        ))
        .owns_stream(log_errors("Role", children::watch_meta::<Role>(&client, ns, owned_cfg(), w.roles)))
        .owns_stream(log_errors(
            "RoleBinding",
            children::watch_meta::<RoleBinding>(&client, ns, owned_cfg(), w.role_bindings),
        ))
        .watches_stream(secrets, move |secret: PartialObjectMeta<Secret>| {
            let ns = secret.namespace();
            let name = secret.name_any();
            secret_store
                .state()
                .into_iter()
                .filter(|m| m.namespace() == ns && inputs::references_secret(m, &name))
                .map(|m| ObjectRef::from_obj(&*m))
                .collect::<Vec<_>>()
        })
        .watches_stream(agents, |pod: Pod| mirror_of_labels(&pod))
        .watches_stream(jobs, |job: Job| mirror_of_labels(&job))
        .reconcile_on(health_triggers)
        .reconcile_on(related_triggers)
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            let ctx = ctx.clone();
            async move {
                match result {
                    Ok(_) => {}
                    // Reconcile errors are logged (with the mirror) where they happen.
                    Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                    // A child of a deleted mirror changed (the garbage collector at work).
                    Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                        debug!(%obj, "mirror gone");
                        ctx.forget_mirror(obj.namespace.as_deref().unwrap_or_default(), &obj.name);
                    }
                    Err(e) => warn!(error = %e, "controller"),
                }
            }
        })
        .await;
    ready_task.abort();
    node_task.abort();
    if let Some(m) = monitor {
        m.abort();
    }
    info!("controller stopped");
}
