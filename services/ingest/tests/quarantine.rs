//! The quarantine through the whole service: listing and redriving records over gRPC, and
//! invalid items of HTTP batches written as records (503 when they cannot be).

use herald_common::auth::BearerToken;
use herald_proto::v1::quarantine_service_client::QuarantineServiceClient;
use herald_proto::v1::source_service_client::SourceServiceClient;
use herald_proto::v1::{
    CreateSourceRequest, ListQuarantineRequest, ListQuarantineResponse, PayloadFormat,
    RedriveOutcome, RedriveQuarantineProgress, RedriveQuarantineRequest,
};
use herald_testkit::ingest;
use herald_testkit::ingest::{DEADLINE, QuarantineClient, Running, metric};
use herald_testkit::{segment_batch, segment_track, wait_until};
use serde_json::{Value, json};

use herald_testkit::ingest::{CONTROL_TOKEN, SOURCE, WRITE_KEY};

/// POSTs `body` as JSON to `url` with the acceptance key and `secret` as HTTP Basic credentials.
async fn post(http: &reqwest::Client, url: &str, secret: &str, body: &Value) -> reqwest::Response {
    http.post(url)
        .basic_auth(WRITE_KEY, Some(secret))
        .json(body)
        .send()
        .await
        .expect("answer")
}

async fn list(
    q: &mut QuarantineClient,
    source: &str,
    limit: u32,
    start: u64,
) -> ListQuarantineResponse {
    q.list_quarantine(ListQuarantineRequest {
        source_id: source.into(),
        limit,
        start_sequence: start,
    })
    .await
    .expect("ListQuarantine")
    .into_inner()
}

async fn redrive(
    q: &mut QuarantineClient,
    req: RedriveQuarantineRequest,
) -> Vec<RedriveQuarantineProgress> {
    let mut stream = q
        .redrive_quarantine(req)
        .await
        .expect("RedriveQuarantine")
        .into_inner();
    let mut out = Vec::new();
    while let Some(p) = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("progress within the deadline")
        .expect("progress")
    {
        out.push(p);
    }
    out
}

fn by_sequences(sequences: Vec<u64>) -> RedriveQuarantineRequest {
    RedriveQuarantineRequest {
        sequences,
        ..Default::default()
    }
}

#[tokio::test]
async fn list_and_redrive_over_grpc() {
    let ingest = Running::start(|_, _| {}).await;
    let mut q = ingest.quarantine_client().await;
    ingest
        .publish_intake("late", &[], segment_track("u7", 1).to_string())
        .await;
    let still_bad = json!({"type": "track", "event": "E", "messageId": "still-bad"}).to_string();
    ingest.publish_intake(SOURCE, &[], still_bad.clone()).await;
    ingest.wait_quarantine(2).await;

    // Listing: everything, one source, pages.
    let all = list(&mut q, "", 0, 0).await;
    assert_eq!(all.entries.len(), 2);
    assert_eq!(all.next_sequence, 0);
    let late = list(&mut q, "late", 0, 0).await;
    assert_eq!(late.entries.len(), 1);
    let late_entry = late.entries[0].clone();
    let rec = late_entry.record.as_ref().expect("record");
    assert_eq!(
        (rec.source_id.as_str(), rec.reason.as_str()),
        ("late", "unknown_source")
    );
    let bad = list(&mut q, SOURCE, 0, 0).await.entries[0].clone();
    let page = list(&mut q, "", 1, 0).await;
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.next_sequence, all.entries[1].sequence);
    let page = list(&mut q, "", 1, page.next_sequence).await;
    assert_eq!(page.entries[0].sequence, all.entries[1].sequence);
    assert_eq!(page.next_sequence, 0);

    // The source is created; once ingest knows it, the record is redriven into the events stream.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", ingest.handle().grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    SourceServiceClient::with_interceptor(channel, BearerToken::new(CONTROL_TOKEN).unwrap())
        .create_source(CreateSourceRequest {
            id: "late".into(),
            name: "Late".into(),
            write_key: Some("late-write-key".into()),
            ..Default::default()
        })
        .await
        .expect("CreateSource");
    let http = reqwest::Client::new();
    let batch_url = format!(
        "http://{}/v1/batch",
        ingest.handle().http_addr.expect("HTTP")
    );
    wait_until("ingest knows the new source", DEADLINE, || async {
        http.post(&batch_url)
            .basic_auth("late-write-key", Some(""))
            .json(&json!({"batch": []}))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
    .expect("source loaded");
    let progress = redrive(&mut q, by_sequences(vec![late_entry.sequence])).await;
    assert_eq!(progress.len(), 1);
    assert_eq!(
        progress[0].outcome(),
        RedriveOutcome::Redriven,
        "{progress:?}"
    );
    assert_eq!(progress[0].events_published, 1);
    assert_eq!((progress[0].done, progress[0].total), (1, 1));
    let events = ingest.wait_events(1).await;
    assert_eq!(events[0].id, "late:u7-1");
    assert_eq!(events[0].source_id, "late");
    assert!(list(&mut q, "late", 0, 0).await.entries.is_empty());

    // Still invalid: back in quarantine with attempt 2, the old record gone.
    let progress = redrive(&mut q, by_sequences(vec![bad.sequence])).await;
    assert_eq!(
        progress[0].outcome(),
        RedriveOutcome::QuarantinedAgain,
        "{progress:?}"
    );
    assert_eq!(progress[0].reason, "missing_identity");
    assert_eq!(progress[0].new_sequences.len(), 1);
    let now = list(&mut q, SOURCE, 0, 0).await.entries;
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].sequence, progress[0].new_sequences[0]);
    assert_ne!(now[0].sequence, bad.sequence);
    let again = now[0].record.as_ref().unwrap();
    let before = bad.record.as_ref().unwrap();
    assert_eq!(again.attempt, 2);
    assert_eq!(again.reason, "missing_identity");
    assert_eq!(again.payload, still_bad.as_bytes());
    assert_eq!(again.origin, before.origin);
    assert_eq!(again.received_at, before.received_at);
    assert_eq!(again.intake_sequence, before.intake_sequence);

    // Gone, and bad requests.
    let progress = redrive(&mut q, by_sequences(vec![bad.sequence])).await;
    assert_eq!(progress[0].outcome(), RedriveOutcome::NotFound);
    for req in [
        RedriveQuarantineRequest::default(),
        RedriveQuarantineRequest {
            all: true,
            ..Default::default()
        },
        RedriveQuarantineRequest {
            sequences: vec![1],
            source_id: SOURCE.into(),
            all: true,
        },
    ] {
        let status = q.redrive_quarantine(req).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    let status = list_status(&mut q, "a.b").await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // The service sits behind the control token like every control API.
    let mut anonymous =
        QuarantineServiceClient::connect(format!("http://{}", ingest.handle().grpc_addr))
            .await
            .expect("connects");
    let status = anonymous
        .list_quarantine(ListQuarantineRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let metrics = ingest.metrics().await;
    assert!(
        metrics.contains("# HELP herald_ingest_quarantine_redrives_total "),
        "{metrics}"
    );
    for (outcome, n) in [
        ("redriven", 1.0),
        ("quarantined_again", 1.0),
        ("not_found", 1.0),
    ] {
        let series = format!(r#"herald_ingest_quarantine_redrives_total{{outcome="{outcome}"}}"#);
        assert_eq!(metric(&metrics, &series), n, "{series}:\n{metrics}");
    }
}

async fn list_status(q: &mut QuarantineClient, source: &str) -> tonic::Status {
    q.list_quarantine(ListQuarantineRequest {
        source_id: source.into(),
        ..Default::default()
    })
    .await
    .expect_err("refused")
}

#[tokio::test]
async fn redrive_all_of_a_source_takes_each_record_once() {
    let ingest = Running::start(|_, _| {}).await;
    let mut q = ingest.quarantine_client().await;
    for i in 0..3 {
        let bad = json!({"type": "track", "event": "E", "messageId": format!("bad-{i}")});
        ingest.publish_intake(SOURCE, &[], bad.to_string()).await;
    }
    ingest
        .publish_intake("other", &[], segment_track("u1", 1).to_string())
        .await;
    ingest.wait_quarantine(4).await;

    let progress = redrive(
        &mut q,
        RedriveQuarantineRequest {
            source_id: SOURCE.into(),
            all: true,
            ..Default::default()
        },
    )
    .await;
    // Each record once, though each failure is appended to the same subject again.
    assert_eq!(progress.len(), 3, "{progress:?}");
    for (i, p) in progress.iter().enumerate() {
        assert_eq!(p.outcome(), RedriveOutcome::QuarantinedAgain);
        assert_eq!((p.done, p.total), (i as u64 + 1, 3));
    }
    let now = list(&mut q, SOURCE, 0, 0).await.entries;
    assert_eq!(now.len(), 3);
    assert!(now.iter().all(|e| e.record.as_ref().unwrap().attempt == 2));
    let other = list(&mut q, "other", 0, 0).await.entries;
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].record.as_ref().unwrap().attempt, 1);
}

#[tokio::test]
async fn invalid_http_batch_items_are_quarantined_or_the_batch_is_refused() {
    let ingest = Running::start(|_, _| {}).await;
    let http = reqwest::Client::new();
    let url = format!(
        "http://{}/v1/batch",
        ingest.handle().http_addr.expect("HTTP")
    );
    let mut body = segment_batch(vec![
        segment_track("u1", 1),
        json!({"type": "track", "userId": "u1", "messageId": "no-name"}),
    ]);
    body["context"] = json!({"locale": "en"});
    let res = post(&http, &url, "", &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), r#"{"success":true}"#);
    let records = ingest.wait_quarantine(1).await;
    let r = &records[0].1;
    assert_eq!(
        (r.source_id.as_str(), r.reason.as_str(), r.origin.as_str()),
        (SOURCE, "missing_event", "http:/v1/batch")
    );
    assert_eq!(r.item_index, 1);
    assert_eq!(r.format(), PayloadFormat::SegmentJson);
    let payload: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(
        payload,
        json!({"context": {"locale": "en"},
               "batch": [{"type": "track", "userId": "u1", "messageId": "no-name"}]})
    );
    assert_eq!(ingest.wait_events(1).await[0].id, "acceptance:u1-1");
    // The same request again (an SDK retry): no second record.
    let res = post(&http, &url, "", &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(ingest.quarantine().await.len(), 1);

    // A full quarantine: a batch with an invalid item is refused with 503, not half-accepted.
    let mut cfg = herald_ingest::quarantine_stream_config(&ingest.topology);
    cfg.max_bytes = 64;
    ingest.js.update_stream(cfg).await.expect("update");
    let body = segment_batch(vec![
        segment_track("u2", 1),
        json!({"type": "track", "userId": "u2", "messageId": "no-name-2"}),
    ]);
    let res = post(&http, &url, "", &body).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    // A batch without invalid items needs no quarantine.
    let res = post(
        &http,
        &url,
        "",
        &segment_batch(vec![segment_track("u3", 1)]),
    )
    .await;
    assert_eq!(res.status(), 200);
    let metrics = ingest.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"herald_ingest_quarantined_total{via="http",reason="missing_event"}"#
        ),
        2.0,
        "the first request and its retry:\n{metrics}"
    );
}

#[tokio::test]
async fn mparticle_events_are_quarantined_and_redriven_after_a_config_change() {
    let mut ingest = Running::start(|_, cfg| cfg.max_event_bytes = 2048).await;
    let url = format!(
        "http://{}/v2/events",
        ingest.handle().http_addr.expect("HTTP")
    );
    let event = |id: &str, blob: usize| {
        json!({"event_type": "custom_event", "data": {"event_name": "Viewed",
            "source_message_id": id, "custom_event_type": "other",
            "custom_attributes": {"blob": "x".repeat(blob)}}})
    };
    let body = json!({"events": [event("small", 10), event("big", 4096)],
        "environment": "production", "user_identities": {"customerid": "u9"}});
    let res = post(&reqwest::Client::new(), &url, ingest::WRITE_SECRET, &body).await;
    assert_eq!(res.status(), 202);
    let records = ingest.wait_quarantine(1).await;
    let (seq, r) = &records[0];
    assert_eq!(
        (r.reason.as_str(), r.origin.as_str(), r.item_index),
        ("event_too_large", "http:/v2/events", 1)
    );
    assert_eq!(r.format(), PayloadFormat::MparticleJson);
    let payload: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(payload["events"], json!([event("big", 4096)]));
    assert_eq!(payload["user_identities"], json!({"customerid": "u9"}));
    assert_eq!(ingest.wait_events(1).await.len(), 1);

    // A larger limit (a config change and a restart): the redrive now passes.
    ingest.stop_ingest().await;
    let (common, cfg) = ingest::configs(&ingest.nats.url(), |_, cfg| {
        cfg.max_event_bytes = 64 * 1024;
    });
    ingest.start_ingest(&common, &cfg).await;
    let mut q = ingest.quarantine_client().await;
    let progress = redrive(&mut q, by_sequences(vec![*seq])).await;
    assert_eq!(
        progress[0].outcome(),
        RedriveOutcome::Redriven,
        "{progress:?}"
    );
    let events = ingest.wait_events(2).await;
    let big = events
        .iter()
        .find(|e| e.message_id == "big")
        .expect("the redriven event");
    assert_eq!(
        (big.id.as_str(), big.user_id.as_str()),
        ("acceptance:big", "u9")
    );
    assert!(ingest.quarantine().await.is_empty());
}

/// Historical imports stay historical through the quarantine: a new record carries
/// `historical`, and a record written by the previous version (which said so only by its origin
/// `http:/v2/bulkevents/historical`) is still redriven as historical.
#[tokio::test]
async fn historical_records_redrive_as_historical_old_and_new() {
    use herald_proto::v1::QuarantineRecord;
    use prost::Message as _;

    let ingest = Running::start(|_, _| {}).await;
    let mut q = ingest.quarantine_client().await;
    let now = chrono::Utc::now();
    let old_ms = (now - chrono::TimeDelta::hours(80)).timestamp_millis();
    let event = |id: &str| {
        json!({"mpid": 9, "events": [{"event_type": "custom_event",
            "data": {"event_name": "Imported", "source_message_id": id,
                     "timestamp_unixtime_ms": old_ms}}]})
    };

    // A new record: an invalid event of a historical request.
    let http = reqwest::Client::new();
    let url = format!(
        "http://{}/v2/bulkevents/historical",
        ingest.handle().http_addr.expect("HTTP")
    );
    let mut bad = event("h-new");
    bad["events"][0]["data"]["event_name"] = json!("");
    let res = post(&http, &url, ingest::WRITE_SECRET, &json!([bad])).await;
    assert_eq!(res.status().as_u16(), 202);
    let records = ingest.wait_quarantine(1).await;
    let (_, new) = &records[0];
    assert!(new.historical, "{new:?}");
    assert_eq!(new.reason, "missing_field");

    // Records as the previous version wrote them: no `historical`, only the origin says so.
    let legacy = |id: &str, origin: &str| QuarantineRecord {
        source_id: SOURCE.into(),
        reason: "unknown_source".into(),
        message: "written by the previous version".into(),
        origin: origin.into(),
        payload: event(id).to_string().into_bytes(),
        format: PayloadFormat::MparticleJson as i32,
        content_type: "application/json".into(),
        received_at: Some(herald_proto::time::to_proto(now)),
        attempt: 1,
        item_index: -1,
        ..Default::default()
    };
    let subject = ingest.topology.quarantine_subject(SOURCE);
    let mut sequences = Vec::new();
    for rec in [
        legacy("h-old", "http:/v2/bulkevents/historical"),
        legacy("h-recent", "http:/v2/bulkevents"),
    ] {
        let ack = ingest
            .js
            .publish(subject.clone(), rec.encode_to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        sequences.push(ack.sequence);
    }
    let progress = redrive(&mut q, by_sequences(sequences)).await;
    for p in &progress {
        assert_eq!(p.outcome(), RedriveOutcome::Redriven, "{p:?}");
    }
    let events = ingest.wait_events(2).await;
    let historical = |id: &str| {
        events
            .iter()
            .find(|e| e.id == format!("{SOURCE}:{id}"))
            .unwrap_or_else(|| panic!("{id} stored"))
            .historical
    };
    assert!(historical("h-old"), "the legacy historical origin is read");
    assert!(!historical("h-recent"));
}
