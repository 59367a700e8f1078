//! The processor's config section (`[processor]`, env `HERALD__PROCESSOR__*`).

use serde::{Deserialize, Serialize};

/// Settings of the processor service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// gRPC control address.
    pub grpc_addr: String,
    /// HTTP address of the profile API (`GET /v1/profiles/{identity_type}/{value}`).
    pub http_addr: String,
    /// Admin address (`/healthz`, `/readyz`, `/metrics`).
    pub admin_addr: String,
    /// Base name of the durable consumers on the events stream: partition `N` is read through
    /// `<durable>-p<N>`, and replicas join the members bucket under the role `processor`.
    pub durable: String,
    /// Ack wait of the consumers: how soon a crashed replica's in-flight messages are
    /// redelivered to the partitions' new owners.
    pub ack_wait_seconds: u64,
    /// Most events handled in one batch.
    pub batch_size: usize,
    /// Most events of one batch resolved at once (events of different partition keys; one
    /// key's events are always resolved one after another), per partition. Each costs a few
    /// KiB of state while it waits on KV: 16 partitions x 64 is about 8 MiB. More only helps
    /// when KV round trips, not CPU, limit the rate.
    pub concurrency: usize,
    /// Most events delivered and not yet acked, per partition consumer. It also bounds what a
    /// reader holds in memory while its gate is closed after it was pinned (the gate opens
    /// once the consumer has nothing pending but what the reader holds, and with a backlog
    /// that is when this limit is reached): 16 partitions x 1,024 events of about 1.5 KiB in
    /// memory is about 24 MiB.
    pub max_ack_pending: i64,
    /// Longest pause between retries of a failed publish.
    pub retry_max_backoff_ms: u64,
    /// Longest a shutdown (SIGTERM) waits for in-flight work to finish and the NATS connection
    /// to drain before the service stops anyway; the chart sets the pod's grace period above it.
    pub shutdown_timeout_seconds: u64,
    /// Identity resolution guard rails, the hot-profile cache, compare-and-set retries.
    pub profiles: crate::profiles_config::ProfilesConfig,
    /// Partition ownership among replicas: heartbeat, member TTL, pin timeout
    /// (`[processor.ownership]`).
    pub ownership: herald_common::ownership::OwnershipConfig,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "0.0.0.0:50052".into(),
            http_addr: "0.0.0.0:8081".into(),
            admin_addr: "0.0.0.0:9092".into(),
            durable: "processor".into(),
            ack_wait_seconds: 10,
            batch_size: 256,
            concurrency: 64,
            max_ack_pending: 1_024,
            retry_max_backoff_ms: 2_000,
            shutdown_timeout_seconds: herald_common::supervisor::DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
            profiles: Default::default(),
            ownership: Default::default(),
        }
    }
}
