//! Destination senders: one per configured destination, each sending one rendered event.

mod log;
mod webhook;

use std::time::Duration;

pub use log::LogSender;
pub use webhook::WebhookSender;

use crate::config::{DestinationConfig, DestinationKind};

/// A failed send.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    /// Bounded label for metrics (`http_5xx`, `timeout`, `connect`, `io`, ...).
    pub kind: &'static str,
    /// What happened, for logs.
    pub message: String,
    /// How long the destination asked us to wait (HTTP Retry-After).
    pub retry_after: Option<Duration>,
}

/// Sends rendered events to one destination.
pub enum Sender {
    /// HTTP webhook.
    Webhook(WebhookSender),
    /// JSON lines to stdout or a file.
    Log(LogSender),
}

impl Sender {
    /// Builds the sender for a destination.
    pub fn new(cfg: &DestinationConfig) -> Result<Self, String> {
        cfg.validate()?;
        Ok(match cfg.kind {
            DestinationKind::Webhook => Self::Webhook(WebhookSender::new(cfg)?),
            DestinationKind::Log => Self::Log(LogSender::new(cfg)?),
        })
    }

    /// Sends one event's JSON body; `event_id` is the idempotency key.
    pub async fn send(&self, event_id: &str, body: &[u8]) -> Result<(), SendError> {
        match self {
            Self::Webhook(w) => w.send(event_id, body).await,
            Self::Log(l) => l.send(body),
        }
    }
}
