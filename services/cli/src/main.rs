//! `herald`: the one binary. Runs one service role, all of them (`herald dev`), and admin
//! commands over the control APIs. (The load generator is its own binary, `herald-bench`.)

mod config;
mod control;
mod dev;
mod profile_cmd;
mod quarantine_cmd;
mod sources_cmd;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use herald_common::{server, telemetry};

use crate::config::Config;

/// mimalloc: per-thread heaps without glibc's arena lock (which took a quarter of ingest's
/// samples under load) and much less fragmentation under many small allocations. Built without
/// the `mimalloc` feature, the system allocator (for heap profilers that hook malloc).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: a real-time customer data pipeline on NATS JetStream"
)]
struct Cli {
    /// TOML config file (layered over defaults; HERALD__SECTION__KEY env vars win).
    #[arg(long, short, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC URL of the ingest control API.
    #[arg(
        long,
        global = true,
        env = "HERALD_INGEST_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    ingest_url: String,
    /// gRPC URL of the processor control API.
    #[arg(
        long,
        global = true,
        env = "HERALD_PROCESSOR_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    processor_url: String,
    /// gRPC URL of the activator control API.
    #[arg(
        long,
        global = true,
        env = "HERALD_ACTIVATOR_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    activator_url: String,
    /// Bearer token of the control APIs (default: ./.herald/token, written by `herald dev`).
    #[arg(long, global = true, env = "HERALD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the ingest service (Segment and mParticle HTTP APIs).
    Ingest,
    /// Run the processor service.
    Processor,
    /// Run the activator service.
    Activator,
    /// Run nats-server and all three services in one process, with a default source and a
    /// log destination.
    Dev(dev::DevArgs),
    /// Sources (ingest control API).
    #[command(subcommand)]
    Sources(sources_cmd::SourcesCommand),
    /// What ingest could not accept: list and redrive (ingest control API).
    #[command(subcommand)]
    Quarantine(quarantine_cmd::QuarantineCommand),
    /// The processor's consumer position and counters.
    Status,
    /// Profiles (processor ProfileService): `herald profile get <type>:<value>`.
    #[command(subcommand)]
    Profile(profile_cmd::ProfileCommand),
    /// Erase a person (GDPR/CCPA) given any identity `<type>:<value>`: deletes the profile and
    /// its identity mappings, suppresses its identities, publishes an erasure event.
    Erase {
        /// `<type>:<value>`, e.g. `email:ann@example.com`.
        identity: String,
    },
    /// Suppress an identity `<type>:<value>` and every identity of its profile: their events
    /// are dropped until unsuppressed.
    Suppress {
        /// `<type>:<value>`, e.g. `user_id:42`.
        identity: String,
    },
    /// Lift the suppression of an identity `<type>:<value>` (and of those suppressed with it).
    Unsuppress {
        /// `<type>:<value>`, e.g. `user_id:42`.
        identity: String,
    },
    /// Erasure requests: `herald erasure status <request id>`.
    #[command(subcommand)]
    Erasure(profile_cmd::ErasureCommand),
    /// Destinations (activator control API).
    #[command(subcommand)]
    Destinations(DestinationsCommand),
}

#[derive(Debug, Subcommand)]
enum DestinationsCommand {
    /// List destinations with their backlog and delivery counters.
    List,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let file = cli.config.as_deref();
    let ctl = control::Control {
        ingest_url: cli.ingest_url.clone(),
        processor_url: cli.processor_url.clone(),
        activator_url: cli.activator_url.clone(),
        token: cli.token.clone(),
    };
    match cli.command {
        Command::Ingest => {
            let cfg = Config::load(file, None)?;
            telemetry::init_tracing(&cfg.log);
            let h = herald_ingest::start(
                &cfg.common(),
                &cfg.ingest,
                telemetry::metrics(),
                server::shutdown_on_signals(),
            )
            .await
            .context("starting ingest")?;
            h.task.await?;
        }
        Command::Processor => {
            let cfg = Config::load(file, None)?;
            telemetry::init_tracing(&cfg.log);
            let h = herald_processor::start(
                &cfg.common(),
                &cfg.processor,
                telemetry::metrics(),
                server::shutdown_on_signals(),
            )
            .await
            .context("starting the processor")?;
            h.task.await?;
        }
        Command::Activator => {
            let cfg = Config::load(file, None)?;
            telemetry::init_tracing(&cfg.log);
            let h = herald_activator::start(
                &cfg.common(),
                &cfg.activator,
                telemetry::metrics(),
                server::shutdown_on_signals(),
            )
            .await
            .context("starting the activator")?;
            h.task.await?;
        }
        Command::Dev(args) => dev::run(file, args).await?,
        Command::Sources(cmd) => sources_cmd::run(cmd, &ctl).await?,
        Command::Quarantine(cmd) => quarantine_cmd::run(cmd, &ctl).await?,
        Command::Status => control::processor_status(&ctl).await?,
        Command::Profile(cmd) => profile_cmd::profile(cmd, &ctl).await?,
        Command::Erase { identity } => profile_cmd::erase(&identity, &ctl).await?,
        Command::Suppress { identity } => profile_cmd::suppress(&identity, &ctl).await?,
        Command::Unsuppress { identity } => profile_cmd::unsuppress(&identity, &ctl).await?,
        Command::Erasure(cmd) => profile_cmd::erasure(cmd, &ctl).await?,
        Command::Destinations(DestinationsCommand::List) => {
            control::destinations_list(&ctl).await?
        }
    }
    Ok(())
}
