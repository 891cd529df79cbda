//! Discovery on the gRPC port: the registry, mapped to Istio's workload resources, served by
//! `isthmus-xds`; callers authenticated like the CA's (join token or workload certificate);
//! agents that name a WorkloadGroup are auto-registered and report their health on the stream.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_ca::Authenticator;
use isthmus_model::{Kind, Resource, WorkloadEntry};
use isthmus_store::{Store, StoreError};
use isthmus_xds::server::{
    node_metadata, Authenticate, HostAddress, Identity, Node, StreamObserver,
};
use isthmus_xds::{build_resources_with_policies, MappingOptions, ResourceSet, AGENT_ANNOTATION};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::autoreg::{AutoRegistrar, Member};
use crate::identity::StoreLedger;
use crate::informer::RegistryView;

/// Node metadata naming the WorkloadGroup to join (Istio's `ISTIO_META_AUTO_REGISTER_GROUP`).
pub const AUTO_REGISTER_GROUP: &str = "AUTO_REGISTER_GROUP";

/// IPs where a mesh agent is connected to this server's discovery stream, or was within the
/// grace period: their workloads can be reached over HBONE, whether they joined by a group or
/// were `register`ed by hand.
pub type MeshHosts = Arc<BTreeSet<IpAddr>>;

/// Store keys `/mesh-hosts/<ip>`: the agent hosts, kept across restarts of the control plane.
pub const MESH_HOST_PREFIX: &str = "/mesh-hosts/";

/// Keeps a `ResourceSet` built from the live registry view and the connected agents; rebuilt
/// off the async workers (it is proportional to the registry) and at most one build behind.
pub fn resources(
    mut view: watch::Receiver<Arc<RegistryView>>,
    mut hosts: watch::Receiver<MeshHosts>,
    opts: MappingOptions,
) -> watch::Receiver<Arc<ResourceSet>> {
    let build = |v: &RegistryView, hosts: &BTreeSet<IpAddr>, opts: &MappingOptions| {
        let services: Vec<_> = v.services.values().map(|s| (**s).clone()).collect();
        let entries: Vec<_> = v.entries.values().map(|e| with_agent(e, hosts)).collect();
        let policies: Vec<_> = v.policies.values().map(|p| (**p).clone()).collect();
        let peer_auths: Vec<_> = v
            .peer_authentications
            .values()
            .map(|p| (**p).clone())
            .collect();
        let mut set =
            build_resources_with_policies(&services, &entries, &policies, &peer_auths, opts);
        let vss: Vec<_> = v.virtual_services.values().map(|x| (**x).clone()).collect();
        let drs: Vec<_> = v
            .destination_rules
            .values()
            .map(|x| (**x).clone())
            .collect();
        let http: Vec<_> = v.http_routes.values().map(|x| (**x).clone()).collect();
        let grpc: Vec<_> = v.grpc_routes.values().map(|x| (**x).clone()).collect();
        isthmus_xds::traffic::insert_traffic(
            &mut set,
            &services,
            &entries,
            &vss,
            &drs,
            isthmus_xds::traffic::GatewayRoutes {
                http: &http,
                grpc: &grpc,
            },
            opts,
        );
        isthmus_xds::traffic::insert_http_policies(&mut set, &policies);
        Arc::new(set)
    };
    let first = build(&view.borrow_and_update(), &hosts.borrow_and_update(), &opts);
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = view.changed() => if r.is_err() { return },
                r = hosts.changed() => if r.is_err() { return },
            }
            let v = view.borrow_and_update().clone();
            let h = hosts.borrow_and_update().clone();
            let opts = opts.clone();
            match tokio::task::spawn_blocking(move || build(&v, &h, &opts)).await {
                Ok(set) => {
                    if tx.send(set).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!(error = %e, "building discovery resources failed"),
            }
        }
    });
    rx
}

/// An entry at a connected agent's IP is marked as served by an agent (HBONE), as
/// auto-registered ones are.
fn with_agent(e: &WorkloadEntry, hosts: &BTreeSet<IpAddr>) -> WorkloadEntry {
    let marked = e.metadata.annotations.contains_key(AGENT_ANNOTATION);
    match e.ip() {
        Some(ip) if !marked && hosts.contains(&ip) => {
            let mut e = e.clone();
            e.metadata
                .annotations
                .insert(AGENT_ANNOTATION.to_string(), "true".to_string());
            e
        }
        _ => e.clone(),
    }
}

/// The agent hosts recorded by an earlier run (see [`follow_mesh_hosts`]).
pub async fn persisted_mesh_hosts(store: &dyn Store) -> Result<BTreeSet<IpAddr>, StoreError> {
    let (kvs, _) = store.range(MESH_HOST_PREFIX).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(MESH_HOST_PREFIX)?.parse().ok())
        .collect())
}

/// Store keys `/agents/<ip>/<replica>`: an agent is connected from the IP through that replica
/// (a presence key: on etcd it goes with the replica's lease). The leader removes
/// `/mesh-hosts/<ip>` once none has been there for the grace period.
pub const AGENTS_PREFIX: &str = "/agents/";

/// Follows the discovery server's open streams into the set of agent hosts: the verified
/// addresses of the streams (a node id's address only when the connection comes from it, the
/// client certificate names it, or a WorkloadEntry of the identity was registered there).
///
/// The set is kept in the store (`/mesh-hosts/<ip>`): without that, every entry at an agent
/// host would be served as plain TCP from the moment the control plane restarts until that
/// host's agent reconnects (after its backoff), and STRICT hosts would refuse the mesh
/// meanwhile. A host stays in it until the leader finds no replica has had its agent for the
/// grace period ([`crate::replicas::Sweeper`]). The set served is the store's, which every
/// replica sharing the store follows, joined with this replica's own streams; `persisted` is
/// the store's set at start.
pub fn follow_mesh_hosts(
    xds: isthmus_xds::server::XdsServer,
    tx: watch::Sender<MeshHosts>,
    session: Arc<crate::replicas::Session>,
    store: Arc<dyn Store>,
    persisted: BTreeSet<IpAddr>,
) {
    let mut changes = xds.stream_changes();
    let (shared_tx, mut shared) = watch::channel(persisted);
    tokio::spawn(watch_mesh_hosts(store.clone(), shared_tx));
    tokio::spawn(async move {
        clear_agent_keys(store.as_ref(), session.name(), !session.shared()).await;
        let mut known: BTreeSet<IpAddr> = BTreeSet::new();
        loop {
            let connected: BTreeSet<IpAddr> = xds
                .streams()
                .iter()
                .filter_map(|s| s.address.ip())
                .collect();
            for ip in connected.difference(&known) {
                if let Err(e) = store
                    .put(&format!("{MESH_HOST_PREFIX}{ip}"), b"agent".to_vec())
                    .await
                {
                    // Still served from memory; only a restart would forget it early.
                    tracing::warn!(%ip, error = %e, "cannot record the agent host");
                }
                if let Err(e) = session
                    .put(
                        &format!("{AGENTS_PREFIX}{ip}/{}", session.name()),
                        session.name().as_bytes().to_vec(),
                    )
                    .await
                {
                    tracing::warn!(%ip, error = %e, "cannot record the agent host as connected here");
                }
            }
            for ip in known.difference(&connected) {
                let xds = xds.clone();
                let ip = *ip;
                session
                    .remove_if(
                        &format!("{AGENTS_PREFIX}{ip}/{}", session.name()),
                        move || !xds.streams().iter().any(|s| s.address.ip() == Some(ip)),
                    )
                    .await;
            }
            let n = connected.len();
            session.update_record(|r| r.connected_hosts = n).await;
            known = connected.clone();
            let mut ips = connected;
            ips.extend(shared.borrow_and_update().iter().copied());
            tx.send_if_modified(|cur| {
                if **cur == ips {
                    return false;
                }
                *cur = Arc::new(ips);
                true
            });
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                changed = shared.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Drops the `/agents/` keys a past run of this replica left (all of them when `alone`).
async fn clear_agent_keys(store: &dyn Store, replica: &str, alone: bool) {
    let Ok((kvs, _)) = store.range(AGENTS_PREFIX).await else {
        return;
    };
    let own = format!("/{replica}");
    for kv in kvs.iter().filter(|kv| alone || kv.key.ends_with(&own)) {
        let _ = store.delete(&kv.key).await;
    }
}

/// Keeps `tx` equal to the store's `/mesh-hosts/` set: what every replica has recorded.
async fn watch_mesh_hosts(store: Arc<dyn Store>, tx: watch::Sender<BTreeSet<IpAddr>>) {
    loop {
        let listed = store.range(MESH_HOST_PREFIX).await;
        if let Ok((kvs, revision)) = listed {
            let mut set: BTreeSet<IpAddr> = kvs
                .iter()
                .filter_map(|kv| kv.key.strip_prefix(MESH_HOST_PREFIX)?.parse().ok())
                .collect();
            tx.send_replace(set.clone());
            if let Ok(mut events) = store.watch(MESH_HOST_PREFIX, revision + 1).await {
                use futures::StreamExt;
                while let Some(Ok(event)) = events.next().await {
                    let Some(ip) = event
                        .kv
                        .key
                        .strip_prefix(MESH_HOST_PREFIX)
                        .and_then(|k| k.parse::<IpAddr>().ok())
                    else {
                        continue;
                    };
                    match event.kind {
                        isthmus_store::EventKind::Put => set.insert(ip),
                        isthmus_store::EventKind::Delete => set.remove(&ip),
                    };
                    tx.send_replace(set.clone());
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        // The store closed the watch (compaction, or a failure): list again.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A join token (verified, not revoked; a discovery stream does not spend a use) or a client
/// certificate issued by the mesh CA.
pub struct XdsAuth {
    pub auth: Authenticator,
    pub ledger: Arc<StoreLedger>,
}

#[tonic::async_trait]
impl Authenticate for XdsAuth {
    async fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Identity, Status> {
        let caller = self
            .auth
            .authenticate(metadata, peer_certs)
            .map_err(Status::from)?;
        // A join token must be known and not revoked (no use is spent); a workload token's
        // enrolment likewise.
        self.auth
            .check_standing(&caller)
            .await
            .map_err(Status::from)?;
        Identity::from_spiffe_id(&caller.identity.to_string()).ok_or_else(|| {
            Status::unauthenticated(format!("{} is not a workload identity", caller.identity))
        })
    }

    /// An administrator enrolled the address for this identity: a WorkloadEntry in its
    /// namespace, at `ip`, running as its service account, and not one an agent registered
    /// itself (that would let a claim vouch for itself).
    async fn vouches_for(&self, identity: &Identity, ip: IpAddr) -> bool {
        let prefix = format!(
            "{}{}/",
            Kind::WorkloadEntry.key_prefix(),
            identity.namespace
        );
        let kvs = match self.ledger.store().range(&prefix).await {
            Ok((kvs, _)) => kvs,
            Err(e) => {
                tracing::warn!(error = %e, %ip, "cannot read WorkloadEntries to check an address claim; not vouching");
                return false;
            }
        };
        kvs.iter().any(|kv| {
            matches!(crate::registry::decode(kv), Ok(Some(Resource::WorkloadEntry(e)))
                if enrolled_at(&e, identity, ip))
        })
    }
}

/// Whether `e` is an administrator's enrolment of `identity` at `ip`.
fn enrolled_at(e: &WorkloadEntry, identity: &Identity, ip: IpAddr) -> bool {
    let sa = if e.spec.service_account.is_empty() {
        "default"
    } else {
        e.spec.service_account.as_str()
    };
    e.metadata.namespace == identity.namespace
        && sa == identity.service_account
        && e.ip() == Some(ip)
        && !e
            .metadata
            .annotations
            .contains_key(crate::autoreg::GROUP_ANNOTATION)
}

/// Auto-registration and health through the discovery stream.
pub struct Observer {
    pub autoreg: AutoRegistrar,
}

#[tonic::async_trait]
impl StreamObserver for Observer {
    async fn connected(
        &self,
        identity: &Identity,
        node: &Node,
        address: &HostAddress,
    ) -> Result<Option<String>, Status> {
        let Some(group) = node_metadata(node, AUTO_REGISTER_GROUP) else {
            return Ok(None);
        };
        // Only an address something vouches for may be registered: a claim alone would let any
        // identity put its workloads at another host's address.
        let ip = match address {
            HostAddress::Verified { ip, .. } => *ip,
            HostAddress::Unverified { .. } => {
                let problem = address.problem(identity).unwrap_or_default();
                return Err(Status::permission_denied(format!(
                    "auto-registration in WorkloadGroup {}/{} refused: {problem}",
                    identity.namespace,
                    isthmus_xds::node::truncate(group, 128)
                )));
            }
            HostAddress::Unknown => {
                return Err(Status::invalid_argument(format!(
                    "node id {:?} carries no IP and the connection's address is unknown; auto-registration needs the host's IP (use {})",
                    isthmus_xds::node::truncate(&node.id, 128),
                    isthmus_xds::NODE_ID_FORM
                )))
            }
        };
        let member = Member {
            namespace: identity.namespace.clone(),
            service_account: identity.service_account.clone(),
            group: group.to_string(),
            ip,
        };
        match self.autoreg.connected(&member).await {
            Ok(name) => Ok(Some(format!("{}/{name}", member.namespace))),
            Err(e @ crate::autoreg::AutoRegError::Registry(_)) => {
                Err(Status::unavailable(e.to_string()))
            }
            Err(e) => Err(Status::permission_denied(e.to_string())),
        }
    }

    async fn health(&self, handle: &str, healthy: bool, message: Option<String>) {
        if let Some((ns, name)) = handle.split_once('/') {
            if let Err(e) = self.autoreg.health(ns, name, healthy, message).await {
                tracing::warn!(entry = %handle, error = %e, "could not record a health report");
            }
        }
    }

    fn disconnected(&self, handle: &str) {
        if let Some((ns, name)) = handle.split_once('/') {
            self.autoreg.disconnected(ns, name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_model::{ObjectMeta, WorkloadEntrySpec};

    fn entry(ns: &str, sa: &str, ip: &str, auto: bool) -> WorkloadEntry {
        let mut annotations = std::collections::BTreeMap::new();
        if auto {
            annotations.insert(
                crate::autoreg::GROUP_ANNOTATION.to_string(),
                "g".to_string(),
            );
        }
        WorkloadEntry {
            api_version: isthmus_model::API_VERSION.into(),
            kind: Kind::WorkloadEntry.as_str().into(),
            metadata: ObjectMeta {
                name: "e".into(),
                namespace: ns.into(),
                annotations,
                ..Default::default()
            },
            spec: WorkloadEntrySpec {
                address: ip.into(),
                service_account: sa.into(),
                ..Default::default()
            },
            status: Default::default(),
        }
    }

    #[test]
    fn only_an_administrators_entry_of_the_identity_enrols_an_address() {
        let id = Identity::new("cluster.local", "adv", "a");
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(enrolled_at(&entry("adv", "a", "10.0.0.5", false), &id, ip));
        // Another namespace's VM, another account, another address: no.
        assert!(!enrolled_at(
            &entry("onprem", "a", "10.0.0.5", false),
            &id,
            ip
        ));
        assert!(!enrolled_at(&entry("adv", "b", "10.0.0.5", false), &id, ip));
        assert!(!enrolled_at(&entry("adv", "a", "10.0.0.6", false), &id, ip));
        // An agent's own registration does not vouch for the claim that made it.
        assert!(!enrolled_at(&entry("adv", "a", "10.0.0.5", true), &id, ip));
        // An entry without an account runs as `default`.
        let default = Identity::new("cluster.local", "adv", "default");
        assert!(enrolled_at(
            &entry("adv", "", "10.0.0.5", false),
            &default,
            ip
        ));
    }
}
