//! The processor's config section (`[processor]`, env `HERALD__PROCESSOR__*`).

use serde::{Deserialize, Serialize};

/// Settings of the processor service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// gRPC control address.
    pub grpc_addr: String,
    /// Admin address (`/healthz`, `/readyz`, `/metrics`).
    pub admin_addr: String,
    /// Durable consumer name on the events stream.
    pub durable: String,
    /// Ack wait of the consumer: how soon a crashed replica's messages are redelivered.
    pub ack_wait_seconds: u64,
    /// Most events handled in one batch.
    pub batch_size: usize,
    /// Most events delivered and not yet acked.
    pub max_ack_pending: i64,
    /// Longest pause between retries of a failed publish.
    pub retry_max_backoff_ms: u64,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "0.0.0.0:50052".into(),
            admin_addr: "0.0.0.0:9092".into(),
            durable: "processor".into(),
            ack_wait_seconds: 10,
            batch_size: 256,
            max_ack_pending: 20_000,
            retry_max_backoff_ms: 2_000,
        }
    }
}
