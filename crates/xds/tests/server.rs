//! The discovery server over real gRPC and TLS on 127.0.0.1, driven by raw delta-xDS clients.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use common::*;
use isthmus_model::Health;
use isthmus_xds::pb::istio::workload as wl;
use isthmus_xds::{ResourceSet, ServerConfig, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;
use tonic::Code;

const BOTH: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

#[tokio::test]
async fn initial_state_incremental_update_and_removal() -> Result<()> {
    let mut reg = Registry::new(2, 2);
    let server = TestServer::start(reg.build()).await?;
    let mut c = RawClient::subscribe(server.channel().await?, &BOTH).await?;

    let first = c.recv_each(&BOTH).await?;
    let addresses = &first[ADDRESS_TYPE_URL];
    assert_eq!(addresses.resources.len(), 6, "2 services + 4 workloads");
    assert!(addresses.removed_resources.is_empty());
    let expected = server.current().versions(ADDRESS_TYPE_URL);
    for r in &addresses.resources {
        assert_eq!(r.version, expected[&r.name].to_string(), "{}", r.name);
        let any = r.resource.as_ref().unwrap();
        assert_eq!(any.type_url, ADDRESS_TYPE_URL);
        wl::Address::decode(any.value.as_slice())?;
    }
    let auth = &first[AUTHORIZATION_TYPE_URL];
    assert!(
        auth.resources.is_empty() && auth.removed_resources.is_empty(),
        "empty type answered"
    );

    // One entry turns unhealthy: only its workload is pushed.
    reg.entries[1].status.health = Health::Unhealthy;
    server.publish(reg.build());
    let update = c.recv().await?;
    c.ack(&update).await?;
    assert_eq!(update.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&update), vec![uid("svc0-1")]);
    let wl::address::Type::Workload(w) = wl::Address::decode(
        update.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )?
    .r#type
    .unwrap() else {
        panic!("expected a workload")
    };
    assert_eq!(w.status, wl::WorkloadStatus::Unhealthy as i32);

    // An entry goes away: removed_resources names it.
    reg.entries.remove(3);
    server.publish(reg.build());
    let removal = c.recv().await?;
    c.ack(&removal).await?;
    assert_eq!(removal.removed_resources, vec![uid("svc1-1")]);
    assert!(removal.resources.is_empty(), "{:?}", names(&removal));
    Ok(())
}

#[tokio::test]
async fn empty_types_are_answered() -> Result<()> {
    let server = TestServer::start(ResourceSet::new()).await?;
    let mut c = RawClient::subscribe(server.channel().await?, &BOTH).await?;
    let first = c.recv_each(&BOTH).await?;
    for t in BOTH {
        assert!(first[t].resources.is_empty(), "{t}");
        assert!(!first[t].nonce.is_empty(), "{t}: a nonce to ACK");
    }
    // A type the server does not serve is answered too (empty), so clients never hang.
    let mut c = RawClient::subscribe(
        server.channel().await?,
        &["type.googleapis.com/example.Unknown"],
    )
    .await?;
    let r = c.recv().await?;
    assert!(r.resources.is_empty());
    Ok(())
}

#[tokio::test]
async fn reconnect_with_initial_resource_versions_gets_only_the_difference() -> Result<()> {
    let mut reg = Registry::new(3, 2);
    let server = TestServer::start(reg.build()).await?;
    let mut c = RawClient::subscribe(server.channel().await?, &BOTH).await?;
    let first = c.recv_each(&BOTH).await?;
    let mut had: HashMap<String, HashMap<String, String>> = HashMap::new();
    had.insert(ADDRESS_TYPE_URL.into(), versions(&first[ADDRESS_TYPE_URL]));
    had.get_mut(ADDRESS_TYPE_URL).unwrap().insert(
        "prod/ghost.prod.svc.cluster.local".into(),
        "0123456789abcdef".into(),
    );
    drop(c);

    // While the client is away: one entry changes, one disappears, one appears.
    reg.entries[0].status.health = Health::Unhealthy;
    reg.entries.retain(|e| e.metadata.name != "svc2-1");
    reg.entries.push(entry(NS, "svc2-9", "10.9.9.9", "svc2"));
    server.publish(reg.build());

    let mut c = RawClient::open(
        server.channel().await?,
        Auth::Token(TOKEN),
        &node_id(),
        &BOTH,
        &had,
    )
    .await?;
    let again = c.recv_each(&BOTH).await?;
    let a = &again[ADDRESS_TYPE_URL];
    assert_eq!(names(a), vec![uid("svc0-0"), uid("svc2-9")]);
    let mut removed = a.removed_resources.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec![
            uid("svc2-1"),
            "prod/ghost.prod.svc.cluster.local".to_owned()
        ],
        "what vanished while away (and what the server never had) is removed"
    );
    assert!(again[AUTHORIZATION_TYPE_URL].resources.is_empty());

    // A client that already has everything gets empty answers.
    let now = server.current().versions(ADDRESS_TYPE_URL);
    let all: HashMap<String, HashMap<String, String>> = [(
        ADDRESS_TYPE_URL.to_owned(),
        now.iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
    )]
    .into();
    let mut c = RawClient::open(
        server.channel().await?,
        Auth::Token(TOKEN),
        &node_id(),
        &BOTH,
        &all,
    )
    .await?;
    let up_to_date = c.recv_each(&BOTH).await?;
    assert!(up_to_date[ADDRESS_TYPE_URL].resources.is_empty());
    assert!(up_to_date[ADDRESS_TYPE_URL].removed_resources.is_empty());
    Ok(())
}

#[tokio::test]
async fn nacked_resource_is_not_pushed_again_until_it_changes() -> Result<()> {
    let mut reg = Registry::new(2, 1);
    let server = TestServer::start(reg.build()).await?;
    let mut c = RawClient::subscribe(server.channel().await?, &[ADDRESS_TYPE_URL]).await?;
    let first = c.recv().await?;
    c.ack(&first).await?;

    reg.entries[0].status.health = Health::Unhealthy;
    server.publish(reg.build());
    let bad = c.recv().await?;
    assert_eq!(names(&bad), vec![uid("svc0-0")]);
    c.nack(
        &bad,
        &format!("resource {:?}: rejected by test", uid("svc0-0")),
    )
    .await?;
    wait_until("the NACK is counted", || {
        server.xds.metrics().nacks(ADDRESS_TYPE_URL) == 1
    })
    .await?;

    // An unrelated change: only it arrives, the refused one is not re-sent.
    reg.entries[1].status.health = Health::Unhealthy;
    server.publish(reg.build());
    let next = c.recv().await?;
    c.ack(&next).await?;
    assert_eq!(names(&next), vec![uid("svc1-0")]);

    // The refused resource changes again: now it is sent.
    reg.entries[0].status.health = Health::Healthy;
    reg.entries[0].spec.service_account = "fixed".into();
    server.publish(reg.build());
    let fixed = c.recv().await?;
    c.ack(&fixed).await?;
    assert!(
        names(&fixed).contains(&uid("svc0-0")),
        "{:?}",
        names(&fixed)
    );
    assert_eq!(server.xds.metrics().nacks(ADDRESS_TYPE_URL), 1);
    Ok(())
}

#[tokio::test]
async fn changes_while_unacked_are_coalesced_into_one_push() -> Result<()> {
    let mut reg = Registry::new(1, 3);
    let server = TestServer::start(reg.build()).await?;
    let mut c = RawClient::subscribe(server.channel().await?, &[ADDRESS_TYPE_URL]).await?;
    let first = c.recv().await?;
    c.ack(&first).await?;

    reg.entries[0].status.health = Health::Unhealthy;
    server.publish(reg.build());
    let one = c.recv().await?; // not ACKed yet
    let pushes = server.xds.metrics().pushes(ADDRESS_TYPE_URL);
    for i in 1..3 {
        reg.entries[i].status.health = Health::Unhealthy;
        server.publish(reg.build());
    }
    reg.entries.remove(0);
    server.publish(reg.build());
    wait_until("the publisher takes the last set", || {
        server.current().len(ADDRESS_TYPE_URL) == 3
    })
    .await?;
    c.ack(&one).await?;
    let merged = c.recv().await?;
    c.ack(&merged).await?;
    assert_eq!(names(&merged), vec![uid("svc0-1"), uid("svc0-2")]);
    assert_eq!(merged.removed_resources, vec![uid("svc0-0")]);
    assert_eq!(
        server.xds.metrics().pushes(ADDRESS_TYPE_URL),
        pushes + 1,
        "one push for four changes"
    );
    Ok(())
}

#[tokio::test]
async fn unauthenticated_and_wrong_identity_clients_are_refused() -> Result<()> {
    let server = TestServer::start(Registry::new(1, 1).build()).await?;
    let none = RawClient::open(
        server.channel().await?,
        Auth::None,
        &node_id(),
        &BOTH,
        &HashMap::new(),
    )
    .await;
    let status = none.err().expect("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("no credentials"),
        "{}",
        status.message()
    );

    let bad = RawClient::open(
        server.channel().await?,
        Auth::Token("forged"),
        &node_id(),
        &BOTH,
        &HashMap::new(),
    )
    .await;
    assert_eq!(bad.err().expect("refused").code(), Code::Unauthenticated);

    // Valid token for prod/web, but the node claims namespace "other".
    let mut c = RawClient::open(
        server.channel().await?,
        Auth::Token(TOKEN),
        "sidecar~10.0.0.1~vm.other~other.svc.cluster.local",
        &BOTH,
        &HashMap::new(),
    )
    .await?;
    let status = c.recv_error().await?;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/prod/sa/web"),
        "{}",
        status.message()
    );
    Ok(())
}

#[tokio::test]
async fn workload_certificate_authenticates() -> Result<()> {
    let server = TestServer::start(Registry::new(1, 1).build()).await?;
    let (cert, key) = server
        .pki
        .client_cert("spiffe://cluster.local/ns/prod/sa/web")?;
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
    let mut c = RawClient::open(channel, Auth::None, &node_id(), &BOTH, &HashMap::new()).await?;
    let first = c.recv_each(&BOTH).await?;
    assert_eq!(first[ADDRESS_TYPE_URL].resources.len(), 2);

    // A certificate for another namespace than the node claims is refused.
    let (cert, key) = server
        .pki
        .client_cert("spiffe://cluster.local/ns/dev/sa/web")?;
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
    let mut c = RawClient::open(channel, Auth::None, &node_id(), &BOTH, &HashMap::new()).await?;
    assert_eq!(c.recv_error().await?.code(), Code::PermissionDenied);
    Ok(())
}

#[tokio::test]
async fn two_hundred_clients_converge_after_a_change() -> Result<()> {
    let mut reg = Registry::new(10, 10);
    let server = TestServer::start(reg.build()).await?;
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(server.channel().await?);
    }
    let mut clients = Vec::new();
    for i in 0..200 {
        let mut c = RawClient::subscribe(channels[i % 10].clone(), &BOTH).await?;
        let first = c.recv_each(&BOTH).await?;
        assert_eq!(first[ADDRESS_TYPE_URL].resources.len(), 110);
        clients.push(c);
    }
    wait_until("200 connected", || {
        server.xds.metrics().connected_clients() == 200
    })
    .await?;
    reg.entries[42].status.health = Health::Unhealthy;
    server.publish(reg.build());
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let r = c.recv().await?;
                c.ack(&r).await?;
                anyhow::Ok(names(&r))
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await??, vec![uid("svc4-2")]);
    }
    Ok(())
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_hold_back_others() -> Result<()> {
    // About 1.5 MB of initial state: far past the HTTP/2 window of a client that never reads.
    let mut reg = Registry::new(40, 100);
    let config = ServerConfig {
        large_response: 1_000_000, // keep the permit out of this test
        ..Default::default()
    };
    let server =
        TestServer::start_with(std::sync::Arc::new(Pki::new()?), reg.build(), config, None).await?;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(RawClient::subscribe(server.channel().await?, &BOTH).await?);
    }
    let mut reader = RawClient::subscribe(server.channel().await?, &BOTH).await?;
    reader.recv_each(&BOTH).await?;
    for round in 0..5 {
        reg.entries[round].status.health = Health::Unhealthy;
        server.publish(reg.build());
        let r = tokio::time::timeout(Duration::from_secs(10), reader.recv()).await??;
        reader.ack(&r).await?;
        assert_eq!(names(&r), vec![uid(&reg.entries[round].metadata.name)]);
    }
    assert_eq!(server.xds.metrics().connected_clients(), 4);
    drop(stalled);
    Ok(())
}

#[tokio::test]
async fn many_initial_states_at_once_are_rationed_but_all_served() -> Result<()> {
    let reg = Registry::new(20, 20);
    let config = ServerConfig {
        large_response: 100,
        max_large_responses: 2,
        ..Default::default()
    };
    let server =
        TestServer::start_with(std::sync::Arc::new(Pki::new()?), reg.build(), config, None).await?;
    let channel = server.channel().await?;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::subscribe(channel, &BOTH).await?;
            let first = c.recv_each(&BOTH).await?;
            anyhow::Ok(first[ADDRESS_TYPE_URL].resources.len())
        }));
    }
    for t in tasks {
        assert_eq!(t.await??, 420);
    }
    Ok(())
}

#[tokio::test]
async fn close_streams_ends_them_with_unavailable_and_refuses_new_ones() -> Result<()> {
    let server = TestServer::start(Registry::new(1, 1).build()).await?;
    let mut c = RawClient::subscribe(server.channel().await?, &BOTH).await?;
    c.recv_each(&BOTH).await?;
    server.xds.close_streams();
    assert_eq!(c.recv_error().await?.code(), Code::Unavailable);
    let again = RawClient::subscribe(server.channel().await?, &BOTH).await;
    let status = again.err().expect("refused").downcast::<tonic::Status>()?;
    assert_eq!(status.code(), Code::Unavailable);
    wait_until("no stream left", || {
        server.xds.metrics().connected_clients() == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn other_methods_are_unimplemented() -> Result<()> {
    let server = TestServer::start(ResourceSet::new()).await?;
    let mut grpc = tonic::client::Grpc::new(server.channel().await?);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<
        isthmus_xds::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest,
        isthmus_xds::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse,
    >::default();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    let request = tonic::Request::new(tokio_stream::iter(Vec::new()));
    let status = grpc
        .streaming(request, path, codec)
        .await
        .expect_err("unimplemented");
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(
        status.message().contains("DeltaAggregatedResources"),
        "{}",
        status.message()
    );
    Ok(())
}
