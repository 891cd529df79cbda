//! The mesh DNS request path: arbitrary bytes as a request to the responder, as the control
//! plane (no search, refusing) and as the agent's proxy (search domains, forwarding), over UDP
//! and TCP. Whatever comes in, the responder must not panic, and whatever it answers must be
//! a DNS response that decodes and fits the UDP limit.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use isthmus_dns::hickory_proto::op::{Message, MessageType};
use isthmus_dns::{NameTable, Reply, Responder, ResponderConfig, Transport, DEFAULT_UDP_PAYLOAD};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    table: NameTable,
    server: Responder,
    agent: Responder,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut b = NameTable::builder("cluster.local").unwrap();
        b.service("reviews", "bookinfo", ["10.96.0.10".parse().unwrap()])
            .unwrap()
            .service(
                "dual",
                "bookinfo",
                ["10.96.0.11".parse().unwrap(), "fd00::11".parse().unwrap()],
            )
            .unwrap()
            .service(
                "many",
                "bookinfo",
                (0..100u8).map(|i| IpAddr::V4(Ipv4Addr::new(10, 97, 0, i))),
            )
            .unwrap()
            .control_plane_aliases(&["10.0.0.1".parse().unwrap()])
            .unwrap();
        Fixture {
            table: b.build(),
            server: Responder::new(ResponderConfig::default()).unwrap(),
            agent: Responder::new(ResponderConfig {
                forwarding: true,
                search: isthmus_dns::search_domains("bookinfo", "cluster.local"),
                ..ResponderConfig::default()
            })
            .unwrap(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    for responder in [&f.server, &f.agent] {
        for transport in [Transport::Udp, Transport::Tcp] {
            match responder.respond(&f.table, data, transport) {
                Reply::Answer(answer) => {
                    let message = Message::from_vec(&answer.bytes).expect("our answers decode");
                    assert_eq!(message.metadata.message_type, MessageType::Response);
                    if transport == Transport::Udp {
                        assert!(answer.bytes.len() <= usize::from(DEFAULT_UDP_PAYLOAD));
                    }
                }
                Reply::Forward(query) => {
                    assert!(responder.forwarding());
                    let servfail = query.servfail().expect("SERVFAIL encodes");
                    Message::from_vec(&servfail).expect("SERVFAIL decodes");
                }
                Reply::Drop => {}
            }
        }
    }
});
