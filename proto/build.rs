//! Compiles `herald/v1/*.proto` with protox (pure Rust, no protoc) and generates prost messages and
//! tonic services. The file descriptor set is also written to `OUT_DIR` for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "herald/v1/event.proto",
        "herald/v1/ingest.proto",
        "herald/v1/processor.proto",
        "herald/v1/activator.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let bytes = fds.encode_to_vec();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("herald_descriptor.bin"), &bytes)?;
    let fds = prost_types::FileDescriptorSet::decode(bytes.as_slice())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
