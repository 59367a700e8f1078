//! Herald activator: delivers processed events to each configured destination from that
//! destination's own durable consumer, so one slow destination never holds up another. Each
//! user's events arrive in order; failed sends are retried in process with backoff.

mod config;
pub mod destinations;
mod events;
mod grpc;
pub mod payload;
mod worker;

use std::sync::Arc;

use herald_common::admin::{self, Readiness};
use herald_common::server::{self, ServiceHandle};
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
/// until `shutdown` fires.
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
    let mut senders = Vec::with_capacity(cfg.destinations.len());
    for d in &cfg.destinations {
        let sender = destinations::Sender::new(d).map_err(ActivatorError::Config)?;
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

    let mut workers = Vec::new();
    for (dest, sender, stats) in &senders {
        workers.push(tokio::spawn(worker::run(
            js.clone(),
            topology.clone(),
            cfg.clone(),
            dest.clone(),
            sender.clone(),
            stats.clone(),
            ready.clone(),
            shutdown.clone(),
        )));
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
    let grpc = tokio::spawn(server::serve_grpc(
        grpc_listener,
        routes,
        "herald.v1.ActivatorService",
        auth,
        shutdown.clone(),
    ));
    let admin = tokio::spawn(server::serve_http(
        admin_listener,
        admin::router(metrics, ready),
        shutdown.clone(),
    ));
    let task = tokio::spawn(async move {
        for w in workers {
            if let Err(e) = w.await {
                tracing::error!(error = %e, "destination worker panicked");
            }
        }
        for (name, res) in [("gRPC", grpc.await), ("admin", admin.await)] {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, server = name, "server failed"),
                Err(e) => tracing::error!(error = %e, server = name, "server panicked"),
            }
        }
        if let Err(e) = client.drain().await {
            tracing::debug!(error = %e, "draining the NATS connection failed");
        }
        tracing::info!("activator stopped");
    });
    Ok(ServiceHandle {
        name: "activator",
        http_addr: None,
        grpc_addr,
        admin_addr,
        task,
    })
}
