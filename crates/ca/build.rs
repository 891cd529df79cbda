//! Generates the certificate API from the project's own .proto files at build time; needs
//! only `protoc` (Debian's `protobuf-compiler`): the one well-known type used is in
//! `proto/google/protobuf/`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").ok_or("cargo sets CARGO_MANIFEST_DIR")?,
    )
    .join("../../proto");
    let ca_proto = proto_root.join("istio/v1/auth/ca.proto");
    // Isthmus' own onboarding API lives here too: the control plane serves it, and both the
    // CLI and the agent (workload tokens) call it.
    let onboarding_proto = proto_root.join("isthmus/onboarding/v1/onboarding.proto");
    for input in [
        &ca_proto,
        &onboarding_proto,
        &proto_root.join("google/protobuf/struct.proto"),
    ] {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[ca_proto, onboarding_proto], &[proto_root])?;
    Ok(())
}
