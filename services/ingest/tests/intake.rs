//! NATS intake through the whole service: messages published to `herald.in.<source>` become
//! events on the events stream (same ids and dedupe as HTTP), or quarantine records with their
//! reason; nothing is acked before it is stored.

use herald_testkit::ingest;
use std::time::Duration;

use async_nats::jetstream::stream::RetentionPolicy;
use herald_proto::v1::{Event, EventType, PayloadFormat};
use herald_testkit::ingest::{DEADLINE, Running, metric};
use herald_testkit::{segment_batch, segment_track, wait_until};
use prost::Message as _;
use serde_json::json;

use herald_testkit::ingest::SOURCE;

const PROTOBUF: (&str, &str) = ("Herald-Content-Type", "application/x-protobuf");
const MPARTICLE: (&str, &str) = ("Herald-Content-Type", "application/vnd.mparticle+json");

#[tokio::test]
async fn json_and_protobuf_messages_become_events_once() {
    let ingest = Running::start(|_, _| {}).await;

    // The streams ingest owns, as documented.
    let mut intake = ingest.js.get_stream("HERALD_INTAKE").await.expect("intake");
    let info = intake.info().await.expect("info").clone();
    assert_eq!(info.config.subjects, ["herald.in.*"]);
    assert_eq!(info.config.retention, RetentionPolicy::WorkQueue);
    let mut quarantine = ingest
        .js
        .get_stream("HERALD_QUARANTINE")
        .await
        .expect("quarantine");
    let info = quarantine.info().await.expect("info").clone();
    assert_eq!(info.config.subjects, ["herald.quarantine.*"]);
    assert_eq!(info.config.retention, RetentionPolicy::Limits);
    assert_eq!(info.config.max_age, Duration::from_secs(30 * 24 * 3600));

    // A single JSON event, without any header.
    let single = segment_track("u1", 1).to_string();
    ingest.publish_intake(SOURCE, &[], single.clone()).await;
    // A JSON batch with batch-level context.
    let mut batch = segment_batch(vec![segment_track("u2", 1), segment_track("u2", 2)]);
    batch["context"] = json!({"library": {"name": "svc"}});
    ingest
        .publish_intake(
            SOURCE,
            &[("Content-Type", "application/json")],
            batch.to_string(),
        )
        .await;
    // A protobuf event with its own message id, and one without (derived).
    let proto = Event {
        r#type: EventType::Track as i32,
        name: "Proto Event".into(),
        user_id: "u3".into(),
        message_id: "p-1".into(),
        properties: br#"{"a":1}"#.to_vec(),
        ..Default::default()
    };
    ingest
        .publish_intake(SOURCE, &[PROTOBUF], proto.encode_to_vec())
        .await;
    let anonymous = Event {
        r#type: EventType::Identify as i32,
        anonymous_id: "anon-9".into(),
        ..Default::default()
    };
    ingest
        .publish_intake(SOURCE, &[PROTOBUF], anonymous.encode_to_vec())
        .await;
    // The same messages again: a producer's retry.
    ingest.publish_intake(SOURCE, &[], single).await;
    ingest
        .publish_intake(SOURCE, &[PROTOBUF], anonymous.encode_to_vec())
        .await;

    ingest.wait_intake_drained().await;
    let events = ingest.wait_events(5).await;
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(events.len(), 5, "one event per message id: {ids:?}");
    for id in [
        "acceptance:u1-1",
        "acceptance:u2-1",
        "acceptance:u2-2",
        "acceptance:p-1",
    ] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
    for e in &events {
        assert_eq!(e.source_id, SOURCE);
        assert!(e.received_at.is_some() && e.timestamp.is_some(), "{e:?}");
        assert_eq!(
            e.partition,
            herald_common::partition::partition_for(&e.partition_key, 4)
        );
    }
    let u2 = events.iter().find(|e| e.id == "acceptance:u2-1").unwrap();
    let ctx: serde_json::Value = serde_json::from_slice(&u2.context).unwrap();
    assert_eq!(ctx["library"]["name"], "svc", "batch context merged");
    let p = events.iter().find(|e| e.id == "acceptance:p-1").unwrap();
    assert_eq!(
        (p.r#type(), p.name.as_str(), p.user_id.as_str()),
        (EventType::Track, "Proto Event", "u3")
    );
    assert_eq!(p.properties, br#"{"a":1}"#);
    let derived = events.iter().find(|e| e.anonymous_id == "anon-9").unwrap();
    assert_eq!(derived.message_id.len(), 32);
    assert_eq!(derived.id, format!("acceptance:{}", derived.message_id));
    assert_eq!(derived.partition_key, "anon-9");
    assert!(ingest.quarantine().await.is_empty());

    let metrics = ingest.metrics().await;
    // (The exporter shows a metric, and its HELP, once it has a value.)
    assert!(
        metrics.contains("# HELP herald_ingest_intake_messages_total "),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"herald_ingest_intake_messages_total{outcome="accepted"}"#
        ),
        6.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            r#"herald_ingest_dedupe_hits_total{layer="jetstream"}"#
        ) >= 2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn invalid_messages_are_quarantined_with_their_reason() {
    let ingest = Running::start(|_, _| {}).await;
    let valid = segment_track("u1", 1).to_string();
    let undecodable: &[u8] = &[0xff, 0xff, 0xff];
    // (source, headers, payload, reason, format)
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        &'a str,
        PayloadFormat,
    );
    let cases: Vec<Case> = vec![
        (
            SOURCE,
            vec![],
            br#"{"type": "track", "#.to_vec(),
            "invalid_json",
            PayloadFormat::SegmentJson,
        ),
        (
            SOURCE,
            vec![("Content-Type", "application/json")],
            br#"{"type": "track", "event": "E", "messageId": "m"}"#.to_vec(),
            "missing_identity",
            PayloadFormat::SegmentJson,
        ),
        (
            SOURCE,
            vec![],
            br#"{"batch": "nope"}"#.to_vec(),
            "invalid_batch",
            PayloadFormat::SegmentJson,
        ),
        (
            "nope",
            vec![],
            valid.clone().into_bytes(),
            "unknown_source",
            PayloadFormat::SegmentJson,
        ),
        (
            "disabled",
            vec![],
            valid.into_bytes(),
            "source_disabled",
            PayloadFormat::SegmentJson,
        ),
        (
            SOURCE,
            vec![PROTOBUF],
            undecodable.to_vec(),
            "undecodable_protobuf",
            PayloadFormat::ProtobufEvent,
        ),
        (
            SOURCE,
            vec![PROTOBUF],
            Event {
                r#type: EventType::Track as i32,
                name: "E".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            "missing_identity",
            PayloadFormat::ProtobufEvent,
        ),
        (
            SOURCE,
            vec![("Content-Type", "text/csv")],
            b"a,b\n1,2\n".to_vec(),
            "unsupported_content_type",
            PayloadFormat::Unspecified,
        ),
    ];
    let mut sequences = Vec::new();
    for (source, headers, payload, _, _) in &cases {
        sequences.push(
            ingest
                .publish_intake(source, headers, payload.clone())
                .await,
        );
    }
    // A batch whose second item is invalid: the first becomes an event, the second a record.
    let mut batch = segment_batch(vec![
        segment_track("u5", 1),
        json!({"type": "track", "userId": "u5", "messageId": "no-name"}),
    ]);
    batch["context"] = json!({"ip": "203.0.113.9"});
    batch["writeKey"] = json!("not-kept");
    let batch_seq = ingest.publish_intake(SOURCE, &[], batch.to_string()).await;

    let records = ingest.wait_quarantine(cases.len() + 1).await;
    ingest.wait_intake_drained().await;
    assert_eq!(records.len(), cases.len() + 1);
    for ((source, headers, payload, reason, format), seq) in cases.iter().zip(&sequences) {
        let (_, r) = records
            .iter()
            .find(|(_, r)| r.intake_sequence == *seq)
            .unwrap_or_else(|| panic!("a record for intake message {seq} ({reason})"));
        assert_eq!(r.reason, *reason);
        assert_eq!(r.source_id, *source);
        assert_eq!(r.origin, format!("nats:herald.in.{source}"));
        assert_eq!(&r.payload, payload, "{reason}: the original bytes");
        assert_eq!(r.format(), *format, "{reason}");
        assert_eq!(
            r.content_type,
            headers.first().map(|(_, v)| *v).unwrap_or(""),
            "{reason}"
        );
        assert_eq!(r.attempt, 1);
        assert_eq!(r.item_index, -1);
        assert!(!r.message.is_empty() && r.received_at.is_some(), "{r:?}");
        assert!(!r.payload_truncated);
    }
    let (_, item) = records
        .iter()
        .find(|(_, r)| r.intake_sequence == batch_seq)
        .expect("a record for the batch item");
    assert_eq!(item.reason, "missing_event");
    assert_eq!(item.item_index, 1);
    assert!(
        item.message.starts_with("batch item 1: "),
        "{}",
        item.message
    );
    let payload: serde_json::Value = serde_json::from_slice(&item.payload).unwrap();
    assert_eq!(
        payload,
        json!({"context": {"ip": "203.0.113.9"},
               "batch": [{"type": "track", "userId": "u5", "messageId": "no-name"}]})
    );
    let events = ingest.wait_events(1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, "acceptance:u5-1");

    let metrics = ingest.metrics().await;
    assert!(
        metrics.contains("# HELP herald_ingest_quarantined_total "),
        "{metrics}"
    );
    for (series, want) in [
        (
            r#"herald_ingest_intake_messages_total{outcome="quarantined"}"#,
            cases.len() as f64,
        ),
        (
            r#"herald_ingest_intake_messages_total{outcome="partial"}"#,
            1.0,
        ),
        (
            r#"herald_ingest_quarantined_total{via="nats",reason="missing_identity"}"#,
            2.0,
        ),
        (
            r#"herald_ingest_quarantined_total{via="nats",reason="unknown_source"}"#,
            1.0,
        ),
        (
            r#"herald_ingest_events_rejected_total{reason="undecodable_protobuf"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metric(&metrics, series), want, "{series}:\n{metrics}");
    }
}

#[tokio::test]
async fn a_full_quarantine_holds_messages_instead_of_dropping_them() {
    let ingest = Running::start(|common, _| common.topology.quarantine_max_bytes = 64).await;
    let seq = ingest.publish_intake(SOURCE, &[], &b"not json"[..]).await;
    // The record does not fit: the message stays in the intake stream, retried.
    wait_until("the intake retries", DEADLINE, || async {
        metric(
            &ingest.metrics().await,
            "herald_ingest_intake_retries_total",
        ) >= 1.0
    })
    .await
    .expect("a retry");
    assert!(ingest.quarantine().await.is_empty());
    let mut intake = ingest
        .js
        .get_stream(ingest.topology.intake_stream())
        .await
        .expect("intake");
    assert_eq!(intake.info().await.expect("info").state.messages, 1);
    let metrics = ingest.metrics().await;
    for help in [
        "herald_ingest_intake_retries_total",
        "herald_ingest_quarantine_write_failures_total",
    ] {
        assert!(metrics.contains(&format!("# HELP {help} ")), "{metrics}");
    }
    assert!(
        metric(
            &metrics,
            r#"herald_ingest_quarantine_write_failures_total{kind="full"}"#
        ) >= 1.0,
        "{metrics}"
    );

    // Room again (an operator raised the limit): the retry stores the record and acks.
    let mut cfg = herald_ingest::quarantine_stream_config(&ingest.topology);
    cfg.max_bytes = -1;
    ingest.js.update_stream(cfg).await.expect("update");
    let records = ingest.wait_quarantine(1).await;
    assert_eq!(records[0].1.intake_sequence, seq);
    assert_eq!(records[0].1.reason, "invalid_json");
    ingest.wait_intake_drained().await;
}

/// The same people sent over HTTP (`/v2/events`) and over NATS intake (as mParticle JSON and as
/// protobuf) get the same partition key and partition: an mpid-only person, an identity-only
/// person and a device-only person.
#[tokio::test]
async fn one_person_gets_one_partition_key_whatever_the_transport() {
    let ingest = Running::start(|_, _| {}).await;
    let http = reqwest::Client::new();
    let url = format!(
        "http://{}/v2/events",
        ingest.handle().http_addr.expect("HTTP")
    );
    // (mParticle batch identities, protobuf identities, the canonical key)
    let people = [
        (json!({"mpid": 42}), vec![("mpid", "42")], "mpid:42"),
        (
            json!({"user_identities": {"other": "o-7", "email": "p@example.com"}}),
            vec![("other", "o-7"), ("email", "p@example.com")],
            "email:p@example.com",
        ),
        (
            json!({"device_info": {"android_uuid": "a-1", "ios_idfv": "i-1"}}),
            vec![("android_uuid", "a-1"), ("ios_idfv", "i-1")],
            "ios_idfv:i-1",
        ),
    ];
    for (i, (ids, proto_ids, _)) in people.iter().enumerate() {
        let mut batch = ids.clone();
        batch["events"] = json!([{"event_type": "custom_event",
            "data": {"event_name": "Seen", "source_message_id": format!("http-{i}")}}]);
        let res = http
            .post(&url)
            .basic_auth(ingest::WRITE_KEY, Some(ingest::WRITE_SECRET))
            .json(&batch)
            .send()
            .await
            .expect("HTTP answers");
        assert_eq!(res.status().as_u16(), 202, "{}", res.text().await.unwrap());

        batch["events"][0]["data"]["source_message_id"] = json!(format!("nats-json-{i}"));
        ingest
            .publish_intake(SOURCE, &[MPARTICLE], batch.to_string())
            .await;

        let mut event = Event {
            r#type: EventType::Track as i32,
            name: "Seen".into(),
            message_id: format!("nats-proto-{i}"),
            ..Default::default()
        };
        for (k, v) in proto_ids {
            event.identities.insert(k.to_string(), v.to_string());
        }
        ingest
            .publish_intake(SOURCE, &[PROTOBUF], event.encode_to_vec())
            .await;
    }
    let events = ingest.wait_events(people.len() * 3).await;
    assert!(
        ingest.quarantine().await.is_empty(),
        "{:?}",
        ingest.quarantine().await
    );
    for (i, (_, _, key)) in people.iter().enumerate() {
        let want = herald_common::partition::partition_for(key, 4);
        for id in [
            format!("{SOURCE}:http-{i}"),
            format!("{SOURCE}:nats-json-{i}"),
            format!("{SOURCE}:nats-proto-{i}"),
        ] {
            let e = events
                .iter()
                .find(|e| e.id == id)
                .unwrap_or_else(|| panic!("{id} stored"));
            assert_eq!(
                (e.partition_key.as_str(), e.partition),
                (*key, want),
                "{id}"
            );
        }
    }
}

/// Every reject is counted under its own reason: an mParticle event without `event_type` is
/// `missing_field` (a hand-kept list once counted it as `other`), and so is its record.
#[tokio::test]
async fn mparticle_rejects_count_under_their_own_reason() {
    let ingest = Running::start(|_, _| {}).await;
    let batch = json!({"mpid": 7, "events": [
        {"data": {"event_name": "No Type"}},
        {"event_type": "custom_event", "data": {"event_name": "Fine"}}
    ]});
    ingest
        .publish_intake(SOURCE, &[MPARTICLE], batch.to_string())
        .await;
    ingest.wait_intake_drained().await;
    let records = ingest.wait_quarantine(1).await;
    assert_eq!(records[0].1.reason, "missing_field");
    assert_eq!(ingest.wait_events(1).await.len(), 1);
    let metrics = ingest.metrics().await;
    for series in [
        r#"herald_ingest_quarantined_total{via="nats",reason="missing_field"}"#,
        r#"herald_ingest_events_rejected_total{reason="missing_field"}"#,
    ] {
        assert_eq!(metric(&metrics, series), 1.0, "{series}\n{metrics}");
    }
    // Nothing counts under "other" (its series show at 0 from start-up).
    for line in metrics.lines().filter(|l| l.contains(r#"reason="other""#)) {
        assert!(line.ends_with(" 0"), "{line}\n{metrics}");
    }
}
