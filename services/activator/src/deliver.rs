//! Delivery of one destination's batches.
//!
//! With `batch_max` 1 (the default) events are split into per-user queues: users in
//! parallel, each user's events one after another, each sent alone with no added wait. A
//! consumer loop feeds its batches into one flow ([`Delivery::deliver_flow`]), so a slow user
//! holds up only their own later events, not the next batch's other users. With
//! `batch_max` above 1 the batch is sent in stream order as requests of up to `batch_max`
//! events (`{"batch":[...]}`, Segment's batch shape), one request after another, so each
//! user's order holds within and across requests. A request is made of what the consumer has
//! waiting: nothing lingers for more (the 50 ms linger the design allows is not used).
//!
//! Every attempt first waits for the destination's circuit breaker and rate limit (see
//! [`crate::breaker`]; such a wait is not an attempt), then asks the consent gate about each
//! event (the event's consent snapshot and the person's current consent; an event it refuses
//! is not sent, and is acked as consent-dropped) and refuses an event any of whose identities
//! is suppressed or erased ([`herald_common::suppressions`]; acked as skipped, `suppressed`),
//! then sends. An erasure passes neither the filter nor the gate: it is sent alone, once per
//! person and destination ([`crate::erasure`]). 2xx is delivered. A transient
//! failure (408, 429, 5xx, network) is retried with jittered exponential backoff, or after the
//! destination's `Retry-After`, until the destination's `max_attempts` attempts were made or
//! `max_age_seconds` have passed since the first attempt (counted on this replica: a
//! redelivered event starts again). A permanent failure (any other 4xx), or running out of
//! attempts or age, writes a dead letter ([`crate::dlq`]) and acks the event: the user's next
//! events carry on. A batch request refused for good is sent again one event at a time, so
//! only the events the destination refuses are dead-lettered.
//!
//! A batch's `Idempotency-Key` is `<first event id>+<number of events>` (e.g.
//! `web:m-1+25`); each event keeps its own id in the body (`herald.eventId`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use async_nats::{Client, Subject};
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt as _;
use herald_common::flow::keyed_flow;
use herald_common::retry::{KeepAlive, Retry, backoff, jittered};
use herald_common::suppressions::Suppressions;
use herald_proto::v1::{
    Consent, DeliveryState, DeliveryStatusRecord, DlqReason, EventType, ProcessedEvent,
};
use prost::Message as _;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::breaker::{self, Breaker, RateLimit};
use crate::config::ActivatorConfig;
use crate::consent::ConsentCache;
use crate::destinations::{FailureClass, NetworkGuard, Sender};
use crate::dlq::{self, DeadLetters, LastFailure, Tried};
use crate::erasure::{Claimed, Erasure, ErasureLedger};
use crate::filter::{ConsentPolicy, Decision, Denial, Filter, integrations_allow};
use crate::record::{DestinationRecord, KindSettings};
use crate::status::{self, StatusStore};
use crate::{events, payload};

/// Delivery counters of one destination on this replica.
#[derive(Default)]
pub(crate) struct DestinationStats {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
}

struct Item {
    msg: Message,
    /// Its delivery count is above 1 (read once from the ack subject).
    redelivered: bool,
    event: ProcessedEvent,
    event_id: String,
    /// Its JSON as the destination gets it (shared, not copied, by each attempt's request).
    body: Bytes,
    /// Set for an erasure event: sent alone, once per request, past the filter and the gate.
    erasure: Option<Erasure>,
}

/// A destination's consent gate: its policy, and the cache of each person's current consent.
pub(crate) struct ConsentGate {
    /// The destination's policy (its required purposes and what unknown means).
    pub policy: ConsentPolicy,
    /// The current consent per profile.
    pub cache: ConsentCache,
    /// The suppression list: events of these identities are never sent.
    pub suppressions: Arc<Suppressions>,
    /// Which erasures were sent to which destination.
    pub erasures: ErasureLedger,
}

impl ConsentGate {
    /// Waits until the consent and the suppression list are loaded; false when `cancel` fired
    /// first.
    pub(crate) async fn wait_loaded(&self, cancel: &CancellationToken) -> bool {
        self.cache.wait_loaded(cancel).await && self.suppressions.wait_loaded(cancel).await
    }

    /// Whether any identity of `event` is suppressed (or erased).
    pub(crate) fn suppressed(&self, event: &ProcessedEvent) -> bool {
        self.suppressions
            .any(|| crate::suppressions::identity_keys(event))
    }

    /// Whether `event` (with its consent snapshot `snapshot`) may be sent now.
    pub(crate) fn decide_for(&self, event: &ProcessedEvent, snapshot: &Consent) -> Decision {
        self.policy
            .decide(snapshot, self.cache.current(&event.profile_id).as_ref())
    }

    /// [`Self::decide_for`] with the consent the event carried (none: the empty one).
    fn decide(&self, item: &Item) -> Decision {
        let none = Consent::default();
        self.decide_for(&item.event, item.event.consent.as_ref().unwrap_or(&none))
    }
}

/// How the delivery of one event ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Sent and accepted, after these attempts.
    Delivered(Tried),
    /// Not sent: the consent gate refused it (before the first attempt or a retry).
    Dropped(Denial),
    /// Not sent: one of its identities is suppressed (checked before every attempt).
    Suppressed,
    /// Refused for good, or out of attempts or age: a dead letter.
    Dead(DlqReason, Tried),
}

/// When an event stops being retried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    /// Most attempts of one event.
    pub max_attempts: u32,
    /// Longest an event is retried, from its first attempt.
    pub max_age: Duration,
    /// The longest pause between two attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The policy of destination `record`, with the service's longest backoff.
    pub(crate) fn of(
        record: &crate::record::DestinationRecord,
        cfg: &crate::config::ActivatorConfig,
    ) -> Self {
        Self {
            max_attempts: record.max_attempts.max(1),
            max_age: Duration::from_secs(record.max_age_seconds),
            max_backoff: Duration::from_millis(cfg.retry_max_backoff_ms),
        }
    }
}

/// What every destination's [`Delivery`] is built from ([`Delivery::build`]): shared by live
/// delivery, replay and redrive.
#[derive(Clone)]
pub(crate) struct DeliveryDeps {
    /// The JetStream context (a NATS destination publishes over it; dead letters go through it).
    pub js: async_nats::jetstream::Context,
    /// The names of streams and buckets.
    pub topology: herald_common::Topology,
    /// The service's settings (backoff, breaker, concurrency).
    pub cfg: ActivatorConfig,
    /// The SSRF guard of webhooks.
    pub guard: Arc<NetworkGuard>,
    /// The current consent per profile.
    pub consent: ConsentCache,
    /// The suppression list.
    pub suppressions: Arc<Suppressions>,
    /// The erasure ledger.
    pub erasures: ErasureLedger,
    /// The delivery-status bucket.
    pub status: StatusStore,
    /// Each destination's requests in flight on this replica.
    pub in_flight: InFlight,
}

/// Each destination's requests in flight on this replica: one semaphore of
/// `max_concurrent_keys` slots per destination, shared by every [`Delivery`] built for it
/// (live delivery of all its partitions, replays, DLQ redrives).
#[derive(Clone, Default)]
pub(crate) struct InFlight(Arc<std::sync::Mutex<HashMap<String, Arc<Semaphore>>>>);

impl InFlight {
    /// The semaphore of `destination`, made with `max` slots (0 is taken as 1) the first time.
    pub(crate) fn of(&self, destination: &str, max: usize) -> Arc<Semaphore> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.entry(destination.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(max.max(1))))
            .clone()
    }
}

/// Everything one destination's delivery needs, shared by its consumers' loops.
pub(crate) struct Delivery {
    /// The destination's id.
    pub destination: String,
    /// The destination's filter.
    pub filter: Filter,
    /// The destination's consent gate.
    pub gate: ConsentGate,
    /// The destination's sender.
    pub sender: Arc<Sender>,
    /// The destination's delivery counters on this replica.
    pub stats: Arc<DestinationStats>,
    /// The destination's per-request metric series.
    pub metrics: events::DestinationMetrics,
    /// The destination's requests in flight on this replica ([`InFlight`]), shared by all
    /// its consumer loops (one per partition of an ordered destination), replays and redrives:
    /// at most `max_concurrent_keys` at once, so a webhook gets at most that many connections
    /// from a replica however many partitions it owns. This is the only bound on how many
    /// users are sent at once: every user with an event held runs, so one waiting for its
    /// retry or for its ack's confirmation holds no request slot and holds up no other user.
    pub in_flight: Arc<Semaphore>,
    /// When to stop retrying an event.
    pub policy: RetryPolicy,
    /// Where dead letters go.
    pub dlq: DeadLetters,
    /// The destination's circuit breaker (shared by all its loops on this replica).
    pub breaker: Arc<Breaker>,
    /// The destination's rate limit on this replica, if it has one.
    pub rate_limit: Option<Arc<RateLimit>>,
    /// Most events per request (1: each event alone).
    pub batch_max: usize,
    /// Where each event's delivery status is recorded.
    pub status: StatusStore,
    /// The NATS client every ack goes out on (one connection, so a confirmed ack stands for
    /// the plain ones sent before it: [`confirm_acks`]).
    pub client: async_nats::Client,
    /// Whether every delivered event is recorded: `activator.delivery_status_delivered`, or
    /// the destination's `record_deliveries` (with recording on at all).
    pub records_delivered: bool,
}

impl Delivery {
    /// The delivery of `record` (checked, its sender connected), counting into `stats`.
    pub(crate) async fn build(
        record: &DestinationRecord,
        deps: &DeliveryDeps,
        stats: Arc<DestinationStats>,
    ) -> Result<Self, String> {
        let checked = record.check()?;
        let batch_max = match &checked.kind {
            KindSettings::Webhook(w) => w.batch_max.max(1) as usize,
            _ => 1,
        };
        let sender = Sender::connect(record, &deps.guard, &deps.js).await?;
        Ok(Self {
            destination: record.id.clone(),
            filter: checked.filter,
            gate: ConsentGate {
                policy: checked.consent,
                cache: deps.consent.clone(),
                suppressions: deps.suppressions.clone(),
                erasures: deps.erasures.clone(),
            },
            sender: Arc::new(sender),
            stats,
            metrics: events::DestinationMetrics::new(&record.id),
            in_flight: deps.in_flight.of(&record.id, deps.cfg.max_concurrent_keys),
            policy: RetryPolicy::of(record, &deps.cfg),
            dlq: DeadLetters::new(deps.js.clone(), &deps.topology, &record.id),
            breaker: Arc::new(Breaker::new(
                deps.cfg.breaker_failures,
                Duration::from_millis(deps.cfg.breaker_cool_down_ms),
            )),
            rate_limit: record.rate_limit.map(|r| Arc::new(RateLimit::new(r))),
            batch_max,
            status: deps.status.clone(),
            client: deps.js.client(),
            records_delivered: deps.status.records_delivered_of(record),
        })
    }

    /// Delivers one batch: every message is settled (acked) when this returns, unless
    /// `cancel` fired first (the rest then stay unacked and come back in order).
    pub(crate) async fn deliver_batch(&self, batch: Vec<Message>, cancel: &CancellationToken) {
        let items = self.admit(batch).await;
        if self.batch_max > 1 {
            self.deliver_in_batches(items, cancel).await;
            return;
        }
        // Every user of the batch at once; the requests wait for the destination's slots, and
        // the acks that need the server's confirmation share them (`AckGroup`).
        let (acks, asked) = AckGroup::new();
        let users = async move {
            let acks = &acks;
            futures_util::stream::iter(group_by_key(items))
                .for_each_concurrent(None, |items| self.deliver_in_order(items, acks, cancel))
                .await;
            // `acks` goes here, which ends `confirm_groups` once its last group is answered.
        };
        let max_backoff = self.policy.max_backoff;
        tokio::join!(
            users,
            confirm_groups(&self.destination, &self.client, asked, max_backoff, cancel)
        );
    }

    /// Delivers the batches `batches` brings (at `batch_max` 1), until it closes or `cancel`
    /// fires: each user's events one after another, every user with an event held at once (the
    /// requests wait for the destination's slots, [`Delivery::in_flight`]), with no barrier
    /// between batches (see [`keyed_flow`]: a batch's other users do not wait
    /// for its slowest one, and the next batch's users start at once). At
    /// most `max_held` events are taken in before some are settled. Each batch comes with the
    /// keep-alive of its messages (started by the sender, so a batch waiting in the channel is
    /// kept alive too), which runs until the last of its events is settled. `settled` runs
    /// after each event. On `cancel` nothing new starts and the sends in flight end as they do
    /// on cancel; events never started are given back at once (nak), so the next owner gets
    /// them without waiting for their ack wait.
    pub(crate) async fn deliver_flow(
        &self,
        batches: mpsc::Receiver<(Vec<Message>, KeepAlive)>,
        max_held: usize,
        settled: impl Fn(),
        cancel: &CancellationToken,
    ) {
        let (acks, asked) = AckGroup::new();
        let flow = async move {
            let acks = &acks;
            keyed_flow(
                batches,
                max_held,
                |(batch, alive)| async move {
                    let alive = Arc::new(alive);
                    self.admit(batch)
                        .await
                        .into_iter()
                        .map(|item| (item.event.profile_id.clone(), (item, alive.clone())))
                        .collect()
                },
                |_user, (item, alive): (Item, Arc<KeepAlive>)| async move {
                    // The batch's keep-alive runs until its last event is settled.
                    let _alive = alive;
                    self.deliver_one(&item, Some(acks), cancel).await
                },
                settled,
                cancel,
            )
            .await
            // `acks` goes here, which ends `confirm_groups` once its last group is answered.
        };
        let max_backoff = self.policy.max_backoff;
        let (left, ()) = tokio::join!(
            flow,
            confirm_groups(&self.destination, &self.client, asked, max_backoff, cancel)
        );
        for (item, _) in left {
            let _ = item.msg.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// Sends one profile's events one after another, each until it is delivered,
    /// consent-dropped or dead-lettered, acking each before the next is sent. Returns early,
    /// leaving the rest unacked (they come back in order), when `cancel` fires.
    async fn deliver_in_order(
        &self,
        items: Vec<Item>,
        acks: &AckGroup,
        cancel: &CancellationToken,
    ) {
        for item in items {
            if !self.deliver_one(&item, Some(acks), cancel).await {
                return;
            }
        }
    }

    /// Sends one event alone until it is delivered, dropped or dead-lettered, and acks it (an
    /// ack that needs the server's confirmation through `acks` when given); an erasure first
    /// claims its (destination, request) so it is sent once per person. `false` when `cancel`
    /// fired first.
    async fn deliver_one(
        &self,
        item: &Item,
        acks: Option<&AckGroup>,
        cancel: &CancellationToken,
    ) -> bool {
        let destination = self.destination.as_str();
        let max_backoff = self.policy.max_backoff;
        if let Some(erasure) = &item.erasure {
            match self
                .gate
                .erasures
                .claim(destination, erasure, max_backoff, cancel)
                .await
            {
                None => return false,
                Some(Claimed::Send) => {}
                Some(Claimed::Duplicate) => {
                    events::ErasureDuplicate {
                        destination,
                        request_id: &erasure.request_id,
                    }
                    .emit();
                    let reply = item.msg.reply.as_ref();
                    return confirm_ack(destination, &self.client, reply, max_backoff, cancel)
                        .await;
                }
            }
        }
        let Some(mut outcomes) = self.send(&[item], cancel).await else {
            return false;
        };
        let outcome = outcomes.pop().expect("one outcome per event");
        if let (Some(erasure), Outcome::Delivered(_)) = (&item.erasure, &outcome)
            && !self
                .gate
                .erasures
                .sent(destination, erasure, max_backoff, cancel)
                .await
        {
            return false;
        }
        self.settle(item, outcome, acks, cancel).await
    }

    /// Sends the batch in stream order as requests of up to `batch_max` events, one after
    /// another; a request refused for good is sent again one event at a time.
    async fn deliver_in_batches(&self, items: Vec<Item>, cancel: &CancellationToken) {
        // An erasure goes alone, in its place in the stream order.
        let mut runs: Vec<&[Item]> = Vec::new();
        let mut start = 0;
        for (i, item) in items.iter().enumerate() {
            if item.erasure.is_some() {
                runs.push(&items[start..i]);
                runs.push(&items[i..=i]);
                start = i + 1;
            }
        }
        runs.push(&items[start..]);
        for run in runs {
            if let [one] = run
                && one.erasure.is_some()
            {
                if !self.deliver_one(one, None, cancel).await {
                    return;
                }
                continue;
            }
            if !self.deliver_run(run, cancel).await {
                return;
            }
        }
    }

    /// Sends `items` (no erasure among them) as requests of up to `batch_max` events; `false`
    /// when `cancel` fired first.
    async fn deliver_run(&self, items: &[Item], cancel: &CancellationToken) -> bool {
        for chunk in items.chunks(self.batch_max) {
            let refs: Vec<&Item> = chunk.iter().collect();
            let Some(mut outcomes) = self.send(&refs, cancel).await else {
                return false;
            };
            if refs.len() > 1 {
                for (item, outcome) in chunk.iter().zip(outcomes.iter_mut()) {
                    if matches!(outcome, Outcome::Dead(DlqReason::Permanent, _)) {
                        let Some(mut alone) = self.send(&[item], cancel).await else {
                            return false;
                        };
                        *outcome = alone.pop().expect("one outcome per event");
                    }
                }
            }
            let mut records = Vec::with_capacity(chunk.len());
            for (item, outcome) in chunk.iter().zip(outcomes) {
                match self.record_outcome(item, outcome, cancel).await {
                    Some(record) => records.push(record),
                    None => return false,
                }
            }
            // Those whose record settles them are acked plainly as it is written; the others
            // together, with one confirmation (`confirm_acks`).
            let written = chunk
                .iter()
                .zip(records)
                .map(|(item, record)| self.record_for_ack(item, record));
            let to_confirm: Vec<AckReply> = futures_util::future::join_all(written)
                .await
                .into_iter()
                .zip(chunk)
                .filter(|(acked, _)| !acked)
                .map(|(_, item)| item.msg.reply.clone())
                .collect();
            if !confirm_acks(
                &self.destination,
                &self.client,
                &to_confirm,
                self.policy.max_backoff,
                cancel,
            )
            .await
            {
                return false;
            }
        }
        true
    }

    /// Counts and, for a dead letter, writes the outcome of one event, then records and acks
    /// it ([`Self::ack_and_record`]); `false` when `cancel` fired first.
    async fn settle(
        &self,
        item: &Item,
        outcome: Outcome,
        acks: Option<&AckGroup>,
        cancel: &CancellationToken,
    ) -> bool {
        // The next event of this user is sent only once this ack cannot be lost unnoticed:
        // after a crash, at most the last sent event is sent again (a dropped one is checked
        // again).
        match self.record_outcome(item, outcome, cancel).await {
            Some(record) => self.ack_and_record(item, record, acks, cancel).await,
            None => false,
        }
    }

    /// Records `item`'s delivery status, then acks it. A delivered event whose record is stored
    /// gets a plain ack: were the ack lost, its redelivery finds the record and is acked without
    /// sending ([`Self::already_delivered`]), so at most the status round trip is paid. Any
    /// other event (recording off, a delivered event not recorded, a failed write, or an
    /// outcome other than delivered) is acked with the server's confirmation before this
    /// user's next event goes out (through `acks`, with other users' acks, when given). A
    /// failed write is logged: the status is not worth holding delivery up.
    async fn ack_and_record(
        &self,
        item: &Item,
        record: DeliveryStatusRecord,
        acks: Option<&AckGroup>,
        cancel: &CancellationToken,
    ) -> bool {
        if self.record_for_ack(item, record).await {
            return true;
        }
        match acks {
            Some(acks) => acks.confirm(&item.msg).await,
            None => {
                confirm_ack(
                    &self.destination,
                    &self.client,
                    item.msg.reply.as_ref(),
                    self.policy.max_backoff,
                    cancel,
                )
                .await
            }
        }
    }

    /// Writes `item`'s delivery status where one is due; `true` when that settled it (a
    /// stored "delivered" record, then a plain ack sent), `false` when its ack still needs the
    /// server's confirmation.
    async fn record_for_ack(&self, item: &Item, record: DeliveryStatusRecord) -> bool {
        if !self.worth_recording(item, &record) {
            return false;
        }
        match self.status.write(&record).await {
            Ok(()) if record.state() == DeliveryState::Delivered => item.msg.ack().await.is_ok(),
            Ok(()) => false,
            Err(e) => {
                events::StatusWriteFailed {
                    destination: &self.destination,
                    error: &e,
                }
                .emit();
                false
            }
        }
    }

    /// Whether `record` is written: every outcome but a delivery when recording is on; a
    /// delivery when every delivery is recorded, or when a record may already stand for the
    /// event (a third or later attempt: a `retrying` record was written after the second; a
    /// redelivery: an earlier run may have written one), so that none is left stale.
    fn worth_recording(&self, item: &Item, record: &DeliveryStatusRecord) -> bool {
        if !self.status.enabled() {
            return false;
        }
        record.state() != DeliveryState::Delivered
            || self.records_delivered
            || record.attempts > 2
            || item.redelivered
    }

    /// Counts an outcome and returns its delivery-status record; a dead letter is written
    /// first (retried until it lands: the event is acked only once its dead letter is stored).
    /// `None` when `cancel` fired first.
    async fn record_outcome(
        &self,
        item: &Item,
        outcome: Outcome,
        cancel: &CancellationToken,
    ) -> Option<DeliveryStatusRecord> {
        let destination = self.destination.as_str();
        let status =
            |state, tried: &Tried| status::record(&item.event_id, destination, state, tried);
        Some(match outcome {
            Outcome::Delivered(tried) => {
                events::Delivered {
                    metrics: &self.metrics,
                    freshness: freshness(&item.event),
                }
                .emit();
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                status(DeliveryState::Delivered, &tried)
            }
            Outcome::Dropped(denial) => {
                events::ConsentDropped {
                    destination,
                    event_id: &item.event_id,
                    denial: &denial,
                }
                .emit();
                status(DeliveryState::ConsentDropped, &Tried::default())
            }
            Outcome::Suppressed => {
                events::SuppressedDropped {
                    destination,
                    event_id: &item.event_id,
                }
                .emit();
                status(DeliveryState::ConsentDropped, &Tried::default())
            }
            Outcome::Dead(reason, tried) => {
                let record = dlq::record(destination, &item.event, &tried, reason);
                let written = Retry::new(self.policy.max_backoff)
                    .run(
                        cancel,
                        || self.dlq.publish(&record),
                        |f| {
                            events::DlqWriteFailed {
                                destination,
                                attempt: f.attempt,
                                error: f.error,
                            }
                            .emit()
                        },
                    )
                    .await;
                written?;
                events::DeadLettered {
                    destination,
                    event_id: &item.event_id,
                    reason: dlq::reason_label(reason),
                    attempts: tried.attempts,
                    status: tried.failure.as_ref().map_or(0, |f| f.status),
                    error: tried.failure.as_ref().map_or("", |f| f.error.as_str()),
                }
                .emit();
                status(DeliveryState::Dlq, &tried)
            }
        })
    }

    /// Sends `items` as one request (one event alone, more as a batch) until it is accepted,
    /// refused for good, or out of attempts or age. Before every attempt it waits for the
    /// breaker and the rate limit, then asks the consent gate about each event still to send.
    /// Each event's outcome, in order; `None` when `cancel` fired first.
    async fn send(&self, items: &[&Item], cancel: &CancellationToken) -> Option<Vec<Outcome>> {
        let destination = self.destination.as_str();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; items.len()];
        let mut tried = Tried::default();
        loop {
            // A slot among the destination's requests in flight, held until the answer.
            let slot = tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                slot = self.in_flight.acquire() => slot.expect("the semaphore is never closed"),
            };
            let permit = self.breaker.acquire(cancel).await?;
            if let Some(limit) = &self.rate_limit {
                let pending = outcomes.iter().filter(|o| o.is_none()).count();
                if !limit.acquire(pending, cancel).await {
                    return None;
                }
            }
            for (item, outcome) in items.iter().zip(outcomes.iter_mut()) {
                if outcome.is_some() || item.erasure.is_some() {
                    continue;
                }
                if self.gate.suppressed(&item.event) {
                    *outcome = Some(Outcome::Suppressed);
                } else if let Decision::Deny(denial) = self.gate.decide(item) {
                    *outcome = Some(Outcome::Dropped(denial));
                }
            }
            let pending: Vec<&Item> = items
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| o.is_none())
                .map(|(item, _)| *item)
                .collect();
            if pending.is_empty() {
                // Nothing left to send: the permit goes back unused.
                drop(permit);
                return Some(outcomes.into_iter().flatten().collect());
            }
            let (key, body) = request(&pending);
            let now = Utc::now();
            tried.first.get_or_insert(now);
            tried.last = Some(now);
            tried.attempts += 1;
            let sent = self.sender.send(&key, &body).await;
            drop(slot);
            let error = match sent {
                Ok(()) => {
                    self.breaker_changed(self.breaker.record(permit, breaker::Result::Success));
                    events::Attempted {
                        metrics: &self.metrics,
                        class: events::AttemptClass::Success,
                    }
                    .emit();
                    return Some(
                        outcomes
                            .into_iter()
                            .map(|o| o.unwrap_or_else(|| Outcome::Delivered(tried.clone())))
                            .collect(),
                    );
                }
                Err(e) => e,
            };
            let class = error.class();
            self.breaker_changed(self.breaker.record(permit, breaker::Result::Failure(class)));
            self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            events::Attempted {
                metrics: &self.metrics,
                class: class.into(),
            }
            .emit();
            tried.failure = Some(LastFailure {
                status: error.status().unwrap_or(0),
                kind: error.kind(),
                error: error.to_string(),
                body: error.body_excerpt().to_string(),
            });
            let dead = if class == FailureClass::Permanent {
                Some(DlqReason::Permanent)
            } else if tried.attempts >= self.policy.max_attempts {
                Some(DlqReason::Attempts)
            } else if tried.first.is_some_and(|first| {
                (now - first).to_std().unwrap_or_default() >= self.policy.max_age
            }) {
                Some(DlqReason::Age)
            } else {
                None
            };
            let mut wait = jittered(backoff(tried.attempts, self.policy.max_backoff));
            // A destination's Retry-After replaces the backoff, within bounds.
            if let Some(after) = error.retry_after() {
                wait = after.min(self.policy.max_backoff * 6);
            }
            events::SendFailed {
                destination,
                reason: error.kind(),
                class: class.as_str(),
                attempt: tried.attempts,
                wait: dead.is_none().then_some(wait),
                error: &error.to_string(),
            }
            .emit();
            if dead.is_none() && tried.attempts == 2 && self.status.enabled() {
                // Still failing after two attempts: say so in its delivery status (once).
                for item in &pending {
                    let record = status::record(
                        &item.event_id,
                        destination,
                        DeliveryState::Retrying,
                        &tried,
                    );
                    if let Err(e) = self.status.write(&record).await {
                        events::StatusWriteFailed {
                            destination,
                            error: &e,
                        }
                        .emit();
                    }
                }
            }
            if let Some(reason) = dead {
                return Some(
                    outcomes
                        .into_iter()
                        .map(|o| o.unwrap_or_else(|| Outcome::Dead(reason, tried.clone())))
                        .collect(),
                );
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn breaker_changed(&self, change: Option<breaker::Transition>) {
        if let Some(change) = change {
            events::BreakerChanged {
                destination: &self.destination,
                open: change == breaker::Transition::Opened,
            }
            .emit();
        }
    }
}

/// The idempotency key and body of a request: one event is its id and its object; several
/// are `<first id>+<count>` and `{"batch":[...]}`.
fn request(items: &[&Item]) -> (String, Bytes) {
    if let [one] = items {
        return (one.event_id.clone(), one.body.clone());
    }
    let key = format!("{}+{}", items[0].event_id, items.len());
    let mut body = Vec::with_capacity(items.iter().map(|i| i.body.len() + 1).sum::<usize>() + 12);
    body.extend_from_slice(br#"{"batch":["#);
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&item.body);
    }
    body.extend_from_slice(b"]}");
    (key, body.into())
}

/// Seconds from the event's `received_at` to now (0 when it has none or it is in the future).
pub(crate) fn freshness(event: &ProcessedEvent) -> f64 {
    event
        .event
        .as_ref()
        .and_then(|e| e.received_at.as_ref())
        .and_then(herald_proto::time::from_proto)
        .map_or(0.0, |t| {
            (Utc::now() - t).to_std().unwrap_or_default().as_secs_f64()
        })
}

impl Delivery {
    /// Decodes and filters a batch, keeping stream order. Undecodable and historical events,
    /// those the destination's filter or the event's `integrations` object exclude, and
    /// redeliveries whose delivery status says delivered are settled (acked and counted) here.
    async fn admit(&self, batch: Vec<Message>) -> Vec<Item> {
        let (destination, filter) = (self.destination.as_str(), &self.filter);
        let mut items = Vec::with_capacity(batch.len());
        for msg in batch {
            let redelivered = msg.info().is_ok_and(|i| i.delivered > 1);
            let processed = match ProcessedEvent::decode(msg.payload.as_ref()) {
                Ok(p) => p,
                Err(_) => {
                    events::Skipped {
                        destination,
                        reason: "undecodable",
                    }
                    .emit();
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            let event = processed.event.as_ref();
            if event.is_some_and(|e| e.historical) {
                events::Skipped {
                    destination,
                    reason: "historical",
                }
                .emit();
                let _ = msg.ack().await;
                continue;
            }
            let event_id = event.map(|e| e.id.clone()).unwrap_or_default();
            if let Some(e) = event.filter(|e| e.r#type == EventType::Erasure as i32) {
                // Keyed by the request (the message id), so each destination sees one id per
                // person.
                let body = serde_json::to_vec(&payload::erasure(&processed))
                    .expect("JSON serialises")
                    .into();
                let erasure = Erasure {
                    request_id: e.message_id.clone(),
                    partition: e.partition,
                };
                items.push(Item {
                    msg,
                    redelivered,
                    event_id: erasure.request_id.clone(),
                    body,
                    erasure: Some(erasure),
                    event: processed,
                });
                continue;
            }
            let body = Bytes::from(payload::render_json(&processed));
            let integrations = event.map_or(&[][..], |e| &e.integrations[..]);
            let wanted = if !integrations_allow(integrations, destination) {
                Ok(false)
            } else if filter.matches_everything() {
                Ok(true)
            } else {
                let rendered = serde_json::from_slice(&body).expect("a rendered payload is JSON");
                filter.matches(&rendered).map_err(|e| e.to_string())
            };
            if !matches!(wanted, Ok(true)) {
                events::Skipped {
                    destination,
                    reason: if wanted.is_ok() {
                        "filtered"
                    } else {
                        "filter_error"
                    },
                }
                .emit();
                let _ = msg.ack().await;
                continue;
            }
            if redelivered && self.already_delivered(&event_id).await {
                events::Skipped {
                    destination,
                    reason: "already_delivered",
                }
                .emit();
                let _ = msg.ack().await;
                continue;
            }
            items.push(Item {
                msg,
                redelivered,
                erasure: None,
                event: processed,
                event_id,
                body,
            });
        }
        items
    }

    /// Whether the delivery status of a redelivered event says delivered (only redeliveries
    /// are looked up); a failed read counts as not delivered.
    async fn already_delivered(&self, event_id: &str) -> bool {
        if !self.status.enabled() {
            return false;
        }
        match self.status.read(event_id, &self.destination).await {
            Ok(Some(r)) => r.state() == DeliveryState::Delivered,
            Ok(None) => false,
            Err(e) => {
                events::StatusWriteFailed {
                    destination: &self.destination,
                    error: &e,
                }
                .emit();
                false
            }
        }
    }
}

/// Splits items into per-profile queues, keeping each profile's order.
fn group_by_key(items: Vec<Item>) -> Vec<Vec<Item>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Vec<Item>> = Vec::new();
    for item in items {
        let slot = *index
            .entry(item.event.profile_id.clone())
            .or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
        groups[slot].push(item);
    }
    groups
}

/// Where one message's ack goes: its reply subject (every JetStream message has one), sent
/// on [`Delivery::client`]. Cheaper to hold than the message while the ack waits: no headers,
/// payload or JetStream context.
type AckReply = Option<Subject>;

/// The acks a flow or a batch ([`Delivery::deliver_flow`], [`Delivery::deliver_batch`]: one
/// consumer's messages) wants confirmed, gathered: while one confirmation is on its way, the
/// acks asked for meanwhile wait, then go out together with one confirmation
/// ([`confirm_acks`], run by [`confirm_groups`]). Under load many users' events settle at
/// once, and their acks cost one round trip instead of one each; an ack asked for alone goes
/// out at once, as before.
pub(crate) struct AckGroup {
    asks: mpsc::UnboundedSender<(AckReply, oneshot::Sender<bool>)>,
}

/// What [`confirm_groups`] reads: the acks an [`AckGroup`] was asked to confirm.
type AckAsks = mpsc::UnboundedReceiver<(AckReply, oneshot::Sender<bool>)>;

impl AckGroup {
    fn new() -> (Self, AckAsks) {
        let (asks, asked) = mpsc::unbounded_channel();
        (Self { asks }, asked)
    }

    /// Acks `msg` and waits for the server's confirmation (of its group); `false` when the
    /// flow was cancelled first.
    async fn confirm(&self, msg: &Message) -> bool {
        let (done, answer) = oneshot::channel();
        if self.asks.send((msg.reply.clone(), done)).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

/// Confirms what an [`AckGroup`] is asked, a group at a time on `client`: the first ask and
/// every one waiting behind it, until the group is dropped and its last asks are answered.
async fn confirm_groups(
    destination: &str,
    client: &Client,
    mut asked: AckAsks,
    max_backoff: Duration,
    cancel: &CancellationToken,
) {
    let mut replies = Vec::new();
    let mut waiting = Vec::new();
    while let Some((reply, done)) = asked.recv().await {
        replies.push(reply);
        waiting.push(done);
        while let Ok((reply, done)) = asked.try_recv() {
            replies.push(reply);
            waiting.push(done);
        }
        let confirmed = confirm_acks(destination, client, &replies, max_backoff, cancel).await;
        replies.clear();
        for done in waiting.drain(..) {
            let _ = done.send(confirmed);
        }
    }
}

/// Acks the messages of `replies` (one consumer's) on `client` with one confirmation: every
/// one but the last plainly, then the last with the server's confirmation. On one connection
/// nats-server takes a consumer's acks in the order they were sent and answers a confirmed one
/// once it has taken it, so its answer means every earlier ack landed too: one round trip for
/// a request's events instead of one each. Were the connection made again meanwhile (a plain
/// ack can be lost with the old one) or a plain ack not sent, each is then confirmed on its
/// own (the server confirms an ack it already took, too). `false` when `cancel` fired first.
async fn confirm_acks(
    destination: &str,
    client: &Client,
    replies: &[AckReply],
    max_backoff: Duration,
    cancel: &CancellationToken,
) -> bool {
    let connects = client.statistics().connects.load(Ordering::Relaxed);
    confirm_acks_since(destination, client, replies, connects, max_backoff, cancel).await
}

/// [`confirm_acks`] on a connection that had been made `connects` times before it started.
async fn confirm_acks_since(
    destination: &str,
    client: &Client,
    replies: &[AckReply],
    connects: u64,
    max_backoff: Duration,
    cancel: &CancellationToken,
) -> bool {
    let Some((last, rest)) = replies.split_last() else {
        return true;
    };
    let mut sent = true;
    for reply in rest {
        sent &= match reply {
            Some(reply) => client.publish(reply.clone(), Bytes::new()).await.is_ok(),
            None => false,
        };
    }
    if !confirm_ack(destination, client, last.as_ref(), max_backoff, cancel).await {
        return false;
    }
    if sent && client.statistics().connects.load(Ordering::Relaxed) == connects {
        return true;
    }
    for reply in rest {
        if !confirm_ack(destination, client, reply.as_ref(), max_backoff, cancel).await {
            return false;
        }
    }
    true
}

/// Acks with the server's confirmation, retrying until it lands or the service stops.
async fn confirm_ack(
    destination: &str,
    client: &Client,
    reply: Option<&Subject>,
    max_backoff: Duration,
    cancel: &CancellationToken,
) -> bool {
    Retry::new(max_backoff)
        .run(
            cancel,
            || herald_common::nats::confirmed_ack(client, reply),
            |f| {
                events::AckRetried {
                    destination,
                    attempt: f.attempt,
                    error: f.error,
                }
                .emit()
            },
        )
        .await
        .is_some()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use futures_util::StreamExt as _;
    use herald_common::Topology;
    use herald_common::nats::ensure_stream;
    use herald_testkit::{
        NatsServer, WebhookServer, common_config, processed_track, publish_processed,
    };

    use super::*;
    use crate::destinations::NetworkGuard;
    use crate::filter::UnknownConsent;
    use crate::record::{DestinationKind, DestinationRecord, Settings};

    #[test]
    fn freshness_counts_from_received_at() {
        let mut e = ProcessedEvent::default();
        assert_eq!(freshness(&e), 0.0);
        e.event = Some(herald_proto::v1::Event {
            received_at: Some(herald_proto::time::to_proto(
                Utc::now() - chrono::Duration::seconds(5),
            )),
            ..Default::default()
        });
        let f = freshness(&e);
        assert!((5.0..60.0).contains(&f), "{f}");
    }

    #[test]
    fn every_delivery_of_a_destination_shares_its_slots() {
        let in_flight = InFlight::default();
        let live = in_flight.of("crm", 3);
        let replay = in_flight.of("crm", 3);
        assert!(Arc::ptr_eq(&live, &replay), "one semaphore per destination");
        assert_eq!(live.available_permits(), 3);
        assert!(!Arc::ptr_eq(&live, &in_flight.of("other", 3)));
        assert_eq!(in_flight.of("zero", 0).available_permits(), 1);
    }

    /// The next message of `consumer` (waiting up to 30 s).
    async fn next(consumer: &async_nats::jetstream::consumer::Consumer<pull::Config>) -> Message {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no message within 30 s"
            );
            let mut batch = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .expect("fetch");
            if let Some(m) = batch.next().await {
                return m.expect("a message");
            }
        }
    }

    /// A destination `hook` over a processed stream of one partition, its status store
    /// (`delivered`: every delivered event recorded) and a plain pull consumer to feed it.
    struct Rig {
        _nats: NatsServer,
        js: async_nats::jetstream::Context,
        topology: Topology,
        status: StatusStore,
        consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
        hook: WebhookServer,
        delivery: Delivery,
    }

    impl Rig {
        async fn start(delivered: bool) -> Self {
            let nats = NatsServer::start().await.expect("nats");
            let js = nats.jetstream().await;
            let common = common_config(&nats.url(), 1, "t");
            let topology = Topology::new(common.topology.clone());
            ensure_stream(&js, topology.processed_stream_config())
                .await
                .expect("stream");
            ensure_stream(&js, topology.dlq_stream_config())
                .await
                .expect("dlq");
            let status =
                StatusStore::new(js.clone(), &topology, Duration::from_secs(3600), delivered);
            status.ensure_bucket(1).await.expect("bucket");
            let consumer = js
                .get_stream(topology.processed_stream())
                .await
                .expect("stream")
                .create_consumer(pull::Config {
                    durable_name: Some("test".into()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(1),
                    ..Default::default()
                })
                .await
                .expect("consumer");
            let hook = WebhookServer::start().await.expect("hook");
            let mut record =
                DestinationRecord::new("hook".into(), DestinationKind::Webhook, Utc::now());
            record.settings = Settings([("url".to_string(), hook.url())].into());
            let guard = Arc::new(NetworkGuard::new(&["127.0.0.0/8".parse().unwrap()]));
            let delivery = Delivery {
                destination: "hook".into(),
                filter: Filter::new(&[], &[], None).expect("filter"),
                gate: ConsentGate {
                    policy: ConsentPolicy::new(&[], UnknownConsent::Deny),
                    cache: ConsentCache::default(),
                    suppressions: Arc::default(),
                    erasures: ErasureLedger::default(),
                },
                sender: Arc::new(Sender::new(&record, &guard).await.expect("sender")),
                stats: Arc::default(),
                metrics: events::DestinationMetrics::new("hook"),
                in_flight: InFlight::default().of("hook", 4),
                policy: RetryPolicy {
                    max_attempts: 5,
                    max_age: Duration::from_secs(60),
                    max_backoff: Duration::from_millis(100),
                },
                dlq: DeadLetters::new(js.clone(), &topology, "hook"),
                breaker: Arc::new(Breaker::new(0, Duration::from_secs(1))),
                rate_limit: None,
                batch_max: 1,
                records_delivered: status.records_delivered(),
                status: status.clone(),
                client: js.client(),
            };
            Self {
                _nats: nats,
                js,
                topology,
                status,
                consumer,
                hook,
                delivery,
            }
        }

        /// Stores user-1's events `seqs` in the processed stream.
        async fn publish(&self, seqs: &[u64]) {
            for &seq in seqs {
                self.publish_of(1, seq).await;
            }
        }

        /// Stores event `seq` of `user-<user>` (profile `p-<user>`) in the processed stream.
        async fn publish_of(&self, user: u32, seq: u64) {
            let processed = processed_track(&format!("user-{user}"), seq, 1, &format!("p-{user}"));
            publish_processed(&self.js, &self.topology, &processed)
                .await
                .expect("stored");
        }

        /// Stores user-1's events `seqs` and takes them from the consumer, unacked.
        async fn received(&self, seqs: &[u64]) -> Vec<Message> {
            self.publish(seqs).await;
            let mut msgs = Vec::with_capacity(seqs.len());
            while msgs.len() < seqs.len() {
                msgs.push(next(&self.consumer).await);
            }
            msgs
        }

        /// Messages this rig's connection has received so far (answers to its requests among
        /// them).
        fn answers(&self) -> u64 {
            self.js
                .client()
                .statistics()
                .in_messages
                .load(Ordering::Relaxed)
        }

        /// Waits until nothing is left unacked.
        async fn settled(&self) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let info = self.consumer.clone().info().await.expect("info").clone();
                if info.num_ack_pending == 0 {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "{info:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn record(&self, event_id: &str) -> Option<DeliveryStatusRecord> {
            self.status.read(event_id, "hook").await.expect("read")
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redelivered_event_recorded_as_delivered_is_acked_without_sending() {
        // Delivered events are not all recorded (the default): a redelivered one still is.
        let rig = Rig::start(false).await;
        let Rig {
            status,
            consumer,
            hook,
            delivery,
            ..
        } = &rig;
        rig.publish(&[1, 2]).await;
        // Event 1 was delivered by a replica that crashed before its ack: its record says
        // delivered. Event 2 was not. Both are left unacked once, and come back.
        let record_1 = status::record(
            "src:user-1-1",
            "hook",
            DeliveryState::Delivered,
            &Tried::default(),
        );
        status.write(&record_1).await.expect("recorded");
        for _ in 0..2 {
            let first = next(consumer).await;
            assert_eq!(first.info().expect("info").delivered, 1);
        }
        let cancel = CancellationToken::new();
        let again = vec![next(consumer).await, next(consumer).await];
        assert!(again.iter().all(|m| m.info().expect("info").delivered == 2));
        delivery.deliver_batch(again, &cancel).await;
        // Only event 2 is sent; event 1 is acked without a request.
        let got = hook
            .wait_for(1, Duration::from_secs(30))
            .await
            .expect("sent");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].header("idempotency-key"), Some("src:user-1-2"));
        // Both are settled (a delivered event's plain ack lands shortly after): nothing is
        // left pending.
        rig.settled().await;
        // Event 2's delivery is recorded: it was a redelivery, so an earlier run may have
        // left a record of it that must not go stale.
        let r = rig.record("src:user-1-2").await.expect("a record");
        assert_eq!((r.state(), r.attempts), (DeliveryState::Delivered, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_destinations_loops_share_its_requests_in_flight() {
        // Two consumer loops of one destination (two partitions), each with 4 users to send
        // at once: together they keep at most `max_concurrent_keys` (4) requests in flight,
        // so the destination never sees 8.
        let rig = Rig::start(false).await;
        rig.hook.set_delay(Duration::from_millis(300));
        for user in 10..18 {
            rig.publish_of(user, 1).await;
        }
        let mut msgs = Vec::new();
        for _ in 0..8 {
            msgs.push(next(&rig.consumer).await);
        }
        let second = msgs.split_off(4);
        let cancel = CancellationToken::new();
        tokio::join!(
            rig.delivery.deliver_batch(msgs, &cancel),
            rig.delivery.deliver_batch(second, &cancel),
        );
        rig.hook
            .wait_for(8, Duration::from_secs(30))
            .await
            .expect("all sent");
        assert_eq!(
            rig.hook.max_in_flight(),
            4,
            "the two loops shared the destination's 4 slots, and used them"
        );
        rig.settled().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn users_waiting_to_retry_do_not_hold_up_the_others() {
        // 4 request slots. The first 4 requests fail and their users wait 5 s (Retry-After)
        // to try again; the other 8 users are sent meanwhile, in the live flow and in a
        // batch (replays, redrives) alike, instead of waiting behind them.
        for live in [true, false] {
            let mut rig = Rig::start(false).await;
            rig.delivery.policy.max_backoff = Duration::from_secs(1);
            rig.hook.fail_next(4);
            rig.hook.set_retry_after(Some("5"));
            for user in 10..22 {
                rig.publish_of(user, 1).await;
            }
            let mut msgs = Vec::new();
            for _ in 0..12 {
                msgs.push(next(&rig.consumer).await);
            }
            let cancel = CancellationToken::new();
            let started = tokio::time::Instant::now();
            let deliver = async {
                if live {
                    let (batches, from_loop) = mpsc::channel(1);
                    let alive = KeepAlive::start(msgs.clone(), Duration::from_millis(300));
                    batches.send((msgs, alive)).await.expect("the flow runs");
                    drop(batches);
                    rig.delivery
                        .deliver_flow(from_loop, 64, || {}, &cancel)
                        .await;
                } else {
                    rig.delivery.deliver_batch(msgs, &cancel).await;
                }
            };
            let others = async {
                rig.hook
                    .wait_for(8, Duration::from_secs(30))
                    .await
                    .expect("the others sent");
                started.elapsed()
            };
            let ((), others) = tokio::join!(deliver, others);
            assert!(
                others < Duration::from_secs(3),
                "live {live}: the other users waited {others:?} for the retrying ones"
            );
            // The retrying users are delivered after their pause.
            let all = rig.hook.received();
            assert_eq!(all.len(), 12, "live {live}");
            assert!(started.elapsed() >= Duration::from_secs(5), "live {live}");
            rig.settled().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_delivery_is_recorded_only_when_every_delivery_is() {
        for delivered in [false, true] {
            let rig = Rig::start(delivered).await;
            rig.publish(&[1]).await;
            let msg = next(&rig.consumer).await;
            assert_eq!(msg.info().expect("info").delivered, 1);
            rig.delivery
                .deliver_batch(vec![msg], &CancellationToken::new())
                .await;
            rig.hook
                .wait_for(1, Duration::from_secs(30))
                .await
                .expect("sent");
            rig.settled().await;
            let r = rig.record("src:user-1-1").await;
            if delivered {
                let r = r.expect("recorded");
                assert_eq!((r.state(), r.attempts), (DeliveryState::Delivered, 1));
            } else {
                assert_eq!(r, None, "a plain delivery is not recorded by default");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_after_retries_replaces_its_retrying_record() {
        let rig = Rig::start(false).await;
        rig.publish(&[1]).await;
        // Two failed attempts (a retrying record is written after the second), then accepted.
        rig.hook.fail_next(2);
        let msg = next(&rig.consumer).await;
        rig.delivery
            .deliver_batch(vec![msg], &CancellationToken::new())
            .await;
        assert_eq!(rig.hook.attempts(), 3);
        rig.settled().await;
        let r = rig.record("src:user-1-1").await.expect("recorded");
        assert_eq!((r.state(), r.attempts), (DeliveryState::Delivered, 3));
    }

    #[tokio::test]
    async fn a_requests_acks_are_confirmed_with_one_round_trip() {
        let rig = Rig::start(false).await;
        let msgs = rig.received(&[1, 2, 3, 4, 5]).await;
        let before = rig.answers();
        let replies: Vec<AckReply> = msgs.iter().map(|m| m.reply.clone()).collect();
        let cancel = CancellationToken::new();
        let client = rig.js.client();
        let max_backoff = Duration::from_millis(100);
        assert!(confirm_acks("hook", &client, &replies, max_backoff, &cancel).await);
        // One answer for the five, and it stands for all of them: nothing is pending the
        // moment it has come.
        assert_eq!(rig.answers() - before, 1, "one confirmation");
        let info = rig.consumer.clone().info().await.expect("info").clone();
        assert_eq!(info.num_ack_pending, 0, "{info:?}");
        assert_eq!(info.ack_floor.stream_sequence, 5, "{info:?}");
    }

    #[tokio::test]
    async fn acks_asked_for_together_share_one_confirmation() {
        let rig = Rig::start(false).await;
        let msgs = rig.received(&[1, 2, 3, 4, 5]).await;
        let before = rig.answers();
        let (acks, asked) = AckGroup::new();
        let asks = async move {
            let acks = acks;
            futures_util::future::join_all(msgs.iter().map(|m| acks.confirm(m))).await
        };
        let cancel = CancellationToken::new();
        let max_backoff = Duration::from_millis(100);
        let client = rig.js.client();
        let (confirmed, ()) = tokio::join!(
            asks,
            confirm_groups("hook", &client, asked, max_backoff, &cancel)
        );
        assert_eq!(confirmed, vec![true; 5]);
        assert_eq!(rig.answers() - before, 1, "one confirmation for the five");
        let info = rig.consumer.clone().info().await.expect("info").clone();
        assert_eq!(info.num_ack_pending, 0, "{info:?}");
    }

    #[tokio::test]
    async fn after_a_reconnect_each_ack_is_confirmed_on_its_own() {
        let rig = Rig::start(false).await;
        let msgs = rig.received(&[1, 2, 3]).await;
        let before = rig.answers();
        let replies: Vec<AckReply> = msgs.iter().map(|m| m.reply.clone()).collect();
        // As if the connection had been made again since the acks started: a plain ack may
        // have gone with the old one.
        let connects = rig
            .js
            .client()
            .statistics()
            .connects
            .load(Ordering::Relaxed)
            - 1;
        let cancel = CancellationToken::new();
        let max_backoff = Duration::from_millis(100);
        let client = rig.js.client();
        assert!(
            confirm_acks_since("hook", &client, &replies, connects, max_backoff, &cancel).await
        );
        assert_eq!(rig.answers() - before, 3, "each confirmed");
        let info = rig.consumer.clone().info().await.expect("info").clone();
        assert_eq!(info.num_ack_pending, 0, "{info:?}");
    }
}
