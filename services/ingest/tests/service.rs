//! The whole service through `start()`: real listeners on port 0, gRPC, admin, shutdown.

use std::time::Duration;

use herald_common::auth::BearerToken;
use herald_common::server::ServiceHandle;
use herald_proto::v1::ListSourcesRequest;
use herald_proto::v1::source_service_client::SourceServiceClient;
use herald_testkit::ingest::{CONTROL_TOKEN, WRITE_KEY, common_config, ingest_config};
use herald_testkit::{NatsServer, segment_batch, segment_track, wait_until};
use tokio_util::sync::CancellationToken;

async fn start_ingest(nats_url: &str, token: &CancellationToken) -> ServiceHandle {
    let mut cfg = ingest_config();
    cfg.http_addr = "127.0.0.1:0".into();
    cfg.grpc_addr = "127.0.0.1:0".into();
    cfg.admin_addr = "127.0.0.1:0".into();
    herald_ingest::start(
        &common_config(nats_url),
        &cfg,
        herald_common::telemetry::metrics(),
        token.clone(),
    )
    .await
    .expect("ingest starts")
}

async fn get(url: String) -> (u16, String) {
    match reqwest::get(&url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

async fn wait_ready(handle: &ServiceHandle) {
    let url = format!("http://{}/readyz", handle.admin_addr);
    wait_until("ingest is ready", Duration::from_secs(20), || {
        let url = url.clone();
        async move { get(url).await.0 == 200 }
    })
    .await
    .expect("ready");
}

#[tokio::test]
async fn serves_http_grpc_and_admin_then_shuts_down() {
    let nats = NatsServer::start().await.expect("nats-server");
    let token = CancellationToken::new();
    let handle = start_ingest(&nats.url(), &token).await;
    assert_eq!(handle.name, "ingest");
    let http_addr = handle.http_addr.expect("ingest has an HTTP address");
    assert_ne!(http_addr.port(), 0);
    assert_ne!(handle.grpc_addr.port(), 0);
    assert_ne!(handle.admin_addr.port(), 0);
    wait_ready(&handle).await;

    // The stream was provisioned with Herald's config.
    let js = nats.jetstream().await;
    let mut stream = js.get_stream("HERALD_EVENTS").await.expect("events stream");
    let info = stream.info().await.expect("info");
    assert_eq!(
        info.config.retention,
        async_nats::jetstream::stream::RetentionPolicy::Interest
    );
    assert_eq!(info.config.subjects, ["herald.events.*"]);

    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        http.post(format!("http://{http_addr}/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&body)
            .send()
    };
    let reply = post(segment_batch(vec![segment_track("u1", 1)]))
        .await
        .expect("HTTP answer");
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.text().await.unwrap(), r#"{"success":true}"#);
    // The same event again (a retry), next to an invalid one.
    let retry = segment_batch(vec![
        segment_track("u1", 1),
        serde_json::json!({"type": "track", "userId": "u1"}),
    ]);
    assert_eq!(post(retry).await.expect("HTTP answer").status(), 200);

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", handle.grpc_addr))
        .expect("URL")
        .connect()
        .await
        .expect("gRPC connects");
    let mut grpc = SourceServiceClient::with_interceptor(
        channel,
        BearerToken::new(CONTROL_TOKEN).expect("token"),
    );
    let sources = grpc
        .list_sources(ListSourcesRequest {})
        .await
        .expect("ListSources")
        .into_inner()
        .sources;
    let listed: Vec<(&str, &str, bool)> = sources
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str(), s.enabled))
        .collect();
    assert_eq!(
        listed,
        [
            ("acceptance", "Acceptance", true),
            ("disabled", "Disabled", false)
        ]
    );
    assert!(!format!("{sources:?}").contains(WRITE_KEY));

    let (status, metrics) = get(format!("http://{}/metrics", handle.admin_addr)).await;
    assert_eq!(status, 200);
    for name in [
        "herald_ingest_requests_total",
        "herald_ingest_events_accepted_total",
        "herald_ingest_request_duration_seconds",
        "herald_ingest_publish_duration_seconds",
        "herald_ingest_received_bytes_total",
        "herald_ingest_events_rejected_total",
        "herald_ingest_dedupe_hits_total",
    ] {
        assert!(
            metrics.contains(&format!("# HELP {name} ")),
            "HELP for {name}:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"herald_ingest_requests_total{route="/v1/batch",status="200"} 2"#),
        "{metrics}"
    );
    for line in [
        r#"herald_ingest_events_accepted_total{source="acceptance"} 2"#,
        r#"herald_ingest_events_rejected_total{reason="missing_event"} 1"#,
        r#"herald_ingest_dedupe_hits_total{layer="jetstream"} 1"#,
        r#"herald_ingest_dedupe_hits_total{layer="seen_set"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line}:\n{metrics}");
    }
    assert!(
        metrics.contains("herald_ingest_request_duration_seconds_bucket{"),
        "histograms have buckets:\n{metrics}"
    );
    let (_, health) = get(format!("http://{}/healthz", handle.admin_addr)).await;
    assert_eq!(health, "ok\n");

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle.task)
        .await
        .expect("ingest stops within 10 s of the shutdown signal")
        .expect("task ends cleanly");
    assert!(
        reqwest::get(format!("http://{}/readyz", handle.admin_addr))
            .await
            .is_err(),
        "the admin port is closed"
    );
}

#[tokio::test]
async fn waits_unready_for_nats_instead_of_crashing() {
    let mut nats = NatsServer::start().await.expect("nats-server");
    nats.stop().await;
    let token = CancellationToken::new();
    let handle = start_ingest(&nats.url(), &token).await;
    let (status, body) = get(format!("http://{}/readyz", handle.admin_addr)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("nats connection"), "{body}");
    assert!(body.contains("events stream"), "{body}");

    nats.restart().await.expect("nats-server restarts");
    wait_ready(&handle).await;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle.task)
        .await
        .expect("stops")
        .expect("task ends cleanly");
}
