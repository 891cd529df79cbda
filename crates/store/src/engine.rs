//! The etcd semantics of a transaction and of compaction, written once against a small table
//! interface that each backend implements over its own storage.

use std::collections::HashSet;

use crate::{Compare, Event, EventKind, KeyValue, Op, Revision, StoreError, Txn, TxnOutcome};

/// The store-wide counters, persisted beside the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// The last committed revision (0 when nothing was ever written).
    pub revision: Revision,
    /// The oldest revision still in the event log (1 when nothing was compacted).
    pub oldest: Revision,
}

impl Meta {
    pub const EMPTY: Meta = Meta {
        revision: 0,
        oldest: 1,
    };
}

/// One backend's view of its tables inside one write transaction. Writes go through only if the
/// caller commits afterwards, so `apply` may fail halfway on an I/O error without harm.
pub(crate) trait Tables {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// The first key (in key order) starting with `prefix`.
    fn first_under(&self, prefix: &str) -> Result<Option<KeyValue>, StoreError>;
    fn put(&mut self, kv: &KeyValue) -> Result<(), StoreError>;
    fn remove(&mut self, key: &str) -> Result<(), StoreError>;
    /// Add the events of one committed revision to the log.
    fn append(&mut self, revision: Revision, events: &[Event]) -> Result<(), StoreError>;
    /// Drop the log entries with revision < `before`.
    fn truncate_log(&mut self, before: Revision) -> Result<(), StoreError>;
    fn set_meta(&mut self, meta: Meta) -> Result<(), StoreError>;
}

/// What a transaction did: the caller commits (if `events` is non-empty) and then publishes.
#[derive(Debug)]
pub(crate) struct Applied {
    pub outcome: TxnOutcome,
    /// Empty when nothing changed (failed compare, or only deletes of absent keys).
    pub events: Vec<Event>,
    pub meta: Meta,
}

/// Apply `txn` on top of `meta`, keeping at most `history` revisions of log. See
/// [`wrote_nothing`] for what an error leaves behind.
pub(crate) fn apply(
    tables: &mut impl Tables,
    meta: Meta,
    txn: &Txn,
    history: usize,
) -> Result<Applied, StoreError> {
    let mut seen = HashSet::new();
    for op in &txn.ops {
        let (Op::Put { key, .. } | Op::Delete { key }) = op;
        if !seen.insert(key.as_str()) {
            return Err(StoreError::Invalid(format!(
                "key {key:?} appears twice in one transaction"
            )));
        }
    }
    for (index, compare) in txn.compares.iter().enumerate() {
        let current = match compare {
            Compare::ModRevision { key, .. } => tables.get(key)?,
            Compare::PrefixEmpty { prefix } => tables.first_under(prefix)?,
        };
        if !compare.holds(current.as_ref()) {
            return Ok(Applied {
                outcome: TxnOutcome::Failed { index, current },
                events: Vec::new(),
                meta,
            });
        }
    }

    let revision = meta.revision + 1;
    let mut events = Vec::with_capacity(txn.ops.len());
    for op in &txn.ops {
        match op {
            Op::Put { key, value } => {
                let prev = tables.get(key)?;
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                    mod_revision: revision,
                    version: prev.as_ref().map_or(0, |p| p.version) + 1,
                };
                tables.put(&kv)?;
                events.push(Event {
                    kind: EventKind::Put,
                    kv,
                    prev,
                });
            }
            Op::Delete { key } => {
                let Some(prev) = tables.get(key)? else {
                    continue;
                };
                tables.remove(key)?;
                events.push(Event {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        key: key.clone(),
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: revision,
                        version: 0,
                    },
                    prev: Some(prev),
                });
            }
        }
    }
    if events.is_empty() {
        // etcd does not bump the revision for a transaction that changed nothing.
        return Ok(Applied {
            outcome: TxnOutcome::Committed {
                revision: meta.revision,
            },
            events,
            meta,
        });
    }

    tables.append(revision, &events)?;
    let keep_from = revision - Revision::try_from(history.max(1)).unwrap_or(Revision::MAX) + 1;
    let oldest = meta.oldest.max(keep_from);
    if oldest > meta.oldest {
        tables.truncate_log(oldest)?;
    }
    let meta = Meta { revision, oldest };
    tables.set_meta(meta)?;
    Ok(Applied {
        outcome: TxnOutcome::Committed { revision },
        events,
        meta,
    })
}

/// Explicit compaction (etcd `Compact`); returns the new counters.
pub(crate) fn compact(
    tables: &mut impl Tables,
    meta: Meta,
    revision: Revision,
) -> Result<Meta, StoreError> {
    if revision > meta.revision {
        return Err(StoreError::FutureRevision {
            requested: revision,
            current: meta.revision,
        });
    }
    if revision <= meta.oldest {
        return Ok(meta);
    }
    tables.truncate_log(revision)?;
    let meta = Meta {
        oldest: revision,
        ..meta
    };
    tables.set_meta(meta)?;
    Ok(meta)
}

/// Whether `apply` or `compact` returned `err` before touching the tables: their own checks
/// (`Invalid`, `FutureRevision`) run before the first write, so only a storage error can leave a
/// transaction half applied. A backend batching several transactions in one write relies on this
/// to fail one of them without undoing the others.
pub(crate) fn wrote_nothing(err: &StoreError) -> bool {
    !matches!(err, StoreError::Io { .. } | StoreError::Corrupt { .. })
}

/// Whether history from `from` on is still complete, for a read of the log.
pub(crate) fn check_available(meta: Meta, from: Revision) -> Result<(), StoreError> {
    if from < meta.oldest {
        return Err(StoreError::Compacted {
            requested: from,
            oldest: meta.oldest,
        });
    }
    Ok(())
}
