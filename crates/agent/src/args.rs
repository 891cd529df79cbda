//! Every setting of `isthmus agent`, parsed in one place. Variables keep Istio's names where
//! Istio has one (`CA_ADDR`, `TRUST_DOMAIN`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:15020";
pub const DEFAULT_DNS_ADDR: &str = "127.0.0.1:15053";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";

#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// The control plane's certificate API, e.g. https://10.0.0.2:15012 (Istio's CA_ADDR).
    #[arg(long, env = "CA_ADDR")]
    pub ca_addr: String,
    /// The name the control plane's certificate must carry.
    #[arg(long, default_value = crate::identity::config::DEFAULT_CA_SERVER_NAME, env = "ISTHMUS_CA_SERVER_NAME")]
    pub ca_server_name: String,
    /// Where key.pem, cert-chain.pem and root-cert.pem are kept (the seeds' /etc/certs).
    #[arg(long, default_value = crate::identity::config::DEFAULT_CERT_DIR, env = "ISTHMUS_CERT_DIR")]
    pub cert_dir: PathBuf,
    /// Roots to trust for the control plane [default: <cert-dir>/root-cert.pem].
    #[arg(long, env = "ISTHMUS_ROOT_CERT")]
    pub root_cert: Option<PathBuf>,
    /// Join token (from `isthmus token create`); prefer --join-token-file.
    #[arg(
        long,
        env = "ISTHMUS_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    pub join_token: Option<String>,
    /// File holding the join token (re-read at each use).
    #[arg(long, env = "ISTHMUS_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Certificate lifetime to ask for (default: the CA's).
    #[arg(long)]
    pub cert_lifetime: Option<humantime::Duration>,
    /// Prometheus metrics (certificate expiry, requests).
    #[arg(long, default_value = DEFAULT_METRICS_ADDR, env = "ISTHMUS_AGENT_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Run only the identity manager (the seeds' node agent): keep a valid certificate in
    /// --cert-dir and nothing else.
    #[arg(long)]
    pub identity_only: bool,

    /// This host's mesh IP (Istio's ISTIO_SVC_IP) [default: the local address that routes to
    /// the control plane].
    #[arg(long, env = "ISTIO_SVC_IP")]
    pub ip: Option<std::net::IpAddr>,
    /// Register this host as a member of this WorkloadGroup (of its own namespace) while it is
    /// connected.
    #[arg(long, env = "ISTHMUS_WORKLOAD_GROUP")]
    pub group: Option<String>,
    /// The mesh's DNS domain.
    #[arg(long, default_value = "cluster.local", env = "ISTHMUS_DOMAIN")]
    pub domain: String,
    /// Where the agent keeps its state (the last-known-good discovery state).
    #[arg(long, default_value = "/var/lib/isthmus", env = "ISTHMUS_STATE_DIR")]
    pub state_dir: PathBuf,
    /// The DNS proxy: mesh names from local state, the rest forwarded to the host's resolvers.
    #[arg(long, default_value = DEFAULT_DNS_ADDR, env = "ISTHMUS_AGENT_DNS_ADDR")]
    pub dns_addr: SocketAddr,
    /// Resolvers for names outside the mesh (repeatable) [default: /etc/resolv.conf's].
    #[arg(long = "dns-upstream", value_name = "IP:PORT")]
    pub dns_upstreams: Vec<SocketAddr>,
    /// Agent admin (config dump, certificate): localhost only.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR, env = "ISTHMUS_AGENT_ADMIN_ADDR")]
    pub admin_addr: SocketAddr,
    /// Readiness (`/healthz/ready`): 200 once the agent has a certificate and the first full
    /// discovery state.
    #[arg(long, default_value = DEFAULT_READINESS_ADDR, env = "ISTHMUS_AGENT_READINESS_ADDR")]
    pub readiness_addr: SocketAddr,
    /// Health probe of the local app, TCP connect: PORT (the group's tcpSocket probe).
    #[arg(long, value_name = "PORT", conflicts_with = "probe_http")]
    pub probe_tcp: Option<String>,
    /// Health probe of the local app, HTTP GET: PORT/PATH (the group's httpGet probe).
    #[arg(long, value_name = "PORT/PATH")]
    pub probe_http: Option<String>,
    #[arg(long, default_value = "10s")]
    pub probe_period: humantime::Duration,
    #[arg(long, default_value = "1s")]
    pub probe_timeout: humantime::Duration,
    #[arg(long, default_value_t = 1)]
    pub probe_success_threshold: u32,
    #[arg(long, default_value_t = 3)]
    pub probe_failure_threshold: u32,

    /// Run the proxy: outbound capture 127.0.0.1:15001, plaintext inbound 0.0.0.0:15006,
    /// HBONE inbound <ip>:15008.
    #[arg(long, env = "ISTHMUS_PROXY", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub proxy: bool,
    /// Install the interception rules (iptables) from cluster.env and sidecar.env while the
    /// proxy runs, and remove them on a clean stop. Needs --proxy and root (or NET_ADMIN).
    #[arg(long, env = "ISTHMUS_CAPTURE", requires_if("true", "proxy"), value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub capture: bool,
    #[arg(
        long,
        default_value = "/var/lib/istio/envoy/cluster.env",
        env = "ISTHMUS_CLUSTER_ENV"
    )]
    pub cluster_env: PathBuf,
    #[arg(
        long,
        default_value = "/var/lib/istio/envoy/sidecar.env",
        env = "ISTHMUS_SIDECAR_ENV"
    )]
    pub sidecar_env: PathBuf,
    /// Plaintext connections captured inbound: PERMISSIVE passes them on, STRICT refuses them.
    #[arg(
        long,
        value_enum,
        default_value = "permissive",
        env = "ISTHMUS_INBOUND_MODE"
    )]
    pub inbound_mode: InboundMode,
    /// Captured outbound connections to an address the mesh does not know.
    #[arg(long, value_enum, default_value = "passthrough")]
    pub outbound_unknown: OutboundUnknown,
    /// On SIGTERM, how long open connections may finish after the proxy stops accepting
    /// (Istio's terminationDrainDuration).
    #[arg(long, default_value = "5s", env = "ISTHMUS_DRAIN_DURATION")]
    pub drain_duration: humantime::Duration,

    // --- Resource bounds (issue 13, part 1); kept apart for the typed-config rework. ---
    /// Connections each proxy listener (outbound, plaintext inbound, HBONE) serves at once;
    /// past it new ones are closed at once [default: from the open-files limit].
    #[arg(long, env = "ISTHMUS_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundMode {
    Permissive,
    Strict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboundUnknown {
    Passthrough,
    Refuse,
}

impl AgentArgs {
    pub fn probe(&self) -> Result<Option<crate::probe::Probe>, crate::probe::ProbeSpecError> {
        let check = match (&self.probe_tcp, &self.probe_http) {
            (Some(t), _) => crate::probe::parse_spec(t, false)?,
            (None, Some(h)) => crate::probe::parse_spec(h, true)?,
            (None, None) => return Ok(None),
        };
        Ok(Some(crate::probe::Probe {
            check,
            period: self.probe_period.into(),
            timeout: self.probe_timeout.into(),
            success_threshold: self.probe_success_threshold,
            failure_threshold: self.probe_failure_threshold,
        }))
    }

    pub fn identity_config(&self) -> crate::identity::IdentityConfig {
        let mut cfg = crate::identity::IdentityConfig::new(self.ca_addr.clone());
        cfg.ca_server_name.clone_from(&self.ca_server_name);
        cfg.cert_dir.clone_from(&self.cert_dir);
        cfg.ca_root.clone_from(&self.root_cert);
        cfg.token = match (&self.join_token, &self.join_token_file) {
            (Some(t), _) => Some(crate::identity::TokenSource::Inline(t.clone())),
            (None, Some(p)) => Some(crate::identity::TokenSource::File(p.clone())),
            (None, None) => None,
        };
        cfg.lifetime = self.cert_lifetime.map(Into::into);
        cfg
    }
}
