//! The activator's delivery loop over a real nats-server and a webhook on loopback: a failed
//! send is counted with its class (`permanent` for a 400, `transient` for a 503), is retried
//! until the webhook accepts it, and a `Retry-After` sets the pause before the next attempt.

mod common;

use std::time::Duration;

use anyhow::{Context as _, Result};
use herald_activator::{DestinationConfig, DestinationKind};
use herald_common::Topology;
use herald_common::nats::ensure_stream;
use herald_proto::v1::ProcessedEvent;
use herald_testkit::{
    NatsServer, WebhookServer, common_config, protobuf_track, wait_ready, wait_until,
};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_class_and_retry_after_sets_the_pause() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await;
    let common = common_config(&nats.url(), 1, "token-of-the-test");
    let topology = Topology::new(common.topology.clone());
    ensure_stream(&js, topology.processed_stream_config()).await?;
    // The processor's consent bucket: the activator waits for it before delivering.
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: topology.bucket("consent"),
        ..Default::default()
    })
    .await?;

    let hook = WebhookServer::start().await?;
    hook.set_failing(400);
    let destinations = vec![DestinationConfig {
        id: "hook".into(),
        kind: DestinationKind::Webhook,
        url: Some(hook.url()),
        timeout_ms: Some(5_000),
        ..Default::default()
    }];
    let cfg = common::loopback_config(destinations, 500)?;
    let metrics = herald_common::telemetry::metrics();
    let shutdown = CancellationToken::new();
    let activator =
        herald_activator::start(&common, &cfg, metrics.clone(), shutdown.clone()).await?;
    wait_ready("the activator is ready", activator.admin_addr, DEADLINE).await?;

    let publish = |seq: u64| {
        let js = js.clone();
        let subject = topology.processed_subject(0);
        async move {
            let processed = ProcessedEvent {
                event: Some(protobuf_track("src", "user-1", seq, 1)),
                profile_id: "profile-1".into(),
                ..Default::default()
            };
            js.publish(subject, processed.encode_to_vec().into())
                .await?
                .await
                .context("stored")
        }
    };
    publish(1).await?;

    // A 400 is permanent: counted so, and (until dead letters exist) retried.
    wait_until("two attempts answered 400", DEADLINE, || async {
        hook.attempts() >= 2
    })
    .await?;
    let permanent = failures_line(&metrics.render(), "http_4xx")?;
    assert!(permanent.contains(r#"class="permanent""#), "{permanent}");

    // A 503 with Retry-After: 2 is transient, and the next attempt waits 2 s (the backoff
    // alone would be at most 500 ms).
    hook.set_retry_after(Some("2"));
    hook.set_failing(503);
    let before = hook.attempts();
    wait_until("an attempt answered 503", DEADLINE, || async {
        hook.requests().iter().skip(before).any(|r| r.status == 503)
    })
    .await?;
    wait_until("the next attempt after the 503", DEADLINE, || async {
        hook.requests()
            .iter()
            .skip(before)
            .skip_while(|r| r.status != 503)
            .count()
            >= 2
    })
    .await?;
    let requests = hook.requests();
    let mut after_503 = requests.iter().skip(before).skip_while(|r| r.status != 503);
    let (first, next) = (
        after_503.next().context("a 503")?,
        after_503.next().context("its retry")?,
    );
    let pause = next.at - first.at;
    assert!(pause >= Duration::from_millis(1_900), "{pause:?}");
    let transient = failures_line(&metrics.render(), "http_5xx")?;
    assert!(transient.contains(r#"class="transient""#), "{transient}");

    // Once the webhook accepts, the event is delivered once, with its id as the key.
    hook.set_retry_after(None);
    hook.set_healthy();
    let got = hook.wait_for(1, DEADLINE).await?;
    assert_eq!(got[0].header("idempotency-key"), Some("src:user-1-1"));

    shutdown.cancel();
    let _ = activator.task.await;
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
