//! Inbound: HBONE streams (through [`InboundPolicy`], the HBONE server's handler) and
//! plaintext connections redirected to 15006 ([`PlaintextInbound`]), both authorized against
//! the local workload's policies. Every admitted connection is registered; when the discovery
//! state changes, each is re-authorized and the ones no longer allowed are closed.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::StatusCode;
use isthmus_hbone::{Decision, InboundHandler, InboundRequest};
use isthmus_socket::{ConnLimit, SocketFactory};
use isthmus_xds::client::State;
use isthmus_xds::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use super::authz::{self, Connection, Verdict};
use super::metadata;
use super::metrics::{Direction, Outcome, ProxyMetrics};
use super::orig_dst::OrigDst;
use super::{splice, AccessRecord};

#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// Accept any port, not only the target ports of the local workload's services.
    pub any_port: bool,
    /// Bound on connecting to the local application.
    pub connect_timeout: Duration,
    /// Makes the connections to the local application.
    pub sockets: Arc<SocketFactory>,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            any_port: false,
            connect_timeout: Duration::from_secs(10),
            sockets: SocketFactory::unmarked(),
        }
    }
}

/// What the plaintext listener (15006) does with connections that did not come over HBONE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaintextMode {
    /// Forward to the original destination (after authorization without a peer identity).
    Permissive,
    /// Refuse: only mTLS (HBONE) reaches the workload.
    Strict,
}

/// Why a connection is not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    status: StatusCode,
    outcome: Outcome,
    reason: String,
}

impl Refusal {
    fn unreachable(reason: String) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            outcome: Outcome::Unreachable,
            reason,
        }
    }
}

/// The inbound decision maker, shared by the HBONE server and the plaintext listener.
#[derive(Clone)]
pub struct InboundPolicy {
    inner: Arc<Inner>,
}

struct Inner {
    config: InboundConfig,
    state: watch::Receiver<Arc<State>>,
    metrics: Arc<ProxyMetrics>,
    /// Set: HTTP ports are served per request (authorization, metrics) with these metrics.
    http: Option<Arc<super::l7::telemetry::IstioMetrics>>,
    live: Mutex<HashMap<u64, Arc<Live>>>,
    next_id: AtomicU64,
    /// Connections to the local application for requests that came directly on HBONE
    /// (a tunnel has its own).
    app_conns: super::l7::pool::HttpConns,
    /// Metric series of direct requests, per peer address and identity.
    direct_series: Mutex<HashMap<std::net::IpAddr, PeerSeries>>,
}

/// The metric series of one address's peers, by identity.
type PeerSeries = Vec<(String, Arc<super::l7::inbound::Series>)>;

/// Peers whose direct requests' metric series are kept; past it the cache starts again.
const MAX_DIRECT_PEERS: usize = 1024;

/// One admitted connection as re-authorization sees it.
struct Live {
    conn: Connection,
    /// Authorized per request (an HTTP port): nothing to re-check for the connection.
    per_request: bool,
    revoked: AtomicBool,
    reason: Mutex<String>,
    /// Tasks blocked reading or writing, woken on revocation.
    wakers: Mutex<[Option<Waker>; 2]>,
}

impl Live {
    fn revoke(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = reason;
        self.revoked.store(true, Ordering::Release);
        let wakers =
            std::mem::take(&mut *self.wakers.lock().unwrap_or_else(PoisonError::into_inner));
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }

    /// `Err` once revoked; otherwise remembers the waker in `slot` (0 read, 1 write).
    fn check(&self, cx: &Context<'_>, slot: usize) -> io::Result<()> {
        if !self.revoked.load(Ordering::Acquire) {
            let mut w = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
            // Polled on every read and write of the connection: keep the stored waker when it
            // is the same task's (a clone is two atomic operations and a drop).
            if !w[slot]
                .as_ref()
                .is_some_and(|old| old.will_wake(cx.waker()))
            {
                w[slot] = Some(cx.waker().clone());
            }
        }
        // Checked again after registering, so a revocation in between is not missed.
        if self.revoked.load(Ordering::Acquire) {
            let reason = self
                .reason
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("closed by a policy change: {reason}"),
            ));
        }
        Ok(())
    }
}

impl InboundPolicy {
    pub fn new(
        config: InboundConfig,
        state: watch::Receiver<Arc<State>>,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                state,
                metrics,
                http: None,
                live: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                app_conns: Default::default(),
                direct_series: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Serves the local workload's HTTP ports request by request: AuthorizationPolicies
    /// with methods, paths, hosts and `when` conditions, and Istio's request metrics with
    /// `reporter="destination"` into `metrics`. Call before sharing the policy.
    pub fn with_http(mut self, metrics: Arc<super::l7::telemetry::IstioMetrics>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.http = Some(metrics);
        }
        self
    }

    /// Admitted connections still open.
    pub fn live_connections(&self) -> usize {
        self.lock_live().len()
    }

    /// Re-authorizes every live connection against the current state, closing the ones no
    /// longer allowed; returns how many were closed.
    pub fn revalidate(&self) -> usize {
        let state = self.inner.state.borrow().clone();
        let live: Vec<Arc<Live>> = self.lock_live().values().cloned().collect();
        let mut closed = 0;
        for l in live {
            if l.revoked.load(Ordering::Acquire) || l.per_request {
                continue;
            }
            if let Err(r) = self.check(&state, &l.conn, false) {
                tracing::info!(src = %l.conn.src, dst = %l.conn.dst, reason = %r.reason,
                    "closing a connection the current policy no longer allows");
                l.revoke(r.reason);
                closed += 1;
            }
        }
        closed
    }

    /// Runs [`Self::revalidate`] on every state change, until the state's sender is gone.
    pub async fn revalidate_on_change(self) {
        let mut rx = self.inner.state.clone();
        rx.mark_unchanged();
        while rx.changed().await.is_ok() {
            self.revalidate();
        }
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Live>>> {
        // Entries are independent; a panic elsewhere cannot leave the map inconsistent.
        self.inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Authorizes `conn` against the local workload at `conn.dst` (`per_request`: only that
    /// the workload serves the port; its policies are checked on each request).
    fn check(
        &self,
        state: &State,
        conn: &Connection,
        per_request: bool,
    ) -> Result<String, Refusal> {
        let Some(w) = state.workload_by_address(conn.dst.ip()) else {
            return Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                outcome: Outcome::Refused,
                reason: format!(
                    "no workload at {} in this agent's discovery state",
                    conn.dst.ip()
                ),
            });
        };
        let port = conn.dst.port();
        let serves = w.services.values().flatten().any(|p| p.target_port == port);
        if !self.inner.config.any_port && !serves {
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                outcome: Outcome::Refused,
                reason: format!("workload {} serves no port {port}", w.name),
            });
        }
        if per_request {
            return Ok("authorized per request".into());
        }
        match authz::authorize(state, w, conn) {
            Verdict::Allow(r) => Ok(r),
            Verdict::Deny(reason) => Err(Refusal {
                status: StatusCode::FORBIDDEN,
                outcome: Outcome::Denied,
                reason,
            }),
        }
    }

    /// Authorizes against `state` (the discovery state the caller read), connects to the local
    /// application and registers the connection.
    async fn admit(
        &self,
        state: Arc<State>,
        conn: Connection,
        rec: AccessRecord,
        start: Instant,
        per_request: bool,
    ) -> Result<Tracked, Refusal> {
        let metrics = &self.inner.metrics;
        if let Err(r) = self.check(&state, &conn, per_request) {
            rec.finish(metrics, r.outcome, &r.reason, start, false);
            return Err(r);
        }
        let timeout = self.inner.config.connect_timeout;
        let connect = self.inner.config.sockets.connect(conn.dst);
        let app = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = isthmus_hbone::connect_failure(conn.dst, &e);
                isthmus_socket::warn_limited!(
                    ("connect", "inbound"),
                    reason,
                    "cannot reach the local app"
                );
                rec.finish(metrics, Outcome::Unreachable, &reason, start, false);
                return Err(Refusal::unreachable(reason));
            }
            Err(_) => {
                let reason = format!(
                    "connecting to the local app at {} timed out after {timeout:?}",
                    conn.dst
                );
                rec.finish(metrics, Outcome::Unreachable, &reason, start, false);
                return Err(Refusal::unreachable(reason));
            }
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let live = Arc::new(Live {
            conn,
            per_request,
            revoked: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
            wakers: Mutex::new([None, None]),
        });
        self.lock_live().insert(id, live.clone());
        metrics.opened(rec.direction);
        Ok(Tracked {
            app,
            live,
            id,
            policy: self.clone(),
            rec,
            start,
            failed: None,
        })
    }
}

impl InboundHandler for InboundPolicy {
    /// Ports are checked in `decide`, where the target address names the workload and the
    /// refusal gets a reason in the access log.
    fn port_allowed(&self, _port: u16) -> bool {
        true
    }

    async fn decide(&self, request: &InboundRequest) -> Decision {
        let start = Instant::now();
        let mut rec = AccessRecord::new(Direction::Inbound, request.peer_addr);
        rec.dst = Some(request.target);
        rec.endpoint = Some(request.target);
        rec.identity = Some(request.peer_identity.clone());
        // Authorization sees only what was verified: the certificate's identity and the TCP
        // peer's address. The CONNECT's baggage, forwarded and traceparent are the peer's
        // unverified say, kept for metrics labels and the access log, never for policy.
        let conn = Connection {
            peer: Identity::from_spiffe_id(&request.peer_identity),
            src: request.peer_addr.ip(),
            dst: request.target,
        };
        let meta = &request.metadata;
        let state = self.inner.state.borrow().clone();
        rec.source = metadata::peer_source(&state, conn.src, &meta.baggage, conn.peer.as_ref());
        rec.forwarded_for = meta.forwarded_for;
        rec.trace = meta.traceparent;
        let http = self.inner.http.as_ref().filter(|_| {
            state
                .workload_by_address(conn.dst.ip())
                .is_some_and(|w| super::l7::inbound::protocol(&state, w, conn.dst.port()).is_http())
        });
        let Some(http) = http.cloned() else {
            return match self.admit(state, conn, rec, start, false).await {
                Ok(t) => Decision::AllowVia(Box::new(t)),
                Err(r) => Decision::Deny(r.status, r.reason.into()),
            };
        };
        let peer = super::l7::inbound::Peer {
            identity: conn.peer.clone(),
            identity_text: request.peer_identity.clone(),
            src: request.peer_addr,
            dst: conn.dst,
            source: rec.source.clone(),
            trace: meta.traceparent,
        };
        match self.admit(state, conn, rec, start, true).await {
            Ok(t) => {
                let state = self.inner.state.clone();
                Decision::Serve(Box::new(move |tunnel| {
                    Box::pin(super::l7::inbound::serve(tunnel, t, peer, state, http))
                }))
            }
            Err(r) => Decision::Deny(r.status, r.reason.into()),
        }
    }

    fn takes_requests(&self) -> bool {
        self.inner.http.is_some()
    }

    /// A request that came directly on HBONE: the checks of an HTTP port's tunnel, then the
    /// request's own authorization, as on a tunnel, and a connection from the shared pool.
    async fn request(
        &self,
        request: InboundRequest,
        req: http::Request<isthmus_hbone::RecvBody>,
    ) -> http::Response<isthmus_hbone::ResponseBody> {
        use isthmus_hbone::request::APP_PROTOCOL_HEADER;
        let Some(http) = self.inner.http.clone() else {
            return refused(
                StatusCode::METHOD_NOT_ALLOWED,
                "this agent serves no HTTP ports",
            );
        };
        let conn = Connection {
            peer: Identity::from_spiffe_id(&request.peer_identity),
            src: request.peer_addr.ip(),
            dst: request.target,
        };
        let state = self.inner.state.borrow().clone();
        if let Err(r) = self.check(&state, &conn, true) {
            return refused(r.status, &r.reason);
        }
        let meta = &request.metadata;
        let peer = super::l7::inbound::Peer {
            source: metadata::peer_source(&state, conn.src, &meta.baggage, conn.peer.as_ref()),
            identity: conn.peer,
            identity_text: request.peer_identity.clone(),
            src: request.peer_addr,
            dst: conn.dst,
            trace: meta.traceparent,
        };
        let series = self.direct_series(&request.peer_identity, conn.src);
        let h2 = request
            .headers
            .get(APP_PROTOCOL_HEADER)
            .is_some_and(|v| v.as_bytes() == b"h2");
        let target = request.target;
        let (sockets, timeout) = (
            self.inner.config.sockets.clone(),
            self.inner.config.connect_timeout,
        );
        let send = |r: http::Request<super::l7::pool::Body>| async move {
            let r = if h2 {
                r
            } else {
                super::l7::inbound::http1_form(r)
            };
            let connect = move || async move {
                use super::l7::pool::SendError;
                match tokio::time::timeout(timeout, sockets.connect(target)).await {
                    Ok(Ok(tcp)) => Ok(hyper_util::rt::TokioIo::new(tcp)),
                    Ok(Err(e)) => Err(SendError::Connect {
                        addr: target,
                        message: isthmus_hbone::connect_failure(target, &e),
                    }),
                    Err(_) => Err(SendError::Connect {
                        addr: target,
                        message: format!("timed out after {timeout:?}"),
                    }),
                }
            };
            let (resp, _) = self
                .inner
                .app_conns
                .send(target, h2, connect, r)
                .await
                .map_err(|e| e.to_string())?;
            let (p, b) = resp.into_parts();
            Ok(http::Response::from_parts(
                p,
                http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
                    b,
                    |e| -> super::l7::pool::BoxError { Box::new(e) },
                )),
            ))
        };
        super::l7::inbound::handle(req, send, &peer, &state, &http, &series).await
    }
}

impl InboundPolicy {
    fn direct_series(
        &self,
        identity: &str,
        src: std::net::IpAddr,
    ) -> Arc<super::l7::inbound::Series> {
        let mut map = self
            .inner
            .direct_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Usually one identity per address: found without allocating.
        if let Some((_, s)) = map
            .get(&src)
            .and_then(|v| v.iter().find(|(id, _)| id == identity))
        {
            return s.clone();
        }
        if map.len() >= MAX_DIRECT_PEERS {
            map.clear();
        }
        let series: Arc<super::l7::inbound::Series> = Arc::default();
        map.entry(src)
            .or_default()
            .push((identity.to_owned(), series.clone()));
        series
    }
}

/// The refusal of a direct request by the checks a tunnel passes first: the HBONE client
/// reads the reason header as it reads a refused CONNECT's.
fn refused(status: StatusCode, reason: &str) -> http::Response<isthmus_hbone::ResponseBody> {
    let mut r = http::Response::new(isthmus_hbone::request::boxed(http_body_util::Empty::<
        bytes::Bytes,
    >::new()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(reason) {
        r.headers_mut().insert(isthmus_hbone::REASON_HEADER, v);
    }
    r
}

/// The local application's side of an admitted connection: counts bytes, fails once the
/// connection is revoked, and writes the access-log line when dropped.
struct Tracked {
    app: TcpStream,
    live: Arc<Live>,
    id: u64,
    policy: InboundPolicy,
    rec: AccessRecord,
    start: Instant,
    failed: Option<String>,
}

impl Tracked {
    fn note<T>(&mut self, r: &io::Result<T>) {
        if let Err(e) = r {
            if self.failed.is_none() {
                self.failed = Some(e.to_string());
            }
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Err(e) = this.live.check(cx, 0) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.app).poll_read(cx, buf);
        if let Poll::Ready(res) = &r {
            this.note(res);
            this.rec.received += (buf.filled().len() - before) as u64;
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Err(e) = this.live.check(cx, 1) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut this.app).poll_write(cx, data);
        if let Poll::Ready(res) = &r {
            this.note(res);
            if let Ok(n) = res {
                this.rec.sent += *n as u64;
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.app).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.app).poll_shutdown(cx)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.policy.lock_live().remove(&self.id);
        let (outcome, reason) = if self.live.revoked.load(Ordering::Acquire) {
            let r = self
                .live
                .reason
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            (Outcome::Revoked, r)
        } else if let Some(e) = self.failed.take() {
            (Outcome::Error, e)
        } else {
            (Outcome::Ok, "closed".into())
        };
        self.rec.finish(
            &self.policy.inner.metrics,
            outcome,
            &reason,
            self.start,
            true,
        );
    }
}

/// The plaintext inbound listener (15006).
pub struct PlaintextInbound {
    mode: PlaintextMode,
    orig_dst: Arc<dyn OrigDst>,
    policy: InboundPolicy,
    limit: ConnLimit,
}

impl PlaintextInbound {
    pub fn new(mode: PlaintextMode, orig_dst: Arc<dyn OrigDst>, policy: InboundPolicy) -> Self {
        Self {
            mode,
            orig_dst,
            policy,
            limit: ConnLimit::unbounded(),
        }
    }

    /// Serves at most `limit` connections at once.
    pub fn with_conn_limit(mut self, limit: ConnLimit) -> Self {
        self.limit = limit;
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
        let limit = this.limit.clone();
        super::drain::serve(
            listener,
            "inbound_plaintext",
            drain,
            limit,
            move |tcp, src| {
                let this = this.clone();
                let span = tracing::debug_span!("inbound_plaintext", %src);
                async move { this.handle(tcp, src).await }.instrument(span)
            },
        )
        .await
    }

    async fn handle(&self, mut client: TcpStream, src: SocketAddr) {
        let start = Instant::now();
        let mut rec = AccessRecord::new(Direction::InboundPlaintext, src);
        let metrics = self.policy.inner.metrics.clone();
        let dst = match self.orig_dst.original_dst(&client) {
            Ok(d) => d,
            Err(e) => {
                let reason = format!("cannot read the original destination: {e}");
                rec.finish(&metrics, Outcome::Refused, &reason, start, false);
                return;
            }
        };
        rec.dst = Some(dst);
        if self.mode == PlaintextMode::Strict {
            let reason = "plaintext refused: STRICT mode accepts only mTLS (HBONE)";
            rec.finish(&metrics, Outcome::Refused, reason, start, false);
            return;
        }
        rec.endpoint = Some(dst);
        let conn = Connection {
            peer: None,
            src: src.ip(),
            dst,
        };
        let state = self.policy.inner.state.borrow().clone();
        let Ok(mut app) = self.policy.admit(state, conn, rec, start, false).await else {
            return;
        };
        let _ = client.set_nodelay(true);
        // The access log is written when `app` drops, with the counts it kept.
        let mut scratch = AccessRecord::new(Direction::InboundPlaintext, src);
        let _ = splice(&mut client, &mut app, &mut scratch).await;
    }
}
