//! `Retry` against a real nats-server: while it waits, the messages it keeps alive are not
//! redelivered past their ack wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::stream;
use futures_util::StreamExt;
use herald_common::retry::Retry;
use herald_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const ACK_WAIT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_message_is_not_redelivered_while_the_retry_waits() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await;
    let stream = js
        .create_stream(stream::Config {
            name: "RETRY".into(),
            subjects: vec!["retry.>".into()],
            ..Default::default()
        })
        .await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("holder".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            ..Default::default()
        })
        .await?;
    js.publish("retry.a", "held".into()).await?.await?;
    let mut first = consumer.fetch().max_messages(1).messages().await?;
    let msg = tokio::time::timeout(Duration::from_secs(10), first.next())
        .await?
        .expect("the message is delivered")
        .map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(msg.info().map_err(|e| anyhow::anyhow!(e))?.delivered, 1);

    // Another client pulls the whole time: it would get the message back as soon as its ack
    // wait ran out.
    let redelivered = Arc::new(AtomicU64::new(0));
    let stop_pulling = CancellationToken::new();
    let puller = tokio::spawn({
        let (consumer, redelivered, stop) =
            (consumer.clone(), redelivered.clone(), stop_pulling.clone());
        async move {
            while !stop.is_cancelled() {
                let Ok(mut batch) = consumer
                    .fetch()
                    .max_messages(1)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await
                else {
                    continue;
                };
                while let Some(Ok(m)) = batch.next().await {
                    redelivered.fetch_add(1, Ordering::SeqCst);
                    let _ = m.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                }
            }
        }
    });

    // The operation fails for three ack waits, then succeeds.
    let started = Instant::now();
    let cancel = CancellationToken::new();
    let mut failures = 0;
    let got = Retry::new(Duration::from_millis(200))
        .keep_alive(vec![msg.clone()], ACK_WAIT / 3)
        .run(
            &cancel,
            || async move {
                if started.elapsed() < 3 * ACK_WAIT {
                    Err("store down")
                } else {
                    Ok("stored")
                }
            },
            |_| failures += 1,
        )
        .await;
    assert_eq!(got, Some("stored"));
    assert!(failures > 3, "it retried ({failures} failures)");
    msg.double_ack().await.map_err(|e| anyhow::anyhow!(e))?;
    stop_pulling.cancel();
    tokio::time::timeout(Duration::from_secs(10), puller).await??;

    assert_eq!(
        redelivered.load(Ordering::SeqCst),
        0,
        "the held message was redelivered while the retry waited"
    );
    let mut consumer = consumer;
    let info = consumer.info().await?;
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.delivered.consumer_sequence, 1, "delivered once only");
    assert_eq!(info.num_ack_pending, 0);
    Ok(())
}
