//! Consent at send time, over a real nats-server and webhooks on loopback: each send attempt
//! checks the event's consent snapshot and the person's current consent, which the activator
//! follows in the processor's consent bucket (written here as the processor writes it).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, kv};
use herald_activator::filter::UnknownConsent;
use herald_activator::{DestinationConfig, DestinationKind, Start};
use herald_common::nats::ensure_stream;
use herald_common::server::ServiceHandle;
use herald_common::telemetry::PrometheusHandle;
use herald_common::{CommonConfig, Topology};
use herald_proto::v1::{Consent, ProcessedEvent};
use herald_testkit::{
    NatsServer, WebhookServer, common_config, processed_track, publish_processed, wait_ready,
    wait_until,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

/// How long the activator may take to see a consent change (the issue's deadline).
const CONSENT_DEADLINE: Duration = Duration::from_secs(1);

/// A nats-server with the processed stream and the consent bucket, and an activator over it.
struct Rig {
    _nats: NatsServer,
    js: jetstream::Context,
    topology: Topology,
    common: CommonConfig,
    /// The consent bucket, once created.
    consent: Option<kv::Store>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    activator: Option<ServiceHandle>,
}

impl Rig {
    /// The rig, with the consent bucket when `consent_bucket` (else see [`Rig::create_bucket`]).
    async fn new(consent_bucket: bool) -> Result<Self> {
        let nats = NatsServer::start().await?;
        let js = nats.jetstream().await;
        let common: CommonConfig = common_config(&nats.url(), 1, "token-of-the-test");
        let topology = Topology::new(common.topology.clone());
        ensure_stream(&js, topology.processed_stream_config()).await?;
        let mut rig = Self {
            _nats: nats,
            js,
            topology,
            common,
            consent: None,
            metrics: herald_common::telemetry::metrics(),
            shutdown: CancellationToken::new(),
            activator: None,
        };
        if consent_bucket {
            rig.create_bucket().await?;
        }
        Ok(rig)
    }

    /// Creates the consent bucket as the processor creates it (history 1).
    async fn create_bucket(&mut self) -> Result<()> {
        let kv = self
            .js
            .create_key_value(kv::Config {
                bucket: self.topology.bucket("consent"),
                history: 1,
                ..Default::default()
            })
            .await?;
        self.consent = Some(kv);
        Ok(())
    }

    /// Starts the activator with these destinations, and waits until it is ready (the consent
    /// bucket loaded).
    async fn start(&mut self, destinations: Vec<DestinationConfig>) -> Result<()> {
        self.start_unready(destinations).await?;
        let admin = self.admin_addr()?;
        wait_ready("the activator is ready", admin, DEADLINE).await
    }

    /// The activator's admin address.
    fn admin_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.activator.as_ref().context("started")?.admin_addr)
    }

    /// Starts the activator with these destinations, without waiting for it to be ready.
    async fn start_unready(&mut self, destinations: Vec<DestinationConfig>) -> Result<()> {
        let cfg = common::loopback_config(destinations, 200)?;
        let activator = herald_activator::start(
            &self.common,
            &cfg,
            self.metrics.clone(),
            self.shutdown.clone(),
        )
        .await?;
        self.activator = Some(activator);
        Ok(())
    }

    /// Writes `profile`'s consent record as the processor does (its `ConsentRecord` JSON).
    async fn record_consent(
        &self,
        profile: &str,
        purposes: &[(&str, bool)],
        opted_out: bool,
    ) -> Result<()> {
        let purposes: BTreeMap<&str, bool> = purposes
            .iter()
            .map(|(p, allowed)| (*p, *allowed && !opted_out))
            .collect();
        let record = json!({
            "schema_version": 1,
            "profile_id": profile,
            "purposes": purposes,
            "opted_out": opted_out,
            "updated_at": "2026-12-01T10:00:00Z",
            "profile_revision": 1,
        });
        self.consent
            .as_ref()
            .context("the consent bucket")?
            .put(profile, serde_json::to_vec(&record)?.into())
            .await?;
        Ok(())
    }

    /// Publishes event `seq` of `user` (profile `p-<user>`) carrying the consent `snapshot`.
    async fn publish(&self, user: &str, seq: u64, snapshot: Option<Consent>) -> Result<()> {
        let processed = ProcessedEvent {
            consent: snapshot,
            ..processed_track(user, seq, 1, &format!("p-{user}"))
        };
        publish_processed(&self.js, &self.topology, &processed).await?;
        Ok(())
    }

    /// Events of `destination` counted as consent-dropped.
    fn consent_dropped(&self, destination: &str) -> u64 {
        self.metrics
            .render()
            .lines()
            .find(|l| {
                l.starts_with("herald_activator_events_skipped_total{")
                    && l.contains(&format!(r#"destination="{destination}""#))
                    && l.contains(r#"reason="consent""#)
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        if let Some(activator) = self.activator {
            let _ = activator.task.await;
        }
    }
}

fn webhook(
    id: &str,
    hook: &WebhookServer,
    require: &[&str],
    unknown: UnknownConsent,
) -> DestinationConfig {
    DestinationConfig {
        id: id.into(),
        kind: DestinationKind::Webhook,
        url: Some(hook.url()),
        timeout_ms: Some(5_000),
        require_purposes: require.iter().map(|p| p.to_string()).collect(),
        unknown_consent: unknown,
        // Events published before the activator started are delivered too.
        start: Start::All,
        ..Default::default()
    }
}

fn consent(purposes: &[(&str, bool)]) -> Consent {
    Consent {
        purposes: purposes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        ..Default::default()
    }
}

/// The users (`userId`) of the events a webhook accepted, sorted.
fn users(hook: &WebhookServer) -> Vec<String> {
    let mut users: Vec<String> = hook
        .received()
        .iter()
        .filter_map(|r| r.body["userId"].as_str().map(str::to_owned))
        .collect();
    users.sort();
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_purposes_and_unknown_consent_decide_who_is_sent() -> Result<()> {
    let (ads, ads_allow, all) = (
        WebhookServer::start().await?,
        WebhookServer::start().await?,
        WebhookServer::start().await?,
    );
    let mut rig = Rig::new(true).await?;
    // `refuser` refused advertising (in the event and now), `granter` granted it, `unknown`
    // stated nothing. `changed` granted it when the event was processed and refused it since.
    // The activator loads these before it is ready.
    rig.record_consent("p-refuser", &[("advertising", false)], false)
        .await?;
    rig.record_consent("p-granter", &[("advertising", true)], false)
        .await?;
    rig.record_consent("p-changed", &[("advertising", false)], false)
        .await?;
    rig.start(vec![
        // Requires advertising; unknown is refused (the default).
        webhook("ads", &ads, &["advertising"], UnknownConsent::default()),
        // Requires advertising; unknown is allowed.
        webhook(
            "ads-allow",
            &ads_allow,
            &["advertising"],
            UnknownConsent::Allow,
        ),
        // Requires nothing.
        webhook("all", &all, &[], UnknownConsent::default()),
    ])
    .await?;
    rig.publish("refuser", 1, Some(consent(&[("advertising", false)])))
        .await?;
    rig.publish("granter", 1, Some(consent(&[("advertising", true)])))
        .await?;
    rig.publish("unknown", 1, None).await?;
    rig.publish("changed", 1, Some(consent(&[("advertising", true)])))
        .await?;

    // Every event is settled: sent or counted as consent-dropped.
    wait_until(
        "every destination settled every event",
        DEADLINE,
        || async {
            all.received().len() == 4
                && ads.received().len() + rig.consent_dropped("ads") as usize == 4
                && ads_allow.received().len() + rig.consent_dropped("ads-allow") as usize == 4
        },
    )
    .await?;
    assert_eq!(
        users(&all),
        ["changed", "granter", "refuser", "unknown"],
        "a destination that requires no purpose gets everyone not opted out"
    );
    assert_eq!(users(&ads), ["granter"]);
    assert_eq!(users(&ads_allow), ["granter", "unknown"]);
    assert_eq!(rig.consent_dropped("ads"), 3);
    assert_eq!(rig.consent_dropped("ads-allow"), 2);
    assert_eq!(rig.consent_dropped("all"), 0);
    rig.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opt_out_stops_events_that_are_retrying() -> Result<()> {
    let hook = WebhookServer::start().await?;
    hook.set_failing(503);
    let mut rig = Rig::new(true).await?;
    // Published before the activator starts, so that one batch holds them all.
    for seq in 1..=3 {
        rig.publish("alice", seq, None).await?;
        rig.publish("bob", seq, None).await?;
    }
    rig.start(vec![webhook("hook", &hook, &[], UnknownConsent::default())])
        .await?;
    // Both people's first events are being retried.
    wait_until("both people's first events retried", DEADLINE, || async {
        let requests = hook.requests();
        ["alice", "bob"].iter().all(|u| {
            requests
                .iter()
                .filter(|r| r.body["userId"] == *u && r.status == 503)
                .count()
                >= 2
        })
    })
    .await
    .with_context(|| {
        let seen: Vec<(String, u16)> = hook
            .requests()
            .iter()
            .map(|r| (r.body["userId"].to_string(), r.status))
            .collect();
        format!("requests: {seen:?}")
    })?;

    // Alice opts out; once the deadline for the activator to see it has passed (with margin),
    // the destination recovers.
    rig.record_consent("p-alice", &[], true).await?;
    tokio::time::sleep(CONSENT_DEADLINE + CONSENT_DEADLINE / 2).await;
    hook.set_healthy();

    // Bob's events arrive; Alice's, the retrying one and the two queued behind it, are
    // dropped: none is sent.
    wait_until(
        "bob's events delivered, alice's dropped",
        DEADLINE,
        || async { users(&hook) == ["bob", "bob", "bob"] && rig.consent_dropped("hook") == 3 },
    )
    .await?;
    let seqs: Vec<u64> = hook
        .received()
        .iter()
        .filter_map(|r| r.body["properties"]["seq"].as_u64())
        .collect();
    assert_eq!(seqs, [1, 2, 3], "bob's events in order");
    // Nothing of Alice's arrives afterwards either.
    let more = hook.wait_for(4, Duration::from_secs(3)).await;
    assert!(more.is_err(), "a fourth event arrived: {:?}", users(&hook));
    assert_eq!(users(&hook), ["bob", "bob", "bob"]);
    rig.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_sent_and_not_ready_until_the_consent_bucket_is_loaded() -> Result<()> {
    let hook = WebhookServer::start().await?;
    // No processor yet: no consent bucket.
    let mut rig = Rig::new(false).await?;
    rig.publish("bob", 1, None).await?;
    rig.start_unready(vec![webhook("hook", &hook, &[], UnknownConsent::default())])
        .await?;
    // The activator loads its destinations but waits for the bucket, without crashing, and
    // says so.
    let readyz = format!("http://{}/readyz", rig.admin_addr()?);
    let http = reqwest::Client::new();
    wait_until(
        "the activator waits for the consent only",
        DEADLINE,
        || async {
            match http.get(&readyz).send().await {
                Ok(r) if r.status() == 503 => r.text().await.is_ok_and(|t| {
                    t.contains(herald_activator::CONSENT_LOADED_CHECK)
                        && !t.contains(herald_activator::DESTINATIONS_LOADED_CHECK)
                }),
                _ => false,
            }
        },
    )
    .await?;
    assert!(
        hook.requests().is_empty(),
        "sent before the consent was loaded"
    );
    assert!(
        !rig.activator
            .as_ref()
            .context("started")?
            .task
            .is_finished()
    );

    // The processor creates the bucket: the activator loads it, is ready, and delivers.
    rig.create_bucket().await?;
    wait_ready("the activator is ready", rig.admin_addr()?, DEADLINE).await?;
    let got = hook.wait_for(1, DEADLINE).await?;
    assert_eq!(got[0].body["userId"], "bob");
    rig.stop().await;
    Ok(())
}
