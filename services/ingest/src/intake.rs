//! NATS intake: services publish events to `<prefix>.in.<source>` in the `<PREFIX>_INTAKE`
//! stream (so their PubAck is the durable handoff), and ingest moves them to the events stream.
//!
//! A message is Segment-shaped JSON (one event object or `{"batch": [...]}`) or one protobuf
//! `herald.v1.Event`, told apart by the `Herald-Content-Type` header (else `Content-Type`; see
//! [`format_named`]): a value containing `protobuf` means protobuf, no value or one containing
//! `json` means JSON (`mparticle` in it: one mParticle batch, as `/v2/events` takes). Every
//! format goes through the same decoders as the HTTP API, through [`Core::decode`]; events keep
//! the same ids (`Nats-Msg-Id = <source>:<messageId>`) and partition keys, so a message
//! published twice yields one event, and a person lands in one partition whichever way their
//! events come in.
//!
//! Whatever cannot be accepted (an unknown or disabled source, invalid JSON, an invalid item,
//! an undecodable protobuf) becomes a quarantine record with its reason
//! ([`crate::quarantine`]). An intake message is acked only after the PubAcks of all its events
//! and records; a failed publish is retried in process through [`herald_common::retry`] (the
//! messages kept alive with in-progress acks), never nak'ed. The intake stream uses work-queue
//! retention: an acked message is gone.
//!
//! [`Intake::submit`] is also what a quarantine redrive calls, so a redriven payload meets
//! exactly the validation a new one would.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, Message, stream};
use chrono::{DateTime, Utc};
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::nats::{ensure_stream, retry_until};
use herald_common::ordered::{OrderedReader, ReaderConfig};
use herald_common::retry::{KeepAlive, Retry};
use herald_proto::v1::{Event, PayloadFormat, QuarantineRecord};
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::error::ApiError;
use crate::events::{
    EventsAccepted, EventsRejected, IntakeBatchRetried, IntakeMessagesHandled, StreamProvisioned,
};
use crate::normalise::Reason;
use crate::publish::Published;
use crate::quarantine::{
    self, QuarantineError, Submission, emit_quarantined, item_records, record,
};
use crate::source_registry::Source;

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

/// What a submission became: the events to publish and the records to quarantine.
#[derive(Debug, Default)]
pub struct Submitted {
    /// Valid events, normalised.
    pub events: Vec<Event>,
    /// What failed, as quarantine records.
    pub records: Vec<QuarantineRecord>,
    /// Ranges of `events` to store as one atomic batch each (a batch message of an
    /// `atomic_publish` source); the others are published pipelined.
    pub atomic: Vec<std::ops::Range<usize>>,
}

impl Submitted {
    /// Appends another submission's outcome, keeping its atomic ranges.
    pub fn extend(&mut self, other: Submitted) {
        let offset = self.events.len();
        self.atomic.extend(
            other
                .atomic
                .into_iter()
                .map(|r| r.start + offset..r.end + offset),
        );
        self.events.extend(other.events);
        self.records.extend(other.records);
    }
}

/// Validation and publishing of NATS intake messages and quarantine redrives.
#[derive(Clone)]
pub struct Intake {
    core: Core,
}

impl Intake {
    /// Intake over the service's core (the HTTP API holds the same one).
    pub fn new(core: Core) -> Self {
        Self { core }
    }

    /// The core it decodes and publishes through.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Validates a payload and normalises what is valid; never fails: what cannot be accepted
    /// comes back as quarantine records with their reason.
    pub fn submit(&self, sub: &Submission<'_>) -> Submitted {
        self.submit_among(sub, &self.core.sources().list())
    }

    /// Whether the sources have been loaded, so that an unknown source really is unknown.
    pub fn sources_loaded(&self) -> bool {
        self.core.sources().is_loaded()
    }

    /// [`Intake::submit`] against a snapshot of the sources. The events of a batch message
    /// from an `atomic_publish` source are marked to be stored as one atomic batch.
    fn submit_among(&self, sub: &Submission<'_>, sources: &[Source]) -> Submitted {
        let refuse = |reason: Reason, message: String| Submitted {
            records: vec![record(sub, reason, message, sub.payload.clone(), None)],
            ..Submitted::default()
        };
        let atomic = match source_status(sources, sub.source_id) {
            SourceStatus::Enabled { atomic } => atomic,
            SourceStatus::Unknown => {
                return refuse(
                    Reason::UnknownSource,
                    format!(
                        "no source has the id {:?}: create it, then redrive this record",
                        sub.source_id
                    ),
                );
            }
            SourceStatus::Disabled => {
                return refuse(
                    Reason::SourceDisabled,
                    format!(
                        "source {} is disabled: enable it, then redrive this record",
                        sub.source_id
                    ),
                );
            }
        };
        if sub.format == PayloadFormat::Unspecified {
            return refuse(
                Reason::UnsupportedContentType,
                format!(
                    "content type {:?} is neither JSON nor protobuf: set {CONTENT_TYPE_HEADER} to application/json, application/x-protobuf or application/vnd.mparticle+json",
                    sub.content_type
                ),
            );
        }
        let decoded = match self.core.decode(sub) {
            Ok(d) => d,
            Err(e) => return refuse(e.reason().unwrap_or(Reason::Other), e.to_string()),
        };
        let mut submitted = Submitted {
            records: item_records(sub, decoded.rejected),
            events: decoded.events,
            atomic: Vec::new(),
        };
        if atomic && submitted.events.len() > 1 {
            submitted.atomic.push(0..submitted.events.len());
        }
        submitted
    }

    /// Publishes events (the atomic ranges as atomic batches, the others pipelined) and
    /// quarantine records, and waits for every PubAck.
    pub async fn store(
        &self,
        submitted: &Submitted,
    ) -> Result<(Option<Published>, Vec<u64>), StoreError> {
        let events = async {
            if submitted.events.is_empty() {
                Ok(None)
            } else {
                self.core
                    .publisher()
                    .publish_grouped(&submitted.events, &submitted.atomic)
                    .await
                    .map(Some)
            }
        };
        let records = self.core.quarantine().record_all(&submitted.records);
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
        let topology = self.core.topology().clone();
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
        let sources = self.core.sources().list();
        // Started at the first failed store: keeps every message of the batch alive.
        let mut keep_alive = None;
        let mut chunk = Chunk::default();
        for (i, msg) in batch.iter().enumerate() {
            let decoded = self.decode_message(msg, &sources);
            chunk.outcomes.push(MessageOutcome::of(&decoded));
            chunk.messages.push(msg);
            chunk.submitted.extend(decoded);
            let full = chunk.submitted.events.len() + chunk.submitted.records.len() >= CHUNK_EVENTS;
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
            submitted: decoded,
            outcomes,
        } = chunk;
        for r in &decoded.records {
            EventsRejected {
                source: &r.source_id,
                reason: Reason::from_label(&r.reason).label(),
                message: &r.message,
                count: 1,
            }
            .emit();
        }
        // The whole batch waits behind this chunk: from the first failure on, every message
        // of it is kept alive until the batch is done (not only while this chunk retries).
        let stored = Retry::new(MAX_BACKOFF)
            .run(
                cancel,
                || self.store(&decoded),
                |f| {
                    IntakeBatchRetried {
                        attempt: f.attempt,
                        messages: messages.len(),
                        error: f.error,
                    }
                    .emit();
                    if keep_alive.is_none() {
                        *keep_alive = Some(KeepAlive::start(batch.to_vec(), ACK_WAIT / 3));
                    }
                },
            )
            .await;
        let Some((published, _)) = stored else {
            return false;
        };
        if let Some(p) = published {
            emit_accepted(&decoded.events, p);
        }
        emit_quarantined("nats", &decoded.records);
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

    fn decode_message(&self, msg: &Message, sources: &[Source]) -> Submitted {
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
                historical: false,
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
    submitted: Submitted,
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
    fn of(d: &Submitted) -> Self {
        match (d.events.is_empty(), d.records.is_empty()) {
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
}
