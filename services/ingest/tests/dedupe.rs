//! The long dedupe window (`ingest.dedupe_window_hours`): a KV seen-set keeps retries arriving
//! after JetStream's duplicate window from being stored twice, and its failures never block
//! ingestion.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::stream;
use axum::body::Body;
use axum::http::{Request, header};
use herald_ingest::{AppState, router};
use herald_testkit::ingest::{Harness, Reply, WRITE_KEY, basic, common_config, ingest_config};
use herald_testkit::{segment_batch, segment_track, wait_until};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;

const DEADLINE: Duration = Duration::from_secs(20);

/// Posts a body through the router of `state` with the acceptance key.
async fn post(state: &AppState, path: &str, body: &Value) -> Reply {
    let req = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, basic(WRITE_KEY))
        .body(Body::from(body.to_string()))
        .unwrap();
    let res = router(state.clone())
        .oneshot(req)
        .await
        .expect("infallible");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// A router state over the harness's server and client with the seen-set on (24 hours).
fn with_seen_set(h: &Harness, duplicate_window_seconds: u64) -> AppState {
    let mut common = common_config(&h.nats.url());
    common.topology.duplicate_window_seconds = duplicate_window_seconds;
    let mut cfg = ingest_config();
    cfg.dedupe_window_hours = 24;
    AppState::new(&common, &cfg, h.state.client().clone()).expect("valid config")
}

/// How many stored events carry each message id starting with `prefix`.
async fn copies(h: &Harness, prefix: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for e in h.stored().await {
        if e.message_id.starts_with(prefix) {
            *counts.entry(e.message_id).or_default() += 1;
        }
    }
    counts
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn the_seen_set_outlasts_jetstreams_duplicate_window() {
    let metrics = herald_common::telemetry::metrics();
    // JetStream forgets message ids after 1 s. `h.state` has no seen-set; `on` has one.
    let h = Harness::with(|common, _| common.topology.duplicate_window_seconds = 1).await;
    let on = with_seen_set(&h, 1);
    let a = segment_batch((0..3).map(|i| segment_track("a", i)).collect());
    let b = segment_batch((0..3).map(|i| segment_track("b", i)).collect());
    post(&on, "/v1/batch", &a).await.assert_success();
    h.post_json("/v1/batch", &b).await.assert_success();

    // Without the seen-set, a retry is stored again once JetStream's window has passed (for b,
    // and so for a, which was stored before it).
    wait_until("a retry of b is stored twice", DEADLINE, || async {
        h.post_json("/v1/batch", &b).await.assert_success();
        copies(&h, "b-").await.values().any(|n| *n > 1)
    })
    .await
    .expect("JetStream's duplicate window passes");

    // With it, the retry is skipped.
    post(&on, "/v1/batch", &a).await.assert_success();
    let a_copies = copies(&h, "a-").await;
    assert_eq!(a_copies.len(), 3);
    assert!(a_copies.values().all(|n| *n == 1), "{a_copies:?}");

    let text = metrics.render();
    assert_eq!(
        value(
            &text,
            r#"herald_ingest_dedupe_hits_total{layer="seen_set"}"#
        ),
        3.0,
        "{text}"
    );
    assert!(text.contains("# HELP herald_ingest_dedupe_hits_total "));
    // The bucket: `<prefix>-seen`, keyed by hashed ids, expiring after the window.
    let kv =
        h.js.get_key_value("herald-seen")
            .await
            .expect("seen bucket");
    let status = kv.status().await.expect("bucket status");
    assert_eq!(status.max_age(), Duration::from_secs(24 * 3600));
    assert_eq!(status.values(), 3);
    let key = herald_ingest::SeenSet::key("acceptance:a-0");
    assert!(kv.get(&key).await.expect("read").is_some());
}

#[tokio::test]
async fn an_unusable_seen_set_never_blocks_ingestion() {
    let metrics = herald_common::telemetry::metrics();
    let h = Harness::start().await;
    // A stream in the bucket's place that cannot become the bucket (memory, not file).
    h.js.create_stream(stream::Config {
        name: "KV_herald-seen".into(),
        subjects: vec!["$KV.herald-seen.>".into()],
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("blocking stream");
    let on = with_seen_set(&h, 600);
    let body = segment_batch((0..3).map(|i| segment_track("u1", i)).collect());
    post(&on, "/v1/batch", &body).await.assert_success();
    post(&on, "/v1/batch", &body).await.assert_success();
    // JetStream's duplicate window still dedupes the retry.
    let ids: Vec<String> = h.stored().await.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids, ["u1-0", "u1-1", "u1-2"]);
    let text = metrics.render();
    for op in ["read", "write"] {
        assert_eq!(
            value(
                &text,
                &format!(r#"herald_ingest_seen_set_failures_total{{op="{op}"}}"#)
            ),
            2.0,
            "{op}:\n{text}"
        );
    }
    assert_eq!(
        value(
            &text,
            r#"herald_ingest_dedupe_hits_total{layer="jetstream"}"#
        ),
        3.0,
        "{text}"
    );
    assert!(text.contains("# HELP herald_ingest_seen_set_failures_total "));
}
