//! Proxy metrics, registered under the agent's sub-registry.

use std::fmt::Write;
use std::sync::Arc;

use isthmus_hbone::Baggage;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
    InboundPlaintext,
}

/// How a connection ended, as the access log says it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Bytes flowed and the connection closed normally.
    Ok,
    /// Refused by authorization (ours inbound, the peer's outbound).
    Denied,
    /// Refused by configuration: unknown destination, STRICT mode, a loop.
    Refused,
    /// No endpoint could be reached.
    Unreachable,
    /// Closed by an error mid-stream.
    Error,
    /// Closed because a policy change no longer allows it.
    Revoked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Refused => "refused",
            Outcome::Unreachable => "unreachable",
            Outcome::Error => "error",
            Outcome::Revoked => "revoked",
        }
    }
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::InboundPlaintext => "inbound_plaintext",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: Direction,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    pub direction: Direction,
}

/// A label value that reads `unknown` when absent, as Istio's do.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Known(pub Option<Arc<str>>);

impl EncodeLabelValue for Known {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.0.as_deref().unwrap_or("unknown"))
    }
}

/// The source workload with Istio's `istio_tcp_*` label names. Outbound, it is this agent's
/// own workload; inbound, what the peer's `baggage` said (informational: never used for
/// authorization, which relies on the verified `peer_identity`); plaintext, unknown.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source_workload: Known,
    pub source_workload_namespace: Known,
    pub source_canonical_service: Known,
    pub source_canonical_revision: Known,
    pub source_cluster: Known,
}

impl SourceLabels {
    pub fn from_baggage(b: &Baggage) -> Self {
        Self {
            source_workload: Known(b.workload_name.clone()),
            source_workload_namespace: Known(b.namespace.clone()),
            source_canonical_service: Known(b.service_name.clone()),
            source_canonical_revision: Known(b.service_version.clone()),
            source_cluster: Known(b.cluster_id.clone()),
        }
    }
}

/// Who talked to which service: the peer's SPIFFE id (verified inbound, expected outbound,
/// `unknown` for plaintext), the service (`unknown` when not a mesh service) and the source
/// workload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub direction: Direction,
    pub outcome: Outcome,
    pub peer_identity: String,
    pub service: String,
    #[prometheus(flatten)]
    pub source: SourceLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerBytesLabels {
    pub direction: Direction,
    pub peer_identity: String,
    pub service: String,
    #[prometheus(flatten)]
    pub source: SourceLabels,
}

#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// Closed connections by outcome.
    pub connections: Family<ConnLabels, Counter>,
    /// Open connections.
    pub active: Family<DirLabels, Gauge>,
    /// Bytes from the downstream (client) side to the upstream.
    pub bytes_sent: Family<DirLabels, Counter>,
    /// Bytes from the upstream back to the client.
    pub bytes_received: Family<DirLabels, Counter>,
    /// Closed connections by peer identity and service (policy denials, handshake and connect
    /// failures show in `outcome`).
    pub by_peer: Family<PeerLabels, Counter>,
    pub bytes_by_peer: Family<PeerBytesLabels, Counter>,
    /// Connections closed at accept because their listener was at its bound.
    pub over_limit: Family<DirLabels, Counter>,
}

impl ProxyMetrics {
    /// Registers `proxy_connections_total{direction,outcome}`, `proxy_active_connections`,
    /// `proxy_sent_bytes_total`, `proxy_received_bytes_total` (prefix them by registering in
    /// the agent's sub-registry).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "proxy_connections",
            "Proxied connections by direction and outcome",
            self.connections.clone(),
        );
        registry.register(
            "proxy_over_limit_connections",
            "Connections closed at accept because the listener was at its connection limit",
            self.over_limit.clone(),
        );
        registry.register(
            "proxy_active_connections",
            "Proxied connections open now",
            self.active.clone(),
        );
        registry.register_with_unit(
            "proxy_sent",
            "Bytes proxied from clients to upstreams",
            Unit::Bytes,
            self.bytes_sent.clone(),
        );
        registry.register(
            "proxy_peer_connections",
            "Proxied connections by direction, outcome, peer identity and service",
            self.by_peer.clone(),
        );
        registry.register_with_unit(
            "proxy_peer",
            "Bytes proxied (both ways) by direction, peer identity and service",
            Unit::Bytes,
            self.bytes_by_peer.clone(),
        );
        registry.register_with_unit(
            "proxy_received",
            "Bytes proxied from upstreams back to clients",
            Unit::Bytes,
            self.bytes_received.clone(),
        );
    }

    pub fn opened(&self, direction: Direction) {
        self.active.get_or_create(&DirLabels { direction }).inc();
    }

    /// Records a closed connection; `opened` must have been called for it when `was_open`.
    pub(crate) fn closed(&self, rec: &super::AccessRecord, outcome: Outcome, was_open: bool) {
        let (direction, sent, received) = (rec.direction, rec.sent, rec.received);
        let (peer_identity, service) = (rec.identity.as_deref(), rec.service.as_deref());
        let peer_identity = peer_identity.unwrap_or("unknown").to_string();
        let service = service.unwrap_or("unknown").to_string();
        let source = SourceLabels::from_baggage(&rec.source);
        self.by_peer
            .get_or_create(&PeerLabels {
                direction,
                outcome,
                peer_identity: peer_identity.clone(),
                service: service.clone(),
                source: source.clone(),
            })
            .inc();
        self.bytes_by_peer
            .get_or_create(&PeerBytesLabels {
                direction,
                peer_identity,
                service,
                source,
            })
            .inc_by(sent + received);
        if was_open {
            self.active.get_or_create(&DirLabels { direction }).dec();
        }
        self.connections
            .get_or_create(&ConnLabels { direction, outcome })
            .inc();
        let l = DirLabels { direction };
        self.bytes_sent.get_or_create(&l).inc_by(sent);
        self.bytes_received.get_or_create(&l).inc_by(received);
    }

    /// Closed connections with this direction and outcome so far.
    pub fn count(&self, direction: Direction, outcome: Outcome) -> u64 {
        self.connections
            .get_or_create(&ConnLabels { direction, outcome })
            .get()
    }
}
