//! Partition ownership among processor replicas started in-process (`herald_processor::start`)
//! on real nats-servers: replicas share the partitions with one owner each, hand them over
//! quickly on shutdown, and scale from one to three and back under load without losing,
//! reordering or double-owning anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use async_nats::jetstream;
use herald_common::auth::BearerToken;
use herald_common::ownership::OwnershipConfig;
use herald_common::server::ServiceHandle;
use herald_common::{CommonConfig, ControlConfig, NatsConfig, Topology, TopologyConfig, telemetry};
use herald_processor::ProcessorConfig;
use herald_proto::v1::processor_service_client::ProcessorServiceClient;
use herald_proto::v1::{GetStatusRequest, GetStatusResponse};
use herald_testkit::{
    NatsCluster, NatsServer, check_processed_in_order, protobuf_track, publish_as_ingest,
    user_per_partition, wait_ready, wait_until,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const TOKEN: &str = "ownership-test-token";
const PARTITIONS: u32 = 16;
/// The load's users: one per partition.
const USERS: usize = PARTITIONS as usize;
const WAIT: Duration = Duration::from_secs(30);

type StatusClient = ProcessorServiceClient<InterceptedService<Channel, BearerToken>>;

/// One processor replica started in this process.
struct Replica {
    handle: ServiceHandle,
    shutdown: CancellationToken,
    client: StatusClient,
}

impl Replica {
    async fn start(
        servers: &str,
        topology: &TopologyConfig,
        ownership: &OwnershipConfig,
    ) -> Result<Self> {
        let common = CommonConfig {
            nats: NatsConfig {
                servers: servers.to_string(),
                request_timeout_ms: 5_000,
                ..Default::default()
            },
            topology: topology.clone(),
            control: ControlConfig::with_token(TOKEN),
        };
        let cfg = ProcessorConfig {
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            admin_addr: "127.0.0.1:0".into(),
            ack_wait_seconds: 2,
            ownership: ownership.clone(),
            ..Default::default()
        };
        telemetry::init_tracing(&Default::default());
        let shutdown = CancellationToken::new();
        let handle =
            herald_processor::start(&common, &cfg, telemetry::metrics(), shutdown.clone()).await?;
        wait_ready("the processor replica is ready", handle.admin_addr, WAIT).await?;
        let channel = Channel::from_shared(format!("http://{}", handle.grpc_addr))?
            .connect()
            .await?;
        let client = ProcessorServiceClient::with_interceptor(channel, BearerToken::new(TOKEN)?);
        Ok(Self {
            handle,
            shutdown,
            client,
        })
    }

    async fn status(&self) -> Result<GetStatusResponse> {
        Ok(self
            .client
            .clone()
            .get_status(GetStatusRequest {})
            .await?
            .into_inner())
    }

    /// Shuts the replica down as SIGTERM does and waits until it has stopped.
    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle.task)
            .await
            .context("the replica did not stop in time")??;
        Ok(())
    }
}

/// The partitions each status reports active; fails when two report the same one.
fn active_sets(statuses: &[GetStatusResponse]) -> Result<Vec<BTreeSet<u32>>> {
    let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
    let mut sets = Vec::new();
    for (i, s) in statuses.iter().enumerate() {
        let mut set = BTreeSet::new();
        for p in s.partitions.iter().filter(|p| p.active) {
            if let Some(other) = owner.insert(p.partition, i) {
                bail!(
                    "partition {} is active on replicas {other} and {i}",
                    p.partition
                );
            }
            ensure!(
                p.pinned_client_id == p.pin_id,
                "replica {i} is active on partition {} without holding its pin",
                p.partition
            );
            set.insert(p.partition);
        }
        sets.push(set);
    }
    Ok(sets)
}

/// The partitions each status lists as owned (assigned to it and read by one of its tasks).
fn owned_sets(statuses: &[GetStatusResponse]) -> Vec<BTreeSet<u32>> {
    statuses
        .iter()
        .map(|s| s.partitions.iter().map(|p| p.partition).collect())
        .collect()
}

/// Waits until `replicas` all see each other and each partition is owned by exactly one of
/// them (each owning some) and, with `active`, processed by it (pinned, nothing of a previous
/// owner pending; this needs traffic on every partition). Returns how long that took.
async fn wait_balanced(replicas: &[&Replica], active: bool) -> Result<Duration> {
    let started = Instant::now();
    let deadline = started + WAIT;
    loop {
        let mut statuses = Vec::new();
        for r in replicas {
            statuses.push(r.status().await?);
        }
        let sets = if active {
            active_sets(&statuses)?
        } else {
            owned_sets(&statuses)
        };
        let all: BTreeSet<u32> = sets.iter().flatten().copied().collect();
        let covered: usize = sets.iter().map(BTreeSet::len).sum();
        let all_see_all = statuses.iter().all(|s| s.members.len() == replicas.len());
        if all_see_all
            && covered == PARTITIONS as usize
            && all.len() == PARTITIONS as usize
            && sets.iter().all(|s| !s.is_empty())
        {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            bail!(
                "partitions not balanced over {} replicas (active: {active}): {sets:?}",
                replicas.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The topology of `cfg`, with its events stream created (ingest's in production).
async fn events_stream(js: &jetstream::Context, cfg: &TopologyConfig) -> Result<Topology> {
    let topology = Topology::new(cfg.clone());
    herald_common::nats::ensure_stream(js, topology.events_stream_config()).await?;
    Ok(topology)
}

/// Publishes events `seqs` of every user (one per partition), pipelined, as ingest would.
async fn publish(
    js: &jetstream::Context,
    topology: &Topology,
    seqs: std::ops::Range<u64>,
) -> Result<u64> {
    let users = user_per_partition(PARTITIONS);
    let events: Vec<_> = seqs
        .flat_map(|seq| {
            users
                .iter()
                .map(move |user| protobuf_track("own", user, seq, PARTITIONS))
        })
        .collect();
    publish_as_ingest(js, topology, events).await
}

/// Load: one round of events (one per user) every few milliseconds, from round `from` on.
struct Load {
    task: tokio::task::JoinHandle<Result<u64>>,
    next_round: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Load {
    fn start(js: jetstream::Context, topology: Topology, from: u64) -> Self {
        let next_round = Arc::new(AtomicU64::new(from));
        let stop = CancellationToken::new();
        let task = {
            let (next_round, stop) = (next_round.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seq = from;
                while !stop.is_cancelled() {
                    publish(&js, &topology, seq..seq + 1).await?;
                    seq += 1;
                    next_round.store(seq, Ordering::SeqCst);
                    // Pacing of the load, not synchronisation.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(seq)
            })
        };
        Self {
            task,
            next_round,
            stop,
        }
    }

    /// Waits until `rounds` more rounds were published.
    async fn keep_on_for(&self, rounds: u64) -> Result<()> {
        let target = self.next_round.load(Ordering::SeqCst) + rounds;
        wait_until("the load publishes more rounds", WAIT, || async {
            self.next_round.load(Ordering::SeqCst) >= target
        })
        .await
    }

    /// Stops it; returns the first round it did not publish.
    async fn finish(self) -> Result<u64> {
        self.stop.cancel();
        self.task.await?
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_partitions_and_hand_over_quickly_on_shutdown() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await;
    let topology_cfg = TopologyConfig::default();
    let topology = events_stream(&js, &topology_cfg).await?;
    // Long TTL and pin timeout: a quick handover must come from leaving and unpinning, not
    // from anything expiring.
    let ownership = OwnershipConfig {
        heartbeat_ms: 250,
        member_ttl_seconds: 10,
        pin_timeout_seconds: 10,
    };
    let r1 = Replica::start(&nats.url(), &topology_cfg, &ownership).await?;
    let r2 = Replica::start(&nats.url(), &topology_cfg, &ownership).await?;
    let spread = wait_balanced(&[&r1, &r2], false).await?;
    println!("two replicas split the partitions {spread:?} after the second started");

    let rounds = 40;
    let total = publish(&js, &topology, 0..rounds).await?;
    wait_until("every event is processed", WAIT, || async {
        let (a, b) = (r1.status().await, r2.status().await);
        matches!((a, b), (Ok(a), Ok(b)) if a.processed + b.processed >= total)
    })
    .await?;
    let (s1, s2) = (r1.status().await?, r2.status().await?);
    // Nothing moved, so each event went through exactly one replica, once.
    assert_eq!(
        s1.processed + s2.processed,
        total,
        "each event processed once"
    );
    assert!(s1.processed > 0 && s2.processed > 0, "both replicas worked");
    // Every partition saw traffic: each is processed by exactly one replica, the pinned one.
    let active = active_sets(&[s1.clone(), s2.clone()])?;
    assert_eq!(active, owned_sets(&[s1.clone(), s2.clone()]));
    assert_eq!(active[0].len() + active[1].len(), PARTITIONS as usize);
    assert_ne!(s1.member_id, s2.member_id);
    assert_eq!(s1.members, s2.members);

    // A rolling deploy stops one replica under load: its partitions move at once.
    let load = Load::start(js.clone(), topology.clone(), rounds);
    let handover = Instant::now();
    r2.stop().await?;
    wait_balanced(&[&r1], true).await?;
    let took = handover.elapsed();
    println!("handover on shutdown took {took:?} (pin timeout 10 s, member TTL 10 s)");
    assert!(
        took < Duration::from_secs(5),
        "handover took {took:?}: it must not wait for the pin timeout"
    );
    let rounds = load.finish().await?;
    check_processed_in_order(&js, &topology.processed_stream(), USERS, rounds).await?;
    r1.stop().await?;
    Ok(())
}

/// One status sample: which replica, when the call started and ended, and the partitions it
/// reported active with their terms.
struct Sample {
    replica: usize,
    start: Instant,
    end: Instant,
    active: Vec<(u32, u64)>,
}

/// Finds a partition reported active by one replica while another was provably active on it:
/// replica X reported the same term at two samples, and replica Y reported it active in a
/// sample that lies entirely between them.
fn double_owned(samples: &[Sample]) -> Option<String> {
    // (replica, partition, term) -> (earliest end, latest start) of samples reporting it.
    let mut spans: HashMap<(usize, u32, u64), (Instant, Instant)> = HashMap::new();
    for s in samples {
        for &(p, term) in &s.active {
            let span = spans
                .entry((s.replica, p, term))
                .or_insert((s.end, s.start));
            span.0 = span.0.min(s.end);
            span.1 = span.1.max(s.start);
        }
    }
    for s in samples {
        for &(p, _) in &s.active {
            for (&(replica, partition, term), &(from, to)) in &spans {
                if partition == p && replica != s.replica && from <= s.start && s.end <= to {
                    return Some(format!(
                        "partition {p}: replica {} active while replica {replica} held it (term {term})",
                        s.replica
                    ));
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_from_one_to_three_and_back_under_load_keeps_one_owner_per_partition() -> Result<()>
{
    let cluster = NatsCluster::start(3).await?;
    let js = jetstream::new(cluster.client().await);
    let topology_cfg = TopologyConfig {
        replicas: 3,
        ..Default::default()
    };
    let topology = events_stream(&js, &topology_cfg).await?;
    let ownership = OwnershipConfig {
        heartbeat_ms: 500,
        member_ttl_seconds: 3,
        pin_timeout_seconds: 3,
    };
    // One URL: the client learns the other nodes from the server.
    let servers = cluster.url(0);
    let r1 = Replica::start(&servers, &topology_cfg, &ownership).await?;

    // Sample every live replica's status continuously.
    let live: Arc<Mutex<BTreeMap<usize, StatusClient>>> = Arc::default();
    live.lock().expect("lock").insert(1, r1.client.clone());
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop_sampling = CancellationToken::new();
    let sampler = {
        let (live, samples, stop) = (live.clone(), samples.clone(), stop_sampling.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let clients: Vec<(usize, StatusClient)> = live
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(|(i, c)| (*i, c.clone()))
                    .collect();
                for (replica, mut client) in clients {
                    let start = Instant::now();
                    let Ok(status) = client.get_status(GetStatusRequest {}).await else {
                        continue;
                    };
                    let end = Instant::now();
                    let active = status
                        .into_inner()
                        .partitions
                        .iter()
                        .filter(|p| p.active)
                        .map(|p| (p.partition, p.term))
                        .collect();
                    samples.lock().expect("lock").push(Sample {
                        replica,
                        start,
                        end,
                        active,
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let load = Load::start(js.clone(), topology.clone(), 0);
    wait_balanced(&[&r1], true).await?;
    // Each stage runs under load for a while (STAGE rounds) before the next change.
    const STAGE: u64 = 30;
    load.keep_on_for(STAGE).await?;

    let r2 = Replica::start(&servers, &topology_cfg, &ownership).await?;
    live.lock().expect("lock").insert(2, r2.client.clone());
    let t = wait_balanced(&[&r1, &r2], true).await?;
    println!("1 -> 2 replicas: every partition processed by its new owner {t:?} after start");
    load.keep_on_for(STAGE).await?;
    let r3 = Replica::start(&servers, &topology_cfg, &ownership).await?;
    live.lock().expect("lock").insert(3, r3.client.clone());
    let t = wait_balanced(&[&r1, &r2, &r3], true).await?;
    println!("2 -> 3 replicas: every partition processed by its new owner {t:?} after start");
    load.keep_on_for(STAGE).await?;

    // A stopped replica's gRPC server goes first: stop sampling it.
    live.lock().expect("lock").remove(&3);
    let stopping = Instant::now();
    r3.stop().await?;
    wait_balanced(&[&r1, &r2], true).await?;
    println!(
        "3 -> 2 replicas: taken over {:?} after the stop began",
        stopping.elapsed()
    );
    load.keep_on_for(STAGE).await?;
    live.lock().expect("lock").remove(&2);
    let stopping = Instant::now();
    r2.stop().await?;
    wait_balanced(&[&r1], true).await?;
    println!(
        "2 -> 1 replica: taken over {:?} after the stop began",
        stopping.elapsed()
    );

    load.keep_on_for(STAGE).await?;
    let rounds = load.finish().await?;
    stop_sampling.cancel();
    sampler.await?;
    check_processed_in_order(&js, &topology.processed_stream(), USERS, rounds).await?;

    let samples = std::mem::take(&mut *samples.lock().expect("lock"));
    println!(
        "{} ownership samples over {rounds} rounds of {PARTITIONS} events",
        samples.len()
    );
    assert!(
        samples.len() > 100,
        "too few samples ({}) to mean anything",
        samples.len()
    );
    if let Some(violation) = double_owned(&samples) {
        panic!("{violation}");
    }
    r1.stop().await?;
    Ok(())
}
