//! The redb store on a real, small tmpfs that fills up: writes fail with the cause, reads go on,
//! health reports the failure, and everything recovers by itself once space is freed, with every
//! acknowledged write still there. Needs root (to mount); says so loudly when skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use isthmus_store::{EventKind, RedbStore, Store, StoreError, StoreOptions};

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after a SKIP line) when this process may not mount.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Self { dir }),
            other => {
                eprintln!(
                    "!!!! SKIP full_disk: cannot mount a tmpfs ({other:?}); run as root to test a full disk !!!!"
                );
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_costs_writes_only_and_recovers_when_space_returns() {
    if !is_root() {
        eprintln!("!!!! SKIP full_disk: needs root (mounts a small tmpfs) !!!!");
        return;
    }
    let Some(fs) = Tmpfs::mount("4m") else { return };
    // Space to give back later, taken before the store fills the rest.
    let filler: PathBuf = fs.path().join("filler");
    std::fs::write(&filler, vec![7u8; 1 << 20]).unwrap();
    let path = fs.path().join("registry.redb");
    let store = RedbStore::open(&path, StoreOptions::default()).unwrap();
    let mut watch = store.watch("/k/", 1).await.unwrap();

    let value = |i: usize| format!("{i:>8}").repeat(1024).into_bytes();
    let mut acked = BTreeMap::new();
    let err = loop {
        let i = acked.len();
        assert!(i < 10_000, "4 MiB never filled up");
        let key = format!("/k/{i:05}");
        match store.put(&key, value(i)).await {
            Ok(_) => {
                acked.insert(key, value(i));
            }
            Err(err) => break err,
        }
    };
    assert!(acked.len() > 10, "only {} writes fit", acked.len());
    assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
    let message = err.to_string();
    for part in [
        "the registry's disk is full",
        "No space left on device",
        path.to_str().unwrap(),
        "free space on that filesystem",
        "reads keep working",
    ] {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
    let health = store.health();
    assert!(
        matches!(health.write_failure, Some(StoreError::DiskFull { .. })),
        "{health:?}"
    );
    assert!(
        health
            .errors
            .iter()
            .any(|e| (e.op, e.kind) == ("write", "disk_full") && e.count >= 1),
        "{health:?}"
    );

    // Reads go on while the disk is full, and hold every acknowledged write.
    let check_all = |kvs: Vec<isthmus_store::KeyValue>| {
        let got: BTreeMap<_, _> = kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
        for (key, value) in &acked {
            assert_eq!(got.get(key), Some(value), "{key} lost");
        }
    };
    check_all(store.range("/k/").await.unwrap().0);
    for key in acked.keys().take(5) {
        assert!(store.get(key).await.unwrap().is_some());
    }
    // Still full: another write fails the same way, and reads still work after it.
    let again = store.put("/k/again", value(0)).await;
    if let Err(err) = &again {
        assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
    }
    check_all(store.range("/k/").await.unwrap().0);

    // Space returns: the store's own probe finds out, with no write from anyone.
    std::fs::remove_file(&filler).unwrap();
    eventually("the store is healthy again", || {
        store.health().write_failure.is_none()
    })
    .await;
    let after = store.put("/k/after", b"ok".to_vec()).await.unwrap();
    assert_eq!(
        store.get("/k/after").await.unwrap().unwrap().mod_revision,
        after
    );

    // The watch saw each revision once, in order, across the failure and the reopen.
    let mut seen = BTreeMap::new();
    let mut last = 0;
    while last < after {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch stalled")
            .unwrap()
            .unwrap();
        assert_eq!(event.kind, EventKind::Put);
        assert_eq!(event.revision(), last + 1, "a revision missed or repeated");
        last = event.revision();
        seen.insert(event.kv.key, event.kv.value);
    }
    for (key, value) in &acked {
        assert_eq!(seen.get(key), Some(value), "the watch missed {key}");
    }

    // Every acknowledged write survives a clean reopen.
    drop(watch);
    drop(store);
    let store = RedbStore::open(&path, StoreOptions::default()).unwrap();
    let (kvs, revision) = store.range("/k/").await.unwrap();
    assert_eq!(revision, after);
    check_all(kvs);
    assert!(store.health().write_failure.is_none());
}
