//! Registry semantics on the in-memory store: VIP allocation, concurrency, watch filtering.

use std::sync::Arc;

use futures::StreamExt;
use isthmus_control_plane::registry::*;
use isthmus_model::{parse_documents, Kind, LabelSelector, Resource};
use isthmus_store::{MemStore, Store};

fn registry(cidr: &str) -> Registry {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    Registry::new(store, cidr.parse().unwrap(), "cluster.local".into())
}

fn svc(name: &str) -> Resource {
    parse_documents(&format!(
        "apiVersion: isthmus.io/v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"
    ))
    .unwrap()
    .remove(0)
}

fn vip(r: &Resource) -> std::net::IpAddr {
    match r {
        Resource::Service(s) => s.status.vip.unwrap(),
        _ => panic!("not a service"),
    }
}

#[tokio::test]
async fn vips_are_exhausted_then_released_on_delete() {
    // A /30 has two usable addresses.
    let reg = registry("192.168.255.0/30");
    reg.apply(vec![svc("a"), svc("b")]).await.unwrap();
    let a = vip(&reg.get(Kind::Service, "ns", "a").await.unwrap());
    let b = vip(&reg.get(Kind::Service, "ns", "b").await.unwrap());
    assert_ne!(a, b);
    for ip in [a, b] {
        assert!(
            ip.to_string() == "192.168.255.1" || ip.to_string() == "192.168.255.2",
            "{ip}"
        );
    }
    let err = reg.apply(vec![svc("c")]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "no free virtual IP left in the service CIDR 192.168.255.0/30; widen it with --service-cidr"
    );
    assert!(
        reg.get(Kind::Service, "ns", "c").await.is_err(),
        "nothing written"
    );
    reg.delete(Kind::Service, "ns", "a").await.unwrap();
    reg.apply(vec![svc("c")]).await.unwrap();
    assert_eq!(
        vip(&reg.get(Kind::Service, "ns", "c").await.unwrap()),
        a,
        "a's released VIP is reused"
    );
}

#[tokio::test]
async fn concurrent_registrations_lose_nothing() {
    let reg = registry("10.96.0.0/12");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            reg.register(RegisterRequest {
                service: "shared".into(),
                namespace: "ns".into(),
                ip: format!("10.0.0.{i}"),
                // Each registration adds its own port to the shared service.
                ports: vec![format!("p{i}:{}", 1000 + i)],
                ..Default::default()
            })
            .await
        }));
    }
    let mut created = 0;
    for t in tasks {
        if t.await.unwrap().unwrap().service == Action::Created {
            created += 1;
        }
    }
    assert_eq!(created, 1, "the service is created exactly once");
    let Resource::Service(s) = reg.get(Kind::Service, "ns", "shared").await.unwrap() else {
        panic!()
    };
    assert_eq!(
        s.spec.ports.len(),
        40,
        "no port added by a concurrent register was lost"
    );
    let (entries, _) = reg
        .list(&Filter {
            kind: Some(Kind::WorkloadEntry),
            namespace: Some("ns".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(entries.len(), 40);
}

#[tokio::test]
async fn watch_with_selector_reports_objects_leaving_and_entering_it() {
    let reg = registry("10.96.0.0/12");
    let filter = Filter {
        kind: Some(Kind::WorkloadEntry),
        namespace: None,
        selector: LabelSelector::parse("app=web").unwrap(),
    };
    let mut events = Box::pin(reg.watch(filter, None).await.unwrap());
    let entry = |labels: &str| {
        parse_documents(&format!(
            "apiVersion: isthmus.io/v1\nkind: WorkloadEntry\nmetadata: {{name: vm, namespace: ns}}\nspec: {{address: 10.0.0.1, labels: {{{labels}}}}}\n"
        ))
        .unwrap()
    };
    reg.apply(entry("app: db")).await.unwrap(); // not selected: no event
    reg.apply(entry("app: web")).await.unwrap(); // enters the selection
    reg.apply(entry("app: web, v: '2'")).await.unwrap(); // changes inside it
    reg.apply(entry("app: db")).await.unwrap(); // leaves it
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        kinds.push(ev.kind);
    }
    assert_eq!(
        kinds,
        [
            WatchEventType::Added,
            WatchEventType::Modified,
            WatchEventType::Deleted
        ]
    );
}

#[tokio::test]
async fn deregister_keeps_services_it_did_not_create() {
    let reg = registry("10.96.0.0/12");
    reg.apply(vec![svc("web")]).await.unwrap();
    let r = reg
        .register(RegisterRequest {
            service: "web".into(),
            namespace: "ns".into(),
            ip: "10.0.0.9".into(),
            ports: vec!["80".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        r.service,
        Action::Unchanged,
        "port 80 already exists as http"
    );
    let d = reg
        .deregister(DeregisterRequest {
            service: "web".into(),
            namespace: "ns".into(),
            ip: "10.0.0.9".into(),
        })
        .await
        .unwrap();
    assert!(!d.service_deleted);
    assert!(reg.get(Kind::Service, "ns", "web").await.is_ok());
}

#[tokio::test]
async fn a_full_range_is_used_to_the_last_address() {
    // 254 usable addresses; the later allocations need the scan past the point-lookup probes.
    let reg = registry("10.200.0.0/24");
    reg.apply((0..200).map(|i| svc(&format!("s{i}"))).collect())
        .await
        .unwrap();
    for i in 200..254 {
        reg.apply(vec![svc(&format!("s{i}"))]).await.unwrap();
    }
    let (all, _) = reg
        .list(&Filter {
            kind: Some(Kind::Service),
            ..Default::default()
        })
        .await
        .unwrap();
    let vips: std::collections::HashSet<_> = all.iter().map(vip).collect();
    assert_eq!(vips.len(), 254, "every service has its own VIP");
    assert!(!vips
        .iter()
        .any(|v| v.to_string() == "10.200.0.0" || v.to_string() == "10.200.0.255"));
    assert!(matches!(
        reg.apply(vec![svc("one-too-many")]).await,
        Err(RegistryError::VipExhausted(_))
    ));
}

/// A store whose `get` answers from a snapshot taken earlier, as an etcd member can answer a
/// linearizable read from behind (etcd-io/etcd#20418); everything else is the real store.
struct StaleReads {
    inner: MemStore,
    frozen: std::sync::Mutex<Option<std::collections::HashMap<String, isthmus_store::KeyValue>>>,
}

impl StaleReads {
    /// From now on `get` answers what the store holds at this moment.
    async fn freeze(&self) {
        let (kvs, _) = self.inner.range("/").await.unwrap();
        *self.frozen.lock().unwrap() =
            Some(kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect());
    }
}

#[async_trait::async_trait]
impl Store for StaleReads {
    fn revision(&self) -> isthmus_store::Revision {
        self.inner.revision()
    }
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<isthmus_store::KeyValue>, isthmus_store::StoreError> {
        let frozen = self
            .frozen
            .lock()
            .unwrap()
            .as_ref()
            .map(|m| m.get(key).cloned());
        match frozen {
            Some(stale) => Ok(stale),
            None => self.inner.get(key).await,
        }
    }
    async fn range(
        &self,
        prefix: &str,
    ) -> Result<(Vec<isthmus_store::KeyValue>, isthmus_store::Revision), isthmus_store::StoreError>
    {
        self.inner.range(prefix).await
    }
    async fn txn(
        &self,
        txn: isthmus_store::Txn,
    ) -> Result<isthmus_store::TxnOutcome, isthmus_store::StoreError> {
        self.inner.txn(txn).await
    }
    async fn watch(
        &self,
        prefix: &str,
        from: isthmus_store::Revision,
    ) -> Result<isthmus_store::WatchStream, isthmus_store::StoreError> {
        self.inner.watch(prefix, from).await
    }
    async fn compact(
        &self,
        revision: isthmus_store::Revision,
    ) -> Result<(), isthmus_store::StoreError> {
        self.inner.compact(revision).await
    }
    fn oldest_revision(&self) -> isthmus_store::Revision {
        self.inner.oldest_revision()
    }
}

/// A registration that finds its service and entry as they are, and writes nothing, is still
/// confirmed by a transaction (its compares go through the store's log): when its reads came
/// from before a delete, it is refused (the service is gone), never reported as registered.
/// Before, such a registration answered "unchanged" with the deleted service's VIP: the chaos
/// test's lost registration.
#[tokio::test]
async fn an_unchanged_registration_read_from_behind_is_not_reported_as_done() {
    let store = Arc::new(StaleReads {
        inner: MemStore::new(),
        frozen: std::sync::Mutex::new(None),
    });
    let dyn_store: Arc<dyn Store> = store.clone();
    let reg = Registry::new(
        dyn_store,
        "10.96.0.0/16".parse().unwrap(),
        "cluster.local".into(),
    );
    let req = || RegisterRequest {
        service: "mysql".into(),
        namespace: "onprem".into(),
        ip: "10.0.0.5".into(),
        ports: vec!["3306".into()],
        ..Default::default()
    };
    reg.register(req()).await.unwrap();
    store.freeze().await;
    reg.delete(Kind::Service, "onprem", "mysql").await.unwrap();
    match reg.register(req()).await {
        Ok(r) => {
            // Reported registered: then the service must exist.
            let svc = store
                .inner
                .get(&Kind::Service.key("onprem", "mysql"))
                .await
                .unwrap();
            assert!(
                svc.is_some(),
                "register answered {:?} for a service that does not exist",
                r.service
            );
        }
        Err(e) => assert!(
            e.to_string().contains("busy") || e.to_string().contains("again"),
            "{e}"
        ),
    }
}
