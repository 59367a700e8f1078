//! The harness of ingest's integration tests (behind the `ingest` feature): a real nats-server
//! with the ingest router over a real NATS client ([`Harness`], driven with `oneshot`), or the
//! whole service started with `herald_ingest::start` on port 0 ([`Running`]), readers of the
//! streams ingest owns, and the recorded SDK requests ([`fixtures`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::HeaderMap as NatsHeaders;
use async_nats::jetstream::{self, consumer};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use base64::Engine as _;
use bytes::Bytes;
use herald_common::auth::BearerToken;
use herald_common::nats::{ensure_stream, is_connected};
use herald_common::server::ServiceHandle;
use herald_common::{CommonConfig, ControlConfig, NatsConfig, Secret, Topology, TopologyConfig};
use herald_ingest::{AppState, IngestConfig, SourceConfig, router};
use herald_proto::v1::quarantine_service_client::QuarantineServiceClient;
use herald_proto::v1::{Event, EventType, QuarantineRecord};
use http_body_util::BodyExt as _;
use prost::Message as _;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tower::ServiceExt as _;

use crate::{NatsServer, wait_until};

/// The write key the SDK fixtures were recorded with.
pub const WRITE_KEY: &str = "acceptance-write-key";
/// The source that key belongs to.
pub const SOURCE: &str = "acceptance";
/// The mParticle secret the SDK fixtures were recorded with (paired with [`WRITE_KEY`]).
pub const WRITE_SECRET: &str = "acceptance-secret";
/// The control APIs' bearer token.
pub const CONTROL_TOKEN: &str = "ingest-test-control-token";
/// A disabled source's key.
pub const DISABLED_KEY: &str = "disabled-write-key";

/// The ingest config the tests use: the acceptance source plus a disabled one.
pub fn ingest_config() -> IngestConfig {
    IngestConfig {
        publish_timeout_ms: 2_000,
        sources: vec![
            SourceConfig {
                id: SOURCE.into(),
                name: "Acceptance".into(),
                write_key: Secret(WRITE_KEY.into()),
                write_secret: Some(Secret(WRITE_SECRET.into())),
                enabled: true,
                ..Default::default()
            },
            SourceConfig {
                id: "disabled".into(),
                name: "Disabled".into(),
                write_key: Secret(DISABLED_KEY.into()),
                write_secret: None,
                enabled: false,
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

/// Shared config pointing at `url`.
pub fn common_config(url: &str) -> CommonConfig {
    CommonConfig {
        nats: NatsConfig {
            servers: url.into(),
            request_timeout_ms: 2_000,
            ..Default::default()
        },
        topology: TopologyConfig {
            partitions: 4,
            ..Default::default()
        },
        control: ControlConfig::with_token(CONTROL_TOKEN),
    }
}

/// A nats-server, the events stream with a durable consumer, and the ingest router.
pub struct Harness {
    /// The server.
    pub nats: NatsServer,
    /// The router's state.
    pub state: AppState,
    /// A JetStream context of the test's own.
    pub js: jetstream::Context,
    /// Names of streams and subjects.
    pub topology: Topology,
}

impl Harness {
    /// Defaults.
    pub async fn start() -> Self {
        Self::with(|_, _| {}).await
    }

    /// With config changes applied before anything is created.
    pub async fn with(tweak: impl FnOnce(&mut CommonConfig, &mut IngestConfig)) -> Self {
        Self::with_server_config("", tweak).await
    }

    /// Like [`Harness::with`], with `server_config` in the nats-server's configuration file
    /// (e.g. `jetstream { limits { batch { max_msgs: 5 } } }`).
    pub async fn with_server_config(
        server_config: &str,
        tweak: impl FnOnce(&mut CommonConfig, &mut IngestConfig),
    ) -> Self {
        let nats = NatsServer::start_with_config(server_config)
            .await
            .expect("nats-server starts");
        let mut common = common_config(&nats.url());
        let mut cfg = ingest_config();
        tweak(&mut common, &mut cfg);
        let topology = Topology::new(common.topology.clone());

        let client = herald_common::nats::connect(&common.nats, "ingest-test")
            .await
            .expect("client");
        let c = client.clone();
        wait_until(
            "the NATS client is connected",
            Duration::from_secs(10),
            || {
                let c = c.clone();
                async move { is_connected(&c) }
            },
        )
        .await
        .expect("connected");
        let js = herald_common::nats::jetstream(client.clone(), &common.nats);
        ensure_stream(&js, topology.events_stream_config())
            .await
            .expect("events stream");
        // Invalid items of accepted batches are written to the quarantine.
        ensure_stream(&js, herald_ingest::quarantine_stream_config(&topology))
            .await
            .expect("quarantine stream");
        add_test_reader(&js, &topology).await;
        let state = AppState::new(&common, &cfg, client).expect("valid config");
        Self {
            nats,
            state,
            js,
            topology,
        }
    }

    /// The router under test.
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Sends one request through the router.
    pub async fn send(&self, req: Request<Body>) -> Reply {
        let res = self.router().oneshot(req).await.expect("infallible");
        let status = res.status();
        let headers = res.headers().clone();
        let body = res
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// POSTs `body` to `path`, with `key` as the HTTP Basic user name when given.
    pub async fn post(&self, path: &str, key: Option<&str>, body: impl Into<Body>) -> Reply {
        let mut req = Request::post(path).header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            req = req.header(header::AUTHORIZATION, basic(key));
        }
        self.send(req.body(body.into()).expect("request")).await
    }

    /// POSTs a JSON value with the acceptance key.
    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(path, Some(WRITE_KEY), body.to_string()).await
    }

    /// Every event stored in the events stream, in stream order.
    pub async fn stored(&self) -> Vec<Event> {
        read_stream(&self.js, &self.topology.events_stream())
            .await
            .into_iter()
            .map(|(_, payload)| Event::decode(payload).expect("a herald.v1.Event"))
            .collect()
    }
}

/// `data` gzipped.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// `Basic base64(key:)`.
pub fn basic(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

/// An answer.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("JSON body ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts exactly `200 {"success":true}` with a JSON content type.
    pub fn assert_success(&self) {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.body, br#"{"success":true}"#);
        assert_eq!(self.headers[header::CONTENT_TYPE], "application/json");
    }

    /// Asserts an error answer: status, `error` kind, a non-empty message, JSON content type.
    pub fn assert_error(&self, status: StatusCode, kind: &str) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.headers[header::CONTENT_TYPE], "application/json");
        let body = self.json();
        assert_eq!(body["error"], kind, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
}

/// The recorded SDK requests of one client.
pub fn fixtures(folder: &str) -> Vec<Fixture> {
    let dir = fixtures_dir().join(folder);
    let mut metas: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixtures folder {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".meta.json"))
        .collect();
    metas.sort();
    assert!(!metas.is_empty(), "no fixtures in {}", dir.display());
    metas
        .into_iter()
        .map(|meta_path| {
            let meta: Value = serde_json::from_slice(&std::fs::read(&meta_path).expect("meta"))
                .expect("meta JSON");
            let body_path =
                PathBuf::from(meta_path.to_string_lossy().replace(".meta.json", ".json"));
            let body = std::fs::read(&body_path).expect("fixture body");
            let headers = meta["headers"]
                .as_object()
                .expect("headers")
                .iter()
                .filter(|(k, _)| {
                    // The client sets length and host.
                    !["host", "content-length", "connection"]
                        .contains(&k.to_ascii_lowercase().as_str())
                })
                .map(|(k, v)| (k.clone(), v.as_str().expect("header value").to_string()))
                .collect();
            Fixture {
                name: meta_path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                method: meta["method"].as_str().expect("method").to_string(),
                path: meta["path"].as_str().expect("path").to_string(),
                headers,
                json: serde_json::from_slice(&body).expect("fixture body is JSON"),
                body,
            }
        })
        .collect()
}

/// `tests/fixtures/sdk-requests` of the repository: requests recorded from official SDKs (see its
/// README).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/sdk-requests")
}

/// One recorded request.
#[derive(Debug)]
pub struct Fixture {
    /// File name of its metadata.
    pub name: String,
    /// HTTP method.
    pub method: String,
    /// Path, e.g. `/v1/batch`.
    pub path: String,
    /// Headers to replay.
    pub headers: Vec<(String, String)>,
    /// The body as sent (decoded).
    pub body: Vec<u8>,
    /// The body parsed.
    pub json: Value,
}

/// What one event of a fixture must become.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    /// Herald's event id.
    pub id: String,
    /// Call type.
    pub ty: EventType,
    /// User id.
    pub user_id: String,
    /// Track event or page/screen name.
    pub name: String,
    /// The client's message id.
    pub message_id: String,
}

impl Fixture {
    /// The request to replay.
    /// Bodies are stored decoded: where the SDK sent `Content-Encoding: gzip`, the body is
    /// compressed again and the header kept.
    pub fn request(&self) -> Request<Body> {
        let mut req = Request::builder()
            .method(self.method.as_str())
            .uri(self.path.as_str());
        let mut gzipped = false;
        for (k, v) in &self.headers {
            if k.eq_ignore_ascii_case("content-encoding") {
                assert_eq!(v, "gzip", "{}: only gzip fixtures are recorded", self.name);
                gzipped = true;
            }
            req = req.header(k.as_str(), v.as_str());
        }
        let body = if gzipped {
            gzip(&self.body)
        } else {
            self.body.clone()
        };
        req.body(Body::from(body)).expect("request")
    }

    /// Whether the SDK sent the body gzipped.
    pub fn gzipped(&self) -> bool {
        self.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-encoding"))
    }

    /// The events the request carries.
    pub fn expected(&self) -> Vec<Expected> {
        let (items, path_type) = match self.path.as_str() {
            "/v1/batch" => (self.json["batch"].as_array().expect("batch").clone(), None),
            p => (
                vec![self.json.clone()],
                Some(p.trim_start_matches("/v1/").to_string()),
            ),
        };
        items
            .iter()
            .map(|item| {
                let ty_name = path_type
                    .clone()
                    .unwrap_or_else(|| item["type"].as_str().expect("type").to_string());
                let ty = herald_ingest::call_type(&ty_name).expect("known type");
                let name = match ty {
                    EventType::Track => item["event"].as_str().unwrap_or_default(),
                    EventType::Page | EventType::Screen => {
                        item["name"].as_str().unwrap_or_default()
                    }
                    _ => "",
                };
                let message_id = item["messageId"].as_str().expect("messageId").to_string();
                Expected {
                    id: format!("{SOURCE}:{message_id}"),
                    ty,
                    user_id: item["userId"].as_str().unwrap_or_default().to_string(),
                    name: name.to_string(),
                    message_id,
                }
            })
            .collect()
    }
}

/// The comparable fields of a stored event.
pub fn observed(e: &Event) -> Expected {
    Expected {
        id: e.id.clone(),
        ty: e.r#type(),
        user_id: e.user_id.clone(),
        name: e.name.clone(),
        message_id: e.message_id.clone(),
    }
}

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
        add_test_reader(&running.js, &running.topology).await;
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
            let mut h = NatsHeaders::new();
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
        read_stream(&self.js, stream).await
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

/// A durable consumer on the events stream: its interest retention keeps events only while a
/// consumer exists.
async fn add_test_reader(js: &jetstream::Context, topology: &Topology) {
    js.get_stream(topology.events_stream())
        .await
        .expect("events stream")
        .create_consumer(consumer::pull::Config {
            durable_name: Some("test-reader".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("durable consumer");
}

/// Every message of a stream with its sequence, in stream order.
async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<(u64, Bytes)> {
    let mut stream = js.get_stream(stream).await.expect("stream");
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
