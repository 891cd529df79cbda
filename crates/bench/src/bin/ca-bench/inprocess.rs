//! The ceiling without network, TLS or gRPC: `Ca::sign_csr` called in this process on the
//! same CSRs, with a CA generated in a temporary directory the way the server makes its own.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_bench::procfs;
use isthmus_bench::stats::Percentiles;
use isthmus_ca::{Ca, CaConfig, SignRequest, SpiffeId};
use serde::Serialize;

/// What one in-process run did.
#[derive(Clone, Debug, Serialize)]
pub struct InProcessResult {
    pub what: String,
    pub threads: usize,
    pub certs: usize,
    pub elapsed_s: f64,
    pub per_s: f64,
    /// Time of each call.
    pub latency: Percentiles,
    /// CPU time of this process over the run, per call.
    pub cpu_ms_per_cert: f64,
}

/// Which part of the CA's work a run times.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// `sign_csr`: parse and verify the CSR, check it, build and sign the certificate.
    SignCsr,
    /// `check_csr` only: parse the PEM and DER, verify the CSR's signature, compare the SAN.
    Check,
    /// `sign` only, on requests already checked: build the certificate and sign it.
    Sign,
}

impl Step {
    fn label(self) -> &'static str {
        match self {
            Step::SignCsr => "in-process `Ca::sign_csr`",
            Step::Check => "in-process `Ca::check_csr` only (parse + verify the CSR)",
            Step::Sign => "in-process `Ca::sign` only (build + sign the certificate)",
        }
    }
}

/// The CA of the in-process runs: generated under `dir` like the server's first start.
pub fn load_ca(dir: &Path) -> anyhow::Result<Arc<Ca>> {
    let ca = Ca::load_or_create(&CaConfig::new(dir))
        .with_context(|| format!("cannot create a CA in {}", dir.display()))?;
    Ok(Arc::new(ca))
}

/// Every CSR once, from `threads` threads taking the next index from one counter. `Sign`
/// checks all CSRs first, untimed.
pub fn run(
    ca: &Arc<Ca>,
    identity: &SpiffeId,
    csrs: &Arc<[String]>,
    step: Step,
    threads: usize,
) -> anyhow::Result<InProcessResult> {
    let checked: Arc<[SignRequest]> = match step {
        Step::Sign => csrs
            .iter()
            .map(|c| ca.check_csr(c, identity, 0))
            .collect::<Result<Vec<_>, _>>()?
            .into(),
        Step::SignCsr | Step::Check => Arc::from([]),
    };
    let next = Arc::new(AtomicUsize::new(0));
    let me = std::process::id();
    let cpu0 = procfs::cpu_time(me)?;
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ca, identity, csrs, checked, next) = (
                ca.clone(),
                identity.clone(),
                csrs.clone(),
                checked.clone(),
                next.clone(),
            );
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut samples = Vec::with_capacity(csrs.len() / threads + 1);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= csrs.len() {
                        return Ok(samples);
                    }
                    let t = Instant::now();
                    match step {
                        Step::SignCsr => {
                            ca.sign_csr(&csrs[i], &identity, 0)?;
                        }
                        Step::Check => {
                            ca.check_csr(&csrs[i], &identity, 0)?;
                        }
                        Step::Sign => {
                            ca.sign(&checked[i])?;
                        }
                    }
                    samples.push(t.elapsed());
                }
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(csrs.len());
    for h in handles {
        let part = h
            .join()
            .map_err(|_| anyhow::anyhow!("an in-process signing thread panicked"))??;
        samples.extend(part);
    }
    let elapsed = start.elapsed();
    let cpu = procfs::cpu_time(me)?.saturating_sub(cpu0);
    Ok(InProcessResult {
        what: step.label().to_owned(),
        threads,
        certs: samples.len(),
        elapsed_s: elapsed.as_secs_f64(),
        per_s: samples.len() as f64 / elapsed.as_secs_f64(),
        latency: Percentiles::of(&mut samples),
        cpu_ms_per_cert: cpu.as_secs_f64() * 1000.0 / csrs.len() as f64,
    })
}
