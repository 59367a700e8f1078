//! Request-level dedupe for mParticle: a batch whose `source_request_id` was already stored is
//! answered 202 without publishing its events again.
//!
//! Design: a KV bucket `<prefix>-requests` (created by ingest on first use, idempotently, by
//! every replica), one key per stored batch, kept for the events stream's duplicate window
//! (`topology.duplicate_window_seconds`, the bucket's max age). A batch is recorded only after
//! JetStream acknowledged every event of the request, so a request that failed part-way is
//! published again in full on retry (and its events that were stored the first time are dropped
//! by their `Nats-Msg-Id`). The record is a shortcut on top of event-level dedupe, never the
//! only guard: when the bucket cannot be read, events are published and `Nats-Msg-Id` dedupes
//! them; when the record cannot be written, the request still succeeds (its events are stored).
//! Two identical requests racing both publish; `Nats-Msg-Id` keeps one copy of each event.
//!
//! Keys are `<base64url(source id)>.<base64url(source_request_id)>`: both parts only use the
//! characters KV keys allow, and two sources never share a key.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use base64::Engine as _;
use futures_util::future::join_all;
use tokio::sync::OnceCell;

/// Why the request log could not be used.
#[derive(Debug, thiserror::Error)]
#[error("request log {bucket}: {message}")]
pub struct RequestLogError {
    /// The bucket.
    pub bucket: String,
    /// What failed.
    pub message: String,
}

/// The KV-backed set of stored mParticle batches, by source and `source_request_id`.
pub struct RequestLog {
    js: jetstream::Context,
    bucket: String,
    ttl: Duration,
    replicas: usize,
    store: OnceCell<kv::Store>,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("bucket", &self.bucket)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl RequestLog {
    /// A log in `bucket`, whose records expire after `ttl`.
    pub fn new(js: jetstream::Context, bucket: String, ttl: Duration, replicas: usize) -> Self {
        Self {
            js,
            bucket,
            ttl,
            replicas,
            store: OnceCell::new(),
        }
    }

    /// The bucket, created (or updated to this config) on first use; a failure is not cached.
    async fn store(&self) -> Result<&kv::Store, RequestLogError> {
        self.store
            .get_or_try_init(|| async {
                self.js
                    .create_or_update_key_value(kv::Config {
                        bucket: self.bucket.clone(),
                        description: "Herald: mParticle source_request_ids already stored".into(),
                        history: 1,
                        max_age: self.ttl,
                        storage: jetstream::stream::StorageType::File,
                        num_replicas: self.replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| self.error(e))
            })
            .await
    }

    fn error(&self, e: impl std::fmt::Display) -> RequestLogError {
        RequestLogError {
            bucket: self.bucket.clone(),
            message: e.to_string(),
        }
    }

    /// The key of a request id of a source.
    pub fn key(source_id: &str, request_id: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}", b64.encode(source_id), b64.encode(request_id))
    }

    /// For each request id, whether it was recorded as stored; looked up concurrently.
    pub async fn seen(
        &self,
        source_id: &str,
        request_ids: &[&str],
    ) -> Result<Vec<bool>, RequestLogError> {
        if request_ids.is_empty() {
            return Ok(Vec::new());
        }
        let store = self.store().await?;
        let lookups = request_ids
            .iter()
            .map(|id| store.get(Self::key(source_id, id)));
        join_all(lookups)
            .await
            .into_iter()
            .map(|r| r.map(|v| v.is_some()).map_err(|e| self.error(e)))
            .collect()
    }

    /// Records the request ids as stored (puts pipelined, acks awaited together).
    pub async fn record(
        &self,
        source_id: &str,
        request_ids: &[&str],
    ) -> Result<(), RequestLogError> {
        if request_ids.is_empty() {
            return Ok(());
        }
        let store = self.store().await?;
        let puts = request_ids
            .iter()
            .map(|id| store.put(Self::key(source_id, id), bytes::Bytes::new()));
        for r in join_all(puts).await {
            r.map_err(|e| self.error(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_and_scoped_by_source() {
        let k = RequestLog::key("web", "req/1 with spaces.and:colons*>");
        assert!(
            k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{k}"
        );
        assert_eq!(k.matches('.').count(), 1);
        assert_ne!(RequestLog::key("a", "x"), RequestLog::key("b", "x"));
        assert_ne!(RequestLog::key("a.b", "c"), RequestLog::key("a", "b.c"));
    }
}
