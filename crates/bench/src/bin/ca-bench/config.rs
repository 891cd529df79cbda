//! The bench's settings, parsed and validated in one place.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

pub const DEFAULT_ISTHMUS_BIN: &str = "target/release/isthmus";
pub const DEFAULT_OPENSSL_BIN: &str = "openssl";
pub const DEFAULT_REQUESTS: usize = 5_000;
pub const DEFAULT_CONNECTIONS: usize = 4;
pub const DEFAULT_PHASE_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_OPENSSL_CERTS: usize = 200;
/// Requests sent on a fresh server before timing starts, or 2 per worker if more.
pub const WARMUP_REQUESTS: usize = 20;
/// The name the agent checks on the control plane's serving certificate.
pub const CA_SERVER_NAME: &str = "istiod.istio-system.svc";
pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "bench";
pub const SERVICE_ACCOUNT: &str = "sa";
/// Per-request limit, so one stuck request cannot hold the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How the bench's callers authenticate to the certificate API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One unlimited join token shared by every caller; each use is a CAS write to the same
    /// ledger key, committed durably.
    Token,
    /// A join token per concurrent caller: the same durable write per use, on distinct keys.
    TokenEach,
    /// The client certificate of a bootstrap key pair (renewals): no store write.
    Cert,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Token => "join token, one shared",
            Mode::TokenEach => "join token, one per caller",
            Mode::Cert => "client certificate",
        }
    }
}

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Certificates signed per second over gRPC/TLS by `isthmus server`, beside the \
             in-process signing rate and openssl, in one run"
)]
pub struct Args {
    /// The isthmus binary to start (`isthmus server`).
    #[arg(long, default_value = DEFAULT_ISTHMUS_BIN)]
    pub isthmus_bin: PathBuf,
    /// Timed requests per caller mode and concurrency level.
    #[arg(long, default_value_t = DEFAULT_REQUESTS)]
    pub requests: usize,
    /// Concurrency levels; each runs against a fresh server with an empty data directory.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// HTTP/2 connections the callers share (worker w uses connection w mod this).
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: usize,
    /// Caller modes to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "token,token-each,cert"
    )]
    pub modes: Vec<Mode>,
    /// Concurrency levels of the certificate API served in this process (the gRPC/TLS stack
    /// without the server's store and process); the flag with no value skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1,16,64")]
    pub loopback_concurrency: Vec<usize>,
    /// A load phase stops taking new requests after this many seconds (and says so).
    #[arg(long, default_value_t = DEFAULT_PHASE_TIMEOUT_SECS)]
    pub phase_timeout_secs: u64,
    /// In-process signing with this many threads, besides one (default: the number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The openssl binary for the process-per-certificate comparison.
    #[arg(long, default_value = DEFAULT_OPENSSL_BIN)]
    pub openssl_bin: PathBuf,
    /// Certificates signed by `openssl x509 -req`, one process each; 0 skips openssl.
    #[arg(long, default_value_t = DEFAULT_OPENSSL_CERTS)]
    pub openssl_certs: usize,
    /// Where the servers' data directories go [default: the system temp directory].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write every figure as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--requests must be at least 1")]
    Requests,
    #[error("--concurrency {0} is out of range: give levels from 1 to 1024, e.g. 1,16,64")]
    Concurrency(usize),
    #[error("--connections {0} is out of range: give 1 to 64")]
    Connections(usize),
    #[error("--modes is empty: give some of token, token-each, cert")]
    Modes,
    #[error("--phase-timeout-secs must be at least 1")]
    PhaseTimeout,
    #[error("--threads {0} is out of range: give 1 to 256")]
    Threads(usize),
}

impl Args {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.requests == 0 {
            return Err(ConfigError::Requests);
        }
        if self.concurrency.is_empty() {
            return Err(ConfigError::Concurrency(0));
        }
        if let Some(&c) = self
            .concurrency
            .iter()
            .chain(&self.loopback_concurrency)
            .find(|&&c| c == 0 || c > 1024)
        {
            return Err(ConfigError::Concurrency(c));
        }
        if self.connections == 0 || self.connections > 64 {
            return Err(ConfigError::Connections(self.connections));
        }
        if self.modes.is_empty() {
            return Err(ConfigError::Modes);
        }
        if self.phase_timeout_secs == 0 {
            return Err(ConfigError::PhaseTimeout);
        }
        if let Some(t) = self.threads.filter(|&t| t == 0 || t > 256) {
            return Err(ConfigError::Threads(t));
        }
        Ok(())
    }

    pub fn phase_timeout(&self) -> Duration {
        Duration::from_secs(self.phase_timeout_secs)
    }

    /// Threads for the second in-process run: --threads, else the CPUs this process may use.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        let args = Args::parse_from(["ca-bench"]);
        args.validate().unwrap();
        assert_eq!(args.modes, [Mode::Token, Mode::TokenEach, Mode::Cert]);
        let bad = Args::parse_from(["ca-bench", "--concurrency", "1,0"]);
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "--concurrency 0 is out of range: give levels from 1 to 1024, e.g. 1,16,64"
        );
        let bad = Args::parse_from(["ca-bench", "--connections", "0"]);
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--connections 0"));
    }
}
