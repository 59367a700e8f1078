//! Builders of input events (Segment JSON, and protobuf `Event`s as ingest publishes them),
//! and sending them to ingest's HTTP API.

use async_nats::jetstream;
use chrono::{SecondsFormat, Utc};
use herald_common::Topology;
use herald_common::partition::partition_for;
use herald_proto::v1::{Event, EventType, ProcessedEvent};
use serde_json::{Value, json};

/// A Segment `track` call for `Order Completed` by `user`, number `seq` of that user.
///
/// `messageId` is `"{user}-{seq}"`, so it is unique per (user, seq) and stable across calls (a
/// re-sent item is a duplicate). `properties` carry `seq` and a `revenue` derived from it;
/// `timestamp` is the current time in RFC 3339.
pub fn segment_track(user: &str, seq: usize) -> Value {
    // Deterministic, varied, and exact in binary floating point (a multiple of 1/4).
    let revenue = 10.0 + (seq % 100) as f64 * 0.25;
    json!({
        "type": "track",
        "event": "Order Completed",
        "userId": user,
        "messageId": format!("{user}-{seq}"),
        "properties": {
            "seq": seq,
            "revenue": revenue,
            "currency": "USD",
        },
        "timestamp": now_rfc3339(),
    })
}

/// A Segment `identify` call for `user` with the given `traits` (a JSON object). `messageId` is
/// `"{user}-identify"`.
pub fn segment_identify(user: &str, traits: Value) -> Value {
    json!({
        "type": "identify",
        "userId": user,
        "messageId": format!("{user}-identify"),
        "traits": traits,
        "timestamp": now_rfc3339(),
    })
}

/// A Segment batch body, `{"batch": items}`.
pub fn segment_batch(items: Vec<Value>) -> Value {
    json!({ "batch": items })
}

/// The HTTP status of a Segment batch of one track (user `u1`, number 1) sent to ingest's HTTP
/// API at `http` (`host:port`) with write key `key`; 0 when the request fails.
pub async fn post_segment_track(http: impl std::fmt::Display, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{http}/v1/batch"))
        .basic_auth(key, Some(""))
        .json(&segment_batch(vec![segment_track("u1", 1)]))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// One user per partition (of `partitions`): the `i`-th is the first `user-<n>` that falls in
/// partition `i`, so that load reaches every partition.
pub fn user_per_partition(partitions: u32) -> Vec<String> {
    (0..partitions)
        .map(|p| {
            (0..)
                .map(|i| format!("user-{i}"))
                .find(|u| partition_for(u, partitions) == p)
                .expect("some user falls in every partition")
        })
        .collect()
}

/// A track `Tick` of `user`, number `seq` of that user, from `source`, as ingest publishes it:
/// id `<source>:<user>-<seq>`, message id `<user>-<seq>`, routed to the user's partition (of
/// `partitions`), properties `{"seq": <seq>}`.
pub fn protobuf_track(source: &str, user: &str, seq: u64, partitions: u32) -> Event {
    Event {
        id: format!("{source}:{user}-{seq}"),
        message_id: format!("{user}-{seq}"),
        source_id: source.into(),
        r#type: EventType::Track as i32,
        name: "Tick".into(),
        user_id: user.into(),
        partition_key: user.into(),
        partition: partition_for(user, partitions),
        properties: format!("{{\"seq\":{seq}}}").into_bytes(),
        ..Default::default()
    }
}

/// Publishes `events` to their partitions' subjects of the events stream, each with its id as
/// the message id, pipelined (as ingest does), then awaits every acknowledgement. Returns how
/// many were published.
///
/// # Errors
///
/// When a publish or an acknowledgement fails.
pub async fn publish_as_ingest(
    js: &jetstream::Context,
    topology: &Topology,
    events: impl IntoIterator<Item = Event>,
) -> anyhow::Result<u64> {
    use prost::Message as _;
    let mut acks = Vec::new();
    for e in events {
        acks.push(
            js.send_publish(
                topology.events_subject(e.partition),
                jetstream::message::PublishMessage::build()
                    .payload(e.encode_to_vec().into())
                    .message_id(&e.id),
            )
            .await?,
        );
    }
    let n = acks.len() as u64;
    for ack in acks {
        ack.await?;
    }
    Ok(n)
}

/// A processed [`protobuf_track`] of `user` (number `seq`, partitioned over `partitions`) on
/// profile `profile`, as the processor would publish it, with no consent snapshot.
pub fn processed_track(user: &str, seq: u64, partitions: u32, profile: &str) -> ProcessedEvent {
    ProcessedEvent {
        event: Some(protobuf_track("src", user, seq, partitions)),
        profile_id: profile.into(),
        ..Default::default()
    }
}

/// Stores `processed` in the processed stream on its event's partition and waits for the
/// PubAck; returns its stream sequence. No message id: each call stores a new message.
///
/// # Errors
///
/// When the publish or its acknowledgement fails.
pub async fn publish_processed(
    js: &jetstream::Context,
    topology: &Topology,
    processed: &ProcessedEvent,
) -> anyhow::Result<u64> {
    use anyhow::Context as _;
    use prost::Message as _;
    let partition = processed.event.as_ref().map_or(0, |e| e.partition);
    let ack = js
        .publish(
            topology.processed_subject(partition),
            processed.encode_to_vec().into(),
        )
        .await?
        .await
        .context("the processed stream did not store the event")?;
    Ok(ack.sequence)
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{
        protobuf_track, segment_batch, segment_identify, segment_track, user_per_partition,
    };

    #[test]
    fn track_has_the_segment_shape() {
        let event = segment_track("u1", 7);
        assert_eq!(event["type"], "track");
        assert_eq!(event["event"], "Order Completed");
        assert_eq!(event["userId"], "u1");
        assert_eq!(event["messageId"], "u1-7");
        assert_eq!(event["properties"]["seq"], 7);
        assert!(event["properties"]["revenue"].is_f64());
        let timestamp = event["timestamp"].as_str().expect("timestamp string");
        chrono::DateTime::parse_from_rfc3339(timestamp).expect("RFC 3339 timestamp");
    }

    #[test]
    fn message_ids_differ_by_user_and_seq() {
        let ids =
            [("a", 1), ("a", 2), ("b", 1)].map(|(u, s)| segment_track(u, s)["messageId"].clone());
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2]);
    }

    #[test]
    fn identify_and_batch_wrap_items() {
        let identify = segment_identify("u2", json!({"plan": "pro"}));
        assert_eq!(identify["type"], "identify");
        assert_eq!(identify["traits"]["plan"], "pro");
        let batch = segment_batch(vec![segment_track("u2", 1), identify]);
        assert_eq!(batch["batch"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn one_user_per_partition_and_their_events_route_there() {
        let users = user_per_partition(16);
        assert_eq!(users.len(), 16);
        for (p, user) in users.iter().enumerate() {
            let e = protobuf_track("src", user, 3, 16);
            assert_eq!(e.partition, p as u32, "{user}");
            assert_eq!(e.id, format!("src:{user}-3"));
            assert_eq!(e.message_id, format!("{user}-3"));
            assert_eq!(e.properties, br#"{"seq":3}"#);
        }
    }
}
