//! Fuzzes what a Segment request body goes through after it is read: decoding (the first byte
//! picks identity, gzip or deflate), the depth check, batch and single-event decoding (parsing and
//! normalisation of every item). Nothing may panic.

#![no_main]

mod common;

use chrono::{TimeZone, Utc};
use herald_ingest::{SegmentShape, decode};
use herald_proto::v1::EventType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = common::decoded_body(data, 512 * 1024) else {
        return;
    };
    let received_at = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
    let normaliser = common::normaliser(received_at);
    for shape in [
        SegmentShape::Batch,
        SegmentShape::Single(None),
        SegmentShape::Single(Some(EventType::Track)),
    ] {
        let _ = decode::segment(&normaliser, &bytes, shape);
    }
});
