//! The model of etcd's semantics and the random steps, shared by `model.rs` (embedded
//! backends) and `etcd.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use isthmus_store::{Compare, Event, EventKind, KeyValue, Op, Revision, Store, Txn, TxnOutcome};
use proptest::prelude::*;

const KEYS: &[&str] = &["a", "b", "c", "d/1", "d/2"];

#[derive(Clone, Debug)]
pub enum Step {
    Put(usize, u8),
    Delete(usize),
    /// Put if the key's mod_revision is what the model says (`right`) or something else.
    Cas {
        key: usize,
        right: bool,
        value: u8,
    },
    CreateOnly(usize, u8),
    /// Put if nothing is under `d/` (etcd's compare on an empty range).
    IfPrefixEmpty(usize, u8),
    /// Several ops on distinct keys (None = delete), optionally guarded by a compare.
    Multi {
        ops: Vec<(usize, Option<u8>)>,
        guard: Option<(usize, bool)>,
    },
}

pub fn step() -> impl Strategy<Value = Step> {
    let key = 0..KEYS.len();
    prop_oneof![
        (key.clone(), any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
        key.clone().prop_map(Step::Delete),
        (key.clone(), any::<bool>(), any::<u8>()).prop_map(|(key, right, value)| Step::Cas {
            key,
            right,
            value
        }),
        (key.clone(), any::<u8>()).prop_map(|(k, v)| Step::CreateOnly(k, v)),
        (key.clone(), any::<u8>()).prop_map(|(k, v)| Step::IfPrefixEmpty(k, v)),
        (
            proptest::collection::btree_map(key.clone(), proptest::option::of(any::<u8>()), 0..4),
            proptest::option::of((key, any::<bool>())),
        )
            .prop_map(|(ops, guard)| Step::Multi {
                ops: ops.into_iter().collect(),
                guard
            }),
    ]
}

/// etcd's semantics in the most direct form.
#[derive(Default)]
pub struct Model {
    kv: BTreeMap<String, KeyValue>,
    /// The store's revision before the first step (0 for embedded stores; etcd's revisions are
    /// shared by the whole cluster).
    pub base: Revision,
    pub revision: Revision,
    events: Vec<Event>,
}

impl Model {
    pub fn at(base: Revision) -> Self {
        Self {
            base,
            revision: base,
            ..Default::default()
        }
    }

    fn mod_revision(&self, key: usize) -> Revision {
        self.kv.get(KEYS[key]).map_or(0, |kv| kv.mod_revision)
    }

    /// A compare that holds (`right`) or cannot hold.
    fn compare(&self, key: usize, right: bool) -> Compare {
        let rev = self.mod_revision(key);
        Compare::mod_revision(KEYS[key], if right { rev } else { rev + 1 })
    }

    pub fn txn(&self, step: &Step) -> Txn {
        match step {
            Step::Put(k, v) => Txn::new().put(KEYS[*k], vec![*v]),
            Step::Delete(k) => Txn::new().delete(KEYS[*k]),
            Step::Cas { key, right, value } => Txn::new()
                .when(self.compare(*key, *right))
                .put(KEYS[*key], vec![*value]),
            Step::CreateOnly(k, v) => Txn::new()
                .when(Compare::absent(KEYS[*k]))
                .put(KEYS[*k], vec![*v]),
            Step::IfPrefixEmpty(k, v) => Txn::new()
                .when(Compare::prefix_empty("d/"))
                .put(KEYS[*k], vec![*v]),
            Step::Multi { ops, guard } => {
                let mut txn = Txn::new();
                if let Some((key, right)) = guard {
                    txn = txn.when(self.compare(*key, *right));
                }
                for (k, v) in ops {
                    txn = match v {
                        Some(v) => txn.put(KEYS[*k], vec![*v]),
                        None => txn.delete(KEYS[*k]),
                    };
                }
                txn
            }
        }
    }

    pub fn apply(&mut self, txn: &Txn) -> TxnOutcome {
        for (index, compare) in txn.compares.iter().enumerate() {
            let (current, holds) = match compare {
                Compare::ModRevision { key, revision } => {
                    let current = self.kv.get(key).cloned();
                    let holds = current.as_ref().map_or(0, |kv| kv.mod_revision) == *revision;
                    (current, holds)
                }
                Compare::PrefixEmpty { prefix } => {
                    let current = self
                        .kv
                        .values()
                        .find(|kv| kv.key.starts_with(prefix.as_str()))
                        .cloned();
                    let holds = current.is_none();
                    (current, holds)
                }
            };
            if !holds {
                return TxnOutcome::Failed { index, current };
            }
        }
        let rev = self.revision + 1;
        let before = self.events.len();
        for op in &txn.ops {
            match op {
                Op::Put { key, value } => {
                    let prev = self.kv.get(key).cloned();
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                    };
                    self.kv.insert(key.clone(), kv.clone());
                    self.events.push(Event {
                        kind: EventKind::Put,
                        kv,
                        prev,
                    });
                }
                Op::Delete { key } => {
                    if let Some(prev) = self.kv.remove(key) {
                        let kv = KeyValue {
                            key: key.clone(),
                            value: vec![],
                            create_revision: 0,
                            mod_revision: rev,
                            version: 0,
                        };
                        self.events.push(Event {
                            kind: EventKind::Delete,
                            kv,
                            prev: Some(prev),
                        });
                    }
                }
            }
        }
        if self.events.len() > before {
            self.revision = rev;
        }
        TxnOutcome::Committed {
            revision: self.revision,
        }
    }
}

/// The store holds exactly the model's state and replays exactly its history.
pub async fn check(store: &dyn Store, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(store.revision(), model.revision);
    for key in KEYS {
        prop_assert_eq!(store.get(key).await.unwrap(), model.kv.get(*key).cloned());
    }
    let (all, at) = store.range("").await.unwrap();
    prop_assert_eq!(all, model.kv.values().cloned().collect::<Vec<_>>());
    prop_assert_eq!(at, model.revision);

    let mut watch = store.watch("", model.base + 1).await.unwrap();
    let mut replay = Vec::new();
    for _ in 0..model.events.len() {
        let next = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
        replay.push(next.unwrap().unwrap().unwrap());
    }
    prop_assert_eq!(&replay, &model.events);
    Ok(())
}

/// Nothing follows the model's history on replay: the next event is a fresh write.
pub async fn check_nothing_extra(store: &dyn Store, model: &Model) -> Result<(), TestCaseError> {
    let mut watch = store.watch("", model.base + 1).await.unwrap();
    let revision = store.put("sentinel", vec![]).await.unwrap();
    for _ in 0..=model.events.len() {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
        let event = event.unwrap().unwrap().unwrap();
        if event.kv.key == "sentinel" {
            prop_assert_eq!(event.revision(), revision);
            prop_assert_eq!(revision, model.revision + 1);
            return Ok(());
        }
    }
    Err(TestCaseError::fail("more events than the model has"))
}
