//! The mParticle Events API v2 shape: parsing batches (`/v2/events`) and bulk requests
//! (`/v2/bulkevents`, `/v2/bulkevents/historical`), and normalising their events into
//! `herald.v1.Event`.
//!
//! What goes where:
//! - the user id is `user_identities.customerid` (or `customer_id`); `email`, `mpid` and every
//!   other identity keep their mParticle names in `identities`, and so do device ids from
//!   `device_info` (`ios_idfv`, `android_advertising_id`, ...);
//! - the partition key is the user id, else `mpid:<mpid>`, else `email:<email>`, else the other
//!   identities in the order of their names, else the device ids in [`DEVICE_ID_FIELDS`] order;
//! - `user_attributes` become `traits` of every event of the batch and `context.traits`;
//!   `deleted_user_attributes` become `deleted_traits`; `device_info` is `context.device`,
//!   `application_info` is `context.app`, `ip` is `context.ip`;
//! - `consent_state.gdpr.<purpose>.consented` is the purpose `<purpose>` (lower case);
//!   `consent_state.ccpa.data_sale_opt_out.consented: true` means the user opted out of data
//!   sale: purpose `data_sale` is `false`;
//! - `data.source_message_id` is the message id (event id `<source>:<source_message_id>`);
//!   without one, an id is derived from the source, the event, the batch's identities and its
//!   timestamp, like Segment's;
//! - `data.timestamp_unixtime_ms` is the device time; mParticle sends no `sentAt`, so there is
//!   no skew correction.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use herald_common::partition::partition_for;
use herald_proto::time::to_proto;
use herald_proto::v1::{Consent, Event, EventType};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::normalise::{
    DEVICE_ID_FIELDS, Decoded, InvalidEvent, Normaliser, check_message_id, check_time,
    corrected_timestamp, derive_message_id, event_id, json_bytes, partition_key, truncate,
};

/// Most batches in one bulk request, as the mParticle API defines.
pub const MAX_BULK_BATCHES: usize = 100;

/// How old every event sent to `/v2/bulkevents/historical` must be.
pub const HISTORICAL_MIN_AGE: chrono::TimeDelta = chrono::TimeDelta::hours(72);

/// Longest `source_request_id` accepted.
pub const MAX_SOURCE_REQUEST_ID_CHARS: usize = 256;

/// The event type of the event made for a batch that carries user attributes but no events.
const BATCH_ATTRIBUTES: &str = "\u{0}batch_attributes";

/// One mParticle batch: its events plus what applies to all of them.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The events (`{event_type, data}` items), not yet validated.
    pub events: Vec<Value>,
    /// `source_request_id`: the client's id of this batch, for request-level dedupe.
    pub source_request_id: Option<String>,
    /// The user id (`user_identities.customerid` or `customer_id`), or empty.
    pub user_id: String,
    /// Every other identity by type: `email`, `mpid`, other user identities, device ids.
    pub identities: BTreeMap<String, String>,
    /// The partition key the batch's events are routed by.
    pub partition_key: String,
    /// `user_attributes`, without the deleted ones.
    pub user_attributes: Option<Map<String, Value>>,
    /// `deleted_user_attributes`.
    pub deleted_user_attributes: Vec<String>,
    /// The context every event of the batch gets (`device`, `app`, `traits`, `ip`,
    /// `mparticle.environment`, and the batch's own `context`).
    pub context: Map<String, Value>,
    /// The consent state the batch carried, if any.
    pub consent: Option<Consent>,
    /// Whether its events are historical imports (`/v2/bulkevents/historical`), checked by
    /// [`mark_historical`].
    pub historical: bool,
}

/// Which `/v2/*` call a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v2/events`: one batch.
    Events,
    /// `/v2/bulkevents`: an array of batches.
    Bulk,
    /// `/v2/bulkevents/historical`: an array of batches of events at least 72 hours old.
    Historical,
}

/// Parses an mParticle payload: one batch object, or a bulk array of them. A `historical`
/// payload must hold only events at least 72 hours older than `received_at`.
pub fn parse(
    body: &[u8],
    bulk: bool,
    historical: bool,
    received_at: DateTime<Utc>,
) -> Result<Vec<Batch>, ApiError> {
    let mut batches = if bulk {
        parse_bulk(body)?
    } else {
        vec![parse_events(body)?]
    };
    if historical {
        mark_historical(&mut batches, received_at)?;
    }
    Ok(batches)
}

/// How many events the batches hold.
pub fn count(batches: &[Batch]) -> usize {
    batches.iter().map(|b| b.events.len()).sum()
}

/// The mParticle decoder: normalises the events of every batch whose `fresh` entry is true
/// (`None`: every batch), plus the attribute update of a batch without events. A rejected
/// event's index is its position among all events of the batches, batch after batch.
pub fn decode(n: &Normaliser<'_>, batches: &[Batch], fresh: Option<&[bool]>) -> Decoded {
    let mut decoded = Decoded {
        events: Vec::with_capacity(count(batches)),
        rejected: Vec::new(),
    };
    let mut index = 0;
    for (b, batch) in batches.iter().enumerate() {
        let fresh = fresh.is_none_or(|f| f.get(b).copied().unwrap_or(true));
        if fresh && let Some(result) = n.normalise_attributes_only(batch) {
            decoded.push(index, result);
        }
        for item in &batch.events {
            if fresh {
                decoded.push(index, n.normalise_mparticle(item, batch));
            }
            index += 1;
        }
    }
    decoded
}

/// Parses a `/v2/events` body: one batch object.
pub fn parse_events(body: &[u8]) -> Result<Batch, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => parse_batch(obj, None),
        Ok(_) => Err(ApiError::InvalidJson(
            "expected a JSON object (one mParticle batch)".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(e.to_string())),
    }
}

/// Parses a `/v2/bulkevents` body: a JSON array of at most [`MAX_BULK_BATCHES`] batches.
pub fn parse_bulk(body: &[u8]) -> Result<Vec<Batch>, ApiError> {
    let items = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items,
        Ok(_) => {
            return Err(ApiError::InvalidJson(
                "expected a JSON array of mParticle batches".into(),
            ));
        }
        Err(e) => return Err(ApiError::InvalidJson(e.to_string())),
    };
    if items.len() > MAX_BULK_BATCHES {
        return Err(ApiError::TooManyBatches {
            count: items.len(),
            limit: MAX_BULK_BATCHES,
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(obj) => parse_batch(obj, Some(i)),
            _ => Err(ApiError::InvalidBatch(format!(
                "bulk item {i} must be a batch object"
            ))),
        })
        .collect()
}

/// Parses one batch object. `index` is its position in a bulk request, for messages.
pub fn parse_batch(mut obj: Map<String, Value>, index: Option<usize>) -> Result<Batch, ApiError> {
    let bad = |what: String| match index {
        Some(i) => ApiError::InvalidBatch(format!("batch {i}: {what}")),
        None => ApiError::InvalidBatch(what),
    };
    let events = match obj.remove("events") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("`events` must be an array".into())),
    };
    let source_request_id = match obj.get("source_request_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            if s.chars().count() > MAX_SOURCE_REQUEST_ID_CHARS {
                return Err(bad(format!(
                    "`source_request_id` is longer than {MAX_SOURCE_REQUEST_ID_CHARS} characters"
                )));
            }
            Some(s.clone())
        }
        Some(_) => return Err(bad("`source_request_id` must be a string".into())),
    };

    let object =
        |obj: &Map<String, Value>, key: &str| -> Result<Option<Map<String, Value>>, ApiError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(m)) => Ok(Some(m.clone())),
                Some(_) => Err(bad(format!("`{key}` must be an object"))),
            }
        };

    // Identities.
    let mut user_id = String::new();
    let mut identities = BTreeMap::new();
    if let Some(ids) = object(&obj, "user_identities")? {
        for (k, v) in ids {
            let Some(v) = scalar_text(&v).map_err(|()| {
                bad(format!(
                    "`user_identities.{}` must be a string",
                    truncate(&k)
                ))
            })?
            else {
                continue;
            };
            match k.as_str() {
                "customerid" | "customer_id" => {
                    if user_id.is_empty() || k == "customerid" {
                        user_id = v;
                    }
                }
                _ => {
                    identities.insert(k, v);
                }
            }
        }
    }
    if let Some(v) = obj.get("mpid")
        && let Some(mpid) =
            scalar_text(v).map_err(|()| bad("`mpid` must be a number or a string".into()))?
    {
        identities.insert("mpid".into(), mpid);
    }
    let device_info = object(&obj, "device_info")?;
    let mut device_ids = BTreeMap::new();
    for field in DEVICE_ID_FIELDS {
        let v = if field == "mp_deviceid" {
            obj.get(field)
        } else {
            device_info.as_ref().and_then(|d| d.get(field))
        };
        if let Some(id) = v.and_then(|v| scalar_text(v).ok().flatten()) {
            device_ids.insert(field, id);
        }
    }
    let ids = identities.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let devices = device_ids.iter().map(|(k, v)| (*k, v.as_str()));
    let partition_key = partition_key(&user_id, "", ids.chain(devices)).ok_or_else(|| {
        bad("the batch identifies no user: send user_identities (customerid, email, ...), mpid or device_info ids".into())
    })?;
    for (k, v) in device_ids {
        identities.entry(k.to_string()).or_insert(v);
    }

    // Attributes.
    let deleted_user_attributes = match obj.get("deleted_user_attributes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`deleted_user_attributes` must be an array of names".into()))?,
        Some(_) => {
            return Err(bad(
                "`deleted_user_attributes` must be an array of names".into()
            ));
        }
    };
    let user_attributes = object(&obj, "user_attributes")?.map(|mut m| {
        for d in &deleted_user_attributes {
            m.remove(d);
        }
        m
    });

    // Context.
    let mut context = object(&obj, "context")?.unwrap_or_default();
    if let Some(d) = device_info {
        context.insert("device".into(), Value::Object(d));
    }
    if let Some(a) = object(&obj, "application_info")? {
        context.insert("app".into(), Value::Object(a));
    }
    if let Some(t) = &user_attributes {
        context.insert("traits".into(), Value::Object(t.clone()));
    }
    match obj.get("ip") {
        None | Some(Value::Null) => {}
        Some(Value::String(ip)) => {
            context.insert("ip".into(), Value::String(ip.clone()));
        }
        Some(_) => return Err(bad("`ip` must be a string".into())),
    }
    let mut mp = Map::new();
    for key in ["environment", "schema_version"] {
        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
            mp.insert(key.into(), v.clone());
        }
    }
    if !mp.is_empty() {
        context.insert("mparticle".into(), Value::Object(mp));
    }

    let consent = match object(&obj, "consent_state")? {
        Some(state) => Some(parse_consent(&state).map_err(bad)?),
        None => None,
    };

    Ok(Batch {
        events,
        source_request_id,
        user_id,
        identities,
        partition_key,
        user_attributes,
        deleted_user_attributes,
        context,
        consent,
        historical: false,
    })
}

/// `consent_state`: GDPR purposes and CCPA's data sale opt-out.
fn parse_consent(state: &Map<String, Value>) -> Result<Consent, String> {
    let mut purposes = HashMap::new();
    let mut updated: Option<i64> = None;
    let mut note_time = |entry: &Map<String, Value>| {
        if let Some(ms) = entry.get("timestamp_unixtime_ms").and_then(Value::as_i64) {
            updated = Some(updated.map_or(ms, |u| u.max(ms)));
        }
    };
    match state.get("gdpr") {
        None | Some(Value::Null) => {}
        Some(Value::Object(gdpr)) => {
            for (purpose, entry) in gdpr {
                let Some(entry) = entry.as_object() else {
                    return Err(format!(
                        "`consent_state.gdpr.{}` must be an object",
                        truncate(purpose)
                    ));
                };
                let Some(consented) = entry.get("consented").and_then(Value::as_bool) else {
                    return Err(format!(
                        "`consent_state.gdpr.{}.consented` must be true or false",
                        truncate(purpose)
                    ));
                };
                note_time(entry);
                purposes.insert(purpose.to_lowercase(), consented);
            }
        }
        Some(_) => return Err("`consent_state.gdpr` must be an object".into()),
    }
    match state.get("ccpa") {
        None | Some(Value::Null) => {}
        Some(Value::Object(ccpa)) => {
            if let Some(entry) = ccpa.get("data_sale_opt_out").filter(|v| !v.is_null()) {
                let consented = entry
                    .as_object()
                    .and_then(|e| e.get("consented"))
                    .and_then(Value::as_bool)
                    .ok_or_else(|| {
                        "`consent_state.ccpa.data_sale_opt_out.consented` must be true or false"
                            .to_string()
                    })?;
                if let Some(e) = entry.as_object() {
                    note_time(e);
                }
                // `consented: true` to the opt-out means the user opted OUT of data sale.
                purposes.insert("data_sale".into(), !consented);
            }
        }
        Some(_) => return Err("`consent_state.ccpa` must be an object".into()),
    }
    Ok(Consent {
        purposes,
        opted_out: false,
        updated_at: updated
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .map(to_proto),
    })
}

/// A string, or a number as its decimal text; `Ok(None)` for absent, `null` and `""`.
fn scalar_text(v: &Value) -> Result<Option<String>, ()> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        _ => Err(()),
    }
}

/// Checks that every event of the batches has a `timestamp_unixtime_ms` at least
/// 72 hours before `received_at` (`/v2/bulkevents/historical`), and marks the
/// batches historical; the first event that is not is `400 not_historical`.
pub fn mark_historical(batches: &mut [Batch], received_at: DateTime<Utc>) -> Result<(), ApiError> {
    let newest_allowed = received_at - HISTORICAL_MIN_AGE;
    for (b, batch) in batches.iter().enumerate() {
        for (e, event) in batch.events.iter().enumerate() {
            let ts = event
                .get("data")
                .and_then(|d| d.get("timestamp_unixtime_ms"))
                .map(|v| millis(v, "timestamp_unixtime_ms"));
            match ts {
                Some(Ok(Some(t))) if t <= newest_allowed => {}
                Some(Ok(Some(t))) => {
                    return Err(ApiError::NotHistorical(format!(
                        "batch {b} event {e}: timestamp {} is less than 72 hours old; send recent events to /v2/bulkevents",
                        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                    )));
                }
                _ => {
                    return Err(ApiError::NotHistorical(format!(
                        "batch {b} event {e}: historical events need `data.timestamp_unixtime_ms` (Unix milliseconds)"
                    )));
                }
            }
        }
    }
    for batch in batches {
        batch.historical = true;
    }
    Ok(())
}

/// Unix milliseconds (an integer, a float, or a string of digits) as a time.
fn millis(v: &Value, field: &'static str) -> Result<Option<DateTime<Utc>>, InvalidEvent> {
    let bad = || InvalidEvent::InvalidTimestamp {
        field,
        value: truncate(&v.to_string()),
    };
    let ms = match v {
        Value::Null => return Ok(None),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i,
            (None, Some(f)) if f.is_finite() && f.abs() < 1e17 => f as i64,
            _ => return Err(bad()),
        },
        Value::String(s) => s.trim().parse::<i64>().map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    let t = DateTime::<Utc>::from_timestamp_millis(ms).ok_or_else(bad)?;
    check_time(t, field, || v.to_string()).map(Some)
}

/// Normalisation of mParticle events.
impl Normaliser<'_> {
    /// Validates one `{event_type, data}` item of `batch` and turns it into a
    /// `herald.v1.Event`. Unknown event types are kept as [`EventType::Application`] named
    /// after their `event_type`.
    pub fn normalise_mparticle(&self, item: &Value, batch: &Batch) -> Result<Event, InvalidEvent> {
        let Value::Object(obj) = item else {
            return Err(InvalidEvent::NotAnObject);
        };
        let event_type = match obj.get("event_type") {
            Some(Value::String(s)) if !s.is_empty() => s.as_str(),
            None | Some(Value::Null) => {
                return Err(InvalidEvent::MissingField {
                    field: "event_type",
                });
            }
            Some(Value::String(_)) => {
                return Err(InvalidEvent::MissingField {
                    field: "event_type",
                });
            }
            Some(_) => {
                return Err(InvalidEvent::InvalidField {
                    field: "event_type",
                    expected: "a string",
                });
            }
        };
        let empty = Map::new();
        let data = match obj.get("data") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(d)) => d,
            Some(_) => {
                return Err(InvalidEvent::InvalidField {
                    field: "data",
                    expected: "an object",
                });
            }
        };
        let original = match data.get("timestamp_unixtime_ms") {
            None => None,
            Some(v) => millis(v, "data.timestamp_unixtime_ms")?,
        };
        let timestamp = corrected_timestamp(self.received_at, None, original);
        let mut properties = match data.get("custom_attributes") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                return Err(InvalidEvent::InvalidField {
                    field: "data.custom_attributes",
                    expected: "an object",
                });
            }
        };
        let mut traits = batch.user_attributes.clone();
        let mut deleted_traits = batch.deleted_user_attributes.clone();
        let mut identities: HashMap<String, String> = batch
            .identities
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut consent = batch.consent.clone();

        let (ty, name) = match event_type {
            "custom_event" => {
                let name = text(data, "event_name", "data.event_name")?;
                if name.is_empty() {
                    return Err(InvalidEvent::MissingField {
                        field: "data.event_name",
                    });
                }
                copy(data, &mut properties, "custom_event_type");
                (EventType::Track, name)
            }
            "screen_view" => (
                EventType::Screen,
                text(data, "screen_name", "data.screen_name")?,
            ),
            "commerce_event" => (EventType::Commerce, commerce(data, &mut properties)?),
            "session_start" => {
                copy(data, &mut properties, "session_id");
                (EventType::SessionStart, String::new())
            }
            "session_end" => {
                copy(data, &mut properties, "session_id");
                copy(data, &mut properties, "session_duration_ms");
                (EventType::SessionEnd, String::new())
            }
            "opt_out" => {
                let opted_out = match data.get("is_opted_out") {
                    Some(Value::Bool(b)) => *b,
                    None | Some(Value::Null) => {
                        return Err(InvalidEvent::MissingField {
                            field: "data.is_opted_out",
                        });
                    }
                    Some(_) => {
                        return Err(InvalidEvent::InvalidField {
                            field: "data.is_opted_out",
                            expected: "true or false",
                        });
                    }
                };
                let c = consent.get_or_insert_with(Consent::default);
                c.opted_out = opted_out;
                c.updated_at = Some(to_proto(timestamp));
                (EventType::OptOut, String::new())
            }
            "user_attribute_change" => {
                let attr = text(data, "user_attribute_name", "data.user_attribute_name")?;
                if attr.is_empty() {
                    return Err(InvalidEvent::MissingField {
                        field: "data.user_attribute_name",
                    });
                }
                let deleted = data.get("deleted").and_then(Value::as_bool) == Some(true);
                let t = traits.get_or_insert_with(Map::new);
                if deleted {
                    t.remove(&attr);
                    if !deleted_traits.contains(&attr) {
                        deleted_traits.push(attr.clone());
                    }
                } else {
                    t.insert(
                        attr.clone(),
                        data.get("new").cloned().unwrap_or(Value::Null),
                    );
                    deleted_traits.retain(|d| *d != attr);
                }
                for key in ["new", "old", "deleted", "is_new_attribute"] {
                    copy(data, &mut properties, key);
                }
                properties.insert("user_attribute_name".into(), Value::String(attr));
                (EventType::UserAttributeChange, String::new())
            }
            BATCH_ATTRIBUTES => (EventType::UserAttributeChange, String::new()),
            "user_identity_change" => {
                for key in ["new", "old"] {
                    match data.get(key) {
                        None | Some(Value::Null) | Some(Value::Object(_)) => {}
                        Some(_) => {
                            return Err(InvalidEvent::InvalidField {
                                field: if key == "new" { "data.new" } else { "data.old" },
                                expected: "an object",
                            });
                        }
                    }
                    copy(data, &mut properties, key);
                }
                if let Some(new) = data.get("new").and_then(Value::as_object) {
                    let kind = new.get("identity_type").and_then(Value::as_str);
                    let value = new
                        .get("identity")
                        .and_then(|v| scalar_text(v).ok().flatten());
                    if let (Some(kind), Some(value)) = (kind, value)
                        && !matches!(kind, "customerid" | "customer_id")
                    {
                        identities.insert(kind.to_string(), value);
                    }
                }
                (EventType::UserIdentityChange, String::new())
            }
            other => {
                for (k, v) in data {
                    if !matches!(
                        k.as_str(),
                        "timestamp_unixtime_ms" | "source_message_id" | "custom_attributes"
                    ) {
                        properties.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
                (EventType::Application, other.to_string())
            }
        };
        if let Some(c) = consent.as_mut()
            && c.updated_at.is_none()
        {
            c.updated_at = Some(to_proto(timestamp));
        }

        let message_id = match data.get("source_message_id") {
            Some(Value::String(s)) if !s.is_empty() => {
                check_message_id(s, "data.source_message_id", self.max_message_id_chars)?;
                s.clone()
            }
            Some(Value::Number(n)) => n.to_string(),
            None | Some(Value::Null) | Some(Value::String(_)) => {
                self.derived_id(ty, obj, batch, original)
            }
            Some(_) => {
                return Err(InvalidEvent::InvalidField {
                    field: "data.source_message_id",
                    expected: "a string",
                });
            }
        };

        let mut context = batch.context.clone();
        let mut session = Map::new();
        for (from, to) in [
            ("session_id", "id"),
            ("session_uuid", "uuid"),
            ("session_start_unixtime_ms", "start_unixtime_ms"),
        ] {
            if let Some(v) = data.get(from).filter(|v| !v.is_null()) {
                session.insert(to.into(), v.clone());
            }
        }
        if !session.is_empty() {
            context.insert("session".into(), Value::Object(session));
        }
        if let Some(loc) = data.get("location").filter(|v| v.is_object()) {
            context.insert("location".into(), loc.clone());
        }

        let traits = traits.filter(|t| !t.is_empty()).map(Value::Object);
        let properties = (!properties.is_empty()).then_some(Value::Object(properties));
        let context = (!context.is_empty()).then_some(Value::Object(context));
        let event = Event {
            id: event_id(self.source_id, &message_id),
            message_id,
            source_id: self.source_id.to_string(),
            r#type: ty as i32,
            name,
            user_id: batch.user_id.clone(),
            anonymous_id: String::new(),
            identities,
            properties: json_bytes(properties.as_ref()),
            traits: json_bytes(traits.as_ref()),
            context: json_bytes(context.as_ref()),
            integrations: Vec::new(),
            original_timestamp: original.map(to_proto),
            sent_at: None,
            received_at: Some(to_proto(self.received_at)),
            timestamp: Some(to_proto(timestamp)),
            consent,
            historical: batch.historical,
            group_id: String::new(),
            previous_id: String::new(),
            partition: partition_for(&batch.partition_key, self.partitions),
            partition_key: batch.partition_key.clone(),
            source_request_id: batch.source_request_id.clone().unwrap_or_default(),
            deleted_traits,
        };
        self.check_size(event)
    }

    /// For a batch without events that carries `user_attributes` or `deleted_user_attributes`
    /// (mParticle's way of updating a profile alone), one `UserAttributeChange` event with
    /// them, so the update is not lost; `None` for any other batch.
    pub fn normalise_attributes_only(&self, batch: &Batch) -> Option<Result<Event, InvalidEvent>> {
        let has_attributes = batch
            .user_attributes
            .as_ref()
            .is_some_and(|a| !a.is_empty())
            || !batch.deleted_user_attributes.is_empty();
        if !batch.events.is_empty() || !has_attributes {
            return None;
        }
        let item = serde_json::json!({"event_type": BATCH_ATTRIBUTES, "data": {}});
        Some(self.normalise_mparticle(&item, batch))
    }

    /// A message id for an event without `source_message_id`: Segment's derivation over the
    /// event item and the batch's identities, so identical events of two users differ.
    fn derived_id(
        &self,
        ty: EventType,
        item: &Map<String, Value>,
        batch: &Batch,
        original: Option<DateTime<Utc>>,
    ) -> String {
        let mut basis = Map::new();
        basis.insert("event".into(), Value::Object(item.clone()));
        if let Some(a) = &batch.user_attributes {
            basis.insert("user_attributes".into(), Value::Object(a.clone()));
        }
        basis.insert(
            "deleted_user_attributes".into(),
            batch
                .deleted_user_attributes
                .iter()
                .cloned()
                .map(Value::String)
                .collect(),
        );
        basis.insert("user_id".into(), Value::String(batch.user_id.clone()));
        basis.insert(
            "identities".into(),
            Value::Object(
                batch
                    .identities
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
        );
        derive_message_id(self.source_id, ty, &basis, original)
    }
}

/// A string field of `data`; absent or `null` is empty.
fn text(data: &Map<String, Value>, key: &str, field: &'static str) -> Result<String, InvalidEvent> {
    match data.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(InvalidEvent::InvalidField {
            field,
            expected: "a string",
        }),
    }
}

/// Copies `data[key]` into `properties` unless absent, `null`, or already set by a custom
/// attribute of the same name.
fn copy(data: &Map<String, Value>, properties: &mut Map<String, Value>, key: &str) {
    if let Some(v) = data.get(key).filter(|v| !v.is_null()) {
        properties
            .entry(key.to_string())
            .or_insert_with(|| v.clone());
    }
}

/// A commerce event's name (the product action, else the promotion action, else `impression`,
/// else its `event_name`, else `commerce_event`) and its properties: the whole
/// `product_action`, its `products` and totals at the top level, the currency, promotions and
/// impressions.
fn commerce(
    data: &Map<String, Value>,
    properties: &mut Map<String, Value>,
) -> Result<String, InvalidEvent> {
    let action = match data.get("product_action") {
        None | Some(Value::Null) => None,
        Some(Value::Object(a)) => Some(a),
        Some(_) => {
            return Err(InvalidEvent::InvalidField {
                field: "data.product_action",
                expected: "an object",
            });
        }
    };
    let promotion = data.get("promotion_action").and_then(Value::as_object);
    if let Some(a) = action {
        properties
            .entry("product_action".to_string())
            .or_insert_with(|| Value::Object(a.clone()));
        for key in [
            "products",
            "transaction_id",
            "affiliation",
            "total_amount",
            "tax_amount",
            "shipping_amount",
            "coupon_code",
            "checkout_step",
            "checkout_options",
        ] {
            copy(a, properties, key);
        }
    }
    for key in [
        "currency_code",
        "promotion_action",
        "product_impressions",
        "shopping_cart",
        "custom_event_type",
    ] {
        copy(data, properties, key);
    }
    let name = action
        .and_then(|a| a.get("action"))
        .or_else(|| promotion.and_then(|p| p.get("action")))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            data.get("product_impressions")
                .filter(|v| !v.is_null())
                .map(|_| "impression".to_string())
        })
        .or_else(|| {
            data.get("event_name")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "commerce_event".to_string());
    Ok(name)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap()
    }

    fn norm() -> Normaliser<'static> {
        Normaliser::with_default_limits("app", now(), 16)
    }

    fn batch(v: Value) -> Batch {
        parse_batch(v.as_object().expect("object").clone(), None).expect("valid batch")
    }

    fn user_batch() -> Batch {
        batch(json!({"user_identities": {"customerid": "u1"}}))
    }

    fn one(item: Value) -> Result<Event, InvalidEvent> {
        norm().normalise_mparticle(&item, &user_batch())
    }

    fn json_of(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("JSON")
    }

    #[test]
    fn event_types_map() {
        let cases: Vec<(Value, EventType, &str)> = vec![
            (
                json!({"event_type": "custom_event", "data": {"event_name": "Signed Up", "custom_event_type": "other"}}),
                EventType::Track,
                "Signed Up",
            ),
            (
                json!({"event_type": "screen_view", "data": {"screen_name": "Home"}}),
                EventType::Screen,
                "Home",
            ),
            (
                json!({"event_type": "commerce_event", "data": {"product_action": {"action": "purchase"}}}),
                EventType::Commerce,
                "purchase",
            ),
            (
                json!({"event_type": "session_start", "data": {"session_id": 1}}),
                EventType::SessionStart,
                "",
            ),
            (
                json!({"event_type": "session_end", "data": {"session_id": 1}}),
                EventType::SessionEnd,
                "",
            ),
            (
                json!({"event_type": "opt_out", "data": {"is_opted_out": true}}),
                EventType::OptOut,
                "",
            ),
            (
                json!({"event_type": "user_attribute_change", "data": {"user_attribute_name": "plan", "new": "pro"}}),
                EventType::UserAttributeChange,
                "",
            ),
            (
                json!({"event_type": "user_identity_change", "data": {"new": {"identity_type": "email", "identity": "a@b.c"}}}),
                EventType::UserIdentityChange,
                "",
            ),
        ];
        for (item, ty, name) in cases {
            let e = one(item.clone()).unwrap_or_else(|e| panic!("{item}: {e}"));
            assert_eq!(e.r#type(), ty, "{item}");
            assert_eq!(e.name, name, "{item}");
        }
        for other in [
            "crash_report",
            "first_run",
            "push_registration",
            "application_state_transition",
            "breadcrumb",
            "network_performance",
            "uninstall",
            "media",
            "profile",
            "something_new",
        ] {
            let e = one(json!({"event_type": other, "data": {"detail": 1}})).unwrap();
            assert_eq!(e.r#type(), EventType::Application);
            assert_eq!(e.name, other);
            assert_eq!(json_of(&e.properties), json!({"detail": 1}));
        }
    }

    #[test]
    fn custom_event_fields() {
        let e = one(json!({"event_type": "custom_event", "data": {
            "event_name": "Order Completed", "custom_event_type": "transaction",
            "custom_attributes": {"order_id": "o1", "revenue": 39.98},
            "source_message_id": "m-1", "timestamp_unixtime_ms": 1_700_000_000_123_i64,
            "session_id": 42, "location": {"latitude": 1.5}}}))
        .unwrap();
        assert_eq!(e.id, "app:m-1");
        assert_eq!(e.message_id, "m-1");
        assert_eq!(e.source_id, "app");
        assert_eq!(e.user_id, "u1");
        assert_eq!(e.partition_key, "u1");
        assert_eq!(e.partition, partition_for("u1", 16));
        assert_eq!(
            json_of(&e.properties),
            json!({"order_id": "o1", "revenue": 39.98, "custom_event_type": "transaction"})
        );
        let t = e.original_timestamp.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_000_000));
        assert_eq!(e.timestamp, e.original_timestamp);
        assert!(e.sent_at.is_none());
        assert_eq!(e.received_at, Some(to_proto(now())));
        let ctx = json_of(&e.context);
        assert_eq!(ctx["session"], json!({"id": 42}));
        assert_eq!(ctx["location"], json!({"latitude": 1.5}));
        assert!(!e.historical);
        // Without a timestamp: the received time.
        let e = one(json!({"event_type": "custom_event", "data": {"event_name": "E"}})).unwrap();
        assert!(e.original_timestamp.is_none());
        assert_eq!(e.timestamp, Some(to_proto(now())));
    }

    #[test]
    fn commerce_properties_and_names() {
        let e = one(json!({"event_type": "commerce_event", "data": {
            "currency_code": "EUR",
            "custom_attributes": {"channel": "web"},
            "product_action": {"action": "purchase", "transaction_id": "t1", "total_amount": 40.5,
                "tax_amount": 2, "products": [{"id": "sku-1", "price": 20.25, "quantity": 2}]}}}))
        .unwrap();
        assert_eq!(e.name, "purchase");
        let p = json_of(&e.properties);
        assert_eq!(p["channel"], "web");
        assert_eq!(p["currency_code"], "EUR");
        assert_eq!(p["transaction_id"], "t1");
        assert_eq!(p["total_amount"], 40.5);
        assert_eq!(p["tax_amount"], 2);
        assert_eq!(p["products"][0]["id"], "sku-1");
        assert_eq!(p["product_action"]["action"], "purchase");
        let names = [
            (json!({"promotion_action": {"action": "click"}}), "click"),
            (
                json!({"product_impressions": [{"product_impression_list": "x"}]}),
                "impression",
            ),
            (json!({"event_name": "Cart Viewed"}), "Cart Viewed"),
            (json!({}), "commerce_event"),
        ];
        for (data, name) in names {
            let e = one(json!({"event_type": "commerce_event", "data": data})).unwrap();
            assert_eq!(e.name, name);
        }
    }

    #[test]
    fn batch_level_identities_attributes_and_context() {
        let b = batch(json!({
            "user_identities": {"customer_id": "u9", "email": "ada@example.com", "other": "o-1",
                "facebook": null},
            "mpid": -8_123_456_789_i64,
            "device_info": {"ios_idfv": "idfv-1", "platform": "iOS"},
            "application_info": {"application_name": "Shop"},
            "user_attributes": {"plan": "pro", "old": 1},
            "deleted_user_attributes": ["old"],
            "ip": "203.0.113.1",
            "environment": "production",
            "context": {"data_plan": {"plan_id": "p"}},
            "source_request_id": "req-1"
        }));
        assert_eq!(b.user_id, "u9");
        assert_eq!(b.partition_key, "u9");
        let e = norm()
            .normalise_mparticle(&json!({"event_type": "session_start", "data": {}}), &b)
            .unwrap();
        assert_eq!(e.user_id, "u9");
        assert_eq!(e.identities["email"], "ada@example.com");
        assert_eq!(e.identities["other"], "o-1");
        assert_eq!(e.identities["mpid"], "-8123456789");
        assert_eq!(e.identities["ios_idfv"], "idfv-1");
        assert!(!e.identities.contains_key("facebook"));
        assert!(!e.identities.contains_key("customer_id"));
        assert_eq!(json_of(&e.traits), json!({"plan": "pro"}));
        assert_eq!(e.deleted_traits, ["old"]);
        assert_eq!(e.source_request_id, "req-1");
        let ctx = json_of(&e.context);
        assert_eq!(ctx["device"]["platform"], "iOS");
        assert_eq!(ctx["app"]["application_name"], "Shop");
        assert_eq!(ctx["traits"], json!({"plan": "pro"}));
        assert_eq!(ctx["ip"], "203.0.113.1");
        assert_eq!(ctx["mparticle"]["environment"], "production");
        assert_eq!(ctx["data_plan"]["plan_id"], "p");
    }

    #[test]
    fn partition_key_fallbacks() {
        let cases = [
            (
                json!({"user_identities": {"customerid": "u", "customer_id": "x", "email": "e"}}),
                "u",
            ),
            (
                json!({"user_identities": {"email": "e@x"}, "mpid": 7}),
                "mpid:7",
            ),
            (
                json!({"user_identities": {"email": "e@x", "other": "o"}}),
                "email:e@x",
            ),
            (
                json!({"user_identities": {"other_id_2": "b", "facebook": "a"}}),
                "facebook:a",
            ),
            (
                json!({"device_info": {"android_advertising_id": "aaid", "ios_idfv": "idfv"}}),
                "ios_idfv:idfv",
            ),
            (json!({"mp_deviceid": "dev-1"}), "mp_deviceid:dev-1"),
        ];
        for (b, key) in cases {
            assert_eq!(batch(b.clone()).partition_key, key, "{b}");
        }
        let err =
            parse_batch(json!({"events": []}).as_object().unwrap().clone(), None).unwrap_err();
        assert_eq!(err.kind(), "invalid_batch");
    }

    #[test]
    fn consent_state_maps_gdpr_and_ccpa() {
        let b = batch(
            json!({"user_identities": {"customerid": "u"}, "consent_state": {
            "gdpr": {"Marketing": {"consented": false, "timestamp_unixtime_ms": 1_700_000_000_000_i64},
                     "analytics": {"consented": true, "timestamp_unixtime_ms": 1_700_000_001_000_i64}},
            "ccpa": {"data_sale_opt_out": {"consented": true}}}}),
        );
        let e = norm()
            .normalise_mparticle(
                &json!({"event_type": "custom_event", "data": {"event_name": "E"}}),
                &b,
            )
            .unwrap();
        let c = e.consent.expect("consent");
        assert_eq!(c.purposes.len(), 3);
        assert!(!c.purposes["marketing"]);
        assert!(c.purposes["analytics"]);
        assert!(
            !c.purposes["data_sale"],
            "consented to the opt-out = opted out"
        );
        assert!(!c.opted_out);
        assert_eq!(c.updated_at.unwrap().seconds, 1_700_000_001);
        let b = batch(
            json!({"mpid": 1, "consent_state": {"ccpa": {"data_sale_opt_out": {"consented": false}}}}),
        );
        let e = norm()
            .normalise_mparticle(
                &json!({"event_type": "opt_out", "data": {"is_opted_out": true}}),
                &b,
            )
            .unwrap();
        let c = e.consent.unwrap();
        assert!(c.purposes["data_sale"]);
        assert!(c.opted_out);
        for bad in [
            json!({"gdpr": {"m": {"consented": "yes"}}}),
            json!({"gdpr": {"m": 1}}),
            json!({"gdpr": []}),
            json!({"ccpa": {"data_sale_opt_out": {}}}),
        ] {
            let err = parse_batch(
                json!({"mpid": 1, "consent_state": bad})
                    .as_object()
                    .unwrap()
                    .clone(),
                None,
            )
            .unwrap_err();
            assert_eq!(err.kind(), "invalid_batch", "{bad}");
        }
    }

    #[test]
    fn attribute_and_identity_changes() {
        let b = batch(json!({"user_identities": {"customerid": "u"},
            "user_attributes": {"plan": "free", "tier": 1}}));
        let e = norm()
            .normalise_mparticle(
                &json!({"event_type": "user_attribute_change", "data": {
                    "user_attribute_name": "plan", "new": "pro", "old": "free", "deleted": false}}),
                &b,
            )
            .unwrap();
        assert_eq!(json_of(&e.traits), json!({"plan": "pro", "tier": 1}));
        assert!(e.deleted_traits.is_empty());
        let e = norm()
            .normalise_mparticle(
                &json!({"event_type": "user_attribute_change", "data": {
                    "user_attribute_name": "tier", "deleted": true}}),
                &b,
            )
            .unwrap();
        assert_eq!(json_of(&e.traits), json!({"plan": "free"}));
        assert_eq!(e.deleted_traits, ["tier"]);
        let e = norm()
            .normalise_mparticle(
                &json!({"event_type": "user_identity_change", "data": {
                    "new": {"identity_type": "other_id_2", "identity": "x2"},
                    "old": {"identity_type": "other_id_2", "identity": "x1"}}}),
                &b,
            )
            .unwrap();
        assert_eq!(e.identities["other_id_2"], "x2");
        assert_eq!(json_of(&e.properties)["old"]["identity"], "x1");
    }

    #[test]
    fn validation_table() {
        let cases: Vec<(Value, &str)> = vec![
            (json!("x"), "not_an_object"),
            (json!({"data": {}}), "missing_field"),
            (json!({"event_type": "", "data": {}}), "missing_field"),
            (json!({"event_type": 3, "data": {}}), "invalid_field"),
            (
                json!({"event_type": "custom_event", "data": 3}),
                "invalid_field",
            ),
            (
                json!({"event_type": "custom_event", "data": {}}),
                "missing_field",
            ),
            (
                json!({"event_type": "custom_event", "data": {"event_name": 5}}),
                "invalid_field",
            ),
            (
                json!({"event_type": "custom_event", "data": {"event_name": "E", "custom_attributes": [1]}}),
                "invalid_field",
            ),
            (
                json!({"event_type": "custom_event", "data": {"event_name": "E", "timestamp_unixtime_ms": "soon"}}),
                "invalid_timestamp",
            ),
            (
                json!({"event_type": "custom_event", "data": {"event_name": "E", "timestamp_unixtime_ms": 1e300}}),
                "invalid_timestamp",
            ),
            (
                json!({"event_type": "custom_event", "data": {"event_name": "E", "source_message_id": "m".repeat(101)}}),
                "message_id_too_long",
            ),
            (
                json!({"event_type": "custom_event", "data": {"event_name": "E", "source_message_id": {}}}),
                "invalid_field",
            ),
            (
                json!({"event_type": "opt_out", "data": {}}),
                "missing_field",
            ),
            (
                json!({"event_type": "opt_out", "data": {"is_opted_out": "yes"}}),
                "invalid_field",
            ),
            (
                json!({"event_type": "user_attribute_change", "data": {}}),
                "missing_field",
            ),
            (
                json!({"event_type": "user_identity_change", "data": {"new": 1}}),
                "invalid_field",
            ),
            (
                json!({"event_type": "commerce_event", "data": {"product_action": 1}}),
                "invalid_field",
            ),
            (
                json!({"event_type": "screen_view", "data": {"screen_name": []}}),
                "invalid_field",
            ),
        ];
        for (item, reason) in cases {
            let got = one(item.clone()).err().map(|e| e.reason().label());
            assert_eq!(got, Some(reason), "{item}");
        }
        let small = Normaliser {
            max_event_bytes: 100,
            ..norm()
        };
        let err = small
            .normalise_mparticle(
                &json!({"event_type": "custom_event", "data": {"event_name": "E",
                    "custom_attributes": {"blob": "x".repeat(200)}}}),
                &user_batch(),
            )
            .unwrap_err();
        assert_eq!(err.reason().label(), "event_too_large");
    }

    #[test]
    fn envelope_errors() {
        for (body, kind) in [
            (&b"{"[..], "invalid_json"),
            (b"[]", "invalid_json"),
            (br#"{"mpid": 1, "events": {}}"#, "invalid_batch"),
            (br#"{"mpid": 1, "user_identities": []}"#, "invalid_batch"),
            (br#"{"user_identities": {"email": true}}"#, "invalid_batch"),
            (br#"{"mpid": true}"#, "invalid_batch"),
            (br#"{"mpid": 1, "source_request_id": 5}"#, "invalid_batch"),
            (
                br#"{"mpid": 1, "deleted_user_attributes": [1]}"#,
                "invalid_batch",
            ),
            (br#"{"mpid": 1, "device_info": "x"}"#, "invalid_batch"),
            (br#"{"mpid": 1, "ip": 5}"#, "invalid_batch"),
        ] {
            let err = parse_events(body).unwrap_err();
            assert_eq!(err.kind(), kind, "{}", String::from_utf8_lossy(body));
        }
        assert!(parse_events(br#"{"mpid": 1}"#).unwrap().events.is_empty());
        let long = format!(
            r#"{{"mpid": 1, "source_request_id": "{}"}}"#,
            "r".repeat(257)
        );
        assert_eq!(
            parse_events(long.as_bytes()).unwrap_err().kind(),
            "invalid_batch"
        );

        assert_eq!(parse_bulk(b"{}").unwrap_err().kind(), "invalid_json");
        assert_eq!(parse_bulk(b"[1]").unwrap_err().kind(), "invalid_batch");
        let hundred = format!("[{}]", vec![r#"{"mpid":1}"#; 100].join(","));
        assert_eq!(parse_bulk(hundred.as_bytes()).unwrap().len(), 100);
        let too_many = format!("[{}]", vec![r#"{"mpid":1}"#; 101].join(","));
        assert_eq!(
            parse_bulk(too_many.as_bytes()).unwrap_err().kind(),
            "too_many_batches"
        );
    }

    #[test]
    fn timestamps_outside_the_protobuf_range_are_invalid() {
        // 10000-01-01: chrono holds it, a protobuf timestamp cannot.
        let err = one(json!({"event_type": "custom_event",
            "data": {"event_name": "E", "timestamp_unixtime_ms": 253_402_300_800_000_i64}}))
        .unwrap_err();
        assert_eq!(err.reason().label(), "invalid_timestamp");
        let e = one(json!({"event_type": "custom_event",
            "data": {"event_name": "E", "timestamp_unixtime_ms": 253_402_300_799_999_i64}}))
        .expect("valid");
        assert_eq!(
            e.timestamp,
            Some(prost_types::Timestamp {
                seconds: 253_402_300_799,
                nanos: 999_000_000
            })
        );
    }

    #[test]
    fn historical_needs_old_timestamps() {
        let at = |ms: Value| {
            vec![batch(json!({"mpid": 1, "events": [
                {"event_type": "custom_event", "data": {"event_name": "E", "timestamp_unixtime_ms": ms}}
            ]}))]
        };
        let old = (now() - chrono::TimeDelta::hours(73)).timestamp_millis();
        let edge = (now() - HISTORICAL_MIN_AGE).timestamp_millis();
        let recent = (now() - chrono::TimeDelta::hours(71)).timestamp_millis();
        assert!(mark_historical(&mut at(json!(old)), now()).is_ok());
        assert!(mark_historical(&mut at(json!(edge)), now()).is_ok());
        for bad in [json!(recent), json!(null), json!("x")] {
            let err = mark_historical(&mut at(bad.clone()), now()).unwrap_err();
            assert_eq!(err.kind(), "not_historical", "{bad}");
        }
        let mut no_ts = vec![batch(
            json!({"mpid": 1, "events": [{"event_type": "custom_event", "data": {}}]}),
        )];
        assert_eq!(
            mark_historical(&mut no_ts, now()).unwrap_err().kind(),
            "not_historical"
        );
        let mut hist = at(json!(old));
        assert!(
            !norm()
                .normalise_mparticle(&hist[0].events[0], &hist[0])
                .unwrap()
                .historical
        );
        mark_historical(&mut hist, now()).unwrap();
        let e = norm()
            .normalise_mparticle(&hist[0].events[0], &hist[0])
            .unwrap();
        assert!(e.historical);
    }

    #[test]
    fn a_batch_of_attributes_alone_becomes_one_attribute_change() {
        let b = batch(json!({"user_identities": {"customerid": "u"},
            "user_attributes": {"plan": "pro"}, "deleted_user_attributes": ["old"]}));
        let e = norm()
            .normalise_attributes_only(&b)
            .expect("an event")
            .expect("valid");
        assert_eq!(e.r#type(), EventType::UserAttributeChange);
        assert_eq!(json_of(&e.traits), json!({"plan": "pro"}));
        assert_eq!(e.deleted_traits, ["old"]);
        assert_eq!(e.user_id, "u");
        let again = norm().normalise_attributes_only(&b).unwrap().unwrap();
        assert_eq!(again.id, e.id, "a retry derives the same id");
        let other = batch(json!({"user_identities": {"customerid": "u"},
            "user_attributes": {"plan": "free"}}));
        assert_ne!(
            norm()
                .normalise_attributes_only(&other)
                .unwrap()
                .unwrap()
                .id,
            e.id
        );
        assert!(norm().normalise_attributes_only(&user_batch()).is_none());
        let with_events = batch(json!({"user_identities": {"customerid": "u"},
            "user_attributes": {"plan": "pro"}, "events": [{"event_type": "session_start"}]}));
        assert!(norm().normalise_attributes_only(&with_events).is_none());
    }

    #[test]
    fn derived_ids_differ_by_user_and_are_stable() {
        let item = json!({"event_type": "custom_event", "data": {"event_name": "E",
            "timestamp_unixtime_ms": 1_700_000_000_000_i64}});
        let a1 = norm().normalise_mparticle(&item, &user_batch()).unwrap();
        let a2 = norm().normalise_mparticle(&item, &user_batch()).unwrap();
        let b = norm()
            .normalise_mparticle(
                &item,
                &batch(json!({"user_identities": {"customerid": "u2"}})),
            )
            .unwrap();
        assert_eq!(a1.message_id, a2.message_id);
        assert_eq!(a1.message_id.len(), 32);
        assert_ne!(a1.message_id, b.message_id);
        let numeric = one(
            json!({"event_type": "custom_event", "data": {"event_name": "E",
            "source_message_id": 17}}),
        )
        .unwrap();
        assert_eq!(numeric.id, "app:17");
    }
}
