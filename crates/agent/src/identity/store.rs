//! The workload certificate in memory and on disk (`key.pem`, `cert-chain.pem`,
//! `root-cert.pem` in the certificate directory).
//!
//! Write order: `root-cert.pem`, then `key.pem`, then `cert-chain.pem`, each replaced
//! atomically (temp file + rename). The chain goes last because it is the file readers
//! watch: when it changes, the matching key and the roots that verify it are already in
//! place, and on a first issuance a chain never exists without its key. Three files
//! cannot change in one step, so during the microseconds between the key's rename and the
//! chain's a reader can pair the new key with the old chain; a careful reader checks the
//! pair matches and reads again (the in-process proxy uses the watch channel instead and
//! always sees a consistent set).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use isthmus_ca::cert::{self, CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE};
use isthmus_ca::files::{self, FileError};
use isthmus_ca::{CertError, CertInfo, ChainVerifier, SpiffeId};
use rustls::pki_types::CertificateDer;

/// Why a certificate set is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("{what} is not a usable private key: {detail}")]
    Key { what: String, detail: String },
    #[error("the private key does not match the leaf certificate")]
    KeyMismatch,
    #[error("{0}")]
    Incomplete(String),
}

/// A workload's key, certificate chain and trust roots, checked to belong together.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    /// PKCS#8 PEM private key.
    pub key_pem: String,
    /// Leaf first, then intermediates (no roots).
    pub chain_pem: String,
    /// Trust anchors, possibly several during a root rotation.
    pub roots_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field(
                "not_before",
                &humantime::format_rfc3339_seconds(self.not_before),
            )
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .finish_non_exhaustive()
    }
}

impl WorkloadCertificate {
    /// Checks that `key_pem` matches the leaf of `chain`, that the chain verifies to one
    /// of `roots` at `now`, and that it names exactly one SPIFFE ID.
    pub fn verify(
        key_pem: &str,
        chain: &[CertificateDer<'static>],
        roots: &[CertificateDer<'static>],
        now: SystemTime,
    ) -> Result<Self, StoreError> {
        let leaf = chain
            .first()
            .ok_or_else(|| StoreError::Incomplete("the certificate chain is empty".into()))?;
        let info = CertInfo::parse(leaf, "leaf certificate")?;
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| StoreError::Key {
            what: KEY_FILE.into(),
            detail: e.to_string(),
        })?;
        if key.public_key_raw() != info.public_key.as_slice() {
            return Err(StoreError::KeyMismatch);
        }
        let identity = ChainVerifier::new(roots, Vec::new())?.verify(chain, now)?;
        Ok(Self {
            identity,
            key_pem: key_pem.to_owned(),
            chain_pem: cert::certs_to_pem(chain),
            roots_pem: cert::certs_to_pem(roots),
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Half-way through the lifetime (Istio's rule).
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// The certificate directory of a host.
#[derive(Debug, Clone)]
pub struct CertFiles {
    dir: PathBuf,
}

impl CertFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads and checks the set on disk; `Ok(None)` when there is no key or chain yet.
    pub fn load(&self, now: SystemTime) -> Result<Option<WorkloadCertificate>, StoreError> {
        let (key, chain, roots) = (
            self.dir.join(KEY_FILE),
            self.dir.join(CERT_CHAIN_FILE),
            self.dir.join(ROOT_CERT_FILE),
        );
        if !key.exists() || !chain.exists() {
            return Ok(None);
        }
        let key_pem = files::read_text(&key)?;
        let chain = cert::parse_pem_certs(&files::read_text(&chain)?, CERT_CHAIN_FILE)?;
        let roots = cert::parse_pem_certs(&files::read_text(&roots)?, ROOT_CERT_FILE)?;
        WorkloadCertificate::verify(&key_pem, &chain, &roots, now).map(Some)
    }

    /// Writes the set in the order explained in the module docs.
    pub fn save(&self, cert: &WorkloadCertificate) -> Result<(), StoreError> {
        files::ensure_dir(&self.dir, 0o755)?;
        files::write_atomic(
            &self.dir.join(ROOT_CERT_FILE),
            cert.roots_pem.as_bytes(),
            files::PUBLIC_FILE_MODE,
        )?;
        files::write_atomic(
            &self.dir.join(KEY_FILE),
            cert.key_pem.as_bytes(),
            files::PRIVATE_FILE_MODE,
        )?;
        files::write_atomic(
            &self.dir.join(CERT_CHAIN_FILE),
            cert.chain_pem.as_bytes(),
            files::PUBLIC_FILE_MODE,
        )?;
        Ok(())
    }
}
