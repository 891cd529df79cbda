//! Reading certificates: PEM bundles, the facts the mesh cares about, and verifying a
//! workload's chain against the mesh roots.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::spiffe::SpiffeId;

/// Private key of a workload, in its certificate directory (owner-only).
pub const KEY_FILE: &str = "key.pem";
/// Leaf certificate then intermediates, in a workload's certificate directory.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Trust anchors (one or more roots), in a workload's certificate directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Why a certificate or chain was not usable.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what} holds no PEM CERTIFICATE block")]
    Empty { what: String },
    #[error("{what} is not valid PEM: {detail}")]
    Pem { what: String, detail: String },
    #[error("{what} is not a valid X.509 certificate: {detail}")]
    Parse { what: String, detail: String },
    #[error(
        "certificate has {found} URI SANs; a workload certificate carries exactly one SPIFFE ID"
    )]
    UriSanCount { found: usize },
    #[error("certificate's URI SAN {uri:?} is not a workload SPIFFE ID: {source}")]
    NotSpiffe {
        uri: String,
        #[source]
        source: crate::spiffe::SpiffeError,
    },
    #[error("certificate is not trusted: {0}")]
    Untrusted(String),
    #[error("the mesh trust bundle is unusable: {0}")]
    BadRoots(String),
}

/// The facts about one certificate that the CA and the agent look at.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    pub uri_sans: Vec<String>,
    pub is_ca: bool,
    pub self_signed: bool,
    /// The subject public key bits (for matching against a private key).
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Parses `der`; `what` names it in errors ("ca-cert.pem", "client certificate").
    pub fn parse(der: &[u8], what: &str) -> Result<Self, CertError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse {
            what: what.to_owned(),
            detail: e.to_string(),
        })?;
        let uri_sans = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => {
                return Err(CertError::Parse {
                    what: what.to_owned(),
                    detail: format!("bad subjectAltName: {e}"),
                })
            }
        };
        Ok(Self {
            not_before: to_system_time(cert.validity().not_before.timestamp()),
            not_after: to_system_time(cert.validity().not_after.timestamp()),
            serial: cert.raw_serial_as_string(),
            uri_sans,
            is_ca: cert.is_ca(),
            self_signed: is_self_signed(&cert),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
        })
    }

    /// The single SPIFFE ID this certificate is for.
    pub fn spiffe_id(&self) -> Result<SpiffeId, CertError> {
        match self.uri_sans.as_slice() {
            [uri] => uri.parse().map_err(|source| CertError::NotSpiffe {
                uri: uri.clone(),
                source,
            }),
            other => Err(CertError::UriSanCount { found: other.len() }),
        }
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// When to renew: half-way through the lifetime, as Istio's agent does.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

pub(crate) fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

pub(crate) fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok()
}

/// Parses every CERTIFICATE block of a PEM bundle; `what` names the bundle in errors.
pub fn parse_pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what: what.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Empty {
            what: what.to_owned(),
        });
    }
    for der in &certs {
        CertInfo::parse(der, what)?;
    }
    Ok(certs)
}

/// Encodes one certificate as PEM (LF line endings, as the files on a host use).
pub fn cert_to_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Encodes certificates as one PEM bundle.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| cert_to_pem(c)).collect()
}

/// Verifies workload certificate chains against a fixed set of mesh roots.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    verifier: Arc<dyn ClientCertVerifier>,
    intermediates: Vec<CertificateDer<'static>>,
}

impl ChainVerifier {
    /// `intermediates` are CA certificates the peer may leave out of its chain.
    pub fn new(
        roots: &[CertificateDer<'static>],
        intermediates: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root.clone())
                .map_err(|e| CertError::BadRoots(e.to_string()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| CertError::BadRoots(e.to_string()))?;
        Ok(Self {
            verifier,
            intermediates,
        })
    }

    /// Checks that `chain` (leaf first) is valid at `now`, chains to a root, is meant for
    /// client authentication, and carries one SPIFFE ID, which it returns.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<SpiffeId, CertError> {
        let Some((leaf, presented)) = chain.split_first() else {
            return Err(CertError::Untrusted("no certificate was presented".into()));
        };
        let mut intermediates: Vec<CertificateDer<'_>> = presented.to_vec();
        intermediates.extend(self.intermediates.iter().cloned());
        let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        self.verifier
            .verify_client_cert(leaf, &intermediates, now)
            .map_err(|e| CertError::Untrusted(describe_rustls_error(&e)))?;
        CertInfo::parse(leaf, "certificate")?.spiffe_id()
    }
}

fn fmt_unix(t: UnixTime) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t.as_secs())).to_string()
}

/// Turns a webpki verdict into a sentence that says what to do.
pub(crate) fn describe_rustls_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::ExpiredContext { time, not_after } => format!(
                "it expired at {} (it is now {})",
                fmt_unix(*not_after),
                fmt_unix(*time)
            ),
            CertificateError::Expired => "it has expired".into(),
            CertificateError::NotValidYetContext { time, not_before } => format!(
                "it is not valid before {} (it is now {}): check the clocks",
                fmt_unix(*not_before),
                fmt_unix(*time)
            ),
            CertificateError::NotValidYet => "it is not valid yet: check the clocks".into(),
            CertificateError::UnknownIssuer => {
                "it was not issued by a CA in this mesh's trust bundle".into()
            }
            CertificateError::BadSignature => {
                "its signature does not verify against this mesh's CA (a CA of the same name issued it?)".into()
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "it is not meant for client authentication".into()
            }
            other => format!("{other:?}"),
        },
        other => other.to_string(),
    }
}
