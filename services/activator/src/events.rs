//! The activator's telemetry: one function per event, each logging and counting together.

use metrics::{counter, describe_counter, describe_histogram, histogram};

/// Registers HELP text for every activator metric.
pub fn describe() {
    describe_counter!(
        "herald_activator_events_delivered_total",
        "Events delivered to a destination (acknowledged by it)."
    );
    describe_counter!(
        "herald_activator_send_failures_total",
        "Failed send attempts, by destination and reason; each is retried."
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
pub fn delivered(destination: &str, seconds: f64) {
    counter!("herald_activator_events_delivered_total", "destination" => destination.to_string())
        .increment(1);
    histogram!("herald_activator_send_duration_seconds", "destination" => destination.to_string())
        .record(seconds);
}

/// A send failed and will be retried after `wait_ms`.
pub fn send_failed(
    destination: &str,
    kind: &'static str,
    attempt: u32,
    wait_ms: u128,
    error: &str,
) {
    tracing::warn!(
        destination,
        reason = kind,
        attempt,
        wait_ms,
        error,
        "send failed; retrying"
    );
    counter!("herald_activator_send_failures_total", "destination" => destination.to_string(), "reason" => kind)
        .increment(1);
}

/// An event was not sent, for a reason that is not an error of the destination.
pub fn skipped(destination: &str, reason: &'static str) {
    if reason == "undecodable" {
        tracing::error!(
            destination,
            "dropping a message that is not a herald.v1.ProcessedEvent"
        );
    }
    counter!("herald_activator_events_skipped_total", "destination" => destination.to_string(), "reason" => reason)
        .increment(1);
}
