//! Typed registry operations on top of the store: apply (all-or-nothing), delete, register,
//! deregister, list and watch. Every write is one store transaction guarded by compare-and-swap on
//! the revisions it read, so concurrent writers never lose each other's changes.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use ipnet::IpNet;
use isthmus_model::{
    self as model, Kind, LabelSelector, ObjectMeta, Resource, Service, ServicePort, ServiceSpec,
    WorkloadEntry, WorkloadEntrySpec,
};
use isthmus_store::{
    Compare, EventKind, KeyValue, Op, Revision, Store, StoreError, Txn, TxnOutcome,
};
use serde::{Deserialize, Serialize};

/// Store keys of VIP allocations: `/registry/vips/<ip>` → the owning service's key.
const VIP_PREFIX: &str = "/registry/vips/";
/// Optimistic transactions are retried this many times when another writer got in between.
const MAX_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Invalid(#[from] model::ValidationError),
    #[error("{0}")]
    BadRequest(String),
    #[error("no free virtual IP left in the service CIDR {0}; widen it with --service-cidr")]
    VipExhausted(IpNet),
    #[error("stored object {key} cannot be decoded: {message}")]
    Corrupt { key: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{max} watch streams are open, the most this server serves at once \
         (`isthmus server --max-watchers`); close idle watches (isthmus get -w), or retry later"
    )]
    TooManyWatchers { max: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Updated,
    Unchanged,
    Deleted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub action: Action,
}

/// `register SERVICE IP [name:]port...`, as istioctl had it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterRequest {
    pub service: String,
    #[serde(default)]
    pub namespace: String,
    pub ip: String,
    /// `port` or `name:port`; unnamed ports get istioctl's guessed names.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub service: Action,
    pub workload_entry: Action,
    pub workload_entry_name: String,
    pub hostname: String,
    pub vip: Option<IpAddr>,
    pub revision: Revision,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeregisterRequest {
    pub service: String,
    #[serde(default)]
    pub namespace: String,
    pub ip: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeregisterResponse {
    pub removed_entries: Vec<String>,
    pub service_deleted: bool,
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WatchEventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: WatchEventType,
    pub revision: Revision,
    pub object: Resource,
}

/// What a list or watch selects.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub kind: Option<Kind>,
    pub namespace: Option<String>,
    pub selector: LabelSelector,
}

impl Filter {
    fn prefix(&self) -> String {
        match (self.kind, &self.namespace) {
            (Some(k), Some(ns)) => format!("{}{ns}/", k.key_prefix()),
            (Some(k), None) => k.key_prefix(),
            (None, _) => "/registry/".to_string(),
        }
    }

    fn matches(&self, r: &Resource) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == r.meta().namespace)
            && self.kind.is_none_or(|k| k == r.kind())
            && self.selector.matches(&r.effective_labels())
    }
}

/// What a guarded delete did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarded {
    Deleted,
    /// A live key kept the resource.
    Live,
    /// The fence did not hold: the caller no longer leads.
    Fenced,
}

#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    cidr: IpNet,
    domain: String,
    /// One permit per open watch stream, held by the stream.
    watchers: Arc<tokio::sync::Semaphore>,
    max_watchers: usize,
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The kind a store key belongs to, or None for bookkeeping keys (VIP allocations).
fn kind_of_key(key: &str) -> Option<Kind> {
    let rest = key.strip_prefix("/registry/")?;
    let plural = rest.split('/').next()?;
    Kind::ALL.into_iter().find(|k| k.plural() == plural)
}

/// Decodes a stored object without re-validating it, so tightened validation never makes
/// existing data unreadable. `resourceVersion` is the key's mod revision, as in Kubernetes.
pub fn decode(kv: &KeyValue) -> Result<Option<Resource>, RegistryError> {
    let Some(kind) = kind_of_key(&kv.key) else {
        return Ok(None);
    };
    let corrupt = |e: serde_json::Error| RegistryError::Corrupt {
        key: kv.key.clone(),
        message: e.to_string(),
    };
    let mut r: Resource = serde_json::from_slice(&kv.value).map_err(corrupt)?;
    if r.kind() != kind {
        return Err(RegistryError::Corrupt {
            key: kv.key.clone(),
            message: format!("holds a {} under the {} prefix", r.kind(), kind.plural()),
        });
    }
    r.meta_mut().resource_version = Some(kv.mod_revision.to_string());
    Ok(Some(r))
}

fn encode(r: &Resource) -> Vec<u8> {
    let mut r = r.clone();
    r.meta_mut().resource_version = None;
    r.to_json()
}

/// Adds "write `r` at `key`, if nobody changed the key since `current` was read" to `txn`.
fn put_if_unchanged(txn: &mut Txn, key: &str, current: Option<&KeyValue>, r: &Resource) {
    txn.compares.push(Compare::ModRevision {
        key: key.to_string(),
        revision: current.map_or(0, |kv| kv.mod_revision),
    });
    txn.ops.push(Op::Put {
        key: key.to_string(),
        value: encode(r),
    });
}

/// Adds the allocation of `vip` to the service at `svc_key`; fails the txn if it was taken.
fn claim_vip(txn: &mut Txn, vip: IpAddr, svc_key: &str) {
    txn.compares.push(Compare::ModRevision {
        key: vip_key(vip),
        revision: 0,
    });
    txn.ops.push(Op::Put {
        key: vip_key(vip),
        value: svc_key.as_bytes().to_vec(),
    });
}

/// Where a service's VIP search starts: a hash of its key, so a service deleted and created
/// again tends to get its old address back.
fn vip_start(key: &str, usable: u128) -> u128 {
    let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    u128::from(hash) % usable
}

fn vip_key(ip: IpAddr) -> String {
    format!("{VIP_PREFIX}{ip}")
}

fn protocol_for_port_name(name: &str) -> Option<String> {
    let prefix = name.split('-').next().unwrap_or(name).to_ascii_uppercase();
    match prefix.as_str() {
        "HTTP" | "HTTP2" | "GRPC" | "HTTPS" | "TLS" | "MYSQL" | "MONGO" | "REDIS" => Some(prefix),
        _ => None,
    }
}

/// `name:port` or `port` → (name, port), with istioctl's guessed names.
pub fn parse_port_arg(arg: &str) -> Result<(String, u32), RegistryError> {
    let (name, num) = match arg.rsplit_once(':') {
        Some((n, p)) => (Some(n), p),
        None => (None, arg),
    };
    let port: u32 = num
        .parse()
        .ok()
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| {
            RegistryError::BadRequest(format!(
                "port {arg:?} is not a port number from 1 to 65535 (write PORT or NAME:PORT, e.g. 3306 or mysql:3306)"
            ))
        })?;
    let name = name.map_or_else(|| model::guess_port_name(port), str::to_string);
    if let Some(p) = model::validate::dns_label_problem(&name) {
        return Err(RegistryError::BadRequest(format!("port name {name:?} {p}")));
    }
    Ok((name, port))
}

/// The name of the workload entry for a host at IP: `<prefix>-<ip with '-' for '.'/':'>`, as
/// `register` (prefix: the service) and auto-registration (prefix: the group) name them.
pub fn register_entry_name(prefix: &str, ip: IpAddr) -> String {
    format!("{prefix}-{}", ip.to_string().replace(['.', ':'], "-"))
}

impl Registry {
    pub fn new(store: Arc<dyn Store>, cidr: IpNet, domain: String) -> Self {
        Registry {
            store,
            cidr,
            domain,
            watchers: Arc::new(tokio::sync::Semaphore::new(Self::MAX_WATCHERS)),
            max_watchers: Self::MAX_WATCHERS,
        }
    }

    /// Watch streams open at once, over all clients. An idle watcher holds a socket, a
    /// receiver on the store's shared broadcast ring and its filter (a few KiB); a slow one
    /// holds nothing more (it catches up from the store's log, see `isthmus_store`).
    pub const MAX_WATCHERS: usize = 512;

    /// The same registry with another cap on watch streams.
    pub fn with_max_watchers(mut self, max: usize) -> Self {
        self.watchers = Arc::new(tokio::sync::Semaphore::new(max));
        self.max_watchers = max;
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub async fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<Resource, RegistryError> {
        let kv = self.store.get(&kind.key(ns, name)).await?;
        kv.as_ref()
            .map(decode)
            .transpose()?
            .flatten()
            .ok_or_else(|| RegistryError::NotFound(format!("{kind} {ns}/{name}")))
    }

    pub async fn list(&self, filter: &Filter) -> Result<(Vec<Resource>, Revision), RegistryError> {
        let (kvs, rev) = self.store.range(&filter.prefix()).await?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            if let Some(r) = decode(kv)? {
                if filter.matches(&r) {
                    out.push(r);
                }
            }
        }
        Ok((out, rev))
    }

    /// The services and the workload entries, for views that join them (legacy API).
    pub async fn services_and_entries(
        &self,
    ) -> Result<(Vec<Service>, Vec<WorkloadEntry>), RegistryError> {
        let (all, _) = self.list(&Filter::default()).await?;
        let (mut svcs, mut wes) = (Vec::new(), Vec::new());
        for r in all {
            match r {
                Resource::Service(s) => svcs.push(s),
                Resource::WorkloadEntry(w) => wes.push(w),
                Resource::WorkloadGroup(_)
                | Resource::AuthorizationPolicy(_)
                | Resource::PeerAuthentication(_)
                | Resource::VirtualService(_)
                | Resource::DestinationRule(_)
                | Resource::HttpRoute(_)
                | Resource::GrpcRoute(_) => {}
            }
        }
        Ok((svcs, wes))
    }

    async fn allocated_vips(&self) -> Result<HashSet<IpAddr>, RegistryError> {
        let (kvs, _) = self.store.range(VIP_PREFIX).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(VIP_PREFIX)?.parse().ok())
            .collect())
    }

    /// The usable addresses of the CIDR (no network address, no IPv4 broadcast) as offsets
    /// `0..usable`, and the address at an offset.
    fn vip_space(&self) -> u128 {
        let host_bits = u32::from(self.cidr.max_prefix_len() - self.cidr.prefix_len());
        let size = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
        match self.cidr {
            IpNet::V4(_) => size.saturating_sub(2),
            IpNet::V6(_) => size.saturating_sub(1),
        }
    }

    fn vip_at(&self, offset: u128) -> IpAddr {
        match self.cidr {
            IpNet::V4(n) => IpAddr::from(std::net::Ipv4Addr::from(
                (u128::from(u32::from(n.network())) + 1 + offset) as u32,
            )),
            IpNet::V6(n) => IpAddr::from(std::net::Ipv6Addr::from(
                u128::from(n.network()) + 1 + offset,
            )),
        }
    }

    /// Picks a free VIP, starting at a position derived from the service's key (so a service
    /// deleted and re-created tends to get its old address back), probing with point lookups;
    /// `pending` holds addresses claimed earlier in the same transaction. The claim itself is a
    /// create-only compare in the transaction, so a race can't hand an address out twice.
    /// The address `pick_vip` tries first for `key`, unchecked.
    fn first_vip(&self, key: &str) -> Result<IpAddr, RegistryError> {
        let usable = self.vip_space();
        if usable == 0 {
            return Err(RegistryError::VipExhausted(self.cidr));
        }
        Ok(self.vip_at(vip_start(key, usable)))
    }

    async fn pick_vip(
        &self,
        key: &str,
        pending: &HashSet<IpAddr>,
    ) -> Result<IpAddr, RegistryError> {
        // Point lookups first: in a sparsely used range the first probe almost always wins.
        // Past this many, one scan of the allocations is cheaper.
        const PROBES: u128 = 64;
        let usable = self.vip_space();
        if usable == 0 {
            return Err(RegistryError::VipExhausted(self.cidr));
        }
        let start = vip_start(key, usable);
        for i in 0..usable.min(PROBES) {
            let ip = self.vip_at((start + i) % usable);
            if !pending.contains(&ip) && self.store.get(&vip_key(ip)).await?.is_none() {
                return Ok(ip);
            }
        }
        let mut taken = self.allocated_vips().await?;
        taken.extend(pending);
        let limit = usable.min(taken.len() as u128 + 1);
        (0..limit)
            .map(|i| self.vip_at((start + i) % usable))
            .find(|ip| !taken.contains(ip))
            .ok_or(RegistryError::VipExhausted(self.cidr))
    }

    /// Creates or updates every resource, in one transaction: either all are written or none.
    /// Every subset a VirtualService in `resources` routes to must be defined by a
    /// DestinationRule for that host, in `resources` or already in the registry; otherwise
    /// the whole input is refused, naming the route.
    async fn check_subsets(&self, resources: &[Resource]) -> Result<(), RegistryError> {
        use model::traffic::service_of_host;
        let wanted: Vec<(String, (String, String), String)> = resources
            .iter()
            .filter_map(|r| match r {
                Resource::VirtualService(vs) => Some(vs),
                _ => None,
            })
            .flat_map(|vs| {
                let ns = vs.metadata.namespace.clone();
                let id = format!("VirtualService {ns}/{}", vs.metadata.name);
                vs.spec.http.iter().enumerate().flat_map(move |(i, route)| {
                    let (ns, id) = (ns.clone(), id.clone());
                    route
                        .route
                        .iter()
                        .enumerate()
                        .filter(|(_, d)| !d.destination.subset.is_empty())
                        .map(move |(j, d)| {
                            (
                                format!("{id}: spec.http[{i}].route[{j}].destination.subset"),
                                service_of_host(&d.destination.host, &ns),
                                d.destination.subset.clone(),
                            )
                        })
                })
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut rules: Vec<Resource> = resources
            .iter()
            .filter(|r| r.kind() == Kind::DestinationRule)
            .cloned()
            .collect();
        let (kvs, _) = self
            .store
            .range(&Kind::DestinationRule.key_prefix())
            .await?;
        for kv in &kvs {
            if let Some(r) = decode(kv)? {
                if !rules.iter().any(|x| x.key() == r.key()) {
                    rules.push(r);
                }
            }
        }
        let mut defined: HashSet<((String, String), String)> = HashSet::new();
        for r in &rules {
            if let Resource::DestinationRule(dr) = r {
                let host = service_of_host(&dr.spec.host, &dr.metadata.namespace);
                for s in &dr.spec.subsets {
                    defined.insert((host.clone(), s.name.clone()));
                }
            }
        }
        for (field, host, subset) in wanted {
            if !defined.contains(&(host.clone(), subset.clone())) {
                return Err(RegistryError::BadRequest(format!(
                    "{field}: {subset:?} is not a subset of any DestinationRule for {}.{}; define it (spec.subsets) in a DestinationRule whose host is that service, in the same input or before",
                    host.0, host.1
                )));
            }
        }
        Ok(())
    }

    pub async fn apply(
        &self,
        resources: Vec<Resource>,
    ) -> Result<(Vec<ApplyResult>, Revision), RegistryError> {
        let mut seen = HashSet::new();
        for r in &resources {
            model::validate(r)?;
            if !seen.insert(r.key()) {
                return Err(RegistryError::BadRequest(format!(
                    "{} appears twice in the input",
                    r.id()
                )));
            }
        }
        self.check_subsets(&resources).await?;
        for _ in 0..MAX_ATTEMPTS {
            let mut txn = Txn::default();
            let mut results = Vec::new();
            let mut pending: HashSet<IpAddr> = HashSet::new();
            for r in &resources {
                let key = r.key();
                let current = self.store.get(&key).await?;
                let existing = current.as_ref().map(decode).transpose()?.flatten();
                if let Some(want) = &r.meta().resource_version {
                    let have = current.as_ref().map(|kv| kv.mod_revision.to_string());
                    if have.as_deref() != Some(want.as_str()) {
                        return Err(RegistryError::Conflict(format!(
                            "{} was changed since resourceVersion {want} (it is now at {}); get it again and re-apply",
                            r.id(),
                            have.unwrap_or_else(|| "deleted".into())
                        )));
                    }
                }
                let mut next = r.clone();
                let action = match &existing {
                    Some(old) if old.same_intent(r) => Action::Unchanged,
                    Some(old) => {
                        carry_server_fields(old, &mut next);
                        Action::Updated
                    }
                    None => {
                        let m = next.meta_mut();
                        m.uid = Some(uuid::Uuid::new_v4().to_string());
                        m.creation_timestamp = Some(now_rfc3339());
                        if let Resource::Service(s) = &mut next {
                            let ip = self.pick_vip(&key, &pending).await?;
                            pending.insert(ip);
                            s.status.vip = Some(ip);
                            claim_vip(&mut txn, ip, &key);
                        }
                        Action::Created
                    }
                };
                if action != Action::Unchanged {
                    put_if_unchanged(&mut txn, &key, current.as_ref(), &next);
                }
                let m = r.meta();
                results.push(ApplyResult {
                    kind: r.kind(),
                    namespace: m.namespace.clone(),
                    name: m.name.clone(),
                    action,
                });
            }
            if txn.ops.is_empty() {
                return Ok((results, self.store.revision()));
            }
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                return Ok((results, revision));
            }
        }
        Err(too_busy())
    }

    /// Changes a workload entry's status (health, last seen) under compare-and-swap; the spec
    /// is left as it is.
    pub async fn update_status(
        &self,
        ns: &str,
        name: &str,
        f: impl Fn(&mut WorkloadEntry),
    ) -> Result<Revision, RegistryError> {
        let key = Kind::WorkloadEntry.key(ns, name);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(RegistryError::NotFound(format!(
                    "WorkloadEntry {ns}/{name}"
                )));
            };
            let Some(Resource::WorkloadEntry(mut w)) = decode(&kv)? else {
                return Err(RegistryError::NotFound(format!(
                    "WorkloadEntry {ns}/{name}"
                )));
            };
            let before = w.status.clone();
            f(&mut w);
            if w.status == before {
                return Ok(kv.mod_revision);
            }
            let mut txn = Txn::default();
            put_if_unchanged(&mut txn, &key, Some(&kv), &Resource::WorkloadEntry(w));
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                return Ok(revision);
            }
        }
        Err(too_busy())
    }

    /// Deletes one resource (and releases a service's VIP in the same transaction).
    pub async fn delete(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Result<(Resource, Revision), RegistryError> {
        match self.delete_guarded(kind, ns, name, None, None).await? {
            (Guarded::Deleted, Some(done)) => Ok(done),
            // Without a guard nothing can keep the resource.
            _ => Err(too_busy()),
        }
    }

    /// Deletes one resource unless some key under `live` exists, and only while `fence` holds
    /// (the leader's), decided in the same transaction.
    pub async fn delete_unless_live(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        live: &str,
        fence: Option<&Compare>,
    ) -> Result<Guarded, RegistryError> {
        Ok(self
            .delete_guarded(kind, ns, name, Some(live), fence)
            .await?
            .0)
    }

    async fn delete_guarded(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        live: Option<&str>,
        fence: Option<&Compare>,
    ) -> Result<(Guarded, Option<(Resource, Revision)>), RegistryError> {
        for _ in 0..MAX_ATTEMPTS {
            let key = kind.key(ns, name);
            let Some(kv) = self.store.get(&key).await? else {
                return Err(RegistryError::NotFound(format!("{kind} {ns}/{name}")));
            };
            let Some(r) = decode(&kv)? else {
                return Err(RegistryError::NotFound(format!("{kind} {ns}/{name}")));
            };
            let mut txn = Txn {
                compares: vec![Compare::ModRevision {
                    key: key.clone(),
                    revision: kv.mod_revision,
                }],
                ops: vec![Op::Delete { key }],
                lease: None,
            };
            if let Resource::Service(s) = &r {
                if let Some(ip) = s.status.vip {
                    txn.ops.push(Op::Delete { key: vip_key(ip) });
                }
            }
            let live_index = live.map(|live| {
                txn.compares.push(Compare::prefix_empty(live));
                txn.compares.len() - 1
            });
            let fence_index = fence.map(|fence| {
                txn.compares.push(fence.clone());
                txn.compares.len() - 1
            });
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    return Ok((Guarded::Deleted, Some((r, revision))))
                }
                TxnOutcome::Failed { index, .. } if Some(index) == live_index => {
                    return Ok((Guarded::Live, None))
                }
                TxnOutcome::Failed { index, .. } if Some(index) == fence_index => {
                    return Ok((Guarded::Fenced, None))
                }
                TxnOutcome::Failed { .. } => {}
            }
        }
        Err(too_busy())
    }

    pub async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse, RegistryError> {
        let ns = if req.namespace.is_empty() {
            model::DEFAULT_NAMESPACE.to_string()
        } else {
            req.namespace.clone()
        };
        let ip: IpAddr = req.ip.parse().map_err(|_| {
            RegistryError::BadRequest(format!("IP {:?} is not an IPv4 or IPv6 address", req.ip))
        })?;
        if let Some(p) = model::validate::dns_label_problem(&req.service) {
            return Err(RegistryError::BadRequest(format!(
                "service name {:?} {p}",
                req.service
            )));
        }
        if req.ports.is_empty() {
            return Err(RegistryError::BadRequest(
                "at least one port is needed (e.g. 3306 or mysql:3306)".into(),
            ));
        }
        let mut ports: Vec<(String, u32)> = Vec::new();
        for arg in &req.ports {
            let (name, port) = parse_port_arg(arg)?;
            if let Some((_, other)) = ports.iter().find(|(n, p)| *n == name && *p != port) {
                return Err(RegistryError::BadRequest(format!(
                    "port name {name:?} is given twice, for {other} and {port}; name them apart (e.g. {name}-{port}:{port})"
                )));
            }
            if !ports.contains(&(name.clone(), port)) {
                ports.push((name, port));
            }
        }
        let sa = if req.service_account.is_empty() {
            model::DEFAULT_SERVICE_ACCOUNT.to_string()
        } else {
            req.service_account.clone()
        };
        let svc_key = Kind::Service.key(&ns, &req.service);
        let entry_name = register_entry_name(&req.service, ip);
        let entry_key = Kind::WorkloadEntry.key(&ns, &entry_name);

        for attempt in 0..MAX_ATTEMPTS {
            let mut txn = Txn::default();
            // The first attempt assumes a new service and entry and reads nothing: its
            // create-only compares fail the transaction if either exists (or the VIP is taken),
            // and the next attempt reads both at once. A new registration is then one store
            // round trip, as a create is in etcd; a repeated one costs a failed transaction.
            let (svc_kv, entry_kv) = if attempt == 0 {
                (None, None)
            } else {
                let (svc_kv, entry_kv) =
                    tokio::join!(self.store.get(&svc_key), self.store.get(&entry_key));
                (svc_kv?, entry_kv?)
            };
            let existing_svc = match svc_kv.as_ref().map(decode).transpose()?.flatten() {
                Some(Resource::Service(s)) => Some(s),
                _ => None,
            };
            // The service: create it selector-less, or add the ports it lacks.
            let (svc_action, svc) = match existing_svc {
                None => {
                    let mut svc = Service {
                        api_version: model::API_VERSION.into(),
                        kind: Kind::Service.as_str().into(),
                        metadata: ObjectMeta {
                            name: req.service.clone(),
                            namespace: ns.clone(),
                            annotations: req.annotations.clone(),
                            uid: Some(uuid::Uuid::new_v4().to_string()),
                            creation_timestamp: Some(now_rfc3339()),
                            ..Default::default()
                        },
                        spec: ServiceSpec {
                            ports: ports
                                .iter()
                                .map(|(name, port)| ServicePort {
                                    name: name.clone(),
                                    port: *port,
                                    protocol: protocol_for_port_name(name),
                                    target_port: None,
                                })
                                .collect(),
                            selector: None,
                        },
                        status: Default::default(),
                    };
                    svc.metadata.annotations.insert(
                        model::CREATED_BY_ANNOTATION.into(),
                        model::CREATED_BY_REGISTER.into(),
                    );
                    // First try the service's own address without looking: the claim is a
                    // create-only compare, so a taken one fails the transaction and the next
                    // attempt probes.
                    let vip = if attempt == 0 {
                        self.first_vip(&svc_key)?
                    } else {
                        self.pick_vip(&svc_key, &HashSet::new()).await?
                    };
                    svc.status.vip = Some(vip);
                    claim_vip(&mut txn, vip, &svc_key);
                    (Action::Created, svc)
                }
                Some(mut svc) => {
                    let mut changed = false;
                    for (name, port) in &ports {
                        match svc.spec.ports.iter().find(|p| p.name == *name) {
                            Some(p) if p.port == *port => {}
                            Some(p) => {
                                return Err(RegistryError::Conflict(format!(
                                    "service {ns}/{} already has port {name:?} = {}; register {port} under another name (e.g. {name}-{port}:{port})",
                                    req.service, p.port
                                )))
                            }
                            None if svc.spec.ports.iter().any(|p| p.port == *port) => {}
                            None => {
                                svc.spec.ports.push(ServicePort {
                                    name: name.clone(),
                                    port: *port,
                                    protocol: protocol_for_port_name(name),
                                    target_port: None,
                                });
                                changed = true;
                            }
                        }
                    }
                    (
                        if changed {
                            Action::Updated
                        } else {
                            Action::Unchanged
                        },
                        svc,
                    )
                }
            };
            let svc_res = Resource::Service(svc.clone());
            model::validate(&svc_res)?;
            if svc_action != Action::Unchanged {
                put_if_unchanged(&mut txn, &svc_key, svc_kv.as_ref(), &svc_res);
            } else {
                // The answer names the service's VIP: the service must still be as read when
                // the entry is written, or a concurrent delete would leave an entry of a
                // service that is gone and an answer naming a VIP that no longer exists.
                txn.compares.push(Compare::ModRevision {
                    key: svc_key.clone(),
                    revision: svc_kv.as_ref().map_or(0, |kv| kv.mod_revision),
                });
            }

            // The entry: the service port's name → the port the host listens on.
            let entry_ports: BTreeMap<String, u32> = ports
                .iter()
                .map(|(name, port)| {
                    let svc_port = svc
                        .spec
                        .ports
                        .iter()
                        .find(|p| p.name == *name || p.port == *port);
                    (svc_port.map_or(name.clone(), |p| p.name.clone()), *port)
                })
                .collect();
            let existing_entry = match entry_kv.as_ref().map(decode).transpose()?.flatten() {
                Some(Resource::WorkloadEntry(w)) => Some(w),
                _ => None,
            };
            let spec = WorkloadEntrySpec {
                address: ip.to_string(),
                ports: entry_ports,
                labels: req.labels.clone(),
                service_account: sa.clone(),
                services: vec![req.service.clone()],
                ..existing_entry
                    .as_ref()
                    .map(|e| e.spec.clone())
                    .unwrap_or_default()
            };
            let (entry_action, entry) = match existing_entry {
                Some(e) if e.spec == spec && e.metadata.annotations == req.annotations => {
                    (Action::Unchanged, e)
                }
                Some(mut e) => {
                    e.spec = spec;
                    e.metadata.annotations = req.annotations.clone();
                    (Action::Updated, e)
                }
                None => (
                    Action::Created,
                    WorkloadEntry {
                        api_version: model::API_VERSION.into(),
                        kind: Kind::WorkloadEntry.as_str().into(),
                        metadata: ObjectMeta {
                            name: entry_name.clone(),
                            namespace: ns.clone(),
                            annotations: req.annotations.clone(),
                            uid: Some(uuid::Uuid::new_v4().to_string()),
                            creation_timestamp: Some(now_rfc3339()),
                            ..Default::default()
                        },
                        spec,
                        status: Default::default(),
                    },
                ),
            };
            let entry_res = Resource::WorkloadEntry(entry);
            model::validate(&entry_res)?;
            if entry_action != Action::Unchanged {
                put_if_unchanged(&mut txn, &entry_key, entry_kv.as_ref(), &entry_res);
            }
            let response = |revision| RegisterResponse {
                service: svc_action,
                workload_entry: entry_action,
                workload_entry_name: entry_name.clone(),
                hostname: svc.hostname(&self.domain),
                vip: svc.status.vip,
                revision,
            };
            if txn.ops.is_empty() {
                return Ok(response(self.store.revision()));
            }
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                return Ok(response(revision));
            }
        }
        Err(too_busy())
    }

    /// Removes the endpoint IP of SERVICE; removes the service too when `register` created it and
    /// no endpoint is left (fixing the leftover-service bug of istioctl's deregister).
    pub async fn deregister(
        &self,
        req: DeregisterRequest,
    ) -> Result<DeregisterResponse, RegistryError> {
        let ns = if req.namespace.is_empty() {
            model::DEFAULT_NAMESPACE.to_string()
        } else {
            req.namespace.clone()
        };
        let ip: IpAddr = req.ip.parse().map_err(|_| {
            RegistryError::BadRequest(format!("IP {:?} is not an IPv4 or IPv6 address", req.ip))
        })?;
        for _ in 0..MAX_ATTEMPTS {
            let svc_key = Kind::Service.key(&ns, &req.service);
            let svc_kv = self.store.get(&svc_key).await?;
            let svc = match svc_kv.as_ref().map(decode).transpose()?.flatten() {
                Some(Resource::Service(s)) => s,
                _ => {
                    return Err(RegistryError::NotFound(format!(
                        "Service {ns}/{}",
                        req.service
                    )))
                }
            };
            let (entries, _) = self
                .store
                .range(&format!("{}{ns}/", Kind::WorkloadEntry.key_prefix()))
                .await?;
            let mut txn = Txn::default();
            let mut removed = Vec::new();
            let mut remaining = 0usize;
            for kv in &entries {
                let Some(Resource::WorkloadEntry(mut w)) = decode(kv)? else {
                    continue;
                };
                if !w.serves(&svc) {
                    continue;
                }
                let attached = w.spec.services.contains(&req.service);
                if attached && w.ip() == Some(ip) {
                    txn.compares.push(Compare::ModRevision {
                        key: kv.key.clone(),
                        revision: kv.mod_revision,
                    });
                    w.spec.services.retain(|s| *s != req.service);
                    if w.spec.services.is_empty() {
                        txn.ops.push(Op::Delete {
                            key: kv.key.clone(),
                        });
                    } else {
                        txn.ops.push(Op::Put {
                            key: kv.key.clone(),
                            value: encode(&Resource::WorkloadEntry(w.clone())),
                        });
                    }
                    removed.push(w.metadata.name.clone());
                } else {
                    remaining += 1;
                }
            }
            if removed.is_empty() {
                return Err(RegistryError::NotFound(format!(
                    "endpoint {ip} of service {ns}/{}",
                    req.service
                )));
            }
            let created_by_register = svc
                .metadata
                .annotations
                .get(model::CREATED_BY_ANNOTATION)
                .map(String::as_str)
                == Some(model::CREATED_BY_REGISTER);
            let delete_service = created_by_register && remaining == 0;
            if delete_service {
                txn.compares.push(Compare::ModRevision {
                    key: svc_key.clone(),
                    revision: svc_kv.as_ref().map_or(0, |k| k.mod_revision),
                });
                txn.ops.push(Op::Delete {
                    key: svc_key.clone(),
                });
                if let Some(vip) = svc.status.vip {
                    txn.ops.push(Op::Delete { key: vip_key(vip) });
                }
            }
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                return Ok(DeregisterResponse {
                    removed_entries: removed,
                    service_deleted: delete_service,
                    revision,
                });
            }
        }
        Err(too_busy())
    }

    /// Typed events for the filter. Without `from`, the current state comes first as ADDED
    /// events (like `kubectl get -w`), then changes. With `from`, every change since that
    /// revision. Objects that stop (or start) matching a label selector are reported as DELETED
    /// (or ADDED), so a client's view stays exactly the selected set.
    pub async fn watch(
        &self,
        filter: Filter,
        from: Option<Revision>,
    ) -> Result<impl Stream<Item = Result<WatchEvent, RegistryError>> + Send + 'static, RegistryError>
    {
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            RegistryError::TooManyWatchers {
                max: self.max_watchers,
            }
        })?;
        let (initial, start) = match from {
            Some(rev) => (Vec::new(), rev),
            None => {
                let (items, rev) = self.list(&filter).await?;
                let initial: Vec<_> = items
                    .into_iter()
                    .map(|object| {
                        let revision = object
                            .meta()
                            .resource_version
                            .as_deref()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(rev);
                        Ok(WatchEvent {
                            kind: WatchEventType::Added,
                            revision,
                            object,
                        })
                    })
                    .collect();
                (initial, rev + 1)
            }
        };
        let events = self.store.watch(&filter.prefix(), start.max(1)).await?;
        let live = events.filter_map(move |ev| {
            // The stream's slot among the watchers, given back when the stream is dropped.
            let _slot = &permit;
            let filter = filter.clone();
            async move {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => return Some(Err(RegistryError::from(e))),
                };
                let revision = ev.revision();
                let decode_opt =
                    |kv: Option<&KeyValue>| -> Result<Option<Resource>, RegistryError> {
                        Ok(kv
                            .map(decode)
                            .transpose()?
                            .flatten()
                            .filter(|r| filter.matches(r)))
                    };
                let prev = match decode_opt(ev.prev.as_ref()) {
                    Ok(p) => p,
                    Err(e) => return Some(Err(e)),
                };
                let (kind, object) = match ev.kind {
                    EventKind::Put => match (decode_opt(Some(&ev.kv)), prev) {
                        (Err(e), _) => return Some(Err(e)),
                        (Ok(Some(now)), Some(_)) => (WatchEventType::Modified, now),
                        (Ok(Some(now)), None) => (WatchEventType::Added, now),
                        (Ok(None), Some(before)) => (WatchEventType::Deleted, before),
                        (Ok(None), None) => return None,
                    },
                    EventKind::Delete => (WatchEventType::Deleted, prev?),
                };
                Some(Ok(WatchEvent {
                    kind,
                    revision,
                    object,
                }))
            }
        });
        Ok(futures::stream::iter(initial).chain(live))
    }
}

/// Keeps what the server owns (identity, creation time, VIP, health) when a client updates.
fn carry_server_fields(old: &Resource, next: &mut Resource) {
    let om = old.meta();
    let nm = next.meta_mut();
    nm.uid.clone_from(&om.uid);
    nm.creation_timestamp.clone_from(&om.creation_timestamp);
    match (old, next) {
        (Resource::Service(o), Resource::Service(n)) => n.status = o.status.clone(),
        (Resource::WorkloadEntry(o), Resource::WorkloadEntry(n))
            if n.status == Default::default() =>
        {
            n.status = o.status.clone()
        }
        _ => {}
    }
}

fn too_busy() -> RegistryError {
    RegistryError::Conflict(
        "the registry changed under this request too many times in a row; try again".into(),
    )
}
