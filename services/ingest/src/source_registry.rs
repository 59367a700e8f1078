//! The source registry: what request handling asks about sources (`authenticate`,
//! `authenticate_pair`, `list`), answered from memory.
//!
//! - Sources and their write keys live in the config KV bucket (`<prefix>-config`, keys
//!   `sources.<id>`, one JSON [`SourceRecord`] each): [`crate::source_store`] changes them,
//!   [`crate::source_sync`] loads them at start and follows a KV watch, so a change made through
//!   any replica's control API reaches every replica's registry within milliseconds.
//! - Only SHA-256 digests of write keys and mParticle secrets are stored; a presented key is
//!   hashed and compared with the stored digests in constant time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use herald_common::auth::{ct_eq, parse_sha256_hex, sha256, sha256_hex};
use serde::{Deserialize, Serialize};

use crate::config::{SourceConfig, SourceSettings};
use crate::error::IngestError;

/// The schema version of [`SourceRecord`] this code writes; records of a newer version are
/// skipped (with a warning) rather than misread.
pub const SCHEMA_VERSION: u32 = 1;

/// A source as request handling sees it: never its write key.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Stable source id; part of every event id from this source.
    pub id: Arc<str>,
    /// Human-readable name.
    pub name: Arc<str>,
    /// Whether the source accepts events.
    pub enabled: bool,
    /// Atomic publish and rate limits.
    pub settings: SourceSettings,
}

/// One source as stored in the config bucket (JSON under `sources.<id>`). Unknown fields are
/// ignored, so a newer minor version can add fields without breaking older replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema: u32,
    /// Stable source id.
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// Whether the source accepts events.
    pub enabled: bool,
    /// SHA-256 (hex) of the write key; the key itself is never stored.
    pub write_key_sha256: String,
    /// SHA-256 (hex) of the mParticle secret, when the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_secret_sha256: Option<String>,
    /// Atomic publish and rate limits.
    #[serde(flatten)]
    pub settings: SourceSettings,
    /// When the source was created.
    pub created_at: DateTime<Utc>,
    /// When the source last changed.
    pub updated_at: DateTime<Utc>,
    /// Digest of the config-file entry this record was last seeded from; absent for sources
    /// created through the control API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
}

impl SourceRecord {
    /// The record's JSON.
    pub fn to_json(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("a source record serialises")
            .into()
    }

    /// Parses a stored record.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let record: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if record.schema > SCHEMA_VERSION {
            return Err(format!(
                "schema version {} is newer than this ingest understands ({SCHEMA_VERSION}): upgrade ingest",
                record.schema
            ));
        }
        Ok(record)
    }

    /// The source request handling sees.
    pub fn source(&self) -> Source {
        Source {
            id: self.id.as_str().into(),
            name: self.name.as_str().into(),
            enabled: self.enabled,
            settings: self.settings,
        }
    }

    /// A record for a config-file source, with the digest of the entry.
    pub(crate) fn from_config(s: &SourceConfig, now: DateTime<Utc>) -> Self {
        let mut record = Self {
            schema: SCHEMA_VERSION,
            id: s.id.clone(),
            name: s.name.clone(),
            enabled: s.enabled,
            write_key_sha256: sha256_hex(s.write_key.expose().as_bytes()),
            write_secret_sha256: s
                .write_secret
                .as_ref()
                .map(|x| sha256_hex(x.expose().as_bytes())),
            settings: s.settings(),
            created_at: now,
            updated_at: now,
            config_sha256: None,
        };
        record.config_sha256 = Some(record.config_digest());
        record
    }

    /// Digest of the fields a config entry sets (keys by their digests).
    fn config_digest(&self) -> String {
        let fields = serde_json::json!([
            self.id,
            self.name,
            self.enabled,
            self.write_key_sha256,
            self.write_secret_sha256,
            self.settings,
        ]);
        sha256_hex(fields.to_string().as_bytes())
    }
}

/// Why a key and secret pair was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairAuthError {
    /// No source has this key.
    UnknownKey,
    /// The key is known but the secret does not match (or the source has none).
    BadSecret,
}

struct Entry {
    key: [u8; 32],
    secret: Option<[u8; 32]>,
    source: Source,
}

/// The lookup structure request handling reads; rebuilt on every change.
#[derive(Default)]
struct Snapshot {
    /// Indexed by the first 8 bytes of the key digest (not secret); candidates are compared in
    /// full in constant time.
    by_key: HashMap<u64, Vec<Entry>>,
    /// Every source, by id.
    list: Vec<Source>,
}

impl Snapshot {
    fn build<'a>(records: impl Iterator<Item = &'a SourceRecord>) -> Self {
        let mut records: Vec<&SourceRecord> = records.collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        let mut snap = Self::default();
        for r in records {
            let Some(key) = parse_sha256_hex(&r.write_key_sha256) else {
                tracing::warn!(source = %r.id, "source record has an invalid write_key_sha256; skipped");
                continue;
            };
            let secret = match &r.write_secret_sha256 {
                None => None,
                Some(hex) => match parse_sha256_hex(hex) {
                    Some(d) => Some(d),
                    None => {
                        tracing::warn!(source = %r.id, "source record has an invalid write_secret_sha256; skipped");
                        continue;
                    }
                },
            };
            let source = r.source();
            let bucket = snap.by_key.entry(index(&key)).or_default();
            if bucket.iter().any(|e| ct_eq(&e.key, &key)) {
                tracing::warn!(source = %r.id, "two sources share a write key; the key authenticates the first by id only");
            }
            bucket.push(Entry {
                key,
                secret,
                source: source.clone(),
            });
            snap.list.push(source);
        }
        snap
    }

    fn find(&self, digest: &[u8; 32]) -> Option<&Entry> {
        let candidates = self.by_key.get(&index(digest))?;
        let mut found = None;
        for e in candidates {
            // No early exit: every candidate is compared.
            if ct_eq(&e.key, digest) && found.is_none() {
                found = Some(e);
            }
        }
        found
    }
}

fn index(digest: &[u8; 32]) -> u64 {
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// What the registry knows of one key of the bucket.
pub(crate) struct Known {
    pub(crate) revision: u64,
    /// `None` once deleted (kept so an older revision cannot bring it back).
    pub(crate) record: Option<SourceRecord>,
}

struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    known: Mutex<HashMap<String, Known>>,
    loaded: AtomicBool,
}

/// Looks up sources by write key, comparing key digests in constant time. Cheap to clone: all
/// clones share one state, which the bucket watch keeps current.
#[derive(Clone)]
pub struct SourceRegistry {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SourceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRegistry")
            .field("sources", &self.list())
            .field("loaded", &self.is_loaded())
            .finish()
    }
}

impl SourceRegistry {
    /// A registry serving the configured sources at once (loaded), as the router alone uses it.
    /// The service replaces them with the bucket's content ([`SourceRegistry::await_bucket`]).
    /// Ids and write keys must be unique and non-empty; ids are letters, digits, `-` and `_`.
    pub fn from_config(sources: &[SourceConfig]) -> Result<Self, IngestError> {
        validate_config(sources)?;
        let now = Utc::now();
        let known: HashMap<String, Known> = sources
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    Known {
                        revision: 0,
                        record: Some(SourceRecord::from_config(s, now)),
                    },
                )
            })
            .collect();
        let registry = Self {
            shared: Arc::new(Shared {
                snapshot: RwLock::new(Arc::new(Snapshot::default())),
                known: Mutex::new(known),
                loaded: AtomicBool::new(true),
            }),
        };
        registry.rebuild(&registry.shared.known.lock().expect("registry lock"));
        Ok(registry)
    }

    /// Forgets the configured sources and waits for the bucket: until the first load, nothing
    /// authenticates and [`SourceRegistry::is_loaded`] is false (request handling answers 503).
    pub fn await_bucket(&self) {
        self.shared.loaded.store(false, Ordering::SeqCst);
        let mut known = self.shared.known.lock().expect("registry lock");
        known.clear();
        self.rebuild(&known);
    }

    /// Whether the sources have been loaded (always true for a registry from config alone).
    pub fn is_loaded(&self) -> bool {
        self.shared.loaded.load(Ordering::SeqCst)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.read().expect("registry lock").clone()
    }

    /// The source whose write key is `key`, if any (enabled or not).
    pub fn authenticate(&self, key: &str) -> Option<Source> {
        let digest = sha256(key.as_bytes());
        self.snapshot().find(&digest).map(|e| e.source.clone())
    }

    /// The source whose key is `key` and whose secret is `secret` (mParticle's Basic
    /// `key:secret`), compared by digest in constant time.
    pub fn authenticate_pair(&self, key: &str, secret: &str) -> Result<Source, PairAuthError> {
        let snap = self.snapshot();
        let entry = snap
            .find(&sha256(key.as_bytes()))
            .ok_or(PairAuthError::UnknownKey)?;
        let presented = sha256(secret.as_bytes());
        match &entry.secret {
            Some(s) if ct_eq(s, &presented) => Ok(entry.source.clone()),
            _ => Err(PairAuthError::BadSecret),
        }
    }

    /// Every source, by id.
    pub fn list(&self) -> Vec<Source> {
        self.snapshot().list.clone()
    }

    /// Whether some source other than `except_id` has the write key with this digest.
    pub(crate) fn key_in_use(&self, digest: &[u8; 32], except_id: &str) -> bool {
        self.snapshot()
            .find(digest)
            .is_some_and(|e| &*e.source.id != except_id)
    }

    fn rebuild(&self, known: &HashMap<String, Known>) {
        let snap = Snapshot::build(known.values().filter_map(|k| k.record.as_ref()));
        *self.shared.snapshot.write().expect("registry lock") = Arc::new(snap);
    }

    /// Applies one change of the bucket: a put (`Some`) or a delete (`None`) of `id` at
    /// `revision`. Older revisions than the one known are ignored.
    pub(crate) fn apply(&self, id: &str, revision: u64, record: Option<SourceRecord>) {
        let mut known = self.shared.known.lock().expect("registry lock");
        if known.get(id).is_some_and(|k| k.revision >= revision) {
            return;
        }
        known.insert(id.to_string(), Known { revision, record });
        self.rebuild(&known);
    }

    /// Replaces everything with a full load of the bucket and marks the registry loaded.
    pub(crate) fn replace_all(&self, loaded: HashMap<String, Known>) {
        let mut known = self.shared.known.lock().expect("registry lock");
        *known = loaded;
        self.rebuild(&known);
        self.shared.loaded.store(true, Ordering::SeqCst);
    }
}

/// Checks configured sources: unique valid ids, unique non-empty keys, valid settings.
fn validate_config(sources: &[SourceConfig]) -> Result<(), IngestError> {
    let mut keys: Vec<[u8; 32]> = Vec::with_capacity(sources.len());
    for (i, s) in sources.iter().enumerate() {
        let bad =
            |why: &str| IngestError::Config(format!("ingest.sources: source {:?} {why}", s.id));
        if let Err(why) = check_id(&s.id) {
            return Err(bad(&why));
        }
        if sources[..i].iter().any(|o| o.id == s.id) {
            return Err(bad("is configured twice"));
        }
        let key = s.write_key.expose();
        if key.is_empty() {
            return Err(bad("has an empty write_key"));
        }
        let digest = sha256(key.as_bytes());
        if keys.iter().any(|k| ct_eq(k, &digest)) {
            return Err(bad("reuses another source's write_key"));
        }
        keys.push(digest);
        if let Err(why) = s.settings().validate() {
            return Err(bad(&why));
        }
    }
    Ok(())
}

/// A source id is 1 to 64 letters, digits, `-` and `_`: it names a KV key and NATS subjects.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("needs an id of 1 to 64 characters".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("needs an id of letters, digits, '-' and '_' only".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use herald_common::Secret;

    use super::*;

    fn src(id: &str, key: &str, enabled: bool) -> SourceConfig {
        SourceConfig {
            id: id.into(),
            name: format!("{id} name"),
            write_key: Secret(key.into()),
            write_secret: Some(Secret(format!("{key}-secret"))),
            enabled,
            ..Default::default()
        }
    }

    #[test]
    fn authenticates_key_and_secret_pairs() {
        let reg = SourceRegistry::from_config(&[src("app", "k1", true)]).expect("valid");
        assert_eq!(
            &*reg.authenticate_pair("k1", "k1-secret").expect("pair").id,
            "app"
        );
        assert_eq!(
            reg.authenticate_pair("k1", "nope"),
            Err(PairAuthError::BadSecret)
        );
        assert_eq!(
            reg.authenticate_pair("k9", "k1-secret"),
            Err(PairAuthError::UnknownKey)
        );
    }

    #[test]
    fn authenticates_by_key() {
        let reg = SourceRegistry::from_config(&[src("web", "k1", true), src("ios", "k2", false)])
            .expect("valid");
        assert!(reg.is_loaded());
        assert_eq!(&*reg.authenticate("k1").expect("known").id, "web");
        let ios = reg.authenticate("k2").expect("known");
        assert!(!ios.enabled);
        assert!(reg.authenticate("k3").is_none());
        assert!(reg.authenticate("k").is_none());
        assert!(reg.authenticate("").is_none());
        let ids: Vec<String> = reg.list().iter().map(|s| s.id.to_string()).collect();
        assert_eq!(ids, ["ios", "web"]);
        assert!(!format!("{reg:?}").contains("k1"));
    }

    #[test]
    fn rejects_bad_source_lists() {
        let mut bad_rate = src("a", "k", true);
        bad_rate.rate_limit_per_second = -1.0;
        for (sources, why) in [
            (vec![src("a", "k", true), src("a", "j", true)], "twice"),
            (vec![src("a", "k", true), src("b", "k", true)], "reuses"),
            (vec![src("a", "", true)], "empty write_key"),
            (vec![src("", "k", true)], "1 to 64 characters"),
            (vec![src("a:b", "k", true)], "letters, digits"),
            (vec![src("a.b", "k", true)], "letters, digits"),
            (vec![bad_rate], "rate_limit_per_second"),
        ] {
            let err = SourceRegistry::from_config(&sources).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn changes_apply_by_revision() {
        let reg = SourceRegistry::from_config(&[]).expect("valid");
        reg.await_bucket();
        assert!(!reg.is_loaded());
        let now = Utc::now();
        let mut rec = SourceRecord::from_config(&src("web", "k1", true), now);
        reg.replace_all(HashMap::new());
        assert!(reg.is_loaded());
        reg.apply("web", 5, Some(rec.clone()));
        assert!(reg.authenticate("k1").is_some());
        // An older revision (e.g. the watch catching up) changes nothing.
        rec.write_key_sha256 = sha256_hex(b"k2");
        reg.apply("web", 4, Some(rec.clone()));
        assert!(reg.authenticate("k1").is_some());
        assert!(reg.authenticate("k2").is_none());
        reg.apply("web", 6, Some(rec.clone()));
        assert!(reg.authenticate("k1").is_none());
        assert!(reg.authenticate("k2").is_some());
        reg.apply("web", 7, None);
        assert!(reg.authenticate("k2").is_none());
        reg.apply("web", 6, Some(rec));
        assert!(reg.authenticate("k2").is_none(), "a delete is not undone");
    }

    #[test]
    fn records_round_trip_without_plaintext_keys() {
        let mut s = src("web", "plain-key-1", true);
        s.atomic_publish = true;
        s.rate_limit_per_second = 50.0;
        s.rate_limit_burst = 100;
        let rec = SourceRecord::from_config(&s, Utc::now());
        let json = rec.to_json();
        let text = std::str::from_utf8(&json).expect("utf-8");
        assert!(!text.contains("plain-key-1"), "{text}");
        assert!(text.contains(r#""schema":1"#), "{text}");
        assert!(text.contains(r#""atomic_publish":true"#), "{text}");
        let back = SourceRecord::from_json(&json).expect("parses");
        assert_eq!(back, rec);
        assert_eq!(back.source().settings.rate_limit_burst, 100);
        let newer = text.replace(r#""schema":1"#, r#""schema":2"#);
        assert!(SourceRecord::from_json(newer.as_bytes()).is_err());
        // A changed config entry changes the digest; the same entry does not.
        let again = SourceRecord::from_config(&s, Utc::now());
        assert_eq!(again.config_sha256, rec.config_sha256);
        s.enabled = false;
        assert_ne!(
            SourceRecord::from_config(&s, Utc::now()).config_sha256,
            rec.config_sha256
        );
    }

    #[test]
    fn ids() {
        for ok in ["web", "ios-app", "a_b", "A1"] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a.b", "a b", "a*", "a>", "ü", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
