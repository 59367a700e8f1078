//! `nats::confirmed_ack` against a real nats-server: the server confirms the ack, after which
//! the message is settled (nothing ack-pending, nothing redelivered).

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::stream;
use futures_util::StreamExt;
use herald_common::nats::confirmed_ack;
use herald_testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_ack_settles_the_message() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await;
    let stream = js
        .create_stream(stream::Config {
            name: "ACKS".into(),
            subjects: vec!["acks.>".into()],
            ..Default::default()
        })
        .await?;
    let mut consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("acker".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await?;
    for n in 0..3 {
        js.publish(format!("acks.{n}"), "x".into()).await?.await?;
    }
    let mut batch = consumer.fetch().max_messages(3).messages().await?;
    let mut got = Vec::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), batch.next()).await? {
        got.push(m.map_err(|e| anyhow::anyhow!(e))?);
    }
    ensure!(got.len() == 3, "fetched {}", got.len());
    for m in &got[..2] {
        confirmed_ack(&m.context.client(), m.reply.as_ref())
            .await
            .map_err(anyhow::Error::msg)?;
    }
    // Confirmed: the server has settled both before the call returned.
    let info = consumer.info().await?.clone();
    ensure!(
        info.ack_floor.consumer_sequence == 2 && info.num_ack_pending == 1,
        "after two confirmed acks: {info:?}"
    );
    // The unacked one comes back after its ack wait; the acked ones do not.
    let mut again = consumer
        .fetch()
        .max_messages(3)
        .expires(Duration::from_secs(3))
        .messages()
        .await?;
    let back = tokio::time::timeout(Duration::from_secs(10), again.next())
        .await?
        .context("the unacked message comes back")?
        .map_err(|e| anyhow::anyhow!(e))?;
    ensure!(back.subject.as_str() == "acks.2", "{}", back.subject);
    Ok(())
}
