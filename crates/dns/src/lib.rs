#![forbid(unsafe_code)]
//! Isthmus mesh DNS: what Istio's mesh expansion did with kube-dns and dnsmasq on VMs.
//!
//! - [`NameTable`]: mesh hostnames and control-plane aliases to addresses, immutable, published
//!   by the caller through a `watch` channel of `Arc<NameTable>` and swapped whole.
//! - [`Responder`]: request bytes to response bytes (or "forward this") with no sockets, so the
//!   request path is fuzzed and benchmarked on its own.
//! - [`DnsServer`]: UDP and TCP on one address, used by the control plane (`cluster.local`
//!   authority, other names forwarded or refused) and by the agent's proxy on 127.0.0.1:15053
//!   (search domains of the host's namespace, other names forwarded to the host's resolvers).
//!
//! All DNS encoding and decoding is hickory-proto's.

/// The hickory-proto this crate encodes and decodes with, for callers building messages.
pub use hickory_proto;

mod forward;
pub mod metrics;
pub mod resolv;
pub mod responder;
pub mod server;
pub mod table;
#[cfg(target_os = "linux")]
mod udp_batch;

pub use forward::ForwardError;
pub use metrics::{DnsMetrics, Source};
pub use resolv::{parse_resolv_conf, read_resolv_conf, remove_self, ResolvConf, ResolvError};
pub use responder::{
    Answer, ForwardQuery, Reply, Responder, ResponderConfig, ResponderError, Transport,
    DEFAULT_TTL, DEFAULT_UDP_PAYLOAD,
};
pub use server::{
    DnsServer, DnsServerConfig, Forward, ServerError, DEFAULT_AGENT_LISTEN,
    DEFAULT_FORWARD_TIMEOUT, DEFAULT_MAX_IN_FLIGHT_FORWARDS, DEFAULT_MAX_TCP_CONNECTIONS,
    DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_TCP_MESSAGE_TIMEOUT,
};
pub use table::{
    control_plane_alias_names, search_domains, Addresses, Lookup, NameTable, NameTableBuilder,
    TableError, CONTROL_PLANE_ALIASES, CONTROL_PLANE_NAMESPACE, DEFAULT_DOMAIN,
};
