//! Loopback microbenchmark: direct TCP vs the same traffic through an HBONE client/server pair.
//!
//! `cargo run --release -p isthmus-hbone --example hbone_bench -- [MiB] [round trips]`
//! Reports echo throughput (MB/s, each direction) and 1 KiB request/response latency p50/p99.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use http::HeaderMap;
use isthmus_hbone::{
    ClientOptions, Credentials, Decision, HboneClient, HboneServer, InboundHandler, InboundRequest,
    ServerOptions,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";

struct AllowAll;

impl InboundHandler for AllowAll {
    async fn decide(&self, _request: &InboundRequest) -> Decision {
        Decision::Allow
    }
}

fn credentials(
    ca: &Issuer<'_, KeyPair>,
    ca_der: &rustls::pki_types::CertificateDer<'static>,
    id: &str,
) -> Result<Arc<Credentials>> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(id.try_into()?)];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, ca)?;
    Ok(Arc::new(Credentials {
        cert_chain: vec![cert.der().clone()],
        private_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        roots: vec![ca_der.clone()],
        trust_domain: "cluster.local".into(),
    }))
}

async fn echo_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

async fn throughput<S>(stream: S, total: usize) -> Result<f64>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            w.write_all(&chunk[..n]).await?;
            sent += n;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    writer.await??;
    anyhow::ensure!(got == total, "echoed {got} of {total} bytes");
    Ok(total as f64 / 1e6 / start.elapsed().as_secs_f64())
}

async fn latency<S>(mut stream: S, iters: usize) -> Result<(Duration, Duration)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = [7u8; 1024];
    let mut resp = [0u8; 1024];
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        stream.write_all(&req).await?;
        stream.read_exact(&mut resp).await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
    Ok((pct(0.50), pct(0.99)))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(256);
    let iters: usize = args
        .get(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_der = ca_params.self_signed(&ca_key)?.der().clone();
    let ca = Issuer::new(ca_params, ca_key);
    let (_stx, srx) = watch::channel(Some(credentials(&ca, &ca_der, SERVER_ID)?));
    let (_ctx, crx) = watch::channel(Some(credentials(&ca, &ca_der, CLIENT_ID)?));

    let echo = echo_server().await?;
    let server = HboneServer::bind(
        "127.0.0.1:0".parse()?,
        srx,
        AllowAll,
        ServerOptions::default(),
    )
    .await?
    .spawn()?;
    let client = HboneClient::new(crx, ClientOptions::default());
    let expected = vec![SERVER_ID.to_string()];
    let no_headers = HeaderMap::new();
    let hbone = || client.connect(server.local_addr(), echo, &expected, &no_headers);

    let total = mib * 1024 * 1024;
    let direct_tp = throughput(TcpStream::connect(echo).await?, total).await?;
    let hbone_tp = throughput(hbone().await?, total).await?;
    let direct = TcpStream::connect(echo).await?;
    direct.set_nodelay(true)?;
    let (d50, d99) = latency(direct, iters).await?;
    let (h50, h99) = latency(hbone().await?, iters).await?;

    println!("echo throughput, {mib} MiB each way, MB/s per direction");
    println!("  direct TCP : {direct_tp:>9.1}");
    println!("  HBONE      : {hbone_tp:>9.1}");
    println!("1 KiB request/response, {iters} round trips");
    println!("  direct TCP : p50 {d50:>10.1?}  p99 {d99:>10.1?}");
    println!("  HBONE      : p50 {h50:>10.1?}  p99 {h99:>10.1?}");
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
