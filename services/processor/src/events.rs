//! The processor's telemetry: one struct per thing that happens, whose `emit()` writes the log
//! line and updates the metrics together. Metric labels come from closed sets (outcomes, kinds,
//! buckets, reasons) or the partition number (bounded by the partition count).

use herald_common::telemetry::{self, NO_LABELS};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

/// Registers HELP text for every processor metric, and publishes at 0 every series whose labels
/// come from closed sets (outcomes, buckets, kinds), so dashboards and alerts have series from
/// start-up.
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
    telemetry::zero_counters(
        "herald_processor_events_total",
        [
            "processed",
            "suppressed",
            "unresolved",
            "profile_error",
            "undecodable",
        ]
        .map(|o| [("outcome", o)]),
    );
    telemetry::zero_counters("herald_processor_publish_retries_total", [NO_LABELS]);
    telemetry::zero_histograms("herald_processor_batch_duration_seconds", [NO_LABELS]);
    describe_profiles();
}

/// A batch was processed and acked (its events are counted by outcome as they are handled).
pub struct BatchDone {
    /// From fetch to input acks.
    pub seconds: f64,
}

impl BatchDone {
    /// Records the batch's duration.
    pub fn emit(self) {
        histogram!("herald_processor_batch_duration_seconds").record(self.seconds);
    }
}

/// A message could not be decoded as an `Event`; it is terminated (never redelivered).
pub struct Undecodable<'a> {
    /// Its subject.
    pub subject: &'a str,
    /// Why it does not decode.
    pub error: &'a prost::DecodeError,
}

impl Undecodable<'_> {
    /// Logs it (data is lost) and counts it.
    pub fn emit(self) {
        tracing::error!(subject = self.subject, error = %self.error, "dropping a message that is not a herald.v1.Event");
        counter!("herald_processor_events_total", "outcome" => "undecodable").increment(1);
    }
}

/// Publishing a batch's outputs failed; it will be retried.
pub struct PublishFailed<'a> {
    /// Failed attempts so far.
    pub attempt: u32,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl PublishFailed<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::warn!(
            attempt = self.attempt,
            error = %self.error,
            "publishing processed events failed; retrying"
        );
        counter!("herald_processor_publish_retries_total").increment(1);
    }
}

/// Acking an input failed after its output was stored: it is redelivered and deduplicated.
pub struct AckFailed<'a> {
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl AckFailed<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(error = %self.error, "ack failed; the event will be redelivered and deduplicated");
    }
}

/// The single events consumer of an earlier version (before partition ownership) was
/// deleted, or could not be: under interest retention it would keep every event forever.
pub struct OldConsumerRetired<'a> {
    /// Its durable name.
    pub consumer: &'a str,
    /// `None` when deleted, else why it could not be.
    pub error: Option<&'a dyn std::fmt::Display>,
}

impl OldConsumerRetired<'_> {
    /// Logs it; a failure needs an operator (delete the consumer by hand).
    pub fn emit(self) {
        match self.error {
            None => tracing::info!(
                consumer = self.consumer,
                "deleted the single events consumer of an earlier version; partitions have their own now"
            ),
            Some(error) => tracing::warn!(
                consumer = self.consumer,
                error = %error,
                "cannot delete the old single events consumer; it keeps every event in the stream until deleted"
            ),
        }
    }
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
        "herald_processor_profile_writes_total",
        "Profile writes that were stored (creations and compare-and-set updates; a batch's events of one person that change only their profile are one write)."
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
    for name in [
        "herald_processor_identities_blocked_total",
        "herald_processor_identities_linked_total",
        "herald_processor_profiles_created_total",
        "herald_processor_profiles_undone_total",
        "herald_processor_profile_merges_total",
        "herald_processor_cas_retries_total",
        "herald_processor_profile_cache_hits_total",
        "herald_processor_profile_cache_misses_total",
        "herald_processor_consent_changes_total",
    ] {
        telemetry::zero_counters(name, [NO_LABELS]);
    }
    telemetry::zero_gauges("herald_processor_profile_cache_bytes", [NO_LABELS]);
    telemetry::zero_counters(
        "herald_processor_identities_skipped_total",
        ["limit", "merge_limit"].map(|r| [("reason", r)]),
    );
    telemetry::zero_counters(
        "herald_processor_speculative_creates_total",
        ["right", "wrong"].map(|r| [("result", r)]),
    );
    telemetry::zero_counters(
        "herald_processor_cas_conflicts_total",
        ["profiles", "identities", "consent"].map(|b| [("bucket", b)]),
    );
    telemetry::zero_counters(
        "herald_processor_profile_errors_total",
        ["kv", "contended", "not_ready", "corrupt"].map(|k| [("kind", k)]),
    );
    telemetry::zero_counters(
        "herald_processor_privacy_requests_total",
        ["erase", "suppress", "unsuppress"]
            .into_iter()
            .flat_map(|request| {
                ["completed", "failed"].map(|result| [("request", request), ("result", result)])
            }),
    );
}

/// Events with this outcome were handled (`processed`, `suppressed`, `unresolved`,
/// `profile_error`).
pub struct EventsHandled {
    /// The outcome (a closed set).
    pub outcome: &'static str,
    /// How many.
    pub count: u64,
}

impl EventsHandled {
    /// Counts them.
    pub fn emit(self) {
        if self.count > 0 {
            counter!("herald_processor_events_total", "outcome" => self.outcome)
                .increment(self.count);
        }
    }
}

/// An event named a suppressed identity and was dropped.
pub struct Suppressed<'a> {
    /// The event.
    pub event_id: &'a str,
}

impl Suppressed<'_> {
    /// Logs (debug) and counts it.
    pub fn emit(self) {
        tracing::debug!(
            event_id = self.event_id,
            "dropping an event of a suppressed identity"
        );
        EventsHandled {
            outcome: "suppressed",
            count: 1,
        }
        .emit();
    }
}

/// A stored profile could not be read; the event is published without a profile.
pub struct ProfileUnreadable<'a> {
    /// The event.
    pub event_id: &'a str,
    /// Why.
    pub error: &'a dyn std::fmt::Display,
}

impl ProfileUnreadable<'_> {
    /// Logs (an operator must look at the stored value) and counts it.
    pub fn emit(self) {
        tracing::error!(event_id = self.event_id, error = %self.error, "cannot read a stored profile; publishing the event without profile data");
        counter!("herald_processor_profile_errors_total", "kind" => "corrupt").increment(1);
        EventsHandled {
            outcome: "profile_error",
            count: 1,
        }
        .emit();
    }
}

/// The consent record of a profile whose consent changed could not be written: the stored
/// record cannot be read. The profile holds the change; the activator does not see it.
pub struct ConsentUnwritable<'a> {
    /// The profile.
    pub profile_id: &'a str,
    /// Why.
    pub error: &'a dyn std::fmt::Display,
}

impl ConsentUnwritable<'_> {
    /// Logs (an operator must look at the stored record) and counts it.
    pub fn emit(self) {
        tracing::error!(profile_id = self.profile_id, error = %self.error, "cannot write the consent record of a profile whose consent changed; the stored record is unreadable");
        counter!("herald_processor_profile_errors_total", "kind" => "corrupt").increment(1);
    }
}

/// Resolving an event failed in a way that is retried.
pub struct ProfileRetried<'a> {
    /// Failed attempts so far.
    pub attempt: u32,
    /// The error's kind (a closed set).
    pub kind: &'static str,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl ProfileRetried<'_> {
    /// Logs the first failure and every 20th, and counts each.
    pub fn emit(self) {
        if self.attempt == 1 || self.attempt.is_multiple_of(20) {
            tracing::warn!(attempt = self.attempt, error = %self.error, "identity resolution failed; retrying");
        }
        counter!("herald_processor_profile_errors_total", "kind" => self.kind).increment(1);
    }
}

/// Blocked identity values were left out of an event.
pub struct IdentitiesBlocked {
    /// How many.
    pub count: usize,
}

impl IdentitiesBlocked {
    /// Counts them.
    pub fn emit(self) {
        if self.count > 0 {
            counter!("herald_processor_identities_blocked_total").increment(self.count as u64);
        }
    }
}

/// An identity was linked to a profile.
pub struct IdentityLinked;

impl IdentityLinked {
    /// Counts it.
    pub fn emit(self) {
        counter!("herald_processor_identities_linked_total").increment(1);
    }
}

/// An identity was not linked (or its profile not merged) because of a limit.
pub struct IdentitySkipped {
    /// `limit` or `merge_limit`.
    pub reason: &'static str,
}

impl IdentitySkipped {
    /// Counts it.
    pub fn emit(self) {
        counter!("herald_processor_identities_skipped_total", "reason" => self.reason).increment(1);
    }
}

/// A profile was created.
pub struct ProfileCreated;

impl ProfileCreated {
    /// Counts it.
    pub fn emit(self) {
        counter!("herald_processor_profiles_created_total").increment(1);
    }
}

/// A profile write (a creation or a compare-and-set update) was stored.
pub struct ProfileWritten;

impl ProfileWritten {
    /// Counts it.
    pub fn emit(self) {
        counter!("herald_processor_profile_writes_total").increment(1);
    }
}

/// A profile created for an event was deleted again: one of its identities was mapped.
pub struct ProfileUndone;

impl ProfileUndone {
    /// Counts it.
    pub fn emit(self) {
        counter!("herald_processor_profiles_undone_total").increment(1);
    }
}

/// A profile was created without looking the event's identities up first.
pub struct SpeculativeCreate {
    /// Whether the identities were indeed new.
    pub right: bool,
}

impl SpeculativeCreate {
    /// Counts it by result.
    pub fn emit(self) {
        let result = if self.right { "right" } else { "wrong" };
        counter!("herald_processor_speculative_creates_total", "result" => result).increment(1);
    }
}

/// A profile merged into another.
pub struct ProfileMerged<'a> {
    /// The merged profile (now a redirect).
    pub from: &'a str,
    /// The survivor.
    pub into: &'a str,
}

impl ProfileMerged<'_> {
    /// Logs (debug) and counts it.
    pub fn emit(self) {
        tracing::debug!(from = self.from, into = self.into, "profiles merged");
        counter!("herald_processor_profile_merges_total").increment(1);
    }
}

/// A compare-and-set write lost a race.
pub struct CasConflict {
    /// `profiles`, `identities` or `consent`.
    pub bucket: &'static str,
}

impl CasConflict {
    /// Counts it.
    pub fn emit(self) {
        counter!("herald_processor_cas_conflicts_total", "bucket" => self.bucket).increment(1);
    }
}

/// An event's resolution starts again after a conflict.
pub struct CasRetried;

impl CasRetried {
    /// Counts it.
    pub fn emit(self) {
        counter!("herald_processor_cas_retries_total").increment(1);
    }
}

/// A hot-cache lookup.
pub struct CacheLookup {
    /// Answered from memory.
    pub hit: bool,
}

impl CacheLookup {
    /// Counts it.
    pub fn emit(self) {
        if self.hit {
            counter!("herald_processor_profile_cache_hits_total").increment(1);
        } else {
            counter!("herald_processor_profile_cache_misses_total").increment(1);
        }
    }
}

/// The hot cache's size changed.
pub struct CacheSize {
    /// Approximate bytes held.
    pub bytes: u64,
}

impl CacheSize {
    /// Sets the gauge.
    pub fn emit(self) {
        gauge!("herald_processor_profile_cache_bytes").set(self.bytes as f64);
    }
}

/// A profile's consent changed.
pub struct ConsentChanged;

impl ConsentChanged {
    /// Counts it.
    pub fn emit(self) {
        counter!("herald_processor_consent_changes_total").increment(1);
    }
}

/// An erasure, suppression or unsuppression request finished.
pub struct PrivacyRequest<'a> {
    /// `erase`, `suppress` or `unsuppress`.
    pub request: &'static str,
    /// Whether it completed.
    pub ok: bool,
    /// The request's id (logged, never a label).
    pub request_id: &'a str,
}

impl PrivacyRequest<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        let result = if self.ok { "completed" } else { "failed" };
        tracing::info!(
            request = self.request,
            result,
            request_id = self.request_id,
            "privacy request"
        );
        counter!("herald_processor_privacy_requests_total", "request" => self.request, "result" => result)
            .increment(1);
    }
}

// ---- partition ownership ----

/// Registers HELP text for the ownership metrics, and publishes them at 0: no partition owned
/// yet, a lag of 0 for each of the `partitions` partitions (what a replica reports for the ones
/// it does not own), no changes.
pub fn describe_ownership(partitions: u32) {
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
    telemetry::zero_gauges("herald_processor_owned_partitions", [NO_LABELS]);
    telemetry::zero_gauges(
        "herald_processor_partition_lag_events",
        (0..partitions).map(|p| [("partition", p.to_string())]),
    );
    telemetry::zero_counters(
        "herald_processor_ownership_changes_total",
        ["acquired", "released"].map(|c| [("change", c)]),
    );
}

/// The assignment gave this replica `acquired` and took `released`; it owns `owned` now.
pub struct OwnershipChanged<'a> {
    /// Partitions it started owning.
    pub acquired: &'a [u32],
    /// Partitions it gave up.
    pub released: &'a [u32],
    /// Partitions it owns now.
    pub owned: usize,
}

impl OwnershipChanged<'_> {
    /// Logs and counts a change; nothing when nothing changed.
    pub fn emit(self) {
        let Self {
            acquired,
            released,
            owned,
        } = self;
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
}

/// A partition's lag as of its last delivered message (the partition count bounds the label).
pub struct PartitionLag {
    /// The partition.
    pub partition: u32,
    /// Events not yet delivered (0 for a partition no longer owned).
    pub lag: u64,
}

impl PartitionLag {
    /// Sets the gauge.
    pub fn emit(self) {
        gauge!("herald_processor_partition_lag_events", "partition" => self.partition.to_string())
            .set(self.lag as f64);
    }
}
