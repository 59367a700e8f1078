//! The processing loop: ordered batches in, processed events out, inputs acked after outputs.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, Message};
use futures_util::StreamExt as _;
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::nats::{ensure_stream, retry_until, wait_for_stream};
use herald_common::ordered::{OrderedReader, PinnedGroup, ReaderConfig, ensure_consumer};
use herald_common::ownership::{Ownership, PRIORITY_GROUP, PartitionTasks, partition_consumer};
use herald_common::retry::{KeepAlive, Retry};
use herald_proto::v1::Event;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::group::KeyEvents;
use crate::output::{Output, publish_all};
use crate::partitions::{OwnedPartition, Partitions};
use crate::resolver::{Outcome, Profiles};
use crate::{ProcessorConfig, Stats, events};

/// Processes the events of one partition key of a batch through the profile store (see
/// [`Profiles::process_group`]): identity resolution, profile update, consent. Store errors
/// are retried with backoff until `cancel` fires (`None`); what a failed attempt wrote is not
/// done again.
pub(crate) async fn process_key(
    profiles: &Profiles,
    events: Vec<Event>,
    max_backoff: Duration,
    cancel: &CancellationToken,
) -> Option<Vec<Outcome>> {
    // The group goes into each attempt and comes back with an error.
    let slot = &Mutex::new(Some(KeyEvents::new(events).publish_early()));
    Retry::new(max_backoff)
        .run(
            cancel,
            move || async move {
                let mut group = take(slot).expect("every failed attempt gives the group back");
                match profiles.process_group(&mut group).await {
                    Ok(()) => Ok(group.into_outcomes()),
                    Err(e) => {
                        *lock(slot) = Some(group);
                        Err(e)
                    }
                }
            },
            |f| {
                events::ProfileRetried {
                    attempt: f.attempt,
                    kind: f.error.kind(),
                    error: f.error,
                }
                .emit()
            },
        )
        .await
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    lock(slot).take()
}

/// The role processor replicas join in the members bucket.
const ROLE: &str = "processor";

/// What every partition task shares.
struct PartitionWork {
    js: jetstream::Context,
    topology: Topology,
    profiles: Arc<Profiles>,
    stats: Arc<Stats>,
    partitions: Arc<Partitions>,
    pinned: PinnedGroup,
    durable: String,
    ack_wait: Duration,
    max_ack_pending: i64,
    batch: usize,
    concurrency: usize,
    keep_alive_every: Duration,
    max_backoff: Duration,
}

impl PartitionWork {
    fn reader_config(&self, partition: u32) -> ReaderConfig {
        ReaderConfig {
            stream: self.topology.events_stream(),
            durable: partition_consumer(&self.durable, partition),
            filter_subject: self.topology.events_subject(partition),
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            batch: self.batch,
            description: format!("Herald processor: events partition {partition}"),
        }
    }
}

/// Provisions the processed stream and every partition's consumer, joins the processor
/// replicas, and runs one task per owned partition as ownership changes, until `cancel`. Then
/// hands its partitions over: it leaves the member list first, so the other replicas start
/// pulling at once, then stops each partition (the batch in hand is finished, the rest given
/// back, the pin released).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    js: jetstream::Context,
    topology: Topology,
    cfg: ProcessorConfig,
    ready: Readiness,
    stats: Arc<Stats>,
    partitions: Arc<Partitions>,
    profiles: Arc<Profiles>,
    cancel: CancellationToken,
) {
    let provisioned = retry_until("creating the processed stream", &cancel, || {
        ensure_stream(&js, topology.processed_stream_config())
    })
    .await;
    if provisioned.is_none() {
        return;
    }
    ready.set("processed stream", true);
    if wait_for_stream(&js, &topology.events_stream(), &cancel)
        .await
        .is_none()
    {
        return;
    }
    let work = Arc::new(PartitionWork {
        js: js.clone(),
        topology: topology.clone(),
        profiles,
        stats,
        partitions: partitions.clone(),
        pinned: PinnedGroup {
            group: PRIORITY_GROUP.into(),
            timeout: cfg.ownership.pin_timeout(),
        },
        durable: cfg.durable.clone(),
        ack_wait: Duration::from_secs(cfg.ack_wait_seconds),
        max_ack_pending: cfg.max_ack_pending,
        batch: cfg.batch_size,
        concurrency: cfg.concurrency,
        keep_alive_every: Duration::from_secs(cfg.ack_wait_seconds.max(3)) / 3,
        max_backoff: Duration::from_millis(cfg.retry_max_backoff_ms),
    });
    // Every partition's consumer exists whether a replica owns the partition or not: the events
    // stream (interest retention) keeps only what some consumer still has to read.
    for partition in 0..topology.partitions() {
        let reader_cfg = work.reader_config(partition);
        let created = retry_until("creating the partition consumers", &cancel, || {
            ensure_consumer(&js, &reader_cfg, Some(&work.pinned))
        })
        .await;
        if created.is_none() {
            return;
        }
    }
    retire_single_consumer(&js, &topology, &cfg.durable).await;
    let Some(ownership) = retry_until("joining the processor replicas", &cancel, || {
        Ownership::join(&js, &topology, ROLE, topology.partitions(), &cfg.ownership)
    })
    .await
    else {
        return;
    };
    ready.set("events consumer", true);
    tracing::info!(member = %ownership.member_id(), consumer = %cfg.durable, "processor consuming its partitions");

    let mut view = ownership.subscribe();
    let mut tasks = PartitionTasks::new();
    loop {
        let assignment = view.borrow_and_update().clone();
        partitions.set_view(ownership.member_id(), &assignment.members);
        let (acquired, released) = tasks.reconcile(&assignment.owned, |partition, token| {
            let span = tracing::info_span!("partition", member = %ownership.member_id(), partition);
            tracing::Instrument::instrument(run_partition(work.clone(), partition, token), span)
        });
        events::OwnershipChanged {
            acquired: &acquired,
            released: &released,
            owned: assignment.owned.len(),
        }
        .emit();
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = view.changed() => if changed.is_err() { break },
        }
    }
    let released: Vec<u32> = tasks.running().into_iter().collect();
    ownership.leave().await;
    tasks.stop_all().await;
    events::OwnershipChanged {
        acquired: &[],
        released: &released,
        owned: 0,
    }
    .emit();
    ready.set("events consumer", false);
}

/// Processes one owned partition until `cancel` (the partition moved, or shutdown), then
/// releases it.
async fn run_partition(work: Arc<PartitionWork>, partition: u32, cancel: CancellationToken) {
    let reader_cfg = work.reader_config(partition);
    let Some(mut reader) = retry_until("binding a partition consumer", &cancel, || {
        OrderedReader::bind_pinned(&work.js, reader_cfg.clone(), work.pinned.clone())
    })
    .await
    else {
        return;
    };
    work.partitions.insert(
        partition,
        OwnedPartition {
            consumer: reader.consumer().clone(),
            reader: reader.status_handle(),
        },
    );
    while let Some(batch) = reader.next_batch(&cancel).await {
        let started = Instant::now();
        let n = batch.len();
        if !handle_batch(&work, batch, &cancel).await {
            break;
        }
        work.stats.processed.fetch_add(n as u64, Ordering::Relaxed);
        events::BatchDone {
            seconds: started.elapsed().as_secs_f64(),
        }
        .emit();
        events::PartitionLag {
            partition,
            lag: reader.status().lag,
        }
        .emit();
    }
    work.partitions.remove(partition);
    reader.release().await;
    events::PartitionLag { partition, lag: 0 }.emit();
}

/// Deletes the single consumer over every partition (`<durable>`, filter `<prefix>.events.*`)
/// that processors used before partition ownership: under interest retention it would keep
/// every event forever. The partition consumers exist by now and read what it left.
async fn retire_single_consumer(js: &jetstream::Context, topology: &Topology, durable: &str) {
    let Ok(stream) = js.get_stream(topology.events_stream()).await else {
        return;
    };
    let Ok(info) = stream.consumer_info(durable).await else {
        return;
    };
    if info.config.filter_subject != topology.events_wildcard() {
        return;
    }
    let deleted = stream.delete_consumer(durable).await;
    events::OldConsumerRetired {
        consumer: durable,
        error: deleted.as_ref().err().map(|e| e as &dyn std::fmt::Display),
    }
    .emit();
}

/// Processes one batch. Events of different partition keys are resolved concurrently (at most
/// `concurrency` keys at once, see [`per_key`]), each key's events together, in order (see
/// [`process_key`]). A known person's run that changes no consent is published while its
/// profile is written ([`KeyEvents::publish_early`]); the other outputs are published in input
/// order after every profile write of the batch (a key's order holds either way), and the
/// inputs acked after every PubAck. Returns false when cancelled before its outputs were
/// stored (the inputs then stay unacked and are redelivered).
async fn handle_batch(
    work: &PartitionWork,
    batch: Vec<Message>,
    cancel: &CancellationToken,
) -> bool {
    let PartitionWork {
        js,
        topology,
        profiles,
        concurrency,
        keep_alive_every,
        max_backoff,
        ..
    } = work;
    let (concurrency, keep_alive_every, max_backoff) =
        (*concurrency, *keep_alive_every, *max_backoff);
    let mut inputs = Vec::with_capacity(batch.len());
    let mut groups: Vec<Vec<(usize, Event)>> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    for msg in batch {
        match Event::decode(msg.payload.as_ref()) {
            Ok(event) => {
                let key = if event.partition_key.is_empty() {
                    event.id.clone()
                } else {
                    event.partition_key.clone()
                };
                let g = *group_of.entry(key).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[g].push((inputs.len(), event));
                inputs.push(msg);
            }
            Err(e) => {
                events::Undecodable {
                    subject: &msg.subject,
                    error: &e,
                }
                .emit();
                let _ = msg.ack_with(AckKind::Term).await;
            }
        }
    }
    // Each key's events go to the store together: one profile write for those that change
    // nothing but the profile.
    let keys = groups.len();
    let groups = groups
        .into_iter()
        .enumerate()
        .map(|(k, group)| vec![(k, group)])
        .collect();
    let resolved = per_key(groups, keys, concurrency, |group: Vec<(usize, Event)>| {
        let (indexes, events): (Vec<usize>, Vec<Event>) = group.into_iter().unzip();
        async move {
            let outcomes = process_key(profiles, events, max_backoff, cancel).await?;
            Some(indexes.into_iter().zip(outcomes).collect::<Vec<_>>())
        }
    });
    tokio::pin!(resolved);
    // Resolution normally takes milliseconds; if it waits on KV, keep the inputs alive.
    let mut keep_alive = None;
    let resolved = tokio::select! {
        r = &mut resolved => r,
        _ = tokio::time::sleep(keep_alive_every) => {
            keep_alive = Some(KeepAlive::start(inputs.clone(), keep_alive_every));
            resolved.await
        }
    };
    let Some(resolved) = resolved else {
        return false;
    };
    let mut outcomes: Vec<Option<Outcome>> = (0..inputs.len()).map(|_| None).collect();
    for (i, outcome) in resolved.into_iter().flatten().flatten() {
        outcomes[i] = Some(outcome);
    }
    let mut outputs = Vec::with_capacity(inputs.len());
    for outcome in outcomes.into_iter().flatten() {
        // `Published`: out already, with its profile write.
        if let Outcome::Publish(list) = outcome {
            outputs.extend(list.iter().map(|p| Output::of(topology, p)));
        }
    }
    // Kept alive from the first failure, unless the resolution's keep-alive still runs.
    let mut retry = Retry::new(max_backoff);
    if keep_alive.is_none() {
        retry = retry.keep_alive(&inputs[..], keep_alive_every);
    }
    let published = retry
        .run(
            cancel,
            || publish_all(js, &outputs),
            |f| {
                events::PublishFailed {
                    attempt: f.attempt,
                    error: f.error,
                }
                .emit()
            },
        )
        .await;
    if published.is_none() {
        return false;
    }
    drop(keep_alive);
    for msg in &inputs {
        if let Err(e) = msg.ack().await {
            events::AckFailed { error: &e }.emit();
        }
    }
    true
}

/// Runs `f` over the items of every key (`groups`: one list of `(input index, item)` per key),
/// each key's items one after another, in order, and at most `concurrency` keys at once (0 is
/// taken as 1): every item waiting on KV holds its future's state, a few KiB for an event. (The
/// worker gives each key one item: all of the key's events.)
/// Returns the results by input index (`len` slots; `None` where no item had that index), or
/// `None` when `f` gave up on an item (it was cancelled); the other keys still run to their end,
/// as they would have without the cancelled one.
async fn per_key<T, R, F, Fut>(
    groups: Vec<Vec<(usize, T)>>,
    len: usize,
    concurrency: usize,
    f: F,
) -> Option<Vec<Option<R>>>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Option<R>>,
{
    let f = &f;
    let mut keys = futures_util::stream::iter(groups.into_iter().map(|group| async move {
        let mut done = Vec::with_capacity(group.len());
        for (i, item) in group {
            done.push((i, f(item).await?));
        }
        Some(done)
    }))
    .buffer_unordered(concurrency.max(1));
    let mut out: Vec<Option<R>> = (0..len).map(|_| None).collect();
    let mut gave_up = false;
    while let Some(done) = keys.next().await {
        match done {
            Some(done) => {
                for (i, r) in done {
                    out[i] = Some(r);
                }
            }
            None => gave_up = true,
        }
    }
    (!gave_up).then_some(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// 10 keys of 3 items each, numbered by input index as a batch would be (interleaved).
    fn groups() -> Vec<Vec<(usize, (usize, usize))>> {
        (0..10)
            .map(|key| (0..3).map(|n| (n * 10 + key, (key, n))).collect())
            .collect()
    }

    #[tokio::test]
    async fn per_key_runs_at_most_concurrency_keys_at_once_each_in_order() {
        let (running, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let seen: Mutex<Vec<(usize, usize)>> = Mutex::default();
        let out = per_key(groups(), 30, 3, |(key, n)| {
            let (running, peak, seen) = (&running, &peak, &seen);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                seen.lock().unwrap().push((key, n));
                running.fetch_sub(1, Ordering::SeqCst);
                Some(key * 100 + n)
            }
        })
        .await
        .expect("nothing gave up");
        assert_eq!(
            peak.load(Ordering::SeqCst),
            3,
            "at most 3 keys at once, and 3 used"
        );
        // Results land at their input index.
        for (i, r) in out.iter().enumerate() {
            assert_eq!(*r, Some((i % 10) * 100 + i / 10), "index {i}");
        }
        // Each key's items ran one after another, in order.
        let seen = seen.into_inner().unwrap();
        for key in 0..10 {
            let order: Vec<usize> = seen
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(order, [0, 1, 2], "key {key}");
        }
    }

    #[tokio::test]
    async fn per_key_gives_up_when_an_item_does_but_finishes_the_other_keys() {
        let finished = AtomicUsize::new(0);
        let out = per_key(groups(), 30, 4, |(key, n)| {
            let finished = &finished;
            async move {
                if key == 2 && n == 1 {
                    return None;
                }
                finished.fetch_add(1, Ordering::SeqCst);
                Some(())
            }
        })
        .await;
        assert!(out.is_none());
        // Key 2 stops at its second item; the 9 other keys run all 3.
        assert_eq!(finished.load(Ordering::SeqCst), 9 * 3 + 1);
    }

    #[tokio::test]
    async fn per_key_leaves_unused_indexes_empty_and_takes_0_as_1() {
        let out = per_key(vec![vec![(1, 7)]], 3, 0, |x| async move { Some(x) })
            .await
            .expect("nothing gave up");
        assert_eq!(out, [None, Some(7), None]);
    }
}
