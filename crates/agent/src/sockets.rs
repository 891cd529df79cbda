//! The agent's sockets to the control plane: tonic channels that connect through the agent's
//! [`SocketFactory`] (marked, so capture never takes them), and the check at start that the
//! agent's own traffic is exempt from the rules it is about to install.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use isthmus_intercept::InterceptConfig;
use isthmus_socket::SocketFactory;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects `endpoint` (TLS and timeouts as configured on it) over a socket from `sockets`.
pub async fn connect_channel(
    endpoint: &Endpoint,
    sockets: Arc<SocketFactory>,
) -> Result<Channel, tonic::transport::Error> {
    connect_channel_from(endpoint, sockets, None).await
}

/// Like [`connect_channel`], from `source` when it is local to the host (see
/// [`SocketFactory::connect_from`]): the control plane believes the address in the agent's node
/// id when the connection comes from it.
pub async fn connect_channel_from(
    endpoint: &Endpoint,
    sockets: Arc<SocketFactory>,
    source: Option<IpAddr>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |uri: Uri| {
        let sockets = sockets.clone();
        async move {
            let stream = connect_uri(&sockets, &uri, source).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    endpoint.connect_with_connector(connector).await
}

/// Resolves the URI's authority and connects to the first address that answers.
async fn connect_uri(
    sockets: &SocketFactory,
    uri: &Uri,
    source: Option<IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::other(format!("{uri} names no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let mut last = None;
    for addr in addrs {
        match sockets.connect_from(addr, source).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{host} resolves to no address"))))
}

/// Why an agent would capture its own traffic.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to capture: the interception rules exempt {exempt}, but this agent runs as uid \
     {uid} and gid {gid}{mark}, so its own connections (to the control plane, to peers) would be \
     captured and loop; run it as the proxy user (uid {want_uid}), or give it CAP_NET_ADMIN so \
     it can mark its sockets"
)]
pub struct SelfCaptureError {
    exempt: String,
    uid: u32,
    gid: u32,
    mark: String,
    want_uid: String,
}

/// Which of the rules' exemptions covers this process: its uid, its gid, or the mark its
/// sockets carry (tried on a throwaway socket).
pub fn self_exemption(
    icfg: &InterceptConfig,
    sockets: &SocketFactory,
    uid: u32,
    gid: u32,
) -> Result<&'static str, SelfCaptureError> {
    let mark = sockets.check_mark();
    if icfg.proxy_mark.is_some() && matches!(mark, Ok(true)) {
        return Ok("mark");
    }
    if icfg.proxy_uid == Some(uid) {
        return Ok("uid");
    }
    if icfg.proxy_gid == Some(gid) {
        return Ok("gid");
    }
    let mut exempt = Vec::new();
    if let Some(u) = icfg.proxy_uid {
        exempt.push(format!("uid {u}"));
    }
    if let Some(g) = icfg.proxy_gid {
        exempt.push(format!("gid {g}"));
    }
    if let Some(m) = icfg.proxy_mark {
        exempt.push(format!("mark {m:#x}"));
    }
    Err(SelfCaptureError {
        exempt: exempt.join(", "),
        uid,
        gid,
        mark: match (icfg.proxy_mark, mark) {
            (Some(m), Err(e)) => format!(" and cannot mark its sockets with {m:#x} ({e})"),
            _ => String::new(),
        },
        want_uid: icfg
            .proxy_uid
            .map_or_else(|| "ISTHMUS_PROXY_UID".into(), |u| u.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_socket::SocketOptions;

    fn icfg(sidecar: &str) -> InterceptConfig {
        InterceptConfig::from_env(
            &isthmus_intercept::EnvFile::parse("cluster.env", "ISTIO_SERVICE_CIDR=*").unwrap(),
            &isthmus_intercept::EnvFile::parse("sidecar.env", sidecar).unwrap(),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn the_agent_must_be_exempt_by_uid_gid_or_mark() {
        let unmarked = SocketFactory::default();
        assert_eq!(
            self_exemption(&icfg(""), &unmarked, 1337, 0).unwrap(),
            "uid"
        );
        assert_eq!(
            self_exemption(&icfg(""), &unmarked, 0, 1337).unwrap(),
            "gid"
        );
        let e = self_exemption(&icfg("ISTHMUS_PROXY_MARK="), &unmarked, 0, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "refusing to capture: the interception rules exempt uid 1337, gid 1337, but this \
             agent runs as uid 0 and gid 0, so its own connections (to the control plane, to \
             peers) would be captured and loop; run it as the proxy user (uid 1337), or give it \
             CAP_NET_ADMIN so it can mark its sockets"
        );
        // With the mark: exempt when the kernel lets it set it (CAP_NET_ADMIN).
        let marked = SocketFactory::new(SocketOptions {
            mark: Some(1337),
            ..SocketOptions::default()
        });
        match self_exemption(&icfg(""), &marked, 4242, 4242) {
            Ok(how) => assert_eq!(how, "mark"),
            Err(e) => assert!(
                e.to_string()
                    .contains("and cannot mark its sockets with 0x539 ("),
                "{e}"
            ),
        }
    }

    #[tokio::test]
    async fn channels_connect_through_the_factory() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sockets = SocketFactory::unmarked();
        let uri: Uri = format!("http://localhost:{}", addr.port()).parse().unwrap();
        let s = connect_uri(&sockets, &uri, None).await.unwrap();
        let (_a, peer) = l.accept().await.unwrap();
        assert_eq!(peer, s.local_addr().unwrap());
        // Unmarked: the factory knows the port as its own (the loop guard's view).
        assert!(sockets.is_own(peer));
        // From the host's address, when it is local: how the control plane believes the agent.
        let uri: Uri = format!("http://{addr}").parse().unwrap();
        let source: IpAddr = "127.0.0.9".parse().unwrap();
        let _s = connect_uri(&sockets, &uri, Some(source)).await.unwrap();
        let (_b, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), source);
        let e = connect_uri(&sockets, &"http://127.0.0.1:1".parse().unwrap(), None)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}

/// The control planes of a `CA_ADDR` list (`https://a:15012,https://b:15012`) and which one to
/// try first: the one that last answered, so a working replica is kept, and a dead one is passed
/// over within the same connection attempt. Each agent starts at a random one, which spreads
/// hosts over the replicas.
pub struct Failover {
    addresses: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
}

impl Failover {
    /// The one `Failover` of this `CA_ADDR` value in the process: the identity and discovery
    /// clients share what they learn about which replica answers.
    pub fn of(ca_addr: &str) -> Arc<Failover> {
        static ALL: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<String, Arc<Failover>>>,
        > = std::sync::OnceLock::new();
        let all = ALL.get_or_init(Default::default);
        // Nothing panics while this lock is held; a poisoned map is still whole.
        let mut all = all
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.entry(ca_addr.to_string())
            .or_insert_with(|| Arc::new(Failover::new(ca_addr)))
            .clone()
    }

    pub fn new(ca_addr: &str) -> Self {
        let addresses: Vec<String> = ca_addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        let start = if addresses.len() > 1 {
            rand::random::<u32>() as usize % addresses.len()
        } else {
            0
        };
        Self {
            addresses,
            next: start.into(),
        }
    }

    /// Starts the next attempt at another address, picked at random (a rebalance the control
    /// plane asked for: hosts spread over every replica, new ones included).
    pub fn shuffle(&self) {
        let n = self.addresses.len();
        if n > 1 {
            let current = self.next.load(std::sync::atomic::Ordering::Relaxed);
            let step = 1 + rand::random::<u32>() as usize % (n - 1);
            self.next
                .store((current + step) % n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Every address, in the order they will be tried now.
    pub fn order(&self) -> Vec<String> {
        let n = self.addresses.len();
        let start = self.next.load(std::sync::atomic::Ordering::Relaxed);
        (0..n)
            .map(|i| self.addresses[(start + i) % n.max(1)].clone())
            .collect()
    }

    /// Tries `connect` on each address in turn; the first that succeeds is tried first next
    /// time. Fails with the last error when none does.
    pub async fn connect<T, E, F, Fut>(&self, connect: F) -> Result<T, E>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let n = self.addresses.len();
        let start = self.next.load(std::sync::atomic::Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let index = (start + i) % n;
            let address = self.addresses[index].clone();
            match connect(address.clone()).await {
                Ok(v) => {
                    if i > 0 {
                        tracing::info!(%address, "connected to another control plane");
                    }
                    self.next.store(index, std::sync::atomic::Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => {
                    if n > 1 {
                        tracing::warn!(%address, error = %e, "control plane unreachable; trying the next one");
                    }
                    last = Some(e);
                }
            }
        }
        // Advance, so the next attempt does not begin at the same dead address.
        self.next
            .store((start + 1) % n.max(1), std::sync::atomic::Ordering::Relaxed);
        match last {
            Some(e) => Err(e),
            None => connect(String::new()).await,
        }
    }
}

#[cfg(test)]
mod failover_tests {
    use super::Failover;

    #[tokio::test]
    async fn a_dead_address_is_passed_over_and_the_working_one_kept() {
        let f = Failover::new("https://a:1, https://b:2,https://c:3");
        assert_eq!(f.order().len(), 3);
        // Only b answers: whatever the start, the attempt ends on b, and b is first next time.
        let got: Result<String, String> = f
            .connect(|a| async move {
                if a.contains("b:2") {
                    Ok(a)
                } else {
                    Err(format!("{a} refused"))
                }
            })
            .await;
        assert_eq!(got.unwrap(), "https://b:2");
        assert_eq!(f.order()[0], "https://b:2");
        // None answers: the last error is reported, and the next round starts further on.
        let before = f.order()[0].clone();
        let err: Result<String, String> = f.connect(|a| async move { Err(a) }).await;
        assert!(err.is_err());
        assert_ne!(f.order()[0], before);
    }

    /// A rebalance moves to another address: over many, every replica comes first, each about
    /// a third of the time; with one address it is a no-op.
    #[test]
    fn a_rebalance_spreads_over_every_address() {
        let f = Failover::new("https://a:1,https://b:2,https://c:3");
        let mut firsts = std::collections::HashMap::new();
        for _ in 0..3000 {
            let before = f.order()[0].clone();
            f.shuffle();
            assert_ne!(f.order()[0], before);
            *firsts.entry(f.order()[0].clone()).or_insert(0) += 1;
        }
        assert_eq!(firsts.len(), 3, "{firsts:?}");
        assert!(
            firsts.values().all(|&n| (800..1200).contains(&n)),
            "{firsts:?}"
        );
        let one = Failover::new("https://a:1");
        one.shuffle();
        assert_eq!(one.order(), ["https://a:1"]);
    }
}
