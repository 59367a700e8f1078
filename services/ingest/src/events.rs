//! Telemetry of the ingest service: one struct per thing that happens, whose `emit()` writes
//! the log line and updates the metrics together. Metric labels come from closed sets (routes,
//! status codes, reasons) or from configured source ids.
//!
//! The metric names are public (dashboards and the benchmarks read them); the event structs
//! are the crate's own.

use std::sync::Once;
use std::time::Duration;

use herald_common::telemetry::{self, NO_LABELS};
use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

use crate::normalise::Reason;

/// `herald_ingest_requests_total{route,status}`.
pub const REQUESTS_TOTAL: &str = "herald_ingest_requests_total";
/// `herald_ingest_events_accepted_total{source}`.
pub const EVENTS_ACCEPTED_TOTAL: &str = "herald_ingest_events_accepted_total";
/// `herald_ingest_events_rejected_total{reason}`.
pub const EVENTS_REJECTED_TOTAL: &str = "herald_ingest_events_rejected_total";
/// `herald_ingest_request_duration_seconds{route}`.
pub const REQUEST_DURATION_SECONDS: &str = "herald_ingest_request_duration_seconds";
/// `herald_ingest_publish_duration_seconds`.
pub const PUBLISH_DURATION_SECONDS: &str = "herald_ingest_publish_duration_seconds";
/// `herald_ingest_received_bytes_total`.
pub const RECEIVED_BYTES_TOTAL: &str = "herald_ingest_received_bytes_total";
/// `herald_ingest_dedupe_hits_total{layer}` (`jetstream`, `seen_set`).
pub const DEDUPE_HITS_TOTAL: &str = "herald_ingest_dedupe_hits_total";
/// `herald_ingest_seen_set_failures_total{op}` (`read`, `write`).
pub const SEEN_SET_FAILURES_TOTAL: &str = "herald_ingest_seen_set_failures_total";
/// `herald_ingest_atomic_batches_total{outcome}`.
pub const ATOMIC_BATCHES_TOTAL: &str = "herald_ingest_atomic_batches_total";
/// `herald_ingest_decoded_bytes_total{encoding}`.
pub const DECODED_BYTES_TOTAL: &str = "herald_ingest_decoded_bytes_total";
/// `herald_ingest_requests_rejected_total{route,reason}`.
pub const REQUESTS_REJECTED_TOTAL: &str = "herald_ingest_requests_rejected_total";
/// `herald_ingest_duplicate_requests_total{source}`.
pub const DUPLICATE_REQUESTS_TOTAL: &str = "herald_ingest_duplicate_requests_total";

/// Registers HELP text and units of every ingest metric; later calls do nothing.
pub(crate) fn describe_metrics() {
    describe_intake_metrics();
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        describe_counter!(
            REQUESTS_TOTAL,
            "HTTP requests answered by ingest, by route and status code."
        );
        describe_counter!(
            EVENTS_ACCEPTED_TOTAL,
            "Events acknowledged by JetStream and accepted (duplicates included), by source."
        );
        describe_counter!(
            EVENTS_REJECTED_TOTAL,
            "Events not accepted, by reason (a validation failure, rate_limited, unavailable, stream_full)."
        );
        describe_histogram!(
            REQUEST_DURATION_SECONDS,
            Unit::Seconds,
            "Time from receiving a request to answering it, by route."
        );
        describe_histogram!(
            PUBLISH_DURATION_SECONDS,
            Unit::Seconds,
            "Time from the first publish of a request's events to the last JetStream ack."
        );
        describe_counter!(
            RECEIVED_BYTES_TOTAL,
            Unit::Bytes,
            "Request body bytes received by ingest."
        );
        describe_counter!(
            DEDUPE_HITS_TOTAL,
            "Events not stored again because they were stored already (retries), by layer: \
             jetstream (a duplicate ack within the stream's duplicate window) or seen_set (found \
             in the ingest.dedupe_window_hours seen-set, not published)."
        );
        describe_counter!(
            SEEN_SET_FAILURES_TOTAL,
            "Times the dedupe seen-set could not be read or written (op: read, write); events are \
             still stored, deduplicated by JetStream's duplicate window only."
        );
        describe_counter!(
            ATOMIC_BATCHES_TOTAL,
            "Bulk requests of atomic_publish sources, by outcome: committed (stored as one atomic \
             batch) or the reason they were published per message instead (duplicate_id, \
             too_large, too_many_in_flight, incomplete, disabled, refused)."
        );
        describe_counter!(
            DECODED_BYTES_TOTAL,
            Unit::Bytes,
            "Request body bytes after Content-Encoding decoding, by encoding (identity, gzip, deflate)."
        );
        describe_counter!(
            REQUESTS_REJECTED_TOTAL,
            "HTTP requests refused, by route and reason (unauthorized, too_deep, request_too_large, ...)."
        );
        describe_counter!(
            DUPLICATE_REQUESTS_TOTAL,
            "mParticle batches not published again because their source_request_id was already stored, by source."
        );
        publish_closed_series();
    });
}

/// Publishes at 0 every series whose labels come from closed sets, so that dashboards and
/// alerts have series from start-up. Route-labelled metrics (`route` by status or reason) show
/// as HELP and TYPE lines until the first request (see `herald_common::telemetry::render`).
fn publish_closed_series() {
    let reasons = || Reason::ALL.into_iter().map(Reason::label);
    telemetry::zero_counters(RECEIVED_BYTES_TOTAL, [NO_LABELS]);
    telemetry::zero_histograms(PUBLISH_DURATION_SECONDS, [NO_LABELS]);
    telemetry::zero_counters(
        EVENTS_REJECTED_TOTAL,
        reasons()
            .chain(["rate_limited", "unavailable", "stream_full"])
            .map(|r| [("reason", r)]),
    );
    telemetry::zero_counters(
        DEDUPE_HITS_TOTAL,
        ["jetstream", "seen_set"].map(|l| [("layer", l)]),
    );
    telemetry::zero_counters(
        SEEN_SET_FAILURES_TOTAL,
        ["read", "write"].map(|o| [("op", o)]),
    );
    telemetry::zero_counters(
        ATOMIC_BATCHES_TOTAL,
        [
            "committed",
            "duplicate_id",
            "too_large",
            "too_many_in_flight",
            "incomplete",
            "disabled",
            "refused",
        ]
        .map(|o| [("outcome", o)]),
    );
    telemetry::zero_counters(
        DECODED_BYTES_TOTAL,
        ["identity", "gzip", "deflate"].map(|e| [("encoding", e)]),
    );
}

/// Publishes at 0 the series of the configured sources (`source`-labelled counters); sources
/// added later through the control API show from their first event.
pub(crate) fn publish_source_series<'a>(sources: impl IntoIterator<Item = &'a str>) {
    for source in sources {
        let labels = [("source", source.to_string())];
        telemetry::zero_counters(EVENTS_ACCEPTED_TOTAL, [labels.clone()]);
        telemetry::zero_counters(DUPLICATE_REQUESTS_TOTAL, [labels]);
    }
}

/// A request was answered.
pub(crate) struct RequestCompleted {
    /// The route (a fixed path such as `/v1/batch`).
    pub route: &'static str,
    /// The HTTP status code.
    pub status: u16,
    /// Time to answer.
    pub elapsed: Duration,
}

impl RequestCompleted {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::debug!(
            route = self.route,
            status = self.status,
            elapsed_ms = self.elapsed.as_secs_f64() * 1000.0,
            "request answered"
        );
        counter!(REQUESTS_TOTAL, "route" => self.route, "status" => status_label(self.status))
            .increment(1);
        histogram!(REQUEST_DURATION_SECONDS, "route" => self.route)
            .record(self.elapsed.as_secs_f64());
    }
}

/// A request body was read and decoded.
pub(crate) struct BodyReceived {
    /// Its size on the wire, in bytes.
    pub bytes: usize,
    /// Its size after decoding, in bytes.
    pub decoded_bytes: usize,
    /// Its `Content-Encoding` (`identity`, `gzip`, `deflate`).
    pub encoding: &'static str,
}

impl BodyReceived {
    /// Counts it.
    pub fn emit(self) {
        tracing::trace!(
            bytes = self.bytes,
            decoded_bytes = self.decoded_bytes,
            encoding = self.encoding,
            "request body received"
        );
        counter!(RECEIVED_BYTES_TOTAL).increment(self.bytes as u64);
        counter!(DECODED_BYTES_TOTAL, "encoding" => self.encoding)
            .increment(self.decoded_bytes as u64);
    }
}

/// A request was refused before its events were looked at (auth, shape, size).
pub(crate) struct RequestRejected<'a> {
    /// The route.
    pub route: &'static str,
    /// The error kind.
    pub kind: &'static str,
    /// The readable reason.
    pub message: &'a str,
}

impl RequestRejected<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::debug!(
            route = self.route,
            kind = self.kind,
            message = self.message,
            "request refused"
        );
        counter!(REQUESTS_REJECTED_TOTAL, "route" => self.route, "reason" => self.kind)
            .increment(1);
    }
}

/// mParticle batches were already stored (their `source_request_id` is in the request log),
/// so they were answered without publishing again.
pub(crate) struct DuplicateRequests<'a> {
    /// The source id.
    pub source: &'a str,
    /// How many batches.
    pub count: usize,
}

impl DuplicateRequests<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::debug!(
            source = self.source,
            count = self.count,
            "mParticle batches already stored; not published again"
        );
        counter!(DUPLICATE_REQUESTS_TOTAL, "source" => self.source.to_string())
            .increment(self.count as u64);
    }
}

/// The mParticle request log (source_request_id dedupe) could not be read or written; events
/// are still deduplicated by their `Nats-Msg-Id` within the duplicate window.
pub(crate) struct RequestLogFailed<'a> {
    /// `read` or `write`.
    pub op: &'static str,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl RequestLogFailed<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(op = self.op, error = %self.error, "mParticle request log unavailable");
    }
}

/// Events were not accepted.
pub(crate) struct EventsRejected<'a> {
    /// The source, when authenticated.
    pub source: &'a str,
    /// Bounded reason label.
    pub reason: &'static str,
    /// The readable reason.
    pub message: &'a str,
    /// How many events.
    pub count: usize,
}

impl EventsRejected<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::info!(
            source = self.source,
            reason = self.reason,
            message = self.message,
            count = self.count,
            "events rejected"
        );
        counter!(EVENTS_REJECTED_TOTAL, "reason" => self.reason).increment(self.count as u64);
    }
}

/// A request was refused because its source is over its rate limit (logged at debug: a source
/// over its limit can send many).
pub(crate) struct RateLimited<'a> {
    /// The source id.
    pub source: &'a str,
    /// Events in the request.
    pub events: usize,
    /// Seconds until the request fits.
    pub retry_after: u64,
}

impl RateLimited<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::debug!(
            source = self.source,
            events = self.events,
            retry_after = self.retry_after,
            "source over its rate limit; request refused"
        );
        counter!(EVENTS_REJECTED_TOTAL, "reason" => "rate_limited").increment(self.events as u64);
    }
}

/// Events were acknowledged by JetStream.
pub(crate) struct EventsAccepted<'a> {
    /// The source id.
    pub source: &'a str,
    /// How many events.
    pub count: usize,
    /// How many of them JetStream had already (duplicate acks).
    pub duplicates: usize,
    /// Time from the first publish to the last ack.
    pub publish_elapsed: Duration,
}

impl EventsAccepted<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::debug!(
            source = self.source,
            count = self.count,
            duplicates = self.duplicates,
            publish_ms = self.publish_elapsed.as_secs_f64() * 1000.0,
            "events accepted"
        );
        counter!(EVENTS_ACCEPTED_TOTAL, "source" => self.source.to_string())
            .increment(self.count as u64);
        if self.duplicates > 0 {
            DedupeHits {
                layer: "jetstream",
                count: self.duplicates,
            }
            .emit();
        }
        histogram!(PUBLISH_DURATION_SECONDS).record(self.publish_elapsed.as_secs_f64());
    }
}

/// Events were not stored again because they were stored already.
pub(crate) struct DedupeHits {
    /// `jetstream` (duplicate acks) or `seen_set` (found in the seen-set, not published).
    pub layer: &'static str,
    /// How many events.
    pub count: usize,
}

impl DedupeHits {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::debug!(
            layer = self.layer,
            count = self.count,
            "events stored already; not stored again"
        );
        counter!(DEDUPE_HITS_TOTAL, "layer" => self.layer).increment(self.count as u64);
    }
}

/// The dedupe seen-set could not be used for a request; its events are stored anyway.
pub(crate) struct SeenSetFailed<'a> {
    /// `read` or `write`.
    pub op: &'static str,
    /// The bucket.
    pub bucket: &'a str,
    /// What failed.
    pub error: &'a str,
    /// Events of the request.
    pub events: usize,
}

impl SeenSetFailed<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::warn!(
            op = self.op,
            bucket = self.bucket,
            error = self.error,
            events = self.events,
            "dedupe seen-set unavailable; relying on JetStream's duplicate window"
        );
        counter!(SEEN_SET_FAILURES_TOTAL, "op" => self.op).increment(1);
    }
}

/// A group of events meant for one atomic batch was stored: atomically, or per message.
pub(crate) struct AtomicBatchStored {
    /// Why it was published per message (the fallback's bounded label); `None` when committed
    /// atomically.
    pub fallback: Option<&'static str>,
    /// Events in the batch.
    pub events: usize,
}

impl AtomicBatchStored {
    /// Logs and counts it.
    pub fn emit(self) {
        let outcome = match self.fallback {
            None => {
                tracing::debug!(events = self.events, "atomic batch committed");
                "committed"
            }
            Some(f) => {
                tracing::info!(
                    events = self.events,
                    reason = f,
                    "atomic batch refused; publishing its events one by one (pipelined)"
                );
                f
            }
        };
        counter!(ATOMIC_BATCHES_TOTAL, "outcome" => outcome).increment(1);
    }
}

/// Publishing a request's events failed; the client is told to retry.
pub(crate) struct PublishFailed<'a> {
    /// The source id.
    pub source: &'a str,
    /// `unavailable` or `stream_full`.
    pub kind: &'static str,
    /// What failed.
    pub cause: &'a str,
    /// Events in the request.
    pub count: usize,
}

impl PublishFailed<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::warn!(
            source = self.source,
            kind = self.kind,
            error = self.cause,
            count = self.count,
            "publishing events failed; client asked to retry"
        );
        counter!(EVENTS_REJECTED_TOTAL, "reason" => self.kind).increment(self.count as u64);
    }
}

/// A stream ingest owns (events, quarantine, intake) was created or updated.
pub(crate) struct StreamProvisioned<'a> {
    /// The stream name.
    pub stream: &'a str,
}

impl StreamProvisioned<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::info!(stream = self.stream, "stream ready");
    }
}

/// Status codes as static labels (a closed set).
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        202 => "202",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        413 => "413",
        415 => "415",
        429 => "429",
        500 => "500",
        503 => "503",
        s if s < 300 => "2xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

// NATS intake and quarantine.

/// `herald_ingest_intake_messages_total{outcome}`.
pub const INTAKE_MESSAGES_TOTAL: &str = "herald_ingest_intake_messages_total";
/// `herald_ingest_intake_retries_total`.
pub const INTAKE_RETRIES_TOTAL: &str = "herald_ingest_intake_retries_total";
/// `herald_ingest_quarantined_total{via,reason}`.
pub const QUARANTINED_TOTAL: &str = "herald_ingest_quarantined_total";
/// `herald_ingest_quarantine_write_failures_total{kind}`.
pub const QUARANTINE_WRITE_FAILURES_TOTAL: &str = "herald_ingest_quarantine_write_failures_total";
/// `herald_ingest_quarantine_redrives_total{outcome}`.
pub const QUARANTINE_REDRIVES_TOTAL: &str = "herald_ingest_quarantine_redrives_total";

/// Registers HELP text of the NATS intake and quarantine metrics; later calls do nothing.
pub(crate) fn describe_intake_metrics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        describe_counter!(
            INTAKE_MESSAGES_TOTAL,
            "NATS intake messages handled and acked, by outcome (accepted: all events published; \
             partial: some items quarantined; quarantined: nothing published)."
        );
        describe_counter!(
            INTAKE_RETRIES_TOTAL,
            "Times a batch of NATS intake messages was retried because its events or quarantine \
             records could not be stored."
        );
        describe_counter!(
            QUARANTINED_TOTAL,
            "Quarantine records written, by where the payload came from (http, nats, redrive) \
             and reason."
        );
        describe_counter!(
            QUARANTINE_WRITE_FAILURES_TOTAL,
            "Failed writes of quarantine records, by kind (unavailable, full); the payloads are \
             retried (NATS intake) or refused with 503 (HTTP)."
        );
        describe_counter!(
            QUARANTINE_REDRIVES_TOTAL,
            "Quarantine records redriven, by outcome (redriven, quarantined_again, not_found, \
             failed)."
        );
        telemetry::zero_counters(
            INTAKE_MESSAGES_TOTAL,
            ["accepted", "partial", "quarantined"].map(|o| [("outcome", o)]),
        );
        telemetry::zero_counters(INTAKE_RETRIES_TOTAL, [NO_LABELS]);
        telemetry::zero_counters(
            QUARANTINED_TOTAL,
            ["http", "nats", "redrive"].into_iter().flat_map(|via| {
                Reason::ALL
                    .into_iter()
                    .map(move |r| [("via", via), ("reason", r.label())])
            }),
        );
        telemetry::zero_counters(
            QUARANTINE_WRITE_FAILURES_TOTAL,
            ["unavailable", "full"].map(|k| [("kind", k)]),
        );
        telemetry::zero_counters(
            QUARANTINE_REDRIVES_TOTAL,
            ["redriven", "quarantined_again", "not_found", "failed"].map(|o| [("outcome", o)]),
        );
    });
}

/// NATS intake messages were handled and acked.
pub(crate) struct IntakeMessagesHandled {
    /// `accepted`, `partial` or `quarantined`.
    pub outcome: &'static str,
}

impl IntakeMessagesHandled {
    /// Counts it (events and records are logged where they are stored).
    pub fn emit(self) {
        counter!(INTAKE_MESSAGES_TOTAL, "outcome" => self.outcome).increment(1);
    }
}

/// Storing a batch of intake messages' events and records failed; it is retried.
pub(crate) struct IntakeBatchRetried<'a> {
    /// Attempts so far.
    pub attempt: u32,
    /// Messages in the batch.
    pub messages: usize,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl IntakeBatchRetried<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::warn!(
            attempt = self.attempt,
            messages = self.messages,
            error = %self.error,
            "storing NATS intake messages failed; retrying (they stay unacked)"
        );
        counter!(INTAKE_RETRIES_TOTAL).increment(1);
    }
}

/// A quarantine record was written.
pub(crate) struct Quarantined<'a> {
    /// `http`, `nats` or `redrive`.
    pub via: &'static str,
    /// The source id.
    pub source: &'a str,
    /// Bounded reason label.
    pub reason: &'static str,
    /// The readable reason.
    pub message: &'a str,
}

impl Quarantined<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::info!(
            via = self.via,
            source = self.source,
            reason = self.reason,
            message = self.message,
            "payload quarantined"
        );
        counter!(QUARANTINED_TOTAL, "via" => self.via, "reason" => self.reason).increment(1);
    }
}

/// Quarantine records could not be written.
pub(crate) struct QuarantineWriteFailed<'a> {
    /// `unavailable` or `full`.
    pub kind: &'static str,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
    /// Records in the write.
    pub count: usize,
}

impl QuarantineWriteFailed<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::warn!(
            kind = self.kind,
            error = %self.error,
            count = self.count,
            "writing quarantine records failed"
        );
        counter!(QUARANTINE_WRITE_FAILURES_TOTAL, "kind" => self.kind).increment(1);
    }
}

/// One quarantine record was redriven.
pub(crate) struct RedriveDone {
    /// `redriven`, `quarantined_again`, `not_found` or `failed`.
    pub outcome: &'static str,
}

impl RedriveDone {
    /// Counts it.
    pub fn emit(self) {
        tracing::debug!(outcome = self.outcome, "quarantine record redriven");
        counter!(QUARANTINE_REDRIVES_TOTAL, "outcome" => self.outcome).increment(1);
    }
}
