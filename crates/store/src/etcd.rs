//! The store on etcd v3, so that several control-plane replicas share one registry.
//!
//! The trait was shaped after etcd, so the mapping is one to one: store key `K` is etcd key
//! `<prefix>K`; etcd's revisions, `mod_revision`s and `version`s pass through unchanged; a `Txn`
//! is an etcd `Txn` whose else-branch reads every compared key at the same revision, so a failed
//! transaction names its first failing compare exactly as the embedded engine does; a watch is an
//! etcd watch with previous values, re-created from the last delivered revision when its member
//! goes away. Differences the layers above must allow for:
//! - revisions are global to the etcd cluster (other prefixes move them too), so they increase
//!   but are not contiguous, and a fresh store does not start at 0;
//! - compaction is etcd's (`--auto-compaction-*`): a replica never compacts another mesh's
//!   history, and `StoreOptions::history` does not apply.
//!
//! Every request carries etcd's `hasleader` metadata: a member without a leader refuses before
//! proposing anything, so such a refusal is safely retried (within the request timeout) and is
//! never reported as "may have been applied".

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_stream::stream;
use async_trait::async_trait;
use etcd_client as ec;
use tokio::sync::watch;

use crate::{
    Compare, ErrorCount, EtcdCause, Event, EventKind, Health, KeyValue, LeaseId, Op, Revision,
    Store, StoreError, Txn, TxnOutcome, WatchStream,
};

/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// While writes fail, how often a read checks whether etcd is back.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long `watch` waits after etcd created a watch for a compaction notice.
const COMPACTION_NOTICE: Duration = Duration::from_millis(200);

/// Client TLS towards etcd: the CA that signed etcd's certificates, and optionally this client's
/// certificate and key (etcd's `--client-cert-auth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port`, all of one scheme.
    pub endpoints: Vec<String>,
    /// Every key lives under it, so several meshes can share one etcd. Starts with `/`, no
    /// trailing `/`.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// How long one request may take before it fails (and, for a write, is reported as
    /// possibly applied).
    pub request_timeout: Duration,
    /// etcd's `--max-txn-ops`: larger transactions are refused before they are sent.
    pub max_txn_ops: usize,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: prefix.into(),
            tls: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
        }
    }
}

pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Requests that need a leader (every write and linearizable read, every watch).
    client: ec::Client,
    /// Serializable reads, answered by any member from its own state even without a leader.
    lenient: ec::Client,
    prefix: String,
    endpoints: String,
    timeout: Duration,
    max_txn_ops: usize,
    /// The highest revision any etcd response carried.
    revision: AtomicI64,
    /// The lowest revision known to be still watchable.
    oldest: AtomicI64,
    write_failure: Mutex<Option<StoreError>>,
    errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Dropped with the store: ends every watch stream.
    _closed: watch::Sender<()>,
    closed: watch::Receiver<()>,
}

impl EtcdStore {
    /// Connects and reads the current revision, so a wrong endpoint or credential fails here,
    /// with a message naming etcd, rather than at the first request.
    pub async fn open(options: EtcdOptions) -> Result<Self, StoreError> {
        let endpoints = options.endpoints.join(",");
        let invalid = |m: String| StoreError::Invalid(m);
        if options.endpoints.is_empty() {
            return Err(invalid("no etcd endpoints given (--etcd-endpoints)".into()));
        }
        if !options.prefix.starts_with('/') || options.prefix.ends_with('/') {
            return Err(invalid(format!(
                "the etcd prefix {:?} must start with / and not end with / (e.g. /isthmus)",
                options.prefix
            )));
        }
        let mut connect = ec::ConnectOptions::new()
            .with_timeout(options.request_timeout)
            .with_connect_timeout(options.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &options.tls {
            connect = connect.with_tls(tls_options(tls)?);
        }
        let unreachable = |e: ec::Error| {
            StoreError::Etcd {
            cause: EtcdCause::Unreachable,
            endpoints: endpoints.clone(),
            message: format!(
                "cannot reach etcd at {endpoints} ({e}): is etcd running, and --etcd-endpoints right?"
            ),
            outcome_unknown: false,
        }
        };
        let client = ec::Client::connect(
            &options.endpoints,
            Some(connect.clone().with_require_leader(true)),
        )
        .await
        .map_err(unreachable)?;
        let lenient = ec::Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(unreachable)?;
        let (closed_tx, closed) = watch::channel(());
        let inner = Arc::new(Inner {
            client,
            lenient,
            prefix: options.prefix,
            endpoints,
            timeout: options.request_timeout,
            max_txn_ops: options.max_txn_ops,
            revision: AtomicI64::new(0),
            oldest: AtomicI64::new(1),
            write_failure: Mutex::new(None),
            errors: Mutex::new(BTreeMap::new()),
            _closed: closed_tx,
            closed,
        });
        inner.current_revision().await?;
        spawn_probe(Arc::downgrade(&inner));
        Ok(Self { inner })
    }
}

fn tls_options(tls: &EtcdTls) -> Result<ec::TlsOptions, StoreError> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).map_err(|e| {
            StoreError::Invalid(format!(
                "cannot read the etcd {what} {}: {e}",
                path.display()
            ))
        })
    };
    let mut options =
        ec::TlsOptions::new().ca_certificate(ec::Certificate::from_pem(read(&tls.ca, "CA")?));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            options = options.identity(ec::Identity::from_pem(
                read(cert, "client certificate")?,
                read(key, "client key")?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Invalid(
                "--etcd-cert and --etcd-key go together".into(),
            ))
        }
    }
    Ok(options)
}

/// While writes fail, a linearizable read every few seconds tells when etcd is back, so
/// readiness recovers without waiting for a client's write.
fn spawn_probe(inner: Weak<Inner>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let Some(inner) = inner.upgrade() else { return };
            let failing = inner
                .write_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some();
            if failing && inner.current_revision().await.is_ok() {
                inner.set_failure(None);
            }
        }
    });
}

impl Inner {
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn strip(&self, key: &[u8]) -> Result<String, StoreError> {
        let key = std::str::from_utf8(key)
            .map_err(|_| StoreError::Invalid("etcd returned a key that is not UTF-8".into()))?;
        Ok(key.strip_prefix(&self.prefix).unwrap_or(key).to_string())
    }

    fn kv(&self, kv: &ec::KeyValue) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
        })
    }

    fn saw(&self, header: Option<&ec::ResponseHeader>) -> Revision {
        let revision = header.map_or(0, |h| h.revision());
        self.revision.fetch_max(revision, Ordering::SeqCst);
        revision
    }

    fn set_failure(&self, failure: Option<StoreError>) {
        *self
            .write_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = failure;
    }

    fn count(&self, op: &'static str, err: &StoreError) {
        *self
            .errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((op, err.kind()))
            .or_default() += 1;
    }

    /// The cluster's current revision, by a linearizable read.
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let key = self.key("/");
        let resp = self
            .retrying("read", || {
                let mut kv = self.client.kv_client();
                let key = key.clone();
                async move {
                    kv.get(key, Some(ec::GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await?;
        Ok(self.saw(resp.header()))
    }

    /// A linearizable read that is refused, and asked again, when it answers from a revision
    /// older than one this store had already seen when the read was sent. A correct
    /// linearizable read can never do that; etcd up to 3.4.41 / 3.5.27 / 3.6.8 can, when the
    /// leader changes while a member waits for its read index (etcd-io/etcd#20418, "Stale reads
    /// caused by process pausing", fixed in the releases of March 2026, not in Debian's 3.4.23).
    /// This catches the stale reads this replica can prove stale: those older than its own
    /// writes, reads and watch events. Retried within the request timeout, then refused as
    /// unavailable; counted as `stale_read` in the store's error metric.
    async fn read_fresh<F, Fut>(&self, request: F) -> Result<ec::GetResponse, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<ec::GetResponse, ec::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            let floor = self.revision.load(Ordering::SeqCst);
            let resp = self.retrying("read", &request).await?;
            let at = resp.header().map_or(0, |h| h.revision());
            if !stale_read(floor, at) {
                self.saw(resp.header());
                return Ok(resp);
            }
            let err = StoreError::Etcd {
                cause: EtcdCause::Stale,
                endpoints: self.endpoints.clone(),
                message: format!(
                    "etcd answered a linearizable read from revision {at}, older than revision {floor} this replica had already seen (etcd-io/etcd#20418, fixed in etcd 3.4.42, 3.5.28 and 3.6.9); upgrade etcd"
                ),
                outcome_unknown: false,
            };
            self.count("read", &err);
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(err);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Runs `request`, retrying for as long as the request timeout allows when etcd cannot
    /// have applied it (no leader; no connection), and maps the final error.
    async fn retrying<T, F, Fut>(&self, op: &'static str, request: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ec::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let err = match request().await {
                Ok(v) => return Ok(v),
                Err(e) if op == "write" && !never_sent(&e) => {
                    // The connection failed after the write went out: etcd may have committed
                    // it. Retrying could apply it twice, or report a delete that happened as
                    // "not found"; the caller must look before trying again (etcd's own client
                    // retries a write only when no connection was there to send it on).
                    // A connection that failed, or an answer that is not one of etcd's
                    // (tonic's "transport error" when the HTTP/2 connection breaks mid-call),
                    // says nothing of the write; etcd's own refusals (quota, size, auth) do.
                    let err = match self.error(e) {
                        StoreError::Etcd {
                            cause: EtcdCause::Unreachable | EtcdCause::Other,
                            message,
                            ..
                        } => StoreError::Etcd {
                            cause: EtcdCause::Timeout,
                            endpoints: self.endpoints.clone(),
                            message: format!(
                                "{message}; the connection failed after the write was sent, so it may have been applied; check before retrying"
                            ),
                            outcome_unknown: true,
                        },
                        other => other,
                    };
                    self.count(op, &err);
                    if err.is_storage() {
                        self.set_failure(Some(err.clone()));
                    }
                    return Err(err);
                }
                Err(e) => self.error(e),
            };
            let safe = matches!(
                &err,
                StoreError::Etcd {
                    cause: EtcdCause::NoLeader | EtcdCause::Unreachable,
                    outcome_unknown: false,
                    ..
                }
            );
            if !safe || tokio::time::Instant::now() + pause >= deadline {
                self.count(op, &err);
                // A read that fails for availability means writes fail too (both need a
                // quorum): readiness says so.
                if err.is_storage() {
                    self.set_failure(Some(err.clone()));
                }
                return Err(err);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// etcd's errors, by the messages of `api/v3rpc/rpctypes`, into ones that name etcd and say
    /// what to do.
    fn error(&self, err: ec::Error) -> StoreError {
        let endpoints = self.endpoints.clone();
        let etcd = |cause, message: String, outcome_unknown| StoreError::Etcd {
            cause,
            endpoints: endpoints.clone(),
            message,
            outcome_unknown,
        };
        let status = match err {
            ec::Error::GRpcStatus(s) => s,
            ec::Error::TransportError(e) => {
                return etcd(
                    EtcdCause::Unreachable,
                    format!(
                    "cannot reach etcd at {} ({e}): is etcd running, and --etcd-endpoints right?",
                    self.endpoints
                ),
                    false,
                )
            }
            other => {
                return etcd(
                    EtcdCause::Other,
                    format!("etcd at {} failed: {other}", self.endpoints),
                    false,
                )
            }
        };
        let m = status.message();
        let code = status.code();
        if m.contains("no leader") {
            etcd(
                EtcdCause::NoLeader,
                "etcd has no leader (quorum lost?): writes are refused until a majority of its members is back; discovery, DNS and certificate renewal keep going on this replica's last view".into(),
                false,
            )
        } else if m.contains("required revision has been compacted") {
            StoreError::Compacted {
                requested: 0,
                oldest: self.oldest.load(Ordering::SeqCst),
            }
        } else if m.contains("future revision") {
            StoreError::FutureRevision {
                requested: 0,
                current: self.revision.load(Ordering::SeqCst),
            }
        } else if m.contains("too many requests") {
            etcd(
                EtcdCause::Overloaded,
                "etcd is shedding load (too many requests): retry shortly".into(),
                false,
            )
        } else if m.contains("database space exceeded") {
            etcd(
                EtcdCause::SpaceExceeded,
                "etcd is over its storage quota (NOSPACE alarm): compact and defragment etcd, then `etcdctl alarm disarm`; reads keep working".into(),
                false,
            )
        } else if m.contains("too many operations") || m.contains("request is too large") {
            etcd(
                EtcdCause::TooLarge,
                format!("etcd refused the request as too large ({m}): split it, or raise etcd's --max-txn-ops / --max-request-bytes"),
                false,
            )
        } else if code == tonic::Code::Unauthenticated || code == tonic::Code::PermissionDenied {
            etcd(
                EtcdCause::Denied,
                format!("etcd refused isthmus's credentials ({m}): grant the client certificate's user read-write on the prefix {}", self.prefix),
                false,
            )
        } else if m.contains("request timed out")
            || m.contains("leader changed")
            || m.contains("Timeout expired")
            || code == tonic::Code::DeadlineExceeded
            || code == tonic::Code::Cancelled
        {
            etcd(
                EtcdCause::Timeout,
                format!("etcd did not confirm within {:?} ({m}): is a majority of its members up? A write may have been applied; check before retrying", self.timeout),
                true,
            )
        } else if code == tonic::Code::Unavailable {
            etcd(
                EtcdCause::Unreachable,
                format!(
                    "cannot reach etcd at {} ({m}): is etcd running, and --etcd-endpoints right?",
                    self.endpoints
                ),
                false,
            )
        } else {
            etcd(
                EtcdCause::Other,
                format!("etcd at {} failed: {m}", self.endpoints),
                false,
            )
        }
    }

    /// An etcd watch on `prefix` from `start`, once etcd has created it. A start revision
    /// compacted away fails here with `Compacted`, as the embedded store's watch does; other
    /// early responses (history already flowing) are handed back to be delivered first.
    async fn open_watch(
        &self,
        prefix: &str,
        start: Revision,
    ) -> Result<(ec::WatchStream, Option<ec::WatchResponse>), StoreError> {
        let options = ec::WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_progress_notify()
            .with_start_revision(start);
        let mut stream = self
            .client
            .watch_client()
            .watch(self.key(prefix), Some(options))
            .await
            .map_err(|e| self.error(e))?;
        {
            let Some(resp) = stream.message().await.map_err(|e| self.error(e))? else {
                return Err(self.error(ec::Error::WatchError(
                    "etcd closed the watch as it was created".into(),
                )));
            };
            if resp.compact_revision() > 0 {
                self.oldest
                    .fetch_max(resp.compact_revision(), Ordering::SeqCst);
                return Err(StoreError::Compacted {
                    requested: start,
                    oldest: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                return Err(self.error(ec::Error::WatchError(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                ))));
            }
            if !resp.created() {
                return Ok((stream, Some(resp)));
            }
            // etcd follows a created watch at once with its compaction notice, if any.
            match tokio::time::timeout(COMPACTION_NOTICE, stream.message()).await {
                Err(_) => Ok((stream, None)),
                Ok(Ok(Some(next))) if next.compact_revision() > 0 => {
                    self.oldest
                        .fetch_max(next.compact_revision(), Ordering::SeqCst);
                    Err(StoreError::Compacted {
                        requested: start,
                        oldest: next.compact_revision(),
                    })
                }
                Ok(Ok(next)) => Ok((stream, next)),
                Ok(Err(e)) => Err(self.error(e)),
            }
        }
    }

    fn events(&self, resp: &ec::WatchResponse) -> Result<Vec<Event>, StoreError> {
        self.saw(resp.header());
        resp.events()
            .iter()
            .filter_map(|e| {
                let kv = e.kv()?;
                Some((e, kv))
            })
            .map(|(e, kv)| {
                let kind = match e.event_type() {
                    ec::EventType::Put => EventKind::Put,
                    ec::EventType::Delete => EventKind::Delete,
                };
                Ok(Event {
                    kind,
                    kv: self.kv(kv)?,
                    prev: e.prev_kv().map(|p| self.kv(p)).transpose()?,
                })
            })
            .collect()
    }
}

/// Whether a linearizable read answered at revision `at` is provably stale: it is older than a
/// revision already seen (`floor`) before it was sent.
fn stale_read(floor: Revision, at: Revision) -> bool {
    at < floor
}

fn check_txn(txn: &Txn, max: usize) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::new();
    for op in &txn.ops {
        let (Op::Put { key, .. } | Op::Delete { key }) = op;
        if !seen.insert(key.as_str()) {
            return Err(StoreError::Invalid(format!(
                "key {key:?} appears twice in one transaction"
            )));
        }
    }
    let n = txn.ops.len().max(txn.compares.len());
    if n > max {
        return Err(StoreError::Etcd {
            cause: EtcdCause::TooLarge,
            endpoints: String::new(),
            message: format!("this request writes {n} keys in one transaction; etcd accepts {max} (etcd --max-txn-ops): split it, or raise both etcd's and isthmus's limit (--etcd-max-txn-ops)"),
            outcome_unknown: false,
        });
    }
    Ok(())
}

#[async_trait]
impl Store for EtcdStore {
    fn revision(&self) -> Revision {
        self.inner.revision.load(Ordering::SeqCst)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let inner = &self.inner;
        let k = inner.key(key);
        let resp = inner
            .read_fresh(|| {
                let mut kv = inner.client.kv_client();
                let k = k.clone();
                async move { kv.get(k, None).await }
            })
            .await?;
        resp.kvs().first().map(|kv| inner.kv(kv)).transpose()
    }

    async fn get_serializable(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let inner = &self.inner;
        let mut kv = inner.lenient.kv_client();
        let resp = kv
            .get(
                inner.key(key),
                Some(ec::GetOptions::new().with_serializable()),
            )
            .await
            .map_err(|e| {
                let err = inner.error(e);
                inner.count("read", &err);
                err
            })?;
        resp.kvs().first().map(|kv| inner.kv(kv)).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let inner = &self.inner;
        let k = inner.key(prefix);
        let resp = inner
            .read_fresh(|| {
                let mut kv = inner.client.kv_client();
                let k = k.clone();
                async move { kv.get(k, Some(ec::GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| inner.kv(kv))
            .collect::<Result<_, _>>()?;
        Ok((kvs, revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let inner = &self.inner;
        check_txn(&txn, inner.max_txn_ops)?;
        let compares: Vec<ec::Compare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision { key, revision } => {
                    ec::Compare::mod_revision(inner.key(key), ec::CompareOp::Equal, *revision)
                }
                // A compare over an empty range is evaluated against a zero value, so
                // "mod_revision = 0 over the prefix" holds exactly when nothing is there.
                Compare::PrefixEmpty { prefix } => {
                    ec::Compare::mod_revision(inner.key(prefix), ec::CompareOp::Equal, 0)
                        .with_prefix()
                }
            })
            .collect();
        let ops: Vec<ec::TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => ec::TxnOp::put(
                    inner.key(key),
                    value.clone(),
                    txn.lease.map(|id| ec::PutOptions::new().with_lease(id)),
                ),
                Op::Delete { key } => ec::TxnOp::delete(inner.key(key), None),
            })
            .collect();
        let reads: Vec<ec::TxnOp> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision { key, .. } => ec::TxnOp::get(inner.key(key), None),
                Compare::PrefixEmpty { prefix } => ec::TxnOp::get(
                    inner.key(prefix),
                    Some(ec::GetOptions::new().with_prefix().with_limit(1)),
                ),
            })
            .collect();
        let resp = inner
            .retrying("write", || {
                let mut kv = inner.client.kv_client();
                let request = ec::Txn::new()
                    .when(compares.clone())
                    .and_then(ops.clone())
                    .or_else(reads.clone());
                async move { kv.txn(request).await }
            })
            .await?;
        inner.set_failure(None);
        let revision = inner.saw(resp.header());
        if resp.succeeded() {
            return Ok(TxnOutcome::Committed { revision });
        }
        // The else-branch read every compared key at the revision the compares were evaluated
        // at: the first one that does not hold is the one to report.
        let responses = resp.op_responses();
        let mut first = None;
        for (index, (compare, read)) in txn.compares.iter().zip(&responses).enumerate() {
            let current = match read {
                ec::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| inner.kv(kv)).transpose()?,
                _ => None,
            };
            if !compare.holds(current.as_ref()) {
                return Ok(TxnOutcome::Failed { index, current });
            }
            first.get_or_insert(current);
        }
        Ok(TxnOutcome::Failed {
            index: 0,
            current: first.flatten(),
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Option<LeaseId>, StoreError> {
        let inner = &self.inner;
        let secs = ttl.as_secs().max(1) as i64;
        let resp = inner
            .retrying("lease", || {
                let mut client = inner.client.clone();
                async move { client.lease_grant(secs, None).await }
            })
            .await?;
        Ok(Some(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let inner = &self.inner;
        inner
            .retrying("lease", || {
                let mut client = inner.client.clone();
                async move {
                    // The client sends one renewal and reads its answer; an expired or unknown
                    // lease is answered with TTL 0, which it reports as "lease not found".
                    match client.lease_keep_alive(lease).await {
                        Ok(_) => Ok(true),
                        Err(ec::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                            Ok(false)
                        }
                        Err(e) => Err(e),
                    }
                }
            })
            .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let inner = &self.inner;
        let result = inner
            .retrying("lease", || {
                let mut client = inner.client.clone();
                async move { client.lease_revoke(lease).await }
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            // Already expired: its keys are gone, which is what revoking wanted.
            Err(StoreError::Etcd { message, .. }) if message.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let inner = &self.inner;
        let current = inner.current_revision().await?;
        let start = if from <= 0 {
            current + 1
        } else if from > current + 1 {
            return Err(StoreError::FutureRevision {
                requested: from,
                current,
            });
        } else {
            from
        };
        let (mut upstream, mut pending) = inner.open_watch(prefix, start).await?;
        let weak = Arc::downgrade(inner);
        let mut closed = inner.closed.clone();
        let prefix = prefix.to_owned();
        Ok(Box::pin(stream! {
            let mut last = start - 1;
            loop {
                let message = match pending.take() {
                    Some(resp) => Ok(Some(resp)),
                    None => tokio::select! {
                        _ = closed.changed() => return,
                        m = upstream.message() => m,
                    },
                };
                // Held strongly only between yields, so dropping the store ends the stream.
                let Some(inner) = weak.upgrade() else { return };
                match message {
                    Ok(Some(resp)) if resp.compact_revision() > 0 => {
                        inner.oldest.fetch_max(resp.compact_revision(), Ordering::SeqCst);
                        drop(inner);
                        yield Err(StoreError::Compacted { requested: last + 1, oldest: resp.compact_revision() });
                        return;
                    }
                    Ok(Some(resp)) if !resp.canceled() => {
                        let events = inner.events(&resp);
                        drop(inner);
                        match events {
                            Ok(events) => {
                                for event in events {
                                    last = last.max(event.revision());
                                    yield Ok(event);
                                }
                            }
                            Err(e) => {
                                yield Err(e);
                                return;
                            }
                        }
                        continue;
                    }
                    // Cancelled (its member lost the leader), closed or broken: watch again
                    // from the next revision, through whichever member answers.
                    Ok(_) | Err(_) => {}
                }
                drop(inner);
                let mut pause = Duration::from_millis(100);
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    let reopened = inner.open_watch(&prefix, last + 1).await;
                    drop(inner);
                    match reopened {
                        Ok((stream, first)) => {
                            upstream = stream;
                            pending = first;
                            break;
                        }
                        Err(e @ StoreError::Compacted { .. }) => {
                            yield Err(e);
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "etcd watch lost; watching again");
                        }
                    }
                    tokio::select! {
                        _ = closed.changed() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let inner = &self.inner;
        if revision <= inner.oldest.load(Ordering::SeqCst) {
            return Ok(());
        }
        let current = inner.current_revision().await?;
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        let mut kv = inner.client.kv_client();
        match kv.compact(revision, None).await.map_err(|e| inner.error(e)) {
            Ok(_) | Err(StoreError::Compacted { .. }) => {
                inner.oldest.fetch_max(revision, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                inner.count("write", &e);
                Err(e)
            }
        }
    }

    fn oldest_revision(&self) -> Revision {
        self.inner.oldest.load(Ordering::SeqCst)
    }

    fn health(&self) -> Health {
        let inner = &self.inner;
        Health {
            write_failure: inner
                .write_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            errors: inner
                .errors
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(&(op, kind), &count)| ErrorCount { op, kind, count })
                .collect(),
        }
    }
}

/// Whether a failed request certainly never reached etcd: no connection could be made, or etcd
/// refused it before proposing (no leader, by the `hasleader` metadata every request carries).
/// Anything else that fails in transit (a reset, a broken pipe, a member killed mid-request)
/// may have been committed.
fn never_sent(err: &ec::Error) -> bool {
    match err {
        ec::Error::TransportError(_) => true,
        ec::Error::GRpcStatus(s) => {
            let m = s.message().to_ascii_lowercase();
            m.contains("no leader")
                || m.contains("too many requests")
                || m.contains("error trying to connect")
                || m.contains("tcp connect error")
                || m.contains("connection refused")
                || m.contains("there is no address available")
                || (s.code() != tonic::Code::Unavailable
                    && s.code() != tonic::Code::Unknown
                    && s.code() != tonic::Code::Internal
                    && s.code() != tonic::Code::DeadlineExceeded
                    && s.code() != tonic::Code::Cancelled)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> ec::Error {
        ec::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    /// A read is refused as stale only when it answers from before what this store saw, on a
    /// real etcd: the store is made to believe it saw a later revision than etcd has, as it
    /// would after a member served a read from behind (etcd-io/etcd#20418).
    #[tokio::test]
    async fn a_read_older_than_a_seen_revision_is_asked_again_then_refused() {
        assert!(stale_read(10, 9));
        assert!(!stale_read(10, 10) && !stale_read(10, 11));
        let Some(cluster) = crate::testing::EtcdCluster::start(1, "etcd stale reads") else {
            return;
        };
        let mut options = EtcdOptions::new(cluster.endpoints(), "/stale");
        options.request_timeout = Duration::from_millis(500);
        let store = EtcdStore::open(options).await.unwrap();
        let put = |v: &'static str| Txn {
            compares: vec![],
            ops: vec![Op::Put {
                key: "/k".into(),
                value: v.as_bytes().to_vec(),
            }],
            lease: None,
        };
        store.txn(put("a")).await.unwrap();
        assert!(
            store.get("/k").await.unwrap().is_some(),
            "a fresh read passes"
        );
        let now = store.revision();
        store.inner.revision.fetch_max(now + 5, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let err = store.get("/k").await.unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Etcd {
                    cause: EtcdCause::Stale,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("etcd-io/etcd#20418")
                && err.to_string().contains("upgrade etcd"),
            "{err}"
        );
        // Asked again until the request timeout.
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(store.range("/").await.is_err(), "ranges are checked too");
        // Once etcd has reached the seen revision, reads pass again.
        for v in ["b", "c", "d", "e", "f"] {
            store.txn(put(v)).await.unwrap();
        }
        let got = store.get("/k").await.unwrap().unwrap();
        assert_eq!(got.value, b"f");
    }

    /// A write whose connection broke after it was sent may have been committed, whatever
    /// words the failure came with: the chaos test's client took a 500 "etcd ... failed:
    /// transport error" for "not applied" while etcd had applied it.
    #[tokio::test]
    async fn a_write_lost_in_transit_says_it_may_have_been_applied() {
        let Some(cluster) = crate::testing::EtcdCluster::start(1, "etcd lost writes") else {
            return;
        };
        let store = EtcdStore::open(EtcdOptions::new(cluster.endpoints(), "/lost"))
            .await
            .unwrap();
        for (code, message) in [
            (tonic::Code::Unknown, "transport error"),
            (
                tonic::Code::Unavailable,
                "transport error: connection reset by peer",
            ),
            (tonic::Code::Internal, "h2 protocol error: stream closed"),
        ] {
            let err = store
                .inner
                .retrying("write", || async { Err::<(), _>(status(code, message)) })
                .await
                .unwrap_err();
            assert!(
                outcome_unknown(&err) && err.to_string().contains("may have been applied"),
                "{code:?} {message}: {err}"
            );
        }
        // etcd's own refusal of a write is definite.
        let err = store
            .inner
            .retrying("write", || async {
                Err::<(), _>(status(
                    tonic::Code::ResourceExhausted,
                    "etcdserver: mvcc: database space exceeded",
                ))
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Etcd {
                    outcome_unknown: false,
                    ..
                }
            ),
            "{err}"
        );
    }

    fn outcome_unknown(err: &StoreError) -> bool {
        matches!(
            err,
            StoreError::Etcd {
                outcome_unknown: true,
                ..
            }
        )
    }

    #[test]
    fn only_failures_before_sending_count_as_never_sent() {
        use tonic::Code::*;
        // etcd refused before proposing, or no connection was made: safe to send again.
        assert!(never_sent(&status(Unavailable, "etcdserver: no leader")));
        assert!(never_sent(&status(
            Unavailable,
            "error trying to connect: tcp connect error: Connection refused (os error 111)"
        )));
        assert!(never_sent(&status(
            ResourceExhausted,
            "etcdserver: too many requests"
        )));
        assert!(never_sent(&status(
            InvalidArgument,
            "etcdserver: too many operations in txn request"
        )));
        // Lost in transit: it may have been committed.
        assert!(!never_sent(&status(
            Unavailable,
            "transport error: connection reset by peer"
        )));
        assert!(!never_sent(&status(
            Unknown,
            "h2 protocol error: broken pipe"
        )));
        assert!(!never_sent(&status(
            DeadlineExceeded,
            "etcdserver: request timed out"
        )));
        assert!(!never_sent(&status(Cancelled, "operation was canceled")));
    }
}
