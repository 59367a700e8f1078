//! Partition ownership between two real `herald processor` processes: one is killed with
//! SIGKILL mid-stream, and the other takes its partitions over within a few times the
//! configured limit, losing nothing and keeping each user's events in order.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;
use herald_common::Topology;
use herald_common::auth::BearerToken;
use herald_proto::v1::processor_service_client::ProcessorServiceClient;
use herald_proto::v1::{GetStatusRequest, GetStatusResponse};
use herald_testkit::{
    NatsServer, check_processed_in_order, control_channel, free_ports, protobuf_track,
    publish_as_ingest, spawn_role, user_per_partition, wait_ready, wait_until, write_config,
};
use tokio::process::Child;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const TOKEN: &str = "ownership-kill-test-token";
const PARTITIONS: u32 = 16;
const WAIT: Duration = Duration::from_secs(30);

// The configured ownership timing (see the config file below).
const HEARTBEAT: Duration = Duration::from_millis(500);
const MEMBER_TTL: Duration = Duration::from_secs(2);
const PIN_TIMEOUT: Duration = Duration::from_secs(2);
const ACK_WAIT: Duration = Duration::from_secs(2);

type StatusClient = ProcessorServiceClient<InterceptedService<Channel, BearerToken>>;

/// A real `herald processor` process.
struct Processor {
    child: Child,
    grpc: u16,
}

impl Processor {
    async fn spawn(dir: &Path, name: &str, nats: &str) -> Result<Self> {
        let ports = free_ports(2)?;
        let (admin, grpc) = (ports[0], ports[1]);
        let config = write_config(
            dir,
            name,
            nats,
            TOKEN,
            &format!(
                r#"
[processor]
grpc_addr = "127.0.0.1:{grpc}"
http_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:{admin}"
ack_wait_seconds = {ack_wait}

[processor.ownership]
heartbeat_ms = {heartbeat}
member_ttl_seconds = {ttl}
pin_timeout_seconds = {pin}
"#,
                ack_wait = ACK_WAIT.as_secs(),
                heartbeat = HEARTBEAT.as_millis(),
                ttl = MEMBER_TTL.as_secs(),
                pin = PIN_TIMEOUT.as_secs(),
            ),
        )?;
        let child = spawn_role(
            Path::new(env!("CARGO_BIN_EXE_herald")),
            "processor",
            &config,
            &dir.join(format!("{name}.log")),
        )?;
        wait_ready(
            &format!("processor {name} is ready"),
            format!("127.0.0.1:{admin}"),
            WAIT,
        )
        .await?;
        Ok(Self { child, grpc })
    }

    async fn client(&self) -> Result<StatusClient> {
        Ok(ProcessorServiceClient::new(
            control_channel(format!("127.0.0.1:{}", self.grpc), TOKEN).await?,
        ))
    }
}

async fn status(client: &StatusClient) -> Result<GetStatusResponse> {
    Ok(client
        .clone()
        .get_status(GetStatusRequest {})
        .await?
        .into_inner())
}

/// The partitions a status reports active (pinned, processing).
fn active(s: &GetStatusResponse) -> BTreeSet<u32> {
    s.partitions
        .iter()
        .filter(|p| p.active && p.pin_id == p.pinned_client_id)
        .map(|p| p.partition)
        .collect()
}

/// Publishes one round (one event per user) every 50 ms until `stop`; `rounds` counts them.
fn load(
    js: jetstream::Context,
    topology: Topology,
    rounds: Arc<AtomicU64>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<u64>> {
    tokio::spawn(async move {
        let users = user_per_partition(PARTITIONS);
        let mut seq = 0;
        while !stop.is_cancelled() {
            let round: Vec<_> = users
                .iter()
                .map(|user| protobuf_track("kill", user, seq, PARTITIONS))
                .collect();
            publish_as_ingest(&js, &topology, round).await?;
            seq += 1;
            rounds.store(seq, Ordering::SeqCst);
            // Pacing of the load, not synchronisation.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(seq)
    })
}

async fn more_rounds(rounds: &AtomicU64, n: u64) -> Result<()> {
    let target = rounds.load(Ordering::SeqCst) + n;
    wait_until("the load publishes more rounds", WAIT, || async {
        rounds.load(Ordering::SeqCst) >= target
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_processor_s_partitions_are_taken_over_without_loss_or_reordering() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await;
    let topology = Topology::new(Default::default());
    herald_common::nats::ensure_stream(&js, topology.events_stream_config()).await?;
    let dir = tempfile::tempdir()?;
    let logs: PathBuf = dir.path().to_path_buf();
    let mut p1 = Processor::spawn(dir.path(), "p1", &nats.url()).await?;
    let p2 = Processor::spawn(dir.path(), "p2", &nats.url()).await?;
    let (c1, c2) = (p1.client().await?, p2.client().await?);

    let rounds = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let load = load(js.clone(), topology.clone(), rounds.clone(), stop.clone());
    wait_until(
        "both processors share the partitions, each active on its own",
        WAIT,
        || async {
            let (Ok(s1), Ok(s2)) = (status(&c1).await, status(&c2).await) else {
                return false;
            };
            let (a1, a2) = (active(&s1), active(&s2));
            !a1.is_empty() && !a2.is_empty() && a1.is_disjoint(&a2) && a1.len() + a2.len() == 16
        },
    )
    .await
    .with_context(|| format!("logs in {}", logs.display()))?;
    more_rounds(&rounds, 20).await?;

    // Kill -9 the first processor mid-stream.
    let owned_by_p1 = active(&status(&c1).await?);
    p1.child.kill().await?;
    let killed = Instant::now();
    wait_until("the survivor processes every partition", WAIT, || async {
        status(&c2)
            .await
            .is_ok_and(|s| s.members.len() == 1 && active(&s).len() == PARTITIONS as usize)
    })
    .await
    .with_context(|| format!("logs in {}", logs.display()))?;
    let takeover = killed.elapsed();
    // The survivor notices the dead member after its TTL (or the dead pin after the pin
    // timeout), and resumes once the in-flight messages come back after the ack wait.
    let limit = (MEMBER_TTL + HEARTBEAT)
        .max(PIN_TIMEOUT + HEARTBEAT)
        .max(ACK_WAIT);
    println!(
        "takeover of partitions {owned_by_p1:?} took {takeover:?} (configured limit {limit:?})"
    );
    assert!(
        takeover <= limit * 3,
        "takeover took {takeover:?}, more than 3 x {limit:?}"
    );

    more_rounds(&rounds, 20).await?;
    stop.cancel();
    let published = load.await??;
    check_processed_in_order(
        &js,
        &topology.processed_stream(),
        PARTITIONS as usize,
        published,
    )
    .await
    .with_context(|| format!("logs in {}", logs.display()))?;
    Ok(())
}
