//! HTTP-aware outbound (docs/design/http.md): on HTTP ports the proxy terminates the
//! application's HTTP (HTTP/1.1 and h2c), decides per request ([`route`]), picks an endpoint
//! per request ([`balance`]), carries the request over a pooled upstream connection
//! ([`pool`]), retries within a budget ([`budget`]) and reports Istio's request metrics
//! ([`telemetry`]) and an access log line.

pub mod authz;
pub mod balance;
pub mod budget;
mod client;
pub mod inbound;
pub mod pool;
pub mod relay;
pub mod route;
pub mod telemetry;
pub mod timer;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_hbone::metadata::{self as hmeta, TraceParent};
use isthmus_model::traffic::{LoadBalancerSettings, PortProtocol, ServiceTraffic};
use isthmus_xds::client::{Service, State, Workload};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use self::balance::{Balancer, Result5xx};
use self::budget::RetryBudget;
use self::pool::{Body, BoxError, SendError, UpstreamPool};
use self::route::{Action, Decision, RequestView, Routes, WeightedDest};
use self::telemetry::{code_label, known, Fixed, Grpc, IstioMetrics, Reporter, RequestLabels};
use super::metadata::{LocalWatch, LocalWorkload};
use super::metrics::Known;
use super::outbound::{service_target, Target};
use super::ACCESS_LOG_TARGET;

/// Request bodies up to this size are kept so that a retry can send them again; larger ones
/// are streamed and not retried (as Linkerd does).
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

/// How long the outbound side waits for an undeclared port's first bytes before it treats
/// the connection as TCP (Istio's protocol detection timeout).
pub const DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    H2c,
    /// Not HTTP.
    Other,
    /// Too few bytes to tell.
    NeedMore,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Classifies a connection's first bytes.
pub fn sniff(bytes: &[u8]) -> Sniffed {
    let fits = |want: &[u8]| {
        let n = bytes.len().min(want.len());
        bytes[..n] == want[..n]
    };
    if bytes.len() >= PREFACE.len() && bytes.starts_with(PREFACE) {
        return Sniffed::H2c;
    }
    if METHODS
        .iter()
        .any(|m| bytes.len() >= m.len() && bytes.starts_with(m))
    {
        return Sniffed::Http1;
    }
    if fits(PREFACE) || METHODS.iter().any(|m| fits(m)) {
        return Sniffed::NeedMore;
    }
    Sniffed::Other
}

/// Peeks at `tcp` until its first bytes tell HTTP from anything else, or `timeout` passes
/// (`None`: no bound). Nothing is consumed.
pub async fn detect(tcp: &tokio::net::TcpStream, timeout: Option<Duration>) -> Sniffed {
    let mut buf = [0u8; 24];
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last = 0;
    loop {
        let peek = tcp.peek(&mut buf);
        let n = match deadline {
            Some(d) => match tokio::time::timeout_at(d, peek).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => return Sniffed::Other,
                Err(_) => return Sniffed::Other,
            },
            None => match peek.await {
                Ok(n) => n,
                Err(_) => return Sniffed::Other,
            },
        };
        if n == 0 {
            return Sniffed::Other;
        }
        match sniff(&buf[..n]) {
            Sniffed::NeedMore if n > last => {
                last = n;
                // More bytes are on their way: peek returns at once while data is queued,
                // so wait a moment before looking again.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Sniffed::NeedMore => tokio::time::sleep(Duration::from_millis(1)).await,
            s => return s,
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Sniffed::Other;
        }
    }
}

/// Per-destination counters for the DestinationRule's connection pool limits.
#[derive(Debug, Default)]
struct Limits {
    active: AtomicUsize,
    retries: AtomicUsize,
}

struct Count(Arc<Limits>, bool);

impl Drop for Count {
    fn drop(&mut self) {
        if self.1 {
            self.0.retries.fetch_sub(1, Ordering::AcqRel);
        } else {
            self.0.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The HTTP side of the outbound listener, shared by all its connections.
pub struct HttpOutbound {
    state: watch::Receiver<Arc<State>>,
    pool: Arc<UpstreamPool>,
    balancer: Balancer,
    budget: RetryBudget,
    metrics: Arc<IstioMetrics>,
    /// Per service: the settings last compiled and what they compiled to.
    compiled: Mutex<HashMap<String, Compiled, foldhash::fast::RandomState>>,
    limits: Mutex<HashMap<String, Arc<Limits>, foldhash::fast::RandomState>>,
    local: LocalWatch,
}

/// The settings compiled (none: the service has none) and what they compiled to.
type Compiled = (Option<Arc<ServiceTraffic>>, Arc<Routes>);

/// What the labels of a connection's requests vary by: the endpoint's and service's records
/// (the same `Arc` is the same record; the key holds them, so an address is never reused
/// for another while cached), the principal, code, flags and protocol.
#[derive(Clone, Debug)]
struct SeriesKey {
    workload: Option<Arc<Workload>>,
    service: Arc<Service>,
    principal: bool,
    code: u16,
    grpc: Option<u32>,
    flags: &'static str,
    protocol: &'static str,
}

impl PartialEq for SeriesKey {
    fn eq(&self, o: &Self) -> bool {
        let same_workload = match (&self.workload, &o.workload) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same_workload
            && Arc::ptr_eq(&self.service, &o.service)
            && (
                self.principal,
                self.code,
                self.grpc,
                self.flags,
                self.protocol,
            ) == (o.principal, o.code, o.grpc, o.flags, o.protocol)
    }
}

/// One client connection's facts.
struct Conn {
    /// What its requests looked up in the current discovery state, reused while the state is
    /// the same.
    looked_up: Mutex<Option<LookedUp>>,
    /// Series of this connection's requests, by [`SeriesKey`].
    series: telemetry::SeriesCache<SeriesKey>,
    src: SocketAddr,
    /// The VIP and port the client connected to.
    dst: SocketAddr,
    service: Arc<Service>,
    local: Arc<LocalWorkload>,
}

/// What a connection's requests looked up in one discovery state.
struct LookedUp {
    /// A `Weak`, so an idle connection does not keep an old state's maps alive (and, holding
    /// the allocation, its address cannot be reused by a newer state).
    state: std::sync::Weak<State>,
    /// The routes of the connection's service.
    routes: Arc<Routes>,
    /// The destinations its requests went to (at most [`MAX_PLANS`]).
    plans: Vec<Arc<DestPlan>>,
}

/// What the requests to one destination (host, subset, port) need from the discovery state,
/// found once per state by each connection instead of at every request: the service, its
/// endpoints in the subset with their targets, and the pool limits' counters. A split
/// between subsets alternates between a few of these.
struct DestPlan {
    host: String,
    subset: Option<String>,
    port: u16,
    service: Arc<Service>,
    key: String,
    /// The destination's name for the retry budget, the balancer and the pool limits.
    limit_key: String,
    limits: Arc<Limits>,
    routes: Arc<Routes>,
    candidates: Vec<Arc<Workload>>,
    /// Each candidate's target and expected principal, in the same order.
    targets: Vec<(Target, Option<Arc<str>>)>,
}

/// Destinations a connection keeps plans for (a weighted split names a few).
const MAX_PLANS: usize = 4;

/// How one request ended, for the metrics and the access log.
#[derive(Default)]
struct Report {
    flags: Vec<&'static str>,
    upstream: Option<SocketAddr>,
    workload: Option<Arc<Workload>>,
    principal: Option<Arc<str>>,
    dest_service: Option<Arc<Service>>,
    attempts: u32,
    request_bytes: u64,
    /// Whether the access log was on when the request came: the strings below are built, and
    /// the line written, only then.
    log: bool,
    route: String,
    method: String,
    authority: String,
    path: String,
}

impl Report {
    /// A request's record, with its method, authority and path kept (clipped) only when the
    /// access log is on.
    fn new(method: &str, authority: &str, path: &str) -> Self {
        let log = tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO);
        if !log {
            return Report::default();
        }
        Report {
            log,
            method: method.to_owned(),
            authority: clip_path(authority),
            path: clip_path(path),
            ..Report::default()
        }
    }
}

impl HttpOutbound {
    pub fn new(
        state: watch::Receiver<Arc<State>>,
        pool: UpstreamPool,
        metrics: Arc<IstioMetrics>,
        local: LocalWatch,
    ) -> Self {
        Self {
            state,
            pool: Arc::new(pool),
            balancer: Balancer::default(),
            budget: RetryBudget::default(),
            metrics,
            compiled: Mutex::new(HashMap::default()),
            limits: Mutex::new(HashMap::default()),
            local,
        }
    }

    pub fn metrics(&self) -> &Arc<IstioMetrics> {
        &self.metrics
    }

    /// The protocol of `service`'s port `port` as the control plane declared it.
    pub fn protocol(&self, state: &State, service: &Service, port: u16) -> PortProtocol {
        state
            .traffic(&service.key())
            .and_then(|t| t.ports.get(&port).copied())
            .unwrap_or_default()
    }

    /// The compiled routes of a service, compiled once per version of its settings (and once
    /// for a service without any: those are the service itself).
    fn routes(&self, state: &State, service: &Service) -> Arc<Routes> {
        let key = service.key();
        let t = state.traffic(&key);
        let mut c = self.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((src, r)) = c.get(&key) {
            // The same record (or none, both times).
            if src.as_ref().map(Arc::as_ptr) == t.map(Arc::as_ptr) {
                return r.clone();
            }
        }
        let r = match t.map(|t| Routes::compile(t)) {
            None => Arc::new(Routes::plain(&service.hostname)),
            Some(Ok(r)) => Arc::new(r),
            Some(Err(e)) => {
                isthmus_socket::warn_limited!(("routes", "l7"), service = %key, error = %e,
                    "cannot use this service's routes; sending to the service itself");
                Arc::new(Routes::plain(&service.hostname))
            }
        };
        if c.len() > 4096 {
            c.clear();
        }
        c.insert(key, (t.cloned(), r.clone()));
        r
    }

    fn limits(&self, key: &str) -> Arc<Limits> {
        let mut l = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = l.get(key) {
            return v.clone();
        }
        if l.len() > 4096 {
            l.retain(|_, v| Arc::strong_count(v) > 1);
        }
        l.entry(key.to_owned()).or_default().clone()
    }

    /// The routes of `conn`'s service in `state`: those looked up by an earlier request in
    /// the same state, or looked up now (which forgets what the old state planned).
    fn conn_routes(&self, state: &Arc<State>, conn: &Conn) -> Arc<Routes> {
        let mut looked = conn
            .looked_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &*looked {
            Some(l) if std::ptr::eq(l.state.as_ptr(), Arc::as_ptr(state)) => l.routes.clone(),
            _ => {
                let routes = self.routes(state, &conn.service);
                *looked = Some(LookedUp {
                    state: Arc::downgrade(state),
                    routes: routes.clone(),
                    plans: Vec::new(),
                });
                routes
            }
        }
    }

    /// The plan for requests of `conn` to `host` (its `subset`, `port`) in `state`: kept
    /// from an earlier request in the same state, or made now. `None`: not a mesh service.
    fn dest_plan(
        &self,
        state: &Arc<State>,
        conn: &Conn,
        routes: &Arc<Routes>,
        host: &str,
        subset: Option<&str>,
        port: u16,
    ) -> Option<Arc<DestPlan>> {
        let mut looked = conn
            .looked_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Filled by `conn_routes` for this request's state, unless the state changed since.
        let plans = looked
            .as_mut()
            .filter(|l| std::ptr::eq(l.state.as_ptr(), Arc::as_ptr(state)))
            .map(|l| &mut l.plans);
        if let Some(p) = plans.as_deref().and_then(|plans| {
            plans
                .iter()
                .find(|p| p.port == port && p.host == host && p.subset.as_deref() == subset)
        }) {
            return Some(p.clone());
        }
        let service = state.service_by_hostname(host)?.clone();
        let key = service.key();
        // Most requests go to the service they were sent to, whose routes are at hand.
        let dest_routes = if service.hostname == conn.service.hostname
            && service.namespace == conn.service.namespace
        {
            routes.clone()
        } else {
            self.routes(state, &service)
        };
        let members = subset.map(|s| dest_routes.subsets.get(s).map(|s| &s.workloads));
        let mut candidates = Vec::new();
        let mut targets = Vec::new();
        for w in state.endpoints(&key) {
            let member = match members {
                None => true,
                Some(None) => false,
                Some(Some(m)) => m.contains(&w.uid),
            };
            if let Some(t) = member
                .then(|| service_target(&service, &key, w, port))
                .flatten()
            {
                let principal = t.expected.first().map(|p| Arc::from(p.as_str()));
                candidates.push(w.clone());
                targets.push((t, principal));
            }
        }
        let limit_key = format!("{key}/{}", subset.unwrap_or(""));
        let plan = Arc::new(DestPlan {
            host: host.to_owned(),
            subset: subset.map(str::to_owned),
            port,
            limits: self.limits(&limit_key),
            limit_key,
            service,
            key,
            routes: dest_routes,
            candidates,
            targets,
        });
        if let Some(plans) = plans {
            if plans.len() >= MAX_PLANS {
                plans.remove(0);
            }
            plans.push(plan.clone());
        }
        Some(plan)
    }

    /// Serves one client connection (HTTP/1.1, or HTTP/2 with prior knowledge) until it
    /// closes.
    pub async fn serve<IO>(
        self: Arc<Self>,
        mut io: IO,
        src: SocketAddr,
        dst: SocketAddr,
        service: Arc<Service>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = Arc::new(Conn {
            looked_up: Mutex::new(None),
            series: Default::default(),
            src,
            dst,
            service,
            local: self.local.borrow().clone(),
        });
        // HTTP/1.1 is relayed ([`client`]) until a request needs what only hyper's path does;
        // HTTP/2 (its preface is refused by the relay's parser) goes to hyper at once.
        let mut inb = BytesMut::new();
        match self.relay(&mut io, &mut inb, &conn).await {
            client::Left::Closed => return,
            client::Left::Hyper => {}
        }
        let io = relay::Prefixed::new(inb.freeze(), io);
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (this, conn) = (this.clone(), conn.clone());
            async move { Ok::<_, Infallible>(this.handle(req, conn).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(timer::CoarseTimer);
        builder.http2().timer(timer::CoarseTimer);
        if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
            tracing::debug!(error = %e, %src, "client HTTP connection ended with an error");
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, conn: Arc<Conn>) -> Response<Body> {
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        let trace = incoming_trace(&parts.headers);
        let protocol = request_protocol(&parts);
        let state = self.state.borrow().clone();
        let routes = self.conn_routes(&state, conn.as_ref());
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| conn.service.hostname.clone());
        // Borrowed until the decision is made; the request is changed only after.
        let (path, query) = (parts.uri.path(), parts.uri.query());
        let mut report = Report::new(parts.method.as_str(), &authority, path);
        let view = RequestView {
            method: &parts.method,
            path,
            query,
            authority: &authority,
            scheme: "http",
            headers: authz::Headers::Map(&parts.headers),
            port: conn.dst.port(),
        };
        let decision = {
            let mut rng = rand::thread_rng();
            route::decide(&routes, &view, &mut rng)
        };
        let rewritten = match &decision {
            Decision::Route { route, .. } => {
                if report.log {
                    report.route = route.name.clone();
                }
                route.rewritten_path(&view)
            }
            Decision::NoRoute => None,
        };
        let response = match decision {
            Decision::NoRoute => {
                report.flags.push("NR");
                local_reply(StatusCode::NOT_FOUND, "no route matched this request\n")
            }
            Decision::Route {
                route,
                dest,
                delay,
                abort,
                mirror,
            } => {
                if let Some(d) = delay {
                    report.flags.push("DI");
                    tokio::time::sleep(d).await;
                }
                if let Some((status, grpc)) = abort {
                    report.flags.push("FI");
                    match grpc {
                        Some(code) => grpc_reply(code, "fault filter abort"),
                        None => local_reply(status, "fault filter abort"),
                    }
                } else {
                    match (&route.action, dest) {
                        (
                            Action::Redirect {
                                uri,
                                authority: a,
                                scheme,
                                code,
                            },
                            _,
                        ) => {
                            let location = format!(
                                "{}://{}{}",
                                scheme.as_deref().unwrap_or("http"),
                                a.as_deref().unwrap_or(&authority),
                                uri.as_deref().unwrap_or(
                                    parts.uri.path_and_query().map_or("/", |p| p.as_str())
                                )
                            );
                            let mut r = local_reply(*code, "");
                            if let Ok(v) = HeaderValue::try_from(location) {
                                r.headers_mut().insert(header::LOCATION, v);
                            }
                            r
                        }
                        (Action::Direct { status, body }, _) => local_reply(*status, body),
                        (Action::Forward(_), None) => {
                            report.flags.push("NR");
                            local_reply(StatusCode::SERVICE_UNAVAILABLE, "no destination\n")
                        }
                        (Action::Forward(_), Some(dest)) => {
                            // The request as it goes upstream.
                            if let Some(p) = &rewritten {
                                if let Ok(pq) = p.parse::<http::uri::PathAndQuery>() {
                                    let mut up = parts.uri.clone().into_parts();
                                    up.path_and_query = Some(pq);
                                    if let Ok(u) = Uri::from_parts(up) {
                                        parts.uri = u;
                                    }
                                }
                            }
                            let authority = route.rewrite_authority.clone().unwrap_or(authority);
                            route.request_headers.apply(&mut parts.headers);
                            dest.request_headers.apply(&mut parts.headers);
                            parts
                                .headers
                                .insert(hmeta::TRACEPARENT, trace.to_header_value());
                            let mut carrier = HyperCarrier {
                                parts,
                                body: Some(body),
                                replay: None,
                                authority,
                            };
                            let forwarded = self
                                .forward(
                                    &state,
                                    &conn,
                                    &routes,
                                    route,
                                    dest,
                                    &mut carrier,
                                    trace,
                                    mirror,
                                    &mut report,
                                )
                                .await;
                            let mut resp = forwarded;
                            route.response_headers.apply(resp.headers_mut());
                            dest.response_headers.apply(resp.headers_mut());
                            resp
                        }
                    }
                }
            }
        };
        self.finish(response, conn, report, start, protocol, trace)
    }

    /// Picks endpoints and sends, with retries, per-try and overall timeouts; `carrier` is
    /// how the request goes (hyper's messages, or the relay's bytes).
    #[allow(clippy::too_many_arguments)]
    async fn forward<C: Carrier>(
        &self,
        state: &Arc<State>,
        conn: &Conn,
        routes: &Arc<Routes>,
        route: &route::Route,
        dest: &WeightedDest,
        carrier: &mut C,
        trace: TraceParent,
        mirror: bool,
        report: &mut Report,
    ) -> C::Resp {
        let port = dest.dest.port.unwrap_or(conn.dst.port());
        let subset = dest.dest.subset.as_deref();
        let Some(plan) = self.dest_plan(state, conn, routes, &dest.dest.host, subset, port) else {
            report.flags.push("UH");
            return C::local(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "no healthy upstream: {} is not a mesh service\n",
                    dest.dest.host
                ),
            );
        };
        report.dest_service = Some(plan.service.clone());
        let (service, key, dest_routes, candidates) =
            (&plan.service, &plan.key, &plan.routes, &plan.candidates);
        let (limit_key, limits) = (&plan.limit_key, &plan.limits);
        if candidates.is_empty() {
            report.flags.push("UH");
            return C::local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
        }
        let policy = dest_routes.policy_for(subset);
        let lb = policy.and_then(|p| p.load_balancer.as_ref());
        let od = policy.and_then(|p| p.outlier_detection.as_ref());
        let http_pool = policy
            .and_then(|p| p.connection_pool.as_ref())
            .and_then(|c| c.http.as_ref());
        let max_active = http_pool.map_or(usize::MAX, |h| {
            (h.http2_max_requests.unwrap_or(u32::MAX) as usize)
                .saturating_add(h.http1_max_pending_requests.unwrap_or(0) as usize)
        });
        if limits.active.fetch_add(1, Ordering::AcqRel) >= max_active {
            limits.active.fetch_sub(1, Ordering::AcqRel);
            report.flags.push("UO");
            return C::local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: overflow\n");
        }
        let _active = Count(Arc::clone(limits), false);
        let max_retries = http_pool
            .and_then(|h| h.max_retries)
            .map_or(usize::MAX, |n| n as usize);
        let h2 = match dest_routes.protocol(port) {
            PortProtocol::Http2 | PortProtocol::Grpc => true,
            PortProtocol::Http => false,
            _ => carrier.came_as_h2(),
        };
        let hash = carrier.hash(lb, conn.src.ip());
        // One clock read for the budget and the first pick; each attempt's end is read once, for
        // its latency, the balancer's record and the next attempt's budget and pick.
        let mut now = Instant::now();
        self.budget.request(limit_key, now);

        if let Err(answer) = carrier.prepare(report).await {
            return answer;
        }
        if mirror {
            if let (Some((parts, body, authority)), Some((m, _))) =
                (carrier.mirrored(), &route.mirror)
            {
                self.mirror(state, conn, m, parts, body, authority, h2);
            }
        }
        // Only a new upstream connection sends them (its HBONE CONNECT).
        let connect_headers = || conn.local.connect_headers(conn.src.ip(), &trace);
        let retry = &route.retry;
        let attempts_allowed = if carrier.replayable() {
            1 + retry.attempts
        } else {
            1
        };
        let mut tried: smallvec::SmallVec<[&str; 4]> = smallvec::SmallVec::new();

        let attempts = async {
            let mut last: Option<C::Resp> = None;
            for attempt in 0..attempts_allowed {
                let _retry_count;
                if attempt > 0 {
                    if limits.retries.load(Ordering::Acquire) >= max_retries
                        || !self.budget.try_retry(limit_key, now)
                    {
                        if limits.retries.load(Ordering::Acquire) < max_retries {
                            self.metrics.budget_exhausted.inc();
                        }
                        report.flags.push("URX");
                        break;
                    }
                    limits.retries.fetch_add(1, Ordering::AcqRel);
                    _retry_count = Count(Arc::clone(limits), true);
                }
                let w = {
                    let mut rng = rand::thread_rng();
                    self.balancer
                        .pick(limit_key, candidates, &tried, lb, hash, now, &mut rng)
                };
                let Some(i) = w.and_then(|w| candidates.iter().position(|c| Arc::ptr_eq(c, &w)))
                else {
                    break;
                };
                let (w, (target, principal)) = (&candidates[i], &plan.targets[i]);
                tried.push(&w.uid);
                report.attempts += 1;
                report.upstream = Some(target.addr);
                report.principal = principal.clone();
                report.workload = Some(w.clone());
                let in_flight = self.balancer.start(&w.uid);
                // Read again: the body may have taken its time to arrive.
                let sent_at = Instant::now();
                let sent = carrier.attempt(&self.pool, target, h2, &connect_headers);
                let result = match retry.per_try_timeout {
                    Some(t) => tokio::time::timeout(t, sent).await.ok(),
                    None => Some(sent.await),
                };
                drop(in_flight);
                now = Instant::now();
                let latency = now - sent_at;
                let fresh = matches!(result, Some(Ok((_, true))));
                let (outcome, retryable, resp) = match result {
                    None => {
                        report.flags.retain(|f| *f != "UT");
                        report.flags.push("UT");
                        (
                            Result5xx::GatewayError,
                            retry.on.status_5xx || retry.on.gateway_error,
                            C::local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
                        )
                    }
                    Some(Ok((resp, _))) => {
                        let (status, grpc) = C::status(&resp);
                        let outcome = match status.as_u16() {
                            502..=504 => Result5xx::GatewayError,
                            500..=599 => Result5xx::ServerError,
                            _ => Result5xx::Ok,
                        };
                        let retryable = retry.on.retries_status(status, grpc);
                        (outcome, retryable, resp)
                    }
                    Some(Err(e)) => {
                        let (flag, retryable, status) = match &e {
                            SendError::Connect { .. } => (
                                "UF",
                                retry.on.connect_failure
                                    || retry.on.gateway_error
                                    || retry.on.status_5xx,
                                StatusCode::SERVICE_UNAVAILABLE,
                            ),
                            SendError::Refused => (
                                "UF",
                                retry.on.refused_stream,
                                StatusCode::SERVICE_UNAVAILABLE,
                            ),
                            SendError::Reset(_) => (
                                "UC",
                                retry.on.reset || retry.on.status_5xx || retry.on.gateway_error,
                                StatusCode::SERVICE_UNAVAILABLE,
                            ),
                            SendError::Denied { .. } => ("DENY", false, StatusCode::FORBIDDEN),
                        };
                        isthmus_socket::warn_limited!(("attempt", "l7"), service = %service.hostname, endpoint = %target.addr, error = %e, "request attempt failed");
                        report.flags.retain(|f| *f != flag);
                        report.flags.push(flag);
                        let body = if status == StatusCode::FORBIDDEN {
                            "RBAC: access denied".to_string()
                        } else {
                            format!(
                                "upstream connect error or disconnect/reset before headers: {e}\n"
                            )
                        };
                        let outcome = if status == StatusCode::FORBIDDEN {
                            Result5xx::Ok
                        } else {
                            Result5xx::GatewayError
                        };
                        (outcome, retryable, C::local(status, &body))
                    }
                };
                // Outlier detection's ejection cap counts them; a hash lookup otherwise spent.
                let endpoints_now = if od.is_some() {
                    state.endpoints(key)
                } else {
                    &[]
                };
                let latency = (!fresh).then_some(latency);
                self.balancer
                    .record(&w.uid, latency, outcome, od, endpoints_now, now);
                if !retryable || attempt + 1 >= attempts_allowed {
                    return resp;
                }
                last = Some(resp);
            }
            last.unwrap_or_else(|| {
                report.flags.push("UH");
                C::local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
            })
        };
        match route.timeout {
            Some(t) if !t.is_zero() => match tokio::time::timeout(t, attempts).await {
                Ok(r) => r,
                Err(_) => {
                    report.flags.push("UT");
                    C::local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n")
                }
            },
            _ => attempts.await,
        }
    }

    /// Sends a copy of the request to `dest` and forgets it (Envoy's shadowing: the host gets
    /// `-shadow`).
    #[allow(clippy::too_many_arguments)]
    fn mirror(
        &self,
        state: &State,
        conn: &Conn,
        dest: &route::Dest,
        parts: &http::request::Parts,
        body: Bytes,
        authority: &str,
        h2: bool,
    ) {
        let Some(service) = state.service_by_hostname(&dest.host).cloned() else {
            return;
        };
        let port = dest.port.unwrap_or(conn.dst.port());
        let key = service.key();
        let eps: Vec<Arc<Workload>> = state.endpoints(&key).to_vec();
        let w = {
            let mut rng = rand::thread_rng();
            self.balancer
                .pick(&key, &eps, &[], None, None, Instant::now(), &mut rng)
        };
        let Some(target) = w.and_then(|w| service_target(&service, &key, &w, port)) else {
            return;
        };
        let shadow = match authority.split_once(':') {
            Some((h, p)) => format!("{h}-shadow:{p}"),
            None => format!("{authority}-shadow"),
        };
        let req = upstream_request(
            parts,
            Full::new(body).map_err(|e| match e {}).boxed(),
            &shadow,
            h2,
        );
        let headers = conn
            .local
            .connect_headers(conn.src.ip(), &super::metadata::new_trace());
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let headers = move || headers.clone();
            if let Ok((resp, _)) = pool.send(&target, h2, &headers, req).await {
                let _ = resp.into_body().collect().await;
            }
        });
    }

    /// Wraps the response so that metrics and the access log are written when its body ends.
    fn finish(
        &self,
        response: Response<Body>,
        conn: Arc<Conn>,
        report: Report,
        start: Instant,
        protocol: &'static str,
        trace: TraceParent,
    ) -> Response<Body> {
        let status = response.status();
        let grpc = grpc_status(response.headers());
        let (parts, body) = response.into_parts();
        let done = Done {
            metrics: self.metrics.clone(),
            conn,
            report,
            start,
            protocol,
            status,
            grpc,
            trace,
            bytes: 0,
        };
        Response::from_parts(
            parts,
            Tracked {
                inner: body,
                done: Some(done),
            }
            .boxed(),
        )
    }
}

/// The rest of a request's record, written when its response body ends (or is dropped).
struct Done {
    metrics: Arc<IstioMetrics>,
    conn: Arc<Conn>,
    report: Report,
    start: Instant,
    protocol: &'static str,
    status: StatusCode,
    grpc: Option<u32>,
    trace: TraceParent,
    bytes: u64,
}

impl Done {
    fn write(self) {
        let r = &self.report;
        let src = &self.conn.local.meta;
        let dw = r.workload.as_deref();
        let ds = r.dest_service.as_deref().unwrap_or(&self.conn.service);
        let flags_label = flags_label(&r.flags);
        let grpc = if self.protocol == "grpc" {
            Some(self.grpc.unwrap_or(0))
        } else {
            None
        };
        let key = SeriesKey {
            workload: r.workload.clone(),
            service: r
                .dest_service
                .clone()
                .unwrap_or_else(|| self.conn.service.clone()),
            principal: r.principal.is_some(),
            code: self.status.as_u16(),
            grpc,
            flags: flags_label,
            protocol: self.protocol,
        };
        let series = self.conn.series.get(key, || {
            self.metrics.handles(&RequestLabels {
                reporter: Reporter::Source,
                source_workload: Known(src.workload_name.clone()),
                source_workload_namespace: Known(src.namespace.clone()),
                source_principal: Known(self.conn.local.principal.clone()),
                source_app: Known(src.service_name.clone()),
                source_version: Known(src.service_version.clone()),
                source_cluster: Known(src.cluster_id.clone()),
                destination_workload: dw.map_or(Known(None), |w| known(&w.name)),
                destination_workload_namespace: dw.map_or(Known(None), |w| known(&w.namespace)),
                destination_principal: Known(
                    r.principal
                        .as_deref()
                        .map(|p| Arc::from(p.trim_start_matches("spiffe://"))),
                ),
                destination_app: dw.map_or(Known(None), |w| known(&w.canonical_name)),
                destination_version: dw.map_or(Known(None), |w| known(&w.canonical_revision)),
                destination_service: known(&ds.hostname),
                destination_service_name: known(&ds.name),
                destination_service_namespace: known(&ds.namespace),
                destination_cluster: dw.map_or(Known(None), |w| known(&w.cluster_id)),
                request_protocol: Fixed(self.protocol),
                response_code: code_label(self.status.as_u16()),
                grpc_response_status: Grpc(grpc),
                response_flags: Fixed(flags_label),
                connection_security_policy: Fixed(if r.principal.is_some() {
                    "mutual_tls"
                } else {
                    "unknown"
                }),
            })
        });
        let millis = self.start.elapsed().as_secs_f64() * 1000.0;
        series.record(millis, r.request_bytes, self.bytes);
        if !r.log {
            return;
        }
        let flags = if r.flags.is_empty() {
            "-".to_string()
        } else {
            r.flags.join(",")
        };
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            direction = "outbound",
            protocol = self.protocol,
            src = %self.conn.src,
            method = %r.method,
            authority = %r.authority,
            path = %r.path,
            service = %ds.hostname,
            route = %r.route,
            status = self.status.as_u16(),
            flags = %flags,
            upstream = %isthmus_hbone::OrDash(r.upstream),
            attempts = r.attempts,
            bytes_sent = r.request_bytes,
            bytes_received = self.bytes,
            duration_ms = millis as u64,
            trace_id = %self.trace.trace_id,
            "request"
        );
    }
}

/// A path as the access log shows it: at most 256 characters, control characters escaped.
pub fn clip_path(p: &str) -> String {
    isthmus_model::text::clip(p, 256).to_string()
}

/// Flags as one label value from a fixed set (the first flag that matters most).
fn flags_label(flags: &[&'static str]) -> &'static str {
    for f in [
        "UO", "UH", "NR", "FI", "UT", "URX", "UF", "UC", "DENY", "DC", "DI",
    ] {
        if flags.contains(&f) {
            return f;
        }
    }
    "-"
}

/// A response body that counts its bytes and writes the request's record when it ends.
struct Tracked {
    inner: Body,
    done: Option<Done>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = &mut self.done {
                    if let Some(data) = frame.data_ref() {
                        d.bytes += data.len() as u64;
                    }
                    if let Some(t) = frame.trailers_ref() {
                        if let Some(g) = grpc_status(t) {
                            d.grpc = Some(g);
                        }
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(d) = self.done.take() {
                    d.write();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.write();
        }
    }
}

fn request_protocol(parts: &http::request::Parts) -> &'static str {
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        "grpc"
    } else {
        "http"
    }
}

/// `grpc-status`, named once (a `&str` name is parsed at every lookup).
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// The request's `traceparent` continued with a new span id, or a new trace.
fn incoming_trace(h: &http::HeaderMap) -> TraceParent {
    continue_trace(
        h.get(hmeta::TRACEPARENT)
            .and_then(|v| TraceParent::parse(v).ok()),
    )
}

/// `incoming` (a request's valid `traceparent`) continued with a new span id, or a new trace.
fn continue_trace(incoming: Option<TraceParent>) -> TraceParent {
    let fresh = super::metadata::new_trace();
    match incoming {
        Some(t) => TraceParent::new(t.trace_id.0, fresh.parent_id, t.flags).unwrap_or(fresh),
        None => fresh,
    }
}

/// How one request's attempts reach an endpoint, for [`HttpOutbound::forward`]'s retry loop:
/// hyper's messages ([`HyperCarrier`]) or the HTTP/1.1 relay's bytes ([`client`]).
trait Carrier {
    /// An attempt's answer: the upstream's response, or one made here.
    type Resp;
    /// Reads what the attempts need (a small body, kept for replays); an error is the answer.
    fn prepare(
        &mut self,
        report: &mut Report,
    ) -> impl std::future::Future<Output = Result<(), Self::Resp>> + Send;
    /// A failed attempt can be sent again.
    fn replayable(&self) -> bool;
    /// The request came as HTTP/2 (an undeclared port's upstream then speaks it too).
    fn came_as_h2(&self) -> bool;
    /// The consistent hash of the request, when the load balancer asks for one.
    fn hash(&self, lb: Option<&LoadBalancerSettings>, src: std::net::IpAddr) -> Option<u64>;
    /// The request, its kept body and the authority it goes upstream with, for a mirror.
    fn mirrored(&self) -> Option<(&http::request::Parts, Bytes, &str)>;
    /// One attempt to `target`; also says whether a new connection was made for it.
    fn attempt<'a>(
        &'a mut self,
        pool: &'a UpstreamPool,
        target: &'a Target,
        h2: bool,
        connect_headers: &'a (dyn Fn() -> http::HeaderMap + Sync),
    ) -> impl std::future::Future<Output = Result<(Self::Resp, bool), SendError>> + Send + 'a;
    /// An answer's status and gRPC status.
    fn status(resp: &Self::Resp) -> (StatusCode, Option<u32>);
    /// An answer made here.
    fn local(status: StatusCode, body: &str) -> Self::Resp;
}

/// A request hyper parsed, sent with hyper's client.
struct HyperCarrier {
    parts: http::request::Parts,
    /// Taken by `prepare`: kept in `replay` when small, else streamed once.
    body: Option<Incoming>,
    replay: Option<Bytes>,
    authority: String,
}

impl Carrier for HyperCarrier {
    type Resp = Response<Body>;

    async fn prepare(&mut self, report: &mut Report) -> Result<(), Response<Body>> {
        let Some(body) = self.body.take() else {
            return Ok(());
        };
        let small = body
            .size_hint()
            .upper()
            .is_some_and(|n| n as usize <= MAX_REPLAY_BODY)
            || body.is_end_stream();
        if !small {
            self.body = Some(body);
            return Ok(());
        }
        match body.collect().await {
            Ok(c) => {
                let b = c.to_bytes();
                report.request_bytes = b.len() as u64;
                self.replay = Some(b);
                Ok(())
            }
            Err(e) => {
                report.flags.push("DC");
                Err(local_reply(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the request body failed: {e}\n"),
                ))
            }
        }
    }

    fn replayable(&self) -> bool {
        self.replay.is_some()
    }

    fn came_as_h2(&self) -> bool {
        self.parts.version == Version::HTTP_2
    }

    fn hash(&self, lb: Option<&LoadBalancerSettings>, src: std::net::IpAddr) -> Option<u64> {
        balance::request_hash(
            lb,
            authz::Headers::Map(&self.parts.headers),
            self.parts.uri.query(),
            src,
        )
    }

    fn mirrored(&self) -> Option<(&http::request::Parts, Bytes, &str)> {
        self.replay
            .clone()
            .map(|b| (&self.parts, b, self.authority.as_str()))
    }

    async fn attempt<'a>(
        &'a mut self,
        pool: &'a UpstreamPool,
        target: &'a Target,
        h2: bool,
        connect_headers: &'a (dyn Fn() -> http::HeaderMap + Sync),
    ) -> Result<(Response<Body>, bool), SendError> {
        let body: Body = match (&self.replay, self.body.take()) {
            (Some(b), _) => Full::new(b.clone()).map_err(|e| match e {}).boxed(),
            (None, Some(b)) => b.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
            (None, None) => {
                return Err(SendError::Reset(
                    "the request's body was sent already and was not kept".into(),
                ))
            }
        };
        let req = upstream_request(&self.parts, body, &self.authority, h2);
        pool.send(target, h2, connect_headers, req).await
    }

    fn status(resp: &Response<Body>) -> (StatusCode, Option<u32>) {
        (resp.status(), grpc_status(resp.headers()))
    }

    fn local(status: StatusCode, body: &str) -> Response<Body> {
        local_reply(status, body)
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

fn upstream_request(
    parts: &http::request::Parts,
    body: Body,
    authority: &str,
    h2: bool,
) -> Request<Body> {
    // From the parts already parsed: the path is not parsed again, only the authority.
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut up = http::uri::Parts::default();
    up.path_and_query = Some(pq);
    if h2 {
        up.scheme = Some(http::uri::Scheme::HTTP);
        up.authority = authority.parse().ok();
    }
    let uri = Uri::from_parts(up).unwrap_or_else(|_| parts.uri.clone());
    let mut headers = parts.headers.clone();
    for h in HOP_BY_HOP.iter() {
        headers.remove(h);
    }
    if let Some(te) = parts.headers.get(header::TE) {
        if te.as_bytes() != b"trailers" {
            headers.remove(header::TE);
        }
    }
    if h2 {
        headers.remove(header::HOST);
    } else if let Ok(v) = HeaderValue::try_from(authority) {
        headers.insert(header::HOST, v);
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = headers;
    req
}

fn local_reply(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_owned()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    if !body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

/// A gRPC "trailers-only" answer with `code`.
fn grpc_reply(code: u32, message: &str) -> Response<Body> {
    let mut r = local_reply(StatusCode::OK, "");
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::try_from(message) {
        h.insert("grpc-message", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http_from_anything_else() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"POST /x HTTP/1.1"), Sniffed::Http1);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniffed::H2c);
        assert_eq!(sniff(b"GE"), Sniffed::NeedMore);
        assert_eq!(sniff(b"PRI * HT"), Sniffed::NeedMore);
        assert_eq!(
            sniff(b"\x16\x03\x01\x02\x00"),
            Sniffed::Other,
            "a TLS ClientHello"
        );
        assert_eq!(sniff(b"ping\n"), Sniffed::Other);
        assert_eq!(sniff(b"GETX"), Sniffed::Other);
    }
}
