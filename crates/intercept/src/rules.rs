//! Config to `iptables-restore --noflush` text for the nat table: a pure function.
//!
//! Everything lives in chains named `ISTHMUS_*`, which a restore declares (so flushes) and
//! rebuilds in one transaction; other tables and other chains' rules are kept. The jumps into
//! them are inserted at position 1 of `OUTPUT` and `PREROUTING`, after deleting any earlier
//! copies in the same transaction, so a re-install keeps them first even when something else
//! (Docker, a firewall) inserted rules ahead of them since: Istio's VMs lost traffic that way.
//!
//! Loopback: packets leaving through `lo` (to 127.0.0.0/8, or to the host's own addresses) are
//! never captured. An app calling its own service VIP is still captured (the VIP is not routed
//! through `lo`); the agent's onward connection is exempt by uid/gid/mark, so it reaches the app
//! directly. Istio adds a rule sending the proxy's own `lo` traffic back into inbound capture
//! for that hairpin, which only works together with its 127.0.0.6 inbound-passthrough source;
//! Isthmus leaves it out, so such self-calls skip inbound policy rather than risk a loop.
//!
//! DNS capture redirects port 53 (UDP and TCP, any destination, including a local resolver such
//! as 127.0.0.53) from everything but the agent to 127.0.0.1:15053. IPv4 only: with IPv6, DNS is
//! not captured (the agent's DNS proxy listens on 127.0.0.1).

use std::fmt::Write as _;

use ipnet::IpNet;

use crate::config::{
    CidrSelection, InterceptConfig, PortSelection, DNS_CAPTURE_PORT, INBOUND_CAPTURE_PORT,
    OUTBOUND_CAPTURE_PORT,
};

/// Every chain Isthmus creates starts with this; any chain with it is Isthmus's to remove.
pub const CHAIN_PREFIX: &str = "ISTHMUS_";
pub const OUTPUT_CHAIN: &str = "ISTHMUS_OUTPUT";
pub const REDIRECT_CHAIN: &str = "ISTHMUS_REDIRECT";
pub const INBOUND_CHAIN: &str = "ISTHMUS_INBOUND";
pub const IN_REDIRECT_CHAIN: &str = "ISTHMUS_IN_REDIRECT";
pub const DNS_CHAIN: &str = "ISTHMUS_DNS";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// The restore text for each address family. `v6` is `None` when no IPv6 network is listed in
/// `ISTIO_SERVICE_CIDR` (with `*`, only IPv4 is captured, as in Istio without IPv6 enabled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub v4: String,
    pub v6: Option<String>,
}

/// What an `iptables-save -t nat` shows of an earlier install.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Existing {
    /// `ISTHMUS_*` chains.
    pub chains: Vec<String>,
    /// Rules of other chains jumping into them, as `-D` lines.
    pub jumps: Vec<String>,
}

impl Existing {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// The rules for a fresh install (what `isthmus iptables --dry-run` shows).
pub fn render(config: &InterceptConfig) -> RuleSet {
    let none = Existing::default();
    RuleSet {
        v4: render_family(config, Family::V4, &none),
        v6: needs_v6(config).then(|| render_family(config, Family::V6, &none)),
    }
}

pub(crate) fn needs_v6(config: &InterceptConfig) -> bool {
    matches!(&config.service_cidrs, CidrSelection::List(nets) if nets.iter().any(|n| matches!(n, IpNet::V6(_))))
}

impl Family {
    /// The family of a network.
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Self::V4,
            IpNet::V6(_) => Self::V6,
        }
    }
}

/// The restore text replacing whatever `existing` shows with `config`'s rules.
pub(crate) fn render_family(
    config: &InterceptConfig,
    family: Family,
    existing: &Existing,
) -> String {
    let inbound = config.inbound_ports != PortSelection::None;
    let dns = config.dns_capture && family == Family::V4;
    let mut chains = Vec::new();
    if inbound {
        chains.extend([INBOUND_CHAIN, IN_REDIRECT_CHAIN]);
    }
    chains.extend([OUTPUT_CHAIN, REDIRECT_CHAIN]);
    if dns {
        chains.push(DNS_CHAIN);
    }
    let stale: Vec<&str> = existing
        .chains
        .iter()
        .map(String::as_str)
        .filter(|c| !chains.contains(c))
        .collect();

    let mut t = String::from("*nat\n");
    // Declaring a chain creates it, or flushes it if it exists.
    for c in chains.iter().chain(&stale) {
        let _ = writeln!(t, ":{c} - [0:0]");
    }
    for j in &existing.jumps {
        let _ = writeln!(t, "{j}");
    }
    for c in &stale {
        let _ = writeln!(t, "-X {c}");
    }

    let _ = writeln!(
        t,
        "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {OUTBOUND_CAPTURE_PORT}"
    );
    if inbound {
        let _ = writeln!(
            t,
            "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {INBOUND_CAPTURE_PORT}"
        );
        if config.inbound_ports == PortSelection::All {
            for p in &config.inbound_exclude_ports {
                let _ = writeln!(t, "-A {INBOUND_CHAIN} -p tcp --dport {p} -j RETURN");
            }
            let _ = writeln!(t, "-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}");
        } else {
            for p in config.captured_inbound_ports() {
                let _ = writeln!(
                    t,
                    "-A {INBOUND_CHAIN} -p tcp --dport {p} -j {IN_REDIRECT_CHAIN}"
                );
            }
        }
    }

    let exemptions = exemptions(config);
    if dns {
        for e in &exemptions {
            let _ = writeln!(t, "-A {DNS_CHAIN} {e} -j RETURN");
        }
        for proto in ["udp", "tcp"] {
            let _ = writeln!(
                t,
                "-A {DNS_CHAIN} -p {proto} -j REDIRECT --to-ports {DNS_CAPTURE_PORT}"
            );
        }
        // Ahead of the loopback rule: a local resolver (127.0.0.53) is captured too.
        let _ = writeln!(t, "-A {OUTPUT_CHAIN} -p tcp --dport 53 -j {DNS_CHAIN}");
    }
    let vips: Vec<&IpNet> = config
        .vip_cidrs
        .iter()
        .filter(|n| Family::of(n) == family)
        .collect();
    // The VIP networks are routed through lo (`crate::routes`): past the proxy's own traffic,
    // they are captured ahead of the loopback rule, which otherwise comes first.
    if vips.is_empty() {
        let _ = writeln!(t, "-A {OUTPUT_CHAIN} -o lo -j RETURN");
    }
    for e in &exemptions {
        let _ = writeln!(t, "-A {OUTPUT_CHAIN} {e} -j RETURN");
    }
    if !vips.is_empty() {
        for net in vips {
            let _ = writeln!(t, "-A {OUTPUT_CHAIN} -o lo -d {net} -j {REDIRECT_CHAIN}");
        }
        let _ = writeln!(t, "-A {OUTPUT_CHAIN} -o lo -j RETURN");
    }
    let loopback = match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    };
    let _ = writeln!(t, "-A {OUTPUT_CHAIN} -d {loopback} -j RETURN");
    for net in config
        .service_exclude_cidrs
        .iter()
        .filter(|n| Family::of(n) == family)
    {
        let _ = writeln!(t, "-A {OUTPUT_CHAIN} -d {net} -j RETURN");
    }
    match &config.service_cidrs {
        // Nothing outbound is captured; the agent refuses to start so (`check_capture`).
        CidrSelection::Unset => {}
        CidrSelection::All => {
            let _ = writeln!(t, "-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}");
        }
        CidrSelection::List(nets) => {
            for net in nets.iter().filter(|n| Family::of(n) == family) {
                let _ = writeln!(t, "-A {OUTPUT_CHAIN} -d {net} -j {REDIRECT_CHAIN}");
            }
        }
    }

    // Each goes in at position 1, so together they come first (the last one listed first).
    let mut jumps = vec![format!("-I OUTPUT 1 -p tcp -j {OUTPUT_CHAIN}")];
    if dns {
        jumps.push(format!("-I OUTPUT 1 -p udp --dport 53 -j {DNS_CHAIN}"));
    }
    if inbound {
        jumps.push(format!("-I PREROUTING 1 -p tcp -j {INBOUND_CHAIN}"));
    }
    for j in jumps {
        let _ = writeln!(t, "{j}");
    }
    t.push_str("COMMIT\n");
    t
}

fn exemptions(config: &InterceptConfig) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(uid) = config.proxy_uid {
        out.push(format!("-m owner --uid-owner {uid}"));
    }
    if let Some(gid) = config.proxy_gid {
        out.push(format!("-m owner --gid-owner {gid}"));
    }
    if let Some(mark) = config.proxy_mark {
        out.push(format!("-m mark --mark {mark:#x}"));
    }
    out
}

/// The restore text removing everything `existing` shows, or `None` when there is nothing.
pub(crate) fn render_cleanup(existing: &Existing) -> Option<String> {
    if existing.is_empty() {
        return None;
    }
    let mut t = String::from("*nat\n");
    for c in &existing.chains {
        let _ = writeln!(t, ":{c} - [0:0]");
    }
    for j in &existing.jumps {
        let _ = writeln!(t, "{j}");
    }
    for c in &existing.chains {
        let _ = writeln!(t, "-X {c}");
    }
    t.push_str("COMMIT\n");
    Some(t)
}

/// Reads the Isthmus chains and the jumps into them from `iptables-save` output (nat table).
pub(crate) fn existing(save: &str) -> Existing {
    let mut out = Existing::default();
    let mut in_nat = false;
    for line in save.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                if name.starts_with(CHAIN_PREFIX) && !out.chains.iter().any(|c| c == name) {
                    out.chains.push(name.to_string());
                }
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let tokens: Vec<&str> = rule.split_whitespace().collect();
            let from_ours = tokens.first().is_some_and(|c| c.starts_with(CHAIN_PREFIX));
            let into_ours = tokens
                .windows(2)
                .any(|w| matches!(w[0], "-j" | "-g") && w[1].starts_with(CHAIN_PREFIX));
            if into_ours && !from_ours {
                out.jumps.push(format!("-D {rule}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envfile::EnvFile;

    fn config(sidecar: &str) -> InterceptConfig {
        InterceptConfig::from_env(
            &EnvFile::empty("cluster.env"),
            &EnvFile::parse("sidecar.env", sidecar).unwrap(),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn golden_defaults() {
        let r = render(&config(""));
        assert_eq!(
            r.v4,
            "\
*nat
:ISTHMUS_OUTPUT - [0:0]
:ISTHMUS_REDIRECT - [0:0]
-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTHMUS_OUTPUT -o lo -j RETURN
-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m mark --mark 0x539 -j RETURN
-A ISTHMUS_OUTPUT -d 127.0.0.0/8 -j RETURN
-I OUTPUT 1 -p tcp -j ISTHMUS_OUTPUT
COMMIT
"
        );
        assert_eq!(r.v6, None);
        // `*` captures the rest.
        let r = render(&config("ISTIO_SERVICE_CIDR=*"));
        assert!(
            r.v4.ends_with(
                "-A ISTHMUS_OUTPUT -d 127.0.0.0/8 -j RETURN\n\
                 -A ISTHMUS_OUTPUT -j ISTHMUS_REDIRECT\n\
                 -I OUTPUT 1 -p tcp -j ISTHMUS_OUTPUT\nCOMMIT\n"
            ),
            "{}",
            r.v4
        );
    }

    #[test]
    fn golden_seed_with_inbound_list_dns_and_mark() {
        let r = render(&config(
            "ISTIO_SERVICE_CIDR=10.96.0.0/12,10.100.0.0/16\n\
             ISTIO_SERVICE_EXCLUDE_CIDR=10.96.0.10/32\n\
             ISTIO_INBOUND_PORTS=3306,8080,15008\n\
             ISTIO_META_DNS_CAPTURE=true\n\
             ISTHMUS_PROXY_GID=\n\
             ISTHMUS_PROXY_MARK=1337\n",
        ));
        assert_eq!(
            r.v4,
            "\
*nat
:ISTHMUS_INBOUND - [0:0]
:ISTHMUS_IN_REDIRECT - [0:0]
:ISTHMUS_OUTPUT - [0:0]
:ISTHMUS_REDIRECT - [0:0]
:ISTHMUS_DNS - [0:0]
-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTHMUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTHMUS_INBOUND -p tcp --dport 3306 -j ISTHMUS_IN_REDIRECT
-A ISTHMUS_INBOUND -p tcp --dport 8080 -j ISTHMUS_IN_REDIRECT
-A ISTHMUS_DNS -m owner --uid-owner 1337 -j RETURN
-A ISTHMUS_DNS -m mark --mark 0x539 -j RETURN
-A ISTHMUS_DNS -p udp -j REDIRECT --to-ports 15053
-A ISTHMUS_DNS -p tcp -j REDIRECT --to-ports 15053
-A ISTHMUS_OUTPUT -p tcp --dport 53 -j ISTHMUS_DNS
-A ISTHMUS_OUTPUT -o lo -j RETURN
-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m mark --mark 0x539 -j RETURN
-A ISTHMUS_OUTPUT -d 127.0.0.0/8 -j RETURN
-A ISTHMUS_OUTPUT -d 10.96.0.10/32 -j RETURN
-A ISTHMUS_OUTPUT -d 10.96.0.0/12 -j ISTHMUS_REDIRECT
-A ISTHMUS_OUTPUT -d 10.100.0.0/16 -j ISTHMUS_REDIRECT
-I OUTPUT 1 -p tcp -j ISTHMUS_OUTPUT
-I OUTPUT 1 -p udp --dport 53 -j ISTHMUS_DNS
-I PREROUTING 1 -p tcp -j ISTHMUS_INBOUND
COMMIT
"
        );
        assert_eq!(r.v6, None);
    }

    #[test]
    fn golden_inbound_star_excludes_defaults_and_extra_ports() {
        let r = render(&config(
            "ISTIO_SERVICE_CIDR=10.96.0.0/12\n\
             ISTIO_INBOUND_PORTS=*\n\
             ISTIO_INBOUND_EXCLUDE_PORTS=9000\n",
        ));
        assert_eq!(
            r.v4,
            "\
*nat
:ISTHMUS_INBOUND - [0:0]
:ISTHMUS_IN_REDIRECT - [0:0]
:ISTHMUS_OUTPUT - [0:0]
:ISTHMUS_REDIRECT - [0:0]
-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTHMUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTHMUS_INBOUND -p tcp --dport 22 -j RETURN
-A ISTHMUS_INBOUND -p tcp --dport 9000 -j RETURN
-A ISTHMUS_INBOUND -p tcp --dport 15000 -j RETURN
-A ISTHMUS_INBOUND -p tcp --dport 15001 -j RETURN
-A ISTHMUS_INBOUND -p tcp --dport 15006 -j RETURN
-A ISTHMUS_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTHMUS_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTHMUS_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTHMUS_INBOUND -p tcp --dport 15053 -j RETURN
-A ISTHMUS_INBOUND -p tcp -j ISTHMUS_IN_REDIRECT
-A ISTHMUS_OUTPUT -o lo -j RETURN
-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m mark --mark 0x539 -j RETURN
-A ISTHMUS_OUTPUT -d 127.0.0.0/8 -j RETURN
-A ISTHMUS_OUTPUT -d 10.96.0.0/12 -j ISTHMUS_REDIRECT
-I OUTPUT 1 -p tcp -j ISTHMUS_OUTPUT
-I PREROUTING 1 -p tcp -j ISTHMUS_INBOUND
COMMIT
"
        );
    }

    #[test]
    fn golden_dual_stack() {
        let r = render(&config(
            "ISTIO_SERVICE_CIDR=10.96.0.0/12,fd00:10:96::/112\n\
             ISTIO_SERVICE_EXCLUDE_CIDR=fd00:10:96::a,10.96.0.10\n\
             ISTIO_META_DNS_CAPTURE=true\n",
        ));
        assert!(r
            .v4
            .contains("-A ISTHMUS_OUTPUT -d 10.96.0.10/32 -j RETURN\n"));
        assert!(r.v4.contains("-A ISTHMUS_DNS "));
        assert!(!r.v4.contains("fd00"));
        assert_eq!(
            r.v6.as_deref(),
            Some(
                "\
*nat
:ISTHMUS_OUTPUT - [0:0]
:ISTHMUS_REDIRECT - [0:0]
-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTHMUS_OUTPUT -o lo -j RETURN
-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m mark --mark 0x539 -j RETURN
-A ISTHMUS_OUTPUT -d ::1/128 -j RETURN
-A ISTHMUS_OUTPUT -d fd00:10:96::a/128 -j RETURN
-A ISTHMUS_OUTPUT -d fd00:10:96::/112 -j ISTHMUS_REDIRECT
-I OUTPUT 1 -p tcp -j ISTHMUS_OUTPUT
COMMIT
"
            )
        );
    }

    #[test]
    fn golden_vip_networks_are_captured_on_lo_after_the_proxy_exemptions() {
        let r = render(&config(
            "ISTIO_SERVICE_CIDR=10.96.0.0/12,10.244.0.0/16\nISTHMUS_VIP_CIDR=10.96.0.0/12\n\
             ISTHMUS_PROXY_MARK=0x539\n",
        ));
        assert_eq!(
            r.v4,
            "\
*nat
:ISTHMUS_OUTPUT - [0:0]
:ISTHMUS_REDIRECT - [0:0]
-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTHMUS_OUTPUT -m mark --mark 0x539 -j RETURN
-A ISTHMUS_OUTPUT -o lo -d 10.96.0.0/12 -j ISTHMUS_REDIRECT
-A ISTHMUS_OUTPUT -o lo -j RETURN
-A ISTHMUS_OUTPUT -d 127.0.0.0/8 -j RETURN
-A ISTHMUS_OUTPUT -d 10.96.0.0/12 -j ISTHMUS_REDIRECT
-A ISTHMUS_OUTPUT -d 10.244.0.0/16 -j ISTHMUS_REDIRECT
-I OUTPUT 1 -p tcp -j ISTHMUS_OUTPUT
COMMIT
"
        );
    }

    #[test]
    fn reinstall_deletes_old_jumps_and_stale_chains_in_the_same_transaction() {
        let save = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ISTHMUS_NOT_NAT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:ISTHMUS_DNS - [0:0]
:ISTHMUS_OUTPUT - [0:0]
-A OUTPUT -j DOCKER
-A OUTPUT -p udp -m udp --dport 53 -j ISTHMUS_DNS
-A OUTPUT -p tcp -j ISTHMUS_OUTPUT
-A ISTHMUS_OUTPUT -p tcp -m tcp --dport 53 -j ISTHMUS_DNS
COMMIT
";
        let e = existing(save);
        assert_eq!(e.chains, vec!["ISTHMUS_DNS", "ISTHMUS_OUTPUT"]);
        assert_eq!(
            e.jumps,
            vec![
                "-D OUTPUT -p udp -m udp --dport 53 -j ISTHMUS_DNS",
                "-D OUTPUT -p tcp -j ISTHMUS_OUTPUT"
            ]
        );
        let t = render_family(&config(""), Family::V4, &e);
        assert!(t.starts_with(
            "\
*nat
:ISTHMUS_OUTPUT - [0:0]
:ISTHMUS_REDIRECT - [0:0]
:ISTHMUS_DNS - [0:0]
-D OUTPUT -p udp -m udp --dport 53 -j ISTHMUS_DNS
-D OUTPUT -p tcp -j ISTHMUS_OUTPUT
-X ISTHMUS_DNS
-A ISTHMUS_REDIRECT "
        ));
        assert_eq!(
            render_cleanup(&e).as_deref(),
            Some(
                "\
*nat
:ISTHMUS_DNS - [0:0]
:ISTHMUS_OUTPUT - [0:0]
-D OUTPUT -p udp -m udp --dport 53 -j ISTHMUS_DNS
-D OUTPUT -p tcp -j ISTHMUS_OUTPUT
-X ISTHMUS_DNS
-X ISTHMUS_OUTPUT
COMMIT
"
            )
        );
        assert_eq!(
            render_cleanup(&existing("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")),
            None
        );
    }
}
