//! An in-process CA server over real TLS on 127.0.0.1, for tests of this crate and of its
//! clients (the agent). Enabled by the `test-util` feature.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{
    server_tls_config, tls_incoming, Authenticator, Ca, CaConfig, CertificateService, MemoryLedger,
    ServingCertOptions, TokenIssuer,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running CA with a temporary directory, a memory ledger and a TLS listener.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub ca: Arc<Ca>,
    pub tokens: Arc<TokenIssuer>,
    pub ledger: Arc<MemoryLedger>,
    pub service: CertificateService,
    pub addr: SocketAddr,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl TestCa {
    /// A fresh self-signed CA with default settings, serving on an ephemeral port.
    pub async fn start() -> Result<Self, BoxError> {
        Self::start_with(|_| {}).await
    }

    /// Like [`TestCa::start`], after `tweak` adjusts the configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut CaConfig)) -> Result<Self, BoxError> {
        let dir = tempfile::tempdir()?;
        let mut config = CaConfig::new(dir.path().join("ca"));
        tweak(&mut config);
        let ca = Arc::new(Ca::load_or_create(&config)?);
        let tokens = Arc::new(
            TokenIssuer::load_or_create(
                &config.dir.join(crate::token::TOKEN_KEY_FILE),
                &config.trust_domain,
            )?
            .with_root_pins(ca.roots()),
        );
        let ledger = Arc::new(MemoryLedger::new());
        let auth = Authenticator::new(ca.clone(), tokens.clone(), ledger.clone());
        let service = CertificateService::new(ca.clone(), auth);
        let mut this = Self {
            dir,
            ca,
            tokens,
            ledger,
            service,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            server: None,
        };
        this.serve().await?;
        Ok(this)
    }

    /// (Re)starts serving, on the same port as before if there was one.
    pub async fn serve(&mut self) -> Result<(), BoxError> {
        // After `stop` the old accept task may hold the port for a moment longer.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => break other?,
            }
        };
        self.addr = listener.local_addr()?;
        let tls = server_tls_config(self.ca.clone(), ServingCertOptions::default())?;
        let (tx, rx) = oneshot::channel();
        let router =
            tonic::transport::Server::builder().add_service(self.service.clone().into_server());
        let task = tokio::spawn(async move {
            let incoming = tls_incoming(listener, tls);
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
            {
                tracing::error!(error = %e, "test CA server failed");
            }
        });
        self.server = Some((tx, task));
        Ok(())
    }

    /// Stops serving and waits until the port is closed.
    pub async fn stop(&mut self) {
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            // Open connections may hold up a graceful shutdown; then cut them.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// PEM roots a client should trust.
    pub fn root_pem(&self) -> String {
        self.ca.trust_bundle_pem()
    }

    /// A join token registered in the ledger.
    pub fn token(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
        max_uses: Option<u32>,
    ) -> Result<(String, crate::TokenRecord), BoxError> {
        let (token, record) = self
            .tokens
            .create(namespace, service_account, ttl, max_uses)?;
        self.ledger.register(record.clone());
        Ok((token, record))
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            task.abort();
        }
    }
}
