//! Test harness for Herald.
//!
//! Every test that touches NATS starts its own real `nats-server` through this crate: a single
//! JetStream server ([`NatsServer`]) or a loopback cluster ([`NatsCluster`]), each with a private
//! temporary store and free ports, killed on drop. [`WebhookServer`] is a real HTTP server that
//! plays a destination, the event builders make Segment-shaped and protobuf input, and the
//! `herald` helpers write its config, run its roles and admin commands, and start `herald dev`.
//!
//! Every wait in here has a deadline; nothing sleeps to synchronise.

mod binary;
mod cluster;
mod dev;
mod events;
mod herald;
#[cfg(feature = "ingest")]
pub mod ingest;
mod order;
mod server;
mod wait;
mod webhook;

pub use binary::{MIN_NATS_SERVER_VERSION, nats_server_binary};
pub use cluster::NatsCluster;
pub use dev::{DevPorts, HeraldDev};
pub use events::{
    post_segment_track, processed_track, protobuf_track, publish_as_ingest, publish_processed,
    segment_batch, segment_identify, segment_track, user_per_partition,
};
pub use herald::{
    CliOutput, HeraldCli, activator_upstream, common_config, control_channel, spawn_role,
    spawn_role_with, write_config,
};
pub use order::{check_arrivals_in_order, check_processed_in_order, read_from_start};
pub use server::NatsServer;
pub use wait::{free_port, free_ports, wait_ready, wait_until};
pub use webhook::{Received, WebhookServer};
