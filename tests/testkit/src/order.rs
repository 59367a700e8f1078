//! Reading a stream from its start, and checking what reached the processed stream (every
//! user's events, each once, in order) or a webhook destination (every event, per-user order,
//! repeats only of what arrived before).

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

/// Checks what a webhook destination received against what was published: `published` lists
/// event ids (`<source>:<user>-<seq>`, as [`crate::protobuf_track`] makes them) in publish
/// order, `arrivals` the `Idempotency-Key` of each delivery in arrival order. Every published
/// event arrived; per user, first arrivals follow publish order, and a delivery of an event
/// after a later one of the same user is only a repeat of an event that had arrived before.
/// Returns how many deliveries were repeats.
///
/// # Errors
///
/// When an event is missing, an unknown one arrived, or a user's order broke.
pub fn check_arrivals_in_order(published: &[String], arrivals: &[String]) -> anyhow::Result<usize> {
    let user_of = |id: &str| -> anyhow::Result<String> {
        let (user, _) = id
            .rsplit_once('-')
            .with_context(|| format!("event id {id:?} is <source>:<user>-<seq>"))?;
        Ok(user.to_string())
    };
    // Each event's rank among its user's events, in publish order.
    let mut rank: HashMap<&str, (String, usize)> = HashMap::new();
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for id in published {
        let user = user_of(id)?;
        let n = per_user.entry(user.clone()).or_default();
        rank.insert(id.as_str(), (user, *n));
        *n += 1;
    }
    let mut next: HashMap<&str, usize> = HashMap::new();
    let mut repeats = 0;
    for id in arrivals {
        let (user, r) = rank
            .get(id.as_str())
            .with_context(|| format!("{id} arrived but was not published"))?;
        let expected = next.entry(user.as_str()).or_default();
        if *r == *expected {
            *expected += 1;
        } else if *r < *expected {
            repeats += 1;
        } else {
            anyhow::bail!(
                "{id} (number {r} of {user}) arrived before number {expected} of that user"
            );
        }
    }
    for (user, n) in &per_user {
        let got = next.get(user.as_str()).copied().unwrap_or_default();
        ensure!(got == *n, "{user}: {got} of {n} events arrived");
    }
    Ok(repeats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arrivals_are_checked_per_user_with_repeats_allowed() {
        let published = ids(&["s:a-0", "s:b-0", "s:a-1", "s:b-1"]);
        let fine = ids(&["s:b-0", "s:a-0", "s:a-1", "s:a-0", "s:a-1", "s:b-1"]);
        assert_eq!(check_arrivals_in_order(&published, &fine).unwrap(), 2);
        let reordered = ids(&["s:a-1", "s:a-0", "s:b-0", "s:b-1"]);
        assert!(check_arrivals_in_order(&published, &reordered).is_err());
        let missing = ids(&["s:a-0", "s:a-1", "s:b-0"]);
        assert!(check_arrivals_in_order(&published, &missing).is_err());
        let unknown = ids(&["s:a-0", "s:a-1", "s:b-0", "s:b-1", "s:c-0"]);
        assert!(check_arrivals_in_order(&published, &unknown).is_err());
    }
}
