//! The `mirrorfleet` binary: subcommands dispatch into the library.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mirrorfleet::build::Settings;
use mirrorfleet::render::{self, RenderOptions};

#[derive(Parser)]
#[command(name = "mirrorfleet", version, about = "Runs fleets of container-registry mirrors in Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render every child manifest and config file of the RegistryMirrors in a file (no cluster).
    Render(RenderArgs),
    /// Print the RegistryMirror CustomResourceDefinition.
    Crd,
    /// Run the controller: keep every RegistryMirror's fleet converged (needs a cluster).
    Run(mirrorfleet::controller::RunArgs),
    /// Run on a node (DaemonSet): write the runtime mirror config of one RegistryMirror.
    NodeAgent(mirrorfleet::agent::AgentArgs),
    /// Clean the caches of one RegistryMirror's proxies, one Deployment at a time (CronJob).
    Cleanup(mirrorfleet::cleanup::CleanupArgs),
    /// Clean one proxy replica's cache before its registry starts (the proxies' init container).
    CleanupReplica(mirrorfleet::cleanup::local::CleanupReplicaArgs),
    /// Keep one proxy replica's cache under its watermarks (a container of every proxy pod).
    CacheKeeper(mirrorfleet::cache::keeper::KeeperArgs),
    /// Readiness probe of the node agent: exit 0 only when the node is configured.
    NodeAgentReady(mirrorfleet::agent::ReadyArgs),
}

#[derive(clap::Args)]
struct RenderArgs {
    /// File with RegistryMirror documents (and the Secrets they reference); `-` reads stdin.
    /// Without it, the embedded sample (config/samples/public-mirrors.yaml) is rendered.
    #[arg(short = 'f', long = "filename", env = "MIRRORFLEET_RENDER_FILE")]
    file: Option<PathBuf>,
    /// Write manifests.yaml and the raw config files into this directory instead of stdout.
    #[arg(short = 'o', long = "output-dir")]
    output_dir: Option<PathBuf>,
    /// Namespace for documents that have none.
    #[arg(short = 'n', long, default_value = "default", env = "MIRRORFLEET_NAMESPACE")]
    namespace: String,
    /// Image of the operator (runs the node agent and the cleanup job).
    #[arg(long, env = "MIRRORFLEET_OPERATOR_IMAGE")]
    operator_image: Option<String>,
    /// Cluster DNS domain.
    #[arg(long, default_value = "cluster.local", env = "MIRRORFLEET_CLUSTER_DOMAIN")]
    cluster_domain: String,
    /// Kubernetes version the output is for (`1.34`): from 1.34 on, Services get
    /// `trafficDistribution: PreferSameZone` instead of its deprecated name `PreferClose`, as the
    /// operator does after reading the API server's version.
    #[arg(long, value_name = "1.MINOR", value_parser = parse_kube_minor)]
    kubernetes_version: Option<u32>,
    /// Mirror endpoint nodes use for an upstream, as NAME=URL (the controller uses the Service's
    /// cluster IP; render falls back to the Service DNS name).
    #[arg(long = "endpoint", value_parser = parse_endpoint)]
    endpoints: Vec<(String, String)>,
    /// Show Secret data instead of redacting it.
    #[arg(long)]
    include_secrets: bool,
}

fn parse_kube_minor(s: &str) -> Result<u32, String> {
    let minor = s.strip_prefix('v').unwrap_or(s).strip_prefix("1.").and_then(|m| m.split('.').next());
    minor.and_then(|m| m.parse().ok()).ok_or_else(|| format!("{s:?} is not a Kubernetes version like 1.34"))
}

fn parse_endpoint(s: &str) -> Result<(String, String), String> {
    let (name, url) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=URL"))?;
    Ok((name.to_string(), url.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => mirrorfleet::controller::main(args),
        Command::Cleanup(args) => mirrorfleet::cleanup::main(args),
        Command::CleanupReplica(args) => mirrorfleet::cleanup::local::main(args),
        Command::CacheKeeper(args) => mirrorfleet::cache::keeper::main(args),
        Command::Crd => {
            print!("{}", mirrorfleet::api::crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::NodeAgent(args) => mirrorfleet::agent::main(args),
        Command::NodeAgentReady(args) => mirrorfleet::agent::ready_main(args),
        Command::Render(args) => match run_render(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run_render(args: RenderArgs) -> anyhow::Result<()> {
    let input = match &args.file {
        None => render::EMBEDDED_SAMPLE.to_string(),
        Some(p) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        }
        Some(p) => std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?,
    };
    let mut settings = Settings { cluster_domain: args.cluster_domain, ..Settings::default() };
    if let Some(image) = args.operator_image {
        settings.operator_image = image;
    }
    if let Some(minor) = args.kubernetes_version {
        settings.same_zone_traffic = mirrorfleet::build::same_zone_value(minor);
    }
    let opts = RenderOptions {
        namespace: args.namespace,
        settings,
        endpoints: args.endpoints.into_iter().collect::<BTreeMap<_, _>>(),
        include_secrets: args.include_secrets,
    };
    let rendered = render::render_str(&input, &opts)?;
    for r in &rendered {
        for warning in mirrorfleet::api::validate::exposed_credentials(&r.mirror) {
            eprintln!(
                "warning: RegistryMirror {}/{}: {warning}",
                r.mirror.metadata.namespace.as_deref().unwrap_or_default(),
                r.mirror.metadata.name.as_deref().unwrap_or_default()
            );
        }
    }
    match args.output_dir {
        None => {
            let mut stdout = std::io::stdout().lock();
            for part in render::yaml_stream_parts(&rendered, opts.include_secrets) {
                stdout.write_all(part.as_bytes())?;
            }
            stdout.flush()?;
        }
        Some(dir) => {
            for path in render::write_dir(&rendered, &dir, opts.include_secrets)? {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    // The process ends right after this: freeing the fleets (thousands of objects, each a tree
    // of small Strings and maps) one allocation at a time would only cost time at exit.
    std::mem::forget(rendered);
    Ok(())
}
