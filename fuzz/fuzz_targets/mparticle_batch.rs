//! Fuzzes what an mParticle request body goes through after it is read: decoding (the first
//! byte picks identity, gzip or deflate), the depth check, `/v2/events` and `/v2/bulkevents`
//! parsing, the historical check, and normalisation of every event. Nothing may panic.

#![no_main]

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use herald_ingest::{Encoding, Normaliser, check_depth, decode, decode_body, parse_mparticle};
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
    let Ok(bytes) = decode_body(Bytes::copy_from_slice(rest), encoding, 256 * 1024) else {
        return;
    };
    if check_depth(&bytes, 64).is_err() {
        return;
    }
    let received_at = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
    let normaliser = Normaliser::with_default_limits("fuzz", received_at, 16);
    for (bulk, historical) in [(false, false), (true, false), (true, true)] {
        if let Ok(batches) = parse_mparticle(&bytes, bulk, historical, received_at) {
            let _ = decode::mparticle(&normaliser, &batches, None);
        }
    }
});
