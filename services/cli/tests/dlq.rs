//! `herald dlq list|redrive|purge` against a real activator (in process, port 0) over a real
//! nats-server and a webhook on loopback.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use herald_activator::{ActivatorConfig, DestinationConfig, DestinationKind, Settings};
use herald_common::Topology;
use herald_proto::v1::ProcessedEvent;
use herald_testkit::{
    HeraldCli, NatsServer, WebhookServer, common_config, protobuf_track, wait_ready, wait_until,
};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "cli-dlq-test-token";
const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_redrive_and_purge_from_the_cli() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await;
    let common = common_config(&nats.url(), 1, TOKEN);
    let topology = Topology::new(common.topology.clone());
    herald_testkit::activator_upstream(&js, &topology).await?;
    let hook = WebhookServer::start().await?;
    hook.set_failing_for(400, r#""user-1-1""#);
    let cfg = ActivatorConfig {
        grpc_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        retry_max_backoff_ms: 100,
        destinations: vec![DestinationConfig {
            id: "hook".into(),
            kind: DestinationKind::Webhook,
            settings: Settings([("url".to_string(), hook.url())].into()),
            ..Default::default()
        }],
        allow_private_networks: vec!["127.0.0.0/8".parse()?],
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let activator = herald_activator::start(
        &common,
        &cfg,
        herald_common::telemetry::metrics(),
        stop.clone(),
    )
    .await?;
    wait_ready("the activator is ready", activator.admin_addr, DEADLINE).await?;
    let publish = |seq: u64| {
        let js = js.clone();
        let subject = topology.processed_subject(0);
        async move {
            let processed = ProcessedEvent {
                event: Some(protobuf_track("src", "user-1", seq, 1)),
                profile_id: "p-1".into(),
                ..Default::default()
            };
            js.publish(subject, processed.encode_to_vec().into())
                .await?
                .await
                .context("stored")
        }
    };
    publish(1).await?;
    publish(2).await?;
    hook.wait_for(1, DEADLINE).await?;
    let dlq_size = || {
        let js = js.clone();
        let stream = topology.dlq_stream();
        async move {
            match js.get_stream(stream).await {
                Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(u64::MAX),
                Err(_) => u64::MAX,
            }
        }
    };
    wait_until("one dead letter", DEADLINE, || async {
        dlq_size().await == 1
    })
    .await?;

    let url = format!("http://{}", activator.grpc_addr);
    let cli = HeraldCli::new(Path::new(env!("CARGO_BIN_EXE_herald"))).trailing([
        "--activator-url",
        url.as_str(),
        "--token",
        TOKEN,
    ]);

    // The table, then one JSON object per dead letter.
    let table = cli.ok(&["dlq", "list", "--destination", "hook"]).await?;
    assert!(table.contains("ATTEMPTS"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("src:user-1-1") && l.contains(" 400 ") && l.contains("permanent")),
        "{table}"
    );
    let listed = cli
        .ok(&["dlq", "list", "--destination", "hook", "--json"])
        .await?;
    let lines: Vec<serde_json::Value> = listed
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 1, "{listed}");
    let r = &lines[0];
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["lastStatus"], 400);
    assert_eq!(r["bodyExcerpt"], r#"{"error":"failing on purpose"}"#);
    // The event as its Segment-spec payload.
    assert_eq!(r["event"]["messageId"], "user-1-1");
    assert_eq!(r["event"]["type"], "track");
    assert_eq!(r["event"]["herald"]["eventId"], "src:user-1-1");

    // Redriven while the destination still refuses it: it stays, with one more attempt.
    let failed = cli
        .run(&[
            "dlq",
            "redrive",
            "--destination",
            "hook",
            "--event",
            "src:user-1-1",
        ])
        .await?;
    assert!(!failed.ok, "{}", failed.stdout);
    assert!(failed.stdout.contains("not delivered"), "{}", failed.stdout);
    let listed = cli
        .ok(&["dlq", "list", "--destination", "hook", "--json"])
        .await?;
    let r: serde_json::Value = serde_json::from_str(listed.lines().next().context("a line")?)?;
    assert_eq!(r["attempts"], 2, "{listed}");
    // An unknown event id is reported.
    let unknown = cli
        .run(&[
            "dlq",
            "redrive",
            "--destination",
            "hook",
            "--event",
            "src:nope",
        ])
        .await?;
    assert!(
        unknown.stdout.contains("no dead letter"),
        "{}",
        unknown.stdout
    );

    // Once the sink accepts it, a redrive delivers it and it leaves the DLQ.
    hook.set_healthy();
    let out = cli
        .ok(&["dlq", "redrive", "--destination", "hook", "--all"])
        .await?;
    assert!(out.contains("1 delivered"), "{out}");
    let got = hook.wait_for(2, DEADLINE).await?;
    assert_eq!(got[1].header("idempotency-key"), Some("src:user-1-1"));
    assert_eq!(dlq_size().await, 0);
    let empty = cli.ok(&["dlq", "list", "--destination", "hook"]).await?;
    assert!(empty.contains("is empty"), "{empty}");

    // Delivery status: by Herald's id, and by the messageId alone (under every source).
    let config = js
        .get_key_value(topology.bucket("config"))
        .await
        .context("the config bucket")?;
    config.put("sources.src", "{}".into()).await?;
    // A plain delivery is not recorded by default, and the answer says so.
    let status = cli.ok(&["delivery", "src:user-1-2"]).await?;
    assert!(
        status.contains("No delivery record")
            && status.contains("Plain deliveries are not recorded"),
        "{status}"
    );
    let by_message_id = cli.ok(&["delivery", "user-1-1", "--json"]).await?;
    let v: serde_json::Value = serde_json::from_str(by_message_id.trim())?;
    assert_eq!(v["eventId"], "src:user-1-1", "{v}");
    // Dead-lettered first, then delivered by the redrive (two earlier attempts, this one).
    assert_eq!(v["destinations"][0]["state"], "delivered", "{v}");
    assert_eq!(v["destinations"][0]["attempts"], 3, "{v}");
    let unknown = cli.ok(&["delivery", "src:never-sent"]).await?;
    assert!(unknown.contains("No delivery record"), "{unknown}");

    // Purge.
    hook.set_failing_for(400, r#""user-1-3""#);
    publish(3).await?;
    wait_until("a new dead letter", DEADLINE, || async {
        dlq_size().await == 1
    })
    .await?;
    let out = cli.ok(&["dlq", "purge", "--destination", "hook"]).await?;
    assert!(out.contains("Purged 1 dead letters of hook"), "{out}");
    assert_eq!(dlq_size().await, 0);
    let status = cli.ok(&["delivery", "src:user-1-3", "--json"]).await?;
    let v: serde_json::Value = serde_json::from_str(status.trim())?;
    assert_eq!(v["destinations"][0]["state"], "dlq", "{v}");
    assert_eq!(v["destinations"][0]["lastStatus"], 400, "{v}");

    // A destination that records every delivery: its plain delivery has a record, the
    // other destination's (global recording off) has none, and each says which it is.
    hook.set_healthy();
    let hook_url = hook.url();
    let set_url = format!("url={hook_url}");
    cli.ok(&[
        "destinations",
        "create",
        "recorded",
        "--kind",
        "webhook",
        "--set",
        &set_url,
        "--record-deliveries",
        "true",
    ])
    .await?;
    let shown = cli.ok(&["destinations", "get", "recorded"]).await?;
    assert!(shown.contains("delivery records: every one"), "{shown}");
    let shown = cli.ok(&["destinations", "get", "hook"]).await?;
    assert!(
        shown.contains("delivery records: failures and retries only"),
        "{shown}"
    );
    // Wait until the new destination's consumers deliver: event 4 reaches both.
    let before = hook.received().len();
    publish(4).await?;
    hook.wait_for(before + 2, DEADLINE).await?;
    // The record is written before the ack, shortly after the request.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let v: serde_json::Value = loop {
        let out = cli.ok(&["delivery", "src:user-1-4", "--json"]).await?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        let recorded = v["destinations"]
            .as_array()
            .is_some_and(|ds| ds.iter().any(|d| d["state"] == "delivered"));
        if recorded || tokio::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let by_id = |id: &str| {
        v["destinations"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["destination"] == id))
            .cloned()
            .unwrap_or_default()
    };
    let recorded = by_id("recorded");
    assert_eq!(recorded["state"], "delivered", "{v}");
    assert_eq!(recorded["attempts"], 1, "{v}");
    assert_eq!(recorded["deliveredRecorded"], true, "{v}");
    let plain = by_id("hook");
    assert!(plain["state"].is_null(), "{v}");
    assert_eq!(plain["deliveredRecorded"], false, "{v}");
    assert_eq!(v["deliveredRecorded"], false, "{v}");
    let table = cli.ok(&["delivery", "src:user-1-4"]).await?;
    assert!(
        table.contains("--record-deliveries true on the destination"),
        "{table}"
    );

    stop.cancel();
    let _ = activator.task.await;
    Ok(())
}
