//! Istio authorization per request, on HTTP ports: the whole AuthorizationPolicy (sources,
//! ports, methods, hosts, paths, `when` conditions), evaluated as Istio does: a matching DENY
//! denies; otherwise, when ALLOW policies apply, one must match; otherwise allowed. Pure
//! functions, tested without sockets.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use isthmus_model::{AuthorizationPolicy, PolicyCondition, PolicyOperation, PolicySource};
use isthmus_xds::client::{State, Workload};
use isthmus_xds::Identity;

use crate::proxy::authz::Verdict;

/// Istio's root namespace: its policies without a selector apply mesh-wide.
const ROOT_NAMESPACE: &str = "istio-system";

/// What a per-request policy is matched against.
pub struct HttpRequest<'a> {
    pub peer: Option<&'a Identity>,
    pub src: IpAddr,
    pub port: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: Headers<'a>,
}

/// A request's header fields: parsed into a map (hyper's side), or as the HTTP/1.1 relay's
/// parser left them in the message head ([`super::relay`]).
#[derive(Clone, Copy)]
pub enum Headers<'a> {
    Map(&'a HeaderMap),
    Raw(&'a [httparse::Header<'a>]),
}

impl<'a> Headers<'a> {
    /// The first value of the field `name` (any case), if it is text (as
    /// `HeaderMap::get(name)?.to_str()`).
    pub fn first(&self, name: &str) -> Option<&'a str> {
        match *self {
            Headers::Map(m) => m.get(name)?.to_str().ok(),
            Headers::Raw(h) => {
                let v = h.iter().find(|h| h.name.eq_ignore_ascii_case(name))?.value;
                if v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
                    std::str::from_utf8(v).ok()
                } else {
                    None
                }
            }
        }
    }

    /// Every value of the field `name` (any case) that is text, in order.
    fn values(&self, name: &str) -> Vec<String> {
        // As `HeaderValue::to_str`: visible ASCII, spaces and tabs only.
        let text = |v: &[u8]| {
            v.iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
                .then(|| String::from_utf8_lossy(v).trim().to_owned())
        };
        match self {
            Headers::Map(m) => m
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::to_owned)
                .collect(),
            Headers::Raw(h) => h
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .filter_map(|h| text(h.value))
                .collect(),
        }
    }
}

/// The policies that apply to `workload`: the root namespace's without a selector, its
/// namespace's without a selector, and the ones that select it (listed on the workload).
pub fn applicable<'a>(state: &'a State, workload: &Workload) -> Vec<&'a Arc<AuthorizationPolicy>> {
    let mut out: Vec<&Arc<AuthorizationPolicy>> = state
        .http_policies()
        .filter(|p| {
            // `namespace/name`, compared without building it: this runs at every request.
            let (ns, name) = (&p.metadata.namespace, &p.metadata.name);
            match &p.spec.selector {
                Some(_) => workload
                    .authorization_policies
                    .iter()
                    .any(|n| n.split_once('/') == Some((ns.as_str(), name.as_str()))),
                None => {
                    p.metadata.namespace == ROOT_NAMESPACE
                        || p.metadata.namespace == workload.namespace
                }
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    out
}

pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Arc<AuthorizationPolicy>>,
    req: &HttpRequest,
) -> Verdict {
    let mut allows = 0usize;
    let mut allowed_by = None;
    for p in policies {
        let name = || format!("{}/{}", p.metadata.namespace, p.metadata.name);
        let matched = p.spec.rules.iter().any(|r| {
            (r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, req)))
                && (r.to.is_empty() || r.to.iter().any(|t| operation_matches(&t.operation, req)))
                && r.when.iter().all(|c| condition_holds(c, req))
        });
        if p.spec.action() == "DENY" {
            if matched {
                return Verdict::Deny(format!("denied by policy {}", name()));
            }
        } else {
            allows += 1;
            if matched && allowed_by.is_none() {
                allowed_by = Some(name());
            }
        }
    }
    match (allows, allowed_by) {
        (0, _) => Verdict::Allow("no ALLOW policy applies".into()),
        (_, Some(n)) => Verdict::Allow(format!("allowed by policy {n}")),
        (n, None) => Verdict::Deny(format!("no ALLOW policy matched ({n} apply)")),
    }
}

/// Istio's string forms: exact, `prefix*`, `*suffix`, `*`.
fn wildcard(pattern: &str, v: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(p) = pattern.strip_suffix('*') {
        return v.starts_with(p);
    }
    if let Some(s) = pattern.strip_prefix('*') {
        return v.ends_with(s);
    }
    pattern == v
}

fn any_of(list: &[String], f: impl Fn(&str) -> bool) -> bool {
    list.iter().any(|p| f(p))
}

/// A positive list matches when empty or when a value matches; a negative list when none does.
fn fits(yes: &[String], no: &[String], f: impl Fn(&str) -> bool) -> bool {
    (yes.is_empty() || any_of(yes, &f)) && !any_of(no, &f)
}

fn principal(req: &HttpRequest) -> Option<String> {
    req.peer.map(|p| {
        format!(
            "{}/ns/{}/sa/{}",
            p.trust_domain, p.namespace, p.service_account
        )
    })
}

fn in_block(block: &str, ip: IpAddr) -> bool {
    match block.parse::<ipnet::IpNet>() {
        Ok(net) => net.contains(&ip),
        Err(_) => block.parse::<IpAddr>().is_ok_and(|b| b == ip),
    }
}

fn source_matches(s: &PolicySource, req: &HttpRequest) -> bool {
    let principal = principal(req);
    let ns = req.peer.map(|p| p.namespace.as_str());
    // A value that is absent (plaintext: no identity) matches no pattern.
    let p_ok = |pat: &str| principal.as_deref().is_some_and(|v| wildcard(pat, v));
    let ns_ok = |pat: &str| ns.is_some_and(|v| wildcard(pat, v));
    fits(&s.principals, &s.not_principals, p_ok)
        && fits(&s.namespaces, &s.not_namespaces, ns_ok)
        && fits(&s.ip_blocks, &s.not_ip_blocks, |b| in_block(b, req.src))
}

fn operation_matches(o: &PolicyOperation, req: &HttpRequest) -> bool {
    let host = req
        .host
        .split(':')
        .next()
        .unwrap_or(req.host)
        .to_ascii_lowercase();
    fits(&o.ports, &o.not_ports, |p| p.parse::<u16>() == Ok(req.port))
        && fits(&o.methods, &o.not_methods, |m| wildcard(m, req.method))
        && fits(&o.hosts, &o.not_hosts, |h| {
            wildcard(&h.to_ascii_lowercase(), &host)
        })
        && fits(&o.paths, &o.not_paths, |p| wildcard(p, req.path))
}

fn condition_holds(c: &PolicyCondition, req: &HttpRequest) -> bool {
    let values: Vec<String> = match c.key.as_str() {
        "source.principal" => principal(req).into_iter().collect(),
        "source.namespace" => req.peer.map(|p| p.namespace.clone()).into_iter().collect(),
        "source.ip" => vec![req.src.to_string()],
        "destination.port" => vec![req.port.to_string()],
        key => match key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
        {
            Some(h) => req.headers.values(h),
            // Refused at apply; fail closed if one arrives anyway.
            None => return false,
        },
    };
    let test = |pat: &str| {
        values.iter().any(|v| {
            if c.key == "source.ip" {
                in_block(pat, req.src)
            } else {
                wildcard(pat, v)
            }
        })
    };
    (c.values.is_empty() || c.values.iter().any(|p| test(p)))
        && !c.not_values.iter().any(|p| test(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Arc<AuthorizationPolicy> {
        let doc = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: bookinfo}}\n{yaml}"
        );
        match isthmus_model::parse_documents(&doc).unwrap().remove(0) {
            isthmus_model::Resource::AuthorizationPolicy(p) => Arc::new(p),
            _ => unreachable!(),
        }
    }

    fn check(p: &Arc<AuthorizationPolicy>, method: &str, path: &str, user: Option<&str>) -> bool {
        let id = Identity::new("cluster.local", "bookinfo", "productpage");
        let mut h = HeaderMap::new();
        if let Some(u) = user {
            h.insert("end-user", u.parse().unwrap());
        }
        evaluate(
            [p],
            &HttpRequest {
                peer: Some(&id),
                src: "10.0.0.1".parse().unwrap(),
                port: 9080,
                method,
                path,
                host: "reviews:9080",
                headers: Headers::Map(&h),
            },
        )
        .is_allowed()
    }

    #[test]
    fn deny_by_path_refuses_that_path_only() {
        let p = policy(
            "spec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin*, '*/secret'], methods: [POST, DELETE]}}]\n",
        );
        assert!(!check(&p, "POST", "/admin/users", None));
        assert!(!check(&p, "DELETE", "/x/secret", None));
        assert!(check(&p, "GET", "/admin/users", None), "GET is not listed");
        assert!(check(&p, "POST", "/reviews/1", None));
    }

    #[test]
    fn allow_needs_a_match_and_conditions_on_headers_and_principal() {
        let p = policy(
            "spec:\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/productpage]}}]\n    to: [{operation: {methods: [GET], hosts: ['reviews*'], ports: ['9080']}}]\n    when: [{key: 'request.headers[end-user]', values: [jason]}]\n",
        );
        assert!(check(&p, "GET", "/", Some("jason")));
        assert!(!check(&p, "GET", "/", Some("alice")), "when on a header");
        assert!(!check(&p, "GET", "/", None));
        assert!(!check(&p, "PUT", "/", Some("jason")), "method not allowed");
        let other =
            policy("spec:\n  rules:\n  - from: [{source: {principals: ['*/sa/ratings']}}]\n");
        assert!(
            !check(&other, "GET", "/", Some("jason")),
            "another principal"
        );
        let not =
            policy("spec:\n  rules:\n  - when: [{key: source.namespace, notValues: [bookinfo]}]\n");
        assert!(!check(&not, "GET", "/", None));
    }
}
