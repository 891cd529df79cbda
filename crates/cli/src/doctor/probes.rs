//! The real [`Probes`]: sockets, TLS, DNS over UDP, iptables-save. Every network step is
//! bounded by the `--timeout`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use isthmus_dns::hickory_proto::op::{Message, Query, ResponseCode};
use isthmus_dns::hickory_proto::rr::{Name, RData, RecordType};
use isthmus_intercept::{Netfilter, Routing, SystemNetfilter, SystemRouting};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::{DialOutcome, DnsFailure, Probes, TlsOutcome};
use crate::tlsverify::{RecordingVerifier, Seen};

pub struct SystemProbes {
    timeout: Duration,
    netfilter: SystemNetfilter,
    routing: SystemRouting,
}

impl SystemProbes {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            netfilter: SystemNetfilter::new(),
            routing: SystemRouting::new(),
        }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{what} timed out after {}",
                humantime::format_duration(self.timeout)
            )),
        }
    }
}

/// The `date` of one HTTP/2 request's answer, and the local time half-way through it. Any
/// answer will do (tonic says "unimplemented" for this path); hyper dates every response.
async fn h2_date<S>(io: S, authority: &str) -> Result<(SystemTime, SystemTime), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = http::Request::post(format!("https://{authority}/isthmus.Doctor/Date"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let before = SystemTime::now();
    let started = Instant::now();
    let resp = send.send_request(req).await;
    let mid = before + started.elapsed() / 2;
    driver.abort();
    let resp = resp.map_err(|e| format!("HTTP/2 request: {e}"))?;
    let date = resp
        .headers()
        .get(http::header::DATE)
        .ok_or("the answer has no date header")?
        .to_str()
        .map_err(|e| e.to_string())?;
    let date = httpdate::parse_http_date(date).map_err(|e| format!("date {date:?}: {e}"))?;
    Ok((date, mid))
}

impl Probes for SystemProbes {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    async fn tls(
        &self,
        addr: SocketAddr,
        server_name: &str,
        roots: &[CertificateDer<'static>],
    ) -> TlsOutcome {
        let started = Instant::now();
        let tcp = match self
            .bounded("TCP connect", async {
                TcpStream::connect(addr).await.map_err(|e| e.to_string())
            })
            .await
        {
            Ok(t) => t,
            Err(e) => return TlsOutcome::Unreachable(e),
        };
        // Verifies like a normal client would, records the verdict and the chain, and lets the
        // handshake finish whatever the verdict (the connection then only asks for the time).
        let verifier = RecordingVerifier::observing(roots);
        let config = match verifier.client_config() {
            Ok(c) => c,
            Err(e) => return TlsOutcome::Handshake(e.to_string()),
        };
        let name = match ServerName::try_from(server_name.to_string()) {
            Ok(n) => n,
            Err(e) => {
                return TlsOutcome::Handshake(format!("{server_name:?} is not a server name: {e}"))
            }
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tls = match self
            .bounded("TLS handshake", async {
                connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
        {
            Ok(t) => t,
            Err(e) => return TlsOutcome::Handshake(e),
        };
        let elapsed = started.elapsed();
        let Some(Seen { chain, verdict }) = verifier.seen() else {
            return TlsOutcome::Handshake("the server presented no certificate".into());
        };
        let date = self
            .bounded("HTTP/2 request", h2_date(tls, server_name))
            .await;
        TlsOutcome::Done {
            verdict,
            chain,
            date,
            elapsed,
        }
    }

    async fn resolve_host(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        self.bounded("name lookup", async {
            tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| e.to_string())?
                .next()
                .ok_or_else(|| "no address".to_string())
        })
        .await
    }

    async fn http_get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        let resp = client
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .map_err(|e| root_cause(&e))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| e.to_string())?;
        Ok((status, body))
    }

    async fn dns(&self, server: SocketAddr, name: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        let qname = Name::from_ascii(&fqdn)
            .map_err(|e| DnsFailure::Unanswered(format!("{name:?} is not a DNS name: {e}")))?;
        let mut m = Message::query();
        m.metadata.id = rand_id();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(qname, RecordType::A));
        let query = m
            .to_vec()
            .map_err(|e| DnsFailure::Unanswered(e.to_string()))?;
        let id = m.metadata.id;
        let answer = self
            .bounded("DNS query", async {
                let bind: SocketAddr = if server.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
                sock.connect(server).await.map_err(|e| e.to_string())?;
                sock.send(&query).await.map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
                    if let Ok(reply) = Message::from_vec(&buf[..n]) {
                        if reply.metadata.id == id {
                            return Ok(reply);
                        }
                    }
                }
            })
            .await
            .map_err(DnsFailure::Unanswered)?;
        let rcode = answer.metadata.response_code;
        if rcode != ResponseCode::NoError {
            return Err(DnsFailure::Rcode(format!("{rcode}")));
        }
        Ok(answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect())
    }

    async fn dial(&self, addr: SocketAddr, http_host: Option<&str>) -> Result<DialOutcome, String> {
        let mut s = self
            .bounded("TCP connect", async {
                TcpStream::connect(addr).await.map_err(|e| e.to_string())
            })
            .await?;
        match http_host {
            Some(host) => self
                .bounded("HTTP request", async {
                    let req = format!(
                        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: isthmus-doctor\r\n\r\n"
                    );
                    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
                    // The status line is enough.
                    let mut buf = vec![0u8; 1024];
                    let mut n = 0;
                    while n < buf.len() && !buf[..n].contains(&b'\n') {
                        let got = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
                        if got == 0 {
                            break;
                        }
                        n += got;
                    }
                    if n == 0 {
                        return Err("connected, but the connection was closed without an HTTP answer: the proxy found no reachable endpoint".into());
                    }
                    parse_http_response(&buf[..n]).map(|(code, _)| DialOutcome::Http(code))
                })
                .await,
            None => {
                // A proxy that cannot reach any endpoint closes the accepted connection at
                // once; a server that waits for its client keeps it open.
                let wait = self.timeout.min(Duration::from_millis(500));
                let mut one = [0u8; 1];
                match tokio::time::timeout(wait, s.read(&mut one)).await {
                    Err(_) | Ok(Ok(1..)) => Ok(DialOutcome::Open),
                    Ok(Ok(0)) => Err("connected, but the connection was closed at once: the proxy found no reachable endpoint".into()),
                    Ok(Err(e)) => Err(format!("connected, then: {e}")),
                }
            }
        }
    }

    fn netfilter(&self) -> &dyn Netfilter {
        &self.netfilter
    }

    fn routing(&self) -> &dyn Routing {
        &self.routing
    }
}

/// The innermost error: "connection refused" rather than "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn rand_id() -> u16 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    (nanos ^ std::process::id()) as u16
}

/// Status code and body of an HTTP/1.x response (body as text, whole or the part read).
pub(super) fn parse_http_response(buf: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(buf);
    let status = text
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP answer: {:?}",
                text.chars().take(40).collect::<String>()
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}
