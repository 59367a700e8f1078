//! `herald quarantine list|redrive` against a real ingest (in process, port 0) over a real
//! nats-server.

use std::time::Duration;

use anyhow::Result;
use herald_common::{CommonConfig, ControlConfig, NatsConfig, Secret, TopologyConfig};
use herald_ingest::{IngestConfig, SourceConfig};
use herald_testkit::{NatsServer, wait_until};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "cli-quarantine-test-token";
const DEADLINE: Duration = Duration::from_secs(20);

async fn herald(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env_remove("HERALD_TOKEN")
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_list_and_redrive_from_the_cli() -> Result<()> {
    let nats = NatsServer::start().await?;
    let common = CommonConfig {
        nats: NatsConfig {
            servers: nats.url(),
            request_timeout_ms: 2_000,
            ..Default::default()
        },
        topology: TopologyConfig {
            partitions: 4,
            ..Default::default()
        },
        control: ControlConfig::with_token(TOKEN),
    };
    let cfg = IngestConfig {
        http_addr: "127.0.0.1:0".into(),
        grpc_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        sources: vec![SourceConfig {
            id: "svc".into(),
            name: "Service".into(),
            write_key: Secret("svc-write-key".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let handle = herald_ingest::start(
        &common,
        &cfg,
        herald_common::telemetry::metrics(),
        stop.clone(),
    )
    .await?;
    let ready = format!("http://{}/readyz", handle.admin_addr);
    wait_until("ingest is ready", DEADLINE, || {
        let ready = ready.clone();
        async move {
            reqwest::get(&ready)
                .await
                .is_ok_and(|r| r.status().as_u16() == 200)
        }
    })
    .await?;

    // Two messages ingest cannot accept.
    let js = nats.jetstream().await;
    for i in 0..2 {
        let bad = format!(r#"{{"type":"track","event":"E","messageId":"bad-{i}"}}"#);
        js.publish("herald.in.svc", bad.into()).await?.await?;
    }
    wait_until("two quarantine records", DEADLINE, || {
        let js = js.clone();
        async move {
            match js.get_stream("HERALD_QUARANTINE").await {
                Ok(mut s) => s.info().await.is_ok_and(|i| i.state.messages == 2),
                Err(_) => false,
            }
        }
    })
    .await?;

    let url = format!("http://{}", handle.grpc_addr);
    let (ok, out, err) = herald(&[
        "quarantine",
        "list",
        "--ingest-url",
        &url,
        "--token",
        TOKEN,
        "--source",
        "svc",
        "--payload",
    ])
    .await?;
    assert!(ok, "{err}");
    assert!(out.contains("SEQUENCE") && out.contains("REASON"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("missing_identity"))
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].contains("nats:herald.in.svc"), "{out}");
    assert!(
        out.contains(r#""messageId":"bad-0""#),
        "payloads shown:\n{out}"
    );
    let first_seq = rows[0].split_whitespace().next().expect("a sequence");

    // Paging.
    let (ok, out, err) = herald(&[
        "quarantine",
        "list",
        "--ingest-url",
        &url,
        "--token",
        TOKEN,
        "--limit",
        "1",
    ])
    .await?;
    assert!(ok, "{err}");
    assert!(out.contains("--start-sequence"), "{out}");

    // Redrive one by sequence: it fails again and comes back with attempt 2.
    let (ok, out, err) = herald(&[
        "quarantine",
        "redrive",
        "--ingest-url",
        &url,
        "--token",
        TOKEN,
        "--sequence",
        first_seq,
    ])
    .await?;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("{first_seq}: quarantined again as")),
        "{out}"
    );
    assert!(out.contains("1 quarantined again"), "{out}");

    // Redrive all of the source.
    let (ok, out, err) = herald(&[
        "quarantine",
        "redrive",
        "--ingest-url",
        &url,
        "--token",
        TOKEN,
        "--source",
        "svc",
        "--all",
    ])
    .await?;
    assert!(ok, "{err}");
    assert!(out.contains("Redrove 2 records"), "{out}");

    // Sequence that does not exist; a missing token.
    let (ok, out, _) = herald(&[
        "quarantine",
        "redrive",
        "--ingest-url",
        &url,
        "--token",
        TOKEN,
        "--sequence",
        "999999",
    ])
    .await?;
    assert!(ok);
    assert!(out.contains("999999: no such record"), "{out}");
    let (ok, _, err) = herald(&[
        "quarantine",
        "list",
        "--ingest-url",
        &url,
        "--token",
        "wrong",
    ])
    .await?;
    assert!(!ok);
    assert!(err.to_lowercase().contains("token"), "{err}");

    stop.cancel();
    tokio::time::timeout(DEADLINE, handle.task).await??;
    Ok(())
}
