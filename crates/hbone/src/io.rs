//! The socket under TLS: reads through a buffer, writes gathered over one poll of the
//! connection's task.
//!
//! h2 flushes after every DATA frame it sends (`FramedWrite` holds one frame's payload at a
//! time), and tokio-rustls passes each flush straight to the socket, so a connection task that
//! sends the answers of several streams in one poll made one `writev` per answer: 229,048 of
//! them for 229,024 answers in a closed-loop run of `bench/dataplane.sh`, against 59,159 wake-ups
//! of that agent. Once the HTTP/2 handshake is done the socket is *corked*: writes (TLS records)
//! go to a buffer, a flush is a no-op, and [`Corked`], which wraps the connection's task, writes
//! the buffer at the end of each poll of it. Nothing waits longer than the poll that wrote it,
//! as a task only sleeps after that poll returns. Past [`CORK_LIMIT`] bytes a write drains the
//! buffer first.
//!
//! Gathering has a cost when many streams send at once: the connection's task runs after every
//! task the scheduler queued before it, so in a burst of requests nothing leaves an agent until
//! the whole burst was read, and the agents at both ends of the connection take turns instead
//! of working at once. A stream that flushes (hyper does after each HTTP/1.1 message) counts
//! towards a [`Kick`]: every [`KICK_EVERY`]th flush polls the connection in the flushing
//! stream's task, so the burst leaves in parts. The L4 path never flushes the stream and is
//! left to the gathering alone.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Bytes read from the socket per `read` under TLS. rustls asks for 4 KiB at a time (and drops
/// its buffer whenever it runs empty), so without this a bulk stream costs a syscall per 4 KiB.
const READ_BUFFER: usize = 64 * 1024;

/// Bytes gathered before a write sends them on without waiting for the end of the poll.
pub(crate) const CORK_LIMIT: usize = 64 * 1024;

/// The server side's TLS stream over a [`Socket`].
pub(crate) type TlsSocket = tokio_rustls::server::TlsStream<Socket>;

/// The TCP connection of an HBONE peer: reads through a buffer, writes through [`Cork`].
pub(crate) struct Socket {
    read: BufReader<OwnedReadHalf>,
    cork: Cork,
}

/// The write side of a [`Socket`], shared with the task wrapper that drains it.
#[derive(Clone)]
pub(crate) struct Cork(Arc<Mutex<WriteSide>>);

struct WriteSide {
    socket: OwnedWriteHalf,
    pending: Vec<u8>,
    corked: bool,
    /// A drain at the end of a poll failed: every later write says so.
    failed: Option<io::ErrorKind>,
}

pub(crate) fn buffered(tcp: TcpStream) -> Socket {
    let (read, write) = tcp.into_split();
    Socket {
        read: BufReader::with_capacity(READ_BUFFER, read),
        cork: Cork(Arc::new(Mutex::new(WriteSide {
            socket: write,
            pending: Vec::new(),
            corked: false,
            failed: None,
        }))),
    }
}

impl Socket {
    pub(crate) fn cork(&self) -> Cork {
        self.cork.clone()
    }
}

impl Cork {
    fn lock(&self) -> MutexGuard<'_, WriteSide> {
        // Only this connection's task takes it, one poll at a time; a panic mid-write leaves
        // bytes that are still to be written, which is what `pending` says.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on writes wait for [`Cork::poll_drain`] (or [`CORK_LIMIT`]).
    pub(crate) fn engage(&self) {
        self.lock().corked = true;
    }

    /// Writes what is gathered.
    pub(crate) fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.lock().poll_drain(cx)
    }
}

impl WriteSide {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        while !self.pending.is_empty() {
            let n = match ready!(Pin::new(&mut self.socket).poll_write(cx, &self.pending)) {
                Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
                r => r,
            };
            match n {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) => {
                    self.failed = Some(e.kind());
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_bufs(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if !self.corked || self.pending.len() + len > CORK_LIMIT {
            ready!(self.poll_drain(cx))?;
            if !self.corked {
                return Pin::new(&mut self.socket).poll_write_vectored(cx, bufs);
            }
        }
        for b in bufs {
            self.pending.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.cork
            .lock()
            .poll_write_bufs(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.cork.lock().poll_write_bufs(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut w = self.cork.lock();
        if let Some(kind) = w.failed {
            return Poll::Ready(Err(kind.into()));
        }
        if w.corked {
            // At the end of this poll of the connection's task (`Corked`).
            return Poll::Ready(Ok(()));
        }
        ready!(w.poll_drain(cx))?;
        Pin::new(&mut w.socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut w = self.cork.lock();
        ready!(w.poll_drain(cx))?;
        Pin::new(&mut w.socket).poll_shutdown(cx)
    }
}

/// A connection's task: after each poll of it, what it wrote goes to the socket; it ends once
/// the last of it is written.
///
/// Its future is shared with the connection's streams through [`Kick`]: every
/// [`KICK_EVERY`]th stream flush polls the connection in the flushing stream's task, so a
/// burst's first messages leave before the rest of it is read (tokio's current-thread
/// scheduler is FIFO: the connection's task runs after every task queued before it).
pub(crate) struct Corked<F: Future> {
    shared: Arc<Mutex<Driven<F>>>,
}

/// Stream flushes that have the connection written before its task's turn. Measured (BENCHMARKS.md,
/// issue 17, run 14): with 32 HTTP/1.1 requests in flight, a kick at every flush cost 30% more
/// CPU per request for 4% more requests/s; every 2nd, 4th, 8th and 16th flush gave 10–22% more
/// requests/s, every 4th and 8th the most, at 0–5% more CPU.
const KICK_EVERY: u32 = 8;

struct Driven<F: Future> {
    inner: Pin<Box<F>>,
    cork: Cork,
    done: Option<F::Output>,
    /// The waker of the task that owns the connection; a kick polls with it, so what the
    /// connection waits for wakes that task, not the stream that kicked it.
    waker: Option<Waker>,
    /// Flushes since the connection was last polled.
    flushes: u32,
}

impl<F: Future> Driven<F> {
    /// Polls the connection and writes what it wrote; `Pending` while bytes are left unwritten.
    fn poll_once(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.flushes = 0;
        if self.done.is_none() {
            if let Poll::Ready(out) = self.inner.as_mut().poll(cx) {
                self.done = Some(out);
            }
        }
        // Pending: the socket wakes the task when it takes more. An error is kept for the
        // connection's next write, and its reads meet it too.
        self.cork.poll_drain(cx).map(|_| ())
    }
}

impl<F> Corked<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    /// Engages `cork` and wraps the task that drives its connection: `make` gets the handle its
    /// streams kick it with.
    pub(crate) fn new(cork: Cork, make: impl FnOnce(Kick) -> F) -> Self {
        cork.engage();
        let shared = Arc::new_cyclic(|me: &Weak<Mutex<Driven<F>>>| {
            let me: Weak<dyn Kickable> = me.clone();
            Mutex::new(Driven {
                inner: Box::pin(make(Kick(Some(me)))),
                cork,
                done: None,
                waker: None,
                flushes: 0,
            })
        });
        Self { shared }
    }

    /// A handle with which the connection's streams have it written now.
    pub(crate) fn kick(&self) -> Kick {
        let shared: Arc<dyn Kickable> = self.shared.clone();
        Kick(Some(Arc::downgrade(&shared)))
    }
}

impl<F: Future> Future for Corked<F>
where
    F::Output: Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut d = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if !d.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            d.waker = Some(cx.waker().clone());
        }
        if d.poll_once(cx).is_pending() && d.done.is_some() {
            return Poll::Pending;
        }
        match d.done.take() {
            Some(out) => Poll::Ready(out),
            None => Poll::Pending,
        }
    }
}

trait Kickable: Send + Sync {
    fn kick(&self);
}

impl<F> Kickable for Mutex<Driven<F>>
where
    F: Future + Send,
    F::Output: Send,
{
    fn kick(&self) {
        // Held only while the connection's own task (or another kick) polls it: then it is
        // being written anyway.
        let Ok(mut d) = self.try_lock() else { return };
        if d.done.is_some() {
            return;
        }
        d.flushes += 1;
        if d.flushes < KICK_EVERY {
            return;
        }
        let Some(waker) = d.waker.clone() else { return };
        let _ = d.poll_once(&mut Context::from_waker(&waker));
        if d.done.is_some() {
            // The connection ended in this poll: its task finishes it.
            waker.wake();
        }
    }
}

/// Has a connection write what its streams queued, from the stream's task (see [`Corked`]).
/// The default does nothing (a stream without a corked connection).
#[derive(Clone, Default)]
pub(crate) struct Kick(Option<Weak<dyn Kickable>>);

impl Kick {
    pub(crate) fn kick(&self) {
        if let Some(shared) = self.0.as_ref().and_then(Weak::upgrade) {
            shared.kick();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (Socket, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (buffered(c.unwrap()), s.unwrap().0)
    }

    /// Whether the peer has anything to read right now (reads one byte if so). On loopback a
    /// sent byte is in the peer's queue when `send` returns.
    ///
    /// A std socket: tokio's `try_read` answers "would block" without asking the kernel until
    /// its event loop has seen the socket readable, which would make this always false.
    fn readable(peer: &std::net::TcpStream) -> bool {
        let mut b = [0u8; 1];
        !matches!(io::Read::read(&mut &*peer, &mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads exactly `n` bytes that are already in `peer`'s receive queue.
    fn read_queued(peer: &std::net::TcpStream, n: usize) -> Vec<u8> {
        peer.set_nonblocking(false).unwrap();
        let mut got = vec![0u8; n];
        io::Read::read_exact(&mut &*peer, &mut got).unwrap();
        peer.set_nonblocking(true).unwrap();
        got
    }

    #[tokio::test]
    async fn corked_writes_leave_together_at_the_end_of_the_poll() {
        let (mut socket, mut peer) = pair().await;
        // Before the cork (the handshakes): a flush sends.
        socket.write_all(b"hello ").await.unwrap();
        socket.flush().await.unwrap();
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello ");

        let cork = socket.cork();
        let peer = Arc::new(peer.into_std().unwrap());
        let peer_ref = peer.clone();
        let task = async move {
            for frame in [&b"one "[..], b"two ", b"three"] {
                socket.write_all(frame).await.unwrap();
                socket.flush().await.unwrap();
            }
            // Written and flushed three times, and still nothing on the wire: this poll of
            // the task is not over (nothing above waited).
            let early = readable(&peer_ref);
            (socket, early)
        };
        let (socket, early) = Corked::new(cork, |_| task).await;
        assert!(
            !early,
            "corked bytes reached the peer before the poll ended"
        );
        assert_eq!(read_queued(&peer, 13), b"one two three");
        drop(socket);
    }

    /// A burst: the connection's task has been woken by every message its streams queued, but
    /// has not run yet (this task does not yield). The streams' flushes kick it.
    #[tokio::test]
    async fn every_kick_every_th_flush_writes_before_the_connection_task_runs() {
        let (mut socket, peer) = pair().await;
        let peer = peer.into_std().unwrap();
        let cork = socket.cork();
        let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<&'static [u8]>();
        // As h2's connection task: writes what its streams queued whenever it is polled.
        let driver = Corked::new(cork, |_| async move {
            while let Some(frame) = queued.recv().await {
                socket.write_all(frame).await.unwrap();
            }
        });
        let kick = driver.kick();
        let task = tokio::spawn(driver);
        // Its first poll, which the kicks poll it as.
        tokio::task::yield_now().await;

        for _ in 1..KICK_EVERY {
            queue.send(b"m").unwrap();
            kick.kick();
        }
        assert!(
            !readable(&peer),
            "written before the {KICK_EVERY}th flush, with the connection's task not run"
        );
        queue.send(b"m").unwrap();
        kick.kick();
        let mut got = vec![0u8; 2 * KICK_EVERY as usize];
        let n = io::Read::read(&mut &peer, &mut got).unwrap_or(0);
        assert_eq!(
            n, KICK_EVERY as usize,
            "the {KICK_EVERY}th flush did not write the burst so far"
        );

        // The count starts again after a kick; the task itself still writes what is left.
        queue.send(b"m").unwrap();
        kick.kick();
        assert!(
            !readable(&peer),
            "a kick wrote before its count was reached"
        );
        drop(queue);
        task.await.unwrap();
        assert_eq!(read_queued(&peer, 1), b"m");
    }

    #[tokio::test]
    async fn past_the_limit_a_write_drains_first() {
        let (mut socket, mut peer) = pair().await;
        let cork = socket.cork();
        let gathered = {
            let cork = cork.clone();
            move || cork.lock().pending.len()
        };
        let big = vec![7u8; CORK_LIMIT];
        let task = async move {
            socket.write_all(&big).await.unwrap();
            let before = gathered();
            socket.write_all(b"x").await.unwrap();
            (socket, before, gathered())
        };
        let (_socket, before, after) = Corked::new(cork, |_| task).await;
        assert_eq!(
            before, CORK_LIMIT,
            "a write within the limit was not gathered"
        );
        assert_eq!(
            after, 1,
            "a write past the limit did not send what was gathered first"
        );
        let mut got = vec![0u8; CORK_LIMIT + 1];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got[CORK_LIMIT], b'x');
    }
}
