//! Times of events: the one protobuf conversion ([`herald_proto::time`]) and the time an event
//! happened.

use chrono::{DateTime, Utc};
pub use herald_proto::time::{from_proto, to_proto};
use herald_proto::v1::Event;

/// When an event happened: its skew-corrected timestamp, else when ingest received it, else now.
/// A timestamp that is not a valid protobuf timestamp counts as absent.
pub fn event_time(e: &Event) -> DateTime<Utc> {
    e.timestamp
        .as_ref()
        .and_then(from_proto)
        .or_else(|| e.received_at.as_ref().and_then(from_proto))
        .unwrap_or_else(Utc::now)
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};
    use prost_types::Timestamp;

    use super::*;

    #[test]
    fn event_time_skips_invalid_timestamps() {
        let received = Timestamp {
            seconds: 1_714_564_800,
            nanos: 0,
        };
        let cases = [
            // A valid timestamp is the event's time.
            (
                Timestamp {
                    seconds: 1_714_564_700,
                    nanos: 999_999_999,
                },
                Utc.timestamp_opt(1_714_564_700, 999_999_999).unwrap(),
            ),
            // A leap second's nanos, negative nanos or a year past 9999: the receive time.
            (
                Timestamp {
                    seconds: 1_483_228_799,
                    nanos: 1_000_000_000,
                },
                Utc.timestamp_opt(1_714_564_800, 0).unwrap(),
            ),
            (
                Timestamp {
                    seconds: 1_714_564_700,
                    nanos: -1,
                },
                Utc.timestamp_opt(1_714_564_800, 0).unwrap(),
            ),
            (
                Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                },
                Utc.timestamp_opt(1_714_564_800, 0).unwrap(),
            ),
        ];
        for (timestamp, want) in cases {
            let e = Event {
                timestamp: Some(timestamp),
                received_at: Some(received),
                ..Default::default()
            };
            assert_eq!(event_time(&e), want, "{timestamp:?}");
        }
    }

    #[test]
    fn leap_seconds_are_clamped() {
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_000_000_000)
            .unwrap()
            .and_utc();
        assert_eq!(
            to_proto(leap),
            Timestamp {
                seconds: 1_483_228_799,
                nanos: 999_999_999
            }
        );
    }
}
