//! Unary gRPC over HTTP/2 (h2c) for `bench/dataplane.sh`: `grpc-load serve` answers every call
//! with a fixed-size message and `grpc-status: 0` in the trailers; `grpc-load load` makes calls
//! as fast as the answers come (closed loop) from `--conns` HTTP/2 connections with `--streams`
//! calls in flight on each, and prints the same JSON report as `http-load`.
//!
//! Written on hyper rather than tonic: the calls carry opaque bytes (no generated code is
//! needed), and the client and server are as thin as the HTTP/1.1 generator they stand beside.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Answers unary calls on h2c.
    Serve {
        #[arg(long)]
        addr: SocketAddr,
        /// Bytes of each answer's message.
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
    },
    /// Calls in a closed loop and reports latency percentiles.
    Load {
        /// Address to connect to, ip:port.
        #[arg(long)]
        addr: String,
        /// The :authority of the calls.
        #[arg(long, default_value = "bench")]
        authority: String,
        #[arg(long, default_value = "/bench.Echo/Call")]
        path: String,
        #[arg(long, default_value_t = 4)]
        conns: u64,
        /// Calls in flight on each connection.
        #[arg(long, default_value_t = 8)]
        streams: u64,
        /// Bytes of each call's message.
        #[arg(long, default_value_t = 64)]
        bytes: usize,
        /// Seconds measured.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Seconds of load before measuring (not recorded).
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
}

/// A gRPC length-prefixed message: no compression, `n` bytes of payload.
fn message(n: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + n);
    b.put_u8(0);
    b.put_u32(n as u32);
    b.put_bytes(b'x', n);
    b.freeze()
}

async fn serve(addr: SocketAddr, bytes: usize) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let answer = message(bytes);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answer = answer.clone();
                async move {
                    // The whole call is read before it is answered, as a unary handler does.
                    let _ = req.into_body().collect().await;
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                        vec![Ok(Frame::data(answer)), Ok(Frame::trailers(trailers))];
                    let mut resp = Response::new(StreamBody::new(futures::stream::iter(frames)));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[derive(Serialize, Default)]
struct Report {
    rate_target: u64,
    conns: u64,
    streams: u64,
    requests: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed_s: f64,
    rps: f64,
    queued: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

/// One unary call; checks the status, the message and `grpc-status: 0`.
async fn call(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    uri: &http::Uri,
    body: &Bytes,
) -> Result<()> {
    let mut req = Request::new(Full::new(body.clone()));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri.clone();
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    if resp.status() != StatusCode::OK {
        bail!("status {}", resp.status());
    }
    let collected = resp.into_body().collect().await?;
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.as_bytes().to_vec());
    let data = collected.to_bytes();
    if data.len() < 5 {
        bail!("an answer of {} bytes is no gRPC message", data.len());
    }
    match status.as_deref() {
        Some(b"0") => Ok(()),
        Some(s) => bail!("grpc-status {}", String::from_utf8_lossy(s)),
        None => bail!("no grpc-status trailer"),
    }
}

struct Outcome {
    lat: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn load(
    addr: String,
    authority: String,
    path: String,
    conns: u64,
    streams: u64,
    bytes: usize,
    duration: f64,
    warmup: f64,
) -> Result<Report> {
    let uri: http::Uri = format!("http://{authority}{path}")
        .parse()
        .context("--authority and --path make no URI")?;
    let body = message(bytes);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(duration);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let tcp = TcpStream::connect(&addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tcp))
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        for _ in 0..streams {
            let (mut sender, uri, body) = (sender.clone(), uri.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Outcome {
                    lat: Vec::new(),
                    errors: 0,
                    first_error: None,
                };
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let r = call(&mut sender, &uri, &body).await;
                    let done = Instant::now();
                    if sent < measure_from {
                        continue;
                    }
                    match r {
                        Ok(()) => out.lat.push(done - sent),
                        Err(e) => {
                            out.errors += 1;
                            out.first_error.get_or_insert(format!("{e:#}"));
                            if sender.is_closed() {
                                break;
                            }
                        }
                    }
                }
                out
            }));
        }
    }
    let mut rep = Report {
        conns,
        streams,
        ..Default::default()
    };
    let mut lat = Vec::new();
    for t in tasks {
        let o = t.await?;
        lat.extend(o.lat);
        rep.errors += o.errors;
        if rep.first_error.is_none() {
            rep.first_error = o.first_error;
        }
    }
    lat.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    rep.requests = lat.len();
    rep.elapsed_s = (Instant::now() - measure_from).as_secs_f64();
    rep.rps = lat.len() as f64 / duration;
    if !lat.is_empty() {
        let rank =
            |p: f64| ms(lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1]);
        rep.p50_ms = rank(0.50);
        rep.p99_ms = rank(0.99);
        rep.p999_ms = rank(0.999);
        rep.max_ms = ms(lat[lat.len() - 1]);
    }
    Ok(rep)
}

fn main() -> Result<()> {
    let args = Args::parse();
    // One thread, as `http-load`: the generator and the server share two cores with the proxies.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.command {
        Cmd::Serve { addr, bytes } => rt.block_on(serve(addr, bytes)),
        Cmd::Load {
            addr,
            authority,
            path,
            conns,
            streams,
            bytes,
            duration,
            warmup,
        } => {
            let rep = rt.block_on(load(
                addr, authority, path, conns, streams, bytes, duration, warmup,
            ))?;
            println!("{}", serde_json::to_string(&rep)?);
            Ok(())
        }
    }
}
