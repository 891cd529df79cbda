//! What an accept loop does when it cannot take a connection: past its bound it refuses new
//! ones (accepted and closed at once, counted) rather than failing every connection, and on an
//! accept error that comes from exhausted resources it backs off instead of spinning.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long an accept loop pauses after running out of file descriptors or memory: the error
/// repeats at once otherwise, one log line and one wake-up per try.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound on the connections one listener serves at once.
#[derive(Clone)]
pub struct ConnLimit {
    max: usize,
    permits: Arc<Semaphore>,
    on_refuse: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for ConnLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLimit")
            .field("max", &self.max)
            .field("available", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl ConnLimit {
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            max,
            permits: Arc::new(Semaphore::new(max)),
            on_refuse: None,
        }
    }

    /// No practical bound (tests, embedders that bound elsewhere).
    pub fn unbounded() -> Self {
        Self::new(Semaphore::MAX_PERMITS)
    }

    /// Called for each refused connection (the agent counts them in a metric).
    pub fn on_refuse(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_refuse = Some(Arc::new(f));
        self
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for one connection, held until it closes; `None` past the bound (counted and
    /// logged, rate-limited, under `listener`).
    pub fn try_acquire(&self, listener: &'static str) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                if let Some(f) = &self.on_refuse {
                    f();
                }
                crate::warn_limited!(
                    ("connection limit", listener),
                    listener,
                    max = self.max,
                    "refusing a connection: the listener is at its connection limit"
                );
                None
            }
        }
    }
}

/// Logs an accept error on `listener` (rate-limited) and, when it comes from exhausted
/// resources, waits a little before the next accept.
pub async fn accept_failed(listener: &'static str, e: &io::Error) {
    crate::warn_limited!(("accept", listener), listener, error = %e, "accept failed");
    if is_exhaustion(e) {
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

fn is_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn refuses_past_the_bound_and_counts() {
        let refused = Arc::new(AtomicUsize::new(0));
        let r = refused.clone();
        let limit = ConnLimit::new(2).on_refuse(move || {
            r.fetch_add(1, Ordering::Relaxed);
        });
        let a = limit.try_acquire("test").unwrap();
        let _b = limit.try_acquire("test").unwrap();
        assert!(limit.try_acquire("test").is_none());
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        drop(a);
        assert!(limit.try_acquire("test").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_only_on_exhaustion() {
        let start = tokio::time::Instant::now();
        accept_failed("test", &io::Error::from_raw_os_error(libc_emfile())).await;
        assert_eq!(start.elapsed(), ACCEPT_BACKOFF);
        let start = tokio::time::Instant::now();
        accept_failed("test", &io::Error::from(io::ErrorKind::ConnectionAborted)).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    fn libc_emfile() -> i32 {
        nix::errno::Errno::EMFILE as i32
    }
}
