//! The interception variables of the seed files, parsed and validated once.
//!
//! Precedence, lowest first: `cluster.env`, `sidecar.env`, then the caller's overrides (flags or
//! the process environment). Variables this module does not know are ignored here (the env file
//! keeps them for others).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::envfile::EnvFile;

/// Outbound TCP to the service CIDRs is redirected here.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Inbound TCP to the captured ports is redirected here.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// DNS (port 53, UDP and TCP) is redirected here when DNS capture is on.
pub const DNS_CAPTURE_PORT: u16 = 15053;
/// Never captured inbound: SSH and the agent's own ports (admin, outbound, inbound, HBONE,
/// metrics, readiness, DNS). Excluded ports from the seed files are added to these.
pub const DEFAULT_EXCLUDED_INBOUND_PORTS: [u16; 8] =
    [22, 15000, 15001, 15006, 15008, 15020, 15021, 15053];
/// Istio's proxy uid and gid.
pub const DEFAULT_PROXY_UID: u32 = 1337;
pub const DEFAULT_PROXY_GID: u32 = 1337;
/// The mark on the agent's own packets (Istio's `PACKET_MARK`, ztunnel's): exempt from capture
/// whatever user the agent runs as.
pub const DEFAULT_PROXY_MARK: u32 = 1337;
/// What the fix of a missing `ISTIO_SERVICE_CIDR` suggests.
const SERVICE_CIDR_EXAMPLE: &str = "10.96.0.0/12";

pub const ISTIO_SERVICE_CIDR: &str = "ISTIO_SERVICE_CIDR";
pub const ISTIO_SERVICE_EXCLUDE_CIDR: &str = "ISTIO_SERVICE_EXCLUDE_CIDR";
pub const ISTIO_INBOUND_PORTS: &str = "ISTIO_INBOUND_PORTS";
pub const ISTIO_INBOUND_EXCLUDE_PORTS: &str = "ISTIO_INBOUND_EXCLUDE_PORTS";
pub const ISTIO_LOCAL_EXCLUDE_PORTS: &str = "ISTIO_LOCAL_EXCLUDE_PORTS";
pub const ISTIO_META_DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
pub const ISTIO_INBOUND_INTERCEPTION_MODE: &str = "ISTIO_INBOUND_INTERCEPTION_MODE";
/// Isthmus additions: who the agent runs as, so its own traffic is never captured. An empty
/// value turns that exemption off; at least one of the three must remain.
pub const ISTHMUS_PROXY_UID: &str = "ISTHMUS_PROXY_UID";
pub const ISTHMUS_PROXY_GID: &str = "ISTHMUS_PROXY_GID";
pub const ISTHMUS_PROXY_MARK: &str = "ISTHMUS_PROXY_MARK";
/// Isthmus addition: service networks that hold only mesh VIPs, routed through loopback so
/// captured connections get loopback's segment size (see [`crate::routes`]). Empty by default.
pub const ISTHMUS_VIP_CIDR: &str = "ISTHMUS_VIP_CIDR";

/// Which destinations outbound capture applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrSelection {
    /// `ISTIO_SERVICE_CIDR` unset or empty: nothing is captured outbound, and the agent refuses
    /// to capture ([`InterceptConfig::check_capture`]). Istio read this as `*`; capturing
    /// everything by default is how an agent ends up capturing itself, so it must be asked for.
    Unset,
    /// `*`: every destination (but the excluded ones and loopback).
    All,
    /// These networks (host bits cleared).
    List(Vec<IpNet>),
}

/// Which inbound ports are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSelection {
    /// Empty or unset: no inbound capture.
    None,
    /// `*`: every port but the excluded ones.
    All,
    /// These ports (the excluded ones are still left alone).
    List(Vec<u16>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterceptionMode {
    Redirect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptConfig {
    pub service_cidrs: CidrSelection,
    pub service_exclude_cidrs: Vec<IpNet>,
    pub inbound_ports: PortSelection,
    /// Defaults plus `ISTIO_INBOUND_EXCLUDE_PORTS` plus `ISTIO_LOCAL_EXCLUDE_PORTS`.
    pub inbound_exclude_ports: BTreeSet<u16>,
    pub proxy_uid: Option<u32>,
    pub proxy_gid: Option<u32>,
    pub proxy_mark: Option<u32>,
    pub dns_capture: bool,
    pub mode: InterceptionMode,
    /// `ISTHMUS_VIP_CIDR`: captured networks routed through loopback (host bits cleared).
    pub vip_cidrs: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?}: {problem} (set in {origin})")]
    Invalid {
        var: &'static str,
        value: String,
        problem: String,
        origin: String,
    },
    #[error(
        "{var}={value:?}: TPROXY interception is not supported yet; use REDIRECT (set in {origin})"
    )]
    TproxyNotSupported {
        var: &'static str,
        value: String,
        origin: String,
    },
    #[error(
        "{ISTHMUS_PROXY_UID}, {ISTHMUS_PROXY_GID} and {ISTHMUS_PROXY_MARK} are all empty: the \
         agent's own traffic would be captured and loop; set at least one"
    )]
    NoProxyExemption,
    #[error("{}", no_service_cidr(.file, *.missing))]
    NoServiceCidr { file: String, missing: bool },
}

impl Default for InterceptConfig {
    /// What an empty `cluster.env` and `sidecar.env` mean.
    fn default() -> Self {
        Self {
            service_cidrs: CidrSelection::Unset,
            service_exclude_cidrs: Vec::new(),
            inbound_ports: PortSelection::None,
            inbound_exclude_ports: DEFAULT_EXCLUDED_INBOUND_PORTS.into_iter().collect(),
            proxy_uid: Some(DEFAULT_PROXY_UID),
            proxy_gid: Some(DEFAULT_PROXY_GID),
            proxy_mark: Some(DEFAULT_PROXY_MARK),
            dns_capture: false,
            mode: InterceptionMode::Redirect,
            vip_cidrs: Vec::new(),
        }
    }
}

fn no_service_cidr(file: &str, missing: bool) -> String {
    let what = if missing {
        format!("{file} does not exist, so nothing sets")
    } else {
        format!("{file} does not set")
    };
    format!(
        "refusing to capture: {what} {ISTIO_SERVICE_CIDR}, the destinations to capture; set \
         {ISTIO_SERVICE_CIDR}={SERVICE_CIDR_EXAMPLE} (your service network) in {file}, or \
         {ISTIO_SERVICE_CIDR}=* to capture every destination"
    )
}

/// A variable's value and where it came from.
struct Var<'a> {
    name: &'static str,
    value: &'a str,
    origin: String,
}

impl Var<'_> {
    fn invalid(&self, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            var: self.name,
            value: self.value.to_string(),
            problem: problem.into(),
            origin: self.origin.clone(),
        }
    }
}

impl InterceptConfig {
    /// The config from the seed files and overrides (later wins: cluster, sidecar, overrides).
    pub fn from_env(
        cluster_env: &EnvFile,
        sidecar_env: &EnvFile,
        overrides: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let lookup = |name: &'static str| -> Option<Var<'_>> {
            if let Some((_, v)) = overrides.iter().rev().find(|(k, _)| k == name) {
                return Some(Var {
                    name,
                    value: v,
                    origin: "an override".to_string(),
                });
            }
            [sidecar_env, cluster_env].into_iter().find_map(|f| {
                f.entry(name).map(|e| Var {
                    name,
                    value: &e.value,
                    origin: format!("{}:{}", f.source(), e.line),
                })
            })
        };
        let mut c = Self::default();

        if let Some(var) = lookup(ISTIO_SERVICE_CIDR) {
            // Unlike Istio's `${ISTIO_SERVICE_CIDR:-*}`, empty is not everything: that takes `*`.
            c.service_cidrs = match var.value.trim() {
                "" => CidrSelection::Unset,
                "*" => CidrSelection::All,
                _ => CidrSelection::List(parse_cidrs(&var)?),
            };
        }
        if let Some(var) = lookup(ISTIO_SERVICE_EXCLUDE_CIDR) {
            c.service_exclude_cidrs = parse_cidrs(&var)?;
        }
        if let Some(var) = lookup(ISTIO_INBOUND_PORTS) {
            c.inbound_ports = match var.value.trim() {
                "" => PortSelection::None,
                "*" => PortSelection::All,
                _ => {
                    let ports = parse_ports(&var)?;
                    if ports.is_empty() {
                        PortSelection::None
                    } else {
                        PortSelection::List(ports)
                    }
                }
            };
        }
        for name in [ISTIO_INBOUND_EXCLUDE_PORTS, ISTIO_LOCAL_EXCLUDE_PORTS] {
            if let Some(var) = lookup(name) {
                c.inbound_exclude_ports.extend(parse_ports(&var)?);
            }
        }
        if let Some(var) = lookup(ISTIO_META_DNS_CAPTURE) {
            c.dns_capture = match var.value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" | "" => false,
                _ => return Err(var.invalid("expected true or false")),
            };
        }
        if let Some(var) = lookup(ISTIO_INBOUND_INTERCEPTION_MODE) {
            match var.value.trim().to_ascii_uppercase().as_str() {
                "" | "REDIRECT" => {}
                "TPROXY" => {
                    return Err(ConfigError::TproxyNotSupported {
                        var: var.name,
                        value: var.value.to_string(),
                        origin: var.origin,
                    })
                }
                _ => return Err(var.invalid("expected REDIRECT or TPROXY")),
            }
        }
        if let Some(var) = lookup(ISTHMUS_PROXY_UID) {
            c.proxy_uid = parse_id(&var)?;
        }
        if let Some(var) = lookup(ISTHMUS_PROXY_GID) {
            c.proxy_gid = parse_id(&var)?;
        }
        if let Some(var) = lookup(ISTHMUS_PROXY_MARK) {
            c.proxy_mark = parse_id(&var)?;
            if c.proxy_mark == Some(0) {
                return Err(var.invalid("mark 0 is every unmarked packet"));
            }
        }
        if let Some(var) = lookup(ISTHMUS_VIP_CIDR) {
            c.vip_cidrs = parse_cidrs(&var)?;
            c.check_vip_cidrs()
                .map_err(|problem| var.invalid(problem))?;
        }
        c.validate()?;
        Ok(c)
    }

    /// What installing rules needs beyond [`InterceptConfig::from_env`]: `ISTIO_SERVICE_CIDR`
    /// set (to `*` for every destination). `cluster_env` is where it is expected, named in the
    /// error with the fix.
    pub fn check_capture(&self, cluster_env: &EnvFile) -> Result<(), ConfigError> {
        match self.service_cidrs {
            CidrSelection::Unset => Err(ConfigError::NoServiceCidr {
                file: cluster_env.source().to_string(),
                missing: cluster_env.is_missing(),
            }),
            _ => Ok(()),
        }
    }

    /// Checks a config built by hand the way [`InterceptConfig::from_env`] checks its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.proxy_uid.is_none() && self.proxy_gid.is_none() && self.proxy_mark.is_none() {
            return Err(ConfigError::NoProxyExemption);
        }
        self.check_vip_cidrs()
            .map_err(|problem| ConfigError::Invalid {
                var: ISTHMUS_VIP_CIDR,
                value: join(&self.vip_cidrs),
                problem,
                origin: "the config".into(),
            })
    }

    /// A VIP network is routed to loopback, so everything sent to it must be captured: it lies
    /// inside a captured service network, outside every excluded one, and away from the
    /// addresses a host needs (loopback, link-local, multicast, everything).
    fn check_vip_cidrs(&self) -> Result<(), String> {
        const RESERVED: [(&str, &str); 6] = [
            ("127.0.0.0/8", "loopback"),
            ("169.254.0.0/16", "link-local"),
            ("224.0.0.0/4", "multicast"),
            ("::1/128", "loopback"),
            ("fe80::/10", "link-local"),
            ("ff00::/8", "multicast"),
        ];
        for vip in &self.vip_cidrs {
            if vip.prefix_len() == 0 {
                return Err(format!(
                    "{vip} would send every address to loopback; list the networks of the \
                     service VIPs"
                ));
            }
            for (reserved, what) in RESERVED {
                let reserved: IpNet = reserved.parse().expect("a valid constant");
                if overlaps(vip, &reserved) {
                    return Err(format!("{vip} overlaps {reserved} ({what})"));
                }
            }
            let captured = match &self.service_cidrs {
                CidrSelection::Unset => false,
                CidrSelection::All => vip.addr().is_ipv4(),
                CidrSelection::List(nets) => nets.iter().any(|n| n.contains(vip)),
            };
            if !captured {
                let service = match &self.service_cidrs {
                    CidrSelection::Unset => "ISTIO_SERVICE_CIDR is unset".to_string(),
                    CidrSelection::All => "ISTIO_SERVICE_CIDR=* (IPv4 only)".to_string(),
                    CidrSelection::List(nets) => format!("ISTIO_SERVICE_CIDR={}", join(nets)),
                };
                return Err(format!(
                    "{vip} is not inside the captured networks ({service}); its traffic would \
                     be dropped, not proxied"
                ));
            }
            if let Some(ex) = self
                .service_exclude_cidrs
                .iter()
                .find(|ex| overlaps(vip, ex))
            {
                return Err(format!(
                    "{vip} overlaps ISTIO_SERVICE_EXCLUDE_CIDR's {ex}, whose traffic is not \
                     captured and would be dropped"
                ));
            }
        }
        Ok(())
    }

    /// The VIP network that holds `ip`, if one does: traffic the agent itself sends there is
    /// not captured and would be dropped.
    pub fn vip_cidr_holding(&self, ip: IpAddr) -> Option<IpNet> {
        self.vip_cidrs.iter().find(|n| n.contains(&ip)).copied()
    }

    /// Inbound ports captured one by one (a `List` minus the excluded ports).
    pub fn captured_inbound_ports(&self) -> Vec<u16> {
        match &self.inbound_ports {
            PortSelection::List(ports) => ports
                .iter()
                .copied()
                .filter(|p| !self.inbound_exclude_ports.contains(p))
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(IpNet::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn items<'a>(var: &'a Var<'_>) -> impl Iterator<Item = &'a str> {
    var.value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn parse_cidrs(var: &Var<'_>) -> Result<Vec<IpNet>, ConfigError> {
    let mut out: Vec<IpNet> = Vec::new();
    for item in items(var) {
        let net = if let Ok(net) = item.parse::<IpNet>() {
            net.trunc()
        } else if let Ok(ip) = item.parse::<IpAddr>() {
            IpNet::from(ip)
        } else if item == "*" {
            return Err(var.invalid("\"*\" must be the whole value"));
        } else {
            return Err(var.invalid(format!("{item:?} is not a CIDR")));
        };
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

fn parse_ports(var: &Var<'_>) -> Result<Vec<u16>, ConfigError> {
    let mut out = Vec::new();
    for item in items(var) {
        match item.parse::<u16>() {
            Ok(p) if p != 0 => {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            _ if item == "*" => return Err(var.invalid("\"*\" must be the whole value")),
            _ => return Err(var.invalid(format!("{item:?} is not a port"))),
        }
    }
    Ok(out)
}

fn parse_id(var: &Var<'_>) -> Result<Option<u32>, ConfigError> {
    let v = var.value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse::<u32>(),
    };
    parsed
        .map(Some)
        .map_err(|_| var.invalid(format!("{v:?} is not a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cluster: &str, sidecar: &str) -> Result<InterceptConfig, ConfigError> {
        InterceptConfig::from_env(
            &EnvFile::parse("cluster.env", cluster).unwrap(),
            &EnvFile::parse("sidecar.env", sidecar).unwrap(),
            &[],
        )
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn empty_files_give_the_defaults() {
        let c = config("", "").unwrap();
        assert_eq!(c, InterceptConfig::default());
        assert_eq!(c.service_cidrs, CidrSelection::Unset);
        assert_eq!(c.inbound_ports, PortSelection::None);
        assert_eq!(
            c.inbound_exclude_ports.iter().copied().collect::<Vec<_>>(),
            vec![22, 15000, 15001, 15006, 15008, 15020, 15021, 15053]
        );
        assert_eq!(
            (c.proxy_uid, c.proxy_gid, c.proxy_mark),
            (Some(1337), Some(1337), Some(0x539))
        );
        assert!(!c.dns_capture);
        // Empty is unset too; only `*` is everything.
        assert_eq!(
            config("ISTIO_SERVICE_CIDR=", "").unwrap().service_cidrs,
            CidrSelection::Unset
        );
        assert_eq!(
            config("ISTIO_SERVICE_CIDR=*", "").unwrap().service_cidrs,
            CidrSelection::All
        );
    }

    #[test]
    fn capture_needs_service_cidr_and_says_where_and_how() {
        let dir = std::env::temp_dir().join(format!("isthmus-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.env");
        let _ = std::fs::remove_file(&path);
        let sidecar = EnvFile::empty("sidecar.env");
        let check = |cluster: &EnvFile| {
            InterceptConfig::from_env(cluster, &sidecar, &[])
                .unwrap()
                .check_capture(cluster)
        };
        let p = path.display().to_string();
        let missing = EnvFile::read_optional(&path).unwrap();
        assert_eq!(
            check(&missing).unwrap_err().to_string(),
            format!(
                "refusing to capture: {p} does not exist, so nothing sets ISTIO_SERVICE_CIDR, the \
                 destinations to capture; set ISTIO_SERVICE_CIDR=10.96.0.0/12 (your service \
                 network) in {p}, or ISTIO_SERVICE_CIDR=* to capture every destination"
            )
        );
        std::fs::write(&path, "ISTIO_META_DNS_CAPTURE=true\nISTIO_SERVICE_CIDR=\n").unwrap();
        let unset = EnvFile::read_optional(&path).unwrap();
        assert_eq!(
            check(&unset).unwrap_err().to_string(),
            format!(
                "refusing to capture: {p} does not set ISTIO_SERVICE_CIDR, the destinations to \
                 capture; set ISTIO_SERVICE_CIDR=10.96.0.0/12 (your service network) in {p}, or \
                 ISTIO_SERVICE_CIDR=* to capture every destination"
            )
        );
        for ok in [
            "ISTIO_SERVICE_CIDR=*\n",
            "ISTIO_SERVICE_CIDR=10.96.0.0/12\n",
        ] {
            std::fs::write(&path, ok).unwrap();
            check(&EnvFile::read_optional(&path).unwrap()).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seed_values() {
        let c = config(
            "ISTIO_SERVICE_CIDR=10.96.0.1/12,fd00::/108\nISTIO_META_DNS_CAPTURE=True\n\
             ISTIO_LOCAL_EXCLUDE_PORTS=9000\n",
            "ISTIO_INBOUND_PORTS=\"3306, 8080\"\nISTIO_INBOUND_EXCLUDE_PORTS=\"8081,8080\"\n\
             ISTIO_SERVICE_EXCLUDE_CIDR=10.96.5.5\nISTIO_INBOUND_INTERCEPTION_MODE=REDIRECT\n",
        )
        .unwrap();
        assert_eq!(
            c.service_cidrs,
            CidrSelection::List(vec![net("10.96.0.0/12"), net("fd00::/108")])
        );
        assert_eq!(c.service_exclude_cidrs, vec![net("10.96.5.5/32")]);
        assert_eq!(c.inbound_ports, PortSelection::List(vec![3306, 8080]));
        assert_eq!(c.captured_inbound_ports(), vec![3306]);
        assert!(c.inbound_exclude_ports.contains(&9000));
        assert!(c.inbound_exclude_ports.contains(&8081));
        assert!(c.inbound_exclude_ports.contains(&22));
        assert!(c.dns_capture);
    }

    #[test]
    fn precedence_cluster_then_sidecar_then_overrides() {
        let cluster = EnvFile::parse("cluster.env", "ISTIO_INBOUND_PORTS=1\n").unwrap();
        let sidecar = EnvFile::parse("sidecar.env", "ISTIO_INBOUND_PORTS=2\n").unwrap();
        let c = InterceptConfig::from_env(&cluster, &EnvFile::empty("s"), &[]).unwrap();
        assert_eq!(c.inbound_ports, PortSelection::List(vec![1]));
        let c = InterceptConfig::from_env(&cluster, &sidecar, &[]).unwrap();
        assert_eq!(c.inbound_ports, PortSelection::List(vec![2]));
        let o = [(ISTIO_INBOUND_PORTS.to_string(), "*".to_string())];
        let c = InterceptConfig::from_env(&cluster, &sidecar, &o).unwrap();
        assert_eq!(c.inbound_ports, PortSelection::All);
        let o = [(ISTIO_INBOUND_PORTS.to_string(), String::new())];
        let c = InterceptConfig::from_env(&cluster, &sidecar, &o).unwrap();
        assert_eq!(c.inbound_ports, PortSelection::None);
    }

    #[test]
    fn bad_values_name_the_variable_the_value_and_the_origin() {
        let cases = [
            (
                "",
                "A=1\nISTIO_INBOUND_PORTS=\"80,http\"\n",
                "ISTIO_INBOUND_PORTS=\"80,http\": \"http\" is not a port (set in sidecar.env:2)",
            ),
            (
                "",
                "ISTIO_INBOUND_PORTS=80,*",
                "ISTIO_INBOUND_PORTS=\"80,*\": \"*\" must be the whole value (set in sidecar.env:1)",
            ),
            (
                "",
                "ISTIO_INBOUND_EXCLUDE_PORTS=0",
                "ISTIO_INBOUND_EXCLUDE_PORTS=\"0\": \"0\" is not a port (set in sidecar.env:1)",
            ),
            (
                "ISTIO_LOCAL_EXCLUDE_PORTS=65536",
                "",
                "ISTIO_LOCAL_EXCLUDE_PORTS=\"65536\": \"65536\" is not a port (set in cluster.env:1)",
            ),
            (
                "ISTIO_SERVICE_CIDR=10.96.0.0/33",
                "",
                "ISTIO_SERVICE_CIDR=\"10.96.0.0/33\": \"10.96.0.0/33\" is not a CIDR (set in cluster.env:1)",
            ),
            (
                "",
                "ISTIO_SERVICE_EXCLUDE_CIDR=*",
                "ISTIO_SERVICE_EXCLUDE_CIDR=\"*\": \"*\" must be the whole value (set in sidecar.env:1)",
            ),
            (
                "ISTIO_META_DNS_CAPTURE=yes",
                "",
                "ISTIO_META_DNS_CAPTURE=\"yes\": expected true or false (set in cluster.env:1)",
            ),
            (
                "",
                "ISTIO_INBOUND_INTERCEPTION_MODE=TPROXY",
                "ISTIO_INBOUND_INTERCEPTION_MODE=\"TPROXY\": TPROXY interception is not supported \
                 yet; use REDIRECT (set in sidecar.env:1)",
            ),
            (
                "",
                "ISTIO_INBOUND_INTERCEPTION_MODE=NONE",
                "ISTIO_INBOUND_INTERCEPTION_MODE=\"NONE\": expected REDIRECT or TPROXY (set in sidecar.env:1)",
            ),
            (
                "",
                "ISTHMUS_PROXY_UID=istio-proxy",
                "ISTHMUS_PROXY_UID=\"istio-proxy\": \"istio-proxy\" is not a number (set in sidecar.env:1)",
            ),
            (
                "",
                "ISTHMUS_PROXY_MARK=0",
                "ISTHMUS_PROXY_MARK=\"0\": mark 0 is every unmarked packet (set in sidecar.env:1)",
            ),
        ];
        for (cluster, sidecar, want) in cases {
            let e = config(cluster, sidecar).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn vip_cidrs_must_be_captured_and_leave_the_host_its_own_addresses() {
        let c = config(
            "ISTIO_SERVICE_CIDR=10.96.0.0/12,fd00::/64\nISTIO_SERVICE_EXCLUDE_CIDR=10.100.0.0/16\n",
            "ISTHMUS_VIP_CIDR=\"10.96.0.1/16, fd00::/108,10.96.0.0/16\"\n",
        )
        .unwrap();
        assert_eq!(c.vip_cidrs, vec![net("10.96.0.0/16"), net("fd00::/108")]);
        assert_eq!(
            c.vip_cidr_holding("10.96.3.4".parse().unwrap()),
            Some(net("10.96.0.0/16"))
        );
        assert_eq!(c.vip_cidr_holding("10.97.0.1".parse().unwrap()), None);
        // `*` captures IPv4 only.
        let c = config("ISTIO_SERVICE_CIDR=*", "ISTHMUS_VIP_CIDR=10.96.0.0/12").unwrap();
        assert_eq!(c.vip_cidrs, vec![net("10.96.0.0/12")]);
        assert!(config("", "").unwrap().vip_cidrs.is_empty());
        assert!(config("", "ISTHMUS_VIP_CIDR=")
            .unwrap()
            .vip_cidrs
            .is_empty());

        let cases = [
            (
                "ISTIO_SERVICE_CIDR=10.96.0.0/12",
                "ISTHMUS_VIP_CIDR=10.0.0.0/8",
                "ISTHMUS_VIP_CIDR=\"10.0.0.0/8\": 10.0.0.0/8 is not inside the captured networks \
                 (ISTIO_SERVICE_CIDR=10.96.0.0/12); its traffic would be dropped, not proxied \
                 (set in sidecar.env:1)",
            ),
            (
                "ISTIO_SERVICE_CIDR=*",
                "ISTHMUS_VIP_CIDR=fd00::/108",
                "ISTHMUS_VIP_CIDR=\"fd00::/108\": fd00::/108 is not inside the captured networks \
                 (ISTIO_SERVICE_CIDR=* (IPv4 only)); its traffic would be dropped, not proxied \
                 (set in sidecar.env:1)",
            ),
            (
                "ISTIO_SERVICE_CIDR=*\nISTIO_SERVICE_EXCLUDE_CIDR=10.96.5.5",
                "ISTHMUS_VIP_CIDR=10.96.0.0/12",
                "ISTHMUS_VIP_CIDR=\"10.96.0.0/12\": 10.96.0.0/12 overlaps \
                 ISTIO_SERVICE_EXCLUDE_CIDR's 10.96.5.5/32, whose traffic is not captured and \
                 would be dropped (set in sidecar.env:1)",
            ),
            (
                "ISTIO_SERVICE_CIDR=*",
                "ISTHMUS_VIP_CIDR=0.0.0.0/0",
                "ISTHMUS_VIP_CIDR=\"0.0.0.0/0\": 0.0.0.0/0 would send every address to \
                 loopback; list the networks of the service VIPs (set in sidecar.env:1)",
            ),
            (
                "ISTIO_SERVICE_CIDR=*",
                "ISTHMUS_VIP_CIDR=127.0.0.1",
                "ISTHMUS_VIP_CIDR=\"127.0.0.1\": 127.0.0.1/32 overlaps 127.0.0.0/8 (loopback) \
                 (set in sidecar.env:1)",
            ),
            (
                "ISTIO_SERVICE_CIDR=169.0.0.0/8",
                "ISTHMUS_VIP_CIDR=169.0.0.0/8",
                "ISTHMUS_VIP_CIDR=\"169.0.0.0/8\": 169.0.0.0/8 overlaps 169.254.0.0/16 \
                 (link-local) (set in sidecar.env:1)",
            ),
            (
                "",
                "ISTHMUS_VIP_CIDR=10.96.0.0/12,nope",
                "ISTHMUS_VIP_CIDR=\"10.96.0.0/12,nope\": \"nope\" is not a CIDR (set in sidecar.env:1)",
            ),
        ];
        for (cluster, sidecar, want) in cases {
            let e = config(cluster, sidecar).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        // A config built by hand is checked the same way.
        let bad = InterceptConfig {
            vip_cidrs: vec![net("::/0")],
            ..InterceptConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "ISTHMUS_VIP_CIDR=\"::/0\": ::/0 would send every address to loopback; list the \
             networks of the service VIPs (set in the config)"
        );
    }

    #[test]
    fn proxy_exemption_can_move_but_not_vanish() {
        let c = config(
            "",
            "ISTHMUS_PROXY_UID=\nISTHMUS_PROXY_GID=\nISTHMUS_PROXY_MARK=0x539\n",
        )
        .unwrap();
        assert_eq!(
            (c.proxy_uid, c.proxy_gid, c.proxy_mark),
            (None, None, Some(0x539))
        );
        let e = config(
            "",
            "ISTHMUS_PROXY_UID=\nISTHMUS_PROXY_GID=\nISTHMUS_PROXY_MARK=\n",
        )
        .unwrap_err();
        assert_eq!(e, ConfigError::NoProxyExemption);
    }
}
