//! The dead-letter queue: events a destination refused for good (a 4xx other than 408/429), or
//! that ran out of attempts or age, are published as [`DlqRecord`]s to the stream
//! `<PREFIX>_DLQ` on `<prefix>.dlq.<destination>` (created by the activator at start), and then
//! acked, so that user's next events carry on.
//!
//! A record's message id is `<destination>:<event id>:<attempts>`: a record written again after
//! a crash (same attempts) is dropped as a duplicate, while a redrive that fails again writes a
//! new record (more attempts) before deleting the old one.

use async_nats::jetstream::{self, message::PublishMessage};
use chrono::{DateTime, Utc};
use herald_common::Topology;
use herald_proto::v1::{DlqReason, DlqRecord, ProcessedEvent};
use prost::Message as _;

/// Why a dead letter could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The publish failed or was not acknowledged (NATS down, the DLQ stream missing or full).
    #[error("cannot write to the DLQ {subject}: {message}")]
    Publish {
        /// The DLQ subject.
        subject: String,
        /// What failed.
        message: String,
    },
}

/// The last failed attempt of an event.
#[derive(Debug, Clone, Default)]
pub(crate) struct LastFailure {
    /// The HTTP status; 0 without an answer.
    pub status: u16,
    /// The bounded label of the failure.
    pub kind: &'static str,
    /// The error, readable.
    pub error: String,
    /// The start of the answer's body.
    pub body: String,
}

/// The attempts made to send one event.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tried {
    /// Attempts made (requests sent).
    pub attempts: u32,
    /// When the first was made.
    pub first: Option<DateTime<Utc>>,
    /// When the last was made.
    pub last: Option<DateTime<Utc>>,
    /// How the last failed, if it did.
    pub failure: Option<LastFailure>,
}

/// The bounded label of a DLQ reason.
pub(crate) fn reason_label(r: DlqReason) -> &'static str {
    match r {
        DlqReason::Permanent => "permanent",
        DlqReason::Attempts => "attempts",
        DlqReason::Age => "age",
        DlqReason::Unspecified => "unspecified",
    }
}

/// Builds the dead letter of `event` for `destination`.
pub(crate) fn record(
    destination: &str,
    event: &ProcessedEvent,
    tried: &Tried,
    reason: DlqReason,
) -> DlqRecord {
    let failure = tried.failure.clone().unwrap_or_default();
    DlqRecord {
        event: Some(event.clone()),
        destination: destination.to_string(),
        attempts: tried.attempts,
        last_status: u32::from(failure.status),
        last_error: failure.error,
        body_excerpt: failure.body,
        first_attempt_at: tried.first.map(herald_proto::time::to_proto),
        last_attempt_at: tried.last.map(herald_proto::time::to_proto),
        reason: reason as i32,
        last_error_kind: failure.kind.to_string(),
    }
}

/// The event id of a dead letter.
pub(crate) fn event_id(r: &DlqRecord) -> &str {
    r.event
        .as_ref()
        .and_then(|p| p.event.as_ref())
        .map_or("", |e| e.id.as_str())
}

/// Writes dead letters of one destination.
#[derive(Clone)]
pub(crate) struct DeadLetters {
    js: jetstream::Context,
    subject: String,
}

impl DeadLetters {
    /// The writer of `destination`'s dead letters.
    pub fn new(js: jetstream::Context, topology: &Topology, destination: &str) -> Self {
        Self {
            js,
            subject: topology.dlq_subject(destination),
        }
    }

    /// Publishes `record` and waits for the stream's acknowledgement.
    pub async fn publish(&self, record: &DlqRecord) -> Result<(), DlqError> {
        let fail = |message: String| DlqError::Publish {
            subject: self.subject.clone(),
            message,
        };
        let id = format!(
            "{}:{}:{}",
            record.destination,
            event_id(record),
            record.attempts
        );
        self.js
            .send_publish(
                self.subject.clone(),
                PublishMessage::build()
                    .payload(record.encode_to_vec().into())
                    .message_id(id),
            )
            .await
            .map_err(|e| fail(e.to_string()))?
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }
}

/// The readiness check flipped once the DLQ stream exists.
pub const DLQ_STREAM_CHECK: &str = "dlq stream";

/// How often the DLQ size gauge is refreshed.
const GAUGE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Creates (or updates) the DLQ stream, flips [`DLQ_STREAM_CHECK`], then refreshes the
/// `herald_activator_dlq_events` gauge from the stream's per-subject counts every few seconds
/// until `cancel`, for every destination running here (0 when it has none).
pub(crate) async fn run<V: Send>(
    js: jetstream::Context,
    topology: Topology,
    ready: herald_common::admin::Readiness,
    destinations: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, V>>>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use futures_util::TryStreamExt as _;
    let config = topology.dlq_stream_config();
    if herald_common::nats::retry_until("creating the DLQ stream", &cancel, || {
        herald_common::nats::ensure_stream(&js, config.clone())
    })
    .await
    .is_none()
    {
        return;
    }
    ready.set(DLQ_STREAM_CHECK, true);
    let prefix = topology.dlq_subject("");
    loop {
        let ids: Vec<String> = destinations
            .lock()
            .expect("stats lock")
            .keys()
            .cloned()
            .collect();
        if let Ok(stream) = js.get_stream(topology.dlq_stream()).await
            && let Ok(subjects) = stream.info_with_subjects(topology.dlq_wildcard()).await
            && let Ok(counts) = subjects
                .try_collect::<std::collections::HashMap<String, usize>>()
                .await
        {
            for id in &ids {
                let events = counts.get(&format!("{prefix}{id}")).copied().unwrap_or(0) as u64;
                crate::events::DlqSize {
                    destination: id,
                    events,
                }
                .emit();
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(GAUGE_EVERY) => {}
        }
    }
}
