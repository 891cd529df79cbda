//! The discovery server: `DeltaAggregatedResources` over a `watch` of [`ResourceSet`]s.
//!
//! How it behaves under load, and why:
//! - **One response in flight per type and client.** A change that arrives while a client
//!   has not ACKed its last response is only remembered; the client gets one diff against
//!   the newest set when it ACKs. Pushes are coalesced but never lost, and a client's pending
//!   work is one flag, not a queue.
//! - **Slow clients never hold back others.** Each stream has its own task; the publisher
//!   only replaces a `watch`. A client that stops reading stops ACKing, so nothing more is
//!   queued for it; its outbound queue is bounded ([`ServerConfig::queue_depth`]) and cannot
//!   fill by construction. If a send still blocks past [`ServerConfig::send_timeout`], the
//!   stream is ended and the client reconnects with `initial_resource_versions` (it gets
//!   the difference from what it has: the "fresh state", without resending what it has).
//! - **Diffs cost what changed.** Each client's state is "generation G of the shared set,
//!   plus a few exceptions"; the publisher records which names changed per generation, so a
//!   push to a client costs the changed names, not the whole set.
//! - **Large responses are rationed.** Responses of at least
//!   [`ServerConfig::large_response`] resources (initial states) take one of
//!   [`ServerConfig::max_large_responses`] permits until ACKed (or
//!   [`ServerConfig::large_response_hold`] passes), which bounds the memory a thundering
//!   herd of (re)connecting clients costs.
//! - **NACK**: the client kept what it had for the rejected response's resources. They are
//!   marked with the version it refused and not sent again until they change (re-sending the
//!   same bad resource would loop).
//! - **Addresses are vouched for, not claimed.** A node id's IP counts only when the client
//!   connects from it, holds a certificate naming it, or the embedder vouches for it (see
//!   [`HostAddress`]); other claims are served but carry no address.
//! - **Status** ([`XdsServer::streams`]): each open stream's identity, peer, verified address,
//!   certificate expiry, health and per-type freshness (SYNCED / NOT SENT / STALE / NACKED), kept in memory by the
//!   stream's own task under a short, never-awaited lock and dropped with the stream.

mod address;
mod auth;
mod limits;
mod metrics;
mod publisher;
mod stream;
mod tracker;
mod wire;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::StreamBody;
use isthmus_model::text::clip;
use tokio::sync::{mpsc, watch, Semaphore};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;
use tracing::Instrument;

pub use address::{ip_sans_of, normalize, AddressSource, HostAddress};
pub use auth::{spiffe_id_of, Authenticate, Identity, StaticAuthenticator};
pub use metrics::XdsMetrics;
pub use stream::node_metadata;
pub use tracker::{
    HealthStatus, NackStatus, StreamStatus, SyncState, TypeStatus, MAX_TYPES, VERSION_METADATA,
};

use crate::resources::ResourceSet;
use publisher::Snapshot;

/// Tuning of the discovery server. The defaults suit thousands of clients.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Responses buffered per client (at most one per type is ever outstanding).
    pub queue_depth: usize,
    /// How long a send to one client may block before its stream is ended.
    pub send_timeout: Duration,
    /// A response with at least this many resources is "large" (see the module docs).
    pub large_response: usize,
    /// Large responses outstanding at once, over all clients.
    pub max_large_responses: usize,
    /// How long an un-ACKed large response keeps its permit.
    pub large_response_hold: Duration,
    /// Generations whose changes are remembered for incremental diffs.
    pub history: usize,
    /// Largest request accepted (a reconnecting client's `initial_resource_versions`: about
    /// 90 bytes a name, so the default holds ~180,000 resources of one type).
    pub max_request_bytes: usize,
    /// Resource names one stream may subscribe to per type, and claim to hold in
    /// `initial_resource_versions` (or twice the names served, if more); a stream that asks
    /// for more is closed with `RESOURCE_EXHAUSTED`.
    pub max_names_per_type: usize,
    /// Discovery streams open at once under one identity (namespace and service account),
    /// over all hosts; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_streams_per_identity: usize,
    /// Discovery streams open at once under one identity from one IP address.
    pub max_streams_per_identity_and_ip: usize,
    /// A stream older than this (give or take 10%, so reconnects spread out) is closed with
    /// UNAVAILABLE and [`REBALANCE_MESSAGE`], as istiod's maximum connection age: clients
    /// reconnect, to any replica, so replicas added later get their share. `None`: never.
    pub max_stream_age: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            queue_depth: 8,
            send_timeout: Duration::from_secs(30),
            large_response: 256,
            max_large_responses: 8,
            large_response_hold: Duration::from_secs(10),
            history: 64,
            // 100,000 names of 60 bytes with their versions are ~9 MB.
            max_request_bytes: 16 * 1024 * 1024,
            max_names_per_type: 100_000,
            max_streams_per_identity: 1024,
            // Hosts behind one NAT share an address, so this is not 1.
            max_streams_per_identity_and_ip: 256,
            max_stream_age: None,
        }
    }
}

/// The type URL on which agents report their workload's health, as Istio's agents do: an
/// empty `error_detail` means healthy, a set one unhealthy (its message says why).
pub const HEALTH_TYPE_URL: &str = "istio.io/health";

/// What the control plane does with a connected client beyond serving it resources:
/// auto-registration and health (Istio's WorkloadGroup flow).
#[tonic::async_trait]
pub trait StreamObserver: Send + Sync + 'static {
    /// Called with the first request's node, after authentication, the node check and the
    /// address check: `address` is what the client may speak for (use only
    /// [`HostAddress::ip`]). An error closes the stream with it. The returned handle (if any)
    /// identifies the client in later calls, and is shown in [`XdsServer::streams`] as what the
    /// client registered.
    async fn connected(
        &self,
        identity: &Identity,
        node: &Node,
        address: &HostAddress,
    ) -> Result<Option<String>, Status>;
    /// A health report on [`HEALTH_TYPE_URL`].
    async fn health(&self, handle: &str, healthy: bool, message: Option<String>);
    /// The stream ended, however it ended.
    fn disconnected(&self, handle: &str);
}

pub use crate::pb::envoy::config::core::v3::Node;

pub(crate) struct Shared {
    pub observer: Option<Arc<dyn StreamObserver>>,
    pub config: ServerConfig,
    pub metrics: XdsMetrics,
    pub large: Arc<Semaphore>,
    pub auth: Arc<dyn Authenticate>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub next_stream: AtomicU64,
    /// Set to `true` to end every stream (see [`XdsServer::close_streams`]).
    pub closing: watch::Sender<bool>,
    pub streams: Arc<tracker::Streams>,
    /// Rate limit of the warning about unverified address claims (a client reconnecting in a
    /// loop must not flood the log).
    pub unverified_log: isthmus_socket::LogLimiter,
    pub slots: Arc<limits::StreamSlots>,
}

/// The discovery service. Cheap to clone; serve it with [`XdsServer::into_service`].
#[derive(Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for XdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsServer")
            .field("generation", &self.shared.snapshots.borrow().generation)
            .finish_non_exhaustive()
    }
}

impl XdsServer {
    /// Starts serving `resources` (the current value and every later one). Spawns the task
    /// that numbers resource sets, so call it inside a Tokio runtime. When the sender of
    /// `resources` goes away, the last set stays served.
    pub fn start(
        resources: watch::Receiver<Arc<ResourceSet>>,
        auth: Arc<dyn Authenticate>,
        config: ServerConfig,
    ) -> Self {
        Self::start_observed(resources, auth, None, config)
    }

    /// Like [`XdsServer::start`], with hooks for connects, health reports and disconnects.
    pub fn start_observed(
        resources: watch::Receiver<Arc<ResourceSet>>,
        auth: Arc<dyn Authenticate>,
        observer: Option<Arc<dyn StreamObserver>>,
        config: ServerConfig,
    ) -> Self {
        let first = Arc::new(Snapshot::first(resources.borrow().clone()));
        let (tx, rx) = watch::channel(first);
        tokio::spawn(publisher::run(resources, tx, config.history.max(1)));
        Self {
            shared: Arc::new(Shared {
                observer,
                large: Arc::new(Semaphore::new(config.max_large_responses.max(1))),
                config,
                metrics: XdsMetrics::default(),
                auth,
                snapshots: rx,
                next_stream: AtomicU64::new(1),
                closing: watch::Sender::new(false),
                streams: Arc::default(),
                unverified_log: isthmus_socket::LogLimiter::new(
                    isthmus_socket::limit::DEFAULT_INTERVAL,
                ),
                slots: Arc::default(),
            }),
        }
    }

    pub fn metrics(&self) -> &XdsMetrics {
        &self.shared.metrics
    }

    /// Every open stream that has sent its first request: who it is and how fresh its config
    /// is (`isthmus status`), ordered by node id.
    pub fn streams(&self) -> Vec<StreamStatus> {
        self.shared.streams.list()
    }

    /// Fires when a stream opens or closes (read [`XdsServer::streams`] then).
    pub fn stream_changes(&self) -> watch::Receiver<u64> {
        self.shared.streams.changes()
    }

    /// Ends every open stream with `UNAVAILABLE` (clients reconnect, to another replica or to
    /// this one after a restart) and refuses new ones the same way. Call it before a graceful
    /// shutdown of the gRPC server, which otherwise waits for these endless streams.
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Accepts streams again after [`XdsServer::close_streams`] (the listener restarted in
    /// the same process).
    pub fn reopen(&self) {
        self.shared.closing.send_replace(false);
    }

    /// The tonic-compatible service, to add to a `tonic::transport::Server` (next to the CA's).
    pub fn into_service(self) -> AdsService {
        AdsService { server: self }
    }
}

/// What a connection sends: encoded responses, then possibly a closing status.
pub(crate) enum Outgoing {
    Message(Bytes),
    Close(Status),
}

/// The gRPC path served.
pub const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The tonic-compatible service (add it to a `tonic::transport::Server` next to the CA's).
/// Hand-written rather than generated so responses are encoded once into exact-size buffers
/// (see `wire`).
#[derive(Clone, Debug)]
pub struct AdsService {
    server: XdsServer,
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl Service<http::Request<Body>> for AdsService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let server = self.server.clone();
        Box::pin(async move { Ok(server.handle(request).await) })
    }
}

impl XdsServer {
    async fn handle(&self, request: http::Request<Body>) -> http::Response<Body> {
        if request.uri().path() != DELTA_ADS_PATH {
            return Status::unimplemented(format!(
                "{} is not served: only DeltaAggregatedResources (delta xDS)",
                request.uri().path()
            ))
            .into_http();
        }
        let encoding = request
            .headers()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("identity");
        if encoding != "identity" {
            return Status::unimplemented(format!(
                "grpc-encoding {encoding:?} is not supported; send requests uncompressed"
            ))
            .into_http();
        }
        let (parts, body) = request.into_parts();
        let meta = tonic::Request::from_http(http::Request::from_parts(parts, ()));
        let peer = meta.remote_addr();
        let certs = meta.peer_certs();
        let leaf = certs.as_deref().and_then(|c| c.first());
        let cert_expires = leaf.and_then(not_after);
        let cert_ips = leaf.map(address::ip_sans_of).unwrap_or_default();
        let identity = match self
            .shared
            .auth
            .authenticate(meta.metadata(), certs.as_deref().map(Vec::as_slice))
            .await
        {
            Ok(identity) => identity,
            Err(status) => {
                tracing::warn!(?peer, code = ?status.code(), message = %clip(status.message(), 1024), "discovery stream refused");
                self.shared.metrics.refused(status.code());
                return status.into_http();
            }
        };
        if *self.shared.closing.borrow() {
            return closing_status().into_http();
        }
        let slot = match self.shared.slots.take(
            &identity,
            peer.map(|p| p.ip()),
            self.shared.config.max_streams_per_identity,
            self.shared.config.max_streams_per_identity_and_ip,
        ) {
            Ok(slot) => slot,
            Err(status) => {
                tracing::warn!(?peer, identity = %identity, message = %clip(status.message(), 1024), "discovery stream refused");
                self.shared.metrics.refused(status.code());
                return status.into_http();
            }
        };
        let id = self.shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("xds_stream", id, ?peer, identity = %identity);
        let (tx, rx) = mpsc::channel(self.shared.config.queue_depth.max(2));
        let requests = wire::decode_requests(body, self.shared.config.max_request_bytes);
        let peer = tracker::Peer {
            addr: peer,
            cert_ips,
            cert_expires,
            connected_at: std::time::SystemTime::now(),
        };
        let connection = stream::Connection::new(id, identity, peer, self.shared.clone());
        let run = async move {
            let _slot = slot;
            connection.run(requests, tx).await;
        };
        tokio::spawn(run.instrument(span));
        let mut response = http::Response::new(response_body(rx));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }
}

/// A certificate's expiry (`None` if it does not parse, which the authenticator refuses anyway).
fn not_after(cert: &rustls::pki_types::CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The message of the UNAVAILABLE status that ends a stream at its maximum age: the client
/// should reconnect at once, and may pick another replica.
pub const REBALANCE_MESSAGE: &str =
    "the discovery stream reached its maximum age: reconnect, to any control-plane replica";

pub(crate) fn closing_status() -> Status {
    Status::unavailable("control plane is shutting down; reconnect")
}

/// Data frames for each response, then the trailers with the closing status.
fn response_body(rx: mpsc::Receiver<Outgoing>) -> Body {
    fn trailers(status: &Status) -> Frame<Bytes> {
        let mut headers = http::HeaderMap::new();
        if status.add_header(&mut headers).is_err() {
            headers.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Frame::trailers(headers)
    }
    let frames = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let frame = match rx.recv().await {
            Some(Outgoing::Message(bytes)) => return Some((Ok(Frame::data(bytes)), Some(rx))),
            Some(Outgoing::Close(status)) => trailers(&status),
            None => trailers(&Status::ok("")),
        };
        Some((Ok::<_, Infallible>(frame), None))
    });
    Body::new(StreamBody::new(frames))
}
