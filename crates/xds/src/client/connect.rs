//! How the subscriber reaches the control plane. A fresh channel per attempt, so a renewed
//! client certificate or token is picked up on reconnect.

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};

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
}

/// A fixed endpoint (with its TLS settings) and an optional bearer token.
#[derive(Clone, Debug)]
pub struct EndpointConnector {
    endpoint: Endpoint,
    bearer: Option<String>,
}

impl EndpointConnector {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            bearer: None,
        }
    }

    pub fn with_bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }
}

#[tonic::async_trait]
impl Connect for EndpointConnector {
    async fn connect(&self) -> Result<Channel, ConnectError> {
        self.endpoint
            .connect()
            .await
            .map_err(|source| ConnectError::Transport {
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
