#![forbid(unsafe_code)]
//! Isthmus discovery: Istio's workload discovery ("delta ADS" serving `istio.workload.Address`
//! and `istio.security.Authorization`), wire-compatible with what ztunnel consumes.
//!
//! - [`mapping`] turns the registry (services, workload entries) into a [`ResourceSet`].
//! - [`server`] serves a `watch` of resource sets to many clients over
//!   `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`.
//! - [`client`] is the agent's subscriber: validated state in a `watch`, a last-known-good
//!   cache on disk, reconnects that send `initial_resource_versions`.
//!
//! The protobuf code is generated at build time from the project's own `.proto` files under
//! `proto/` (needs `protoc`, Debian's `protobuf-compiler`), like the CA's.

pub mod client;
pub mod mapping;
pub mod node;
pub mod resources;
pub mod server;
pub mod traffic;

/// Generated from the project's own `proto/` files (envoy delta xDS subset, google.rpc.Status,
/// istio.workload, istio.security).
pub mod pb {
    #![allow(clippy::all, missing_docs, rustdoc::all)]
    include!(concat!(env!("OUT_DIR"), "/xds_protos.rs"));
}

pub use client::{
    node_id, ClientConfig, ClientError, ClientStatus, Connect, ConnectError, EndpointConnector,
    HealthReport, Ready, State, XdsClient,
};
pub use mapping::{
    build_resources, build_resources_with_policies, MappingOptions, AGENT_ANNOTATION,
};
pub use node::{NodeId, NodeIdError, ProxyNode, NODE_ID_FORM};
pub use resources::{
    ResourceSet, Version, XdsResource, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL,
    HTTP_POLICY_TYPE_URL, TRAFFIC_TYPE_URL,
};
pub use server::{
    AdsService, Authenticate, Identity, ServerConfig, StaticAuthenticator, XdsMetrics, XdsServer,
    DELTA_ADS_PATH, REBALANCE_MESSAGE,
};
