//! The registry's resources, as operators write them (kubectl-like YAML or JSON) and as the
//! control plane stores them.
//!
//! Three kinds: `Service`, `WorkloadEntry`, `WorkloadGroup`. The canonical `apiVersion` is
//! `isthmus.io/v1`; Istio's `networking.istio.io/{v1,v1beta1,v1alpha3}` is accepted for workload
//! entries and groups, and Kubernetes' `v1` for services, so Istio users can apply files they have.
#![forbid(unsafe_code)]

pub mod client_config;
pub mod gateway;
mod parse;
mod resource;
mod selector;
pub mod text;
pub mod traffic;
pub mod validate;

pub use parse::{parse_documents, parse_json, ParseError};
pub use resource::*;
pub use selector::{LabelSelector, SelectorError};
pub use validate::{validate, FieldError, ValidationError};

/// The namespace used when a resource or a command names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The mesh's DNS domain (Kubernetes' and Istio's default).
pub const DEFAULT_DOMAIN: &str = "cluster.local";
/// The service account a registered endpoint gets when none is given (istioctl register's default).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Annotation set on services that `register` created, so `deregister` may remove them again.
pub const CREATED_BY_ANNOTATION: &str = "isthmus.io/created-by";
pub const CREATED_BY_REGISTER: &str = "register";

/// The port name `register` gives an unnamed port (istioctl register's guesses).
pub fn guess_port_name(port: u32) -> String {
    match port {
        80 | 8080 => "http".into(),
        443 => "https".into(),
        3306 => "mysql".into(),
        other => other.to_string(),
    }
}
