//! End-to-end harness: the three Herald services started in-process, through the same library
//! functions the binary uses, on port 0, against a real nats-server from the testkit.

use std::time::Duration;

use anyhow::Result;
use herald_activator::{ActivatorConfig, DestinationConfig, DestinationKind, Settings};
use herald_common::server::ServiceHandle;
use herald_common::{CommonConfig, ControlConfig, NatsConfig, Secret, TopologyConfig, telemetry};
use herald_ingest::{IngestConfig, SourceConfig};
use herald_processor::ProcessorConfig;
use tokio_util::sync::CancellationToken;

/// The write key of the test source.
pub const WRITE_KEY: &str = "e2e-write-key";
/// The bearer token of the control APIs.
pub const CONTROL_TOKEN: &str = "e2e-control-token";
/// The id of the test source.
pub const SOURCE_ID: &str = "e2e";

/// Options for a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Topology overrides (prefix, partitions, stream limits).
    pub topology: TopologyConfig,
    /// Webhook URL of the one destination, if any.
    pub webhook_url: Option<String>,
    /// Ack wait of the consumers.
    pub ack_wait_seconds: u64,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            topology: TopologyConfig::default(),
            webhook_url: None,
            ack_wait_seconds: 2,
        }
    }
}

impl PipelineOptions {
    /// The defaults, with one webhook destination (`hook`) at `url`.
    pub fn webhook(url: String) -> Self {
        Self {
            webhook_url: Some(url),
            ..Default::default()
        }
    }
}

/// The default processor config with every listener on a port of 127.0.0.1 the system picks.
pub fn processor_config() -> ProcessorConfig {
    ProcessorConfig {
        grpc_addr: "127.0.0.1:0".into(),
        http_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        ..Default::default()
    }
}

/// A running pipeline.
pub struct Pipeline {
    /// Ingest.
    pub ingest: ServiceHandle,
    /// Processor.
    pub processor: ServiceHandle,
    /// Activator.
    pub activator: ServiceHandle,
    /// Cancels all three.
    pub shutdown: CancellationToken,
    http: reqwest::Client,
}

impl Pipeline {
    /// Starts ingest, processor and activator against `nats_url` and waits until all are ready.
    pub async fn start(nats_url: &str, opts: PipelineOptions) -> Result<Self> {
        let common = CommonConfig {
            nats: NatsConfig {
                servers: nats_url.to_string(),
                request_timeout_ms: 2_000,
                ..Default::default()
            },
            topology: opts.topology.clone(),
            control: ControlConfig::with_token(CONTROL_TOKEN),
        };
        let ingest_cfg = IngestConfig {
            http_addr: "127.0.0.1:0".into(),
            grpc_addr: "127.0.0.1:0".into(),
            admin_addr: "127.0.0.1:0".into(),
            sources: vec![SourceConfig {
                id: SOURCE_ID.into(),
                name: "End-to-end".into(),
                write_key: Secret(WRITE_KEY.into()),
                write_secret: None,
                enabled: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let processor_cfg = ProcessorConfig {
            ack_wait_seconds: opts.ack_wait_seconds,
            ..processor_config()
        };
        let activator_cfg = ActivatorConfig {
            grpc_addr: "127.0.0.1:0".into(),
            admin_addr: "127.0.0.1:0".into(),
            ack_wait_seconds: opts.ack_wait_seconds,
            retry_max_backoff_ms: 500,
            destinations: opts
                .webhook_url
                .iter()
                .map(|url| DestinationConfig {
                    id: "hook".into(),
                    kind: DestinationKind::Webhook,
                    settings: Settings(
                        [("url", url.clone()), ("timeout_ms", "5000".into())]
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                    ),
                    ..Default::default()
                })
                .collect(),
            // The test webhooks listen on loopback, which the SSRF guard refuses by default.
            allow_private_networks: vec!["127.0.0.0/8".parse().expect("CIDR")],
            ..Default::default()
        };
        let metrics = telemetry::metrics();
        let shutdown = CancellationToken::new();
        let ingest =
            herald_ingest::start(&common, &ingest_cfg, metrics.clone(), shutdown.clone()).await?;
        let processor =
            herald_processor::start(&common, &processor_cfg, metrics.clone(), shutdown.clone())
                .await?;
        let activator =
            herald_activator::start(&common, &activator_cfg, metrics, shutdown.clone()).await?;
        let p = Self {
            ingest,
            processor,
            activator,
            shutdown,
            http: reqwest::Client::new(),
        };
        for s in [&p.ingest, &p.processor, &p.activator] {
            herald_testkit::wait_ready(s.name, s.admin_addr, Duration::from_secs(30)).await?;
        }
        Ok(p)
    }

    /// Base URL of the ingest HTTP API.
    pub fn ingest_url(&self) -> String {
        format!(
            "http://{}",
            self.ingest.http_addr.expect("ingest serves HTTP")
        )
    }

    /// POSTs a Segment batch with the test write key; returns the status and body.
    pub async fn post_batch(&self, body: &serde_json::Value) -> Result<(u16, String)> {
        let res = self
            .http
            .post(format!("{}/v1/batch", self.ingest_url()))
            .basic_auth(WRITE_KEY, Some(""))
            .json(body)
            .send()
            .await?;
        Ok((res.status().as_u16(), res.text().await?))
    }

    /// The Prometheus exposition of a service's admin port (all three share one recorder).
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(format!("http://{}/metrics", self.ingest.admin_addr))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Stops all three services and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for s in [self.ingest, self.processor, self.activator] {
            let _ = s.task.await;
        }
    }
}

/// The value of a metric line (`name{labels} value`) whose name and labels contain every
/// given fragment, summed over matching lines.
pub fn metric_value(exposition: &str, name: &str, fragments: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter(|l| fragments.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
