//! The suppression list (`<prefix>-suppressions`): identity bucket keys
//! ([`crate::identity::kv_key`]) whose events are never processed or delivered. The processor
//! writes it (a suppression request, or an erasure, which suppresses before it deletes); the
//! processor drops events naming a suppressed identity, and the activator refuses to deliver
//! them. Every replica of both keeps the list in memory, current through a KV watch.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream::StorageType};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Topology;
use crate::events;

/// The bucket's name under the topology's prefix (`herald-suppressions`).
pub const BUCKET: &str = "suppressions";

/// The bucket's description.
pub const DESCRIPTION: &str = "Herald: suppressed identities; their events are dropped";

/// How long a request waits for this replica's suppression list to catch up.
const CATCH_UP: Duration = Duration::from_secs(5);

/// The suppressions bucket's config: file storage, history 1, the topology's replicas (the
/// processor creates it with the same).
pub fn bucket_config(topology: &Topology) -> kv::Config {
    kv::Config {
        bucket: topology.bucket(BUCKET),
        description: DESCRIPTION.to_string(),
        history: 1,
        storage: StorageType::File,
        num_replicas: topology.config().replicas,
        ..Default::default()
    }
}

/// Opens the suppressions bucket, creating it (with [`bucket_config`]) when it is not there yet.
pub async fn open_bucket(
    js: &jetstream::Context,
    topology: &Topology,
) -> Result<kv::Store, String> {
    let name = topology.bucket(BUCKET);
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    match js.create_key_value(bucket_config(topology)).await {
        Ok(store) => Ok(store),
        // Another replica or service may have created it meanwhile.
        Err(e) => js
            .get_key_value(&name)
            .await
            .map_err(|_| format!("cannot create bucket {name}: {e}")),
    }
}

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

    /// Whether any of the identity bucket keys `kv_keys` gives is suppressed. The keys are made
    /// only when the list holds any: an empty list (the common case) costs no key per event.
    pub fn any(&self, kv_keys: impl FnOnce() -> Vec<String>) -> bool {
        let set = self.set.read().expect("suppressions lock");
        !set.is_empty() && kv_keys().iter().any(|k| set.contains(k))
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
    pub async fn wait_revision(&self, rev: u64) {
        let mut rx = self.state.subscribe();
        if tokio::time::timeout(CATCH_UP, rx.wait_for(|s| s.1 && s.0 >= rev))
            .await
            .is_err()
        {
            events::SuppressionsBehind { revision: rev }.emit();
        }
    }

    /// Keeps the list current until `cancel`, re-reading the bucket after any watch failure.
    pub async fn watch(this: Arc<Self>, kv: kv::Store, cancel: CancellationToken) {
        loop {
            if let Err(e) = this.watch_once(&kv, &cancel).await {
                events::SuppressionWatchFailed { error: &e }.emit();
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn watch_once(&self, kv: &kv::Store, cancel: &CancellationToken) -> Result<(), String> {
        let last = kv
            .stream
            .get_info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .last_sequence;
        let mut w = kv
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
                kv::Operation::Put => {
                    set.insert(entry.key.clone());
                }
                kv::Operation::Delete | kv::Operation::Purge => {
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn keys_are_made_only_when_the_list_holds_any() {
        let list = Suppressions::default();
        let made = Cell::new(0);
        let keys = || {
            made.set(made.get() + 1);
            vec!["user_id.dS0x".to_string()]
        };
        assert!(!list.any(keys));
        assert_eq!(made.get(), 0, "an empty list makes no keys");
        list.swap_in(HashSet::from(["email.YQ".to_string()]), 1);
        assert!(!list.any(keys));
        assert_eq!(made.get(), 1);
        list.swap_in(HashSet::from(["user_id.dS0x".to_string()]), 2);
        assert!(list.any(keys));
    }
}
