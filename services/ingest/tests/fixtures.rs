//! Replays the requests real SDKs sent (shared/fixtures/sdk-requests) against the router, with
//! their headers (gzip bodies compressed again, `Content-Encoding: gzip` kept), and checks the
//! answers and the events stored in JetStream.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use herald_proto::v1::{Event, EventType};
use herald_testkit::ingest::{Expected, Harness, SOURCE, fixtures, observed};
use serde_json::{Value, json};

/// Replays every fixture of `folder`; each must answer exactly 200 `{"success":true}`, and the
/// stream must then hold exactly the fixtures' events.
async fn replay(folder: &str) -> Vec<Event> {
    let h = Harness::start().await;
    let mut expected: Vec<Expected> = Vec::new();
    let all = fixtures(folder);
    for fx in &all {
        let reply = h.send(fx.request()).await;
        assert_eq!(
            reply.status,
            200,
            "{}: {}",
            fx.name,
            String::from_utf8_lossy(&reply.body)
        );
        reply.assert_success();
        expected.extend(fx.expected());
    }
    // Replaying everything again (an SDK retry) stores nothing new.
    for fx in &all {
        h.send(fx.request()).await.assert_success();
    }
    let stored = h.stored().await;
    assert_eq!(
        stored.len(),
        expected.len(),
        "{folder}: every event stored exactly once"
    );
    let by_id: BTreeMap<&str, &Event> = stored.iter().map(|e| (e.id.as_str(), e)).collect();
    for want in &expected {
        let got = by_id
            .get(want.id.as_str())
            .unwrap_or_else(|| panic!("{folder}: event {} not stored", want.id));
        assert_eq!(&observed(got), want, "{folder}");
        assert_eq!(got.source_id, SOURCE);
        assert_eq!(
            got.partition_key, got.user_id,
            "every fixture event has a user id"
        );
        assert!(got.partition < h.topology.partitions());
        assert!(got.received_at.is_some() && got.timestamp.is_some());
        let ctx: Value = serde_json::from_slice(&got.context).expect("context JSON");
        assert_eq!(ctx["acceptance"]["client"], folder, "{}", got.id);
        if got.r#type() == EventType::Group {
            assert_eq!(got.group_id, "acc-group-1");
        }
        if got.r#type() == EventType::Alias {
            assert_eq!(got.previous_id, "acc-anon-1");
        }
    }
    stored
}

fn find<'a>(events: &'a [Event], message_id: &str) -> &'a Event {
    events
        .iter()
        .find(|e| e.message_id == message_id)
        .unwrap_or_else(|| panic!("{message_id} stored"))
}

fn consent_of(e: &Event) -> BTreeMap<String, bool> {
    e.consent
        .as_ref()
        .expect("consent")
        .purposes
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

fn expected_consent() -> BTreeMap<String, bool> {
    [
        ("advertising", false),
        ("analytics", true),
        ("functional", true),
        ("datasharing", false),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[tokio::test]
async fn segment_python_requests_are_stored() {
    let events = replay("segment-python").await;
    let identify = find(&events, "segment-python-stubtest-00001");
    let traits: Value = serde_json::from_slice(&identify.traits).unwrap();
    assert_eq!(traits["email"], "ada@example.com");
    assert_eq!(identify.anonymous_id, "acc-anon-1");
    let consent = find(&events, "segment-python-stubtest-00009");
    assert_eq!(consent_of(consent), expected_consent());
    // ms timestamps with a +00:00 offset; sentAt comes from the batch.
    let track = find(&events, "segment-python-stubtest-00002");
    assert!(track.original_timestamp.is_some() && track.sent_at.is_some());
    let props: Value = serde_json::from_slice(&track.properties).unwrap();
    assert_eq!(
        props,
        json!({"plan": "pro", "source": "acceptance", "trial": true})
    );
}

#[tokio::test]
async fn rudder_python_requests_are_stored() {
    let events = replay("rudder-python").await;
    // Rudder sends identify traits under context.traits only.
    let identify = find(&events, "rudder-python-stubtest-00001");
    let traits: Value = serde_json::from_slice(&identify.traits).unwrap();
    assert_eq!(traits["email"], "ada@example.com");
    assert_eq!(
        consent_of(find(&events, "rudder-python-stubtest-00009")),
        expected_consent()
    );
    // µs timestamps are kept to the microsecond.
    let track = find(&events, "rudder-python-stubtest-00002");
    assert_eq!(track.original_timestamp.as_ref().unwrap().nanos % 1_000, 0);
    assert_eq!(
        track.original_timestamp.as_ref().unwrap().nanos,
        849_667_000
    );
    let integrations: Value = serde_json::from_slice(&track.integrations).unwrap();
    assert_eq!(integrations, json!({"All": true}));
}

#[tokio::test]
async fn segment_http_raw_requests_are_stored() {
    let events = replay("segment-http-raw").await;
    // Single-event calls take their type from the path.
    let page = find(&events, "segment-http-raw-stubtest-00003");
    assert_eq!(page.r#type(), EventType::Page);
    assert_eq!(page.name, "Pricing");
    // No sentAt on single calls: the device timestamp as is.
    assert_eq!(page.timestamp, page.original_timestamp);
    // Batch items without a timestamp take the received time, even with a batch sentAt.
    let batched = find(&events, "segment-http-raw-stubtest-00007");
    assert!(batched.original_timestamp.is_none());
    assert_eq!(batched.timestamp, batched.received_at);
    assert!(batched.sent_at.is_some());
}

#[tokio::test]
async fn gzip_fixtures_are_sent_compressed() {
    let gzipped: Vec<String> = ["rudder-python", "segment-http-raw"]
        .into_iter()
        .flat_map(fixtures)
        .filter(|f| f.gzipped())
        .map(|f| f.name)
        .collect();
    assert_eq!(
        gzipped,
        [
            "01_v1_batch.meta.json",
            "02_v1_batch.meta.json",
            "08_v1_batch.meta.json"
        ],
        "the recorded gzip requests are replayed gzipped"
    );
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("JSON")
}

#[tokio::test]
async fn mparticle_python_requests_are_stored() {
    let h = Harness::start().await;
    let all = fixtures("mparticle-python");
    for fx in &all {
        let reply = h.send(fx.request()).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{}: {}",
            fx.name,
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.json(), json!({}));
    }
    // Expected: every event of every batch, with its batch's user id and request id.
    let mut expected: BTreeMap<String, (String, String, Value)> = BTreeMap::new();
    for fx in &all {
        let batches = match &fx.json {
            Value::Array(b) => b.clone(),
            one => vec![one.clone()],
        };
        for b in batches {
            for e in b["events"].as_array().expect("events") {
                let id = e["data"]["source_message_id"].as_str().unwrap().to_string();
                expected.insert(
                    id,
                    (
                        b["user_identities"]["customerid"].as_str().unwrap().into(),
                        b["source_request_id"].as_str().unwrap().into(),
                        e.clone(),
                    ),
                );
            }
        }
    }
    let stored = h.stored().await;
    assert_eq!(
        stored.len(),
        expected.len(),
        "every event stored exactly once"
    );
    assert_eq!(stored.len(), 7 + 9);
    for got in &stored {
        let (user, request, item) = &expected[&got.message_id];
        assert_eq!(got.id, format!("{SOURCE}:{}", got.message_id));
        assert_eq!(got.source_id, SOURCE);
        assert_eq!(&got.user_id, user);
        assert_eq!(&got.partition_key, user);
        assert!(got.partition < h.topology.partitions());
        assert_eq!(&got.source_request_id, request);
        assert!(!got.historical);
        let ms = item["data"]["timestamp_unixtime_ms"].as_i64().unwrap();
        let ts = got.original_timestamp.as_ref().expect("device time");
        assert_eq!(ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000, ms);
        assert_eq!(got.timestamp, got.original_timestamp);
        let want_type = match item["event_type"].as_str().unwrap() {
            "custom_event" => EventType::Track,
            "screen_view" => EventType::Screen,
            "session_start" => EventType::SessionStart,
            "session_end" => EventType::SessionEnd,
            "opt_out" => EventType::OptOut,
            other => panic!("unexpected fixture event type {other}"),
        };
        assert_eq!(got.r#type(), want_type, "{}", got.id);
        let want_name = item["data"]["event_name"]
            .as_str()
            .or(item["data"]["screen_name"].as_str())
            .unwrap_or_default();
        assert_eq!(got.name, want_name);
    }

    // The /v2/events batch: identities, attributes, consent, properties.
    let find = |id: &str| {
        stored
            .iter()
            .find(|e| e.message_id == id)
            .unwrap_or_else(|| panic!("{id} stored"))
    };
    let signed_up = find("mparticle-python-stubtest-00002");
    assert_eq!(signed_up.identities["email"], "ada@example.com");
    assert_eq!(signed_up.identities["other"], "acc-anon-1");
    assert!(signed_up.anonymous_id.is_empty());
    assert_eq!(
        json_of(&signed_up.properties),
        json!({"plan": "pro", "trial": true, "custom_event_type": "other"})
    );
    let attributes = json!({"name": "Ada Lovelace", "plan": "pro", "logins": 5,
        "tags": ["vip", "beta"], "acceptance_run": "stubtest"});
    assert_eq!(json_of(&signed_up.traits), attributes);
    assert_eq!(json_of(&signed_up.context)["traits"], attributes);
    assert_eq!(
        json_of(&signed_up.context)["mparticle"]["environment"],
        "development"
    );
    let consent = signed_up.consent.as_ref().expect("consent_state");
    let purposes: BTreeMap<&str, bool> = consent
        .purposes
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        purposes,
        BTreeMap::from([("data_sale", false), ("marketing", false)]),
        "CCPA data_sale_opt_out consented:true means opted out"
    );
    assert!(!consent.opted_out);
    let opt_out = find("mparticle-python-stubtest-00006");
    assert!(opt_out.consent.as_ref().expect("consent").opted_out);
    let home = find("mparticle-python-stubtest-00005");
    assert_eq!(json_of(&home.properties), json!({"variant": "dark"}));
    let end = find("mparticle-python-stubtest-00007");
    assert_eq!(
        json_of(&end.properties),
        json!({"session_id": 4242, "session_duration_ms": 1500})
    );
    assert_eq!(json_of(&end.context)["session"], json!({"id": 4242}));

    // Replaying (an SDK retry) is answered 202 and stores nothing new.
    for fx in &all {
        let reply = h.send(fx.request()).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", fx.name);
    }
    assert_eq!(h.stored().await.len(), stored.len());
}
