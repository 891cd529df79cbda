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
//!
//! A full disk (or any I/O error) costs writes only. redb refuses every read and write after an
//! I/O error until the file is reopened, so the writer reopens it at once: the file holds only
//! fsynced commits, so nothing acknowledged is lost, and reads go on from it. The store then
//! reports the failure through [`Store::health`] until a write succeeds; while it fails, the
//! writer probes every [`PROBE_INTERVAL`] with a commit of a scratch row in `meta` (no revision,
//! no event), so health comes back when space does, without waiting for client traffic.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    ErrorCount, Event, Health, KeyValue, Op, Revision, Store, StoreError, StoreOptions, Txn,
    TxnOutcome, WatchStream,
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
/// The scratch row the writer commits to find out whether the disk takes writes again.
const META_PROBE: &str = "probe";
/// Bump with a migration when the row encoding in `codec` changes.
const FORMAT: i64 = 1;

/// While writes fail, how often the writer tries a commit of its own to see whether they would
/// succeed again (readiness then comes back without client traffic).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// At most one log line per this interval about storage failing on, beyond the first.
const LOG_INTERVAL: Duration = Duration::from_secs(30);

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
    /// `None` only while a reopen after a failed write has not succeeded. Readers hold the read
    /// lock for one read; the writer takes the write lock to reopen.
    db: RwLock<Option<Database>>,
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
    cache_bytes: usize,
    health: Mutex<HealthState>,
}

/// What [`Store::health`] reports, and when the failure was last logged.
#[derive(Default)]
struct HealthState {
    write_failure: Option<StoreError>,
    /// Why the last reopen failed, while the file is closed.
    reopen_failure: Option<StoreError>,
    /// Failed writes since the last success.
    failed_writes: u64,
    logged: Option<Instant>,
    errors: BTreeMap<(&'static str, &'static str), u64>,
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

/// What the writer does next.
enum Next {
    Batch(Vec<Request>),
    Probe,
    Closed,
}

/// The open database, for as long as a read (or a transaction's start) needs it.
struct DbGuard<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for DbGuard<'_> {
    type Target = Database;

    fn deref(&self) -> &Database {
        // `Inner::db` hands one out only when the slot holds a database.
        self.0.as_ref().unwrap_or_else(|| unreachable!())
    }
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
            .set_cache_size(options.cache_bytes)
            .create(path)
            .map_err(|e| open_error(path, e.into()))?;
        Self::with_database(db, path, options)
    }

    fn with_database(db: Database, path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let meta = init(&db, path)?;
        tracing::debug!(path = %path.display(), revision = meta.revision, oldest = meta.oldest, "opened store");
        let inner = Arc::new(Inner {
            db: RwLock::new(Some(db)),
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
            cache_bytes: options.cache_bytes,
            health: Mutex::default(),
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
        redb::Error::Io(e) if is_disk_full(&e) => StoreError::DiskFull {
            path: path_s,
            cause: e.to_string(),
        },
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

fn is_disk_full(err: &std::io::Error) -> bool {
    // ENOSPC and EDQUOT (Linux numbering; both mean "free space or raise the quota").
    err.kind() == ErrorKind::StorageFull || matches!(err.raw_os_error(), Some(28 | 122))
}

/// The counters as committed in `db`, read without writing (the disk may be full).
fn read_counters(db: &Database, path: &Path) -> Result<Meta, StoreError> {
    let tx = db.begin_read().map_err(io(path))?;
    let table = tx.open_table(META).map_err(io(path))?;
    read_meta(&table).map_err(io(path))
}

/// The log's batches in `after+1..=upto`.
fn read_batches(
    db: &Database,
    path: &Path,
    after: Revision,
    upto: Revision,
) -> Result<Vec<Batch>, StoreError> {
    let tx = db.begin_read().map_err(io(path))?;
    let log = tx.open_table(LOG).map_err(io(path))?;
    let mut batches = Vec::new();
    for row in log.range(after + 1..=upto).map_err(io(path))? {
        let (revision, events) = row.map_err(io(path))?;
        batches.push(Batch {
            revision: revision.value(),
            events: codec::decode_events(events.value()).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                message: e.to_string(),
            })?,
        });
    }
    Ok(batches)
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

    /// The writer thread: one batch after another until the store is dropped; while writes
    /// fail and nothing is queued, a probe every `PROBE_INTERVAL`.
    fn run_writer(&self) {
        loop {
            match self.next_batch() {
                Next::Batch(batch) => self.commit_batch(batch),
                Next::Probe => self.probe(),
                Next::Closed => return,
            }
        }
    }

    /// Wait for at least one request, then take what is queued at that moment, within the
    /// bounds. Waiting for more would add latency to every lone write.
    fn next_batch(&self) -> Next {
        let mut queue = self.lock_queue();
        while queue.requests.is_empty() {
            if queue.closed {
                return Next::Closed;
            }
            if !self.failing() {
                queue = self
                    .queued
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let (q, timeout) = self
                .queued
                .wait_timeout(queue, PROBE_INTERVAL)
                .unwrap_or_else(PoisonError::into_inner);
            queue = q;
            if timeout.timed_out() && queue.requests.is_empty() && !queue.closed {
                return Next::Probe;
            }
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
        Next::Batch(batch)
    }

    fn failing(&self) -> bool {
        self.lock_health().write_failure.is_some()
    }

    fn lock_health(&self) -> MutexGuard<'_, HealthState> {
        // Only counters and flags: well-formed whatever a panicking holder left.
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, op: &'static str, err: &StoreError) {
        if err.is_storage() {
            *self
                .lock_health()
                .errors
                .entry((op, err.kind()))
                .or_default() += 1;
        }
    }

    /// The database, for one read (or a write transaction of the writer). Fails with why the
    /// file is closed if a reopen did not succeed yet.
    fn db(&self) -> Result<DbGuard<'_>, StoreError> {
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        if guard.is_some() {
            return Ok(DbGuard(guard));
        }
        drop(guard);
        let health = self.lock_health();
        Err(health
            .reopen_failure
            .clone()
            .unwrap_or_else(|| StoreError::Unavailable {
                path: self.path.display().to_string(),
                message: "the file is being reopened".into(),
            }))
    }

    /// A write failed on storage: report it (logged at once the first time, then at most every
    /// `LOG_INTERVAL`) and reopen the file, which redb requires after an I/O error.
    fn write_failed(&self, err: &StoreError, committed: &mut Meta) {
        {
            let mut health = self.lock_health();
            let first = health.write_failure.is_none();
            health.failed_writes += 1;
            health.write_failure = Some(err.clone());
            let now = Instant::now();
            if first || health.logged.is_none_or(|t| now - t >= LOG_INTERVAL) {
                health.logged = Some(now);
                let failed = health.failed_writes;
                drop(health);
                if first {
                    tracing::error!(path = %self.path.display(), error = %err, "writes to the registry store fail; reads go on");
                } else {
                    tracing::error!(path = %self.path.display(), error = %err, failed_writes = failed, "writes to the registry store still fail");
                }
            }
        }
        // A failed compare or a bad request leaves redb usable; anything that reached the disk
        // may not have.
        if matches!(err, StoreError::Io { .. } | StoreError::DiskFull { .. }) {
            self.reopen(committed);
        }
    }

    /// A write committed: writes work again.
    fn write_succeeded(&self) {
        let mut health = self.lock_health();
        if health.write_failure.take().is_some() {
            let failed = std::mem::take(&mut health.failed_writes);
            health.logged = None;
            drop(health);
            tracing::info!(path = %self.path.display(), failed_writes = failed, "writes to the registry store succeed again");
        }
    }

    /// Close and reopen the file. The reopened file holds every acknowledged commit and maybe
    /// the batch whose commit failed (its data may have reached the disk): its events are
    /// published then, so that watchers see exactly what the file holds. On failure the file
    /// stays closed, reads and writes fail with why, and the next write or probe tries again.
    fn reopen(&self, committed: &mut Meta) {
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // Close first: redb locks the file, so a second handle could not open it.
        drop(slot.take());
        let opened = Database::builder()
            .set_cache_size(self.cache_bytes)
            .create(&self.path)
            .map_err(|e| open_error(&self.path, e.into()))
            .and_then(|db| {
                let meta = read_counters(&db, &self.path)?;
                let missed = if meta.revision > committed.revision {
                    read_batches(&db, &self.path, committed.revision, meta.revision)?
                } else {
                    Vec::new()
                };
                Ok((db, meta, missed))
            });
        match opened {
            Ok((db, meta, missed)) => {
                *slot = Some(db);
                drop(slot);
                if meta.revision < committed.revision {
                    // Acknowledged commits were fsynced: a filesystem that loses them lies.
                    tracing::error!(path = %self.path.display(), acknowledged = committed.revision, on_disk = meta.revision, "the reopened registry store lacks acknowledged writes");
                } else if !missed.is_empty() {
                    tracing::warn!(path = %self.path.display(), revision = meta.revision, "a write reported failed reached the disk after all");
                }
                *committed = meta;
                self.oldest.store(meta.oldest, Ordering::SeqCst);
                self.revision.store(meta.revision, Ordering::SeqCst);
                for batch in missed {
                    self.hub.publish(batch);
                }
                self.lock_health().reopen_failure = None;
                tracing::debug!(path = %self.path.display(), revision = meta.revision, "reopened the registry store");
            }
            Err(err) => {
                drop(slot);
                self.count("reopen", &err);
                let err = StoreError::Unavailable {
                    path: self.path.display().to_string(),
                    message: err.to_string(),
                };
                tracing::error!(path = %self.path.display(), error = %err, "cannot reopen the registry store; retrying");
                self.lock_health().reopen_failure = Some(err);
            }
        }
    }

    /// Reopens the file if an earlier I/O error left it closed.
    fn reopen_if_closed(&self, committed: &mut Meta) {
        if self
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
        {
            self.reopen(committed);
        }
    }

    /// While writes fail and nobody writes: reopen if needed and commit the scratch row, which
    /// tells whether the disk takes writes again.
    fn probe(&self) {
        let mut committed = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        self.reopen_if_closed(&mut committed);
        let result = self.db().and_then(|db| {
            let mut tx = db.begin_write().map_err(io(&self.path))?;
            tx.set_durability(Durability::Immediate);
            {
                let mut meta = tx.open_table(META).map_err(io(&self.path))?;
                let n = meta
                    .get(META_PROBE)
                    .map_err(io(&self.path))?
                    .map_or(0, |v| v.value());
                meta.insert(META_PROBE, n.wrapping_add(1))
                    .map_err(io(&self.path))?;
            }
            tx.commit().map_err(io(&self.path))
        });
        match result {
            Ok(()) => self.write_succeeded(),
            Err(err) => {
                self.count("probe", &err);
                self.write_failed(&err, &mut committed);
            }
        }
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
        // The guarded Meta only changes after a successful commit (or a reopen), so it is
        // accurate even after a panic.
        let mut committed = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        self.reopen_if_closed(&mut committed);
        let commits_before = self.commits.load(Ordering::SeqCst);
        let answers = self.apply_batch_locked(batch, &mut committed);
        let mut storage_error = None;
        for err in answers.iter().filter_map(|a| a.as_ref().err()) {
            self.count("write", err);
            if err.is_storage() {
                storage_error = Some(err);
            }
        }
        match storage_error {
            Some(err) => self.write_failed(err, &mut committed),
            None if self.commits.load(Ordering::SeqCst) > commits_before => self.write_succeeded(),
            None => {}
        }
        answers
    }

    fn apply_batch_locked(
        &self,
        batch: &[Request],
        committed: &mut Meta,
    ) -> Vec<Result<TxnOutcome, StoreError>> {
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
        match pass.and_then(|pass| self.finish(pass, committed)) {
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
        let mut tx = self.db()?.begin_write().map_err(io(&self.path))?;
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
        let result = self.get_uncounted(key);
        if let Err(err) = &result {
            self.count("read", err);
        }
        result
    }

    fn get_uncounted(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        // Held until the read ends, so a reopen waits for it (redb's file lock outlives the
        // `Database` while a transaction is open).
        let db = self.db()?;
        let tx = db.begin_read().map_err(io(&self.path))?;
        let table = tx.open_table(KV).map_err(io(&self.path))?;
        let row = table.get(key).map_err(io(&self.path))?;
        row.map(|v| codec::decode_row(key, v.value()))
            .transpose()
            .map_err(|e| self.corrupt(e))
    }

    fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let result = self.range_uncounted(prefix);
        if let Err(err) = &result {
            self.count("read", err);
        }
        result
    }

    fn range_uncounted(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        // Held until the read ends, so a reopen waits for it (redb's file lock outlives the
        // `Database` while a transaction is open).
        let db = self.db()?;
        let tx = db.begin_read().map_err(io(&self.path))?;
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

impl Inner {
    fn read_log_uncounted(
        &self,
        after: Revision,
        upto: Revision,
    ) -> Result<Vec<Batch>, StoreError> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(io(&self.path))?;
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
                    .map(|c| match c {
                        crate::Compare::ModRevision { key, .. } => key.len(),
                        crate::Compare::PrefixEmpty { prefix } => prefix.len(),
                    })
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

    fn first_under(&self, prefix: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut rows = self.kv.range(prefix..).map_err(io(self.path))?;
        let Some(row) = rows.next() else {
            return Ok(None);
        };
        let (k, v) = row.map_err(io(self.path))?;
        if !k.value().starts_with(prefix) {
            return Ok(None);
        }
        codec::decode_row(k.value(), v.value())
            .map(Some)
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
        let result = self.read_log_uncounted(after, upto);
        if let Err(err) = &result {
            self.count("read", err);
        }
        result
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

    fn health(&self) -> Health {
        let health = self.inner.lock_health();
        Health {
            write_failure: health.write_failure.clone(),
            errors: health
                .errors
                .iter()
                .map(|(&(op, kind), &count)| ErrorCount { op, kind, count })
                .collect(),
        }
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

    /// A store on the real file at `path` whose writes and syncs fail when `Faults` says so.
    fn faulty_store(path: &Path) -> (RedbStore, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        let disk = FaultyDisk {
            file: FileBackend::new(file).unwrap(),
            faults: faults.clone(),
        };
        let db = Database::builder().create_with_backend(disk).unwrap();
        let store = RedbStore::with_database(db, path, StoreOptions::default()).unwrap();
        (store, faults)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_acknowledges_none_of_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let (store, faults) = faulty_store(&path);
        let store = Arc::new(store);
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
        assert_eq!(
            store.write_stats(),
            WriteStats {
                commits: 1,
                writes: 1
            }
        );
        assert!(store.health().write_failure.is_some());

        // After a failed fsync nobody knows what the disk holds, and redb refuses everything
        // until the file is reopened; the store did that at once. The reopened file may hold the
        // unacknowledged batch (here its writes did land, only the fsync failed), but only as a
        // whole, and then its revisions are published like any other: watchers see what the
        // file holds, each revision once.
        let revision = store.revision();
        let published: Vec<_> = std::iter::from_fn(|| published.try_recv().ok())
            .map(|b| b.revision)
            .collect();
        let (kvs, read_at) = store.range("/t/").await.unwrap();
        let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(read_at, revision);
        match revision {
            1 => assert_eq!(keys, ["/t/0"]),
            5 => assert_eq!(keys, ["/t/0", "/t/1", "/t/2", "/t/3", "/t/4"]),
            other => panic!("revision {other} after reopen: {keys:?}"),
        }
        assert_eq!(published, (1..=revision).collect::<Vec<_>>());

        // The next write goes through on the reopened file, and health clears.
        assert_eq!(store.put("/t/5", vec![]).await.unwrap(), revision + 1);
        assert!(store.health().write_failure.is_none());
        let errors = store.health().errors;
        assert!(
            errors
                .iter()
                .any(|e| (e.op, e.kind) == ("write", "io") && e.count == 4),
            "{errors:?}"
        );

        drop(Arc::into_inner(store).unwrap());
        let store = RedbStore::open(&path, StoreOptions::default()).unwrap();
        let (kvs, _) = store.range("/t/").await.unwrap();
        assert_eq!(kvs.len() as i64, revision + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_that_cannot_be_reopened_says_why_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let (store, faults) = faulty_store(&path);
        store.put("/a", b"1".to_vec()).await.unwrap();

        // The write fails, and the reopen that follows finds a directory where the file was.
        faults.set(|f| f.fail = true);
        let moved = dir.path().join("moved.redb");
        std::fs::rename(&path, &moved).unwrap();
        std::fs::create_dir(&path).unwrap();
        let err = store.put("/b", b"2".to_vec()).await.unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        let err = store.get("/a").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("could not be reopened") && message.contains("directory"),
            "{message}"
        );
        let health = store.health();
        assert!(health.write_failure.is_some());
        assert!(health.errors.iter().any(|e| e.op == "reopen"), "{health:?}");

        // Once the file is back, the next write reopens it and goes through.
        std::fs::remove_dir(&path).unwrap();
        std::fs::rename(&moved, &path).unwrap();
        let revision = store.put("/c", b"3".to_vec()).await.unwrap();
        assert_eq!(revision, store.revision());
        assert!(store.health().write_failure.is_none());
        assert_eq!(store.get("/a").await.unwrap().unwrap().value, b"1");
        assert_eq!(
            store.get("/c").await.unwrap().unwrap().mod_revision,
            revision
        );
    }
}
