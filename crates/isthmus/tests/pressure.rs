//! Issue 14 §2: no unauthenticated client can deny service to the control plane. The real
//! server, under a 1,024 open-files limit, holds 2,000 idle TLS connections on the gRPC port,
//! slow-header and silent clients on its HTTP ports and silent TCP DNS clients, and still
//! serves a certificate, a registration, DNS over UDP and TCP and its health check to a
//! legitimate client within seconds; and every stage deadline closes what is left idle.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use isthmus_ca::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use isthmus_ca::pb::IstioCertificateRequest;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The legitimate client's source address; the floods come from others.
const LEGIT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const IDLE_TLS: usize = 2_000;
const TLS_SOURCES: u8 = 20; // 127.0.0.10 ..= 127.0.0.29
/// What a legitimate request may take while the floods are held.
const PROMPT: Duration = Duration::from_secs(5);

/// `isthmus server` under `prlimit --nofile=1024:1024` (what systemd gives without
/// LimitNOFILE), every listener on loopback.
fn start_limited(dir: &Path, extra: &[&str]) -> Server {
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=1024:1024")
        .arg(BIN)
        .args(["server", "--data-dir"])
        .arg(dir)
        .args(ANY_PORTS)
        .args(extra);
    Server::start_command(cmd, dir)
}

fn addr(url: &str) -> SocketAddr {
    url.rsplit("//").next().unwrap().parse().unwrap()
}

fn src(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

fn tls_connector(dir: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca/root-cert.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS connection that completes its handshake and then sends nothing.
async fn idle_tls(
    connector: tokio_rustls::TlsConnector,
    source: IpAddr,
    to: SocketAddr,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = connect_from(source, to).await.ok()?;
    let name = ServerName::try_from("istiod.istio-system.svc").unwrap();
    tokio::time::timeout(Duration::from_secs(20), connector.connect(name, tcp))
        .await
        .ok()?
        .ok()
}

/// Opens `count` idle TLS connections over the flood sources, 100 handshakes at a time;
/// returns those whose handshake completed.
async fn tls_flood(
    dir: &Path,
    to: SocketAddr,
    count: usize,
) -> Vec<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tls_connector(dir);
    let mut held = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        if tasks.len() >= 100 {
            if let Some(Ok(Some(s))) = tasks.join_next().await {
                held.push(s);
            }
        }
        let source = src(10 + (i % usize::from(TLS_SOURCES)) as u8);
        tasks.spawn(idle_tls(connector.clone(), source, to));
    }
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(s)) = r {
            held.push(s);
        }
    }
    held
}

/// A client that sends a request's headers one byte a second, never finishing them.
async fn slow_header(source: IpAddr, to: SocketAddr) {
    let Ok(mut s) = connect_from(source, to).await else {
        return;
    };
    for b in b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: "
        .iter()
        .cycle()
    {
        if s.write_all(&[*b]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A DNS query for `name` (type A, class IN, recursion desired), as on the wire.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// (response code, answer count) of a DNS response.
fn rcode_answers(response: &[u8]) -> (u8, u16) {
    (
        response[3] & 0x0f,
        u16::from_be_bytes([response[6], response[7]]),
    )
}

async fn dns_udp(from: IpAddr, to: SocketAddr, name: &str) -> (u8, u16) {
    let socket = tokio::net::UdpSocket::bind(SocketAddr::new(from, 0))
        .await
        .unwrap();
    socket.send_to(&dns_query(7, name), to).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = socket.recv_from(&mut buf).await.unwrap();
    rcode_answers(&buf[..n])
}

async fn dns_tcp(from: IpAddr, to: SocketAddr, name: &str) -> (u8, u16) {
    let mut s = connect_from(from, to).await.unwrap();
    let q = dns_query(8, name);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await.unwrap();
    rcode_answers(&buf)
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/onprem/sa/mysql"
            .try_into()
            .unwrap(),
    )];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

async fn certificate(s: &Server, token: &str) -> Vec<String> {
    let root = std::fs::read_to_string(s.dir.join("ca/root-cert.pem")).unwrap();
    let channel = Endpoint::from_shared(s.grpc.clone())
        .unwrap()
        .local_address(Some(LEGIT))
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name("istiod.istio-system.svc"),
        )
        .unwrap()
        .connect()
        .await
        .expect("the legitimate client connects to the gRPC port");
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr(),
        validity_duration: 3600,
        metadata: None,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .expect("a certificate for the legitimate client")
        .into_inner()
        .cert_chain
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let out = tokio::time::timeout(PROMPT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took over {PROMPT:?} under pressure"));
    eprintln!("{what}: {:?}", start.elapsed());
    out
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The value of a counter line of the server's /metrics (0 when absent).
async fn counter(s: &Server, labels: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", s.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| {
            l.starts_with(&format!(
                "isthmus_listener_connections_closed_total{{{labels}}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_idle_and_slow_clients_does_not_deny_legitimate_ones() {
    // The test itself holds every flood connection.
    isthmus_socket_raise();
    let dir = tempfile::tempdir().unwrap();
    let s = start_limited(dir.path(), &[]);
    let token = s
        .ok(&[
            "token", "create", "-n", "onprem", "-s", "mysql", "--ttl", "1h",
        ])
        .trim()
        .to_string();
    let (grpc, admin, registration, dns) = (
        addr(&s.grpc),
        addr(&s.admin),
        addr(&s.registration),
        s.dns.parse::<SocketAddr>().unwrap(),
    );

    // Slow-header and silent clients on the HTTP ports, silent ones on DNS over TCP.
    let mut floods = tokio::task::JoinSet::new();
    for i in 0..40u8 {
        floods.spawn(slow_header(src(40 + i % 4), admin));
        floods.spawn(slow_header(src(44 + i % 4), registration));
    }
    let mut silent = Vec::new();
    for i in 0..300usize {
        let source = src(50 + (i % 10) as u8);
        for to in [admin, registration, dns] {
            if let Ok(c) = connect_from(source, to).await {
                silent.push(c);
            }
        }
    }
    let started = Instant::now();
    let held = tls_flood(dir.path(), grpc, IDLE_TLS).await;
    eprintln!(
        "{IDLE_TLS} TLS handshakes tried in {:?}: {} completed; server holds {} descriptors",
        started.elapsed(),
        held.len(),
        open_fds(s.child.id())
    );
    assert!(open_fds(s.child.id()) < 1024);

    let http = reqwest::Client::builder()
        .local_address(LEGIT)
        .timeout(PROMPT)
        .build()
        .unwrap();
    let health = within(
        "/healthz on the admin port",
        http.get(s.url("/healthz")).send(),
    )
    .await
    .expect("/healthz answers");
    assert_eq!(health.status(), 200);
    let chain = within("a certificate", certificate(&s, &token)).await;
    assert!(chain.len() >= 2, "{chain:?}");
    let start = Instant::now();
    let out = s.ok(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    eprintln!("isthmus register: {:?}: {out}", start.elapsed());
    assert!(start.elapsed() < PROMPT);
    let listed = within(
        "the registration API",
        http.get(format!("{}/v1/registration", s.registration))
            .send(),
    )
    .await
    .expect("the registration API answers");
    assert_eq!(listed.status(), 200);
    let name = "istiod.istio-system.svc.cluster.local";
    assert_eq!(
        within("DNS over UDP", dns_udp(LEGIT, dns, name)).await,
        (0, 1)
    );
    assert_eq!(
        within("DNS over TCP", dns_tcp(LEGIT, dns, name)).await,
        (0, 1)
    );

    // The floods were bounded by eviction (and per-source refusals), counted per listener.
    assert!(
        counter(
            &s,
            "listener=\"grpc\",event=\"evicted\",stage=\"first_bytes\""
        )
        .await
            > 0
    );
    assert!(
        counter(
            &s,
            "listener=\"admin\",event=\"evicted\",stage=\"first_bytes\""
        )
        .await
            > 0
    );
    assert!(
        counter(
            &s,
            "listener=\"dns_tcp\",event=\"evicted\",stage=\"first_bytes\""
        )
        .await
            > 0
    );
    assert!(open_fds(s.child.id()) < 1024);
    drop((held, silent));
    floods.abort_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_deadline_closes_what_is_left_idle() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_limited(
        dir.path(),
        &[
            "--handshake-timeout",
            "1s",
            "--first-request-timeout",
            "1s",
            "--grpc-idle-timeout",
            "3s",
            "--dns-tcp-idle-timeout",
            "1s",
        ],
    );
    let (grpc, admin, dns) = (
        addr(&s.grpc),
        addr(&s.admin),
        s.dns.parse::<SocketAddr>().unwrap(),
    );
    let closed_within = |what: &'static str, limit: Duration| {
        move |mut stream: TcpStream| async move {
            let start = Instant::now();
            let mut buf = [0u8; 256];
            loop {
                match tokio::time::timeout(limit, stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => continue,
                    Err(_) => panic!("{what}: still open after {limit:?}"),
                }
            }
            eprintln!("{what}: closed after {:?}", start.elapsed());
        }
    };
    // No TLS handshake at all.
    let c = connect_from(LEGIT, grpc).await.unwrap();
    closed_within("gRPC, no handshake", Duration::from_secs(5))(c).await;
    // A handshake, then no preface.
    let mut tls = idle_tls(tls_connector(dir.path()), LEGIT, grpc)
        .await
        .expect("handshake");
    let start = Instant::now();
    let mut buf = [0u8; 256];
    // The server's own HTTP/2 SETTINGS come first; then it closes.
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("gRPC without a preface still open after 5 s"),
        }
    }
    eprintln!("gRPC, no preface: closed after {:?}", start.elapsed());
    // HTTP: silent, then idle after one request.
    let c = connect_from(LEGIT, admin).await.unwrap();
    closed_within("admin, no headers", Duration::from_secs(5))(c).await;
    let mut c = connect_from(LEGIT, admin).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    // Between requests hyper's header deadline runs (--first-request-timeout), from the end
    // of the last response.
    closed_within("admin, idle after a request", Duration::from_secs(5))(c).await;
    // DNS over TCP: silent.
    let c = connect_from(LEGIT, dns).await.unwrap();
    closed_within("DNS over TCP, silent", Duration::from_secs(5))(c).await;

    for labels in [
        "listener=\"grpc\",event=\"timed_out\",stage=\"handshake\"",
        "listener=\"grpc\",event=\"timed_out\",stage=\"first_bytes\"",
        "listener=\"admin\",event=\"timed_out\",stage=\"first_bytes\"",
        "listener=\"admin\",event=\"timed_out\",stage=\"idle\"",
        "listener=\"dns_tcp\",event=\"timed_out\",stage=\"first_bytes\"",
    ] {
        assert_eq!(counter(&s, labels).await, 1, "{labels}");
    }
}

/// The flood needs more descriptors in this process than the server has.
fn isthmus_socket_raise() {
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
}
