//! What an outbound HBONE `CONNECT` says about its source (`baggage`, `forwarded`,
//! `traceparent`, see [`isthmus_hbone::metadata`]), and what inbound keeps of a peer's.
//!
//! The `baggage` value describes this agent's own workload: the namespace of its certificate's
//! identity and, from discovery, the workload entry at the agent's mesh IP (name, canonical
//! service and revision, cluster). It changes only when those do, so it is built by a
//! background task into a watch ([`follow`]); a connection clones a reference-counted header
//! value and pays only for its own `traceparent` and `forwarded` values.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use isthmus_hbone::metadata::{self, Baggage, TraceParent};
use isthmus_xds::client::{State, Workload};
use isthmus_xds::Identity;
use rand::Rng;
use tokio::sync::watch;

use crate::identity::CurrentCert;

/// This agent's workload as peers and our outbound metrics see it.
#[derive(Clone, Debug, Default)]
pub struct LocalWorkload {
    /// The source labels of outbound connections.
    pub meta: Baggage,
    /// `meta` encoded once; `None` when nothing is known yet.
    baggage: Option<HeaderValue>,
    /// Our certificate's SPIFFE id without the scheme (`cluster.local/ns/a/sa/b`), as Istio's
    /// `source_principal` label writes it.
    pub principal: Option<Arc<str>>,
}

impl LocalWorkload {
    /// `identity` is the certificate's (authoritative for the namespace); `workload` the
    /// discovery entry at our address, used only when it is in that namespace.
    pub fn new(identity: Option<&Identity>, workload: Option<&Workload>) -> Self {
        let meta = describe(identity, workload);
        let baggage = meta.to_header_value();
        let principal = identity.map(|id| {
            Arc::from(
                id.to_string()
                    .trim_start_matches("spiffe://")
                    .to_string()
                    .as_str(),
            )
        });
        Self {
            meta,
            baggage,
            principal,
        }
    }

    /// The `baggage` header value, shared by every connection.
    pub fn baggage(&self) -> Option<&HeaderValue> {
        self.baggage.as_ref()
    }

    /// The headers of one outbound CONNECT from `src`, traced as `trace`.
    pub fn connect_headers(&self, src: IpAddr, trace: &TraceParent) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(4);
        if let Some(b) = &self.baggage {
            // A reference-count increment: the bytes are shared.
            h.insert(metadata::BAGGAGE, b.clone());
        }
        h.insert(metadata::FORWARDED, metadata::forwarded_for(src));
        h.insert(metadata::TRACEPARENT, trace.to_header_value());
        h
    }
}

/// The local workload, kept current by [`follow`].
pub type LocalWatch = watch::Receiver<Arc<LocalWorkload>>;

/// The source labels of `workload` seen with `identity`: the certificate's namespace is
/// authoritative, and the entry is used only when it is in that namespace.
fn describe(identity: Option<&Identity>, workload: Option<&Workload>) -> Baggage {
    let workload = workload.filter(|w| match identity {
        Some(id) if id.namespace != w.namespace => {
            tracing::debug!(workload = %w.name, namespace = %w.namespace, identity_namespace = %id.namespace,
                "the workload entry is in another namespace than the certificate: not labelling with it");
            false
        }
        _ => true,
    });
    let s = |v: &str| (!v.is_empty()).then(|| Arc::<str>::from(v));
    Baggage {
        cluster_id: workload.and_then(|w| s(&w.cluster_id)),
        namespace: identity
            .map(|id| id.namespace.as_str())
            .or(workload.map(|w| w.namespace.as_str()))
            .and_then(s),
        // Our control plane maps every workload entry to an Istio workload of type pod
        // whose workload name is the entry's name, so ztunnel's key is `k8s.pod.name`.
        workload_type: workload.map(|_| Arc::from("pod")),
        workload_name: workload.and_then(|w| s(&w.name)),
        service_name: workload.and_then(|w| s(&w.canonical_name)),
        service_version: workload.and_then(|w| s(&w.canonical_revision)),
    }
}

/// A watch that never changes from "nothing known" (outbound without a [`follow`] task).
pub fn unknown() -> LocalWatch {
    // The receiver keeps the value after the sender is dropped.
    watch::channel(Arc::new(LocalWorkload::default())).1
}

/// Follows the certificate and the discovery state, rebuilding [`LocalWorkload`] when what it
/// is made of changes. `ip` is the agent's mesh address (`None` when it listens on a wildcard:
/// only the certificate's namespace is known then). Run the future on a background task; it
/// ends when both inputs' senders are gone.
pub fn follow(
    ip: Option<IpAddr>,
    mut state: watch::Receiver<Arc<State>>,
    mut certs: watch::Receiver<CurrentCert>,
) -> (LocalWatch, impl std::future::Future<Output = ()> + Send) {
    let build = move |state: &State, cert: &CurrentCert| {
        let identity = cert.as_ref().map(|c| {
            let id = &c.identity;
            Identity::new(id.trust_domain(), id.namespace(), id.service_account())
        });
        let workload = ip.and_then(|ip| state.workload_by_address(ip));
        LocalWorkload::new(identity.as_ref(), workload.map(|w| &**w))
    };
    let first = build(&state.borrow_and_update(), &certs.borrow_and_update());
    let (tx, rx) = watch::channel(Arc::new(first));
    let task = async move {
        let (mut state_open, mut certs_open) = (true, true);
        while state_open || certs_open {
            tokio::select! {
                r = state.changed(), if state_open => state_open = r.is_ok(),
                r = certs.changed(), if certs_open => certs_open = r.is_ok(),
            }
            let next = build(&state.borrow_and_update(), &certs.borrow_and_update());
            // Discovery changes often; the header changes rarely.
            tx.send_if_modified(|cur| {
                if cur.meta == next.meta && cur.principal == next.principal {
                    return false;
                }
                tracing::debug!(baggage = ?next.baggage, "our workload's description changed");
                *cur = Arc::new(next);
                true
            });
        }
    };
    (rx, task)
}

/// A new trace context for one connection (raw TCP carries none to continue), sampled.
pub fn new_trace() -> TraceParent {
    let mut rng = rand::thread_rng();
    loop {
        // Zero ids are invalid; drawing one is a 2^-64 event, so this loops once.
        if let Some(t) = TraceParent::new(rng.gen(), rng.gen(), metadata::SAMPLED) {
            return t;
        }
    }
}

/// The peer as inbound labels it. The discovery entry at the peer's address wins when its
/// identity is the verified certificate's: a registered peer cannot relabel itself (and mint
/// metric series) by what it writes in `baggage`, and ztunnel too labels by its own state. For
/// a peer discovery does not know, its `baggage` is kept, but dropped whole when its namespace
/// contradicts the verified identity's (a peer may describe itself, not pose as another
/// namespace's workload). Informational either way: only labels and the access log use it.
pub fn peer_source(
    state: &State,
    src: IpAddr,
    baggage: &Baggage,
    peer: Option<&Identity>,
) -> Baggage {
    if let (Some(id), Some(w)) = (peer, state.workload_by_address(src)) {
        if w.identity() == *id {
            return describe(Some(id), Some(w));
        }
    }
    match (&baggage.namespace, peer) {
        (Some(ns), Some(id)) if **ns != *id.namespace => {
            tracing::debug!(baggage_namespace = %ns, identity = ?id,
                "ignoring baggage whose namespace is not the peer certificate's");
            Baggage::default()
        }
        _ => baggage.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_hbone::metadata::StreamMetadata;

    fn workload(ns: &str) -> Workload {
        Workload {
            uid: "Kubernetes//WorkloadEntry/vm-ns/vm-1".into(),
            name: "vm-1".into(),
            namespace: ns.into(),
            addresses: vec!["10.0.0.5".parse().unwrap()],
            hostname: String::new(),
            network: String::new(),
            tunnel: isthmus_xds::client::Tunnel::Hbone,
            trust_domain: "cluster.local".into(),
            service_account: "vm-sa".into(),
            services: Default::default(),
            health: isthmus_xds::client::Health::Healthy,
            cluster_id: "Kubernetes".into(),
            canonical_name: "ratings app".into(),
            canonical_revision: "v1".into(),
            locality: None,
            authorization_policies: Vec::new(),
        }
    }

    #[test]
    fn baggage_describes_our_workload_and_round_trips() {
        let id = Identity::new("cluster.local", "vm-ns", "vm-sa");
        let local = LocalWorkload::new(Some(&id), Some(&workload("vm-ns")));
        let b = local.baggage().unwrap();
        assert_eq!(
            b,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=vm-ns,k8s.pod.name=vm-1,\
             service.name=ratings%20app,service.version=v1"
        );
        let trace = new_trace();
        let h = local.connect_headers("10.0.0.5".parse().unwrap(), &trace);
        let parsed = StreamMetadata::from_headers(&h);
        assert_eq!(parsed.baggage, local.meta);
        assert_eq!(parsed.forwarded_for, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(parsed.traceparent, Some(trace));
    }

    #[test]
    fn without_a_workload_only_the_identitys_namespace_is_said() {
        let id = Identity::new("cluster.local", "vm-ns", "vm-sa");
        let alone = LocalWorkload::new(Some(&id), None);
        assert_eq!(alone.baggage().unwrap(), "k8s.namespace.name=vm-ns");
        // A workload in another namespace is not us.
        let other = LocalWorkload::new(Some(&id), Some(&workload("elsewhere")));
        assert_eq!(other.baggage().unwrap(), "k8s.namespace.name=vm-ns");
        assert!(LocalWorkload::new(None, None).baggage().is_none());
    }

    #[test]
    fn traces_are_new_valid_and_distinct() {
        let a = new_trace();
        let b = new_trace();
        assert_ne!(a.trace_id, b.trace_id);
        for t in [a, b] {
            let v = t.to_header_value();
            let s = v.to_str().unwrap();
            assert_eq!(s.len(), 55);
            assert!(s.starts_with("00-") && s.ends_with("-01"), "{s}");
            assert_ne!(t.trace_id.0, 0);
            assert_ne!(t.parent_id, 0);
            assert_eq!(TraceParent::parse(&v).unwrap(), t);
        }
    }

    #[test]
    fn peer_baggage_contradicting_the_certificate_is_dropped() {
        let b = Baggage {
            namespace: Some("payments".into()),
            workload_name: Some("billing".into()),
            ..Baggage::default()
        };
        let same = Identity::new("cluster.local", "payments", "sa");
        let other = Identity::new("cluster.local", "guest", "sa");
        // A peer discovery does not know: its baggage, unless it contradicts the certificate.
        let (st, ip) = (State::default(), "10.0.0.7".parse().unwrap());
        assert_eq!(peer_source(&st, ip, &b, Some(&same)), b);
        assert_eq!(peer_source(&st, ip, &b, Some(&other)), Baggage::default());
        assert_eq!(peer_source(&st, ip, &b, None), b);
    }
}
