//! The KV buckets the processor owns, their stored records, and typed compare-and-set access.
//!
//! | bucket | key | value |
//! | --- | --- | --- |
//! | `<prefix>-identities` | identity ([`IdentityKey::kv_key`]) | [`IdentityLink`] |
//! | `<prefix>-profiles` | profile id | [`Profile`] |
//! | `<prefix>-consent` | profile id | [`ConsentRecord`] |
//! | `<prefix>-suppressions` | identity | [`Suppression`] |
//! | `<prefix>-erasures` | request id | [`ErasureRecord`] (the audit trail) |

use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::{self, stream::StorageType};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use herald_common::Topology;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::identity::IdentityKey;

/// Schema version of identity, suppression and erasure records.
pub const RECORD_SCHEMA_VERSION: u32 = 1;

/// Errors of the profile store.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// A KV operation failed (NATS unavailable, timeout): retried.
    #[error("{bucket} bucket: {message}")]
    Kv {
        /// Which bucket.
        bucket: &'static str,
        /// What failed.
        message: String,
    },
    /// A stored value cannot be read (a newer schema, or corrupt): not retried.
    #[error("{bucket} bucket, key {key}: unreadable value: {message}")]
    Corrupt {
        /// Which bucket.
        bucket: &'static str,
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
    /// A write kept losing compare-and-set races: retried later.
    #[error("profile {0}: too many compare-and-set conflicts in a row")]
    Contended(String),
    /// The buckets are not provisioned yet.
    #[error("the profile store is not ready yet (the processor is still creating its KV buckets)")]
    NotReady,
}

impl ProfileError {
    /// Bounded metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ProfileError::Kv { .. } => "kv",
            ProfileError::Corrupt { .. } => "corrupt",
            ProfileError::Contended(_) => "contended",
            ProfileError::NotReady => "not_ready",
        }
    }

    /// Whether trying again later can succeed.
    pub fn retryable(&self) -> bool {
        !matches!(self, ProfileError::Corrupt { .. })
    }
}

/// A value of the identities bucket: which profile an identity belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityLink {
    /// Format version.
    pub schema_version: u32,
    /// The profile (possibly merged since: follow its redirect).
    pub profile_id: String,
    /// The identity.
    #[serde(flatten)]
    pub identity: IdentityKey,
    /// When it was linked (wall clock).
    pub linked_at: DateTime<Utc>,
}

impl IdentityLink {
    /// A link of identity `k` to profile `profile_id`, made now.
    pub fn new(k: &IdentityKey, profile_id: &str) -> Self {
        Self {
            schema_version: RECORD_SCHEMA_VERSION,
            profile_id: profile_id.to_string(),
            identity: k.clone(),
            linked_at: Utc::now(),
        }
    }
}

/// A value of the suppressions bucket: events naming this identity are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suppression {
    /// Format version.
    pub schema_version: u32,
    /// The suppressed identity.
    #[serde(flatten)]
    pub identity: IdentityKey,
    /// `erasure` or `suppress`.
    pub reason: String,
    /// The request that suppressed it; `Unsuppress` lifts every suppression of that request.
    pub request_id: String,
    /// When (wall clock).
    pub created_at: DateTime<Utc>,
}

/// The state of an erasure request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErasureState {
    /// Accepted, not finished.
    Pending,
    /// Every step done.
    Completed,
    /// A step failed; run the erasure again.
    Failed,
}

impl ErasureState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErasureState::Pending => "pending",
            ErasureState::Completed => "completed",
            ErasureState::Failed => "failed",
        }
    }
}

/// A value of the erasures bucket: the audit record of one erasure request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErasureRecord {
    /// Format version.
    pub schema_version: u32,
    /// The request id.
    pub request_id: String,
    /// What was requested: `erase` or `suppress`.
    #[serde(default = "erase_request")]
    pub request: String,
    /// The identity the request named.
    pub identity: IdentityKey,
    /// Where the request stands.
    pub state: ErasureState,
    /// The canonical profile erased, if the identity had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<String>,
    /// Every profile record deleted (the canonical one and those merged into it).
    #[serde(default)]
    pub erased_profiles: Vec<String>,
    /// Every identity unlinked and suppressed.
    #[serde(default)]
    pub identities: Vec<IdentityKey>,
    /// Erasure events published (one per processed partition of the profile's identities).
    #[serde(default)]
    pub events_published: u32,
    /// When the request arrived.
    pub requested_at: DateTime<Utc>,
    /// When it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn erase_request() -> String {
    "erase".into()
}

/// A decoded KV entry.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    /// The KV revision.
    pub revision: u64,
    /// The value.
    pub value: T,
    /// The stored bytes it was decoded from.
    pub raw: Bytes,
}

/// One bucket with typed access.
#[derive(Debug, Clone)]
pub struct Bucket {
    name: &'static str,
    kv: kv::Store,
}

/// The outcome of a compare-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    /// Written at this revision.
    Written(u64),
    /// Someone else wrote first (or the key exists, for a create).
    Conflict,
}

impl Bucket {
    fn err(&self, e: impl std::fmt::Display) -> ProfileError {
        ProfileError::Kv {
            bucket: self.name,
            message: e.to_string(),
        }
    }

    /// The underlying KV store.
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    /// The current value of `key` (`None` when absent or deleted).
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, ProfileError> {
        let entry = self.kv.entry(key).await.map_err(|e| self.err(e))?;
        let Some(entry) = entry else {
            return Ok(None);
        };
        if entry.operation != Operation::Put {
            return Ok(None);
        }
        let value = self.decode(key, &entry.value)?;
        Ok(Some(Versioned {
            revision: entry.revision,
            value,
            raw: entry.value,
        }))
    }

    /// Decodes a stored value.
    pub fn decode<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<T, ProfileError> {
        let corrupt = |message: String| ProfileError::Corrupt {
            bucket: self.name,
            key: key.to_string(),
            message,
        };
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if v.schema_version > RECORD_SCHEMA_VERSION.max(crate::profile::PROFILE_SCHEMA_VERSION) {
            return Err(corrupt(format!(
                "schema version {} is newer than this processor understands; upgrade it",
                v.schema_version
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))
    }

    /// Creates `key` only if it does not exist (or was deleted); also returns the bytes written.
    pub async fn create<T: Serialize>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(Cas, Bytes), ProfileError> {
        let bytes = encode(value);
        match self.kv.create(key, bytes.clone()).await {
            Ok(rev) => Ok((Cas::Written(rev), bytes)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok((Cas::Conflict, bytes)),
            Err(e) if lost_race(&e) => Ok((Cas::Conflict, bytes)),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Writes `key` only if its revision is still `revision`; also returns the bytes written.
    pub async fn update<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        revision: u64,
    ) -> Result<(Cas, Bytes), ProfileError> {
        let bytes = encode(value);
        match self.kv.update(key, bytes.clone(), revision).await {
            Ok(rev) => Ok((Cas::Written(rev), bytes)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision || lost_race(&e) => {
                Ok((Cas::Conflict, bytes))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Writes `key` unconditionally.
    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<u64, ProfileError> {
        self.kv
            .put(key, encode(value))
            .await
            .map_err(|e| self.err(e))
    }

    /// Removes `key` and its history.
    pub async fn purge(&self, key: &str) -> Result<(), ProfileError> {
        self.kv.purge(key).await.map_err(|e| self.err(e))
    }

    /// Removes `key` only if its revision is still `revision`.
    pub async fn purge_at(&self, key: &str, revision: u64) -> Result<Cas, ProfileError> {
        match self.kv.purge_expect_revision(key, Some(revision)).await {
            Ok(()) => Ok(Cas::Written(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision || lost_race(&e) => {
                Ok(Cas::Conflict)
            }
            Err(e) => Err(self.err(e)),
        }
    }
}

/// Whether a failed conditional write lost a race in a way async-nats does not classify: a
/// clustered stream can answer "wrong last sequence" with another error code (10164) while a
/// concurrent write to the subject is being applied. Trying again after a re-read is right.
fn lost_race(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains("wrong last sequence") {
            return true;
        }
        cur = err.source();
    }
    false
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("records serialise to JSON"))
}

/// Every bucket of the profile store.
#[derive(Debug, Clone)]
pub struct Store {
    /// Identity → profile id.
    pub identities: Bucket,
    /// Profile id → profile.
    pub profiles: Bucket,
    /// Profile id → consent in force.
    pub consent: Bucket,
    /// Identity → suppression.
    pub suppressions: Bucket,
    /// Request id → erasure audit record.
    pub erasures: Bucket,
}

impl Store {
    /// Creates (or updates) every bucket: file storage, the topology's replicas.
    pub async fn ensure(
        js: &jetstream::Context,
        topology: &Topology,
    ) -> Result<Self, ProfileError> {
        let replicas = topology.config().replicas;
        let make = |name: &'static str, history: i64, description: &str| {
            let cfg = kv::Config {
                bucket: topology.bucket(name),
                description: description.to_string(),
                history,
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            };
            async move {
                let kv =
                    js.create_or_update_key_value(cfg)
                        .await
                        .map_err(|e| ProfileError::Kv {
                            bucket: name,
                            message: e.to_string(),
                        })?;
                Ok::<_, ProfileError>(Bucket { name, kv })
            }
        };
        Ok(Self {
            identities: make(
                "identities",
                1,
                "Herald: identity graph (identity -> profile id), written by the processor",
            )
            .await?,
            profiles: make(
                "profiles",
                1,
                "Herald: profiles by id, written by the processor with compare-and-set",
            )
            .await?,
            consent: make(
                "consent",
                1,
                "Herald: consent in force per profile, written when it changes; watched by the activator",
            )
            .await?,
            suppressions: make(
                herald_common::suppressions::BUCKET,
                1,
                herald_common::suppressions::DESCRIPTION,
            )
            .await?,
            erasures: make(
                "erasures",
                5,
                "Herald: erasure requests and their status (audit trail)",
            )
            .await?,
        })
    }
}
