//! Shared harness of the NATS intake and quarantine tests: a real nats-server and the whole
//! ingest service started with `start()` on port 0, plus readers of the streams it owns.

#![allow(dead_code)]

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use herald_common::auth::BearerToken;
use herald_common::server::ServiceHandle;
use herald_common::{CommonConfig, Topology};
use herald_ingest::IngestConfig;
use herald_proto::v1::quarantine_service_client::QuarantineServiceClient;
use herald_proto::v1::{Event, QuarantineRecord};
use herald_testkit::{NatsServer, wait_until};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::common::{CONTROL_TOKEN, common_config, ingest_config};

/// Generous deadline of every wait.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The quarantine gRPC client with the control token.
pub type QuarantineClient = QuarantineServiceClient<InterceptedService<Channel, BearerToken>>;

/// A nats-server and a running ingest.
pub struct Running {
    /// The server.
    pub nats: NatsServer,
    /// The running ingest.
    pub handle: Option<ServiceHandle>,
    /// Stops it.
    pub stop: CancellationToken,
    /// A JetStream context of the test's own.
    pub js: jetstream::Context,
    /// Names of streams and subjects.
    pub topology: Topology,
}

/// The configs ingest is started with: the shared test configs with port-0 listeners.
pub fn configs(
    url: &str,
    tweak: impl FnOnce(&mut CommonConfig, &mut IngestConfig),
) -> (CommonConfig, IngestConfig) {
    let mut common = common_config(url);
    let mut cfg = ingest_config();
    cfg.http_addr = "127.0.0.1:0".into();
    cfg.grpc_addr = "127.0.0.1:0".into();
    cfg.admin_addr = "127.0.0.1:0".into();
    tweak(&mut common, &mut cfg);
    (common, cfg)
}

impl Running {
    /// Starts nats-server and ingest (with `tweak` applied to the configs), waits until ingest is
    /// ready, and adds a durable consumer to the events stream (interest retention keeps events
    /// only while a consumer exists).
    pub async fn start(tweak: impl FnOnce(&mut CommonConfig, &mut IngestConfig)) -> Self {
        let nats = NatsServer::start().await.expect("nats-server starts");
        let (common, cfg) = configs(&nats.url(), tweak);
        let topology = Topology::new(common.topology.clone());
        let js = nats.jetstream().await;
        let mut running = Self {
            nats,
            handle: None,
            stop: CancellationToken::new(),
            js,
            topology,
        };
        running.start_ingest(&common, &cfg).await;
        running
            .js
            .get_stream(running.topology.events_stream())
            .await
            .expect("events stream")
            .create_consumer(consumer::pull::Config {
                durable_name: Some("test-reader".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .expect("durable consumer");
        running
    }

    /// Starts ingest with these configs and waits until it is ready.
    pub async fn start_ingest(&mut self, common: &CommonConfig, cfg: &IngestConfig) {
        self.stop = CancellationToken::new();
        let handle = herald_ingest::start(
            common,
            cfg,
            herald_common::telemetry::metrics(),
            self.stop.clone(),
        )
        .await
        .expect("ingest starts");
        let url = format!("http://{}/readyz", handle.admin_addr);
        wait_until("ingest is ready", DEADLINE, || {
            let url = url.clone();
            async move {
                reqwest::get(&url)
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 200)
            }
        })
        .await
        .expect("ready");
        self.handle = Some(handle);
    }

    /// Stops ingest and waits for it to end.
    pub async fn stop_ingest(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(DEADLINE, h.task)
                .await
                .expect("ingest stops")
                .expect("task ends cleanly");
        }
    }

    /// The running ingest.
    pub fn handle(&self) -> &ServiceHandle {
        self.handle.as_ref().expect("ingest runs")
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.handle().admin_addr))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text")
    }

    /// A quarantine gRPC client carrying the control token.
    pub async fn quarantine_client(&self) -> QuarantineClient {
        let channel = Channel::from_shared(format!("http://{}", self.handle().grpc_addr))
            .expect("URL")
            .connect()
            .await
            .expect("gRPC connects");
        QuarantineServiceClient::with_interceptor(
            channel,
            BearerToken::new(CONTROL_TOKEN).expect("token"),
        )
    }

    /// Publishes to `<prefix>.in.<source>` and waits for the intake stream's PubAck; returns
    /// the intake sequence.
    pub async fn publish_intake(
        &self,
        source: &str,
        headers: &[(&str, &str)],
        payload: impl Into<Bytes>,
    ) -> u64 {
        let subject = self.topology.intake_subject(source);
        let ack = if headers.is_empty() {
            self.js.publish(subject, payload.into()).await
        } else {
            let mut h = HeaderMap::new();
            for (k, v) in headers {
                h.insert(*k, *v);
            }
            self.js
                .publish_with_headers(subject, h, payload.into())
                .await
        };
        ack.expect("publish sent")
            .await
            .expect("the intake stream acknowledges")
            .sequence
    }

    /// Every event stored in the events stream, in stream order.
    pub async fn events(&self) -> Vec<Event> {
        self.read_all(&self.topology.events_stream())
            .await
            .into_iter()
            .map(|(_, payload)| Event::decode(payload).expect("a herald.v1.Event"))
            .collect()
    }

    /// Every quarantine record with its sequence, in stream order.
    pub async fn quarantine(&self) -> Vec<(u64, QuarantineRecord)> {
        self.read_all(&self.topology.quarantine_stream())
            .await
            .into_iter()
            .map(|(seq, payload)| {
                (
                    seq,
                    QuarantineRecord::decode(payload).expect("a QuarantineRecord"),
                )
            })
            .collect()
    }

    async fn read_all(&self, stream: &str) -> Vec<(u64, Bytes)> {
        let mut stream = self.js.get_stream(stream).await.expect("stream");
        let state = stream.info().await.expect("stream info").state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(msg) = stream.get_raw_message(seq).await {
                out.push((seq, msg.payload));
            }
        }
        out
    }

    /// Waits until the events stream holds `n` events, and returns them.
    pub async fn wait_events(&self, n: usize) -> Vec<Event> {
        wait_until(&format!("{n} events are stored"), DEADLINE, || async {
            self.events().await.len() >= n
        })
        .await
        .expect("events arrive");
        self.events().await
    }

    /// Waits until the quarantine holds `n` records, and returns them.
    pub async fn wait_quarantine(&self, n: usize) -> Vec<(u64, QuarantineRecord)> {
        wait_until(&format!("{n} quarantine records"), DEADLINE, || async {
            self.quarantine().await.len() >= n
        })
        .await
        .expect("records arrive");
        self.quarantine().await
    }

    /// Waits until every intake message has been handled and acked (work-queue retention
    /// removes acked messages).
    pub async fn wait_intake_drained(&self) {
        let name = self.topology.intake_stream();
        wait_until("the intake stream is empty", DEADLINE, || {
            let name = name.clone();
            async move {
                let mut s = self.js.get_stream(&name).await.expect("intake stream");
                s.info().await.is_ok_and(|i| i.state.messages == 0)
            }
        })
        .await
        .expect("intake drained");
    }
}

/// The value of a counter or gauge line in a Prometheus text, 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}
