//! In-memory backend for tests: the same semantics as the durable one, nothing on disk.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use crate::engine::{self, Meta, Tables};
use crate::hub::{self, Batch, Hub, Log};
use crate::{
    Event, KeyValue, Revision, Store, StoreError, StoreOptions, Txn, TxnOutcome, WatchStream,
};

pub struct MemStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Mirrors `state.meta` for lock-free reads; updated before publishing.
    revision: AtomicI64,
    oldest: AtomicI64,
    hub: Hub,
    history: usize,
}

struct State {
    kv: BTreeMap<String, KeyValue>,
    log: BTreeMap<Revision, Vec<Event>>,
    meta: Meta,
}

impl MemStore {
    pub fn new() -> Self {
        Self::with_options(StoreOptions::default())
    }

    pub fn with_options(options: StoreOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    kv: BTreeMap::new(),
                    log: BTreeMap::new(),
                    meta: Meta::EMPTY,
                }),
                revision: AtomicI64::new(0),
                oldest: AtomicI64::new(Meta::EMPTY.oldest),
                hub: Hub::new(options.watch_buffer),
                history: options.history,
            }),
        }
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing in this module panics while holding the lock; if something did, the maps are
        // still well-formed, so carrying on is better than failing every later call.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_meta(&self, meta: Meta) {
        self.oldest.store(meta.oldest, Ordering::SeqCst);
        self.revision.store(meta.revision, Ordering::SeqCst);
    }
}

impl Tables for State {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.kv.get(key).cloned())
    }

    fn first_under(&self, prefix: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self
            .kv
            .range(prefix.to_string()..)
            .next()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone()))
    }

    fn put(&mut self, kv: &KeyValue) -> Result<(), StoreError> {
        self.kv.insert(kv.key.clone(), kv.clone());
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<(), StoreError> {
        self.kv.remove(key);
        Ok(())
    }

    fn append(&mut self, revision: Revision, events: &[Event]) -> Result<(), StoreError> {
        self.log.insert(revision, events.to_vec());
        Ok(())
    }

    fn truncate_log(&mut self, before: Revision) -> Result<(), StoreError> {
        self.log = self.log.split_off(&before);
        Ok(())
    }

    fn set_meta(&mut self, meta: Meta) -> Result<(), StoreError> {
        self.meta = meta;
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
        let state = self.lock();
        engine::check_available(state.meta, after + 1)?;
        Ok(state
            .log
            .range(after + 1..=upto)
            .map(|(&revision, events)| Batch {
                revision,
                events: events.clone(),
            })
            .collect())
    }
}

#[async_trait]
impl Store for MemStore {
    fn revision(&self) -> Revision {
        self.inner.revision.load(Ordering::SeqCst)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.inner.lock().kv.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let state = self.inner.lock();
        let kvs = state
            .kv
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok((kvs, state.meta.revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let mut state = self.inner.lock();
        let meta = state.meta;
        let applied = engine::apply(&mut *state, meta, &txn, self.inner.history)?;
        if !applied.events.is_empty() {
            // Publish under the lock so that revisions reach the hub in order.
            self.inner.set_meta(applied.meta);
            self.inner.hub.publish(Batch {
                revision: applied.meta.revision,
                events: applied.events,
            });
        }
        Ok(applied.outcome)
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        hub::watch(&self.inner, prefix, from, self.oldest_revision())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut state = self.inner.lock();
        let meta = state.meta;
        let meta = engine::compact(&mut *state, meta, revision)?;
        self.inner.set_meta(meta);
        Ok(())
    }

    fn oldest_revision(&self) -> Revision {
        self.inner.oldest.load(Ordering::SeqCst)
    }
}
