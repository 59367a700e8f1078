//! Real `herald` processes killed with SIGKILL mid-stream resume from their durable consumers:
//! nothing is lost and each user's events still arrive in order.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use herald_testkit::{
    NatsServer, WebhookServer, free_port, segment_batch, segment_track, spawn_role, wait_ready,
    write_config,
};
use tokio::process::Child;

const READY: Duration = Duration::from_secs(30);

struct Ports {
    ingest_http: u16,
    ingest_admin: u16,
    processor_admin: u16,
    activator_admin: u16,
}

fn config(dir: &Path, nats: &str, hook: &str, ports: &Ports) -> Result<PathBuf> {
    write_config(
        dir,
        "herald",
        nats,
        "crash-test-control-token",
        &format!(
            r#"
[ingest]
http_addr = "127.0.0.1:{}"
grpc_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:{}"

[[ingest.sources]]
id = "crash"
name = "Crash test"
write_key = "crash-key"

[processor]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:{}"
ack_wait_seconds = 2

[activator]
grpc_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:{}"
ack_wait_seconds = 2
retry_max_backoff_ms = 500
allow_private_networks = ["127.0.0.0/8"]

[[activator.destinations]]
id = "hook"
kind = "webhook"
url = "{hook}"
"#,
            ports.ingest_http, ports.ingest_admin, ports.processor_admin, ports.activator_admin
        ),
    )
}

fn spawn(role: &str, config: &Path, log_dir: &Path) -> Result<Child> {
    spawn_role(
        Path::new(env!("CARGO_BIN_EXE_herald")),
        role,
        config,
        &log_dir.join(format!("{role}.log")),
    )
}

async fn ready(port: u16) -> Result<()> {
    wait_ready(
        &format!("127.0.0.1:{port} is ready"),
        format!("127.0.0.1:{port}"),
        READY,
    )
    .await
}

async fn send(
    http: &reqwest::Client,
    port: u16,
    users: usize,
    seqs: std::ops::Range<usize>,
) -> Result<()> {
    let mut items = Vec::new();
    for seq in seqs {
        for u in 0..users {
            items.push(segment_track(&format!("user-{u}"), seq));
        }
    }
    for chunk in items.chunks(50) {
        let res = http
            .post(format!("http://127.0.0.1:{port}/v1/batch"))
            .basic_auth("crash-key", Some(""))
            .json(&segment_batch(chunk.to_vec()))
            .send()
            .await?;
        if res.status() != 200 {
            bail!("ingest answered {}: {}", res.status(), res.text().await?);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_and_activator_killed_mid_stream_lose_nothing_and_keep_order() -> Result<()> {
    let nats = NatsServer::start().await?;
    let hook = WebhookServer::start().await?;
    let dir = tempfile::tempdir()?;
    let ports = Ports {
        ingest_http: free_port(),
        ingest_admin: free_port(),
        processor_admin: free_port(),
        activator_admin: free_port(),
    };
    let config = config(dir.path(), &nats.url(), &hook.url(), &ports)?;
    let _ingest = spawn("ingest", &config, dir.path())?;
    let mut processor = spawn("processor", &config, dir.path())?;
    let mut activator = spawn("activator", &config, dir.path())?;
    for p in [
        ports.ingest_admin,
        ports.processor_admin,
        ports.activator_admin,
    ] {
        ready(p).await?;
    }
    let http = reqwest::Client::new();
    let users = 40;

    // First half; kill both mid-delivery.
    send(&http, ports.ingest_http, users, 0..25).await?;
    hook.wait_for(200, Duration::from_secs(30)).await?;
    processor.kill().await?;
    activator.kill().await?;

    // Ingest keeps accepting while they are down.
    send(&http, ports.ingest_http, users, 25..50).await?;
    let mut processor = spawn("processor", &config, dir.path())?;
    ready(ports.processor_admin).await?;
    let mut activator = spawn("activator", &config, dir.path())?;
    ready(ports.activator_admin).await?;

    // Kill the activator again while it works through the backlog, and the processor too.
    let before = hook.received().len();
    hook.wait_for(before + 300, Duration::from_secs(30)).await?;
    activator.kill().await?;
    processor.kill().await?;
    let _processor = spawn("processor", &config, dir.path())?;
    let _activator = spawn("activator", &config, dir.path())?;

    let total = users * 50;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let ids: HashSet<String> = hook
            .received()
            .iter()
            .filter_map(|r| r.body["herald"]["eventId"].as_str().map(str::to_string))
            .collect();
        if ids.len() == total {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "only {} of {total} distinct events arrived; logs in {}",
                ids.len(),
                dir.path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Order: per user, first deliveries in sequence order; a redelivered event may repeat, but
    // never after a later event of the same user.
    let mut seen = HashSet::new();
    let mut per_user: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in hook.received() {
        let id = r.body["herald"]["eventId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let user = r.body["userId"].as_str().unwrap_or_default().to_string();
        let seq = r.body["properties"]["seq"].as_u64().unwrap_or(u64::MAX);
        let list = per_user.entry(user.clone()).or_default();
        if seen.insert(id) {
            list.push(seq);
        } else {
            assert_eq!(
                list.last(),
                Some(&seq),
                "a redelivery of {user}'s event {seq} came after a later event"
            );
        }
    }
    for (user, seqs) in per_user {
        let expected: Vec<u64> = (0..50).collect();
        assert_eq!(seqs, expected, "{user}: complete and in order");
    }
    Ok(())
}
