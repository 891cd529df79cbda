//! Prometheus counters of the DNS server.

use hickory_proto::op::ResponseCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::responder::Transport;

/// Who produced an answer.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Source {
    /// The name table (or the responder's own errors).
    Local,
    /// An upstream resolver.
    Upstream,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Upstream => "upstream",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    rcode: &'static str,
    source: &'static str,
    transport: &'static str,
}

/// Counters by response code; cheap to clone (shared handles).
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    responses: Family<ResponseLabels, Counter>,
    dropped: Counter,
    forwards_rejected: Counter,
    upstream_failures: Counter,
}

impl DnsMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the counters as `isthmus_dns_*` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        self.register_named(registry, "isthmus_dns_");
    }

    /// Registers the counters without a prefix, for a sub-registry that has its own (the
    /// control plane's `isthmus_dns`).
    pub fn register_in(&self, registry: &mut Registry) {
        self.register_named(registry, "");
    }

    fn register_named(&self, registry: &mut Registry, prefix: &str) {
        registry.register(
            format!("{prefix}responses"),
            "DNS responses sent, by response code, source and transport",
            self.responses.clone(),
        );
        registry.register(
            format!("{prefix}dropped_requests"),
            "Datagrams not answered: shorter than a DNS header, or responses",
            self.dropped.clone(),
        );
        registry.register(
            format!("{prefix}forwards_rejected"),
            "Forwards refused with SERVFAIL because the in-flight limit was reached",
            self.forwards_rejected.clone(),
        );
        registry.register(
            format!("{prefix}upstream_failures"),
            "Upstream attempts that timed out, failed or gave an unusable answer",
            self.upstream_failures.clone(),
        );
    }

    pub(crate) fn response(&self, rcode: ResponseCode, source: Source, transport: Transport) {
        self.responses
            .get_or_create(&ResponseLabels {
                rcode: rcode_label(rcode),
                source: source.label(),
                transport: transport_label(transport),
            })
            .inc();
    }

    pub(crate) fn dropped(&self) {
        self.dropped.inc();
    }

    pub(crate) fn forward_rejected(&self) {
        self.forwards_rejected.inc();
    }

    pub(crate) fn upstream_failure(&self) {
        self.upstream_failures.inc();
    }

    /// The count of responses with `rcode` (tests and status pages).
    pub fn responses_with(&self, rcode: ResponseCode, source: Source) -> u64 {
        [Transport::Udp, Transport::Tcp]
            .into_iter()
            .map(|transport| {
                self.responses
                    .get_or_create(&ResponseLabels {
                        rcode: rcode_label(rcode),
                        source: source.label(),
                        transport: transport_label(transport),
                    })
                    .get()
            })
            .sum()
    }
}

fn transport_label(transport: Transport) -> &'static str {
    match transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    }
}

/// The names dig prints, so a metric and a dig session read the same.
fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        // The same code 16; hickory decodes it as BADSIG.
        ResponseCode::BADVERS | ResponseCode::BADSIG => "BADVERS",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn counters_are_exported_by_rcode() {
        let metrics = DnsMetrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.response(ResponseCode::NXDomain, Source::Local, Transport::Udp);
        metrics.response(ResponseCode::NXDomain, Source::Local, Transport::Tcp);
        metrics.dropped();
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "isthmus_dns_responses_total{rcode=\"NXDOMAIN\",source=\"local\",transport=\"udp\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("isthmus_dns_dropped_requests_total 1"),
            "{text}"
        );
        assert_eq!(
            metrics.responses_with(ResponseCode::NXDomain, Source::Local),
            2
        );
    }
}
