//! The NATS subject destination over a real nats-server: events are republished as the
//! webhook's JSON with `Nats-Msg-Id: <event id>`, through JetStream when a stream captures the
//! subject (stored, acknowledged), else as a core publish that a subscriber receives.

mod common;

use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::stream;
use futures_util::StreamExt as _;
use herald_activator::{DestinationConfig, DestinationKind, Settings, Start};
use herald_common::Topology;
use herald_proto::v1::destination_service_client::DestinationServiceClient;
use herald_proto::v1::{CreateDestinationRequest, DestinationSpec, ProcessedEvent};
use herald_testkit::{
    NatsServer, common_config, control_channel, processed_track, publish_processed, wait_ready,
    wait_until,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

fn nats_destination(id: &str, subject: &str) -> DestinationConfig {
    DestinationConfig {
        id: id.into(),
        kind: DestinationKind::Nats,
        settings: Settings([("subject".to_string(), subject.to_string())].into()),
        start: Start::All,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_republished_with_their_id_as_nats_msg_id() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await;
    let client = js.client();
    let common = common_config(&nats.url(), 1, "token-of-the-test");
    let topology = Topology::new(common.topology.clone());
    herald_testkit::activator_upstream(&js, &topology).await?;
    // A stream captures `crm.>`; nothing captures `plain.events`, which a subscriber reads.
    let crm = js
        .create_stream(stream::Config {
            name: "CRM".into(),
            subjects: vec!["crm.>".into()],
            allow_direct: true,
            ..Default::default()
        })
        .await?;
    let mut plain = client.subscribe("plain.events").await?;
    client.flush().await?;

    let events: Vec<ProcessedEvent> = (1..=3)
        .map(|seq| processed_track("user-1", seq, 1, "profile-1"))
        .collect();
    for e in &events {
        publish_processed(&js, &topology, e).await?;
    }

    let cfg = common::loopback_config(
        vec![
            nats_destination("to-stream", "crm.events"),
            nats_destination("to-core", "plain.events"),
        ],
        200,
    )?;
    let shutdown = CancellationToken::new();
    let activator = herald_activator::start(
        &common,
        &cfg,
        herald_common::telemetry::metrics(),
        shutdown.clone(),
    )
    .await?;
    wait_ready("the activator is ready", activator.admin_addr, DEADLINE).await?;

    let want: Vec<String> = events
        .iter()
        .map(|e| e.event.as_ref().map(|e| e.id.clone()).unwrap_or_default())
        .collect();

    // JetStream: the stream stores each event once, in order, with the header.
    let mut crm = crm;
    wait_until("the stream holds 3 events", DEADLINE, || {
        let mut crm = crm.clone();
        async move { crm.info().await.is_ok_and(|i| i.state.messages == 3) }
    })
    .await?;
    for (i, id) in want.iter().enumerate() {
        let msg = crm.direct_get(i as u64 + 1).await?;
        let header = msg
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string());
        assert_eq!(header.as_deref(), Some(id.as_str()));
        let body: Value = serde_json::from_slice(&msg.payload)?;
        assert_eq!(body["herald"]["eventId"], id.as_str());
        assert_eq!(body["type"], "track");
        assert_eq!(body["properties"]["seq"], i as u64 + 1);
    }
    assert_eq!(crm.info().await?.state.messages, 3);

    // Core: the subscriber receives each event with the header.
    for id in &want {
        let msg = tokio::time::timeout(DEADLINE, plain.next())
            .await
            .context("a core message in time")?
            .context("the subscription is open")?;
        let header = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string());
        assert_eq!(header.as_deref(), Some(id.as_str()));
        let body: Value = serde_json::from_slice(&msg.payload)?;
        assert_eq!(body["herald"]["eventId"], id.as_str());
    }

    // Through the control API (as `herald destinations create --kind nats --set subject=...`):
    // a wildcard is refused, a literal subject receives the history (in another stream: the
    // first one drops the same ids as duplicates, which is what Nats-Msg-Id is for).
    let audit = js
        .create_stream(stream::Config {
            name: "AUDIT".into(),
            subjects: vec!["audit.>".into()],
            ..Default::default()
        })
        .await?;
    let mut control = DestinationServiceClient::new(
        control_channel(activator.grpc_addr, "token-of-the-test").await?,
    );
    let spec = |subject: &str| DestinationSpec {
        id: "late-bus".into(),
        kind: "nats".into(),
        settings: [("subject".to_string(), subject.to_string())].into(),
        start: "all".into(),
        ..Default::default()
    };
    let refused = control
        .create_destination(CreateDestinationRequest {
            spec: Some(spec("crm.>")),
        })
        .await
        .expect_err("a wildcard subject");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("wildcard"),
        "{}",
        refused.message()
    );
    control
        .create_destination(CreateDestinationRequest {
            spec: Some(spec("audit.events")),
        })
        .await?;
    wait_until("the audit stream holds 3 events", DEADLINE, || {
        let mut audit = audit.clone();
        async move { audit.info().await.is_ok_and(|i| i.state.messages == 3) }
    })
    .await?;
    // The other destinations got nothing more.
    assert_eq!(crm.info().await?.state.messages, 3);

    shutdown.cancel();
    activator.task.await?;
    Ok(())
}
