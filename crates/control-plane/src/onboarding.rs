//! The onboarding API on the gRPC port (`isthmus.onboarding.v1.Onboarding`): the trust bundle
//! for anyone (hosts pin a root by hash before they trust it), and a host's bundle for the
//! bearer of a join token, the files `isthmus vm config` writes, without spending a token use.

use std::net::SocketAddr;
use std::sync::Arc;

use isthmus_ca::{Authenticator, Ca, TokenClaims};
use isthmus_model::{Kind, Resource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry as MetricsRegistry;
use tonic::{Request, Response, Status};

use crate::api::MeshInfo;
use crate::hostfiles::{self, HostConfig};
use crate::registry::{Registry, RegistryError};

/// Generated from `proto/isthmus/onboarding/v1/onboarding.proto` (in `isthmus-ca`, which the
/// agent shares).
pub use isthmus_ca::onboarding_pb as pb;

use pb::onboarding_server::{Onboarding, OnboardingServer};
use pb::{
    GetBundleRequest, GetBundleResponse, GetTrustBundleRequest, GetTrustBundleResponse,
    GetWorkloadTokenRequest, GetWorkloadTokenResponse,
};

/// Lifetime of a workload token when the request names none.
pub const DEFAULT_WORKLOAD_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Requests are empty; anything bigger than this is not one of ours.
const MAX_REQUEST_BYTES: usize = 4 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    outcome: String,
}

/// Counters of the onboarding API.
#[derive(Debug, Clone, Default)]
pub struct OnboardingMetrics {
    requests: Family<CallLabels, Counter>,
}

impl OnboardingMetrics {
    /// Registers `requests_total{method,outcome}`; the control plane passes its sub-registry
    /// with the prefix `isthmus_onboarding`.
    pub fn register(&self, registry: &mut MetricsRegistry) {
        registry.register(
            "requests",
            "Onboarding API calls by method and outcome (served, or the gRPC code of the refusal)",
            self.requests.clone(),
        );
    }

    fn record<T>(&self, method: &'static str, result: &Result<T, Status>) {
        let outcome = match result {
            Ok(_) => "served".to_string(),
            Err(status) => format!("{:?}", status.code()),
        };
        self.requests
            .get_or_create(&CallLabels { method, outcome })
            .inc();
    }
}

/// The service. Serve it with [`OnboardingService::into_server`] on the TLS listener.
#[derive(Clone)]
pub struct OnboardingService {
    auth: Authenticator,
    ca: Arc<Ca>,
    registry: Registry,
    mesh: MeshInfo,
    metrics: OnboardingMetrics,
}

impl std::fmt::Debug for OnboardingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnboardingService").finish_non_exhaustive()
    }
}

impl OnboardingService {
    pub fn new(
        auth: Authenticator,
        ca: Arc<Ca>,
        registry: Registry,
        mesh: MeshInfo,
        metrics: OnboardingMetrics,
    ) -> Self {
        Self {
            auth,
            ca,
            registry,
            mesh,
            metrics,
        }
    }

    pub fn into_server(self) -> OnboardingServer<Self> {
        OnboardingServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The bundle for a checked token; `reached_at` is the address the host connected to, used
    /// for CA_ADDR when the server advertises none.
    pub async fn bundle(
        &self,
        claims: &TokenClaims,
        token: &str,
        reached_at: Option<SocketAddr>,
    ) -> Result<Vec<hostfiles::BundleFile>, Status> {
        let mut inbound_ports = String::new();
        if let Some(group) = &claims.group {
            let template = match self
                .registry
                .get(Kind::WorkloadGroup, &claims.ns, group)
                .await
            {
                Ok(Resource::WorkloadGroup(g)) => g.spec.template,
                Ok(_) | Err(RegistryError::NotFound(_)) => {
                    return Err(Status::failed_precondition(format!(
                        "WorkloadGroup {}/{group}, which the join token names, does not exist (any more): re-create it, or make a new token",
                        claims.ns
                    )))
                }
                Err(e) => return Err(Status::unavailable(format!("cannot read the registry: {e}"))),
            };
            let defaults = hostfiles::group_defaults(&template);
            if let Some(sa) = defaults.service_account.filter(|sa| *sa != claims.sa) {
                return Err(Status::failed_precondition(format!(
                    "WorkloadGroup {}/{group}'s template service account is now {sa:?}, but the join token is for {:?}: make a new token",
                    claims.ns, claims.sa
                )));
            }
            inbound_ports = defaults.inbound_ports;
        }
        let control_plane = hostfiles::advertised_control_plane(&self.mesh)
            .or(reached_at.filter(|a| !a.ip().is_unspecified()))
            .ok_or_else(|| {
                Status::failed_precondition(
                    "the control plane does not know the address hosts reach it at: run it with --advertise-ip",
                )
            })?;
        let (dns, _) = hostfiles::host_dns(&self.mesh, control_plane);
        let cfg = HostConfig {
            mesh: self.mesh.clone(),
            namespace: claims.ns.clone(),
            service_account: claims.sa.clone(),
            group: claims.group.clone(),
            control_plane,
            dns,
            inbound_ports,
            ip: None,
        };
        Ok(cfg.files(&self.ca.trust_bundle_pem(), token, None))
    }
}

#[tonic::async_trait]
impl Onboarding for OnboardingService {
    async fn get_trust_bundle(
        &self,
        _request: Request<GetTrustBundleRequest>,
    ) -> Result<Response<GetTrustBundleResponse>, Status> {
        self.metrics.record("GetTrustBundle", &Ok::<(), Status>(()));
        Ok(Response::new(GetTrustBundleResponse {
            roots_pem: self.ca.trust_bundle_pem(),
        }))
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<GetBundleResponse>, Status> {
        let result = self.get_bundle_checked(request).await;
        self.metrics.record("GetBundle", &result);
        result
    }

    async fn get_workload_token(
        &self,
        request: Request<GetWorkloadTokenRequest>,
    ) -> Result<Response<GetWorkloadTokenResponse>, Status> {
        let result = self.get_workload_token_checked(request).await;
        self.metrics.record("GetWorkloadToken", &result);
        result
    }
}

impl OnboardingService {
    async fn get_workload_token_checked(
        &self,
        request: Request<GetWorkloadTokenRequest>,
    ) -> Result<Response<GetWorkloadTokenResponse>, Status> {
        let peer = request.remote_addr();
        let peer_certs = request.peer_certs();
        let refused = |e: isthmus_ca::AuthError| {
            tracing::warn!(?peer, error = %e, "workload token refused");
            Status::from(e)
        };
        let caller = self
            .auth
            .authenticate(request.metadata(), peer_certs.as_deref().map(Vec::as_slice))
            .map_err(refused)?;
        let req = request.get_ref();
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_WORKLOAD_TOKEN_TTL,
            s => std::time::Duration::from_secs(u64::from(s)),
        };
        let (token, claims) = self
            .auth
            .issue_workload_token(&caller, req.enrolment.trim(), ttl)
            .await
            .map_err(refused)?;
        tracing::info!(?peer, identity = %caller.identity, enrolment = ?claims.enr, credential = ?caller.credential, expires_at = claims.exp, "issued a workload token");
        Ok(Response::new(GetWorkloadTokenResponse {
            token,
            expires_at: claims.exp,
            identity: caller.identity.to_string(),
        }))
    }

    async fn get_bundle_checked(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<GetBundleResponse>, Status> {
        let peer = request.remote_addr();
        let checked = self.auth.check_token(request.metadata()).await;
        let (claims, identity) = match checked {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(?peer, error = %isthmus_model::text::clip(&e.to_string(), 1024), "host bundle refused");
                return Err(Status::from(e));
            }
        };
        // check_token found it, so the header is there and well-formed.
        let token = isthmus_ca::bearer_token(request.metadata())
            .ok()
            .flatten()
            .unwrap_or_default();
        let files = self.bundle(&claims, token, request.local_addr()).await?;
        tracing::info!(?peer, %identity, token = %claims.jti, group = ?claims.group, "served a host's bundle");
        Ok(Response::new(GetBundleResponse {
            files: files
                .into_iter()
                .map(|f| pb::BundleFile {
                    name: f.name.to_string(),
                    contents: f.contents,
                    mode: f.mode,
                })
                .collect(),
            identity: identity.to_string(),
            token_id: claims.jti,
        }))
    }
}
