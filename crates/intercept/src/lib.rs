#![forbid(unsafe_code)]
//! Traffic interception on a mesh member host: what Istio's `istio-iptables` did on VMs.
//!
//! - [`envfile`]: the seed files `cluster.env` and `sidecar.env` (shell-style `KEY=VALUE`).
//! - [`config`]: their interception variables, typed and validated once ([`InterceptConfig`]).
//! - [`rules`]: config to `iptables-restore` text for the nat table, a pure function.
//! - [`apply`]: install, re-install and clean up through the [`Netfilter`] trait, whose real
//!   implementation runs `iptables-restore --noflush` / `iptables-save` (optionally inside a
//!   network namespace) and whose fake simulates them for tests without root.

pub mod apply;
pub mod config;
pub mod envfile;
pub mod rules;

pub use apply::{
    cleanup, dry_run, install, ApplyError, FakeNetfilter, Family, Netfilter, NetfilterCall,
    SystemNetfilter,
};
pub use config::{
    CidrSelection, ConfigError, InterceptConfig, InterceptionMode, PortSelection,
    DEFAULT_EXCLUDED_INBOUND_PORTS, DEFAULT_PROXY_GID, DEFAULT_PROXY_UID, DNS_CAPTURE_PORT,
    INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT,
};
pub use envfile::{EnvFile, EnvFileError, SyntaxProblem};
pub use rules::{render, RuleSet, CHAIN_PREFIX};
