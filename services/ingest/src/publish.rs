//! Publishing normalised events to JetStream: pipelined, with the event id as `Nats-Msg-Id`,
//! and successful only once every event is acknowledged.
//!
//! Two ways to store a group of events:
//! - **Pipelined** (the default): every event is sent, then all acks are awaited together.
//!   Retries are harmless: JetStream drops a message id it stored within its duplicate window.
//! - **Atomic** (sources with `atomic_publish`, for requests of two or more events): one
//!   JetStream atomic batch (ADR-50, server 2.12+, stream setting `allow_atomic`), stored whole
//!   or not at all. The first message opens the batch with a request (the server answers empty,
//!   or with an error when it cannot take another batch); the middle ones are plain publishes;
//!   the last carries `Nats-Batch-Commit: 1` and gets the PubAck of the whole batch. Every
//!   message has `Nats-Batch-Id`, its 1-based `Nats-Batch-Sequence`, and its `Nats-Msg-Id`.
//!
//!   The server refuses a whole batch that holds a message id it stored already (a retried
//!   request, or one whose events were partly stored), that exceeds its batch size cap
//!   (`jetstream.limits.batch.max_msgs`, 1000 by default), or when too many batches are in
//!   flight (50 per stream, 1000 per server by default). Then nothing of the batch is stored,
//!   and the events are published pipelined instead ([`Fallback`]): the new ones are stored,
//!   the known ones acknowledged as duplicates. Batches above [`ATOMIC_MAX_EVENTS`] and batches
//!   repeating a message id go pipelined at once, without asking the server.
//!
//! With the seen-set ([`crate::seen`]) on, events whose id it holds are skipped before
//! publishing, and the stored ones are recorded after their PubAcks.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, Context};
use async_nats::{Client, HeaderMap, Subject, header::NATS_MESSAGE_ID};
use futures_util::future::join_all;
use herald_common::Topology;
use herald_common::nats::is_connected;
use herald_proto::v1::Event;
use prost::Message as _;
use serde::Deserialize;

use crate::error::ApiError;
use crate::events::{AtomicBatchStored, DedupeHits};
use crate::seen::SeenSet;

/// How often an in-flight publish checks that the connection is still up.
const CONNECTION_POLL: Duration = Duration::from_millis(50);

/// The most events Herald sends as one atomic batch: the server's default cap. Larger groups
/// are published pipelined.
pub const ATOMIC_MAX_EVENTS: usize = 1000;

/// Atomic batches of one publish sent at once (a NATS intake chunk can hold many); the server
/// takes 50 in flight per stream by default, shared by every replica.
const ATOMIC_CONCURRENCY: usize = 4;

/// The header naming the atomic batch a message belongs to.
pub const BATCH_ID_HEADER: &str = "Nats-Batch-Id";
/// The header with a message's 1-based position in its batch.
pub const BATCH_SEQUENCE_HEADER: &str = "Nats-Batch-Sequence";
/// The header (`1`) marking the last message of a batch, which commits it.
pub const BATCH_COMMIT_HEADER: &str = "Nats-Batch-Commit";

/// Why an atomic batch was published pipelined instead; nothing of it was stored atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The batch holds a message id stored already (or twice).
    DuplicateId,
    /// The batch is larger than the server (or [`ATOMIC_MAX_EVENTS`]) allows.
    TooLarge,
    /// The server has too many atomic batches in flight.
    TooManyInFlight,
    /// The server did not get the whole batch (it dropped its start, or a message was lost).
    Incomplete,
    /// The stream does not allow atomic publish (`allow_atomic`).
    Disabled,
    /// The server refused the batch for another reason.
    Refused,
}

impl Fallback {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::DuplicateId => "duplicate_id",
            Self::TooLarge => "too_large",
            Self::TooManyInFlight => "too_many_in_flight",
            Self::Incomplete => "incomplete",
            Self::Disabled => "disabled",
            Self::Refused => "refused",
        }
    }

    /// The fallback a JetStream error code asks for; `None` for errors that are not about the
    /// batch (stream full, store failures).
    pub fn of(code: ErrorCode) -> Option<Self> {
        Some(match code {
            ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE
            | ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT => Self::DuplicateId,
            ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH => Self::TooLarge,
            ErrorCode::ATOMIC_PUBLISH_TOO_MANY_INFLIGHT => Self::TooManyInFlight,
            ErrorCode::ATOMIC_PUBLISH_INCOMPLETE_BATCH => Self::Incomplete,
            ErrorCode::ATOMIC_PUBLISH_DISABLED => Self::Disabled,
            ErrorCode::ATOMIC_PUBLISH_MISSING_SEQ
            | ErrorCode::ATOMIC_PUBLISH_UNSUPPORTED_HEADER
            | ErrorCode::ATOMIC_PUBLISH_INVALID_BATCH_ID
            | ErrorCode::ATOMIC_PUBLISH_INVALID_BATCH_COMMIT => Self::Refused,
            _ => return None,
        })
    }
}

/// The outcome of publishing a request's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Events accepted: acknowledged by JetStream, or skipped because the seen-set holds them.
    pub acked: usize,
    /// Of those, how many JetStream reported as duplicates.
    pub duplicates: usize,
    /// Of those, how many the seen-set held (not published again).
    pub seen: usize,
    /// Time from the first publish to the last ack.
    pub elapsed: Duration,
}

/// Publishes events to the events stream.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    js: Context,
    topology: Topology,
    /// The events subject of each partition, built once: a clone is a reference count.
    subjects: Arc<[Subject]>,
    timeout: Duration,
    seen: Option<SeenSet>,
}

/// What went wrong with an atomic batch.
enum AtomicError {
    /// Publish the batch pipelined instead.
    Fallback(Fallback),
    /// The request fails.
    Failed(ApiError),
}

/// The answer to a batch's first message: empty, or `{"error": ...}`.
#[derive(Deserialize)]
struct StartReply {
    error: Option<jetstream::Error>,
}

impl Publisher {
    /// A publisher over this client; acks are awaited at most `timeout` per request.
    pub fn new(client: Client, js: Context, topology: Topology, timeout: Duration) -> Self {
        let subjects = (0..topology.partitions())
            .map(|p| Subject::from(topology.events_subject(p)))
            .collect();
        Self {
            client,
            js,
            topology,
            subjects,
            timeout,
            seen: None,
        }
    }

    /// The same publisher checking and recording event ids in `seen` (the long dedupe window).
    pub fn with_seen_set(mut self, seen: Option<SeenSet>) -> Self {
        self.seen = seen;
        self
    }

    /// The seen-set, when the long dedupe window is on.
    pub fn seen_set(&self) -> Option<&SeenSet> {
        self.seen.as_ref()
    }

    /// The NATS client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The topology events are published by.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The events subject of a partition.
    fn subject(&self, partition: u32) -> Subject {
        match self.subjects.get(partition as usize) {
            Some(s) => s.clone(),
            None => Subject::from(self.topology.events_subject(partition)),
        }
    }

    /// Fails at once when NATS is not connected, so clients are told to retry without waiting
    /// for a publish timeout.
    pub fn check_connected(&self) -> Result<(), ApiError> {
        if is_connected(&self.client) {
            Ok(())
        } else {
            Err(ApiError::Unavailable {
                cause: "NATS is not connected".into(),
            })
        }
    }

    /// Sends every event, then awaits all acks together. Succeeds only when JetStream
    /// acknowledged each one (a duplicate ack counts: the event is stored). Fails with
    /// `StreamFull` when the stream refused for lack of space, else `Unavailable`; also fails as
    /// soon as the connection drops or the timeout passes.
    pub async fn publish(&self, events: &[Event]) -> Result<Published, ApiError> {
        self.publish_grouped(events, &[]).await
    }

    /// Stores the events as one atomic batch (all or nothing), falling back to pipelined
    /// publishing where the server refuses the batch (see the module docs).
    pub async fn publish_atomic(&self, events: &[Event]) -> Result<Published, ApiError> {
        let whole = std::iter::once(0..events.len()).collect::<Vec<_>>();
        self.publish_grouped(events, &whole).await
    }

    /// Stores the events in the `atomic` ranges as one atomic batch each, and the others
    /// pipelined, all at once; fails like [`Publisher::publish`]. Ranges must not overlap.
    pub async fn publish_grouped(
        &self,
        events: &[Event],
        atomic: &[Range<usize>],
    ) -> Result<Published, ApiError> {
        self.check_connected()?;
        let all: Vec<&Event> = events.iter().collect();
        let seen = match &self.seen {
            Some(set) => set.seen(&all).await,
            None => vec![false; events.len()],
        };
        let seen_count = seen.iter().filter(|s| **s).count();
        if seen_count > 0 {
            DedupeHits {
                layer: "seen_set",
                count: seen_count,
            }
            .emit();
        }

        // Atomic groups of the events still to publish; the rest goes pipelined.
        let mut grouped = vec![false; events.len()];
        let mut batches: Vec<Vec<&Event>> = Vec::new();
        for range in atomic {
            let range = range.start.min(events.len())..range.end.min(events.len());
            let fresh: Vec<usize> = range.filter(|i| !seen[*i]).collect();
            if fresh.len() < 2 {
                continue; // one message is atomic by itself
            }
            for i in &fresh {
                grouped[*i] = true;
            }
            batches.push(fresh.into_iter().map(|i| &events[i]).collect());
        }
        let pipelined: Vec<&Event> = (0..events.len())
            .filter(|i| !seen[*i] && !grouped[*i])
            .map(|i| &events[i])
            .collect();

        let started = Instant::now();
        let work = async {
            let atomic = async {
                let mut results = Vec::with_capacity(batches.len());
                for group in batches.chunks(ATOMIC_CONCURRENCY) {
                    results.extend(join_all(group.iter().map(|b| self.atomic(b))).await);
                }
                results
            };
            let (pipelined, atomic) = tokio::join!(self.pipelined(&pipelined), atomic);
            merge(std::iter::once(pipelined).chain(atomic))
        };
        let duplicates = self.within_deadline(work).await?;
        let elapsed = started.elapsed();
        if let Some(set) = &self.seen {
            let stored: Vec<&Event> = all
                .iter()
                .zip(&seen)
                .filter(|(_, s)| !**s)
                .map(|(e, _)| *e)
                .collect();
            set.record(&stored).await;
        }
        Ok(Published {
            acked: events.len(),
            duplicates,
            seen: seen_count,
            elapsed,
        })
    }

    /// Runs `work` until it ends, the connection drops, or the publish timeout passes.
    async fn within_deadline<T>(
        &self,
        work: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let disconnected = async {
            loop {
                tokio::time::sleep(CONNECTION_POLL).await;
                if !is_connected(&self.client) {
                    return;
                }
            }
        };
        tokio::select! {
            result = work => result,
            () = disconnected => Err(ApiError::Unavailable {
                cause: "NATS connection lost while awaiting acks".into(),
            }),
            () = tokio::time::sleep(self.timeout) => Err(ApiError::Unavailable {
                cause: format!("no JetStream ack within {} ms", self.timeout.as_millis()),
            }),
        }
    }

    /// Sends every event, then awaits all acks together; returns how many were duplicates.
    async fn pipelined(&self, events: &[&Event]) -> Result<usize, ApiError> {
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let publish = PublishMessage::build()
                .payload(event.encode_to_vec().into())
                .message_id(&event.id);
            let subject = self.subject(event.partition);
            acks.push(
                self.js
                    .send_publish(subject, publish)
                    .await
                    .map_err(classify)?,
            );
        }
        let results = join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await;
        merge(results.into_iter().map(|r| match r {
            Ok(ack) => Ok(usize::from(ack.duplicate)),
            Err(e) => Err(classify(e)),
        }))
    }

    /// Stores a batch atomically, or pipelined when the server refuses it (see the module
    /// docs); returns how many events were duplicates.
    async fn atomic(&self, events: &[&Event]) -> Result<usize, ApiError> {
        let fallback = if events.len() > ATOMIC_MAX_EVENTS {
            Some(Fallback::TooLarge)
        } else if has_repeated_id(events) {
            Some(Fallback::DuplicateId)
        } else {
            match self.send_atomic(events).await {
                Ok(()) => None,
                Err(AtomicError::Fallback(f)) => Some(f),
                Err(AtomicError::Failed(e)) => return Err(e),
            }
        };
        AtomicBatchStored {
            fallback: fallback.map(Fallback::label),
            events: events.len(),
        }
        .emit();
        match fallback {
            None => Ok(0),
            Some(_) => self.pipelined(events).await,
        }
    }

    /// Sends one atomic batch of at least two events and awaits its commit.
    async fn send_atomic(&self, events: &[&Event]) -> Result<(), AtomicError> {
        let batch_id = crate::source_store::generate_key(22);
        let last = events.len();
        for (i, event) in events.iter().enumerate() {
            let sequence = i + 1;
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, event.id.as_str());
            headers.insert(BATCH_ID_HEADER, batch_id.as_str());
            headers.insert(BATCH_SEQUENCE_HEADER, sequence.to_string().as_str());
            let subject = self.subject(event.partition);
            let payload = event.encode_to_vec().into();
            if sequence == last {
                headers.insert(BATCH_COMMIT_HEADER, "1");
                let publish = PublishMessage::build().headers(headers).payload(payload);
                let ack = self
                    .js
                    .send_publish(subject, publish)
                    .await
                    .map_err(classify_atomic)?
                    .await
                    .map_err(classify_atomic)?;
                if ack.batch_size.is_some_and(|n| n != last as u64) {
                    tracing::warn!(
                        batch = %batch_id,
                        sent = last,
                        stored = ?ack.batch_size,
                        "atomic batch committed with another count than sent"
                    );
                }
            } else if sequence == 1 {
                let reply = self
                    .client
                    .request_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| {
                        AtomicError::Failed(ApiError::Unavailable {
                            cause: format!("starting an atomic batch: {e}"),
                        })
                    })?;
                if !reply.payload.is_empty()
                    && let Ok(StartReply { error: Some(error) }) =
                        serde_json::from_slice::<StartReply>(&reply.payload)
                {
                    return Err(match Fallback::of(error.error_code()) {
                        Some(f) => AtomicError::Fallback(f),
                        None => AtomicError::Failed(classify_text(error.to_string())),
                    });
                }
            } else {
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| {
                        AtomicError::Failed(ApiError::Unavailable {
                            cause: format!("sending an atomic batch: {e}"),
                        })
                    })?;
            }
        }
        Ok(())
    }
}

/// Sums the duplicates of several publishes; fails with the most useful error among them (a
/// full stream: the client should slow down).
fn merge(results: impl Iterator<Item = Result<usize, ApiError>>) -> Result<usize, ApiError> {
    let mut duplicates = 0;
    let mut first_err: Option<ApiError> = None;
    for result in results {
        match result {
            Ok(d) => duplicates += d,
            Err(e) => {
                if first_err.is_none() || matches!(e, ApiError::StreamFull { .. }) {
                    first_err = Some(e);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(duplicates),
    }
}

/// Whether two events of a batch share an id (the server would refuse the batch).
fn has_repeated_id(events: &[&Event]) -> bool {
    let mut ids = HashSet::with_capacity(events.len());
    !events.iter().all(|e| ids.insert(e.id.as_str()))
}

/// The JetStream API error code of a publish error, when the server answered with one.
fn api_error_code(e: &PublishError) -> Option<ErrorCode> {
    std::error::Error::source(e)?
        .downcast_ref::<jetstream::Error>()
        .map(jetstream::Error::error_code)
}

fn classify_atomic(e: PublishError) -> AtomicError {
    match api_error_code(&e).and_then(Fallback::of) {
        Some(f) => AtomicError::Fallback(f),
        None => AtomicError::Failed(classify(e)),
    }
}

/// Maps a publish error to the answer: a full stream is 429, anything else 503.
///
/// A stream at its limits with DiscardNew answers with JetStream error 10077 ("maximum bytes
/// exceeded", "maximum messages exceeded", "maximum messages per subject exceeded"); 10077 also
/// covers other store failures, so the description decides.
fn classify(e: PublishError) -> ApiError {
    // The error's text includes the server's description and code.
    classify_text(e.to_string())
}

fn classify_text(cause: String) -> ApiError {
    if is_stream_full(&cause) {
        ApiError::StreamFull { cause }
    } else {
        ApiError::Unavailable { cause }
    }
}

/// Whether an error text means the stream is out of space.
fn is_stream_full(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("maximum bytes") || m.contains("maximum messages")
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::PublishErrorKind;

    use super::*;

    #[test]
    fn stream_full_detection() {
        assert!(is_stream_full(
            "maximum bytes exceeded (code 503, error code 10077)"
        ));
        assert!(is_stream_full("maximum messages exceeded"));
        assert!(is_stream_full("publish failed: Maximum Bytes exceeded"));
        assert!(!is_stream_full("disk I/O error"));
        let err = classify(PublishError::new(PublishErrorKind::TimedOut));
        assert_eq!(err.kind(), "unavailable");
        let err = classify(PublishError::with_source(
            PublishErrorKind::Other,
            "maximum bytes exceeded",
        ));
        assert_eq!(err.kind(), "stream_full");
    }

    #[test]
    fn fallbacks_by_error_code() {
        let cases = [
            (10201, Some("duplicate_id")),
            (10158, Some("duplicate_id")),
            (10199, Some("too_large")),
            (10210, Some("too_many_in_flight")),
            (10176, Some("incomplete")),
            (10174, Some("disabled")),
            (10175, Some("refused")),
            (10077, None),
            (10060, None),
        ];
        for (code, want) in cases {
            assert_eq!(
                Fallback::of(ErrorCode(code)).map(Fallback::label),
                want,
                "{code}"
            );
        }
    }

    #[test]
    fn server_errors_are_read_from_publish_errors() {
        let api: jetstream::Error = serde_json::from_str(
            r#"{"code":400,"err_code":10201,"description":"atomic publish batch contains duplicate message id"}"#,
        )
        .unwrap();
        let e = PublishError::with_source(PublishErrorKind::Other, api);
        assert_eq!(api_error_code(&e), Some(ErrorCode(10201)));
        assert!(matches!(
            classify_atomic(e),
            AtomicError::Fallback(Fallback::DuplicateId)
        ));
        let e = PublishError::new(PublishErrorKind::TimedOut);
        assert_eq!(api_error_code(&e), None);
        assert!(matches!(
            classify_atomic(e),
            AtomicError::Failed(ApiError::Unavailable { .. })
        ));
        let reply: StartReply = serde_json::from_str(
            r#"{"error":{"code":429,"err_code":10210,"description":"atomic publish too many inflight"},"stream":"EV","seq":0}"#,
        )
        .unwrap();
        assert_eq!(
            reply.error.map(|e| e.error_code()),
            Some(ErrorCode::ATOMIC_PUBLISH_TOO_MANY_INFLIGHT)
        );
    }

    #[test]
    fn repeated_ids_are_found() {
        let e = |id: &str| Event {
            id: id.into(),
            ..Default::default()
        };
        let (a, b, a2) = (e("s:a"), e("s:b"), e("s:a"));
        assert!(!has_repeated_id(&[&a, &b]));
        assert!(has_repeated_id(&[&a, &b, &a2]));
    }
}
