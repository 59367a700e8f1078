//! Fuzzes what an mParticle request body goes through after it is read: decoding (the first
//! byte picks identity, gzip or deflate), the depth check, `/v2/events` and `/v2/bulkevents`
//! parsing, the historical check, and normalisation of every event. Nothing may panic.

#![no_main]

mod common;

use chrono::{TimeZone, Utc};
use herald_ingest::{decode, parse_mparticle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = common::decoded_body(data, 256 * 1024) else {
        return;
    };
    let received_at = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
    let normaliser = common::normaliser(received_at);
    for (bulk, historical) in [(false, false), (true, false), (true, true)] {
        if let Ok(batches) = parse_mparticle(&bytes, bulk, historical, received_at) {
            let _ = decode::mparticle(&normaliser, &batches, None);
        }
    }
});
