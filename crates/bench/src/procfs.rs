//! What the kernel says about a server process (memory, CPU time), the child processes the bench
//! starts and stops, and a probe of what one fsync costs on the disk under the data directories.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{sysconf, Pid, SysconfVar};
use serde::Serialize;

use crate::stats::Percentiles;

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    /// Resident set size now (VmRSS), KiB.
    pub rss_kib: u64,
    /// The peak resident set size (VmHWM), KiB.
    pub peak_kib: u64,
}

/// VmRSS and VmHWM from /proc/PID/status.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{path} has no readable {name}"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        peak_kib: field("VmHWM:")?,
    })
}

/// User plus system CPU time the process has used so far, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may hold spaces; the fields after its closing paren do not.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {i} unreadable"))
    };
    let hz = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&h| h > 0)
        .unwrap_or(100) as u64;
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_millis(total * 1000 / hz))
}

/// A server the bench started; stopped with SIGTERM by `stop`, killed if merely dropped.
pub struct ServerProcess {
    child: Child,
    what: &'static str,
}

impl ServerProcess {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(what: &'static str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {what} ({cmd:?})"))?;
        Ok(ServerProcess { child, what })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail if the process has already exited.
    pub fn check_alive(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!(
                "{} exited early ({status}); last lines of {}:\n{}",
                self.what,
                log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// SIGTERM, then up to 10 s for a clean exit, then SIGKILL.
    pub async fn stop(mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        if kill(pid, Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!(
                "{} did not stop within 10 s of SIGTERM; killing it",
                self.what
            );
        }
        // Drop kills and reaps.
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FsyncProbe {
    pub count: usize,
    /// 4 KiB written over a preallocated file, then fdatasync: what a write-ahead log with
    /// preallocated segments (etcd's) pays per commit at least.
    pub overwrite: Percentiles,
    /// 4 KiB appended, then fdatasync: the file's size changes too, so the journal commits.
    pub append: Percentiles,
}

/// `count` of each kind of durable 4 KiB write in a file under `dir`: the floor under any
/// commit that waits for its own fsync.
pub fn fsync_probe(dir: &Path, count: usize) -> anyhow::Result<FsyncProbe> {
    let file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let mut f = file.as_file();
    let block = [0x5au8; 4096];
    for _ in 0..count {
        f.write_all(&[0u8; 4096])?;
    }
    f.sync_all()?;
    let timed = |f: &mut &std::fs::File| -> anyhow::Result<Percentiles> {
        let mut samples = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            f.write_all(&block)?;
            f.sync_data()?;
            samples.push(t.elapsed());
        }
        Ok(Percentiles::of(&mut samples))
    };
    f.seek(SeekFrom::Start(0))?;
    let overwrite = timed(&mut f)?;
    f.seek(SeekFrom::End(0))?;
    let append = timed(&mut f)?;
    Ok(FsyncProbe {
        count,
        overwrite,
        append,
    })
}
