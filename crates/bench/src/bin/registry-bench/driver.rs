//! The workload, run the same way against every system: N registrations at each concurrency
//! level on a fresh server, then M sequential writes timed until a connected watcher sees them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use isthmus_bench::procfs::{self, Memory, ServerProcess};
use isthmus_bench::stats::{closed_loop, Percentiles};

use crate::config::{Args, EVENT_TIMEOUT};
use crate::{etcd, isthmus, report};

pub const NAMESPACE: &str = "bench";
/// Indices of the watch phase's writes start here, clear of the load's.
const WATCH_BASE: usize = 1_000_000;

/// Registration `i` is service `svc-<i>` with one address, so each one creates a service and a
/// workload entry.
pub fn service(i: usize) -> String {
    format!("svc-{i}")
}

/// Distinct for every i below 15 million, never a .0 or .255 address.
pub fn address(i: usize) -> String {
    format!(
        "10.{}.{}.{}",
        1 + i / 62_500,
        (i / 250) % 250 + 1,
        i % 250 + 1
    )
}

/// The workload entry Isthmus creates for registration `i` (`<service>-<ip with dashes>`).
pub fn entry_name(i: usize) -> String {
    format!("{}-{}", service(i), address(i).replace('.', "-"))
}

/// One system under test, as the workload sees it.
pub trait Target: Send + Sync + 'static {
    /// Registration `i`; Ok only once the system acknowledged it as durable.
    fn register(&self, i: usize) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// The name under which the watcher reports registration `i`.
    fn watch_key(&self, i: usize) -> String;
    /// Connects a watcher on workload entries that sends (name, time received) per event;
    /// returns once the watch request was accepted.
    fn watch(
        &self,
        events: mpsc::UnboundedSender<(String, Instant)>,
    ) -> impl Future<Output = anyhow::Result<JoinHandle<()>>> + Send;
}

/// Several servers of one system as one target: registration `i` goes to server `i % n`, the
/// watcher is on server 0 (so its events come from writes through the others too). The first
/// server's process is the one measured; the rest live as long as the target.
pub struct Many<T> {
    pub members: Vec<Arc<T>>,
    pub _keep: Vec<ServerProcess>,
}

impl<T: Target> Target for Many<T> {
    async fn register(&self, i: usize) -> anyhow::Result<()> {
        self.members[i % self.members.len()].register(i).await
    }
    fn watch_key(&self, i: usize) -> String {
        self.members[0].watch_key(i)
    }
    async fn watch(
        &self,
        events: mpsc::UnboundedSender<(String, Instant)>,
    ) -> anyhow::Result<JoinHandle<()>> {
        self.members[0].watch(events).await
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub concurrency: usize,
    pub requested: usize,
    pub completed: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// True when the phase hit --phase-timeout-secs before issuing every request.
    pub stopped_at_deadline: bool,
    pub elapsed_s: f64,
    pub ops_per_s: f64,
    pub latency: Percentiles,
    /// Median latency of the first and the last tenth of the requests, in issue order: a rising
    /// figure means each write costs more as the store grows.
    pub first_tenth_p50_ms: f64,
    pub last_tenth_p50_ms: f64,
    pub server_cpu_ms_per_op: f64,
    pub memory_after: Memory,
}

#[derive(Clone, Debug, Serialize)]
pub struct WatchResult {
    pub writes: usize,
    /// Write sent → the watcher holds its event.
    pub write_to_event: Percentiles,
    /// Write sent → the write acknowledged, for the same writes.
    pub ack: Percentiles,
    pub errors: usize,
    pub first_error: Option<String>,
    /// Objects already stored when the watcher connected (from the last load phase).
    pub stored_before: usize,
    pub memory_after: Memory,
}

#[derive(Clone, Debug, Serialize)]
pub struct SystemResult {
    pub name: String,
    pub version: String,
    pub loads: Vec<LoadResult>,
    pub watch: Option<WatchResult>,
    /// Why the system has no (or only some) figures: not installed, failed to start, ...
    pub problem: Option<String>,
}

impl SystemResult {
    fn missing(name: &str, version: &str, problem: String) -> Self {
        SystemResult {
            name: name.into(),
            version: version.into(),
            loads: Vec::new(),
            watch: None,
            problem: Some(problem),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RunResult {
    pub registrations: usize,
    pub watch_writes: usize,
    pub phase_timeout_s: u64,
    pub fsync_probe: Option<procfs::FsyncProbe>,
    pub isthmus: SystemResult,
    /// One Isthmus server on a one-member etcd (`--store etcd`), when etcd is installed.
    pub isthmus_etcd: Option<SystemResult>,
    /// With `--cluster`: three Isthmus replicas on a three-member etcd, and that etcd alone.
    pub isthmus_cluster: Option<SystemResult>,
    pub etcd_cluster: Option<SystemResult>,
    pub etcd: SystemResult,
}

fn tenth_p50(samples: &[(usize, Duration)], last: bool) -> f64 {
    let k = (samples.len() / 10).max(1).min(samples.len());
    let part = if last {
        &samples[samples.len() - k..]
    } else {
        &samples[..k]
    };
    let mut d: Vec<Duration> = part.iter().map(|(_, d)| *d).collect();
    Percentiles::of(&mut d).p50_ms
}

async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    key: &str,
) -> Option<Instant> {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((k, at))) if k == key => return Some(at),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

/// M sequential writes with one watcher connected: each timed from sending the request to the
/// watcher holding the event, whichever of the event and the acknowledgement comes last.
async fn watch_latency<T: Target>(target: &Arc<T>, writes: usize) -> anyhow::Result<WatchResult> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = target.watch(tx).await.context("cannot open the watch")?;
    // The first write proves the watcher is live (and drains the initial state, if any).
    let sentinel = WATCH_BASE - 1;
    target
        .register(sentinel)
        .await
        .context("the first write of the watch phase failed")?;
    let mut stored_before = 0usize;
    let key = target.watch_key(sentinel);
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT * 3;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((k, _))) if k == key => break,
            Ok(Some(_)) => stored_before += 1,
            Ok(None) | Err(_) => {
                anyhow::bail!("the watcher did not report the first write of the watch phase")
            }
        }
    }
    let (mut to_event, mut acks) = (Vec::with_capacity(writes), Vec::with_capacity(writes));
    let (mut errors, mut first_error) = (0usize, None);
    for j in 0..writes {
        let i = WATCH_BASE + j;
        let key = target.watch_key(i);
        let t = Instant::now();
        if let Err(e) = target.register(i).await {
            errors += 1;
            first_error.get_or_insert_with(|| format!("{e:#}"));
            continue;
        }
        acks.push(t.elapsed());
        match wait_for(&mut rx, &key).await {
            Some(at) => to_event.push(at.saturating_duration_since(t)),
            None => {
                errors += 1;
                first_error.get_or_insert_with(|| {
                    format!("no watch event for {key} within {EVENT_TIMEOUT:?}")
                });
            }
        }
    }
    watcher.abort();
    Ok(WatchResult {
        writes,
        write_to_event: Percentiles::of(&mut to_event),
        ack: Percentiles::of(&mut acks),
        errors,
        first_error,
        stored_before,
        memory_after: Memory::default(),
    })
}

/// Every concurrency level on a fresh server in its own directory, then the watch phase on the
/// last one (which still holds its N registrations). Hands the last server back still running.
async fn bench_system<T, S, Fut>(
    args: &Args,
    work: &Path,
    label: &str,
    start: S,
) -> (
    Vec<LoadResult>,
    Option<WatchResult>,
    Option<String>,
    Option<(Arc<T>, ServerProcess)>,
)
where
    T: Target,
    S: Fn(PathBuf) -> Fut,
    Fut: Future<Output = anyhow::Result<(Arc<T>, ServerProcess)>>,
{
    let mut loads = Vec::new();
    let mut last = None;
    for (k, &c) in args.concurrency.iter().enumerate() {
        let dir = work.join(format!("{label}-c{c}"));
        let started = match std::fs::create_dir_all(&dir) {
            Ok(()) => start(dir).await,
            Err(e) => {
                Err(anyhow::Error::from(e).context(format!("cannot create {}", dir.display())))
            }
        };
        let (target, server) = match started {
            Ok(s) => s,
            Err(e) => return (loads, None, Some(format!("{e:#}")), None),
        };
        let pid = server.pid();
        eprintln!(
            "{label}: {} registrations at concurrency {c} (pid {pid})",
            args.registrations
        );
        let cpu0 = procfs::cpu_time(pid).unwrap_or_default();
        let t = target.clone();
        let mut raw = closed_loop(args.registrations, c, args.phase_timeout(), move |_, i| {
            let t = t.clone();
            async move { t.register(i).await }
        })
        .await;
        let cpu = procfs::cpu_time(pid)
            .unwrap_or_default()
            .saturating_sub(cpu0);
        let memory_after = procfs::memory(pid).unwrap_or_default();
        raw.samples.sort_unstable_by_key(|(i, _)| *i);
        let completed = raw.samples.len();
        let (latency, ops_per_s) = (raw.latency(), raw.ops_per_s());
        let result = LoadResult {
            concurrency: c,
            requested: args.registrations,
            completed,
            errors: raw.errors,
            first_error: raw.first_error,
            stopped_at_deadline: raw.stopped_at_deadline,
            elapsed_s: raw.elapsed.as_secs_f64(),
            ops_per_s,
            first_tenth_p50_ms: tenth_p50(&raw.samples, false),
            last_tenth_p50_ms: tenth_p50(&raw.samples, true),
            latency,
            server_cpu_ms_per_op: if completed > 0 {
                cpu.as_secs_f64() * 1000.0 / completed as f64
            } else {
                0.0
            },
            memory_after,
        };
        eprintln!(
            "{label}: c={c}: {completed} ok, {} errors in {:.1} s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
            result.errors, result.elapsed_s, result.ops_per_s, result.latency.p50_ms, result.latency.p99_ms
        );
        loads.push(result);
        if k + 1 == args.concurrency.len() {
            last = Some((target, server));
        } else {
            server.stop().await;
        }
    }
    let Some((target, server)) = last else {
        return (loads, None, None, None);
    };
    eprintln!(
        "{label}: write→watch latency, {} sequential writes",
        args.watch_writes
    );
    let watch = match watch_latency(&target, args.watch_writes).await {
        Ok(mut w) => {
            w.memory_after = procfs::memory(server.pid()).unwrap_or_default();
            eprintln!(
                "{label}: write→event p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                w.write_to_event.p50_ms, w.write_to_event.p99_ms, w.write_to_event.max_ms
            );
            Some(w)
        }
        Err(e) => {
            let problem = format!("watch phase failed: {e:#}");
            return (loads, None, Some(problem), Some((target, server)));
        }
    };
    (loads, watch, None, Some((target, server)))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    let builder = tempfile::Builder::new()
        .prefix("registry-bench-")
        .to_owned();
    let work = match &args.work_dir {
        Some(d) => builder.tempdir_in(d),
        None => builder.tempdir(),
    }
    .context("cannot create the bench's work directory")?;
    // One client for everything: HTTP/1.1 keep-alive, a connection per concurrent request.
    let client = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")?;

    let probe_dir = work.path().to_owned();
    let probes = args.fsync_probes;
    let fsync_probe = if probes == 0 {
        None
    } else {
        let p =
            tokio::task::spawn_blocking(move || procfs::fsync_probe(&probe_dir, probes)).await?;
        match p {
            Ok(p) => {
                eprintln!(
                    "disk: 4 KiB + fdatasync p50 {:.2} ms (overwrite), {:.2} ms (append)",
                    p.overwrite.p50_ms, p.append.p50_ms
                );
                Some(p)
            }
            Err(e) => {
                eprintln!("fsync probe failed: {e:#}");
                None
            }
        }
    };

    let bin = args.isthmus_bin.clone();
    let c = client.clone();
    let (loads, watch, problem, last) = bench_system(&args, work.path(), "isthmus", |dir| {
        isthmus::start(bin.clone(), dir, c.clone())
    })
    .await;
    let mut templates = None;
    if let Some((target, server)) = last {
        templates = target
            .templates()
            .await
            .map_err(|e| eprintln!("cannot read stored objects: {e:#}"))
            .ok();
        server.stop().await;
    }
    let isthmus_result = SystemResult {
        name: "Isthmus".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        loads,
        watch,
        problem,
    };

    let isthmus_etcd = if args.no_etcd || etcd::version(&args.etcd_bin).is_err() {
        None
    } else {
        let (bin, etcd_bin) = (args.isthmus_bin.clone(), args.etcd_bin.clone());
        let c = client.clone();
        let (loads, watch, problem, last) =
            bench_system(&args, work.path(), "isthmus-on-etcd", |dir| {
                isthmus::start_on_etcd(bin.clone(), etcd_bin.clone(), dir, c.clone())
            })
            .await;
        if let Some((_, server)) = last {
            server.stop().await;
        }
        Some(SystemResult {
            name: "Isthmus on etcd".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            loads,
            watch,
            problem,
        })
    };

    let (mut isthmus_cluster, mut etcd_cluster) = (None, None);
    if args.cluster && isthmus_etcd.is_some() {
        let (bin, etcd_bin) = (args.isthmus_bin.clone(), args.etcd_bin.clone());
        let c = client.clone();
        let (loads, watch, problem, last) = bench_system(&args, work.path(), "isthmus-x3", |dir| {
            isthmus::start_cluster(bin.clone(), etcd_bin.clone(), dir, c.clone(), 3)
        })
        .await;
        if let Some((_, server)) = last {
            server.stop().await;
        }
        isthmus_cluster = Some(SystemResult {
            name: "Isthmus ×3 on etcd ×3".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            loads,
            watch,
            problem,
        });
    }

    let etcd_result = if args.no_etcd {
        SystemResult::missing("etcd", "", "not run (--no-etcd)".into())
    } else {
        match etcd::version(&args.etcd_bin) {
            Err(e) => {
                SystemResult::missing("etcd", "", format!("not available, no figures: {e:#}"))
            }
            Ok(version) => {
                let templates = templates.unwrap_or_else(isthmus::Templates::fallback);
                let bin = args.etcd_bin.clone();
                let (loads, watch, problem, last) =
                    bench_system(&args, work.path(), "etcd", |dir| {
                        etcd::start(bin.clone(), dir, client.clone(), templates.clone())
                    })
                    .await;
                if let Some((_, server)) = last {
                    server.stop().await;
                }
                if args.cluster {
                    let bin = args.etcd_bin.clone();
                    let t = templates.clone();
                    let (loads, watch, problem, last) =
                        bench_system(&args, work.path(), "etcd-x3", |dir| {
                            let (bin, c, t) = (bin.clone(), client.clone(), t.clone());
                            async move {
                                let (members, mut processes) =
                                    etcd::start_cluster(bin, dir, c, t, 3).await?;
                                let first = processes.remove(0);
                                Ok((
                                    Arc::new(Many {
                                        members,
                                        _keep: processes,
                                    }),
                                    first,
                                ))
                            }
                        })
                        .await;
                    if let Some((_, server)) = last {
                        server.stop().await;
                    }
                    etcd_cluster = Some(SystemResult {
                        name: "etcd ×3".into(),
                        version: version.clone(),
                        loads,
                        watch,
                        problem,
                    });
                }
                SystemResult {
                    name: "etcd".into(),
                    version,
                    loads,
                    watch,
                    problem,
                }
            }
        }
    };

    let result = RunResult {
        registrations: args.registrations,
        watch_writes: args.watch_writes,
        phase_timeout_s: args.phase_timeout_secs,
        fsync_probe,
        isthmus: isthmus_result,
        isthmus_etcd,
        isthmus_cluster,
        etcd_cluster,
        etcd: etcd_result,
    };
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", report::markdown(&result));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_and_usable() {
        let mut seen = std::collections::HashSet::new();
        for i in (0..200_000).chain(WATCH_BASE - 1..WATCH_BASE + 1_000) {
            let a = address(i);
            assert!(a.parse::<std::net::Ipv4Addr>().is_ok(), "{a}");
            assert!(!a.ends_with(".0") && !a.ends_with(".255"), "{a}");
            assert!(seen.insert(a.clone()), "{a} repeats at {i}");
        }
    }
}
