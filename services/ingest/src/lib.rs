//! Herald ingest: takes events in over HTTP (Segment Tracking API, mParticle Events API) and
//! NATS intake (Segment JSON, mParticle JSON or protobuf `herald.v1.Event`), normalises them
//! into `herald.v1.Event`, and answers only after JetStream has stored every one of them.
//!
//! [`start`] runs the whole service (HTTP, NATS intake, gRPC control API, admin); [`router`] is
//! the HTTP API alone, for tests that drive it with `oneshot`. The modules are private; what
//! tests, fuzz targets, the CLI and benchmarks use is re-exported below.

#![warn(missing_docs)]

mod body;
mod config;
mod core;
mod error;
pub mod events;
mod grpc;
mod http;
mod intake;
mod mparticle;
mod normalise;
mod protobuf;
mod publish;
mod quarantine;
mod quarantine_service;
mod ratelimit;
mod requests;
mod seen;
mod segment;
mod source_registry;
mod source_store;
mod source_sync;

use std::time::Duration;

use herald_common::CommonConfig;
use herald_common::admin::{self, Readiness};
use herald_common::nats::{connect, ensure_stream, jetstream, retry_until};
use herald_common::server::{ServiceHandle, bind, local_addr, serve_grpc, serve_http};
use herald_common::supervisor::Supervisor;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::core::Core;

pub use crate::body::{Encoding, JsonScan, check_depth, decode as decode_body, scan as scan_body};
pub use crate::config::{IngestConfig, SourceConfig, SourceSettings};
pub use crate::error::{ApiError, IngestError};
pub use crate::http::{AppState, SEGMENT_SINGLE_ROUTES, router};
pub use crate::mparticle::{Batch as MparticleBatch, mark_historical, parse as parse_mparticle};
pub use crate::normalise::{Decoded, InvalidEvent, Normaliser, Reason, Rejected};
pub use crate::publish::{BATCH_ID_HEADER, BATCH_SEQUENCE_HEADER, Publisher};
pub use crate::quarantine::stream_config as quarantine_stream_config;
pub use crate::seen::SeenSet;
pub use crate::segment::{
    Envelope, RawBatch, Shape as SegmentShape, call_type, parse_batch, parse_batch_raw,
    parse_single,
};

/// The decoders, one per wire format, each returning a [`Decoded`].
pub mod decode {
    pub use crate::mparticle::decode as mparticle;
    pub use crate::protobuf::decode as protobuf;
    pub use crate::segment::decode as segment;
}

/// The readiness check flipped once the events stream exists with Herald's config.
pub const EVENTS_STREAM_CHECK: &str = "events stream";

/// Starts the ingest service: binds its HTTP, gRPC and admin listeners (port 0 allowed; the
/// handle reports the real addresses), connects to NATS (retrying in the background),
/// provisions the events stream in the background (then `/readyz` turns ready), and serves
/// until `shutdown`. The handle's task ends when its servers and tasks have stopped and the NATS
/// client has drained, or once `ingest.shutdown_timeout_seconds` has passed (see
/// [`herald_common::supervisor`]).
pub async fn start(
    common: &CommonConfig,
    cfg: &IngestConfig,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<ServiceHandle, IngestError> {
    events::describe_metrics();
    events::publish_source_series(cfg.sources.iter().map(|s| s.id.as_str()));
    common.topology.validate()?;
    let auth = herald_common::auth::ControlAuth::from_config(&common.control)?;
    let http_listener = bind(&cfg.http_addr).await?;
    let grpc_listener = bind(&cfg.grpc_addr).await?;
    let admin_listener = bind(&cfg.admin_addr).await?;
    let (http_addr, grpc_addr, admin_addr) = (
        local_addr(&http_listener),
        local_addr(&grpc_listener),
        local_addr(&admin_listener),
    );

    let client = connect(&common.nats, "herald-ingest").await?;
    let core = Core::new(common, cfg, client.clone())?;
    let state = AppState::with_core(common, cfg, core.clone())?;
    let readiness = Readiness::new(
        client.clone(),
        &[
            EVENTS_STREAM_CHECK,
            source_sync::SOURCES_LOADED_CHECK,
            quarantine::STREAM_CHECK,
            intake::CONSUMER_CHECK,
        ],
    );
    // Sources come from the config bucket (seeded from `cfg.sources`), watched from now on.
    state.sources().await_bucket();
    let source_store = source_store::SourceStore::new(state.sources().clone());

    // One failing server or task stops the others; the caller's token stops them all, and
    // shutdown (in-flight requests answered, the intake batch settled, NATS drained) is bounded
    // by `ingest.shutdown_timeout_seconds`.
    let mut supervisor = Supervisor::new(
        "ingest",
        &shutdown,
        Duration::from_secs(cfg.shutdown_timeout_seconds),
    );
    let stop = supervisor.token();

    let js = jetstream(client.clone(), &common.nats);
    supervisor.spawn_task(
        "sources sync",
        source_sync::sync(
            source_store.clone(),
            js.clone(),
            state.topology().clone(),
            cfg.sources.clone(),
            readiness.clone(),
            stop.clone(),
        ),
    );
    // NATS intake and the quarantine: their streams, the intake consumer, the gRPC service.
    let intake = intake::Intake::new(core);
    let quarantine_grpc = quarantine_service::QuarantineGrpc::new(intake.clone(), js.clone());
    // The intake finishes its batch (or leaves it unacked for redelivery) before it ends.
    supervisor.spawn_task(
        "intake",
        intake.run(js.clone(), readiness.clone(), stop.clone()),
    );
    let stream_config = state.topology().events_stream_config();
    supervisor.spawn_task("events stream", {
        let stop = stop.clone();
        let readiness = readiness.clone();
        async move {
            let name = stream_config.name.clone();
            let created = retry_until("creating the events stream", &stop, || {
                ensure_stream(&js, stream_config.clone())
            })
            .await;
            if created.is_some() {
                events::StreamProvisioned { stream: &name }.emit();
                readiness.set(EVENTS_STREAM_CHECK, true);
            }
        }
    });

    supervisor.spawn(
        "http",
        serve_http(http_listener, router(state.clone()), stop.clone()),
    );
    supervisor.spawn(
        "grpc",
        serve_grpc(
            grpc_listener,
            tonic::service::Routes::new(grpc::SourceGrpc::new(source_store).into_server())
                .add_service(quarantine_grpc.into_server()),
            grpc::SERVICE_NAME,
            auth,
            stop.clone(),
        ),
    );
    supervisor.spawn(
        "admin",
        serve_http(admin_listener, admin::router(metrics, readiness), stop),
    );
    Ok(supervisor.finish(client, Some(http_addr), grpc_addr, admin_addr))
}
