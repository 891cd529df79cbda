//! The server side on HTTP ports: requests that arrive in an HBONE stream are parsed,
//! authorized one by one against the whole AuthorizationPolicies ([`super::authz`]: methods,
//! paths, hosts, `when` conditions), forwarded to the local application over one connection,
//! and reported with `reporter="destination"`. A denial answers 403 `RBAC: access denied`,
//! as Istio's proxies do.
//!
//! The HBONE server hands the accepted tunnel over ([`isthmus_hbone::Decision::Serve`]) and
//! this serves HTTP on it directly.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_hbone::{Baggage, TraceParent};
use isthmus_model::traffic::PortProtocol;
use isthmus_xds::client::{State, Workload};
use isthmus_xds::Identity;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Mutex};

use super::authz::Headers;
use super::pool::{Body, BoxError};
use super::telemetry::{
    code_label, known, Fixed, Grpc, IstioMetrics, Reporter, RequestLabels, SeriesCache,
};
use crate::proxy::authz::Verdict;
use crate::proxy::metrics::Known;
use crate::proxy::ACCESS_LOG_TARGET;

/// The protocol of the local workload's `port`, from the services it serves (the first that
/// declares one).
pub fn protocol(state: &State, w: &Workload, port: u16) -> PortProtocol {
    for (key, ports) in &w.services {
        for p in ports.iter().filter(|p| p.target_port == port) {
            if let Some(t) = state.traffic(key) {
                if let Some(proto) = t.ports.get(&p.service_port) {
                    return *proto;
                }
            }
        }
    }
    PortProtocol::Undeclared
}

/// What the server side knows of the connection.
pub struct Peer {
    pub identity: Option<Identity>,
    pub identity_text: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub source: Baggage,
    pub trace: Option<TraceParent>,
}

/// Serves HTTP from `tunnel` (the accepted HBONE stream) to `app` (the admitted connection
/// to the local application) until either side closes: HTTP/1.1 through the relay
/// ([`super::relay`]), HTTP/2 (the tunnel starts with its preface) through hyper.
pub async fn serve<T, A>(
    mut tunnel: T,
    app: A,
    peer: Peer,
    state: watch::Receiver<Arc<State>>,
    metrics: Arc<IstioMetrics>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    let preface = super::relay::PREFACE;
    let mut first = bytes::BytesMut::with_capacity(16 * 1024);
    // Enough to tell the HTTP/2 preface from an HTTP/1.1 request line.
    while first.len() < preface.len() && preface.starts_with(&first) {
        match tunnel.read_buf(&mut first).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    if !first.starts_with(preface) {
        let mut hooks = Relayed {
            peer: &peer,
            state: &state,
            metrics: &metrics,
            series: Series::default(),
        };
        return super::relay::serve(tunnel, first, app, &mut hooks).await;
    }
    let tunnel = super::relay::Prefixed::new(first.freeze(), tunnel);
    let app = Arc::new(Mutex::new(AppConn::Idle(Some(app))));
    let peer = Arc::new(peer);
    let series: Arc<Series> = Arc::default();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (app, peer, state, metrics, series) = (
            app.clone(),
            peer.clone(),
            state.clone(),
            metrics.clone(),
            series.clone(),
        );
        async move {
            let state = state.borrow().clone();
            let send = |r| async move {
                let (p, b) = send(&app, r).await?.into_parts();
                Ok(Response::from_parts(
                    p,
                    b.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
                ))
            };
            Ok::<_, Infallible>(handle(req, send, &peer, &state, &metrics, &series).await)
        }
    });
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http2_only();
    b.http2().timer(super::timer::CoarseTimer);
    if let Err(e) = b.serve_connection(TokioIo::new(tunnel), svc).await {
        tracing::debug!(error = %e, "inbound HTTP/2 connection ended with an error");
    }
}

/// The mesh around the HTTP/1.1 relay: authorization policies on each request head, and
/// Istio's metrics and access log for each request, as [`handle`] on hyper's side.
struct Relayed<'a> {
    peer: &'a Peer,
    state: &'a watch::Receiver<Arc<State>>,
    metrics: &'a IstioMetrics,
    series: Series,
}

/// The verdict of the policies of `workload` (the local workload at the peer's destination;
/// none: refused) on one request.
fn authorize(
    state: &State,
    workload: Option<&Arc<Workload>>,
    peer: &Peer,
    method: &str,
    path: &str,
    host: &str,
    headers: Headers<'_>,
) -> Verdict {
    match workload {
        None => Verdict::Deny(format!(
            "no workload at {} in this agent's discovery state",
            peer.dst.ip()
        )),
        Some(w) => super::authz::evaluate(
            super::authz::applicable(state, w),
            &super::authz::HttpRequest {
                peer: peer.identity.as_ref(),
                src: peer.src.ip(),
                port: peer.dst.port(),
                method,
                path,
                host,
                headers,
            },
        ),
    }
}

/// What [`Relayed`] keeps of a request until it ends.
struct Ticket {
    workload: Option<Arc<Workload>>,
    verdict: Verdict,
    grpc: bool,
    method: http::Method,
    /// For the access log only (empty when it is off).
    path: String,
}

impl super::relay::Hooks for Relayed<'_> {
    type Ticket = Ticket;

    fn admit(&mut self, h: &super::relay::RequestHead<'_>) -> (bool, Ticket) {
        let state = self.state.borrow();
        let workload = state.workload_by_address(self.peer.dst.ip());
        let verdict = authorize(
            &state,
            workload,
            self.peer,
            h.method,
            h.path,
            h.host,
            Headers::Raw(h.headers),
        );
        let ticket = Ticket {
            workload: workload.cloned(),
            grpc: h.grpc,
            method: http::Method::from_bytes(h.method.as_bytes()).unwrap_or_default(),
            path: if tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO) {
                super::clip_path(h.path)
            } else {
                String::new()
            },
            verdict,
        };
        (ticket.verdict.is_allowed(), ticket)
    }

    fn done(&mut self, t: Ticket, end: &super::relay::End) {
        report(
            self.peer,
            self.metrics,
            &self.series,
            Reported {
                workload: t.workload,
                status: end.status,
                // gRPC needs HTTP/2; one over HTTP/1.1 is still labelled as such.
                grpc: t.grpc.then_some(0),
                flags: end.flags,
                protocol: if t.grpc { "grpc" } else { "http" },
                millis: end.duration.as_secs_f64() * 1000.0,
                req_bytes: end.req_bytes,
                resp_bytes: end.resp_bytes,
                method: &t.method,
                path: &t.path,
                reason: t.verdict.reason(),
            },
        );
    }

    fn malformed(&mut self, bad: &super::relay::Bad) {
        let workload = self
            .state
            .borrow()
            .workload_by_address(self.peer.dst.ip())
            .cloned();
        report(
            self.peer,
            self.metrics,
            &self.series,
            Reported {
                workload,
                status: bad.status,
                grpc: None,
                flags: "DPE",
                protocol: "http",
                millis: 0.0,
                req_bytes: 0,
                resp_bytes: 0,
                method: &http::Method::default(),
                path: "",
                reason: &bad.reason,
            },
        );
    }
}

/// What the labels of one peer's requests vary by (the peer is the same for all).
#[derive(Clone, Debug)]
pub struct InKey {
    workload: Option<Arc<Workload>>,
    code: u16,
    grpc: Option<u32>,
    flags: &'static str,
    protocol: &'static str,
}

impl PartialEq for InKey {
    fn eq(&self, o: &Self) -> bool {
        let same = match (&self.workload, &o.workload) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same && (self.code, self.grpc, self.flags, self.protocol)
            == (o.code, o.grpc, o.flags, o.protocol)
    }
}

/// The HTTP/2 connection to the local application, opened at the first request (HTTP/1.1
/// goes through [`super::relay`]).
enum AppConn<A> {
    Idle(Option<A>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

async fn send<A>(app: &Mutex<AppConn<A>>, req: Request<Body>) -> Result<Response<Incoming>, String>
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut guard = app.lock().await;
    if let AppConn::Idle(io) = &mut *guard {
        let Some(io) = io.take() else {
            return Err("the application connection is gone".into());
        };
        // Boxed: once per connection, and every request's future would carry its size.
        let (s, c) = Box::pin(hyper::client::conn::http2::handshake(
            TokioExecutor::new(),
            TokioIo::new(io),
        ))
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        *guard = AppConn::H2(s);
    }
    let AppConn::H2(s) = &*guard else {
        return Err("the application connection is gone".into());
    };
    let mut s = s.clone();
    drop(guard);
    s.ready().await.map_err(|e| e.to_string())?;
    s.send_request(req).await.map_err(|e| e.to_string())
}

/// The metric series of one peer's requests (the labels vary by these keys only).
pub type Series = SeriesCache<InKey>;

/// Authorizes one request from `peer`, has `send` forward it to the local application,
/// records its metrics in `series` and writes its access-log line.
pub async fn handle<B, F, Fut>(
    req: Request<B>,
    send: F,
    peer: &Peer,
    state: &State,
    metrics: &IstioMetrics,
    series: &Series,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
    F: FnOnce(Request<Body>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Body>, String>>,
{
    let start = Instant::now();
    let workload = state.workload_by_address(peer.dst.ip()).cloned();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
        })
        .unwrap_or_default();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let protocol = if grpc { "grpc" } else { "http" };
    let verdict = authorize(
        state,
        workload.as_ref(),
        peer,
        req.method().as_str(),
        req.uri().path(),
        host,
        Headers::Map(req.headers()),
    );
    let method = req.method().clone();
    // Built only when the access log is on, as on the outbound side.
    let log = tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO);
    let path = if log {
        crate::proxy::l7::clip_path(req.uri().path())
    } else {
        String::new()
    };
    let (resp, flags, req_bytes) = if !verdict.is_allowed() {
        let mut r = Response::new(
            Full::new(Bytes::from_static(b"RBAC: access denied"))
                .map_err(|e| match e {})
                .boxed(),
        );
        *r.status_mut() = StatusCode::FORBIDDEN;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        (r, "DENY", 0)
    } else {
        let (parts, body) = req.into_parts();
        let size = body_size(&parts.headers);
        let body: Body = body.map_err(Into::into).boxed();
        match send(Request::from_parts(parts, body)).await {
            Ok(r) => (r, "-", size),
            Err(e) => {
                let mut r = Response::new(
                    Full::new(Bytes::from(format!(
                        "upstream connect error or disconnect/reset before headers: {e}\n"
                    )))
                    .map_err(|e| match e {})
                    .boxed(),
                );
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                (r, "UC", size)
            }
        }
    };
    let status = resp.status();
    let grpc_status = resp
        .headers()
        .get(super::GRPC_STATUS)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    report(
        peer,
        metrics,
        series,
        Reported {
            workload,
            status: status.as_u16(),
            grpc: grpc.then(|| grpc_status.unwrap_or(0)),
            flags,
            protocol,
            millis: start.elapsed().as_secs_f64() * 1000.0,
            req_bytes,
            resp_bytes: body_size(resp.headers()),
            method: &method,
            path: &path,
            reason: verdict.reason(),
        },
    );
    resp
}

/// One finished request, as [`report`] records it.
pub struct Reported<'a> {
    /// The local workload the request was for (none: no workload at its address).
    pub workload: Option<Arc<Workload>>,
    pub status: u16,
    pub grpc: Option<u32>,
    pub flags: &'static str,
    pub protocol: &'static str,
    pub millis: f64,
    pub req_bytes: u64,
    pub resp_bytes: u64,
    pub method: &'a http::Method,
    /// For the access log (empty when it is off).
    pub path: &'a str,
    pub reason: &'a str,
}

/// Records one request of `peer`'s in its metric series (`reporter="destination"`) and
/// writes its access-log line when that log is on.
pub fn report(peer: &Peer, metrics: &IstioMetrics, series: &Series, r: Reported<'_>) {
    let w = r.workload.as_deref();
    let src = &peer.source;
    let key = InKey {
        workload: r.workload.clone(),
        code: r.status,
        grpc: r.grpc,
        flags: r.flags,
        protocol: r.protocol,
    };
    let handles = series.get(key, || {
        let (svc_ns, svc_host) = w
            .and_then(|w| w.services.keys().next())
            .and_then(|k| k.split_once('/'))
            .unwrap_or(("", ""));
        metrics.handles(&RequestLabels {
            reporter: Reporter::Destination,
            source_workload: Known(src.workload_name.clone()),
            source_workload_namespace: Known(src.namespace.clone()),
            source_principal: known(peer.identity_text.trim_start_matches("spiffe://")),
            source_app: Known(src.service_name.clone()),
            source_version: Known(src.service_version.clone()),
            source_cluster: Known(src.cluster_id.clone()),
            destination_workload: w.map_or(Known(None), |w| known(&w.name)),
            destination_workload_namespace: w.map_or(Known(None), |w| known(&w.namespace)),
            destination_principal: w.map_or(Known(None), |w| {
                known(w.identity().to_string().trim_start_matches("spiffe://"))
            }),
            destination_app: w.map_or(Known(None), |w| known(&w.canonical_name)),
            destination_version: w.map_or(Known(None), |w| known(&w.canonical_revision)),
            destination_service: known(svc_host),
            destination_service_name: known(svc_host.split('.').next().unwrap_or("")),
            destination_service_namespace: known(svc_ns),
            destination_cluster: w.map_or(Known(None), |w| known(&w.cluster_id)),
            request_protocol: Fixed(r.protocol),
            response_code: code_label(r.status),
            grpc_response_status: Grpc(r.grpc),
            response_flags: Fixed(r.flags),
            connection_security_policy: Fixed(if peer.identity.is_some() {
                "mutual_tls"
            } else {
                "none"
            }),
        })
    });
    handles.record(r.millis, r.req_bytes, r.resp_bytes);
    if !tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO) {
        return;
    }
    tracing::info!(
        target: ACCESS_LOG_TARGET,
        direction = "inbound",
        protocol = r.protocol,
        src = %peer.src,
        identity = %peer.identity_text,
        method = %r.method,
        path = %r.path,
        status = r.status,
        flags = r.flags,
        reason = r.reason,
        duration_ms = r.millis as u64,
        trace_id = %isthmus_hbone::OrDash(peer.trace.map(|t| t.trace_id)),
        "request"
    );
}

/// The body size a message announces (0 when it does not).
fn body_size(h: &http::HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

/// A request received in HTTP/2 form (authority in the URI) as HTTP/1.1 sends it: origin-form
/// target, the authority in `host`.
pub fn http1_form(req: Request<Body>) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    if let Some(a) = parts.uri.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Ok(u) = pq.parse() {
            parts.uri = u;
        }
    }
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body)
}
