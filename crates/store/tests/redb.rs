//! What only the durable backend does: survive a restart, refuse a second opener, refuse files
//! that are not stores.

use std::time::Duration;

use futures::StreamExt;
use isthmus_store::{Compare, Event, RedbStore, Store, StoreError, StoreOptions, Txn};

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
