//! The immutable index of mesh names the DNS answers from.
//!
//! Built once per registry change by the caller and published through a
//! `tokio::sync::watch` channel of `Arc<NameTable>`, so the request path reads it without locks
//! and a new table replaces the old one in one step.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;

/// The mesh domain when none is configured (Kubernetes' and Istio's default).
pub const DEFAULT_DOMAIN: &str = "cluster.local";

/// The namespace the seeds' control-plane names live in.
pub const CONTROL_PLANE_NAMESPACE: &str = "istio-system";

/// Names VMs of the seeds' era used for the control plane. Each resolves to the control plane's
/// address in every form a host may ask for it (see [`control_plane_alias_names`]). The list
/// matches the `address=` lines of the dnsmasq `kubedns` file that `vm config` writes.
pub const CONTROL_PLANE_ALIASES: &[&str] = &[
    "istiod",
    "istio-pilot",
    "istio-citadel",
    "istio-ca",
    "istio-policy",
    "istio-telemetry",
];

/// Errors building a [`NameTable`].
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "mesh domain {domain:?} is not a usable DNS name ({reason}); \
         give a dotted name such as \"cluster.local\""
    )]
    BadDomain { domain: String, reason: String },
    #[error(
        "DNS name {name:?} is not valid ({reason}); names are dot-separated labels of letters, \
         digits and '-', at most 63 bytes per label and 253 in all"
    )]
    BadName { name: String, reason: String },
}

/// The addresses of one name. Empty for a name that exists without addresses: a service with
/// no VIP yet, or an intermediate name such as `bookinfo.svc.cluster.local`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// What the table knows about a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The name exists (its address lists may be empty: NODATA).
    Found(&'a Addresses),
    /// The name is under the mesh domain and does not exist.
    NxDomain,
    /// Not a mesh name: forward it, or refuse.
    NotMesh,
}

/// FxHash (rustc's): names are hashed byte by byte on every query, and SipHash's per-byte cost
/// showed in profiles. Flooding needs control of the keys, which come from the registry, not
/// from the network, so a keyed hash buys nothing here.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u8(b);
        }
    }

    fn write_u8(&mut self, b: u8) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Names = HashMap<Name, Addresses, BuildHasherDefault<FxHasher>>;

/// Mesh hostnames and aliases to addresses, for one mesh domain.
///
/// Names are compared case-insensitively and with or without the trailing dot.
#[derive(Clone, Debug)]
pub struct NameTable {
    domain: Name,
    names: Names,
    serial: u32,
}

/// Collects names for a [`NameTable`].
#[derive(Clone, Debug)]
pub struct NameTableBuilder {
    domain: Name,
    names: Names,
    serial: u32,
}

impl NameTable {
    /// A table with no names (every name under `domain` is NXDOMAIN).
    pub fn empty(domain: &str) -> Result<Self, TableError> {
        Ok(NameTableBuilder::new(domain)?.build())
    }

    /// Starts a table for `domain` (e.g. `cluster.local`).
    pub fn builder(domain: &str) -> Result<NameTableBuilder, TableError> {
        NameTableBuilder::new(domain)
    }

    /// The mesh domain, as an absolute name.
    pub fn domain(&self) -> &Name {
        &self.domain
    }

    /// The serial the SOA records of this table carry.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// How many names (including intermediate ones) the table holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether `name` is the mesh domain or below it.
    pub fn is_under_domain(&self, name: &Name) -> bool {
        self.domain.zone_of(name)
    }

    /// Looks `name` up exactly (no search-domain expansion).
    pub fn lookup(&self, name: &Name) -> Lookup<'_> {
        // Names off the wire are absolute; a relative one (from a caller) means the same here.
        let found = if name.is_fqdn() {
            self.names.get(name)
        } else {
            let mut absolute = name.clone();
            absolute.set_fqdn(true);
            self.names.get(&absolute)
        };
        match found {
            Some(addresses) => Lookup::Found(addresses),
            None if self.is_under_domain(name) => Lookup::NxDomain,
            None => Lookup::NotMesh,
        }
    }

    /// Looks up a name given as text (tests, tools). Unparseable text is not a mesh name.
    pub fn lookup_str(&self, name: &str) -> Lookup<'_> {
        match parse_name(name) {
            Ok(name) => self.lookup(&name),
            Err(_) => Lookup::NotMesh,
        }
    }
}

impl NameTableBuilder {
    /// Starts an empty table for `domain`.
    pub fn new(domain: &str) -> Result<Self, TableError> {
        let domain_name = parse_name(domain).map_err(|reason| TableError::BadDomain {
            domain: domain.to_owned(),
            reason,
        })?;
        if domain_name.is_root() {
            return Err(TableError::BadDomain {
                domain: domain.to_owned(),
                reason: "the root cannot be the mesh domain".into(),
            });
        }
        let mut builder = NameTableBuilder {
            domain: domain_name,
            names: Names::default(),
            serial: 1,
        };
        // The apex and `svc.<domain>` always exist, so asking for them is NODATA, not NXDOMAIN.
        builder
            .names
            .insert(builder.domain.clone(), Addresses::default());
        let svc = builder.svc_zone();
        builder.add_ancestors(&svc);
        builder.names.entry(svc).or_default();
        Ok(builder)
    }

    /// Sets the SOA serial (the caller may pass its registry revision, truncated).
    pub fn serial(&mut self, serial: u32) -> &mut Self {
        self.serial = serial;
        self
    }

    /// Adds the service `<name>.<namespace>.svc.<domain>` with its addresses (VIPs). No
    /// addresses is allowed: the name then exists and answers NODATA.
    pub fn service(
        &mut self,
        name: &str,
        namespace: &str,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> Result<&mut Self, TableError> {
        let host = format!("{name}.{namespace}.svc.{}", self.domain_text());
        self.host(&host, addresses)
    }

    /// Adds a hostname (absolute, e.g. `reviews.bookinfo.svc.cluster.local`, trailing dot
    /// optional) with its addresses. Adding a name twice merges the addresses.
    pub fn host(
        &mut self,
        hostname: &str,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> Result<&mut Self, TableError> {
        let name = parse_name(hostname).map_err(|reason| TableError::BadName {
            name: hostname.to_owned(),
            reason,
        })?;
        if self.domain.zone_of(&name) {
            self.add_ancestors(&name);
        }
        let entry = self.names.entry(name).or_default();
        for address in addresses {
            match address {
                IpAddr::V4(v4) if !entry.v4.contains(&v4) => entry.v4.push(v4),
                IpAddr::V6(v6) if !entry.v6.contains(&v6) => entry.v6.push(v6),
                _ => {}
            }
        }
        Ok(self)
    }

    /// Adds an alias name that may lie outside the mesh domain (e.g. `istio-pilot`).
    pub fn alias(
        &mut self,
        name: &str,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> Result<&mut Self, TableError> {
        self.host(name, addresses)
    }

    /// Adds every form of the seeds' control-plane names ([`CONTROL_PLANE_ALIASES`]) pointing
    /// at `addresses`.
    pub fn control_plane_aliases(&mut self, addresses: &[IpAddr]) -> Result<&mut Self, TableError> {
        let domain = self.domain_text();
        for alias in CONTROL_PLANE_ALIASES {
            for name in control_plane_alias_names(alias, &domain) {
                self.host(&name, addresses.iter().copied())?;
            }
        }
        Ok(self)
    }

    pub fn build(self) -> NameTable {
        NameTable {
            domain: self.domain,
            names: self.names,
            serial: self.serial,
        }
    }

    fn svc_zone(&self) -> Name {
        // `svc` is a valid label and the domain already parsed, so this cannot fail; fall back
        // to the domain itself rather than panic.
        Name::from_ascii("svc")
            .and_then(|svc| svc.append_domain(&self.domain))
            .unwrap_or_else(|_| self.domain.clone())
    }

    fn domain_text(&self) -> String {
        self.domain.to_ascii().trim_end_matches('.').to_owned()
    }

    /// Makes the names between `name` and the domain exist (empty non-terminals, RFC 8020: an
    /// NXDOMAIN would tell caches that nothing below exists).
    fn add_ancestors(&mut self, name: &Name) {
        let mut current = name.base_name();
        while self.domain.zone_of(&current) && current.num_labels() > self.domain.num_labels() {
            let parent = current.base_name();
            self.names.entry(current).or_default();
            current = parent;
        }
    }
}

/// The forms one control-plane name is asked for: `istiod`, `istiod.istio-system`,
/// `istiod.istio-system.svc` and `istiod.istio-system.svc.<domain>`.
pub fn control_plane_alias_names(alias: &str, domain: &str) -> Vec<String> {
    let ns = CONTROL_PLANE_NAMESPACE;
    vec![
        alias.to_owned(),
        format!("{alias}.{ns}"),
        format!("{alias}.{ns}.svc"),
        format!("{alias}.{ns}.svc.{domain}"),
    ]
}

/// The search list a host in `namespace` uses, as Kubernetes writes it into pods:
/// `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`.
pub fn search_domains(namespace: &str, domain: &str) -> Vec<String> {
    let domain = domain.trim_end_matches('.');
    vec![
        format!("{namespace}.svc.{domain}"),
        format!("svc.{domain}"),
        domain.to_owned(),
    ]
}

/// Parses an ASCII name as absolute, tolerating a trailing dot.
pub(crate) fn parse_name(text: &str) -> Result<Name, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("empty name".into());
    }
    if !trimmed.is_ascii() {
        return Err("non-ASCII characters; give the punycode (xn--) form".into());
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| e.to_string())?;
    if name.iter().any(|label| label.is_empty()) {
        return Err("empty label (two dots in a row?)".into());
    }
    name.set_fqdn(true);
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> NameTable {
        let mut b = NameTable::builder("cluster.local").unwrap();
        b.service("reviews", "bookinfo", ["10.96.0.10".parse().unwrap()])
            .unwrap()
            .service(
                "dual",
                "bookinfo",
                ["10.96.0.11".parse().unwrap(), "fd00::11".parse().unwrap()],
            )
            .unwrap()
            .service("novip", "bookinfo", [])
            .unwrap()
            .control_plane_aliases(&["10.0.0.1".parse().unwrap()])
            .unwrap();
        b.build()
    }

    #[test]
    fn lookups_are_case_insensitive_and_dot_tolerant() {
        let t = table();
        for name in [
            "reviews.bookinfo.svc.cluster.local",
            "reviews.bookinfo.svc.cluster.local.",
            "Reviews.BookInfo.SVC.Cluster.Local.",
        ] {
            match t.lookup_str(name) {
                Lookup::Found(a) => assert_eq!(a.v4, vec![Ipv4Addr::new(10, 96, 0, 10)], "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_under_domain_is_nxdomain_and_outside_is_not_mesh() {
        let t = table();
        assert_eq!(
            t.lookup_str("nope.bookinfo.svc.cluster.local"),
            Lookup::NxDomain
        );
        assert_eq!(t.lookup_str("example.com"), Lookup::NotMesh);
        assert_eq!(t.lookup_str("local"), Lookup::NotMesh);
    }

    #[test]
    fn intermediate_names_exist_without_addresses() {
        let t = table();
        for name in [
            "cluster.local",
            "svc.cluster.local",
            "bookinfo.svc.cluster.local",
        ] {
            assert_eq!(
                t.lookup_str(name),
                Lookup::Found(&Addresses::default()),
                "{name}"
            );
        }
        assert_eq!(
            t.lookup_str("novip.bookinfo.svc.cluster.local"),
            Lookup::Found(&Addresses::default())
        );
    }

    #[test]
    fn control_plane_aliases_cover_every_form() {
        let t = table();
        for name in [
            "istio-pilot",
            "istio-pilot.istio-system",
            "istio-pilot.istio-system.svc",
            "istio-pilot.istio-system.svc.cluster.local",
            "istiod.istio-system.svc",
            "istio-ca",
            "istio-citadel.istio-system",
        ] {
            match t.lookup_str(name) {
                Lookup::Found(a) => assert_eq!(a.v4, vec![Ipv4Addr::new(10, 0, 0, 1)], "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        // The alias's parents outside the domain are not invented.
        assert_eq!(t.lookup_str("istio-system"), Lookup::NotMesh);
    }

    #[test]
    fn duplicate_hosts_merge_addresses() {
        let mut b = NameTable::builder("cluster.local").unwrap();
        b.host("a.ns.svc.cluster.local", ["10.0.0.1".parse().unwrap()])
            .unwrap();
        b.host(
            "A.ns.svc.cluster.local.",
            ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
        )
        .unwrap();
        let t = b.build();
        match t.lookup_str("a.ns.svc.cluster.local") {
            Lookup::Found(a) => assert_eq!(a.v4.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_names_are_rejected_with_the_name() {
        let err = NameTable::builder("").unwrap_err();
        assert!(err.to_string().contains("mesh domain \"\""), "{err}");
        let err = NameTable::builder(".").unwrap_err();
        assert!(err.to_string().contains("root"), "{err}");
        let mut b = NameTable::builder("cluster.local").unwrap();
        let long = "a".repeat(64);
        let err = b.service(&long, "ns", []).unwrap_err();
        assert!(err.to_string().contains(&long), "{err}");
        let err = b.host("a..b", []).unwrap_err();
        assert!(err.to_string().contains("a..b"), "{err}");
        let err = b.host("héllo.ns.svc.cluster.local", []).unwrap_err();
        assert!(err.to_string().contains("punycode"), "{err}");
    }

    #[test]
    fn search_domains_follow_kubernetes() {
        assert_eq!(
            search_domains("bookinfo", "cluster.local."),
            [
                "bookinfo.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
    }
}
