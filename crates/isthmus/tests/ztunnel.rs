//! Token-only clients (Istio's ztunnel): the agent keeps a workload token in a file, which a
//! client sends verbatim as `authorization: Bearer` on every certificate request, past the join
//! token's expiry and use count, until the enrolment is revoked.

mod common;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use isthmus_ca::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use isthmus_ca::pb::IstioCertificateRequest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TLS channel to the control plane, trusting its root and checking its name.
async fn channel(s: &Server, root_pem: &str) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name("istiod.istio-system.svc");
    Channel::from_shared(s.grpc.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The token file's bytes as they are, after `Bearer ` (what ztunnel sends).
fn bearer_of(
    token_file: &std::path::Path,
) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    let mut bearer = b"Bearer ".to_vec();
    bearer.extend_from_slice(&std::fs::read(token_file).unwrap());
    tonic::metadata::MetadataValue::try_from(bearer.as_slice())
        .expect("the token file's bytes make a valid header value")
}

/// What ztunnel does: read the token file, send its bytes as they are, ask for a certificate.
fn certificate_with_token_file(
    s: &Server,
    root_pem: &str,
    token_file: &std::path::Path,
) -> Result<(), tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = channel(s, root_pem).await;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/onprem/sa/zt".try_into().unwrap(),
        )];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: None,
        });
        request
            .metadata_mut()
            .insert("authorization", bearer_of(token_file));
        IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map(|_| ())
    })
}

/// What ztunnel's discovery client does: a delta ADS stream with the token file's bytes as
/// bearer and `node_id` as its node; the first answer, or the refusal.
fn discovery_with_token_file(
    s: &Server,
    root_pem: &str,
    token_file: &std::path::Path,
    node_id: &str,
) -> Result<usize, tonic::Status> {
    discovery_holding(s, root_pem, token_file, node_id, || {})
}

/// [`discovery_with_token_file`], running `during` while the stream is open.
fn discovery_holding(
    s: &Server,
    root_pem: &str,
    token_file: &std::path::Path,
    node_id: &str,
    during: impl FnOnce(),
) -> Result<usize, tonic::Status> {
    use isthmus_xds::pb::envoy::config::core::v3::Node;
    use isthmus_xds::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use isthmus_xds::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = channel(s, root_pem).await;
        let first = DeltaDiscoveryRequest {
            type_url: isthmus_xds::ADDRESS_TYPE_URL.into(),
            node: Some(Node {
                id: node_id.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // The stream stays open (held by the sender) until the first answer is read.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(first).await.unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", bearer_of(token_file));
        let mut responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        let answer = tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("an answer within 10 s")?
            .expect("an answer, not the end of the stream");
        during();
        drop(tx);
        Ok(answer.resources.len())
    })
}

#[test]
fn token_only_client_outlives_its_join_token_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    // A join token good for one certificate, for 20 seconds.
    let out = s.ok(&[
        "token", "create", "-n", "onprem", "-s", "zt", "--ttl", "20s", "--uses", "1",
    ]);
    assert!(
        !out.ends_with('\n'),
        "into a pipe, the token is printed without a newline"
    );
    let join = out.trim().to_string();
    let created = Instant::now();
    let id = isthmus_ca::claims_unverified(&join).unwrap().jti;

    let host = tempfile::tempdir().unwrap();
    let certs = host.path().join("certs");
    s.ok(&[
        "vm",
        "certs",
        "-n",
        "onprem",
        "-s",
        "zt",
        "-o",
        certs.to_str().unwrap(),
    ]);
    let root_pem = std::fs::read_to_string(certs.join("root-cert.pem")).unwrap();
    let join_file = host.path().join("token");
    std::fs::write(&join_file, &join).unwrap();
    let token_file = host.path().join("tokens/istio-token");
    let _agent = Killed(
        Command::new(BIN)
            .args(["agent", "--identity-only", "--ca-addr", &s.grpc])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--join-token-file")
            .arg(&join_file)
            .arg("--cert-dir")
            .arg(&certs)
            .arg("--workload-token-file")
            .arg(&token_file)
            .args(["--workload-token-lifetime", "1m"])
            .env("ISTHMUS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let first = wait_for("the workload token file", Duration::from_secs(20), || {
        std::fs::read(&token_file).ok().filter(|b| !b.is_empty())
    });
    assert!(!first.ends_with(b"\n"), "no trailing newline");
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let claims = isthmus_ca::claims_unverified(std::str::from_utf8(&first).unwrap()).unwrap();
    assert_eq!(claims.enr.as_deref(), Some(id.as_str()));
    assert_eq!(claims.exp - claims.iat, 60);

    // Discovery with the workload token: a node id without a namespace (ztunnel without
    // POD_NAMESPACE) is served with the credential's identity; one naming another namespace is
    // refused.
    discovery_with_token_file(
        &s,
        &root_pem,
        &token_file,
        "ztunnel~127.0.0.1~.~.svc.cluster.local",
    )
    .unwrap();
    discovery_with_token_file(
        &s,
        &root_pem,
        &token_file,
        "ztunnel~127.0.0.1~zt.onprem~onprem.svc.cluster.local",
    )
    .unwrap();
    let refused = discovery_with_token_file(
        &s,
        &root_pem,
        &token_file,
        "ztunnel~127.0.0.1~zt.prod~prod.svc.cluster.local",
    )
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("claims namespace \"prod\""),
        "{}",
        refused.message()
    );

    // ztunnel without INSTANCE_IP claims a placeholder address. Nothing vouches for it, but the
    // connection comes from the address of the host's registered entry (identity and address
    // match): the stream gets that address, so the host counts as an agent host (HBONE).
    s.ok(&[
        "register",
        "zt-vm",
        "127.0.0.1",
        "8080",
        "-n",
        "onprem",
        "-s",
        "zt",
    ]);
    discovery_holding(
        &s,
        &root_pem,
        &token_file,
        "ztunnel~1.1.1.1~zt-vm.onprem~onprem.svc.cluster.local",
        || {
            let status: serde_json::Value =
                serde_json::from_str(&s.ok(&["status", "-o", "json"])).unwrap();
            let p = &status.as_array().unwrap()[0];
            assert_eq!(p["ip"], "127.0.0.1", "{p}");
            assert_eq!(
                p["ipVerifiedBy"], "peer with a registered entry (claim ignored)",
                "{p}"
            );
        },
    )
    .unwrap();

    // The agent spent the join token's one use on its own certificate; the workload token
    // gets certificates again and again.
    for _ in 0..3 {
        certificate_with_token_file(&s, &root_pem, &token_file).unwrap();
    }
    let list = s.ok(&["token", "list"]);
    assert!(list.contains(" 1/1 "), "{list}");

    // Past the join token's expiry, and past half the workload token's life, the file holds
    // a fresh token that still works.
    let renewed = wait_for("a renewed workload token", Duration::from_secs(45), || {
        let now = std::fs::read(&token_file).ok()?;
        (now != first && created.elapsed() > Duration::from_secs(21)).then_some(now)
    });
    assert!(!renewed.ends_with(b"\n"));
    // The join token itself is expired by now; only the workload token lives on.
    let expired = certificate_with_token_file(&s, &root_pem, &join_file).unwrap_err();
    assert!(expired.message().contains("expired"), "{expired:?}");
    certificate_with_token_file(&s, &root_pem, &token_file).unwrap();
    discovery_with_token_file(
        &s,
        &root_pem,
        &token_file,
        "ztunnel~127.0.0.1~.~.svc.cluster.local",
    )
    .unwrap();

    // Revoking the enrolment ends it.
    s.ok(&["token", "revoke", &id]);
    let status = certificate_with_token_file(&s, &root_pem, &token_file).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("its enrolment join token {id} was revoked")),
        "{}",
        status.message()
    );
    let refused = discovery_with_token_file(
        &s,
        &root_pem,
        &token_file,
        "ztunnel~127.0.0.1~.~.svc.cluster.local",
    )
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}
