//! `herald quarantine list|redrive` against a real ingest (in process, port 0) over a real
//! nats-server.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use herald_common::Secret;
use herald_ingest::{IngestConfig, SourceConfig};
use herald_testkit::{HeraldCli, NatsServer, common_config, wait_ready, wait_until};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "cli-quarantine-test-token";
const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_list_and_redrive_from_the_cli() -> Result<()> {
    let nats = NatsServer::start().await?;
    let common = common_config(&nats.url(), 4, TOKEN);
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
    wait_ready("ingest is ready", handle.admin_addr, DEADLINE).await?;

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
    let herald = HeraldCli::new(Path::new(env!("CARGO_BIN_EXE_herald")));
    // The admin commands, with the URL and the token.
    let cli = herald
        .clone()
        .trailing(["--ingest-url", url.as_str(), "--token", TOKEN]);
    let res = cli
        .run(&["quarantine", "list", "--source", "svc", "--payload"])
        .await?;
    let (ok, out, err) = (res.ok, res.stdout, res.stderr);
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
    let res = cli.run(&["quarantine", "list", "--limit", "1"]).await?;
    let (ok, out, err) = (res.ok, res.stdout, res.stderr);
    assert!(ok, "{err}");
    assert!(out.contains("--start-sequence"), "{out}");

    // Redrive one by sequence: it fails again and comes back with attempt 2.
    let res = cli
        .run(&["quarantine", "redrive", "--sequence", first_seq])
        .await?;
    let (ok, out, err) = (res.ok, res.stdout, res.stderr);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("{first_seq}: quarantined again as")),
        "{out}"
    );
    assert!(out.contains("1 quarantined again"), "{out}");

    // Redrive all of the source.
    let res = cli
        .run(&["quarantine", "redrive", "--source", "svc", "--all"])
        .await?;
    let (ok, out, err) = (res.ok, res.stdout, res.stderr);
    assert!(ok, "{err}");
    assert!(out.contains("Redrove 2 records"), "{out}");

    // Sequence that does not exist; a missing token.
    let res = cli
        .run(&["quarantine", "redrive", "--sequence", "999999"])
        .await?;
    let (ok, out, _) = (res.ok, res.stdout, res.stderr);
    assert!(ok);
    assert!(out.contains("999999: no such record"), "{out}");
    let res = herald
        .run(&[
            "quarantine",
            "list",
            "--ingest-url",
            &url,
            "--token",
            "wrong",
        ])
        .await?;
    let (ok, _, err) = (res.ok, res.stdout, res.stderr);
    assert!(!ok);
    assert!(err.to_lowercase().contains("token"), "{err}");

    stop.cancel();
    tokio::time::timeout(DEADLINE, handle.task).await??;
    Ok(())
}
