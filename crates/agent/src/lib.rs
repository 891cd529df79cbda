//! `isthmus agent`, run on every member host: the identity manager (the seeds' node agent), the
//! discovery subscriber with its last-known-good cache, the DNS proxy, the workload's health
//! probe and auto-registration, admin and readiness endpoints, and the proxy's data path
//! ([`proxy`]).
// One module, `sched`, holds a syscall no crate wraps; everything else stays safe.
#![deny(unsafe_code)]

pub mod args;
pub mod busy_poll;
pub mod discovery;
pub mod dnsproxy;
pub mod identity;
pub mod probe;
pub mod proxy;
pub mod resources;
pub mod run;
pub mod sched;
pub mod sockets;

pub use args::AgentArgs;
