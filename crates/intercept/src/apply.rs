//! Installing and removing the rules through [`Netfilter`].
//!
//! [`install`] reads what an earlier install left (`iptables-save -t nat`) and replaces it in a
//! single `iptables-restore --noflush` transaction: the chains are flushed and rebuilt, old
//! jumps deleted and re-inserted at position 1. Running it twice gives the same ruleset.
//! [`cleanup`] removes every `ISTHMUS_*` chain and every jump into one, and does nothing when
//! there is nothing.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::config::{CidrSelection, InterceptConfig};
pub use crate::rules::Family;
use crate::rules::{existing, needs_v6, render, render_cleanup, render_family};

/// The kernel's packet filter, as the iptables tools show it.
pub trait Netfilter {
    /// Applies `rules` (iptables-restore text) without flushing what they don't name.
    fn restore(&self, family: Family, rules: &str) -> Result<(), ApplyError>;
    /// The `iptables-save` text of one table.
    fn save(&self, family: Family, table: &str) -> Result<String, ApplyError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot run {program}: {source} ({})", spawn_hint(program, source))]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}{detail}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
        /// The rule iptables-restore named, and what to do about a permission error.
        detail: String,
    },
}

/// Why a tool could not be started: not on PATH though installed (a user's PATH without the
/// sbin directories), or not installed at all.
fn spawn_hint(program: &str, source: &std::io::Error) -> String {
    if source.kind() != std::io::ErrorKind::NotFound {
        return format!("is the {} package installed?", package_of(program));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    spawn_hint_in(
        program,
        &path,
        &["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"],
    )
}

fn spawn_hint_in(program: &str, path: &str, dirs: &[&str]) -> String {
    let tool = program.rsplit(' ').next().unwrap_or(program);
    let on_path = |dir: &std::path::Path| path.split(':').any(|p| std::path::Path::new(p) == dir);
    match dirs
        .iter()
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.is_file())
    {
        // Found where PATH looks: the failure is not about PATH.
        Some(found) if found.parent().is_some_and(on_path) => {
            format!("is the {} package installed?", package_of(tool))
        }
        Some(found) => format!(
            "{tool} is installed at {} but that directory is not on PATH ({path}): add {} to PATH, or run as root with a full PATH",
            found.display(),
            found.parent().map_or(String::new(), |d| d.display().to_string())
        ),
        None => format!(
            "{tool} is not installed: install the {} package (apt-get install {})",
            package_of(tool),
            package_of(tool)
        ),
    }
}

fn package_of(program: &str) -> &'static str {
    if program == "ip" {
        "iproute2"
    } else {
        "iptables"
    }
}

/// Runs the iptables tools, optionally inside a named network namespace (`ip netns exec`).
#[derive(Debug, Clone, Default)]
pub struct SystemNetfilter {
    netns: Option<String>,
}

/// One call made to a [`FakeNetfilter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetfilterCall {
    Restore { family: Family, rules: String },
    Save { family: Family, table: String },
}

/// An in-memory netfilter that checks restore text the way iptables-restore does for the
/// commands Isthmus emits (`:chain`, `-A`, `-I`, `-D`, `-X`, `-F`, `COMMIT`), applies each
/// table atomically, and records every call.
#[derive(Debug, Default)]
pub struct FakeNetfilter {
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    tables: BTreeMap<(Family, String), FakeTable>,
    calls: Vec<NetfilterCall>,
    v6_missing: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FakeTable {
    /// Chain name to its rule specs; builtin chains first, in kernel order.
    chains: Vec<(String, Vec<String>)>,
}

/// Installs (or re-installs) the rules for `config`.
pub fn install(nf: &dyn Netfilter, config: &InterceptConfig) -> Result<(), ApplyError> {
    let before = existing(&nf.save(Family::V4, "nat")?);
    nf.restore(Family::V4, &render_family(config, Family::V4, &before))?;
    if needs_v6(config) {
        let before = existing(&nf.save(Family::V6, "nat")?);
        nf.restore(Family::V6, &render_family(config, Family::V6, &before))?;
    } else {
        // An earlier config may have had IPv6 networks; a host without ip6tables has nothing.
        match cleanup_family(nf, Family::V6) {
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "no IPv6 rules to remove"),
        }
    }
    Ok(())
}

/// Removes every Isthmus chain and jump. Returns whether there was anything to remove.
/// IPv6 is skipped when ip6tables is not there.
pub fn cleanup(nf: &dyn Netfilter) -> Result<bool, ApplyError> {
    let v4 = cleanup_family(nf, Family::V4)?;
    let v6 = match cleanup_family(nf, Family::V6) {
        Ok(removed) => removed,
        Err(e @ ApplyError::Spawn { .. }) => {
            tracing::debug!(error = %e, "ip6tables not available, no IPv6 rules to remove");
            false
        }
        Err(e) => return Err(e),
    };
    Ok(v4 || v6)
}

fn cleanup_family(nf: &dyn Netfilter, family: Family) -> Result<bool, ApplyError> {
    match render_cleanup(&existing(&nf.save(family, "nat")?)) {
        Some(rules) => nf.restore(family, &rules).map(|()| true),
        None => Ok(false),
    }
}

/// What `isthmus iptables --dry-run` prints: the restore text of a fresh install, per family.
pub fn dry_run(config: &InterceptConfig) -> String {
    let rules = render(config);
    let mut out = String::new();
    if config.service_cidrs == CidrSelection::Unset {
        out.push_str(
            "# Outbound: not captured (ISTIO_SERVICE_CIDR is unset; `*` captures everything)\n",
        );
    }
    out.push_str("# IPv4: iptables-restore --noflush\n");
    out.push_str(&rules.v4);
    match rules.v6 {
        Some(v6) => {
            out.push_str("# IPv6: ip6tables-restore --noflush\n");
            out.push_str(&v6);
        }
        None => out.push_str("# IPv6: not captured (no IPv6 network in ISTIO_SERVICE_CIDR)\n"),
    }
    // Comments, so that the text stays valid iptables-restore input.
    let plan = crate::routes::plan(config);
    if plan.is_empty() {
        out.push_str("# Routes: none (ISTHMUS_VIP_CIDR is empty)\n");
    } else {
        out.push_str("# Routes: the VIP networks through loopback (ISTHMUS_VIP_CIDR)\n");
        for change in plan {
            out.push_str(&format!("#   {}\n", change.command_line()));
        }
    }
    out
}

impl SystemNetfilter {
    /// The host's own network namespace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inside the named namespace (`ip netns exec NAME ...`).
    pub fn in_netns(name: impl Into<String>) -> Self {
        Self {
            netns: Some(name.into()),
        }
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }
}

fn program(family: Family, tool: &str) -> String {
    match family {
        Family::V4 => format!("iptables-{tool}"),
        Family::V6 => format!("ip6tables-{tool}"),
    }
}

fn failure(
    program: &str,
    status: std::process::ExitStatus,
    stderr: &[u8],
    input: &str,
) -> ApplyError {
    let stderr = String::from_utf8_lossy(stderr).trim().to_string();
    // iptables-restore says "line N failed"; show that line.
    let failed_rule = stderr
        .split("line ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| input.lines().nth(n.checked_sub(1)?))
        .map(str::to_string);
    let hint = permission_hint(&stderr);
    ApplyError::Failed {
        program: program.to_string(),
        status: status.to_string(),
        stderr,
        detail: detail(failed_rule.as_deref(), hint),
    }
}

/// What to add to a tool's refusal for lack of privilege.
pub(crate) fn permission_hint(stderr: &str) -> &'static str {
    if stderr.contains("Permission denied") || stderr.contains("not permitted") {
        " (this needs root or CAP_NET_ADMIN)"
    } else {
        ""
    }
}

fn detail(failed_rule: Option<&str>, hint: &str) -> String {
    match failed_rule {
        Some(rule) => format!("; the rule was: {rule}{hint}"),
        None => hint.to_string(),
    }
}

impl Netfilter for SystemNetfilter {
    fn restore(&self, family: Family, rules: &str) -> Result<(), ApplyError> {
        let program = program(family, "restore");
        let spawn = |source| ApplyError::Spawn {
            program: program.clone(),
            source,
        };
        let mut child = self
            .command(&program)
            .args(["--noflush", "--wait", "10"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(rules.as_bytes()).map_err(spawn)?;
        }
        let out = child.wait_with_output().map_err(spawn)?;
        if !out.status.success() {
            return Err(failure(&program, out.status, &out.stderr, rules));
        }
        tracing::debug!(%program, netns = ?self.netns, "rules restored");
        Ok(())
    }

    fn save(&self, family: Family, table: &str) -> Result<String, ApplyError> {
        let program = program(family, "save");
        let out = self
            .command(&program)
            .args(["-t", table])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ApplyError::Spawn {
                program: program.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(failure(&program, out.status, &out.stderr, ""));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl FakeNetfilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// As if ip6tables were not installed.
    pub fn without_v6() -> Self {
        let nf = Self::default();
        nf.lock().v6_missing = true;
        nf
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A test that panicked while holding the lock has failed already; keep the state.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<NetfilterCall> {
        self.lock().calls.clone()
    }

    /// The rules of `chain` in the nat table, in order.
    pub fn nat_chain(&self, family: Family, chain: &str) -> Option<Vec<String>> {
        let state = self.lock();
        let table = state.tables.get(&(family, "nat".to_string()))?;
        table
            .chains
            .iter()
            .find(|(n, _)| n == chain)
            .map(|(_, r)| r.clone())
    }

    fn missing(&self, family: Family, tool: &str) -> Option<ApplyError> {
        (family == Family::V6 && self.lock().v6_missing).then(|| ApplyError::Spawn {
            program: program(family, tool),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }
}

fn builtin_chains(table: &str) -> &'static [&'static str] {
    match table {
        "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        "filter" => &["INPUT", "FORWARD", "OUTPUT"],
        "mangle" => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
        _ => &["PREROUTING", "OUTPUT"],
    }
}

fn is_target(t: &str) -> bool {
    matches!(
        t,
        "ACCEPT"
            | "DROP"
            | "RETURN"
            | "REJECT"
            | "REDIRECT"
            | "DNAT"
            | "SNAT"
            | "MASQUERADE"
            | "LOG"
            | "MARK"
            | "TPROXY"
            | "CONNMARK"
    )
}

impl FakeTable {
    fn new(table: &str) -> Self {
        Self {
            chains: builtin_chains(table)
                .iter()
                .map(|c| (c.to_string(), Vec::new()))
                .collect(),
        }
    }

    fn chain(&mut self, name: &str) -> Result<&mut Vec<String>, String> {
        self.chains
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
            .ok_or_else(|| format!("chain {name} does not exist"))
    }

    fn referenced(&self, name: &str) -> bool {
        self.chains.iter().flat_map(|(_, r)| r).any(|spec| {
            spec.split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| matches!(w[0], "-j" | "-g") && w[1] == name)
        })
    }

    fn check_jumps(&self) -> Result<(), String> {
        for spec in self.chains.iter().flat_map(|(_, r)| r) {
            let tokens: Vec<&str> = spec.split_whitespace().collect();
            for w in tokens.windows(2) {
                if matches!(w[0], "-j" | "-g")
                    && !is_target(w[1])
                    && !self.chains.iter().any(|(n, _)| n == w[1])
                {
                    return Err(format!("jump to missing chain {}", w[1]));
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, line: &str) -> Result<(), String> {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let (cmd, chain) = match tokens.as_slice() {
            [cmd, chain, ..] => (*cmd, *chain),
            _ => return Err("short command".to_string()),
        };
        let spec = |from: usize| tokens.get(from..).unwrap_or_default().join(" ");
        match cmd {
            "-A" => self.chain(chain)?.push(spec(2)),
            "-I" => {
                let (pos, from) = match tokens.get(2).and_then(|t| t.parse::<usize>().ok()) {
                    Some(n) => (n, 3),
                    None => (1, 2),
                };
                let rules = self.chain(chain)?;
                if pos == 0 || pos > rules.len() + 1 {
                    return Err(format!("index {pos} out of range"));
                }
                rules.insert(pos - 1, spec(from));
            }
            "-D" => {
                let want = spec(2);
                let rules = self.chain(chain)?;
                let i = rules
                    .iter()
                    .position(|r| *r == want)
                    .ok_or_else(|| format!("no rule {want:?} in {chain}"))?;
                rules.remove(i);
            }
            "-F" => self.chain(chain)?.clear(),
            "-X" => {
                if !self.chain(chain)?.is_empty() {
                    return Err(format!("chain {chain} is not empty"));
                }
                if self.referenced(chain) {
                    return Err(format!("chain {chain} is still referenced"));
                }
                self.chains.retain(|(n, _)| n != chain);
            }
            _ => return Err(format!("unknown command {cmd}")),
        }
        Ok(())
    }
}

impl Netfilter for FakeNetfilter {
    fn restore(&self, family: Family, rules: &str) -> Result<(), ApplyError> {
        if let Some(e) = self.missing(family, "restore") {
            return Err(e);
        }
        let mut state = self.lock();
        state.calls.push(NetfilterCall::Restore {
            family,
            rules: rules.to_string(),
        });
        let fail = |n: usize, why: String| ApplyError::Failed {
            program: program(family, "restore"),
            status: "exit status: 1".to_string(),
            stderr: format!("line {n} failed: {why}"),
            detail: detail(rules.lines().nth(n.saturating_sub(1)), ""),
        };
        let mut staged = state.tables.clone();
        let mut current: Option<(String, FakeTable)> = None;
        for (i, line) in rules.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                let table = staged
                    .get(&(family, name.to_string()))
                    .cloned()
                    .unwrap_or_else(|| FakeTable::new(name));
                current = Some((name.to_string(), table));
                continue;
            }
            let Some((name, table)) = current.as_mut() else {
                return Err(fail(n, "no table selected".to_string()));
            };
            if line == "COMMIT" {
                table.check_jumps().map_err(|why| fail(n, why))?;
                staged.insert((family, name.clone()), table.clone());
                current = None;
            } else if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap_or_default();
                // With --noflush a builtin chain's declaration only sets its policy.
                if !builtin_chains(name).contains(&chain) {
                    match table.chain(chain) {
                        Ok(rules) => rules.clear(),
                        Err(_) => table.chains.push((chain.to_string(), Vec::new())),
                    }
                }
            } else {
                table.apply(line).map_err(|why| fail(n, why))?;
            }
        }
        if current.is_some() {
            return Err(fail(rules.lines().count(), "no COMMIT".to_string()));
        }
        state.tables = staged;
        Ok(())
    }

    fn save(&self, family: Family, table: &str) -> Result<String, ApplyError> {
        if let Some(e) = self.missing(family, "save") {
            return Err(e);
        }
        let mut state = self.lock();
        state.calls.push(NetfilterCall::Save {
            family,
            table: table.to_string(),
        });
        let Some(t) = state.tables.get(&(family, table.to_string())) else {
            return Ok(String::new());
        };
        let mut out = format!("# Generated by the fake\n*{table}\n");
        for (name, _) in &t.chains {
            let policy = if builtin_chains(table).contains(&name.as_str()) {
                "ACCEPT"
            } else {
                "-"
            };
            out.push_str(&format!(":{name} {policy} [0:0]\n"));
        }
        for (name, rules) in &t.chains {
            for r in rules {
                out.push_str(&format!("-A {name} {r}\n"));
            }
        }
        out.push_str("COMMIT\n");
        Ok(out)
    }
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

    const DOCKER_LIKE: &str = "*nat\n:DOCKER - [0:0]\n-A DOCKER -j RETURN\n\
        -A OUTPUT -d 10.0.0.0/8 -j ACCEPT\n-A OUTPUT -j DOCKER\n\
        -A PREROUTING -j DOCKER\nCOMMIT\n";

    fn saved(nf: &FakeNetfilter, family: Family) -> String {
        nf.save(family, "nat").unwrap()
    }

    #[test]
    fn install_puts_jumps_first_and_reinstall_is_idempotent() {
        let nf = FakeNetfilter::new();
        nf.restore(Family::V4, DOCKER_LIKE).unwrap();
        let c = config("ISTIO_SERVICE_CIDR=10.96.0.0/12\nISTIO_INBOUND_PORTS=8080\nISTIO_META_DNS_CAPTURE=true");
        install(&nf, &c).unwrap();
        let first = saved(&nf, Family::V4);
        let output = nf.nat_chain(Family::V4, "OUTPUT").unwrap();
        assert_eq!(
            output,
            vec![
                "-p udp --dport 53 -j ISTHMUS_DNS",
                "-p tcp -j ISTHMUS_OUTPUT",
                "-d 10.0.0.0/8 -j ACCEPT",
                "-j DOCKER",
            ]
        );
        assert_eq!(
            nf.nat_chain(Family::V4, "PREROUTING").unwrap(),
            vec!["-p tcp -j ISTHMUS_INBOUND", "-j DOCKER"]
        );

        install(&nf, &c).unwrap();
        assert_eq!(saved(&nf, Family::V4), first);

        // Something else inserted itself ahead of the jump: a re-install moves it back first.
        nf.restore(Family::V4, "*nat\n-I OUTPUT 1 -j DOCKER\nCOMMIT\n")
            .unwrap();
        assert_eq!(nf.nat_chain(Family::V4, "OUTPUT").unwrap()[0], "-j DOCKER");
        install(&nf, &c).unwrap();
        let output = nf.nat_chain(Family::V4, "OUTPUT").unwrap();
        assert_eq!(
            output[..3],
            [
                "-p udp --dport 53 -j ISTHMUS_DNS",
                "-p tcp -j ISTHMUS_OUTPUT",
                "-j DOCKER"
            ]
        );
        assert_eq!(
            output
                .iter()
                .filter(|r| r.contains("ISTHMUS_OUTPUT"))
                .count(),
            1
        );
    }

    #[test]
    fn changing_config_removes_chains_no_longer_needed() {
        let nf = FakeNetfilter::new();
        install(
            &nf,
            &config("ISTIO_INBOUND_PORTS=*\nISTIO_META_DNS_CAPTURE=true"),
        )
        .unwrap();
        assert!(nf.nat_chain(Family::V4, "ISTHMUS_DNS").is_some());
        install(&nf, &config("")).unwrap();
        for gone in ["ISTHMUS_DNS", "ISTHMUS_INBOUND", "ISTHMUS_IN_REDIRECT"] {
            assert_eq!(nf.nat_chain(Family::V4, gone), None, "{gone}");
        }
        assert_eq!(
            nf.nat_chain(Family::V4, "OUTPUT").unwrap(),
            vec!["-p tcp -j ISTHMUS_OUTPUT"]
        );
        assert_eq!(
            nf.nat_chain(Family::V4, "PREROUTING").unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn cleanup_restores_the_table_and_is_safe_when_nothing_is_installed() {
        let nf = FakeNetfilter::new();
        assert!(!cleanup(&nf).unwrap());
        assert!(nf
            .calls()
            .iter()
            .all(|c| matches!(c, NetfilterCall::Save { .. })));

        nf.restore(Family::V4, DOCKER_LIKE).unwrap();
        let before = saved(&nf, Family::V4);
        install(
            &nf,
            &config("ISTIO_SERVICE_CIDR=10.96.0.0/12,fd00::/64\nISTIO_INBOUND_PORTS=*\nISTIO_META_DNS_CAPTURE=1"),
        )
        .unwrap();
        assert!(nf.nat_chain(Family::V6, "ISTHMUS_OUTPUT").is_some());
        assert!(cleanup(&nf).unwrap());
        assert_eq!(saved(&nf, Family::V4), before);
        assert_eq!(nf.nat_chain(Family::V6, "ISTHMUS_OUTPUT"), None);
        assert_eq!(
            nf.nat_chain(Family::V6, "OUTPUT").unwrap(),
            Vec::<String>::new()
        );
        assert!(!cleanup(&nf).unwrap());
    }

    #[test]
    fn dropping_ipv6_networks_removes_the_ipv6_rules() {
        let nf = FakeNetfilter::new();
        install(&nf, &config("ISTIO_SERVICE_CIDR=fd00::/64")).unwrap();
        assert!(nf.nat_chain(Family::V6, "ISTHMUS_OUTPUT").is_some());
        install(&nf, &config("ISTIO_SERVICE_CIDR=10.96.0.0/12")).unwrap();
        assert_eq!(nf.nat_chain(Family::V6, "ISTHMUS_OUTPUT"), None);
    }

    #[test]
    fn missing_ip6tables_is_fine_unless_ipv6_is_asked_for() {
        let nf = FakeNetfilter::without_v6();
        install(&nf, &config("")).unwrap();
        assert!(cleanup(&nf).unwrap());
        let e = install(&nf, &config("ISTIO_SERVICE_CIDR=fd00::/64")).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot run ip6tables-save: "),
            "{e}"
        );
    }

    #[test]
    fn restore_errors_show_the_failing_rule_and_change_nothing() {
        let nf = FakeNetfilter::new();
        nf.restore(Family::V4, DOCKER_LIKE).unwrap();
        let before = saved(&nf, Family::V4);
        let e = nf
            .restore(
                Family::V4,
                "*nat\n:ISTHMUS_X - [0:0]\n-A ISTHMUS_X -j RETURN\n-D OUTPUT -j NOPE\nCOMMIT\n",
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "iptables-restore failed (exit status: 1): line 4 failed: no rule \"-j NOPE\" in \
             OUTPUT; the rule was: -D OUTPUT -j NOPE"
        );
        assert_eq!(saved(&nf, Family::V4), before);
    }

    #[test]
    fn dry_run_prints_both_families() {
        let text = dry_run(&config(""));
        assert!(
            text.starts_with(
                "# Outbound: not captured (ISTIO_SERVICE_CIDR is unset; `*` captures \
                 everything)\n# IPv4: iptables-restore --noflush\n*nat\n"
            ),
            "{text}"
        );
        assert!(text.ends_with(
            "COMMIT\n# IPv6: not captured (no IPv6 network in ISTIO_SERVICE_CIDR)\n\
             # Routes: none (ISTHMUS_VIP_CIDR is empty)\n"
        ));
        let text = dry_run(&config(
            "ISTIO_SERVICE_CIDR=10.96.0.0/12,fd00::/64\nISTHMUS_VIP_CIDR=10.96.0.0/12",
        ));
        assert!(
            text.ends_with(
                "# Routes: the VIP networks through loopback (ISTHMUS_VIP_CIDR)\n\
                 #   ip route replace 10.96.0.0/12 dev lo table 15001\n\
                 #   ip rule add priority 15001 to 10.96.0.0/12 lookup 15001\n"
            ),
            "{text}"
        );
        // Still iptables-restore input as a whole: every line of the routes is a comment.
        assert!(text
            .lines()
            .skip_while(|l| !l.starts_with("# Routes"))
            .all(|l| l.starts_with('#')));
        assert!(
            text.contains("# IPv6: ip6tables-restore --noflush\n*nat\n"),
            "{text}"
        );
        assert!(text.contains("-A ISTHMUS_OUTPUT -d fd00::/64 -j ISTHMUS_REDIRECT\n"));
    }

    #[test]
    fn real_failure_parsing_picks_the_line() {
        use std::os::unix::process::ExitStatusExt as _;
        let e = failure(
            "iptables-restore",
            std::process::ExitStatus::from_raw(256),
            b"iptables-restore: line 2 failed\n",
            "*nat\n-A BAD -j X\nCOMMIT\n",
        );
        assert_eq!(
            e.to_string(),
            "iptables-restore failed (exit status: 1): iptables-restore: line 2 failed; the rule \
             was: -A BAD -j X"
        );
    }

    #[test]
    fn a_tool_off_path_is_told_apart_from_a_missing_package() {
        let dir = tempfile_dir();
        std::fs::write(dir.join("iptables-restore"), "").unwrap();
        let d = dir.display().to_string();
        assert_eq!(
            spawn_hint_in("iptables-restore", "/usr/bin:/bin", &[&d]),
            format!("iptables-restore is installed at {d}/iptables-restore but that directory is not on PATH (/usr/bin:/bin): add {d} to PATH, or run as root with a full PATH")
        );
        assert_eq!(
            spawn_hint_in("iptables-restore", &format!("/usr/bin:{d}"), &[&d]),
            "is the iptables package installed?"
        );
        assert_eq!(
            spawn_hint_in("ip6tables-save", "/usr/bin", &[&d]),
            "ip6tables-save is not installed: install the iptables package (apt-get install iptables)"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("isthmus-spawn-hint-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
