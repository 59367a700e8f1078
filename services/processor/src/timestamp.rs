//! Conversions between protobuf timestamps and `chrono` times.

use chrono::{DateTime, Utc};
use herald_proto::v1::Event;
use prost_types::Timestamp;

/// A protobuf timestamp as a UTC time (`None` when out of range).
pub fn from_proto(ts: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32)
}

/// A UTC time as a protobuf timestamp.
pub fn to_proto(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// When an event happened: its skew-corrected timestamp, else when ingest received it, else now.
pub fn event_time(e: &Event) -> DateTime<Utc> {
    e.timestamp
        .as_ref()
        .and_then(from_proto)
        .or_else(|| e.received_at.as_ref().and_then(from_proto))
        .unwrap_or_else(Utc::now)
}
