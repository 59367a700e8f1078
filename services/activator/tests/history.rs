//! The history, over a real nats-server and webhooks on loopback: events of suppressed or
//! erased identities (the processor's suppression list, written here as the processor writes
//! it) are never delivered, not even to a destination that starts from the oldest event or by a
//! replay; an erasure published on several partitions reaches each destination once; a replay
//! re-sends exactly a window's events to one destination.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, kv};
use herald_activator::{DestinationConfig, DestinationKind, Start};
use herald_common::identity::kv_key;
use herald_common::server::ServiceHandle;
use herald_common::telemetry::PrometheusHandle;
use herald_common::{CommonConfig, Topology};
use herald_proto::v1::replay_service_client::ReplayServiceClient;
use herald_proto::v1::{Event, EventType, Identity, ProcessedEvent, ReplayProgress, ReplayRequest};
use herald_testkit::{
    NatsServer, WebhookServer, common_config, control_channel, protobuf_track, publish_processed,
    wait_ready, wait_until,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);
const PARTITIONS: u32 = 3;
const TOKEN: &str = "token-of-the-test";

/// A nats-server with the processed stream, the consent and suppressions buckets, and an
/// activator over it once started.
pub struct Rig {
    _nats: NatsServer,
    pub js: jetstream::Context,
    pub topology: Topology,
    pub common: CommonConfig,
    pub suppressions: kv::Store,
    pub metrics: PrometheusHandle,
    pub shutdown: CancellationToken,
    pub activator: Option<ServiceHandle>,
    /// More replicas, started by [`Rig::start_replica`].
    pub replicas: Vec<ServiceHandle>,
}

impl Rig {
    pub async fn new() -> Result<Self> {
        let nats = NatsServer::start().await?;
        let js = nats.jetstream().await;
        let common = common_config(&nats.url(), PARTITIONS, TOKEN);
        let topology = Topology::new(common.topology.clone());
        herald_testkit::activator_upstream(&js, &topology).await?;
        let suppressions = js
            .create_key_value(herald_common::suppressions::bucket_config(&topology))
            .await?;
        Ok(Self {
            _nats: nats,
            js,
            topology,
            common,
            suppressions,
            metrics: herald_common::telemetry::metrics(),
            shutdown: CancellationToken::new(),
            activator: None,
            replicas: Vec::new(),
        })
    }

    pub async fn start(&mut self, destinations: Vec<DestinationConfig>) -> Result<()> {
        let activator = self.replica(destinations).await?;
        self.activator = Some(activator);
        Ok(())
    }

    /// Starts one more activator replica over the same server.
    pub async fn start_replica(&mut self, destinations: Vec<DestinationConfig>) -> Result<()> {
        let activator = self.replica(destinations).await?;
        self.replicas.push(activator);
        Ok(())
    }

    async fn replica(&self, destinations: Vec<DestinationConfig>) -> Result<ServiceHandle> {
        let cfg = common::loopback_config(destinations, 200)?;
        let activator = herald_activator::start(
            &self.common,
            &cfg,
            self.metrics.clone(),
            self.shutdown.clone(),
        )
        .await?;
        wait_ready("the activator is ready", activator.admin_addr, DEADLINE).await?;
        Ok(activator)
    }

    /// Suppresses an identity as the processor does (its `Suppression` record under the
    /// identity's bucket key).
    pub async fn suppress(&self, kind: &str, value: &str) -> Result<()> {
        let record = json!({
            "schema_version": 1,
            "identity": {"type": kind, "value": value},
            "reason": "erasure",
            "request_id": "req-test",
            "created_at": "2026-12-01T10:00:00Z",
        });
        self.suppressions
            .put(kv_key(kind, value), serde_json::to_vec(&record)?.into())
            .await?;
        Ok(())
    }

    /// Publishes `processed` to its event's partition; its stream sequence.
    pub async fn publish(&self, processed: &ProcessedEvent) -> Result<u64> {
        publish_processed(&self.js, &self.topology, processed).await
    }

    /// When the processed stream stored sequence `seq`.
    pub async fn stored_at(&self, seq: u64) -> Result<prost_types::Timestamp> {
        let stream = self.js.get_stream(self.topology.processed_stream()).await?;
        let msg = stream.get_raw_message(seq).await?;
        let nanos = msg.time.unix_timestamp_nanos();
        Ok(prost_types::Timestamp {
            seconds: i64::try_from(nanos.div_euclid(1_000_000_000))?,
            nanos: i32::try_from(nanos.rem_euclid(1_000_000_000))?,
        })
    }

    /// Publishes track `seq` of `user` (profile `p-<user>`, identities `user_id:<user>` and
    /// any `extra`); its stream sequence.
    pub async fn track(&self, user: &str, seq: u64, extra: &[(&str, &str)]) -> Result<u64> {
        let mut identities = vec![identity("user_id", user)];
        identities.extend(extra.iter().map(|(k, v)| identity(k, v)));
        self.publish(&ProcessedEvent {
            event: Some(protobuf_track("src", user, seq, PARTITIONS)),
            profile_id: format!("p-{user}"),
            identities,
            consent: None,
        })
        .await
    }

    /// Events of `destination` skipped for `reason`.
    pub fn skipped(&self, destination: &str, reason: &str) -> u64 {
        self.metrics
            .render()
            .lines()
            .find(|l| {
                l.starts_with("herald_activator_events_skipped_total{")
                    && l.contains(&format!(r#"destination="{destination}""#))
                    && l.contains(&format!(r#"reason="{reason}""#))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for activator in self.activator.into_iter().chain(self.replicas) {
            let _ = activator.task.await;
        }
    }
}

pub fn identity(kind: &str, value: &str) -> Identity {
    Identity {
        r#type: kind.into(),
        value: value.into(),
    }
}

pub fn webhook(id: &str, hook: &WebhookServer) -> DestinationConfig {
    DestinationConfig {
        id: id.into(),
        kind: DestinationKind::Webhook,
        url: Some(hook.url()),
        timeout_ms: Some(5_000),
        start: Start::All,
        ..Default::default()
    }
}

/// The `herald.eventId`s a webhook received.
fn event_ids(hook: &WebhookServer) -> BTreeSet<String> {
    hook.received()
        .iter()
        .filter_map(|r| r.body["herald"]["eventId"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressed_and_erased_people_are_never_delivered() -> Result<()> {
    let mut rig = Rig::new().await?;
    // History: three events each of four people; user-2 is erased (suppressed by user id),
    // user-4 is suppressed through an identity only its profile carries (an e-mail).
    for seq in 1..=3 {
        rig.track("user-1", seq, &[]).await?;
        rig.track("user-2", seq, &[]).await?;
        rig.track("user-3", seq, &[]).await?;
        rig.track("user-4", seq, &[("email", "four@example.com")])
            .await?;
    }
    rig.suppress("user_id", "user-2").await?;
    rig.suppress("email", "four@example.com").await?;

    // A destination that starts from the oldest event gets everyone's but theirs.
    let hook = WebhookServer::start().await?;
    rig.start(vec![webhook("all", &hook)]).await?;
    hook.wait_for(6, DEADLINE).await?;
    wait_until("six events counted as suppressed", DEADLINE, || async {
        rig.skipped("all", "suppressed") == 6
    })
    .await?;
    let want: BTreeSet<String> = ["user-1", "user-3"]
        .iter()
        .flat_map(|u| (1..=3).map(move |s| format!("src:{u}-{s}")))
        .collect();
    assert_eq!(event_ids(&hook), want);

    // Live: a suppression made now stops that person's later events; others still flow.
    rig.suppress("anonymous_id", "anon-of-user-1").await?;
    let mut later = protobuf_track("src", "user-1", 4, PARTITIONS);
    later.anonymous_id = "anon-of-user-1".into();
    rig.publish(&ProcessedEvent {
        event: Some(later),
        profile_id: "p-user-1".into(),
        ..Default::default()
    })
    .await?;
    rig.track("user-3", 4, &[]).await?;
    hook.wait_for(7, DEADLINE).await?;
    wait_until("the suppressed live event is counted", DEADLINE, || async {
        rig.skipped("all", "suppressed") == 7
    })
    .await?;
    let got = event_ids(&hook);
    assert!(got.contains("src:user-3-4"), "{got:?}");
    assert!(!got.contains("src:user-1-4"), "{got:?}");
    assert_eq!(got.len(), 7);
    rig.stop().await;
    Ok(())
}

/// An erasure event as the processor publishes it on `partition`.
pub fn erasure(request: &str, partition: u32) -> ProcessedEvent {
    let now = herald_proto::time::to_proto(chrono::Utc::now());
    ProcessedEvent {
        event: Some(Event {
            id: format!("erasure:{request}:{partition}"),
            message_id: request.into(),
            source_id: "herald".into(),
            r#type: EventType::Erasure as i32,
            user_id: "user-9".into(),
            anonymous_id: "anon-9".into(),
            timestamp: Some(now),
            received_at: Some(now),
            partition,
            ..Default::default()
        }),
        profile_id: "p-user-9".into(),
        identities: vec![
            identity("anonymous_id", "anon-9"),
            identity("user_id", "user-9"),
        ],
        consent: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_reaches_each_destination_once() -> Result<()> {
    let mut rig = Rig::new().await?;
    // The processor suppresses before it publishes the erasure: the erasure still goes out.
    rig.suppress("user_id", "user-9").await?;
    rig.suppress("anonymous_id", "anon-9").await?;
    let plain = WebhookServer::start().await?;
    let tracks_only = WebhookServer::start().await?;
    let destinations = vec![
        webhook("plain", &plain),
        // A filter does not hold back an erasure.
        DestinationConfig {
            event_types: vec!["track".into()],
            ..webhook("tracks", &tracks_only)
        },
    ];
    // Two replicas: the copies may be delivered by either.
    rig.start(destinations.clone()).await?;
    rig.start_replica(destinations).await?;
    let request = "req-0123456789abcdef01234567";
    for p in 0..PARTITIONS {
        rig.publish(&erasure(request, p)).await?;
    }
    for (id, hook) in [("plain", &plain), ("tracks", &tracks_only)] {
        hook.wait_for(1, DEADLINE).await?;
        wait_until(
            "the other copies are counted as duplicates",
            DEADLINE,
            || async { rig.skipped(id, "erasure_duplicate") == u64::from(PARTITIONS - 1) },
        )
        .await?;
        let got = hook.received();
        assert_eq!(got.len(), 1, "{id}: {got:?}");
        let body = &got[0].body;
        assert_eq!(body["type"], "erasure", "{id}");
        assert_eq!(body["requestId"], request, "{id}");
        assert_eq!(body["profileId"], "p-user-9", "{id}");
        assert_eq!(
            body["identities"],
            json!([
                {"type": "anonymous_id", "value": "anon-9"},
                {"type": "user_id", "value": "user-9"},
            ]),
            "{id}"
        );
        assert_eq!(got[0].header("idempotency-key"), Some(request), "{id}");
    }
    rig.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_exactly_the_window_to_one_destination() -> Result<()> {
    let mut rig = Rig::new().await?;
    // Before the window, in it (with a suppressed person's events), after it.
    for seq in 1..=2 {
        rig.track("user-1", seq, &[]).await?;
    }
    let first_in = rig.track("user-1", 3, &[]).await?;
    rig.track("user-2", 1, &[]).await?;
    rig.track("user-1", 4, &[]).await?;
    rig.track("user-2", 2, &[]).await?;
    rig.track("user-3", 1, &[]).await?;
    let first_after = rig.track("user-1", 5, &[]).await?;
    rig.track("user-3", 2, &[]).await?;
    rig.suppress("user_id", "user-2").await?;
    let from = rig.stored_at(first_in).await?;
    let to = rig.stored_at(first_after).await?;

    // Both destinations start now: live delivery sends them nothing of the history.
    let chosen = WebhookServer::start().await?;
    let other = WebhookServer::start().await?;
    let live = |id: &str, hook: &WebhookServer| DestinationConfig {
        start: Start::Now,
        ..webhook(id, hook)
    };
    rig.start(vec![live("chosen", &chosen), live("other", &other)])
        .await?;
    let addr = rig.activator.as_ref().context("started")?.grpc_addr;
    let mut client = ReplayServiceClient::new(control_channel(addr, TOKEN).await?);
    let mut progress = client
        .replay(ReplayRequest {
            destination_id: "chosen".into(),
            from: Some(from),
            to: Some(to),
        })
        .await?
        .into_inner();
    let mut last: Option<ReplayProgress> = None;
    while let Some(p) = tokio::time::timeout(DEADLINE, progress.message())
        .await
        .context("progress in time")??
    {
        last = Some(p);
    }
    let last = last.context("at least one progress message")?;
    assert!(last.done, "{last:?}");
    assert_eq!((last.read, last.sent, last.skipped), (5, 3, 2), "{last:?}");
    let want: BTreeSet<String> = ["src:user-1-3", "src:user-1-4", "src:user-3-1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(event_ids(&chosen), want);
    assert_eq!(chosen.received().len(), 3);
    assert_eq!(rig.skipped("chosen", "suppressed"), 2);
    // The other destination got nothing: the replay was done when it was checked.
    assert!(other.received().is_empty());

    // Unknown destinations and empty windows are refused.
    let unknown = client
        .replay(ReplayRequest {
            destination_id: "nope".into(),
            from: Some(from),
            to: Some(to),
        })
        .await
        .expect_err("unknown destination");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let empty = client
        .replay(ReplayRequest {
            destination_id: "chosen".into(),
            from: Some(to),
            to: Some(from),
        })
        .await
        .expect_err("empty window");
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    rig.stop().await;
    Ok(())
}
