//! Who is connected and how fresh their config is, for `isthmus status` (what Istio's
//! `istioctl proxy-status` shows). In memory, per server process, like istiod's: one entry per
//! open stream, removed when the stream ends, however it ends.
//!
//! Memory is bounded by the number of open streams: each entry has a fixed set of fields,
//! strings taken from the client are truncated, and at most [`MAX_TYPES`] type URLs are
//! tracked per stream. Each stream updates its own entry under a plain mutex that is never held
//! across an await; a listing takes the map lock only to clone the entries' handles.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use super::address::HostAddress;
use super::auth::Identity;
use super::stream::node_metadata;
use crate::node::NodeId;
use crate::pb::envoy::config::core::v3::Node;

/// Node metadata with the client's version (Istio's agents send `ISTIO_VERSION`).
pub const VERSION_METADATA: &str = "ISTIO_VERSION";
/// Type URLs tracked per stream; a client subscribing to more is tracked for the first ones.
pub const MAX_TYPES: usize = 16;
/// Longest node id, version or message kept (longer ones are cut, marked with `…`).
const MAX_NODE_ID: usize = 512;
const MAX_VERSION: usize = 64;
const MAX_MESSAGE: usize = 1024;

/// How current one type's config is on one client, in `istioctl proxy-status` terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncState {
    /// The last response was ACKed and nothing newer was sent since.
    Synced,
    /// Nothing of this type was sent (not subscribed, or not answered yet).
    NotSent,
    /// A response is waiting for its ACK (or the last ACK was for an older one).
    Stale,
    /// The client rejected a response and still holds what it had instead.
    Nacked,
}

impl SyncState {
    /// `SYNCED`, `NOT SENT`, `STALE`, `NACKED`.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Synced => "SYNCED",
            SyncState::NotSent => "NOT SENT",
            SyncState::Stale => "STALE",
            SyncState::Nacked => "NACKED",
        }
    }
}

impl std::fmt::Display for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected response: the server's version of it (the registry generation) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NackStatus {
    pub version: u64,
    pub message: String,
    pub at: SystemTime,
}

/// One type URL on one stream. Versions are the registry generations the responses were
/// built from (`system_version_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeStatus {
    pub type_url: String,
    pub state: SyncState,
    pub sent_version: Option<u64>,
    pub last_sent: Option<SystemTime>,
    pub acked_version: Option<u64>,
    pub last_ack: Option<SystemTime>,
    /// Set while the client holds a rejected response's resources.
    pub nack: Option<NackStatus>,
}

/// The last health report (`istio.io/health`) on a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    pub healthy: bool,
    pub message: Option<String>,
    pub at: SystemTime,
}

/// A snapshot of one open discovery stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStatus {
    /// Server-local stream number (also the prefix of its nonces).
    pub stream_id: u64,
    pub node_id: String,
    /// `<name>.<namespace>` from the node id, or the whole id if it is opaque.
    pub name: String,
    /// The authenticated identity (client certificate or join token).
    pub identity: Identity,
    /// The TCP peer.
    pub peer: Option<SocketAddr>,
    /// The host address the stream may speak for, and what vouched for it; or the node id's
    /// claim that nothing vouched for. Only a verified address counts anywhere.
    pub address: HostAddress,
    /// The client's version, from node metadata [`VERSION_METADATA`].
    pub version: Option<String>,
    pub connected_at: SystemTime,
    /// Expiry of the client certificate the connection was made with (none with a token).
    pub cert_expires: Option<SystemTime>,
    pub health: Option<HealthStatus>,
    /// The handle the [`StreamObserver`](super::StreamObserver) returned; the control plane's
    /// is the `<namespace>/<name>` of the WorkloadEntry the client registered.
    pub registered: Option<String>,
    /// By type URL.
    pub types: Vec<TypeStatus>,
}

/// Who a stream is, as decided at its first request.
pub(crate) struct Who<'a> {
    pub identity: &'a Identity,
    pub node: &'a Node,
    pub parsed: &'a NodeId,
    pub address: &'a HostAddress,
}

/// What the connection knows before its first request.
pub(crate) struct Peer {
    pub addr: Option<SocketAddr>,
    /// IP SANs of the verified client certificate.
    pub cert_ips: Vec<std::net::IpAddr>,
    pub cert_expires: Option<SystemTime>,
    pub connected_at: SystemTime,
}

#[derive(Default)]
struct TypeTrack {
    inflight: bool,
    sent: Option<(u64, SystemTime)>,
    acked: Option<(u64, SystemTime)>,
    nack: Option<NackStatus>,
}

impl TypeTrack {
    fn state(&self) -> SyncState {
        match (&self.sent, &self.acked, &self.nack) {
            (None, _, _) => SyncState::NotSent,
            (_, _, Some(_)) => SyncState::Nacked,
            _ if self.inflight => SyncState::Stale,
            (Some((sent, _)), Some((acked, _)), None) if sent == acked => SyncState::Synced,
            _ => SyncState::Stale,
        }
    }
}

struct Tracked {
    node_id: String,
    name: String,
    identity: Identity,
    peer: Option<SocketAddr>,
    address: HostAddress,
    version: Option<String>,
    connected_at: SystemTime,
    cert_expires: Option<SystemTime>,
    health: Option<HealthStatus>,
    registered: Option<String>,
    types: BTreeMap<String, TypeTrack>,
}

impl Tracked {
    fn snapshot(&self, stream_id: u64) -> StreamStatus {
        StreamStatus {
            stream_id,
            node_id: self.node_id.clone(),
            name: self.name.clone(),
            identity: self.identity.clone(),
            peer: self.peer,
            address: self.address.clone(),
            version: self.version.clone(),
            connected_at: self.connected_at,
            cert_expires: self.cert_expires,
            health: self.health.clone(),
            registered: self.registered.clone(),
            types: self
                .types
                .iter()
                .map(|(url, t)| TypeStatus {
                    type_url: url.clone(),
                    state: t.state(),
                    sent_version: t.sent.map(|(v, _)| v),
                    last_sent: t.sent.map(|(_, at)| at),
                    acked_version: t.acked.map(|(v, _)| v),
                    last_ack: t.acked.map(|(_, at)| at),
                    nack: t.nack.clone(),
                })
                .collect(),
        }
    }

    /// The type's record; `None` past [`MAX_TYPES`].
    fn of_type(&mut self, url: &str) -> Option<&mut TypeTrack> {
        // Looked up before inserting: the URL is only copied once per type and stream.
        if !self.types.contains_key(url) {
            if self.types.len() >= MAX_TYPES {
                return None;
            }
            self.types.insert(url.to_owned(), TypeTrack::default());
        }
        self.types.get_mut(url)
    }
}

type Shared = Arc<Mutex<Tracked>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

use crate::node::truncate as cut;

/// The open streams of one server.
pub(crate) struct Streams {
    entries: Mutex<HashMap<u64, Shared>>,
    /// Bumped when a stream is added or removed.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Streams {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Streams {
    /// Fires when a stream is added or removed.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Starts tracking a stream; the entry goes away when the returned handle is dropped.
    pub fn register(
        self: &Arc<Self>,
        stream_id: u64,
        who: Who<'_>,
        peer: &Peer,
        registered: Option<String>,
    ) -> Entry {
        let Who {
            identity,
            node,
            parsed,
            address,
        } = who;
        let tracked = Arc::new(Mutex::new(Tracked {
            node_id: cut(&node.id, MAX_NODE_ID),
            name: cut(&parsed.display_name(), MAX_NODE_ID),
            identity: identity.clone(),
            peer: peer.addr,
            address: address.clone(),
            version: node_metadata(node, VERSION_METADATA).map(|v| cut(v, MAX_VERSION)),
            connected_at: peer.connected_at,
            cert_expires: peer.cert_expires,
            health: None,
            registered,
            types: BTreeMap::new(),
        }));
        lock(&self.entries).insert(stream_id, tracked.clone());
        self.bump();
        Entry {
            stream_id,
            streams: self.clone(),
            tracked,
        }
    }

    /// Every open stream, ordered by node id (then stream).
    pub fn list(&self) -> Vec<StreamStatus> {
        let entries: Vec<(u64, Shared)> = lock(&self.entries)
            .iter()
            .map(|(id, t)| (*id, t.clone()))
            .collect();
        let mut out: Vec<StreamStatus> = entries
            .into_iter()
            .map(|(id, t)| lock(&t).snapshot(id))
            .collect();
        out.sort_by(|a, b| (&a.node_id, a.stream_id).cmp(&(&b.node_id, b.stream_id)));
        out
    }
}

/// One stream's entry; updated by its connection task, removed on drop.
pub(crate) struct Entry {
    stream_id: u64,
    streams: Arc<Streams>,
    tracked: Shared,
}

impl Drop for Entry {
    fn drop(&mut self) {
        lock(&self.streams.entries).remove(&self.stream_id);
        self.streams.bump();
    }
}

impl Entry {
    pub fn subscribed(&self, type_url: &str) {
        lock(&self.tracked).of_type(type_url);
    }

    pub fn sent(&self, type_url: &str, version: u64) {
        if let Some(t) = lock(&self.tracked).of_type(type_url) {
            t.inflight = true;
            t.sent = Some((version, SystemTime::now()));
        }
    }

    /// The in-flight response was ACKed; `holding` says whether the client still holds
    /// resources of an earlier rejected response (then it stays NACKED).
    pub fn acked(&self, type_url: &str, holding: bool) {
        if let Some(t) = lock(&self.tracked).of_type(type_url) {
            t.inflight = false;
            if let Some((v, _)) = t.sent {
                t.acked = Some((v, SystemTime::now()));
            }
            if !holding {
                t.nack = None;
            }
        }
    }

    pub fn nacked(&self, type_url: &str, message: &str) {
        if let Some(t) = lock(&self.tracked).of_type(type_url) {
            t.inflight = false;
            t.nack = Some(NackStatus {
                version: t.sent.map_or(0, |(v, _)| v),
                message: cut(message, MAX_MESSAGE),
                at: SystemTime::now(),
            });
        }
    }

    pub fn health(&self, healthy: bool, message: Option<&str>) {
        lock(&self.tracked).health = Some(HealthStatus {
            healthy,
            message: message.map(|m| cut(m, MAX_MESSAGE)),
            at: SystemTime::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, version: Option<&str>) -> Node {
        use prost_types::value::Kind;
        Node {
            id: id.to_owned(),
            metadata: version.map(|v| prost_types::Struct {
                fields: [(
                    VERSION_METADATA.to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StringValue(v.to_owned())),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        }
    }

    fn reg(streams: &Arc<Streams>, n: u64, node: &Node, registered: Option<String>) -> Entry {
        let parsed = NodeId::parse(&node.id).unwrap();
        let address = HostAddress::Verified {
            ip: "127.0.0.1".parse().unwrap(),
            by: super::super::address::AddressSource::Peer,
        };
        let id = Identity::new("cluster.local", "prod", "web");
        let who = Who {
            identity: &id,
            node,
            parsed: &parsed,
            address: &address,
        };
        streams.register(n, who, &peer(), registered)
    }

    fn peer() -> Peer {
        Peer {
            addr: Some("127.0.0.1:4242".parse().unwrap()),
            cert_ips: Vec::new(),
            cert_expires: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000)),
            connected_at: SystemTime::now(),
        }
    }

    const A: &str = "type.googleapis.com/istio.workload.Address";

    fn state(s: &Streams, url: &str) -> SyncState {
        s.list()[0]
            .types
            .iter()
            .find(|t| t.type_url == url)
            .unwrap()
            .state
    }

    #[test]
    fn freshness_follows_sends_acks_and_nacks() {
        let streams = Arc::new(Streams::default());
        let id = Identity::new("cluster.local", "prod", "web");
        let e = reg(
            &streams,
            7,
            &node(
                "sidecar~10.0.0.5~vm.prod~prod.svc.cluster.local",
                Some("1.2.3"),
            ),
            Some("prod/vm".into()),
        );
        let got = &streams.list()[0];
        assert_eq!(got.stream_id, 7);
        assert_eq!(got.identity, id);
        assert_eq!(got.version.as_deref(), Some("1.2.3"));
        assert_eq!(got.registered.as_deref(), Some("prod/vm"));
        assert_eq!(got.peer, peer().addr);
        assert_eq!(got.name, "vm.prod");
        assert_eq!(got.address.ip(), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(got.cert_expires, peer().cert_expires);
        assert!(got.types.is_empty() && got.health.is_none());

        e.subscribed(A);
        assert_eq!(state(&streams, A), SyncState::NotSent);
        e.sent(A, 3);
        assert_eq!(state(&streams, A), SyncState::Stale);
        e.acked(A, false);
        assert_eq!(state(&streams, A), SyncState::Synced);
        let t = &streams.list()[0].types[0];
        assert_eq!((t.sent_version, t.acked_version), (Some(3), Some(3)));
        assert!(t.last_ack.is_some());

        e.sent(A, 4);
        e.nacked(A, "resource \"x\": bad address");
        assert_eq!(state(&streams, A), SyncState::Nacked);
        let t = &streams.list()[0].types[0];
        let nack = t.nack.as_ref().unwrap();
        assert_eq!(nack.version, 4);
        assert_eq!(nack.message, "resource \"x\": bad address");
        assert_eq!(
            t.acked_version,
            Some(3),
            "the last ACK is still the older one"
        );

        // A later response is ACKed but the rejected resources are still held: still NACKED.
        e.sent(A, 5);
        assert_eq!(state(&streams, A), SyncState::Nacked);
        e.acked(A, true);
        assert_eq!(state(&streams, A), SyncState::Nacked);
        // The rejected resource changed and was accepted.
        e.sent(A, 6);
        e.acked(A, false);
        assert_eq!(state(&streams, A), SyncState::Synced);
        assert_eq!(streams.list()[0].types[0].acked_version, Some(6));

        e.health(false, Some("connection refused"));
        let h = streams.list()[0].health.clone().unwrap();
        assert!(!h.healthy);
        assert_eq!(h.message.as_deref(), Some("connection refused"));

        drop(e);
        assert!(streams.list().is_empty(), "removed when the stream ends");
    }

    #[test]
    fn memory_is_bounded_per_stream() {
        let streams = Arc::new(Streams::default());
        let long = "x".repeat(10_000);
        let e = reg(&streams, 1, &node(&long, Some(&long)), None);
        for i in 0..100 {
            e.subscribed(&format!("type.example/{i}"));
        }
        e.sent("type.example/0", 1);
        e.nacked("type.example/0", &"é".repeat(5000));
        let got = &streams.list()[0];
        assert_eq!(got.types.len(), MAX_TYPES);
        assert!(got.node_id.len() <= MAX_NODE_ID + 3);
        assert!(got.name.len() <= MAX_NODE_ID + 3);
        assert!(got.version.as_ref().unwrap().len() <= MAX_VERSION + 3);
        let message = &got.types[0].nack.as_ref().unwrap().message;
        assert!(message.len() <= MAX_MESSAGE + 3 && message.ends_with('…'));
        // Several streams, listed by node id.
        let _b = reg(&streams, 2, &node("a-node", None), None);
        let ids: Vec<u64> = streams.list().iter().map(|s| s.stream_id).collect();
        assert_eq!(ids, vec![2, 1]);
    }
}
