//! The `/v1/batch` fast path (items kept as raw JSON, built into events from borrowed fields)
//! against the `Value` path it stands in for: for recorded SDK bodies and generated ones, every
//! event and every rejection must be the same, except that stored JSON may keep the client's
//! whitespace and key order (so JSON fields are compared parsed).

use chrono::{DateTime, TimeZone as _, Utc};
use herald_ingest::{InvalidEvent, Normaliser, parse_batch, parse_batch_raw, scan_body};
use herald_proto::v1::Event;
use herald_testkit::ingest;
use proptest::prelude::*;
use serde_json::Value;

const MAX_DEPTH: usize = 64;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 10).unwrap()
}

fn norm() -> Normaliser<'static> {
    Normaliser {
        max_event_bytes: 2048,
        ..Normaliser::with_default_limits("web", now(), 16)
    }
}

/// What a body normalises to: its write key and each item's outcome; or the request's error.
type Outcome = Result<(Option<String>, Vec<Result<Event, InvalidEvent>>), String>;

/// The `Value` path, as before the fast path existed.
fn slow(body: &[u8]) -> Outcome {
    let env = parse_batch(body).map_err(|e| format!("{}: {e}", e.kind()))?;
    let n = norm();
    let items = env.items.clone();
    let events = items
        .into_iter()
        .map(|item| n.normalise(item, None, &env))
        .collect();
    Ok((env.write_key.clone(), events))
}

/// The fast path; `None` when it does not decide the body (then the `Value` path does).
fn fast(body: &[u8]) -> Option<Outcome> {
    let scan = scan_body(body, MAX_DEPTH).ok()?;
    let raw = parse_batch_raw(body, &scan)?;
    let key = raw.write_key().map(str::to_string);
    let events = norm().normalise_batch_fast(raw)?;
    Some(Ok((key, events.into_iter().map(Ok).collect())))
}

/// The event with its JSON fields rewritten canonically.
fn canonical(mut e: Event) -> Event {
    for field in [
        &mut e.properties,
        &mut e.traits,
        &mut e.context,
        &mut e.integrations,
    ] {
        if !field.is_empty() {
            let v: Value = serde_json::from_slice(field).expect("stored JSON parses");
            *field = serde_json::to_vec(&v).unwrap();
        }
    }
    e
}

fn canonical_outcome(o: Outcome) -> Outcome {
    o.map(|(key, events)| (key, events.into_iter().map(|r| r.map(canonical)).collect()))
}

/// Checks the fast path against the `Value` path on `body`; returns how many events the fast
/// path built (0 when it left the body to the `Value` path).
fn check(body: &[u8]) -> usize {
    let Some(got) = fast(body) else {
        return 0;
    };
    let built = got.as_ref().map_or(0, |(_, events)| events.len());
    let want = slow(body);
    assert!(
        want.is_ok(),
        "fast path took a body the Value path refuses ({want:?}): {}",
        String::from_utf8_lossy(body)
    );
    assert_eq!(
        canonical_outcome(got),
        canonical_outcome(want),
        "{}",
        String::from_utf8_lossy(body)
    );
    built
}

#[test]
fn recorded_sdk_batches_normalise_the_same_both_ways() {
    let mut built = 0;
    let mut items = 0;
    for folder in ["segment-python", "rudder-python", "segment-http-raw"] {
        for fx in ingest::fixtures(folder) {
            if fx.path != "/v1/batch" {
                continue;
            }
            items += fx.json["batch"].as_array().map_or(0, Vec::len);
            built += check(&fx.body);
            // Pretty-printed: the same events, other bytes.
            built += check(&serde_json::to_vec_pretty(&fx.json).unwrap());
        }
    }
    assert!(items > 0, "no batch fixtures");
    // Every recorded item is valid, with a messageId, and no batch has a batch-level context:
    // all take the fast path.
    assert_eq!(built, 2 * items);
}

#[test]
fn edge_cases_normalise_the_same_both_ways() {
    let item = |extra: &str| {
        format!(
            r#"{{"batch": [{{"type": "track", "userId": "u", "event": "E", "messageId": "m"{extra}}}], "sentAt": "2024-05-01T12:00:05Z"}}"#
        )
    };
    // (extra item fields, whether the fast path builds the event itself)
    let cases: &[(&str, bool)] = &[
        ("", true),
        (r#", "properties": {"a": 1, "a": 2}"#, true),
        (
            r#", "properties": {"price": 79.99, "n": -0.5, "big": 123456789012345}"#,
            true,
        ),
        (r#", "properties": {"e": 1e3}"#, false),
        (r#", "properties": {"e": 1e400}"#, false),
        (r#", "properties": {"z": -0}"#, false),
        (r#", "properties": {"s": "caf\u00e9 \"q\" \/ \n"}"#, true),
        (r#", "properties": {"s": "\ud83d\ude00"}"#, false),
        (r#", "properties": {"s": "\ud800"}"#, false),
        (r#", "properties": []"#, false),
        (
            r#", "properties": null, "traits": null, "context": null"#,
            true,
        ),
        (r#", "event": "caf\u00e9""#, false), // duplicate key
        (r#", "userId": 42"#, false),
        (r#", "messageId": "", "x": 1"#, false),
        (r#", "timestamp": "yesterday""#, false),
        (
            r#", "originalTimestamp": "2024-05-01T12:00:00Z", "timestamp": "yesterday""#,
            true,
        ),
        (r#", "timestamp": "2024-05-01T11:59:00.25""#, true),
        (r#", "sentAt": """#, true),
        (
            r#", "context": {"consent": {"categoryPreferences": {"Ads": false, "ads": true, "X": "no"}}}"#,
            true,
        ),
        (
            r#", "context": {"consent": {"categoryPreferences": {"Ads": true, "Ads": false}}}"#,
            true,
        ),
        (r#", "context": {"consent": [1], "traits": 3}"#, true),
        (r#", "context": {"consent": 1, "consent": 2}"#, false),
        (r#", "type": "identify""#, false), // duplicate `type`
        (
            r#", "properties": {"p": "x"}, "unknown": {"deep": [[[1]]]}"#,
            true,
        ),
    ];
    for (extra, fast_built) in cases {
        let body = item(extra);
        assert_eq!(check(body.as_bytes()) == 1, *fast_built, "{body}");
    }
    let identify = |fields: &str| {
        format!(r#"{{"batch": [{{"type": "identify", "userId": "u", "messageId": "m"{fields}}}]}}"#)
    };
    let body = r#"{"batch": [{"type": "track", "userId": null, "anonymousId": "a", "event": "E", "messageId": "m"}]}"#;
    assert_eq!(check(body.as_bytes()), 1, "{body}");
    for fields in [
        r#", "context": {"traits": {"email": "a@example.com"}}"#,
        r#", "traits": {"plan": "pro"}, "context": {"traits": {"email": "a@example.com"}}"#,
        r#", "traits": null, "context": {"traits": {"email": "a@example.com"}}"#,
        r#", "traits": {}, "context": {"traits": {"email": "a@example.com"}}"#,
        r#", "context": {"traits": "a@example.com"}"#,
    ] {
        let body = identify(fields);
        assert_eq!(check(body.as_bytes()), 1, "{body}");
    }
    // Bodies the fast path leaves to the Value path.
    for body in [
        r#"{"batch": [{"type": "track", "userId": "u", "event": "E", "messageId": "m"}], "context": {"ip": "1.1.1.1"}}"#,
        r#"{"batch": [], "integrations": {"All": false}}"#,
        r#"{"batch": {}}"#,
        r#"{"batch": null}"#,
        r#"{"events": []}"#,
        r#"[[{"type": "track"}]]"#,
        r#"{"batch": [], "batch": []}"#,
        r#"{"batch": [], "sentAt": "soon"}"#,
        r#"{"batch": [], "sentAt": 5}"#,
        r#"{"batch": [1, 2]"#,
        r#"{"batch": [1, 2]}"#,
        r#"{"batch": [["track", "u", "u", "g", "p", "E"]]}"#,
        r#"{"batch": [{"type": "track", "userId": "u", "event": "E", "messageId": "m"}, {"type": "track"}]}"#,
    ] {
        assert!(fast(body.as_bytes()).is_none(), "{body}");
    }
    // Taken, with the write key read as the Value path reads it.
    for (body, key) in [
        (r#"{"batch": [], "writeKey": "k"}"#, Some("k")),
        (r#"{"batch": [], "writeKey": ""}"#, None),
        (r#"{"batch": [], "writeKey": 7}"#, None),
        (r#"{"batch": [], "writeKey": "k\u0031"}"#, Some("k1")),
        (r#"{"batch": [], "writeKey": null, "sentAt": null}"#, None),
    ] {
        check(body.as_bytes());
        let Some(Ok((got, _))) = fast(body.as_bytes()) else {
            panic!("{body}: not taken");
        };
        assert_eq!(got.as_deref(), key, "{body}");
    }
    // Too large: the fast path leaves it to the Value path (whose compact JSON may fit).
    let pad = " ".repeat(2100);
    let body = format!(
        r#"{{"batch": [{{"type": "track", "userId": "u", "event": "E", "messageId": "m", "properties": {{"a": 1{pad}}}}}]}}"#
    );
    assert!(fast(body.as_bytes()).is_none());
    let Ok((_, events)) = slow(body.as_bytes()) else {
        panic!("valid batch");
    };
    assert!(events[0].is_ok(), "the compact event fits");
}

// ---------------------------------------------------------------------------------------------
// Generated items: each field absent, null, or one of a few valid and invalid JSON texts; keys
// in any order, sometimes repeated; compact or spaced out.

fn one_of(options: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    proptest::sample::select(options)
}

/// `key` present with probability `presence`, mostly with one of `valid`, sometimes one of
/// `odd` (wrong types, invalid values, forms the fast path leaves to the `Value` path).
fn field(
    key: &'static str,
    presence: f64,
    valid: &'static [&'static str],
    odd: &'static [&'static str],
) -> BoxedStrategy<Option<(&'static str, String)>> {
    let value = if odd.is_empty() {
        one_of(valid).boxed()
    } else {
        prop_oneof![20 => one_of(valid), 1 => one_of(odd)].boxed()
    };
    proptest::option::weighted(presence, value.prop_map(move |v| (key, v.to_string()))).boxed()
}

const IDS: &[&str] = &[r#""u1""#, r#""a-9""#, r#""caf\u00e9""#, "null"];
const ODD_IDS: &[&str] = &[r#""""#, "42", "{}"];
const OBJECTS: &[&str] = &[
    "{}",
    r#"{"a": 1, "b": [true, null, 2.5], "c": {"d": "x"}}"#,
    r#"{ "price" : 79.99, "n": -3, "s": "q\"uote" }"#,
    r#"{"a": 1, "a": 2}"#,
    "null",
];
const ODD_OBJECTS: &[&str] = &["[1]", r#""text""#, r#"{"e": 1.5e3}"#];
const CONTEXTS: &[&str] = &[
    r#"{"ip": "203.0.113.7", "library": {"name": "analytics.js", "version": "5.2.1"}}"#,
    r#"{"consent": {"categoryPreferences": {"Advertising": false, "Analytics": true, "x": 1}}}"#,
    r#"{"consent": {"categoryPreferences": {"ADS": true, "ads": false}}, "traits": {"email": "e@x.io"}}"#,
    r#"{"consent": {"categoryPreferences": []}, "traits": null}"#,
    r#"{"consent": "yes", "traits": "t"}"#,
    r#"{"trait\u0073": {"name": "Ada"}, "cons\u0065nt": {"categoryPreferences": {"A": true}}}"#,
    "null",
];
const ODD_CONTEXTS: &[&str] = &[
    r#"{"traits": {"name": "Ada"}, "traits": {"name": "Bob"}}"#,
    "7",
];
const TIMES: &[&str] = &[
    r#""2024-05-01T12:00:00.000Z""#,
    r#""2024-05-01T14:00:00.000001+02:00""#,
    r#""2024-05-01T11:59:00.25""#,
    r#""""#,
    "null",
];
const ODD_TIMES: &[&str] = &[r#""yesterday""#, "1714564800"];

fn item() -> impl Strategy<Value = (Vec<(&'static str, String)>, bool)> {
    let fields = vec![
        field(
            "type",
            0.97,
            &[
                r#""track""#,
                r#""identify""#,
                r#""page""#,
                r#""screen""#,
                r#""group""#,
                r#""alias""#,
            ],
            &[r#""purchase""#, "3"],
        ),
        field("userId", 0.9, IDS, ODD_IDS),
        field("anonymousId", 0.5, IDS, ODD_IDS),
        field("groupId", 0.5, IDS, ODD_IDS),
        field("previousId", 0.5, IDS, ODD_IDS),
        field(
            "event",
            0.8,
            &[r#""Order Completed""#, r#""Caf\u00e9 \"Visited\"""#],
            &[r#""""#, "7", "null"],
        ),
        field("name", 0.5, &[r#""Home""#, "null"], &["[]"]),
        field(
            "messageId",
            0.97,
            &[r#""m-1""#, r#""7c2a1d3e-0f5b-4a7e-9c1d-2b3a4c5d6e7f""#],
            &[
                r#""""#,
                "12345",
                "true",
                r#""a\nb""#,
                r#""mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm""#,
            ],
        ),
        field("timestamp", 0.6, TIMES, ODD_TIMES),
        field("originalTimestamp", 0.4, TIMES, ODD_TIMES),
        field("sentAt", 0.4, TIMES, ODD_TIMES),
        field("properties", 0.7, OBJECTS, ODD_OBJECTS),
        field("traits", 0.4, OBJECTS, ODD_OBJECTS),
        field("context", 0.7, CONTEXTS, ODD_CONTEXTS),
        field("integrations", 0.4, OBJECTS, ODD_OBJECTS),
        field(
            "channel",
            0.3,
            &[r#""server""#, r#"{"x": [1, {"y": null}]}"#],
            &[],
        ),
    ];
    let layout = (
        any::<bool>(),
        proptest::option::weighted(0.05, any::<prop::sample::Index>()),
    );
    (fields, layout).prop_flat_map(|(f, (spaced, repeat))| {
        let mut pairs: Vec<(&'static str, String)> = f.into_iter().flatten().collect();
        if let Some(i) = repeat
            && !pairs.is_empty()
        {
            let dup = pairs[i.index(pairs.len())].clone();
            pairs.push(dup);
        }
        Just(pairs).prop_shuffle().prop_map(move |p| (p, spaced))
    })
}

fn write_item(pairs: &[(&str, String)], spaced: bool) -> String {
    let sep = if spaced { ",\n    " } else { "," };
    let colon = if spaced { " : " } else { ":" };
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("\"{k}\"{colon}{v}"))
        .collect();
    format!("{{{}}}", body.join(sep))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn generated_batches_normalise_the_same_both_ways(
        items in proptest::collection::vec(item(), 1..4),
        sent_at in proptest::option::of(one_of(TIMES)),
    ) {
        let items: Vec<String> = items.iter().map(|(p, spaced)| write_item(p, *spaced)).collect();
        let mut body = format!("{{\"batch\": [{}]", items.join(", "));
        if let Some(t) = sent_at {
            body.push_str(&format!(", \"sentAt\": {t}"));
        }
        body.push('}');
        check(body.as_bytes());
    }
}
