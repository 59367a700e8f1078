//! The KV sync of the sources: opens (or creates) the config bucket, seeds the sources of the
//! config file into it, loads every source into the [`SourceRegistry`] and follows the bucket's
//! watch until shutdown.
//!
//! Sources in the config file (`ingest.sources`) are seeded at start: created when missing, and
//! written again whenever their config entry changes (the record keeps a digest of the entry it
//! was seeded from). Changes made through the control API (a rotated key, a disabled source)
//! therefore survive restarts until the config entry itself changes. A source deleted through
//! the API but still in the config file comes back at the next start.

use async_nats::jetstream::{self, kv};
use chrono::Utc;
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::kvwatch::{self, Follower, follow};
use herald_common::nats::retry_until;
use tokio_util::sync::CancellationToken;

use crate::config::SourceConfig;
use crate::source_registry::{SourceRecord, SourceRegistry};
use crate::source_store::{
    CAS_ATTEMPTS, KEY_PREFIX, SourceStore, known_from_entry, kv_key, load_all,
};

/// The readiness check flipped once the sources have been loaded from the bucket.
pub const SOURCES_LOADED_CHECK: &str = "sources loaded";

/// Opens the config bucket, creating it when missing
/// ([`herald_common::nats::open_config_bucket`]).
pub async fn open_bucket(
    js: &jetstream::Context,
    topology: &Topology,
) -> Result<kv::Store, String> {
    herald_common::nats::open_config_bucket(js, topology).await
}

/// Writes the configured sources into the bucket: creates missing ones, rewrites those whose
/// config entry changed since they were last seeded, leaves the rest (and API changes) alone.
pub async fn seed(kv: &kv::Store, sources: &[SourceConfig]) -> Result<(), String> {
    for s in sources {
        let written = kvwatch::seed(kv, &kv_key(&s.id), CAS_ATTEMPTS, |stored| {
            let wanted = SourceRecord::from_config(s, Utc::now());
            let Some(stored) = stored else {
                return Some(wanted.to_json());
            };
            let existing = SourceRecord::from_json(stored).ok();
            if existing.as_ref().and_then(|r| r.config_sha256.as_ref())
                == wanted.config_sha256.as_ref()
            {
                return None;
            }
            let record = SourceRecord {
                created_at: existing.map_or(wanted.created_at, |r| r.created_at),
                ..wanted
            };
            Some(record.to_json())
        })
        .await
        .map_err(|e| format!("seeding source {:?}: {e}", s.id))?;
        if written {
            tracing::info!(source = %s.id, "source seeded from the config file");
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
    store.open(kv.clone());
    if retry_until("seeding sources from the config file", &cancel, || {
        seed(&kv, &seeds)
    })
    .await
    .is_none()
    {
        return;
    }
    let mut follower = Follow {
        registry: store.registry().clone(),
        readiness,
    };
    follow(
        &kv,
        &js.client(),
        &format!("{KEY_PREFIX}*"),
        "sources",
        &mut follower,
        &cancel,
    )
    .await;
}

/// The registry's side of the watch.
struct Follow {
    registry: SourceRegistry,
    readiness: Readiness,
}

impl Follower for Follow {
    async fn reload(&mut self, kv: &kv::Store) -> Result<(), String> {
        let loaded = load_all(kv).await?;
        let count = loaded.values().filter(|k| k.record.is_some()).count();
        self.registry.replace_all(loaded);
        self.readiness.set(SOURCES_LOADED_CHECK, true);
        tracing::info!(sources = count, "sources loaded from the config bucket");
        Ok(())
    }

    async fn changed(&mut self, entry: kv::Entry) {
        if let Some((id, known)) = known_from_entry(&entry) {
            tracing::debug!(source = %id, revision = known.revision, "source changed");
            self.registry.apply(&id, known.revision, known.record);
        }
    }
}
