//! `OrderedReader` against a real nats-server: abandoned messages come back in stream order
//! after a restart, and copies redelivered while a reader holds a message are dropped.

use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, AckKind, stream};
use herald_common::ordered::{OrderedReader, ReaderConfig};
use herald_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

fn reader_config(ack_wait: Duration) -> ReaderConfig {
    ReaderConfig {
        stream: "ORDER".into(),
        durable: "reader".into(),
        filter_subject: "order.>".into(),
        ack_wait,
        max_ack_pending: 1_000,
        batch: 100,
        description: "ordered reader test".into(),
    }
}

async fn setup(nats: &NatsServer, n: usize) -> Result<jetstream::Context> {
    let js = nats.jetstream().await;
    js.create_stream(stream::Config {
        name: "ORDER".into(),
        subjects: vec!["order.>".into()],
        ..Default::default()
    })
    .await?;
    for i in 0..n {
        js.publish("order.a", format!("{i}").into()).await?.await?;
    }
    Ok(js)
}

fn seqs(batch: &[jetstream::Message]) -> Vec<u64> {
    batch
        .iter()
        .map(|m| m.info().expect("a JetStream message").stream_sequence)
        .collect()
}

async fn collect(reader: &mut OrderedReader, n: usize) -> Result<Vec<jetstream::Message>> {
    let cancel = CancellationToken::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        let batch = tokio::time::timeout_at(deadline, reader.next_batch(&cancel))
            .await?
            .expect("not cancelled");
        out.extend(batch);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_messages_come_back_in_stream_order() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = setup(&nats, 10).await?;
    let ack_wait = Duration::from_secs(1);

    // A first reader takes all ten and dies without acking; it had extended the ack wait of
    // the first five, so the server redelivers 6..10 before 1..5.
    let mut first = OrderedReader::bind(&js, reader_config(ack_wait)).await?;
    let taken = collect(&mut first, 10).await?;
    assert_eq!(seqs(&taken), (1..=10).collect::<Vec<_>>());
    for _ in 0..3 {
        for m in &taken[..5] {
            m.ack_with(AckKind::Progress).await.expect("progress");
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    drop(first);
    js.publish("order.a", "new".into()).await?.await?;

    let mut second = OrderedReader::bind(&js, reader_config(ack_wait)).await?;
    let back = collect(&mut second, 11).await?;
    assert_eq!(
        seqs(&back),
        (1..=11).collect::<Vec<_>>(),
        "stream order after a restart"
    );
    for m in &back {
        m.ack().await.expect("ack");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_redelivered_while_held_are_dropped() -> Result<()> {
    let nats = NatsServer::start().await?;
    let js = setup(&nats, 5).await?;
    let mut reader = OrderedReader::bind(&js, reader_config(Duration::from_secs(1))).await?;
    let held = collect(&mut reader, 5).await?;
    // Hold them past their ack wait: the server sends them again.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for i in 0..3 {
        js.publish("order.a", format!("later-{i}").into())
            .await?
            .await?;
    }
    let next = collect(&mut reader, 3).await?;
    assert_eq!(
        seqs(&next),
        vec![6, 7, 8],
        "only the new messages, not the copies"
    );
    assert!(
        reader.duplicates_dropped() >= 1,
        "the redelivered copies were seen and dropped"
    );
    for m in held.iter().chain(&next) {
        m.ack().await.expect("ack");
    }
    Ok(())
}

/// A pinned reader busy with a batch for longer than its pull's expiry still gets what the
/// server delivered on that pull meanwhile: nothing is left to come back only as a dropped
/// "copy" (the processor stalled on such messages under load before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_delivered_while_a_batch_is_busy_are_not_lost() -> Result<()> {
    use herald_common::ordered::{PinnedGroup, ensure_consumer};
    let nats = NatsServer::start().await?;
    let js = setup(&nats, 10).await?;
    let cfg = ReaderConfig {
        batch: 10,
        ..reader_config(Duration::from_secs(2))
    };
    let pinned = PinnedGroup {
        group: "owners".into(),
        // Pulls live 3 s (half the pin timeout) and are forgotten 1 s after; the pin outlives
        // the busy batch below.
        timeout: Duration::from_secs(6),
    };
    ensure_consumer(&js, &cfg, Some(&pinned)).await?;
    let mut reader = OrderedReader::bind_pinned(&js, cfg, pinned).await?;
    let mut got = Vec::new();
    let mut lost_before = 0;
    for round in 0..3 {
        let cancel = CancellationToken::new();
        let batch = tokio::time::timeout(Duration::from_secs(20), reader.next_batch(&cancel))
            .await?
            .expect("not cancelled");
        // New messages arrive on the open pull while this batch is "processed" for longer
        // than the pull lives (3 s, plus its grace), and than their ack wait.
        for i in 0..5 {
            js.publish("order.a", format!("r{round}-{i}").into())
                .await?
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(4_500)).await;
        for m in &batch {
            m.ack().await.expect("ack");
        }
        got.extend(seqs(&batch));
        lost_before = reader.lost_deliveries();
    }
    let total = 10 + 3 * 5;
    let rest = collect(&mut reader, total - got.len()).await?;
    got.extend(seqs(&rest));
    assert_eq!(got, (1..=total as u64).collect::<Vec<_>>());
    assert_eq!(lost_before, 0, "nothing lost on the way");
    Ok(())
}
