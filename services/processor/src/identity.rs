//! Identities: what names a person (`user_id:…`, `anonymous_id:…`, `email:…`, `mpid:…`, device
//! ids), how they are read from an event, the guard rails (blocked values, per-type limits,
//! priority), and the merge plan: given which profile each identity of an event belongs to, which
//! profiles merge and which identities link. The plan is pure; `resolver` carries it out on KV.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_proto::v1::{Event, EventType};
use serde::{Deserialize, Serialize};

use crate::profiles_config::ProfilesConfig;

pub use herald_common::identity::{ANONYMOUS_ID, EMAIL, USER_ID, normalize_kind, normalize_value};

/// One identity: a type and a value, written `type:value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentityKey {
    /// The identity type, e.g. `user_id`, `email`, `mpid`, `ios_idfv`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The identity value.
    pub value: String,
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl IdentityKey {
    /// An identity with its type and value normalised (see [`normalize_kind`],
    /// [`normalize_value`]).
    pub fn new(kind: &str, value: &str) -> Self {
        let kind = normalize_kind(kind);
        let value = normalize_value(&kind, value);
        Self { kind, value }
    }

    /// Parses `type:value` (the value may itself contain `:`).
    pub fn parse(s: &str) -> Option<Self> {
        let (kind, value) = s.split_once(':')?;
        let key = Self::new(kind, value);
        (!key.kind.is_empty() && !key.value.is_empty()).then_some(key)
    }

    /// The key of this identity in the identities and suppressions buckets: the type, a dot,
    /// and the value in unpadded URL-safe base64 (KV keys allow only `[-/_=.a-zA-Z0-9]`).
    pub fn kv_key(&self) -> String {
        herald_common::identity::kv_key(&self.kind, &self.value)
    }

    /// The identity a bucket key names (the inverse of [`IdentityKey::kv_key`]).
    pub fn from_kv_key(key: &str) -> Option<Self> {
        let (kind, value) = key.split_once('.')?;
        let value = String::from_utf8(URL_SAFE_NO_PAD.decode(value).ok()?).ok()?;
        Some(Self {
            kind: kind.to_string(),
            value,
        })
    }
}

/// The guard rails, prepared from [`ProfilesConfig`] for per-event use.
#[derive(Debug, Clone)]
pub struct Guard {
    blocked: HashSet<String>,
    priority: BTreeMap<String, usize>,
    limits: BTreeMap<String, u32>,
    default_limit: u32,
}

impl Guard {
    /// Guard rails from the config.
    pub fn new(cfg: &ProfilesConfig) -> Self {
        Self {
            blocked: cfg
                .blocked_values
                .iter()
                .map(|v| v.trim().to_lowercase())
                .collect(),
            priority: cfg
                .identity_priority
                .iter()
                .enumerate()
                .map(|(i, k)| (normalize_kind(k), i))
                .collect(),
            limits: cfg
                .identity_limits
                .iter()
                .map(|(k, v)| (normalize_kind(k), *v))
                .collect(),
            default_limit: cfg.default_identity_limit,
        }
    }

    /// Whether `value` may never link anything.
    pub fn is_blocked(&self, value: &str) -> bool {
        let v = value.trim();
        v.is_empty() || self.blocked.contains(&v.to_lowercase())
    }

    /// The most identities of type `kind` one profile may hold.
    pub fn limit(&self, kind: &str) -> usize {
        self.limits.get(kind).copied().unwrap_or(self.default_limit) as usize
    }

    /// Sort key of an identity type: configured types in their order, then the rest
    /// alphabetically, `anonymous_id` last.
    pub fn rank<'a>(&self, kind: &'a str) -> (usize, usize, &'a str) {
        match self.priority.get(kind) {
            Some(i) => (0, *i, ""),
            None if kind == ANONYMOUS_ID => (2, 0, ""),
            None => (1, 0, kind),
        }
    }

    /// Sorts identities by priority (then value), removing duplicates.
    pub fn sort(&self, ids: &mut Vec<IdentityKey>) {
        ids.sort_by(|a, b| {
            self.rank(&a.kind)
                .cmp(&self.rank(&b.kind))
                .then_with(|| a.value.cmp(&b.value))
        });
        ids.dedup();
    }
}

/// The identities an event names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extracted {
    /// Usable identities in priority order.
    pub identities: Vec<IdentityKey>,
    /// The `previousId` of an `alias` call: a user id or an anonymous id, whichever is known.
    pub alias_previous: Option<String>,
    /// How many identity values were blocked.
    pub blocked: usize,
}

/// Reads the identities of `event`: `userId`, `anonymousId`, `Event.identities`, and for
/// `identify` calls `traits.email`. Blocked values are left out (and counted).
pub fn extract(event: &Event, guard: &Guard) -> Extracted {
    let mut out = Extracted::default();
    let push = |kind: &str, value: &str, out: &mut Extracted| {
        if guard.is_blocked(value) {
            out.blocked += 1;
            return;
        }
        let key = IdentityKey::new(kind, value);
        if key.kind.is_empty() || guard.is_blocked(&key.value) {
            out.blocked += 1;
            return;
        }
        out.identities.push(key);
    };
    if !event.user_id.is_empty() {
        push(USER_ID, &event.user_id, &mut out);
    }
    if !event.anonymous_id.is_empty() {
        push(ANONYMOUS_ID, &event.anonymous_id, &mut out);
    }
    for (kind, value) in &event.identities {
        push(kind, value, &mut out);
    }
    if event.r#type == EventType::Identify as i32
        && !event.traits.is_empty()
        && let Ok(serde_json::Value::Object(traits)) =
            serde_json::from_slice::<serde_json::Value>(&event.traits)
        && let Some(serde_json::Value::String(email)) = traits.get("email")
    {
        push(EMAIL, email, &mut out);
    }
    if event.r#type == EventType::Alias as i32 && !event.previous_id.is_empty() {
        if guard.is_blocked(&event.previous_id) {
            out.blocked += 1;
        } else {
            out.alias_previous = Some(event.previous_id.trim().to_string());
        }
    }
    guard.sort(&mut out.identities);
    out
}

/// What the resolver knows about one profile when planning.
#[derive(Debug, Clone)]
pub struct PlanProfile {
    /// The identities the profile holds.
    pub identities: BTreeSet<IdentityKey>,
}

/// Why an identity of an event was not linked or its profile not merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Linking it would exceed its type's limit.
    Limit,
    /// Merging its profile would exceed a type's limit.
    MergeLimit,
}

impl Skip {
    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Skip::Limit => "limit",
            Skip::MergeLimit => "merge_limit",
        }
    }
}

/// What to do for one event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The profiles the event's profile is made of (one unless profiles merge); empty when a
    /// new profile is needed.
    pub group: Vec<String>,
    /// Identities to link to the event's profile.
    pub link: Vec<IdentityKey>,
    /// Identities left alone, with the reason.
    pub skipped: Vec<(IdentityKey, Skip)>,
}

impl Plan {
    /// True when nothing in the identity graph changes: one existing profile, nothing to link.
    pub fn is_steady(&self) -> bool {
        self.group.len() == 1 && self.link.is_empty()
    }
}

fn counts<'a>(ids: impl Iterator<Item = &'a IdentityKey>) -> BTreeMap<&'a str, usize> {
    let mut m = BTreeMap::new();
    for id in ids {
        *m.entry(id.kind.as_str()).or_insert(0) += 1;
    }
    m
}

/// Whether the union of `a` and `b` keeps every identity type within its limit, or at least
/// does not grow a type that is already past it.
fn union_fits(guard: &Guard, a: &BTreeSet<IdentityKey>, b: &BTreeSet<IdentityKey>) -> bool {
    let union: BTreeSet<&IdentityKey> = a.iter().chain(b.iter()).collect();
    let ca = counts(a.iter());
    let cb = counts(b.iter());
    counts(union.into_iter()).into_iter().all(|(kind, n)| {
        n <= guard.limit(kind)
            || n <= ca
                .get(kind)
                .copied()
                .unwrap_or(0)
                .max(cb.get(kind).copied().unwrap_or(0))
    })
}

/// Plans an event: `lookups` are its identities in priority order, each with the canonical
/// profile it belongs to (if any); `profiles` describes those profiles. Identities decide in
/// priority order: the first one that belongs to a profile (and whose profile can take the
/// higher-priority unlinked identities) sets the event's profile; every later profile merges
/// into it when the union keeps the limits; unlinked identities link within the limits.
/// `explicit` (an `alias` call) ignores the limits.
pub fn plan(
    lookups: &[(IdentityKey, Option<String>)],
    profiles: &BTreeMap<String, PlanProfile>,
    guard: &Guard,
    explicit: bool,
) -> Plan {
    let mut out = Plan::default();
    let mut pending: Vec<IdentityKey> = Vec::new();
    // Identities of the group so far, including those planned to link.
    let mut held: BTreeSet<IdentityKey> = BTreeSet::new();
    let empty = PlanProfile {
        identities: BTreeSet::new(),
    };
    for (key, profile) in lookups {
        match profile {
            None if out.group.is_empty() => pending.push(key.clone()),
            None => {
                if held.contains(key) {
                    // Listed on the group's profile but not mapped (a link interrupted by a
                    // crash): map it.
                    if !out.link.contains(key) {
                        out.link.push(key.clone());
                    }
                    continue;
                }
                let n = held.iter().filter(|k| k.kind == key.kind).count();
                if explicit || n < guard.limit(&key.kind) {
                    held.insert(key.clone());
                    out.link.push(key.clone());
                } else {
                    out.skipped.push((key.clone(), Skip::Limit));
                }
            }
            Some(p) if out.group.contains(p) => {
                if !held.contains(key) {
                    // Mapped to the profile but missing from its list (an interrupted link).
                    held.insert(key.clone());
                    out.link.push(key.clone());
                }
            }
            Some(p) => {
                let mut theirs = profiles.get(p).unwrap_or(&empty).identities.clone();
                theirs.insert(key.clone());
                if out.group.is_empty() {
                    let mine: BTreeSet<IdentityKey> = pending.iter().cloned().collect();
                    if explicit || union_fits(guard, &theirs, &mine) {
                        out.group.push(p.clone());
                        held = theirs;
                        for k in pending.drain(..) {
                            if held.insert(k.clone()) {
                                out.link.push(k);
                            }
                        }
                        if !profiles
                            .get(p)
                            .is_some_and(|pp| pp.identities.contains(key))
                        {
                            out.link.push(key.clone());
                        }
                    } else {
                        out.skipped.push((key.clone(), Skip::MergeLimit));
                    }
                } else if explicit || union_fits(guard, &held, &theirs) {
                    out.group.push(p.clone());
                    if !profiles
                        .get(p)
                        .is_some_and(|pp| pp.identities.contains(key))
                    {
                        out.link.push(key.clone());
                    }
                    held.extend(theirs);
                } else {
                    out.skipped.push((key.clone(), Skip::MergeLimit));
                }
            }
        }
    }
    if out.group.is_empty() {
        // A new profile for the unlinked identities, within the limits.
        let mut taken: BTreeMap<String, usize> = BTreeMap::new();
        for k in pending {
            let n = taken.entry(k.kind.clone()).or_insert(0);
            if explicit || *n < guard.limit(&k.kind) {
                *n += 1;
                out.link.push(k);
            } else {
                out.skipped.push((k, Skip::Limit));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(&ProfilesConfig::default())
    }

    fn id(s: &str) -> IdentityKey {
        IdentityKey::parse(s).expect("type:value")
    }

    #[test]
    fn keys_are_valid_kv_keys_and_round_trip() {
        for s in [
            "email:Ann@Example.com",
            "user_id:u 1/2",
            "Customer ID:x:y",
            "mpid:-8",
        ] {
            let k = id(s);
            let kv = k.kv_key();
            assert!(
                kv.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-/_=.".contains(c)),
                "{kv}"
            );
            assert_eq!(IdentityKey::from_kv_key(&kv), Some(k));
        }
        assert_eq!(id("email: Ann@Example.COM ").value, "ann@example.com");
        assert_eq!(id("Customer ID:x:y").kind, "customer_id");
        assert_eq!(id("Customer ID:x:y").value, "x:y");
        assert_eq!(IdentityKey::parse("novalue:"), None);
        assert_eq!(IdentityKey::parse("nocolon"), None);
    }

    #[test]
    fn blocked_values_are_left_out() {
        let g = guard();
        let cases = [
            ("null", true),
            (" NULL ", true),
            ("undefined", true),
            ("0", true),
            ("", true),
            ("   ", true),
            ("[object Object]", true),
            ("00", false),
            ("u1", false),
        ];
        for (v, blocked) in cases {
            assert_eq!(g.is_blocked(v), blocked, "{v:?}");
        }
        let mut e = Event {
            user_id: "null".into(),
            anonymous_id: "a1".into(),
            ..Default::default()
        };
        e.identities.insert("email".into(), "undefined".into());
        let x = extract(&e, &g);
        assert_eq!(x.identities, vec![id("anonymous_id:a1")]);
        assert_eq!(x.blocked, 2);
    }

    #[test]
    fn extraction_orders_by_priority() {
        let mut e = Event {
            r#type: EventType::Identify as i32,
            user_id: "u1".into(),
            anonymous_id: "a1".into(),
            traits: br#"{"email":" Ann@Example.com"}"#.to_vec(),
            ..Default::default()
        };
        e.identities.insert("ios_idfv".into(), "dev-1".into());
        e.identities.insert("mpid".into(), "42".into());
        e.identities
            .insert("email".into(), "ann@example.com".into());
        let x = extract(&e, &guard());
        let got: Vec<String> = x.identities.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "user_id:u1",
                "mpid:42",
                "email:ann@example.com",
                "ios_idfv:dev-1",
                "anonymous_id:a1"
            ]
        );
        let alias = Event {
            r#type: EventType::Alias as i32,
            user_id: "u1".into(),
            previous_id: "a1".into(),
            ..Default::default()
        };
        assert_eq!(
            extract(&alias, &guard()).alias_previous.as_deref(),
            Some("a1")
        );
    }

    fn profiles(list: &[(&str, &[&str])]) -> BTreeMap<String, PlanProfile> {
        list.iter()
            .map(|(p, ids)| {
                (
                    p.to_string(),
                    PlanProfile {
                        identities: ids.iter().map(|s| id(s)).collect(),
                    },
                )
            })
            .collect()
    }

    fn lookups(list: &[(&str, Option<&str>)]) -> Vec<(IdentityKey, Option<String>)> {
        list.iter()
            .map(|(k, p)| (id(k), p.map(String::from)))
            .collect()
    }

    #[test]
    fn plans() {
        let g = guard();
        struct Case {
            name: &'static str,
            lookups: Vec<(IdentityKey, Option<String>)>,
            profiles: BTreeMap<String, PlanProfile>,
            explicit: bool,
            group: Vec<&'static str>,
            link: Vec<&'static str>,
            skipped: Vec<(&'static str, Skip)>,
        }
        let cases = [
            Case {
                name: "all new: one new profile",
                lookups: lookups(&[("user_id:u1", None), ("anonymous_id:a1", None)]),
                profiles: profiles(&[]),
                explicit: false,
                group: vec![],
                link: vec!["user_id:u1", "anonymous_id:a1"],
                skipped: vec![],
            },
            Case {
                name: "listed on the profile but not mapped (an interrupted link): map it",
                lookups: lookups(&[("user_id:u1", Some("P")), ("anonymous_id:a1", None)]),
                profiles: profiles(&[("P", &["user_id:u1", "anonymous_id:a1"])]),
                explicit: false,
                group: vec!["P"],
                link: vec!["anonymous_id:a1"],
                skipped: vec![],
            },
            Case {
                name: "steady",
                lookups: lookups(&[("user_id:u1", Some("P")), ("anonymous_id:a1", Some("P"))]),
                profiles: profiles(&[("P", &["user_id:u1", "anonymous_id:a1"])]),
                explicit: false,
                group: vec!["P"],
                link: vec![],
                skipped: vec![],
            },
            Case {
                name: "identify after anonymous browsing links the user id",
                lookups: lookups(&[("user_id:u1", None), ("anonymous_id:a1", Some("A"))]),
                profiles: profiles(&[("A", &["anonymous_id:a1"])]),
                explicit: false,
                group: vec!["A"],
                link: vec!["user_id:u1"],
                skipped: vec![],
            },
            Case {
                name: "known user on a new device merges",
                lookups: lookups(&[("user_id:u1", Some("P")), ("anonymous_id:a1", Some("A"))]),
                profiles: profiles(&[("P", &["user_id:u1"]), ("A", &["anonymous_id:a1"])]),
                explicit: false,
                group: vec!["P", "A"],
                link: vec![],
                skipped: vec![],
            },
            Case {
                name: "a second user on a shared device gets their own profile",
                lookups: lookups(&[("user_id:u2", None), ("anonymous_id:d", Some("A"))]),
                profiles: profiles(&[("A", &["user_id:u1", "anonymous_id:d"])]),
                explicit: false,
                group: vec![],
                link: vec!["user_id:u2"],
                skipped: vec![("anonymous_id:d", Skip::MergeLimit)],
            },
            Case {
                name: "two known users never merge through a device",
                lookups: lookups(&[("user_id:u2", Some("B")), ("anonymous_id:d", Some("A"))]),
                profiles: profiles(&[
                    ("A", &["user_id:u1", "anonymous_id:d"]),
                    ("B", &["user_id:u2"]),
                ]),
                explicit: false,
                group: vec!["B"],
                link: vec![],
                skipped: vec![("anonymous_id:d", Skip::MergeLimit)],
            },
            Case {
                name: "alias merges two user ids anyway",
                lookups: lookups(&[("user_id:u2", Some("B")), ("user_id:u1", Some("A"))]),
                profiles: profiles(&[("A", &["user_id:u1"]), ("B", &["user_id:u2"])]),
                explicit: true,
                group: vec!["B", "A"],
                link: vec![],
                skipped: vec![],
            },
            Case {
                name: "the email limit holds",
                lookups: lookups(&[("user_id:u1", Some("P")), ("email:f@x", None)]),
                profiles: profiles(&[(
                    "P",
                    &[
                        "user_id:u1",
                        "email:a@x",
                        "email:b@x",
                        "email:c@x",
                        "email:d@x",
                        "email:e@x",
                    ],
                )]),
                explicit: false,
                group: vec!["P"],
                link: vec![],
                skipped: vec![("email:f@x", Skip::Limit)],
            },
            Case {
                name: "a mapped identity missing from its profile's list is relinked",
                lookups: lookups(&[("user_id:u1", Some("P")), ("anonymous_id:a1", Some("P"))]),
                profiles: profiles(&[("P", &["user_id:u1"])]),
                explicit: false,
                group: vec!["P"],
                link: vec!["anonymous_id:a1"],
                skipped: vec![],
            },
            Case {
                name: "a new profile takes identities within the limits",
                lookups: lookups(&[("user_id:u1", None), ("user_id:u2", None)]),
                profiles: profiles(&[]),
                explicit: false,
                group: vec![],
                link: vec!["user_id:u1"],
                skipped: vec![("user_id:u2", Skip::Limit)],
            },
        ];
        for c in cases {
            let p = plan(&c.lookups, &c.profiles, &g, c.explicit);
            let group: Vec<&str> = p.group.iter().map(String::as_str).collect();
            assert_eq!(group, c.group, "{}: group", c.name);
            let link: Vec<String> = p.link.iter().map(ToString::to_string).collect();
            assert_eq!(link, c.link, "{}: link", c.name);
            let skipped: Vec<(String, Skip)> =
                p.skipped.iter().map(|(k, s)| (k.to_string(), *s)).collect();
            let expected: Vec<(String, Skip)> =
                c.skipped.iter().map(|(k, s)| (k.to_string(), *s)).collect();
            assert_eq!(skipped, expected, "{}: skipped", c.name);
        }
    }
}
