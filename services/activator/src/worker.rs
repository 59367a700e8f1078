//! A destination's consumers and delivery loops on this replica.
//!
//! An ordered destination (the default) has one durable consumer per partition of the processed
//! stream (`activator-<id>-p<N>`, filter `<prefix>.processed.<N>`), pinned through the
//! [`PRIORITY_GROUP`] exactly as the processor's are: every replica runs a loop, read with
//! [`OrderedReader::bind_pinned`], for each partition it owns in the `activator` member list
//! ([`herald_common::ownership`]), so each user's events reach the destination in order and a
//! killed replica's partitions are taken over. An unordered destination has one shared consumer
//! (`activator-<id>`, filter `<prefix>.processed.*`, not pinned) that every replica pulls; no
//! per-user order is promised there.
//!
//! Each loop hands its batches to the destination's [`Delivery`] through a [`Feeder`] (one
//! flow with no barrier between batches at `batch_max` 1, see [`Delivery::deliver_flow`])
//! while in-progress acks keep each batch from being redelivered behind later events. Each
//! consumer's `max_ack_pending` and the batch size bound what one destination holds: a failing
//! destination builds only its own backlog.
//!
//! All of a destination's consumers are created when it starts on any replica, from the same
//! start ([`DestinationRecord::deliver_policy`]). A destination that still has the consumers of
//! the other mode (the single `activator-<id>` of earlier versions, or those of an update that
//! switched between ordered and unordered) gets its new consumers at the old ones' lowest ack
//! floor + 1, whatever its start says, and the old ones are deleted then: nothing acknowledged
//! before is lost (a few events acknowledged above the floor may be sent again, with the same
//! `Idempotency-Key`). The stored record is read again first: a replica whose watch is behind
//! (the record's `ordered` changed, or it was deleted) creates and retires nothing.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, PriorityPolicy};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind, Message};
use futures_util::{FutureExt as _, StreamExt as _};
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::nats::{retry_until, wait_for_stream};
use herald_common::ordered::{OrderedReader, PinnedGroup, ReaderConfig};
use herald_common::ownership::{Assignment, PRIORITY_GROUP, PartitionTasks, partition_consumer};
use herald_common::retry::KeepAlive;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::ActivatorConfig;
use crate::deliver::Delivery;
use crate::events;
use crate::record::DestinationRecord;
use crate::store::DestinationStore;

/// How often a destination's backlog gauge is refreshed when no batch comes.
const BACKLOG_EVERY: Duration = Duration::from_secs(3);

/// Least time between two refreshes of a destination's backlog gauge.
const BACKLOG_MIN_GAP: Duration = Duration::from_millis(250);

/// How long the shared consumer's pull waits for messages before asking again.
const SHARED_EXPIRES: Duration = Duration::from_secs(5);

/// How long a failing pull of the shared consumer waits before trying again.
const SHARED_RETRY: Duration = Duration::from_millis(500);

/// The shared consumer of an unordered destination (`activator-<id>`, every partition), which
/// is also the name of the single consumer earlier versions gave every destination.
pub fn consumer_name(destination_id: &str) -> String {
    format!("activator-{destination_id}")
}

/// The consumer of one partition of an ordered destination: `activator-<id>-p<partition>`.
pub fn partition_consumer_name(destination_id: &str, partition: u32) -> String {
    partition_consumer(&consumer_name(destination_id), partition)
}

/// Every consumer a destination may have: the shared one, then one per partition.
pub(crate) fn consumer_names(destination_id: &str, partitions: u32) -> Vec<String> {
    std::iter::once(consumer_name(destination_id))
        .chain((0..partitions).map(|p| partition_consumer_name(destination_id, p)))
        .collect()
}

pub(crate) fn readiness_check(destination_id: &str) -> String {
    format!("destination {destination_id} consumer")
}

/// What a destination's loops share.
struct Work {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    topology: Topology,
    cfg: ActivatorConfig,
    dest: DestinationRecord,
    delivery: Arc<Delivery>,
    /// The stored records, read again before consumers are created or retired.
    store: DestinationStore,
    pinned: PinnedGroup,
    /// Woken after each batch, so the backlog gauge follows delivery.
    delivered: Notify,
}

impl Work {
    fn reader_config(&self, durable: String, filter_subject: String) -> ReaderConfig {
        ReaderConfig {
            stream: self.topology.processed_stream(),
            durable,
            filter_subject,
            ack_wait: Duration::from_secs(self.cfg.ack_wait_seconds),
            max_ack_pending: self.cfg.max_ack_pending,
            batch: self.cfg.batch_size,
            description: format!("Herald activator: destination {}", self.dest.id),
        }
    }

    fn partition_reader(&self, partition: u32) -> ReaderConfig {
        self.reader_config(
            partition_consumer_name(&self.dest.id, partition),
            self.topology.processed_subject(partition),
        )
    }

    fn shared_reader(&self) -> ReaderConfig {
        self.reader_config(
            consumer_name(&self.dest.id),
            self.topology.processed_wildcard(),
        )
    }

    fn keep_alive_every(&self) -> Duration {
        Duration::from_secs(self.cfg.ack_wait_seconds.max(3)) / 3
    }

    /// The consumers whose backlog this replica reports: the owned partitions' of an ordered
    /// destination, the shared one of an unordered destination on the owner of partition 0.
    fn reported_consumers(&self, assignment: &Assignment) -> Vec<String> {
        if self.dest.ordered {
            assignment
                .owned
                .iter()
                .map(|p| partition_consumer_name(&self.dest.id, *p))
                .collect()
        } else if assignment.owned.contains(&0) {
            vec![consumer_name(&self.dest.id)]
        } else {
            Vec::new()
        }
    }
}

/// Runs one destination on this replica until `cancel`: provisions its consumers (see the
/// module docs), then delivers from the partitions this replica owns (`view`, ordered) or from
/// the shared consumer (unordered), and keeps the destination's backlog gauge current (zero
/// once it stops).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    js: jetstream::Context,
    topology: Topology,
    cfg: ActivatorConfig,
    dest: DestinationRecord,
    delivery: Arc<Delivery>,
    store: DestinationStore,
    ready: Readiness,
    view: watch::Receiver<Assignment>,
    cancel: CancellationToken,
) {
    let Some(stream) = wait_for_stream(&js, &topology.processed_stream(), &cancel).await else {
        return;
    };
    // Nothing is sent before the person's current consent and the suppressions can be checked.
    if !delivery.gate.wait_loaded(&cancel).await {
        return;
    }
    let work = Arc::new(Work {
        js,
        stream,
        topology,
        pinned: PinnedGroup {
            group: PRIORITY_GROUP.into(),
            timeout: cfg.ownership.pin_timeout(),
        },
        cfg,
        dest,
        delivery,
        store,
        delivered: Notify::new(),
    });
    let check = readiness_check(&work.dest.id);
    ready.set(&check, false);
    let provisioned = retry_until("creating a destination's consumers", &cancel, || {
        provision(&work)
    })
    .await;
    // A stopped destination (paused, deleted, updated, or the service stopping) holds nothing
    // up; an updated one sets its check again as it provisions.
    ready.set(&check, true);
    if provisioned.is_none() {
        return;
    }
    tracing::info!(
        destination = %work.dest.id,
        kind = work.dest.kind.as_str(),
        ordered = work.dest.ordered,
        "delivering"
    );
    let backlog_stop = cancel.child_token();
    let backlog = tokio::spawn(report_backlog(
        work.clone(),
        view.clone(),
        backlog_stop.clone(),
    ));
    if work.dest.ordered {
        run_partitions(&work, view, &cancel).await;
    } else {
        run_shared(&work, &cancel).await;
    }
    backlog_stop.cancel();
    let _ = backlog.await;
    events::Backlog {
        destination: &work.dest.id,
        events: 0,
    }
    .emit();
}

/// One loop per owned partition, following ownership changes until `cancel`.
async fn run_partitions(
    work: &Arc<Work>,
    mut view: watch::Receiver<Assignment>,
    cancel: &CancellationToken,
) {
    let mut tasks = PartitionTasks::new();
    loop {
        let assignment = view.borrow_and_update().clone();
        let (acquired, released) = tasks.reconcile(&assignment.owned, |partition, token| {
            let span = tracing::info_span!("partition", destination = %work.dest.id, partition);
            tracing::Instrument::instrument(run_partition(work.clone(), partition, token), span)
        });
        if !acquired.is_empty() || !released.is_empty() {
            events::PartitionsChanged {
                destination: &work.dest.id,
                acquired: &acquired,
                released: &released,
                owned: assignment.owned.len(),
            }
            .emit();
            work.delivered.notify_one();
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = view.changed() => if changed.is_err() { break },
        }
    }
    tasks.stop_all().await;
}

/// Delivers one owned partition until `cancel` (the partition moved, or the destination
/// stopped), then releases it.
async fn run_partition(work: Arc<Work>, partition: u32, cancel: CancellationToken) {
    let reader_cfg = work.partition_reader(partition);
    let Some(mut reader) = retry_until("binding a partition consumer", &cancel, || async {
        // Created only by `provision`: a consumer deleted since (the destination was switched
        // to unordered on another replica) is not created again from the stream's start.
        work.stream
            .consumer_info(&reader_cfg.durable)
            .await
            .map_err(|e| format!("consumer {}: {e}", reader_cfg.durable))?;
        OrderedReader::bind_pinned(&work.js, reader_cfg.clone(), work.pinned.clone())
            .await
            .map_err(|e| e.to_string())
    })
    .await
    else {
        return;
    };
    let feeder = Feeder::start(&work, &cancel);
    while let Some(batch) = reader.next_batch(&cancel).await {
        if !feeder.deliver(batch, &cancel).await {
            break;
        }
    }
    feeder.finish().await;
    // Messages the reader holds and has not handed out go back at once (nak), so the next
    // owner gets them without waiting for the ack wait.
    reader.release().await;
}

/// Pulls the shared consumer of an unordered destination until `cancel`; every replica does.
async fn run_shared(work: &Arc<Work>, cancel: &CancellationToken) {
    let name = consumer_name(&work.dest.id);
    let Some(consumer) = retry_until("binding the shared consumer", cancel, || {
        work.stream.get_consumer::<PullConfig>(&name)
    })
    .await
    else {
        return;
    };
    let batch_size = work.cfg.batch_size.max(1);
    let feeder = Feeder::start(work, cancel);
    'pull: while !cancel.is_cancelled() {
        let Some(mut messages) = retry_until("pulling the shared consumer", cancel, || {
            consumer
                .stream()
                .max_messages_per_batch(batch_size)
                .expires(SHARED_EXPIRES)
                .messages()
        })
        .await
        else {
            break;
        };
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => {
                    give_back(&mut messages).await;
                    break 'pull;
                }
                m = messages.next() => m,
            };
            let first = match first {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(destination = %work.dest.id, error = %e, "pull of the shared consumer failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break 'pull,
                        _ = tokio::time::sleep(SHARED_RETRY) => continue 'pull,
                    }
                }
                None => continue 'pull,
            };
            let mut batch = vec![first];
            while batch.len() < batch_size {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    _ => break,
                }
            }
            if !feeder.deliver(batch, cancel).await {
                break 'pull;
            }
        }
    }
    feeder.finish().await;
}

/// Hands a loop's batches to the destination's [`Delivery`]: at `batch_max` 1 to one flow that
/// runs beside the loop ([`Delivery::deliver_flow`]: the loop keeps pulling while earlier
/// events are sent, and no batch waits for the previous one's slowest user); above 1 batch after
/// batch, in stream order. Either way each batch gets in-progress acks until its last event is
/// settled.
struct Feeder {
    work: Arc<Work>,
    keep_alive_every: Duration,
    /// At `batch_max` 1: where batches go, and the flow's task.
    flow: Option<(Batches, tokio::task::JoinHandle<()>)>,
}

/// The way into a flow: batches with their keep-alives.
type Batches = mpsc::Sender<(Vec<Message>, KeepAlive)>;

impl Feeder {
    fn start(work: &Arc<Work>, cancel: &CancellationToken) -> Self {
        let flow = (work.delivery.batch_max <= 1).then(|| {
            let (batches, from_loop) = mpsc::channel(1);
            let task = tokio::spawn({
                let (work, cancel) = (work.clone(), cancel.clone());
                async move {
                    let max_held = work.cfg.batch_size.max(1) * 2;
                    let settled = || work.delivered.notify_one();
                    work.delivery
                        .deliver_flow(from_loop, max_held, settled, &cancel)
                        .await;
                }
            });
            (batches, task)
        });
        Self {
            work: work.clone(),
            keep_alive_every: work.keep_alive_every(),
            flow,
        }
    }

    /// Delivers `batch`, or hands it to the flow (waiting while the flow holds its most);
    /// `false` once `cancel` fired or the flow ended.
    async fn deliver(&self, batch: Vec<Message>, cancel: &CancellationToken) -> bool {
        let alive = KeepAlive::start(batch.clone(), self.keep_alive_every);
        match &self.flow {
            Some((batches, _)) => batches.send((batch, alive)).await.is_ok(),
            None => {
                self.work.delivery.deliver_batch(batch, cancel).await;
                drop(alive);
                self.work.delivered.notify_one();
                !cancel.is_cancelled()
            }
        }
    }

    /// Waits until everything handed to the flow is settled, or abandoned on cancel.
    async fn finish(self) {
        if let Some((batches, task)) = self.flow {
            drop(batches);
            let _ = task.await;
        }
    }
}

/// Gives back (nak) the messages a stopping pull already received, so another replica gets
/// them without waiting for the ack wait.
async fn give_back(messages: &mut async_nats::jetstream::consumer::pull::Stream) {
    while let Some(Some(Ok(m))) = messages.next().now_or_never() {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
}

/// Refreshes the destination's backlog gauge every [`BACKLOG_EVERY`] and after batches (at
/// most every [`BACKLOG_MIN_GAP`]) until `cancel`.
async fn report_backlog(
    work: Arc<Work>,
    view: watch::Receiver<Assignment>,
    cancel: CancellationToken,
) {
    loop {
        let names = work.reported_consumers(&view.borrow());
        let mut total = 0;
        for name in names {
            if let Ok(info) = work.stream.consumer_info(&name).await {
                total += info.num_pending + info.num_ack_pending as u64;
            }
        }
        events::Backlog {
            destination: &work.dest.id,
            events: total,
        }
        .emit();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(BACKLOG_EVERY) => {}
            _ = work.delivered.notified() => {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(BACKLOG_MIN_GAP) => {}
                }
            }
        }
    }
}

/// Creates the destination's consumers for its mode (those that exist are left as they are)
/// and retires the other mode's (see the module docs).
async fn provision(work: &Work) -> Result<(), String> {
    // A replica that is behind (its watch has not shown it an update or delete that another
    // replica applied already) creates and retires nothing: it would undo the other's switch.
    match work.store.get(&work.dest.id).await {
        Ok(current) if current.ordered == work.dest.ordered => {}
        Ok(_) => return Err("the destination's ordered setting changed meanwhile".into()),
        Err(e) => return Err(e.to_string()),
    }
    let wanted: Vec<ReaderConfig> = if work.dest.ordered {
        (0..work.topology.partitions())
            .map(|p| work.partition_reader(p))
            .collect()
    } else {
        vec![work.shared_reader()]
    };
    // The other mode's consumers that still exist.
    let candidates: Vec<String> = if work.dest.ordered {
        vec![consumer_name(&work.dest.id)]
    } else {
        (0..work.topology.partitions())
            .map(|p| partition_consumer_name(&work.dest.id, p))
            .collect()
    };
    let mut old = Vec::new();
    for name in candidates {
        match work.stream.consumer_info(&name).await {
            Ok(info) => {
                // Only a consumer over every partition is the shared (or single) one.
                if !work.dest.ordered
                    || info.config.filter_subject == work.topology.processed_wildcard()
                {
                    old.push(info);
                }
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
            Err(e) => return Err(format!("consumer {name}: {e}")),
        }
    }
    let policy = match old.iter().map(|i| i.ack_floor.stream_sequence).min() {
        // Everything at or below the floor was acknowledged by the old consumers.
        Some(floor) => DeliverPolicy::ByStartSequence {
            start_sequence: floor + 1,
        },
        None => work.dest.deliver_policy(),
    };
    let pinned = work.dest.ordered.then_some(&work.pinned);
    for reader_cfg in &wanted {
        create_consumer(&work.stream, reader_cfg, policy, pinned).await?;
    }
    for info in old {
        let deleted = work.stream.delete_consumer(&info.name).await;
        // Another replica may have deleted it first.
        let error = match &deleted {
            Err(e) if !is_consumer_not_found(e) => Some(e as &dyn std::fmt::Display),
            _ => None,
        };
        events::OldConsumerRetired {
            destination: &work.dest.id,
            consumer: &info.name,
            resumed_after: info.ack_floor.stream_sequence,
            error,
        }
        .emit();
    }
    Ok(())
}

/// Whether a consumer delete failed only because the consumer is already gone.
pub(crate) fn is_consumer_not_found(e: &jetstream::stream::ConsumerError) -> bool {
    matches!(
        e.kind(),
        jetstream::stream::ConsumerErrorKind::JetStream(ref j)
            if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
    )
}

/// Creates a consumer when it does not exist yet, starting at `policy`. An existing one (a
/// restart, an update, another replica's) is left where it is: nothing it acknowledged is
/// skipped or sent again.
async fn create_consumer(
    stream: &jetstream::stream::Stream,
    reader_cfg: &ReaderConfig,
    policy: DeliverPolicy,
    pinned: Option<&PinnedGroup>,
) -> Result<(), String> {
    if stream
        .get_consumer::<PullConfig>(&reader_cfg.durable)
        .await
        .is_ok()
    {
        return Ok(());
    }
    let mut config = PullConfig {
        durable_name: Some(reader_cfg.durable.clone()),
        description: Some(reader_cfg.description.clone()),
        deliver_policy: policy,
        ack_policy: AckPolicy::Explicit,
        ack_wait: reader_cfg.ack_wait,
        max_ack_pending: reader_cfg.max_ack_pending,
        filter_subject: reader_cfg.filter_subject.clone(),
        ..Default::default()
    };
    if let Some(p) = pinned {
        config.priority_policy = PriorityPolicy::PinnedClient;
        config.priority_groups = vec![p.group.clone()];
        config.priority_timeout = p.timeout;
    }
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
        Err(e) => Err(format!("consumer {}: {e}", reader_cfg.durable)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_the_shared_one_then_one_per_partition() {
        assert_eq!(
            consumer_names("hook", 3),
            [
                "activator-hook",
                "activator-hook-p0",
                "activator-hook-p1",
                "activator-hook-p2"
            ]
        );
    }
}
