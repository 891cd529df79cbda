//! Node ids from discovery clients: any string parses or is refused, never panics, and an
//! accepted four-part id round-trips to the same value.
#![no_main]

use isthmus_xds::{NodeId, ProxyNode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = NodeId::parse(text);
    match &parsed {
        Ok(NodeId::Proxy(ProxyNode {
            role,
            ip,
            name,
            namespace,
            domain,
        })) => {
            let ip = ip.map(|ip| ip.to_string()).unwrap_or_default();
            let again = format!("{role}~{ip}~{name}.{namespace}~{namespace}.svc.{domain}");
            let reparsed = NodeId::parse(&again).expect("a rebuilt id parses");
            assert_eq!(Ok(reparsed), parsed);
        }
        Ok(NodeId::Opaque(id)) => assert!(!id.contains('~')),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
