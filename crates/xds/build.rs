//! Generates the discovery API from the project's own .proto files (needs `protoc`, Debian's
//! `protobuf-compiler`). The well-known types it imports are under `proto/google/protobuf`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").ok_or("cargo sets CARGO_MANIFEST_DIR")?,
    )
    .join("../../proto");
    let protos: Vec<PathBuf> = [
        "envoy/service/discovery/v3/ads.proto",
        "envoy/service/discovery/v3/discovery.proto",
        "envoy/config/core/v3/base.proto",
        "google/rpc/status.proto",
        "istio/workload/workloadapi.proto",
        "istio/security/authorization.proto",
        "isthmus/traffic/v1/traffic.proto",
        "google/protobuf/any.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/empty.proto",
        "google/protobuf/struct.proto",
    ]
    .iter()
    .map(|p| proto_root.join(p))
    .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    // The well-known types are imported, not compiled: they map to prost_types.
    let compiled = &protos[..7];
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Maps encode in key order, so an unchanged object encodes to the same bytes and
        // keeps its content-hash version.
        .btree_map(".")
        .include_file("xds_protos.rs")
        .compile_protos(compiled, &[proto_root])?;
    Ok(())
}
