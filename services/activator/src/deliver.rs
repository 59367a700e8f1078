//! Delivery of one destination's batches: each batch is split into per-user queues (users in
//! parallel, each user's events one after another), failed sends are retried in process with
//! backoff, and before every attempt, retries included, the consent gate checks the event's
//! consent snapshot and the person's current consent; an event it refuses is not sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt;
use herald_common::retry::{Failure, Retry};
use herald_proto::v1::{Consent, ProcessedEvent};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::consent::ConsentCache;
use crate::destinations::{SendError, Sender};
use crate::filter::{ConsentPolicy, Decision, Denial, Filter, integrations_allow};
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
}

/// A destination's consent gate: its policy, and the cache of each person's current consent.
pub(crate) struct ConsentGate {
    /// The destination's policy (its required purposes and what unknown means).
    pub policy: ConsentPolicy,
    /// The current consent per profile.
    pub cache: ConsentCache,
}

impl ConsentGate {
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
        let sent = Retry::new(max_backoff)
            .jitter()
            .run(
                cancel,
                || async {
                    if let Decision::Deny(denial) = gate.decide(&item) {
                        return Ok(Outcome::Dropped(denial));
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
            }
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
