//! Loopback routes for `ISTHMUS_VIP_CIDR`, the service networks that hold only mesh VIPs.
//!
//! A captured connection keeps the maximum segment size its socket chose at `connect()`, from
//! the route to the original destination: through `eth0` that is 1,460 bytes, although after
//! the REDIRECT every segment crosses loopback to the agent. Routing a VIP network through `lo`
//! gives those sockets loopback's MTU (segments of up to 64 KiB: about 40 times fewer packets
//! for bulk transfers) and the source address they had before (the kernel picks a non-loopback
//! address of the host). Traffic the rules do not capture, which for a network of VIPs has
//! nowhere to go anyway, is then dropped on the host instead of leaving it.
//!
//! The routes live in their own table, [`ROUTE_TABLE`], selected by one `ip rule` per network
//! at [`RULE_PRIORITY`] (ahead of the main table, after the local one), so the host's own routes
//! are never replaced or deleted. [`install_routes`] converges the rules and the table to the
//! config (adding before removing, so a re-install has no gap); [`cleanup_routes`] removes them.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use ipnet::IpNet;

use crate::apply::ApplyError;
use crate::config::InterceptConfig;
use crate::rules::Family;

/// The routing table holding the VIP networks' loopback routes.
pub const ROUTE_TABLE: u32 = 15001;
/// The priority of the rules that send the VIP networks to [`ROUTE_TABLE`].
pub const RULE_PRIORITY: u32 = 15001;

/// One change to the rules or the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    /// `ip rule add priority 15001 to NET lookup 15001`
    AddRule(IpNet),
    /// `ip rule del priority 15001 to NET lookup 15001`
    DelRule(IpNet),
    /// `ip route replace NET dev lo table 15001`
    AddRoute(IpNet),
    /// `ip route del NET table 15001`
    DelRoute(IpNet),
}

impl RouteChange {
    fn net(&self) -> IpNet {
        match self {
            Self::AddRule(n) | Self::DelRule(n) | Self::AddRoute(n) | Self::DelRoute(n) => *n,
        }
    }

    fn family(&self) -> Family {
        Family::of(&self.net())
    }

    /// The `ip` arguments, without the family flag.
    pub fn args(&self) -> Vec<String> {
        let (net, table, prio) = (
            self.net().to_string(),
            ROUTE_TABLE.to_string(),
            RULE_PRIORITY.to_string(),
        );
        let v: Vec<&str> = match self {
            Self::AddRule(_) => vec![
                "rule", "add", "priority", &prio, "to", &net, "lookup", &table,
            ],
            Self::DelRule(_) => vec![
                "rule", "del", "priority", &prio, "to", &net, "lookup", &table,
            ],
            Self::AddRoute(_) => vec!["route", "replace", &net, "dev", "lo", "table", &table],
            Self::DelRoute(_) => vec!["route", "del", &net, "table", &table],
        };
        v.into_iter().map(str::to_string).collect()
    }

    /// The whole command line, as `ip` takes it.
    pub fn command_line(&self) -> String {
        let family = match self.family() {
            Family::V4 => "ip ",
            Family::V6 => "ip -6 ",
        };
        format!("{family}{}", self.args().join(" "))
    }
}

/// The kernel's routing rules and [`ROUTE_TABLE`], as `ip` shows them.
pub trait Routing {
    /// The destinations of the rules at [`RULE_PRIORITY`] that look up [`ROUTE_TABLE`].
    fn rules(&self, family: Family) -> Result<Vec<IpNet>, ApplyError>;
    /// The destinations routed in [`ROUTE_TABLE`].
    fn routes(&self, family: Family) -> Result<Vec<IpNet>, ApplyError>;
    fn change(&self, change: &RouteChange) -> Result<(), ApplyError>;
}

/// What [`install_routes`] would do on a host that has none of them yet.
pub fn plan(config: &InterceptConfig) -> Vec<RouteChange> {
    let mut out: Vec<RouteChange> = config
        .vip_cidrs
        .iter()
        .map(|n| RouteChange::AddRoute(*n))
        .collect();
    out.extend(config.vip_cidrs.iter().map(|n| RouteChange::AddRule(*n)));
    out
}

/// Converges the rules and the table to `config.vip_cidrs`: routes first (so no rule ever
/// points at an empty table), then the rules; the stale rules, then the stale routes.
/// Returns the changes made.
pub fn install_routes(
    rt: &dyn Routing,
    config: &InterceptConfig,
) -> Result<Vec<RouteChange>, ApplyError> {
    let mut done = Vec::new();
    for family in [Family::V4, Family::V6] {
        let want: BTreeSet<IpNet> = config
            .vip_cidrs
            .iter()
            .filter(|n| Family::of(n) == family)
            .copied()
            .collect();
        let (rules, routes) = match listing(rt, family) {
            Ok(listed) => listed,
            // A host without IPv6 has no IPv6 routes of ours to converge.
            Err(e) if want.is_empty() => {
                tracing::debug!(?family, error = %e, "no routes of this family to check");
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut changes: Vec<RouteChange> = Vec::new();
        // `replace` also corrects a route someone changed by hand.
        changes.extend(want.iter().map(|n| RouteChange::AddRoute(*n)));
        changes.extend(
            want.iter()
                .filter(|n| !rules.contains(n))
                .map(|n| RouteChange::AddRule(*n)),
        );
        changes.extend(
            rules
                .into_iter()
                .filter(|n| !want.contains(n))
                .map(RouteChange::DelRule),
        );
        changes.extend(
            routes
                .into_iter()
                .filter(|n| !want.contains(n))
                .map(RouteChange::DelRoute),
        );
        for c in changes {
            rt.change(&c)?;
            done.push(c);
        }
    }
    Ok(done)
}

/// Our rules' and routes' destinations in one family.
fn listing(rt: &dyn Routing, family: Family) -> Result<(Vec<IpNet>, Vec<IpNet>), ApplyError> {
    Ok((rt.rules(family)?, rt.routes(family)?))
}

/// Removes every rule and route of ours. Returns whether there was anything to remove. A
/// family the host does not have (IPv6 disabled) has nothing to remove, and neither has a host
/// without `ip`, since nothing could have installed them there.
pub fn cleanup_routes(rt: &dyn Routing) -> Result<bool, ApplyError> {
    let mut removed = false;
    for family in [Family::V4, Family::V6] {
        let (rules, routes) = match listing(rt, family) {
            Ok(listed) => listed,
            Err(e @ ApplyError::Spawn { .. }) => {
                tracing::debug!(error = %e, "no routes to remove");
                return Ok(removed);
            }
            Err(e) if family == Family::V6 => {
                tracing::debug!(error = %e, "no IPv6 routes to remove");
                continue;
            }
            Err(e) => return Err(e),
        };
        for n in rules {
            rt.change(&RouteChange::DelRule(n))?;
            removed = true;
        }
        for n in routes {
            rt.change(&RouteChange::DelRoute(n))?;
            removed = true;
        }
    }
    Ok(removed)
}

/// Runs `ip` (iproute2), optionally inside a named network namespace.
#[derive(Debug, Clone, Default)]
pub struct SystemRouting {
    netns: Option<String>,
}

impl SystemRouting {
    /// The host's own network namespace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inside the named namespace (`ip -n NAME ...`).
    pub fn in_netns(name: impl Into<String>) -> Self {
        Self {
            netns: Some(name.into()),
        }
    }

    fn ip(&self, family: Family, args: &[String]) -> Result<String, ApplyError> {
        let mut c = Command::new("ip");
        if let Some(ns) = &self.netns {
            c.args(["-n", ns]);
        }
        if family == Family::V6 {
            c.arg("-6");
        }
        let line = format!("ip {}", args.join(" "));
        let out = c
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ApplyError::Spawn {
                program: "ip".into(),
                source,
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let hint = crate::apply::permission_hint(&stderr);
            return Err(ApplyError::Failed {
                program: "ip".into(),
                status: out.status.to_string(),
                stderr,
                detail: format!("; the command was: {line}{hint}"),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn list(&self, family: Family, what: &str) -> Result<String, ApplyError> {
        let args = ["-j", what, "show", "table", &ROUTE_TABLE.to_string()].map(str::to_string);
        match self.ip(family, &args) {
            // `ip route show table N` fails when the kernel has no table N yet.
            Err(ApplyError::Failed { stderr, .. }) if stderr.contains("table does not exist") => {
                Ok("[]".into())
            }
            other => other,
        }
    }
}

impl Routing for SystemRouting {
    fn rules(&self, family: Family) -> Result<Vec<IpNet>, ApplyError> {
        let json = self.list(family, "rule")?;
        parse_listing(&json, true).map_err(|e| unreadable("ip -j rule show", &json, e))
    }

    fn routes(&self, family: Family) -> Result<Vec<IpNet>, ApplyError> {
        let json = self.list(family, "route")?;
        parse_listing(&json, false).map_err(|e| unreadable("ip -j route show", &json, e))
    }

    fn change(&self, change: &RouteChange) -> Result<(), ApplyError> {
        self.ip(change.family(), &change.args())?;
        tracing::debug!(command = %change.command_line(), netns = ?self.netns, "route changed");
        Ok(())
    }
}

fn unreadable(what: &str, json: &str, problem: String) -> ApplyError {
    ApplyError::Failed {
        program: "ip".into(),
        status: "exit status: 0".into(),
        stderr: String::new(),
        detail: format!("; cannot read the output of {what}: {problem}: {json:.200}"),
    }
}

/// The destinations in `ip -j rule show` (only the rules at [`RULE_PRIORITY`]) or
/// `ip -j route show` output. A route's `dst` is `NET/LEN` or a bare address for a host route;
/// a rule's is an address with `dstlen` beside it.
fn parse_listing(json: &str, rules: bool) -> Result<Vec<IpNet>, String> {
    let text = json.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let items: Vec<BTreeMap<String, serde_json::Value>> =
        serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for item in items {
        if rules && item.get("priority").and_then(|p| p.as_u64()) != Some(RULE_PRIORITY.into()) {
            continue;
        }
        let Some(dst) = item.get("dst").and_then(|d| d.as_str()) else {
            continue;
        };
        let net = if let Some(len) = item.get("dstlen").and_then(|l| l.as_u64()) {
            format!("{dst}/{len}").parse::<IpNet>().ok()
        } else if dst.contains('/') {
            dst.parse::<IpNet>().ok()
        } else {
            dst.parse::<std::net::IpAddr>().ok().map(IpNet::from)
        };
        // `all`, `default` and other words are not ours.
        if let Some(n) = net {
            out.push(n);
        }
    }
    Ok(out)
}

/// An in-memory rule list and table that refuse what `ip` refuses (adding a rule twice,
/// deleting what is not there) and record every change.
#[derive(Debug, Default)]
pub struct FakeRouting {
    state: Mutex<FakeRoutes>,
}

#[derive(Debug, Default)]
struct FakeRoutes {
    rules: Vec<IpNet>,
    routes: BTreeSet<IpNet>,
    changes: Vec<RouteChange>,
    no_v6: bool,
    no_ip: bool,
}

impl FakeRouting {
    pub fn new() -> Self {
        Self::default()
    }

    /// As if the host had IPv6 turned off.
    pub fn without_v6() -> Self {
        let rt = Self::default();
        rt.lock().no_v6 = true;
        rt
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeRoutes> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// As if iproute2 were not installed.
    pub fn without_ip() -> Self {
        let rt = Self::default();
        rt.lock().no_ip = true;
        rt
    }

    /// Every change so far, in order.
    pub fn changes(&self) -> Vec<RouteChange> {
        self.lock().changes.clone()
    }

    /// The rules and routes now: (rules in order, routes).
    pub fn state(&self) -> (Vec<IpNet>, Vec<IpNet>) {
        let s = self.lock();
        (s.rules.clone(), s.routes.iter().copied().collect())
    }

    /// What a host without `ip`, or without IPv6, answers.
    fn refuse(&self, family: Family) -> Result<(), ApplyError> {
        if self.lock().no_ip {
            return Err(ApplyError::Spawn {
                program: "ip".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        if family == Family::V6 && self.lock().no_v6 {
            return Err(ApplyError::Failed {
                program: "ip".into(),
                status: "exit status: 2".into(),
                stderr: "RTNETLINK answers: Address family not supported by protocol".into(),
                detail: String::new(),
            });
        }
        Ok(())
    }
}

fn in_family<'a>(nets: impl IntoIterator<Item = &'a IpNet>, family: Family) -> Vec<IpNet> {
    nets.into_iter()
        .filter(|n| Family::of(n) == family)
        .copied()
        .collect()
}

impl Routing for FakeRouting {
    fn rules(&self, family: Family) -> Result<Vec<IpNet>, ApplyError> {
        self.refuse(family)?;
        Ok(in_family(&self.lock().rules, family))
    }

    fn routes(&self, family: Family) -> Result<Vec<IpNet>, ApplyError> {
        self.refuse(family)?;
        Ok(in_family(&self.lock().routes, family))
    }

    fn change(&self, change: &RouteChange) -> Result<(), ApplyError> {
        self.refuse(change.family())?;
        let mut s = self.lock();
        let refused = |why: &str| ApplyError::Failed {
            program: "ip".into(),
            status: "exit status: 2".into(),
            stderr: why.into(),
            detail: format!("; the command was: {}", change.command_line()),
        };
        match change {
            RouteChange::AddRule(n) => {
                if s.rules.contains(n) {
                    return Err(refused("RTNETLINK answers: File exists"));
                }
                s.rules.push(*n);
            }
            RouteChange::DelRule(n) => match s.rules.iter().position(|r| r == n) {
                Some(i) => {
                    s.rules.remove(i);
                }
                None => return Err(refused("RTNETLINK answers: No such file or directory")),
            },
            RouteChange::AddRoute(n) => {
                s.routes.insert(*n);
            }
            RouteChange::DelRoute(n) => {
                if !s.routes.remove(n) {
                    return Err(refused("RTNETLINK answers: No such process"));
                }
            }
        }
        s.changes.push(change.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CidrSelection;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn config(vips: &[&str]) -> InterceptConfig {
        let c = InterceptConfig {
            service_cidrs: CidrSelection::List(vec![net("10.96.0.0/12"), net("fd00::/64")]),
            vip_cidrs: vips.iter().map(|v| net(v)).collect(),
            ..InterceptConfig::default()
        };
        c.validate().unwrap();
        c
    }

    #[test]
    fn commands_are_what_ip_takes() {
        let lines: Vec<String> = plan(&config(&["10.96.0.0/16", "fd00::/108"]))
            .iter()
            .map(RouteChange::command_line)
            .collect();
        assert_eq!(
            lines,
            [
                "ip route replace 10.96.0.0/16 dev lo table 15001",
                "ip -6 route replace fd00::/108 dev lo table 15001",
                "ip rule add priority 15001 to 10.96.0.0/16 lookup 15001",
                "ip -6 rule add priority 15001 to fd00::/108 lookup 15001",
            ]
        );
        assert_eq!(
            RouteChange::DelRule(net("10.96.0.0/16")).command_line(),
            "ip rule del priority 15001 to 10.96.0.0/16 lookup 15001"
        );
        assert_eq!(
            RouteChange::DelRoute(net("fd00::/108")).command_line(),
            "ip -6 route del fd00::/108 table 15001"
        );
    }

    #[test]
    fn install_converges_and_twice_is_the_same() {
        let rt = FakeRouting::new();
        install_routes(
            &rt,
            &config(&["10.96.0.0/16", "10.97.0.0/16", "fd00::/108"]),
        )
        .unwrap();
        let first = rt.state();
        assert_eq!(
            first,
            (
                vec![net("10.96.0.0/16"), net("10.97.0.0/16"), net("fd00::/108")],
                vec![net("10.96.0.0/16"), net("10.97.0.0/16"), net("fd00::/108")]
            )
        );
        // Routes before rules: no rule ever points at a missing route.
        let changes = rt.changes();
        let first_rule = changes
            .iter()
            .position(|c| matches!(c, RouteChange::AddRule(_)))
            .unwrap();
        assert!(changes[..first_rule]
            .iter()
            .all(|c| matches!(c, RouteChange::AddRoute(_))));

        // Again: the same state, and no rule added twice (the fake refuses that, as ip does).
        install_routes(
            &rt,
            &config(&["10.96.0.0/16", "10.97.0.0/16", "fd00::/108"]),
        )
        .unwrap();
        assert_eq!(rt.state(), first);

        // A changed config: the new network added before the old one is removed.
        let n = rt.changes().len();
        install_routes(&rt, &config(&["10.96.0.0/16", "10.98.0.0/16"])).unwrap();
        assert_eq!(
            rt.state(),
            (
                vec![net("10.96.0.0/16"), net("10.98.0.0/16")],
                vec![net("10.96.0.0/16"), net("10.98.0.0/16")]
            )
        );
        let later = rt.changes()[n..].to_vec();
        let added = later
            .iter()
            .position(|c| *c == RouteChange::AddRule(net("10.98.0.0/16")))
            .unwrap();
        let removed = later
            .iter()
            .position(|c| *c == RouteChange::DelRule(net("10.97.0.0/16")))
            .unwrap();
        assert!(added < removed, "{later:?}");
        assert!(later.contains(&RouteChange::DelRoute(net("fd00::/108"))));

        // Nothing configured: everything of ours goes.
        install_routes(&rt, &config(&[])).unwrap();
        assert_eq!(rt.state(), (vec![], vec![]));
    }

    #[test]
    fn cleanup_removes_all_and_reports_whether_there_was_anything() {
        let rt = FakeRouting::new();
        assert!(!cleanup_routes(&rt).unwrap());
        install_routes(&rt, &config(&["10.96.0.0/16", "fd00::/108"])).unwrap();
        assert!(cleanup_routes(&rt).unwrap());
        assert_eq!(rt.state(), (vec![], vec![]));
        assert!(!cleanup_routes(&rt).unwrap());
    }

    #[test]
    fn a_host_without_ipv6_needs_it_only_for_ipv6_networks() {
        let rt = FakeRouting::without_v6();
        install_routes(&rt, &config(&["10.96.0.0/16"])).unwrap();
        assert!(cleanup_routes(&rt).unwrap());
        let e = install_routes(&rt, &config(&["fd00::/108"])).unwrap_err();
        assert!(
            e.to_string().contains("Address family not supported"),
            "{e}"
        );
    }

    #[test]
    fn a_host_without_ip_has_no_routes_to_remove_and_cannot_get_any() {
        let rt = FakeRouting::without_ip();
        assert!(!cleanup_routes(&rt).unwrap());
        install_routes(&rt, &config(&[])).unwrap();
        let e = install_routes(&rt, &config(&["10.96.0.0/16"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot run ip: entity not found (is the iproute2 package installed?)"
        );
    }

    #[test]
    fn listings_of_ip_json() {
        let rules = r#"[{"priority":15001,"src":"all","dst":"10.96.0.0","dstlen":12,"table":"15001"},
            {"priority":15001,"src":"all","dst":"10.1.2.3","table":"15001"},
            {"priority":100,"src":"all","dst":"10.50.0.0","dstlen":16,"table":"15001"},
            {"priority":15001,"src":"10.0.0.0","srclen":8,"table":"15001"},
            {"priority":15001,"src":"all","dst":"fd00::","dstlen":108,"table":"15001"}]"#;
        assert_eq!(
            parse_listing(rules, true).unwrap(),
            vec![net("10.96.0.0/12"), net("10.1.2.3/32"), net("fd00::/108")]
        );
        let routes = r#"[{"dst":"10.96.0.0/12","dev":"lo","scope":"link","flags":[]},
            {"dst":"10.1.2.3","dev":"lo","scope":"link","flags":[]},
            {"dst":"default","dev":"lo","flags":[]}]"#;
        assert_eq!(
            parse_listing(routes, false).unwrap(),
            vec![net("10.96.0.0/12"), net("10.1.2.3/32")]
        );
        assert_eq!(parse_listing("", false).unwrap(), vec![]);
        assert!(parse_listing("[{", true).is_err());
    }
}
