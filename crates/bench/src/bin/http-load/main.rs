//! A small HTTP/1.1 load generator for `bench/dataplane.sh`: open loop at a fixed rate (latency
//! percentiles up to p99.9) or closed loop as fast as it can (throughput). wrk2 is not in
//! Debian, and a raw keep-alive client adds less of its own time than a general HTTP stack.
//!
//! Open loop: each of `--conns` keep-alive connections sends on its own schedule
//! (rate / conns per second, staggered). A request's latency runs from when it was written, or,
//! if its connection was still busy with the previous answer when it was due, from when it was
//! due: queueing behind a slow answer counts (coordinated omission).
//!
//! Pacing: tokio's timer has a 1 ms resolution, so at 10,000 requests/s it sends ten at once
//! every millisecond, and the proxies see bursts of ten where the schedule says one every
//! 100 µs. `--pacing precise` (the default) sleeps on a `timerfd` per connection, which wakes
//! the runtime at the due time to the nanosecond (the kernel's timer slack, 50 µs by default,
//! is the bound); `--pacing tick` keeps the 1 ms timer, for comparing with older runs.
// Unsafe only to register the pacing timerfd with the runtime (`Alarm::new`).
#![deny(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Pacing {
    /// A `timerfd` per connection: each request leaves at its due time.
    Precise,
    /// The runtime's 1 ms timer: the requests due within a millisecond leave together.
    Tick,
}

/// A one-shot `timerfd` registered with the runtime.
struct Alarm(AsyncFd<Fd>);

struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Alarm {
    fn new() -> Result<Self> {
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK)
            .context("timerfd_create")?;
        // SAFETY: `Fd` owns the timerfd, which stays open and the same for as long as the
        // `AsyncFd` that owns the `Fd` lives.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register(Fd(fd)) }
            .map_err(|e| e.into_parts().1)
            .context("registering the timerfd")?;
        Ok(Self(fd))
    }

    /// Returns at `due` (at once if it has passed).
    async fn sleep_until(&self, due: Instant) -> Result<()> {
        let left = due.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        self.0
            .get_ref()
            .0
            .set(
                Expiration::OneShot(TimeSpec::from_duration(left)),
                TimerSetTimeFlags::empty(),
            )
            .context("timerfd_settime")?;
        loop {
            let mut ready = self.0.readable().await?;
            // Reads the expiry count; EAGAIN (not yet) clears the readiness.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(std::io::Error::from)) {
                Ok(r) => return r.context("reading the timerfd"),
                Err(_would_block) => continue,
            }
        }
    }
}

#[derive(Parser, Debug)]
struct Args {
    /// Address to connect to, ip:port.
    #[arg(long)]
    addr: String,
    /// Host header.
    #[arg(long, default_value = "bench")]
    host: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests per second in total; 0 runs closed loop (as fast as the answers come).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 16)]
    conns: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring (not recorded).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// How an open loop waits for each request's due time.
    #[arg(long, value_enum, default_value_t = Pacing::Precise)]
    pacing: Pacing,
}

#[derive(Serialize, Default)]
struct Report {
    rate_target: u64,
    conns: u64,
    pacing: &'static str,
    requests: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed_s: f64,
    rps: f64,
    /// Requests whose connection was still busy with the previous answer when they were due.
    queued: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

#[derive(Default)]
struct ConnOutcome {
    lat: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
    queued: usize,
}

/// Reads one response (headers, then a Content-Length body) into `buf`, returning when done.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    let (head_end, body_len) = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..pos]).context("non-UTF-8 header")?;
            if !head.starts_with("HTTP/1.1 200") {
                bail!("status line {:?}", head.lines().next().unwrap_or(""));
            }
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .context("no Content-Length")?;
            break (pos + 4, len);
        }
    };
    while buf.len() < head_end + body_len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

async fn conn_loop(
    args: &Args,
    idx: u64,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> ConnOutcome {
    let mut out = ConnOutcome::default();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: http-load\r\n\r\n",
        args.path, args.host
    );
    let mut buf = Vec::with_capacity(4096);
    let mut stream: Option<TcpStream> = None;
    let interval =
        (args.rate > 0).then(|| Duration::from_secs_f64(args.conns as f64 / args.rate as f64));
    let alarm = match (interval, args.pacing) {
        (Some(_), Pacing::Precise) => match Alarm::new() {
            Ok(a) => Some(a),
            Err(e) => {
                out.errors += 1;
                out.first_error = Some(format!("{e:#}"));
                return out;
            }
        },
        _ => None,
    };
    let mut prev_done = start;
    // Stagger the connections' schedules evenly across one interval.
    let mut due = start
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(idx as f64 / args.conns as f64)
        });
    loop {
        if interval.is_some() {
            let now = Instant::now();
            if now < due {
                match &alarm {
                    Some(a) => {
                        if let Err(e) = a.sleep_until(due).await {
                            out.errors += 1;
                            out.first_error.get_or_insert(format!("{e:#}"));
                            break;
                        }
                    }
                    None => tokio::time::sleep_until(due.into()).await,
                }
            }
        }
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let record = sent >= measure_from;
        let busy = interval.is_some() && prev_done > due;
        let result = async {
            if stream.is_none() {
                let s = TcpStream::connect(&args.addr).await?;
                s.set_nodelay(true)?;
                stream = Some(s);
            }
            let s = stream.as_mut().context("no stream")?;
            s.write_all(req.as_bytes()).await?;
            read_response(s, &mut buf).await
        }
        .await;
        let done = Instant::now();
        prev_done = done;
        match result {
            Ok(()) if record => {
                // Counted from when it was due only when the connection held it back.
                let from = if busy { due } else { sent };
                out.lat.push(done - from);
                out.queued += busy as usize;
            }
            Ok(()) => {}
            Err(e) => {
                stream = None;
                if record {
                    out.errors += 1;
                    out.first_error.get_or_insert(format!("{e:#}"));
                }
            }
        }
        if let Some(i) = interval {
            due += i;
        }
    }
    out
}

fn main() -> Result<()> {
    let args: &'static Args = Box::leak(Box::new(Args::parse()));
    // One thread: the load generator shares two cores with the proxies and the apps.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let start = Instant::now() + Duration::from_millis(50);
        let measure_from = start + Duration::from_secs_f64(args.warmup);
        let end = measure_from + Duration::from_secs_f64(args.duration);
        let tasks: Vec<_> = (0..args.conns)
            .map(|i| tokio::spawn(conn_loop(args, i, start, measure_from, end)))
            .collect();
        let mut lat = Vec::new();
        let mut rep = Report {
            rate_target: args.rate,
            conns: args.conns,
            pacing: match (args.rate, args.pacing) {
                (0, _) => "closed-loop",
                (_, Pacing::Precise) => "precise",
                (_, Pacing::Tick) => "tick",
            },
            ..Default::default()
        };
        for t in tasks {
            let o = t.await?;
            lat.extend(o.lat);
            rep.errors += o.errors;
            rep.queued += o.queued;
            if rep.first_error.is_none() {
                rep.first_error = o.first_error;
            }
        }
        let elapsed = Instant::now().min(end + Duration::from_secs(3)) - measure_from;
        lat.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let rank =
            |p: f64| ms(lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1]);
        rep.requests = lat.len();
        rep.elapsed_s = elapsed.as_secs_f64();
        rep.rps = lat.len() as f64 / args.duration;
        if !lat.is_empty() {
            rep.p50_ms = rank(0.50);
            rep.p99_ms = rank(0.99);
            rep.p999_ms = rank(0.999);
            rep.max_ms = ms(lat[lat.len() - 1]);
        }
        anyhow::Ok(rep)
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The alarm never returns before the due time, returns when it comes (the readiness of a
    /// not-yet-expired timerfd is cleared, not taken for the expiry), and can be re-armed.
    #[tokio::test]
    async fn alarm_returns_at_the_due_time_and_not_before() {
        let alarm = Alarm::new().unwrap();
        let start = Instant::now();
        for i in 1..=20u32 {
            let due = start + Duration::from_micros(250) * i;
            tokio::time::timeout(Duration::from_secs(5), alarm.sleep_until(due))
                .await
                .expect("the alarm fired")
                .unwrap();
            assert!(Instant::now() >= due, "returned before the due time");
        }
    }

    #[tokio::test]
    async fn a_due_time_already_past_returns_at_once() {
        let alarm = Alarm::new().unwrap();
        let past = Instant::now() - Duration::from_millis(5);
        tokio::time::timeout(Duration::from_millis(500), alarm.sleep_until(past))
            .await
            .expect("returned at once")
            .unwrap();
    }
}
