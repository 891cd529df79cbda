//! Decoders of what the network or the disk hands the agent: arbitrary bytes never panic, and
//! bad input is refused with a message that names the resource and the problem.

use std::path::Path;

use isthmus_xds::client::state::parse_resource;
use isthmus_xds::client::{decode_cache, CacheError};
use isthmus_xds::pb::istio::workload as wl;
use isthmus_xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use proptest::prelude::*;
use prost::Message;

fn address_any(value: Vec<u8>) -> prost_types::Any {
    prost_types::Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value,
    }
}

fn reason(name: &str, address: wl::Address) -> String {
    parse_resource(
        ADDRESS_TYPE_URL,
        name,
        &address_any(address.encode_to_vec()),
    )
    .unwrap_err()
    .to_string()
}

#[test]
fn bad_resources_are_named_with_the_reason() {
    let workload = |f: &dyn Fn(&mut wl::Workload)| {
        let mut w = wl::Workload {
            uid: "c/networking.istio.io/WorkloadEntry/ns/a".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        };
        f(&mut w);
        wl::Address {
            r#type: Some(wl::address::Type::Workload(w)),
        }
    };
    let name = "c/networking.istio.io/WorkloadEntry/ns/a";
    assert!(parse_resource(
        ADDRESS_TYPE_URL,
        name,
        &address_any(workload(&|_| {}).encode_to_vec())
    )
    .is_ok());
    let cases: Vec<(wl::Address, &str)> = vec![
        (
            workload(&|w| w.addresses = vec![vec![1, 2, 3]]),
            "workload address is 3 bytes long (expected 4 or 16)",
        ),
        (
            workload(&|w| w.addresses.clear()),
            "neither an address nor a hostname",
        ),
        (
            workload(&|w| w.uid = "other".into()),
            "differs from the resource name",
        ),
        (
            workload(&|w| w.tunnel_protocol = 9),
            "unknown tunnel protocol 9",
        ),
        (
            workload(&|w| {
                w.services.insert(
                    "ns/s.ns.svc.cluster.local".into(),
                    wl::PortList {
                        ports: vec![wl::Port {
                            service_port: 70000,
                            ..Default::default()
                        }],
                    },
                );
            }),
            "service port 70000 is not a port",
        ),
        (
            wl::Address { r#type: None },
            "neither a workload nor a service",
        ),
        (
            wl::Address {
                r#type: Some(wl::address::Type::Service(wl::Service {
                    namespace: "ns".into(),
                    hostname: "s.ns.svc.cluster.local".into(),
                    addresses: vec![wl::NetworkAddress {
                        network: String::new(),
                        address: vec![1; 5],
                    }],
                    ..Default::default()
                })),
            },
            "service address is 5 bytes long",
        ),
    ];
    for (address, expected) in cases {
        let nm = match &address.r#type {
            Some(wl::address::Type::Service(_)) => "ns/s.ns.svc.cluster.local",
            _ => name,
        };
        let msg = reason(nm, address);
        assert!(
            msg.contains(expected),
            "{msg:?} should contain {expected:?}"
        );
        assert!(msg.contains(nm), "{msg:?} should name the resource");
    }
    let wrong_type = parse_resource(
        ADDRESS_TYPE_URL,
        "x",
        &prost_types::Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: vec![],
        },
    )
    .unwrap_err();
    assert!(
        wrong_type
            .to_string()
            .contains("istio.security.Authorization"),
        "{wrong_type}"
    );
    let garbage =
        parse_resource(ADDRESS_TYPE_URL, "x", &address_any(vec![0xff, 0xff, 0xff])).unwrap_err();
    assert!(
        garbage
            .to_string()
            .contains("not a valid istio.workload.Address"),
        "{garbage}"
    );
}

#[test]
fn a_foreign_or_damaged_cache_is_refused_with_advice() {
    let e = decode_cache(Path::new("/x/state.pb"), b"hello").unwrap_err();
    assert!(matches!(e, CacheError::NotACache { .. }), "{e}");
    let mut bytes = b"isthmus-xds-cache v1\n".to_vec();
    bytes.extend([0x80, 0x80]);
    let e = decode_cache(Path::new("/x/state.pb"), &bytes).unwrap_err();
    assert!(
        e.to_string().contains("corrupt") && e.to_string().contains("delete it"),
        "{e}"
    );
}

proptest! {
    #[test]
    fn arbitrary_resource_bytes_never_panic(value in prop::collection::vec(any::<u8>(), 0..512), name in ".{0,20}") {
        let _ = parse_resource(ADDRESS_TYPE_URL, &name, &address_any(value.clone()));
        let _ = parse_resource(
            AUTHORIZATION_TYPE_URL,
            &name,
            &prost_types::Any { type_url: AUTHORIZATION_TYPE_URL.into(), value },
        );
    }

    #[test]
    fn arbitrary_cache_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = b"isthmus-xds-cache v1\n".to_vec();
        bytes.extend(tail);
        let _ = decode_cache(Path::new("c"), &bytes);
    }
}
