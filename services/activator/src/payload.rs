//! The JSON every webhook and log destination receives: Segment-spec fields plus a `herald`
//! object ([`render`]), and for an erasure the erasure payload ([`erasure`]). Both are public
//! contracts, fixed by golden-file tests.

use std::collections::BTreeMap;

use herald_proto::time::Rfc3339;
use herald_proto::v1::{Consent, EventType, ProcessedEvent};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

/// The Segment call name of an event type (Herald's own types use their snake_case names).
pub fn type_name(t: EventType) -> &'static str {
    match t {
        EventType::Track => "track",
        EventType::Identify => "identify",
        EventType::Page => "page",
        EventType::Screen => "screen",
        EventType::Group => "group",
        EventType::Alias => "alias",
        EventType::SessionStart => "session_start",
        EventType::SessionEnd => "session_end",
        EventType::Commerce => "commerce",
        EventType::OptOut => "opt_out",
        EventType::UserAttributeChange => "user_attribute_change",
        EventType::UserIdentityChange => "user_identity_change",
        EventType::Application => "application",
        EventType::ConsentChanged => "consent_changed",
        EventType::Erasure => "erasure",
        EventType::Unspecified => "unspecified",
    }
}

fn rfc3339(ts: &Option<prost_types::Timestamp>) -> Option<Rfc3339> {
    let ts = ts.as_ref()?;
    let dt = herald_proto::time::from_proto(ts)?;
    Some(herald_proto::time::rfc3339(&dt))
}

/// Stored JSON (`properties`, `traits`, `context`, `integrations`) as it goes out: the bytes
/// themselves, neither parsed into a tree nor printed again; `{}` when empty or not JSON.
fn raw_json(bytes: &[u8]) -> &RawValue {
    let empty = || serde_json::from_str::<&RawValue>("{}").expect("`{}` is JSON");
    if bytes.is_empty() {
        return empty();
    }
    serde_json::from_slice::<&RawValue>(bytes).unwrap_or_else(|_| empty())
}

/// Whether `raw` is an object with at least one member.
fn is_filled_object(raw: &RawValue) -> bool {
    raw.get()
        .strip_prefix('{')
        .is_some_and(|rest| rest.trim_start() != "}")
}

/// The payload's fields, in the order they go out (see [`render_json`]).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Rendered<'a> {
    r#type: &'static str,
    message_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    user_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    anonymous_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    group_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    previous_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traits: Option<&'a RawValue>,
    context: &'a RawValue,
    integrations: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<Rfc3339>,
    #[serde(skip_serializing_if = "Option::is_none")]
    original_timestamp: Option<Rfc3339>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sent_at: Option<Rfc3339>,
    #[serde(skip_serializing_if = "Option::is_none")]
    received_at: Option<Rfc3339>,
    herald: HeraldPart<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HeraldPart<'a> {
    event_id: &'a str,
    source_id: &'a str,
    profile_id: &'a str,
    identities: Vec<IdentityPart<'a>>,
    consent: ConsentPart<'a>,
    historical: bool,
}

#[derive(Serialize)]
struct IdentityPart<'a> {
    r#type: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConsentPart<'a> {
    /// Sorted by purpose, so equal consent renders the same bytes.
    purposes: BTreeMap<&'a str, bool>,
    opted_out: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<Rfc3339>,
}

impl<'a> ConsentPart<'a> {
    fn of(c: Option<&'a Consent>) -> Self {
        Self {
            purposes: c
                .map(|c| c.purposes.iter().map(|(k, v)| (k.as_str(), *v)).collect())
                .unwrap_or_default(),
            opted_out: c.is_some_and(|c| c.opted_out),
            updated_at: c.and_then(|c| rfc3339(&c.updated_at)),
        }
    }
}

/// Renders a processed event as Segment-spec JSON with a `herald` object: the body a webhook,
/// NATS or log destination receives for one event. The stored JSON objects (`properties`,
/// `context`, ...) go out as they were stored, so this costs no parse tree.
pub fn render_json(p: &ProcessedEvent) -> Vec<u8> {
    let default = Default::default();
    let e = p.event.as_ref().unwrap_or(&default);
    let kind = EventType::try_from(e.r#type).unwrap_or(EventType::Unspecified);
    let named = (!e.name.is_empty()).then_some(e.name.as_str());
    let page_like = matches!(kind, EventType::Page | EventType::Screen);
    let properties = raw_json(&e.properties);
    let traits = raw_json(&e.traits);
    let wants_properties = matches!(kind, EventType::Track | EventType::Page | EventType::Screen);
    let wants_traits = matches!(kind, EventType::Identify | EventType::Group);
    let rendered = Rendered {
        r#type: type_name(kind),
        message_id: &e.message_id,
        event: named.filter(|_| !page_like),
        name: named.filter(|_| page_like),
        user_id: &e.user_id,
        anonymous_id: &e.anonymous_id,
        group_id: &e.group_id,
        previous_id: &e.previous_id,
        properties: (wants_properties || is_filled_object(properties)).then_some(properties),
        traits: (wants_traits || is_filled_object(traits)).then_some(traits),
        context: raw_json(&e.context),
        integrations: raw_json(&e.integrations),
        timestamp: rfc3339(&e.timestamp),
        original_timestamp: rfc3339(&e.original_timestamp),
        sent_at: rfc3339(&e.sent_at),
        received_at: rfc3339(&e.received_at),
        herald: HeraldPart {
            event_id: &e.id,
            source_id: &e.source_id,
            profile_id: &p.profile_id,
            identities: p
                .identities
                .iter()
                .map(|i| IdentityPart {
                    r#type: &i.r#type,
                    value: &i.value,
                })
                .collect(),
            consent: ConsentPart::of(p.consent.as_ref()),
            historical: e.historical,
        },
    };
    serde_json::to_vec(&rendered).expect("the payload serialises")
}

/// [`render_json`] as a JSON value, for what looks inside the payload (a filter's condition).
pub fn render(p: &ProcessedEvent) -> Value {
    serde_json::from_slice(&render_json(p)).expect("a rendered payload is JSON")
}

/// The erasure payload a destination receives once per erasure request (see
/// [`crate::erasure`]): `type` `erasure`, the request id (also as `messageId`, and the
/// `Idempotency-Key` / `Nats-Msg-Id`), the identities to erase, the profile erased (when one
/// was found) and the time of the erasure.
pub fn erasure(p: &ProcessedEvent) -> Value {
    let default = Default::default();
    let e = p.event.as_ref().unwrap_or(&default);
    let identities: Vec<Value> = p
        .identities
        .iter()
        .map(|i| json!({"type": i.r#type, "value": i.value}))
        .collect();
    let mut m = Map::new();
    m.insert("type".into(), "erasure".into());
    m.insert("requestId".into(), e.message_id.clone().into());
    m.insert("messageId".into(), e.message_id.clone().into());
    m.insert("identities".into(), identities.into());
    if !p.profile_id.is_empty() {
        m.insert("profileId".into(), p.profile_id.clone().into());
    }
    if let Some(t) = rfc3339(&e.timestamp) {
        m.insert("timestamp".into(), t.as_str().into());
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;
    use herald_proto::v1::{Event, Identity};

    use super::*;

    fn ts(s: &str) -> Option<prost_types::Timestamp> {
        let dt = DateTime::parse_from_rfc3339(s).expect("valid time");
        Some(herald_proto::time::to_proto(dt.to_utc()))
    }

    fn sample() -> ProcessedEvent {
        let mut consent = Consent {
            opted_out: false,
            updated_at: ts("2026-11-20T10:00:00Z"),
            ..Default::default()
        };
        consent.purposes.insert("advertising".into(), false);
        consent.purposes.insert("analytics".into(), true);
        ProcessedEvent {
            event: Some(Event {
                id: "web:msg-1".into(),
                message_id: "msg-1".into(),
                source_id: "web".into(),
                r#type: EventType::Track as i32,
                name: "Order Completed".into(),
                user_id: "user-42".into(),
                anonymous_id: "anon-7".into(),
                properties: br#"{"revenue":19.99,"currency":"EUR","items":[{"sku":"A-1"}]}"#.to_vec(),
                context: br#"{"ip":"203.0.113.9","library":{"name":"analytics-python","version":"2.4.0"}}"#.to_vec(),
                integrations: br#"{"All":true}"#.to_vec(),
                original_timestamp: ts("2026-11-20T10:00:01.250Z"),
                sent_at: ts("2026-11-20T10:00:02.000Z"),
                received_at: ts("2026-11-20T10:00:02.500Z"),
                timestamp: ts("2026-11-20T10:00:01.750Z"),
                consent: Some(consent.clone()),
                partition_key: "user-42".into(),
                partition: 3,
                ..Default::default()
            }),
            profile_id: "user-42".into(),
            identities: vec![
                Identity { r#type: "user_id".into(), value: "user-42".into() },
                Identity { r#type: "anonymous_id".into(), value: "anon-7".into() },
            ],
            consent: Some(consent),
        }
    }

    /// The rendered JSON is a public contract: compare with the committed golden file.
    /// Set `HERALD_UPDATE_GOLDEN=1` to rewrite it after an intended change.
    #[test]
    fn golden_track_payload() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/track.json");
        let rendered = serde_json::to_string_pretty(&render(&sample())).expect("renders") + "\n";
        if std::env::var_os("HERALD_UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &rendered).expect("writes golden file");
        }
        let golden = std::fs::read_to_string(path).expect("golden file exists");
        assert_eq!(
            rendered, golden,
            "payload changed: this is a public contract"
        );
    }

    /// Stored JSON goes out as it was stored (not parsed and printed again: a number too big
    /// for a float keeps its digits); what is empty or not JSON goes out as `{}`; an identify's
    /// empty properties are left out, a track's kept.
    #[test]
    fn stored_json_goes_out_as_stored() {
        let mut p = sample();
        let e = p.event.as_mut().expect("event");
        e.properties = br#"{"id":123456789012345678901234567890,"z":1,"a":2}"#.to_vec();
        e.context = b"{not json".to_vec();
        e.integrations = Vec::new();
        let body = String::from_utf8(render_json(&p)).expect("UTF-8");
        assert!(
            body.contains(r#""properties":{"id":123456789012345678901234567890,"z":1,"a":2}"#),
            "{body}"
        );
        assert!(body.contains(r#""context":{}"#), "{body}");
        assert!(body.contains(r#""integrations":{}"#), "{body}");
        assert!(!body.contains(r#""traits""#), "{body}");

        let e = p.event.as_mut().expect("event");
        e.r#type = EventType::Identify as i32;
        e.properties = b" { } ".to_vec();
        e.traits = br#"{"plan":"pro"}"#.to_vec();
        let v = render(&p);
        assert_eq!(v.get("properties"), None, "{v}");
        assert_eq!(v["traits"], json!({"plan": "pro"}));

        let e = p.event.as_mut().expect("event");
        e.r#type = EventType::Track as i32;
        e.properties = Vec::new();
        e.traits = Vec::new();
        let v = render(&p);
        assert_eq!(v["properties"], json!({}));
        assert_eq!(v.get("traits"), None, "{v}");
    }

    /// The erasure payload is a public contract too (`tests/golden/erasure.json`).
    #[test]
    fn golden_erasure_payload() {
        let p = ProcessedEvent {
            event: Some(Event {
                id: "erasure:req-0123456789abcdef01234567:3".into(),
                message_id: "req-0123456789abcdef01234567".into(),
                source_id: "herald".into(),
                r#type: EventType::Erasure as i32,
                user_id: "user-42".into(),
                anonymous_id: "anon-7".into(),
                timestamp: ts("2026-11-20T10:05:00Z"),
                received_at: ts("2026-11-20T10:05:00Z"),
                partition: 3,
                ..Default::default()
            }),
            profile_id: "user-42".into(),
            identities: vec![
                Identity {
                    r#type: "anonymous_id".into(),
                    value: "anon-7".into(),
                },
                Identity {
                    r#type: "email".into(),
                    value: "ann@example.com".into(),
                },
                Identity {
                    r#type: "user_id".into(),
                    value: "user-42".into(),
                },
            ],
            consent: None,
        };
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/erasure.json");
        let rendered = serde_json::to_string_pretty(&erasure(&p)).expect("renders") + "\n";
        if std::env::var_os("HERALD_UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &rendered).expect("writes golden file");
        }
        let golden = std::fs::read_to_string(path).expect("golden file exists");
        assert_eq!(
            rendered, golden,
            "erasure payload changed: this is a public contract"
        );
    }

    #[test]
    fn identify_carries_traits_not_properties() {
        let p = ProcessedEvent {
            event: Some(Event {
                r#type: EventType::Identify as i32,
                user_id: "u".into(),
                traits: br#"{"email":"ann@example.com"}"#.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = render(&p);
        assert_eq!(v["type"], "identify");
        assert_eq!(v["traits"]["email"], "ann@example.com");
        assert!(v.get("properties").is_none());
        assert!(v.get("event").is_none());
        assert_eq!(v["herald"]["consent"]["optedOut"], false);
    }
}
