//! The closed-loop load every bench runs, and the percentiles of its latencies.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles; sorts `samples`.
    pub fn of(samples: &mut [Duration]) -> Self {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let rank = |p: f64| {
            samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        let total: Duration = samples.iter().sum();
        Percentiles {
            count: samples.len(),
            p50_ms: ms(rank(0.50)),
            p99_ms: ms(rank(0.99)),
            max_ms: ms(samples[samples.len() - 1]),
            mean_ms: ms(total) / samples.len() as f64,
        }
    }
}

/// What a closed-loop load did.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// (request index, latency) of each request that succeeded, in completion order per worker.
    pub samples: Vec<(usize, Duration)>,
    pub errors: usize,
    pub first_error: Option<String>,
    /// True when the deadline came before every request was issued.
    pub stopped_at_deadline: bool,
    pub elapsed: Duration,
}

impl LoadOutcome {
    fn merge(&mut self, other: LoadOutcome) {
        self.samples.extend(other.samples);
        self.errors += other.errors;
        self.stopped_at_deadline |= other.stopped_at_deadline;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn fail(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    pub fn ops_per_s(&self) -> f64 {
        self.samples.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// Percentiles of every successful request's latency.
    pub fn latency(&self) -> Percentiles {
        let mut d: Vec<Duration> = self.samples.iter().map(|(_, d)| *d).collect();
        Percentiles::of(&mut d)
    }
}

/// `n` requests from `concurrency` workers sharing one counter, each worker waiting for its
/// answer before sending the next; none starts after `timeout`. `op(worker, i)` is request `i`.
pub async fn closed_loop<F, Fut>(
    n: usize,
    concurrency: usize,
    timeout: Duration,
    op: F,
) -> LoadOutcome
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + timeout;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (op, next) = (op.clone(), next.clone());
        tasks.spawn(async move {
            let mut out = LoadOutcome::default();
            loop {
                if Instant::now() >= deadline {
                    out.stopped_at_deadline = next.load(Ordering::Relaxed) < n;
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                match op(worker, i).await {
                    Ok(()) => out.samples.push((i, t.elapsed())),
                    Err(e) => out.fail(format!("{e:#}")),
                }
            }
            out
        });
    }
    let mut all = LoadOutcome {
        samples: Vec::with_capacity(n),
        ..LoadOutcome::default()
    };
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(out) => all.merge(out),
            Err(e) => all.fail(format!("load task failed: {e}")),
        }
    }
    all.elapsed = start.elapsed();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut d: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut d);
        assert_eq!((p.p50_ms, p.p99_ms, p.max_ms), (50.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&mut []).count, 0);
    }

    #[tokio::test]
    async fn closed_loop_issues_each_request_once_and_counts_failures() {
        let out = closed_loop(100, 7, Duration::from_secs(30), |_, i| async move {
            anyhow::ensure!(i % 10 != 3, "request {i} refused");
            Ok(())
        })
        .await;
        let mut seen: Vec<usize> = out.samples.iter().map(|(i, _)| *i).collect();
        seen.sort_unstable();
        assert_eq!(seen.len(), 90);
        seen.dedup();
        assert_eq!(seen.len(), 90);
        assert_eq!(out.errors, 10);
        assert!(out.first_error.unwrap().contains("refused"));
        assert!(!out.stopped_at_deadline);
    }
}
