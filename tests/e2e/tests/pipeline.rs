//! End-to-end: HTTP → JetStream → processor → activator → webhook, over a real nats-server.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use herald_common::TopologyConfig;
use herald_e2e::{Pipeline, PipelineOptions, metric_value};
use herald_testkit::{
    NatsServer, Received, WebhookServer, segment_batch, segment_track, wait_until,
};
use serde_json::Value;

/// Per user, the `properties.seq` values in arrival order, first delivery of each event only.
fn per_user_sequences(received: &[Received]) -> BTreeMap<String, Vec<u64>> {
    let mut seen = HashSet::new();
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in received {
        let id = r.body["herald"]["eventId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !seen.insert(id) {
            continue;
        }
        let user = r.body["userId"].as_str().unwrap_or_default().to_string();
        out.entry(user)
            .or_default()
            .push(r.body["properties"]["seq"].as_u64().unwrap_or(u64::MAX));
    }
    out
}

fn assert_in_order(seqs: &BTreeMap<String, Vec<u64>>, users: usize, per_user: u64) {
    assert_eq!(seqs.len(), users, "every user's events arrived");
    for (user, s) in seqs {
        let expected: Vec<u64> = (0..per_user).collect();
        assert_eq!(
            s, &expected,
            "events of {user} arrived complete and in order"
        );
    }
}

/// Batches of `size` events, round-robin over `users`, each user's events numbered in order.
fn batches(users: usize, per_user: usize, size: usize) -> Vec<Value> {
    let mut items = Vec::new();
    for seq in 0..per_user {
        for u in 0..users {
            items.push(segment_track(&format!("user-{u}"), seq));
        }
    }
    items
        .chunks(size)
        .map(|c| segment_batch(c.to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_events_arrive_exactly_once_in_per_user_order() -> Result<()> {
    let nats = NatsServer::start().await?;
    let hook = WebhookServer::start().await?;
    let p = Pipeline::start(&nats.url(), PipelineOptions::webhook(hook.url())).await?;

    for b in batches(50, 20, 100) {
        let (status, body) = p.post_batch(&b).await?;
        assert_eq!((status, body.as_str()), (200, r#"{"success":true}"#));
    }
    let received = hook.wait_for(1000, Duration::from_secs(60)).await?;
    // Give a duplicate the chance to show up before counting.
    wait_until(
        "the destination backlog drains",
        Duration::from_secs(20),
        || async {
            let m = p.metrics().await.unwrap_or_default();
            metric_value(
                &m,
                "herald_activator_deliveries_total",
                &["outcome=\"delivered\""],
            ) >= 1000.0
        },
    )
    .await?;
    let received_after = hook.received();
    assert_eq!(
        received_after.len(),
        1000,
        "exactly once: no duplicate deliveries"
    );
    let ids: HashSet<_> = received
        .iter()
        .map(|r| {
            r.body["herald"]["eventId"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1000, "every event id delivered once");
    for r in &received {
        assert_eq!(r.body["type"], "track");
        assert_eq!(r.body["event"], "Order Completed");
        assert!(
            r.body["properties"]["revenue"].is_number(),
            "properties intact: {}",
            r.body
        );
        assert_eq!(
            r.headers.get("idempotency-key").map(String::as_str),
            r.body["herald"]["eventId"].as_str()
        );
    }
    assert_in_order(&per_user_sequences(&received), 50, 20);

    let m = p.metrics().await?;
    assert_eq!(
        metric_value(&m, "herald_ingest_events_accepted_total", &[]),
        1000.0
    );
    assert_eq!(
        metric_value(
            &m,
            "herald_processor_events_total",
            &["outcome=\"processed\""]
        ),
        1000.0
    );
    assert_eq!(
        metric_value(
            &m,
            "herald_activator_deliveries_total",
            &["destination=\"hook\"", "outcome=\"delivered\""]
        ),
        1000.0
    );
    assert!(
        m.contains("# HELP herald_processor_events_total"),
        "metrics have HELP text"
    );
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_produces_no_duplicates_downstream() -> Result<()> {
    let nats = NatsServer::start().await?;
    let hook = WebhookServer::start().await?;
    let p = Pipeline::start(&nats.url(), PipelineOptions::webhook(hook.url())).await?;
    let batch = batches(5, 4, 20).remove(0);
    for _ in 0..3 {
        let (status, _) = p.post_batch(&batch).await?;
        assert_eq!(status, 200);
    }
    // A marker sent after the retries: once it arrives, every earlier event has been handled.
    let marker = segment_batch(vec![segment_track("user-0", 99)]);
    assert_eq!(p.post_batch(&marker).await?.0, 200);
    let received = hook.wait_for(21, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hook.received().len(),
        21,
        "20 events plus the marker, no duplicates"
    );
    let ids: HashSet<_> = received
        .iter()
        .map(|r| r.body["messageId"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids.len(), 21);
    let m = p.metrics().await?;
    assert!(
        metric_value(
            &m,
            "herald_processor_events_total",
            &["outcome=\"processed\""]
        ) <= 21.0,
        "the processor never saw the duplicates: JetStream dropped them"
    );
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_that_recovers_gets_each_users_events_in_order() -> Result<()> {
    let nats = NatsServer::start().await?;
    let hook = WebhookServer::start().await?;
    hook.set_failing(503);
    let p = Pipeline::start(&nats.url(), PipelineOptions::webhook(hook.url())).await?;
    for b in batches(10, 20, 50) {
        assert_eq!(p.post_batch(&b).await?.0, 200);
    }
    // The destination's circuit breaker opens after 5 transient failures in a row (the
    // default) and then lets one probe through per cool-down.
    wait_until(
        "the webhook sees failed attempts",
        Duration::from_secs(20),
        || async { hook.attempts() >= 5 },
    )
    .await?;
    // Fail for longer than the ack wait (2 s): in-progress acks must keep messages from being
    // redelivered behind later ones.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        hook.received().is_empty(),
        "nothing counted as delivered while failing"
    );
    hook.set_healthy();
    let received = hook.wait_for(200, Duration::from_secs(60)).await?;
    assert_in_order(&per_user_sequences(&received), 10, 20);
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_the_events_stream_size_flows_through() -> Result<()> {
    let nats = NatsServer::start().await?;
    let hook = WebhookServer::start().await?;
    let max_bytes: i64 = 256 * 1024;
    let p = Pipeline::start(
        &nats.url(),
        PipelineOptions {
            topology: TopologyConfig {
                events_max_bytes: max_bytes,
                ..Default::default()
            },
            ..PipelineOptions::webhook(hook.url())
        },
    )
    .await?;
    let js = nats.jetstream().await;
    let mut sent_bytes = 0i64;
    let mut sent_events = 0usize;
    let mut seq = 0usize;
    while sent_bytes < 3 * max_bytes {
        let items: Vec<Value> = (0..40)
            .map(|i| {
                let mut t = segment_track(&format!("user-{}", i % 8), seq + i);
                t["properties"]["padding"] = Value::String("x".repeat(400));
                t
            })
            .collect();
        seq += 40;
        let body = segment_batch(items);
        let size = serde_json::to_vec(&body)?.len() as i64;
        // Wait for room: only possible if consumed events free their space.
        wait_until(
            "the events stream has room",
            Duration::from_secs(30),
            || {
                let js = js.clone();
                async move {
                    match js.get_stream("HERALD_EVENTS").await {
                        Ok(mut s) => match s.info().await {
                            Ok(info) => (info.state.bytes as i64) + 2 * size < max_bytes,
                            Err(_) => false,
                        },
                        Err(_) => false,
                    }
                }
            },
        )
        .await?;
        let (status, text) = p.post_batch(&body).await?;
        ensure!(
            status == 200,
            "got {status} {text} after {sent_bytes} bytes"
        );
        sent_bytes += size;
        sent_events += 40;
    }
    hook.wait_for(sent_events, Duration::from_secs(60))
        .await
        .context("every event delivered")?;
    let mut s = js.get_stream("HERALD_EVENTS").await?;
    assert_eq!(s.info().await?.config.max_bytes, max_bytes);
    p.stop().await;
    Ok(())
}
