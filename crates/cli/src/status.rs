//! `isthmus status`: every host connected to the control plane's discovery stream, with its
//! identity, certificate expiry, health and config freshness (Istio's `istioctl proxy-status`).

use std::io::Write;

use isthmus_control_plane::proxies::{
    ConfigStatus, ProxyStatus, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL,
};
use reqwest::Method;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::args::{Connection, Output};
use crate::client::Client;
use crate::commands::CommandError;
use crate::output;

/// Arguments of `isthmus status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// One host, by name (`<name>.<namespace>` or `<name>`), node id, mesh IP or peer IP: show
    /// its details.
    pub host: Option<String>,
    /// `table`, `wide` (adds peer, WorkloadEntry, last ACK, node id), `json` or `yaml`. With a
    /// HOST, json/yaml print the host's object (a list if several streams match).
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
    /// List the control-plane replicas instead: address, leader, version, connected hosts.
    #[arg(long, conflicts_with = "host")]
    pub replicas: bool,
    #[command(flatten)]
    pub conn: Connection,
}

/// What an empty mesh prints instead of a table.
pub const NO_HOSTS: &str = "No hosts connected to the control plane's discovery stream.\n";

pub async fn run(args: StatusArgs, out: &mut dyn Write) -> Result<(), CommandError> {
    let client = Client::from_connection(&args.conn)?;
    let replicas: serde_json::Value = client
        .json(Method::GET, "/api/v1/replicas", None)
        .await
        .unwrap_or_default();
    if args.replicas {
        let text = match args.output {
            Output::Json => output::json(&replicas),
            Output::Yaml => output::yaml(&replicas),
            _ => replica_table(&replicas),
        };
        let _ = out.write_all(text.as_bytes());
        return Ok(());
    }
    let mut proxies: Vec<ProxyStatus> = client.json(Method::GET, "/api/v1/proxies", None).await?;
    // Hosts connected to the other replicas: ask each (the admin token is shared).
    let this = replicas["this"].as_str().unwrap_or_default();
    let mut unreachable = Vec::new();
    for r in replicas["replicas"].as_array().into_iter().flatten() {
        let (Some(name), Some(admin)) = (r["name"].as_str(), r["adminAddr"].as_str()) else {
            continue;
        };
        if name == this || admin.is_empty() {
            continue;
        }
        match client
            .at(admin)
            .json::<Vec<ProxyStatus>>(Method::GET, "/api/v1/proxies", None)
            .await
        {
            Ok(more) => proxies.extend(more),
            Err(e) => unreachable.push(format!("{name} at {admin}: {e}")),
        }
    }
    let several = replicas["replicas"].as_array().is_some_and(|r| r.len() > 1);
    let now = OffsetDateTime::now_utc();
    let text = match &args.host {
        None => match args.output {
            Output::Json => output::json(&proxies),
            Output::Yaml => output::yaml(&proxies),
            _ if proxies.is_empty() => NO_HOSTS.to_string(),
            fmt => table(&proxies, fmt == Output::Wide || several, now),
        },
        Some(host) => {
            let matched: Vec<&ProxyStatus> = proxies.iter().filter(|p| matches(p, host)).collect();
            if matched.is_empty() {
                return Err(CommandError::Usage(format!(
                    "no connected host matches {host:?} (by name, node id or IP); `isthmus status` lists the connected ones"
                )));
            }
            match (args.output, matched.as_slice()) {
                (Output::Json, [one]) => output::json(one),
                (Output::Yaml, [one]) => output::yaml(one),
                (Output::Json, _) => output::json(&matched),
                (Output::Yaml, _) => output::yaml(&matched),
                _ => matched
                    .iter()
                    .map(|p| detail(p, now))
                    .collect::<Vec<_>>()
                    .join("\n"),
            }
        }
    };
    let _ = out.write_all(text.as_bytes());
    for u in &unreachable {
        let _ = writeln!(
            out,
            "warning: the hosts of replica {u} are not listed: the CLI cannot reach its admin API (give it an --admin-addr this machine can reach)"
        );
    }
    Ok(())
}

fn replica_table(v: &serde_json::Value) -> String {
    let rows: Vec<Vec<String>> = v["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
            vec![
                s("name"),
                if r["leader"].as_bool() == Some(true) {
                    "yes".into()
                } else {
                    "-".into()
                },
                s("version"),
                s("grpcAddr"),
                s("adminAddr"),
                r["connectedHosts"].as_u64().unwrap_or(0).to_string(),
                s("started"),
            ]
        })
        .collect();
    let mut text = output::table(
        &[
            "REPLICA", "LEADER", "VERSION", "GRPC", "ADMIN", "HOSTS", "STARTED",
        ],
        &rows,
    );
    if let Some(e) = v["storeError"].as_str() {
        text.push_str(&format!(
            "warning: the store does not answer, so only the replica asked is listed: {e}\n"
        ));
    }
    text
}

fn matches(p: &ProxyStatus, host: &str) -> bool {
    let peer_ip = p
        .peer
        .as_deref()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip().to_string());
    p.node == host
        || p.name == host
        || p.name.split('.').next() == Some(host)
        || p.ip.as_deref() == Some(host)
        || peer_ip.as_deref() == Some(host)
}

fn parse(ts: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(ts, &Rfc3339).ok()
}

/// `45s`, `12m`, `5h`, `3d`, as `get` prints ages.
fn span(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn ago(ts: Option<&str>, now: OffsetDateTime) -> String {
    ts.and_then(parse)
        .map_or("-".into(), |t| span((now - t).whole_seconds()))
}

/// `in 23h`, or `EXPIRED 5m ago`.
fn expires(ts: Option<&str>, now: OffsetDateTime) -> String {
    let Some(t) = ts.and_then(parse) else {
        return "-".into();
    };
    let left = (t - now).whole_seconds();
    if left > 0 {
        format!("in {}", span(left))
    } else {
        format!("EXPIRED {} ago", span(-left))
    }
}

fn health(p: &ProxyStatus) -> &'static str {
    match &p.health {
        None => "-",
        Some(h) if h.healthy => "HEALTHY",
        Some(_) => "UNHEALTHY",
    }
}

fn dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_string()
}

fn last_ack(p: &ProxyStatus) -> Option<&str> {
    p.config
        .iter()
        .filter_map(|c| c.last_ack.as_deref())
        .max_by_key(|t| parse(t))
}

fn table(proxies: &[ProxyStatus], wide: bool, now: OffsetDateTime) -> String {
    let mut header = vec![
        "NAME",
        "IDENTITY",
        "IP",
        "VERSION",
        "HEALTH",
        "CERT-EXPIRES",
        "ADDRESSES",
        "AUTHORIZATION",
        "CONNECTED",
    ];
    if wide {
        header.extend(["PEER", "WORKLOAD-ENTRY", "LAST-ACK", "NODE", "REPLICA"]);
    }
    let rows: Vec<Vec<String>> = proxies
        .iter()
        .map(|p| {
            let mut row = vec![
                p.name.clone(),
                p.identity.clone(),
                dash(p.ip.as_deref()),
                dash(p.version.as_deref()),
                health(p).to_string(),
                expires(p.cert_expires.as_deref(), now),
                p.state_of(ADDRESS_TYPE_URL).to_string(),
                p.state_of(AUTHORIZATION_TYPE_URL).to_string(),
                ago(Some(&p.connected_at), now),
            ];
            if wide {
                row.extend([
                    dash(p.peer.as_deref()),
                    dash(p.workload_entry.as_deref()),
                    last_ack(p).map_or("-".into(), |t| format!("{} ago", ago(Some(t), now))),
                    p.node.clone(),
                    dash(p.replica.as_deref()),
                ]);
            }
            row
        })
        .collect();
    output::table(&header, &rows)
}

fn type_label(url: &str) -> &str {
    match url {
        ADDRESS_TYPE_URL => "Addresses",
        AUTHORIZATION_TYPE_URL => "Authorization",
        other => other,
    }
}

fn config_line(c: &ConfigStatus, now: OffsetDateTime) -> String {
    let mut parts = Vec::new();
    if let Some(v) = &c.sent_version {
        parts.push(format!("sent version {v}"));
    }
    match (&c.acked_version, &c.last_ack) {
        (Some(v), Some(at)) => {
            parts.push(format!("last ACK {} ago (version {v})", ago(Some(at), now)))
        }
        _ if c.sent_version.is_some() => parts.push("never ACKed".into()),
        _ => {}
    }
    let mut line = format!(
        "  {:<15} {:<9} {}",
        type_label(&c.type_url),
        c.state,
        parts.join(", ")
    );
    if let Some(n) = &c.nack {
        line.push_str(&format!(
            "\n  {:<15} version {} rejected {} ago: {}",
            "",
            n.version,
            ago(Some(&n.at), now),
            n.message
        ));
    }
    line.trim_end().to_string() + "\n"
}

fn detail(p: &ProxyStatus, now: OffsetDateTime) -> String {
    let mut s = String::new();
    let mut field = |k: &str, v: String| s.push_str(&format!("{k:<16}{v}\n"));
    field("Name:", p.name.clone());
    field("Node:", p.node.clone());
    field("Identity:", p.identity.clone());
    field(
        "IP:",
        match (&p.ip, &p.ip_verified_by) {
            (Some(ip), Some(by)) => format!("{ip} (verified by {by})"),
            (ip, _) => dash(ip.as_deref()),
        },
    );
    if let Some(claimed) = &p.claimed_ip {
        field(
            "Claimed IP:",
            format!(
                "{claimed} (ignored: {})",
                p.claim_problem.as_deref().unwrap_or("not verified")
            ),
        );
    }
    field("Peer:", dash(p.peer.as_deref()));
    field("Version:", dash(p.version.as_deref()));
    field(
        "Connected:",
        format!(
            "{} ({} ago)",
            p.connected_at,
            ago(Some(&p.connected_at), now)
        ),
    );
    field(
        "Cert expires:",
        match &p.cert_expires {
            Some(t) => format!("{t} ({})", expires(Some(t), now)),
            None => "- (authenticated with a join token)".into(),
        },
    );
    field(
        "Health:",
        match &p.health {
            None => "- (no report)".into(),
            Some(h) => {
                let state = if h.healthy { "HEALTHY" } else { "UNHEALTHY" };
                let why = h
                    .message
                    .as_deref()
                    .map_or(String::new(), |m| format!(": {m}"));
                format!(
                    "{state}{why} (reported {} ago)",
                    ago(Some(&h.reported_at), now)
                )
            }
        },
    );
    field("WorkloadEntry:", dash(p.workload_entry.as_deref()));
    s.push_str("Config:\n");
    // The two Istio types first, in the table's order, then anything else subscribed.
    for url in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        match p.config.iter().find(|c| c.type_url == url) {
            Some(c) => s.push_str(&config_line(c, now)),
            None => s.push_str(&format!("  {:<15} NOT SENT\n", type_label(url))),
        }
    }
    for c in &p.config {
        if c.type_url != ADDRESS_TYPE_URL && c.type_url != AUTHORIZATION_TYPE_URL {
            s.push_str(&config_line(c, now));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_control_plane::proxies::{Nack, ProxyHealth};

    fn proxy(now: OffsetDateTime) -> ProxyStatus {
        let at = |secs: i64| {
            (now + time::Duration::seconds(secs))
                .format(&Rfc3339)
                .unwrap()
        };
        ProxyStatus {
            node: "sidecar~10.0.0.9~vm-1.onprem~onprem.svc.cluster.local".into(),
            name: "vm-1.onprem".into(),
            identity: "spiffe://cluster.local/ns/onprem/sa/db".into(),
            ip: Some("10.0.0.9".into()),
            ip_verified_by: Some("registered entry".into()),
            claimed_ip: None,
            claim_problem: None,
            peer: Some("127.0.0.1:50000".into()),
            version: Some("0.1.0".into()),
            connected_at: at(-300),
            cert_expires: Some(at(23 * 3600 + 30)),
            health: Some(ProxyHealth {
                healthy: false,
                message: Some("port 3306 refused".into()),
                reported_at: at(-3),
            }),
            workload_entry: Some("onprem/mysql-10-0-0-9".into()),
            replica: None,
            config: vec![ConfigStatus {
                type_url: ADDRESS_TYPE_URL.into(),
                state: "NACKED".into(),
                sent_version: Some("7".into()),
                last_sent: Some(at(-2)),
                acked_version: Some("6".into()),
                last_ack: Some(at(-10)),
                nack: Some(Nack {
                    version: "7".into(),
                    message: "bad address".into(),
                    at: at(-2),
                }),
            }],
        }
    }

    #[test]
    fn table_and_detail_show_what_an_operator_needs() {
        let now = OffsetDateTime::now_utc();
        let p = proxy(now);
        let t = table(std::slice::from_ref(&p), false, now);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME "), "{t}");
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "vm-1.onprem",
                "spiffe://cluster.local/ns/onprem/sa/db",
                "10.0.0.9",
                "0.1.0",
                "UNHEALTHY",
                "in",
                "23h",
                "NACKED",
                "NOT",
                "SENT",
                "5m"
            ]
        );
        let wide = table(std::slice::from_ref(&p), true, now);
        assert!(
            wide.contains("onprem/mysql-10-0-0-9") && wide.contains("10s ago"),
            "{wide}"
        );

        let d = detail(&p, now);
        assert!(d.contains("version 7 rejected 2s ago: bad address"), "{d}");
        assert!(d.contains("last ACK 10s ago (version 6)"), "{d}");
        assert!(d.contains("Authorization   NOT SENT"), "{d}");
        assert!(d.contains("UNHEALTHY: port 3306 refused"), "{d}");

        for host in [
            "vm-1",
            "vm-1.onprem",
            "10.0.0.9",
            "127.0.0.1",
            p.node.as_str(),
        ] {
            assert!(matches(&p, host), "{host}");
        }
        assert!(!matches(&p, "10.0.0.1"));
        assert_eq!(
            expires(
                Some(&(now - time::Duration::minutes(5)).format(&Rfc3339).unwrap()),
                now
            ),
            "EXPIRED 5m ago"
        );
    }
}
