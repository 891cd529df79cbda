//! The DNS request path without sockets: request bytes in, response bytes (or "forward this")
//! out. Everything on the wire is decoded and encoded with hickory-proto.

use std::time::Duration;

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use crate::table::{parse_name, Addresses, Lookup, NameTable};

/// TTL of mesh answers unless configured: short, so a moved VIP is picked up quickly.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// The UDP payload size this server advertises in EDNS (the DNS flag day 2020 value, which
/// avoids IP fragmentation on common paths).
pub const DEFAULT_UDP_PAYLOAD: u16 = 1232;

/// The UDP limit of a client that sent no EDNS (RFC 1035).
const CLASSIC_UDP_LIMIT: u16 = 512;

/// Errors in the responder's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ResponderError {
    #[error(
        "search domain {domain:?} is not a valid DNS name ({reason}); \
         give names like \"bookinfo.svc.cluster.local\""
    )]
    BadSearchDomain { domain: String, reason: String },
    #[error("DNS TTL {ttl:?} is too long: at most {max} seconds")]
    TtlTooLong { ttl: Duration, max: u32 },
    #[error("EDNS UDP payload size {size} is below the DNS minimum of 512 bytes")]
    PayloadTooSmall { size: u16 },
}

/// How the responder behaves.
#[derive(Clone, Debug)]
pub struct ResponderConfig {
    /// TTL of mesh answers (and of the negative-caching SOA).
    pub ttl: Duration,
    /// Suffixes tried, in order, for names that are not mesh names as asked (the agent's proxy:
    /// `["bookinfo.svc.cluster.local", "svc.cluster.local", "cluster.local"]`). Empty on the
    /// control plane, which only answers fully qualified names.
    pub search: Vec<String>,
    /// Whether names outside the mesh are forwarded ([`Reply::Forward`]) or refused.
    pub forwarding: bool,
    /// The EDNS UDP payload size advertised and honoured (clients asking for more get this).
    pub udp_payload: u16,
}

impl Default for ResponderConfig {
    fn default() -> Self {
        ResponderConfig {
            ttl: DEFAULT_TTL,
            search: Vec::new(),
            forwarding: false,
            udp_payload: DEFAULT_UDP_PAYLOAD,
        }
    }
}

/// The transport a request came in on: UDP answers are limited in size, TCP ones are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Reply {
    /// Send these bytes back.
    Answer(Answer),
    /// Not a mesh name and forwarding is on: send the request to an upstream.
    Forward(ForwardQuery),
    /// Send nothing: the bytes are not a DNS query (too short for a header, or a response).
    Drop,
}

/// An encoded response and its response code (for metrics and logs).
#[derive(Debug)]
pub struct Answer {
    pub bytes: Vec<u8>,
    pub rcode: ResponseCode,
}

/// A request to forward upstream, with what is needed to answer the client if that fails.
#[derive(Debug)]
pub struct ForwardQuery {
    request: Message,
    udp_limit: u16,
}

/// Answers DNS requests from a [`NameTable`].
#[derive(Clone, Debug)]
pub struct Responder {
    ttl: u32,
    search: Vec<Name>,
    forwarding: bool,
    udp_payload: u16,
}

impl Responder {
    pub fn new(config: ResponderConfig) -> Result<Self, ResponderError> {
        let ttl = u32::try_from(config.ttl.as_secs())
            .ok()
            .filter(|t| *t <= i32::MAX as u32)
            .ok_or(ResponderError::TtlTooLong {
                ttl: config.ttl,
                max: i32::MAX as u32,
            })?;
        if config.udp_payload < CLASSIC_UDP_LIMIT {
            return Err(ResponderError::PayloadTooSmall {
                size: config.udp_payload,
            });
        }
        let search = config
            .search
            .iter()
            .map(|d| {
                parse_name(d).map_err(|reason| ResponderError::BadSearchDomain {
                    domain: d.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Responder {
            ttl,
            search,
            forwarding: config.forwarding,
            udp_payload: config.udp_payload,
        })
    }

    pub fn forwarding(&self) -> bool {
        self.forwarding
    }

    /// Answers one request. Never panics, whatever the bytes (see the fuzz target).
    pub fn respond(&self, table: &NameTable, request: &[u8], transport: Transport) -> Reply {
        let mut decoder = BinDecoder::new(request);
        let Ok(header) = Header::read(&mut decoder) else {
            // Too short to carry an ID: there is nobody to address an error to.
            return Reply::Drop;
        };
        if header.metadata.message_type == MessageType::Response {
            // Answering responses would let two servers bounce packets between them forever.
            return Reply::Drop;
        }
        let request = match Message::from_vec(request) {
            Ok(message) => message,
            Err(_) => return self.error_reply(&header.metadata, None, ResponseCode::FormErr),
        };
        if request.metadata.op_code != OpCode::Query {
            return self.error_reply(&request.metadata, Some(&request), ResponseCode::NotImp);
        }
        let query = match request.queries.as_slice() {
            [query] => query,
            // Zero or several questions: no server implements several; RFC 9619 says FORMERR.
            _ => return self.error_reply(&request.metadata, Some(&request), ResponseCode::FormErr),
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return self.error_reply(&request.metadata, Some(&request), ResponseCode::BADVERS);
        }
        let udp_limit = match transport {
            Transport::Udp => self.udp_limit(&request),
            Transport::Tcp => u16::MAX,
        };

        let found = if query.query_class() == DNSClass::IN {
            self.lookup(table, query.name())
        } else {
            // Other classes (CHAOS `version.bind` and the like) are never mesh names.
            Lookup::NotMesh
        };
        match found {
            Lookup::Found(addresses) => {
                let mut response = self.response(&request, ResponseCode::NoError);
                response.metadata.authoritative = true;
                self.add_addresses(&mut response, query, addresses);
                if response.answers.is_empty() {
                    // NODATA: the SOA lets resolvers cache the absence (RFC 2308).
                    self.add_soa(&mut response, table, query.name());
                }
                self.encode(response, udp_limit)
            }
            Lookup::NxDomain => {
                let mut response = self.response(&request, ResponseCode::NXDomain);
                response.metadata.authoritative = true;
                self.add_soa(&mut response, table, query.name());
                self.encode(response, udp_limit)
            }
            Lookup::NotMesh if self.forwarding => {
                Reply::Forward(ForwardQuery { request, udp_limit })
            }
            Lookup::NotMesh => {
                let response = self.response(&request, ResponseCode::Refused);
                self.encode(response, udp_limit)
            }
        }
    }

    /// Looks the name up as asked, then (agent proxy) with each search suffix: `reviews` and
    /// `reviews.bookinfo` become `reviews.bookinfo.svc.cluster.local` for a host in bookinfo.
    fn lookup<'t>(&self, table: &'t NameTable, name: &Name) -> Lookup<'t> {
        let direct = table.lookup(name);
        if !matches!(direct, Lookup::NotMesh) || self.search.is_empty() {
            return direct;
        }
        for suffix in &self.search {
            let Ok(candidate) = name.clone().append_domain(suffix) else {
                continue; // too long with this suffix
            };
            if let found @ Lookup::Found(_) = table.lookup(&candidate) {
                return found;
            }
        }
        // Not in the mesh under any suffix: the host's upstream may know it.
        Lookup::NotMesh
    }

    fn udp_limit(&self, request: &Message) -> u16 {
        match &request.edns {
            Some(edns) => edns
                .max_payload()
                .clamp(CLASSIC_UDP_LIMIT, self.udp_payload),
            None => CLASSIC_UDP_LIMIT,
        }
    }

    /// A response skeleton echoing the request's ID, flags, question and EDNS presence.
    fn response(&self, request: &Message, rcode: ResponseCode) -> Message {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.checking_disabled = request.metadata.checking_disabled;
        response.metadata.recursion_available = self.forwarding;
        response.metadata.response_code = rcode;
        response.queries = request.queries.clone();
        if request.edns.is_some() {
            response.edns = Some(self.edns());
        }
        response
    }

    fn edns(&self) -> Edns {
        let mut edns = Edns::new();
        edns.set_max_payload(self.udp_payload);
        edns.set_version(0);
        edns
    }

    fn add_addresses(&self, response: &mut Message, query: &Query, addresses: &Addresses) {
        // The owner is the name as asked (with its case), so stub resolvers accept the answer
        // even when a search suffix found it.
        let owner = query.name();
        let (v4, v6) = match query.query_type() {
            RecordType::A => (true, false),
            RecordType::AAAA => (false, true),
            RecordType::ANY => (true, true),
            _ => (false, false),
        };
        if v4 {
            for ip in &addresses.v4 {
                response.add_answer(Record::from_rdata(
                    owner.clone(),
                    self.ttl,
                    RData::A(A(*ip)),
                ));
            }
        }
        if v6 {
            for ip in &addresses.v6 {
                response.add_answer(Record::from_rdata(
                    owner.clone(),
                    self.ttl,
                    RData::AAAA(AAAA(*ip)),
                ));
            }
        }
    }

    /// The SOA of the mesh domain for negative answers; names outside it (aliases) get none,
    /// as this server is not the authority of their zone.
    fn add_soa(&self, response: &mut Message, table: &NameTable, name: &Name) {
        let domain = table.domain();
        if !domain.zone_of(name) {
            return;
        }
        let (Ok(mname), Ok(rname)) = (
            Name::from_ascii("ns.dns").and_then(|n| n.append_domain(domain)),
            Name::from_ascii("hostmaster").and_then(|n| n.append_domain(domain)),
        ) else {
            return; // only when the domain is near the 255-byte limit; the answer stays valid
        };
        let soa = SOA::new(mname, rname, table.serial(), 7200, 1800, 86400, self.ttl);
        response.add_authority(Record::from_rdata(
            domain.clone(),
            self.ttl,
            RData::SOA(soa),
        ));
    }

    fn error_reply(
        &self,
        metadata: &Metadata,
        request: Option<&Message>,
        rcode: ResponseCode,
    ) -> Reply {
        let response = match request {
            Some(request) => self.response(request, rcode),
            None => {
                let mut response = Message::error_msg(metadata.id, metadata.op_code, rcode);
                response.metadata.recursion_desired = metadata.recursion_desired;
                response.metadata.recursion_available = self.forwarding;
                response
            }
        };
        // BADVERS lives partly in the OPT record: it needs EDNS in the response.
        let mut response = response;
        if rcode.high() > 0 && response.edns.is_none() {
            response.edns = Some(self.edns());
        }
        self.encode(response, CLASSIC_UDP_LIMIT.max(self.udp_payload))
    }

    fn encode(&self, response: Message, limit: u16) -> Reply {
        let rcode = response.metadata.response_code;
        match encode_within(&response, limit) {
            Some(bytes) => Reply::Answer(Answer { bytes, rcode }),
            None => Reply::Drop,
        }
    }
}

impl ForwardQuery {
    /// The decoded request.
    pub fn request(&self) -> &Message {
        &self.request
    }

    /// The most the client accepts in one answer on this transport (`u16::MAX` for TCP).
    pub fn udp_limit(&self) -> u16 {
        self.udp_limit
    }

    /// SERVFAIL for the client, when no upstream answered.
    pub fn servfail(&self) -> Option<Vec<u8>> {
        let mut response =
            Message::response(self.request.metadata.id, self.request.metadata.op_code);
        response.metadata.recursion_desired = self.request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.response_code = ResponseCode::ServFail;
        response.queries = self.request.queries.clone();
        if self.request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(self.udp_limit.max(CLASSIC_UDP_LIMIT));
            response.edns = Some(edns);
        }
        encode_within(&response, CLASSIC_UDP_LIMIT)
    }

    /// Whether `response` (decoded) answers this request's question. The ID is checked by the
    /// caller, which chose the ID it sent upstream.
    pub fn matches(&self, response: &Message) -> bool {
        response.metadata.message_type == MessageType::Response
            && response.queries.len() == self.request.queries.len()
            && response
                .queries
                .iter()
                .zip(&self.request.queries)
                .all(|(a, b)| {
                    a.name() == b.name()
                        && a.query_type() == b.query_type()
                        && a.query_class() == b.query_class()
                })
    }

    /// Fits an upstream's answer to the client's UDP limit: as is when it fits, otherwise
    /// re-encoded without records and with TC set so the client retries over TCP.
    pub fn fit(&self, response: Vec<u8>, upstream: &Message) -> Option<Vec<u8>> {
        if response.len() <= usize::from(self.udp_limit) {
            return Some(response);
        }
        let mut upstream = upstream.clone();
        upstream.metadata.id = self.request.metadata.id;
        encode_within(&upstream, self.udp_limit)
    }
}

/// Encodes `message`; when it is longer than `limit`, encodes instead its header, question and
/// a bare OPT with TC set (RFC 2181 §9: no partial RRsets, the client retries over TCP).
/// `None` when even that does not fit (only an upstream's odd answer can do that).
fn encode_within(message: &Message, limit: u16) -> Option<Vec<u8>> {
    let bytes = message.to_vec().ok()?;
    if bytes.len() <= usize::from(limit) {
        return Some(bytes);
    }
    let mut truncated = Message::new(
        message.metadata.id,
        message.metadata.message_type,
        message.metadata.op_code,
    );
    truncated.metadata = message.metadata;
    truncated.metadata.truncation = true;
    truncated.queries = message.queries.clone();
    // The OPT's options (an upstream's padding, say) could be what made it too big.
    truncated.edns = message.edns.as_ref().map(|edns| {
        let mut bare = Edns::new();
        bare.set_max_payload(edns.max_payload());
        bare.set_version(edns.version());
        bare.set_dnssec_ok(edns.flags().dnssec_ok);
        bare
    });
    truncated
        .to_vec()
        .ok()
        .filter(|bytes| bytes.len() <= usize::from(limit))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn table() -> NameTable {
        let mut b = NameTable::builder("cluster.local").unwrap();
        b.service("reviews", "bookinfo", ["10.96.0.10".parse().unwrap()])
            .unwrap()
            .service(
                "dual",
                "bookinfo",
                ["10.96.0.11".parse().unwrap(), "fd00::11".parse().unwrap()],
            )
            .unwrap()
            .service("v6only", "bookinfo", ["fd00::12".parse().unwrap()])
            .unwrap()
            .service(
                "many",
                "bookinfo",
                (0..200u8).map(|i| IpAddr::V4(Ipv4Addr::new(10, 97, 0, i))),
            )
            .unwrap()
            .control_plane_aliases(&["10.0.0.1".parse().unwrap()])
            .unwrap();
        b.build()
    }

    fn responder(forwarding: bool, search: &[&str]) -> Responder {
        Responder::new(ResponderConfig {
            forwarding,
            search: search.iter().map(|s| s.to_string()).collect(),
            ..ResponderConfig::default()
        })
        .unwrap()
    }

    fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn answer(reply: Reply) -> Message {
        match reply {
            Reply::Answer(a) => {
                let m = Message::from_vec(&a.bytes).unwrap();
                // Compared as numbers: hickory decodes 16 as BADSIG, which shares BADVERS's code.
                assert_eq!(u16::from(m.metadata.response_code), u16::from(a.rcode));
                m
            }
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    fn ips(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_and_aaaa_from_the_table() {
        let r = responder(false, &[]);
        let t = table();
        let m = answer(r.respond(
            &t,
            &query("dual.bookinfo.svc.cluster.local.", RecordType::A, None),
            Transport::Udp,
        ));
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.authoritative);
        assert!(m.metadata.recursion_desired);
        assert_eq!(ips(&m), ["10.96.0.11"]);
        assert_eq!(m.answers[0].ttl, 30);
        let m = answer(r.respond(
            &t,
            &query("DUAL.bookinfo.svc.cluster.local.", RecordType::AAAA, None),
            Transport::Udp,
        ));
        assert_eq!(ips(&m), ["fd00::11"]);
        assert_eq!(
            m.answers[0].name.to_ascii(),
            "DUAL.bookinfo.svc.cluster.local."
        );
        let m = answer(r.respond(
            &t,
            &query("dual.bookinfo.svc.cluster.local.", RecordType::ANY, None),
            Transport::Udp,
        ));
        assert_eq!(ips(&m), ["10.96.0.11", "fd00::11"]);
    }

    #[test]
    fn missing_type_is_nodata_with_soa() {
        let r = responder(false, &[]);
        let t = table();
        for (name, rtype) in [
            ("reviews.bookinfo.svc.cluster.local.", RecordType::AAAA),
            ("v6only.bookinfo.svc.cluster.local.", RecordType::A),
            ("reviews.bookinfo.svc.cluster.local.", RecordType::MX),
            ("bookinfo.svc.cluster.local.", RecordType::A),
        ] {
            let m = answer(r.respond(&t, &query(name, rtype, None), Transport::Udp));
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::NoError,
                "{name} {rtype}"
            );
            assert!(m.answers.is_empty(), "{name} {rtype}");
            assert_eq!(m.authorities.len(), 1, "{name} {rtype}");
            assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        }
    }

    #[test]
    fn unknown_mesh_name_is_nxdomain_even_when_forwarding() {
        let t = table();
        for forwarding in [false, true] {
            let r = responder(forwarding, &[]);
            let m = answer(r.respond(
                &t,
                &query("nope.bookinfo.svc.cluster.local.", RecordType::A, None),
                Transport::Udp,
            ));
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
            assert_eq!(m.authorities[0].name.to_ascii(), "cluster.local.");
            assert_eq!(m.metadata.recursion_available, forwarding);
        }
    }

    #[test]
    fn other_names_are_refused_or_forwarded() {
        let t = table();
        let m = answer(responder(false, &[]).respond(
            &t,
            &query("example.com.", RecordType::A, None),
            Transport::Udp,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        match responder(true, &[]).respond(
            &t,
            &query("example.com.", RecordType::A, Some(4096)),
            Transport::Udp,
        ) {
            Reply::Forward(f) => {
                assert_eq!(f.request().queries[0].name().to_ascii(), "example.com.");
                assert_eq!(f.udp_limit(), DEFAULT_UDP_PAYLOAD);
                let s = Message::from_vec(&f.servfail().unwrap()).unwrap();
                assert_eq!(s.metadata.response_code, ResponseCode::ServFail);
                assert_eq!(s.metadata.id, 0x1234);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn aliases_answer_in_every_form() {
        let r = responder(false, &[]);
        let t = table();
        for name in [
            "istio-pilot.",
            "istiod.istio-system.",
            "istio-ca.istio-system.svc.",
            "istio-citadel.istio-system.svc.cluster.local.",
        ] {
            let m = answer(r.respond(&t, &query(name, RecordType::A, None), Transport::Udp));
            assert_eq!(ips(&m), ["10.0.0.1"], "{name}");
        }
        // An alias outside the domain without an AAAA is NODATA, without an SOA of ours.
        let m = answer(r.respond(
            &t,
            &query("istio-pilot.", RecordType::AAAA, None),
            Transport::Udp,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
    }

    #[test]
    fn search_domains_expand_short_names_in_agent_mode() {
        let t = table();
        let agent = responder(
            true,
            &[
                "bookinfo.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
            ],
        );
        for name in ["reviews.", "reviews.bookinfo.", "reviews.bookinfo.svc."] {
            let m = answer(agent.respond(&t, &query(name, RecordType::A, None), Transport::Udp));
            assert_eq!(ips(&m), ["10.96.0.10"], "{name}");
            assert_eq!(m.answers[0].name.to_ascii(), name);
        }
        // Not found under any suffix: forwarded, not NXDOMAIN (the host's DNS may know it).
        assert!(matches!(
            agent.respond(&t, &query("nope.", RecordType::A, None), Transport::Udp),
            Reply::Forward(_)
        ));
        // The control plane does not expand.
        let server = responder(false, &[]);
        let m = answer(server.respond(
            &t,
            &query("reviews.bookinfo.", RecordType::A, None),
            Transport::Udp,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn big_answers_truncate_on_udp_only() {
        let r = responder(false, &[]);
        let t = table();
        let q = query("many.bookinfo.svc.cluster.local.", RecordType::A, None);
        let m = answer(r.respond(&t, &q, Transport::Udp));
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
        let m = answer(r.respond(&t, &q, Transport::Tcp));
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 200);
        // With EDNS the limit is the smaller of the client's size and ours.
        let q = query(
            "many.bookinfo.svc.cluster.local.",
            RecordType::A,
            Some(65000),
        );
        match r.respond(&t, &q, Transport::Udp) {
            Reply::Answer(a) => assert!(a.bytes.len() <= DEFAULT_UDP_PAYLOAD as usize),
            other => panic!("{other:?}"),
        }
        // 30 answers fit in 1232 bytes but not in 512.
        let mut b = NameTable::builder("cluster.local").unwrap();
        b.service(
            "thirty",
            "ns",
            (0..30u8).map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))),
        )
        .unwrap();
        let t = b.build();
        let m = answer(r.respond(
            &t,
            &query("thirty.ns.svc.cluster.local.", RecordType::A, None),
            Transport::Udp,
        ));
        assert!(m.metadata.truncation);
        let m = answer(r.respond(
            &t,
            &query("thirty.ns.svc.cluster.local.", RecordType::A, Some(1232)),
            Transport::Udp,
        ));
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 30);
        assert_eq!(m.edns.as_ref().unwrap().max_payload(), DEFAULT_UDP_PAYLOAD);
    }

    #[test]
    fn malformed_and_odd_requests() {
        let r = responder(false, &[]);
        let t = table();
        // Too short for a header: nothing to answer.
        assert!(matches!(
            r.respond(&t, &[1, 2, 3], Transport::Udp),
            Reply::Drop
        ));
        // A header claiming a question that is not there: FORMERR with the ID.
        let mut bytes = query("reviews.bookinfo.svc.cluster.local.", RecordType::A, None);
        bytes.truncate(20);
        let m = answer(r.respond(&t, &bytes, Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.metadata.id, 0x1234);
        // A response is never answered.
        let mut resp = Message::response(7, OpCode::Query);
        resp.add_query(Query::query(Name::from_ascii("a.").unwrap(), RecordType::A));
        assert!(matches!(
            r.respond(&t, &resp.to_vec().unwrap(), Transport::Udp),
            Reply::Drop
        ));
        // No question.
        let mut m = Message::query();
        m.metadata.id = 9;
        let m = answer(r.respond(&t, &m.to_vec().unwrap(), Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // Not a QUERY.
        let mut m = Message::new(10, MessageType::Query, OpCode::Status);
        m.add_query(Query::query(Name::from_ascii("a.").unwrap(), RecordType::A));
        let m = answer(r.respond(&t, &m.to_vec().unwrap(), Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        // EDNS version 1.
        let mut m = Message::from_vec(&query(
            "reviews.bookinfo.svc.cluster.local.",
            RecordType::A,
            Some(1232),
        ))
        .unwrap();
        m.edns.as_mut().unwrap().set_version(1);
        let m = answer(r.respond(&t, &m.to_vec().unwrap(), Transport::Udp));
        assert_eq!(
            u16::from(m.metadata.response_code),
            u16::from(ResponseCode::BADVERS)
        );
        // CHAOS class goes the non-mesh way.
        let mut m = Message::from_vec(&query(
            "reviews.bookinfo.svc.cluster.local.",
            RecordType::TXT,
            None,
        ))
        .unwrap();
        m.queries[0].set_query_class(DNSClass::CH);
        let m = answer(r.respond(&t, &m.to_vec().unwrap(), Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn upstream_answers_are_matched_and_fitted_to_the_client() {
        use hickory_proto::rr::rdata::opt::EdnsOption;
        let t = table();
        let r = responder(true, &[]);
        let Reply::Forward(f) = r.respond(
            &t,
            &query("www.example.com.", RecordType::A, Some(600)),
            Transport::Udp,
        ) else {
            panic!("not forwarded");
        };
        assert_eq!(f.udp_limit(), 600);
        let mut upstream = Message::response(0x9999, OpCode::Query);
        upstream.add_query(Query::query(
            Name::from_ascii("WWW.example.com.").unwrap(),
            RecordType::A,
        ));
        for i in 0..100u8 {
            upstream.add_answer(Record::from_rdata(
                Name::from_ascii("www.example.com.").unwrap(),
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, i))),
            ));
        }
        // A large option in the OPT must not survive truncation.
        let mut edns = Edns::new();
        edns.options_mut()
            .insert(EdnsOption::Unknown(12, vec![0; 700]));
        upstream.set_edns(edns);
        assert!(f.matches(&upstream), "names match case-insensitively");
        let bytes = upstream.to_vec().unwrap();
        let fitted = f.fit(bytes, &upstream).unwrap();
        assert!(fitted.len() <= 600);
        let m = Message::from_vec(&fitted).unwrap();
        assert!(m.metadata.truncation);
        assert_eq!(m.metadata.id, 0x1234, "the client's ID");
        assert!(m.answers.is_empty());

        let mut other = upstream.clone();
        other.queries[0].set_query_type(RecordType::AAAA);
        assert!(!f.matches(&other));
        let mut not_response = upstream.clone();
        not_response.metadata.message_type = MessageType::Query;
        assert!(!f.matches(&not_response));
    }

    #[test]
    fn config_errors_name_the_value() {
        let err = Responder::new(ResponderConfig {
            search: vec!["a..b".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("\"a..b\""), "{err}");
        let err = Responder::new(ResponderConfig {
            udp_payload: 100,
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("100"), "{err}");
        let err = Responder::new(ResponderConfig {
            ttl: Duration::from_secs(1 << 40),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let t = table();
            for r in [responder(false, &[]), responder(true, &["bookinfo.svc.cluster.local", "cluster.local"])] {
                for transport in [Transport::Udp, Transport::Tcp] {
                    if let Reply::Answer(a) = r.respond(&t, &bytes, transport) {
                        let m = Message::from_vec(&a.bytes).expect("our answers decode");
                        proptest::prop_assert_eq!(m.metadata.message_type, MessageType::Response);
                        if transport == Transport::Udp {
                            proptest::prop_assert!(a.bytes.len() <= DEFAULT_UDP_PAYLOAD as usize);
                        }
                    }
                }
            }
        }

        #[test]
        fn mutated_queries_never_panic(pos in 0usize..64, val in proptest::num::u8::ANY, cut in 0usize..64) {
            let t = table();
            let r = responder(true, &["bookinfo.svc.cluster.local"]);
            let mut bytes = query("reviews.bookinfo.svc.cluster.local.", RecordType::A, Some(1232));
            if pos < bytes.len() { bytes[pos] = val; }
            bytes.truncate(bytes.len().saturating_sub(cut % 8));
            let _ = r.respond(&t, &bytes, Transport::Udp);
        }
    }
}
