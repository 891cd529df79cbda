//! etcd semantics, run against both backends: transactions, revisions and watches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use isthmus_store::{
    Compare, Event, EventKind, KeyValue, MemStore, RedbStore, Revision, Store, StoreError,
    StoreOptions, Txn, TxnOutcome, WatchStream,
};
use tempfile::TempDir;

/// Opens fresh stores of one backend.
trait Backend {
    fn open(&self, options: StoreOptions) -> Arc<dyn Store>;
}

struct Mem;

impl Backend for Mem {
    fn open(&self, options: StoreOptions) -> Arc<dyn Store> {
        Arc::new(MemStore::with_options(options))
    }
}

struct Redb {
    dir: TempDir,
    opened: AtomicUsize,
}

impl Redb {
    fn new() -> Self {
        Self {
            dir: TempDir::new().unwrap(),
            opened: AtomicUsize::new(0),
        }
    }
}

impl Backend for Redb {
    fn open(&self, options: StoreOptions) -> Arc<dyn Store> {
        let n = self.opened.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.path().join(format!("registry-{n}.redb"));
        Arc::new(RedbStore::open(&path, options).unwrap())
    }
}

/// Each listed `async fn(&dyn Backend)` becomes one test per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod mem {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Mem).await
                }
            )*
        }
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Redb::new()).await
                }
            )*
        }
    };
}

on_both_backends!(
    cas_on_mod_revision,
    multi_op_txn_shares_one_revision,
    noop_and_invalid_txns,
    range_is_sorted_and_consistent,
    concurrent_cas_increments_are_linearizable,
    watch_from_revision_replays_then_follows,
    watch_from_zero_sees_only_future_writes,
    watch_resumes_without_gap_or_duplicate,
    slow_watcher_gets_every_event,
    compacted_history_is_refused,
    automatic_retention_compacts,
    watch_filters_by_prefix,
    dropping_the_store_ends_watches,
);

fn opts() -> StoreOptions {
    StoreOptions::default()
}

/// The next event, failing the test instead of hanging if none comes.
async fn next(watch: &mut WatchStream) -> Event {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("no event within 10s")
        .expect("watch ended")
        .expect("watch failed")
}

async fn next_n(watch: &mut WatchStream, n: usize) -> Vec<Event> {
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(next(watch).await);
    }
    events
}

fn revisions(events: &[Event]) -> Vec<Revision> {
    events.iter().map(Event::revision).collect()
}

async fn cas_on_mod_revision(b: &dyn Backend) {
    let s = b.open(opts());
    assert_eq!(s.revision(), 0);
    assert_eq!(s.get("a").await.unwrap(), None);

    let r1 = s.put("a", b"1".to_vec()).await.unwrap();
    assert_eq!(r1, 1);
    let kv = s.get("a").await.unwrap().unwrap();
    assert_eq!(
        kv,
        KeyValue {
            key: "a".into(),
            value: b"1".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
        }
    );

    // Right revision: applied, version counts writes, create_revision stays.
    let out = s
        .txn(
            Txn::new()
                .when(Compare::mod_revision("a", r1))
                .put("a", "2"),
        )
        .await
        .unwrap();
    assert_eq!(out, TxnOutcome::Committed { revision: 2 });
    let a2 = s.get("a").await.unwrap().unwrap();
    assert_eq!((a2.create_revision, a2.mod_revision, a2.version), (1, 2, 2));

    // Stale revision: nothing written, revision not bumped, current value reported.
    let out = s
        .txn(
            Txn::new()
                .when(Compare::mod_revision("a", r1))
                .put("a", "3"),
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        TxnOutcome::Failed {
            index: 0,
            current: Some(a2.clone())
        }
    );
    assert_eq!(s.revision(), 2);
    assert_eq!(s.get("a").await.unwrap(), Some(a2.clone()));

    // Create-only on an existing key fails with the existing value.
    let out = s
        .txn(Txn::new().when(Compare::absent("a")).put("a", "4"))
        .await
        .unwrap();
    assert_eq!(
        out,
        TxnOutcome::Failed {
            index: 0,
            current: Some(a2.clone())
        }
    );
    // ... and succeeds on an absent one.
    let out = s
        .txn(Txn::new().when(Compare::absent("b")).put("b", "1"))
        .await
        .unwrap();
    assert_eq!(out, TxnOutcome::Committed { revision: 3 });

    // The index names the first compare that failed; none of the ops apply.
    let out = s
        .txn(
            Txn::new()
                .when(Compare::mod_revision("a", 2))
                .when(Compare::mod_revision("c", 7))
                .put("a", "5")
                .delete("b"),
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        TxnOutcome::Failed {
            index: 1,
            current: None
        }
    );
    assert_eq!(s.revision(), 3);
    assert_eq!(s.get("a").await.unwrap(), Some(a2));
    assert!(s.get("b").await.unwrap().is_some());

    // A delete resets the key's history: re-creation starts at version 1.
    assert_eq!(s.delete("a").await.unwrap(), Some(4));
    assert_eq!(s.delete("a").await.unwrap(), None);
    assert_eq!(s.revision(), 4);
    s.put("a", b"6".to_vec()).await.unwrap();
    let a = s.get("a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
}

async fn multi_op_txn_shares_one_revision(b: &dyn Backend) {
    let s = b.open(opts());
    s.put("gone", b"old".to_vec()).await.unwrap();
    let mut w = s.watch("", 0).await.unwrap();

    let out = s
        .txn(Txn::new().put("x", "1").delete("gone").put("y", "2"))
        .await
        .unwrap();
    assert_eq!(out, TxnOutcome::Committed { revision: 2 });

    let events = next_n(&mut w, 3).await;
    assert_eq!(revisions(&events), [2, 2, 2]);
    let keys: Vec<_> = events.iter().map(|e| e.kv.key.as_str()).collect();
    assert_eq!(keys, ["x", "gone", "y"], "events follow op order");
    assert_eq!(events[0].kind, EventKind::Put);
    assert_eq!(events[0].prev, None);
    // A delete reports a tombstone at the deletion's revision and the value it removed.
    assert_eq!(events[1].kind, EventKind::Delete);
    assert_eq!(
        events[1].kv,
        KeyValue {
            key: "gone".into(),
            value: vec![],
            create_revision: 0,
            mod_revision: 2,
            version: 0,
        }
    );
    assert_eq!(events[1].prev.as_ref().unwrap().value, b"old");

    // An overwrite carries the previous value.
    s.put("x", b"3".to_vec()).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!(e.prev.unwrap().value, b"1");
    assert_eq!((e.kv.version, e.kv.create_revision), (2, 2));
}

async fn noop_and_invalid_txns(b: &dyn Backend) {
    let s = b.open(opts());
    s.put("a", b"1".to_vec()).await.unwrap();
    // Changing nothing does not bump the revision, as in etcd.
    let out = s.txn(Txn::new().delete("absent")).await.unwrap();
    assert_eq!(out, TxnOutcome::Committed { revision: 1 });
    let out = s.txn(Txn::new()).await.unwrap();
    assert_eq!(out, TxnOutcome::Committed { revision: 1 });
    assert_eq!(s.revision(), 1);

    // etcd refuses a transaction that names one key twice.
    let err = s
        .txn(Txn::new().put("a", "2").delete("a"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.contains("\"a\"")),
        "{err}"
    );
    assert_eq!(s.get("a").await.unwrap().unwrap().value, b"1");
    assert_eq!(s.revision(), 1);
}

async fn range_is_sorted_and_consistent(b: &dyn Backend) {
    let s = b.open(opts());
    for key in ["/b/2", "/a/2", "/a/1", "/ab", "/a/3"] {
        s.put(key, key.as_bytes().to_vec()).await.unwrap();
    }
    s.delete("/a/3").await.unwrap();
    let (kvs, revision) = s.range("/a/").await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/a/1", "/a/2"]);
    assert_eq!(revision, 6);
    assert_eq!(kvs[0].value, b"/a/1");
    let (all, _) = s.range("").await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(s.range("/c").await.unwrap().0.is_empty());
}

async fn concurrent_cas_increments_are_linearizable(b: &dyn Backend) {
    let s = b.open(opts());
    const TASKS: usize = 4;
    const EACH: usize = 15;
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..EACH {
                    loop {
                        let cur = s.get("counter").await.unwrap();
                        let (n, rev) = cur.map_or((0, 0), |kv| {
                            (
                                String::from_utf8(kv.value)
                                    .unwrap()
                                    .parse::<usize>()
                                    .unwrap(),
                                kv.mod_revision,
                            )
                        });
                        let txn = Txn::new()
                            .when(Compare::mod_revision("counter", rev))
                            .put("counter", (n + 1).to_string());
                        if let TxnOutcome::Committed { .. } = s.txn(txn).await.unwrap() {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let kv = s.get("counter").await.unwrap().unwrap();
    assert_eq!(kv.value, (TASKS * EACH).to_string().as_bytes());
    assert_eq!(kv.version as usize, TASKS * EACH);
    assert_eq!(s.revision() as usize, TASKS * EACH);
}

async fn watch_from_revision_replays_then_follows(b: &dyn Backend) {
    let s = b.open(opts());
    for i in 1..=5 {
        s.put(&format!("k{i}"), vec![i]).await.unwrap();
    }
    let mut w = s.watch("", 3).await.unwrap();
    assert_eq!(revisions(&next_n(&mut w, 3).await), [3, 4, 5]);
    s.put("k6", vec![6]).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!((e.revision(), e.kv.key.as_str()), (6, "k6"));

    // From the next revision: waits for it.
    let mut ahead = s.watch("", 7).await.unwrap();
    s.put("k7", vec![7]).await.unwrap();
    assert_eq!(next(&mut ahead).await.revision(), 7);
    // Beyond it: a revision this store never issued, refused rather than waited for.
    assert!(matches!(
        s.watch("", 9).await,
        Err(StoreError::FutureRevision {
            requested: 9,
            current: 7
        })
    ));
}

async fn watch_from_zero_sees_only_future_writes(b: &dyn Backend) {
    let s = b.open(opts());
    s.put("before", vec![]).await.unwrap();
    let mut w = s.watch("", 0).await.unwrap();
    s.put("after", vec![]).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!((e.revision(), e.kv.key.as_str()), (2, "after"));
}

async fn watch_resumes_without_gap_or_duplicate(b: &dyn Backend) {
    let s = b.open(opts());
    const WRITES: i64 = 60;
    // Writes go on while the watcher drops out and comes back.
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..WRITES {
                s.put(&format!("k{}", i % 7), i.to_le_bytes().to_vec())
                    .await
                    .unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    let mut from = 1;
    while seen.len() < WRITES as usize {
        let mut w = s.watch("", from).await.unwrap();
        // Read a few, then disconnect.
        for _ in 0..7.min(WRITES as usize - seen.len()) {
            seen.push(next(&mut w).await.revision());
        }
        drop(w);
        from = seen.last().unwrap() + 1;
    }
    writer.await.unwrap();
    assert_eq!(seen, (1..=WRITES).collect::<Vec<_>>());
}

async fn slow_watcher_gets_every_event(b: &dyn Backend) {
    // A tiny buffer, so watchers lag far behind the broadcast and must re-read the log.
    let s = b.open(StoreOptions {
        watch_buffer: 2,
        ..opts()
    });
    const WRITES: i64 = 150;
    // Poll once so that both wait on the live channel (nothing to replay yet) when the writes
    // start: they then lag rather than find everything in the log on their first read.
    let mut idle = s.watch("", 0).await.unwrap();
    let mut slow = s.watch("", 0).await.unwrap();
    assert!(idle.next().now_or_never().is_none());
    assert!(slow.next().now_or_never().is_none());
    let follower = {
        let s = s.clone();
        tokio::spawn(async move {
            // One that reads while the writes happen, lagging and catching up in turns.
            let mut w = s.watch("", 1).await.unwrap();
            let mut got = Vec::new();
            for _ in 0..WRITES {
                got.push(next(&mut w).await.revision());
            }
            got
        })
    };
    for i in 0..WRITES {
        s.put(&format!("k{}", i % 5), vec![]).await.unwrap();
        if i == WRITES / 2 {
            // Partly drain one watcher so it lags twice, from different positions.
            assert_eq!(next(&mut slow).await.revision(), 1);
        }
    }
    let all: Vec<Revision> = (1..=WRITES).collect();
    assert_eq!(revisions(&next_n(&mut idle, WRITES as usize).await), all);
    assert_eq!(
        revisions(&next_n(&mut slow, WRITES as usize - 1).await),
        all[1..]
    );
    assert_eq!(follower.await.unwrap(), all);
}

async fn compacted_history_is_refused(b: &dyn Backend) {
    let s = b.open(opts());
    for i in 0..10 {
        s.put("k", vec![i]).await.unwrap();
    }
    assert_eq!(s.oldest_revision(), 1);
    s.compact(6).await.unwrap();
    assert_eq!(s.oldest_revision(), 6);
    assert_eq!(s.revision(), 10);

    match s.watch("", 5).await {
        Err(StoreError::Compacted { requested, oldest }) => assert_eq!((requested, oldest), (5, 6)),
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    }
    let mut w = s.watch("", 6).await.unwrap();
    assert_eq!(revisions(&next_n(&mut w, 5).await), [6, 7, 8, 9, 10]);
    // Current values are untouched.
    assert_eq!(s.get("k").await.unwrap().unwrap().value, [9]);

    // Compacting backwards is a no-op; forwards past the present is refused.
    s.compact(3).await.unwrap();
    assert_eq!(s.oldest_revision(), 6);
    assert!(matches!(
        s.compact(11).await,
        Err(StoreError::FutureRevision {
            requested: 11,
            current: 10
        })
    ));

    // A watcher overtaken by compaction before it read its history is told so in the stream.
    let mut behind = s.watch("", 7).await.unwrap();
    s.compact(9).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), behind.next()).await {
        Ok(Some(Err(StoreError::Compacted {
            requested: 7,
            oldest: 9,
        }))) => {}
        other => panic!("expected Compacted in the stream, got {other:?}"),
    }
    assert!(
        behind.next().await.is_none(),
        "the stream ends after an error"
    );
}

async fn automatic_retention_compacts(b: &dyn Backend) {
    let s = b.open(StoreOptions {
        history: 5,
        ..opts()
    });
    for i in 0..20 {
        s.put("k", vec![i]).await.unwrap();
    }
    // Revisions 16..=20 are the last five.
    assert_eq!(s.oldest_revision(), 16);
    assert!(matches!(
        s.watch("", 15).await,
        Err(StoreError::Compacted {
            requested: 15,
            oldest: 16
        })
    ));
    let mut w = s.watch("", 16).await.unwrap();
    assert_eq!(revisions(&next_n(&mut w, 5).await), [16, 17, 18, 19, 20]);
}

async fn watch_filters_by_prefix(b: &dyn Backend) {
    let s = b.open(opts());
    for i in 0..6 {
        let key = if i % 2 == 0 {
            format!("/a/{i}")
        } else {
            format!("/b/{i}")
        };
        s.put(&key, vec![]).await.unwrap();
    }
    let mut w = s.watch("/a/", 1).await.unwrap();
    let events = next_n(&mut w, 3).await;
    assert_eq!(revisions(&events), [1, 3, 5]);
    // Live events are filtered too: the /b/ write is skipped, the next /a/ one arrives.
    s.txn(Txn::new().put("/b/x", "").put("/ab", ""))
        .await
        .unwrap();
    s.txn(Txn::new().put("/b/y", "").put("/a/y", ""))
        .await
        .unwrap();
    let e = next(&mut w).await;
    assert_eq!((e.revision(), e.kv.key.as_str()), (8, "/a/y"));
}

async fn dropping_the_store_ends_watches(b: &dyn Backend) {
    let s = b.open(opts());
    s.put("k", vec![]).await.unwrap();
    let mut w = s.watch("", 1).await.unwrap();
    assert_eq!(next(&mut w).await.revision(), 1);
    drop(s);
    let end = tokio::time::timeout(Duration::from_secs(10), w.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "expected the stream to end, got {end:?}"
    );
}
