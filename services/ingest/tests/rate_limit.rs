//! Per-source rate limits through the real router: events over the limit get 429 with
//! `Retry-After` and a readable reason (mParticle's error shape on `/v2/*`), and are counted.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use herald_common::Secret;
use herald_ingest::SourceConfig;
use herald_testkit::ingest::{Harness, Reply, WRITE_KEY, WRITE_SECRET};
use herald_testkit::{segment_batch, segment_track};
use serde_json::json;

const FREE_KEY: &str = "unlimited-write-key";

/// The acceptance source may send 3 events, then one per 100 seconds; `free` has no limit.
async fn harness() -> Harness {
    Harness::with(|_, cfg| {
        cfg.sources[0].rate_limit_per_second = 0.01;
        cfg.sources[0].rate_limit_burst = 3;
        cfg.sources.push(SourceConfig {
            id: "free".into(),
            write_key: Secret(FREE_KEY.into()),
            ..Default::default()
        });
    })
    .await
}

fn assert_limited(reply: &Reply, retry_after: &str) {
    reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(reply.headers[header::RETRY_AFTER], retry_after);
    let message = reply.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("source acceptance is over its rate limit of 0.01 events per second"),
        "{message}"
    );
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn events_over_the_limit_get_429_with_retry_after() {
    let metrics = herald_common::telemetry::metrics();
    let h = harness().await;
    let batch = |seqs: std::ops::Range<usize>| {
        segment_batch(seqs.map(|i| segment_track("u1", i)).collect())
    };
    // Events count, not requests: 2 of the 3 tokens.
    h.post_json("/v1/batch", &batch(0..2))
        .await
        .assert_success();
    // 2 more do not fit in the 1 left; the next token comes in 100 s, the second in 200 s.
    let over = h.post_json("/v1/batch", &batch(2..4)).await;
    assert_limited(&over, "100");
    assert!(
        over.json()["message"]
            .as_str()
            .unwrap()
            .contains("this request of 2 event(s) fits in 100 s"),
        "{over:?}"
    );
    // A single event still fits; then the bucket is empty.
    h.post_json("/v1/track", &segment_track("u1", 9))
        .await
        .assert_success();
    let empty = h.post_json("/v1/track", &segment_track("u1", 10)).await;
    assert_limited(&empty, "100");
    // The write key in the body instead of the header: the same bucket.
    let mut in_body = batch(11..12);
    in_body["writeKey"] = json!(WRITE_KEY);
    let reply = h.post("/v1/batch", None, in_body.to_string()).await;
    assert_limited(&reply, "100");

    // mParticle: the same source, the mParticle error shape.
    let mp = json!({"events": [{"event_type": "custom_event",
        "data": {"event_name": "E", "source_message_id": "m1", "custom_event_type": "other"}}],
        "user_identities": {"customerid": "u1"}});
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:{WRITE_SECRET}"))
    );
    let reply = h
        .send(
            Request::post("/v2/events")
                .header(header::AUTHORIZATION, auth)
                .body(Body::from(mp.to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{reply:?}");
    assert_eq!(reply.headers[header::RETRY_AFTER], "100");
    let body = reply.json();
    assert_eq!(body["errors"][0]["code"], "TOO_MANY_REQUESTS", "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("over its rate limit"),
        "{body}"
    );

    // Another source has its own (absent) limit.
    h.post("/v1/batch", Some(FREE_KEY), batch(0..50).to_string())
        .await
        .assert_success();

    let ids: Vec<String> = h
        .stored()
        .await
        .into_iter()
        .filter(|e| e.source_id == "acceptance")
        .map(|e| e.message_id)
        .collect();
    assert_eq!(ids, ["u1-0", "u1-1", "u1-9"]);

    let text = metrics.render();
    // Events refused after parsing are counted; requests refused before their body was read
    // (the bucket was empty) count as requests.
    assert_eq!(
        value(
            &text,
            r#"herald_ingest_events_rejected_total{reason="rate_limited"}"#
        ),
        3.0,
        "{text}"
    );
    for (route, n) in [("/v1/batch", 2.0), ("/v1/track", 1.0), ("/v2/events", 1.0)] {
        assert_eq!(
            value(
                &text,
                &format!(
                    r#"herald_ingest_requests_rejected_total{{route="{route}",reason="rate_limited"}}"#
                )
            ),
            n,
            "{route}:\n{text}"
        );
    }
    assert_eq!(
        value(
            &text,
            r#"herald_ingest_requests_total{route="/v1/batch",status="429"}"#
        ),
        2.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_batch_larger_than_the_burst_is_taken_when_the_bucket_is_full() {
    let h = harness().await;
    let big = segment_batch((0..10).map(|i| segment_track("u1", i)).collect());
    h.post_json("/v1/batch", &big).await.assert_success();
    // The bucket is 7 events in debt: the next event fits in 800 s.
    let reply = h.post_json("/v1/track", &segment_track("u2", 0)).await;
    assert_limited(&reply, "800");
    assert_eq!(h.stored().await.len(), 10);
}
