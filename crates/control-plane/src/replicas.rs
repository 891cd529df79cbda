//! Replicas sharing one store. Each replica holds a [`Session`]: on etcd a lease, kept alive in
//! the background, under which the replica's presence keys live (its `/replicas/<name>` record,
//! and the `/autoreg-live/` and `/agents/` keys of the hosts connected through it), so a replica
//! that dies or is cut off loses them within the lease's TTL. One replica at a time is the
//! leader: it holds `/leader` under its lease and alone does the timed work ([`Sweeper`]). Each
//! of its writes carries the fence, "`/leader` is still the key I created", so a leader that
//! was paused or cut off past its lease, and has not noticed yet, writes nothing.
//!
//! On an embedded store (redb, memory) there is one replica: it is the leader from the start,
//! needs no fence, and its presence keys are plain keys that it clears when it starts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use isthmus_model::Kind;
use isthmus_store::{Compare, LeaseId, Revision, Store, StoreError, Txn, TxnOutcome};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::registry::{Registry, RegistryError};

/// `/replicas/<name>`: a replica's record, under its lease.
pub const REPLICAS_PREFIX: &str = "/replicas/";
/// `/leader`: the leader's name, under its lease.
pub const LEADER_KEY: &str = "/leader";
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// What a replica says of itself in `/replicas/<name>` (and `GET /api/v1/replicas`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRecord {
    pub name: String,
    pub version: String,
    /// Where hosts reach it (gRPC: discovery and CA).
    pub grpc_addr: String,
    pub admin_addr: String,
    pub started: String,
    /// Agent hosts with a discovery stream to it.
    pub connected_hosts: usize,
}

/// Leadership: the compare every leader write carries (`None` where no other replica can exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence(Option<Compare>);

impl Fence {
    /// `txn` that commits only while this replica still leads.
    pub fn guard(&self, txn: Txn) -> Txn {
        match &self.0 {
            Some(c) => txn.when(c.clone()),
            None => txn,
        }
    }

    pub fn compare(&self) -> Option<&Compare> {
        self.0.as_ref()
    }
}

struct State {
    lease: Option<LeaseId>,
    /// Presence keys with their values and the revision they were last written at.
    keys: BTreeMap<String, (Vec<u8>, Revision)>,
    record: ReplicaRecord,
}

pub struct Session {
    store: Arc<dyn Store>,
    name: String,
    ttl: Duration,
    /// Whether the store has leases (etcd); without, this is the only replica.
    leased: bool,
    state: Mutex<State>,
    leader: watch::Sender<Option<Fence>>,
    pub metrics: SessionMetrics,
}

#[derive(Clone, Default)]
pub struct SessionMetrics {
    pub leader: prometheus_client::metrics::gauge::Gauge,
    pub leadership_changes: prometheus_client::metrics::counter::Counter,
    pub leases_lost: prometheus_client::metrics::counter::Counter,
    pub fenced_writes: prometheus_client::metrics::counter::Counter,
    pub removed: prometheus_client::metrics::counter::Counter,
}

impl SessionMetrics {
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "leader",
            "1 while this replica is the leader (does the timed work)",
            self.leader.clone(),
        );
        reg.register(
            "leadership_changes",
            "Times this replica became or stopped being the leader",
            self.leadership_changes.clone(),
        );
        reg.register(
            "leases_lost",
            "Times this replica's lease expired before it could renew it (paused or cut off from the store)",
            self.leases_lost.clone(),
        );
        reg.register(
            "fenced_writes",
            "Leader writes refused because this replica no longer led when they reached the store",
            self.fenced_writes.clone(),
        );
        reg.register(
            "removed",
            "Auto-registered workloads and agent hosts this replica removed as leader after their grace period",
            self.removed.clone(),
        );
    }
}

impl Session {
    /// Starts the session: grants the lease, writes the record, campaigns, and keeps all that
    /// up in the background until `stop`.
    pub async fn start(
        store: Arc<dyn Store>,
        name: String,
        ttl: Duration,
        record: ReplicaRecord,
    ) -> Result<Arc<Self>, StoreError> {
        let lease = store.grant_lease(ttl).await?;
        let leased = lease.is_some();
        let (leader, _) = watch::channel(None);
        let session = Arc::new(Session {
            store,
            name,
            ttl,
            leased,
            state: Mutex::new(State {
                lease,
                keys: BTreeMap::new(),
                record,
            }),
            leader,
            metrics: SessionMetrics::default(),
        });
        if !leased {
            // Alone on its store: nobody reads a record, and the store's revisions stay the
            // registry's.
            session.set_leader(Some(Fence(None)));
        } else {
            session.write_record().await?;
            session.campaign().await;
        }
        tokio::spawn(session.clone().run());
        Ok(session)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether another replica may share the store.
    pub fn shared(&self) -> bool {
        self.leased
    }

    /// The fence while this replica leads.
    pub fn leadership(&self) -> watch::Receiver<Option<Fence>> {
        self.leader.subscribe()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.borrow().is_some()
    }

    /// Counts a leader write the fence refused, and steps down: it no longer leads.
    pub fn fenced(&self) {
        self.metrics.fenced_writes.inc();
        tracing::warn!(replica = %self.name, "a leader write was refused: another replica leads now");
        self.set_leader(None);
    }

    fn set_leader(&self, fence: Option<Fence>) {
        let changed = self.leader.send_if_modified(|cur| {
            if *cur == fence {
                return false;
            }
            *cur = fence.clone();
            true
        });
        if changed {
            self.metrics.leadership_changes.inc();
            self.metrics.leader.set(i64::from(fence.is_some()));
            if fence.is_some() {
                tracing::info!(replica = %self.name, "this replica leads: it runs the timed work");
            } else {
                tracing::info!(replica = %self.name, "this replica no longer leads");
            }
        }
    }

    /// Puts a presence key: it lives while this replica does (on etcd, under its lease).
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        if self.leased && state.lease.is_none() {
            // Between leases: written with the next one, never as a key that would outlive us.
            state.keys.insert(key.to_string(), (value, 0));
            return Ok(());
        }
        let txn = Txn::new().put(key, value.clone()).leased(state.lease);
        let revision = match self.store.txn(txn).await? {
            TxnOutcome::Committed { revision } => revision,
            TxnOutcome::Failed { .. } => 0,
        };
        state.keys.insert(key.to_string(), (value, revision));
        Ok(())
    }

    /// Deletes a presence key if `still` holds once no put of this session is in flight.
    pub async fn remove_if(&self, key: &str, still: impl FnOnce() -> bool) {
        let mut state = self.state.lock().await;
        if !still() {
            return;
        }
        state.keys.remove(key);
        if let Err(e) = self.store.delete(key).await {
            // On etcd the lease removes it when this replica goes; meanwhile it looks connected.
            tracing::warn!(key, error = %e, "cannot remove a presence key");
        }
    }

    /// This replica's record as it last wrote it.
    pub async fn record(&self) -> ReplicaRecord {
        self.state.lock().await.record.clone()
    }

    /// Changes the record and writes it (again within a tick if that fails).
    pub async fn update_record(&self, f: impl FnOnce(&mut ReplicaRecord)) {
        let changed = {
            let mut state = self.state.lock().await;
            let before = state.record.clone();
            f(&mut state.record);
            state.record != before
        };
        if changed && self.leased {
            let _ = self.write_record().await;
        }
    }

    async fn write_record(&self) -> Result<(), StoreError> {
        let record = {
            let state = self.state.lock().await;
            serde_json::to_vec(&state.record).unwrap_or_default()
        };
        self.put(&format!("{REPLICAS_PREFIX}{}", self.name), record)
            .await
    }

    /// Tries to become the leader, or checks that it still is.
    async fn campaign(&self) {
        let lease = self.state.lock().await.lease;
        let Some(lease) = lease else { return };
        let txn = Txn::new()
            .when(Compare::absent(LEADER_KEY))
            .put(LEADER_KEY, self.name.clone().into_bytes())
            .leased(Some(lease));
        match self.store.txn(txn).await {
            Ok(TxnOutcome::Committed { revision }) => {
                self.set_leader(Some(Fence(Some(Compare::mod_revision(
                    LEADER_KEY, revision,
                )))));
            }
            Ok(TxnOutcome::Failed { current, .. }) => {
                // Someone leads; if the fence this replica holds is no longer the key's, it
                // lost the leadership (its lease expired and another took over).
                let mine = self.leader.borrow().clone();
                if let (Some(Fence(Some(Compare::ModRevision { revision, .. }))), Some(kv)) =
                    (mine, current)
                {
                    if kv.mod_revision != revision {
                        self.set_leader(None);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot campaign for leadership"),
        }
    }

    /// Renews the lease; when it is gone (expired while paused or cut off), steps down, takes
    /// a new one and writes every presence key again under it.
    async fn renew(&self, last_renewal: &mut Instant) {
        let lease = self.state.lock().await.lease;
        let alive = match lease {
            Some(lease) => self.store.keep_alive(lease).await,
            None => Ok(false),
        };
        match alive {
            Ok(true) => *last_renewal = Instant::now(),
            Ok(false) => {
                if lease.is_some() {
                    self.metrics.leases_lost.inc();
                    tracing::warn!(replica = %self.name, "this replica's lease expired (it was paused or cut off from etcd): its hosts were taken for gone; writing them again");
                }
                self.set_leader(None);
                self.regrant().await;
                *last_renewal = Instant::now();
            }
            Err(e) => {
                // Not renewed: once the TTL has passed it may have expired, and another
                // replica may lead; stop leading until a renewal says otherwise.
                if last_renewal.elapsed() >= self.ttl {
                    self.set_leader(None);
                }
                tracing::debug!(error = %e, "cannot renew the lease");
            }
        }
    }

    async fn regrant(&self) {
        let lease = match self.store.grant_lease(self.ttl).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::debug!(error = %e, "cannot take a new lease");
                self.state.lock().await.lease = None;
                return;
            }
        };
        let mut state = self.state.lock().await;
        state.lease = lease;
        let keys: Vec<(String, Vec<u8>)> = state
            .keys
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        for (key, value) in keys {
            match self
                .store
                .txn(Txn::new().put(&key, value.clone()).leased(lease))
                .await
            {
                Ok(TxnOutcome::Committed { revision }) => {
                    state.keys.insert(key, (value, revision));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(key, error = %e, "cannot write a presence key again");
                    state.lease = None;
                    return;
                }
            }
        }
    }

    async fn run(self: Arc<Self>) {
        if !self.leased {
            return;
        }
        let mut last_renewal = Instant::now();
        let mut last_record = None;
        loop {
            let tick = if self.is_leader() {
                self.ttl / 3
            } else {
                (self.ttl / 3).min(Duration::from_secs(1))
            };
            tokio::time::sleep(tick).await;
            if Arc::strong_count(&self) == 1 {
                return;
            }
            if last_renewal.elapsed() >= self.ttl / 3 || self.state.lock().await.lease.is_none() {
                self.renew(&mut last_renewal).await;
            }
            self.campaign().await;
            let record = self.state.lock().await.record.clone();
            if last_record.as_ref() != Some(&record) && self.write_record().await.is_ok() {
                last_record = Some(record);
            }
        }
    }

    /// Ends the session: on etcd the lease is revoked, so its keys (and the leadership) go now
    /// rather than a TTL later.
    pub async fn stop(&self) {
        self.set_leader(None);
        let lease = self.state.lock().await.lease.take();
        if let Some(lease) = lease {
            if let Err(e) = self.store.revoke_lease(lease).await {
                tracing::debug!(error = %e, "cannot revoke the lease; it expires by itself");
            }
        }
    }
}

/// Every replica's record, and which one leads.
pub async fn list(store: &dyn Store) -> Result<(Vec<ReplicaRecord>, Option<String>), StoreError> {
    let (kvs, _) = store.range(REPLICAS_PREFIX).await?;
    let records = kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    let leader = store
        .get(LEADER_KEY)
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    Ok((records, leader))
}

/// The leader's timed work: an auto-registered entry with no live key (no replica has its
/// agent connected) is removed after `grace`, and so is an agent host with no `/agents/` key.
/// Whoever leads counts the grace from when it first saw the orphan, so a new leader gives
/// every orphan a full grace period.
pub struct Sweeper;

impl Sweeper {
    /// `view`: the informer's in-memory registry, where the auto-registered entries are found
    /// without reading every entry from the store on each look.
    pub fn spawn(
        session: Arc<Session>,
        registry: Registry,
        view: watch::Receiver<Arc<crate::informer::RegistryView>>,
        grace: Duration,
    ) {
        tokio::spawn(async move {
            let tick = (grace / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
            let mut leadership = session.leadership();
            let mut entries: Orphans<(String, String)> = Orphans::default();
            let mut hosts: Orphans<String> = Orphans::default();
            loop {
                let fence = leadership.borrow_and_update().clone();
                match fence {
                    Some(fence) => {
                        let snapshot = view.borrow().clone();
                        if let Err(e) = sweep_entries(
                            &session,
                            &registry,
                            &snapshot,
                            &fence,
                            grace,
                            &mut entries,
                        )
                        .await
                        {
                            tracing::debug!(error = %e, "cannot check auto-registered entries");
                        }
                        if let Err(e) =
                            sweep_hosts(&session, registry.store(), &fence, grace, &mut hosts).await
                        {
                            tracing::debug!(error = %e, "cannot check agent hosts");
                        }
                    }
                    None => {
                        entries.clear();
                        hosts.clear();
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(tick) => {}
                    changed = leadership.changed() => if changed.is_err() { return },
                }
            }
        });
    }
}

/// When the leader first saw each orphan (nothing connected for it). One look at a time:
/// `begin`, then `due` per orphan found, then `end`, which forgets the orphans not still
/// waiting (removed, reconnected or gone).
struct Orphans<K> {
    since: HashMap<K, Instant>,
    waiting: HashSet<K>,
}

impl<K> Default for Orphans<K> {
    fn default() -> Self {
        Self {
            since: HashMap::new(),
            waiting: HashSet::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Orphans<K> {
    fn begin(&mut self) {
        self.waiting.clear();
    }

    /// Whether `key` has been an orphan for `grace`; if not, it keeps waiting.
    fn due(&mut self, key: &K, now: Instant, grace: Duration) -> bool {
        let since = *self.since.entry(key.clone()).or_insert(now);
        if now < since + grace {
            self.waiting.insert(key.clone());
            return false;
        }
        true
    }

    fn end(&mut self) {
        let waiting = &self.waiting;
        self.since.retain(|k, _| waiting.contains(k));
    }

    fn clear(&mut self) {
        self.since.clear();
        self.waiting.clear();
    }
}

async fn sweep_entries(
    session: &Session,
    registry: &Registry,
    view: &crate::informer::RegistryView,
    fence: &Fence,
    grace: Duration,
    orphans: &mut Orphans<(String, String)>,
) -> Result<(), RegistryError> {
    let (live, _) = registry.store().range(crate::autoreg::LIVE_PREFIX).await?;
    let live: HashSet<(String, String)> = live
        .iter()
        .filter_map(|kv| {
            let rest = kv.key.strip_prefix(crate::autoreg::LIVE_PREFIX)?;
            let mut parts = rest.splitn(3, '/');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect();
    let now = Instant::now();
    orphans.begin();
    for entry in view.entries.values() {
        let meta = &entry.metadata;
        if !meta
            .annotations
            .contains_key(crate::autoreg::GROUP_ANNOTATION)
        {
            continue;
        }
        let key = (meta.namespace.clone(), meta.name.clone());
        if live.contains(&key) {
            continue;
        }
        if !orphans.due(&key, now, grace) {
            continue;
        }
        match registry
            .delete_unless_live(
                Kind::WorkloadEntry,
                &key.0,
                &key.1,
                &crate::autoreg::live_prefix(&key.0, &key.1),
                fence.compare(),
            )
            .await
        {
            Ok(crate::registry::Guarded::Deleted) => {
                session.metrics.removed.inc();
                tracing::info!(namespace = %key.0, entry = %key.1, grace = ?grace, "workload deregistered: its agent has not been connected to any replica for the grace period")
            }
            Ok(crate::registry::Guarded::Live) => {
                tracing::info!(namespace = %key.0, entry = %key.1, "workload kept: its agent reconnected")
            }
            Ok(crate::registry::Guarded::Fenced) => {
                session.fenced();
                return Ok(());
            }
            Err(RegistryError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    orphans.end();
    Ok(())
}

async fn sweep_hosts(
    session: &Session,
    store: &Arc<dyn Store>,
    fence: &Fence,
    grace: Duration,
    orphans: &mut Orphans<String>,
) -> Result<(), StoreError> {
    use crate::discovery::{AGENTS_PREFIX, MESH_HOST_PREFIX};
    let (agents, _) = store.range(AGENTS_PREFIX).await?;
    let live: HashSet<&str> = agents
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(AGENTS_PREFIX)?.split('/').next())
        .collect();
    let (hosts, _) = store.range(MESH_HOST_PREFIX).await?;
    let now = Instant::now();
    orphans.begin();
    for kv in &hosts {
        let Some(ip) = kv.key.strip_prefix(MESH_HOST_PREFIX) else {
            continue;
        };
        if live.contains(ip) {
            continue;
        }
        if !orphans.due(&ip.to_string(), now, grace) {
            continue;
        }
        let txn = fence.guard(
            Txn::new()
                .when(Compare::prefix_empty(format!("{AGENTS_PREFIX}{ip}/")))
                .delete(kv.key.clone()),
        );
        match store.txn(txn).await? {
            TxnOutcome::Committed { .. } => {
                session.metrics.removed.inc();
                tracing::info!(%ip, grace = ?grace, "no agent reconnected from this host: its workloads are plain TCP again");
            }
            TxnOutcome::Failed { index: 0, .. } => {}
            TxnOutcome::Failed { .. } => {
                session.fenced();
                return Ok(());
            }
        }
    }
    orphans.end();
    Ok(())
}
