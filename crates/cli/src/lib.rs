//! The `isthmus` command line: subcommand definitions, and the operator's commands, which talk
//! to the control plane's admin API.
#![forbid(unsafe_code)]

pub mod args;
pub mod client;
pub mod commands;
pub mod doctor;
pub mod join;
mod onboard;
mod output;
pub mod status;
mod tlsverify;
pub mod tokenarg;
pub mod vmconfig;

pub use args::{Cli, Command};
