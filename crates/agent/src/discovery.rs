//! The agent's discovery subscriber: connects to the control plane with the workload
//! certificate the identity manager keeps (mTLS), so a renewed certificate is used from the next
//! connection on and no join token is spent.

use std::sync::Arc;

use isthmus_socket::SocketFactory;
use isthmus_xds::{Connect, ConnectError};
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::identity::CurrentCert;

pub struct CertConnector {
    pub address: String,
    pub server_name: String,
    pub cert: watch::Receiver<CurrentCert>,
    /// Makes the connection (marked when the agent captures).
    pub sockets: Arc<SocketFactory>,
    /// The host's mesh IP (INSTANCE_IP), the address in the node id: connections come from it
    /// when it is local, which is what lets the control plane believe the node id.
    pub source: Option<std::net::IpAddr>,
}

#[tonic::async_trait]
impl Connect for CertConnector {
    async fn connect(&self) -> Result<Channel, ConnectError> {
        let cert: Option<Arc<_>> = self.cert.borrow().clone();
        let Some(cert) = cert else {
            return Err(ConnectError::Credentials(
                "no workload certificate yet".into(),
            ));
        };
        // CA_ADDR may list several replicas: the first that answers serves this stream.
        crate::sockets::Failover::of(&self.address)
            .connect(|address| self.connect_one(address, cert.clone()))
            .await
    }

    fn rebalance(&self) {
        crate::sockets::Failover::of(&self.address).shuffle();
    }
}

impl CertConnector {
    async fn connect_one(
        &self,
        address: String,
        cert: Arc<crate::identity::WorkloadCertificate>,
    ) -> Result<Channel, ConnectError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&cert.roots_pem))
            .identity(Identity::from_pem(&cert.chain_pem, &cert.key_pem))
            .domain_name(self.server_name.clone());
        let endpoint = Endpoint::from_shared(address.clone())
            .map_err(|e| {
                ConnectError::Credentials(format!("bad control-plane address {address:?}: {e}"))
            })?
            .tls_config(tls)
            .map_err(|e| ConnectError::Credentials(format!("TLS setup failed: {e}")))?
            .tcp_nodelay(true)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(1 << 20)
            // A replica that died without closing (host down, paused) is noticed within
            // 15 s, and the stream moves to another.
            .http2_keep_alive_interval(std::time::Duration::from_secs(10))
            .keep_alive_timeout(std::time::Duration::from_secs(5))
            .keep_alive_while_idle(true);
        crate::sockets::connect_channel_from(&endpoint, self.sockets.clone(), self.source)
            .await
            .map_err(|source| ConnectError::Transport {
                uri: address.clone(),
                source,
            })
    }
}
