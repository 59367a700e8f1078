//! The source store: the sources in the config bucket, changed through the control API
//! (create, rotate, enable, delete) with compare-and-set; each change is applied at once to the
//! local [`SourceRegistry`] (the watch of [`crate::source_sync`] confirms it and carries it to
//! the other replicas).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use async_nats::jetstream::kv;
use chrono::Utc;
use futures_util::StreamExt as _;
use herald_common::auth::{sha256, sha256_hex, to_hex};
use rand::Rng as _;

use crate::config::SourceSettings;
use crate::source_registry::{Known, SCHEMA_VERSION, SourceRecord, SourceRegistry, check_id};

/// Prefix of the sources' keys in the config bucket.
pub const KEY_PREFIX: &str = "sources.";

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

/// Length of generated write keys (letters and digits: about 190 bits).
const GENERATED_KEY_CHARS: usize = 32;
/// Length of generated mParticle secrets.
const GENERATED_SECRET_CHARS: usize = 48;
/// Bounds of a chosen write key or secret.
const CHOSEN_MIN_CHARS: usize = 8;
const CHOSEN_MAX_CHARS: usize = 256;
/// Compare-and-set attempts before a concurrent-change error.
pub(crate) const CAS_ATTEMPTS: usize = 5;

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

pub(crate) fn kv_key(id: &str) -> String {
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

    /// Hands the store its opened bucket; the operations work from then on.
    pub(crate) fn open(&self, kv: kv::Store) {
        let _ = self.store.set(kv);
    }

    /// The registry its changes are applied to.
    pub(crate) fn registry(&self) -> &SourceRegistry {
        &self.registry
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

/// Every source in the bucket, with its revision.
pub(crate) async fn load_all(kv: &kv::Store) -> Result<HashMap<String, Known>, String> {
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
pub(crate) fn known_from_entry(entry: &kv::Entry) -> Option<(String, Known)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
