//! Destinations as live config, over a real nats-server, the activator in process, its gRPC
//! `DestinationService` on a port-0 server and real webhooks on loopback: CRUD with secrets
//! masked and invalid definitions refused; create, pause, resume, update and delete taking
//! effect on the running activator; `start = now | all`; config-file seeding with the deprecated
//! keys; and the upgrade from the config-file activator's single consumer to the partitions'.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
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
    CreateDestinationRequest, DeleteDestinationRequest, DestinationSpec, Event,
    GetDestinationRequest, ListDestinationsRequest, PauseDestinationRequest, ProcessedEvent,
    ResumeDestinationRequest, UpdateDestinationRequest,
};
use herald_testkit::{
    NatsServer, WebhookServer, common_config, control_channel, protobuf_track, publish_processed,
    wait_ready, wait_until,
};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);
const TOKEN: &str = "token-of-the-test";

type Client = DestinationServiceClient<InterceptedService<Channel, BearerToken>>;

/// A nats-server with the processed stream, and an activator over it.
struct Rig {
    _nats: NatsServer,
    js: jetstream::Context,
    topology: Topology,
    common: CommonConfig,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    activator: Option<ServiceHandle>,
    seq: u64,
}

impl Rig {
    async fn new() -> Result<Self> {
        let nats = NatsServer::start().await?;
        let js = nats.jetstream().await;
        let common = common_config(&nats.url(), 1, TOKEN);
        let topology = Topology::new(common.topology.clone());
        herald_testkit::activator_upstream(&js, &topology).await?;
        Ok(Self {
            _nats: nats,
            js,
            topology,
            common,
            metrics: herald_common::telemetry::metrics(),
            shutdown: CancellationToken::new(),
            activator: None,
            seq: 0,
        })
    }

    /// Starts the activator with these config-file destinations; returns its control client.
    async fn start(&mut self, destinations: Vec<DestinationConfig>) -> Result<Client> {
        let cfg = common::loopback_config(destinations, 200)?;
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
        self.activator = Some(activator);
        Ok(client)
    }

    /// Publishes one processed event for `user`; returns its event id.
    async fn publish(&mut self, user: &str) -> Result<String> {
        self.publish_with(user, |_| {}).await
    }

    /// Publishes one processed track event for `user`, changed by `edit`; returns its id.
    async fn publish_with(&mut self, user: &str, edit: impl FnOnce(&mut Event)) -> Result<String> {
        self.seq += 1;
        let mut event = protobuf_track("src", user, self.seq, 1);
        edit(&mut event);
        let id = event.id.clone();
        let processed = ProcessedEvent {
            event: Some(event),
            profile_id: format!("profile-{user}"),
            ..Default::default()
        };
        publish_processed(&self.js, &self.topology, &processed).await?;
        Ok(id)
    }

    /// Waits until this replica has applied `action` to `destination` `n` times in all.
    async fn wait_change(&self, destination: &str, action: &str, n: u64) -> Result<()> {
        let want = format!(r#"destination="{destination}""#);
        let action_label = format!(r#"action="{action}""#);
        wait_until(
            &format!("destination {destination} {action} ({n})"),
            DEADLINE,
            || async {
                self.metrics
                    .render()
                    .lines()
                    .filter(|l| l.starts_with("herald_activator_destination_changes_total"))
                    .filter(|l| l.contains(&want) && l.contains(&action_label))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>()
                    >= n as f64
            },
        )
        .await
    }

    /// Whether any consumer of the destination exists (the shared one or the partition's).
    async fn consumer_exists(&self, destination: &str) -> Result<bool> {
        let stream = self.js.get_stream(self.topology.processed_stream()).await?;
        for name in [
            consumer_name(destination),
            partition_consumer_name(destination, 0),
        ] {
            if stream.consumer_info(name).await.is_ok() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn webhook_spec(id: &str, url: &str) -> DestinationSpec {
    DestinationSpec {
        id: id.into(),
        kind: "webhook".into(),
        settings: HashMap::from([("url".to_string(), url.to_string())]),
        ..Default::default()
    }
}

fn ids(received: &[herald_testkit::Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.header("idempotency-key").unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_round_trip_masks_secrets_and_refuses_what_cannot_work() -> Result<()> {
    let mut rig = Rig::new().await?;
    let mut c = rig.start(Vec::new()).await?;
    let hook = WebhookServer::start().await?;

    let mut spec = webhook_spec("crm", &hook.url());
    spec.settings
        .insert("secret".into(), "whsec-very-secret".into());
    spec.settings
        .insert("header.Authorization".into(), "Bearer tok-123".into());
    spec.event_types = vec!["track".into()];
    spec.filter = r#"event.event == "Order Completed""#.into();
    spec.require_purposes = vec!["advertising".into()];
    spec.unknown_consent = "allow".into();
    spec.start = "all".into();
    spec.max_attempts = 3;
    let created = c
        .create_destination(CreateDestinationRequest {
            spec: Some(spec.clone()),
        })
        .await?
        .into_inner()
        .destination
        .context("created")?;
    let s = created.spec.context("spec")?;
    assert_eq!(s.settings["secret"], "***");
    assert_eq!(s.settings["header.Authorization"], "***");
    assert_eq!(s.settings["url"], hook.url());
    assert_eq!(
        (
            s.start.as_str(),
            s.max_attempts,
            s.max_age_seconds,
            s.ordered
        ),
        ("all", 3, 86_400, Some(true))
    );
    assert_eq!(s.unknown_consent, "allow");

    let got = c
        .get_destination(GetDestinationRequest { id: "crm".into() })
        .await?
        .into_inner()
        .destination
        .context("got")?;
    let gs = got.spec.clone().context("spec")?;
    assert_eq!(gs.settings["secret"], "***");
    assert_eq!(gs.filter, spec.filter);
    let listed = c
        .list_destinations(ListDestinationsRequest {})
        .await?
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1);
    let listed_spec = listed[0]
        .destination
        .clone()
        .context("d")?
        .spec
        .context("s")?;
    assert_eq!(listed_spec.settings["header.Authorization"], "***");
    assert_eq!(listed[0].status.clone().context("status")?.id, "crm");

    // An update that sends the masked values back keeps the stored secrets.
    let mut update = gs.clone();
    update.settings.insert("timeout_ms".into(), "1500".into());
    c.update_destination(UpdateDestinationRequest { spec: Some(update) })
        .await?;
    let kv = rig.js.get_key_value(rig.topology.bucket("config")).await?;
    let stored: serde_json::Value =
        serde_json::from_slice(&kv.get("destinations.crm").await?.context("stored")?)?;
    assert_eq!(stored["settings"]["secret"], "whsec-very-secret");
    assert_eq!(stored["settings"]["header.Authorization"], "Bearer tok-123");
    assert_eq!(stored["settings"]["timeout_ms"], "1500");

    // Refused: a duplicate, invalid CEL (with its position), an internal address, an unknown
    // kind, an unknown setting.
    let refuse = |spec: DestinationSpec| {
        let mut c = c.clone();
        async move {
            c.create_destination(CreateDestinationRequest { spec: Some(spec) })
                .await
                .expect_err("refused")
        }
    };
    let dup = refuse(webhook_spec("crm", &hook.url())).await;
    assert_eq!(dup.code(), tonic::Code::AlreadyExists, "{dup:?}");
    let mut bad_cel = webhook_spec("cel", &hook.url());
    bad_cel.filter = "event.type == ".into();
    let e = refuse(bad_cel).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("at 1:"), "{}", e.message());
    for url in [
        "http://169.254.169.254/latest",
        "http://10.1.2.3/hook",
        "ftp://example.com/",
    ] {
        let e = refuse(webhook_spec("ssrf", url)).await;
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{url}: {e:?}");
    }
    let mut unknown_kind = webhook_spec("k", &hook.url());
    unknown_kind.kind = "carrier-pigeon".into();
    let e = refuse(unknown_kind).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("expected webhook, log or nats"),
        "{}",
        e.message()
    );
    let mut unknown_setting = webhook_spec("u", &hook.url());
    unknown_setting
        .settings
        .insert("colour".into(), "red".into());
    assert_eq!(
        refuse(unknown_setting).await.code(),
        tonic::Code::InvalidArgument
    );

    let e = c
        .get_destination(GetDestinationRequest { id: "nope".into() })
        .await
        .expect_err("not found");
    assert_eq!(e.code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_take_effect_on_the_running_activator() -> Result<()> {
    let mut rig = Rig::new().await?;
    let mut c = rig.start(Vec::new()).await?;
    let hook = WebhookServer::start().await?;
    let other = WebhookServer::start().await?;

    // Created: delivers at once.
    c.create_destination(CreateDestinationRequest {
        spec: Some(webhook_spec("live", &hook.url())),
    })
    .await?;
    rig.wait_change("live", "started", 1).await?;
    let first = rig.publish("u1").await?;
    let got = hook.wait_for(1, DEADLINE).await?;
    assert_eq!(ids(&got), vec![first.clone()]);

    // Paused: the loop has stopped, so what is published now waits in the consumer (or, when
    // the stopped loop's last pull request took it, unacknowledged until the ack wait).
    c.pause_destination(PauseDestinationRequest { id: "live".into() })
        .await?;
    rig.wait_change("live", "paused", 1).await?;
    let while_paused = rig.publish("u1").await?;
    wait_until("the event waits in the consumer", DEADLINE, || async {
        let Ok(stream) = rig.js.get_stream(rig.topology.processed_stream()).await else {
            return false;
        };
        stream
            .consumer_info(partition_consumer_name("live", 0))
            .await
            .is_ok_and(|i| i.num_pending + i.num_ack_pending as u64 == 1)
    })
    .await?;
    assert_eq!(hook.received().len(), 1, "nothing is sent while paused");

    // Resumed: the backlog is delivered.
    c.resume_destination(ResumeDestinationRequest { id: "live".into() })
        .await?;
    let got = hook.wait_for(2, DEADLINE).await?;
    assert_eq!(ids(&got), vec![first.clone(), while_paused.clone()]);

    // Updated to another URL: later events go there, from where the consumer was.
    let mut moved = webhook_spec("live", &other.url());
    moved.start = "all".into();
    c.update_destination(UpdateDestinationRequest { spec: Some(moved) })
        .await?;
    rig.wait_change("live", "updated", 1).await?;
    let after_update = rig.publish("u1").await?;
    let got = other.wait_for(1, DEADLINE).await?;
    assert_eq!(
        ids(&got),
        vec![after_update],
        "only the new event, at the new URL"
    );
    assert_eq!(hook.received().len(), 2);

    // Deleted: the loop stops and the consumer goes.
    c.delete_destination(DeleteDestinationRequest { id: "live".into() })
        .await?;
    rig.wait_change("live", "deleted", 1).await?;
    assert!(!rig.consumer_exists("live").await?);
    rig.publish("u1").await?;
    let e = c
        .get_destination(GetDestinationRequest { id: "live".into() })
        .await
        .expect_err("gone");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(
        other.received().len(),
        1,
        "nothing is sent after the delete"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_now_skips_older_events_and_start_all_gets_them() -> Result<()> {
    let mut rig = Rig::new().await?;
    let mut c = rig.start(Vec::new()).await?;
    let old1 = rig.publish("u1").await?;
    let old2 = rig.publish("u2").await?;
    let now_hook = WebhookServer::start().await?;
    let all_hook = WebhookServer::start().await?;
    c.create_destination(CreateDestinationRequest {
        spec: Some(webhook_spec("from-now", &now_hook.url())),
    })
    .await?;
    let mut all = webhook_spec("from-all", &all_hook.url());
    all.start = "all".into();
    c.create_destination(CreateDestinationRequest { spec: Some(all) })
        .await?;
    rig.wait_change("from-now", "started", 1).await?;
    let new = rig.publish("u1").await?;

    let got = all_hook.wait_for(3, DEADLINE).await?;
    let mut got_ids = ids(&got);
    got_ids.sort();
    let mut want = vec![old1, old2, new.clone()];
    want.sort();
    assert_eq!(got_ids, want);
    let got = now_hook.wait_for(1, DEADLINE).await?;
    assert_eq!(ids(&got), vec![new]);
    // Its consumer has nothing else to deliver: the older events were never in its range.
    let stream = rig.js.get_stream(rig.topology.processed_stream()).await?;
    wait_until("the now consumer is drained", DEADLINE, || async {
        stream
            .consumer_info(partition_consumer_name("from-now", 0))
            .await
            .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
    })
    .await?;
    assert_eq!(now_hook.received().len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_destinations_are_seeded_with_the_deprecated_keys_mapped() -> Result<()> {
    let mut rig = Rig::new().await?;
    let hook = WebhookServer::start().await?;
    let dir = tempfile::tempdir()?;
    let log_file = dir.path().join("events.jsonl");
    let mut c = rig
        .start(vec![
            // Today's keys: url, timeout_ms, headers, secret.
            DestinationConfig {
                id: "old-style".into(),
                kind: DestinationKind::Webhook,
                url: Some(hook.url()),
                timeout_ms: Some(2_500),
                headers: [("X-Tenant".to_string(), herald_common::Secret("acme".into()))].into(),
                secret: Some(herald_common::Secret("whsec".into())),
                ..Default::default()
            },
            // The new shape.
            DestinationConfig {
                id: "new-style".into(),
                kind: DestinationKind::Log,
                settings: herald_activator::Settings(
                    [("log_file".to_string(), log_file.display().to_string())].into(),
                ),
                event_types: vec!["track".into()],
                start: herald_activator::Start::All,
                ..Default::default()
            },
        ])
        .await?;
    let old = c
        .get_destination(GetDestinationRequest {
            id: "old-style".into(),
        })
        .await?
        .into_inner()
        .destination
        .context("seeded")?;
    assert!(old.from_config);
    let s = old.spec.context("spec")?;
    assert_eq!(s.settings["url"], hook.url());
    assert_eq!(s.settings["timeout_ms"], "2500");
    assert_eq!(s.settings["header.X-Tenant"], "***");
    assert_eq!(s.settings["secret"], "***");
    let new = c
        .get_destination(GetDestinationRequest {
            id: "new-style".into(),
        })
        .await?
        .into_inner()
        .destination
        .context("seeded")?
        .spec
        .context("spec")?;
    assert_eq!(new.event_types, vec!["track".to_string()]);
    assert_eq!(new.start, "all");

    // Both deliver; the mapped header reaches the webhook.
    let id = rig.publish("u1").await?;
    let got = hook.wait_for(1, DEADLINE).await?;
    assert_eq!(got[0].header("x-tenant"), Some("acme"));
    assert!(got[0].header("herald-signature").is_some());
    wait_until("the log destination wrote the event", DEADLINE, || async {
        std::fs::read_to_string(&log_file).is_ok_and(|t| t.contains(&id))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_consumer_carries_on_from_its_position_whatever_start_says() -> Result<()> {
    let mut rig = Rig::new().await?;
    // The config-file activator's consumer: `activator-hook`, delivering from the start; it
    // acknowledged the first three events.
    let old_reader = ReaderConfig {
        stream: rig.topology.processed_stream(),
        durable: consumer_name("hook"),
        filter_subject: rig.topology.processed_wildcard(),
        ack_wait: Duration::from_secs(5),
        max_ack_pending: 10_000,
        batch: 256,
        description: "Herald activator: destination hook".into(),
    };
    let (_, consumer) = ensure_consumer(&rig.js, &old_reader, None).await?;
    let mut acked = Vec::new();
    for _ in 0..3 {
        acked.push(rig.publish("u1").await?);
    }
    let mut messages = consumer.fetch().max_messages(3).messages().await?;
    let mut n = 0;
    while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
        m.map_err(anyhow::Error::msg)?
            .double_ack()
            .await
            .map_err(anyhow::Error::msg)?;
        n += 1;
    }
    assert_eq!(n, 3);
    let waiting = vec![rig.publish("u1").await?, rig.publish("u2").await?];

    // Now the live destination, seeded from the same config entry (start defaults to now,
    // which is after every event above): it continues after the acknowledged three.
    let hook = WebhookServer::start().await?;
    rig.start(vec![DestinationConfig {
        id: "hook".into(),
        kind: DestinationKind::Webhook,
        url: Some(hook.url()),
        ..Default::default()
    }])
    .await?;
    let got = hook.wait_for(2, DEADLINE).await?;
    let mut got_ids = ids(&got);
    got_ids.sort();
    let mut want = waiting.clone();
    want.sort();
    assert_eq!(
        got_ids, want,
        "the unacknowledged events, none of {acked:?}"
    );
    let later = rig.publish("u1").await?;
    let got = hook.wait_for(3, DEADLINE).await?;
    assert_eq!(ids(&got)[2], later);
    assert_eq!(
        hook.received().len(),
        3,
        "nothing acknowledged is sent again"
    );
    // The old consumer is gone; the partition's carries on.
    let stream = rig.js.get_stream(rig.topology.processed_stream()).await?;
    wait_until("the old consumer is deleted", DEADLINE, || async {
        stream.consumer_info(consumer_name("hook")).await.is_err()
    })
    .await?;
    assert!(rig.consumer_exists("hook").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_the_integrations_object_decide_what_is_sent() -> Result<()> {
    let mut rig = Rig::new().await?;
    let mut c = rig.start(Vec::new()).await?;
    let hook = WebhookServer::start().await?;
    let mut spec = webhook_spec("orders", &hook.url());
    spec.event_types = vec!["track".into()];
    spec.event_names = vec!["Order Completed".into()];
    spec.filter = "event.properties.total > 100.0".into();
    c.create_destination(CreateDestinationRequest { spec: Some(spec) })
        .await?;
    rig.wait_change("orders", "started", 1).await?;

    let order = |total: u32, integrations: &'static str| {
        move |e: &mut Event| {
            e.name = "Order Completed".into();
            e.properties = format!(r#"{{"total":{total}}}"#).into_bytes();
            e.integrations = integrations.as_bytes().to_vec();
        }
    };
    let big = rig.publish_with("u1", order(150, "")).await?;
    rig.publish_with("u1", order(50, "")).await?; // the condition fails
    rig.publish("u1").await?; // another name
    rig.publish_with("u2", order(200, r#"{"All":false}"#))
        .await?;
    rig.publish_with("u2", order(250, r#"{"orders":false}"#))
        .await?;
    let named = rig
        .publish_with("u2", order(300, r#"{"All":false,"orders":true}"#))
        .await?;

    let got = hook.wait_for(2, DEADLINE).await?;
    let mut got_ids = ids(&got);
    got_ids.sort();
    let mut want = vec![big, named];
    want.sort();
    assert_eq!(got_ids, want);
    // The other four were acked and counted, not left behind.
    let stream = rig.js.get_stream(rig.topology.processed_stream()).await?;
    wait_until("every event is settled", DEADLINE, || async {
        stream
            .consumer_info(partition_consumer_name("orders", 0))
            .await
            .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
    })
    .await?;
    let skipped: f64 = rig
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("herald_activator_events_skipped_total"))
        .filter(|l| l.contains(r#"destination="orders""#) && l.contains(r#"reason="filtered""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(skipped, 4.0);
    assert_eq!(hook.received().len(), 2);
    Ok(())
}
