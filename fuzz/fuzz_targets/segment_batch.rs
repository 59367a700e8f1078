//! Fuzzes what a Segment request body goes through after it is read: decoding (the first byte
//! picks identity, gzip or deflate), the depth check, batch and single-event decoding (parsing and
//! normalisation of every item). Nothing may panic.

#![no_main]

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use herald_ingest::{Encoding, Normaliser, SegmentShape, check_depth, decode, decode_body};
use herald_proto::v1::EventType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let encoding = match selector % 3 {
        0 => Encoding::Identity,
        1 => Encoding::Gzip,
        _ => Encoding::Deflate,
    };
    let Ok(bytes) = decode_body(Bytes::copy_from_slice(rest), encoding, 512 * 1024) else {
        return;
    };
    if check_depth(&bytes, 64).is_err() {
        return;
    }
    let received_at = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
    let normaliser = Normaliser::with_default_limits("fuzz", received_at, 16);
    for shape in [
        SegmentShape::Batch,
        SegmentShape::Single(None),
        SegmentShape::Single(Some(EventType::Track)),
    ] {
        let _ = decode::segment(&normaliser, &bytes, shape);
    }
});
