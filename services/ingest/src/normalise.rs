//! What every wire format shares. Segment JSON ([`crate::segment`]), mParticle JSON
//! ([`crate::mparticle`]) and protobuf `Event`s ([`crate::protobuf`]) are three encodings of the
//! same `herald.v1.Event`; each decoder returns a [`Decoded`], and this module owns what they
//! have in common:
//! - the invalid-event error [`InvalidEvent`] and its closed [`Reason`] (the metric label and the
//!   quarantine record's `reason`);
//! - event ids: [`event_id`], [`derive_message_id`] and [`check_message_id`];
//! - clock-skew correction ([`corrected_timestamp`]) and timestamp parsing; the protobuf
//!   conversion itself is [`herald_proto::time`];
//! - the partition key ([`partition_key`]) and the [`Normaliser`] context every decoder reads.

use axum::http::StatusCode;
use chrono::{DateTime, NaiveDateTime, Utc};
use herald_proto::v1::{Event, EventType};
use serde_json::{Map, Value};

use crate::config::IngestConfig;

/// Why a payload, or one event of it, was not accepted: a closed set, so every reason has its
/// own metric label ([`Reason::label`]) and quarantine records name it the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The event is not a JSON object.
    NotAnObject,
    /// The event's type is missing, unknown, or one ingest does not take.
    InvalidType,
    /// The event names no user.
    MissingIdentity,
    /// A track event without a name.
    MissingEvent,
    /// A group event without a group id.
    MissingGroupId,
    /// An alias event without a previous id.
    MissingPreviousId,
    /// An alias event without a user id.
    MissingUserId,
    /// A field has the wrong type or shape.
    InvalidField,
    /// A timestamp that cannot be read, or lies outside 0001..=9999.
    InvalidTimestamp,
    /// A required field is missing or empty.
    MissingField,
    /// The client's message id is too long.
    MessageIdTooLong,
    /// The event is larger than `max_event_bytes`.
    EventTooLarge,
    /// The payload is not protobuf `herald.v1.Event`.
    UndecodableProtobuf,
    /// The payload is not JSON, or not the JSON value expected.
    InvalidJson,
    /// The payload is JSON but not a batch of the API's shape.
    InvalidBatch,
    /// The payload holds more events than `max_batch_events`.
    TooManyEvents,
    /// An mParticle bulk payload holds more batches than the API allows.
    TooManyBatches,
    /// A historical payload holds an event that is not old enough.
    NotHistorical,
    /// No source has the id the payload was sent for.
    UnknownSource,
    /// The source is disabled.
    SourceDisabled,
    /// The payload's content type is neither JSON nor protobuf.
    UnsupportedContentType,
    /// A reason this version does not know (a record written by another version).
    Other,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 22] = [
        Self::NotAnObject,
        Self::InvalidType,
        Self::MissingIdentity,
        Self::MissingEvent,
        Self::MissingGroupId,
        Self::MissingPreviousId,
        Self::MissingUserId,
        Self::InvalidField,
        Self::InvalidTimestamp,
        Self::MissingField,
        Self::MessageIdTooLong,
        Self::EventTooLarge,
        Self::UndecodableProtobuf,
        Self::InvalidJson,
        Self::InvalidBatch,
        Self::TooManyEvents,
        Self::TooManyBatches,
        Self::NotHistorical,
        Self::UnknownSource,
        Self::SourceDisabled,
        Self::UnsupportedContentType,
        Self::Other,
    ];

    /// The bounded label: the metric label, the `error` of a 4xx body, a record's `reason`.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotAnObject => "not_an_object",
            Self::InvalidType => "invalid_type",
            Self::MissingIdentity => "missing_identity",
            Self::MissingEvent => "missing_event",
            Self::MissingGroupId => "missing_group_id",
            Self::MissingPreviousId => "missing_previous_id",
            Self::MissingUserId => "missing_user_id",
            Self::InvalidField => "invalid_field",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::MissingField => "missing_field",
            Self::MessageIdTooLong => "message_id_too_long",
            Self::EventTooLarge => "event_too_large",
            Self::UndecodableProtobuf => "undecodable_protobuf",
            Self::InvalidJson => "invalid_json",
            Self::InvalidBatch => "invalid_batch",
            Self::TooManyEvents => "too_many_events",
            Self::TooManyBatches => "too_many_batches",
            Self::NotHistorical => "not_historical",
            Self::UnknownSource => "unknown_source",
            Self::SourceDisabled => "source_disabled",
            Self::UnsupportedContentType => "unsupported_content_type",
            Self::Other => "other",
        }
    }

    /// The reason a label names; [`Reason::Other`] for a label this version does not know (a
    /// record written by another version, read back by a redrive).
    pub fn from_label(label: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|r| r.label() == label)
            .unwrap_or(Self::Other)
    }
}

/// Why one event was not accepted; [`InvalidEvent::reason`] is its bounded [`Reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    /// The event is not a JSON object.
    #[error("each event must be a JSON object")]
    NotAnObject,
    /// `type` is missing or not a known call type.
    #[error("{}", invalid_type_message(.0))]
    InvalidType(String),
    /// A protobuf event of a type only Herald itself makes.
    #[error("event type {0} cannot be sent to ingest")]
    TypeNotAccepted(&'static str),
    /// The event names no user; the fields that would.
    #[error("{0} is required")]
    MissingIdentity(&'static str),
    /// A track event without a name; the field that holds it.
    #[error("track events need a non-empty `{0}`")]
    MissingEvent(&'static str),
    /// A group call without `groupId`.
    #[error("group events need a `groupId`")]
    MissingGroupId,
    /// An alias call without `previousId`.
    #[error("alias events need a `previousId`")]
    MissingPreviousId,
    /// An alias call without `userId`.
    #[error("alias events need a `userId`")]
    MissingUserId,
    /// A field has the wrong JSON type or shape.
    #[error("`{field}` must be {expected}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// A timestamp that is not RFC 3339 / ISO 8601, or lies outside 0001..=9999.
    #[error(
        "`{field}` is not a timestamp between the years 0001 and 9999 such as 2024-05-01T12:00:00.000Z: {value:?}"
    )]
    InvalidTimestamp {
        /// The field.
        field: &'static str,
        /// The value (truncated).
        value: String,
    },
    /// A required field is missing or empty (mParticle: `event_type`, `data.event_name`, ...).
    #[error("`{field}` is required")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// The client's message id is longer than `max_message_id_chars`.
    #[error("the message id is longer than the limit of {limit} characters")]
    MessageIdTooLong {
        /// The limit.
        limit: usize,
    },
    /// The event is larger than `max_event_bytes`.
    #[error("event is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// Its encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The payload is not a protobuf `herald.v1.Event`.
    #[error("payload is not a protobuf herald.v1.Event: {0}")]
    Undecodable(String),
}

fn invalid_type_message(t: &str) -> String {
    if t.is_empty() {
        "event needs a `type`: identify, track, page, screen, group or alias".into()
    } else {
        format!("event type {t:?} is not one of identify, track, page, screen, group, alias")
    }
}

impl InvalidEvent {
    /// Its bounded reason.
    pub fn reason(&self) -> Reason {
        match self {
            Self::NotAnObject => Reason::NotAnObject,
            Self::InvalidType(_) | Self::TypeNotAccepted(_) => Reason::InvalidType,
            Self::MissingIdentity(_) => Reason::MissingIdentity,
            Self::MissingEvent(_) => Reason::MissingEvent,
            Self::MissingGroupId => Reason::MissingGroupId,
            Self::MissingPreviousId => Reason::MissingPreviousId,
            Self::MissingUserId => Reason::MissingUserId,
            Self::InvalidField { .. } => Reason::InvalidField,
            Self::InvalidTimestamp { .. } => Reason::InvalidTimestamp,
            Self::MissingField { .. } => Reason::MissingField,
            Self::MessageIdTooLong { .. } => Reason::MessageIdTooLong,
            Self::TooLarge { .. } => Reason::EventTooLarge,
            Self::Undecodable(_) => Reason::UndecodableProtobuf,
        }
    }

    /// The HTTP status when a single-event call fails with this.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// One event of a payload that was not accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Its position among the payload's events (for an mParticle bulk request: among all events
    /// of the request, batch after batch).
    pub index: usize,
    /// Why.
    pub error: InvalidEvent,
}

/// What a decoder made of a payload: its valid events, normalised, and its invalid ones.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Valid events, in payload order.
    pub events: Vec<Event>,
    /// Invalid events, in payload order.
    pub rejected: Vec<Rejected>,
}

impl Decoded {
    /// Adds the outcome of one event at `index`.
    pub fn push(&mut self, index: usize, result: Result<Event, InvalidEvent>) {
        match result {
            Ok(e) => self.events.push(e),
            Err(error) => self.rejected.push(Rejected { index, error }),
        }
    }
}

/// What normalisation needs besides the payload: the same for every format.
#[derive(Debug, Clone, Copy)]
pub struct Normaliser<'a> {
    /// The authenticated source.
    pub source_id: &'a str,
    /// When the payload arrived.
    pub received_at: DateTime<Utc>,
    /// Number of partitions.
    pub partitions: u32,
    /// Largest encoded event accepted.
    pub max_event_bytes: usize,
    /// Longest client message id accepted, in characters.
    pub max_message_id_chars: usize,
}

impl<'a> Normaliser<'a> {
    /// A normaliser with the default limits of `ingest.*` (`max_event_bytes`,
    /// `max_message_id_chars`), for tests, fuzzing and tools; the service takes its limits from
    /// its config.
    pub fn with_default_limits(
        source_id: &'a str,
        received_at: DateTime<Utc>,
        partitions: u32,
    ) -> Self {
        let defaults = IngestConfig::default();
        Self {
            source_id,
            received_at,
            partitions,
            max_event_bytes: defaults.max_event_bytes,
            max_message_id_chars: defaults.max_message_id_chars,
        }
    }

    /// Checks the encoded size of a normalised event against `max_event_bytes`.
    pub fn check_size(&self, event: Event) -> Result<Event, InvalidEvent> {
        let size = prost::Message::encoded_len(&event);
        if size > self.max_event_bytes {
            return Err(InvalidEvent::TooLarge {
                size,
                limit: self.max_event_bytes,
            });
        }
        Ok(event)
    }
}

/// Device ids (mParticle's `device_info` names), in the order they are tried as a partition key.
pub const DEVICE_ID_FIELDS: [&str; 10] = [
    "ios_idfv",
    "ios_advertising_id",
    "android_uuid",
    "android_advertising_id",
    "fire_advertising_id",
    "roku_advertising_id",
    "roku_publisher_id",
    "microsoft_advertising_id",
    "microsoft_publisher_id",
    "mp_deviceid",
];

/// The partition key of a person, the same whichever format their events came in: the user id,
/// else the anonymous id, else `<type>:<value>` of the first identity in a fixed order: `mpid`,
/// `email`, the other identities by name, then the device ids in [`DEVICE_ID_FIELDS`] order.
/// Empty values count as absent; `None` when nothing names the person.
pub fn partition_key<'a>(
    user_id: &str,
    anonymous_id: &str,
    identities: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<String> {
    if !user_id.is_empty() {
        return Some(user_id.to_string());
    }
    if !anonymous_id.is_empty() {
        return Some(anonymous_id.to_string());
    }
    // (rank, name order) of an identity type: smaller comes first.
    let rank = |t: &'a str| -> (usize, &'a str) {
        match t {
            "mpid" => (0, ""),
            "email" => (1, ""),
            _ => match DEVICE_ID_FIELDS.iter().position(|f| *f == t) {
                Some(i) => (3 + i, ""),
                None => (2, t),
            },
        }
    };
    identities
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .min_by_key(|(t, _)| rank(t))
        .map(|(t, v)| format!("{t}:{v}"))
}

/// An event's id: `<source id>:<message id>`.
pub fn event_id(source_id: &str, message_id: &str) -> String {
    let mut id = String::with_capacity(source_id.len() + 1 + message_id.len());
    id.push_str(source_id);
    id.push(':');
    id.push_str(message_id);
    id
}

/// Checks a client message id: at most `limit` characters, no control characters.
pub fn check_message_id(id: &str, field: &'static str, limit: usize) -> Result<(), InvalidEvent> {
    if id.chars().count() > limit {
        return Err(InvalidEvent::MessageIdTooLong { limit });
    }
    if id.chars().any(char::is_control) {
        return Err(InvalidEvent::InvalidField {
            field,
            expected: "a string without control characters",
        });
    }
    Ok(())
}

/// The event time corrected for device clock skew: `received_at - (sent_at - original)` when
/// both device times are known, else `original`, else `received_at`.
pub fn corrected_timestamp(
    received_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    original: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    match (sent_at, original) {
        // Absurd device times can leave chrono's range: then fall back to the device time.
        (Some(sent), Some(orig)) => received_at.checked_sub_signed(sent - orig).unwrap_or(orig),
        (None, Some(orig)) => orig,
        _ => received_at,
    }
}

/// A device time the protobuf conversion keeps exactly (years 0001 to 9999), else
/// `invalid_timestamp` naming `field` and showing `value`.
pub fn check_time(
    t: DateTime<Utc>,
    field: &'static str,
    value: impl FnOnce() -> String,
) -> Result<DateTime<Utc>, InvalidEvent> {
    if herald_proto::time::in_range(t) {
        Ok(t)
    } else {
        Err(InvalidEvent::InvalidTimestamp {
            field,
            value: truncate(&value()),
        })
    }
}

/// Parses an RFC 3339 timestamp (any fraction, `Z` or an offset); one without an offset is
/// read as UTC. Absent, `null` and `""` are `None`.
pub fn parse_time(
    v: Option<&Value>,
    field: &'static str,
) -> Result<Option<DateTime<Utc>>, InvalidEvent> {
    let s = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(InvalidEvent::InvalidTimestamp {
                field,
                value: truncate(&other.to_string()),
            });
        }
    };
    parse_time_str(s, field)
}

/// [`parse_time`] of a string: `""` is `None`.
pub fn parse_time_str(s: &str, field: &'static str) -> Result<Option<DateTime<Utc>>, InvalidEvent> {
    if s.is_empty() {
        return Ok(None);
    }
    let t = match DateTime::parse_from_rfc3339(s) {
        Ok(t) => t.to_utc(),
        Err(_) => NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
            .map(|t| t.and_utc())
            .map_err(|_| InvalidEvent::InvalidTimestamp {
                field,
                value: truncate(s),
            })?,
    };
    check_time(t, field, || s.to_string()).map(Some)
}

/// A JSON value as bytes; absent and `null` are empty.
pub fn json_bytes(v: Option<&Value>) -> Vec<u8> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::to_vec(v).expect("a JSON value serialises"),
    }
}

/// At most 64 characters of `s`, for messages.
pub fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A stable message id for an event the client sent without one: 128-bit FNV-1a over the
/// source id, the call type, the event's canonical JSON (sorted keys; without `sentAt`,
/// `writeKey` and `messageId`, which change between retries or are absent) and its device
/// timestamp, as 32 hex digits. A retried request derives the same id, so JetStream drops the
/// duplicate.
pub fn derive_message_id(
    source_id: &str,
    ty: EventType,
    obj: &Map<String, Value>,
    original: Option<DateTime<Utc>>,
) -> String {
    let mut h = Fnv128::new();
    h.write(source_id.as_bytes());
    h.write(&[0]);
    h.write(ty.as_str_name().as_bytes());
    h.write(&[0]);
    let mut buf = Vec::with_capacity(256);
    buf.push(b'{');
    let mut keys: Vec<&String> = obj
        .keys()
        .filter(|k| !matches!(k.as_str(), "sentAt" | "writeKey" | "messageId"))
        .collect();
    keys.sort();
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_json_string(k, &mut buf);
        buf.push(b':');
        write_canonical(&obj[k], &mut buf);
    }
    buf.push(b'}');
    h.write(&buf);
    h.write(&[0]);
    if let Some(t) = original {
        h.write(
            &t.timestamp_nanos_opt()
                .unwrap_or(t.timestamp())
                .to_be_bytes(),
        );
    }
    format!("{:032x}", h.finish())
}

/// JSON with object keys sorted at every level, so equal values give equal bytes whatever the
/// key order the client used.
fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            out.push(b'{');
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(k, out);
                out.push(b':');
                write_canonical(&m[k], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        scalar => {
            serde_json::to_writer(&mut *out, scalar).expect("writing to a Vec cannot fail");
        }
    }
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// FNV-1a, 128-bit: stable across processes, platforms and releases.
struct Fnv128(u128);

impl Fnv128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    fn new() -> Self {
        Self(Self::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u128::from(*b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    fn finish(&self) -> u128 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use chrono::TimeZone;

    use super::*;

    #[test]
    fn fnv128_known_values() {
        // Published FNV-1a 128 test vectors.
        let mut h = Fnv128::new();
        assert_eq!(h.finish(), 0x6c62272e07bb014262b821756295c58d);
        h.write(b"a");
        assert_eq!(h.finish(), 0xd228cb696f1a8caf78912b704e4a8964);
    }

    #[test]
    fn every_reason_has_its_own_label() {
        let labels: HashSet<&str> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len(), "labels are distinct");
        for r in Reason::ALL {
            assert_eq!(Reason::from_label(r.label()), r, "{r:?}");
            assert!(
                r.label()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_'),
                "{r:?}"
            );
        }
        assert_eq!(Reason::from_label("something new"), Reason::Other);
        // Each error maps to its own reason; mParticle's missing fields are not `other`.
        let cases = [
            (InvalidEvent::NotAnObject, "not_an_object"),
            (InvalidEvent::InvalidType("x".into()), "invalid_type"),
            (InvalidEvent::TypeNotAccepted("ERASURE"), "invalid_type"),
            (InvalidEvent::MissingIdentity("userId"), "missing_identity"),
            (InvalidEvent::MissingEvent("event"), "missing_event"),
            (InvalidEvent::MissingGroupId, "missing_group_id"),
            (InvalidEvent::MissingPreviousId, "missing_previous_id"),
            (InvalidEvent::MissingUserId, "missing_user_id"),
            (
                InvalidEvent::InvalidField {
                    field: "f",
                    expected: "x",
                },
                "invalid_field",
            ),
            (
                InvalidEvent::InvalidTimestamp {
                    field: "f",
                    value: "x".into(),
                },
                "invalid_timestamp",
            ),
            (
                InvalidEvent::MissingField {
                    field: "event_type",
                },
                "missing_field",
            ),
            (
                InvalidEvent::MessageIdTooLong { limit: 1 },
                "message_id_too_long",
            ),
            (
                InvalidEvent::TooLarge { size: 2, limit: 1 },
                "event_too_large",
            ),
            (
                InvalidEvent::Undecodable("x".into()),
                "undecodable_protobuf",
            ),
        ];
        for (e, label) in cases {
            assert_eq!(e.reason().label(), label, "{e:?}");
        }
    }

    #[test]
    fn partition_keys() {
        let ids = |v: &[(&'static str, &'static str)]| v.to_vec();
        let cases = [
            ("u", "a", ids(&[("mpid", "1")]), Some("u")),
            ("", "a", ids(&[("mpid", "1")]), Some("a")),
            (
                "",
                "",
                ids(&[("email", "e@x"), ("mpid", "1")]),
                Some("mpid:1"),
            ),
            (
                "",
                "",
                ids(&[("phone", "p"), ("email", "e@x")]),
                Some("email:e@x"),
            ),
            (
                "",
                "",
                ids(&[("phone", "p"), ("other", "o")]),
                Some("other:o"),
            ),
            // Device ids come after every other identity, in their fixed order.
            (
                "",
                "",
                ids(&[("mp_deviceid", "d"), ("zzz", "z")]),
                Some("zzz:z"),
            ),
            (
                "",
                "",
                ids(&[("android_uuid", "a"), ("ios_idfv", "i")]),
                Some("ios_idfv:i"),
            ),
            (
                "",
                "",
                ids(&[("mpid", ""), ("email", "e@x")]),
                Some("email:e@x"),
            ),
            ("", "", ids(&[]), None),
        ];
        for (user, anon, identities, want) in cases {
            assert_eq!(
                partition_key(user, anon, identities.clone()).as_deref(),
                want,
                "{user:?} {anon:?} {identities:?}"
            );
        }
    }

    #[test]
    fn timestamps_outside_the_protobuf_range_are_invalid() {
        assert_eq!(
            parse_time_str("2024-05-01T12:00:00Z", "timestamp").unwrap(),
            Some(Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap())
        );
        let err = parse_time_str("0000-12-31T23:59:59Z", "timestamp").unwrap_err();
        assert_eq!(err.reason(), Reason::InvalidTimestamp);
        // A leap second parses, and converts clamped.
        let leap = parse_time_str("2016-12-31T23:59:60.5Z", "timestamp")
            .unwrap()
            .expect("a time");
        assert_eq!(herald_proto::time::to_proto(leap).nanos, 999_999_999);
    }
}
