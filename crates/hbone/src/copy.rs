//! Copying both ways between two streams with buffers that start small and grow under bulk.
//!
//! Every proxied connection holds one buffer per direction for its whole life. Fixed 64 KiB
//! buffers (what bulk throughput wants) cost 128 KiB per connection per proxy side even for a
//! connection that carries a few small requests, and glibc hands a reused chunk back zeroed, so
//! that memory is resident. Here a buffer starts at [`INITIAL_BUFFER`] and is replaced by one
//! four times larger, up to [`MAX_BUFFER`], each time a read fills it completely: request and
//! response traffic stays at 8 KiB a direction, a bulk stream reaches 64 KiB after two reads.
//!
//! tokio's `copy_bidirectional_with_sizes` takes fixed sizes; [`copy_bidirectional`] is the
//! same state machine (write what was read, flush when the reader has nothing, shut the writer
//! down at EOF) with the growth added.
//!
//! [`splice_tunnel`] is the same again between an [`HboneStream`] and a socket, minus the
//! copies the stream's `AsyncRead`/`AsyncWrite` view makes: h2 keeps the `Bytes` it is given
//! until the connection task writes them, so that view copies every written slice into a new
//! `Bytes`, and copies every received `Bytes` into the reader's buffer. The splice reads the
//! socket into a `BytesMut` and hands h2 the bytes read as they are, and writes h2's received
//! `Bytes` to the socket from where they are.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

use crate::stream::HboneStream;

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
                    return Poll::Ready(Err(write_zero()));
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

/// Socket → tunnel without a copy: reads land in the spare capacity of `buf`, and what was read
/// is split off and queued on the h2 stream as it is.
struct ToTunnel {
    buf: BytesMut,
    /// Bytes offered to each read; grows as [`Pipe`]'s buffer does.
    size: usize,
    /// Read and not yet queued: h2 takes what flow control allows, and nothing more is read
    /// until it has taken all of it.
    pending: Bytes,
    read_done: bool,
    amount: u64,
}

impl ToTunnel {
    fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(INITIAL_BUFFER),
            size: INITIAL_BUFFER,
            pending: Bytes::new(),
            read_done: false,
            amount: 0,
        }
    }

    /// Queues on the stream until the socket's EOF; returns the bytes queued.
    fn poll_copy<S>(
        &mut self,
        cx: &mut Context<'_>,
        mut socket: Pin<&mut S>,
        tunnel: &mut HboneStream,
    ) -> Poll<io::Result<u64>>
    where
        S: AsyncRead + ?Sized,
    {
        loop {
            while !self.pending.is_empty() {
                let n = ready!(tunnel.poll_send_capacity(cx, self.pending.len()))?;
                tunnel.send_chunk(self.pending.split_to(n))?;
                self.amount += n as u64;
            }
            if self.read_done {
                return Poll::Ready(Ok(self.amount));
            }
            if self.buf.capacity() < self.size {
                // Takes the allocation back whole once h2 has dropped every chunk split from
                // it, or else allocates `size` afresh (the old one goes with its last chunk).
                self.buf.reserve(self.size);
            }
            // Pending here needs no flush, unlike in `Pipe`: h2's connection task writes DATA
            // as soon as it is queued.
            let n = ready!(poll_read_buf(
                socket.as_mut(),
                cx,
                &mut (&mut self.buf).limit(self.size)
            ))?;
            if n == 0 {
                self.read_done = true;
                continue;
            }
            self.pending = self.buf.split_to(n).freeze();
            if n == self.size && self.size < MAX_BUFFER {
                self.size = (self.size * 4).min(MAX_BUFFER);
                self.buf = BytesMut::with_capacity(self.size);
            }
        }
    }
}

/// Tunnel → socket without a copy: each chunk h2 received is written to the socket from h2's
/// own buffer.
///
/// Flow-control capacity is released as the socket accepts bytes, not on receipt as
/// `HboneStream::poll_read` does: then the stream's receive window bounds all this stream
/// holds (h2's receive queue plus the chunk being written) however slow the socket is, and a
/// slow socket pauses the peer through the window instead of growing our memory. Released on
/// receipt, one more chunk (up to the 256 KiB frame limit) could be in flight beyond that.
struct ToSocket {
    chunk: Bytes,
    /// `chunk`'s capacity is still held (not so for what an earlier `poll_read` left).
    unreleased: bool,
    read_done: bool,
    need_flush: bool,
    amount: u64,
}

impl ToSocket {
    fn new(tunnel: &mut HboneStream) -> Self {
        Self {
            chunk: tunnel.take_pending(),
            unreleased: false,
            read_done: false,
            need_flush: false,
            amount: 0,
        }
    }

    /// Writes until the stream's end has been written and flushed; returns the bytes written.
    fn poll_copy<S>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut HboneStream,
        mut socket: Pin<&mut S>,
    ) -> Poll<io::Result<u64>>
    where
        S: AsyncWrite + ?Sized,
    {
        loop {
            while !self.chunk.is_empty() {
                let n = ready!(socket.as_mut().poll_write(cx, &self.chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(write_zero()));
                }
                self.chunk.advance(n);
                if self.unreleased {
                    tunnel.release(n);
                }
                self.amount += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(socket.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.amount));
            }
            match tunnel.poll_recv_chunk(cx) {
                Poll::Ready(Ok(Some(chunk))) => {
                    self.chunk = chunk;
                    self.unreleased = true;
                }
                Poll::Ready(Ok(None)) => self.read_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.need_flush {
                        ready!(socket.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "the other side accepted no bytes")
}

/// One direction: copying, then half-closing the writer (TCP FIN, or END_STREAM on HBONE).
enum State<P> {
    Copying(P),
    ShuttingDown(u64),
    Done(u64),
}

impl<P> State<P> {
    /// Drives the direction reading `r` and writing `w` with `copy`, then `shutdown`.
    fn poll<R: ?Sized, W: ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        copy: impl FnOnce(&mut P, &mut Context<'_>, &mut R, &mut W) -> Poll<io::Result<u64>>,
        shutdown: impl Fn(&mut Context<'_>, &mut W) -> Poll<io::Result<()>>,
    ) -> Poll<io::Result<u64>> {
        if let State::Copying(p) = self {
            let n = ready!(copy(p, cx, r, w))?;
            *self = State::ShuttingDown(n);
        }
        if let State::ShuttingDown(n) = *self {
            ready!(shutdown(cx, w))?;
            *self = State::Done(n);
        }
        match *self {
            State::Done(n) => Poll::Ready(Ok(n)),
            // Both earlier states move on or return.
            _ => Poll::Pending,
        }
    }
}

/// Drives one direction of [`copy_bidirectional`].
fn poll_direction<R, W>(
    state: &mut State<Pipe>,
    cx: &mut Context<'_>,
    reader: &mut R,
    writer: &mut W,
) -> Poll<io::Result<u64>>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    state.poll(
        cx,
        reader,
        writer,
        |pipe, cx, r, w| pipe.poll_copy(cx, Pin::new(r), Pin::new(w)),
        |cx, w| Pin::new(w).poll_shutdown(cx),
    )
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

/// Both directions of [`splice_tunnel`].
struct Splice {
    to_socket: State<ToSocket>,
    to_tunnel: State<ToTunnel>,
}

impl Splice {
    fn new(tunnel: &mut HboneStream) -> Self {
        Self {
            to_socket: State::Copying(ToSocket::new(tunnel)),
            to_tunnel: State::Copying(ToTunnel::new()),
        }
    }

    fn poll<S>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut HboneStream,
        socket: &mut S,
    ) -> Poll<io::Result<(u64, u64)>>
    where
        S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let down = self.to_socket.poll(
            cx,
            tunnel,
            socket,
            |p, cx, t, s| p.poll_copy(cx, t, Pin::new(s)),
            |cx, s| Pin::new(s).poll_shutdown(cx),
        )?;
        let up = self.to_tunnel.poll(
            cx,
            socket,
            tunnel,
            |p, cx, s, t| p.poll_copy(cx, Pin::new(s), t),
            // Sends END_STREAM.
            |cx, t| Pin::new(t).poll_shutdown(cx),
        )?;
        match (down, up) {
            (Poll::Ready(d), Poll::Ready(u)) => Poll::Ready(Ok((d, u))),
            _ => Poll::Pending,
        }
    }
}

/// Splices an HBONE tunnel and a socket (or anything `AsyncRead + AsyncWrite`) as
/// [`copy_bidirectional`]`(tunnel, socket)` does — half-closing each way, flushing the socket
/// when the tunnel has nothing, the first error of either direction ending both, a socket
/// write of 0 bytes an error — without copying the bytes between the socket and h2. Returns
/// (bytes tunnel → socket, bytes socket → tunnel), the order `copy_bidirectional` would.
///
/// The socket → tunnel buffer starts at [`INITIAL_BUFFER`] and grows to [`MAX_BUFFER`] only
/// under bulk, as there; the other direction has no buffer of its own, only the chunk h2
/// received, and holds no more than the stream's receive window.
pub async fn splice_tunnel<S>(tunnel: &mut HboneStream, socket: &mut S) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut splice = Splice::new(tunnel);
    poll_fn(|cx| splice.poll(cx, tunnel, socket)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// Pseudo-random bytes (splitmix64): a lost, repeated or reordered chunk shows, which a
    /// pattern repeating every 256 bytes could hide.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Bulk both ways at once: every byte arrives in order, both counts are exact, and each
    /// side sees EOF after the other half-closes.
    #[tokio::test]
    async fn bulk_both_ways_with_half_close() {
        let (mut client, mut a) = duplex(32 * 1024);
        let (mut b, mut server) = duplex(32 * 1024);
        let up = noise(3 * 1024 * 1024 + 17, 1);
        let down = noise(2 * 1024 * 1024 + 5, 7);
        let copier = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        let (client_got, server_got) = tokio::join!(
            send_and_receive(&mut client, &up),
            send_and_receive(&mut server, &down)
        );
        assert_eq!(server_got, up);
        assert_eq!(client_got, down);
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
        for i in 0..50 {
            let msg = noise(1000, i);
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

        let bulk = noise(MAX_BUFFER * 3, 9);
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
        let (mut src, mut reader) = duplex(1024);
        src.write_all(b"hello").await.unwrap();
        let mut pipe = Pipe::new();
        let err =
            poll_fn(|cx| pipe.poll_copy(cx, Pin::new(&mut reader), Pin::new(&mut TakesNothing)))
                .await
                .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }

    // The splice, against a real HTTP/2 connection over an in-memory pipe.

    use h2::{Reason, RecvStream, SendStream};
    use std::time::Duration;

    fn assert_same(got: &[u8], want: &[u8], what: &str) {
        let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
        assert!(
            got.len() == want.len() && first_diff.is_none(),
            "{what}: got {} bytes, want {}, first difference at {first_diff:?}",
            got.len(),
            want.len()
        );
    }

    /// Both ends (client, server) of one CONNECT stream on an HTTP/2 connection over an
    /// in-memory pipe. h2's default 64 KiB windows make flow control bite early.
    async fn h2_stream() -> (
        (SendStream<Bytes>, RecvStream),
        (SendStream<Bytes>, RecvStream),
    ) {
        let (client_io, server_io) = duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            // The connection does its I/O while it is polled.
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (send, req.into_body())
        });
        let (client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, client_send) = client.send_request(req, false).unwrap();
        let server_end = server.await.unwrap();
        let client_recv = response.await.unwrap().into_body();
        ((client_send, client_recv), server_end)
    }

    async fn tunnel_pair() -> (HboneStream, HboneStream) {
        let ((cs, cr), (ss, sr)) = h2_stream().await;
        (
            HboneStream::new(cs, cr, None, Default::default()),
            HboneStream::new(ss, sr, None, Default::default()),
        )
    }

    type Spliced = tokio::task::JoinHandle<io::Result<(u64, u64)>>;

    /// client app ⇄ socket ⇄ splice ⇄ HTTP/2 ⇄ splice ⇄ socket ⇄ server app: the two apps'
    /// ends and the two splices.
    async fn spliced_apps() -> (DuplexStream, DuplexStream, Spliced, Spliced) {
        let (mut client_tunnel, mut server_tunnel) = tunnel_pair().await;
        let (client_app, mut client_sock) = duplex(32 * 1024);
        let (mut server_sock, server_app) = duplex(32 * 1024);
        let c =
            tokio::spawn(async move { splice_tunnel(&mut client_tunnel, &mut client_sock).await });
        let s =
            tokio::spawn(async move { splice_tunnel(&mut server_tunnel, &mut server_sock).await });
        (client_app, server_app, c, s)
    }

    /// Writes `data` and half-closes while reading to EOF; returns what was read.
    async fn send_and_receive(io: &mut DuplexStream, data: &[u8]) -> Vec<u8> {
        let (mut r, mut w) = tokio::io::split(io);
        let send = async {
            w.write_all(data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
        n.unwrap();
        got
    }

    /// Megabytes both ways at once through two splices: every byte arrives in order and each
    /// splice counts exactly, (tunnel → socket, socket → tunnel).
    #[tokio::test]
    async fn splice_carries_bulk_both_ways_exactly() {
        let (mut client_app, mut server_app, c, s) = spliced_apps().await;
        let up = noise(3 * 1024 * 1024 + 17, 1);
        let down = noise(2 * 1024 * 1024 + 5, 2);
        let (at_server, at_client) = tokio::join!(
            send_and_receive(&mut client_app, &up),
            send_and_receive(&mut server_app, &down)
        );
        assert_same(&at_server, &down, "server app sent, client app received");
        assert_same(&at_client, &up, "client app sent, server app received");
        let (up_len, down_len) = (up.len() as u64, down.len() as u64);
        assert_eq!(c.await.unwrap().unwrap(), (down_len, up_len));
        assert_eq!(s.await.unwrap().unwrap(), (up_len, down_len));
    }

    /// After one side's EOF has crossed (END_STREAM one way, FIN the other), the other
    /// direction keeps flowing until its own EOF; both ways round.
    #[tokio::test]
    async fn splice_half_closes_each_way_independently() {
        for client_first in [true, false] {
            let (mut client_app, mut server_app, c, s) = spliced_apps().await;
            let (first, second) = if client_first {
                (&mut client_app, &mut server_app)
            } else {
                (&mut server_app, &mut client_app)
            };
            let request = noise(100_000, 3);
            let response = noise(1024 * 1024 + 1, 4);
            first.write_all(&request).await.unwrap();
            first.shutdown().await.unwrap();
            let mut got = Vec::new();
            second.read_to_end(&mut got).await.unwrap();
            assert_same(&got, &request, "request before the half-close");
            // Only now, after the EOF, does the other side answer (read as it is written: a
            // megabyte is more than the pipes and windows between the two apps hold).
            let answer = async {
                second.write_all(&response).await.unwrap();
                second.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let (_, read) = tokio::join!(answer, first.read_to_end(&mut got));
            read.unwrap();
            assert_same(&got, &response, "response after the half-close");
            let (req, resp) = (request.len() as u64, response.len() as u64);
            let (at_client, at_server) = (c.await.unwrap().unwrap(), s.await.unwrap().unwrap());
            if client_first {
                assert_eq!((at_client, at_server), ((resp, req), (req, resp)));
            } else {
                assert_eq!((at_client, at_server), ((req, resp), (resp, req)));
            }
        }
    }

    /// A peer that resets the stream ends the splice with an error naming the reason.
    #[tokio::test]
    async fn splice_fails_when_the_peer_resets() {
        let ((mut peer_send, _peer_recv), (send, recv)) = h2_stream().await;
        let mut tunnel = HboneStream::new(send, recv, None, Default::default());
        let (mut sock, mut app) = duplex(32 * 1024);
        let splice = tokio::spawn(async move { splice_tunnel(&mut tunnel, &mut sock).await });
        peer_send
            .send_data(Bytes::from_static(b"hello"), false)
            .unwrap();
        let mut got = [0; 5];
        app.read_exact(&mut got).await.unwrap();
        peer_send.send_reset(Reason::CANCEL);
        let err = splice.await.unwrap().unwrap_err();
        // h2 words CANCEL as "stream no longer needed".
        assert!(err.to_string().contains("no longer needed"), "{err}");
    }

    /// END_STREAM followed by RST_STREAM(NO_ERROR) (a peer done with the stream) is an
    /// ordinary close.
    #[tokio::test]
    async fn splice_takes_no_error_reset_after_end_stream_as_a_close() {
        let ((mut peer_send, _peer_recv), (send, recv)) = h2_stream().await;
        let mut tunnel = HboneStream::new(send, recv, None, Default::default());
        let (mut sock, mut app) = duplex(32 * 1024);
        let splice = tokio::spawn(async move { splice_tunnel(&mut tunnel, &mut sock).await });
        peer_send
            .send_data(Bytes::from_static(b"hello"), true)
            .unwrap();
        // Once the data is on its way: a reset drops whatever the peer still has queued.
        let mut got = [0; 5];
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        peer_send.send_reset(Reason::NO_ERROR);
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"");
        app.shutdown().await.unwrap();
        assert_eq!(splice.await.unwrap().unwrap(), (5, 0));
    }

    /// The agent hands its upstream over as a `Box<dyn Upstream>`: an HBONE stream inside is
    /// found (so the splice is used), anything else is not.
    #[tokio::test]
    async fn boxed_upstream_reveals_an_hbone_stream_only() {
        use crate::Upstream;
        let (tunnel, _peer) = tunnel_pair().await;
        let mut boxed: Box<dyn Upstream> = Box::new(tunnel);
        assert!(boxed.as_hbone().is_some());
        let mut twice: Box<dyn Upstream> = Box::new(boxed);
        assert!(twice.as_hbone().is_some());
        let (sock, _other) = duplex(64);
        let mut boxed: Box<dyn Upstream> = Box::new(sock);
        assert!(boxed.as_hbone().is_none());
    }

    /// Never readable; every write accepts nothing.
    struct TakesNothing;

    impl AsyncRead for TakesNothing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for TakesNothing {
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

    /// A socket that takes no bytes is an error, not a busy loop.
    #[tokio::test]
    async fn splice_fails_when_the_socket_takes_nothing() {
        let (mut peer, mut tunnel) = tunnel_pair().await;
        peer.write_all(b"hello").await.unwrap();
        let err = splice_tunnel(&mut tunnel, &mut TakesNothing)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }

    /// What an earlier `poll_read` received but did not return is written first.
    #[tokio::test]
    async fn splice_starts_with_bytes_left_by_poll_read() {
        let (mut peer, mut tunnel) = tunnel_pair().await;
        peer.write_all(b"hello world").await.unwrap();
        let mut first = [0; 6];
        tunnel.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hello ");
        let (mut sock, mut app) = duplex(1024);
        let splice = tokio::spawn(async move { splice_tunnel(&mut tunnel, &mut sock).await });
        peer.write_all(b"!").await.unwrap();
        peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"world!");
        app.shutdown().await.unwrap();
        assert_eq!(splice.await.unwrap().unwrap(), (6, 0));
    }

    /// A socket that does not read holds the peer back through the stream window: the peer
    /// gets no further than the window plus what the socket took. (Paused time: the timeout
    /// fires only once every task is stuck.)
    #[tokio::test(start_paused = true)]
    async fn splice_holds_back_the_peer_of_a_slow_socket() {
        const SOCKET: usize = 16 * 1024;
        const WINDOW: usize = 65_535; // h2's default stream window
        let (mut peer, mut tunnel) = tunnel_pair().await;
        let (mut sock, mut app) = duplex(SOCKET);
        let splice = tokio::spawn(async move { splice_tunnel(&mut tunnel, &mut sock).await });
        let data = noise(1024 * 1024, 5);
        let mut accepted = 0;
        let stuck = tokio::time::timeout(Duration::from_secs(60), async {
            while accepted < data.len() {
                accepted += peer.write(&data[accepted..]).await.unwrap();
            }
        })
        .await;
        assert!(stuck.is_err(), "the peer wrote all {accepted} bytes");
        assert!(
            accepted <= WINDOW + SOCKET,
            "the peer got {accepted} bytes past a socket that took {SOCKET}"
        );
        // Once the socket reads, everything goes through.
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            (got, app)
        });
        peer.write_all(&data[accepted..]).await.unwrap();
        peer.shutdown().await.unwrap();
        let (got, mut app) = reading.await.unwrap();
        assert_same(&got, &data, "after the socket caught up");
        app.shutdown().await.unwrap();
        assert_eq!(splice.await.unwrap().unwrap(), (data.len() as u64, 0));
    }

    /// Polls `splice` until `exchange` is done; the splice must not end first.
    async fn drive(
        splice: &mut Splice,
        tunnel: &mut HboneStream,
        sock: &mut DuplexStream,
        exchange: impl std::future::Future<Output = ()>,
    ) {
        tokio::select! {
            r = poll_fn(|cx| splice.poll(cx, tunnel, sock)) => panic!("the splice ended: {r:?}"),
            () = exchange => {}
        }
    }

    /// Request/response traffic keeps the socket → tunnel buffer at 8 KiB and the other
    /// direction holds nothing between messages; bulk grows the buffer to the maximum and no
    /// further.
    #[tokio::test]
    async fn splice_buffer_grows_only_under_bulk() {
        let (mut peer, mut tunnel) = tunnel_pair().await;
        let (mut sock, mut app) = duplex(256 * 1024);
        let mut splice = Splice::new(&mut tunnel);
        let sizes = |splice: &Splice| match (&splice.to_tunnel, &splice.to_socket) {
            (State::Copying(up), State::Copying(down)) => {
                (up.size, up.buf.capacity(), down.chunk.len())
            }
            _ => panic!("the splice finished"),
        };
        for i in 0..50 {
            let request = noise(1000, i);
            let response = noise(1500, 100 + i);
            let exchange = async {
                peer.write_all(&request).await.unwrap();
                let mut got = vec![0; request.len()];
                app.read_exact(&mut got).await.unwrap();
                assert_same(&got, &request, "request");
                app.write_all(&response).await.unwrap();
                let mut got = vec![0; response.len()];
                peer.read_exact(&mut got).await.unwrap();
                assert_same(&got, &response, "response");
            };
            drive(&mut splice, &mut tunnel, &mut sock, exchange).await;
            let (size, capacity, held) = sizes(&splice);
            assert_eq!(size, INITIAL_BUFFER);
            assert!(capacity <= INITIAL_BUFFER, "{capacity}");
            assert_eq!(held, 0);
        }

        let bulk = noise(MAX_BUFFER * 4, 6);
        let exchange = async {
            app.write_all(&bulk).await.unwrap();
            let mut got = vec![0; bulk.len()];
            peer.read_exact(&mut got).await.unwrap();
            assert_same(&got, &bulk, "bulk");
        };
        drive(&mut splice, &mut tunnel, &mut sock, exchange).await;
        let (size, capacity, _) = sizes(&splice);
        assert_eq!(size, MAX_BUFFER);
        assert!(capacity <= MAX_BUFFER, "{capacity}");
    }
}
