//! The consent in force per profile, as the processor records it in the `herald-consent`
//! bucket (key: profile id; value: the consent in force, or `merged_into` for a profile merged
//! into another), followed through [`herald_common::kvwatch::follow`] so that every send
//! attempt can check the person's current consent ([`crate::filter::ConsentPolicy::decide`]).
//!
//! The bucket is the processor's: the activator waits for it, and until it is loaded the
//! [`CONSENT_LOADED_CHECK`] readiness check is false and no destination delivers (a send
//! without the current state could reach a person who has since opted out). A change reaches
//! the cache within milliseconds of the processor writing it; a watch that breaks is restarted
//! with a full reload, which keeps the last known state meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt as _;
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::kvwatch::{Follower, follow};
use herald_common::nats::PROVISIONING_MAX_BACKOFF;
use herald_common::retry::Retry;
use herald_proto::v1::Consent;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::events;

/// The readiness check flipped once the consent bucket has been loaded.
pub const CONSENT_LOADED_CHECK: &str = "consent loaded";

/// The bucket's name under the topology's prefix (`herald-consent`).
const BUCKET: &str = "consent";

/// How many `merged_into` links are followed before giving up (a loop would be a bug of the
/// writer; the person is then treated as having no recorded consent beyond the snapshot).
const MAX_MERGE_HOPS: usize = 16;

/// A value of the consent bucket: the fields of the processor's record that the activator
/// reads (the processor's `ConsentRecord`; unknown fields are ignored).
#[derive(Debug, Deserialize)]
struct ConsentRecord {
    /// Set when the profile merged into another: follow it to the consent in force.
    #[serde(default)]
    merged_into: Option<String>,
    /// Purpose (lower case) to whether it is allowed.
    #[serde(default)]
    purposes: BTreeMap<String, bool>,
    /// The person opted out of everything.
    #[serde(default)]
    opted_out: bool,
}

/// What the cache holds for one profile.
#[derive(Debug, Clone, PartialEq)]
enum Known {
    /// The consent in force.
    Consent(Consent),
    /// The profile merged into this one.
    MergedInto(String),
}

impl Known {
    fn from_json(bytes: &[u8]) -> Result<Known, serde_json::Error> {
        let r: ConsentRecord = serde_json::from_slice(bytes)?;
        Ok(match r.merged_into {
            Some(into) if !into.is_empty() => Known::MergedInto(into),
            _ => Known::Consent(Consent {
                purposes: r.purposes.into_iter().collect(),
                opted_out: r.opted_out,
                updated_at: None,
            }),
        })
    }
}

#[derive(Default)]
struct State {
    /// Profile id to its last applied revision and what it holds (`None`: deleted).
    profiles: HashMap<String, (u64, Option<Known>)>,
}

/// The current consent per profile, shared by every delivery loop of this replica.
#[derive(Clone)]
pub(crate) struct ConsentCache {
    state: Arc<RwLock<State>>,
    loaded: watch::Sender<bool>,
}

impl Default for ConsentCache {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            loaded: watch::Sender::new(false),
        }
    }
}

impl ConsentCache {
    /// The consent in force for `profile_id`, following merges to the surviving profile;
    /// `None` when none is recorded.
    pub(crate) fn current(&self, profile_id: &str) -> Option<Consent> {
        let state = self.state.read().expect("consent cache lock");
        let mut id = profile_id;
        for _ in 0..MAX_MERGE_HOPS {
            match state.profiles.get(id) {
                Some((_, Some(Known::Consent(c)))) => return Some(c.clone()),
                Some((_, Some(Known::MergedInto(into)))) => id = into,
                _ => return None,
            }
        }
        tracing::warn!(
            profile = profile_id,
            "consent records merge into each other in a loop"
        );
        None
    }

    /// Waits until the bucket has been loaded once; false when `cancel` fired first.
    pub(crate) async fn wait_loaded(&self, cancel: &CancellationToken) -> bool {
        let mut loaded = self.loaded.subscribe();
        tokio::select! {
            _ = cancel.cancelled() => false,
            r = loaded.wait_for(|l| *l) => r.is_ok(),
        }
    }

    /// Applies one key's value at `revision`, unless a newer one was applied already.
    fn apply(&self, profile_id: &str, revision: u64, known: Option<Known>) {
        let mut state = self.state.write().expect("consent cache lock");
        match state.profiles.get(profile_id) {
            Some((seen, _)) if *seen >= revision => {}
            _ => {
                state
                    .profiles
                    .insert(profile_id.to_string(), (revision, known));
            }
        }
    }

    /// Replaces everything with a full load.
    fn replace(&self, profiles: HashMap<String, (u64, Option<Known>)>) {
        self.state.write().expect("consent cache lock").profiles = profiles;
    }
}

/// What a bucket entry holds: `None` for a delete or purge, and for an unreadable value
/// (logged; the profile then has no recorded consent beyond its events' snapshots).
fn known_of(entry: &kv::Entry) -> Option<Known> {
    if entry.operation != kv::Operation::Put {
        return None;
    }
    match Known::from_json(&entry.value) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(key = %entry.key, error = %e, "unreadable consent record; ignored");
            None
        }
    }
}

struct CacheFollower {
    cache: ConsentCache,
    ready: Readiness,
}

/// Consent records read at once while loading the bucket.
const LOAD_CONCURRENCY: usize = 64;

impl Follower for CacheFollower {
    async fn reload(&mut self, kv: &kv::Store) -> Result<(), String> {
        let mut keys = kv.keys().await.map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.map_err(|e| e.to_string())?);
        }
        // Many reads in flight at once: a bucket holds a record per person who ever stated
        // consent, and one round trip each would hold delivery back for minutes.
        let mut reads = futures_util::stream::iter(names)
            .map(|key| async move {
                let entry = kv.entry(key.as_str()).await;
                (key, entry)
            })
            .buffer_unordered(LOAD_CONCURRENCY);
        let mut loaded = HashMap::new();
        while let Some((key, entry)) = reads.next().await {
            if let Some(entry) = entry.map_err(|e| e.to_string())? {
                loaded.insert(key, (entry.revision, known_of(&entry)));
            }
        }
        let count = loaded.len();
        self.cache.replace(loaded);
        self.cache.loaded.send_replace(true);
        self.ready.set(CONSENT_LOADED_CHECK, true);
        tracing::info!(profiles = count, "consent loaded from the consent bucket");
        Ok(())
    }

    async fn changed(&mut self, entry: kv::Entry) {
        tracing::debug!(profile = %entry.key, revision = entry.revision, "consent changed");
        self.cache
            .apply(&entry.key, entry.revision, known_of(&entry));
    }
}

/// Keeps `cache` in step with the consent bucket until `cancel`: waits for the bucket (the
/// processor creates it), loads it (then flips [`CONSENT_LOADED_CHECK`]) and applies every
/// change the watch reports.
pub(crate) async fn run(
    cache: ConsentCache,
    js: jetstream::Context,
    topology: Topology,
    ready: Readiness,
    cancel: CancellationToken,
) {
    let name = topology.bucket(BUCKET);
    let Some(kv) = Retry::new(PROVISIONING_MAX_BACKOFF)
        .run(
            &cancel,
            || js.get_key_value(&name),
            |f| {
                events::WaitingForConsentBucket {
                    bucket: &name,
                    attempt: f.attempt,
                    error: f.error,
                }
                .emit()
            },
        )
        .await
    else {
        return;
    };
    let client = js.client();
    let mut follower = CacheFollower { cache, ready };
    follow(&kv, &client, ">", "consent", &mut follower, &cancel).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> Option<Known> {
        Some(Known::from_json(json.as_bytes()).expect("valid record"))
    }

    #[test]
    fn records_are_read_as_the_processor_writes_them() {
        let written = r#"{"schema_version":1,"profile_id":"p1","purposes":{"advertising":false,"analytics":true},"opted_out":false,"updated_at":"2026-11-20T10:00:00Z","profile_revision":7}"#;
        let Some(Known::Consent(c)) = record(written) else {
            panic!("a consent");
        };
        assert_eq!(c.purposes.get("advertising"), Some(&false));
        assert_eq!(c.purposes.get("analytics"), Some(&true));
        assert!(!c.opted_out);
        let merged = r#"{"schema_version":1,"profile_id":"p2","merged_into":"p1","purposes":{},"opted_out":false,"profile_revision":8}"#;
        assert_eq!(record(merged), Some(Known::MergedInto("p1".into())));
        assert!(Known::from_json(b"not json").is_err());
    }

    #[test]
    fn merges_are_followed_and_newer_revisions_win() {
        let cache = ConsentCache::default();
        let opted_out = Consent {
            opted_out: true,
            ..Default::default()
        };
        assert_eq!(cache.current("p1"), None);
        cache.apply("p1", 5, Some(Known::Consent(opted_out.clone())));
        cache.apply("p2", 6, Some(Known::MergedInto("p1".into())));
        cache.apply("p3", 7, Some(Known::MergedInto("p2".into())));
        assert_eq!(cache.current("p3"), Some(opted_out.clone()));
        // An older revision (the load and the watch overlap) changes nothing.
        cache.apply("p1", 4, Some(Known::Consent(Consent::default())));
        assert_eq!(cache.current("p1"), Some(opted_out));
        // A delete forgets the profile; a merge into nothing known has no consent.
        cache.apply("p1", 9, None);
        assert_eq!(cache.current("p3"), None);
        // A loop gives up.
        cache.apply("a", 10, Some(Known::MergedInto("b".into())));
        cache.apply("b", 11, Some(Known::MergedInto("a".into())));
        assert_eq!(cache.current("a"), None);
    }
}
