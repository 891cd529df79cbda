//! HBONE, Istio's mesh tunnel: mutual TLS 1.3 (ALPN `h2`) to a workload's port 15008, then one
//! HTTP/2 `CONNECT <workload ip>:<port>` stream per tunnelled TCP connection.
//!
//! - [`HboneClient`] opens tunnels over pooled connections, verifying the server's SPIFFE ID.
//! - [`HboneServer`] terminates them, validating each stream and asking an [`InboundHandler`].
//! - [`Credentials`] arrive through a `watch` channel; rotation applies to new connections.
//! - [`splice_tunnel`] splices a tunnel and a socket without copying between the socket and
//!   HTTP/2; [`copy_bidirectional`] copies between any two streams. Both keep buffers that grow
//!   only under bulk.
//! - [`metadata`]: the optional CONNECT headers (`baggage`, `forwarded`, `traceparent`), built
//!   by the client's caller and parsed defensively by the server into [`StreamMetadata`].
#![forbid(unsafe_code)]

mod client;
pub mod copy;
mod io;
pub mod metadata;
pub mod request;
mod server;
mod stream;
mod tls;

pub use client::{ClientOptions, HboneClient, HboneError};
pub use copy::{copy_bidirectional, splice_tunnel};
pub use metadata::{Baggage, StreamMetadata, TraceId, TraceParent};
pub use request::{RecvBody, ResponseBody};
pub use server::{
    connect_failure, Decision, HboneServer, InboundHandler, InboundRequest, OrDash, ServeTunnel,
    ServerError, ServerHandle, ServerOptions, ServerStats, Upstream,
};
pub use stream::HboneStream;
pub use tls::{spiffe_id, Credentials, CredentialsWatch, TlsError, ALPN_H2};

/// HBONE port on every mesh workload.
pub const HBONE_PORT: u16 = 15008;

/// Response header carrying a human-readable reason when a CONNECT is refused.
pub const REASON_HEADER: &str = "x-isthmus-reason";
