//! Services' HTTP traffic settings for agents (`isthmus.traffic.v1.ServiceTraffic`), compiled
//! from VirtualServices and DestinationRules (docs/design/http.md): one resource per service,
//! named as its `istio.workload.Service` is.

use std::collections::BTreeMap;

use isthmus_model::traffic::{service_of_host, PortProtocol, ResolvedSubset, ServiceTraffic};
use isthmus_model::{
    AuthorizationPolicy, DestinationRule, GrpcRoute, HttpRoute, Resource, Service, VirtualService,
    WorkloadEntry,
};

use crate::mapping::MappingOptions;
use crate::pb::isthmus::traffic::v1 as pb;
use crate::resources::{ResourceSet, HTTP_POLICY_TYPE_URL, TRAFFIC_TYPE_URL};

/// Adds one `ServiceTraffic` per service to `set`. Where several VirtualServices (or
/// DestinationRules) name one service, the oldest wins, as in Istio; ties go by name.
/// The Gateway API routes (GAMMA) of the mesh, beside its VirtualServices.
#[derive(Default)]
pub struct GatewayRoutes<'a> {
    pub http: &'a [HttpRoute],
    pub grpc: &'a [GrpcRoute],
}

pub fn insert_traffic(
    set: &mut ResourceSet,
    services: &[Service],
    entries: &[WorkloadEntry],
    virtual_services: &[VirtualService],
    destination_rules: &[DestinationRule],
    gateway: GatewayRoutes<'_>,
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
        // Gateway API routes whose parent is this Service (GAMMA), oldest first; with a
        // VirtualService for the same host, its routes come first.
        let parents = |refs: &[isthmus_model::gateway::ParentRef], ns: &str| -> Vec<Option<u32>> {
            refs.iter()
                .filter(|p| {
                    p.is_service()
                        && p.name == svc.metadata.name
                        && p.namespace.as_deref().unwrap_or(ns) == svc.metadata.namespace
                })
                .map(|p| p.port)
                .collect()
        };
        let mut gw: Vec<(String, Vec<isthmus_model::traffic::HttpRoute>)> = Vec::new();
        for r in gateway.http {
            let ns = &r.metadata.namespace;
            for port in parents(&r.spec.parent_refs, ns) {
                match isthmus_model::gateway::http_routes(&r.spec, ns, port) {
                    Ok(routes) => gw.push((format!("HTTPRoute {ns}/{}", r.metadata.name), routes)),
                    Err(e) => {
                        tracing::warn!(route = %r.metadata.name, error = %e, "HTTPRoute left out")
                    }
                }
            }
        }
        for r in gateway.grpc {
            let ns = &r.metadata.namespace;
            for port in parents(&r.spec.parent_refs, ns) {
                match isthmus_model::gateway::grpc_routes(&r.spec, ns, port) {
                    Ok(routes) => gw.push((format!("GRPCRoute {ns}/{}", r.metadata.name), routes)),
                    Err(e) => {
                        tracing::warn!(route = %r.metadata.name, error = %e, "GRPCRoute left out")
                    }
                }
            }
        }
        for (name, mut routes) in gw {
            for route in &mut routes {
                for d in &mut route.route {
                    d.destination.host = full(&d.destination.host, &svc.metadata.namespace);
                }
                if let Some(m) = &mut route.mirror {
                    m.host = full(&m.host, &svc.metadata.namespace);
                }
            }
            t.virtual_service.get_or_insert(name);
            t.http.extend(routes);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Vec<Resource> {
        isthmus_model::parse_documents(yaml).unwrap()
    }

    #[test]
    fn a_service_gets_its_routes_rules_resolved_subsets_and_gateway_routes() {
        let rs = parse(
            r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}, {name: db, port: 3306}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec: {selector: {app: ratings}, ports: [{name: grpc, port: 9090}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: r1, namespace: bookinfo}
spec: {address: 10.0.0.1, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: r2, namespace: bookinfo}
spec: {address: 10.0.0.2, labels: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v2}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: ratings, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings, port: 9090}]
  rules: [{backendRefs: [{name: ratings, port: 9090}]}]
"#,
        );
        let (mut svcs, mut wes, mut vss, mut drs, mut grpc) =
            (vec![], vec![], vec![], vec![], vec![]);
        for r in rs {
            match r {
                Resource::Service(s) => svcs.push(s),
                Resource::WorkloadEntry(w) => wes.push(w),
                Resource::VirtualService(v) => vss.push(v),
                Resource::DestinationRule(d) => drs.push(d),
                Resource::GrpcRoute(g) => grpc.push(g),
                _ => {}
            }
        }
        let opts = MappingOptions::default();
        let mut set = ResourceSet::new();
        insert_traffic(
            &mut set,
            &svcs,
            &wes,
            &vss,
            &drs,
            GatewayRoutes {
                http: &[],
                grpc: &grpc,
            },
            &opts,
        );
        let get = |name: &str| -> ServiceTraffic {
            use prost::Message;
            let r = set
                .of_type(TRAFFIC_TYPE_URL)
                .unwrap()
                .get(name)
                .unwrap_or_else(|| panic!("no {name}"))
                .clone();
            let t = pb::ServiceTraffic::decode(r.any.value.as_slice()).unwrap();
            serde_json::from_str(&t.config_json).unwrap()
        };
        let reviews = get("bookinfo/reviews.bookinfo.svc.cluster.local");
        assert_eq!(reviews.ports[&9080], PortProtocol::Http);
        assert_eq!(reviews.ports[&3306], PortProtocol::Undeclared);
        assert_eq!(reviews.virtual_service.as_deref(), Some("bookinfo/reviews"));
        assert_eq!(
            reviews.http[0].route[0].destination.host,
            "reviews.bookinfo.svc.cluster.local"
        );
        let v2 = reviews.subsets.iter().find(|s| s.name == "v2").unwrap();
        assert_eq!(v2.workloads, vec![opts.workload_uid("bookinfo", "r2")]);
        let ratings = get("bookinfo/ratings.bookinfo.svc.cluster.local");
        assert_eq!(ratings.ports[&9090], PortProtocol::Grpc);
        assert_eq!(
            ratings.virtual_service.as_deref(),
            Some("GRPCRoute bookinfo/ratings")
        );
        assert_eq!(ratings.http[0].matches[0].port, Some(9090));
    }
}
