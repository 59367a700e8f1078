//! Shared plumbing of Herald's services: typed config, the NATS connection and topology,
//! telemetry, the admin and gRPC servers, retries, supervision and shutdown, partitioning and
//! ordered consumption.
//!
//! Services depend on this crate and on `herald-proto`, never on each other.

pub mod admin;
#[cfg(feature = "mimalloc")]
#[allow(unsafe_code)]
pub mod alloc;
pub mod auth;
pub mod config;
pub mod consent;
mod events;
pub mod expr;
pub mod flow;
pub mod identity;
pub mod kvwatch;
pub mod nats;
pub mod natsbin;
pub mod ordered;
pub mod ownership;
pub mod partition;
pub mod retry;
pub mod server;
pub mod supervisor;
pub mod suppressions;
pub mod telemetry;

pub use config::{
    CommonConfig, ConfigError, ControlConfig, LogConfig, NatsConfig, Secret, TopologyConfig,
};
pub use nats::Topology;
