//! The data-plane threads' scheduler slice: Linux's EEVDF scheduler (6.6 and later) lets a thread
//! ask for a shorter slice than the default (`sched_setattr` with `sched_runtime` on
//! `SCHED_OTHER`, honoured since 6.12). A shorter slice gives the thread an earlier deadline
//! each time it wakes, so it runs before a thread that asked for none, and preempts it
//! (the kernel's `PREEMPT_SHORT`), instead of waiting for that thread's slice to end. Its share
//! of the CPU is unchanged (the weight is the nice value's), and a thread that keeps running
//! is preempted sooner in turn.
//!
//! Why the proxy asks for it: a forwarded request wakes an agent thread several times, and on a
//! busy host each wake-up waited for whatever ran on that CPU to finish its slice (about 40 µs
//! per wake-up on a 2-vCPU machine at 10,000 req/s, BENCHMARKS.md issue 17 run 21).
//!
//! The module also moves a data-plane thread off a CPU it shares with another busy thread
//! ([`move_off_current_cpu`], through nix's affinity calls).
//!
//! No crate wraps `sched_setattr` (nix and rustix have no binding), so this module holds the
//! agent's one `unsafe` block.
#![allow(unsafe_code)]

use std::time::Duration;

/// The kernel's bounds on a requested slice (`sched_setattr(2)`, `SCHED_OTHER`): 100 µs..100 ms.
pub const MIN: Duration = Duration::from_micros(100);
pub const MAX: Duration = Duration::from_millis(100);

/// `struct sched_attr`, version 0 (48 bytes), as `include/uapi/linux/sched/types.h` lays it out.
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// Asks the kernel for `slice` as the calling thread's slice, keeping its policy and nice value.
/// Kernels before 6.12 accept the call and ignore the slice. A thread under a policy other than
/// `SCHED_OTHER` or `SCHED_BATCH` (an operator's `chrt`) is left alone, with an error saying so.
pub fn set_current_thread_slice(slice: Duration) -> std::io::Result<()> {
    let slice = slice.clamp(MIN, MAX);
    // SAFETY: a plain syscall wrapper with an integer argument (0: the calling thread).
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return Err(std::io::Error::other(format!(
            "the thread runs under scheduling policy {policy}, not SCHED_OTHER or SCHED_BATCH, which it keeps"
        )));
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: policy as u32,
        // Not SCHED_FLAG_KEEP_PARAMS: it would keep the old slice too. The nice value is part of
        // the call, so it is read and passed back unchanged.
        sched_flags: 0,
        sched_nice: current_nice(),
        sched_priority: 0,
        sched_runtime: slice.as_nanos() as u64,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `attr` is a live, initialised `struct sched_attr` of the size its `size` field
    // names; the kernel only reads it during the call. Pid 0 is the calling thread; flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0 as libc::pid_t,
            &attr as *const SchedAttr,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Moves the calling thread off the CPU it is running on, to another CPU it may run on, and
/// leaves its affinity as it was: the affinity is narrowed to the other CPUs (Linux migrates
/// the calling thread before `sched_setaffinity` returns) and then restored, so the scheduler
/// stays free to place the thread anywhere it was allowed. Returns the CPUs it left and is on;
/// `None` when it may run on one CPU only (an operator's `taskset` or cpuset), which is kept.
///
/// What it is for: two threads that keep yielding to each other on one CPU while another CPU
/// has room look runnable all the time to the load balancer, which then has little reason to
/// split them ([`crate::busy_poll`]).
pub fn move_off_current_cpu() -> std::io::Result<Option<(usize, usize)>> {
    use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let me = Pid::from_raw(0);
    let allowed = sched_getaffinity(me)?;
    let here = sched_getcpu()?;
    let mut others = allowed;
    others.unset(here)?;
    if !(0..CpuSet::count()).any(|cpu| others.is_set(cpu).unwrap_or(false)) {
        return Ok(None);
    }
    // Refused when the other CPUs are outside the thread's cpuset: then it stays where it is.
    let moved = sched_setaffinity(me, &others);
    // Restored whether or not the move worked; a failure here is the one that matters.
    sched_setaffinity(me, &allowed).map_err(|e| {
        std::io::Error::other(format!(
            "cannot restore the thread's CPU affinity after moving it: {e}"
        ))
    })?;
    moved?;
    Ok(Some((here, sched_getcpu()?)))
}

/// The slice in ns that a thread's `/proc/PID/task/TID/sched` text shows (`se.slice : <ns>`,
/// EEVDF kernels); `None` without that line.
pub fn slice_in(sched: &str) -> Option<u64> {
    sched
        .lines()
        .find(|l| l.starts_with("se.slice"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// The calling thread's nice value (`getpriority(PRIO_PROCESS, 0)` is per thread on Linux).
fn current_nice() -> i32 {
    // getpriority can return -1 as a value: errno tells an error apart. It cannot fail for the
    // calling thread; 0 (the default) if it ever does.
    // SAFETY: plain syscall wrappers with integer arguments; errno is the calling thread's.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            nice
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice_of_this_thread() -> Option<u64> {
        slice_in(&std::fs::read_to_string("/proc/thread-self/sched").ok()?)
    }

    #[test]
    fn the_thread_gets_the_slice_asked_for_within_the_kernels_bounds() {
        std::thread::spawn(|| {
            let before = slice_of_this_thread();
            set_current_thread_slice(Duration::from_micros(250)).unwrap();
            let Some(after) = slice_of_this_thread() else {
                eprintln!("SKIP: no se.slice in /proc/thread-self/sched (not an EEVDF kernel)");
                return;
            };
            if before == Some(after) && after != 250_000 {
                eprintln!("SKIP: the kernel ignores sched_runtime for SCHED_OTHER (before 6.12)");
                return;
            }
            assert_eq!(after, 250_000);
            // Below the kernel's minimum: clamped, not refused.
            set_current_thread_slice(Duration::from_micros(1)).unwrap();
            assert_eq!(slice_of_this_thread(), Some(100_000));
        })
        .join()
        .unwrap();
    }

    fn affinity() -> Vec<usize> {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap())
            .collect()
    }

    fn pin(cpus: &[usize]) {
        let mut set = nix::sched::CpuSet::new();
        for &c in cpus {
            set.set(c).unwrap();
        }
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
    }

    #[test]
    fn a_thread_moves_to_another_cpu_and_keeps_its_affinity() {
        std::thread::spawn(|| {
            let allowed = affinity();
            if allowed.len() < 2 {
                eprintln!(
                    "SKIP: this test may run on one CPU only ({allowed:?}); moving needs two"
                );
                return;
            }
            for &start in &allowed[..2] {
                // Onto `start`, then allowed everywhere again: it stays on `start` until moved.
                pin(&[start]);
                pin(&allowed);
                let (from, to) = move_off_current_cpu().unwrap().expect("two CPUs allowed");
                assert_ne!(to, from);
                assert_eq!(nix::sched::sched_getcpu().unwrap(), to);
                assert!(allowed.contains(&to), "moved to {to}, outside {allowed:?}");
                assert_eq!(affinity(), allowed, "the affinity was not restored");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_allowed_one_cpu_stays_on_it() {
        std::thread::spawn(|| {
            let cpu = affinity()[0];
            pin(&[cpu]);
            assert_eq!(move_off_current_cpu().unwrap(), None);
            assert_eq!(affinity(), vec![cpu]);
            assert_eq!(nix::sched::sched_getcpu().unwrap(), cpu);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn another_policy_is_left_alone() {
        std::thread::spawn(|| {
            // SCHED_IDLE needs no privilege; an operator's choice the proxy must not undo.
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: as in current_nice; `param` lives across the call.
            let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
            assert_eq!(rc, 0);
            let err = set_current_thread_slice(Duration::from_micros(100)).unwrap_err();
            assert!(err.to_string().contains("which it keeps"), "{err}");
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_nice_value_is_kept() {
        std::thread::spawn(|| {
            // Raising one's own nice value needs no privilege.
            // SAFETY: as in current_nice.
            let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) };
            assert_eq!(rc, 0);
            set_current_thread_slice(Duration::from_millis(1)).unwrap();
            assert_eq!(current_nice(), 5);
        })
        .join()
        .unwrap();
    }
}
