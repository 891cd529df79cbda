//! Istio's node id, parsed once and strictly: the discovery server refuses any other form, and
//! everything that reads a node id (mesh hosts, status, auto-registration) reads this value, never
//! the raw string.
//!
//! Two forms are accepted:
//! - an opaque id with no `~` (a tool or test client): it claims no address and no namespace;
//! - exactly `<role>~<ip>~<name>.<namespace>~<namespace>.svc.<domain>` (Istio's sidecars,
//!   routers, ztunnel and waypoints), where `<ip>` is empty or an IP address and the two
//!   namespace fields are equal. Both may be empty (`ztunnel~<ip>~.~.svc.cluster.local`, a
//!   ztunnel without POD_NAMESPACE): that claims no namespace, and the identity comes from the
//!   credential alone, as istiod does. The name may be empty too (no POD_NAME).

use std::fmt;
use std::net::IpAddr;

/// The form a node id must have, quoted by every refusal.
pub const NODE_ID_FORM: &str = "<role>~<ip>~<name>.<namespace>~<namespace>.svc.<domain>";

/// Longest part of a client's node id quoted back in errors and logs.
const QUOTE_MAX: usize = 128;

/// A node id in Istio's four-part form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProxyNode {
    /// `sidecar`, `router`, `ztunnel`, `waypoint`...
    pub role: String,
    /// The address the node claims; `None` when the field is empty (no claim).
    pub ip: Option<IpAddr>,
    /// The workload's name (the part before `.<namespace>`).
    pub name: String,
    pub namespace: String,
    /// The DNS domain after `<namespace>.svc.`.
    pub domain: String,
}

/// A parsed node id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NodeId {
    /// No `~`: names the client, claims nothing.
    Opaque(String),
    Proxy(ProxyNode),
}

/// Why a node id was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("node id {id} has {parts} `~`-separated parts; use {NODE_ID_FORM} (exactly 4 parts), or an id without `~`")]
    Parts { id: Quoted, parts: usize },
    #[error("node id {id} has an empty role; use {NODE_ID_FORM}, e.g. sidecar~10.0.0.5~vm1.prod~prod.svc.cluster.local")]
    Role { id: Quoted },
    #[error("node id {id}: {ip} is not an IP address; put the host's IP (or nothing) between the first two `~`")]
    Ip { id: Quoted, ip: Quoted },
    #[error("node id {id}: {part} must be <name>.<namespace> (either may be empty)")]
    Name { id: Quoted, part: Quoted },
    #[error("node id {id}: {part} must be <namespace>.svc.<domain> with a domain (the namespace may be empty)")]
    Domain { id: Quoted, part: Quoted },
    #[error("node id {id} names namespace {name_ns} in its name but {domain_ns} in its domain; both must be the workload's namespace")]
    Mismatch {
        id: Quoted,
        name_ns: Quoted,
        domain_ns: Quoted,
    },
}

/// Client text as it is quoted back: in double quotes, escaped, cut at `QUOTE_MAX` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted(String);

impl Quoted {
    pub fn new(s: &str) -> Self {
        Quoted(truncate(s, QUOTE_MAX))
    }
}

impl fmt::Display for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// `s` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl NodeId {
    /// Parses a node id; see the module docs for the accepted forms.
    pub fn parse(id: &str) -> Result<NodeId, NodeIdError> {
        if !id.contains('~') {
            return Ok(NodeId::Opaque(id.to_owned()));
        }
        let q = || Quoted::new(id);
        let parts: Vec<&str> = id.split('~').collect();
        let [role, ip, name_ns, domain] = parts.as_slice() else {
            return Err(NodeIdError::Parts {
                id: q(),
                parts: parts.len(),
            });
        };
        if role.is_empty() {
            return Err(NodeIdError::Role { id: q() });
        }
        let ip = if ip.is_empty() {
            None
        } else {
            Some(ip.parse::<IpAddr>().map_err(|_| NodeIdError::Ip {
                id: q(),
                ip: Quoted::new(ip),
            })?)
        };
        // Namespaces are DNS labels (no dots); a host name may have dots, so the namespace is
        // the last label of the name part.
        let (name, name_ns) = name_ns.rsplit_once('.').ok_or_else(|| NodeIdError::Name {
            id: q(),
            part: Quoted::new(name_ns),
        })?;
        let (domain_ns, dns) = domain
            .split_once(".svc.")
            .filter(|(ns, d)| !d.is_empty() && !ns.contains('.'))
            .ok_or_else(|| NodeIdError::Domain {
                id: q(),
                part: Quoted::new(domain),
            })?;
        if name_ns != domain_ns {
            return Err(NodeIdError::Mismatch {
                id: q(),
                name_ns: Quoted::new(name_ns),
                domain_ns: Quoted::new(domain_ns),
            });
        }
        Ok(NodeId::Proxy(ProxyNode {
            role: (*role).to_owned(),
            ip,
            name: name.to_owned(),
            namespace: name_ns.to_owned(),
            domain: dns.to_owned(),
        }))
    }

    /// The address the node claims (only the four-part form can claim one).
    pub fn claimed_ip(&self) -> Option<IpAddr> {
        match self {
            NodeId::Opaque(_) => None,
            NodeId::Proxy(p) => p.ip,
        }
    }

    /// The namespace the node names (only the four-part form names one, and only when the
    /// field is not empty).
    pub fn namespace(&self) -> Option<&str> {
        match self {
            NodeId::Opaque(_) => None,
            NodeId::Proxy(p) => Some(p.namespace.as_str()).filter(|ns| !ns.is_empty()),
        }
    }

    /// `<name>.<namespace>` for the four-part form, the whole id otherwise (what status shows).
    pub fn display_name(&self) -> String {
        match self {
            NodeId::Opaque(id) => id.clone(),
            NodeId::Proxy(p) if p.name.is_empty() && p.namespace.is_empty() => {
                format!(
                    "{}~{}",
                    p.role,
                    p.ip.map(|ip| ip.to_string()).unwrap_or_default()
                )
            }
            NodeId::Proxy(p) => format!("{}.{}", p.name, p.namespace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(id: &str) -> ProxyNode {
        match NodeId::parse(id) {
            Ok(NodeId::Proxy(p)) => p,
            other => panic!("{id}: {other:?}"),
        }
    }

    #[test]
    fn accepts_istio_forms() {
        let p = proxy("sidecar~10.0.0.5~vm1.prod~prod.svc.cluster.local");
        assert_eq!(p.role, "sidecar");
        assert_eq!(p.ip, Some("10.0.0.5".parse().unwrap()));
        assert_eq!((p.name.as_str(), p.namespace.as_str()), ("vm1", "prod"));
        assert_eq!(p.domain, "cluster.local");

        let z =
            proxy("ztunnel~10.244.0.7~ztunnel-x8f2k.istio-system~istio-system.svc.cluster.local");
        assert_eq!(z.role, "ztunnel");
        assert_eq!(z.namespace, "istio-system");
        assert_eq!(z.name, "ztunnel-x8f2k");

        let v6 = proxy("waypoint~fd00::5~wp.prod~prod.svc.example.org");
        assert_eq!(v6.ip, Some("fd00::5".parse().unwrap()));

        // An empty address field claims nothing; a dotted host name keeps its dots.
        let none = proxy("router~~gw.host.example.prod~prod.svc.cluster.local");
        assert_eq!(none.ip, None);
        assert_eq!(none.name, "gw.host.example");
        assert_eq!(none.namespace, "prod");

        // ztunnel without POD_NAMESPACE (and POD_NAME): no namespace claimed.
        let bare = proxy("ztunnel~10.0.0.9~.~.svc.cluster.local");
        assert_eq!((bare.name.as_str(), bare.namespace.as_str()), ("", ""));
        assert_eq!(NodeId::Proxy(bare).namespace(), None);
        let unnamed = proxy("ztunnel~10.0.0.9~.prod~prod.svc.cluster.local");
        assert_eq!(NodeId::Proxy(unnamed).namespace(), Some("prod"));

        assert_eq!(
            NodeId::parse("my-tool").unwrap(),
            NodeId::Opaque("my-tool".into())
        );
        assert_eq!(NodeId::parse("my-tool").unwrap().claimed_ip(), None);
    }

    #[test]
    fn refuses_every_other_form() {
        for (bad, want) in [
            ("sidecar~10.0.0.5~vm1.prod", "has 3"),
            (
                "sidecar~10.0.0.5~vm1.prod~prod.svc.cluster.local~x",
                "has 5",
            ),
            ("~10.0.0.5~vm1.prod~prod.svc.cluster.local", "empty role"),
            (
                "sidecar~10.0.0.500~vm1.prod~prod.svc.cluster.local",
                "\"10.0.0.500\" is not an IP",
            ),
            (
                "sidecar~host-a~vm1.prod~prod.svc.cluster.local",
                "\"host-a\" is not an IP",
            ),
            (
                "sidecar~10.0.0.5~vm1.~prod.svc.cluster.local",
                "\"\" in its name but \"prod\"",
            ),
            (
                "sidecar~10.0.0.5~vm1~prod.svc.cluster.local",
                "<name>.<namespace>",
            ),
            (
                "sidecar~10.0.0.5~vm1.prod~.svc.cluster.local",
                "\"prod\" in its name but \"\"",
            ),
            ("sidecar~10.0.0.5~vm1.prod~prod", "<namespace>.svc.<domain>"),
            (
                "sidecar~10.0.0.5~vm1.prod~prod.svc.",
                "<namespace>.svc.<domain>",
            ),
            (
                "sidecar~10.0.0.5~vm1.prod~other.svc.cluster.local",
                "\"prod\" in its name but \"other\"",
            ),
        ] {
            let err = NodeId::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    proptest::proptest! {
        /// Untrusted input: any string parses or is refused, never panics, and an accepted
        /// four-part id round-trips.
        #[test]
        fn any_string_is_parsed_or_refused(id in "(\\PC|~|\\.){0,80}") {
            if let Ok(NodeId::Proxy(p)) = NodeId::parse(&id) {
                let ip = p.ip.map(|i| i.to_string()).unwrap_or_default();
                let again = format!("{}~{ip}~{}.{}~{}.svc.{}", p.role, p.name, p.namespace, p.namespace, p.domain);
                proptest::prop_assert_eq!(NodeId::parse(&again), Ok(NodeId::Proxy(p)));
            }
        }

        #[test]
        fn well_formed_ids_round_trip(
            role in "[a-z]{1,8}",
            ip in proptest::option::of(proptest::arbitrary::any::<std::net::IpAddr>()),
            name in "[a-z0-9-]{1,12}(\\.[a-z0-9-]{1,6}){0,2}",
            ns in "[a-z0-9-]{1,12}",
            domain in "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}",
        ) {
            let ip_s = ip.map(|i| i.to_string()).unwrap_or_default();
            let id = format!("{role}~{ip_s}~{name}.{ns}~{ns}.svc.{domain}");
            let want = ProxyNode { role, ip, name, namespace: ns, domain };
            proptest::prop_assert_eq!(NodeId::parse(&id), Ok(NodeId::Proxy(want)));
        }
    }

    #[test]
    fn quotes_are_cut() {
        let long = format!("sidecar~{}~a.b~b.svc.c", "1".repeat(10_000));
        let err = NodeId::parse(&long).unwrap_err().to_string();
        assert!(err.len() < 600, "{}", err.len());
        assert!(err.contains('…'));
    }
}
