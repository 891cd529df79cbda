//! Services' HTTP traffic settings for agents (`isthmus.traffic.v1.ServiceTraffic`), compiled
//! from VirtualServices and DestinationRules (docs/design/http.md): one resource per service,
//! named as its `istio.workload.Service` is.

use std::collections::BTreeMap;

use isthmus_model::traffic::{service_of_host, PortProtocol, ResolvedSubset, ServiceTraffic};
use isthmus_model::{
    AuthorizationPolicy, DestinationRule, Resource, Service, VirtualService, WorkloadEntry,
};

use crate::mapping::MappingOptions;
use crate::pb::isthmus::traffic::v1 as pb;
use crate::resources::{ResourceSet, HTTP_POLICY_TYPE_URL, TRAFFIC_TYPE_URL};

/// Adds one `ServiceTraffic` per service to `set`. Where several VirtualServices (or
/// DestinationRules) name one service, the oldest wins, as in Istio; ties go by name.
pub fn insert_traffic(
    set: &mut ResourceSet,
    services: &[Service],
    entries: &[WorkloadEntry],
    virtual_services: &[VirtualService],
    destination_rules: &[DestinationRule],
    opts: &MappingOptions,
) {
    set.declare(TRAFFIC_TYPE_URL);
    let by_service: BTreeMap<(String, String), &Service> = services
        .iter()
        .map(|s| ((s.metadata.name.clone(), s.metadata.namespace.clone()), s))
        .collect();
    let full = |host: &str, ns: &str| -> String {
        let key = service_of_host(host, ns);
        match by_service.get(&key) {
            Some(s) => s.hostname(&opts.domain),
            None => host.to_string(),
        }
    };
    let age = |m: &isthmus_model::ObjectMeta| {
        (
            m.creation_timestamp.clone().unwrap_or_default(),
            m.namespace.clone(),
            m.name.clone(),
        )
    };
    let mut vss: Vec<&VirtualService> = virtual_services.iter().collect();
    vss.sort_by_key(|v| age(&v.metadata));
    let mut drs: Vec<&DestinationRule> = destination_rules.iter().collect();
    drs.sort_by_key(|d| age(&d.metadata));

    for svc in services {
        let key = (svc.metadata.name.clone(), svc.metadata.namespace.clone());
        let mut t = ServiceTraffic {
            hostname: svc.hostname(&opts.domain),
            namespace: svc.metadata.namespace.clone(),
            ports: svc
                .spec
                .ports
                .iter()
                .filter_map(|p| {
                    let port = u16::try_from(p.port).ok()?;
                    Some((port, PortProtocol::of(p.protocol.as_deref(), &p.name)))
                })
                .collect(),
            ..Default::default()
        };
        if let Some(vs) = vss.iter().find(|vs| {
            vs.spec
                .hosts
                .iter()
                .any(|h| service_of_host(h, &vs.metadata.namespace) == key)
        }) {
            let ns = &vs.metadata.namespace;
            t.virtual_service = Some(format!("{ns}/{}", vs.metadata.name));
            t.http = vs.spec.http.clone();
            for route in &mut t.http {
                for d in &mut route.route {
                    d.destination.host = full(&d.destination.host, ns);
                }
                if let Some(m) = &mut route.mirror {
                    m.host = full(&m.host, ns);
                }
            }
        }
        if let Some(dr) = drs
            .iter()
            .find(|dr| service_of_host(&dr.spec.host, &dr.metadata.namespace) == key)
        {
            t.destination_rule = Some(format!("{}/{}", dr.metadata.namespace, dr.metadata.name));
            t.traffic_policy = dr.spec.traffic_policy.clone();
            let members: Vec<&WorkloadEntry> = entries.iter().filter(|e| e.serves(svc)).collect();
            t.subsets = dr
                .spec
                .subsets
                .iter()
                .map(|s| ResolvedSubset {
                    name: s.name.clone(),
                    workloads: members
                        .iter()
                        .filter(|e| {
                            let labels = Resource::WorkloadEntry((**e).clone()).effective_labels();
                            s.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
                        })
                        .map(|e| opts.workload_uid(&e.metadata.namespace, &e.metadata.name))
                        .collect(),
                    traffic_policy: s.traffic_policy.clone(),
                })
                .collect();
        }
        // Serializing plain structs with string keys cannot fail.
        let config_json = serde_json::to_string(&t).unwrap_or_default();
        let name = opts.service_name(svc);
        set.insert(
            TRAFFIC_TYPE_URL,
            &name,
            &pb::ServiceTraffic {
                name: name.clone(),
                config_json,
            },
        );
    }
}

/// Adds every AuthorizationPolicy whole (`isthmus.traffic.v1.HttpPolicy`, named
/// `<namespace>/<name>` like its `istio.security.Authorization`), for the agent's per-request
/// checks on HTTP ports.
pub fn insert_http_policies(set: &mut ResourceSet, policies: &[AuthorizationPolicy]) {
    set.declare(HTTP_POLICY_TYPE_URL);
    for p in policies {
        let name = format!("{}/{}", p.metadata.namespace, p.metadata.name);
        let mut whole = p.clone();
        // Server-set fields change without the policy changing.
        whole.metadata.resource_version = None;
        whole.metadata.creation_timestamp = None;
        whole.metadata.uid = None;
        set.insert(
            HTTP_POLICY_TYPE_URL,
            &name,
            &pb::HttpPolicy {
                name: name.clone(),
                config_json: serde_json::to_string(&whole).unwrap_or_default(),
            },
        );
    }
}
