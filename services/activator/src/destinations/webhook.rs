//! Webhook destination: POSTs each event as JSON with an `Idempotency-Key` header.

use std::time::Duration;

use super::SendError;
use crate::config::DestinationConfig;

/// Sends events to an HTTP endpoint.
pub struct WebhookSender {
    client: reqwest::Client,
    url: String,
}

impl WebhookSender {
    /// A sender for the destination's URL.
    pub fn new(cfg: &DestinationConfig) -> Result<Self, String> {
        let url = cfg
            .url
            .clone()
            .ok_or_else(|| format!("webhook destination {:?} needs a url", cfg.id))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        Ok(Self { client, url })
    }

    /// POSTs one event. 2xx is success; anything else is an error to retry.
    pub async fn send(&self, event_id: &str, body: &[u8]) -> Result<(), SendError> {
        let res = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("idempotency-key", event_id)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| SendError {
                kind: if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "http"
                },
                message: format!("POST {} failed: {e}", self.url),
                retry_after: None,
            })?;
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err(SendError {
            kind: if status.is_server_error() {
                "http_5xx"
            } else if status.as_u16() == 429 {
                "http_429"
            } else {
                "http_4xx"
            },
            message: format!("POST {} answered {status}", self.url),
            retry_after,
        })
    }
}
