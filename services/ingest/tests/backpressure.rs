//! When JetStream cannot take events, ingest says so at once with a retryable status, never 2xx.

use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use herald_testkit::ingest::Harness;
use herald_testkit::{segment_batch, segment_track};
use serde_json::json;
use tokio::time::timeout;

#[tokio::test]
async fn nats_down_answers_503_quickly_and_recovers_after_restart() {
    let mut h = Harness::start().await;
    let body = segment_batch(vec![segment_track("u1", 1)]);
    h.post_json("/v1/batch", &body).await.assert_success();

    h.nats.stop().await;
    let started = Instant::now();
    let down = h
        .post_json("/v1/batch", &segment_batch(vec![segment_track("u1", 2)]))
        .await;
    let elapsed = started.elapsed();
    down.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert_eq!(down.headers[header::RETRY_AFTER], "1");
    assert_eq!(
        down.json()["message"],
        "event store unavailable; retry later"
    );
    assert!(
        elapsed < Duration::from_secs(1),
        "503 took {elapsed:?}: it must not wait for a publish timeout"
    );
    // Still down: still immediate.
    let started = Instant::now();
    h.post_json("/v1/track", &segment_track("u1", 3))
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(started.elapsed() < Duration::from_secs(1));

    h.nats.restart().await.expect("nats-server restarts");
    let retried = segment_batch(vec![segment_track("u1", 2)]);
    let recovered = timeout(Duration::from_secs(20), async {
        loop {
            let reply = h.post_json("/v1/batch", &retried).await;
            if reply.status == StatusCode::OK {
                return reply;
            }
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("ingest accepts events again within 20 s of the restart");
    recovered.assert_success();
    let ids: Vec<String> = h.stored().await.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids, ["u1-1", "u1-2"]);
}

#[tokio::test]
async fn a_full_stream_answers_429_with_retry_after() {
    let h = Harness::with(|common, _| common.topology.events_max_bytes = 64 * 1024).await;
    let blob = "x".repeat(4 * 1024);
    let mut accepted = 0;
    let mut full = None;
    for request in 0..64 {
        let items = (0..4)
            .map(|i| {
                json!({"type": "track", "userId": format!("u{i}"), "event": "Filled",
                    "messageId": format!("fill-{request}-{i}"), "properties": {"blob": blob}})
            })
            .collect();
        let reply = h.post_json("/v1/batch", &segment_batch(items)).await;
        if reply.status == StatusCode::OK {
            accepted += 1;
            continue;
        }
        full = Some(reply);
        break;
    }
    let full = full.expect("the 64 KiB stream fills up within 1 MiB of events");
    assert!(accepted > 0, "the stream took events before it was full");
    full.assert_error(StatusCode::TOO_MANY_REQUESTS, "stream_full");
    assert_eq!(full.headers[header::RETRY_AFTER], "1");
    // DiscardNew: nothing accepted was evicted.
    let stored = h.stored().await;
    assert!(stored.len() >= accepted * 4, "{} stored", stored.len());
    for request in 0..accepted {
        for i in 0..4 {
            let id = format!("fill-{request}-{i}");
            assert!(stored.iter().any(|e| e.message_id == id), "{id} kept");
        }
    }
}
