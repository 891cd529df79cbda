//! Upstream HTTP connections, pooled per endpoint and protocol. Each connection is one HBONE
//! CONNECT stream to the endpoint (or a plain TCP connection to a workload without an agent);
//! HTTP/2 connections are shared by every request, HTTP/1.1 ones are kept idle for reuse
//! (at most [`MAX_IDLE_H1`] per endpoint).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
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

pub struct UpstreamPool {
    hbone: HboneClient,
    hbone_port: u16,
    sockets: Arc<SocketFactory>,
    connect_timeout: Duration,
    conns: Mutex<HashMap<Key, Entry>>,
}

impl UpstreamPool {
    pub fn new(
        hbone: HboneClient,
        hbone_port: u16,
        sockets: Arc<SocketFactory>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            hbone,
            hbone_port,
            sockets,
            connect_timeout,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `req` to `target` over HTTP/2 (`h2`) or HTTP/1.1; `connect_headers` go on the
    /// HBONE CONNECT of a new connection. Also says whether a new connection was made for it
    /// (its latency then includes the handshakes, which the balancer leaves out).
    pub(crate) async fn send(
        &self,
        target: &Target,
        h2: bool,
        connect_headers: &(dyn Fn() -> HeaderMap + Sync),
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, bool), SendError> {
        let key = Key {
            addr: target.addr,
            h2,
        };
        if h2 {
            let existing = match self.lock().get(&key) {
                Some(Entry::H2(s)) if !s.is_closed() => Some(s.clone()),
                _ => None,
            };
            let fresh = existing.is_none();
            let mut sender = match existing {
                Some(s) => s,
                None => {
                    let io = self.connect(target, connect_headers).await?;
                    let (s, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(hyper_util::rt::TokioTimer::new())
                        .keep_alive_interval(Duration::from_secs(30))
                        .handshake(io)
                        .await
                        .map_err(|e| SendError::Connect {
                            addr: target.addr,
                            message: format!("HTTP/2 handshake: {e}"),
                        })?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
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
        let mut sender =
            match idle {
                Some(s) => s,
                None => {
                    let io = self.connect(target, connect_headers).await?;
                    let (s, conn) = http1::Builder::new().handshake(io).await.map_err(|e| {
                        SendError::Connect {
                            addr: target.addr,
                            message: format!("HTTP/1.1 handshake: {e}"),
                        }
                    })?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    s
                }
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
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
