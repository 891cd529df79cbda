//! The mesh certificate authority: its key material on disk (self-signed root or a plugged
//! Istio-style intermediate), and the certificates it issues.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::cert::{self, CertError, CertInfo, ChainVerifier};
use crate::csr::{self, CsrError};
use crate::files::{self, FileError};
use crate::pb::IstioCertificateRequest;
use crate::spiffe::{SpiffeId, DEFAULT_TRUST_DOMAIN};

/// The CA's signing certificate (Istio cacerts layout).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The CA's private key, owner-only.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Chain from the signing certificate up to (optionally including) the root.
pub const CA_CHAIN_FILE: &str = "cert-chain.pem";
/// The root(s) the signing certificate chains to.
pub const CA_ROOT_FILE: &str = "root-cert.pem";

pub const DEFAULT_WORKLOAD_LIFETIME: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Upper bound on how far `not_before` is moved into the past to absorb clock skew.
const MAX_BACKDATE: Duration = Duration::from_secs(60);

/// Where the CA keeps its material and what it issues.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// Directory holding the Istio "cacerts" files; a self-signed root is generated there
    /// when it holds none.
    pub dir: PathBuf,
    pub trust_domain: String,
    /// Lifetime of a workload certificate when the request asks for none.
    pub default_lifetime: Duration,
    /// Longest lifetime a request may ask for.
    pub max_lifetime: Duration,
    /// Extra roots (PEM bundle) served to clients beside the CA's own: root rotation.
    pub trust_bundle: Option<PathBuf>,
}

impl CaConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            default_lifetime: DEFAULT_WORKLOAD_LIFETIME,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            trust_bundle: None,
        }
    }
}

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("CA directory {dir} is incomplete: it has {present} but lacks {missing}. Supply ca-cert.pem, ca-key.pem and root-cert.pem (plus cert-chain.pem for an intermediate), as Istio's cacerts, or none of them to have a self-signed root generated")]
    Incomplete {
        dir: PathBuf,
        present: String,
        missing: String,
    },
    #[error("{}: {source}", path.display())]
    Cert {
        path: PathBuf,
        #[source]
        source: CertError,
    },
    #[error("{} holds a {kind} key, which Isthmus cannot load: convert it with `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.pkcs8` and use that file", path.display())]
    KeyFormat { path: PathBuf, kind: &'static str },
    #[error("{} is not a usable private key: {detail}", path.display())]
    Key { path: PathBuf, detail: String },
    #[error("{} does not match {}: the private key belongs to another certificate", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{} is not a CA certificate ({why}); plug in a CA (intermediate) certificate", path.display())]
    NotCa { path: PathBuf, why: &'static str },
    #[error("{} expired at {at}; plug in a renewed CA certificate", path.display())]
    Expired { path: PathBuf, at: String },
    #[error("CA chain in {} is broken: {detail}", dir.display())]
    Chain { dir: PathBuf, detail: String },
    #[error("invalid CA configuration: {0}")]
    Config(String),
    #[error("cannot generate CA material: {0}")]
    Generate(String),
}

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(
        "requested lifetime {requested} is above this CA's maximum of {max}; ask for {max} or less"
    )]
    LifetimeTooLong { requested: String, max: String },
    #[error(
        "validity_duration must be 0 (the CA's default) or a positive number of seconds, got {0}"
    )]
    BadLifetime(i64),
    #[error("CSR asks for {requested} but the caller is {caller}")]
    IdentityMismatch {
        requested: Box<SpiffeId>,
        caller: Box<SpiffeId>,
    },
    #[error("cannot sign the certificate: {0}")]
    Internal(String),
}

/// A request that passed every check and can be signed.
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub identity: SpiffeId,
    pub public_key_der: Vec<u8>,
    pub lifetime: Duration,
}

/// A certificate the CA issued together with a key it generated (serving certificate,
/// bootstrap workload certificate for `vm config`).
#[derive(Clone)]
pub struct IssuedKeyPair {
    /// PKCS#8 private key.
    pub key_pem: String,
    /// Leaf first, then intermediates; no root.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl IssuedKeyPair {
    pub fn chain_pem(&self) -> String {
        cert::certs_to_pem(&self.chain)
    }

    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, SignError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| SignError::Internal(format!("issued key does not re-parse: {e}")))
    }
}

impl std::fmt::Debug for IssuedKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKeyPair")
            .field("chain", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// DNS names and addresses of the control plane's serving certificate (port 15012).
#[derive(Debug, Clone)]
pub struct ServingCertOptions {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub lifetime: Duration,
}

impl Default for ServingCertOptions {
    fn default() -> Self {
        Self {
            dns_names: [
                "istiod.istio-system.svc",
                "istiod.istio-system.svc.cluster.local",
                "istiod",
                "isthmus",
                "localhost",
            ]
            .map(String::from)
            .to_vec(),
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            lifetime: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// The certificate authority. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Ca {
    trust_domain: String,
    default_lifetime: Duration,
    max_lifetime: Duration,
    issuer: Issuer<'static, KeyPair>,
    signing_not_after: SystemTime,
    /// PEM of everything after the leaf in a response: signing certificate (when it is not
    /// the root), intermediates, other trusted roots, then the signing root last.
    response_tail: Vec<String>,
    /// CA certificates between a leaf and the root (the signing certificate first).
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    verifier: ChainVerifier,
}

impl Ca {
    /// Loads the CA from `config.dir`, generating a self-signed root on first start.
    pub fn load_or_create(config: &CaConfig) -> Result<Self, CaError> {
        if config.default_lifetime.is_zero() || config.default_lifetime > config.max_lifetime {
            return Err(CaError::Config(format!(
                "default lifetime {} must be positive and at most the maximum {}",
                human(config.default_lifetime),
                human(config.max_lifetime)
            )));
        }
        SpiffeId::new(&config.trust_domain, "ns", "sa")
            .map_err(|e| CaError::Config(format!("trust domain: {e}")))?;
        let dir = &config.dir;
        files::ensure_dir(dir, files::PRIVATE_DIR_MODE)?;
        let required = [CA_CERT_FILE, CA_KEY_FILE, CA_ROOT_FILE];
        let (present, missing): (Vec<&str>, Vec<&str>) =
            required.iter().partition(|f| dir.join(f).exists());
        if present.is_empty() {
            generate_root(dir, &config.trust_domain)?;
        } else if !missing.is_empty() {
            return Err(CaError::Incomplete {
                dir: dir.clone(),
                present: present.join(", "),
                missing: missing.join(", "),
            });
        }
        Self::load(config)
    }

    fn load(config: &CaConfig) -> Result<Self, CaError> {
        let dir = &config.dir;
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let key = load_key(&key_path)?;
        if files::mode_of(&key_path).is_some_and(|m| m & 0o077 != 0) {
            tracing::warn!(path = %key_path.display(), "CA key is readable by group or others; chmod 600 it");
        }

        let signing_cert = read_certs(&cert_path)?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Config("unreachable: empty bundle".into()))?;
        let info =
            CertInfo::parse(&signing_cert, CA_CERT_FILE).map_err(|source| CaError::Cert {
                path: cert_path.clone(),
                source,
            })?;
        if info.public_key != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        check_is_ca(&signing_cert, &cert_path)?;
        if info.not_after <= SystemTime::now() {
            return Err(CaError::Expired {
                path: cert_path,
                at: humantime::format_rfc3339_seconds(info.not_after).to_string(),
            });
        }

        let chain_path = dir.join(CA_CHAIN_FILE);
        // Absent or empty is fine: a root CA (or Istio's self-signed layout) has none.
        let listed_chain = match files::read_text(&chain_path) {
            Ok(text) if text.trim().is_empty() => Vec::new(),
            Ok(_) => read_certs(&chain_path)?,
            Err(_) if !chain_path.exists() => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        // cert-chain.pem may repeat ca-cert.pem and may end with the root; keep only the
        // certificates strictly between them.
        let intermediates: Vec<CertificateDer<'static>> = listed_chain
            .into_iter()
            .filter(|c| *c != signing_cert && !parse(c).is_some_and(|x| cert::is_self_signed(&x)))
            .collect();

        let mut roots = read_certs(&dir.join(CA_ROOT_FILE))?;
        for root in &roots {
            check_is_ca(root, &dir.join(CA_ROOT_FILE))?;
        }
        let signing_root =
            find_signing_root(&signing_cert, &intermediates, &roots).map_err(|detail| {
                CaError::Chain {
                    dir: dir.clone(),
                    detail,
                }
            })?;
        if let Some(path) = &config.trust_bundle {
            for extra in read_certs(path)? {
                check_is_ca(&extra, path)?;
                if !roots.contains(&extra) {
                    roots.push(extra);
                }
            }
        }
        // The signing root goes first in the bundle and last in responses.
        roots.retain(|r| *r != signing_root);
        roots.insert(0, signing_root.clone());

        let mut tail = Vec::new();
        let mut ca_intermediates = Vec::new();
        if signing_cert != signing_root {
            ca_intermediates.push(signing_cert.clone());
        }
        ca_intermediates.extend(intermediates);
        tail.extend(ca_intermediates.iter().map(|c| cert::cert_to_pem(c)));
        tail.extend(roots[1..].iter().map(|c| cert::cert_to_pem(c)));
        tail.push(cert::cert_to_pem(&signing_root));

        let verifier = ChainVerifier::new(&roots, ca_intermediates.clone()).map_err(|source| {
            CaError::Cert {
                path: dir.join(CA_ROOT_FILE),
                source,
            }
        })?;
        let issuer = Issuer::from_ca_cert_der(&signing_cert, key).map_err(|e| CaError::Cert {
            path: cert_path.clone(),
            source: CertError::Parse {
                what: CA_CERT_FILE.into(),
                detail: e.to_string(),
            },
        })?;
        tracing::info!(
            dir = %dir.display(),
            trust_domain = %config.trust_domain,
            roots = roots.len(),
            self_signed = signing_cert == signing_root,
            ca_expires = %humantime::format_rfc3339_seconds(info.not_after),
            "certificate authority loaded"
        );
        Ok(Self {
            trust_domain: config.trust_domain.clone(),
            default_lifetime: config.default_lifetime,
            max_lifetime: config.max_lifetime,
            issuer,
            signing_not_after: info.not_after,
            response_tail: tail,
            intermediates: ca_intermediates,
            roots,
            verifier,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    /// The roots clients should trust: the signing root first, then any others (rotation).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// [`Ca::roots`] as a PEM bundle: what a host's `root-cert.pem` holds.
    pub fn trust_bundle_pem(&self) -> String {
        cert::certs_to_pem(&self.roots)
    }

    /// Verifies a workload's certificate chain (leaf first) against the mesh roots and
    /// returns its identity. Used to authenticate client certificates.
    pub fn verify_workload_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<SpiffeId, CertError> {
        self.verifier.verify(chain, now)
    }

    /// Turns a requested lifetime in seconds (0 = default) into a checked duration.
    pub fn lifetime_for(&self, validity_seconds: i64) -> Result<Duration, SignError> {
        let requested = match u64::try_from(validity_seconds) {
            Ok(0) => return Ok(self.default_lifetime),
            Ok(s) => Duration::from_secs(s),
            Err(_) => return Err(SignError::BadLifetime(validity_seconds)),
        };
        if requested > self.max_lifetime {
            return Err(SignError::LifetimeTooLong {
                requested: human(requested),
                max: human(self.max_lifetime),
            });
        }
        Ok(requested)
    }

    /// Checks a CSR against the caller's identity and the lifetime rules.
    pub fn check_csr(
        &self,
        csr_pem: &str,
        caller: &SpiffeId,
        validity_seconds: i64,
    ) -> Result<SignRequest, SignError> {
        let lifetime = self.lifetime_for(validity_seconds)?;
        let parsed = csr::parse_csr(csr_pem)?;
        if parsed.identity != *caller {
            return Err(SignError::IdentityMismatch {
                requested: Box::new(parsed.identity),
                caller: Box::new(caller.clone()),
            });
        }
        Ok(SignRequest {
            identity: parsed.identity,
            public_key_der: parsed.public_key_der,
            lifetime,
        })
    }

    /// [`Ca::check_csr`] on a decoded API request.
    pub fn check_request(
        &self,
        request: &IstioCertificateRequest,
        caller: &SpiffeId,
    ) -> Result<SignRequest, SignError> {
        self.check_csr(&request.csr, caller, request.validity_duration)
    }

    /// Signs a checked request; returns the PEM chain: leaf, intermediates, roots (the
    /// signing root last).
    pub fn sign(&self, request: &SignRequest) -> Result<Vec<String>, SignError> {
        let spki = SubjectPublicKeyInfo::from_der(&request.public_key_der)
            .map_err(|e| SignError::Internal(format!("CSR public key: {e}")))?;
        let params = self.workload_params(&request.identity, request.lifetime)?;
        let leaf = params
            .signed_by(&spki, &self.issuer)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + self.response_tail.len());
        chain.push(leaf.pem());
        chain.extend(self.response_tail.iter().cloned());
        Ok(chain)
    }

    /// Checks then signs a CSR for `caller`.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        caller: &SpiffeId,
        validity_seconds: i64,
    ) -> Result<Vec<String>, SignError> {
        self.sign(&self.check_csr(csr_pem, caller, validity_seconds)?)
    }

    /// Issues a workload certificate with a key generated here (bootstrap files for a host
    /// that cannot make its own CSR; prefer the CSR flow, where the key never travels).
    pub fn issue_workload(
        &self,
        identity: &SpiffeId,
        lifetime: Option<Duration>,
    ) -> Result<IssuedKeyPair, SignError> {
        let lifetime = match lifetime {
            Some(l) => self.lifetime_for(i64::try_from(l.as_secs()).unwrap_or(i64::MAX))?,
            None => self.default_lifetime,
        };
        let params = self.workload_params(identity, lifetime)?;
        self.issue_with_new_key(&params)
    }

    /// Issues the control plane's own TLS serving certificate.
    pub fn issue_serving(&self, opts: &ServingCertOptions) -> Result<IssuedKeyPair, SignError> {
        let mut params = self.base_params(opts.lifetime);
        for name in &opts.dns_names {
            let name = name
                .as_str()
                .try_into()
                .map_err(|e| SignError::Internal(format!("DNS name {name:?}: {e}")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(opts.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(
            DnType::CommonName,
            opts.dns_names.first().map_or("isthmus", |s| s),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_with_new_key(&params)
    }

    fn issue_with_new_key(&self, params: &CertificateParams) -> Result<IssuedKeyPair, SignError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(IssuedKeyPair {
            key_pem: key.serialize_pem(),
            chain,
            not_before: to_system(params.not_before),
            not_after: to_system(params.not_after),
        })
    }

    fn workload_params(
        &self,
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<CertificateParams, SignError> {
        let mut params = self.base_params(lifetime);
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e| SignError::Internal(format!("SPIFFE ID as IA5 string: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        Ok(params)
    }

    fn base_params(&self, lifetime: Duration) -> CertificateParams {
        let now = OffsetDateTime::now_utc();
        let backdate = MAX_BACKDATE.min(lifetime / 10);
        let ca_end = OffsetDateTime::from(self.signing_not_after);
        let mut not_after = now + lifetime;
        if not_after > ca_end {
            // A leaf outliving its issuer would fail verification at that point anyway.
            tracing::warn!(ca_expires = %ca_end, "capping certificate lifetime at the CA certificate's expiry");
            not_after = ca_end;
        }
        let mut params = CertificateParams::default();
        // No subject: identity is in the SAN, which rcgen then marks critical (RFC 5280).
        params.distinguished_name = DistinguishedName::new();
        params.not_before = now - backdate;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        params
    }
}

fn human(d: Duration) -> String {
    crate::format_duration(d)
}

fn to_system(t: OffsetDateTime) -> SystemTime {
    t.into()
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and full-length: a DER INTEGER with the top bit set would be negative.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Option<X509Certificate<'a>> {
    X509Certificate::from_der(der).ok().map(|(_, c)| c)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = files::read_text(path)?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    cert::parse_pem_certs(&text, &name).map_err(|source| CaError::Cert {
        path: path.to_owned(),
        source,
    })
}

fn load_key(path: &Path) -> Result<KeyPair, CaError> {
    let text = files::read_text(path)?;
    let key = PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| CaError::Key {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    let kind = match &key {
        PrivateKeyDer::Pkcs8(_) => None,
        PrivateKeyDer::Pkcs1(_) => Some("PKCS#1 (RSA PRIVATE KEY)"),
        PrivateKeyDer::Sec1(_) => Some("SEC1 (EC PRIVATE KEY)"),
        _ => Some("unknown"),
    };
    if let Some(kind) = kind {
        return Err(CaError::KeyFormat {
            path: path.to_owned(),
            kind,
        });
    }
    KeyPair::try_from(&key).map_err(|e| CaError::Key {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn check_is_ca(der: &CertificateDer<'_>, path: &Path) -> Result<(), CaError> {
    let not_ca = |why| CaError::NotCa {
        path: path.to_owned(),
        why,
    };
    let cert = parse(der).ok_or_else(|| not_ca("it does not parse"))?;
    if !cert.is_ca() {
        return Err(not_ca("basicConstraints CA:FALSE or missing"));
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(not_ca("keyUsage lacks keyCertSign"));
        }
    }
    Ok(())
}

/// Walks signing cert → intermediates → a root, checking names and signatures, and
/// returns the root that anchors it.
fn find_signing_root(
    signing: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<CertificateDer<'static>, String> {
    let mut current = signing.clone();
    let mut remaining: Vec<&CertificateDer<'static>> = intermediates.iter().collect();
    for _ in 0..=intermediates.len() {
        let cur = parse(&current).ok_or("a certificate does not parse")?;
        if cert::is_self_signed(&cur) {
            return roots
                .iter()
                .find(|r| **r == current)
                .cloned()
                .ok_or_else(|| {
                    format!("{CA_CERT_FILE} is self-signed but is not in {CA_ROOT_FILE}")
                });
        }
        let signed_by = |candidate: &CertificateDer<'_>| {
            parse(candidate).is_some_and(|issuer| {
                issuer.subject().as_raw() == cur.issuer().as_raw()
                    && cur.verify_signature(Some(issuer.public_key())).is_ok()
            })
        };
        if let Some(root) = roots.iter().find(|r| signed_by(r)) {
            return Ok(root.clone());
        }
        let pos = remaining.iter().position(|c| signed_by(c)).ok_or_else(|| {
            format!(
                "no certificate in {CA_CHAIN_FILE} or {CA_ROOT_FILE} signed {} (issuer {})",
                cur.subject(),
                cur.issuer()
            )
        })?;
        current = remaining.remove(pos).clone();
    }
    Err(format!(
        "{CA_CHAIN_FILE} does not lead to a root in {CA_ROOT_FILE}"
    ))
}

fn generate_root(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    let generate = |e: rcgen::Error| CaError::Generate(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        // A unique name: two meshes' roots must not be mistaken for each other by name.
        .push(
            DnType::CommonName,
            format!(
                "Isthmus mesh root CA {}",
                hex::encode(rand::random::<[u8; 4]>())
            ),
        );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + ROOT_LIFETIME;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(generate)?;
    let pem = cert.pem();
    let key_pem = key.serialize_pem();
    // Key first and ca-cert.pem last: ca-cert.pem is what marks the set as present.
    files::write_atomic(
        &dir.join(CA_KEY_FILE),
        key_pem.as_bytes(),
        files::PRIVATE_FILE_MODE,
    )?;
    for name in [CA_CHAIN_FILE, CA_ROOT_FILE, CA_CERT_FILE] {
        files::write_atomic(&dir.join(name), pem.as_bytes(), files::PUBLIC_FILE_MODE)?;
    }
    tracing::info!(dir = %dir.display(), %trust_domain, "generated a self-signed mesh root CA (valid 10 years)");
    Ok(())
}
