//! An ordered reader over a durable pull consumer, shared by the processor and the activator.
//!
//! JetStream redelivers unacknowledged messages only after their ack wait, while new messages
//! flow at once. After a crash, a restarted reader would therefore see a key's newer messages
//! before its older, abandoned ones, and the abandoned ones in the order their ack waits expire.
//! [`OrderedReader`] closes that gap with a gate: while it is closed, every message is held
//! (kept alive with in-progress acks); it opens once every message pending on the consumer is
//! one this reader holds, that is, once everything a predecessor left unacked has come back (or
//! was acked meanwhile), and then all held messages are released in stream order. While
//! running, a copy of a message the reader already holds or handled (its ack wait expired
//! meanwhile) is dropped, so a slow batch never reorders a key.
//!
//! A reader bound with [`OrderedReader::bind_pinned`] pulls through the consumer's priority
//! group under the `pinned_client` policy, so the server delivers to one reader at a time (see
//! [`crate::ownership`]). Each time the server pins this reader anew (a message carries a new
//! `Nats-Pin-Id`), a new *term* starts and the gate closes again: another reader may have been
//! pinned in between and left messages unacked. A reader that finds its pin gone gives back what
//! it holds (nak), so the pinned one gets it at once; [`OrderedReader::release`] does the same,
//! stops pulling and unpins, for a quick handover.
//!
//! How a redelivered message is told apart: JetStream delivers new messages in stream order, so
//! within a term every message first delivered (delivery count 1) to this reader has a sequence
//! at or above the term's first one, and every message below it that comes back was delivered
//! before the term (abandoned by a predecessor). A redelivered copy at or above that mark, or a
//! second copy of an abandoned one, is a duplicate.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::{Config as PullConfig, Stream as MessageStream};
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy, PriorityPolicy};
use async_nats::jetstream::{self, AckKind, Message};
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

/// Least time between two checks of a closed gate against the consumer's state while messages
/// keep arriving.
const GATE_CHECK: Duration = Duration::from_millis(100);

/// How long a closed gate waits for a message before checking again.
const CLOSED_TICK: Duration = Duration::from_millis(250);

/// How long an open, unpinned reader waits for a message before polling again.
const OPEN_TICK: Duration = Duration::from_secs(5);

/// How long a releasing reader waits for messages already on their way to it.
const RELEASE_QUIET: Duration = Duration::from_millis(50);

/// Messages admitted per wait before the gate is looked at again.
const DRAIN_LIMIT: usize = 4_096;

/// Term ids, unique in the process.
static TERMS: AtomicU64 = AtomicU64::new(1);

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

/// The priority group a pinned reader pulls through (`pinned_client` policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedGroup {
    /// The group's name (see [`crate::ownership::PRIORITY_GROUP`]).
    pub group: String,
    /// The consumer's priority timeout: a pinned client that stops pulling for this long loses
    /// its pin. Pull requests expire after half of it, so a live reader keeps its pin.
    pub timeout: Duration,
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

/// What a reader is doing, for status reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReaderStatus {
    /// The pin this reader's pulls hold (pinned readers), as the last message carried it;
    /// `None` while on standby.
    pub pin_id: Option<String>,
    /// True while the reader hands messages out: its gate is open and, if pinned, it holds the
    /// pin. A term stays active until it ends; a later term has a new `term` id.
    pub active: bool,
    /// The current term's id, unique in the process.
    pub term: u64,
    /// Messages held back by the closed gate.
    pub held: usize,
    /// Messages on the consumer not yet delivered, as of the last message received.
    pub lag: u64,
}

/// A shared view of a reader's [`ReaderStatus`], updated by the reader.
#[derive(Debug, Clone, Default)]
pub struct ReaderStatusHandle(Arc<Mutex<ReaderStatus>>);

impl ReaderStatusHandle {
    /// The status now.
    pub fn get(&self) -> ReaderStatus {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReaderStatus> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Term {
    id: u64,
    /// The pin this term runs under (pinned readers).
    pin: Option<String>,
    /// Stream sequence of the first message first delivered in this term (see module docs).
    first_new: Option<u64>,
    /// Abandoned messages already admitted in this term (further copies are duplicates).
    seen: HashSet<u64>,
    /// Consumer sequence of the latest delivery in this term.
    last_delivery: Option<u64>,
}

impl Term {
    fn new(pin: Option<String>) -> Self {
        Self {
            id: TERMS.fetch_add(1, Ordering::Relaxed),
            pin,
            first_new: None,
            seen: HashSet::new(),
            last_delivery: None,
        }
    }
}

enum Next {
    Message(Box<Message>),
    /// The server says a pull carried a pin that is no longer current (status 423).
    PinLost,
    /// Nothing arrived within the tick.
    Idle,
    /// The pull stream failed or ended; it is set up again on the next call.
    Broken,
}

/// Reads a durable pull consumer in order; see the module docs.
pub struct OrderedReader {
    cfg: ReaderConfig,
    stream: jetstream::stream::Stream,
    consumer: Consumer<PullConfig>,
    pinned: Option<PinnedGroup>,
    js: jetstream::Context,
    /// The pull stream of an unpinned reader.
    messages: Option<MessageStream>,
    /// The pulls of a pinned reader.
    puller: Option<PinnedPull>,
    term: Term,
    open: bool,
    held: BTreeMap<u64, Message>,
    ready: VecDeque<Message>,
    last_check: Instant,
    last_keep_alive: Instant,
    last_pending: u64,
    duplicates: u64,
    /// Deliveries that never arrived (seen as gaps in the consumer sequence).
    lost_deliveries: u64,
    status: ReaderStatusHandle,
}

/// Creates the durable consumer, or updates it to `cfg` but for its deliver policy, which an
/// existing consumer keeps (keeping it as it is when the server
/// refuses the update), and returns it with its stream.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    cfg: &ReaderConfig,
    pinned: Option<&PinnedGroup>,
) -> Result<(jetstream::stream::Stream, Consumer<PullConfig>), ReaderError> {
    let err = |message: String| ReaderError::Consumer {
        stream: cfg.stream.clone(),
        durable: cfg.durable.clone(),
        message,
    };
    let stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut config = PullConfig {
        durable_name: Some(cfg.durable.clone()),
        description: Some(cfg.description.clone()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: cfg.ack_wait,
        max_ack_pending: cfg.max_ack_pending,
        filter_subject: cfg.filter_subject.clone(),
        ..Default::default()
    };
    if let Some(p) = pinned {
        config.priority_policy = PriorityPolicy::PinnedClient;
        config.priority_groups = vec![p.group.clone()];
        config.priority_timeout = p.timeout;
    }
    let consumer = match stream.get_consumer::<PullConfig>(&cfg.durable).await {
        Ok(existing) => {
            // Where a consumer starts cannot change once it exists: keep its own (an activator
            // destination's consumer may start at a time).
            config.deliver_policy = existing.cached_info().config.deliver_policy;
            match js.update_consumer_on_stream(config, &cfg.stream).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(consumer = %cfg.durable, error = %e, "cannot update the consumer; using it as it is");
                    existing
                }
            }
        }
        Err(_) => stream
            .create_consumer(config)
            .await
            .map_err(|e| err(e.to_string()))?,
    };
    Ok((stream, consumer))
}

impl OrderedReader {
    /// Creates (or updates) the durable consumer and binds to it. The reader is the consumer's
    /// only reader: its gate closes at bind while anything is pending.
    pub async fn bind(js: &jetstream::Context, cfg: ReaderConfig) -> Result<Self, ReaderError> {
        Self::bind_with(js, cfg, None).await
    }

    /// Creates (or updates) the durable consumer with the priority group `pinned`
    /// (`pinned_client` policy) and binds to it, on standby until the server pins it. Several
    /// replicas may bind the same consumer; only the pinned one receives messages.
    pub async fn bind_pinned(
        js: &jetstream::Context,
        cfg: ReaderConfig,
        pinned: PinnedGroup,
    ) -> Result<Self, ReaderError> {
        Self::bind_with(js, cfg, Some(pinned)).await
    }

    async fn bind_with(
        js: &jetstream::Context,
        cfg: ReaderConfig,
        pinned: Option<PinnedGroup>,
    ) -> Result<Self, ReaderError> {
        let (stream, mut consumer) = ensure_consumer(js, &cfg, pinned.as_ref()).await?;
        // An unpinned reader starts its only term now; a pinned one when it is first pinned.
        let open = if pinned.is_some() {
            false
        } else {
            let info = consumer.info().await.map_err(|e| ReaderError::Consumer {
                stream: cfg.stream.clone(),
                durable: cfg.durable.clone(),
                message: e.to_string(),
            })?;
            if info.num_ack_pending > 0 {
                tracing::info!(
                    consumer = %cfg.durable,
                    pending = info.num_ack_pending,
                    "holding messages until abandoned ones are redelivered"
                );
            }
            info.num_ack_pending == 0
        };
        let term = Term::new(None);
        let status = ReaderStatusHandle::default();
        {
            let mut s = status.lock();
            s.term = term.id;
            s.active = open;
        }
        Ok(Self {
            cfg,
            stream,
            consumer,
            pinned,
            js: js.clone(),
            messages: None,
            puller: None,
            term,
            open,
            held: BTreeMap::new(),
            ready: VecDeque::new(),
            last_check: Instant::now(),
            last_keep_alive: Instant::now(),
            last_pending: 0,
            duplicates: 0,
            lost_deliveries: 0,
            status,
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

    /// Duplicate copies dropped so far: redeliveries of messages this reader already held.
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates
    }

    /// Deliveries that never reached this reader so far (gaps in the consumer sequence); each
    /// gap starts a new term, so the lost messages are processed in order when redelivered.
    pub fn lost_deliveries(&self) -> u64 {
        self.lost_deliveries
    }

    /// What the reader is doing now.
    pub fn status(&self) -> ReaderStatus {
        self.status.get()
    }

    /// A handle that follows the reader's status (for a status API).
    pub fn status_handle(&self) -> ReaderStatusHandle {
        self.status.clone()
    }

    /// The next batch, in stream order: waits for at least one message the gate lets through,
    /// then takes what is already there up to the batch size. `None` when `cancel` fires.
    pub async fn next_batch(&mut self, cancel: &CancellationToken) -> Option<Vec<Message>> {
        loop {
            if self.open && !self.ready.is_empty() {
                let n = self.ready.len().min(self.cfg.batch.max(1));
                let batch: Vec<Message> = self.ready.drain(..n).collect();
                if !self.ready.is_empty() && self.keep_alive_due() {
                    self.last_keep_alive = Instant::now();
                    for m in &self.ready {
                        let _ = m.ack_with(AckKind::Progress).await;
                    }
                }
                self.status.lock().lag = self.last_pending;
                return Some(batch);
            }
            let next = tokio::select! {
                _ = cancel.cancelled() => return None,
                n = self.next_message() => n,
            };
            match next {
                Next::Message(m) => self.admit(*m).await,
                Next::PinLost => self.pin_lost().await,
                Next::Idle => self.idle().await,
                Next::Broken => {}
            }
            let mut drained = 0;
            while drained < DRAIN_LIMIT && (!self.open || self.ready.len() < self.cfg.batch) {
                match self.next_message().now_or_never() {
                    Some(Next::Message(m)) => self.admit(*m).await,
                    _ => break,
                }
                drained += 1;
            }
            if !self.open && self.last_check.elapsed() >= GATE_CHECK {
                self.check_gate().await;
            }
        }
    }

    /// Gives the partition up: stops pulling and, if this reader holds the pin, unpins the
    /// consumer and waits until its pending pull requests have ended (at most about a second),
    /// so nothing delivered to it stays unseen; then gives back (nak) every message it holds
    /// and has not handed out, so the next reader gets them at once. Call it after the last
    /// batch handed out was acked (or abandoned).
    pub async fn release(mut self) {
        {
            let mut s = self.status.lock();
            s.active = false;
            s.held = 0;
        }
        self.messages = None;
        let mut drained = Vec::new();
        if let (Some(group), Some(mut puller)) = (self.pinned.clone(), self.puller.take()) {
            puller.stop_requesting();
            // Until every pull this reader made has ended, the server may still deliver to it
            // (a standby pull can even be pinned meanwhile): take what comes, and unpin
            // whenever the consumer's pin is one this reader received.
            let deadline = Instant::now() + puller.longest_wait() + Duration::from_secs(1);
            let mut unpinned: Option<String> = None;
            loop {
                // Deliveries already on their way arrive within a moment.
                drained.extend(puller.drain_quiet(RELEASE_QUIET).await);
                let ours = puller.pin.clone().or_else(|| self.term.pin.clone());
                if let Some(pin) = ours.filter(|p| unpinned.as_ref() != Some(p)) {
                    let pinned_now = match self.consumer.info().await {
                        Ok(info) => pinned_id(info, &group.group) == Some(pin.as_str()),
                        Err(_) => true,
                    };
                    if pinned_now
                        && let Err(e) = self
                            .stream
                            .unpin_consumer(&self.cfg.durable, &group.group)
                            .await
                    {
                        tracing::warn!(
                            consumer = %self.cfg.durable,
                            error = %e,
                            "cannot unpin; the pin expires after the priority timeout"
                        );
                    }
                    unpinned = Some(pin);
                    drained.extend(puller.drain_quiet(RELEASE_QUIET).await);
                }
                // Pulls that carried the unpinned pin can no longer be served; wait for the
                // others (standby pulls) to end, unless one of them is pinned meanwhile.
                let target = unpinned.clone();
                drained.extend(
                    puller
                        .drain_until(deadline, |p| {
                            p.idle_after_unpin(target.as_deref()) || p.pin != target
                        })
                        .await,
                );
                if puller.idle_after_unpin(unpinned.as_deref()) || Instant::now() >= deadline {
                    break;
                }
            }
            puller.close();
        }
        let returned = self.held.len() + self.ready.len() + drained.len();
        for m in self
            .held
            .values()
            .chain(self.ready.iter())
            .chain(drained.iter())
        {
            if let Err(e) = m.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(consumer = %self.cfg.durable, error = %e, "nak failed");
            }
        }
        // Make sure the server has them before this reader is gone.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.js.client().flush()).await;
        if self.pinned.is_some() {
            tracing::info!(consumer = %self.cfg.durable, returned, "released the partition");
        }
    }

    /// Next message from the server, [`Next::Idle`] after a tick without one.
    async fn next_message(&mut self) -> Next {
        let tick = if !self.open { CLOSED_TICK } else { OPEN_TICK };
        if let Some(group) = &self.pinned {
            if self.puller.is_none() {
                match PinnedPull::start(&self.js, &self.cfg, group).await {
                    Ok(p) => self.puller = Some(p),
                    Err(e) => {
                        tracing::warn!(consumer = %self.cfg.durable, error = %e, "cannot pull; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        return Next::Broken;
                    }
                }
            }
            let puller = self.puller.as_mut().expect("set above");
            return match puller.next(tick).await {
                Pulled::Message(m) => Next::Message(m),
                Pulled::PinLost => Next::PinLost,
                Pulled::Idle => Next::Idle,
                Pulled::Closed => {
                    self.puller = None;
                    Next::Broken
                }
            };
        }
        if self.messages.is_none() {
            let builder = self
                .consumer
                .stream()
                .max_messages_per_batch(self.cfg.batch.max(1));
            let builder = builder
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30));
            match builder.messages().await {
                Ok(s) => self.messages = Some(s),
                Err(e) => {
                    tracing::warn!(consumer = %self.cfg.durable, error = %e, "cannot pull; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return Next::Broken;
                }
            }
        }
        let stream = self.messages.as_mut().expect("set above");
        match tokio::time::timeout(tick, stream.next()).await {
            Ok(Some(Ok(m))) => Next::Message(Box::new(m)),
            Ok(Some(Err(e))) => {
                tracing::debug!(consumer = %self.cfg.durable, error = %e, "pull stream error");
                Next::Broken
            }
            Ok(None) => {
                self.messages = None;
                Next::Broken
            }
            Err(_) => Next::Idle,
        }
    }

    async fn admit(&mut self, m: Message) {
        let Ok(info) = m.info() else {
            // Not a JetStream message: nothing to order it by.
            self.place(u64::MAX, m);
            return;
        };
        let (seq, delivered, pending) = (info.stream_sequence, info.delivered, info.pending);
        if self.pinned.is_some()
            && let Some(pin) = m
                .headers
                .as_ref()
                .and_then(|h| h.get_last(async_nats::header::NATS_PIN_ID))
            && self.term.pin.as_deref() != Some(pin.as_str())
        {
            let pin = pin.as_str().to_owned();
            self.new_term(pin);
        }
        self.last_pending = pending;
        let delivery = info.consumer_sequence;
        if let Some(last) = self.term.last_delivery
            && delivery > last + 1
        {
            // Deliveries in between never arrived (a pull ended with messages on the way).
            // They come back after their ack wait as redeliveries of sequences at or above
            // `first_new`, which this term would drop as copies: start a new term, in which
            // they count as abandoned, so newer messages wait for them and they are released
            // in stream order.
            self.lost_deliveries += delivery - last - 1;
            tracing::warn!(
                consumer = %self.cfg.durable,
                lost = delivery - last - 1,
                "deliveries lost on the way; holding newer messages until they are redelivered"
            );
            let pin = self.term.pin.clone();
            self.restart_term(pin);
        }
        self.term.last_delivery = Some(
            self.term
                .last_delivery
                .map_or(delivery, |l| l.max(delivery)),
        );
        if delivered <= 1 {
            self.term.first_new.get_or_insert(seq);
        } else if self.term.first_new.is_some_and(|first| seq >= first)
            || !self.term.seen.insert(seq)
            || self.held.contains_key(&seq)
        {
            // A copy of one this reader holds or handled: the copy we have stays in order.
            self.duplicates += 1;
            return;
        }
        self.place(seq, m);
    }

    fn place(&mut self, seq: u64, m: Message) {
        if self.open {
            self.ready.push_back(m);
        } else {
            self.held.insert(seq, m);
        }
    }

    /// The server pinned this reader anew: hold everything until what others left is back.
    fn new_term(&mut self, pin: String) {
        self.restart_term(Some(pin));
    }

    /// Starts a new term under `pin`: hold everything until what is pending elsewhere (or
    /// was lost on the way) is back.
    fn restart_term(&mut self, pin: Option<String>) {
        for m in self.ready.drain(..) {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX);
            self.held.insert(seq, m);
        }
        self.open = false;
        self.term = Term::new(pin.clone());
        self.last_check = Instant::now() - GATE_CHECK;
        tracing::debug!(consumer = %self.cfg.durable, pin = ?pin, term = self.term.id, "new term");
        let mut s = self.status.lock();
        s.pin_id = pin;
        s.active = false;
        s.term = self.term.id;
        s.held = self.held.len();
    }

    async fn idle(&mut self) {
        if !self.open {
            self.check_gate().await;
        }
    }

    /// A pull was refused for carrying a pin the server no longer has: unless the consumer
    /// still names this reader's pin (a late answer to an older pull), the pin moved.
    async fn pin_lost(&mut self) {
        let (Some(group), Some(pin)) = (self.pinned.clone(), self.term.pin.clone()) else {
            return;
        };
        let still_ours = match self.consumer.info().await {
            Ok(info) => pinned_id(info, &group.group) == Some(pin.as_str()),
            Err(_) => false,
        };
        if still_ours {
            if let Some(puller) = self.puller.as_mut() {
                puller.pin = Some(pin);
            }
        } else {
            self.lose_pin().await;
        }
    }

    /// Keeps held messages alive and opens the gate once every message pending on the consumer
    /// is one this reader holds. A pinned reader whose pin has moved gives back what it holds.
    async fn check_gate(&mut self) {
        self.last_check = Instant::now();
        if self.pinned.is_some() && self.term.pin.is_none() {
            // On standby: nothing received, nothing to check.
            return;
        }
        let group = self.pinned.as_ref().map(|p| p.group.clone());
        let (num_ack_pending, server_pin) = match self.consumer.info().await {
            Ok(info) => (
                info.num_ack_pending,
                group
                    .as_deref()
                    .and_then(|g| pinned_id(info, g).map(str::to_owned)),
            ),
            Err(e) => {
                tracing::debug!(consumer = %self.cfg.durable, error = %e, "cannot read the consumer state");
                self.keep_held_alive().await;
                return;
            }
        };
        if group.is_some() && server_pin != self.term.pin {
            self.lose_pin().await;
            return;
        }
        if num_ack_pending <= self.held.len() {
            self.open_gate();
        } else {
            self.status.lock().held = self.held.len();
            self.keep_held_alive().await;
        }
    }

    async fn keep_held_alive(&mut self) {
        if self.keep_alive_due() {
            self.last_keep_alive = Instant::now();
            for m in self.held.values() {
                let _ = m.ack_with(AckKind::Progress).await;
            }
        }
    }

    fn keep_alive_due(&self) -> bool {
        self.last_keep_alive.elapsed() >= (self.cfg.ack_wait / 3).max(Duration::from_millis(100))
    }

    fn open_gate(&mut self) {
        let held = self.held.len();
        if held > 0 {
            tracing::debug!(consumer = %self.cfg.durable, held, term = self.term.id, "nothing pending elsewhere; resuming in order");
        }
        self.ready
            .extend(std::mem::take(&mut self.held).into_values());
        self.open = true;
        let mut s = self.status.lock();
        s.active = true;
        s.held = 0;
    }

    /// The pin moved to another reader: give back what is not handed out yet, so it gets it at
    /// once, and wait on standby.
    async fn lose_pin(&mut self) {
        let returned = self.held.len() + self.ready.len();
        for m in self.held.values().chain(self.ready.iter()) {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
        if returned > 0 {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.js.client().flush()).await;
        }
        self.held.clear();
        self.ready.clear();
        self.open = false;
        self.term = Term::new(None);
        tracing::info!(consumer = %self.cfg.durable, returned, "the pin moved to another reader; on standby");
        let mut s = self.status.lock();
        s.pin_id = None;
        s.active = false;
        s.term = self.term.id;
        s.held = 0;
    }
}

/// The client pinned in `group`, as the consumer info reports it.
fn pinned_id<'a>(info: &'a async_nats::jetstream::consumer::Info, group: &str) -> Option<&'a str> {
    info.priority_groups
        .iter()
        .find(|g| g.group == group)
        .and_then(|g| g.pinned_client_id.as_deref())
}

/// What [`PinnedPull::next`] got.
enum Pulled {
    Message(Box<Message>),
    /// A pull was refused for carrying a pin that is no longer current (status 423).
    PinLost,
    /// Nothing arrived within the tick.
    Idle,
    /// The subscription ended or the consumer is gone.
    Closed,
}

/// One pull request, with its own inbox subscription so that its deliveries and its end are
/// known exactly.
struct PullRequest {
    sub: async_nats::Subscriber,
    /// The pin it carried.
    pin: Option<String>,
    /// Messages it may still deliver.
    remaining: usize,
    /// When the server lets it expire.
    expires_at: Instant,
}

/// Pull requests through a `pinned_client` priority group, made by hand, each on its own
/// inbox. Unlike the client library's pull stream it reports a lost pin, knows exactly which
/// requests are still open, and can stop asking and wait until they have ended
/// ([`PinnedPull::drain`]), so a releasing reader leaves no request behind for the server to
/// pin or deliver to (a delivery nobody reads waits out the ack wait, a pin nobody renews the
/// pin timeout). It assumes the default JetStream API prefix (`$JS.API`, no domain), as
/// Herald's connection uses.
struct PinnedPull {
    client: async_nats::Client,
    context: jetstream::Context,
    subject: String,
    group: String,
    batch: usize,
    /// Expiry of a request that carries the pin: half the pin timeout, so the pin is renewed.
    expires: Duration,
    /// Expiry of a standby request (no pin yet): short, so a released reader's standby pulls
    /// end soon.
    standby_expires: Duration,
    /// The pin the server gave these pulls (the `Nats-Pin-Id` of delivered messages).
    pin: Option<String>,
    requests: BTreeMap<u64, PullRequest>,
    next_id: u64,
    requesting: bool,
}

impl PinnedPull {
    async fn start(
        js: &jetstream::Context,
        cfg: &ReaderConfig,
        group: &PinnedGroup,
    ) -> Result<Self, async_nats::SubscribeError> {
        let expires = (group.timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        Ok(Self {
            client: js.client(),
            context: js.clone(),
            subject: format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", cfg.stream, cfg.durable),
            group: group.group.clone(),
            batch: cfg.batch.max(1),
            expires,
            standby_expires: Duration::from_secs(1).min(expires),
            pin: None,
            requests: BTreeMap::new(),
            next_id: 0,
            requesting: true,
        })
    }

    fn current_expiry(&self) -> Duration {
        if self.pin.is_some() {
            self.expires
        } else {
            self.standby_expires
        }
    }

    /// The longest an open request can still last.
    fn longest_wait(&self) -> Duration {
        self.requests
            .values()
            .map(|r| r.expires_at.saturating_duration_since(Instant::now()))
            .max()
            .unwrap_or_default()
    }

    /// Asks for the next batch once the open request has ended: one request at a time, so
    /// messages arrive in delivery order. A request expires after half the pin timeout at
    /// most, so the next one renews the pin in time.
    async fn top_up(&mut self) -> Result<(), String> {
        if !self.requesting || !self.requests.is_empty() {
            return Ok(());
        }
        let expires = self.current_expiry();
        let mut request = serde_json::json!({
            "batch": self.batch,
            "expires": expires.as_nanos() as u64,
            "idle_heartbeat": (expires / 4).as_nanos() as u64,
            "group": self.group,
        });
        if let Some(pin) = &self.pin {
            request["id"] = serde_json::Value::from(pin.as_str());
        }
        let inbox = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        self.client
            .publish_with_reply(
                self.subject.clone(),
                inbox,
                bytes::Bytes::from(request.to_string()),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.next_id += 1;
        self.requests.insert(
            self.next_id,
            PullRequest {
                sub,
                pin: self.pin.clone(),
                remaining: self.batch,
                expires_at: Instant::now() + expires,
            },
        );
        Ok(())
    }

    fn stop_requesting(&mut self) {
        self.requesting = false;
    }

    /// Forgets a request the server should have ended by now (lost in a reconnect). Only
    /// called with nothing buffered on any request.
    fn reap(&mut self) {
        let now = Instant::now();
        let grace = (self.expires / 2).min(Duration::from_secs(1));
        self.requests.retain(|_, r| now < r.expires_at + grace);
    }

    /// The next answer on any open request, tagged with the request.
    fn poll_requests(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<(u64, Option<async_nats::Message>)> {
        for (id, r) in self.requests.iter_mut() {
            if let std::task::Poll::Ready(m) = r.sub.poll_next_unpin(cx) {
                return std::task::Poll::Ready((*id, m));
            }
        }
        std::task::Poll::Pending
    }

    /// The next message, a lost pin, or [`Pulled::Idle`] after `tick` without either.
    async fn next(&mut self, tick: Duration) -> Pulled {
        let deadline = Instant::now() + tick;
        loop {
            // What arrived already comes first: a request past its expiry can still hold
            // messages delivered before it ended (the reader was busy with a batch), and
            // reaping it would lose them until their ack wait ran out.
            if let Some((id, answer)) =
                std::future::poll_fn(|cx| self.poll_requests(cx)).now_or_never()
            {
                match answer {
                    None => {
                        self.requests.remove(&id);
                    }
                    Some(msg) => {
                        if let Some(pulled) = self.handle(id, msg) {
                            return pulled;
                        }
                    }
                }
                continue;
            }
            self.reap();
            if let Err(e) = self.top_up().await {
                tracing::debug!(error = %e, "cannot send a pull request");
                return Pulled::Closed;
            }
            let reap_at = self
                .requests
                .values()
                .map(|r| r.expires_at + (self.expires / 2).min(Duration::from_secs(1)))
                .min()
                .unwrap_or(deadline);
            let wake = deadline
                .min(reap_at)
                .max(Instant::now() + Duration::from_millis(10));
            let answer = tokio::time::timeout_at(
                wake.into(),
                std::future::poll_fn(|cx| self.poll_requests(cx)),
            )
            .await;
            match answer {
                Err(_) if Instant::now() >= deadline => return Pulled::Idle,
                Err(_) => continue,
                Ok((id, None)) => {
                    self.requests.remove(&id);
                }
                Ok((id, Some(msg))) => {
                    if let Some(pulled) = self.handle(id, msg) {
                        return pulled;
                    }
                }
            }
        }
    }

    /// Accounts for one answer to request `id`; `None` for status messages that need no
    /// action.
    fn handle(&mut self, id: u64, msg: async_nats::Message) -> Option<Pulled> {
        use async_nats::StatusCode;
        match msg.status {
            None | Some(StatusCode::OK) => {
                if let Some(r) = self.requests.get_mut(&id) {
                    r.remaining = r.remaining.saturating_sub(1);
                    if r.remaining == 0 {
                        self.requests.remove(&id);
                    }
                }
                if let Some(pin) = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get_last(async_nats::header::NATS_PIN_ID))
                    && self.pin.as_deref() != Some(pin.as_str())
                {
                    self.pin = Some(pin.as_str().to_owned());
                }
                Some(Pulled::Message(Box::new(Message {
                    message: msg,
                    context: self.context.clone(),
                })))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => None,
            Some(status) => {
                // Any other status ends the request: expired (408), refused or ended (409),
                // or its pin is not (or no longer) the consumer's (423).
                let ended = self.requests.remove(&id);
                if status == StatusCode::PIN_ID_MISMATCH {
                    let carried = ended.and_then(|r| r.pin);
                    if carried.is_some() && carried == self.pin {
                        self.pin = None;
                        return Some(Pulled::PinLost);
                    }
                    return None;
                }
                if msg.description.as_deref() == Some("Consumer Deleted") {
                    return Some(Pulled::Closed);
                }
                tracing::trace!(%status, description = ?msg.description, "pull ended");
                None
            }
        }
    }

    /// Whether nothing can be delivered any more once `unpinned` was unpinned: no request is
    /// open, or only requests that carried that pin (which the server no longer serves).
    fn idle_after_unpin(&self, unpinned: Option<&str>) -> bool {
        self.requests
            .values()
            .all(|r| unpinned.is_some() && r.pin.as_deref() == unpinned)
    }

    /// Asks for nothing more and collects what arrives until `quiet` passes without any
    /// answer (or no request is open).
    async fn drain_quiet(&mut self, quiet: Duration) -> Vec<Message> {
        self.requesting = false;
        let mut got = Vec::new();
        while !self.requests.is_empty() {
            let answer =
                tokio::time::timeout(quiet, std::future::poll_fn(|cx| self.poll_requests(cx)))
                    .await;
            match answer {
                Err(_) => break,
                Ok((id, None)) => {
                    self.requests.remove(&id);
                }
                Ok((id, Some(msg))) => {
                    if let Some(Pulled::Message(m)) = self.handle(id, msg) {
                        got.push(*m);
                    }
                }
            }
        }
        got
    }

    /// Asks for nothing more and collects what arrives until `done` holds, no request is open,
    /// or `deadline` passes.
    async fn drain_until(
        &mut self,
        deadline: Instant,
        done: impl Fn(&Self) -> bool,
    ) -> Vec<Message> {
        self.requesting = false;
        let mut got = Vec::new();
        while !self.requests.is_empty() && !done(self) {
            let answer = tokio::time::timeout_at(
                deadline.into(),
                std::future::poll_fn(|cx| self.poll_requests(cx)),
            )
            .await;
            match answer {
                Err(_) => break,
                Ok((id, None)) => {
                    self.requests.remove(&id);
                }
                Ok((id, Some(msg))) => {
                    if let Some(Pulled::Message(m)) = self.handle(id, msg) {
                        got.push(*m);
                    }
                }
            }
        }
        got
    }

    /// Drops every request's subscription.
    fn close(mut self) {
        self.requests.clear();
    }
}
