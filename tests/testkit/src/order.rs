//! Reading a stream from its start, and checking what reached the processed stream: every
//! user's events, each once, in order.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt as _;
use herald_proto::v1::{EventType, ProcessedEvent};
use prost::Message as _;
use tokio::time::Instant;

/// Every message of the stream `stream`, from its first on, through a new ephemeral consumer
/// that acknowledges nothing.
///
/// # Errors
///
/// When the stream does not exist or the consumer cannot be created.
pub async fn read_from_start(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<consumer::pull::Stream> {
    let consumer = js
        .get_stream(stream)
        .await?
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    Ok(consumer
        .stream()
        .heartbeat(Duration::from_secs(1))
        .expires(Duration::from_secs(5))
        .messages()
        .await?)
}

/// Reads the processed stream `stream` from its start and checks that each of `users` users'
/// tracks `0..rounds` (message ids `<user>-<seq>`, as [`crate::protobuf_track`] makes them) is
/// there, once, in order. Waits up to 60 s for all of them.
///
/// # Errors
///
/// When events are missing after 60 s, repeated, out of order, or of other users.
pub async fn check_processed_in_order(
    js: &jetstream::Context,
    stream: &str,
    users: usize,
    rounds: u64,
) -> anyhow::Result<()> {
    let total = users * rounds as usize;
    let mut messages = read_from_start(js, stream).await?;
    let mut per_user: HashMap<String, Vec<u64>> = HashMap::new();
    let mut seen = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < total {
        let next = tokio::time::timeout_at(deadline, messages.next())
            .await
            .with_context(|| format!("only {seen} of {total} events were processed"))?;
        let msg = next.context("the processed stream ended")??;
        let Some(e) = ProcessedEvent::decode(msg.payload.as_ref())?.event else {
            continue;
        };
        if e.r#type != EventType::Track as i32 {
            continue;
        }
        let (user, seq) = e
            .message_id
            .rsplit_once('-')
            .context("message id is user-seq")?;
        per_user
            .entry(user.to_string())
            .or_default()
            .push(seq.parse()?);
        seen += 1;
    }
    ensure!(
        per_user.len() == users,
        "{} users of {users}",
        per_user.len()
    );
    for (user, seqs) in per_user {
        let expected: Vec<u64> = (0..rounds).collect();
        ensure!(
            seqs == expected,
            "{user}: events missing, repeated or out of order: {seqs:?}"
        );
    }
    Ok(())
}
