//! The suppression list of one replica (see [`crate::erasure`] for what suppression means):
//! identity bucket keys, kept current by a KV watch. The resolver drops events naming a
//! suppressed identity; erasure and suppression requests wait until the list has caught up with
//! their own writes.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::events;
use crate::store::Bucket;

/// How long a request waits for this replica's suppression list to catch up.
const CATCH_UP: Duration = Duration::from_secs(5);

/// The suppression list of one replica: identity bucket keys, kept current by a KV watch.
#[derive(Debug)]
pub struct Suppressions {
    set: RwLock<HashSet<String>>,
    /// (highest revision applied, loaded).
    state: watch::Sender<(u64, bool)>,
}

impl Default for Suppressions {
    fn default() -> Self {
        Self {
            set: RwLock::new(HashSet::new()),
            state: watch::Sender::new((0, false)),
        }
    }
}

impl Suppressions {
    /// Whether identity bucket key `kv_key` is suppressed.
    pub fn contains(&self, kv_key: &str) -> bool {
        self.set.read().expect("suppressions lock").contains(kv_key)
    }

    /// Whether the list has been read once.
    pub fn is_loaded(&self) -> bool {
        self.state.borrow().1
    }

    /// Waits until loaded; false when cancelled first.
    pub async fn wait_loaded(&self, cancel: &CancellationToken) -> bool {
        let mut rx = self.state.subscribe();
        tokio::select! {
            r = rx.wait_for(|s| s.1) => r.is_ok(),
            _ = cancel.cancelled() => false,
        }
    }

    /// Waits (up to a few seconds) until the list has applied bucket revision `rev`.
    pub(crate) async fn wait_revision(&self, rev: u64) {
        let mut rx = self.state.subscribe();
        if tokio::time::timeout(CATCH_UP, rx.wait_for(|s| s.1 && s.0 >= rev))
            .await
            .is_err()
        {
            events::SuppressionsBehind { revision: rev }.emit();
        }
    }

    /// Keeps the list current until `cancel`, re-reading the bucket after any watch failure.
    pub async fn watch(this: Arc<Self>, bucket: Bucket, cancel: CancellationToken) {
        loop {
            if let Err(e) = this.watch_once(&bucket, &cancel).await {
                events::SuppressionWatchFailed { error: &e }.emit();
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn watch_once(&self, bucket: &Bucket, cancel: &CancellationToken) -> Result<(), String> {
        let last = bucket
            .kv()
            .stream
            .get_info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .last_sequence;
        let mut w = bucket
            .kv()
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        let mut loading: Option<HashSet<String>> = Some(HashSet::new());
        if last == 0 {
            self.swap_in(loading.take().unwrap_or_default(), 0);
        }
        loop {
            let entry = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                e = w.next() => e,
            };
            let entry = match entry {
                None => return Err("the watch ended".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(e)) => e,
            };
            let apply = |set: &mut HashSet<String>| match entry.operation {
                Operation::Put => {
                    set.insert(entry.key.clone());
                }
                Operation::Delete | Operation::Purge => {
                    set.remove(&entry.key);
                }
            };
            match loading.as_mut() {
                Some(set) => {
                    apply(set);
                    if entry.seen_current || entry.revision >= last {
                        self.swap_in(loading.take().unwrap_or_default(), entry.revision);
                    }
                }
                None => {
                    apply(&mut self.set.write().expect("suppressions lock"));
                    self.state.send_modify(|s| s.0 = s.0.max(entry.revision));
                }
            }
        }
    }

    fn swap_in(&self, set: HashSet<String>, revision: u64) {
        *self.set.write().expect("suppressions lock") = set;
        self.state.send_modify(|s| {
            s.0 = s.0.max(revision);
            s.1 = true;
        });
    }
}
