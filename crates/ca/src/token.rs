//! Tokens: ES256 JWTs signed by the control plane.
//!
//! - A *join token* lets a new host get its first certificate. It carries the identity it may
//!   ask for. Whether it is still usable (revoked, uses left) is the control plane's business,
//!   kept in its store through [`TokenLedger`]; the store keeps a [`TokenRecord`], never the
//!   token itself.
//! - A *workload token* ([`WORKLOAD_KIND`]) is what a token-only client (Istio's ztunnel, which
//!   never presents its certificate to the control plane) sends on every certificate request
//!   and discovery connect, the way Kubernetes' rotating projected tokens are used. It is
//!   short-lived, multi-use, and names the join token the host enrolled with (`enr`): it is
//!   good while that enrolment is not revoked, spends no use, and the host's agent renews it
//!   over mTLS before it expires.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::KeyPair;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};
use crate::spiffe::{SpiffeError, SpiffeId};

/// Key that signs join tokens, kept beside the CA material.
pub const TOKEN_KEY_FILE: &str = "token-key.pem";
/// `iss` of every join token.
pub const TOKEN_ISSUER: &str = "isthmus";
/// `aud` of every join token: only the certificate API accepts them.
pub const TOKEN_AUDIENCE: &str = "isthmus-ca";

/// `kind` of a workload token (join tokens have none).
pub const WORKLOAD_KIND: &str = "workload";
/// The shortest and longest lifetime of a workload token.
pub const WORKLOAD_TTL_RANGE: (Duration, Duration) =
    (Duration::from_secs(60), Duration::from_secs(24 * 3600));

/// Why a token was not created or not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("token signing key {path} is unusable: {detail}; remove it to generate a new one (outstanding tokens stop working)")]
    Key { path: String, detail: String },
    #[error("join token is malformed: {0}")]
    Malformed(String),
    #[error("join token signature does not verify: it was not issued by this control plane (or the token key changed since)")]
    BadSignature,
    #[error("join token {id} expired at {at}; create a new one with `isthmus token create`")]
    Expired { id: String, at: String },
    #[error("join token is for audience {found:?}, not {TOKEN_AUDIENCE:?}")]
    WrongAudience { found: String },
    #[error("join token was issued by {found:?}, not {TOKEN_ISSUER:?}")]
    WrongIssuer { found: String },
    #[error("join token is for {found} but this CA serves trust domain {expected:?}")]
    WrongTrustDomain { found: SpiffeId, expected: String },
    #[error("join token names an invalid identity: {0}")]
    Identity(#[from] SpiffeError),
    #[error("join token subject {sub:?} does not match its ns/sa claims")]
    InconsistentSubject { sub: String },
    #[error("token lifetime must be between 1 second and 10 years, got {0:?}")]
    BadTtl(Duration),
    #[error("workload token lifetime must be between 1 minute and 24 hours, got {0:?}")]
    BadWorkloadTtl(Duration),
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

/// Claims of a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub iss: String,
    pub aud: String,
    /// The SPIFFE ID the bearer may get a certificate for.
    pub sub: String,
    pub ns: String,
    pub sa: String,
    pub iat: u64,
    pub exp: u64,
    /// Random id: the key of the token's [`TokenRecord`].
    pub jti: String,
    /// Pins of the mesh roots when the token was made ([`crate::pin`]): a host that joins with
    /// only this token and an address trusts the control plane that serves one of them. Older
    /// tokens have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root: Vec<String>,
    /// The WorkloadGroup (in `ns`) the host joins, when the token was made for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// [`WORKLOAD_KIND`] for a workload token; absent for a join token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A workload token's enrolment: the id of the join token its host enrolled with. The
    /// workload token is refused once that join token is revoked (or its record deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enr: Option<String>,
}

impl TokenClaims {
    /// The enrolment of a workload token; `None` for a join token.
    pub fn workload_enrolment(&self) -> Option<&str> {
        match (self.kind.as_deref(), self.enr.as_deref()) {
            (Some(WORKLOAD_KIND), Some(enr)) => Some(enr),
            _ => None,
        }
    }
}

/// What the control plane stores about a token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: SpiffeId,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// How many certificates the token may obtain; `None` = until it expires.
    pub max_uses: Option<u32>,
}

/// Why the ledger refused a token use.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("join token {id} is unknown to this control plane (was its record deleted?)")]
    Unknown { id: String },
    #[error("join token {id} was revoked")]
    Revoked { id: String },
    #[error("join token {id} is used up: it allowed {max_uses} use(s)")]
    Exhausted { id: String, max_uses: u32 },
    #[error("token ledger unavailable: {0}")]
    Backend(String),
}

/// Revocation and use counts of join tokens, kept by the control plane's store.
#[async_trait::async_trait]
pub trait TokenLedger: Send + Sync {
    /// Records one use of token `id`; fails when it is unknown, revoked or used up. Must be
    /// atomic: two concurrent calls on a one-use token let exactly one through.
    async fn consume(&self, id: &str) -> Result<(), LedgerError>;

    /// Fails as [`TokenLedger::consume`] would, but spends nothing: for requests that a token
    /// authorizes without being a certificate (the host's bundle).
    async fn usable(&self, id: &str) -> Result<(), LedgerError>;

    /// Whether an enrolment is still in force: the join token is known and not revoked,
    /// whatever its expiry and uses (workload tokens derived from it outlive both). Returns
    /// its record.
    async fn enrolled(&self, id: &str) -> Result<TokenRecord, LedgerError>;
}

/// In-memory [`TokenLedger`] for tests and `--dev`.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    entries: Mutex<HashMap<String, LedgerEntry>>,
}

#[derive(Debug)]
struct LedgerEntry {
    record: TokenRecord,
    uses: u32,
    revoked: bool,
}

impl MemoryLedger {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&self, record: TokenRecord) {
        self.lock().insert(
            record.id.clone(),
            LedgerEntry {
                record,
                uses: 0,
                revoked: false,
            },
        );
    }

    /// Returns false when the token is unknown.
    pub fn revoke(&self, id: &str) -> bool {
        self.lock().get_mut(id).map(|e| e.revoked = true).is_some()
    }

    pub fn uses(&self, id: &str) -> Option<u32> {
        self.lock().get(id).map(|e| e.uses)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LedgerEntry>> {
        // A panic while holding this lock cannot leave an entry half-updated (each update
        // is one field store), so the poisoned map is still consistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LedgerEntry {
    fn check(&self) -> Result<(), LedgerError> {
        let id = &self.record.id;
        if self.revoked {
            return Err(LedgerError::Revoked { id: id.clone() });
        }
        if let Some(max) = self.record.max_uses {
            if self.uses >= max {
                return Err(LedgerError::Exhausted {
                    id: id.clone(),
                    max_uses: max,
                });
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl TokenLedger for MemoryLedger {
    async fn consume(&self, id: &str) -> Result<(), LedgerError> {
        let mut entries = self.lock();
        let entry = entries
            .get_mut(id)
            .ok_or_else(|| LedgerError::Unknown { id: id.into() })?;
        entry.check()?;
        entry.uses += 1;
        Ok(())
    }

    async fn usable(&self, id: &str) -> Result<(), LedgerError> {
        self.lock()
            .get(id)
            .ok_or_else(|| LedgerError::Unknown { id: id.into() })?
            .check()
    }

    async fn enrolled(&self, id: &str) -> Result<TokenRecord, LedgerError> {
        let entries = self.lock();
        let entry = entries
            .get(id)
            .ok_or_else(|| LedgerError::Unknown { id: id.into() })?;
        if entry.revoked {
            return Err(LedgerError::Revoked { id: id.into() });
        }
        Ok(entry.record.clone())
    }
}

/// Creates and verifies join tokens with the control plane's ES256 key.
pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    trust_domain: String,
    root_pins: Vec<String>,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("trust_domain", &self.trust_domain)
            .field("root_pins", &self.root_pins)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// Loads the signing key at `path`, generating it (owner-only) when missing.
    pub fn load_or_create(path: &Path, trust_domain: &str) -> Result<Self, TokenError> {
        if !path.exists() {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| key_err(path, e))?;
            files::write_atomic(
                path,
                key.serialize_pem().as_bytes(),
                files::PRIVATE_FILE_MODE,
            )?;
            tracing::info!(path = %path.display(), "generated the join-token signing key");
        } else if files::mode_of(path).is_some_and(|m| m & 0o077 != 0) {
            tracing::warn!(path = %path.display(), "token key is readable by group or others; chmod 600 it");
        }
        let pem = files::read_text(path)?;
        Self::from_pem(&pem, trust_domain).map_err(|e| match e {
            TokenError::Key { detail, .. } => TokenError::Key {
                path: path.display().to_string(),
                detail,
            },
            other => other,
        })
    }

    /// Builds an issuer from a PKCS#8 P-256 private key.
    pub fn from_pem(key_pem: &str, trust_domain: &str) -> Result<Self, TokenError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| key_err(Path::new("<pem>"), e))?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(key_err(Path::new("<pem>"), "not an ECDSA P-256 key"));
        }
        let encoding = EncodingKey::from_ec_pem(key_pem.as_bytes())
            .map_err(|e| key_err(Path::new("<pem>"), e))?;
        let decoding = DecodingKey::from_ec_pem(key.public_key_pem().as_bytes())
            .map_err(|e| key_err(Path::new("<pem>"), e))?;
        Ok(Self {
            encoding,
            decoding,
            trust_domain: trust_domain.to_owned(),
            root_pins: Vec::new(),
        })
    }

    /// Tokens made from now on carry the pins of `roots` (the CA's trust bundle).
    pub fn with_root_pins(mut self, roots: &[CertificateDer<'_>]) -> Self {
        self.root_pins = crate::pin::root_hashes(roots);
        self
    }

    /// The pins new tokens carry.
    pub fn root_pins(&self) -> &[String] {
        &self.root_pins
    }

    /// Creates a token for `namespace`/`service_account`, valid for `ttl` from now.
    pub fn create(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
        max_uses: Option<u32>,
    ) -> Result<(String, TokenRecord), TokenError> {
        self.create_at(namespace, service_account, ttl, max_uses, SystemTime::now())
    }

    /// [`TokenIssuer::create`] for a host that joins WorkloadGroup `group` (the token records it;
    /// the host's bundle is made from the group's template).
    pub fn create_in_group(
        &self,
        namespace: &str,
        service_account: &str,
        group: Option<&str>,
        ttl: Duration,
        max_uses: Option<u32>,
    ) -> Result<(String, TokenRecord), TokenError> {
        self.create_full(
            namespace,
            service_account,
            group,
            ttl,
            max_uses,
            SystemTime::now(),
        )
    }

    /// [`TokenIssuer::create`] with an explicit issue time (tests, replays of a clock).
    pub fn create_at(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
        max_uses: Option<u32>,
        issued_at: SystemTime,
    ) -> Result<(String, TokenRecord), TokenError> {
        self.create_full(namespace, service_account, None, ttl, max_uses, issued_at)
    }

    fn create_full(
        &self,
        namespace: &str,
        service_account: &str,
        group: Option<&str>,
        ttl: Duration,
        max_uses: Option<u32>,
        issued_at: SystemTime,
    ) -> Result<(String, TokenRecord), TokenError> {
        if ttl.as_secs() == 0 || ttl > Duration::from_secs(10 * 365 * 24 * 3600) {
            return Err(TokenError::BadTtl(ttl));
        }
        let identity = SpiffeId::new(&self.trust_domain, namespace, service_account)?;
        let iat = unix(issued_at);
        let claims = TokenClaims {
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_AUDIENCE.into(),
            sub: identity.to_string(),
            ns: namespace.into(),
            sa: service_account.into(),
            iat,
            exp: iat + ttl.as_secs(),
            jti: hex::encode(rand::random::<[u8; 16]>()),
            root: self.root_pins.clone(),
            group: group.map(str::to_owned),
            kind: None,
            enr: None,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.encoding)
            .map_err(|e| TokenError::Sign(e.to_string()))?;
        let record = TokenRecord {
            id: claims.jti,
            namespace: claims.ns,
            service_account: claims.sa,
            identity,
            issued_at: claims.iat,
            expires_at: claims.exp,
            max_uses,
        };
        Ok((token, record))
    }

    /// Creates a workload token for `identity`, enrolled by join token `enrolment`, valid for
    /// `ttl` (within [`WORKLOAD_TTL_RANGE`]) from now. Nothing is stored: it is checked
    /// against its enrolment's record on every use.
    pub fn create_workload(
        &self,
        identity: &SpiffeId,
        enrolment: &str,
        ttl: Duration,
    ) -> Result<(String, TokenClaims), TokenError> {
        let (min, max) = WORKLOAD_TTL_RANGE;
        if ttl < min || ttl > max {
            return Err(TokenError::BadWorkloadTtl(ttl));
        }
        if identity.trust_domain() != self.trust_domain {
            return Err(TokenError::WrongTrustDomain {
                found: identity.clone(),
                expected: self.trust_domain.clone(),
            });
        }
        let iat = unix(SystemTime::now());
        let claims = TokenClaims {
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_AUDIENCE.into(),
            sub: identity.to_string(),
            ns: identity.namespace().into(),
            sa: identity.service_account().into(),
            iat,
            exp: iat + ttl.as_secs(),
            jti: hex::encode(rand::random::<[u8; 16]>()),
            root: self.root_pins.clone(),
            group: None,
            kind: Some(WORKLOAD_KIND.into()),
            enr: Some(enrolment.into()),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.encoding)
            .map_err(|e| TokenError::Sign(e.to_string()))?;
        Ok((token, claims))
    }

    /// Verifies signature, issuer, audience, expiry and identity of `token`.
    pub fn verify(&self, token: &str) -> Result<(TokenClaims, SpiffeId), TokenError> {
        self.verify_at(token, SystemTime::now())
    }

    pub fn verify_at(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(TokenClaims, SpiffeId), TokenError> {
        // jsonwebtoken checks only the signature and algorithm here; the claims are
        // checked below so that each failure gets its own message.
        let mut validation = Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<TokenClaims>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed(e.to_string()),
            })?
            .claims;
        if claims.iss != TOKEN_ISSUER {
            return Err(TokenError::WrongIssuer { found: claims.iss });
        }
        if claims.aud != TOKEN_AUDIENCE {
            return Err(TokenError::WrongAudience { found: claims.aud });
        }
        if claims.exp <= unix(now) {
            return Err(TokenError::Expired {
                id: claims.jti,
                at: humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(claims.exp))
                    .to_string(),
            });
        }
        match (claims.kind.as_deref(), claims.enr.as_deref()) {
            (None, _) | (Some(WORKLOAD_KIND), Some(_)) => {}
            (Some(WORKLOAD_KIND), None) => {
                return Err(TokenError::Malformed(
                    "workload token names no enrolment (`enr`)".into(),
                ))
            }
            (Some(other), _) => {
                return Err(TokenError::Malformed(format!(
                    "unknown token kind {:?}",
                    other.chars().take(32).collect::<String>()
                )))
            }
        }
        let identity: SpiffeId = claims.sub.parse()?;
        if identity.namespace() != claims.ns || identity.service_account() != claims.sa {
            return Err(TokenError::InconsistentSubject { sub: claims.sub });
        }
        if identity.trust_domain() != self.trust_domain {
            return Err(TokenError::WrongTrustDomain {
                found: identity,
                expected: self.trust_domain.clone(),
            });
        }
        Ok((claims, identity))
    }
}

/// Reads the identity a token is for without verifying it: lets a host agent know which
/// identity to ask for. The CA verifies the token when it is used.
pub fn token_identity_unverified(token: &str) -> Result<SpiffeId, TokenError> {
    Ok(claims_unverified(token)?.sub.parse()?)
}

/// Reads a token's claims without verifying them: a host has no key to check the signature
/// with; it learns from them what to ask for and which root to pin, and the control plane
/// verifies the token when it is used.
pub fn claims_unverified(token: &str) -> Result<TokenClaims, TokenError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| TokenError::Malformed("expected three dot-separated parts".into()))?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| TokenError::Malformed(format!("payload is not base64url: {e}")))?;
    serde_json::from_slice(&json).map_err(|e| TokenError::Malformed(e.to_string()))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn key_err(path: &Path, e: impl std::fmt::Display) -> TokenError {
    TokenError::Key {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> TokenIssuer {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        TokenIssuer::from_pem(&key.serialize_pem(), "cluster.local").unwrap()
    }

    #[test]
    fn round_trip_and_unverified_identity() {
        let iss = issuer();
        let (token, record) = iss
            .create("db", "mysql", Duration::from_secs(600), Some(1))
            .unwrap();
        let (claims, id) = iss.verify(&token).unwrap();
        assert_eq!(claims.jti, record.id);
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/db/sa/mysql");
        assert_eq!(token_identity_unverified(&token).unwrap(), id);
        assert_eq!(record.expires_at - record.issued_at, 600);
    }

    #[test]
    fn root_pins_and_group_round_trip() {
        let root = rcgen::CertificateParams::new(vec!["root".to_string()])
            .unwrap()
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap();
        let unpinned = issuer();
        // A token made before pins existed: no `root`, no `group` in its claims.
        let (plain, _) = unpinned
            .create("db", "mysql", Duration::from_secs(60), None)
            .unwrap();
        let iss = unpinned.with_root_pins(&[root.der().clone()]);
        let pin = crate::pin::root_hash(root.der());
        assert_eq!(iss.root_pins(), std::slice::from_ref(&pin));
        let (token, _) = iss
            .create_in_group("db", "mysql", Some("mysql"), Duration::from_secs(60), None)
            .unwrap();
        let (claims, _) = iss.verify(&token).unwrap();
        assert_eq!(claims.root, std::slice::from_ref(&pin));
        assert_eq!(claims.group.as_deref(), Some("mysql"));
        assert_eq!(claims_unverified(&token).unwrap(), claims);
        let json = serde_json::to_value(&claims).unwrap();
        assert_eq!(json["root"], serde_json::json!([pin]));
        assert_eq!(json["group"], "mysql");

        // The old token is still valid for the CA (and the agent), and pins nothing.
        let (old, _) = iss.verify(&plain).unwrap();
        assert!(old.root.is_empty() && old.group.is_none());
        let payload = serde_json::to_value(claims_unverified(&plain).unwrap()).unwrap();
        assert!(payload.get("root").is_none() && payload.get("group").is_none());
    }

    #[tokio::test]
    async fn usable_checks_without_spending() {
        let iss = issuer();
        let ledger = MemoryLedger::new();
        let (_, one) = iss
            .create("a", "b", Duration::from_secs(60), Some(1))
            .unwrap();
        ledger.register(one.clone());
        ledger.usable(&one.id).await.unwrap();
        ledger.usable(&one.id).await.unwrap();
        assert_eq!(ledger.uses(&one.id), Some(0));
        ledger.consume(&one.id).await.unwrap();
        assert!(matches!(
            ledger.usable(&one.id).await,
            Err(LedgerError::Exhausted { max_uses: 1, .. })
        ));
        assert!(matches!(
            ledger.usable("nope").await,
            Err(LedgerError::Unknown { .. })
        ));
    }

    #[test]
    fn each_failure_has_its_error() {
        let iss = issuer();
        let (token, _) = iss.create("a", "b", Duration::from_secs(60), None).unwrap();
        assert!(matches!(
            issuer().verify(&token),
            Err(TokenError::BadSignature)
        ));
        let later = SystemTime::now() + Duration::from_secs(120);
        assert!(matches!(
            iss.verify_at(&token, later),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            iss.verify("not.a.jwt"),
            Err(TokenError::Malformed(_))
        ));
        let mut claims = iss.verify(&token).unwrap().0;
        claims.aud = "someone-else".into();
        let forged =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &iss.encoding).unwrap();
        assert!(matches!(
            iss.verify(&forged),
            Err(TokenError::WrongAudience { .. })
        ));
    }

    #[tokio::test]
    async fn ledger_counts_and_revokes() {
        let iss = issuer();
        let ledger = MemoryLedger::new();
        let (_, one) = iss
            .create("a", "b", Duration::from_secs(60), Some(1))
            .unwrap();
        let (_, two) = iss.create("a", "b", Duration::from_secs(60), None).unwrap();
        ledger.register(one.clone());
        ledger.register(two.clone());
        ledger.consume(&one.id).await.unwrap();
        assert!(matches!(
            ledger.consume(&one.id).await,
            Err(LedgerError::Exhausted { max_uses: 1, .. })
        ));
        assert!(ledger.revoke(&two.id));
        assert!(matches!(
            ledger.consume(&two.id).await,
            Err(LedgerError::Revoked { .. })
        ));
        assert!(matches!(
            ledger.consume("nope").await,
            Err(LedgerError::Unknown { .. })
        ));
    }
}
