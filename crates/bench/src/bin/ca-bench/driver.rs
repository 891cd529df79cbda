//! The run: CSRs made first, the in-process and openssl ceilings, then for each caller mode and
//! concurrency level a fresh `isthmus server` signing N CSRs over gRPC/TLS.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use isthmus_bench::procfs::{self, Memory};
use isthmus_bench::server;
use isthmus_bench::stats::{closed_loop, Percentiles};
use isthmus_ca::SpiffeId;
use serde::Serialize;

use crate::config::{Args, Mode, NAMESPACE, SERVICE_ACCOUNT, TRUST_DOMAIN, WARMUP_REQUESTS};
use crate::grpc::{self, Callers, Credentials};
use crate::inprocess::{self, InProcessResult, Step};
use crate::loopback;
use crate::openssl::{self, OpensslResult};
use crate::report;

/// One caller mode at one concurrency level, against its own server.
#[derive(Clone, Debug, Serialize)]
pub struct LevelResult {
    /// `isthmus server`, or the certificate API served in this process.
    pub system: String,
    pub caller: String,
    pub concurrency: usize,
    pub connections: usize,
    pub requested: usize,
    pub completed: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// True when the phase hit --phase-timeout-secs before issuing every request.
    pub stopped_at_deadline: bool,
    pub elapsed_s: f64,
    pub per_s: f64,
    pub latency: Percentiles,
    /// None when the server runs in this process.
    pub server_cpu_ms_per_cert: Option<f64>,
    /// CPU time of this bench process per certificate: the gRPC/TLS client, and the server too
    /// when it runs in this process.
    pub process_cpu_ms_per_cert: f64,
    pub memory_after: Option<Memory>,
    /// Token uses the server's ledger gained during the timed phase (token modes only).
    pub token_uses_recorded: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct RunResult {
    pub requests: usize,
    pub connections: usize,
    pub phase_timeout_s: u64,
    pub csr_generation_s: f64,
    pub levels: Vec<LevelResult>,
    pub problems: Vec<String>,
    pub inprocess: Vec<InProcessResult>,
    pub openssl: Option<OpensslResult>,
    pub openssl_problem: Option<String>,
}

/// A first request whose answer is checked, a warm-up, then the timed load; CPU time of the
/// server process (`server_pid`, if separate) and of this one over the timed load.
async fn measure(
    args: &Args,
    callers: Arc<Callers>,
    c: usize,
    identity: &SpiffeId,
    server_pid: Option<u32>,
) -> anyhow::Result<LevelResult> {
    let first = callers
        .sign(0, 0)
        .await
        .context("the first certificate request failed")?;
    grpc::check_chain(&first, identity).context("the server's certificate")?;
    let op = |callers: Arc<Callers>| {
        move |worker: usize, i: usize| {
            let callers = callers.clone();
            async move { callers.sign(worker, i).await.map(drop) }
        }
    };
    let warmup = closed_loop(
        WARMUP_REQUESTS.max(2 * c),
        c,
        args.phase_timeout(),
        op(callers.clone()),
    )
    .await;
    if let Some(e) = warmup.first_error {
        anyhow::bail!("warm-up failed ({} errors); first: {e}", warmup.errors);
    }
    let me = std::process::id();
    let server0 = server_pid.map(procfs::cpu_time).transpose()?;
    let me0 = procfs::cpu_time(me)?;
    let out = closed_loop(args.requests, c, args.phase_timeout(), op(callers)).await;
    let me_cpu = procfs::cpu_time(me)?.saturating_sub(me0);
    let server_cpu = match (server_pid, server0) {
        (Some(pid), Some(c0)) => Some(procfs::cpu_time(pid)?.saturating_sub(c0)),
        _ => None,
    };
    let memory_after = server_pid.map(procfs::memory).transpose()?;
    let completed = out.samples.len();
    let per_cert = |d: Duration| d.as_secs_f64() * 1000.0 / completed.max(1) as f64;
    let result = LevelResult {
        system: String::new(),
        caller: String::new(),
        concurrency: c,
        connections: args.connections.min(c),
        requested: args.requests,
        completed,
        errors: out.errors,
        first_error: out.first_error.clone(),
        stopped_at_deadline: out.stopped_at_deadline,
        elapsed_s: out.elapsed.as_secs_f64(),
        per_s: out.ops_per_s(),
        latency: out.latency(),
        server_cpu_ms_per_cert: server_cpu.map(per_cert),
        process_cpu_ms_per_cert: per_cert(me_cpu),
        memory_after,
        token_uses_recorded: None,
    };
    Ok(result)
}

fn log_level(r: &LevelResult) {
    eprintln!(
        "{}, {}: c={}: {} ok, {} errors in {:.1} s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        r.system,
        r.caller,
        r.concurrency,
        r.completed,
        r.errors,
        r.elapsed_s,
        r.per_s,
        r.latency.p50_ms,
        r.latency.p99_ms,
    );
}

/// One mode at one level on a fresh `isthmus server` in `dir`.
async fn server_level(
    args: &Args,
    dir: &Path,
    client: reqwest::Client,
    mode: Mode,
    c: usize,
    identity: &SpiffeId,
    csrs: &Arc<[String]>,
) -> anyhow::Result<LevelResult> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let started = server::start(&args.isthmus_bin, dir, client).await?;
    let pid = started.process.pid();
    let credentials = Credentials::from_admin(&started.admin, mode, c).await?;
    let callers = Arc::new(
        Callers::connect(
            &started.endpoints.grpc,
            credentials,
            args.connections,
            csrs.clone(),
        )
        .await?,
    );
    eprintln!(
        "isthmus server, {}: {} certificates at concurrency {c} (pid {pid})",
        mode.label(),
        args.requests,
    );
    let token_mode = mode != Mode::Cert;
    // Read before the first request and the warm-up, whose uses are subtracted below: each
    // of them was one use, as `measure` fails on any error there.
    let uses0 = if token_mode {
        Some(grpc::token_uses(&started.admin).await?)
    } else {
        None
    };
    let mut result = measure(args, callers, c, identity, Some(pid)).await?;
    if let Some(u0) = uses0 {
        let warmup = 1 + WARMUP_REQUESTS.max(2 * c) as u64;
        let uses = grpc::token_uses(&started.admin).await?;
        result.token_uses_recorded = Some(uses.saturating_sub(u0 + warmup));
    }
    started.process.stop().await;
    result.system = "isthmus server".into();
    result.caller = mode.label().into();
    log_level(&result);
    Ok(result)
}

/// The certificate API served in this process, client certificate callers.
async fn loopback_level(
    args: &Args,
    dir: &Path,
    c: usize,
    identity: &SpiffeId,
    csrs: &Arc<[String]>,
) -> anyhow::Result<LevelResult> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let server = loopback::start(dir, identity).await?;
    let callers = Arc::new(
        Callers::connect(
            &server.url,
            Credentials {
                root_pem: server.credentials.root_pem.clone(),
                tokens: Vec::new(),
                client_cert: server.credentials.client_cert.clone(),
            },
            args.connections,
            csrs.clone(),
        )
        .await?,
    );
    eprintln!(
        "in-process certificate API: {} certificates at concurrency {c}",
        args.requests
    );
    let measured = measure(args, callers, c, identity, None).await;
    server.stop().await;
    let mut result = measured?;
    result.system = "in-process gRPC/TLS (same service, no store)".into();
    result.caller = Mode::Cert.label().into();
    log_level(&result);
    Ok(result)
}

/// The in-process runs: `sign_csr` on one thread and on `threads`, then its two halves.
fn ceilings(
    work: &Path,
    identity: &SpiffeId,
    csrs: &Arc<[String]>,
    threads: usize,
) -> anyhow::Result<(Vec<InProcessResult>, std::path::PathBuf)> {
    let ca_dir = work.join("inprocess-ca");
    let ca = inprocess::load_ca(&ca_dir)?;
    let mut runs = vec![(Step::SignCsr, 1)];
    if threads > 1 {
        runs.push((Step::SignCsr, threads));
    }
    runs.extend([(Step::Check, 1), (Step::Sign, 1)]);
    let mut results = Vec::new();
    for (step, t) in runs {
        let r = inprocess::run(&ca, identity, csrs, step, t)?;
        eprintln!(
            "{}, {t} thread(s): {:.0}/s, p50 {:.3} ms, CPU {:.3} ms/cert",
            r.what, r.per_s, r.latency.p50_ms, r.cpu_ms_per_cert
        );
        results.push(r);
    }
    Ok((results, ca_dir))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    let builder = tempfile::Builder::new().prefix("ca-bench-").to_owned();
    let work = match &args.work_dir {
        Some(d) => builder.tempdir_in(d),
        None => builder.tempdir(),
    }
    .context("cannot create the bench's work directory")?;
    let identity = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, SERVICE_ACCOUNT)?;

    let n = args.requests;
    let id = identity.clone();
    let (csrs, made_in) =
        tokio::task::spawn_blocking(move || crate::csr::generate(&id, n)).await??;
    eprintln!(
        "{n} CSRs (ECDSA P-256) made in {:.2} s, before any timing",
        made_in.as_secs_f64()
    );

    // Before any server runs: the openssl phase counts the CPU of exited children.
    let (w, id, c, threads) = (
        work.path().to_owned(),
        identity.clone(),
        csrs.clone(),
        args.threads(),
    );
    let (inprocess, ca_dir) =
        tokio::task::spawn_blocking(move || ceilings(&w, &id, &c, threads)).await??;
    let (mut openssl, mut openssl_problem) = (None, None);
    if args.openssl_certs > 0 {
        let (bin, w, id, c, k) = (
            args.openssl_bin.clone(),
            work.path().join("openssl"),
            identity.clone(),
            csrs.clone(),
            args.openssl_certs,
        );
        match tokio::task::spawn_blocking(move || openssl::run(&bin, &ca_dir, &w, &id, &c, k))
            .await?
        {
            Ok(r) => {
                eprintln!(
                    "openssl x509 -req, a process per cert: {:.0}/s, p50 {:.2} ms",
                    r.per_s, r.latency.p50_ms
                );
                openssl = Some(r);
            }
            Err(e) => {
                eprintln!("openssl comparison failed: {e:#}");
                openssl_problem = Some(format!("{e:#}"));
            }
        }
    } else {
        openssl_problem = Some("not run (--openssl-certs 0)".into());
    }

    // One client for the admin API; the certificate API has its own connections per level.
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")?;
    let (mut levels, mut problems) = (Vec::new(), Vec::new());
    for &mode in &args.modes {
        for &c in &args.concurrency {
            let dir = work.path().join(format!("{mode:?}-c{c}").to_lowercase());
            match server_level(&args, &dir, client.clone(), mode, c, &identity, &csrs).await {
                Ok(r) => levels.push(r),
                Err(e) => {
                    let p = format!("{} c={c}: no figures: {e:#}", mode.label());
                    eprintln!("{p}");
                    problems.push(p);
                }
            }
        }
    }

    for &c in &args.loopback_concurrency {
        let dir = work.path().join(format!("loopback-c{c}"));
        match loopback_level(&args, &dir, c, &identity, &csrs).await {
            Ok(r) => levels.push(r),
            Err(e) => {
                let p = format!("in-process gRPC/TLS c={c}: no figures: {e:#}");
                eprintln!("{p}");
                problems.push(p);
            }
        }
    }

    let result = RunResult {
        requests: args.requests,
        connections: args.connections,
        phase_timeout_s: args.phase_timeout_secs,
        csr_generation_s: made_in.as_secs_f64(),
        levels,
        problems,
        inprocess,
        openssl,
        openssl_problem,
    };
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", report::markdown(&result));
    Ok(())
}
