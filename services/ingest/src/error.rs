//! Errors: [`IngestError`] for starting the service, [`ApiError`] for answering a request.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_common::nats::NatsError;
use herald_common::server::ServeError;
use serde::Serialize;

use crate::segment::InvalidEvent;

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
    /// The body uses a `Content-Encoding` ingest does not decode.
    #[error("Content-Encoding {0:?} is not supported; send the body uncompressed")]
    UnsupportedEncoding(String),
    /// The batch holds more than `max_batch_events` events.
    #[error("batch holds {count} events, more than the limit of {limit}; send smaller batches")]
    TooManyEvents {
        /// Events in the batch.
        count: usize,
        /// The limit.
        limit: usize,
    },
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
            Self::SourceDisabled(_) => "source_disabled",
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidBatch(_) => "invalid_batch",
            Self::Body(_) => "invalid_body",
            Self::RequestTooLarge { .. } => "request_too_large",
            Self::TooManyEvents { .. } => "too_many_events",
            Self::UnsupportedEncoding(_) => "unsupported_encoding",
            Self::InvalidEvent(e) => e.reason(),
            Self::Unavailable { .. } => "unavailable",
            Self::StreamFull { .. } => "stream_full",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::SourceDisabled(_) => StatusCode::FORBIDDEN,
            Self::InvalidJson(_)
            | Self::InvalidBatch(_)
            | Self::Body(_)
            | Self::TooManyEvents { .. } => StatusCode::BAD_REQUEST,
            Self::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidEvent(e) => e.status(),
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::StreamFull { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Whether sending the same request later can succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::StreamFull { .. })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.kind(),
            message: self.to_string(),
        };
        let mut res = (self.status(), Json(body)).into_response();
        if self.retryable() {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
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
                ApiError::InvalidEvent(InvalidEvent::MissingEvent),
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
}
