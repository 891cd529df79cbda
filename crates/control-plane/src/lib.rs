//! The control plane (`isthmus server`): the registry over the store, the admin API, the seeds'
//! registration API, metrics.
#![forbid(unsafe_code)]

pub mod api;
pub mod autoreg;
pub mod config;
pub mod discovery;
pub mod dns;
pub mod hostfiles;
pub mod http;
pub mod identity;
pub mod informer;
pub mod legacy;
pub mod mesh_state;
pub mod metrics;
pub mod onboarding;
pub mod proxies;
pub mod registry;
pub mod replicas;
pub mod server;

pub use config::ServerArgs;
