//! The activator's delivery over a real nats-server and a webhook on loopback: failures are
//! counted by class and a `Retry-After` sets the pause; a refused event goes to the DLQ and
//! its user carries on; the circuit breaker stops hammering a failing destination and
//! recovery delivers everything in per-user order; batching; the rate limit.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use herald_activator::{DestinationConfig, DestinationKind, Settings, Start};
use herald_common::server::ServiceHandle;
use herald_common::telemetry::PrometheusHandle;
use herald_common::{CommonConfig, Topology};
use herald_proto::v1::{DlqReason, DlqRecord, ProcessedEvent};
use herald_testkit::{
    NatsServer, Received, WebhookServer, common_config, processed_track, protobuf_track,
    publish_processed, wait_ready, wait_until,
};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

/// A nats-server with the processed stream and the consent bucket, and an activator
/// delivering to one webhook destination `hook`.
struct Harness {
    _nats: NatsServer,
    js: async_nats::jetstream::Context,
    topology: Topology,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    activator: Option<ServiceHandle>,
    common: CommonConfig,
}

impl Harness {
    async fn new() -> Result<Self> {
        let nats = NatsServer::start().await?;
        let js = nats.jetstream().await;
        let common = common_config(&nats.url(), 1, "token-of-the-test");
        let topology = Topology::new(common.topology.clone());
        herald_testkit::activator_upstream(&js, &topology).await?;
        Ok(Self {
            _nats: nats,
            js,
            topology,
            metrics: herald_common::telemetry::metrics(),
            shutdown: CancellationToken::new(),
            activator: None,
            common,
        })
    }

    /// Starts the activator with `hook` as the one destination, tuned by `tweak`.
    async fn start(
        &mut self,
        hook: DestinationConfig,
        tweak: impl FnOnce(&mut herald_activator::ActivatorConfig),
    ) -> Result<()> {
        let mut cfg = common::loopback_config(vec![hook], 100)?;
        tweak(&mut cfg);
        let activator = herald_activator::start(
            &self.common,
            &cfg,
            self.metrics.clone(),
            self.shutdown.clone(),
        )
        .await?;
        wait_ready("the activator is ready", activator.admin_addr, DEADLINE).await?;
        self.activator = Some(activator);
        Ok(())
    }

    /// Publishes track number `seq` of `user` (profile `p-<user>`) to the processed stream.
    async fn publish(&self, user: &str, seq: u64) -> Result<()> {
        let processed = processed_track(user, seq, 1, &format!("p-{user}"));
        publish_processed(&self.js, &self.topology, &processed).await?;
        Ok(())
    }

    /// Every dead letter of `destination`, in stream order.
    async fn dlq(&self, destination: &str) -> Result<Vec<DlqRecord>> {
        let stream = self.js.get_stream(self.topology.dlq_stream()).await?;
        let subject = self.topology.dlq_subject(destination);
        let mut out = Vec::new();
        let mut next = 1;
        while let Ok(m) = stream
            .get_first_raw_message_by_subject(&subject, next)
            .await
        {
            next = m.sequence + 1;
            out.push(DlqRecord::decode(m.payload)?);
        }
        Ok(out)
    }

    /// The value of the sample of `name` whose labels include every one of `labels`.
    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics
            .render()
            .lines()
            .find(|l| {
                l.starts_with(&format!("{name}{{")) && labels.iter().all(|want| l.contains(want))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(a) = self.activator.take() {
            let _ = a.task.await;
        }
    }
}

fn webhook(hook: &WebhookServer, settings: &[(&str, &str)]) -> DestinationConfig {
    let mut s: BTreeMap<String, String> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.insert("url".into(), hook.url());
    s.insert("timeout_ms".into(), "5000".into());
    DestinationConfig {
        id: "hook".into(),
        kind: DestinationKind::Webhook,
        settings: Settings(s),
        ..Default::default()
    }
}

/// `(userId, seq)` of every event a request carried, in order (a batch's items, or the event).
fn events_of(r: &Received) -> Vec<(String, u64)> {
    let items = match r.body.get("batch").and_then(|b| b.as_array()) {
        Some(items) => items.clone(),
        None => vec![r.body.clone()],
    };
    items
        .iter()
        .map(|e| {
            (
                e["userId"].as_str().unwrap_or_default().to_string(),
                e["properties"]["seq"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

mod dlq {
    use herald_proto::v1::DlqRecord;

    /// The event id of a dead letter.
    pub fn event_id(r: &DlqRecord) -> &str {
        r.event
            .as_ref()
            .and_then(|p| p.event.as_ref())
            .map_or("", |e| e.id.as_str())
    }
}

/// Checks that every user's events `1..=rounds` were delivered, each once, in order.
fn check_per_user_order(received: &[Received], users: &[String], rounds: u64) -> Result<()> {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in received {
        for (user, seq) in events_of(r) {
            seen.entry(user).or_default().push(seq);
        }
    }
    for user in users {
        let got = seen.get(user).cloned().unwrap_or_default();
        let want: Vec<u64> = (1..=rounds).collect();
        ensure!(got == want, "{user}: delivered {got:?}, want {want:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_class_and_retry_after_sets_the_pause() -> Result<()> {
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    // A 503 with Retry-After: 2 is transient, and the next attempt waits 2 s (the backoff
    // alone would be at most 500 ms; a Retry-After is honoured up to 6 times that).
    hook.set_retry_after(Some("2"));
    hook.set_failing(503);
    h.start(webhook(&hook, &[]), |c| c.retry_max_backoff_ms = 500)
        .await?;
    h.publish("user-1", 1).await?;
    wait_until("two attempts answered 503", DEADLINE, || async {
        hook.attempts() >= 2
    })
    .await?;
    let requests = hook.requests();
    let pause = requests[1].at - requests[0].at;
    assert!(pause >= Duration::from_millis(1_900), "{pause:?}");
    let transient = failures_line(&h.metrics.render(), "http_5xx")?;
    assert!(transient.contains(r#"class="transient""#), "{transient}");
    assert!(
        h.metric(
            "herald_activator_attempts_total",
            &[r#"destination="hook""#, r#"class="transient""#]
        ) >= 2.0
    );

    // Once the webhook accepts, the event is delivered once, with its id as the key.
    hook.set_retry_after(None);
    hook.set_healthy();
    let got = hook.wait_for(1, DEADLINE).await?;
    assert_eq!(got[0].header("idempotency-key"), Some("src:user-1-1"));
    wait_until("the delivery is counted", DEADLINE, || async {
        h.metric(
            "herald_activator_deliveries_total",
            &[r#"destination="hook""#, r#"outcome="delivered""#],
        ) == 1.0
    })
    .await?;
    let rendered = h.metrics.render();
    assert!(
        rendered.contains("herald_activator_freshness_seconds_count{destination=\"hook\"} 1"),
        "{rendered}"
    );
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_goes_to_the_dlq_and_later_events_are_delivered() -> Result<()> {
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    // The destination refuses user-1's first event, and only it.
    hook.set_failing_for(400, r#""user-1-1""#);
    h.start(webhook(&hook, &[]), |_| {}).await?;
    // The zero-valued series are there from the start.
    let rendered = h.metrics.render();
    assert!(
        rendered
            .contains(r#"herald_activator_deliveries_total{destination="hook",outcome="dlq"} 0"#),
        "{rendered}"
    );
    for (user, seq) in [("user-1", 1), ("user-2", 1), ("user-1", 2), ("user-2", 2)] {
        h.publish(user, seq).await?;
    }
    let got = hook.wait_for(3, DEADLINE).await?;
    let mut delivered: Vec<(String, u64)> = got.iter().flat_map(events_of).collect();
    delivered.sort();
    assert_eq!(
        delivered,
        [
            ("user-1".to_string(), 2),
            ("user-2".to_string(), 1),
            ("user-2".to_string(), 2)
        ]
    );
    // It was tried once (a 400 is permanent) and is in the DLQ with the answer.
    let refused: Vec<_> = hook
        .requests()
        .into_iter()
        .filter(|r| r.status == 400)
        .collect();
    assert_eq!(refused.len(), 1);
    wait_until("the dead letter is counted", DEADLINE, || async {
        h.metric(
            "herald_activator_deliveries_total",
            &[r#"destination="hook""#, r#"outcome="dlq""#],
        ) == 1.0
    })
    .await?;
    let dlq = h.dlq("hook").await?;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let r = &dlq[0];
    assert_eq!(r.destination, "hook");
    assert_eq!(r.attempts, 1);
    assert_eq!(r.last_status, 400);
    assert_eq!(r.reason(), DlqReason::Permanent);
    assert_eq!(r.body_excerpt, r#"{"error":"failing on purpose"}"#);
    assert_eq!(r.last_error_kind, "http_4xx");
    assert!(r.first_attempt_at.is_some() && r.last_attempt_at.is_some());
    assert_eq!(
        r.event
            .as_ref()
            .and_then(|e| e.event.as_ref())
            .map(|e| e.id.as_str()),
        Some("src:user-1-1")
    );
    let permanent = failures_line(&h.metrics.render(), "http_4xx")?;
    assert!(permanent.contains(r#"class="permanent""#), "{permanent}");
    // The DLQ gauge follows the stream.
    wait_until("the DLQ gauge shows the dead letter", DEADLINE, || async {
        h.metric("herald_activator_dlq_events", &[r#"destination="hook""#]) == 1.0
    })
    .await?;
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_attempts_moves_an_event_to_the_dlq() -> Result<()> {
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    hook.set_failing(503);
    let mut dest = webhook(&hook, &[]);
    dest.max_attempts = Some(3);
    h.start(dest, |c| c.breaker_failures = 0).await?;
    h.publish("user-1", 1).await?;
    wait_until("the event is dead-lettered", DEADLINE, || async {
        h.dlq("hook").await.is_ok_and(|d| d.len() == 1)
    })
    .await?;
    let r = &h.dlq("hook").await?[0];
    assert_eq!((r.attempts, r.last_status), (3, 503));
    assert_eq!(r.reason(), DlqReason::Attempts);
    assert_eq!(hook.attempts(), 3);
    // The user's next event goes through.
    hook.set_healthy();
    h.publish("user-1", 2).await?;
    let got = hook.wait_for(1, DEADLINE).await?;
    assert_eq!(events_of(&got[0]), [("user-1".to_string(), 2)]);
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_age_moves_an_event_to_the_dlq() -> Result<()> {
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    hook.set_failing(503);
    let mut dest = webhook(&hook, &[]);
    dest.max_age_seconds = Some(1);
    dest.max_attempts = Some(1_000);
    h.start(dest, |c| c.breaker_failures = 0).await?;
    h.publish("user-1", 1).await?;
    wait_until("the event is dead-lettered", DEADLINE, || async {
        h.dlq("hook").await.is_ok_and(|d| d.len() == 1)
    })
    .await?;
    let r = &h.dlq("hook").await?[0];
    assert_eq!(r.reason(), DlqReason::Age);
    assert!(r.attempts >= 2, "{}", r.attempts);
    let first = r.first_attempt_at.context("first")?;
    let last = r.last_attempt_at.context("last")?;
    assert!(
        last.seconds * 1_000_000_000 + i64::from(last.nanos)
            >= first.seconds * 1_000_000_000 + i64::from(first.nanos) + 1_000_000_000
    );
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_sent_again_one_event_at_a_time() -> Result<()> {
    const ROUNDS: u64 = 6;
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    let users = ["user-1".to_string(), "user-2".to_string()];
    for seq in 1..=ROUNDS {
        for u in &users {
            h.publish(u, seq).await?;
        }
    }
    // Any request carrying user-1's third event is refused.
    hook.set_failing_for(400, r#""user-1-3""#);
    let mut dest = webhook(&hook, &[("batch_max", "4")]);
    dest.start = Start::All;
    h.start(dest, |_| {}).await?;
    let total = users.len() * ROUNDS as usize - 1;
    wait_until("every other event is delivered", DEADLINE, || async {
        hook.received()
            .iter()
            .map(|r| events_of(r).len())
            .sum::<usize>()
            >= total
    })
    .await?;
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in hook.received() {
        for (user, seq) in events_of(&r) {
            seen.entry(user).or_default().push(seq);
        }
    }
    assert_eq!(seen["user-1"], [1, 2, 4, 5, 6]);
    assert_eq!(seen["user-2"], (1..=ROUNDS).collect::<Vec<_>>());
    let dlq = h.dlq("hook").await?;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq::event_id(&dlq[0]), "src:user-1-3");
    assert_eq!(dlq[0].reason(), DlqReason::Permanent);
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundreds_for_a_while_then_recovery_delivers_everything_in_per_user_order()
-> Result<()> {
    const USERS: usize = 8;
    const ROUNDS: u64 = 5;
    const COOL_DOWN: Duration = Duration::from_millis(1_000);
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    hook.set_failing(500);
    h.start(webhook(&hook, &[]), |c| {
        c.breaker_failures = 3;
        c.breaker_cool_down_ms = COOL_DOWN.as_millis() as u64;
    })
    .await?;
    let users: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
    for seq in 1..=ROUNDS {
        for u in &users {
            h.publish(u, seq).await?;
        }
    }
    wait_until("the breaker opens", DEADLINE, || async {
        h.metric(
            "herald_activator_breaker_transitions_total",
            &[r#"destination="hook""#, r#"state="open""#],
        ) >= 1.0
    })
    .await?;
    // While it is open only probes go out: over two cool-downs or more, a handful of
    // requests (the ones already on their way when it opened, then one probe per cool-down),
    // where the 8 users retrying every 100 ms at most would have sent well over 100.
    let opened_at = hook.attempts();
    let started = std::time::Instant::now();
    wait_until("two probes while down", DEADLINE, || async {
        hook.attempts() >= opened_at + 2
    })
    .await?;
    let window = started.elapsed();
    let sent = hook.attempts() - opened_at;
    assert!(window >= COOL_DOWN, "{window:?}");
    assert!(
        sent <= USERS + 2,
        "{sent} requests in {window:?} while open"
    );
    // No event was given up on: waits behind an open breaker are not attempts.
    assert!(h.dlq("hook").await?.is_empty());

    hook.set_healthy();
    let total = USERS * ROUNDS as usize;
    let got = hook.wait_for(total, Duration::from_secs(60)).await?;
    check_per_user_order(&got, &users, ROUNDS)?;
    wait_until("the breaker closes", DEADLINE, || async {
        h.metric(
            "herald_activator_breaker_transitions_total",
            &[r#"destination="hook""#, r#"state="closed""#],
        ) >= 1.0
    })
    .await?;
    assert_eq!(hook.received().len(), total, "nothing delivered twice");
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_keep_per_user_order_and_name_their_first_event() -> Result<()> {
    const USERS: usize = 3;
    const ROUNDS: u64 = 10;
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    let users: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
    // Stored before the activator starts (it reads from the start), so its first batches
    // are full.
    for seq in 1..=ROUNDS {
        for u in &users {
            h.publish(u, seq).await?;
        }
    }
    let mut dest = webhook(&hook, &[("batch_max", "8")]);
    dest.start = Start::All;
    h.start(dest, |_| {}).await?;
    let total = USERS * ROUNDS as usize;
    wait_until("every event is delivered", DEADLINE, || async {
        hook.received()
            .iter()
            .map(|r| events_of(r).len())
            .sum::<usize>()
            >= total
    })
    .await?;
    let got = hook.received();
    check_per_user_order(&got, &users, ROUNDS)?;
    assert!(
        got.len() < total,
        "{} requests for {total} events",
        got.len()
    );
    for r in &got {
        let key = r.header("idempotency-key").context("a key")?;
        match r.body.get("batch").and_then(|b| b.as_array()) {
            Some(items) => {
                assert!(items.len() <= 8, "{}", items.len());
                let first = items[0]["herald"]["eventId"].as_str().context("an id")?;
                assert_eq!(key, format!("{first}+{}", items.len()));
                // Each event keeps its own id.
                assert!(items.iter().all(|i| i["herald"]["eventId"].is_string()));
            }
            None => assert_eq!(Some(key), r.body["herald"]["eventId"].as_str()),
        }
    }
    // One event waiting alone is sent as the event object.
    let before = got.len();
    h.publish("user-0", ROUNDS + 1).await?;
    let got = hook.wait_for(before + 1, DEADLINE).await?;
    let last = &got[before];
    assert!(last.body.get("batch").is_none(), "{}", last.body);
    assert_eq!(last.header("idempotency-key"), Some("src:user-0-11"));
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_spreads_sends() -> Result<()> {
    const EVENTS: u64 = 30;
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    for seq in 1..=EVENTS {
        h.publish(&format!("user-{}", seq % 5), seq).await?;
    }
    let mut dest = webhook(&hook, &[]);
    dest.start = Start::All;
    dest.rate_limit = Some(10);
    h.start(dest, |_| {}).await?;
    let got = hook
        .wait_for(EVENTS as usize, Duration::from_secs(60))
        .await?;
    // 10/s with a one-second burst: the last 20 take about two seconds; without the limit
    // 30 local requests take a few milliseconds. The bound is generous.
    let span = got[got.len() - 1].at - got[0].at;
    assert!(span >= Duration::from_millis(1_000), "{span:?}");
    h.stop().await;
    Ok(())
}

/// The `herald_activator_send_failures_total` sample of destination `hook` and `reason`.
fn failures_line(rendered: &str, reason: &str) -> Result<String> {
    rendered
        .lines()
        .find(|l| {
            l.starts_with("herald_activator_send_failures_total{")
                && l.contains(r#"destination="hook""#)
                && l.contains(&format!(r#"reason="{reason}""#))
        })
        .map(str::to_owned)
        .with_context(|| format!("no {reason} failures counted in:\n{rendered}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn historical_events_are_never_forwarded() -> Result<()> {
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    // Event 1 came through mParticle's historical lane; events 2 and 3 are live.
    for seq in 1..=3u64 {
        let mut event = protobuf_track("src", "user-1", seq, 1);
        event.historical = seq == 1;
        let processed = ProcessedEvent {
            event: Some(event),
            profile_id: "p-user-1".into(),
            ..Default::default()
        };
        h.js.publish(
            h.topology.processed_subject(0),
            processed.encode_to_vec().into(),
        )
        .await?
        .await
        .context("stored")?;
    }
    let mut dest = webhook(&hook, &[]);
    dest.start = Start::All;
    h.start(dest, |_| {}).await?;
    let got = hook.wait_for(2, DEADLINE).await?;
    let keys: Vec<&str> = got
        .iter()
        .filter_map(|r| r.header("idempotency-key"))
        .collect();
    assert_eq!(keys, ["src:user-1-2", "src:user-1-3"]);
    wait_until(
        "the historical event is counted as skipped",
        DEADLINE,
        || async {
            h.metric(
                "herald_activator_events_skipped_total",
                &["reason=\"historical\"", "destination=\"hook\""],
            ) >= 1.0
        },
    )
    .await?;
    // Nothing else arrives later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.received().len(), 2);
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_user_does_not_hold_up_other_users_later_batches() -> Result<()> {
    retrying_user_does_not_hold_up_others(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_user_does_not_hold_up_later_batches_of_an_unordered_destination() -> Result<()>
{
    retrying_user_does_not_hold_up_others(false).await
}

/// user-1's events are retried while user-2's later batches arrive, at a destination with
/// per-user order (`ordered`) or without.
async fn retrying_user_does_not_hold_up_others(ordered: bool) -> Result<()> {
    let mut h = Harness::new().await?;
    let hook = WebhookServer::start().await?;
    // Every event of user-1 is answered 503 (transient: retried in process) until further
    // notice; the breaker is off, so user-1's failures alone cannot stop the others.
    hook.set_failing_for(503, r#""userId":"user-1""#);
    let mut dest = webhook(&hook, &[]);
    dest.max_attempts = Some(10_000);
    dest.ordered = Some(ordered);
    h.start(dest, |c| {
        c.retry_max_backoff_ms = 200;
        c.breaker_failures = 0;
    })
    .await?;
    h.publish("user-1", 1).await?;
    h.publish("user-2", 1).await?;
    // user-2's events, each published after the one before it arrived (so each comes in a
    // batch of its own), arrive while user-1's first event is still being retried.
    for seq in 1..=4u64 {
        if seq > 1 {
            h.publish("user-2", seq).await?;
        }
        hook.wait_for(seq as usize, Duration::from_secs(10))
            .await
            .with_context(|| format!("user-2's event {seq} waited behind user-1's retries"))?;
    }
    let delivered: Vec<(String, u64)> = hook.received().iter().flat_map(events_of).collect();
    let user_2: Vec<(String, u64)> = (1..=4).map(|s| ("user-2".to_string(), s)).collect();
    assert_eq!(delivered, user_2);
    assert!(hook.attempts() > delivered.len(), "user-1 was tried");

    // user-1 recovers: its events arrive once each, in order, after the ones before.
    h.publish("user-1", 2).await?;
    hook.set_healthy();
    let got = hook.wait_for(6, DEADLINE).await?;
    let user_1: Vec<(String, u64)> = got
        .iter()
        .flat_map(events_of)
        .filter(|(user, _)| user == "user-1")
        .collect();
    assert_eq!(
        user_1,
        [("user-1".to_string(), 1), ("user-1".to_string(), 2)]
    );
    h.stop().await;
    Ok(())
}
