//! Identity resolution and profile updates over KV, by compare-and-set only.
//!
//! For each event: read which profile each of its identities belongs to (following merge
//! redirects), plan with [`identity::plan`], then carry the plan out: create a profile, merge
//! profiles (the older survives; the other becomes a redirect), link identities, and apply the
//! event to the profile. An event that changes nothing in the identity graph comes back
//! applied in memory, unwritten: `group` writes a run of such events of one key with one
//! compare-and-set. Every write is a compare-and-set against the KV revision; a conflict
//! re-reads and starts the event's resolution again. Nothing relies on which replica or
//! partition touches a profile, so two partitions can merge the same profiles concurrently.
//!
//! A merge is crash-safe: the merged profile first becomes a redirect that still holds its
//! data, then its data is folded into the survivor (idempotently: the survivor lists what it
//! absorbed), then the redirect drops its data. Whoever follows a redirect that still holds
//! data finishes the fold.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::nats::retry_until;
use herald_proto::v1::{Event, ProcessedEvent};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::cache::HotCache;
use crate::consent::ConsentRecord;
use crate::events;
use crate::identity::{self, ANONYMOUS_ID, Guard, IdentityKey, PlanProfile, USER_ID};
use crate::profile::Profile;
use crate::profiles_config::ProfilesConfig;
use crate::store::{Cas, IdentityLink, ProfileError, Store};
use crate::timestamp::event_time;
use herald_common::suppressions::Suppressions;

/// Longest redirect chain followed before giving up (chains are short: every follow shortens
/// the identity mappings it passes).
const MAX_HOPS: usize = 32;

/// The readiness check this module sets.
pub const READY_CHECK: &str = "profile store";

/// What processing one event produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Publish these, in order: the processed event, then a consent-changed event when the
    /// event changed the profile's consent.
    Publish(Vec<ProcessedEvent>),
    /// Published already, while its profile was written (see [`crate::KeyEvents::publish_early`]).
    Published,
    /// The event names a suppressed identity: drop it.
    Suppressed,
}

/// A profile read from KV (or the cache) at a revision.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub revision: u64,
    pub profile: Arc<Profile>,
    /// Read from the hot cache (it may be stale) rather than from KV or a write.
    pub from_cache: bool,
}

/// The profile store of one processor replica: KV buckets, hot cache, guard rails and the
/// suppression list. Shared by the worker, the gRPC ProfileService and the HTTP profile API.
pub struct Profiles {
    pub(crate) store: OnceCell<Store>,
    pub(crate) cache: HotCache,
    pub(crate) guard: Guard,
    pub(crate) cfg: ProfilesConfig,
    pub(crate) suppressions: Arc<Suppressions>,
    pub(crate) speculation: Speculation,
    pub(crate) js: jetstream::Context,
    pub(crate) topology: Topology,
}

impl std::fmt::Debug for Profiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiles")
            .field("ready", &self.store.initialized())
            .field("cache", &self.cache)
            .finish()
    }
}

impl Profiles {
    /// A store over `js`; [`Profiles::run`] provisions it.
    pub fn new(js: jetstream::Context, topology: Topology, cfg: ProfilesConfig) -> Arc<Self> {
        Arc::new(Self {
            store: OnceCell::new(),
            cache: HotCache::new(cfg.cache_max_bytes),
            guard: Guard::new(&cfg),
            cfg,
            suppressions: Arc::new(Suppressions::default()),
            speculation: Speculation::default(),
            js,
            topology,
        })
    }

    /// Provisions the buckets (retrying until NATS answers or `cancel` fires), then keeps the
    /// suppression list current until `cancel`; flips the `profile store` readiness check once
    /// both are there. The service runs it as one of its supervised tasks.
    pub async fn run(self: Arc<Self>, ready: Readiness, cancel: CancellationToken) {
        ready.set(READY_CHECK, false);
        let Some(store) = retry_until("creating the profile buckets", &cancel, || {
            Store::ensure(&self.js, &self.topology)
        })
        .await
        else {
            return;
        };
        let _ = self.store.set(store.clone());
        let watcher = Suppressions::watch(
            self.suppressions.clone(),
            store.suppressions.kv().clone(),
            cancel.clone(),
        );
        let loaded = async {
            if self.suppressions.wait_loaded(&cancel).await {
                ready.set(READY_CHECK, true);
                tracing::info!("profile store ready");
            }
        };
        tokio::join!(watcher, loaded);
    }

    /// Provisions the buckets and loads the suppression list, waiting for both (tests and tools
    /// that use a store without a running processor).
    pub async fn open(
        js: jetstream::Context,
        topology: Topology,
        cfg: ProfilesConfig,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ProfileError> {
        let this = Self::new(js, topology, cfg);
        let store = Store::ensure(&this.js, &this.topology).await?;
        let _ = this.store.set(store.clone());
        tokio::spawn(Suppressions::watch(
            this.suppressions.clone(),
            store.suppressions.kv().clone(),
            cancel.clone(),
        ));
        if !this.suppressions.wait_loaded(&cancel).await {
            return Err(ProfileError::NotReady);
        }
        Ok(this)
    }

    /// The buckets, once provisioned and the suppression list is loaded.
    pub(crate) fn store(&self) -> Result<&Store, ProfileError> {
        match self.store.get() {
            Some(s) if self.suppressions.is_loaded() => Ok(s),
            _ => Err(ProfileError::NotReady),
        }
    }

    /// Forgets every cached profile (e.g. when this replica gives up partitions).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// What `event` names before its profile is looked for: whether it is dropped (a
    /// suppressed identity), has no usable identity, or its identities in priority order.
    pub(crate) async fn prepare(
        &self,
        store: &Store,
        event: &Event,
    ) -> Result<Prepared, ProfileError> {
        let extracted = identity::extract(event, &self.guard);
        events::IdentitiesBlocked {
            count: extracted.blocked,
        }
        .emit();
        let mut ids = extracted.identities;
        if let Some(prev) = &extracted.alias_previous {
            let candidates = [
                IdentityKey::new(USER_ID, prev),
                IdentityKey::new(ANONYMOUS_ID, prev),
            ];
            if candidates
                .iter()
                .any(|k| self.suppressions.contains(&k.kv_key()))
            {
                return Ok(Prepared::Suppressed);
            }
            // A previous id is whichever identity is known: a user id, else an anonymous id.
            let mut chosen = candidates[1].clone();
            for k in &candidates {
                if self.mapped_profile(store, k, false).await?.is_some() {
                    chosen = k.clone();
                    break;
                }
            }
            ids.push(chosen);
            self.guard.sort(&mut ids);
        }
        if ids.iter().any(|k| self.suppressions.contains(&k.kv_key())) {
            return Ok(Prepared::Suppressed);
        }
        if ids.is_empty() {
            return Ok(Prepared::Unresolved);
        }
        Ok(Prepared::Identified {
            ids,
            explicit: extracted.alias_previous.is_some(),
            at: event_time(event),
        })
    }

    /// Before attempt `attempt` (from 1) of work that lost a compare-and-set race: gives up
    /// past `cas_max_attempts` (`Contended`, naming `what`), counts a retry, and from the
    /// fourth attempt waits a few random milliseconds to spread concurrent writers of one
    /// profile apart.
    pub(crate) async fn before_attempt(
        &self,
        attempt: u32,
        what: impl FnOnce() -> String,
    ) -> Result<(), ProfileError> {
        if attempt > self.cfg.cas_max_attempts.max(1) {
            return Err(ProfileError::Contended(what()));
        }
        if attempt > 1 {
            events::CasRetried.emit();
            if attempt > 3 {
                let ms = rand::random_range(1..=(attempt as u64).min(20));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        Ok(())
    }

    /// Looks a profile up by identity, reading KV (never the cache): the canonical profile and
    /// its revision, or `None`.
    pub async fn lookup(&self, key: &IdentityKey) -> Result<Option<(u64, Profile)>, ProfileError> {
        let store = self.store()?;
        let mut seen = BTreeMap::new();
        let Some(id) = self.mapped_profile(store, key, true).await? else {
            return Ok(None);
        };
        let Some(canonical) = self.canonical(store, &id, true, &mut seen).await? else {
            return Ok(None);
        };
        Ok(seen
            .remove(&canonical)
            .map(|l| (l.revision, (*l.profile).clone())))
    }

    /// Resolves the event's profile and applies the event to it. The graph changes (a new
    /// profile, merges, links) are written at once; an event that changes nothing but the
    /// profile itself comes back unwritten (`Applied::written` false) for the caller to write
    /// with the events that follow it. `None`: the event is to be dropped.
    pub(crate) async fn resolve_and_apply(
        &self,
        store: &Store,
        event: &Event,
        ids: &[IdentityKey],
        explicit: bool,
        at: DateTime<Utc>,
    ) -> Result<Option<Applied>, ProfileError> {
        let mut fresh = false;
        // Set once the event is applied to a profile (with whether that changed its consent)
        // while the identity graph is not complete yet: a retry must not apply it again to
        // that profile, or to one that absorbed it.
        let mut applied: Option<(String, bool)> = None;
        if !explicit && self.speculation.should_try(ids, &self.cache) {
            // No identity of the event is known here: most likely a new person. Create the
            // profile and link its identities straight away; a link that exists already
            // undoes it (one wasted write), and the event is resolved the long way.
            let links = identity::plan(
                &ids.iter().map(|k| (k.clone(), None)).collect::<Vec<_>>(),
                &BTreeMap::new(),
                &self.guard,
                false,
            )
            .link;
            match self.create_profile(store, event, &links, at).await? {
                Created::Done(done) => {
                    self.speculation.record(true);
                    return Ok(Some(done));
                }
                Created::Undone => {
                    self.speculation.record(false);
                    fresh = true;
                }
                Created::Partial(id, changed) => {
                    self.speculation.record(false);
                    applied = Some((id, changed));
                    fresh = true;
                }
            }
        }
        let mut attempt = 0u32;
        'attempt: loop {
            attempt += 1;
            self.before_attempt(attempt, || {
                ids.first().map(ToString::to_string).unwrap_or_default()
            })
            .await?;
            let mut loaded: BTreeMap<String, Loaded> = BTreeMap::new();
            let mut lookups = Vec::with_capacity(ids.len());
            let mut used_cache = false;
            for key in ids {
                let (canonical, cached) = self
                    .resolve_identity(store, key, fresh, &mut loaded)
                    .await?;
                used_cache |= cached;
                lookups.push((key.clone(), canonical));
            }
            used_cache |= loaded.values().any(|l| l.from_cache);
            let plan = match steady(&lookups, &loaded) {
                Some(id) => identity::Plan {
                    group: vec![id.to_string()],
                    ..Default::default()
                },
                None => {
                    let plan_profiles: BTreeMap<String, PlanProfile> = loaded
                        .iter()
                        .map(|(id, l)| {
                            (
                                id.clone(),
                                PlanProfile {
                                    identities: l.profile.identity_set(),
                                },
                            )
                        })
                        .collect();
                    identity::plan(&lookups, &plan_profiles, &self.guard, explicit)
                }
            };
            if !plan.is_steady() && !fresh && used_cache {
                // The graph changes: decide on what KV says, not on the cache.
                fresh = true;
                attempt -= 1;
                continue;
            }
            for (_, why) in &plan.skipped {
                events::IdentitySkipped {
                    reason: why.label(),
                }
                .emit();
            }

            // The survivor: the oldest of the group, or a new profile.
            let mut group: Vec<Loaded> = plan
                .group
                .iter()
                .filter_map(|id| loaded.get(id).cloned())
                .collect();
            if group.is_empty() {
                // Whatever held the event before is gone (erased meanwhile): apply it anew.
                applied = None;
                match self.create_profile(store, event, &plan.link, at).await? {
                    Created::Done(done) => return Ok(Some(done)),
                    Created::Undone => continue 'attempt,
                    Created::Partial(id, changed) => {
                        applied = Some((id, changed));
                        continue 'attempt;
                    }
                }
            }
            group.sort_by(|a, b| a.profile.rank().cmp(&b.profile.rank()));
            let mut survivor = group.remove(0);
            // The survivor's effective consent before this event touched it, to detect a
            // change.
            let before: Effective = survivor.profile.consent.effective();

            // Merge the younger profiles into the survivor.
            let merges = !group.is_empty();
            for loser in group {
                match self.merge(store, loser, &survivor.profile.id).await? {
                    Some(s) => survivor = s,
                    None => continue 'attempt,
                }
            }
            if survivor.profile.merged_into.is_some() {
                continue 'attempt;
            }

            // One write: the new identities listed on the profile (where the limits are
            // enforced by compare-and-set) and the event applied; then the identity graph.
            let done_before = applied.as_ref().and_then(|(id, changed)| {
                (survivor.profile.id == *id || survivor.profile.merged_from.contains(id))
                    .then_some(*changed)
            });
            let mut p = (*survivor.profile).clone();
            let mut to_map = Vec::new();
            for k in &plan.link {
                if p.identities.contains(k) {
                    to_map.push(k.clone());
                    continue;
                }
                let n = p.identities.iter().filter(|i| i.kind == k.kind).count();
                if explicit || n < self.guard.limit(&k.kind) {
                    p.identities.push(k.clone());
                    to_map.push(k.clone());
                } else {
                    events::IdentitySkipped {
                        reason: identity::Skip::Limit.label(),
                    }
                    .emit();
                }
            }
            let listed_more = p.identities.len() != survivor.profile.identities.len();
            let consent_changed = match done_before {
                Some(changed) => changed,
                None => apply_event(&mut p, event, at, &before),
            };
            if done_before.is_none() && !merges && !listed_more && to_map.is_empty() {
                // Nothing in the graph changes: the caller writes the profile.
                return Ok(Some(Applied {
                    loaded: Loaded {
                        profile: Arc::new(p),
                        ..survivor
                    },
                    consent_changed,
                    written: false,
                }));
            }
            if done_before.is_none() || listed_more {
                p.updated_at = Utc::now();
                match self.write_profile(store, p, survivor.revision).await? {
                    Some(l) => survivor = l,
                    None => continue 'attempt,
                }
                applied = Some((survivor.profile.id.clone(), consent_changed));
            }
            for k in &to_map {
                if !self.link_identity(store, k, &survivor.profile.id).await? {
                    // Someone linked it elsewhere first: take it off this profile and plan
                    // again (now as a merge, or a skip); the event stays applied.
                    self.unlist_identity(store, &survivor.profile.id, k).await?;
                    continue 'attempt;
                }
            }
            return Ok(Some(Applied {
                loaded: survivor,
                consent_changed,
                written: true,
            }));
        }
    }

    /// Creates a profile for `event` holding identities `links` with the event applied (one
    /// write), then maps all the identities to it at once (one more round trip). When one is
    /// mapped already, the profile is deleted again (and the links just made); if someone
    /// reached the profile meanwhile, it stays, without the identities it lost, holding the
    /// event.
    async fn create_profile(
        &self,
        store: &Store,
        event: &Event,
        links: &[IdentityKey],
        at: DateTime<Utc>,
    ) -> Result<Created, ProfileError> {
        let id = new_profile_id();
        let mut p = Profile::new(id.clone(), at);
        let before: Effective = p.consent.effective();
        p.identities = links.to_vec();
        let changed = apply_event(&mut p, event, at, &before);
        let revision = match store.profiles.create(&id, &p).await? {
            (Cas::Written(rev), bytes) => {
                events::ProfileWritten.emit();
                self.cache.put_profile(&id, rev, &bytes);
                rev
            }
            (Cas::Conflict, _) => return Ok(Created::Undone),
        };
        events::ProfileCreated.emit();
        let profile = Arc::new(p);
        // Every identity is linked at once (one round trip after the profile's, not one per
        // identity). A link that exists already (another profile holds the identity) undoes
        // the profile and the links this wrote; when the profile cannot be undone (something
        // wrote it meanwhile) it keeps what it linked and stops listing what it lost.
        let writes = links.iter().map(|k| {
            let id = &id;
            async move {
                let kv_key = k.kv_key();
                let written = store
                    .identities
                    .create(&kv_key, &IdentityLink::new(k, id))
                    .await;
                (k, kv_key, written)
            }
        });
        let mut made: Vec<(String, u64)> = Vec::with_capacity(links.len());
        let mut lost: Vec<&IdentityKey> = Vec::new();
        let mut failed = None;
        for (k, kv_key, written) in futures_util::future::join_all(writes).await {
            match written {
                Ok((Cas::Written(rev), _)) => made.push((kv_key, rev)),
                Ok((Cas::Conflict, _)) => lost.push(k),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if !lost.is_empty() {
            for _ in &lost {
                events::CasConflict {
                    bucket: "identities",
                }
                .emit();
            }
            return match store.profiles.purge_at(&id, revision).await? {
                Cas::Written(_) => {
                    self.cache.forget_profile(&id);
                    events::ProfileUndone.emit();
                    for (key, rev) in &made {
                        let _ = store.identities.purge_at(key, *rev).await?;
                    }
                    Ok(Created::Undone)
                }
                Cas::Conflict => {
                    for (key, _) in &made {
                        events::IdentityLinked.emit();
                        self.cache.put_identity(key, &id);
                    }
                    for k in lost {
                        self.unlist_identity(store, &id, k).await?;
                    }
                    Ok(Created::Partial(id, changed))
                }
            };
        }
        for (key, _) in &made {
            events::IdentityLinked.emit();
            self.cache.put_identity(key, &id);
        }
        Ok(Created::Done(Applied {
            loaded: Loaded {
                revision,
                profile,
                from_cache: false,
            },
            consent_changed: changed,
            written: true,
        }))
    }

    /// Maps identity `k` to profile `id` unless it is mapped already. True when it now maps
    /// to `id` (directly or through redirects); false when it belongs to another profile.
    async fn link_identity(
        &self,
        store: &Store,
        k: &IdentityKey,
        id: &str,
    ) -> Result<bool, ProfileError> {
        let kv_key = k.kv_key();
        let link = IdentityLink::new(k, id);
        match store.identities.create(&kv_key, &link).await? {
            (Cas::Written(_), _) => {
                events::IdentityLinked.emit();
                self.cache.put_identity(&kv_key, id);
                Ok(true)
            }
            (Cas::Conflict, _) => {
                events::CasConflict {
                    bucket: "identities",
                }
                .emit();
                let mut seen = BTreeMap::new();
                let owner = match self.mapped_profile(store, k, true).await? {
                    Some(mapped) => self.canonical(store, &mapped, true, &mut seen).await?,
                    None => None,
                };
                Ok(owner.as_deref() == Some(id))
            }
        }
    }

    /// The profile id identity `key` is mapped to (not following redirects).
    async fn mapped_profile(
        &self,
        store: &Store,
        key: &IdentityKey,
        fresh: bool,
    ) -> Result<Option<String>, ProfileError> {
        let kv_key = key.kv_key();
        if !fresh && let Some(id) = self.cache.identity(&kv_key) {
            return Ok(Some(id.to_string()));
        }
        Ok(match store.identities.get::<IdentityLink>(&kv_key).await? {
            Some(v) => {
                self.cache.put_identity(&kv_key, &v.value.profile_id);
                Some(v.value.profile_id)
            }
            None => None,
        })
    }

    /// The canonical profile identity `key` belongs to, loading it (and any profile on the
    /// way) into `loaded`, and whether the mapping came from the cache. Shortens the mapping
    /// when it points at a redirect, and removes a mapping whose profile is gone (an
    /// interrupted erasure).
    async fn resolve_identity(
        &self,
        store: &Store,
        key: &IdentityKey,
        fresh: bool,
        loaded: &mut BTreeMap<String, Loaded>,
    ) -> Result<(Option<String>, bool), ProfileError> {
        let kv_key = key.kv_key();
        let cached = if fresh {
            None
        } else {
            self.cache.identity(&kv_key)
        };
        let from_cache = cached.is_some();
        let mapped = match cached {
            Some(id) => id.to_string(),
            None => match store.identities.get::<IdentityLink>(&kv_key).await? {
                Some(v) => {
                    self.cache.put_identity(&kv_key, &v.value.profile_id);
                    v.value.profile_id
                }
                None => return Ok((None, false)),
            },
        };
        let canonical = self.canonical(store, &mapped, fresh, loaded).await?;
        match &canonical {
            Some(c) if *c == mapped => {}
            Some(c) => {
                // Point the mapping straight at the survivor.
                if let Some(v) = store.identities.get::<IdentityLink>(&kv_key).await?
                    && v.value.profile_id == mapped
                {
                    let link = IdentityLink {
                        profile_id: c.clone(),
                        ..v.value
                    };
                    if let (Cas::Conflict, _) =
                        store.identities.update(&kv_key, &link, v.revision).await?
                    {
                        events::CasConflict {
                            bucket: "identities",
                        }
                        .emit();
                    }
                }
                self.cache.put_identity(&kv_key, c);
            }
            None => {
                self.cache.forget_identity(&kv_key);
                if !fresh {
                    // The cached mapping may be stale: ask KV.
                    return Box::pin(self.resolve_identity(store, key, true, loaded)).await;
                }
                if let Some(v) = store.identities.get::<IdentityLink>(&kv_key).await?
                    && v.value.profile_id == mapped
                {
                    let _ = store.identities.purge_at(&kv_key, v.revision).await?;
                }
            }
        }
        Ok((canonical, from_cache))
    }

    /// Loads profile `id` (from the cache unless `fresh`).
    async fn load(
        &self,
        store: &Store,
        id: &str,
        fresh: bool,
    ) -> Result<Option<Loaded>, ProfileError> {
        if !fresh
            && let Some(c) = self.cache.profile(id)
            // Bytes this processor wrote or read and checked: no version check again.
            && let Ok(p) = serde_json::from_slice::<Profile>(&c.bytes)
        {
            return Ok(Some(Loaded {
                revision: c.revision,
                profile: Arc::new(p),
                from_cache: true,
            }));
        }
        match store.profiles.get::<Profile>(id).await? {
            Some(v) => {
                let p = Arc::new(v.value);
                self.cache.put_profile(id, v.revision, &v.raw);
                Ok(Some(Loaded {
                    revision: v.revision,
                    profile: p,
                    from_cache: false,
                }))
            }
            None => {
                self.cache.forget_profile(id);
                Ok(None)
            }
        }
    }

    /// Follows redirects from `id` to the canonical profile, finishing any interrupted fold on
    /// the way. `None` when the chain ends at a missing (erased) profile.
    pub(crate) async fn canonical(
        &self,
        store: &Store,
        id: &str,
        fresh: bool,
        loaded: &mut BTreeMap<String, Loaded>,
    ) -> Result<Option<String>, ProfileError> {
        let mut id = id.to_string();
        for _ in 0..MAX_HOPS {
            if loaded.contains_key(&id) {
                return Ok(Some(id));
            }
            let Some(l) = self.load(store, &id, fresh).await? else {
                return Ok(None);
            };
            match l.profile.merged_into.clone() {
                None => {
                    loaded.insert(id.clone(), l);
                    return Ok(Some(id));
                }
                Some(next) => {
                    if !l.profile.folded {
                        self.finish_fold(store, l, &next).await?;
                    }
                    id = next;
                }
            }
        }
        Err(ProfileError::Contended(format!("redirect chain from {id}")))
    }

    /// Merges `loser` into `survivor_id`: redirect, fold, slim. Returns the survivor after the
    /// fold, or `None` when a concurrent write got in the way (plan again).
    async fn merge(
        &self,
        store: &Store,
        loser: Loaded,
        survivor_id: &str,
    ) -> Result<Option<Loaded>, ProfileError> {
        let mut redirect = (*loser.profile).clone();
        redirect.redirect_to(survivor_id);
        let Some(red) = self.write_profile(store, redirect, loser.revision).await? else {
            return Ok(None);
        };
        events::ProfileMerged {
            from: &loser.profile.id,
            into: survivor_id,
        }
        .emit();
        let survivor = self.finish_fold(store, red, survivor_id).await?;
        Ok(survivor)
    }

    /// Folds redirect `red` (still holding data) into the canonical profile reached from
    /// `into`, then slims the redirect and points its consent record at the survivor.
    async fn finish_fold(
        &self,
        store: &Store,
        red: Loaded,
        into: &str,
    ) -> Result<Option<Loaded>, ProfileError> {
        let mut target = into.to_string();
        let mut survivor = None;
        for _ in 0..self.cfg.cas_max_attempts.max(1) {
            let mut seen = BTreeMap::new();
            let Some(canonical) = Box::pin(self.canonical(store, &target, true, &mut seen)).await?
            else {
                // The survivor is gone (erased meanwhile): undo the redirect.
                let mut back = (*red.profile).clone();
                back.merged_into = None;
                back.folded = false;
                let _ = self.write_profile(store, back, red.revision).await?;
                return Ok(None);
            };
            target = canonical.clone();
            let s = seen.remove(&canonical).expect("canonical is loaded");
            let mut p = (*s.profile).clone();
            if !p.fold(&red.profile) {
                survivor = Some(s);
                break;
            }
            if let Some(l) = self.write_profile(store, p, s.revision).await? {
                survivor = Some(l);
                break;
            }
        }
        let Some(survivor) = survivor else {
            return Err(ProfileError::Contended(into.to_string()));
        };
        let mut slim = (*red.profile).clone();
        slim.slim();
        let _ = self.write_profile(store, slim, red.revision).await?;
        self.write_consent(
            store,
            ConsentRecord::redirect(&red.profile.id, &survivor.profile.id, red.revision),
        )
        .await?;
        if !red.profile.consent.is_empty() {
            self.write_consent(
                store,
                ConsentRecord::of(
                    &survivor.profile.id,
                    &survivor.profile.consent,
                    survivor.revision,
                ),
            )
            .await?;
        }
        Ok(Some(survivor))
    }

    /// Compare-and-set write of a profile; `None` on conflict (the cache entry is dropped).
    pub(crate) async fn write_profile(
        &self,
        store: &Store,
        p: Profile,
        revision: u64,
    ) -> Result<Option<Loaded>, ProfileError> {
        match store.profiles.update(&p.id, &p, revision).await? {
            (Cas::Written(rev), bytes) => {
                events::ProfileWritten.emit();
                self.cache.put_profile(&p.id, rev, &bytes);
                let p = Arc::new(p);
                Ok(Some(Loaded {
                    revision: rev,
                    profile: p,
                    from_cache: false,
                }))
            }
            (Cas::Conflict, _) => {
                events::CasConflict { bucket: "profiles" }.emit();
                self.cache.forget_profile(&p.id);
                Ok(None)
            }
        }
    }

    /// Takes identity `k` off profile `id`'s list.
    async fn unlist_identity(
        &self,
        store: &Store,
        id: &str,
        k: &IdentityKey,
    ) -> Result<(), ProfileError> {
        for _ in 0..self.cfg.cas_max_attempts.max(1) {
            let Some(l) = self.load(store, id, true).await? else {
                return Ok(());
            };
            if !l.profile.identities.contains(k) {
                return Ok(());
            }
            let mut p = (*l.profile).clone();
            p.identities.retain(|i| i != k);
            if self.write_profile(store, p, l.revision).await?.is_some() {
                return Ok(());
            }
        }
        Err(ProfileError::Contended(id.to_string()))
    }

    /// Writes a consent record unless one from a newer profile revision is already there.
    pub(crate) async fn write_consent(
        &self,
        store: &Store,
        record: ConsentRecord,
    ) -> Result<(), ProfileError> {
        let key = record.profile_id.clone();
        for _ in 0..self.cfg.cas_max_attempts.max(1) {
            let res = match store.consent.get::<ConsentRecord>(&key).await? {
                Some(cur) if cur.value.profile_revision > record.profile_revision => return Ok(()),
                Some(cur) if cur.value == record => return Ok(()),
                Some(cur) => store.consent.update(&key, &record, cur.revision).await?,
                None => store.consent.create(&key, &record).await?,
            };
            match res.0 {
                Cas::Written(_) => return Ok(()),
                Cas::Conflict => events::CasConflict { bucket: "consent" }.emit(),
            }
        }
        Err(ProfileError::Contended(key))
    }
}

/// A profile's effective consent (purposes, opted out), without timestamps.
pub(crate) type Effective = (BTreeMap<String, bool>, bool);

/// An event applied to its profile.
pub(crate) struct Applied {
    /// The profile with the event applied: as written, at its new revision; or, when not
    /// `written`, in memory, with the revision a write must compare against.
    pub loaded: Loaded,
    /// Whether the event changed the profile's effective consent (or changed it before a
    /// redelivery).
    pub consent_changed: bool,
    /// Whether the profile was written with the event applied.
    pub written: bool,
}

/// What [`Profiles::create_profile`] did.
enum Created {
    /// The profile exists with every identity mapped and the event applied.
    Done(Applied),
    /// Nothing is left of it: resolve the event again.
    Undone,
    /// The profile (this id) stays, holding the event (whether it changed consent), without
    /// an identity that was mapped elsewhere: resolve again without applying the event twice.
    Partial(String, bool),
}

/// What [`Profiles::prepare`] found.
pub(crate) enum Prepared {
    /// The event names a suppressed identity.
    Suppressed,
    /// The event names no usable identity.
    Unresolved,
    /// The event's identities in priority order; `explicit` for an alias call; `at` its
    /// event time.
    Identified {
        ids: Vec<IdentityKey>,
        explicit: bool,
        at: DateTime<Utc>,
    },
}

/// Applies `event` (at `at`) to `p`, whose effective consent was `before` the event touched
/// it; returns whether the effective consent changed, or had changed by this same event before
/// (a redelivery after a crash: its consent-changed event is published again). The profile
/// remembers the event that last changed its consent.
pub(crate) fn apply_event(
    p: &mut Profile,
    event: &Event,
    at: DateTime<Utc>,
    before: &Effective,
) -> bool {
    let redelivered_change = p.consent.changed_by.as_deref() == Some(event.id.as_str());
    p.apply_event(event, at);
    let changed = *before != p.consent.effective();
    if changed {
        p.consent.changed_by = Some(event.id.clone());
    }
    changed || redelivered_change
}

/// The profile of an event whose every identity maps to it and is listed on it: the common
/// case, which [`identity::plan`] would answer the same way (one group, nothing to link), found
/// without building its inputs.
fn steady<'a>(
    lookups: &'a [(IdentityKey, Option<String>)],
    loaded: &BTreeMap<String, Loaded>,
) -> Option<&'a str> {
    let first = lookups.first()?.1.as_deref()?;
    let profile = &loaded.get(first)?.profile;
    lookups
        .iter()
        .all(|(k, p)| p.as_deref() == Some(first) && profile.identities.contains(k))
        .then_some(first)
}

/// A new profile id: 128 random bits in hex.
fn new_profile_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whether to create a profile for an event none of whose identities is cached without
/// looking them up first (see [`Profiles::create_profile`]). Right for new people, one wasted
/// write and delete for a known person the cache forgot; so it keeps a score of recent
/// guesses, stops guessing while most are wrong, and tries one event in 16 meanwhile to
/// notice when that changes.
#[derive(Debug, Default)]
pub(crate) struct Speculation {
    score: AtomicI64,
    skipped: AtomicU64,
}

impl Speculation {
    /// Highest score kept: a long run of right guesses is forgotten after a few wrong ones.
    const MAX: i64 = 64;
    /// Lowest score kept.
    const MIN: i64 = -64;

    fn should_try(&self, ids: &[IdentityKey], cache: &HotCache) -> bool {
        if ids.is_empty()
            || !cache.enabled()
            || ids.iter().any(|k| cache.knows_identity(&k.kv_key()))
        {
            return false;
        }
        self.score.load(Ordering::Relaxed) >= 0
            || self
                .skipped
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(16)
    }

    fn record(&self, right: bool) {
        let delta = if right { 1 } else { -2 };
        let _ = self
            .score
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((s + delta).clamp(Self::MIN, Self::MAX))
            });
        events::SpeculativeCreate { right }.emit();
    }
}
