//! The one conversion between `chrono` times and protobuf `Timestamp`s, used by every service,
//! and the one fast writer and reader of RFC 3339 text ([`rfc3339`], [`parse_rfc3339`]) for
//! times written and read on every event.
//!
//! A protobuf timestamp covers 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z with
//! `nanos` in `0..=999_999_999`. Both directions keep to that:
//! - [`to_proto`] clamps a leap second (chrono shows it as nanos of 1e9 and above) to
//!   `999_999_999` nanos of the same second, and clamps a time outside the range to its nearest
//!   end;
//! - [`from_proto`] gives `None` for a timestamp outside the range or with nanos outside
//!   `0..=999_999_999`: the caller decides what that means (ingest rejects the event with
//!   `invalid_timestamp`; the processor falls back to the receive time).

use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, Timelike, Utc};
use prost_types::Timestamp;

/// Seconds of 0001-01-01T00:00:00Z, the earliest protobuf timestamp.
pub const MIN_SECONDS: i64 = -62_135_596_800;
/// Seconds of 9999-12-31T23:59:59Z, the latest protobuf timestamp's second.
pub const MAX_SECONDS: i64 = 253_402_300_799;
/// The largest `nanos` of a protobuf timestamp.
pub const MAX_NANOS: i32 = 999_999_999;

/// A UTC time as a protobuf timestamp: a leap second's nanos clamped to `999_999_999`, a time
/// outside the protobuf range clamped to its nearest end.
pub fn to_proto(t: DateTime<Utc>) -> Timestamp {
    let seconds = t.timestamp();
    if seconds < MIN_SECONDS {
        return Timestamp {
            seconds: MIN_SECONDS,
            nanos: 0,
        };
    }
    if seconds > MAX_SECONDS {
        return Timestamp {
            seconds: MAX_SECONDS,
            nanos: MAX_NANOS,
        };
    }
    Timestamp {
        seconds,
        // A leap second shows as nanos of 1e9 and above, which protobuf does not allow.
        nanos: t.timestamp_subsec_nanos().min(MAX_NANOS as u32) as i32,
    }
}

/// A protobuf timestamp as a UTC time; `None` when it is not a valid protobuf timestamp
/// (seconds outside 0001-01-01..=9999-12-31, nanos outside `0..=999_999_999`).
pub fn from_proto(ts: &Timestamp) -> Option<DateTime<Utc>> {
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&ts.seconds) || !(0..=MAX_NANOS).contains(&ts.nanos) {
        return None;
    }
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32)
}

/// Whether `t` is inside the protobuf range, so [`to_proto`] keeps it exactly (but for a
/// leap second's nanos).
pub fn in_range(t: DateTime<Utc>) -> bool {
    (MIN_SECONDS..=MAX_SECONDS).contains(&t.timestamp())
}

/// A time as RFC 3339 text, held inline (no allocation): what [`rfc3339`] gives.
#[derive(Clone, Copy)]
pub struct Rfc3339 {
    buf: [u8; 40],
    len: usize,
}

impl Rfc3339 {
    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("RFC 3339 text is ASCII")
    }

    fn byte(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// `value`'s last `n` decimal digits, zero-padded.
    fn digits(&mut self, value: u32, n: u32) {
        for i in (0..n).rev() {
            self.byte(b'0' + (value / 10u32.pow(i) % 10) as u8);
        }
    }
}

/// Serialises as the text (a JSON string).
impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `t` as RFC 3339 text exactly as chrono's serde and `to_rfc3339_opts(SecondsFormat::AutoSi,
/// true)` write it (`2026-11-20T10:00:01.250Z`: the fraction in 0, 3, 6 or 9 digits, then
/// `Z`), without going through `fmt` and an allocation: profiles and payloads carry several
/// times each, written on every event. Years outside 0..=9999 and leap seconds are left to
/// chrono.
pub fn rfc3339(t: &DateTime<Utc>) -> Rfc3339 {
    let mut out = Rfc3339 {
        buf: [0; 40],
        len: 0,
    };
    let year = t.year();
    let nanos = t.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        // At most 33 bytes (`+262143-12-31T23:59:59.999999999Z`).
        let text = t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        out.buf[..text.len()].copy_from_slice(text.as_bytes());
        out.len = text.len();
        return out;
    }
    out.digits(year as u32, 4);
    out.byte(b'-');
    out.digits(t.month(), 2);
    out.byte(b'-');
    out.digits(t.day(), 2);
    out.byte(b'T');
    out.digits(t.hour(), 2);
    out.byte(b':');
    out.digits(t.minute(), 2);
    out.byte(b':');
    out.digits(t.second(), 2);
    if nanos != 0 {
        out.byte(b'.');
        if nanos.is_multiple_of(1_000_000) {
            out.digits(nanos / 1_000_000, 3);
        } else if nanos.is_multiple_of(1_000) {
            out.digits(nanos / 1_000, 6);
        } else {
            out.digits(nanos, 9);
        }
    }
    out.byte(b'Z');
    out
}

/// RFC 3339 text as a UTC time, as chrono's `DateTime<Utc>` parses it (and its serde reads it),
/// `None` where chrono refuses it. The text [`rfc3339`] writes (`2026-11-20T10:00:01.250Z`: the
/// fraction in 0 to 9 digits, then `Z`) is read directly, without chrono's general parser:
/// profiles hold several times each and are read on every event. Any other form (an offset,
/// a space for the `T`, a leap second) goes to chrono.
pub fn parse_rfc3339(text: &str) -> Option<DateTime<Utc>> {
    canonical(text.as_bytes()).or_else(|| text.parse().ok())
}

/// [`parse_rfc3339`]'s direct path: `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z` with a valid date and time
/// (second 59 at most), else `None`.
fn canonical(b: &[u8]) -> Option<DateTime<Utc>> {
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        b.get(range)?.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() < 20 || b.last() != Some(&b'Z') {
        return None;
    }
    let fixed = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if fixed.iter().any(|&(i, c)| b[i] != c) {
        return None;
    }
    let nanos = match b.len() {
        20 => 0,
        // A dot and 1 to 9 digits before the `Z`.
        22..=30 if b[19] == b'.' => {
            let digits = b.len() - 21;
            num(20..20 + digits)? * 10u32.pow(9 - digits as u32)
        }
        _ => return None,
    };
    let (second, minute, hour) = (num(17..19)?, num(14..16)?, num(11..13)?);
    if second > 59 {
        return None;
    }
    NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?
        .and_hms_nano_opt(hour, minute, second, nanos)
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};

    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp { seconds, nanos }
    }

    #[test]
    fn to_proto_table() {
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        let cases = [
            (Utc.timestamp_opt(0, 0).unwrap(), ts(0, 0)),
            (
                Utc.timestamp_opt(1_714_564_800, 123_456_789).unwrap(),
                ts(1_714_564_800, 123_456_789),
            ),
            // A leap second: the last nanosecond of its second.
            (leap, ts(1_483_228_799, MAX_NANOS)),
            (Utc.timestamp_opt(-1, 5).unwrap(), ts(-1, 5)),
            (
                Utc.timestamp_opt(MIN_SECONDS, 0).unwrap(),
                ts(MIN_SECONDS, 0),
            ),
            (
                Utc.timestamp_opt(MAX_SECONDS, 999_999_999).unwrap(),
                ts(MAX_SECONDS, MAX_NANOS),
            ),
            // Outside the protobuf range: its nearest end.
            (DateTime::<Utc>::MIN_UTC, ts(MIN_SECONDS, 0)),
            (DateTime::<Utc>::MAX_UTC, ts(MAX_SECONDS, MAX_NANOS)),
        ];
        for (t, want) in cases {
            let got = to_proto(t);
            assert_eq!(got, want, "{t:?}");
            assert!(from_proto(&got).is_some(), "{t:?} round-trips");
        }
    }

    #[test]
    fn from_proto_table() {
        let cases = [
            (ts(0, 0), Some(Utc.timestamp_opt(0, 0).unwrap())),
            (
                ts(1_714_564_800, MAX_NANOS),
                Some(Utc.timestamp_opt(1_714_564_800, 999_999_999).unwrap()),
            ),
            (
                ts(MIN_SECONDS, 0),
                Some(Utc.timestamp_opt(MIN_SECONDS, 0).unwrap()),
            ),
            (
                ts(MAX_SECONDS, MAX_NANOS),
                Some(Utc.timestamp_opt(MAX_SECONDS, 999_999_999).unwrap()),
            ),
            // Nanos of a leap second, or negative: not a protobuf timestamp.
            (ts(1_483_228_799, 1_000_000_000), None),
            (ts(1_483_228_799, 1_500_000_000), None),
            (ts(0, -1), None),
            // Seconds outside 0001..=9999.
            (ts(MIN_SECONDS - 1, 0), None),
            (ts(MAX_SECONDS + 1, 0), None),
            (ts(i64::MAX, 0), None),
            (ts(i64::MIN, 0), None),
        ];
        for (t, want) in cases {
            assert_eq!(from_proto(&t), want, "{t:?}");
        }
    }

    #[test]
    fn range() {
        assert!(in_range(Utc.timestamp_opt(0, 0).unwrap()));
        assert!(!in_range(DateTime::<Utc>::MIN_UTC));
        assert!(!in_range(DateTime::<Utc>::MAX_UTC));
    }

    /// `n` times all over the protobuf range from `seed` (xorshift), a quarter each with no
    /// fraction and with a fraction of 3, 6 and 9 digits.
    fn random_times(seed: u64, n: usize) -> impl Iterator<Item = DateTime<Utc>> {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let span = (MAX_SECONDS - MIN_SECONDS) as u64;
        (0..n).map(move |i| {
            let secs = MIN_SECONDS + (next() % span) as i64;
            let nanos = match i % 4 {
                0 => 0,
                1 => (next() % 1_000) as u32 * 1_000_000,
                2 => (next() % 1_000_000) as u32 * 1_000,
                _ => (next() % 1_000_000_000) as u32,
            };
            DateTime::from_timestamp(secs, nanos).expect("in range")
        })
    }

    /// The same text as chrono's, for times all over the range and every fraction length.
    #[test]
    fn rfc3339_writes_what_chrono_writes() {
        for t in random_times(0x2545_f491_4f6c_dd1d, 20_000) {
            assert_eq!(
                rfc3339(&t).as_str(),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
        }
        for t in [
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
            DateTime::from_timestamp(0, 0).expect("epoch"),
            DateTime::from_timestamp(59, 1_500_000_000).expect("leap second"),
        ] {
            assert_eq!(
                rfc3339(&t).as_str(),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
        }
    }

    /// What [`rfc3339`] wrote reads back as the same time, and every text reads as chrono
    /// reads it, on the direct path or off it.
    #[test]
    fn parse_rfc3339_reads_what_chrono_reads() {
        for t in random_times(0x9e37_79b9_7f4a_7c15, 20_000) {
            let text = rfc3339(&t);
            assert_eq!(
                canonical(text.as_str().as_bytes()),
                Some(t),
                "{}",
                text.as_str()
            );
            assert_eq!(parse_rfc3339(text.as_str()), Some(t));
        }
        let chrono = |s: &str| s.parse::<DateTime<Utc>>().ok();
        for text in [
            "2026-11-20T10:00:01Z",
            "2026-11-20T10:00:01.2Z",
            "2026-11-20T10:00:01.25Z",
            "2026-11-20T10:00:01.123456789Z",
            "2026-11-20T10:00:01.1234567891Z",
            "2026-11-20T10:00:01.Z",
            "2026-11-20t10:00:01z",
            "2026-11-20 10:00:01Z",
            "2026-11-20T10:00:01+02:00",
            "2026-11-20T10:00:01.5-05:30",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5Z",
            "2026-02-30T10:00:01Z",
            "2026-13-01T10:00:01Z",
            "2026-11-20T24:00:00Z",
            "2026-11-20T10:60:01Z",
            "2026-11-2OT10:00:01Z",
            "+2026-11-20T10:00:01Z",
            "2026-11-20T10:00:01",
            "",
            "Z",
        ] {
            assert_eq!(parse_rfc3339(text), chrono(text), "{text:?}");
        }
    }
}
