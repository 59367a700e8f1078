//! The protobuf format: one `herald.v1.Event` per payload, as services publish it to NATS
//! intake. The decoder validates what a producer sets and fills in what ingest owns: the
//! source, the id, the receive time, the corrected timestamp when absent, and the partition.

use herald_common::partition::partition_for;
use herald_proto::time::{from_proto, to_proto};
use herald_proto::v1::{Event, EventType};
use prost::Message as _;

use crate::normalise::{
    Decoded, InvalidEvent, Normaliser, check_message_id, corrected_timestamp, event_id,
    partition_key,
};

/// The protobuf decoder: one event, or its rejection at index 0.
pub fn decode(n: &Normaliser<'_>, payload: &[u8]) -> Decoded {
    let mut decoded = Decoded::default();
    decoded.push(0, n.normalise_protobuf(payload));
    decoded
}

impl Normaliser<'_> {
    /// Validates a protobuf `herald.v1.Event` and fills in what ingest owns.
    pub fn normalise_protobuf(&self, payload: &[u8]) -> Result<Event, InvalidEvent> {
        let mut e =
            Event::decode(payload).map_err(|err| InvalidEvent::Undecodable(err.to_string()))?;
        let ty = EventType::try_from(e.r#type).unwrap_or(EventType::Unspecified);
        if matches!(
            ty,
            EventType::Unspecified | EventType::ConsentChanged | EventType::Erasure
        ) {
            return Err(InvalidEvent::TypeNotAccepted(ty.as_str_name()));
        }
        let Some(key) = partition_key(
            &e.user_id,
            &e.anonymous_id,
            e.identities.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ) else {
            return Err(InvalidEvent::MissingIdentity(
                "user_id, anonymous_id or an identity",
            ));
        };
        match ty {
            EventType::Track if e.name.is_empty() => {
                return Err(InvalidEvent::MissingEvent("name"));
            }
            EventType::Group if e.group_id.is_empty() => {
                return Err(InvalidEvent::MissingGroupId);
            }
            EventType::Alias if e.previous_id.is_empty() => {
                return Err(InvalidEvent::MissingPreviousId);
            }
            EventType::Alias if e.user_id.is_empty() => return Err(InvalidEvent::MissingUserId),
            _ => {}
        }
        // Every time must be a valid protobuf timestamp, as every format's are.
        for (field, t) in [
            ("original_timestamp", &e.original_timestamp),
            ("sent_at", &e.sent_at),
            ("timestamp", &e.timestamp),
        ] {
            if let Some(t) = t
                && from_proto(t).is_none()
            {
                return Err(InvalidEvent::InvalidTimestamp {
                    field,
                    value: format!("seconds {} nanos {}", t.seconds, t.nanos),
                });
            }
        }
        check_message_id(&e.message_id, "message_id", self.max_message_id_chars)?;
        if e.message_id.is_empty() {
            e.message_id = derive_protobuf_message_id(self.source_id, &e);
        }
        e.source_id = self.source_id.to_string();
        e.id = event_id(self.source_id, &e.message_id);
        e.received_at = Some(to_proto(self.received_at));
        if e.timestamp.is_none() {
            let t = corrected_timestamp(
                self.received_at,
                e.sent_at.as_ref().and_then(from_proto),
                e.original_timestamp.as_ref().and_then(from_proto),
            );
            e.timestamp = Some(to_proto(t));
        }
        e.partition = partition_for(&key, self.partitions);
        e.partition_key = key;
        self.check_size(e)
    }
}

/// A stable message id for a protobuf event sent without one: SHA-256 over the source and the
/// event's content (without the times a retry changes, with map entries sorted), as 32 hex
/// digits. A re-sent event derives the same id, so JetStream drops the duplicate.
fn derive_protobuf_message_id(source_id: &str, e: &Event) -> String {
    let mut copy = e.clone();
    copy.sent_at = None;
    copy.received_at = None;
    copy.id.clear();
    copy.source_id.clear();
    let mut identities: Vec<(String, String)> =
        std::mem::take(&mut copy.identities).into_iter().collect();
    identities.sort();
    let mut purposes: Vec<(String, bool)> = copy
        .consent
        .as_mut()
        .map(|c| std::mem::take(&mut c.purposes).into_iter().collect())
        .unwrap_or_default();
    purposes.sort();
    let mut buf = Vec::with_capacity(copy.encoded_len() + 64);
    buf.extend_from_slice(source_id.as_bytes());
    buf.push(0);
    copy.encode(&mut buf).expect("a Vec grows");
    for (k, v) in identities {
        buf.push(0);
        buf.extend_from_slice(k.as_bytes());
        buf.push(0);
        buf.extend_from_slice(v.as_bytes());
    }
    for (k, v) in purposes {
        buf.push(0);
        buf.extend_from_slice(k.as_bytes());
        buf.push(u8::from(v));
    }
    herald_common::auth::sha256_hex(&buf)[..32].to_string()
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use prost_types::Timestamp;

    use super::*;
    use crate::normalise::Reason;

    fn norm() -> Normaliser<'static> {
        let received_at = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 10).unwrap();
        Normaliser::with_default_limits("svc", received_at, 16)
    }

    fn track() -> Event {
        Event {
            r#type: EventType::Track as i32,
            name: "E".into(),
            ..Default::default()
        }
    }

    #[test]
    fn partition_keys_of_protobuf_events() {
        let mut e = track();
        e.identities.insert("phone".into(), "p".into());
        e.identities.insert("email".into(), "a@example.com".into());
        let key = |e: &Event| {
            norm()
                .normalise_protobuf(&e.encode_to_vec())
                .expect("valid")
                .partition_key
        };
        assert_eq!(key(&e), "email:a@example.com");
        e.identities.insert("mpid".into(), "42".into());
        assert_eq!(key(&e), "mpid:42");
        e.anonymous_id = "anon".into();
        assert_eq!(key(&e), "anon");
        e.user_id = "u".into();
        assert_eq!(key(&e), "u");
    }

    #[test]
    fn timestamps_must_be_valid_protobuf_timestamps() {
        let cases = [
            (
                Timestamp {
                    seconds: 1_714_564_800,
                    nanos: 999_999_999,
                },
                None,
            ),
            // A leap second's nanos, negative nanos, the year 10000.
            (
                Timestamp {
                    seconds: 1_483_228_799,
                    nanos: 1_000_000_000,
                },
                Some(Reason::InvalidTimestamp),
            ),
            (
                Timestamp {
                    seconds: 1_714_564_800,
                    nanos: -1,
                },
                Some(Reason::InvalidTimestamp),
            ),
            (
                Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                },
                Some(Reason::InvalidTimestamp),
            ),
        ];
        for (t, want) in cases {
            let mut e = track();
            e.user_id = "u".into();
            e.original_timestamp = Some(t);
            let got = norm().normalise_protobuf(&e.encode_to_vec());
            assert_eq!(got.err().map(|e| e.reason()), want, "{t:?}");
        }
    }

    #[test]
    fn derived_protobuf_ids_ignore_send_times_and_map_order() {
        let mut a = Event {
            r#type: EventType::Track as i32,
            name: "E".into(),
            user_id: "u".into(),
            ..Default::default()
        };
        for i in 0..8 {
            a.identities.insert(format!("t{i}"), format!("v{i}"));
        }
        let mut b = a.clone();
        b.sent_at = Some(Timestamp {
            seconds: 5,
            nanos: 0,
        });
        // Rebuilding the map can change its iteration order.
        let mut entries: Vec<_> = a.identities.clone().into_iter().collect();
        entries.reverse();
        b.identities = entries.into_iter().collect();
        let id = derive_protobuf_message_id("svc", &a);
        assert_eq!(id.len(), 32);
        assert_eq!(id, derive_protobuf_message_id("svc", &b));
        assert_ne!(id, derive_protobuf_message_id("other", &a));
        b.name = "F".into();
        assert_ne!(id, derive_protobuf_message_id("svc", &b));
    }
}
