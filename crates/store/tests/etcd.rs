//! The store on a real etcd (Debian's `etcd-server`): the same semantics as the embedded
//! backends (random operation sequences against the model, failed compares, watches), and what
//! etcd's faults look like to the layers above. Loud SKIP when etcd is not installed; CI
//! installs it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use isthmus_store::testing::EtcdCluster;
use isthmus_store::{
    Compare, EtcdCause, EtcdOptions, EtcdStore, EventKind, Store, StoreError, Txn, TxnOutcome,
};

#[path = "support/model.rs"]
#[allow(dead_code)]
mod support;

static PREFIX: AtomicUsize = AtomicUsize::new(0);

/// A store under a prefix no other test uses.
async fn open(cluster: &EtcdCluster, timeout: Duration) -> EtcdStore {
    let n = PREFIX.fetch_add(1, Ordering::SeqCst);
    let mut options =
        EtcdOptions::new(cluster.endpoints(), format!("/t{}-{n}", std::process::id()));
    options.request_timeout = timeout;
    EtcdStore::open(options).await.expect("open the etcd store")
}

async fn next(w: &mut isthmus_store::WatchStream) -> isthmus_store::Event {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("no event within 10s")
        .expect("watch ended")
        .expect("watch failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compares_name_the_failing_one_and_prefix_empty_holds_only_on_empty_ranges() {
    let Some(cluster) = EtcdCluster::start(1, "etcd compares") else {
        return;
    };
    let store = open(&cluster, Duration::from_secs(5)).await;
    let base = store.revision();
    let r1 = store.put("/a", b"1".to_vec()).await.unwrap();
    assert!(r1 > base);

    // Compare 0 holds, compare 1 does not: index 1 is reported with the key's value.
    let out = store
        .txn(
            Txn::new()
                .when(Compare::mod_revision("/a", r1))
                .when(Compare::absent("/a"))
                .put("/b", "x"),
        )
        .await
        .unwrap();
    match out {
        TxnOutcome::Failed { index, current } => {
            assert_eq!(index, 1);
            assert_eq!(current.unwrap().mod_revision, r1);
        }
        other => panic!("expected a failed compare, got {other:?}"),
    }
    assert_eq!(store.get("/b").await.unwrap(), None, "a failed txn wrote");

    // PrefixEmpty: holds on /d/ while empty, fails with the first key once something is there.
    let create = || {
        Txn::new()
            .when(Compare::prefix_empty("/d/"))
            .put("/d/1", "x")
    };
    assert!(matches!(
        store.txn(create()).await.unwrap(),
        TxnOutcome::Committed { .. }
    ));
    match store.txn(create()).await.unwrap() {
        TxnOutcome::Failed { index: 0, current } => {
            assert_eq!(current.unwrap().key, "/d/1")
        }
        other => panic!("expected PrefixEmpty to fail, got {other:?}"),
    }
    // A key outside the prefix that merely starts alike does not count.
    store.put("/dx", b"y".to_vec()).await.unwrap();
    assert!(matches!(
        store
            .txn(
                Txn::new()
                    .when(Compare::prefix_empty("/e/"))
                    .put("/e/1", "x")
            )
            .await
            .unwrap(),
        TxnOutcome::Committed { .. }
    ));

    // Duplicate keys and oversized transactions are refused before anything is sent.
    let err = store
        .txn(Txn::new().put("/k", "1").delete("/k"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
    let mut big = Txn::new();
    for i in 0..129 {
        big = big.put(format!("/many/{i}"), "x");
    }
    let err = store.txn(big).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Etcd {
                cause: EtcdCause::TooLarge,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("--max-txn-ops"), "{err}");
    let (kvs, _) = store.range("/many/").await.unwrap();
    assert!(kvs.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_replay_follow_filter_and_refuse_compacted_or_future_revisions() {
    let Some(cluster) = EtcdCluster::start(1, "etcd watches") else {
        return;
    };
    let store = open(&cluster, Duration::from_secs(5)).await;
    let r1 = store.put("/w/a", b"1".to_vec()).await.unwrap();
    let r2 = store.put("/other", b"x".to_vec()).await.unwrap();
    let r3 = store.put("/w/a", b"2".to_vec()).await.unwrap();
    assert!(r1 < r2 && r2 < r3);

    // Replay from r1, prefix-filtered, with previous values; then live events.
    let mut w = store.watch("/w/", r1).await.unwrap();
    let e1 = next(&mut w).await;
    assert_eq!(
        (e1.kind, e1.revision(), e1.prev.is_none()),
        (EventKind::Put, r1, true)
    );
    let e2 = next(&mut w).await;
    assert_eq!(e2.revision(), r3);
    assert_eq!(e2.prev.unwrap().value, b"1");
    let r4 = store.delete("/w/a").await.unwrap().unwrap();
    let e3 = next(&mut w).await;
    assert_eq!(
        (e3.kind, e3.revision(), e3.kv.key.as_str()),
        (EventKind::Delete, r4, "/w/a")
    );

    // From 0: only what follows.
    let mut w0 = store.watch("/w/", 0).await.unwrap();
    let r5 = store.put("/w/b", b"3".to_vec()).await.unwrap();
    assert_eq!(next(&mut w0).await.revision(), r5);

    // A revision beyond the next one came from another store: refused.
    let err = store.watch("/w/", r5 + 1000).await.err().unwrap();
    assert!(matches!(err, StoreError::FutureRevision { .. }), "{err:?}");

    // Compacted history is refused with the oldest revision still there.
    store.compact(r3).await.unwrap();
    let err = store.watch("/w/", r1).await.err().unwrap();
    match err {
        StoreError::Compacted { requested, oldest } => {
            assert_eq!(requested, r1);
            assert!(oldest >= r3, "oldest {oldest} < {r3}");
        }
        other => panic!("expected Compacted, got {other:?}"),
    }

    // Dropping the store ends its watches.
    drop(store);
    let end = tokio::time::timeout(Duration::from_secs(10), w0.next()).await;
    assert!(matches!(end, Ok(None)), "watch did not end: {end:?}");
}

/// Quorum lost: a write fails within the request timeout with an error that names etcd and is
/// not "maybe applied"; the store reports itself unhealthy, and reads through
/// `get_serializable` still answer. Quorum back: writes work again and health clears by
/// itself, with no reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_quorum_fails_writes_fast_and_they_resume_when_it_returns() {
    let Some(mut cluster) = EtcdCluster::start(3, "etcd quorum") else {
        return;
    };
    let mut options = EtcdOptions::new(cluster.endpoints()[..1].to_vec(), "/quorum");
    options.request_timeout = Duration::from_secs(2);
    let store = EtcdStore::open(options).await.unwrap();
    store.put("/k", b"before".to_vec()).await.unwrap();

    cluster.kill(1);
    cluster.kill(2);
    let started = Instant::now();
    let err = loop {
        // The survivor may still believe in its leader for an election timeout.
        match store.put("/k", b"during".to_vec()).await {
            Ok(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "writes never failed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => break e,
        }
    };
    let cause = match &err {
        StoreError::Etcd { cause, .. } => *cause,
        other => panic!("expected an etcd error, got {other:?}"),
    };
    assert!(
        matches!(cause, EtcdCause::NoLeader | EtcdCause::Timeout),
        "{err:?}"
    );
    assert!(err.to_string().contains("etcd"), "{err}");
    assert!(err.is_storage());
    let write_failed = Instant::now();
    let err2 = store.put("/k", b"during".to_vec()).await.unwrap_err();
    assert!(
        write_failed.elapsed() < Duration::from_secs(4),
        "a write took {:?} to fail (timeout 2s): {err2}",
        write_failed.elapsed()
    );
    assert!(store.health().write_failure.is_some());
    let stale = store.get_serializable("/k").await.unwrap().unwrap();
    assert_eq!(stale.value, b"before");

    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_healthy(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if store.put("/k", b"after".to_vec()).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "writes did not resume");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(store.health().write_failure.is_none());
    assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"after");
    assert!(store
        .health()
        .errors
        .iter()
        .any(|e| e.op == "write" && e.kind.starts_with("etcd_")));
}

/// A member the store talks to is killed and restarted while a writer runs: the store's watch
/// (re-created on another member) sees every acknowledged write exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_survives_its_member_restarting_without_gap_or_duplicate() {
    let Some(mut cluster) = EtcdCluster::start(3, "etcd watch failover") else {
        return;
    };
    let store = open(&cluster, Duration::from_secs(3)).await;
    let mut w = store.watch("/n/", 0).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..200 {
        if i == 60 {
            cluster.kill(0);
        }
        if i == 140 {
            cluster.restart(0);
        }
        if let Ok(r) = store.put(&format!("/n/{i}"), vec![]).await {
            acked.push(r);
        }
    }
    assert!(
        acked.len() >= 150,
        "only {} writes acknowledged",
        acked.len()
    );
    let mut seen = Vec::new();
    while seen.len() < acked.len() {
        let e = next(&mut w).await;
        seen.push(e.revision());
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, seen, "events out of order or duplicated");
    for r in &acked {
        assert!(
            seen.contains(r),
            "acknowledged write at {r} never reached the watch"
        );
    }
}

/// The random-sequence test of `model.rs`, against etcd: same steps and model, revisions
/// counted from where this case's fresh prefix started.
#[test]
fn etcd_matches_the_model() {
    use proptest::test_runner::{Config, TestRunner};
    let Some(cluster) = EtcdCluster::start(1, "etcd model") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config::with_cases(24));
    let strategy = proptest::collection::vec(support::step(), 0..24);
    runner
        .run(&strategy, |steps| {
            rt.block_on(async {
                let store = open(&cluster, Duration::from_secs(5)).await;
                let mut model = support::Model::at(store.revision());
                for step in &steps {
                    let txn = model.txn(step);
                    let expected = model.apply(&txn);
                    proptest::prop_assert_eq!(
                        &store.txn(txn).await.unwrap(),
                        &expected,
                        "etcd, {:?}",
                        step
                    );
                }
                support::check(&store, &model).await?;
                support::check_nothing_extra(&store, &model).await
            })
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_keys_live_while_renewed_and_vanish_when_not() {
    let Some(cluster) = EtcdCluster::start(1, "etcd leases") else {
        return;
    };
    let store = open(&cluster, Duration::from_secs(5)).await;
    let lease = store
        .grant_lease(Duration::from_secs(2))
        .await
        .unwrap()
        .expect("etcd grants leases");
    let mut w = store.watch("/presence/", 0).await.unwrap();
    store
        .txn(Txn::new().put("/presence/a", "a").leased(Some(lease)))
        .await
        .unwrap();
    // A plain key next to it outlives the lease.
    store.put("/presence-plain", b"p".to_vec()).await.unwrap();
    assert_eq!(next(&mut w).await.kind, EventKind::Put);

    // Renewed for longer than the TTL: still there.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(store.keep_alive(lease).await.unwrap(), "lease renewed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(store.get("/presence/a").await.unwrap().is_some());

    // Not renewed: etcd deletes the key (a watcher sees it) and says the lease is gone.
    let started = Instant::now();
    let gone = next(&mut w).await;
    assert_eq!(gone.kind, EventKind::Delete);
    assert_eq!(gone.kv.key, "/presence/a");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "expired within about its TTL"
    );
    assert!(
        !store.keep_alive(lease).await.unwrap(),
        "an expired lease is not renewed"
    );
    assert!(store.get("/presence-plain").await.unwrap().is_some());

    // Revoking deletes at once; revoking again is not an error.
    let lease = store
        .grant_lease(Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    store
        .txn(Txn::new().put("/presence/b", "b").leased(Some(lease)))
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.kind, EventKind::Put);
    store.revoke_lease(lease).await.unwrap();
    assert_eq!(next(&mut w).await.kind, EventKind::Delete);
    store.revoke_lease(lease).await.unwrap();
}
