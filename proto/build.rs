//! Compiles `herald/v1/*.proto` with protox (pure Rust, no protoc) and generates prost messages and
//! tonic services. The file descriptor set is also written to `OUT_DIR` for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Every .proto under herald/v1, so adding a file needs no change here.
    println!("cargo:rerun-if-changed=herald/v1");
    let mut files: Vec<String> = std::fs::read_dir("herald/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
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
