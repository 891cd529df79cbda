//! Inbound HBONE: accepts mTLS + HTTP/2 on port 15008 and terminates CONNECT streams to local
//! targets, after validation and a policy decision by the caller's handler.

use std::any::Any;
use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use isthmus_socket::ConnLimit;
use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::metadata::{StreamMetadata, TraceId};
use crate::request::{RecvBody, ResponseBody, AGENT_HEADERS, TAKES_REQUESTS_HEADER};
use crate::stream::HboneStream;
use crate::tls::{self, Credentials, CredentialsWatch, TlsError};
use crate::REASON_HEADER;

/// Tuning of the inbound side. `Default` matches what the agent uses.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Bound on the TLS + HTTP/2 handshake of an accepted connection.
    pub handshake_timeout: Duration,
    /// Bound on connecting to the local target of a stream.
    pub upstream_connect_timeout: Duration,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` advertised to clients.
    pub max_concurrent_streams: u32,
    /// HTTP/2 per-stream receive window.
    pub stream_window: u32,
    /// HTTP/2 per-connection receive window.
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept.
    pub max_frame_size: u32,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`: a CONNECT whose headers decode to more is refused
    /// (431, the connection kept); four times more closes the connection. h2's default is
    /// 16 MiB, which would let a peer make us buffer that much per request.
    pub max_header_list_size: u32,
    /// Connections served at once; past it new ones are closed at once (shared by clones).
    pub conn_limit: ConnLimit,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            // Room for the W3C limits (8 KiB of baggage) and the rest of a CONNECT.
            max_header_list_size: 16 * 1024,
            conn_limit: ConnLimit::unbounded(),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen for HBONE on {addr}: {source} (is another agent already bound to it?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the HBONE listener's address: {0}")]
    LocalAddr(std::io::Error),
}

/// A CONNECT stream that passed validation, handed to [`InboundHandler::decide`].
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// SPIFFE ID of the authenticated peer workload.
    pub peer_identity: String,
    /// The peer's leaf certificate.
    pub peer_certificate: Arc<CertificateDer<'static>>,
    /// Source address of the TLS connection.
    pub peer_addr: SocketAddr,
    /// Address the TLS connection was made to (this workload's ip:15008).
    pub local_addr: SocketAddr,
    /// `<this workload ip>:<target port>` from the CONNECT authority.
    pub target: SocketAddr,
    /// Request headers (`baggage`, `forwarded`, `traceparent`, ...).
    pub headers: HeaderMap,
    /// What `baggage`, `forwarded` and `traceparent` say, parsed defensively (malformed or
    /// oversized ones are left out). The peer asserts them unverified: informational only,
    /// authorization must use `peer_identity`.
    pub metadata: StreamMetadata,
}

/// Any bidirectional byte stream the handler wants the tunnel spliced to.
pub trait Upstream: AsyncRead + AsyncWrite + Send + Unpin {
    /// The HBONE tunnel this is, if it is one (also through a `Box<dyn Upstream>`), so that a
    /// socket can be spliced to it with [`crate::splice_tunnel`] instead of through its
    /// copying `AsyncRead`/`AsyncWrite` view.
    fn as_hbone(&mut self) -> Option<&mut HboneStream>;
}

// Stable Rust cannot override a blanket impl for one type, so the type is asked through `Any`
// (hence `'static`, which every `Box<dyn Upstream>` is anyway).
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Upstream for T {
    fn as_hbone(&mut self) -> Option<&mut HboneStream> {
        let any: &mut dyn Any = self;
        if any.is::<Box<dyn Upstream>>() {
            // A boxed upstream is `Upstream` itself: ask what it holds (through the vtable;
            // calling `as_hbone` on the box would come back here).
            return any
                .downcast_mut::<Box<dyn Upstream>>()
                .and_then(|inner| (**inner).as_hbone());
        }
        any.downcast_mut::<HboneStream>()
    }
}

/// What to do with a validated stream.
pub enum Decision {
    /// Connect to `request.target` and splice.
    Allow,
    /// Splice to this stream instead of connecting to the target.
    AllowVia(Box<dyn Upstream>),
    /// Accept the tunnel and hand it to this function, which serves it (an HTTP server on
    /// the tunnel, say) until it returns.
    Serve(ServeTunnel),
    /// Refuse with this status (403 for policy, 503 for "not ready") and this reason, sent
    /// to the client in the reason header ("denied by policy ns/name", "no workload at ...").
    Deny(StatusCode, Cow<'static, str>),
}

impl std::fmt::Debug for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Allow => f.write_str("Allow"),
            Decision::AllowVia(_) => f.write_str("AllowVia(..)"),
            Decision::Serve(_) => f.write_str("Serve(..)"),
            Decision::Deny(s, r) => write!(f, "Deny({s}, {r:?})"),
        }
    }
}

/// Serves an accepted tunnel (see [`Decision::Serve`]).
pub type ServeTunnel = Box<
    dyn FnOnce(HboneStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send,
>;

/// Policy hooks of the server.
pub trait InboundHandler: Send + Sync + 'static {
    /// Whether this workload serves `port` at all; others get 403 before `decide` runs.
    fn port_allowed(&self, _port: u16) -> bool {
        true
    }

    /// Authorization decision for one stream.
    fn decide(&self, request: &InboundRequest) -> impl Future<Output = Decision> + Send;

    /// Whether [`InboundHandler::request`] serves direct requests ([`crate::request`]); the
    /// server then says so on its CONNECT answers, and clients that understand it send HTTP
    /// requests as streams instead of tunnelling them.
    fn takes_requests(&self) -> bool {
        false
    }

    /// Answers one direct request for `request.target`, which the server has checked as it
    /// checks a CONNECT's authority. The agents' own headers are already removed from `req`;
    /// what they said is in `request.headers` and `request.metadata`.
    fn request(
        &self,
        request: InboundRequest,
        req: Request<RecvBody>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        let _ = (request, req);
        async {
            let mut r = Response::new(crate::request::boxed(http_body_util::Empty::<Bytes>::new()));
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r
        }
    }
}

/// Counters a caller (and the tests) can read.
#[derive(Debug, Default)]
pub struct ServerStats {
    tls_accepted: AtomicU64,
    tls_failed: AtomicU64,
    streams: AtomicU64,
    streams_refused: AtomicU64,
    requests: AtomicU64,
}

impl ServerStats {
    /// Connections that completed mTLS with an authenticated peer.
    pub fn tls_accepted(&self) -> u64 {
        self.tls_accepted.load(Ordering::Relaxed)
    }
    /// Connections dropped during the handshake (bad certificate, no ALPN h2, timeout).
    pub fn tls_failed(&self) -> u64 {
        self.tls_failed.load(Ordering::Relaxed)
    }
    /// CONNECT streams received.
    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Relaxed)
    }
    /// Streams answered with a non-200 status.
    pub fn streams_refused(&self) -> u64 {
        self.streams_refused.load(Ordering::Relaxed)
    }
    /// Direct requests ([`crate::request`]) handed to the handler (also counted in `streams`).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A bound, not yet running HBONE server.
pub struct HboneServer<H> {
    listener: isthmus_socket::Listener,
    creds: CredentialsWatch,
    handler: Arc<H>,
    options: ServerOptions,
    stats: Arc<ServerStats>,
}

/// Controls a running server.
pub struct ServerHandle {
    local_addr: SocketAddr,
    stats: Arc<ServerStats>,
    shutdown: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

impl<H: InboundHandler> HboneServer<H> {
    /// Binds `addr` (normally `<workload ip>:15008`).
    pub async fn bind(
        addr: SocketAddr,
        creds: CredentialsWatch,
        handler: H,
        options: ServerOptions,
    ) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self::from_listener(listener, creds, handler, options))
    }

    /// Uses an already bound listener (or a shard's share of one, [`isthmus_socket::Balance`]).
    pub fn from_listener(
        listener: impl Into<isthmus_socket::Listener>,
        creds: CredentialsWatch,
        handler: H,
        options: ServerOptions,
    ) -> Self {
        Self {
            listener: listener.into(),
            creds,
            handler: Arc::new(handler),
            options,
            stats: Arc::default(),
        }
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.listener.local_addr().map_err(ServerError::LocalAddr)
    }

    /// Starts serving on the current runtime (run it on the data-plane runtime).
    pub fn spawn(self) -> Result<ServerHandle, ServerError> {
        let local_addr = self.local_addr()?;
        let stats = self.stats.clone();
        let (tx, rx) = watch::channel(None);
        let span = tracing::info_span!("hbone_server", addr = %local_addr);
        let task = tokio::spawn(self.run(rx).instrument(span));
        Ok(ServerHandle {
            local_addr,
            stats,
            shutdown: tx,
            task,
        })
    }

    async fn run(self, mut shutdown: watch::Receiver<Option<Duration>>) {
        let mut conns = JoinSet::new();
        let mut cached: Option<(Arc<Credentials>, Arc<ServerConfig>)> = None;
        let deadline = loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (tcp, peer, share) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Per-connection accept errors (EMFILE, aborted handshakes) are
                            // transient; out of descriptors, pause rather than spin.
                            isthmus_socket::accept_failed("hbone", &e).await;
                            continue;
                        }
                    };
                    // Past the bound the connection is closed at once (dropped here).
                    let Some(permit) = self.options.conn_limit.try_acquire("hbone") else {
                        continue;
                    };
                    let cfg = match self.current_config(&mut cached) {
                        Ok(cfg) => cfg,
                        Err(e) => {
                            isthmus_socket::warn_limited!(("refused", "hbone"), %peer, error = %e,
                                "refusing HBONE connection");
                            continue;
                        }
                    };
                    let conn = Conn {
                        handler: self.handler.clone(),
                        options: self.options.clone(),
                        stats: self.stats.clone(),
                        shutdown: shutdown.clone(),
                    };
                    let span = tracing::info_span!("hbone_inbound", %peer);
                    conns.spawn(
                        async move {
                            conn.serve(tcp, peer, cfg).await;
                            drop((permit, share));
                        }
                        .instrument(span),
                    );
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                // A dropped handle also shuts the server down.
                _ = shutdown.changed() => break shutdown.borrow().unwrap_or(DRAIN_DEFAULT),
            }
        };
        drop(self.listener);
        let drained = tokio::time::timeout(deadline, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                remaining = conns.len(),
                "drain deadline reached, closing remaining connections"
            );
            conns.shutdown().await;
        }
    }

    fn current_config(
        &self,
        cached: &mut Option<(Arc<Credentials>, Arc<ServerConfig>)>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let creds = self.creds.borrow().clone().ok_or(TlsError::NoCredentials)?;
        if let Some((c, cfg)) = cached.as_ref() {
            if Arc::ptr_eq(c, &creds) {
                return Ok(cfg.clone());
            }
        }
        let cfg = tls::server_config(&creds)?;
        *cached = Some((creds, cfg.clone()));
        Ok(cfg)
    }
}

/// Drain deadline when the handle is dropped instead of calling `shutdown`.
const DRAIN_DEFAULT: Duration = Duration::from_secs(30);

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Stops accepting, asks clients to stop opening streams (GOAWAY), lets open streams finish
    /// for up to `deadline`, then closes what is left.
    pub async fn shutdown(self, deadline: Duration) {
        let _ = self.shutdown.send(Some(deadline));
        let mut task = self.task;
        if tokio::time::timeout(deadline + Duration::from_millis(100), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

struct Conn<H> {
    handler: Arc<H>,
    options: ServerOptions,
    stats: Arc<ServerStats>,
    shutdown: watch::Receiver<Option<Duration>>,
}

struct ConnInfo {
    peer_identity: String,
    peer_certificate: Arc<CertificateDer<'static>>,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
}

impl<H: InboundHandler> Conn<H> {
    async fn serve(self, tcp: TcpStream, peer_addr: SocketAddr, cfg: Arc<ServerConfig>) {
        let local_addr = match tcp.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "connection gone before handshake");
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        let opts = self.options.clone();
        let socket = crate::io::buffered(tcp);
        let cork = socket.cork();
        let handshake = async {
            let tls = TlsAcceptor::from(cfg)
                .accept(socket)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            let (_, session) = tls.get_ref();
            if session.alpn_protocol() != Some(tls::ALPN_H2) {
                return Err("client did not negotiate ALPN h2".to_string());
            }
            let leaf = session
                .peer_certificates()
                .and_then(|c| c.first())
                .cloned()
                .ok_or_else(|| "client presented no certificate".to_string())?;
            let identity = tls::spiffe_id(&leaf).map_err(|e| format!("client certificate: {e}"))?;
            let h2 = h2::server::Builder::new()
                .initial_window_size(opts.stream_window)
                .initial_connection_window_size(opts.connection_window)
                .max_frame_size(opts.max_frame_size)
                .max_concurrent_streams(opts.max_concurrent_streams)
                .max_header_list_size(opts.max_header_list_size)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
            Ok((h2, identity, leaf))
        };
        let (h2, peer_identity, peer_certificate) =
            match tokio::time::timeout(opts.handshake_timeout, handshake).await {
                Ok(Ok(v)) => v,
                Ok(Err(reason)) => {
                    self.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%reason, "HBONE connection refused");
                    return;
                }
                Err(_) => {
                    self.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(timeout = ?opts.handshake_timeout, "HBONE handshake timed out");
                    return;
                }
            };
        self.stats.tls_accepted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peer = %peer_identity, "HBONE connection accepted");
        let info = Arc::new(ConnInfo {
            peer_identity,
            peer_certificate: Arc::new(peer_certificate),
            peer_addr,
            local_addr,
        });
        // The span inside: a stream's kick polls the connection outside this task's span.
        let span = tracing::Span::current();
        crate::io::Corked::new(cork, |kick| {
            self.serve_streams(h2, info, kick).instrument(span)
        })
        .await;
    }

    /// Serves the streams of an established connection until it ends.
    async fn serve_streams(
        mut self,
        mut h2: h2::server::Connection<crate::io::TlsSocket, Bytes>,
        info: Arc<ConnInfo>,
        kick: crate::io::Kick,
    ) {
        let opts = self.options.clone();
        let mut streams = JoinSet::new();
        let mut draining = self.shutdown.borrow().is_some();
        if draining {
            h2.graceful_shutdown();
        }
        loop {
            tokio::select! {
                next = h2.accept() => match next {
                    Some(Ok((req, respond))) => {
                        self.stats.streams.fetch_add(1, Ordering::Relaxed);
                        let span = tracing::debug_span!("stream", authority = ?req.uri().authority().map(|a| a.as_str().to_string()));
                        let ctx = StreamCtx {
                            handler: self.handler.clone(),
                            info: info.clone(),
                            stats: self.stats.clone(),
                            upstream_timeout: opts.upstream_connect_timeout,
                            kick: kick.clone(),
                        };
                        streams.spawn(ctx.serve(req, respond).instrument(span));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "HBONE connection ended with error");
                        break;
                    }
                    None => break,
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
                changed = self.shutdown.changed(), if !draining => {
                    // A dropped sender also means "shut down".
                    let _ = changed;
                    draining = true;
                    h2.graceful_shutdown();
                }
            }
        }
        // The connection is gone; stream tasks see errors and finish promptly.
        while streams.join_next().await.is_some() {}
    }
}

struct StreamCtx<H> {
    handler: Arc<H>,
    info: Arc<ConnInfo>,
    stats: Arc<ServerStats>,
    upstream_timeout: Duration,
    kick: crate::io::Kick,
}

impl<H: InboundHandler> StreamCtx<H> {
    async fn serve(self, req: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
        // Parsed first, so even a refusal's log line carries the trace id.
        let metadata = StreamMetadata::from_headers(req.headers());
        let trace = metadata.traceparent.map(|t| t.trace_id);
        let target = match self.validate(&req) {
            Ok(t) => t,
            Err((status, reason)) => {
                self.refuse(&mut respond, status, &reason, trace);
                return;
            }
        };
        if req.method() != Method::CONNECT {
            self.serve_request(req, respond, target).await;
            return;
        }
        let (parts, body) = req.into_parts();
        let request = self.inbound_request(target, parts.headers, metadata);
        let mut upstream: Box<dyn Upstream> = match self.handler.decide(&request).await {
            Decision::Deny(status, reason) => {
                self.refuse(&mut respond, status, &reason, trace);
                return;
            }
            Decision::AllowVia(io) => io,
            Decision::Serve(serve) => {
                let send = match respond
                    .send_response(self.ok(), false)
                    .map_err(|e| e.to_string())
                {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "client went away before the tunnel was established");
                        return;
                    }
                };
                serve(HboneStream::new(send, body, None, self.kick.clone())).await;
                return;
            }
            Decision::Allow => {
                match tokio::time::timeout(self.upstream_timeout, TcpStream::connect(target)).await
                {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        Box::new(tcp)
                    }
                    Ok(Err(e)) => {
                        let reason = connect_failure(target, &e);
                        self.refuse(
                            &mut respond,
                            StatusCode::SERVICE_UNAVAILABLE,
                            &reason,
                            trace,
                        );
                        return;
                    }
                    Err(_) => {
                        let reason = format!("connecting to {target} timed out");
                        self.refuse(
                            &mut respond,
                            StatusCode::SERVICE_UNAVAILABLE,
                            &reason,
                            trace,
                        );
                        return;
                    }
                }
            }
        };
        let send = match respond
            .send_response(self.ok(), false)
            .map_err(|e| e.to_string())
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "client went away before the tunnel was established");
                return;
            }
        };
        let mut tunnel = HboneStream::new(send, body, None, self.kick.clone());
        // (tunnel → upstream, upstream → tunnel), as `copy_bidirectional` counted them.
        let result = crate::copy::splice_tunnel(&mut tunnel, &mut upstream).await;
        match result {
            Ok((up, down)) => tracing::info!(
                target: "hbone_access",
                peer = %self.info.peer_identity,
                src = %self.info.peer_addr,
                dst = %target,
                trace_id = %OrDash(trace),
                bytes_in = up,
                bytes_out = down,
                "tunnel closed"
            ),
            Err(e) => tracing::info!(
                target: "hbone_access",
                peer = %self.info.peer_identity,
                src = %self.info.peer_addr,
                dst = %target,
                trace_id = %OrDash(trace),
                error = %e,
                "tunnel failed"
            ),
        }
    }

    /// What the handler is told of a stream of this connection.
    fn inbound_request(
        &self,
        target: SocketAddr,
        headers: HeaderMap,
        metadata: StreamMetadata,
    ) -> InboundRequest {
        InboundRequest {
            peer_identity: self.info.peer_identity.clone(),
            peer_certificate: self.info.peer_certificate.clone(),
            peer_addr: self.info.peer_addr,
            local_addr: self.info.local_addr,
            target,
            headers,
            metadata,
        }
    }

    /// The answer to an accepted CONNECT.
    fn ok(&self) -> Response<()> {
        let mut r = Response::new(());
        if self.handler.takes_requests() {
            r.headers_mut()
                .insert(TAKES_REQUESTS_HEADER, HeaderValue::from_static("1"));
        }
        r
    }

    /// A direct request ([`crate::request`]) whose target passed the checks of a CONNECT.
    async fn serve_request(
        self,
        req: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        target: SocketAddr,
    ) {
        let (mut parts, body) = req.into_parts();
        // What the client agent said of itself, under the names a CONNECT uses for it.
        let mut said = HeaderMap::with_capacity(4);
        for (sent_as, named) in [
            (crate::request::BAGGAGE_HEADER, crate::metadata::BAGGAGE),
            (crate::request::FORWARDED_HEADER, crate::metadata::FORWARDED),
            (crate::metadata::TRACEPARENT, crate::metadata::TRACEPARENT),
            (
                crate::request::APP_PROTOCOL_HEADER,
                crate::request::APP_PROTOCOL_HEADER,
            ),
        ] {
            if let Some(v) = parts.headers.get(&sent_as) {
                said.insert(named, v.clone());
            }
        }
        for h in AGENT_HEADERS.iter() {
            parts.headers.remove(h);
        }
        let metadata = StreamMetadata::from_headers(&said);
        let request = self.inbound_request(target, said, metadata);
        let req = Request::from_parts(parts, RecvBody::new(body, None));
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let resp = self.handler.request(request, req).await;
        let (mut parts, body) = resp.into_parts();
        crate::request::strip_connection_headers(&mut parts.headers);
        let mut body = match crate::request::Outgoing::start(body).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "a direct request's response body failed before its head was sent");
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
        };
        let mut send = match respond.send_response(Response::from_parts(parts, ()), body.is_empty())
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "could not answer a direct request");
                return;
            }
        };
        let more = match body.send_first(&mut send) {
            Ok(more) => more,
            Err(e) => {
                tracing::debug!(error = %e, "a direct request's response body failed");
                return;
            }
        };
        if more {
            if let Err(e) = body.finish(send).await {
                tracing::debug!(error = %e, "a direct request's response body failed");
            }
        }
    }

    fn validate(&self, req: &Request<h2::RecvStream>) -> Result<SocketAddr, (StatusCode, String)> {
        if req.method() != Method::CONNECT {
            if !self.handler.takes_requests() {
                return Err((
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!(
                        "{} is not supported on the HBONE port, only CONNECT",
                        req.method()
                    ),
                ));
            }
            let value = req
                .headers()
                .get(crate::request::TARGET_HEADER)
                .ok_or_else(|| {
                    (
                        StatusCode::METHOD_NOT_ALLOWED,
                        format!(
                            "{} without an {} header is not supported on the HBONE port: send CONNECT, or a request naming its target",
                            req.method(),
                            crate::request::TARGET_HEADER
                        ),
                    )
                })?;
            let target = value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<SocketAddr>().ok())
                .ok_or_else(|| {
                    (
                        StatusCode::BAD_REQUEST,
                        format!(
                            "{} {:?} is not <ip>:<port>",
                            crate::request::TARGET_HEADER,
                            String::from_utf8_lossy(value.as_bytes())
                        ),
                    )
                })?;
            return self.check_target(target, &target.to_string());
        }
        if req.method() != Method::CONNECT {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} is not supported on the HBONE port, only CONNECT",
                    req.method()
                ),
            ));
        }
        let authority = req.uri().authority().ok_or((
            StatusCode::BAD_REQUEST,
            "CONNECT without authority".to_string(),
        ))?;
        let target: SocketAddr = authority.as_str().parse().map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                format!("authority {authority} is not <ip>:<port>"),
            )
        })?;
        self.check_target(target, authority.as_str())
    }

    /// The checks every stream's target passes: this workload's address, a port it serves.
    fn check_target(
        &self,
        target: SocketAddr,
        authority: &str,
    ) -> Result<SocketAddr, (StatusCode, String)> {
        let local = self.info.local_addr.ip().to_canonical();
        if target.ip().to_canonical() != local {
            return Err((
                StatusCode::FORBIDDEN,
                format!("authority {authority} does not match this workload's address {local}"),
            ));
        }
        if !self.handler.port_allowed(target.port()) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("port {} is not served by this workload", target.port()),
            ));
        }
        Ok(target)
    }

    fn refuse(
        &self,
        respond: &mut SendResponse<Bytes>,
        status: StatusCode,
        reason: &str,
        trace: Option<TraceId>,
    ) {
        self.stats.streams_refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            target: "hbone_access",
            peer = %self.info.peer_identity,
            src = %self.info.peer_addr,
            trace_id = %OrDash(trace),
            %status,
            %reason,
            "stream refused"
        );
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        if let Ok(v) = HeaderValue::from_str(reason) {
            resp.headers_mut().insert(REASON_HEADER, v);
        }
        if let Err(e) = respond.send_response(resp, true) {
            tracing::debug!(error = %e, "could not send refusal");
        }
    }
}

/// The reason sent when the target cannot be reached, naming the usual cause.
pub fn connect_failure(target: SocketAddr, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        format!(
            "the local app refused the connection (is it listening on {}?)",
            target.port()
        )
    } else {
        format!("cannot connect to the local app at {target}: {e}")
    }
}

/// Shows the value, or `-` when there is none (as access logs do), without formatting into a
/// string first.
pub struct OrDash<T>(pub Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}
