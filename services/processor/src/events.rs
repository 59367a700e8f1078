//! The processor's telemetry: one function per event, each logging and counting together.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

/// Registers HELP text for every processor metric.
pub fn describe() {
    describe_counter!(
        "herald_processor_events_total",
        "Events handled by the processor, by outcome (processed, suppressed, unresolved, profile_error, undecodable)."
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
    describe_profiles();
}

/// A batch was processed and acked (its events are counted by outcome as they are handled).
pub fn batch_done(_events: usize, seconds: f64) {
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

// ---- identity resolution, profiles, consent, erasure ----

fn describe_profiles() {
    describe_counter!(
        "herald_processor_identities_blocked_total",
        "Identity values left out because they are blocked (null, undefined, 0, ...)."
    );
    describe_counter!(
        "herald_processor_identities_linked_total",
        "Identities linked to a profile in the identity graph."
    );
    describe_counter!(
        "herald_processor_identities_skipped_total",
        "Identities not linked, or profiles not merged, because of a per-type limit, by reason (limit, merge_limit)."
    );
    describe_counter!(
        "herald_processor_profiles_created_total",
        "Profiles created."
    );
    describe_counter!(
        "herald_processor_profiles_undone_total",
        "Profiles deleted right after creation because an identity of the event belonged to another profile already."
    );
    describe_counter!(
        "herald_processor_speculative_creates_total",
        "Events of identities unknown to the cache given a new profile without looking them up first, by result (right: they were new; wrong: one was known, the profile was undone)."
    );
    describe_counter!(
        "herald_processor_profile_merges_total",
        "Profiles merged into an older one (the merged profile becomes a redirect)."
    );
    describe_counter!(
        "herald_processor_cas_conflicts_total",
        "Compare-and-set writes that lost to a concurrent writer, by bucket (profiles, identities, consent)."
    );
    describe_counter!(
        "herald_processor_cas_retries_total",
        "Resolutions of an event started again after a compare-and-set conflict."
    );
    describe_counter!(
        "herald_processor_profile_cache_hits_total",
        "Hot-profile cache lookups answered from memory."
    );
    describe_counter!(
        "herald_processor_profile_cache_misses_total",
        "Hot-profile cache lookups that went to KV."
    );
    describe_gauge!(
        "herald_processor_profile_cache_bytes",
        metrics::Unit::Bytes,
        "Approximate memory held by the hot-profile cache (bounded by processor.profiles.cache_max_bytes)."
    );
    describe_counter!(
        "herald_processor_consent_changes_total",
        "Profile consent changes (each published as a consent-changed event)."
    );
    describe_counter!(
        "herald_processor_profile_errors_total",
        "Profile store errors while processing, by kind (kv, contended, not_ready, corrupt); all but corrupt are retried."
    );
    describe_counter!(
        "herald_processor_privacy_requests_total",
        "Erasure and suppression requests, by request (erase, suppress, unsuppress) and result (completed, failed)."
    );
}

/// Events with this outcome were handled (`processed`, `suppressed`, `unresolved`).
pub fn outcome(outcome: &'static str, n: u64) {
    if n > 0 {
        counter!("herald_processor_events_total", "outcome" => outcome).increment(n);
    }
}

/// An event named a suppressed identity and was dropped.
pub fn suppressed(event_id: &str) {
    tracing::debug!(event_id, "dropping an event of a suppressed identity");
    outcome("suppressed", 1);
}

/// A stored profile could not be read; the event is published without a profile.
pub fn profile_unreadable(event_id: &str, error: &dyn std::fmt::Display) {
    tracing::error!(event_id, error = %error, "cannot read a stored profile; publishing the event without profile data");
    counter!("herald_processor_profile_errors_total", "kind" => "corrupt").increment(1);
    outcome("profile_error", 1);
}

/// Resolving an event failed in a way that is retried.
pub fn profile_retry(attempt: u32, kind: &'static str, error: &dyn std::fmt::Display) {
    if attempt == 1 || attempt.is_multiple_of(20) {
        tracing::warn!(attempt, error = %error, "identity resolution failed; retrying");
    }
    counter!("herald_processor_profile_errors_total", "kind" => kind).increment(1);
}

/// Blocked identity values were left out of an event.
pub fn identities_blocked(n: usize) {
    if n > 0 {
        counter!("herald_processor_identities_blocked_total").increment(n as u64);
    }
}

/// An identity was linked to a profile.
pub fn identity_linked() {
    counter!("herald_processor_identities_linked_total").increment(1);
}

/// An identity was not linked (or its profile not merged) because of a limit.
pub fn identity_skipped(reason: &'static str) {
    counter!("herald_processor_identities_skipped_total", "reason" => reason).increment(1);
}

/// A profile was created.
pub fn profile_created() {
    counter!("herald_processor_profiles_created_total").increment(1);
}

/// A profile created for an event was deleted again: one of its identities was mapped.
pub fn profile_undone() {
    counter!("herald_processor_profiles_undone_total").increment(1);
}

/// A profile was created without looking the event's identities up first.
pub fn speculative_create(right: bool) {
    let result = if right { "right" } else { "wrong" };
    counter!("herald_processor_speculative_creates_total", "result" => result).increment(1);
}

/// A profile merged into another.
pub fn profile_merged(from: &str, into: &str) {
    tracing::debug!(from, into, "profiles merged");
    counter!("herald_processor_profile_merges_total").increment(1);
}

/// A compare-and-set write lost a race.
pub fn cas_conflict(bucket: &'static str) {
    counter!("herald_processor_cas_conflicts_total", "bucket" => bucket).increment(1);
}

/// An event's resolution starts again after a conflict.
pub fn cas_retry() {
    counter!("herald_processor_cas_retries_total").increment(1);
}

/// A cache lookup.
pub fn cache_lookup(hit: bool) {
    if hit {
        counter!("herald_processor_profile_cache_hits_total").increment(1);
    } else {
        counter!("herald_processor_profile_cache_misses_total").increment(1);
    }
}

/// The cache's size.
pub fn cache_size(bytes: u64) {
    gauge!("herald_processor_profile_cache_bytes").set(bytes as f64);
}

/// A profile's consent changed.
pub fn consent_changed() {
    counter!("herald_processor_consent_changes_total").increment(1);
}

/// An erasure, suppression or unsuppression request finished.
pub fn privacy_request(request: &'static str, ok: bool, request_id: &str) {
    let result = if ok { "completed" } else { "failed" };
    tracing::info!(request, result, request_id, "privacy request");
    counter!("herald_processor_privacy_requests_total", "request" => request, "result" => result)
        .increment(1);
}

// ---- partition ownership ----

/// Registers HELP text for the ownership metrics.
pub fn describe_ownership() {
    describe_gauge!(
        "herald_processor_owned_partitions",
        "Partitions of the events stream this replica owns now."
    );
    describe_gauge!(
        "herald_processor_partition_lag_events",
        "Events of a partition not yet delivered to this replica, by partition (0 for partitions it does not own)."
    );
    describe_counter!(
        "herald_processor_ownership_changes_total",
        "Partitions this replica started owning (change=acquired) or gave up (change=released)."
    );
}

/// The assignment gave this replica `acquired` and took `released`; it owns `owned` now.
pub fn ownership_changed(acquired: &[u32], released: &[u32], owned: usize) {
    if acquired.is_empty() && released.is_empty() {
        return;
    }
    tracing::info!(?acquired, ?released, owned, "partition ownership changed");
    counter!("herald_processor_ownership_changes_total", "change" => "acquired")
        .increment(acquired.len() as u64);
    counter!("herald_processor_ownership_changes_total", "change" => "released")
        .increment(released.len() as u64);
    gauge!("herald_processor_owned_partitions").set(owned as f64);
}

/// A partition's lag as of its last delivered message (the partition count bounds the label).
pub fn partition_lag(partition: u32, lag: u64) {
    gauge!("herald_processor_partition_lag_events", "partition" => partition.to_string())
        .set(lag as f64);
}
