//! What every fuzz target does first with its input: the first byte picks the body's encoding
//! (identity, gzip or deflate), the rest is the body as read, decoded and depth-checked as ingest
//! does before parsing; and the normaliser the decoders run with.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use herald_ingest::{Encoding, Normaliser, check_depth, decode_body};

/// The decoded body of `data` (at most `max_bytes` once decoded), or `None` where ingest would
/// refuse it before parsing (no selector byte, a bad encoding, too large, too deep).
pub fn decoded_body(data: &[u8], max_bytes: usize) -> Option<Bytes> {
    let (&selector, rest) = data.split_first()?;
    let encoding = match selector % 3 {
        0 => Encoding::Identity,
        1 => Encoding::Gzip,
        _ => Encoding::Deflate,
    };
    let bytes = decode_body(Bytes::copy_from_slice(rest), encoding, max_bytes).ok()?;
    check_depth(&bytes, 64).ok()?;
    Some(bytes)
}

/// The normaliser of source `fuzz` (16 partitions, default limits) for a request received at
/// `received_at`.
pub fn normaliser(received_at: DateTime<Utc>) -> Normaliser<'static> {
    Normaliser::with_default_limits("fuzz", received_at, 16)
}
