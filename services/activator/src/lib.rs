//! Herald activator: delivers processed events to each destination from that destination's own
//! durable consumers, so one slow destination never holds up another. An ordered destination has
//! one consumer per partition, delivered by the replica that owns the partition in the
//! `activator` member list, so each user's events arrive in order and 1 or 3 replicas is a
//! deployment choice; an unordered one has one consumer every replica pulls (see the `worker`
//! module). Transient failures are retried in process with backoff, behind a per-destination
//! circuit breaker and rate limit, and what a destination refuses for good, or what runs out
//! of attempts or age, goes to the DLQ (`<PREFIX>_DLQ`, `herald.v1.DlqService`) so the user's
//! next events carry on. Each event's outcome per destination other than a plain delivery is kept
//! in the delivery-status bucket (`herald.v1.DeliveryStatusService`; every delivery too with
//! `activator.delivery_status_delivered`). The `deliver` module has the details.
//!
//! Destinations are live config: records in the config bucket (`destinations.<id>`, see
//! [`record`]), changed through `herald.v1.DestinationService` ([`DestinationStore`]) and
//! followed by every replica through a KV watch, which starts, restarts, pauses and deletes
//! delivery loops without a restart. Config-file destinations are seeded into the bucket.
//!
//! Consent is enforced at send time: every replica follows the processor's consent bucket, and
//! every send attempt, retries included, checks the event's consent snapshot and the person's
//! current consent with the destination's [`filter::ConsentPolicy`], and refuses events of
//! suppressed or erased identities ([`suppressions`]); an erasure reaches each destination once
//! per person ([`erasure`]). NATS subject destinations republish events to a subject
//! ([`destinations::nats`]). `herald.v1.ReplayService` re-sends a time window of processed events
//! to one destination ([`replay`]).

mod breaker;
mod config;
mod consent;
mod deliver;
pub mod destinations;
mod dlq;
mod dlq_grpc;
mod erasure;
mod events;
pub mod filter;
mod grpc;
mod live;
pub mod payload;
pub mod record;
mod replay;
mod status;
mod store;
mod suppressions;
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
pub use consent::CONSENT_LOADED_CHECK;
pub use grpc::{SERVICE_NAME, from_proto, to_proto};
pub use live::DESTINATIONS_LOADED_CHECK;
pub use record::{DestinationRecord, Settings, Start};
pub use store::{DestinationError, DestinationStore, KEY_PREFIX};
pub use suppressions::SUPPRESSIONS_LOADED_CHECK;
pub use worker::{consumer_name, partition_consumer_name};

/// The readiness check flipped once the delivery-status bucket exists.
const DELIVERY_BUCKET_CHECK: &str = "delivery status bucket";

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

/// Starts the activator: joins the `activator` member list and runs the delivery loops of every
/// live destination (one per owned partition when ordered, one when unordered), plus the gRPC
/// and admin servers, until `shutdown` fires. The handle's task ends once every delivery loop has settled its
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
    cfg.ownership
        .validate()
        .map_err(|e| ActivatorError::Config(e.to_string()))?;
    let auth = herald_common::auth::ControlAuth::from_config(&common.control)
        .map_err(|e| ActivatorError::Config(e.to_string()))?;
    let guard = Arc::new(destinations::NetworkGuard::new(&cfg.allow_private_networks));
    // Config-file destinations are checked here, so a broken entry stops the start.
    let mut deprecated = Vec::new();
    for d in &cfg.destinations {
        let keys = d.deprecated_keys();
        if !keys.is_empty() {
            deprecated.push(format!("{}: {}", d.id, keys.join(", ")));
        }
        destinations::Sender::new(&d.to_record(chrono::Utc::now()), &guard)
            .await
            .map_err(ActivatorError::Config)?;
    }
    if !deprecated.is_empty() {
        events::DeprecatedDestinationKeys {
            uses: &deprecated.join("; "),
        }
        .emit();
    }
    let grpc_listener = server::bind(&cfg.grpc_addr).await?;
    let admin_listener = server::bind(&cfg.admin_addr).await?;
    let grpc_addr = server::local_addr(&grpc_listener);
    let admin_addr = server::local_addr(&admin_listener);

    events::describe(cfg.destinations.iter().map(|d| d.id.as_str()));
    let client = nats::connect(&common.nats, "herald-activator").await?;
    let js = nats::jetstream(client.clone(), &common.nats);
    let topology = Topology::new(common.topology.clone());
    // Ready once the destinations and the consent are loaded and the config file's are bound.
    let mut checks: Vec<String> = cfg
        .destinations
        .iter()
        .map(|d| worker::readiness_check(&d.id))
        .collect();
    checks.push(live::DESTINATIONS_LOADED_CHECK.to_string());
    checks.push(consent::CONSENT_LOADED_CHECK.to_string());
    checks.push(suppressions::SUPPRESSIONS_LOADED_CHECK.to_string());
    checks.push(dlq::DLQ_STREAM_CHECK.to_string());
    checks.push(DELIVERY_BUCKET_CHECK.to_string());
    let check_refs: Vec<&str> = checks.iter().map(String::as_str).collect();
    let ready = Readiness::new(client.clone(), &check_refs);

    let mut supervisor = Supervisor::new(
        "activator",
        &shutdown,
        Duration::from_secs(cfg.shutdown_timeout_seconds),
    );
    let stop = supervisor.token();
    // Each destination's loop finishes the batch in hand (or leaves it unacked) before the
    // live task ends.
    let store = DestinationStore::new(guard.clone());
    let stats = live::StatsMap::default();
    let consent = consent::ConsentCache::default();
    let suppressed = Arc::new(herald_common::suppressions::Suppressions::default());
    let erasures = erasure::ErasureLedger::default();
    supervisor.spawn_task(
        "suppressions",
        suppressions::run(
            suppressed.clone(),
            erasures.clone(),
            js.clone(),
            topology.clone(),
            ready.clone(),
            stop.clone(),
        ),
    );
    let status = status::StatusStore::new(
        js.clone(),
        &topology,
        Duration::from_secs(cfg.delivery_status_ttl_seconds),
        cfg.delivery_status_delivered,
    );
    {
        let (status, ready, stop, replicas) = (
            status.clone(),
            ready.clone(),
            stop.clone(),
            common.topology.replicas,
        );
        supervisor.spawn_task("delivery status bucket", async move {
            if nats::retry_until("creating the delivery-status bucket", &stop, || {
                status.ensure_bucket(replicas)
            })
            .await
            .is_some()
            {
                ready.set(DELIVERY_BUCKET_CHECK, true);
            }
        });
    }
    let deps = deliver::DeliveryDeps {
        js: js.clone(),
        topology: topology.clone(),
        cfg: cfg.clone(),
        guard,
        consent: consent.clone(),
        suppressions: suppressed,
        erasures,
        status: status.clone(),
        in_flight: deliver::InFlight::default(),
    };
    supervisor.spawn_task(
        "consent",
        consent::run(
            consent,
            js.clone(),
            topology.clone(),
            ready.clone(),
            stop.clone(),
        ),
    );
    supervisor.spawn_task(
        "dlq",
        dlq::run(
            js.clone(),
            topology.clone(),
            ready.clone(),
            stats.clone(),
            stop.clone(),
        ),
    );
    supervisor.spawn_task(
        "destinations",
        live::run(
            store.clone(),
            live::Shared {
                js: js.clone(),
                topology: topology.clone(),
                cfg: cfg.clone(),
                ready: ready.clone(),
                stats: stats.clone(),
                deps: deps.clone(),
            },
            cfg.destinations.clone(),
            stop.clone(),
        ),
    );
    let replays = replay::ReplayGrpc {
        store: store.clone(),
        deps: deps.clone(),
        topology: topology.clone(),
        cfg: cfg.clone(),
        stop: stop.clone(),
    };
    let dlq_control = dlq_grpc::DlqGrpc {
        js: js.clone(),
        topology: topology.clone(),
        store: store.clone(),
        deps,
        status: status.clone(),
    };
    let status_control = status::StatusGrpc {
        status,
        store: store.clone(),
        js: js.clone(),
        topology: topology.clone(),
    };
    let control = grpc::DestinationGrpc {
        store,
        stats,
        js,
        topology,
    };
    let routes = tonic::service::Routes::new(control.into_server())
        .add_service(replays.into_server())
        .add_service(dlq_control.into_server())
        .add_service(status_control.into_server());
    supervisor.spawn(
        "grpc",
        server::serve_grpc(
            grpc_listener,
            routes,
            grpc::SERVICE_NAME,
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
