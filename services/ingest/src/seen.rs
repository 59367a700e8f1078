//! The optional long dedupe window (`ingest.dedupe_window_hours`, like Segment's 24 hours): a
//! KV seen-set of the event ids stored in that window, on top of JetStream's duplicate window.
//!
//! Design:
//! - Bucket `<prefix>-seen` (created by ingest on first use, idempotently, by every replica),
//!   history 1, max age = the window: a key expires a window after it was last written.
//! - Keys are the first 32 hex digits of SHA-256 of the event id (`<source>:<message id>`):
//!   valid KV keys whatever the id holds, and no event data in the bucket. Values are empty.
//! - Before publishing, every event's key is looked up (concurrently); an event found is not
//!   published again and is counted as a dedupe hit (`layer="seen_set"`). After the PubAcks,
//!   the keys of the stored events are written (pipelined). An event is therefore recorded only
//!   once JetStream holds it, and a request that failed is published in full on retry.
//! - The seen-set is a shortcut, never a requirement: when it cannot be read (or not within
//!   [`OP_TIMEOUT`]) every event is published and JetStream's duplicate window dedupes them;
//!   when it cannot be written the request still succeeds. Both are counted
//!   (`herald_ingest_seen_set_failures_total{op}`) and logged.
//! - Two copies of an event racing through two replicas can both miss the seen-set; JetStream's
//!   duplicate window (`Nats-Msg-Id`) keeps one of them.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::future::join_all;
use herald_common::auth::sha256_hex;
use herald_proto::v1::Event;
use tokio::sync::OnceCell;

use crate::events::SeenSetFailed;

/// The longest a lookup or a write of a request's keys may take before the seen-set is
/// skipped for that request.
pub const OP_TIMEOUT: Duration = Duration::from_secs(1);

/// The KV-backed set of event ids stored within the dedupe window. Cheap to clone.
#[derive(Clone)]
pub struct SeenSet {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    bucket: String,
    window: Duration,
    replicas: usize,
    store: OnceCell<kv::Store>,
}

impl std::fmt::Debug for SeenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeenSet")
            .field("bucket", &self.inner.bucket)
            .field("window", &self.inner.window)
            .finish()
    }
}

impl SeenSet {
    /// A seen-set in `bucket` whose keys expire `window` after they were written.
    pub fn new(js: jetstream::Context, bucket: String, window: Duration, replicas: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                js,
                bucket,
                window,
                replicas,
                store: OnceCell::new(),
            }),
        }
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.inner.bucket
    }

    /// The key of an event id.
    pub fn key(event_id: &str) -> String {
        sha256_hex(event_id.as_bytes())[..32].to_string()
    }

    /// The bucket, created (or updated to this config) on first use; a failure is not cached.
    async fn store(&self) -> Result<&kv::Store, String> {
        let inner = &self.inner;
        inner
            .store
            .get_or_try_init(|| async {
                inner
                    .js
                    .create_or_update_key_value(kv::Config {
                        bucket: inner.bucket.clone(),
                        description:
                            "Herald: ids of events stored within ingest.dedupe_window_hours".into(),
                        history: 1,
                        max_age: inner.window,
                        storage: jetstream::stream::StorageType::File,
                        num_replicas: inner.replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
    }

    /// For each event, whether its id is in the set. When the set cannot be read in time, no
    /// event is (the failure is counted and logged).
    pub async fn seen(&self, events: &[&Event]) -> Vec<bool> {
        if events.is_empty() {
            return Vec::new();
        }
        let lookup = async {
            let store = self.store().await?;
            let gets = events.iter().map(|e| store.get(Self::key(&e.id)));
            join_all(gets)
                .await
                .into_iter()
                .map(|r| r.map(|v| v.is_some()).map_err(|e| e.to_string()))
                .collect::<Result<Vec<bool>, String>>()
        };
        match tokio::time::timeout(OP_TIMEOUT, lookup).await {
            Ok(Ok(seen)) => seen,
            Ok(Err(error)) => self.failed("read", &error, events.len()),
            Err(_) => self.failed("read", &timed_out(), events.len()),
        }
    }

    /// Records the events as stored (puts pipelined, acks awaited together). A failure is
    /// counted and logged, never returned: the events are stored.
    pub async fn record(&self, events: &[&Event]) {
        if events.is_empty() {
            return;
        }
        let write = async {
            let store = self.store().await?;
            let puts = events
                .iter()
                .map(|e| store.put(Self::key(&e.id), bytes::Bytes::new()));
            for r in join_all(puts).await {
                r.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        match tokio::time::timeout(OP_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                self.failed("write", &error, events.len());
            }
            Err(_) => {
                self.failed("write", &timed_out(), events.len());
            }
        }
    }

    fn failed(&self, op: &'static str, error: &str, events: usize) -> Vec<bool> {
        SeenSetFailed {
            op,
            bucket: &self.inner.bucket,
            error,
            events,
        }
        .emit();
        vec![false; events]
    }
}

fn timed_out() -> String {
    format!("no answer within {} ms", OP_TIMEOUT.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_fixed_length_and_distinct() {
        let k = SeenSet::key("web:msg/1 with spaces.and:colons*>");
        assert_eq!(k.len(), 32);
        assert!(k.chars().all(|c| c.is_ascii_hexdigit()), "{k}");
        assert_eq!(k, SeenSet::key("web:msg/1 with spaces.and:colons*>"));
        assert_ne!(SeenSet::key("a:x"), SeenSet::key("b:x"));
    }
}
