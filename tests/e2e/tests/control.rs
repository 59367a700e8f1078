//! Control APIs, health and readiness of the three services.

use std::time::Duration;

use anyhow::Result;
use herald_common::{CommonConfig, NatsConfig, telemetry};
use herald_e2e::{Pipeline, PipelineOptions, SOURCE_ID, wait_ready};
use herald_proto::v1::activator_service_client::ActivatorServiceClient;
use herald_proto::v1::ingest_service_client::IngestServiceClient;
use herald_proto::v1::processor_service_client::ProcessorServiceClient;
use herald_proto::v1::{GetStatusRequest, ListDestinationsRequest, ListSourcesRequest};
use herald_testkit::{NatsServer, WebhookServer, segment_batch, segment_track};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rpcs_report_sources_status_and_destinations() -> Result<()> {
    let nats = NatsServer::start().await?;
    let hook = WebhookServer::start().await?;
    let p = Pipeline::start(
        &nats.url(),
        PipelineOptions {
            webhook_url: Some(hook.url()),
            ..Default::default()
        },
    )
    .await?;
    let batch = segment_batch((0..10).map(|i| segment_track("user-1", i)).collect());
    assert_eq!(p.post_batch(&batch).await?.0, 200);
    hook.wait_for(10, Duration::from_secs(30)).await?;

    let url = |a: std::net::SocketAddr| format!("http://{a}");
    let mut ingest = IngestServiceClient::connect(url(p.ingest.grpc_addr)).await?;
    let sources = ingest
        .list_sources(ListSourcesRequest {})
        .await?
        .into_inner()
        .sources;
    assert_eq!(sources.len(), 1);
    assert_eq!(sources[0].id, SOURCE_ID);
    assert!(sources[0].enabled);

    let mut processor = ProcessorServiceClient::connect(url(p.processor.grpc_addr)).await?;
    let status = processor
        .get_status(GetStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(status.consumer, "processor");
    assert_eq!(status.processed, 10);
    assert_eq!(status.pending, 0);

    let mut activator = ActivatorServiceClient::connect(url(p.activator.grpc_addr)).await?;
    let dests = activator
        .list_destinations(ListDestinationsRequest {})
        .await?
        .into_inner()
        .destinations;
    assert_eq!(dests.len(), 1);
    assert_eq!(
        (dests[0].id.as_str(), dests[0].kind.as_str()),
        ("hook", "webhook")
    );
    assert_eq!(dests[0].delivered, 10);

    for (addr, service) in [
        (p.ingest.grpc_addr, "herald.v1.IngestService"),
        (p.processor.grpc_addr, "herald.v1.ProcessorService"),
        (p.activator.grpc_addr, "herald.v1.ActivatorService"),
    ] {
        let channel = tonic::transport::Channel::from_shared(url(addr))?
            .connect()
            .await?;
        let mut health = HealthClient::new(channel);
        let res = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        assert_eq!(res.status, 1, "{service} reports SERVING");
    }
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_waits_not_ready_until_the_events_stream_exists() -> Result<()> {
    let nats = NatsServer::start().await?;
    let common = CommonConfig {
        nats: NatsConfig {
            servers: nats.url(),
            ..Default::default()
        },
        ..Default::default()
    };
    let cfg = herald_processor::ProcessorConfig {
        grpc_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let h = herald_processor::start(&common, &cfg, telemetry::metrics(), shutdown.clone()).await?;
    let http = reqwest::Client::new();
    let readyz = format!("http://{}/readyz", h.admin_addr);
    // The processed stream (its own) appears; the events stream (ingest's) does not.
    herald_testkit::wait_until(
        "the processor creates its stream",
        Duration::from_secs(20),
        || {
            let nats = &nats;
            async move {
                let js = nats.jetstream().await;
                js.get_stream("HERALD_PROCESSED").await.is_ok()
            }
        },
    )
    .await?;
    let res = http.get(&readyz).send().await?;
    assert_eq!(res.status(), 503);
    assert!(res.text().await?.contains("events consumer"));
    assert_eq!(
        http.get(format!("http://{}/healthz", h.admin_addr))
            .send()
            .await?
            .status(),
        200
    );

    // Ingest creates the events stream; the processor binds and becomes ready by itself.
    let js = nats.jetstream().await;
    herald_common::nats::ensure_stream(
        &js,
        herald_common::Topology::new(Default::default()).events_stream_config(),
    )
    .await?;
    wait_ready(&http, h.admin_addr).await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), h.task).await??;
    Ok(())
}
