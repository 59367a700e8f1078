//! Bearer-token authentication of the control APIs, and the hashing and constant-time
//! comparison Herald uses for every secret it checks (control tokens, write keys).
//!
//! Servers wrap their control services with [`ControlAuth`] (done once in
//! [`crate::server::serve_grpc`], so health and reflection stay open); clients add the token to
//! every call with [`BearerToken`].

use std::fmt;

use sha2::{Digest, Sha256};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::{ConfigError, ControlConfig};

/// The metadata key carrying the token: `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// How a caller passes the token; part of every `unauthenticated` answer.
const HOW_TO_PASS: &str = "send the metadata `authorization: Bearer <token>` (herald CLI: --token, \
     HERALD_TOKEN or ./.herald/token) with the token the server reads from control.token or \
     control.token_file";

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// SHA-256 of `bytes` as 64 lower-case hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&sha256(bytes))
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0x0f) as usize] as char);
    }
    s
}

/// Parses 64 hex digits (either case) into a SHA-256 digest.
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Compares two byte strings in time that depends only on their lengths (compare digests, whose
/// length is fixed, to reveal nothing at all).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The server side: a tonic interceptor that lets a call through only with the configured
/// bearer token. Only the token's SHA-256 is kept, and a presented token is compared by its
/// SHA-256 in constant time, so neither its content nor its length leaks through timing.
#[derive(Clone)]
pub struct ControlAuth {
    digest: [u8; 32],
}

impl fmt::Debug for ControlAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ControlAuth([redacted])")
    }
}

impl ControlAuth {
    /// Checks calls against the token configured in `cfg`; an error (telling how to set one)
    /// when none is configured, so a service without a token refuses to start.
    pub fn from_config(cfg: &ControlConfig) -> Result<Self, ConfigError> {
        let token = cfg.resolve_token()?;
        Ok(Self {
            digest: sha256(token.expose().as_bytes()),
        })
    }

    /// Checks calls against `token` (tests; services use [`ControlAuth::from_config`]).
    pub fn with_token(token: &str) -> Result<Self, ConfigError> {
        Self::from_config(&ControlConfig::with_token(token))
    }

    /// `Ok` when `metadata` carries `authorization: Bearer <the token>`, else `unauthenticated`
    /// with a message that says how to pass the token.
    #[allow(clippy::result_large_err)] // tonic's Status is what interceptors return
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(value) = metadata.get(AUTHORIZATION) else {
            return Err(Status::unauthenticated(format!(
                "missing control token: {HOW_TO_PASS}"
            )));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| {
                Status::unauthenticated(format!("malformed authorization metadata: {HOW_TO_PASS}"))
            })?;
        if ct_eq(&sha256(presented.as_bytes()), &self.digest) {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!(
                "invalid control token: {HOW_TO_PASS}"
            )))
        }
    }
}

impl Interceptor for ControlAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// The token a token string cannot be sent as (not printable ASCII without spaces).
#[derive(Debug, thiserror::Error)]
#[error("the control token must be printable ASCII without spaces")]
pub struct InvalidToken;

/// The client side: a tonic interceptor adding `authorization: Bearer <token>` to every call,
/// e.g. `FooServiceClient::with_interceptor(channel, BearerToken::new(token)?)`.
#[derive(Clone)]
pub struct BearerToken {
    value: AsciiMetadataValue,
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken([redacted])")
    }
}

impl BearerToken {
    /// A bearer token; surrounding whitespace is ignored.
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken);
        }
        let mut value: AsciiMetadataValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(Self { value })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.value.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert(AUTHORIZATION, v.parse().expect("ascii"));
        }
        m
    }

    #[test]
    fn checks_the_bearer_token() {
        let auth = ControlAuth::with_token("s3cret").expect("valid");
        let cases = [
            (Some("Bearer s3cret"), true, ""),
            (Some("bearer s3cret"), true, ""),
            (Some("Bearer  s3cret "), true, ""),
            (None, false, "missing control token"),
            (Some("Bearer wrong"), false, "invalid control token"),
            (Some("Bearer s3cre"), false, "invalid control token"),
            (Some("Bearer "), false, "malformed"),
            (Some("Basic s3cret"), false, "malformed"),
            (Some("s3cret"), false, "malformed"),
        ];
        for (value, ok, message) in cases {
            match auth.check(&md(value)) {
                Ok(()) => assert!(ok, "{value:?} passed"),
                Err(status) => {
                    assert!(!ok, "{value:?} refused: {status:?}");
                    assert_eq!(status.code(), tonic::Code::Unauthenticated);
                    assert!(status.message().contains(message), "{status:?}");
                    assert!(status.message().contains("--token"), "{status:?}");
                }
            }
        }
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn client_interceptor_sets_the_header() {
        let mut bearer = BearerToken::new(" tok\n").expect("valid");
        let req = bearer.call(Request::new(())).expect("passes");
        assert_eq!(
            req.metadata()
                .get(AUTHORIZATION)
                .expect("set")
                .to_str()
                .ok(),
            Some("Bearer tok")
        );
        let mut auth = ControlAuth::with_token("tok").expect("valid");
        assert!(auth.call(req).is_ok());
        assert!(BearerToken::new("").is_err());
        assert!(BearerToken::new("a b").is_err());
        assert!(!format!("{bearer:?}").contains("tok"));
    }

    #[test]
    fn hashing_and_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let d = sha256(b"abc");
        assert_eq!(parse_sha256_hex(&to_hex(&d)), Some(d));
        assert_eq!(parse_sha256_hex(&to_hex(&d).to_uppercase()), Some(d));
        assert_eq!(parse_sha256_hex("ab"), None);
        assert_eq!(parse_sha256_hex(&"g".repeat(64)), None);
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
