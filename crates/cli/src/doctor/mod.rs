//! `isthmus doctor`: checks a member host against docs/host-layout.md and the live mesh, one
//! line per check (PASS, FAIL with the fix, or SKIP with why), and fails when any check does.
//!
//! Everything the checks touch on the system (sockets, TLS, DNS, iptables, the clock) goes
//! through [`Probes`], so the verdicts are unit-tested with a fake; the files are read from
//! `--root` (a temporary directory in tests).

mod checks;
mod probes;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use isthmus_intercept::{Family, InterceptConfig, Netfilter};
use rustls::pki_types::CertificateDer;
use serde::Serialize;

pub use probes::SystemProbes;

/// The agent's settings, read by its systemd unit (`EnvironmentFile`).
pub const AGENT_ENV: &str = "/etc/isthmus/agent.env";
pub const CLUSTER_ENV: &str = "/var/lib/istio/envoy/cluster.env";
pub const SIDECAR_ENV: &str = "/var/lib/istio/envoy/sidecar.env";

#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Read every host path (agent.env, the env files, /etc/certs, the token) under DIR.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// `text`: one line per check; `json`: one document for machines.
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: DoctorOutput,
    /// Time limit of each network probe.
    #[arg(long, default_value = "3s")]
    pub timeout: humantime::Duration,
    /// Largest clock difference with the control plane that passes.
    #[arg(long, default_value = "5s")]
    pub max_clock_skew: humantime::Duration,
    /// The resolver configuration the host's applications use (not under --root: the check
    /// looks at the live resolver path).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum DoctorOutput {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One check's verdict: `message` says what was found; `fix` (failures only) what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl CheckResult {
    fn pass(name: &'static str, message: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Pass,
            message: message.into(),
            fix: None,
        }
    }
    fn fail(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
    fn skip(name: &'static str, why: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Skip,
            message: why.into(),
            fix: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<CheckResult>,
    pub failed: usize,
}

/// Settings of the doctor's run, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub root: PathBuf,
    pub timeout: Duration,
    pub max_clock_skew: Duration,
    pub resolv_conf: PathBuf,
}

/// The outcome of a TLS handshake with the control plane, verified against the local roots
/// but completed either way, so that an untrusted server still gives its certificate and
/// clock for the diagnosis (nothing secret is sent on that connection).
#[derive(Debug, Clone)]
pub enum TlsOutcome {
    /// No TCP connection (refused, no route, timed out).
    Unreachable(String),
    /// TCP connected, the TLS handshake itself failed (not a certificate verdict).
    Handshake(String),
    Done {
        /// The verdict of verifying the server's chain against root-cert.pem for the server
        /// name: `None` when it passed.
        verdict: Option<rustls::Error>,
        chain: Vec<CertificateDer<'static>>,
        /// The HTTP `date` of the server's answer and the local time half-way through the
        /// request, or why there is none.
        date: Result<(SystemTime, SystemTime), String>,
        elapsed: Duration,
    },
}

/// What a plain TCP probe of a service found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialOutcome {
    /// An HTTP answer with this status line's code.
    Http(u16),
    /// TCP only: the connection was accepted and stayed open (or the server spoke first).
    Open,
}

/// Why a DNS query got no addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsFailure {
    /// No answer: timeout, refused, unreachable.
    Unanswered(String),
    /// An answer with an error code (NXDOMAIN, SERVFAIL, REFUSED).
    Rcode(String),
}

impl std::fmt::Display for DnsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unanswered(e) => f.write_str(e),
            Self::Rcode(r) => write!(f, "answered {r}"),
        }
    }
}

/// Every system side effect of the checks.
#[allow(async_fn_in_trait)] // used generically within this crate only
pub trait Probes {
    fn now(&self) -> SystemTime;
    /// TCP connect, TLS handshake (ALPN h2) and one HTTP/2 request for the `date` header.
    async fn tls(
        &self,
        addr: SocketAddr,
        server_name: &str,
        roots: &[CertificateDer<'static>],
    ) -> TlsOutcome;
    /// Resolves a host name of CA_ADDR (the system resolver).
    async fn resolve_host(&self, host: &str, port: u16) -> Result<SocketAddr, String>;
    /// Plain HTTP/1.1 GET on a local endpoint: status and body.
    async fn http_get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String), String>;
    /// One DNS query (A, or AAAA for IPv6 answers too) to one server over UDP.
    async fn dns(&self, server: SocketAddr, name: &str) -> Result<Vec<IpAddr>, DnsFailure>;
    /// TCP connect to `addr`; with `http_host`, one HTTP request.
    async fn dial(&self, addr: SocketAddr, http_host: Option<&str>) -> Result<DialOutcome, String>;
    fn netfilter(&self) -> &dyn Netfilter;
    /// The routing rules and table of `ISTHMUS_VIP_CIDR`.
    fn routing(&self) -> &dyn isthmus_intercept::Routing;
}

/// The host's settings as the agent reads them, with paths resolved under `--root`.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub root: PathBuf,
    pub ca_addr: String,
    pub ca_host: String,
    pub ca_port: u16,
    pub ca_server_name: String,
    /// Host paths (as written in agent.env); read them through [`HostConfig::path`].
    pub cert_dir: PathBuf,
    pub root_cert: PathBuf,
    pub token_file: Option<PathBuf>,
    pub capture: bool,
    pub readiness: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub dns: SocketAddr,
    pub svc_ip: Option<IpAddr>,
    pub domain: String,
    /// `None` when cluster.env or sidecar.env is missing or invalid.
    pub intercept: Option<InterceptConfig>,
}

impl HostConfig {
    /// `host_path` under the root.
    pub fn path(&self, host_path: &Path) -> PathBuf {
        under(&self.root, host_path)
    }
}

pub fn under(root: &Path, host_path: &Path) -> PathBuf {
    root.join(host_path.strip_prefix("/").unwrap_or(host_path))
}

/// Runs every check, in order; later checks read what earlier ones found.
pub async fn run_checks(probes: &impl Probes, opts: &Options) -> Report {
    let mut out = Vec::new();
    let (config_result, cfg) = checks::config(&opts.root);
    out.push(config_result);
    let Some(cfg) = cfg else {
        for name in checks::NAMES.iter().skip(1) {
            out.push(CheckResult::skip(
                name,
                "needs a readable agent.env with CA_ADDR (see config)",
            ));
        }
        return Report::new(out);
    };
    let cp = checks::control_plane(probes, &cfg).await;
    out.push(cp.result.clone());
    out.push(checks::clock(&cp.tls, opts.max_clock_skew));
    out.push(checks::certificate(probes, &cfg));
    let agent = checks::agent(probes, &cfg).await;
    out.push(agent.result.clone());
    out.push(checks::rules(probes, &cfg, agent.ready));
    let target = agent
        .dump
        .as_ref()
        .and_then(|d| checks::pick_service(d, &cfg));
    out.push(checks::dns(probes, &cfg, &agent, target.as_ref(), &opts.resolv_conf).await);
    out.push(checks::connection(probes, &agent, target.as_ref()).await);
    Report::new(out)
}

impl Report {
    fn new(checks: Vec<CheckResult>) -> Self {
        let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
        Self { checks, failed }
    }

    pub fn text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut s = String::new();
        for c in &self.checks {
            let status = match c.status {
                Status::Pass => "PASS",
                Status::Fail => "FAIL",
                Status::Skip => "SKIP",
            };
            s.push_str(&format!("{status}  {:width$}  {}\n", c.name, c.message));
            if let Some(fix) = &c.fix {
                s.push_str(&format!("      {:width$}  fix: {fix}\n", ""));
            }
        }
        s
    }
}

/// `isthmus doctor`: prints the report; an error (non-zero exit) when a check failed.
pub async fn run(args: DoctorArgs, out: &mut dyn Write) -> Result<(), String> {
    let opts = Options {
        root: args.root.clone(),
        timeout: args.timeout.into(),
        max_clock_skew: args.max_clock_skew.into(),
        resolv_conf: args.resolv_conf.clone(),
    };
    let probes = SystemProbes::new(opts.timeout);
    let report = run_checks(&probes, &opts).await;
    let text = match args.output {
        DoctorOutput::Text => report.text(),
        DoctorOutput::Json => serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
    };
    let _ = out.write_all(text.as_bytes());
    match report.failed {
        0 => Ok(()),
        n => Err(format!("{n} of {} checks failed", report.checks.len())),
    }
}

/// The nat rules' families the config asks for.
fn families(cfg: &InterceptConfig) -> Vec<(Family, String)> {
    let rules = isthmus_intercept::render(cfg);
    let mut v = vec![(Family::V4, rules.v4)];
    if let Some(v6) = rules.v6 {
        v.push((Family::V6, v6));
    }
    v
}
