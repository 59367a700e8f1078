//! Reading request bodies safely: a size cap on the bytes received, `Content-Encoding: gzip` and
//! `deflate` decoded through a bounded reader (a gzip bomb fails at the cap without allocating
//! past it), and a JSON nesting-depth check that runs before any parser sees the body.

use std::io::Read;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

use crate::error::ApiError;

/// How a request body is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Sent as is.
    Identity,
    /// `Content-Encoding: gzip` (or `x-gzip`); several gzip members are read one after another.
    Gzip,
    /// `Content-Encoding: deflate`: zlib-wrapped as HTTP specifies, or raw deflate as some
    /// clients send it (told apart by the zlib header).
    Deflate,
}

impl Encoding {
    /// The encoding named by the request's `Content-Encoding` header. Absent, empty and
    /// `identity` mean [`Encoding::Identity`]; an encoding Herald does not decode, or more than
    /// one stacked, is `415 unsupported_encoding`.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut found = Self::Identity;
        for value in headers.get_all(header::CONTENT_ENCODING) {
            let text = value
                .to_str()
                .map_err(|_| ApiError::UnsupportedEncoding("(not text)".into()))?;
            for token in text.split(',').map(str::trim) {
                let this = Self::parse(token)?;
                if this == Self::Identity {
                    continue;
                }
                if found != Self::Identity {
                    return Err(ApiError::UnsupportedEncoding(shorten(text)));
                }
                found = this;
            }
        }
        Ok(found)
    }

    /// One `Content-Encoding` token.
    pub fn parse(token: &str) -> Result<Self, ApiError> {
        let t = token.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("identity") {
            Ok(Self::Identity)
        } else if t.eq_ignore_ascii_case("gzip") || t.eq_ignore_ascii_case("x-gzip") {
            Ok(Self::Gzip)
        } else if t.eq_ignore_ascii_case("deflate") {
            Ok(Self::Deflate)
        } else {
            Err(ApiError::UnsupportedEncoding(shorten(t)))
        }
    }

    /// A bounded label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
        }
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(32).collect()
}

/// A body as received and decoded.
#[derive(Debug, Clone)]
pub struct Received {
    /// The decoded bytes.
    pub bytes: Bytes,
    /// How many bytes came over the wire (before decoding).
    pub wire_bytes: usize,
}

/// Reads the whole body, refusing more than `limit` bytes on the wire (a declared
/// `Content-Length` above it is refused before reading), then decodes it, refusing a decoded
/// size above `limit` as well: `413 request_too_large` either way. Corrupt compressed data is
/// `400 invalid_body`.
pub async fn read(
    body: Body,
    headers: &HeaderMap,
    encoding: Encoding,
    limit: usize,
) -> Result<Received, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::RequestTooLarge { limit });
    }
    let raw = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::RequestTooLarge { limit });
        }
        Err(e) => return Err(ApiError::Body(e.to_string())),
    };
    let wire_bytes = raw.len();
    let bytes = decode(raw, encoding, limit)?;
    Ok(Received { bytes, wire_bytes })
}

/// Decodes `raw` per `encoding`, producing at most `limit` bytes: past that it stops reading
/// and fails with `413 request_too_large`, having allocated no more than `limit` bytes.
pub fn decode(raw: Bytes, encoding: Encoding, limit: usize) -> Result<Bytes, ApiError> {
    let result = match encoding {
        Encoding::Identity => {
            return if raw.len() > limit {
                Err(ApiError::RequestTooLarge { limit })
            } else {
                Ok(raw)
            };
        }
        Encoding::Gzip => read_capped(MultiGzDecoder::new(&raw[..]), limit, raw.len()),
        Encoding::Deflate if is_zlib(&raw) => {
            read_capped(ZlibDecoder::new(&raw[..]), limit, raw.len())
        }
        Encoding::Deflate => read_capped(DeflateDecoder::new(&raw[..]), limit, raw.len()),
    };
    match result {
        Ok(v) => Ok(Bytes::from(v)),
        Err(CapError::TooLarge) => Err(ApiError::RequestTooLarge { limit }),
        Err(CapError::Corrupt(e)) => Err(ApiError::Body(format!(
            "the {} body cannot be decoded: {e}",
            encoding.label()
        ))),
    }
}

/// Whether `raw` starts with a zlib header (RFC 1950: deflate method, header checksum).
fn is_zlib(raw: &[u8]) -> bool {
    raw.len() >= 2 && raw[0] & 0x0f == 8 && (u16::from(raw[0]) << 8 | u16::from(raw[1])) % 31 == 0
}

/// Why [`read_capped`] stopped.
#[derive(Debug)]
pub enum CapError {
    /// The reader produced more than the cap.
    TooLarge,
    /// The reader failed (corrupt data).
    Corrupt(std::io::Error),
}

/// Reads everything `reader` produces into a vector whose capacity never exceeds `limit`; fails
/// with [`CapError::TooLarge`] as soon as the output would pass `limit`. `hint` (the compressed
/// size) sizes the first allocation.
pub fn read_capped<R: Read>(mut reader: R, limit: usize, hint: usize) -> Result<Vec<u8>, CapError> {
    let mut out: Vec<u8> =
        Vec::with_capacity(hint.saturating_mul(4).clamp(1024, 64 * 1024).min(limit));
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CapError::Corrupt(e)),
        };
        let needed = out.len() + n;
        if needed > limit {
            return Err(CapError::TooLarge);
        }
        if needed > out.capacity() {
            // Grow geometrically, but never past the cap.
            let target = out.capacity().saturating_mul(2).max(needed).min(limit);
            out.reserve_exact(target - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Fails with `400 too_deep` when objects and arrays nest deeper than `max_depth` anywhere in
/// `body` (the outermost value is depth 1). A linear scan that allocates nothing; strings
/// (with escapes) are skipped, so brackets inside them do not count. Runs before parsing, so
/// the parsers never recurse deeper than this.
pub fn check_depth(body: &[u8], max_depth: usize) -> Result<(), ApiError> {
    scan(body, max_depth).map(|_| ())
}

/// What [`scan`] noticed in a body, besides its depth: what tells the Segment fast path
/// (`crate::segment::parse_batch_raw`) whether keeping JSON verbatim gives exactly what
/// parsing it into `serde_json::Value` and writing it back would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JsonScan {
    /// The deepest nesting seen (the outermost value is depth 1).
    pub max_depth: usize,
    /// A number `Value` may refuse (out of range) or write back longer than it came: one with
    /// an exponent, one of 16 or more characters, or `-0`.
    pub unusual_numbers: bool,
    /// A `\uD800`-`\uDFFF` escape in a string: a surrogate, which `Value` refuses when lone.
    pub surrogate_escapes: bool,
}

impl JsonScan {
    /// Whether the body holds no unusual number and no surrogate escape.
    pub fn plain(&self) -> bool {
        !self.unusual_numbers && !self.surrogate_escapes
    }
}

/// [`check_depth`], also reporting what [`JsonScan`] describes. One pass that allocates
/// nothing; strings are skipped eight bytes at a time.
pub fn scan(body: &[u8], max_depth: usize) -> Result<JsonScan, ApiError> {
    let mut out = JsonScan::default();
    let mut depth = 0usize;
    let n = body.len();
    let mut i = 0;
    while i < n {
        match body[i] {
            b'"' => {
                i += 1;
                loop {
                    i = skip_plain(body, i);
                    if i >= n {
                        // Unterminated: the parser reports it.
                        return Ok(out);
                    }
                    if body[i] == b'"' {
                        i += 1;
                        break;
                    }
                    // A backslash and the byte it escapes.
                    if body.get(i + 1) == Some(&b'u') && is_surrogate(&body[(i + 2).min(n)..]) {
                        out.surrogate_escapes = true;
                    }
                    i += 2;
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ApiError::TooDeep { limit: max_depth });
                }
                out.max_depth = out.max_depth.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < n && matches!(body[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    i += 1;
                }
                let token = &body[start..i];
                if token.len() >= 16
                    || token == b"-0"
                    || token.iter().any(|c| matches!(c, b'e' | b'E'))
                {
                    out.unusual_numbers = true;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(out)
}

/// The position of the first `"` or backslash at or after `i` (or `body.len()`).
fn skip_plain(body: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = ONES * b'"' as u64;
    const BACKSLASHES: u64 = ONES * b'\\' as u64;
    while let Some(chunk) = body.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let (q, s) = (w ^ QUOTES, w ^ BACKSLASHES);
        // The lowest set bit marks the first zero byte of q or s exactly.
        let hits = ((q.wrapping_sub(ONES) & !q) | (s.wrapping_sub(ONES) & !s)) & HIGH;
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < body.len() && body[i] != b'"' && body[i] != b'\\' {
        i += 1;
    }
    i
}

/// Whether the four hex digits at the start of `hex` name a UTF-16 surrogate (D800-DFFF).
fn is_surrogate(hex: &[u8]) -> bool {
    matches!(
        hex,
        [b'd' | b'D', b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F', ..]
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use axum::http::HeaderValue;
    use flate2::Compression;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn encodings_table() {
        let cases: [(&[&str], Result<Encoding, ()>); 12] = [
            (&[], Ok(Encoding::Identity)),
            (&["identity"], Ok(Encoding::Identity)),
            (&[""], Ok(Encoding::Identity)),
            (&["gzip"], Ok(Encoding::Gzip)),
            (&["GZIP"], Ok(Encoding::Gzip)),
            (&["x-gzip"], Ok(Encoding::Gzip)),
            (&["deflate"], Ok(Encoding::Deflate)),
            (&["gzip, identity"], Ok(Encoding::Gzip)),
            (&["br"], Err(())),
            (&["zstd"], Err(())),
            (&["gzip, deflate"], Err(())),
            (&["gzip", "gzip"], Err(())),
        ];
        for (values, want) in cases {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            let got = Encoding::from_headers(&h);
            match want {
                Ok(e) => assert_eq!(got.unwrap(), e, "{values:?}"),
                Err(()) => assert_eq!(
                    got.unwrap_err().kind(),
                    "unsupported_encoding",
                    "{values:?}"
                ),
            }
        }
    }

    #[test]
    fn decodes_gzip_zlib_and_raw_deflate() {
        let data = br#"{"batch":[]}"#.repeat(50);
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(&data).unwrap();
        let mut d = DeflateEncoder::new(Vec::new(), Compression::default());
        d.write_all(&data).unwrap();
        for (raw, enc) in [
            (gzip(&data), Encoding::Gzip),
            (z.finish().unwrap(), Encoding::Deflate),
            (d.finish().unwrap(), Encoding::Deflate),
            (data.clone(), Encoding::Identity),
        ] {
            let out = decode(Bytes::from(raw), enc, 10_000).expect("decodes");
            assert_eq!(&out[..], &data[..], "{enc:?}");
        }
        // Two gzip members, as some clients concatenate.
        let mut two = gzip(b"ab");
        two.extend(gzip(b"cd"));
        assert_eq!(
            &decode(Bytes::from(two), Encoding::Gzip, 10).unwrap()[..],
            b"abcd"
        );
    }

    #[test]
    fn corrupt_and_oversized_bodies() {
        let err = decode(Bytes::from_static(&[0x1f, 0x8b, 0x08]), Encoding::Gzip, 100).unwrap_err();
        assert_eq!(err.kind(), "invalid_body");
        let err = decode(
            Bytes::from_static(b"not deflate at all"),
            Encoding::Deflate,
            100,
        )
        .unwrap_err();
        assert_eq!(err.kind(), "invalid_body");
        let err = decode(Bytes::from(vec![b'x'; 101]), Encoding::Identity, 100).unwrap_err();
        assert_eq!(err.kind(), "request_too_large");
        let err = decode(Bytes::from(gzip(&[b'x'; 101])), Encoding::Gzip, 100).unwrap_err();
        assert_eq!(err.kind(), "request_too_large");
        assert_eq!(
            decode(Bytes::from(gzip(&[b'x'; 100])), Encoding::Gzip, 100)
                .unwrap()
                .len(),
            100
        );
    }

    #[test]
    fn a_gzip_bomb_never_allocates_past_the_cap() {
        let bomb = gzip(&vec![0u8; 10 * 1024 * 1024]);
        assert!(bomb.len() < 64 * 1024, "{} bytes compressed", bomb.len());
        let limit = 500 * 1024;
        match read_capped(MultiGzDecoder::new(&bomb[..]), limit, bomb.len()) {
            Err(CapError::TooLarge) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // Exactly at the cap: read fully, capacity within the cap.
        let exact = gzip(&vec![7u8; limit]);
        let out = read_capped(MultiGzDecoder::new(&exact[..]), limit, exact.len()).unwrap();
        assert_eq!(out.len(), limit);
        assert!(out.capacity() <= limit, "capacity {}", out.capacity());
    }

    #[test]
    fn depth_table() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let cases: Vec<(String, usize, bool)> = vec![
            (r#"{"a":1}"#.into(), 1, true),
            (r#"{"a":{"b":1}}"#.into(), 1, false),
            (r#"{"a":{"b":1}}"#.into(), 2, true),
            (nested(64), 64, true),
            (nested(65), 64, false),
            // Brackets inside strings, with escaped quotes, do not count.
            (r#"{"a":"[[[[\"{{{{"}"#.into(), 1, true),
            (r#"{"a":"\\"}"#.into(), 1, true),
            (r#"[1,[2],[3],[4]]"#.into(), 2, true),
            // Unbalanced input is the parser's business, not the depth check's.
            ("]]]]{".into(), 1, true),
            (String::new(), 1, true),
        ];
        for (body, max, ok) in cases {
            let got = check_depth(body.as_bytes(), max);
            assert_eq!(got.is_ok(), ok, "{body} at {max}");
            if let Err(e) = got {
                assert_eq!(e.kind(), "too_deep");
            }
        }
    }

    #[test]
    fn scan_table() {
        // (body, max depth seen, unusual numbers, surrogate escapes)
        let cases = [
            (
                r#"{"a": [1, 2.5, -3, 0, true, false, null]}"#,
                2,
                false,
                false,
            ),
            (r#"{"a": 1e3}"#, 1, true, false),
            (r#"{"a": 1.5E-3}"#, 1, true, false),
            (r#"{"a": -0}"#, 1, true, false),
            (r#"{"a": -0.5}"#, 1, false, false),
            (r#"{"a": 123456789012345}"#, 1, false, false),
            (r#"{"a": 1234567890123456}"#, 1, true, false),
            (r#"{"a": "1e3 -0 12345678901234567890"}"#, 1, false, false),
            (r#"{"a": "\ud83d\ude00"}"#, 1, false, true),
            (r#"{"a": "\uDFFF"}"#, 1, false, true),
            (r#"{"a": "\u00e9 \ue000 \\ud800"}"#, 1, false, false),
            (r#"{"a\"[{": "x\\", "b": [[{}]]}"#, 4, false, false),
            (r#"{"a": "unterminated [[["#, 1, false, false),
            (
                r#"{"s": "a long string without any escape, longer than eight"}"#,
                1,
                false,
                false,
            ),
        ];
        for (body, depth, numbers, surrogates) in cases {
            let got = scan(body.as_bytes(), 64).expect("not too deep");
            let want = JsonScan {
                max_depth: depth,
                unusual_numbers: numbers,
                surrogate_escapes: surrogates,
            };
            assert_eq!(got, want, "{body}");
        }
    }

    #[test]
    fn skip_plain_finds_the_first_quote_or_backslash() {
        for len in 0..40 {
            for at in 0..=len {
                for stop in [b'"', b'\\'] {
                    let mut body = vec![b'x'; len];
                    if at < len {
                        body[at] = stop;
                    }
                    assert_eq!(skip_plain(&body, 0), at, "{len} {at}");
                    // High bytes (UTF-8) are plain.
                    body.iter_mut()
                        .filter(|b| **b == b'x')
                        .for_each(|b| *b = 0xe9);
                    assert_eq!(skip_plain(&body, 0), at, "{len} {at} high");
                }
            }
        }
    }
}
