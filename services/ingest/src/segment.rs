//! The Segment Tracking API shape: parsing batches and single events, validating them per call
//! type, and normalising them into `herald.v1.Event`.

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use herald_common::partition::partition_for;
use herald_proto::time::to_proto;
use herald_proto::v1::{Consent, Event, EventType};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::body::JsonScan;
use crate::error::ApiError;
use crate::normalise::{
    Decoded, InvalidEvent, Normaliser, check_message_id, corrected_timestamp, derive_message_id,
    event_id, json_bytes, parse_time, parse_time_str, partition_key, truncate,
};

/// The call type named by a Segment `type` value or path segment.
pub fn call_type(name: &str) -> Option<EventType> {
    Some(match name {
        "identify" => EventType::Identify,
        "track" => EventType::Track,
        "page" => EventType::Page,
        "screen" => EventType::Screen,
        "group" => EventType::Group,
        "alias" => EventType::Alias,
        _ => return None,
    })
}

/// A request body: the events it carries plus what applies to all of them.
#[derive(Debug, Default)]
pub struct Envelope {
    /// The events (a batch's items, or the one event of a single-event call).
    pub items: Vec<Value>,
    /// Batch-level `context`, merged into each item (item keys win).
    pub context: Option<Map<String, Value>>,
    /// Batch-level `integrations`, merged into each item (item keys win).
    pub integrations: Option<Map<String, Value>>,
    /// Batch-level `sentAt`.
    pub sent_at: Option<DateTime<Utc>>,
    /// `writeKey` from the body.
    pub write_key: Option<String>,
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::InvalidJson("expected a JSON object".into())),
        Err(e) => Err(ApiError::InvalidJson(e.to_string())),
    }
}

fn take_write_key(obj: &mut Map<String, Value>) -> Option<String> {
    match obj.remove("writeKey") {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// Parses a `/v1/batch` body: `{"batch": [...], "context", "integrations", "sentAt", "writeKey"}`.
pub fn parse_batch(body: &[u8]) -> Result<Envelope, ApiError> {
    let mut obj = parse_object(body)?;
    let write_key = take_write_key(&mut obj);
    let items = match obj.remove("batch") {
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::InvalidBatch(
                "`batch` must be an array of events".into(),
            ));
        }
        None => {
            return Err(ApiError::InvalidBatch(
                "body needs a `batch` array of events".into(),
            ));
        }
    };
    let defaults = |key: &'static str, obj: &mut Map<String, Value>| match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(ApiError::InvalidBatch(format!(
            "batch `{key}` must be an object"
        ))),
    };
    let context = defaults("context", &mut obj)?;
    let integrations = defaults("integrations", &mut obj)?;
    let sent_at = parse_time(obj.get("sentAt"), "sentAt")
        .map_err(|e| ApiError::InvalidBatch(format!("batch {e}")))?;
    Ok(Envelope {
        items,
        context,
        integrations,
        sent_at,
        write_key,
    })
}

/// Parses a single-event body (`/v1/track` and friends).
pub fn parse_single(body: &[u8]) -> Result<Envelope, ApiError> {
    let mut obj = parse_object(body)?;
    let write_key = take_write_key(&mut obj);
    Ok(Envelope {
        items: vec![Value::Object(obj)],
        write_key,
        ..Default::default()
    })
}

/// The shape of a Segment payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A batch: `{"batch": [...], "context", "integrations", "sentAt", "writeKey"}`.
    Batch,
    /// One event. A single-event path names its call type, which wins over the body's `type`.
    Single(Option<EventType>),
}

impl Shape {
    /// The shape of a payload that does not say (NATS intake, a redrive): a batch when it is an
    /// object with a `batch` key, else one event.
    pub fn of_payload(payload: &[u8]) -> Self {
        match serde_json::from_slice::<Peek>(payload) {
            Ok(Peek { batch: Some(_) }) => Self::Batch,
            _ => Self::Single(None),
        }
    }
}

/// Peeks whether a JSON object has a `batch` key without building the value.
#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    batch: Option<serde::de::IgnoredAny>,
}

/// A Segment payload, parsed and not yet normalised (the source is not known until its write
/// key is): a batch on the fast path with its items as raw JSON, or parsed into `Value`s.
pub struct Parsed<'a> {
    body: &'a [u8],
    shape: Shape,
    inner: ParsedInner<'a>,
}

enum ParsedInner<'a> {
    Raw(RawBatch<'a>),
    Value(Envelope),
}

/// Parses a Segment payload of this shape. `scan` is what [`crate::body::scan`] found in it,
/// when it was scanned: a batch then takes the fast path where it can.
pub fn parse<'a>(
    body: &'a [u8],
    shape: Shape,
    scan: Option<&JsonScan>,
) -> Result<Parsed<'a>, ApiError> {
    let inner = match (shape, scan) {
        (Shape::Single(_), _) => ParsedInner::Value(parse_single(body)?),
        (Shape::Batch, Some(scan)) => match parse_batch_raw(body, scan) {
            Some(raw) => ParsedInner::Raw(raw),
            None => ParsedInner::Value(parse_batch(body)?),
        },
        (Shape::Batch, None) => ParsedInner::Value(parse_batch(body)?),
    };
    Ok(Parsed { body, shape, inner })
}

impl Parsed<'_> {
    /// `writeKey` from the body.
    pub fn write_key(&self) -> Option<&str> {
        match &self.inner {
            ParsedInner::Raw(raw) => raw.write_key(),
            ParsedInner::Value(env) => env.write_key.as_deref(),
        }
    }

    /// How many events it carries.
    pub fn len(&self) -> usize {
        match &self.inner {
            ParsedInner::Raw(raw) => raw.len(),
            ParsedInner::Value(env) => env.items.len(),
        }
    }

    /// Normalises every event: the valid ones, and the invalid ones by their index in `batch`
    /// (0 for a single event).
    pub fn decode(self, n: &Normaliser<'_>) -> Result<Decoded, ApiError> {
        let call = match self.shape {
            Shape::Single(call) => call,
            Shape::Batch => None,
        };
        let mut env = match self.inner {
            ParsedInner::Raw(raw) => match n.normalise_batch_fast(raw) {
                Some(events) => {
                    return Ok(Decoded {
                        events,
                        rejected: Vec::new(),
                    });
                }
                // An item the fast path cannot build exactly: the whole body goes the Value way.
                None => parse_batch(self.body)?,
            },
            ParsedInner::Value(env) => env,
        };
        let items = std::mem::take(&mut env.items);
        let mut decoded = Decoded {
            events: Vec::with_capacity(items.len()),
            rejected: Vec::new(),
        };
        for (index, item) in items.into_iter().enumerate() {
            decoded.push(index, n.normalise(item, call, &env));
        }
        Ok(decoded)
    }
}

/// The Segment decoder: parses and normalises a payload of this shape.
pub fn decode(n: &Normaliser<'_>, body: &[u8], shape: Shape) -> Result<Decoded, ApiError> {
    parse(body, shape, None)?.decode(n)
}

/// Normalisation of Segment events (the `Value` path and, below, the fast path).
impl Normaliser<'_> {
    /// Validates one event and turns it into a `herald.v1.Event`. `call` is the call type of a
    /// single-event path (it wins over the body's `type`); batch items name their own.
    pub fn normalise(
        &self,
        item: Value,
        call: Option<EventType>,
        env: &Envelope,
    ) -> Result<Event, InvalidEvent> {
        let Value::Object(mut obj) = item else {
            return Err(InvalidEvent::NotAnObject);
        };
        merge_defaults(&mut obj, "context", env.context.as_ref());
        merge_defaults(&mut obj, "integrations", env.integrations.as_ref());
        let obj = &obj;

        let ty = match call {
            Some(t) => t,
            None => match obj.get("type") {
                Some(Value::String(s)) => {
                    call_type(s).ok_or_else(|| InvalidEvent::InvalidType(truncate(s)))?
                }
                None | Some(Value::Null) => return Err(InvalidEvent::InvalidType(String::new())),
                Some(_) => {
                    return Err(InvalidEvent::InvalidField {
                        field: "type",
                        expected: "a string",
                    });
                }
            },
        };

        let user_id = id_field(obj, "userId")?;
        let anonymous_id = id_field(obj, "anonymousId")?;
        let group_id = id_field(obj, "groupId")?;
        let previous_id = id_field(obj, "previousId")?;
        if user_id.is_empty() && anonymous_id.is_empty() {
            return Err(InvalidEvent::MissingIdentity("userId or anonymousId"));
        }
        let name = match ty {
            EventType::Track => {
                let name = string_field(obj, "event")?;
                if name.is_empty() {
                    return Err(InvalidEvent::MissingEvent("event"));
                }
                name
            }
            EventType::Page | EventType::Screen => string_field(obj, "name")?,
            _ => String::new(),
        };
        match ty {
            EventType::Group if group_id.is_empty() => return Err(InvalidEvent::MissingGroupId),
            EventType::Alias if previous_id.is_empty() => {
                return Err(InvalidEvent::MissingPreviousId);
            }
            EventType::Alias if user_id.is_empty() => return Err(InvalidEvent::MissingUserId),
            _ => {}
        }
        for field in ["properties", "traits", "context", "integrations"] {
            if !matches!(obj.get(field), None | Some(Value::Null | Value::Object(_))) {
                return Err(InvalidEvent::InvalidField {
                    field: static_field(field),
                    expected: "an object",
                });
            }
        }

        let original = match parse_time(obj.get("originalTimestamp"), "originalTimestamp")? {
            Some(t) => Some(t),
            None => parse_time(obj.get("timestamp"), "timestamp")?,
        };
        let sent_at = parse_time(obj.get("sentAt"), "sentAt")?.or(env.sent_at);
        let timestamp = corrected_timestamp(self.received_at, sent_at, original);

        let message_id = match obj.get("messageId") {
            Some(Value::String(s)) if !s.is_empty() => {
                check_message_id(s, "messageId", self.max_message_id_chars)?;
                s.clone()
            }
            Some(Value::Number(n)) => n.to_string(),
            None | Some(Value::Null) | Some(Value::String(_)) => {
                derive_message_id(self.source_id, ty, obj, original)
            }
            Some(_) => {
                return Err(InvalidEvent::InvalidField {
                    field: "messageId",
                    expected: "a string",
                });
            }
        };

        let consent = obj
            .get("context")
            .and_then(|c| c.get("consent"))
            .and_then(|c| c.get("categoryPreferences"))
            .and_then(Value::as_object)
            .map(|prefs| consent_of(prefs, timestamp));

        let mut traits = json_bytes(obj.get("traits"));
        if traits.is_empty() && ty == EventType::Identify {
            traits = json_bytes(
                obj.get("context")
                    .and_then(|c| c.get("traits"))
                    .filter(|t| t.is_object()),
            );
        }
        let event = self.event(Parts {
            ty,
            message_id,
            name,
            user_id,
            anonymous_id,
            group_id,
            previous_id,
            properties: json_bytes(obj.get("properties")),
            traits,
            context: json_bytes(obj.get("context")),
            integrations: json_bytes(obj.get("integrations")),
            original,
            sent_at,
            timestamp,
            consent,
        });
        self.check_size(event)
    }
}

/// The consent snapshot of a `context.consent.categoryPreferences` object: its boolean
/// entries, purpose names in lower case.
fn consent_of(prefs: &Map<String, Value>, timestamp: DateTime<Utc>) -> Consent {
    Consent {
        purposes: prefs
            .iter()
            .filter_map(|(k, v)| v.as_bool().map(|b| (k.to_lowercase(), b)))
            .collect(),
        opted_out: false,
        updated_at: Some(to_proto(timestamp)),
    }
}

// ---------------------------------------------------------------------------------------------
// The fast path of `/v1/batch`
//
// A batch is parsed into borrowed typed structs instead of a `Value` tree, and `properties`,
// `traits`, `context` and `integrations` are stored as the client sent them (its whitespace
// and key order) instead of being built into `Value`s and written out again. It only answers
// where it decides exactly as the `Value` path above would; anywhere else (batch-level
// `context` or `integrations` to merge, no `messageId`, ids sent as numbers, wrong types,
// duplicate keys, invalid events, ...) the `Value` path runs, so results, errors and limits
// are the same either way; only the stored JSON bytes may differ in whitespace, key order,
// escapes and repeated keys, never in the value they parse to.
//
// What makes verbatim bytes exact: the body is valid UTF-8 and valid JSON (the typed parse
// checks both), and the scan that checks its depth (`crate::body::scan`) found no number
// `Value` could refuse or write longer, and no surrogate escape. Then the `Value` path parses
// the body too, each object's verbatim JSON parses to the `Value` it would have built, and is
// never shorter than that `Value` written out, so an event under the size limit here is under
// it there too (an event over it sends the body the `Value` way, which decides). The fast
// path takes a body only when it can build every item; otherwise the whole body goes the
// `Value` way, as before.

/// A `/v1/batch` body read by the fast path: each item's fields borrowed from the body, its
/// JSON objects kept as raw JSON. See [`parse_batch_raw`].
pub struct RawBatch<'a> {
    items: Vec<RawItem<'a>>,
    sent_at: Option<DateTime<Utc>>,
    write_key: Option<Cow<'a, str>>,
}

impl RawBatch<'_> {
    /// How many items `batch` holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether `batch` is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// `writeKey` from the body (a non-empty string).
    pub fn write_key(&self) -> Option<&str> {
        self.write_key.as_deref()
    }
}

/// The items of `batch`, each read straight into a [`RawItem`] in the one pass over the body.
struct RawItems<'a>(Vec<RawItem<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for RawItems<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(RawItemsVisitor(std::marker::PhantomData))
    }
}

struct RawItemsVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for RawItemsVisitor<'a> {
    type Value = RawItems<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of objects")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(RawItemSeed(std::marker::PhantomData))? {
            items.push(item);
        }
        Ok(RawItems(items))
    }
}

/// Reads one item, which must be a JSON object: a derived struct would also take an array,
/// field by field.
struct RawItemSeed<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> serde::de::DeserializeSeed<'de> for RawItemSeed<'a> {
    type Value = RawItem<'a>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> serde::de::Visitor<'de> for RawItemSeed<'a> {
    type Value = RawItem<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
        RawItem::deserialize(serde::de::value::MapAccessDeserializer::new(map))
    }
}

/// A JSON string, borrowed from the body unless it holds escapes.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// The fields of a batch body the fast path reads; any other key is skipped.
#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow)]
    batch: Option<RawItems<'a>>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    integrations: Option<&'a RawValue>,
    #[serde(rename = "sentAt", borrow)]
    sent_at: Option<Text<'a>>,
    #[serde(rename = "writeKey", borrow)]
    write_key: Option<&'a RawValue>,
}

/// The fields of an item [`Normaliser::normalise`] reads.
#[derive(Deserialize)]
struct RawItem<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<Text<'a>>,
    #[serde(rename = "userId", borrow)]
    user_id: Option<Text<'a>>,
    #[serde(rename = "anonymousId", borrow)]
    anonymous_id: Option<Text<'a>>,
    #[serde(rename = "groupId", borrow)]
    group_id: Option<Text<'a>>,
    #[serde(rename = "previousId", borrow)]
    previous_id: Option<Text<'a>>,
    #[serde(borrow)]
    event: Option<Text<'a>>,
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(rename = "messageId", borrow)]
    message_id: Option<Text<'a>>,
    #[serde(borrow)]
    timestamp: Option<Text<'a>>,
    #[serde(rename = "originalTimestamp", borrow)]
    original_timestamp: Option<Text<'a>>,
    #[serde(rename = "sentAt", borrow)]
    sent_at: Option<Text<'a>>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    integrations: Option<&'a RawValue>,
}

/// What normalisation reads inside `context`.
#[derive(Deserialize)]
struct RawContext<'a> {
    #[serde(borrow)]
    consent: Option<&'a RawValue>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
}

/// What normalisation reads inside `context.consent`.
#[derive(Deserialize)]
struct RawConsent<'a> {
    #[serde(rename = "categoryPreferences", borrow)]
    category_preferences: Option<&'a RawValue>,
}

/// Deepest body the fast path takes: `Value` parsing stops at 128 levels, and the fast path
/// must only take bodies the `Value` path would parse.
const RAW_MAX_DEPTH: usize = 100;

fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

fn text(t: Option<Text<'_>>) -> String {
    t.map(|t| t.0.into_owned()).unwrap_or_default()
}

/// Parses a `/v1/batch` body keeping its items as raw JSON, for
/// [`Normaliser::normalise_batch_fast`]; `scan` is what [`crate::body::scan`] found in it. `None`
/// when the fast path cannot take the body (batch-level `context` or `integrations`, an
/// unusual number, a surrogate escape, any error): then [`parse_batch`] decides.
pub fn parse_batch_raw<'a>(body: &'a [u8], scan: &JsonScan) -> Option<RawBatch<'a>> {
    if !scan.plain() || scan.max_depth > RAW_MAX_DEPTH {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    // A struct would also take a JSON array, field by field.
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let env: RawEnvelope<'a> = serde_json::from_str(text).ok()?;
    if env.context.is_some() || env.integrations.is_some() {
        return None;
    }
    let sent_at = match env.sent_at {
        None => None,
        Some(t) => parse_time_str(&t.0, "sentAt").ok()?,
    };
    let write_key = match env.write_key {
        Some(raw) if raw.get().starts_with('"') => {
            Some(serde_json::from_str::<Text<'a>>(raw.get()).ok()?.0).filter(|k| !k.is_empty())
        }
        _ => None,
    };
    Some(RawBatch {
        items: env.batch?.0,
        sent_at,
        write_key,
    })
}

impl Normaliser<'_> {
    /// The events [`Normaliser::normalise`] makes of the items of a [`RawBatch`], when every
    /// item is a valid event the fast path can build exactly; `None` when any is not: then
    /// the body goes the `Value` way ([`parse_batch`] and [`Normaliser::normalise`]).
    pub fn normalise_batch_fast(&self, batch: RawBatch<'_>) -> Option<Vec<Event>> {
        let mut events = Vec::with_capacity(batch.items.len());
        for item in batch.items {
            events.push(self.normalise_fast(item, batch.sent_at)?);
        }
        Some(events)
    }

    /// The event [`Normaliser::normalise`] makes of a valid batch item, built from borrowed
    /// fields with its JSON objects kept verbatim; `None` where it cannot decide exactly.
    fn normalise_fast(
        &self,
        it: RawItem<'_>,
        batch_sent_at: Option<DateTime<Utc>>,
    ) -> Option<Event> {
        let ty = call_type(&it.ty?.0)?;
        let user_id = text(it.user_id);
        let anonymous_id = text(it.anonymous_id);
        let group_id = text(it.group_id);
        let previous_id = text(it.previous_id);
        if user_id.is_empty() && anonymous_id.is_empty() {
            return None;
        }
        let name = match ty {
            EventType::Track => Some(text(it.event)).filter(|n| !n.is_empty())?,
            EventType::Page | EventType::Screen => text(it.name),
            _ => String::new(),
        };
        let missing = match ty {
            EventType::Group => group_id.is_empty(),
            EventType::Alias => previous_id.is_empty() || user_id.is_empty(),
            _ => false,
        };
        if missing {
            return None;
        }
        let objects = [it.properties, it.traits, it.context, it.integrations];
        if objects.iter().flatten().any(|raw| !is_object(raw)) {
            return None;
        }
        let time = |t: Option<Text<'_>>, field| match t {
            None => Some(None),
            Some(t) => parse_time_str(&t.0, field).ok(),
        };
        // As in `normalise`: `timestamp` is read only without `originalTimestamp`.
        let original = match time(it.original_timestamp, "originalTimestamp")? {
            Some(t) => Some(t),
            None => time(it.timestamp, "timestamp")?,
        };
        let sent_at = time(it.sent_at, "sentAt")?.or(batch_sent_at);
        let timestamp = corrected_timestamp(self.received_at, sent_at, original);

        // No or empty messageId: the derived id needs the whole item as a `Value`.
        let message_id = it.message_id.map(|t| t.0).filter(|m| !m.is_empty())?;
        check_message_id(&message_id, "messageId", self.max_message_id_chars).ok()?;
        let message_id = message_id.into_owned();

        let (consent, context_traits) = match it.context {
            // Without a backslash, a key that is `consent` or `traits` is spelled out.
            Some(ctx)
                if ctx.get().contains("consent")
                    || ctx.get().contains('\\')
                    || (ty == EventType::Identify
                        && it.traits.is_none()
                        && ctx.get().contains("traits")) =>
            {
                let look: RawContext<'_> = serde_json::from_str(ctx.get()).ok()?;
                let consent = match look.consent {
                    Some(c) if is_object(c) => {
                        let c: RawConsent<'_> = serde_json::from_str(c.get()).ok()?;
                        match c.category_preferences {
                            Some(p) if is_object(p) => {
                                let prefs: Map<String, Value> =
                                    serde_json::from_str(p.get()).ok()?;
                                Some(consent_of(&prefs, timestamp))
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                };
                (consent, look.traits.filter(|t| is_object(t)))
            }
            _ => (None, None),
        };
        let traits = match (it.traits, ty) {
            (Some(t), _) => Some(t),
            (None, EventType::Identify) => context_traits,
            (None, _) => None,
        };
        let bytes = |raw: Option<&RawValue>| raw.map(|r| r.get().as_bytes().to_vec());
        let event = self.event(Parts {
            ty,
            message_id,
            name,
            user_id,
            anonymous_id,
            group_id,
            previous_id,
            properties: bytes(it.properties).unwrap_or_default(),
            traits: bytes(traits).unwrap_or_default(),
            context: bytes(it.context).unwrap_or_default(),
            integrations: bytes(it.integrations).unwrap_or_default(),
            original,
            sent_at,
            timestamp,
            consent,
        });
        // Over the limit here may still be under it with the JSON rewritten: let that decide.
        (prost::Message::encoded_len(&event) <= self.max_event_bytes).then_some(event)
    }
}

/// The fields of a normalised Segment event, whichever way its JSON was read.
struct Parts {
    ty: EventType,
    message_id: String,
    name: String,
    user_id: String,
    anonymous_id: String,
    group_id: String,
    previous_id: String,
    properties: Vec<u8>,
    traits: Vec<u8>,
    context: Vec<u8>,
    integrations: Vec<u8>,
    original: Option<DateTime<Utc>>,
    sent_at: Option<DateTime<Utc>>,
    timestamp: DateTime<Utc>,
    consent: Option<Consent>,
}

impl Normaliser<'_> {
    /// The `herald.v1.Event` of `p`: its id, partition key (user id, else anonymous id) and
    /// partition, and its times as protobuf timestamps.
    fn event(&self, p: Parts) -> Event {
        // Segment events always name a user id or an anonymous id.
        let partition_key =
            partition_key(&p.user_id, &p.anonymous_id, std::iter::empty()).unwrap_or_default();
        Event {
            id: event_id(self.source_id, &p.message_id),
            message_id: p.message_id,
            source_id: self.source_id.to_string(),
            r#type: p.ty as i32,
            name: p.name,
            user_id: p.user_id,
            anonymous_id: p.anonymous_id,
            identities: HashMap::new(),
            properties: p.properties,
            traits: p.traits,
            context: p.context,
            integrations: p.integrations,
            original_timestamp: p.original.map(to_proto),
            sent_at: p.sent_at.map(to_proto),
            received_at: Some(to_proto(self.received_at)),
            timestamp: Some(to_proto(p.timestamp)),
            consent: p.consent,
            historical: false,
            group_id: p.group_id,
            previous_id: p.previous_id,
            partition: partition_for(&partition_key, self.partitions),
            partition_key,
            ..Default::default()
        }
    }
}

fn merge_defaults(obj: &mut Map<String, Value>, key: &str, defaults: Option<&Map<String, Value>>) {
    let Some(defaults) = defaults else { return };
    match obj.get_mut(key) {
        Some(Value::Object(m)) => {
            for (k, v) in defaults {
                if !m.contains_key(k) {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        None | Some(Value::Null) => {
            obj.insert(key.to_string(), Value::Object(defaults.clone()));
        }
        Some(_) => {}
    }
}

/// An identifier: a string, or a number taken as its decimal text. Absent or `null` is empty.
fn id_field(obj: &Map<String, Value>, field: &'static str) -> Result<String, InvalidEvent> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(InvalidEvent::InvalidField {
            field,
            expected: "a string",
        }),
    }
}

fn string_field(obj: &Map<String, Value>, field: &'static str) -> Result<String, InvalidEvent> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(InvalidEvent::InvalidField {
            field,
            expected: "a string",
        }),
    }
}

fn static_field(field: &str) -> &'static str {
    match field {
        "properties" => "properties",
        "traits" => "traits",
        "context" => "context",
        _ => "integrations",
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 10).unwrap()
    }

    fn norm() -> Normaliser<'static> {
        Normaliser::with_default_limits("web", now(), 16)
    }

    fn ts(s: &str) -> prost_types::Timestamp {
        to_proto(DateTime::parse_from_rfc3339(s).unwrap().to_utc())
    }

    fn one(item: Value) -> Result<Event, InvalidEvent> {
        norm().normalise(item, None, &Envelope::default())
    }

    #[test]
    fn text_borrows_unless_escaped() {
        let t: Text<'_> = serde_json::from_str(r#""plain""#).unwrap();
        assert!(matches!(t.0, Cow::Borrowed("plain")));
        let t: Text<'_> = serde_json::from_str(r#""caf\u00e9""#).unwrap();
        assert!(matches!(t.0, Cow::Owned(ref s) if s == "café"));
    }

    #[test]
    fn validation_table() {
        let cases: Vec<(Value, Option<&str>)> = vec![
            (json!({"type": "track", "userId": "u", "event": "E"}), None),
            (
                json!({"type": "track", "anonymousId": "a", "event": "E"}),
                None,
            ),
            (json!({"type": "track", "userId": 42, "event": "E"}), None),
            (
                json!({"type": "track", "userId": "u"}),
                Some("missing_event"),
            ),
            (
                json!({"type": "track", "userId": "u", "event": ""}),
                Some("missing_event"),
            ),
            (
                json!({"type": "track", "event": "E"}),
                Some("missing_identity"),
            ),
            (
                json!({"type": "track", "userId": "", "anonymousId": null, "event": "E"}),
                Some("missing_identity"),
            ),
            (json!({"type": "identify", "userId": "u"}), None),
            (json!({"type": "page", "userId": "u"}), None),
            (
                json!({"type": "screen", "anonymousId": "a", "name": "Home"}),
                None,
            ),
            (
                json!({"type": "group", "userId": "u"}),
                Some("missing_group_id"),
            ),
            (
                json!({"type": "group", "userId": "u", "groupId": "g"}),
                None,
            ),
            (
                json!({"type": "alias", "userId": "u"}),
                Some("missing_previous_id"),
            ),
            (
                json!({"type": "alias", "anonymousId": "a", "previousId": "p"}),
                Some("missing_user_id"),
            ),
            (
                json!({"type": "alias", "userId": "u", "previousId": "p"}),
                None,
            ),
            (json!({"userId": "u"}), Some("invalid_type")),
            (
                json!({"type": "purchase", "userId": "u"}),
                Some("invalid_type"),
            ),
            (json!({"type": 3, "userId": "u"}), Some("invalid_field")),
            (
                json!({"type": "track", "userId": {"a": 1}, "event": "E"}),
                Some("invalid_field"),
            ),
            (
                json!({"type": "track", "userId": "u", "event": 7}),
                Some("invalid_field"),
            ),
            (
                json!({"type": "track", "userId": "u", "event": "E", "properties": [1]}),
                Some("invalid_field"),
            ),
            (
                json!({"type": "track", "userId": "u", "event": "E", "context": "x"}),
                Some("invalid_field"),
            ),
            (
                json!({"type": "track", "userId": "u", "event": "E", "messageId": "a\nb"}),
                Some("invalid_field"),
            ),
            (
                json!({"type": "track", "userId": "u", "event": "E", "messageId": true}),
                Some("invalid_field"),
            ),
            (
                json!({"type": "track", "userId": "u", "event": "E", "messageId": "m".repeat(100)}),
                None,
            ),
            (
                json!({"type": "track", "userId": "u", "event": "E", "messageId": "m".repeat(101)}),
                Some("message_id_too_long"),
            ),
            (
                json!({"type": "track", "userId": "u", "event": "E", "timestamp": "yesterday"}),
                Some("invalid_timestamp"),
            ),
            (
                json!({"type": "track", "userId": "u", "event": "E", "timestamp": 1714564800}),
                Some("invalid_timestamp"),
            ),
            (json!(["not", "an", "object"]), Some("not_an_object")),
        ];
        for (item, want) in cases {
            let got = one(item.clone()).err().map(|e| e.reason().label());
            assert_eq!(got, want, "{item}");
        }
    }

    #[test]
    fn path_type_wins_over_body_type() {
        let e = norm()
            .normalise(
                json!({"type": "identify", "userId": "u", "event": "E"}),
                Some(EventType::Track),
                &Envelope::default(),
            )
            .expect("valid");
        assert_eq!(e.r#type(), EventType::Track);
        assert_eq!(e.name, "E");
    }

    #[test]
    fn normalises_fields() {
        let e = one(json!({
            "type": "track", "userId": "u1", "anonymousId": "a1", "event": "Order Completed",
            "messageId": "m-1", "properties": {"revenue": 9.5},
            "context": {"ip": "203.0.113.7", "consent": {"categoryPreferences":
                {"Advertising": false, "Analytics": true, "bogus": "yes"}}},
            "integrations": {"All": true},
            "timestamp": "2024-05-01T12:00:00.000Z"
        }))
        .expect("valid");
        assert_eq!(e.id, "web:m-1");
        assert_eq!(e.message_id, "m-1");
        assert_eq!(e.source_id, "web");
        assert_eq!(e.r#type(), EventType::Track);
        assert_eq!(e.name, "Order Completed");
        assert_eq!(e.user_id, "u1");
        assert_eq!(e.anonymous_id, "a1");
        assert_eq!(e.partition_key, "u1");
        assert_eq!(e.partition, partition_for("u1", 16));
        let props: Value = serde_json::from_slice(&e.properties).unwrap();
        assert_eq!(props, json!({"revenue": 9.5}));
        assert!(e.traits.is_empty());
        let ctx: Value = serde_json::from_slice(&e.context).unwrap();
        assert_eq!(ctx["ip"], "203.0.113.7");
        assert_eq!(
            serde_json::from_slice::<Value>(&e.integrations).unwrap(),
            json!({"All": true})
        );
        let consent = e.consent.expect("consent");
        assert_eq!(consent.purposes.len(), 2);
        assert!(!consent.purposes["advertising"]);
        assert!(consent.purposes["analytics"]);
        assert_eq!(e.original_timestamp, Some(ts("2024-05-01T12:00:00Z")));
        assert_eq!(e.timestamp, Some(ts("2024-05-01T12:00:00Z")));
        assert_eq!(e.sent_at, None);
        assert_eq!(e.received_at, Some(to_proto(now())));
    }

    #[test]
    fn partition_key_falls_back_to_anonymous_id() {
        let e = one(json!({"type": "page", "anonymousId": "a9", "name": "Home"})).unwrap();
        assert_eq!(e.partition_key, "a9");
        assert_eq!(e.name, "Home");
        assert_eq!(e.partition, partition_for("a9", 16));
        assert!(e.consent.is_none());
        assert!(e.properties.is_empty() && e.context.is_empty());
    }

    #[test]
    fn identify_traits_from_context_when_absent() {
        let e = one(json!({"type": "identify", "userId": "u",
            "context": {"traits": {"email": "a@example.com"}}}))
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&e.traits).unwrap(),
            json!({"email": "a@example.com"})
        );
        let e = one(
            json!({"type": "identify", "userId": "u", "traits": {"plan": "pro"},
            "context": {"traits": {"email": "a@example.com"}}}),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&e.traits).unwrap(),
            json!({"plan": "pro"})
        );
        // Only identify reads context.traits.
        let e = one(json!({"type": "track", "userId": "u", "event": "E",
            "context": {"traits": {"email": "a@example.com"}}}))
        .unwrap();
        assert!(e.traits.is_empty());
    }

    #[test]
    fn group_and_alias_ids() {
        let e = one(json!({"type": "group", "userId": "u", "groupId": 17})).unwrap();
        assert_eq!(e.group_id, "17");
        let e = one(json!({"type": "alias", "userId": "u", "previousId": "anon"})).unwrap();
        assert_eq!(e.previous_id, "anon");
    }

    #[test]
    fn timestamps_table() {
        // (originalTimestamp, timestamp, item sentAt, batch sentAt) -> (original, sent, corrected)
        let r = "2024-05-01T12:00:10Z"; // received_at
        let cases = [
            // Device clock 1 h behind: sent 1 s after the event → corrected to received - 1 s.
            (
                None,
                Some("2024-05-01T11:00:00.000Z"),
                None,
                Some("2024-05-01T11:00:01.000Z"),
                Some("2024-05-01T11:00:00Z"),
                Some("2024-05-01T11:00:01Z"),
                "2024-05-01T12:00:09Z",
            ),
            // originalTimestamp wins over timestamp; item sentAt wins over batch sentAt.
            (
                Some("2024-05-01T12:00:00Z"),
                Some("2020-01-01T00:00:00Z"),
                Some("2024-05-01T12:00:02Z"),
                Some("2030-01-01T00:00:00Z"),
                Some("2024-05-01T12:00:00Z"),
                Some("2024-05-01T12:00:02Z"),
                "2024-05-01T12:00:08Z",
            ),
            // Microseconds and offsets.
            (
                None,
                Some("2024-05-01T14:00:00.000001+02:00"),
                None,
                Some("2024-05-01T12:00:00.500001Z"),
                Some("2024-05-01T12:00:00.000001Z"),
                Some("2024-05-01T12:00:00.500001Z"),
                "2024-05-01T12:00:09.500Z",
            ),
            // No sentAt: the device time as is.
            (
                None,
                Some("2024-05-01T11:59:00Z"),
                None,
                None,
                Some("2024-05-01T11:59:00Z"),
                None,
                "2024-05-01T11:59:00Z",
            ),
            // No offset: read as UTC.
            (
                None,
                Some("2024-05-01T11:59:00.25"),
                None,
                None,
                Some("2024-05-01T11:59:00.25Z"),
                None,
                "2024-05-01T11:59:00.25Z",
            ),
            // sentAt only: received_at.
            (
                None,
                None,
                Some("2024-05-01T11:59:00Z"),
                None,
                None,
                Some("2024-05-01T11:59:00Z"),
                r,
            ),
            // Nothing: received_at.
            (None, None, None, None, None, None, r),
        ];
        for (orig, stamp, sent, batch_sent, want_orig, want_sent, want_ts) in cases {
            let mut item = json!({"type": "track", "userId": "u", "event": "E"});
            if let Some(v) = orig {
                item["originalTimestamp"] = json!(v);
            }
            if let Some(v) = stamp {
                item["timestamp"] = json!(v);
            }
            if let Some(v) = sent {
                item["sentAt"] = json!(v);
            }
            let env = Envelope {
                sent_at: batch_sent.map(|s| DateTime::parse_from_rfc3339(s).unwrap().to_utc()),
                ..Default::default()
            };
            let e = norm().normalise(item.clone(), None, &env).expect("valid");
            assert_eq!(e.original_timestamp, want_orig.map(ts), "{item}");
            assert_eq!(e.sent_at, want_sent.map(ts), "{item}");
            assert_eq!(e.timestamp, Some(ts(want_ts)), "{item}");
        }
    }

    #[test]
    fn timestamps_convert_through_the_one_conversion() {
        // A leap second is clamped to the last nanosecond of its second.
        let e = one(json!({"type": "track", "userId": "u", "event": "E",
            "timestamp": "2016-12-31T23:59:60.5Z"}))
        .expect("valid");
        let want = prost_types::Timestamp {
            seconds: 1_483_228_799,
            nanos: 999_999_999,
        };
        assert_eq!(e.original_timestamp, Some(want));
        assert_eq!(e.timestamp, Some(want));
        // A year a protobuf timestamp cannot hold is an invalid timestamp.
        for t in ["0000-06-01T00:00:00Z", "0000-06-01T00:00:00"] {
            let err = one(json!({"type": "track", "userId": "u", "event": "E", "timestamp": t}))
                .unwrap_err();
            assert_eq!(err.reason().label(), "invalid_timestamp", "{t}");
        }
    }

    #[test]
    fn skew_correction_never_overflows() {
        let (min, max) = (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC);
        assert_eq!(corrected_timestamp(now(), Some(max), Some(min)), min);
        assert_eq!(corrected_timestamp(now(), Some(min), Some(max)), max);
    }

    #[test]
    fn derived_message_ids_are_stable() {
        let a = json!({"type": "track", "userId": "u", "event": "E",
            "properties": {"a": 1, "b": [1, {"y": 2, "x": 1}]}, "timestamp": "2024-05-01T12:00:00Z"});
        // Same content, other key order, another sentAt: same id.
        let b = json!({"timestamp": "2024-05-01T12:00:00Z", "sentAt": "2024-05-01T12:00:05Z",
            "properties": {"b": [1, {"x": 1, "y": 2}], "a": 1}, "event": "E", "userId": "u", "type": "track"});
        let ea = one(a.clone()).unwrap();
        let eb = one(b).unwrap();
        assert_eq!(ea.message_id, eb.message_id);
        assert_eq!(ea.message_id.len(), 32);
        assert!(ea.message_id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(ea.id, format!("web:{}", ea.message_id));
        // Different timestamp, content or source: different id.
        let mut c = a.clone();
        c["timestamp"] = json!("2024-05-01T12:00:01Z");
        assert_ne!(one(c).unwrap().message_id, ea.message_id);
        let mut d = a.clone();
        d["properties"]["a"] = json!(2);
        assert_ne!(one(d).unwrap().message_id, ea.message_id);
        let other = Normaliser {
            source_id: "ios",
            ..norm()
        };
        let e = other
            .normalise(a.clone(), None, &Envelope::default())
            .unwrap();
        assert_ne!(e.message_id, ea.message_id);
        // Empty messageId is derived too; a numeric one is kept as text.
        let mut f = a.clone();
        f["messageId"] = json!("");
        assert_eq!(one(f).unwrap().message_id, ea.message_id);
        let mut g = a;
        g["messageId"] = json!(12345);
        assert_eq!(one(g).unwrap().message_id, "12345");
    }

    #[test]
    fn batch_defaults_merge_item_keys_win() {
        let env = parse_batch(
            br#"{"batch":[{"type":"track","userId":"u","event":"E","context":{"ip":"1.1.1.1"}},
                          {"type":"track","userId":"u","event":"F"}],
                 "context":{"ip":"9.9.9.9","locale":"en"},"integrations":{"All":false},
                 "sentAt":"2024-05-01T12:00:00Z","writeKey":"k"}"#,
        )
        .expect("valid batch");
        assert_eq!(env.write_key.as_deref(), Some("k"));
        assert_eq!(env.items.len(), 2);
        let events: Vec<Event> = env
            .items
            .iter()
            .map(|i| norm().normalise(i.clone(), None, &env).unwrap())
            .collect();
        let ctx0: Value = serde_json::from_slice(&events[0].context).unwrap();
        assert_eq!(ctx0, json!({"ip": "1.1.1.1", "locale": "en"}));
        let ctx1: Value = serde_json::from_slice(&events[1].context).unwrap();
        assert_eq!(ctx1, json!({"ip": "9.9.9.9", "locale": "en"}));
        let int1: Value = serde_json::from_slice(&events[1].integrations).unwrap();
        assert_eq!(int1, json!({"All": false}));
        assert_eq!(events[1].sent_at, Some(ts("2024-05-01T12:00:00Z")));
    }

    #[test]
    fn batch_shape_errors() {
        for (body, kind) in [
            (&br#"{"batch": "#[..], "invalid_json"),
            (br#"[1,2]"#, "invalid_json"),
            (br#"{"events": []}"#, "invalid_batch"),
            (br#"{"batch": {}}"#, "invalid_batch"),
            (br#"{"batch": [], "context": 3}"#, "invalid_batch"),
            (br#"{"batch": [], "sentAt": "soon"}"#, "invalid_batch"),
        ] {
            let err = parse_batch(body).unwrap_err();
            assert_eq!(err.kind(), kind, "{}", String::from_utf8_lossy(body));
        }
        assert!(parse_batch(br#"{"batch": []}"#).unwrap().items.is_empty());
    }

    #[test]
    fn oversized_events_are_rejected() {
        let n = Normaliser {
            max_event_bytes: 200,
            ..norm()
        };
        let big = "x".repeat(300);
        let err = n
            .normalise(
                json!({"type": "track", "userId": "u", "event": "E", "properties": {"p": big}}),
                None,
                &Envelope::default(),
            )
            .unwrap_err();
        assert_eq!(err.reason().label(), "event_too_large");
        assert_eq!(err.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
    }
}
