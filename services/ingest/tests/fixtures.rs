//! Replays the requests real SDKs sent (shared/fixtures/sdk-requests) against the router and
//! checks the answers and the events stored in JetStream.

mod common;

use std::collections::BTreeMap;

use common::{Expected, Harness, SOURCE, fixtures, observed};
use herald_proto::v1::{Event, EventType};
use serde_json::{Value, json};

/// Replays every fixture of `folder`; each must answer exactly 200 `{"success":true}`, and the
/// stream must then hold exactly the fixtures' events.
async fn replay(folder: &str) -> Vec<Event> {
    let h = Harness::start().await;
    let mut expected: Vec<Expected> = Vec::new();
    for fx in fixtures(folder) {
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
