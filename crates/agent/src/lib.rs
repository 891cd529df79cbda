//! `isthmus agent`, run on every member host. Today: the identity manager (the seeds' node
//! agent); discovery, DNS, interception and the proxy come next.
#![forbid(unsafe_code)]

pub mod args;
pub mod identity;
pub mod run;

pub use args::AgentArgs;
