//! Delivery status: records of how an event's delivery to a destination ended, in the KV
//! bucket `<prefix>-delivery` (created by the activator at start), each with a per-key TTL
//! (`activator.delivery_status_ttl_seconds`, default 24 h; 0 turns recording off).
//!
//! What is recorded: every outcome other than a plain delivery (dlq, consent-dropped, once at
//! the end) and `retrying` (once, after an event's second failed attempt). A delivered event
//! is recorded when `activator.delivery_status_delivered` is on, and otherwise only where a
//! record may already stand for it (a third or later attempt followed a `retrying` record; a
//! redelivery; a redrive), so that no record goes stale. Delivered events are not recorded by
//! default because each record is a key of its own: nats-server keeps every key of a stream in
//! memory, about 0.9 KiB a record measured here (`herald-bench soak`), so a record per event
//! for 24 h would hold about 0.9 KiB times every event of a day.
//!
//! A message JetStream delivers again (delivery count above 1: after a crash of the activator
//! or of nats-server) is checked against its record first, and acked without sending when the
//! record says delivered; only redeliveries pay that read.
//!
//! The key is `<hex SHA-256 of the event id>.<destination>` (event ids may hold characters KV
//! keys cannot). `GetDeliveryStatus` (`herald.v1.DeliveryStatusService`) looks an event up by
//! Herald's id `<source>:<messageId>`, or by the messageId alone (then under every source of
//! the config bucket).

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, stream};
use chrono::Utc;
use herald_common::Topology;
use herald_proto::v1::delivery_status_service_server::{
    DeliveryStatusService, DeliveryStatusServiceServer,
};
use herald_proto::v1::{
    DeliveryState, DeliveryStatusRecord, DestinationDelivery, GetDeliveryStatusRequest,
    GetDeliveryStatusResponse,
};
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

use crate::store::DestinationStore;

/// How long the bucket keeps the marker of an expired record.
const MARKER_TTL: Duration = Duration::from_secs(60);

/// Why a status record could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// NATS refused or did not answer.
    #[error("delivery status {op} failed: {message}")]
    Nats {
        /// `write` or `read`.
        op: &'static str,
        /// What failed.
        message: String,
    },
}

/// The delivery-status bucket, as delivery and the control API use it.
#[derive(Clone)]
pub(crate) struct StatusStore {
    js: jetstream::Context,
    bucket: String,
    ttl: Duration,
    delivered: bool,
    kv: Arc<OnceCell<kv::Store>>,
}

/// The key of `event_id`'s record at `destination`.
pub(crate) fn key(event_id: &str, destination: &str) -> String {
    let digest = Sha256::digest(event_id.as_bytes());
    let mut out = String::with_capacity(65 + destination.len());
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out.push('.');
    out.push_str(destination);
    out
}

impl StatusStore {
    /// The bucket of `topology`, records kept for `ttl` (zero: nothing is recorded);
    /// `delivered`: whether every delivered event is recorded too.
    pub fn new(
        js: jetstream::Context,
        topology: &Topology,
        ttl: Duration,
        delivered: bool,
    ) -> Self {
        Self {
            js,
            bucket: topology.delivery_bucket(),
            ttl,
            delivered,
            kv: Arc::new(OnceCell::new()),
        }
    }

    /// Whether records are kept at all.
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// Whether every delivered event is recorded (`activator.delivery_status_delivered`);
    /// otherwise only those that may already have a record (see the module's text).
    pub fn records_delivered(&self) -> bool {
        self.enabled() && self.delivered
    }

    /// Whether every delivered event of `destination` is recorded: for every destination, or
    /// for this one (its `record_deliveries`), with records kept at all.
    pub fn records_delivered_of(&self, destination: &crate::record::DestinationRecord) -> bool {
        self.records_delivered() || (self.enabled() && destination.record_deliveries)
    }

    /// How long records are kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Creates the bucket when missing (history 1, file storage, per-key TTL allowed).
    pub async fn ensure_bucket(&self, replicas: usize) -> Result<(), String> {
        if self.js.get_key_value(&self.bucket).await.is_ok() {
            return Ok(());
        }
        let created = self
            .js
            .create_key_value(kv::Config {
                bucket: self.bucket.clone(),
                description:
                    "Herald: how each event's delivery to each destination ended (per-key TTL)"
                        .into(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                limit_markers: Some(MARKER_TTL),
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) => self
                .js
                .get_key_value(&self.bucket)
                .await
                .map(drop)
                .map_err(|_| format!("cannot create bucket {}: {e}", self.bucket)),
        }
    }

    async fn kv(&self) -> Result<&kv::Store, StatusError> {
        self.kv
            .get_or_try_init(|| self.js.get_key_value(&self.bucket))
            .await
            .map_err(|e| StatusError::Nats {
                op: "read",
                message: e.to_string(),
            })
    }

    /// Writes `record` (its event and destination name the key) with the TTL, and waits for
    /// the stream's acknowledgement.
    pub async fn write(&self, record: &DeliveryStatusRecord) -> Result<(), StatusError> {
        let fail = |message: String| StatusError::Nats {
            op: "write",
            message,
        };
        let subject = format!(
            "$KV.{}.{}",
            self.bucket,
            key(&record.event_id, &record.destination)
        );
        let mut headers = HeaderMap::new();
        headers.insert("Nats-TTL", self.ttl.as_secs().max(1).to_string().as_str());
        self.js
            .publish_with_headers(subject, headers, record.encode_to_vec().into())
            .await
            .map_err(|e| fail(e.to_string()))?
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    /// The record of `event_id` at `destination`, if there is one.
    pub async fn read(
        &self,
        event_id: &str,
        destination: &str,
    ) -> Result<Option<DeliveryStatusRecord>, StatusError> {
        let value = self
            .kv()
            .await?
            .get(key(event_id, destination))
            .await
            .map_err(|e| StatusError::Nats {
                op: "read",
                message: e.to_string(),
            })?;
        Ok(value.and_then(|v| DeliveryStatusRecord::decode(v).ok()))
    }
}

/// A record of `state` for `event_id` at `destination`, written now.
pub(crate) fn record(
    event_id: &str,
    destination: &str,
    state: DeliveryState,
    tried: &crate::dlq::Tried,
) -> DeliveryStatusRecord {
    let failure = tried.failure.clone().unwrap_or_default();
    DeliveryStatusRecord {
        event_id: event_id.to_string(),
        destination: destination.to_string(),
        state: state as i32,
        attempts: tried.attempts,
        last_status: u32::from(failure.status),
        last_error: failure.error,
        recorded_at: Some(herald_proto::time::to_proto(Utc::now())),
    }
}

/// Serves `herald.v1.DeliveryStatusService`.
#[derive(Clone)]
pub(crate) struct StatusGrpc {
    pub status: StatusStore,
    pub store: DestinationStore,
    pub js: jetstream::Context,
    pub topology: Topology,
}

impl StatusGrpc {
    /// The tonic server wrapping it.
    pub fn into_server(self) -> DeliveryStatusServiceServer<Self> {
        DeliveryStatusServiceServer::new(self)
    }

    /// The Herald ids `id` may stand for: itself, then `<source>:<id>` for every source in the
    /// config bucket.
    async fn candidates(&self, id: &str) -> Vec<String> {
        use futures_util::TryStreamExt as _;
        let mut out = vec![id.to_string()];
        if let Ok(config) = herald_common::nats::open_config_bucket(&self.js, &self.topology).await
            && let Ok(keys) = config.keys().await
            && let Ok(keys) = keys.try_collect::<Vec<String>>().await
        {
            for k in keys {
                if let Some(source) = k.strip_prefix("sources.") {
                    out.push(format!("{source}:{id}"));
                }
            }
        }
        out
    }
}

#[tonic::async_trait]
impl DeliveryStatusService for StatusGrpc {
    async fn get_delivery_status(
        &self,
        request: Request<GetDeliveryStatusRequest>,
    ) -> Result<Response<GetDeliveryStatusResponse>, Status> {
        let id = request.into_inner().event_id;
        if id.trim().is_empty() {
            return Err(Status::invalid_argument(
                "name the event: its id or messageId",
            ));
        }
        // Each destination, and whether every delivered event of it is recorded.
        let (destinations, recorded): (Vec<String>, Vec<bool>) = self
            .store
            .list()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .into_iter()
            .map(|r| {
                let recorded = self.status.records_delivered_of(&r);
                (r.id, recorded)
            })
            .unzip();
        let unavailable = |e: StatusError| Status::unavailable(e.to_string());
        for candidate in self.candidates(&id).await {
            let reads = destinations.iter().map(|d| self.status.read(&candidate, d));
            let records = futures_util::future::try_join_all(reads)
                .await
                .map_err(unavailable)?;
            if records.iter().any(Option::is_some) {
                return Ok(Response::new(GetDeliveryStatusResponse {
                    event_id: candidate,
                    destinations: destinations
                        .iter()
                        .zip(records)
                        .zip(&recorded)
                        .map(|((d, record), recorded)| DestinationDelivery {
                            destination: d.clone(),
                            record,
                            delivered_recorded: *recorded,
                        })
                        .collect(),
                    ttl_seconds: self.status.ttl().as_secs(),
                    delivered_recorded: self.status.records_delivered(),
                }));
            }
        }
        Ok(Response::new(GetDeliveryStatusResponse {
            event_id: String::new(),
            destinations: destinations
                .into_iter()
                .zip(recorded)
                .map(|(destination, delivered_recorded)| DestinationDelivery {
                    destination,
                    record: None,
                    delivered_recorded,
                })
                .collect(),
            ttl_seconds: self.status.ttl().as_secs(),
            delivered_recorded: self.status.records_delivered(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys_whatever_the_id() {
        for id in ["web:m-1", "src:a b/c*>?", "", "ünïcode:✓"] {
            let k = key(id, "hook_1");
            assert!(
                k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "{k}"
            );
            assert!(k.ends_with(".hook_1"), "{k}");
            assert_eq!(k.len(), 64 + 1 + 6);
        }
        assert_ne!(key("a", "d"), key("b", "d"));
    }
}
