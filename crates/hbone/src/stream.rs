//! Byte-stream view (`AsyncRead + AsyncWrite`) of one HTTP/2 CONNECT stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::io::Kick;

/// Largest chunk handed to h2 per write; bounds the copy and the flow-control reservation.
const MAX_WRITE_CHUNK: usize = 256 * 1024;

/// One tunnelled stream. Shutting down the write side sends END_STREAM (TCP half-close); the
/// read side still delivers what the peer sends until its END_STREAM. Dropping it resets the
/// stream if it was not closed cleanly.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    write_closed: bool,
    /// Has the connection write what this stream queued when the stream is flushed.
    kick: Kick,
    // Keeps a pool slot reserved for as long as the stream lives (client side only).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("pending", &self.pending.len())
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl HboneStream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        guard: Option<Box<dyn Send + Sync>>,
        kick: Kick,
    ) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            kick,
            _guard: guard,
        }
    }

    /// Waits until h2 lets up to `want` (> 0) more bytes be queued on the stream and returns how
    /// many (at least one, at most `want`). Callers queue all of it at once: h2's
    /// `poll_capacity` reports only increases, so capacity left assigned but unused would not
    /// be reported again.
    pub(crate) fn poll_send_capacity(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = want.min(MAX_WRITE_CHUNK);
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                // h2 reports "no new capacity"; the next poll registers the waker.
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    // Stream no longer sendable: find out why.
                    return match ready!(self.send.poll_reset(cx)) {
                        Ok(reason) => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            format!("HBONE stream reset by peer: {reason}"),
                        ))),
                        Err(e) => Poll::Ready(Err(h2_to_io(e))),
                    };
                }
            }
        }
    }

    /// Queues `data` (no more than [`Self::poll_send_capacity`] granted) as DATA.
    pub(crate) fn send_chunk(&mut self, data: Bytes) -> io::Result<()> {
        self.send.send_data(data, false).map_err(h2_to_io)
    }

    /// The next chunk the peer sent, `None` at the end of the stream. Its flow-control capacity
    /// is not released: the caller does that with [`Self::release`] when it sees fit.
    pub(crate) fn poll_recv_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        match ready!(self.recv.poll_data(cx)) {
            Some(Ok(chunk)) => Poll::Ready(Ok(Some(chunk))),
            // A reset with NO_ERROR after END_STREAM is a clean close.
            Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => Poll::Ready(Ok(None)),
            Some(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
            None => Poll::Ready(Ok(None)),
        }
    }

    /// Lets the peer send `n` more bytes.
    pub(crate) fn release(&mut self, n: usize) {
        // Fails only once the stream is gone, when the window no longer matters.
        let _ = self.recv.flow_control().release_capacity(n);
    }

    /// What an earlier `poll_read` received but did not hand out (capacity already released).
    pub(crate) fn take_pending(&mut self) -> Bytes {
        std::mem::take(&mut self.pending)
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::other("h2 I/O error"),
        }
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.poll_recv_chunk(cx))? {
                Some(chunk) => {
                    // The chunk is buffered here, so the window can be reopened right away.
                    self.release(chunk.len());
                    self.pending = chunk;
                }
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, buf.len()))?;
        // h2 keeps what it is given until written, so a borrowed slice has to be copied; the
        // splice in `copy` avoids this by reading into memory it can hand over.
        self.send_chunk(Bytes::copy_from_slice(&buf[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what was queued; in a burst, a kick writes it sooner.
        self.kick.kick();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.reserve_capacity(0);
            if let Err(e) = self.send.send_data(Bytes::new(), true) {
                // Already closed by a reset: nothing left to half-close.
                tracing::debug!(error = %e, "END_STREAM not sent");
            }
        }
        Poll::Ready(Ok(()))
    }
}
