//! The data path: outbound capture (15001) to service endpoints over HBONE or plain TCP,
//! inbound HBONE (15008) and plaintext capture (15006) to the local workload, with Istio L4
//! authorization enforced inbound and re-checked when policies change.
//!
//! - [`outbound`]: original destination → service → endpoint ([`lb`]) → upstream.
//! - [`inbound`]: the HBONE server's [`isthmus_hbone::InboundHandler`] and the plaintext
//!   listener, both deciding with [`authz`].
//! - [`metadata`]: the CONNECT's `baggage`/`forwarded`/`traceparent`, sent outbound and read
//!   inbound (for labels and the access log only, never for authorization).
//! - OS side effects sit behind [`orig_dst::OrigDst`], so tests run without root.
//!
//! Access-log lines go to the tracing target [`ACCESS_LOG_TARGET`].

pub mod authz;
pub mod drain;
pub mod inbound;
pub mod l7;
pub mod lb;
pub mod metadata;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_hbone::{
    Baggage, ClientOptions, Credentials, CredentialsWatch, HboneClient, HboneServer, OrDash,
    ServerError, ServerHandle, ServerOptions, TraceParent, Upstream,
};
use isthmus_socket::{ConnLimit, SocketFactory};
use isthmus_xds::client::State;
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::identity::{CurrentCert, WorkloadCertificate};
pub use inbound::{InboundConfig, InboundPolicy, PlaintextInbound, PlaintextMode};
pub use lb::LoadTracker;
pub use metrics::{Direction, Outcome, ProxyMetrics};
pub use orig_dst::{OrigDst, SoOriginalDst};
pub use outbound::{Outbound, OutboundConfig, UnknownDestination};

/// Tracing target of the per-connection access log.
pub const ACCESS_LOG_TARGET: &str = "access";

/// Where the proxy listens and how it behaves.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Outbound capture (iptables REDIRECT target), normally `127.0.0.1:15001`.
    pub outbound_addr: SocketAddr,
    /// Plaintext inbound capture, normally `0.0.0.0:15006`.
    pub inbound_plaintext_addr: SocketAddr,
    /// HBONE, normally `<workload ip>:15008`.
    pub hbone_addr: SocketAddr,
    pub outbound: OutboundConfig,
    pub inbound: InboundConfig,
    pub plaintext_mode: PlaintextMode,
    pub hbone_client: ClientOptions,
    pub hbone_server: ServerOptions,
    /// Makes every socket the proxy opens (upstreams, HBONE, the local app); [`start`] hands it
    /// to the parts above.
    pub sockets: Arc<SocketFactory>,
    /// Connections each listener (outbound, plaintext inbound, HBONE) serves at once.
    pub max_connections_per_listener: usize,
    /// Which shard of the proxy this is (one per data-plane thread, [`Shared::sharded`]).
    /// With several, each binds the ports with `SO_REUSEPORT` and the connections are spread
    /// over them exactly ([`isthmus_socket::Balance`]).
    pub shard: usize,
}

impl ProxyConfig {
    /// Istio's ports on the given workload address.
    pub fn new(workload_ip: std::net::IpAddr) -> Self {
        Self {
            outbound_addr: SocketAddr::from(([127, 0, 0, 1], 15001)),
            inbound_plaintext_addr: SocketAddr::from(([0, 0, 0, 0], 15006)),
            hbone_addr: SocketAddr::new(workload_ip, isthmus_hbone::HBONE_PORT),
            outbound: OutboundConfig::default(),
            inbound: InboundConfig::default(),
            plaintext_mode: PlaintextMode::Permissive,
            hbone_client: ClientOptions::default(),
            hbone_server: ServerOptions::default(),
            sockets: SocketFactory::unmarked(),
            max_connections_per_listener: usize::MAX,
            shard: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "cannot listen for {what} on {addr}: {source} (is another agent already bound to it?)"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Hbone(#[from] ServerError),
    #[error("workload certificate from the identity manager is unusable: {0}")]
    BadCertificate(String),
}

/// The running proxy. Dropping it stops the listeners.
pub struct Proxy {
    outbound_addr: SocketAddr,
    plaintext_addr: SocketAddr,
    hbone: ServerHandle,
    /// The outbound and plaintext listeners (they end after draining).
    serving: JoinSet<()>,
    drain: drain::DrainSender,
    /// Background work (credentials, policy re-checks) stopped after the drain.
    tasks: JoinSet<()>,
    metrics: Arc<ProxyMetrics>,
}

impl Proxy {
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    pub fn inbound_plaintext_addr(&self) -> SocketAddr {
        self.plaintext_addr
    }

    pub fn hbone_addr(&self) -> SocketAddr {
        self.hbone.local_addr()
    }

    pub fn metrics(&self) -> Arc<ProxyMetrics> {
        self.metrics.clone()
    }

    /// Stops accepting on every listener at once, lets open connections and HBONE streams
    /// finish for up to `deadline`, then closes the rest.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.drain.send_replace(Some(deadline));
        let listeners = async { while self.serving.join_next().await.is_some() {} };
        tokio::join!(listeners, self.hbone.shutdown(deadline));
        self.tasks.shutdown().await;
    }
}

/// What the shards of one proxy share, whatever thread they run on: the metrics and the
/// connection limits of each listener (a limit counts the connections of every shard).
pub struct Shared {
    metrics: Arc<ProxyMetrics>,
    istio: Arc<l7::telemetry::IstioMetrics>,
    outbound_limit: ConnLimit,
    inbound_limit: ConnLimit,
    plaintext_limit: ConnLimit,
    /// With several shards: each listener's balance, indexed by [`Port`].
    balance: Option<[Arc<isthmus_socket::Balance>; 3]>,
}

impl Shared {
    /// Registers the proxy's metrics in `registry` (pass the agent's sub-registry); Istio's
    /// request metrics are registered apart, without a prefix ([`Shared::istio_metrics`]).
    pub fn new(max_connections_per_listener: usize, registry: &mut Registry) -> Self {
        let metrics = Arc::new(ProxyMetrics::default());
        metrics.register(registry);
        let limit = |direction: Direction| {
            let refused = metrics
                .over_limit
                .get_or_create(&metrics::DirLabels { direction })
                .clone();
            ConnLimit::new(max_connections_per_listener).on_refuse(move || {
                refused.inc();
            })
        };
        Self {
            outbound_limit: limit(Direction::Outbound),
            inbound_limit: limit(Direction::Inbound),
            plaintext_limit: limit(Direction::InboundPlaintext),
            metrics,
            istio: Arc::default(),
            balance: None,
        }
    }

    /// For `shards` shards of the proxy: each listener's connections are balanced over them.
    pub fn sharded(mut self, shards: usize) -> Self {
        self.balance = (shards > 1).then(|| [(); 3].map(|()| isthmus_socket::Balance::new(shards)));
        self
    }

    /// Istio's request metrics (`istio_requests_total`, ...): register them in a registry
    /// without a prefix.
    pub fn istio_metrics(&self) -> Arc<l7::telemetry::IstioMetrics> {
        self.istio.clone()
    }
}

/// Binds the three listeners and starts serving on the current runtime (the data-plane one).
/// `state` is the discovery state; `certs` the identity manager's certificate watch. Metrics
/// are registered in `registry` (pass the agent's sub-registry).
pub async fn start(
    config: ProxyConfig,
    state: watch::Receiver<Arc<State>>,
    certs: watch::Receiver<CurrentCert>,
    registry: &mut Registry,
) -> Result<Proxy, ProxyError> {
    let shared = Shared::new(config.max_connections_per_listener, registry);
    start_shard(config, state, certs, &shared).await
}

/// The listeners of a shard, as indices of [`Shared`]'s balances.
#[derive(Clone, Copy)]
enum Port {
    Outbound,
    Plaintext,
    Hbone,
}

/// A listening socket as `TcpListener::bind` makes it (`SO_REUSEADDR`, a backlog of 1024),
/// plus `SO_REUSEPORT` and the shard's share of `balance` when several shards share the port.
fn listen(
    addr: SocketAddr,
    balance: Option<(&Arc<isthmus_socket::Balance>, usize)>,
) -> std::io::Result<isthmus_socket::Listener> {
    let reuse_port = balance.is_some();
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    match balance {
        Some((b, shard)) => b.listener(shard, listener),
        None => Ok(listener.into()),
    }
}

/// One shard of the proxy: its own listeners (on the ports of the others when
/// [`ProxyConfig::shard`]), HBONE connection pool and upstream pools, on the current
/// runtime; what is in `shared` is counted together with the other shards.
pub async fn start_shard(
    mut config: ProxyConfig,
    state: watch::Receiver<Arc<State>>,
    certs: watch::Receiver<CurrentCert>,
    shared: &Shared,
) -> Result<Proxy, ProxyError> {
    let bind = |what: &'static str, addr: SocketAddr, port: Port| {
        let balance = shared
            .balance
            .as_ref()
            .map(|b| (&b[port as usize], config.shard));
        listen(addr, balance).map_err(|source| ProxyError::Bind { what, addr, source })
    };
    let outbound_l = bind("outbound capture", config.outbound_addr, Port::Outbound)?;
    let plaintext_l = bind(
        "inbound plaintext capture",
        config.inbound_plaintext_addr,
        Port::Plaintext,
    )?;
    let hbone_l = bind("HBONE", config.hbone_addr, Port::Hbone)?;
    let local = |l: &isthmus_socket::Listener, addr: SocketAddr| {
        l.local_addr().map_err(|source| ProxyError::Bind {
            what: "local address",
            addr,
            source,
        })
    };
    let outbound_addr = local(&outbound_l, config.outbound_addr)?;
    let plaintext_addr = local(&plaintext_l, config.inbound_plaintext_addr)?;

    let metrics = shared.metrics.clone();
    config.outbound.sockets = config.sockets.clone();
    config.outbound.conn_limit = shared.outbound_limit.clone();
    config.inbound.sockets = config.sockets.clone();
    config.hbone_client.sockets = config.sockets.clone();
    config.hbone_server.conn_limit = shared.inbound_limit.clone();
    let plaintext_limit = shared.plaintext_limit.clone();
    let mut tasks = JoinSet::new();
    let certs_for_local = certs.clone();
    let creds = credentials_watch(certs, &mut tasks);

    let istio = shared.istio.clone();
    let policy = InboundPolicy::new(config.inbound.clone(), state.clone(), metrics.clone())
        .with_http(istio.clone());
    tasks.spawn(policy.clone().revalidate_on_change());
    let hbone = HboneServer::from_listener(
        hbone_l,
        creds.clone(),
        policy.clone(),
        config.hbone_server.clone(),
    )
    .spawn()?;

    // Our own workload is the one at the HBONE listener's address (the mesh IP).
    let own_ip = Some(config.hbone_addr.ip()).filter(|ip| !ip.is_unspecified());
    let (local, follow) = metadata::follow(own_ip, state.clone(), certs_for_local);
    tasks.spawn(follow);
    let orig_dst: Arc<dyn OrigDst> = Arc::new(SoOriginalDst);
    let hbone_client = HboneClient::new(creds, config.hbone_client.clone());
    let http = Arc::new(l7::HttpOutbound::new(
        state.clone(),
        l7::pool::UpstreamPool::new(
            hbone_client.clone(),
            config.outbound.hbone_port,
            config.sockets.clone(),
            config.outbound.connect_timeout,
            config.outbound.hbone_requests,
        ),
        istio.clone(),
        local.clone(),
    ));
    let outbound = Outbound::new(
        config.outbound.clone(),
        state,
        hbone_client,
        orig_dst.clone(),
        Arc::new(LoadTracker::default()),
        metrics.clone(),
    )
    .with_local(local)
    .with_http(http);
    let (drain, drain_rx) = watch::channel(None);
    let mut serving = JoinSet::new();
    serving.spawn(outbound.serve_until(outbound_l, drain_rx.clone()));
    let plaintext = PlaintextInbound::new(config.plaintext_mode, orig_dst, policy)
        .with_conn_limit(plaintext_limit);
    serving.spawn(plaintext.serve_until(plaintext_l, drain_rx));
    Ok(Proxy {
        outbound_addr,
        plaintext_addr,
        hbone,
        serving,
        drain,
        tasks,
        metrics,
    })
}

/// Converts the identity manager's PEM certificate into HBONE credentials.
pub fn credentials(cert: &WorkloadCertificate) -> Result<Credentials, ProxyError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| ProxyError::BadCertificate(format!("{what}: {e}"));
    let cert_chain = CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("certificate chain", &e))?;
    let roots = CertificateDer::pem_slice_iter(cert.roots_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("roots", &e))?;
    let private_key =
        PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).map_err(|e| bad("key", &e))?;
    if cert_chain.is_empty() || roots.is_empty() {
        return Err(ProxyError::BadCertificate(
            "empty certificate chain or roots".into(),
        ));
    }
    Ok(Credentials {
        cert_chain,
        private_key,
        roots,
        trust_domain: cert.identity.trust_domain().to_owned(),
    })
}

/// Follows the identity manager's watch with converted credentials. A certificate that does
/// not convert keeps the previous credentials in place.
fn credentials_watch(
    mut certs: watch::Receiver<CurrentCert>,
    tasks: &mut JoinSet<()>,
) -> CredentialsWatch {
    let (tx, rx) = watch::channel(None);
    tasks.spawn(async move {
        loop {
            let current = certs.borrow_and_update().clone();
            if let Some(cert) = current {
                match credentials(&cert) {
                    Ok(c) => {
                        tx.send_replace(Some(Arc::new(c)));
                    }
                    Err(e) => tracing::error!(error = %e, "keeping the previous credentials"),
                }
            }
            if certs.changed().await.is_err() {
                return;
            }
        }
    });
    rx
}

/// The facts of one connection, written once to the access log when it ends.
#[derive(Clone, Debug)]
pub(crate) struct AccessRecord {
    pub direction: Direction,
    pub src: SocketAddr,
    pub dst: Option<SocketAddr>,
    pub service: Option<String>,
    pub endpoint: Option<SocketAddr>,
    /// The peer's identity: verified inbound, expected outbound.
    pub identity: Option<String>,
    /// The source workload: ours outbound, the peer's `baggage` inbound (informational).
    pub source: Baggage,
    /// Inbound: the original client address the peer's `forwarded` header names
    /// (informational; `src` is the verified TCP peer).
    pub forwarded_for: Option<IpAddr>,
    /// The connection's trace context: made outbound, the peer's inbound.
    pub trace: Option<TraceParent>,
    pub sent: u64,
    pub received: u64,
}

impl AccessRecord {
    pub fn new(direction: Direction, src: SocketAddr) -> Self {
        Self {
            direction,
            src,
            dst: None,
            service: None,
            endpoint: None,
            identity: None,
            source: Baggage::default(),
            forwarded_for: None,
            trace: None,
            sent: 0,
            received: 0,
        }
    }

    pub fn finish(
        &self,
        metrics: &ProxyMetrics,
        outcome: Outcome,
        reason: &str,
        start: Instant,
        was_open: bool,
    ) {
        let src = &self.source;
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            direction = self.direction.as_str(),
            src = %self.src,
            original_src = %OrDash(self.forwarded_for),
            dst = %OrDash(self.dst),
            service = %OrDash(self.service.as_deref()),
            endpoint = %OrDash(self.endpoint),
            identity = %OrDash(self.identity.as_deref()),
            // Recorded as strings, so the text line quotes and escapes them as it does
            // `reason`: a peer chose them (its baggage), and a space or a quote in one must not
            // pass for another field.
            src_workload = src.workload_name.as_deref().unwrap_or("-"),
            src_namespace = src.namespace.as_deref().unwrap_or("-"),
            src_service = src.service_name.as_deref().unwrap_or("-"),
            trace_id = %OrDash(self.trace.map(|t| t.trace_id)),
            bytes_sent = self.sent,
            bytes_received = self.received,
            duration_ms = start.elapsed().as_millis() as u64,
            result = outcome.as_str(),
            reason,
            "connection closed"
        );
        metrics.closed(self, outcome, was_open);
    }
}

/// Copies both ways with half-close; fills in the byte counts (`sent`: `a` → `b`, `received`:
/// `b` → `a`).
pub(crate) async fn splice<A, B>(a: &mut A, b: &mut B, rec: &mut AccessRecord) -> (Outcome, String)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: Upstream + ?Sized,
{
    // Buffers of 8 KiB that grow to 64 KiB under bulk: a fixed 8 KiB makes every bulk byte cost
    // eight times the syscalls and HTTP/2 DATA frames on the tunnel side, a fixed 64 KiB costs
    // every quiet connection 128 KiB.
    let copied = match b.as_hbone() {
        // An HBONE upstream takes `a`'s bytes as read and hands back h2's own buffers, sparing
        // a copy each way; it counts (tunnel → socket, socket → tunnel).
        Some(tunnel) => isthmus_hbone::splice_tunnel(tunnel, a)
            .await
            .map(|(received, sent)| (sent, received)),
        None => isthmus_hbone::copy_bidirectional(a, b).await,
    };
    match copied {
        Ok((sent, received)) => {
            rec.sent = sent;
            rec.received = received;
            (Outcome::Ok, "closed".into())
        }
        Err(e) => (Outcome::Error, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn cert(key_pem: String, chain_pem: String, roots_pem: String) -> WorkloadCertificate {
        WorkloadCertificate {
            identity: "spiffe://example.org/ns/a/sa/b".parse().unwrap(),
            key_pem,
            chain_pem,
            roots_pem,
            not_before: SystemTime::now(),
            not_after: SystemTime::now(),
        }
    }

    #[test]
    fn pem_certificate_converts_to_credentials() {
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let c = credentials(&cert(key.serialize_pem(), leaf.pem(), leaf.pem())).unwrap();
        assert_eq!(c.cert_chain.len(), 1);
        assert_eq!(c.roots.len(), 1);
        assert_eq!(c.trust_domain, "example.org");

        let err = credentials(&cert(key.serialize_pem(), String::new(), leaf.pem())).unwrap_err();
        assert!(err.to_string().contains("empty certificate chain"), "{err}");
        let err = credentials(&cert("junk".into(), leaf.pem(), leaf.pem())).unwrap_err();
        assert!(err.to_string().contains("key"), "{err}");
    }
}
