//! The parsers never panic, whatever the input: arbitrary bytes into the body decoder, the
//! depth check and the Segment and mParticle parsers; arbitrary JSON values (and values shaped
//! almost like real events) through normalisation. Runs in the normal test run; the cargo-fuzz
//! targets under fuzz/ go further by hand.

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use herald_ingest::{
    Encoding, Envelope, MparticleBatch, Normaliser, check_depth, decode_body, mark_historical,
    parse_batch, parse_mparticle, parse_single,
};
use herald_proto::v1::EventType;
use proptest::prelude::*;
use serde_json::{Map, Value};

const SEGMENT_KEYS: &[&str] = &[
    "type",
    "userId",
    "anonymousId",
    "event",
    "name",
    "messageId",
    "properties",
    "traits",
    "context",
    "integrations",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "groupId",
    "previousId",
    "writeKey",
    "batch",
    "consent",
    "categoryPreferences",
];

const MPARTICLE_KEYS: &[&str] = &[
    "events",
    "event_type",
    "data",
    "event_name",
    "screen_name",
    "custom_attributes",
    "custom_event_type",
    "source_message_id",
    "timestamp_unixtime_ms",
    "product_action",
    "promotion_action",
    "product_impressions",
    "action",
    "products",
    "is_opted_out",
    "user_attribute_name",
    "new",
    "old",
    "deleted",
    "identity_type",
    "identity",
    "user_identities",
    "customerid",
    "customer_id",
    "email",
    "mpid",
    "user_attributes",
    "deleted_user_attributes",
    "device_info",
    "ios_idfv",
    "application_info",
    "consent_state",
    "gdpr",
    "ccpa",
    "data_sale_opt_out",
    "consented",
    "source_request_id",
    "ip",
    "context",
    "session_id",
    "location",
];

const TYPES: &[&str] = &[
    "track",
    "identify",
    "page",
    "screen",
    "group",
    "alias",
    "custom_event",
    "screen_view",
    "commerce_event",
    "session_start",
    "session_end",
    "opt_out",
    "user_attribute_change",
    "user_identity_change",
    "crash_report",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(SEGMENT_KEYS).prop_map(str::to_string),
        3 => prop::sample::select(MPARTICLE_KEYS).prop_map(str::to_string),
        1 => "[a-zA-Z_]{0,8}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(TYPES).prop_map(Value::from),
        Just(Value::from("2024-05-01T12:00:00.000Z")),
        Just(Value::from("9999-99-99T99:99:99Z")),
        "\\PC{0,12}".prop_map(Value::from),
        Just(Value::from("x".repeat(200))),
    ]
}

/// Arbitrary JSON, biased towards the keys and values the parsers look at.
fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<String, Value>>())),
        ]
    })
}

/// An mParticle `data` object: mostly the keys the normaliser reads, with arbitrary values.
fn data() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => prop::collection::btree_map(prop::sample::select(MPARTICLE_KEYS), json(), 0..8)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        1 => json(),
    ]
}

fn segment_normaliser() -> Normaliser<'static> {
    Normaliser::with_default_limits(
        "web",
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap(),
        16,
    )
}

fn mparticle_normaliser() -> Normaliser<'static> {
    Normaliser::with_default_limits(
        "app",
        Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap(),
        16,
    )
}

/// Everything a request body goes through, after the body is read.
fn parse_everything(bytes: &[u8]) {
    let _ = check_depth(bytes, 64);
    if let Ok(env) = parse_batch(bytes) {
        normalise_segment(env, None);
    }
    if let Ok(env) = parse_single(bytes) {
        normalise_segment(env, Some(EventType::Track));
    }
    let received = mparticle_normaliser().received_at;
    for bulk in [false, true] {
        if let Ok(batches) = parse_mparticle(bytes, bulk, false, received) {
            normalise_mparticle(batches);
        }
    }
}

fn normalise_segment(mut env: Envelope, call: Option<EventType>) {
    let n = segment_normaliser();
    for item in std::mem::take(&mut env.items) {
        if let Ok(e) = n.normalise(item, call, &env) {
            assert!(e.id.starts_with("web:"));
            assert!(e.partition < 16);
        }
    }
}

fn normalise_mparticle(mut batches: Vec<MparticleBatch>) {
    let n = mparticle_normaliser();
    let _ = mark_historical(&mut batches.clone(), n.received_at);
    for historical in [false, true] {
        for b in &mut batches {
            b.historical = historical;
            for item in &b.events {
                if let Ok(e) = n.normalise_mparticle(item, b) {
                    assert!(e.id.starts_with("app:"));
                    assert_eq!(e.historical, historical);
                    assert!(!e.partition_key.is_empty());
                }
            }
        }
    }
}

proptest! {
    // 512 cases per property in the normal run; PROPTEST_CASES=100000 for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        parse_everything(&bytes);
        for enc in [Encoding::Identity, Encoding::Gzip, Encoding::Deflate] {
            if let Ok(decoded) = decode_body(Bytes::from(bytes.clone()), enc, 4096) {
                prop_assert!(decoded.len() <= 4096);
                parse_everything(&decoded);
            }
        }
    }

    #[test]
    fn arbitrary_json_bodies_never_panic(v in json()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        parse_everything(&bytes);
    }

    #[test]
    fn arbitrary_segment_items_never_panic(
        items in prop::collection::vec(json(), 0..4),
        ty in prop::sample::select(TYPES),
        context in json(),
        sent_at in leaf(),
    ) {
        let mut batch = Map::new();
        let items: Vec<Value> = items
            .into_iter()
            .map(|mut item| {
                if let Value::Object(m) = &mut item {
                    m.entry("type").or_insert_with(|| Value::from(ty));
                    m.entry("userId").or_insert_with(|| Value::from("u"));
                }
                item
            })
            .collect();
        batch.insert("batch".into(), Value::Array(items));
        batch.insert("context".into(), context);
        batch.insert("sentAt".into(), sent_at);
        parse_everything(&serde_json::to_vec(&Value::Object(batch)).unwrap());
    }

    #[test]
    fn arbitrary_mparticle_batches_never_panic(
        events in prop::collection::vec((prop::sample::select(TYPES), data()), 0..4),
        envelope in prop::collection::btree_map(prop::sample::select(MPARTICLE_KEYS), json(), 0..6),
        identities in prop_oneof![
            3 => prop::collection::btree_map(
                prop::sample::select(&["customerid", "customer_id", "email", "other", "mpid"][..]),
                "[a-z0-9@.]{0,8}",
                0..3,
            )
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), Value::from(v))).collect())),
            1 => json(),
        ],
    ) {
        let mut batch: Map<String, Value> = envelope
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let events: Vec<Value> = events
            .into_iter()
            .map(|(ty, data)| serde_json::json!({"event_type": ty, "data": data}))
            .collect();
        batch.insert("events".into(), Value::Array(events));
        batch.entry("user_identities").or_insert(identities);
        batch.entry("mpid").or_insert(Value::from(1));
        let one = Value::Object(batch);
        parse_everything(&serde_json::to_vec(&one).unwrap());
        parse_everything(&serde_json::to_vec(&Value::Array(vec![one])).unwrap());
    }
}

#[test]
fn compressed_garbage_and_bombs_never_panic() {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&vec![b'['; 1 << 20]).unwrap();
    let bomb = e.finish().unwrap();
    assert_eq!(
        decode_body(Bytes::from(bomb), Encoding::Gzip, 64 * 1024)
            .unwrap_err()
            .kind(),
        "request_too_large"
    );
    // A million nested brackets stop at the depth check, before any parser.
    let deep = vec![b'['; 1 << 20];
    assert_eq!(check_depth(&deep, 64).unwrap_err().kind(), "too_deep");
    parse_everything(&deep);
}
