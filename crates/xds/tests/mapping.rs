//! The registry → workload discovery mapping: field by field, and deterministic (same registry,
//! same versions, whatever the input order).

use std::collections::BTreeMap;

use isthmus_model::{
    Health, ObjectMeta, Service, ServicePort, ServiceSpec, ServiceStatus, WorkloadEntry,
    WorkloadEntrySpec, WorkloadEntryStatus,
};
use isthmus_xds::pb::istio::workload as wl;
use isthmus_xds::{
    build_resources, MappingOptions, ResourceSet, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL,
};
use proptest::prelude::*;
use prost::Message;

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: ns.into(),
        ..Default::default()
    }
}

fn service(ns: &str, name: &str, vip: Option<&str>, selector: Option<(&str, &str)>) -> Service {
    Service {
        api_version: "isthmus.io/v1".into(),
        kind: "Service".into(),
        metadata: meta(ns, name),
        spec: ServiceSpec {
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: Some("HTTP".into()),
                    target_port: Some(8080),
                },
                ServicePort {
                    name: "grpc".into(),
                    port: 9090,
                    protocol: Some("GRPC".into()),
                    target_port: None,
                },
            ],
            selector: selector.map(|(k, v)| BTreeMap::from([(k.to_owned(), v.to_owned())])),
        },
        status: ServiceStatus {
            vip: vip.map(|v| v.parse().unwrap()),
        },
    }
}

fn entry(ns: &str, name: &str, address: &str, sa: &str) -> WorkloadEntry {
    WorkloadEntry {
        api_version: "isthmus.io/v1".into(),
        kind: "WorkloadEntry".into(),
        metadata: meta(ns, name),
        spec: WorkloadEntrySpec {
            address: address.into(),
            service_account: sa.into(),
            ..Default::default()
        },
        status: WorkloadEntryStatus::default(),
    }
}

fn decode(set: &ResourceSet, name: &str) -> wl::address::Type {
    let r = set.get(ADDRESS_TYPE_URL, name).unwrap_or_else(|| {
        panic!(
            "no resource {name}; have {:?}",
            set.versions(ADDRESS_TYPE_URL)
        )
    });
    assert_eq!(r.any.type_url, ADDRESS_TYPE_URL);
    wl::Address::decode(r.any.value.as_slice())
        .unwrap()
        .r#type
        .unwrap()
}

#[test]
fn maps_services_and_workload_entries_field_by_field() {
    let opts = MappingOptions::default();
    let svc = service("shop", "cart", Some("10.96.0.10"), Some(("app", "cart")));
    let mut vm = entry("shop", "vm-1", "10.0.0.5", "cart-sa");
    vm.metadata
        .annotations
        .insert("isthmus.io/agent".into(), "true".into());
    vm.spec.labels.insert("app".into(), "cart".into());
    vm.spec.labels.insert("version".into(), "v2".into());
    vm.spec.ports.insert("http".into(), 8081);
    vm.spec.locality = "eu/west-1/a".into();
    let mut db = entry("shop", "db", "10.0.0.6", "");
    db.spec.services = vec!["cart".into()];
    db.status.health = Health::Unhealthy;
    let other_ns = entry("other", "x", "10.0.0.7", "x");

    let set = build_resources(&[svc], &[vm, db, other_ns], &opts);
    assert_eq!(set.len(ADDRESS_TYPE_URL), 4);
    assert_eq!(set.len(AUTHORIZATION_TYPE_URL), 0);
    assert!(
        set.of_type(AUTHORIZATION_TYPE_URL).is_some(),
        "authorization type is served (empty)"
    );

    let wl::address::Type::Service(s) = decode(&set, "shop/cart.shop.svc.cluster.local") else {
        panic!("expected a service");
    };
    assert_eq!(s.name, "cart");
    assert_eq!(s.namespace, "shop");
    assert_eq!(s.hostname, "cart.shop.svc.cluster.local");
    assert_eq!(s.addresses.len(), 1);
    assert_eq!(s.addresses[0].address, vec![10, 96, 0, 10]);
    assert_eq!(
        s.ports,
        vec![
            wl::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: wl::AppProtocol::Http11 as i32
            },
            wl::Port {
                service_port: 9090,
                target_port: 9090,
                app_protocol: wl::AppProtocol::Grpc as i32
            },
        ]
    );
    assert_eq!(
        s.subject_alt_names,
        vec![
            "spiffe://cluster.local/ns/shop/sa/cart-sa".to_owned(),
            "spiffe://cluster.local/ns/shop/sa/default".to_owned(),
        ]
    );

    let wl::address::Type::Workload(w) = decode(
        &set,
        "Kubernetes/networking.istio.io/WorkloadEntry/shop/vm-1",
    ) else {
        panic!("expected a workload");
    };
    assert_eq!(
        w.uid,
        "Kubernetes/networking.istio.io/WorkloadEntry/shop/vm-1"
    );
    assert_eq!(w.name, "vm-1");
    assert_eq!(w.namespace, "shop");
    assert_eq!(w.addresses, vec![vec![10, 0, 0, 5]]);
    assert_eq!(w.tunnel_protocol, wl::TunnelProtocol::Hbone as i32);
    assert_eq!(w.trust_domain, "cluster.local");
    assert_eq!(w.service_account, "cart-sa");
    assert_eq!(w.status, wl::WorkloadStatus::Healthy as i32);
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.canonical_name, "cart");
    assert_eq!(w.canonical_revision, "v2");
    assert_eq!(
        w.locality,
        Some(wl::Locality {
            region: "eu".into(),
            zone: "west-1".into(),
            subzone: "a".into()
        })
    );
    let ports = &w.services["shop/cart.shop.svc.cluster.local"].ports;
    assert_eq!(
        ports[0].target_port, 8081,
        "the entry's port map overrides targetPort"
    );
    assert_eq!(ports[1].target_port, 9090);

    let wl::address::Type::Workload(d) =
        decode(&set, "Kubernetes/networking.istio.io/WorkloadEntry/shop/db")
    else {
        panic!("expected a workload");
    };
    assert_eq!(
        d.tunnel_protocol,
        wl::TunnelProtocol::None as i32,
        "no agent: plain TCP"
    );
    assert_eq!(d.status, wl::WorkloadStatus::Unhealthy as i32);
    assert_eq!(d.service_account, "default");
    assert!(
        d.services.contains_key("shop/cart.shop.svc.cluster.local"),
        "attached explicitly"
    );

    let wl::address::Type::Workload(x) =
        decode(&set, "Kubernetes/networking.istio.io/WorkloadEntry/other/x")
    else {
        panic!("expected a workload");
    };
    assert!(x.services.is_empty(), "services never span namespaces");
}

#[test]
fn dns_entries_and_v6_addresses() {
    let opts = MappingOptions {
        cluster_id: "c1".into(),
        trust_domain: "example.org".into(),
        domain: "mesh.local".into(),
        network: "net1".into(),
    };
    let set = build_resources(
        &[service("a", "s", Some("fd00::10"), None)],
        &[
            entry("a", "dns", "db.example.com", "sa"),
            entry("a", "v6", "fd00::5", "sa"),
        ],
        &opts,
    );
    let wl::address::Type::Workload(w) = decode(&set, "c1/networking.istio.io/WorkloadEntry/a/dns")
    else {
        panic!()
    };
    assert!(w.addresses.is_empty());
    assert_eq!(w.hostname, "db.example.com");
    assert_eq!(w.network, "net1");
    assert_eq!(w.trust_domain, "example.org");
    let wl::address::Type::Workload(w) = decode(&set, "c1/networking.istio.io/WorkloadEntry/a/v6")
    else {
        panic!()
    };
    assert_eq!(w.addresses[0].len(), 16);
    let wl::address::Type::Service(s) = decode(&set, "a/s.a.svc.mesh.local") else {
        panic!()
    };
    assert_eq!(s.addresses[0].network, "net1");
    assert_eq!(s.addresses[0].address.len(), 16);
    assert!(
        s.subject_alt_names.is_empty(),
        "no endpoints, no identities"
    );
}

#[test]
fn a_change_moves_only_the_versions_it_touches() {
    let opts = MappingOptions::default();
    let services = vec![
        service("ns", "a", Some("10.96.0.1"), Some(("app", "a"))),
        service("ns", "b", Some("10.96.0.2"), Some(("app", "b"))),
    ];
    let mut entries: Vec<WorkloadEntry> = (0..4)
        .map(|i| {
            let mut e = entry("ns", &format!("e{i}"), &format!("10.0.0.{i}"), "sa");
            e.spec
                .labels
                .insert("app".into(), if i < 2 { "a" } else { "b" }.into());
            e
        })
        .collect();
    let before = build_resources(&services, &entries, &opts).versions(ADDRESS_TYPE_URL);
    entries[3].status.health = Health::Unhealthy;
    let after = build_resources(&services, &entries, &opts).versions(ADDRESS_TYPE_URL);
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    assert_eq!(
        changed,
        vec!["Kubernetes/networking.istio.io/WorkloadEntry/ns/e3"]
    );

    entries[3].spec.service_account = "other".into();
    let again = build_resources(&services, &entries, &opts).versions(ADDRESS_TYPE_URL);
    let mut changed: Vec<&String> = after.keys().filter(|k| after[*k] != again[*k]).collect();
    changed.sort();
    assert_eq!(
        changed,
        vec![
            "Kubernetes/networking.istio.io/WorkloadEntry/ns/e3",
            "ns/b.ns.svc.cluster.local"
        ],
        "the service's identities changed too"
    );
}

fn arb_registry() -> impl Strategy<Value = (Vec<Service>, Vec<WorkloadEntry>)> {
    let services = prop::collection::vec((0..3usize, 0..6usize, any::<bool>(), any::<u8>()), 0..8);
    let entries = prop::collection::vec(
        (
            0..3usize,
            0..40usize,
            0..6usize,
            any::<bool>(),
            any::<bool>(),
            0..3usize,
            any::<u8>(),
        ),
        0..30,
    );
    (services, entries).prop_map(|(svcs, ents)| {
        let mut seen = std::collections::HashSet::new();
        let services = svcs
            .into_iter()
            .filter(|(ns, n, _, _)| seen.insert((*ns, *n)))
            .map(|(ns, n, selector, vip)| {
                let app = format!("app{n}");
                service(
                    &format!("ns{ns}"),
                    &format!("svc{n}"),
                    Some(&format!("10.96.0.{vip}")),
                    selector.then_some(("app", app.as_str())),
                )
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let entries = ents
            .into_iter()
            .filter(|(ns, n, ..)| seen.insert((*ns, *n)))
            .map(|(ns, n, app, attach, agent, sa, ip)| {
                let mut e = entry(
                    &format!("ns{ns}"),
                    &format!("e{n}"),
                    &format!("10.1.0.{ip}"),
                    &format!("sa{sa}"),
                );
                e.spec.labels.insert("app".into(), format!("app{app}"));
                if attach {
                    e.spec.services.push(format!("svc{app}"));
                }
                if agent {
                    e.metadata
                        .annotations
                        .insert("isthmus.io/agent".into(), "true".into());
                }
                e
            })
            .collect();
        (services, entries)
    })
}

proptest! {
    #[test]
    fn mapping_is_deterministic_and_order_independent((services, entries) in arb_registry()) {
        let opts = MappingOptions::default();
        let a = build_resources(&services, &entries, &opts);
        let b = build_resources(&services, &entries, &opts);
        prop_assert_eq!(&a, &b);
        let mut rs = services.clone();
        rs.reverse();
        let mut re = entries.clone();
        re.reverse();
        let c = build_resources(&rs, &re, &opts);
        prop_assert_eq!(a.versions(ADDRESS_TYPE_URL), c.versions(ADDRESS_TYPE_URL));
        prop_assert_eq!(a.len(ADDRESS_TYPE_URL), services.len() + entries.len());
    }
}
