//! The admin HTTP server every service runs: `/healthz`, `/readyz`, `/metrics`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_nats::Client;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::nats::is_connected;

/// Readiness of a service: NATS connected, plus named checks (streams bound, consumers bound)
/// that the service flips as it provisions.
#[derive(Clone)]
pub struct Readiness {
    client: Client,
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    /// Readiness over this NATS client, with the given checks initially false.
    pub fn new(client: Client, checks: &[&str]) -> Self {
        let map = checks.iter().map(|c| (c.to_string(), false)).collect();
        Self {
            client,
            checks: Arc::new(Mutex::new(map)),
        }
    }

    /// Sets a named check.
    pub fn set(&self, check: &str, ok: bool) {
        self.checks
            .lock()
            .expect("readiness lock")
            .insert(check.to_string(), ok);
    }

    /// `Ok` when ready, else the list of what is missing.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut missing: Vec<String> = self
            .checks
            .lock()
            .expect("readiness lock")
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(k, _)| k.clone())
            .collect();
        if !is_connected(&self.client) {
            missing.insert(0, "nats connection".into());
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    ready: Readiness,
}

/// The admin router.
pub fn router(metrics: PrometheusHandle, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState { metrics, ready })
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    match s.ready.check() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(missing) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", missing.join(", ")),
        ),
    }
}

async fn render_metrics(State(s): State<AdminState>) -> String {
    crate::telemetry::render(&s.metrics)
}
