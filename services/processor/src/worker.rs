//! The processing loop: ordered batches in, processed events out, inputs acked after outputs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::Consumer;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, Message};
use bytes::Bytes;
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::nats::{ensure_stream, retry_until, wait_for_stream};
use herald_common::ordered::{KeepAlive, OrderedReader, ReaderConfig, backoff};
use herald_proto::v1::{Event, Identity, ProcessedEvent};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::{ProcessorConfig, Stats, events};

/// Resolves one event to its processed form. The profile id is the partition key for now;
/// identity resolution replaces this.
pub fn process_event(event: Event) -> ProcessedEvent {
    let mut identities = Vec::new();
    if !event.user_id.is_empty() {
        identities.push(Identity {
            r#type: "user_id".into(),
            value: event.user_id.clone(),
        });
    }
    if !event.anonymous_id.is_empty() {
        identities.push(Identity {
            r#type: "anonymous_id".into(),
            value: event.anonymous_id.clone(),
        });
    }
    let mut extra: Vec<_> = event.identities.iter().collect();
    extra.sort();
    identities.extend(extra.into_iter().map(|(t, v)| Identity {
        r#type: t.clone(),
        value: v.clone(),
    }));
    let profile_id = if event.partition_key.is_empty() {
        event.id.clone()
    } else {
        event.partition_key.clone()
    };
    let consent = event.consent.clone();
    ProcessedEvent {
        event: Some(event),
        profile_id,
        identities,
        consent,
    }
}

pub(crate) async fn run(
    js: jetstream::Context,
    topology: Topology,
    cfg: ProcessorConfig,
    ready: Readiness,
    stats: Arc<Stats>,
    consumer_tx: tokio::sync::watch::Sender<Option<Consumer<PullConfig>>>,
    cancel: CancellationToken,
) {
    let provisioned = retry_until("creating the processed stream", &cancel, || {
        ensure_stream(&js, topology.processed_stream_config())
    })
    .await;
    if provisioned.is_none() {
        return;
    }
    ready.set("processed stream", true);
    if wait_for_stream(&js, &topology.events_stream(), &cancel)
        .await
        .is_none()
    {
        return;
    }
    let reader_cfg = ReaderConfig {
        stream: topology.events_stream(),
        durable: cfg.durable.clone(),
        filter_subject: topology.events_wildcard(),
        ack_wait: Duration::from_secs(cfg.ack_wait_seconds),
        max_ack_pending: cfg.max_ack_pending,
        batch: cfg.batch_size,
        description: "Herald processor: reads every events partition".into(),
    };
    let Some(mut reader) = retry_until("binding the events consumer", &cancel, || {
        OrderedReader::bind(&js, reader_cfg.clone())
    })
    .await
    else {
        return;
    };
    let _ = consumer_tx.send(Some(reader.consumer().clone()));
    ready.set("events consumer", true);
    tracing::info!(consumer = %cfg.durable, "processor consuming events");

    let keep_alive_every = Duration::from_secs(cfg.ack_wait_seconds.max(3)) / 3;
    let max_backoff = Duration::from_millis(cfg.retry_max_backoff_ms);
    while let Some(batch) = reader.next_batch(&cancel).await {
        let started = Instant::now();
        let n = batch.len();
        if !handle_batch(
            &js,
            &topology,
            batch,
            keep_alive_every,
            max_backoff,
            &cancel,
        )
        .await
        {
            break;
        }
        stats.processed.fetch_add(n as u64, Ordering::Relaxed);
        events::batch_done(n, started.elapsed().as_secs_f64());
    }
    ready.set("events consumer", false);
}

/// Processes one batch. Returns false when cancelled before its outputs were stored (the
/// inputs then stay unacked and are redelivered).
async fn handle_batch(
    js: &jetstream::Context,
    topology: &Topology,
    batch: Vec<Message>,
    keep_alive_every: Duration,
    max_backoff: Duration,
    cancel: &CancellationToken,
) -> bool {
    let mut outputs: Vec<(String, String, Bytes)> = Vec::with_capacity(batch.len());
    let mut inputs = Vec::with_capacity(batch.len());
    for msg in batch {
        match Event::decode(msg.payload.as_ref()) {
            Ok(event) => {
                let subject = topology.processed_subject(event.partition);
                let id = event.id.clone();
                let processed = process_event(event);
                outputs.push((subject, id, Bytes::from(processed.encode_to_vec())));
                inputs.push(msg);
            }
            Err(e) => {
                events::undecodable(&msg.subject, &e);
                let _ = msg.ack_with(AckKind::Term).await;
            }
        }
    }
    let mut keep_alive = None;
    let mut attempt = 0u32;
    loop {
        match publish_all(js, &outputs).await {
            Ok(()) => break,
            Err(e) => {
                attempt += 1;
                events::publish_failed(attempt, &e);
                if keep_alive.is_none() {
                    keep_alive = Some(KeepAlive::start(inputs.clone(), keep_alive_every));
                }
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(backoff(attempt, max_backoff)) => {}
                }
            }
        }
    }
    drop(keep_alive);
    for msg in &inputs {
        if let Err(e) = msg.ack().await {
            tracing::warn!(error = %e, "ack failed; the event will be redelivered and deduplicated");
        }
    }
    true
}

/// Publishes every output pipelined and waits for all PubAcks.
async fn publish_all(
    js: &jetstream::Context,
    outputs: &[(String, String, Bytes)],
) -> Result<(), String> {
    let mut acks = Vec::with_capacity(outputs.len());
    for (subject, id, payload) in outputs {
        let ack = js
            .send_publish(
                subject.clone(),
                PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(id),
            )
            .await
            .map_err(|e| e.to_string())?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_is_the_partition_key_and_identities_are_listed() {
        let mut event = Event {
            id: "src:m1".into(),
            user_id: "u1".into(),
            anonymous_id: "a1".into(),
            partition_key: "u1".into(),
            ..Default::default()
        };
        event
            .identities
            .insert("email".into(), "ann@example.com".into());
        let p = process_event(event);
        assert_eq!(p.profile_id, "u1");
        let kinds: Vec<_> = p.identities.iter().map(|i| i.r#type.as_str()).collect();
        assert_eq!(kinds, ["user_id", "anonymous_id", "email"]);
        assert_eq!(p.event.expect("event kept").id, "src:m1");
    }

    #[test]
    fn event_without_key_gets_its_own_profile() {
        let p = process_event(Event {
            id: "src:m2".into(),
            ..Default::default()
        });
        assert_eq!(p.profile_id, "src:m2");
    }
}
