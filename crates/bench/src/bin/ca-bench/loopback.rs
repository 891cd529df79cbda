//! The certificate API served from this process: the same `CertificateService`,
//! `server_tls_config`, `tls_incoming` and tonic server as `isthmus server`
//! (crates/control-plane/src/server.rs), over loopback TCP, without the server's store, log
//! file or other listeners. Callers use a client certificate, so no ledger is involved. What
//! the server costs beyond this is its process, not the gRPC/TLS stack.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use isthmus_ca::{
    server_tls_config, tls_incoming, Authenticator, Ca, CaConfig, CertificateService, MemoryLedger,
    ServingCertOptions, SpiffeId, TokenIssuer,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::grpc::Credentials;

pub struct Loopback {
    pub url: String,
    pub credentials: Credentials,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A CA generated in `dir` serving the certificate API on 127.0.0.1, and a client
/// certificate for `identity` from it.
pub async fn start(dir: &Path, identity: &SpiffeId) -> anyhow::Result<Loopback> {
    let config = CaConfig::new(dir.join("ca"));
    let ca = Arc::new(Ca::load_or_create(&config)?);
    let tokens = Arc::new(TokenIssuer::load_or_create(
        &config.dir.join(isthmus_ca::token::TOKEN_KEY_FILE),
        ca.trust_domain(),
    )?);
    let auth = Authenticator::new(ca.clone(), tokens, Arc::new(MemoryLedger::new()));
    let router = tonic::transport::Server::builder()
        .add_service(CertificateService::new(ca.clone(), auth).into_server());
    let tls = server_tls_config(ca.clone(), ServingCertOptions::default())?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let pair = ca
        .issue_workload(identity, None)
        .context("cannot issue the callers' client certificate")?;
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let task = tokio::spawn(async move {
        let incoming = tls_incoming(listener, tls);
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            eprintln!("in-process certificate API failed: {e}");
        }
    });
    Ok(Loopback {
        url,
        credentials: Credentials {
            root_pem: ca.trust_bundle_pem(),
            tokens: Vec::new(),
            client_cert: Some((pair.chain_pem(), pair.key_pem.clone())),
        },
        stop,
        task,
    })
}

impl Loopback {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let abort = self.task.abort_handle();
        // Open client connections may hold up a graceful shutdown; then cut them.
        if tokio::time::timeout(std::time::Duration::from_secs(2), self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}
