//! Three real `herald activator` processes deliver one ordered webhook destination; one is
//! killed with SIGKILL mid-delivery. Its partitions are taken over: every event arrives, each
//! user's events in order (a repeat only of an event that had arrived before), and a repeat
//! carries the event's own `Idempotency-Key`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use async_nats::jetstream;
use futures_util::StreamExt as _;
use herald_common::{Topology, TopologyConfig};
use herald_proto::v1::ProcessedEvent;
use herald_testkit::{
    NatsServer, Received, WebhookServer, check_arrivals_in_order, free_port, protobuf_track,
    spawn_role, user_per_partition, wait_ready, wait_until, write_config,
};
use prost::Message as _;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "activator-replicas-test-token";
const PARTITIONS: u32 = 8;
const WAIT: Duration = Duration::from_secs(30);

/// Spawns `herald activator` number `n`; returns it once ready.
async fn spawn_activator(dir: &Path, n: usize, nats: &str, hook: &str) -> Result<Child> {
    let admin = free_port();
    let name = format!("activator-{n}");
    let config = write_config(
        dir,
        &name,
        nats,
        TOKEN,
        &format!(
            r#"
[topology]
partitions = {PARTITIONS}

[activator]
grpc_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:{admin}"
ack_wait_seconds = 2
retry_max_backoff_ms = 500
allow_private_networks = ["127.0.0.0/8"]

[activator.ownership]
heartbeat_ms = 500
member_ttl_seconds = 2
pin_timeout_seconds = 2

[[activator.destinations]]
id = "hook"
kind = "webhook"
start = "all"
settings = {{ url = "{hook}" }}
"#
        ),
    )?;
    let child = spawn_role(
        Path::new(env!("CARGO_BIN_EXE_herald")),
        "activator",
        &config,
        &dir.join(format!("{name}.log")),
    )?;
    wait_ready(
        &format!("{name} is ready"),
        format!("127.0.0.1:{admin}"),
        WAIT,
    )
    .await?;
    Ok(child)
}

/// Publishes one processed event per user every 20 ms until `stop`, in order per user; the ids
/// published so far are in `published`.
fn load(
    js: jetstream::Context,
    topology: Topology,
    published: Arc<std::sync::Mutex<Vec<String>>>,
    rounds: Arc<AtomicU64>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let mut users = user_per_partition(PARTITIONS);
        users.extend((0..8).map(|i| format!("user-x{i}")));
        let mut seq = 0;
        while !stop.is_cancelled() {
            for user in &users {
                let event = protobuf_track("src", user, seq, PARTITIONS);
                let id = event.id.clone();
                let subject = topology.processed_subject(event.partition);
                let processed = ProcessedEvent {
                    event: Some(event),
                    profile_id: format!("profile-{user}"),
                    ..Default::default()
                };
                js.publish(subject, processed.encode_to_vec().into())
                    .await?
                    .await?;
                published.lock().expect("lock").push(id);
            }
            seq += 1;
            rounds.store(seq, Ordering::SeqCst);
            // Pacing of the load, not synchronisation.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
}

fn keys(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.header("idempotency-key").unwrap_or_default().to_string())
        .collect()
}

async fn activator_members(js: &jetstream::Context, topology: &Topology) -> usize {
    let Ok(kv) = js.get_key_value(topology.bucket("members")).await else {
        return 0;
    };
    let Ok(keys) = kv.keys().await else {
        return 0;
    };
    keys.filter_map(|k| async move { k.ok() })
        .filter(|k| std::future::ready(k.starts_with("activator.")))
        .count()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_partitions_are_taken_over_without_loss_or_reordering() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await;
    let topology = Topology::new(TopologyConfig {
        partitions: PARTITIONS,
        ..Default::default()
    });
    herald_testkit::activator_upstream(&js, &topology).await?;
    let dir = tempfile::tempdir()?;
    let logs = dir.path().display().to_string();
    let hook = WebhookServer::start().await?;
    // Each request takes a moment, so a replica is killed with sends in flight.
    hook.set_delay(Duration::from_millis(5));
    let mut replicas = Vec::new();
    for n in 0..3 {
        replicas.push(spawn_activator(dir.path(), n, &nats.url(), &hook.url()).await?);
    }
    wait_until("three activator replicas are members", WAIT, || async {
        activator_members(&js, &topology).await == 3
    })
    .await
    .with_context(|| format!("logs in {logs}"))?;

    let published = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rounds = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let load = load(
        js.clone(),
        topology.clone(),
        published.clone(),
        rounds.clone(),
        stop.clone(),
    );
    wait_until("deliveries are under way", WAIT, || async {
        hook.received().len() >= 100
    })
    .await?;
    // Kill -9 one replica mid-delivery.
    replicas[0].kill().await?;
    let at_kill = rounds.load(Ordering::SeqCst);
    // Its membership key expires; the two others take its partitions.
    wait_until(
        "the killed replica leaves the member list",
        WAIT,
        || async { activator_members(&js, &topology).await == 2 },
    )
    .await?;
    wait_until("the load goes on after the kill", WAIT, || async {
        rounds.load(Ordering::SeqCst) >= at_kill + 40
    })
    .await?;
    stop.cancel();
    load.await??;
    let published = published.lock().expect("lock").clone();

    wait_until("every event arrived", WAIT, || async {
        let got: std::collections::HashSet<String> = keys(&hook.received()).into_iter().collect();
        published.iter().all(|id| got.contains(id))
    })
    .await
    .with_context(|| format!("logs in {logs}"))?;
    let received = hook.received();
    let arrivals = keys(&received);
    let repeats = check_arrivals_in_order(&published, &arrivals)
        .with_context(|| format!("logs in {logs}"))?;
    // Every delivery, repeats included, carries its own event's id as its key.
    for r in &received {
        let message_id = r.body["messageId"].as_str().unwrap_or_default();
        let key = r.header("idempotency-key").unwrap_or_default();
        ensure!(
            key == format!("src:{message_id}"),
            "Idempotency-Key {key:?} for event {message_id:?}"
        );
    }
    println!(
        "{} events, {} deliveries, {repeats} repeats after the kill",
        published.len(),
        arrivals.len()
    );
    Ok(())
}
