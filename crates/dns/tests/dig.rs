//! The DNS server over real loopback sockets, asked by real `dig` (Debian's dnsutils, which
//! `scripts/setup.sh` installs). Without dig these tests print a loud SKIP and pass.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use isthmus_dns::{
    DnsMetrics, DnsServer, DnsServerConfig, Forward, NameTable, NameTableBuilder, ServerError,
    Source,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const CP_IP: &str = "10.0.0.1";

/// A running server; dropping it stops it.
struct Running {
    addr: SocketAddr,
    table: watch::Sender<Arc<NameTable>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Running {
    async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("server task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn dig_missing() -> bool {
    let missing = std::process::Command::new("dig")
        .arg("-v")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true);
    if missing {
        eprintln!(
            "!!!! SKIP: dig not installed (apt-get install dnsutils; scripts/setup.sh does) !!!!"
        );
    }
    missing
}

fn mesh_table() -> NameTableBuilder {
    let mut b = NameTable::builder("cluster.local").unwrap();
    b.service("reviews", "bookinfo", ["10.96.0.10".parse().unwrap()])
        .unwrap()
        .service(
            "dual",
            "bookinfo",
            ["10.96.0.11".parse().unwrap(), "fd00::11".parse().unwrap()],
        )
        .unwrap()
        .service(
            "many",
            "bookinfo",
            (0..200u8).map(|i| IpAddr::V4(Ipv4Addr::new(10, 97, 0, i))),
        )
        .unwrap()
        .control_plane_aliases(&[CP_IP.parse().unwrap()])
        .unwrap();
    b
}

async fn start(config: DnsServerConfig, table: NameTable) -> Result<Running> {
    start_with_metrics(config, table, None).await
}

async fn start_with_metrics(
    config: DnsServerConfig,
    table: NameTable,
    metrics: Option<DnsMetrics>,
) -> Result<Running> {
    let (tx, rx) = watch::channel(Arc::new(table));
    let server = DnsServer::bind_with_metrics(config, rx, metrics).await?;
    let addr = server.local_addr();
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(server.serve(async move {
        let _ = stop_rx.await;
    }));
    Ok(Running {
        addr,
        table: tx,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn control_plane() -> Result<Running> {
    start(DnsServerConfig::new(loopback()), mesh_table().build()).await
}

/// Runs `dig @addr -p port <args>` with short timeouts and returns its stdout.
async fn dig(addr: SocketAddr, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .await
        .context("running dig")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "dig {args:?} exited with {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

async fn dig_short(addr: SocketAddr, args: &[&str]) -> Result<Vec<String>> {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    let out = dig(addr, &all).await?;
    let mut lines: Vec<String> = out.lines().map(str::to_owned).collect();
    lines.sort();
    Ok(lines)
}

fn status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("<no status>")
}

fn flags(out: &str) -> String {
    out.split("flags: ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn a_and_aaaa_for_mesh_names() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let s = control_plane().await?;
    assert_eq!(
        dig_short(s.addr, &["reviews.bookinfo.svc.cluster.local", "A"]).await?,
        ["10.96.0.10"]
    );
    assert_eq!(
        dig_short(s.addr, &["Reviews.Bookinfo.SVC.cluster.local.", "A"]).await?,
        ["10.96.0.10"]
    );
    assert_eq!(
        dig_short(s.addr, &["dual.bookinfo.svc.cluster.local", "AAAA"]).await?,
        ["fd00::11"]
    );
    let out = dig(s.addr, &["dual.bookinfo.svc.cluster.local", "A"]).await?;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(flags(&out).contains("aa"), "authoritative: {out}");
    let answer: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("dual."))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        answer,
        [
            "dual.bookinfo.svc.cluster.local.",
            "30",
            "IN",
            "A",
            "10.96.0.11"
        ],
        "{out}"
    );
    s.stop().await?;
    Ok(())
}

#[tokio::test]
async fn nxdomain_and_nodata_under_the_domain() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let s = control_plane().await?;
    let out = dig(s.addr, &["nope.bookinfo.svc.cluster.local", "A"]).await?;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    let soa: Vec<&str> = out
        .lines()
        .find(|l| l.contains("SOA") && !l.starts_with(';'))
        .map(|l| l.split_whitespace().take(5).collect())
        .unwrap_or_default();
    assert_eq!(
        soa,
        ["cluster.local.", "30", "IN", "SOA", "ns.dns.cluster.local."],
        "{out}"
    );
    // The name exists with an A only: AAAA is NODATA, which a resolver must not take as
    // "no such name".
    let out = dig(s.addr, &["reviews.bookinfo.svc.cluster.local", "AAAA"]).await?;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("ANSWER: 0,"), "{out}");
    assert!(out.contains("AUTHORITY: 1,"), "{out}");
    // The namespace level exists too.
    let out = dig(s.addr, &["bookinfo.svc.cluster.local", "A"]).await?;
    assert_eq!(status(&out), "NOERROR", "{out}");
    s.stop().await?;
    Ok(())
}

#[tokio::test]
async fn control_plane_aliases() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let s = control_plane().await?;
    for name in [
        "istio-pilot",
        "istio-pilot.istio-system",
        "istiod.istio-system.svc",
        "istio-citadel.istio-system.svc.cluster.local",
        "istio-ca",
    ] {
        assert_eq!(dig_short(s.addr, &[name, "A"]).await?, [CP_IP], "{name}");
    }
    s.stop().await?;
    Ok(())
}

#[tokio::test]
async fn other_names_refused_when_forwarding_is_off() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let s = control_plane().await?;
    let out = dig(s.addr, &["example.com", "A"]).await?;
    assert_eq!(status(&out), "REFUSED", "{out}");
    s.stop().await?;
    Ok(())
}

/// An upstream: another instance answering `*.upstream.test` names from its own table.
async fn upstream() -> Result<Running> {
    let mut b = NameTable::builder("cluster.local").unwrap();
    b.alias("www.upstream.test", ["192.0.2.7".parse().unwrap()])?
        .alias(
            "big.upstream.test",
            (0..150u8).map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i))),
        )?;
    start(DnsServerConfig::new(loopback()), b.build()).await
}

#[tokio::test]
async fn forwards_other_names_to_upstreams() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let up = upstream().await?;
    let mut config = DnsServerConfig::new(loopback());
    config.forward = Forward::Upstreams(vec![up.addr]);
    let metrics = DnsMetrics::new();
    let s = start_with_metrics(config, mesh_table().build(), Some(metrics.clone())).await?;
    let out = dig(s.addr, &["www.upstream.test", "A"]).await?;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("192.0.2.7"), "{out}");
    // The upstream refuses what it does not know, and that is relayed as is.
    let out = dig(s.addr, &["nothing.example", "A"]).await?;
    assert_eq!(status(&out), "REFUSED", "{out}");
    // Mesh names are still answered locally, never forwarded.
    let out = dig(s.addr, &["nope.bookinfo.svc.cluster.local", "A"]).await?;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    assert!(
        flags(&out).contains("ra"),
        "recursion available when forwarding: {out}"
    );
    // Over TCP too.
    assert_eq!(
        dig_short(s.addr, &["+tcp", "www.upstream.test", "A"]).await?,
        ["192.0.2.7"]
    );
    assert_eq!(
        metrics.responses_with(ResponseCode::NoError, Source::Upstream),
        2
    );
    assert_eq!(
        metrics.responses_with(ResponseCode::NXDomain, Source::Local),
        1
    );
    s.stop().await?;
    up.stop().await?;
    Ok(())
}

#[tokio::test]
async fn forwarded_big_answers_fall_back_to_tcp_end_to_end() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let up = upstream().await?;
    let mut config = DnsServerConfig::new(loopback());
    config.forward = Forward::Upstreams(vec![up.addr]);
    let s = start(config, mesh_table().build()).await?;
    // Over UDP the upstream truncates; the client sees TC and (by default) retries over TCP,
    // where this server fetches the whole answer from the upstream over TCP.
    let out = dig(s.addr, &["+ignore", "big.upstream.test", "A"]).await?;
    assert!(flags(&out).contains("tc"), "{out}");
    let out = dig(s.addr, &["big.upstream.test", "A"]).await?;
    assert!(out.contains("ANSWER: 150,"), "{out}");
    s.stop().await?;
    up.stop().await?;
    Ok(())
}

#[tokio::test]
async fn failover_past_a_dead_upstream_and_servfail_when_all_are_dead() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let up = upstream().await?;
    // A port with nobody behind it (bound then released).
    let dead = UdpSocket::bind(loopback()).await?.local_addr()?;
    let silent = UdpSocket::bind(loopback()).await?; // receives, never answers
    let mut config = DnsServerConfig::new(loopback());
    config.forward_timeout = Duration::from_millis(300);
    config.forward = Forward::Upstreams(vec![dead, silent.local_addr()?, up.addr]);
    let s = start(config, mesh_table().build()).await?;
    // Round-robin starts each query at a different upstream; every start reaches the live one.
    for _ in 0..3 {
        assert_eq!(
            dig_short(s.addr, &["www.upstream.test", "A"]).await?,
            ["192.0.2.7"]
        );
    }
    s.stop().await?;

    let mut config = DnsServerConfig::new(loopback());
    config.forward_timeout = Duration::from_millis(300);
    config.forward = Forward::Upstreams(vec![dead, silent.local_addr()?]);
    let s = start(config, mesh_table().build()).await?;
    let out = dig(s.addr, &["www.upstream.test", "A"]).await?;
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    s.stop().await?;
    up.stop().await?;
    Ok(())
}

#[tokio::test]
async fn agent_proxy_expands_search_domains() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let up = upstream().await?;
    let config = DnsServerConfig::agent(
        loopback(),
        isthmus_dns::search_domains("bookinfo", "cluster.local"),
        vec![up.addr],
    );
    let s = start(config, mesh_table().build()).await?;
    for name in [
        "reviews",
        "reviews.bookinfo",
        "reviews.bookinfo.svc",
        "reviews.bookinfo.svc.cluster.local",
    ] {
        let out = dig(s.addr, &[name, "A"]).await?;
        let owners: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(
            owners,
            [format!("{name}.")],
            "owner is the name asked: {out}"
        );
        assert!(out.contains("10.96.0.10"), "{name}: {out}");
    }
    // Everything else goes to the host's resolvers.
    assert_eq!(
        dig_short(s.addr, &["www.upstream.test", "A"]).await?,
        ["192.0.2.7"]
    );
    s.stop().await?;
    up.stop().await?;
    Ok(())
}

#[tokio::test]
async fn agent_answers_mesh_names_with_upstreams_down() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let dead = UdpSocket::bind(loopback()).await?.local_addr()?;
    let mut config = DnsServerConfig::agent(
        loopback(),
        isthmus_dns::search_domains("bookinfo", "cluster.local"),
        vec![dead],
    );
    config.forward_timeout = Duration::from_millis(200);
    let s = start(config, mesh_table().build()).await?;
    assert_eq!(dig_short(s.addr, &["reviews", "A"]).await?, ["10.96.0.10"]);
    assert_eq!(
        dig_short(s.addr, &["istiod.istio-system.svc", "A"]).await?,
        [CP_IP]
    );
    s.stop().await?;
    Ok(())
}

#[tokio::test]
async fn truncation_and_tcp_fallback() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let s = control_plane().await?;
    let name = "many.bookinfo.svc.cluster.local";
    // Without EDNS the limit is 512 bytes: TC, and no partial answer.
    let out = dig(s.addr, &["+ignore", "+noedns", name, "A"]).await?;
    assert!(flags(&out).contains("tc"), "{out}");
    assert!(out.contains("ANSWER: 0,"), "{out}");
    // With EDNS 1232 it is still too big.
    let out = dig(s.addr, &["+ignore", "+bufsize=1232", name, "A"]).await?;
    assert!(flags(&out).contains("tc"), "{out}");
    // By default dig retries over TCP and gets everything.
    let out = dig(s.addr, &[name, "A"]).await?;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("ANSWER: 200,"), "{out}");
    // And +tcp asks over TCP from the start.
    let out = dig(s.addr, &["+tcp", name, "A"]).await?;
    assert!(out.contains("ANSWER: 200,"), "{out}");
    assert!(!flags(&out).contains("tc"), "{out}");
    assert_eq!(
        dig_short(s.addr, &["+tcp", "reviews.bookinfo.svc.cluster.local"]).await?,
        ["10.96.0.10"]
    );
    s.stop().await?;
    Ok(())
}

#[tokio::test]
async fn malformed_packets_do_not_stop_the_server() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let metrics = DnsMetrics::new();
    let s = start_with_metrics(
        DnsServerConfig::new(loopback()),
        mesh_table().build(),
        Some(metrics.clone()),
    )
    .await?;
    let client = UdpSocket::bind(loopback()).await?;
    client.connect(s.addr).await?;

    // A header that promises a question that is not there: FORMERR with the same ID.
    client
        .send(&[0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0x07])
        .await?;
    let mut buf = [0u8; 1500];
    let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await??;
    let reply = Message::from_vec(&buf[..len])?;
    assert_eq!(reply.metadata.id, 0xabcd);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    // Random garbage of many lengths (deterministic seed-free pattern), and a too-short one.
    let mut x: u32 = 0x9e37_79b9;
    for len in [0usize, 1, 5, 11, 12, 13, 40, 300, 512, 1400, 4000] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        client.send(&bytes).await?;
    }
    // Garbage over TCP, framed and unframed.
    let mut tcp = TcpStream::connect(s.addr).await?;
    tcp.write_all(&[0x00, 0x05, 1, 2, 3, 4, 5]).await?;
    let mut len_buf = [0u8; 2];
    // Too short for a header: the server closes rather than answer.
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut len_buf)).await??;
    assert_eq!(n, 0, "connection closed");
    let mut tcp = TcpStream::connect(s.addr).await?;
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    drop(tcp);

    // Still answering, over both transports.
    assert_eq!(
        dig_short(s.addr, &["reviews.bookinfo.svc.cluster.local"]).await?,
        ["10.96.0.10"]
    );
    assert_eq!(
        dig_short(s.addr, &["+tcp", "reviews.bookinfo.svc.cluster.local"]).await?,
        ["10.96.0.10"]
    );
    assert!(metrics.responses_with(ResponseCode::FormErr, Source::Local) >= 1);
    s.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_new_table_is_visible_to_the_next_query() -> Result<()> {
    if dig_missing() {
        return Ok(());
    }
    let s = control_plane().await?;
    assert_eq!(
        dig(s.addr, &["ratings.bookinfo.svc.cluster.local"])
            .await
            .map(|o| status(&o).to_owned())?,
        "NXDOMAIN"
    );
    let mut b = mesh_table();
    b.service("ratings", "bookinfo", ["10.96.0.20".parse().unwrap()])?;
    s.table.send(Arc::new(b.build()))?;
    // Every receiving task sees the swap on its next query; poll with a deadline as several
    // tasks share the socket.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = dig_short(s.addr, &["ratings.bookinfo.svc.cluster.local"]).await?;
        if got == ["10.96.0.20"] {
            break;
        }
        assert!(Instant::now() < deadline, "new table not visible: {got:?}");
    }
    // And over TCP.
    assert_eq!(
        dig_short(s.addr, &["+tcp", "ratings.bookinfo.svc.cluster.local"]).await?,
        ["10.96.0.20"]
    );
    s.stop().await?;
    Ok(())
}

#[tokio::test]
async fn stop_releases_the_port() -> Result<()> {
    let s = control_plane().await?;
    let addr = s.addr;
    s.stop().await?;
    // Both sockets are closed: the same port binds again for UDP and TCP.
    let again = start(DnsServerConfig::new(addr), mesh_table().build()).await?;
    assert_eq!(again.addr, addr);
    again.stop().await?;
    Ok(())
}

#[tokio::test]
async fn refuses_to_forward_to_itself() -> Result<()> {
    let probe = control_plane().await?;
    let addr = probe.addr;
    probe.stop().await?;
    let mut config = DnsServerConfig::new(addr);
    config.forward = Forward::Upstreams(vec![addr]);
    let (_tx, rx) = watch::channel(Arc::new(mesh_table().build()));
    match DnsServer::bind(config, rx).await {
        Err(e @ ServerError::ForwardLoop { .. }) => {
            assert!(e.to_string().contains(&addr.to_string()), "{e}");
        }
        Err(other) => panic!("expected a loop error, got {other}"),
        Ok(_) => panic!("a server forwarding to itself started"),
    }
    let mut config = DnsServerConfig::new(loopback());
    config.forward = Forward::Upstreams(vec![]);
    let (_tx, rx) = watch::channel(Arc::new(mesh_table().build()));
    assert!(matches!(
        DnsServer::bind(config, rx).await,
        Err(ServerError::NoUpstreams)
    ));
    Ok(())
}

#[tokio::test]
async fn bind_conflict_names_the_address() -> Result<()> {
    let s = control_plane().await?;
    let (_tx, rx) = watch::channel(Arc::new(mesh_table().build()));
    let err = match DnsServer::bind(DnsServerConfig::new(s.addr), rx).await {
        Err(e) => e,
        Ok(_) => panic!("bound the same port twice"),
    };
    assert!(err.to_string().contains(&s.addr.to_string()), "{err}");
    assert!(err.to_string().contains("using the port"), "{err}");
    s.stop().await?;
    Ok(())
}

/// The request path answers as hickory's own client encoding expects (no dig needed).
#[tokio::test]
async fn hickory_encoded_query_over_udp() -> Result<()> {
    let s = control_plane().await?;
    let client = UdpSocket::bind(loopback()).await?;
    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii("istio-pilot.istio-system.")?,
        RecordType::A,
    ));
    client.send_to(&q.to_vec()?, s.addr).await?;
    let mut buf = [0u8; 1500];
    let (len, _) =
        tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf)).await??;
    let reply = Message::from_vec(&buf[..len])?;
    assert_eq!(reply.metadata.id, q.metadata.id);
    assert_eq!(reply.answers.len(), 1);
    s.stop().await?;
    Ok(())
}

fn encoded_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    q.to_vec().unwrap()
}

/// Several queries on one TCP connection are answered in turn (RFC 7766).
#[tokio::test]
async fn several_queries_on_one_tcp_connection() -> Result<()> {
    let s = control_plane().await?;
    let mut tcp = TcpStream::connect(s.addr).await?;
    let mut out = Vec::new();
    for (id, name) in [
        (1u16, "reviews.bookinfo.svc.cluster.local."),
        (2, "nope.bookinfo.svc.cluster.local."),
    ] {
        let q = encoded_query(id, name);
        out.extend_from_slice(&(q.len() as u16).to_be_bytes());
        out.extend_from_slice(&q);
    }
    tcp.write_all(&out).await?;
    for (id, rcode) in [(1u16, ResponseCode::NoError), (2, ResponseCode::NXDomain)] {
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut len)).await??;
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        tcp.read_exact(&mut body).await?;
        let reply = Message::from_vec(&body)?;
        assert_eq!(
            (reply.metadata.id, reply.metadata.response_code),
            (id, rcode)
        );
    }
    s.stop().await?;
    Ok(())
}

/// With the in-flight limit reached, further forwards get SERVFAIL at once instead of queueing.
#[tokio::test]
async fn forwards_beyond_the_in_flight_limit_get_servfail_at_once() -> Result<()> {
    let silent = UdpSocket::bind(loopback()).await?; // takes queries, never answers
    let mut config = DnsServerConfig::new(loopback());
    config.forward = Forward::Upstreams(vec![silent.local_addr()?]);
    config.forward_timeout = Duration::from_secs(30);
    config.max_in_flight_forwards = 1;
    let metrics = DnsMetrics::new();
    let s = start_with_metrics(config, mesh_table().build(), Some(metrics.clone())).await?;
    let client = UdpSocket::bind(loopback()).await?;
    client.connect(s.addr).await?;
    client.send(&encoded_query(1, "one.example.")).await?;
    // The first forward holds the only slot once the upstream has its query.
    let mut buf = [0u8; 1500];
    tokio::time::timeout(Duration::from_secs(5), silent.recv_from(&mut buf)).await??;
    client.send(&encoded_query(2, "two.example.")).await?;
    let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await??;
    let reply = Message::from_vec(&buf[..len])?;
    assert_eq!(reply.metadata.id, 2);
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    // Mesh names are still answered while the slot is taken.
    client
        .send(&encoded_query(3, "reviews.bookinfo.svc.cluster.local."))
        .await?;
    let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await??;
    let reply = Message::from_vec(&buf[..len])?;
    assert_eq!((reply.metadata.id, reply.answers.len()), (3, 1));
    s.stop().await?;
    Ok(())
}

/// One query over a fresh TCP connection from `source`; the response code.
async fn tcp_query_from(source: IpAddr, to: SocketAddr, id: u16) -> Result<ResponseCode> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut tcp = socket.connect(to).await?;
    let q = encoded_query(id, "reviews.bookinfo.svc.cluster.local.");
    let mut out = (q.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    tcp.write_all(&out).await?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut len)).await??;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut body).await?;
    Ok(Message::from_vec(&body)?.metadata.response_code)
}

/// Whether the server closed `tcp` within `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// TCP clients are bounded: a source over its cap is refused, at the total cap a silent client
/// makes room for a new one (a client that has sent a query is never the one closed), and a
/// silent client is closed at the first-message deadline.
#[tokio::test]
async fn tcp_clients_are_capped_in_total_and_per_source_and_silent_ones_make_room() -> Result<()> {
    let guard = isthmus_socket::ConnGuard::new(
        "dns_tcp",
        isthmus_socket::GuardConfig {
            max_total: 4,
            max_per_source: 2,
            handshake_timeout: Duration::from_secs(3),
            first_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(30),
        },
    );
    let mut config = DnsServerConfig::new(loopback());
    config.tcp_guard = Some(guard.clone());
    let s = start(config, mesh_table().build()).await?;
    let src = |last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
    let connect = |source| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        anyhow::Ok(socket.connect(s.addr).await?)
    };
    // A proven client (a query answered on a kept connection).
    let mut proven = connect(src(2)).await?;
    let q = encoded_query(1, "reviews.bookinfo.svc.cluster.local.");
    let mut out = (q.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    proven.write_all(&out).await?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), proven.read_exact(&mut len)).await??;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    proven.read_exact(&mut body).await?;
    // Two silent clients from one source; a third from it is refused at once.
    let mut silent_a = connect(src(3)).await?;
    let _silent_b = connect(src(3)).await?;
    let mut third = connect(src(3)).await?;
    assert!(closed_within(&mut third, Duration::from_secs(1)).await);
    // Total cap 4: one more fills it; the next evicts the oldest silent one (a), not the proven.
    let _silent_c = connect(src(4)).await?;
    assert_eq!(
        tcp_query_from(src(5), s.addr, 2).await?,
        ResponseCode::NoError
    );
    assert!(closed_within(&mut silent_a, Duration::from_secs(1)).await);
    // The proven client is still served on its connection.
    proven.write_all(&out).await?;
    tokio::time::timeout(Duration::from_secs(5), proven.read_exact(&mut len)).await??;
    // Silent clients are closed at the first-message deadline.
    let mut late = connect(src(6)).await?;
    let start = Instant::now();
    assert!(closed_within(&mut late, Duration::from_secs(8)).await);
    assert!(start.elapsed() >= Duration::from_millis(2900));
    s.stop().await?;
    Ok(())
}
