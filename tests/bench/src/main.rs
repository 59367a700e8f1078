//! `herald-bench`: the load generator, a binary of its own so that the service image does not
//! carry it. Each mode starts its own nats-server (through `herald_common::natsbin`, like
//! `herald dev`) and the Herald service under test: ingest in this process (through the same
//! library `start` function as the `herald` binary), the processor as a `herald processor`
//! child. It measures the service, and raw JetStream doing the same work in the same run, so
//! every number comes with its ratio to NATS itself on the same machine. See
//! docs/benchmarks.md.
//!
//! Progress goes to stderr once a second; results go to stdout, ending with one JSON line.

mod child;
mod events;
mod ingest;
mod nats;
mod pipeline;
mod processor;
mod report;
mod soak;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, consumer};
use clap::Parser;
use herald_common::{
    CommonConfig, ControlConfig, LogConfig, NatsConfig, Topology, TopologyConfig, telemetry,
};
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// mimalloc, as in the `herald` binary: the ingest bench runs ingest in this process, so it is
/// measured with the allocator it ships with.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: herald_common::alloc::MiMalloc = herald_common::alloc::MiMalloc;

/// Herald's load generator.
#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "Herald's load generator: throughput and latency as a ratio of raw JetStream, \
             measured in the same run against its own nats-server"
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
enum BenchCommand {
    /// Ingest over HTTP (Segment batches) against raw pipelined JetStream publishing.
    Ingest(ingest::IngestArgs),
    /// The processor against raw JetStream consume-and-publish, with and without KV work.
    Processor(processor::ProcessorArgs),
    /// The whole pipeline (ingest, processor, activator as processes, a webhook sink) against
    /// a raw three-hop JetStream chain: highest sustained rates, freshness, stage split.
    Pipeline(pipeline::PipelineArgs),
    /// Herald alone at one offered rate for a long time (30 minutes by default): resident
    /// memory of every process sampled throughout, its slope after a warm-up, freshness.
    Soak(soak::SoakArgs),
}

/// A failed run prints its error chain on one line, without a backtrace (even with
/// `RUST_BACKTRACE` set), and exits with 1.
#[tokio::main]
async fn main() -> ExitCode {
    #[cfg(feature = "mimalloc")]
    herald_common::alloc::tune();
    match run(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("herald-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one benchmark; Ctrl-C stops it (and its nats-server).
async fn run(cmd: BenchCommand) -> Result<()> {
    telemetry::init_tracing(&LogConfig {
        filter: Some("warn".into()),
        json: false,
    });
    let bench = async {
        match cmd {
            BenchCommand::Ingest(args) => ingest::run(args).await,
            BenchCommand::Processor(args) => processor::run(args).await,
            BenchCommand::Pipeline(args) => pipeline::run(args).await,
            BenchCommand::Soak(args) => soak::run(args).await,
        }
    };
    tokio::select! {
        res = bench => res,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

/// `n` random bytes as lower-case hex.
fn random_hex(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// The bench's shared sections: default topology, the bench's nats-server, a random control
/// token.
fn common_config(nats_url: &str) -> (Topology, CommonConfig) {
    let topology = TopologyConfig::default();
    let common = CommonConfig {
        nats: NatsConfig {
            servers: nats_url.to_owned(),
            ..Default::default()
        },
        topology: topology.clone(),
        control: ControlConfig::with_token(random_hex(16)),
    };
    (Topology::new(topology), common)
}

/// A service config with every listener (`*_addr`) moved to a free loopback port, whatever
/// listeners the service has today.
fn on_loopback<T: Serialize + DeserializeOwned>(cfg: &T) -> Result<T> {
    let mut v = serde_json::to_value(cfg)?;
    if let Some(obj) = v.as_object_mut() {
        for (key, value) in obj.iter_mut() {
            if key.ends_with("_addr") && value.is_string() {
                *value = "127.0.0.1:0".into();
            }
        }
    }
    Ok(serde_json::from_value(v)?)
}

/// Waits until a service's `/readyz` answers 200 (60 s deadline).
async fn wait_ready(name: &str, admin: SocketAddr) -> Result<()> {
    let url = format!("http://{admin}/readyz");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if Instant::now() > deadline => {
                bail!(
                    "{name} did not become ready within 60 s: {}",
                    r.text().await.unwrap_or_default()
                )
            }
            Err(e) if Instant::now() > deadline => {
                bail!("{name} did not become ready within 60 s: {e}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Creates a durable consumer that never reads: on an interest-retention stream it makes the
/// server store what is published (with no consumer at all, JetStream drops each message as
/// soon as it is acknowledged, which would flatter the publish numbers).
async fn hold_interest(js: &jetstream::Context, stream: &str) -> Result<()> {
    js.get_stream(stream)
        .await
        .with_context(|| format!("stream {stream}"))?
        .get_or_create_consumer(
            "bench-hold",
            consumer::pull::Config {
                durable_name: Some("bench-hold".into()),
                description: Some(
                    "herald-bench: holds interest so the stream stores what is published".into(),
                ),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("creating the holding consumer on {stream}"))?;
    Ok(())
}

/// Creates a stream with `like`'s settings (retention, limits, storage) under another name,
/// on the subjects `<subject_prefix>.*`.
async fn create_stream_like(
    js: &jetstream::Context,
    mut like: jetstream::stream::Config,
    name: &str,
    subject_prefix: &str,
    what: &str,
) -> Result<()> {
    like.name = name.into();
    like.subjects = vec![format!("{subject_prefix}.*")];
    like.description = Some(format!("herald-bench: {what}"));
    js.create_stream(like)
        .await
        .with_context(|| format!("creating the {what} stream {name}"))?;
    Ok(())
}

/// Messages and bytes a stream holds.
async fn stream_state(js: &jetstream::Context, stream: &str) -> Result<(u64, u64)> {
    let mut s = js.get_stream(stream).await?;
    let info = s.info().await?;
    Ok((info.state.messages, info.state.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
    struct Cfg {
        http_addr: String,
        admin_addr: String,
        name: String,
    }

    #[test]
    fn every_listener_moves_to_a_free_loopback_port() {
        let cfg = Cfg {
            http_addr: "0.0.0.0:8080".into(),
            admin_addr: "0.0.0.0:9091".into(),
            name: "x_addr".into(),
        };
        let moved = on_loopback(&cfg).expect("round trip");
        assert_eq!(moved.http_addr, "127.0.0.1:0");
        assert_eq!(moved.admin_addr, "127.0.0.1:0");
        assert_eq!(moved.name, "x_addr");
    }

    #[test]
    fn random_hex_has_the_asked_length() {
        assert_eq!(random_hex(4).len(), 8);
        assert_ne!(random_hex(8), random_hex(8));
    }
}
