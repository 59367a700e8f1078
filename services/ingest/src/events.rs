//! Telemetry of the ingest service: one struct per thing that happens, whose `emit()` writes
//! the log line and updates the metrics together. Metric labels come from closed sets (routes,
//! status codes, reasons) or from configured source ids.

use std::sync::Once;
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

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
/// `herald_ingest_dedupe_hits_total`.
pub const DEDUPE_HITS_TOTAL: &str = "herald_ingest_dedupe_hits_total";

/// Registers HELP text and units of every ingest metric; later calls do nothing.
pub fn describe_metrics() {
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
            "Events not accepted, by reason (validation failure, unavailable, stream_full)."
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
            "Events JetStream acknowledged as duplicates of an event already stored (retries)."
        );
    });
}

/// A request was answered.
pub struct RequestCompleted {
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

/// A request body was read.
pub struct BodyReceived {
    /// Its size in bytes.
    pub bytes: usize,
}

impl BodyReceived {
    /// Counts it.
    pub fn emit(self) {
        tracing::trace!(bytes = self.bytes, "request body received");
        counter!(RECEIVED_BYTES_TOTAL).increment(self.bytes as u64);
    }
}

/// A request was refused before its events were looked at (auth, shape, size).
pub struct RequestRejected<'a> {
    /// The route.
    pub route: &'static str,
    /// The error kind.
    pub kind: &'static str,
    /// The readable reason.
    pub message: &'a str,
}

impl RequestRejected<'_> {
    /// Logs it (the request counter carries the status).
    pub fn emit(self) {
        tracing::debug!(
            route = self.route,
            kind = self.kind,
            message = self.message,
            "request refused"
        );
    }
}

/// Events were not accepted.
pub struct EventsRejected<'a> {
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

/// Events were acknowledged by JetStream.
pub struct EventsAccepted<'a> {
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
            counter!(DEDUPE_HITS_TOTAL).increment(self.duplicates as u64);
        }
        histogram!(PUBLISH_DURATION_SECONDS).record(self.publish_elapsed.as_secs_f64());
    }
}

/// Publishing a request's events failed; the client is told to retry.
pub struct PublishFailed<'a> {
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

/// The events stream was created or updated.
pub struct StreamProvisioned<'a> {
    /// The stream name.
    pub stream: &'a str,
}

impl StreamProvisioned<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::info!(stream = self.stream, "events stream ready");
    }
}

/// A server of the service stopped with an error.
pub struct ServerFailed<'a> {
    /// `http`, `grpc` or `admin`.
    pub server: &'static str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
}

impl ServerFailed<'_> {
    /// Logs it: an operator must act.
    pub fn emit(self) {
        tracing::error!(server = self.server, error = %self.error, "ingest server failed; stopping");
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
