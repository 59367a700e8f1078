//! A real HTTP server that plays a webhook destination.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Status answered by [`WebhookServer::fail_next`].
const FAIL_NEXT_STATUS: u16 = 500;

/// One request the [`WebhookServer`] received.
#[derive(Debug, Clone)]
pub struct Received {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path and query, e.g. `/hook`.
    pub path: String,
    /// Headers by lower-case name; repeated headers are joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON, or `Value::Null` when it is empty or not JSON (see `raw`).
    pub body: Value,
    /// The body as sent.
    pub raw: Bytes,
    /// The status the server answered.
    pub status: u16,
    /// When the request arrived (monotonic).
    pub at: Instant,
    /// When the request arrived (wall clock).
    pub at_wall: SystemTime,
    /// The client's address: requests over one kept-alive connection share it.
    pub peer: SocketAddr,
}

impl Received {
    /// The value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

#[derive(Default)]
struct Inner {
    delivered: Vec<Received>,
    requests: Vec<Received>,
    failing: Option<u16>,
    failing_for: Option<(u16, String)>,
    fail_next: usize,
    delay: Duration,
    retry_after: Option<String>,
    /// Requests being answered now, and the most at once so far.
    in_flight: usize,
    max_in_flight: usize,
}

type Shared = Arc<Mutex<Inner>>;

/// A fake webhook destination: a real axum HTTP server on 127.0.0.1 with a free port.
///
/// It answers every path and method. While healthy it answers `200` with `{"ok":true}` and
/// records the request as delivered; while failing ([`WebhookServer::set_failing`],
/// [`WebhookServer::fail_next`]) it answers the failure status and records only the attempt.
/// The server stops when the value is dropped.
pub struct WebhookServer {
    port: u16,
    state: Shared,
    shutdown: Option<oneshot::Sender<()>>,
}

impl WebhookServer {
    /// Binds 127.0.0.1:0 and starts serving on the current tokio runtime.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the webhook server to 127.0.0.1:0")?;
        let port = listener
            .local_addr()
            .context("reading the bound port")?
            .port();
        let state = Shared::default();
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(state.clone());
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Self {
            port,
            state,
            shutdown: Some(shutdown),
        })
    }

    /// The URL to configure as the destination, `http://127.0.0.1:<port>/hook`.
    pub fn url(&self) -> String {
        format!("{}/hook", self.base_url())
    }

    /// The server's base URL, `http://127.0.0.1:<port>` (any path is answered).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on answer every request with `status` (e.g. 500, 503, 429) until
    /// [`WebhookServer::set_healthy`].
    pub fn set_failing(&self, status: u16) {
        self.lock().failing = Some(status);
    }

    /// Stop failing: answer 200 and record deliveries again. Also cancels a pending
    /// [`WebhookServer::fail_next`].
    pub fn set_healthy(&self) {
        let mut inner = self.lock();
        inner.failing = None;
        inner.failing_for = None;
        inner.fail_next = 0;
    }

    /// From now on answer `status` to every request whose body contains `needle` (e.g.
    /// `"\"user-1-1\""` for one event), until [`WebhookServer::set_healthy`].
    pub fn set_failing_for(&self, status: u16, needle: &str) {
        self.lock().failing_for = Some((status, needle.to_owned()));
    }

    /// Answer the next `n` requests with 500 (then behave as configured).
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// Hold every response for `delay` before answering (to exercise client timeouts). A request
    /// is recorded when it arrives, so one the client gave up on still counts as delivered, as
    /// with a real destination. `Duration::ZERO` turns the delay off.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Send `Retry-After: <value>` with every failure answer (seconds or an HTTP date);
    /// `None` stops it.
    pub fn set_retry_after(&self, value: Option<&str>) {
        self.lock().retry_after = value.map(str::to_owned);
    }

    /// The requests delivered successfully (answered 2xx), in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.lock().delivered.clone()
    }

    /// Every request, failed ones included, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.lock().requests.clone()
    }

    /// How many requests arrived, failed ones included.
    pub fn attempts(&self) -> usize {
        self.lock().requests.len()
    }

    /// The most requests the server was answering at once so far (with
    /// [`WebhookServer::set_delay`], how many a client had in flight).
    pub fn max_in_flight(&self) -> usize {
        self.lock().max_in_flight
    }

    /// Waits until at least `n` requests were delivered successfully and returns all deliveries,
    /// failing after `timeout` with how many arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let inner = self.lock();
                if inner.delivered.len() >= n {
                    return Ok(inner.delivered.clone());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "webhook received {} of {n} expected deliveries within {timeout:?} \
                         ({} attempts in total)",
                        inner.delivered.len(),
                        inner.requests.len()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.state)
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl std::fmt::Debug for WebhookServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookServer")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

fn lock(state: &Shared) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave the records half-written; keep going.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A request being answered: counted in `in_flight` until dropped.
struct Answering(Shared);

impl Drop for Answering {
    fn drop(&mut self) {
        lock(&self.0).in_flight -= 1;
    }
}

async fn handle(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let mut header_map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        header_map
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);

    let (status, delay, retry_after) = {
        let mut inner = lock(&state);
        let status = if inner.fail_next > 0 {
            inner.fail_next -= 1;
            FAIL_NEXT_STATUS
        } else if let Some((status, _)) = inner.failing_for.as_ref().filter(|(_, needle)| {
            !needle.is_empty() && raw.windows(needle.len()).any(|w| w == needle.as_bytes())
        }) {
            *status
        } else {
            inner.failing.unwrap_or(200)
        };
        let received = Received {
            method: method.to_string(),
            path: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned()),
            headers: header_map,
            body,
            raw,
            status,
            at: Instant::now(),
            at_wall: SystemTime::now(),
            peer,
        };
        if (200..300).contains(&status) {
            inner.delivered.push(received.clone());
        }
        inner.requests.push(received);
        inner.in_flight += 1;
        inner.max_in_flight = inner.max_in_flight.max(inner.in_flight);
        (status, inner.delay, inner.retry_after.clone())
    };
    // Counted out when answered, or when the client gave up and the answer was dropped.
    let _answering = Answering(state.clone());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_success() {
        (status, axum::Json(serde_json::json!({ "ok": true }))).into_response()
    } else {
        let mut res = (
            status,
            axum::Json(serde_json::json!({ "error": "failing on purpose" })),
        )
            .into_response();
        if let Some(value) = retry_after.and_then(|v| v.parse().ok()) {
            res.headers_mut().insert("retry-after", value);
        }
        res
    }
}
