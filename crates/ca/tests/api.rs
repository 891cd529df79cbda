//! The certificate API over real gRPC and TLS on 127.0.0.1: the happy paths and every
//! way a caller can be refused, each asserting the status code and message a user sees.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use isthmus_ca::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use isthmus_ca::pb::IstioCertificateRequest;
use isthmus_ca::testing::TestCa;
use isthmus_ca::{Ca, CaConfig, CertInfo, SpiffeId, TokenClaims};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Status};
use x509_parser::prelude::{FromDer, X509Certificate};

const NS: &str = "prod";
const SA: &str = "web";
const HOUR: Duration = Duration::from_secs(3600);

enum Auth<'a> {
    None,
    Token(&'a str),
    Cert {
        chain_pem: &'a str,
        key_pem: &'a str,
    },
}

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn csr(sans: &[&str]) -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

async fn call(
    ca: &TestCa,
    auth: Auth<'_>,
    csr: &str,
    validity: i64,
) -> Result<Result<Vec<String>, Status>> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.root_pem()))
        .domain_name("istiod.istio-system.svc");
    if let Auth::Cert { chain_pem, key_pem } = &auth {
        tls = tls.identity(Identity::from_pem(chain_pem, key_pem));
    }
    let channel = Channel::from_shared(ca.url())?
        .tls_config(tls)?
        .connect()
        .await?;
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: validity,
        metadata: None,
    });
    request
        .metadata_mut()
        .insert("clusterid", "Kubernetes".parse()?);
    if let Auth::Token(t) = auth {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    Ok(IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .map(|r| r.into_inner().cert_chain))
}

fn assert_status(result: Result<Vec<String>, Status>, code: Code, needle: &str) {
    let status = result.expect_err("the request should have been refused");
    assert_eq!(status.code(), code, "message: {}", status.message());
    assert!(
        status.message().contains(needle),
        "{:?} does not contain {needle:?}",
        status.message()
    );
}

/// Token → certificate; returns (chain PEM without roots, key PEM).
async fn first_cert(ca: &TestCa, ns: &str, sa: &str) -> Result<(String, String)> {
    let (token, _) = ca.token(ns, sa, HOUR, None).map_err(anyhow::Error::msg)?;
    let (key, pem) = csr(&[&id(ns, sa)]);
    let chain = call(ca, Auth::Token(&token), &pem, 0).await??;
    Ok((chain[0].clone(), key.serialize_pem()))
}

fn leaf(pem: &str) -> CertInfo {
    let der = pem::parse(pem).unwrap();
    CertInfo::parse(der.contents(), "leaf").unwrap()
}

#[tokio::test]
async fn token_gets_a_workload_certificate() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, record) = ca
        .token(NS, SA, HOUR, Some(3))
        .map_err(anyhow::Error::msg)?;
    let (_, pem) = csr(&[&id(NS, SA)]);
    let chain = call(&ca, Auth::Token(&token), &pem, 0).await??;

    assert_eq!(chain.len(), 2, "self-signed CA: leaf then root");
    assert_eq!(chain[1], ca.root_pem());
    let der = pem::parse(&chain[0])?;
    let (_, x) = X509Certificate::from_der(der.contents())?;
    assert!(x.subject().as_raw().len() <= 2, "empty subject");
    assert!(!x.is_ca());
    let ku = x.key_usage()?.expect("key usage").value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = x.extended_key_usage()?.expect("eku").value;
    assert!(eku.server_auth && eku.client_auth);
    let info = leaf(&chain[0]);
    assert_eq!(info.spiffe_id()?.to_string(), id(NS, SA));
    let life = info.not_after.duration_since(info.not_before)?;
    assert!(life >= Duration::from_secs(24 * 3600) && life <= Duration::from_secs(24 * 3600 + 60));
    assert!(
        info.not_before < SystemTime::now(),
        "backdated for clock skew"
    );
    assert_eq!(ca.ledger.uses(&record.id), Some(1));
    assert_eq!(ca.service.metrics().issued(), 1);
    Ok(())
}

#[tokio::test]
async fn client_certificate_renews_without_a_token() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (chain_pem, key_pem) = first_cert(&ca, NS, SA).await?;
    let (_, pem) = csr(&[&id(NS, SA)]);
    let auth = Auth::Cert {
        chain_pem: &chain_pem,
        key_pem: &key_pem,
    };
    let renewed = call(&ca, auth, &pem, 600).await??;
    let info = leaf(&renewed[0]);
    assert_eq!(info.spiffe_id()?.to_string(), id(NS, SA));
    assert!(info.not_after.duration_since(info.not_before)? <= Duration::from_secs(600 + 60));
    Ok(())
}

#[tokio::test]
async fn csr_for_another_namespace_is_denied() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, record) = ca
        .token(NS, SA, HOUR, Some(1))
        .map_err(anyhow::Error::msg)?;
    let (_, pem) = csr(&[&id("other", SA)]);
    let msg = format!(
        "CSR asks for {} but the token is for {}",
        id("other", SA),
        id(NS, SA)
    );
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 0).await?,
        Code::PermissionDenied,
        &msg,
    );
    assert_eq!(
        ca.ledger.uses(&record.id),
        Some(0),
        "a refused request spends no use"
    );
    Ok(())
}

#[tokio::test]
async fn csr_for_another_service_account_is_denied() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, _) = ca.token(NS, SA, HOUR, None).map_err(anyhow::Error::msg)?;
    let (_, pem) = csr(&[&id(NS, "admin")]);
    let msg = format!(
        "CSR asks for {} but the token is for {}",
        id(NS, "admin"),
        id(NS, SA)
    );
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 0).await?,
        Code::PermissionDenied,
        &msg,
    );
    Ok(())
}

#[tokio::test]
async fn renewal_certificate_cannot_ask_for_another_identity() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (chain_pem, key_pem) = first_cert(&ca, NS, SA).await?;
    let (_, pem) = csr(&[&id(NS, "admin")]);
    let auth = Auth::Cert {
        chain_pem: &chain_pem,
        key_pem: &key_pem,
    };
    let msg = format!(
        "CSR asks for {} but the client certificate is for {}",
        id(NS, "admin"),
        id(NS, SA)
    );
    assert_status(
        call(&ca, auth, &pem, 0).await?,
        Code::PermissionDenied,
        &msg,
    );
    Ok(())
}

#[tokio::test]
async fn csr_with_two_sans_is_denied() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, _) = ca.token(NS, SA, HOUR, None).map_err(anyhow::Error::msg)?;
    let (_, pem) = csr(&[&id(NS, SA), &id("kube-system", "admin")]);
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 0).await?,
        Code::PermissionDenied,
        "CSR asks for 2 identities",
    );
    Ok(())
}

#[tokio::test]
async fn csr_without_san_is_invalid() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, _) = ca.token(NS, SA, HOUR, None).map_err(anyhow::Error::msg)?;
    let (_, pem) = csr(&[]);
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 0).await?,
        Code::InvalidArgument,
        "CSR has no URI SAN",
    );
    Ok(())
}

#[tokio::test]
async fn no_credentials_is_unauthenticated() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (_, pem) = csr(&[&id(NS, SA)]);
    assert_status(
        call(&ca, Auth::None, &pem, 0).await?,
        Code::Unauthenticated,
        "no credentials",
    );
    Ok(())
}

#[tokio::test]
async fn expired_token_is_unauthenticated() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let two_hours_ago = SystemTime::now() - 2 * HOUR;
    let (token, record) = ca.tokens.create_at(NS, SA, HOUR, None, two_hours_ago)?;
    ca.ledger.register(record);
    let (_, pem) = csr(&[&id(NS, SA)]);
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 0).await?,
        Code::Unauthenticated,
        "expired at",
    );
    Ok(())
}

#[tokio::test]
async fn token_signed_by_another_key_is_unauthenticated() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let other = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, _) = other
        .token(NS, SA, HOUR, None)
        .map_err(anyhow::Error::msg)?;
    let (_, pem) = csr(&[&id(NS, SA)]);
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 0).await?,
        Code::Unauthenticated,
        "signature does not verify",
    );
    Ok(())
}

#[tokio::test]
async fn token_for_another_audience_is_unauthenticated() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (good, _) = ca.token(NS, SA, HOUR, None).map_err(anyhow::Error::msg)?;
    let (mut claims, _): (TokenClaims, SpiffeId) = ca.tokens.verify(&good)?;
    claims.aud = "grafana".into();
    // Signed with the CA's real token key: only the audience is wrong.
    let key_pem = std::fs::read(ca.dir.path().join("ca").join("token-key.pem"))?;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(&key_pem)?,
    )?;
    let (_, pem) = csr(&[&id(NS, SA)]);
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 0).await?,
        Code::Unauthenticated,
        "join token is for audience \"grafana\", not \"isthmus-ca\"",
    );
    Ok(())
}

#[tokio::test]
async fn revoked_token_is_unauthenticated() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, record) = ca.token(NS, SA, HOUR, None).map_err(anyhow::Error::msg)?;
    assert!(ca.ledger.revoke(&record.id));
    let (_, pem) = csr(&[&id(NS, SA)]);
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 0).await?,
        Code::Unauthenticated,
        &format!("join token {} was revoked", record.id),
    );
    Ok(())
}

#[tokio::test]
async fn token_over_its_use_count_is_unauthenticated() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, record) = ca
        .token(NS, SA, HOUR, Some(1))
        .map_err(anyhow::Error::msg)?;
    let (_, pem) = csr(&[&id(NS, SA)]);
    call(&ca, Auth::Token(&token), &pem, 0).await??;
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 0).await?,
        Code::Unauthenticated,
        &format!("join token {} is used up: it allowed 1 use(s)", record.id),
    );
    Ok(())
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_unauthenticated() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let foreign = Ca::load_or_create(&CaConfig::new(dir.path()))?;
    let issued = foreign.issue_workload(&id(NS, SA).parse()?, None)?;
    let (_, pem) = csr(&[&id(NS, SA)]);
    let auth = Auth::Cert {
        chain_pem: &issued.chain_pem(),
        key_pem: &issued.key_pem,
    };
    assert_status(
        call(&ca, auth, &pem, 0).await?,
        Code::Unauthenticated,
        "client certificate rejected: certificate is not trusted: it was not issued by a CA in this mesh's trust bundle",
    );
    Ok(())
}

#[tokio::test]
async fn expired_client_certificate_is_unauthenticated() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    // Signed by the real CA key, with a validity that ended an hour ago.
    let ca_dir = ca.dir.path().join("ca");
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem"))?)?;
    let issuer = Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("ca-cert.pem"))?,
        ca_key,
    )?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id(NS, SA).try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - 2 * HOUR;
    params.not_after = now - HOUR;
    let expired = params.signed_by(&key, &issuer)?;
    let (_, pem) = csr(&[&id(NS, SA)]);
    let auth = Auth::Cert {
        chain_pem: &expired.pem(),
        key_pem: &key.serialize_pem(),
    };
    assert_status(
        call(&ca, auth, &pem, 0).await?,
        Code::Unauthenticated,
        "client certificate rejected: certificate is not trusted: it expired at",
    );
    Ok(())
}

#[tokio::test]
async fn lifetime_above_the_maximum_is_invalid() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, _) = ca.token(NS, SA, HOUR, None).map_err(anyhow::Error::msg)?;
    let (_, pem) = csr(&[&id(NS, SA)]);
    assert_status(
        call(&ca, Auth::Token(&token), &pem, 100 * 24 * 3600).await?,
        Code::InvalidArgument,
        "requested lifetime 100d is above this CA's maximum of 90d",
    );
    assert_status(
        call(&ca, Auth::Token(&token), &pem, -5).await?,
        Code::InvalidArgument,
        "validity_duration must be 0",
    );
    Ok(())
}

#[tokio::test]
async fn malformed_pem_csr_is_invalid() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, _) = ca.token(NS, SA, HOUR, None).map_err(anyhow::Error::msg)?;
    let garbage =
        "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n";
    assert_status(
        call(&ca, Auth::Token(&token), garbage, 0).await?,
        Code::InvalidArgument,
        "CSR is not a valid PKCS#10 request",
    );
    assert_status(
        call(&ca, Auth::Token(&token), "hello", 0).await?,
        Code::InvalidArgument,
        "CSR is not PEM",
    );
    Ok(())
}

#[tokio::test]
async fn oversized_requests_are_refused() -> Result<()> {
    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (token, _) = ca.token(NS, SA, HOUR, None).map_err(anyhow::Error::msg)?;
    let big = "A".repeat(100 * 1024);
    assert_status(
        call(&ca, Auth::Token(&token), &big, 0).await?,
        Code::InvalidArgument,
        "CSR is 102400 bytes; the limit is 65536 bytes",
    );
    // Past the decoder's limit tonic refuses before any of our code runs.
    let huge = "A".repeat(300 * 1024);
    assert_status(
        call(&ca, Auth::Token(&token), &huge, 0).await?,
        Code::OutOfRange,
        "the limit is: 262144 bytes",
    );
    Ok(())
}

/// What a token-only request (the host's bundle) gets: the same checks as a certificate request,
/// and no use spent, so the agent can still get its certificate with a one-use token.
#[tokio::test]
async fn token_check_without_spending_a_use() -> Result<()> {
    use isthmus_ca::{AuthError, Authenticator, LedgerError, TokenError};
    use tonic::metadata::MetadataMap;

    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let auth = Authenticator::new(ca.ca.clone(), ca.tokens.clone(), ca.ledger.clone());
    let bearer = |t: &str| -> Result<MetadataMap> {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {t}").parse()?);
        Ok(m)
    };

    let (token, record) = ca
        .token(NS, SA, HOUR, Some(1))
        .map_err(anyhow::Error::msg)?;
    for _ in 0..3 {
        let (claims, identity) = auth.check_token(&bearer(&token)?).await?;
        assert_eq!(identity.to_string(), id(NS, SA));
        assert_eq!(claims.jti, record.id);
        assert_eq!(claims.root, isthmus_ca::pin::root_hashes(ca.ca.roots()));
    }
    assert_eq!(ca.ledger.uses(&record.id), Some(0));
    // The one use is still there for the certificate.
    let (_, pem) = csr(&[&id(NS, SA)]);
    call(&ca, Auth::Token(&token), &pem, 0).await??;
    assert!(matches!(
        auth.check_token(&bearer(&token)?).await,
        Err(AuthError::Ledger(LedgerError::Exhausted {
            max_uses: 1,
            ..
        }))
    ));

    assert!(matches!(
        auth.check_token(&MetadataMap::new()).await,
        Err(AuthError::NoToken)
    ));
    let (revoked, record) = ca.token(NS, SA, HOUR, None).map_err(anyhow::Error::msg)?;
    assert!(ca.ledger.revoke(&record.id));
    assert!(matches!(
        auth.check_token(&bearer(&revoked)?).await,
        Err(AuthError::Ledger(LedgerError::Revoked { .. }))
    ));
    let (old, record) = ca
        .tokens
        .create_at(NS, SA, HOUR, None, SystemTime::now() - 2 * HOUR)?;
    ca.ledger.register(record);
    assert!(matches!(
        auth.check_token(&bearer(&old)?).await,
        Err(AuthError::Token(TokenError::Expired { .. }))
    ));
    let other = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let (foreign, _) = other
        .token(NS, SA, HOUR, None)
        .map_err(anyhow::Error::msg)?;
    assert!(matches!(
        auth.check_token(&bearer(&foreign)?).await,
        Err(AuthError::Token(TokenError::BadSignature))
    ));
    Ok(())
}

/// A workload token (what Istio's ztunnel sends on every request) gets certificates again and
/// again without spending its enrolment's uses, outlives the join token's expiry, and is
/// refused once the enrolment is revoked.
#[tokio::test]
async fn workload_token_is_multi_use_and_dies_with_its_enrolment() -> Result<()> {
    use isthmus_ca::{AuthError, Authenticator, Caller, Credential};

    let ca = TestCa::start().await.map_err(anyhow::Error::msg)?;
    let auth = Authenticator::new(ca.ca.clone(), ca.tokens.clone(), ca.ledger.clone());
    // A one-use join token that expires in a minute.
    let (join, record) = ca
        .token(NS, SA, Duration::from_secs(60), Some(1))
        .map_err(anyhow::Error::msg)?;
    let identity: SpiffeId = id(NS, SA).parse()?;
    let by_join = Caller {
        identity: identity.clone(),
        credential: Credential::Token {
            id: record.id.clone(),
        },
    };
    let (workload, claims) = auth.issue_workload_token(&by_join, "", HOUR).await?;
    assert_eq!(claims.enr.as_deref(), Some(record.id.as_str()));
    assert_eq!(claims.kind.as_deref(), Some(isthmus_ca::WORKLOAD_KIND));
    assert_eq!(claims.exp - claims.iat, 3600);
    assert_eq!(ca.ledger.uses(&record.id), Some(0), "issuing spends no use");

    let (_, pem) = csr(&[&id(NS, SA)]);
    for _ in 0..3 {
        let chain = call(&ca, Auth::Token(&workload), &pem, 0).await??;
        assert_eq!(leaf(&chain[0]).spiffe_id()?.to_string(), id(NS, SA));
    }
    assert_eq!(ca.ledger.uses(&record.id), Some(0));
    // The join token's one use is still there, and spent by a join-token request as before.
    call(&ca, Auth::Token(&join), &pem, 0).await??;
    call(&ca, Auth::Token(&workload), &pem, 0).await??;

    // It is still only good for its own identity.
    let (_, other) = csr(&[&id("other", SA)]);
    assert_status(
        call(&ca, Auth::Token(&workload), &other, 0).await?,
        Code::PermissionDenied,
        "but the workload token is for spiffe://cluster.local/ns/prod/sa/web",
    );

    // A certificate holder renews it under the same enrolment after the join token expired.
    let by_cert = Caller {
        identity: identity.clone(),
        credential: Credential::ClientCertificate,
    };
    let (_, renewed) = auth
        .issue_workload_token(&by_cert, &record.id, Duration::from_secs(600))
        .await?;
    assert_eq!(renewed.enr, claims.enr);
    // ...but not under an enrolment of another identity, nor without naming one, nor with the
    // workload token alone, nor for longer than a day.
    let (_, theirs) = ca
        .token("other", "db", HOUR, None)
        .map_err(anyhow::Error::msg)?;
    let err = auth
        .issue_workload_token(&by_cert, &theirs.id, HOUR)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "enrolment {} is for spiffe://cluster.local/ns/other/sa/db",
            theirs.id
        )),
        "{err}"
    );
    let err = auth
        .issue_workload_token(&by_cert, "", HOUR)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("name the host's enrolment"),
        "{err}"
    );
    let by_workload = Caller {
        identity: identity.clone(),
        credential: Credential::WorkloadToken {
            enrolment: record.id.clone(),
        },
    };
    let err = auth
        .issue_workload_token(&by_workload, &record.id, HOUR)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot renew itself"), "{err}");
    let err = auth
        .issue_workload_token(&by_cert, &record.id, 48 * HOUR)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("between 1 minute and 24 hours"),
        "{err}"
    );
    // A workload token is not a join token: it cannot fetch the host's bundle.
    let mut m = tonic::metadata::MetadataMap::new();
    m.insert("authorization", format!("Bearer {workload}").parse()?);
    assert!(matches!(
        auth.check_token(&m).await,
        Err(AuthError::NotAJoinToken)
    ));

    // Revoking the enrolment ends every workload token derived from it.
    assert!(ca.ledger.revoke(&record.id));
    assert_status(
        call(&ca, Auth::Token(&workload), &pem, 0).await?,
        Code::Unauthenticated,
        &format!(
            "workload token rejected: its enrolment join token {} was revoked",
            record.id
        ),
    );
    let err = auth
        .issue_workload_token(&by_cert, &record.id, HOUR)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("was revoked"), "{err}");
    Ok(())
}
