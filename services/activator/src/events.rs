//! The activator's telemetry: one struct per thing that happens, whose `emit()` writes the log
//! line and updates the metrics together. Labels come from closed sets (reasons) or configured
//! destination ids.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_histogram, histogram};

/// Registers HELP text for every activator metric.
pub fn describe() {
    describe_counter!(
        "herald_activator_events_delivered_total",
        "Events delivered to a destination (acknowledged by it)."
    );
    describe_counter!(
        "herald_activator_send_failures_total",
        "Failed send attempts, by destination, reason and class (transient or permanent); each is retried."
    );
    describe_counter!(
        "herald_activator_events_skipped_total",
        "Events not sent to a destination, by destination and reason (historical, undecodable)."
    );
    describe_histogram!(
        "herald_activator_send_duration_seconds",
        metrics::Unit::Seconds,
        "Time of one successful send to a destination."
    );
}

/// An event reached its destination.
pub struct Delivered<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// How long the successful send took.
    pub seconds: f64,
}

impl Delivered<'_> {
    /// Counts it and records the send's duration.
    pub fn emit(self) {
        counter!("herald_activator_events_delivered_total", "destination" => self.destination.to_string())
            .increment(1);
        histogram!("herald_activator_send_duration_seconds", "destination" => self.destination.to_string())
            .record(self.seconds);
    }
}

/// A send failed and will be retried after `wait`.
pub struct SendFailed<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// The failure's kind (a closed set).
    pub reason: &'static str,
    /// `transient` or `permanent` (whether sending again can succeed).
    pub class: &'static str,
    /// Failed attempts so far.
    pub attempt: u32,
    /// The pause before the next attempt.
    pub wait: Duration,
    /// What failed.
    pub error: &'a str,
}

impl SendFailed<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::warn!(
            destination = self.destination,
            reason = self.reason,
            class = self.class,
            attempt = self.attempt,
            wait_ms = self.wait.as_millis(),
            error = self.error,
            "send failed; retrying"
        );
        counter!("herald_activator_send_failures_total", "destination" => self.destination.to_string(), "reason" => self.reason, "class" => self.class)
            .increment(1);
    }
}

/// An event was not sent, for a reason that is not an error of the destination.
pub struct Skipped<'a> {
    /// The destination's id.
    pub destination: &'a str,
    /// `historical` or `undecodable`.
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
