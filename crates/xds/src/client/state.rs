//! The agent's view of the mesh: validated internal types, indexed the ways the proxy and the
//! DNS server look things up.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use prost::Message;

use crate::pb::istio::security as sec;
use crate::pb::istio::workload as wl;
use crate::resources::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, HTTP_POLICY_TYPE_URL, TRAFFIC_TYPE_URL,
};
use crate::server::Identity;
use isthmus_model::traffic::ServiceTraffic;

/// Why a resource was rejected (and NACKed); the state keeps what it had under that name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resource {name:?}: {reason}")]
pub struct ResourceError {
    pub name: String,
    pub reason: String,
}

/// How a workload is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// Plain TCP: a registered endpoint without the agent.
    None,
    /// HBONE (mTLS + HTTP/2 CONNECT to port 15008): the host runs the agent.
    Hbone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppProtocol {
    Unknown,
    Http11,
    Http2,
    Grpc,
}

impl AppProtocol {
    fn from_wire(v: i32) -> Self {
        match wl::AppProtocol::try_from(v) {
            Ok(wl::AppProtocol::Http11) => Self::Http11,
            Ok(wl::AppProtocol::Http2) => Self::Http2,
            Ok(wl::AppProtocol::Grpc) => Self::Grpc,
            _ => Self::Unknown,
        }
    }
}

/// A service port and where its endpoints listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
    pub app_protocol: AppProtocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// A workload (a workload entry: a host or a registered endpoint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    /// Set instead of `addresses` when the endpoint is a DNS name.
    pub hostname: String,
    pub network: String,
    pub tunnel: Tunnel,
    pub trust_domain: String,
    pub service_account: String,
    /// `<namespace>/<service hostname>` → ports.
    pub services: BTreeMap<String, Vec<PortMapping>>,
    pub health: Health,
    pub cluster_id: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub locality: Option<Locality>,
    pub authorization_policies: Vec<String>,
}

impl Workload {
    /// The identity its certificate must carry.
    pub fn identity(&self) -> Identity {
        let td = if self.trust_domain.is_empty() {
            "cluster.local"
        } else {
            &self.trust_domain
        };
        let sa = if self.service_account.is_empty() {
            "default"
        } else {
            &self.service_account
        };
        Identity::new(td, &self.namespace, sa)
    }
}

/// A service: its VIPs, ports and the identities its endpoints may present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// (network, VIP)
    pub vips: Vec<(String, IpAddr)>,
    pub ports: Vec<PortMapping>,
    pub subject_alt_names: Vec<String>,
}

impl Service {
    /// The xDS resource name: `<namespace>/<hostname>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// An authorization policy as received (its internal form comes with policy enforcement).
pub type Authorization = sec::Authorization;

/// One validated resource.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
    Authorization(Arc<Authorization>),
    Traffic(Arc<ServiceTraffic>),
    HttpPolicy(Arc<isthmus_model::AuthorizationPolicy>),
}

/// A resource as received, kept for the on-disk cache and for `initial_resource_versions`.
#[derive(Clone, Debug, PartialEq)]
pub struct Raw {
    pub version: String,
    pub any: Arc<prost_types::Any>,
    pub item: Item,
}

/// Where the current state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Origin {
    /// Nothing yet.
    #[default]
    Empty,
    /// The last-known-good cache on disk (the control plane not reached yet).
    Cache,
    /// The control plane.
    Server,
}

/// The mesh as the agent knows it. Replaced whole (in a `watch`) on every change, never
/// cleared when the control plane goes away.
#[derive(Clone, Debug, Default)]
pub struct State {
    origin: Origin,
    raw: BTreeMap<String, HashMap<String, Raw>>,
    workloads: HashMap<String, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    authorizations: HashMap<String, Arc<Authorization>>,
    traffic: HashMap<String, Arc<ServiceTraffic>>,
    http_policies: HashMap<String, Arc<isthmus_model::AuthorizationPolicy>>,
    workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    services_by_hostname: HashMap<String, Arc<Service>>,
    services_by_vip: HashMap<SocketAddr, Arc<Service>>,
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
}

impl State {
    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload with this address (single network: the network is not part of the key;
    /// on a clash the smallest uid wins).
    pub fn workload_by_address(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(&ip)
    }

    /// A service by its resource name, `<namespace>/<hostname>`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn service_by_hostname(&self, hostname: &str) -> Option<&Arc<Service>> {
        self.services_by_hostname.get(hostname)
    }

    /// The service whose VIP and port these are.
    pub fn service_by_vip(&self, addr: SocketAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&addr)
    }

    /// Workloads that are endpoints of the service `<namespace>/<hostname>`, by uid.
    pub fn endpoints(&self, service_key: &str) -> &[Arc<Workload>] {
        self.endpoints
            .get(service_key)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The HTTP traffic settings of the service `<namespace>/<hostname>`, if the control plane
    /// sent any.
    pub fn traffic(&self, service_key: &str) -> Option<&Arc<ServiceTraffic>> {
        self.traffic.get(service_key)
    }

    /// An AuthorizationPolicy whole, by `<namespace>/<name>`, for per-request checks.
    pub fn http_policy(&self, name: &str) -> Option<&Arc<isthmus_model::AuthorizationPolicy>> {
        self.http_policies.get(name)
    }

    pub fn http_policies(&self) -> impl Iterator<Item = &Arc<isthmus_model::AuthorizationPolicy>> {
        self.http_policies.values()
    }

    pub fn authorization(&self, name: &str) -> Option<&Arc<Authorization>> {
        self.authorizations.get(name)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn authorizations(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.authorizations.values()
    }

    /// name → version of one type (what a reconnect sends as `initial_resource_versions`).
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.raw
            .get(type_url)
            .map(|m| {
                m.iter()
                    .map(|(n, r)| (n.clone(), r.version.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn raw(&self) -> &BTreeMap<String, HashMap<String, Raw>> {
        &self.raw
    }

    /// A copy with `upserts` and `removals` of one type applied, indexes rebuilt.
    pub(crate) fn apply(
        &self,
        type_url: &str,
        upserts: Vec<(String, Raw)>,
        removals: &[String],
        origin: Origin,
    ) -> State {
        let mut next = self.clone();
        next.origin = origin;
        let State {
            raw,
            workloads,
            services,
            authorizations,
            traffic,
            http_policies,
            ..
        } = &mut next;
        let raw = raw.entry(type_url.to_owned()).or_default();
        let mut items = Items {
            workloads,
            services,
            authorizations,
            traffic,
            http_policies,
        };
        for name in removals {
            if let Some(old) = raw.remove(name) {
                items.remove(name, &old.item);
            }
        }
        for (name, r) in upserts {
            if let Some(old) = raw.insert(name.clone(), r.clone()) {
                items.remove(&name, &old.item);
            }
            items.insert(name, r.item);
        }
        next.reindex();
        next
    }

    /// Marks the state as coming from the control plane (after the first response).
    pub(crate) fn with_origin(&self, origin: Origin) -> State {
        let mut next = self.clone();
        next.origin = origin;
        next
    }

    fn reindex(&mut self) {
        self.workloads_by_ip.clear();
        self.services_by_hostname.clear();
        self.services_by_vip.clear();
        self.endpoints.clear();
        let mut uids: Vec<&String> = self.workloads.keys().collect();
        uids.sort();
        for uid in uids.into_iter().rev() {
            let w = &self.workloads[uid];
            for ip in &w.addresses {
                self.workloads_by_ip.insert(*ip, w.clone());
            }
            for key in w.services.keys() {
                self.endpoints
                    .entry(key.clone())
                    .or_default()
                    .push(w.clone());
            }
        }
        for eps in self.endpoints.values_mut() {
            eps.reverse();
        }
        for s in self.services.values() {
            self.services_by_hostname
                .insert(s.hostname.clone(), s.clone());
            for (_, vip) in &s.vips {
                for p in &s.ports {
                    self.services_by_vip
                        .insert(SocketAddr::new(*vip, p.service_port), s.clone());
                }
            }
        }
    }
}

/// The primary maps of a state, borrowed together while its raw map is borrowed too.
struct Items<'a> {
    workloads: &'a mut HashMap<String, Arc<Workload>>,
    services: &'a mut HashMap<String, Arc<Service>>,
    authorizations: &'a mut HashMap<String, Arc<Authorization>>,
    traffic: &'a mut HashMap<String, Arc<ServiceTraffic>>,
    http_policies: &'a mut HashMap<String, Arc<isthmus_model::AuthorizationPolicy>>,
}

impl Items<'_> {
    fn remove(&mut self, name: &str, item: &Item) {
        match item {
            Item::Workload(_) => {
                self.workloads.remove(name);
            }
            Item::Service(_) => {
                self.services.remove(name);
            }
            Item::Authorization(_) => {
                self.authorizations.remove(name);
            }
            Item::Traffic(_) => {
                self.traffic.remove(name);
            }
            Item::HttpPolicy(_) => {
                self.http_policies.remove(name);
            }
        }
    }

    fn insert(&mut self, name: String, item: Item) {
        match item {
            Item::Workload(w) => {
                self.workloads.insert(name, w);
            }
            Item::Service(s) => {
                self.services.insert(name, s);
            }
            Item::Authorization(a) => {
                self.authorizations.insert(name, a);
            }
            Item::Traffic(t) => {
                self.traffic.insert(name, t);
            }
            Item::HttpPolicy(p) => {
                self.http_policies.insert(name, p);
            }
        }
    }
}

/// Validates one received resource and converts it into its internal form.
pub fn parse_resource(
    type_url: &str,
    name: &str,
    any: &prost_types::Any,
) -> Result<Item, ResourceError> {
    let err = |reason: String| ResourceError {
        name: name.to_owned(),
        reason,
    };
    if any.type_url != type_url {
        return Err(err(format!(
            "carries a {:?} in a response of type {type_url:?}",
            any.type_url
        )));
    }
    match type_url {
        ADDRESS_TYPE_URL => {
            let address = wl::Address::decode(any.value.as_slice())
                .map_err(|e| err(format!("not a valid istio.workload.Address: {e}")))?;
            match address.r#type {
                Some(wl::address::Type::Workload(w)) => workload(name, w)
                    .map(|w| Item::Workload(Arc::new(w)))
                    .map_err(err),
                Some(wl::address::Type::Service(s)) => service(name, s)
                    .map(|s| Item::Service(Arc::new(s)))
                    .map_err(err),
                None => Err(err("Address holds neither a workload nor a service".into())),
            }
        }
        AUTHORIZATION_TYPE_URL => {
            let a = sec::Authorization::decode(any.value.as_slice())
                .map_err(|e| err(format!("not a valid istio.security.Authorization: {e}")))?;
            let expected = format!("{}/{}", a.namespace, a.name);
            if a.name.is_empty() || expected != name {
                return Err(err(format!(
                    "authorization policy is named {expected:?}, expected the resource name"
                )));
            }
            Ok(Item::Authorization(Arc::new(a)))
        }
        TRAFFIC_TYPE_URL => {
            let t = crate::pb::isthmus::traffic::v1::ServiceTraffic::decode(any.value.as_slice())
                .map_err(|e| {
                err(format!(
                    "not a valid isthmus.traffic.v1.ServiceTraffic: {e}"
                ))
            })?;
            if t.name != name {
                return Err(err(format!(
                    "traffic settings are named {:?}, expected the resource name",
                    t.name
                )));
            }
            let config: ServiceTraffic = serde_json::from_str(&t.config_json).map_err(|e| {
                err(format!(
                    "traffic settings this agent cannot read ({e}): is the agent older than the control plane?"
                ))
            })?;
            Ok(Item::Traffic(Arc::new(config)))
        }
        HTTP_POLICY_TYPE_URL => {
            let t = crate::pb::isthmus::traffic::v1::HttpPolicy::decode(any.value.as_slice())
                .map_err(|e| err(format!("not a valid isthmus.traffic.v1.HttpPolicy: {e}")))?;
            let p: isthmus_model::AuthorizationPolicy = serde_json::from_str(&t.config_json)
                .map_err(|e| {
                    err(format!(
                        "a policy this agent cannot read ({e}): is the agent older than the control plane?"
                    ))
                })?;
            let expected = format!("{}/{}", p.metadata.namespace, p.metadata.name);
            if t.name != name || expected != name {
                return Err(err(format!(
                    "policy is named {expected:?}, expected the resource name"
                )));
            }
            Ok(Item::HttpPolicy(Arc::new(p)))
        }
        other => Err(err(format!(
            "type {other:?} is not supported by this agent"
        ))),
    }
}

fn ip(bytes: &[u8], what: &str) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(bytes);
            Ok(IpAddr::V4(Ipv4Addr::from(a)))
        }
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(bytes);
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        }
        n => Err(format!("{what} is {n} bytes long (expected 4 or 16)")),
    }
}

fn port(v: u32, what: &str) -> Result<u16, String> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {v} is not a port (1-65535)"))
}

fn ports(list: &[wl::Port]) -> Result<Vec<PortMapping>, String> {
    list.iter()
        .map(|p| {
            Ok(PortMapping {
                service_port: port(p.service_port, "service port")?,
                target_port: if p.target_port == 0 {
                    port(p.service_port, "service port")?
                } else {
                    port(p.target_port, "target port")?
                },
                app_protocol: AppProtocol::from_wire(p.app_protocol),
            })
        })
        .collect()
}

fn workload(name: &str, w: wl::Workload) -> Result<Workload, String> {
    if w.uid.is_empty() {
        return Err("workload has no uid".into());
    }
    if w.uid != name {
        return Err(format!(
            "workload uid {:?} differs from the resource name",
            w.uid
        ));
    }
    let addresses = w
        .addresses
        .iter()
        .map(|a| ip(a, "workload address"))
        .collect::<Result<Vec<_>, _>>()?;
    if addresses.is_empty() && w.hostname.is_empty() {
        return Err("workload has neither an address nor a hostname".into());
    }
    let tunnel = match wl::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(wl::TunnelProtocol::Hbone) => Tunnel::Hbone,
        Ok(wl::TunnelProtocol::None) => Tunnel::None,
        Err(_) => return Err(format!("unknown tunnel protocol {}", w.tunnel_protocol)),
    };
    let services = w
        .services
        .iter()
        .map(|(k, list)| {
            if !k.contains('/') {
                return Err(format!("service key {k:?} is not <namespace>/<hostname>"));
            }
            Ok((k.clone(), ports(&list.ports)?))
        })
        .collect::<Result<BTreeMap<_, _>, String>>()?;
    Ok(Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        addresses,
        hostname: w.hostname,
        network: w.network,
        tunnel,
        trust_domain: w.trust_domain,
        service_account: w.service_account,
        services,
        health: if w.status == wl::WorkloadStatus::Unhealthy as i32 {
            Health::Unhealthy
        } else {
            Health::Healthy
        },
        cluster_id: w.cluster_id,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        locality: w.locality.map(|l| Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        }),
        authorization_policies: w.authorization_policies,
    })
}

fn service(name: &str, s: wl::Service) -> Result<Service, String> {
    if s.hostname.is_empty() || s.namespace.is_empty() {
        return Err("service has no hostname or namespace".into());
    }
    let key = format!("{}/{}", s.namespace, s.hostname);
    if key != name {
        return Err(format!("service {key:?} differs from the resource name"));
    }
    let vips = s
        .addresses
        .iter()
        .map(|a| Ok((a.network.clone(), ip(&a.address, "service address")?)))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports: ports(&s.ports)?,
        subject_alt_names: s.subject_alt_names,
    })
}
