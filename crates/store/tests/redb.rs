//! What only the durable backend does: survive a restart, refuse a second opener, refuse files
//! that are not stores, share one commit between concurrent transactions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use isthmus_store::{
    Compare, Event, RedbStore, Revision, Store, StoreError, StoreOptions, Txn, TxnOutcome,
};

/// The first `n` events from revision `from` on.
async fn history(store: &RedbStore, from: i64, n: usize) -> Vec<Event> {
    let mut watch = store.watch("", from).await.unwrap();
    let mut events = Vec::new();
    for _ in 0..n {
        let next = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
        events.push(next.unwrap().unwrap().unwrap());
    }
    events
}

#[tokio::test]
async fn everything_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let store = RedbStore::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(store.path(), path);
    store.put("/a", b"1".to_vec()).await.unwrap();
    store.put("/b", b"2".to_vec()).await.unwrap();
    store
        .txn(
            Txn::new()
                .when(Compare::mod_revision("/a", 1))
                .put("/a", "3")
                .delete("/b"),
        )
        .await
        .unwrap();
    store.put("/c", b"4".to_vec()).await.unwrap();
    store.compact(2).await.unwrap();

    let (kvs, revision) = store.range("").await.unwrap();
    // Revision 3 holds two events.
    let events = history(&store, 2, 4).await;
    assert_eq!(revision, 4);
    assert_eq!(events.last().unwrap().revision(), 4);
    drop(store);

    let store = RedbStore::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(store.range("").await.unwrap(), (kvs, revision));
    assert_eq!(store.revision(), 4);
    assert_eq!(store.oldest_revision(), 2);
    assert_eq!(history(&store, 2, 4).await, events);
    assert!(matches!(
        store.watch("", 1).await,
        Err(StoreError::Compacted {
            requested: 1,
            oldest: 2
        })
    ));
    // Revisions carry on where they stopped.
    assert_eq!(store.put("/d", vec![]).await.unwrap(), 5);
}

#[tokio::test]
async fn second_open_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let first = RedbStore::open(&path, StoreOptions::default()).unwrap();
    let err = RedbStore::open(&path, StoreOptions::default())
        .err()
        .expect("a second open must fail");
    match &err {
        StoreError::Locked { path: p } => assert_eq!(p, &path.display().to_string()),
        other => panic!("expected Locked, got {other}"),
    }
    assert!(err.to_string().contains("registry.redb"), "{err}");
    drop(first);
    RedbStore::open(&path, StoreOptions::default()).unwrap();
}

#[tokio::test]
async fn garbage_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in [
        (
            "text.redb",
            b"these are not the bytes you are looking for\n".repeat(200),
        ),
        ("short.redb", b"abc".to_vec()),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &contents).unwrap();
        let err = RedbStore::open(&path, StoreOptions::default())
            .err()
            .expect("garbage must not open");
        assert!(
            matches!(&err, StoreError::Corrupt { path: p, .. } if *p == path.display().to_string()),
            "{name}: expected Corrupt, got {err}"
        );
        assert!(err.to_string().contains(name), "{err}");
        // The file is left as it was, for whoever investigates.
        assert_eq!(std::fs::read(&path).unwrap(), contents);
    }
}

#[tokio::test]
async fn missing_directory_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("registry.redb");
    let err = RedbStore::open(&path, StoreOptions::default())
        .err()
        .expect("must fail");
    assert!(
        matches!(&err, StoreError::Io { path: p, .. } if p.contains("no-such-dir")),
        "{err}"
    );
}

/// Many writers racing compare-and-swap increments on a few keys: group commit must keep every
/// acknowledged increment, in a single order that watchers and a reopened store agree on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_increments_share_commits_and_survive_reopen() {
    const TASKS: usize = 64;
    const EACH: usize = 50;
    const KEYS: usize = 4;
    const TOTAL: usize = TASKS * EACH;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let store = Arc::new(RedbStore::open(&path, StoreOptions::default()).unwrap());
    let mut watch = store.watch("", 0).await.unwrap();

    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = format!("/counter/{}", task % KEYS);
                // (key, value written, revision acknowledged) of each increment.
                let mut acked = Vec::new();
                for _ in 0..EACH {
                    loop {
                        let (n, rev) = store.get(&key).await.unwrap().map_or((0, 0), |kv| {
                            let n: usize = String::from_utf8(kv.value).unwrap().parse().unwrap();
                            (n, kv.mod_revision)
                        });
                        let value = (n + 1).to_string();
                        let txn = Txn::new()
                            .when(Compare::mod_revision(&key, rev))
                            .put(&key, value.clone());
                        if let TxnOutcome::Committed { revision } = store.txn(txn).await.unwrap() {
                            acked.push((key.clone(), value, revision));
                            break;
                        }
                    }
                }
                acked
            })
        })
        .collect();
    let mut acked: BTreeMap<Revision, (String, String)> = BTreeMap::new();
    for task in tasks {
        for (key, value, revision) in task.await.unwrap() {
            assert!(
                acked.insert(revision, (key, value)).is_none(),
                "revision {revision} acknowledged twice"
            );
        }
    }

    // Every increment got its own revision, 1..=TOTAL, and per key the values count up by one
    // in revision order: no lost update, no increment applied against a stale read.
    assert_eq!(acked.len(), TOTAL);
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=TOTAL as Revision).collect::<Vec<_>>()
    );
    let mut last: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, value) in acked.values() {
        let n = last.entry(key).or_default();
        *n += 1;
        assert_eq!(value, &n.to_string(), "{key}");
    }
    assert_eq!(store.revision(), TOTAL as Revision);

    // The watcher saw exactly the acknowledged writes, in revision order, without gaps.
    let mut seen = Vec::new();
    for _ in 0..TOTAL {
        let next = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
        seen.push(next.unwrap().unwrap().unwrap());
    }
    let as_acked = |events: &[Event]| -> BTreeMap<Revision, (String, String)> {
        events
            .iter()
            .map(|e| {
                let value = String::from_utf8(e.kv.value.clone()).unwrap();
                (e.revision(), (e.kv.key.clone(), value))
            })
            .collect()
    };
    assert!(seen
        .windows(2)
        .all(|w| w[1].revision() == w[0].revision() + 1));
    assert_eq!(as_acked(&seen), acked);

    // Concurrent transactions shared fsyncs.
    let stats = store.write_stats();
    eprintln!(
        "{TOTAL} increments in {} commits ({stats:?})",
        stats.commits
    );
    assert_eq!(stats.writes, TOTAL as u64);
    assert!(
        stats.commits < stats.writes,
        "{stats:?}: no commit carried two writes"
    );

    drop(watch);
    drop(Arc::into_inner(store).expect("no other reference to the store is left"));
    let store = RedbStore::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(store.revision(), TOTAL as Revision);
    for k in 0..KEYS {
        let kv = store.get(&format!("/counter/{k}")).await.unwrap().unwrap();
        assert_eq!(kv.value, (TOTAL / KEYS).to_string().as_bytes());
        assert_eq!(kv.version as usize, TOTAL / KEYS);
    }
    assert_eq!(as_acked(&history(&store, 1, TOTAL).await), acked);
}

/// A lone writer waits for nobody: each of its transactions is its own commit.
#[tokio::test]
async fn sequential_writes_commit_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        RedbStore::open(&dir.path().join("registry.redb"), StoreOptions::default()).unwrap();
    for i in 0..20 {
        store.put(&format!("/k/{i}"), vec![]).await.unwrap();
    }
    // A failed compare changes nothing, so it needs no commit.
    let stale = Txn::new().when(Compare::absent("/k/0")).put("/k/0", "x");
    assert!(matches!(
        store.txn(stale).await.unwrap(),
        TxnOutcome::Failed { index: 0, .. }
    ));
    let stats = store.write_stats();
    assert_eq!((stats.commits, stats.writes), (20, 20));
}
