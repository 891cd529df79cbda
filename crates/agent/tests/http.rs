//! The outbound proxy on HTTP ports, over real loopback sockets: real HTTP/1.1 and h2c
//! clients, real hyper backends, the discovery state decoded from xDS resources exactly as on
//! the network path (Istio's `Address` plus Isthmus's `ServiceTraffic`). Each test takes its
//! own 127.0.<block>.0/24. Endpoints are plain TCP (no agent on them), except where peer
//! agents' HBONE servers (the agent's own inbound handler) are started in front of them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_agent::proxy::l7::pool::UpstreamPool;
use isthmus_agent::proxy::l7::telemetry::IstioMetrics;
use isthmus_agent::proxy::l7::HttpOutbound;
use isthmus_agent::proxy::{
    metadata, LoadTracker, OrigDst, Outbound, OutboundConfig, ProxyMetrics, UnknownDestination,
};
use isthmus_hbone::{ClientOptions, HboneClient};
use isthmus_model::traffic::{PortProtocol, ServiceTraffic};
use isthmus_xds::client::{decode_cache, State};
use isthmus_xds::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use isthmus_xds::pb::isthmus::traffic::v1 as tpb;
use isthmus_xds::pb::istio::workload as wl;
use isthmus_xds::{ADDRESS_TYPE_URL, TRAFFIC_TYPE_URL};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

mod support;

const HOST: &str = "reviews.default.svc.cluster.local";
const SVC_KEY: &str = "default/reviews.default.svc.cluster.local";

fn loopback(block: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, block, host))
}

fn any<M: Message>(type_url: &str, m: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// One endpoint of `reviews`: its uid and where its app listens; `hbone`: an agent serves
/// it (identity `spiffe://cluster.local/ns/default/sa/reviews`).
struct Ep {
    uid: String,
    addr: SocketAddr,
    hbone: bool,
}

/// The state a subscriber holds after receiving `reviews` (VIP `vip`, port 9080), its
/// endpoints, and `traffic` (routes and rules, YAML of `ServiceTraffic` minus the names).
fn state(vip: IpAddr, eps: &[Ep], traffic_yaml: &str) -> Result<State> {
    let service = wl::Service {
        name: "reviews".into(),
        namespace: "default".into(),
        hostname: HOST.into(),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: ip_bytes(vip),
        }],
        ports: vec![wl::Port {
            service_port: 9080,
            target_port: 9080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    let mut resources = vec![Resource {
        name: SVC_KEY.into(),
        version: "1".into(),
        resource: Some(any(
            ADDRESS_TYPE_URL,
            &wl::Address {
                r#type: Some(wl::address::Type::Service(service)),
            },
        )),
        ..Default::default()
    }];
    for ep in eps {
        let mut services = BTreeMap::new();
        services.insert(
            SVC_KEY.to_string(),
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: 9080,
                    target_port: u32::from(ep.addr.port()),
                    app_protocol: 0,
                }],
            },
        );
        let w = wl::Workload {
            uid: ep.uid.clone(),
            name: ep.uid.clone(),
            namespace: "default".into(),
            addresses: vec![ip_bytes(ep.addr.ip())],
            tunnel_protocol: if ep.hbone {
                wl::TunnelProtocol::Hbone as i32
            } else {
                wl::TunnelProtocol::None as i32
            },
            trust_domain: "cluster.local".into(),
            service_account: "reviews".into(),
            services,
            status: wl::WorkloadStatus::Healthy as i32,
            canonical_name: "reviews".into(),
            canonical_revision: ep.uid.clone(),
            ..Default::default()
        };
        resources.push(Resource {
            name: ep.uid.clone(),
            version: "1".into(),
            resource: Some(any(
                ADDRESS_TYPE_URL,
                &wl::Address {
                    r#type: Some(wl::address::Type::Workload(w)),
                },
            )),
            ..Default::default()
        });
    }
    let mut t: ServiceTraffic = if traffic_yaml.trim().is_empty() {
        ServiceTraffic::default()
    } else {
        serde_yaml_ng::from_str(traffic_yaml)?
    };
    t.hostname = HOST.into();
    t.namespace = "default".into();
    t.ports.entry(9080).or_insert(PortProtocol::Http);
    let traffic = vec![Resource {
        name: SVC_KEY.into(),
        version: "1".into(),
        resource: Some(any(
            TRAFFIC_TYPE_URL,
            &tpb::ServiceTraffic {
                name: SVC_KEY.into(),
                config_json: serde_json::to_string(&t)?,
            },
        )),
        ..Default::default()
    }];
    let mut bytes = b"isthmus-xds-cache v1\n".to_vec();
    for (type_url, resources) in [(ADDRESS_TYPE_URL, resources), (TRAFFIC_TYPE_URL, traffic)] {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources,
            ..Default::default()
        }
        .encode_length_delimited(&mut bytes)?;
    }
    Ok(decode_cache(std::path::Path::new("test-state"), &bytes)?)
}

/// How a backend answers.
#[derive(Clone, Default)]
struct Behaviour {
    /// Every `n`th request (1-based) answers 503.
    fail_every: Option<usize>,
    /// Every request answers this status.
    status: Option<u16>,
    /// Each answer waits this long.
    delay: Option<Duration>,
}

struct Backend {
    name: String,
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

/// An HTTP/1.1 + h2c server that answers with its name (body and `x-backend`), or a gRPC
/// answer (`grpc-status: 0` in trailers) to `application/grpc` requests.
async fn backend(ip: IpAddr, name: &str, b: Behaviour) -> Result<Backend> {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
    let addr = l.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let (n, who) = (hits.clone(), name.to_string());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let (n, who, b) = (n.clone(), who.clone(), b.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (n, who, b) = (n.clone(), who.clone(), b.clone());
                    async move {
                        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        let seen_path = req.uri().path().to_string();
                        let user = req
                            .headers()
                            .get("x-mesh")
                            .map(|v| v.to_str().unwrap_or("").to_string())
                            .unwrap_or_default();
                        let _ = req.into_body().collect().await;
                        if let Some(d) = b.delay {
                            tokio::time::sleep(d).await;
                        }
                        let status = match (b.status, b.fail_every) {
                            (Some(s), _) => s,
                            (None, Some(k)) if i % k == 0 => 503,
                            _ => 200,
                        };
                        let body = format!("{who} {seen_path} {user}");
                        let mut resp = if grpc {
                            let frames = http_body_util::StreamBody::new(futures_stream(body));
                            let mut r = Response::new(frames.boxed());
                            r.headers_mut()
                                .insert("content-type", "application/grpc".parse().unwrap());
                            r
                        } else {
                            Response::new(
                                Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed(),
                            )
                        };
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                        resp.headers_mut().insert("x-backend", who.parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(Backend {
        name: name.into(),
        addr,
        hits,
    })
}

type Frames = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<http_body::Frame<Bytes>, Infallible>> + Send + Sync>,
>;

/// A gRPC body: one message, then `grpc-status: 0` trailers.
fn futures_stream(body: String) -> Frames {
    let mut msg = vec![0u8];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes());
    msg.extend_from_slice(body.as_bytes());
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    Box::pin(futures::stream::iter(vec![
        Ok(http_body::Frame::data(Bytes::from(msg))),
        Ok(http_body::Frame::trailers(trailers)),
    ]))
}

/// An outbound listener whose every connection "was going to" `vip:9080`, with the HTTP side.
struct Proxy {
    addr: SocketAddr,
    state: watch::Sender<Arc<State>>,
    metrics: Arc<IstioMetrics>,
}

async fn proxy(vip: IpAddr) -> Result<Proxy> {
    // No credentials: every endpoint here is plain TCP.
    proxy_with(vip, watch::channel(None).1, 1, true).await
}

/// [`proxy`] with HBONE: `creds` for the client side, peers' HBONE servers on `hbone_port`,
/// requests sent directly on HBONE to peers that take them when `direct`.
async fn proxy_with(
    vip: IpAddr,
    creds: isthmus_hbone::CredentialsWatch,
    hbone_port: u16,
    direct: bool,
) -> Result<Proxy> {
    let (state, state_rx) = watch::channel(Arc::new(State::default()));
    let dst = SocketAddr::new(vip, 9080);
    let orig: Arc<dyn OrigDst> =
        Arc::new(move |_: &TcpStream| -> io::Result<SocketAddr> { Ok(dst) });
    let hbone = HboneClient::new(creds, ClientOptions::default());
    let metrics = Arc::new(IstioMetrics::default());
    let http = Arc::new(HttpOutbound::new(
        state_rx.clone(),
        UpstreamPool::new(
            hbone.clone(),
            hbone_port,
            isthmus_socket::SocketFactory::unmarked(),
            Duration::from_secs(2),
            direct,
        ),
        metrics.clone(),
        metadata::unknown(),
    ));
    let outbound = Outbound::new(
        OutboundConfig {
            unknown: UnknownDestination::Refuse,
            hbone_port,
            ..OutboundConfig::default()
        },
        state_rx,
        hbone,
        orig,
        Arc::new(LoadTracker::default()),
        Arc::new(ProxyMetrics::default()),
    )
    .with_http(http);
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(outbound.serve(l));
    Ok(Proxy {
        addr,
        state,
        metrics,
    })
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An HTTP/1.1 keep-alive client connection through the proxy.
async fn h1(proxy: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Body>> {
    let s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// An h2c (prior knowledge) client connection through the proxy.
async fn h2(proxy: SocketAddr) -> Result<hyper::client::conn::http2::SendRequest<Body>> {
    let s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(send)
}

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header("host", "reviews:9080")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

/// Sends on `c`, returns (status, x-backend, body).
async fn call(
    c: &mut hyper::client::conn::http1::SendRequest<Body>,
    req: Request<Body>,
) -> Result<(u16, String, String)> {
    c.ready().await?;
    let resp = c.send_request(req).await?;
    let status = resp.status().as_u16();
    let who = resp
        .headers()
        .get("x-backend")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, who, String::from_utf8_lossy(&body).into_owned()))
}

fn eps(backends: &[&Backend]) -> Vec<Ep> {
    backends
        .iter()
        .map(|b| Ep {
            uid: b.name.clone(),
            addr: b.addr,
            hbone: false,
        })
        .collect()
}

#[tokio::test]
async fn weighted_split_lands_within_3_points_and_a_header_match_sends_a_user_to_v2() -> Result<()>
{
    let vip = loopback(61, 100);
    let v1 = backend(loopback(61, 1), "v1", Behaviour::default()).await?;
    let v2 = backend(loopback(61, 2), "v2", Behaviour::default()).await?;
    let p = proxy(vip).await?;
    p.state.send_replace(Arc::new(state(
        vip,
        &eps(&[&v1, &v2]),
        r#"
virtualService: default/reviews
http:
- match: [{headers: {end-user: {exact: jason}}}]
  route: [{destination: {host: reviews.default.svc.cluster.local, subset: v2}}]
  headers: {request: {set: {x-mesh: routed}}}
- route:
  - {destination: {host: reviews.default.svc.cluster.local, subset: v1}, weight: 90}
  - {destination: {host: reviews.default.svc.cluster.local, subset: v2}, weight: 10}
destinationRule: default/reviews
subsets:
- {name: v1, workloads: [v1]}
- {name: v2, workloads: [v2]}
"#,
    )?));
    let mut c = h1(p.addr).await?;
    let mut to_v2 = 0;
    for _ in 0..2000 {
        let (status, who, _) = call(&mut c, get("/reviews/1")).await?;
        assert_eq!(status, 200);
        if who == "v2" {
            to_v2 += 1;
        }
    }
    let pct = to_v2 as f64 / 20.0;
    assert!(
        (7.0..=13.0).contains(&pct),
        "v2 got {pct}% of 2,000 requests"
    );
    for _ in 0..20 {
        let mut req = get("/reviews/1");
        req.headers_mut().insert("end-user", "jason".parse()?);
        let (status, who, body) = call(&mut c, req).await?;
        assert_eq!((status, who.as_str()), (200, "v2"));
        assert!(
            body.ends_with("routed"),
            "the route's header was not set: {body}"
        );
    }
    // Both reporters' names: the source side reports every request with its code.
    assert_eq!(p.metrics.count(200, "-"), 2020);
    Ok(())
}

/// A connection keeps what it looked up for a destination while the discovery state is the
/// same: a new state (endpoints gone and added, a subset moved) reaches the next request on
/// the same keep-alive connection.
#[tokio::test]
async fn a_new_discovery_state_reaches_the_next_request_on_the_same_connection() -> Result<()> {
    let vip = loopback(61, 110);
    let v1 = backend(loopback(61, 11), "v1", Behaviour::default()).await?;
    let v2 = backend(loopback(61, 12), "v2", Behaviour::default()).await?;
    let p = proxy(vip).await?;
    let mut c: Option<hyper::client::conn::http1::SendRequest<Body>> = None;
    // Each state in turn, then five requests on the one connection, all to `to`.
    let subset_to = |w: &str| {
        format!(
            r#"
virtualService: default/reviews
http:
- route: [{{destination: {{host: reviews.default.svc.cluster.local, subset: only}}}}]
destinationRule: default/reviews
subsets:
- {{name: only, workloads: [{w}]}}
"#
        )
    };
    let steps = [
        ("v1 alone", state(vip, &eps(&[&v1]), "")?, "v1"),
        (
            "v1 gone, v2 in its place",
            state(vip, &eps(&[&v2]), "")?,
            "v2",
        ),
        (
            "both, a subset of v1",
            state(vip, &eps(&[&v1, &v2]), &subset_to("v1"))?,
            "v1",
        ),
        (
            "both, the subset moved to v2",
            state(vip, &eps(&[&v1, &v2]), &subset_to("v2"))?,
            "v2",
        ),
    ];
    for (what, st, to) in steps {
        p.state.send_replace(Arc::new(st));
        let c = match &mut c {
            Some(c) => c,
            None => c.insert(h1(p.addr).await?),
        };
        for _ in 0..5 {
            let (status, who, _) = call(c, get("/r")).await?;
            assert_eq!((status, who.as_str()), (200, to), "{what}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn retries_hide_an_endpoint_failing_one_request_in_three() -> Result<()> {
    let vip = loopback(62, 100);
    let flaky = backend(
        loopback(62, 1),
        "flaky",
        Behaviour {
            fail_every: Some(3),
            ..Default::default()
        },
    )
    .await?;
    let good = backend(loopback(62, 2), "good", Behaviour::default()).await?;
    let p = proxy(vip).await?;
    p.state.send_replace(Arc::new(state(
        vip,
        &eps(&[&flaky, &good]),
        r#"
virtualService: default/reviews
http:
- route: [{destination: {host: reviews.default.svc.cluster.local}}]
  retries: {attempts: 3, retryOn: "5xx"}
destinationRule: default/reviews
trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"#,
    )?));
    let mut c = h1(p.addr).await?;
    for i in 0..300 {
        let (status, _, _) = call(&mut c, get("/")).await?;
        assert_eq!(status, 200, "request {i} reached the client as {status}");
    }
    // Round robin gives the flaky endpoint its share: a third of those fail, and the client
    // never sees it.
    let flaky_hits = flaky.hits.load(Ordering::SeqCst);
    assert!(
        flaky_hits >= 100,
        "the flaky endpoint got {flaky_hits} requests"
    );
    Ok(())
}

#[tokio::test]
async fn with_every_endpoint_failing_the_retry_budget_caps_upstream_attempts() -> Result<()> {
    let vip = loopback(63, 100);
    let bad: Vec<Backend> = futures::future::try_join_all((1..=3).map(|i| {
        backend(
            loopback(63, i),
            ["a", "b", "c"][i as usize - 1],
            Behaviour {
                status: Some(503),
                ..Default::default()
            },
        )
    }))
    .await?;
    let p = proxy(vip).await?;
    p.state.send_replace(Arc::new(state(
        vip,
        &eps(&bad.iter().collect::<Vec<_>>()),
        r#"
virtualService: default/reviews
http:
- route: [{destination: {host: reviews.default.svc.cluster.local}}]
  retries: {attempts: 10, retryOn: "5xx"}
"#,
    )?));
    let mut c = h1(p.addr).await?;
    let n = 500;
    for _ in 0..n {
        let (status, _, _) = call(&mut c, get("/")).await?;
        assert_eq!(status, 503);
    }
    let upstream: usize = bad.iter().map(|b| b.hits.load(Ordering::SeqCst)).sum();
    // Without a budget: 11 attempts each, 5,500. With it: the requests, plus 20% of them,
    // plus the floor of 10 retries a second.
    assert!(
        upstream <= n + n / 5 + 10 * 10 + 5,
        "{upstream} upstream attempts for {n} requests"
    );
    assert!(upstream > n, "no retry was made at all");
    assert!(p.metrics.budget_exhausted.get() > 0);
    assert!(p.metrics.count(503, "URX") > 0);
    Ok(())
}

#[tokio::test]
async fn per_try_timeout_and_timeout_answer_504_at_the_configured_time() -> Result<()> {
    let vip = loopback(64, 100);
    let slow = backend(
        loopback(64, 1),
        "slow",
        Behaviour {
            delay: Some(Duration::from_secs(2)),
            ..Default::default()
        },
    )
    .await?;
    let p = proxy(vip).await?;
    p.state.send_replace(Arc::new(state(
        vip,
        &eps(&[&slow]),
        r#"
virtualService: default/reviews
http:
- match: [{uri: {prefix: /try}}]
  route: [{destination: {host: reviews.default.svc.cluster.local}}]
  retries: {attempts: 1, perTryTimeout: 200ms, retryOn: "5xx"}
- route: [{destination: {host: reviews.default.svc.cluster.local}}]
  timeout: 300ms
"#,
    )?));
    let mut c = h1(p.addr).await?;
    let t = Instant::now();
    let (status, _, _) = call(&mut c, get("/whole")).await?;
    let took = t.elapsed();
    assert_eq!(status, 504);
    assert!(
        (Duration::from_millis(280)..Duration::from_millis(1000)).contains(&took),
        "timeout 300ms answered after {took:?}"
    );
    let mut c = h1(p.addr).await?;
    let t = Instant::now();
    let (status, _, _) = call(&mut c, get("/try")).await?;
    let took = t.elapsed();
    assert_eq!(status, 504);
    // Two tries of 200 ms each.
    assert!(
        (Duration::from_millis(380)..Duration::from_millis(1200)).contains(&took),
        "two tries of 200ms answered after {took:?}"
    );
    assert!(p.metrics.count(504, "UT") >= 2);
    Ok(())
}

#[tokio::test]
async fn fault_abort_at_50_percent_gives_about_half_503s() -> Result<()> {
    let vip = loopback(65, 100);
    let b = backend(loopback(65, 1), "b", Behaviour::default()).await?;
    let p = proxy(vip).await?;
    p.state.send_replace(Arc::new(state(
        vip,
        &eps(&[&b]),
        r#"
virtualService: default/reviews
http:
- route: [{destination: {host: reviews.default.svc.cluster.local}}]
  fault: {abort: {percentage: {value: 50}, httpStatus: 503}}
"#,
    )?));
    let mut c = h1(p.addr).await?;
    let mut aborted = 0;
    for _ in 0..1000 {
        let (status, _, _) = call(&mut c, get("/")).await?;
        if status == 503 {
            aborted += 1;
        }
    }
    assert!((430..=570).contains(&aborted), "{aborted} of 1000 aborted");
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        1000 - aborted,
        "an aborted request went upstream"
    );
    assert_eq!(p.metrics.count(503, "FI"), aborted as u64);
    Ok(())
}

#[tokio::test]
async fn outlier_detection_ejects_a_failing_endpoint_and_returns_it_after_base_ejection_time(
) -> Result<()> {
    let vip = loopback(66, 100);
    let bad = backend(
        loopback(66, 1),
        "bad",
        Behaviour {
            status: Some(500),
            ..Default::default()
        },
    )
    .await?;
    let good = backend(loopback(66, 2), "good", Behaviour::default()).await?;
    let p = proxy(vip).await?;
    p.state.send_replace(Arc::new(state(
        vip,
        &eps(&[&bad, &good]),
        r#"
virtualService: default/reviews
http:
- route: [{destination: {host: reviews.default.svc.cluster.local}}]
  retries: {attempts: 0}
destinationRule: default/reviews
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  outlierDetection: {consecutive5xxErrors: 3, interval: 10s, baseEjectionTime: 1s, maxEjectionPercent: 50}
"#,
    )?));
    let mut c = h1(p.addr).await?;
    // Round robin: the bad endpoint answers every other request until its third 500.
    for _ in 0..6 {
        call(&mut c, get("/")).await?;
    }
    let bad_hits = bad.hits.load(Ordering::SeqCst);
    assert_eq!(bad_hits, 3);
    for _ in 0..50 {
        let (status, who, _) = call(&mut c, get("/")).await?;
        assert_eq!(
            (status, who.as_str()),
            (200, "good"),
            "an ejected endpoint answered"
        );
    }
    assert_eq!(bad.hits.load(Ordering::SeqCst), bad_hits);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..4 {
        call(&mut c, get("/")).await?;
    }
    assert!(
        bad.hits.load(Ordering::SeqCst) > bad_hits,
        "not back after baseEjectionTime"
    );
    Ok(())
}

#[tokio::test]
async fn unary_grpc_calls_on_one_client_connection_spread_over_three_endpoints() -> Result<()> {
    let vip = loopback(67, 100);
    let bs: Vec<Backend> = futures::future::try_join_all((1..=3).map(|i| {
        backend(
            loopback(67, i),
            ["g1", "g2", "g3"][i as usize - 1],
            Behaviour::default(),
        )
    }))
    .await?;
    let p = proxy(vip).await?;
    p.state.send_replace(Arc::new(state(
        vip,
        &eps(&bs.iter().collect::<Vec<_>>()),
        "ports: {9080: grpc}\n",
    )?));
    let mut c = h2(p.addr).await?;
    for _ in 0..300 {
        let req = Request::post("http://reviews:9080/pkg.Reviews/Get")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")).boxed())?;
        c.ready().await?;
        let resp = c.send_request(req).await?;
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
    }
    let hits: Vec<usize> = bs.iter().map(|b| b.hits.load(Ordering::SeqCst)).collect();
    assert_eq!(hits.iter().sum::<usize>(), 300);
    // Balanced per call, not per connection (which would put all 300 on one endpoint). The
    // default balancer weighs latency, so the split need not be even: every endpoint is
    // tried, and none takes four fifths.
    assert!(
        hits.iter().all(|&h| (1..240).contains(&h)),
        "300 calls on one HTTP/2 connection spread as {hits:?}"
    );
    Ok(())
}

#[tokio::test]
async fn tcp_ports_and_non_http_bytes_are_spliced_as_before() -> Result<()> {
    let vip = loopback(68, 100);
    // An echo server: not HTTP.
    let l = TcpListener::bind(SocketAddr::new(loopback(68, 1), 0)).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let p = proxy(vip).await?;
    for ports in [
        "ports: {9080: tcp}\n",
        "ports: {9080: http}\n",
        "ports: {9080: undeclared}\n",
    ] {
        p.state.send_replace(Arc::new(state(
            vip,
            &[Ep {
                uid: "echo".into(),
                addr,
                hbone: false,
            }],
            ports,
        )?));
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(p.addr).await?;
        s.write_all(b"\x16\x03\x01 not http at all").await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await??;
        assert_eq!(back, b"\x16\x03\x01 not http at all", "{ports}");
    }
    Ok(())
}

/// Peer agents' HBONE servers (the agent's inbound handler, HTTP served per request) on each
/// backend's address, all on one port; returns them and the port.
async fn peer_agents(
    ca: &support::TestCa,
    backends: &[&Backend],
    state: watch::Receiver<Arc<State>>,
    metrics: Arc<IstioMetrics>,
) -> Result<(Vec<isthmus_hbone::ServerHandle>, u16)> {
    let port = TcpListener::bind(SocketAddr::new(backends[0].addr.ip(), 0))
        .await?
        .local_addr()?
        .port();
    let mut servers = Vec::new();
    for b in backends {
        let policy = isthmus_agent::proxy::InboundPolicy::new(
            isthmus_agent::proxy::InboundConfig::default(),
            state.clone(),
            Arc::new(ProxyMetrics::default()),
        )
        .with_http(metrics.clone());
        let server = isthmus_hbone::HboneServer::bind(
            SocketAddr::new(b.addr.ip(), port),
            ca.issue("spiffe://cluster.local/ns/default/sa/reviews")?,
            policy,
            isthmus_hbone::ServerOptions::default(),
        )
        .await?
        .spawn()?;
        servers.push(server);
    }
    Ok((servers, port))
}

/// To peers that are agents, HTTP/1.1 requests and gRPC calls go as streams of the HBONE
/// connection itself once the first tunnel's answer said the peer takes them: every call is
/// answered (gRPC trailers included), spread over both peers, and counted by the peer agents
/// (`reporter="destination"`); only the first connection to each peer is a CONNECT. With
/// direct requests turned off, every request is tunnelled as before.
#[tokio::test]
async fn requests_to_peer_agents_go_directly_on_hbone_after_the_first_tunnel() -> Result<()> {
    let vip = loopback(69, 100);
    let v1 = backend(loopback(69, 1), "v1", Behaviour::default()).await?;
    let v2 = backend(loopback(69, 2), "v2", Behaviour::default()).await?;
    let ca = support::TestCa::new()?;
    let hbone_eps = || {
        [&v1, &v2]
            .iter()
            .map(|b| Ep {
                uid: b.name.clone(),
                addr: b.addr,
                hbone: true,
            })
            .collect::<Vec<_>>()
    };
    let client_creds = ca.issue("spiffe://cluster.local/ns/default/sa/productpage")?;
    for direct in [true, false] {
        let in_metrics = Arc::new(IstioMetrics::default());
        let (state_tx, state_rx) = watch::channel(Arc::new(state(vip, &hbone_eps(), "")?));
        let (servers, port) = peer_agents(&ca, &[&v1, &v2], state_rx, in_metrics.clone()).await?;
        let p = proxy_with(vip, client_creds.clone(), port, direct).await?;
        p.state.send_replace(state_tx.borrow().clone());

        // HTTP/1.1, one keep-alive client connection.
        let mut c = h1(p.addr).await?;
        for _ in 0..100 {
            let (status, who, _) = call(&mut c, get("/reviews/1")).await?;
            assert_eq!(status, 200, "through {who}");
        }
        // gRPC, one h2c client connection; the port is declared grpc on both sides.
        let grpc = state(vip, &hbone_eps(), "ports: {9080: grpc}\n")?;
        state_tx.send_replace(Arc::new(grpc.clone()));
        p.state.send_replace(Arc::new(grpc));
        let mut g = h2(p.addr).await?;
        for _ in 0..100 {
            let req = Request::post("http://reviews:9080/pkg.Reviews/Get")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")).boxed())?;
            g.ready().await?;
            let resp = g.send_request(req).await?;
            assert_eq!(resp.status(), 200);
            let collected = resp.into_body().collect().await?;
            let trailers = collected.trailers().cloned().unwrap_or_default();
            assert_eq!(
                trailers.get("grpc-status").map(|v| v.as_bytes()),
                Some(&b"0"[..]),
                "direct: {direct}"
            );
        }
        let (streams, requests): (u64, u64) = servers
            .iter()
            .map(|s| (s.stats().streams(), s.stats().requests()))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert_eq!(p.metrics.count(200, "-"), 200, "direct: {direct}");
        assert_eq!(in_metrics.count(200, "-"), 200, "direct: {direct}");
        assert!(v1.hits.load(Ordering::SeqCst) > 0 && v2.hits.load(Ordering::SeqCst) > 0);
        if direct {
            // One CONNECT per peer and protocol at most; everything else went direct.
            let tunnels = streams - requests;
            assert!(
                tunnels <= 4 && requests >= 196,
                "{streams} streams, {requests} direct requests"
            );
        } else {
            assert_eq!(
                requests, 0,
                "direct requests were sent with them turned off"
            );
            assert!(streams >= 2);
        }
    }
    Ok(())
}

#[tokio::test]
async fn each_request_has_an_access_log_line_with_its_method_authority_path_status_and_flags(
) -> Result<()> {
    let log = &support::access_logs().1;
    let vip = loopback(70, 100);
    let b = backend(loopback(70, 1), "b", Behaviour::default()).await?;
    let p = proxy(vip).await?;
    p.state.send_replace(Arc::new(state(
        vip,
        &eps(&[&b]),
        r#"
virtualService: default/reviews
http:
- match: [{uri: {prefix: /aborted}}]
  route: [{destination: {host: reviews.default.svc.cluster.local}}]
  fault: {abort: {percentage: {value: 100}, httpStatus: 503}}
- route: [{destination: {host: reviews.default.svc.cluster.local}}]
"#,
    )?));
    let mut c = h1(p.addr).await?;
    assert_eq!(call(&mut c, get("/ok?x=1")).await?.0, 200);
    assert_eq!(call(&mut c, get("/aborted")).await?.0, 503);
    let upstream = b.addr.to_string();
    let lines: Vec<serde_json::Value> = log
        .text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["service"] == HOST && v["fields"]["src"].as_str().is_some())
        .filter(|v| {
            v["fields"]["upstream"] == upstream.as_str() || v["fields"]["path"] == "/aborted"
        })
        .collect();
    let ok = lines
        .iter()
        .find(|v| v["fields"]["path"] == "/ok")
        .unwrap_or_else(|| panic!("no line for /ok among {lines:#?}"));
    assert_eq!(ok["fields"]["method"], "GET");
    assert_eq!(ok["fields"]["authority"], "reviews:9080");
    assert_eq!(ok["fields"]["status"], 200);
    assert_eq!(ok["fields"]["flags"], "-");
    assert_eq!(ok["fields"]["direction"], "outbound");
    let aborted = lines
        .iter()
        .find(|v| v["fields"]["path"] == "/aborted")
        .unwrap_or_else(|| panic!("no line for /aborted among {lines:#?}"));
    assert_eq!(aborted["fields"]["status"], 503);
    assert_eq!(aborted["fields"]["flags"], "FI");
    assert_eq!(aborted["fields"]["upstream"], "-");
    Ok(())
}

/// How [`raw_backend`] answers.
#[derive(Clone, Copy, PartialEq)]
enum Raw {
    /// 200 whose body is the request as received (head and body), then the next request.
    Echo,
    /// As `Echo`, then closes the connection without saying so (an idle timeout).
    EchoOnce,
    /// By path: `/chunked` a chunked body, `/close` a body ended by closing, `/garbage` no
    /// HTTP at all, anything else `Echo` (`HEAD`: the length of the echo, no body).
    Framings,
}

/// An HTTP/1.1 server written on the socket, to see requests byte for byte. Returns its
/// address and how many connections it accepted.
async fn raw_backend(ip: IpAddr, mode: Raw) -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
    let addr = l.local_addr()?;
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = read_head(&mut s, &mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let len = header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
                    while buf.len() < end + len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let echo = String::from_utf8_lossy(&buf[..end + len]).into_owned();
                    buf.drain(..end + len);
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let out = match (mode, path.as_str()) {
                        (Raw::Framings, "/chunked") => {
                            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_string()
                        }
                        (Raw::Framings, "/close") => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
                            return;
                        }
                        (Raw::Framings, "/garbage") => {
                            let _ = s.write_all(b"this is not HTTP\r\n\r\n").await;
                            return;
                        }
                        _ if head.starts_with("HEAD ") => format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                            echo.len()
                        ),
                        _ => format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{echo}",
                            echo.len()
                        ),
                    };
                    if s.write_all(out.as_bytes()).await.is_err() || mode == Raw::EchoOnce {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, conns))
}

/// Reads until `buf` holds a whole head; its length, or `None` at the end of the stream.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The first value of `name` (any case) in a message head.
fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads one response from a raw client connection: (status, head, body). Bodies framed by
/// length, by chunks, or (`to_end`) by the end of the stream; a `HEAD` response has none.
async fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> Result<(u16, String, String)> {
    let end = read_head(s, buf)
        .await
        .ok_or_else(|| anyhow::anyhow!("the connection ended before a response"))?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let status: u16 = head[9..12].parse()?;
    let body = if head_request {
        Vec::new()
    } else if let Some(len) = header(&head, "content-length") {
        let len: usize = len.parse()?;
        while buf.len() < len {
            anyhow::ensure!(more(s, buf).await? > 0, "the body ended early");
        }
        buf.drain(..len).collect()
    } else if header(&head, "transfer-encoding") == Some("chunked") {
        let mut body = Vec::new();
        loop {
            while !buf.windows(2).any(|w| w == b"\r\n") {
                anyhow::ensure!(more(s, buf).await? > 0, "a chunk ended early");
            }
            let line = buf.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line])?.trim(), 16)?;
            while buf.len() < line + 2 + size + 2 {
                anyhow::ensure!(more(s, buf).await? > 0, "a chunk ended early");
            }
            body.extend_from_slice(&buf[line + 2..line + 2 + size]);
            buf.drain(..line + 2 + size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        while more(s, buf).await? > 0 {}
        std::mem::take(buf)
    };
    Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
}

/// Reads what comes next into `buf`: how much (0 at the end of the stream).
async fn more(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// A route to `reviews` that never retries: a failed attempt reaches the client as it is.
const NO_RETRIES: &str = r#"
virtualService: default/reviews
http:
- route: [{destination: {host: reviews.default.svc.cluster.local}}]
  retries: {attempts: 0}
"#;

/// The proxy for `reviews` at 127.0.`block`.100 with one endpoint, a [`raw_backend`] in
/// `mode`, under `traffic`; also the backend's count of connections.
async fn raw_setup(block: u8, mode: Raw, traffic: &str) -> Result<(Proxy, Arc<AtomicUsize>)> {
    let vip = loopback(block, 100);
    let (addr, conns) = raw_backend(loopback(block, 1), mode).await?;
    let p = proxy(vip).await?;
    let ep = Ep {
        uid: "raw".into(),
        addr,
        hbone: false,
    };
    p.state.send_replace(Arc::new(state(vip, &[ep], traffic)?));
    Ok((p, conns))
}

async fn raw_client(p: &Proxy) -> Result<TcpStream> {
    let s = TcpStream::connect(p.addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

#[tokio::test]
async fn http11_is_relayed_with_hop_by_hop_fields_dropped_and_the_trace_continued() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let (p, _) = raw_setup(71, Raw::Echo, "").await?;
    let mut c = raw_client(&p).await?;
    // Two requests in one write (pipelined), the second with a body.
    c.write_all(
        b"GET /a?x=1 HTTP/1.1\r\nHost: reviews:9080\r\nX-Case-Kept: yes\r\n\
          Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: secret\r\n\
          TE: gzip\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n\
          POST /b HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await?;
    let mut buf = Vec::new();
    let (status, _, seen) = read_response(&mut c, &mut buf, false).await?;
    assert_eq!(status, 200, "{seen}");
    assert!(
        seen.starts_with("GET /a?x=1 HTTP/1.1\r\n"),
        "the request line goes as sent: {seen}"
    );
    // Relayed, not re-made: the field's case is as the application wrote it.
    assert!(seen.contains("\r\nX-Case-Kept: yes\r\n"), "{seen}");
    assert!(seen.contains("\r\nHost: reviews:9080\r\n"), "{seen}");
    for gone in ["connection", "keep-alive", "proxy-authorization", "te"] {
        assert!(
            header(&seen, gone).is_none(),
            "{gone} went upstream: {seen}"
        );
    }
    let trace = header(&seen, "traceparent").unwrap_or_default();
    assert!(
        trace.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && trace.ends_with("-01"),
        "the trace goes on: {seen}"
    );
    assert!(
        !trace.contains("b7ad6b7169203331"),
        "with a new span: {trace}"
    );
    assert_eq!(seen.matches("traceparent").count(), 1, "{seen}");
    let (status, _, seen) = read_response(&mut c, &mut buf, false).await?;
    assert_eq!(status, 200, "{seen}");
    assert!(seen.starts_with("POST /b HTTP/1.1\r\n"), "{seen}");
    assert!(seen.ends_with("\r\n\r\nhello"), "the body follows: {seen}");
    assert!(
        header(&seen, "traceparent").is_some_and(|t| t.len() == 55),
        "a new trace: {seen}"
    );
    assert_eq!(p.metrics.count(200, "-"), 2);
    Ok(())
}

#[tokio::test]
async fn an_idle_upstream_connection_the_backend_closed_is_not_used_again() -> Result<()> {
    // No retries: a request sent on the closed connection would reach the client as 503.
    let (p, conns) = raw_setup(72, Raw::EchoOnce, NO_RETRIES).await?;
    let mut c = h1(p.addr).await?;
    for i in 0..5 {
        let (status, _, body) = call(&mut c, get("/again")).await?;
        assert_eq!(status, 200, "request {i}: {body}");
        // The backend's close reaches the proxy.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        5,
        "one connection per request"
    );
    assert_eq!(p.metrics.count(200, "-"), 5);
    Ok(())
}

#[tokio::test]
async fn a_request_the_relay_does_not_take_hands_the_connection_to_hyper_in_order() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let (p, _) = raw_setup(73, Raw::Echo, "").await?;
    let mut c = raw_client(&p).await?;
    let mut buf = Vec::new();
    // Relayed: the case of the fields is kept.
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: reviews:9080\r\nX-Case: a\r\n\r\n")
        .await?;
    let (status, _, seen) = read_response(&mut c, &mut buf, false).await?;
    assert_eq!(status, 200);
    assert!(seen.contains("\r\nX-Case: a\r\n"), "{seen}");
    // A body larger than a retry keeps is hyper's: it and the request after it, on the same
    // connection, are answered in order, by hyper (which writes field names in lower case).
    let big = "x".repeat(70_000);
    c.write_all(
        format!(
            "POST /2 HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: {}\r\n\r\n{big}\
             GET /3 HTTP/1.1\r\nHost: reviews:9080\r\nX-Case: c\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await?;
    let (status, _, seen) = read_response(&mut c, &mut buf, false).await?;
    assert_eq!(status, 200, "{seen}");
    assert!(seen.starts_with("POST /2 "), "{seen}");
    assert!(
        seen.ends_with(&format!("\r\n\r\n{big}")),
        "the body went whole"
    );
    let (status, _, seen) = read_response(&mut c, &mut buf, false).await?;
    assert_eq!(status, 200, "{seen}");
    assert!(seen.starts_with("GET /3 "), "{seen}");
    assert!(seen.contains("\r\nx-case: c\r\n"), "by hyper: {seen}");
    assert_eq!(p.metrics.count(200, "-"), 3);
    Ok(())
}

#[tokio::test]
async fn upstream_responses_are_relayed_as_they_are_framed() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let (p, _) = raw_setup(74, Raw::Framings, NO_RETRIES).await?;
    let mut c = raw_client(&p).await?;
    let mut buf = Vec::new();
    let req = |m: &str, path: &str| format!("{m} {path} HTTP/1.1\r\nHost: reviews:9080\r\n\r\n");
    c.write_all(req("GET", "/chunked").as_bytes()).await?;
    let (status, head, body) = read_response(&mut c, &mut buf, false).await?;
    assert_eq!((status, body.as_str()), (200, "hello world"), "{head}");
    c.write_all(req("HEAD", "/len").as_bytes()).await?;
    let (status, head, _) = read_response(&mut c, &mut buf, true).await?;
    assert_eq!(status, 200);
    assert!(header(&head, "content-length").is_some(), "{head}");
    // Not HTTP from the upstream: 503, and the client's connection goes on.
    c.write_all(req("GET", "/garbage").as_bytes()).await?;
    let (status, _, body) = read_response(&mut c, &mut buf, false).await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("malformed response head"), "{body}");
    // A body that ends when the upstream closes ends the client's connection too.
    c.write_all(req("GET", "/close").as_bytes()).await?;
    let (status, _, body) = read_response(&mut c, &mut buf, false).await?;
    assert_eq!((status, body.as_str()), (200, "until the end"));
    assert_eq!(p.metrics.count(200, "-"), 3);
    assert_eq!(p.metrics.count(503, "UC"), 1);
    Ok(())
}

/// Whether the client relay or hyper carries a request must not skew a split: the relay
/// hands a connection to hyper at a request it cannot carry (here, one of the destinations
/// edits headers), and hyper draws the destination again.
#[tokio::test]
async fn a_split_whose_destinations_differ_in_what_they_need_lands_as_weighted() -> Result<()> {
    let vip = loopback(75, 100);
    let v1 = backend(loopback(75, 1), "v1", Behaviour::default()).await?;
    let v2 = backend(loopback(75, 2), "v2", Behaviour::default()).await?;
    let p = proxy(vip).await?;
    p.state.send_replace(Arc::new(state(
        vip,
        &eps(&[&v1, &v2]),
        r#"
virtualService: default/reviews
http:
- route:
  - {destination: {host: reviews.default.svc.cluster.local, subset: v1}, weight: 50}
  - destination: {host: reviews.default.svc.cluster.local, subset: v2}
    weight: 50
    headers: {request: {set: {x-mesh: edited}}}
destinationRule: default/reviews
subsets:
- {name: v1, workloads: [v1]}
- {name: v2, workloads: [v2]}
"#,
    )?));
    // One request per connection: each is a connection's first, where a hand-over decided by
    // the draw would show (v1 would get three quarters).
    let mut to_v2 = 0;
    for _ in 0..600 {
        let mut c = h1(p.addr).await?;
        let (status, who, body) = call(&mut c, get("/r")).await?;
        assert_eq!(status, 200);
        if who == "v2" {
            assert!(body.ends_with("edited"), "v2's header edit: {body}");
            to_v2 += 1;
        }
    }
    let pct = to_v2 as f64 / 6.0;
    assert!(
        (42.0..=58.0).contains(&pct),
        "v2 got {pct}% of 600 first requests"
    );
    Ok(())
}
