//! The destination store: the destinations in the config bucket (`destinations.<id>`), changed
//! through the control API with compare-and-set. Every replica follows the changes through the
//! watch of [`crate::live`]; nothing here starts or stops delivery.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use async_nats::jetstream::kv;
use chrono::Utc;
use futures_util::StreamExt as _;

use crate::config::DestinationConfig;
use crate::destinations::{NetworkGuard, Sender};
use crate::record::{DestinationRecord, MASK, SCHEMA_VERSION, check_id, is_secret};

/// Prefix of the destinations' keys in the config bucket.
pub const KEY_PREFIX: &str = "destinations.";

/// Compare-and-set attempts before a concurrent-change error.
const CAS_ATTEMPTS: usize = 5;

/// Errors of the destination operations behind the control API.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// No destination has this id.
    #[error("destination {0:?} not found: `herald destinations list` shows the existing ones")]
    NotFound(String),
    /// A destination with this id exists already.
    #[error(
        "destination {0:?} exists already: choose another id, or change it with `herald destinations update {0}`"
    )]
    AlreadyExists(String),
    /// The destination cannot work.
    #[error("{0}")]
    Invalid(String),
    /// The bucket cannot be reached (yet).
    #[error(
        "the destinations bucket is unavailable ({0}); retry once NATS is reachable and the activator is ready"
    )]
    Unavailable(String),
    /// The destination kept changing concurrently.
    #[error("destination {0:?} changed concurrently too often; retry")]
    Conflict(String),
}

fn unavailable(e: impl std::fmt::Display) -> DestinationError {
    DestinationError::Unavailable(e.to_string())
}

pub(crate) fn kv_key(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

/// The destinations in the config bucket. Until the activator has opened the bucket, every
/// operation fails with [`DestinationError::Unavailable`].
#[derive(Clone)]
pub struct DestinationStore {
    store: Arc<OnceLock<kv::Store>>,
    guard: Arc<NetworkGuard>,
}

impl DestinationStore {
    /// A store whose webhook URLs are checked by `guard` before they are written.
    pub fn new(guard: Arc<NetworkGuard>) -> Self {
        Self {
            store: Arc::new(OnceLock::new()),
            guard,
        }
    }

    /// Hands the store its opened bucket; the operations work from then on.
    pub(crate) fn open(&self, kv: kv::Store) {
        let _ = self.store.set(kv);
    }

    fn kv(&self) -> Result<&kv::Store, DestinationError> {
        self.store
            .get()
            .ok_or_else(|| DestinationError::Unavailable("not opened yet".into()))
    }

    /// Refuses a record that cannot work: [`DestinationRecord::check`] plus the SSRF guard's
    /// check of a webhook URL.
    pub async fn validate(&self, record: &DestinationRecord) -> Result<(), DestinationError> {
        Sender::new(record, &self.guard)
            .await
            .map(drop)
            .map_err(DestinationError::Invalid)
    }

    /// Creates a destination from `spec` (its `created_at` is now, which `start = now` means).
    pub async fn create(
        &self,
        spec: &DestinationConfig,
    ) -> Result<DestinationRecord, DestinationError> {
        let mut record = spec.to_record(Utc::now());
        if record.settings.0.values().any(|v| v == MASK) {
            return Err(DestinationError::Invalid(format!(
                "a setting's value cannot be {MASK:?}, which stands for a hidden secret"
            )));
        }
        self.validate(&record).await?;
        let kv = self.kv()?;
        record.revision = kv
            .create(kv_key(&record.id), record.to_json())
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => {
                    DestinationError::AlreadyExists(record.id.clone())
                }
                _ => unavailable(e),
            })?;
        Ok(record)
    }

    /// Replaces a destination's definition with `spec`, keeping its creation time, paused flag
    /// and seeding digest. A secret setting given as `***` (as `get` shows it) keeps its stored
    /// value.
    pub async fn update(
        &self,
        spec: &DestinationConfig,
    ) -> Result<DestinationRecord, DestinationError> {
        self.modify(&spec.id, true, |current| {
            let mut next = spec.to_record(current.created_at);
            next.paused = current.paused;
            next.config_sha256 = current.config_sha256.clone();
            let mut kept = BTreeMap::new();
            for (k, v) in &next.settings.0 {
                if v == MASK {
                    match current.settings.0.get(k) {
                        Some(old) if is_secret(k) => {
                            kept.insert(k.clone(), old.clone());
                        }
                        _ => {
                            return Err(DestinationError::Invalid(format!(
                                "setting {k:?} is {MASK:?} but no secret of that name is stored: give its value"
                            )));
                        }
                    }
                }
            }
            next.settings.0.extend(kept);
            *current = next;
            Ok(())
        })
        .await
    }

    /// Pauses or resumes a destination.
    pub async fn set_paused(
        &self,
        id: &str,
        paused: bool,
    ) -> Result<DestinationRecord, DestinationError> {
        self.modify(id, false, |r| {
            r.paused = paused;
            Ok(())
        })
        .await
    }

    /// One destination (secrets in clear: mask before showing).
    pub async fn get(&self, id: &str) -> Result<DestinationRecord, DestinationError> {
        self.read(id).await
    }

    /// Every destination, by id (secrets in clear: mask before showing).
    pub async fn list(&self) -> Result<Vec<DestinationRecord>, DestinationError> {
        let mut records: Vec<DestinationRecord> = load_all(self.kv()?)
            .await
            .map_err(unavailable)?
            .into_values()
            .flatten()
            .collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// Deletes a destination; every replica stops it and its consumer is deleted.
    pub async fn delete(&self, id: &str) -> Result<(), DestinationError> {
        let kv = self.kv()?;
        for _ in 0..CAS_ATTEMPTS {
            let current = self.read(id).await?;
            match kv
                .delete_expect_revision(kv_key(id), Some(current.revision))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(DestinationError::Conflict(id.to_string()))
    }

    async fn read(&self, id: &str) -> Result<DestinationRecord, DestinationError> {
        if check_id(id).is_err() {
            return Err(DestinationError::NotFound(id.to_string()));
        }
        let entry = self
            .kv()?
            .entry(kv_key(id))
            .await
            .map_err(unavailable)?
            .filter(|e| e.operation == kv::Operation::Put)
            .ok_or_else(|| DestinationError::NotFound(id.to_string()))?;
        let mut record = DestinationRecord::from_json(&entry.value).map_err(|e| {
            DestinationError::Invalid(format!("stored destination {id:?} is unreadable: {e}"))
        })?;
        record.revision = entry.revision;
        Ok(record)
    }

    /// Reads, changes, validates (when `check`) and writes back a record with compare-and-set,
    /// retrying on conflicts.
    async fn modify(
        &self,
        id: &str,
        check: bool,
        change: impl Fn(&mut DestinationRecord) -> Result<(), DestinationError>,
    ) -> Result<DestinationRecord, DestinationError> {
        let kv = self.kv()?;
        for _ in 0..CAS_ATTEMPTS {
            let mut record = self.read(id).await?;
            let revision = record.revision;
            change(&mut record)?;
            if check {
                self.validate(&record).await?;
            }
            record.schema = SCHEMA_VERSION;
            record.updated_at = Utc::now();
            match kv.update(kv_key(id), record.to_json(), revision).await {
                Ok(new_revision) => {
                    record.revision = new_revision;
                    return Ok(record);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(DestinationError::Conflict(id.to_string()))
    }
}

/// Every destination key in the bucket: `Some(record)` for a readable one, `None` for a deleted
/// or unreadable one (with a warning).
pub(crate) async fn load_all(
    kv: &kv::Store,
) -> Result<BTreeMap<String, Option<DestinationRecord>>, String> {
    let mut keys = kv.keys().await.map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| e.to_string())?;
        if key.starts_with(KEY_PREFIX) {
            names.push(key);
        }
    }
    let mut loaded = BTreeMap::new();
    for key in names {
        let Some(entry) = kv.entry(key.as_str()).await.map_err(|e| e.to_string())? else {
            continue;
        };
        if let Some((id, record)) = from_entry(&entry) {
            loaded.insert(id, record);
        }
    }
    Ok(loaded)
}

/// The id and record of a bucket entry (`None` when deleted or unreadable); `None` for keys
/// that are not destinations.
pub(crate) fn from_entry(entry: &kv::Entry) -> Option<(String, Option<DestinationRecord>)> {
    let id = entry.key.strip_prefix(KEY_PREFIX)?.to_string();
    let record = match entry.operation {
        kv::Operation::Put => match DestinationRecord::from_json(&entry.value) {
            Ok(mut r) if r.id == id => {
                r.revision = entry.revision;
                Some(r)
            }
            Ok(r) => {
                tracing::warn!(key = %entry.key, id = %r.id, "destination record's id does not match its key; ignored");
                None
            }
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "unreadable destination record; ignored");
                None
            }
        },
        kv::Operation::Delete | kv::Operation::Purge => None,
    };
    Some((id, record))
}

/// The digest of a config-file entry, kept in the record it seeds: a changed entry is written
/// again at the next start, an unchanged one leaves API changes (a pause) alone.
fn config_digest(d: &DestinationConfig) -> String {
    let mut r = d.to_record(chrono::DateTime::UNIX_EPOCH);
    r.created_at = chrono::DateTime::UNIX_EPOCH;
    r.updated_at = chrono::DateTime::UNIX_EPOCH;
    herald_common::auth::sha256_hex(&r.to_json())
}

/// Writes the configured destinations into the bucket: creates missing ones, rewrites those
/// whose config entry changed since they were last seeded (keeping their creation time and
/// paused flag), leaves the rest alone.
pub async fn seed(kv: &kv::Store, destinations: &[DestinationConfig]) -> Result<(), String> {
    for d in destinations {
        let digest = config_digest(d);
        let written = herald_common::kvwatch::seed(kv, &kv_key(&d.id), CAS_ATTEMPTS, |stored| {
            let mut wanted = d.to_record(Utc::now());
            wanted.config_sha256 = Some(digest.clone());
            if let Some(stored) = stored {
                let existing = DestinationRecord::from_json(stored).ok();
                if existing.as_ref().and_then(|r| r.config_sha256.as_ref()) == Some(&digest) {
                    return None;
                }
                if let Some(e) = existing {
                    wanted.created_at = e.created_at;
                    wanted.paused = e.paused;
                }
            }
            Some(wanted.to_json())
        })
        .await
        .map_err(|e| format!("seeding destination {:?}: {e}", d.id))?;
        if written {
            tracing::info!(destination = %d.id, "destination seeded from the config file");
        }
    }
    Ok(())
}
