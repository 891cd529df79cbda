//! Istio's WorkloadGroup flow: an agent that connects as a member of a group is registered as a
//! WorkloadEntry `<group>-<ip>` made from the group's template; its health reports mark the entry
//! HEALTHY or UNHEALTHY; when its last connection goes, the entry is removed after a grace
//! period unless it reconnects (through any replica). The removal is the leader's timed work
//! ([`crate::replicas::Sweeper`]); this module keeps the live keys that say which replica has
//! the agent connected. Entries are durable, so a control-plane restart neither loses nor
//! duplicates them: an entry whose agent does not come back is removed a grace period after
//! the leader first sees it without a live key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_model::{
    self as model, Health, Kind, ObjectMeta, Resource, WorkloadEntry, WorkloadEntrySpec,
};

use crate::registry::{now_rfc3339, Filter, Registry, RegistryError};
use crate::replicas::Session;

/// Annotation naming the group an entry was registered from.
pub const GROUP_ANNOTATION: &str = "isthmus.io/workload-group";
/// Annotation marking workloads that run the agent (they speak HBONE).
pub const AGENT_ANNOTATION: &str = "isthmus.io/agent";
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AutoRegError {
    #[error("WorkloadGroup {0} not found: create it first (isthmus apply -f group.yaml)")]
    NoGroup(String),
    #[error("identity {caller} may not join WorkloadGroup {group}: the group's workloads run as {expected}")]
    WrongIdentity {
        caller: String,
        group: String,
        expected: String,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Who is connecting: the authenticated identity and the address the agent reports.
#[derive(Clone, Debug)]
pub struct Member {
    pub namespace: String,
    pub service_account: String,
    pub group: String,
    pub ip: IpAddr,
}

#[derive(Default)]
struct Conn {
    /// Live connections of this entry's agent (a reconnect may overlap the old stream).
    live: usize,
    /// Bumped on every connect; a pending live-key removal only happens if it is unchanged.
    generation: u64,
}

/// Store keys `/autoreg-live/<ns>/<entry>/<replica>`: the entry's agent is connected through
/// that replica (a presence key: on etcd it goes with the replica's lease). The leader removes
/// an entry once none has been there for the grace period, in a transaction that holds only
/// while none is, so it never deregisters a connected workload.
pub const LIVE_PREFIX: &str = "/autoreg-live/";

#[derive(Clone)]
pub struct AutoRegistrar {
    registry: Registry,
    session: Arc<Session>,
    conns: Arc<Mutex<HashMap<(String, String), Conn>>>,
}

pub fn live_prefix(ns: &str, name: &str) -> String {
    format!("{LIVE_PREFIX}{ns}/{name}/")
}

pub fn entry_name(group: &str, ip: IpAddr) -> String {
    crate::registry::register_entry_name(group, ip)
}

impl AutoRegistrar {
    pub fn new(registry: Registry, session: Arc<Session>) -> Self {
        AutoRegistrar {
            registry,
            session,
            conns: Default::default(),
        }
    }

    fn live_key(&self, ns: &str, name: &str) -> String {
        format!("{}{}", live_prefix(ns, name), self.session.name())
    }

    /// Forgets the live keys a previous run left (this replica's own; on a store no other
    /// replica shares, every one) and counts the auto-registered entries, which the leader
    /// removes unless their agents reconnect within the grace period.
    pub async fn adopt_existing(&self) -> Result<usize, AutoRegError> {
        let store = self.registry.store();
        let (kvs, _) = store
            .range(LIVE_PREFIX)
            .await
            .map_err(RegistryError::from)?;
        let own = format!("/{}", self.session.name());
        let all = !self.session.shared();
        for kv in kvs.iter().filter(|kv| all || kv.key.ends_with(&own)) {
            store.delete(&kv.key).await.map_err(RegistryError::from)?;
        }
        let (entries, _) = self
            .registry
            .list(&Filter {
                kind: Some(Kind::WorkloadEntry),
                ..Default::default()
            })
            .await?;
        Ok(entries
            .iter()
            .filter(|r| r.meta().annotations.contains_key(GROUP_ANNOTATION))
            .count())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Conn>> {
        // A panic while holding this lock leaves plain counters behind; they stay usable.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers (or refreshes) the member's entry; returns its name. The caller calls
    /// `disconnected` with the same name when the stream ends.
    pub async fn connected(&self, m: &Member) -> Result<String, AutoRegError> {
        let group = match self
            .registry
            .get(Kind::WorkloadGroup, &m.namespace, &m.group)
            .await
        {
            Ok(Resource::WorkloadGroup(g)) => g,
            Ok(_) | Err(RegistryError::NotFound(_)) => {
                return Err(AutoRegError::NoGroup(format!(
                    "{}/{}",
                    m.namespace, m.group
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let t = &group.spec.template;
        let expected_sa = if t.service_account.is_empty() {
            model::DEFAULT_SERVICE_ACCOUNT
        } else {
            &t.service_account
        };
        if expected_sa != m.service_account {
            return Err(AutoRegError::WrongIdentity {
                caller: format!("ns/{}/sa/{}", m.namespace, m.service_account),
                group: format!("{}/{}", m.namespace, m.group),
                expected: format!("ns/{}/sa/{expected_sa}", m.namespace),
            });
        }
        let name = entry_name(&m.group, m.ip);
        {
            let mut conns = self.lock();
            let c = conns
                .entry((m.namespace.clone(), name.clone()))
                .or_default();
            c.live += 1;
            c.generation += 1;
        }
        let mut labels = group.spec.metadata.labels.clone();
        labels.extend(t.labels.clone());
        let mut annotations = group.spec.metadata.annotations.clone();
        annotations.insert(GROUP_ANNOTATION.into(), m.group.clone());
        annotations.insert(AGENT_ANNOTATION.into(), "true".into());
        let existing = match self
            .registry
            .get(Kind::WorkloadEntry, &m.namespace, &name)
            .await
        {
            Ok(Resource::WorkloadEntry(w)) => Some(w),
            _ => None,
        };
        let mut status = existing
            .as_ref()
            .map(|w| w.status.clone())
            .unwrap_or_else(|| model::WorkloadEntryStatus {
                // With a probe, an entry is unhealthy until its first report says otherwise.
                health: if group.spec.probe.is_some() {
                    Health::Unhealthy
                } else {
                    Health::Healthy
                },
                message: group
                    .spec
                    .probe
                    .is_some()
                    .then(|| "waiting for the first health report".into()),
                last_seen: None,
            });
        status.last_seen = Some(now_rfc3339());
        let entry = WorkloadEntry {
            api_version: model::API_VERSION.into(),
            kind: Kind::WorkloadEntry.as_str().into(),
            metadata: ObjectMeta {
                name: name.clone(),
                namespace: m.namespace.clone(),
                annotations,
                ..Default::default()
            },
            spec: WorkloadEntrySpec {
                address: m.ip.to_string(),
                ports: t.ports.clone(),
                labels,
                network: t.network.clone(),
                locality: t.locality.clone(),
                weight: t.weight,
                service_account: expected_sa.to_string(),
                services: Vec::new(),
            },
            status,
        };
        let entry = Resource::WorkloadEntry(entry);
        self.registry.apply(vec![entry]).await?;
        // Say where the leader's removal looks that the agent is connected here.
        let live = self.live_key(&m.namespace, &name);
        if let Err(e) = self
            .session
            .put(&live, self.session.name().as_bytes().to_vec())
            .await
        {
            tracing::warn!(entry = %name, error = %e, "cannot record the workload as connected here");
        }
        // `apply` keeps the stored status when the new one is default; write health/last-seen
        // explicitly so a reconnect refreshes it.
        self.set_status(&m.namespace, &name, |s| s.last_seen = Some(now_rfc3339()))
            .await?;
        tracing::info!(namespace = %m.namespace, entry = %name, group = %m.group, ip = %m.ip, "workload registered");
        Ok(name)
    }

    /// The member's stream ended: unless another stream of it is open here, the agent no longer
    /// counts as connected through this replica, and the leader removes its entry after the
    /// grace period unless it reconnects (here or elsewhere).
    pub fn disconnected(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let generation = {
            let mut conns = self.lock();
            let Some(c) = conns.get_mut(&key) else { return };
            c.live = c.live.saturating_sub(1);
            if c.live > 0 {
                return;
            }
            c.generation
        };
        let this = self.clone();
        tokio::spawn(async move {
            let live = this.live_key(&key.0, &key.1);
            this.session
                .remove_if(&live, || {
                    let mut conns = this.lock();
                    match conns.get(&key) {
                        Some(c) if c.live == 0 && c.generation == generation => {
                            conns.remove(&key);
                            true
                        }
                        _ => false,
                    }
                })
                .await;
        });
    }

    /// A health report from the member's agent (its probe of the local app).
    pub async fn health(
        &self,
        namespace: &str,
        name: &str,
        healthy: bool,
        message: Option<String>,
    ) -> Result<(), AutoRegError> {
        self.set_status(namespace, name, |s| {
            s.health = if healthy {
                Health::Healthy
            } else {
                Health::Unhealthy
            };
            s.message = if healthy { None } else { message.clone() };
            s.last_seen = Some(now_rfc3339());
        })
        .await
    }

    async fn set_status(
        &self,
        namespace: &str,
        name: &str,
        f: impl Fn(&mut model::WorkloadEntryStatus),
    ) -> Result<(), AutoRegError> {
        self.registry
            .update_status(namespace, name, |w| f(&mut w.status))
            .await
            .map(|_| ())
            .map_err(Into::into)
    }
}
