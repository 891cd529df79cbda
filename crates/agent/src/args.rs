//! Every setting of `isthmus agent`, parsed in one place. Variables keep Istio's names where
//! Istio has one (`CA_ADDR`, `TRUST_DOMAIN`).
// The doc comments are `--help` text, where `<cert-dir>` and `<ip>` are placeholders, not HTML.
#![allow(rustdoc::invalid_html_tags)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use isthmus_agent_config::{defaults, keys};

pub use isthmus_agent_config::InboundMode;

#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// The control plane's certificate API, e.g. https://10.0.0.2:15012 (Istio's CA_ADDR).
    #[arg(long, env = keys::CA_ADDR)]
    pub ca_addr: String,
    /// The name the control plane's certificate must carry.
    #[arg(long, default_value = defaults::CA_SERVER_NAME, env = keys::CA_SERVER_NAME)]
    pub ca_server_name: String,
    /// Where key.pem, cert-chain.pem and root-cert.pem are kept (the seeds' /etc/certs).
    #[arg(long, default_value = defaults::CERT_DIR, env = keys::CERT_DIR)]
    pub cert_dir: PathBuf,
    /// Roots to trust for the control plane [default: <cert-dir>/root-cert.pem].
    #[arg(long, env = keys::ROOT_CERT)]
    pub root_cert: Option<PathBuf>,
    /// Join token (from `isthmus token create`); prefer --join-token-file.
    #[arg(
        long,
        env = keys::JOIN_TOKEN,
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    pub join_token: Option<String>,
    /// File holding the join token (re-read at each use).
    #[arg(long, env = keys::JOIN_TOKEN_FILE)]
    pub join_token_file: Option<PathBuf>,
    /// Keep a workload token in this file, renewed at half its life: the token file of
    /// token-only clients on this host, such as Istio's ztunnel (its enrolment is the join
    /// token's; revoking that token ends it).
    #[arg(long, env = keys::WORKLOAD_TOKEN_FILE)]
    pub workload_token_file: Option<PathBuf>,
    /// Lifetime of the workload tokens the agent asks for (1m to 24h).
    #[arg(long, default_value = "1h")]
    pub workload_token_lifetime: humantime::Duration,
    /// Certificate lifetime to ask for (default: the CA's).
    #[arg(long)]
    pub cert_lifetime: Option<humantime::Duration>,
    /// Prometheus metrics (certificate expiry, requests).
    #[arg(long, default_value = defaults::METRICS_ADDR, env = keys::METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Run only the identity manager (the seeds' node agent): keep a valid certificate in
    /// --cert-dir and nothing else.
    #[arg(long)]
    pub identity_only: bool,

    /// This host's mesh IP (Istio's ISTIO_SVC_IP) [default: the local address that routes to
    /// the control plane].
    #[arg(long, env = keys::SVC_IP)]
    pub ip: Option<std::net::IpAddr>,
    /// Register this host as a member of this WorkloadGroup (of its own namespace) while it is
    /// connected.
    #[arg(long, env = keys::WORKLOAD_GROUP)]
    pub group: Option<String>,
    /// The mesh's DNS domain.
    #[arg(long, default_value = defaults::DOMAIN, env = keys::DOMAIN)]
    pub domain: String,
    /// Where the agent keeps its state (the last-known-good discovery state).
    #[arg(long, default_value = defaults::STATE_DIR, env = keys::STATE_DIR)]
    pub state_dir: PathBuf,
    /// The DNS proxy: mesh names from local state, the rest forwarded to the host's resolvers.
    #[arg(long, default_value = defaults::DNS_ADDR, env = keys::DNS_ADDR)]
    pub dns_addr: SocketAddr,
    /// Resolvers for names outside the mesh (repeatable) [default: /etc/resolv.conf's].
    #[arg(long = "dns-upstream", value_name = "IP:PORT")]
    pub dns_upstreams: Vec<SocketAddr>,
    /// Agent admin (config dump, certificate): localhost only.
    #[arg(long, default_value = defaults::ADMIN_ADDR, env = keys::ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Readiness (`/healthz/ready`): 200 once the agent has a certificate and the first full
    /// discovery state.
    #[arg(long, default_value = defaults::READINESS_ADDR, env = keys::READINESS_ADDR)]
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
    #[arg(long, env = keys::PROXY, value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub proxy: bool,
    /// Install the interception rules (iptables) from cluster.env and sidecar.env while the
    /// proxy runs, and remove them on a clean stop. Needs --proxy and root (or NET_ADMIN).
    #[arg(long, env = keys::CAPTURE, requires_if("true", "proxy"), value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub capture: bool,
    /// Istio's cluster.env: the service networks to capture (ISTIO_SERVICE_CIDR, required with
    /// --capture; `*` captures every destination), DNS capture, excluded ports.
    #[arg(long, default_value = defaults::CLUSTER_ENV, env = keys::CLUSTER_ENV)]
    pub cluster_env: PathBuf,
    /// Istio's sidecar.env: the inbound ports to capture (ISTIO_INBOUND_PORTS).
    #[arg(long, default_value = defaults::SIDECAR_ENV, env = keys::SIDECAR_ENV)]
    pub sidecar_env: PathBuf,
    /// Plaintext connections captured inbound: PERMISSIVE passes them on, STRICT refuses them.
    #[arg(long, value_name = "permissive|strict", default_value = defaults::INBOUND_MODE, env = keys::INBOUND_MODE)]
    pub inbound_mode: InboundMode,
    /// Captured outbound connections to an address the mesh does not know.
    #[arg(long, value_enum, default_value = "passthrough")]
    pub outbound_unknown: OutboundUnknown,
    /// Send HTTP requests to peer agents that take them as streams of the mTLS connection
    /// itself (false: tunnel every upstream HTTP connection in a CONNECT, as to ztunnel;
    /// measured faster on HTTP/1.1, BENCHMARKS.md).
    #[arg(long, value_name = "true|false", default_value = "false", env = keys::HBONE_REQUESTS, action = clap::ArgAction::Set)]
    pub hbone_requests: bool,
    /// HBONE streams (tunnels) on one pooled connection to a peer before another connection
    /// to it is opened (ztunnel's POOL_MAX_STREAMS_PER_CONNECTION; the peer's
    /// SETTINGS_MAX_CONCURRENT_STREAMS lowers it).
    #[arg(long, value_name = "N", default_value = "100", env = keys::POOL_MAX_STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    pub pool_max_streams_per_connection: u32,
    /// Threads the proxy runs on (as ztunnel's ZTUNNEL_WORKER_THREADS). One, the default,
    /// keeps every connection on one thread; more run that many shards of the proxy, each
    /// with its own listeners on the same ports (SO_REUSEPORT) and its own pools, for hosts
    /// whose traffic needs more than one core.
    #[arg(long, value_name = "N", default_value = "1", env = keys::WORKER_THREADS, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,
    /// How long a data-plane thread polls its sockets before sleeping, when it spent a
    /// quarter or more of the last millisecond working (HAProxy's busy-polling, but only under
    /// load: an idle or lightly loaded agent never spins; of several shards, at most half the
    /// host's CPUs poll at once). Saves the wake-up of a sleeping vCPU, which on VMs costs tens
    /// of microseconds; 0 never polls. At most 1ms.
    #[arg(long, value_name = "DURATION", default_value = defaults::BUSY_POLL, env = keys::BUSY_POLL, value_parser = parse_busy_poll)]
    pub busy_poll: std::time::Duration,
    /// The scheduler slice the data-plane threads ask Linux for (EEVDF's per-thread slice,
    /// honoured from kernel 6.12): a woken proxy thread with a shorter slice than the thread
    /// running runs first instead of waiting for that slice to end, at the same share of the
    /// CPU. 100us to 100ms; 0 keeps the kernel's default (0.7 ms × (1 + log2 CPUs)).
    #[arg(long, value_name = "DURATION", default_value = defaults::SCHED_SLICE, env = keys::SCHED_SLICE, value_parser = parse_sched_slice)]
    pub sched_slice: std::time::Duration,
    /// On SIGTERM, how long open connections may finish after the proxy stops accepting
    /// (Istio's terminationDrainDuration).
    #[arg(long, default_value = defaults::DRAIN_DURATION, env = keys::DRAIN_DURATION)]
    pub drain_duration: humantime::Duration,

    /// Connections each proxy listener (outbound, plaintext inbound, HBONE) serves at once;
    /// past it new ones are closed at once [default: from the open-files limit].
    #[arg(long, env = keys::MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: Option<usize>,
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

fn parse_sched_slice(value: &str) -> Result<std::time::Duration, String> {
    isthmus_agent_config::parse_sched_slice(value).ok_or_else(|| {
        format!(
            "{value:?} is not {}",
            isthmus_agent_config::SCHED_SLICE_EXPECTED
        )
    })
}

fn parse_busy_poll(value: &str) -> Result<std::time::Duration, String> {
    isthmus_agent_config::parse_busy_poll(value).ok_or_else(|| {
        format!(
            "{value:?} is not {}",
            isthmus_agent_config::BUSY_POLL_EXPECTED
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::{Args as _, Command};
    use isthmus_agent_config::{keys, SETTINGS};

    /// Every agent.env setting is a flag with that variable and the same default, and every
    /// flag's variable is a setting: agent.env and the flags cannot drift apart.
    #[test]
    fn every_setting_is_a_flag_with_its_default() {
        let cmd = super::AgentArgs::augment_args(Command::new("agent"));
        let flags: BTreeMap<String, Option<String>> = cmd
            .get_arguments()
            .filter_map(|a| {
                let env = a.get_env()?.to_str()?.to_string();
                let default = a
                    .get_default_values()
                    .first()
                    .map(|d| d.to_string_lossy().into_owned());
                Some((env, default))
            })
            .collect();
        for s in SETTINGS {
            let default = flags
                .get(s.key)
                .unwrap_or_else(|| panic!("{} has no flag", s.key));
            assert_eq!(default.as_deref(), s.default, "{}", s.key);
        }
        for env in flags.keys() {
            assert!(
                SETTINGS.iter().any(|s| s.key == env) || env == keys::JOIN_TOKEN,
                "the flag of {env} is not an agent.env setting"
            );
        }
    }
}
