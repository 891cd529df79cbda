#![forbid(unsafe_code)]
//! The host agent's settings, defined once: the variable names of `agent.env` ([`keys`]), their
//! defaults ([`defaults`]), and [`AgentEnv`], which parses, validates and renders the file.
//!
//! Four places use it: `isthmus agent`'s flags (each flag's `env` is a [`keys`] constant and its
//! default a [`defaults`] constant; a test there checks that every key here is a flag), the
//! control plane's bundle (`hostfiles.rs` renders an [`AgentEnv`]), `isthmus join` (reads the
//! bundle's CA_ADDR through [`AgentEnv::parse`]) and `isthmus doctor` (reads the installed
//! file the same way). A setting added to [`AgentEnv`] fails to compile until parse and render
//! handle it (both destructure the struct whole).
//!
//! Variables keep Istio's names where Istio has one (`CA_ADDR`, `ISTIO_SVC_IP`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use isthmus_intercept::EnvFile;

/// Where `join` installs the agent's settings; the `isthmus-agent` unit reads it
/// (`EnvironmentFile`).
pub const AGENT_ENV_PATH: &str = "/etc/isthmus/agent.env";
/// Where `join` installs the join token.
pub const TOKEN_PATH: &str = "/etc/isthmus/token";

/// The variables of `agent.env`, also the `env` of `isthmus agent`'s flags.
pub mod keys {
    pub const CA_ADDR: &str = "CA_ADDR";
    pub const CA_SERVER_NAME: &str = "ISTHMUS_CA_SERVER_NAME";
    pub const CERT_DIR: &str = "ISTHMUS_CERT_DIR";
    pub const ROOT_CERT: &str = "ISTHMUS_ROOT_CERT";
    /// The token itself: a secret, accepted from the environment, never written to agent.env.
    pub const JOIN_TOKEN: &str = "ISTHMUS_JOIN_TOKEN";
    pub const JOIN_TOKEN_FILE: &str = "ISTHMUS_JOIN_TOKEN_FILE";
    pub const WORKLOAD_TOKEN_FILE: &str = "ISTHMUS_WORKLOAD_TOKEN_FILE";
    pub const STATE_DIR: &str = "ISTHMUS_STATE_DIR";
    pub const DOMAIN: &str = "ISTHMUS_DOMAIN";
    pub const SVC_IP: &str = "ISTIO_SVC_IP";
    pub const WORKLOAD_GROUP: &str = "ISTHMUS_WORKLOAD_GROUP";
    pub const PROXY: &str = "ISTHMUS_PROXY";
    pub const CAPTURE: &str = "ISTHMUS_CAPTURE";
    pub const CLUSTER_ENV: &str = "ISTHMUS_CLUSTER_ENV";
    pub const SIDECAR_ENV: &str = "ISTHMUS_SIDECAR_ENV";
    pub const INBOUND_MODE: &str = "ISTHMUS_INBOUND_MODE";
    pub const DRAIN_DURATION: &str = "ISTHMUS_DRAIN_DURATION";
    pub const METRICS_ADDR: &str = "ISTHMUS_AGENT_METRICS_ADDR";
    pub const DNS_ADDR: &str = "ISTHMUS_AGENT_DNS_ADDR";
    pub const ADMIN_ADDR: &str = "ISTHMUS_AGENT_ADMIN_ADDR";
    pub const READINESS_ADDR: &str = "ISTHMUS_AGENT_READINESS_ADDR";
    pub const MAX_CONNECTIONS: &str = "ISTHMUS_MAX_CONNECTIONS";
    pub const HBONE_REQUESTS: &str = "ISTHMUS_HBONE_REQUESTS";
    /// ztunnel's name for it.
    pub const POOL_MAX_STREAMS_PER_CONNECTION: &str = "POOL_MAX_STREAMS_PER_CONNECTION";
    pub const WORKER_THREADS: &str = "ISTHMUS_WORKER_THREADS";
    pub const BUSY_POLL: &str = "ISTHMUS_BUSY_POLL";
    pub const SCHED_SLICE: &str = "ISTHMUS_SCHED_SLICE";
}

/// The defaults, as text (what clap's `default_value` takes and `--help` shows).
pub mod defaults {
    /// The name on the control plane's serving certificate (Istio's istiod name).
    pub const CA_SERVER_NAME: &str = "istiod.istio-system.svc";
    pub const CERT_DIR: &str = "/etc/certs";
    pub const STATE_DIR: &str = "/var/lib/isthmus";
    pub const DOMAIN: &str = "cluster.local";
    pub const CLUSTER_ENV: &str = "/var/lib/istio/envoy/cluster.env";
    pub const SIDECAR_ENV: &str = "/var/lib/istio/envoy/sidecar.env";
    pub const INBOUND_MODE: &str = "permissive";
    pub const DRAIN_DURATION: &str = "5s";
    pub const BUSY_POLL: &str = "20us";
    pub const SCHED_SLICE: &str = "100us";
    pub const METRICS_ADDR: &str = "127.0.0.1:15020";
    pub const DNS_ADDR: &str = "127.0.0.1:15053";
    pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
    pub const READINESS_ADDR: &str = "0.0.0.0:15021";
}

/// One variable of agent.env, for listings and the rendered file's comments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    /// `None`: unset by default (optional, or required for CA_ADDR).
    pub default: Option<&'static str>,
    pub help: &'static str,
}

/// Every variable agent.env may hold, in the order the file is written.
pub const SETTINGS: [Setting; 26] = [
    s(
        keys::CA_ADDR,
        None,
        "the control plane's gRPC port, https://HOST:PORT (required)",
    ),
    s(
        keys::CA_SERVER_NAME,
        Some(defaults::CA_SERVER_NAME),
        "the name its certificate must carry",
    ),
    s(
        keys::CERT_DIR,
        Some(defaults::CERT_DIR),
        "key.pem, cert-chain.pem and root-cert.pem",
    ),
    s(
        keys::ROOT_CERT,
        None,
        "roots to trust for the control plane [default: <cert dir>/root-cert.pem]",
    ),
    s(
        keys::JOIN_TOKEN_FILE,
        None,
        "the join token, re-read at each use",
    ),
    s(
        keys::WORKLOAD_TOKEN_FILE,
        None,
        "keep a workload token here, renewed before it expires, for token-only clients such as Istio's ztunnel",
    ),
    s(
        keys::STATE_DIR,
        Some(defaults::STATE_DIR),
        "the last good discovery state",
    ),
    s(
        keys::DOMAIN,
        Some(defaults::DOMAIN),
        "the mesh's DNS domain",
    ),
    s(
        keys::SVC_IP,
        None,
        "this host's mesh IP [default: the local address towards the control plane]",
    ),
    s(
        keys::WORKLOAD_GROUP,
        None,
        "register this host in this WorkloadGroup of its namespace",
    ),
    s(
        keys::PROXY,
        Some("false"),
        "run the proxy (15001 outbound, 15006 inbound, 15008 HBONE)",
    ),
    s(
        keys::CAPTURE,
        Some("false"),
        "install the interception rules from cluster.env and sidecar.env",
    ),
    s(
        keys::CLUSTER_ENV,
        Some(defaults::CLUSTER_ENV),
        "Istio's cluster.env",
    ),
    s(
        keys::SIDECAR_ENV,
        Some(defaults::SIDECAR_ENV),
        "Istio's sidecar.env",
    ),
    s(
        keys::INBOUND_MODE,
        Some(defaults::INBOUND_MODE),
        "plaintext inbound: permissive or strict",
    ),
    s(
        keys::DRAIN_DURATION,
        Some(defaults::DRAIN_DURATION),
        "how long connections may finish on stop",
    ),
    s(
        keys::METRICS_ADDR,
        Some(defaults::METRICS_ADDR),
        "Prometheus metrics",
    ),
    s(keys::DNS_ADDR, Some(defaults::DNS_ADDR), "the DNS proxy"),
    s(
        keys::ADMIN_ADDR,
        Some(defaults::ADMIN_ADDR),
        "admin: /config_dump (keep it on loopback)",
    ),
    s(
        keys::READINESS_ADDR,
        Some(defaults::READINESS_ADDR),
        "readiness: /healthz/ready",
    ),
    s(
        keys::MAX_CONNECTIONS,
        None,
        "connections each proxy listener serves at once [default: from the open-files limit]",
    ),
    s(
        keys::HBONE_REQUESTS,
        Some("false"),
        "send HTTP requests to peer agents as streams of the mTLS connection (false: tunnel them in CONNECT, measured faster for HTTP/1.1)",
    ),
    s(
        keys::POOL_MAX_STREAMS_PER_CONNECTION,
        Some("100"),
        "HBONE streams on one pooled connection to a peer before another connection is opened",
    ),
    s(
        keys::WORKER_THREADS,
        Some("1"),
        "threads the proxy runs on (as ztunnel's ZTUNNEL_WORKER_THREADS): 1 keeps every connection on one thread; more run that many shards, each with its own listeners on the same ports and its own pools",
    ),
    s(
        keys::BUSY_POLL,
        Some(defaults::BUSY_POLL),
        "how long a data-plane thread that was busy for a quarter of the last millisecond or more polls its sockets before sleeping (HAProxy's busy-polling, on only under load; at most half the host's CPUs poll at once); 0 never polls",
    ),
    s(
        keys::SCHED_SLICE,
        Some(defaults::SCHED_SLICE),
        "the scheduler slice the data-plane threads ask Linux for (EEVDF, kernel 6.12 and later): a short one lets a woken proxy thread run before a thread in the middle of a longer slice, at the same share of the CPU; 100us to 100ms, or 0 for the kernel's default",
    ),
];

const fn s(key: &'static str, default: Option<&'static str>, help: &'static str) -> Setting {
    Setting { key, default, help }
}

/// Settings written to every rendered file even at their default, so a person reading the
/// file sees where things are.
const ALWAYS_WRITTEN: [&str; 8] = [
    keys::CA_ADDR,
    keys::CA_SERVER_NAME,
    keys::CERT_DIR,
    keys::JOIN_TOKEN_FILE,
    keys::STATE_DIR,
    keys::DOMAIN,
    keys::PROXY,
    keys::CAPTURE,
];

/// `CA_ADDR`: where the control plane's gRPC port is, as `https://HOST:PORT`, or several
/// replicas' as a comma-separated list (the agent fails over between them).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CaAddr {
    host: String,
    port: u16,
    /// The other replicas, `(host, port)`, in the order given.
    more: Vec<(String, u16)>,
}

/// Plaintext connections captured inbound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundMode {
    /// Passed on (after authorization).
    Permissive,
    /// Refused.
    Strict,
}

/// The agent's settings, every default resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEnv {
    pub ca_addr: CaAddr,
    pub ca_server_name: String,
    pub cert_dir: PathBuf,
    pub root_cert: Option<PathBuf>,
    pub join_token_file: Option<PathBuf>,
    pub workload_token_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub domain: String,
    pub svc_ip: Option<IpAddr>,
    pub workload_group: Option<String>,
    pub proxy: bool,
    pub capture: bool,
    pub cluster_env: PathBuf,
    pub sidecar_env: PathBuf,
    pub inbound_mode: InboundMode,
    pub drain_duration: Duration,
    pub metrics_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    /// `None`: derived from the open-files limit at start.
    pub max_connections: Option<usize>,
    pub hbone_requests: bool,
    pub pool_max_streams_per_connection: usize,
    pub worker_threads: usize,
    pub busy_poll: Duration,
    /// `Duration::ZERO`: the kernel's default slice.
    pub sched_slice: Duration,
}

/// One problem with one variable; the message names the file, the variable and the value, and
/// [`SettingError::fix`] says what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("{key} is not set in {file}")]
    Missing { key: &'static str, file: String },
    #[error("{file}:{line}: {key}={value:?} is not {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        expected: String,
        file: String,
        line: usize,
    },
    #[error("{file}:{line}: {key} is not a setting of the agent{}", suggestion.map(|s| format!(" (did you mean {s}?)")).unwrap_or_default())]
    Unknown {
        key: String,
        suggestion: Option<&'static str>,
        file: String,
        line: usize,
    },
}

/// What is wrong with a `CA_ADDR` value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CaAddrError(String);

impl SettingError {
    /// The variable at fault.
    pub fn key(&self) -> &str {
        match self {
            Self::Missing { key, .. } | Self::Invalid { key, .. } => key,
            Self::Unknown { key, .. } => key,
        }
    }

    /// One line a person can act on.
    pub fn fix(&self) -> String {
        match self {
            Self::Missing { key, file } if *key == keys::CA_ADDR => {
                format!("add CA_ADDR=https://<control plane>:15012 to {file}")
            }
            Self::Missing { key, file } => format!("add {key}=... to {file}"),
            Self::Invalid { key, file, .. } => format!("correct {key} in {file}"),
            Self::Unknown {
                key,
                suggestion: Some(s),
                file,
                ..
            } => format!("rename {key} to {s} in {file}"),
            Self::Unknown { key, file, .. } => {
                format!("remove {key} from {file} (`isthmus agent --help` lists the settings)")
            }
        }
    }
}

impl CaAddr {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            more: Vec::new(),
        }
    }

    /// Every address of the list, the first one first, each on its own.
    pub fn all(&self) -> Vec<CaAddr> {
        std::iter::once((self.host.clone(), self.port))
            .chain(self.more.iter().cloned())
            .map(|(h, p)| CaAddr::new(h, p))
            .collect()
    }

    /// The host (a name or an IP, without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`, IPv6 in brackets: what a resolver or `connect` takes.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }
}

impl From<SocketAddr> for CaAddr {
    fn from(a: SocketAddr) -> Self {
        Self::new(a.ip().to_string(), a.port())
    }
}

impl fmt::Display for CaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority())?;
        for (h, p) in &self.more {
            write!(f, ",https://{}", CaAddr::new(h.clone(), *p).authority())?;
        }
        Ok(())
    }
}

impl FromStr for CaAddr {
    type Err = CaAddrError;

    /// `https://HOST:PORT`, an optional trailing `/`; IPv6 hosts in brackets; several of them
    /// separated by commas.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut parts = value.split(',').map(str::trim);
        let mut first = parse_one_ca_addr(parts.next().unwrap_or_default(), value)?;
        for part in parts {
            let next = parse_one_ca_addr(part, value)?;
            let entry = (next.host, next.port);
            if entry == (first.host.clone(), first.port) || first.more.contains(&entry) {
                return Err(CaAddrError(format!(
                    "CA_ADDR={value:?}: {part} is listed twice"
                )));
            }
            first.more.push(entry);
        }
        Ok(first)
    }
}

impl CaAddr {
    /// How many control-plane addresses the list holds.
    pub fn len(&self) -> usize {
        1 + self.more.len()
    }

    /// Never: a CA_ADDR holds at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// One `https://HOST:PORT` element of `whole`.
fn parse_one_ca_addr(value: &str, whole: &str) -> Result<CaAddr, CaAddrError> {
    {
        let err = |p: &str| {
            if value == whole {
                CaAddrError(format!("CA_ADDR={value:?}: {p}"))
            } else {
                CaAddrError(format!("CA_ADDR={whole:?}: {value:?}: {p}"))
            }
        };
        let rest = value.strip_prefix("https://").ok_or_else(|| {
            err("expected https://HOST:PORT (the control plane's gRPC port, 15012)")
        })?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(err("expected no path after HOST:PORT"));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| err("no port (the control plane's is 15012)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| err(&format!("{port:?} is not a port")))?;
        let host = match host.strip_prefix('[') {
            Some(h) => h
                .strip_suffix(']')
                .ok_or_else(|| err("unbalanced [ in the host"))?,
            None if host.contains(':') => {
                return Err(err("an IPv6 host goes in brackets: https://[::1]:15012"))
            }
            None => host,
        };
        if host.is_empty() {
            return Err(err("no host"));
        }
        if port == 0 {
            return Err(err("port 0 is not a port to connect to"));
        }
        if host.chars().any(|c| c.is_whitespace() || c == '@') {
            return Err(err("the host has characters no host name has"));
        }
        Ok(CaAddr::new(host, port))
    }
}

impl InboundMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }
}

impl fmt::Display for InboundMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InboundMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "permissive" => Ok(Self::Permissive),
            "strict" => Ok(Self::Strict),
            _ => Err("permissive or strict".into()),
        }
    }
}

/// The boolean spellings clap's `BoolishValueParser` takes (what the agent itself accepts).
/// What [`parse_busy_poll`] takes, as error messages say it.
pub const BUSY_POLL_EXPECTED: &str = "a duration of at most 1ms, such as 20us, or 0 to never poll";

/// What [`parse_sched_slice`] takes, as error messages say it.
pub const SCHED_SLICE_EXPECTED: &str =
    "a duration from 100us to 100ms (the kernel's bounds), such as 100us, or 0 for the kernel's default";

/// `ISTHMUS_SCHED_SLICE`: `0` (the kernel's default slice) or a duration within the kernel's
/// bounds for a requested slice, 100 µs to 100 ms.
pub fn parse_sched_slice(value: &str) -> Option<Duration> {
    if value.trim() == "0" {
        return Some(Duration::ZERO);
    }
    let d = humantime::parse_duration(value.trim()).ok()?;
    (d.is_zero() || (Duration::from_micros(100)..=Duration::from_millis(100)).contains(&d))
        .then_some(d)
}

/// `ISTHMUS_BUSY_POLL`: a duration of at most 1 ms (`0` switches it off). Longer spins would
/// spend a host's CPU for little: the wake-up they save costs 32–128 µs.
pub fn parse_busy_poll(value: &str) -> Option<Duration> {
    let d = if value.trim() == "0" {
        Duration::ZERO
    } else {
        humantime::parse_duration(value.trim()).ok()?
    };
    (d <= Duration::from_millis(1)).then_some(d)
}

pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "y" | "yes" | "t" | "true" | "on" | "1" => Some(true),
        "n" | "no" | "f" | "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

impl AgentEnv {
    /// Every setting at its default, with the control plane at `ca_addr`.
    pub fn new(ca_addr: CaAddr) -> Self {
        // The defaults are constants of this file, parsed by the test `defaults_parse`.
        let addr = |s: &str| s.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        Self {
            ca_addr,
            ca_server_name: defaults::CA_SERVER_NAME.into(),
            cert_dir: defaults::CERT_DIR.into(),
            root_cert: None,
            join_token_file: None,
            workload_token_file: None,
            state_dir: defaults::STATE_DIR.into(),
            domain: defaults::DOMAIN.into(),
            svc_ip: None,
            workload_group: None,
            proxy: false,
            capture: false,
            cluster_env: defaults::CLUSTER_ENV.into(),
            sidecar_env: defaults::SIDECAR_ENV.into(),
            inbound_mode: InboundMode::Permissive,
            drain_duration: Duration::from_secs(5),
            metrics_addr: addr(defaults::METRICS_ADDR),
            dns_addr: addr(defaults::DNS_ADDR),
            admin_addr: addr(defaults::ADMIN_ADDR),
            readiness_addr: addr(defaults::READINESS_ADDR),
            max_connections: None,
            hbone_requests: false,
            pool_max_streams_per_connection: 100,
            worker_threads: 1,
            busy_poll: Duration::from_micros(20),
            sched_slice: Duration::from_micros(100),
        }
    }

    /// The root certificate file the agent trusts for the control plane.
    pub fn root_cert_path(&self) -> PathBuf {
        self.root_cert
            .clone()
            .unwrap_or_else(|| self.cert_dir.join("root-cert.pem"))
    }

    /// The settings of a parsed agent.env: every problem found, not only the first. An empty
    /// value means the default, as an unset one does.
    pub fn parse(env: &EnvFile) -> Result<Self, Vec<SettingError>> {
        let file = env.source().to_string();
        let mut errors = Vec::new();
        let line_of = |key: &str| {
            env.entries()
                .iter()
                .rev()
                .find(|e| e.key == key)
                .map_or(0, |e| e.line)
        };
        let get = |key: &str| env.get(key).filter(|v| !v.is_empty());
        let mut invalid = |key: &'static str, value: &str, expected: &str| {
            errors.push(SettingError::Invalid {
                key,
                value: value.to_string(),
                expected: expected.to_string(),
                file: file.clone(),
                line: line_of(key),
            });
        };
        // Each typed value: its parse, or the default (the error recorded).
        macro_rules! typed {
            ($key:expr, $default:expr, $expected:expr, $parse:expr) => {
                match get($key) {
                    None => $default,
                    Some(v) => match $parse(v) {
                        Some(x) => x,
                        None => {
                            invalid($key, v, $expected);
                            $default
                        }
                    },
                }
            };
        }
        let fallback = Self::new(CaAddr::new("unset", 15012));
        let addr = |v: &str| v.parse::<SocketAddr>().ok();
        let ca_addr = match get(keys::CA_ADDR) {
            None => None,
            Some(v) => match v.parse::<CaAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    let expected = e.0.split_once(": ").map_or(e.0.clone(), |(_, p)| p.into());
                    invalid(
                        keys::CA_ADDR,
                        v,
                        &format!("a control plane address: {expected}"),
                    );
                    None
                }
            },
        };
        let parsed = Self {
            ca_addr: ca_addr.clone().unwrap_or(fallback.ca_addr.clone()),
            ca_server_name: get(keys::CA_SERVER_NAME)
                .unwrap_or(defaults::CA_SERVER_NAME)
                .into(),
            cert_dir: get(keys::CERT_DIR).map_or(fallback.cert_dir.clone(), PathBuf::from),
            root_cert: get(keys::ROOT_CERT).map(PathBuf::from),
            join_token_file: get(keys::JOIN_TOKEN_FILE).map(PathBuf::from),
            workload_token_file: get(keys::WORKLOAD_TOKEN_FILE).map(PathBuf::from),
            state_dir: get(keys::STATE_DIR).map_or(fallback.state_dir.clone(), PathBuf::from),
            domain: get(keys::DOMAIN).unwrap_or(defaults::DOMAIN).into(),
            svc_ip: typed!(keys::SVC_IP, None, "an IP address", |v: &str| v
                .parse::<IpAddr>()
                .ok()
                .map(Some)),
            workload_group: get(keys::WORKLOAD_GROUP).map(String::from),
            proxy: typed!(keys::PROXY, false, "true or false", parse_bool),
            capture: typed!(keys::CAPTURE, false, "true or false", parse_bool),
            cluster_env: get(keys::CLUSTER_ENV).map_or(fallback.cluster_env.clone(), PathBuf::from),
            sidecar_env: get(keys::SIDECAR_ENV).map_or(fallback.sidecar_env.clone(), PathBuf::from),
            inbound_mode: typed!(
                keys::INBOUND_MODE,
                InboundMode::Permissive,
                "permissive or strict",
                |v: &str| v.parse().ok()
            ),
            drain_duration: typed!(
                keys::DRAIN_DURATION,
                fallback.drain_duration,
                "a duration (5s, 1m)",
                |v: &str| humantime::parse_duration(v).ok()
            ),
            metrics_addr: typed!(
                keys::METRICS_ADDR,
                fallback.metrics_addr,
                "an IP:PORT",
                addr
            ),
            dns_addr: typed!(keys::DNS_ADDR, fallback.dns_addr, "an IP:PORT", addr),
            admin_addr: typed!(keys::ADMIN_ADDR, fallback.admin_addr, "an IP:PORT", addr),
            readiness_addr: typed!(
                keys::READINESS_ADDR,
                fallback.readiness_addr,
                "an IP:PORT",
                addr
            ),
            max_connections: typed!(
                keys::MAX_CONNECTIONS,
                None,
                "a number of connections above 0",
                |v: &str| v.parse::<usize>().ok().filter(|n| *n > 0).map(Some)
            ),
            hbone_requests: typed!(keys::HBONE_REQUESTS, false, "true or false", parse_bool),
            pool_max_streams_per_connection: typed!(
                keys::POOL_MAX_STREAMS_PER_CONNECTION,
                100,
                "a number of streams above 0",
                |v: &str| v.parse::<usize>().ok().filter(|n| *n > 0)
            ),
            worker_threads: typed!(
                keys::WORKER_THREADS,
                1,
                "a number of threads from 1 to 256",
                |v: &str| v.parse::<usize>().ok().filter(|n| (1..=256).contains(n))
            ),
            busy_poll: typed!(
                keys::BUSY_POLL,
                fallback.busy_poll,
                BUSY_POLL_EXPECTED,
                parse_busy_poll
            ),
            sched_slice: typed!(
                keys::SCHED_SLICE,
                fallback.sched_slice,
                SCHED_SLICE_EXPECTED,
                parse_sched_slice
            ),
        };
        if parsed.capture && !parsed.proxy {
            invalid(
                keys::CAPTURE,
                "true",
                &format!("possible without the proxy: set {}=true too", keys::PROXY),
            );
        }
        if get(keys::CA_ADDR).is_none() {
            errors.push(SettingError::Missing {
                key: keys::CA_ADDR,
                file: file.clone(),
            });
        }
        for e in env.entries() {
            let known = SETTINGS.iter().any(|s| s.key == e.key) || e.key == keys::JOIN_TOKEN;
            if !known && e.key.starts_with("ISTHMUS_") {
                errors.push(SettingError::Unknown {
                    key: e.key.clone(),
                    suggestion: closest(&e.key),
                    file: file.clone(),
                    line: e.line,
                });
            }
        }
        if errors.is_empty() {
            Ok(parsed)
        } else {
            Err(errors)
        }
    }

    /// `(key, value)` of every setting, in [`SETTINGS`] order; `None` for an unset optional.
    pub fn values(&self) -> Vec<(&'static str, Option<String>)> {
        // Destructured whole, so a new field fails to compile here until it is written out.
        let Self {
            ca_addr,
            ca_server_name,
            cert_dir,
            root_cert,
            join_token_file,
            workload_token_file,
            state_dir,
            domain,
            svc_ip,
            workload_group,
            proxy,
            capture,
            cluster_env,
            sidecar_env,
            inbound_mode,
            drain_duration,
            metrics_addr,
            dns_addr,
            admin_addr,
            readiness_addr,
            max_connections,
            hbone_requests,
            pool_max_streams_per_connection,
            worker_threads,
            busy_poll,
            sched_slice,
        } = self;
        let path = |p: &Path| Some(p.display().to_string());
        vec![
            (keys::CA_ADDR, Some(ca_addr.to_string())),
            (keys::CA_SERVER_NAME, Some(ca_server_name.clone())),
            (keys::CERT_DIR, path(cert_dir)),
            (keys::ROOT_CERT, root_cert.as_deref().and_then(path)),
            (
                keys::JOIN_TOKEN_FILE,
                join_token_file.as_deref().and_then(path),
            ),
            (
                keys::WORKLOAD_TOKEN_FILE,
                workload_token_file.as_deref().and_then(path),
            ),
            (keys::STATE_DIR, path(state_dir)),
            (keys::DOMAIN, Some(domain.clone())),
            (keys::SVC_IP, svc_ip.map(|ip| ip.to_string())),
            (keys::WORKLOAD_GROUP, workload_group.clone()),
            (keys::PROXY, Some(proxy.to_string())),
            (keys::CAPTURE, Some(capture.to_string())),
            (keys::CLUSTER_ENV, path(cluster_env)),
            (keys::SIDECAR_ENV, path(sidecar_env)),
            (keys::INBOUND_MODE, Some(inbound_mode.to_string())),
            (
                keys::DRAIN_DURATION,
                Some(humantime::format_duration(*drain_duration).to_string()),
            ),
            (keys::METRICS_ADDR, Some(metrics_addr.to_string())),
            (keys::DNS_ADDR, Some(dns_addr.to_string())),
            (keys::ADMIN_ADDR, Some(admin_addr.to_string())),
            (keys::READINESS_ADDR, Some(readiness_addr.to_string())),
            (
                keys::MAX_CONNECTIONS,
                max_connections.map(|n| n.to_string()),
            ),
            (keys::HBONE_REQUESTS, Some(hbone_requests.to_string())),
            (
                keys::POOL_MAX_STREAMS_PER_CONNECTION,
                Some(pool_max_streams_per_connection.to_string()),
            ),
            (keys::WORKER_THREADS, Some(worker_threads.to_string())),
            (
                keys::BUSY_POLL,
                Some(humantime::format_duration(*busy_poll).to_string()),
            ),
            (
                keys::SCHED_SLICE,
                Some(humantime::format_duration(*sched_slice).to_string()),
            ),
        ]
    }

    /// The settings that differ from their defaults, plus the ones always written: what
    /// `agent.env` holds, and what an `env` command line needs.
    pub fn assignments(&self) -> Vec<(&'static str, String)> {
        let defaults = Self::new(self.ca_addr.clone()).values();
        self.values()
            .into_iter()
            .zip(defaults)
            .filter_map(|((key, value), (_, default))| {
                let value = value?;
                (ALWAYS_WRITTEN.contains(&key) || Some(&value) != default.as_ref())
                    .then_some((key, value))
            })
            .collect()
    }

    /// The agent.env file: the settings that differ from their defaults (and the ones a person
    /// looks for first), then every other setting commented out at its default.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# isthmus agent settings (`isthmus agent --help`); the isthmus-agent unit reads this file.\n",
        );
        let set = self.assignments();
        for (key, value) in &set {
            out.push_str(&format!("{key}={}\n", quote(value)));
        }
        out.push_str("# At their defaults:\n");
        for setting in SETTINGS {
            if set.iter().any(|(k, _)| *k == setting.key) {
                continue;
            }
            match setting.default {
                Some(d) => out.push_str(&format!("# {}={d}  ({})\n", setting.key, setting.help)),
                None => out.push_str(&format!("# {}=  ({})\n", setting.key, setting.help)),
            }
        }
        out
    }

    /// The same settings with every host path moved under `root` (an install made with
    /// `join --root`).
    pub fn under_root(&self, root: &Path) -> Self {
        let re = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        Self {
            cert_dir: re(&self.cert_dir),
            root_cert: self.root_cert.as_deref().map(re),
            join_token_file: self.join_token_file.as_deref().map(re),
            workload_token_file: self.workload_token_file.as_deref().map(re),
            state_dir: re(&self.state_dir),
            cluster_env: re(&self.cluster_env),
            sidecar_env: re(&self.sidecar_env),
            ..self.clone()
        }
    }
}

/// A value as the shell that sources agent.env reads it back (the env-file parser's subset).
fn quote(value: &str) -> String {
    if value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:[],@%+=".contains(c))
    {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', ""))
    }
}

/// The known key nearest to a mistyped one, if it is close (at most 2 edits).
fn closest(key: &str) -> Option<&'static str> {
    SETTINGS
        .iter()
        .map(|s| s.key)
        .map(|k| (edit_distance(k, key), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentEnv, Vec<SettingError>> {
        AgentEnv::parse(&EnvFile::parse("/etc/isthmus/agent.env", text).unwrap())
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .iter()
            .map(|e| format!("{e} | fix: {}", e.fix()))
            .collect()
    }

    #[test]
    fn defaults_parse() {
        let env = AgentEnv::new(CaAddr::new("10.0.0.2", 15012));
        for s in SETTINGS {
            if let Some(d) = s.default {
                let text = format!("CA_ADDR=https://10.0.0.2:15012\n{}={d}\n", s.key);
                assert_eq!(parse(&text).unwrap(), env, "{}", s.key);
            }
        }
        assert_eq!(env.metrics_addr.to_string(), defaults::METRICS_ADDR);
        assert_eq!(env.readiness_addr.to_string(), defaults::READINESS_ADDR);
        assert_eq!(env.values().len(), SETTINGS.len());
        for ((key, _), s) in env.values().iter().zip(SETTINGS) {
            assert_eq!(*key, s.key);
        }
    }

    #[test]
    fn render_then_parse_gives_the_same_settings() {
        let mut env = AgentEnv::new("https://[fd00::2]:15012".parse().unwrap());
        env.ca_server_name = "cp.example".into();
        env.cert_dir = "/opt/certs".into();
        env.root_cert = Some("/opt/roots.pem".into());
        env.join_token_file = Some("/etc/isthmus/token".into());
        env.workload_token_file = Some("/var/run/secrets/tokens/istio-token".into());
        env.state_dir = "/srv/state".into();
        env.domain = "mesh.internal".into();
        env.svc_ip = Some("10.0.0.5".parse().unwrap());
        env.workload_group = Some("mysql".into());
        env.proxy = true;
        env.capture = true;
        env.cluster_env = "/x/cluster.env".into();
        env.sidecar_env = "/x/sidecar.env".into();
        env.inbound_mode = InboundMode::Strict;
        env.drain_duration = Duration::from_secs(90);
        env.metrics_addr = "127.0.0.1:1".parse().unwrap();
        env.dns_addr = "127.0.0.1:2".parse().unwrap();
        env.admin_addr = "127.0.0.1:3".parse().unwrap();
        env.readiness_addr = "127.0.0.1:4".parse().unwrap();
        env.max_connections = Some(4096);
        env.hbone_requests = true;
        env.pool_max_streams_per_connection = 4;
        env.worker_threads = 2;
        env.busy_poll = Duration::ZERO;
        env.sched_slice = Duration::from_millis(3);
        let text = env.render();
        assert_eq!(parse(&text).unwrap(), env, "{text}");
        assert!(text.contains("ISTHMUS_DRAIN_DURATION=1m 30s") || text.contains("'1m 30s'"));
        // Every setting differs from its default, so none is left commented out.
        assert!(!text.contains("# ISTHMUS_"), "{text}");
    }

    #[test]
    fn render_writes_the_main_settings_and_comments_the_defaults() {
        let mut env = AgentEnv::new("https://10.0.0.2:15012".parse().unwrap());
        env.proxy = true;
        env.capture = true;
        env.join_token_file = Some(TOKEN_PATH.into());
        let text = env.render();
        for line in [
            "CA_ADDR=https://10.0.0.2:15012\n",
            "ISTHMUS_CA_SERVER_NAME=istiod.istio-system.svc\n",
            "ISTHMUS_CERT_DIR=/etc/certs\n",
            "ISTHMUS_JOIN_TOKEN_FILE=/etc/isthmus/token\n",
            "ISTHMUS_PROXY=true\n",
            "ISTHMUS_CAPTURE=true\n",
            "# ISTHMUS_AGENT_DNS_ADDR=127.0.0.1:15053  (the DNS proxy)\n",
            "# ISTIO_SVC_IP=  (",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        assert_eq!(parse(&text).unwrap(), env);
    }

    #[test]
    fn every_problem_is_named_with_file_line_and_fix() {
        let errs = errors(
            "CA_ADDR=10.0.0.2:15012\nISTHMUS_CAPTURE=maybe\nISTHMUS_AGENT_DNS_ADDR=localhost\nISTHMUS_CAPTRUE=true\nISTHMUS_BOGUS_THING=1\nISTIO_SVC_IP=ten\n",
        );
        let want = [
            "/etc/isthmus/agent.env:1: CA_ADDR=\"10.0.0.2:15012\" is not a control plane address: expected https://HOST:PORT (the control plane's gRPC port, 15012) | fix: correct CA_ADDR in /etc/isthmus/agent.env",
            "/etc/isthmus/agent.env:6: ISTIO_SVC_IP=\"ten\" is not an IP address | fix: correct ISTIO_SVC_IP in /etc/isthmus/agent.env",
            "/etc/isthmus/agent.env:2: ISTHMUS_CAPTURE=\"maybe\" is not true or false | fix: correct ISTHMUS_CAPTURE in /etc/isthmus/agent.env",
            "/etc/isthmus/agent.env:3: ISTHMUS_AGENT_DNS_ADDR=\"localhost\" is not an IP:PORT | fix: correct ISTHMUS_AGENT_DNS_ADDR in /etc/isthmus/agent.env",
            "/etc/isthmus/agent.env:4: ISTHMUS_CAPTRUE is not a setting of the agent (did you mean ISTHMUS_CAPTURE?) | fix: rename ISTHMUS_CAPTRUE to ISTHMUS_CAPTURE in /etc/isthmus/agent.env",
            "/etc/isthmus/agent.env:5: ISTHMUS_BOGUS_THING is not a setting of the agent | fix: remove ISTHMUS_BOGUS_THING from /etc/isthmus/agent.env (`isthmus agent --help` lists the settings)",
        ];
        assert_eq!(errs, want);
    }

    #[test]
    fn sched_slice_takes_the_kernels_bounds_or_zero() {
        assert_eq!(parse_sched_slice("0"), Some(Duration::ZERO));
        assert_eq!(parse_sched_slice("0s"), Some(Duration::ZERO));
        assert_eq!(parse_sched_slice("100us"), Some(Duration::from_micros(100)));
        assert_eq!(parse_sched_slice("3ms"), Some(Duration::from_millis(3)));
        assert_eq!(parse_sched_slice("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_sched_slice("50us"), None);
        assert_eq!(parse_sched_slice("101ms"), None);
        assert_eq!(parse_sched_slice("100"), None);
    }

    #[test]
    fn busy_poll_takes_a_short_duration_or_zero() {
        assert_eq!(parse_busy_poll("0"), Some(Duration::ZERO));
        assert_eq!(parse_busy_poll("0s"), Some(Duration::ZERO));
        assert_eq!(parse_busy_poll("20us"), Some(Duration::from_micros(20)));
        assert_eq!(parse_busy_poll("1ms"), Some(Duration::from_millis(1)));
        assert_eq!(parse_busy_poll("2ms"), None);
        assert_eq!(parse_busy_poll("20"), None);
        assert_eq!(
            errors("CA_ADDR=https://10.0.0.2:15012\nISTHMUS_BUSY_POLL=5ms\n"),
            ["/etc/isthmus/agent.env:2: ISTHMUS_BUSY_POLL=\"5ms\" is not a duration of at most 1ms, such as 20us, or 0 to never poll | fix: correct ISTHMUS_BUSY_POLL in /etc/isthmus/agent.env"]
        );
    }

    #[test]
    fn a_missing_ca_addr_and_capture_without_proxy_are_errors() {
        assert_eq!(
            errors("ISTHMUS_CAPTURE=true\n"),
            [
                "/etc/isthmus/agent.env:1: ISTHMUS_CAPTURE=\"true\" is not possible without the proxy: set ISTHMUS_PROXY=true too | fix: correct ISTHMUS_CAPTURE in /etc/isthmus/agent.env",
                "CA_ADDR is not set in /etc/isthmus/agent.env | fix: add CA_ADDR=https://<control plane>:15012 to /etc/isthmus/agent.env",
            ]
        );
        // Other programs' variables in the unit's environment file are left alone.
        assert!(parse("CA_ADDR=https://cp:15012\nRUST_LOG=debug\n").is_ok());
        // Empty means the default.
        assert_eq!(
            parse("CA_ADDR=https://cp:15012\nISTHMUS_AGENT_DNS_ADDR=\n").unwrap(),
            AgentEnv::new(CaAddr::new("cp", 15012))
        );
    }

    #[test]
    fn ca_addr_forms() {
        for (text, authority) in [
            ("https://10.0.0.2:15012", "10.0.0.2:15012"),
            ("https://10.0.0.2:15012/", "10.0.0.2:15012"),
            (
                "https://istiod.istio-system.svc:15012",
                "istiod.istio-system.svc:15012",
            ),
            ("https://[fd00::2]:15012", "[fd00::2]:15012"),
        ] {
            let a: CaAddr = text.parse().unwrap();
            assert_eq!(a.authority(), authority);
            assert_eq!(a.to_string(), format!("https://{authority}"));
        }
        assert_eq!(
            "https://[fd00::2]:15012"
                .parse::<CaAddr>()
                .unwrap()
                .socket_addr(),
            Some("[fd00::2]:15012".parse().unwrap())
        );
        for (text, problem) in [
            ("10.0.0.2:15012", "expected https://HOST:PORT"),
            ("http://10.0.0.2:15012", "expected https://HOST:PORT"),
            ("https://10.0.0.2", "no port"),
            ("https://10.0.0.2:15012/x", "no path"),
            ("https://:15012", "no host"),
            ("https://10.0.0.2:0", "port 0"),
            ("https://10.0.0.2:http", "\"http\" is not a port"),
            ("https://fd00::2:15012", "brackets"),
        ] {
            let e = text.parse::<CaAddr>().unwrap_err().to_string();
            assert!(e.contains(problem) && e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn ca_addr_lists_name_every_replica_and_the_bad_element() {
        let a: CaAddr = "https://10.0.0.2:15012, https://[fd00::3]:15012,https://cp-c:15012/"
            .parse()
            .unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(
            a.authority(),
            "10.0.0.2:15012",
            "the first one is the primary"
        );
        assert_eq!(
            a.to_string(),
            "https://10.0.0.2:15012,https://[fd00::3]:15012,https://cp-c:15012"
        );
        assert_eq!(a.to_string().parse::<CaAddr>().unwrap(), a, "round trip");
        let all: Vec<String> = a.all().iter().map(CaAddr::authority).collect();
        assert_eq!(all, ["10.0.0.2:15012", "[fd00::3]:15012", "cp-c:15012"]);
        for (text, problem) in [
            (
                "https://a:15012,b:15012",
                "\"b:15012\": expected https://HOST:PORT",
            ),
            ("https://a:15012,", "\"\": expected https://HOST:PORT"),
            ("https://a:15012,https://a:15012", "listed twice"),
        ] {
            let e = text.parse::<CaAddr>().unwrap_err().to_string();
            assert!(e.contains(problem) && e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn under_root_moves_every_host_path() {
        let mut env = AgentEnv::new(CaAddr::new("cp", 15012));
        env.join_token_file = Some(TOKEN_PATH.into());
        let r = env.under_root(Path::new("/tmp/r"));
        assert_eq!(r.cert_dir, Path::new("/tmp/r/etc/certs"));
        assert_eq!(
            r.join_token_file.as_deref(),
            Some(Path::new("/tmp/r/etc/isthmus/token"))
        );
        assert_eq!(r.state_dir, Path::new("/tmp/r/var/lib/isthmus"));
        assert_eq!(
            r.cluster_env,
            Path::new("/tmp/r/var/lib/istio/envoy/cluster.env")
        );
        assert_eq!(
            r.root_cert_path(),
            Path::new("/tmp/r/etc/certs/root-cert.pem")
        );
    }
}
