//! The webhook sender against real HTTP servers on loopback: custom headers, the
//! `Herald-Signature` verified as a receiver would, outcome classes by status, `Retry-After`,
//! and the SSRF guard at start and on redirects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use herald_activator::destinations::{FailureClass, NetworkGuard, SendError, Sender};
use herald_activator::{ActivatorConfig, DestinationConfig, DestinationKind};
use herald_common::Secret;
use herald_testkit::WebhookServer;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TIMEOUT: Duration = Duration::from_secs(10);

fn webhook(url: &str) -> DestinationConfig {
    DestinationConfig {
        id: "hook".into(),
        kind: DestinationKind::Webhook,
        url: Some(url.into()),
        timeout_ms: Some(5_000),
        ..Default::default()
    }
}

/// The sender of a config entry (its deprecated top-level keys mapped into settings).
async fn sender_of(cfg: &DestinationConfig, guard: &Arc<NetworkGuard>) -> Result<Sender, String> {
    Sender::new(&cfg.to_record(chrono::Utc::now()), guard).await
}

fn guard(cidrs: &[&str]) -> Arc<NetworkGuard> {
    let nets: Vec<IpNet> = cidrs.iter().map(|c| c.parse().expect("CIDR")).collect();
    Arc::new(NetworkGuard::new(&nets))
}

fn loopback() -> Arc<NetworkGuard> {
    guard(&["127.0.0.0/8", "::1/128"])
}

async fn failure(sender: &Sender) -> SendError {
    sender
        .send("ev-1", &Bytes::from_static(br#"{"a":1}"#))
        .await
        .expect_err("the send fails")
}

/// The sender of a plain webhook to `url`, loopback allowed.
async fn loopback_sender(url: &str) -> Result<Sender> {
    sender_of(&webhook(url), &loopback())
        .await
        .map_err(anyhow::Error::msg)
}

/// Checks a failure's kind and class.
fn assert_fails_as(err: &SendError, kind: &str, class: FailureClass) {
    assert_eq!((err.kind(), err.class()), (kind, class), "{err}");
}

#[tokio::test]
async fn requests_carry_the_headers_and_a_signature_that_verifies() -> Result<()> {
    let hook = WebhookServer::start().await?;
    let mut cfg = webhook(&hook.url());
    cfg.headers = BTreeMap::from([
        ("Authorization".to_string(), Secret("Bearer t0ken".into())),
        ("X-Tenant".to_string(), Secret("acme".into())),
    ]);
    cfg.secret = Some(Secret("whsec_s3cret".into()));
    // Secrets stay out of logs.
    let debug = format!("{cfg:?}");
    for secret in ["t0ken", "acme", "s3cret"] {
        assert!(!debug.contains(secret), "{debug}");
    }
    let sender = sender_of(&cfg, &loopback())
        .await
        .map_err(anyhow::Error::msg)?;
    let body = br#"{"type":"track","event":"Signed Up","messageId":"m-1"}"#;
    let before = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    sender.send("src:m-1", &Bytes::from_static(body)).await?;
    let after = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();

    let got = hook.wait_for(1, TIMEOUT).await?;
    let req = &got[0];
    assert_eq!(req.raw.as_ref(), body);
    assert_eq!(req.header("idempotency-key"), Some("src:m-1"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("authorization"), Some("Bearer t0ken"));
    assert_eq!(req.header("x-tenant"), Some("acme"));

    // Verify as a receiver would: parse t and v1, HMAC-SHA256 of "<t>.<raw body>".
    let header = req.header("herald-signature").context("signed")?;
    let parts: BTreeMap<&str, &str> = header
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let t: u64 = parts.get("t").context("t=")?.parse()?;
    assert!(
        (before..=after).contains(&t),
        "t={t} not in {before}..={after}"
    );
    let v1 = parts.get("v1").context("v1=")?;
    assert_eq!(v1.len(), 64, "hex SHA-256: {v1}");
    let expected: Vec<u8> = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&v1[i..i + 2], 16))
        .collect::<Result<_, _>>()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_s3cret").expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(&req.raw);
    assert!(
        mac.verify_slice(&expected).is_ok(),
        "the signature verifies with the secret"
    );
    // A different secret or body does not verify.
    let mut wrong = Hmac::<Sha256>::new_from_slice(b"other").expect("any key length");
    wrong.update(format!("{t}.").as_bytes());
    wrong.update(&req.raw);
    assert!(wrong.verify_slice(&expected).is_err());
    Ok(())
}

#[tokio::test]
async fn without_a_secret_there_is_no_signature() -> Result<()> {
    let hook = WebhookServer::start().await?;
    let sender = loopback_sender(&hook.url()).await?;
    sender.send("ev-1", &Bytes::from_static(b"{}")).await?;
    let got = hook.wait_for(1, TIMEOUT).await?;
    assert_eq!(got[0].header("herald-signature"), None);
    assert_eq!(got[0].header("idempotency-key"), Some("ev-1"));
    Ok(())
}

#[tokio::test]
async fn herald_headers_cannot_be_configured() -> Result<()> {
    for name in [
        "Idempotency-Key",
        "herald-signature",
        "Content-Type",
        "bad header",
    ] {
        let mut cfg = webhook("http://127.0.0.1:9/hook");
        cfg.headers = BTreeMap::from([(name.to_string(), Secret("x".into()))]);
        let err = sender_of(&cfg, &loopback())
            .await
            .err()
            .with_context(|| format!("{name} is refused"))?;
        assert!(err.contains(name), "{err}");
    }
    Ok(())
}

#[tokio::test]
async fn statuses_are_classified_transient_or_permanent() -> Result<()> {
    let hook = WebhookServer::start().await?;
    let sender = loopback_sender(&hook.url()).await?;
    let cases = [
        (400, "http_4xx", FailureClass::Permanent),
        (401, "http_4xx", FailureClass::Permanent),
        (404, "http_4xx", FailureClass::Permanent),
        (422, "http_4xx", FailureClass::Permanent),
        (408, "http_408", FailureClass::Transient),
        (429, "http_429", FailureClass::Transient),
        (500, "http_5xx", FailureClass::Transient),
        (503, "http_5xx", FailureClass::Transient),
    ];
    for (status, kind, class) in cases {
        hook.set_failing(status);
        let err = failure(&sender).await;
        assert_eq!((err.kind(), err.class()), (kind, class), "{status}: {err}");
        assert_eq!(err.retry_after(), None);
    }
    hook.set_healthy();
    sender.send("ev-1", &Bytes::from_static(b"{}")).await?;

    // Nothing listens: a transient connect error.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let down = loopback_sender(&format!("http://{closed}/hook")).await?;
    let err = failure(&down).await;
    assert_fails_as(&err, "connect", FailureClass::Transient);
    Ok(())
}

#[tokio::test]
async fn retry_after_is_read_as_seconds_and_as_an_http_date() -> Result<()> {
    let hook = WebhookServer::start().await?;
    let sender = loopback_sender(&hook.url()).await?;
    hook.set_failing(429);
    hook.set_retry_after(Some("7"));
    assert_eq!(
        failure(&sender).await.retry_after(),
        Some(Duration::from_secs(7))
    );
    hook.set_failing(503);
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    hook.set_retry_after(Some(&date));
    let wait = failure(&sender)
        .await
        .retry_after()
        .context("an HTTP date is read")?;
    // Whole seconds, counted from a moment later than the date was written.
    assert!(
        wait <= Duration::from_secs(120) && wait >= Duration::from_secs(100),
        "{wait:?}"
    );
    Ok(())
}

#[tokio::test]
async fn internal_addresses_are_refused_at_start_unless_allowed() -> Result<()> {
    let cases = [
        ("http://127.0.0.1:9/hook", "127.0.0.1", "127.0.0.1/32"),
        ("http://10.1.2.3/hook", "10.1.2.3", "10.0.0.0/8"),
        (
            "http://169.254.169.254/latest/meta-data",
            "169.254.169.254",
            "169.254.169.254/32",
        ),
        ("http://[::1]:9/hook", "::1", "::1/128"),
        // A host name is resolved: localhost is loopback.
        (
            "http://localhost:9/hook",
            "localhost resolves to",
            "127.0.0.0/8",
        ),
    ];
    for (url, addr, cidr) in cases {
        let err = sender_of(&webhook(url), &guard(&[]))
            .await
            .err()
            .with_context(|| format!("{url} is refused"))?;
        for part in ["\"hook\"", addr, "activator.allow_private_networks"] {
            assert!(err.contains(part), "{url}: {part:?} in {err}");
        }
        let allow: &[&str] = if url.contains("localhost") {
            &[cidr, "::1/128"]
        } else {
            &[cidr]
        };
        sender_of(&webhook(url), &guard(allow))
            .await
            .map_err(|e| anyhow::anyhow!("{url} allowed by {allow:?}: {e}"))?;
    }
    // Public addresses need no allowance.
    sender_of(&webhook("http://93.184.216.34/hook"), &guard(&[]))
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

#[tokio::test]
async fn the_activator_refuses_to_start_with_a_refused_webhook() -> Result<()> {
    let common = herald_testkit::common_config("nats://127.0.0.1:1", 1, "token-of-the-test");
    let cfg = ActivatorConfig {
        grpc_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        destinations: vec![webhook("http://169.254.169.254/latest/meta-data")],
        ..Default::default()
    };
    let metrics = herald_common::telemetry::metrics();
    let err = herald_activator::start(
        &common,
        &cfg,
        metrics,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .err()
    .context("the activator does not start")?
    .to_string();
    for part in [
        "\"hook\"",
        "169.254.169.254",
        "activator.allow_private_networks",
    ] {
        assert!(err.contains(part), "{part:?} in {err}");
    }
    Ok(())
}

#[tokio::test]
async fn an_allowed_host_name_is_delivered_to() -> Result<()> {
    let hook = WebhookServer::start().await?;
    let url = hook.url().replace("127.0.0.1", "localhost");
    let sender = loopback_sender(&url).await?;
    sender.send("ev-1", &Bytes::from_static(b"{}")).await?;
    hook.wait_for(1, TIMEOUT).await?;
    Ok(())
}

/// A server on loopback that answers every request with a 307 redirect to `location`.
async fn redirecting_server(location: &'static str) -> Result<String> {
    redirecting_with(307, location.to_string()).await
}

/// A server on loopback that answers every request with `status` and `location`.
async fn redirecting_with(status: u16, location: String) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    serve_redirects(listener, status, location);
    Ok(format!("http://{addr}/hook"))
}

/// Answers every request on `listener` with `status` and `location`.
fn serve_redirects(listener: tokio::net::TcpListener, status: u16, location: String) {
    let location: Arc<str> = location.into();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let location = location.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                // The request (headers and the small body) arrives in one read here.
                let _ = conn.read(&mut buf).await;
                let res = format!(
                    "HTTP/1.1 {status} Redirect\r\nlocation: {location}\r\n\
                     content-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = conn.write_all(res.as_bytes()).await;
            });
        }
    });
}

#[tokio::test]
async fn redirects_are_followed_as_their_status_says_without_credentials() -> Result<()> {
    let hook = WebhookServer::start().await?;
    // (status, method that arrives, whether the body goes on)
    let cases = [
        (307, "POST", true),
        (308, "POST", true),
        (303, "GET", false),
        (302, "GET", false),
        (301, "GET", false),
    ];
    for (i, (status, method, with_body)) in cases.into_iter().enumerate() {
        // The server's port differs from the hook's: another origin.
        let url = redirecting_with(status, format!("{}/moved?n={i}", hook.base_url())).await?;
        let mut cfg = webhook(&url);
        cfg.headers = BTreeMap::from([
            ("Authorization".to_string(), Secret("Bearer t0ken".into())),
            ("X-Tenant".to_string(), Secret("acme".into())),
        ]);
        let sender = sender_of(&cfg, &loopback())
            .await
            .map_err(anyhow::Error::msg)?;
        let key = format!("ev-{i}");
        sender
            .send(&key, &Bytes::from_static(br#"{"a":1}"#))
            .await
            .with_context(|| format!("{status} is followed"))?;
        hook.wait_for(i + 1, TIMEOUT).await?;
        let got = hook.requests()[i].clone();
        assert_eq!(got.method, method, "{status}");
        assert_eq!(got.path, format!("/moved?n={i}"), "{status}");
        assert_eq!(!got.raw.is_empty(), with_body, "{status}: {:?}", got.raw);
        assert_eq!(
            got.header("content-type"),
            with_body.then_some("application/json"),
            "{status}: a body, and only a body, is described"
        );
        assert_eq!(
            got.header("idempotency-key"),
            Some(key.as_str()),
            "{status}"
        );
        assert_eq!(got.header("x-tenant"), Some("acme"), "{status}");
        assert_eq!(
            got.header("authorization"),
            None,
            "{status}: credentials do not follow a redirect to another origin"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_redirect_loop_ends_after_ten_redirects() -> Result<()> {
    // A server that sends every request back to itself.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    serve_redirects(listener, 307, url.clone());
    let sender = loopback_sender(&url).await?;
    let err = failure(&sender).await;
    assert_fails_as(&err, "http", FailureClass::Transient);
    assert!(err.to_string().contains("more than 10 redirects"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_destination_that_does_not_answer_times_out() -> Result<()> {
    // Accepts and reads, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            open.push(conn);
        }
    });
    let mut cfg = webhook(&format!("http://{addr}/hook"));
    cfg.timeout_ms = Some(300);
    let sender = sender_of(&cfg, &loopback())
        .await
        .map_err(anyhow::Error::msg)?;
    let started = std::time::Instant::now();
    let err = failure(&sender).await;
    assert_fails_as(&err, "timeout", FailureClass::Transient);
    assert!(err.to_string().contains("300 ms"), "{err}");
    assert!(started.elapsed() < TIMEOUT, "{:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn a_redirect_to_an_internal_address_is_refused_at_send_time() -> Result<()> {
    let url = redirecting_server("http://169.254.169.254/latest/meta-data").await?;
    let sender = loopback_sender(&url).await?;
    let err = failure(&sender).await;
    assert_fails_as(&err, "refused_address", FailureClass::Permanent);
    assert!(err.to_string().contains("169.254.169.254"), "{err}");
    Ok(())
}

#[tokio::test]
async fn answered_requests_keep_their_connection() -> Result<()> {
    // Every answer has a body (`{"ok":true}`, or an error text), which the sender does not
    // read on success: the connection must still go back to the pool, so the next request
    // reuses it instead of opening (for HTTPS: handshaking) a new one per event.
    let hook = WebhookServer::start().await?;
    let sender = loopback_sender(&hook.url()).await?;
    for i in 0..10 {
        sender
            .send(&format!("ev-{i}"), &Bytes::from_static(b"{}"))
            .await?;
    }
    hook.fail_next(3);
    for _ in 0..3 {
        assert_eq!(failure(&sender).await.kind(), "http_5xx");
    }
    for i in 10..20 {
        sender
            .send(&format!("ev-{i}"), &Bytes::from_static(b"{}"))
            .await?;
    }
    hook.wait_for(20, TIMEOUT).await?;
    let requests = hook.requests();
    assert_eq!(requests.len(), 23);
    let peers: std::collections::BTreeSet<_> = requests.iter().map(|r| r.peer).collect();
    assert_eq!(
        peers.len(),
        1,
        "23 requests one after another over one kept-alive connection: {peers:?}"
    );
    Ok(())
}
