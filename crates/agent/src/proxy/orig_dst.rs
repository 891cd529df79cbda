//! Where an intercepted connection was going before iptables redirected it.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// The original destination of an accepted, redirected connection. Behind a trait so the
/// proxy is tested without root (a fixed map or closure stands in for iptables).
pub trait OrigDst: Send + Sync + 'static {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// Any closure over the accepted stream (tests).
impl<F> OrigDst for F
where
    F: Fn(&TcpStream) -> io::Result<SocketAddr> + Send + Sync + 'static,
{
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        self(stream)
    }
}

/// `SO_ORIGINAL_DST` (`IP6T_SO_ORIGINAL_DST` for IPv6), as set by an iptables REDIRECT.
#[derive(Clone, Copy, Debug, Default)]
pub struct SoOriginalDst;

impl OrigDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        match stream.local_addr()? {
            SocketAddr::V4(_) => {
                let sin = getsockopt(stream, sockopt::OriginalDst)?;
                Ok(SocketAddr::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                    u16::from_be(sin.sin_port),
                ))
            }
            SocketAddr::V6(_) => {
                let sin6 = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
                Ok(SocketAddr::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                    u16::from_be(sin6.sin6_port),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Without an iptables redirect the kernel has no original destination to report: the
    /// lookup must fail with an error rather than invent one.
    #[tokio::test]
    async fn so_original_dst_without_redirect_is_an_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        match SoOriginalDst.original_dst(&s) {
            // Some kernels without conntrack for the socket answer ENOENT; with nf_conntrack
            // loaded and no NAT they may answer the local address itself.
            Err(_) => {}
            Ok(a) => assert_eq!(a, addr),
        }
    }
}
