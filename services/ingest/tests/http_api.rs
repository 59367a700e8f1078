//! The Segment HTTP API against a real nats-server: deduplication, authentication, validation,
//! limits, encodings, CORS and analytics.js's short paths.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use bytes::Bytes;
use herald_proto::v1::EventType;
use herald_testkit::ingest::{DISABLED_KEY, Harness, WRITE_KEY, basic, gzip};
use herald_testkit::{segment_batch, segment_track};
use serde_json::{Value, json};

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
    // A truncated gzip body is a bad body, not a server error.
    let gz = h
        .send(
            Request::post("/v1/batch")
                .header(header::AUTHORIZATION, basic(WRITE_KEY))
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from(vec![0x1f, 0x8b, 0x08]))
                .unwrap(),
        )
        .await;
    gz.assert_error(StatusCode::BAD_REQUEST, "invalid_body");
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

/// A body that records whether anyone read it.
fn watched_body(body: String) -> (Body, Arc<AtomicBool>) {
    let read = Arc::new(AtomicBool::new(false));
    let flag = read.clone();
    let stream = futures_util::stream::once(async move {
        flag.store(true, Ordering::SeqCst);
        Ok::<Bytes, std::io::Error>(Bytes::from(body))
    });
    (Body::from_stream(stream), read)
}

#[tokio::test]
async fn a_wrong_header_key_is_refused_before_the_body_is_read() {
    let h = Harness::start().await;
    let (body, read) = watched_body(segment_batch(vec![segment_track("u1", 1)]).to_string());
    h.send(
        Request::post("/v1/batch")
            .header(header::AUTHORIZATION, basic("not-a-key"))
            .body(body)
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(!read.load(Ordering::SeqCst), "the body was read");
    // An unknown encoding is refused before reading, too.
    let (body, read) = watched_body("{}".into());
    h.send(
        Request::post("/v1/track")
            .header(header::AUTHORIZATION, basic(WRITE_KEY))
            .header(header::CONTENT_ENCODING, "br")
            .body(body)
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding");
    assert!(!read.load(Ordering::SeqCst), "the body was read");
    // With the right key, the same kind of body is read and stored.
    let (body, read) = watched_body(segment_batch(vec![segment_track("u1", 1)]).to_string());
    h.send(
        Request::post("/v1/batch")
            .header(header::AUTHORIZATION, basic(WRITE_KEY))
            .body(body)
            .unwrap(),
    )
    .await
    .assert_success();
    assert!(read.load(Ordering::SeqCst));
    assert_eq!(h.stored().await.len(), 1);
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn gzip_and_deflate_work_on_every_path_and_unknown_encodings_get_415() {
    let h = Harness::start().await;
    let mut n = 0;
    let mut expected = Vec::new();
    let mut paths: Vec<&str> = vec!["/v1/batch", "/v1/track", "/v1/t"];
    paths.extend([
        "/v1/identify",
        "/v1/page",
        "/v1/screen",
        "/v1/group",
        "/v1/alias",
    ]);
    for path in paths {
        for (encoding, encode) in [
            ("gzip", gzip as fn(&[u8]) -> Vec<u8>),
            ("deflate", deflate),
            ("x-gzip", gzip),
        ] {
            n += 1;
            let id = format!("enc-{n}");
            let mut item = json!({"userId": "u1", "event": "E", "messageId": id,
                "groupId": "g1", "previousId": "p1"});
            let body = if path == "/v1/batch" {
                item["type"] = json!("track");
                json!({"batch": [item]})
            } else {
                item
            };
            h.send(
                Request::post(path)
                    .header(header::AUTHORIZATION, basic(WRITE_KEY))
                    // RudderStack's Node SDK labels gzipped JSON as a form.
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .header(header::CONTENT_ENCODING, encoding)
                    .body(Body::from(encode(body.to_string().as_bytes())))
                    .unwrap(),
            )
            .await
            .assert_success();
            expected.push(id);
        }
    }
    for encoding in ["br", "zstd", "compress", "gzip, deflate"] {
        h.send(
            Request::post("/v1/batch")
                .header(header::AUTHORIZATION, basic(WRITE_KEY))
                .header(header::CONTENT_ENCODING, encoding)
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding");
    }
    let ids: Vec<String> = h.stored().await.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn a_gzip_bomb_gets_413_and_ingest_stays_fine() {
    let h = Harness::start().await;
    let bomb = gzip(&vec![0u8; 10 * 1024 * 1024]);
    assert!(
        bomb.len() < 500 * 1024,
        "the bomb itself is under the wire limit"
    );
    for path in ["/v1/batch", "/v1/track"] {
        h.send(
            Request::post(path)
                .header(header::AUTHORIZATION, basic(WRITE_KEY))
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from(bomb.clone()))
                .unwrap(),
        )
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
    }
    // Just over the decoded limit, as real JSON: also 413.
    let big = json!({"batch": [{"type": "track", "userId": "u1", "event": "E",
        "properties": {"blob": "x".repeat(500 * 1024)}}]});
    h.send(
        Request::post("/v1/batch")
            .header(header::AUTHORIZATION, basic(WRITE_KEY))
            .header(header::CONTENT_ENCODING, "gzip")
            .body(Body::from(gzip(big.to_string().as_bytes())))
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
    h.post_json("/v1/batch", &segment_batch(vec![segment_track("u1", 1)]))
        .await
        .assert_success();
    assert_eq!(h.stored().await.len(), 1);
}

#[tokio::test]
async fn default_limits_have_their_reasons() {
    let h = Harness::start().await;
    // Nesting deeper than 64 levels: 400, in a batch or a single call.
    let mut deep = json!(1);
    for _ in 0..70 {
        deep = json!([deep]);
    }
    h.post_json(
        "/v1/batch",
        &json!({"batch": [{"type": "track", "userId": "u", "event": "E", "properties": {"d": deep}}]}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "too_deep");
    h.post_json(
        "/v1/track",
        &json!({"userId": "u", "event": "E", "properties": {"d": deep}}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "too_deep");
    // 64 levels in all are fine.
    let mut ok = json!(1);
    for _ in 0..62 {
        ok = json!([ok]);
    }
    h.post_json(
        "/v1/track",
        &json!({"userId": "u", "event": "E", "properties": {"d": ok}}),
    )
    .await
    .assert_success();

    // One event over 32 KB: 413 alone, skipped in a batch.
    let fat = json!({"userId": "u", "event": "E", "messageId": "fat",
        "properties": {"blob": "x".repeat(33 * 1024)}});
    h.post_json("/v1/track", &fat)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "event_too_large");
    let mut fat_item = fat.clone();
    fat_item["type"] = json!("track");
    h.post_json(
        "/v1/batch",
        &json!({"batch": [fat_item, segment_track("u", 1)]}),
    )
    .await
    .assert_success();

    // A request over 500 KB: 413.
    let items: Vec<Value> = (0..20)
        .map(|i| {
            json!({"type": "track", "userId": "u", "event": "E", "messageId": format!("big-{i}"),
            "properties": {"blob": "x".repeat(30 * 1024)}})
        })
        .collect();
    h.post_json("/v1/batch", &segment_batch(items))
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");

    // More than 2,500 events: 400.
    let many: Vec<Value> = (0..2501)
        .map(|i| json!({"type": "track", "userId": "u", "event": "E", "messageId": format!("{i}")}))
        .collect();
    h.post_json("/v1/batch", &segment_batch(many))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "too_many_events");

    // A messageId over 100 characters: 400 alone, skipped in a batch.
    let long_id = json!({"userId": "u", "event": "E", "messageId": "m".repeat(101)});
    h.post_json("/v1/track", &long_id)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "message_id_too_long");
    let mut long_item = long_id.clone();
    long_item["type"] = json!("track");
    h.post_json(
        "/v1/batch",
        &json!({"batch": [long_item, segment_track("u", 2)]}),
    )
    .await
    .assert_success();

    // Fields of the wrong type: 400 alone, skipped in a batch.
    for bad in [
        json!({"userId": {"id": 1}, "event": "E"}),
        json!({"userId": "u", "event": ["E"]}),
        json!({"userId": "u", "event": "E", "traits": "x"}),
        json!({"userId": "u", "event": "E", "timestamp": 17}),
    ] {
        let reply = h.post_json("/v1/track", &bad).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    h.post_json(
        "/v1/batch",
        &json!({"batch": [{"type": ["track"], "userId": "u", "event": "E"}, segment_track("u", 3)]}),
    )
    .await
    .assert_success();

    let ids: Vec<String> = h.stored().await.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(&ids[1..], ["u-1", "u-2", "u-3"]);
}

#[tokio::test]
async fn analytics_js_short_paths_take_text_plain_bodies_with_a_write_key() {
    let h = Harness::start().await;
    let cases = [
        ("/v1/t", EventType::Track, json!({"event": "Clicked"})),
        ("/v1/p", EventType::Page, json!({"name": "Home"})),
        (
            "/v1/i",
            EventType::Identify,
            json!({"traits": {"plan": "pro"}}),
        ),
        ("/v1/g", EventType::Group, json!({"groupId": "g1"})),
        ("/v1/a", EventType::Alias, json!({"previousId": "anon-1"})),
        ("/v1/s", EventType::Screen, json!({"name": "Cart"})),
    ];
    for (i, (path, _, fields)) in cases.iter().enumerate() {
        let mut body = fields.clone();
        body["userId"] = json!("u1");
        body["anonymousId"] = json!("anon-1");
        body["messageId"] = json!(format!("short-{i}"));
        body["writeKey"] = json!(WRITE_KEY);
        body["sentAt"] = json!("2024-05-01T12:00:01.000Z");
        body["timestamp"] = json!("2024-05-01T12:00:00.000Z");
        h.send(
            Request::post(*path)
                .header(header::CONTENT_TYPE, "text/plain;charset=UTF-8")
                .header(header::ORIGIN, "https://shop.example.com")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
        .assert_success();
    }
    // Without the key, in neither place: 401.
    h.send(
        Request::post("/v1/t")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(
                json!({"userId": "u1", "event": "E"}).to_string(),
            ))
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let stored = h.stored().await;
    assert_eq!(stored.len(), cases.len());
    for (e, (path, ty, _)) in stored.iter().zip(cases) {
        assert_eq!(e.r#type(), ty, "{path}");
        // All four times are kept: the skew-corrected timestamp is received_at - 1 s.
        let (orig, sent) = (e.original_timestamp.unwrap(), e.sent_at.unwrap());
        let (recv, ts) = (e.received_at.unwrap(), e.timestamp.unwrap());
        assert_eq!(
            (sent.seconds - orig.seconds, sent.nanos - orig.nanos),
            (1, 0)
        );
        assert_eq!((recv.seconds - ts.seconds, recv.nanos - ts.nanos), (1, 0));
    }
    assert_eq!(stored[1].name, "Home");
    assert_eq!(stored[3].group_id, "g1");
    assert_eq!(stored[4].previous_id, "anon-1");
}

#[tokio::test]
async fn cors_allows_any_origin_by_default() {
    let h = Harness::start().await;
    for path in ["/v1/t", "/v1/batch", "/v2/events"] {
        let reply = h
            .send(
                Request::options(path)
                    .header(header::ORIGIN, "https://shop.example.com")
                    .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                    .header(
                        header::ACCESS_CONTROL_REQUEST_HEADERS,
                        "authorization,content-type,content-encoding",
                    )
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        let methods = reply.headers[header::ACCESS_CONTROL_ALLOW_METHODS]
            .to_str()
            .unwrap();
        assert!(methods.contains("POST"), "{methods}");
        assert_eq!(
            reply.headers[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization,content-type,content-encoding"
        );
        assert!(reply.headers.contains_key(header::ACCESS_CONTROL_MAX_AGE));
    }
    let reply = h
        .send(
            Request::post("/v1/track")
                .header(header::ORIGIN, "https://shop.example.com")
                .header(header::AUTHORIZATION, basic(WRITE_KEY))
                .body(Body::from(segment_track("u1", 1).to_string()))
                .unwrap(),
        )
        .await;
    reply.assert_success();
    assert_eq!(reply.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    // Errors carry the header too, so the page can read why.
    let reply = h
        .send(
            Request::post("/v1/track")
                .header(header::ORIGIN, "https://shop.example.com")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let h = Harness::with(|_, cfg| {
        cfg.cors_allowed_origins = vec![
            "https://shop.example.com".into(),
            "https://admin.example.com".into(),
        ];
    })
    .await;
    let preflight = |origin: &'static str| {
        Request::options("/v1/t")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .body(Body::empty())
            .unwrap()
    };
    let allowed = h.send(preflight("https://admin.example.com")).await;
    assert_eq!(
        allowed.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://admin.example.com"
    );
    let vary = allowed.headers.get_all(header::VARY);
    assert!(
        vary.iter().any(|v| v.to_str().unwrap().contains("origin")),
        "{vary:?}"
    );
    let denied = h.send(preflight("https://evil.example.net")).await;
    assert!(
        !denied
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
    );
    // A server-side client without Origin is unaffected.
    h.post_json("/v1/track", &segment_track("u1", 1))
        .await
        .assert_success();
}

#[tokio::test]
async fn unknown_paths_and_methods_never_redirect() {
    let h = Harness::start().await;
    for (method, path, status) in [
        ("POST", "/v1/nope", StatusCode::NOT_FOUND),
        ("POST", "/v1/track/", StatusCode::NOT_FOUND),
        ("GET", "/v1/batch", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/v2/events", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let reply = h
            .send(
                Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(reply.status, status, "{method} {path}");
    }
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let h = Harness::start().await;
    let reply = h
        .send(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    let doc = reply.json();
    assert_eq!(doc["openapi"], "3.0.3");
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.json"
        ))
        .expect("docs/openapi.json"),
    )
    .unwrap();
    assert_eq!(doc, committed, "served = committed");
    let mut routes: Vec<&str> = herald_ingest::SEGMENT_SINGLE_ROUTES
        .iter()
        .map(|(r, _)| *r)
        .collect();
    routes.extend([
        "/v1/batch",
        "/v2/events",
        "/v2/bulkevents",
        "/v2/bulkevents/historical",
    ]);
    let paths = doc["paths"].as_object().unwrap();
    for route in &routes {
        let op = &paths[*route]["post"];
        assert!(op.is_object(), "{route} documented");
        let ok = if route.starts_with("/v2/") {
            "202"
        } else {
            "200"
        };
        for status in [ok, "400", "401", "403", "413", "415", "429", "503"] {
            assert!(op["responses"][status].is_object(), "{route} {status}");
        }
        // And the route exists: a POST without credentials is refused, not 404/405.
        let reply = h
            .send(Request::post(*route).body(Body::from("{}")).unwrap())
            .await;
        assert!(
            [StatusCode::UNAUTHORIZED, StatusCode::BAD_REQUEST].contains(&reply.status),
            "{route}: {:?}",
            reply.status
        );
    }
    assert_eq!(paths.len(), routes.len() + 1, "no undocumented extras");
}
