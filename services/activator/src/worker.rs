//! One delivery loop per destination: ordered batches from the destination's own consumer,
//! each user's events sent one after another (users in parallel), failed sends retried in
//! process while in-progress acks keep the batch from being redelivered behind later events.
//! Before every attempt, retries included, the consent gate checks the event's consent snapshot
//! and the person's current consent; an event it refuses is not sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::{self, AckKind, Message};
use futures_util::StreamExt;
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::nats::{retry_until, wait_for_stream};
use herald_common::ordered::{OrderedReader, ReaderConfig};
use herald_common::retry::{Failure, KeepAlive, Retry};
use herald_proto::v1::{Consent, ProcessedEvent};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::config::ActivatorConfig;
use crate::consent::ConsentCache;
use crate::destinations::{SendError, Sender};
use crate::filter::{ConsentPolicy, Decision, Denial, Filter, integrations_allow};
use crate::record::DestinationRecord;
use crate::{events, payload};

/// Delivery counters of one destination on this replica.
#[derive(Default)]
pub(crate) struct DestinationStats {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
}

/// The durable consumer name of a destination.
pub fn consumer_name(destination_id: &str) -> String {
    format!("activator-{destination_id}")
}

pub(crate) fn readiness_check(destination_id: &str) -> String {
    format!("destination {destination_id} consumer")
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

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    js: jetstream::Context,
    topology: Topology,
    cfg: ActivatorConfig,
    dest: DestinationRecord,
    filter: Filter,
    gate: ConsentGate,
    sender: Arc<Sender>,
    stats: Arc<DestinationStats>,
    ready: Readiness,
    cancel: CancellationToken,
) {
    if wait_for_stream(&js, &topology.processed_stream(), &cancel)
        .await
        .is_none()
    {
        return;
    }
    // Nothing is sent before the person's current consent can be checked.
    if !gate.cache.wait_loaded(&cancel).await {
        return;
    }
    let reader_cfg = ReaderConfig {
        stream: topology.processed_stream(),
        durable: consumer_name(&dest.id),
        filter_subject: topology.processed_wildcard(),
        ack_wait: Duration::from_secs(cfg.ack_wait_seconds),
        max_ack_pending: cfg.max_ack_pending,
        batch: cfg.batch_size,
        description: format!("Herald activator: destination {}", dest.id),
    };
    let check = readiness_check(&dest.id);
    ready.set(&check, false);
    let Some(mut reader) = retry_until("binding a destination consumer", &cancel, || async {
        create_consumer(&js, &reader_cfg, &dest).await?;
        OrderedReader::bind(&js, reader_cfg.clone())
            .await
            .map_err(|e| e.to_string())
    })
    .await
    else {
        // Stopped before it was bound: nothing to wait for.
        ready.set(&check, true);
        return;
    };
    ready.set(&check, true);
    tracing::info!(destination = %dest.id, kind = dest.kind.as_str(), "delivering");

    let keep_alive_every = Duration::from_secs(cfg.ack_wait_seconds.max(3)) / 3;
    let max_backoff = Duration::from_millis(cfg.retry_max_backoff_ms);
    while let Some(batch) = reader.next_batch(&cancel).await {
        let keep_alive = KeepAlive::start(batch.clone(), keep_alive_every);
        let groups = group_by_key(&dest.id, &filter, batch).await;
        futures_util::stream::iter(groups)
            .for_each_concurrent(cfg.max_concurrent_keys.max(1), |items| {
                deliver_in_order(
                    &dest.id,
                    &sender,
                    &gate,
                    &stats,
                    items,
                    max_backoff,
                    &cancel,
                )
            })
            .await;
        drop(keep_alive);
        if cancel.is_cancelled() {
            break;
        }
    }
    // Messages the reader holds and has not handed out go back at once (nak), so a resumed or
    // updated destination, or another replica, gets them without waiting for the ack wait.
    reader.release().await;
    // A stopped destination (paused, deleted, updated, or the service stopping) holds nothing
    // up; an updated one sets its check again as it binds.
    ready.set(&check, true);
}

/// Creates a destination's consumer when it does not exist yet, starting where the record's
/// `start` says. An existing consumer (an upgrade from the config-file activator, an update, a
/// restart) is left where it is: nothing it acknowledged is skipped or sent again.
async fn create_consumer(
    js: &jetstream::Context,
    reader_cfg: &ReaderConfig,
    dest: &DestinationRecord,
) -> Result<(), String> {
    let stream = js
        .get_stream(&reader_cfg.stream)
        .await
        .map_err(|e| e.to_string())?;
    if stream
        .get_consumer::<PullConfig>(&reader_cfg.durable)
        .await
        .is_ok()
    {
        return Ok(());
    }
    let config = PullConfig {
        durable_name: Some(reader_cfg.durable.clone()),
        description: Some(reader_cfg.description.clone()),
        deliver_policy: dest.deliver_policy(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: reader_cfg.ack_wait,
        max_ack_pending: reader_cfg.max_ack_pending,
        filter_subject: reader_cfg.filter_subject.clone(),
        ..Default::default()
    };
    match stream.create_consumer(config).await {
        Ok(_) => Ok(()),
        // Another replica created it meanwhile.
        Err(_)
            if stream
                .get_consumer::<PullConfig>(&reader_cfg.durable)
                .await
                .is_ok() =>
        {
            Ok(())
        }
        Err(e) => Err(e.to_string()),
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
