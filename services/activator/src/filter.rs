//! What decides whether one destination gets one event: its filter (event types, event names
//! and a CEL condition), the Segment `integrations` object, and the consent gate.
//!
//! Pure logic over the payload a destination receives ([`crate::payload::render`]) and the
//! consent it carries: no NATS, no I/O. The delivery loop calls [`integrations_allow`] and
//! [`Filter::matches`] once per event and destination (a filter's evaluation error counts as no
//! match, and is counted); [`ConsentPolicy::decide`] runs before every send attempt, retries
//! included, with the user's current consent from the activator's consent cache.

use herald_common::consent::purpose_name;
use herald_common::expr::{Expr, ExprError, Input};
use herald_proto::v1::{Consent, EventType};
use serde_json::Value;

use crate::payload::type_name;

/// Why a filter's configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FilterError {
    /// An event type Herald does not have.
    #[error("unknown event type {given:?}: expected one of {known}")]
    UnknownEventType {
        /// The type as given.
        given: String,
        /// The known types, comma-separated.
        known: String,
    },
    /// An event name that is empty.
    #[error("an event name must not be empty")]
    EmptyEventName,
    /// The CEL condition does not compile.
    #[error("invalid filter: {0}")]
    Condition(#[from] ExprError),
}

/// Which events a destination receives, before consent.
///
/// An event matches when its type is one of `event_types` (or the list is empty) AND its
/// `event` field is one of `event_names` (or the list is empty) AND `condition`, if any, holds.
/// Within a list the entries are alternatives (OR).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Event types (`track`, `identify`, `page`, `screen`, `group`, `alias`, and Herald's own:
    /// see [`type_name`]), lower case.
    pub event_types: Vec<String>,
    /// Event names, compared exactly with the payload's `event` field (the name of a track
    /// event). A page or screen name is the payload's `name`: filter it with the condition
    /// (`event.name == "Home"`).
    pub event_names: Vec<String>,
    /// A CEL condition over `event`, the payload (see [`herald_common::expr`]).
    pub condition: Option<Expr>,
}

impl Filter {
    /// A filter from its configuration: event types are checked against Herald's (and
    /// lower-cased), the condition is compiled, so an invalid one is refused with its position.
    pub fn new(
        event_types: &[String],
        event_names: &[String],
        condition: Option<&str>,
    ) -> Result<Filter, FilterError> {
        let known = known_event_types();
        let event_types = event_types
            .iter()
            .map(|t| {
                let t = t.trim().to_lowercase();
                if known.contains(&t.as_str()) {
                    Ok(t)
                } else {
                    Err(FilterError::UnknownEventType {
                        given: t,
                        known: known.join(", "),
                    })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if event_names.iter().any(|n| n.is_empty()) {
            return Err(FilterError::EmptyEventName);
        }
        let condition = condition
            .filter(|c| !c.trim().is_empty())
            .map(Expr::compile)
            .transpose()?;
        Ok(Filter {
            event_types,
            event_names: event_names.to_vec(),
            condition,
        })
    }

    /// Whether the destination gets `payload`. Types and names are checked first, so an event
    /// they exclude never evaluates the condition; a condition that fails to evaluate (a missing
    /// field, a result that is not a bool) is an error, which the caller counts as no match.
    pub fn matches(&self, payload: &Value) -> Result<bool, ExprError> {
        if !self.matches_lists(payload) {
            return Ok(false);
        }
        match &self.condition {
            None => Ok(true),
            Some(c) => c.eval_bool(payload),
        }
    }

    /// [`Filter::matches`] with the payload already converted for CEL (`input` is
    /// `Input::new(payload)`), to evaluate several destinations' conditions on one event with
    /// one conversion.
    pub fn matches_input(&self, payload: &Value, input: &Input) -> Result<bool, ExprError> {
        if !self.matches_lists(payload) {
            return Ok(false);
        }
        match &self.condition {
            None => Ok(true),
            Some(c) => c.eval_bool_on(input),
        }
    }

    /// Whether every payload matches (no types, names or condition): the delivery loop then
    /// needs no parsed payload.
    pub fn matches_everything(&self) -> bool {
        self.event_types.is_empty() && self.event_names.is_empty() && self.condition.is_none()
    }

    fn matches_lists(&self, payload: &Value) -> bool {
        let field = |name: &str| payload.get(name).and_then(Value::as_str);
        let in_list = |list: &[String], value: Option<&str>| {
            list.is_empty() || value.is_some_and(|v| list.iter().any(|x| x == v))
        };
        in_list(&self.event_types, field("type")) && in_list(&self.event_names, field("event"))
    }
}

/// Every event type name a payload can carry, `unspecified` (0) excepted: the proto's values
/// are small, 64 leaves room for those to come.
fn known_event_types() -> Vec<&'static str> {
    (1..=64)
        .filter_map(|i| EventType::try_from(i).ok())
        .map(type_name)
        .collect()
}

/// The Segment `integrations` object of an event (its JSON as stored), read for one
/// destination id (compared exactly): `{"<id>": false}` skips that destination;
/// `{"All": false}` skips every destination not named with `true`; absent, not JSON, or
/// `All: true`, sends. A value that is an object (per-destination options, in Segment) counts
/// as `true`; any other value (null, a number, a string) is ignored, as though the key were
/// absent.
pub fn integrations_allow(integrations: &[u8], destination_id: &str) -> bool {
    if integrations.is_empty() {
        return true;
    }
    let Ok(Value::Object(integrations)) = serde_json::from_slice::<Value>(integrations) else {
        return true;
    };
    let flag = |v: Option<&Value>| match v {
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::Object(_)) => Some(true),
        _ => None,
    };
    flag(integrations.get(destination_id))
        .or_else(|| flag(integrations.get("All")))
        .unwrap_or(true)
}

/// What to do with a person who has no recorded choice on a required purpose (`allow` or
/// `deny` in config and records).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownConsent {
    /// Refuse: required purposes are opt-in (the default).
    #[default]
    Deny,
    /// Allow: only an explicit refusal blocks.
    Allow,
}

impl UnknownConsent {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Allow => "allow",
        }
    }

    /// Parses `allow` or `deny` (empty: the default, `deny`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "deny" => Ok(Self::Deny),
            "allow" => Ok(Self::Allow),
            other => Err(format!("unknown_consent {other:?}: expected allow or deny")),
        }
    }
}

/// Which consent state refused a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentSide {
    /// The snapshot the event carried (its consent when it was processed).
    Event,
    /// The user's current consent.
    Current,
}

/// Why the consent gate refused a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// The person opted out of everything.
    OptedOut {
        /// The state that says so.
        side: ConsentSide,
    },
    /// A purpose the destination requires is refused.
    Refused {
        /// The purpose.
        purpose: String,
        /// The state that refuses it.
        side: ConsentSide,
    },
    /// A purpose the destination requires has no recorded choice, and the destination treats
    /// unknown as refused.
    Unknown {
        /// The purpose.
        purpose: String,
        /// The state that lacks it.
        side: ConsentSide,
    },
}

impl Denial {
    /// A bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Denial::OptedOut { .. } => "opted_out",
            Denial::Refused { .. } => "purpose_refused",
            Denial::Unknown { .. } => "purpose_unknown",
        }
    }
}

/// The consent gate's answer for one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send.
    Allow,
    /// Do not send (the event is consent-dropped).
    Deny(Denial),
}

/// The consent a destination requires: the purposes it needs and what unknown means.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsentPolicy {
    required: Vec<String>,
    unknown: UnknownConsent,
}

impl ConsentPolicy {
    /// A policy requiring each of `purposes` (names normalised as the processor records them:
    /// lower case, `data_sale_opt_out` as `data_sale`; duplicates and blanks dropped).
    pub fn new(purposes: &[String], unknown: UnknownConsent) -> Self {
        let mut required: Vec<String> = purposes
            .iter()
            .map(|p| purpose_name(p))
            .filter(|p| !p.is_empty())
            .collect();
        required.sort();
        required.dedup();
        ConsentPolicy { required, unknown }
    }

    /// The required purposes, normalised.
    pub fn required(&self) -> &[String] {
        &self.required
    }

    /// Whether an event may be sent, given the consent `snapshot` it carries (the default,
    /// empty consent when it carries none) and the user's `current` consent, `None` when no
    /// consent was ever recorded for the user (the processor writes a record on every change,
    /// so a user without one has stated nothing newer than the snapshot, which then decides
    /// alone).
    ///
    /// The rules (guarantee 5 of Herald's design), applied to the snapshot and to the current
    /// state alike, both having to allow:
    /// - an opted-out person reaches no destination, even one that requires no purpose;
    /// - each required purpose must be granted, or have no recorded choice with
    ///   [`UnknownConsent::Allow`];
    /// - a destination that requires no purpose gets everyone not opted out.
    ///
    /// A `current` older than the snapshot (a cache that is behind the processed stream) can
    /// only refuse more, never less: it may drop an event whose snapshot carries a newer grant,
    /// and the caller decides whether to wait for the cache to catch up first.
    pub fn decide(&self, snapshot: &Consent, current: Option<&Consent>) -> Decision {
        let states = [
            (ConsentSide::Event, Some(snapshot)),
            (ConsentSide::Current, current),
        ];
        let states = states.iter().filter_map(|(side, c)| c.map(|c| (*side, c)));
        for (side, c) in states.clone() {
            if c.opted_out {
                return Decision::Deny(Denial::OptedOut { side });
            }
        }
        for purpose in &self.required {
            for (side, c) in states.clone() {
                match granted(c, purpose) {
                    Some(true) => {}
                    Some(false) => {
                        return Decision::Deny(Denial::Refused {
                            purpose: purpose.clone(),
                            side,
                        });
                    }
                    None if self.unknown == UnknownConsent::Allow => {}
                    None => {
                        return Decision::Deny(Denial::Unknown {
                            purpose: purpose.clone(),
                            side,
                        });
                    }
                }
            }
        }
        Decision::Allow
    }
}

/// The recorded choice on `purpose` (normalised) in `consent`, whose keys the processor
/// records normalised; a key spelled otherwise is still found.
fn granted(consent: &Consent, purpose: &str) -> Option<bool> {
    consent.purposes.get(purpose).copied().or_else(|| {
        consent
            .purposes
            .iter()
            .find(|(k, _)| purpose_name(k) == purpose)
            .map(|(_, v)| *v)
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn track(name: &str, revenue: f64) -> Value {
        json!({"type": "track", "event": name, "properties": {"revenue": revenue},
               "integrations": {}, "herald": {"consent": {"purposes": {}, "optedOut": false}}})
    }

    #[test]
    fn types_and_names_are_or_within_a_list_and_and_across_lists() {
        let order = track("Order Completed", 12.5);
        let signup = track("Signed Up", 0.0);
        let identify = json!({"type": "identify", "traits": {"plan": "pro"}});
        let page = json!({"type": "page", "name": "Home", "properties": {}});
        // (types, names, condition, [order, signup, identify, page])
        type Case<'a> = (&'a [&'a str], &'a [&'a str], Option<&'a str>, [bool; 4]);
        let cases: &[Case] = &[
            (&[], &[], None, [true, true, true, true]),
            (&["track"], &[], None, [true, true, false, false]),
            (&["track", "identify"], &[], None, [true, true, true, false]),
            (&["Page"], &[], None, [false, false, false, true]),
            (&[], &["Order Completed"], None, [true, false, false, false]),
            (
                &[],
                &["Order Completed", "Signed Up"],
                None,
                [true, true, false, false],
            ),
            (&["identify"], &["Order Completed"], None, [false; 4]),
            (&[], &["order completed"], None, [false; 4]),
            (
                &["track"],
                &[],
                Some("event.properties.revenue > 10"),
                [true, false, false, false],
            ),
            (
                &["page"],
                &[],
                Some(r#"event.name == "Home""#),
                [false, false, false, true],
            ),
            (
                &[],
                &[],
                Some(r#"event.type == "identify" && event.traits.plan == "pro""#),
                [false, false, true, false],
            ),
        ];
        for (types, names, condition, want) in cases {
            let f = Filter::new(&strings(types), &strings(names), *condition)
                .unwrap_or_else(|e| panic!("{types:?} {names:?}: {e}"));
            for (i, payload) in [&order, &signup, &identify, &page].iter().enumerate() {
                assert_eq!(
                    f.matches(payload),
                    Ok(want[i]),
                    "{types:?} {names:?} {condition:?} on event {i}"
                );
                let input = Input::new(payload);
                assert_eq!(f.matches_input(payload, &input), Ok(want[i]));
            }
        }
    }

    /// The condition sees the payload exactly as the destination receives it.
    #[test]
    fn conditions_run_on_the_rendered_payload() {
        use herald_proto::v1::{Event, ProcessedEvent};
        let rendered = |properties: &str| {
            let mut c = consent(&[("advertising", false), ("analytics", true)], false);
            c.purposes.insert("email".into(), true);
            crate::payload::render(&ProcessedEvent {
                event: Some(Event {
                    id: "web:m".into(),
                    message_id: "m".into(),
                    r#type: EventType::Track as i32,
                    name: "Order Completed".into(),
                    user_id: "u".into(),
                    properties: properties.as_bytes().to_vec(),
                    context: br#"{"locale":"de-DE"}"#.to_vec(),
                    ..Default::default()
                }),
                profile_id: "u".into(),
                consent: Some(c),
                ..Default::default()
            })
        };
        let f = Filter::new(
            &strings(&["track"]),
            &strings(&["Order Completed"]),
            Some(
                r#"event.properties.revenue > 10 && event.context.locale == "de-DE"
                   && event.herald.consent.purposes.analytics && !event.herald.consent.optedOut"#,
            ),
        )
        .expect("valid");
        for (properties, want) in [
            (r#"{"revenue": 12}"#, true),
            (r#"{"revenue": 12.5}"#, true),
            (r#"{"revenue": 10}"#, false),
            (r#"{"revenue": 9.99}"#, false),
        ] {
            assert_eq!(f.matches(&rendered(properties)), Ok(want), "{properties}");
        }
        assert_eq!(
            f.matches(&rendered("{}")).expect_err("missing").kind(),
            "eval"
        );
    }

    /// Every part of the golden payload is reachable from a condition, under the names the
    /// destination sees.
    #[test]
    fn conditions_reach_every_part_of_the_golden_payload() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/track.json");
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("golden file"))
                .expect("json");
        for condition in [
            r#"event.type == "track" && event.event == "Order Completed""#,
            r#"event.userId == "user-42" && event.anonymousId == "anon-7""#,
            r#"event.messageId == "msg-1" && event.herald.eventId == "web:msg-1""#,
            r#"event.properties.revenue > 19 && event.properties.currency == "EUR""#,
            r#"event.properties.items.exists(i, i.sku == "A-1")"#,
            r#"event.context.library.name.startsWith("analytics-")"#,
            r#"event.integrations.All"#,
            r#"event.herald.sourceId == "web" && event.herald.profileId == "user-42""#,
            r#"event.herald.identities.exists(i, i.type == "anonymous_id" && i.value == "anon-7")"#,
            r#"!event.herald.consent.optedOut && event.herald.consent.purposes.analytics"#,
            r#"!event.herald.consent.purposes.advertising && !event.herald.historical"#,
            r#"event.receivedAt.startsWith("2026-11-20T")"#,
        ] {
            let f = Filter::new(&[], &[], Some(condition)).expect(condition);
            assert_eq!(f.matches(&golden), Ok(true), "{condition}");
        }
    }

    #[test]
    fn a_condition_that_fails_is_an_error_for_the_caller_to_count() {
        let f = Filter::new(&[], &[], Some("event.properties.revenue > 10")).expect("valid");
        let identify = json!({"type": "identify", "traits": {}});
        assert_eq!(
            f.matches(&identify).expect_err("no properties").kind(),
            "eval"
        );
        let f = Filter::new(&[], &[], Some("event.properties.revenue")).expect("valid");
        assert_eq!(
            f.matches(&track("x", 1.0)).expect_err("not a bool").kind(),
            "not_bool"
        );
        // A type or name that excludes the event answers before the condition runs.
        let f = Filter::new(
            &strings(&["track"]),
            &[],
            Some("event.properties.revenue > 10"),
        )
        .expect("valid");
        assert_eq!(f.matches(&identify), Ok(false));
    }

    #[test]
    fn invalid_configuration_is_refused() {
        let err = Filter::new(&strings(&["purchase"]), &[], None).expect_err("unknown type");
        assert!(
            matches!(&err, FilterError::UnknownEventType { given, known }
                if given == "purchase" && known.contains("track") && !known.contains("unspecified")),
            "{err}"
        );
        assert_eq!(
            Filter::new(&[], &strings(&[""]), None),
            Err(FilterError::EmptyEventName)
        );
        let err = Filter::new(&[], &[], Some("event.type ==")).expect_err("syntax");
        assert!(
            err.to_string()
                .starts_with("invalid filter: syntax error at 1:14:"),
            "{err}"
        );
        // A blank condition is no condition.
        let f = Filter::new(&[], &[], Some("  ")).expect("blank");
        assert_eq!(f.condition, None);
        let f = Filter::new(&strings(&[" TRACK "]), &[], None).expect("valid");
        assert_eq!(f.event_types, strings(&["track"]));
    }

    #[test]
    fn integrations_object_by_destination_id() {
        let cases: &[(Value, bool, bool)] = &[
            // (integrations, reaches "hook", reaches "other")
            (Value::Null, true, true),
            (json!({}), true, true),
            (json!({"All": true}), true, true),
            (json!({"All": false}), false, false),
            (json!({"All": false, "hook": true}), true, false),
            (json!({"All": false, "hook": {"apiKey": "k"}}), true, false),
            (json!({"hook": false}), false, true),
            (json!({"All": true, "hook": false}), false, true),
            (json!({"All": false, "hook": null}), false, false),
            (json!({"hook": "false"}), true, true),
            (json!({"Hook": false}), true, true),
            (json!({"All": {}}), true, true),
            (json!("All"), true, true),
        ];
        for (integrations, hook, other) in cases {
            // As stored with the event: no bytes when the call had no `integrations`.
            let stored = if integrations.is_null() {
                Vec::new()
            } else {
                serde_json::to_vec(integrations).expect("serialises")
            };
            assert_eq!(integrations_allow(&stored, "hook"), *hook, "{integrations}");
            assert_eq!(
                integrations_allow(&stored, "other"),
                *other,
                "{integrations}"
            );
        }
        // Not JSON: as if absent.
        assert!(integrations_allow(b"{not json", "hook"));
    }

    fn consent(purposes: &[(&str, bool)], opted_out: bool) -> Consent {
        Consent {
            purposes: purposes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            opted_out,
            updated_at: None,
        }
    }

    #[test]
    fn consent_gate_follows_the_design_rules() {
        use ConsentSide::{Current, Event};
        use UnknownConsent::{Allow, Deny};
        let none = Consent::default();
        let ads_yes = consent(&[("advertising", true)], false);
        let ads_no = consent(&[("advertising", false)], false);
        let analytics_yes = consent(&[("analytics", true)], false);
        let opted_out = consent(&[("advertising", false)], true);
        let ads_yes_opted_out = consent(&[("advertising", true)], true);
        let sale_yes = consent(&[("data_sale", true)], false);
        let sale_no = consent(&[("data_sale", false)], false);
        let upper = consent(&[("Advertising", true)], false);
        let both = consent(&[("advertising", true), ("analytics", true)], false);
        let allow = Decision::Allow;
        let opted = |side| Decision::Deny(Denial::OptedOut { side });
        let refused = |p: &str, side| {
            Decision::Deny(Denial::Refused {
                purpose: p.into(),
                side,
            })
        };
        let unknown = |p: &str, side| {
            Decision::Deny(Denial::Unknown {
                purpose: p.into(),
                side,
            })
        };
        // (required, unknown, snapshot, current, decision)
        type Case<'a> = (
            &'a [&'a str],
            UnknownConsent,
            &'a Consent,
            Option<&'a Consent>,
            Decision,
        );
        let cases: Vec<Case> = vec![
            // No purpose required: everyone not opted out.
            (&[], Deny, &none, None, allow.clone()),
            (&[], Deny, &ads_no, Some(&ads_no), allow.clone()),
            (&[], Deny, &opted_out, None, opted(Event)),
            (&[], Allow, &none, Some(&opted_out), opted(Current)),
            // Opted out in either state: nothing, even with the purpose granted.
            (
                &["advertising"],
                Allow,
                &ads_yes_opted_out,
                Some(&ads_yes),
                opted(Event),
            ),
            (
                &["advertising"],
                Allow,
                &ads_yes,
                Some(&ads_yes_opted_out),
                opted(Current),
            ),
            // A required purpose granted in both.
            (
                &["advertising"],
                Deny,
                &ads_yes,
                Some(&ads_yes),
                allow.clone(),
            ),
            // Current unknown: no record, the snapshot decides.
            (&["advertising"], Deny, &ads_yes, None, allow.clone()),
            (
                &["advertising"],
                Deny,
                &ads_no,
                None,
                refused("advertising", Event),
            ),
            // Refused in either state.
            (
                &["advertising"],
                Allow,
                &ads_no,
                Some(&ads_yes),
                refused("advertising", Event),
            ),
            (
                &["advertising"],
                Allow,
                &ads_yes,
                Some(&ads_no),
                refused("advertising", Current),
            ),
            // No recorded choice: deny by default, allow when the destination says so.
            (
                &["advertising"],
                Deny,
                &none,
                None,
                unknown("advertising", Event),
            ),
            (
                &["advertising"],
                Deny,
                &analytics_yes,
                Some(&analytics_yes),
                unknown("advertising", Event),
            ),
            (
                &["advertising"],
                Deny,
                &ads_yes,
                Some(&analytics_yes),
                unknown("advertising", Current),
            ),
            (&["advertising"], Allow, &none, None, allow.clone()),
            (
                &["advertising"],
                Allow,
                &analytics_yes,
                Some(&ads_yes),
                allow.clone(),
            ),
            // Every required purpose must hold.
            (
                &["advertising", "analytics"],
                Deny,
                &ads_yes,
                Some(&ads_yes),
                unknown("analytics", Event),
            ),
            (
                &["advertising", "analytics"],
                Deny,
                &both,
                None,
                allow.clone(),
            ),
            // Names: lower case, and CCPA's data_sale_opt_out is the purpose data_sale.
            (&["ADVERTISING"], Deny, &ads_yes, None, allow.clone()),
            (&["advertising"], Deny, &upper, None, allow.clone()),
            (
                &["data_sale_opt_out"],
                Deny,
                &sale_yes,
                Some(&sale_yes),
                allow.clone(),
            ),
            (
                &["Data_Sale_Opt_Out"],
                Deny,
                &sale_no,
                None,
                refused("data_sale", Event),
            ),
        ];
        for (i, (required, unknown_consent, snapshot, current, want)) in
            cases.into_iter().enumerate()
        {
            let policy = ConsentPolicy::new(&strings(required), unknown_consent);
            assert_eq!(
                policy.decide(snapshot, current),
                want,
                "case {i}: {required:?} {unknown_consent:?} {snapshot:?} {current:?}"
            );
        }
    }

    #[test]
    fn policy_normalises_its_purposes_and_labels_denials() {
        let p = ConsentPolicy::new(
            &strings(&["Advertising", "advertising", " ", "DATA_SALE_OPT_OUT"]),
            UnknownConsent::default(),
        );
        assert_eq!(p.required(), strings(&["advertising", "data_sale"]));
        assert_eq!(UnknownConsent::default(), UnknownConsent::Deny);
        let side = ConsentSide::Event;
        let labels: Vec<&str> = [
            Denial::OptedOut { side },
            Denial::Refused {
                purpose: "a".into(),
                side,
            },
            Denial::Unknown {
                purpose: "a".into(),
                side,
            },
        ]
        .iter()
        .map(Denial::kind)
        .collect();
        assert_eq!(labels, ["opted_out", "purpose_refused", "purpose_unknown"]);
    }
}
