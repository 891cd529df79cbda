//! Generates the onboarding API (`isthmus.onboarding.v1`) from the project's own .proto file at
//! build time; needs only `protoc` (Debian's `protobuf-compiler`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = proto_root.join("isthmus/onboarding/v1/onboarding.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &[proto_root])?;
    Ok(())
}
