//! hyper's timer for the agent's HTTP connections: deadlines checked every [`TICK`] by one
//! sweeper task per thread, instead of an entry in tokio's timer wheel per request.
//!
//! With a timer set, a hyper HTTP/1.1 server makes a new sleep for the next request's headers
//! after every response (its header read timeout, 30 s) and drops it when the headers come:
//! through `TokioTimer` that is a handle to the runtime taken from thread-local storage, an
//! entry put into tokio's timer wheel under the driver's lock and taken out again, which was
//! 3.5% of the client agent's samples in the L7 closed loop (BENCHMARKS.md, issue 17, run 19).
//! The deadlines hyper sets here are of tens of seconds (header reads; HTTP/2 keep-alive pings),
//! where a quarter of a second late does not matter. A sleep here costs an allocation and a
//! push under an uncontended lock when it is first polled, and nothing more until the sweeper
//! passes. Written by hand: tokio's timer is the only one hyper-util offers, and no crate
//! implements hyper's `Timer` this way.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often a thread's sleeps are checked: a sleep ends at most this long after its deadline.
pub const TICK: Duration = Duration::from_millis(250);

/// The timer to give hyper's connection builders on the data plane.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoarseTimer;

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep {
            deadline,
            slot: None,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<CoarseSleep>() {
            Some(s) => {
                let s = s.get_mut();
                s.deadline = new_deadline;
                // Registered again, with the new deadline, when next polled.
                s.slot = None;
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// What a sleep shares with its thread's sweeper.
#[derive(Debug)]
struct Slot {
    deadline: Instant,
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

struct CoarseSleep {
    deadline: Instant,
    /// Set at the first poll before the deadline; dropped with the sleep, which the sweeper
    /// then forgets.
    slot: Option<Arc<Slot>>,
}

impl hyper::rt::Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(slot) = &this.slot {
            if slot.fired.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            let mut w = slot.waker.lock().unwrap_or_else(PoisonError::into_inner);
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
            drop(w);
            // Fired between the check and the waker's update: nobody will wake it again.
            return if slot.fired.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        if Instant::now() >= this.deadline {
            return Poll::Ready(());
        }
        let slot = Arc::new(Slot {
            deadline: this.deadline,
            fired: AtomicBool::new(false),
            waker: Mutex::new(Some(cx.waker().clone())),
        });
        if !register(&slot) {
            // No runtime to sweep from: it cannot end, as a sleep with no timer driver.
            tracing::debug!("a coarse sleep was polled outside a tokio runtime");
        }
        this.slot = Some(slot);
        Poll::Pending
    }
}

/// The sleeps registered on one thread, and whether a sweeper is checking them.
#[derive(Default)]
struct Wheel {
    slots: Mutex<Vec<Weak<Slot>>>,
    sweeping: AtomicBool,
}

thread_local! {
    static WHEEL: Arc<Wheel> = Arc::default();
}

/// Puts `slot` on this thread's wheel, starting its sweeper on the current runtime if none
/// runs. False when there is no runtime to run one.
fn register(slot: &Arc<Slot>) -> bool {
    WHEEL
        .try_with(|wheel| {
            wheel
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Arc::downgrade(slot));
            if wheel.sweeping.load(Ordering::Acquire) {
                return true;
            }
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return false;
            };
            if wheel
                .sweeping
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                rt.spawn(sweep(wheel.clone()));
            }
            true
        })
        // The thread is exiting.
        .unwrap_or(false)
}

/// Ends every due sleep of `wheel` once per [`TICK`] and forgets dropped ones; stops when the
/// wheel has nothing left (the next sleep starts it again) or its runtime shuts down.
async fn sweep(wheel: Arc<Wheel>) {
    /// Marks the wheel unswept when the task is dropped (its runtime shut down).
    struct Stopped(Option<Arc<Wheel>>);
    impl Drop for Stopped {
        fn drop(&mut self) {
            if let Some(w) = self.0.take() {
                w.sweeping.store(false, Ordering::Release);
            }
        }
    }
    let mut stopped = Stopped(Some(wheel.clone()));
    let mut due = Vec::new();
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        {
            let mut slots = wheel.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots.retain(|s| match s.upgrade() {
                None => false,
                Some(s) if s.deadline <= now => {
                    due.push(s);
                    false
                }
                Some(_) => true,
            });
            if slots.is_empty() && due.is_empty() {
                // Stopped under the lock: a sleep registered after this starts a new sweeper.
                wheel.sweeping.store(false, Ordering::Release);
                stopped.0 = None;
                return;
            }
        }
        // Woken outside the lock: a woken task may register its next sleep at once.
        for s in due.drain(..) {
            s.fired.store(true, Ordering::Release);
            let w = s
                .waker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test]
    async fn a_sleep_ends_after_its_deadline_and_within_a_tick() {
        let t = CoarseTimer;
        let start = Instant::now();
        t.sleep(Duration::from_millis(300)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "ended early: {took:?}");
        assert!(
            took < Duration::from_millis(300) + TICK + Duration::from_millis(200),
            "ended late: {took:?}"
        );
    }

    #[tokio::test]
    async fn a_past_deadline_is_ready_at_once_and_a_reset_moves_the_deadline() {
        let t = CoarseTimer;
        let mut s = t.sleep_until(Instant::now() - Duration::from_millis(1));
        assert!(futures_poll_once(&mut s).is_ready());

        let mut s = t.sleep(Duration::from_secs(3600));
        assert!(futures_poll_once(&mut s).is_pending());
        let start = Instant::now();
        t.reset(&mut s, Instant::now() + Duration::from_millis(100));
        s.await;
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn dropped_sleeps_are_forgotten_and_the_sweeper_stops_when_none_are_left() {
        let t = CoarseTimer;
        for _ in 0..1000 {
            let mut s = t.sleep(Duration::from_secs(30));
            assert!(futures_poll_once(&mut s).is_pending());
        }
        let wheel = WHEEL.with(Arc::clone);
        assert!(wheel.sweeping.load(Ordering::Acquire));
        assert_eq!(wheel.slots.lock().unwrap().len(), 1000);
        tokio::time::sleep(TICK * 3).await;
        assert!(wheel.slots.lock().unwrap().is_empty());
        assert!(
            !wheel.sweeping.load(Ordering::Acquire),
            "the sweeper still runs"
        );
        // And starts again for the next sleep.
        t.sleep(Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn hyper_closes_a_connection_whose_headers_do_not_come() {
        use hyper_util::rt::TokioIo;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(4096);
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        });
        let conn = tokio::spawn(async move {
            hyper::server::conn::http1::Builder::new()
                .timer(CoarseTimer)
                .header_read_timeout(Duration::from_millis(300))
                .serve_connection(TokioIo::new(server), svc)
                .await
        });
        let (mut r, mut w) = tokio::io::split(client);
        w.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = r.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // The next request's headers never end.
        let start = Instant::now();
        w.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("hyper kept the connection past its header read timeout")
            .unwrap();
        assert!(ended.is_err(), "closed without the timeout's error");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "closed after {took:?}"
        );
    }

    fn futures_poll_once(s: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> Poll<()> {
        let mut cx = Context::from_waker(Waker::noop());
        s.as_mut().poll(&mut cx)
    }
}
