//! Rate-limited logging of repeated failures: the first occurrence of a cause is logged, then
//! at most one line per interval, carrying how many were left out since the last one. A storm
//! (an accept loop out of file descriptors, a destination refusing every connect) costs a few
//! lines a minute instead of filling the disk.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The interval of [`global_limiter`].
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// A cause: what failed (`"accept"`, `"connect"`) and where (`"outbound"`, an address kind).
pub type Cause = (&'static str, &'static str);

#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    causes: Mutex<HashMap<Cause, Seen>>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    logged_at: Instant,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            causes: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to log this occurrence of `cause` now: `Some(n)` with the number of occurrences
    /// left out since the last line, or `None` to leave this one out.
    pub fn check(&self, cause: Cause) -> Option<u64> {
        self.check_at(cause, Instant::now())
    }

    pub fn check_at(&self, cause: Cause, now: Instant) -> Option<u64> {
        // Counters only: whatever panicked while holding the lock left them usable.
        let mut causes = self.causes.lock().unwrap_or_else(PoisonError::into_inner);
        match causes.get_mut(&cause) {
            None => {
                causes.insert(
                    cause,
                    Seen {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
            Some(seen) if now.saturating_duration_since(seen.logged_at) >= self.interval => {
                let n = seen.suppressed;
                *seen = Seen {
                    logged_at: now,
                    suppressed: 0,
                };
                Some(n)
            }
            Some(seen) => {
                seen.suppressed += 1;
                None
            }
        }
    }
}

/// The process's limiter, shared by every crate of the agent.
pub fn global_limiter() -> &'static LogLimiter {
    static LIMITER: OnceLock<LogLimiter> = OnceLock::new();
    LIMITER.get_or_init(|| LogLimiter::new(DEFAULT_INTERVAL))
}

/// `tracing::warn!` at most once per interval per cause, with `suppressed` = the lines left
/// out since the last one: `warn_limited!(("accept", "outbound"), error = %e, "accept failed")`.
#[macro_export]
macro_rules! warn_limited {
    ($cause:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $crate::limit::global_limiter().check($cause) {
            ::tracing::warn!(suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_then_one_summary_per_interval_per_cause() {
        let l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let a = ("connect", "outbound");
        let b = ("accept", "outbound");
        assert_eq!(l.check_at(a, t0), Some(0));
        // A storm within the interval: nothing logged.
        for i in 1..1000 {
            assert_eq!(l.check_at(a, t0 + Duration::from_millis(i)), None);
        }
        // Another cause is logged on its own.
        assert_eq!(l.check_at(b, t0 + Duration::from_secs(1)), Some(0));
        // After the interval: one line with the count left out.
        assert_eq!(l.check_at(a, t0 + Duration::from_secs(10)), Some(999));
        assert_eq!(l.check_at(a, t0 + Duration::from_secs(11)), None);
        assert_eq!(l.check_at(a, t0 + Duration::from_secs(25)), Some(1));
    }
}
