//! The JSON every webhook and log destination receives: Segment-spec fields plus a `herald`
//! object ([`render`]), and for an erasure the erasure payload ([`erasure`]). Both are public
//! contracts, fixed by golden-file tests.

use chrono::SecondsFormat;
use herald_proto::v1::{Consent, EventType, ProcessedEvent};
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

fn rfc3339(ts: &Option<prost_types::Timestamp>) -> Option<Value> {
    let ts = ts.as_ref()?;
    let dt = herald_proto::time::from_proto(ts)?;
    Some(Value::String(
        dt.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    ))
}

fn json_object(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Object(Map::new());
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::Object(Map::new()))
}

fn consent_json(c: &Option<Consent>) -> Value {
    let Some(c) = c else {
        return json!({"purposes": {}, "optedOut": false});
    };
    let purposes: Map<String, Value> = c
        .purposes
        .iter()
        .map(|(k, v)| (k.clone(), Value::Bool(*v)))
        .collect();
    let mut out = json!({"purposes": purposes, "optedOut": c.opted_out});
    if let Some(at) = rfc3339(&c.updated_at) {
        out["updatedAt"] = at;
    }
    out
}

/// Renders a processed event as Segment-spec JSON with a `herald` object.
pub fn render(p: &ProcessedEvent) -> Value {
    let default = Default::default();
    let e = p.event.as_ref().unwrap_or(&default);
    let kind = EventType::try_from(e.r#type).unwrap_or(EventType::Unspecified);
    let mut m = Map::new();
    m.insert("type".into(), type_name(kind).into());
    m.insert("messageId".into(), e.message_id.clone().into());
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            m.insert(k.into(), v.into());
        }
    };
    match kind {
        EventType::Page | EventType::Screen => put("name", &e.name),
        _ => put("event", &e.name),
    }
    put("userId", &e.user_id);
    put("anonymousId", &e.anonymous_id);
    put("groupId", &e.group_id);
    put("previousId", &e.previous_id);
    let properties = json_object(&e.properties);
    let traits = json_object(&e.traits);
    let wants_properties = matches!(kind, EventType::Track | EventType::Page | EventType::Screen);
    let wants_traits = matches!(kind, EventType::Identify | EventType::Group);
    if wants_properties || properties.as_object().is_some_and(|o| !o.is_empty()) {
        m.insert("properties".into(), properties);
    }
    if wants_traits || traits.as_object().is_some_and(|o| !o.is_empty()) {
        m.insert("traits".into(), traits);
    }
    m.insert("context".into(), json_object(&e.context));
    m.insert("integrations".into(), json_object(&e.integrations));
    for (k, ts) in [
        ("timestamp", &e.timestamp),
        ("originalTimestamp", &e.original_timestamp),
        ("sentAt", &e.sent_at),
        ("receivedAt", &e.received_at),
    ] {
        if let Some(v) = rfc3339(ts) {
            m.insert(k.into(), v);
        }
    }
    let identities: Vec<Value> = p
        .identities
        .iter()
        .map(|i| json!({"type": i.r#type, "value": i.value}))
        .collect();
    m.insert(
        "herald".into(),
        json!({
            "eventId": e.id,
            "sourceId": e.source_id,
            "profileId": p.profile_id,
            "identities": identities,
            "consent": consent_json(&p.consent),
            "historical": e.historical,
        }),
    );
    Value::Object(m)
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
        m.insert("timestamp".into(), t);
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
