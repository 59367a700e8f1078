//! The activator's config section (`[activator]`, env `HERALD__ACTIVATOR__*`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use herald_common::config::Secret;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Settings of the activator service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActivatorConfig {
    /// gRPC control address.
    pub grpc_addr: String,
    /// Admin address (`/healthz`, `/readyz`, `/metrics`).
    pub admin_addr: String,
    /// Ack wait of each destination's consumer: how soon a crashed replica's messages come back.
    pub ack_wait_seconds: u64,
    /// Most events handled in one batch per destination.
    pub batch_size: usize,
    /// Most events delivered to the activator and not yet acked, per destination.
    pub max_ack_pending: i64,
    /// Most users whose events are sent at the same time, per destination.
    pub max_concurrent_keys: usize,
    /// Longest pause between retries of a failed send.
    pub retry_max_backoff_ms: u64,
    /// Longest a shutdown (SIGTERM) waits for in-flight work to finish and the NATS connection
    /// to drain before the service stops anyway; the chart sets the pod's grace period above it.
    pub shutdown_timeout_seconds: u64,
    /// The destinations.
    pub destinations: Vec<DestinationConfig>,
    /// CIDRs webhooks may reach although they are loopback, private or link-local (e.g.
    /// `["10.20.0.0/16"]`); every other such address is refused (see
    /// [`crate::destinations::ssrf`]). Empty by default; `herald dev` allows loopback and
    /// private ranges.
    pub allow_private_networks: Vec<IpNet>,
}

impl Default for ActivatorConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "0.0.0.0:50053".into(),
            admin_addr: "0.0.0.0:9093".into(),
            ack_wait_seconds: 10,
            batch_size: 256,
            max_ack_pending: 10_000,
            max_concurrent_keys: 64,
            retry_max_backoff_ms: 5_000,
            shutdown_timeout_seconds: herald_common::supervisor::DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
            destinations: Vec::new(),
            allow_private_networks: Vec::new(),
        }
    }
}

/// The kind of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    /// HTTP POST of each event as Segment-spec JSON.
    Webhook,
    /// One JSON line per event to stdout or a file.
    Log,
}

impl DestinationKind {
    /// The kind's name, as in config and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Log => "log",
        }
    }
}

/// One destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Stable id: letters, digits, `-` and `_`; names the durable consumer.
    pub id: String,
    /// What kind of destination it is.
    pub kind: DestinationKind,
    /// Webhook URL (webhook only).
    #[serde(default)]
    pub url: Option<String>,
    /// Timeout of one webhook request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// File to append lines to (log only); stdout when absent.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// Extra request headers (webhook only), e.g. `{ Authorization = "Bearer ..." }`; their
    /// values are secrets (redacted in `Debug`). `Content-Type`, `Idempotency-Key` and
    /// `Herald-Signature` are Herald's and cannot be set here.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Signing secret (webhook only): with it every request carries `Herald-Signature`
    /// (see [`crate::destinations::WebhookSender`]).
    #[serde(default)]
    pub secret: Option<Secret>,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl DestinationConfig {
    /// Checks what the destination needs.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty()
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "destination id {:?} must be letters, digits, '-' or '_'",
                self.id
            ));
        }
        if self.kind != DestinationKind::Webhook
            && (!self.headers.is_empty() || self.secret.is_some())
        {
            return Err(format!(
                "destination {:?}: headers and secret apply to webhook destinations only",
                self.id
            ));
        }
        if self.kind == DestinationKind::Webhook {
            match &self.url {
                Some(u) if u.starts_with("http://") || u.starts_with("https://") => {}
                _ => {
                    return Err(format!(
                        "webhook destination {:?} needs url = \"http(s)://...\"",
                        self.id
                    ));
                }
            }
        }
        Ok(())
    }
}
