//! Adaptive busy polling of a data-plane thread: under load, poll the sockets for a short
//! while before sleeping, instead of sleeping at once.
//!
//! A current-thread runtime that runs out of work sleeps in `epoll_wait`. On a VM each such
//! sleep halts the vCPU, and waking it again is a round trip through the hypervisor: 32–128 µs
//! for a third of the data-plane thread's wake-ups on the Firecracker bench machine
//! (BENCHMARKS.md, issue 17, run 15). Under load the next event comes within microseconds, so
//! sleeping costs more than it saves: polling took the L7 closed loop 13–46% and gRPC calls
//! 38–60% higher there, and cost L4's HTTP closed loop 2–10% (run 16). HAProxy's
//! `busy-polling`, Linux's `busy_poll` sockets and Go's spinning scheduler threads answer the
//! same way; unlike HAProxy's, this one turns itself on only while the thread is busy, so an
//! idle or lightly loaded agent never spins.
//!
//! How: when the runtime is about to sleep (tokio's `on_thread_park`), and the thread spent at
//! least [`BusyPoll::min_load`] of the last window doing work (not spinning, not sleeping), it
//! wakes a spinner task instead. The spinner gives its CPU to any other runnable thread
//! (`sched_yield`) and then yields to the runtime, which polls the sockets without blocking
//! (tokio defers a yielded task until after the driver's poll) and runs whatever became ready
//! before the spinner again. After [`BusyPoll::spin`] without any work the spinner stops and
//! the thread sleeps as before. Of the agent's shards, at most half the CPUs poll at once
//! ([`Spinners`]). Written by hand: tokio has no busy-poll mode, and its park hooks and
//! `yield_now` are the seams it offers for one.
//!
//! A polling thread that shares its CPU with another thread that keeps running (another
//! agent's polling thread on a bench machine, an application that spins) gives it the CPU at
//! every `sched_yield`, and both look runnable all the time, so Linux's load balancer has
//! little reason to split them: on the 2-vCPU bench machine the two agents' threads stayed on
//! one CPU for a whole 20 s run in about a third of the L7 runs at 10,000 req/s, at four times
//! the usual median latency with the machine a fifth idle (BENCHMARKS.md, issue 17 run 23).
//! So when `Crowding::STREAK` (16) yields in a row were slow and switched to another thread (the
//! thread's involuntary context switches confirm it), the thread moves itself to another CPU
//! it may run on ([`crate::sched::move_off_current_cpu`]), at most every
//! `Crowding::MIN_INTERVAL` (10 ms).

use std::cell::Cell;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// The window over which the thread's share of real work (its load) is measured.
const WINDOW: Duration = Duration::from_millis(1);

/// A gap between two polls of the spinner longer than this means other tasks ran in it (an
/// empty non-blocking poll of the driver takes about a microsecond).
const WORK_GAP: Duration = Duration::from_micros(4);

/// A counter of seconds; its clones count together.
pub type Seconds = Counter<f64, AtomicU64>;

/// The setting of one data-plane thread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BusyPoll {
    /// How long to keep polling after the last work before sleeping; zero never polls.
    pub spin: Duration,
    /// The share of the last window the thread must have spent working for it to poll.
    pub min_load: f64,
}

impl BusyPoll {
    /// The default share of work over which the thread polls: at 1,000 requests/s an agent's
    /// thread works 1–3% of the time, in a closed loop 40–55% (BENCHMARKS.md).
    pub const DEFAULT_MIN_LOAD: f64 = 0.25;

    pub fn enabled(&self) -> bool {
        !self.spin.is_zero()
    }
}

/// How many of a process's data-plane threads may poll at the same time, shared by them.
///
/// A polling thread holds its CPU, so several shards polling at once take the CPUs from the
/// applications, the other agent and each other: on the 2-vCPU bench machine two shards, each
/// polling, cost the L7 closed loop 12-15% against the same shards not polling (BENCHMARKS.md,
/// issue 17, run 17), as HAProxy's `busy-polling` on four threads starved it (run 16). With the
/// cap, a shard that finds the others polling sleeps as it would without busy polling.
#[derive(Clone, Debug)]
pub struct Spinners(Arc<SpinnersInner>);

#[derive(Debug)]
struct SpinnersInner {
    active: AtomicUsize,
    max: usize,
    /// The most that ever polled at once.
    #[cfg(test)]
    peak: AtomicUsize,
}

impl Spinners {
    /// At most `max` threads poll at once (at least one).
    pub fn new(max: usize) -> Self {
        Self(Arc::new(SpinnersInner {
            active: AtomicUsize::new(0),
            max: max.max(1),
            #[cfg(test)]
            peak: AtomicUsize::new(0),
        }))
    }

    /// Half the CPUs this process may run on (its affinity and cgroup quota), at least one:
    /// one on a 2-CPU host, so a single-shard agent (the default) is not limited at all.
    pub fn for_host() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(cpus / 2)
    }

    fn take(&self) -> bool {
        let max = self.0.max;
        let taken = self
            .0
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a < max).then_some(a + 1)
            });
        #[cfg(test)]
        if let Ok(before) = taken {
            self.0.peak.fetch_max(before + 1, Ordering::Relaxed);
        }
        taken.is_ok()
    }

    fn give(&self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Installs the hooks on a runtime builder; [`spinner`] must then be spawned on the runtime,
/// with the same `spinners`.
pub fn install(builder: &mut tokio::runtime::Builder, cfg: BusyPoll, spinners: &Spinners) {
    if !cfg.enabled() {
        return;
    }
    let spinners = spinners.clone();
    builder.on_thread_park(move || STATE.with(|s| s.before_park(cfg, &spinners)));
    builder.on_thread_unpark(|| STATE.with(|s| s.after_unpark()));
}

/// Gives the spinner's place back when its spin ends (or its task is dropped mid-spin).
struct Held<'a>(&'a Spinners);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // `try_with`: a task dropped while its thread's locals are torn down must not panic.
        let _ = STATE.try_with(|s| s.spin_until.set(None));
        self.0.give();
    }
}

/// Tells when a polling thread's yields keep giving its CPU to another thread: a streak of
/// [`Self::STREAK`] slow yields in a row (each took at least [`Self::SLOW_YIELD`]), in which
/// the thread's involuntary context switches (a `sched_yield` that switched counts as one)
/// show that nearly every one of them went to another thread, rather than to the hypervisor
/// or an interrupt. Counting switches alone is not enough: over a stretch of polling the
/// thread is also preempted while it works, and on the bench machine a switch count over
/// blocks of 16 yields moved the threads about 150 times a second and left them on one CPU a
/// quarter of the time (BENCHMARKS.md, issue 17 run 24).
#[derive(Debug, Default)]
struct Crowding {
    /// Slow yields in a row.
    streak: u32,
    /// The thread's involuntary switches after the streak's first yield.
    start: i64,
    last_move: Option<Instant>,
    /// Set when a move failed: this thread does not try again.
    off: bool,
}

impl Crowding {
    /// A yield at least this long ran another thread (a `sched_yield` that finds nothing else
    /// to run returns in about 0.4 µs on the bench machine; two threads yielding one CPU to
    /// each other take about 2 µs a turn).
    const SLOW_YIELD: Duration = Duration::from_nanos(1_500);
    /// Slow yields in a row before the thread moves.
    const STREAK: u32 = 16;
    /// At most one move per thread in this time.
    const MIN_INTERVAL: Duration = Duration::from_millis(10);

    /// Called after each yield with how long it `took`, and a reader of the thread's
    /// involuntary switches (read twice per streak); true when the thread should move to
    /// another CPU now.
    fn after_yield(
        &mut self,
        took: Duration,
        now: Instant,
        switches: impl FnOnce() -> i64,
    ) -> bool {
        if self.off {
            return false;
        }
        if took < Self::SLOW_YIELD {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        if self.streak == 1 {
            self.start = switches();
            return false;
        }
        if self.streak < Self::STREAK {
            return false;
        }
        self.streak = 0;
        // The streak's other yields each switched.
        let crowded = switches() - self.start >= i64::from(Self::STREAK - 1);
        let due = self
            .last_move
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::MIN_INTERVAL);
        if crowded && due {
            self.last_move = Some(now);
            true
        } else {
            false
        }
    }

    /// The spin ended: a new spin starts a new streak.
    fn reset(&mut self) {
        self.streak = 0;
    }
}

/// The calling thread's involuntary context switches so far.
fn involuntary_switches() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .map_or(0, |u| u.involuntary_context_switches())
}

/// Gives the CPU to any other runnable thread, then moves to another CPU when the yields
/// keep going to another thread ([`Crowding`]). `before` is a moment just before the call;
/// returns the moment the yield returned. `moved` counts the moves.
fn yield_cpu(crowding: &mut Crowding, moved: &Counter, before: Instant) -> Instant {
    std::thread::yield_now();
    let now = Instant::now();
    if crowding.after_yield(now - before, now, involuntary_switches) {
        match crate::sched::move_off_current_cpu() {
            Ok(Some((from, to))) => {
                moved.inc();
                tracing::trace!(from, to, "a busy-polling thread moved off a shared CPU");
            }
            // One CPU allowed: nowhere to go, and it will not change.
            Ok(None) => crowding.off = true,
            Err(e) => {
                crowding.off = true;
                tracing::warn!(error = %e, "a busy-polling thread cannot move off a CPU it shares with another busy thread; it stays (allow sched_setaffinity in the agent's seccomp filter, or set ISTHMUS_BUSY_POLL=0 to stop polling)");
            }
        }
    }
    now
}

/// The task that polls while the thread is busy. `spun` counts the seconds it spent, `moved`
/// the times it moved off a CPU shared with another busy thread.
pub async fn spinner(cfg: BusyPoll, spun: Seconds, moved: Counter, spinners: Spinners) {
    if !cfg.enabled() {
        return;
    }
    // Kept across spins: the spacing of moves, and whether this thread can move at all.
    let mut crowding = Crowding::default();
    loop {
        // Armed by `before_park`.
        poll_fn(|cx| {
            STATE.with(|s| {
                if s.spin_until.get().is_some() {
                    Poll::Ready(())
                } else {
                    s.set_waker(cx.waker());
                    Poll::Pending
                }
            })
        })
        .await;
        // Armed: `before_park` took a place among the spinners for this spin.
        let held = Held(&spinners);
        let mut returned = Instant::now();
        // Spin time not yet counted.
        let mut spin = Duration::ZERO;
        let count = |spin: &mut Duration| {
            STATE.with(|s| s.spun.set(s.spun.get() + *spin));
            spun.inc_by(spin.as_secs_f64());
            *spin = Duration::ZERO;
        };
        loop {
            let now = Instant::now();
            let gap = now - returned;
            let Some(mut until) = STATE.with(|s| s.spin_until.get()) else {
                break;
            };
            if gap >= WORK_GAP {
                // Tasks ran since the last turn: keep polling as long again, and count what
                // was spun so far (under steady load one spin can last long).
                until = now + cfg.spin;
                STATE.with(|s| s.spin_until.set(Some(until)));
                count(&mut spin);
            } else {
                spin += gap;
            }
            if now >= until {
                break;
            }
            returned = yield_cpu(&mut crowding, &moved, now);
            spin += returned - now;
            tokio::task::yield_now().await;
        }
        drop(held);
        crowding.reset();
        count(&mut spin);
    }
}

thread_local! {
    static STATE: State = State::new();
}

struct State {
    /// When the thread last woke from a park.
    unparked_at: Cell<Instant>,
    window_start: Cell<Instant>,
    /// Real work in the current window.
    busy: Cell<Duration>,
    /// The share of the last whole window spent on real work.
    load: Cell<f64>,
    /// Time spent spinning since the thread last woke.
    spun: Cell<Duration>,
    /// Set while the spinner is armed.
    spin_until: Cell<Option<Instant>>,
    waker: Cell<Option<Waker>>,
}

impl State {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            unparked_at: Cell::new(now),
            window_start: Cell::new(now),
            busy: Cell::new(Duration::ZERO),
            load: Cell::new(0.0),
            spun: Cell::new(Duration::ZERO),
            spin_until: Cell::new(None),
            waker: Cell::new(None),
        }
    }

    fn set_waker(&self, waker: &Waker) {
        let keep = self.waker.take().filter(|w| w.will_wake(waker));
        self.waker.set(Some(keep.unwrap_or_else(|| waker.clone())));
    }

    fn before_park(&self, cfg: BusyPoll, spinners: &Spinners) {
        let now = Instant::now();
        let ran = now.saturating_duration_since(self.unparked_at.get());
        let work = ran.saturating_sub(self.spun.take());
        self.busy.set(self.busy.get() + work);
        let elapsed = now.saturating_duration_since(self.window_start.get());
        if elapsed >= WINDOW {
            self.load
                .set(self.busy.get().as_secs_f64() / elapsed.as_secs_f64());
            self.busy.set(Duration::ZERO);
            self.window_start.set(now);
        }
        if self.load.get() >= cfg.min_load {
            // The spinner leaves its waker only while it waits to be armed.
            if let Some(waker) = self.waker.take() {
                if spinners.take() {
                    self.spin_until.set(Some(now + cfg.spin));
                    // On this thread, inside the scheduler: the spinner joins the run queue
                    // and the runtime polls the driver without blocking instead of parking.
                    waker.wake();
                } else {
                    // As many threads as may poll are polling: sleep.
                    self.waker.set(Some(waker));
                }
            }
        }
    }

    fn after_unpark(&self) {
        self.unparked_at.set(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(cfg: BusyPoll, spinners: &Spinners) -> tokio::runtime::Runtime {
        let mut b = tokio::runtime::Builder::new_current_thread();
        b.enable_all();
        install(&mut b, cfg, spinners);
        b.build().unwrap()
    }

    /// 100 µs of work every 150 µs, `n` times, on the runtime's thread.
    async fn busy(n: usize) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let feeder = std::thread::spawn(move || {
            for _ in 0..n {
                std::thread::sleep(Duration::from_micros(150));
                if tx.send(()).is_err() {
                    break;
                }
            }
        });
        while rx.recv().await.is_some() {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(100) {
                std::hint::spin_loop();
            }
        }
        feeder.join().unwrap();
    }

    /// A low bar for "busy", so a slow or shared test machine still counts the busy phase
    /// below as load; the idle phase works well under a thousandth of its time.
    fn cfg() -> BusyPoll {
        BusyPoll {
            spin: Duration::from_micros(200),
            min_load: 0.05,
        }
    }

    /// Busy work, then quiet: the thread polls while busy, and stops within a few windows
    /// once the work stops.
    #[test]
    fn spins_only_under_load_and_stops_when_it_ends() {
        let spinners = Spinners::new(1);
        let rt = runtime(cfg(), &spinners);
        let spun = Seconds::default();
        rt.spawn(spinner(
            cfg(),
            spun.clone(),
            Counter::default(),
            spinners.clone(),
        ));
        rt.block_on(async {
            // Idle: woken every 2 ms, with almost no work each time.
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // A test machine under load may preempt the thread mid-wake-up, which looks
            // like work: a stray spin or two (200 µs each) is allowed, steady spinning is not.
            let idle = spun.get();
            assert!(idle < 0.001, "an idle thread spun {idle} s");
            // Busy: 100 µs of work every 150 µs.
            busy(200).await;
            // 200 gaps of about 50 µs between the pieces of work are polled through.
            let under_load = spun.get() - idle;
            assert!(under_load > 0.002, "a busy thread spun only {under_load} s");
            // Quiet again: after a few windows the spinning stops.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let settled = spun.get();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let after = spun.get() - settled;
            assert!(
                after < 0.001,
                "{after} s spun in the 50 ms after the load was gone"
            );
        });
    }

    /// The decision alone, over fake yield times and switch counts: a streak of slow yields
    /// that switched moves the thread; a fast yield, too few switches or a recent move do not.
    #[test]
    fn a_streak_of_slow_yields_that_switched_moves_the_thread() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let slow = Crowding::SLOW_YIELD;
        let fast = Duration::from_nanos(400);
        let streak = Crowding::STREAK;
        // One streak of slow yields at `at`, with `switched` switches after its first yield;
        // the decision at its last.
        let run = |c: &mut Crowding, at: Instant, base: i64, switched: i64| {
            assert!(
                !c.after_yield(slow, at, || base),
                "decided at the first yield"
            );
            for _ in 2..streak {
                assert!(!c.after_yield(slow, at, || panic!("switches read mid-streak")));
            }
            c.after_yield(slow, at, || base + switched)
        };
        let all = i64::from(streak - 1);
        let cases: &[(&str, i64, bool)] = &[
            ("every yield switched", all, true),
            ("preempted besides", all + 3, true),
            (
                "one slow yield did not switch (hypervisor, interrupt)",
                all - 1,
                false,
            ),
            ("none switched", 0, false),
        ];
        for &(name, switched, moves) in cases {
            let mut c = Crowding::default();
            assert_eq!(run(&mut c, ms(0), 100, switched), moves, "{name}");
        }
        // A fast yield breaks the streak: 15 slow, 1 fast, then 15 slow do not move.
        let mut c = Crowding::default();
        for _ in 1..streak {
            assert!(!c.after_yield(slow, ms(0), || 0));
        }
        assert!(!c.after_yield(fast, ms(0), || panic!("read on a fast yield")));
        for _ in 1..streak {
            assert!(!c.after_yield(slow, ms(0), || 1000));
        }
        // Moved at 0 ms: a crowded streak 5 ms later waits, one at 10 ms moves again.
        let mut c = Crowding::default();
        assert!(run(&mut c, ms(0), 0, all));
        assert!(
            !run(&mut c, ms(5), 20, all),
            "moved again within MIN_INTERVAL"
        );
        assert!(run(&mut c, ms(10), 40, all));
        // A spin that ends mid-streak forgets it.
        let mut c = Crowding::default();
        for _ in 1..streak {
            assert!(!c.after_yield(slow, ms(0), || 0));
        }
        c.reset();
        assert!(
            !c.after_yield(slow, ms(0), || 0),
            "the streak outlived the spin"
        );
        // A thread that cannot move stops trying.
        let mut c = Crowding {
            off: true,
            ..Crowding::default()
        };
        assert!(!run(&mut c, ms(0), 0, all));
    }

    /// The real thing: a thread that keeps yielding to another thread pinned to its CPU moves
    /// to another CPU, and the affinity it had is kept.
    #[test]
    fn a_thread_crowded_on_its_cpu_moves_off_it() {
        use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        use std::sync::atomic::AtomicBool;
        let me = Pid::from_raw(0);
        let allowed = sched_getaffinity(me).unwrap();
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap())
            .collect();
        if cpus.len() < 2 {
            eprintln!("SKIP: the test may run on one CPU only ({cpus:?}); moving needs two");
            return;
        }
        let shared = cpus[0];
        let mut one = CpuSet::new();
        one.set(shared).unwrap();
        // The other busy thread: pinned to the shared CPU, polling as an agent's thread does
        // (a few microseconds of work, then a yield), so each of the test thread's yields
        // runs it for longer than a slow yield on any machine.
        let stop = Arc::new(AtomicBool::new(false));
        let hog = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                sched_setaffinity(me, &one).unwrap();
                let until = Instant::now() + Duration::from_secs(10);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    let work = Instant::now();
                    while work.elapsed() < Crowding::SLOW_YIELD * 3 {
                        std::hint::spin_loop();
                    }
                    std::thread::yield_now();
                }
            })
        };
        let polling = std::thread::spawn(move || {
            // Onto the shared CPU, then allowed everywhere again: it stays there until moved.
            sched_setaffinity(me, &one).unwrap();
            sched_setaffinity(me, &allowed).unwrap();
            assert_eq!(sched_getcpu().unwrap(), shared);
            let moved = Counter::default();
            let mut crowding = Crowding::default();
            let mut yields = 0;
            while moved.get() == 0 && yields < 100_000 {
                yield_cpu(&mut crowding, &moved, Instant::now());
                yields += 1;
            }
            let after = sched_getcpu().unwrap();
            let kept = sched_getaffinity(me).unwrap();
            (moved.get(), yields, after, kept == allowed)
        });
        let (moves, yields, after, kept) = polling.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        hog.join().unwrap();
        assert_eq!(moves, 1, "no move in {yields} yields");
        assert_ne!(after, shared, "moved, but still on CPU {shared}");
        assert!(kept, "the thread's affinity was not restored");
    }

    /// Switched off, the hooks are not installed and the spinner returns at once.
    #[test]
    fn zero_never_spins() {
        let off = BusyPoll {
            spin: Duration::ZERO,
            min_load: 0.0,
        };
        let spinners = Spinners::new(1);
        let rt = runtime(off, &spinners);
        let spun = Seconds::default();
        rt.block_on(async {
            spinner(off, spun.clone(), Counter::default(), spinners.clone()).await;
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(5) {
                tokio::task::yield_now().await;
            }
        });
        assert_eq!(spun.get(), 0.0);
    }

    /// Two busy threads sharing a cap of one: never both polling at once, and the place is
    /// given back (a later spin can take it).
    #[test]
    fn threads_beyond_the_cap_sleep_instead_of_polling() {
        let spinners = Spinners::new(1);
        let spun = Seconds::default();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (spinners, spun) = (spinners.clone(), spun.clone());
                std::thread::spawn(move || {
                    let rt = runtime(cfg(), &spinners);
                    rt.spawn(spinner(cfg(), spun, Counter::default(), spinners.clone()));
                    rt.block_on(busy(200));
                    // Let an ongoing spin end before the runtime goes.
                    rt.block_on(async { tokio::time::sleep(Duration::from_millis(5)).await });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            spun.get() > 0.002,
            "the busy threads spun only {} s",
            spun.get()
        );
        assert_eq!(spinners.0.peak.load(Ordering::Relaxed), 1);
        assert_eq!(
            spinners.0.active.load(Ordering::Relaxed),
            0,
            "a place was not given back"
        );
        // Half the CPUs, at least one.
        assert!(Spinners::for_host().0.max >= 1);
        assert_eq!(Spinners::new(0).0.max, 1);
    }
}
