//! Sources and their write keys, stored in the config KV bucket (`<prefix>-config`, keys
//! `sources.<id>`, one JSON [`SourceRecord`] each) and watched by every ingest replica.
//!
//! - Only SHA-256 digests of write keys and mParticle secrets are stored; a presented key is
//!   hashed and compared with the stored digests in constant time.
//! - [`SourceRegistry`] is what request handling asks (`authenticate`, `authenticate_pair`). It
//!   is loaded from the bucket at start and then follows a KV watch, so a change made through any
//!   replica's control API reaches every replica within milliseconds.
//! - Sources in the config file (`ingest.sources`) are seeded into the bucket at start: created
//!   when missing, and written again whenever their config entry changes (the record keeps a
//!   digest of the entry it was seeded from). Changes made through the control API (a rotated
//!   key, a disabled source) therefore survive restarts until the config entry itself changes.
//!   A source deleted through the API but still in the config file comes back at the next start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::auth::{ct_eq, parse_sha256_hex, sha256, sha256_hex, to_hex};
use herald_common::nats::retry_until;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::SourceConfig;
use crate::error::IngestError;

/// The readiness check flipped once the sources have been loaded from the bucket.
pub const SOURCES_LOADED_CHECK: &str = "sources loaded";

/// Prefix of the sources' keys in the config bucket.
pub const KEY_PREFIX: &str = "sources.";

/// The schema version of [`SourceRecord`] this code writes; records of a newer version are
/// skipped (with a warning) rather than misread.
pub const SCHEMA_VERSION: u32 = 1;

/// Length of generated write keys (letters and digits: about 190 bits).
const GENERATED_KEY_CHARS: usize = 32;
/// Length of generated mParticle secrets.
const GENERATED_SECRET_CHARS: usize = 48;
/// Bounds of a chosen write key or secret.
const CHOSEN_MIN_CHARS: usize = 8;
const CHOSEN_MAX_CHARS: usize = 256;
/// Compare-and-set attempts before a concurrent-change error.
const CAS_ATTEMPTS: usize = 5;

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
    fn from_config(s: &SourceConfig, now: DateTime<Utc>) -> Self {
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

/// A write key and mParticle secret in plain text: returned once by create and rotate, never
/// stored.
#[derive(Clone)]
pub struct Credentials {
    /// The write key.
    pub write_key: String,
    /// The mParticle secret.
    pub write_secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials([redacted])")
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
struct Known {
    revision: u64,
    /// `None` once deleted (kept so an older revision cannot bring it back).
    record: Option<SourceRecord>,
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
    fn key_in_use(&self, digest: &[u8; 32], except_id: &str) -> bool {
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
    fn apply(&self, id: &str, revision: u64, record: Option<SourceRecord>) {
        let mut known = self.shared.known.lock().expect("registry lock");
        if known.get(id).is_some_and(|k| k.revision >= revision) {
            return;
        }
        known.insert(id.to_string(), Known { revision, record });
        self.rebuild(&known);
    }

    /// Replaces everything with a full load of the bucket and marks the registry loaded.
    fn replace_all(&self, loaded: HashMap<String, Known>) {
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

fn check_chosen(what: &str, value: &str, allow_colon: bool) -> Result<(), SourceError> {
    let n = value.chars().count();
    if !(CHOSEN_MIN_CHARS..=CHOSEN_MAX_CHARS).contains(&n) {
        return Err(SourceError::Invalid(format!(
            "a chosen {what} needs {CHOSEN_MIN_CHARS} to {CHOSEN_MAX_CHARS} characters; leave it out to have one generated"
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_graphic() && (allow_colon || b != b':'))
    {
        return Err(SourceError::Invalid(format!(
            "a chosen {what} must be printable ASCII without spaces{}",
            if allow_colon { "" } else { " or ':'" }
        )));
    }
    Ok(())
}

/// A random string of letters and digits.
pub fn generate_key(chars: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..chars)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Errors of the source operations behind the control API.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No source has this id.
    #[error("source {0:?} not found: `herald sources list` shows the existing ones")]
    NotFound(String),
    /// A source with this id exists already.
    #[error(
        "source {0:?} exists already: choose another id, or rotate its key with `herald sources rotate {0}`"
    )]
    AlreadyExists(String),
    /// The request cannot work.
    #[error("{0}")]
    Invalid(String),
    /// The chosen write key belongs to another source.
    #[error(
        "that write key is in use by another source: choose another, or leave it out to have one generated"
    )]
    KeyInUse,
    /// The bucket cannot be reached (yet).
    #[error(
        "the sources bucket is unavailable ({0}); retry once NATS is reachable and ingest is ready"
    )]
    Unavailable(String),
    /// The source kept changing concurrently.
    #[error("source {0:?} changed concurrently too often; retry")]
    Conflict(String),
}

fn unavailable(e: impl std::fmt::Display) -> SourceError {
    SourceError::Unavailable(e.to_string())
}

fn kv_key(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

/// What a new source is created with.
#[derive(Debug, Clone, Default)]
pub struct NewSource {
    /// Stable id: 1 to 64 letters, digits, `-` and `_`.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// A chosen write key (e.g. one an SDK already uses); generated when `None`.
    pub write_key: Option<String>,
    /// A chosen mParticle secret; generated when `None`.
    pub write_secret: Option<String>,
    /// Settings.
    pub settings: SourceSettings,
}

/// The sources in the config bucket: the operations of the control API. Until ingest has opened
/// the bucket, every operation fails with [`SourceError::Unavailable`].
#[derive(Clone)]
pub struct SourceStore {
    store: Arc<OnceLock<kv::Store>>,
    registry: SourceRegistry,
}

impl SourceStore {
    /// A store whose changes are also applied at once to `registry` (the watch confirms them).
    pub fn new(registry: SourceRegistry) -> Self {
        Self {
            store: Arc::new(OnceLock::new()),
            registry,
        }
    }

    fn kv(&self) -> Result<&kv::Store, SourceError> {
        self.store
            .get()
            .ok_or_else(|| SourceError::Unavailable("not opened yet".into()))
    }

    /// Creates a source; returns it with its write key and secret (shown once).
    pub async fn create(&self, new: NewSource) -> Result<(SourceRecord, Credentials), SourceError> {
        check_id(&new.id)
            .map_err(|why| SourceError::Invalid(format!("source {:?} {why}", new.id)))?;
        new.settings.validate().map_err(SourceError::Invalid)?;
        let creds = credentials(new.write_key, new.write_secret)?;
        let key_digest = sha256(creds.write_key.as_bytes());
        if self.registry.key_in_use(&key_digest, &new.id) {
            return Err(SourceError::KeyInUse);
        }
        let now = Utc::now();
        let record = SourceRecord {
            schema: SCHEMA_VERSION,
            id: new.id.clone(),
            name: new.name,
            enabled: true,
            write_key_sha256: to_hex(&key_digest),
            write_secret_sha256: Some(sha256_hex(creds.write_secret.as_bytes())),
            settings: new.settings,
            created_at: now,
            updated_at: now,
            config_sha256: None,
        };
        let kv = self.kv()?;
        let revision = kv
            .create(kv_key(&new.id), record.to_json())
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => SourceError::AlreadyExists(new.id.clone()),
                _ => unavailable(e),
            })?;
        self.registry
            .apply(&record.id, revision, Some(record.clone()));
        Ok((record, creds))
    }

    /// One source.
    pub async fn get(&self, id: &str) -> Result<SourceRecord, SourceError> {
        self.read(id).await.map(|(record, _)| record)
    }

    /// Every source, by id.
    pub async fn list(&self) -> Result<Vec<SourceRecord>, SourceError> {
        let loaded = load_all(self.kv()?).await.map_err(unavailable)?;
        let mut records: Vec<SourceRecord> =
            loaded.into_values().filter_map(|k| k.record).collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// Gives a source a new write key and secret (chosen or generated); the old ones stop
    /// working as soon as every replica has seen the change.
    pub async fn rotate(
        &self,
        id: &str,
        write_key: Option<String>,
        write_secret: Option<String>,
    ) -> Result<(SourceRecord, Credentials), SourceError> {
        let creds = credentials(write_key, write_secret)?;
        let key_digest = sha256(creds.write_key.as_bytes());
        if self.registry.key_in_use(&key_digest, id) {
            return Err(SourceError::KeyInUse);
        }
        let record = self
            .modify(id, |r| {
                r.write_key_sha256 = to_hex(&key_digest);
                r.write_secret_sha256 = Some(sha256_hex(creds.write_secret.as_bytes()));
            })
            .await?;
        Ok((record, creds))
    }

    /// Enables or disables a source; a disabled source's requests get 403.
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<SourceRecord, SourceError> {
        self.modify(id, |r| r.enabled = enabled).await
    }

    /// Deletes a source; its key stops working (401) once every replica has seen it.
    pub async fn delete(&self, id: &str) -> Result<(), SourceError> {
        let kv = self.kv()?;
        for _ in 0..CAS_ATTEMPTS {
            let (_, revision) = self.read(id).await?;
            match kv.delete_expect_revision(kv_key(id), Some(revision)).await {
                Ok(()) => {
                    // The delete marker's revision, so the local apply orders with the watch.
                    if let Ok(Some(e)) = kv.entry(kv_key(id)).await
                        && e.operation != kv::Operation::Put
                    {
                        self.registry.apply(id, e.revision, None);
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(SourceError::Conflict(id.to_string()))
    }

    async fn read(&self, id: &str) -> Result<(SourceRecord, u64), SourceError> {
        if check_id(id).is_err() {
            return Err(SourceError::NotFound(id.to_string()));
        }
        let entry = self
            .kv()?
            .entry(kv_key(id))
            .await
            .map_err(unavailable)?
            .filter(|e| e.operation == kv::Operation::Put)
            .ok_or_else(|| SourceError::NotFound(id.to_string()))?;
        let record = SourceRecord::from_json(&entry.value).map_err(|e| {
            SourceError::Invalid(format!("stored source {id:?} is unreadable: {e}"))
        })?;
        Ok((record, entry.revision))
    }

    /// Reads, changes and writes back a record with compare-and-set, retrying on conflicts.
    async fn modify(
        &self,
        id: &str,
        change: impl Fn(&mut SourceRecord),
    ) -> Result<SourceRecord, SourceError> {
        let kv = self.kv()?;
        for _ in 0..CAS_ATTEMPTS {
            let (mut record, revision) = self.read(id).await?;
            change(&mut record);
            record.schema = SCHEMA_VERSION;
            record.updated_at = Utc::now();
            match kv.update(kv_key(id), record.to_json(), revision).await {
                Ok(new_revision) => {
                    self.registry.apply(id, new_revision, Some(record.clone()));
                    return Ok(record);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(SourceError::Conflict(id.to_string()))
    }
}

fn credentials(
    write_key: Option<String>,
    write_secret: Option<String>,
) -> Result<Credentials, SourceError> {
    let write_key = match write_key.filter(|k| !k.is_empty()) {
        Some(k) => {
            check_chosen("write key", &k, false)?;
            k
        }
        None => generate_key(GENERATED_KEY_CHARS),
    };
    let write_secret = match write_secret.filter(|s| !s.is_empty()) {
        Some(s) => {
            check_chosen("write secret", &s, true)?;
            s
        }
        None => generate_key(GENERATED_SECRET_CHARS),
    };
    Ok(Credentials {
        write_key,
        write_secret,
    })
}

/// Opens the config bucket, creating it (history 1, `topology.replicas` replicas) when missing.
pub async fn open_bucket(
    js: &jetstream::Context,
    topology: &Topology,
) -> Result<kv::Store, String> {
    let name = topology.bucket("config");
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.clone(),
            description: "Herald: configuration (sources, ...), watched by every replica".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: topology.config().replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another replica may have created it meanwhile.
        Err(e) => js
            .get_key_value(&name)
            .await
            .map_err(|_| format!("cannot create bucket {name}: {e}")),
    }
}

/// Every source in the bucket, with its revision.
async fn load_all(kv: &kv::Store) -> Result<HashMap<String, Known>, String> {
    let mut keys = kv.keys().await.map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| e.to_string())?;
        if key.starts_with(KEY_PREFIX) {
            names.push(key);
        }
    }
    let mut loaded = HashMap::with_capacity(names.len());
    for key in names {
        let Some(entry) = kv.entry(key.as_str()).await.map_err(|e| e.to_string())? else {
            continue;
        };
        if let Some((id, known)) = known_from_entry(&entry) {
            loaded.insert(id, known);
        }
    }
    Ok(loaded)
}

/// The id and state of a bucket entry; `None` for keys that are not well-formed sources.
fn known_from_entry(entry: &kv::Entry) -> Option<(String, Known)> {
    let id = entry.key.strip_prefix(KEY_PREFIX)?.to_string();
    let record = match entry.operation {
        kv::Operation::Put => match SourceRecord::from_json(&entry.value) {
            Ok(r) if r.id == id => Some(r),
            Ok(r) => {
                tracing::warn!(key = %entry.key, id = %r.id, "source record's id does not match its key; ignored");
                None
            }
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "unreadable source record; ignored");
                None
            }
        },
        kv::Operation::Delete | kv::Operation::Purge => None,
    };
    Some((
        id,
        Known {
            revision: entry.revision,
            record,
        },
    ))
}

/// Writes the configured sources into the bucket: creates missing ones, rewrites those whose
/// config entry changed since they were last seeded, leaves the rest (and API changes) alone.
pub async fn seed(kv: &kv::Store, sources: &[SourceConfig]) -> Result<(), String> {
    for s in sources {
        let key = kv_key(&s.id);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let wanted = SourceRecord::from_config(s, Utc::now());
            let current = kv.entry(key.as_str()).await.map_err(|e| e.to_string())?;
            let result = match current.filter(|e| e.operation == kv::Operation::Put) {
                None => kv
                    .create(key.as_str(), wanted.to_json())
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists,
                            e.to_string(),
                        )
                    }),
                Some(entry) => {
                    let existing = SourceRecord::from_json(&entry.value).ok();
                    if existing.as_ref().and_then(|r| r.config_sha256.as_ref())
                        == wanted.config_sha256.as_ref()
                    {
                        break;
                    }
                    let record = SourceRecord {
                        created_at: existing.map_or(wanted.created_at, |r| r.created_at),
                        ..wanted
                    };
                    kv.update(key.as_str(), record.to_json(), entry.revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            (
                                e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                                e.to_string(),
                            )
                        })
                }
            };
            match result {
                Ok(()) => {
                    tracing::info!(source = %s.id, "source seeded from the config file");
                    break;
                }
                Err((true, _)) if attempts < CAS_ATTEMPTS => continue,
                Err((_, e)) => return Err(format!("seeding source {:?}: {e}", s.id)),
            }
        }
    }
    Ok(())
}

/// Keeps `store`'s registry in step with the bucket until `cancel`: opens (or creates) the
/// bucket, seeds the configured sources, loads everything (then flips the
/// [`SOURCES_LOADED_CHECK`] readiness check), and applies every change the watch reports. A
/// broken watch is restarted with a full reload; NATS being down only delays all this.
pub async fn sync(
    store: SourceStore,
    js: jetstream::Context,
    topology: Topology,
    seeds: Vec<SourceConfig>,
    readiness: Readiness,
    cancel: CancellationToken,
) {
    let Some(kv) = retry_until("opening the config bucket", &cancel, || {
        open_bucket(&js, &topology)
    })
    .await
    else {
        return;
    };
    let _ = store.store.set(kv.clone());
    if retry_until("seeding sources from the config file", &cancel, || {
        seed(&kv, &seeds)
    })
    .await
    .is_none()
    {
        return;
    }
    let registry = store.registry;
    let stats = js.client().statistics();
    loop {
        match watch_and_apply(&kv, &registry, &readiness, &stats, &cancel).await {
            Ok(Watched::Cancelled) => return,
            Ok(Watched::Reconnected) => {
                tracing::debug!("NATS reconnected: watching the sources anew");
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "the sources watch failed; reloading"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// How often the watch checks whether the client reconnected.
const RECONNECT_CHECK: Duration = Duration::from_millis(100);

/// How a watch ended without an error.
enum Watched {
    /// Shutdown.
    Cancelled,
    /// The client reconnected: watch anew at once.
    Reconnected,
}

async fn watch_and_apply(
    kv: &kv::Store,
    registry: &SourceRegistry,
    readiness: &Readiness,
    stats: &async_nats::Statistics,
    cancel: &CancellationToken,
) -> Result<Watched, String> {
    // A reconnect may mean a restarted server that lost the watch's ephemeral consumer (the
    // client would notice only after missed heartbeats, seconds later): then watch anew and
    // reload, which also picks up whatever changed meanwhile.
    let connects = stats.connects.load(Ordering::Relaxed);
    let mut reconnect_check = tokio::time::interval(RECONNECT_CHECK);
    // Watch first, then load: a change in between is in both, and revisions order them.
    let mut watch = kv
        .watch(format!("{KEY_PREFIX}*"))
        .await
        .map_err(|e| e.to_string())?;
    let loaded = load_all(kv).await?;
    let count = loaded.values().filter(|k| k.record.is_some()).count();
    registry.replace_all(loaded);
    readiness.set(SOURCES_LOADED_CHECK, true);
    tracing::info!(sources = count, "sources loaded from the config bucket");
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(Watched::Cancelled),
            _ = reconnect_check.tick() => {
                if stats.connects.load(Ordering::Relaxed) != connects {
                    return Ok(Watched::Reconnected);
                }
            }
            next = watch.next() => match next {
                Some(Ok(entry)) => {
                    if let Some((id, known)) = known_from_entry(&entry) {
                        tracing::debug!(source = %id, revision = known.revision, "source changed");
                        registry.apply(&id, known.revision, known.record);
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the watch ended".into()),
            },
        }
    }
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
    fn chosen_and_generated_credentials() {
        let c = credentials(None, None).expect("generated");
        assert_eq!(c.write_key.len(), GENERATED_KEY_CHARS);
        assert_eq!(c.write_secret.len(), GENERATED_SECRET_CHARS);
        assert!(c.write_key.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(
            credentials(None, None).expect("generated").write_key,
            c.write_key
        );
        let c =
            credentials(Some("my-chosen-key".into()), Some("sec:ret-123".into())).expect("chosen");
        assert_eq!(c.write_key, "my-chosen-key");
        for (key, secret) in [
            (Some("short"), None),
            (Some("has:colon-key"), None),
            (Some("has space key"), None),
            (None, Some("short")),
        ] {
            let err = credentials(key.map(str::to_string), secret.map(str::to_string));
            assert!(
                matches!(err, Err(SourceError::Invalid(_))),
                "{key:?} {secret:?}"
            );
        }
        assert!(!format!("{c:?}").contains("my-chosen-key"));
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
