//! Configuration of the identity manager, validated once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use isthmus_ca::cert::ROOT_CERT_FILE;
use isthmus_ca::SpiffeId;

/// TLS name the control plane's serving certificate is checked against.
pub const DEFAULT_CA_SERVER_NAME: &str = isthmus_agent_config::defaults::CA_SERVER_NAME;
/// Where a host keeps `key.pem`, `cert-chain.pem` and `root-cert.pem` (Istio's layout).
pub const DEFAULT_CERT_DIR: &str = isthmus_agent_config::defaults::CERT_DIR;

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "control-plane address {value:?} is invalid: {why} (expected e.g. https://10.0.0.2:15012)"
    )]
    Address { value: String, why: String },
    #[error("CA server name {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
    #[error("cannot read the join token from {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the join token {0} is empty")]
    EmptyToken(&'static str),
    #[error("retry backoff must satisfy 0 < initial ({initial:?}) <= max ({max:?})")]
    Backoff { initial: Duration, max: Duration },
    #[error("requested certificate lifetime must be at least 2 seconds, got {0:?}")]
    Lifetime(Duration),
}

/// Where the join token comes from. Files are re-read at every use, so an operator can
/// drop in a fresh token without restarting the agent.
#[derive(Clone)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inline(_) => f.write_str("Inline(<redacted>)"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

impl TokenSource {
    pub fn read(&self) -> Result<String, ConfigError> {
        let (token, what) = match self {
            Self::Inline(t) => (t.trim().to_owned(), "given inline"),
            Self::File(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile {
                        path: path.clone(),
                        source,
                    })?;
                (text.trim().to_owned(), "file")
            }
        };
        if token.is_empty() {
            return Err(ConfigError::EmptyToken(what));
        }
        Ok(token)
    }
}

/// Settings of the identity manager.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Control plane's certificate API, `https://host:15012`.
    pub ca_address: String,
    /// Name checked against the control plane's serving certificate.
    pub ca_server_name: String,
    /// Directory of `key.pem`, `cert-chain.pem`, `root-cert.pem`.
    pub cert_dir: PathBuf,
    /// Roots trusted for the control plane; `None` = `<cert_dir>/root-cert.pem`.
    pub ca_root: Option<PathBuf>,
    /// Join token for the first certificate (and when the current one cannot renew).
    pub token: Option<TokenSource>,
    /// Identity to request; `None` = the join token's subject, else the certificate on disk.
    pub identity: Option<SpiffeId>,
    /// Lifetime to ask for; `None` = the CA's default.
    pub lifetime: Option<Duration>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Deadline of one certificate request, connection included.
    pub request_timeout: Duration,
    /// Makes the connections to the control plane (marked when the agent captures).
    pub sockets: Arc<isthmus_socket::SocketFactory>,
}

impl IdentityConfig {
    pub fn new(ca_address: impl Into<String>) -> Self {
        Self {
            ca_address: ca_address.into(),
            ca_server_name: DEFAULT_CA_SERVER_NAME.to_owned(),
            cert_dir: PathBuf::from(DEFAULT_CERT_DIR),
            ca_root: None,
            token: None,
            identity: None,
            lifetime: None,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
            sockets: isthmus_socket::SocketFactory::unmarked(),
        }
    }

    pub fn ca_root_path(&self) -> PathBuf {
        self.ca_root
            .clone()
            .unwrap_or_else(|| self.cert_dir.join(ROOT_CERT_FILE))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        // A comma-separated list names several replicas; each must be a valid address.
        for address in self.ca_address.split(',').map(str::trim) {
            let bad = |why: &str| ConfigError::Address {
                value: if address == self.ca_address {
                    address.to_owned()
                } else {
                    format!("{address} (in {})", self.ca_address)
                },
                why: why.to_owned(),
            };
            let uri: tonic::codegen::http::Uri = address
                .parse()
                .map_err(|e: tonic::codegen::http::uri::InvalidUri| bad(&e.to_string()))?;
            if uri.scheme_str() != Some("https") {
                return Err(bad(
                    "the certificate API is only served over TLS: use https://",
                ));
            }
            if uri.host().is_none_or(str::is_empty) {
                return Err(bad("no host"));
            }
        }
        if !is_valid_server_name(&self.ca_server_name) {
            return Err(ConfigError::ServerName(self.ca_server_name.clone()));
        }
        if self.initial_backoff.is_zero() || self.initial_backoff > self.max_backoff {
            return Err(ConfigError::Backoff {
                initial: self.initial_backoff,
                max: self.max_backoff,
            });
        }
        if let Some(l) = self.lifetime {
            if l < Duration::from_secs(2) {
                return Err(ConfigError::Lifetime(l));
            }
        }
        Ok(())
    }
}

fn is_valid_server_name(name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_ok()
        || (!name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_address_and_names() {
        assert!(IdentityConfig::new("https://10.0.0.2:15012")
            .validate()
            .is_ok());
        let err = IdentityConfig::new("http://10.0.0.2:15012")
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("use https://"), "{err}");
        let mut c = IdentityConfig::new("https://cp:15012");
        c.ca_server_name = "bad name".into();
        assert!(matches!(c.validate(), Err(ConfigError::ServerName(_))));
    }
}
