//! Atomic batch publish for `atomic_publish` sources, against a real nats-server: bulk requests
//! are stored whole or not at all, and fall back to per-message publishing where the server
//! refuses the batch (a stored message id, its size cap, too many batches in flight).

use herald_testkit::ingest;
use std::collections::HashMap;

use async_nats::HeaderMap;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use herald_common::{CommonConfig, Topology};
use herald_ingest::IngestConfig;
use herald_ingest::{BATCH_ID_HEADER, BATCH_SEQUENCE_HEADER};
use herald_testkit::ingest::{Harness, WRITE_KEY, WRITE_SECRET};
use herald_testkit::ingest::{Running, metric};
use herald_testkit::{segment_batch, segment_track};
use serde_json::json;

fn atomic(_: &mut CommonConfig, cfg: &mut IngestConfig) {
    cfg.sources[0].atomic_publish = true;
}

/// Message id → how many stored events carry it.
fn counts(events: &[herald_proto::v1::Event]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for e in events {
        *counts.entry(e.message_id.clone()).or_default() += 1;
    }
    counts
}

fn batch_of(user: &str, seqs: std::ops::Range<usize>) -> serde_json::Value {
    segment_batch(seqs.map(|i| segment_track(user, i)).collect())
}

fn atomic_outcome(text: &str, outcome: &str) -> f64 {
    metric(
        text,
        &format!(r#"herald_ingest_atomic_batches_total{{outcome="{outcome}"}}"#),
    )
}

#[tokio::test]
async fn an_atomic_batch_is_stored_whole() {
    let metrics = herald_common::telemetry::metrics();
    let h = Harness::with(atomic).await;
    h.post_json("/v1/batch", &batch_of("u1", 0..5))
        .await
        .assert_success();
    // mParticle: one request of two batches is one atomic batch.
    let mp = json!([
        {"events": [
            {"event_type": "custom_event", "data": {"event_name": "A", "source_message_id": "mp-1", "custom_event_type": "other"}},
            {"event_type": "custom_event", "data": {"event_name": "B", "source_message_id": "mp-2", "custom_event_type": "other"}}
        ], "user_identities": {"customerid": "m1"}},
        {"events": [
            {"event_type": "custom_event", "data": {"event_name": "C", "source_message_id": "mp-3", "custom_event_type": "other"}}
        ], "user_identities": {"customerid": "m2"}}
    ]);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:{WRITE_SECRET}"))
    );
    let reply = h
        .send(
            Request::post("/v2/bulkevents")
                .header(header::AUTHORIZATION, auth)
                .body(mp.to_string().into())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    // A single event needs no batch.
    h.post_json("/v1/track", &segment_track("u2", 0))
        .await
        .assert_success();

    let stored = h.stored().await;
    let ids: Vec<&str> = stored.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "u1-0", "u1-1", "u1-2", "u1-3", "u1-4", "mp-1", "mp-2", "mp-3", "u2-0"
        ]
    );
    let text = metrics.render();
    assert_eq!(atomic_outcome(&text, "committed"), 2.0, "{text}");
    assert!(text.contains("# HELP herald_ingest_atomic_batches_total "));

    // The batch headers were on the stored messages: the server took them as one batch.
    let stream =
        h.js.get_stream(h.topology.events_stream())
            .await
            .expect("stream");
    let first = stream.get_raw_message(1).await.expect("message 1");
    let last = stream.get_raw_message(5).await.expect("message 5");
    let batch_of_msg = |m: &async_nats::jetstream::message::StreamMessage| {
        m.headers
            .get(BATCH_ID_HEADER)
            .map(|v| v.as_str().to_string())
    };
    assert!(batch_of_msg(&first).is_some(), "{:?}", first.headers);
    assert_eq!(batch_of_msg(&first), batch_of_msg(&last));
    assert_eq!(
        last.headers
            .get(BATCH_SEQUENCE_HEADER)
            .map(|v| v.as_str().to_string()),
        Some("5".into())
    );
}

#[tokio::test]
async fn an_atomic_batch_that_does_not_fit_stores_nothing() {
    let h = Harness::with(|common, cfg| {
        atomic(common, cfg);
        common.topology.events_max_bytes = 8 * 1024;
        cfg.sources.push(herald_ingest::SourceConfig {
            id: "plain".into(),
            write_key: herald_common::Secret(PLAIN_KEY.into()),
            ..Default::default()
        });
    })
    .await;
    let big = |prefix: &str| {
        let blob = "x".repeat(1024);
        let items = (0..12)
            .map(|i| {
                json!({"type": "track", "userId": "u1", "event": "Big",
                    "messageId": format!("{prefix}-{i}"), "properties": {"blob": blob}})
            })
            .collect();
        segment_batch(items).to_string()
    };
    let reply = h.post("/v1/batch", Some(WRITE_KEY), big("atomic")).await;
    reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "stream_full");
    assert!(
        h.stored().await.is_empty(),
        "all or nothing: no part of the batch is stored"
    );
    // Smaller batches still fit.
    h.post_json("/v1/batch", &batch_of("u1", 0..3))
        .await
        .assert_success();
    assert_eq!(h.stored().await.len(), 3);
    // The same batch from a source without atomic publish is stored in part.
    let reply = h.post("/v1/batch", Some(PLAIN_KEY), big("plain")).await;
    reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "stream_full");
    let stored = h.stored().await;
    assert!(stored.len() > 3, "{} stored", stored.len());
    assert!(stored.iter().all(|e| !e.message_id.starts_with("atomic-")));
}

const PLAIN_KEY: &str = "plain-write-key";

#[tokio::test]
async fn a_batch_holding_a_stored_message_id_falls_back_and_stores_the_rest_once() {
    let metrics = herald_common::telemetry::metrics();
    let h = Harness::with(atomic).await;
    h.post_json("/v1/track", &segment_track("u1", 1))
        .await
        .assert_success();
    // u1-1 is stored already: the server refuses the atomic batch; the events go one by one.
    h.post_json("/v1/batch", &batch_of("u1", 0..4))
        .await
        .assert_success();
    // A batch naming one message twice is never sent as an atomic batch.
    let twice = segment_batch(vec![segment_track("u2", 0), segment_track("u2", 0)]);
    h.post_json("/v1/batch", &twice).await.assert_success();

    let stored = h.stored().await;
    let counts = counts(&stored);
    for id in ["u1-0", "u1-1", "u1-2", "u1-3", "u2-0"] {
        assert_eq!(counts.get(id), Some(&1), "{id} stored once: {counts:?}");
    }
    assert_eq!(stored.len(), 5);
    let text = metrics.render();
    assert_eq!(atomic_outcome(&text, "duplicate_id"), 2.0, "{text}");
    assert_eq!(atomic_outcome(&text, "committed"), 0.0, "{text}");
    assert_eq!(
        metric(
            &text,
            r#"herald_ingest_dedupe_hits_total{layer="jetstream"}"#
        ),
        2.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_retried_atomic_batch_yields_no_duplicates() {
    let metrics = herald_common::telemetry::metrics();
    let h = Harness::with(atomic).await;
    let body = batch_of("u1", 0..4);
    for _ in 0..3 {
        h.post_json("/v1/batch", &body).await.assert_success();
    }
    let stored = h.stored().await;
    let ids: Vec<&str> = stored.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids, ["u1-0", "u1-1", "u1-2", "u1-3"]);
    let text = metrics.render();
    assert_eq!(atomic_outcome(&text, "committed"), 1.0, "{text}");
    assert_eq!(atomic_outcome(&text, "duplicate_id"), 2.0, "{text}");
    assert_eq!(
        metric(
            &text,
            r#"herald_ingest_dedupe_hits_total{layer="jetstream"}"#
        ),
        8.0,
        "{text}"
    );
}

#[tokio::test]
async fn batches_above_the_cap_fall_back() {
    let metrics = herald_common::telemetry::metrics();
    // The server's cap, lowered to 5 messages: a batch of 6 is refused and goes per message.
    let h =
        Harness::with_server_config("jetstream { limits { batch { max_msgs: 5 } } }", atomic).await;
    h.post_json("/v1/batch", &batch_of("u1", 0..6))
        .await
        .assert_success();
    h.post_json("/v1/batch", &batch_of("u2", 0..5))
        .await
        .assert_success();
    let text = metrics.render();
    assert_eq!(atomic_outcome(&text, "too_large"), 1.0, "{text}");
    assert_eq!(atomic_outcome(&text, "committed"), 1.0, "{text}");

    // Herald's own cap (the server's default, 1000) is not even tried.
    let big = batch_of("u3", 0..1001);
    h.post_json("/v1/batch", &big).await.assert_success();
    let text = metrics.render();
    assert_eq!(atomic_outcome(&text, "too_large"), 2.0, "{text}");
    let counts = counts(&h.stored().await);
    assert_eq!(counts.len(), 6 + 5 + 1001);
    assert!(counts.values().all(|n| *n == 1), "each event once");
}

#[tokio::test]
async fn too_many_batches_in_flight_fall_back() {
    let metrics = herald_common::telemetry::metrics();
    let h = Harness::with_server_config(
        "jetstream { limits { batch { max_inflight_per_stream: 1 } } }",
        atomic,
    )
    .await;
    // Another producer holds the stream's only in-flight batch open.
    let client = h.nats.client().await;
    let mut headers = HeaderMap::new();
    headers.insert(BATCH_ID_HEADER, "held-open");
    headers.insert(BATCH_SEQUENCE_HEADER, "1");
    let started = client
        .request_with_headers(h.topology.events_subject(0), headers, "x".into())
        .await
        .expect("the server answers the batch start");
    assert!(started.payload.is_empty(), "{:?}", started.payload);

    h.post_json("/v1/batch", &batch_of("u1", 0..3))
        .await
        .assert_success();
    let ids: Vec<String> = h.stored().await.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids, ["u1-0", "u1-1", "u1-2"]);
    let text = metrics.render();
    assert_eq!(atomic_outcome(&text, "too_many_in_flight"), 1.0, "{text}");
}

#[tokio::test]
async fn a_nats_intake_batch_is_stored_atomically() {
    let ingest = Running::start(atomic).await;
    let payload = batch_of("u1", 0..3).to_string();
    ingest
        .publish_intake(ingest::SOURCE, &[], payload.clone())
        .await;
    ingest.wait_intake_drained().await;
    // Published again: refused as a batch (its ids are stored), stored once per message.
    ingest.publish_intake(ingest::SOURCE, &[], payload).await;
    ingest.wait_intake_drained().await;
    let ids: Vec<String> = ingest
        .wait_events(3)
        .await
        .into_iter()
        .map(|e| e.message_id)
        .collect();
    assert_eq!(ids, ["u1-0", "u1-1", "u1-2"]);
    let text = ingest.metrics().await;
    assert_eq!(atomic_outcome(&text, "committed"), 1.0, "{text}");
    assert_eq!(atomic_outcome(&text, "duplicate_id"), 1.0, "{text}");
}

#[test]
fn the_events_stream_allows_atomic_publish() {
    let t = Topology::new(Default::default());
    assert!(t.events_stream_config().allow_atomic_publish);
}

/// Production runs the events stream with three replicas: the batch protocol and the refusal
/// that triggers the fallback are the same there.
#[tokio::test]
async fn atomic_batches_on_a_three_node_cluster() {
    let metrics = herald_common::telemetry::metrics();
    let cluster = herald_testkit::NatsCluster::start(3)
        .await
        .expect("cluster starts");
    let topology = Topology::new(herald_common::TopologyConfig {
        partitions: 4,
        replicas: 3,
        ..Default::default()
    });
    let client = cluster.client().await;
    let js = async_nats::jetstream::new(client.clone());
    herald_common::nats::ensure_stream(&js, topology.events_stream_config())
        .await
        .expect("R3 events stream");
    let mut stream = js.get_stream(topology.events_stream()).await.unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("test-reader".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let publisher =
        herald_ingest::Publisher::new(client, js, topology, std::time::Duration::from_secs(10));
    let events: Vec<herald_proto::v1::Event> = (0..5u32)
        .map(|i| herald_proto::v1::Event {
            id: format!("svc:e-{i}"),
            message_id: format!("e-{i}"),
            partition: i % 4,
            ..Default::default()
        })
        .collect();
    // The stream's subjects reach the node the client is connected to shortly after the
    // stream exists; until then a publish finds no responders (and stores nothing).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let first = loop {
        match publisher.publish_atomic(&events).await {
            Err(e)
                if format!("{e:?}").contains("no responders")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            r => break r.expect("stored"),
        }
    };
    assert_eq!((first.acked, first.duplicates), (5, 0));
    let again = publisher.publish_atomic(&events).await.expect("stored");
    assert_eq!((again.acked, again.duplicates), (5, 5));
    assert_eq!(stream.info().await.unwrap().state.messages, 5);
    let text = metrics.render();
    assert_eq!(atomic_outcome(&text, "committed"), 1.0, "{text}");
    assert_eq!(atomic_outcome(&text, "duplicate_id"), 1.0, "{text}");
}
