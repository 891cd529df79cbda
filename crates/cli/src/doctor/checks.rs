//! Each check: gather through [`Probes`], then decide. Messages name what was looked at; fixes
//! are one line a person can act on.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use isthmus_agent::identity::{StoreError, WorkloadCertificate};
use isthmus_agent_config::AgentEnv;
use isthmus_ca::cert::{parse_pem_certs, CERT_CHAIN_FILE, KEY_FILE};
use isthmus_ca::{CertError, CertInfo, TokenClaims};
use isthmus_intercept::{EnvFile, InterceptConfig};
use rustls::CertificateError;
use serde_json::Value;

use super::{
    families, under, CheckResult, DialOutcome, DnsFailure, HostConfig, Probes, TlsOutcome,
    AGENT_ENV, CLUSTER_ENV, SIDECAR_ENV,
};

pub(super) const NAMES: [&str; 8] = [
    "config",
    "control-plane",
    "clock",
    "certificate",
    "agent",
    "rules",
    "dns",
    "connection",
];

/// Below this share of its lifetime left, a certificate fails: the agent renews at half.
const MIN_LIFETIME_LEFT_PERCENT: u32 = 10;
const JOURNAL: &str = "`journalctl -u isthmus-agent`";

fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// An address the agent listens on, as a local client reaches it.
pub(super) fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// `https://host:port[/]` (CA_ADDR) → host and port.
#[cfg(test)]
pub(super) fn parse_ca_addr(value: &str) -> Result<(String, u16), String> {
    let a: isthmus_agent_config::CaAddr = value
        .parse()
        .map_err(|e: isthmus_agent_config::CaAddrError| e.to_string())?;
    Ok((a.host().to_string(), a.port()))
}

// ---- 1. config ----

pub(super) fn config(root: &Path) -> (CheckResult, Option<HostConfig>) {
    const NAME: &str = "config";
    let join_fix = "install the host's files: `isthmus join DIR` with what `isthmus vm config` wrote (see docs/host-layout.md)";
    let env = match EnvFile::read(&under(root, Path::new(AGENT_ENV))) {
        Ok(e) => e,
        Err(e) => return (CheckResult::fail(NAME, e.to_string(), join_fix), None),
    };
    // (problem, fix), first one's fix is shown
    let mut problems: Vec<(String, String)> = Vec::new();
    let settings = match AgentEnv::parse(&env) {
        Ok(s) => Some(s),
        Err(errors) => {
            for e in &errors {
                problems.push((e.to_string(), e.fix()));
            }
            None
        }
    };

    // The seeds' files: both must be there (join installs them) and valid.
    let mut files = Vec::new();
    for p in [CLUSTER_ENV, SIDECAR_ENV] {
        match EnvFile::read(&under(root, Path::new(p))) {
            Ok(f) => files.push(f),
            Err(e) => problems.push((e.to_string(), join_fix.to_string())),
        }
    }
    let capture = settings.as_ref().is_some_and(|s| s.capture);
    let intercept = match files.as_slice() {
        [cluster, sidecar] => match InterceptConfig::from_env(cluster, sidecar, &[]) {
            Ok(c) => {
                // The agent refuses to capture without ISTIO_SERVICE_CIDR: say so here too.
                if let (true, Err(e)) = (capture, c.check_capture(cluster)) {
                    problems.push((
                        e.to_string(),
                        format!("set ISTIO_SERVICE_CIDR in {CLUSTER_ENV}"),
                    ));
                }
                Some(c)
            }
            Err(e) => {
                problems.push((e.to_string(), "correct the variable named above".into()));
                None
            }
        },
        _ => None,
    };

    let cfg = settings.map(|s| HostConfig {
        root: root.to_path_buf(),
        ca_addr: s.ca_addr.to_string(),
        ca_host: s.ca_addr.host().to_string(),
        ca_port: s.ca_addr.port(),
        ca_server_name: s.ca_server_name.clone(),
        root_cert: s.root_cert_path(),
        cert_dir: s.cert_dir.clone(),
        token_file: s.join_token_file.clone(),
        capture: s.capture,
        readiness: s.readiness_addr,
        admin: s.admin_addr,
        metrics: s.metrics_addr,
        dns: s.dns_addr,
        svc_ip: s.svc_ip,
        domain: s.domain.clone(),
        intercept,
    });
    let result = match (problems.first(), &cfg) {
        (None, Some(c)) => CheckResult::pass(
            NAME,
            format!(
                "agent.env, cluster.env and sidecar.env valid (CA_ADDR {}, capture {})",
                c.ca_addr,
                if c.capture { "on" } else { "off" }
            ),
        ),
        (Some((_, fix)), _) => CheckResult::fail(
            NAME,
            problems
                .iter()
                .map(|(p, _)| p.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            fix.clone(),
        ),
        // parse gives settings or errors, never neither
        (None, None) => CheckResult::fail(NAME, "agent.env unreadable", join_fix),
    };
    (result, cfg)
}

// ---- 2. control plane ----

pub(super) struct ControlPlane {
    pub result: CheckResult,
    pub tls: Option<TlsOutcome>,
}

pub(super) async fn control_plane(probes: &impl Probes, cfg: &HostConfig) -> ControlPlane {
    const NAME: &str = "control-plane";
    let addr = match probes.resolve_host(&cfg.ca_host, cfg.ca_port).await {
        Ok(a) => a,
        Err(e) => {
            return ControlPlane {
                result: CheckResult::fail(
                    NAME,
                    format!("cannot resolve {} (CA_ADDR {}): {e}", cfg.ca_host, cfg.ca_addr),
                    format!("add `<control plane IP> {}` to /etc/hosts (`isthmus join` does), or put the IP in CA_ADDR", cfg.ca_host),
                ),
                tls: None,
            }
        }
    };
    let roots_path = cfg.path(&cfg.root_cert);
    let roots = std::fs::read_to_string(&roots_path)
        .map_err(|e| e.to_string())
        .and_then(|pem| {
            parse_pem_certs(&pem, &cfg.root_cert.display().to_string()).map_err(|e| e.to_string())
        });
    let tls = probes
        .tls(
            addr,
            &cfg.ca_server_name,
            roots.as_deref().unwrap_or_default(),
        )
        .await;
    let root = cfg.root_cert.display();
    let roots_fix = format!("put the mesh's root in {root}: `isthmus vm certs -o DIR` on the control plane writes it (or re-run `isthmus join`)");
    let result = match &tls {
        TlsOutcome::Unreachable(e) => CheckResult::fail(
            NAME,
            format!("unreachable: cannot connect to {addr} (CA_ADDR {}): {e}", cfg.ca_addr),
            format!("start `isthmus server` there, or open TCP {} from this host to it", cfg.ca_port),
        ),
        TlsOutcome::Handshake(e) => CheckResult::fail(
            NAME,
            format!("{addr} accepts TCP but the TLS handshake failed: {e}"),
            "check that CA_ADDR points at the control plane's gRPC port (15012), not another service",
        ),
        TlsOutcome::Done { verdict, elapsed, .. } => match (verdict, &roots) {
            (_, Err(e)) => CheckResult::fail(
                NAME,
                format!("reached {addr}, but {root} is unusable to check it: {e}"),
                roots_fix,
            ),
            (None, Ok(_)) => CheckResult::pass(
                NAME,
                format!(
                    "reached {} in {} ms; its certificate chains to {root} and names {}",
                    cfg.ca_addr,
                    elapsed.as_millis(),
                    cfg.ca_server_name
                ),
            ),
            (Some(rustls::Error::InvalidCertificate(c)), Ok(_)) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    CheckResult::fail(
                        NAME,
                        format!("wrong root: reached {addr}, but its certificate does not chain to {root}"),
                        roots_fix,
                    )
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => CheckResult::fail(
                    NAME,
                    format!("reached {addr}, its certificate chains to {root} but does not carry the name {:?} (ISTHMUS_CA_SERVER_NAME)", cfg.ca_server_name),
                    format!("set ISTHMUS_CA_SERVER_NAME in {AGENT_ENV} to a name of the control plane (default {}), or give the server --server-dns-name", isthmus_agent_config::defaults::CA_SERVER_NAME),
                ),
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => CheckResult::fail(
                    NAME,
                    format!("reached {addr}, but its certificate is outside its validity period by this host's clock ({c:?})"),
                    "sync this host's clock (see clock): `timedatectl set-ntp true`",
                ),
                other => CheckResult::fail(
                    NAME,
                    format!("reached {addr}, but its certificate is refused: {other:?}"),
                    roots_fix,
                ),
            },
            (Some(other), Ok(_)) => CheckResult::fail(
                NAME,
                format!("reached {addr}, but its certificate is refused: {other}"),
                roots_fix,
            ),
        },
    };
    ControlPlane {
        result,
        tls: Some(tls),
    }
}

// ---- 3. clock ----

/// Skew from the control plane's HTTP `date` (whole seconds, so the true server time lies in
/// [date, date + 1 s): its middle is compared with the local time half-way through the request).
pub(super) fn clock(tls: &Option<TlsOutcome>, max: Duration) -> CheckResult {
    const NAME: &str = "clock";
    let Some(TlsOutcome::Done { date, chain, .. }) = tls else {
        return CheckResult::skip(NAME, "the control plane is unreachable (see control-plane)");
    };
    let fix = "sync this host's clock: `timedatectl set-ntp true` (chrony or systemd-timesyncd); certificates are refused when clocks disagree";
    match date {
        Ok((server, local)) => {
            let server = *server + Duration::from_millis(500);
            let (ahead, skew) = match server.duration_since(*local) {
                Ok(d) => (false, d),
                Err(e) => (true, e.duration()),
            };
            let how = format!(
                "{}.{} s {}",
                skew.as_secs(),
                skew.subsec_millis() / 100,
                if ahead { "ahead of" } else { "behind" }
            );
            if skew > max {
                CheckResult::fail(
                    NAME,
                    format!(
                        "this host's clock is {how} the control plane's (HTTP date of its answer on 15012; limit {})",
                        fmt_duration(max)
                    ),
                    fix,
                )
            } else {
                CheckResult::pass(
                    NAME,
                    format!(
                        "within {} of the control plane's (HTTP date of its answer on 15012, 1 s resolution; limit {})",
                        if skew < Duration::from_secs(1) { "1 s".to_string() } else { format!("{} s", skew.as_secs()) },
                        fmt_duration(max)
                    ),
                )
            }
        }
        Err(why) => {
            // Only a lower bound: the serving certificate cannot start after the server's now.
            let not_before = chain
                .first()
                .and_then(|c| CertInfo::parse(c, "server certificate").ok())
                .map(|i| i.not_before);
            let now = SystemTime::now();
            match not_before {
                Some(nb) if now + max < nb => CheckResult::fail(
                    NAME,
                    format!(
                        "this host's clock ({}) is before the control plane's certificate start ({}): at least {} behind",
                        fmt_time(now),
                        fmt_time(nb),
                        fmt_duration(nb.duration_since(now).unwrap_or_default())
                    ),
                    fix,
                ),
                Some(_) => CheckResult::pass(
                    NAME,
                    format!("no HTTP date from the control plane ({why}); this host's clock is past its certificate's start (a lower bound only)"),
                ),
                None => CheckResult::skip(
                    NAME,
                    format!("no HTTP date and no certificate from the control plane ({why})"),
                ),
            }
        }
    }
}

// ---- 4. certificate ----

pub(super) fn certificate(probes: &impl Probes, cfg: &HostConfig) -> CheckResult {
    const NAME: &str = "certificate";
    let dir = cfg.path(&cfg.cert_dir);
    let host_dir = cfg.cert_dir.display();
    let root = cfg.root_cert.display();
    let now = probes.now();
    let roots_fix = format!("put the mesh's root in {root}: `isthmus vm certs -o DIR` on the control plane writes it (or re-run `isthmus join`)");
    let roots = match std::fs::read_to_string(cfg.path(&cfg.root_cert)) {
        Ok(pem) => match parse_pem_certs(&pem, &root.to_string()) {
            Ok(r) => r,
            Err(e) => return CheckResult::fail(NAME, e.to_string(), roots_fix),
        },
        Err(e) => return CheckResult::fail(NAME, format!("cannot read {root}: {e}"), roots_fix),
    };
    let (key_path, chain_path) = (dir.join(KEY_FILE), dir.join(CERT_CHAIN_FILE));
    if !key_path.exists() || !chain_path.exists() {
        let (why, fix) = token_diagnosis(cfg, now);
        return CheckResult::fail(
            NAME,
            format!("no certificate yet ({host_dir}/{KEY_FILE} and {CERT_CHAIN_FILE} are missing); {why}"),
            fix,
        );
    }
    if let Some(mode) = isthmus_ca::files::mode_of(&key_path) {
        if mode & 0o077 != 0 {
            return CheckResult::fail(
                NAME,
                format!(
                    "{host_dir}/{KEY_FILE} is mode {mode:04o}: others can read the workload key"
                ),
                format!("chmod 600 {host_dir}/{KEY_FILE}"),
            );
        }
    }
    let renew_fix = format!("remove {host_dir}/{KEY_FILE} and {CERT_CHAIN_FILE} and restart the agent with a valid join token (a new one: `isthmus token create`); {JOURNAL} says why it did not renew");
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let loaded = read(&key_path).and_then(|key| {
        let chain = read(&chain_path)?;
        let chain = parse_pem_certs(&chain, CERT_CHAIN_FILE).map_err(|e| e.to_string())?;
        Ok((key, chain))
    });
    let (key, chain) = match loaded {
        Ok(kc) => kc,
        Err(e) => return CheckResult::fail(NAME, e, renew_fix),
    };
    let cert = match WorkloadCertificate::verify(&key, &chain, &roots, now) {
        Ok(c) => c,
        Err(StoreError::KeyMismatch) => {
            return CheckResult::fail(
                NAME,
                format!("{KEY_FILE} does not match the certificate in {CERT_CHAIN_FILE}"),
                renew_fix,
            )
        }
        Err(StoreError::Cert(CertError::Untrusted(why))) => {
            let expired = why.contains("expired");
            let not_ours = why.contains("not issued");
            let fix = if not_ours {
                format!("{root} is not the root that issued this certificate: {roots_fix}")
            } else if expired {
                renew_fix
            } else {
                format!("{renew_fix}; or sync the clock (see clock)")
            };
            return CheckResult::fail(
                NAME,
                format!("{host_dir}/{CERT_CHAIN_FILE} is not valid against {root}: {why}"),
                fix,
            );
        }
        Err(e) => return CheckResult::fail(NAME, e.to_string(), renew_fix),
    };
    let life = cert
        .not_after
        .duration_since(cert.not_before)
        .unwrap_or_default();
    let left = cert.not_after.duration_since(now).unwrap_or_default();
    let minimum = life * MIN_LIFETIME_LEFT_PERCENT / 100;
    if left < minimum {
        return CheckResult::fail(
            NAME,
            format!(
                "{} expires in {} (less than {MIN_LIFETIME_LEFT_PERCENT}% of its {} lifetime): the agent should have renewed it at half-life",
                cert.identity,
                fmt_duration(left),
                fmt_duration(life)
            ),
            format!("check that the agent runs and reaches the control plane (see agent, control-plane); {JOURNAL} shows the renewal errors"),
        );
    }
    CheckResult::pass(
        NAME,
        format!(
            "{}, valid until {} (renews at {}), key matches, chain verified against {root}",
            cert.identity,
            fmt_time(cert.not_after),
            fmt_time(cert.renew_at())
        ),
    )
}

/// Why the agent may have no certificate, from the join token on disk (read, not verified:
/// only the CA can say whether it was revoked or used up).
fn token_diagnosis(cfg: &HostConfig, now: SystemTime) -> (String, String) {
    let Some(token_file) = &cfg.token_file else {
        return (
            "no join token configured (ISTHMUS_JOIN_TOKEN_FILE)".into(),
            format!("create one on the control plane (`isthmus token create -n NS -s SA`), write it to /etc/isthmus/token, set ISTHMUS_JOIN_TOKEN_FILE in {AGENT_ENV} and restart the agent"),
        );
    };
    let shown = token_file.display();
    let new_token = format!("create a new join token on the control plane (`isthmus token create -n NS -s SA`), write it to {shown} and restart the agent");
    let text = match std::fs::read_to_string(cfg.path(token_file)) {
        Ok(t) => t,
        Err(e) => {
            return (
                format!("cannot read the join token {shown}: {e}"),
                new_token,
            )
        }
    };
    let claims = match decode_claims(text.trim()) {
        Ok(c) => c,
        Err(e) => {
            return (
                format!("the join token {shown} is unreadable: {e}"),
                new_token,
            )
        }
    };
    let exp = UNIX_EPOCH + Duration::from_secs(claims.exp);
    let new_token = new_token.replace("-n NS -s SA", &format!("-n {} -s {}", claims.ns, claims.sa));
    if exp <= now {
        (
            format!(
                "the join token {shown} (id {}, for {}) expired at {}",
                claims.jti,
                claims.sub,
                fmt_time(exp)
            ),
            new_token,
        )
    } else {
        (
            format!("the join token {shown} (id {}, for {}) is valid until {}, yet the agent got no certificate with it: it may be revoked or used up, or the CA unreachable", claims.jti, claims.sub, fmt_time(exp)),
            format!("see `isthmus token list` on the control plane and {JOURNAL}; if revoked or used up: {new_token}"),
        )
    }
}

fn decode_claims(token: &str) -> Result<TokenClaims, String> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or("not a JWT (no payload part)")?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("payload is not base64url: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| e.to_string())
}

// ---- 5. agent ----

pub(super) struct Agent {
    pub result: CheckResult,
    pub ready: bool,
    /// The admin config dump, when the agent serves it.
    pub dump: Option<Value>,
}

pub(super) async fn agent(probes: &impl Probes, cfg: &HostConfig) -> Agent {
    const NAME: &str = "agent";
    let (ready_addr, admin_addr) = (loopback(cfg.readiness), loopback(cfg.admin));
    let fail = |message: String, fix: String| Agent {
        result: CheckResult::fail(NAME, message, fix),
        ready: false,
        dump: None,
    };
    match probes.http_get(ready_addr, "/healthz/ready").await {
        Ok((200, _)) => {}
        Ok((code, body)) => {
            return fail(
                format!("running but not ready ({ready_addr}/healthz/ready: {code} {})", body.trim()),
                format!("it waits for its certificate and the first discovery state: see certificate and control-plane, and {JOURNAL}"),
            )
        }
        Err(e) => {
            let metrics = loopback(cfg.metrics);
            return match probes.http_get(metrics, "/healthz").await {
                Ok(_) => fail(
                    format!("running (metrics on {metrics} answer) but no readiness endpoint on {ready_addr} yet: it has no certificate"),
                    format!("see certificate; {JOURNAL} says why it has none"),
                ),
                Err(_) => fail(
                    format!("not running: nothing answers on {ready_addr} ({e})"),
                    format!(
                        "start it: `sudo systemctl start isthmus-agent` (without systemd: `sudo sh -c 'set -a; . {}; exec isthmus agent'`); {JOURNAL} says why it stopped",
                        cfg.path(Path::new(AGENT_ENV)).display()
                    ),
                ),
            };
        }
    }
    let dump = match probes.http_get(admin_addr, "/config_dump").await {
        Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
            Ok(v) => v,
            Err(e) => {
                return Agent {
                    ready: true,
                    ..fail(format!("ready, but {admin_addr}/config_dump is not JSON: {e}"), "check ISTHMUS_AGENT_ADMIN_ADDR in agent.env: another program answers there".into())
                }
            }
        },
        Ok((code, _)) => {
            return Agent {
                ready: true,
                ..fail(format!("ready, but the admin endpoint {admin_addr}/config_dump answers {code}"), format!("check ISTHMUS_AGENT_ADMIN_ADDR in {AGENT_ENV}: another program answers there"))
            }
        }
        Err(e) => {
            return Agent {
                ready: true,
                ..fail(format!("ready, but the admin endpoint {admin_addr} does not answer: {e}"), format!("set ISTHMUS_AGENT_ADMIN_ADDR in {AGENT_ENV} to where the agent serves its admin"))
            }
        }
    };
    let services = dump["discovery"]["services"].as_array().map_or(0, Vec::len);
    // The discovery status is a Debug string ("Connected", "Backoff { error: .. }").
    let status = dump["discovery"]["status"]
        .as_str()
        .unwrap_or("unknown")
        .split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string();
    let identity = dump["identity"]["spiffeId"]
        .as_str()
        .unwrap_or("no identity")
        .to_string();
    Agent {
        result: CheckResult::pass(
            NAME,
            format!("ready ({ready_addr}/healthz/ready); admin {admin_addr}: {identity}, discovery {status}, services known: {services}"),
        ),
        ready: true,
        dump: Some(dump),
    }
}

// ---- 6. rules ----

/// What the rules of one family should look like: the chains, and per built-in chain the
/// targets its first rules must jump to, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Expected {
    chains: Vec<String>,
    first: Vec<(String, Vec<String>)>,
}

/// From the restore text Isthmus itself would install (so this never drifts from it).
pub(super) fn expected(restore: &str) -> Expected {
    let mut e = Expected::default();
    for line in restore.lines().map(str::trim) {
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                e.chains.push(name.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-I ") {
            let tokens: Vec<&str> = rest.split_whitespace().collect();
            let (Some(chain), Some(target)) = (tokens.first(), jump_target(&tokens)) else {
                continue;
            };
            match e.first.iter_mut().find(|(c, _)| c == chain) {
                // Each is inserted at position 1: the last listed ends up first.
                Some((_, targets)) => targets.insert(0, target.to_string()),
                None => e.first.push((chain.to_string(), vec![target.to_string()])),
            }
        }
    }
    e
}

fn jump_target<'a>(tokens: &[&'a str]) -> Option<&'a str> {
    tokens
        .windows(2)
        .find(|w| matches!(w[0], "-j" | "-g"))
        .map(|w| w[1])
}

/// Problems of an `iptables-save -t nat` against `want`.
pub(super) fn compare(save: &str, want: &Expected) -> (Vec<String>, Vec<String>) {
    let mut declared = BTreeSet::new();
    let mut rules: Vec<(String, String)> = Vec::new();
    let mut in_nat = false;
    for line in save.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            in_nat = t == "nat";
        } else if !in_nat {
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(n) = decl.split_whitespace().next() {
                declared.insert(n.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            if let Some((chain, spec)) = rest.split_once(' ') {
                rules.push((chain.to_string(), spec.to_string()));
            }
        }
    }
    let missing: Vec<String> = want
        .chains
        .iter()
        .filter(|c| !declared.contains(*c))
        .cloned()
        .collect();
    let mut misplaced = Vec::new();
    for (chain, targets) in &want.first {
        let have: Vec<&str> = rules
            .iter()
            .filter(|(c, _)| c == chain)
            .take(targets.len())
            .map(|(_, spec)| spec.as_str())
            .collect();
        let have_targets: Vec<&str> = have
            .iter()
            .map(|s| jump_target(&s.split_whitespace().collect::<Vec<_>>()).unwrap_or(""))
            .collect();
        if have_targets != *targets {
            let first = have
                .first()
                .map_or("none".to_string(), |s| format!("`-A {chain} {s}`"));
            misplaced.push(format!(
                "nat {chain} must start with jumps to {}, its first rule is {first}",
                targets.join(", ")
            ));
        }
    }
    (missing, misplaced)
}

fn family_name(f: isthmus_intercept::Family) -> &'static str {
    match f {
        isthmus_intercept::Family::V4 => "IPv4",
        isthmus_intercept::Family::V6 => "IPv6",
    }
}

pub(super) fn rules(probes: &impl Probes, cfg: &HostConfig, agent_ready: bool) -> CheckResult {
    const NAME: &str = "rules";
    if !cfg.capture {
        return CheckResult::skip(
            NAME,
            "ISTHMUS_CAPTURE is not true in agent.env: the agent installs no rules",
        );
    }
    let Some(icfg) = &cfg.intercept else {
        return CheckResult::skip(
            NAME,
            "cluster.env or sidecar.env is missing or invalid (see config)",
        );
    };
    let mut missing = Vec::new();
    let mut misplaced = Vec::new();
    let mut seen = Vec::new();
    for (family, restore) in families(icfg) {
        let want = expected(&restore);
        let save = match probes.netfilter().save(family, "nat") {
            Ok(s) => s,
            Err(e) => {
                return CheckResult::fail(
                    NAME,
                    format!("cannot read the {} nat table: {e}", family_name(family)),
                    "run `isthmus doctor` as root (reading iptables needs CAP_NET_ADMIN)",
                )
            }
        };
        let (m, p) = compare(&save, &want);
        missing.extend(
            m.into_iter()
                .map(|c| format!("{c} ({})", family_name(family))),
        );
        misplaced.extend(
            p.into_iter()
                .map(|c| format!("{c} ({})", family_name(family))),
        );
        seen.push(format!(
            "{} jumped to first from nat {} ({})",
            want.chains.join(", "),
            want.first
                .iter()
                .map(|(c, _)| c.as_str())
                .collect::<Vec<_>>()
                .join(" and "),
            family_name(family)
        ));
    }
    let restart =
        "restart the agent (`systemctl restart isthmus-agent`): it installs the rules at start";
    if !missing.is_empty() {
        if !agent_ready {
            return CheckResult::skip(
                NAME,
                format!(
                    "absent ({}); the agent installs them once it is ready (see agent)",
                    missing.join(", ")
                ),
            );
        }
        return CheckResult::fail(
            NAME,
            format!(
                "interception rules missing: no chain {}",
                missing.join(", ")
            ),
            restart,
        );
    }
    if !misplaced.is_empty() {
        return CheckResult::fail(
            NAME,
            format!("interception rules not first: {}", misplaced.join("; ")),
            format!("{restart} and puts its jumps first again (something inserted rules ahead of them: a firewall, Docker)"),
        );
    }
    if !icfg.vip_cidrs.is_empty() {
        let mut absent = Vec::new();
        for family in [isthmus_intercept::Family::V4, isthmus_intercept::Family::V6] {
            let nets: Vec<_> = icfg
                .vip_cidrs
                .iter()
                .filter(|n| isthmus_intercept::Family::of(n) == family)
                .collect();
            if nets.is_empty() {
                continue;
            }
            let rt = probes.routing();
            let (rules, routes) = match (rt.rules(family), rt.routes(family)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    return CheckResult::fail(
                        NAME,
                        format!("cannot read the {} routing rules: {e}", family_name(family)),
                        "run `isthmus doctor` as root",
                    )
                }
            };
            for n in nets {
                match (rules.contains(n), routes.contains(n)) {
                    (true, true) => {}
                    (false, true) => absent.push(format!(
                        "{n} (no `ip rule` at priority {} into table {})",
                        isthmus_intercept::RULE_PRIORITY,
                        isthmus_intercept::ROUTE_TABLE
                    )),
                    (_, false) => absent.push(format!(
                        "{n} (no route in table {})",
                        isthmus_intercept::ROUTE_TABLE
                    )),
                }
            }
        }
        if !absent.is_empty() {
            let message = format!(
                "ISTHMUS_VIP_CIDR not routed through lo: {}; captured connections to it get \
                 the outside link's segment size",
                absent.join(", ")
            );
            if !agent_ready {
                return CheckResult::skip(
                    NAME,
                    format!("{message}; the agent routes it once it is ready (see agent)"),
                );
            }
            return CheckResult::fail(NAME, message, restart);
        }
        seen.push(format!(
            "ISTHMUS_VIP_CIDR {} routed through lo (table {})",
            icfg.vip_cidrs
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            isthmus_intercept::ROUTE_TABLE
        ));
    }
    if !agent_ready {
        return CheckResult::fail(
            NAME,
            "interception rules installed but the agent is not ready: captured connections go nowhere",
            "start the agent (see agent), or remove the rules: `isthmus iptables --cleanup`",
        );
    }
    CheckResult::pass(NAME, seen.join("; "))
}

// ---- 7. DNS and 8. connection ----

/// The service the DNS and connection checks try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub hostname: String,
    pub namespace: String,
    pub vip: IpAddr,
    pub port: u16,
    pub http: bool,
    /// At least one healthy endpoint (worth a connection).
    pub healthy: bool,
}

/// A service from the agent's config dump: one with a VIP and a port, preferring those with a
/// healthy endpoint on another host, then by name (stable from run to run).
pub(super) fn pick_service(dump: &Value, cfg: &HostConfig) -> Option<Target> {
    let empty = Vec::new();
    let workloads = dump["discovery"]["workloads"].as_array().unwrap_or(&empty);
    let mut found: Vec<((bool, bool), Target)> = Vec::new();
    for s in dump["discovery"]["services"].as_array().unwrap_or(&empty) {
        let (Some(hostname), Some(namespace)) = (s["hostname"].as_str(), s["namespace"].as_str())
        else {
            continue;
        };
        let Some(vip) = s["vips"]
            .as_array()
            .and_then(|v| v.iter().find_map(|ip| ip.as_str()?.parse().ok()))
        else {
            continue;
        };
        let Some(port) = s["ports"].as_array().and_then(|p| p.first()).cloned() else {
            continue;
        };
        let Some(service_port) = port["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        let key = format!("{namespace}/{hostname}");
        let healthy: Vec<&Value> = workloads
            .iter()
            .filter(|w| {
                w["health"] == "Healthy"
                    && w["services"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|k| k == key.as_str()))
            })
            .collect();
        let remote = healthy.iter().any(|w| {
            let own = cfg.svc_ip.map(|ip| ip.to_string());
            !w["addresses"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x.as_str() == own.as_deref()))
        });
        found.push((
            (!healthy.is_empty(), remote),
            Target {
                hostname: hostname.to_string(),
                namespace: namespace.to_string(),
                vip,
                port: service_port,
                http: port["appProtocol"] == "Http11",
                healthy: !healthy.is_empty(),
            },
        ));
    }
    found.sort_by(|(a, ta), (b, tb)| b.cmp(a).then_with(|| ta.hostname.cmp(&tb.hostname)));
    found.into_iter().next().map(|(_, t)| t)
}

pub(super) async fn dns(
    probes: &impl Probes,
    cfg: &HostConfig,
    agent: &Agent,
    target: Option<&Target>,
    resolv_conf: &Path,
) -> CheckResult {
    const NAME: &str = "dns";
    if !agent.ready {
        return CheckResult::skip(NAME, "needs the agent's DNS proxy (see agent)");
    }
    let Some(t) = target else {
        return CheckResult::skip(NAME, "the agent knows no mesh service to look up yet");
    };
    let name = &t.hostname;
    let proxy = loopback(cfg.dns);
    let want: BTreeSet<IpAddr> = match probes.dns(proxy, name).await {
        Ok(ips) if !ips.is_empty() => ips.into_iter().collect(),
        Ok(_) => {
            return CheckResult::fail(
                NAME,
                format!("the agent's DNS proxy on {proxy} has no address for {name}"),
                format!("restart the agent; {JOURNAL}"),
            )
        }
        Err(e) => {
            return CheckResult::fail(
                NAME,
                format!("the agent's DNS proxy on {proxy} does not answer {name}: {e}"),
                format!("check ISTHMUS_AGENT_DNS_ADDR in {AGENT_ENV} and restart the agent"),
            )
        }
    };
    let capture_on = cfg.capture && cfg.intercept.as_ref().is_some_and(|i| i.dns_capture);
    let fix = if capture_on {
        "DNS capture is on but the query did not reach the agent: restart the agent to reinstall its rules (see rules)".to_string()
    } else {
        format!("send the host's queries to the agent: ISTIO_META_DNS_CAPTURE=true in {CLUSTER_ENV} (ISTHMUS_CAPTURE=true) and restart the agent, or with dnsmasq `server=/{}/127.0.0.1#{}`", cfg.domain, proxy.port())
    };
    let servers = match isthmus_dns::read_resolv_conf(resolv_conf) {
        Ok(rc) => rc.upstreams(),
        Err(e) => return CheckResult::fail(NAME, e.to_string(), fix),
    };
    // glibc's default without a nameserver line.
    let servers = if servers.is_empty() {
        vec![SocketAddr::from(([127, 0, 0, 1], 53))]
    } else {
        servers
    };
    let want_s = want
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut tried = Vec::new();
    for server in servers {
        match probes.dns(server, name).await {
            Ok(ips) => {
                let got: BTreeSet<IpAddr> = ips.into_iter().collect();
                if got == want {
                    return CheckResult::pass(
                        NAME,
                        format!("{name} → {want_s} through nameserver {server} ({}), as the agent's DNS proxy answers", resolv_conf.display()),
                    );
                }
                let got_s = got.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                return CheckResult::fail(
                    NAME,
                    format!("nameserver {server} answers {name} with [{got_s}], the agent's DNS proxy with {want_s}"),
                    fix,
                );
            }
            Err(DnsFailure::Rcode(rcode)) => {
                return CheckResult::fail(
                    NAME,
                    format!("nameserver {server} answers {name} with {rcode} (the agent's DNS proxy: {want_s})"),
                    fix,
                )
            }
            Err(DnsFailure::Unanswered(e)) => tried.push(format!("{server}: {e}")),
        }
    }
    // A nameserver the host has no route to fails before the capture rule sees the query:
    // the rules are not the cause then, the routing is.
    let fix = if tried.iter().any(|t| no_route(t)) {
        format!(
            "this host has no route to its nameserver, so queries fail before the capture can redirect them to the agent: give the host a route to it (`ip route` shows none; a default route will do), or list a nameserver it can reach in {}",
            resolv_conf.display()
        )
    } else {
        fix
    };
    CheckResult::fail(
        NAME,
        format!(
            "no nameserver of {} answers {name} ({}); the agent's DNS proxy answers {want_s}",
            resolv_conf.display(),
            tried.join("; ")
        ),
        fix,
    )
}

/// An error that says the kernel had no route (ENETUNREACH, EHOSTUNREACH).
fn no_route(error: &str) -> bool {
    [
        "os error 101",
        "os error 113",
        "Network is unreachable",
        "No route to host",
    ]
    .iter()
    .any(|m| error.contains(m))
}

pub(super) async fn connection(
    probes: &impl Probes,
    agent: &Agent,
    target: Option<&Target>,
) -> CheckResult {
    const NAME: &str = "connection";
    if !agent.ready {
        return CheckResult::skip(NAME, "needs the agent's proxy (see agent)");
    }
    let Some(t) = target.filter(|t| t.healthy) else {
        return CheckResult::skip(
            NAME,
            "the agent knows no mesh service with a healthy endpoint to try",
        );
    };
    let addr = SocketAddr::new(t.vip, t.port);
    let host = format!("{}:{}", t.hostname, t.port);
    let what = format!("{} ({addr})", t.hostname);
    match probes.dial(addr, t.http.then_some(host.as_str())).await {
        Ok(DialOutcome::Http(code)) => CheckResult::pass(
            NAME,
            format!("{what}: HTTP {code} through the capture"),
        ),
        Ok(DialOutcome::Open) => CheckResult::pass(
            NAME,
            format!("{what}: TCP connection through the capture accepted and kept open (the port is not HTTP: no request sent)"),
        ),
        Err(e) => CheckResult::fail(
            NAME,
            format!("{what}: {e}"),
            format!("check the service's endpoints (`isthmus get workloads -n {}`: healthy, reachable on 15008) and {JOURNAL}", t.namespace),
        ),
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
