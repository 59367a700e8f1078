//! Fuzzes what an mParticle request body goes through after it is read: decoding (the first
//! byte picks identity, gzip or deflate), the depth check, `/v2/events` and `/v2/bulkevents`
//! parsing, the historical check, and normalisation of every event. Nothing may panic.

#![no_main]

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use herald_ingest::body::{self, Encoding};
use herald_ingest::mparticle::{Normaliser, check_historical, parse_bulk, parse_events};
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
    let Ok(bytes) = body::decode(Bytes::copy_from_slice(rest), encoding, 256 * 1024) else {
        return;
    };
    if body::check_depth(&bytes, 64).is_err() {
        return;
    }
    let received_at = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
    let mut batches = parse_bulk(&bytes).unwrap_or_default();
    if let Ok(one) = parse_events(&bytes) {
        batches.push(one);
    }
    let historical = check_historical(&batches, received_at).is_ok();
    let normaliser = Normaliser {
        source_id: "fuzz",
        received_at,
        partitions: 16,
        max_event_bytes: 32 * 1024,
        max_message_id_chars: 100,
        historical,
    };
    for batch in &batches {
        for item in &batch.events {
            let _ = normaliser.normalise(item, batch);
        }
    }
});
