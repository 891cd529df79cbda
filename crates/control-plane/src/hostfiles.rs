//! The files of a host's bundle, in the seeds' formats (compat.md "Seed files"; where `join`
//! installs each: docs/host-layout.md). Written once, used by `isthmus vm config` (from the
//! admin API's facts) and by the onboarding service on the gRPC port (`join --server`).

use std::net::{IpAddr, SocketAddr};

use isthmus_agent_config::{AgentEnv, CaAddr, TOKEN_PATH};
use isthmus_model::WorkloadTemplate;

use crate::api::MeshInfo;

pub const CLUSTER_ENV: &str = "cluster.env";
pub const SIDECAR_ENV: &str = "sidecar.env";
pub const KUBEDNS: &str = "kubedns";
pub const HOSTS: &str = "hosts";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const TOKEN: &str = "token";
pub const AGENT_ENV: &str = "agent.env";
pub const KEY: &str = "key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// Files every bundle has; `KEY` and `CERT_CHAIN` only with --bootstrap-certs.
pub const REQUIRED: [&str; 7] = [
    CLUSTER_ENV,
    SIDECAR_ENV,
    KUBEDNS,
    HOSTS,
    ROOT_CERT,
    TOKEN,
    AGENT_ENV,
];

/// Seed names of the control plane that hosts' dnsmasq resolves to it, each also with the
/// `.istio-system` suffix.
pub const CONTROL_PLANE_NAMES: [&str; 6] = [
    "istiod",
    "istio-pilot",
    "istio-citadel",
    "istio-ca",
    "istio-policy",
    "istio-telemetry",
];
pub const SYSTEM_NAMESPACE: &str = "istio-system";
/// Istio's `ISTIO_LOCAL_EXCLUDE_PORTS` default for VMs: the sidecar's own metrics and health.
pub const LOCAL_EXCLUDE_PORTS: &str = "15090,15021,15020";

/// One file of a host's bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleFile {
    pub name: &'static str,
    pub contents: Vec<u8>,
    pub mode: u32,
}

/// What the files are made of: the server's facts and the choices for this host.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub mesh: MeshInfo,
    pub namespace: String,
    pub service_account: String,
    pub group: Option<String>,
    pub control_plane: SocketAddr,
    pub dns: SocketAddr,
    pub inbound_ports: String,
    pub ip: Option<IpAddr>,
}

/// What a WorkloadGroup's template decides for its hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDefaults {
    /// The template's service account, when it names one.
    pub service_account: Option<String>,
    /// The template's ports, sorted, as `ISTIO_INBOUND_PORTS`.
    pub inbound_ports: String,
}

pub fn group_defaults(template: &WorkloadTemplate) -> GroupDefaults {
    let mut ports: Vec<u16> = template
        .ports
        .values()
        .filter_map(|p| u16::try_from(*p).ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    GroupDefaults {
        service_account: Some(template.service_account.clone()).filter(|s| !s.is_empty()),
        inbound_ports: join_ports(&ports),
    }
}

pub fn join_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Where hosts reach the control plane's gRPC port by default: its first advertised address.
pub fn advertised_control_plane(mesh: &MeshInfo) -> Option<SocketAddr> {
    mesh.advertised_ips
        .first()
        .map(|ip| SocketAddr::new(*ip, mesh.grpc_addr.port()))
}

/// The mesh DNS address hosts can use: the server's, or the control plane's address when the
/// server listens on every address (or only on loopback while hosts are elsewhere, which the
/// returned warning says).
pub fn host_dns(mesh: &MeshInfo, control_plane: SocketAddr) -> (SocketAddr, Option<String>) {
    let ip = mesh.dns_addr.ip();
    if ip.is_unspecified() {
        return (
            SocketAddr::new(control_plane.ip(), mesh.dns_addr.port()),
            None,
        );
    }
    if ip.is_loopback() && !control_plane.ip().is_loopback() {
        let warning = format!(
            "the mesh DNS listens on {} only, which hosts cannot reach; kubedns points at {} instead (run the server with --dns-addr 0.0.0.0:53)",
            mesh.dns_addr,
            control_plane.ip()
        );
        return (
            SocketAddr::new(control_plane.ip(), mesh.dns_addr.port()),
            Some(warning),
        );
    }
    (mesh.dns_addr, None)
}

impl HostConfig {
    /// The control plane the bundle was made for, then every other replica (--public-addr),
    /// so the host fails over between them.
    fn ca_addr(&self) -> String {
        let first = CaAddr::from(self.control_plane).to_string();
        let mut all = vec![first];
        for other in &self.mesh.public_addrs {
            let other = other.trim().trim_end_matches('/').to_string();
            if !other.is_empty() && !all.contains(&other) {
                all.push(other);
            }
        }
        all.join(",")
    }

    pub fn cluster_env(&self) -> String {
        let mut s = format!(
            "ISTIO_SERVICE_CIDR={}\n\
             ISTIO_SYSTEM_NAMESPACE={SYSTEM_NAMESPACE}\n\
             ISTIO_CP_AUTH=MUTUAL_TLS\n\
             ISTIO_NAMESPACE={}\n\
             SERVICE_ACCOUNT={}\n\
             TRUST_DOMAIN={}\n\
             CA_ADDR={}\n\
             ISTIO_META_DNS_CAPTURE=true\n\
             ISTIO_LOCAL_EXCLUDE_PORTS={LOCAL_EXCLUDE_PORTS}\n",
            self.mesh.service_cidr,
            self.namespace,
            self.service_account,
            self.mesh.trust_domain,
            self.ca_addr(),
        );
        if let Some(ip) = self.ip {
            s.push_str(&format!("ISTIO_SVC_IP={ip}\n"));
        }
        // The service CIDR holds only the VIPs this control plane allocates, so the agent may
        // route it through lo (captured connections get loopback's segment size) -- unless the
        // control plane itself lives there, where the agent's own connections must go out.
        let vips_only = self
            .mesh
            .service_cidr
            .parse::<ipnet::IpNet>()
            .is_ok_and(|net| !net.contains(&self.control_plane.ip()));
        if vips_only {
            s.push_str(&format!("ISTHMUS_VIP_CIDR={}\n", self.mesh.service_cidr));
        }
        s
    }

    pub fn sidecar_env(&self) -> String {
        format!(
            "ISTIO_INBOUND_PORTS={}\nISTIO_INBOUND_INTERCEPTION_MODE=REDIRECT\n",
            self.inbound_ports
        )
    }

    /// The seeds' dnsmasq file: mesh names to the mesh DNS, control-plane names to its address.
    pub fn kubedns(&self) -> String {
        let dns = if self.dns.port() == 53 {
            self.dns.ip().to_string()
        } else {
            format!("{}#{}", self.dns.ip(), self.dns.port())
        };
        let mut s = format!("server=/svc.{}/{dns}\n", self.mesh.domain);
        let ip = self.control_plane.ip();
        for name in CONTROL_PLANE_NAMES {
            s.push_str(&format!("address=/{name}/{ip}\n"));
            s.push_str(&format!("address=/{name}.{SYSTEM_NAMESPACE}/{ip}\n"));
        }
        s
    }

    pub fn hosts(&self) -> String {
        format!("{} {}\n", self.control_plane.ip(), self.mesh.ca_server_name)
    }

    /// The agent's whole configuration (docs/host-layout.md); the host's real paths.
    pub fn agent_settings(&self) -> AgentEnv {
        let mut env = AgentEnv::new(CaAddr::from(self.control_plane));
        env.ca_server_name.clone_from(&self.mesh.ca_server_name);
        env.join_token_file = Some(TOKEN_PATH.into());
        env.domain.clone_from(&self.mesh.domain);
        env.proxy = true;
        env.capture = true;
        env.workload_group.clone_from(&self.group);
        env.svc_ip = self.ip;
        env
    }

    pub fn agent_env(&self) -> String {
        self.agent_settings().render()
    }

    /// Every file of the bundle; the secrets (token, key) owner-only.
    pub fn files(
        &self,
        root_cert: &str,
        token: &str,
        bootstrap: Option<(&str, &str)>,
    ) -> Vec<BundleFile> {
        let f = |name, contents: String, mode| BundleFile {
            name,
            contents: contents.into_bytes(),
            mode,
        };
        let mut files = vec![
            f(CLUSTER_ENV, self.cluster_env(), 0o644),
            f(SIDECAR_ENV, self.sidecar_env(), 0o644),
            f(KUBEDNS, self.kubedns(), 0o644),
            f(HOSTS, self.hosts(), 0o644),
            f(ROOT_CERT, root_cert.to_string(), 0o644),
            // No trailing newline: Istio's ztunnel sends a token file's bytes verbatim.
            f(TOKEN, token.trim().to_string(), 0o600),
            f(AGENT_ENV, self.agent_env(), 0o644),
        ];
        if let Some((key, chain)) = bootstrap {
            files.push(f(KEY, key.to_string(), 0o600));
            files.push(f(CERT_CHAIN, chain.to_string(), 0o644));
        }
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(dns: &str) -> MeshInfo {
        MeshInfo {
            trust_domain: "cluster.local".into(),
            domain: "cluster.local".into(),
            service_cidr: "10.96.0.0/16".into(),
            advertised_ips: vec!["10.0.0.2".parse().unwrap()],
            public_addrs: Vec::new(),
            grpc_addr: "0.0.0.0:15012".parse().unwrap(),
            dns_addr: dns.parse().unwrap(),
            ca_server_name: crate::api::CA_SERVER_NAME.into(),
        }
    }

    #[test]
    fn group_template_gives_account_and_sorted_ports() {
        let mut t = WorkloadTemplate::default();
        assert_eq!(
            group_defaults(&t),
            GroupDefaults {
                service_account: None,
                inbound_ports: String::new()
            }
        );
        t.service_account = "mysql".into();
        t.ports.insert("http".into(), 8080);
        t.ports.insert("mysql".into(), 3306);
        t.ports.insert("alt".into(), 3306);
        let d = group_defaults(&t);
        assert_eq!(d.service_account.as_deref(), Some("mysql"));
        assert_eq!(d.inbound_ports, "3306,8080");
    }

    #[test]
    fn the_vip_network_goes_through_lo_unless_the_control_plane_is_in_it() {
        let host = |cp: &str| HostConfig {
            mesh: mesh("0.0.0.0:53"),
            namespace: "onprem".into(),
            service_account: "mysql".into(),
            group: None,
            control_plane: cp.parse().unwrap(),
            dns: "10.0.0.2:53".parse().unwrap(),
            inbound_ports: "3306".into(),
            ip: None,
        };
        let env = host("10.0.0.2:15012").cluster_env();
        assert!(env.contains("ISTHMUS_VIP_CIDR=10.96.0.0/16\n"), "{env}");
        let env = host("10.96.0.7:15012").cluster_env();
        assert!(!env.contains("ISTHMUS_VIP_CIDR"), "{env}");
        // What the agent makes of the file: valid, and the network captured.
        let icfg = isthmus_intercept::InterceptConfig::from_env(
            &isthmus_intercept::EnvFile::parse(
                "cluster.env",
                &host("10.0.0.2:15012").cluster_env(),
            )
            .unwrap(),
            &isthmus_intercept::EnvFile::empty("sidecar.env"),
            &[],
        )
        .unwrap();
        assert_eq!(icfg.vip_cidrs, vec!["10.96.0.0/16".parse().unwrap()]);
    }

    #[test]
    fn dns_for_hosts() {
        let cp: SocketAddr = "10.0.0.2:15012".parse().unwrap();
        let m = mesh("0.0.0.0:53");
        assert_eq!(advertised_control_plane(&m), Some(cp));
        assert_eq!(host_dns(&m, cp), ("10.0.0.2:53".parse().unwrap(), None));
        let (addr, warning) = host_dns(&mesh("127.0.0.1:5353"), cp);
        assert_eq!(addr, "10.0.0.2:5353".parse().unwrap());
        assert!(warning.unwrap().contains("--dns-addr"));
        let local: SocketAddr = "127.0.0.1:15012".parse().unwrap();
        assert_eq!(
            host_dns(&mesh("127.0.0.1:5353"), local),
            ("127.0.0.1:5353".parse().unwrap(), None)
        );
    }
}
