//! Helpers shared by the processor's integration tests.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use herald_common::partition::partition_for;
use herald_common::{Topology, TopologyConfig};
use herald_processor::{Outcome, Profiles, ProfilesConfig};
use herald_proto::v1::{Consent, Event, EventType, ProcessedEvent};
use herald_testkit::NatsServer;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// The control token the tests configure.
pub const TOKEN: &str = "processor-test-token";

/// The default topology (16 partitions).
pub fn topology() -> Topology {
    Topology::new(TopologyConfig::default())
}

/// A profile store on `nats`, with its own cache (one per simulated replica).
pub async fn open(nats: &NatsServer, cfg: ProfilesConfig) -> Result<Arc<Profiles>> {
    Ok(Profiles::open(
        nats.jetstream().await,
        topology(),
        cfg,
        CancellationToken::new(),
    )
    .await?)
}

/// A timestamp `secs` seconds after a fixed instant.
pub fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: 1_760_000_000 + secs,
        nanos: 0,
    })
}

/// An event of type `ty` with the given ids, at `secs`, routed like ingest routes it.
pub fn event(id: &str, ty: EventType, user: &str, anon: &str, secs: i64) -> Event {
    let key = if user.is_empty() { anon } else { user };
    Event {
        id: format!("test:{id}"),
        message_id: id.to_string(),
        source_id: "test".into(),
        r#type: ty as i32,
        name: if ty == EventType::Track {
            "Viewed".into()
        } else {
            String::new()
        },
        user_id: user.into(),
        anonymous_id: anon.into(),
        timestamp: ts(secs),
        received_at: ts(secs),
        partition_key: key.into(),
        partition: partition_for(key, 16),
        ..Default::default()
    }
}

/// An identify call with traits (a JSON object).
pub fn identify(id: &str, user: &str, anon: &str, secs: i64, traits: &str) -> Event {
    Event {
        traits: traits.as_bytes().to_vec(),
        ..event(id, EventType::Identify, user, anon, secs)
    }
}

/// A consent statement.
pub fn consent(purposes: &[(&str, bool)], opted_out: bool, secs: i64) -> Option<Consent> {
    Some(Consent {
        purposes: purposes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        opted_out,
        updated_at: ts(secs),
    })
}

/// Processes `e`, expecting it to be published; returns what would be published. Retryable
/// store errors are retried for a few seconds, as the worker retries them (a fresh replicated
/// bucket can answer "no responders" for a moment after it was created).
pub async fn process(p: &Profiles, e: Event) -> Result<Vec<ProcessedEvent>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut e = e;
    loop {
        match p.process(e).await {
            Ok(Outcome::Publish(list)) => return Ok(list),
            Ok(Outcome::Suppressed) => bail!("the event was suppressed"),
            Err((err, back)) if err.retryable() && std::time::Instant::now() < deadline => {
                e = back;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err((err, _)) => return Err(err.into()),
        }
    }
}

/// Publishes events on the events stream as ingest would (creating the stream first).
pub async fn publish_events(js: &jetstream::Context, events: &[Event]) -> Result<()> {
    let t = topology();
    herald_common::nats::ensure_stream(js, t.events_stream_config()).await?;
    for e in events {
        js.send_publish(
            t.events_subject(e.partition),
            jetstream::message::PublishMessage::build()
                .payload(e.encode_to_vec().into())
                .message_id(&e.id),
        )
        .await?
        .await?;
    }
    Ok(())
}

/// Reads the processed stream from the start.
pub struct ProcessedReader {
    messages: consumer::pull::Stream,
    /// Everything read so far.
    pub seen: Vec<(String, ProcessedEvent)>,
}

impl ProcessedReader {
    /// A reader over every processed partition (waits for the stream to exist).
    pub async fn new(js: &jetstream::Context) -> Result<Self> {
        let t = topology();
        let name = t.processed_stream();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match js.get_stream(&name).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("the processed stream never appeared: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await?;
        let messages = consumer
            .stream()
            .heartbeat(Duration::from_secs(1))
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        Ok(Self {
            messages,
            seen: Vec::new(),
        })
    }

    /// Reads until an event whose id is `id` arrived (or `timeout` passes); returns it.
    pub async fn wait_for(&mut self, id: &str, timeout: Duration) -> Result<ProcessedEvent> {
        let found = |seen: &[(String, ProcessedEvent)]| {
            seen.iter()
                .find(|(_, p)| p.event.as_ref().is_some_and(|e| e.id == id))
                .map(|(_, p)| p.clone())
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = found(&self.seen) {
                return Ok(p);
            }
            let next = tokio::time::timeout_at(deadline, self.messages.next())
                .await
                .with_context(|| format!("timed out after {timeout:?} waiting for {id}"))?;
            let Some(msg) = next else {
                bail!("the processed stream consumer ended");
            };
            let Ok(msg) = msg else { continue };
            let p = ProcessedEvent::decode(msg.payload.as_ref())?;
            self.seen.push((msg.subject.to_string(), p));
        }
    }
}
