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
