//! The proxy's data path over real loopback sockets with real mTLS: an application's
//! connection to a service VIP goes through the outbound listener (original destination from a
//! stand-in for iptables), over HBONE to the destination's HBONE server (our inbound handler)
//! and on to the application there. The discovery state is built from xDS resources through
//! the subscriber's own cache decoder, so it is validated exactly as on the network path.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use isthmus_agent::identity::WorkloadCertificate;
use isthmus_agent::proxy::{
    self, metadata, Direction, InboundConfig, InboundPolicy, LoadTracker, OrigDst, Outbound,
    OutboundConfig, Outcome, PlaintextInbound, PlaintextMode, ProxyConfig, ProxyMetrics,
    UnknownDestination,
};
use isthmus_hbone::{
    ClientOptions, Credentials, HboneClient, HboneServer, ServerHandle, ServerOptions,
};
use isthmus_xds::client::{decode_cache, State};
use isthmus_xds::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use isthmus_xds::pb::istio::security as sec;
use isthmus_xds::pb::istio::workload as wl;
use isthmus_xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

mod support;

const TD: &str = "cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/client-ns/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const SVC_KEY: &str = "default/echo.default.svc.cluster.local";
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- certificates

use support::{access_logs, LogBuf, TestCa};

// ---------------------------------------------------------------- discovery state

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

#[derive(Clone)]
struct Ep {
    uid: &'static str,
    ip: IpAddr,
    target_port: u16,
    hbone: bool,
    healthy: bool,
}

fn workload(ep: &Ep) -> wl::Workload {
    let mut services = BTreeMap::new();
    services.insert(
        SVC_KEY.to_string(),
        wl::PortList {
            ports: vec![wl::Port {
                service_port: 80,
                target_port: u32::from(ep.target_port),
                app_protocol: 0,
            }],
        },
    );
    wl::Workload {
        uid: ep.uid.into(),
        name: ep.uid.into(),
        namespace: "default".into(),
        addresses: vec![ip_bytes(ep.ip)],
        tunnel_protocol: if ep.hbone {
            wl::TunnelProtocol::Hbone as i32
        } else {
            wl::TunnelProtocol::None as i32
        },
        trust_domain: TD.into(),
        service_account: "server".into(),
        services,
        status: if ep.healthy {
            wl::WorkloadStatus::Healthy as i32
        } else {
            wl::WorkloadStatus::Unhealthy as i32
        },
        ..Default::default()
    }
}

/// The state the subscriber would hold after receiving these resources.
fn state(vip: IpAddr, eps: &[Ep], policies: &[sec::Authorization]) -> Result<State> {
    state_with(vip, eps, policies, &[])
}

/// [`state`] with more workloads (not endpoints of the service).
fn state_with(
    vip: IpAddr,
    eps: &[Ep],
    policies: &[sec::Authorization],
    others: &[wl::Workload],
) -> Result<State> {
    let service = wl::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: ip_bytes(vip),
        }],
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    let mut addresses = vec![Resource {
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
        addresses.push(Resource {
            name: ep.uid.into(),
            version: "1".into(),
            resource: Some(any(
                ADDRESS_TYPE_URL,
                &wl::Address {
                    r#type: Some(wl::address::Type::Workload(workload(ep))),
                },
            )),
            ..Default::default()
        });
    }
    for w in others {
        addresses.push(Resource {
            name: w.uid.clone(),
            version: "1".into(),
            resource: Some(any(
                ADDRESS_TYPE_URL,
                &wl::Address {
                    r#type: Some(wl::address::Type::Workload(w.clone())),
                },
            )),
            ..Default::default()
        });
    }
    let authz = policies
        .iter()
        .map(|p| Resource {
            name: format!("{}/{}", p.namespace, p.name),
            version: "1".into(),
            resource: Some(any(AUTHORIZATION_TYPE_URL, p)),
            ..Default::default()
        })
        .collect();
    let mut bytes = b"isthmus-xds-cache v1\n".to_vec();
    for (type_url, resources) in [
        (ADDRESS_TYPE_URL, addresses),
        (AUTHORIZATION_TYPE_URL, authz),
    ] {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources,
            ..Default::default()
        }
        .encode_length_delimited(&mut bytes)?;
    }
    Ok(decode_cache(std::path::Path::new("test-state"), &bytes)?)
}

fn deny_namespace(ns: &str) -> sec::Authorization {
    sec::Authorization {
        name: format!("deny-{ns}"),
        namespace: "default".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    namespaces: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact(ns.into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

// ---------------------------------------------------------------- applications

/// Echoes every byte; half-closes after the client does. Counts accepted connections.
async fn echo_app(ip: IpAddr) -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
    let addr = l.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok((addr, accepted))
}

/// A port on `ip` with nothing listening.
async fn dead_port(ip: IpAddr) -> Result<u16> {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
    Ok(l.local_addr()?.port())
}

/// Sends `msg`, half-closes, reads everything back.
async fn round_trip(proxy: SocketAddr, msg: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    // A refused connection may end in a reset rather than EOF: both mean "nothing came back".
    match tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) | Ok(Err(_)) => Ok(out),
        Err(_) => anyhow::bail!("no answer within {DEADLINE:?}"),
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn loopback(block: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, block, host))
}

// ---------------------------------------------------------------- harness

/// One outbound listener in front of a mesh; each test takes its own 127.0.<block>.0/24.
struct Mesh {
    ca: TestCa,
    state: watch::Sender<Arc<State>>,
    outbound: SocketAddr,
    out_metrics: Arc<ProxyMetrics>,
    in_metrics: Arc<ProxyMetrics>,
    hbone_port: u16,
    _servers: Vec<ServerHandle>,
    /// Starts the outbound listener's drain (what SIGTERM does).
    drain: watch::Sender<Option<Duration>>,
    serving: tokio::task::JoinHandle<()>,
}

impl Mesh {
    /// Starts an outbound listener whose every connection "was going to" `dst`.
    async fn new(dst: SocketAddr, unknown: UnknownDestination, hbone_port: u16) -> Result<Self> {
        Self::new_at(dst, unknown, hbone_port, None).await
    }

    /// [`Mesh::new`] whose outbound side describes itself (`baggage`) as the agent at
    /// `own_ip` with the identity [`CLIENT_ID`] would, following the discovery state.
    async fn new_at(
        dst: SocketAddr,
        unknown: UnknownDestination,
        hbone_port: u16,
        own_ip: Option<IpAddr>,
    ) -> Result<Self> {
        let ca = TestCa::new()?;
        let (state, state_rx) = watch::channel(Arc::new(State::default()));
        let local = match own_ip {
            Some(ip) => {
                // Only the identity of the identity manager's certificate is read here.
                let cert = WorkloadCertificate {
                    identity: CLIENT_ID.parse()?,
                    key_pem: String::new(),
                    chain_pem: String::new(),
                    roots_pem: String::new(),
                    not_before: std::time::SystemTime::now(),
                    not_after: std::time::SystemTime::now(),
                };
                let (_tx, certs) = watch::channel(Some(Arc::new(cert)));
                let (local, follow) = metadata::follow(Some(ip), state_rx.clone(), certs);
                tokio::spawn(follow);
                local
            }
            None => metadata::unknown(),
        };
        let out_metrics = Arc::new(ProxyMetrics::default());
        let orig_dst: Arc<dyn OrigDst> =
            Arc::new(move |_: &TcpStream| -> io::Result<SocketAddr> { Ok(dst) });
        let outbound = Outbound::new(
            OutboundConfig {
                unknown,
                hbone_port,
                max_attempts: 3,
                connect_timeout: Duration::from_secs(5),
                ..OutboundConfig::default()
            },
            state_rx,
            HboneClient::new(ca.issue(CLIENT_ID)?, ClientOptions::default()),
            orig_dst,
            Arc::new(LoadTracker::default()),
            out_metrics.clone(),
        )
        .with_local(local);
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let (drain, drain_rx) = watch::channel(None);
        let serving = tokio::spawn(outbound.serve_until(l, drain_rx));
        Ok(Self {
            ca,
            state,
            outbound: addr,
            out_metrics,
            in_metrics: Arc::new(ProxyMetrics::default()),
            hbone_port,
            _servers: Vec::new(),
            drain,
            serving,
        })
    }

    fn set_state(&self, s: State) {
        self.state.send_replace(Arc::new(s));
    }

    /// Runs an HBONE server with the proxy's inbound handler on `ip`; returns the handler.
    async fn hbone_server(&mut self, ip: IpAddr) -> Result<InboundPolicy> {
        let policy = InboundPolicy::new(
            InboundConfig::default(),
            self.state.subscribe(),
            self.in_metrics.clone(),
        );
        tokio::spawn(policy.clone().revalidate_on_change());
        let server = HboneServer::bind(
            SocketAddr::new(ip, self.hbone_port),
            self.ca.issue(SERVER_ID)?,
            policy.clone(),
            ServerOptions::default(),
        )
        .await?
        .spawn()?;
        self._servers.push(server);
        Ok(policy)
    }
}

/// An ephemeral port free on `ip`, for HBONE servers in one test to share.
async fn hbone_port(ip: IpAddr) -> Result<u16> {
    dead_port(ip).await
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn vip_over_hbone_reaches_the_app_with_bytes_intact() -> Result<()> {
    let (vip, ip) = (loopback(1, 100), loopback(1, 2));
    let port = hbone_port(ip).await?;
    let mut mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, port).await?;
    let (app, _) = echo_app(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    mesh.set_state(state(vip, &[ep], &[])?);
    let policy = mesh.hbone_server(ip).await?;

    let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let back = round_trip(mesh.outbound, &msg).await?;
    assert_eq!(back.len(), msg.len());
    assert_eq!(back, msg);

    let (out, inb) = (mesh.out_metrics.clone(), mesh.in_metrics.clone());
    eventually("outbound ok", || {
        out.count(Direction::Outbound, Outcome::Ok) == 1
    })
    .await;
    eventually("inbound ok", || {
        inb.count(Direction::Inbound, Outcome::Ok) == 1
    })
    .await;
    assert_eq!(policy.live_connections(), 0);
    Ok(())
}

#[tokio::test]
async fn plain_endpoint_is_reached_directly() -> Result<()> {
    let (vip, ip) = (loopback(2, 100), loopback(2, 5));
    let mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, 1).await?;
    let (app, accepted) = echo_app(ip).await?;
    let ep = Ep {
        uid: "plain",
        ip,
        target_port: app.port(),
        hbone: false,
        healthy: true,
    };
    mesh.set_state(state(vip, &[ep], &[])?);
    assert_eq!(
        round_trip(mesh.outbound, b"hello plain").await?,
        b"hello plain"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn unhealthy_endpoint_gets_no_traffic_while_a_healthy_one_exists() -> Result<()> {
    let vip = loopback(3, 100);
    let mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, 1).await?;
    let (good, good_n) = echo_app(loopback(3, 2)).await?;
    let (bad, bad_n) = echo_app(loopback(3, 3)).await?;
    let eps = [
        Ep {
            uid: "good",
            ip: good.ip(),
            target_port: good.port(),
            hbone: false,
            healthy: true,
        },
        Ep {
            uid: "bad",
            ip: bad.ip(),
            target_port: bad.port(),
            hbone: false,
            healthy: false,
        },
    ];
    mesh.set_state(state(vip, &eps, &[])?);
    for i in 0..20 {
        let msg = format!("msg {i}");
        assert_eq!(
            round_trip(mesh.outbound, msg.as_bytes()).await?,
            msg.as_bytes()
        );
    }
    assert_eq!(good_n.load(Ordering::SeqCst), 20);
    assert_eq!(bad_n.load(Ordering::SeqCst), 0);
    Ok(())
}

#[tokio::test]
async fn connect_failure_fails_over_to_another_endpoint() -> Result<()> {
    let vip = loopback(4, 100);
    let mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, 1).await?;
    let (live, live_n) = echo_app(loopback(4, 2)).await?;
    let dead_ip = loopback(4, 3);
    let eps = [
        Ep {
            uid: "dead",
            ip: dead_ip,
            target_port: dead_port(dead_ip).await?,
            hbone: false,
            healthy: true,
        },
        Ep {
            uid: "live",
            ip: live.ip(),
            target_port: live.port(),
            hbone: false,
            healthy: true,
        },
    ];
    mesh.set_state(state(vip, &eps, &[])?);
    for i in 0..10 {
        let msg = format!("try {i}");
        assert_eq!(
            round_trip(mesh.outbound, msg.as_bytes()).await?,
            msg.as_bytes()
        );
    }
    assert_eq!(live_n.load(Ordering::SeqCst), 10);
    let out = mesh.out_metrics.clone();
    eventually("10 ok", || {
        out.count(Direction::Outbound, Outcome::Ok) == 10
    })
    .await;
    assert_eq!(out.count(Direction::Outbound, Outcome::Unreachable), 0);
    Ok(())
}

#[tokio::test]
async fn all_endpoints_down_is_unreachable() -> Result<()> {
    let vip = loopback(5, 100);
    let mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, 1).await?;
    let ip = loopback(5, 2);
    let ep = Ep {
        uid: "dead",
        ip,
        target_port: dead_port(ip).await?,
        hbone: false,
        healthy: true,
    };
    mesh.set_state(state(vip, &[ep], &[])?);
    assert!(round_trip(mesh.outbound, b"anyone?").await?.is_empty());
    let out = mesh.out_metrics.clone();
    eventually("unreachable", || {
        out.count(Direction::Outbound, Outcome::Unreachable) == 1
    })
    .await;
    Ok(())
}

fn access_log() -> &'static LogBuf {
    &access_logs().0
}

/// The JSON access-log records whose destination is in `block`'s addresses.
fn json_access(block: u8) -> Vec<serde_json::Value> {
    let prefix = format!("127.0.{block}.");
    access_logs()
        .1
        .text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["dst"]
                .as_str()
                .is_some_and(|d| d.starts_with(&prefix))
        })
        .collect()
}

/// The value of `field` in a text access-log line (`field=value` or `field="value"`).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    Some(match rest.strip_prefix('"') {
        Some(q) => &q[..q.find('"')?],
        None => rest.split(' ').next()?,
    })
}

#[tokio::test]
async fn deny_policy_for_the_callers_namespace_refuses_the_connection() -> Result<()> {
    let log = access_log();
    let (vip, ip) = (loopback(6, 100), loopback(6, 2));
    let port = hbone_port(ip).await?;
    let mut mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, port).await?;
    let (app, accepted) = echo_app(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    mesh.set_state(state(vip, &[ep], &[deny_namespace("client-ns")])?);
    mesh.hbone_server(ip).await?;

    assert!(round_trip(mesh.outbound, b"let me in").await?.is_empty());
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    let (out, inb) = (mesh.out_metrics.clone(), mesh.in_metrics.clone());
    eventually("inbound denied", || {
        inb.count(Direction::Inbound, Outcome::Denied) == 1
    })
    .await;
    eventually("outbound denied", || {
        out.count(Direction::Outbound, Outcome::Denied) == 1
    })
    .await;
    let text = log.text();
    let ours = |l: &&str| l.contains("127.0.6.");
    let inbound_line = text
        .lines()
        .filter(ours)
        .find(|l| l.contains("direction=\"inbound\""))
        .context("no inbound access-log line")?;
    assert!(
        inbound_line.contains("result=\"denied\"") || inbound_line.contains("result=denied"),
        "{inbound_line}"
    );
    assert!(
        inbound_line.contains("denied by policy default/deny-client-ns"),
        "{inbound_line}"
    );
    assert!(inbound_line.contains(CLIENT_ID), "{inbound_line}");
    let outbound_line = text
        .lines()
        .filter(ours)
        .find(|l| l.contains("direction=\"outbound\""))
        .context("no outbound access-log line")?;
    assert!(
        outbound_line.contains("service=echo.default.svc.cluster.local"),
        "{outbound_line}"
    );
    assert!(outbound_line.contains(SERVER_ID), "{outbound_line}");
    // The refusal's reason header names the policy, and the caller's side logs it.
    assert!(
        outbound_line.contains("denied by policy default/deny-client-ns"),
        "{outbound_line}"
    );
    Ok(())
}

/// A workload whose app is not listening: the refusal's reason header says so, port and all,
/// and the caller's access log shows it (not "denied by policy").
#[tokio::test]
async fn a_refusal_names_its_cause_to_the_caller() -> Result<()> {
    let log = access_log();
    let (vip, ip) = (loopback(20, 100), loopback(20, 2));
    let port = hbone_port(ip).await?;
    let mut mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, port).await?;
    let closed = dead_port(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: closed,
        hbone: true,
        healthy: true,
    };
    mesh.set_state(state(vip, &[ep], &[])?);
    mesh.hbone_server(ip).await?;

    let _ = round_trip(mesh.outbound, b"anyone there?").await;
    let want = format!("the local app refused the connection (is it listening on {closed}?)");
    eventually("the caller logs the reason", || {
        log.text().lines().any(|l| {
            l.contains("127.0.20.") && l.contains("direction=\"outbound\"") && l.contains(&want)
        })
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn a_policy_change_closes_live_connections_it_no_longer_allows() -> Result<()> {
    let (vip, ip) = (loopback(7, 100), loopback(7, 2));
    let port = hbone_port(ip).await?;
    let mut mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, port).await?;
    let (app, _) = echo_app(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    mesh.set_state(state(vip, std::slice::from_ref(&ep), &[])?);
    let policy = mesh.hbone_server(ip).await?;

    let mut s = TcpStream::connect(mesh.outbound).await?;
    s.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"ping");
    assert_eq!(policy.live_connections(), 1);

    // A policy that does not concern this caller leaves it alone.
    mesh.set_state(state(
        vip,
        std::slice::from_ref(&ep),
        &[deny_namespace("other")],
    )?);
    s.write_all(b"pong").await?;
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"pong");

    mesh.set_state(state(vip, &[ep], &[deny_namespace("client-ns")])?);
    let mut rest = Vec::new();
    // EOF or reset, but no more bytes and no hang.
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .context("connection still open after the policy change")?;
    assert!(rest.is_empty());
    let inb = mesh.in_metrics.clone();
    eventually("revoked", || {
        inb.count(Direction::Inbound, Outcome::Revoked) == 1
    })
    .await;
    assert_eq!(policy.live_connections(), 0);
    Ok(())
}

#[tokio::test]
async fn unknown_destination_passes_through_or_is_refused_by_setting() -> Result<()> {
    let (app, accepted) = echo_app(loopback(8, 9)).await?;
    let vip = loopback(8, 100);

    let pass = Mesh::new(app, UnknownDestination::Passthrough, 1).await?;
    pass.set_state(state(vip, &[], &[])?);
    assert_eq!(round_trip(pass.outbound, b"outside").await?, b"outside");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    let refuse = Mesh::new(app, UnknownDestination::Refuse, 1).await?;
    refuse.set_state(state(vip, &[], &[])?);
    assert!(round_trip(refuse.outbound, b"outside").await?.is_empty());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let out = refuse.out_metrics.clone();
    eventually("refused", || {
        out.count(Direction::Outbound, Outcome::Refused) == 1
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn workload_address_destination_is_tunnelled_to_that_workload() -> Result<()> {
    let (vip, ip) = (loopback(9, 100), loopback(9, 2));
    let port = hbone_port(ip).await?;
    let (app, accepted) = echo_app(ip).await?;
    // The application dials the workload's own address, not the VIP.
    let mut mesh = Mesh::new(app, UnknownDestination::Refuse, port).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    mesh.set_state(state(vip, &[ep], &[])?);
    mesh.hbone_server(ip).await?;
    assert_eq!(round_trip(mesh.outbound, b"direct").await?, b"direct");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let inb = mesh.in_metrics.clone();
    eventually("inbound ok", || {
        inb.count(Direction::Inbound, Outcome::Ok) == 1
    })
    .await;
    Ok(())
}

/// The plaintext listener (15006) forwards in PERMISSIVE mode and refuses in STRICT mode.
#[tokio::test]
async fn plaintext_inbound_permissive_forwards_strict_refuses() -> Result<()> {
    let (vip, ip) = (loopback(10, 100), loopback(10, 2));
    let (app, accepted) = echo_app(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    let (_tx, state_rx) = watch::channel(Arc::new(state(vip, &[ep], &[])?));
    let metrics = Arc::new(ProxyMetrics::default());
    let policy = InboundPolicy::new(InboundConfig::default(), state_rx, metrics.clone());
    let mut addrs = Vec::new();
    for mode in [PlaintextMode::Permissive, PlaintextMode::Strict] {
        let orig: Arc<dyn OrigDst> =
            Arc::new(move |_: &TcpStream| -> io::Result<SocketAddr> { Ok(app) });
        let l = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(l.local_addr()?);
        tokio::spawn(PlaintextInbound::new(mode, orig, policy.clone()).serve(l));
    }
    assert_eq!(round_trip(addrs[0], b"plain in").await?, b"plain in");
    assert!(round_trip(addrs[1], b"plain in").await?.is_empty());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let m = metrics.clone();
    eventually("plaintext outcomes", || {
        m.count(Direction::InboundPlaintext, Outcome::Ok) == 1
            && m.count(Direction::InboundPlaintext, Outcome::Refused) == 1
    })
    .await;
    Ok(())
}

/// The client agent's own workload entry, with canonical labels, at `ip`.
fn client_workload(ip: IpAddr) -> wl::Workload {
    wl::Workload {
        uid: "Kubernetes//WorkloadEntry/client-ns/vm-client".into(),
        name: "vm-client".into(),
        namespace: "client-ns".into(),
        addresses: vec![ip_bytes(ip)],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        trust_domain: TD.into(),
        service_account: "client".into(),
        canonical_name: "client app".into(),
        canonical_revision: "v2".into(),
        cluster_id: "Kubernetes".into(),
        ..Default::default()
    }
}

/// The outbound side sends baggage describing its workload, `forwarded` and a new
/// `traceparent`; the inbound side labels its metrics with the source workload and logs the
/// original source and the same trace id, in text and JSON.
#[tokio::test]
async fn baggage_and_trace_follow_the_connection_to_the_inbound_side() -> Result<()> {
    let log = access_log();
    let (vip, ip, client_ip) = (loopback(12, 100), loopback(12, 2), loopback(12, 3));
    let port = hbone_port(ip).await?;
    let mut mesh = Mesh::new_at(
        SocketAddr::new(vip, 80),
        UnknownDestination::Refuse,
        port,
        Some(client_ip),
    )
    .await?;
    let (app, _) = echo_app(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    mesh.set_state(state_with(vip, &[ep], &[], &[client_workload(client_ip)])?);
    mesh.hbone_server(ip).await?;
    let mut in_registry = prometheus_client::registry::Registry::default();
    mesh.in_metrics.register(&mut in_registry);
    let mut out_registry = prometheus_client::registry::Registry::default();
    mesh.out_metrics.register(&mut out_registry);

    // The description follows the discovery state (a background task): wait for it.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert_eq!(round_trip(mesh.outbound, b"traced").await?, b"traced");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &in_registry)?;
        if text.contains("source_workload=\"vm-client\"") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (out, inb) = (mesh.out_metrics.clone(), mesh.in_metrics.clone());
    eventually("both sides closed", || {
        let n = inb.count(Direction::Inbound, Outcome::Ok);
        n > 0 && out.count(Direction::Outbound, Outcome::Ok) == n
    })
    .await;

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &in_registry)?;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("proxy_peer_connections_total{direction=\"inbound\"")
                && l.contains("source_workload=\"vm-client\"")
        })
        .with_context(|| format!("no inbound series with the source workload:\n{text}"))?;
    for label in [
        "source_workload_namespace=\"client-ns\"",
        "source_canonical_service=\"client app\"",
        "source_canonical_revision=\"v2\"",
        "source_cluster=\"Kubernetes\"",
        &format!("peer_identity=\"{CLIENT_ID}\""),
    ] {
        assert!(line.contains(label), "{label} missing: {line}");
    }
    // Outbound, the source is this agent's own workload.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &out_registry)?;
    assert!(
        text.lines().any(
            |l| l.starts_with("proxy_peer_bytes_total{direction=\"outbound\"")
                && l.contains("source_workload=\"vm-client\"")
        ),
        "{text}"
    );

    // The last connection's lines on both sides carry the same trace id.
    let text = log.text();
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("127.0.12.")).collect();
    let last = |dir: &str| {
        ours.iter()
            .rev()
            .find(|l| l.contains(&format!("direction=\"{dir}\"")))
            .copied()
            .with_context(|| format!("no {dir} access-log line in {ours:#?}"))
    };
    let (outbound_line, inbound_line) = (last("outbound")?, last("inbound")?);
    let trace = field(outbound_line, "trace_id").context("outbound line without trace_id")?;
    assert_eq!(trace.len(), 32, "{outbound_line}");
    assert!(trace.bytes().all(|b| b.is_ascii_hexdigit()) && trace.bytes().any(|b| b != b'0'));
    assert_eq!(
        field(inbound_line, "trace_id"),
        Some(trace),
        "{inbound_line}"
    );
    assert_eq!(
        field(inbound_line, "src_workload"),
        Some("vm-client"),
        "{inbound_line}"
    );
    assert_eq!(
        field(inbound_line, "src_namespace"),
        Some("client-ns"),
        "{inbound_line}"
    );
    // The application connected to the outbound listener from 127.0.0.1: the inbound side
    // learns it from `forwarded`.
    assert_eq!(
        field(inbound_line, "original_src"),
        Some("127.0.0.1"),
        "{inbound_line}"
    );

    // The JSON form has the same fields.
    let records = json_access(12);
    let inbound = records
        .iter()
        .rev()
        .find(|r| r["fields"]["direction"] == "inbound")
        .context("no inbound JSON access record")?;
    assert_eq!(inbound["fields"]["trace_id"], trace, "{inbound}");
    assert_eq!(inbound["fields"]["src_workload"], "vm-client", "{inbound}");
    assert_eq!(inbound["fields"]["original_src"], "127.0.0.1", "{inbound}");
    assert!(
        records
            .iter()
            .any(|r| r["fields"]["direction"] == "outbound" && r["fields"]["trace_id"] == trace),
        "{records:#?}"
    );
    Ok(())
}

/// A peer with a valid certificate sends hostile CONNECT headers straight over HTTP/2 (our
/// client sends whatever headers it is given). Within the header-list limit (16 KiB) the
/// stream is served with the bad headers ignored; over it h2 refuses the stream (431) and
/// far over it closes the connection. Either way the server goes on serving.
#[tokio::test]
async fn hostile_connect_headers_are_ignored_or_refused_and_the_server_carries_on() -> Result<()> {
    let log = access_log();
    let (vip, ip) = (loopback(13, 100), loopback(13, 2));
    let port = hbone_port(ip).await?;
    let mut mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, port).await?;
    let (app, accepted) = echo_app(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    mesh.set_state(state(vip, &[ep], &[])?);
    mesh.hbone_server(ip).await?;
    let client = HboneClient::new(mesh.ca.issue(CLIENT_ID)?, ClientOptions::default());
    let hbone = SocketAddr::new(ip, port);
    let expected = [SERVER_ID.to_string()];
    let echo_once = |headers: http::HeaderMap| {
        let client = client.clone();
        let expected = expected.clone();
        async move {
            let mut s = client.connect(hbone, app, &expected, &headers).await?;
            s.write_all(b"still served").await?;
            s.shutdown().await?;
            let mut out = Vec::new();
            tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await??;
            anyhow::ensure!(out == b"still served", "echo came back as {out:?}");
            anyhow::Ok(())
        }
    };
    let value = |s: &str| http::HeaderValue::from_str(s);

    // Over the W3C baggage limit but under h2's header-list limit, with a garbage
    // traceparent and a forwarded that is not an address: served, all three ignored.
    let mut h = http::HeaderMap::new();
    let huge = format!(
        "k8s.namespace.name=client-ns,k8s.pod.name={}",
        "x".repeat(12 * 1024)
    );
    h.insert("baggage", value(&huge)?);
    h.insert("traceparent", value("00-garbage-garbage-01")?);
    h.insert("forwarded", value("for=\"[::1")?);
    echo_once(h).await?;
    // Not ASCII, a forged log line, two traceparents: served, ignored.
    let mut h = http::HeaderMap::new();
    h.insert(
        "baggage",
        http::HeaderValue::from_bytes(b"k8s.pod.name=\xff\xfe")?,
    );
    h.append("baggage", value("service.name=a%0Aforged=line")?);
    h.insert("forwarded", value("for=unknown")?);
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    h.insert("traceparent", value(tp)?);
    h.append("traceparent", value(tp)?);
    echo_once(h).await?;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let inb = mesh.in_metrics.clone();
    eventually("both served", || {
        inb.count(Direction::Inbound, Outcome::Ok) == 2
    })
    .await;
    let text = log.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("127.0.13.") && l.contains("direction=\"inbound\""))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for l in lines {
        for f in [
            "trace_id",
            "src_workload",
            "src_namespace",
            "src_service",
            "original_src",
        ] {
            assert_eq!(field(l, f), Some("-"), "{f} in {l}");
        }
        assert!(!l.contains("forged"), "{l}");
    }

    // Over h2's header-list limit: refused before our handler sees it.
    let mut h = http::HeaderMap::new();
    h.insert("baggage", value(&format!("k={}", "y".repeat(40 * 1024)))?);
    match client.connect(hbone, app, &expected, &h).await {
        Err(isthmus_hbone::HboneError::Rejected { status, .. }) => {
            assert_eq!(status, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        // The 431 and the stream reset that follows it may arrive in either order.
        Err(isthmus_hbone::HboneError::H2 { source, .. }) => {
            assert!(source.to_string().contains("refused"), "{source}")
        }
        other => anyhow::bail!("a 40 KiB header was not refused: {other:?}"),
    }
    // Far over it: h2 gives up on the connection.
    let mut h = http::HeaderMap::new();
    h.insert("baggage", value(&format!("k={}", "z".repeat(256 * 1024)))?);
    let r = client.connect(hbone, app, &expected, &h).await;
    assert!(r.is_err(), "a 256 KiB header was accepted");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // And the server carries on.
    echo_once(http::HeaderMap::new()).await?;
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    Ok(())
}

/// `start` as the agent calls it: three listeners, credentials from the identity manager's
/// PEM certificate, serving until shut down.
#[tokio::test]
async fn start_serves_hbone_with_the_identity_managers_certificate() -> Result<()> {
    let ip = loopback(11, 2);
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(SERVER_ID.try_into()?)];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = params.signed_by(&key, &issuer)?;
    let cert = WorkloadCertificate {
        identity: SERVER_ID.parse()?,
        key_pem: key.serialize_pem(),
        chain_pem: leaf.pem(),
        roots_pem: ca_cert.pem(),
        not_before: std::time::SystemTime::now(),
        not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
    };
    let (app, accepted) = echo_app(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    let (_state_tx, state_rx) = watch::channel(Arc::new(state(loopback(11, 100), &[ep], &[])?));
    let (_cert_tx, cert_rx) = watch::channel(Some(Arc::new(cert)));
    let mut config = ProxyConfig::new(ip);
    config.outbound_addr = "127.0.0.1:0".parse()?;
    config.inbound_plaintext_addr = "127.0.0.1:0".parse()?;
    config.hbone_addr = SocketAddr::new(ip, 0);
    let mut registry = prometheus_client::registry::Registry::default();
    let proxy = proxy::start(config, state_rx, cert_rx, &mut registry).await?;

    // A mesh peer (same CA) tunnels to the local application through the started server.
    let client_creds = {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(CLIENT_ID.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(&key, &issuer)?;
        Credentials {
            cert_chain: vec![leaf.der().clone()],
            private_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots: vec![ca_cert.der().clone()],
            trust_domain: TD.into(),
        }
    };
    let client = HboneClient::new(
        watch::channel(Some(Arc::new(client_creds))).1,
        ClientOptions::default(),
    );
    let mut s = client
        .connect(
            proxy.hbone_addr(),
            app,
            &[SERVER_ID.to_string()],
            &http::HeaderMap::new(),
        )
        .await?;
    s.write_all(b"via start").await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await??;
    assert_eq!(out, b"via start");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    let metrics = proxy.metrics();
    eventually("inbound ok", || {
        metrics.count(Direction::Inbound, Outcome::Ok) == 1
    })
    .await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    assert!(
        text.contains("proxy_connections_total{direction=\"inbound\",outcome=\"ok\"} 1")
            && text.contains("proxy_sent_bytes_total{direction=\"inbound\"} 9")
            && text.contains("proxy_peer_connections_total{direction=\"inbound\",outcome=\"ok\",peer_identity=\"spiffe://"),
        "{text}"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A live connection through the proxy to an echo app, and the mesh around it.
async fn live_connection(block: u8) -> Result<(Mesh, TcpStream)> {
    let (vip, ip) = (loopback(block, 100), loopback(block, 2));
    let port = hbone_port(ip).await?;
    let mut mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, port).await?;
    let (app, _) = echo_app(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    mesh.set_state(state(vip, &[ep], &[])?);
    mesh.hbone_server(ip).await?;
    let mut c = TcpStream::connect(mesh.outbound).await?;
    assert_eq!(
        echo(&mut c, b"before the drain").await?,
        b"before the drain"
    );
    Ok((mesh, c))
}

async fn echo(c: &mut TcpStream, msg: &[u8]) -> Result<Vec<u8>> {
    c.write_all(msg).await?;
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(DEADLINE, c.read_exact(&mut buf))
        .await
        .context("no echo")??;
    Ok(buf)
}

#[tokio::test]
async fn drain_refuses_new_connections_and_lets_open_ones_finish() -> Result<()> {
    let (mut mesh, mut c) = live_connection(20).await?;
    mesh.drain.send_replace(Some(Duration::from_secs(30)));

    // New connections are refused at once: the listener is closed.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        match TcpStream::connect(mesh.outbound).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
            // Queued in the backlog when the listener closed: reset. Try once more.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
            Err(e) => anyhow::bail!("unexpected connect error while draining: {e}"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    // The open one keeps working, and the listener's task waits for it.
    assert_eq!(echo(&mut c, b"while draining").await?, b"while draining");
    assert!(
        !mesh.serving.is_finished(),
        "drain ended with a connection open"
    );
    // When it ends, the drain is over long before its deadline.
    c.shutdown().await?;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await?;
    tokio::time::timeout(DEADLINE, &mut mesh.serving)
        .await
        .context("drain did not end after the last connection closed")??;
    Ok(())
}

#[tokio::test]
async fn drain_deadline_closes_connections_left_open() -> Result<()> {
    let (mut mesh, mut c) = live_connection(21).await?;
    mesh.drain.send_replace(Some(Duration::from_millis(200)));
    tokio::time::timeout(DEADLINE, &mut mesh.serving)
        .await
        .context("drain did not end at its deadline")??;
    // The proxy closed the client's connection: EOF or a reset, and no echo.
    let mut buf = [0u8; 16];
    let _ = c.write_all(b"after the deadline").await;
    match tokio::time::timeout(DEADLINE, c.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
        Ok(Ok(n)) => anyhow::bail!("got {n} bytes after the drain deadline"),
        Err(_) => anyhow::bail!("connection still open after the drain deadline"),
    }
}

/// A peer that discovery knows (an entry at its address with its certificate's identity) is
/// labelled from that entry, whatever its `baggage` claims; a claim is kept only for a peer
/// discovery cannot vouch for.
#[tokio::test]
async fn registered_peers_are_labelled_by_discovery_not_by_their_baggage() -> Result<()> {
    let log = access_log();
    let (vip, ip) = (loopback(14, 100), loopback(14, 2));
    let port = hbone_port(ip).await?;
    let mut mesh = Mesh::new(SocketAddr::new(vip, 80), UnknownDestination::Refuse, port).await?;
    let (app, _) = echo_app(ip).await?;
    let ep = Ep {
        uid: "server",
        ip,
        target_port: app.port(),
        hbone: true,
        healthy: true,
    };
    // The raw client below connects from 127.0.0.1 with the identity CLIENT_ID.
    let peer: IpAddr = "127.0.0.1".parse()?;
    mesh.set_state(state_with(vip, &[ep], &[], &[client_workload(peer)])?);
    mesh.hbone_server(ip).await?;
    let client = HboneClient::new(mesh.ca.issue(CLIENT_ID)?, ClientOptions::default());
    let hbone = SocketAddr::new(ip, port);
    let expected = [SERVER_ID.to_string()];
    let mut claims = http::HeaderMap::new();
    claims.insert(
        "baggage",
        http::HeaderValue::from_static(
            "k8s.namespace.name=client-ns,k8s.pod.name=claimed-name,service.name=claimed-svc",
        ),
    );
    let inb = mesh.in_metrics.clone();
    // One connection; returns its inbound access-log line.
    let call = |n: u64| {
        let (client, expected, claims, inb) = (
            client.clone(),
            expected.clone(),
            claims.clone(),
            inb.clone(),
        );
        async move {
            let mut s = client.connect(hbone, app, &expected, &claims).await?;
            s.write_all(b"labelled").await?;
            s.shutdown().await?;
            let mut out = Vec::new();
            tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await??;
            anyhow::ensure!(out == b"labelled");
            eventually("the connection closed inbound", || {
                inb.count(Direction::Inbound, Outcome::Ok) == n
            })
            .await;
            let text = log.text();
            let line = text
                .lines()
                .filter(|l| l.contains("127.0.14.") && l.contains("direction=\"inbound\""))
                .nth(n as usize - 1)
                .map(str::to_string)
                .with_context(|| format!("no inbound line {n}:\n{text}"))?;
            anyhow::Ok(line)
        }
    };

    let line = call(1).await?;
    assert!(
        field(&line, "src").is_some_and(|s| s.starts_with("127.0.0.1:")),
        "{line}"
    );
    assert_eq!(field(&line, "src_workload"), Some("vm-client"), "{line}");
    // Quoted: a value with a space cannot pass for two fields.
    assert!(line.contains(" src_service=\"client app\" "), "{line}");
    assert!(!line.contains("claimed"), "{line}");

    // The entry at that address now belongs to another identity: discovery cannot vouch for
    // this peer, so its own (namespace-consistent) claims label it.
    let mut other = client_workload(peer);
    other.service_account = "someone-else".into();
    mesh.set_state(state_with(
        vip,
        &[Ep {
            uid: "server",
            ip,
            target_port: app.port(),
            hbone: true,
            healthy: true,
        }],
        &[],
        &[other],
    )?);
    let line = call(2).await?;
    assert_eq!(field(&line, "src_workload"), Some("claimed-name"), "{line}");
    Ok(())
}

// ---------------------------------------------------------------- loops and bounds

/// Reads until EOF or reset: what a client of a refused connection sees.
async fn closed_at_once(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await {
        Ok(_) => Ok(out),
        Err(_) => anyhow::bail!("still open after {DEADLINE:?}"),
    }
}

#[tokio::test]
async fn the_agents_own_connection_coming_back_is_refused_not_proxied() -> Result<()> {
    let (app, accepted) = echo_app(loopback(15, 1)).await?;
    let (_state, state_rx) = watch::channel(Arc::new(State::default()));
    let metrics = Arc::new(ProxyMetrics::default());
    // Unmarked, as an agent without CAP_NET_ADMIN: the factory knows its own ports.
    let sockets = isthmus_socket::SocketFactory::unmarked();
    let orig_dst: Arc<dyn OrigDst> =
        Arc::new(move |_: &TcpStream| -> io::Result<SocketAddr> { Ok(app) });
    let outbound = Outbound::new(
        OutboundConfig {
            sockets: sockets.clone(),
            ..OutboundConfig::default()
        },
        state_rx,
        HboneClient::new(watch::channel(None).1, ClientOptions::default()),
        orig_dst,
        Arc::new(LoadTracker::default()),
        metrics.clone(),
    );
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let _serving = tokio::spawn(outbound.serve(l));

    // What capture of the agent's own traffic looks like: its connection arrives at 15001.
    for _ in 0..3 {
        let mut own = sockets.connect(addr).await?;
        own.write_all(b"ping").await?;
        assert!(closed_at_once(&mut own).await?.is_empty());
    }
    let refused = || {
        metrics
            .connections
            .get_or_create(&proxy::metrics::ConnLabels {
                direction: Direction::Outbound,
                outcome: Outcome::Refused,
            })
            .get()
    };
    eventually("three refusals counted", || refused() == 3).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "never re-proxied");
    // Anyone else's connection is proxied.
    assert_eq!(round_trip(addr, b"hello").await?, b"hello");
    Ok(())
}

#[tokio::test]
async fn past_its_bound_a_listener_closes_new_connections_and_counts_them() -> Result<()> {
    let log = access_log();
    let (app, _) = echo_app(loopback(16, 1)).await?;
    let (_state, state_rx) = watch::channel(Arc::new(State::default()));
    let metrics = Arc::new(ProxyMetrics::default());
    let over = metrics
        .over_limit
        .get_or_create(&proxy::metrics::DirLabels {
            direction: Direction::Outbound,
        })
        .clone();
    let counted = over.clone();
    let orig_dst: Arc<dyn OrigDst> =
        Arc::new(move |_: &TcpStream| -> io::Result<SocketAddr> { Ok(app) });
    let outbound = Outbound::new(
        OutboundConfig {
            conn_limit: isthmus_socket::ConnLimit::new(1).on_refuse(move || {
                counted.inc();
            }),
            ..OutboundConfig::default()
        },
        state_rx,
        HboneClient::new(watch::channel(None).1, ClientOptions::default()),
        orig_dst,
        Arc::new(LoadTracker::default()),
        metrics.clone(),
    );
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let _serving = tokio::spawn(outbound.serve(l));

    let mut first = TcpStream::connect(addr).await?;
    // Reset once in a CI run (2026-12-05) and never since: if it happens again, say why the
    // proxy refused it.
    let one = echo(&mut first, b"one").await.with_context(|| {
        let lines: Vec<String> = log
            .text()
            .lines()
            .filter(|l| l.contains("127.0.16."))
            .map(str::to_owned)
            .collect();
        format!(
            "the first connection, within the bound (app {app}, listener {addr}); its access log: {lines:?}"
        )
    })?;
    assert_eq!(one, b"one");
    let mut second = TcpStream::connect(addr).await?;
    assert!(closed_at_once(&mut second).await?.is_empty());
    assert_eq!(over.get(), 1);
    // The first one is unaffected, and once it closes the slot is free again.
    assert_eq!(echo(&mut first, b"still").await?, b"still");
    drop(first);
    let mut tries = 0;
    loop {
        tries += 1;
        match round_trip(addr, b"three").await {
            Ok(b) if b == b"three" => break,
            _ if tries < 50 => tokio::time::sleep(Duration::from_millis(20)).await,
            other => anyhow::bail!("the freed slot is not reused: {other:?}"),
        }
    }
    Ok(())
}
