//! The DNS server: UDP and TCP on one address, answering from the current [`NameTable`] and
//! forwarding the rest.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Header, ResponseCode};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use isthmus_socket::{Conn, ConnGuard, GuardConfig, Stage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::forward::{framed, Forwarder};
use crate::metrics::{DnsMetrics, Source};
use crate::resolv::remove_self;
use crate::responder::{Reply, Responder, ResponderConfig, ResponderError, Transport};
use crate::table::NameTable;

/// Where the agent's DNS proxy listens (Istio's port 15053, loopback only).
pub const DEFAULT_AGENT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15053);

/// How long one upstream gets to answer before the next is tried.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Forwards in flight at once; beyond this clients get SERVFAIL at once, so a flood of
/// non-mesh names costs bounded memory and sockets.
pub const DEFAULT_MAX_IN_FLIGHT_FORWARDS: usize = 1024;

/// Concurrent TCP clients; further connections are closed at once.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 256;

/// A TCP client silent this long is disconnected (RFC 7766 suggests seconds); a new one has
/// as long to send its first message.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Once a TCP message's length has arrived, the message itself must follow within this.
pub const DEFAULT_TCP_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest UDP request read; longer datagrams are cut and answered FORMERR.
const MAX_UDP_REQUEST: usize = 4096;

/// What to do with names that are not mesh names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Answer REFUSED.
    Refuse,
    /// Ask these resolvers (round-robin, failing over in order).
    Upstreams(Vec<SocketAddr>),
}

/// Everything a [`DnsServer`] needs besides its table.
#[derive(Clone, Debug)]
pub struct DnsServerConfig {
    /// UDP and TCP listen here; port 0 picks a free port (the same for both).
    pub listen: SocketAddr,
    /// TTL, search domains and EDNS size. Its `forwarding` is set from `forward`.
    pub responder: ResponderConfig,
    pub forward: Forward,
    pub forward_timeout: Duration,
    pub max_in_flight_forwards: usize,
    pub max_tcp_connections: usize,
    pub tcp_idle_timeout: Duration,
    pub tcp_message_timeout: Duration,
    /// The TCP listener's guard (caps in total and per source, first-message and idle
    /// deadlines); `None` builds one from `max_tcp_connections` and `tcp_idle_timeout`, a
    /// quarter of the cap per source.
    pub tcp_guard: Option<ConnGuard>,
    /// Tasks receiving on the UDP socket (more than one lets answers use several cores).
    pub udp_workers: usize,
    /// Makes the forwarding sockets (the agent's are marked, so its DNS capture lets them by).
    pub sockets: Arc<isthmus_socket::SocketFactory>,
}

/// Errors starting or running the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot listen for DNS over {proto} on {addr}: {source}; is another DNS server \
         (dnsmasq, systemd-resolved, a second agent) using the port?"
    )]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(transparent)]
    Responder(#[from] ResponderError),
    #[error(
        "forwarding is on but no upstream resolver was given; name one, or refuse non-mesh names"
    )]
    NoUpstreams,
    #[error(
        "every upstream resolver ({removed:?}) is this DNS server itself on {listen}: \
         forwarding would loop; name another upstream (is /etc/resolv.conf pointing at the proxy?)"
    )]
    ForwardLoop {
        listen: SocketAddr,
        removed: Vec<SocketAddr>,
    },
    #[error("the DNS {proto} listener on {addr} failed: {source}")]
    Io {
        proto: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// A bound DNS server; [`DnsServer::serve`] runs it.
pub struct DnsServer {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    local_addr: SocketAddr,
    udp_workers: usize,
    shared: Arc<Shared>,
}

struct Shared {
    responder: Responder,
    forwarder: Option<Forwarder>,
    metrics: Option<DnsMetrics>,
    table: watch::Receiver<Arc<NameTable>>,
    tcp_guard: ConnGuard,
    tcp_message_timeout: Duration,
}

impl DnsServerConfig {
    /// Defaults around `listen`: 30 s TTL, no search domains, REFUSED for non-mesh names.
    pub fn new(listen: SocketAddr) -> Self {
        DnsServerConfig {
            listen,
            responder: ResponderConfig::default(),
            forward: Forward::Refuse,
            forward_timeout: DEFAULT_FORWARD_TIMEOUT,
            max_in_flight_forwards: DEFAULT_MAX_IN_FLIGHT_FORWARDS,
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            tcp_message_timeout: DEFAULT_TCP_MESSAGE_TIMEOUT,
            tcp_guard: None,
            udp_workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4),
            sockets: isthmus_socket::SocketFactory::unmarked(),
        }
    }

    /// The agent's proxy: search domains of the host's namespace, forwarding to the host's
    /// resolvers (from [`crate::read_resolv_conf`]).
    pub fn agent(listen: SocketAddr, search: Vec<String>, upstreams: Vec<SocketAddr>) -> Self {
        let mut config = Self::new(listen);
        config.responder.search = search;
        config.forward = Forward::Upstreams(upstreams);
        config
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `config.listen`. The table is read afresh for every request, so a
    /// value sent on its channel is in effect for the next query.
    pub async fn bind(
        config: DnsServerConfig,
        table: watch::Receiver<Arc<NameTable>>,
    ) -> Result<Self, ServerError> {
        Self::bind_with_metrics(config, table, None).await
    }

    /// As [`DnsServer::bind`], counting responses in `metrics`.
    pub async fn bind_with_metrics(
        mut config: DnsServerConfig,
        table: watch::Receiver<Arc<NameTable>>,
        metrics: Option<DnsMetrics>,
    ) -> Result<Self, ServerError> {
        config.responder.forwarding = matches!(config.forward, Forward::Upstreams(_));
        let responder = Responder::new(config.responder.clone())?;
        if matches!(&config.forward, Forward::Upstreams(u) if u.is_empty()) {
            return Err(ServerError::NoUpstreams);
        }
        let (udp, tcp, local_addr) = bind_pair(config.listen).await?;
        let forwarder = match config.forward {
            Forward::Refuse => None,
            Forward::Upstreams(mut upstreams) => {
                let removed = remove_self(&mut upstreams, local_addr);
                if upstreams.is_empty() {
                    return Err(ServerError::ForwardLoop {
                        listen: local_addr,
                        removed,
                    });
                }
                if !removed.is_empty() {
                    tracing::warn!(
                        ?removed,
                        listen = %local_addr,
                        "not forwarding DNS to this server itself (it would loop)"
                    );
                }
                Some(Forwarder::new(
                    upstreams,
                    config.forward_timeout,
                    config.max_in_flight_forwards,
                    metrics.clone(),
                    config.sockets.clone(),
                ))
            }
        };
        Ok(DnsServer {
            udp: Arc::new(udp),
            tcp,
            local_addr,
            udp_workers: config.udp_workers.max(1),
            shared: Arc::new(Shared {
                responder,
                forwarder,
                metrics,
                table,
                tcp_guard: config.tcp_guard.clone().unwrap_or_else(|| {
                    ConnGuard::new(
                        "dns_tcp",
                        GuardConfig {
                            max_total: config.max_tcp_connections,
                            max_per_source: (config.max_tcp_connections / 4).max(4),
                            handshake_timeout: config.tcp_idle_timeout,
                            first_timeout: config.tcp_idle_timeout,
                            idle_timeout: config.tcp_idle_timeout,
                        },
                    )
                }),
                tcp_message_timeout: config.tcp_message_timeout,
            }),
        })
    }

    /// The address UDP and TCP are bound to (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then stops listening and drops in-flight work.
    /// Returns an error only if a listener fails for good.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let mut tasks: JoinSet<Result<(), ServerError>> = JoinSet::new();
        for _ in 0..self.udp_workers {
            tasks.spawn(udp_worker(self.shared.clone(), self.udp.clone()));
        }
        tasks.spawn(tcp_acceptor(self.shared.clone(), self.tcp, self.local_addr));
        tracing::info!(
            addr = %self.local_addr,
            forwarding = self.shared.responder.forwarding(),
            "DNS server listening"
        );
        let result = tokio::select! {
            () = shutdown => Ok(()),
            Some(ended) = tasks.join_next() => match ended {
                Ok(result) => result,
                Err(join) => Err(ServerError::Io {
                    proto: "UDP/TCP",
                    addr: self.local_addr,
                    source: io::Error::other(join.to_string()),
                }),
            },
        };
        // Aborting the tasks drops their own sets of connections and forwards with them.
        tasks.shutdown().await;
        tracing::info!(addr = %self.local_addr, "DNS server stopped");
        result
    }
}

impl Shared {
    fn count(&self, rcode: ResponseCode, source: Source, transport: Transport) {
        if let Some(m) = &self.metrics {
            m.response(rcode, source, transport);
        }
    }
}

/// Binds UDP, then TCP on the same port. With port 0 the kernel's UDP choice may be taken for
/// TCP; a few fresh tries make that vanishingly unlikely.
async fn bind_pair(
    listen: SocketAddr,
) -> Result<(UdpSocket, TcpListener, SocketAddr), ServerError> {
    let attempts = if listen.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|source| ServerError::Bind {
                proto: "UDP",
                addr: listen,
                source,
            })?;
        let local = udp.local_addr().map_err(|source| ServerError::Bind {
            proto: "UDP",
            addr: listen,
            source,
        })?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp, local)),
            Err(source) => {
                last = Some(ServerError::Bind {
                    proto: "TCP",
                    addr: local,
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or(ServerError::Bind {
        proto: "TCP",
        addr: listen,
        source: io::Error::from(io::ErrorKind::AddrInUse),
    }))
}

/// One receiving task: answers from the table and hands forwards to their own tasks.
async fn udp_worker(shared: Arc<Shared>, socket: Arc<UdpSocket>) -> Result<(), ServerError> {
    let mut table_rx = shared.table.clone();
    // Held per worker and refreshed only when the channel's version moves: an atomic load per
    // batch instead of the channel's lock.
    let mut table = table_rx.borrow_and_update().clone();
    let mut forwards = JoinSet::new();
    #[cfg(target_os = "linux")]
    {
        let mut batch = crate::udp_batch::Batch::new(MAX_UDP_REQUEST);
        let mut out = Vec::with_capacity(crate::udp_batch::BATCH);
        loop {
            let received = match batch.recv(&socket).await {
                Ok(received) => received,
                Err(e) => {
                    receive_failed(&e).await;
                    continue;
                }
            };
            if table_rx.has_changed().unwrap_or(false) {
                table = table_rx.borrow_and_update().clone();
            }
            while forwards.try_join_next().is_some() {}
            out.clear();
            for (index, &(len, peer)) in received.iter().enumerate() {
                if peer.port() == 0 {
                    continue; // no address to answer to
                }
                let request = batch.datagram(index, len);
                if let Some(bytes) =
                    handle_datagram(&shared, &table, request, peer, &socket, &mut forwards)
                {
                    out.push((bytes, peer));
                }
            }
            crate::udp_batch::send_all(&socket, &out).await;
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let mut buf = vec![0u8; MAX_UDP_REQUEST];
        loop {
            let (len, peer) = match socket.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(e) => {
                    receive_failed(&e).await;
                    continue;
                }
            };
            if table_rx.has_changed().unwrap_or(false) {
                table = table_rx.borrow_and_update().clone();
            }
            while forwards.try_join_next().is_some() {}
            if let Some(bytes) =
                handle_datagram(&shared, &table, &buf[..len], peer, &socket, &mut forwards)
            {
                send(&socket, &bytes, peer).await;
            }
        }
    }
}

async fn receive_failed(e: &io::Error) {
    // Per-datagram errors (e.g. an ICMP error queued for an earlier reply) do not make the
    // socket unusable; yielding keeps a persistent one from starving other tasks.
    tracing::debug!(error = %e, "DNS UDP receive failed");
    tokio::task::yield_now().await;
}

/// The answer to send back at once, if any; a forward runs in its own task and answers later.
fn handle_datagram(
    shared: &Arc<Shared>,
    table: &NameTable,
    request: &[u8],
    peer: SocketAddr,
    socket: &Arc<UdpSocket>,
    forwards: &mut JoinSet<()>,
) -> Option<Vec<u8>> {
    match shared.responder.respond(table, request, Transport::Udp) {
        Reply::Answer(answer) => {
            shared.count(answer.rcode, Source::Local, Transport::Udp);
            Some(answer.bytes)
        }
        Reply::Drop => {
            if let Some(m) = &shared.metrics {
                m.dropped();
            }
            None
        }
        Reply::Forward(query) => {
            // The responder forwards only when a forwarder exists.
            let forwarder = shared.forwarder.as_ref()?;
            let Some(permit) = forwarder.try_permit() else {
                shared.count(ResponseCode::ServFail, Source::Local, Transport::Udp);
                return query.servfail();
            };
            let request = request.to_vec();
            let (shared, socket) = (shared.clone(), socket.clone());
            forwards.spawn(async move {
                let _permit: OwnedSemaphorePermit = permit;
                let Some(forwarder) = &shared.forwarder else {
                    return;
                };
                if let Some(bytes) = forwarder.forward(&query, &request, Transport::Udp).await {
                    shared.count(response_code(&bytes), Source::Upstream, Transport::Udp);
                    send(&socket, &bytes, peer).await;
                }
            });
            None
        }
    }
}

async fn send(socket: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
    if let Err(e) = socket.send_to(bytes, peer).await {
        tracing::debug!(error = %e, %peer, "DNS UDP send failed");
    }
}

async fn tcp_acceptor(
    shared: Arc<Shared>,
    listener: TcpListener,
    _addr: SocketAddr,
) -> Result<(), ServerError> {
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning, keep serving.
                isthmus_socket::accept_failed("dns_tcp", &e).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        // Refused (over a cap, counted and logged): dropped, closed at once.
        let Some(conn) = shared.tcp_guard.admit(peer, Stage::First) else {
            continue;
        };
        let span = tracing::debug_span!("dns_tcp", %peer);
        connections.spawn(tcp_connection(shared.clone(), stream, conn).instrument(span));
    }
}

/// Reads one length-prefixed message: `Ok(None)` when the client closed or failed, `Err` with
/// the stage whose deadline passed; `None` too when evicted.
async fn read_message(
    stream: &mut TcpStream,
    conn: &Conn,
    wait: Duration,
    message_timeout: Duration,
) -> Result<Option<Vec<u8>>, Stage> {
    let stage = conn.stage();
    let mut len = [0u8; 2];
    let read = tokio::select! {
        r = tokio::time::timeout(wait, stream.read_exact(&mut len)) => r,
        () = conn.evicted() => return Ok(None),
    };
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Ok(None),
        Err(_) => return Err(stage),
    }
    let mut request = vec![0u8; usize::from(u16::from_be_bytes(len))];
    let read = tokio::select! {
        r = tokio::time::timeout(message_timeout, stream.read_exact(&mut request)) => r,
        () = conn.evicted() => return Ok(None),
    };
    match read {
        Ok(Ok(_)) => Ok(Some(request)),
        Ok(Err(_)) => Ok(None),
        Err(_) => Err(stage),
    }
}

async fn tcp_connection(shared: Arc<Shared>, mut stream: TcpStream, conn: Conn) {
    let (first, idle) = (conn.config().first_timeout, conn.config().idle_timeout);
    let message_timeout = shared.tcp_message_timeout;
    let mut table_rx = shared.table.clone();
    // Several queries may come on one connection (RFC 7766); each is answered in turn.
    loop {
        let wait = if conn.stage() == Stage::Idle {
            idle
        } else {
            first
        };
        let request = match read_message(&mut stream, &conn, wait, message_timeout).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(stage) => {
                conn.timed_out(stage);
                return;
            }
        };
        // A whole message: this client can no longer be evicted to make room.
        conn.prove();
        let table = table_rx.borrow_and_update().clone();
        let (bytes, source) = match shared.responder.respond(&table, &request, Transport::Tcp) {
            Reply::Answer(answer) => (answer.bytes, Source::Local),
            Reply::Drop => {
                if let Some(m) = &shared.metrics {
                    m.dropped();
                }
                return;
            }
            Reply::Forward(query) => {
                let Some(forwarder) = &shared.forwarder else {
                    return;
                };
                let forwarded = match forwarder.try_permit() {
                    Some(_permit) => (
                        forwarder.forward(&query, &request, Transport::Tcp).await,
                        Source::Upstream,
                    ),
                    None => (query.servfail(), Source::Local),
                };
                let (Some(bytes), source) = forwarded else {
                    return;
                };
                (bytes, source)
            }
        };
        shared.count(response_code(&bytes), source, Transport::Tcp);
        match tokio::time::timeout(idle, stream.write_all(&framed(&bytes))).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

/// The response code of an encoded response, for metrics (only the 4-bit header part).
fn response_code(bytes: &[u8]) -> ResponseCode {
    Header::read(&mut BinDecoder::new(bytes))
        .map(|h| h.metadata.response_code)
        .unwrap_or(ResponseCode::ServFail)
}
