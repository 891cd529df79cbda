//! One certificate request to the control plane's `IstioCertificateService`: a fresh key
//! made here (it never leaves the host), a CSR for our identity, and the chain back.

use std::time::SystemTime;

use isthmus_ca::cert;
use isthmus_ca::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use isthmus_ca::pb::IstioCertificateRequest;
use isthmus_ca::{CertInfo, SpiffeId};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

use super::config::IdentityConfig;
use super::store::{StoreError, WorkloadCertificate};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the control plane's root certificate {path}: {detail} (it comes with the host's files from `isthmus vm config`)")]
    Roots { path: String, detail: String },
    #[error("cannot make a key and CSR: {0}")]
    Csr(String),
    #[error("cannot reach the control plane at {address}: {detail}; is `isthmus server` running and reachable on that port?")]
    Connect { address: String, detail: String },
    #[error("the CA refused the request ({code:?}): {message}")]
    Rejected { code: Code, message: String },
    #[error("the CA's answer is unusable: {0}")]
    BadResponse(String),
}

impl ClientError {
    /// True when retrying the same request cannot help: the CA said no on the merits.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Rejected {
                code: Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument,
                ..
            }
        )
    }

    /// True when the CA did not accept the credential (token or certificate).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Self::Rejected {
                code: Code::Unauthenticated,
                ..
            }
        )
    }
}

/// How this request authenticates.
pub(crate) enum Credential<'a> {
    Token(String),
    Certificate(&'a WorkloadCertificate),
}

/// A channel to the control plane's gRPC port, presenting `cert` (mTLS) when given: to the
/// first of CA_ADDR's replicas that answers.
pub(crate) async fn connect(
    config: &IdentityConfig,
    cert: Option<&WorkloadCertificate>,
) -> Result<Channel, ClientError> {
    crate::sockets::Failover::of(&config.ca_address)
        .connect(|address| connect_one(config, cert, address))
        .await
}

async fn connect_one(
    config: &IdentityConfig,
    cert: Option<&WorkloadCertificate>,
    address: String,
) -> Result<Channel, ClientError> {
    let root_path = config.ca_root_path();
    let roots_pem = std::fs::read_to_string(&root_path).map_err(|e| ClientError::Roots {
        path: root_path.display().to_string(),
        detail: e.to_string(),
    })?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots_pem))
        .domain_name(config.ca_server_name.clone());
    if let Some(current) = cert {
        tls = tls.identity(Identity::from_pem(&current.chain_pem, &current.key_pem));
    }
    let connect_err = |e: tonic::transport::Error| ClientError::Connect {
        address: address.clone(),
        detail: error_chain(&e),
    };
    let endpoint = Channel::from_shared(address.clone())
        .map_err(|e| ClientError::Connect {
            address: address.clone(),
            detail: e.to_string(),
        })?
        .tls_config(tls)
        .map_err(connect_err)?
        .connect_timeout(config.request_timeout)
        .timeout(config.request_timeout);
    crate::sockets::connect_channel(&endpoint, config.sockets.clone())
        .await
        .map_err(connect_err)
}

/// A refusal or failure of a call, as a [`ClientError`].
pub(crate) fn call_error(config: &IdentityConfig, s: tonic::Status) -> ClientError {
    match s.code() {
        Code::Unavailable => ClientError::Connect {
            address: config.ca_address.clone(),
            detail: s.message().to_owned(),
        },
        code => ClientError::Rejected {
            code,
            message: s.message().to_owned(),
        },
    }
}

/// Asks the CA for a certificate for `identity` and checks what comes back.
pub(crate) async fn request_certificate(
    config: &IdentityConfig,
    identity: &SpiffeId,
    credential: Credential<'_>,
) -> Result<WorkloadCertificate, ClientError> {
    let (key, csr) = make_csr(identity)?;
    let (cert, token) = match credential {
        Credential::Certificate(current) => (Some(current), None),
        Credential::Token(t) => (None, Some(t)),
    };
    let channel = connect(config, cert).await?;

    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: config
            .lifetime
            .map_or(0, |l| i64::try_from(l.as_secs()).unwrap_or(i64::MAX)),
        metadata: None,
    });
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().map_err(|_| {
            ClientError::Csr("the join token has characters not allowed in a header".into())
        })?;
        request.metadata_mut().insert("authorization", value);
    }
    let response = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .map_err(|s| call_error(config, s))?
        .into_inner();
    into_workload_cert(&key.serialize_pem(), &response.cert_chain, identity)
}

fn make_csr(identity: &SpiffeId) -> Result<(KeyPair, String), ClientError> {
    let csr_err = |e: rcgen::Error| ClientError::Csr(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(csr_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity.to_string().try_into().map_err(csr_err)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(csr_err)?;
    Ok((key, csr))
}

/// Splits the CA's answer into chain (leaf, intermediates) and roots, and checks it.
fn into_workload_cert(
    key_pem: &str,
    cert_chain: &[String],
    identity: &SpiffeId,
) -> Result<WorkloadCertificate, ClientError> {
    if cert_chain.len() < 2 {
        return Err(ClientError::BadResponse(format!(
            "expected at least a leaf and a root, got {} certificate(s)",
            cert_chain.len()
        )));
    }
    let mut chain: Vec<CertificateDer<'static>> = Vec::new();
    let mut roots: Vec<CertificateDer<'static>> = Vec::new();
    let last = cert_chain.len() - 1;
    for (i, pem) in cert_chain.iter().enumerate() {
        let bad = |e: isthmus_ca::CertError| ClientError::BadResponse(e.to_string());
        for der in cert::parse_pem_certs(pem, "cert_chain entry").map_err(bad)? {
            let info = CertInfo::parse(&der, "cert_chain entry").map_err(bad)?;
            // The last entry is the root by contract; other self-signed entries are
            // further roots of the trust bundle (root rotation).
            if i > 0 && (i == last || info.self_signed) {
                if !roots.contains(&der) {
                    roots.push(der);
                }
            } else {
                chain.push(der);
            }
        }
    }
    let cert = WorkloadCertificate::verify(key_pem, &chain, &roots, SystemTime::now())
        .map_err(|e: StoreError| ClientError::BadResponse(e.to_string()))?;
    if cert.identity != *identity {
        return Err(ClientError::BadResponse(format!(
            "the certificate is for {} instead of {identity}",
            cert.identity
        )));
    }
    Ok(cert)
}

/// Joins an error and its sources: tonic's transport errors say little at the top level.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
