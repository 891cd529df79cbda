//! What the forwarder does with an upstream's answer: arbitrary bytes as the response to a
//! forwarded query, matched against the question and fitted to the client's UDP limit.
#![no_main]

use isthmus_dns::hickory_proto::op::{Edns, Message, Query};
use isthmus_dns::hickory_proto::rr::{Name, RecordType};
use isthmus_dns::{NameTable, Reply, Responder, ResponderConfig, Transport};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let table = NameTable::empty("cluster.local").unwrap();
    let responder = Responder::new(ResponderConfig {
        forwarding: true,
        ..ResponderConfig::default()
    })
    .unwrap();
    let mut request = Message::query();
    request.add_query(Query::query(
        Name::from_ascii("www.example.com.").unwrap(),
        RecordType::A,
    ));
    let mut edns = Edns::new();
    edns.set_max_payload(600);
    request.set_edns(edns);
    let Reply::Forward(query) =
        responder.respond(&table, &request.to_vec().unwrap(), Transport::Udp)
    else {
        panic!("a non-mesh name is forwarded");
    };
    if let Ok(upstream) = Message::from_vec(data) {
        // The forwarder fits only answers that match the question.
        if query.matches(&upstream) {
            if let Some(fitted) = query.fit(data.to_vec(), &upstream) {
                assert!(fitted.len() <= usize::from(query.udp_limit()));
                Message::from_vec(&fitted).expect("a fitted answer decodes");
            }
        }
    }
});
