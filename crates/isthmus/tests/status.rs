//! `isthmus status` through the binary: the real server, the real agent connected over mTLS,
//! and a raw discovery client that NACKs.

mod common;
use std::time::{Duration, SystemTime};

use common::*;
use isthmus_xds::pb::envoy::config::core::v3::Node;
use isthmus_xds::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use isthmus_xds::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use isthmus_xds::pb::google::rpc;
use isthmus_xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn proxies(s: &Server) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&s.ok(&["status", "-o", "json"]))
        .expect("status -o json parses")
        .as_array()
        .expect("a JSON list")
        .clone()
}

fn state_of<'a>(p: &'a serde_json::Value, url: &str) -> &'a serde_json::Value {
    p["config"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["typeUrl"] == url)
        .map_or(&serde_json::Value::Null, |c| &c["state"])
}

fn rfc3339_secs(t: &str) -> i64 {
    // Only "YYYY-MM-DDTHH:MM:SSZ" is produced; parse it without a date library.
    let n = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap();
    assert!(t.len() == 20 && t.ends_with('Z'), "{t}");
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_mesh_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let out = s.ok(&["status"]);
    assert!(
        out.to_lowercase().contains("no hosts connected"),
        "a clear line, not an empty table: {out:?}"
    );
    assert!(!out.contains("IDENTITY"), "{out}");
    assert_eq!(proxies(&s), Vec::<serde_json::Value>::new());
    let err = s.fails(&["status", "10.0.0.9"]);
    assert!(
        err.contains("no connected host matches \"10.0.0.9\""),
        "{err}"
    );
    // The route needs the admin token, like the rest of the API.
    let r = s.http().get(s.url("/api/v1/proxies")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_agent_is_listed_synced_and_disappears_when_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.ok(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    // A WorkloadGroup member: it registers a WorkloadEntry and reports its health.
    let group = "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: mysql, namespace: onprem}\nspec:\n  metadata: {labels: {app: mysql}}\n  template: {serviceAccount: db, ports: {mysql: 3306}}\n  probe: {periodSeconds: 1, tcpSocket: {port: 3306}}\n";
    assert!(s
        .cli_stdin(&["apply", "-f", "-"], Some(group))
        .status
        .success());
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_port = app.local_addr().unwrap().port().to_string();
    let host = tempfile::tempdir().unwrap();
    let certs = host.path().join("certs");
    s.ok(&["vm", "certs", "-o", certs.to_str().unwrap()]);
    let token = s.cli(&["token", "create", "-n", "onprem", "-s", "db"]);
    std::fs::write(host.path().join("token"), token.stdout).unwrap();
    let agent = Agent::start(
        &s.grpc,
        host.path(),
        &[
            "--group",
            "mysql",
            "--probe-tcp",
            &app_port,
            "--probe-period",
            "200ms",
            "--probe-failure-threshold",
            "1",
        ],
    );

    let p = wait_for(
        "the agent listed, healthy, with both types SYNCED",
        Duration::from_secs(30),
        || {
            let all = proxies(&s);
            let p = all.first()?.clone();
            (state_of(&p, ADDRESS_TYPE_URL) == "SYNCED"
                && state_of(&p, AUTHORIZATION_TYPE_URL) == "SYNCED"
                && p["health"]["healthy"] == true)
                .then_some(p)
        },
    );
    assert_eq!(proxies(&s).len(), 1);
    assert_eq!(p["identity"], "spiffe://cluster.local/ns/onprem/sa/db");
    assert_eq!(p["ip"], "127.0.0.9");
    assert_eq!(
        p["ipVerifiedBy"], "peer",
        "the agent connects from its own IP"
    );
    assert!(p["peer"].as_str().unwrap().starts_with("127.0.0.9:"), "{p}");
    assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    assert!(p["node"]
        .as_str()
        .unwrap()
        .starts_with("sidecar~127.0.0.9~"));
    assert_eq!(p["workloadEntry"], "onprem/mysql-127-0-0-9");
    for c in p["config"].as_array().unwrap() {
        assert_eq!(c["ackedVersion"], c["sentVersion"], "{c}");
        assert!(c["lastAck"].is_string(), "{c}");
    }
    // The certificate the agent connected with is the one it wrote.
    let chain = std::fs::read_to_string(certs.join("cert-chain.pem")).unwrap();
    let leaf = isthmus_ca::cert::parse_pem_certs(&chain, "cert-chain.pem").unwrap();
    let info = isthmus_ca::CertInfo::parse(&leaf[0], "leaf").unwrap();
    let not_after = info
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(rfc3339_secs(p["certExpires"].as_str().unwrap()), not_after);

    // The table, one row per host.
    let table = s.ok(&["status"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    for col in [
        "NAME",
        "IDENTITY",
        "IP",
        "VERSION",
        "HEALTH",
        "CERT-EXPIRES",
        "ADDRESSES",
        "AUTHORIZATION",
        "CONNECTED",
    ] {
        assert!(lines[0].contains(col), "{col} in {table}");
    }
    let row = lines[1];
    assert!(
        row.contains("spiffe://cluster.local/ns/onprem/sa/db"),
        "{row}"
    );
    assert!(row.contains(" 127.0.0.9 "), "{row}");
    assert!(row.contains(env!("CARGO_PKG_VERSION")), "{row}");
    assert!(
        row.contains(" in 23h ") || row.contains(" in 24h "),
        "{row}"
    );
    assert_eq!(row.matches("SYNCED").count(), 2, "{row}");
    assert!(row.contains(" HEALTHY "), "{row}");
    let wide = s.ok(&["status", "-o", "wide"]);
    assert!(
        wide.contains("PEER") && wide.contains("127.0.0.9:"),
        "{wide}"
    );
    let yaml = s.ok(&["status", "-o", "yaml"]);
    assert!(
        yaml.contains("identity: spiffe://cluster.local/ns/onprem/sa/db"),
        "{yaml}"
    );

    // One host's detail, by IP or name.
    let detail = s.ok(&["status", "127.0.0.9"]);
    assert!(
        detail.contains("Identity:       spiffe://cluster.local/ns/onprem/sa/db"),
        "{detail}"
    );
    assert!(
        detail.contains("IP:             127.0.0.9 (verified by peer)"),
        "{detail}"
    );
    assert!(detail.contains("Addresses       SYNCED"), "{detail}");
    assert!(detail.contains("Authorization   SYNCED"), "{detail}");
    assert!(detail.contains("last ACK"), "{detail}");
    assert!(
        detail.contains("WorkloadEntry:  onprem/mysql-127-0-0-9"),
        "{detail}"
    );

    // The app stops: the health the agent reports turns.
    drop(app);
    wait_for("UNHEALTHY", Duration::from_secs(30), || {
        let out = s.ok(&["status"]);
        out.contains(" UNHEALTHY ").then_some(())
    });
    let detail = s.ok(&["status", "127.0.0.9"]);
    assert!(detail.contains("Health:         UNHEALTHY"), "{detail}");
    let name = p["name"].as_str().unwrap();
    let one: serde_json::Value =
        serde_json::from_str(&s.ok(&["status", name, "-o", "json"])).unwrap();
    assert_eq!(one["node"], p["node"]);

    // It leaves: so does its entry.
    agent.stop();
    wait_for("the agent's entry to go", Duration::from_secs(20), || {
        proxies(&s).is_empty().then_some(())
    });
    assert!(s
        .ok(&["status"])
        .to_lowercase()
        .contains("no hosts connected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_nacks_shows_nacked_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.ok(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    // The client below claims 10.0.0.7 from loopback: an administrator enrolled that address
    // for its identity, which is what lets the server believe the claim.
    s.ok(&[
        "register", "mysql", "10.0.0.7", "3306", "-n", "onprem", "-s", "db",
    ]);
    let certs = tempfile::tempdir().unwrap();
    s.ok(&["vm", "certs", "-o", certs.path().to_str().unwrap()]);
    let root = std::fs::read_to_string(certs.path().join("root-cert.pem")).unwrap();
    let token = String::from_utf8(
        s.cli(&["token", "create", "-n", "onprem", "-s", "db"])
            .stdout,
    )
    .unwrap();

    let channel = Endpoint::from_shared(s.grpc.clone())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name("istiod.istio-system.svc"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "sidecar~10.0.0.7~vm-2.onprem~onprem.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: ADDRESS_TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(request)
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(20), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: first.type_url.clone(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "resource \"onprem/mysql\": rejected by the test".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .unwrap();

    let p = wait_for("NACKED", Duration::from_secs(20), || {
        let all = proxies(&s);
        let p = all.first()?.clone();
        (state_of(&p, ADDRESS_TYPE_URL) == "NACKED").then_some(p)
    });
    let address = p["config"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["typeUrl"] == ADDRESS_TYPE_URL)
        .unwrap();
    assert_eq!(
        address["nack"]["message"],
        "resource \"onprem/mysql\": rejected by the test"
    );
    assert_eq!(
        address["nack"]["version"].as_str(),
        Some(first.system_version_info.as_str())
    );
    assert!(address["ackedVersion"].is_null(), "{address}");
    assert_eq!(p["ip"], "10.0.0.7");
    assert_eq!(p["ipVerifiedBy"], "registered entry", "{p}");
    assert!(
        p["certExpires"].is_null(),
        "a join token, no certificate: {p}"
    );
    assert!(p["version"].is_null(), "{p}");

    let table = s.ok(&["status"]);
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.contains("NACKED") && row.contains("NOT SENT"),
        "{table}"
    );
    let detail = s.ok(&["status", "vm-2"]);
    assert!(
        detail.contains("rejected") && detail.contains("rejected by the test"),
        "{detail}"
    );

    drop(tx);
    drop(responses);
    wait_for("the stream's entry to go", Duration::from_secs(20), || {
        proxies(&s).is_empty().then_some(())
    });
}
