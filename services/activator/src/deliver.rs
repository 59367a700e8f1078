//! Delivery of one destination's batches: each batch is split into per-user queues (users in
//! parallel, each user's events one after another), failed sends are retried in process with
//! backoff, and before every attempt, retries included, the consent gate checks the event's
//! consent snapshot and the person's current consent, and refuses an event of a suppressed or
//! erased identity ([`crate::suppressions`]); an event it refuses is not sent. An erasure
//! passes neither the filter nor the gate: it is sent once per person ([`crate::erasure`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt;
use herald_common::retry::{Failure, Retry};
use herald_common::suppressions::Suppressions;
use herald_proto::v1::{Consent, EventType, ProcessedEvent};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::consent::ConsentCache;
use crate::destinations::{NetworkGuard, SendError, Sender};
use crate::erasure::{Claimed, Erasure, ErasureLedger};
use crate::filter::{ConsentPolicy, Decision, Denial, Filter, integrations_allow};
use crate::record::DestinationRecord;
use crate::{events, payload};

/// Delivery counters of one destination on this replica.
#[derive(Default)]
pub(crate) struct DestinationStats {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
}

struct Item {
    msg: Message,
    event_id: String,
    body: Vec<u8>,
    /// The person's profile, whose current consent is checked before each attempt.
    profile_id: String,
    /// The consent the event carried (the default, empty one when none).
    snapshot: Consent,
    /// The suppressions-bucket keys of every identity the event names.
    identity_keys: Vec<String>,
    /// Set for an erasure event: sent once per request, past the filter and the gate.
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

    fn suppressed(&self, item: &Item) -> bool {
        self.suppressions.any(&item.identity_keys)
    }

    fn decide(&self, item: &Item) -> Decision {
        self.policy.decide(
            &item.snapshot,
            self.cache.current(&item.profile_id).as_ref(),
        )
    }
}

/// How the retried send of one event ended.
enum Outcome {
    /// Sent, in this time.
    Delivered(Duration),
    /// Not sent: the consent gate refused it (before the first attempt or a retry).
    Dropped(Denial),
    /// Not sent: one of its identities is suppressed.
    Suppressed,
}

/// What every destination's [`Delivery`] is built from ([`Delivery::build`]): shared by live
/// delivery and replay.
#[derive(Clone)]
pub(crate) struct DeliveryDeps {
    /// The JetStream context (a NATS destination publishes over it).
    pub js: async_nats::jetstream::Context,
    /// The SSRF guard of webhooks.
    pub guard: Arc<NetworkGuard>,
    /// The current consent per profile.
    pub consent: ConsentCache,
    /// The suppression list.
    pub suppressions: Arc<Suppressions>,
    /// The erasure ledger.
    pub erasures: ErasureLedger,
    /// How many users' queues are sent at once.
    pub max_concurrent_keys: usize,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
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
    /// How many users' queues are sent at once.
    pub max_concurrent_keys: usize,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Delivery {
    /// The delivery of `record` (checked, its sender connected), counting into `stats`.
    pub(crate) async fn build(
        record: &DestinationRecord,
        deps: &DeliveryDeps,
        stats: Arc<DestinationStats>,
    ) -> Result<Self, String> {
        let checked = record.check()?;
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
            max_concurrent_keys: deps.max_concurrent_keys,
            max_backoff: deps.max_backoff,
        })
    }

    /// Delivers one batch: every message is settled (acked) when this returns, unless
    /// `cancel` fired first (the rest then stay unacked and come back in order).
    pub(crate) async fn deliver_batch(&self, batch: Vec<Message>, cancel: &CancellationToken) {
        let groups = group_by_key(&self.destination, &self.filter, batch).await;
        futures_util::stream::iter(groups)
            .for_each_concurrent(self.max_concurrent_keys.max(1), |items| {
                deliver_in_order(
                    &self.destination,
                    &self.sender,
                    &self.gate,
                    &self.stats,
                    items,
                    self.max_backoff,
                    cancel,
                )
            })
            .await;
    }
}

/// Splits a batch into per-profile queues, keeping each profile's order. Undecodable and
/// historical events, and those the destination's filter or the event's `integrations` object
/// exclude, are settled (acked and counted) here.
async fn group_by_key(destination: &str, filter: &Filter, batch: Vec<Message>) -> Vec<Vec<Item>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Vec<Item>> = Vec::new();
    for msg in batch {
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
            // Keyed by the request (the message id), so each destination sees one id per person.
            let body = serde_json::to_vec(&payload::erasure(&processed)).expect("JSON serialises");
            let erasure = Erasure {
                request_id: e.message_id.clone(),
                partition: e.partition,
            };
            let slot = *index
                .entry(processed.profile_id.clone())
                .or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
            groups[slot].push(Item {
                msg,
                event_id: erasure.request_id.clone(),
                body,
                profile_id: processed.profile_id.clone(),
                snapshot: Consent::default(),
                identity_keys: Vec::new(),
                erasure: Some(erasure),
            });
            continue;
        }
        let rendered = payload::render(&processed);
        let wanted = if integrations_allow(&rendered, destination) {
            filter.matches(&rendered).map_err(|e| e.to_string())
        } else {
            Ok(false)
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
        let body = serde_json::to_vec(&rendered).expect("JSON values serialise");
        let slot = *index
            .entry(processed.profile_id.clone())
            .or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
        groups[slot].push(Item {
            msg,
            event_id,
            body,
            profile_id: processed.profile_id.clone(),
            snapshot: processed.consent.clone().unwrap_or_default(),
            identity_keys: crate::suppressions::identity_keys(&processed),
            erasure: None,
        });
    }
    groups
}

/// Sends one profile's events one after another, retrying each until it succeeds or the
/// service stops (then the rest stay unacked and come back in order after a restart). Every
/// attempt, retries included, first asks the consent gate: an event it refuses is not sent
/// (its retry ends), and is acked and counted as consent-dropped.
async fn deliver_in_order(
    destination: &str,
    sender: &Sender,
    gate: &ConsentGate,
    stats: &DestinationStats,
    items: Vec<Item>,
    max_backoff: Duration,
    cancel: &CancellationToken,
) {
    for item in items {
        if let Some(erasure) = &item.erasure {
            match gate
                .erasures
                .claim(destination, erasure, max_backoff, cancel)
                .await
            {
                None => return,
                Some(Claimed::Send) => {}
                Some(Claimed::Duplicate) => {
                    events::ErasureDuplicate {
                        destination,
                        request_id: &erasure.request_id,
                    }
                    .emit();
                    if !confirm_ack(destination, &item.msg, max_backoff, cancel).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let sent = Retry::new(max_backoff)
            .jitter()
            .run(
                cancel,
                || async {
                    if item.erasure.is_none() {
                        if gate.suppressed(&item) {
                            return Ok(Outcome::Suppressed);
                        }
                        if let Decision::Deny(denial) = gate.decide(&item) {
                            return Ok(Outcome::Dropped(denial));
                        }
                    }
                    let started = Instant::now();
                    sender.send(&item.event_id, &item.body).await?;
                    Ok(Outcome::Delivered(started.elapsed()))
                },
                |f: &mut Failure<'_, SendError>| {
                    stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    // A destination's Retry-After replaces the backoff, within bounds.
                    if let Some(after) = f.error.retry_after() {
                        f.wait = after.min(max_backoff * 6);
                    }
                    // Permanent failures are retried too until the DLQ exists; their class
                    // is logged and counted.
                    events::SendFailed {
                        destination,
                        reason: f.error.kind(),
                        class: f.error.class().as_str(),
                        attempt: f.attempt,
                        wait: f.wait,
                        error: &f.error.to_string(),
                    }
                    .emit();
                },
            )
            .await;
        match sent {
            None => return,
            Some(Outcome::Delivered(took)) => {
                events::Delivered {
                    destination,
                    seconds: took.as_secs_f64(),
                }
                .emit();
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                if let Some(erasure) = &item.erasure
                    && !gate
                        .erasures
                        .sent(destination, erasure, max_backoff, cancel)
                        .await
                {
                    return;
                }
            }
            Some(Outcome::Suppressed) => events::SuppressedDropped {
                destination,
                event_id: &item.event_id,
            }
            .emit(),
            Some(Outcome::Dropped(denial)) => events::ConsentDropped {
                destination,
                event_id: &item.event_id,
                denial: &denial,
            }
            .emit(),
        }
        // The next event of this user is sent only once the server has confirmed this ack:
        // after a crash, at most the last sent event is sent again (a dropped one is checked
        // again).
        if !confirm_ack(destination, &item.msg, max_backoff, cancel).await {
            return;
        }
    }
}

/// Acks with the server's confirmation, retrying until it lands or the service stops.
async fn confirm_ack(
    destination: &str,
    msg: &Message,
    max_backoff: Duration,
    cancel: &CancellationToken,
) -> bool {
    Retry::new(max_backoff)
        .run(
            cancel,
            || msg.double_ack(),
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
