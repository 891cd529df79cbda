//! The demo's workloads: a tiny HTTP/1.0 app that names itself (and, for productpage, what its
//! upstream said), and a fetch client that resolves through the host's resolver like curl.
//! Hand-written on purpose: the demo must run on a host with nothing but `isthmus` and `ip`, and
//! a one-request-per-connection text exchange needs no HTTP library.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Requests and answers are one short line; anything longer is not the demo talking.
const MAX_MESSAGE: u64 = 64 * 1024;

/// Serves `GET` on `listen` until killed: `200 <name> on <ip>`, plus `upstream`'s answer.
pub async fn serve(name: String, listen: SocketAddr, upstream: Option<String>) -> Result<()> {
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    loop {
        let (mut s, _) = l.accept().await?;
        let (name, upstream) = (name.clone(), upstream.clone());
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match tokio::time::timeout(TIMEOUT, s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let me = s
                .local_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let mut body = format!("{name} on {me}");
            if let Some(url) = upstream {
                match fetch(&url).await {
                    Ok(b) => body.push_str(&format!(" <- {}", b.trim())),
                    Err(e) => body.push_str(&format!(" <- upstream failed: {e:#}")),
                }
            }
            body.push('\n');
            let resp = format!(
                "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// `GET url` (http only), resolving the host through the system resolver; the body on 200.
pub async fn fetch(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = authority.split(':').next().unwrap_or(authority);
    let target = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let attempt = async {
        let addr = tokio::net::lookup_host(&target)
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {host} ({addr})"))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nhost: {authority}\r\n\r\n").as_bytes())
            .await?;
        let mut resp = Vec::new();
        (&mut s).take(MAX_MESSAGE).read_to_end(&mut resp).await?;
        anyhow::Ok(resp)
    };
    let resp = tokio::time::timeout(TIMEOUT, attempt)
        .await
        .with_context(|| format!("{url}: no answer within {TIMEOUT:?}"))??;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{url}: the answer is not HTTP"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{url}: {status}");
    }
    Ok(body.to_string())
}
