//! hyper's timer for the agent's HTTP connections: deadlines checked every [`TICK`] by one
//! sweeper task per thread, instead of an entry in tokio's timer wheel per request.
//!
//! With a timer set, a hyper HTTP/1.1 server makes a new sleep for the next request's headers
//! after every response (its header read timeout, 30 s) and drops it when the headers come:
//! through `TokioTimer` that is a handle to the runtime taken from thread-local storage, an
//! entry put into tokio's timer wheel under the driver's lock and taken out again, which was
//! 3.5% of the client agent's samples in the L7 closed loop (BENCHMARKS.md, issue 17, run 19).
//! The deadlines hyper sets here are of tens of seconds (header reads; HTTP/2 keep-alive pings),
//! where a quarter of a second late does not matter. A sleep here takes an entry in its
//! thread's slab under an uncontended lock when it is first polled and gives it back when it is
//! dropped, so a sweep walks only the sleeps alive (about one per connection), however many
//! requests came since the last one. (It kept a weak reference per sleep ever polled until the
//! next sweep: at 10,000 requests/s a sweep freed 2,500 of them at once, cold, every 250 ms.)
//! Written by hand: tokio's timer is the only one hyper-util offers, and no crate
//! implements hyper's `Timer` this way.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

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
            reg: None,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<CoarseSleep>() {
            Some(s) => {
                let s = s.get_mut();
                s.deadline = new_deadline;
                // Registered again, with the new deadline, when next polled.
                s.reg = None;
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// One registered sleep, as its thread's sweeper sees it.
#[derive(Debug)]
struct Entry {
    deadline: Instant,
    /// The task to wake at the deadline; taken by the sweeper when it fires, so `None` means
    /// the sleep has ended.
    waker: Option<Waker>,
}

/// The sleeps registered on one thread, and whether a sweeper is checking them.
#[derive(Debug, Default)]
struct Wheel {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each registered sleep's entry, removed when the sleep is dropped (or reset), so that
    /// a sweep walks the sleeps alive now (about one per connection), not every sleep made
    /// since the last sweep (one per request).
    slots: Slab<Entry>,
    sweeping: bool,
}

impl Wheel {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

thread_local! {
    static WHEEL: Arc<Wheel> = Arc::default();
}

/// A sleep's place on its wheel; dropping it frees the place.
struct Registration {
    wheel: Arc<Wheel>,
    key: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.wheel.lock().slots.try_remove(self.key);
    }
}

struct CoarseSleep {
    deadline: Instant,
    /// Set at the first poll before the deadline.
    reg: Option<Registration>,
}

impl hyper::rt::Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(reg) = &this.reg {
            let mut inner = reg.wheel.lock();
            let Some(entry) = inner.slots.get_mut(reg.key) else {
                // Not reachable: only the registration removes its entry.
                return Poll::Ready(());
            };
            return match &mut entry.waker {
                None => Poll::Ready(()),
                Some(w) => {
                    if !w.will_wake(cx.waker()) {
                        *w = cx.waker().clone();
                    }
                    Poll::Pending
                }
            };
        }
        if Instant::now() >= this.deadline {
            return Poll::Ready(());
        }
        this.reg = register(this.deadline, cx.waker());
        if this.reg.is_none() {
            // No runtime to sweep from: it cannot end, as a sleep with no timer driver.
            tracing::debug!("a coarse sleep was polled outside a tokio runtime");
        }
        Poll::Pending
    }
}

/// Puts a sleep on this thread's wheel, starting the wheel's sweeper on the current runtime
/// if none runs. None when there is no runtime to run one, or the thread is exiting.
fn register(deadline: Instant, waker: &Waker) -> Option<Registration> {
    let wheel = WHEEL.try_with(Arc::clone).ok()?;
    let rt = tokio::runtime::Handle::try_current().ok()?;
    let (key, start) = {
        let mut inner = wheel.lock();
        let key = inner.slots.insert(Entry {
            deadline,
            waker: Some(waker.clone()),
        });
        (key, !std::mem::replace(&mut inner.sweeping, true))
    };
    if start {
        rt.spawn(sweep(wheel.clone()));
    }
    Some(Registration { wheel, key })
}

/// Ends every due sleep of `wheel` once per [`TICK`]; stops when the wheel has no sleep left
/// (the next sleep starts it again) or its runtime shuts down.
async fn sweep(wheel: Arc<Wheel>) {
    /// Marks the wheel unswept when the task is dropped (its runtime shut down).
    struct Stopped(Option<Arc<Wheel>>);
    impl Drop for Stopped {
        fn drop(&mut self) {
            if let Some(w) = self.0.take() {
                w.lock().sweeping = false;
            }
        }
    }
    let mut stopped = Stopped(Some(wheel.clone()));
    let mut due = Vec::new();
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        {
            let mut inner = wheel.lock();
            if inner.slots.is_empty() {
                // Stopped under the lock: a sleep registered after this starts a new sweeper.
                // The slab's room, grown by the most sleeps alive at once, goes with it.
                inner.slots = Slab::new();
                inner.sweeping = false;
                stopped.0 = None;
                return;
            }
            for (_, e) in inner.slots.iter_mut() {
                if e.deadline <= now {
                    due.extend(e.waker.take());
                }
            }
        }
        // Woken outside the lock: a woken task may register its next sleep at once.
        for w in due.drain(..) {
            w.wake();
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
    async fn a_dropped_sleep_frees_its_place_at_once_and_the_sweeper_stops_when_none_are_left() {
        let t = CoarseTimer;
        let wheel = WHEEL.with(Arc::clone);
        let mut alive = Vec::new();
        for _ in 0..1000 {
            let mut s = t.sleep(Duration::from_secs(30));
            assert!(futures_poll_once(&mut s).is_pending());
            alive.push(s);
        }
        assert!(wheel.lock().sweeping);
        assert_eq!(wheel.lock().slots.len(), 1000);
        let room = wheel.lock().slots.capacity();
        drop(alive);
        assert!(wheel.lock().slots.is_empty());
        // A request's sleep, made and dropped 100,000 times, reuses one place: a sweep walks
        // the sleeps alive, not the ones made since the last sweep.
        for _ in 0..100_000 {
            let mut s = t.sleep(Duration::from_secs(30));
            assert!(futures_poll_once(&mut s).is_pending());
        }
        assert!(wheel.lock().slots.is_empty());
        assert_eq!(
            wheel.lock().slots.capacity(),
            room,
            "the wheel grew with sleeps that were dropped"
        );
        tokio::time::sleep(TICK * 3).await;
        assert!(!wheel.lock().sweeping, "the sweeper still runs");
        assert_eq!(wheel.lock().slots.capacity(), 0, "its room was kept");
        // And starts again for the next sleep.
        t.sleep(Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn a_sleep_dropped_on_another_thread_frees_its_place() {
        let t = CoarseTimer;
        let wheel = WHEEL.with(Arc::clone);
        let mut s = t.sleep(Duration::from_secs(30));
        assert!(futures_poll_once(&mut s).is_pending());
        assert_eq!(wheel.lock().slots.len(), 1);
        std::thread::spawn(move || drop(s)).join().unwrap();
        assert!(wheel.lock().slots.is_empty());
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
