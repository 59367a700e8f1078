//! The Segment HTTP API against a real nats-server: deduplication, authentication, validation
//! and limits.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use common::{DISABLED_KEY, Harness, WRITE_KEY, basic};
use herald_proto::v1::EventType;
use herald_testkit::{segment_batch, segment_track};
use serde_json::json;

#[tokio::test]
async fn a_retried_batch_is_stored_once() {
    let h = Harness::start().await;
    let body = segment_batch((0..5).map(|i| segment_track("u1", i)).collect());
    h.post_json("/v1/batch", &body).await.assert_success();
    h.post_json("/v1/batch", &body).await.assert_success();
    let stored = h.stored().await;
    assert_eq!(stored.len(), 5, "the retry added nothing");
    let ids: Vec<&str> = stored.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids, ["u1-0", "u1-1", "u1-2", "u1-3", "u1-4"]);
}

#[tokio::test]
async fn a_retry_without_message_ids_is_stored_once() {
    let h = Harness::start().await;
    let item = json!({"type": "track", "userId": "u1", "event": "Clicked",
        "timestamp": "2024-05-01T12:00:00.000Z"});
    // The SDK retries with a new sentAt; the derived id ignores it.
    let first = json!({"batch": [item], "sentAt": "2024-05-01T12:00:01.000Z"});
    let retry = json!({"batch": [item], "sentAt": "2024-05-01T12:00:31.000Z"});
    h.post_json("/v1/batch", &first).await.assert_success();
    h.post_json("/v1/batch", &retry).await.assert_success();
    let stored = h.stored().await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].message_id.len(), 32);
    assert_eq!(stored[0].id, format!("acceptance:{}", stored[0].message_id));
}

#[tokio::test]
async fn write_keys_are_checked() {
    let h = Harness::start().await;
    let body = segment_batch(vec![segment_track("u1", 1)]);

    let wrong = h
        .post("/v1/batch", Some("not-a-key"), body.to_string())
        .await;
    wrong.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let missing = h.post("/v1/batch", None, body.to_string()).await;
    missing.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let malformed = h
        .send(
            Request::post("/v1/track")
                .header(header::AUTHORIZATION, "Basic %%%")
                .body(Body::from(segment_track("u1", 1).to_string()))
                .unwrap(),
        )
        .await;
    malformed.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let disabled = h
        .post("/v1/batch", Some(DISABLED_KEY), body.to_string())
        .await;
    disabled.assert_error(StatusCode::FORBIDDEN, "source_disabled");
    // A wrong header key is not rescued by a right body key.
    let mut with_key = body.clone();
    with_key["writeKey"] = json!(WRITE_KEY);
    h.post("/v1/batch", Some("not-a-key"), with_key.to_string())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(h.stored().await.is_empty());

    // The key in the body, as analytics-python also sends it; any Content-Type.
    let reply = h
        .send(
            Request::post("/v1/batch")
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from(with_key.to_string()))
                .unwrap(),
        )
        .await;
    reply.assert_success();
    // A password after the key is ignored.
    let reply = h
        .send(
            Request::post("/v1/track")
                .header(
                    header::AUTHORIZATION,
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("{WRITE_KEY}:whatever"))
                    ),
                )
                .body(Body::from(segment_track("u1", 2).to_string()))
                .unwrap(),
        )
        .await;
    reply.assert_success();
    assert_eq!(h.stored().await.len(), 2);
}

#[tokio::test]
async fn malformed_bodies_are_refused() {
    let h = Harness::start().await;
    h.post("/v1/batch", Some(WRITE_KEY), "{\"batch\": [")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    h.post("/v1/track", Some(WRITE_KEY), "not json")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    h.post_json("/v1/batch", &json!({"events": []}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_batch");
    h.post_json("/v1/batch", &json!({"batch": {"type": "track"}}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_batch");
    // gzip is not decoded yet: say so rather than failing to parse.
    let gz = h
        .send(
            Request::post("/v1/batch")
                .header(header::AUTHORIZATION, basic(WRITE_KEY))
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from(vec![0x1f, 0x8b, 0x08]))
                .unwrap(),
        )
        .await;
    gz.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding");
    assert!(h.stored().await.is_empty());
}

#[tokio::test]
async fn an_invalid_single_event_is_refused_with_its_reason() {
    let h = Harness::start().await;
    let cases = [
        ("/v1/track", json!({"userId": "u1"}), "missing_event"),
        ("/v1/track", json!({"event": "E"}), "missing_identity"),
        ("/v1/group", json!({"userId": "u1"}), "missing_group_id"),
        ("/v1/alias", json!({"userId": "u1"}), "missing_previous_id"),
        (
            "/v1/alias",
            json!({"anonymousId": "a", "previousId": "p"}),
            "missing_user_id",
        ),
        (
            "/v1/identify",
            json!({"userId": "u1", "timestamp": "someday"}),
            "invalid_timestamp",
        ),
        (
            "/v1/page",
            json!({"userId": "u1", "properties": "x"}),
            "invalid_field",
        ),
    ];
    for (path, body, kind) in cases {
        h.post_json(path, &body)
            .await
            .assert_error(StatusCode::BAD_REQUEST, kind);
    }
    assert!(h.stored().await.is_empty());
}

#[tokio::test]
async fn a_batch_keeps_its_valid_events_and_skips_invalid_ones() {
    let h = Harness::start().await;
    let body = json!({"batch": [
        segment_track("u1", 1),
        {"type": "track", "userId": "u1", "messageId": "no-event-name"},
        {"type": "teleport", "userId": "u1", "messageId": "bad-type"},
        "not an object",
        {"type": "identify", "anonymousId": "a1", "messageId": "ok-identify", "traits": {"plan": "pro"}},
    ]});
    h.post_json("/v1/batch", &body).await.assert_success();
    let stored = h.stored().await;
    let ids: Vec<&str> = stored.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids, ["u1-1", "ok-identify"]);
    assert_eq!(stored[1].r#type(), EventType::Identify);
    assert_eq!(stored[1].partition_key, "a1");
}

#[tokio::test]
async fn limits_are_enforced_with_a_reason() {
    let h = Harness::with(|_, cfg| {
        cfg.max_batch_events = 3;
        cfg.max_request_bytes = 4 * 1024;
        cfg.max_event_bytes = 1024;
    })
    .await;
    let too_many = segment_batch((0..4).map(|i| segment_track("u1", i)).collect());
    h.post_json("/v1/batch", &too_many)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "too_many_events");

    let big = json!({"batch": [{"type": "track", "userId": "u1", "event": "E",
        "properties": {"blob": "x".repeat(5 * 1024)}}]});
    h.post_json("/v1/batch", &big)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
    // Without Content-Length (a streamed body) the limit holds too.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big.to_string())];
    let streamed = h
        .send(
            Request::post("/v1/batch")
                .header(header::AUTHORIZATION, basic(WRITE_KEY))
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
                .unwrap(),
        )
        .await;
    streamed.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");

    let large_event = json!({"type": "track", "userId": "u1", "event": "E",
        "properties": {"blob": "x".repeat(2 * 1024)}});
    h.post_json("/v1/track", &large_event)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "event_too_large");
    assert!(h.stored().await.is_empty());
}

#[tokio::test]
async fn an_empty_batch_is_accepted() {
    let h = Harness::start().await;
    h.post_json("/v1/batch", &json!({"batch": []}))
        .await
        .assert_success();
    assert!(h.stored().await.is_empty());
}
