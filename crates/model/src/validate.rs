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
                    let op = &to.operation;
                    for (f, list) in [
                        ("methods", &op.methods),
                        ("notMethods", &op.not_methods),
                        ("hosts", &op.hosts),
                        ("notHosts", &op.not_hosts),
                        ("paths", &op.paths),
                        ("notPaths", &op.not_paths),
                    ] {
                        for v in list {
                            if v.is_empty() || v.trim_matches('*').contains('*') {
                                errs.add(
                                    format!("spec.rules[{i}].to[{j}].operation.{f}"),
                                    v,
                                    "must be non-empty, with `*` only at the start or the end",
                                );
                            }
                        }
                    }
                }
                for (j, c) in rule.when.iter().enumerate() {
                    let at = format!("spec.rules[{i}].when[{j}]");
                    let known = c.key.starts_with("request.headers[") && c.key.ends_with(']')
                        || matches!(
                            c.key.as_str(),
                            "source.principal"
                                | "source.namespace"
                                | "source.ip"
                                | "destination.port"
                        );
                    if !known {
                        errs.add(
                            format!("{at}.key"),
                            &c.key,
                            "is not a condition Isthmus evaluates: use request.headers[<name>], source.principal, source.namespace, source.ip or destination.port (request.auth.* needs RequestAuthentication, which is not supported)",
                        );
                    }
                    if c.values.is_empty() && c.not_values.is_empty() {
                        errs.add(&at, &c.key, "must have values or notValues");
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
        Resource::VirtualService(vs) => check_virtual_service(&mut errs, &vs.spec),
        Resource::DestinationRule(dr) => check_destination_rule(&mut errs, &dr.spec),
        Resource::HttpRoute(r) => {
            check_parents(&mut errs, &r.spec.parent_refs);
            // The conversion names what it cannot express; its result is then checked as
            // a VirtualService's routes are.
            match crate::gateway::http_routes(&r.spec, &m.namespace, None) {
                Err(e) => errs.add("spec", "", e),
                Ok(routes) => check_converted(&mut errs, routes),
            }
        }
        Resource::GrpcRoute(r) => {
            check_parents(&mut errs, &r.spec.parent_refs);
            match crate::gateway::grpc_routes(&r.spec, &m.namespace, None) {
                Err(e) => errs.add("spec", "", e),
                Ok(routes) => check_converted(&mut errs, routes),
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

/// A service host as routes name it: `reviews`, `reviews.ns` or the full name.
fn host_problem(h: &str) -> Option<String> {
    if h.contains('*') {
        return Some("wildcard hosts are not supported: name one service".into());
    }
    dns_subdomain_problem(h)
}

fn check_duration(errs: &mut Errors, path: &str, d: &Option<String>) {
    if let Some(d) = d {
        if let Err(p) = crate::traffic::parse_duration(d) {
            errs.add(path, d, p);
        }
    }
}

fn check_percent(errs: &mut Errors, path: &str, p: &Option<crate::traffic::Percent>) {
    if let Some(p) = p {
        if !(0.0..=100.0).contains(&p.value) {
            errs.add(
                format!("{path}.value"),
                p.value,
                "must be 0 to 100 (a percentage)",
            );
        }
    }
}

fn header_name_problem(h: &str) -> Option<String> {
    if h.is_empty()
        || !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:".contains(&b))
    {
        return Some("is not an HTTP header name".into());
    }
    None
}

fn check_string_match(errs: &mut Errors, path: &str, m: &crate::traffic::StringMatch) {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        errs.add(
            path,
            format!("{set} of exact/prefix/regex"),
            "must set exactly one of exact, prefix or regex",
        );
    }
    if let Some(r) = &m.regex {
        if let Err(e) = regex::RegexBuilder::new(&format!("^(?:{r})$"))
            .size_limit(1 << 20)
            .build()
        {
            let msg = e.to_string();
            let last = msg.lines().last().unwrap_or(&msg).trim().to_string();
            errs.add(
                format!("{path}.regex"),
                r,
                format!("is not a valid regular expression (RE2 syntax): {last}"),
            );
        }
    }
}

fn check_destination(errs: &mut Errors, path: &str, d: &crate::traffic::Destination) {
    errs.check(&format!("{path}.host"), &d.host, host_problem(&d.host));
    if !d.subset.is_empty() {
        errs.check(
            &format!("{path}.subset"),
            &d.subset,
            dns_label_problem(&d.subset),
        );
    }
    if let Some(p) = &d.port {
        errs.check(
            &format!("{path}.port.number"),
            &p.number.to_string(),
            port_problem(p.number),
        );
    }
}

fn check_headers(errs: &mut Errors, path: &str, h: &Option<crate::traffic::Headers>) {
    let Some(h) = h else { return };
    for (side, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        for (kind, names) in [
            ("set", ops.set.keys().collect::<Vec<_>>()),
            ("add", ops.add.keys().collect()),
            ("remove", ops.remove.iter().collect()),
        ] {
            for n in names {
                errs.check(
                    &format!("{path}.{side}.{kind}[{n}]"),
                    n,
                    header_name_problem(n),
                );
            }
        }
    }
}

fn check_virtual_service(errs: &mut Errors, spec: &crate::traffic::VirtualServiceSpec) {
    if spec.hosts.is_empty() {
        errs.add(
            "spec.hosts",
            "[]",
            "must name at least one service (e.g. reviews)",
        );
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        errs.check(&format!("spec.hosts[{i}]"), h, host_problem(h));
    }
    for (i, g) in spec.gateways.iter().enumerate() {
        if g != "mesh" {
            errs.add(
                format!("spec.gateways[{i}]"),
                g,
                "is not supported: Isthmus routes mesh traffic only (use mesh, or leave gateways out)",
            );
        }
    }
    if spec.http.is_empty() {
        errs.add(
            "spec.http",
            "[]",
            "must have at least one route (Isthmus routes HTTP; tcp and tls routes are not supported)",
        );
    }
    for (i, r) in spec.http.iter().enumerate() {
        let path = format!("spec.http[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            for (name, sm) in [
                ("uri", &m.uri),
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    check_string_match(errs, &format!("{mp}.{name}"), sm);
                }
            }
            for (kind, map) in [
                ("headers", &m.headers),
                ("withoutHeaders", &m.without_headers),
            ] {
                for (h, sm) in map {
                    let hp = format!("{mp}.{kind}[{h}]");
                    errs.check(&hp, h, header_name_problem(h));
                    if h.bytes().any(|b| b.is_ascii_uppercase()) {
                        errs.add(&hp, h, "must be lower case, as Istio requires");
                    }
                    check_string_match(errs, &hp, sm);
                }
            }
            for (q, sm) in &m.query_params {
                check_string_match(errs, &format!("{mp}.queryParams[{q}]"), sm);
            }
            if let Some(p) = m.port {
                errs.check(&format!("{mp}.port"), &p.to_string(), port_problem(p));
            }
            check_labels(errs, &format!("{mp}.sourceLabels"), &m.source_labels);
        }
        let actions = [
            !r.route.is_empty(),
            r.redirect.is_some(),
            r.direct_response.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if actions != 1 {
            errs.add(
                &path,
                format!("{actions} of route/redirect/directResponse"),
                "must have exactly one of route, redirect or directResponse",
            );
        }
        if r.route.len() > 1 || r.route.iter().any(|d| d.weight.is_some()) {
            let weights: Vec<u32> = r.route.iter().map(|d| d.weight.unwrap_or(0)).collect();
            let sum: u32 = weights.iter().sum();
            if sum != 100 {
                errs.add(
                    format!("{path}.route[*].weight"),
                    format!("{weights:?} = {sum}"),
                    "must add up to 100",
                );
            }
        }
        for (j, d) in r.route.iter().enumerate() {
            let dp = format!("{path}.route[{j}]");
            check_destination(errs, &format!("{dp}.destination"), &d.destination);
            check_headers(errs, &format!("{dp}.headers"), &d.headers);
        }
        if let Some(rd) = &r.redirect {
            if let Some(code) = rd.redirect_code {
                if ![301, 302, 303, 307, 308].contains(&code) {
                    errs.add(
                        format!("{path}.redirect.redirectCode"),
                        code,
                        "must be 301, 302, 303, 307 or 308",
                    );
                }
            }
            if let Some(a) = &rd.authority {
                errs.check(
                    &format!("{path}.redirect.authority"),
                    a,
                    dns_subdomain_problem(a.split(':').next().unwrap_or(a)),
                );
            }
        }
        if let Some(d) = &r.direct_response {
            if !(200..=599).contains(&d.status) {
                errs.add(
                    format!("{path}.directResponse.status"),
                    d.status,
                    "must be an HTTP status, 200 to 599",
                );
            }
        }
        if let Some(rw) = &r.rewrite {
            if let Some(u) = &rw.uri {
                if !u.starts_with('/') && !u.is_empty() {
                    errs.add(format!("{path}.rewrite.uri"), u, "must start with /");
                }
            }
        }
        check_duration(errs, &format!("{path}.timeout"), &r.timeout);
        if let Some(rt) = &r.retries {
            if rt.attempts > 25 {
                errs.add(
                    format!("{path}.retries.attempts"),
                    rt.attempts,
                    "is more than 25; the retry budget caps retries anyway",
                );
            }
            check_duration(
                errs,
                &format!("{path}.retries.perTryTimeout"),
                &rt.per_try_timeout,
            );
            if let Some(on) = &rt.retry_on {
                for c in on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                    let code_ok = c.parse::<u16>().is_ok_and(|n| (100..=599).contains(&n));
                    if !code_ok && !crate::traffic::RETRY_ON.contains(&c) {
                        errs.add(
                            format!("{path}.retries.retryOn"),
                            c,
                            format!(
                                "is not a retry condition; use {} or a status code",
                                crate::traffic::RETRY_ON.join(", ")
                            ),
                        );
                    }
                }
            }
        }
        if let Some(f) = &r.fault {
            if let Some(d) = &f.delay {
                check_duration(
                    errs,
                    &format!("{path}.fault.delay.fixedDelay"),
                    &Some(d.fixed_delay.clone()),
                );
                check_percent(
                    errs,
                    &format!("{path}.fault.delay.percentage"),
                    &d.percentage,
                );
            }
            if let Some(a) = &f.abort {
                match (a.http_status, &a.grpc_status) {
                    (Some(s), None) if (200..=599).contains(&s) => {}
                    (Some(s), None) => errs.add(
                        format!("{path}.fault.abort.httpStatus"),
                        s,
                        "must be an HTTP status, 200 to 599",
                    ),
                    (None, Some(g)) if grpc_code(g).is_some() => {}
                    (None, Some(g)) => errs.add(
                        format!("{path}.fault.abort.grpcStatus"),
                        g,
                        "is not a gRPC status name (e.g. UNAVAILABLE)",
                    ),
                    _ => errs.add(
                        format!("{path}.fault.abort"),
                        "",
                        "must set exactly one of httpStatus or grpcStatus",
                    ),
                }
                check_percent(
                    errs,
                    &format!("{path}.fault.abort.percentage"),
                    &a.percentage,
                );
            }
        }
        if let Some(m) = &r.mirror {
            check_destination(errs, &format!("{path}.mirror"), m);
        }
        check_percent(
            errs,
            &format!("{path}.mirrorPercentage"),
            &r.mirror_percentage,
        );
        check_headers(errs, &format!("{path}.headers"), &r.headers);
    }
}

/// gRPC status names, as `grpcStatus` takes them, to their codes.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

fn check_traffic_policy(errs: &mut Errors, path: &str, tp: &crate::traffic::TrafficPolicy) {
    if let Some(lb) = &tp.load_balancer {
        let lp = format!("{path}.loadBalancer");
        if let Some(s) = &lb.simple {
            if ![
                "ROUND_ROBIN",
                "LEAST_REQUEST",
                "RANDOM",
                "UNSPECIFIED",
                "LEAST_CONN",
            ]
            .contains(&s.as_str())
            {
                errs.add(
                    format!("{lp}.simple"),
                    s,
                    "must be ROUND_ROBIN, LEAST_REQUEST, RANDOM or UNSPECIFIED",
                );
            }
        }
        if let Some(ch) = &lb.consistent_hash {
            if lb.simple.is_some() {
                errs.add(
                    &lp,
                    "simple and consistentHash",
                    "must set only one of them",
                );
            }
            let set = [
                ch.http_header_name.is_some(),
                ch.use_source_ip == Some(true),
                ch.http_query_parameter_name.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if set != 1 {
                errs.add(
                    format!("{lp}.consistentHash"),
                    set,
                    "must set exactly one of httpHeaderName, useSourceIp or httpQueryParameterName",
                );
            }
            if let Some(h) = &ch.http_header_name {
                errs.check(
                    &format!("{lp}.consistentHash.httpHeaderName"),
                    h,
                    header_name_problem(h),
                );
            }
        }
    }
    if let Some(cp) = &tp.connection_pool {
        if let Some(h) = &cp.http {
            check_duration(
                errs,
                &format!("{path}.connectionPool.http.idleTimeout"),
                &h.idle_timeout,
            );
        }
        if let Some(t) = &cp.tcp {
            check_duration(
                errs,
                &format!("{path}.connectionPool.tcp.connectTimeout"),
                &t.connect_timeout,
            );
        }
    }
    if let Some(od) = &tp.outlier_detection {
        let op = format!("{path}.outlierDetection");
        check_duration(errs, &format!("{op}.interval"), &od.interval);
        check_duration(
            errs,
            &format!("{op}.baseEjectionTime"),
            &od.base_ejection_time,
        );
        if let Some(p) = od.max_ejection_percent {
            if p > 100 {
                errs.add(
                    format!("{op}.maxEjectionPercent"),
                    p,
                    "must be 0 to 100 (a percentage)",
                );
            }
        }
    }
}

fn check_destination_rule(errs: &mut Errors, spec: &crate::traffic::DestinationRuleSpec) {
    errs.check("spec.host", &spec.host, host_problem(&spec.host));
    if let Some(tp) = &spec.traffic_policy {
        check_traffic_policy(errs, "spec.trafficPolicy", tp);
    }
    let mut seen = BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        errs.check(&format!("{path}.name"), &s.name, dns_label_problem(&s.name));
        if !seen.insert(s.name.as_str()) {
            errs.add(format!("{path}.name"), &s.name, "is given twice");
        }
        check_labels(errs, &format!("{path}.labels"), &s.labels);
        if let Some(tp) = &s.traffic_policy {
            check_traffic_policy(errs, &format!("{path}.trafficPolicy"), tp);
        }
    }
}

fn check_parents(errs: &mut Errors, parents: &[crate::gateway::ParentRef]) {
    if parents.is_empty() {
        errs.add(
            "spec.parentRefs",
            "[]",
            "must name the Service the routes are for ({kind: Service, name: reviews})",
        );
    }
    for (i, p) in parents.iter().enumerate() {
        if !p.is_service() {
            errs.add(
                format!("spec.parentRefs[{i}]"),
                format!("{}/{}", p.kind.as_deref().unwrap_or("Gateway"), p.name),
                "is not a Service: Isthmus routes mesh traffic (the GAMMA profile: parentRefs with group \"\" and kind Service)",
            );
        }
        errs.check(
            &format!("spec.parentRefs[{i}].name"),
            &p.name,
            dns_label_problem(&p.name),
        );
    }
}

/// Checks converted Gateway API routes as a VirtualService's (weights excepted: the Gateway
/// API's are relative).
fn check_converted(errs: &mut Errors, routes: Vec<crate::traffic::HttpRoute>) {
    let mut inner = Errors::default();
    let spec = crate::traffic::VirtualServiceSpec {
        hosts: vec!["converted".into()],
        http: routes
            .into_iter()
            .map(|mut r| {
                let n = r.route.len() as u32;
                for d in &mut r.route {
                    d.weight = if n > 1 { None } else { Some(100) };
                }
                if n > 1 {
                    let share = 100 / n;
                    for (i, d) in r.route.iter_mut().enumerate() {
                        d.weight = Some(if i == 0 { 100 - share * (n - 1) } else { share });
                    }
                }
                r
            })
            .collect(),
        ..Default::default()
    };
    check_virtual_service(&mut inner, &spec);
    for e in inner.0 {
        errs.add(
            e.field.replacen("spec.http", "spec.rules(converted)", 1),
            e.value,
            e.message,
        );
    }
}
