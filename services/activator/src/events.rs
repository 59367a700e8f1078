//! The activator's telemetry: one struct per thing that happens, whose `emit()` writes the log
//! line and updates the metrics together. Labels come from closed sets (reasons) or configured
//! destination ids.

use std::time::Duration;

use herald_common::telemetry;
use metrics::{
    Counter, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};

use crate::filter::{ConsentSide, Denial};

/// Registers HELP text for every activator metric, and publishes at 0 the series of the
/// configured `destinations` (destinations added later through the control API show from their
/// first event; the `reason`/`class`/`action`-labelled ones as HELP and TYPE lines until then).
pub fn describe<'a>(destinations: impl IntoIterator<Item = &'a str>) {
    describe_counter!(
        "herald_activator_deliveries_total",
        "Events whose delivery to a destination ended, by destination and outcome (delivered: accepted by it; dlq: written to the DLQ; consent_dropped: not sent, the person's consent does not allow it)."
    );
    describe_counter!(
        "herald_activator_attempts_total",
        "Requests sent to a destination, by destination and class (success, transient: 408, 429, 5xx or network, retried; permanent: refused for good). A batch request counts once."
    );
    describe_gauge!(
        "herald_activator_dlq_events",
        "Dead letters waiting in the DLQ, by destination (from the DLQ stream, refreshed every few seconds)."
    );
    describe_histogram!(
        "herald_activator_freshness_seconds",
        metrics::Unit::Seconds,
        "Seconds from an event's received_at (ingest) to its delivery to a destination, by destination."
    );
    describe_counter!(
        "herald_activator_send_failures_total",
        "Failed send attempts, by destination, reason and class (transient or permanent)."
    );
    describe_counter!(
        "herald_activator_breaker_transitions_total",
        "A destination's circuit breaker opening (state=open) or closing again (state=closed) on this replica."
    );
    describe_counter!(
        "herald_activator_events_skipped_total",
        "Events not sent to a destination, by destination and reason (historical, undecodable, filtered: excluded by its filter or the integrations object, filter_error: its CEL condition failed to evaluate, already_delivered: a redelivery whose delivery status says delivered, consent: the person's consent, in the event's snapshot or current, does not allow it, suppressed: one of its identities is suppressed or erased, erasure_duplicate: the erasure was already sent to the destination from another partition)."
    );
    describe_counter!(
        "herald_activator_destination_changes_total",
        "Destination delivery loops started, updated, paused, deleted or refused on this replica, by destination and action."
    );
    describe_counter!(
        "herald_activator_replays_total",
        "Replays (herald replay) that ended, by destination and result (completed, failed, cancelled)."
    );
    describe_scale();
    for destination in destinations {
        DestinationSeries { destination }.emit();
    }
}

/// Zero-valued series of a destination's metrics, so they show from start-up (and from its
/// creation, for one created later).
pub struct DestinationSeries<'a> {
    /// The destination's id.
    pub destination: &'a str,
}

impl DestinationSeries<'_> {
    /// Registers the series at zero.
    pub fn emit(self) {
        let d = self.destination.to_string();
        for outcome in ["delivered", "dlq", "consent_dropped"] {
            counter!("herald_activator_deliveries_total", "destination" => d.clone(), "outcome" => outcome).increment(0);
        }
        for class in AttemptClass::ALL {
            counter!("herald_activator_attempts_total", "destination" => d.clone(), "class" => class.as_str()).increment(0);
        }
        let labels = [("destination", d.clone())];
        telemetry::zero_histograms("herald_activator_freshness_seconds", [labels.clone()]);
        telemetry::zero_gauges("herald_activator_dlq_events", [labels.clone()]);
        telemetry::zero_gauges("herald_activator_backlog_events", [labels.clone()]);
        telemetry::zero_gauges("herald_activator_owned_partitions", [labels]);
        telemetry::zero_counters(
            "herald_activator_events_skipped_total",
            [
                "historical",
                "undecodable",
                "filtered",
                "filter_error",
                "already_delivered",
                "consent",
                "suppressed",
                "erasure_duplicate",
            ]
            .map(|reason| [("destination", d.clone()), ("reason", reason.to_string())]),
        );
    }
}

/// A destination's series of [`Delivered`] and [`Attempted`], registered once per destination
/// (its [`crate::deliver::Delivery`] keeps them): a `counter!` call looks its series up on every
/// call, a kept handle does not, and these two happen for every event.
#[derive(Clone)]
pub struct DestinationMetrics {
    freshness: Histogram,
    delivered: Counter,
    /// Attempts by class, in the order of [`AttemptClass::ALL`].
    attempts: [Counter; 3],
}

impl DestinationMetrics {
    /// The handles of `destination`'s series (made once the recorder is installed: a handle
    /// taken before stays a no-op).
    pub fn new(destination: &str) -> Self {
        Self {
            freshness: histogram!("herald_activator_freshness_seconds", "destination" => destination.to_string()),
            delivered: counter!("herald_activator_deliveries_total", "destination" => destination.to_string(), "outcome" => "delivered"),
            attempts: AttemptClass::ALL.map(|class| {
                counter!("herald_activator_attempts_total", "destination" => destination.to_string(), "class" => class.as_str())
            }),
        }
    }
}

/// An event was delivered: the destination accepted it.
pub struct Delivered<'a> {
    /// The destination's series.
    pub metrics: &'a DestinationMetrics,
    /// Seconds from its `received_at` to now.
    pub freshness: f64,
}

impl Delivered<'_> {
    /// Records its freshness, then counts it: whoever sees the delivery counted also sees its
    /// freshness (a scrape, or a test waiting on the counter).
    pub fn emit(self) {
        self.metrics.freshness.record(self.freshness);
        self.metrics.delivered.increment(1);
    }
}

/// The class of a request's outcome, as [`Attempted`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptClass {
    /// 2xx (or the destination's own success).
    Success,
    /// Failed, worth trying again.
    Transient,
    /// Failed for good.
    Permanent,
}

impl AttemptClass {
    /// Every class, in declaration order (a class's index in [`DestinationMetrics`]).
    pub const ALL: [Self; 3] = [Self::Success, Self::Transient, Self::Permanent];

    /// Its metric label: `success`, or the failure class's own label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Transient => crate::destinations::FailureClass::Transient.as_str(),
            Self::Permanent => crate::destinations::FailureClass::Permanent.as_str(),
        }
    }
}

impl From<crate::destinations::FailureClass> for AttemptClass {
    fn from(class: crate::destinations::FailureClass) -> Self {
        match class {
            crate::destinations::FailureClass::Transient => Self::Transient,
            crate::destinations::FailureClass::Permanent => Self::Permanent,
        }
    }
}

/// A request was sent to a destination.
pub struct Attempted<'a> {
    /// The destination's series.
    pub metrics: &'a DestinationMetrics,
    /// How it ended.
    pub class: AttemptClass,
}

impl Attempted<'_> {
    /// Counts it.
    pub fn emit(self) {
        self.metrics.attempts[self.class as usize].increment(1);
    }
}

/// An event was written to the DLQ (and acked).
pub struct DeadLettered<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The event's id.
    pub event_id: &'a str,
    /// `permanent`, `attempts` or `age`.
    pub reason: &'static str,
    /// Attempts made.
    pub attempts: u32,
    /// The last HTTP status (0: none).
    pub status: u16,
    /// The last error.
    pub error: &'a str,
}

impl DeadLettered<'_> {
    /// Logs it (an operator decides: redrive or purge) and counts it.
    pub fn emit(self) {
        tracing::warn!(
            destination = self.destination,
            event_id = self.event_id,
            reason = self.reason,
            attempts = self.attempts,
            status = self.status,
            error = self.error,
            "event moved to the DLQ: see `herald dlq list --destination {}`",
            self.destination
        );
        counter!("herald_activator_deliveries_total", "destination" => self.destination.to_string(), "outcome" => "dlq")
            .increment(1);
    }
}

/// A dead letter could not be written; retried (the event stays unacked meanwhile).
pub struct DlqWriteFailed<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// Failed attempts so far.
    pub attempt: u32,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl DlqWriteFailed<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(
            destination = self.destination,
            attempt = self.attempt,
            error = %self.error,
            "cannot write a dead letter; retrying"
        );
    }
}

/// A delivery-status record could not be written or read (delivery carries on).
pub struct StatusWriteFailed<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl StatusWriteFailed<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(
            destination = self.destination,
            error = %self.error,
            "delivery status not recorded"
        );
    }
}

/// A dead letter was sent again by a redrive.
pub struct Redriven<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The event's id.
    pub event_id: &'a str,
    /// Whether the destination accepted it.
    pub delivered: bool,
}

impl Redriven<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::info!(
            destination = self.destination,
            event_id = self.event_id,
            delivered = self.delivered,
            "dead letter redriven"
        );
    }
}

/// A destination's dead letters were purged.
pub struct DlqPurged<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// How many.
    pub purged: u64,
}

impl DlqPurged<'_> {
    /// Logs it (data is dropped on an operator's request).
    pub fn emit(self) {
        tracing::warn!(
            destination = self.destination,
            purged = self.purged,
            "DLQ purged"
        );
    }
}

/// A destination's circuit breaker opened or closed.
pub struct BreakerChanged<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// Whether it opened (else it closed).
    pub open: bool,
}

impl BreakerChanged<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        let state = if self.open { "open" } else { "closed" };
        if self.open {
            tracing::warn!(
                destination = self.destination,
                "circuit breaker open: the destination keeps failing; sends wait for the cool-down"
            );
        } else {
            tracing::info!(destination = self.destination, "circuit breaker closed");
        }
        counter!("herald_activator_breaker_transitions_total", "destination" => self.destination.to_string(), "state" => state)
            .increment(1);
    }
}

/// The number of dead letters of a destination, read from the DLQ stream.
pub struct DlqSize<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// Dead letters waiting.
    pub events: u64,
}

impl DlqSize<'_> {
    /// Sets the gauge.
    pub fn emit(self) {
        gauge!("herald_activator_dlq_events", "destination" => self.destination.to_string())
            .set(self.events as f64);
    }
}

/// A send failed; it is retried after `wait`, or (`None`) not at all (a dead letter).
pub struct SendFailed<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The failure's kind (a closed set).
    pub reason: &'static str,
    /// `transient` or `permanent` (whether sending again can succeed).
    pub class: &'static str,
    /// Failed attempts so far.
    pub attempt: u32,
    /// The pause before the next attempt; `None` when it is not retried.
    pub wait: Option<Duration>,
    /// What failed.
    pub error: &'a str,
}

impl SendFailed<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        match self.wait {
            Some(wait) => tracing::warn!(
                destination = self.destination,
                reason = self.reason,
                class = self.class,
                attempt = self.attempt,
                wait_ms = wait.as_millis(),
                error = self.error,
                "send failed; retrying"
            ),
            None => tracing::warn!(
                destination = self.destination,
                reason = self.reason,
                class = self.class,
                attempt = self.attempt,
                error = self.error,
                "send failed; not retried"
            ),
        }
        counter!("herald_activator_send_failures_total", "destination" => self.destination.to_string(), "reason" => self.reason, "class" => self.class)
            .increment(1);
    }
}

/// An event was not sent, for a reason that is not an error of the destination.
pub struct Skipped<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// `historical`, `undecodable`, `filtered`, `filter_error` or `already_delivered` (a
    /// redelivery its delivery status says was delivered; `consent` is [`ConsentDropped`]'s).
    pub reason: &'static str,
}

impl Skipped<'_> {
    /// Counts it; logs an undecodable message (data is lost).
    pub fn emit(self) {
        if self.reason == "undecodable" {
            tracing::error!(
                destination = self.destination,
                "dropping a message that is not a herald.v1.ProcessedEvent"
            );
        }
        counter!("herald_activator_events_skipped_total", "destination" => self.destination.to_string(), "reason" => self.reason)
            .increment(1);
    }
}

/// The consent gate refused a send attempt (the event's snapshot or the person's current
/// consent does not allow it): the event is not sent, and is acked.
pub struct ConsentDropped<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The event's id.
    pub event_id: &'a str,
    /// Why.
    pub denial: &'a Denial,
}

impl ConsentDropped<'_> {
    /// Logs it at debug and counts it as skipped with `reason="consent"` and as a delivery
    /// with `outcome="consent_dropped"`.
    pub fn emit(self) {
        counter!("herald_activator_deliveries_total", "destination" => self.destination.to_string(), "outcome" => "consent_dropped")
            .increment(1);
        let (purpose, side) = match self.denial {
            Denial::OptedOut { side } => ("", *side),
            Denial::Refused { purpose, side } | Denial::Unknown { purpose, side } => {
                (purpose.as_str(), *side)
            }
        };
        tracing::debug!(
            destination = self.destination,
            event_id = self.event_id,
            denial = self.denial.kind(),
            purpose,
            state = match side {
                ConsentSide::Event => "event",
                ConsentSide::Current => "current",
            },
            "not sent: consent does not allow it"
        );
        counter!("herald_activator_events_skipped_total", "destination" => self.destination.to_string(), "reason" => "consent")
            .increment(1);
    }
}

/// The consent bucket (created by the processor) cannot be opened yet; the activator retries,
/// and delivers nothing meanwhile.
pub struct WaitingForConsentBucket<'a> {
    /// The bucket's name.
    pub bucket: &'a str,
    /// Failed attempts so far.
    pub attempt: u32,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl WaitingForConsentBucket<'_> {
    /// Logs the first attempt at info (normal on a first start: the processor creates it in a
    /// moment), then a warning about once a minute.
    pub fn emit(self) {
        if self.attempt == 1 {
            tracing::info!(
                bucket = self.bucket,
                error = %self.error,
                "waiting for the consent bucket (created by the processor); nothing is delivered until it is loaded"
            );
        } else if self.attempt.is_multiple_of(120) {
            tracing::warn!(
                bucket = self.bucket,
                error = %self.error,
                attempts = self.attempt,
                "the consent bucket is still missing: is the processor running? Nothing is delivered until it is loaded"
            );
        }
    }
}

/// The server did not confirm the ack of a delivered event; the ack is retried (the user's next
/// event waits for it).
pub struct AckRetried<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// Failed attempts so far.
    pub attempt: u32,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl AckRetried<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(
            destination = self.destination,
            error = %self.error,
            attempt = self.attempt,
            "ack not confirmed; retrying"
        );
    }
}

/// A destination's delivery loop started, was restarted with a new definition (`updated`),
/// stopped (`paused`), or stopped with its consumer deleted (`deleted`) on this replica.
pub struct DestinationChanged<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// `started`, `updated`, `paused` or `deleted`.
    pub action: &'a str,
}

impl DestinationChanged<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::info!(
            destination = self.destination,
            action = self.action,
            "destination {}",
            self.action
        );
        let action = match self.action {
            "started" => "started",
            "updated" => "updated",
            "paused" => "paused",
            _ => "deleted",
        };
        counter!("herald_activator_destination_changes_total", "destination" => self.destination.to_string(), "action" => action)
            .increment(1);
    }
}

/// A stored destination cannot run on this replica (its sender cannot be built, e.g. its
/// webhook URL now resolves to a refused address): nothing is delivered to it until it changes.
pub struct DestinationRefused<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// Why.
    pub error: &'a str,
}

impl DestinationRefused<'_> {
    /// Logs it (an operator must act) and counts it.
    pub fn emit(self) {
        tracing::error!(
            destination = self.destination,
            error = self.error,
            "destination not started: fix it with `herald destinations update`"
        );
        counter!("herald_activator_destination_changes_total", "destination" => self.destination.to_string(), "action" => "refused")
            .increment(1);
    }
}

/// A deleted destination's consumer could not be deleted (it keeps its backlog until deleted
/// by hand: `nats consumer rm`).
pub struct ConsumerNotDeleted<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The consumer's name.
    pub consumer: &'a str,
    /// Why.
    pub error: &'a str,
}

impl ConsumerNotDeleted<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(
            destination = self.destination,
            consumer = self.consumer,
            error = self.error,
            "cannot delete the consumer of a deleted destination"
        );
    }
}

/// Config-file destinations use deprecated top-level keys (`url`, `timeout_ms`, `log_file`,
/// `headers`, `secret`); they are mapped into `settings`.
pub struct DeprecatedDestinationKeys<'a> {
    /// `<id>: <key>, <key>` per destination, `; `-separated.
    pub uses: &'a str,
}

impl DeprecatedDestinationKeys<'_> {
    /// Logs it once.
    pub fn emit(self) {
        tracing::warn!(
            uses = self.uses,
            "[[activator.destinations]] keys url, timeout_ms, log_file, headers and secret are deprecated: move them into settings = {{ ... }} (e.g. settings = {{ url = \"https://...\" }}, settings = {{ \"header.Authorization\" = \"...\" }})"
        );
    }
}

// ---- consumers, ownership and scale-out ----

/// Registers HELP text for the metrics of this section.
fn describe_scale() {
    describe_gauge!(
        "herald_activator_backlog_events",
        "Events waiting for a destination (pending plus delivered and not yet acknowledged) in the consumers this replica reports: the partitions it owns of an ordered destination, the shared consumer of an unordered one on the owner of partition 0. Sum by destination over replicas."
    );
    describe_counter!(
        "herald_activator_partition_changes_total",
        "Partitions of ordered destinations this replica started (acquired) or stopped (released) delivering, by change."
    );
    describe_gauge!(
        "herald_activator_owned_partitions",
        "Partitions of an ordered destination this replica delivers now, by destination."
    );
    telemetry::zero_counters(
        "herald_activator_partition_changes_total",
        ["acquired", "released"].map(|change| [("change", change.to_string())]),
    );
}

/// A destination's backlog on this replica, refreshed every few seconds and after batches;
/// zero once the destination stops here.
pub struct Backlog<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// Pending plus acknowledgement-pending events of the consumers this replica reports.
    pub events: u64,
}

impl Backlog<'_> {
    /// Sets the gauge.
    pub fn emit(self) {
        gauge!("herald_activator_backlog_events", "destination" => self.destination.to_string())
            .set(self.events as f64);
    }
}

/// The partitions of an ordered destination this replica delivers changed (it joined, a
/// replica joined or left, or the destination started).
pub struct PartitionsChanged<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// Partitions started here.
    pub acquired: &'a [u32],
    /// Partitions stopped here.
    pub released: &'a [u32],
    /// Partitions delivered here now.
    pub owned: usize,
}

impl PartitionsChanged<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::info!(
            destination = self.destination,
            acquired = ?self.acquired,
            released = ?self.released,
            owned = self.owned,
            "destination partitions changed"
        );
        counter!("herald_activator_partition_changes_total", "change" => "acquired")
            .increment(self.acquired.len() as u64);
        counter!("herald_activator_partition_changes_total", "change" => "released")
            .increment(self.released.len() as u64);
        gauge!("herald_activator_owned_partitions", "destination" => self.destination.to_string())
            .set(self.owned as f64);
    }
}

/// A destination's consumers of the other mode (the single consumer of an earlier version, or
/// those of before an update switched between ordered and unordered) were deleted, or could not
/// be, after its new consumers were created at their lowest ack floor + 1.
pub struct OldConsumerRetired<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The old consumer's durable name.
    pub consumer: &'a str,
    /// Its ack floor (stream sequence) when it was read.
    pub resumed_after: u64,
    /// `None` when deleted, else why it could not be.
    pub error: Option<&'a dyn std::fmt::Display>,
}

impl OldConsumerRetired<'_> {
    /// Logs it; a failure needs an operator (delete the consumer by hand).
    pub fn emit(self) {
        match self.error {
            None => tracing::info!(
                destination = self.destination,
                consumer = self.consumer,
                ack_floor = self.resumed_after,
                "deleted the destination's old consumer; its new consumers continue after its ack floor"
            ),
            Some(error) => tracing::warn!(
                destination = self.destination,
                consumer = self.consumer,
                error = %error,
                "cannot delete the destination's old consumer; it keeps its backlog in the stream until deleted (nats consumer rm)"
            ),
        }
    }
}

// ---- privacy: suppressions, erasures once per person, replay ----

/// An event of a suppressed (or erased) identity was not sent: it is acked.
pub struct SuppressedDropped<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The event's id.
    pub event_id: &'a str,
}

impl SuppressedDropped<'_> {
    /// Logs it at debug and counts it as skipped with `reason="suppressed"`.
    pub fn emit(self) {
        tracing::debug!(
            destination = self.destination,
            event_id = self.event_id,
            "not sent: an identity of the event is suppressed"
        );
        counter!("herald_activator_events_skipped_total", "destination" => self.destination.to_string(), "reason" => "suppressed")
            .increment(1);
    }
}

/// An erasure was already sent (or is being sent) to the destination from another partition's
/// copy: this copy is acked without sending.
pub struct ErasureDuplicate<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The erasure request's id.
    pub request_id: &'a str,
}

impl ErasureDuplicate<'_> {
    /// Logs it at debug and counts it as skipped with `reason="erasure_duplicate"`.
    pub fn emit(self) {
        tracing::debug!(
            destination = self.destination,
            request_id = self.request_id,
            "erasure already sent to this destination"
        );
        counter!("herald_activator_events_skipped_total", "destination" => self.destination.to_string(), "reason" => "erasure_duplicate")
            .increment(1);
    }
}

/// Reading or writing the erasure ledger failed; it is retried (the erasure waits).
pub struct ErasureLedgerRetried<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// Failed attempts so far.
    pub attempt: u32,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl ErasureLedgerRetried<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(
            destination = self.destination,
            attempt = self.attempt,
            error = %self.error,
            "the erasure ledger failed; retrying"
        );
    }
}

/// A replay started.
pub struct ReplayStarted<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The window's start.
    pub from: chrono::DateTime<chrono::Utc>,
    /// The window's end (exclusive).
    pub to: chrono::DateTime<chrono::Utc>,
    /// The last stream sequence it reads.
    pub end_sequence: u64,
}

impl ReplayStarted<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::info!(
            destination = self.destination,
            from = %self.from,
            to = %self.to,
            end_sequence = self.end_sequence,
            "replay started"
        );
    }
}

/// A replay ended.
pub struct ReplayFinished<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// `completed`, `failed` or `cancelled`.
    pub result: &'static str,
    /// Events of the window read.
    pub read: u64,
    /// Events the destination acknowledged.
    pub sent: u64,
    /// Why it failed.
    pub error: Option<&'a str>,
}

impl ReplayFinished<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::info!(
            destination = self.destination,
            result = self.result,
            read = self.read,
            sent = self.sent,
            error = self.error.unwrap_or(""),
            "replay ended"
        );
        counter!("herald_activator_replays_total", "destination" => self.destination.to_string(), "result" => self.result)
            .increment(1);
    }
}

#[cfg(test)]
mod attempt_class_tests {
    use super::AttemptClass;

    #[test]
    fn attempt_classes_index_their_own_series_and_labels() {
        for (i, class) in AttemptClass::ALL.into_iter().enumerate() {
            assert_eq!(class as usize, i, "{class:?}");
        }
        let labels = AttemptClass::ALL.map(AttemptClass::as_str);
        assert_eq!(labels, ["success", "transient", "permanent"]);
    }
}
