//! The Istio-compatible `IstioCertificateService`: authenticates the caller (join token or
//! client certificate), checks that the CSR asks for the caller's own identity, signs.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::authority::{Ca, SignError};
use crate::cert::CertError;
use crate::pb::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};
use crate::spiffe::SpiffeId;
use crate::token::{LedgerError, TokenClaims, TokenError, TokenIssuer, TokenLedger};

/// Largest encoded request the server decodes (the CSR itself is capped lower, at
/// [`crate::csr::MAX_CSR_BYTES`], with a clearer message).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Why a caller was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send `authorization: Bearer <join token>` or a client certificate issued by this mesh's CA")]
    Missing,
    #[error("no join token: send `authorization: Bearer <join token>`")]
    NoToken,
    #[error("authorization header is not `Bearer <token>`")]
    BadHeader,
    #[error("join token rejected: {0}")]
    Token(#[from] TokenError),
    #[error("join token rejected: {0}")]
    Ledger(#[from] LedgerError),
    #[error("workload token rejected: its enrolment {0}; enrol the host again with a new join token (`isthmus token create`)")]
    Enrolment(LedgerError),
    #[error("a workload token cannot be used here: send the host's join token")]
    NotAJoinToken,
    #[error("{0}")]
    WorkloadToken(String),
    #[error("client certificate rejected: {0}")]
    ClientCert(CertError),
    #[error("client certificate is for {found} but this CA serves trust domain {expected:?}")]
    WrongTrustDomain { found: SpiffeId, expected: String },
    #[error("{cert}; {token}")]
    Both {
        cert: Box<AuthError>,
        token: Box<AuthError>,
    },
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match &e {
            AuthError::Ledger(LedgerError::Backend(_))
            | AuthError::Enrolment(LedgerError::Backend(_)) => Status::unavailable(e.to_string()),
            AuthError::WorkloadToken(_) | AuthError::NotAJoinToken => {
                Status::permission_denied(e.to_string())
            }
            _ => Status::unauthenticated(e.to_string()),
        }
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A join token; `id` is its `jti` (the ledger key).
    Token { id: String },
    /// A workload token; `enrolment` is the id of the join token its host enrolled with.
    WorkloadToken { enrolment: String },
    /// A certificate issued by this CA and still valid (renewals).
    ClientCertificate,
}

impl Credential {
    fn noun(&self) -> &'static str {
        match self {
            Self::Token { .. } => "token",
            Self::WorkloadToken { .. } => "workload token",
            Self::ClientCertificate => "client certificate",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: SpiffeId,
    pub credential: Credential,
}

/// Authenticates callers on port 15012. Share it with the discovery service, which should
/// accept client certificates only ([`Authenticator::from_peer_certs`]).
#[derive(Clone)]
pub struct Authenticator {
    ca: Arc<Ca>,
    tokens: Arc<TokenIssuer>,
    ledger: Arc<dyn TokenLedger>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(ca: Arc<Ca>, tokens: Arc<TokenIssuer>, ledger: Arc<dyn TokenLedger>) -> Self {
        Self { ca, tokens, ledger }
    }

    /// Authenticates a TLS client certificate chain (`request.peer_certs()`); `Ok(None)`
    /// when the client sent none.
    pub fn from_peer_certs(
        &self,
        certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Option<Caller>, AuthError> {
        let Some(chain) = certs.filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let identity = self
            .ca
            .verify_workload_chain(chain, SystemTime::now())
            .map_err(AuthError::ClientCert)?;
        if identity.trust_domain() != self.ca.trust_domain() {
            return Err(AuthError::WrongTrustDomain {
                found: identity,
                expected: self.ca.trust_domain().to_owned(),
            });
        }
        Ok(Some(Caller {
            identity,
            credential: Credential::ClientCertificate,
        }))
    }

    /// Verifies an `authorization: Bearer` join or workload token (signature and claims
    /// only: the ledger is consulted by [`Authenticator::consume`]); `Ok(None)` when absent.
    pub fn from_bearer(&self, metadata: &MetadataMap) -> Result<Option<Caller>, AuthError> {
        Ok(self.bearer_claims(metadata)?.map(|(claims, identity)| {
            let credential = match claims.workload_enrolment() {
                Some(enr) => Credential::WorkloadToken {
                    enrolment: enr.to_owned(),
                },
                None => Credential::Token { id: claims.jti },
            };
            Caller {
                identity,
                credential,
            }
        }))
    }

    /// Checks the caller's credential in the ledger without spending anything: a join token
    /// must be known and not revoked, a workload token's enrolment likewise. For callers that
    /// a credential authorizes without being a certificate request (discovery streams).
    pub async fn check_standing(&self, caller: &Caller) -> Result<(), AuthError> {
        match &caller.credential {
            Credential::Token { id } => {
                self.ledger.enrolled(id).await?;
            }
            Credential::WorkloadToken { enrolment } => {
                self.enrolment_of(enrolment, &caller.identity).await?;
            }
            Credential::ClientCertificate => {}
        }
        Ok(())
    }

    /// Issues a workload token for `caller`'s identity, valid for `ttl`, under `enrolment`
    /// (the id of the join token the host enrolled with, which must be in force and for the
    /// same identity). The caller proves the identity with its certificate, or with that very
    /// join token (the first issue); a workload token cannot renew itself, so a stolen one
    /// dies with its lifetime.
    pub async fn issue_workload_token(
        &self,
        caller: &Caller,
        enrolment: &str,
        ttl: std::time::Duration,
    ) -> Result<(String, TokenClaims), AuthError> {
        let enrolment = match &caller.credential {
            Credential::Token { id } if enrolment.is_empty() || enrolment == id => id.as_str(),
            Credential::Token { id } => {
                return Err(AuthError::WorkloadToken(format!(
                    "the request names enrolment {enrolment} but authenticates with join token {id}: name that token's id, or send none"
                )))
            }
            Credential::WorkloadToken { .. } => {
                return Err(AuthError::WorkloadToken(
                    "a workload token cannot renew itself: present the host's workload certificate (mTLS), or its join token".into(),
                ))
            }
            Credential::ClientCertificate if enrolment.is_empty() => {
                return Err(AuthError::WorkloadToken(
                    "name the host's enrolment (the id of the join token it enrolled with, `isthmus token list`)".into(),
                ))
            }
            Credential::ClientCertificate => enrolment,
        };
        self.enrolment_of(enrolment, &caller.identity).await?;
        self.tokens
            .create_workload(&caller.identity, enrolment, ttl)
            .map_err(|e| AuthError::WorkloadToken(e.to_string()))
    }

    /// Checks that enrolment `id` is in force and is `identity`'s.
    async fn enrolment_of(&self, id: &str, identity: &SpiffeId) -> Result<(), AuthError> {
        let record = self
            .ledger
            .enrolled(id)
            .await
            .map_err(AuthError::Enrolment)?;
        if record.identity != *identity {
            return Err(AuthError::WorkloadToken(format!(
                "enrolment {id} is for {}, not for {identity}",
                record.identity
            )));
        }
        Ok(())
    }

    fn bearer_claims(
        &self,
        metadata: &MetadataMap,
    ) -> Result<Option<(TokenClaims, SpiffeId)>, AuthError> {
        match bearer_token(metadata)? {
            Some(token) => Ok(Some(self.tokens.verify(token)?)),
            None => Ok(None),
        }
    }

    /// Checks a bearer join token as a certificate request would (signature, issuer, audience,
    /// expiry, identity, and in the ledger: known, not revoked, uses left) without spending a
    /// use; returns its claims. For requests only a join token authorizes.
    pub async fn check_token(
        &self,
        metadata: &MetadataMap,
    ) -> Result<(TokenClaims, SpiffeId), AuthError> {
        let (claims, identity) = self.bearer_claims(metadata)?.ok_or(AuthError::NoToken)?;
        if claims.workload_enrolment().is_some() {
            return Err(AuthError::NotAJoinToken);
        }
        self.ledger.usable(&claims.jti).await?;
        Ok((claims, identity))
    }

    /// Authenticates a request: a valid client certificate wins, else a join token.
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Caller, AuthError> {
        let by_cert = self.from_peer_certs(peer_certs);
        if let Ok(Some(caller)) = by_cert {
            return Ok(caller);
        }
        match (by_cert, self.from_bearer(metadata)) {
            (_, Ok(Some(caller))) => Ok(caller),
            (Err(cert), Ok(None)) => Err(cert),
            (Err(cert), Err(token)) => Err(AuthError::Both {
                cert: Box::new(cert),
                token: Box::new(token),
            }),
            (_, Err(token)) => Err(token),
            (_, Ok(None)) => Err(AuthError::Missing),
        }
    }

    /// Records one use of the caller's join token, if that is how it authenticated.
    pub async fn consume(&self, caller: &Caller) -> Result<(), AuthError> {
        match &caller.credential {
            Credential::Token { id } => Ok(self.ledger.consume(id).await?),
            // Multi-use: nothing to spend, but the enrolment must be in force.
            Credential::WorkloadToken { .. } => self.check_standing(caller).await,
            Credential::ClientCertificate => Ok(()),
        }
    }
}

/// The token of an `authorization: Bearer <token>` header (unverified); `Ok(None)` when there
/// is no such header.
pub fn bearer_token(metadata: &MetadataMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| AuthError::BadHeader)?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(Some)
        .ok_or(AuthError::BadHeader)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

/// Counters of the certificate API.
#[derive(Debug, Clone, Default)]
pub struct CaMetrics {
    requests: Family<OutcomeLabels, Counter>,
}

impl CaMetrics {
    /// Registers `certificate_requests_total{outcome}`; pass the CA's sub-registry (the
    /// control plane uses the prefix `isthmus_ca`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "certificate_requests",
            "CreateCertificate calls by outcome (issued or the gRPC code)",
            self.requests.clone(),
        );
    }

    fn record(&self, outcome: &str) {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Certificates issued so far.
    pub fn issued(&self) -> u64 {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: "issued".into(),
            })
            .get()
    }
}

/// The gRPC service. Serve it with [`CertificateService::into_server`].
#[derive(Debug, Clone)]
pub struct CertificateService {
    ca: Arc<Ca>,
    auth: Authenticator,
    metrics: CaMetrics,
}

impl CertificateService {
    pub fn new(ca: Arc<Ca>, auth: Authenticator) -> Self {
        Self {
            ca,
            auth,
            metrics: CaMetrics::default(),
        }
    }

    pub fn metrics(&self) -> &CaMetrics {
        &self.metrics
    }

    /// The tonic service, with the request size limit applied.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Handles one request for an authenticated caller: checks, consumes a token use,
    /// signs. Separate from the transport so that it can be tested and fuzzed directly.
    pub async fn handle(
        &self,
        caller: &Caller,
        request: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let checked = self
            .ca
            .check_request(request, &caller.identity)
            .map_err(|e| sign_status(e, caller))?;
        // Only a request that would succeed spends a token use.
        self.auth.consume(caller).await?;
        let cert_chain = self.ca.sign(&checked).map_err(|e| sign_status(e, caller))?;
        Ok(IstioCertificateResponse { cert_chain })
    }
}

fn sign_status(e: SignError, caller: &Caller) -> Status {
    match e {
        SignError::IdentityMismatch {
            requested,
            caller: id,
        } => Status::permission_denied(format!(
            "CSR asks for {requested} but the {} is for {id}",
            caller.credential.noun()
        )),
        SignError::Csr(c) if c.asks_for_extra_identity() => {
            Status::permission_denied(c.to_string())
        }
        SignError::Csr(_) | SignError::LifetimeTooLong { .. } | SignError::BadLifetime(_) => {
            Status::invalid_argument(e.to_string())
        }
        SignError::Internal(_) => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        let cluster = request
            .metadata()
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .map(|c| isthmus_model::text::clip(c, 64).into_owned());
        let peer_certs = request.peer_certs();
        let result = match self
            .auth
            .authenticate(request.metadata(), peer_certs.as_deref().map(Vec::as_slice))
        {
            Ok(caller) => self.handle(&caller, request.get_ref()).await.inspect(|_| {
                tracing::info!(?peer, ?cluster, identity = %caller.identity, credential = caller.credential.noun(), "issued workload certificate");
            }),
            Err(e) => Err(Status::from(e)),
        };
        match &result {
            Ok(_) => self.metrics.record("issued"),
            Err(status) => {
                tracing::warn!(?peer, ?cluster, code = ?status.code(), message = %isthmus_model::text::clip(status.message(), 1024), "certificate request refused");
                self.metrics.record(&format!("{:?}", status.code()));
            }
        }
        result.map(Response::new)
    }
}
