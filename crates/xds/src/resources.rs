//! The resources the server serves: per type URL, name → (version, encoded message).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use prost::Message;

/// `istio.workload.Address`: workloads and services.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// `istio.security.Authorization`: authorization policies.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// `isthmus.traffic.v1.ServiceTraffic`: one service's HTTP routes and traffic policy.
pub const TRAFFIC_TYPE_URL: &str = "type.googleapis.com/isthmus.traffic.v1.ServiceTraffic";

/// `isthmus.traffic.v1.HttpPolicy`: an AuthorizationPolicy whole, for per-request checks.
pub const HTTP_POLICY_TYPE_URL: &str = "type.googleapis.com/isthmus.traffic.v1.HttpPolicy";

/// A content hash of the encoded resource: an unchanged object keeps its version across
/// control-plane restarts, which is what makes `initial_resource_versions` useful.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(pub u64);

impl Version {
    /// The first 8 bytes of the SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        Version(u64::from_be_bytes(first))
    }

    /// Parses the wire form (16 hex digits); `None` for anything else (a version from
    /// another server), which then simply never matches.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 16 {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(Version)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One named, versioned resource, encoded once and shared by every client's response.
#[derive(Debug, PartialEq)]
pub struct XdsResource {
    pub name: Arc<str>,
    pub version: Version,
    pub any: prost_types::Any,
}

/// The resources of one type.
pub type TypeResources = HashMap<Arc<str>, Arc<XdsResource>>;

/// Everything the server serves, by type URL. Cheap to share (`Arc`); build a new one for
/// each change and send it into the server's `watch`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ResourceSet {
    types: BTreeMap<String, Arc<TypeResources>>,
}

impl ResourceSet {
    /// An empty set that still declares both Istio types, so subscribers get (empty) answers.
    pub fn new() -> Self {
        let mut set = Self::default();
        set.declare(ADDRESS_TYPE_URL);
        set.declare(AUTHORIZATION_TYPE_URL);
        set
    }

    /// Makes `type_url` known (with no resources) if it was not.
    pub fn declare(&mut self, type_url: &str) {
        self.types.entry(type_url.to_owned()).or_default();
    }

    /// Adds or replaces a resource, encoding `message` as an `Any` of `type_url`.
    pub fn insert<M: Message>(&mut self, type_url: &str, name: &str, message: &M) {
        let any = prost_types::Any {
            type_url: type_url.to_owned(),
            value: message.encode_to_vec(),
        };
        self.insert_any(type_url, name, any);
    }

    /// Adds or replaces a resource already wrapped in an `Any`; the version is the hash of
    /// its bytes.
    pub fn insert_any(&mut self, type_url: &str, name: &str, any: prost_types::Any) {
        let version = Version::of(&any.value);
        let name: Arc<str> = Arc::from(name);
        let resource = Arc::new(XdsResource {
            name: name.clone(),
            version,
            any,
        });
        Arc::make_mut(self.types.entry(type_url.to_owned()).or_default()).insert(name, resource);
    }

    /// Removes a resource; returns whether it was there.
    pub fn remove(&mut self, type_url: &str, name: &str) -> bool {
        match self.types.get_mut(type_url) {
            Some(t) => Arc::make_mut(t).remove(name).is_some(),
            None => false,
        }
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<&Arc<XdsResource>> {
        self.types.get(type_url)?.get(name)
    }

    /// The resources of a type, `None` when the type is not served at all.
    pub fn of_type(&self, type_url: &str) -> Option<&Arc<TypeResources>> {
        self.types.get(type_url)
    }

    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// Number of resources of `type_url`.
    pub fn len(&self, type_url: &str) -> usize {
        self.types.get(type_url).map_or(0, |t| t.len())
    }

    /// Whether no type holds any resource.
    pub fn is_empty(&self) -> bool {
        self.types.values().all(|t| t.is_empty())
    }

    /// name → version of one type, sorted (for tests and debugging).
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, Version> {
        self.types
            .get(type_url)
            .map(|t| {
                t.values()
                    .map(|r| (r.name.to_string(), r.version))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_round_trips_and_rejects_foreign_forms() {
        let v = Version::of(b"hello");
        assert_eq!(Version::parse(&v.to_string()), Some(v));
        assert_eq!(Version::parse("1"), None);
        assert_eq!(Version::parse("zzzzzzzzzzzzzzzz"), None);
    }

    #[test]
    fn new_set_declares_both_types_empty() {
        let set = ResourceSet::new();
        assert_eq!(
            set.type_urls().collect::<Vec<_>>(),
            vec![AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL]
        );
        assert!(set.is_empty());
    }
}
