//! `herald destinations ...` against a real `herald dev`: a destination created through the CLI
//! starts receiving on the running activator, with its secret read from a file (`@path`) and a
//! header from the environment (`env:NAME`), shown as `***`; pause, resume, update and delete
//! take effect without a restart; errors say what to do next. And `herald activator` with a
//! config file in today's shape: its destination seeded, the deprecated keys mapped with one
//! warning.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use herald_testkit::{
    HeraldCli, HeraldDev, NatsServer, WebhookServer, free_ports, segment_batch, segment_track,
    spawn_role, wait_ready, wait_until, write_config,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// Posts the `seq`-th track event of `user` (distinct content, so no duplicate is dropped).
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_commands_take_effect_on_a_running_herald_dev() -> Result<()> {
    let herald = Path::new(env!("CARGO_BIN_EXE_herald"));
    let dir = tempfile::tempdir()?;
    let dev = HeraldDev::start_in(herald, dir.path()).await?;
    let key = std::fs::read_to_string(dev.data_dir().join("write_key"))?;
    let key = key.trim();
    let cli = HeraldCli::new(herald)
        .current_dir(dir.path())
        .env("HERALD_TEST_HOOK_TOKEN", "Bearer from-env")
        .trailing([
            "--activator-url".to_string(),
            format!("http://127.0.0.1:{}", dev.ports.activator_grpc),
        ]);
    let secret_file = dir.path().join("hook-secret");
    std::fs::write(&secret_file, "whsec-from-a-file\n")?;
    let hook = WebhookServer::start().await?;
    let other = WebhookServer::start().await?;

    // Created through the CLI: delivering within the deadline, the secret and header applied.
    let out = cli
        .ok(&[
            "destinations",
            "create",
            "crm",
            "--kind",
            "webhook",
            "--set",
            &format!("url={}", hook.url()),
            "--set",
            &format!("secret=@{}", secret_file.display()),
            "--set",
            "header.Authorization=env:HERALD_TEST_HOOK_TOKEN",
            "--event-type",
            "track",
            "--max-age",
            "2h",
        ])
        .await?;
    assert!(out.contains("Created destination crm"), "{out}");
    assert!(
        !out.contains("whsec-from-a-file") && !out.contains("from-env"),
        "{out}"
    );
    post(&dev, key, "u1", 1).await?;
    let got = hook.wait_for(1, DEADLINE).await?;
    assert_eq!(got[0].header("authorization"), Some("Bearer from-env"));
    let signature = got[0].header("herald-signature").unwrap_or_default();
    let t: u64 = signature
        .strip_prefix("t=")
        .and_then(|s| s.split(',').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_default();
    assert_eq!(
        signature,
        herald_activator::destinations::signature(b"whsec-from-a-file", t, &got[0].raw)
    );

    let shown = cli.ok(&["destinations", "get", "crm"]).await?;
    assert!(shown.contains("secret = ***"), "{shown}");
    assert!(shown.contains("header.Authorization = ***"), "{shown}");
    assert!(shown.contains("max age:          7200s"), "{shown}");
    let listed = cli.ok(&["destinations", "list"]).await?;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("crm ") && l.contains("active")),
        "{listed}"
    );
    assert!(listed.lines().any(|l| l.starts_with("log ")), "{listed}");

    // Paused, then resumed: what was sent meanwhile arrives after the resume.
    cli.ok(&["destinations", "pause", "crm"]).await?;
    wait_until("crm shows paused", DEADLINE, || async {
        cli.ok(&["destinations", "list"]).await.is_ok_and(|l| {
            l.lines()
                .any(|l| l.starts_with("crm ") && l.contains("paused"))
        })
    })
    .await?;
    cli.ok(&["destinations", "resume", "crm"]).await?;
    post(&dev, key, "u1", 2).await?;
    hook.wait_for(2, DEADLINE).await?;

    // Updated to another URL (the secret kept): later events go there.
    cli.ok(&[
        "destinations",
        "update",
        "crm",
        "--set",
        &format!("url={}", other.url()),
    ])
    .await?;
    post(&dev, key, "u1", 3).await?;
    let got = other.wait_for(1, DEADLINE).await?;
    assert!(got[0].header("herald-signature").is_some());
    assert_eq!(got[0].header("authorization"), Some("Bearer from-env"));

    // Deleted: gone from the list, and `get` says where to look.
    cli.ok(&["destinations", "delete", "crm"]).await?;
    let gone = cli.run(&["destinations", "get", "crm"]).await?;
    assert!(!gone.ok);
    assert!(
        gone.stderr.contains("herald destinations list"),
        "{}",
        gone.stderr
    );

    // Refused with what to do next: an invalid filter (with its position), an unset variable.
    let bad = cli
        .run(&[
            "destinations",
            "create",
            "bad",
            "--kind",
            "log",
            "--filter",
            "event.type ==",
        ])
        .await?;
    assert!(!bad.ok);
    assert!(bad.stderr.contains("at 1:"), "{}", bad.stderr);
    let unset = cli
        .run(&[
            "destinations",
            "create",
            "bad",
            "--kind",
            "webhook",
            "--set",
            "secret=env:HERALD_TEST_SURELY_UNSET",
        ])
        .await?;
    assert!(!unset.ok);
    assert!(
        unset.stderr.contains("export HERALD_TEST_SURELY_UNSET"),
        "{}",
        unset.stderr
    );
    dev.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_destinations_with_the_deprecated_keys_are_seeded_with_a_warning() -> Result<()>
{
    let herald = Path::new(env!("CARGO_BIN_EXE_herald"));
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start().await?;
    let ports = free_ports(2)?;
    let (grpc, admin) = (ports[0], ports[1]);
    let config = write_config(
        dir.path(),
        "activator",
        &nats.url(),
        "seed-test-token",
        &format!(
            r#"
[activator]
grpc_addr = "127.0.0.1:{grpc}"
admin_addr = "127.0.0.1:{admin}"
allow_private_networks = ["127.0.0.0/8"]

[[activator.destinations]]
id = "old"
kind = "webhook"
url = "http://127.0.0.1:9/hook"
timeout_ms = 2500
headers = {{ Authorization = "Bearer old-secret" }}

[[activator.destinations]]
id = "new"
kind = "log"
settings = {{ log_file = "{log}" }}
event_types = ["track"]
start = "all"
"#,
            log = dir.path().join("events.jsonl").display()
        ),
    )?;
    let log = dir.path().join("activator.log");
    let _activator = spawn_role(herald, "activator", &config, &log)?;
    // Ready once the destinations and the consent are loaded (it waits for the processed stream
    // to bind them, and for the processor's consent bucket).
    let js = nats.jetstream().await;
    let topology = herald_common::Topology::new(Default::default());
    herald_testkit::activator_upstream(&js, &topology).await?;
    wait_ready(
        "the activator is ready",
        format!("127.0.0.1:{admin}"),
        DEADLINE,
    )
    .await
    .with_context(|| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        format!("the activator's log:\n{text}")
    })?;
    let text = std::fs::read_to_string(&log)?;
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("deprecated")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("old: url, timeout_ms, headers"),
        "{}",
        warnings[0]
    );
    assert!(!text.contains("old-secret"), "{text}");

    let cli = HeraldCli::new(herald).trailing([
        "--activator-url".to_string(),
        format!("http://127.0.0.1:{grpc}"),
        "--token".to_string(),
        "seed-test-token".to_string(),
    ]);
    let old = cli.ok(&["destinations", "get", "old"]).await?;
    for want in [
        "setting:          url = http://127.0.0.1:9/hook",
        "setting:          timeout_ms = 2500",
        "setting:          header.Authorization = ***",
        "from config:      yes",
    ] {
        assert!(old.contains(want), "{want} in:\n{old}");
    }
    let new = cli.ok(&["destinations", "get", "new"]).await?;
    assert!(new.contains("event types:      track"), "{new}");
    assert!(new.contains("start:            all"), "{new}");
    Ok(())
}
