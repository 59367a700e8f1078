//! Herald processor: reads events from the events stream in order, resolves each event to a
//! profile, and publishes a `ProcessedEvent` per event on the processed stream. Inputs are acked
//! only after the outputs' PubAcks.
//!
//! Identity resolution (`identity`, `resolver`): an identity graph in KV maps every identity to
//! a profile; profiles merge when an event links two of them (the older survives, the other
//! becomes a redirect), by compare-and-set only. Profiles (`profile`) keep traits by event time,
//! counts and consent (`consent`); a consent change is published as its own event. Erasure and
//! suppression (`erasure`) are served by `ProfileService` (gRPC) next to `ProcessorService`, and
//! profiles also over HTTP (`http`).

mod cache;
mod config;
mod consent;
mod erasure;
mod events;
mod group;
mod grpc;
mod http;
mod identity;
mod output;
mod partitions;
mod profile;
mod profile_grpc;
mod profiles_config;
mod resolver;
mod store;
mod timestamp;
mod worker;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use herald_common::admin::{self, Readiness};
use herald_common::server::{self, ServiceHandle};
use herald_common::supervisor::Supervisor;
use herald_common::telemetry::PrometheusHandle;
use herald_common::{CommonConfig, Topology, nats};
use tokio_util::sync::CancellationToken;

pub use config::ProcessorConfig;
pub use group::KeyEvents;
pub use identity::IdentityKey;
pub use profile::Profile;
pub use profiles_config::ProfilesConfig;
pub use resolver::{Outcome, Profiles};
pub use store::{ErasureRecord, ErasureState, ProfileError};

/// Errors that stop the processor from starting.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// A listener could not be bound, or a server failed.
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    /// NATS could not be set up.
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] herald_common::ConfigError),
}

/// Counters shared by the worker and the control API.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub processed: AtomicU64,
}

/// Starts the processor: binds its ports, connects to NATS, provisions the processed stream and
/// the events consumer, and processes until `shutdown` fires. The handle's task ends once the
/// worker has handed its partitions over, the servers have stopped and NATS has drained, or
/// after `processor.shutdown_timeout_seconds` (see [`herald_common::supervisor`]); a failing
/// server or task stops the whole service.
pub async fn start(
    common: &CommonConfig,
    cfg: &ProcessorConfig,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<ServiceHandle, ProcessorError> {
    common.topology.validate()?;
    cfg.ownership.validate()?;
    let auth = herald_common::auth::ControlAuth::from_config(&common.control)?;
    let grpc_listener = server::bind(&cfg.grpc_addr).await?;
    let http_listener = server::bind(&cfg.http_addr).await?;
    let http_addr = server::local_addr(&http_listener);
    let admin_listener = server::bind(&cfg.admin_addr).await?;
    let grpc_addr = server::local_addr(&grpc_listener);
    let admin_addr = server::local_addr(&admin_listener);

    events::describe();
    events::describe_ownership(common.topology.partitions);
    let client = nats::connect(&common.nats, "herald-processor").await?;
    let js = nats::jetstream(client.clone(), &common.nats);
    let topology = Topology::new(common.topology.clone());
    let ready = Readiness::new(client.clone(), &["processed stream", "events consumer"]);
    let stats = Arc::new(Stats::default());
    let partitions = Arc::new(partitions::Partitions::new(cfg.durable.clone()));
    let profiles = resolver::Profiles::new(js.clone(), topology.clone(), cfg.profiles.clone());

    let mut supervisor = Supervisor::new(
        "processor",
        &shutdown,
        Duration::from_secs(cfg.shutdown_timeout_seconds),
    );
    let stop = supervisor.token();
    supervisor.spawn_task(
        "profile store",
        profiles.clone().run(ready.clone(), stop.clone()),
    );
    // The worker hands its partitions over: the batch in hand is finished, the rest given back.
    supervisor.spawn_task(
        "worker",
        worker::run(
            js.clone(),
            topology,
            cfg.clone(),
            ready.clone(),
            stats.clone(),
            partitions.clone(),
            profiles.clone(),
            stop.clone(),
        ),
    );
    let routes = tonic::service::Routes::new(
        herald_proto::v1::processor_service_server::ProcessorServiceServer::new(grpc::Control {
            stats,
            partitions,
        }),
    )
    .add_service(
        herald_proto::v1::profile_service_server::ProfileServiceServer::new(
            profile_grpc::ProfileControl {
                profiles: profiles.clone(),
            },
        ),
    );
    supervisor.spawn(
        "grpc",
        server::serve_grpc(
            grpc_listener,
            routes,
            "herald.v1.ProcessorService",
            auth.clone(),
            stop.clone(),
        ),
    );
    supervisor.spawn(
        "http",
        server::serve_http(http_listener, http::router(profiles, auth), stop.clone()),
    );
    supervisor.spawn(
        "admin",
        server::serve_http(admin_listener, admin::router(metrics, ready), stop),
    );
    Ok(supervisor.finish(client, Some(http_addr), grpc_addr, admin_addr))
}
