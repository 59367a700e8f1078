//! The service supervisor: one failing server or task stops the others, and shutdown ends
//! within its timeout even when a task ignores cancellation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use herald_common::server::ServiceHandle;
use herald_common::supervisor::Supervisor;
use herald_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

fn finish(supervisor: Supervisor, client: async_nats::Client) -> ServiceHandle {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    supervisor.finish(client, None, addr, addr)
}

/// A server that runs until the supervisor's token fires, then notes it stopped.
fn long_running(supervisor: &mut Supervisor, stopped: &Arc<AtomicBool>) {
    let (token, stopped) = (supervisor.token(), stopped.clone());
    supervisor.spawn("sibling", async move {
        token.cancelled().await;
        stopped.store(true, Ordering::SeqCst);
        Ok::<(), String>(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_stops_its_siblings_and_the_service() -> Result<()> {
    let nats = NatsServer::start().await?;
    let shutdown = CancellationToken::new();
    let mut supervisor = Supervisor::new("test", &shutdown, Duration::from_secs(10));
    let stopped = Arc::new(AtomicBool::new(false));
    long_running(&mut supervisor, &stopped);
    supervisor.spawn("failing", async { Err::<(), _>("it broke") });
    let handle = finish(supervisor, nats.client().await);
    tokio::time::timeout(Duration::from_secs(30), handle.task)
        .await
        .expect("the service stops once a task failed")?;
    assert!(stopped.load(Ordering::SeqCst), "the sibling was stopped");
    assert!(
        !shutdown.is_cancelled(),
        "the caller's token is the caller's"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_stops_the_service() -> Result<()> {
    let nats = NatsServer::start().await?;
    let shutdown = CancellationToken::new();
    let mut supervisor = Supervisor::new("test", &shutdown, Duration::from_secs(10));
    let stopped = Arc::new(AtomicBool::new(false));
    long_running(&mut supervisor, &stopped);
    supervisor.spawn_task("panicking", async { panic!("a bug") });
    let handle = finish(supervisor, nats.client().await);
    tokio::time::timeout(Duration::from_secs(30), handle.task)
        .await
        .expect("the service stops once a task panicked")?;
    assert!(stopped.load(Ordering::SeqCst), "the sibling was stopped");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_every_task_then_drains_nats() -> Result<()> {
    let nats = NatsServer::start().await?;
    let client = nats.client().await;
    let mut sub = client.subscribe("supervised").await?;
    let shutdown = CancellationToken::new();
    let mut supervisor = Supervisor::new("test", &shutdown, Duration::from_secs(30));
    let stopped = Arc::new(AtomicBool::new(false));
    long_running(&mut supervisor, &stopped);
    let handle = finish(supervisor, client);
    assert!(!handle.task.is_finished());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle.task)
        .await
        .expect("the service stops on shutdown")?;
    assert!(stopped.load(Ordering::SeqCst), "the task finished first");
    // A drained connection has closed its subscriptions.
    let next = tokio::time::timeout(Duration::from_secs(10), sub.next()).await?;
    assert!(next.is_none(), "the subscription ended with the drain");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_its_timeout_when_a_task_ignores_it() -> Result<()> {
    let nats = NatsServer::start().await?;
    let shutdown = CancellationToken::new();
    let timeout = Duration::from_secs(1);
    let mut supervisor = Supervisor::new("test", &shutdown, timeout);
    let stopped = Arc::new(AtomicBool::new(false));
    long_running(&mut supervisor, &stopped);
    supervisor.spawn_task("stubborn", async {
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let handle = finish(supervisor, nats.client().await);
    shutdown.cancel();
    // Generous margin over the 1 s timeout; the stubborn task alone would take 60 s.
    tokio::time::timeout(timeout + Duration::from_secs(20), handle.task)
        .await
        .expect("the service stops within its shutdown timeout")?;
    assert!(
        stopped.load(Ordering::SeqCst),
        "the well-behaved task stopped"
    );
    Ok(())
}
