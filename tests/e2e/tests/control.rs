//! Control APIs, health and readiness of the three services.

use std::time::Duration;

use anyhow::Result;
use herald_common::auth::BearerToken;
use herald_common::server::ServiceHandle;
use herald_common::{CommonConfig, ControlConfig, NatsConfig, telemetry};
use herald_e2e::{CONTROL_TOKEN, Pipeline, PipelineOptions, SOURCE_ID, processor_config};
use herald_proto::v1::destination_service_client::DestinationServiceClient;
use herald_proto::v1::processor_service_client::ProcessorServiceClient;
use herald_proto::v1::source_service_client::SourceServiceClient;
use herald_proto::v1::{GetStatusRequest, ListDestinationsRequest, ListSourcesRequest};
use herald_testkit::{NatsServer, WebhookServer, segment_batch, segment_track};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rpcs_report_sources_status_and_destinations() -> Result<()> {
    let nats = NatsServer::start().await?;
    let hook = WebhookServer::start().await?;
    let p = Pipeline::start(&nats.url(), PipelineOptions::webhook(hook.url())).await?;
    let batch = segment_batch((0..10).map(|i| segment_track("user-1", i)).collect());
    assert_eq!(p.post_batch(&batch).await?.0, 200);
    hook.wait_for(10, Duration::from_secs(30)).await?;

    let url = |a: std::net::SocketAddr| format!("http://{a}");
    let mut ingest = SourceServiceClient::new(authed(p.ingest.grpc_addr, CONTROL_TOKEN).await?);
    let sources = ingest
        .list_sources(ListSourcesRequest {})
        .await?
        .into_inner()
        .sources;
    assert_eq!(sources.len(), 1);
    assert_eq!(sources[0].id, SOURCE_ID);
    assert!(sources[0].enabled);

    let mut processor =
        ProcessorServiceClient::new(authed(p.processor.grpc_addr, CONTROL_TOKEN).await?);
    let status = processor
        .get_status(GetStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(status.consumer, "processor");
    assert_eq!(status.processed, 10);
    assert_eq!(status.pending, 0);

    let mut activator =
        DestinationServiceClient::new(authed(p.activator.grpc_addr, CONTROL_TOKEN).await?);
    let dests: Vec<_> = activator
        .list_destinations(ListDestinationsRequest {})
        .await?
        .into_inner()
        .items
        .into_iter()
        .filter_map(|d| d.status)
        .collect();
    assert_eq!(dests.len(), 1);
    assert_eq!(
        (dests[0].id.as_str(), dests[0].kind.as_str()),
        ("hook", "webhook")
    );
    assert_eq!(dests[0].delivered, 10);

    for (addr, service) in [
        (p.ingest.grpc_addr, "herald.v1.SourceService"),
        (p.processor.grpc_addr, "herald.v1.ProcessorService"),
        (p.activator.grpc_addr, "herald.v1.DestinationService"),
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
        control: ControlConfig::with_token(CONTROL_TOKEN),
        ..Default::default()
    };
    let cfg = processor_config();
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
    herald_testkit::wait_ready(
        "the activator is ready",
        h.admin_addr,
        Duration::from_secs(30),
    )
    .await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), h.task).await??;
    Ok(())
}

async fn authed(
    addr: std::net::SocketAddr,
    token: &str,
) -> Result<InterceptedService<Channel, BearerToken>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(InterceptedService::new(channel, BearerToken::new(token)?))
}

/// Every control API wants the bearer token; health stays open; a service without a configured
/// token refuses to start and says how to set one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_apis_require_the_token_and_health_does_not() -> Result<()> {
    let nats = NatsServer::start().await?;
    let p = Pipeline::start(&nats.url(), PipelineOptions::default()).await?;
    for token in [None, Some("wrong-token")] {
        // No authorization metadata at all, or a wrong token.
        let bearer = token.map(BearerToken::new).transpose()?;
        let intercept = move |req: tonic::Request<()>| match &bearer {
            Some(b) => tonic::service::Interceptor::call(&mut b.clone(), req),
            None => Ok(req),
        };
        let connect = |addr| async move {
            Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await
                .map_err(anyhow::Error::from)
        };
        let ingest = SourceServiceClient::with_interceptor(
            connect(p.ingest.grpc_addr).await?,
            intercept.clone(),
        )
        .list_sources(ListSourcesRequest {})
        .await
        .map(|_| ());
        let processor = ProcessorServiceClient::with_interceptor(
            connect(p.processor.grpc_addr).await?,
            intercept.clone(),
        )
        .get_status(GetStatusRequest {})
        .await
        .map(|_| ());
        let activator = DestinationServiceClient::with_interceptor(
            connect(p.activator.grpc_addr).await?,
            intercept,
        )
        .list_destinations(ListDestinationsRequest {})
        .await
        .map(|_| ());
        for (service, res) in [
            ("ingest", ingest),
            ("processor", processor),
            ("activator", activator),
        ] {
            let status = res.expect_err("refused without the right token");
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{service} with {token:?}: {status:?}"
            );
            assert!(
                status.message().contains("authorization: Bearer"),
                "{service}: the answer says how to pass the token: {status:?}"
            );
        }
    }
    for addr in [
        p.ingest.grpc_addr,
        p.processor.grpc_addr,
        p.activator.grpc_addr,
    ] {
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let res = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(res.status, 1, "health answers without a token");
    }
    p.stop().await;

    // No token configured: each service refuses to start, saying what to set.
    let common = CommonConfig {
        nats: NatsConfig {
            servers: nats.url(),
            ..Default::default()
        },
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let (m, s) = (telemetry::metrics, &shutdown);
    let errors = [
        refusal(herald_ingest::start(&common, &Default::default(), m(), s.clone()).await),
        refusal(herald_processor::start(&common, &Default::default(), m(), s.clone()).await),
        refusal(herald_activator::start(&common, &Default::default(), m(), s.clone()).await),
    ];
    for e in errors {
        assert!(e.contains("set control.token or control.token_file"), "{e}");
    }
    Ok(())
}

/// The error of a service start that must fail, as text.
fn refusal<E: std::fmt::Display>(started: Result<ServiceHandle, E>) -> String {
    match started {
        Ok(_) => panic!("the service started"),
        Err(e) => e.to_string(),
    }
}

/// `nats.servers` takes several URLs separated by commas; the client reaches whichever is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comma_separated_server_list_connects_to_the_live_server() -> Result<()> {
    let nats = NatsServer::start().await?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg = NatsConfig {
        servers: format!("nats://127.0.0.1:{dead}, {}", nats.url()),
        ..Default::default()
    };
    let client = herald_common::nats::connect(&cfg, "server-list-test").await?;
    tokio::time::timeout(std::time::Duration::from_secs(20), client.flush()).await??;
    let js = herald_common::nats::jetstream(client, &cfg);
    js.query_account().await?;
    Ok(())
}
