//! Watches, shared by both backends: live events come over a broadcast channel, history and
//! anything a watcher missed come from the backend's event log, so a watcher never sees a gap or
//! a duplicate however slow it is.

use std::sync::{Arc, Weak};

use async_stream::stream;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::{Event, Revision, StoreError, WatchStream};

/// How many revisions one history read covers, to bound memory while a watcher catches up.
const READ_CHUNK: Revision = 256;

/// The events of one committed transaction.
#[derive(Debug)]
pub(crate) struct Batch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// A backend as seen by its watchers.
pub(crate) trait Log: Send + Sync + 'static {
    /// Revisions are published in order, and only after they are readable with `read_log` and
    /// counted by `revision`: the hub relies on both to fill gaps from the log.
    fn hub(&self) -> &Hub;
    fn revision(&self) -> Revision;
    /// The batches with `after < revision <= upto`, oldest first, or `Compacted` if some of
    /// them are gone. May block (runs on the blocking pool).
    fn read_log(&self, after: Revision, upto: Revision) -> Result<Vec<Batch>, StoreError>;
}

pub(crate) struct Hub {
    live: broadcast::Sender<Arc<Batch>>,
}

impl Hub {
    pub fn new(capacity: usize) -> Self {
        Self {
            live: broadcast::channel(capacity.max(1)).0,
        }
    }

    /// Call once per committed revision, in revision order, after the commit is visible.
    pub fn publish(&self, batch: Batch) {
        // An error only means nobody is watching right now.
        let _ = self.live.send(Arc::new(batch));
    }

    /// Every batch published from now on, for tests that check what was (not) published.
    #[cfg(test)]
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        self.live.subscribe()
    }
}

/// Start a watch. The stream holds the backend only weakly, so dropping the store closes the
/// broadcast channel and ends every stream.
pub(crate) fn watch<L: Log>(
    log: &Arc<L>,
    prefix: &str,
    from: Revision,
    oldest: Revision,
) -> Result<WatchStream, StoreError> {
    // Subscribe before reading the revision: anything committed after that read is then
    // guaranteed to arrive on `live`, and anything before it is in the log.
    let mut live = log.hub().live.subscribe();
    let current = log.revision();
    let mut last = if from <= 0 {
        current
    } else if from < oldest {
        return Err(StoreError::Compacted {
            requested: from,
            oldest,
        });
    } else if from > current + 1 {
        // etcd would wait for it, but a revision this store never issued means the caller's
        // state comes from another store (or one that lost its data): it must re-list.
        return Err(StoreError::FutureRevision {
            requested: from,
            current,
        });
    } else {
        from - 1
    };
    let weak: Weak<L> = Arc::downgrade(log);
    let prefix = prefix.to_owned();

    Ok(Box::pin(stream! {
        loop {
            // Catch up from the log to the current revision.
            loop {
                let Some(log) = weak.upgrade() else { return };
                let upto = log.revision().min(last + READ_CHUNK);
                if upto <= last {
                    break;
                }
                let after = last;
                let read = tokio::task::spawn_blocking(move || log.read_log(after, upto)).await;
                match read.map_err(join_error).and_then(|r| r) {
                    Ok(batches) => {
                        for batch in batches {
                            for event in batch.events.iter().filter(|e| e.kv.key.starts_with(&prefix)) {
                                yield Ok(event.clone());
                            }
                        }
                        // Every revision holds at least one event, so (after, upto] is complete.
                        last = upto;
                    }
                    Err(err) => {
                        yield Err(err);
                        return;
                    }
                }
            }
            // Then follow live events until a gap shows up.
            loop {
                match live.recv().await {
                    Ok(batch) if batch.revision <= last => {}
                    Ok(batch) if batch.revision == last + 1 => {
                        for event in batch.events.iter().filter(|e| e.kv.key.starts_with(&prefix)) {
                            yield Ok(event.clone());
                        }
                        last = batch.revision;
                    }
                    // A revision was skipped or the receiver lagged: refill from the log, which
                    // already holds everything published.
                    Ok(_) | Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                }
            }
        }
    }))
}

/// Run blocking storage work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(join_error)
        .and_then(|r| r)
}

fn join_error(err: tokio::task::JoinError) -> StoreError {
    match err.try_into_panic() {
        // A bug in the storage code: let it surface where it belongs instead of as an error.
        Ok(panic) => std::panic::resume_unwind(panic),
        // Only when the runtime is shutting down.
        Err(_) => StoreError::Closed,
    }
}
