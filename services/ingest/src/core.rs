//! The transport-neutral core that the HTTP API ([`crate::http`]) and NATS intake
//! ([`crate::intake`]) both hold: the sources, the publisher, the quarantine writer and the
//! limits, and the one way a payload of any format is decoded ([`Core::decode`]).

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use chrono::{DateTime, Utc};
use herald_common::{CommonConfig, Topology};
use herald_proto::v1::PayloadFormat;

use crate::config::IngestConfig;
use crate::error::{ApiError, IngestError};
use crate::normalise::{Decoded, Normaliser};
use crate::publish::Publisher;
use crate::quarantine::{Quarantine, Submission};
use crate::seen::SeenSet;
use crate::source_registry::SourceRegistry;
use crate::{mparticle, protobuf, segment};

/// The request limits, from `ingest.*` config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest Segment request body, decoded (and on the wire).
    pub max_request_bytes: usize,
    /// Largest mParticle request body, decoded (and on the wire).
    pub max_mparticle_request_bytes: usize,
    /// Largest encoded event.
    pub max_event_bytes: usize,
    /// Most events in one request.
    pub max_batch_events: usize,
    /// Deepest JSON nesting of a body.
    pub max_json_depth: usize,
    /// Longest client message id.
    pub max_message_id_chars: usize,
}

impl Limits {
    /// The limits of `cfg`; each must be above 0.
    pub fn from_config(cfg: &IngestConfig) -> Result<Self, IngestError> {
        let limits = Self {
            max_request_bytes: cfg.max_request_bytes,
            max_mparticle_request_bytes: cfg.max_mparticle_request_bytes,
            max_event_bytes: cfg.max_event_bytes,
            max_batch_events: cfg.max_batch_events,
            max_json_depth: cfg.max_json_depth,
            max_message_id_chars: cfg.max_message_id_chars,
        };
        let zero = [
            ("max_request_bytes", limits.max_request_bytes),
            (
                "max_mparticle_request_bytes",
                limits.max_mparticle_request_bytes,
            ),
            ("max_event_bytes", limits.max_event_bytes),
            ("max_batch_events", limits.max_batch_events),
            ("max_json_depth", limits.max_json_depth),
            ("max_message_id_chars", limits.max_message_id_chars),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0);
        if let Some((name, _)) = zero {
            return Err(IngestError::Config(format!(
                "ingest.{name} must be above 0"
            )));
        }
        Ok(limits)
    }
}

/// What every transport shares; cheap to clone.
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

struct Inner {
    sources: SourceRegistry,
    publisher: Publisher,
    quarantine: Quarantine,
    limits: Limits,
}

impl Core {
    /// The core over a NATS client (connected or still connecting). Publishes go to the events
    /// stream of `common.topology`, which must exist (the service provisions it at start).
    pub fn new(
        common: &CommonConfig,
        cfg: &IngestConfig,
        client: Client,
    ) -> Result<Self, IngestError> {
        common.topology.validate()?;
        let limits = Limits::from_config(cfg)?;
        let js = herald_common::nats::jetstream(client.clone(), &common.nats);
        let topology = Topology::new(common.topology.clone());
        let timeout = Duration::from_millis(cfg.publish_timeout_ms);
        let quarantine = Quarantine::new(client.clone(), js.clone(), topology.clone(), timeout);
        let seen = (cfg.dedupe_window_hours > 0).then(|| {
            SeenSet::new(
                js.clone(),
                topology.bucket("seen"),
                Duration::from_secs(cfg.dedupe_window_hours.saturating_mul(3600)),
                common.topology.replicas,
            )
        });
        let publisher = Publisher::new(client, js, topology, timeout).with_seen_set(seen);
        Ok(Self {
            inner: Arc::new(Inner {
                sources: SourceRegistry::from_config(&cfg.sources)?,
                publisher,
                quarantine,
                limits,
            }),
        })
    }

    /// The sources events are accepted for.
    pub fn sources(&self) -> &SourceRegistry {
        &self.inner.sources
    }

    /// The publisher events go out with (one seen-set for every transport).
    pub fn publisher(&self) -> &Publisher {
        &self.inner.publisher
    }

    /// The quarantine writer.
    pub fn quarantine(&self) -> &Quarantine {
        &self.inner.quarantine
    }

    /// The request limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The NATS client events are published with.
    pub fn client(&self) -> &Client {
        self.inner.publisher.client()
    }

    /// The topology events are published by.
    pub fn topology(&self) -> &Topology {
        self.inner.publisher.topology()
    }

    /// The normalisation context of a payload from `source_id` received at `received_at`.
    pub fn normaliser<'a>(&self, source_id: &'a str, received_at: DateTime<Utc>) -> Normaliser<'a> {
        Normaliser {
            source_id,
            received_at,
            partitions: self.topology().partitions(),
            max_event_bytes: self.inner.limits.max_event_bytes,
            max_message_id_chars: self.inner.limits.max_message_id_chars,
        }
    }

    /// Refuses a payload of more than `max_batch_events` events.
    pub fn check_count(&self, count: usize) -> Result<(), ApiError> {
        let limit = self.inner.limits.max_batch_events;
        if count > limit {
            return Err(ApiError::TooManyEvents { count, limit });
        }
        Ok(())
    }

    /// Decodes a payload whatever transport brought it, with the decoder of its format; a
    /// Segment payload is a batch when it has a `batch` key, an mParticle payload is one batch.
    /// The error is the whole payload's problem. A payload of [`PayloadFormat::Unspecified`]
    /// is the caller's to refuse; it decodes to nothing.
    pub fn decode(&self, sub: &Submission<'_>) -> Result<Decoded, ApiError> {
        let n = self.normaliser(sub.source_id, sub.received_at);
        match sub.format {
            PayloadFormat::SegmentJson => {
                let shape = segment::Shape::of_payload(sub.payload);
                let parsed = segment::parse(sub.payload, shape, None)?;
                self.check_count(parsed.len())?;
                parsed.decode(&n)
            }
            PayloadFormat::MparticleJson => {
                let batches =
                    mparticle::parse(sub.payload, false, sub.historical, sub.received_at)?;
                self.check_count(mparticle::count(&batches))?;
                Ok(mparticle::decode(&n, &batches, None))
            }
            PayloadFormat::ProtobufEvent => Ok(protobuf::decode(&n, sub.payload)),
            PayloadFormat::Unspecified => Ok(Decoded::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_must_be_positive() {
        assert!(Limits::from_config(&IngestConfig::default()).is_ok());
        let cfg = IngestConfig {
            max_json_depth: 0,
            ..Default::default()
        };
        let err = Limits::from_config(&cfg).unwrap_err();
        assert!(err.to_string().contains("max_json_depth"), "{err}");
    }
}
