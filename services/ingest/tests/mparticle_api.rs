//! The mParticle Events API v2 against a real nats-server: authentication, the three calls,
//! event type mapping, historical imports, request-level dedupe and rejections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use bytes::Bytes;
use chrono::{TimeDelta, Utc};
use herald_common::nats::ensure_stream;
use herald_proto::v1::EventType;
use herald_testkit::ingest::{DISABLED_KEY, Harness, Reply, SOURCE, WRITE_KEY, WRITE_SECRET, gzip};
use serde_json::{Value, json};

fn pair(key: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:{secret}"))
    )
}

async fn post(h: &Harness, path: &str, body: &Value) -> Reply {
    post_raw(
        h,
        path,
        Some(pair(WRITE_KEY, WRITE_SECRET)),
        body.to_string().into(),
    )
    .await
}

async fn post_raw(h: &Harness, path: &str, auth: Option<String>, body: Body) -> Reply {
    let mut req = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(auth) = auth {
        req = req.header(header::AUTHORIZATION, auth);
    }
    h.send(req.body(body).unwrap()).await
}

/// Asserts an mParticle-shaped error: `{"errors":[{"code","message"}]}`.
fn assert_mp_error(reply: &Reply, status: StatusCode, code: &str, message_has: &str) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    let body = reply.json();
    let errors = body["errors"].as_array().expect("errors array");
    assert_eq!(errors.len(), 1, "{body}");
    assert_eq!(errors[0]["code"], code, "{body}");
    let message = errors[0]["message"].as_str().expect("message");
    assert!(
        message.contains(message_has),
        "{message:?} lacks {message_has:?}"
    );
}

fn assert_accepted(reply: &Reply) {
    assert_eq!(
        reply.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json(), json!({}));
}

fn custom(id: &str, name: &str) -> Value {
    json!({"event_type": "custom_event", "data": {"event_name": name, "source_message_id": id,
        "custom_event_type": "other", "timestamp_unixtime_ms": Utc::now().timestamp_millis()}})
}

fn batch(user: &str, request: &str, events: Vec<Value>) -> Value {
    json!({"events": events, "source_request_id": request, "environment": "production",
        "user_identities": {"customerid": user}})
}

#[tokio::test]
async fn every_auth_case() {
    let h = Harness::start().await;
    let body = batch("u1", "r1", vec![custom("m1", "E")]).to_string();
    let cases: [(Option<String>, StatusCode, &str); 8] = [
        (None, StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        (
            Some("Bearer abc".into()),
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
        ),
        (
            Some("Basic %%%".into()),
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
        ),
        (
            Some(pair("", WRITE_SECRET)),
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
        ),
        (
            Some(pair("wrong-key", WRITE_SECRET)),
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
        ),
        (
            Some(pair(WRITE_KEY, "wrong-secret")),
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
        ),
        (
            Some(pair(WRITE_KEY, "")),
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
        ),
        (
            Some(pair(DISABLED_KEY, "")),
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
        ),
    ];
    for path in ["/v2/events", "/v2/bulkevents", "/v2/bulkevents/historical"] {
        for (auth, status, code) in &cases {
            // The body is never read when the credentials are refused.
            let read = Arc::new(AtomicBool::new(false));
            let flag = read.clone();
            let b = body.clone();
            let stream = futures_util::stream::once(async move {
                flag.store(true, Ordering::SeqCst);
                Ok::<Bytes, std::io::Error>(Bytes::from(b))
            });
            let reply = post_raw(&h, path, auth.clone(), Body::from_stream(stream)).await;
            assert_mp_error(&reply, *status, code, "");
            assert!(!read.load(Ordering::SeqCst), "{path} {auth:?}: body read");
        }
    }
    assert!(h.stored().await.is_empty());
    assert_accepted(
        &post(
            &h,
            "/v2/events",
            &batch("u1", "r1", vec![custom("m1", "E")]),
        )
        .await,
    );
    assert_eq!(h.stored().await.len(), 1);
}

#[tokio::test]
async fn every_event_type_is_mapped() {
    let h = Harness::start().await;
    let now = Utc::now().timestamp_millis();
    let events = json!([
        {"event_type": "session_start", "data": {"source_message_id": "t1", "session_id": 7}},
        {"event_type": "custom_event", "data": {"source_message_id": "t2", "event_name": "Clicked",
            "custom_event_type": "navigation", "custom_attributes": {"button": "buy"}}},
        {"event_type": "screen_view", "data": {"source_message_id": "t3", "screen_name": "Cart"}},
        {"event_type": "commerce_event", "data": {"source_message_id": "t4", "currency_code": "EUR",
            "product_action": {"action": "purchase", "total_amount": 40.5, "transaction_id": "o1",
                "products": [{"id": "sku-1", "price": 20.25, "quantity": 2}]}}},
        {"event_type": "opt_out", "data": {"source_message_id": "t5", "is_opted_out": true}},
        {"event_type": "user_attribute_change", "data": {"source_message_id": "t6",
            "user_attribute_name": "plan", "new": "pro", "old": "free"}},
        {"event_type": "user_identity_change", "data": {"source_message_id": "t7",
            "new": {"identity_type": "email", "identity": "new@example.com"},
            "old": {"identity_type": "email", "identity": "old@example.com"}}},
        {"event_type": "crash_report", "data": {"source_message_id": "t8", "exception_name": "Boom"}},
        {"event_type": "first_run", "data": {"source_message_id": "t9"}},
        {"event_type": "push_registration", "data": {"source_message_id": "t10", "register": true}},
        {"event_type": "application_state_transition", "data": {"source_message_id": "t11",
            "application_transition_type": "application_background"}},
        {"event_type": "breadcrumb", "data": {"source_message_id": "t12", "label": "step"}},
        {"event_type": "network_performance", "data": {"source_message_id": "t13"}},
        {"event_type": "uninstall", "data": {"source_message_id": "t14"}},
        {"event_type": "media", "data": {"source_message_id": "t15"}},
        {"event_type": "profile", "data": {"source_message_id": "t16"}},
        {"event_type": "session_end", "data": {"source_message_id": "t17", "session_duration_ms": 9}},
    ]);
    let mut body = json!({
        "events": events,
        "mpid": 8_675_309,
        "user_identities": {"email": "old@example.com", "other_id_2": "x"},
        "user_attributes": {"plan": "free", "gone": 1},
        "deleted_user_attributes": ["gone"],
        "device_info": {"platform": "Android", "android_advertising_id": "aaid-1"},
        "application_info": {"application_name": "Shop", "application_version": "2.0"},
        "consent_state": {"gdpr": {"Analytics": {"consented": true, "timestamp_unixtime_ms": now}},
                          "ccpa": {"data_sale_opt_out": {"consented": false}}},
        "ip": "198.51.100.4",
        "source_request_id": "types-1"
    });
    // Gzipped, like the SDKs can send it.
    let reply = h
        .send(
            Request::post("/v2/events")
                .header(header::AUTHORIZATION, pair(WRITE_KEY, WRITE_SECRET))
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from(gzip(body.to_string().as_bytes())))
                .unwrap(),
        )
        .await;
    assert_accepted(&reply);
    let stored = h.stored().await;
    let want = [
        (EventType::SessionStart, ""),
        (EventType::Track, "Clicked"),
        (EventType::Screen, "Cart"),
        (EventType::Commerce, "purchase"),
        (EventType::OptOut, ""),
        (EventType::UserAttributeChange, ""),
        (EventType::UserIdentityChange, ""),
        (EventType::Application, "crash_report"),
        (EventType::Application, "first_run"),
        (EventType::Application, "push_registration"),
        (EventType::Application, "application_state_transition"),
        (EventType::Application, "breadcrumb"),
        (EventType::Application, "network_performance"),
        (EventType::Application, "uninstall"),
        (EventType::Application, "media"),
        (EventType::Application, "profile"),
        (EventType::SessionEnd, ""),
    ];
    let got: Vec<(EventType, &str)> = stored
        .iter()
        .map(|e| (e.r#type(), e.name.as_str()))
        .collect();
    assert_eq!(got, want);
    let json_of = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap();
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.id, format!("{SOURCE}:t{}", i + 1));
        assert_eq!(e.source_request_id, "types-1");
        assert!(e.user_id.is_empty());
        assert_eq!(e.partition_key, "mpid:8675309", "no user id: mpid routes");
        assert_eq!(e.identities["mpid"], "8675309");
        assert_eq!(e.identities["other_id_2"], "x");
        assert_eq!(e.identities["android_advertising_id"], "aaid-1");
        let consent = e.consent.as_ref().expect("consent");
        assert!(consent.purposes["analytics"]);
        assert!(consent.purposes["data_sale"], "not opted out of data sale");
        assert_eq!(consent.opted_out, e.r#type() == EventType::OptOut);
        let ctx = json_of(&e.context);
        assert_eq!(ctx["device"]["platform"], "Android");
        assert_eq!(ctx["app"]["application_version"], "2.0");
        assert_eq!(ctx["ip"], "198.51.100.4");
        assert_eq!(ctx["traits"], json!({"plan": "free"}));
        assert!(e.deleted_traits.contains(&"gone".to_string()));
    }
    let by = |id: &str| stored.iter().find(|e| e.message_id == id).unwrap();
    assert_eq!(
        json_of(&by("t2").properties),
        json!({"button": "buy", "custom_event_type": "navigation"})
    );
    let commerce = json_of(&by("t4").properties);
    assert_eq!(commerce["total_amount"], 40.5);
    assert_eq!(commerce["transaction_id"], "o1");
    assert_eq!(commerce["currency_code"], "EUR");
    assert_eq!(commerce["products"][0]["id"], "sku-1");
    assert_eq!(json_of(&by("t6").traits), json!({"plan": "pro"}));
    assert_eq!(by("t7").identities["email"], "new@example.com");
    assert_eq!(
        json_of(&by("t8").properties),
        json!({"exception_name": "Boom"})
    );

    // The same request again: 202, nothing new.
    body["events"][0]["data"]["source_message_id"] = json!("a-new-id");
    assert_accepted(&post(&h, "/v2/events", &body).await);
    assert_eq!(h.stored().await.len(), stored.len());
}

#[tokio::test]
async fn bulk_requests_take_up_to_100_batches() {
    let h = Harness::start().await;
    let batches: Vec<Value> = (0..100)
        .map(|i| {
            batch(
                &format!("u{i}"),
                &format!("bulk-{i}"),
                vec![custom(&format!("b{i}"), "E")],
            )
        })
        .collect();
    assert_accepted(&post(&h, "/v2/bulkevents", &Value::Array(batches.clone())).await);
    let stored = h.stored().await;
    assert_eq!(stored.len(), 100);
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.user_id, format!("u{i}"));
        assert_eq!(e.source_request_id, format!("bulk-{i}"));
        assert!(!e.historical);
    }
    let mut too_many = batches;
    too_many.push(batch("u", "bulk-100", vec![custom("b100", "E")]));
    let reply = post(&h, "/v2/bulkevents", &Value::Array(too_many)).await;
    assert_mp_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
        "101 batches",
    );
    // /v2/events takes one batch, not an array; bulk takes an array.
    let reply = post(&h, "/v2/events", &json!([batch("u", "x", vec![])])).await;
    assert_mp_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
        "one mParticle batch",
    );
    let reply = post(&h, "/v2/bulkevents", &batch("u", "x", vec![])).await;
    assert_mp_error(&reply, StatusCode::BAD_REQUEST, "BAD_REQUEST", "array");
    assert_eq!(h.stored().await.len(), 100);
}

#[tokio::test]
async fn historical_events_must_be_72_hours_old() {
    let h = Harness::start().await;
    let at = |id: &str, age: TimeDelta| {
        json!({"event_type": "custom_event", "data": {"event_name": "Old", "source_message_id": id,
            "timestamp_unixtime_ms": (Utc::now() - age).timestamp_millis()}})
    };
    let old = batch(
        "u1",
        "h1",
        vec![
            at("h-1", TimeDelta::days(30)),
            at("h-2", TimeDelta::hours(73)),
        ],
    );
    assert_accepted(&post(&h, "/v2/bulkevents/historical", &json!([old])).await);
    let stored = h.stored().await;
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|e| e.historical));
    let ts = stored[0].timestamp.unwrap().seconds;
    assert!(ts < (Utc::now() - TimeDelta::days(29)).timestamp());

    // One recent event fails the whole request; so does one without a timestamp.
    let mixed = batch(
        "u1",
        "h2",
        vec![
            at("h-3", TimeDelta::days(30)),
            at("h-4", TimeDelta::hours(71)),
        ],
    );
    let reply = post(&h, "/v2/bulkevents/historical", &json!([mixed])).await;
    assert_mp_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
        "less than 72 hours old",
    );
    let untimed = batch(
        "u1",
        "h3",
        vec![json!({"event_type": "custom_event", "data": {"event_name": "E"}})],
    );
    let reply = post(&h, "/v2/bulkevents/historical", &json!([untimed])).await;
    assert_mp_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
        "timestamp_unixtime_ms",
    );
    // The same old events on the normal path are not historical.
    let normal = batch("u1", "h4", vec![at("h-5", TimeDelta::days(30))]);
    assert_accepted(&post(&h, "/v2/bulkevents", &json!([normal])).await);
    let stored = h.stored().await;
    assert_eq!(stored.len(), 3);
    assert!(!stored[2].historical);
}

#[tokio::test]
async fn a_stored_source_request_id_is_not_published_again() {
    let h = Harness::start().await;
    assert_accepted(
        &post(
            &h,
            "/v2/events",
            &batch("u1", "req-1", vec![custom("a1", "E")]),
        )
        .await,
    );
    // The retry carries new message ids (a client that regenerates them): the request id
    // alone keeps it from being stored twice.
    assert_accepted(
        &post(
            &h,
            "/v2/events",
            &batch("u1", "req-1", vec![custom("a2", "E")]),
        )
        .await,
    );
    let ids: Vec<String> = h.stored().await.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids, ["a1"]);
    // In a bulk request, only the new batches are published.
    let bulk = json!([
        batch("u1", "req-1", vec![custom("a3", "E")]),
        batch("u2", "req-2", vec![custom("b1", "E")]),
        batch("u3", "", vec![custom("c1", "E")]),
    ]);
    assert_accepted(&post(&h, "/v2/bulkevents", &bulk).await);
    let ids: Vec<String> = h.stored().await.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids, ["a1", "b1", "c1"]);
    // The log is a KV bucket ingest created, its records kept for the duplicate window.
    let kv =
        h.js.get_key_value(h.topology.bucket("requests"))
            .await
            .expect("the request log bucket exists");
    let status = kv.status().await.expect("bucket status");
    assert_eq!(
        status.info.config.max_age.as_secs(),
        600,
        "records live as long as the duplicate window"
    );
}

#[tokio::test]
async fn a_request_is_recorded_only_after_every_pub_ack() {
    // A stream too small for any event: every publish is refused.
    let h = Harness::with(|common, _| common.topology.events_max_bytes = 64).await;
    let body = batch("u1", "full-1", vec![custom("f1", "E"), custom("f2", "E")]);
    let reply = post(&h, "/v2/events", &body).await;
    assert_mp_error(
        &reply,
        StatusCode::TOO_MANY_REQUESTS,
        "TOO_MANY_REQUESTS",
        "full",
    );
    assert_eq!(reply.headers[header::RETRY_AFTER], "1");
    // Room again: the retry with the same source_request_id is published, not skipped.
    let mut cfg = h.topology.events_stream_config();
    cfg.max_bytes = -1;
    ensure_stream(&h.js, cfg).await.expect("stream updated");
    assert_accepted(&post(&h, "/v2/events", &body).await);
    let ids: Vec<String> = h.stored().await.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids, ["f1", "f2"]);
}

#[tokio::test]
async fn rejections_have_reasons() {
    let h = Harness::start().await;
    let auth = || Some(pair(WRITE_KEY, WRITE_SECRET));
    let reply = post_raw(&h, "/v2/events", auth(), Body::from("{not json")).await;
    assert_mp_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
        "not a valid JSON",
    );
    let mut deep = json!(1);
    for _ in 0..70 {
        deep = json!({"d": deep});
    }
    let mut b = batch("u1", "d", vec![custom("d1", "E")]);
    b["events"][0]["data"]["custom_attributes"] = deep;
    let reply = post(&h, "/v2/events", &b).await;
    assert_mp_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
        "deeper than the limit of 64",
    );
    // Over 256 KB.
    let mut big = batch("u1", "big", vec![]);
    big["user_attributes"] = json!({"blob": "x".repeat(260 * 1024)});
    let reply = post(&h, "/v2/events", &big).await;
    assert_mp_error(
        &reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        "limit",
    );
    let reply = h
        .send(
            Request::post("/v2/events")
                .header(header::AUTHORIZATION, pair(WRITE_KEY, WRITE_SECRET))
                .header(header::CONTENT_ENCODING, "br")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_mp_error(
        &reply,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
        "br",
    );
    let reply = post(&h, "/v2/events", &json!({"events": [custom("n1", "E")]})).await;
    assert_mp_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
        "identifies no user",
    );
    let reply = post(&h, "/v2/events", &json!({"events": {}, "mpid": 1})).await;
    assert_mp_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
        "`events` must be an array",
    );
    assert!(h.stored().await.is_empty());

    // Invalid events in a valid batch are skipped (with their reason); the rest is stored.
    let mut fat = custom("x4", "E");
    fat["data"]["custom_attributes"] = json!({"blob": "x".repeat(40 * 1024)});
    let mixed = batch(
        "u1",
        "mixed",
        vec![
            custom("ok-1", "E"),
            json!({"event_type": "custom_event", "data": {"source_message_id": "x1"}}),
            json!({"event_type": 7, "data": {"source_message_id": "x2"}}),
            custom(&"m".repeat(101), "E"),
            fat,
            json!({"event_type": "custom_event", "data": {"event_name": "E", "custom_attributes": "x"}}),
            custom("ok-2", "E"),
        ],
    );
    assert_accepted(&post(&h, "/v2/events", &mixed).await);
    let ids: Vec<String> = h.stored().await.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids, ["ok-1", "ok-2"]);
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_rejections_bytes_and_duplicates() {
    // nextest runs each test in its own process: this recorder is this test's alone.
    let metrics = herald_common::telemetry::metrics();
    let h = Harness::start().await;
    let body = batch(
        "u1",
        "metrics-1",
        vec![
            custom("m1", "E"),
            json!({"event_type": "custom_event", "data": {"source_message_id": "bad"}}),
        ],
    );
    let bytes = body.to_string();
    for _ in 0..2 {
        let reply = h
            .send(
                Request::post("/v2/events")
                    .header(header::AUTHORIZATION, pair(WRITE_KEY, WRITE_SECRET))
                    .header(header::CONTENT_ENCODING, "gzip")
                    .body(Body::from(gzip(bytes.as_bytes())))
                    .unwrap(),
            )
            .await;
        assert_accepted(&reply);
    }
    let reply = post_raw(
        &h,
        "/v2/events",
        Some(pair(WRITE_KEY, "nope")),
        Body::from(bytes.clone()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);

    let text = metrics.render();
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in\n{text}"))
    };
    assert_eq!(
        get(
            "herald_ingest_requests_total",
            &[("route", "/v2/events"), ("status", "202")]
        ),
        2.0
    );
    assert_eq!(
        get(
            "herald_ingest_requests_rejected_total",
            &[("route", "/v2/events"), ("reason", "forbidden")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "herald_ingest_duplicate_requests_total",
            &[("source", SOURCE)]
        ),
        1.0
    );
    assert_eq!(
        get(
            "herald_ingest_events_rejected_total",
            &[("reason", "missing_field")]
        ),
        1.0,
        "the invalid event, once: the retry was not normalised again"
    );
    assert_eq!(
        get("herald_ingest_events_accepted_total", &[("source", SOURCE)]),
        1.0
    );
    assert_eq!(
        get("herald_ingest_decoded_bytes_total", &[("encoding", "gzip")]),
        2.0 * bytes.len() as f64
    );
    assert!(get("herald_ingest_received_bytes_total", &[]) > 0.0);
    for name in [
        "herald_ingest_duplicate_requests_total",
        "herald_ingest_requests_rejected_total",
        "herald_ingest_decoded_bytes_total",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has HELP");
    }
}

#[tokio::test]
async fn a_batch_of_user_attributes_alone_is_not_lost() {
    let h = Harness::start().await;
    let body = json!({"user_identities": {"customerid": "u1"}, "source_request_id": "attrs-1",
        "user_attributes": {"plan": "pro", "tier": 2}, "deleted_user_attributes": ["trial"]});
    assert_accepted(&post(&h, "/v2/events", &body).await);
    // Nothing at all to store is fine too.
    assert_accepted(&post(&h, "/v2/events", &json!({"mpid": 5})).await);
    let stored = h.stored().await;
    assert_eq!(stored.len(), 1);
    let e = &stored[0];
    assert_eq!(e.r#type(), EventType::UserAttributeChange);
    assert_eq!(e.user_id, "u1");
    assert_eq!(
        serde_json::from_slice::<Value>(&e.traits).unwrap(),
        json!({"plan": "pro", "tier": 2})
    );
    assert_eq!(e.deleted_traits, ["trial"]);
    assert_eq!(e.source_request_id, "attrs-1");
}
