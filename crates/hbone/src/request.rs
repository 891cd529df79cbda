//! HTTP requests sent directly as streams of the HBONE connection between two Isthmus agents.
//!
//! A CONNECT tunnel carrying HTTP makes every request be encoded and parsed twice more than
//! the hop needs (and a whole HTTP/2 connection inside the tunnel for gRPC). Between two
//! Isthmus agents the request itself is the stream instead, as Envoy sidecars and Linkerd do:
//! the client sends an ordinary HTTP/2 request on the pooled mTLS connection with
//! [`TARGET_HEADER`] naming `<workload ip>:<port>`, and the server checks that target exactly
//! as it checks a CONNECT's authority before its handler sees the request.
//!
//! A server that takes such requests says so on its CONNECT answers
//! ([`TAKES_REQUESTS_HEADER`]); the client learns it per peer and keeps tunnelling to every
//! other HBONE peer (ztunnel, an older agent).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderName};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

/// `<workload ip>:<port>` a direct request is for (the CONNECT authority's counterpart).
pub const TARGET_HEADER: HeaderName = HeaderName::from_static("isthmus-target");
/// How the server agent speaks to its application: `h2` (HTTP/2 over cleartext) or
/// `http/1.1`.
pub const APP_PROTOCOL_HEADER: HeaderName = HeaderName::from_static("isthmus-app-protocol");
/// The client agent's `baggage` (what a CONNECT carries as `baggage`); the request's own
/// `baggage` belongs to the application and is passed through untouched.
pub const BAGGAGE_HEADER: HeaderName = HeaderName::from_static("isthmus-baggage");
/// The client agent's `forwarded` (as on a CONNECT).
pub const FORWARDED_HEADER: HeaderName = HeaderName::from_static("isthmus-forwarded");
/// On a CONNECT's 200: this server also takes direct requests.
pub const TAKES_REQUESTS_HEADER: HeaderName = HeaderName::from_static("isthmus-takes-requests");

/// Headers that are the agents' business only: the server removes them before its handler
/// sees the request.
pub const AGENT_HEADERS: [HeaderName; 4] = [
    TARGET_HEADER,
    APP_PROTOCOL_HEADER,
    BAGGAGE_HEADER,
    FORWARDED_HEADER,
];

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What a handler answers a direct request with.
pub type ResponseBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Connection-specific headers, which HTTP/2 forbids (RFC 9113 §8.2.2; h2 refuses to send
/// them).
const CONNECTION_SPECIFIC: [HeaderName; 5] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes what HTTP/2 may not carry: connection-specific headers, and `te` unless it is
/// `trailers`.
pub fn strip_connection_headers(h: &mut HeaderMap) {
    for name in CONNECTION_SPECIFIC.iter() {
        h.remove(name);
    }
    if h.get(http::header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        h.remove(http::header::TE);
    }
}

/// The body of a message received on an HTTP/2 stream: data frames (their flow-control
/// window given back as they are read), then trailers. Dropping it before the end resets the
/// stream.
pub struct RecvBody {
    recv: RecvStream,
    data_done: bool,
    done: bool,
    // Keeps the client's pool slot for as long as the response is read.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl RecvBody {
    pub(crate) fn new(recv: RecvStream, guard: Option<Box<dyn Send + Sync>>) -> Self {
        let done = recv.is_end_stream();
        Self {
            recv,
            data_done: done,
            done,
            _guard: guard,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read: the sender may send as much again.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => self.data_done = true,
            }
        }
        let trailers = ready!(self.recv.poll_trailers(cx));
        self.done = true;
        match trailers {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        SizeHint::default()
    }
}

/// A message's body with what was read of it before its head was sent.
pub struct Outgoing<B> {
    body: B,
    first: Option<Frame<Bytes>>,
    /// Nothing more to send after `first`.
    end: bool,
}

impl<B> Outgoing<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Reads the body's first frame if it is there without waiting on anything but tasks
    /// already woken: polled once, and once more after yielding (a body fed by another task
    /// of this runtime, such as hyper's connection task, has its first bytes by then). The
    /// head and the first data then leave in one write, not two; a body that takes longer
    /// (a stream) does not hold its head back.
    pub async fn start(mut body: B) -> Result<Self, BoxError> {
        if body.is_end_stream() {
            return Ok(Self {
                body,
                first: None,
                end: true,
            });
        }
        for attempt in 0..2 {
            let polled = {
                let mut next = body.frame();
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut next).poll(cx))).await
            };
            match polled {
                Poll::Ready(None) => {
                    return Ok(Self {
                        body,
                        first: None,
                        end: true,
                    })
                }
                Poll::Ready(Some(Err(e))) => return Err(e.into()),
                Poll::Ready(Some(Ok(frame))) => {
                    let end = frame.is_trailers() || body.is_end_stream();
                    return Ok(Self {
                        body,
                        first: Some(frame),
                        end,
                    });
                }
                Poll::Pending if attempt == 0 => tokio::task::yield_now().await,
                Poll::Pending => {}
            }
        }
        Ok(Self {
            body,
            first: None,
            end: false,
        })
    }

    /// Whether the head carries the end of the stream (nothing at all to send after it).
    pub fn is_empty(&self) -> bool {
        self.end && self.first.is_none()
    }

    /// Queues what was read already; says whether the rest must still be sent (with
    /// [`Outgoing::finish`]).
    pub fn send_first(&mut self, send: &mut SendStream<Bytes>) -> Result<bool, BoxError> {
        if let Some(frame) = self.first.take() {
            match frame.into_data() {
                // h2 queues data past the stream's capacity; one frame is a bounded amount,
                // and the window of a new stream is far larger than a first read.
                Ok(data) => send.send_data(data, self.end)?,
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        send.send_trailers(t)?;
                    }
                }
            }
        }
        Ok(!self.end)
    }

    /// Sends the rest of the body: data within the peer's flow-control window, then trailers,
    /// then the end of the stream. A body that fails resets the stream (CANCEL), so the peer
    /// does not take a truncated message for a whole one.
    pub async fn finish(mut self, mut send: SendStream<Bytes>) -> Result<(), BoxError> {
        // Largest reservation asked of h2 at once.
        const CHUNK: usize = 256 * 1024;
        if self.end {
            return Ok(());
        }
        let body = &mut self.body;
        loop {
            let frame = match body.frame().await {
                None => {
                    send.send_data(Bytes::new(), true)?;
                    return Ok(());
                }
                Some(Err(e)) => {
                    send.send_reset(Reason::CANCEL);
                    return Err(e.into());
                }
                Some(Ok(f)) => f,
            };
            let mut data = match frame.into_data() {
                Ok(d) => d,
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        send.send_trailers(t)?;
                        return Ok(());
                    }
                    continue;
                }
            };
            let end = body.is_end_stream();
            if data.is_empty() {
                if end {
                    send.send_data(Bytes::new(), true)?;
                    return Ok(());
                }
                continue;
            }
            while !data.is_empty() {
                send.reserve_capacity(data.len().min(CHUNK));
                let granted = loop {
                    match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                        // "No new capacity": the next poll waits for some.
                        Some(Ok(0)) => continue,
                        Some(Ok(n)) => break n,
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err("the stream was closed while its body was sent".into()),
                    }
                };
                // Everything granted is queued at once: h2 reports only increases of capacity.
                let chunk = data.split_to(granted.min(data.len()));
                send.send_data(chunk, end && data.is_empty())?;
            }
            if end {
                return Ok(());
            }
        }
    }
}

/// Boxes any body as a [`ResponseBody`].
pub fn boxed<B>(body: B) -> ResponseBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}
