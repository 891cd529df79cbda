//! The one server-certificate verifier of the CLI's TLS checks (`join`, `doctor`): it records
//! the chain the server presented and WebPKI's verdict against the roots it was given, then
//! either enforces the verdict or only records it (so that a check can say what it saw).

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// What the server presented, and whether it verified against the roots.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Leaf first, then the intermediates, as sent.
    pub chain: Vec<CertificateDer<'static>>,
    /// Why the chain does not verify; `None` when it does.
    pub verdict: Option<rustls::Error>,
}

#[derive(Debug)]
pub struct RecordingVerifier {
    inner: Result<Arc<WebPkiServerVerifier>, String>,
    enforce: bool,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<Seen>>,
}

impl RecordingVerifier {
    /// The handshake fails unless the chain verifies against `roots` for the server name. Every
    /// root must be usable (the error names the bad one).
    pub fn enforcing(roots: &[CertificateDer<'static>]) -> Result<Arc<Self>, String> {
        let provider = provider();
        if roots.is_empty() {
            return Err("no root certificate".into());
        }
        let mut store = RootCertStore::empty();
        for (i, root) in roots.iter().enumerate() {
            store
                .add(root.clone())
                .map_err(|e| format!("root certificate {}: {e}", i + 1))?;
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self::new(Ok(inner), true, provider))
    }

    /// Any handshake completes; the verdict against `roots` (the usable ones) is recorded.
    pub fn observing(roots: &[CertificateDer<'static>]) -> Arc<Self> {
        let provider = provider();
        let mut store = RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
        let inner = if added == 0 {
            Err("no usable root certificate".to_string())
        } else {
            WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .map_err(|e| e.to_string())
        };
        Self::new(inner, false, provider)
    }

    /// Any handshake completes and nothing is trusted: for reading what a server says before
    /// deciding whether to believe it (nothing secret may be sent on such a connection).
    pub fn trusting_nothing() -> Arc<Self> {
        let provider = provider();
        Self::new(Err("nothing is trusted yet".into()), false, provider)
    }

    fn new(
        inner: Result<Arc<WebPkiServerVerifier>, String>,
        enforce: bool,
        provider: Arc<CryptoProvider>,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner,
            enforce,
            provider,
            seen: Mutex::new(None),
        })
    }

    /// What the last handshake presented; `None` before one got that far.
    pub fn seen(&self) -> Option<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A client configuration with this verifier, no client certificate, ALPN `h2`.
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, rustls::Error> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = match &self.inner {
            Ok(v) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .err(),
            Err(e) => Some(rustls::Error::General(e.clone())),
        };
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(Seen {
            chain,
            verdict: verdict.clone(),
        });
        match verdict {
            Some(e) if self.enforce => Err(e),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    // The handshake signatures are always checked: they prove the server holds the key of the
    // certificate it presented, whatever is decided about that certificate.
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
