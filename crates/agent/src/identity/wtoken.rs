//! Keeps a workload token in a file for token-only clients on this host.
//!
//! Istio's ztunnel never presents its certificate to the control plane: it re-reads a token
//! file and sends it as `authorization: Bearer` on every certificate request and discovery
//! connect, as a pod sends its rotating projected service-account token. The agent plays the
//! kubelet's part: it asks the control plane (`GetWorkloadToken`, over mTLS with the host's
//! certificate) for a short-lived token under the host's enrolment and replaces the file at
//! half the token's life. The file is replaced whole (temporary file, fsync, rename), holds
//! the token without a trailing newline (ztunnel sends the file's bytes verbatim), and is
//! readable by its owner only.

use std::convert::Infallible;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_ca::onboarding_pb::onboarding_client::OnboardingClient;
use isthmus_ca::onboarding_pb::GetWorkloadTokenRequest;
use isthmus_ca::{claims_unverified, TokenClaims};
use tokio::sync::watch;

use super::client::{call_error, connect, ClientError};
use super::{human, CurrentCert, IdentityConfig, WorkloadCertificate};

/// Lifetime asked for: one hour, as Kubernetes' projected tokens.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Keeps the token file fresh; drive [`WorkloadTokenKeeper::run`] beside the identity manager.
#[derive(Debug)]
pub struct WorkloadTokenKeeper {
    config: IdentityConfig,
    path: PathBuf,
    ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
enum KeepError {
    #[error("no enrolment to ask under: the workload token names none and there is no join token ({0}); enrol the host with `isthmus join`, which writes the join token the agent reads")]
    NoEnrolment(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot write the workload token {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl WorkloadTokenKeeper {
    pub fn new(config: IdentityConfig, path: PathBuf) -> Self {
        Self {
            config,
            path,
            ttl: DEFAULT_TTL,
        }
    }

    /// The lifetime to ask for (tests use short ones).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Renews the token whenever it is past half its life (or missing, or for another
    /// identity), once a certificate is held; retries with backoff. Never returns.
    pub async fn run(self, mut certs: watch::Receiver<CurrentCert>) -> Infallible {
        let mut backoff = self.config.initial_backoff;
        loop {
            let cert = certs
                .wait_for(|c| c.is_some())
                .await
                .ok()
                .and_then(|c| c.clone());
            let Some(cert) = cert else {
                // The identity manager is gone: the agent is stopping.
                return std::future::pending().await;
            };
            let held = read_claims(&self.path).filter(|c| c.sub == cert.identity.to_string());
            if let Some(at) = held.as_ref().map(renew_at) {
                if let Ok(wait) = at.duration_since(SystemTime::now()) {
                    tracing::debug!(path = %self.path.display(), "workload token valid; will renew in {}", human(wait));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        // A new certificate may be for another identity: look again.
                        r = certs.changed() => if r.is_err() { std::future::pending::<()>().await },
                    }
                    continue;
                }
            }
            match self.renew(&cert, held.as_ref()).await {
                Ok(claims) => {
                    backoff = self.config.initial_backoff;
                    tracing::info!(path = %self.path.display(), identity = %cert.identity, expires = %humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(claims.exp)), "wrote a fresh workload token");
                }
                Err(e) => {
                    let permanent = matches!(&e, KeepError::Client(c) if c.is_permanent())
                        || matches!(e, KeepError::NoEnrolment(_));
                    if permanent {
                        tracing::error!(path = %self.path.display(), error = %e, "cannot renew the workload token; retrying in {}", human(backoff));
                    } else {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot renew the workload token; retrying in {}", human(backoff));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    /// The enrolment to ask under: the held token's, else the join token's id.
    fn enrolment(&self, held: Option<&TokenClaims>) -> Result<String, KeepError> {
        if let Some(enr) = held.and_then(TokenClaims::workload_enrolment) {
            return Ok(enr.to_owned());
        }
        let token = self
            .config
            .token
            .as_ref()
            .ok_or_else(|| KeepError::NoEnrolment("none configured".into()))?
            .read()
            .map_err(|e| KeepError::NoEnrolment(e.to_string()))?;
        let claims =
            claims_unverified(&token).map_err(|e| KeepError::NoEnrolment(e.to_string()))?;
        Ok(claims.jti)
    }

    async fn renew(
        &self,
        cert: &WorkloadCertificate,
        held: Option<&TokenClaims>,
    ) -> Result<TokenClaims, KeepError> {
        let enrolment = self.enrolment(held)?;
        let channel = connect(&self.config, Some(cert)).await?;
        let response = OnboardingClient::new(channel)
            .get_workload_token(GetWorkloadTokenRequest {
                enrolment,
                ttl_seconds: u32::try_from(self.ttl.as_secs()).unwrap_or(u32::MAX),
            })
            .await
            .map_err(|s| call_error(&self.config, s))?
            .into_inner();
        let claims = claims_unverified(&response.token)
            .map_err(|e| ClientError::BadResponse(format!("the workload token: {e}")))?;
        write_token(&self.path, &response.token).map_err(|source| KeepError::Write {
            path: self.path.display().to_string(),
            source,
        })?;
        Ok(claims)
    }
}

/// The claims of the token in `path`, if it holds a workload token.
fn read_claims(path: &Path) -> Option<TokenClaims> {
    let text = std::fs::read_to_string(path).ok()?;
    let claims = claims_unverified(text.trim()).ok()?;
    claims.workload_enrolment()?;
    Some(claims)
}

/// Half-way through the token's life.
fn renew_at(c: &TokenClaims) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(c.iat + c.exp.saturating_sub(c.iat) / 2)
}

/// Replaces `path` whole with `token` (no trailing newline), owner-only.
fn write_token(path: &Path, token: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    tmp.write_all(token.trim().as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_replaced_whole_without_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/istio-token");
        write_token(&path, "a.b.c\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a.b.c");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write_token(&path, "d.e.f").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"d.e.f");
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn renews_half_way() {
        let c = TokenClaims {
            iss: String::new(),
            aud: String::new(),
            sub: String::new(),
            ns: String::new(),
            sa: String::new(),
            iat: 1000,
            exp: 4600,
            jti: String::new(),
            root: vec![],
            group: None,
            kind: Some(isthmus_ca::WORKLOAD_KIND.into()),
            enr: Some("e".into()),
        };
        assert_eq!(renew_at(&c), UNIX_EPOCH + Duration::from_secs(2800));
    }
}
