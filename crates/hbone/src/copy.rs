//! Copying both ways between two streams with buffers that start small and grow under bulk.
//!
//! Every proxied connection holds one buffer per direction for its whole life. Fixed 64 KiB
//! buffers (what bulk throughput wants) cost 128 KiB per connection per proxy side even for a
//! connection that carries a few small requests, and glibc hands a reused chunk back zeroed, so
//! that memory is resident. Here a buffer starts at [`INITIAL_BUFFER`] and is replaced by one
//! four times larger, up to [`MAX_BUFFER`], each time a read fills it completely: request and
//! response traffic stays at 8 KiB a direction, a bulk stream reaches 64 KiB after two reads.
//!
//! tokio's `copy_bidirectional_with_sizes` takes fixed sizes; this is the same state machine
//! (write what was read, flush when the reader has nothing, shut the writer down at EOF) with
//! the growth added.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A direction's first buffer.
pub const INITIAL_BUFFER: usize = 8 * 1024;
/// The largest a direction's buffer grows to.
pub const MAX_BUFFER: usize = 64 * 1024;

/// One direction: bytes read from one side and not yet written to the other.
struct Pipe {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    /// The last read filled the buffer: grow it once it is drained.
    filled: bool,
    read_done: bool,
    need_flush: bool,
    amount: u64,
}

impl Pipe {
    fn new() -> Self {
        Self {
            buf: vec![0; INITIAL_BUFFER].into_boxed_slice(),
            pos: 0,
            cap: 0,
            filled: false,
            read_done: false,
            need_flush: false,
            amount: 0,
        }
    }

    /// Copies until the reader's EOF has been written and flushed; returns the bytes copied.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                if self.filled && self.buf.len() < MAX_BUFFER {
                    // Drained, so nothing is lost by replacing it.
                    self.buf = vec![0; (self.buf.len() * 4).min(MAX_BUFFER)].into_boxed_slice();
                }
                self.filled = false;
                self.pos = 0;
                self.cap = 0;
                let mut rb = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.cap = n;
                            self.filled = n == self.buf.len();
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read for now: push out what was written.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the other side accepted no bytes",
                    )));
                }
                self.pos += n;
                self.amount += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.amount));
            }
        }
    }
}

enum State {
    Copying(Pipe),
    ShuttingDown(u64),
    Done(u64),
}

/// Drives one direction: copy, then half-close the writer (TCP FIN, or END_STREAM on HBONE).
fn poll_direction<R, W>(
    state: &mut State,
    cx: &mut Context<'_>,
    reader: &mut R,
    writer: &mut W,
) -> Poll<io::Result<u64>>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    loop {
        match state {
            State::Copying(pipe) => {
                let n = ready!(pipe.poll_copy(cx, Pin::new(&mut *reader), Pin::new(&mut *writer)))?;
                *state = State::ShuttingDown(n);
            }
            State::ShuttingDown(n) => {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                *state = State::Done(*n);
            }
            State::Done(n) => return Poll::Ready(Ok(*n)),
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both have reached EOF, half-closing each writer when its
/// reader ends. Returns (bytes a → b, bytes b → a); the first error of either direction ends
/// both.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = State::Copying(Pipe::new());
    let mut b_to_a = State::Copying(Pipe::new());
    poll_fn(|cx| {
        let ab = poll_direction(&mut a_to_b, cx, a, b)?;
        let ba = poll_direction(&mut b_to_a, cx, b, a)?;
        match (ab, ba) {
            (Poll::Ready(x), Poll::Ready(y)) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Bulk both ways at once: every byte arrives in order, both counts are exact, and each
    /// side sees EOF after the other half-closes.
    #[tokio::test]
    async fn bulk_both_ways_with_half_close() {
        let (mut client, mut a) = duplex(32 * 1024);
        let (mut b, mut server) = duplex(32 * 1024);
        let up = pattern(3 * 1024 * 1024 + 17, 1);
        let down = pattern(2 * 1024 * 1024 + 5, 7);
        let copier = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        let (up2, down2) = (up.clone(), down.clone());
        let client_task = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut client);
            let send = async {
                w.write_all(&up2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            assert_eq!(got, down2);
        });
        let (mut r, mut w) = tokio::io::split(&mut server);
        let send = async {
            w.write_all(&down).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
        n.unwrap();
        assert_eq!(got, up);
        client_task.await.unwrap();
        let (ab, ba) = copier.await.unwrap().unwrap();
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    /// Small request/response exchanges never fill the first buffer, so it stays 8 KiB; a
    /// bulk stream grows it to the maximum and no further.
    #[tokio::test]
    async fn buffers_grow_only_under_bulk() {
        let (mut src, mut reader) = duplex(256 * 1024);
        let (mut writer, mut dst) = duplex(256 * 1024);
        let mut pipe = Pipe::new();
        for i in 0..50u8 {
            let msg = pattern(1000, i);
            src.write_all(&msg).await.unwrap();
            let mut got = vec![0; msg.len()];
            poll_fn(|cx| {
                // Copies what is there, then parks on the empty reader.
                assert!(pipe
                    .poll_copy(cx, Pin::new(&mut reader), Pin::new(&mut writer))
                    .is_pending());
                Poll::Ready(())
            })
            .await;
            dst.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg);
        }
        assert_eq!(pipe.buf.len(), INITIAL_BUFFER);

        let bulk = pattern(MAX_BUFFER * 3, 9);
        src.write_all(&bulk).await.unwrap();
        drop(src);
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            dst.read_to_end(&mut got).await.unwrap();
            got
        });
        let n = poll_fn(|cx| pipe.poll_copy(cx, Pin::new(&mut reader), Pin::new(&mut writer)))
            .await
            .unwrap();
        assert_eq!(pipe.buf.len(), MAX_BUFFER);
        assert_eq!(n, 50 * 1000 + bulk.len() as u64);
        drop(writer);
        assert_eq!(reading.await.unwrap(), bulk);
    }

    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
        }
    }

    impl AsyncWrite for Broken {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "broken")))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A reset on one side ends the copy with that error, while the other side is idle.
    #[tokio::test]
    async fn an_error_on_either_side_ends_the_copy() {
        let (_keep, mut idle) = duplex(1024);
        let err = copy_bidirectional(&mut idle, &mut Broken)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    /// A writer that accepts nothing is an error, not a busy loop.
    #[tokio::test]
    async fn a_writer_taking_zero_bytes_is_an_error() {
        struct Zero;
        impl AsyncWrite for Zero {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<io::Result<usize>> {
                Poll::Ready(Ok(0))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let (mut src, mut reader) = duplex(1024);
        src.write_all(b"hello").await.unwrap();
        let mut pipe = Pipe::new();
        let err = poll_fn(|cx| pipe.poll_copy(cx, Pin::new(&mut reader), Pin::new(&mut Zero)))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }
}
