//! A live in-memory view of the registry, fed by a store watch, for the components that must
//! answer from memory (DNS, discovery). Readers get an `Arc` snapshot from a `watch` channel:
//! lock-free, swapped atomically, never cleared.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use isthmus_model::{
    AuthorizationPolicy, DestinationRule, GrpcRoute, HttpRoute, PeerAuthentication, Resource,
    Service, VirtualService, WorkloadEntry, WorkloadGroup,
};
use isthmus_store::{EventKind, Revision, StoreError};
use tokio::sync::watch;

use crate::registry::{decode, Registry};

/// Everything in the registry at one revision. Keys are `(namespace, name)`. Objects are
/// shared between snapshots (`Arc`): publishing a snapshot copies the maps, not the objects.
#[derive(Clone, Debug, Default)]
pub struct RegistryView {
    pub revision: Revision,
    pub services: BTreeMap<(String, String), Arc<Service>>,
    pub entries: BTreeMap<(String, String), Arc<WorkloadEntry>>,
    pub groups: BTreeMap<(String, String), Arc<WorkloadGroup>>,
    pub policies: BTreeMap<(String, String), Arc<AuthorizationPolicy>>,
    pub peer_authentications: BTreeMap<(String, String), Arc<PeerAuthentication>>,
    pub virtual_services: BTreeMap<(String, String), Arc<VirtualService>>,
    pub destination_rules: BTreeMap<(String, String), Arc<DestinationRule>>,
    pub http_routes: BTreeMap<(String, String), Arc<HttpRoute>>,
    pub grpc_routes: BTreeMap<(String, String), Arc<GrpcRoute>>,
}

impl RegistryView {
    fn upsert(&mut self, r: Resource) {
        let m = r.meta();
        let key = (m.namespace.clone(), m.name.clone());
        match r {
            Resource::Service(s) => {
                self.services.insert(key, Arc::new(s));
            }
            Resource::WorkloadEntry(w) => {
                self.entries.insert(key, Arc::new(w));
            }
            Resource::WorkloadGroup(g) => {
                self.groups.insert(key, Arc::new(g));
            }
            Resource::AuthorizationPolicy(p) => {
                self.policies.insert(key, Arc::new(p));
            }
            Resource::PeerAuthentication(p) => {
                self.peer_authentications.insert(key, Arc::new(p));
            }
            Resource::VirtualService(v) => {
                self.virtual_services.insert(key, Arc::new(v));
            }
            Resource::DestinationRule(d) => {
                self.destination_rules.insert(key, Arc::new(d));
            }
            Resource::HttpRoute(r) => {
                self.http_routes.insert(key, Arc::new(r));
            }
            Resource::GrpcRoute(r) => {
                self.grpc_routes.insert(key, Arc::new(r));
            }
        }
    }

    fn remove(&mut self, r: &Resource) {
        let m = r.meta();
        let key = (m.namespace.clone(), m.name.clone());
        match r {
            Resource::Service(_) => {
                self.services.remove(&key);
            }
            Resource::WorkloadEntry(_) => {
                self.entries.remove(&key);
            }
            Resource::WorkloadGroup(_) => {
                self.groups.remove(&key);
            }
            Resource::AuthorizationPolicy(_) => {
                self.policies.remove(&key);
            }
            Resource::PeerAuthentication(_) => {
                self.peer_authentications.remove(&key);
            }
            Resource::VirtualService(_) => {
                self.virtual_services.remove(&key);
            }
            Resource::DestinationRule(_) => {
                self.destination_rules.remove(&key);
            }
            Resource::HttpRoute(_) => {
                self.http_routes.remove(&key);
            }
            Resource::GrpcRoute(_) => {
                self.grpc_routes.remove(&key);
            }
        }
    }
}

/// How long the informer waits for more events after one, and at most after the first of a
/// burst, before it publishes a snapshot (istiod: PILOT_DEBOUNCE_AFTER 100 ms, MAX 10 s); and
/// the least time between two snapshots, so a steady trickle of writes costs at most four
/// rebuilds a second.
pub const DEBOUNCE_QUIET: Duration = Duration::from_millis(10);
pub const DEBOUNCE_MAX: Duration = Duration::from_secs(1);
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// Starts the informer task; the returned receiver holds the first full view once it resolves.
pub async fn start(registry: Registry) -> Result<watch::Receiver<Arc<RegistryView>>, StoreError> {
    let first = load(&registry).await?;
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(run(registry, tx));
    Ok(rx)
}

async fn load(registry: &Registry) -> Result<RegistryView, StoreError> {
    let (kvs, revision) = registry.store().range("/registry/").await?;
    let mut view = RegistryView {
        revision,
        ..Default::default()
    };
    for kv in &kvs {
        match decode(kv) {
            Ok(Some(r)) => view.upsert(r),
            Ok(None) => {}
            Err(e) => tracing::warn!(key = %kv.key, error = %e, "skipping an undecodable object"),
        }
    }
    Ok(view)
}

async fn run(registry: Registry, tx: watch::Sender<Arc<RegistryView>>) {
    let mut backoff = Duration::from_millis(100);
    let now = tokio::time::Instant::now();
    let mut last_publish = now.checked_sub(MIN_INTERVAL).unwrap_or(now);
    loop {
        let mut view = (**tx.borrow()).clone();
        let mut events = match registry
            .store()
            .watch("/registry/", view.revision + 1)
            .await
        {
            Ok(s) => s,
            Err(StoreError::Compacted { .. }) | Err(StoreError::FutureRevision { .. }) => {
                // Our revision fell out of the history (or the store was replaced): relist.
                match load(&registry).await {
                    Ok(v) => {
                        let _ = tx.send(Arc::new(v));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "informer relist failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            Err(StoreError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "informer watch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        while let Some(first) = events.next().await {
            // Debounce, as istiod does: collect events until the stream is quiet for
            // DEBOUNCE_QUIET or DEBOUNCE_MAX has passed since the first, then publish one
            // snapshot. Every publication copies the view and rebuilds DNS and discovery from
            // it, so a write burst must not cost one of each per write.
            let mut batch = vec![first];
            let until = tokio::time::Instant::now() + DEBOUNCE_MAX;
            // And never two snapshots closer than MIN_INTERVAL: each costs a full rebuild.
            let earliest = last_publish + MIN_INTERVAL;
            loop {
                while let Some(Some(more)) = events.next().now_or_never() {
                    batch.push(more);
                }
                let quiet = (tokio::time::Instant::now() + DEBOUNCE_QUIET)
                    .max(earliest)
                    .min(until);
                match tokio::time::timeout_at(quiet, events.next()).await {
                    Ok(Some(more)) => batch.push(more),
                    Ok(None) | Err(_) => break,
                }
                if tokio::time::Instant::now() >= until {
                    break;
                }
            }
            let mut failed = false;
            for ev in batch {
                match ev {
                    Ok(ev) => {
                        view.revision = ev.revision();
                        match ev.kind {
                            EventKind::Put => {
                                if let Ok(Some(r)) = decode(&ev.kv) {
                                    view.upsert(r);
                                }
                            }
                            EventKind::Delete => {
                                if let Some(Ok(Some(r))) = ev.prev.as_ref().map(decode) {
                                    view.remove(&r);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "informer watch broke; resuming");
                        failed = true;
                        break;
                    }
                }
            }
            last_publish = tokio::time::Instant::now();
            if tx.send(Arc::new(view.clone())).is_err() {
                return; // nobody listens any more
            }
            if failed {
                break;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_store::{MemStore, Store};

    #[tokio::test]
    async fn follows_writes_and_deletes() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let reg = Registry::new(
            store,
            "10.96.0.0/12".parse().unwrap(),
            "cluster.local".into(),
        );
        reg.register(crate::registry::RegisterRequest {
            service: "a".into(),
            ip: "10.0.0.1".into(),
            ports: vec!["80".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut rx = start(reg.clone()).await.unwrap();
        assert_eq!(rx.borrow().services.len(), 1);
        reg.register(crate::registry::RegisterRequest {
            service: "b".into(),
            ip: "10.0.0.2".into(),
            ports: vec!["80".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|v| v.services.len() == 2 && v.entries.len() == 2),
        )
        .await
        .unwrap()
        .unwrap();
        reg.delete(isthmus_model::Kind::Service, "default", "a")
            .await
            .unwrap();
        let v = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|v| v.services.len() == 1),
        )
        .await
        .unwrap()
        .unwrap()
        .clone();
        assert!(v
            .services
            .contains_key(&("default".to_string(), "b".to_string())));
        assert_eq!(v.revision, reg.store().revision());
    }
}
