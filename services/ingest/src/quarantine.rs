//! The quarantine: payloads ingest could not accept, each kept as a `herald.v1.QuarantineRecord`
//! with its reason in the stream `<PREFIX>_QUARANTINE` on `<prefix>.quarantine.<source>`, so a
//! person can see why, fix the cause (create the source, change a setting) and redrive it.
//!
//! - [`Quarantine`] writes records, with JetStream acks and a `Nats-Msg-Id` derived from the
//!   record's origin and content, so a retried write stores it once.
//! - [`Submission`] is one payload as received (an HTTP request, a NATS intake message, or a
//!   record being redriven); [`record`] and [`item_records`] make the records of what in it
//!   failed, each invalid item of a batch as a one-item batch of its format.
//! - [`crate::quarantine_service`] serves `herald.v1.QuarantineService` (list and redrive).
//!
//! Ingest creates the stream (limits retention, max age `topology.quarantine_max_age_seconds`,
//! DiscardNew). A full quarantine refuses new records instead of evicting old ones: the NATS
//! intake then keeps its messages (retrying, unacked) and an HTTP batch with invalid items is
//! answered 503, so nothing accepted is lost.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;
use async_nats::jetstream::{self, context::PublishError};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use herald_common::Topology;
use herald_common::nats::is_connected;
use herald_proto::time::to_proto;
use herald_proto::v1::{PayloadFormat, QuarantineRecord};
use prost::Message as _;
use serde_json::Value;

use crate::error::ApiError;
use crate::events::{QuarantineWriteFailed, Quarantined};
use crate::normalise::{Reason, Rejected};
use crate::segment::Shape;

/// The readiness check flipped once the quarantine stream exists with Herald's config.
pub const STREAM_CHECK: &str = "quarantine stream";

/// Room left in a NATS message for headers and framing when a record is fitted to the limit.
const HEADROOM: usize = 4096;
/// The NATS message size limit assumed until the server has told its own.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Config of the quarantine stream: limits retention with a max age, DiscardNew (a full
/// quarantine refuses new records; see the module docs), the shared duplicate window.
pub fn stream_config(topology: &Topology) -> stream::Config {
    let cfg = topology.config();
    stream::Config {
        name: topology.quarantine_stream(),
        description: Some(
            "Herald: payloads ingest could not accept, with their reason; list and redrive them"
                .into(),
        ),
        subjects: vec![topology.quarantine_wildcard()],
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        max_bytes: cfg.quarantine_max_bytes,
        max_age: Duration::from_secs(cfg.quarantine_max_age_seconds),
        num_replicas: cfg.replicas,
        duplicate_window: Duration::from_secs(cfg.duplicate_window_seconds),
        ..Default::default()
    }
}

/// Writing a quarantine record failed; nothing was acknowledged for it.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    /// NATS is not connected, or JetStream did not acknowledge in time or failed.
    #[error("quarantine unavailable: {0}")]
    Unavailable(String),
    /// The quarantine stream is full (`topology.quarantine_max_bytes`).
    #[error("quarantine stream is full: {0}")]
    Full(String),
}

impl QuarantineError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::Full(_) => "full",
        }
    }
}

/// An HTTP request whose invalid items cannot be quarantined is answered 503: the client
/// retries, and nothing it sent is lost.
impl From<QuarantineError> for ApiError {
    fn from(e: QuarantineError) -> Self {
        ApiError::Unavailable {
            cause: e.to_string(),
        }
    }
}

/// Writes quarantine records.
#[derive(Clone)]
pub struct Quarantine {
    client: Client,
    js: jetstream::Context,
    topology: Topology,
    timeout: Duration,
}

impl Quarantine {
    /// A writer over this client; acks are awaited at most `timeout` per call.
    pub fn new(
        client: Client,
        js: jetstream::Context,
        topology: Topology,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            js,
            topology,
            timeout,
        }
    }

    /// Writes one record and waits for its PubAck; returns its stream sequence.
    pub async fn record(&self, rec: &QuarantineRecord) -> Result<u64, QuarantineError> {
        let seqs = self.record_all(std::slice::from_ref(rec)).await?;
        Ok(seqs[0])
    }

    /// Writes records pipelined and waits for every PubAck; returns their stream sequences in
    /// order. A record written before (same `Nats-Msg-Id`, within the duplicate window) is not
    /// stored again; its first sequence is returned.
    pub async fn record_all(&self, recs: &[QuarantineRecord]) -> Result<Vec<u64>, QuarantineError> {
        if recs.is_empty() {
            return Ok(Vec::new());
        }
        let result = self.write(recs).await;
        if let Err(e) = &result {
            QuarantineWriteFailed {
                kind: e.kind(),
                error: e,
                count: recs.len(),
            }
            .emit();
        }
        result
    }

    async fn write(&self, recs: &[QuarantineRecord]) -> Result<Vec<u64>, QuarantineError> {
        if !is_connected(&self.client) {
            return Err(QuarantineError::Unavailable("NATS is not connected".into()));
        }
        let max_payload = match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        };
        let send_and_ack = async {
            let mut acks = Vec::with_capacity(recs.len());
            for rec in recs {
                let subject = self
                    .topology
                    .quarantine_subject(&subject_token(&rec.source_id));
                let publish = PublishMessage::build()
                    .payload(encode_fitting(rec, max_payload))
                    .message_id(record_id(rec));
                acks.push(
                    self.js
                        .send_publish(subject, publish)
                        .await
                        .map_err(classify)?,
                );
            }
            join_all(acks.into_iter().map(IntoFuture::into_future))
                .await
                .into_iter()
                .map(|r| r.map(|ack| ack.sequence).map_err(classify))
                .collect()
        };
        match tokio::time::timeout(self.timeout, send_and_ack).await {
            Ok(result) => result,
            Err(_) => Err(QuarantineError::Unavailable(format!(
                "no JetStream ack within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}

/// A record's `Nats-Msg-Id`: a hash of where the payload came from (source, origin, intake
/// sequence, item index), the attempt and the payload. A retried write of the same failure
/// dedupes; a redrive that fails again (attempt + 1) is a new record.
pub fn record_id(rec: &QuarantineRecord) -> String {
    let mut buf = Vec::with_capacity(rec.payload.len() + 128);
    for part in [rec.source_id.as_bytes(), rec.origin.as_bytes()] {
        buf.extend_from_slice(part);
        buf.push(0);
    }
    buf.extend_from_slice(&rec.intake_sequence.to_be_bytes());
    buf.extend_from_slice(&rec.item_index.to_be_bytes());
    buf.extend_from_slice(&rec.attempt.to_be_bytes());
    buf.extend_from_slice(&rec.payload);
    format!("q:{}", &herald_common::auth::sha256_hex(&buf)[..32])
}

/// The record encoded, its payload cut (and `payload_truncated` set) when it would not fit in
/// a NATS message of `max_payload` bytes.
fn encode_fitting(rec: &QuarantineRecord, max_payload: usize) -> Bytes {
    let limit = max_payload.saturating_sub(HEADROOM);
    let len = rec.encoded_len();
    if len <= limit {
        return rec.encode_to_vec().into();
    }
    let mut cut = rec.clone();
    let over = len - limit + 16; // the length prefix of `payload` shrinks too; keep a margin
    cut.payload.truncate(cut.payload.len().saturating_sub(over));
    cut.payload_truncated = true;
    cut.encode_to_vec().into()
}

/// A subject token for a source id: ids are single tokens already; anything that is not
/// (`.`, wildcards, whitespace) becomes `_`, so the record still lands in the stream.
pub fn subject_token(source_id: &str) -> String {
    if source_id.is_empty() {
        return "_".into();
    }
    source_id
        .chars()
        .map(|c| {
            if matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn classify(e: PublishError) -> QuarantineError {
    let cause = e.to_string();
    let lower = cause.to_ascii_lowercase();
    if lower.contains("maximum bytes") || lower.contains("maximum messages") {
        QuarantineError::Full(cause)
    } else {
        QuarantineError::Unavailable(cause)
    }
}

/// For each index, the Segment batch `body` reduced to that one item, keeping the batch's
/// other fields (`context`, `integrations`, `sentAt`; not `writeKey`), so the item can be
/// redriven on its own exactly as it was first read. Falls back to the whole body if it cannot
/// be read again (it was read once already, so this does not happen).
pub fn one_item_batches(body: &[u8], indices: &[usize]) -> Vec<Bytes> {
    let whole = || vec![Bytes::copy_from_slice(body); indices.len()];
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
        return whole();
    };
    let Some(Value::Array(mut items)) = obj.remove("batch") else {
        return whole();
    };
    obj.remove("writeKey");
    indices
        .iter()
        .map(|&i| {
            let item = items.get_mut(i).map(Value::take).unwrap_or(Value::Null);
            let mut one = obj.clone();
            one.insert("batch".into(), Value::Array(vec![item]));
            Bytes::from(serde_json::to_vec(&Value::Object(one)).expect("JSON serialises"))
        })
        .collect()
}

/// For each position (among all events of the body, batch after batch), the mParticle batch
/// holding that event reduced to that one event, keeping the batch's other fields. `body` is
/// one batch object (`/v2/events`) or an array of them (`/v2/bulkevents`). Falls back to the
/// whole body if it cannot be read again.
pub fn one_event_mparticle_batches(body: &[u8], positions: &[usize]) -> Vec<Bytes> {
    let whole = || vec![Bytes::copy_from_slice(body); positions.len()];
    let batches = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items,
        Ok(obj @ Value::Object(_)) => vec![obj],
        _ => return whole(),
    };
    // (batch index, event index) of every event, in order.
    let mut places = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        let n = batch
            .get("events")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        places.extend((0..n).map(|e| (b, e)));
    }
    positions
        .iter()
        .map(|&p| match places.get(p) {
            Some(&(b, e)) => {
                let mut one = batches[b].clone();
                let event = one["events"][e].take();
                one["events"] = Value::Array(vec![event]);
                Bytes::from(serde_json::to_vec(&one).expect("JSON serialises"))
            }
            None => Bytes::copy_from_slice(body),
        })
        .collect()
}

/// The origin the previous version wrote for `/v2/bulkevents/historical` records, before
/// records carried `historical`: such a record is still redriven as historical.
const LEGACY_HISTORICAL_ORIGIN: &str = "http:/v2/bulkevents/historical";

/// Whether a record's payload was a historical import: its `historical` field, or (a record of
/// the previous version) its origin.
pub fn is_historical(rec: &QuarantineRecord) -> bool {
    rec.historical || rec.origin == LEGACY_HISTORICAL_ORIGIN
}

/// One payload as received: a new HTTP request or NATS intake message, or a quarantined one
/// being redriven. What its quarantine records say about where it came from.
#[derive(Debug, Clone)]
pub struct Submission<'a> {
    /// The source it was sent for.
    pub source_id: &'a str,
    /// How it is encoded.
    pub format: PayloadFormat,
    /// The content type the producer declared.
    pub content_type: &'a str,
    /// The payload.
    pub payload: &'a Bytes,
    /// When Herald first received it.
    pub received_at: DateTime<Utc>,
    /// Where it came in (`nats:<subject>`, `http:/v1/batch`), for people.
    pub origin: &'a str,
    /// Whether its events are historical imports (`/v2/bulkevents/historical`).
    pub historical: bool,
    /// The intake stream sequence, for NATS intake; 0 otherwise.
    pub intake_sequence: u64,
    /// The attempt a failure is recorded as: 1 for a new payload, one more per redrive.
    pub attempt: u32,
    /// For a redriven batch item: its index in the original batch, kept in new records.
    pub item_index: Option<i32>,
}

/// The record of a submission (or, with `item_index`, of one item of it) that failed.
pub fn record(
    sub: &Submission<'_>,
    reason: Reason,
    message: String,
    payload: Bytes,
    item_index: Option<i32>,
) -> QuarantineRecord {
    QuarantineRecord {
        source_id: sub.source_id.to_string(),
        reason: reason.label().to_string(),
        message,
        origin: sub.origin.to_string(),
        payload: payload.to_vec(),
        format: sub.format as i32,
        content_type: sub.content_type.to_string(),
        received_at: Some(to_proto(sub.received_at)),
        quarantined_at: Some(to_proto(Utc::now())),
        attempt: sub.attempt,
        intake_sequence: sub.intake_sequence,
        item_index: item_index.or(sub.item_index).unwrap_or(-1),
        payload_truncated: false,
        historical: sub.historical,
    }
}

/// The records of a submission's rejected events: an item of a Segment batch as a one-item
/// batch, an mParticle event as its batch with only that event (both keeping their position
/// unless the submission is a redriven item already); a single event or a protobuf payload as
/// the whole payload.
pub fn item_records(sub: &Submission<'_>, rejected: Vec<Rejected>) -> Vec<QuarantineRecord> {
    if rejected.is_empty() {
        return Vec::new();
    }
    let positions: Vec<usize> = rejected.iter().map(|r| r.index).collect();
    let (payloads, what) = match sub.format {
        PayloadFormat::SegmentJson if Shape::of_payload(sub.payload) == Shape::Batch => {
            (one_item_batches(sub.payload, &positions), "batch item")
        }
        PayloadFormat::MparticleJson => (
            one_event_mparticle_batches(sub.payload, &positions),
            "event",
        ),
        _ => {
            return rejected
                .into_iter()
                .map(|r| {
                    let reason = r.error.reason();
                    record(sub, reason, r.error.to_string(), sub.payload.clone(), None)
                })
                .collect();
        }
    };
    rejected
        .into_iter()
        .zip(payloads)
        .map(|(r, payload)| {
            let index = sub
                .item_index
                .unwrap_or(i32::try_from(r.index).unwrap_or(i32::MAX));
            let reason = r.error.reason();
            record(
                sub,
                reason,
                format!("{what} {index}: {}", r.error),
                payload,
                Some(index),
            )
        })
        .collect()
}

/// Counts and logs records once they are stored, by how their payload came in.
pub fn emit_quarantined(via: &'static str, records: &[QuarantineRecord]) {
    for r in records {
        Quarantined {
            via,
            source: &r.source_id,
            reason: Reason::from_label(&r.reason).label(),
            message: &r.message,
        }
        .emit();
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn rec(payload: &[u8]) -> QuarantineRecord {
        QuarantineRecord {
            source_id: "svc".into(),
            reason: "invalid_json".into(),
            origin: "nats:herald.in.svc".into(),
            payload: payload.to_vec(),
            attempt: 1,
            intake_sequence: 7,
            item_index: -1,
            ..Default::default()
        }
    }

    #[test]
    fn record_ids_follow_origin_content_and_attempt() {
        let a = rec(b"{");
        assert_eq!(record_id(&a), record_id(&a.clone()));
        assert!(record_id(&a).starts_with("q:"));
        let mut b = a.clone();
        b.quarantined_at = Some(prost_types::Timestamp::default());
        b.message = "other words".into();
        assert_eq!(
            record_id(&a),
            record_id(&b),
            "times and wording do not count"
        );
        for change in [
            |r: &mut QuarantineRecord| r.attempt = 2,
            |r: &mut QuarantineRecord| r.intake_sequence = 8,
            |r: &mut QuarantineRecord| r.item_index = 0,
            |r: &mut QuarantineRecord| r.payload = b"[".to_vec(),
            |r: &mut QuarantineRecord| r.source_id = "web".into(),
        ] {
            let mut c = a.clone();
            change(&mut c);
            assert_ne!(record_id(&a), record_id(&c));
        }
    }

    #[test]
    fn oversized_records_are_cut_to_fit() {
        let small = rec(b"{}");
        let bytes = encode_fitting(&small, 64 * 1024);
        assert!(!QuarantineRecord::decode(bytes).unwrap().payload_truncated);
        let big = rec(&vec![b'x'; 200 * 1024]);
        let bytes = encode_fitting(&big, 64 * 1024);
        assert!(bytes.len() <= 64 * 1024 - HEADROOM, "{}", bytes.len());
        let cut = QuarantineRecord::decode(bytes).unwrap();
        assert!(cut.payload_truncated);
        assert!(big.payload.starts_with(&cut.payload));
    }

    #[test]
    fn subject_tokens() {
        assert_eq!(subject_token("web"), "web");
        assert_eq!(subject_token("a.b c*>"), "a_b_c__");
        assert_eq!(subject_token(""), "_");
    }

    #[test]
    fn batch_items_keep_the_batch_fields() {
        let body = br#"{"writeKey":"k","context":{"ip":"1.2.3.4"},"sentAt":"2024-05-01T12:00:00Z",
            "batch":[{"type":"track","userId":"u","event":"A"},{"type":"track"},{"x":1}]}"#;
        let out = one_item_batches(body, &[1, 2]);
        assert_eq!(out.len(), 2);
        let first: Value = serde_json::from_slice(&out[0]).unwrap();
        assert_eq!(
            first,
            serde_json::json!({"context":{"ip":"1.2.3.4"},"sentAt":"2024-05-01T12:00:00Z",
                "batch":[{"type":"track"}]})
        );
        let second: Value = serde_json::from_slice(&out[1]).unwrap();
        assert_eq!(second["batch"], serde_json::json!([{"x": 1}]));
        // Not a batch: the body as is.
        assert_eq!(one_item_batches(b"{}", &[0])[0].as_ref(), b"{}");
    }

    #[test]
    fn mparticle_events_keep_their_batch() {
        let bulk = br#"[{"source_request_id":"r1","user_identities":{"email":"a@b.c"},
                         "events":[{"event_type":"custom_event"},{"event_type":"x"}]},
                        {"environment":"production","events":[{"event_type":"y"}]}]"#;
        let out = one_event_mparticle_batches(bulk, &[1, 2]);
        let first: Value = serde_json::from_slice(&out[0]).unwrap();
        assert_eq!(
            first,
            serde_json::json!({"source_request_id":"r1","user_identities":{"email":"a@b.c"},
                "events":[{"event_type":"x"}]})
        );
        let second: Value = serde_json::from_slice(&out[1]).unwrap();
        assert_eq!(
            second,
            serde_json::json!({"environment":"production","events":[{"event_type":"y"}]})
        );
        let single = br#"{"events":[{"event_type":"a"},{"event_type":"b"}],"mpid":7}"#;
        let out = one_event_mparticle_batches(single, &[0]);
        let only: Value = serde_json::from_slice(&out[0]).unwrap();
        assert_eq!(
            only,
            serde_json::json!({"events":[{"event_type":"a"}],"mpid":7})
        );
    }
}
