//! The registry's storage: a revisioned key-value store with ordered, resumable watches.
//!
//! The semantics are etcd v3's, so that an etcd backend can replace the embedded one without the
//! layers above noticing:
//! - one global `revision`, incremented once per committed transaction (a transaction with several
//!   operations gives all of its events the same revision, as etcd does);
//! - each key carries `create_revision`, `mod_revision` and `version` (writes since creation);
//! - `txn` = etcd `Txn(If(compares...).Then(ops...))`; a failed compare writes nothing;
//! - `watch(prefix, from)` = etcd `Watch(prefix, start_revision=from)`: every event with
//!   revision >= `from`, in revision order, no gaps, then live events; asking for a revision that
//!   was compacted away fails with [`StoreError::Compacted`], as etcd's `ErrCompacted`. One
//!   deliberate difference: a watch from beyond the next revision fails with
//!   [`StoreError::FutureRevision`] instead of waiting, so a client that kept a revision across a
//!   wiped store re-lists rather than silently skipping events.
//!
//! Two backends share one implementation of those rules (`engine`: transactions over a small
//! table interface; `hub`: watches over a broadcast channel backed by the event log):
//! [`RedbStore`], durable in one file, with group commit (concurrent transactions share one
//! fsync), and [`MemStore`], for tests. Dropping a store ends its watch streams.
#![forbid(unsafe_code)]

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

mod codec;
mod engine;
pub mod etcd;
mod hub;
pub mod mem;
pub mod redb_store;
#[cfg(feature = "test-etcd")]
pub mod testing;

pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use mem::MemStore;
pub use redb_store::{RedbStore, WriteStats, PROBE_INTERVAL};

/// etcd's revision type: a signed 64-bit counter starting at 1 for the first write.
pub type Revision = i64;

/// An etcd lease: keys a transaction puts under it vanish when it expires (not kept alive for
/// its TTL). Embedded stores grant none ([`Store::grant_lease`] answers `None`).
pub type LeaseId = i64;

/// Tuning shared by both backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// How many revisions of event history to keep for watches; older ones are compacted away
    /// automatically as part of each write. At least 1.
    pub history: usize,
    /// Committed transactions buffered per watcher before it falls back to re-reading the
    /// history (a slow watcher never loses events, it only costs a history read).
    pub watch_buffer: usize,
    /// The embedded store's page cache (redb's; its default is 1 GiB). Reads are rare (the
    /// control plane answers from its in-memory view), so a small cache costs little and bounds
    /// the memory the history's pages can take.
    pub cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            history: 10_000,
            watch_buffer: 1024,
            cache_bytes: 32 << 20,
        }
    }
}

/// A stored key with its metadata (etcd `mvccpb.KeyValue`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Number of writes since creation; 1 after the first put.
    pub version: i64,
}

/// A condition of a transaction (etcd `Compare`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// `mod_revision(key) == revision`; `revision == 0` means "the key does not exist"
    /// (etcd: `Compare(ModRevision(key), "=", 0)`).
    ModRevision { key: String, revision: Revision },
    /// No key starts with `prefix` (etcd: `Compare(ModRevision(prefix), "=", 0)` over the
    /// prefix range, which etcd evaluates against a zero value when the range is empty).
    PrefixEmpty { prefix: String },
}

impl Compare {
    /// The key's last write was at `revision` (compare-and-swap on a value read earlier).
    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Self {
        Self::ModRevision {
            key: key.into(),
            revision,
        }
    }

    /// The key does not exist (create-only).
    pub fn absent(key: impl Into<String>) -> Self {
        Self::mod_revision(key, 0)
    }

    /// No key starts with `prefix`.
    pub fn prefix_empty(prefix: impl Into<String>) -> Self {
        Self::PrefixEmpty {
            prefix: prefix.into(),
        }
    }

    /// Whether the compare holds, given the value of its key (for `PrefixEmpty`: the first key
    /// under the prefix, if any).
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        match self {
            Self::ModRevision { revision, .. } => {
                current.map_or(0, |kv| kv.mod_revision) == *revision
            }
            Self::PrefixEmpty { .. } => current.is_none(),
        }
    }
}

/// A write of a transaction (etcd `RequestOp`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// Deleting an absent key is not an error and produces no event (as in etcd).
    Delete {
        key: String,
    },
}

/// An atomic transaction: if every compare holds, every op is applied under one new revision.
/// As in etcd, the ops of one transaction must name distinct keys ([`StoreError::Invalid`]
/// otherwise).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
    /// The lease every put of this transaction is attached to (etcd); stores without leases
    /// ignore it, their keys live until deleted.
    pub lease: Option<LeaseId>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// Attaches the puts to `lease` (none: plain keys).
    pub fn leased(mut self, lease: Option<LeaseId>) -> Self {
        self.lease = lease;
        self
    }
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// All compares held and the ops were committed durably at `revision`. A transaction whose
    /// ops change nothing (only deletes of absent keys, or no ops) does not bump the revision
    /// and reports the current one.
    Committed { revision: Revision },
    /// Compare number `index` did not hold; nothing was written. `current` is the key's present
    /// value so the caller can retry or report the conflict.
    Failed {
        index: usize,
        current: Option<KeyValue>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change (etcd `mvccpb.Event` with `prev_kv`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For a put, the new key-value. For a delete, the key with `mod_revision` = the deletion's
    /// revision, an empty value, and `create_revision`/`version` = 0 (as etcd reports it).
    pub kv: KeyValue,
    /// The key-value before this event, if the key existed.
    pub prev: Option<KeyValue>,
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event, StoreError>> + Send>>;

/// Why a store operation failed. `Clone`, so that one failed commit can fail every transaction
/// it carried.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "revision {requested} has been compacted; the oldest revision still available is {oldest}"
    )]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("revision {requested} is in the future; the store is at revision {current}")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("storage I/O failed at {path}: {message}")]
    Io { path: String, message: String },
    /// The filesystem refused to grow the data file (ENOSPC, or EDQUOT). Nothing of the failed
    /// write was acknowledged; the store retries by itself once space returns.
    #[error("the registry's disk is full ({cause}) at {path}: free space on that filesystem; writes resume by themselves, reads keep working")]
    DiskFull { path: String, cause: String },
    /// A write failed and the data file could not be reopened afterwards; the store keeps
    /// trying, and serves again as soon as it can.
    #[error("the data file {path} could not be reopened after a failed write ({message}); the store retries by itself")]
    Unavailable { path: String, message: String },
    #[error("the data file {path} is corrupt or of an unknown format: {message}")]
    Corrupt { path: String, message: String },
    #[error("the data file {path} is in use by another process: is another control plane running on this data directory?")]
    Locked { path: String },
    #[error("the store is closed")]
    Closed,
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// etcd (the shared store of several replicas) refused or did not answer.
    #[error("{message}")]
    Etcd {
        cause: EtcdCause,
        /// The endpoints the request could go to, for the message.
        endpoints: String,
        message: String,
        /// The request may have been applied (etcd timed out after it was sent): check before
        /// retrying.
        outcome_unknown: bool,
    },
}

/// Why etcd failed a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtcdCause {
    /// No endpoint answered (refused, unreachable, TLS handshake failed).
    Unreachable,
    /// The member has no leader: quorum is lost, writes are refused.
    NoLeader,
    /// etcd did not confirm in time; the write may have been applied.
    Timeout,
    /// etcd is shedding load ("too many requests").
    Overloaded,
    /// etcd is over its backend quota (NOSPACE alarm).
    SpaceExceeded,
    /// The transaction has more operations, or bytes, than etcd accepts.
    TooLarge,
    /// etcd refused the client's credentials.
    Denied,
    /// A linearizable read answered from a revision older than one already seen (an etcd bug,
    /// etcd-io/etcd#20418); asked again, and refused if it stays so.
    Stale,
    Other,
}

impl StoreError {
    /// A short, stable name of the variant, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Compacted { .. } => "compacted",
            Self::FutureRevision { .. } => "future_revision",
            Self::Io { .. } => "io",
            Self::DiskFull { .. } => "disk_full",
            Self::Unavailable { .. } => "unavailable",
            Self::Corrupt { .. } => "corrupt",
            Self::Locked { .. } => "locked",
            Self::Closed => "closed",
            Self::Invalid(_) => "invalid",
            Self::Etcd { cause, .. } => match cause {
                EtcdCause::Unreachable => "etcd_unreachable",
                EtcdCause::NoLeader => "etcd_no_leader",
                EtcdCause::Timeout => "etcd_timeout",
                EtcdCause::Overloaded => "etcd_overloaded",
                EtcdCause::SpaceExceeded => "etcd_space_exceeded",
                EtcdCause::TooLarge => "etcd_too_large",
                EtcdCause::Denied => "etcd_denied",
                EtcdCause::Stale => "etcd_stale_read",
                EtcdCause::Other => "etcd_other",
            },
        }
    }

    /// A failure of the storage itself rather than of the request.
    pub fn is_storage(&self) -> bool {
        matches!(
            self,
            Self::Io { .. }
                | Self::DiskFull { .. }
                | Self::Unavailable { .. }
                | Self::Corrupt { .. }
        ) || matches!(self, Self::Etcd { cause, .. } if !matches!(cause, EtcdCause::TooLarge | EtcdCause::Stale))
    }
}

/// Whether the store accepts writes, and the storage errors it met since it was opened.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// The last storage error of a write, while writes fail; `None` once a write (or the store's
    /// own probe) succeeds again.
    pub write_failure: Option<StoreError>,
    /// Storage errors counted by operation (`read`, `write`, `reopen`, `probe`) and
    /// [`StoreError::kind`], sorted.
    pub errors: Vec<ErrorCount>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorCount {
    pub op: &'static str,
    pub kind: &'static str,
    pub count: u64,
}

/// The store every control-plane component talks to.
///
/// Implementations must be linearizable: a `txn` that returned `Committed` is durable (for
/// on-disk backends: fsynced) and visible to every later `get`/`range`, and its events reach every
/// watcher whose prefix matches, in revision order.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current revision (0 for an empty, never-written store).
    fn revision(&self) -> Revision;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// A read that may be slightly stale but is answered even when the store cannot reach a
    /// quorum (etcd's serializable read). Used only where availability matters more than
    /// freshness; embedded stores have nothing to lag behind and answer as `get`.
    async fn get_serializable(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.get(key).await
    }

    /// Every key starting with `prefix`, sorted by key, and the revision the read was made at
    /// (etcd's response header revision): a watch from `revision + 1` sees exactly what followed.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// Events for keys under `prefix` with revision >= `from`. `from == 0` means "from the next
    /// write on", as does `revision() + 1`. Fails at once with `Compacted` if
    /// `from < oldest_revision()`, and with `FutureRevision` if `from > revision() + 1` (etcd
    /// would wait; here it means the caller's revision came from another or a wiped store); a watcher that falls so far behind that
    /// compaction overtakes it gets `Compacted` in the stream (etcd cancels such a watch too).
    /// The stream ends only when the store is closed (dropped) or after an error.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;

    /// Forget history before `revision` (etcd `Compact`). Watches from older revisions then fail
    /// with `Compacted`. Current values are never affected. A revision at or below the oldest one
    /// is a no-op (unlike etcd, which reports `ErrCompacted`, because automatic retention may
    /// have got there first); one beyond the current revision is `FutureRevision`.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// The oldest revision a watch may still start from.
    fn oldest_revision(&self) -> Revision;

    /// Whether writes currently fail for a storage reason (for readiness), and the storage
    /// errors so far (for metrics). A store without storage of its own is always healthy.
    fn health(&self) -> Health {
        Health::default()
    }

    /// A lease of `ttl` for keys that must vanish when this process stops renewing it (a
    /// replica's presence). `None`: this store has no leases; it is never shared, so its one
    /// process clears such keys itself when it starts.
    async fn grant_lease(&self, ttl: std::time::Duration) -> Result<Option<LeaseId>, StoreError> {
        let _ = ttl;
        Ok(None)
    }

    /// Renews a lease for its TTL; `Ok(false)` when it has already expired (its keys are gone).
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let _ = lease;
        Ok(true)
    }

    /// Ends a lease now, deleting its keys (a replica shutting down cleanly).
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let _ = lease;
        Ok(())
    }

    /// Unconditional put; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        match self.txn(Txn::new().put(key, value)).await? {
            TxnOutcome::Committed { revision } => Ok(revision),
            // No compares, so it cannot fail.
            TxnOutcome::Failed { .. } => Err(StoreError::Invalid(
                "a transaction without compares failed".into(),
            )),
        }
    }

    /// Unconditional delete; returns the deletion's revision, or None if the key was absent.
    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        // Compare-and-delete, so that "absent" is decided atomically with the delete rather than
        // guessed from the revision counter, which concurrent writers also move.
        let mut current = self.get(key).await?;
        while let Some(kv) = current {
            let txn = Txn::new()
                .when(Compare::mod_revision(key, kv.mod_revision))
                .delete(key);
            match self.txn(txn).await? {
                TxnOutcome::Committed { revision } => return Ok(Some(revision)),
                // Rewritten or deleted since we looked: try again against what is there now.
                TxnOutcome::Failed { current: now, .. } => current = now,
            }
        }
        Ok(None)
    }
}
