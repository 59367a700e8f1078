//! NATS intake: services publish events to `<prefix>.in.<source>` in the `<PREFIX>_INTAKE`
//! stream (so their PubAck is the durable handoff), and ingest moves them to the events stream.
//!
//! A message is Segment-shaped JSON (one event object or `{"batch": [...]}`) or one protobuf
//! `herald.v1.Event`, told apart by the `Herald-Content-Type` header (else `Content-Type`; see
//! [`format_named`]): a value containing `protobuf` means protobuf, no value or one containing
//! `json` means JSON (`mparticle` in it: one mParticle batch, as `/v2/events` takes). JSON goes
//! through the same parsing and normalisation as the HTTP API ([`crate::segment`],
//! [`crate::mparticle`]); events keep the same ids (`Nats-Msg-Id = <source>:<messageId>`), so
//! a message published twice yields one event.
//!
//! Whatever cannot be accepted (an unknown or disabled source, invalid JSON, an invalid item,
//! an undecodable protobuf) becomes a quarantine record with its reason
//! ([`crate::quarantine`]). An intake message is acked only after the PubAcks of all its events
//! and records; a failed publish is retried in process (the message kept alive with in-progress
//! acks), never nak'ed. The intake stream uses work-queue retention: an acked message is gone.
//!
//! [`Intake::submit`] is also what a quarantine redrive calls, so a redriven payload meets
//! exactly the validation a new one would.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, Message, stream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use herald_common::admin::Readiness;
use herald_common::nats::{ensure_stream, retry_until};
use herald_common::ordered::{KeepAlive, OrderedReader, ReaderConfig, backoff};
use herald_common::partition::partition_for;
use herald_common::{CommonConfig, Topology};
use herald_proto::v1::{Event, EventType, PayloadFormat, QuarantineRecord};
use prost::Message as _;
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio_util::sync::CancellationToken;

use crate::config::IngestConfig;
use crate::error::ApiError;
use crate::events::{
    EventsAccepted, EventsRejected, IntakeBatchRetried, IntakeMessagesHandled, Quarantined,
    StreamProvisioned,
};
use crate::http::AppState;
use crate::mparticle;
use crate::publish::{Published, Publisher};
use crate::quarantine::{self, Quarantine, QuarantineError};
use crate::segment::{InvalidEvent, Normaliser, corrected_timestamp, parse_batch, parse_single};
use crate::sources::Source;

/// The readiness check flipped once the intake stream exists and its consumer is bound.
pub const CONSUMER_CHECK: &str = "intake consumer";

/// The durable consumer every ingest replica pulls the intake stream from.
pub const DURABLE: &str = "ingest-intake";

/// The header that names the payload's encoding; `Content-Type` is read when it is absent.
pub const CONTENT_TYPE_HEADER: &str = "Herald-Content-Type";

/// How long an intake message may stay unacked before JetStream redelivers it. Handling keeps
/// it alive with in-progress acks while publishes are retried.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Most intake messages delivered and not yet acked.
const MAX_ACK_PENDING: i64 = 1024;
/// Most intake messages handled (and their events published) together.
const BATCH: usize = 256;
/// About how many events (and records) are stored together before their messages are acked.
const CHUNK_EVENTS: usize = 2048;
/// Longest wait between publish retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Config of the intake stream: `<prefix>.in.*`, work-queue retention (an acked message frees
/// its space), DiscardNew (a full stream refuses producers' publishes instead of evicting),
/// the shared duplicate window (producers may set `Nats-Msg-Id`), file storage.
pub fn stream_config(topology: &Topology) -> stream::Config {
    let cfg = topology.config();
    stream::Config {
        name: topology.intake_stream(),
        description: Some(
            "Herald: events services publish to <prefix>.in.<source>, moved to the events stream by ingest"
                .into(),
        ),
        subjects: vec![topology.intake_wildcard()],
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        max_bytes: cfg.intake_max_bytes,
        num_replicas: cfg.replicas,
        duplicate_window: Duration::from_secs(cfg.duplicate_window_seconds),
        ..Default::default()
    }
}

/// The payload format an intake message declares in its headers (names compared without
/// regard to case), and the declared content type as text (empty when none).
pub fn format_of(headers: Option<&HeaderMap>) -> (PayloadFormat, String) {
    let find = |name: &str| {
        headers?.iter().find_map(|(k, v)| {
            let k: &str = k.as_ref();
            k.eq_ignore_ascii_case(name)
                .then(|| v.first().map(|v| v.as_str().trim().to_string()))
                .flatten()
        })
    };
    let declared = find(CONTENT_TYPE_HEADER)
        .or_else(|| find("Content-Type"))
        .unwrap_or_default();
    (format_named(&declared), declared)
}

/// The payload format a content type names: `protobuf` anywhere in it means a protobuf
/// `herald.v1.Event`; `mparticle` (e.g. `application/vnd.mparticle+json`) one mParticle batch
/// (the `/v2/events` body); none, or one mentioning `json`, means Segment JSON; anything else
/// is not understood.
pub fn format_named(content_type: &str) -> PayloadFormat {
    let ct = content_type.to_ascii_lowercase();
    if ct.contains("protobuf") {
        PayloadFormat::ProtobufEvent
    } else if ct.contains("mparticle") {
        PayloadFormat::MparticleJson
    } else if ct.is_empty() || ct.contains("json") {
        PayloadFormat::SegmentJson
    } else {
        PayloadFormat::Unspecified
    }
}

/// One payload to validate: a new intake message, or a quarantined one being redriven.
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
    /// Where it came in (`nats:<subject>`, `http:/v1/batch`).
    pub origin: &'a str,
    /// The intake stream sequence, for NATS intake; 0 otherwise.
    pub intake_sequence: u64,
    /// The attempt a failure is recorded as: 1 for a new payload, one more per redrive.
    pub attempt: u32,
    /// For a redriven batch item: its index in the original batch, kept in new records.
    pub item_index: Option<i32>,
}

/// What validation made of a submission: the events to publish and the records to quarantine.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Valid events, normalised.
    pub events: Vec<Event>,
    /// What failed, as quarantine records.
    pub rejected: Vec<QuarantineRecord>,
    /// Ranges of `events` to store as one atomic batch each (a batch message of an
    /// `atomic_publish` source); the others are published pipelined.
    pub atomic: Vec<std::ops::Range<usize>>,
}

impl Decoded {
    /// Appends another submission's outcome, keeping its atomic ranges.
    pub fn extend(&mut self, other: Decoded) {
        let offset = self.events.len();
        self.atomic.extend(
            other
                .atomic
                .into_iter()
                .map(|r| r.start + offset..r.end + offset),
        );
        self.events.extend(other.events);
        self.rejected.extend(other.rejected);
    }
}

/// Why a whole payload (not one item of it) was not accepted.
struct Refusal {
    reason: &'static str,
    message: String,
}

/// Validation and publishing of NATS intake messages and quarantine redrives.
#[derive(Clone)]
pub struct Intake {
    state: AppState,
    publisher: Publisher,
    quarantine: Quarantine,
    partitions: u32,
    max_event_bytes: usize,
    max_batch_events: usize,
    max_message_id_chars: usize,
}

impl Intake {
    /// Intake over the service's state (for its sources) and a JetStream context.
    pub fn new(
        state: AppState,
        common: &CommonConfig,
        cfg: &IngestConfig,
        js: jetstream::Context,
    ) -> Self {
        let topology = Topology::new(common.topology.clone());
        let timeout = Duration::from_millis(cfg.publish_timeout_ms);
        let client = state.client().clone();
        Self {
            // The HTTP API's publisher: the same seen-set.
            publisher: state.publisher().clone(),
            quarantine: Quarantine::new(client, js, topology.clone(), timeout),
            partitions: topology.partitions(),
            max_event_bytes: cfg.max_event_bytes,
            max_batch_events: cfg.max_batch_events,
            max_message_id_chars: cfg.max_message_id_chars,
            state,
        }
    }

    /// The publisher events go out with.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The quarantine writer.
    pub fn quarantine(&self) -> &Quarantine {
        &self.quarantine
    }

    /// Validates a payload and normalises what is valid; never fails: what cannot be accepted
    /// comes back as quarantine records with their reason.
    pub fn submit(&self, sub: &Submission<'_>) -> Decoded {
        self.submit_among(sub, &self.state.sources().list())
    }

    /// Whether the sources have been loaded, so that an unknown source really is unknown.
    pub fn sources_loaded(&self) -> bool {
        self.state.sources().is_loaded()
    }

    /// [`Intake::submit`] against a snapshot of the sources. The events of a batch message
    /// from an `atomic_publish` source are marked to be stored as one atomic batch.
    fn submit_among(&self, sub: &Submission<'_>, sources: &[Source]) -> Decoded {
        let refuse = |r: Refusal| Decoded {
            rejected: vec![record(sub, r.reason, r.message, sub.payload.clone(), None)],
            ..Decoded::default()
        };
        let atomic = match source_status(sources, sub.source_id) {
            SourceStatus::Enabled { atomic } => atomic,
            SourceStatus::Unknown => {
                return refuse(Refusal {
                    reason: "unknown_source",
                    message: format!(
                        "no source has the id {:?}: create it, then redrive this record",
                        sub.source_id
                    ),
                });
            }
            SourceStatus::Disabled => {
                return refuse(Refusal {
                    reason: "source_disabled",
                    message: format!(
                        "source {} is disabled: enable it, then redrive this record",
                        sub.source_id
                    ),
                });
            }
        };
        let mut decoded = match sub.format {
            PayloadFormat::SegmentJson => self.submit_json(sub),
            PayloadFormat::MparticleJson => self.submit_mparticle(sub),
            PayloadFormat::ProtobufEvent => match self.normalise_protobuf(sub) {
                Ok(event) => Decoded {
                    events: vec![event],
                    ..Decoded::default()
                },
                Err(r) => refuse(r),
            },
            PayloadFormat::Unspecified => refuse(Refusal {
                reason: "unsupported_content_type",
                message: format!(
                    "content type {:?} is neither JSON nor protobuf: set {CONTENT_TYPE_HEADER} to application/json, application/x-protobuf or application/vnd.mparticle+json",
                    sub.content_type
                ),
            }),
        };
        if atomic && decoded.events.len() > 1 {
            decoded.atomic.push(0..decoded.events.len());
        }
        decoded
    }

    /// One mParticle batch (`/v2/events` shape), normalised like the HTTP API does; a failing
    /// event is recorded as its batch with only that event.
    fn submit_mparticle(&self, sub: &Submission<'_>) -> Decoded {
        let whole = |reason: &str, message: String| Decoded {
            rejected: vec![record(sub, reason, message, sub.payload.clone(), None)],
            ..Decoded::default()
        };
        let batch = match mparticle::parse_events(sub.payload) {
            Ok(b) => b,
            Err(e) => return whole(e.kind(), e.to_string()),
        };
        if batch.events.len() > self.max_batch_events {
            let e = ApiError::TooManyEvents {
                count: batch.events.len(),
                limit: self.max_batch_events,
            };
            return whole(e.kind(), e.to_string());
        }
        let historical = sub.origin == quarantine::HISTORICAL_ORIGIN;
        if historical
            && let Err(e) =
                mparticle::check_historical(std::slice::from_ref(&batch), sub.received_at)
        {
            return whole(e.kind(), e.to_string());
        }
        let normaliser = mparticle::Normaliser {
            source_id: sub.source_id,
            received_at: sub.received_at,
            partitions: self.partitions,
            max_event_bytes: self.max_event_bytes,
            max_message_id_chars: self.max_message_id_chars,
            historical,
        };
        let mut decoded = Decoded::default();
        let mut failed = Vec::new();
        for (index, item) in batch.events.iter().enumerate() {
            match normaliser.normalise(item, &batch) {
                Ok(event) => decoded.events.push(event),
                Err(invalid) => failed.push((index, invalid)),
            }
        }
        let indices: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
        let payloads = quarantine::one_event_mparticle_batches(sub.payload, &indices);
        for ((index, invalid), payload) in failed.into_iter().zip(payloads) {
            let index = sub.item_index.unwrap_or(index as i32);
            decoded.rejected.push(record(
                sub,
                invalid.reason(),
                format!("event {index}: {invalid}"),
                payload,
                Some(index),
            ));
        }
        decoded
    }

    fn submit_json(&self, sub: &Submission<'_>) -> Decoded {
        let is_batch = matches!(
            serde_json::from_slice::<Peek>(sub.payload),
            Ok(Peek { batch: Some(_) })
        );
        let parsed = if is_batch {
            parse_batch(sub.payload)
        } else {
            parse_single(sub.payload)
        };
        let mut env = match parsed {
            Ok(env) => env,
            Err(e) => {
                let rec = record(sub, e.kind(), e.to_string(), sub.payload.clone(), None);
                return Decoded {
                    rejected: vec![rec],
                    ..Decoded::default()
                };
            }
        };
        if env.items.len() > self.max_batch_events {
            let e = ApiError::TooManyEvents {
                count: env.items.len(),
                limit: self.max_batch_events,
            };
            let rec = record(sub, e.kind(), e.to_string(), sub.payload.clone(), None);
            return Decoded {
                rejected: vec![rec],
                ..Decoded::default()
            };
        }
        let normaliser = Normaliser {
            source_id: sub.source_id,
            received_at: sub.received_at,
            partitions: self.partitions,
            max_event_bytes: self.max_event_bytes,
            max_message_id_chars: self.max_message_id_chars,
        };
        let items = std::mem::take(&mut env.items);
        let mut decoded = Decoded {
            events: Vec::with_capacity(items.len()),
            ..Decoded::default()
        };
        let mut failed: Vec<(usize, InvalidEvent)> = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            match normaliser.normalise(item, None, &env) {
                Ok(event) => decoded.events.push(event),
                Err(invalid) => failed.push((index, invalid)),
            }
        }
        if failed.is_empty() {
            return decoded;
        }
        if !is_batch {
            let (_, invalid) = failed.remove(0);
            decoded.rejected.push(record(
                sub,
                invalid.reason(),
                invalid.to_string(),
                sub.payload.clone(),
                None,
            ));
            return decoded;
        }
        let indices: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
        let payloads = quarantine::one_item_batches(sub.payload, &indices);
        for ((index, invalid), payload) in failed.into_iter().zip(payloads) {
            let index = sub.item_index.unwrap_or(index as i32);
            decoded.rejected.push(record(
                sub,
                invalid.reason(),
                format!("batch item {index}: {invalid}"),
                payload,
                Some(index),
            ));
        }
        decoded
    }

    /// Validates a protobuf `herald.v1.Event` and fills in what ingest owns: the source, the
    /// id, the receive time, the corrected timestamp when absent, and the partition.
    fn normalise_protobuf(&self, sub: &Submission<'_>) -> Result<Event, Refusal> {
        let mut e = Event::decode(sub.payload.as_ref()).map_err(|err| Refusal {
            reason: "undecodable_protobuf",
            message: format!("payload is not a protobuf herald.v1.Event: {err}"),
        })?;
        let invalid = |i: InvalidEvent| Refusal {
            reason: i.reason(),
            message: i.to_string(),
        };
        let ty = EventType::try_from(e.r#type).unwrap_or(EventType::Unspecified);
        if matches!(
            ty,
            EventType::Unspecified | EventType::ConsentChanged | EventType::Erasure
        ) {
            return Err(Refusal {
                reason: "invalid_type",
                message: format!("event type {} cannot be sent to ingest", ty.as_str_name()),
            });
        }
        if e.user_id.is_empty() && e.anonymous_id.is_empty() && e.identities.is_empty() {
            return Err(Refusal {
                reason: "missing_identity",
                message: "user_id, anonymous_id or an identity is required".into(),
            });
        }
        match ty {
            EventType::Track if e.name.is_empty() => {
                return Err(Refusal {
                    reason: "missing_event",
                    message: "track events need a non-empty `name`".into(),
                });
            }
            EventType::Group if e.group_id.is_empty() => {
                return Err(invalid(InvalidEvent::MissingGroupId));
            }
            EventType::Alias if e.previous_id.is_empty() => {
                return Err(invalid(InvalidEvent::MissingPreviousId));
            }
            EventType::Alias if e.user_id.is_empty() => {
                return Err(invalid(InvalidEvent::MissingUserId));
            }
            _ => {}
        }
        if e.message_id.chars().count() > self.max_message_id_chars
            || e.message_id.chars().any(char::is_control)
        {
            return Err(Refusal {
                reason: "invalid_field",
                message: format!(
                    "`message_id` must be at most {} characters, without control characters",
                    self.max_message_id_chars
                ),
            });
        }
        if e.message_id.is_empty() {
            e.message_id = derive_protobuf_message_id(sub.source_id, &e);
        }
        e.source_id = sub.source_id.to_string();
        e.id = format!("{}:{}", sub.source_id, e.message_id);
        e.received_at = Some(to_timestamp(sub.received_at));
        if e.timestamp.is_none() {
            let t = corrected_timestamp(
                sub.received_at,
                e.sent_at.as_ref().and_then(from_timestamp),
                e.original_timestamp.as_ref().and_then(from_timestamp),
            );
            e.timestamp = Some(to_timestamp(t));
        }
        e.partition_key = partition_key(&e);
        e.partition = partition_for(&e.partition_key, self.partitions);
        let size = e.encoded_len();
        if size > self.max_event_bytes {
            return Err(invalid(InvalidEvent::TooLarge {
                size,
                limit: self.max_event_bytes,
            }));
        }
        Ok(e)
    }

    /// Publishes events (the atomic ranges as atomic batches, the others pipelined) and
    /// quarantine records, and waits for every PubAck.
    pub async fn store(
        &self,
        decoded: &Decoded,
    ) -> Result<(Option<Published>, Vec<u64>), StoreError> {
        let events = async {
            if decoded.events.is_empty() {
                Ok(None)
            } else {
                self.publisher
                    .publish_grouped(&decoded.events, &decoded.atomic)
                    .await
                    .map(Some)
            }
        };
        let records = self.quarantine.record_all(&decoded.rejected);
        let (events, records) = tokio::join!(events, records);
        Ok((events?, records?))
    }

    /// Provisions the quarantine and intake streams, binds the intake consumer, then moves
    /// intake messages to the events stream until `cancel`. Readiness checks
    /// [`quarantine::STREAM_CHECK`] and [`CONSUMER_CHECK`] turn true as it gets there.
    pub async fn run(
        self,
        js: jetstream::Context,
        readiness: Readiness,
        cancel: CancellationToken,
    ) {
        let topology = self.publisher.topology().clone();
        let qcfg = quarantine::stream_config(&topology);
        let created = retry_until("creating the quarantine stream", &cancel, || {
            ensure_stream(&js, qcfg.clone())
        })
        .await;
        if created.is_none() {
            return;
        }
        StreamProvisioned { stream: &qcfg.name }.emit();
        readiness.set(quarantine::STREAM_CHECK, true);

        let icfg = stream_config(&topology);
        let created = retry_until("creating the intake stream", &cancel, || {
            ensure_stream(&js, icfg.clone())
        })
        .await;
        if created.is_none() {
            return;
        }
        StreamProvisioned { stream: &icfg.name }.emit();
        let reader_cfg = ReaderConfig {
            stream: topology.intake_stream(),
            durable: DURABLE.into(),
            filter_subject: topology.intake_wildcard(),
            ack_wait: ACK_WAIT,
            max_ack_pending: MAX_ACK_PENDING,
            batch: BATCH,
            description: "Herald ingest: moves NATS intake messages to the events stream".into(),
        };
        // Until the sources are loaded every source would look unknown.
        while !self.sources_loaded() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let Some(mut reader) = retry_until("binding the intake consumer", &cancel, || {
            OrderedReader::bind(&js, reader_cfg.clone())
        })
        .await
        else {
            return;
        };
        readiness.set(CONSUMER_CHECK, true);
        tracing::info!(consumer = DURABLE, stream = %reader_cfg.stream, "NATS intake consuming");
        while let Some(batch) = reader.next_batch(&cancel).await {
            if !self.handle_batch(batch, &cancel).await {
                break;
            }
        }
        readiness.set(CONSUMER_CHECK, false);
    }

    /// Handles one batch of intake messages in order, in chunks of about [`CHUNK_EVENTS`]
    /// events: validates each message, stores the chunk's events and records (retrying until
    /// stored), then acks its messages. Returns false when cancelled before everything was
    /// stored (the unacked messages come back).
    async fn handle_batch(&self, batch: Vec<Message>, cancel: &CancellationToken) -> bool {
        let sources = self.state.sources().list();
        // Started at the first failed store: keeps every message of the batch alive.
        let mut keep_alive = None;
        let mut chunk = Chunk::default();
        for (i, msg) in batch.iter().enumerate() {
            let decoded = self.decode_message(msg, &sources);
            chunk.outcomes.push(MessageOutcome::of(&decoded));
            chunk.messages.push(msg);
            chunk.decoded.extend(decoded);
            let full = chunk.decoded.events.len() + chunk.decoded.rejected.len() >= CHUNK_EVENTS;
            if (full || i + 1 == batch.len())
                && !self
                    .store_chunk(std::mem::take(&mut chunk), &batch, &mut keep_alive, cancel)
                    .await
            {
                return false;
            }
        }
        true
    }

    async fn store_chunk(
        &self,
        chunk: Chunk<'_>,
        batch: &[Message],
        keep_alive: &mut Option<KeepAlive>,
        cancel: &CancellationToken,
    ) -> bool {
        let Chunk {
            messages,
            decoded,
            outcomes,
        } = chunk;
        for r in &decoded.rejected {
            EventsRejected {
                source: &r.source_id,
                reason: reason_label(&r.reason),
                message: &r.message,
                count: 1,
            }
            .emit();
        }
        let mut attempt = 0u32;
        let (published, _) = loop {
            match self.store(&decoded).await {
                Ok(stored) => break stored,
                Err(e) => {
                    attempt += 1;
                    IntakeBatchRetried {
                        attempt,
                        messages: messages.len(),
                        error: &e,
                    }
                    .emit();
                    if keep_alive.is_none() {
                        *keep_alive = Some(KeepAlive::start(batch.to_vec(), ACK_WAIT / 3));
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(backoff(attempt, MAX_BACKOFF)) => {}
                    }
                }
            }
        };
        if let Some(p) = published {
            emit_accepted(&decoded.events, p);
        }
        for r in &decoded.rejected {
            Quarantined {
                via: "nats",
                source: &r.source_id,
                reason: reason_label(&r.reason),
                message: &r.message,
            }
            .emit();
        }
        for msg in messages {
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, subject = %msg.subject, "intake ack failed; the message will be redelivered and deduplicated");
            }
        }
        for outcome in outcomes {
            IntakeMessagesHandled {
                outcome: outcome.label(),
            }
            .emit();
        }
        true
    }

    fn decode_message(&self, msg: &Message, sources: &[Source]) -> Decoded {
        let subject = msg.subject.as_str();
        let source_id = subject.rsplit('.').next().unwrap_or_default();
        let (format, content_type) = format_of(msg.headers.as_ref());
        let (received_at, sequence) = match msg.info() {
            Ok(info) => (
                DateTime::from_timestamp_nanos(
                    i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
                ),
                info.stream_sequence,
            ),
            Err(_) => (Utc::now(), 0),
        };
        let origin = format!("nats:{subject}");
        self.submit_among(
            &Submission {
                source_id,
                format,
                content_type: &content_type,
                payload: &msg.payload,
                received_at,
                origin: &origin,
                intake_sequence: sequence,
                attempt: 1,
                item_index: None,
            },
            sources,
        )
    }
}

/// Messages handled together, with what they became.
#[derive(Default)]
struct Chunk<'a> {
    messages: Vec<&'a Message>,
    decoded: Decoded,
    outcomes: Vec<MessageOutcome>,
}

/// Storing events or records failed; everything is retried (ids make retries harmless).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Publishing events failed.
    #[error("publishing events: {0} ({cause})", cause = api_cause(.0))]
    Events(#[from] ApiError),
    /// Writing quarantine records failed.
    #[error(transparent)]
    Quarantine(#[from] QuarantineError),
}

fn api_cause(e: &ApiError) -> &str {
    match e {
        ApiError::Unavailable { cause } | ApiError::StreamFull { cause } => cause,
        _ => "",
    }
}

enum SourceStatus {
    Unknown,
    Disabled,
    Enabled { atomic: bool },
}

fn source_status(sources: &[Source], id: &str) -> SourceStatus {
    match sources.iter().find(|s| &*s.id == id) {
        None => SourceStatus::Unknown,
        Some(s) if !s.enabled => SourceStatus::Disabled,
        Some(s) => SourceStatus::Enabled {
            atomic: s.settings.atomic_publish,
        },
    }
}

/// What an intake message became, for `herald_ingest_intake_messages_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageOutcome {
    /// Every event it carried was published (a batch with no items included).
    Accepted,
    /// Some events were published, some items quarantined.
    Partial,
    /// Nothing was published; it is in quarantine.
    Quarantined,
}

impl MessageOutcome {
    fn of(d: &Decoded) -> Self {
        match (d.events.is_empty(), d.rejected.is_empty()) {
            (_, true) => Self::Accepted,
            (false, false) => Self::Partial,
            (true, false) => Self::Quarantined,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Partial => "partial",
            Self::Quarantined => "quarantined",
        }
    }
}

fn emit_accepted(events: &[Event], p: Published) {
    let mut by_source: HashMap<&str, usize> = HashMap::new();
    for e in events {
        *by_source.entry(e.source_id.as_str()).or_default() += 1;
    }
    let total = events.len().max(1);
    for (source, count) in by_source {
        EventsAccepted {
            source,
            count,
            // Duplicates are known per publish, not per source: share them out.
            duplicates: p.duplicates * count / total,
            publish_elapsed: p.elapsed,
        }
        .emit();
    }
}

/// Reasons as static labels: those ingest writes, else `other` (records written by another
/// version, read back by a redrive).
pub fn reason_label(reason: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "unknown_source",
        "source_disabled",
        "unsupported_content_type",
        "undecodable_protobuf",
        "invalid_json",
        "invalid_batch",
        "too_many_events",
        "not_an_object",
        "invalid_type",
        "missing_identity",
        "missing_event",
        "missing_group_id",
        "missing_previous_id",
        "missing_user_id",
        "invalid_field",
        "invalid_timestamp",
        "event_too_large",
    ];
    KNOWN
        .iter()
        .find(|k| **k == reason)
        .copied()
        .unwrap_or("other")
}

/// Peeks whether a JSON object has a `batch` key without building the value.
#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    batch: Option<IgnoredAny>,
}

fn record(
    sub: &Submission<'_>,
    reason: &str,
    message: String,
    payload: Bytes,
    item_index: Option<i32>,
) -> QuarantineRecord {
    QuarantineRecord {
        source_id: sub.source_id.to_string(),
        reason: reason.to_string(),
        message,
        origin: sub.origin.to_string(),
        payload: payload.to_vec(),
        format: sub.format as i32,
        content_type: sub.content_type.to_string(),
        received_at: Some(to_timestamp(sub.received_at)),
        quarantined_at: Some(to_timestamp(Utc::now())),
        attempt: sub.attempt,
        intake_sequence: sub.intake_sequence,
        item_index: item_index.or(sub.item_index).unwrap_or(-1),
        payload_truncated: false,
    }
}

/// The partition key of a protobuf event: the user id, else the anonymous id, else the first
/// identity in a fixed order (`mpid`, `email`, then the other types alphabetically).
fn partition_key(e: &Event) -> String {
    if !e.user_id.is_empty() {
        return e.user_id.clone();
    }
    if !e.anonymous_id.is_empty() {
        return e.anonymous_id.clone();
    }
    let rank = |t: &str| match t {
        "mpid" => 0,
        "email" => 1,
        _ => 2,
    };
    e.identities
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .min_by(|a, b| (rank(a.0), a.0).cmp(&(rank(b.0), b.0)))
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// A stable message id for a protobuf event sent without one: SHA-256 over the source and the
/// event's content (without the times a retry changes, with map entries sorted), as 32 hex
/// digits. A re-sent event derives the same id, so JetStream drops the duplicate.
fn derive_protobuf_message_id(source_id: &str, e: &Event) -> String {
    let mut copy = e.clone();
    copy.sent_at = None;
    copy.received_at = None;
    copy.id.clear();
    copy.source_id.clear();
    let mut identities: Vec<(String, String)> =
        std::mem::take(&mut copy.identities).into_iter().collect();
    identities.sort();
    let mut purposes: Vec<(String, bool)> = copy
        .consent
        .as_mut()
        .map(|c| std::mem::take(&mut c.purposes).into_iter().collect())
        .unwrap_or_default();
    purposes.sort();
    let mut buf = Vec::with_capacity(copy.encoded_len() + 64);
    buf.extend_from_slice(source_id.as_bytes());
    buf.push(0);
    copy.encode(&mut buf).expect("a Vec grows");
    for (k, v) in identities {
        buf.push(0);
        buf.extend_from_slice(k.as_bytes());
        buf.push(0);
        buf.extend_from_slice(v.as_bytes());
    }
    for (k, v) in purposes {
        buf.push(0);
        buf.extend_from_slice(k.as_bytes());
        buf.push(u8::from(v));
    }
    herald_common::auth::sha256_hex(&buf)[..32].to_string()
}

pub(crate) fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos().min(999_999_999) as i32,
    }
}

pub(crate) fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_content_types() {
        for (ct, want) in [
            ("", PayloadFormat::SegmentJson),
            ("application/json", PayloadFormat::SegmentJson),
            (
                "application/json; charset=utf-8",
                PayloadFormat::SegmentJson,
            ),
            ("application/x-protobuf", PayloadFormat::ProtobufEvent),
            ("application/protobuf", PayloadFormat::ProtobufEvent),
            (
                "application/x-protobuf; messageType=herald.v1.Event",
                PayloadFormat::ProtobufEvent,
            ),
            (
                "application/vnd.mparticle+json",
                PayloadFormat::MparticleJson,
            ),
            ("text/csv", PayloadFormat::Unspecified),
        ] {
            assert_eq!(format_named(ct), want, "{ct:?}");
        }
        let mut h = HeaderMap::new();
        h.insert("Content-Type", "application/json");
        h.insert(CONTENT_TYPE_HEADER, "application/x-protobuf");
        assert_eq!(
            format_of(Some(&h)),
            (
                PayloadFormat::ProtobufEvent,
                "application/x-protobuf".to_string()
            )
        );
        assert_eq!(format_of(None), (PayloadFormat::SegmentJson, String::new()));
        let mut lower = HeaderMap::new();
        lower.insert("content-type", "application/protobuf");
        assert_eq!(format_of(Some(&lower)).0, PayloadFormat::ProtobufEvent);
    }

    #[test]
    fn partition_keys_of_protobuf_events() {
        let mut e = Event::default();
        e.identities.insert("phone".into(), "p".into());
        e.identities.insert("email".into(), "a@example.com".into());
        assert_eq!(partition_key(&e), "a@example.com");
        e.identities.insert("mpid".into(), "42".into());
        assert_eq!(partition_key(&e), "42");
        e.anonymous_id = "anon".into();
        assert_eq!(partition_key(&e), "anon");
        e.user_id = "u".into();
        assert_eq!(partition_key(&e), "u");
    }

    #[test]
    fn derived_protobuf_ids_ignore_send_times_and_map_order() {
        let mut a = Event {
            r#type: EventType::Track as i32,
            name: "E".into(),
            user_id: "u".into(),
            ..Default::default()
        };
        for i in 0..8 {
            a.identities.insert(format!("t{i}"), format!("v{i}"));
        }
        let mut b = a.clone();
        b.sent_at = Some(prost_types::Timestamp {
            seconds: 5,
            nanos: 0,
        });
        // Rebuilding the map can change its iteration order.
        let mut entries: Vec<_> = a.identities.clone().into_iter().collect();
        entries.reverse();
        b.identities = entries.into_iter().collect();
        let id = derive_protobuf_message_id("svc", &a);
        assert_eq!(id.len(), 32);
        assert_eq!(id, derive_protobuf_message_id("svc", &b));
        assert_ne!(id, derive_protobuf_message_id("other", &a));
        b.name = "F".into();
        assert_ne!(id, derive_protobuf_message_id("svc", &b));
    }

    #[test]
    fn reason_labels_are_bounded() {
        assert_eq!(reason_label("missing_identity"), "missing_identity");
        assert_eq!(reason_label("unknown_source"), "unknown_source");
        assert_eq!(reason_label("something new"), "other");
    }
}
