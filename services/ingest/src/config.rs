//! The `ingest` section of Herald's configuration.

use herald_common::Secret;
use serde::{Deserialize, Serialize};

/// Configuration of the ingest service: listeners, request limits and sources.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Public HTTP listener (Segment and mParticle APIs).
    pub http_addr: String,
    /// gRPC control listener.
    pub grpc_addr: String,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin_addr: String,
    /// Largest request body accepted (after decoding), in bytes.
    pub max_request_bytes: usize,
    /// Largest single event accepted (its encoded size), in bytes.
    pub max_event_bytes: usize,
    /// Most events accepted in one batch request.
    pub max_batch_events: usize,
    /// Largest mParticle (`/v2/*`) request body accepted (after decoding), in bytes.
    pub max_mparticle_request_bytes: usize,
    /// Deepest JSON nesting accepted in a request body (objects and arrays), counted from 1.
    pub max_json_depth: usize,
    /// Longest client message id (Segment `messageId`, mParticle `source_message_id`), in
    /// characters.
    pub max_message_id_chars: usize,
    /// Origins browsers may send events from (CORS), e.g. `https://shop.example.com`; `*`
    /// allows any origin.
    pub cors_allowed_origins: Vec<String>,
    /// How long a request waits for JetStream to acknowledge its events before answering 503.
    pub publish_timeout_ms: u64,
    /// Hours an event id is remembered in the KV seen-set (`<prefix>-seen`), so a retry arriving
    /// after JetStream's duplicate window (`topology.duplicate_window_seconds`) is still not
    /// stored twice (Segment dedupes over 24 hours). 0 turns the seen-set off.
    pub dedupe_window_hours: u64,
    /// Longest a shutdown (SIGTERM) waits for in-flight work to finish and the NATS connection
    /// to drain before the service stops anyway; the chart sets the pod's grace period above it.
    pub shutdown_timeout_seconds: u64,
    /// The sources ingest accepts events for.
    pub sources: Vec<SourceConfig>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            http_addr: "0.0.0.0:8080".into(),
            grpc_addr: "0.0.0.0:50051".into(),
            admin_addr: "0.0.0.0:9091".into(),
            max_request_bytes: 500 * 1024,
            max_event_bytes: 32 * 1024,
            max_batch_events: 2500,
            max_mparticle_request_bytes: 256 * 1024,
            max_json_depth: 64,
            max_message_id_chars: 100,
            cors_allowed_origins: vec!["*".into()],
            publish_timeout_ms: 5000,
            dedupe_window_hours: 0,
            shutdown_timeout_seconds: herald_common::supervisor::DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
            sources: Vec::new(),
        }
    }
}

/// One source: a producer of events, authenticated by its write key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Stable source id; part of every event id from this source.
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// The write key clients authenticate with (HTTP Basic user name or body `writeKey`).
    pub write_key: Secret,
    /// The mParticle secret paired with the write key (Basic `key:secret` on `/v2/*`).
    #[serde(default)]
    pub write_secret: Option<Secret>,
    /// Whether the source accepts events; a disabled source's requests get 403.
    #[serde(default = "enabled_default")]
    pub enabled: bool,
    /// Store bulk requests all-or-nothing with JetStream atomic batch publish.
    #[serde(default)]
    pub atomic_publish: bool,
    /// Events per second accepted from this source; 0 means unlimited.
    #[serde(default)]
    pub rate_limit_per_second: f64,
    /// Burst of the rate limit; 0 means one second's worth.
    #[serde(default)]
    pub rate_limit_burst: u32,
}

impl Default for SourceConfig {
    /// An enabled source with empty id and key (fill them in) and default settings.
    fn default() -> Self {
        Self {
            id: String::new(),
            name: String::new(),
            write_key: Secret::default(),
            write_secret: None,
            enabled: true,
            atomic_publish: false,
            rate_limit_per_second: 0.0,
            rate_limit_burst: 0,
        }
    }
}

impl SourceConfig {
    /// The source's settings.
    pub fn settings(&self) -> SourceSettings {
        SourceSettings {
            atomic_publish: self.atomic_publish,
            rate_limit_per_second: self.rate_limit_per_second,
            rate_limit_burst: self.rate_limit_burst,
        }
    }
}

/// Per-source settings request handling reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceSettings {
    /// Store a bulk request all-or-nothing with JetStream atomic batch publish (falls back to
    /// per-message publishing when the server refuses the batch).
    pub atomic_publish: bool,
    /// Events per second accepted from this source (token bucket); 0 means unlimited.
    pub rate_limit_per_second: f64,
    /// Burst size of the token bucket; 0 means one second's worth (the rate, rounded up).
    pub rate_limit_burst: u32,
}

impl SourceSettings {
    /// Checks the values request handling cannot work with.
    pub fn validate(&self) -> Result<(), String> {
        if !self.rate_limit_per_second.is_finite() || self.rate_limit_per_second < 0.0 {
            return Err(format!(
                "rate_limit_per_second must be 0 (unlimited) or a positive number, not {}",
                self.rate_limit_per_second
            ));
        }
        Ok(())
    }
}

fn enabled_default() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_deserialise_with_defaults_and_redact_keys() {
        let cfg: IngestConfig = serde_json::from_value(serde_json::json!({
            "max_batch_events": 10,
            "sources": [{"id": "web", "write_key": "s3cret"}]
        }))
        .expect("valid config");
        assert_eq!(cfg.max_batch_events, 10);
        assert_eq!(cfg.max_request_bytes, 500 * 1024);
        assert_eq!(cfg.sources[0].name, "");
        assert!(cfg.sources[0].enabled);
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err =
            serde_json::from_value::<IngestConfig>(serde_json::json!({"max_body": 1})).unwrap_err();
        assert!(err.to_string().contains("max_body"), "{err}");
        let err = serde_json::from_value::<SourceConfig>(
            serde_json::json!({"id": "a", "write_key": "k", "writekey": "x"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("writekey"), "{err}");
    }
}
