//! nats-server killed with SIGKILL and restarted while the activator delivers: nothing is lost,
//! each user's events still arrive in order, and an event whose delivery was recorded is not
//! sent again (a redelivery whose delivery status says delivered is acked unsent), so at most
//! the one event per user that was on the wire when the server died arrives twice.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use herald_activator::{DestinationConfig, DestinationKind, Settings, Start};
use herald_common::Topology;
use herald_testkit::{
    NatsServer, WebhookServer, check_arrivals_in_order, common_config, processed_track,
    publish_processed, wait_ready, wait_until,
};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const PARTITIONS: u32 = 4;
const USERS: usize = 8;
const ROUNDS: u64 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nats_server_loses_nothing_and_recorded_deliveries_are_not_sent_again()
-> Result<()> {
    let mut nats = NatsServer::start().await?;
    let js = nats.jetstream().await;
    let common = common_config(&nats.url(), PARTITIONS, "token-of-the-test");
    let topology = Topology::new(common.topology.clone());
    herald_testkit::activator_upstream(&js, &topology).await?;

    // Every user's events are in the stream before delivery starts; the sink takes a few
    // milliseconds a request, so the kill lands mid-delivery.
    let users: Vec<String> = (0..USERS).map(|u| format!("user{u}")).collect();
    let mut published = Vec::new();
    for seq in 1..=ROUNDS {
        for user in &users {
            let processed = processed_track(user, seq, PARTITIONS, &format!("p-{user}"));
            published.extend(processed.event.as_ref().map(|e| e.id.clone()));
            publish_processed(&js, &topology, &processed).await?;
        }
    }
    let hook = WebhookServer::start().await?;
    hook.set_delay(Duration::from_millis(5));
    let mut settings: BTreeMap<String, String> = BTreeMap::new();
    settings.insert("url".into(), hook.url());
    let destination = DestinationConfig {
        id: "hook".into(),
        kind: DestinationKind::Webhook,
        settings: Settings(settings),
        start: Start::All,
        ..Default::default()
    };
    // Every delivery recorded: what keeps a redelivered, delivered event from being sent again.
    let cfg = herald_activator::ActivatorConfig {
        delivery_status_delivered: true,
        ..common::loopback_config(vec![destination], 200)?
    };
    let shutdown = CancellationToken::new();
    let activator = herald_activator::start(
        &common,
        &cfg,
        herald_common::telemetry::metrics(),
        shutdown.clone(),
    )
    .await?;
    wait_ready("the activator is ready", activator.admin_addr, DEADLINE).await?;

    let total = published.len();
    wait_until("a quarter of the events delivered", DEADLINE, || async {
        hook.received().len() >= total / 4
    })
    .await?;
    nats.stop().await; // SIGKILL
    let at_kill = hook.received().len();
    ensure!(at_kill < total, "the kill came after the last delivery");
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart().await?;

    wait_until(
        "every event delivered after the restart",
        DEADLINE,
        || async {
            let keys: std::collections::BTreeSet<String> = hook
                .received()
                .iter()
                .filter_map(|r| r.header("idempotency-key").map(str::to_string))
                .collect();
            keys.len() >= total
        },
    )
    .await?;
    let arrivals: Vec<String> = hook
        .received()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap_or_default().to_string())
        .collect();
    let repeats = check_arrivals_in_order(&published, &arrivals)?;
    println!("{at_kill} of {total} delivered at the kill; {repeats} repeats");
    // Only a send whose outcome was not yet recorded when the server died can be repeated: at
    // most one per user (each user's events go one at a time).
    ensure!(
        repeats <= USERS,
        "{repeats} deliveries were repeats (at most {USERS} expected: one in flight per user)"
    );
    shutdown.cancel();
    let _ = activator.task.await;
    Ok(())
}
