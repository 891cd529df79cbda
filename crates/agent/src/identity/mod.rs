//! The host agent's identity manager (Istio's node agent): gets a certificate for the
//! host's workload identity, keeps it on disk and in a watch channel, and renews it at
//! half its lifetime, first with a join token and then with the certificate itself.

mod client;
pub mod config;
mod store;
pub mod wtoken;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_ca::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

pub use client::ClientError;
pub use config::{
    ConfigError, IdentityConfig, TokenSource, DEFAULT_CA_SERVER_NAME, DEFAULT_CERT_DIR,
};
pub use store::{CertFiles, StoreError, WorkloadCertificate};
pub use wtoken::WorkloadTokenKeeper;

use client::{request_certificate, Credential};

/// Why the identity manager stopped.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no identity to ask for: set the namespace and service account, or give a join token (it names the identity)")]
    NoIdentity,
    #[error("no valid certificate in {dir} and no join token to get one: pass a token (`isthmus join URL --token T`)")]
    NoCredential { dir: String },
    #[error("cannot get a certificate for {identity}: {source}")]
    Refused {
        identity: Box<SpiffeId>,
        #[source]
        source: ClientError,
    },
}

/// The current certificate, as published to the rest of the agent.
pub type CurrentCert = Option<Arc<WorkloadCertificate>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    expiry: Gauge,
    requests: Family<OutcomeLabels, Counter>,
}

/// Keeps the host's workload certificate valid. Create it, [`subscribe`](Self::subscribe)
/// where the certificate is needed, then drive [`run`](Self::run) until shutdown.
#[derive(Debug)]
pub struct IdentityManager {
    config: IdentityConfig,
    files: CertFiles,
    tx: watch::Sender<CurrentCert>,
    metrics: Metrics,
}

impl IdentityManager {
    pub fn new(config: IdentityConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            files: CertFiles::new(config.cert_dir.clone()),
            config,
            tx: watch::Sender::new(None),
            metrics: Metrics::default(),
        })
    }

    /// The current certificate: `None` until the first one is loaded or issued, then
    /// always a valid one (it is replaced, never cleared).
    pub fn subscribe(&self) -> watch::Receiver<CurrentCert> {
        self.tx.subscribe()
    }

    /// Registers `isthmus_agent_certificate_expiry_seconds` (Unix time the current
    /// certificate expires) and `isthmus_agent_certificate_requests_total{outcome}`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "isthmus_agent_certificate_expiry_seconds",
            "Unix time at which the current workload certificate expires",
            self.metrics.expiry.clone(),
        );
        registry.register(
            "isthmus_agent_certificate_requests",
            "Certificate requests to the control plane by outcome",
            self.metrics.requests.clone(),
        );
    }

    /// Gets a certificate and keeps renewing it. Returns only on an error that retrying
    /// cannot fix while no valid certificate is held; cancel it by dropping the future
    /// (files are only ever replaced whole, so that is safe at any point).
    pub async fn run(&self) -> Result<Infallible, IdentityError> {
        let mut current = self.load_from_disk();
        let identity = self.resolve_identity(current.as_deref())?;
        if let Some(c) = current.take_if(|c| c.identity != identity) {
            tracing::info!(found = %c.identity, wanted = %identity, "not reusing the certificate on disk: it is for another identity");
        }
        if let Some(c) = &current {
            tracing::info!(identity = %c.identity, "reusing the valid certificate found on disk");
            self.publish(c.clone());
        }
        let mut backoff = self.config.initial_backoff;
        let mut unsaved = false;
        loop {
            let renew_in = current.as_ref().map_or(Duration::ZERO, |c| {
                c.renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            });
            if unsaved {
                if let Some(c) = &current {
                    match self.files.save(c) {
                        Ok(()) => unsaved = false,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot write the certificate files; retrying in {}", human(backoff.min(renew_in)))
                        }
                    }
                }
                // Keep retrying the write, but never past the renewal time.
                if unsaved && !renew_in.is_zero() {
                    backoff = self.sleep_backoff(backoff.min(renew_in)).await;
                    continue;
                }
            }
            if let Some(c) = current.as_ref().filter(|_| !renew_in.is_zero()) {
                tracing::info!(identity = %c.identity, expires = %humantime::format_rfc3339_seconds(c.not_after), "certificate valid; will renew in {}", human(renew_in));
                tokio::time::sleep(renew_in).await;
            }

            match self.obtain(&identity, current.as_deref()).await {
                Ok(fresh) => {
                    self.record("issued");
                    tracing::info!(%identity, expires = %humantime::format_rfc3339_seconds(fresh.not_after), "got a new certificate");
                    // Files first, so that whoever sees the new certificate published
                    // can also find it on disk; a write failure is retried at the top of
                    // the loop without asking the CA again (a one-use token would not
                    // allow it).
                    if let Err(e) = self.files.save(&fresh) {
                        tracing::error!(error = %e, "cannot write the certificate files");
                        unsaved = true;
                    }
                    let fresh = Arc::new(fresh);
                    self.publish(fresh.clone());
                    current = Some(fresh);
                    backoff = self.config.initial_backoff;
                }
                Err(e) => {
                    self.record("failed");
                    let now = SystemTime::now();
                    let valid = current.as_ref().filter(|c| c.is_valid_at(now));
                    let permanent = match &e {
                        IdentityError::Refused { source, .. } => source.is_permanent(),
                        _ => true,
                    };
                    match valid {
                        None if permanent => return Err(e),
                        None => {
                            tracing::warn!(error = %e, "no valid certificate yet; retrying in {}", human(backoff))
                        }
                        Some(c) => {
                            tracing::warn!(error = %e, "renewal failed; keeping the current certificate (expires {}), retrying in {}", humantime::format_rfc3339_seconds(c.not_after), human(backoff))
                        }
                    }
                    backoff = self.sleep_backoff(backoff).await;
                }
            }
        }
    }

    /// Sleeps `backoff`, returns the next one (doubled, capped).
    async fn sleep_backoff(&self, backoff: Duration) -> Duration {
        tokio::time::sleep(backoff).await;
        (backoff * 2).clamp(self.config.initial_backoff, self.config.max_backoff)
    }

    /// Renews with the current certificate while it is valid; falls back to the join
    /// token when there is none or the CA no longer accepts it.
    async fn obtain(
        &self,
        identity: &SpiffeId,
        current: Option<&WorkloadCertificate>,
    ) -> Result<WorkloadCertificate, IdentityError> {
        let refused = |source| IdentityError::Refused {
            identity: Box::new(identity.clone()),
            source,
        };
        let valid = current.filter(|c| c.is_valid_at(SystemTime::now()));
        if let Some(cert) = valid {
            match request_certificate(&self.config, identity, Credential::Certificate(cert)).await {
                Ok(fresh) => return Ok(fresh),
                Err(e) if e.is_unauthenticated() && self.config.token.is_some() => {
                    tracing::warn!(error = %e, "the CA did not accept the current certificate; trying the join token");
                }
                Err(e) => return Err(refused(e)),
            }
        }
        let token = match &self.config.token {
            Some(source) => source.read()?,
            None => {
                return Err(IdentityError::NoCredential {
                    dir: self.files.dir().display().to_string(),
                })
            }
        };
        request_certificate(&self.config, identity, Credential::Token(token))
            .await
            .map_err(refused)
    }

    fn load_from_disk(&self) -> CurrentCert {
        match self.files.load(SystemTime::now()) {
            Ok(Some(cert)) => Some(Arc::new(cert)),
            Ok(None) => None,
            Err(e) => {
                tracing::info!(error = %e, dir = %self.files.dir().display(), "not reusing the certificate on disk");
                None
            }
        }
    }

    fn resolve_identity(
        &self,
        on_disk: Option<&WorkloadCertificate>,
    ) -> Result<SpiffeId, IdentityError> {
        if let Some(id) = &self.config.identity {
            return Ok(id.clone());
        }
        if let Some(source) = &self.config.token {
            match source
                .read()
                .map(|t| isthmus_ca::token_identity_unverified(&t))
            {
                Ok(Ok(id)) => return Ok(id),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the identity from the join token")
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the join token"),
            }
        }
        on_disk
            .map(|c| c.identity.clone())
            .ok_or(IdentityError::NoIdentity)
    }

    fn publish(&self, cert: Arc<WorkloadCertificate>) {
        let expiry = cert
            .not_after
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.metrics
            .expiry
            .set(i64::try_from(expiry).unwrap_or(i64::MAX));
        self.tx.send_replace(Some(cert));
    }

    fn record(&self, outcome: &'static str) {
        self.metrics
            .requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

pub(crate) fn human(d: Duration) -> String {
    isthmus_ca::format_duration(d)
}
