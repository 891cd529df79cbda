//! Istio L4 authorization of an inbound connection, evaluated as ztunnel does: any matching
//! DENY policy denies; otherwise, when ALLOW policies apply, one of them must match; otherwise
//! the connection is allowed. Pure functions over the discovery state, so they are tested
//! without sockets and re-run when policies change.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use isthmus_xds::client::{Authorization, State, Workload};
use isthmus_xds::pb::istio::security as sec;
use isthmus_xds::Identity;
use sec::string_match::MatchType;

/// What a policy is matched against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The authenticated peer; `None` for plaintext.
    pub peer: Option<Identity>,
    pub src: IpAddr,
    /// The local workload address and port the connection is for.
    pub dst: SocketAddr,
}

/// The outcome, with a reason for the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow(String),
    Deny(String),
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow(_))
    }

    pub fn reason(&self) -> &str {
        match self {
            Verdict::Allow(r) | Verdict::Deny(r) => r,
        }
    }
}

/// Policies that apply to `workload`: GLOBAL ones, NAMESPACE ones of its namespace, and the
/// ones it names (WORKLOAD_SELECTOR). Dry-run policies are left out: they are not enforced.
/// Sorted by resource name so that reasons are stable.
pub fn applicable<'a>(state: &'a State, workload: &Workload) -> Vec<&'a Arc<Authorization>> {
    let mut out: Vec<&Arc<Authorization>> = state
        .authorizations()
        .filter(|a| !a.dry_run)
        .filter(|a| match sec::Scope::try_from(a.scope) {
            Ok(sec::Scope::Global) => true,
            Ok(sec::Scope::Namespace) => a.namespace == workload.namespace,
            Ok(sec::Scope::WorkloadSelector) => workload
                .authorization_policies
                .iter()
                .any(|n| *n == policy_name(a)),
            // An unknown scope cannot be placed; the control plane never sends one.
            Err(_) => false,
        })
        .collect();
    out.sort_by_key(|a| policy_name(a));
    out
}

/// Evaluates the policies that apply to `workload` for `conn`.
pub fn authorize(state: &State, workload: &Workload, conn: &Connection) -> Verdict {
    evaluate(
        applicable(state, workload).into_iter().map(Arc::as_ref),
        conn,
    )
}

/// Evaluates `policies` (all assumed to apply) for `conn`.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    conn: &Connection,
) -> Verdict {
    let mut allow_policies = 0usize;
    let mut allowed_by: Option<String> = None;
    for p in policies {
        let matched = policy_matches(p, conn);
        match sec::Action::try_from(p.action) {
            Ok(sec::Action::Deny) => {
                if matched {
                    return Verdict::Deny(format!("denied by policy {}", policy_name(p)));
                }
            }
            Ok(sec::Action::Allow) => {
                allow_policies += 1;
                if matched && allowed_by.is_none() {
                    allowed_by = Some(policy_name(p));
                }
            }
            // Fail closed on an action we do not understand.
            Err(_) => {
                return Verdict::Deny(format!(
                    "policy {} has unknown action {}",
                    policy_name(p),
                    p.action
                ))
            }
        }
    }
    match (allow_policies, allowed_by) {
        (0, _) => Verdict::Allow("no ALLOW policy applies".into()),
        (_, Some(name)) => Verdict::Allow(format!("allowed by policy {name}")),
        (n, None) => Verdict::Deny(format!("no ALLOW policy matched ({n} apply)")),
    }
}

fn policy_name(p: &Authorization) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// Rules are OR-ed; the clauses of a rule AND-ed; the matches of a clause OR-ed.
fn policy_matches(p: &Authorization, conn: &Connection) -> bool {
    p.rules.iter().any(|rule| {
        rule.clauses
            .iter()
            .all(|clause| clause.matches.iter().any(|m| match_matches(m, conn)))
    })
}

/// Set fields are AND-ed, the values of one field OR-ed; a `not_` field fails the match when
/// any of its values matches.
fn match_matches(m: &sec::Match, conn: &Connection) -> bool {
    let ns = conn.peer.as_ref().map(|p| p.namespace.as_str());
    let principal = conn.peer.as_ref().map(|p| {
        format!(
            "{}/ns/{}/sa/{}",
            p.trust_domain, p.namespace, p.service_account
        )
    });
    let principal = principal.as_deref();
    positive(&m.namespaces, |s| string_matches(s, ns))
        && negative(&m.not_namespaces, |s| string_matches(s, ns))
        && positive(&m.principals, |s| string_matches(s, principal))
        && negative(&m.not_principals, |s| string_matches(s, principal))
        && positive(&m.source_ips, |a| cidr_contains(a, conn.src))
        && negative(&m.not_source_ips, |a| cidr_contains(a, conn.src))
        && positive(&m.destination_ips, |a| cidr_contains(a, conn.dst.ip()))
        && negative(&m.not_destination_ips, |a| cidr_contains(a, conn.dst.ip()))
        && positive(&m.destination_ports, |p| *p == u32::from(conn.dst.port()))
        && negative(&m.not_destination_ports, |p| {
            *p == u32::from(conn.dst.port())
        })
}

fn positive<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

fn negative<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    !values.iter().any(f)
}

/// A missing value (no peer identity) matches nothing, not even presence.
fn string_matches(m: &sec::StringMatch, value: Option<&str>) -> bool {
    let Some(v) = value else { return false };
    match &m.match_type {
        Some(MatchType::Exact(e)) => v == e,
        Some(MatchType::Prefix(p)) => v.starts_with(p.as_str()),
        Some(MatchType::Suffix(s)) => v.ends_with(s.as_str()),
        Some(MatchType::Presence(_)) => !v.is_empty(),
        None => false,
    }
}

/// Whether `ip` is inside the CIDR `a`; a malformed address matches nothing.
fn cidr_contains(a: &sec::Address, ip: IpAddr) -> bool {
    match (a.address.len(), ip) {
        (4, IpAddr::V4(v4)) => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&a.address);
            prefix_eq(
                u128::from(u32::from_be_bytes(b)) << 96,
                u128::from(u32::from(v4)) << 96,
                a.length,
                32,
            )
        }
        (16, IpAddr::V6(v6)) => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&a.address);
            prefix_eq(u128::from_be_bytes(b), u128::from(v6), a.length, 128)
        }
        _ => false,
    }
}

/// Compares the top `len` bits of two left-aligned addresses of `max` bits.
fn prefix_eq(a: u128, b: u128, len: u32, max: u32) -> bool {
    if len > max {
        return false;
    }
    if len == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - len);
    a & mask == b & mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn exact(s: &str) -> sec::StringMatch {
        sec::StringMatch {
            match_type: Some(MatchType::Exact(s.into())),
        }
    }
    fn prefix(s: &str) -> sec::StringMatch {
        sec::StringMatch {
            match_type: Some(MatchType::Prefix(s.into())),
        }
    }
    fn suffix(s: &str) -> sec::StringMatch {
        sec::StringMatch {
            match_type: Some(MatchType::Suffix(s.into())),
        }
    }
    fn presence() -> sec::StringMatch {
        sec::StringMatch {
            match_type: Some(MatchType::Presence(())),
        }
    }
    fn cidr(ip: [u8; 4], len: u32) -> sec::Address {
        sec::Address {
            address: ip.to_vec(),
            length: len,
        }
    }

    fn policy(name: &str, action: sec::Action, matches: Vec<sec::Match>) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: "ns".into(),
            scope: sec::Scope::Namespace as i32,
            action: action as i32,
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause { matches }],
            }],
            dry_run: false,
        }
    }

    fn conn(ns: &str, sa: &str, src: [u8; 4], port: u16) -> Connection {
        Connection {
            peer: Some(Identity::new("cluster.local", ns, sa)),
            src: IpAddr::V4(Ipv4Addr::from(src)),
            dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), port),
        }
    }

    fn allowed(policies: &[Authorization], c: &Connection) -> bool {
        evaluate(policies, c).is_allowed()
    }

    fn one(m: sec::Match) -> Vec<Authorization> {
        vec![policy("p", sec::Action::Allow, vec![m])]
    }

    #[test]
    fn no_policies_allow() {
        let v = evaluate(&[], &conn("a", "b", [1, 1, 1, 1], 80));
        assert_eq!(v, Verdict::Allow("no ALLOW policy applies".into()));
    }

    #[test]
    fn namespaces_and_not_namespaces() {
        let c = conn("front", "web", [1, 1, 1, 1], 80);
        let m = |n, nn| sec::Match {
            namespaces: n,
            not_namespaces: nn,
            ..Default::default()
        };
        assert!(allowed(&one(m(vec![exact("front")], vec![])), &c));
        assert!(allowed(
            &one(m(vec![exact("x"), exact("front")], vec![])),
            &c
        ));
        assert!(!allowed(&one(m(vec![exact("back")], vec![])), &c));
        assert!(!allowed(&one(m(vec![], vec![exact("front")])), &c));
        assert!(allowed(&one(m(vec![], vec![exact("back")])), &c));
        assert!(allowed(&one(m(vec![prefix("fr")], vec![])), &c));
        assert!(allowed(&one(m(vec![suffix("ont")], vec![])), &c));
        assert!(allowed(&one(m(vec![presence()], vec![])), &c));
        // Plaintext: no namespace, so nothing matches, not even presence.
        let plain = Connection { peer: None, ..c };
        assert!(!allowed(&one(m(vec![presence()], vec![])), &plain));
        assert!(allowed(&one(m(vec![], vec![exact("front")])), &plain));
    }

    #[test]
    fn principals_and_not_principals() {
        let c = conn("front", "web", [1, 1, 1, 1], 80);
        let m = |p, np| sec::Match {
            principals: p,
            not_principals: np,
            ..Default::default()
        };
        let me = "cluster.local/ns/front/sa/web";
        assert!(allowed(&one(m(vec![exact(me)], vec![])), &c));
        assert!(!allowed(
            &one(m(
                vec![exact("spiffe://cluster.local/ns/front/sa/web")],
                vec![]
            )),
            &c
        ));
        assert!(allowed(&one(m(vec![suffix("/sa/web")], vec![])), &c));
        assert!(!allowed(&one(m(vec![], vec![exact(me)])), &c));
        assert!(allowed(&one(m(vec![], vec![prefix("other.td/")])), &c));
    }

    #[test]
    fn source_ips_and_not_source_ips() {
        let c = conn("a", "b", [10, 1, 2, 3], 80);
        let m = |s, ns| sec::Match {
            source_ips: s,
            not_source_ips: ns,
            ..Default::default()
        };
        assert!(allowed(&one(m(vec![cidr([10, 1, 0, 0], 16)], vec![])), &c));
        assert!(allowed(&one(m(vec![cidr([10, 1, 2, 3], 32)], vec![])), &c));
        assert!(allowed(&one(m(vec![cidr([0, 0, 0, 0], 0)], vec![])), &c));
        assert!(!allowed(&one(m(vec![cidr([10, 2, 0, 0], 16)], vec![])), &c));
        assert!(!allowed(&one(m(vec![], vec![cidr([10, 0, 0, 0], 8)])), &c));
        assert!(allowed(&one(m(vec![], vec![cidr([11, 0, 0, 0], 8)])), &c));
        // An IPv6 CIDR never contains an IPv4 source; a bad length matches nothing.
        let v6 = sec::Address {
            address: vec![0; 16],
            length: 0,
        };
        assert!(!allowed(&one(m(vec![v6], vec![])), &c));
        assert!(!allowed(&one(m(vec![cidr([10, 1, 2, 3], 33)], vec![])), &c));
    }

    #[test]
    fn destination_ips_and_ports() {
        let c = conn("a", "b", [1, 1, 1, 1], 8080);
        let ports = |p: Vec<u32>, np: Vec<u32>| sec::Match {
            destination_ports: p,
            not_destination_ports: np,
            ..Default::default()
        };
        assert!(allowed(&one(ports(vec![80, 8080], vec![])), &c));
        assert!(!allowed(&one(ports(vec![80], vec![])), &c));
        assert!(!allowed(&one(ports(vec![], vec![8080])), &c));
        assert!(allowed(&one(ports(vec![], vec![80])), &c));
        let ips = |d, nd| sec::Match {
            destination_ips: d,
            not_destination_ips: nd,
            ..Default::default()
        };
        assert!(allowed(
            &one(ips(vec![cidr([10, 0, 0, 0], 24)], vec![])),
            &c
        ));
        assert!(!allowed(
            &one(ips(vec![], vec![cidr([10, 0, 0, 9], 32)])),
            &c
        ));
    }

    #[test]
    fn fields_of_a_match_are_anded() {
        let c = conn("front", "web", [10, 0, 0, 1], 80);
        let m = |port| sec::Match {
            namespaces: vec![exact("front")],
            destination_ports: vec![port],
            ..Default::default()
        };
        assert!(allowed(&one(m(80)), &c));
        assert!(!allowed(&one(m(81)), &c));
    }

    #[test]
    fn clauses_anded_matches_ored_rules_ored() {
        let c = conn("front", "web", [10, 0, 0, 1], 80);
        let ns = |n: &str| sec::Match {
            namespaces: vec![exact(n)],
            ..Default::default()
        };
        let port = |p| sec::Match {
            destination_ports: vec![p],
            ..Default::default()
        };
        let rule = |clauses: Vec<Vec<sec::Match>>| sec::Rule {
            clauses: clauses
                .into_iter()
                .map(|matches| sec::Clause { matches })
                .collect(),
        };
        let p = |rules| {
            vec![Authorization {
                name: "p".into(),
                namespace: "ns".into(),
                scope: 0,
                action: 0,
                rules,
                dry_run: false,
            }]
        };
        // One clause, matches OR-ed.
        assert!(allowed(&p(vec![rule(vec![vec![ns("x"), port(80)]])]), &c));
        // Two clauses, AND-ed.
        assert!(!allowed(
            &p(vec![rule(vec![vec![ns("x")], vec![port(80)]])]),
            &c
        ));
        assert!(allowed(
            &p(vec![rule(vec![vec![ns("front")], vec![port(80)]])]),
            &c
        ));
        // Rules OR-ed.
        assert!(allowed(
            &p(vec![rule(vec![vec![ns("x")]]), rule(vec![])]),
            &c
        ));
        // An ALLOW policy without rules allows nothing.
        assert!(!allowed(&p(vec![]), &c));
    }

    #[test]
    fn deny_wins_over_allow_and_reasons_name_policies() {
        let c = conn("front", "web", [10, 0, 0, 1], 80);
        let front = sec::Match {
            namespaces: vec![exact("front")],
            ..Default::default()
        };
        let other = sec::Match {
            namespaces: vec![exact("other")],
            ..Default::default()
        };
        let allow = policy("allow-front", sec::Action::Allow, vec![front.clone()]);
        let deny = policy("deny-front", sec::Action::Deny, vec![front]);
        let deny_other = policy("deny-other", sec::Action::Deny, vec![other.clone()]);
        let allow_other = policy("allow-other", sec::Action::Allow, vec![other]);
        assert_eq!(
            evaluate(&[allow.clone(), deny], &c),
            Verdict::Deny("denied by policy ns/deny-front".into())
        );
        assert_eq!(
            evaluate(std::slice::from_ref(&deny_other), &c),
            Verdict::Allow("no ALLOW policy applies".into())
        );
        assert_eq!(
            evaluate(&[allow_other.clone(), deny_other], &c),
            Verdict::Deny("no ALLOW policy matched (1 apply)".into())
        );
        assert_eq!(
            evaluate(&[allow_other, allow], &c),
            Verdict::Allow("allowed by policy ns/allow-front".into())
        );
    }
}
