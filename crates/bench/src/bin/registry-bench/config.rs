//! The bench's settings, parsed and validated in one place.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub const DEFAULT_ISTHMUS_BIN: &str = "target/release/isthmus";
pub const DEFAULT_ETCD_BIN: &str = "etcd";
pub const DEFAULT_REGISTRATIONS: usize = 5_000;
pub const DEFAULT_WATCH_WRITES: usize = 500;
pub const DEFAULT_PHASE_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_FSYNC_PROBES: usize = 200;
pub use isthmus_bench::server::REQUEST_TIMEOUT;
/// How long a watcher may take to deliver one event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Registration throughput and write→watch latency: Isthmus beside etcd, in one run"
)]
pub struct Args {
    /// The isthmus binary to start (`isthmus server`).
    #[arg(long, default_value = DEFAULT_ISTHMUS_BIN)]
    pub isthmus_bin: PathBuf,
    /// The etcd binary for the comparison (Debian's etcd-server).
    #[arg(long, default_value = DEFAULT_ETCD_BIN)]
    pub etcd_bin: PathBuf,
    /// Skip etcd (the table then says it was not run).
    #[arg(long)]
    pub no_etcd: bool,
    /// Also run three Isthmus replicas on a three-member etcd, and that etcd alone (registrations
    /// round-robin over the servers, the watcher on the first; CPU and RSS are the first's).
    #[arg(long)]
    pub cluster: bool,
    /// Registrations per concurrency level, each a new service and address.
    #[arg(long, default_value_t = DEFAULT_REGISTRATIONS)]
    pub registrations: usize,
    /// Concurrency levels; each runs against a fresh server with an empty data directory.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Sequential single writes timed until a connected watcher sees them.
    #[arg(long, default_value_t = DEFAULT_WATCH_WRITES)]
    pub watch_writes: usize,
    /// A load phase stops taking new requests after this many seconds (and says so).
    #[arg(long, default_value_t = DEFAULT_PHASE_TIMEOUT_SECS)]
    pub phase_timeout_secs: u64,
    /// Durable 4 KiB writes of each kind (overwrite, append) timed on the data directories'
    /// disk, to show what one fsync costs there; 0 skips the probe.
    #[arg(long, default_value_t = DEFAULT_FSYNC_PROBES)]
    pub fsync_probes: usize,
    /// Where the servers' data directories go [default: the system temp directory].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write every figure as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--registrations must be at least 1")]
    Registrations,
    #[error("--concurrency {0} is out of range: give levels from 1 to 1024, e.g. 1,16,64")]
    Concurrency(usize),
    #[error("--watch-writes must be at least 1")]
    WatchWrites,
    #[error("--phase-timeout-secs must be at least 1")]
    PhaseTimeout,
}

impl Args {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.registrations == 0 {
            return Err(ConfigError::Registrations);
        }
        if let Some(&c) = self.concurrency.iter().find(|&&c| c == 0 || c > 1024) {
            return Err(ConfigError::Concurrency(c));
        }
        if self.concurrency.is_empty() {
            return Err(ConfigError::Concurrency(0));
        }
        if self.watch_writes == 0 {
            return Err(ConfigError::WatchWrites);
        }
        if self.phase_timeout_secs == 0 {
            return Err(ConfigError::PhaseTimeout);
        }
        Ok(())
    }

    pub fn phase_timeout(&self) -> Duration {
        Duration::from_secs(self.phase_timeout_secs)
    }
}
