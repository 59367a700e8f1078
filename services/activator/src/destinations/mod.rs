//! Destination senders: one per configured destination, each sending one rendered event.
//!
//! A failed send is a [`SendError`]: its [`SendError::kind`] is a bounded label, and its
//! [`SendError::class`] says whether sending the same event again can succeed
//! ([`FailureClass::Transient`]: 408, 429, 5xx, network errors) or not
//! ([`FailureClass::Permanent`]: any other 4xx, a refused address). A NATS publish that fails
//! (no PubAck, a full stream, no connection) is transient.

mod log;
pub mod nats;
pub mod ssrf;
mod webhook;

use std::sync::Arc;

use bytes::Bytes;
use std::time::Duration;

pub use log::LogSender;
pub use nats::NatsSender;
pub use ssrf::NetworkGuard;
pub use webhook::{WebhookSender, parse_retry_after, signature};

use crate::record::{DestinationRecord, KindSettings};

/// Most bytes of a failed answer's body kept (for the DLQ record and the logs).
pub const BODY_EXCERPT_BYTES: usize = 1024;

/// Whether sending the same event again can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// It may succeed later (the destination is down, overloaded or slow).
    Transient,
    /// It will fail again: the destination refuses this request.
    Permanent,
}

impl FailureClass {
    /// The class's metric label: `transient` or `permanent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
        }
    }
}

/// A failed send.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The destination answered a status other than 2xx.
    #[error("POST {url} answered {status}")]
    Status {
        /// The URL posted to.
        url: String,
        /// The HTTP status.
        status: u16,
        /// How long the destination asked us to wait (`Retry-After`, seconds or HTTP date).
        retry_after: Option<Duration>,
        /// The start of the answer's body ([`BODY_EXCERPT_BYTES`] at most).
        body: String,
    },
    /// No answer: the request timed out.
    #[error("POST {url} timed out: {message}")]
    Timeout {
        /// The URL posted to.
        url: String,
        /// The client's error.
        message: String,
    },
    /// No answer: the connection failed, or the request failed on the way.
    #[error("POST {url} failed: {message}")]
    Network {
        /// The URL posted to.
        url: String,
        /// Whether it failed while connecting.
        connect: bool,
        /// The client's error.
        message: String,
    },
    /// The SSRF guard refused the address the URL (or a redirect) leads to.
    #[error("POST {url} refused: {refused}")]
    Refused {
        /// The URL posted to.
        url: String,
        /// The refused host and address.
        refused: ssrf::Refused,
    },
    /// Writing a log line failed.
    #[error("cannot write event line: {0}")]
    Io(#[from] std::io::Error),
    /// Publishing to a NATS subject failed (no PubAck, a full stream, the connection).
    #[error("publish to {subject} failed: {message}")]
    Nats {
        /// The subject published to.
        subject: String,
        /// What failed.
        message: String,
    },
}

impl SendError {
    /// Bounded label for metrics and logs: `http_4xx`, `http_408`, `http_429`, `http_5xx`,
    /// `http_other` (1xx or 3xx), `timeout`, `connect`, `http`, `refused_address`, `io` or
    /// `nats`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Status { status, .. } => match status {
                408 => "http_408",
                429 => "http_429",
                500..=599 => "http_5xx",
                400..=499 => "http_4xx",
                _ => "http_other",
            },
            Self::Timeout { .. } => "timeout",
            Self::Network { connect: true, .. } => "connect",
            Self::Network { .. } => "http",
            Self::Refused { .. } => "refused_address",
            Self::Io(_) => "io",
            Self::Nats { .. } => "nats",
        }
    }

    /// Whether sending again can succeed: 408, 429, 5xx, network, I/O and NATS errors are transient;
    /// other statuses (4xx, and 3xx left after redirects) and refused addresses are permanent.
    pub fn class(&self) -> FailureClass {
        match self {
            Self::Status { status, .. } => match status {
                408 | 429 | 500..=599 => FailureClass::Transient,
                _ => FailureClass::Permanent,
            },
            Self::Timeout { .. } | Self::Network { .. } | Self::Io(_) | Self::Nats { .. } => {
                FailureClass::Transient
            }
            Self::Refused { .. } => FailureClass::Permanent,
        }
    }

    /// How long the destination asked us to wait before the next attempt, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status of the answer, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The start of the answer's body (empty when there was no answer).
    pub fn body_excerpt(&self) -> &str {
        match self {
            Self::Status { body, .. } => body,
            _ => "",
        }
    }
}

/// Sends rendered events to one destination.
pub enum Sender {
    /// HTTP webhook.
    Webhook(WebhookSender),
    /// JSON lines to stdout or a file.
    Log(LogSender),
    /// Publishes to a NATS subject.
    Nats(NatsSender),
}

impl Sender {
    /// Builds the sender for a destination, after [`DestinationRecord::check`], refusing a
    /// webhook URL the guard refuses: to validate a destination (a NATS sender built here has
    /// no connection; delivery uses [`Sender::connect`]).
    pub async fn new(
        record: &DestinationRecord,
        guard: &Arc<NetworkGuard>,
    ) -> Result<Self, String> {
        Self::build(record, guard, None).await
    }

    /// Builds the sender delivery uses: as [`Sender::new`], with the NATS connection a NATS
    /// destination publishes over.
    pub async fn connect(
        record: &DestinationRecord,
        guard: &Arc<NetworkGuard>,
        js: &async_nats::jetstream::Context,
    ) -> Result<Self, String> {
        Self::build(record, guard, Some(js.clone())).await
    }

    async fn build(
        record: &DestinationRecord,
        guard: &Arc<NetworkGuard>,
        js: Option<async_nats::jetstream::Context>,
    ) -> Result<Self, String> {
        Ok(match record.check()?.kind {
            KindSettings::Webhook(w) => {
                Self::Webhook(WebhookSender::new(&record.id, &w, guard).await?)
            }
            KindSettings::Log(l) => Self::Log(LogSender::new(&l)?),
            KindSettings::Nats(n) => Self::Nats(NatsSender::new(&n, js)),
        })
    }

    /// Sends one request's JSON body (one event, or a batch `{"batch":[...]}`); `key` is the
    /// idempotency key (the event's id; for a batch, see [`crate::deliver`]).
    pub async fn send(&self, key: &str, body: &Bytes) -> Result<(), SendError> {
        match self {
            Self::Webhook(w) => w.send(key, body).await,
            Self::Log(l) => l.send(body),
            Self::Nats(n) => n.send(key, body).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let cases = [
            (400, "http_4xx", FailureClass::Permanent),
            (401, "http_4xx", FailureClass::Permanent),
            (404, "http_4xx", FailureClass::Permanent),
            (413, "http_4xx", FailureClass::Permanent),
            (408, "http_408", FailureClass::Transient),
            (429, "http_429", FailureClass::Transient),
            (500, "http_5xx", FailureClass::Transient),
            (503, "http_5xx", FailureClass::Transient),
            (599, "http_5xx", FailureClass::Transient),
            (302, "http_other", FailureClass::Permanent),
        ];
        for (status, kind, class) in cases {
            let e = SendError::Status {
                url: "http://x/".into(),
                status,
                retry_after: None,
                body: String::new(),
            };
            assert_eq!((e.kind(), e.class()), (kind, class), "{status}");
        }
        let timeout = SendError::Timeout {
            url: "u".into(),
            message: "m".into(),
        };
        assert_eq!(
            (timeout.kind(), timeout.class()),
            ("timeout", FailureClass::Transient)
        );
        let connect = SendError::Network {
            url: "u".into(),
            connect: true,
            message: "m".into(),
        };
        assert_eq!(
            (connect.kind(), connect.class()),
            ("connect", FailureClass::Transient)
        );
        let refused = SendError::Refused {
            url: "u".into(),
            refused: ssrf::Refused {
                host: "h".into(),
                addr: "10.0.0.1".parse().unwrap(),
            },
        };
        assert_eq!(
            (refused.kind(), refused.class()),
            ("refused_address", FailureClass::Permanent)
        );
        let nats = SendError::Nats {
            subject: "s".into(),
            message: "m".into(),
        };
        assert_eq!(
            (nats.kind(), nats.class()),
            ("nats", FailureClass::Transient)
        );
    }
}
