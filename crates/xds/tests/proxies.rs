//! The server's list of open streams (`isthmus status`), over real gRPC and TLS, driven by a
//! raw delta-xDS client that ACKs and NACKs by hand.

mod common;

use std::time::SystemTime;

use anyhow::Result;
use common::*;
use isthmus_model::Health;
use isthmus_xds::pb::envoy::config::core::v3::Node;
use isthmus_xds::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use isthmus_xds::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use isthmus_xds::server::{
    AddressSource, HostAddress, StreamStatus, SyncState, HEALTH_TYPE_URL, VERSION_METADATA,
};
use isthmus_xds::{
    Connect, EndpointConnector, XdsServer, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn state(s: &StreamStatus, url: &str) -> SyncState {
    s.types
        .iter()
        .find(|t| t.type_url == url)
        .map_or(SyncState::NotSent, |t| t.state)
}

fn only(xds: &XdsServer) -> StreamStatus {
    let all = xds.streams();
    assert_eq!(all.len(), 1, "{all:?}");
    all.into_iter().next().unwrap()
}

#[tokio::test]
async fn streams_are_listed_with_identity_peer_version_cert_and_freshness() -> Result<()> {
    let mut reg = Registry::new(1, 2);
    let server = TestServer::start(reg.build()).await?;
    assert!(server.xds.streams().is_empty());

    let (cert, key) = server
        .pki
        .client_cert("spiffe://cluster.local/ns/prod/sa/web")?;
    let cert_not_after = {
        let der = first_der(&cert);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)?;
        parsed.validity().not_after.timestamp()
    };
    let channel = server
        .endpoint()?
        .tls_config(
            server
                .pki
                .client_tls()
                .identity(tonic::transport::Identity::from_pem(cert, key)),
        )?
        .connect()
        .await?;
    // The first request carries the node, with the client's version in its metadata.
    let (tx, rx) = mpsc::channel(16);
    let mut node = Node {
        id: node_id(),
        ..Default::default()
    };
    node.metadata = Some(prost_types::Struct {
        fields: [(
            VERSION_METADATA.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("9.9.9".into())),
            },
        )]
        .into(),
    });
    tx.send(DeltaDiscoveryRequest {
        node: Some(node),
        type_url: ADDRESS_TYPE_URL.into(),
        ..Default::default()
    })
    .await?;
    let stream = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut c = RawClient { tx, rx: stream };

    // Answered but not yet ACKed: STALE; the type it never subscribed to: NOT SENT.
    let first = c.recv().await?;
    let s = only(&server.xds);
    assert_eq!(s.node_id, node_id());
    assert_eq!(
        s.identity.to_string(),
        "spiffe://cluster.local/ns/prod/sa/web"
    );
    assert_eq!(
        s.peer.map(|p| p.ip().to_string()).as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(s.version.as_deref(), Some("9.9.9"));
    let expires = s.cert_expires.expect("the client certificate's expiry");
    assert_eq!(
        expires.duration_since(SystemTime::UNIX_EPOCH)?.as_secs() as i64,
        cert_not_after
    );
    assert!(s.connected_at <= SystemTime::now());
    assert_eq!(state(&s, ADDRESS_TYPE_URL), SyncState::Stale);
    assert_eq!(state(&s, AUTHORIZATION_TYPE_URL), SyncState::NotSent);
    assert!(s.health.is_none() && s.registered.is_none());

    c.ack(&first).await?;
    wait_until("SYNCED after the ACK", || {
        state(&only(&server.xds), ADDRESS_TYPE_URL) == SyncState::Synced
    })
    .await?;
    let t = only(&server.xds).types[0].clone();
    assert_eq!(t.acked_version, t.sent_version);
    assert!(t.last_ack.is_some());

    // A change the client rejects: NACKED with its message.
    reg.entries[0].status.health = Health::Unhealthy;
    server.publish(reg.build());
    let bad = c.recv().await?;
    c.nack(&bad, "resource \"x\": rejected by test").await?;
    wait_until("NACKED", || {
        state(&only(&server.xds), ADDRESS_TYPE_URL) == SyncState::Nacked
    })
    .await?;
    let nack = only(&server.xds).types[0].nack.clone().unwrap();
    assert_eq!(nack.message, "resource \"x\": rejected by test");
    assert_eq!(nack.version.to_string(), bad.system_version_info);

    // The rejected resource changes and is accepted: SYNCED again.
    reg.entries[0].status.health = Health::Healthy;
    reg.entries[0].spec.service_account = "fixed".into();
    server.publish(reg.build());
    let fixed = c.recv().await?;
    c.ack(&fixed).await?;
    wait_until("SYNCED after the fix", || {
        let s = only(&server.xds);
        state(&s, ADDRESS_TYPE_URL) == SyncState::Synced && s.types[0].nack.is_none()
    })
    .await?;

    // A health report is recorded (and is not a subscription).
    c.tx.send(DeltaDiscoveryRequest {
        type_url: HEALTH_TYPE_URL.into(),
        error_detail: Some(isthmus_xds::pb::google::rpc::Status {
            code: 14,
            message: "port 3306 refused".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await?;
    wait_until("the health report", || {
        only(&server.xds).health.is_some_and(|h| !h.healthy)
    })
    .await?;
    let s = only(&server.xds);
    assert_eq!(
        s.health.unwrap().message.as_deref(),
        Some("port 3306 refused")
    );
    assert!(!s.types.iter().any(|t| t.type_url == HEALTH_TYPE_URL));

    // The client goes away: so does its entry.
    drop(c);
    wait_until("the entry's removal", || server.xds.streams().is_empty()).await?;
    Ok(())
}

#[tokio::test]
async fn refused_streams_are_never_listed() -> Result<()> {
    let server = TestServer::start(Registry::new(1, 1).build()).await?;
    let mut c = RawClient::open(
        server.channel().await?,
        Auth::Token(TOKEN),
        "sidecar~10.0.0.1~vm.other~other.svc.cluster.local",
        &[ADDRESS_TYPE_URL],
        &Default::default(),
    )
    .await?;
    assert_eq!(c.recv_error().await?.code(), tonic::Code::PermissionDenied);
    assert!(server.xds.streams().is_empty());

    // A token-authenticated client has no certificate expiry to show.
    let mut c = RawClient::subscribe(server.channel().await?, &[ADDRESS_TYPE_URL]).await?;
    let r = c.recv().await?;
    c.ack(&r).await?;
    wait_until("listed", || server.xds.streams().len() == 1).await?;
    assert_eq!(only(&server.xds).cert_expires, None);
    Ok(())
}

/// A node id's address counts only when the connection comes from it, the client certificate
/// names it, or the authenticator vouches for it; any other claim is served but carries no
/// address; ids of another form are refused before anything is served.
#[tokio::test]
async fn a_node_address_counts_only_when_something_vouches_for_it() -> Result<()> {
    let vouched: std::net::IpAddr = "10.0.0.5".parse()?;
    let auth = TestServer::auth().vouch_for(identity(), vouched);
    let server = TestServer::start_authed(
        std::sync::Arc::new(Pki::new()?),
        Registry::new(1, 1).build(),
        Default::default(),
        None,
        auth,
    )
    .await?;
    let id = |ip: &str| format!("sidecar~{ip}~vm.{NS}~{NS}.svc.cluster.local");
    let from = |src: &str| -> Result<EndpointConnector> {
        Ok(EndpointConnector::new(server.endpoint()?).with_source(src.parse()?))
    };
    // Opens a stream, waits for its first response, returns its status and the stream.
    async fn status_of(
        server: &TestServer,
        channel: tonic::transport::Channel,
        node: &str,
    ) -> Result<(HostAddress, RawClient)> {
        let mut c = RawClient::open(
            channel,
            Auth::Token(TOKEN),
            node,
            &[ADDRESS_TYPE_URL],
            &Default::default(),
        )
        .await?;
        c.recv().await?;
        let s = server
            .xds
            .streams()
            .into_iter()
            .find(|s| s.node_id == node)
            .expect("listed");
        Ok((s.address, c))
    }

    // The connection comes from the claimed address.
    let (a, _c1) = status_of(
        &server,
        from("127.0.0.9")?.connect().await?,
        &id("127.0.0.9"),
    )
    .await?;
    assert_eq!(
        a,
        HostAddress::Verified {
            ip: "127.0.0.9".parse()?,
            by: AddressSource::Peer
        }
    );
    // No claim: the address the connection comes from.
    let (a, _c2) = status_of(&server, from("127.0.0.10")?.connect().await?, &id("")).await?;
    assert_eq!(a.ip(), Some("127.0.0.10".parse()?));
    // An address enrolled for the identity.
    let (a, _c3) = status_of(&server, server.channel().await?, &id("10.0.0.5")).await?;
    assert_eq!(a.source(), Some(AddressSource::Registered));
    // Anything else: served, but no address; the claim is kept as unverified.
    let (a, _c4) = status_of(&server, server.channel().await?, &id("10.0.0.6")).await?;
    assert_eq!(
        a,
        HostAddress::Unverified {
            claimed: "10.0.0.6".parse()?,
            peer: Some("127.0.0.1".parse()?)
        }
    );
    assert_eq!(a.ip(), None);
    assert_eq!(server.xds.metrics().unverified_address_claims(), 1);

    // An IP SAN of the client certificate.
    let (cert, key) = server.pki.client_cert_with_ips(
        "spiffe://cluster.local/ns/prod/sa/web",
        &["10.0.0.7".parse()?],
    )?;
    let channel = server
        .endpoint()?
        .tls_config(
            server
                .pki
                .client_tls()
                .identity(tonic::transport::Identity::from_pem(cert, key)),
        )?
        .connect()
        .await?;
    let (a, _c5) = status_of(&server, channel, &id("10.0.0.7")).await?;
    assert_eq!(a.source(), Some(AddressSource::Certificate));

    // Other forms are refused, saying which form is expected.
    for bad in [
        format!("sidecar~10.0.0.5~vm.{NS}"),
        format!("sidecar~10.0.0.5~vm.{NS}~{NS}.svc.cluster.local~extra"),
        "sidecar~10.0.0.5~vm~.svc.cluster.local".to_string(),
    ] {
        let mut c = RawClient::open(
            server.channel().await?,
            Auth::Token(TOKEN),
            &bad,
            &[ADDRESS_TYPE_URL],
            &Default::default(),
        )
        .await?;
        let status = c.recv_error().await?;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
        assert!(
            status.message().starts_with("node id "),
            "{bad}: {}",
            status.message()
        );
    }
    Ok(())
}

/// The DER of the first certificate in a PEM string.
fn first_der(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    p.contents
}
