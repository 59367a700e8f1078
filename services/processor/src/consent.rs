//! Consent on a profile: each purpose and the opt-out flag keep the event time they were
//! expressed at, so the newer statement wins even out of order. Also the record of the
//! `herald-consent` bucket (what the activator watches) and the consent-changed event.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use herald_common::consent::purpose_name;
use herald_proto::v1::{Consent, Event, EventType, ProcessedEvent};
use serde::{Deserialize, Serialize};

use crate::timestamp::{from_proto, to_proto};

/// Schema version of [`ConsentRecord`] values.
pub const CONSENT_SCHEMA_VERSION: u32 = 1;

/// A value with the event time it was stated at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timed<T> {
    /// The value.
    pub value: T,
    /// Event time of the statement.
    #[serde(
        serialize_with = "crate::profile::ser_time",
        deserialize_with = "crate::profile::de_time"
    )]
    pub at: DateTime<Utc>,
}

/// The consent state of a profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsentState {
    /// Purpose (lower case) to whether it is allowed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub purposes: BTreeMap<String, Timed<bool>>,
    /// The opt-out flag (mParticle `opt_out`): when true every purpose is denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opted_out: Option<Timed<bool>>,
    /// The event whose processing last changed the effective consent (to repeat the
    /// consent-changed event if that event is redelivered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_by: Option<String>,
}

impl ConsentState {
    /// True when nothing was ever recorded.
    pub fn is_empty(&self) -> bool {
        self.purposes.is_empty() && self.opted_out.is_none()
    }

    /// Applies the consent an event carried, stated at `at`. A statement newer than (or as
    /// new as) the stored one wins. The opt-out flag changes only through an `opt_out` event or
    /// a consent that opts out.
    pub fn apply(&mut self, consent: &Consent, event_type: i32, at: DateTime<Utc>) {
        let at = consent
            .updated_at
            .as_ref()
            .and_then(from_proto)
            .unwrap_or(at);
        for (name, allowed) in &consent.purposes {
            let name = purpose_name(name);
            match self.purposes.get(&name) {
                Some(cur) if cur.at > at => {}
                _ => {
                    self.purposes.insert(
                        name,
                        Timed {
                            value: *allowed,
                            at,
                        },
                    );
                }
            }
        }
        if event_type == EventType::OptOut as i32 || consent.opted_out {
            match &self.opted_out {
                Some(cur) if cur.at > at => {}
                _ => {
                    self.opted_out = Some(Timed {
                        value: consent.opted_out,
                        at,
                    })
                }
            }
        }
    }

    /// Folds another profile's consent in (per purpose and flag, the newer statement wins).
    pub fn fold(&mut self, other: &ConsentState) {
        for (name, t) in &other.purposes {
            match self.purposes.get(name) {
                Some(cur) if cur.at >= t.at => {}
                _ => {
                    self.purposes.insert(name.clone(), t.clone());
                }
            }
        }
        if let Some(t) = &other.opted_out {
            match &self.opted_out {
                Some(cur) if cur.at >= t.at => {}
                _ => self.opted_out = Some(t.clone()),
            }
        }
    }

    /// The consent in force, as carried on processed events; `None` when nothing is recorded
    /// (no consent recorded means allowed, unless a destination requires opt-in).
    pub fn snapshot(&self) -> Option<Consent> {
        if self.is_empty() {
            return None;
        }
        let opted_out = self.opted_out.as_ref().is_some_and(|t| t.value);
        let updated = self
            .purposes
            .values()
            .map(|t| t.at)
            .chain(self.opted_out.as_ref().map(|t| t.at))
            .max();
        Some(Consent {
            purposes: self
                .purposes
                .iter()
                .map(|(k, t)| (k.clone(), t.value && !opted_out))
                .collect(),
            opted_out,
            updated_at: updated.map(to_proto),
        })
    }

    /// The effective state, without timestamps: what a change is measured on.
    pub fn effective(&self) -> (BTreeMap<String, bool>, bool) {
        (
            self.purposes
                .iter()
                .map(|(k, t)| (k.clone(), t.value))
                .collect(),
            self.opted_out.as_ref().is_some_and(|t| t.value),
        )
    }
}

/// A value of the `herald-consent` bucket, keyed by profile id: written only when a profile's
/// consent changes (or the profile merges into another), so the activator can watch it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentRecord {
    /// Format version of this value.
    pub schema_version: u32,
    /// The profile.
    pub profile_id: String,
    /// Set when the profile merged into another: follow it to the consent in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// Purpose (lower case) to whether it is allowed (already false for every purpose when
    /// `opted_out`).
    pub purposes: BTreeMap<String, bool>,
    /// The user opted out of everything: deny every purpose for every destination.
    pub opted_out: bool,
    /// Event time of the newest statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// The profile's KV revision this record was written from; a record is never replaced by
    /// one from an older revision.
    pub profile_revision: u64,
}

impl ConsentRecord {
    /// The record of `profile_id`'s consent `state` at profile revision `rev`.
    pub fn of(profile_id: &str, state: &ConsentState, rev: u64) -> Self {
        let snap = state.snapshot().unwrap_or_default();
        Self {
            schema_version: CONSENT_SCHEMA_VERSION,
            profile_id: profile_id.to_string(),
            merged_into: None,
            purposes: snap.purposes.into_iter().collect(),
            opted_out: snap.opted_out,
            updated_at: snap.updated_at.as_ref().and_then(from_proto),
            profile_revision: rev,
        }
    }

    /// The record of a profile that merged into `into`.
    pub fn redirect(profile_id: &str, into: &str, rev: u64) -> Self {
        Self {
            schema_version: CONSENT_SCHEMA_VERSION,
            profile_id: profile_id.to_string(),
            merged_into: Some(into.to_string()),
            purposes: BTreeMap::new(),
            opted_out: false,
            updated_at: None,
            profile_revision: rev,
        }
    }
}

/// The id (and Nats-Msg-Id) of the consent-changed event caused by event `event_id`.
pub fn changed_event_id(event_id: &str) -> String {
    format!("{event_id}#consent-changed")
}

/// The consent-changed event for a change caused by `cause`: published on the same processed
/// subject right after it, carrying the profile, its identities and the new consent.
pub fn changed_event(cause: &ProcessedEvent) -> ProcessedEvent {
    let default = Event::default();
    let e = cause.event.as_ref().unwrap_or(&default);
    let event = Event {
        id: changed_event_id(&e.id),
        message_id: changed_event_id(&e.message_id),
        source_id: e.source_id.clone(),
        r#type: EventType::ConsentChanged as i32,
        user_id: e.user_id.clone(),
        anonymous_id: e.anonymous_id.clone(),
        identities: e.identities.clone(),
        timestamp: e.timestamp,
        original_timestamp: e.original_timestamp,
        received_at: e.received_at,
        consent: cause.consent.clone(),
        partition_key: e.partition_key.clone(),
        partition: e.partition,
        ..Default::default()
    };
    ProcessedEvent {
        event: Some(event),
        profile_id: cause.profile_id.clone(),
        identities: cause.identities.clone(),
        consent: cause.consent.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).expect("valid")
    }

    fn consent(purposes: &[(&str, bool)], opted_out: bool) -> Consent {
        Consent {
            purposes: purposes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            opted_out,
            updated_at: None,
        }
    }

    #[test]
    fn newer_statements_win_in_any_order() {
        let a = consent(&[("Advertising", true)], false);
        let b = consent(&[("advertising", false)], false);
        let track = EventType::Track as i32;
        let mut in_order = ConsentState::default();
        in_order.apply(&a, track, t(1));
        in_order.apply(&b, track, t(2));
        let mut reversed = ConsentState::default();
        reversed.apply(&b, track, t(2));
        reversed.apply(&a, track, t(1));
        assert_eq!(in_order, reversed);
        assert!(!in_order.snapshot().expect("recorded").purposes["advertising"]);
    }

    #[test]
    fn opt_out_denies_everything_until_opted_back_in() {
        let mut s = ConsentState::default();
        assert!(s.snapshot().is_none());
        s.apply(
            &consent(&[("analytics", true), ("data_sale_opt_out", true)], false),
            EventType::Track as i32,
            t(1),
        );
        // A Segment consent (opted_out false) never clears an opt-out; only an opt_out event does.
        s.apply(&consent(&[], true), EventType::OptOut as i32, t(2));
        s.apply(
            &consent(&[("analytics", true)], false),
            EventType::Track as i32,
            t(3),
        );
        let snap = s.snapshot().expect("recorded");
        assert!(snap.opted_out);
        assert!(snap.purposes.values().all(|v| !v), "{snap:?}");
        assert!(snap.purposes.contains_key("data_sale"));
        s.apply(&consent(&[], false), EventType::OptOut as i32, t(4));
        let snap = s.snapshot().expect("recorded");
        assert!(!snap.opted_out);
        assert!(snap.purposes["analytics"]);
    }

    #[test]
    fn folding_keeps_the_newer_statement() {
        let mut a = ConsentState::default();
        a.apply(&consent(&[("ads", true), ("email", true)], false), 1, t(5));
        let mut b = ConsentState::default();
        b.apply(&consent(&[("ads", false)], false), 1, t(9));
        b.apply(&consent(&[("email", false)], false), 1, t(1));
        a.fold(&b);
        let (purposes, _) = a.effective();
        assert!(!purposes["ads"]);
        assert!(purposes["email"]);
    }
}
