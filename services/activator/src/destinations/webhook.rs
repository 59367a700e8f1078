//! Webhook destination: POSTs each request as JSON (one event object, or with `batch_max`
//! above 1 a Segment-shaped batch `{"batch":[...]}`, see [`crate::deliver`]) with an
//! `Idempotency-Key` header, the destination's own headers and, with a `secret`, a
//! `Herald-Signature`. A failed answer keeps the first 1 KiB of its body for the DLQ record.
//!
//! The signature is `Herald-Signature: t=<unix seconds>,v1=<hex>`, where `<hex>` is the
//! lower-case hex HMAC-SHA256, keyed with the secret, of `"<t>.<raw body>"` ([`signature`]).
//! A receiver recomputes it over the body bytes as received, compares in constant time, and
//! rejects an old `t` to stop replays. Every attempt is signed afresh.

use std::sync::Arc;

use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_common::config::Secret;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

use super::ssrf::{GuardedResolver, NetworkGuard, Refused};
use super::{BODY_EXCERPT_BYTES, SendError};
use crate::record::WebhookSettings;

/// Headers Herald sets itself, which a destination's `headers` may not replace.
const RESERVED_HEADERS: [&str; 5] = [
    "content-type",
    "content-length",
    "host",
    "idempotency-key",
    "herald-signature",
];

/// Most redirects a send follows (each one checked by the SSRF guard).
const MAX_REDIRECTS: usize = 10;

/// Sends events to an HTTP endpoint.
pub struct WebhookSender {
    client: reqwest::Client,
    url: String,
    /// `url` parsed once, so a send does not parse it again.
    parsed: reqwest::Url,
    headers: HeaderMap,
    secret: Option<Secret>,
}

impl WebhookSender {
    /// A sender for the destination's URL, headers and secret. Refuses a URL whose address the
    /// guard refuses (an IP literal, or a host name as it resolves now); the client's resolver
    /// checks again at every connect.
    pub async fn new(
        id: &str,
        cfg: &WebhookSettings,
        guard: &Arc<NetworkGuard>,
    ) -> Result<Self, String> {
        let url = cfg.url.clone();
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| format!("webhook destination {id:?}: invalid url {url:?}: {e}"))?;
        guard
            .check_url(&parsed)
            .await
            .map_err(|e| format!("webhook destination {id:?}: url {url}: {e}"))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            let bad = |what: &str| format!("webhook destination {id:?}: header {name:?}: {what}");
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| bad("not a valid header name"))?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(bad("set by Herald, cannot be configured"));
            }
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| bad("the value is not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        let redirect_guard = guard.clone();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(GuardedResolver::new(guard.clone())))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                // Host names are checked by the resolver; IP literals are not resolved.
                if let Err(refused) = redirect_guard.check_literal(attempt.url()) {
                    attempt.error(refused)
                } else if attempt.previous().len() > MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        Ok(Self {
            client,
            url,
            parsed,
            headers,
            secret: cfg.secret.clone(),
        })
    }

    /// POSTs one request (one event, or a batch `{"batch":[...]}`) with `key` as its
    /// `Idempotency-Key`. 2xx is success; anything else is a [`SendError`] whose class says
    /// whether to try again, with the start of the answer's body.
    pub async fn send(&self, key: &str, body: &Bytes) -> Result<(), SendError> {
        let mut req = self.client.post(self.parsed.clone());
        if !self.headers.is_empty() {
            req = req.headers(self.headers.clone());
        }
        let mut req = req
            .header("content-type", "application/json")
            .header("idempotency-key", key);
        if let Some(secret) = &self.secret {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            req = req.header(
                "herald-signature",
                signature(secret.expose().as_bytes(), t, body),
            );
        }
        let res = req
            .body(body.clone())
            .send()
            .await
            .map_err(|e| self.request_error(e))?;
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = body_excerpt(res).await;
        Err(SendError::Status {
            url: self.url.clone(),
            status: status.as_u16(),
            retry_after,
            body,
        })
    }

    fn request_error(&self, e: reqwest::Error) -> SendError {
        let url = self.url.clone();
        // A refusal of the guard (resolver or redirect) is somewhere in the error's sources.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(refused) = s.downcast_ref::<Refused>() {
                return SendError::Refused {
                    url,
                    refused: refused.clone(),
                };
            }
            source = s.source();
        }
        let message = e.to_string();
        if e.is_timeout() {
            SendError::Timeout { url, message }
        } else {
            SendError::Network {
                url,
                connect: e.is_connect(),
                message,
            }
        }
    }
}

/// The first [`BODY_EXCERPT_BYTES`] of an answer's body, as text cut at a character boundary
/// (reads no more of the body than that).
async fn body_excerpt(mut res: reqwest::Response) -> String {
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < BODY_EXCERPT_BYTES {
        match res.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    excerpt(&buf)
}

/// `bytes` as text of at most [`BODY_EXCERPT_BYTES`], cut at a character boundary (invalid
/// UTF-8 replaced).
pub fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_EXCERPT_BYTES + 4)]);
    let mut end = text.len().min(BODY_EXCERPT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The `Herald-Signature` value for `body` sent at unix time `t`:
/// `t=<t>,v1=<lower-case hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = format!("t={t},v1=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A `Retry-After` value as a pause from `now`: delay seconds (`"120"`) or an HTTP date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`; a date in the past is no pause). `None` when it is
/// neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        // 2015-10-21T07:28:00Z
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let cases = [
            ("120", Some(120)),
            (" 0 ", Some(0)),
            ("Wed, 21 Oct 2015 07:28:30 GMT", Some(30)),
            ("Wed, 21 Oct 2015 07:28:00 GMT", Some(0)),
            ("Wed, 21 Oct 2015 07:27:00 GMT", Some(0)),
            ("Wednesday, 21-Oct-15 07:29:00 GMT", Some(60)),
            ("-5", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
        ];
        for (value, secs) in cases {
            assert_eq!(
                parse_retry_after(value, now),
                secs.map(Duration::from_secs),
                "{value:?}"
            );
        }
    }

    #[test]
    fn excerpts_keep_the_first_kib_at_a_character_boundary() {
        assert_eq!(excerpt(b"bad request"), "bad request");
        assert_eq!(excerpt(b""), "");
        let long = "x".repeat(3000);
        assert_eq!(excerpt(long.as_bytes()).len(), BODY_EXCERPT_BYTES);
        // 1023 ASCII bytes, then a 2-byte character straddling the limit: cut before it.
        let straddling = format!("{}\u{e9}tail", "a".repeat(1023));
        let cut = excerpt(straddling.as_bytes());
        assert_eq!(cut.len(), 1023);
        assert!(cut.chars().all(|c| c == 'a'));
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // Computed independently: python3 -c 'import hmac,hashlib;
        // print(hmac.new(b"whsec", b"1700000000.{\"a\":1}", hashlib.sha256).hexdigest())'
        assert_eq!(
            signature(b"whsec", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=8ad37ba156048ae0e0a5533c75cdf26fee88b07f93cb57ee4c80adb053012032"
        );
    }
}
