//! What one discovery client can make the server keep is bounded: names per type, type URLs
//! and request size per stream, streams per identity. Real gRPC over TLS on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;
use isthmus_xds::pb::envoy::config::core::v3::Node;
use isthmus_xds::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use isthmus_xds::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use isthmus_xds::{ServerConfig, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const BOTH: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];
/// What the server may grow by while one stream asks for a million names (the test process
/// holds the client's copies of the names too).
const RSS_BOUND_KIB: u64 = 256 * 1024;

/// This process's resident memory in KiB (`VmRSS`).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn open(
    channel: Channel,
) -> Result<
    (
        mpsc::Sender<DeltaDiscoveryRequest>,
        Streaming<DeltaDiscoveryResponse>,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(4);
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let stream = client
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    Ok((tx, stream))
}

fn subscribe(first: bool, type_url: &str, names: Vec<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: first.then(|| Node {
            id: node_id(),
            ..Default::default()
        }),
        type_url: type_url.to_owned(),
        resource_names_subscribe: names,
        ..Default::default()
    }
}

async fn error_of(rx: &mut Streaming<DeltaDiscoveryResponse>) -> Status {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "the stream was not closed");
        match tokio::time::timeout(WAIT, rx.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without an error"),
            Ok(Err(status)) => return status,
            Err(_) => panic!("the stream was not closed within {WAIT:?}"),
        }
    }
}

/// A served client subscribes and gets both types; returns how long that took.
async fn served(server: &TestServer) -> Result<Duration> {
    let start = Instant::now();
    let mut c = RawClient::subscribe(server.channel().await?, &BOTH).await?;
    let got = c.recv_each(&BOTH).await?;
    assert_eq!(got[ADDRESS_TYPE_URL].resources.len(), 6);
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_subscriptions_are_refused_within_memory_bounds_while_others_are_served(
) -> Result<()> {
    let server = TestServer::start(Registry::new(2, 2).build()).await?;
    let limit = ServerConfig::default().max_names_per_type;
    let before = rss_kib();

    // A million names in requests of 100,000 (each ~3 MB, under the request size limit).
    let (tx, mut rx) = open(server.channel().await?).await?;
    let sender = tokio::spawn(async move {
        for batch in 0..10 {
            let names = (batch * 100_000..(batch + 1) * 100_000)
                .map(|i| format!("prod/attacker-{i:07}.example"))
                .collect();
            if tx
                .send(subscribe(batch == 0, ADDRESS_TYPE_URL, names))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // Another client is served meanwhile.
    let other = served(&server).await?;
    let status = error_of(&mut rx).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("limit of {limit} names per type"))
            && status.message().contains("wildcard"),
        "{}",
        status.message()
    );
    sender.await?;
    let after_names = rss_kib();

    // The same million in one request is over the request size limit, refused before it is read.
    let (tx, mut rx) = open(server.channel().await?).await?;
    let names: Vec<String> = (0..1_000_000)
        .map(|i| format!("prod/attacker-{i:07}.example"))
        .collect();
    let _ = tx.send(subscribe(true, ADDRESS_TYPE_URL, names)).await;
    let status = error_of(&mut rx).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("over the limit of 16777216"),
        "{}",
        status.message()
    );
    let after_large = rss_kib();
    let other_after = served(&server).await?;
    eprintln!(
        "RSS before {before} KiB, after 1M names in 10 requests {after_names} KiB, after one \
         1M-name request {after_large} KiB; another client served in {other:?} during, {other_after:?} after"
    );
    assert!(
        after_names.max(after_large) < before + RSS_BOUND_KIB,
        "RSS grew from {before} KiB to {} KiB",
        after_names.max(after_large)
    );
    Ok(())
}

#[tokio::test]
async fn subscribe_unsubscribe_churn_gives_memory_back() -> Result<()> {
    let server = TestServer::start(Registry::new(2, 2).build()).await?;
    let (tx, mut rx) = open(server.channel().await?).await?;
    tx.send(subscribe(
        true,
        ADDRESS_TYPE_URL,
        vec!["prod/svc0.prod.svc.cluster.local".into()],
    ))
    .await?;
    let first = rx.message().await?.unwrap();
    assert_eq!(first.resources.len(), 1);
    let mut rss = Vec::new();
    for round in 0..20 {
        let names: Vec<String> = (0..50_000)
            .map(|i| format!("prod/churn-{round}-{i}"))
            .collect();
        let mut req = subscribe(false, ADDRESS_TYPE_URL, names.clone());
        req.response_nonce = first.nonce.clone();
        tx.send(req).await?;
        tx.send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            resource_names_unsubscribe: names,
            ..Default::default()
        })
        .await?;
        rss.push(rss_kib());
    }
    // Still subscribed to the one real name, and the stream is alive: a removal of the names
    // never served is answered (or nothing); a new subscription is served.
    let (first_rss, last_rss) = (rss[2], rss[19]);
    eprintln!("RSS over 20 rounds of 50,000 names subscribed and unsubscribed: {rss:?} KiB");
    assert!(
        last_rss < first_rss + 64 * 1024,
        "RSS kept growing with churn: {rss:?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(50), rx.message())
            .await
            .is_err()
            || server.xds.metrics().connected_clients() == 1
    );
    Ok(())
}

#[tokio::test]
async fn type_urls_per_stream_are_bounded_and_unknown_ones_answered_empty() -> Result<()> {
    let server = TestServer::start(Registry::new(2, 2).build()).await?;
    let (tx, mut rx) = open(server.channel().await?).await?;
    tx.send(subscribe(
        true,
        "type.example/Unknown",
        vec!["a".repeat(1000); 3],
    ))
    .await?;
    let answer = rx.message().await?.unwrap();
    assert_eq!(answer.type_url, "type.example/Unknown");
    assert!(answer.resources.is_empty() && answer.removed_resources.is_empty());
    for i in 0..20 {
        if tx
            .send(subscribe(false, &format!("type.example/T{i}"), vec![]))
            .await
            .is_err()
        {
            break;
        }
    }
    let status = error_of(&mut rx).await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("16 type URLs") && status.message().contains(ADDRESS_TYPE_URL),
        "{}",
        status.message()
    );
    Ok(())
}

#[tokio::test]
async fn streams_per_identity_and_address_are_bounded() -> Result<()> {
    let config = ServerConfig {
        max_streams_per_identity_and_ip: 2,
        ..Default::default()
    };
    let server = TestServer::start_with(
        std::sync::Arc::new(Pki::new()?),
        Registry::new(2, 2).build(),
        config,
        None,
    )
    .await?;
    let mut a = RawClient::subscribe(server.channel().await?, &BOTH).await?;
    a.recv_each(&BOTH).await?;
    let mut b = RawClient::subscribe(server.channel().await?, &BOTH).await?;
    b.recv_each(&BOTH).await?;
    let refused = match RawClient::subscribe(server.channel().await?, &BOTH).await {
        Err(e) => e.downcast::<Status>()?,
        Ok(mut c) => c.recv_error().await?,
    };
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("--max-streams-per-identity-and-address")
            && refused.message().contains("127.0.0.1"),
        "{}",
        refused.message()
    );
    drop(a);
    let mut c = None;
    wait_until("a closed stream gives its slot back", || {
        server.xds.metrics().connected_clients() < 2
    })
    .await?;
    for _ in 0..50 {
        if let Ok(ok) = RawClient::subscribe(server.channel().await?, &BOTH).await {
            c = Some(ok);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.expect("a slot is free again").recv_each(&BOTH).await?;
    Ok(())
}

#[tokio::test]
async fn a_reconnect_may_list_every_served_name_but_not_more() -> Result<()> {
    let config = ServerConfig {
        max_names_per_type: 3,
        ..Default::default()
    };
    let server = TestServer::start_with(
        std::sync::Arc::new(Pki::new()?),
        Registry::new(2, 2).build(),
        config,
        None,
    )
    .await?;
    let reconnect = |n: usize| {
        let held: std::collections::HashMap<String, String> = (0..n)
            .map(|i| (format!("prod/held-{i}"), "0000000000000001".to_owned()))
            .collect();
        std::collections::HashMap::from([(ADDRESS_TYPE_URL.to_owned(), held)])
    };
    // Six addresses are served: a wildcard client may say it holds twelve.
    let mut ok = RawClient::open(
        server.channel().await?,
        Auth::Token(TOKEN),
        &node_id(),
        &[ADDRESS_TYPE_URL],
        &reconnect(12),
    )
    .await?;
    let first = ok.recv().await?;
    assert_eq!(first.removed_resources.len(), 12, "what it held is gone");
    let mut over = RawClient::open(
        server.channel().await?,
        Auth::Token(TOKEN),
        &node_id(),
        &[ADDRESS_TYPE_URL],
        &reconnect(13),
    )
    .await?;
    let status = over.recv_error().await?;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("13 names"),
        "{}",
        status.message()
    );
    // Subscriptions by name are held to the bound itself.
    let (tx, mut rx) = open(server.channel().await?).await?;
    let names = (0..4).map(|i| format!("prod/svc{i}")).collect();
    tx.send(subscribe(true, ADDRESS_TYPE_URL, names)).await?;
    assert_eq!(error_of(&mut rx).await.code(), Code::ResourceExhausted);
    Ok(())
}
