//! The control plane's side of mesh identity: the CA's setup from the server's flags, the join
//! token ledger in the registry store (ids and metadata only, never the token), and the token
//! operations behind the admin API.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use isthmus_ca::{Ca, CaConfig, LedgerError, TokenIssuer, TokenLedger, TokenRecord};
use isthmus_store::{Compare, Op, Store, Txn, TxnOutcome};
use serde::{Deserialize, Serialize};

use crate::config::ServerArgs;

const TOKEN_PREFIX: &str = "/tokens/";

/// What the store keeps of a join token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenEntry {
    #[serde(flatten)]
    pub record: TokenRecord,
    pub uses: u32,
    pub revoked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot set up the CA: {0}")]
    Ca(#[from] isthmus_ca::CaError),
    #[error("cannot set up join tokens: {0}")]
    Token(#[from] isthmus_ca::TokenError),
    #[error("cannot plug in the CA file {path}: {cause}")]
    Plug { path: String, cause: String },
    #[error("token {0} not found")]
    UnknownToken(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] isthmus_store::StoreError),
}

/// Copies operator-supplied CA files (`--ca-cert`, `--ca-key`, `--ca-chain`, `--ca-root`) into
/// the CA directory under Istio's "cacerts" names, so the CA loads them like a plugged-in
/// intermediate. Files already identical are left alone.
pub fn plug_ca_files(args: &ServerArgs, ca_dir: &Path) -> Result<(), IdentityError> {
    let files = [
        (&args.ca_cert, "ca-cert.pem", 0o644),
        (&args.ca_key, "ca-key.pem", 0o600),
        (&args.ca_chain, "cert-chain.pem", 0o644),
        (&args.ca_root, "root-cert.pem", 0o644),
    ];
    if files.iter().all(|(src, _, _)| src.is_none()) {
        return Ok(());
    }
    if args.ca_cert.is_none() || args.ca_key.is_none() || args.ca_root.is_none() {
        return Err(IdentityError::Invalid(
            "--ca-cert, --ca-key and --ca-root go together (and --ca-chain for an intermediate)"
                .into(),
        ));
    }
    for (src, name, mode) in files {
        let Some(src) = src else { continue };
        let plug = |cause: String| IdentityError::Plug {
            path: src.display().to_string(),
            cause,
        };
        let bytes = std::fs::read(src).map_err(|e| plug(e.to_string()))?;
        let dest = ca_dir.join(name);
        if std::fs::read(&dest).ok().as_deref() == Some(&bytes[..]) {
            continue;
        }
        crate::server::write_atomic(&dest, &bytes, mode).map_err(|e| plug(e.to_string()))?;
    }
    Ok(())
}

pub fn load_ca(
    args: &ServerArgs,
    ca_dir: &Path,
) -> Result<(Arc<Ca>, Arc<TokenIssuer>), IdentityError> {
    // Owner-only: the CA's key lives here.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(ca_dir)
        .map_err(|e| IdentityError::Plug {
            path: ca_dir.display().to_string(),
            cause: e.to_string(),
        })?;
    plug_ca_files(args, ca_dir)?;
    let mut cfg = CaConfig::new(ca_dir);
    cfg.trust_domain.clone_from(&args.trust_domain);
    cfg.default_lifetime = args.cert_ttl.into();
    cfg.max_lifetime = args.max_cert_ttl.into();
    cfg.trust_bundle.clone_from(&args.trust_bundle);
    let ca = Arc::new(Ca::load_or_create(&cfg)?);
    let tokens = Arc::new(
        TokenIssuer::load_or_create(
            &ca_dir.join(isthmus_ca::token::TOKEN_KEY_FILE),
            ca.trust_domain(),
        )?
        .with_root_pins(ca.roots()),
    );
    Ok((ca, tokens))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Token ids, uses and revocations in the registry store; a use is a compare-and-swap, so two
/// hosts racing for the last use of a token can't both get it.
#[derive(Clone)]
pub struct StoreLedger {
    store: Arc<dyn Store>,
}

impl StoreLedger {
    pub fn new(store: Arc<dyn Store>) -> Self {
        StoreLedger { store }
    }

    /// The store the ledger keeps tokens in (the registry's), for checks that read the
    /// registry beside a token (the discovery server's address vouching).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn key(id: &str) -> String {
        format!("{TOKEN_PREFIX}{id}")
    }

    pub async fn insert(&self, record: TokenRecord) -> Result<(), IdentityError> {
        let entry = TokenEntry {
            record,
            uses: 0,
            revoked: false,
        };
        let key = Self::key(&entry.record.id);
        let txn = Txn {
            compares: vec![Compare::ModRevision {
                key: key.clone(),
                revision: 0,
            }],
            ops: vec![Op::Put {
                key,
                value: serde_json::to_vec(&entry).unwrap_or_default(),
            }],
            lease: None,
        };
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { .. } => Ok(()),
            TxnOutcome::Failed { .. } => Err(IdentityError::Invalid(format!(
                "token id {} exists already",
                entry.record.id
            ))),
        }
    }

    pub async fn list(&self) -> Result<Vec<TokenEntry>, IdentityError> {
        let (kvs, _) = self.store.range(TOKEN_PREFIX).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// Whether the token may still be used to connect (known and not revoked); unlike
    /// `consume`, it does not spend a use.
    pub async fn check(&self, id: &str) -> Result<TokenEntry, LedgerError> {
        let kv = self
            .store
            .get(&Self::key(id))
            .await
            .map_err(|e| LedgerError::Backend(e.to_string()))?
            .ok_or_else(|| LedgerError::Unknown { id: id.to_string() })?;
        let entry: TokenEntry =
            serde_json::from_slice(&kv.value).map_err(|e| LedgerError::Backend(e.to_string()))?;
        if entry.revoked {
            return Err(LedgerError::Revoked { id: id.to_string() });
        }
        Ok(entry)
    }

    /// Marks a token revoked; it keeps its record so `token list` shows what happened.
    pub async fn revoke(&self, id: &str) -> Result<TokenEntry, IdentityError> {
        self.update(id, |e| {
            e.revoked = true;
            Ok(())
        })
        .await
        .map_err(|e| match e {
            UpdateError::Missing => IdentityError::UnknownToken(id.to_string()),
            UpdateError::Store(s) => IdentityError::Store(s),
            UpdateError::Refused(l) => IdentityError::Invalid(l.to_string()),
        })
    }

    async fn update(
        &self,
        id: &str,
        f: impl Fn(&mut TokenEntry) -> Result<(), LedgerError>,
    ) -> Result<TokenEntry, UpdateError> {
        let key = Self::key(id);
        loop {
            let kv = self
                .store
                .get(&key)
                .await
                .map_err(UpdateError::Store)?
                .ok_or(UpdateError::Missing)?;
            let mut entry: TokenEntry =
                serde_json::from_slice(&kv.value).map_err(|_| UpdateError::Missing)?;
            f(&mut entry).map_err(UpdateError::Refused)?;
            let txn = Txn {
                compares: vec![Compare::ModRevision {
                    key: key.clone(),
                    revision: kv.mod_revision,
                }],
                ops: vec![Op::Put {
                    key: key.clone(),
                    value: serde_json::to_vec(&entry).unwrap_or_default(),
                }],
                lease: None,
            };
            if let TxnOutcome::Committed { .. } =
                self.store.txn(txn).await.map_err(UpdateError::Store)?
            {
                return Ok(entry);
            }
        }
    }
}

enum UpdateError {
    Missing,
    Refused(LedgerError),
    Store(isthmus_store::StoreError),
}

#[async_trait]
impl TokenLedger for StoreLedger {
    async fn consume(&self, id: &str) -> Result<(), LedgerError> {
        let result = self
            .update(id, |e| {
                usable(e)?;
                e.uses += 1;
                Ok(())
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(UpdateError::Missing) => Err(LedgerError::Unknown { id: id.to_string() }),
            Err(UpdateError::Refused(e)) => Err(e),
            Err(UpdateError::Store(e)) => Err(LedgerError::Backend(e.to_string())),
        }
    }

    async fn usable(&self, id: &str) -> Result<(), LedgerError> {
        let kv = self
            .store
            .get(&Self::key(id))
            .await
            .map_err(|e| LedgerError::Backend(e.to_string()))?
            .ok_or_else(|| LedgerError::Unknown { id: id.to_string() })?;
        let entry: TokenEntry =
            serde_json::from_slice(&kv.value).map_err(|e| LedgerError::Backend(e.to_string()))?;
        usable(&entry)
    }

    async fn enrolled(&self, id: &str) -> Result<TokenRecord, LedgerError> {
        Ok(self.check(id).await?.record)
    }
}

/// Whether one more use of the token is allowed.
fn usable(e: &TokenEntry) -> Result<(), LedgerError> {
    let id = &e.record.id;
    if e.revoked {
        return Err(LedgerError::Revoked { id: id.clone() });
    }
    if let Some(max_uses) = e.record.max_uses.filter(|max| e.uses >= *max) {
        return Err(LedgerError::Exhausted {
            id: id.clone(),
            max_uses,
        });
    }
    Ok(())
}

/// `POST /api/v1/tokens`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTokenRequest {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
    /// Lifetime like `1h`, `30m`, `7d` (default 1h).
    #[serde(default)]
    pub ttl: Option<String>,
    /// How many certificates the token may obtain (default: unlimited until it expires).
    #[serde(default)]
    pub uses: Option<u32>,
    /// The WorkloadGroup (in `namespace`) the host joins; the token records it, and the bundle
    /// `isthmus join --server` fetches with the token is made from its template.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTokenResponse {
    pub token: String,
    pub id: String,
    pub identity: String,
    pub expires_at: u64,
    pub max_uses: Option<u32>,
    /// Pins (`sha256:<hex>`) of the mesh roots the token carries, for `isthmus join --server`.
    pub root_hashes: Vec<String>,
}

/// The longest join token lifetime; a token is a bearer secret, so it should be short.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);

pub async fn create_token(
    tokens: &TokenIssuer,
    ledger: &StoreLedger,
    req: CreateTokenRequest,
) -> Result<CreateTokenResponse, IdentityError> {
    let ns = if req.namespace.is_empty() {
        isthmus_model::DEFAULT_NAMESPACE
    } else {
        &req.namespace
    };
    let sa = if req.service_account.is_empty() {
        isthmus_model::DEFAULT_SERVICE_ACCOUNT
    } else {
        &req.service_account
    };
    if let Some(p) = isthmus_model::validate::dns_label_problem(ns) {
        return Err(IdentityError::Invalid(format!("namespace {ns:?} {p}")));
    }
    if let Some(p) = isthmus_model::validate::dns_subdomain_problem(sa) {
        return Err(IdentityError::Invalid(format!(
            "service account {sa:?} {p}"
        )));
    }
    let ttl = match req.ttl.as_deref() {
        None | Some("") => Duration::from_secs(3600),
        Some(t) => humantime::parse_duration(t).map_err(|e| {
            IdentityError::Invalid(format!("ttl {t:?} is not a duration like 1h or 30m: {e}"))
        })?,
    };
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(IdentityError::Invalid(format!(
            "ttl {} is out of range: a join token lives between 1s and {}",
            humantime::format_duration(ttl),
            humantime::format_duration(MAX_TOKEN_TTL)
        )));
    }
    if req.uses == Some(0) {
        return Err(IdentityError::Invalid(
            "uses must be at least 1 (omit it for unlimited)".into(),
        ));
    }
    if let Some(p) = req
        .group
        .as_deref()
        .and_then(isthmus_model::validate::dns_subdomain_problem)
    {
        return Err(IdentityError::Invalid(format!(
            "group {:?} {p}",
            req.group.as_deref().unwrap_or_default()
        )));
    }
    let (token, record) = tokens.create_in_group(ns, sa, req.group.as_deref(), ttl, req.uses)?;
    let resp = CreateTokenResponse {
        token,
        id: record.id.clone(),
        identity: record.identity.to_string(),
        expires_at: record.expires_at,
        max_uses: record.max_uses,
        root_hashes: tokens.root_pins().to_vec(),
    };
    ledger.insert(record).await?;
    Ok(resp)
}

/// Whether a token entry is still usable now (for listings).
pub fn token_state(e: &TokenEntry) -> &'static str {
    if e.revoked {
        "revoked"
    } else if e.record.expires_at <= now_secs() {
        "expired"
    } else if e.record.max_uses.is_some_and(|m| e.uses >= m) {
        "used up"
    } else {
        "active"
    }
}
