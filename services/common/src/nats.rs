//! The NATS connection and the JetStream topology (stream names, subjects, and their creation).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions, ServerAddr};

use crate::config::{NatsConfig, TopologyConfig};
use crate::retry::Retry;

/// Errors of connecting to NATS or provisioning JetStream.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// Reading credentials failed.
    #[error("cannot read NATS credentials file {path}: {source} (check nats.creds_file)")]
    Creds {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// `nats.servers` does not parse.
    #[error(
        "nats.servers {servers:?} is not a valid server list: {message} (give one or more URLs separated by commas, e.g. nats://nats-0:4222,nats://nats-1:4222)"
    )]
    Servers {
        /// The configured value.
        servers: String,
        /// Why.
        message: String,
    },
    /// The connection could not be set up.
    #[error(
        "cannot connect to NATS at {servers}: {source} (check nats.servers and that nats-server runs)"
    )]
    Connect {
        /// The servers tried.
        servers: String,
        /// The cause.
        source: async_nats::ConnectError,
    },
    /// A stream could not be created or updated.
    #[error("cannot create or update stream {stream}: {message}")]
    Stream {
        /// The stream.
        stream: String,
        /// What the server said.
        message: String,
    },
}

/// The server addresses of `nats.servers`: one URL, or several separated by commas (spaces
/// around them allowed); the client picks among them and fails over between them.
pub fn server_addrs(servers: &str) -> Result<Vec<ServerAddr>, NatsError> {
    let bad = |message: String| NatsError::Servers {
        servers: servers.to_string(),
        message,
    };
    let addrs = servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| bad(format!("{s:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(bad("no server given".into()));
    }
    Ok(addrs)
}

/// Connects to NATS with the configured authentication and TLS. The first connection is retried
/// in the background, so a service starts (not ready) while NATS is still coming up.
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<Client, NatsError> {
    let mut opts = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms)))
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 100).min(1_000))
        });
    if let Some(path) = &cfg.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| NatsError::Creds {
                path: path.display().to_string(),
                source,
            })?;
    }
    if let (Some(user), Some(pass)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(user.clone(), pass.expose().to_string());
    }
    if let Some(token) = &cfg.token {
        opts = opts.token(token.expose().to_string());
    }
    if let Some(seed) = &cfg.nkey_seed {
        opts = opts.nkey(seed.expose().to_string());
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    let addrs = server_addrs(&cfg.servers)?;
    opts.connect(addrs)
        .await
        .map_err(|source| NatsError::Connect {
            servers: cfg.servers.clone(),
            source,
        })
}

/// A JetStream context whose API calls and publish acks time out after the configured time.
pub fn jetstream(client: Client, cfg: &NatsConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(cfg.request_timeout_ms))
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(client)
}

/// Whether the client is connected right now.
pub fn is_connected(client: &Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Names of subjects, streams and buckets, derived from one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    cfg: TopologyConfig,
    upper: String,
}

impl Topology {
    /// Topology for the given config.
    pub fn new(cfg: TopologyConfig) -> Self {
        let upper = cfg.prefix.to_uppercase().replace('-', "_");
        Self { cfg, upper }
    }

    /// The config it was built from.
    pub fn config(&self) -> &TopologyConfig {
        &self.cfg
    }

    /// The number of partitions.
    pub fn partitions(&self) -> u32 {
        self.cfg.partitions
    }

    /// The events stream (ingest → processor).
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper)
    }

    /// The subject of one events partition.
    pub fn events_subject(&self, partition: u32) -> String {
        format!("{}.events.{partition}", self.cfg.prefix)
    }

    /// Subjects of every events partition.
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.*", self.cfg.prefix)
    }

    /// The processed stream (processor → activator).
    pub fn processed_stream(&self) -> String {
        format!("{}_PROCESSED", self.upper)
    }

    /// The subject of one processed partition.
    pub fn processed_subject(&self, partition: u32) -> String {
        format!("{}.processed.{partition}", self.cfg.prefix)
    }

    /// Subjects of every processed partition.
    pub fn processed_wildcard(&self) -> String {
        format!("{}.processed.*", self.cfg.prefix)
    }

    /// The quarantine stream: events or messages that failed validation, with their reason.
    pub fn quarantine_stream(&self) -> String {
        format!("{}_QUARANTINE", self.upper)
    }

    /// The quarantine subject of one source.
    pub fn quarantine_subject(&self, source_id: &str) -> String {
        format!("{}.quarantine.{source_id}", self.cfg.prefix)
    }

    /// Subjects of every source's quarantine.
    pub fn quarantine_wildcard(&self) -> String {
        format!("{}.quarantine.*", self.cfg.prefix)
    }

    /// The NATS intake stream: services publish events to `<prefix>.in.<source>`.
    pub fn intake_stream(&self) -> String {
        format!("{}_INTAKE", self.upper)
    }

    /// The intake subject of one source.
    pub fn intake_subject(&self, source_id: &str) -> String {
        format!("{}.in.{source_id}", self.cfg.prefix)
    }

    /// Subjects of every source's intake.
    pub fn intake_wildcard(&self) -> String {
        format!("{}.in.*", self.cfg.prefix)
    }

    /// The DLQ stream: events the activator could not deliver, with the cause.
    pub fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.upper)
    }

    /// The DLQ subject of one destination.
    pub fn dlq_subject(&self, destination_id: &str) -> String {
        format!("{}.dlq.{destination_id}", self.cfg.prefix)
    }

    /// Subjects of every destination's DLQ.
    pub fn dlq_wildcard(&self) -> String {
        format!("{}.dlq.*", self.cfg.prefix)
    }

    /// The delivery-status bucket: how each event's delivery to each destination ended.
    pub fn delivery_bucket(&self) -> String {
        self.bucket("delivery")
    }

    /// A key-value bucket's name, e.g. `bucket("config")` is `herald-config`.
    pub fn bucket(&self, name: &str) -> String {
        format!("{}-{name}", self.cfg.prefix)
    }

    /// Config of the events stream: interest retention (consumed events free their space),
    /// DiscardNew (a full stream pushes back), file storage, atomic batch publish allowed
    /// (ingest stores bulk requests of `atomic_publish` sources all-or-nothing).
    pub fn events_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.events_stream(),
            description: Some(
                "Herald: events accepted by ingest, consumed by the processor".into(),
            ),
            subjects: vec![self.events_wildcard()],
            retention: stream::RetentionPolicy::Interest,
            discard: stream::DiscardPolicy::New,
            storage: stream::StorageType::File,
            max_bytes: self.cfg.events_max_bytes,
            num_replicas: self.cfg.replicas,
            duplicate_window: Duration::from_secs(self.cfg.duplicate_window_seconds),
            allow_atomic_publish: true,
            ..Default::default()
        }
    }

    /// Config of the processed stream: limits retention with a replay window by age, DiscardNew.
    pub fn processed_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.processed_stream(),
            description: Some(
                "Herald: processed events, read by the activator; replay window".into(),
            ),
            subjects: vec![self.processed_wildcard()],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            storage: stream::StorageType::File,
            max_bytes: self.cfg.processed_max_bytes,
            max_age: Duration::from_secs(self.cfg.processed_max_age_seconds),
            num_replicas: self.cfg.replicas,
            duplicate_window: Duration::from_secs(self.cfg.duplicate_window_seconds),
            ..Default::default()
        }
    }

    /// Config of the DLQ stream (created by the activator): limits retention by age
    /// (`dlq_max_age_seconds`) and bytes, DiscardNew (a full DLQ pushes back: the failing event
    /// is retried), file storage, message-id deduplication.
    pub fn dlq_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.dlq_stream(),
            description: Some(
                "Herald: events the activator could not deliver, with the cause (DLQ)".into(),
            ),
            subjects: vec![self.dlq_wildcard()],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            storage: stream::StorageType::File,
            max_bytes: self.cfg.dlq_max_bytes,
            max_age: Duration::from_secs(self.cfg.dlq_max_age_seconds),
            num_replicas: self.cfg.replicas,
            duplicate_window: Duration::from_secs(self.cfg.duplicate_window_seconds),
            ..Default::default()
        }
    }
}

/// Creates the stream, or updates it to `config` when it exists: idempotent, so every replica
/// may call it at startup.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<(), NatsError> {
    let name = config.name.clone();
    js.create_or_update_stream(config)
        .await
        .map(|_| ())
        .map_err(|e| NatsError::Stream {
            stream: name,
            message: e.to_string(),
        })
}

/// Opens the config bucket (`<prefix>-config`: sources, destinations, ...), creating it
/// (history 1, file storage, `topology.replicas` replicas) when missing. Ingest and the
/// activator both open it; whichever starts first creates it.
pub async fn open_config_bucket(
    js: &jetstream::Context,
    topology: &Topology,
) -> Result<async_nats::jetstream::kv::Store, String> {
    use async_nats::jetstream::kv;
    let name = topology.bucket("config");
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.clone(),
            description:
                "Herald: configuration (sources, destinations, ...), watched by every replica"
                    .into(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: topology.config().replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another replica or service may have created it meanwhile.
        Err(e) => js
            .get_key_value(&name)
            .await
            .map_err(|_| format!("cannot create bucket {name}: {e}")),
    }
}

/// The longest pause of the provisioning retries ([`wait_for_stream`], [`retry_until`]).
pub const PROVISIONING_MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Waits (until `cancel`) for a stream another service owns, polling with backoff up to
/// [`PROVISIONING_MAX_BACKOFF`]. Returns `None` when cancelled first.
pub async fn wait_for_stream(
    js: &jetstream::Context,
    name: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<stream::Stream> {
    Retry::new(PROVISIONING_MAX_BACKOFF)
        .run(
            cancel,
            || js.get_stream(name),
            |f| {
                if f.attempt == 1 {
                    // Normal on a first start: the owner creates it in a moment.
                    tracing::info!(stream = name, error = %f.error, "waiting for stream (created by its owning service)");
                }
            },
        )
        .await
}

/// Retries `f` with backoff up to [`PROVISIONING_MAX_BACKOFF`] until it succeeds or `cancel`
/// fires. For startup provisioning, which must survive NATS being unavailable for a while.
pub async fn retry_until<T, E: std::fmt::Display, F, Fut>(
    what: &str,
    cancel: &tokio_util::sync::CancellationToken,
    f: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    Retry::new(PROVISIONING_MAX_BACKOFF)
        .run(cancel, f, |f| {
            if f.attempt == 1 || f.attempt.is_multiple_of(20) {
                tracing::warn!(error = %f.error, attempts = f.attempt, "{what} failed; retrying");
            }
        })
        .await
}

/// Acks the message whose reply subject is `reply` and waits for the server's confirmation,
/// like `Message::double_ack`, but as one request over `client`'s shared reply subscription
/// instead of a subscription made and dropped per message (a SUB and an UNSUB for the server
/// to handle on every ack). Takes the reply subject rather than the message, so a caller can
/// keep just that while an ack waits.
///
/// # Errors
///
/// When there is no reply subject (not a JetStream message), or the server does not confirm in
/// the client's request timeout (the ack may or may not have landed: retry it).
pub async fn confirmed_ack(
    client: &async_nats::Client,
    reply: Option<&async_nats::Subject>,
) -> Result<(), String> {
    let reply = reply.ok_or_else(|| "no reply subject: not a JetStream message".to_string())?;
    client
        .request(reply.clone(), bytes::Bytes::from_static(b"+ACK"))
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_split_on_commas() {
        let addrs = server_addrs("nats://10.0.0.1:4222, nats://10.0.0.2:4223 ,10.0.0.3").unwrap();
        let ports: Vec<u16> = addrs.iter().map(|a| a.port()).collect();
        assert_eq!(ports, [4222, 4223, 4222]);
        assert_eq!(addrs[2].host(), "10.0.0.3");
        let err = server_addrs("nats://a:4222,nats://b:notaport").unwrap_err();
        assert!(err.to_string().contains("nats://b:notaport"), "{err}");
        assert!(server_addrs(" , ").is_err());
    }

    #[test]
    fn names_follow_the_prefix() {
        let t = Topology::new(TopologyConfig {
            prefix: "acme-eu".into(),
            ..Default::default()
        });
        assert_eq!(t.events_stream(), "ACME_EU_EVENTS");
        assert_eq!(t.events_subject(3), "acme-eu.events.3");
        assert_eq!(t.processed_wildcard(), "acme-eu.processed.*");
        assert_eq!(t.dlq_stream(), "ACME_EU_DLQ");
        assert_eq!(t.dlq_subject("hook"), "acme-eu.dlq.hook");
        assert_eq!(t.delivery_bucket(), "acme-eu-delivery");
        assert_eq!(
            t.events_stream_config().retention,
            stream::RetentionPolicy::Interest
        );
        assert_eq!(
            t.processed_stream_config().max_age,
            Duration::from_secs(7 * 24 * 3600)
        );
    }
}
