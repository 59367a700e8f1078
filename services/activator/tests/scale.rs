//! Isolation and scale-out over a real nats-server with 4 partitions, activators in process and
//! real webhooks on loopback: the upgrade of an earlier version's single consumer to partition
//! consumers at its ack floor; switching a destination between ordered and unordered, and
//! deleting it, moves or removes every consumer without loss; a failing destination builds only
//! its own, bounded backlog (reported by the backlog gauge and ListDestinations) while a healthy
//! one gets everything; two replicas share the partitions and the shared consumer; a handover
//! gives back at once what the old owner's delivery flow never started.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use async_nats::jetstream;
use herald_activator::{
    DestinationConfig, DestinationKind, consumer_name, partition_consumer_name,
};
use herald_common::auth::BearerToken;
use herald_common::ordered::{ReaderConfig, ensure_consumer};
use herald_common::server::ServiceHandle;
use herald_common::telemetry::PrometheusHandle;
use herald_common::{CommonConfig, Topology};
use herald_proto::v1::destination_service_client::DestinationServiceClient;
use herald_proto::v1::{
    CreateDestinationRequest, DeleteDestinationRequest, DestinationSpec, ListDestinationsRequest,
    PauseDestinationRequest, ProcessedEvent, UpdateDestinationRequest,
};
use herald_testkit::{
    NatsServer, Received, WebhookServer, check_arrivals_in_order, common_config, control_channel,
    processed_track, publish_processed, user_per_partition, wait_ready, wait_until,
};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);
const TOKEN: &str = "token-of-the-scale-test";
const PARTITIONS: u32 = 4;

type Client = DestinationServiceClient<InterceptedService<Channel, BearerToken>>;

/// A nats-server with the processed stream (4 partitions) and the consent bucket.
struct Rig {
    _nats: NatsServer,
    js: jetstream::Context,
    topology: Topology,
    common: CommonConfig,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    activators: Vec<ServiceHandle>,
    users: Vec<String>,
    seq: HashMap<String, u64>,
    published: Vec<String>,
}

impl Rig {
    async fn new() -> Result<Self> {
        let nats = NatsServer::start().await?;
        let js = nats.jetstream().await;
        let common = common_config(&nats.url(), PARTITIONS, TOKEN);
        let topology = Topology::new(common.topology.clone());
        herald_testkit::activator_upstream(&js, &topology).await?;
        // One user in every partition, and four more wherever they fall.
        let mut users = user_per_partition(PARTITIONS);
        users.extend((0..4).map(|i| format!("other-{i}")));
        Ok(Self {
            _nats: nats,
            js,
            topology,
            common,
            metrics: herald_common::telemetry::metrics(),
            shutdown: CancellationToken::new(),
            activators: Vec::new(),
            users,
            seq: HashMap::new(),
            published: Vec::new(),
        })
    }

    /// Starts one more activator replica with these settings; returns its control client.
    async fn start(
        &mut self,
        destinations: Vec<DestinationConfig>,
        edit: impl FnOnce(&mut herald_activator::ActivatorConfig),
    ) -> Result<Client> {
        let mut cfg = common::loopback_config(destinations, 200)?;
        edit(&mut cfg);
        let activator = herald_activator::start(
            &self.common,
            &cfg,
            self.metrics.clone(),
            self.shutdown.clone(),
        )
        .await?;
        wait_ready("the activator is ready", activator.admin_addr, DEADLINE).await?;
        let client =
            DestinationServiceClient::new(control_channel(activator.grpc_addr, TOKEN).await?);
        self.activators.push(activator);
        Ok(client)
    }

    /// Publishes one round: an event for every user, each to its partition; returns their ids.
    async fn publish_round(&mut self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for user in self.users.clone() {
            let seq = self.seq.entry(user.clone()).or_default();
            let processed = processed_track(&user, *seq, PARTITIONS, &format!("profile-{user}"));
            *seq += 1;
            ids.extend(processed.event.as_ref().map(|e| e.id.clone()));
            publish_processed(&self.js, &self.topology, &processed).await?;
        }
        self.published.extend(ids.iter().cloned());
        Ok(ids)
    }

    async fn publish_rounds(&mut self, n: usize) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.extend(self.publish_round().await?);
        }
        Ok(ids)
    }

    /// The consumers of `destination` that exist (shared first, then partitions).
    async fn consumers(&self, destination: &str) -> Result<Vec<String>> {
        let stream = self.js.get_stream(self.topology.processed_stream()).await?;
        let mut names = vec![consumer_name(destination)];
        names.extend((0..PARTITIONS).map(|p| partition_consumer_name(destination, p)));
        let mut found = Vec::new();
        for name in names {
            if stream.consumer_info(&name).await.is_ok() {
                found.push(name);
            }
        }
        Ok(found)
    }

    async fn wait_consumers(&self, destination: &str, want: &[String]) -> Result<()> {
        wait_until(
            &format!("{destination} has exactly the consumers {want:?}"),
            DEADLINE,
            || async { self.consumers(destination).await.is_ok_and(|c| c == want) },
        )
        .await
    }

    /// The value of a metric line with these labels (0 when absent).
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!(r#"{k}="{v}""#)))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn wait_change(&self, destination: &str, action: &str, n: u64) -> Result<()> {
        wait_until(
            &format!("destination {destination} {action} ({n})"),
            DEADLINE,
            || async {
                self.metric(
                    "herald_activator_destination_changes_total",
                    &[("destination", destination), ("action", action)],
                ) >= n as f64
            },
        )
        .await
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn partition_names(destination: &str) -> Vec<String> {
    (0..PARTITIONS)
        .map(|p| partition_consumer_name(destination, p))
        .collect()
}

fn keys(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.header("idempotency-key").unwrap_or_default().to_string())
        .collect()
}

fn webhook(id: &str, url: &str) -> DestinationConfig {
    DestinationConfig {
        id: id.into(),
        kind: DestinationKind::Webhook,
        settings: herald_activator::Settings([("url".to_string(), url.to_string())].into()),
        start: herald_activator::Start::All,
        ..Default::default()
    }
}

fn spec(id: &str, url: &str, ordered: bool) -> DestinationSpec {
    DestinationSpec {
        id: id.into(),
        kind: "webhook".into(),
        settings: HashMap::from([("url".to_string(), url.to_string())]),
        ordered: Some(ordered),
        ..Default::default()
    }
}

/// Waits until `hook` has received every one of `ids` (repeats allowed).
async fn wait_all(hook: &WebhookServer, ids: &[String]) -> Result<()> {
    let want: BTreeSet<&String> = ids.iter().collect();
    wait_until(
        &format!("the webhook received all {} events", want.len()),
        DEADLINE,
        || async {
            let got = keys(&hook.received());
            let got: BTreeSet<&String> = got.iter().collect();
            want.iter().all(|id| got.contains(id))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_version_s_consumer_is_replaced_by_partition_consumers_at_its_ack_floor()
-> Result<()> {
    let mut rig = Rig::new().await?;
    // The single consumer earlier versions gave every destination, over every partition; it
    // acknowledged the first 10 events in stream order.
    let old = ReaderConfig {
        stream: rig.topology.processed_stream(),
        durable: consumer_name("hook"),
        filter_subject: rig.topology.processed_wildcard(),
        ack_wait: Duration::from_secs(5),
        max_ack_pending: 10_000,
        batch: 256,
        description: "Herald activator: destination hook".into(),
    };
    let (_, consumer) = ensure_consumer(&rig.js, &old, None).await?;
    let first = rig.publish_rounds(2).await?;
    let mut messages = consumer.fetch().max_messages(10).messages().await?;
    let mut acked = BTreeSet::new();
    while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
        let m = m.map_err(anyhow::Error::msg)?;
        let p = ProcessedEvent::decode(m.payload.as_ref())?;
        acked.insert(p.event.context("event")?.id);
        m.double_ack().await.map_err(anyhow::Error::msg)?;
    }
    assert_eq!(acked.len(), 10);
    let later = rig.publish_round().await?;

    // The new version, with the same destination from the config file; its start (now) is
    // after every event above, but the old consumer's position wins.
    let hook = WebhookServer::start().await?;
    let mut dest = webhook("hook", &hook.url());
    dest.start = herald_activator::Start::Now;
    rig.start(vec![dest], |_| {}).await?;
    let waiting: Vec<String> = first
        .iter()
        .chain(&later)
        .filter(|id| !acked.contains(*id))
        .cloned()
        .collect();
    wait_all(&hook, &waiting).await?;
    rig.wait_consumers("hook", &partition_names("hook")).await?;
    // Once more, to see nothing else comes.
    let last = rig.publish_round().await?;
    wait_all(&hook, &last).await?;
    let got = keys(&hook.received());
    let sent_again: Vec<&String> = got.iter().filter(|id| acked.contains(*id)).collect();
    assert!(
        sent_again.is_empty(),
        "acknowledged by the old consumer, sent again: {sent_again:?}"
    );
    let want: BTreeSet<&String> = waiting.iter().chain(&last).collect();
    let got_set: BTreeSet<&String> = got.iter().collect();
    assert_eq!(got_set, want);
    // The published order restricted to what was waiting: per user, in order.
    let expected: Vec<String> = rig
        .published
        .iter()
        .filter(|id| !acked.contains(*id))
        .cloned()
        .collect();
    check_arrivals_in_order(&expected, &got)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_between_ordered_and_unordered_and_deleting_move_every_consumer() -> Result<()> {
    let mut rig = Rig::new().await?;
    let mut c = rig.start(Vec::new(), |_| {}).await?;
    let hook = WebhookServer::start().await?;
    c.create_destination(CreateDestinationRequest {
        spec: Some(spec("flip", &hook.url(), true)),
    })
    .await?;
    rig.wait_change("flip", "started", 1).await?;
    rig.wait_consumers("flip", &partition_names("flip")).await?;
    let ordered = rig.publish_rounds(2).await?;
    wait_all(&hook, &ordered).await?;

    // Unordered: one shared consumer from the partitions' lowest ack floor; they are deleted.
    c.update_destination(UpdateDestinationRequest {
        spec: Some(spec("flip", &hook.url(), false)),
    })
    .await?;
    rig.wait_change("flip", "updated", 1).await?;
    rig.wait_consumers("flip", &[consumer_name("flip")]).await?;
    let unordered = rig.publish_rounds(2).await?;
    wait_all(&hook, &unordered).await?;

    // Ordered again: partition consumers from the shared one's ack floor.
    c.update_destination(UpdateDestinationRequest {
        spec: Some(spec("flip", &hook.url(), true)),
    })
    .await?;
    rig.wait_change("flip", "updated", 2).await?;
    rig.wait_consumers("flip", &partition_names("flip")).await?;
    let again = rig.publish_rounds(2).await?;
    wait_all(&hook, &again).await?;
    let got: BTreeSet<String> = keys(&hook.received()).into_iter().collect();
    let published: BTreeSet<String> = rig.published.iter().cloned().collect();
    assert_eq!(got, published, "every event, and nothing else, arrived");

    // Deleted: every consumer goes.
    c.delete_destination(DeleteDestinationRequest { id: "flip".into() })
        .await?;
    rig.wait_change("flip", "deleted", 1).await?;
    rig.wait_consumers("flip", &[]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_builds_only_its_own_bounded_backlog() -> Result<()> {
    const MAX_ACK_PENDING: i64 = 3;
    let mut rig = Rig::new().await?;
    let healthy = WebhookServer::start().await?;
    let down = WebhookServer::start().await?;
    down.set_failing(500);
    let mut c = rig
        .start(
            vec![
                webhook("healthy", &healthy.url()),
                webhook("down", &down.url()),
            ],
            |cfg| {
                cfg.max_ack_pending = MAX_ACK_PENDING;
                cfg.batch_size = 2;
            },
        )
        .await?;
    let ids = rig.publish_rounds(6).await?;
    let total = ids.len();
    wait_all(&healthy, &ids).await?;
    check_arrivals_in_order(&ids, &keys(&healthy.received()))?;
    assert!(
        down.received().is_empty(),
        "the failing sink accepted nothing"
    );
    // The two destinations are sent to independently: the healthy one can finish before the
    // failing one's first attempt lands.
    wait_until("the failing destination is tried", DEADLINE, || async {
        down.attempts() > 0
    })
    .await?;

    // Its backlog is all of it, on this replica's gauge and in ListDestinations; what it holds
    // (delivered, not acked) stays within max_ack_pending per partition consumer.
    wait_until("the backlog gauges are current", DEADLINE, || async {
        rig.metric(
            "herald_activator_backlog_events",
            &[("destination", "down")],
        ) == total as f64
            && rig.metric(
                "herald_activator_backlog_events",
                &[("destination", "healthy")],
            ) == 0.0
    })
    .await?;
    let listed = c
        .list_destinations(ListDestinationsRequest {})
        .await?
        .into_inner()
        .items;
    let status = |id: &str| {
        listed
            .iter()
            .find(|i| {
                i.destination
                    .as_ref()
                    .and_then(|d| d.spec.as_ref())
                    .is_some_and(|s| s.id == id)
            })
            .and_then(|i| i.status.clone())
            .with_context(|| format!("{id} is listed"))
    };
    let down_status = status("down")?;
    ensure!(down_status.consumer_exists);
    assert_eq!(
        down_status.pending + down_status.ack_pending,
        total as u64,
        "summed over the destination's partition consumers"
    );
    assert!(
        down_status.ack_pending <= (MAX_ACK_PENDING as u64) * u64::from(PARTITIONS),
        "held in flight: {}",
        down_status.ack_pending
    );
    let healthy_status = status("healthy")?;
    assert_eq!(healthy_status.pending + healthy_status.ack_pending, 0);

    // A stopped destination reports no backlog here.
    c.pause_destination(PauseDestinationRequest { id: "down".into() })
        .await?;
    rig.wait_change("down", "paused", 1).await?;
    wait_until(
        "the paused destination's gauge is zero",
        DEADLINE,
        || async {
            rig.metric(
                "herald_activator_backlog_events",
                &[("destination", "down")],
            ) == 0.0
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_partitions_and_the_shared_consumer() -> Result<()> {
    let mut rig = Rig::new().await?;
    let ordered_hook = WebhookServer::start().await?;
    let unordered_hook = WebhookServer::start().await?;
    let mut unordered = webhook("loose", &unordered_hook.url());
    unordered.ordered = Some(false);
    let destinations = vec![webhook("strict", &ordered_hook.url()), unordered];
    let fast_ownership = |cfg: &mut herald_activator::ActivatorConfig| {
        cfg.ownership.heartbeat_ms = 200;
        cfg.ownership.member_ttl_seconds = 1;
        cfg.ownership.pin_timeout_seconds = 1;
    };
    rig.start(destinations.clone(), fast_ownership).await?;
    rig.start(destinations, fast_ownership).await?;
    // Each replica delivers some partitions of the ordered destination once both have joined.
    wait_until("the replicas split the partitions", DEADLINE, || async {
        rig.metric(
            "herald_activator_partition_changes_total",
            &[("change", "released")],
        ) > 0.0
    })
    .await?;
    let ids = rig.publish_rounds(5).await?;
    wait_all(&ordered_hook, &ids).await?;
    wait_all(&unordered_hook, &ids).await?;
    check_arrivals_in_order(&ids, &keys(&ordered_hook.received()))?;
    let got: BTreeSet<String> = keys(&unordered_hook.received()).into_iter().collect();
    let want: BTreeSet<String> = ids.into_iter().collect();
    assert_eq!(got, want);
    Ok(())
}

/// A replica that hands partitions over gives back (nak) the events its delivery flow took in
/// and never started, so the new owner delivers them at once instead of after their ack wait
/// (a minute here). The webhook is slow, so every user has events queued at the handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_gives_back_the_events_never_started_at_once() -> Result<()> {
    let mut rig = Rig::new().await?;
    let hook = WebhookServer::start().await?;
    hook.set_delay(Duration::from_millis(100));
    let destinations = vec![webhook("slow", &hook.url())];
    let settings = |cfg: &mut herald_activator::ActivatorConfig| {
        cfg.ack_wait_seconds = 60;
        cfg.ownership.heartbeat_ms = 200;
        cfg.ownership.member_ttl_seconds = 1;
        cfg.ownership.pin_timeout_seconds = 1;
    };
    rig.start(destinations.clone(), settings).await?;
    let ids = rig.publish_rounds(40).await?;
    hook.wait_for(rig.users.len(), DEADLINE).await?;

    // Each user has about 4 s of sends queued: the second replica takes half the partitions.
    // Without the nak, what the first replica held would wait out its 60 s ack wait.
    rig.start(destinations, settings).await?;
    wait_until(
        "every event is delivered, well within the ack wait",
        Duration::from_secs(40),
        || async {
            let got: BTreeSet<String> = keys(&hook.received()).into_iter().collect();
            ids.iter().all(|id| got.contains(id))
        },
    )
    .await?;
    assert!(
        rig.metric(
            "herald_activator_partition_changes_total",
            &[("change", "released")]
        ) > 0.0,
        "the first replica released partitions"
    );
    check_arrivals_in_order(&ids, &keys(&hook.received()))?;
    Ok(())
}
