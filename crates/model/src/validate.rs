use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use crate::{Resource, PROTOCOLS};

/// One problem with one field, named by its path (`spec.ports[1].port`) and the bad value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub value: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?} {}", self.field, self.value, self.message)
    }
}

/// Every problem found in a resource, so a user fixes them all in one go.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub resource: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is invalid: ", self.resource)?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(
        &mut self,
        field: impl Into<String>,
        value: impl fmt::Display,
        message: impl Into<String>,
    ) {
        self.0.push(FieldError {
            field: field.into(),
            value: value.to_string(),
            message: message.into(),
        });
    }

    fn check(&mut self, field: &str, value: &str, problem: Option<String>) {
        if let Some(p) = problem {
            self.add(field, value, p);
        }
    }
}

/// DNS-1123 label: what service names and namespaces must be, since they become hostnames.
pub fn dns_label_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    if s.len() > 63 {
        return Some(format!("is {} characters long; the limit is 63", s.len()));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some(
            "must consist of lower-case letters, digits and '-' (a DNS-1123 label)".into(),
        );
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some("must start and end with a letter or digit".into());
    }
    None
}

/// DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn dns_subdomain_problem(s: &str) -> Option<String> {
    if s.len() > 253 {
        return Some(format!("is {} characters long; the limit is 253", s.len()));
    }
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    s.split('.')
        .find_map(dns_label_problem)
        .map(|_| "must be lower-case letters, digits, '-' and '.', each part starting and ending with a letter or digit (a DNS-1123 subdomain)".into())
}

fn label_name_problem(s: &str) -> Option<String> {
    if s.is_empty() || s.len() > 63 {
        return Some("must be 1 to 63 characters".into());
    }
    let ok_edge = |b: u8| b.is_ascii_alphanumeric();
    let bytes = s.as_bytes();
    if !ok_edge(bytes[0]) || !ok_edge(bytes[bytes.len() - 1]) {
        return Some("must start and end with a letter or digit".into());
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Some("may contain only letters, digits, '-', '_' and '.'".into());
    }
    None
}

/// Kubernetes label key: `[prefix/]name`.
pub fn label_key_problem(k: &str) -> Option<String> {
    match k.split_once('/') {
        Some((prefix, name)) => dns_subdomain_problem(prefix)
            .map(|p| format!("prefix {p}"))
            .or_else(|| label_name_problem(name)),
        None => label_name_problem(k),
    }
}

/// Kubernetes label value: empty, or a label name.
pub fn label_value_problem(v: &str) -> Option<String> {
    if v.is_empty() {
        None
    } else {
        label_name_problem(v)
    }
}

fn port_problem(p: u32) -> Option<String> {
    (!(1..=65535).contains(&p)).then(|| "is out of range; a port is 1 to 65535".into())
}

fn check_labels(errs: &mut Errors, path: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        errs.check(
            &format!("{path}[{k}]"),
            k,
            label_key_problem(k).map(|p| format!("label key {p}")),
        );
        errs.check(
            &format!("{path}[{k}]"),
            v,
            label_value_problem(v).map(|p| format!("label value {p}")),
        );
    }
}

fn check_annotations(errs: &mut Errors, path: &str, ann: &BTreeMap<String, String>) {
    for k in ann.keys() {
        errs.check(
            &format!("{path}[{k}]"),
            k,
            label_key_problem(k).map(|p| format!("annotation key {p}")),
        );
    }
    let size: usize = ann.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > 256 * 1024 {
        errs.add(
            path,
            format!("{size} bytes"),
            "annotations may total at most 256 KiB",
        );
    }
}

fn check_port_map(errs: &mut Errors, path: &str, ports: &BTreeMap<String, u32>) {
    for (name, p) in ports {
        errs.check(
            &format!("{path}[{name}]"),
            name,
            dns_label_problem(name).map(|m| format!("port name {m}")),
        );
        errs.check(&format!("{path}[{name}]"), &p.to_string(), port_problem(*p));
    }
}

/// Checks everything a resource must satisfy on its own (not against other resources).
pub fn validate(r: &Resource) -> Result<(), ValidationError> {
    let mut errs = Errors::default();
    let m = r.meta();
    match r {
        Resource::Service(_) => errs.check("metadata.name", &m.name, dns_label_problem(&m.name)),
        _ => errs.check("metadata.name", &m.name, dns_subdomain_problem(&m.name)),
    }
    errs.check(
        "metadata.namespace",
        &m.namespace,
        dns_label_problem(&m.namespace),
    );
    check_labels(&mut errs, "metadata.labels", &m.labels);
    check_annotations(&mut errs, "metadata.annotations", &m.annotations);
    match r {
        Resource::Service(s) => {
            let mut names = BTreeSet::new();
            let mut numbers = BTreeSet::new();
            for (i, p) in s.spec.ports.iter().enumerate() {
                let at = |f: &str| format!("spec.ports[{i}].{f}");
                errs.check(&at("name"), &p.name, dns_label_problem(&p.name));
                if !names.insert(p.name.as_str()) {
                    errs.add(
                        at("name"),
                        &p.name,
                        "is used by another port of this service; port names must be unique",
                    );
                }
                errs.check(&at("port"), &p.port.to_string(), port_problem(p.port));
                let proto = p.protocol();
                if !numbers.insert((p.port, proto == "UDP")) {
                    errs.add(
                        at("port"),
                        p.port,
                        "is used by another port of this service",
                    );
                }
                if let Some(t) = p.target_port {
                    errs.check(&at("targetPort"), &t.to_string(), port_problem(t));
                }
                if !PROTOCOLS.contains(&proto) {
                    errs.add(
                        at("protocol"),
                        proto,
                        format!(
                            "is not a known protocol (expected one of {})",
                            PROTOCOLS.join(", ")
                        ),
                    );
                }
            }
            if let Some(sel) = &s.spec.selector {
                check_labels(&mut errs, "spec.selector", sel);
            }
            if let Some(vip) = s.status.vip {
                let _ = vip; // set by the server; any address is syntactically fine
            }
        }
        Resource::WorkloadEntry(w) => {
            let a = &w.spec.address;
            if a.parse::<IpAddr>().is_err() {
                errs.add("spec.address", a, "is not an IPv4 or IPv6 address");
            }
            check_port_map(&mut errs, "spec.ports", &w.spec.ports);
            check_labels(&mut errs, "spec.labels", &w.spec.labels);
            if !w.spec.service_account.is_empty() {
                errs.check(
                    "spec.serviceAccount",
                    &w.spec.service_account,
                    dns_subdomain_problem(&w.spec.service_account),
                );
            }
            for (i, s) in w.spec.services.iter().enumerate() {
                errs.check(&format!("spec.services[{i}]"), s, dns_label_problem(s));
            }
            if !w.spec.network.is_empty() {
                errs.check(
                    "spec.network",
                    &w.spec.network,
                    label_name_problem(&w.spec.network),
                );
            }
        }
        Resource::PeerAuthentication(p) => {
            if let Some(sel) = &p.spec.selector {
                check_labels(&mut errs, "spec.selector.matchLabels", &sel.match_labels);
            }
            match p.spec.mode() {
                "STRICT" | "PERMISSIVE" | "UNSET" => {}
                "DISABLE" => errs.add(
                    "spec.mtls.mode",
                    "DISABLE",
                    "is not supported: Isthmus always offers mTLS between workloads",
                ),
                other => errs.add(
                    "spec.mtls.mode",
                    other,
                    "must be STRICT, PERMISSIVE or UNSET",
                ),
            }
        }
        Resource::AuthorizationPolicy(p) => {
            let spec = &p.spec;
            if let Some(sel) = &spec.selector {
                check_labels(&mut errs, "spec.selector.matchLabels", &sel.match_labels);
            }
            match spec.action() {
                "ALLOW" | "DENY" => {}
                other @ ("AUDIT" | "CUSTOM") => errs.add(
                    "spec.action",
                    other,
                    "is not supported: Isthmus enforces ALLOW and DENY",
                ),
                other => errs.add("spec.action", other, "must be ALLOW or DENY"),
            }
            for (i, rule) in spec.rules.iter().enumerate() {
                for (j, from) in rule.from.iter().enumerate() {
                    let at = |f: &str| format!("spec.rules[{i}].from[{j}].source.{f}");
                    let src = &from.source;
                    for (f, list) in [
                        ("ipBlocks", &src.ip_blocks),
                        ("notIpBlocks", &src.not_ip_blocks),
                    ] {
                        for v in list {
                            if v.parse::<ipnet::IpNet>().is_err() && v.parse::<IpAddr>().is_err() {
                                errs.add(at(f), v, "is not an IP address or CIDR");
                            }
                        }
                    }
                    for (f, list) in [
                        ("principals", &src.principals),
                        ("notPrincipals", &src.not_principals),
                        ("namespaces", &src.namespaces),
                        ("notNamespaces", &src.not_namespaces),
                    ] {
                        for v in list {
                            if v.is_empty() || v.trim_matches('*').contains('*') {
                                errs.add(
                                    at(f),
                                    v,
                                    "must be non-empty, with `*` only at the start or the end",
                                );
                            }
                        }
                    }
                }
                for (j, to) in rule.to.iter().enumerate() {
                    for (f, list) in [
                        ("ports", &to.operation.ports),
                        ("notPorts", &to.operation.not_ports),
                    ] {
                        for v in list {
                            if !v.parse::<u32>().is_ok_and(|p| port_problem(p).is_none()) {
                                errs.add(
                                    format!("spec.rules[{i}].to[{j}].operation.{f}"),
                                    v,
                                    "is not a port from 1 to 65535",
                                );
                            }
                        }
                    }
                }
            }
        }
        Resource::WorkloadGroup(g) => {
            check_labels(&mut errs, "spec.metadata.labels", &g.spec.metadata.labels);
            check_annotations(
                &mut errs,
                "spec.metadata.annotations",
                &g.spec.metadata.annotations,
            );
            let t = &g.spec.template;
            check_port_map(&mut errs, "spec.template.ports", &t.ports);
            check_labels(&mut errs, "spec.template.labels", &t.labels);
            if !t.service_account.is_empty() {
                errs.check(
                    "spec.template.serviceAccount",
                    &t.service_account,
                    dns_subdomain_problem(&t.service_account),
                );
            }
            if !t.network.is_empty() {
                errs.check(
                    "spec.template.network",
                    &t.network,
                    label_name_problem(&t.network),
                );
            }
            if let Some(p) = &g.spec.probe {
                match (&p.http_get, &p.tcp_socket) {
                    (Some(h), None) => {
                        errs.check(
                            "spec.probe.httpGet.port",
                            &h.port.to_string(),
                            port_problem(h.port),
                        );
                        if !h.path.is_empty() && !h.path.starts_with('/') {
                            errs.add("spec.probe.httpGet.path", &h.path, "must start with '/'");
                        }
                        if !matches!(h.scheme.as_str(), "" | "HTTP" | "HTTPS") {
                            errs.add(
                                "spec.probe.httpGet.scheme",
                                &h.scheme,
                                "must be HTTP or HTTPS",
                            );
                        }
                    }
                    (None, Some(t)) => errs.check(
                        "spec.probe.tcpSocket.port",
                        &t.port.to_string(),
                        port_problem(t.port),
                    ),
                    _ => errs.add(
                        "spec.probe",
                        "",
                        "must have exactly one of httpGet or tcpSocket",
                    ),
                }
                for (f, v) in [
                    ("periodSeconds", p.period_seconds),
                    ("timeoutSeconds", p.timeout_seconds),
                    ("successThreshold", p.success_threshold),
                    ("failureThreshold", p.failure_threshold),
                ] {
                    if v == Some(0) {
                        errs.add(format!("spec.probe.{f}"), 0, "must be at least 1");
                    }
                }
                if p.timeout() > p.period() {
                    errs.add(
                        "spec.probe.timeoutSeconds",
                        p.timeout(),
                        format!("must not exceed periodSeconds ({})", p.period()),
                    );
                }
            }
        }
    }
    if errs.0.is_empty() {
        Ok(())
    } else {
        Err(ValidationError {
            resource: r.id(),
            errors: errs.0,
        })
    }
}
