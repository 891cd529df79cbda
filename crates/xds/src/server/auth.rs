//! Who a discovery client is. The control plane plugs in the CA's verification (join token or
//! workload certificate); [`StaticAuthenticator`] serves tests and benchmarks.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use rustls::pki_types::CertificateDer;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// An authenticated workload identity (`spiffe://<td>/ns/<ns>/sa/<sa>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`; `None` for any other form.
    pub fn from_spiffe_id(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let (td, ns_kw, ns, sa_kw, sa) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if parts.next().is_some()
            || ns_kw != "ns"
            || sa_kw != "sa"
            || [td, ns, sa].iter().any(|s| s.is_empty())
        {
            return None;
        }
        Some(Self::new(td, ns, sa))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Authenticates a discovery stream before anything is served. Return
/// `Status::unauthenticated` for missing or bad credentials and `Status::permission_denied`
/// for valid credentials that may not use discovery; the client stops retrying on both.
#[tonic::async_trait]
pub trait Authenticate: Send + Sync + 'static {
    async fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Identity, Status>;

    /// Whether `identity` may speak for `ip` although it neither connects from it nor holds a
    /// certificate naming it: an address recorded for the identity at enrolment. Asked at
    /// stream start only for such claims. The default vouches for nothing.
    async fn vouches_for(&self, _identity: &Identity, _ip: IpAddr) -> bool {
        false
    }
}

/// Fixed bearer tokens, and optionally client certificates taken at their word (their
/// SPIFFE URI SAN). Only for tests and benchmarks: it trusts whatever the TLS layer let
/// through, so use it with a listener that verifies client certificates against a root.
#[derive(Clone, Debug, Default)]
pub struct StaticAuthenticator {
    tokens: HashMap<String, Identity>,
    trust_peer_certificates: bool,
    vouched: HashSet<(Identity, IpAddr)>,
    vouch_all: bool,
}

impl StaticAuthenticator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `authorization: Bearer <token>` as `identity`.
    pub fn with_token(mut self, token: &str, identity: Identity) -> Self {
        self.tokens.insert(token.to_owned(), identity);
        self
    }

    /// Accepts a client certificate's SPIFFE URI SAN as the identity.
    pub fn trust_peer_certificates(mut self) -> Self {
        self.trust_peer_certificates = true;
        self
    }

    /// Vouches for `identity` speaking for `ip` (as a registered WorkloadEntry would).
    pub fn vouch_for(mut self, identity: Identity, ip: IpAddr) -> Self {
        self.vouched.insert((identity, ip));
        self
    }

    /// Vouches for any address any client claims: for tests where the address is beside the
    /// point. Never in a server others can reach.
    pub fn vouch_for_all(mut self) -> Self {
        self.vouch_all = true;
        self
    }
}

/// The SPIFFE id in a certificate's URI SANs, if there is exactly one.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    Identity::from_spiffe_id(first)
}

#[tonic::async_trait]
impl Authenticate for StaticAuthenticator {
    async fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Identity, Status> {
        if self.trust_peer_certificates {
            if let Some(leaf) = peer_certs.and_then(|c| c.first()) {
                return spiffe_id_of(leaf).ok_or_else(|| {
                    Status::unauthenticated(
                        "client certificate has no single spiffe:// URI SAN of the form spiffe://<trust domain>/ns/<ns>/sa/<sa>",
                    )
                });
            }
        }
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "no credentials: send `authorization: Bearer <token>` or a workload certificate",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("authorization header is not `Bearer <token>`")
            })?;
        self.tokens
            .get(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("token not recognised by this control plane"))
    }

    async fn vouches_for(&self, identity: &Identity, ip: IpAddr) -> bool {
        self.vouch_all || self.vouched.contains(&(identity.clone(), ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spiffe_ids() {
        let id = Identity::from_spiffe_id("spiffe://cluster.local/ns/prod/sa/web").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "prod", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/prod/sa/web");
        for bad in [
            "spiffe://cluster.local/ns/prod",
            "spiffe://cluster.local/ns/prod/sa/web/x",
            "spiffe://cluster.local/sa/prod/ns/web",
            "https://cluster.local/ns/prod/sa/web",
            "spiffe:///ns/prod/sa/web",
        ] {
            assert_eq!(Identity::from_spiffe_id(bad), None, "{bad}");
        }
    }
}
