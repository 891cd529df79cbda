#![forbid(unsafe_code)]
//! Traffic interception on a mesh member host: what Istio's `istio-iptables` did on VMs.
//!
//! - [`envfile`]: the seed files `cluster.env` and `sidecar.env` (shell-style `KEY=VALUE`).
//! - [`config`]: their interception variables, typed and validated once ([`InterceptConfig`]).
//! - [`rules`]: config to `iptables-restore` text for the nat table, a pure function.
//! - [`apply`]: install, re-install and clean up through the [`Netfilter`] trait, whose real
//!   implementation runs `iptables-restore --noflush` / `iptables-save` (optionally inside a
//!   network namespace) and whose fake simulates them for tests without root.
//! - [`routes`]: the loopback routes of `ISTHMUS_VIP_CIDR` (an `ip rule` per network into
//!   table 15001), converged and removed through the [`Routing`] trait, real (`ip`) or fake.

pub mod apply;
pub mod config;
pub mod envfile;
pub mod routes;
pub mod rules;

pub use apply::{
    cleanup, dry_run, install, ApplyError, FakeNetfilter, Family, Netfilter, NetfilterCall,
    SystemNetfilter,
};
pub use config::{
    CidrSelection, ConfigError, InterceptConfig, InterceptionMode, PortSelection,
    DEFAULT_EXCLUDED_INBOUND_PORTS, DEFAULT_PROXY_GID, DEFAULT_PROXY_MARK, DEFAULT_PROXY_UID,
    DNS_CAPTURE_PORT, INBOUND_CAPTURE_PORT, ISTHMUS_VIP_CIDR, ISTIO_SERVICE_CIDR,
    OUTBOUND_CAPTURE_PORT,
};
pub use envfile::{EnvFile, EnvFileError, SyntaxProblem};
pub use routes::{
    cleanup_routes, install_routes, FakeRouting, RouteChange, Routing, SystemRouting, ROUTE_TABLE,
    RULE_PRIORITY,
};
pub use rules::{render, RuleSet, CHAIN_PREFIX};
