//! Every setting of `isthmus server`, parsed and validated in one place.
// The doc comments are `--help` text, where `<data-dir>` and the like are placeholders, not HTML.
#![allow(rustdoc::invalid_html_tags)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;

use clap::Args;
use ipnet::IpNet;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/isthmus";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15080";
pub const DEFAULT_REGISTRATION_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:15014";
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15012";
pub const DEFAULT_DNS_ADDR: &str = "127.0.0.1:15054";
/// With --dev the mesh DNS listens where other hosts reach it, as the gRPC port does, so the
/// `kubedns` file of a bundle works.
pub const DEV_DNS_ADDR: &str = "0.0.0.0:15054";
/// A documentation address (RFC 5737): a UDP socket "connected" to it has the default route's
/// source address; no packet is sent.
const ROUTE_PROBE_V4: &str = "192.0.2.1:9";
/// The IPv6 documentation prefix (RFC 3849), for the same.
const ROUTE_PROBE_V6: &str = "[2001:db8::1]:9";
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
pub const ENDPOINTS_FILE: &str = "endpoints.json";
pub const REGISTRY_FILE: &str = "registry.redb";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// Embedded and durable (redb) in the data directory.
    Embedded,
    /// In memory: lost at exit. For tests and throwaway experiments.
    Memory,
    /// etcd v3, shared by several replicas (--etcd-endpoints, --seal-key-file).
    Etcd,
}

#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    /// A throwaway control plane: temporary data directory (removed at exit), prints the admin
    /// token, the URLs and the next commands, and writes the CLI's config file for this user.
    #[arg(long)]
    pub dev: bool,
    /// Where the registry, the admin token and the endpoints file live [default: /var/lib/isthmus,
    /// or a temporary directory with --dev].
    #[arg(long, env = "ISTHMUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "embedded", env = "ISTHMUS_STORE")]
    pub store: StoreKind,
    /// The admin API (authenticated). Keep it on loopback unless the network is trusted.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR, env = "ISTHMUS_ADMIN_ADDR")]
    pub admin_addr: SocketAddr,
    /// The seeds' read-only registration API (`/v1/registration`); use 0.0.0.0:8080 so hosts
    /// can read it.
    #[arg(long, default_value = DEFAULT_REGISTRATION_ADDR, env = "ISTHMUS_REGISTRATION_ADDR")]
    pub registration_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`), Istio's control-plane monitoring port.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR, env = "ISTHMUS_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// The range services' virtual IPs are allocated from.
    #[arg(long, default_value = DEFAULT_SERVICE_CIDR, env = "ISTHMUS_SERVICE_CIDR")]
    pub service_cidr: IpNet,
    /// The mesh's DNS domain: services are `<name>.<namespace>.svc.<domain>`.
    #[arg(long, default_value = isthmus_model::DEFAULT_DOMAIN, env = "ISTHMUS_DOMAIN")]
    pub domain: String,
    /// How many revisions of change history the store keeps for watches to resume from.
    #[arg(long, default_value_t = 100_000)]
    pub history: usize,
    /// With --store etcd: etcd's client URLs, comma-separated, all http:// or all https://.
    #[arg(long, env = "ISTHMUS_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// With --store etcd: every key lives under this prefix, so several meshes can share one etcd.
    #[arg(long, default_value = "/isthmus", env = "ISTHMUS_ETCD_PREFIX")]
    pub etcd_prefix: String,
    /// The CA that signed etcd's certificates (https:// endpoints).
    #[arg(long, env = "ISTHMUS_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,
    /// This replica's client certificate for etcd (with --etcd-key), when etcd checks clients.
    #[arg(long, env = "ISTHMUS_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "ISTHMUS_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// How long an etcd request may take before it fails (a write is then reported as possibly
    /// applied).
    #[arg(long, default_value = "5s", env = "ISTHMUS_ETCD_REQUEST_TIMEOUT")]
    pub etcd_request_timeout: humantime::Duration,
    /// etcd's --max-txn-ops: larger requests are refused before they are sent.
    #[arg(long, default_value_t = isthmus_store::etcd::DEFAULT_MAX_TXN_OPS, env = "ISTHMUS_ETCD_MAX_TXN_OPS")]
    pub etcd_max_txn_ops: usize,
    /// With --store etcd: 64 hex characters (32 bytes) that seal the mesh CA's key in etcd; the
    /// same file on every replica.
    #[arg(long, env = "ISTHMUS_SEAL_KEY_FILE")]
    pub seal_key_file: Option<PathBuf>,
    /// The admin token every replica accepts (only its hash goes to the shared store). Without
    /// it, the first replica generates one in its data directory.
    #[arg(long, env = "ISTHMUS_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// This replica's name in logs and status [default: the host name].
    #[arg(long, env = "ISTHMUS_REPLICA_NAME")]
    pub replica_name: Option<String>,
    /// On etcd: the TTL of this replica's lease. A replica that dies or is cut off loses its
    /// leadership and its hosts' presence within it (2s to 5m).
    #[arg(long, default_value = "10s", env = "ISTHMUS_LEASE_TTL")]
    pub lease_ttl: humantime::Duration,
    /// What `vm config` and `join` bundles write into CA_ADDR: every replica's gRPC address
    /// (repeatable or comma-separated) [default: https://<advertised IP>:<gRPC port>].
    #[arg(
        long = "public-addr",
        env = "ISTHMUS_PUBLIC_ADDR",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub public_addrs: Vec<String>,
    /// With --dev: do not write the CLI config file.
    #[arg(long)]
    pub no_client_config: bool,

    /// Certificate API and discovery (gRPC over TLS), Istio's port.
    #[arg(long, default_value = DEFAULT_GRPC_ADDR, env = "ISTHMUS_GRPC_ADDR")]
    pub grpc_addr: SocketAddr,
    /// The CA's directory (Istio's "cacerts" layout) [default: <data-dir>/ca]. A self-signed
    /// root is generated there on first start unless CA files are plugged in.
    #[arg(long, env = "ISTHMUS_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Plug in an intermediate CA signed by your own root: its certificate...
    #[arg(long, requires_all = ["ca_key", "ca_root"])]
    pub ca_cert: Option<PathBuf>,
    /// ...its private key (PKCS#8 PEM)...
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// ...the chain from it up to the root (intermediates)...
    #[arg(long, requires = "ca_cert")]
    pub ca_chain: Option<PathBuf>,
    /// ...and the root.
    #[arg(long, requires = "ca_cert")]
    pub ca_root: Option<PathBuf>,
    /// Extra roots to trust and hand out beside the CA's own (root rotation, see the README).
    #[arg(long, env = "ISTHMUS_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local", env = "ISTHMUS_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Lifetime of a workload certificate when the request asks for none.
    #[arg(long, default_value = "24h", env = "ISTHMUS_CERT_TTL")]
    pub cert_ttl: humantime::Duration,
    /// The longest lifetime a certificate request may ask for.
    #[arg(long, default_value = "90d", env = "ISTHMUS_MAX_CERT_TTL")]
    pub max_cert_ttl: humantime::Duration,
    /// Extra DNS names for the control plane's serving certificate (repeatable), besides
    /// istiod.istio-system.svc, istiod, isthmus and localhost.
    #[arg(long = "server-dns-name", value_name = "NAME")]
    pub server_dns_names: Vec<String>,
    /// How long an auto-registered workload's entry outlives its agent's disconnection.
    #[arg(long, default_value = "10s", env = "ISTHMUS_AUTOREG_GRACE")]
    pub autoreg_grace: humantime::Duration,
    /// Cluster id put on discovery's workloads (Istio's `CLUSTER_ID`).
    #[arg(long, default_value = "Kubernetes", env = "CLUSTER_ID")]
    pub cluster_id: String,
    /// Network of the registry's workloads (Istio's `--network`), empty for a flat network.
    #[arg(long, default_value = "", env = "ISTHMUS_NETWORK")]
    pub network: String,
    /// DNS for the mesh domain (UDP and TCP). Hosts' dnsmasq points `svc.<domain>` here, so
    /// for other hosts it must not be loopback (e.g. 0.0.0.0:15054) [default: 127.0.0.1:15054;
    /// 0.0.0.0:15054 with --dev].
    #[arg(long, env = "ISTHMUS_DNS_ADDR")]
    pub dns_addr: Option<SocketAddr>,
    /// Where the DNS server forwards names outside the mesh domain (repeatable, `ip[:port]`);
    /// without any, those names are refused.
    #[arg(long = "dns-upstream", value_name = "ADDR", value_parser = parse_upstream)]
    pub dns_upstreams: Vec<SocketAddr>,
    /// The address hosts reach the control plane at: control-plane names (istiod,
    /// istio-pilot, istio-citadel, ... with and without .istio-system) resolve to it, and
    /// `vm config` writes it into bundles [default: the --grpc-addr IP, or when that is
    /// 0.0.0.0 the address of the interface of the default route].
    #[arg(long, env = "ISTHMUS_ADVERTISE_IP")]
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Extra IPs for the serving certificate (repeatable), besides 127.0.0.1.
    #[arg(long = "server-ip", value_name = "IP")]
    pub server_ips: Vec<std::net::IpAddr>,

    /// Connections held at once by all listeners together, shared out between them (gRPC 60%,
    /// admin 20%, registration 10%, DNS over TCP 8%, metrics 2%). At a listener's share a new
    /// connection closes the oldest one that has not yet sent a request; when none is left it is
    /// refused [default: the open-files limit less a reserve for the store, DNS sockets and
    /// forwards].
    #[arg(long, env = "ISTHMUS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections held at once from one source IP on one listener; more are refused
    /// [default: a quarter of the listener's share, at least 4].
    #[arg(long, env = "ISTHMUS_MAX_CONNECTIONS_PER_SOURCE")]
    pub max_connections_per_source: Option<usize>,
    /// How long a client has to finish the TLS handshake on the gRPC port.
    #[arg(long, default_value = "10s", env = "ISTHMUS_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: humantime::Duration,
    /// How long a new connection has to send its first request: the HTTP/2 preface on the
    /// gRPC port, the complete request headers on the HTTP ports, a first DNS message.
    #[arg(long, default_value = "10s", env = "ISTHMUS_FIRST_REQUEST_TIMEOUT")]
    pub first_request_timeout: humantime::Duration,
    /// A gRPC connection with no bytes either way for this long is closed (the server pings
    /// every connection each third of it, so live agents never reach it).
    #[arg(long, default_value = "5m", env = "ISTHMUS_GRPC_IDLE_TIMEOUT")]
    pub grpc_idle_timeout: humantime::Duration,
    /// An HTTP connection with no bytes either way for this long is closed (watch streams send
    /// a keep-alive every 15 s).
    #[arg(long, default_value = "60s", env = "ISTHMUS_HTTP_IDLE_TIMEOUT")]
    pub http_idle_timeout: humantime::Duration,
    /// A DNS-over-TCP connection silent this long between messages is closed.
    #[arg(long, default_value = "10s", env = "ISTHMUS_DNS_TCP_IDLE_TIMEOUT")]
    pub dns_tcp_idle_timeout: humantime::Duration,
    /// DNS queries forwarded upstream at once; more are answered SERVFAIL at once [default:
    /// an eighth of the descriptor budget, between 16 and 1024].
    #[arg(long, env = "ISTHMUS_DNS_MAX_FORWARDS")]
    pub dns_max_forwards: Option<usize>,

    /// Watch streams (`isthmus get -w`, `GET ...?watch=1`) open at once, over all clients.
    #[arg(long, default_value_t = crate::registry::Registry::MAX_WATCHERS)]
    pub max_watchers: usize,
    /// Resource names one discovery stream may subscribe to per type (the wildcard is one).
    #[arg(long, default_value_t = isthmus_xds::server::ServerConfig::default().max_names_per_type)]
    pub max_subscriptions: usize,
    /// Discovery streams open at once under one identity (namespace and service account).
    #[arg(long, default_value_t = isthmus_xds::server::ServerConfig::default().max_streams_per_identity)]
    pub max_streams_per_identity: usize,
    /// Discovery streams open at once under one identity from one address (hosts behind one
    /// NAT share an address).
    #[arg(long, default_value_t = isthmus_xds::server::ServerConfig::default().max_streams_per_identity_and_ip)]
    pub max_streams_per_identity_and_address: usize,
    /// Close a discovery stream after about this long (±10%), so hosts reconnect and spread
    /// over every replica, new ones included (istiod's maximum connection age). `0s`: never.
    #[arg(long, default_value = "30m", env = "ISTHMUS_MAX_STREAM_AGE")]
    pub max_stream_age: humantime::Duration,
}

/// Descriptors kept out of the connection budget: the store, listeners, UDP DNS sockets,
/// log and CA files, outbound sockets.
pub const RESERVED_FDS: u64 = 128;

/// The connection caps and deadlines of every listener (see [`ServerArgs::listener_bounds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerBounds {
    pub grpc: isthmus_socket::GuardConfig,
    pub admin: isthmus_socket::GuardConfig,
    pub registration: isthmus_socket::GuardConfig,
    pub metrics: isthmus_socket::GuardConfig,
    pub dns_tcp: isthmus_socket::GuardConfig,
    pub dns_forwards: usize,
}

/// Where the advertised address came from: said in the line the server prints at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvertiseSource {
    /// --advertise-ip.
    Flag,
    /// --grpc-addr names one address.
    GrpcAddr,
    /// The gRPC port listens on every address: the default route's interface address.
    DefaultRoute,
    /// Every address, and no default route: this machine only.
    Loopback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advertised {
    pub ip: IpAddr,
    pub source: AdvertiseSource,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--domain {0:?} {1}")]
    Domain(String, String),
    #[error("--service-cidr {0} is too small: it must hold at least 2 addresses (a /30 or larger for IPv4, /127 for IPv6)")]
    CidrTooSmall(IpNet),
    #[error("{0}")]
    Etcd(String),
    #[error("--history must be at least 1")]
    History,
    #[error("--cert-ttl {0} is longer than --max-cert-ttl {1}")]
    CertTtl(humantime::Duration, humantime::Duration),
    #[error("--trust-domain {0:?} {1}")]
    TrustDomain(String, String),
    #[error("{0} must be more than 0 (leave it out for the default)")]
    Zero(&'static str),
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{s:?} is not an IP or IP:port"))
}

/// The source address of the default route (IPv6's when `v6`): a UDP socket connected to a
/// documentation address, which sends nothing; `None` when no route leads there.
pub fn default_route_ip(v6: bool) -> Option<IpAddr> {
    let (bind, probe) = if v6 {
        ("[::]:0", ROUTE_PROBE_V6)
    } else {
        ("0.0.0.0:0", ROUTE_PROBE_V4)
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
}

impl ServerArgs {
    /// The address hosts reach the control plane at: --advertise-ip, else the gRPC address
    /// when it names one, else what `default_route` finds for the gRPC address's family
    /// (see [`default_route_ip`]), else loopback.
    pub fn advertised(&self, default_route: impl Fn(bool) -> Option<IpAddr>) -> Advertised {
        let grpc = self.grpc_addr.ip();
        let (ip, source) = match self.advertise_ip {
            Some(ip) => (Some(ip), AdvertiseSource::Flag),
            None if !grpc.is_unspecified() => (Some(grpc), AdvertiseSource::GrpcAddr),
            // [::] takes IPv4 too (unless the host says v6only): an IPv4 route will do.
            None if grpc.is_ipv6() => (
                default_route(true).or_else(|| default_route(false)),
                AdvertiseSource::DefaultRoute,
            ),
            None => (default_route(false), AdvertiseSource::DefaultRoute),
        };
        match ip {
            Some(ip) => Advertised { ip, source },
            None => Advertised {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                source: AdvertiseSource::Loopback,
            },
        }
    }

    /// The mesh DNS server's address: --dns-addr, else the default for the mode.
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns_addr.unwrap_or_else(|| {
            let default = if self.dev {
                DEV_DNS_ADDR
            } else {
                DEFAULT_DNS_ADDR
            };
            // Both constants are literal socket addresses (the test below parses them).
            default
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 15054)))
        })
    }

    /// Every listener's bounds for an open-files soft limit of `nofile`: the flags where given,
    /// else shares of what the limit leaves after [`RESERVED_FDS`] and the DNS forwards, so
    /// the listeners together can never run the process out of descriptors.
    pub fn listener_bounds(&self, nofile: u64) -> ListenerBounds {
        let budget = usize::try_from(nofile.saturating_sub(RESERVED_FDS))
            .unwrap_or(usize::MAX)
            .max(64);
        let dns_forwards = self
            .dns_max_forwards
            .unwrap_or((budget / 8).clamp(16, 1024))
            .max(1);
        let total = self
            .max_connections
            .unwrap_or(budget.saturating_sub(dns_forwards));
        let guard = |percent: usize, idle: humantime::Duration| {
            let max_total = (total / 100 * percent + total % 100 * percent / 100).max(1);
            let max_per_source = self
                .max_connections_per_source
                .unwrap_or((max_total / 4).max(4))
                .clamp(1, max_total);
            isthmus_socket::GuardConfig {
                max_total,
                max_per_source,
                handshake_timeout: *self.handshake_timeout,
                first_timeout: *self.first_request_timeout,
                idle_timeout: *idle,
            }
        };
        ListenerBounds {
            grpc: guard(60, self.grpc_idle_timeout),
            admin: guard(20, self.http_idle_timeout),
            registration: guard(10, self.http_idle_timeout),
            dns_tcp: guard(8, self.dns_tcp_idle_timeout),
            metrics: guard(2, self.http_idle_timeout),
            dns_forwards,
        }
    }

    /// This replica's name: --replica-name, else the host name (on a shared store with the
    /// gRPC port, so that replicas on one machine differ; a restart keeps the name, and so
    /// finds and clears what its previous run left).
    pub fn replica(&self) -> String {
        if let Some(name) = &self.replica_name {
            return name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "isthmus".into());
        match (self.store, self.grpc_addr.port()) {
            (StoreKind::Etcd, 0) => format!("{host}-{:04x}", rand::random::<u16>()),
            (StoreKind::Etcd, port) => format!("{host}-{port}"),
            _ => host,
        }
    }

    fn validate_etcd(&self) -> Result<(), ConfigError> {
        let etcd = |m: String| Err(ConfigError::Etcd(m));
        if self.store != StoreKind::Etcd {
            if !self.etcd_endpoints.is_empty() {
                return etcd(
                    "--etcd-endpoints is given but the store is not etcd: add --store etcd".into(),
                );
            }
            return Ok(());
        }
        if self.dev {
            return etcd(
                "--dev runs a throwaway control plane on its own store; drop --dev to use etcd"
                    .into(),
            );
        }
        if self.etcd_endpoints.is_empty() {
            return etcd("--store etcd needs --etcd-endpoints (e.g. http://127.0.0.1:2379)".into());
        }
        let https = self
            .etcd_endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        let http = self
            .etcd_endpoints
            .iter()
            .filter(|e| e.starts_with("http://"))
            .count();
        if let Some(bad) = self
            .etcd_endpoints
            .iter()
            .find(|e| !e.starts_with("http://") && !e.starts_with("https://"))
        {
            return etcd(format!(
                "etcd endpoint {bad:?} must start with http:// or https://"
            ));
        }
        if https > 0 && http > 0 {
            return etcd("--etcd-endpoints mixes http:// and https://: use one scheme".into());
        }
        if https > 0 && self.etcd_cacert.is_none() {
            return etcd("https:// etcd endpoints need --etcd-cacert (the CA that signed etcd's certificates)".into());
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return etcd("--etcd-cert and --etcd-key go together".into());
        }
        if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.ends_with('/') {
            return etcd(format!(
                "--etcd-prefix {:?} must start with / and not end with / (e.g. /isthmus)",
                self.etcd_prefix
            ));
        }
        if self.seal_key_file.is_none() {
            return etcd("--store etcd needs --seal-key-file: the same 32-byte key on every replica seals the mesh CA in etcd (make one with `head -c32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > seal.key`)".into());
        }
        let ttl: std::time::Duration = self.lease_ttl.into();
        if ttl < std::time::Duration::from_secs(2) || ttl > std::time::Duration::from_secs(300) {
            return etcd(format!(
                "--lease-ttl {} is out of range: use 2s to 5m (etcd grants no shorter lease; a longer one delays failover)",
                self.lease_ttl
            ));
        }
        if let Some(name) = &self.replica_name {
            if name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace) {
                return etcd(format!(
                    "--replica-name {name:?} must be a non-empty name without / or spaces"
                ));
            }
        }
        if self.etcd_max_txn_ops == 0 {
            return Err(ConfigError::Zero("--etcd-max-txn-ops"));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(p) = isthmus_model::validate::dns_subdomain_problem(&self.domain) {
            return Err(ConfigError::Domain(self.domain.clone(), p));
        }
        let host_bits = u32::from(self.service_cidr.max_prefix_len())
            - u32::from(self.service_cidr.prefix_len());
        if host_bits < 2 && matches!(self.service_cidr, IpNet::V4(_)) || host_bits < 1 {
            return Err(ConfigError::CidrTooSmall(self.service_cidr));
        }
        if self.history == 0 {
            return Err(ConfigError::History);
        }
        self.validate_etcd()?;
        for a in &self.public_addrs {
            if let Err(e) = a.parse::<isthmus_agent_config::CaAddr>() {
                return Err(ConfigError::Etcd(format!("--public-addr {a:?}: {e}")));
            }
        }
        if *self.cert_ttl > *self.max_cert_ttl {
            return Err(ConfigError::CertTtl(self.cert_ttl, self.max_cert_ttl));
        }
        if let Some(p) = isthmus_model::validate::dns_subdomain_problem(&self.trust_domain) {
            return Err(ConfigError::TrustDomain(self.trust_domain.clone(), p));
        }
        for (flag, value) in [
            ("--max-connections", self.max_connections),
            (
                "--max-connections-per-source",
                self.max_connections_per_source,
            ),
            ("--dns-max-forwards", self.dns_max_forwards),
            ("--max-watchers", Some(self.max_watchers)),
            ("--max-subscriptions", Some(self.max_subscriptions)),
            (
                "--max-streams-per-identity",
                Some(self.max_streams_per_identity),
            ),
            (
                "--max-streams-per-identity-and-address",
                Some(self.max_streams_per_identity_and_address),
            ),
        ] {
            if value == Some(0) {
                return Err(ConfigError::Zero(flag));
            }
        }
        for (flag, value) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--first-request-timeout", self.first_request_timeout),
            ("--grpc-idle-timeout", self.grpc_idle_timeout),
            ("--http-idle-timeout", self.http_idle_timeout),
            ("--dns-tcp-idle-timeout", self.dns_tcp_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Zero(flag));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    fn args(flags: &[&str]) -> ServerArgs {
        let mut argv = vec!["isthmus"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).unwrap().server
    }

    const ROUTE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));

    /// Each wrong etcd setting is refused before anything starts, naming the flag and the fix.
    #[test]
    fn etcd_settings_are_checked_and_name_the_flag() {
        let base = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--seal-key-file",
            "/etc/isthmus/seal.key",
        ];
        let err = |extra: &[&str]| {
            let mut flags = base.to_vec();
            flags.extend_from_slice(extra);
            args(&flags).validate().unwrap_err().to_string()
        };
        assert!(args(&base).validate().is_ok());
        assert!(err(&["--lease-ttl", "1s"]).contains("--lease-ttl 1s is out of range"));
        assert!(err(&["--lease-ttl", "10m"]).contains("use 2s to 5m"));
        assert!(err(&["--replica-name", "a/b"]).contains("--replica-name"));
        assert!(err(&["--etcd-prefix", "isthmus"]).contains("must start with /"));
        assert!(err(&["--public-addr", "ftp://x"]).contains("--public-addr"));
        let no_seal = args(&[
            "--store",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
        ]);
        assert!(no_seal
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--seal-key-file"));
        let no_endpoints = args(&["--store", "etcd", "--seal-key-file", "/k"]);
        assert!(no_endpoints
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--etcd-endpoints"));
    }

    #[test]
    fn the_advertised_address_and_where_it_came_from() {
        let route = |_v6: bool| Some(ROUTE);
        let none = |_v6: bool| None;
        let a = args(&["--advertise-ip", "10.9.9.9"]).advertised(route);
        assert_eq!(
            (a.ip.to_string(), a.source),
            ("10.9.9.9".into(), AdvertiseSource::Flag)
        );
        let a = args(&["--grpc-addr", "10.0.0.2:15012"]).advertised(route);
        assert_eq!(
            (a.ip.to_string(), a.source),
            ("10.0.0.2".into(), AdvertiseSource::GrpcAddr)
        );
        // The default gRPC address is 0.0.0.0: the default route's interface address.
        let a = args(&["--dev"]).advertised(route);
        assert_eq!((a.ip, a.source), (ROUTE, AdvertiseSource::DefaultRoute));
        let a = args(&[]).advertised(none);
        assert_eq!(
            (a.ip.to_string(), a.source),
            ("127.0.0.1".into(), AdvertiseSource::Loopback)
        );
        let v6 = |v6: bool| v6.then(|| "fd00::2".parse().unwrap());
        let a = args(&["--grpc-addr", "[::]:15012"]).advertised(v6);
        assert_eq!(a.ip.to_string(), "fd00::2");
        let a = args(&["--grpc-addr", "[::]:15012"]).advertised(|v6| (!v6).then_some(ROUTE));
        assert_eq!(a.ip, ROUTE);
    }

    #[test]
    fn listener_bounds_fit_a_1024_descriptor_limit_and_follow_the_flags() {
        let b = args(&[]).listener_bounds(1024);
        let sum = b.grpc.max_total
            + b.admin.max_total
            + b.registration.max_total
            + b.metrics.max_total
            + b.dns_tcp.max_total
            + b.dns_forwards;
        assert!(sum as u64 + RESERVED_FDS <= 1024, "{b:?}");
        assert!(b.grpc.max_total >= 400 && b.admin.max_total >= 100, "{b:?}");
        assert_eq!(b.grpc.max_per_source, b.grpc.max_total / 4);
        assert_eq!(b.grpc.idle_timeout, std::time::Duration::from_secs(300));
        assert_eq!(b.admin.idle_timeout, std::time::Duration::from_secs(60));
        assert_eq!(b.grpc.first_timeout, std::time::Duration::from_secs(10));
        let b = args(&[
            "--max-connections",
            "1000",
            "--max-connections-per-source",
            "7",
            "--first-request-timeout",
            "2s",
        ])
        .listener_bounds(1_000_000);
        assert_eq!(
            (b.grpc.max_total, b.admin.max_total, b.metrics.max_total),
            (600, 200, 20)
        );
        assert_eq!(b.registration.max_per_source, 7);
        assert_eq!(b.dns_tcp.first_timeout, std::time::Duration::from_secs(2));
        let e = args(&["--max-connections", "0"]).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--max-connections must be more than 0 (leave it out for the default)"
        );
    }

    #[test]
    fn dev_dns_listens_where_hosts_reach_it_unless_told() {
        assert_eq!(args(&[]).dns_addr().to_string(), DEFAULT_DNS_ADDR);
        assert_eq!(args(&["--dev"]).dns_addr().to_string(), DEV_DNS_ADDR);
        assert_eq!(
            args(&["--dev", "--dns-addr", "127.0.0.1:0"])
                .dns_addr()
                .to_string(),
            "127.0.0.1:0"
        );
    }

    #[test]
    fn the_default_route_probe_sends_nothing_and_never_says_loopback() {
        // Whatever this machine's routes, the answer is a usable address or none.
        for v6 in [false, true] {
            if let Some(ip) = default_route_ip(v6) {
                assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}");
            }
        }
    }
}
