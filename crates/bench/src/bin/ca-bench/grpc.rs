//! Callers of `isthmus server`'s certificate API as the agent calls it
//! (crates/agent/src/identity/client.rs): gRPC over TLS to the root from the admin API, with a
//! join token in `authorization` or a client certificate in the handshake.

use std::sync::Arc;

use anyhow::Context;
use isthmus_bench::server::Admin;
use isthmus_ca::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use isthmus_ca::pb::IstioCertificateRequest;
use isthmus_ca::{CertInfo, SpiffeId};
use serde::Deserialize;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::config::{Mode, CA_SERVER_NAME, NAMESPACE, REQUEST_TIMEOUT, SERVICE_ACCOUNT};

/// A few HTTP/2 connections to the certificate API and the credentials to use on them.
pub struct Callers {
    channels: Vec<Channel>,
    /// `authorization` values, one per token; empty with a client certificate.
    tokens: Vec<MetadataValue<tonic::metadata::Ascii>>,
    csrs: Arc<[String]>,
}

#[derive(Deserialize)]
struct RootResponse {
    #[serde(rename = "rootCert")]
    root_cert: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapResponse {
    cert_chain: String,
    key: String,
}

#[derive(Deserialize)]
struct TokenList {
    items: Vec<TokenUses>,
}

#[derive(Deserialize)]
struct TokenUses {
    uses: u64,
}

/// What the callers present: the roots to trust, and join tokens or a client certificate.
pub struct Credentials {
    pub root_pem: String,
    /// Join tokens, used round-robin by worker; empty with a client certificate.
    pub tokens: Vec<String>,
    /// (PEM chain, PEM key) presented in the TLS handshake.
    pub client_cert: Option<(String, String)>,
}

impl Credentials {
    /// The root and the credentials of `mode` from the admin API: one token for `Token`, one
    /// per worker for `TokenEach`, a bootstrap key pair for `Cert`.
    pub async fn from_admin(admin: &Admin, mode: Mode, workers: usize) -> anyhow::Result<Self> {
        let root: RootResponse = admin.get_json("/api/v1/ca/root").await?;
        let token_request =
            json!({"namespace": NAMESPACE, "serviceAccount": SERVICE_ACCOUNT, "ttl": "1h"});
        let token_count = match mode {
            Mode::Token => 1,
            Mode::TokenEach => workers,
            Mode::Cert => 0,
        };
        let mut tokens = Vec::with_capacity(token_count);
        for _ in 0..token_count {
            let t: TokenResponse = admin.post_json("/api/v1/tokens", &token_request).await?;
            tokens.push(t.token);
        }
        let mut client_cert = None;
        if mode == Mode::Cert {
            let pair: BootstrapResponse = admin
                .post_json(
                    "/api/v1/certs",
                    &json!({"namespace": NAMESPACE, "serviceAccount": SERVICE_ACCOUNT, "bootstrap": true}),
                )
                .await?;
            client_cert = Some((pair.cert_chain, pair.key));
        }
        Ok(Credentials {
            root_pem: root.root_cert,
            tokens,
            client_cert,
        })
    }
}

impl Callers {
    /// Opens `connections` TLS connections to `grpc`; handshakes happen here, before any
    /// timing.
    pub async fn connect(
        grpc: &str,
        credentials: Credentials,
        connections: usize,
        csrs: Arc<[String]>,
    ) -> anyhow::Result<Self> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&credentials.root_pem))
            .domain_name(CA_SERVER_NAME);
        if let Some((chain, key)) = credentials.client_cert {
            tls = tls.identity(Identity::from_pem(chain, key));
        }
        let tokens = credentials
            .tokens
            .iter()
            .map(|t| format!("Bearer {t}").parse())
            .collect::<Result<_, _>>()
            .context("a join token is not a valid header value")?;
        let endpoint = Channel::from_shared(grpc.to_owned())
            .with_context(|| format!("{grpc} is not a URI"))?
            .tls_config(tls)?
            .connect_timeout(REQUEST_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            channels.push(
                endpoint
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {grpc}"))?,
            );
        }
        Ok(Callers {
            channels,
            tokens,
            csrs,
        })
    }

    /// Request `i` from worker `worker`: CSR `i` (mod the pool), on connection `worker` (mod
    /// the connections), with the worker's token if any. Returns the PEM chain.
    pub async fn sign(&self, worker: usize, i: usize) -> anyhow::Result<Vec<String>> {
        let channel = self.channels[worker % self.channels.len()].clone();
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: self.csrs[i % self.csrs.len()].clone(),
            validity_duration: 0,
            metadata: None,
        });
        if !self.tokens.is_empty() {
            let token = self.tokens[worker % self.tokens.len()].clone();
            request.metadata_mut().insert("authorization", token);
        }
        let chain = IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map_err(|s| anyhow::anyhow!("CreateCertificate → {:?}: {}", s.code(), s.message()))?
            .into_inner()
            .cert_chain;
        anyhow::ensure!(
            chain.len() >= 2,
            "expected a leaf and a root, got {} certificate(s)",
            chain.len()
        );
        Ok(chain)
    }
}

/// Checks a chain the server sent: the leaf is for `identity` and for nothing else.
pub fn check_chain(chain: &[String], identity: &SpiffeId) -> anyhow::Result<()> {
    let leaf = chain.first().context("empty chain")?;
    let der = isthmus_ca::cert::parse_pem_certs(leaf, "leaf")?;
    let info = CertInfo::parse(
        der.first().context("no certificate in the leaf PEM")?,
        "leaf",
    )?;
    anyhow::ensure!(
        info.uri_sans == [identity.to_string()],
        "the leaf is for {:?}, expected {identity}",
        info.uri_sans
    );
    Ok(())
}

/// Uses recorded in the ledger, summed over every token of the server.
pub async fn token_uses(admin: &Admin) -> anyhow::Result<u64> {
    let list: TokenList = admin.get_json("/api/v1/tokens").await?;
    Ok(list.items.iter().map(|t| t.uses).sum())
}
