//! What the activator's test binaries share.

use herald_activator::{ActivatorConfig, DestinationConfig};

/// An activator config for tests: port-0 listeners, a 5 s ack wait, retries paused at most
/// `retry_max_backoff_ms`, loopback webhooks allowed, and these config-file destinations.
pub fn loopback_config(
    destinations: Vec<DestinationConfig>,
    retry_max_backoff_ms: u64,
) -> anyhow::Result<ActivatorConfig> {
    Ok(ActivatorConfig {
        grpc_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        ack_wait_seconds: 5,
        retry_max_backoff_ms,
        destinations,
        allow_private_networks: vec!["127.0.0.0/8".parse()?],
        ..Default::default()
    })
}
