//! HBONE client and server over real loopback sockets with real mTLS, certificates from an
//! in-test CA carrying SPIFFE URI SANs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use http::{HeaderMap, HeaderValue, StatusCode};
use isthmus_hbone::{
    ClientOptions, Credentials, Decision, HboneClient, HboneError, HboneServer, InboundHandler,
    InboundRequest, ServerHandle, ServerOptions,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

const TD: &str = "cluster.local";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl TestCa {
    fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A workload certificate for `spiffe`, trusting `roots` (this CA when empty).
    fn issue(&self, spiffe: &str, roots: &[&TestCa]) -> Result<Arc<Credentials>> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(spiffe.try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        let roots = if roots.is_empty() {
            vec![self.cert.clone()]
        } else {
            roots.iter().map(|r| r.cert.clone()).collect()
        };
        Ok(Arc::new(Credentials {
            cert_chain: vec![cert.der().clone()],
            private_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots,
            trust_domain: TD.to_string(),
        }))
    }
}

#[derive(Default)]
struct TestHandler {
    denied_port: Option<u16>,
    seen: Mutex<Vec<InboundRequest>>,
    /// Takes direct requests: answers each with its body reversed and trailers.
    takes: bool,
    /// The headers of the direct requests it answered.
    request_headers: Mutex<Vec<HeaderMap>>,
}

impl InboundHandler for TestHandler {
    async fn decide(&self, request: &InboundRequest) -> Decision {
        self.seen.lock().unwrap().push(request.clone());
        if Some(request.target.port()) == self.denied_port {
            Decision::Deny(
                StatusCode::FORBIDDEN,
                "denied by policy test/deny-port".into(),
            )
        } else {
            Decision::Allow
        }
    }

    fn takes_requests(&self) -> bool {
        self.takes
    }

    async fn request(
        &self,
        request: InboundRequest,
        req: http::Request<isthmus_hbone::RecvBody>,
    ) -> http::Response<isthmus_hbone::ResponseBody> {
        use http_body_util::BodyExt;
        self.seen.lock().unwrap().push(request.clone());
        self.request_headers
            .lock()
            .unwrap()
            .push(req.headers().clone());
        let path = req.uri().path().to_string();
        let collected = req.into_body().collect().await.expect("request body");
        let request_trailers = collected.trailers().cloned().unwrap_or_default();
        let mut body = collected.to_bytes().to_vec();
        body.reverse();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-length", HeaderValue::from(body.len()));
        if let Some(v) = request_trailers.get("x-check") {
            trailers.insert("x-check", v.clone());
        }
        let frames = futures_util::stream::iter(vec![
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(body))),
            Ok(http_body::Frame::trailers(trailers)),
        ]);
        let mut r = http::Response::new(isthmus_hbone::request::boxed(
            http_body_util::StreamBody::new(frames),
        ));
        r.headers_mut()
            .insert("x-path", HeaderValue::from_str(&path).unwrap());
        r.headers_mut().insert(
            "x-target",
            HeaderValue::from_str(&request.target.to_string()).unwrap(),
        );
        // What an HTTP/1.1 application's answer carries, and HTTP/2 may not.
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("keep-alive"));
        r
    }
}

/// Echoes every byte; half-closes after the client does.
async fn echo_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Reads until EOF, then replies with the byte count and the data reversed.
async fn read_all_then_reply_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    buf.reverse();
                    let _ = s.write_all(format!("{}:", buf.len()).as_bytes()).await;
                    let _ = s.write_all(&buf).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    Ok(addr)
}

struct Mesh {
    ca: TestCa,
    server: ServerHandle,
    handler: Arc<TestHandler>,
    client: HboneClient,
    client_creds: watch::Sender<Option<Arc<Credentials>>>,
    _server_creds: watch::Sender<Option<Arc<Credentials>>>,
}

struct SharedHandler(Arc<TestHandler>);

impl InboundHandler for SharedHandler {
    async fn decide(&self, request: &InboundRequest) -> Decision {
        self.0.decide(request).await
    }

    fn takes_requests(&self) -> bool {
        self.0.takes_requests()
    }

    async fn request(
        &self,
        request: InboundRequest,
        req: http::Request<isthmus_hbone::RecvBody>,
    ) -> http::Response<isthmus_hbone::ResponseBody> {
        self.0.request(request, req).await
    }
}

async fn mesh_with(handler: TestHandler, client_opts: ClientOptions) -> Result<Mesh> {
    let ca = TestCa::new("mesh root")?;
    let (server_tx, server_rx) = watch::channel(Some(ca.issue(SERVER_ID, &[])?));
    let (client_tx, client_rx) = watch::channel(Some(ca.issue(CLIENT_ID, &[])?));
    let handler = Arc::new(handler);
    let server = HboneServer::bind(
        "127.0.0.1:0".parse()?,
        server_rx,
        SharedHandler(handler.clone()),
        ServerOptions::default(),
    )
    .await?
    .spawn()?;
    Ok(Mesh {
        ca,
        server,
        handler,
        client: HboneClient::new(client_rx, client_opts),
        client_creds: client_tx,
        _server_creds: server_tx,
    })
}

async fn mesh() -> Result<Mesh> {
    mesh_with(TestHandler::default(), ClientOptions::default()).await
}

fn ids(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

impl Mesh {
    async fn open(&self, target: SocketAddr) -> Result<isthmus_hbone::HboneStream, HboneError> {
        self.client
            .connect(
                self.server.local_addr(),
                target,
                &ids(&[SERVER_ID]),
                &HeaderMap::new(),
            )
            .await
    }
}

/// Polls `cond` every few milliseconds until it holds or 10 s pass.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn roundtrip(stream: &mut isthmus_hbone::HboneStream, msg: &[u8]) -> Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut got = vec![0; msg.len()];
    stream.read_exact(&mut got).await?;
    Ok(got)
}

#[tokio::test]
async fn echo_through_tunnel_carries_identity_and_headers() -> Result<()> {
    let m = mesh().await?;
    let echo = echo_server().await?;
    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    headers.insert("baggage", HeaderValue::from_static("k=v"));
    let mut s = m
        .client
        .connect(m.server.local_addr(), echo, &ids(&[SERVER_ID]), &headers)
        .await?;
    assert_eq!(roundtrip(&mut s, b"hello mesh").await?, b"hello mesh");
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    assert!(rest.is_empty());

    let seen = m.handler.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer_identity, CLIENT_ID);
    assert_eq!(seen[0].target, echo);
    assert_eq!(seen[0].headers["baggage"], "k=v");
    assert!(seen[0].headers.contains_key("traceparent"));
    let trace = seen[0].metadata.traceparent.map(|t| t.trace_id.to_string());
    assert_eq!(trace.as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
    // `k` is no key ztunnel uses.
    assert!(seen[0].metadata.baggage.is_empty());
    Ok(())
}

/// The server hands the handler the parsed `baggage`, `forwarded` and `traceparent`; a
/// CONNECT whose headers exceed the header-list limit is refused (431) by HTTP/2 itself and
/// the connection goes on carrying other streams.
#[tokio::test]
async fn connect_metadata_is_parsed_and_oversized_header_lists_refused() -> Result<()> {
    use isthmus_hbone::metadata::{self, Baggage, TraceParent};
    let m = mesh().await?;
    let echo = echo_server().await?;
    let source = Baggage {
        cluster_id: Some("Kubernetes".into()),
        namespace: Some("default".into()),
        workload_type: Some("pod".into()),
        workload_name: Some("vm 1".into()),
        service_name: Some("client".into()),
        service_version: Some("v1".into()),
    };
    let trace = TraceParent::new(0x1234, 0x5678, metadata::SAMPLED).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(metadata::BAGGAGE, source.to_header_value().unwrap());
    headers.insert(
        metadata::FORWARDED,
        metadata::forwarded_for("2001:db8::7".parse()?),
    );
    headers.insert(metadata::TRACEPARENT, trace.to_header_value());
    let mut s = m
        .client
        .connect(m.server.local_addr(), echo, &ids(&[SERVER_ID]), &headers)
        .await?;
    assert_eq!(roundtrip(&mut s, b"meta").await?, b"meta");
    let seen = m.handler.seen.lock().unwrap().clone();
    assert_eq!(seen[0].metadata.baggage, source);
    assert_eq!(seen[0].metadata.forwarded_for, Some("2001:db8::7".parse()?));
    assert_eq!(seen[0].metadata.traceparent, Some(trace));

    let limit = ServerOptions::default().max_header_list_size as usize;
    let mut big = HeaderMap::new();
    big.insert(
        metadata::BAGGAGE,
        HeaderValue::from_str(&format!("k={}", "x".repeat(limit)))?,
    );
    match m
        .client
        .connect(m.server.local_addr(), echo, &ids(&[SERVER_ID]), &big)
        .await
    {
        Err(HboneError::Rejected { status, .. }) => {
            assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        other => anyhow::bail!("an oversized CONNECT was not refused with 431: {other:?}"),
    }
    assert_eq!(m.handler.seen.lock().unwrap().len(), 1);
    // The open stream and the connection are unharmed.
    assert_eq!(roundtrip(&mut s, b"after").await?, b"after");
    let mut again = m.open(echo).await?;
    assert_eq!(roundtrip(&mut again, b"again").await?, b"again");
    assert_eq!(m.client.pooled_connections().await, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_streams_share_one_tls_connection() -> Result<()> {
    let m = Arc::new(mesh().await?);
    let echo = echo_server().await?;
    let mut tasks = Vec::new();
    // Every stream stays open until all are established, so they are truly concurrent.
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    for i in 0..50u64 {
        let m = m.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = m.open(echo).await?;
            barrier.wait().await;
            let msg = pattern(4096, i + 1);
            anyhow::ensure!(
                roundtrip(&mut s, &msg).await? == msg,
                "stream {i} corrupted"
            );
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(m.server.stats().tls_accepted(), 1);
    assert_eq!(m.server.stats().streams(), 50);
    assert_eq!(m.client.pooled_connections().await, 1);
    Ok(())
}

#[tokio::test]
async fn saturated_connection_opens_another() -> Result<()> {
    let opts = ClientOptions {
        max_streams_per_connection: 2,
        ..ClientOptions::default()
    };
    let m = mesh_with(TestHandler::default(), opts).await?;
    let echo = echo_server().await?;
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(m.open(echo).await?);
    }
    for s in &mut streams {
        assert_eq!(roundtrip(s, b"ping").await?, b"ping");
    }
    assert_eq!(m.server.stats().tls_accepted(), 3);
    // Slots are returned when streams drop: the next stream reuses a connection.
    drop(streams);
    let mut s = m.open(echo).await?;
    assert_eq!(roundtrip(&mut s, b"again").await?, b"again");
    assert_eq!(m.server.stats().tls_accepted(), 3);
    Ok(())
}

#[tokio::test]
async fn idle_pooled_connection_is_closed_and_replaced() -> Result<()> {
    let opts = ClientOptions {
        idle_timeout: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let m = mesh_with(TestHandler::default(), opts).await?;
    let echo = echo_server().await?;

    // A connection carrying a stream is never idle, however long the stream is quiet.
    let mut busy = m.open(echo).await?;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(roundtrip(&mut busy, b"still here").await?, b"still here");
    assert_eq!(m.client.pooled_connections().await, 1);
    drop(busy);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while m.client.pooled_connections().await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle connection still pooled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nor is it listed any more, nor its destination.
    while m.client.pool_entries().await != (0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "closed connection still listed: {:?}",
            m.client.pool_entries().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next stream gets a fresh connection.
    let mut s = m.open(echo).await?;
    assert_eq!(roundtrip(&mut s, b"again").await?, b"again");
    assert_eq!(m.server.stats().tls_accepted(), 2);
    assert_eq!(m.client.pooled_connections().await, 1);
    assert_eq!(m.client.pool_entries().await, (1, 1));
    Ok(())
}

#[tokio::test]
async fn client_refuses_wrong_server_identity() -> Result<()> {
    let m = mesh().await?;
    let echo = echo_server().await?;
    let expected = "spiffe://cluster.local/ns/default/sa/reviews";
    let err = m
        .client
        .connect(
            m.server.local_addr(),
            echo,
            &ids(&[expected]),
            &HeaderMap::new(),
        )
        .await
        .expect_err("must refuse a server with the wrong identity");
    match &err {
        HboneError::ServerIdentity { found, .. } => assert_eq!(found, SERVER_ID),
        other => panic!("unexpected error: {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(SERVER_ID) && msg.contains(expected), "{msg}");
    Ok(())
}

#[tokio::test]
async fn client_requires_expected_identities() -> Result<()> {
    let m = mesh().await?;
    let echo = echo_server().await?;
    let err = m
        .client
        .connect(m.server.local_addr(), echo, &[], &HeaderMap::new())
        .await
        .expect_err("no expected identity");
    assert!(
        matches!(err, HboneError::NoExpectedIdentity { .. }),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn server_refuses_client_from_another_ca() -> Result<()> {
    let m = mesh().await?;
    let echo = echo_server().await?;
    let rogue_ca = TestCa::new("rogue root")?;
    // The rogue client trusts the mesh root (so it accepts the server) but its own cert is rogue.
    let rogue = rogue_ca.issue(CLIENT_ID, &[&m.ca])?;
    let (_tx, rx) = watch::channel(Some(rogue));
    let client = HboneClient::new(rx, ClientOptions::default());
    let err = client
        .connect(
            m.server.local_addr(),
            echo,
            &ids(&[SERVER_ID]),
            &HeaderMap::new(),
        )
        .await
        .expect_err("server must refuse a client certificate from another CA");
    assert!(
        matches!(err, HboneError::CertificateRefused { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("refused our certificate"), "{err}");
    let stats = m.server.stats();
    eventually("the server to count the failed handshake", || {
        stats.tls_failed() == 1
    })
    .await;
    assert_eq!(stats.tls_accepted(), 0);
    assert!(m.handler.seen.lock().unwrap().is_empty());
    Ok(())
}

#[tokio::test]
async fn authority_ip_must_be_the_connected_ip() -> Result<()> {
    let m = mesh().await?;
    let echo = echo_server().await?;
    let other_ip: SocketAddr = format!("127.0.0.2:{}", echo.port()).parse()?;
    let err = m.open(other_ip).await.expect_err("mismatched authority");
    match &err {
        HboneError::Rejected { status, reason, .. } => {
            assert_eq!(*status, StatusCode::FORBIDDEN);
            assert!(reason.contains("does not match"), "{reason}");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(m.handler.seen.lock().unwrap().is_empty());
    // The connection is still usable for valid streams.
    let mut s = m.open(echo).await?;
    assert_eq!(roundtrip(&mut s, b"ok").await?, b"ok");
    Ok(())
}

#[tokio::test]
async fn denied_stream_gets_403() -> Result<()> {
    let echo = echo_server().await?;
    let handler = TestHandler {
        denied_port: Some(echo.port()),
        ..TestHandler::default()
    };
    let m = mesh_with(handler, ClientOptions::default()).await?;
    let err = m.open(echo).await.expect_err("policy denies this port");
    match &err {
        HboneError::Rejected { status, reason, .. } => {
            assert_eq!(*status, StatusCode::FORBIDDEN);
            assert_eq!(reason, "denied by policy test/deny-port");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(err.to_string().contains("403"), "{err}");
    assert_eq!(m.server.stats().streams_refused(), 1);
    Ok(())
}

#[tokio::test]
async fn unreachable_target_gets_503() -> Result<()> {
    let m = mesh().await?;
    // Bind then drop: nothing listens on this port any more.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let err = m.open(closed).await.expect_err("nothing listens");
    match &err {
        HboneError::Rejected { status, reason, .. } => {
            assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                reason,
                &format!(
                    "the local app refused the connection (is it listening on {}?)",
                    closed.port()
                )
            );
        }
        other => panic!("unexpected error: {other}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_both_directions_intact() -> Result<()> {
    let m = mesh().await?;
    let echo = echo_server().await?;
    let s = m.open(echo).await?;
    let data = pattern(16 * 1024 * 1024, 42);
    let (mut r, mut w) = tokio::io::split(s);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut got = Vec::with_capacity(data.len());
    r.read_to_end(&mut got).await?;
    writer.await??;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    Ok(())
}

#[tokio::test]
async fn half_close_still_reads_the_reply() -> Result<()> {
    let m = mesh().await?;
    let target = read_all_then_reply_server().await?;
    let mut s = m.open(target).await?;
    s.write_all(b"abc").await?;
    s.write_all(b"def").await?;
    // The target only answers after it sees EOF, which only a half-close delivers.
    s.shutdown().await?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await?;
    assert_eq!(reply, b"6:fedcba");
    Ok(())
}

#[tokio::test]
async fn rotation_applies_to_new_connections_only() -> Result<()> {
    let m = mesh().await?;
    let echo = echo_server().await?;
    let mut old_stream = m.open(echo).await?;
    assert_eq!(roundtrip(&mut old_stream, b"before").await?, b"before");
    let old_cert = m.client_creds.borrow().as_ref().unwrap().cert_chain[0].clone();

    let rotated = m.ca.issue(CLIENT_ID, &[])?;
    let new_cert = rotated.cert_chain[0].clone();
    m.client_creds.send_replace(Some(rotated));

    let mut new_stream = m.open(echo).await?;
    assert_eq!(roundtrip(&mut new_stream, b"after").await?, b"after");
    // The stream opened before rotation keeps working on its original connection.
    assert_eq!(
        roundtrip(&mut old_stream, b"still here").await?,
        b"still here"
    );

    assert_eq!(m.server.stats().tls_accepted(), 2);
    let seen = m.handler.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(*seen[0].peer_certificate, old_cert);
    assert_eq!(*seen[1].peer_certificate, new_cert);
    assert_ne!(old_cert, new_cert);
    Ok(())
}

#[tokio::test]
async fn no_credentials_is_a_clear_error() -> Result<()> {
    let m = mesh().await?;
    let echo = echo_server().await?;
    let (_tx, rx) = watch::channel(None);
    let client = HboneClient::new(rx, ClientOptions::default());
    let err = client
        .connect(
            m.server.local_addr(),
            echo,
            &ids(&[SERVER_ID]),
            &HeaderMap::new(),
        )
        .await
        .expect_err("no certificate yet");
    assert!(err.to_string().contains("no workload certificate"), "{err}");
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_lets_open_streams_finish() -> Result<()> {
    let m = mesh().await?;
    let echo = echo_server().await?;
    let addr = m.server.local_addr();
    let mut s = m.open(echo).await?;
    let Mesh { server, client, .. } = m;
    let shutdown = tokio::spawn(server.shutdown(Duration::from_secs(10)));
    // Wait until the listener is closed: a fresh connection is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener never closed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(roundtrip(&mut s, b"draining").await?, b"draining");
    assert!(!shutdown.is_finished());
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    drop(s);
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), shutdown).await??;
    Ok(())
}

type Frames = futures_util::stream::Iter<
    std::vec::IntoIter<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>>,
>;

/// A request body of `data` then trailers.
fn body_with_trailers(data: Vec<u8>, trailers: HeaderMap) -> http_body_util::StreamBody<Frames> {
    http_body_util::StreamBody::new(futures_util::stream::iter(vec![
        Ok(http_body::Frame::data(bytes::Bytes::from(data))),
        Ok(http_body::Frame::trailers(trailers)),
    ]))
}

/// Between two Isthmus agents a request is a stream of the pooled connection: the client
/// learns from a CONNECT answer that the peer takes them; a body larger than the stream's
/// window arrives whole with its trailers both ways; the agents' own headers reach the
/// handler as metadata and not as request headers; the application's `baggage` passes
/// untouched; the answer's connection-specific headers are dropped, not fatal.
#[tokio::test]
async fn direct_requests_carry_bodies_and_trailers_once_the_peer_says_it_takes_them() -> Result<()>
{
    use http_body_util::BodyExt;
    use isthmus_hbone::metadata::Baggage;
    use isthmus_hbone::request::{BAGGAGE_HEADER, TARGET_HEADER};
    let handler = TestHandler {
        takes: true,
        ..TestHandler::default()
    };
    let m = mesh_with(handler, ClientOptions::default()).await?;
    let echo = echo_server().await?;
    let dst = m.server.local_addr();
    assert!(!m.client.takes_requests(dst));
    let mut s = m.open(echo).await?;
    assert_eq!(roundtrip(&mut s, b"learn").await?, b"learn");
    assert!(m.client.takes_requests(dst), "the CONNECT answer said so");

    let source = Baggage {
        namespace: Some("default".into()),
        workload_type: Some("pod".into()),
        workload_name: Some("client-vm".into()),
        ..Baggage::default()
    };
    let data = pattern(6 * 1024 * 1024, 7);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-check", HeaderValue::from_static("abc"));
    let mut req = http::Request::builder()
        .method("POST")
        .uri("http://reviews.bookinfo:9080/reviews/1?x=1")
        .header("baggage", "app=mine")
        .body(body_with_trailers(data.clone(), trailers))?;
    req.headers_mut()
        .insert(BAGGAGE_HEADER, source.to_header_value().unwrap());
    let resp = m.client.request(dst, echo, &ids(&[SERVER_ID]), req).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-path"], "/reviews/1");
    assert_eq!(resp.headers()["x-target"], echo.to_string().as_str());
    assert!(!resp.headers().contains_key("connection"));
    let got = resp.into_body().collect().await?;
    let trailers = got.trailers().cloned().expect("trailers");
    assert_eq!(trailers["x-check"], "abc");
    assert_eq!(trailers["x-length"], data.len().to_string().as_str());
    let mut back = got.to_bytes().to_vec();
    back.reverse();
    assert!(back == data, "the body came back changed");

    let seen = m.handler.seen.lock().unwrap().clone();
    let direct = seen.last().expect("the handler saw the request");
    assert_eq!(direct.target, echo);
    assert_eq!(direct.peer_identity, CLIENT_ID);
    assert_eq!(direct.metadata.baggage, source);
    let headers = m.handler.request_headers.lock().unwrap()[0].clone();
    assert_eq!(headers["baggage"], "app=mine");
    for agent in isthmus_hbone::request::AGENT_HEADERS {
        assert!(!headers.contains_key(&agent), "{agent} reached the handler");
    }
    assert!(!headers.contains_key(TARGET_HEADER));
    // One connection carried the tunnel and the request.
    assert_eq!(m.client.pooled_connections().await, 1);
    Ok(())
}

/// A direct request passes the checks of a CONNECT: another address is refused (403, the
/// handler never sees it); a server that does not take requests answers 405 and the client
/// stops thinking it does.
#[tokio::test]
async fn direct_requests_are_checked_as_connects_and_refused_where_not_taken() -> Result<()> {
    let handler = TestHandler {
        takes: true,
        ..TestHandler::default()
    };
    let m = mesh_with(handler, ClientOptions::default()).await?;
    let echo = echo_server().await?;
    let other: SocketAddr = format!("127.0.0.2:{}", echo.port()).parse()?;
    let req = || {
        http::Request::builder()
            .uri("http://svc/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
    };
    match m
        .client
        .request(m.server.local_addr(), other, &ids(&[SERVER_ID]), req()?)
        .await
    {
        Err(HboneError::Rejected { status, reason, .. }) => {
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert!(reason.contains("does not match"), "{reason}");
        }
        other => anyhow::bail!("a request for another address was not refused: {other:?}"),
    }
    assert!(m.handler.seen.lock().unwrap().is_empty());

    let plain = mesh().await?;
    let dst = plain.server.local_addr();
    let mut s = plain.open(echo).await?;
    assert_eq!(roundtrip(&mut s, b"x").await?, b"x");
    assert!(!plain.client.takes_requests(dst));
    match plain
        .client
        .request(dst, echo, &ids(&[SERVER_ID]), req()?)
        .await
    {
        Err(HboneError::Rejected { status, reason, .. }) => {
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
            assert!(reason.contains("only CONNECT"), "{reason}");
        }
        other => anyhow::bail!("a server that takes no requests answered {other:?}"),
    }
    Ok(())
}
