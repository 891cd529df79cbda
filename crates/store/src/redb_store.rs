//! Durable backend on redb: one file, every acknowledged transaction fsynced.
//!
//! Tables: `kv` (key -> counters and value), `log` (revision -> that revision's events, with
//! previous values, for watches) and `meta` (current and oldest revision, format version).
//!
//! Writes use group commit, as etcd batches its WAL syncs. Callers queue their transactions; one
//! writer thread takes everything queued at that moment (up to `MAX_BATCH_REQUESTS` or
//! `MAX_BATCH_BYTES`), applies it in order inside one redb write transaction (each transaction
//! gets its own revision and sees the ones before it), commits once with one fsync, then publishes
//! the events in revision order and only then answers each caller. A lone transaction waits for
//! nothing but its own commit; under load, one fsync carries many. A failed commit fails every
//! transaction of its batch.
//!
//! A dedicated thread rather than "whoever holds the lock leads the batch": waiting callers are
//! then async tasks parked on a oneshot instead of blocking-pool threads parked on a mutex (64
//! concurrent writers held 64 of them), there is no leader hand-off to get wrong, and an
//! uncontended write still costs one thread switch each way, as `spawn_blocking` did.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use tokio::sync::oneshot;

use crate::codec;
use crate::engine::{self, Applied, Meta, Tables};
use crate::hub::{self, blocking, Batch, Hub, Log};
use crate::{
    Event, KeyValue, Op, Revision, Store, StoreError, StoreOptions, Txn, TxnOutcome, WatchStream,
};

/// At most this many transactions share one commit, so that one commit's latency stays bounded.
const MAX_BATCH_REQUESTS: usize = 256;
/// And at most about this many bytes of keys and values (a single larger transaction still goes
/// through, alone).
const MAX_BATCH_BYTES: usize = 4 << 20;

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
    /// Joined on drop, so that the file is closed when `drop` returns.
    writer: Option<JoinHandle<()>>,
}

/// Counters of the write path, for metrics and to see group commit at work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Durable redb commits since open: one fsync round each.
    pub commits: u64,
    /// Transactions and compactions that changed the store, carried by those commits (failed
    /// compares and no-ops are not counted, wherever they were answered).
    pub writes: u64,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// The counters as last committed. Only the writer takes it (and tests that drive a batch
    /// directly), so it is never contended.
    meta: Mutex<Meta>,
    queue: Mutex<Queue>,
    /// Signalled when a request is queued or the queue is closed.
    queued: Condvar,
    /// Mirror the committed counters for lock-free reads; updated before publishing.
    revision: AtomicI64,
    oldest: AtomicI64,
    commits: AtomicU64,
    writes: AtomicU64,
    hub: Hub,
    history: usize,
}

#[derive(Default)]
struct Queue {
    requests: VecDeque<Request>,
    /// Set when the store is dropped: the writer finishes what is queued, then exits.
    closed: bool,
}

/// A write waiting for the writer.
struct Request {
    work: Work,
    /// A compaction is answered with `Committed` at the current revision (etcd's response
    /// header), which `compact` discards.
    reply: oneshot::Sender<Result<TxnOutcome, StoreError>>,
}

enum Work {
    Txn(Txn),
    Compact(Revision),
}

/// One pass of a batch through a write transaction, not yet committed.
struct Pass {
    tx: WriteTransaction,
    /// The counters after the last request of the pass.
    meta: Meta,
    /// The outcome of every request applied in this pass, by index in the batch.
    outcomes: Vec<(usize, TxnOutcome)>,
    /// How many of them changed something.
    writes: u64,
    /// One per revision the pass created, in order.
    batches: Vec<Batch>,
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
        Self::with_database(db, path, options)
    }

    fn with_database(db: Database, path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let meta = init(&db, path)?;
        tracing::debug!(path = %path.display(), revision = meta.revision, oldest = meta.oldest, "opened store");
        let inner = Arc::new(Inner {
            db,
            path: path.to_owned(),
            meta: Mutex::new(meta),
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            revision: AtomicI64::new(meta.revision),
            oldest: AtomicI64::new(meta.oldest),
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            hub: Hub::new(options.watch_buffer),
            history: options.history,
        });
        let writer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("isthmus-store-writer".into())
                .spawn(move || inner.run_writer())
                .map_err(|e| StoreError::Io {
                    path: path.display().to_string(),
                    message: format!("cannot start the store's writer thread: {e}"),
                })?
        };
        Ok(Self {
            inner,
            writer: Some(writer),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many commits (fsyncs) the writes took so far, and how many writes they carried.
    pub fn write_stats(&self) -> WriteStats {
        WriteStats {
            commits: self.inner.commits.load(Ordering::SeqCst),
            writes: self.inner.writes.load(Ordering::SeqCst),
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // The writer answers everything already queued (a caller that gave up waiting may still
        // have a write in there), then exits. Joining it, at the cost of at most one commit,
        // closes the file before `drop` returns, so the path can be reopened at once.
        self.inner.lock_queue().closed = true;
        self.inner.queued.notify_all();
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(path = %self.inner.path.display(), "the store's writer thread panicked");
            }
        }
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

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it; the queue is well-formed whatever happened.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue `work` for the writer and wait for its answer: after the commit that carries it and
    /// after its events are published.
    async fn submit(&self, work: Work) -> Result<TxnOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        {
            let mut queue = self.lock_queue();
            if queue.closed {
                return Err(StoreError::Closed);
            }
            queue.requests.push_back(Request { work, reply });
        }
        self.queued.notify_one();
        // The writer answers every request it takes, so a dropped sender means it is gone.
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// The writer thread: one batch after another until the store is dropped.
    fn run_writer(&self) {
        while let Some(batch) = self.next_batch() {
            self.commit_batch(batch);
        }
    }

    /// Wait for at least one request, then take what is queued at that moment, within the
    /// bounds. Waiting for more would add latency to every lone write.
    fn next_batch(&self) -> Option<Vec<Request>> {
        let mut queue = self.lock_queue();
        while queue.requests.is_empty() {
            if queue.closed {
                return None;
            }
            queue = self
                .queued
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let mut batch = Vec::with_capacity(queue.requests.len().min(MAX_BATCH_REQUESTS));
        let mut bytes = 0;
        while batch.len() < MAX_BATCH_REQUESTS {
            let Some(next) = queue.requests.front() else {
                break;
            };
            let size = next.work.size();
            if !batch.is_empty() && bytes + size > MAX_BATCH_BYTES {
                break;
            }
            bytes += size;
            batch.extend(queue.requests.pop_front());
        }
        Some(batch)
    }

    /// Apply, commit and publish `batch`, then answer each of its callers.
    fn commit_batch(&self, batch: Vec<Request>) {
        let answers = match panic::catch_unwind(AssertUnwindSafe(|| self.apply_batch(&batch))) {
            Ok(answers) => answers,
            // A bug in the storage code. Our code after the commit cannot panic, so the redb
            // transaction was dropped uncommitted and the counters are still right: the store
            // keeps serving, and these callers get an error instead of an answer.
            Err(_) => {
                tracing::error!(path = %self.path.display(), requests = batch.len(), "the store's writer panicked; the batch was not committed");
                let err = StoreError::Io {
                    path: self.path.display().to_string(),
                    message: "internal error in the store's writer (see the log); the write was not committed".into(),
                };
                vec![Err(err); batch.len()]
            }
        };
        for (request, answer) in batch.into_iter().zip(answers) {
            // An error only means the caller stopped waiting.
            let _ = request.reply.send(answer);
        }
    }

    /// The answer to each request of `batch`, in order. Everything published was committed
    /// first; if the commit fails, every request that had no error of its own gets that one.
    fn apply_batch(&self, batch: &[Request]) -> Vec<Result<TxnOutcome, StoreError>> {
        // The guarded Meta only changes after a successful commit, so it is accurate even after
        // a panic.
        let mut committed = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        let mut answers: Vec<Option<Result<TxnOutcome, StoreError>>> =
            batch.iter().map(|_| None).collect();
        // Each pass that returns None has answered one more request, so this ends.
        let pass = loop {
            match self.pass(batch, &mut answers, *committed) {
                Ok(Some(pass)) => break Ok(pass),
                Ok(None) => {}
                Err(err) => break Err(err),
            }
        };
        match pass.and_then(|pass| self.finish(pass, &mut committed)) {
            Ok(outcomes) => {
                for (index, outcome) in outcomes {
                    answers[index] = Some(Ok(outcome));
                }
            }
            Err(err) => {
                for answer in answers.iter_mut().filter(|a| a.is_none()) {
                    *answer = Some(Err(err.clone()));
                }
            }
        }
        answers
            .into_iter()
            // Every request was answered above; Closed stands in for the impossible.
            .map(|answer| answer.unwrap_or(Err(StoreError::Closed)))
            .collect()
    }

    /// Apply every request of `batch` not answered yet, in order, in a new write transaction.
    /// A request failing on its own check is answered with its error and skipped. One failing
    /// on storage may have written part of itself: it is answered, the transaction aborted, and
    /// None tells the caller to run the batch again without it.
    fn pass(
        &self,
        batch: &[Request],
        answers: &mut [Option<Result<TxnOutcome, StoreError>>],
        committed: Meta,
    ) -> Result<Option<Pass>, StoreError> {
        let mut tx = self.db.begin_write().map_err(io(&self.path))?;
        tx.set_durability(Durability::Immediate);
        let mut meta = committed;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut batches = Vec::new();
        let mut writes = 0;
        {
            let mut tables = self.tables(&tx)?;
            for (index, request) in batch.iter().enumerate() {
                if answers[index].is_some() {
                    continue;
                }
                match request.work.apply(&mut tables, meta, self.history) {
                    Ok(applied) => {
                        if !applied.events.is_empty() {
                            batches.push(Batch {
                                revision: applied.meta.revision,
                                events: applied.events,
                            });
                        }
                        writes += u64::from(applied.meta != meta);
                        meta = applied.meta;
                        outcomes.push((index, applied.outcome));
                    }
                    Err(err) if engine::wrote_nothing(&err) => answers[index] = Some(Err(err)),
                    Err(err) => {
                        answers[index] = Some(Err(err));
                        drop(tables);
                        tx.abort().map_err(io(&self.path))?;
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some(Pass {
            tx,
            meta,
            outcomes,
            writes,
            batches,
        }))
    }

    /// Commit `pass` durably if it changed anything, then advance the counters and publish its
    /// revisions in order. Nothing moves if the commit fails.
    fn finish(
        &self,
        pass: Pass,
        committed: &mut Meta,
    ) -> Result<Vec<(usize, TxnOutcome)>, StoreError> {
        if pass.meta == *committed {
            // Only failed compares and no-ops, all read from committed state.
            pass.tx.abort().map_err(io(&self.path))?;
            return Ok(pass.outcomes);
        }
        pass.tx.commit().map_err(io(&self.path))?;
        *committed = pass.meta;
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.writes.fetch_add(pass.writes, Ordering::SeqCst);
        self.oldest.store(pass.meta.oldest, Ordering::SeqCst);
        self.revision.store(pass.meta.revision, Ordering::SeqCst);
        for batch in pass.batches {
            self.hub.publish(batch);
        }
        Ok(pass.outcomes)
    }

    /// Requests waiting for the writer, for tests that need a batch to form.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.lock_queue().requests.len()
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

impl Work {
    fn apply(
        &self,
        tables: &mut impl Tables,
        meta: Meta,
        history: usize,
    ) -> Result<Applied, StoreError> {
        match self {
            Work::Txn(txn) => engine::apply(tables, meta, txn, history),
            Work::Compact(revision) => {
                let meta = engine::compact(tables, meta, *revision)?;
                Ok(Applied {
                    outcome: TxnOutcome::Committed {
                        revision: meta.revision,
                    },
                    events: Vec::new(),
                    meta,
                })
            }
        }
    }

    /// Roughly what it adds to a commit, for the batch's byte budget.
    fn size(&self) -> usize {
        match self {
            Work::Txn(txn) => {
                let ops: usize = txn
                    .ops
                    .iter()
                    .map(|op| match op {
                        Op::Put { key, value } => key.len() + value.len(),
                        Op::Delete { key } => key.len(),
                    })
                    .sum();
                let compares: usize = txn
                    .compares
                    .iter()
                    .map(|crate::Compare::ModRevision { key, .. }| key.len())
                    .sum();
                ops + compares
            }
            Work::Compact(_) => 0,
        }
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
        self.inner.submit(Work::Txn(txn)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        hub::watch(&self.inner, prefix, from, self.oldest_revision())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.submit(Work::Compact(revision)).await.map(drop)
    }

    fn oldest_revision(&self) -> Revision {
        self.inner.oldest.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::time::{Duration, Instant};

    use futures::StreamExt;
    use redb::backends::FileBackend;
    use redb::StorageBackend;
    use tokio::sync::broadcast::error::TryRecvError;

    use super::*;
    use crate::{Compare, EventKind};

    /// The file as redb sees it, with an fsync that can be held back and made to fail.
    #[derive(Debug)]
    struct FaultyDisk {
        file: FileBackend,
        faults: Arc<Faults>,
    }

    #[derive(Debug, Default)]
    struct Faults {
        state: Mutex<FaultState>,
        changed: Condvar,
    }

    #[derive(Debug, Default)]
    struct FaultState {
        /// fsyncs wait while this is set.
        hold: bool,
        /// How many fsyncs are waiting.
        holding: usize,
        /// fsyncs that start while this is set fail (after waiting, if held).
        fail: bool,
    }

    impl Faults {
        fn set(&self, f: impl FnOnce(&mut FaultState)) {
            f(&mut self.state.lock().unwrap());
            self.changed.notify_all();
        }

        fn get<T>(&self, f: impl FnOnce(&FaultState) -> T) -> T {
            f(&self.state.lock().unwrap())
        }
    }

    impl StorageBackend for FaultyDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.file.len()
        }

        fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
            self.file.read(offset, len)
        }

        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.file.set_len(len)
        }

        fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
            let mut state = self.faults.state.lock().unwrap();
            let fail = state.fail;
            state.holding += 1;
            self.faults.changed.notify_all();
            while state.hold {
                state = self.faults.changed.wait(state).unwrap();
            }
            state.holding -= 1;
            drop(state);
            if fail {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            self.file.sync_data(eventual)
        }

        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.file.write(offset, data)
        }
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn kv(key: &str, value: &str, create: Revision, modified: Revision, version: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: create,
            mod_revision: modified,
            version,
        }
    }

    #[tokio::test]
    async fn one_commit_carries_a_batch_and_each_request_gets_its_own_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let store = RedbStore::open(&path, StoreOptions::default()).unwrap();
        let mut published = store.inner.hub.subscribe();
        let works = vec![
            Work::Txn(Txn::new().put("/a", "1")),
            // Sees the put above, from the same batch.
            Work::Txn(Txn::new().when(Compare::absent("/a")).put("/a", "x")),
            Work::Txn(
                Txn::new()
                    .when(Compare::mod_revision("/a", 1))
                    .put("/a", "2"),
            ),
            Work::Txn(Txn::new().put("/b", "1").delete("/b")),
            Work::Txn(Txn::new().delete("/absent")),
            Work::Compact(9),
            Work::Txn(Txn::new().put("/b", "1")),
            Work::Compact(2),
        ];
        let (batch, mut answers): (Vec<_>, Vec<_>) = works
            .into_iter()
            .map(|work| {
                let (reply, answer) = oneshot::channel();
                (Request { work, reply }, answer)
            })
            .unzip();
        store.inner.commit_batch(batch);
        let mut answers = answers.iter_mut().map(|a| a.try_recv().unwrap());

        let committed = |revision| TxnOutcome::Committed { revision };
        assert_eq!(answers.next().unwrap().unwrap(), committed(1));
        assert_eq!(
            answers.next().unwrap().unwrap(),
            TxnOutcome::Failed {
                index: 0,
                current: Some(kv("/a", "1", 1, 1, 1)),
            }
        );
        assert_eq!(answers.next().unwrap().unwrap(), committed(2));
        assert!(matches!(
            answers.next().unwrap(),
            Err(StoreError::Invalid(_))
        ));
        // A no-op reports the revision as of the batch so far.
        assert_eq!(answers.next().unwrap().unwrap(), committed(2));
        assert!(matches!(
            answers.next().unwrap(),
            Err(StoreError::FutureRevision {
                requested: 9,
                current: 2
            })
        ));
        assert_eq!(answers.next().unwrap().unwrap(), committed(3));
        assert_eq!(answers.next().unwrap().unwrap(), committed(3));

        // Three transactions and a compaction in one commit, published in revision order.
        assert_eq!(
            store.write_stats(),
            WriteStats {
                commits: 1,
                writes: 4
            }
        );
        for revision in 1..=3 {
            assert_eq!(published.try_recv().unwrap().revision, revision);
        }
        assert!(matches!(published.try_recv(), Err(TryRecvError::Empty)));
        assert_eq!((store.revision(), store.oldest_revision()), (3, 2));

        drop(store);
        let store = RedbStore::open(&path, StoreOptions::default()).unwrap();
        assert_eq!((store.revision(), store.oldest_revision()), (3, 2));
        let (kvs, _) = store.range("/").await.unwrap();
        assert_eq!(kvs, [kv("/a", "2", 1, 2, 2), kv("/b", "1", 3, 3, 1)]);
        let mut watch = store.watch("", 2).await.unwrap();
        let events = [watch.next().await, watch.next().await].map(|e| e.unwrap().unwrap());
        assert_eq!(
            events.map(|e| (e.kind, e.revision())),
            [(EventKind::Put, 2), (EventKind::Put, 3)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_acknowledges_none_of_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let faults = Arc::new(Faults::default());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        let disk = FaultyDisk {
            file: FileBackend::new(file).unwrap(),
            faults: faults.clone(),
        };
        let db = Database::builder().create_with_backend(disk).unwrap();
        let store = Arc::new(RedbStore::with_database(db, &path, StoreOptions::default()).unwrap());
        let mut published = store.inner.hub.subscribe();

        // The first write holds the writer in its fsync while four more queue up behind it: they
        // form the next batch, whose fsync fails.
        faults.set(|f| f.hold = true);
        let first = tokio::spawn({
            let store = store.clone();
            async move { store.put("/t/0", vec![]).await }
        });
        wait_until("the first commit fsyncs", || faults.get(|f| f.holding == 1)).await;
        faults.set(|f| f.fail = true);
        let rest: Vec<_> = (1..=4)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.put(&format!("/t/{i}"), vec![]).await })
            })
            .collect();
        wait_until("four writes are queued", || store.inner.queued() == 4).await;
        faults.set(|f| f.hold = false);

        assert_eq!(first.await.unwrap().unwrap(), 1);
        for write in rest {
            let err = write.await.unwrap().unwrap_err();
            assert!(matches!(&err, StoreError::Io { .. }), "{err}");
        }
        assert_eq!(published.try_recv().unwrap().revision, 1);
        assert!(matches!(published.try_recv(), Err(TryRecvError::Empty)));
        assert_eq!(store.revision(), 1);
        assert_eq!(
            store.write_stats(),
            WriteStats {
                commits: 1,
                writes: 1
            }
        );

        // After a failed fsync nobody knows what the disk holds; redb refuses further writes
        // until the file is reopened, and the counters stay put.
        faults.set(|f| f.fail = false);
        assert!(store.put("/t/5", vec![]).await.is_err());
        assert_eq!(store.revision(), 1);
        assert!(matches!(published.try_recv(), Err(TryRecvError::Empty)));

        drop(Arc::into_inner(store).unwrap());
        let store = RedbStore::open(&path, StoreOptions::default()).unwrap();
        let (kvs, revision) = store.range("/t/").await.unwrap();
        let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        // The unacknowledged batch may have reached the disk (here its writes did, only the fsync
        // failed), but only as a whole.
        match revision {
            1 => assert_eq!(keys, ["/t/0"]),
            5 => assert_eq!(keys, ["/t/0", "/t/1", "/t/2", "/t/3", "/t/4"]),
            other => panic!("revision {other} after reopen: {keys:?}"),
        }
    }
}
