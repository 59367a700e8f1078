//! An ordered reader over a durable pull consumer, shared by the processor and the activator.
//!
//! JetStream redelivers unacknowledged messages only after their ack wait, while new messages
//! flow at once. After a crash, a restarted reader would therefore see a key's newer messages
//! before its older, abandoned ones, and the abandoned ones in the order their ack waits expire.
//! [`OrderedReader`] closes that gap: when it binds, it reads the consumer's delivered sequence
//! and pending count; every message is held (kept alive with in-progress acks) until every
//! abandoned message has come back (or nothing is pending outside this reader), then all are
//! released in stream order. While running, a copy of a message the reader already holds or
//! handled (its ack wait expired meanwhile) is dropped, so a slow batch never reorders a key.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{Config as PullConfig, Stream as MessageStream};
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy};
use async_nats::jetstream::{self, AckKind, Message};
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

/// How often a closed gate is checked against the consumer's state.
const GATE_CHECK: Duration = Duration::from_millis(500);

/// How a durable consumer is set up.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// Stream to read.
    pub stream: String,
    /// Durable consumer name.
    pub durable: String,
    /// Subject filter.
    pub filter_subject: String,
    /// Ack wait: how long an abandoned message waits before redelivery.
    pub ack_wait: Duration,
    /// Most messages delivered and not yet acked.
    pub max_ack_pending: i64,
    /// Most messages handed out in one batch.
    pub batch: usize,
    /// Description stored on the consumer.
    pub description: String,
}

/// Errors of the reader.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// The consumer could not be created or read.
    #[error("consumer {durable} on {stream}: {message}")]
    Consumer {
        /// Stream.
        stream: String,
        /// Durable name.
        durable: String,
        /// What failed.
        message: String,
    },
}

struct Gate {
    /// The highest stream sequence delivered before this reader bound.
    delivered: u64,
    /// Abandoned messages not yet seen again.
    remaining: usize,
    /// Stream sequences of abandoned messages already seen again (to drop further copies).
    seen: std::collections::HashSet<u64>,
    /// When the gate was last checked against the consumer's state.
    last_check: std::time::Instant,
    /// Messages held back until the gate opens, by stream sequence: abandoned ones as they come
    /// back, and newer ones.
    held: BTreeMap<u64, Message>,
}

/// Reads a durable pull consumer in order; see the module docs.
pub struct OrderedReader {
    cfg: ReaderConfig,
    consumer: Consumer<PullConfig>,
    messages: Option<MessageStream>,
    gate: Option<Gate>,
    ready: Vec<Message>,
    /// The highest stream sequence admitted past the bind-time delivered sequence. JetStream
    /// delivers new messages in sequence order, so a message at or below it is a redelivery of
    /// one this reader already holds or handled (its ack wait expired meanwhile): a duplicate.
    max_seen: u64,
    /// The consumer's delivered stream sequence when this reader bound.
    bound_at: u64,
    /// Duplicate copies dropped (see `max_seen`).
    duplicates: u64,
}

impl OrderedReader {
    /// Creates (or updates) the durable consumer and binds to it.
    pub async fn bind(js: &jetstream::Context, cfg: ReaderConfig) -> Result<Self, ReaderError> {
        let err = |message: String| ReaderError::Consumer {
            stream: cfg.stream.clone(),
            durable: cfg.durable.clone(),
            message,
        };
        let stream = js
            .get_stream(&cfg.stream)
            .await
            .map_err(|e| err(e.to_string()))?;
        let config = PullConfig {
            durable_name: Some(cfg.durable.clone()),
            description: Some(cfg.description.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: cfg.ack_wait,
            max_ack_pending: cfg.max_ack_pending,
            filter_subject: cfg.filter_subject.clone(),
            ..Default::default()
        };
        let consumer = match stream.get_consumer::<PullConfig>(&cfg.durable).await {
            Ok(_) => js
                .update_consumer_on_stream(config, &cfg.stream)
                .await
                .map_err(|e| err(e.to_string()))?,
            Err(_) => stream
                .create_consumer(config)
                .await
                .map_err(|e| err(e.to_string()))?,
        };
        let mut consumer = consumer;
        let info = consumer
            .info()
            .await
            .map_err(|e| err(e.to_string()))?
            .clone();
        let gate = (info.num_ack_pending > 0).then(|| {
            tracing::info!(
                consumer = %cfg.durable,
                pending = info.num_ack_pending,
                delivered = info.delivered.stream_sequence,
                "holding newer messages until abandoned ones are redelivered"
            );
            Gate {
                delivered: info.delivered.stream_sequence,
                remaining: info.num_ack_pending,
                seen: Default::default(),
                last_check: std::time::Instant::now(),
                held: BTreeMap::new(),
            }
        });
        Ok(Self {
            cfg,
            consumer,
            messages: None,
            gate,
            ready: Vec::new(),
            max_seen: info.delivered.stream_sequence,
            bound_at: info.delivered.stream_sequence,
            duplicates: 0,
        })
    }

    /// The consumer, for status queries.
    pub fn consumer(&self) -> &Consumer<PullConfig> {
        &self.consumer
    }

    /// The config it was bound with.
    pub fn config(&self) -> &ReaderConfig {
        &self.cfg
    }

    /// The next batch, in delivery order: waits for at least one message, then takes what is
    /// already there up to the batch size. `None` when `cancel` fires.
    pub async fn next_batch(&mut self, cancel: &CancellationToken) -> Option<Vec<Message>> {
        loop {
            if !self.ready.is_empty() {
                let n = self.ready.len().min(self.cfg.batch);
                return Some(self.ready.drain(..n).collect());
            }
            let first = tokio::select! {
                _ = cancel.cancelled() => return None,
                m = self.next_message() => m,
            };
            if let Some(m) = first {
                self.admit(m).await;
            }
            while self.ready.len() < self.cfg.batch {
                match self.next_message().now_or_never() {
                    Some(Some(m)) => self.admit(m).await,
                    _ => break,
                }
            }
        }
    }

    /// Next message from the server, or `None` after a tick (so the gate can be re-checked).
    async fn next_message(&mut self) -> Option<Message> {
        if self.messages.is_none() {
            match self
                .consumer
                .stream()
                .max_messages_per_batch(self.cfg.batch.max(1))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
            {
                Ok(s) => self.messages = Some(s),
                Err(e) => {
                    tracing::warn!(consumer = %self.cfg.durable, error = %e, "cannot pull; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return None;
                }
            }
        }
        let stream = self.messages.as_mut().expect("set above");
        let tick = if self.gate.is_some() {
            GATE_CHECK
        } else {
            Duration::from_secs(5)
        };
        let next = tokio::time::timeout(tick, stream.next()).await;
        match next {
            Ok(Some(Ok(m))) => Some(m),
            Ok(Some(Err(e))) => {
                tracing::debug!(consumer = %self.cfg.durable, error = %e, "pull stream error");
                None
            }
            Ok(None) => {
                self.messages = None;
                None
            }
            Err(_) => {
                self.check_gate().await;
                None
            }
        }
    }

    /// Duplicate copies dropped so far: redeliveries of messages this reader already held.
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates
    }

    async fn admit(&mut self, m: Message) {
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX);
        if seq <= self.bound_at {
            // A message abandoned before this reader bound: hold its first copy only. JetStream
            // redelivers abandoned messages in the order their ack waits expire, which is not
            // stream order (in-progress acks reset the timers), so they are held and released
            // sorted together with the newer ones.
            match self.gate.as_mut() {
                Some(gate) if !gate.seen.contains(&seq) => {
                    gate.seen.insert(seq);
                    gate.remaining = gate.remaining.saturating_sub(1);
                    gate.held.insert(seq, m);
                }
                _ => self.duplicates += 1,
            }
        } else if seq <= self.max_seen {
            // Its ack wait expired while this reader held it: the copy we hold stays in order.
            self.duplicates += 1;
        } else {
            self.max_seen = seq;
            match self.gate.as_mut() {
                Some(gate) => {
                    gate.held.insert(seq, m);
                }
                None => self.ready.push(m),
            }
        }
        if self.gate.as_ref().is_some_and(|g| g.remaining == 0) {
            self.open_gate();
        } else if self
            .gate
            .as_ref()
            .is_some_and(|g| g.last_check.elapsed() >= GATE_CHECK)
        {
            self.check_gate().await;
        }
    }

    /// Keeps held messages alive and opens the gate once no abandoned message is outstanding:
    /// every message still pending on the consumer is one this reader holds.
    async fn check_gate(&mut self) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        gate.last_check = std::time::Instant::now();
        for m in gate.held.values() {
            let _ = m.ack_with(AckKind::Progress).await;
        }
        let held = gate.held.len();
        let delivered = gate.delivered;
        if let Ok(info) = self.consumer.info().await
            && (info.num_ack_pending <= held || info.ack_floor.stream_sequence >= delivered)
        {
            self.open_gate();
        }
    }

    fn open_gate(&mut self) {
        if let Some(gate) = self.gate.take() {
            tracing::info!(consumer = %self.cfg.durable, held = gate.held.len(), "abandoned messages are back; resuming in order");
            self.ready.extend(gate.held.into_values());
        }
    }
}

/// Sends in-progress acks for `msgs` every `every` until dropped, so messages that wait behind a
/// retry are not redelivered.
pub struct KeepAlive {
    task: tokio::task::JoinHandle<()>,
}

impl KeepAlive {
    /// Starts keeping `msgs` alive.
    pub fn start(msgs: Vec<Message>, every: Duration) -> Self {
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                for m in &msgs {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            }
        });
        Self { task }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Backoff for in-process retries: 100 ms doubling up to `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let ms = 100u64.saturating_mul(1u64 << attempt.min(16));
    Duration::from_millis(ms).min(max)
}
