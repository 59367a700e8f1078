//! Privacy in the history and replay, against a real `herald dev`: a person erased through
//! `herald erase` never reaches a destination created afterwards with `--start all` (which gets
//! everyone else's old events, and the erasure once), and `herald replay` re-sends a window of
//! events to one destination only, with the erased person's still held back.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use chrono::{SecondsFormat, Utc};
use herald_testkit::{
    HeraldCli, HeraldDev, WebhookServer, segment_batch, segment_track, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// Posts the `seq`-th track event of `user`.
async fn post(dev: &HeraldDev, key: &str, user: &str, seq: usize) -> Result<()> {
    let status = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/batch",
            dev.ports.ingest_http
        ))
        .basic_auth(key, Some(""))
        .json(&segment_batch(vec![segment_track(user, seq)]))
        .send()
        .await?
        .status();
    ensure!(status.is_success(), "ingest answered {status}");
    Ok(())
}

/// The activator's counter of events of `destination` skipped for `reason`.
async fn skipped(dev: &HeraldDev, destination: &str, reason: &str) -> u64 {
    let Ok(res) = reqwest::get(format!(
        "http://127.0.0.1:{}/metrics",
        dev.ports.activator_admin
    ))
    .await
    else {
        return 0;
    };
    let text = res.text().await.unwrap_or_default();
    text.lines()
        .find(|l| {
            l.starts_with("herald_activator_events_skipped_total{")
                && l.contains(&format!(r#"destination="{destination}""#))
                && l.contains(&format!(r#"reason="{reason}""#))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// The `userId`s of the tracks a webhook received, in order, and how many erasures.
fn received(hook: &WebhookServer) -> (Vec<String>, usize) {
    let got = hook.received();
    let users = got
        .iter()
        .filter(|r| r.body["type"] == "track")
        .map(|r| r.body["messageId"].as_str().unwrap_or_default().to_string())
        .collect();
    let erasures = got.iter().filter(|r| r.body["type"] == "erasure").count();
    (users, erasures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erased_people_stay_out_of_the_history_and_replay_resends_a_window() -> Result<()> {
    let herald = Path::new(env!("CARGO_BIN_EXE_herald"));
    let dir = tempfile::tempdir()?;
    let dev = HeraldDev::start_in(herald, dir.path()).await?;
    let key = std::fs::read_to_string(dev.data_dir().join("write_key"))?;
    let key = key.trim();
    let activator = HeraldCli::new(herald).current_dir(dir.path()).trailing([
        "--activator-url".to_string(),
        format!("http://127.0.0.1:{}", dev.ports.activator_grpc),
    ]);
    let processor = HeraldCli::new(herald).current_dir(dir.path()).trailing([
        "--processor-url".to_string(),
        format!("http://127.0.0.1:{}", dev.ports.processor_grpc),
    ]);

    // Live: ann's and bob's events reach a destination.
    let early = WebhookServer::start().await?;
    activator
        .ok(&[
            "destinations",
            "create",
            "early",
            "--kind",
            "webhook",
            "--set",
            &format!("url={}", early.url()),
        ])
        .await?;
    let from = now();
    for seq in 1..=3 {
        post(&dev, key, "ann", seq).await?;
        post(&dev, key, "bob", seq).await?;
    }
    early.wait_for(6, DEADLINE).await?;
    let to = now();

    // Bob is erased; a destination created afterwards from the oldest event gets ann's events
    // and the erasure (once), never bob's.
    let out = processor.ok(&["erase", "user_id:bob"]).await?;
    ensure!(!out.is_empty(), "erase printed nothing");
    let late = WebhookServer::start().await?;
    activator
        .ok(&[
            "destinations",
            "create",
            "late",
            "--kind",
            "webhook",
            "--set",
            &format!("url={}", late.url()),
            "--start",
            "all",
        ])
        .await?;
    late.wait_for(4, DEADLINE).await?;
    wait_until(
        "bob's three events are counted as suppressed",
        DEADLINE,
        || async { skipped(&dev, "late", "suppressed").await == 3 },
    )
    .await?;
    let (tracks, erasures) = received(&late);
    assert_eq!(tracks, ["ann-1", "ann-2", "ann-3"]);
    assert_eq!(erasures, 1);
    let got = late.received();
    let erasure = got
        .iter()
        .find(|r| r.body["type"] == "erasure")
        .context("the erasure")?;
    assert!(
        erasure.body["identities"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|i| i["value"] == "bob")),
        "{}",
        erasure.body
    );
    // The live destination got the erasure once as well.
    early.wait_for(7, DEADLINE).await?;
    assert_eq!(received(&early).1, 1);

    // Replay of the window to `late` only: ann's three again, bob's held back.
    let replayed = activator
        .ok(&[
            "replay",
            "--destination",
            "late",
            "--from",
            &from,
            "--to",
            &to,
        ])
        .await?;
    assert!(
        replayed.contains("Replayed 6 events to late: 3 sent, 3 not sent"),
        "{replayed}"
    );
    let (tracks, erasures) = received(&late);
    assert_eq!(
        tracks,
        ["ann-1", "ann-2", "ann-3", "ann-1", "ann-2", "ann-3"]
    );
    assert_eq!(erasures, 1);
    assert_eq!(
        early.received().len(),
        7,
        "the other destination got nothing"
    );

    // A replay to no such destination says so.
    let unknown = activator
        .run(&[
            "replay",
            "--destination",
            "nope",
            "--from",
            &from,
            "--to",
            &to,
        ])
        .await?;
    assert!(!unknown.ok);
    dev.stop().await?;
    Ok(())
}
