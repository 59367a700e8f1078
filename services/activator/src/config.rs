//! The activator's config section (`[activator]`, env `HERALD__ACTIVATOR__*`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use herald_common::config::Secret;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::filter::UnknownConsent;
pub use crate::record::DestinationKind;
use crate::record::{DestinationRecord, Settings, Start};

/// Settings of the activator service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActivatorConfig {
    /// gRPC control address.
    pub grpc_addr: String,
    /// Admin address (`/healthz`, `/readyz`, `/metrics`).
    pub admin_addr: String,
    /// Ack wait of each destination consumer: how soon a crashed replica's messages come back.
    pub ack_wait_seconds: u64,
    /// Most events handled in one batch per destination consumer.
    pub batch_size: usize,
    /// Most events delivered to the activator and not yet acked, per destination consumer (one
    /// per partition of an ordered destination, one shared by an unordered one): with the batch
    /// size, it bounds what a slow or failing destination holds.
    pub max_ack_pending: i64,
    /// Most requests in flight to one destination from this replica, shared by all the
    /// destination's consumers, replays and redrives: so also the most connections a webhook
    /// destination gets from one replica. A user waiting for a retry or for its ack's
    /// confirmation holds none of them.
    pub max_concurrent_keys: usize,
    /// Longest pause between retries of a failed send.
    pub retry_max_backoff_ms: u64,
    /// Transient failures in a row (408, 429, 5xx, network) after which a destination's
    /// circuit breaker opens on this replica (0: never).
    pub breaker_failures: u32,
    /// How long an open circuit breaker sends nothing before one probe request.
    pub breaker_cool_down_ms: u64,
    /// How long each event's delivery-status record is kept (`herald delivery <id>`); 0 turns
    /// recording off (and with it the check that keeps a redelivered, already delivered event
    /// from being sent again).
    pub delivery_status_ttl_seconds: u64,
    /// Whether every delivered event gets a delivery-status record too. Off by default: each
    /// record is a key nats-server keeps in memory for the TTL (about 0.9 KiB each), and a
    /// delivered event is then acked with the server's confirmation instead. Outcomes other
    /// than a plain delivery (dlq, consent-dropped, retrying) are always recorded.
    pub delivery_status_delivered: bool,
    /// Longest a shutdown (SIGTERM) waits for in-flight work to finish and the NATS connection
    /// to drain before the service stops anyway; the chart sets the pod's grace period above it.
    pub shutdown_timeout_seconds: u64,
    /// Destinations seeded into the config bucket at start (created when absent; rewritten
    /// when their entry here changes), then managed live like any other.
    pub destinations: Vec<DestinationConfig>,
    /// CIDRs webhooks may reach although they are loopback, private or link-local (e.g.
    /// `["10.20.0.0/16"]`); every other such address is refused (see
    /// [`crate::destinations::ssrf`]). Empty by default; `herald dev` allows loopback and
    /// private ranges.
    pub allow_private_networks: Vec<IpNet>,
    /// Partition ownership among activator replicas (the `activator` member list): heartbeat,
    /// member TTL, and the pin timeout of ordered destinations' partition consumers
    /// (`[activator.ownership]`, the processor's defaults).
    pub ownership: herald_common::ownership::OwnershipConfig,
}

impl Default for ActivatorConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "0.0.0.0:50053".into(),
            admin_addr: "0.0.0.0:9093".into(),
            ack_wait_seconds: 10,
            batch_size: 256,
            max_ack_pending: 10_000,
            max_concurrent_keys: 64,
            retry_max_backoff_ms: 5_000,
            breaker_failures: 5,
            breaker_cool_down_ms: 5_000,
            delivery_status_ttl_seconds: 86_400,
            delivery_status_delivered: false,
            shutdown_timeout_seconds: herald_common::supervisor::DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
            destinations: Vec::new(),
            allow_private_networks: Vec::new(),
            ownership: Default::default(),
        }
    }
}

/// One `[[activator.destinations]]` entry of the config file: the fields of
/// `herald destinations create`, seeded into the config bucket at start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Stable id: letters, digits, `-` and `_`; names the durable consumer.
    pub id: String,
    /// What kind of destination it is.
    pub kind: DestinationKind,
    /// The kind's settings (`url`, `header.<Name>`, `secret`, `timeout_ms`, `batch_max`,
    /// `log_file`); see [`crate::record::Settings`].
    #[serde(default)]
    pub settings: Settings,
    /// Event types it receives; empty: all.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Event names it receives; empty: all.
    #[serde(default)]
    pub event_names: Vec<String>,
    /// A CEL condition over `event`.
    #[serde(default)]
    pub filter: Option<String>,
    /// Consent purposes it requires.
    #[serde(default)]
    pub require_purposes: Vec<String>,
    /// A person with no recorded choice on a required purpose: `allow` or `deny` (default).
    #[serde(default)]
    pub unknown_consent: UnknownConsent,
    /// `now` (default), `all` or an RFC 3339 time.
    #[serde(default)]
    pub start: Start,
    /// Per-user order (default true).
    #[serde(default)]
    pub ordered: Option<bool>,
    /// Most events per second.
    #[serde(default)]
    pub rate_limit: Option<u32>,
    /// Most send attempts of one event (default 10).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Longest an event is retried, from its first attempt (default 86400).
    #[serde(default)]
    pub max_age_seconds: Option<u64>,
    /// Record every delivered event in its delivery status (default false; see
    /// `delivery_status_delivered`).
    #[serde(default)]
    pub record_deliveries: Option<bool>,
    /// Deprecated: `settings.url`.
    #[serde(default)]
    pub url: Option<String>,
    /// Deprecated: `settings.timeout_ms`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Deprecated: `settings.log_file`.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// Deprecated: `settings."header.<Name>"`.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Deprecated: `settings.secret`.
    #[serde(default)]
    pub secret: Option<Secret>,
}

impl DestinationConfig {
    /// The deprecated top-level keys this entry uses (`url`, `timeout_ms`, `log_file`,
    /// `headers`, `secret`), to warn about once.
    pub fn deprecated_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.url.is_some() {
            keys.push("url");
        }
        if self.timeout_ms.is_some() {
            keys.push("timeout_ms");
        }
        if self.log_file.is_some() {
            keys.push("log_file");
        }
        if !self.headers.is_empty() {
            keys.push("headers");
        }
        if self.secret.is_some() {
            keys.push("secret");
        }
        keys
    }

    /// The settings with the deprecated top-level keys mapped in (a key in `settings` wins).
    pub fn merged_settings(&self) -> Settings {
        let mut s = self.settings.clone();
        let mut put = |k: String, v: String| {
            s.0.entry(k).or_insert(v);
        };
        if let Some(u) = &self.url {
            put("url".into(), u.clone());
        }
        if let Some(t) = self.timeout_ms {
            put("timeout_ms".into(), t.to_string());
        }
        if let Some(f) = &self.log_file {
            put("log_file".into(), f.display().to_string());
        }
        for (name, value) in &self.headers {
            put(format!("header.{name}"), value.expose().to_string());
        }
        if let Some(secret) = &self.secret {
            put("secret".into(), secret.expose().to_string());
        }
        s
    }

    /// The record this entry describes, created at `now` (not yet validated).
    pub fn to_record(&self, now: DateTime<Utc>) -> DestinationRecord {
        let mut r = DestinationRecord::new(self.id.clone(), self.kind, now);
        r.settings = self.merged_settings();
        r.event_types = self.event_types.clone();
        r.event_names = self.event_names.clone();
        r.filter = self.filter.clone().filter(|f| !f.trim().is_empty());
        r.require_purposes = self.require_purposes.clone();
        r.unknown_consent = self.unknown_consent;
        r.start = self.start;
        if let Some(o) = self.ordered {
            r.ordered = o;
        }
        r.rate_limit = self.rate_limit.filter(|n| *n > 0);
        if let Some(n) = self.max_attempts {
            r.max_attempts = n;
        }
        if let Some(n) = self.max_age_seconds {
            r.max_age_seconds = n;
        }
        r.record_deliveries = self.record_deliveries.unwrap_or(false);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case = (
        DestinationConfig,
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
    );

    #[test]
    fn record_deliveries_reaches_the_record_and_stays_out_of_its_json_when_off() {
        let on: DestinationConfig =
            serde_json::from_str(r#"{"id": "a", "kind": "webhook", "record_deliveries": true}"#)
                .expect("entry");
        let r = on.to_record(Utc::now());
        assert!(r.record_deliveries);
        let json = String::from_utf8_lossy(&r.to_json()).into_owned();
        assert!(json.contains(r#""record_deliveries":true"#), "{json}");
        // Off (the default): the record's JSON is what it was before the field existed, so
        // the digest of an existing config entry does not change.
        let off: DestinationConfig =
            serde_json::from_str(r#"{"id": "b", "kind": "webhook"}"#).expect("entry");
        let r = off.to_record(Utc::now());
        assert!(!r.record_deliveries);
        let json = String::from_utf8_lossy(&r.to_json()).into_owned();
        assert!(!json.contains("record_deliveries"), "{json}");
    }

    #[test]
    fn deprecated_keys_are_mapped_into_settings_and_named() {
        let cases: [Case; 3] = [
            (
                DestinationConfig {
                    id: "a".into(),
                    url: Some("https://x/h".into()),
                    timeout_ms: Some(2500),
                    headers: [("Authorization".to_string(), Secret("Bearer t".into()))].into(),
                    secret: Some(Secret("s".into())),
                    ..Default::default()
                },
                &["url", "timeout_ms", "headers", "secret"],
                &[
                    ("url", "https://x/h"),
                    ("timeout_ms", "2500"),
                    ("header.Authorization", "Bearer t"),
                    ("secret", "s"),
                ],
            ),
            (
                // A key in settings wins over the deprecated one.
                DestinationConfig {
                    id: "b".into(),
                    kind: DestinationKind::Log,
                    settings: Settings([("log_file".to_string(), "/new".to_string())].into()),
                    log_file: Some("/old".into()),
                    ..Default::default()
                },
                &["log_file"],
                &[("log_file", "/new")],
            ),
            (
                DestinationConfig {
                    id: "c".into(),
                    settings: Settings([("url".to_string(), "https://y/".to_string())].into()),
                    ..Default::default()
                },
                &[],
                &[("url", "https://y/")],
            ),
        ];
        for (cfg, keys, settings) in cases {
            assert_eq!(cfg.deprecated_keys(), keys, "{}", cfg.id);
            let want: BTreeMap<String, String> = settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(cfg.merged_settings().0, want, "{}", cfg.id);
            assert_eq!(cfg.to_record(Utc::now()).settings.0, want, "{}", cfg.id);
        }
    }
}
