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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use herald_common::config::Secret;
use hmac::{Hmac, Mac};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::Sha256;
use url::Url;

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

/// Headers not sent on after a redirect to another origin (scheme, host and port).
const CROSS_ORIGIN_DROPPED: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
    header::WWW_AUTHENTICATE,
];

/// Most redirects a send follows (each one checked by the SSRF guard).
const MAX_REDIRECTS: usize = 10;

/// The HTTP client: hyper's pooled client over TLS (rustls, webpki roots) or plain TCP, whose
/// connector resolves through the SSRF guard.
type HttpClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>;

/// Sends events to an HTTP endpoint.
pub struct WebhookSender {
    /// Boxed: the client's settings are large, and senders sit in an enum.
    client: Box<HttpClient>,
    url: String,
    /// `url` parsed once, for redirects and the guard.
    parsed: Url,
    /// `url` as the request target, parsed once, so a send does not parse it again.
    uri: Uri,
    /// The destination's own headers, then `user-agent` and `content-type`.
    headers: HeaderMap,
    secret: Option<Secret>,
    /// The longest a send takes, redirects and all.
    timeout: Duration,
    guard: Arc<NetworkGuard>,
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
        Self::with_roots(id, cfg, guard, None).await
    }

    /// [`Self::new`], trusting `roots` instead of the webpki roots (Mozilla's) when given.
    async fn with_roots(
        id: &str,
        cfg: &WebhookSettings,
        guard: &Arc<NetworkGuard>,
        roots: Option<rustls::RootCertStore>,
    ) -> Result<Self, String> {
        let url = cfg.url.clone();
        let parsed = Url::parse(&url)
            .map_err(|e| format!("webhook destination {id:?}: invalid url {url:?}: {e}"))?;
        let uri = target(&parsed)
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
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(
                header::USER_AGENT,
                HeaderValue::from_static(concat!("herald/", env!("CARGO_PKG_VERSION"))),
            );
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let mut http = HttpConnector::new_with_resolver(GuardedResolver::new(guard.clone()));
        http.enforce_http(false);
        http.set_nodelay(true);
        let tls_error =
            |e: rustls::Error| format!("webhook destination {id:?}: cannot set up TLS: {e}");
        let ring = rustls::crypto::ring::default_provider();
        let tls = hyper_rustls::HttpsConnectorBuilder::new();
        let tls = match roots {
            None => tls
                .with_provider_and_webpki_roots(ring)
                .map_err(tls_error)?,
            Some(roots) => tls.with_tls_config(
                rustls::ClientConfig::builder_with_provider(Arc::new(ring))
                    .with_safe_default_protocol_versions()
                    .map_err(tls_error)?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ),
        };
        let https = tls
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Box::new(
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(https),
        );
        Ok(Self {
            client,
            url,
            parsed,
            uri,
            headers,
            secret: cfg.secret.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
            guard: guard.clone(),
        })
    }

    /// POSTs one request (one event, or a batch `{"batch":[...]}`) with `key` as its
    /// `Idempotency-Key`. 2xx is success; anything else is a [`SendError`] whose class says
    /// whether to try again, with the start of the answer's body. The whole send, redirects
    /// and the body of a failed answer included, takes at most the destination's timeout.
    pub async fn send(&self, key: &str, body: &Bytes) -> Result<(), SendError> {
        match tokio::time::timeout(self.timeout, self.exchange(key, body)).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Timeout {
                url: self.url.clone(),
                message: format!("no answer within {} ms", self.timeout.as_millis()),
            }),
        }
    }

    /// [`Self::send`] without its deadline: follows redirects (301, 302 and 303 go on as a GET
    /// without the body; 307 and 308 repeat the POST).
    async fn exchange(&self, key: &str, body: &Bytes) -> Result<(), SendError> {
        let key = HeaderValue::from_bytes(key.as_bytes()).map_err(|_| SendError::Network {
            url: self.url.clone(),
            connect: false,
            message: format!("the idempotency key {key:?} is not a valid header value"),
        })?;
        let mut method = Method::POST;
        let mut body = body.clone();
        let mut uri = self.uri.clone();
        // The URL redirected to, once there is one.
        let mut at: Option<Url> = None;
        let mut cross_origin = false;
        for _ in 0..=MAX_REDIRECTS {
            let req = self.request(method.clone(), uri, &key, body.clone(), cross_origin);
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| self.request_error(&e))?;
            let status = res.status();
            if status.is_success() {
                return Ok(());
            }
            if let Some(location) = redirect_location(status, res.headers()) {
                let from = at.as_ref().unwrap_or(&self.parsed);
                let next = self.follow(from, location)?;
                cross_origin |= next.origin() != self.parsed.origin();
                if matches!(status.as_u16(), 301..=303) {
                    method = Method::GET;
                    body = Bytes::new();
                }
                uri =
                    target(&next).map_err(|e| self.network(format!("redirect to {next}: {e}")))?;
                at = Some(next);
                continue;
            }
            let retry_after = res
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let body = body_excerpt(res.into_body()).await;
            return Err(SendError::Status {
                url: self.url.clone(),
                status: status.as_u16(),
                retry_after,
                body,
            });
        }
        Err(self.network(format!("more than {MAX_REDIRECTS} redirects")))
    }

    /// One request: the destination's headers (but for credentials after a redirect to
    /// another origin, and `content-type` on a GET), the key and, with a secret, a fresh
    /// signature of `body`.
    fn request(
        &self,
        method: Method,
        uri: Uri,
        key: &HeaderValue,
        body: Bytes,
        cross_origin: bool,
    ) -> Request<Full<Bytes>> {
        let mut headers = self.headers.clone();
        if method == Method::GET {
            // A redirect turned the POST into a GET without a body: nothing to describe.
            headers.remove(header::CONTENT_TYPE);
        }
        if cross_origin {
            for name in &CROSS_ORIGIN_DROPPED {
                headers.remove(name);
            }
        }
        headers.insert(HeaderName::from_static("idempotency-key"), key.clone());
        if let Some(secret) = &self.secret {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let signature = signature(secret.expose().as_bytes(), t, &body);
            if let Ok(value) = HeaderValue::from_str(&signature) {
                headers.insert(HeaderName::from_static("herald-signature"), value);
            }
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req
    }

    /// Where a redirect from `from` to `location` leads, if the guard and the scheme allow it.
    fn follow(&self, from: &Url, location: &str) -> Result<Url, SendError> {
        let next = from
            .join(location)
            .map_err(|e| self.network(format!("redirect to {location:?}: {e}")))?;
        if !matches!(next.scheme(), "http" | "https") {
            return Err(self.network(format!("redirect to {next}: not an http(s) URL")));
        }
        // Host names are checked by the resolver; IP literals are not resolved.
        self.guard
            .check_literal(&next)
            .map_err(|refused| SendError::Refused {
                url: self.url.clone(),
                refused,
            })?;
        Ok(next)
    }

    fn network(&self, message: String) -> SendError {
        SendError::Network {
            url: self.url.clone(),
            connect: false,
            message,
        }
    }

    fn request_error(&self, e: &hyper_util::client::legacy::Error) -> SendError {
        let url = self.url.clone();
        // A refusal of the guard's resolver is somewhere in the error's sources.
        let mut message = e.to_string();
        let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        while let Some(s) = source {
            if let Some(refused) = s.downcast_ref::<Refused>() {
                return SendError::Refused {
                    url,
                    refused: refused.clone(),
                };
            }
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        SendError::Network {
            url,
            connect: e.is_connect(),
            message,
        }
    }
}

/// `url` as a request target.
fn target(url: &Url) -> Result<Uri, http::uri::InvalidUri> {
    url.as_str().parse()
}

/// The `Location` of a redirect this sender follows.
fn redirect_location(status: StatusCode, headers: &HeaderMap) -> Option<&str> {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
        .then(|| headers.get(header::LOCATION)?.to_str().ok())
        .flatten()
}

/// The first [`BODY_EXCERPT_BYTES`] of an answer's body, as text cut at a character boundary
/// (reads no more of the body than that).
async fn body_excerpt(mut body: hyper::body::Incoming) -> String {
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < BODY_EXCERPT_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    buf.extend_from_slice(data);
                }
            }
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

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A test CA and a certificate it signed for `localhost` and `127.0.0.1`, valid 2026 to
    /// 2126, with its key (made with `openssl ca`; for these tests only).
    const TEST_CA: &[u8] = include_bytes!("testdata/ca.crt");
    const LOCALHOST_CERT: &[u8] = include_bytes!("testdata/localhost.crt");
    const LOCALHOST_KEY: &[u8] = include_bytes!("testdata/localhost.key");

    /// An HTTPS server on loopback, HTTP/1.1 over rustls, that answers every request 200 and
    /// sends each request's head (up to the blank line) on the channel.
    async fn https_server() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let cert = CertificateDer::from_pem_slice(LOCALHOST_CERT).expect("certificate");
        let key = PrivateKeyDer::from_pem_slice(LOCALHOST_KEY).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (heads, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, heads) = (acceptor.clone(), heads.clone());
                tokio::spawn(async move {
                    // A refused handshake (the client does not trust us) just ends here.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let _ = heads.send(text[..end].to_string());
                            break;
                        }
                    }
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (port, rx)
    }

    fn loopback() -> Arc<NetworkGuard> {
        let nets = [
            "127.0.0.0/8".parse().expect("CIDR"),
            "::1/128".parse().expect("CIDR"),
        ];
        Arc::new(NetworkGuard::new(&nets))
    }

    fn settings(url: String) -> WebhookSettings {
        WebhookSettings {
            url,
            timeout_ms: 5_000,
            batch_max: 1,
            headers: Default::default(),
            secret: None,
        }
    }

    #[tokio::test]
    async fn https_is_sent_over_tls_to_a_trusted_server_only() {
        let (port, mut heads) = https_server().await;
        for host in ["localhost", "127.0.0.1"] {
            let cfg = settings(format!("https://{host}:{port}/hook"));
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(TEST_CA).expect("CA"))
                .expect("CA added");
            let trusting = WebhookSender::with_roots("hook", &cfg, &loopback(), Some(roots))
                .await
                .expect("sender");
            trusting
                .send("ev-1", &Bytes::from_static(b"{}"))
                .await
                .unwrap_or_else(|e| panic!("{host}: {e}"));
            let head = heads.recv().await.expect("a request arrived");
            assert!(head.starts_with("POST /hook HTTP/1.1"), "{head}");
            assert!(head.contains("idempotency-key: ev-1"), "{head}");

            // The webpki roots do not hold the test CA: the handshake is refused, as a
            // transient connect failure naming the certificate.
            let default = WebhookSender::new("hook", &cfg, &loopback())
                .await
                .expect("sender");
            let err = default
                .send("ev-2", &Bytes::from_static(b"{}"))
                .await
                .expect_err("an unknown issuer is refused");
            assert_eq!(err.kind(), "connect", "{host}: {err}");
            assert!(err.to_string().contains("certificate"), "{host}: {err}");
        }
    }

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
