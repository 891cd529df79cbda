//! The command-line comparison: `openssl x509 -req` signing the same CSRs with the same CA key,
//! one process per certificate (so mostly process start and key loading), and
//! `openssl speed ecdsap256` for what one core does in raw P-256 signatures.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_bench::stats::Percentiles;
use isthmus_ca::SpiffeId;
use nix::sys::resource::{getrusage, UsageWho};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct OpensslResult {
    pub version: String,
    pub certs: usize,
    pub elapsed_s: f64,
    pub per_s: f64,
    pub latency: Percentiles,
    /// CPU time of the openssl processes (user + system, from RUSAGE_CHILDREN), per cert.
    pub cpu_ms_per_cert: f64,
    /// `openssl speed -seconds 1 ecdsap256`: P-256 signatures and verifications per second on
    /// one core.
    pub speed_sign_per_s: Option<f64>,
    pub speed_verify_per_s: Option<f64>,
}

/// The extensions `Ca::sign` puts on a workload certificate, for `openssl x509 -extfile`.
fn extensions(identity: &SpiffeId) -> String {
    format!(
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth, clientAuth\n\
         subjectAltName = critical, URI:{identity}\n\
         authorityKeyIdentifier = keyid\n"
    )
}

fn children_cpu() -> anyhow::Result<Duration> {
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    Ok(tv(usage.user_time()) + tv(usage.system_time()))
}

/// Signs the first `n` CSRs with `bin x509 -req`, one process each, with the CA in `ca_dir`
/// (Istio's `ca-cert.pem` and `ca-key.pem`). No other child of this process may exit while this
/// runs: their CPU time would be counted.
pub fn run(
    bin: &Path,
    ca_dir: &Path,
    work: &Path,
    identity: &SpiffeId,
    csrs: &[String],
    n: usize,
) -> anyhow::Result<OpensslResult> {
    let version = Command::new(bin)
        .arg("version")
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    anyhow::ensure!(version.status.success(), "{} version failed", bin.display());
    let version = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::create_dir_all(work)?;
    let ext = work.join("workload.ext");
    std::fs::write(&ext, extensions(identity))?;
    let paths: Vec<_> = (0..n.min(csrs.len()))
        .map(|i| {
            let p = work.join(format!("csr-{i}.pem"));
            std::fs::write(&p, &csrs[i]).map(|()| p)
        })
        .collect::<Result<_, _>>()?;
    let out = work.join("cert.pem");
    let (ca_cert, ca_key) = (ca_dir.join("ca-cert.pem"), ca_dir.join("ca-key.pem"));
    let mut samples = Vec::with_capacity(paths.len());
    let cpu0 = children_cpu()?;
    let start = Instant::now();
    for (i, csr) in paths.iter().enumerate() {
        let t = Instant::now();
        let status = Command::new(bin)
            .args(["x509", "-req", "-days", "1", "-in"])
            .arg(csr)
            .arg("-CA")
            .arg(&ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        anyhow::ensure!(
            status.status.success(),
            "openssl x509 -req failed on CSR {i}: {}",
            String::from_utf8_lossy(&status.stderr).trim()
        );
        samples.push(t.elapsed());
        if i == 0 {
            crate::grpc::check_chain(&[std::fs::read_to_string(&out)?], identity)
                .context("openssl's certificate")?;
        }
    }
    let elapsed = start.elapsed();
    let cpu = children_cpu()?.saturating_sub(cpu0);
    let (speed_sign_per_s, speed_verify_per_s) = speed(bin).unwrap_or_else(|e| {
        eprintln!("openssl speed failed, no raw P-256 figures: {e:#}");
        (None, None)
    });
    Ok(OpensslResult {
        version,
        certs: samples.len(),
        elapsed_s: elapsed.as_secs_f64(),
        per_s: samples.len() as f64 / elapsed.as_secs_f64(),
        latency: Percentiles::of(&mut samples),
        cpu_ms_per_cert: cpu.as_secs_f64() * 1000.0 / paths.len().max(1) as f64,
        speed_sign_per_s,
        speed_verify_per_s,
    })
}

/// Signatures and verifications per second from `openssl speed -seconds 1 ecdsap256`.
fn speed(bin: &Path) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let out = Command::new(bin)
        .args(["speed", "-seconds", "1", "ecdsap256"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl speed exited with {}",
        out.status
    );
    Ok(parse_speed(&String::from_utf8_lossy(&out.stdout)))
}

/// The last two numbers of the result line, e.g.
/// ` 256 bits ecdsa (nistp256)   0.0000s   0.0001s  41234.5  13456.7`.
fn parse_speed(text: &str) -> (Option<f64>, Option<f64>) {
    let Some(line) = text
        .lines()
        .find(|l| l.contains("(nistp256)") && l.contains("bits ecdsa"))
    else {
        return (None, None);
    };
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums.as_slice() {
        [.., sign, verify] => (Some(*sign), Some(*verify)),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openssl_speed() {
        let text = "                              sign    verify    sign/s verify/s\n \
                    256 bits ecdsa (nistp256)   0.0000s   0.0001s  41234.5  13456.7\n";
        assert_eq!(parse_speed(text), (Some(41234.5), Some(13456.7)));
        assert_eq!(parse_speed("nothing"), (None, None));
    }
}
