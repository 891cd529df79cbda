//! TLS for port 15012 (certificate API and, later, discovery): the serving certificate,
//! renewed in place, and client certificates that are requested but judged by the
//! services rather than by the handshake.
//!
//! Why the handshake accepts any client certificate: a rejected handshake gives the
//! caller an opaque TLS alert, while a service can answer "your certificate expired at
//! ..." as a gRPC status. The handshake still proves the client holds the certificate's
//! key; every service on this listener must then call
//! [`Authenticator::from_peer_certs`](crate::service::Authenticator::from_peer_certs)
//! (or [`Ca::verify_workload_chain`]) before trusting `peer_certs()`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use isthmus_socket::{ConnGuard, GuardConfig, GuardedIo, Stage};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::authority::{Ca, ServingCertOptions, SignError};

/// The bytes of the HTTP/2 client preface (`PRI * HTTP/2.0...`): a connection that has sent
/// them after its handshake is proven (see [`isthmus_socket::guard`]).
pub const H2_PREFACE_LEN: usize = 24;

/// A TLS connection on port 15012 under its listener's guard: fails when evicted or when a
/// stage deadline passes. tonic sees the TLS stream's peer certificates through it.
pub struct GuardedTls(GuardedIo<TlsStream<TcpStream>>);

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot issue the control plane's serving certificate: {0}")]
    Issue(#[from] SignError),
    #[error("serving certificate key is unusable: {0}")]
    Key(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Builds the server TLS configuration for port 15012: TLS 1.2/1.3, ALPN `h2`, a serving
/// certificate from `ca` renewed at half its lifetime, and optional client certificates.
pub fn server_tls_config(
    ca: Arc<Ca>,
    serving: ServingCertOptions,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ServingCertResolver::new(ca, serving, provider.clone())?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(DeferredClientAuth {
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Bounds for callers without their own (tests, benchmarks): generous caps, the server's
/// deadlines.
pub fn default_guard() -> ConnGuard {
    ConnGuard::new(
        "grpc",
        GuardConfig {
            max_total: 10_000,
            max_per_source: 10_000,
            handshake_timeout: Duration::from_secs(10),
            first_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        },
    )
}

/// [`tls_incoming_guarded`] under [`default_guard`].
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<Result<GuardedTls, std::io::Error>> {
    tls_incoming_guarded(listener, config, default_guard())
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow client does
/// not hold up others); feed the stream to tonic's `Server::serve_with_incoming`, whose
/// `Request::peer_certs()` then works. Every connection is admitted by `guard` (refused
/// ones are closed at once), has `handshake_timeout` to finish its handshake and
/// `first_timeout` to send the HTTP/2 preface, and is closed when idle or evicted. Ends
/// when the receiving side is dropped.
pub fn tls_incoming_guarded(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    guard: ConnGuard,
) -> ReceiverStream<Result<GuardedTls, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Per-connection errors (e.g. EMFILE): report, back off, go on.
                    isthmus_socket::accept_failed("grpc", &e).await;
                    continue;
                }
            };
            let Some(conn) = guard.admit(peer, Stage::Handshake) else {
                continue; // dropped: closed at once
            };
            // gRPC sends many small frames (discovery pushes, ACKs): without this each one
            // waits out Nagle's algorithm and a delayed ACK (~40 ms).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let timeout = conn.config().handshake_timeout;
                let handshake = tokio::select! {
                    h = tokio::time::timeout(timeout, acceptor.accept(tcp)) => h,
                    () = conn.evicted() => return,
                };
                match handshake {
                    Ok(Ok(stream)) => {
                        let io = GuardedIo::new(stream, conn, Some(H2_PREFACE_LEN));
                        let _ = tx.send(Ok(GuardedTls(io))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => conn.timed_out(Stage::Handshake),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

impl Connected for GuardedTls {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().connect_info()
    }
}

impl AsyncRead for GuardedTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Serves the control plane's certificate, issuing a fresh one past half its lifetime.
#[derive(Debug)]
struct ServingCertResolver {
    ca: Arc<Ca>,
    options: ServingCertOptions,
    provider: Arc<CryptoProvider>,
    current: Mutex<(Arc<CertifiedKey>, SystemTime)>,
}

impl ServingCertResolver {
    fn new(
        ca: Arc<Ca>,
        options: ServingCertOptions,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let first = issue(&ca, &options, &provider)?;
        Ok(Self {
            ca,
            options,
            provider,
            current: Mutex::new(first),
        })
    }
}

fn issue(
    ca: &Ca,
    options: &ServingCertOptions,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, SystemTime), TlsError> {
    let issued = ca.issue_serving(options)?;
    let key = provider
        .key_provider
        .load_private_key(issued.key_der()?)
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let renew_at = issued.not_before
        + issued
            .not_after
            .duration_since(issued.not_before)
            .unwrap_or_default()
            / 2;
    Ok((Arc::new(CertifiedKey::new(issued.chain, key)), renew_at))
}

impl ServingCertResolver {
    /// The certificate to serve at `now`, reissued once past half its lifetime.
    fn current(&self, now: SystemTime) -> Arc<CertifiedKey> {
        // Nothing in this lock can panic half-way through an update, so a poisoned
        // guard still holds a consistent pair.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if now >= current.1 {
            match issue(&self.ca, &self.options, &self.provider) {
                Ok(fresh) => {
                    tracing::info!("renewed the control plane's serving certificate");
                    *current = fresh;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the serving certificate; serving the old one")
                }
            }
        }
        current.0.clone()
    }
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current(SystemTime::now()))
    }
}

/// Asks for a client certificate and checks the handshake signature (proof the client
/// holds the key), but leaves trust decisions to the services (see the module docs).
#[derive(Debug)]
struct DeferredClientAuth {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for DeferredClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::CaConfig;

    #[test]
    fn serving_certificate_is_reissued_past_half_life() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::load_or_create(&CaConfig::new(dir.path())).unwrap());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver =
            ServingCertResolver::new(ca, ServingCertOptions::default(), provider).unwrap();
        let now = SystemTime::now();
        let first = resolver.current(now);
        assert!(Arc::ptr_eq(&first, &resolver.current(now)));
        let later = now + Duration::from_secs(16 * 24 * 3600);
        let second = resolver.current(later);
        assert_ne!(first.cert[0], second.cert[0]);
        let info = crate::CertInfo::parse(&second.cert[0], "serving").unwrap();
        assert!(info.uri_sans.is_empty());
    }
}
