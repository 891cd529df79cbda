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
//!   was compacted away fails with [`StoreError::Compacted`], as etcd's `ErrCompacted`.
#![forbid(unsafe_code)]

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

pub mod mem;
pub mod redb_store;

pub use mem::MemStore;
pub use redb_store::RedbStore;

/// etcd's revision type: a signed 64-bit counter starting at 1 for the first write.
pub type Revision = i64;

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
}

/// A write of a transaction (etcd `RequestOp`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    /// Deleting an absent key is not an error and produces no event (as in etcd).
    Delete { key: String },
}

/// An atomic transaction: if every compare holds, every op is applied under one new revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
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
    Failed { index: usize, current: Option<KeyValue> },
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("revision {requested} has been compacted; the oldest revision still available is {oldest}")]
    Compacted { requested: Revision, oldest: Revision },
    #[error("revision {requested} is in the future; the store is at revision {current}")]
    FutureRevision { requested: Revision, current: Revision },
    #[error("storage I/O failed at {path}: {message}")]
    Io { path: String, message: String },
    #[error("the data file {path} is corrupt or of an unknown format: {message}")]
    Corrupt { path: String, message: String },
    #[error("the data directory {path} is in use by another process")]
    Locked { path: String },
    #[error("the store is closed")]
    Closed,
    #[error("invalid argument: {0}")]
    Invalid(String),
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

    /// Every key starting with `prefix`, sorted by key, and the revision the read was made at
    /// (etcd's response header revision): a watch from `revision + 1` sees exactly what followed.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// Events for keys under `prefix` with revision >= `from`. `from == 0` means "from the next
    /// write on". The stream ends only when the store is closed or on an error.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;

    /// Forget history before `revision` (etcd `Compact`). Watches from older revisions then fail
    /// with `Compacted`. Current values are never affected.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// The oldest revision a watch may still start from.
    fn oldest_revision(&self) -> Revision;

    /// Unconditional put; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        match self
            .txn(Txn {
                compares: vec![],
                ops: vec![Op::Put {
                    key: key.to_string(),
                    value,
                }],
            })
            .await?
        {
            TxnOutcome::Committed { revision } => Ok(revision),
            // No compares, so it cannot fail.
            TxnOutcome::Failed { .. } => Err(StoreError::Invalid(
                "a transaction without compares failed".into(),
            )),
        }
    }

    /// Unconditional delete; returns the deletion's revision, or None if the key was absent.
    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        let before = self.revision();
        match self
            .txn(Txn {
                compares: vec![],
                ops: vec![Op::Delete {
                    key: key.to_string(),
                }],
            })
            .await?
        {
            TxnOutcome::Committed { revision } if revision != before => Ok(Some(revision)),
            _ => Ok(None),
        }
    }
}
