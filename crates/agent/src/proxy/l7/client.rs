//! The client side's HTTP/1.1 path: the application's requests relayed as bytes, their heads
//! parsed (httparse, as [`super::relay`] on the server side) and rewritten for the upstream,
//! their bodies kept for retries, and the upstream's responses copied back as they came.
//!
//! hyper on the client agent parsed every request into `http` types, built a new request from
//! them for its client, which wrote it again; and parsed every response, which its server
//! wrote again; each upstream connection ran as its own task, so every request also crossed
//! tasks twice. BENCHMARKS.md (issue 17 run 26) put what L7 adds to the client agent at about
//! 13 µs per request. Here a request goes from the application's socket to an upstream tunnel
//! and back within the connection's task: one parse of each head, one rewrite of the request
//! head (hop-by-hop fields out, `traceparent` in), the bytes copied.
//!
//! The relay takes the common request: HTTP/1.1 in origin form, no upgrade, no
//! `Expect`, a body of at most [`MAX_REPLAY_BODY`] given by `Content-Length`, and a route that
//! forwards, without a fault, a mirror, a rewrite or header edits, to HTTP/1.1 destinations.
//! Routing, endpoint choice, retries, timeouts, the pool limits, outlier detection, metrics and
//! the access log are the same code as hyper's path ([`HttpOutbound::forward`] over a
//! [`Carrier`]). The first request that needs anything else, or that the strict parser refuses,
//! hands the connection to hyper from that request on, with the bytes read so far.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use http::{HeaderValue, Method, StatusCode};
use isthmus_hbone::metadata::{self as hmeta, TraceParent};
use isthmus_model::traffic::{LoadBalancerSettings, PortProtocol};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::authz::Headers;
use super::pool::{RawConn, SendError, UpstreamPool};
use super::relay::{self, Framing, More, RequestHead, ResponseHead};
use super::route::{self, Action, Decision, RequestView, Routes};
use super::{balance, continue_trace, Carrier, Conn, Done, HttpOutbound, Report, MAX_REPLAY_BODY};
use crate::proxy::outbound::Target;

/// How the relay left a client connection.
pub(super) enum Left {
    /// It closed, or was closed.
    Closed,
    /// A request needs hyper's path: hyper serves the connection from the buffered bytes on.
    Hyper,
}

/// Request fields never relayed upstream: hop-by-hop ones (RFC 9110 section 7.6.1), as hyper's
/// path leaves them out, and `traceparent`, which the relay writes itself.
const DROPPED: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
    "traceparent",
];

/// A request the relay takes, decided.
struct Planned<'r> {
    state: &'r Arc<isthmus_xds::client::State>,
    routes: &'r Arc<Routes>,
    route: &'r route::Route,
    dest: &'r route::WeightedDest,
    /// The request head as it goes upstream; the body is added once read.
    wire: Vec<u8>,
    /// The head's length as received, and the body's.
    len: usize,
    body: usize,
    keep_alive: bool,
    head_request: bool,
    hash: Option<u64>,
    trace: TraceParent,
    report: Report,
}

impl HttpOutbound {
    /// Relays the client's HTTP/1.1 requests on `io` (`inb`: bytes read from it and not yet
    /// relayed) until the connection closes or a request needs hyper's path.
    pub(super) async fn relay<IO>(&self, io: &mut IO, inb: &mut BytesMut, conn: &Arc<Conn>) -> Left
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        loop {
            let mut deadline = None;
            let mut looked = None;
            let planned = loop {
                let mut hs = [httparse::EMPTY_HEADER; relay::MAX_HEADERS];
                match relay::parse_request(inb, &mut hs) {
                    Ok(Some(h)) => {
                        let state = self.state.borrow().clone();
                        let routes = self.conn_routes(&state, conn);
                        let (state, routes) = &*looked.insert((state, routes));
                        break self.plan(&h, state, routes, conn);
                    }
                    Ok(None) => {}
                    // hyper's path answers it as it always did.
                    Err(_) => return Left::Hyper,
                }
                match relay::more_head(io, inb, &mut deadline).await {
                    More::Read => {}
                    More::Closed => return Left::Closed,
                    More::TimedOut => {
                        relay::refuse(io, &relay::late()).await;
                        return Left::Closed;
                    }
                }
            };
            let Some(Planned {
                state,
                routes,
                route,
                dest,
                mut wire,
                len,
                body,
                keep_alive,
                head_request,
                hash,
                trace,
                mut report,
            }) = planned
            else {
                return Left::Hyper;
            };
            let start = Instant::now();
            // The body, whole: it is small, and kept for retries.
            while inb.len() < len + body {
                match relay::fill(io, inb).await {
                    Ok(0) | Err(_) => return Left::Closed,
                    Ok(_) => {}
                }
            }
            wire.extend_from_slice(&inb[len..len + body]);
            inb.advance(len + body);
            report.request_bytes = body as u64;
            let mut carrier = RelayCarrier {
                wire,
                head_request,
                hash,
            };
            let answer = self
                .forward(
                    state,
                    conn,
                    routes,
                    route,
                    dest,
                    &mut carrier,
                    trace,
                    false,
                    &mut report,
                )
                .await;
            let (status, bytes, again) = match answer {
                Answer::Local(status, text) => {
                    let msg = relay::local_response(status.as_u16(), &text, !keep_alive);
                    let sent = io.write_all(&msg).await.is_ok() && io.flush().await.is_ok();
                    (status, text.len() as u64, keep_alive && sent)
                }
                Answer::Upstream { mut up, head, addr } => {
                    let status =
                        StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
                    match relay::relay_message(&mut up.io, &mut up.buf, io, head.len, head.framing)
                        .await
                    {
                        Ok(n) => {
                            if head.keep_alive && up.buf.is_empty() {
                                self.pool.put_raw(addr, up);
                            }
                            (status, n, keep_alive && head.keep_alive)
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, %addr, "relaying a response broke off");
                            (status, 0, false)
                        }
                    }
                }
            };
            Done {
                metrics: self.metrics.clone(),
                conn: conn.clone(),
                report,
                start,
                protocol: "http",
                status,
                grpc: None,
                trace,
                bytes,
            }
            .write();
            if !again {
                let _ = io.shutdown().await;
                return Left::Closed;
            }
        }
    }

    /// Decides on a request by its head; `None`: hyper's path takes it.
    fn plan<'r>(
        &self,
        h: &RequestHead<'_>,
        state: &'r Arc<isthmus_xds::client::State>,
        routes: &'r Arc<Routes>,
        conn: &Conn,
    ) -> Option<Planned<'r>> {
        let body = match h.framing {
            Framing::Empty => 0,
            Framing::Length(n) if n as usize <= MAX_REPLAY_BODY => n as usize,
            _ => return None,
        };
        let headers = Headers::Raw(h.headers);
        if h.version != 1
            || h.upgrade
            || h.strip != 0
            || h.grpc
            || h.host.is_empty()
            || !h.target.starts_with('/')
            || headers.first("expect").is_some()
        {
            return None;
        }
        let method = Method::from_bytes(h.method.as_bytes()).ok()?;
        let view = RequestView {
            method: &method,
            path: h.path,
            query: h.query,
            authority: h.host,
            scheme: "http",
            headers,
            port: conn.dst.port(),
        };
        let decision = {
            let mut rng = rand::thread_rng();
            route::decide(routes, &view, &mut rng)
        };
        let Decision::Route {
            route,
            dest: Some(dest),
            ..
        } = decision
        else {
            return None;
        };
        // Whether the relay takes a request must not hang on what was drawn for it (the
        // destination of a split, a fault, a mirror): hyper draws again for a request handed
        // over, so a draw that decided the hand-over would skew the split and the fault's
        // percentage. The relay takes a route only when it can carry every draw.
        let Action::Forward(dests) = &route.action else {
            return None;
        };
        if route.fault.is_some()
            || route.mirror.is_some()
            || route.rewrite_uri.is_some()
            || route.rewrite_authority.is_some()
            || !route.request_headers.is_empty()
            || !route.response_headers.is_empty()
        {
            return None;
        }
        let mut hash = None;
        for d in dests {
            if !d.request_headers.is_empty() || !d.response_headers.is_empty() {
                return None;
            }
            let port = d.dest.port.unwrap_or(conn.dst.port());
            let subset = d.dest.subset.as_deref();
            let Some(plan) = self.dest_plan(state, conn, routes, &d.dest.host, subset, port) else {
                continue;
            };
            // HTTP/2 upstreams, and peer agents that may take requests directly on HBONE,
            // are hyper's.
            if matches!(
                plan.routes.protocol(port),
                PortProtocol::Http2 | PortProtocol::Grpc
            ) || (self.pool.direct()
                && plan
                    .candidates
                    .iter()
                    .any(|w| matches!(w.tunnel, isthmus_xds::client::Tunnel::Hbone)))
            {
                return None;
            }
            if std::ptr::eq(d, dest) {
                let lb = plan
                    .routes
                    .policy_for(subset)
                    .and_then(|p| p.load_balancer.as_ref());
                hash = balance::request_hash(lb, headers, h.query, conn.src.ip());
            }
        }
        let incoming = headers
            .first(hmeta::TRACEPARENT.as_str())
            .and_then(|v| HeaderValue::from_str(v).ok())
            .and_then(|v| TraceParent::parse(&v).ok());
        let trace = continue_trace(incoming);
        let mut report = Report::new(h.method, h.host, h.path);
        if report.log {
            report.route = route.name.clone();
        }
        Some(Planned {
            state,
            routes,
            route,
            dest,
            wire: upstream_head(h, &trace, body),
            len: h.len,
            body,
            keep_alive: h.keep_alive,
            head_request: h.method == "HEAD",
            hash,
            trace,
            report,
        })
    }
}

/// The request head as it goes upstream: the request line and fields as received, less the
/// [`DROPPED`] ones and a `TE` other than `trailers`, with the request's `traceparent`; room
/// is made for a body of `body` bytes.
fn upstream_head(h: &RequestHead<'_>, trace: &TraceParent, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(h.len + 72 + body);
    out.extend_from_slice(h.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(h.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for f in h.headers {
        if DROPPED.iter().any(|d| f.name.eq_ignore_ascii_case(d))
            || (f.name.eq_ignore_ascii_case("te") && f.value != b"trailers")
        {
            continue;
        }
        out.extend_from_slice(f.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(f.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"traceparent: ");
    out.extend_from_slice(trace.to_header_value().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// An attempt's answer on the relay's path.
enum Answer {
    /// Made here: a status and a `text/plain` body.
    Local(StatusCode, String),
    /// The upstream's final response head is at the start of `up.buf`.
    Upstream {
        up: RawConn,
        head: ResponseHead,
        addr: std::net::SocketAddr,
    },
}

/// A request as bytes, sent on the relay's upstream connections.
struct RelayCarrier {
    /// The head as it goes upstream, and the body.
    wire: Vec<u8>,
    head_request: bool,
    hash: Option<u64>,
}

impl Carrier for RelayCarrier {
    type Resp = Answer;

    async fn prepare(&mut self, _report: &mut Report) -> Result<(), Answer> {
        Ok(())
    }

    fn replayable(&self) -> bool {
        true
    }

    fn came_as_h2(&self) -> bool {
        false
    }

    fn hash(&self, _lb: Option<&LoadBalancerSettings>, _src: std::net::IpAddr) -> Option<u64> {
        self.hash
    }

    fn mirrored(&self) -> Option<(&http::request::Parts, bytes::Bytes, &str)> {
        None
    }

    async fn attempt<'a>(
        &'a mut self,
        pool: &'a UpstreamPool,
        target: &'a Target,
        _h2: bool,
        connect_headers: &'a (dyn Fn() -> http::HeaderMap + Sync),
    ) -> Result<(Answer, bool), SendError> {
        let (mut up, fresh) = pool.raw(target, connect_headers).await?;
        let reset = |what: &str, e: std::io::Error| SendError::Reset(format!("{what}: {e}"));
        up.io
            .write_all(&self.wire)
            .await
            .map_err(|e| reset("writing the request", e))?;
        up.io
            .flush()
            .await
            .map_err(|e| reset("writing the request", e))?;
        loop {
            match relay::parse_response(&up.buf, self.head_request) {
                // Interim responses are not passed on (as hyper's client): the request sent
                // no `Expect`, and asked for no upgrade.
                Ok(Some(head)) if head.status == 101 => {
                    return Err(SendError::Reset(
                        "101 Switching Protocols to a request that asked for no upgrade".into(),
                    ));
                }
                Ok(Some(head)) if (100..200).contains(&head.status) => up.buf.advance(head.len),
                Ok(Some(head)) => {
                    let addr = target.addr;
                    return Ok((Answer::Upstream { up, head, addr }, fresh));
                }
                Ok(None) => match relay::fill(&mut up.io, &mut up.buf).await {
                    Ok(0) => {
                        return Err(SendError::Reset(
                            "the upstream closed the connection before a response".into(),
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(reset("reading the response", e)),
                },
                Err(bad) => return Err(SendError::Reset(bad.reason)),
            }
        }
    }

    fn status(resp: &Answer) -> (StatusCode, Option<u32>) {
        match resp {
            Answer::Local(s, _) => (*s, None),
            Answer::Upstream { head, .. } => (
                StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY),
                None,
            ),
        }
    }

    fn local(status: StatusCode, body: &str) -> Answer {
        Answer::Local(status, body.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(head: &str) -> String {
        let mut hs = [httparse::EMPTY_HEADER; relay::MAX_HEADERS];
        let h = relay::parse_request(head.as_bytes(), &mut hs)
            .unwrap()
            .unwrap();
        let trace = TraceParent::new(0xabc, 0xdef, 1).unwrap();
        String::from_utf8(upstream_head(&h, &trace, 0)).unwrap()
    }

    #[test]
    fn the_upstream_head_keeps_the_request_less_hop_by_hop_fields_with_the_trace() {
        let trace = "traceparent: 00-00000000000000000000000000000abc-0000000000000def-01\r\n";
        for (head, want) in [
            (
                "GET /p?q=1 HTTP/1.1\r\nHost: a\r\nX-Mixed-Case: v\r\n\r\n",
                format!("GET /p?q=1 HTTP/1.1\r\nHost: a\r\nX-Mixed-Case: v\r\n{trace}\r\n"),
            ),
            (
                "GET / HTTP/1.1\r\nhost: a\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: 5\r\n\
                 Proxy-Connection: close\r\nproxy-authorization: b\r\nTE: gzip\r\n\r\n",
                format!("GET / HTTP/1.1\r\nhost: a\r\n{trace}\r\n"),
            ),
            (
                "POST /x HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nContent-Length: 2\r\n\r\n",
                format!(
                    "POST /x HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nContent-Length: 2\r\n{trace}\r\n"
                ),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nTraceparent: 00-11111111111111111111111111111111-2222222222222222-01\r\n\r\n",
                format!("GET / HTTP/1.1\r\nHost: a\r\n{trace}\r\n"),
            ),
        ] {
            assert_eq!(rewritten(head), want, "{head:?}");
        }
    }

    #[test]
    fn raw_fields_read_as_a_header_map_reads_them() {
        let head: &[u8] =
            b"GET / HTTP/1.1\r\nHost: a\r\nX-User: ann\r\nx-user: bob\r\nX-Bin: \xff\r\nX-Empty:\r\n\r\n";
        let mut hs = [httparse::EMPTY_HEADER; relay::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut hs);
        req.parse(head).unwrap();
        let mut map = http::HeaderMap::new();
        for h in req.headers.iter() {
            map.append(
                http::HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        let (raw, map) = (Headers::Raw(req.headers), Headers::Map(&map));
        for name in ["x-user", "X-USER", "host", "x-bin", "x-empty", "absent"] {
            assert_eq!(raw.first(name), map.first(name), "{name}");
        }
        assert_eq!(raw.first("x-user"), Some("ann"));
        assert_eq!(raw.first("x-bin"), None, "not text");
    }
}
