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
    /// How long a request waits for JetStream to acknowledge its events before answering 503.
    pub publish_timeout_ms: u64,
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
            publish_timeout_ms: 5000,
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
