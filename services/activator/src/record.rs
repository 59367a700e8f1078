//! A destination as stored in the config bucket (JSON under `destinations.<id>`), and the one
//! place that validates it.
//!
//! [`DestinationRecord::check`] refuses what cannot work (an unknown setting, an invalid CEL
//! filter with its position, a webhook URL that is not http(s)); the SSRF guard's check of a
//! webhook URL is made when its sender is built ([`crate::destinations::Sender::new`]), which
//! the store does before it writes. Secret settings (webhook: `secret` and every `header.*`)
//! are redacted in `Debug` and shown as `***` by [`DestinationRecord::masked`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use herald_common::config::Secret;
use serde::{Deserialize, Serialize};

use crate::filter::{ConsentPolicy, Filter, UnknownConsent};

/// The schema version of [`DestinationRecord`] this code writes; records of a newer version
/// are skipped (with a warning) rather than misread.
pub const SCHEMA_VERSION: u32 = 1;

/// How a secret setting is shown by `get` and `list`.
pub const MASK: &str = "***";

/// Default attempts of one event.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Default longest retry of one event, from its first attempt: 24 h.
pub const DEFAULT_MAX_AGE_SECONDS: u64 = 86_400;
/// Default timeout of one webhook request.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// A destination's settings: `key = value` strings, checked per kind (see
/// [`DestinationRecord::check`]). Secret values are redacted in `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Settings(pub BTreeMap<String, String>);

/// Whether a setting is a secret: `secret` and every `header.*`.
pub fn is_secret(key: &str) -> bool {
    key == "secret" || key.starts_with("header.")
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, if is_secret(k) { MASK } else { v.as_str() })),
            )
            .finish()
    }
}

/// Where a new destination starts reading the processed stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Start {
    /// From the destination's creation time (the default).
    #[default]
    Now,
    /// From the oldest event the stream holds.
    All,
    /// From this time.
    At(DateTime<Utc>),
}

impl Start {
    /// Parses `now`, `all` or an RFC 3339 time.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "now" => Ok(Self::Now),
            "all" => Ok(Self::All),
            t => DateTime::parse_from_rfc3339(t)
                .map(|t| Self::At(t.with_timezone(&Utc)))
                .map_err(|e| {
                    format!("start {t:?}: expected now, all or an RFC 3339 time such as 2026-01-31T12:00:00Z ({e})")
                }),
        }
    }
}

impl TryFrom<String> for Start {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<Start> for String {
    fn from(s: Start) -> String {
        s.to_string()
    }
}

impl fmt::Display for Start {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Now => f.write_str("now"),
            Self::All => f.write_str("all"),
            Self::At(t) => f.write_str(herald_proto::time::rfc3339(t).as_str()),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_max_age() -> u64 {
    DEFAULT_MAX_AGE_SECONDS
}

/// The kind of a destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    /// HTTP POST of each event as Segment-spec JSON.
    #[default]
    Webhook,
    /// One JSON line per event to stdout or a file.
    Log,
    /// The event's JSON published to a NATS subject.
    Nats,
}

impl DestinationKind {
    /// The kind's name, as in config and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Log => "log",
            Self::Nats => "nats",
        }
    }

    /// The kind named `name`, or an error that lists the kinds.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "webhook" => Ok(Self::Webhook),
            "log" => Ok(Self::Log),
            "nats" => Ok(Self::Nats),
            other => Err(format!(
                "unknown destination kind {other:?}: expected webhook, log or nats"
            )),
        }
    }
}

/// One destination as stored. Unknown fields are ignored, so a newer minor version can add
/// fields without breaking older replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationRecord {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema: u32,
    /// Stable id; names the durable consumer `activator-<id>`.
    pub id: String,
    /// The kind.
    pub kind: DestinationKind,
    /// The kind's settings.
    #[serde(default)]
    pub settings: Settings,
    /// Event types it receives; empty: all.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Event names it receives; empty: all.
    #[serde(default)]
    pub event_names: Vec<String>,
    /// A CEL condition over `event`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Consent purposes it requires.
    #[serde(default)]
    pub require_purposes: Vec<String>,
    /// A person with no recorded choice on a required purpose.
    #[serde(default)]
    pub unknown_consent: UnknownConsent,
    /// Where a new consumer starts (`now` is [`DestinationRecord::created_at`]).
    #[serde(default)]
    pub start: Start,
    /// Per-user order.
    #[serde(default = "default_true")]
    pub ordered: bool,
    /// Most events per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Most send attempts of one event.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Longest an event is retried, from its first attempt.
    #[serde(default = "default_max_age")]
    pub max_age_seconds: u64,
    /// Whether every delivered event is recorded in its delivery status (what
    /// `activator.delivery_status_delivered` does for every destination).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record_deliveries: bool,
    /// Whether delivery is paused (the consumer is kept).
    #[serde(default)]
    pub paused: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Digest of the config-file entry this record was last seeded from; absent for
    /// destinations created through the control API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// The bucket revision it was read at (not stored).
    #[serde(skip)]
    pub revision: u64,
}

/// A webhook's settings, parsed.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The URL events are POSTed to.
    pub url: String,
    /// Timeout of one request.
    pub timeout_ms: u64,
    /// Most events per request: 1 (the default) sends each event alone; above 1, requests
    /// carry `{"batch":[...]}` (see [`crate::deliver`]).
    pub batch_max: u32,
    /// Extra request headers (secrets).
    pub headers: BTreeMap<String, Secret>,
    /// Signing secret: with it every request carries `Herald-Signature`.
    pub secret: Option<Secret>,
}

/// A log destination's settings, parsed.
#[derive(Debug, Clone, Default)]
pub struct LogSettings {
    /// File to append lines to; stdout when absent.
    pub log_file: Option<PathBuf>,
}

/// A NATS subject destination's settings, parsed.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// The subject events are published to (no wildcards).
    pub subject: String,
}

/// A kind's settings, parsed.
#[derive(Debug, Clone)]
pub enum KindSettings {
    /// Webhook.
    Webhook(WebhookSettings),
    /// Log.
    Log(LogSettings),
    /// NATS subject.
    Nats(NatsSettings),
}

/// What [`DestinationRecord::check`] compiles: what the delivery path uses.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The kind's settings.
    pub kind: KindSettings,
    /// Types, names and CEL condition.
    pub filter: Filter,
    /// The consent gate.
    pub consent: ConsentPolicy,
}

/// Checks a destination id: 1 to 64 letters, digits, `-` and `_`.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "destination id {id:?} must be 1 to 64 letters, digits, '-' or '_'"
        ));
    }
    // Partition consumers are `activator-<id>-p<N>`: an id of that shape would name another
    // destination's partition consumer.
    if let Some((_, n)) = id.rsplit_once("-p")
        && !n.is_empty()
        && n.chars().all(|c| c.is_ascii_digit())
    {
        return Err(format!(
            "destination id {id:?} must not end in -p<number> (the names of partition consumers); choose another id"
        ));
    }
    Ok(())
}

impl DestinationRecord {
    /// A record with the defaults, created at `now`.
    pub fn new(id: String, kind: DestinationKind, now: DateTime<Utc>) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            id,
            kind,
            settings: Settings::default(),
            event_types: Vec::new(),
            event_names: Vec::new(),
            filter: None,
            require_purposes: Vec::new(),
            unknown_consent: UnknownConsent::Deny,
            start: Start::Now,
            ordered: true,
            rate_limit: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_age_seconds: DEFAULT_MAX_AGE_SECONDS,
            record_deliveries: false,
            paused: false,
            created_at: now,
            updated_at: now,
            config_sha256: None,
            revision: 0,
        }
    }

    /// The record's JSON.
    pub fn to_json(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("a destination record serialises")
            .into()
    }

    /// Parses a stored record.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let record: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if record.schema > SCHEMA_VERSION {
            return Err(format!(
                "schema version {} is newer than this activator understands ({SCHEMA_VERSION}): upgrade the activator",
                record.schema
            ));
        }
        Ok(record)
    }

    /// The record with every secret setting replaced by `***`.
    pub fn masked(&self) -> Self {
        let mut r = self.clone();
        for (k, v) in r.settings.0.iter_mut() {
            if is_secret(k) {
                *v = MASK.to_string();
            }
        }
        r
    }

    /// Where a new consumer of this destination starts.
    pub fn deliver_policy(&self) -> async_nats::jetstream::consumer::DeliverPolicy {
        use async_nats::jetstream::consumer::DeliverPolicy;
        let at = |t: DateTime<Utc>| {
            let nanos = i128::from(t.timestamp_nanos_opt().unwrap_or_default());
            match async_nats::datetime::from_nanos(nanos) {
                Ok(start_time) => DeliverPolicy::ByStartTime { start_time },
                Err(_) => DeliverPolicy::All,
            }
        };
        match self.start {
            Start::Now => at(self.created_at),
            Start::All => DeliverPolicy::All,
            Start::At(t) => at(t),
        }
    }

    /// Validates everything that needs no network, and compiles what delivery uses. The one
    /// place a destination is checked: create, update, seeding and every replica's start.
    pub fn check(&self) -> Result<Checked, String> {
        check_id(&self.id)?;
        let id = &self.id;
        let kind = match self.kind {
            DestinationKind::Webhook => KindSettings::Webhook(self.webhook_settings()?),
            DestinationKind::Log => KindSettings::Log(self.log_settings()?),
            DestinationKind::Nats => KindSettings::Nats(self.nats_settings()?),
        };
        let filter = Filter::new(&self.event_types, &self.event_names, self.filter.as_deref())
            .map_err(|e| format!("destination {id:?}: {e}"))?;
        if self.require_purposes.iter().any(|p| p.trim().is_empty()) {
            return Err(format!(
                "destination {id:?}: a required purpose must not be empty"
            ));
        }
        let consent = ConsentPolicy::new(&self.require_purposes, self.unknown_consent);
        if self.max_attempts == 0 {
            return Err(format!(
                "destination {id:?}: max_attempts must be at least 1"
            ));
        }
        if self.max_age_seconds == 0 {
            return Err(format!("destination {id:?}: max_age must be above 0"));
        }
        if self.rate_limit == Some(0) {
            return Err(format!(
                "destination {id:?}: rate_limit must be above 0, or absent for no limit"
            ));
        }
        Ok(Checked {
            kind,
            filter,
            consent,
        })
    }

    fn unknown_setting(&self, key: &str, known: &str) -> String {
        format!(
            "destination {:?}: unknown setting {key:?} for kind {}: expected {known}",
            self.id,
            self.kind.as_str()
        )
    }

    fn webhook_settings(&self) -> Result<WebhookSettings, String> {
        let id = &self.id;
        let mut url = None;
        let mut timeout_ms = DEFAULT_TIMEOUT_MS;
        let mut batch_max = 1;
        let mut headers = BTreeMap::new();
        let mut secret = None;
        let number = |key: &str, v: &str| {
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    format!("destination {id:?}: setting {key} = {v:?} must be a positive integer")
                })
        };
        for (k, v) in &self.settings.0 {
            match k.as_str() {
                "url" => url = Some(v.clone()),
                "timeout_ms" => timeout_ms = number(k, v)?,
                "batch_max" => {
                    batch_max = u32::try_from(number(k, v)?)
                        .map_err(|_| format!("destination {id:?}: batch_max {v} is too large"))?
                }
                "secret" => secret = Some(Secret(v.clone())),
                _ => match k.strip_prefix("header.") {
                    Some(name) if !name.is_empty() => {
                        headers.insert(name.to_string(), Secret(v.clone()));
                    }
                    _ => {
                        return Err(self.unknown_setting(
                            k,
                            "url, timeout_ms, batch_max, secret or header.<Name>",
                        ));
                    }
                },
            }
        }
        let url = match url {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => u,
            _ => {
                return Err(format!(
                    "webhook destination {id:?} needs a url: --set url=https://..."
                ));
            }
        };
        Ok(WebhookSettings {
            url,
            timeout_ms,
            batch_max,
            headers,
            secret,
        })
    }

    fn nats_settings(&self) -> Result<NatsSettings, String> {
        let id = &self.id;
        let mut subject = None;
        for (k, v) in &self.settings.0 {
            match k.as_str() {
                "subject" => subject = Some(v.trim().to_string()),
                _ => return Err(self.unknown_setting(k, "subject")),
            }
        }
        let Some(subject) = subject else {
            return Err(format!(
                "nats destination {id:?} needs a subject: --set subject=orders.events"
            ));
        };
        check_subject(&subject).map_err(|e| format!("nats destination {id:?}: {e}"))?;
        Ok(NatsSettings { subject })
    }

    fn log_settings(&self) -> Result<LogSettings, String> {
        let mut out = LogSettings::default();
        for (k, v) in &self.settings.0 {
            match k.as_str() {
                "log_file" if !v.is_empty() => out.log_file = Some(PathBuf::from(v)),
                "log_file" => {}
                _ => return Err(self.unknown_setting(k, "log_file")),
            }
        }
        Ok(out)
    }
}

/// Checks a subject to publish to: dot-separated non-empty tokens of printable characters other
/// than space, and no wildcard (`*`, `>`).
fn check_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() {
        return Err("the subject is empty".into());
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err(format!("subject {subject:?} has an empty token"));
        }
        if token == "*" || token == ">" || token.contains(['*', '>']) {
            return Err(format!(
                "subject {subject:?} has a wildcard: publish needs a literal subject"
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("subject {subject:?} contains white space"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_id_shaped_like_a_partition_consumer_is_refused() {
        assert!(super::check_id("orders-p3").is_err());
        assert!(super::check_id("orders-p").is_ok());
        assert!(super::check_id("orders-prod").is_ok());
        assert!(super::check_id("orders").is_ok());
    }

    use super::*;

    fn record(kind: DestinationKind, settings: &[(&str, &str)]) -> DestinationRecord {
        let mut r = DestinationRecord::new("d1".into(), kind, Utc::now());
        r.settings = Settings(
            settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        r
    }

    type Case<'a> = (DestinationKind, &'a [(&'a str, &'a str)], &'a str);

    #[test]
    fn settings_are_checked_per_kind() {
        use DestinationKind::{Log, Nats, Webhook};
        let ok: &[(DestinationKind, &[(&str, &str)])] = &[
            (Webhook, &[("url", "https://example.com/h")]),
            (
                Webhook,
                &[
                    ("url", "http://example.com/h"),
                    ("timeout_ms", "500"),
                    ("batch_max", "100"),
                    ("secret", "s"),
                    ("header.Authorization", "Bearer x"),
                ],
            ),
            (Log, &[]),
            (Log, &[("log_file", "/tmp/x.jsonl")]),
            (Nats, &[("subject", "crm.events")]),
        ];
        for (kind, settings) in ok {
            record(*kind, settings)
                .check()
                .unwrap_or_else(|e| panic!("{settings:?}: {e}"));
        }
        let bad: &[Case] = &[
            (Webhook, &[], "needs a url"),
            (Webhook, &[("url", "ftp://x")], "needs a url"),
            (
                Webhook,
                &[("url", "http://x"), ("timeout_ms", "soon")],
                "positive integer",
            ),
            (
                Webhook,
                &[("url", "http://x"), ("color", "red")],
                "unknown setting \"color\"",
            ),
            (
                Webhook,
                &[("url", "http://x"), ("header.", "v")],
                "unknown setting",
            ),
            (
                Log,
                &[("url", "http://x")],
                "unknown setting \"url\" for kind log",
            ),
            (Log, &[("secret", "s")], "unknown setting"),
            (Nats, &[], "needs a subject"),
            (Nats, &[("subject", "crm.>")], "wildcard"),
            (
                Nats,
                &[("subject", "crm"), ("url", "http://x")],
                "unknown setting \"url\" for kind nats",
            ),
        ];
        for (kind, settings, want) in bad {
            let err = record(*kind, settings).check().expect_err("refused");
            assert!(err.contains(want), "{settings:?}: {err}");
        }
    }

    #[test]
    fn invalid_filters_and_ids_are_refused() {
        let mut r = record(DestinationKind::Log, &[]);
        r.filter = Some("event.type == ".into());
        let err = r.check().expect_err("invalid CEL");
        assert!(err.contains("invalid filter"), "{err}");
        assert!(err.contains("at 1:15"), "{err}");
        let mut r = record(DestinationKind::Log, &[]);
        r.event_types = vec!["purchase".into()];
        assert!(r.check().expect_err("type").contains("unknown event type"));
        let mut r = record(DestinationKind::Log, &[]);
        r.id = "no spaces".into();
        assert!(r.check().expect_err("id").contains("letters, digits"));
        let mut r = record(DestinationKind::Log, &[]);
        r.max_attempts = 0;
        assert!(r.check().is_err());
    }

    #[test]
    fn secrets_are_masked_and_redacted() {
        let r = record(
            DestinationKind::Webhook,
            &[
                ("url", "https://example.com/h"),
                ("secret", "whsec-123"),
                ("header.Authorization", "Bearer tok-456"),
            ],
        );
        let debug = format!("{r:?}");
        assert!(
            !debug.contains("whsec-123") && !debug.contains("tok-456"),
            "{debug}"
        );
        let m = r.masked();
        assert_eq!(m.settings.0["secret"], MASK);
        assert_eq!(m.settings.0["header.Authorization"], MASK);
        assert_eq!(m.settings.0["url"], "https://example.com/h");
    }

    #[test]
    fn start_parses_and_round_trips() {
        for (s, want) in [
            ("now", Start::Now),
            ("all", Start::All),
            (
                "2026-01-31T12:00:00Z",
                Start::At("2026-01-31T12:00:00Z".parse().unwrap()),
            ),
        ] {
            let got = Start::parse(s).expect(s);
            assert_eq!(got, want);
            assert_eq!(Start::parse(&got.to_string()).unwrap(), want);
        }
        assert!(Start::parse("yesterday").unwrap_err().contains("RFC 3339"));
        let r = record(DestinationKind::Log, &[]);
        let back = DestinationRecord::from_json(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn subjects_are_checked() {
        for ok in ["orders", "crm.events", "a.b-c.d_e.1", "Tenant42.EVENTS"] {
            check_subject(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, want) in [
            ("", "empty"),
            ("a..b", "empty token"),
            (".a", "empty token"),
            ("a.", "empty token"),
            ("a.*", "wildcard"),
            ("a.>", "wildcard"),
            ("a.b*", "wildcard"),
            ("a b", "white space"),
            ("a.\tb", "white space"),
        ] {
            let err = check_subject(bad).expect_err(bad);
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }
}
