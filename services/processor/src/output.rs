//! The processor's outputs: a processed event as a message on the processed stream, and the
//! one way they are published (by the worker after a key's writes, and by a profile write
//! that publishes its events while it writes, see [`crate::KeyEvents::publish_early`]).

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use herald_common::Topology;
use herald_proto::v1::ProcessedEvent;
use prost::Message as _;

/// One processed event as a message: its subject (the event's partition), its id (the
/// `Nats-Msg-Id`, so a copy published again inside the duplicate window is dropped by the
/// server) and its encoded bytes.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    subject: String,
    id: String,
    payload: Bytes,
}

impl Output {
    /// `processed` as a message of `topology`'s processed stream.
    pub(crate) fn of(topology: &Topology, processed: &ProcessedEvent) -> Self {
        let (partition, id) = processed
            .event
            .as_ref()
            .map(|e| (e.partition, e.id.clone()))
            .unwrap_or_default();
        Self {
            subject: topology.processed_subject(partition),
            id,
            payload: Bytes::from(processed.encode_to_vec()),
        }
    }
}

/// Publishes every output pipelined, in order, and waits for all PubAcks.
pub(crate) async fn publish_all(js: &jetstream::Context, outputs: &[Output]) -> Result<(), String> {
    let mut acks = Vec::with_capacity(outputs.len());
    for o in outputs {
        let ack = js
            .send_publish(
                o.subject.clone(),
                PublishMessage::build()
                    .payload(o.payload.clone())
                    .message_id(&o.id),
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
