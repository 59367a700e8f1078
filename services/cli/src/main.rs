//! `herald`: the one binary. Runs one service role, all of them (`herald dev`), and admin
//! commands over the control APIs. (The load generator is its own binary, `herald-bench`.)

mod config;
mod control;
mod delivery_cmd;
mod destinations_cmd;
mod dev;
mod dlq_cmd;
mod output;
mod profile_cmd;
mod quarantine_cmd;
mod replay_cmd;
mod sources_cmd;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use herald_common::server::ServiceHandle;
use herald_common::telemetry::PrometheusHandle;
use herald_common::{server, telemetry};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RoleArgs};
use crate::control::{ActivatorApi, IngestApi, ProcessorApi};

/// mimalloc with Herald's settings (`herald_common::alloc`). Built without the `mimalloc`
/// feature, the system allocator (for heap profilers that hook malloc).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: herald_common::alloc::MiMalloc = herald_common::alloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: a real-time customer data pipeline on NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the ingest service (Segment and mParticle HTTP APIs).
    Ingest(RoleArgs),
    /// Run the processor service.
    Processor(RoleArgs),
    /// Run the activator service.
    Activator(RoleArgs),
    /// Run nats-server and all three services in one process, with a default source and a
    /// log destination.
    Dev(dev::DevArgs),
    /// Sources (ingest control API).
    Sources {
        #[command(flatten)]
        api: IngestApi,
        #[command(subcommand)]
        cmd: sources_cmd::SourcesCommand,
    },
    /// What ingest could not accept: list and redrive (ingest control API).
    Quarantine {
        #[command(flatten)]
        api: IngestApi,
        #[command(subcommand)]
        cmd: quarantine_cmd::QuarantineCommand,
    },
    /// The processor's consumers, position and counters.
    Status(ProcessorApi),
    /// Profiles (processor ProfileService): `herald profile get <type>:<value>`.
    Profile {
        #[command(flatten)]
        api: ProcessorApi,
        #[command(subcommand)]
        cmd: profile_cmd::ProfileCommand,
    },
    /// Erase a person (GDPR/CCPA) given any identity `<type>:<value>`: deletes the profile and
    /// its identity mappings, suppresses its identities, publishes an erasure event.
    Erase {
        /// `<type>:<value>`, e.g. `email:ann@example.com`.
        identity: String,
        #[command(flatten)]
        api: ProcessorApi,
    },
    /// Suppress an identity `<type>:<value>` and every identity of its profile: their events
    /// are dropped until unsuppressed.
    Suppress {
        /// `<type>:<value>`, e.g. `user_id:42`.
        identity: String,
        #[command(flatten)]
        api: ProcessorApi,
    },
    /// Lift the suppression of an identity `<type>:<value>` (and of those suppressed with it).
    Unsuppress {
        /// `<type>:<value>`, e.g. `user_id:42`.
        identity: String,
        #[command(flatten)]
        api: ProcessorApi,
    },
    /// Erasure requests: `herald erasure status <request id>`.
    Erasure {
        #[command(flatten)]
        api: ProcessorApi,
        #[command(subcommand)]
        cmd: profile_cmd::ErasureCommand,
    },
    /// Destinations (activator control API).
    Destinations {
        #[command(flatten)]
        api: ActivatorApi,
        #[command(subcommand)]
        cmd: destinations_cmd::DestinationsCommand,
    },
    /// Re-send the processed events of a time window to one destination, with progress.
    Replay {
        #[command(flatten)]
        api: ActivatorApi,
        #[command(flatten)]
        args: replay_cmd::ReplayArgs,
    },
    /// How an event's delivery to each destination ended: `herald delivery <event id>`
    /// (activator control API).
    Delivery {
        #[command(flatten)]
        args: delivery_cmd::DeliveryArgs,
        #[command(flatten)]
        api: ActivatorApi,
    },
    /// What the activator could not deliver: list, redrive and purge (activator control API).
    Dlq {
        #[command(flatten)]
        api: ActivatorApi,
        #[command(subcommand)]
        cmd: dlq_cmd::DlqCommand,
    },
}

/// Parses the arguments and runs the command on its runtime ([`runtime`]). An error is printed
/// as its chain and a hint, never as a stack trace (see [`output::report`]); status 1.
fn main() -> ExitCode {
    #[cfg(feature = "mimalloc")]
    herald_common::alloc::tune();
    let cli = Cli::parse();
    let result = runtime(&cli.command)
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => output::report(&e),
    }
}

/// The tokio runtime of `command`: the processor and the activator on one worker thread, ingest
/// on one per CPU, unless `--worker-threads` says otherwise; every other command (`herald dev`
/// among them) one per CPU. On two cores shared by the three services and nats-server, one
/// worker each cut the processor's and the activator's CPU per event by about a fifth
/// (docs/benchmarks.md, "The fifth pass").
fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match command {
        Command::Processor(args) | Command::Activator(args) => {
            Some(args.worker_threads.map_or(1, |n| n.get()))
        }
        Command::Ingest(args) => args.worker_threads.map(|n| n.get()),
        _ => None,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    builder.build()
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Ingest(args) => {
            role(args, "ingest", |cfg, metrics, shutdown| async move {
                herald_ingest::start(&cfg.common(), &cfg.ingest, metrics, shutdown).await
            })
            .await?
        }
        Command::Processor(args) => {
            role(args, "processor", |cfg, metrics, shutdown| async move {
                herald_processor::start(&cfg.common(), &cfg.processor, metrics, shutdown).await
            })
            .await?
        }
        Command::Activator(args) => {
            role(args, "activator", |cfg, metrics, shutdown| async move {
                herald_activator::start(&cfg.common(), &cfg.activator, metrics, shutdown).await
            })
            .await?
        }
        Command::Dev(args) => dev::run(args).await?,
        Command::Sources { api, cmd } => sources_cmd::run(cmd, &api.control()).await?,
        Command::Quarantine { api, cmd } => quarantine_cmd::run(cmd, &api.control()).await?,
        Command::Status(api) => control::processor_status(&api.control()).await?,
        Command::Profile { api, cmd } => profile_cmd::profile(cmd, &api.control()).await?,
        Command::Erase { identity, api } => profile_cmd::erase(&identity, &api.control()).await?,
        Command::Suppress { identity, api } => {
            profile_cmd::suppress(&identity, &api.control()).await?
        }
        Command::Unsuppress { identity, api } => {
            profile_cmd::unsuppress(&identity, &api.control()).await?
        }
        Command::Erasure { api, cmd } => profile_cmd::erasure(cmd, &api.control()).await?,
        Command::Destinations { api, cmd } => destinations_cmd::run(cmd, &api.control()).await?,
        Command::Replay { api, args } => replay_cmd::run(args, &api.control()).await?,
        Command::Dlq { api, cmd } => dlq_cmd::run(cmd, &api.control()).await?,
        Command::Delivery { args, api } => delivery_cmd::run(args, &api.control()).await?,
    }
    Ok(())
}

/// Runs one service role (`herald ingest|processor|activator`) until SIGTERM or Ctrl-C: loads
/// the config, starts logging, starts the service with `start`, waits for it to stop.
async fn role<F, Fut, E>(args: RoleArgs, name: &'static str, start: F) -> Result<()>
where
    F: FnOnce(Config, PrometheusHandle, CancellationToken) -> Fut,
    Fut: Future<Output = std::result::Result<ServiceHandle, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let cfg = Config::load(args.config.config.as_deref(), None)?;
    telemetry::init_tracing(&cfg.log);
    let metrics = telemetry::metrics();
    telemetry::RuntimeStarted {
        service: name,
        worker_threads: tokio::runtime::Handle::current().metrics().num_workers(),
    }
    .emit();
    let h = start(cfg.clone(), metrics, server::shutdown_on_signals())
        .await
        .with_context(|| format!("starting {name}"))
        .map_err(|e| cfg.bind_hint(e, &format!("herald {name}"), &[]))?;
    h.task.await?;
    Ok(())
}
