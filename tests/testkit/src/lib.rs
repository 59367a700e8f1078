//! Test harness for Herald.
//!
//! Every test that touches NATS starts its own real `nats-server` through this crate: a single
//! JetStream server ([`NatsServer`]) or a loopback cluster ([`NatsCluster`]), each with a private
//! temporary store and free ports, killed on drop. [`WebhookServer`] is a real HTTP server that
//! plays a destination, and the event builders make Segment-shaped input.
//!
//! Every wait in here has a deadline; nothing sleeps to synchronise.

mod binary;
mod cluster;
mod dev;
mod events;
#[cfg(feature = "ingest")]
pub mod ingest;
mod server;
mod wait;
mod webhook;

pub use binary::{MIN_NATS_SERVER_VERSION, nats_server_binary};
pub use cluster::NatsCluster;
pub use dev::{DevPorts, HeraldDev};
pub use events::{segment_batch, segment_identify, segment_track};
pub use server::NatsServer;
pub use wait::{free_port, wait_until};
pub use webhook::{Received, WebhookServer};
