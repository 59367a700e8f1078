//! NATS subject destination: republishes each event's JSON (the webhook's body) to a subject the
//! user names, with the header `Nats-Msg-Id: <event id>`.
//!
//! When a JetStream stream captures the subject, the event is published through JetStream and
//! the send succeeds only once the stream's PubAck arrives: a full or unavailable stream is a
//! transient failure, retried like a webhook's 503, so nothing is lost silently, and the stream
//! drops a retried copy within its duplicate window by the message id. When no stream captures
//! it, the event is a core NATS publish (a JetStream publish would find no responder): the send
//! succeeds once the server has received it (a flush), and what subscribers do with it is
//! theirs. Which of the two applies is looked up at the first send and again every
//! [`RECHECK`] while no stream captures the subject, so a stream created later is used.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;

use super::SendError;
use crate::record::NatsSettings;

/// How often a destination publishing with core NATS checks whether a stream now captures its
/// subject.
pub const RECHECK: Duration = Duration::from_secs(10);

/// How events reach the subject, as last looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A stream captures the subject: JetStream publish, awaiting the PubAck.
    JetStream,
    /// No stream captures it: core publish (since this instant).
    Core(Instant),
}

/// Publishes events to a NATS subject.
pub struct NatsSender {
    subject: String,
    js: Option<jetstream::Context>,
    mode: Mutex<Option<Mode>>,
}

impl NatsSender {
    /// A sender to the destination's subject, over `js` (`None`: validation only; every send
    /// then fails).
    pub fn new(cfg: &NatsSettings, js: Option<jetstream::Context>) -> Self {
        Self {
            subject: cfg.subject.clone(),
            js,
            mode: Mutex::new(None),
        }
    }

    fn error(&self, message: impl std::fmt::Display) -> SendError {
        SendError::Nats {
            subject: self.subject.clone(),
            message: message.to_string(),
        }
    }

    /// Whether a stream captures the subject, looked up when unknown or stale.
    async fn mode(&self, js: &jetstream::Context) -> Result<Mode, SendError> {
        let known = *self.mode.lock().expect("nats mode lock");
        match known {
            Some(Mode::JetStream) => return Ok(Mode::JetStream),
            Some(Mode::Core(since)) if since.elapsed() < RECHECK => return Ok(Mode::Core(since)),
            _ => {}
        }
        let mode = match js.stream_by_subject(self.subject.as_str()).await {
            Ok(_) => Mode::JetStream,
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                Mode::Core(Instant::now())
            }
            Err(e) => return Err(self.error(format!("cannot look up a stream: {e}"))),
        };
        *self.mode.lock().expect("nats mode lock") = Some(mode);
        Ok(mode)
    }

    /// Publishes one event's JSON with `Nats-Msg-Id: event_id`.
    pub async fn send(&self, event_id: &str, body: &Bytes) -> Result<(), SendError> {
        let Some(js) = &self.js else {
            return Err(self.error("no NATS connection"));
        };
        let payload = body.clone();
        match self.mode(js).await? {
            Mode::JetStream => {
                let ack = js
                    .send_publish(
                        self.subject.clone(),
                        PublishMessage::build()
                            .payload(payload)
                            .message_id(event_id)
                            .header("Content-Type", "application/json"),
                    )
                    .await
                    .map_err(|e| self.error(e))?;
                match ack.await {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                            // The stream went away: look it up again next time.
                            *self.mode.lock().expect("nats mode lock") = None;
                        }
                        Err(self.error(e))
                    }
                }
            }
            Mode::Core(_) => {
                let client = js.client();
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", event_id);
                headers.insert("Content-Type", "application/json");
                client
                    .publish_with_headers(self.subject.clone(), headers, payload)
                    .await
                    .map_err(|e| self.error(e))?;
                client.flush().await.map_err(|e| self.error(e))
            }
        }
    }
}
