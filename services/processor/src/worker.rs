//! The processing loop: ordered batches in, processed events out, inputs acked after outputs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, Message};
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::flow::{FlowLimits, Take, keyed_flow};
use herald_common::nats::{ensure_stream, retry_until, wait_for_stream};
use herald_common::ordered::{OrderedReader, PinnedGroup, ReaderConfig, ensure_consumer};
use herald_common::ownership::{Ownership, PRIORITY_GROUP, PartitionTasks, partition_consumer};
use herald_common::retry::{KeepAlive, Retry};
use herald_proto::v1::Event;
use prost::Message as _;
use tokio::sync::mpsc;
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
/// releases it. The reader's batches feed one flow ([`process_flow`]) that runs beside the
/// loop, so the loop keeps reading while earlier events are processed.
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
    let (batches, from_reader) = mpsc::channel(1);
    let flow = tokio::spawn({
        let (work, cancel) = (work.clone(), cancel.clone());
        async move { process_flow(&work, from_reader, &cancel).await }
    });
    while let Some(batch) = reader.next_batch(&cancel).await {
        // Kept alive from here, so a batch waiting for the flow is kept alive too.
        let alive = KeepAlive::start(batch.clone(), work.keep_alive_every);
        if batches.send((batch, alive, Instant::now())).await.is_err() {
            break;
        }
        events::PartitionLag {
            partition,
            lag: reader.status().lag,
        }
        .emit();
    }
    drop(batches);
    let _ = flow.await;
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

/// A batch handed to the flow: its messages, their keep-alive, and when it was read.
type Batch = (Vec<Message>, KeepAlive, Instant);

/// Processes a partition's batches until the reader stops handing them in (then until what
/// was handed in is done) or `cancel` fires: events of different partition keys concurrently
/// (at most `concurrency` keys at once), each key's events in order, every event of a key
/// waiting when its turn comes together (see [`process_key`]), with no barrier between batches
/// (see [`keyed_flow`]). Each key's outputs are published as soon as its profile writes are
/// done, and its inputs acked after their PubAcks. What was never started when `cancel` fired
/// is given back at once (nak), so the partition's next owner gets it without waiting.
async fn process_flow(
    work: &PartitionWork,
    batches: mpsc::Receiver<Batch>,
    cancel: &CancellationToken,
) {
    let limits = FlowLimits {
        slots: work.concurrency,
        max_held: work.batch.max(1) * 2,
        take: Take::All,
    };
    let left = keyed_flow(
        batches,
        limits,
        admit,
        |_key, inputs| process_inputs(work, inputs, cancel),
        |n| {
            work.stats.processed.fetch_add(n as u64, Ordering::Relaxed);
        },
        cancel,
    )
    .await;
    for input in left {
        let _ = input.msg.ack_with(AckKind::Nak(None)).await;
    }
}

/// One event on its way through the flow.
struct Input {
    msg: Message,
    event: Event,
    batch: Arc<InFlight>,
}

/// A batch in the flow. Its keep-alive runs until the last of its events is done (or given
/// up); a batch whose every event was acked records its duration, from read to last ack.
struct InFlight {
    _alive: KeepAlive,
    read_at: Instant,
    events: usize,
    acked: AtomicUsize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if *self.acked.get_mut() == self.events {
            events::BatchDone {
                seconds: self.read_at.elapsed().as_secs_f64(),
            }
            .emit();
        }
    }
}

/// Decodes a batch into `(partition key, input)` pairs, in stream order (an event with no
/// partition key is its own key). A message that does not decode is terminated.
async fn admit((batch, alive, read_at): Batch) -> Vec<(String, Input)> {
    let mut decoded = Vec::with_capacity(batch.len());
    for msg in batch {
        match Event::decode(msg.payload.as_ref()) {
            Ok(event) => decoded.push((msg, event)),
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
    let batch = Arc::new(InFlight {
        _alive: alive,
        read_at,
        events: decoded.len(),
        acked: AtomicUsize::new(0),
    });
    decoded
        .into_iter()
        .map(|(msg, event)| {
            let key = if event.partition_key.is_empty() {
                event.id.clone()
            } else {
                event.partition_key.clone()
            };
            let batch = batch.clone();
            (key, Input { msg, event, batch })
        })
        .collect()
}

/// Processes one key's events (in order, together: [`process_key`]), publishes their outputs
/// pipelined, in input order, and acks the inputs after every PubAck. Returns false when
/// cancelled before the outputs were stored (the inputs then stay unacked and are
/// redelivered).
async fn process_inputs(
    work: &PartitionWork,
    inputs: Vec<Input>,
    cancel: &CancellationToken,
) -> bool {
    let (held, events): (Vec<(Message, Arc<InFlight>)>, Vec<Event>) = inputs
        .into_iter()
        .map(|i| ((i.msg, i.batch), i.event))
        .unzip();
    let Some(outcomes) = process_key(&work.profiles, events, work.max_backoff, cancel).await else {
        return false;
    };
    let mut outputs = Vec::with_capacity(held.len());
    for outcome in outcomes {
        // `Published`: out already, with its profile write.
        if let Outcome::Publish(list) = outcome {
            outputs.extend(list.iter().map(|p| Output::of(&work.topology, p)));
        }
    }
    let published = Retry::new(work.max_backoff)
        .run(
            cancel,
            || publish_all(&work.js, &outputs),
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
    for (msg, batch) in &held {
        if let Err(e) = msg.ack().await {
            events::AckFailed { error: &e }.emit();
        }
        batch.acked.fetch_add(1, Ordering::Relaxed);
    }
    true
}
