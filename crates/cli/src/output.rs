//! Tables, YAML and JSON as `get` prints them.

use isthmus_model::{Kind, Resource};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Columns padded to the widest cell, kubectl style.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

pub fn age(ts: Option<&str>) -> String {
    let Some(t) = ts.and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()) else {
        return "-".into();
    };
    let secs = (OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn join_or_dash(v: Vec<String>) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// `endpoints(svc)` counts a service's workload entries; only used for services.
pub fn rows(
    kind: Kind,
    items: &[Resource],
    all_ns: bool,
    wide: bool,
    endpoints: &dyn Fn(&Resource) -> usize,
) -> String {
    let mut header: Vec<&str> = Vec::new();
    if all_ns {
        header.push("NAMESPACE");
    }
    let cols: &[&str] = match (kind, wide) {
        (Kind::Service, false) => &["NAME", "VIP", "PORTS", "ENDPOINTS", "AGE"],
        (Kind::Service, true) => &["NAME", "VIP", "PORTS", "ENDPOINTS", "SELECTOR", "AGE"],
        (Kind::WorkloadEntry, false) => &[
            "NAME",
            "ADDRESS",
            "SERVICE-ACCOUNT",
            "HEALTH",
            "LAST-SEEN",
            "AGE",
        ],
        (Kind::WorkloadEntry, true) => &[
            "NAME",
            "ADDRESS",
            "SERVICE-ACCOUNT",
            "HEALTH",
            "LAST-SEEN",
            "PORTS",
            "SERVICES",
            "LABELS",
            "AGE",
        ],
        (Kind::WorkloadGroup, _) => &["NAME", "SERVICE-ACCOUNT", "PORTS", "PROBE", "AGE"],
        (Kind::AuthorizationPolicy, _) => &["NAME", "ACTION", "SELECTOR", "RULES", "AGE"],
        (Kind::PeerAuthentication, _) => &["NAME", "MODE", "SELECTOR", "AGE"],
        (Kind::VirtualService, _) => &["NAME", "HOSTS", "ROUTES", "AGE"],
        (Kind::DestinationRule, _) => &["NAME", "HOST", "SUBSETS", "AGE"],
        (Kind::HttpRoute | Kind::GrpcRoute, _) => &["NAME", "PARENTS", "RULES", "AGE"],
    };
    header.extend_from_slice(cols);
    let mut out = Vec::new();
    for r in items {
        let m = r.meta();
        let mut row = Vec::new();
        if all_ns {
            row.push(m.namespace.clone());
        }
        row.push(m.name.clone());
        match r {
            Resource::Service(s) => {
                row.push(s.status.vip.map_or("-".into(), |v| v.to_string()));
                row.push(join_or_dash(
                    s.spec
                        .ports
                        .iter()
                        .map(|p| format!("{}:{}/{}", p.name, p.port, p.protocol()))
                        .collect(),
                ));
                row.push(endpoints(r).to_string());
                if wide {
                    row.push(join_or_dash(
                        s.spec
                            .selector
                            .iter()
                            .flatten()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect(),
                    ));
                }
            }
            Resource::WorkloadEntry(w) => {
                row.push(w.spec.address.clone());
                row.push(if w.spec.service_account.is_empty() {
                    "-".into()
                } else {
                    w.spec.service_account.clone()
                });
                row.push(format!("{:?}", w.status.health).to_uppercase());
                row.push(
                    w.status
                        .last_seen
                        .as_deref()
                        .map_or("-".into(), |t| format!("{} ago", age(Some(t)))),
                );
                if wide {
                    row.push(join_or_dash(
                        w.spec
                            .ports
                            .iter()
                            .map(|(n, p)| format!("{n}:{p}"))
                            .collect(),
                    ));
                    row.push(join_or_dash(w.spec.services.clone()));
                    row.push(join_or_dash(
                        r.effective_labels()
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect(),
                    ));
                }
            }
            Resource::VirtualService(v) => {
                row.push(join_or_dash(v.spec.hosts.clone()));
                row.push(v.spec.http.len().to_string());
            }
            Resource::HttpRoute(r) => {
                row.push(join_or_dash(
                    r.spec.parent_refs.iter().map(|p| p.name.clone()).collect(),
                ));
                row.push(r.spec.rules.len().to_string());
            }
            Resource::GrpcRoute(r) => {
                row.push(join_or_dash(
                    r.spec.parent_refs.iter().map(|p| p.name.clone()).collect(),
                ));
                row.push(r.spec.rules.len().to_string());
            }
            Resource::DestinationRule(d) => {
                row.push(d.spec.host.clone());
                row.push(join_or_dash(
                    d.spec.subsets.iter().map(|s| s.name.clone()).collect(),
                ));
            }
            Resource::PeerAuthentication(p) => {
                row.push(p.spec.mode().to_string());
                row.push(match &p.spec.selector {
                    Some(sel) => join_or_dash(
                        sel.match_labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect(),
                    ),
                    None => "(namespace)".into(),
                });
            }
            Resource::AuthorizationPolicy(p) => {
                row.push(p.spec.action().to_string());
                row.push(match &p.spec.selector {
                    Some(sel) => join_or_dash(
                        sel.match_labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect(),
                    ),
                    None => "(namespace)".into(),
                });
                row.push(p.spec.rules.len().to_string());
            }
            Resource::WorkloadGroup(g) => {
                let t = &g.spec.template;
                row.push(if t.service_account.is_empty() {
                    "-".into()
                } else {
                    t.service_account.clone()
                });
                row.push(join_or_dash(
                    t.ports.iter().map(|(n, p)| format!("{n}:{p}")).collect(),
                ));
                row.push(match &g.spec.probe {
                    Some(p) => match (&p.http_get, &p.tcp_socket) {
                        (Some(h), _) => {
                            format!("http-get :{}{} every {}s", h.port, h.path, p.period())
                        }
                        (_, Some(t)) => format!("tcp :{} every {}s", t.port, p.period()),
                        _ => "-".into(),
                    },
                    None => "-".into(),
                });
            }
        }
        row.push(age(m.creation_timestamp.as_deref()));
        out.push(row);
    }
    table(&header, &out)
}

pub fn yaml<T: serde::Serialize>(v: &T) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default()
}

pub fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// Unix seconds as RFC 3339 (UTC).
pub fn unix_time(secs: u64) -> String {
    OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}
