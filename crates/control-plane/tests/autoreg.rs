//! WorkloadGroup auto-registration: connect, health, disconnect with grace, restart.

use std::sync::Arc;
use std::time::Duration;

use isthmus_control_plane::autoreg::{AutoRegError, AutoRegistrar, Member};
use isthmus_control_plane::registry::Registry;
use isthmus_control_plane::replicas::{ReplicaRecord, Session, Sweeper};
use isthmus_model::{parse_documents, Health, Kind, Resource};
use isthmus_store::{MemStore, Store};

const GRACE: Duration = Duration::from_secs(10);

async fn setup(store: Arc<dyn Store>, probe: bool) -> (Registry, AutoRegistrar) {
    let reg = Registry::new(
        store,
        "10.96.0.0/12".parse().unwrap(),
        "cluster.local".into(),
    );
    let probe = if probe {
        "\n  probe: {periodSeconds: 5, tcpSocket: {port: 3306}}"
    } else {
        ""
    };
    reg.apply(
        parse_documents(&format!(
            "apiVersion: isthmus.io/v1\nkind: WorkloadGroup\nmetadata: {{name: mysql, namespace: onprem}}\nspec:\n  metadata: {{labels: {{app: mysql}}}}\n  template: {{serviceAccount: db, ports: {{mysql: 3306}}}}{probe}\n"
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let auto = replica(&reg, "r1").await;
    (reg, auto)
}

/// A replica on the registry's store: its session, the leader's sweeper, its registrar.
async fn replica(reg: &Registry, name: &str) -> AutoRegistrar {
    let session = Session::start(
        reg.store().clone(),
        name.into(),
        Duration::from_secs(10),
        ReplicaRecord::default(),
    )
    .await
    .unwrap();
    let view = isthmus_control_plane::informer::start(reg.clone())
        .await
        .unwrap();
    Sweeper::spawn(session.clone(), reg.clone(), view, GRACE);
    AutoRegistrar::new(reg.clone(), session)
}

fn member(sa: &str) -> Member {
    Member {
        namespace: "onprem".into(),
        service_account: sa.into(),
        group: "mysql".into(),
        ip: "10.0.0.7".parse().unwrap(),
    }
}

async fn entry(reg: &Registry) -> Option<isthmus_model::WorkloadEntry> {
    match reg
        .get(Kind::WorkloadEntry, "onprem", "mysql-10-0-0-7")
        .await
    {
        Ok(Resource::WorkloadEntry(w)) => Some(w),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn lifecycle_connect_health_disconnect() {
    let (reg, auto) = setup(Arc::new(MemStore::new()), true).await;
    let name = auto.connected(&member("db")).await.unwrap();
    assert_eq!(name, "mysql-10-0-0-7");
    let w = entry(&reg).await.unwrap();
    assert_eq!(w.spec.address, "10.0.0.7");
    assert_eq!(w.spec.labels.get("app").map(String::as_str), Some("mysql"));
    assert_eq!(
        w.status.health,
        Health::Unhealthy,
        "unhealthy until the first probe report"
    );
    assert!(w.status.last_seen.is_some());
    assert_eq!(
        w.metadata
            .annotations
            .get("isthmus.io/agent")
            .map(String::as_str),
        Some("true")
    );

    auto.health("onprem", &name, true, None).await.unwrap();
    assert_eq!(entry(&reg).await.unwrap().status.health, Health::Healthy);
    auto.health("onprem", &name, false, Some("connection refused".into()))
        .await
        .unwrap();
    let w = entry(&reg).await.unwrap();
    assert_eq!(
        (w.status.health, w.status.message.as_deref()),
        (Health::Unhealthy, Some("connection refused"))
    );

    // A reconnect within the grace period keeps the entry.
    auto.disconnected("onprem", &name);
    tokio::time::sleep(GRACE / 2).await;
    auto.connected(&member("db")).await.unwrap();
    tokio::time::sleep(GRACE * 2).await;
    assert!(entry(&reg).await.is_some(), "reconnected in time: kept");

    auto.disconnected("onprem", &name);
    tokio::time::sleep(GRACE - Duration::from_secs(1)).await;
    assert!(entry(&reg).await.is_some(), "still within the grace period");
    // The leader looks every grace/10: gone within two looks after the grace period.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::yield_now().await;
    let gone = async {
        for _ in 0..100 {
            if entry(&reg).await.is_none() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        false
    };
    assert!(gone.await, "removed after the grace period");
}

#[tokio::test(start_paused = true)]
async fn wrong_identity_or_missing_group_is_refused() {
    let (reg, auto) = setup(Arc::new(MemStore::new()), false).await;
    let err = auto.connected(&member("web")).await.unwrap_err();
    assert!(matches!(err, AutoRegError::WrongIdentity { .. }));
    assert_eq!(
        err.to_string(),
        "identity ns/onprem/sa/web may not join WorkloadGroup onprem/mysql: the group's workloads run as ns/onprem/sa/db"
    );
    let mut m = member("db");
    m.group = "nope".into();
    assert!(auto
        .connected(&m)
        .await
        .unwrap_err()
        .to_string()
        .contains("WorkloadGroup onprem/nope not found"));
    assert!(entry(&reg).await.is_none());
}

/// After a control-plane restart the entry is neither lost nor duplicated: the agent that
/// reconnects finds its entry; one that does not come back is removed after the grace period.
#[tokio::test(start_paused = true)]
async fn restart_adopts_entries() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (reg, auto) = setup(store.clone(), false).await;
    auto.connected(&member("db")).await.unwrap();
    let mut other = member("db");
    other.ip = "10.0.0.8".parse().unwrap();
    auto.connected(&other).await.unwrap();
    drop(auto);

    // "Restart": a new registrar over the same store.
    let auto = replica(&reg, "r1").await;
    assert_eq!(auto.adopt_existing().await.unwrap(), 2);
    auto.connected(&member("db")).await.unwrap();
    tokio::time::sleep(GRACE * 2).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    let (entries, _) = reg
        .list(&isthmus_control_plane::registry::Filter {
            kind: Some(Kind::WorkloadEntry),
            ..Default::default()
        })
        .await
        .unwrap();
    let names: Vec<_> = entries.iter().map(|r| r.meta().name.clone()).collect();
    assert_eq!(
        names,
        ["mysql-10-0-0-7"],
        "the returning agent's entry stays, once; the other is gone"
    );
}

/// Two replicas on one store: the agent leaves replica 1 and reconnects through replica 2 within
/// the grace period. The leader's removal finds the agent live through replica 2 and keeps the
/// entry; once the agent leaves replica 2 too, the entry goes.
#[tokio::test(start_paused = true)]
async fn a_reconnect_through_another_replica_keeps_the_entry() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (reg, one) = setup(store.clone(), false).await;
    let two = replica(&reg, "r2").await;
    let name = one.connected(&member("db")).await.unwrap();
    one.disconnected("onprem", &name);
    tokio::time::sleep(GRACE / 2).await;
    two.connected(&member("db")).await.unwrap();
    tokio::time::sleep(GRACE * 2).await;
    assert!(
        entry(&reg).await.is_some(),
        "replica 1 removed an entry whose agent is connected through replica 2"
    );
    let (live, _) = store.range("/autoreg-live/").await.unwrap();
    let keys: Vec<&str> = live.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/autoreg-live/onprem/mysql-10-0-0-7/r2"]);

    two.disconnected("onprem", &name);
    tokio::time::sleep(GRACE * 2).await;
    assert!(entry(&reg).await.is_none(), "the entry outlived its agent");
    assert!(store.range("/autoreg-live/").await.unwrap().0.is_empty());
}
