//! Replay (`herald.v1.ReplayService`): re-sends the processed events of a time window to one
//! destination.
//!
//! A replay reads the processed stream through its own ephemeral consumer, which starts at the
//! window's `from` (deliver by start time) and stops at the first event stored at or after
//! `to`, or at the stream's last sequence when the replay started, whichever comes first: events
//! stored meanwhile are live delivery's business. Each batch goes through a [`Delivery`] built
//! for the destination exactly as live delivery builds it ([`Delivery::build`]): the
//! destination's filter, its consent gate and the suppression check apply, an erasure already
//! sent to it is not sent again, and no other destination gets anything. Per-user order holds
//! within the replay; a replay does not wait for the destination's live delivery, so the two
//! interleave. Progress is streamed after each batch.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use herald_common::Topology;
use herald_proto::v1 as pb;
use herald_proto::v1::replay_service_server::{ReplayService, ReplayServiceServer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::config::ActivatorConfig;
use crate::deliver::{Delivery, DeliveryDeps, DestinationStats};
use crate::events;
use crate::store::{DestinationError, DestinationStore};

/// How long a replay waits for the consent and the suppression list to be loaded.
const LOADED_WAIT: Duration = Duration::from_secs(10);

/// How long one pull waits for messages.
const PULL_WAIT: Duration = Duration::from_millis(500);

/// How long the server keeps a replay's consumer after its client went away.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(60);

/// Implements `ReplayService`.
#[derive(Clone)]
pub(crate) struct ReplayGrpc {
    pub store: DestinationStore,
    pub deps: DeliveryDeps,
    pub topology: Topology,
    pub cfg: ActivatorConfig,
    /// Fires at shutdown: running replays stop.
    pub stop: CancellationToken,
}

impl ReplayGrpc {
    pub fn into_server(self) -> ReplayServiceServer<Self> {
        ReplayServiceServer::new(self)
    }
}

/// The stream of replay progress messages.
pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::ReplayProgress, Status>> + Send>>;

fn time(t: Option<prost_types::Timestamp>, what: &str) -> Result<DateTime<Utc>, Status> {
    t.as_ref()
        .and_then(herald_proto::time::from_proto)
        .ok_or_else(|| Status::invalid_argument(format!("the request needs a `{what}` time")))
}

fn nanos(t: DateTime<Utc>) -> i128 {
    i128::from(t.timestamp_nanos_opt().unwrap_or_default())
}

#[tonic::async_trait]
impl ReplayService for ReplayGrpc {
    type ReplayStream = ProgressStream;

    async fn replay(
        &self,
        request: Request<pb::ReplayRequest>,
    ) -> Result<Response<Self::ReplayStream>, Status> {
        let req = request.into_inner();
        let from = time(req.from, "from")?;
        let to = time(req.to, "to")?;
        if from >= to {
            return Err(Status::invalid_argument(format!(
                "the window is empty: from ({from}) must be before to ({to})"
            )));
        }
        let record = self.store.get(&req.destination_id).await.map_err(|e| {
            let message = e.to_string();
            match e {
                DestinationError::NotFound(_) => Status::not_found(message),
                DestinationError::Unavailable(_) => Status::unavailable(message),
                _ => Status::failed_precondition(message),
            }
        })?;
        let stats = Arc::new(DestinationStats::default());
        let delivery = Delivery::build(&record, &self.deps, stats.clone())
            .await
            .map_err(Status::failed_precondition)?;
        let loaded = tokio::time::timeout(LOADED_WAIT, delivery.gate.wait_loaded(&self.stop)).await;
        if !matches!(loaded, Ok(true)) {
            return Err(Status::unavailable(
                "the activator has not loaded the consent and suppression lists yet (see its /readyz); retry shortly",
            ));
        }
        let js = &self.deps.js;
        let mut stream = js
            .get_stream(self.topology.processed_stream())
            .await
            .map_err(|e| Status::unavailable(format!("processed stream: {e}")))?;
        let end = stream
            .info()
            .await
            .map_err(|e| Status::unavailable(format!("processed stream info: {e}")))?
            .state
            .last_sequence;
        let start_time = async_nats::datetime::from_nanos(nanos(from))
            .map_err(|e| Status::invalid_argument(format!("from: {e}")))?;
        let consumer = stream
            .create_consumer(pull::Config {
                description: Some(format!("Herald activator: replay to {}", record.id)),
                deliver_policy: DeliverPolicy::ByStartTime { start_time },
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(self.cfg.ack_wait_seconds),
                max_ack_pending: self.cfg.max_ack_pending,
                filter_subject: self.topology.processed_wildcard(),
                inactive_threshold: INACTIVE_THRESHOLD,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                Status::unavailable(format!("cannot create the replay's consumer: {e}"))
            })?;
        events::ReplayStarted {
            destination: &record.id,
            from,
            to,
            end_sequence: end,
        }
        .emit();
        let (tx, rx) = mpsc::channel(16);
        let run = Run {
            destination: record.id.clone(),
            delivery,
            stats,
            consumer,
            stream,
            batch: self.cfg.batch_size.max(1),
            to: nanos(to),
            end,
            cancel: self.stop.child_token(),
        };
        tokio::spawn(run.run(tx));
        let out = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// One running replay.
struct Run {
    destination: String,
    delivery: Delivery,
    stats: Arc<DestinationStats>,
    consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
    stream: async_nats::jetstream::stream::Stream,
    batch: usize,
    /// The window's end, unix nanoseconds (exclusive).
    to: i128,
    /// The last stream sequence it reads.
    end: u64,
    cancel: CancellationToken,
}

type Progress = mpsc::Sender<Result<pb::ReplayProgress, Status>>;

impl Run {
    async fn run(self, tx: Progress) {
        let mut progress = pb::ReplayProgress {
            end_sequence: self.end,
            ..Default::default()
        };
        let result = self.read(&tx, &mut progress).await;
        let name = self.consumer.cached_info().name.clone();
        let _ = self.stream.delete_consumer(&name).await;
        let outcome = match &result {
            Ok(()) => "completed",
            Err(_) if self.cancel.is_cancelled() => "cancelled",
            Err(_) => "failed",
        };
        events::ReplayFinished {
            destination: &self.destination,
            result: outcome,
            read: progress.read,
            sent: progress.sent,
            error: result.as_ref().err().map(String::as_str),
        }
        .emit();
        match result {
            Ok(()) => {
                progress.done = true;
                let _ = tx.send(Ok(progress)).await;
            }
            Err(e) => {
                let _ = tx.send(Err(Status::aborted(e))).await;
            }
        }
    }

    /// Reads and delivers the window, sending progress after each batch.
    async fn read(&self, tx: &Progress, progress: &mut pb::ReplayProgress) -> Result<(), String> {
        if self.end == 0 {
            return Ok(());
        }
        let mut consumer = self.consumer.clone();
        loop {
            if self.cancel.is_cancelled() {
                return Err("the activator is stopping".into());
            }
            let mut messages = consumer
                .batch()
                .max_messages(self.batch)
                .expires(PULL_WAIT)
                .messages()
                .await
                .map_err(|e| e.to_string())?;
            let mut batch = Vec::new();
            let mut over = false;
            while let Some(msg) = messages.next().await {
                let msg = msg.map_err(|e| e.to_string())?;
                let info = msg.info().map_err(|e| e.to_string())?;
                let (sequence, published) =
                    (info.stream_sequence, info.published.unix_timestamp_nanos());
                if sequence > self.end || published >= self.to {
                    over = true;
                    break;
                }
                progress.sequence = sequence;
                batch.push(msg);
                if sequence == self.end {
                    over = true;
                    break;
                }
            }
            if !batch.is_empty() {
                progress.read += batch.len() as u64;
                self.delivery.deliver_batch(batch, &self.cancel).await;
                if self.cancel.is_cancelled() {
                    return Err("the activator is stopping".into());
                }
                progress.sent = self.stats.delivered.load(Ordering::Relaxed);
                progress.skipped = progress.read - progress.sent.min(progress.read);
                if tx.send(Ok(*progress)).await.is_err() {
                    // The client went away: stop.
                    return Err("the client went away".into());
                }
            } else if !over {
                // Nothing came: done once the consumer has nothing left to deliver.
                let info = consumer.info().await.map_err(|e| e.to_string())?;
                if info.num_pending == 0 && info.num_ack_pending == 0 {
                    over = true;
                }
            }
            if over {
                return Ok(());
            }
        }
    }
}
