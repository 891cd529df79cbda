//! How the subscriber reaches the control plane. A fresh channel per attempt, so a renewed
//! client certificate or token is picked up on reconnect.

use std::net::{IpAddr, SocketAddr};

use hyper_util::rt::TokioIo;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the control plane at {uri}: {source}")]
    Transport {
        uri: String,
        source: tonic::transport::Error,
    },
    #[error("bad credentials for the control plane: {0}")]
    Credentials(String),
}

/// Opens channels to the control plane and supplies per-stream metadata.
#[tonic::async_trait]
pub trait Connect: Send + Sync + 'static {
    async fn connect(&self) -> Result<Channel, ConnectError>;

    /// Metadata for each stream (e.g. `authorization: Bearer <token>`), asked per attempt.
    fn metadata(&self) -> Result<MetadataMap, ConnectError> {
        Ok(MetadataMap::new())
    }

    /// The server asked the stream to reconnect elsewhere (its maximum age): a connector that
    /// knows several control planes may pick another for the next `connect`.
    fn rebalance(&self) {}
}

/// A fixed endpoint (with its TLS settings) and an optional bearer token.
#[derive(Clone, Debug)]
pub struct EndpointConnector {
    endpoint: Endpoint,
    bearer: Option<String>,
    source: Option<IpAddr>,
}

impl EndpointConnector {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            bearer: None,
            source: None,
        }
    }

    /// Connects from `source` (port chosen by the kernel): the server believes a node id's
    /// address when the connection comes from it. The address must be local to the host.
    pub fn with_source(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    pub fn with_bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }
}

#[tonic::async_trait]
impl Connect for EndpointConnector {
    async fn connect(&self) -> Result<Channel, ConnectError> {
        let connected = match self.source {
            None => self.endpoint.connect().await,
            Some(source) => {
                let connector = tower::service_fn(move |uri: Uri| async move {
                    connect_from(source, &uri).await.map(TokioIo::new)
                });
                self.endpoint.connect_with_connector(connector).await
            }
        };
        connected.map_err(|source| ConnectError::Transport {
            uri: self.endpoint.uri().to_string(),
            source,
        })
    }

    fn metadata(&self) -> Result<MetadataMap, ConnectError> {
        let mut m = MetadataMap::new();
        if let Some(token) = &self.bearer {
            let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                ConnectError::Credentials("the token has characters not allowed in a header".into())
            })?;
            m.insert("authorization", value);
        }
        Ok(m)
    }
}

/// A TCP connection to the URI's authority from `source`.
async fn connect_from(source: IpAddr, uri: &Uri) -> std::io::Result<tokio::net::TcpStream> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::other(format!("{uri} names no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    let mut last = None;
    for dst in tokio::net::lookup_host((host, port)).await? {
        if dst.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let socket = if dst.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(dst).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::other(format!("{host} has no address of {source}'s family"))
    }))
}
