//! The public HTTP API: Segment's Tracking API (`/v1/batch` and the single-event calls).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use herald_common::{CommonConfig, Topology};
use herald_proto::v1::EventType;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

use crate::config::IngestConfig;
use crate::error::{ApiError, IngestError};
use crate::events::{
    BodyReceived, EventsAccepted, EventsRejected, PublishFailed, RequestCompleted, RequestRejected,
    describe_metrics,
};
use crate::publish::Publisher;
use crate::segment::{Envelope, Normaliser, parse_batch, parse_single};
use crate::sources::{Source, SourceRegistry};

/// Everything request handling needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    sources: SourceRegistry,
    publisher: Publisher,
    max_request_bytes: usize,
    max_event_bytes: usize,
    max_batch_events: usize,
}

impl AppState {
    /// State over a NATS client (connected or still connecting). Publishes go to the events
    /// stream of `common.topology`, which must exist (the service provisions it at start).
    pub fn new(
        common: &CommonConfig,
        cfg: &IngestConfig,
        client: Client,
    ) -> Result<Self, IngestError> {
        common.topology.validate()?;
        if cfg.max_batch_events == 0 || cfg.max_event_bytes == 0 || cfg.max_request_bytes == 0 {
            return Err(IngestError::Config(
                "ingest.max_request_bytes, max_event_bytes and max_batch_events must be above 0"
                    .into(),
            ));
        }
        let js = herald_common::nats::jetstream(client.clone(), &common.nats);
        let publisher = Publisher::new(
            client,
            js,
            Topology::new(common.topology.clone()),
            Duration::from_millis(cfg.publish_timeout_ms),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                sources: SourceRegistry::from_config(&cfg.sources)?,
                publisher,
                max_request_bytes: cfg.max_request_bytes,
                max_event_bytes: cfg.max_event_bytes,
                max_batch_events: cfg.max_batch_events,
            }),
        })
    }

    /// The sources events are accepted for.
    pub fn sources(&self) -> &SourceRegistry {
        &self.inner.sources
    }

    /// The NATS client events are published with.
    pub fn client(&self) -> &Client {
        self.inner.publisher.client()
    }

    /// The topology events are published by.
    pub fn topology(&self) -> &Topology {
        self.inner.publisher.topology()
    }
}

/// The public HTTP router (Segment Tracking API), testable with `oneshot` and no socket.
pub fn router(state: AppState) -> Router {
    describe_metrics();
    let single = |route: &'static str, call: EventType| {
        post(
            move |State(s): State<AppState>, headers: HeaderMap, body: Body| {
                handle(s, route, Some(call), headers, body)
            },
        )
    };
    Router::new()
        .route(
            "/v1/batch",
            post(
                |State(s): State<AppState>, headers: HeaderMap, body: Body| {
                    handle(s, "/v1/batch", None, headers, body)
                },
            ),
        )
        .route("/v1/track", single("/v1/track", EventType::Track))
        .route("/v1/identify", single("/v1/identify", EventType::Identify))
        .route("/v1/page", single("/v1/page", EventType::Page))
        .route("/v1/screen", single("/v1/screen", EventType::Screen))
        .route("/v1/group", single("/v1/group", EventType::Group))
        .route("/v1/alias", single("/v1/alias", EventType::Alias))
        .with_state(state)
}

async fn handle(
    state: AppState,
    route: &'static str,
    call: Option<EventType>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let received_at = Utc::now();
    let res = match ingest(&state, route, call, &headers, body, received_at).await {
        Ok(()) => success(),
        Err(e) => e.into_response(),
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
fn success() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        r#"{"success":true}"#,
    )
        .into_response()
}

async fn ingest(
    state: &AppState,
    route: &'static str,
    call: Option<EventType>,
    headers: &HeaderMap,
    body: Body,
    received_at: DateTime<Utc>,
) -> Result<(), ApiError> {
    let refused = |e: ApiError| {
        RequestRejected {
            route,
            kind: e.kind(),
            message: &e.to_string(),
        }
        .emit();
        e
    };
    let inner = &state.inner;
    // A key in the header is checked before the body is read.
    let header_source = match basic_auth_user(headers).map_err(refused)? {
        Some(key) => Some(authenticate(&inner.sources, &key).map_err(refused)?),
        None => None,
    };
    check_encoding(headers).map_err(refused)?;
    let bytes = read_body(body, headers, inner.max_request_bytes)
        .await
        .map_err(refused)?;
    BodyReceived { bytes: bytes.len() }.emit();
    let env = match call {
        Some(_) => parse_single(&bytes),
        None => parse_batch(&bytes),
    }
    .map_err(refused)?;
    let source = match header_source {
        Some(s) => s,
        None => match &env.write_key {
            Some(key) => authenticate(&inner.sources, key).map_err(refused)?,
            None => {
                return Err(refused(ApiError::Unauthorized(
                    "missing write key: send it as the HTTP Basic user name or as `writeKey` in the body",
                )));
            }
        },
    };
    if env.items.len() > inner.max_batch_events {
        return Err(refused(ApiError::TooManyEvents {
            count: env.items.len(),
            limit: inner.max_batch_events,
        }));
    }

    let events = normalise_all(state, &source, call, env, received_at)?;
    if events.is_empty() {
        return Ok(());
    }
    let publisher = &inner.publisher;
    match publisher.publish(&events).await {
        Ok(published) => {
            EventsAccepted {
                source: &source.id,
                count: published.acked,
                duplicates: published.duplicates,
                publish_elapsed: published.elapsed,
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

/// Normalises the envelope's events. A single-event call fails with its event's problem; a
/// batch skips invalid items (counted by reason) and keeps the rest.
fn normalise_all(
    state: &AppState,
    source: &Source,
    call: Option<EventType>,
    mut env: Envelope,
    received_at: DateTime<Utc>,
) -> Result<Vec<herald_proto::v1::Event>, ApiError> {
    let normaliser = Normaliser {
        source_id: &source.id,
        received_at,
        partitions: state.topology().partitions(),
        max_event_bytes: state.inner.max_event_bytes,
    };
    let items = std::mem::take(&mut env.items);
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        match normaliser.normalise(item, call, &env) {
            Ok(e) => events.push(e),
            Err(invalid) => {
                let message = match call {
                    Some(_) => invalid.to_string(),
                    None => format!("batch item {index}: {invalid}"),
                };
                EventsRejected {
                    source: &source.id,
                    reason: invalid.reason(),
                    message: &message,
                    count: 1,
                }
                .emit();
                if call.is_some() {
                    return Err(ApiError::InvalidEvent(invalid));
                }
            }
        }
    }
    Ok(events)
}

fn authenticate(sources: &SourceRegistry, key: &str) -> Result<Source, ApiError> {
    let source = sources.authenticate(key).ok_or(ApiError::Unauthorized(
        "unknown write key: check the write key configured in the SDK",
    ))?;
    if !source.enabled {
        return Err(ApiError::SourceDisabled(source.id.to_string()));
    }
    Ok(source.clone())
}

/// The user name of an HTTP Basic `Authorization` header (the password is ignored). `None`
/// when there is no header, another scheme, or an empty user name; an error when the Basic
/// credentials cannot be decoded.
pub fn basic_auth_user(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
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
    let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
    Ok((!user.is_empty()).then(|| user.to_string()))
}

fn malformed<E>(_: E) -> ApiError {
    ApiError::Unauthorized("malformed Authorization header: expected Basic base64(writeKey + ':')")
}

/// Only identity bodies for now.
fn check_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(header::CONTENT_ENCODING) {
        None => Ok(()),
        Some(v) => {
            let v = v.to_str().unwrap_or("?").trim();
            if v.is_empty() || v.eq_ignore_ascii_case("identity") {
                Ok(())
            } else {
                Err(ApiError::UnsupportedEncoding(v.chars().take(32).collect()))
            }
        }
    }
}

async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::RequestTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::RequestTooLarge { limit })
        }
        Err(e) => Err(ApiError::Body(e.to_string())),
    }
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
        let cases: Vec<(HeaderMap, Result<Option<&str>, ()>)> = vec![
            (HeaderMap::new(), Ok(None)),
            (auth(&format!("Basic {}", b64("key:"))), Ok(Some("key"))),
            (
                auth(&format!("basic {}", b64("key:ignored"))),
                Ok(Some("key")),
            ),
            (auth(&format!("Basic {}", b64("key"))), Ok(Some("key"))),
            (auth("Basic a2V5Og"), Ok(Some("key"))), // unpadded
            (auth(&format!("Basic {}", b64(":secret"))), Ok(None)),
            (auth("Bearer abc"), Ok(None)),
            (auth("Basic !!!"), Err(())),
        ];
        for (headers, want) in cases {
            let got = basic_auth_user(&headers).map_err(|_| ());
            assert_eq!(
                got.as_ref().map(|o| o.as_deref()),
                want.as_ref().map(|o| *o),
                "{headers:?}"
            );
        }
    }

    #[test]
    fn encodings() {
        let mut h = HeaderMap::new();
        assert!(check_encoding(&h).is_ok());
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(check_encoding(&h).is_ok());
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(
            check_encoding(&h).unwrap_err().kind(),
            "unsupported_encoding"
        );
    }
}
