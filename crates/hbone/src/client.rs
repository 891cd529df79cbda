//! Outbound HBONE: pooled mTLS + HTTP/2 connections to peers' port 15008, one CONNECT stream
//! per tunnelled TCP connection.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use isthmus_socket::SocketFactory;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::Instrument;

use crate::request::{RecvBody, TAKES_REQUESTS_HEADER};
use crate::stream::HboneStream;
use crate::tls::{self, Credentials, CredentialsWatch, TlsError};
use crate::REASON_HEADER;

/// Tuning of the outbound side. `Default` matches what the agent uses.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bound on TCP connect + TLS handshake + HTTP/2 handshake to a peer, and on the CONNECT reply.
    pub connect_timeout: Duration,
    /// Streams opened on one connection before another is opened (the peer's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` lowers it further).
    pub max_streams_per_connection: usize,
    /// HTTP/2 per-stream receive window.
    pub stream_window: u32,
    /// HTTP/2 per-connection receive window.
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept.
    pub max_frame_size: u32,
    /// A pooled connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` for the peer's responses (h2's default, 16 MiB, would
    /// let a hostile server make us buffer that much per stream).
    pub max_header_list_size: u32,
    /// Makes the TCP connections to peers (the agent's: marked, with keepalive).
    pub sockets: Arc<SocketFactory>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            max_streams_per_connection: 100,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            // As ztunnel's POOL_UNUSED_RELEASE_TIMEOUT.
            idle_timeout: Duration::from_secs(5 * 60),
            // A CONNECT reply is a status and perhaps a reason.
            max_header_list_size: 16 * 1024,
            sockets: SocketFactory::unmarked(),
        }
    }
}

/// Why an HBONE tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no expected identities for {target}: refusing to tunnel to an unauthenticated peer (does the service list subject_alt_names or the workload a service account?)")]
    NoExpectedIdentity { target: SocketAddr },
    #[error("connecting to HBONE port {dst} failed: {source} (is the agent running on {} and port {} open?)", dst.ip(), dst.port())]
    Connect {
        dst: SocketAddr,
        source: std::io::Error,
    },
    #[error("HBONE connection to {dst} did not complete within {timeout:?}")]
    Timeout { dst: SocketAddr, timeout: Duration },
    #[error("wrong peer at {dst}: server presented identity {found} but one of [{}] was expected", expected.join(", "))]
    ServerIdentity {
        dst: SocketAddr,
        found: String,
        expected: Vec<String>,
    },
    #[error("TLS handshake with {dst} failed: {source}")]
    Handshake {
        dst: SocketAddr,
        source: std::io::Error,
    },
    #[error("peer {dst} did not negotiate ALPN h2: it is not an HBONE endpoint")]
    NoH2 { dst: SocketAddr },
    #[error("peer {dst} refused our certificate ({alert}): is our workload certificate issued by the mesh CA the peer trusts?")]
    CertificateRefused { dst: SocketAddr, alert: String },
    #[error("HTTP/2 with {dst} failed: {source}")]
    H2 { dst: SocketAddr, source: h2::Error },
    #[error("peer {dst} refused CONNECT to {target}: {status} {reason}")]
    Rejected {
        dst: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
        reason: String,
    },
    #[error("invalid CONNECT request to {target}: {reason}")]
    BadRequest { target: SocketAddr, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    dst: SocketAddr,
    expected: Vec<String>,
}

struct PooledConn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    usage: Arc<Usage>,
    creds: Arc<Credentials>,
    kick: crate::io::Kick,
}

/// What the pool and the connection's driver task share.
struct Usage {
    /// Streams open (or being opened) on the connection.
    active: AtomicUsize,
    /// Set when the connection ended or was retired; checkout skips it.
    closed: AtomicBool,
    /// When `active` last went to 0, in milliseconds after `epoch`.
    idle_since_ms: AtomicU64,
    epoch: tokio::time::Instant,
}

impl Usage {
    fn new() -> Self {
        Self {
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
        }
    }

    fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn release(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ms = self.epoch.elapsed().as_millis() as u64;
            self.idle_since_ms.store(ms, Ordering::Release);
        }
    }

    /// Resolves once the connection has had no stream for `timeout`, marking it closed first
    /// so no checkout picks it again.
    async fn idle(&self, timeout: Duration) {
        loop {
            let wait = if self.active() > 0 {
                timeout
            } else {
                let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                let idle_for = self.epoch.elapsed().saturating_sub(since);
                if idle_for >= timeout {
                    self.close();
                    // A checkout may have raced the flag; that stream keeps the connection.
                    if self.active() == 0 {
                        return;
                    }
                    timeout
                } else {
                    timeout - idle_for
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

impl PooledConn {
    fn capacity(&self, cap: usize) -> usize {
        cap.min(self.send.current_max_send_streams())
    }
}

/// Holds one stream slot on a pooled connection until the stream is dropped.
struct Slot(Arc<PooledConn>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.usage.release();
    }
}

type Bucket = Arc<tokio::sync::Mutex<Vec<Arc<PooledConn>>>>;

struct Inner {
    creds: CredentialsWatch,
    options: ClientOptions,
    pool: Mutex<HashMap<PoolKey, Bucket>>,
    next_id: AtomicU64,
    /// Peers (their HBONE address) whose CONNECT answers said they take direct requests.
    takes_requests: Mutex<HashSet<SocketAddr>>,
}

/// Opens HBONE tunnels. Cheap to clone; clones share the connection pool.
///
/// Connection driver tasks run on the runtime that calls [`HboneClient::connect`]; call it from
/// the data-plane runtime.
#[derive(Clone)]
pub struct HboneClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HboneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneClient")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl HboneClient {
    pub fn new(creds: CredentialsWatch, options: ClientOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                creds,
                options,
                pool: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                takes_requests: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Number of live (not closed) pooled connections, across all destinations.
    pub async fn pooled_connections(&self) -> usize {
        let buckets: Vec<Bucket> = self.lock_pool().values().cloned().collect();
        let mut n = 0;
        for b in buckets {
            n += b
                .lock()
                .await
                .iter()
                .filter(|c| !c.usage.is_closed())
                .count();
        }
        n
    }

    /// Connections the pool lists, live or not yet cleared: a connection leaves the list when
    /// its driver ends, and a destination's entry with its last connection.
    pub async fn pool_entries(&self) -> (usize, usize) {
        let buckets: Vec<Bucket> = self.lock_pool().values().cloned().collect();
        let mut n = 0;
        for b in &buckets {
            n += b.lock().await.len();
        }
        (buckets.len(), n)
    }

    /// Opens a tunnel to `target` (`<workload ip>:<port>`) through the peer's HBONE port `dst`
    /// (`<workload ip>:15008`). The peer must present one of the `expected` SPIFFE identities.
    /// `headers` (e.g. `baggage`, `forwarded`, `traceparent`) are sent on the CONNECT request.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        target: SocketAddr,
        expected: &[String],
        headers: &HeaderMap,
    ) -> Result<HboneStream, HboneError> {
        let key = pool_key(dst, target, expected)?;
        let uri = Uri::try_from(target.to_string()).map_err(|e| HboneError::BadRequest {
            target,
            reason: e.to_string(),
        })?;
        let span = tracing::debug_span!("hbone_stream", %dst, %target);
        async {
            // One retry: a pooled connection can die (GOAWAY, reset) between checkout and use.
            let mut attempt = 0;
            loop {
                attempt += 1;
                let slot = self.checkout(&key).await?;
                match self.open_stream(dst, &slot, &uri, headers).await {
                    Ok((send, recv)) => {
                        let kick = slot.0.kick.clone();
                        return Ok(HboneStream::new(send, recv, Some(Box::new(slot)), kick));
                    }
                    Err(StreamError::H2(source)) if refused_alert(&source).is_some() => {
                        slot.0.usage.close();
                        let alert = refused_alert(&source).unwrap_or_default();
                        return Err(HboneError::CertificateRefused { dst, alert });
                    }
                    Err(source) if attempt == 1 && !source.is_remote() => {
                        tracing::debug!(conn = slot.0.id, error = %source, "pooled connection unusable, retrying on a new one");
                        slot.0.usage.close();
                    }
                    Err(StreamError::H2(source)) => {
                        slot.0.usage.close();
                        return Err(HboneError::H2 { dst, source });
                    }
                    Err(StreamError::Timeout) => {
                        return Err(HboneError::Timeout {
                            dst,
                            timeout: self.inner.options.connect_timeout,
                        })
                    }
                    Err(StreamError::Rejected { status, reason }) => {
                        return Err(HboneError::Rejected {
                            dst,
                            target,
                            status,
                            reason,
                        })
                    }
                    Err(StreamError::Build(reason)) => {
                        return Err(HboneError::BadRequest { target, reason })
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn open_stream(
        &self,
        dst: SocketAddr,
        slot: &Slot,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), StreamError> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(uri.clone())
            .version(http::Version::HTTP_2)
            .body(())
            .map_err(|e| StreamError::Build(e.to_string()))?;
        *req.headers_mut() = headers.clone();
        let timeout = self.inner.options.connect_timeout;
        let exchange = async {
            let mut send = slot.0.send.clone().ready().await?;
            let (resp, stream) = send.send_request(req, false)?;
            let resp = resp.await?;
            Ok::<_, h2::Error>((resp, stream))
        };
        let (resp, send) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| StreamError::Timeout)?
            .map_err(StreamError::H2)?;
        if resp.status() != StatusCode::OK {
            let reason = resp
                .headers()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            return Err(StreamError::Rejected {
                status: resp.status(),
                reason,
            });
        }
        if resp.headers().contains_key(TAKES_REQUESTS_HEADER) {
            self.lock_takes().insert(dst);
        }
        Ok((send, resp.into_body()))
    }

    fn lock_takes(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
        self.inner
            .takes_requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the peer at `dst` (its HBONE address) said it takes direct requests
    /// ([`crate::request`]): learnt from its answer to a CONNECT.
    pub fn takes_requests(&self, dst: SocketAddr) -> bool {
        self.lock_takes().contains(&dst)
    }

    /// Sends `req` as a stream of the pooled connection to the peer at `dst`, for
    /// `target` (`<workload ip>:<port>`); the peer must present one of the `expected`
    /// identities. `req` must be in HTTP/2 form (an absolute URI, no connection-specific
    /// headers). The request body is sent by a task of its own; the response's body keeps the
    /// stream's pool slot until it is read or dropped.
    ///
    /// A refusal by the peer's HBONE server (its target checks) is an error; a peer that
    /// refuses with 405 (replaced by one that does not take requests) is forgotten as one
    /// that does, so the next request tunnels again.
    pub async fn request<B>(
        &self,
        dst: SocketAddr,
        target: SocketAddr,
        expected: &[String],
        req: Request<B>,
    ) -> Result<Response<RecvBody>, HboneError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<crate::request::BoxError>,
    {
        let key = pool_key(dst, target, expected)?;
        let (mut parts, body) = req.into_parts();
        let value = http::HeaderValue::try_from(target.to_string()).map_err(|e| {
            HboneError::BadRequest {
                target,
                reason: e.to_string(),
            }
        })?;
        parts.headers.insert(crate::request::TARGET_HEADER, value);
        // The head and the first of the body leave together.
        let body =
            crate::request::Outgoing::start(body)
                .await
                .map_err(|e| HboneError::BadRequest {
                    target,
                    reason: format!("reading the request body: {e}"),
                })?;
        let end = body.is_empty();
        let mut body = Some(body);
        let head = Request::from_parts(parts, ());
        // One retry, as for tunnels: a pooled connection can die between checkout and use
        // (found when it is not ready; the head is not sent then).
        let mut attempt = 0;
        loop {
            attempt += 1;
            let slot = self.checkout(&key).await?;
            let mut send = match slot.0.send.clone().ready().await {
                Ok(s) => s,
                Err(e) if attempt == 1 && !(e.is_remote() && e.is_reset()) => {
                    tracing::debug!(conn = slot.0.id, error = %e, "pooled connection unusable, retrying on a new one");
                    slot.0.usage.close();
                    continue;
                }
                Err(source) => {
                    slot.0.usage.close();
                    return Err(HboneError::H2 { dst, source });
                }
            };
            let (resp, mut stream) = match send.send_request(head, end) {
                Ok(v) => v,
                Err(source) => {
                    slot.0.usage.close();
                    return Err(HboneError::H2 { dst, source });
                }
            };
            if let Some(mut body) = body.take().filter(|_| !end) {
                match body.send_first(&mut stream) {
                    Ok(true) => {
                        tokio::spawn(async move {
                            if let Err(e) = body.finish(stream).await {
                                tracing::debug!(error = %e, "a direct request's body failed");
                            }
                        });
                    }
                    Ok(false) => {}
                    Err(e) => tracing::debug!(error = %e, "a direct request's body failed"),
                }
            }
            let resp = resp
                .await
                .map_err(|source| HboneError::H2 { dst, source })?;
            // Refused by the peer's HBONE server itself (not answered by the application):
            // its reason header says why.
            if let Some(reason) = resp.headers().get(REASON_HEADER) {
                let status = resp.status();
                if status == StatusCode::METHOD_NOT_ALLOWED {
                    self.lock_takes().remove(&dst);
                }
                return Err(HboneError::Rejected {
                    dst,
                    target,
                    status,
                    reason: String::from_utf8_lossy(reason.as_bytes()).into_owned(),
                });
            }
            let (p, recv) = resp.into_parts();
            return Ok(Response::from_parts(
                p,
                RecvBody::new(recv, Some(Box::new(slot))),
            ));
        }
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Bucket>> {
        // The map is only ever mutated by infallible inserts; a poisoned lock still holds a
        // consistent map.
        self.inner
            .pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves a stream slot on a connection to `key`, opening a connection if every live one
    /// is saturated or was made with superseded credentials.
    async fn checkout(&self, key: &PoolKey) -> Result<Slot, HboneError> {
        let creds = self
            .inner
            .creds
            .borrow()
            .clone()
            .ok_or(TlsError::NoCredentials)?;
        let bucket = self.lock_pool().entry(key.clone()).or_default().clone();
        // Held across the handshake so concurrent callers share the connection being opened.
        let mut conns = bucket.lock().await;
        conns.retain(|c| {
            let live = !c.usage.is_closed();
            let stale = !Arc::ptr_eq(&c.creds, &creds);
            live && !(stale && c.usage.active() == 0)
        });
        let cap = self.inner.options.max_streams_per_connection.max(1);
        for c in conns.iter() {
            if !Arc::ptr_eq(&c.creds, &creds) {
                continue;
            }
            if c.usage.active() < c.capacity(cap) && !c.usage.is_closed() {
                c.usage.active.fetch_add(1, Ordering::AcqRel);
                return Ok(Slot(c.clone()));
            }
        }
        let conn = Arc::new(self.open_connection(key, creds).await?);
        conn.usage.active.fetch_add(1, Ordering::AcqRel);
        conns.push(conn.clone());
        Ok(Slot(conn))
    }

    async fn open_connection(
        &self,
        key: &PoolKey,
        creds: Arc<Credentials>,
    ) -> Result<PooledConn, HboneError> {
        let dst = key.dst;
        let opts = &self.inner.options;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let cfg = tls::client_config(&creds, &key.expected)?;
        let handshake = async {
            // Nodelay comes with the factory: tunnels carry interactive traffic; batching
            // belongs to the application.
            let tcp = opts
                .sockets
                .connect(dst)
                .await
                .map_err(|source| HboneError::Connect { dst, source })?;
            let socket = crate::io::buffered(tcp);
            let cork = socket.cork();
            let tls = TlsConnector::from(cfg)
                .connect(ServerName::IpAddress(dst.ip().into()), socket)
                .await
                .map_err(|source| match tls::peer_identity_error(&source) {
                    Some(tls::PeerIdentityError::Mismatch { found, expected }) => {
                        HboneError::ServerIdentity {
                            dst,
                            found: found.clone(),
                            expected: expected.clone(),
                        }
                    }
                    Some(tls::PeerIdentityError::Missing { expected }) => {
                        HboneError::ServerIdentity {
                            dst,
                            found: "<none>".to_string(),
                            expected: expected.clone(),
                        }
                    }
                    None => HboneError::Handshake { dst, source },
                })?;
            if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
                return Err(HboneError::NoH2 { dst });
            }
            h2::client::Builder::new()
                .initial_window_size(opts.stream_window)
                .initial_connection_window_size(opts.connection_window)
                .max_frame_size(opts.max_frame_size)
                .max_header_list_size(opts.max_header_list_size)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await
                .map(|(send, connection)| (send, connection, cork))
                .map_err(|source| HboneError::H2 { dst, source })
        };
        let (send, connection, cork) = tokio::time::timeout(opts.connect_timeout, handshake)
            .await
            .map_err(|_| HboneError::Timeout {
                dst,
                timeout: opts.connect_timeout,
            })??;
        let usage = Arc::new(Usage::new());
        let driver_usage = usage.clone();
        let idle_timeout = opts.idle_timeout;
        let pool = Arc::downgrade(&self.inner);
        let key = key.clone();
        let span = tracing::info_span!("hbone_conn", conn = id, %dst);
        let driver = crate::io::Corked::new(cork, |_| {
            async move {
                tracing::debug!("connection established");
                tokio::select! {
                    r = connection => match r {
                        Ok(()) => tracing::debug!("connection closed"),
                        Err(e) => tracing::debug!(error = %e, "connection failed"),
                    },
                    // Dropping the connection closes the socket; no stream is open on it.
                    () = driver_usage.idle(idle_timeout) => {
                        tracing::debug!(?idle_timeout, "idle connection closed");
                    }
                }
                driver_usage.close();
                if let Some(inner) = pool.upgrade() {
                    forget(&inner, &key, id).await;
                }
            }
            // Inside: a stream's kick polls this future outside the task's span.
            .instrument(span)
        });
        let kick = driver.kick();
        tokio::spawn(driver);
        Ok(PooledConn {
            id,
            send,
            usage,
            creds,
            kick,
        })
    }
}

/// The pool key of connections to `dst` that present one of `expected` (sorted, deduplicated);
/// none expected is refused.
fn pool_key(
    dst: SocketAddr,
    target: SocketAddr,
    expected: &[String],
) -> Result<PoolKey, HboneError> {
    let mut expected = expected.to_vec();
    expected.sort();
    expected.dedup();
    if expected.is_empty() {
        return Err(HboneError::NoExpectedIdentity { target });
    }
    Ok(PoolKey { dst, expected })
}

/// Drops the ended connection `id` from its destination's list, and the destination's entry
/// once nothing is left in it and nobody else holds it (so a pool that has talked to many
/// destinations does not keep an entry for each forever).
async fn forget(inner: &Inner, key: &PoolKey, id: u64) {
    let lock = || inner.pool.lock().unwrap_or_else(|p| p.into_inner());
    let Some(bucket) = lock().get(key).cloned() else {
        return;
    };
    let empty = {
        let mut conns = bucket.lock().await;
        conns.retain(|c| c.id != id);
        conns.is_empty()
    };
    if empty {
        let mut map = lock();
        // Under the map's lock nobody can take a new reference to the bucket; the map's and
        // ours are the only ones unless a checkout is in flight, which then keeps it.
        if map.get(key).is_some_and(|b| Arc::ptr_eq(b, &bucket)) && Arc::strong_count(&bucket) == 2
        {
            map.remove(key);
        }
    }
}

/// In TLS 1.3 the server judges our certificate after our handshake completed, so its refusal
/// surfaces on the first HTTP/2 exchange as a received alert.
/// h2 flattens I/O errors to kind + message, so the rustls error can only be recognised by text.
fn refused_alert(e: &h2::Error) -> Option<String> {
    let msg = e.get_io()?.to_string();
    msg.contains("received fatal alert").then_some(msg)
}

enum StreamError {
    H2(h2::Error),
    Timeout,
    Rejected { status: StatusCode, reason: String },
    Build(String),
}

impl StreamError {
    /// True when the peer answered (retrying elsewhere would not help).
    fn is_remote(&self) -> bool {
        match self {
            StreamError::H2(e) => e.is_remote() && e.is_reset(),
            StreamError::Timeout | StreamError::Build(_) => true,
            StreamError::Rejected { .. } => true,
        }
    }
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::H2(e) => write!(f, "{e}"),
            StreamError::Timeout => f.write_str("timed out"),
            StreamError::Rejected { status, reason } => write!(f, "{status} {reason}"),
            StreamError::Build(r) => f.write_str(r),
        }
    }
}
