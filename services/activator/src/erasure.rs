//! An erasure reaches each destination once per person, not once per partition.
//!
//! The processor publishes one erasure event per processed partition the person's identities
//! route to (id `erasure:<request>:<partition>`, message id the request id), so that each queues
//! behind that partition's earlier events of the person. Those partitions may be delivered by
//! different replicas. Before sending an erasure to a destination, a replica claims the pair
//! (destination, request) in the erasure ledger, the KV bucket `<prefix>-erasure-deliveries`
//! (key `<destination>.<request>`), with a `create`, which only one writer wins:
//! - the winner sends the erasure payload ([`crate::payload::erasure`]) and then marks the key
//!   `sent`;
//! - another partition's erasure of the same request finds the key and is acked without
//!   sending (counted as skipped, `reason="erasure_duplicate"`);
//! - the winner's own message coming back (its replica crashed before the ack) finds its own
//!   partition in the key and sends again, so a crash between the claim and the send loses
//!   nothing.
//!
//! The ledger's keys expire with the bucket's max age, the processed stream's
//! (`topology.processed_max_age_seconds`): as long as an erasure event can still be read
//! (`--start all`, replay, redrive), its claim is there, so a replay sends no erasure again.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream::StorageType};
use chrono::{DateTime, Utc};
use herald_common::Topology;
use herald_common::retry::Retry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::events;

/// The bucket's name under the topology's prefix (`herald-erasure-deliveries`).
pub const BUCKET: &str = "erasure-deliveries";

/// The erasure an event carries: what the ledger keys on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Erasure {
    /// The erasure request's id (the event's message id).
    pub request_id: String,
    /// The processed partition this copy was published to.
    pub partition: u32,
}

/// A ledger entry.
#[derive(Debug, Serialize, Deserialize)]
struct Claim {
    /// The partition whose copy of the erasure claimed it.
    partition: u32,
    /// Whether the destination acknowledged it.
    sent: bool,
    /// When it was claimed or sent.
    at: DateTime<Utc>,
}

/// What a claim decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claimed {
    /// This copy sends the erasure.
    Send,
    /// Another copy sent it, or is sending it: this one is not sent.
    Duplicate,
}

/// The erasure ledger, opened once by [`crate::suppressions::run`] before any delivery starts.
#[derive(Clone, Default)]
pub(crate) struct ErasureLedger {
    kv: Arc<OnceLock<kv::Store>>,
}

impl ErasureLedger {
    /// Opens the bucket, creating it when absent (max age: the processed stream's).
    pub(crate) async fn open(
        &self,
        js: &jetstream::Context,
        topology: &Topology,
    ) -> Result<(), String> {
        if self.kv.get().is_some() {
            return Ok(());
        }
        let name = topology.bucket(BUCKET);
        let store = match js.get_key_value(&name).await {
            Ok(store) => store,
            Err(_) => {
                let created = js
                    .create_key_value(kv::Config {
                        bucket: name.clone(),
                        description: "Herald: erasures sent per destination and request (once per person), for the processed stream's max age".into(),
                        history: 1,
                        max_age: Duration::from_secs(topology.config().processed_max_age_seconds),
                        storage: StorageType::File,
                        num_replicas: topology.config().replicas,
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(store) => store,
                    // Another replica created it meanwhile.
                    Err(e) => js
                        .get_key_value(&name)
                        .await
                        .map_err(|_| format!("cannot create bucket {name}: {e}"))?,
                }
            }
        };
        let _ = self.kv.set(store);
        Ok(())
    }

    fn store(&self) -> Result<&kv::Store, String> {
        self.kv
            .get()
            .ok_or_else(|| "the erasure ledger is not open".to_string())
    }

    async fn try_claim(&self, destination: &str, e: &Erasure) -> Result<Claimed, String> {
        let kv = self.store()?;
        let key = key(destination, &e.request_id);
        let claim = Claim {
            partition: e.partition,
            sent: false,
            at: Utc::now(),
        };
        let value = serde_json::to_vec(&claim).expect("a claim serialises");
        match kv.create(&key, value.into()).await {
            Ok(_) => return Ok(Claimed::Send),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(err) => return Err(err.to_string()),
        }
        let held = kv.get(&key).await.map_err(|e| e.to_string())?;
        let held: Option<Claim> = held.and_then(|v| serde_json::from_slice(&v).ok());
        Ok(match held {
            // This partition's copy claimed it and was not acknowledged: send again.
            Some(c) if !c.sent && c.partition == e.partition => Claimed::Send,
            // Gone meanwhile (expired): claim it anew next time; sending twice is the safe side.
            None => Claimed::Send,
            Some(_) => Claimed::Duplicate,
        })
    }

    /// Claims the erasure for `destination`, retrying KV failures until `cancel` (`None`).
    pub(crate) async fn claim(
        &self,
        destination: &str,
        e: &Erasure,
        max_backoff: Duration,
        cancel: &CancellationToken,
    ) -> Option<Claimed> {
        Retry::new(max_backoff)
            .run(
                cancel,
                || self.try_claim(destination, e),
                |f| {
                    events::ErasureLedgerRetried {
                        destination,
                        attempt: f.attempt,
                        error: f.error,
                    }
                    .emit()
                },
            )
            .await
    }

    /// Marks the erasure sent to `destination`, retrying until `cancel`; false when cancelled
    /// first (the claim then stays this partition's, and its redelivery sends again).
    pub(crate) async fn sent(
        &self,
        destination: &str,
        e: &Erasure,
        max_backoff: Duration,
        cancel: &CancellationToken,
    ) -> bool {
        let value = serde_json::to_vec(&Claim {
            partition: e.partition,
            sent: true,
            at: Utc::now(),
        })
        .expect("a claim serialises");
        let key = key(destination, &e.request_id);
        Retry::new(max_backoff)
            .run(
                cancel,
                || async {
                    self.store()?
                        .put(&key, value.clone().into())
                        .await
                        .map_err(|e| e.to_string())
                },
                |f| {
                    events::ErasureLedgerRetried {
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
}

/// The ledger key of (destination, request): both are KV-safe (ids of letters, digits, `-`,
/// `_`; request ids `req-<hex>`); anything else in a request id becomes `_`.
fn key(destination: &str, request_id: &str) -> String {
    let request: String = request_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{destination}.{request}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_kv_safe() {
        assert_eq!(key("crm", "req-00ff"), "crm.req-00ff");
        assert_eq!(key("crm", "a.b:c"), "crm.a_b_c");
    }
}
