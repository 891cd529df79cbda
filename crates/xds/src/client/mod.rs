//! The agent's discovery subscriber.
//!
//! - Subscribes (wildcard) to every configured type on one delta ADS stream.
//! - Validates each resource and converts it to internal types before touching the state;
//!   a bad resource is NACKed by name and the state keeps what it had under that name.
//! - Publishes the state in a `watch`: replaced whole, never cleared when the control plane
//!   goes away.
//! - Saves the last good state to disk (atomically) and loads it at start; the first
//!   connect then sends `initial_resource_versions` and receives only the difference.
//! - Reconnects at once after a clean close, with capped exponential backoff after errors,
//!   and stops on `Unauthenticated` / `PermissionDenied` (returned from [`XdsClient::run`]).
//! - [`Ready`] fires after the first answer for every subscribed type.

mod cache;
mod connect;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status};

pub use cache::{
    decode as decode_cache, encode as encode_cache, load as load_cache,
    write_atomic as write_cache, CacheError,
};
pub use connect::{Connect, ConnectError, EndpointConnector};
pub use state::{
    AppProtocol, Authorization, Health, Item, Locality, Origin, PortMapping, ResourceError,
    Service, State, Tunnel, Workload,
};

use crate::pb::envoy::config::core::v3::Node;
use crate::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::pb::google::rpc;
use crate::resources::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, HTTP_POLICY_TYPE_URL, TRAFFIC_TYPE_URL,
};
use state::{parse_resource, Raw};

/// How the subscriber identifies itself and behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Istio's form: `<role>~<ip>~<name>.<namespace>~<namespace>.svc.<domain>` (see [`node_id`]).
    pub node_id: String,
    /// Node metadata (Istio's keys: `NAMESPACE`, `SERVICE_ACCOUNT`, `CLUSTER_ID`, ...).
    pub node_metadata: BTreeMap<String, String>,
    /// Types subscribed to (wildcard); default both Istio workload types.
    pub type_urls: Vec<String>,
    /// Last-known-good cache; `None` disables it.
    pub cache_path: Option<PathBuf>,
    /// Least time between two cache writes.
    pub cache_interval: Duration,
    /// Largest response accepted (a full state of 10,000 workloads is about 4 MB).
    pub max_message_bytes: usize,
    /// First delay after a failure; doubled per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl ClientConfig {
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            node_metadata: BTreeMap::new(),
            type_urls: vec![
                ADDRESS_TYPE_URL.to_owned(),
                AUTHORIZATION_TYPE_URL.to_owned(),
                TRAFFIC_TYPE_URL.to_owned(),
                HTTP_POLICY_TYPE_URL.to_owned(),
            ],
            cache_path: None,
            cache_interval: Duration::from_secs(1),
            max_message_bytes: 64 * 1024 * 1024,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(15),
        }
    }
}

/// Istio's node id: `sidecar~<ip>~<name>.<namespace>~<namespace>.svc.<domain>`.
pub fn node_id(ip: &str, name: &str, namespace: &str, domain: &str) -> String {
    format!("sidecar~{ip}~{name}.{namespace}~{namespace}.svc.{domain}")
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the control plane refused discovery ({code:?}): {message}; check the agent's token or certificate")]
    Refused { code: Code, message: String },
}

/// The subscriber's connection, for status pages and `doctor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientStatus {
    Connecting,
    Connected,
    /// Waiting before the next attempt after `error`.
    Backoff {
        error: String,
        retry_in: Duration,
    },
    /// Stopped for good (see [`ClientError`]).
    Failed(String),
}

/// Resolves once the first full state has arrived from the control plane.
#[derive(Clone, Debug)]
pub struct Ready(watch::Receiver<bool>);

impl Ready {
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until ready; returns at once if already so. Never resolves if the client stops
    /// first.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|r| *r).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The discovery subscriber. Take its handles ([`XdsClient::state`], [`XdsClient::ready`],
/// [`XdsClient::status`]), then spawn [`XdsClient::run`].
pub struct XdsClient {
    config: ClientConfig,
    connector: Arc<dyn Connect>,
    state: watch::Sender<Arc<State>>,
    ready: watch::Sender<bool>,
    status: watch::Sender<ClientStatus>,
    health: watch::Sender<Option<HealthReport>>,
}

/// The workload's health as the agent's probe sees it, reported on the discovery stream
/// (Istio's `istio.io/health` requests): sent when it changes and again on every reconnect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    pub healthy: bool,
    /// Why it is unhealthy.
    pub message: Option<String>,
}

impl std::fmt::Debug for XdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClient")
            .field("node_id", &self.config.node_id)
            .finish_non_exhaustive()
    }
}

/// How one stream attempt ended.
enum Ended {
    /// The server closed the stream cleanly.
    Clean { received: bool },
    /// Transport or status error worth retrying.
    Failed { error: String, received: bool },
    /// The server ended the stream at its maximum age: reconnect now, perhaps elsewhere.
    Rebalance,
}

impl XdsClient {
    /// Creates the subscriber and loads the cache if there is one (a bad cache is logged and
    /// ignored: the control plane sends everything again).
    pub fn new(config: ClientConfig, connector: Arc<dyn Connect>) -> Self {
        let initial = match config.cache_path.as_deref().map(cache::load) {
            Some(Ok(Some(state))) => {
                tracing::info!(
                    workloads = state.workloads().count(),
                    services = state.services().count(),
                    "loaded the last-known-good discovery state from disk"
                );
                state
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ignoring the discovery cache");
                State::default()
            }
            Some(Ok(None)) | None => State::default(),
        };
        Self {
            config,
            connector,
            state: watch::Sender::new(Arc::new(initial)),
            ready: watch::Sender::new(false),
            status: watch::Sender::new(ClientStatus::Connecting),
            health: watch::Sender::new(None),
        }
    }

    /// Where the agent's prober puts the workload's health.
    pub fn health(&self) -> watch::Sender<Option<HealthReport>> {
        self.health.clone()
    }

    fn health_request(report: &HealthReport) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: crate::server::HEALTH_TYPE_URL.to_owned(),
            error_detail: (!report.healthy).then(|| crate::pb::google::rpc::Status {
                code: 14,
                message: report.message.clone().unwrap_or_else(|| "unhealthy".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub fn state(&self) -> watch::Receiver<Arc<State>> {
        self.state.subscribe()
    }

    pub fn ready(&self) -> Ready {
        Ready(self.ready.subscribe())
    }

    pub fn status(&self) -> watch::Receiver<ClientStatus> {
        self.status.subscribe()
    }

    /// Runs until the control plane refuses the agent for good.
    pub async fn run(self) -> Result<(), ClientError> {
        if let Some(path) = self.config.cache_path.clone() {
            tokio::spawn(save_loop(
                self.state.subscribe(),
                path,
                self.config.cache_interval,
            ));
        }
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            self.status.send_replace(ClientStatus::Connecting);
            let ended = match self.attempt().await {
                Ok(ended) => ended,
                Err(status) => {
                    let message = status.message().to_owned();
                    tracing::error!(code = ?status.code(), %message, "control plane refused discovery; giving up");
                    self.status.send_replace(ClientStatus::Failed(format!(
                        "{:?}: {message}",
                        status.code()
                    )));
                    return Err(ClientError::Refused {
                        code: status.code(),
                        message,
                    });
                }
            };
            let (error, received) = match ended {
                Ended::Clean { received: true } => {
                    tracing::info!("control plane closed the discovery stream; reconnecting");
                    backoff.reset();
                    continue;
                }
                Ended::Rebalance => {
                    tracing::info!("control plane closed the discovery stream at its maximum age; reconnecting");
                    self.connector.rebalance();
                    backoff.reset();
                    continue;
                }
                Ended::Clean { received: false } => {
                    ("stream closed before any response".to_owned(), false)
                }
                Ended::Failed { error, received } => (error, received),
            };
            if received {
                backoff.reset();
            }
            let delay = backoff.next();
            tracing::warn!(%error, retry_in = ?delay, "discovery stream failed");
            self.status.send_replace(ClientStatus::Backoff {
                error,
                retry_in: delay,
            });
            tokio::time::sleep(delay).await;
        }
    }

    fn node(&self) -> Node {
        Node {
            id: self.config.node_id.clone(),
            metadata: Some(prost_types::Struct {
                fields: self
                    .config
                    .node_metadata
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue(v.clone())),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    /// One stream, from connect to its end. `Err` only for a non-retryable refusal.
    async fn attempt(&self) -> Result<Ended, Status> {
        let failed = |error: String, received| Ok(Ended::Failed { error, received });
        let channel = match self.connector.connect().await {
            Ok(c) => c,
            Err(e) => return failed(e.to_string(), false),
        };
        let metadata = match self.connector.metadata() {
            Ok(m) => m,
            Err(e) => return failed(e.to_string(), false),
        };
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes);

        let (tx, rx) = mpsc::channel(self.config.type_urls.len() + 8);
        let current = self.state.borrow().clone();
        for (i, type_url) in self.config.type_urls.iter().enumerate() {
            let request = DeltaDiscoveryRequest {
                node: (i == 0).then(|| self.node()),
                type_url: type_url.clone(),
                initial_resource_versions: current.versions(type_url).into_iter().collect(),
                ..Default::default()
            };
            // Capacity exceeds the number of types, so this cannot block.
            let _ = tx.send(request).await;
        }
        let mut request = Request::new(ReceiverStream::new(rx));
        *request.metadata_mut() = metadata;
        let mut stream = match client.delta_aggregated_resources(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return classify(status, false),
        };
        self.status.send_replace(ClientStatus::Connected);
        tracing::info!(
            initial = current.raw().values().map(|m| m.len()).sum::<usize>(),
            "discovery stream open"
        );
        let mut answered = std::collections::HashSet::new();
        let mut received = false;
        let mut health = self.health.subscribe();
        let report = health.borrow_and_update().clone();
        if let Some(report) = report {
            let _ = tx.send(Self::health_request(&report)).await;
        }
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                changed = health.changed() => {
                    if changed.is_ok() {
                        let report = health.borrow_and_update().clone();
                        if let Some(report) = report {
                            if tx.send(Self::health_request(&report)).await.is_err() {
                                return failed("request stream closed".into(), received);
                            }
                        }
                    }
                    continue;
                }
            };
            match message {
                Ok(Some(response)) => {
                    received = true;
                    let type_url = response.type_url.clone();
                    let ack = self.apply(response);
                    if tx.send(ack).await.is_err() {
                        return failed("request stream closed".into(), true);
                    }
                    answered.insert(type_url);
                    if !*self.ready.borrow()
                        && self.config.type_urls.iter().all(|t| answered.contains(t))
                    {
                        tracing::info!("first full discovery state received");
                        self.ready.send_replace(true);
                    }
                }
                Ok(None) => return Ok(Ended::Clean { received }),
                Err(status) => return classify(status, received),
            }
        }
    }

    /// Applies one response and returns its ACK or NACK.
    fn apply(&self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let DeltaDiscoveryResponse {
            resources,
            type_url,
            nonce,
            removed_resources,
            ..
        } = response;
        let mut errors = Vec::new();
        let mut upserts = Vec::with_capacity(resources.len());
        if !self.config.type_urls.contains(&type_url) {
            errors.push(format!("type {type_url:?} was not subscribed to"));
        } else {
            // Conversion happens here, before the state is swapped.
            for r in resources {
                let Some(any) = r.resource else {
                    errors.push(format!("resource {:?}: no body", r.name));
                    continue;
                };
                match parse_resource(&type_url, &r.name, &any) {
                    Ok(item) => upserts.push((
                        r.name,
                        Raw {
                            version: r.version,
                            any: Arc::new(any),
                            item,
                        },
                    )),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            let current = self.state.borrow().clone();
            let next = current.apply(
                &type_url,
                upserts,
                &removed_resources,
                state::Origin::Server,
            );
            self.state.send_replace(Arc::new(next));
        }
        let error_detail = (!errors.is_empty()).then(|| {
            tracing::warn!(%type_url, %nonce, errors = ?errors, "rejecting resources");
            rpc::Status {
                code: Code::InvalidArgument as i32,
                message: format!("rejected: {}", errors.join("; ")),
                details: Vec::new(),
            }
        });
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail,
            ..Default::default()
        }
    }
}

fn classify(status: Status, received: bool) -> Result<Ended, Status> {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => Err(status),
        Code::Unavailable if status.message() == crate::server::REBALANCE_MESSAGE => {
            Ok(Ended::Rebalance)
        }
        code => Ok(Ended::Failed {
            error: format!("{code:?}: {}", status.message()),
            received,
        }),
    }
}

/// Writes the state to disk when it changes, at most once per `interval`; only states that
/// came from the control plane (a loaded cache is already on disk).
async fn save_loop(mut state: watch::Receiver<Arc<State>>, path: PathBuf, interval: Duration) {
    loop {
        if state.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(interval).await;
        let current = state.borrow_and_update().clone();
        if current.origin() != state::Origin::Server {
            continue;
        }
        let path = path.clone();
        let result = tokio::task::spawn_blocking(move || {
            cache::write_atomic(&path, &cache::encode(&current))
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::debug!("saved the discovery state"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the discovery state"),
            Err(e) => tracing::warn!(error = %e, "discovery cache writer failed"),
        }
    }
}

/// Capped exponential backoff with jitter (80-120% of the nominal delay).
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn next(&mut self) -> Duration {
        let nominal = self.next;
        self.next = (self.next * 2).min(self.max);
        nominal.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let d: Vec<Duration> = (0..5).map(|_| b.next()).collect();
        assert!(d[0] >= Duration::from_millis(80) && d[0] <= Duration::from_millis(120));
        assert!(d[1] >= Duration::from_millis(160) && d[1] <= Duration::from_millis(240));
        assert!(d[4] >= Duration::from_millis(400) && d[4] <= Duration::from_millis(600));
        b.reset();
        assert!(b.next() <= Duration::from_millis(120));
    }

    #[test]
    fn node_id_has_istio_form() {
        assert_eq!(
            node_id("10.0.0.5", "vm1", "prod", "cluster.local"),
            "sidecar~10.0.0.5~vm1.prod~prod.svc.cluster.local"
        );
    }
}
