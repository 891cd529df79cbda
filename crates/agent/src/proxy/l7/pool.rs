//! Upstream HTTP connections, pooled per endpoint and protocol. Each connection is one HBONE
//! CONNECT stream to the endpoint (or a plain TCP connection to a workload without an agent);
//! HTTP/2 connections are shared by every request, HTTP/1.1 ones are kept idle for reuse
//! (at most [`MAX_IDLE_H1`] per endpoint).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_hbone::{HboneClient, HboneError};
use isthmus_socket::SocketFactory;
use isthmus_xds::client::Tunnel;

use crate::proxy::outbound::Target;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint.
pub const MAX_IDLE_H1: usize = 128;

/// Why an attempt got no response, as retry conditions tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection (TCP, TLS or the CONNECT failed): `connect-failure`, flag `UF`.
    #[error("connecting to {addr} failed: {message}")]
    Connect { addr: SocketAddr, message: String },
    /// The peer refused the CONNECT (its policy): never retried, answered 403... by the peer.
    #[error("the peer refused the tunnel to {addr}: {message}")]
    Denied { addr: SocketAddr, message: String },
    /// HTTP/2 REFUSED_STREAM: `refused-stream`, safe to retry anywhere.
    #[error("the upstream refused the stream")]
    Refused,
    /// The connection broke before a response: `reset`, flag `UC`.
    #[error("the upstream connection closed before a response: {0}")]
    Reset(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    h2: bool,
}

enum Entry {
    H2(http2::SendRequest<Body>),
    H1(Vec<http1::SendRequest<Body>>),
}

/// HTTP connections kept per address and protocol: one shared HTTP/2 connection, or idle
/// HTTP/1.1 ones. How a connection is made is the caller's (a tunnel, a socket).
#[derive(Default)]
pub struct HttpConns {
    /// Keyed by endpoint addresses from discovery (not chosen by clients): a fast hash, as the
    /// other per-request maps of the L7 path use.
    conns: Mutex<HashMap<Key, Entry, foldhash::fast::RandomState>>,
}

impl HttpConns {
    /// Sends `req` to `addr` over HTTP/2 (`h2`) or HTTP/1.1, on a kept connection or on one
    /// `connect` makes. Also says whether a new connection was made for it (its latency then
    /// includes the handshakes, which the balancer leaves out).
    ///
    /// Making a connection is the rare path: its futures (the CONNECT's TLS handshake, the
    /// HTTP handshakes, several KiB each) are boxed only when taken, so that this future, which
    /// every request builds and moves, stays small (`new_h2`, `new_h1`).
    pub async fn send<IO, C, F>(
        &self,
        addr: SocketAddr,
        h2: bool,
        connect: C,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, bool), SendError>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
        C: FnOnce() -> F,
        F: std::future::Future<Output = Result<IO, SendError>>,
    {
        let key = Key { addr, h2 };
        if h2 {
            let existing = match self.lock().get(&key) {
                Some(Entry::H2(s)) if !s.is_closed() => Some(s.clone()),
                _ => None,
            };
            let fresh = existing.is_none();
            let mut sender = match existing {
                Some(s) => s,
                None => {
                    let s = Box::pin(new_h2(addr, connect)).await?;
                    self.lock().insert(key.clone(), Entry::H2(s.clone()));
                    s
                }
            };
            if sender.ready().await.is_err() {
                self.lock().remove(&key);
                return Err(SendError::Reset("the HTTP/2 connection closed".into()));
            }
            return sender
                .send_request(req)
                .await
                .map(|r| (r, fresh))
                .map_err(classify);
        }
        // HTTP/1.1: an idle ready connection, else a new one.
        let idle = {
            let mut conns = self.lock();
            match conns.get_mut(&key) {
                Some(Entry::H1(list)) => {
                    list.retain(|s| !s.is_closed());
                    list.iter()
                        .position(|s| s.is_ready())
                        .map(|i| list.swap_remove(i))
                }
                _ => None,
            }
        };
        let fresh = idle.is_none();
        let mut sender = match idle {
            Some(s) => s,
            None => Box::pin(new_h1(addr, connect)).await?,
        };
        let resp = sender.send_request(req).await.map_err(classify);
        if resp.is_ok() {
            // Back in the pool: it is ready again once this response's body has been read.
            let mut conns = self.lock();
            if let Entry::H1(list) = conns.entry(key).or_insert_with(|| Entry::H1(Vec::new())) {
                if list.len() < MAX_IDLE_H1 {
                    list.push(sender);
                }
            }
        }
        resp.map(|r| (r, fresh))
    }

    /// Forgets the connections kept for `addr` (they close once their requests are done).
    fn forget(&self, addr: SocketAddr) {
        let mut conns = self.lock();
        for h2 in [false, true] {
            conns.remove(&Key { addr, h2 });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry, foldhash::fast::RandomState>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new HTTP/2 connection over what `connect` makes, its connection task spawned.
async fn new_h2<IO, C, F>(
    addr: SocketAddr,
    connect: C,
) -> Result<http2::SendRequest<Body>, SendError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
    C: FnOnce() -> F,
    F: std::future::Future<Output = Result<IO, SendError>>,
{
    let io = connect().await?;
    let (s, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(super::timer::CoarseTimer)
        .keep_alive_interval(Duration::from_secs(30))
        .handshake(io)
        .await
        .map_err(|e| SendError::Connect {
            addr,
            message: format!("HTTP/2 handshake: {e}"),
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(s)
}

/// A new HTTP/1.1 connection over what `connect` makes, its connection task spawned.
async fn new_h1<IO, C, F>(
    addr: SocketAddr,
    connect: C,
) -> Result<http1::SendRequest<Body>, SendError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
    C: FnOnce() -> F,
    F: std::future::Future<Output = Result<IO, SendError>>,
{
    let io = connect().await?;
    let (s, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| SendError::Connect {
            addr,
            message: format!("HTTP/1.1 handshake: {e}"),
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(s)
}

pub struct UpstreamPool {
    hbone: HboneClient,
    hbone_port: u16,
    sockets: Arc<SocketFactory>,
    connect_timeout: Duration,
    conns: HttpConns,
    /// Idle connections of the HTTP/1.1 relay ([`super::client`]), per endpoint address.
    raw: Mutex<HashMap<SocketAddr, Vec<RawConn>, foldhash::fast::RandomState>>,
    /// Requests go as streams of the HBONE connection to peers that take them
    /// ([`isthmus_hbone::request`]); off, every request is tunnelled.
    direct: bool,
}

impl UpstreamPool {
    pub fn new(
        hbone: HboneClient,
        hbone_port: u16,
        sockets: Arc<SocketFactory>,
        connect_timeout: Duration,
        direct: bool,
    ) -> Self {
        Self {
            hbone,
            hbone_port,
            sockets,
            connect_timeout,
            conns: HttpConns::default(),
            raw: Mutex::default(),
            direct,
        }
    }

    /// Requests may go directly on HBONE connections (then the HTTP/1.1 relay is not used).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// An idle relay connection to `target` that is still open, or a new one (HBONE CONNECT
    /// with `connect_headers`, or TCP); also says whether it is new.
    pub(crate) async fn raw(
        &self,
        target: &Target,
        connect_headers: &(dyn Fn() -> HeaderMap + Sync),
    ) -> Result<(RawConn, bool), SendError> {
        loop {
            let idle = self
                .raw
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&target.addr)
                .and_then(Vec::pop);
            match idle {
                Some(mut c) => {
                    if c.idle_and_open() {
                        return Ok((c, false));
                    }
                }
                None => break,
            }
        }
        // Boxed: the rare path, and its future (a TLS handshake) is large.
        let io = Box::pin(self.connect(target, connect_headers)).await?;
        Ok((
            RawConn {
                io: io.into_inner(),
                buf: BytesMut::new(),
            },
            true,
        ))
    }

    /// Keeps `conn` (its last response read to the end, nothing more buffered) for the next
    /// request to `addr`.
    pub(crate) fn put_raw(&self, addr: SocketAddr, conn: RawConn) {
        let mut raw = self.raw.lock().unwrap_or_else(PoisonError::into_inner);
        if raw.len() > 4096 && !raw.contains_key(&addr) {
            raw.retain(|_, v| !v.is_empty());
        }
        let list = raw.entry(addr).or_default();
        if list.len() < MAX_IDLE_H1 {
            list.push(conn);
        }
    }

    /// Sends `req` to `target` over HTTP/2 (`h2`) or HTTP/1.1; `connect_headers` go on the
    /// HBONE CONNECT of a new connection (or with each request sent directly on HBONE). Also
    /// says whether a new connection was made for it.
    ///
    /// To a peer agent that takes requests directly the request is a stream of the pooled
    /// HBONE connection, and `h2` tells that agent how to speak to its application.
    pub(crate) async fn send(
        &self,
        target: &Target,
        h2: bool,
        connect_headers: &(dyn Fn() -> HeaderMap + Sync),
        req: Request<Body>,
    ) -> Result<(Response<Body>, bool), SendError> {
        if self.direct && matches!(target.workload.tunnel, Tunnel::Hbone) {
            let dst = SocketAddr::new(target.addr.ip(), self.hbone_port);
            if self.hbone.takes_requests(dst) {
                // Tunnels opened before the peer was known to take requests are not needed.
                self.conns.forget(target.addr);
                // Boxed: off by default, and its future would make every request's larger.
                return Box::pin(self.send_direct(dst, target, h2, connect_headers, req))
                    .await
                    .map(|r| (r, false));
            }
        }
        let connect = || self.connect(target, connect_headers);
        let (resp, fresh) = self.conns.send(target.addr, h2, connect, req).await?;
        let (p, b) = resp.into_parts();
        Ok((
            Response::from_parts(p, b.map_err(|e| -> BoxError { Box::new(e) }).boxed()),
            fresh,
        ))
    }

    async fn send_direct(
        &self,
        dst: SocketAddr,
        target: &Target,
        h2: bool,
        connect_headers: &(dyn Fn() -> HeaderMap + Sync),
        req: Request<Body>,
    ) -> Result<Response<Body>, SendError> {
        use isthmus_hbone::request as direct;
        let addr = target.addr;
        let (mut parts, body) = req.into_parts();
        // HTTP/2 form: the authority in the URI, not in `host`.
        if parts.uri.authority().is_none() {
            let host = parts.headers.remove(http::header::HOST);
            let authority = host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .unwrap_or("unknown");
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            parts.uri =
                format!("http://{authority}{pq}")
                    .parse()
                    .map_err(|e| SendError::Connect {
                        addr,
                        message: format!("the request's authority {authority:?}: {e}"),
                    })?;
        } else {
            parts.headers.remove(http::header::HOST);
        }
        parts.version = http::Version::HTTP_2;
        direct::strip_connection_headers(&mut parts.headers);
        let said = connect_headers();
        if let Some(v) = said.get(isthmus_hbone::metadata::BAGGAGE) {
            parts.headers.insert(direct::BAGGAGE_HEADER, v.clone());
        }
        if let Some(v) = said.get(isthmus_hbone::metadata::FORWARDED) {
            parts.headers.insert(direct::FORWARDED_HEADER, v.clone());
        }
        parts.headers.insert(
            direct::APP_PROTOCOL_HEADER,
            http::HeaderValue::from_static(if h2 { "h2" } else { "http/1.1" }),
        );
        let resp = self
            .hbone
            .request(
                dst,
                addr,
                &target.expected,
                Request::from_parts(parts, body),
            )
            .await
            .map_err(|e| direct_error(addr, e))?;
        let (p, b) = resp.into_parts();
        Ok(Response::from_parts(
            p,
            b.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
        ))
    }

    async fn connect(
        &self,
        t: &Target,
        headers: &(dyn Fn() -> HeaderMap + Sync),
    ) -> Result<TokioIo<Box<dyn isthmus_hbone::Upstream>>, SendError> {
        let addr = t.addr;
        let io: Box<dyn isthmus_hbone::Upstream> = match t.workload.tunnel {
            Tunnel::Hbone => {
                let hbone = SocketAddr::new(addr.ip(), self.hbone_port);
                let s = self
                    .hbone
                    .connect(hbone, addr, &t.expected, &headers())
                    .await
                    .map_err(|e| match e {
                        HboneError::Rejected { status, .. }
                            if status == http::StatusCode::FORBIDDEN =>
                        {
                            SendError::Denied {
                                addr,
                                message: e.to_string(),
                            }
                        }
                        e => SendError::Connect {
                            addr,
                            message: e.to_string(),
                        },
                    })?;
                Box::new(s)
            }
            Tunnel::None => {
                let s = tokio::time::timeout(self.connect_timeout, self.sockets.connect(addr))
                    .await
                    .map_err(|_| SendError::Connect {
                        addr,
                        message: format!("timed out after {:?}", self.connect_timeout),
                    })?
                    .map_err(|e| SendError::Connect {
                        addr,
                        message: e.to_string(),
                    })?;
                Box::new(s)
            }
        };
        Ok(TokioIo::new(io))
    }
}

/// An upstream connection of the HTTP/1.1 relay: the tunnel (or socket) and the bytes read
/// from it that are not relayed yet.
pub(crate) struct RawConn {
    pub io: Box<dyn isthmus_hbone::Upstream>,
    pub buf: BytesMut,
}

impl RawConn {
    /// An idle connection is usable when nothing can be read from it: a close (EOF, an
    /// error) or bytes nobody asked for mean it is not.
    fn idle_and_open(&mut self) -> bool {
        use tokio::io::{AsyncRead, ReadBuf};
        let mut one = [0u8; 1];
        let mut rb = ReadBuf::new(&mut one);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        self.buf.is_empty()
            && std::pin::Pin::new(&mut self.io)
                .poll_read(&mut cx, &mut rb)
                .is_pending()
    }
}

/// How a direct request's failure counts for retries: refused by the peer (its policy, its
/// target checks), refused before processing (REFUSED_STREAM), no connection, or broken
/// after it was sent.
fn direct_error(addr: SocketAddr, e: HboneError) -> SendError {
    match e {
        HboneError::Rejected { status, .. } if status == http::StatusCode::FORBIDDEN => {
            SendError::Denied {
                addr,
                message: e.to_string(),
            }
        }
        HboneError::H2 { ref source, .. }
            if source.reason() == Some(h2::Reason::REFUSED_STREAM) =>
        {
            SendError::Refused
        }
        HboneError::H2 { .. } => SendError::Reset(e.to_string()),
        e => SendError::Connect {
            addr,
            message: e.to_string(),
        },
    }
}

fn classify(e: hyper::Error) -> SendError {
    use std::error::Error;
    let mut source: Option<&(dyn Error + 'static)> = e.source();
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            if h2e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return SendError::Refused;
            }
        }
        source = s.source();
    }
    SendError::Reset(e.to_string())
}
