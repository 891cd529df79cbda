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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

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
pub(crate) struct Corked<F: Future> {
    inner: Pin<Box<F>>,
    cork: Cork,
    done: Option<F::Output>,
}

impl<F: Future> Corked<F> {
    /// Engages `cork` and wraps the task that drives its connection.
    pub(crate) fn new(inner: F, cork: Cork) -> Self {
        cork.engage();
        Self {
            inner: Box::pin(inner),
            cork,
            done: None,
        }
    }
}

impl<F: Future> Future for Corked<F>
where
    F::Output: Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if self.done.is_none() {
            if let Poll::Ready(out) = self.inner.as_mut().poll(cx) {
                self.done = Some(out);
            }
        }
        // Pending: the socket wakes the task when it takes more. An error is kept for the
        // connection's next write, and its reads meet it too.
        if self.cork.poll_drain(cx).is_pending() && self.done.is_some() {
            return Poll::Pending;
        }
        match self.done.take() {
            Some(out) => Poll::Ready(out),
            None => Poll::Pending,
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
    fn readable(peer: &TcpStream) -> bool {
        let mut b = [0u8; 1];
        !matches!(peer.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
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
        let peer_ref = &peer;
        let task = async move {
            for frame in [&b"one "[..], b"two ", b"three"] {
                socket.write_all(frame).await.unwrap();
                socket.flush().await.unwrap();
            }
            // Written and flushed three times, and still nothing on the wire: this poll of
            // the task is not over (nothing above waited).
            let early = readable(peer_ref);
            (socket, early)
        };
        let (socket, early) = Corked::new(task, cork).await;
        assert!(
            !early,
            "corked bytes reached the peer before the poll ended"
        );
        let mut got = vec![0u8; 13];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two three");
        drop(socket);
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
        let (_socket, before, after) = Corked::new(task, cork).await;
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
