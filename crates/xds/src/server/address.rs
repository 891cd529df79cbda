//! Which address a discovery client may speak for. A node id's address is only a claim; it
//! becomes the stream's address when something the client cannot forge vouches for it:
//! - the connection comes from it (the TCP peer, IPv4-mapped IPv6 normalised);
//! - it is an IP SAN of the client certificate the TLS layer verified;
//! - the embedder vouches for it ([`Authenticate::vouches_for`]: the control plane's answer is
//!   "an administrator registered a WorkloadEntry of this identity at this address").
//!
//! A claim nothing vouches for (ztunnel without INSTANCE_IP puts a placeholder there) gives way
//! to the peer address when the embedder vouches for that one: the host is recognised by the
//! WorkloadEntry its identity and address match.
//!
//! A claim nothing vouches for is otherwise ignored (logged, shown in status as unverified): the stream is
//! still served, since what it receives is the same for every client, but it carries no
//! address, so it makes no one a mesh host and cannot auto-register.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use rustls::pki_types::CertificateDer;

use super::auth::{Authenticate, Identity};

/// What vouched for a stream's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressSource {
    /// The connection comes from it.
    Peer,
    /// An IP SAN of the client certificate.
    Certificate,
    /// The embedder vouched for it (a WorkloadEntry registered for the identity).
    Registered,
    /// The node id's claim was not vouched for, but the connection comes from an address the
    /// embedder vouches for (the host's registered WorkloadEntry): the claim is ignored.
    PeerRegistered,
}

impl AddressSource {
    /// `peer`, `certificate`, `registered entry`.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressSource::Peer => "peer",
            AddressSource::Certificate => "certificate",
            AddressSource::Registered => "registered entry",
            AddressSource::PeerRegistered => "peer with a registered entry (claim ignored)",
        }
    }
}

impl fmt::Display for AddressSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stream's address, as far as the server believes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostAddress {
    /// The client may speak for `ip`.
    Verified { ip: IpAddr, by: AddressSource },
    /// The node id claims `claimed` but nothing vouches for it; the connection comes from
    /// `peer`.
    Unverified {
        claimed: IpAddr,
        peer: Option<IpAddr>,
    },
    /// No claim and no known peer.
    Unknown,
}

impl HostAddress {
    /// The address the stream may speak for; `None` unless verified.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            HostAddress::Verified { ip, .. } => Some(*ip),
            _ => None,
        }
    }

    pub fn source(&self) -> Option<AddressSource> {
        match self {
            HostAddress::Verified { by, .. } => Some(*by),
            _ => None,
        }
    }

    /// The claim nothing vouched for, if any.
    pub fn unverified_claim(&self) -> Option<IpAddr> {
        match self {
            HostAddress::Unverified { claimed, .. } => Some(*claimed),
            _ => None,
        }
    }

    /// Why a claim is not believed, and the two ways to fix it; `None` unless unverified.
    pub fn problem(&self, identity: &Identity) -> Option<String> {
        let HostAddress::Unverified { claimed, peer } = self else {
            return None;
        };
        let from = peer.map_or_else(|| "an unknown address".to_owned(), |p| p.to_string());
        Some(format!(
            "the node id claims {claimed}, the connection comes from {from}, and no credential \
             vouches for {claimed}: run the agent on the host that owns {claimed} (it connects \
             from {claimed}), or register a WorkloadEntry for ns/{}/sa/{} at {claimed}; a \
             ztunnel must be started with INSTANCE_IP set to its host's address",
            identity.namespace, identity.service_account
        ))
    }
}

/// `ip` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack listener reports
/// IPv4 peers) turned into plain IPv4.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The IP SANs of a certificate (none if it does not parse).
pub fn ip_sans_of(cert: &CertificateDer<'_>) -> Vec<IpAddr> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                _ => None,
            },
            _ => None,
        })
        .map(normalize)
        .collect()
}

/// Decides the stream's address from the node id's claim and what vouches for it; asks the
/// embedder only when neither the peer nor the certificate does.
pub(crate) async fn verify(
    claim: Option<IpAddr>,
    peer: Option<SocketAddr>,
    cert_ips: &[IpAddr],
    identity: &Identity,
    auth: &dyn Authenticate,
) -> HostAddress {
    let peer = peer.map(|p| normalize(p.ip()));
    let Some(claimed) = claim.map(normalize) else {
        // Like Istio: no address in the node id means the one the connection comes from.
        return peer.map_or(HostAddress::Unknown, |ip| HostAddress::Verified {
            ip,
            by: AddressSource::Peer,
        });
    };
    let by = if peer == Some(claimed) {
        Some(AddressSource::Peer)
    } else if cert_ips.contains(&claimed) {
        Some(AddressSource::Certificate)
    } else if auth.vouches_for(identity, claimed).await {
        Some(AddressSource::Registered)
    } else {
        None
    };
    match by {
        Some(by) => HostAddress::Verified { ip: claimed, by },
        None => match peer {
            Some(ip) if auth.vouches_for(identity, ip).await => HostAddress::Verified {
                ip,
                by: AddressSource::PeerRegistered,
            },
            _ => HostAddress::Unverified { claimed, peer },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::StaticAuthenticator;

    fn id() -> Identity {
        Identity::new("cluster.local", "adv", "a")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn each_voucher_and_none() {
        let nobody = StaticAuthenticator::new();
        let peer: SocketAddr = "127.0.0.9:5000".parse().unwrap();

        let got = verify(Some(ip("127.0.0.9")), Some(peer), &[], &id(), &nobody).await;
        assert_eq!(got.source(), Some(AddressSource::Peer));
        assert_eq!(got.ip(), Some(ip("127.0.0.9")));

        // No claim: the peer.
        let got = verify(None, Some(peer), &[], &id(), &nobody).await;
        assert_eq!(got.ip(), Some(ip("127.0.0.9")));
        assert_eq!(
            verify(None, None, &[], &id(), &nobody).await,
            HostAddress::Unknown
        );

        // A dual-stack listener's view of an IPv4 peer.
        let mapped: SocketAddr = "[::ffff:127.0.0.9]:5000".parse().unwrap();
        let got = verify(Some(ip("127.0.0.9")), Some(mapped), &[], &id(), &nobody).await;
        assert_eq!(got.source(), Some(AddressSource::Peer));

        let got = verify(
            Some(ip("10.0.0.5")),
            Some(peer),
            &[ip("10.0.0.5")],
            &id(),
            &nobody,
        )
        .await;
        assert_eq!(got.source(), Some(AddressSource::Certificate));

        let registered = StaticAuthenticator::new().vouch_for(id(), ip("10.0.0.5"));
        let got = verify(Some(ip("10.0.0.5")), Some(peer), &[], &id(), &registered).await;
        assert_eq!(got.source(), Some(AddressSource::Registered));
        // Vouched for this identity only.
        let other = Identity::new("cluster.local", "adv", "b");
        let got = verify(Some(ip("10.0.0.5")), Some(peer), &[], &other, &registered).await;
        assert_eq!(got.ip(), None);

        let got = verify(
            Some(ip("10.0.0.5")),
            Some(peer),
            &[ip("10.0.0.6")],
            &id(),
            &nobody,
        )
        .await;
        assert_eq!(got.ip(), None);
        assert_eq!(got.unverified_claim(), Some(ip("10.0.0.5")));
        let problem = got.problem(&id()).unwrap();
        assert!(
            problem.contains("claims 10.0.0.5, the connection comes from 127.0.0.9")
                && problem.contains("WorkloadEntry for ns/adv/sa/a at 10.0.0.5")
                && problem.contains("INSTANCE_IP"),
            "{problem}"
        );

        // A placeholder claim (ztunnel without INSTANCE_IP) from a host whose registered entry
        // matches the identity and the connection's address: the host is recognised by it.
        let at_peer = StaticAuthenticator::new().vouch_for(id(), ip("127.0.0.9"));
        let got = verify(Some(ip("1.1.1.1")), Some(peer), &[], &id(), &at_peer).await;
        assert_eq!(got.ip(), Some(ip("127.0.0.9")));
        assert_eq!(got.source(), Some(AddressSource::PeerRegistered));
        // Not for another identity.
        let got = verify(Some(ip("1.1.1.1")), Some(peer), &[], &other, &at_peer).await;
        assert_eq!(got.unverified_claim(), Some(ip("1.1.1.1")));
    }

    #[test]
    fn ip_sans_are_read() {
        let mut params = rcgen::CertificateParams::new(vec!["x.example".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(ip("10.0.0.5")));
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(ip("fd00::1")));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(ip_sans_of(cert.der()), vec![ip("10.0.0.5"), ip("fd00::1")]);
        assert!(ip_sans_of(&CertificateDer::from(vec![1u8, 2, 3])).is_empty());
    }
}
