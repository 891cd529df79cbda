//! Workload credentials and the rustls configurations HBONE builds from them.
//!
//! Both ends are TLS 1.3 only with ALPN `h2`. Peers are authenticated by chaining to the mesh
//! roots; host names are meaningless in the mesh, so the client checks the SPIFFE URI SAN of
//! the server's leaf against the identities expected for the destination instead.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// ALPN protocol HBONE negotiates on port 15008.
pub const ALPN_H2: &[u8] = b"h2";

/// The workload's current certificate, key and mesh roots.
///
/// Held in a `tokio::sync::watch` channel; every new TLS connection is configured from the value
/// current at that moment, so rotation never disturbs connections already established.
#[derive(Debug)]
pub struct Credentials {
    /// Certificate chain, leaf first, DER.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// Private key of the leaf, DER (PKCS#8, SEC1 or PKCS#1).
    pub private_key: PrivateKeyDer<'static>,
    /// Mesh root certificates, DER.
    pub roots: Vec<CertificateDer<'static>>,
    /// Trust domain of this workload (e.g. `cluster.local`).
    pub trust_domain: String,
}

/// Shared receiver of the workload credentials; `None` until the first certificate is issued.
pub type CredentialsWatch = tokio::sync::watch::Receiver<Option<Arc<Credentials>>>;

/// Why TLS material could not be turned into a working configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no workload certificate yet: the agent has not obtained one from the CA (is the control plane reachable?)")]
    NoCredentials,
    #[error("the workload certificate chain is empty")]
    EmptyChain,
    #[error("mesh root certificate #{index} cannot be used as a trust anchor: {source}")]
    BadRoot { index: usize, source: rustls::Error },
    #[error("no mesh root certificates: cannot authenticate peers")]
    NoRoots,
    #[error("workload certificate or key rejected by rustls: {0} (does the key match the leaf?)")]
    BadCertOrKey(rustls::Error),
    #[error("client certificate verifier could not be built from the mesh roots: {0}")]
    ClientVerifier(String),
    #[error(
        "certificate has no SPIFFE URI SAN (expected spiffe://<trust domain>/ns/<ns>/sa/<sa>)"
    )]
    NoSpiffeId,
    #[error("certificate could not be parsed: {0}")]
    BadCertificate(String),
}

/// Verification failure raised inside the rustls handshake; carried through `rustls::Error::Other`
/// and turned back into a typed error by the client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerIdentityError {
    #[error("server presented identity {found} but one of [{}] was expected", expected.join(", "))]
    Mismatch {
        found: String,
        expected: Vec<String>,
    },
    #[error("server certificate has no SPIFFE URI SAN; expected one of [{}]", expected.join(", "))]
    Missing { expected: Vec<String> },
}

/// Verifies the server chains to the mesh roots and carries an expected SPIFFE identity.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let found = match spiffe_id(end_entity) {
            Ok(id) => id,
            Err(_) => {
                return Err(other(PeerIdentityError::Missing {
                    expected: self.expected.clone(),
                }))
            }
        };
        if self.expected.contains(&found) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(other(PeerIdentityError::Mismatch {
                found,
                expected: self.expected.clone(),
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn other(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::Other(rustls::OtherError(Arc::new(e)))
}

/// Finds our identity error inside an I/O error returned by a failed handshake.
pub(crate) fn peer_identity_error(err: &std::io::Error) -> Option<&PeerIdentityError> {
    let tls = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::Other(o) => o.0.downcast_ref::<PeerIdentityError>(),
        _ => None,
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(creds: &Credentials) -> Result<Arc<RootCertStore>, TlsError> {
    if creds.roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let mut store = RootCertStore::empty();
    for (index, root) in creds.roots.iter().enumerate() {
        store
            .add(root.clone())
            .map_err(|source| TlsError::BadRoot { index, source })?;
    }
    Ok(Arc::new(store))
}

/// Client configuration for one destination: our certificate, and a verifier accepting only
/// `expected` server identities.
pub(crate) fn client_config(
    creds: &Credentials,
    expected: &[String],
) -> Result<Arc<ClientConfig>, TlsError> {
    if creds.cert_chain.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: root_store(creds)?,
        expected: expected.to_vec(),
        provider: provider.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::BadCertOrKey)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.cert_chain.clone(), creds.private_key.clone_key())
        .map_err(TlsError::BadCertOrKey)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// Server configuration: our certificate, client certificates required and chained to the roots.
pub(crate) fn server_config(creds: &Credentials) -> Result<Arc<ServerConfig>, TlsError> {
    if creds.cert_chain.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    let provider = provider();
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(creds)?, provider.clone())
            .build()
            .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::BadCertOrKey)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(creds.cert_chain.clone(), creds.private_key.clone_key())
        .map_err(TlsError::BadCertOrKey)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// The SPIFFE ID (`spiffe://...` URI SAN) of a certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?
        .ok_or(TlsError::NoSpiffeId)?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_string()),
            _ => None,
        })
        .ok_or(TlsError::NoSpiffeId)
}
