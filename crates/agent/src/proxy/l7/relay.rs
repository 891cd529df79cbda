//! The server side's HTTP/1.1 path: a relay between the HBONE tunnel and the local
//! application that parses only the message heads and copies the message bytes as they came.
//!
//! hyper on both sides of the server agent parsed every request into `http` types and wrote
//! it again for the application, and the same for every response: run 25 (BENCHMARKS.md) put
//! L7's extra CPU on the server side at 14 µs per request, hyper and the HTTP crates 6–7 of
//! it. The relay parses a head with httparse (hyper's own parser), decides (authorization,
//! framing, metrics labels) from the parsed fields while they still point into the read
//! buffer, and writes the same bytes on. No crate relays HTTP/1.1 this way with the checks
//! a proxy needs, hence this module.
//!
//! A relay that forwards bytes must agree with the application on where each message ends,
//! or a request could hide another (request smuggling). So the framing rules are strict
//! (RFC 9112 section 6): a request with both `Transfer-Encoding` and `Content-Length`, a
//! `Transfer-Encoding` whose last coding is not `chunked`, a `Content-Length` that is not one
//! number, bare LF line ends, two `Host` fields, no `Host` in HTTP/1.1, or a malformed chunk
//! is refused with 400 and the connection closed, and only the bytes of the message the relay
//! framed are ever written to the application. Responses are held to the same rules (a bad
//! one answers 502).
//!
//! Requests on one tunnel are relayed one at a time, in order (pipelined requests wait in the
//! buffer). A request's body and its response are relayed at the same time, so `Expect:
//! 100-continue` and early responses work; a response that ends before its request's body
//! ends the connection after it. `Upgrade` requests answered 101 become a byte stream both
//! ways. HTTP/2 on the tunnel (its preface) still goes to hyper.

use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Why a head timed out.
const HEAD_LATE: &str = "the request head did not arrive in 30 s";
/// The largest message head taken (request line or status line and fields), as Envoy's
/// default `max_request_headers_kb` of 60 KiB, rounded up.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one head (hyper's default).
pub const MAX_HEADERS: usize = 100;
// `RequestHead::strip` has a bit per field.
const _: () = assert!(MAX_HEADERS <= 128);
/// How long a request head may take to arrive once its first byte has (hyper's default
/// header read timeout); an idle connection between requests has no limit here.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest chunk-size line (with its extensions) and the most trailer bytes taken.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// How much a read asks for.
const READ_SIZE: usize = 16 * 1024;

/// The HTTP/2 connection preface: a tunnel that starts with it is served by hyper.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a message's body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// There is none.
    Empty,
    /// After this many bytes.
    Length(u64),
    /// At the last chunk and its trailers.
    Chunked,
    /// When the connection closes (responses only).
    Close,
}

/// A message head refused: the status to answer and what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bad {
    pub status: u16,
    pub reason: String,
}

fn bad(status: u16, reason: impl Into<String>) -> Bad {
    Bad {
        status,
        reason: reason.into(),
    }
}

/// A parsed request head; the fields point into the read buffer.
#[derive(Debug)]
pub struct RequestHead<'b> {
    /// Bytes of the head, its empty line included.
    pub len: usize,
    pub method: &'b str,
    /// The request target as sent (origin-form `/p?q`, absolute-form, `*`).
    pub target: &'b str,
    /// The request target's path, without the query.
    pub path: &'b str,
    /// The query after `?`, if any.
    pub query: Option<&'b str>,
    /// The minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    /// The authority: an absolute-form target's, else the `Host` field's (empty: none).
    pub host: &'b str,
    pub headers: &'b [httparse::Header<'b>],
    pub framing: Framing,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    /// A WebSocket upgrade: `Upgrade: websocket` with `Connection: upgrade`.
    pub upgrade: bool,
    /// Fields to leave out when the head is relayed (bit `i`: `headers[i]`): the `Upgrade`
    /// and `HTTP2-Settings` of an upgrade to anything but WebSocket.
    pub strip: u128,
    /// `content-type: application/grpc...`.
    pub grpc: bool,
}

/// A parsed response head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// The head's line ends are CRLF: a bare LF is refused, as a peer could read it otherwise.
fn crlf_only(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).all(|i| i > 0 && head[i - 1] == b'\r')
}

/// `field` is one of the comma-separated tokens of a list-valued header (any case).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A `Content-Length` value: digits only, one number.
fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// What the framing fields of a head say, common to requests and responses.
#[derive(Default)]
struct Fields {
    length: Option<u64>,
    /// `Transfer-Encoding` present, and whether `chunked` is its final coding (and only there).
    te: Option<bool>,
    close: bool,
    keep_alive: bool,
    conn_upgrade: bool,
    upgrade: bool,
    websocket: bool,
    /// `Upgrade` and `HTTP2-Settings` fields, by index.
    upgrade_fields: u128,
    hosts: usize,
    host: usize,
    grpc: bool,
}

fn fields(headers: &[httparse::Header<'_>], status: u16) -> Result<Fields, Bad> {
    let mut f = Fields::default();
    let mut last_chunked = false;
    let mut chunked_early = false;
    for (i, h) in headers.iter().enumerate() {
        let n = h.name;
        if n.eq_ignore_ascii_case("content-length") {
            let Some(len) = content_length(h.value) else {
                return Err(bad(status, "Content-Length is not a number"));
            };
            if f.length.is_some_and(|l| l != len) {
                return Err(bad(status, "two different Content-Length values"));
            }
            f.length = Some(len);
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.is_empty() {
                    continue;
                }
                if last_chunked {
                    chunked_early = true;
                }
                last_chunked = t.eq_ignore_ascii_case(b"chunked");
            }
            f.te = Some(false);
        } else if n.eq_ignore_ascii_case("connection") {
            f.close |= has_token(h.value, "close");
            f.keep_alive |= has_token(h.value, "keep-alive");
            f.conn_upgrade |= has_token(h.value, "upgrade");
        } else if n.eq_ignore_ascii_case("upgrade") {
            f.upgrade = true;
            f.websocket |= has_token(h.value, "websocket");
            f.upgrade_fields |= 1 << i;
        } else if n.eq_ignore_ascii_case("http2-settings") {
            f.upgrade_fields |= 1 << i;
        } else if n.eq_ignore_ascii_case("host") {
            f.hosts += 1;
            f.host = i;
        } else if n.eq_ignore_ascii_case("content-type") {
            f.grpc = h.value.starts_with(b"application/grpc");
        }
    }
    if f.te.is_some() {
        if chunked_early {
            return Err(bad(
                status,
                "chunked is not the last Transfer-Encoding only",
            ));
        }
        f.te = Some(last_chunked);
        if f.length.is_some() {
            return Err(bad(
                status,
                "both Transfer-Encoding and Content-Length: the message's end is ambiguous",
            ));
        }
    }
    Ok(f)
}

/// Parses a request head at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_request<'b>(
    buf: &'b [u8],
    headers: &'b mut [httparse::Header<'b>],
) -> Result<Option<RequestHead<'b>>, Bad> {
    let mut req = httparse::Request::new(headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(bad(431, "the request head is larger than 64 KiB"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(bad(431, "the request has more than 100 header fields"));
        }
        Err(e) => return Err(bad(400, format!("malformed request head: {e}"))),
    };
    if len > MAX_HEAD {
        return Err(bad(431, "the request head is larger than 64 KiB"));
    }
    if !crlf_only(&buf[..len]) {
        return Err(bad(
            400,
            "a line of the request head ends in a bare LF, not CRLF",
        ));
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(bad(400, "malformed request line"));
    };
    let headers: &'b [httparse::Header<'b>] = req.headers;
    if method == "CONNECT" {
        return Err(bad(405, "CONNECT is not relayed on a mesh HTTP port"));
    }
    let f = fields(headers, 400)?;
    if f.hosts > 1 {
        return Err(bad(400, "more than one Host field"));
    }
    if version == 1 && f.hosts == 0 {
        return Err(bad(400, "an HTTP/1.1 request without a Host field"));
    }
    let framing = match (f.te, f.length) {
        (Some(_), _) if version == 0 => {
            return Err(bad(400, "Transfer-Encoding in an HTTP/1.0 request"));
        }
        (Some(true), _) => Framing::Chunked,
        (Some(false), _) => {
            return Err(bad(
                400,
                "the last Transfer-Encoding is not chunked: the request's end is unknown",
            ));
        }
        (None, Some(0) | None) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    // origin-form `/p?q`, absolute-form `http://a/p?q`, asterisk-form `*`.
    let (authority, path_query) = match target.find("://") {
        Some(i) if !target.starts_with('/') => {
            let rest = &target[i + 3..];
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            (Some(&rest[..end]), &rest[end..])
        }
        _ => (None, target),
    };
    let (path, query) = match path_query.find('?') {
        Some(q) => (&path_query[..q], Some(&path_query[q + 1..])),
        None => (path_query, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    let host = match authority {
        Some(a) => a,
        None if f.hosts == 1 => std::str::from_utf8(headers[f.host].value).unwrap_or(""),
        None => "",
    };
    let keep_alive = !f.close && (version == 1 || f.keep_alive);
    // Only WebSocket upgrades are relayed (as Istio's default): after a 101 the connection is
    // bytes that no policy sees request by request, and an h2c upgrade would carry requests
    // there. Any other upgrade goes to the application as an ordinary request.
    let websocket = f.upgrade && f.conn_upgrade && f.websocket;
    Ok(Some(RequestHead {
        len,
        method,
        target,
        path,
        query,
        version,
        host,
        headers,
        framing,
        keep_alive,
        upgrade: websocket,
        strip: if websocket { 0 } else { f.upgrade_fields },
        grpc: f.grpc,
    }))
}

/// The head `buf[..head.len]` without the fields `head.strip` names (each with its line).
pub fn stripped(buf: &[u8], head: &RequestHead<'_>) -> Vec<u8> {
    let base = buf.as_ptr() as usize;
    let mut out = Vec::with_capacity(head.len);
    let mut at = 0;
    for (i, h) in head.headers.iter().enumerate() {
        if head.strip & (1 << i) == 0 {
            continue;
        }
        let start = h.name.as_ptr() as usize - base;
        let value_end = h.value.as_ptr() as usize - base + h.value.len();
        let end = memchr::memchr(b'\n', &buf[value_end..head.len])
            .map_or(head.len, |n| value_end + n + 1);
        out.extend_from_slice(&buf[at..start]);
        at = end;
    }
    out.extend_from_slice(&buf[at..head.len]);
    out
}

/// Parses a response head at the start of `buf` (to a HEAD request when `head` is set):
/// `Ok(None)` while it is incomplete.
pub fn parse_response(buf: &[u8], head: bool) -> Result<Option<ResponseHead>, Bad> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hs);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(bad(
                502,
                "the application's response head is larger than 64 KiB",
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(bad(502, format!("malformed response head: {e}"))),
    };
    if !crlf_only(&buf[..len]) {
        return Err(bad(
            502,
            "a line of the response head ends in a bare LF, not CRLF",
        ));
    }
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(bad(502, "malformed status line"));
    };
    let f = fields(resp.headers, 502)?;
    if f.te.is_some() && version == 0 {
        return Err(bad(502, "Transfer-Encoding in an HTTP/1.0 response"));
    }
    let framing = if head || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (f.te, f.length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(0)) => Framing::Empty,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    let keep_alive = framing != Framing::Close && !f.close && (version == 1 || f.keep_alive);
    Ok(Some(ResponseHead {
        len,
        status,
        framing,
        keep_alive,
    }))
}

/// Where a chunked body's parse stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

/// Walks a chunked body's framing over the bytes as they arrive.
#[derive(Clone, Copy, Debug)]
pub struct Chunked {
    state: ChunkState,
    /// Data bytes so far (the chunks' payload).
    pub data: u64,
}

impl Default for Chunked {
    fn default() -> Self {
        Self {
            state: ChunkState::Size,
            data: 0,
        }
    }
}

/// A chunk-size line without its CRLF: hex digits, then optional extensions
/// (`; name[=value]`, with optional blanks before the semicolon).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    let ext = rest.trim_ascii_start();
    if !(rest.is_empty() || ext.starts_with(b";")) || ext.iter().any(|&b| b < 0x20 && b != b'\t') {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

impl Chunked {
    /// The body's last chunk and trailers have been walked.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Walks as far into `buf` as its bytes allow and returns how many belong to the body
    /// (the rest wait for more bytes, or are the next message's).
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, &'static str> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.state {
                ChunkState::Done => return Ok(at),
                ChunkState::Size => {
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        if rest.len() > MAX_CHUNK_LINE {
                            return Err("a chunk-size line is too long");
                        }
                        return Ok(at);
                    };
                    if nl > MAX_CHUNK_LINE || nl == 0 || rest[nl - 1] != b'\r' {
                        return Err("a chunk-size line is malformed");
                    }
                    let size = chunk_size(&rest[..nl - 1]).ok_or("a chunk size is malformed")?;
                    at += nl + 1;
                    self.state = if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(n) => {
                    let take = n.min(rest.len() as u64);
                    at += take as usize;
                    self.data += take;
                    if take < n {
                        self.state = ChunkState::Data(n - take);
                        return Ok(at);
                    }
                    self.state = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        at += 2;
                        self.state = ChunkState::Size;
                    }
                    [] | [b'\r'] => return Ok(at),
                    _ => return Err("a chunk's data is not followed by CRLF"),
                },
                ChunkState::Trailers(seen) => {
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        if seen + rest.len() > MAX_TRAILERS {
                            return Err("the trailers are larger than 16 KiB");
                        }
                        return Ok(at);
                    };
                    if nl == 0 || rest[nl - 1] != b'\r' || rest[..nl - 1].contains(&b'\r') {
                        return Err("a trailer line is malformed");
                    }
                    at += nl + 1;
                    if nl == 1 {
                        self.state = ChunkState::Done;
                    } else if seen + nl + 1 > MAX_TRAILERS {
                        return Err("the trailers are larger than 16 KiB");
                    } else {
                        self.state = ChunkState::Trailers(seen + nl + 1);
                    }
                }
            }
        }
    }
}

/// Why relaying a message stopped.
#[derive(Debug)]
pub(super) enum Stop {
    /// The source's bytes did not frame a message (bad chunk, early end).
    Framing(String),
    /// Reading the source failed.
    Read(io::Error),
    /// Writing to the destination failed.
    Write(io::Error),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Framing(s) => f.write_str(s),
            Stop::Read(e) => write!(f, "reading failed: {e}"),
            Stop::Write(e) => write!(f, "writing failed: {e}"),
        }
    }
}

pub(super) async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
    r.read_buf(buf).await
}

/// A head that did not arrive in [`HEAD_TIMEOUT`].
pub(super) fn late() -> Bad {
    bad(408, HEAD_LATE)
}

/// What waiting for more of a message head gave.
pub(super) enum More {
    /// More bytes are in the buffer.
    Read,
    /// The peer closed the connection or it failed.
    Closed,
    /// The head began [`HEAD_TIMEOUT`] ago and is not complete.
    TimedOut,
}

/// Reads more of a head into `buf`; `deadline` starts once the head's first byte is there.
pub(super) async fn more_head<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    deadline: &mut Option<Pin<Box<dyn hyper::rt::Sleep>>>,
) -> More {
    if !buf.is_empty() && deadline.is_none() {
        *deadline = Some(hyper::rt::Timer::sleep(
            &super::timer::CoarseTimer,
            HEAD_TIMEOUT,
        ));
    }
    let read = fill(r, buf);
    let n = match deadline {
        Some(d) => tokio::select! {
            n = read => n,
            () = d.as_mut() => return More::TimedOut,
        },
        None => read.await,
    };
    match n {
        Ok(0) | Err(_) => More::Closed,
        Ok(_) => More::Read,
    }
}

/// Writes the first `head` bytes of `buf` and the body that follows them (as `framing`
/// says), reading more from `r` as needed; consumes exactly the message's bytes from `buf`
/// (what follows stays for the next message). Returns the body's payload bytes.
pub(super) async fn relay_message<R, W>(
    r: &mut R,
    buf: &mut BytesMut,
    w: &mut W,
    head: usize,
    framing: Framing,
) -> Result<u64, Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    enum Left {
        Bytes(u64),
        Chunks(Chunked),
        Eof,
    }
    let mut left = match framing {
        Framing::Empty => Left::Bytes(0),
        Framing::Length(n) => Left::Bytes(n),
        Framing::Chunked => Left::Chunks(Chunked::default()),
        Framing::Close => Left::Eof,
    };
    let mut out = head;
    let mut body = 0u64;
    loop {
        let more = &buf[out..];
        let done = match &mut left {
            Left::Bytes(n) => {
                let take = (*n).min(more.len() as u64);
                *n -= take;
                out += take as usize;
                body += take;
                *n == 0
            }
            Left::Chunks(c) => {
                out += c.advance(more).map_err(|e| Stop::Framing(e.into()))?;
                c.done()
            }
            Left::Eof => {
                out = buf.len();
                body += more.len() as u64;
                false
            }
        };
        if out > 0 {
            w.write_all(&buf[..out]).await.map_err(Stop::Write)?;
            w.flush().await.map_err(Stop::Write)?;
            buf.advance(out);
            out = 0;
        }
        if done {
            if let Left::Chunks(c) = &left {
                body = c.data;
            }
            return Ok(body);
        }
        if fill(r, buf).await.map_err(Stop::Read)? == 0 {
            return match left {
                Left::Eof => Ok(body),
                _ => Err(Stop::Framing(
                    "the connection closed inside a message".into(),
                )),
            };
        }
    }
}

/// A locally made response (a refusal, an error): `text/plain`, its length given.
pub fn local_response(status: u16, body: &str, close: bool) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "connection: close\r\n" } else { "" },
    )
    .into_bytes()
}

/// Answers a refused head with its status and reason, and closes the connection.
pub(super) async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, b: &Bad) {
    let body = format!("{}\n", b.reason);
    let _ = w.write_all(&local_response(b.status, &body, true)).await;
    let _ = w.shutdown().await;
}

/// What became of one relayed request.
struct Outcome {
    status: u16,
    flags: &'static str,
    req_bytes: u64,
    resp_bytes: u64,
    /// The connection can take another request.
    again: bool,
    /// The response switched protocols: bytes both ways from now on.
    upgraded: bool,
}

/// What the response side returned.
struct Response {
    status: u16,
    bytes: u64,
    keep_alive: bool,
    upgraded: bool,
}

enum ResponseError {
    /// Nothing from the application before it closed or failed.
    NoResponse(String),
    /// Its response head was refused.
    Malformed(Bad),
    /// The head went out; the body broke.
    Broken(String),
}

/// Reads the application's response (1xx ones passed on first) and relays it to the tunnel.
async fn relay_response<R, W>(
    ar: &mut R,
    buf: &mut BytesMut,
    tw: &mut W,
    head_request: bool,
    upgrade: bool,
    final_sent: &AtomicBool,
) -> Result<Response, ResponseError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let head = loop {
            match parse_response(buf, head_request) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(b) => return Err(ResponseError::Malformed(b)),
            }
            match fill(ar, buf).await {
                Ok(0) if buf.is_empty() => {
                    return Err(ResponseError::NoResponse(
                        "the application closed the connection before a response".into(),
                    ));
                }
                Ok(0) => {
                    return Err(ResponseError::Malformed(bad(
                        502,
                        "the application closed the connection inside a response head",
                    )));
                }
                Ok(_) => {}
                Err(e) => return Err(ResponseError::NoResponse(e.to_string())),
            }
        };
        let switching = head.status == 101;
        if switching && !upgrade {
            return Err(ResponseError::Malformed(bad(
                502,
                "101 Switching Protocols to a request that asked for no upgrade",
            )));
        }
        let informational = (100..200).contains(&head.status) && !switching;
        if !informational {
            final_sent.store(true, Ordering::Relaxed);
        }
        let bytes = relay_message(ar, buf, tw, head.len, head.framing)
            .await
            .map_err(|e| ResponseError::Broken(e.to_string()))?;
        if informational {
            continue;
        }
        return Ok(Response {
            status: head.status,
            bytes,
            keep_alive: head.keep_alive,
            upgraded: switching,
        });
    }
}

/// What the relay asks of the mesh around it: a decision on each request by its head, and
/// a record of how each ended. [`super::inbound`] implements it with authorization policies
/// and Istio's metrics.
pub trait Hooks {
    /// What the decision keeps until the request ends.
    type Ticket;
    /// Decides on a request by its head: `true` relays it, `false` refuses it with 403
    /// `RBAC: access denied`.
    fn admit(&mut self, head: &RequestHead<'_>) -> (bool, Self::Ticket);
    /// A request ended (relayed, refused by `admit`, or failed at the application).
    fn done(&mut self, ticket: Self::Ticket, end: &End);
    /// A request head was refused as malformed (the connection ends).
    fn malformed(&mut self, bad: &Bad);
}

/// How one request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    pub status: u16,
    /// Envoy's response flag: `-`, `DENY`, `UC` (no response), `UPE` (a malformed one).
    pub flags: &'static str,
    /// Body payload bytes relayed each way.
    pub req_bytes: u64,
    pub resp_bytes: u64,
    pub duration: Duration,
}

/// Relays HTTP/1.1 between `tunnel` (its first bytes already read into `inb`) and `app`
/// until either side closes, one request at a time, each decided and recorded by `hooks`.
pub async fn serve<T, A, H>(tunnel: T, mut inb: BytesMut, app: A, hooks: &mut H)
where
    T: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
    H: Hooks,
{
    let (mut tr, mut tw) = tokio::io::split(tunnel);
    let (mut ar, mut aw) = tokio::io::split(app);
    let mut outb = BytesMut::with_capacity(READ_SIZE);
    loop {
        // The next request's head.
        let mut deadline: Option<Pin<Box<dyn hyper::rt::Sleep>>> = None;
        let parsed = loop {
            let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match parse_request(&inb, &mut hs) {
                Ok(Some(h)) => {
                    let (allowed, ticket) = hooks.admit(&h);
                    let head = (h.strip != 0).then(|| stripped(&inb, &h));
                    break Ok((Parsed::of(&h, allowed), ticket, head));
                }
                Ok(None) => {}
                Err(b) => break Err(b),
            }
            match more_head(&mut tr, &mut inb, &mut deadline).await {
                More::Read => {}
                More::Closed => return,
                More::TimedOut => {
                    let b = late();
                    refuse(&mut tw, &b).await;
                    hooks.malformed(&b);
                    return;
                }
            }
        };
        let start = Instant::now();
        let (req, ticket) = match parsed {
            Ok((mut req, ticket, Some(head))) => {
                // The head as relayed replaces the head as received.
                let mut b = BytesMut::with_capacity(head.len() + inb.len() - req.len);
                b.extend_from_slice(&head);
                b.extend_from_slice(&inb[req.len..]);
                inb = b;
                req.len = head.len();
                (req, ticket)
            }
            Ok((req, ticket, None)) => (req, ticket),
            Err(b) => {
                refuse(&mut tw, &b).await;
                hooks.malformed(&b);
                return;
            }
        };
        let outcome = if !req.allowed {
            // The body, if any, is not read: the connection ends after the refusal.
            let again = req.keep_alive && req.framing == Framing::Empty;
            if again {
                inb.advance(req.len);
            }
            let resp = local_response(403, DENIED, !again);
            let sent = tw.write_all(&resp).await.is_ok() && tw.flush().await.is_ok();
            Outcome {
                status: 403,
                flags: "DENY",
                req_bytes: 0,
                resp_bytes: DENIED.len() as u64,
                again: again && sent,
                upgraded: false,
            }
        } else {
            match exchange(
                &req, &mut tr, &mut inb, &mut tw, &mut ar, &mut aw, &mut outb,
            )
            .await
            {
                Some(o) => o,
                None => return,
            }
        };
        hooks.done(
            ticket,
            &End {
                status: outcome.status,
                flags: outcome.flags,
                req_bytes: outcome.req_bytes,
                resp_bytes: outcome.resp_bytes,
                duration: start.elapsed(),
            },
        );
        if outcome.upgraded {
            upgraded(&mut tr, &mut inb, &mut tw, &mut ar, &mut aw, &mut outb).await;
            return;
        }
        if !outcome.again {
            let _ = tw.shutdown().await;
            return;
        }
    }
}

/// The body of a refusal by policy, as Istio's proxies answer it.
pub const DENIED: &str = "RBAC: access denied";

/// What the relay keeps of a request head once the buffer moves on.
struct Parsed {
    len: usize,
    framing: Framing,
    keep_alive: bool,
    upgrade: bool,
    head: bool,
    allowed: bool,
}

impl Parsed {
    fn of(h: &RequestHead<'_>, allowed: bool) -> Self {
        Parsed {
            len: h.len,
            framing: h.framing,
            keep_alive: h.keep_alive,
            upgrade: h.upgrade,
            head: h.method == "HEAD",
            allowed,
        }
    }
}

/// Relays one allowed request and its response; `None` when the connection must end at
/// once (the tunnel is gone, or a response cannot be told apart from the next).
async fn exchange<TR, TW, AR, AW>(
    req: &Parsed,
    tr: &mut TR,
    inb: &mut BytesMut,
    tw: &mut TW,
    ar: &mut AR,
    aw: &mut AW,
    outb: &mut BytesMut,
) -> Option<Outcome>
where
    TR: AsyncRead + Unpin,
    TW: AsyncWrite + Unpin,
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
{
    let final_sent = AtomicBool::new(false);
    let (request_result, response_result) = {
        let mut up = pin!(relay_message(tr, inb, aw, req.len, req.framing));
        let mut down = pin!(relay_response(
            ar,
            outb,
            tw,
            req.head,
            req.upgrade,
            &final_sent
        ));
        let mut up_done: Option<Result<u64, Stop>> = None;
        loop {
            tokio::select! {
                biased;
                r = &mut up, if up_done.is_none() => {
                    if r.is_err() {
                        break (Some(r), None);
                    }
                    up_done = Some(r);
                }
                r = &mut down => break (up_done, Some(r)),
            }
        }
    };
    let (req_bytes, request_done) = match &request_result {
        Some(Ok(n)) => (*n, true),
        _ => (0, false),
    };
    let response = match (request_result, response_result) {
        (Some(Err(e)), _) => {
            // The request broke off: the application saw part of it, so both connections end.
            if let Stop::Framing(reason) = &e {
                if !final_sent.load(Ordering::Relaxed) {
                    let body = format!("{reason}\n");
                    let _ = tw.write_all(&local_response(400, &body, true)).await;
                }
            }
            let _ = tw.shutdown().await;
            let _ = aw.shutdown().await;
            return None;
        }
        (_, Some(r)) => r,
        (_, None) => unreachable!("the loop ends with a response or a broken request"),
    };
    // When the response came before the request's body was all relayed, the two can no
    // longer be kept in step: that is the connection's last exchange.
    match response {
        Ok(r) => Some(Outcome {
            status: r.status,
            flags: "-",
            req_bytes,
            resp_bytes: r.bytes,
            // Bytes the application sent past its response would be taken for the next
            // response: such a connection is not used again.
            again: req.keep_alive && r.keep_alive && request_done && outb.is_empty(),
            upgraded: r.upgraded,
        }),
        Err(ResponseError::Broken(reason)) => {
            tracing::debug!(%reason, "the application's response body broke off");
            None
        }
        Err(ResponseError::NoResponse(reason))
        | Err(ResponseError::Malformed(Bad { reason, .. }))
            if final_sent.load(Ordering::Relaxed) =>
        {
            tracing::debug!(%reason, "the application's response broke off");
            None
        }
        Err(e) => {
            let (status, flags, body) = match e {
                ResponseError::NoResponse(r) => (
                    503,
                    "UC",
                    format!("upstream connect error or disconnect/reset before headers: {r}\n"),
                ),
                ResponseError::Malformed(b) => (502, "UPE", format!("{}\n", b.reason)),
                ResponseError::Broken(_) => unreachable!("matched above"),
            };
            let resp = local_response(status, &body, true);
            let _ = tw.write_all(&resp).await;
            let _ = tw.flush().await;
            Some(Outcome {
                status,
                flags,
                req_bytes,
                resp_bytes: body.len() as u64,
                again: false,
                upgraded: false,
            })
        }
    }
}

/// After a 101: what is buffered goes on, then bytes both ways until each side closes.
async fn upgraded<TR, TW, AR, AW>(
    tr: &mut TR,
    inb: &mut BytesMut,
    tw: &mut TW,
    ar: &mut AR,
    aw: &mut AW,
    outb: &mut BytesMut,
) where
    TR: AsyncRead + Unpin,
    TW: AsyncWrite + Unpin,
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
{
    let up = async {
        if !inb.is_empty() {
            aw.write_all(inb).await?;
            inb.clear();
        }
        tokio::io::copy(tr, aw).await?;
        aw.shutdown().await
    };
    let down = async {
        if !outb.is_empty() {
            tw.write_all(outb).await?;
            outb.clear();
        }
        tokio::io::copy(ar, tw).await?;
        tw.shutdown().await
    };
    let _ = tokio::join!(up, down);
}

/// `inner` with `prefix` read again first: hands a tunnel whose first bytes were looked at
/// to hyper.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Let the read buffer it came from go.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::io::DuplexStream;

    type Head = (Framing, bool, String, String);

    fn req(s: &str) -> Result<Option<Head>, u16> {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        parse_request(s.as_bytes(), &mut hs)
            .map(|o| {
                o.map(|h| {
                    (
                        h.framing,
                        h.keep_alive,
                        h.path.to_owned(),
                        h.host.to_owned(),
                    )
                })
            })
            .map_err(|b| b.status)
    }

    fn framing(s: &str) -> Result<Framing, u16> {
        match req(s) {
            Ok(Some(h)) => Ok(h.0),
            Ok(None) => panic!("incomplete: {s:?}"),
            Err(c) => Err(c),
        }
    }

    #[test]
    fn request_framing_is_strict_where_a_peer_could_read_it_otherwise() {
        let h = "POST / HTTP/1.1\r\nHost: x\r\n";
        let cases: &[(&str, Result<Framing, u16>)] = &[
            ("", Ok(Framing::Empty)),
            ("Content-Length: 5\r\n", Ok(Framing::Length(5))),
            ("Content-Length: 0\r\n", Ok(Framing::Empty)),
            (
                "Content-Length: 5\r\nContent-Length: 5\r\n",
                Ok(Framing::Length(5)),
            ),
            ("Content-Length: 5\r\nContent-Length: 6\r\n", Err(400)),
            ("Content-Length: +5\r\n", Err(400)),
            ("Content-Length: 5, 5\r\n", Err(400)),
            ("Content-Length: 0x5\r\n", Err(400)),
            ("Content-Length: 99999999999999999999\r\n", Err(400)),
            ("Transfer-Encoding: chunked\r\n", Ok(Framing::Chunked)),
            ("Transfer-Encoding: CHUNKED\r\n", Ok(Framing::Chunked)),
            ("Transfer-Encoding: gzip, chunked\r\n", Ok(Framing::Chunked)),
            (
                "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                Ok(Framing::Chunked),
            ),
            ("Transfer-Encoding: chunked, gzip\r\n", Err(400)),
            ("Transfer-Encoding: gzip\r\n", Err(400)),
            ("Transfer-Encoding: chunked, chunked\r\n", Err(400)),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                Err(400),
            ),
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                Err(400),
            ),
            ("Transfer-Encoding : chunked\r\n", Err(400)),
            ("Transfer-Encoding: chunked\r\n x\r\n", Err(400)),
            ("Host: y\r\n", Err(400)),
        ];
        for (fields, want) in cases {
            let head = format!("{h}{fields}\r\n");
            assert_eq!(framing(&head), *want, "{head:?}");
        }
        assert_eq!(
            framing("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(400)
        );
        assert_eq!(framing("GET / HTTP/1.1\r\n\r\n"), Err(400), "no Host");
        assert_eq!(framing("GET / HTTP/1.1\nHost: x\n\n"), Err(400), "bare LF");
        assert_eq!(
            framing("GET / HTTP/1.1\r\nHost: x\n\r\n"),
            Err(400),
            "bare LF"
        );
        assert_eq!(
            framing("CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Err(405)
        );
        assert_eq!(framing("GARBAGE\r\n\r\n"), Err(400));
        assert_eq!(framing("GET / HTTP/2.0\r\nHost: x\r\n\r\n"), Err(400));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(framing(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Err(431));
        let long = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(req(&long), Err(431), "too long while still incomplete");
        assert_eq!(req("GET / HTTP/1.1\r\nHost:"), Ok(None));
    }

    #[test]
    fn request_targets_keep_alive_and_hosts() {
        let r = |s: &str| req(s).unwrap().unwrap();
        assert_eq!(
            r("GET /a/b?c=1 HTTP/1.1\r\nHost: x:9080\r\n\r\n"),
            (Framing::Empty, true, "/a/b".into(), "x:9080".into())
        );
        assert_eq!(
            r("GET http://h:80/p?q HTTP/1.1\r\nHost: other\r\n\r\n"),
            (Framing::Empty, true, "/p".into(), "h:80".into()),
            "an absolute-form target's authority wins"
        );
        assert_eq!(r("GET http://h HTTP/1.1\r\nHost: h\r\n\r\n").2, "/");
        assert_eq!(r("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").2, "*");
        assert!(!r("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").1);
        assert!(!r("GET / HTTP/1.0\r\n\r\n").1, "HTTP/1.0 closes by default");
        assert!(r("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").1);
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let input: &[u8] = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\ncontent-type: application/grpc+proto\r\n\r\nNEXT";
        let h = parse_request(input, &mut hs).unwrap().unwrap();
        assert!(h.upgrade && h.grpc);
        assert_eq!(
            h.len,
            input.len() - 4,
            "the head ends before the next bytes"
        );
    }

    fn resp(s: &str, head: bool) -> Result<(Framing, bool), u16> {
        match parse_response(s.as_bytes(), head) {
            Ok(Some(h)) => Ok((h.framing, h.keep_alive)),
            Ok(None) => panic!("incomplete: {s:?}"),
            Err(b) => Err(b.status),
        }
    }

    #[test]
    fn response_framing_follows_status_method_and_fields() {
        use Framing::*;
        type Case = (&'static str, bool, Result<(Framing, bool), u16>);
        let cases: &[Case] = &[
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                false,
                Ok((Length(3), true)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                true,
                Ok((Empty, true)),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Ok((Close, false))),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
                false,
                Ok((Empty, true)),
            ),
            (
                "HTTP/1.1 304 Not Modified\r\n\r\n",
                false,
                Ok((Empty, true)),
            ),
            ("HTTP/1.1 100 Continue\r\n\r\n", false, Ok((Empty, true))),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Ok((Chunked, true)),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                false,
                Ok((Close, false)),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false,
                Err(502),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                false,
                Err(502),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n",
                false,
                Ok((Length(3), false)),
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
                false,
                Ok((Length(3), false)),
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n",
                false,
                Ok((Length(3), true)),
            ),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Err(502),
            ),
            ("HTTP/1.1 200 OK\nContent-Length: 3\n\n", false, Err(502)),
            ("HTTP/1.1 2000 OK\r\n\r\n", false, Err(502)),
        ];
        for (head, to_head, want) in cases {
            assert_eq!(resp(head, *to_head), *want, "{head:?}");
        }
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nA: b", false), Ok(None));
    }

    /// Feeds `body` to a chunk walker in pieces of `step` bytes, keeping what it does not
    /// take, as the relay does; returns (bytes taken, data bytes, done).
    fn walk(body: &[u8], step: usize) -> Result<(usize, u64, bool), &'static str> {
        let mut c = Chunked::default();
        let (mut pending, mut taken) = (Vec::new(), 0);
        for piece in body.chunks(step) {
            pending.extend_from_slice(piece);
            let n = c.advance(&pending)?;
            pending.drain(..n);
            taken += n;
            if c.done() {
                break;
            }
        }
        Ok((taken, c.data, c.done()))
    }

    #[test]
    fn chunked_bodies_end_where_they_end_however_the_bytes_arrive() {
        let good: &[(&[u8], u64)] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", 5),
            (b"5;name=value\r\nhello\r\n3 ; x\r\nabc\r\n0\r\n\r\n", 8),
            (b"A\r\n0123456789\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n", 10),
            (b"0\r\n\r\n", 0),
            (b"000000000000000f\r\n0123456789abcde\r\n0\r\n\r\n", 15),
        ];
        for (body, data) in good {
            let mut with_next = body.to_vec();
            with_next.extend_from_slice(b"GET /next HTTP/1.1\r\n");
            for step in 1..=with_next.len() {
                assert_eq!(
                    walk(&with_next, step),
                    Ok((body.len(), *data, true)),
                    "{:?} in pieces of {step}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        let bad: &[&[u8]] = &[
            b"5\r\nhelloXX\r\n",
            b"g\r\n",
            b"5\n",
            b"\r\n",
            b"-5\r\n",
            b"5 x\r\n",
            b"5\r\r\nhello",
            b"11111111111111111\r\n",
            b"ffffffffffffffff\r\n",
            b"0\r\nX: 1\n\r\n",
        ];
        for body in bad {
            // ffff...: 16 digits parse; the body then simply is not there yet.
            let r = walk(body, 1);
            if *body == b"ffffffffffffffff\r\n" {
                assert_eq!(r, Ok((18, 0, false)));
                continue;
            }
            assert!(r.is_err(), "{:?} was taken", String::from_utf8_lossy(body));
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 2];
        assert!(walk(&long, 64).is_err(), "an endless size line");
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend(std::iter::repeat_n(b"x: y\r\n".as_slice(), 4000).flatten());
        assert!(walk(&trailers, 512).is_err(), "endless trailers");
    }

    #[derive(Default)]
    struct Rec {
        ends: Vec<(String, End)>,
        malformed: Vec<Bad>,
    }

    impl Hooks for Rec {
        type Ticket = String;
        fn admit(&mut self, h: &RequestHead<'_>) -> (bool, String) {
            (
                !h.path.starts_with("/admin"),
                format!("{} {}", h.method, h.path),
            )
        }
        fn done(&mut self, t: String, end: &End) {
            self.ends.push((t, end.clone()));
        }
        fn malformed(&mut self, bad: &Bad) {
            self.malformed.push(bad.clone());
        }
    }

    impl Rec {
        fn seen(&self) -> Vec<(String, u16, &'static str, u64, u64)> {
            self.ends
                .iter()
                .map(|(t, e)| (t.clone(), e.status, e.flags, e.req_bytes, e.resp_bytes))
                .collect()
        }
    }

    type AppBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

    fn full(b: impl Into<Bytes>) -> AppBody {
        http_body_util::Full::new(b.into())
            .map_err(|e| match e {})
            .boxed()
    }

    /// A hyper HTTP/1.1 server as the application: answers `<method> <path> <body bytes>`,
    /// 204 on /empty, a chunked body on /chunked, 101 and an echo on /ws.
    fn application(io: DuplexStream) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|mut req: http::Request<Incoming>| async move {
                let path = req.uri().path().to_owned();
                let method = req.method().clone();
                if path == "/ws" {
                    let up = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(up.await.unwrap());
                        let mut b = [0u8; 64];
                        while let Ok(n @ 1..) = io.read(&mut b).await {
                            io.write_all(&b[..n]).await.unwrap();
                        }
                    });
                    let r = http::Response::builder()
                        .status(101)
                        .header("upgrade", "echo")
                        .header("connection", "upgrade")
                        .body(full(""))
                        .unwrap();
                    return Ok::<_, hyper::Error>(r);
                }
                let body = req.into_body().collect().await?.to_bytes();
                let text = format!("{method} {path} {}", body.len());
                let r = match path.as_str() {
                    "/chunked" => {
                        let frames = ["ab", "cde"]
                            .map(|s| Ok::<_, hyper::Error>(http_body::Frame::data(Bytes::from(s))));
                        http::Response::new(
                            http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed(),
                        )
                    }
                    "/empty" => http::Response::builder()
                        .status(204)
                        .body(full(text))
                        .unwrap(),
                    _ => http::Response::new(full(text)),
                };
                Ok(r)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades()
                .await;
        })
    }

    /// The relay between a tunnel (returned: the test's end) and the hyper application.
    fn relay_to_application() -> (DuplexStream, tokio::task::JoinHandle<Rec>) {
        let (tunnel, ours) = tokio::io::duplex(64 * 1024);
        let (app_side, app) = tokio::io::duplex(64 * 1024);
        application(app);
        let relay = tokio::spawn(async move {
            let mut rec = Rec::default();
            serve(tunnel, BytesMut::new(), app_side, &mut rec).await;
            rec
        });
        (ours, relay)
    }

    /// Reads until `needle` has arrived (at most 5 s), returning everything read.
    async fn read_until(io: &mut DuplexStream, got: &mut Vec<u8>, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !String::from_utf8_lossy(got).contains(needle) {
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, io.read(&mut b))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{needle:?} did not come; got {:?}",
                        String::from_utf8_lossy(got)
                    )
                })
                .unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}: {:?}",
                String::from_utf8_lossy(got)
            );
            got.extend_from_slice(&b[..n]);
        }
        String::from_utf8_lossy(got).into_owned()
    }

    async fn read_to_end(io: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut got))
            .await
            .expect("the relay did not close")
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn a_hyper_client_gets_every_kind_of_message_over_one_connection() {
        use http_body_util::{Full, StreamBody};
        let (tunnel, relay) = relay_to_application();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut call = async |method: &str, path: &str, body: Option<&'static str>, chunked| {
            let body = match (body, chunked) {
                (Some(b), true) => {
                    let frames = b
                        .as_bytes()
                        .chunks(3)
                        .map(|c| Ok::<_, hyper::Error>(http_body::Frame::data(Bytes::from(c))))
                        .collect::<Vec<_>>();
                    StreamBody::new(futures::stream::iter(frames)).boxed()
                }
                (b, _) => Full::new(Bytes::from(b.unwrap_or("")))
                    .map_err(|e| match e {})
                    .boxed(),
            };
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "app")
                .body(body)
                .unwrap();
            send.ready().await.unwrap();
            let r = send.send_request(req).await.unwrap();
            let status = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        };
        assert_eq!(
            call("GET", "/a?x=1", None, false).await,
            (200, "GET /a 0".into())
        );
        assert_eq!(
            call("POST", "/b", Some("hello"), false).await,
            (200, "POST /b 5".into())
        );
        assert_eq!(
            call("PUT", "/c", Some("a chunked body"), true).await,
            (200, "PUT /c 14".into())
        );
        assert_eq!(call("HEAD", "/d", None, false).await, (200, String::new()));
        assert_eq!(
            call("GET", "/empty", None, false).await,
            (204, String::new())
        );
        assert_eq!(
            call("GET", "/chunked", None, false).await,
            (200, "abcde".into())
        );
        assert_eq!(
            call("GET", "/admin/x", None, false).await,
            (403, DENIED.into()),
            "refused by the hook, the connection kept"
        );
        assert_eq!(
            call("GET", "/after", None, false).await,
            (200, "GET /after 0".into())
        );
        drop(send);
        let rec = relay.await.unwrap();
        assert_eq!(
            rec.seen(),
            vec![
                ("GET /a".into(), 200, "-", 0, 8),
                ("POST /b".into(), 200, "-", 5, 9),
                ("PUT /c".into(), 200, "-", 14, 9),
                ("HEAD /d".into(), 200, "-", 0, 0),
                ("GET /empty".into(), 204, "-", 0, 0),
                ("GET /chunked".into(), 200, "-", 0, 5),
                ("GET /admin/x".into(), 403, "DENY", 0, 19),
                ("GET /after".into(), 200, "-", 0, 12),
            ]
        );
        assert!(rec.malformed.is_empty());
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let (mut t, relay) = relay_to_application();
        t.write_all(
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let all = read_to_end(&mut t).await;
        let order: Vec<_> = ["GET /1 0", "POST /2 3", "GET /3 0"]
            .iter()
            .map(|s| {
                all.find(s)
                    .unwrap_or_else(|| panic!("{s} missing in {all:?}"))
            })
            .collect();
        assert!(order.is_sorted(), "{all:?}");
        assert_eq!(relay.await.unwrap().ends.len(), 3);
    }

    #[tokio::test]
    async fn an_ambiguous_request_is_refused_and_never_reaches_the_application() {
        for attack in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 40\r\n\r\nx",
            "GET / HTTP/1.1\nHost: a\n\n",
        ] {
            let (mut t, relay) = relay_to_application();
            t.write_all(attack.as_bytes()).await.unwrap();
            let got = read_to_end(&mut t).await;
            assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{attack:?}: {got:?}");
            assert!(got.contains("connection: close"), "{got:?}");
            let rec = relay.await.unwrap();
            assert!(rec.ends.is_empty(), "{attack:?} reached the application");
            assert_eq!(rec.malformed.len(), 1);
        }
        // A chunk that lies about its size: the application has the head, so both end.
        let (mut t, relay) = relay_to_application();
        t.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n")
            .await
            .unwrap();
        let got = read_to_end(&mut t).await;
        assert!(got.starts_with("HTTP/1.1 400 "), "{got:?}");
        assert!(got.contains("not followed by CRLF"), "{got:?}");
        assert!(!got.contains("POST /x"), "{got:?}");
        assert!(relay.await.unwrap().ends.is_empty());
    }

    #[tokio::test]
    async fn expect_100_continue_gets_its_interim_response_before_the_body() {
        let (mut t, relay) = relay_to_application();
        t.write_all(
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        read_until(&mut t, &mut got, "HTTP/1.1 100 Continue\r\n\r\n").await;
        t.write_all(b"data").await.unwrap();
        let all = read_until(&mut t, &mut got, "POST /up 4").await;
        assert!(all.contains("HTTP/1.1 200 OK"), "{all:?}");
        drop(t);
        assert_eq!(
            relay.await.unwrap().seen(),
            vec![("POST /up".into(), 200, "-", 4, 10)]
        );
    }

    #[tokio::test]
    async fn an_upgrade_becomes_a_byte_stream_both_ways() {
        let (mut t, relay) = relay_to_application();
        t.write_all(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        read_until(&mut t, &mut got, "\r\n\r\n").await;
        assert!(
            String::from_utf8_lossy(&got).starts_with("HTTP/1.1 101 "),
            "{got:?}"
        );
        got.clear();
        t.write_all(b"ping over the upgrade").await.unwrap();
        read_until(&mut t, &mut got, "ping over the upgrade").await;
        drop(t);
        assert_eq!(relay.await.unwrap().seen()[0].1, 101);
    }

    /// The relay to an application played by the test (raw bytes both sides).
    fn relay_to_raw() -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<Rec>) {
        let (tunnel, ours) = tokio::io::duplex(64 * 1024);
        let (app_side, app) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(async move {
            let mut rec = Rec::default();
            serve(tunnel, BytesMut::new(), app_side, &mut rec).await;
            rec
        });
        (ours, app, relay)
    }

    #[tokio::test]
    async fn an_application_that_fails_gets_503_or_502_and_the_connection_ends() {
        // Closed before any response: 503 UC.
        let (mut t, mut app, relay) = relay_to_raw();
        t.write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        read_until(&mut app, &mut seen, "\r\n\r\n").await;
        drop(app);
        let got = read_to_end(&mut t).await;
        assert!(
            got.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{got:?}"
        );
        assert!(got.contains("before headers"), "{got:?}");
        assert_eq!(relay.await.unwrap().seen()[0].2, "UC");
        // A response the relay cannot frame: 502 UPE.
        let (mut t, mut app, relay) = relay_to_raw();
        t.write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut app, &mut Vec::new(), "\r\n\r\n").await;
        app.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        let got = read_to_end(&mut t).await;
        assert!(got.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{got:?}");
        let rec = relay.await.unwrap();
        assert_eq!((rec.seen()[0].1, rec.seen()[0].2), (502, "UPE"));
        // A body that runs until the application closes: relayed, then the tunnel closes.
        let (mut t, mut app, relay) = relay_to_raw();
        t.write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut app, &mut Vec::new(), "\r\n\r\n").await;
        app.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            .await
            .unwrap();
        drop(app);
        let got = read_to_end(&mut t).await;
        assert!(got.ends_with("\r\n\r\nuntil the end"), "{got:?}");
        assert_eq!(relay.await.unwrap().seen()[0].4, 13);
    }

    #[tokio::test]
    async fn only_the_framed_bytes_reach_the_application() {
        // Bytes past a request's end wait for the next request; they are never written with
        // the first one.
        let (mut t, mut app, relay) = relay_to_raw();
        t.write_all(
            b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nokGET /b HTTP/1.1\r\n",
        )
        .await
        .unwrap();
        let mut seen = Vec::new();
        read_until(&mut app, &mut seen, "\r\n\r\nok").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut more = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(50), app.read(&mut more)).await;
        assert!(
            early.is_err(),
            "bytes of the next request went out early: {early:?}"
        );
        app.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        t.write_all(b"Host: a\r\n\r\n").await.unwrap();
        read_until(&mut app, &mut seen, "GET /b HTTP/1.1\r\nHost: a\r\n\r\n").await;
        drop((t, app));
        let rec = relay.await.unwrap();
        assert_eq!(rec.seen()[0], ("POST /a".into(), 200, "-", 2, 0));
        assert_eq!(rec.seen()[1].2, "UC", "the second had no answer");
    }

    #[test]
    fn only_websocket_upgrades_are_kept() {
        let head = "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nAccept: */*\r\n\r\n";
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let h = parse_request(head.as_bytes(), &mut hs).unwrap().unwrap();
        assert!(!h.upgrade);
        assert_eq!(
            String::from_utf8(stripped(head.as_bytes(), &h)).unwrap(),
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nAccept: */*\r\n\r\n"
        );
        let ws = "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: WebSocket\r\n\r\n";
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let h = parse_request(ws.as_bytes(), &mut hs).unwrap().unwrap();
        assert!(h.upgrade);
        assert_eq!(h.strip, 0);
    }

    #[tokio::test]
    async fn an_h2c_upgrade_reaches_the_application_as_an_ordinary_request() {
        let (mut t, mut app, relay) = relay_to_raw();
        t.write_all(b"GET /a HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let got = read_until(&mut app, &mut seen, "\r\n\r\n").await;
        assert_eq!(
            got,
            "GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n"
        );
        // A 101 anyway is refused: the connection never becomes unchecked bytes.
        app.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
            .await
            .unwrap();
        let got = read_to_end(&mut t).await;
        assert!(got.starts_with("HTTP/1.1 502 "), "{got:?}");
        drop(app);
        assert_eq!(relay.await.unwrap().seen()[0].2, "UPE");
    }

    #[tokio::test]
    async fn prefixed_reads_its_prefix_first() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut p = Prefixed::new(Bytes::from_static(b"hello"), a);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
