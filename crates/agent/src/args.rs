//! Every setting of `isthmus agent`, parsed in one place. Variables keep Istio's names where
//! Istio has one (`CA_ADDR`, `TRUST_DOMAIN`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:15020";

#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// The control plane's certificate API, e.g. https://10.0.0.2:15012 (Istio's CA_ADDR).
    #[arg(long, env = "CA_ADDR")]
    pub ca_addr: String,
    /// The name the control plane's certificate must carry.
    #[arg(long, default_value = crate::identity::config::DEFAULT_CA_SERVER_NAME, env = "ISTHMUS_CA_SERVER_NAME")]
    pub ca_server_name: String,
    /// Where key.pem, cert-chain.pem and root-cert.pem are kept (the seeds' /etc/certs).
    #[arg(long, default_value = crate::identity::config::DEFAULT_CERT_DIR, env = "ISTHMUS_CERT_DIR")]
    pub cert_dir: PathBuf,
    /// Roots to trust for the control plane [default: <cert-dir>/root-cert.pem].
    #[arg(long, env = "ISTHMUS_ROOT_CERT")]
    pub root_cert: Option<PathBuf>,
    /// Join token (from `isthmus token create`); prefer --join-token-file.
    #[arg(
        long,
        env = "ISTHMUS_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    pub join_token: Option<String>,
    /// File holding the join token (re-read at each use).
    #[arg(long, env = "ISTHMUS_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Certificate lifetime to ask for (default: the CA's).
    #[arg(long)]
    pub cert_lifetime: Option<humantime::Duration>,
    /// Prometheus metrics (certificate expiry, requests).
    #[arg(long, default_value = DEFAULT_METRICS_ADDR, env = "ISTHMUS_AGENT_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Run only the identity manager (the seeds' node agent): keep a valid certificate in
    /// --cert-dir and nothing else.
    #[arg(long)]
    pub identity_only: bool,
}

impl AgentArgs {
    pub fn identity_config(&self) -> crate::identity::IdentityConfig {
        let mut cfg = crate::identity::IdentityConfig::new(self.ca_addr.clone());
        cfg.ca_server_name.clone_from(&self.ca_server_name);
        cfg.cert_dir.clone_from(&self.cert_dir);
        cfg.ca_root.clone_from(&self.root_cert);
        cfg.token = match (&self.join_token, &self.join_token_file) {
            (Some(t), _) => Some(crate::identity::TokenSource::Inline(t.clone())),
            (None, Some(p)) => Some(crate::identity::TokenSource::File(p.clone())),
            (None, None) => None,
        };
        cfg.lifetime = self.cert_lifetime.map(Into::into);
        cfg
    }
}
