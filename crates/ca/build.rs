//! Generates the certificate API from the project's own .proto files (needs `protoc` and the
//! well-known types: Debian's `protobuf-compiler` and `libprotobuf-dev`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let ca_proto = proto_root.join("istio/v1/auth/ca.proto");
    println!("cargo:rerun-if-changed={}", ca_proto.display());
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[ca_proto], &[proto_root])?;
    Ok(())
}
