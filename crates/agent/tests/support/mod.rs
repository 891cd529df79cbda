//! What several of the agent's test files share.
#![allow(dead_code)]

use std::sync::Arc;

use anyhow::Result;
use isthmus_hbone::{Credentials, CredentialsWatch};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

const TD: &str = "cluster.local";

/// A mesh CA for the test: workload certificates with SPIFFE URI SANs.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test mesh CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn issue(&self, spiffe: &str) -> Result<CredentialsWatch> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(spiffe.try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        let creds = Credentials {
            cert_chain: vec![cert.der().clone()],
            private_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots: vec![self.cert.clone()],
            trust_domain: TD.to_string(),
        };
        // The receiver keeps the last value after the sender is gone.
        Ok(watch::channel(Some(Arc::new(creds))).1)
    }
}

/// A writer the access log goes to, for assertions.
#[derive(Clone, Default)]
pub struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The access log of the whole test binary, in the text and the JSON forms. A global
/// subscriber, because a scoped one misses events whose callsites other tests' threads
/// registered first; tests pick their own lines by their own addresses.
pub fn access_logs() -> &'static (LogBuf, LogBuf) {
    use tracing_subscriber::layer::SubscriberExt;
    static LOG: std::sync::OnceLock<(LogBuf, LogBuf)> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let (text, json) = (LogBuf::default(), LogBuf::default());
        let (t, j) = (text.clone(), json.clone());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("access=info"))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || t.clone())
                    .with_ansi(false),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(move || j.clone()),
            );
        // Only this function installs one; a failure would mean another did, and the tests'
        // assertions would say so.
        let _ = tracing::subscriber::set_global_default(subscriber);
        (text, json)
    })
}
