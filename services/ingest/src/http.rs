//! The public HTTP API: Segment's Tracking API (`/v1/batch`, the single-event calls and the
//! short paths analytics.js posts to) and mParticle's Events API v2 (`/v2/events`,
//! `/v2/bulkevents`, `/v2/bulkevents/historical`), with CORS for browsers.
//!
//! Every request goes the same way: authenticate from the header (before the body is read),
//! read the body within its size cap (decoding gzip or deflate through a bounded reader), check
//! its JSON nesting depth, decode it with its format's decoder (the same as NATS intake's,
//! through the shared [`Core`]), quarantine invalid items of a batch, publish every event
//! pipelined, and answer only after JetStream acknowledged them all: Segment paths with exactly
//! `200 {"success":true}`, `/v2/*` with `202 {}`. One handler serves every route.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use herald_common::{CommonConfig, Topology};
use herald_proto::v1::{Event, EventType, PayloadFormat};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::body::{self, Encoding, JsonScan};
use crate::config::IngestConfig;
use crate::core::Core;
use crate::error::{ApiError, IngestError};
use crate::events::{
    BodyReceived, DuplicateRequests, EventsAccepted, EventsRejected, PublishFailed, RateLimited,
    RequestCompleted, RequestLogFailed, RequestRejected, describe_metrics,
};
use crate::mparticle::{self, Batch};
use crate::normalise::{Decoded, Rejected};
use crate::publish::Published;
use crate::quarantine::{Submission, emit_quarantined, item_records};
use crate::ratelimit::{Limited, RateLimiter};
use crate::requests::RequestLog;
use crate::segment::{self, Shape};
use crate::source_registry::{PairAuthError, Source, SourceRegistry};

/// Segment's single-event paths and the call type each one takes, including the short paths
/// analytics.js posts to (`/v1/t`, `/v1/p`, ...; `text/plain` bodies carrying `writeKey`).
pub const SEGMENT_SINGLE_ROUTES: [(&str, EventType); 12] = [
    ("/v1/track", EventType::Track),
    ("/v1/identify", EventType::Identify),
    ("/v1/page", EventType::Page),
    ("/v1/screen", EventType::Screen),
    ("/v1/group", EventType::Group),
    ("/v1/alias", EventType::Alias),
    ("/v1/t", EventType::Track),
    ("/v1/i", EventType::Identify),
    ("/v1/p", EventType::Page),
    ("/v1/s", EventType::Screen),
    ("/v1/g", EventType::Group),
    ("/v1/a", EventType::Alias),
];

/// The OpenAPI 3 document of this API (committed as `docs/openapi.json`), served at
/// `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// How long browsers may cache a CORS preflight answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Everything request handling needs: the core it shares with NATS intake, plus what only
/// HTTP has (CORS, the mParticle request log, the rate limits). Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    core: Core,
    cors: CorsLayer,
    requests: RequestLog,
    rate_limits: RateLimiter,
}

impl AppState {
    /// State over a NATS client (connected or still connecting), with a core of its own.
    pub fn new(
        common: &CommonConfig,
        cfg: &IngestConfig,
        client: Client,
    ) -> Result<Self, IngestError> {
        Self::with_core(common, cfg, Core::new(common, cfg, client)?)
    }

    /// State over a core the service shares with NATS intake.
    pub(crate) fn with_core(
        common: &CommonConfig,
        cfg: &IngestConfig,
        core: Core,
    ) -> Result<Self, IngestError> {
        let cors = cors_layer(&cfg.cors_allowed_origins)?;
        let js = herald_common::nats::jetstream(core.client().clone(), &common.nats);
        let requests = RequestLog::new(
            js,
            core.topology().bucket("requests"),
            Duration::from_secs(common.topology.duplicate_window_seconds),
            common.topology.replicas,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                core,
                cors,
                requests,
                rate_limits: RateLimiter::default(),
            }),
        })
    }

    /// The core shared with NATS intake.
    pub fn core(&self) -> &Core {
        &self.inner.core
    }

    /// The sources events are accepted for.
    pub fn sources(&self) -> &SourceRegistry {
        self.inner.core.sources()
    }

    /// The NATS client events are published with.
    pub fn client(&self) -> &Client {
        self.inner.core.client()
    }

    /// The topology events are published by.
    pub fn topology(&self) -> &Topology {
        self.inner.core.topology()
    }
}

/// CORS for browsers: the configured origins (`*` for any), POST with any request header
/// (preflights are answered by the layer itself, before routing), cached for a day.
fn cors_layer(origins: &[String]) -> Result<CorsLayer, IngestError> {
    let layer = CorsLayer::new()
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(CORS_MAX_AGE);
    if origins.is_empty() || origins.iter().any(|o| o.trim() == "*") {
        return Ok(layer.allow_origin(AllowOrigin::any()));
    }
    let list = origins
        .iter()
        .map(|o| {
            HeaderValue::from_str(o.trim().trim_end_matches('/')).map_err(|_| {
                IngestError::Config(format!(
                    "ingest.cors_allowed_origins: {o:?} is not a valid origin"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(layer.allow_origin(AllowOrigin::list(list)))
}

/// The public HTTP router (Segment and mParticle APIs, CORS), testable with `oneshot` and no
/// socket.
pub fn router(state: AppState) -> Router {
    describe_metrics();
    let route = |path: &'static str, api: Api| {
        post(
            move |State(s): State<AppState>, headers: HeaderMap, body: Body| {
                handle(s, path, api, headers, body)
            },
        )
    };
    let mut router = Router::new().route("/v1/batch", route("/v1/batch", Api::Segment(None)));
    for (path, call) in SEGMENT_SINGLE_ROUTES {
        router = router.route(path, route(path, Api::Segment(Some(call))));
    }
    let cors = state.inner.cors.clone();
    router
        .route(
            "/v2/events",
            route("/v2/events", Api::Mparticle(mparticle::Api::Events)),
        )
        .route(
            "/v2/bulkevents",
            route("/v2/bulkevents", Api::Mparticle(mparticle::Api::Bulk)),
        )
        .route(
            "/v2/bulkevents/historical",
            route(
                "/v2/bulkevents/historical",
                Api::Mparticle(mparticle::Api::Historical),
            ),
        )
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    OPENAPI_JSON,
                )
            }),
        )
        .layer(cors)
        .with_state(state)
}

/// Which API a route serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// Segment's Tracking API: `/v1/batch` (`None`) or a single-event path and its call type.
    Segment(Option<EventType>),
    /// mParticle's Events API.
    Mparticle(mparticle::Api),
}

/// Every route's handler: ingests the request with its API's rules and answers in its API's
/// shape (Segment: exactly `200 {"success":true}`; mParticle: `202 {}` and its error shape).
async fn handle(
    state: AppState,
    route: &'static str,
    api: Api,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let received_at = Utc::now();
    let result = match api {
        Api::Segment(call) => {
            ingest_segment(&state, route, call, &headers, body, received_at).await
        }
        Api::Mparticle(mp) => {
            ingest_mparticle(&state, route, mp, &headers, body, received_at).await
        }
    };
    let res = match (result, api) {
        (Ok(()), Api::Segment(_)) => segment_success(),
        (Ok(()), Api::Mparticle(_)) => mparticle_accepted(),
        (Err(e), api) => {
            RequestRejected {
                route,
                kind: e.kind(),
                message: &e.to_string(),
            }
            .emit();
            match api {
                Api::Segment(_) => e.into_response(),
                Api::Mparticle(_) => e.into_mparticle_response(),
            }
        }
    };
    RequestCompleted {
        route,
        status: res.status().as_u16(),
        elapsed: started.elapsed(),
    }
    .emit();
    res
}

/// Exactly `200 {"success":true}`: Segment and RudderStack SDKs accept nothing else.
fn segment_success() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        r#"{"success":true}"#,
    )
        .into_response()
}

async fn ingest_segment(
    state: &AppState,
    route: &'static str,
    call: Option<EventType>,
    headers: &HeaderMap,
    body: Body,
    received_at: DateTime<Utc>,
) -> Result<(), ApiError> {
    let core = state.core();
    // A key in the header is checked before the body is read.
    let header_source = match basic_auth_user(headers)? {
        Some(key) => Some(authenticate(core.sources(), &key)?),
        None => None,
    };
    if let Some(source) = &header_source {
        has_token(state, source)?;
    }
    let (bytes, scan) = read_body(core, headers, body, core.limits().max_request_bytes).await?;
    let shape = match call {
        Some(_) => Shape::Single(call),
        None => Shape::Batch,
    };
    let parsed = segment::parse(&bytes, shape, Some(&scan))?;
    let source = match header_source {
        Some(s) => s,
        None => match parsed.write_key() {
            Some(key) => authenticate(core.sources(), key)?,
            None => {
                return Err(ApiError::Unauthorized(
                    "missing write key: send it as the HTTP Basic user name or as `writeKey` in the body",
                ));
            }
        },
    };
    admit(state, &source, parsed.len())?;

    let mut decoded = parsed.decode(&core.normaliser(&source.id, received_at))?;
    // A single-event call fails with its event's problem.
    if call.is_some()
        && let Some(Rejected { error, .. }) = decoded.rejected.pop()
    {
        EventsRejected {
            source: &source.id,
            reason: error.reason().label(),
            message: &error.to_string(),
            count: 1,
        }
        .emit();
        return Err(ApiError::InvalidEvent(error));
    }
    let payload = HttpPayload {
        source: &source,
        route,
        format: PayloadFormat::SegmentJson,
        historical: false,
        body: &bytes,
        received_at,
    };
    store(state, &payload, decoded).await
}

/// An accepted HTTP request, as its invalid items are quarantined: a payload of its API.
struct HttpPayload<'a> {
    source: &'a Source,
    route: &'static str,
    format: PayloadFormat,
    historical: bool,
    body: &'a Bytes,
    received_at: DateTime<Utc>,
}

/// `202 {}`: the mParticle Events API's answer to an accepted request.
fn mparticle_accepted() -> Response {
    (
        StatusCode::ACCEPTED,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        "{}",
    )
        .into_response()
}

async fn ingest_mparticle(
    state: &AppState,
    route: &'static str,
    api: mparticle::Api,
    headers: &HeaderMap,
    body: Body,
    received_at: DateTime<Utc>,
) -> Result<(), ApiError> {
    let core = state.core();
    let source = authenticate_mparticle(core.sources(), headers)?;
    has_token(state, &source)?;
    let limit = core.limits().max_mparticle_request_bytes;
    let (bytes, _) = read_body(core, headers, body, limit).await?;
    let historical = api == mparticle::Api::Historical;
    let batches = mparticle::parse(
        &bytes,
        api != mparticle::Api::Events,
        historical,
        received_at,
    )?;
    admit(state, &source, mparticle::count(&batches))?;

    let fresh = unseen_batches(state, &source, &batches).await;
    let n = core.normaliser(&source.id, received_at);
    let decoded = mparticle::decode(&n, &batches, Some(&fresh));
    let payload = HttpPayload {
        source: &source,
        route,
        format: PayloadFormat::MparticleJson,
        historical,
        body: &bytes,
        received_at,
    };
    store(state, &payload, decoded).await?;

    // Every event is acknowledged: only now are the batches recorded as stored.
    let stored: Vec<&str> = batches
        .iter()
        .zip(&fresh)
        .filter(|(_, fresh)| **fresh)
        .filter_map(|(b, _)| b.source_request_id.as_deref())
        .collect();
    if let Err(e) = state.inner.requests.record(&source.id, &stored).await {
        RequestLogFailed {
            op: "write",
            error: &e,
        }
        .emit();
    }
    Ok(())
}

/// For each batch, whether it must be published: `false` for a batch whose
/// `source_request_id` is in the request log already (counted as a duplicate request). When
/// the log cannot be read, every batch is published (`Nats-Msg-Id` still dedupes its events).
async fn unseen_batches(state: &AppState, source: &Source, batches: &[Batch]) -> Vec<bool> {
    let ids: Vec<&str> = batches
        .iter()
        .filter_map(|b| b.source_request_id.as_deref())
        .collect();
    let seen = match state.inner.requests.seen(&source.id, &ids).await {
        Ok(seen) => seen,
        Err(e) => {
            RequestLogFailed {
                op: "read",
                error: &e,
            }
            .emit();
            vec![false; ids.len()]
        }
    };
    let mut seen = seen.into_iter();
    let fresh: Vec<bool> = batches
        .iter()
        .map(|b| match b.source_request_id {
            Some(_) => !seen.next().unwrap_or(false),
            None => true,
        })
        .collect();
    let duplicates = fresh.iter().filter(|f| !**f).count();
    if duplicates > 0 {
        DuplicateRequests {
            source: &source.id,
            count: duplicates,
        }
        .emit();
    }
    fresh
}

/// The source of a `/v2/*` request: Basic `key:secret` is required (401 without it); an
/// unknown key, a wrong secret or a disabled source is 403.
fn authenticate_mparticle(
    sources: &SourceRegistry,
    headers: &HeaderMap,
) -> Result<Source, ApiError> {
    const MISSING: &str =
        "missing credentials: send the source's key and secret as HTTP Basic key:secret";
    let Some((key, secret)) = basic_auth_pair(headers).map_err(|_| {
        ApiError::Unauthorized("malformed Authorization header: expected Basic base64(key:secret)")
    })?
    else {
        return Err(ApiError::Unauthorized(MISSING));
    };
    match sources.authenticate_pair(&key, &secret) {
        Ok(source) if !source.enabled => Err(ApiError::SourceDisabled(source.id.to_string())),
        Ok(source) => Ok(source),
        // Until the sources are loaded, an unknown key may be a valid one: retry, don't drop.
        Err(_) if !sources.is_loaded() => Err(ApiError::Unavailable {
            cause: "sources not loaded yet".into(),
        }),
        Err(PairAuthError::UnknownKey) => Err(ApiError::Forbidden(
            "unknown key: check the key configured in the SDK",
        )),
        Err(PairAuthError::BadSecret) => Err(ApiError::Forbidden(
            "wrong secret for this key: check the secret configured in the SDK",
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared

/// Reads and decodes the body within `limit` bytes (415 for an unknown `Content-Encoding`,
/// checked before reading) and checks its nesting depth against `max_json_depth`, returning what
/// that scan saw. Any `Content-Type` is accepted.
async fn read_body(
    core: &Core,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<(Bytes, JsonScan), ApiError> {
    let encoding = Encoding::from_headers(headers)?;
    let received = body::read(body, headers, encoding, limit).await?;
    BodyReceived {
        bytes: received.wire_bytes,
        decoded_bytes: received.bytes.len(),
        encoding: encoding.label(),
    }
    .emit();
    let scan = body::scan(&received.bytes, core.limits().max_json_depth)?;
    Ok((received.bytes, scan))
}

/// Stores a decoded request: its invalid items in the quarantine, then its events.
async fn store(
    state: &AppState,
    payload: &HttpPayload<'_>,
    decoded: Decoded,
) -> Result<(), ApiError> {
    if !decoded.rejected.is_empty() {
        reject_invalid_items(state, payload, decoded.rejected).await?;
    }
    publish(state, payload.source, &decoded.events).await
}

/// The one place the invalid items of an accepted batch request go (the request itself is
/// still answered with success, because SDKs drop a whole batch on a 4xx). Each item is counted
/// with its reason and written to the quarantine as a payload of its API (see
/// [`crate::quarantine::item_records`]). An error fails the request: 503 when the records
/// cannot be stored.
async fn reject_invalid_items(
    state: &AppState,
    payload: &HttpPayload<'_>,
    rejected: Vec<Rejected>,
) -> Result<(), ApiError> {
    let source_id: &str = &payload.source.id;
    for r in &rejected {
        EventsRejected {
            source: source_id,
            reason: r.error.reason().label(),
            message: &format!("{} item {}: {}", payload.route, r.index, r.error),
            count: 1,
        }
        .emit();
    }
    let origin = format!("http:{}", payload.route);
    let sub = Submission {
        source_id,
        format: payload.format,
        content_type: "application/json",
        payload: payload.body,
        received_at: payload.received_at,
        origin: &origin,
        historical: payload.historical,
        intake_sequence: 0,
        attempt: 1,
        item_index: None,
    };
    let records = item_records(&sub, rejected);
    state.core().quarantine().record_all(&records).await?;
    emit_quarantined("http", &records);
    Ok(())
}

/// Whether the source's bucket holds a token at all: checked before the body is read, so a
/// source far over its limit costs no body reading. Counted as a refused request only (its
/// events are not known yet).
fn has_token(state: &AppState, source: &Source) -> Result<(), ApiError> {
    state
        .inner
        .rate_limits
        .has_token(source)
        .map_err(|l| rate_limited(source, l))
}

/// Admits a request of `events` events (valid or not): at most `max_batch_events` of them, and
/// a token per event from the source's bucket; a refusal by the rate limit counts the events as
/// rejected with reason `rate_limited`.
fn admit(state: &AppState, source: &Source, events: usize) -> Result<(), ApiError> {
    state.core().check_count(events)?;
    state
        .inner
        .rate_limits
        .admit(source, events as u64)
        .map_err(|l| {
            RateLimited {
                source: &source.id,
                events,
                retry_after: l.retry_after_seconds(),
            }
            .emit();
            rate_limited(source, l)
        })
}

fn rate_limited(source: &Source, l: Limited) -> ApiError {
    ApiError::RateLimited {
        source_id: source.id.to_string(),
        rate: l.rate,
        burst: l.burst,
        events: l.events,
        retry_after: l.retry_after_seconds(),
    }
}

/// Publishes the events and awaits every ack; counts the outcome. A request of two or more
/// events from an `atomic_publish` source is stored as one atomic batch (all or nothing),
/// else pipelined.
async fn publish(state: &AppState, source: &Source, events: &[Event]) -> Result<(), ApiError> {
    if events.is_empty() {
        return Ok(());
    }
    let publisher = state.core().publisher();
    let published = if source.settings.atomic_publish {
        publisher.publish_atomic(events).await
    } else {
        publisher.publish(events).await
    };
    match published {
        Ok(Published {
            acked,
            duplicates,
            elapsed,
            ..
        }) => {
            EventsAccepted {
                source: &source.id,
                count: acked,
                duplicates,
                publish_elapsed: elapsed,
            }
            .emit();
            Ok(())
        }
        Err(e) => {
            let cause = match &e {
                ApiError::Unavailable { cause } | ApiError::StreamFull { cause } => cause.as_str(),
                _ => "",
            };
            PublishFailed {
                source: &source.id,
                kind: e.kind(),
                cause,
                count: events.len(),
            }
            .emit();
            Err(e)
        }
    }
}

fn authenticate(sources: &SourceRegistry, key: &str) -> Result<Source, ApiError> {
    let Some(source) = sources.authenticate(key) else {
        // Until the sources are loaded, an unknown key may be a valid one: retry, don't drop.
        if !sources.is_loaded() {
            return Err(ApiError::Unavailable {
                cause: "sources not loaded yet".into(),
            });
        }
        return Err(ApiError::Unauthorized(
            "unknown write key: check the write key configured in the SDK",
        ));
    };
    if !source.enabled {
        return Err(ApiError::SourceDisabled(source.id.to_string()));
    }
    Ok(source)
}

/// The user name of an HTTP Basic `Authorization` header (the password is ignored). `None`
/// when there is no header, another scheme, or an empty user name; an error when the Basic
/// credentials cannot be decoded.
pub fn basic_auth_user(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(basic_auth_pair(headers)?.map(|(user, _)| user))
}

/// The user name and password of an HTTP Basic `Authorization` header (the password is empty
/// when there is no `:`). `None` when there is no header, another scheme, or an empty user
/// name; an error when the Basic credentials cannot be decoded.
pub fn basic_auth_pair(headers: &HeaderMap) -> Result<Option<(String, String)>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(malformed)?.trim();
    let Some((scheme, creds)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let creds = creds.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(creds)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(creds))
        .map_err(malformed)?;
    let text = String::from_utf8(decoded).map_err(malformed)?;
    let (user, password) = text.split_once(':').unwrap_or((text.as_str(), ""));
    Ok((!user.is_empty()).then(|| (user.to_string(), password.to_string())))
}

fn malformed<E>(_: E) -> ApiError {
    ApiError::Unauthorized("malformed Authorization header: expected Basic base64(writeKey + ':')")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn basic_auth_table() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        type Want = Result<Option<(&'static str, &'static str)>, ()>;
        let cases: Vec<(HeaderMap, Want)> = vec![
            (HeaderMap::new(), Ok(None)),
            (
                auth(&format!("Basic {}", b64("key:"))),
                Ok(Some(("key", ""))),
            ),
            (
                auth(&format!("basic {}", b64("key:secret"))),
                Ok(Some(("key", "secret"))),
            ),
            (
                auth(&format!("Basic {}", b64("key:se:cret"))),
                Ok(Some(("key", "se:cret"))),
            ),
            (
                auth(&format!("Basic {}", b64("key"))),
                Ok(Some(("key", ""))),
            ),
            (auth("Basic a2V5Og"), Ok(Some(("key", "")))), // unpadded
            (auth(&format!("Basic {}", b64(":secret"))), Ok(None)),
            (auth("Bearer abc"), Ok(None)),
            (auth("Basic"), Ok(None)),
            (auth("Basic !!!"), Err(())),
        ];
        for (headers, want) in cases {
            let got = basic_auth_pair(&headers).map_err(|_| ());
            let got = match &got {
                Ok(o) => Ok(o.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))),
                Err(()) => Err(()),
            };
            assert_eq!(got, want, "{headers:?}");
            let user = basic_auth_user(&headers).map_err(|_| ());
            let user = match &user {
                Ok(o) => Ok(o.as_deref()),
                Err(()) => Err(()),
            };
            assert_eq!(user, want.map(|o| o.map(|(u, _)| u)), "{headers:?}");
        }
    }

    #[test]
    fn cors_origins_are_validated() {
        assert!(cors_layer(&["*".into()]).is_ok());
        assert!(cors_layer(&[]).is_ok());
        assert!(cors_layer(&["https://shop.example.com".into()]).is_ok());
        let err = cors_layer(&["https://bad\nexample".into()]).unwrap_err();
        assert!(err.to_string().contains("cors_allowed_origins"), "{err}");
    }
}
