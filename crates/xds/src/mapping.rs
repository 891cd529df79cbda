//! From the registry to Istio's workload discovery resources.
//!
//! - A `Service` becomes an `istio.workload.Service` named `<namespace>/<hostname>`
//!   (hostname `<name>.<namespace>.svc.<domain>`), with its VIP, its ports, and as
//!   `subject_alt_names` the SPIFFE ids of the service accounts of its endpoints.
//! - A `WorkloadEntry` becomes an `istio.workload.Workload` whose uid (and resource name) is
//!   Istio's for workload entries: `<cluster>/networking.istio.io/WorkloadEntry/<ns>/<name>`.
//!   It is stable across re-creations of the entry, unlike the entry's `metadata.uid`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use isthmus_model::{
    AuthorizationPolicy, Health, PeerAuthentication, PolicySelector, Service, WorkloadEntry,
};

use crate::pb::istio::security as sec;
use crate::pb::istio::workload as wl;
use crate::resources::{ResourceSet, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// Annotation on a workload entry whose host runs the Isthmus agent (auto-registered entries
/// carry it): its workload is reached over HBONE. Without it: plain TCP (`NONE`).
pub const AGENT_ANNOTATION: &str = "isthmus.io/agent";

/// What the mapping needs besides the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingOptions {
    /// DNS domain of service hostnames.
    pub domain: String,
    /// Trust domain of workload identities.
    pub trust_domain: String,
    /// Network of workloads and VIPs that name none (`""`: the default network).
    pub network: String,
    /// Cluster id put in workloads and their uids (Istio's default: `Kubernetes`).
    pub cluster_id: String,
}

impl Default for MappingOptions {
    fn default() -> Self {
        Self {
            domain: isthmus_model::DEFAULT_DOMAIN.to_owned(),
            trust_domain: "cluster.local".to_owned(),
            network: String::new(),
            cluster_id: "Kubernetes".to_owned(),
        }
    }
}

impl MappingOptions {
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }

    /// The uid (and xDS resource name) of a workload entry's workload.
    pub fn workload_uid(&self, namespace: &str, name: &str) -> String {
        format!(
            "{}/networking.istio.io/WorkloadEntry/{namespace}/{name}",
            self.cluster_id
        )
    }

    /// The xDS resource name of a service: `<namespace>/<hostname>`.
    pub fn service_name(&self, svc: &Service) -> String {
        format!("{}/{}", svc.metadata.namespace, svc.hostname(&self.domain))
    }
}

/// Builds everything discovery serves from the registry. Deterministic: the same registry
/// gives the same bytes, hence the same versions. `istio.security.Authorization` is declared
/// (answered, empty) until authorization policies exist.
pub fn build_resources(
    services: &[Service],
    entries: &[WorkloadEntry],
    opts: &MappingOptions,
) -> ResourceSet {
    build_resources_with_policies(services, entries, &[], &[], opts)
}

/// The namespace whose policies without a selector apply mesh-wide (Istio's root namespace).
pub const ROOT_NAMESPACE: &str = "istio-system";

/// Like [`build_resources`], with AuthorizationPolicies as `istio.security.Authorization`
/// resources (named `<namespace>/<name>`) and listed on the workloads they select, and STRICT
/// PeerAuthentications converted as Istio does for ztunnel: a DENY of connections that present
/// no peer identity (plaintext), named `<namespace>/converted_peer_authentication_<name>`.
pub fn build_resources_with_policies(
    services: &[Service],
    entries: &[WorkloadEntry],
    policies: &[AuthorizationPolicy],
    peer_auths: &[PeerAuthentication],
    opts: &MappingOptions,
) -> ResourceSet {
    let mut set = ResourceSet::new();
    set.declare(AUTHORIZATION_TYPE_URL);
    // (namespace, selector, resource name) of every policy, for listing them on workloads.
    let mut selecting: Vec<(&str, &PolicySelector, String)> = Vec::new();
    for p in policies {
        let name = format!("{}/{}", p.metadata.namespace, p.metadata.name);
        set.insert(AUTHORIZATION_TYPE_URL, &name, &authorization(p, opts));
        if let Some(sel) = &p.spec.selector {
            selecting.push((&p.metadata.namespace, sel, name));
        }
    }
    for pa in peer_auths.iter().filter(|pa| pa.spec.mode() == "STRICT") {
        let converted = format!("converted_peer_authentication_{}", pa.metadata.name);
        let name = format!("{}/{converted}", pa.metadata.namespace);
        set.insert(AUTHORIZATION_TYPE_URL, &name, &strict(pa, converted));
        if let Some(sel) = &pa.spec.selector {
            selecting.push((&pa.metadata.namespace, sel, name));
        }
    }
    let index = ServiceIndex::new(services);

    let mut identities: HashMap<usize, BTreeSet<String>> = HashMap::new();
    for entry in entries {
        let served = index.services_of(entry);
        let sa = service_account(entry);
        for &i in &served {
            identities
                .entry(i)
                .or_default()
                .insert(opts.spiffe_id(&entry.metadata.namespace, sa));
        }
        let served: Vec<&Service> = served.iter().map(|&i| &services[i]).collect();
        let mut workload = workload(entry, &served, opts);
        workload.authorization_policies = selecting
            .iter()
            .filter(|(ns, sel, _)| selects(ns, sel, entry))
            .map(|(_, _, name)| name.clone())
            .collect();
        let address = wl::Address {
            r#type: Some(wl::address::Type::Workload(workload)),
        };
        set.insert(
            ADDRESS_TYPE_URL,
            &opts.workload_uid(&entry.metadata.namespace, &entry.metadata.name),
            &address,
        );
    }
    for (i, svc) in services.iter().enumerate() {
        let sans = identities.remove(&i).unwrap_or_default();
        let address = wl::Address {
            r#type: Some(wl::address::Type::Service(service(svc, sans, opts))),
        };
        set.insert(ADDRESS_TYPE_URL, &opts.service_name(svc), &address);
    }
    set
}

fn service_account(entry: &WorkloadEntry) -> &str {
    if entry.spec.service_account.is_empty() {
        isthmus_model::DEFAULT_SERVICE_ACCOUNT
    } else {
        &entry.spec.service_account
    }
}

/// Finds the services of an entry without trying every service: by name for explicit
/// attachments, and by one `key=value` of the selector for label selection.
struct ServiceIndex<'a> {
    services: &'a [Service],
    by_name: HashMap<(&'a str, &'a str), usize>,
    by_selector_pair: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
}

impl<'a> ServiceIndex<'a> {
    fn new(services: &'a [Service]) -> Self {
        let mut by_name = HashMap::new();
        let mut by_selector_pair: HashMap<_, Vec<usize>> = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            let ns = s.metadata.namespace.as_str();
            by_name.insert((ns, s.metadata.name.as_str()), i);
            // A matching entry has every pair of the selector, so it has the first one.
            if let Some((k, v)) = s.spec.selector.as_ref().and_then(|sel| sel.iter().next()) {
                by_selector_pair
                    .entry((ns, k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        Self {
            services,
            by_name,
            by_selector_pair,
        }
    }

    /// Indexes of the services `entry` is an endpoint of, in registry order.
    fn services_of(&self, entry: &WorkloadEntry) -> Vec<usize> {
        let ns = entry.metadata.namespace.as_str();
        let mut found = BTreeSet::new();
        for name in &entry.spec.services {
            if let Some(&i) = self.by_name.get(&(ns, name.as_str())) {
                found.insert(i);
            }
        }
        let labels = entry.metadata.labels.iter().chain(entry.spec.labels.iter());
        for (k, v) in labels {
            if let Some(candidates) = self.by_selector_pair.get(&(ns, k.as_str(), v.as_str())) {
                found.extend(
                    candidates
                        .iter()
                        .copied()
                        .filter(|&i| entry.serves(&self.services[i])),
                );
            }
        }
        found.into_iter().collect()
    }
}

fn app_protocol(protocol: &str) -> wl::AppProtocol {
    match protocol.to_ascii_uppercase().as_str() {
        "HTTP" => wl::AppProtocol::Http11,
        "HTTP2" => wl::AppProtocol::Http2,
        "GRPC" => wl::AppProtocol::Grpc,
        _ => wl::AppProtocol::Unknown,
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn service(svc: &Service, sans: BTreeSet<String>, opts: &MappingOptions) -> wl::Service {
    wl::Service {
        name: svc.metadata.name.clone(),
        namespace: svc.metadata.namespace.clone(),
        hostname: svc.hostname(&opts.domain),
        addresses: svc
            .status
            .vip
            .map(|vip| wl::NetworkAddress {
                network: opts.network.clone(),
                address: ip_bytes(vip),
            })
            .into_iter()
            .collect(),
        ports: svc
            .spec
            .ports
            .iter()
            .map(|p| wl::Port {
                service_port: p.port,
                target_port: p.target(),
                app_protocol: app_protocol(p.protocol()) as i32,
            })
            .collect(),
        subject_alt_names: sans.into_iter().collect(),
        load_balancing: None,
    }
}

fn workload(entry: &WorkloadEntry, served: &[&Service], opts: &MappingOptions) -> wl::Workload {
    let meta = &entry.metadata;
    let mut labels = meta.labels.clone();
    labels.extend(entry.spec.labels.clone());
    let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let (addresses, hostname) = match entry.ip() {
        Some(ip) => (vec![ip_bytes(ip)], String::new()),
        None => (Vec::new(), entry.spec.address.clone()),
    };
    let agent = meta
        .annotations
        .get(AGENT_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let services: BTreeMap<String, wl::PortList> = served
        .iter()
        .map(|svc| {
            let ports = svc
                .spec
                .ports
                .iter()
                .map(|p| wl::Port {
                    service_port: p.port,
                    target_port: entry.spec.ports.get(&p.name).copied().unwrap_or(p.target()),
                    app_protocol: app_protocol(p.protocol()) as i32,
                })
                .collect();
            (opts.service_name(svc), wl::PortList { ports })
        })
        .collect();
    let locality = (!entry.spec.locality.is_empty()).then(|| {
        let mut parts = entry.spec.locality.splitn(3, '/').map(str::to_owned);
        wl::Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        }
    });
    wl::Workload {
        uid: opts.workload_uid(&meta.namespace, &meta.name),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        addresses,
        hostname,
        network: if entry.spec.network.is_empty() {
            opts.network.clone()
        } else {
            entry.spec.network.clone()
        },
        tunnel_protocol: if agent {
            wl::TunnelProtocol::Hbone
        } else {
            wl::TunnelProtocol::None
        } as i32,
        trust_domain: opts.trust_domain.clone(),
        service_account: service_account(entry).to_owned(),
        node: String::new(),
        canonical_name: label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| meta.name.clone()),
        canonical_revision: label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_owned()),
        workload_type: wl::WorkloadType::Pod as i32,
        workload_name: meta.name.clone(),
        services,
        authorization_policies: Vec::new(),
        status: match entry.status.health {
            Health::Healthy => wl::WorkloadStatus::Healthy,
            Health::Unhealthy => wl::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: opts.cluster_id.clone(),
        locality,
    }
}

/// Whether a policy's selector picks the entry (same namespace, labels match).
fn selects(namespace: &str, sel: &PolicySelector, entry: &WorkloadEntry) -> bool {
    namespace == entry.metadata.namespace
        && sel.match_labels.iter().all(|(k, v)| {
            entry
                .spec
                .labels
                .get(k)
                .or_else(|| entry.metadata.labels.get(k))
                == Some(v)
        })
}

/// `*` at the start or end of a value is Istio's suffix or prefix match.
fn string_match(v: &str) -> sec::StringMatch {
    use sec::string_match::MatchType;
    let m = if v == "*" {
        MatchType::Presence(())
    } else if let Some(rest) = v.strip_prefix('*') {
        MatchType::Suffix(rest.to_string())
    } else if let Some(rest) = v.strip_suffix('*') {
        MatchType::Prefix(rest.to_string())
    } else {
        MatchType::Exact(v.to_string())
    };
    sec::StringMatch {
        match_type: Some(m),
    }
}

fn address(v: &str) -> Option<sec::Address> {
    let net: ipnet::IpNet = v
        .parse()
        .or_else(|_| v.parse::<IpAddr>().map(ipnet::IpNet::from))
        .ok()?;
    let bytes = match net.network() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    Some(sec::Address {
        address: bytes,
        length: u32::from(net.prefix_len()),
    })
}

/// Istio's mapping: each rule is a conjunction of clauses (one for `from`, one for `to`); a
/// clause matches when any of its matches does; a match needs all of its fields.
fn authorization(p: &AuthorizationPolicy, opts: &MappingOptions) -> sec::Authorization {
    let scope = scope(p.spec.selector.is_some(), &p.metadata.namespace);
    let action = if p.spec.action() == "DENY" {
        sec::Action::Deny
    } else {
        sec::Action::Allow
    };
    // Principals are written without the scheme (`cluster.local/ns/a/sa/b`); the proxy matches
    // the peer's SPIFFE id without `spiffe://` as Istio does.
    let _ = opts;
    // Rules that need the request (HTTP attributes, `when` conditions) are enforced per
    // request by the agent on HTTP ports. At L4 (TCP ports, and ztunnel) they degrade as
    // Istio degrades them for ztunnel, towards refusing: an ALLOW rule that needs them
    // matches nothing, a DENY rule matches on its L4 parts alone.
    let allow = action == sec::Action::Allow;
    let rules = p
        .spec
        .rules
        .iter()
        .filter(|rule| !(allow && (rule.is_http() || !rule.when.is_empty())))
        .map(|rule| {
            let mut clauses = Vec::new();
            if !rule.from.is_empty() {
                clauses.push(sec::Clause {
                    matches: rule
                        .from
                        .iter()
                        .map(|f| {
                            let s = &f.source;
                            sec::Match {
                                principals: s.principals.iter().map(|v| string_match(v)).collect(),
                                not_principals: s
                                    .not_principals
                                    .iter()
                                    .map(|v| string_match(v))
                                    .collect(),
                                namespaces: s.namespaces.iter().map(|v| string_match(v)).collect(),
                                not_namespaces: s
                                    .not_namespaces
                                    .iter()
                                    .map(|v| string_match(v))
                                    .collect(),
                                source_ips: s.ip_blocks.iter().filter_map(|v| address(v)).collect(),
                                not_source_ips: s
                                    .not_ip_blocks
                                    .iter()
                                    .filter_map(|v| address(v))
                                    .collect(),
                                ..Default::default()
                            }
                        })
                        .collect(),
                });
            }
            if !rule.to.is_empty() {
                clauses.push(sec::Clause {
                    matches: rule
                        .to
                        .iter()
                        .map(|t| sec::Match {
                            destination_ports: t
                                .operation
                                .ports
                                .iter()
                                .filter_map(|v| v.parse().ok())
                                .collect(),
                            not_destination_ports: t
                                .operation
                                .not_ports
                                .iter()
                                .filter_map(|v| v.parse().ok())
                                .collect(),
                            ..Default::default()
                        })
                        .collect(),
                });
            }
            sec::Rule { clauses }
        })
        .collect();
    sec::Authorization {
        name: p.metadata.name.clone(),
        namespace: p.metadata.namespace.clone(),
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run: false,
    }
}

fn scope(selector: bool, namespace: &str) -> sec::Scope {
    match (selector, namespace) {
        (true, _) => sec::Scope::WorkloadSelector,
        (false, ROOT_NAMESPACE) => sec::Scope::Global,
        (false, _) => sec::Scope::Namespace,
    }
}

/// STRICT mTLS as an authorization: deny what arrives without a peer identity.
fn strict(pa: &PeerAuthentication, name: String) -> sec::Authorization {
    use sec::string_match::MatchType;
    sec::Authorization {
        name,
        namespace: pa.metadata.namespace.clone(),
        scope: scope(pa.spec.selector.is_some(), &pa.metadata.namespace) as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    not_principals: vec![sec::StringMatch {
                        match_type: Some(MatchType::Presence(())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}
