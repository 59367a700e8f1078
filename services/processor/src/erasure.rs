//! Erasure and suppression (GDPR/CCPA), given any identity.
//!
//! - **Suppress**: the identity and every identity of its profile go on the suppression list
//!   (`herald-suppressions`); events naming any of them are dropped with reason `suppressed`.
//! - **Unsuppress**: lifts every suppression made by the same request.
//! - **Erase**: suppresses first (so nothing re-creates the profile meanwhile), then deletes the
//!   identity mappings, the profile (by compare-and-set, so a concurrent merge is not missed),
//!   the profiles merged into it and their consent records, and publishes an erasure event on
//!   every processed partition the profile's identities route to. Each request leaves an audit
//!   record in `herald-erasures` whose status can be queried.
//!
//! Every replica keeps the suppression list in memory ([`herald_common::suppressions`]), fed by a KV
//! watch (a request waits until its own replica has seen it), and drops events naming a
//! suppressed identity before resolving them. Another replica's list can lag by the watch's delivery time, so an event it resolved
//! just then could link an erased identity again: an erasure therefore sweeps a second time,
//! `processor.profiles.erasure_sweep_ms` (2 s) after the first pass, and erases whatever it
//! finds again. A replica whose watch is broken for longer than that (it re-reads the list
//! within a second of noticing) is the remaining window.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use chrono::Utc;
use herald_common::partition::partition_for;
use herald_proto::v1::{Event, EventType, ProcessedEvent};
use prost::Message as _;

use crate::events;
use crate::identity::{ANONYMOUS_ID, IdentityKey, USER_ID};
use crate::resolver::Profiles;
use crate::store::{
    Cas, ErasureRecord, ErasureState, ProfileError, RECORD_SCHEMA_VERSION, Store, Suppression,
};
use crate::timestamp::to_proto;

/// A new request id: `req-` and 96 random bits in hex.
fn new_request_id() -> String {
    format!("req-{:024x}", rand::random::<u128>() >> 32)
}

impl Profiles {
    /// Erases the profile of identity `key` (see the module docs). The returned record says
    /// whether it completed; a failed erasure can simply be requested again.
    pub async fn erase(&self, key: &IdentityKey) -> Result<ErasureRecord, ProfileError> {
        let store = self.store()?;
        let mut record = ErasureRecord {
            schema_version: RECORD_SCHEMA_VERSION,
            request_id: new_request_id(),
            request: "erase".into(),
            identity: key.clone(),
            state: ErasureState::Pending,
            profile_id: None,
            erased_profiles: Vec::new(),
            identities: vec![key.clone()],
            events_published: 0,
            requested_at: Utc::now(),
            completed_at: None,
            error: None,
        };
        store.erasures.put(&record.request_id, &record).await?;
        match self.erase_steps(store, key, &mut record).await {
            Ok(()) => {
                record.state = ErasureState::Completed;
                record.completed_at = Some(Utc::now());
            }
            Err(e) => {
                record.state = ErasureState::Failed;
                record.error = Some(e.to_string());
            }
        }
        store.erasures.put(&record.request_id, &record).await?;
        events::PrivacyRequest {
            request: "erase",
            ok: record.state == ErasureState::Completed,
            request_id: &record.request_id,
        }
        .emit();
        Ok(record)
    }

    async fn erase_steps(
        &self,
        store: &Store,
        key: &IdentityKey,
        record: &mut ErasureRecord,
    ) -> Result<(), ProfileError> {
        let mut identities: BTreeSet<IdentityKey> = BTreeSet::from([key.clone()]);
        let mut profile_ids: Vec<String> = Vec::new();
        let mut erased = None;
        self.erase_pass(
            store,
            std::slice::from_ref(key),
            &mut identities,
            &mut profile_ids,
            &mut erased,
            &record.request_id,
        )
        .await?;
        // A replica whose suppression list had not caught up yet may have linked one of the
        // identities again meanwhile: sweep once more after the lists surely have.
        if self.cfg.erasure_sweep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.cfg.erasure_sweep_ms)).await;
            let again: Vec<IdentityKey> = identities.iter().cloned().collect();
            let mut late = None;
            self.erase_pass(
                store,
                &again,
                &mut identities,
                &mut profile_ids,
                &mut late,
                &record.request_id,
            )
            .await?;
            if erased.is_none() {
                erased = late;
            }
        }
        record.profile_id = erased.as_ref().map(|p| p.id.clone());
        record.erased_profiles = profile_ids;
        record.identities = identities.iter().cloned().collect();
        record.events_published = self
            .publish_erasure(
                &record.request_id,
                erased.as_ref().map(|p| p.id.as_str()),
                &identities,
            )
            .await?;
        Ok(())
    }

    /// One pass of an erasure over `keys`: for each, suppress it and every identity of its
    /// profile, delete the profile (by compare-and-set), then every identity mapping and every
    /// profile found (with those merged into it and their consent records). `identities`,
    /// `profile_ids` and `erased` collect what was found.
    async fn erase_pass(
        &self,
        store: &Store,
        keys: &[IdentityKey],
        identities: &mut BTreeSet<IdentityKey>,
        profile_ids: &mut Vec<String>,
        erased: &mut Option<crate::profile::Profile>,
        request_id: &str,
    ) -> Result<(), ProfileError> {
        for key in keys {
            for _ in 0..self.cfg.cas_max_attempts.max(1) {
                let found = self.lookup(key).await?;
                if let Some((_, p)) = &found {
                    identities.extend(p.identities.iter().cloned());
                    for id in std::iter::once(&p.id).chain(p.merged_from.iter()) {
                        if !profile_ids.contains(id) {
                            profile_ids.push(id.clone());
                        }
                    }
                }
                // Suppress before anything disappears, so no event re-creates the profile.
                self.suppress_keys(store, identities, "erasure", request_id)
                    .await?;
                let Some((rev, p)) = found else {
                    break;
                };
                match store.profiles.purge_at(&p.id, rev).await? {
                    Cas::Written(_) => {
                        if erased.is_none() {
                            *erased = Some(p);
                        }
                        break;
                    }
                    // Changed since read (an event or a merge): read it again.
                    Cas::Conflict => events::CasConflict { bucket: "profiles" }.emit(),
                }
            }
        }
        for k in identities.iter() {
            let kv_key = k.kv_key();
            store.identities.purge(&kv_key).await?;
            self.cache.forget_identity(&kv_key);
        }
        for id in profile_ids.iter() {
            store.profiles.purge(id).await?;
            store.consent.purge(id).await?;
            self.cache.forget_profile(id);
        }
        Ok(())
    }

    /// Publishes one erasure event per processed partition that `identities` route to, so it
    /// queues behind that partition's earlier events of the person.
    async fn publish_erasure(
        &self,
        request_id: &str,
        profile_id: Option<&str>,
        identities: &BTreeSet<IdentityKey>,
    ) -> Result<u32, ProfileError> {
        let partitions = self.topology.partitions();
        let mut by_partition: BTreeMap<u32, &IdentityKey> = BTreeMap::new();
        for k in identities {
            by_partition
                .entry(partition_for(&k.value, partitions))
                .or_insert(k);
        }
        let first = |kind: &str| {
            identities
                .iter()
                .find(|k| k.kind == kind)
                .map(|k| k.value.clone())
                .unwrap_or_default()
        };
        let mut others = std::collections::HashMap::new();
        for k in identities {
            if k.kind != USER_ID && k.kind != ANONYMOUS_ID {
                others
                    .entry(k.kind.clone())
                    .or_insert_with(|| k.value.clone());
            }
        }
        let now = to_proto(Utc::now());
        let all: Vec<_> = identities
            .iter()
            .map(|k| herald_proto::v1::Identity {
                r#type: k.kind.clone(),
                value: k.value.clone(),
            })
            .collect();
        let mut acks = Vec::new();
        for (p, via) in &by_partition {
            let id = format!("erasure:{request_id}:{p}");
            let event = Event {
                id: id.clone(),
                message_id: request_id.to_string(),
                source_id: "herald".into(),
                r#type: EventType::Erasure as i32,
                user_id: first(USER_ID),
                anonymous_id: first(ANONYMOUS_ID),
                identities: others.clone(),
                timestamp: Some(now),
                received_at: Some(now),
                partition_key: via.value.clone(),
                partition: *p,
                ..Default::default()
            };
            let processed = ProcessedEvent {
                event: Some(event),
                profile_id: profile_id.unwrap_or_default().to_string(),
                identities: all.clone(),
                consent: None,
            };
            let ack = self
                .js
                .send_publish(
                    self.topology.processed_subject(*p),
                    PublishMessage::build()
                        .payload(Bytes::from(processed.encode_to_vec()))
                        .message_id(&id),
                )
                .await
                .map_err(|e| ProfileError::Kv {
                    bucket: "processed stream",
                    message: e.to_string(),
                })?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| ProfileError::Kv {
                bucket: "processed stream",
                message: e.to_string(),
            })?;
        }
        Ok(by_partition.len() as u32)
    }

    /// Suppresses identity `key` and every identity of its profile. Returns the request's
    /// audit record (its `identities` are those suppressed).
    pub async fn suppress(&self, key: &IdentityKey) -> Result<ErasureRecord, ProfileError> {
        let store = self.store()?;
        let mut identities = BTreeSet::from([key.clone()]);
        let mut profile_id = None;
        if let Some((_, p)) = self.lookup(key).await? {
            identities.extend(p.identities.iter().cloned());
            profile_id = Some(p.id);
        }
        let request_id = new_request_id();
        let now = Utc::now();
        let record = ErasureRecord {
            schema_version: RECORD_SCHEMA_VERSION,
            request_id: request_id.clone(),
            request: "suppress".into(),
            identity: key.clone(),
            state: ErasureState::Completed,
            profile_id,
            erased_profiles: Vec::new(),
            identities: identities.iter().cloned().collect(),
            events_published: 0,
            requested_at: now,
            completed_at: Some(now),
            error: None,
        };
        store.erasures.put(&request_id, &record).await?;
        let res = self
            .suppress_keys(store, &identities, "suppress", &request_id)
            .await;
        events::PrivacyRequest {
            request: "suppress",
            ok: res.is_ok(),
            request_id: &request_id,
        }
        .emit();
        res.map(|()| record)
    }

    /// Lifts the suppression of `key` and of every identity suppressed by the same request.
    /// Returns the identities no longer suppressed (empty when `key` was not suppressed).
    pub async fn unsuppress(&self, key: &IdentityKey) -> Result<Vec<IdentityKey>, ProfileError> {
        let store = self.store()?;
        let Some(s) = store.suppressions.get::<Suppression>(&key.kv_key()).await? else {
            return Ok(Vec::new());
        };
        let mut keys = BTreeSet::from([key.clone()]);
        if let Some(r) = store
            .erasures
            .get::<ErasureRecord>(&s.value.request_id)
            .await?
        {
            keys.extend(r.value.identities);
        }
        let mut lifted = Vec::new();
        for k in keys {
            let kv_key = k.kv_key();
            match store.suppressions.get::<Suppression>(&kv_key).await? {
                Some(cur) if cur.value.request_id == s.value.request_id => {
                    store.suppressions.purge(&kv_key).await?;
                    lifted.push(k);
                }
                _ => {}
            }
        }
        let last = store
            .suppressions
            .kv()
            .stream
            .get_info()
            .await
            .map_err(|e| ProfileError::Kv {
                bucket: "suppressions",
                message: e.to_string(),
            })?
            .state
            .last_sequence;
        self.suppressions.wait_revision(last).await;
        events::PrivacyRequest {
            request: "unsuppress",
            ok: true,
            request_id: &s.value.request_id,
        }
        .emit();
        Ok(lifted)
    }

    /// The audit record of request `request_id`.
    pub async fn request_status(
        &self,
        request_id: &str,
    ) -> Result<Option<ErasureRecord>, ProfileError> {
        let store = self.store()?;
        if request_id.is_empty()
            || !request_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Ok(None);
        }
        Ok(store
            .erasures
            .get::<ErasureRecord>(request_id)
            .await?
            .map(|v| v.value))
    }

    /// Whether identity `key` is suppressed, asking KV (not the in-memory list).
    async fn suppress_keys(
        &self,
        store: &Store,
        keys: &BTreeSet<IdentityKey>,
        reason: &str,
        request_id: &str,
    ) -> Result<(), ProfileError> {
        let mut last = 0;
        for k in keys {
            let kv_key = k.kv_key();
            if let Some(cur) = store.suppressions.get::<Suppression>(&kv_key).await?
                && cur.value.reason == "erasure"
                && reason != "erasure"
            {
                // An erasure's suppression stays with the erasure's request.
                continue;
            }
            let s = Suppression {
                schema_version: RECORD_SCHEMA_VERSION,
                identity: k.clone(),
                reason: reason.to_string(),
                request_id: request_id.to_string(),
                created_at: Utc::now(),
            };
            last = store.suppressions.put(&kv_key, &s).await?;
        }
        if last > 0 {
            self.suppressions.wait_revision(last).await;
        }
        Ok(())
    }
}
