//! Herald's protobuf contract (`package herald.v1`), compiled once here for every service.
//!
//! The `.proto` files under `proto/herald/v1/` are the source of truth; this crate only
//! includes what `build.rs` generated from them.

/// Messages and services of `herald.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("herald.v1");
}

pub mod time;

/// The encoded `FileDescriptorSet` of every Herald proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/herald_descriptor.bin"));
