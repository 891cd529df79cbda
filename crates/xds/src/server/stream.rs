//! One client's discovery stream: its subscriptions, what it has, and what is in flight.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use prost_types::value::Kind;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tonic::Status;

use super::address::HostAddress;
use isthmus_model::text::{clip, LOG_FIELD};

use super::publisher::Snapshot;
use super::tracker::{Entry, Peer, Who};
use super::wire::{encode_response, Requests};
use super::{Identity, Outgoing, Shared, HEALTH_TYPE_URL};
use crate::node::{NodeId, Quoted};
use crate::pb::envoy::config::core::v3::Node;
use crate::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use crate::resources::{TypeResources, Version, XdsResource};

type Outbound = mpsc::Sender<Outgoing>;

/// What the server believes the client holds under one name, where that differs from the
/// generation the client is based on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// It has this version (from `initial_resource_versions`).
    Has(Version),
    /// It may have anything: send the current state of the name (a fresh subscription, or a
    /// version from another server).
    Stale,
    /// It refused this version (`None`: this removal); unknown what it has. Not sent again
    /// until the name changes.
    Held(Option<Version>),
}

/// What one name needs.
enum Action {
    Nothing,
    Hold(Option<Version>),
    Send(Arc<XdsResource>),
    Remove,
}

fn decide(view: Option<Known>, current: Option<&Arc<XdsResource>>) -> Action {
    match (view, current) {
        (None, None) => Action::Nothing,
        (Some(Known::Has(v)), Some(r)) if v == r.version => Action::Nothing,
        (Some(Known::Held(h)), Some(r)) if h == Some(r.version) => Action::Hold(h),
        (Some(Known::Held(None)), None) => Action::Hold(None),
        (_, Some(r)) => Action::Send(r.clone()),
        (Some(_), None) => Action::Remove,
    }
}

struct InFlight {
    nonce: String,
    sent: Vec<(Arc<str>, Option<Version>)>,
    permit: Option<(OwnedSemaphorePermit, Instant)>,
}

/// One type URL on one stream.
struct TypeState {
    /// Served by this server; for other types nothing the client sends is kept.
    known: bool,
    wildcard: bool,
    names: HashSet<Arc<str>>,
    /// The generation (and its resources of this type) the client holds, except for `overlay`.
    base: Option<(u64, Arc<TypeResources>)>,
    overlay: HashMap<Arc<str>, Known>,
    inflight: Option<InFlight>,
    answered: bool,
    dirty: bool,
}

impl TypeState {
    fn subscribed(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// What the client holds under `name`, as far as the server knows.
    fn view(&self, name: &str) -> Option<Known> {
        if !self.subscribed(name) {
            return None;
        }
        if let Some(k) = self.overlay.get(name) {
            return Some(*k);
        }
        let (_, base) = self.base.as_ref()?;
        base.get(name).map(|r| Known::Has(r.version))
    }

    /// Gives memory back after many names were unsubscribed (a hash set keeps its largest
    /// capacity otherwise, so subscribe/unsubscribe churn would hold the peak for ever).
    fn shrink(&mut self) {
        if self.names.capacity() > 64 && self.names.len() < self.names.capacity() / 4 {
            self.names.shrink_to_fit();
        }
        if self.overlay.capacity() > 64 && self.overlay.len() < self.overlay.capacity() / 4 {
            self.overlay.shrink_to_fit();
        }
    }

    /// Forgets the base generation, keeping what the client holds as explicit entries (before
    /// the subscription widens, when "the base minus unsubscribed names" stops being exact).
    fn materialize(&mut self) {
        if let Some((_, base)) = self.base.take() {
            for (name, r) in base.iter() {
                if self.names.contains(name) && !self.overlay.contains_key(name) {
                    self.overlay.insert(name.clone(), Known::Has(r.version));
                }
            }
        }
    }
}

/// Longest health message kept from a client.
const MAX_HEALTH_MESSAGE: usize = 1024;
/// A health report equal to the last one reaches the observer at most this often.
const HEALTH_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// Which health reports of one stream reach the observer: a change at once, a repeat only
/// after [`HEALTH_REFRESH`], so a client repeating itself in a loop costs no store writes.
#[derive(Default)]
struct HealthGate {
    last: Option<(Option<String>, Instant)>,
}

impl HealthGate {
    fn pass(&mut self, message: &Option<String>, now: Instant) -> bool {
        let pass = match &self.last {
            Some((m, at)) => m != message || now >= *at + HEALTH_REFRESH,
            None => true,
        };
        if pass {
            self.last = Some((message.clone(), now));
        }
        pass
    }
}

struct Diff {
    resources: Vec<Arc<XdsResource>>,
    removed: Vec<Arc<str>>,
}

pub(crate) struct Connection {
    id: u64,
    identity: Identity,
    shared: Arc<Shared>,
    types: BTreeMap<String, TypeState>,
    responses: u64,
    first_request: bool,
    peer: Peer,
    /// This stream in the server's list of open streams (from the first request on).
    tracked: Option<Entry>,
}

/// Tells the observer the stream ended, however the task ends.
struct ObservedGuard {
    observer: Arc<dyn super::StreamObserver>,
    handle: String,
}

impl Drop for ObservedGuard {
    fn drop(&mut self) {
        self.observer.disconnected(&self.handle);
    }
}

/// Keeps the connected-clients gauge right however the task ends.
struct ConnectedGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Connection {
    pub fn new(id: u64, identity: Identity, peer: Peer, shared: Arc<Shared>) -> Self {
        Self {
            id,
            identity,
            shared,
            types: BTreeMap::new(),
            responses: 0,
            first_request: true,
            peer,
            tracked: None,
        }
    }

    pub async fn run(mut self, mut requests: Requests, tx: Outbound) {
        let gauge = self.shared.metrics.connected().clone();
        gauge.inc();
        let _guard = ConnectedGuard(gauge);
        let mut observed: Option<ObservedGuard> = None;
        let mut health_gate = HealthGate::default();
        let mut snapshots = self.shared.snapshots.clone();
        let mut source_open = true;
        let mut seen_generation = snapshots.borrow_and_update().generation;
        let mut closing = self.shared.closing.subscribe();
        let max_age_at = self.shared.config.max_stream_age.map(|age| {
            // 90% to 110% of the age, so streams opened together do not all reconnect at once.
            let jitter = 0.9 + rand::random::<f64>() * 0.2;
            Instant::now() + age.mul_f64(jitter)
        });
        tracing::debug!("discovery stream opened");
        loop {
            let deadline = self.permit_deadline();
            // The select only picks what happened; the handling (which may await the observer)
            // runs after it, when none of its futures is alive.
            let incoming = tokio::select! {
                msg = requests.next() => Some(msg),
                changed = snapshots.changed(), if source_open => {
                    // Only a wake-up: the generation check below marks the work.
                    source_open = changed.is_ok();
                    None
                }
                () = sleep_until_opt(deadline), if deadline.is_some() => {
                    self.release_expired_permits();
                    None
                }
                () = tx.closed() => return,
                () = sleep_until_opt(max_age_at), if max_age_at.is_some() => {
                    tracing::debug!("closing the discovery stream: maximum age reached");
                    let _ = tx.try_send(Outgoing::Close(Status::unavailable(super::REBALANCE_MESSAGE)));
                    return;
                }
                _ = closing.wait_for(|c| *c) => {
                    tracing::debug!("closing the discovery stream: server shutting down");
                    let _ = tx.try_send(Outgoing::Close(super::closing_status()));
                    return;
                }
            };
            match incoming {
                None => {}
                Some(Some(Ok(request))) => {
                    if std::mem::take(&mut self.first_request) {
                        let node = request.node.clone().unwrap_or_default();
                        match self.hello(&node).await {
                            Ok((o, parsed, address)) => {
                                observed = o;
                                let who = Who {
                                    identity: &self.identity,
                                    node: &node,
                                    parsed: &parsed,
                                    address: &address,
                                };
                                self.tracked = Some(self.shared.streams.register(
                                    self.id,
                                    who,
                                    &self.peer,
                                    observed.as_ref().map(|o| o.handle.clone()),
                                ));
                            }
                            Err(status) => {
                                tracing::warn!(code = ?status.code(), message = %clip(status.message(), 1024), "closing discovery stream");
                                self.shared.metrics.refused(status.code());
                                let _ = tx.try_send(Outgoing::Close(status));
                                return;
                            }
                        }
                    }
                    if request.type_url == HEALTH_TYPE_URL {
                        // Health is a report, not a subscription: nothing is sent back. The
                        // message is client text, kept short; the observer (a store write)
                        // hears only changes, and a repeat at most every HEALTH_REFRESH.
                        let message = request
                            .error_detail
                            .as_ref()
                            .map(|e| clip(&e.message, MAX_HEALTH_MESSAGE).into_owned());
                        if let Some(t) = &self.tracked {
                            t.health(message.is_none(), message.as_deref());
                        }
                        if let Some(o) = &observed {
                            if health_gate.pass(&message, Instant::now()) {
                                o.observer
                                    .health(&o.handle, message.is_none(), message)
                                    .await;
                            }
                        }
                    } else if let Err(status) = self.on_request(request) {
                        tracing::warn!(code = ?status.code(), message = %clip(status.message(), 1024), "closing discovery stream");
                        self.shared.metrics.refused(status.code());
                        let _ = tx.try_send(Outgoing::Close(status));
                        return;
                    }
                }
                Some(None) => {
                    tracing::debug!("client closed the discovery stream");
                    return;
                }
                Some(Some(Err(status))) => {
                    tracing::debug!(error = %status, "discovery stream broke");
                    let _ = tx.try_send(Outgoing::Close(status));
                    return;
                }
            }
            let snapshot = snapshots.borrow_and_update().clone();
            if snapshot.generation != seen_generation {
                seen_generation = snapshot.generation;
                for t in self.types.values_mut() {
                    t.dirty = true;
                }
            }
            if self.flush(&snapshot, &tx).await.is_err() {
                return;
            }
        }
    }

    /// The first request's node: checked against the identity, its address verified, then
    /// shown to the observer.
    async fn hello(
        &self,
        node: &Node,
    ) -> Result<(Option<ObservedGuard>, NodeId, HostAddress), Status> {
        let parsed = check_node(node, &self.identity)?;
        let address = super::address::verify(
            parsed.claimed_ip(),
            self.peer.addr,
            &self.peer.cert_ips,
            &self.identity,
            self.shared.auth.as_ref(),
        )
        .await;
        if let Some(problem) = address.problem(&self.identity) {
            self.shared.metrics.unverified_claim();
            if let Some(held_back) = self
                .shared
                .unverified_log
                .check(("discovery", "unverified address claim"))
            {
                tracing::warn!(
                    node = %Quoted::new(&node.id),
                    held_back,
                    "ignoring the node id's address: {problem}"
                );
            }
        }
        let observed = match self.shared.observer.clone() {
            Some(observer) => observer
                .connected(&self.identity, node, &address)
                .await?
                .map(|handle| ObservedGuard { observer, handle }),
            None => None,
        };
        Ok((observed, parsed, address))
    }

    fn permit_deadline(&self) -> Option<Instant> {
        self.types
            .values()
            .filter_map(|t| t.inflight.as_ref()?.permit.as_ref().map(|(_, d)| *d))
            .min()
    }

    fn release_expired_permits(&mut self) {
        let now = Instant::now();
        for t in self.types.values_mut() {
            if let Some(f) = t.inflight.as_mut() {
                if f.permit.as_ref().is_some_and(|(_, d)| *d <= now) {
                    tracing::debug!(nonce = %f.nonce, "large response still not ACKed; releasing its permit");
                    f.permit = None;
                }
            }
        }
    }

    fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        if req.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "DeltaDiscoveryRequest without type_url: set it to type.googleapis.com/istio.workload.Address or type.googleapis.com/istio.security.Authorization",
            ));
        }
        let DeltaDiscoveryRequest {
            type_url,
            resource_names_subscribe,
            resource_names_unsubscribe,
            initial_resource_versions,
            response_nonce,
            error_detail,
            ..
        } = req;
        let max_names = self.shared.config.max_names_per_type;
        let Some(state) = self.types.get_mut(&type_url) else {
            // First request of this type on this stream.
            if self.types.len() >= super::MAX_TYPES {
                return Err(Status::resource_exhausted(format!(
                    "this stream already subscribes to {} type URLs, the limit per stream; \
                     subscribe only to {} and {}",
                    super::MAX_TYPES,
                    crate::resources::ADDRESS_TYPE_URL,
                    crate::resources::AUTHORIZATION_TYPE_URL,
                )));
            }
            // Names of a type this server does not serve are not kept: it gets one empty
            // answer, as an empty type would.
            let served = self
                .shared
                .snapshots
                .borrow()
                .set
                .of_type(&type_url)
                .map(|t| t.len());
            let known = served.is_some();
            if !known {
                tracing::debug!(type_url = %clip(&type_url, LOG_FIELD), "subscription to a type this server does not serve: answered empty");
            }
            if known {
                too_many(&type_url, resource_names_subscribe.len(), max_names)?;
                // A reconnecting wildcard client lists what it holds: as many names as are
                // served (with room for those removed while it was away), however many that is.
                let held = max_names.max(served.unwrap_or(0).saturating_mul(2));
                too_many(&type_url, initial_resource_versions.len(), held)?;
            }
            let wildcard = known
                && (resource_names_subscribe.is_empty()
                    || resource_names_subscribe.iter().any(|n| n == "*"));
            let names: HashSet<Arc<str>> = resource_names_subscribe
                .iter()
                .filter(|n| known && *n != "*")
                .map(|n| Arc::from(n.as_str()))
                .collect();
            let mut overlay: HashMap<Arc<str>, Known> = initial_resource_versions
                .into_iter()
                .filter(|_| known)
                .map(|(name, v)| {
                    let known = Version::parse(&v).map_or(Known::Stale, Known::Has);
                    (Arc::from(name), known)
                })
                .collect();
            for n in &names {
                overlay.entry(n.clone()).or_insert(Known::Stale);
            }
            tracing::debug!(type_url = %clip(&type_url, LOG_FIELD), wildcard, names = names.len(), initial = overlay.len(), "subscribed");
            if let Some(t) = &self.tracked {
                t.subscribed(&type_url);
            }
            self.types.insert(
                type_url,
                TypeState {
                    known,
                    wildcard,
                    names,
                    base: None,
                    overlay,
                    inflight: None,
                    answered: false,
                    dirty: true,
                },
            );
            return Ok(());
        };

        if !response_nonce.is_empty() {
            let matches = state
                .inflight
                .as_ref()
                .is_some_and(|f| f.nonce == response_nonce);
            if matches {
                // Matched above; taking it ends the flight (and frees a large-response permit).
                if let Some(flight) = state.inflight.take() {
                    if let Some(error) = error_detail {
                        if let Some(t) = &self.tracked {
                            t.nacked(&type_url, &error.message);
                        }
                        self.shared.metrics.nacked(&type_url);
                        tracing::warn!(
                            type_url = %clip(&type_url, LOG_FIELD),
                            nonce = %flight.nonce,
                            resources = flight.sent.len(),
                            error = %clip(&error.message, 1024),
                            "client rejected a discovery response; its resources are held until they change"
                        );
                        for (name, version) in flight.sent {
                            if state.subscribed(&name) {
                                state.overlay.insert(name, Known::Held(version));
                            }
                        }
                    } else if let Some(t) = &self.tracked {
                        let holding = state.overlay.values().any(|k| matches!(k, Known::Held(_)));
                        t.acked(&type_url, holding);
                    }
                }
            } else {
                tracing::debug!(type_url = %clip(&type_url, LOG_FIELD), nonce = %clip(&response_nonce, LOG_FIELD), "stale nonce ignored");
            }
        }

        if !state.known {
            return Ok(());
        }
        for name in resource_names_subscribe {
            if name == "*" {
                if !state.wildcard {
                    state.materialize();
                    state.wildcard = true;
                    state.dirty = true;
                }
            } else {
                let name: Arc<str> = Arc::from(name);
                state.names.insert(name.clone());
                too_many(&type_url, state.names.len(), max_names)?;
                // Sent again even if it is believed up to date (the xDS rule for subscribe).
                state.overlay.insert(name, Known::Stale);
                state.dirty = true;
            }
        }
        for name in resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(name.as_str());
                if !state.subscribed(&name) {
                    state.overlay.remove(name.as_str());
                }
            }
        }
        state.shrink();
        Ok(())
    }

    /// Sends what each type needs, where nothing is in flight for it.
    async fn flush(&mut self, snapshot: &Snapshot, tx: &Outbound) -> Result<(), ()> {
        let urls: Vec<String> = self
            .types
            .iter()
            .filter(|(_, t)| t.dirty && t.inflight.is_none())
            .map(|(u, _)| u.clone())
            .collect();
        for url in urls {
            let Some(state) = self.types.get_mut(&url) else {
                continue;
            };
            state.dirty = false;
            let diff = compute(state, snapshot, &url);
            if diff.resources.is_empty() && diff.removed.is_empty() && state.answered {
                continue;
            }
            let permit = if diff.resources.len() >= self.shared.config.large_response {
                let acquire = self.shared.large.clone().acquire_owned();
                let permit = tokio::select! {
                    p = acquire => p.ok(),
                    () = tx.closed() => return Err(()),
                };
                permit.map(|p| (p, Instant::now() + self.shared.config.large_response_hold))
            } else {
                None
            };
            self.responses += 1;
            let nonce = format!("{:x}-{:x}", self.id, self.responses);
            let encoded = match encode_response(
                &snapshot.generation.to_string(),
                &url,
                &nonce,
                &diff.resources,
                &diff.removed,
            ) {
                Ok(bytes) => bytes,
                Err(status) => {
                    tracing::error!(error = %status, "cannot encode a discovery response");
                    let _ = tx.try_send(Outgoing::Close(status));
                    return Err(());
                }
            };
            let (pushed, removed) = (diff.resources.len(), diff.removed.len());
            let mut sent: Vec<(Arc<str>, Option<Version>)> = diff
                .resources
                .iter()
                .map(|r| (r.name.clone(), Some(r.version)))
                .collect();
            sent.extend(diff.removed.into_iter().map(|n| (n, None)));
            state.answered = true;
            state.inflight = Some(InFlight {
                nonce: nonce.clone(),
                sent,
                permit,
            });
            if let Some(t) = &self.tracked {
                t.sent(&url, snapshot.generation);
            }
            self.shared.metrics.pushed(&url, pushed);
            tracing::debug!(type_url = %url, %nonce, resources = pushed, removed, "push");
            match tokio::time::timeout(
                self.shared.config.send_timeout,
                tx.send(Outgoing::Message(encoded)),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(()),
                Err(_) => {
                    tracing::warn!(
                        timeout = ?self.shared.config.send_timeout,
                        "discovery client is not reading its stream; ending it (it will reconnect and get the difference)"
                    );
                    return Err(());
                }
            }
        }
        Ok(())
    }
}

/// The client's difference from `snapshot` for one type; afterwards the client is based on
/// `snapshot`, with only held names left as exceptions.
fn compute(state: &mut TypeState, snapshot: &Snapshot, url: &str) -> Diff {
    let empty = Arc::new(TypeResources::new());
    let current = snapshot.set.of_type(url).cloned().unwrap_or(empty);
    let mut candidates: HashSet<Arc<str>> = match &state.base {
        Some((generation, _)) => snapshot
            .changed_since(*generation, url)
            .unwrap_or_else(|| all_names(state, &current)),
        None => all_names(state, &current),
    };
    candidates.extend(state.overlay.keys().cloned());

    let mut resources = Vec::new();
    let mut removed = Vec::new();
    let mut held = HashMap::new();
    for name in candidates {
        let current_item = if state.subscribed(&name) {
            current.get(&name)
        } else {
            None
        };
        match decide(state.view(&name), current_item) {
            Action::Nothing => {}
            Action::Hold(v) => {
                held.insert(name, Known::Held(v));
            }
            Action::Send(r) => resources.push(r),
            Action::Remove => removed.push(name),
        }
    }
    resources.sort_by(|a, b| a.name.cmp(&b.name));
    removed.sort();
    state.overlay = held;
    state.base = Some((snapshot.generation, current));
    Diff { resources, removed }
}

fn all_names(state: &TypeState, current: &TypeResources) -> HashSet<Arc<str>> {
    let mut names: HashSet<Arc<str>> = current.keys().cloned().collect();
    if let Some((_, base)) = &state.base {
        names.extend(base.keys().cloned());
    }
    names
}

/// Refuses a subscription of more than `max` names of one type.
fn too_many(type_url: &str, names: usize, max: usize) -> Result<(), Status> {
    if names <= max {
        return Ok(());
    }
    Err(Status::resource_exhausted(format!(
        "subscription to {names} names of {} is over the limit of {max} names per type and \
         stream (`isthmus server --max-subscriptions`); subscribe to every name with the wildcard \
         (no names, or \"*\") instead",
        clip(type_url, LOG_FIELD)
    )))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A non-empty string value of the node's metadata.
pub fn node_metadata<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    match node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// The node must not claim another namespace or service account than the client proved, and
/// its id must have one of the forms [`NodeId::parse`] accepts.
fn check_node(node: &Node, identity: &Identity) -> Result<NodeId, Status> {
    let refuse = |what: &str, claimed: &str| {
        Status::permission_denied(format!(
            "node {} claims {what} {} but the client is authenticated as {identity}; \
             run the agent with the identity of its own namespace and service account",
            Quoted::new(&node.id),
            Quoted::new(claimed),
        ))
    };
    if let Some(ns) = node_metadata(node, "NAMESPACE") {
        if ns != identity.namespace {
            return Err(refuse("namespace", ns));
        }
    }
    if let Some(sa) = node_metadata(node, "SERVICE_ACCOUNT") {
        if sa != identity.service_account {
            return Err(refuse("service account", sa));
        }
    }
    let parsed = NodeId::parse(&node.id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let Some(ns) = parsed.namespace() {
        if ns != identity.namespace {
            return Err(refuse("namespace", ns));
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_health_reports_reach_the_observer_only_when_they_change_or_are_old() {
        let mut gate = HealthGate::default();
        let t0 = Instant::now();
        let down = Some("port 3306 refused".to_owned());
        assert!(gate.pass(&None, t0));
        for i in 1..100 {
            assert!(!gate.pass(&None, t0 + std::time::Duration::from_millis(i)));
        }
        assert!(gate.pass(&down, t0 + std::time::Duration::from_millis(200)));
        assert!(!gate.pass(&down, t0 + std::time::Duration::from_secs(1)));
        assert!(gate.pass(
            &down,
            t0 + HEALTH_REFRESH + std::time::Duration::from_secs(1)
        ));
        assert!(gate.pass(
            &None,
            t0 + HEALTH_REFRESH + std::time::Duration::from_secs(2)
        ));
    }

    fn node(id: &str, meta: &[(&str, &str)]) -> Node {
        Node {
            id: id.to_owned(),
            metadata: Some(prost_types::Struct {
                fields: meta
                    .iter()
                    .map(|(k, v)| {
                        (
                            (*k).to_owned(),
                            prost_types::Value {
                                kind: Some(Kind::StringValue((*v).to_owned())),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn node_must_match_identity() {
        let id = Identity::new("cluster.local", "prod", "web");
        let ok = "sidecar~10.0.0.5~vm1.prod~prod.svc.cluster.local";
        assert!(check_node(&node(ok, &[("NAMESPACE", "prod")]), &id).is_ok());
        assert!(check_node(&node("opaque-id", &[]), &id).is_ok());
        let bad = check_node(
            &node("sidecar~10.0.0.5~vm1.other~other.svc.cluster.local", &[]),
            &id,
        )
        .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::PermissionDenied);
        assert!(bad.message().contains("\"other\""), "{}", bad.message());
        let bad = check_node(&node(ok, &[("SERVICE_ACCOUNT", "db")]), &id).unwrap_err();
        assert!(
            bad.message().contains("service account \"db\""),
            "{}",
            bad.message()
        );
        // Forms that once skipped the namespace check are refused outright.
        for id_str in [
            "sidecar~10.0.0.5~vm1.other",
            "sidecar~10.0.0.5~vm1.other~other.svc.cluster.local~x",
            "sidecar~10.0.0.5~vm1~.svc.cluster.local",
            "sidecar~not-an-ip~vm1.prod~prod.svc.cluster.local",
        ] {
            let bad = check_node(&node(id_str, &[]), &id).unwrap_err();
            assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{id_str}");
            assert!(
                bad.message().starts_with("node id \""),
                "{id_str}: {}",
                bad.message()
            );
        }
        // The namespace in the name part counts as much as the domain's.
        let bad = check_node(
            &node("ztunnel~10.0.0.5~zt.other~other.svc.cluster.local", &[]),
            &id,
        )
        .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::PermissionDenied);
        let parsed = check_node(&node(ok, &[]), &id).unwrap();
        assert_eq!(parsed.claimed_ip(), Some("10.0.0.5".parse().unwrap()));
    }

    #[test]
    fn decisions() {
        let r = Arc::new(XdsResource {
            name: Arc::from("a"),
            version: Version(1),
            any: Default::default(),
        });
        assert!(matches!(decide(None, None), Action::Nothing));
        assert!(matches!(
            decide(Some(Known::Has(Version(1))), Some(&r)),
            Action::Nothing
        ));
        assert!(matches!(
            decide(Some(Known::Has(Version(2))), Some(&r)),
            Action::Send(_)
        ));
        assert!(matches!(
            decide(Some(Known::Held(Some(Version(1)))), Some(&r)),
            Action::Hold(_)
        ));
        assert!(matches!(
            decide(Some(Known::Held(Some(Version(2)))), Some(&r)),
            Action::Send(_)
        ));
        assert!(matches!(
            decide(Some(Known::Held(None)), None),
            Action::Hold(None)
        ));
        assert!(matches!(
            decide(Some(Known::Held(Some(Version(1)))), None),
            Action::Remove
        ));
        assert!(matches!(decide(Some(Known::Stale), None), Action::Remove));
        assert!(matches!(decide(None, Some(&r)), Action::Send(_)));
    }
}
