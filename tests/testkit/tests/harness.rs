//! The harness against the real `nats-server` binary and real sockets.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use herald_testkit::{
    NatsCluster, NatsServer, WebhookServer, nats_server_binary, segment_batch, segment_track,
    wait_until,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

fn stream_config(name: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{name}.>")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Publishes one message and awaits its ack, publishing again while the node the client talks
/// to does not know the stream yet: right after a replicated stream is created a publish can
/// meet "no responders" or "no stream found for given subject", and neither stored anything.
async fn publish_when_known(
    js: &jetstream::Context,
    subject: &str,
    message: impl Fn() -> PublishMessage,
) -> anyhow::Result<jetstream::publish::PublishAck> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let result = match js.send_publish(subject.to_owned(), message()).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && ["no responders", "noresponders", "no stream found"]
                        .iter()
                        .any(|m| format!("{e} {e:?}").to_lowercase().contains(m)) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return Ok(r?),
        }
    }
}

/// Publishes `count` messages to `subject` (the first once the stream is known, then the rest
/// all in flight at once) and awaits every ack.
async fn publish_all(js: &jetstream::Context, subject: &str, count: usize) -> anyhow::Result<()> {
    publish_when_known(js, subject, || PublishMessage::build().payload("m0".into())).await?;
    let mut acks = Vec::with_capacity(count);
    for i in 1..count {
        acks.push(
            js.publish(subject.to_owned(), format!("m{i}").into())
                .await?,
        );
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

#[test]
fn finds_a_recent_nats_server() {
    let binary = nats_server_binary().expect("a usable nats-server");
    assert!(binary.is_file(), "{}", binary.display());
}

#[tokio::test]
async fn server_starts_with_jetstream_on_a_free_port() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    assert_ne!(server.port(), 0);

    let js = server.jetstream().await;
    let mut events = js.create_stream(stream_config("EVENTS", 1)).await?;
    publish_all(&js, "EVENTS.track", 3).await?;
    assert_eq!(events.info().await?.state.messages, 3);

    let varz: Value = reqwest::get(format!("{}/varz", server.monitor_url()))
        .await?
        .json()
        .await?;
    assert_eq!(varz["port"], server.port());
    assert!(varz["jetstream"]["config"].is_object(), "{varz}");
    Ok(())
}

#[tokio::test]
async fn restart_keeps_port_and_stored_messages() -> anyhow::Result<()> {
    let mut server = NatsServer::start().await?;
    let port = server.port();
    let monitor = server.monitor_url();
    {
        let js = server.jetstream().await;
        js.create_stream(stream_config("ORDERS", 1)).await?;
        publish_all(&js, "ORDERS.created", 10).await?;
    }

    server.stop().await;
    assert!(!server.is_running());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "a stopped server still accepts connections"
    );

    server.restart().await?;
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_eq!(server.monitor_url(), monitor);
    let js = server.jetstream().await;
    let mut orders = js.get_stream("ORDERS").await?;
    assert_eq!(orders.info().await?.state.messages, 10);
    assert_eq!(orders.get_raw_message(1).await?.payload.as_ref(), b"m0");

    // A clean shutdown keeps the store too.
    server.stop_gracefully().await;
    assert!(!server.is_running());
    server.restart().await?;
    let js = server.jetstream().await;
    let mut orders = js.get_stream("ORDERS").await?;
    assert_eq!(orders.info().await?.state.messages, 10);
    Ok(())
}

#[tokio::test]
async fn start_with_config_applies_the_extra_configuration() -> anyhow::Result<()> {
    let server = NatsServer::start_with_config("max_payload: 4096\n").await?;
    let client = server.client().await;
    assert_eq!(client.server_info().max_payload, 4096);
    Ok(())
}

#[tokio::test]
async fn cluster_of_three_replicates_a_stream_and_survives_a_node_restart() -> anyhow::Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    assert_eq!(cluster.len(), 3);
    assert_eq!(cluster.servers(), cluster.urls().join(","));
    let meta_leader = cluster.meta_leader().await.context("a meta leader")?;

    let js = jetstream::new(cluster.client().await);
    let mut repl = js.create_stream(stream_config("REPL", 3)).await?;
    publish_all(&js, "REPL.x", 5).await?;
    let info = repl.info().await?.clone();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.state.messages, 5);
    let placement = info.cluster.context("stream cluster info")?;
    let stream_leader = placement.leader.clone().context("a stream leader")?;
    assert_eq!(placement.replicas.len(), 2, "{placement:?}");

    // Stop a node that leads neither the meta group nor the stream: no election is needed and
    // the stream keeps its quorum.
    let follower = (0..cluster.len())
        .find(|&i| i != meta_leader && cluster.node_name(i) != stream_leader)
        .context("a plain follower")?;
    cluster.stop_node(follower).await;
    assert!(!cluster.is_running(follower));
    publish_all(&js, "REPL.x", 1).await?;

    cluster.restart_node(follower).await?;
    assert!(cluster.is_running(follower));
    let node_js = jetstream::new(cluster.node_client(follower).await);
    wait_until("every replica is current with 6 messages", DEADLINE, || {
        let node_js = node_js.clone();
        async move {
            let Ok(mut stream) = node_js.get_stream("REPL").await else {
                return false;
            };
            let Ok(info) = stream.info().await else {
                return false;
            };
            info.state.messages == 6
                && info
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.replicas.len() == 2 && c.replicas.iter().all(|r| r.current))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn cluster_elects_a_new_meta_leader_after_the_leader_dies() -> anyhow::Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let old = cluster.meta_leader().await.context("a meta leader")?;
    cluster.stop_node(old).await;
    cluster.wait_ready(DEADLINE).await?;
    let new = cluster.meta_leader().await.context("a new meta leader")?;
    assert_ne!(new, old);

    // JetStream works with one node down, through a client that knows every node.
    let js = jetstream::new(cluster.client().await);
    let mut two = js.create_stream(stream_config("TWO", 2)).await?;
    let ack = publish_when_known(&js, "TWO.a", || {
        PublishMessage::build()
            .payload("x".into())
            .message_id("one")
    })
    .await?;
    assert_eq!(ack.sequence, 1);
    assert_eq!(two.info().await?.state.messages, 1);
    Ok(())
}

#[tokio::test]
async fn webhook_records_deliveries_and_fails_when_told() -> anyhow::Result<()> {
    let hook = WebhookServer::start().await?;
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(hook.url())
            .header("X-Herald-Test", "yes")
            .json(&body)
            .send()
    };

    let response = post(segment_batch(vec![segment_track("u1", 1)])).await?;
    assert_eq!(response.status(), 200);
    let got = hook.wait_for(1, DEADLINE).await?;
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, "/hook");
    assert_eq!(got[0].body["batch"][0]["messageId"], "u1-1");
    assert_eq!(got[0].header("X-Herald-Test"), Some("yes"));
    assert_eq!(
        got[0].headers.get("content-type").map(String::as_str),
        Some("application/json")
    );

    hook.set_failing(503);
    let response = post(segment_track("u1", 2)).await?;
    assert_eq!(response.status(), 503);
    assert_eq!(hook.received().len(), 1);
    assert_eq!(hook.attempts(), 2);

    hook.set_healthy();
    hook.fail_next(2);
    let mut statuses = Vec::new();
    for seq in 3..6 {
        statuses.push(post(segment_track("u1", seq)).await?.status().as_u16());
    }
    assert_eq!(statuses, [500, 500, 200]);
    let received = hook.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].body["messageId"], "u1-5");
    assert_eq!(hook.attempts(), 5);
    assert_eq!(hook.requests()[1].status, 503);

    let err = hook
        .wait_for(3, Duration::from_millis(100))
        .await
        .expect_err("only 2 deliveries");
    assert!(err.to_string().contains("2 of 3"), "{err}");

    let url = hook.url();
    drop(hook);
    wait_until("the dropped webhook refuses connections", DEADLINE, || {
        let url = url.clone();
        async move { reqwest::Client::new().post(url).send().await.is_err() }
    })
    .await?;
    Ok(())
}
