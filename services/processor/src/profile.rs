//! The profile: what the `herald-profiles` bucket holds per profile id, and the pure rules that
//! update it (apply an event, fold a merged profile in). Every stored value carries
//! `schema_version`, so the format can evolve.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use herald_proto::v1::{Event, EventType, Identity};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::consent::ConsentState;
use crate::identity::IdentityKey;

/// Schema version of [`Profile`] values.
pub const PROFILE_SCHEMA_VERSION: u32 = 1;

/// Serialises a stored time as chrono does, through [`herald_proto::time::rfc3339`] (no
/// `fmt`, no allocation): a profile holds several, written on every profile write and read on
/// every event ([`de_time`]).
pub(crate) fn ser_time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    herald_proto::time::rfc3339(t).serialize(s)
}

/// [`ser_time`] for an optional time.
pub(crate) fn ser_opt_time<S: serde::Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    t.as_ref().map(herald_proto::time::rfc3339).serialize(s)
}

/// Reads a stored time as chrono's serde does, through [`herald_proto::time::parse_rfc3339`]
/// (what [`ser_time`] wrote is read without chrono's general parser).
pub(crate) fn de_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    d.deserialize_str(StoredTime)
}

/// [`de_time`] for an optional time (`null` is `None`).
pub(crate) fn de_opt_time<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    d.deserialize_option(OptStoredTime)
}

/// The visitor of [`de_time`] and [`de_opt_time`]: RFC 3339 text, read in place.
struct StoredTime;

impl<'de> serde::de::Visitor<'de> for StoredTime {
    type Value = DateTime<Utc>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an RFC 3339 date and time")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        herald_proto::time::parse_rfc3339(v)
            .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
    }
}

/// [`StoredTime`] where the time may be `null`.
struct OptStoredTime;

impl<'de> serde::de::Visitor<'de> for OptStoredTime {
    type Value = Option<DateTime<Utc>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an RFC 3339 date and time, or null")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        de_time(d).map(Some)
    }
}

/// A trait value with the event time it was set at; a deleted trait keeps its deletion time so
/// that an older set arriving late does not bring it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    /// The value (JSON); `null` when deleted.
    pub value: Value,
    /// Event time of the event that set (or deleted) it.
    #[serde(serialize_with = "ser_time", deserialize_with = "de_time")]
    pub at: DateTime<Utc>,
    /// True when the trait was deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// A profile as stored in `herald-profiles` under its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Format version of this value.
    pub schema_version: u32,
    /// The profile id.
    pub id: String,
    /// Event time of the event that created the profile. It never changes and, with the id,
    /// orders merges: the older profile survives.
    #[serde(serialize_with = "ser_time", deserialize_with = "de_time")]
    pub created_at: DateTime<Utc>,
    /// Set when this profile merged into another: it is then only a redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// For a redirect: its data was folded into the survivor and dropped here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub folded: bool,
    /// Earliest event time seen.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_time",
        deserialize_with = "de_opt_time"
    )]
    pub first_seen: Option<DateTime<Utc>>,
    /// Latest event time seen.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_time",
        deserialize_with = "de_opt_time"
    )]
    pub last_seen: Option<DateTime<Utc>>,
    /// Identities linked to the profile, in the order they were linked.
    #[serde(default)]
    pub identities: Vec<IdentityKey>,
    /// Traits by name.
    #[serde(default)]
    pub traits: BTreeMap<String, TraitValue>,
    /// Events applied (at least once: an event redelivered after a crash can count twice).
    #[serde(default)]
    pub event_count: u64,
    /// Events applied, by type (`track`, `identify`, ...).
    #[serde(default)]
    pub event_counts: BTreeMap<String, u64>,
    /// Consent, per purpose with event times.
    #[serde(default)]
    pub consent: ConsentState,
    /// Profiles folded into this one (directly or through others).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
    /// Wall-clock time of the last write.
    #[serde(serialize_with = "ser_time", deserialize_with = "de_time")]
    pub updated_at: DateTime<Utc>,
}

/// The lower-case name of an event type (`track`, `opt_out`, ...).
pub fn type_name(t: i32) -> String {
    EventType::try_from(t)
        .map(|t| {
            t.as_str_name()
                .trim_start_matches("EVENT_TYPE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unspecified".into())
}

impl Profile {
    /// A new, empty profile created by an event at `created_at`.
    pub fn new(id: String, created_at: DateTime<Utc>) -> Self {
        Self {
            schema_version: PROFILE_SCHEMA_VERSION,
            id,
            created_at,
            merged_into: None,
            folded: false,
            first_seen: None,
            last_seen: None,
            identities: Vec::new(),
            traits: BTreeMap::new(),
            event_count: 0,
            event_counts: BTreeMap::new(),
            consent: ConsentState::default(),
            merged_from: Vec::new(),
            updated_at: Utc::now(),
        }
    }

    /// The merge order: the smaller survives.
    pub fn rank(&self) -> (DateTime<Utc>, &str) {
        (self.created_at, &self.id)
    }

    /// The identities as a set.
    pub fn identity_set(&self) -> BTreeSet<IdentityKey> {
        self.identities.iter().cloned().collect()
    }

    /// Adds identities not yet listed; returns whether any was added.
    pub fn add_identities<'a>(&mut self, ids: impl IntoIterator<Item = &'a IdentityKey>) -> bool {
        let mut added = false;
        for id in ids {
            if !self.identities.contains(id) {
                self.identities.push(id.clone());
                added = true;
            }
        }
        added
    }

    /// The identities as carried on processed events.
    pub fn proto_identities(&self) -> Vec<Identity> {
        self.identities
            .iter()
            .map(|i| Identity {
                r#type: i.kind.clone(),
                value: i.value.clone(),
            })
            .collect()
    }

    /// Applies one event that happened at `at`: seen times, counts, traits (a newer event time
    /// wins per trait, whatever the arrival order), deleted traits, and consent.
    pub fn apply_event(&mut self, event: &Event, at: DateTime<Utc>) {
        self.first_seen = Some(self.first_seen.map_or(at, |t| t.min(at)));
        self.last_seen = Some(self.last_seen.map_or(at, |t| t.max(at)));
        self.event_count += 1;
        *self
            .event_counts
            .entry(type_name(event.r#type))
            .or_insert(0) += 1;
        // `group` traits describe the group, not the user.
        if event.r#type != EventType::Group as i32
            && !event.traits.is_empty()
            && let Ok(Value::Object(traits)) = serde_json::from_slice::<Value>(&event.traits)
        {
            for (name, value) in traits {
                self.set_trait(name, value, at, false);
            }
        }
        for name in &event.deleted_traits {
            self.set_trait(name.clone(), Value::Null, at, true);
        }
        if let Some(consent) = &event.consent {
            self.consent.apply(consent, event.r#type, at);
        }
        self.updated_at = Utc::now();
    }

    fn set_trait(&mut self, name: String, value: Value, at: DateTime<Utc>, deleted: bool) {
        match self.traits.get(&name) {
            Some(cur) if cur.at > at => {}
            _ => {
                self.traits.insert(name, TraitValue { value, at, deleted });
            }
        }
    }

    /// Folds a merged profile into this one: identities and merged-from lists united, traits
    /// and consent by newer event time, counts added, seen times widened. Idempotent: a profile
    /// already listed in `merged_from` is not folded again.
    pub fn fold(&mut self, other: &Profile) -> bool {
        if other.id == self.id || self.merged_from.contains(&other.id) {
            return false;
        }
        self.add_identities(other.identities.iter());
        for (name, t) in &other.traits {
            match self.traits.get(name) {
                Some(cur) if cur.at >= t.at => {}
                _ => {
                    self.traits.insert(name.clone(), t.clone());
                }
            }
        }
        self.event_count += other.event_count;
        for (k, n) in &other.event_counts {
            *self.event_counts.entry(k.clone()).or_insert(0) += n;
        }
        self.first_seen = match (self.first_seen, other.first_seen) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_seen = match (self.last_seen, other.last_seen) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.consent.fold(&other.consent);
        for id in std::iter::once(&other.id).chain(other.merged_from.iter()) {
            if !self.merged_from.contains(id) && *id != self.id {
                self.merged_from.push(id.clone());
            }
        }
        self.updated_at = Utc::now();
        true
    }

    /// This profile as a redirect to `into`, still holding its data until folded.
    pub fn redirect_to(&mut self, into: &str) {
        self.merged_into = Some(into.to_string());
        self.folded = false;
        self.updated_at = Utc::now();
    }

    /// Drops a folded redirect's data, keeping only what a redirect needs.
    pub fn slim(&mut self) {
        let keep = Profile::new(self.id.clone(), self.created_at);
        let into = self.merged_into.take();
        *self = Profile {
            merged_into: into,
            folded: true,
            merged_from: std::mem::take(&mut self.merged_from),
            ..keep
        };
    }

    /// Live traits (deleted ones left out) as a JSON object.
    pub fn trait_values(&self) -> serde_json::Map<String, Value> {
        self.traits
            .iter()
            .filter(|(_, t)| !t.deleted)
            .map(|(k, t)| (k.clone(), t.value.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).expect("valid")
    }

    fn identify(traits: &str) -> Event {
        Event {
            r#type: EventType::Identify as i32,
            traits: traits.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn traits_resolve_by_event_time_in_any_order() {
        let events = [
            (identify(r#"{"plan":"free","city":"Oslo"}"#), t(1)),
            (identify(r#"{"plan":"pro"}"#), t(3)),
            (identify(r#"{"plan":"team","city":"Rome"}"#), t(2)),
        ];
        let orders: [[usize; 3]; 3] = [[0, 1, 2], [2, 1, 0], [1, 2, 0]];
        for order in orders {
            let mut p = Profile::new("p".into(), t(0));
            for i in order {
                p.apply_event(&events[i].0, events[i].1);
            }
            let traits = p.trait_values();
            assert_eq!(traits["plan"], "pro", "order {order:?}");
            assert_eq!(traits["city"], "Rome", "order {order:?}");
            assert_eq!(p.first_seen, Some(t(1)));
            assert_eq!(p.last_seen, Some(t(3)));
            assert_eq!(p.event_count, 3);
            assert_eq!(p.event_counts["identify"], 3);
        }
    }

    #[test]
    fn deleted_traits_stay_deleted_against_older_sets() {
        let mut p = Profile::new("p".into(), t(0));
        let del = Event {
            r#type: EventType::UserAttributeChange as i32,
            deleted_traits: vec!["plan".into()],
            ..Default::default()
        };
        p.apply_event(&del, t(5));
        p.apply_event(&identify(r#"{"plan":"pro"}"#), t(4));
        assert!(!p.trait_values().contains_key("plan"));
        p.apply_event(&identify(r#"{"plan":"team"}"#), t(6));
        assert_eq!(p.trait_values()["plan"], "team");
    }

    #[test]
    fn group_traits_are_not_user_traits() {
        let mut p = Profile::new("p".into(), t(0));
        let g = Event {
            r#type: EventType::Group as i32,
            traits: br#"{"name":"Acme"}"#.to_vec(),
            ..Default::default()
        };
        p.apply_event(&g, t(1));
        assert!(p.trait_values().is_empty());
        assert_eq!(p.event_counts["group"], 1);
    }

    #[test]
    fn fold_unites_and_is_idempotent() {
        let mut a = Profile::new("a".into(), t(0));
        a.add_identities([&IdentityKey::new("user_id", "u1")]);
        a.apply_event(&identify(r#"{"plan":"free"}"#), t(10));
        let mut b = Profile::new("b".into(), t(1));
        b.add_identities([&IdentityKey::new("anonymous_id", "x")]);
        b.apply_event(&identify(r#"{"plan":"pro"}"#), t(20));
        b.apply_event(&identify(r#"{}"#), t(2));
        assert!(a.fold(&b));
        assert!(!a.fold(&b), "folding twice changes nothing");
        assert_eq!(a.event_count, 3);
        assert_eq!(a.trait_values()["plan"], "pro");
        assert_eq!(a.identities.len(), 2);
        assert_eq!(a.first_seen, Some(t(2)));
        assert_eq!(a.merged_from, ["b"]);
        let mut r = b.clone();
        r.redirect_to("a");
        r.slim();
        assert_eq!(r.merged_into.as_deref(), Some("a"));
        assert!(r.folded && r.identities.is_empty() && r.event_count == 0);
        let json = serde_json::to_string(&a).expect("serialises");
        assert!(json.contains("\"schema_version\":1"), "{json}");
        let back: Profile = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, a);
    }

    /// Stored times read as chrono reads them, in the form Herald writes and in others
    /// (an older writer, a hand-edited value), and a text that is no time is refused.
    #[test]
    fn stored_times_read_as_chrono_reads_them() {
        let chrono = |s: &str| s.parse::<DateTime<Utc>>().expect("chrono reads it");
        let stored = |created: &str, seen: &str, at: &str| {
            format!(
                r#"{{"schema_version":1,"id":"p","created_at":"{created}","first_seen":"{seen}",
                "last_seen":null,"traits":{{"plan":{{"value":"pro","at":"{at}"}}}},
                "consent":{{"purposes":{{"ads":{{"value":true,"at":"{at}"}}}}}},
                "updated_at":"{created}"}}"#
            )
        };
        for (created, seen, at) in [
            (
                "2026-11-20T10:00:01Z",
                "2026-11-20T10:00:01.250Z",
                "2026-11-20T10:00:01.123456789Z",
            ),
            (
                "2026-11-20T12:00:01+02:00",
                "2026-11-20 10:00:01.5Z",
                "2016-12-31T23:59:60.5Z",
            ),
        ] {
            let p: Profile = serde_json::from_str(&stored(created, seen, at)).expect("reads");
            assert_eq!(p.created_at, chrono(created));
            assert_eq!(p.updated_at, chrono(created));
            assert_eq!(p.first_seen, Some(chrono(seen)));
            assert_eq!(p.last_seen, None);
            assert_eq!(p.traits["plan"].at, chrono(at));
            assert_eq!(p.consent.purposes["ads"].at, chrono(at));
        }
        let err = serde_json::from_str::<Profile>(&stored(
            "2026-02-30T10:00:01Z",
            "2026-11-20T10:00:01Z",
            "2026-11-20T10:00:01Z",
        ))
        .expect_err("no such day");
        assert!(err.to_string().contains("RFC 3339"), "{err}");
    }
}
