//! The processor's telemetry: one function per event, each logging and counting together.

use metrics::{counter, describe_counter, describe_histogram, histogram};

/// Registers HELP text for every processor metric.
pub fn describe() {
    describe_counter!(
        "herald_processor_events_total",
        "Events handled by the processor, by outcome (processed, undecodable)."
    );
    describe_counter!(
        "herald_processor_publish_retries_total",
        "Retries of a batch whose processed events could not be published."
    );
    describe_histogram!(
        "herald_processor_batch_duration_seconds",
        metrics::Unit::Seconds,
        "Time to process one batch, from fetch to input acks."
    );
}

/// A batch was processed and acked.
pub fn batch_done(events: usize, seconds: f64) {
    counter!("herald_processor_events_total", "outcome" => "processed").increment(events as u64);
    histogram!("herald_processor_batch_duration_seconds").record(seconds);
}

/// A message could not be decoded as an `Event`; it is terminated (never redelivered).
pub fn undecodable(subject: &str, error: &prost::DecodeError) {
    tracing::error!(subject, error = %error, "dropping a message that is not a herald.v1.Event");
    counter!("herald_processor_events_total", "outcome" => "undecodable").increment(1);
}

/// Publishing a batch's outputs failed; it will be retried.
pub fn publish_failed(attempt: u32, error: &str) {
    tracing::warn!(
        attempt,
        error,
        "publishing processed events failed; retrying"
    );
    counter!("herald_processor_publish_retries_total").increment(1);
}
