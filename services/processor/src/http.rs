//! The processor's HTTP API for business tools: `GET /v1/profiles/{identity_type}/{value}`
//! answers the profile as JSON (404 when unknown). Every request needs the control token as
//! `Authorization: Bearer <token>`, the same one the gRPC control APIs check.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use herald_common::auth::ControlAuth;
use serde_json::{Value, json};
use tonic::metadata::MetadataMap;

use crate::identity::IdentityKey;
use crate::profile::Profile;
use crate::resolver::Profiles;
use crate::store::ProfileError;

#[derive(Clone)]
struct ApiState {
    profiles: Arc<Profiles>,
    auth: ControlAuth,
}

/// Errors of the profile API, each rendering itself as a JSON response.
#[derive(Debug)]
enum ApiError {
    Unauthorized(String),
    BadRequest(String),
    NotFound(String),
    Store(ProfileError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, message) = match self {
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Store(e) if e.retryable() => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            ApiError::Store(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        let mut res = (code, axum::Json(json!({ "error": message }))).into_response();
        if code == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if code == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

/// The profile API router.
pub(crate) fn router(profiles: Arc<Profiles>, auth: ControlAuth) -> Router {
    Router::new()
        .route("/v1/profiles/{identity_type}/{value}", get(get_profile))
        .with_state(ApiState { profiles, auth })
}

async fn get_profile(
    State(s): State<ApiState>,
    Path((kind, value)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    s.auth
        .check(&MetadataMap::from_headers(headers))
        .map_err(|status| ApiError::Unauthorized(status.message().to_string()))?;
    let key = IdentityKey::new(&kind, &value);
    if key.kind.is_empty() || key.value.is_empty() {
        return Err(ApiError::BadRequest(
            "use /v1/profiles/{identity_type}/{value}, e.g. /v1/profiles/email/ann@example.com"
                .into(),
        ));
    }
    match s.profiles.lookup(&key).await.map_err(ApiError::Store)? {
        Some((rev, p)) => Ok(axum::Json(profile_json(&p, rev))),
        None => Err(ApiError::NotFound(format!("no profile has identity {key}"))),
    }
}

/// A profile as the HTTP API renders it.
pub(crate) fn profile_json(p: &Profile, revision: u64) -> Value {
    let live = p.traits.iter().filter(|(_, t)| !t.deleted);
    let traits: serde_json::Map<String, Value> = live
        .clone()
        .map(|(k, t)| (k.clone(), t.value.clone()))
        .collect();
    let traits_at: serde_json::Map<String, Value> =
        live.map(|(k, t)| (k.clone(), json!(t.at))).collect();
    let consent = p.consent.snapshot().map(|c| {
        json!({
            "purposes": c.purposes.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "optedOut": c.opted_out,
            "updatedAt": c.updated_at.as_ref().and_then(crate::timestamp::from_proto),
        })
    });
    json!({
        "id": p.id,
        "identities": p.identities,
        "traits": traits,
        "traitsUpdatedAt": traits_at,
        "firstSeen": p.first_seen,
        "lastSeen": p.last_seen,
        "createdAt": p.created_at,
        "eventCount": p.event_count,
        "eventCounts": p.event_counts,
        "consent": consent,
        "mergedFrom": p.merged_from,
        "revision": revision,
        "schemaVersion": p.schema_version,
    })
}
