//! Errors: [`IngestError`] for starting the service, [`ApiError`] for answering a request.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_common::nats::NatsError;
use herald_common::server::ServeError;
use serde::Serialize;

use crate::normalise::{InvalidEvent, Reason};

/// Errors of starting the ingest service.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Shared configuration (topology) is invalid.
    #[error(transparent)]
    Common(#[from] herald_common::ConfigError),
    /// A listener could not be bound.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// NATS could not be set up.
    #[error(transparent)]
    Nats(#[from] NatsError),
}

/// Why a request was not accepted. Renders itself as the HTTP answer: a status code and a JSON
/// body `{"error": kind, "message": ...}` a person can read, with `Retry-After` where a retry
/// later will succeed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No write key, an unknown one, or a malformed `Authorization` header.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Credentials were sent but are not valid (mParticle `/v2/*`: unknown key or wrong secret).
    #[error("{0}")]
    Forbidden(&'static str),
    /// The write key belongs to a disabled source.
    #[error("source {0} is disabled; enable it to send events")]
    SourceDisabled(String),
    /// The body is not JSON, or not a JSON object.
    #[error("request body is not a valid JSON object: {0}")]
    InvalidJson(String),
    /// The body is JSON but not a batch (`{"batch": [...]}`).
    #[error("{0}")]
    InvalidBatch(String),
    /// The body could not be read.
    #[error("cannot read request body: {0}")]
    Body(String),
    /// The body is larger than `max_request_bytes`.
    #[error("request body exceeds the limit of {limit} bytes; send smaller batches")]
    RequestTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body nests objects and arrays deeper than `max_json_depth`.
    #[error("request body nests JSON objects and arrays deeper than the limit of {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// The body uses a `Content-Encoding` ingest does not decode.
    #[error("Content-Encoding {0:?} is not supported; send the body uncompressed, gzip or deflate")]
    UnsupportedEncoding(String),
    /// The batch holds more than `max_batch_events` events.
    #[error("batch holds {count} events, more than the limit of {limit}; send smaller batches")]
    TooManyEvents {
        /// Events in the batch.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// An mParticle bulk request holds more batches than the API allows.
    #[error("bulk request holds {count} batches, more than the limit of {limit}")]
    TooManyBatches {
        /// Batches in the request.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// An event sent to `/v2/bulkevents/historical` is not old enough, or has no timestamp.
    #[error("{0}")]
    NotHistorical(String),
    /// A single-event call carried an invalid event.
    #[error(transparent)]
    InvalidEvent(#[from] InvalidEvent),
    /// NATS is not connected, or JetStream did not acknowledge in time or failed: retry later.
    #[error("event store unavailable; retry later")]
    Unavailable {
        /// What failed, for logs (not shown to clients).
        cause: String,
    },
    /// The events stream is full: retry later.
    #[error("event store is full; retry later")]
    StreamFull {
        /// What the server said, for logs.
        cause: String,
    },
    /// The source sent more events than its rate limit allows: retry after `retry_after`
    /// seconds.
    #[error(
        "source {source_id} is over its rate limit of {rate} events per second (burst {burst}); this request of {events} event(s) fits in {retry_after} s: retry then, or ask for a higher limit"
    )]
    RateLimited {
        /// The source.
        source_id: String,
        /// Its rate, events per second.
        rate: f64,
        /// Its bucket's capacity.
        burst: u64,
        /// Events in the request.
        events: u64,
        /// Seconds until the request fits (`Retry-After`).
        retry_after: u64,
    },
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl ApiError {
    /// A bounded label for metrics and the `error` field of the body.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::SourceDisabled(_) => "source_disabled",
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidBatch(_) => "invalid_batch",
            Self::Body(_) => "invalid_body",
            Self::RequestTooLarge { .. } => "request_too_large",
            Self::TooDeep { .. } => "too_deep",
            Self::TooManyBatches { .. } => "too_many_batches",
            Self::NotHistorical(_) => "not_historical",
            Self::TooManyEvents { .. } => "too_many_events",
            Self::UnsupportedEncoding(_) => "unsupported_encoding",
            Self::InvalidEvent(e) => e.reason().label(),
            Self::Unavailable { .. } => "unavailable",
            Self::StreamFull { .. } => "stream_full",
            Self::RateLimited { .. } => "rate_limited",
        }
    }

    /// The reason a payload refused with this is quarantined under: the payload's own
    /// problems have one; `None` for refusals that are not about the payload (credentials,
    /// limits of the transport, availability).
    pub fn reason(&self) -> Option<Reason> {
        Some(match self {
            Self::InvalidJson(_) => Reason::InvalidJson,
            Self::InvalidBatch(_) => Reason::InvalidBatch,
            Self::TooManyEvents { .. } => Reason::TooManyEvents,
            Self::TooManyBatches { .. } => Reason::TooManyBatches,
            Self::NotHistorical(_) => Reason::NotHistorical,
            Self::InvalidEvent(e) => e.reason(),
            _ => return None,
        })
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::SourceDisabled(_) => StatusCode::FORBIDDEN,
            Self::InvalidJson(_)
            | Self::InvalidBatch(_)
            | Self::Body(_)
            | Self::TooDeep { .. }
            | Self::TooManyBatches { .. }
            | Self::NotHistorical(_)
            | Self::TooManyEvents { .. } => StatusCode::BAD_REQUEST,
            Self::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidEvent(e) => e.status(),
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::StreamFull { .. } | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Whether sending the same request later can succeed.
    pub fn retryable(&self) -> bool {
        self.retry_after().is_some()
    }

    /// The `Retry-After` of the answer, in seconds, where a retry later will succeed.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Unavailable { .. } | Self::StreamFull { .. } => Some(1),
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    fn set_retry_after(&self, res: &mut Response) {
        if let Some(seconds) = self.retry_after() {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
    }

    /// The answer in the mParticle Events API's shape, for `/v2/*`: the same status, a body
    /// `{"errors":[{"code":"BAD_REQUEST","message":...}]}` whose code names the status, and
    /// `Retry-After` where a retry later will succeed.
    pub fn into_mparticle_response(self) -> Response {
        let status = self.status();
        let code = match status {
            StatusCode::BAD_REQUEST => "BAD_REQUEST",
            StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
            StatusCode::FORBIDDEN => "FORBIDDEN",
            StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UNSUPPORTED_MEDIA_TYPE",
            StatusCode::TOO_MANY_REQUESTS => "TOO_MANY_REQUESTS",
            StatusCode::SERVICE_UNAVAILABLE => "SERVICE_UNAVAILABLE",
            _ => "ERROR",
        };
        let body = MparticleErrors {
            errors: [MparticleError {
                code,
                message: self.to_string(),
            }],
        };
        let mut res = (status, Json(body)).into_response();
        self.set_retry_after(&mut res);
        res
    }
}

#[derive(Serialize)]
struct MparticleErrors {
    errors: [MparticleError; 1],
}

#[derive(Serialize)]
struct MparticleError {
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.kind(),
            message: self.to_string(),
        };
        let mut res = (self.status(), Json(body)).into_response();
        self.set_retry_after(&mut res);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_kinds_and_retry_after() {
        let cases = [
            (ApiError::Unauthorized("x"), 401, "unauthorized", false),
            (ApiError::Forbidden("x"), 403, "forbidden", false),
            (ApiError::TooDeep { limit: 64 }, 400, "too_deep", false),
            (
                ApiError::TooManyBatches {
                    count: 101,
                    limit: 100,
                },
                400,
                "too_many_batches",
                false,
            ),
            (
                ApiError::NotHistorical("x".into()),
                400,
                "not_historical",
                false,
            ),
            (
                ApiError::SourceDisabled("web".into()),
                403,
                "source_disabled",
                false,
            ),
            (
                ApiError::InvalidJson("x".into()),
                400,
                "invalid_json",
                false,
            ),
            (
                ApiError::InvalidBatch("x".into()),
                400,
                "invalid_batch",
                false,
            ),
            (
                ApiError::RequestTooLarge { limit: 1 },
                413,
                "request_too_large",
                false,
            ),
            (
                ApiError::TooManyEvents { count: 2, limit: 1 },
                400,
                "too_many_events",
                false,
            ),
            (
                ApiError::UnsupportedEncoding("br".into()),
                415,
                "unsupported_encoding",
                false,
            ),
            (
                ApiError::InvalidEvent(InvalidEvent::MissingEvent("event")),
                400,
                "missing_event",
                false,
            ),
            (
                ApiError::Unavailable { cause: "x".into() },
                503,
                "unavailable",
                true,
            ),
            (
                ApiError::StreamFull { cause: "x".into() },
                429,
                "stream_full",
                true,
            ),
            (rate_limited(), 429, "rate_limited", true),
        ];
        for (err, status, kind, retry) in cases {
            assert_eq!(err.kind(), kind);
            let res = err.into_response();
            assert_eq!(res.status().as_u16(), status, "{kind}");
            assert_eq!(
                res.headers().contains_key(header::RETRY_AFTER),
                retry,
                "{kind}"
            );
            assert_eq!(
                res.headers()[header::CONTENT_TYPE],
                "application/json",
                "{kind}"
            );
        }
    }

    fn rate_limited() -> ApiError {
        ApiError::RateLimited {
            source_id: "web".into(),
            rate: 10.0,
            burst: 20,
            events: 5,
            retry_after: 3,
        }
    }

    #[test]
    fn rate_limited_says_when_to_retry() {
        let err = rate_limited();
        assert_eq!(
            err.to_string(),
            "source web is over its rate limit of 10 events per second (burst 20); this request of 5 event(s) fits in 3 s: retry then, or ask for a higher limit"
        );
        assert_eq!(err.into_response().headers()[header::RETRY_AFTER], "3");
        assert_eq!(
            rate_limited().into_mparticle_response().headers()[header::RETRY_AFTER],
            "3"
        );
    }

    #[tokio::test]
    async fn mparticle_shape() {
        use http_body_util::BodyExt as _;
        let cases = [
            (ApiError::InvalidJson("x".into()), 400, "BAD_REQUEST", false),
            (ApiError::Unauthorized("x"), 401, "UNAUTHORIZED", false),
            (ApiError::Forbidden("x"), 403, "FORBIDDEN", false),
            (
                ApiError::RequestTooLarge { limit: 1 },
                413,
                "PAYLOAD_TOO_LARGE",
                false,
            ),
            (
                ApiError::StreamFull { cause: "x".into() },
                429,
                "TOO_MANY_REQUESTS",
                true,
            ),
            (
                ApiError::Unavailable { cause: "x".into() },
                503,
                "SERVICE_UNAVAILABLE",
                true,
            ),
            (rate_limited(), 429, "TOO_MANY_REQUESTS", true),
        ];
        for (err, status, code, retry) in cases {
            let message = err.to_string();
            let res = err.into_mparticle_response();
            assert_eq!(res.status().as_u16(), status, "{code}");
            assert_eq!(res.headers().contains_key(header::RETRY_AFTER), retry);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                json,
                serde_json::json!({"errors": [{"code": code, "message": message}]})
            );
        }
    }
}
