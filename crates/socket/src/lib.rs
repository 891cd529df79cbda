//! The sockets the agent opens and the listeners it serves, in one place.
//!
//! - [`SocketFactory`]: every outbound TCP connect and UDP socket of the agent (proxy upstreams,
//!   HBONE, the control plane's gRPC channels, DNS forwarding, health probes) gets the same
//!   options here: nodelay, keepalive, an optional user timeout, and the proxy's socket mark
//!   (Istio's and ztunnel's `0x539`), which the interception rules exempt so the agent never
//!   captures its own traffic. It also remembers the ports of unmarked connects, so the
//!   outbound listener can refuse a connection that loops back from the agent itself.
//! - [`LogLimiter`] and [`warn_limited!`]: repeated failures are logged once, then at most once
//!   per interval with the count of lines left out, so no storm fills a disk.
//! - [`ConnLimit`] and [`accept_failed`]: a bound on concurrent connections per listener, and
//!   what an accept loop does on an error (back off on resource exhaustion rather than spin).
//! - [`ConnGuard`] and [`GuardedIo`]: a server listener's caps on connections (in total, per
//!   source address, evicting the oldest unproven one at the cap) and its deadlines per stage.
//! - [`Balance`] and [`Listener`]: a port's connections spread exactly over the proxy's shards
//!   (Envoy's exact balance), each accepted one given to the shard serving the fewest.
//! - [`nofile::raise_nofile`]: the open-files soft limit raised to the hard one at start.
#![forbid(unsafe_code)]

pub mod accept;
pub mod balance;
pub mod factory;
pub mod guard;
pub mod limit;
pub mod nofile;

pub use accept::{accept_failed, ConnLimit};
pub use balance::{Balance, Listener, Share};
pub use factory::{Keepalive, SocketFactory, SocketOptions, DEFAULT_PROXY_MARK};
pub use guard::{Conn, ConnGuard, ConnHandle, Event, GuardConfig, GuardedIo, Stage};
pub use limit::{global_limiter, LogLimiter};
