//! Herald activator: delivers processed events to each configured destination from that
//! destination's own durable consumer, so one slow destination never holds up another. Each
//! user's events arrive in order; failed sends are retried in process with backoff.

mod config;
pub mod destinations;
mod events;
pub mod filter;
mod grpc;
pub mod payload;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use herald_common::admin::{self, Readiness};
use herald_common::server::{self, ServiceHandle};
use herald_common::supervisor::Supervisor;
use herald_common::telemetry::PrometheusHandle;
use herald_common::{CommonConfig, Topology, nats};
use tokio_util::sync::CancellationToken;

pub use config::{ActivatorConfig, DestinationConfig, DestinationKind};
pub use worker::consumer_name;

/// Errors that stop the activator from starting.
#[derive(Debug, thiserror::Error)]
pub enum ActivatorError {
    /// A listener could not be bound, or a server failed.
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    /// NATS could not be set up.
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    /// The configuration is unusable.
    #[error("invalid activator configuration: {0}")]
    Config(String),
}

/// Starts the activator: one delivery loop per destination, plus the gRPC and admin servers,
/// until `shutdown` fires. The handle's task ends once every delivery loop has settled its
/// batch, the servers have stopped and NATS has drained, or after
/// `activator.shutdown_timeout_seconds` (see [`herald_common::supervisor`]); a failing server or
/// task stops the whole service.
pub async fn start(
    common: &CommonConfig,
    cfg: &ActivatorConfig,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<ServiceHandle, ActivatorError> {
    common
        .topology
        .validate()
        .map_err(|e| ActivatorError::Config(e.to_string()))?;
    let auth = herald_common::auth::ControlAuth::from_config(&common.control)
        .map_err(|e| ActivatorError::Config(e.to_string()))?;
    let guard = Arc::new(destinations::NetworkGuard::new(&cfg.allow_private_networks));
    let mut senders = Vec::with_capacity(cfg.destinations.len());
    for d in &cfg.destinations {
        let sender = destinations::Sender::new(d, &guard)
            .await
            .map_err(ActivatorError::Config)?;
        senders.push((
            d.clone(),
            Arc::new(sender),
            Arc::new(worker::DestinationStats::default()),
        ));
    }
    let grpc_listener = server::bind(&cfg.grpc_addr).await?;
    let admin_listener = server::bind(&cfg.admin_addr).await?;
    let grpc_addr = server::local_addr(&grpc_listener);
    let admin_addr = server::local_addr(&admin_listener);

    events::describe();
    let client = nats::connect(&common.nats, "herald-activator").await?;
    let js = nats::jetstream(client.clone(), &common.nats);
    let topology = Topology::new(common.topology.clone());
    let checks: Vec<String> = cfg
        .destinations
        .iter()
        .map(|d| worker::readiness_check(&d.id))
        .collect();
    let check_refs: Vec<&str> = checks.iter().map(String::as_str).collect();
    let ready = Readiness::new(client.clone(), &check_refs);

    let mut supervisor = Supervisor::new(
        "activator",
        &shutdown,
        Duration::from_secs(cfg.shutdown_timeout_seconds),
    );
    let stop = supervisor.token();
    // Each destination's worker finishes the batch in hand (or leaves it unacked) before it ends.
    for (dest, sender, stats) in &senders {
        supervisor.spawn_task(
            format!("destination {}", dest.id),
            worker::run(
                js.clone(),
                topology.clone(),
                cfg.clone(),
                dest.clone(),
                sender.clone(),
                stats.clone(),
                ready.clone(),
                stop.clone(),
            ),
        );
    }
    let control = grpc::Control {
        destinations: senders
            .iter()
            .map(|(d, _, s)| (d.clone(), s.clone()))
            .collect(),
    };
    let routes = tonic::service::Routes::new(
        herald_proto::v1::activator_service_server::ActivatorServiceServer::new(control),
    );
    supervisor.spawn(
        "grpc",
        server::serve_grpc(
            grpc_listener,
            routes,
            "herald.v1.ActivatorService",
            auth,
            stop.clone(),
        ),
    );
    supervisor.spawn(
        "admin",
        server::serve_http(admin_listener, admin::router(metrics, ready), stop),
    );
    Ok(supervisor.finish(client, None, grpc_addr, admin_addr))
}
