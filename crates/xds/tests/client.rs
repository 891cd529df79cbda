//! The agent's subscriber against the real server over gRPC and TLS on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::*;
use isthmus_model::Health;
use isthmus_xds::client::{load_cache, Origin, Tunnel};
use isthmus_xds::pb::istio::workload as wl;
use isthmus_xds::{
    ClientConfig, ClientError, ClientStatus, EndpointConnector, ServerConfig, XdsClient,
    ADDRESS_TYPE_URL,
};
use tonic::Code;

fn config(cache: Option<std::path::PathBuf>) -> ClientConfig {
    let mut c = ClientConfig::new(node_id());
    c.node_metadata.insert("NAMESPACE".into(), NS.into());
    c.cache_path = cache;
    c.cache_interval = Duration::from_millis(20);
    c.backoff_initial = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c
}

fn client(
    server: &TestServer,
    cache: Option<std::path::PathBuf>,
    token: &str,
) -> Result<XdsClient> {
    let connector = EndpointConnector::new(server.endpoint()?).with_bearer_token(token);
    Ok(XdsClient::new(config(cache), Arc::new(connector)))
}

#[tokio::test]
async fn receives_indexes_and_follows_the_registry() -> Result<()> {
    let mut reg = Registry::new(2, 2);
    reg.entries[0]
        .metadata
        .annotations
        .insert("isthmus.io/agent".into(), "true".into());
    let server = TestServer::start(reg.build()).await?;
    let c = client(&server, None, TOKEN)?;
    let state = c.state();
    let mut ready = c.ready();
    assert!(!ready.is_ready());
    let task = tokio::spawn(c.run());
    tokio::time::timeout(WAIT, ready.wait()).await?;

    let s = state.borrow().clone();
    assert_eq!(s.origin(), Origin::Server);
    let svc = s
        .service_by_vip(SocketAddr::from(([10, 96, 0, 1], 80)))
        .expect("svc0 by VIP:port");
    assert_eq!(svc.hostname, "svc0.prod.svc.cluster.local");
    assert!(s
        .service_by_vip(SocketAddr::from(([10, 96, 0, 1], 81)))
        .is_none());
    assert_eq!(
        s.service_by_hostname("svc1.prod.svc.cluster.local")
            .unwrap()
            .name,
        "svc1"
    );
    let w = s
        .workload_by_address("10.1.0.1".parse()?)
        .expect("workload by address");
    assert_eq!(w.uid, uid("svc0-0"));
    assert_eq!(w.tunnel, Tunnel::Hbone);
    assert_eq!(s.workload(&uid("svc0-1")).unwrap().tunnel, Tunnel::None);
    assert_eq!(
        w.identity().to_string(),
        "spiffe://cluster.local/ns/prod/sa/sa"
    );
    let eps: Vec<&str> = s
        .endpoints("prod/svc0.prod.svc.cluster.local")
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(eps, vec!["svc0-0", "svc0-1"]);

    reg.entries[1].status.health = Health::Unhealthy;
    reg.entries.remove(3);
    server.publish(reg.build());
    wait_until("the change arrives", || {
        let s = state.borrow();
        s.workload(&uid("svc1-1")).is_none()
            && s.workload(&uid("svc0-1")).map(|w| w.health)
                == Some(isthmus_xds::client::Health::Unhealthy)
    })
    .await
    .map_err(|e| {
        let s = state.borrow();
        let mut w: Vec<_> = s.workloads().map(|w| (w.uid.clone(), w.health)).collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        anyhow::anyhow!("{e}: have {w:?}")
    })?;
    assert_eq!(
        state
            .borrow()
            .endpoints("prod/svc1.prod.svc.cluster.local")
            .len(),
        1
    );
    task.abort();
    Ok(())
}

#[tokio::test]
async fn persists_state_serves_it_while_the_server_is_down_and_catches_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("xds").join("state.pb");
    let mut reg = Registry::new(3, 3);
    let mut server = TestServer::start(reg.build()).await?;
    let c = client(&server, Some(cache.clone()), TOKEN)?;
    let mut ready = c.ready();
    let state = c.state();
    let task = tokio::spawn(c.run());
    tokio::time::timeout(WAIT, ready.wait()).await?;
    let expected = state.borrow().versions(ADDRESS_TYPE_URL);
    assert_eq!(expected.len(), 12);
    wait_until("the cache is written", || {
        load_cache(&cache)
            .ok()
            .flatten()
            .is_some_and(|s| s.versions(ADDRESS_TYPE_URL) == expected)
    })
    .await?;
    task.abort();
    server.stop().await;

    // The agent restarts while the control plane is down: it serves the cached state.
    let c = client(&server, Some(cache.clone()), TOKEN)?;
    let state = c.state();
    let ready = c.ready();
    let mut status = c.status();
    assert_eq!(state.borrow().origin(), Origin::Cache);
    assert_eq!(state.borrow().versions(ADDRESS_TYPE_URL), expected);
    assert!(state
        .borrow()
        .service_by_hostname("svc2.prod.svc.cluster.local")
        .is_some());
    let task = tokio::spawn(c.run());
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| matches!(s, ClientStatus::Backoff { .. })),
    )
    .await??;
    assert!(!ready.is_ready(), "not ready on a cache alone");
    assert_eq!(
        state.borrow().origin(),
        Origin::Cache,
        "state kept while unreachable"
    );

    // The control plane comes back with one change: only that is sent.
    reg.entries[4].status.health = Health::Unhealthy;
    server.publish(reg.build());
    let sent_before = server.xds.metrics().pushes(ADDRESS_TYPE_URL);
    server.serve().await?;
    let mut ready = ready;
    tokio::time::timeout(WAIT, ready.wait()).await?;
    wait_until("the difference is applied", || {
        state.borrow().versions(ADDRESS_TYPE_URL)
            == server
                .current()
                .versions(ADDRESS_TYPE_URL)
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect()
    })
    .await?;
    assert_eq!(state.borrow().origin(), Origin::Server);
    assert_eq!(
        server.xds.metrics().pushes(ADDRESS_TYPE_URL),
        sent_before + 1
    );
    assert_eq!(
        server.xds.metrics().resources_sent(ADDRESS_TYPE_URL),
        12 + 1,
        "the full state once, then only the changed workload"
    );
    task.abort();
    Ok(())
}

#[tokio::test]
async fn rejects_a_bad_resource_by_name_and_keeps_the_rest() -> Result<()> {
    let reg = Registry::new(1, 2);
    let mut set = reg.build();
    let bad = wl::Address {
        r#type: Some(wl::address::Type::Workload(wl::Workload {
            uid: "bad-one".into(),
            name: "bad-one".into(),
            namespace: NS.into(),
            addresses: vec![vec![1, 2, 3, 4, 5]],
            ..Default::default()
        })),
    };
    set.insert(ADDRESS_TYPE_URL, "bad-one", &bad);
    let server = TestServer::start(set).await?;
    let c = client(&server, None, TOKEN)?;
    let state = c.state();
    let mut ready = c.ready();
    let task = tokio::spawn(c.run());
    tokio::time::timeout(WAIT, ready.wait()).await?;
    wait_until("the NACK", || {
        server.xds.metrics().nacks(ADDRESS_TYPE_URL) == 1
    })
    .await?;
    let s = state.borrow().clone();
    assert!(s.workload("bad-one").is_none());
    assert_eq!(s.workloads().count(), 2);
    assert_eq!(s.services().count(), 1);

    // Later changes still flow, and the bad resource is not pushed again meanwhile.
    let mut reg = reg;
    reg.entries[0].status.health = Health::Unhealthy;
    let mut set = reg.build();
    set.insert(ADDRESS_TYPE_URL, "bad-one", &bad);
    server.publish(set);
    wait_until("the change arrives", || {
        state.borrow().workload(&uid("svc0-0")).map(|w| w.health)
            == Some(isthmus_xds::client::Health::Unhealthy)
    })
    .await?;
    assert_eq!(server.xds.metrics().nacks(ADDRESS_TYPE_URL), 1);
    task.abort();
    Ok(())
}

#[tokio::test]
async fn stops_on_unauthenticated_and_says_why() -> Result<()> {
    let server = TestServer::start(Registry::new(1, 1).build()).await?;
    let c = client(&server, None, "wrong")?;
    let status = c.status();
    let result = tokio::time::timeout(WAIT, c.run()).await?;
    let Err(ClientError::Refused { code, message }) = result else {
        panic!("expected a refusal, got {result:?}");
    };
    assert_eq!(code, Code::Unauthenticated);
    assert!(message.contains("token not recognised"), "{message}");
    assert!(matches!(&*status.borrow(), ClientStatus::Failed(m) if m.contains("Unauthenticated")));
    Ok(())
}

#[tokio::test]
async fn reconnects_when_the_server_ends_streams() -> Result<()> {
    // The control plane restarts three times; each time the client reconnects on its own
    // and picks up what changed while it was away.
    let mut reg = Registry::new(1, 1);
    let mut server = TestServer::start_with(
        Arc::new(Pki::new()?),
        reg.build(),
        ServerConfig::default(),
        None,
    )
    .await?;
    let c = client(&server, None, TOKEN)?;
    let state = c.state();
    let mut ready = c.ready();
    let task = tokio::spawn(c.run());
    tokio::time::timeout(WAIT, ready.wait()).await?;
    for round in 0..3 {
        server.stop().await;
        reg.entries.push(entry(
            NS,
            &format!("late-{round}"),
            &format!("10.200.0.{}", round + 1),
            "svc0",
        ));
        server.publish(reg.build());
        server.serve().await?;
        wait_until("the new entry after reconnecting", || {
            state
                .borrow()
                .workload(&uid(&format!("late-{round}")))
                .is_some()
        })
        .await?;
    }
    task.abort();
    Ok(())
}

#[tokio::test]
async fn authorization_policies_flow_through_the_same_machinery() -> Result<()> {
    use isthmus_xds::pb::istio::security as sec;
    use isthmus_xds::AUTHORIZATION_TYPE_URL;
    let reg = Registry::new(1, 1);
    let server = TestServer::start(reg.build()).await?;
    let c = client(&server, None, TOKEN)?;
    let state = c.state();
    let mut ready = c.ready();
    let task = tokio::spawn(c.run());
    tokio::time::timeout(WAIT, ready.wait()).await?;
    assert_eq!(state.borrow().authorizations().count(), 0);

    let mut set = reg.build();
    let policy = sec::Authorization {
        name: "deny-dev".into(),
        namespace: NS.into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    namespaces: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact("dev".into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    };
    set.insert(AUTHORIZATION_TYPE_URL, "prod/deny-dev", &policy);
    server.publish(set);
    wait_until("the policy arrives", || {
        state.borrow().authorization("prod/deny-dev").is_some()
    })
    .await?;
    assert_eq!(
        **state.borrow().authorization("prod/deny-dev").unwrap(),
        policy
    );

    server.publish(reg.build());
    wait_until("the policy is removed", || {
        state.borrow().authorizations().count() == 0
    })
    .await?;
    task.abort();
    Ok(())
}

/// Counts the rebalances the client asks of its connector.
struct Rebalancing {
    inner: EndpointConnector,
    rebalances: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl isthmus_xds::client::Connect for Rebalancing {
    async fn connect(
        &self,
    ) -> std::result::Result<tonic::transport::Channel, isthmus_xds::client::ConnectError> {
        self.inner.connect().await
    }
    fn metadata(
        &self,
    ) -> std::result::Result<tonic::metadata::MetadataMap, isthmus_xds::client::ConnectError> {
        self.inner.metadata()
    }
    fn rebalance(&self) {
        self.rebalances
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A stream at its maximum age is closed with UNAVAILABLE and the rebalance message, within
/// 10% of the age; the client reconnects at once (no backoff), asking its connector for
/// another replica, and stays served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_at_their_maximum_age_and_the_client_reconnects_elsewhere() -> Result<()> {
    let age = Duration::from_millis(400);
    let server = TestServer::start_with(
        Arc::new(Pki::new()?),
        Registry::new(1, 1).build(),
        ServerConfig {
            max_stream_age: Some(age),
            ..Default::default()
        },
        None,
    )
    .await?;

    // A raw stream: closed with the message, between 90% and 110% of the age (plus slack).
    let mut raw = RawClient::subscribe(server.channel().await?, &[ADDRESS_TYPE_URL]).await?;
    let opened = std::time::Instant::now();
    let status = loop {
        match tokio::time::timeout(WAIT, raw.rx.message()).await? {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("closed without a status"),
            Err(status) => break status,
        }
    };
    let lived = opened.elapsed();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), isthmus_xds::REBALANCE_MESSAGE);
    assert!(
        lived >= age.mul_f64(0.85) && lived < age.mul_f64(1.1) + Duration::from_millis(300),
        "lived {lived:?} with a maximum age of {age:?}"
    );

    // The client: three rebalances within ~4 ages, each followed by a served stream.
    let rebalances = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let connector = Rebalancing {
        inner: EndpointConnector::new(server.endpoint()?).with_bearer_token(TOKEN),
        rebalances: rebalances.clone(),
    };
    let c = XdsClient::new(config(None), Arc::new(connector));
    let mut status = c.status();
    let task = tokio::spawn(c.run());
    let deadline = std::time::Instant::now() + age * 4 + Duration::from_secs(2);
    while rebalances.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(std::time::Instant::now() < deadline, "no rebalance");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !matches!(*status.borrow_and_update(), ClientStatus::Backoff { .. }),
            "a maximum-age close is not a failure to back off from"
        );
    }
    task.abort();
    Ok(())
}
