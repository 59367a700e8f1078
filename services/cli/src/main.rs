//! `herald`: the one binary. Runs one service role, all of them (`herald dev`), admin commands
//! over the control APIs, and the load generator.

mod config;
mod control;
mod dev;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use herald_common::{server, telemetry};

use crate::config::Config;

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
    Sources(SourcesCommand),
    /// The processor's consumer position and counters.
    Status,
    /// Destinations (activator control API).
    #[command(subcommand)]
    Destinations(DestinationsCommand),
}

#[derive(Debug, Subcommand)]
enum SourcesCommand {
    /// List sources.
    List,
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
        Command::Sources(SourcesCommand::List) => control::sources_list(&cli.ingest_url).await?,
        Command::Status => control::processor_status(&cli.processor_url).await?,
        Command::Destinations(DestinationsCommand::List) => {
            control::destinations_list(&cli.activator_url).await?
        }
    }
    Ok(())
}
