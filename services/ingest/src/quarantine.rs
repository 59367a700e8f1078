//! The quarantine: payloads ingest could not accept, each kept as a `herald.v1.QuarantineRecord`
//! with its reason in the stream `<PREFIX>_QUARANTINE` on `<prefix>.quarantine.<source>`, so a
//! person can see why, fix the cause (create the source, change a setting) and redrive it.
//!
//! - [`Quarantine`] writes records, with JetStream acks and a `Nats-Msg-Id` derived from the
//!   record's origin and content, so a retried write stores it once.
//! - [`QuarantineGrpc`] serves `herald.v1.QuarantineService`: `ListQuarantine` and
//!   `RedriveQuarantine`, which submits a record's original payload again through
//!   [`Intake::submit`]: what passes goes to the events stream and the record is deleted; what
//!   fails again is written as a new record (the new reason, attempt + 1) and the old one is
//!   deleted.
//!
//! Ingest creates the stream (limits retention, max age `topology.quarantine_max_age_seconds`,
//! DiscardNew). A full quarantine refuses new records instead of evicting old ones: the NATS
//! intake then keeps its messages (retrying, unacked) and an HTTP batch with invalid items is
//! answered 503, so nothing accepted is lost.

use std::future::IntoFuture;
use std::pin::Pin;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use async_nats::jetstream::{self, context::PublishError};
use bytes::Bytes;
use chrono::Utc;
use futures_util::future::join_all;
use futures_util::{Stream, TryStreamExt};
use herald_common::Topology;
use herald_common::nats::is_connected;
use herald_proto::v1::quarantine_service_server::{QuarantineService, QuarantineServiceServer};
use herald_proto::v1::{
    ListQuarantineRequest, ListQuarantineResponse, PayloadFormat, QuarantineEntry,
    QuarantineRecord, RedriveOutcome, RedriveQuarantineProgress, RedriveQuarantineRequest,
};
use prost::Message as _;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::events::{QuarantineWriteFailed, Quarantined, RedriveDone};
use crate::intake::{Intake, Submission, from_timestamp, reason_label};

/// The readiness check flipped once the quarantine stream exists with Herald's config.
pub const STREAM_CHECK: &str = "quarantine stream";

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = "herald.v1.QuarantineService";

/// Records listed when a request names no limit.
const DEFAULT_LIST_LIMIT: u32 = 100;
/// Most records listed in one request.
const MAX_LIST_LIMIT: u32 = 1000;
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

/// The origin of events that came in through `/v2/bulkevents/historical`: a redrive keeps them
/// historical.
pub const HISTORICAL_ORIGIN: &str = "http:/v2/bulkevents/historical";

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

/// Quarantine records for the invalid items of a batch request received over HTTP (the
/// request is still answered with success): each item as a one-item batch of its API (Segment
/// for `/v1/*`, mParticle for `/v2/*`), with its reason and position.
pub fn http_batch_records(
    source_id: &str,
    route: &str,
    body: &[u8],
    rejected: &[(usize, crate::segment::InvalidEvent)],
    received_at: chrono::DateTime<Utc>,
) -> Vec<QuarantineRecord> {
    let positions: Vec<usize> = rejected.iter().map(|(i, _)| *i).collect();
    let (format, payloads, what) = if route.starts_with("/v2/") {
        (
            PayloadFormat::MparticleJson,
            one_event_mparticle_batches(body, &positions),
            "event",
        )
    } else {
        (
            PayloadFormat::SegmentJson,
            one_item_batches(body, &positions),
            "batch item",
        )
    };
    let now = crate::intake::to_timestamp(Utc::now());
    let received = crate::intake::to_timestamp(received_at);
    rejected
        .iter()
        .zip(payloads)
        .map(|((index, invalid), payload)| QuarantineRecord {
            source_id: source_id.to_string(),
            reason: invalid.reason().to_string(),
            message: format!("{what} {index}: {invalid}"),
            origin: format!("http:{route}"),
            payload: payload.to_vec(),
            format: format as i32,
            content_type: "application/json".into(),
            received_at: Some(received),
            quarantined_at: Some(now),
            attempt: 1,
            intake_sequence: 0,
            item_index: i32::try_from(*index).unwrap_or(i32::MAX),
            payload_truncated: false,
        })
        .collect()
}

/// Quarantines the invalid items of an accepted HTTP batch request; fails (the request is then
/// answered 503) when the records cannot be stored.
pub async fn quarantine_http_items(
    quarantine: &Quarantine,
    source_id: &str,
    route: &str,
    body: &[u8],
    received_at: chrono::DateTime<Utc>,
    rejected: &[(usize, crate::segment::InvalidEvent)],
) -> Result<(), ApiError> {
    if rejected.is_empty() {
        return Ok(());
    }
    let records = http_batch_records(source_id, route, body, rejected, received_at);
    quarantine.record_all(&records).await?;
    for r in &records {
        Quarantined {
            via: "http",
            source: source_id,
            reason: reason_label(&r.reason),
            message: &r.message,
        }
        .emit();
    }
    Ok(())
}

/// Serves `herald.v1.QuarantineService`.
#[derive(Clone)]
pub struct QuarantineGrpc {
    intake: Intake,
    js: jetstream::Context,
}

impl QuarantineGrpc {
    /// The service: redrives go through `intake`; records are read with `js`.
    pub fn new(intake: Intake, js: jetstream::Context) -> Self {
        Self { intake, js }
    }

    /// The tonic server wrapping it.
    pub fn into_server(self) -> QuarantineServiceServer<Self> {
        QuarantineServiceServer::new(self)
    }

    fn topology(&self) -> &Topology {
        self.intake.publisher().topology()
    }

    async fn stream(&self) -> Result<stream::Stream, Status> {
        let name = self.topology().quarantine_stream();
        self.js.get_stream(&name).await.map_err(|e| {
            Status::unavailable(format!(
                "cannot read the quarantine stream {name}: {e} (is NATS up and ingest ready?)"
            ))
        })
    }

    fn filter(&self, source_id: &str) -> Result<String, Status> {
        if source_id.is_empty() {
            return Ok(self.topology().quarantine_wildcard());
        }
        if subject_token(source_id) != source_id {
            return Err(Status::invalid_argument(format!(
                "source id {source_id:?} cannot name a quarantine subject"
            )));
        }
        Ok(self.topology().quarantine_subject(source_id))
    }

    /// Redrives one fetched record; see the module docs.
    async fn redrive_message(&self, stream: &stream::Stream, msg: StreamMessage) -> Progress {
        let seq = msg.sequence;
        let rec = match QuarantineRecord::decode(msg.payload) {
            Ok(rec) => rec,
            Err(e) => {
                return Progress::failed(
                    seq,
                    format!("message {seq} is not a quarantine record: {e}"),
                );
            }
        };
        if rec.payload_truncated {
            return Progress::failed(
                seq,
                "its payload was truncated to fit the NATS message size limit; it cannot be redriven".into(),
            );
        }
        let payload = Bytes::from(rec.payload);
        let received_at = rec
            .received_at
            .as_ref()
            .and_then(from_timestamp)
            .unwrap_or_else(Utc::now);
        let format = PayloadFormat::try_from(rec.format).unwrap_or(PayloadFormat::Unspecified);
        let decoded = self.intake.submit(&Submission {
            source_id: &rec.source_id,
            format,
            content_type: &rec.content_type,
            payload: &payload,
            received_at,
            origin: &rec.origin,
            intake_sequence: rec.intake_sequence,
            attempt: rec.attempt.saturating_add(1),
            item_index: (rec.item_index >= 0).then_some(rec.item_index),
        });
        let (published, new_sequences) = match self.intake.store(&decoded).await {
            Ok(stored) => stored,
            Err(e) => return Progress::failed(seq, format!("not redriven: {e}")),
        };
        if let Some(p) = published {
            crate::events::EventsAccepted {
                source: &rec.source_id,
                count: p.acked,
                duplicates: p.duplicates,
                publish_elapsed: p.elapsed,
            }
            .emit();
        }
        for r in &decoded.rejected {
            Quarantined {
                via: "redrive",
                source: &r.source_id,
                reason: reason_label(&r.reason),
                message: &r.message,
            }
            .emit();
        }
        if let Err(e) = stream.delete_message(seq).await {
            return Progress::failed(
                seq,
                format!(
                    "its payload was stored again, but the record could not be deleted: {e}; redriving it again is harmless"
                ),
            );
        }
        let events = u32::try_from(decoded.events.len()).unwrap_or(u32::MAX);
        match decoded.rejected.first() {
            None => Progress {
                sequence: seq,
                outcome: RedriveOutcome::Redriven,
                events_published: events,
                ..Progress::default()
            },
            Some(first) => Progress {
                sequence: seq,
                outcome: RedriveOutcome::QuarantinedAgain,
                events_published: events,
                new_sequences,
                reason: first.reason.clone(),
                message: first.message.clone(),
            },
        }
    }

    async fn redrive_sequence(&self, stream: &stream::Stream, seq: u64) -> Progress {
        match stream.get_raw_message(seq).await {
            Ok(msg) => self.redrive_message(stream, msg).await,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Progress {
                sequence: seq,
                outcome: RedriveOutcome::NotFound,
                message: format!("no quarantine record has sequence {seq}"),
                ..Progress::default()
            },
            Err(e) => Progress::failed(seq, format!("cannot read record {seq}: {e}")),
        }
    }

    async fn run_redrive(
        self,
        stream: stream::Stream,
        plan: Plan,
        tx: tokio::sync::mpsc::Sender<Result<RedriveQuarantineProgress, Status>>,
    ) {
        let mut done = 0u64;
        let send = |p: Progress, done: u64, total: u64| {
            RedriveDone {
                outcome: outcome_label(p.outcome),
            }
            .emit();
            p.into_proto(done, total.max(done))
        };
        match plan {
            Plan::Sequences(seqs) => {
                let total = seqs.len() as u64;
                for seq in seqs {
                    let p = self.redrive_sequence(&stream, seq).await;
                    done += 1;
                    if tx.send(Ok(send(p, done, total))).await.is_err() {
                        return; // the caller went away: stop here
                    }
                }
            }
            Plan::All {
                subject,
                last,
                total,
            } => {
                let mut next = 1u64;
                loop {
                    let msg = match stream
                        .get_first_raw_message_by_subject(&subject, next)
                        .await
                    {
                        Ok(msg) if msg.sequence <= last => msg,
                        Ok(_) => break,
                        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::unavailable(format!(
                                    "cannot read the quarantine after {done} records: {e}; run the redrive again to continue"
                                ))))
                                .await;
                            return;
                        }
                    };
                    next = msg.sequence + 1;
                    let p = self.redrive_message(&stream, msg).await;
                    done += 1;
                    if tx.send(Ok(send(p, done, total))).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Which records a redrive handles.
enum Plan {
    Sequences(Vec<u64>),
    All {
        subject: String,
        last: u64,
        total: u64,
    },
}

/// One record's redrive result, before the running counts are added.
#[derive(Default)]
struct Progress {
    sequence: u64,
    outcome: RedriveOutcome,
    events_published: u32,
    new_sequences: Vec<u64>,
    reason: String,
    message: String,
}

impl Progress {
    fn failed(sequence: u64, message: String) -> Self {
        Self {
            sequence,
            outcome: RedriveOutcome::Failed,
            message,
            ..Self::default()
        }
    }

    fn into_proto(self, done: u64, total: u64) -> RedriveQuarantineProgress {
        RedriveQuarantineProgress {
            sequence: self.sequence,
            outcome: self.outcome as i32,
            events_published: self.events_published,
            new_sequences: self.new_sequences,
            reason: self.reason,
            message: self.message,
            done,
            total,
        }
    }
}

/// The metric label of a redrive outcome.
pub fn outcome_label(o: RedriveOutcome) -> &'static str {
    match o {
        RedriveOutcome::Unspecified => "unspecified",
        RedriveOutcome::Redriven => "redriven",
        RedriveOutcome::QuarantinedAgain => "quarantined_again",
        RedriveOutcome::NotFound => "not_found",
        RedriveOutcome::Failed => "failed",
    }
}

/// The stream of redrive progress messages.
pub type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<RedriveQuarantineProgress, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl QuarantineService for QuarantineGrpc {
    async fn list_quarantine(
        &self,
        request: Request<ListQuarantineRequest>,
    ) -> Result<Response<ListQuarantineResponse>, Status> {
        let req = request.into_inner();
        let filter = self.filter(&req.source_id)?;
        let limit = match req.limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        } as usize;
        let stream = self.stream().await?;
        let mut next = req.start_sequence.max(1);
        let mut entries = Vec::new();
        let mut next_sequence = 0;
        loop {
            let msg = match stream.get_first_raw_message_by_subject(&filter, next).await {
                Ok(msg) => msg,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "cannot read the quarantine: {e}"
                    )));
                }
            };
            if entries.len() == limit {
                next_sequence = msg.sequence;
                break;
            }
            next = msg.sequence + 1;
            let record = QuarantineRecord::decode(msg.payload).map_err(|e| {
                Status::internal(format!(
                    "quarantine message {} is not a QuarantineRecord: {e}",
                    msg.sequence
                ))
            })?;
            entries.push(QuarantineEntry {
                sequence: msg.sequence,
                record: Some(record),
            });
        }
        Ok(Response::new(ListQuarantineResponse {
            entries,
            next_sequence,
        }))
    }

    type RedriveQuarantineStream = ProgressStream;

    async fn redrive_quarantine(
        &self,
        request: Request<RedriveQuarantineRequest>,
    ) -> Result<Response<Self::RedriveQuarantineStream>, Status> {
        let req = request.into_inner();
        if !self.intake.sources_loaded() {
            return Err(Status::unavailable(
                "ingest has not loaded its sources yet (see its /readyz); retry shortly",
            ));
        }
        let plan = match (req.sequences.is_empty(), req.all) {
            (false, false) => {
                if !req.source_id.is_empty() {
                    return Err(Status::invalid_argument(
                        "give sequences, or a source with `all`, not both",
                    ));
                }
                let mut seqs = req.sequences;
                let mut seen = std::collections::HashSet::new();
                seqs.retain(|s| seen.insert(*s));
                Plan::Sequences(seqs)
            }
            (true, true) => {
                if req.source_id.is_empty() {
                    return Err(Status::invalid_argument(
                        "`all` redrives every record of one source: name the source",
                    ));
                }
                let subject = self.filter(&req.source_id)?;
                let mut stream = self.stream().await?;
                let last = stream
                    .info()
                    .await
                    .map_err(|e| Status::unavailable(format!("quarantine stream info: {e}")))?
                    .state
                    .last_sequence;
                let total = stream
                    .info_with_subjects(&subject)
                    .await
                    .map_err(|e| Status::unavailable(format!("quarantine stream info: {e}")))?
                    .try_fold(0u64, |n, (_, count)| async move { Ok(n + count as u64) })
                    .await
                    .map_err(|e| Status::unavailable(format!("quarantine stream info: {e}")))?;
                Plan::All {
                    subject,
                    last,
                    total,
                }
            }
            (false, true) => {
                return Err(Status::invalid_argument(
                    "give sequences, or a source with `all`, not both",
                ));
            }
            (true, false) => {
                return Err(Status::invalid_argument(
                    "name the records to redrive: sequences, or a source with `all`",
                ));
            }
        };
        let stream = self.stream().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(self.clone().run_redrive(stream, plan, tx));
        let out = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(out)))
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
