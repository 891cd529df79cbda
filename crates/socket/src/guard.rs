//! A guard on what one listener's clients can hold: connections in total and per source
//! address, and a deadline at every stage of a connection's life.
//!
//! A connection is *unproven* from accept until its first useful exchange (the TLS handshake
//! done and the HTTP/2 preface read; for HTTP/1 the first request's headers; for DNS the first
//! message). At the total cap a new connection evicts the oldest unproven one instead of being
//! refused, so a flood of idle or slow connections can never lock legitimate clients out: they
//! prove themselves within a round trip, the flood never does. Only when every connection is
//! proven is the new one refused. Over its source's cap a connection is refused at once.
//!
//! Stages and their deadlines: the handshake (TLS listeners, enforced by the caller with
//! [`Conn::evicted`] and [`GuardConfig::handshake_timeout`]), the first bytes or headers
//! ([`GuardConfig::first_timeout`]), and idle, no bytes either way
//! ([`GuardConfig::idle_timeout`]); [`GuardedIo`] enforces the last two on any stream.

use std::collections::{BTreeMap, HashMap};
use std::future::{poll_fn, Future as _};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Accepted, TLS handshake under way.
    Handshake,
    /// Waiting for the first bytes (HTTP/2 preface, HTTP/1 headers, first DNS message).
    First,
    /// Proven; closed when idle.
    Idle,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Handshake => "handshake",
            Stage::First => "first_bytes",
            Stage::Idle => "idle",
        }
    }

    fn from_u8(v: u8) -> Stage {
        match v {
            0 => Stage::Handshake,
            1 => Stage::First,
            _ => Stage::Idle,
        }
    }
}

/// What the guard did to a connection (counted by the observer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// Closed at accept: the listener is full of proven connections.
    RefusedTotal,
    /// Closed at accept: its source address holds its cap already.
    RefusedPerSource,
    /// Closed to make room for a new connection, while still unproven at this stage.
    Evicted(Stage),
    /// Closed because this stage's deadline passed.
    TimedOut(Stage),
}

impl Event {
    /// `(event, stage)` labels for metrics.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Event::RefusedTotal => ("refused", "total_cap"),
            Event::RefusedPerSource => ("refused", "source_cap"),
            Event::Evicted(s) => ("evicted", s.label()),
            Event::TimedOut(s) => ("timed_out", s.label()),
        }
    }
}

/// The bounds of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardConfig {
    /// Connections at once (at least 1).
    pub max_total: usize,
    /// Connections at once from one source IP (at least 1).
    pub max_per_source: usize,
    /// From accept to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// From accept (or the handshake's end) to the first useful exchange.
    pub first_timeout: Duration,
    /// No bytes either way for this long closes a proven connection.
    pub idle_timeout: Duration,
}

/// Called for every connection the guard refuses, evicts or times out, with the listener.
pub type Observer = Arc<dyn Fn(&'static str, Event) + Send + Sync>;

/// One listener's guard; cheap to clone.
#[derive(Clone)]
pub struct ConnGuard {
    inner: Arc<Inner>,
}

struct Inner {
    listener: &'static str,
    config: GuardConfig,
    state: Mutex<State>,
    observer: Option<Observer>,
}

#[derive(Default)]
struct State {
    next: u64,
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    /// Unproven connections by admission order: the first is the oldest.
    unproven: BTreeMap<u64, Arc<Slot>>,
}

struct Slot {
    ip: IpAddr,
    stage: AtomicU8,
    /// No longer counted (evicted, or dropped); set under the state lock.
    released: AtomicBool,
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

/// One admitted connection's place; dropping it frees the place.
pub struct Conn {
    guard: Arc<Inner>,
    id: u64,
    slot: Arc<Slot>,
}

/// A handle on an admitted connection for the protocol layer (e.g. the HTTP service, which
/// proves the connection on its first request); it does not hold the place.
#[derive(Clone)]
pub struct ConnHandle {
    guard: Arc<Inner>,
    id: u64,
    slot: Arc<Slot>,
}

/// A stream whose first-bytes and idle deadlines are enforced, and which fails once its
/// connection is evicted: reads and writes then return an error and the server closes it.
pub struct GuardedIo<T> {
    inner: T,
    conn: Conn,
    prove_after: Option<usize>,
    read: usize,
    started: Instant,
    last_activity: Instant,
    deadline: Pin<Box<Sleep>>,
    failed: bool,
}

impl std::fmt::Debug for ConnGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnGuard")
            .field("listener", &self.inner.listener)
            .field("config", &self.inner.config)
            .field("open", &self.open())
            .finish_non_exhaustive()
    }
}

impl ConnGuard {
    pub fn new(listener: &'static str, mut config: GuardConfig) -> Self {
        config.max_total = config.max_total.max(1);
        config.max_per_source = config.max_per_source.max(1);
        Self {
            inner: Arc::new(Inner {
                listener,
                config,
                state: Mutex::new(State::default()),
                observer: None,
            }),
        }
    }

    /// Reports every refusal, eviction and timeout (the server counts them in metrics).
    pub fn with_observer(self, observer: Observer) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            listener: shared.listener,
            config: shared.config,
            state: Mutex::new(State::default()),
            observer: shared.observer.clone(),
        });
        Self {
            inner: Arc::new(Inner {
                observer: Some(observer),
                ..inner
            }),
        }
    }

    pub fn config(&self) -> &GuardConfig {
        &self.inner.config
    }

    pub fn listener(&self) -> &'static str {
        self.inner.listener
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.inner.lock().total
    }

    /// A place for a connection from `peer` (starting at `stage`), evicting the oldest
    /// unproven connection at the total cap; `None` when refused (counted and logged): the
    /// caller drops the socket at once.
    pub fn admit(&self, peer: SocketAddr, stage: Stage) -> Option<Conn> {
        let ip = peer.ip();
        let config = &self.inner.config;
        let mut state = self.inner.lock();
        if state.per_source.get(&ip).copied().unwrap_or(0) >= config.max_per_source {
            drop(state);
            self.inner.event(Event::RefusedPerSource, Some(ip));
            return None;
        }
        let mut evicted = None;
        if state.total >= config.max_total {
            let Some((_, victim)) = state.unproven.pop_first() else {
                drop(state);
                self.inner.event(Event::RefusedTotal, Some(ip));
                return None;
            };
            state.release(&victim);
            victim.evicted.store(true, Ordering::Release);
            evicted = Some(victim);
        }
        let id = state.next;
        state.next += 1;
        state.total += 1;
        *state.per_source.entry(ip).or_default() += 1;
        let slot = Arc::new(Slot {
            ip,
            stage: AtomicU8::new(stage as u8),
            released: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        state.unproven.insert(id, slot.clone());
        // Wake-ups and logs outside the lock; the place was taken under it.
        drop(state);
        if let Some(victim) = evicted {
            let taken = victim
                .waker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(w) = taken {
                w.wake();
            }
            let victim_stage = Stage::from_u8(victim.stage.load(Ordering::Acquire));
            self.inner
                .event(Event::Evicted(victim_stage), Some(victim.ip));
        }
        Some(Conn {
            guard: self.inner.clone(),
            id,
            slot,
        })
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Counters and a map: whatever panicked while holding the lock left them usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn event(&self, event: Event, ip: Option<IpAddr>) {
        if let Some(o) = &self.observer {
            o(self.listener, event);
        }
        let (what, stage) = event.labels();
        let listener = self.listener;
        let source = ip.map(|ip| ip.to_string()).unwrap_or_default();
        match event {
            Event::RefusedTotal | Event::RefusedPerSource => crate::warn_limited!(
                ("connection refused", listener),
                listener,
                reason = stage,
                %source,
                max_total = self.config.max_total,
                max_per_source = self.config.max_per_source,
                "refusing a connection: over the listener's connection cap (--max-connections, --max-connections-per-source)"
            ),
            Event::Evicted(_) => crate::warn_limited!(
                ("connection evicted", listener),
                listener,
                stage,
                %source,
                max_total = self.config.max_total,
                "closing the oldest connection that has not yet sent a request, to make room: the listener is at its connection cap"
            ),
            Event::TimedOut(_) => crate::warn_limited!(
                ("connection timed out", listener),
                listener,
                stage,
                %source,
                "closing a connection: {what} at stage {stage}"
            ),
        }
    }
}

impl State {
    fn release(&mut self, slot: &Slot) {
        if slot.released.swap(true, Ordering::AcqRel) {
            return;
        }
        self.total -= 1;
        if let Some(n) = self.per_source.get_mut(&slot.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&slot.ip);
            }
        }
    }
}

impl Conn {
    pub fn stage(&self) -> Stage {
        Stage::from_u8(self.slot.stage.load(Ordering::Acquire))
    }

    pub fn config(&self) -> &GuardConfig {
        &self.guard.config
    }

    /// The handshake is done: the first-bytes stage begins.
    pub fn handshake_done(&self) {
        let _ = self.slot.stage.compare_exchange(
            Stage::Handshake as u8,
            Stage::First as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The first useful exchange happened: the connection can no longer be evicted and only
    /// the idle deadline applies.
    pub fn prove(&self) {
        self.handle().prove();
    }

    pub fn handle(&self) -> ConnHandle {
        ConnHandle {
            guard: self.guard.clone(),
            id: self.id,
            slot: self.slot.clone(),
        }
    }

    pub fn is_evicted(&self) -> bool {
        self.slot.evicted.load(Ordering::Acquire)
    }

    /// Resolves when the connection is evicted (select on it around a handshake).
    pub async fn evicted(&self) {
        poll_fn(|cx| self.poll_evicted(cx)).await
    }

    fn poll_evicted(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_evicted() {
            return Poll::Ready(());
        }
        *self
            .slot
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
        // Evicted between the check and the registration: the evicter found no waker.
        if self.is_evicted() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Counts and logs a deadline passed at `stage` (the caller closes the connection).
    pub fn timed_out(&self, stage: Stage) {
        self.guard.event(Event::TimedOut(stage), Some(self.slot.ip));
    }
}

impl ConnHandle {
    /// See [`Conn::prove`].
    pub fn prove(&self) {
        if self.slot.stage.swap(Stage::Idle as u8, Ordering::AcqRel) == Stage::Idle as u8 {
            return;
        }
        self.guard.lock().unproven.remove(&self.id);
    }

    pub fn is_proven(&self) -> bool {
        self.slot.stage.load(Ordering::Acquire) == Stage::Idle as u8
    }

    /// See [`Conn::timed_out`].
    pub fn timed_out(&self, stage: Stage) {
        self.guard.event(Event::TimedOut(stage), Some(self.slot.ip));
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut state = self.guard.lock();
        state.unproven.remove(&self.id);
        state.release(&self.slot);
    }
}

impl<T> GuardedIo<T> {
    /// Guards `inner` from now: the first-bytes deadline runs until [`Conn::prove`] (called
    /// here once `prove_after` bytes were read, if given; else by the protocol layer), then the
    /// idle deadline.
    pub fn new(inner: T, conn: Conn, prove_after: Option<usize>) -> Self {
        conn.handshake_done();
        let now = Instant::now();
        let first = conn.config().first_timeout;
        Self {
            inner,
            conn,
            prove_after,
            read: 0,
            started: now,
            last_activity: now,
            deadline: Box::pin(tokio::time::sleep_until(now + first)),
            failed: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// An error when the connection was evicted or a deadline passed; else registers the
    /// wake-ups for both.
    fn check(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.failed {
            return Some(io::Error::from(io::ErrorKind::TimedOut));
        }
        let proven = self.conn.stage() == Stage::Idle;
        if !proven && self.conn.poll_evicted(cx).is_ready() {
            self.failed = true;
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "evicted: the listener is at its connection cap",
            ));
        }
        loop {
            let (base, limit, stage) = if self.conn.stage() == Stage::Idle {
                (
                    self.last_activity,
                    self.conn.config().idle_timeout,
                    Stage::Idle,
                )
            } else {
                (self.started, self.conn.config().first_timeout, Stage::First)
            };
            let due = base + limit;
            if self.deadline.deadline() != due {
                self.deadline.as_mut().reset(due);
            }
            if self.deadline.as_mut().poll(cx).is_pending() {
                return None;
            }
            if Instant::now() >= due {
                self.failed = true;
                self.conn.timed_out(stage);
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} deadline passed", stage.label()),
                ));
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.last_activity = Instant::now();
            this.read = this.read.saturating_add(n);
            if this.prove_after.is_some_and(|p| this.read >= p) {
                this.conn.prove();
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = Instant::now();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = Instant::now();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config(total: usize, per_source: usize) -> GuardConfig {
        GuardConfig {
            max_total: total,
            max_per_source: per_source,
            handshake_timeout: Duration::from_secs(10),
            first_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    fn peer(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], 40000))
    }

    fn counting(guard: ConnGuard) -> (ConnGuard, Arc<Mutex<Vec<Event>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let guard = guard.with_observer(Arc::new(move |_, e| s.lock().unwrap().push(e)));
        (guard, seen)
    }

    #[test]
    fn at_the_cap_the_oldest_unproven_is_evicted_and_proven_ones_stay() {
        let (guard, seen) = counting(ConnGuard::new("test", config(3, 10)));
        let a = guard.admit(peer(1), Stage::Handshake).unwrap();
        let b = guard.admit(peer(2), Stage::First).unwrap();
        let c = guard.admit(peer(3), Stage::First).unwrap();
        a.prove();
        // Full: the oldest unproven (b) makes room, a proven one (a) never does.
        let d = guard.admit(peer(4), Stage::First).unwrap();
        assert!(b.is_evicted() && !a.is_evicted() && !c.is_evicted());
        assert_eq!(guard.open(), 3);
        c.prove();
        d.prove();
        // Everyone proven: refused.
        assert!(guard.admit(peer(5), Stage::First).is_none());
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Event::Evicted(Stage::First), Event::RefusedTotal]
        );
        // Dropping an evicted connection does not free a second place.
        drop(b);
        assert_eq!(guard.open(), 3);
        drop(a);
        assert_eq!(guard.open(), 2);
        assert!(guard.admit(peer(5), Stage::First).is_some());
    }

    #[test]
    fn a_source_over_its_cap_is_refused_and_others_are_not() {
        let (guard, seen) = counting(ConnGuard::new("test", config(100, 2)));
        let _a = guard.admit(peer(1), Stage::First).unwrap();
        let b = guard.admit(peer(1), Stage::First).unwrap();
        assert!(guard.admit(peer(1), Stage::First).is_none());
        assert!(guard.admit(peer(2), Stage::First).is_some());
        drop(b);
        assert!(guard.admit(peer(1), Stage::First).is_some());
        assert_eq!(*seen.lock().unwrap(), vec![Event::RefusedPerSource]);
    }

    #[tokio::test]
    async fn eviction_wakes_a_waiting_handshake() {
        let guard = ConnGuard::new("test", config(1, 10));
        let a = guard.admit(peer(1), Stage::Handshake).unwrap();
        let waiting = tokio::spawn(async move { a.evicted().await });
        tokio::task::yield_now().await;
        let _b = guard.admit(peer(2), Stage::Handshake).unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the evicted connection's waiter woke")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn first_bytes_then_idle_deadlines_close_the_stream() {
        let observed = Arc::new(AtomicUsize::new(0));
        let o = observed.clone();
        let guard = ConnGuard::new("test", config(10, 10)).with_observer(Arc::new(move |_, e| {
            assert!(matches!(e, Event::TimedOut(_)));
            o.fetch_add(1, Ordering::Relaxed);
        }));
        // Silent from the start: the first-bytes deadline.
        let (client, server) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(server, guard.admit(peer(1), Stage::First).unwrap(), Some(3));
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));

        // Proven after 3 bytes; then traffic keeps it open, silence closes it after 60 s.
        let (mut client2, server2) = tokio::io::duplex(64);
        let mut io2 = GuardedIo::new(
            server2,
            guard.admit(peer(1), Stage::First).unwrap(),
            Some(3),
        );
        client2.write_all(b"abc").await.unwrap();
        assert_eq!(io2.read(&mut buf).await.unwrap(), 3);
        assert_eq!(io2.conn().stage(), Stage::Idle);
        tokio::time::sleep(Duration::from_secs(50)).await;
        io2.write_all(b"x").await.unwrap();
        let start = Instant::now();
        let e = io2.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        assert_eq!(observed.load(Ordering::Relaxed), 2);
        drop(client);
    }

    #[tokio::test]
    async fn an_evicted_stream_fails_its_pending_read() {
        let guard = ConnGuard::new("test", config(1, 10));
        let (_client, server) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(server, guard.admit(peer(1), Stage::First).unwrap(), None);
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            io.read(&mut buf).await
        });
        tokio::task::yield_now().await;
        let _new = guard.admit(peer(2), Stage::First).unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), reading)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    }
}
