//! Retry budgets (beyond Istio, as Linkerd and Finagle do): retries to a destination may add
//! at most `ratio` of its requests over the last `window`, plus `min_per_second` retries a
//! second, so that when every endpoint fails, retries cannot multiply the load on it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Retries may add 20% to the requests of the last 10 s.
pub const DEFAULT_RATIO: f64 = 0.2;
/// Plus 10 retries a second, so a quiet destination can still retry.
pub const DEFAULT_MIN_PER_SECOND: u32 = 10;
const WINDOW_SECONDS: usize = 10;

#[derive(Debug)]
struct Window {
    /// Per-second buckets: (second number, requests, retries).
    buckets: [(u64, u32, u32); WINDOW_SECONDS],
}

impl Window {
    fn new() -> Self {
        Self {
            buckets: [(u64::MAX, 0, 0); WINDOW_SECONDS],
        }
    }

    fn bucket(&mut self, second: u64) -> &mut (u64, u32, u32) {
        let b = &mut self.buckets[(second % WINDOW_SECONDS as u64) as usize];
        if b.0 != second {
            *b = (second, 0, 0);
        }
        b
    }

    fn totals(&self, second: u64) -> (u32, u32) {
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && second.saturating_sub(b.0) < WINDOW_SECONDS as u64)
            .fold((0, 0), |(r, t), b| (r + b.1, t + b.2))
    }
}

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    start: Instant,
    windows: Mutex<HashMap<String, Window, foldhash::fast::RandomState>>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(DEFAULT_RATIO, DEFAULT_MIN_PER_SECOND)
    }
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Self {
            ratio,
            min_per_second,
            start: Instant::now(),
            windows: Mutex::new(HashMap::default()),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    /// Counts one original request to `dest`.
    pub fn request(&self, dest: &str, now: Instant) {
        let s = self.second(now);
        let mut w = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if w.len() > 4096 {
            w.retain(|_, win| win.totals(s) != (0, 0));
        }
        // The key is copied only the first time a destination is seen.
        let win = match w.get_mut(dest) {
            Some(win) => win,
            None => w.entry(dest.to_owned()).or_insert_with(Window::new),
        };
        win.bucket(s).1 += 1;
    }

    /// Takes one retry from `dest`'s budget; false (and nothing taken) when it is spent.
    pub fn try_retry(&self, dest: &str, now: Instant) -> bool {
        let s = self.second(now);
        let mut w = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let win = w.entry(dest.to_owned()).or_insert_with(Window::new);
        let (requests, retries) = win.totals(s);
        let elapsed = (s + 1).min(WINDOW_SECONDS as u64) as f64;
        let allowed = self.ratio * requests as f64 + self.min_per_second as f64 * elapsed;
        if (retries as f64) < allowed {
            win.bucket(s).2 += 1;
            true
        } else {
            false
        }
    }

    pub fn window() -> Duration {
        Duration::from_secs(WINDOW_SECONDS as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_to_a_fraction_of_requests_plus_a_floor() {
        let b = RetryBudget::new(0.2, 10);
        let t = Instant::now();
        // 1,000 requests in one second, each wanting a retry (every endpoint failing).
        let mut granted = 0;
        for _ in 0..1000 {
            b.request("reviews", t);
            if b.try_retry("reviews", t) {
                granted += 1;
            }
        }
        // 20% of 1,000 plus a floor of 10 in the first second.
        assert!((200..=211).contains(&granted), "{granted} retries granted");
        // Another destination has its own budget.
        assert!(b.try_retry("ratings", t));
    }

    #[test]
    fn a_quiet_destination_still_gets_its_floor_and_the_window_moves_on() {
        let b = RetryBudget::new(0.2, 10);
        let t = Instant::now();
        let granted = (0..50).filter(|_| b.try_retry("db", t)).count();
        assert_eq!(granted, 10);
        // Eleven seconds later the old retries have left the window.
        let later = t + Duration::from_secs(11);
        assert!(b.try_retry("db", later));
    }
}
