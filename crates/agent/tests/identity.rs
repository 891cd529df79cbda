//! The identity manager against an in-process CA over real gRPC and TLS: first
//! certificate by join token, renewals by certificate, restarts, outages, refusals.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use isthmus_agent::identity::{
    CertFiles, IdentityConfig, IdentityManager, TokenSource, WorkloadCertificate,
};
use isthmus_ca::cert::{KEY_FILE, ROOT_CERT_FILE};
use isthmus_ca::files::mode_of;
use isthmus_ca::testing::TestCa;
use tokio::time::Instant;

const HOUR: Duration = Duration::from_secs(3600);
const POLL: Duration = Duration::from_millis(25);

fn config(ca: &TestCa, dir: &Path, token: &str, lifetime: Duration) -> Result<IdentityConfig> {
    // What `isthmus vm config` puts on a host: the mesh root.
    std::fs::write(dir.join(ROOT_CERT_FILE), ca.root_pem())?;
    let mut config = IdentityConfig::new(ca.url());
    config.cert_dir = dir.to_owned();
    config.token = Some(TokenSource::Inline(token.to_owned()));
    config.lifetime = Some(lifetime);
    config.initial_backoff = Duration::from_millis(100);
    config.max_backoff = Duration::from_millis(400);
    config.request_timeout = Duration::from_secs(5);
    Ok(config)
}

fn start(manager: &Arc<IdentityManager>) -> tokio::task::JoinHandle<()> {
    // Logs show up with the output of a failing test.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("isthmus=debug")
        .try_init();
    let m = manager.clone();
    tokio::spawn(async move {
        let Err(e) = m.run().await;
        panic!("identity manager stopped: {e}");
    })
}

/// Waits until the published certificate satisfies `pred`.
async fn wait_for(
    manager: &IdentityManager,
    within: Duration,
    pred: impl Fn(&WorkloadCertificate) -> bool,
) -> Result<Arc<WorkloadCertificate>> {
    let mut rx = manager.subscribe();
    let found = tokio::time::timeout(within, rx.wait_for(|c| c.as_deref().is_some_and(&pred)))
        .await
        .context("no matching certificate was published in time")??;
    found
        .clone()
        .context("unreachable: predicate saw a certificate")
}

/// A reader of the files that does what the store's docs ask: if key and chain do not
/// match (caught between two renames), read again.
fn check_disk(dir: &Path) -> Result<WorkloadCertificate> {
    let mut last = None;
    for _ in 0..50 {
        match CertFiles::new(dir).load(SystemTime::now()) {
            Ok(Some(cert)) => return Ok(cert),
            Ok(None) => bail!("no key or chain in {}", dir.display()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("no valid key+certificate pair on disk: {last:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_then_renewals_by_certificate_keep_a_valid_pair_on_disk() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    // One use only: every renewal after the first certificate must use the certificate.
    let (token, record) = ca
        .token("prod", "web", HOUR, Some(1))
        .map_err(anyhow::Error::msg)?;
    let manager = Arc::new(IdentityManager::new(config(
        &ca,
        dir.path(),
        &token,
        Duration::from_secs(6),
    )?)?);
    let mut rx = manager.subscribe();
    let task = start(&manager);

    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen: Vec<Arc<WorkloadCertificate>> = Vec::new();
    let mut checks = 0;
    while seen.len() < 3 {
        if Instant::now() > deadline {
            bail!("only {} certificate(s) after 40s", seen.len());
        }
        if let Some(cert) = rx.borrow_and_update().clone() {
            if !seen.contains(&cert) {
                assert_eq!(
                    cert.identity.to_string(),
                    "spiffe://cluster.local/ns/prod/sa/web"
                );
                seen.push(cert);
            }
        }
        if !seen.is_empty() {
            let on_disk = check_disk(dir.path())?;
            assert_eq!(on_disk.identity, seen[0].identity);
            checks += 1;
        }
        tokio::time::sleep(POLL).await;
    }
    task.abort();
    assert!(
        checks > 10,
        "the files were checked throughout ({checks} checks)"
    );
    assert_eq!(
        ca.ledger.uses(&record.id),
        Some(1),
        "renewals did not use the token"
    );
    assert_eq!(mode_of(&dir.path().join(KEY_FILE)), Some(0o600));
    for pair in seen.windows(2) {
        assert!(pair[1].not_after > pair[0].not_after);
        assert!(
            pair[1].key_pem != pair[0].key_pem,
            "a new key for every certificate"
        );
    }
    Ok(())
}

#[tokio::test]
async fn restart_reuses_the_valid_certificate_on_disk() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let (token, record) = ca
        .token("prod", "web", HOUR, Some(1))
        .map_err(anyhow::Error::msg)?;
    let cfg = config(&ca, dir.path(), &token, HOUR)?;

    let first = Arc::new(IdentityManager::new(cfg.clone())?);
    let task = start(&first);
    let issued = wait_for(&first, Duration::from_secs(20), |_| true).await?;
    task.abort();

    // The token is now spent and revoked: only the files can provide a certificate.
    ca.ledger.revoke(&record.id);
    let second = Arc::new(IdentityManager::new(cfg)?);
    let task = start(&second);
    let reused = wait_for(&second, Duration::from_secs(20), |_| true).await?;
    task.abort();
    assert_eq!(reused, issued);
    assert_eq!(
        ca.service.metrics().issued(),
        1,
        "no second request to the CA"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_certificate_and_retries_while_the_ca_is_down() -> Result<()> {
    let mut ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let (token, _) = ca
        .token("prod", "web", HOUR, Some(1))
        .map_err(anyhow::Error::msg)?;
    let manager = Arc::new(IdentityManager::new(config(
        &ca,
        dir.path(),
        &token,
        Duration::from_secs(8),
    )?)?);
    let mut registry = prometheus_client::registry::Registry::default();
    manager.register_metrics(&mut registry);
    let task = start(&manager);
    let first = wait_for(&manager, Duration::from_secs(20), |_| true).await?;
    ca.stop().await;

    // Past the renewal time, attempts fail, and the old certificate stays published.
    let failed = |registry: &prometheus_client::registry::Registry| -> Result<bool> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry)?;
        Ok(text.contains("isthmus_agent_certificate_requests_total{outcome=\"failed\"}"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !failed(&registry)? {
        if Instant::now() > deadline {
            bail!("no failed renewal recorded while the CA was down");
        }
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(manager.subscribe().borrow().as_ref(), Some(&first));

    ca.serve().await.map_err(anyhow::Error::msg)?;
    let renewed = wait_for(&manager, Duration::from_secs(20), |c| {
        c.chain_pem != first.chain_pem
    })
    .await?;
    assert!(renewed.not_after > first.not_after);
    task.abort();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    let expiry = renewed
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    assert!(
        text.contains(&format!(
            "isthmus_agent_certificate_expiry_seconds {expiry}"
        )),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn expired_token_without_certificate_stops_with_the_reason() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let (token, record) =
        ca.tokens
            .create_at("prod", "web", HOUR, None, SystemTime::now() - 2 * HOUR)?;
    ca.ledger.register(record);
    let manager = IdentityManager::new(config(&ca, dir.path(), &token, HOUR)?)?;
    let Err(err) = tokio::time::timeout(Duration::from_secs(20), manager.run()).await?;
    let msg = err.to_string();
    assert!(
        msg.contains("cannot get a certificate for spiffe://cluster.local/ns/prod/sa/web")
            && msg.contains("Unauthenticated")
            && msg.contains("expired at"),
        "{msg}"
    );
    assert!(!dir.path().join(KEY_FILE).exists(), "nothing written");
    Ok(())
}
