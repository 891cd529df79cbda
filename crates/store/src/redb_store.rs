//! Durable backend on redb: one file, every acknowledged transaction fsynced.
//!
//! Tables: `kv` (key -> counters and value), `log` (revision -> that revision's events, with
//! previous values, for watches) and `meta` (current and oldest revision, format version).
//! Writes are serialized by a mutex held from the start of the redb transaction until its events
//! are published, so revisions reach watchers in order.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};

use crate::codec;
use crate::engine::{self, Meta, Tables};
use crate::hub::{self, blocking, Batch, Hub, Log};
use crate::{
    Event, KeyValue, Revision, Store, StoreError, StoreOptions, Txn, TxnOutcome, WatchStream,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<i64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");

const META_REVISION: &str = "revision";
const META_OLDEST: &str = "oldest";
const META_FORMAT: &str = "format";
/// Bump with a migration when the row encoding in `codec` changes.
const FORMAT: i64 = 1;

pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Serializes writers; holds the counters as last committed.
    writer: Mutex<Meta>,
    /// Mirror the committed counters for lock-free reads; updated before publishing.
    revision: AtomicI64,
    oldest: AtomicI64,
    hub: Hub,
    history: usize,
}

/// The tables of one write transaction.
struct WriteTables<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    log: Table<'t, i64, &'static [u8]>,
    meta: Table<'t, &'static str, i64>,
    path: &'t Path,
}

impl RedbStore {
    /// Open the store in `path`, creating the file if it does not exist. Fails with `Locked` if
    /// another process (or another `RedbStore` in this one) has it open, and with `Corrupt` if it
    /// is not a store file.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let db = Database::builder()
            .create(path)
            .map_err(|e| open_error(path, e.into()))?;
        let meta = init(&db, path)?;
        tracing::debug!(path = %path.display(), revision = meta.revision, oldest = meta.oldest, "opened store");
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path: path.to_owned(),
                writer: Mutex::new(meta),
                revision: AtomicI64::new(meta.revision),
                oldest: AtomicI64::new(meta.oldest),
                hub: Hub::new(options.watch_buffer),
                history: options.history,
            }),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// Create the tables on first open and read the counters.
fn init(db: &Database, path: &Path) -> Result<Meta, StoreError> {
    let mut tx = db.begin_write().map_err(io(path))?;
    tx.set_durability(Durability::Immediate);
    let meta = {
        tx.open_table(KV).map_err(io(path))?;
        tx.open_table(LOG).map_err(io(path))?;
        let mut table = tx.open_table(META).map_err(io(path))?;
        let format = table.get(META_FORMAT).map_err(io(path))?.map(|v| v.value());
        match format {
            None if table.is_empty().map_err(io(path))? => {
                table.insert(META_FORMAT, FORMAT).map_err(io(path))?;
            }
            Some(FORMAT) => {}
            other => {
                return Err(StoreError::Corrupt {
                    path: path.display().to_string(),
                    message: format!(
                        "unsupported store format {other:?}; this build reads format {FORMAT}"
                    ),
                })
            }
        }
        read_meta(&table).map_err(io(path))?
    };
    tx.commit().map_err(io(path))?;
    Ok(meta)
}

fn read_meta(table: &impl ReadableTable<&'static str, i64>) -> Result<Meta, redb::StorageError> {
    let get = |name: &str, default: i64| -> Result<i64, redb::StorageError> {
        Ok(table.get(name)?.map_or(default, |v| v.value()))
    };
    Ok(Meta {
        revision: get(META_REVISION, Meta::EMPTY.revision)?,
        oldest: get(META_OLDEST, Meta::EMPTY.oldest)?,
    })
}

fn open_error(path: &Path, err: redb::Error) -> StoreError {
    let path_s = path.display().to_string();
    match err {
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked { path: path_s },
        // A file that is not redb fails the magic-number check with InvalidData.
        redb::Error::Io(e) if e.kind() == ErrorKind::InvalidData => StoreError::Corrupt {
            path: path_s,
            message: "not a redb database".into(),
        },
        other => storage_error(path, other),
    }
}

fn storage_error(path: &Path, err: redb::Error) -> StoreError {
    let path_s = path.display().to_string();
    match err {
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. } => StoreError::Corrupt {
            path: path_s,
            message: err.to_string(),
        },
        other => StoreError::Io {
            path: path_s,
            message: other.to_string(),
        },
    }
}

/// Maps any redb error raised while working on `path`.
fn io<E: Into<redb::Error>>(path: &Path) -> impl Fn(E) -> StoreError + '_ {
    move |err| storage_error(path, err.into())
}

impl Inner {
    fn corrupt(&self, err: codec::DecodeError) -> StoreError {
        StoreError::Corrupt {
            path: self.path.display().to_string(),
            message: err.to_string(),
        }
    }

    /// Run `f` in one write transaction; if it reports new counters, commit durably, then
    /// publish its events, all under the writer lock so that revisions reach watchers in order.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut WriteTables<'_>, Meta) -> Result<(T, Option<Meta>, Vec<Event>), StoreError>,
    ) -> Result<T, StoreError> {
        // The guarded Meta only changes after a successful commit, so it is accurate even if a
        // previous writer panicked.
        let mut meta = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut tx = self.db.begin_write().map_err(io(&self.path))?;
        tx.set_durability(Durability::Immediate);
        let (out, changed, events) = {
            let mut tables = self.tables(&tx)?;
            f(&mut tables, *meta)?
        };
        match changed {
            Some(new) => {
                tx.commit().map_err(io(&self.path))?;
                *meta = new;
                self.oldest.store(new.oldest, Ordering::SeqCst);
                self.revision.store(new.revision, Ordering::SeqCst);
                if !events.is_empty() {
                    self.hub.publish(Batch {
                        revision: new.revision,
                        events,
                    });
                }
            }
            None => tx.abort().map_err(io(&self.path))?,
        }
        Ok(out)
    }

    fn tables<'t>(&'t self, tx: &'t WriteTransaction) -> Result<WriteTables<'t>, StoreError> {
        Ok(WriteTables {
            kv: tx.open_table(KV).map_err(io(&self.path))?,
            log: tx.open_table(LOG).map_err(io(&self.path))?,
            meta: tx.open_table(META).map_err(io(&self.path))?,
            path: &self.path,
        })
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let tx = self.db.begin_read().map_err(io(&self.path))?;
        let table = tx.open_table(KV).map_err(io(&self.path))?;
        let row = table.get(key).map_err(io(&self.path))?;
        row.map(|v| codec::decode_row(key, v.value()))
            .transpose()
            .map_err(|e| self.corrupt(e))
    }

    fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let tx = self.db.begin_read().map_err(io(&self.path))?;
        let table = tx.open_table(KV).map_err(io(&self.path))?;
        let mut kvs = Vec::new();
        for row in table.range(prefix..).map_err(io(&self.path))? {
            let (k, v) = row.map_err(io(&self.path))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            kvs.push(codec::decode_row(k.value(), v.value()).map_err(|e| self.corrupt(e))?);
        }
        // Read in the same snapshot, so the revision matches the data exactly.
        let meta = tx.open_table(META).map_err(io(&self.path))?;
        let revision = read_meta(&meta).map_err(io(&self.path))?.revision;
        Ok((kvs, revision))
    }
}

impl Tables for WriteTables<'_> {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let row = self.kv.get(key).map_err(io(self.path))?;
        row.map(|v| codec::decode_row(key, v.value()))
            .transpose()
            .map_err(|e| StoreError::Corrupt {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })
    }

    fn put(&mut self, kv: &KeyValue) -> Result<(), StoreError> {
        let row = codec::encode_row(kv);
        self.kv
            .insert(kv.key.as_str(), row.as_slice())
            .map_err(io(self.path))?;
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<(), StoreError> {
        self.kv.remove(key).map_err(io(self.path))?;
        Ok(())
    }

    fn append(&mut self, revision: Revision, events: &[Event]) -> Result<(), StoreError> {
        let row = codec::encode_events(events);
        self.log
            .insert(revision, row.as_slice())
            .map_err(io(self.path))?;
        Ok(())
    }

    fn truncate_log(&mut self, before: Revision) -> Result<(), StoreError> {
        self.log
            .retain_in(..before, |_, _| false)
            .map_err(io(self.path))
    }

    fn set_meta(&mut self, meta: Meta) -> Result<(), StoreError> {
        self.meta
            .insert(META_REVISION, meta.revision)
            .map_err(io(self.path))?;
        self.meta
            .insert(META_OLDEST, meta.oldest)
            .map_err(io(self.path))?;
        Ok(())
    }
}

impl Log for Inner {
    fn hub(&self) -> &Hub {
        &self.hub
    }

    fn revision(&self) -> Revision {
        self.revision.load(Ordering::SeqCst)
    }

    fn read_log(&self, after: Revision, upto: Revision) -> Result<Vec<Batch>, StoreError> {
        let tx = self.db.begin_read().map_err(io(&self.path))?;
        // The availability check and the read share one snapshot, so a concurrent compaction
        // cannot slip between them.
        let meta = tx.open_table(META).map_err(io(&self.path))?;
        engine::check_available(read_meta(&meta).map_err(io(&self.path))?, after + 1)?;
        let log = tx.open_table(LOG).map_err(io(&self.path))?;
        let mut batches = Vec::new();
        for row in log.range(after + 1..=upto).map_err(io(&self.path))? {
            let (revision, events) = row.map_err(io(&self.path))?;
            batches.push(Batch {
                revision: revision.value(),
                events: codec::decode_events(events.value()).map_err(|e| self.corrupt(e))?,
            });
        }
        Ok(batches)
    }
}

#[async_trait]
impl Store for RedbStore {
    fn revision(&self) -> Revision {
        self.inner.revision.load(Ordering::SeqCst)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let (inner, key) = (self.inner.clone(), key.to_owned());
        blocking(move || inner.get(&key)).await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let (inner, prefix) = (self.inner.clone(), prefix.to_owned());
        blocking(move || inner.range(&prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let inner = self.inner.clone();
        blocking(move || {
            inner.write(|tables, meta| {
                let applied = engine::apply(tables, meta, &txn, inner.history)?;
                let changed = (!applied.events.is_empty()).then_some(applied.meta);
                Ok((applied.outcome, changed, applied.events))
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        hub::watch(&self.inner, prefix, from, self.oldest_revision())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        blocking(move || {
            inner.write(|tables, meta| {
                let new = engine::compact(tables, meta, revision)?;
                Ok(((), (new != meta).then_some(new), Vec::new()))
            })
        })
        .await
    }

    fn oldest_revision(&self) -> Revision {
        self.inner.oldest.load(Ordering::SeqCst)
    }
}
