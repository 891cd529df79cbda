//! One factory for the agent's sockets, after ztunnel's `SocketFactory` (src/proxy.rs).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// The mark on the agent's packets: Istio's `PACKET_MARK` and ztunnel's, 1337 (`0x539`).
pub const DEFAULT_PROXY_MARK: u32 = 1337;

/// How long the port of an unmarked connect counts as the agent's own after the connect ends:
/// a connection looping back through the capture rules reaches the outbound listener within
/// the same handshake, so this only has to cover scheduling delays.
const OWN_PORT_GRACE: Duration = Duration::from_secs(2);
/// Ports of connects still in progress stay this long at most (beyond any connect timeout).
const OWN_PORT_MAX: Duration = Duration::from_secs(60);

/// TCP keepalive probes, as ztunnel's defaults: first probe after `time` idle, then every
/// `interval`, the connection dropped after `retries` unanswered ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Duration,
    pub interval: Duration,
    pub retries: u32,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            time: Duration::from_secs(180),
            interval: Duration::from_secs(180),
            retries: 9,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketOptions {
    /// `SO_MARK` on every socket (needs CAP_NET_ADMIN); `None` leaves packets unmarked.
    pub mark: Option<u32>,
    pub nodelay: bool,
    pub keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT`: unacknowledged data for this long drops the connection.
    pub user_timeout: Option<Duration>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self {
            mark: None,
            nodelay: true,
            keepalive: Some(Keepalive::default()),
            user_timeout: None,
        }
    }
}

/// Makes the agent's sockets. Shared (`Arc`) by every part of the agent; cheap to call from any
/// runtime.
#[derive(Debug)]
pub struct SocketFactory {
    options: SocketOptions,
    /// Cleared at the first refusal to mark (no CAP_NET_ADMIN): later sockets do not try again,
    /// and the refusal is logged once.
    mark_works: AtomicBool,
    /// Set once a source address could not be bound (logged the first time only).
    source_unbindable: AtomicBool,
    own: OwnPorts,
}

impl Default for SocketFactory {
    fn default() -> Self {
        Self::new(SocketOptions::default())
    }
}

impl SocketFactory {
    pub fn new(options: SocketOptions) -> Self {
        Self {
            mark_works: AtomicBool::new(options.mark.is_some()),
            source_unbindable: AtomicBool::new(false),
            options,
            own: OwnPorts::default(),
        }
    }

    /// A factory with the default options and no mark (for an agent that does not capture, and
    /// for tests).
    pub fn unmarked() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn options(&self) -> &SocketOptions {
        &self.options
    }

    /// The mark the agent's packets carry: `None` when none is configured or the kernel refused
    /// it.
    pub fn mark(&self) -> Option<u32> {
        self.options
            .mark
            .filter(|_| self.mark_works.load(Ordering::Relaxed))
    }

    /// Tries the mark on a throwaway socket, so the caller can tell at start whether the
    /// agent's packets will carry it. `Ok(false)` when no mark is configured.
    pub fn check_mark(&self) -> io::Result<bool> {
        let Some(mark) = self.options.mark else {
            return Ok(false);
        };
        let probe = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        match setsockopt(&probe, sockopt::Mark, &mark) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.mark_works.store(false, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    /// Connects to `dst` with the factory's options.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        self.connect_from(dst, None).await
    }

    /// Connects to `dst` from `source` when that address is local to this host (the control
    /// plane believes the address a host claims when its connection comes from it); where it
    /// is not (`EADDRNOTAVAIL`: NAT, a VIP, a test), connects unbound and says so once.
    pub async fn connect_from(
        &self,
        dst: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<TcpStream> {
        let socket = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let marked = self.set_mark(&socket);
        self.tcp_options(&socket);
        let bound = match source.filter(|s| s.is_ipv4() == dst.is_ipv4()) {
            Some(src) => match socket.bind(SocketAddr::new(src, 0)) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(nix::libc::EADDRNOTAVAIL) => {
                    if !self.source_unbindable.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            source = %src,
                            %dst,
                            "the host's address is not local (NAT or a virtual address): \
                             connecting from the address the kernel picks; the control plane \
                             then believes the claimed address only if the certificate or a \
                             registered WorkloadEntry vouches for it"
                        );
                    }
                    false
                }
                Err(e) => return Err(e),
            },
            None => false,
        };
        // Unmarked, a connection could come back to the agent's own capture listener: bind first,
        // so its port is known before the first packet leaves.
        let own = if marked {
            None
        } else {
            if !bound {
                socket.bind(unspecified(dst))?;
            }
            let port = socket.local_addr()?.port();
            self.own.insert(port);
            Some(port)
        };
        let connected = socket.connect(dst).await;
        if let Some(port) = own {
            self.own.done(port);
        }
        let stream = connected?;
        if self.options.nodelay {
            stream.set_nodelay(true)?;
        }
        Ok(stream)
    }

    /// A UDP socket bound to the unspecified address of `dst`'s family, with the mark.
    pub fn udp_for(&self, dst: SocketAddr) -> io::Result<UdpSocket> {
        let std = std::net::UdpSocket::bind(unspecified(dst))?;
        self.set_mark(&std);
        std.set_nonblocking(true)?;
        UdpSocket::from_std(std)
    }

    /// True when `peer` (the source of a connection accepted on a capture listener) is a socket
    /// the agent itself is connecting or just connected without a mark: a loop.
    pub fn is_own(&self, peer: SocketAddr) -> bool {
        self.own.contains(peer.port())
    }

    fn set_mark<F: std::os::fd::AsFd>(&self, socket: &F) -> bool {
        let Some(mark) = self.options.mark else {
            return false;
        };
        if !self.mark_works.load(Ordering::Relaxed) {
            return false;
        }
        match setsockopt(socket, sockopt::Mark, &mark) {
            Ok(()) => true,
            Err(e) => {
                if self.mark_works.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        mark = format_args!("{mark:#x}"),
                        error = %e,
                        "cannot mark the agent's sockets (SO_MARK needs CAP_NET_ADMIN); going on \
                         unmarked: only the uid/gid exemptions keep its traffic from being captured"
                    );
                }
                false
            }
        }
    }

    fn tcp_options(&self, socket: &TcpSocket) {
        // Options are best effort: a kernel without one still connects.
        if let Some(k) = self.options.keepalive {
            let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
            let _ = setsockopt(socket, sockopt::KeepAlive, &true);
            let _ = setsockopt(socket, sockopt::TcpKeepIdle, &secs(k.time));
            let _ = setsockopt(socket, sockopt::TcpKeepInterval, &secs(k.interval));
            let _ = setsockopt(socket, sockopt::TcpKeepCount, &k.retries);
        }
        if let Some(t) = self.options.user_timeout {
            let ms = u32::try_from(t.as_millis()).unwrap_or(u32::MAX);
            let _ = setsockopt(socket, sockopt::TcpUserTimeout, &ms);
        }
    }
}

fn unspecified(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Local ports of the agent's unmarked connects, each until shortly after its connect ends.
/// A port bound explicitly is never shared with another socket while it is open, so a match
/// is the agent's own connection.
#[derive(Debug, Default)]
struct OwnPorts {
    ports: Mutex<HashMap<u16, Instant>>,
}

impl OwnPorts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Instant>> {
        // A map of expiry times stays consistent whatever panicked while holding it.
        self.ports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, port: u16) {
        let now = Instant::now();
        let mut ports = self.lock();
        if ports.len() >= 1024 {
            ports.retain(|_, until| *until > now);
        }
        ports.insert(port, now + OWN_PORT_MAX);
    }

    fn done(&self, port: u16) {
        self.lock().insert(port, Instant::now() + OWN_PORT_GRACE);
    }

    fn contains(&self, port: u16) -> bool {
        self.lock()
            .get(&port)
            .is_some_and(|until| *until > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::getsockopt;

    fn root() -> bool {
        nix::unistd::Uid::effective().is_root()
    }

    #[tokio::test]
    async fn connects_with_nodelay_and_keepalive() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = SocketFactory::unmarked();
        let s = f.connect(l.local_addr().unwrap()).await.unwrap();
        assert!(s.nodelay().unwrap());
        assert!(getsockopt(&s, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&s, sockopt::TcpKeepIdle).unwrap(), 180);
        assert_eq!(getsockopt(&s, sockopt::TcpKeepCount).unwrap(), 9);
        assert_eq!(f.mark(), None);
    }

    #[tokio::test]
    async fn an_unmarked_connect_is_known_as_the_agents_own() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = SocketFactory::unmarked();
        let s = f.connect(l.local_addr().unwrap()).await.unwrap();
        let (_accepted, peer) = l.accept().await.unwrap();
        assert_eq!(peer, s.local_addr().unwrap());
        assert!(f.is_own(peer));
        // Someone else's connection is not.
        let other = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        assert!(!f.is_own(other.local_addr().unwrap()));
    }

    #[tokio::test]
    async fn connects_from_a_local_source_and_unbound_from_a_foreign_one() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = l.local_addr().unwrap();
        let f = SocketFactory::unmarked();
        let local: IpAddr = "127.0.0.9".parse().unwrap();
        let s = f.connect_from(dst, Some(local)).await.unwrap();
        let (_a, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), local);
        assert!(
            f.is_own(s.local_addr().unwrap()),
            "still tracked as the agent's own"
        );
        // TEST-NET-1 is never local: connected from what the kernel picks.
        let foreign: IpAddr = "192.0.2.1".parse().unwrap();
        let _s = f.connect_from(dst, Some(foreign)).await.unwrap();
        let (_b, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 1]));
        assert!(f.source_unbindable.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn marks_when_allowed_and_goes_on_unmarked_when_not() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = SocketFactory::new(SocketOptions {
            mark: Some(DEFAULT_PROXY_MARK),
            ..SocketOptions::default()
        });
        let allowed = f.check_mark().is_ok();
        // Root has CAP_NET_ADMIN unless the test runs in a container without it.
        if !root() {
            assert!(!allowed);
        }
        let s = f.connect(l.local_addr().unwrap()).await.unwrap();
        let mark = getsockopt(&s, sockopt::Mark).unwrap();
        if allowed {
            assert_eq!(mark, 0x539);
            assert_eq!(f.mark(), Some(0x539));
            // Marked: the mark keeps it out of capture, so no port is recorded.
            assert!(!f.is_own(s.local_addr().unwrap()));
        } else {
            assert_eq!(mark, 0);
            assert_eq!(f.mark(), None);
            assert!(f.is_own(s.local_addr().unwrap()));
        }
        let u = f.udp_for("127.0.0.1:53".parse().unwrap()).unwrap();
        assert_eq!(
            getsockopt(&u, sockopt::Mark).unwrap(),
            if allowed { 0x539 } else { 0 }
        );
    }

    #[test]
    fn own_ports_expire() {
        let own = OwnPorts::default();
        own.insert(40000);
        assert!(own.contains(40000));
        own.lock()
            .insert(40000, Instant::now() - Duration::from_millis(1));
        assert!(!own.contains(40000));
        assert!(!own.contains(40001));
    }
}
