//! Outbound: connections the host's applications make, redirected to 15001. The original
//! destination picks the route: a service VIP → one of its endpoints (HBONE or plain TCP, with
//! failover), a mesh workload's address → straight to it, anything else → passthrough or
//! refusal by setting.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use isthmus_hbone::{HboneClient, HboneError, TraceParent, Upstream};
use isthmus_socket::{ConnLimit, SocketFactory};
use isthmus_xds::client::{Service, State, Tunnel, Workload};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use super::l7::{self, HttpOutbound};
use super::lb::{ConnGuard, LoadTracker};
use super::metadata::{self, LocalWatch, LocalWorkload};
use super::metrics::{Direction, Outcome, ProxyMetrics};
use super::orig_dst::OrigDst;
use super::{splice, AccessRecord};
use isthmus_model::traffic::PortProtocol;

/// What to do with a destination that is neither a service VIP nor a mesh workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownDestination {
    /// Connect to it directly, as if there were no mesh.
    Passthrough,
    /// Close the connection.
    Refuse,
}

#[derive(Clone, Debug)]
pub struct OutboundConfig {
    pub unknown: UnknownDestination,
    /// Port of the peers' HBONE servers (15008; tests use an ephemeral one).
    pub hbone_port: u16,
    /// Endpoints tried for one connection before giving up.
    pub max_attempts: usize,
    /// Bound on a plain TCP connect (HBONE has its own in `ClientOptions`).
    pub connect_timeout: Duration,
    /// Makes the upstream connections; also tells the agent's own connections apart when one
    /// comes back to the listener.
    pub sockets: Arc<SocketFactory>,
    /// Connections served at once (shared by clones of this config).
    pub conn_limit: ConnLimit,
    /// HTTP requests to peer agents that take them go as streams of the HBONE connection
    /// ([`isthmus_hbone::request`]) instead of through CONNECT tunnels.
    pub hbone_requests: bool,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            unknown: UnknownDestination::Passthrough,
            hbone_port: isthmus_hbone::HBONE_PORT,
            max_attempts: 3,
            connect_timeout: Duration::from_secs(10),
            sockets: SocketFactory::unmarked(),
            conn_limit: ConnLimit::unbounded(),
            hbone_requests: false,
        }
    }
}

/// Why an outbound connection got no upstream.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "cannot read the original destination: {0} (is the connection redirected by iptables?)"
    )]
    OrigDst(std::io::Error),
    #[error("destination {0} is this proxy's own listener: refusing a loop")]
    Loop(SocketAddr),
    #[error(
        "the connection comes from the agent itself ({0}): its own traffic was captured \
         (are its uid/gid or mark exempt in the interception rules?); refusing a loop"
    )]
    SelfCaptured(SocketAddr),
    #[error("destination {0} is not a known service or workload and passthrough is off")]
    Unknown(SocketAddr),
    #[error("service {service} has no endpoint serving port {port}")]
    NoEndpoint { service: String, port: u16 },
    #[error("workload {uid} has no address")]
    NoAddress { uid: String },
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error(transparent)]
    Hbone(#[from] HboneError),
    #[error("all {attempts} endpoint(s) tried for {service} failed; last: {last}")]
    Exhausted {
        service: String,
        attempts: usize,
        last: Box<OutboundError>,
    },
}

impl OutboundError {
    fn outcome(&self) -> Outcome {
        match self {
            OutboundError::Hbone(HboneError::Rejected { status, .. })
                if *status == http::StatusCode::FORBIDDEN =>
            {
                Outcome::Denied
            }
            OutboundError::Exhausted { last, .. } => match last.outcome() {
                Outcome::Denied => Outcome::Denied,
                _ => Outcome::Unreachable,
            },
            OutboundError::OrigDst(_)
            | OutboundError::Loop(_)
            | OutboundError::SelfCaptured(_)
            | OutboundError::Unknown(_) => Outcome::Refused,
            _ => Outcome::Unreachable,
        }
    }
}

/// One endpoint to try: where to connect and whom to expect there.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) workload: Arc<Workload>,
    pub(crate) addr: SocketAddr,
    pub(crate) expected: Vec<String>,
}

enum Plan {
    Service {
        service: Arc<Service>,
        targets: Vec<Target>,
    },
    Workload(Target),
    Passthrough,
}

/// The outbound listener's shared parts.
pub struct Outbound {
    config: OutboundConfig,
    state: watch::Receiver<Arc<State>>,
    hbone: HboneClient,
    orig_dst: Arc<dyn OrigDst>,
    lb: Arc<LoadTracker>,
    metrics: Arc<ProxyMetrics>,
    local: LocalWatch,
    /// The HTTP side, for HTTP ports (none: every port is TCP, as before).
    l7: Option<Arc<HttpOutbound>>,
}

/// What one connection's CONNECT says about it (the same on every endpoint tried).
struct Origin {
    src: SocketAddr,
    trace: TraceParent,
    local: Arc<LocalWorkload>,
}

impl Origin {
    fn headers(&self) -> HeaderMap {
        self.local.connect_headers(self.src.ip(), &self.trace)
    }
}

impl Outbound {
    pub fn new(
        config: OutboundConfig,
        state: watch::Receiver<Arc<State>>,
        hbone: HboneClient,
        orig_dst: Arc<dyn OrigDst>,
        lb: Arc<LoadTracker>,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            config,
            state,
            hbone,
            orig_dst,
            lb,
            metrics,
            local: metadata::unknown(),
            l7: None,
        }
    }

    /// Serves HTTP ports (declared, or sniffed on undeclared ones) per request through `l7`.
    pub fn with_http(mut self, l7: Arc<HttpOutbound>) -> Self {
        self.l7 = Some(l7);
        self
    }

    /// Describes the source to peers (`baggage`) and in outbound metrics with this
    /// workload (see [`metadata::follow`]); without it, only `forwarded` and `traceparent`
    /// are sent.
    pub fn with_local(mut self, local: LocalWatch) -> Self {
        self.local = local;
        self
    }

    /// Serves `listener` until the returned future is dropped (which closes every connection).
    pub async fn serve(self, listener: TcpListener) {
        let (_never, drain) = tokio::sync::watch::channel(None);
        self.serve_until(listener, drain).await
    }

    /// Serves `listener` until `drain` fires, then stops accepting and lets open connections
    /// finish for up to the deadline it carries.
    pub async fn serve_until(
        self,
        listener: impl Into<isthmus_socket::Listener>,
        drain: super::drain::DrainSignal,
    ) {
        let this = Arc::new(self);
        let listener = listener.into();
        let local = listener.local_addr().ok();
        let limit = this.config.conn_limit.clone();
        super::drain::serve(listener, "outbound", drain, limit, move |tcp, src| {
            let this = this.clone();
            let span = tracing::debug_span!("outbound", %src);
            async move { this.handle(tcp, src, local).await }.instrument(span)
        })
        .await
    }

    async fn handle(&self, mut client: TcpStream, src: SocketAddr, local: Option<SocketAddr>) {
        let start = Instant::now();
        if self.config.sockets.is_own(src) {
            // Refused before anything else: re-proxying it would open another of our own
            // connections, captured again, and so on until descriptors run out.
            let e = OutboundError::SelfCaptured(src);
            isthmus_socket::warn_limited!(("loop", "outbound"), error = %e, "refusing a connection");
            let rec = AccessRecord::new(Direction::Outbound, src);
            rec.finish(&self.metrics, e.outcome(), &e.to_string(), start, false);
            return;
        }
        let _ = client.set_nodelay(true);
        let mut rec = AccessRecord::new(Direction::Outbound, src);
        let origin = Origin {
            src,
            trace: metadata::new_trace(),
            local: self.local.borrow().clone(),
        };
        rec.trace = Some(origin.trace);
        rec.source = origin.local.meta.clone();
        let dst = match self.orig_dst.original_dst(&client) {
            Ok(d) => d,
            Err(e) => {
                let e = OutboundError::OrigDst(e);
                rec.finish(&self.metrics, e.outcome(), &e.to_string(), start, false);
                return;
            }
        };
        rec.dst = Some(dst);
        if let Some(l7) = &self.l7 {
            let state = self.state.borrow().clone();
            if let Some(service) = state.service_by_vip(dst).cloned() {
                let http = match l7.protocol(&state, &service, dst.port()) {
                    PortProtocol::Tcp => false,
                    // Undeclared: HTTP only if its first bytes say so soon enough.
                    PortProtocol::Undeclared => {
                        l7::detect(&client, Some(l7::DETECTION_TIMEOUT)).await != l7::Sniffed::Other
                    }
                    // Declared HTTP: still bytes only if they are not HTTP.
                    _ => l7::detect(&client, None).await != l7::Sniffed::Other,
                };
                if http {
                    rec.service = Some(service.hostname.clone());
                    self.metrics.opened(Direction::Outbound);
                    l7.clone().serve(client, src, dst, service).await;
                    rec.finish(&self.metrics, Outcome::Ok, "closed (http)", start, true);
                    return;
                }
            }
        }
        let opened = self.open(dst, local, &origin, &mut rec).await;
        let (mut upstream, _guard) = match opened {
            Ok(u) => u,
            Err(e) => {
                match &e {
                    OutboundError::Loop(_) => isthmus_socket::warn_limited!(
                        ("loop", "outbound-listener"), error = %e, "refusing a connection"),
                    OutboundError::OrigDst(_) | OutboundError::Unknown(_) => {}
                    _ => isthmus_socket::warn_limited!(
                        ("connect", "outbound"), error = %e, "no upstream for a connection"),
                }
                rec.finish(&self.metrics, e.outcome(), &e.to_string(), start, false);
                return;
            }
        };
        self.metrics.opened(Direction::Outbound);
        let (outcome, reason) = splice(&mut client, &mut upstream, &mut rec).await;
        rec.finish(&self.metrics, outcome, &reason, start, true);
    }

    /// Resolves `dst` and connects to an upstream for it.
    async fn open(
        &self,
        dst: SocketAddr,
        local: Option<SocketAddr>,
        origin: &Origin,
        rec: &mut AccessRecord,
    ) -> Result<(Box<dyn Upstream>, Option<ConnGuard>), OutboundError> {
        if Some(dst) == local || (dst.port() == local.map_or(0, |l| l.port()) && is_local(dst.ip()))
        {
            return Err(OutboundError::Loop(dst));
        }
        let plan = self.plan(dst)?;
        match plan {
            Plan::Passthrough => {
                rec.endpoint = Some(dst);
                Ok((Box::new(self.connect_plain(dst).await?), None))
            }
            Plan::Workload(t) => {
                rec.endpoint = Some(t.addr);
                rec.identity = t.expected.first().cloned();
                let guard = self.lb.acquire(&t.workload.uid);
                Ok((self.connect(&t, origin).await?, Some(guard)))
            }
            Plan::Service { service, targets } => {
                rec.service = Some(service.hostname.clone());
                self.connect_service(&service, targets, dst.port(), origin, rec)
                    .await
            }
        }
    }

    fn plan(&self, dst: SocketAddr) -> Result<Plan, OutboundError> {
        // A snapshot: the route is fixed for this connection even if the state changes.
        let state = self.state.borrow().clone();
        if let Some(service) = state.service_by_vip(dst) {
            let key = service.key();
            let targets = state
                .endpoints(&key)
                .iter()
                .filter_map(|w| service_target(service, &key, w, dst.port()))
                .collect();
            return Ok(Plan::Service {
                service: service.clone(),
                targets,
            });
        }
        if let Some(w) = state.workload_by_address(dst.ip()) {
            return Ok(Plan::Workload(Target {
                workload: w.clone(),
                addr: dst,
                expected: vec![w.identity().to_string()],
            }));
        }
        match self.config.unknown {
            UnknownDestination::Passthrough => Ok(Plan::Passthrough),
            UnknownDestination::Refuse => Err(OutboundError::Unknown(dst)),
        }
    }

    async fn connect_service(
        &self,
        service: &Service,
        mut targets: Vec<Target>,
        port: u16,
        origin: &Origin,
        rec: &mut AccessRecord,
    ) -> Result<(Box<dyn Upstream>, Option<ConnGuard>), OutboundError> {
        let mut attempts = 0;
        let mut last = None;
        while attempts < self.config.max_attempts.max(1) {
            let workloads: Vec<Arc<Workload>> =
                targets.iter().map(|t| t.workload.clone()).collect();
            let Some(uid) = self
                .lb
                .pick(&workloads, &mut rand::thread_rng())
                .map(|w| w.uid.clone())
            else {
                break;
            };
            let Some(i) = targets.iter().position(|t| t.workload.uid == uid) else {
                break;
            };
            let t = targets.swap_remove(i);
            attempts += 1;
            let guard = self.lb.acquire(&t.workload.uid);
            rec.endpoint = Some(t.addr);
            rec.identity = t.expected.first().cloned();
            match self.connect(&t, origin).await {
                Ok(u) => return Ok((u, Some(guard))),
                Err(e) => {
                    isthmus_socket::warn_limited!(("endpoint", "outbound"),
                        service = %service.hostname, endpoint = %t.addr, error = %e,
                        "endpoint failed, trying another");
                    // A policy refusal is an answer, not a failure to fail over from.
                    if e.outcome() == Outcome::Denied {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        match last {
            None => Err(OutboundError::NoEndpoint {
                service: service.hostname.clone(),
                port,
            }),
            Some(last) => Err(OutboundError::Exhausted {
                service: service.hostname.clone(),
                attempts,
                last: Box::new(last),
            }),
        }
    }

    async fn connect(
        &self,
        t: &Target,
        origin: &Origin,
    ) -> Result<Box<dyn Upstream>, OutboundError> {
        match t.workload.tunnel {
            Tunnel::Hbone => {
                let hbone = SocketAddr::new(t.addr.ip(), self.config.hbone_port);
                let s = self
                    .hbone
                    .connect(hbone, t.addr, &t.expected, &origin.headers())
                    .await?;
                Ok(Box::new(s))
            }
            Tunnel::None => Ok(Box::new(self.connect_plain(t.addr).await?)),
        }
    }

    async fn connect_plain(&self, addr: SocketAddr) -> Result<TcpStream, OutboundError> {
        let timeout = self.config.connect_timeout;
        match tokio::time::timeout(timeout, self.config.sockets.connect(addr)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(OutboundError::Connect { addr, source }),
            Err(_) => Err(OutboundError::Timeout { addr, timeout }),
        }
    }
}

/// The endpoint address and expected identities of `w` for `service`'s port `port`; `None`
/// when it has no address or does not serve that port.
pub(crate) fn service_target(
    service: &Service,
    key: &str,
    w: &Arc<Workload>,
    port: u16,
) -> Option<Target> {
    let ip = *w.addresses.first()?;
    let target_port = target_port(service, key, w, port)?;
    let expected = if service.subject_alt_names.is_empty() {
        vec![w.identity().to_string()]
    } else {
        service.subject_alt_names.clone()
    };
    Some(Target {
        workload: w.clone(),
        addr: SocketAddr::new(ip, target_port),
        expected,
    })
}

/// The port of workload `w` that `service`'s port `port` goes to, if `w` serves it at an
/// address ([`service_target`] without building the target).
pub(crate) fn target_port(service: &Service, key: &str, w: &Workload, port: u16) -> Option<u16> {
    w.addresses.first()?;
    w.services
        .get(key)
        .and_then(|ports| ports.iter().find(|p| p.service_port == port))
        .or_else(|| service.ports.iter().find(|p| p.service_port == port))
        .map(|p| p.target_port)
}

/// Addresses that reach this host's own listener when it is bound to a wildcard.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified()
}
