//! The whole agent through the binary: certificate, discovery over mTLS, the DNS proxy,
//! auto-registration with a health probe, the config dump, readiness — and the DNS proxy
//! answering from its saved state with the control plane gone.

mod common;
use std::process::Command;
use std::time::Duration;

use common::*;

fn dig_short(dns: &str, name: &str) -> String {
    let (ip, port) = dns.rsplit_once(':').unwrap();
    let out = Command::new("dig")
        .args([
            &format!("@{ip}"),
            "-p",
            port,
            "+short",
            "+tries=1",
            "+time=2",
            name,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_joins_resolves_registers_and_survives_the_control_plane() {
    if Command::new("dig").arg("-v").output().is_err() {
        eprintln!("!!!! SKIP: dig not installed (scripts/setup.sh installs dnsutils) !!!!");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = stable_port();
    let grpc = format!("127.0.0.1:{port}");
    let mut s =
        Server::start_with_grpc(dir.path(), &["--grpc-addr", &grpc, "--autoreg-grace", "2s"]);
    s.ok(&[
        "register",
        "reviews",
        "10.0.1.10",
        "http:9080",
        "-n",
        "bookinfo",
    ]);
    s.ok(&[
        "register",
        "mysql-primary",
        "10.0.2.10",
        "3306",
        "-n",
        "onprem",
    ]);
    let group = "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: mysql, namespace: onprem}\nspec:\n  metadata: {labels: {app: mysql}}\n  template: {serviceAccount: db, ports: {mysql: 3306}}\n  probe: {periodSeconds: 1, tcpSocket: {port: 3306}}\n";
    assert!(s
        .cli_stdin(&["apply", "-f", "-"], Some(group))
        .status
        .success());

    let host = tempfile::tempdir().unwrap();
    s.ok(&[
        "vm",
        "certs",
        "-o",
        host.path().join("certs").to_str().unwrap(),
    ]);
    let token = s.cli(&["token", "create", "-n", "onprem", "-s", "db", "--uses", "1"]);
    std::fs::write(host.path().join("token"), token.stdout).unwrap();

    // The local app the probe checks.
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_port = app.local_addr().unwrap().port().to_string();
    let ca_addr = format!("https://{grpc}");
    let agent = Agent::start(
        &ca_addr,
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
    let dns = agent.endpoints["dns"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let ready_url = format!(
        "{}/healthz/ready",
        agent.endpoints["readiness"].as_str().unwrap()
    );
    wait_for("readiness", Duration::from_secs(30), || {
        let r = futures_block(http.get(&ready_url).send());
        r.ok().filter(|r| r.status() == 200).map(drop)
    });

    // Mesh names resolve through the agent, also by search domain from its namespace. The
    // control plane publishes registry changes debounced (up to a second apart under writes),
    // so the second registration may reach the agent just after its first full state.
    let reviews_vip = vip(&s, "reviews", "bookinfo");
    let mysql_vip = vip(&s, "mysql-primary", "onprem");
    wait_for(
        "both registrations at the agent",
        Duration::from_secs(5),
        || (dig_short(&dns, "mysql-primary") == mysql_vip).then_some(()),
    );
    assert_eq!(
        dig_short(&dns, "reviews.bookinfo.svc.cluster.local"),
        reviews_vip
    );
    assert_eq!(
        dig_short(&dns, "mysql-primary"),
        mysql_vip,
        "short name from the host's namespace"
    );
    assert_eq!(dig_short(&dns, "reviews.bookinfo"), reviews_vip);

    // Registered itself from the group, healthy while the app answers.
    let healthy = wait_for(
        "a HEALTHY auto-registered entry",
        Duration::from_secs(30),
        || {
            s.ok(&["get", "workloads", "-n", "onprem"])
                .lines()
                .find(|l| l.starts_with("mysql-127-0-0-9") && l.contains("HEALTHY"))
                .map(str::to_string)
        },
    );
    assert!(healthy.contains("db"), "{healthy}");
    drop(app);
    wait_for(
        "UNHEALTHY once the app stops",
        Duration::from_secs(30),
        || {
            s.ok(&["get", "workloads", "-n", "onprem"])
                .lines()
                .find(|l| l.starts_with("mysql-127-0-0-9") && l.contains("UNHEALTHY"))
                .map(drop)
        },
    );

    // A new registration flows to the host.
    s.ok(&[
        "register",
        "ratings",
        "10.0.1.20",
        "http:9080",
        "-n",
        "bookinfo",
    ]);
    let ratings_vip = vip(&s, "ratings", "bookinfo");
    wait_for(
        "ratings in the agent's DNS",
        Duration::from_secs(20),
        || (dig_short(&dns, "ratings.bookinfo.svc.cluster.local") == ratings_vip).then_some(()),
    );
    let dump: serde_json::Value = http
        .get(format!(
            "{}/config_dump",
            agent.endpoints["admin"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        dump["identity"]["spiffeId"],
        "spiffe://cluster.local/ns/onprem/sa/db"
    );
    assert!(dump["discovery"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["hostname"] == "ratings.bookinfo.svc.cluster.local"));

    // A control-plane restart neither loses nor duplicates the auto-registered entry: the agent
    // reconnects within the grace period and its entry is refreshed, once.
    let seen_before = entry_json(&s)["status"]["lastSeen"].clone();
    assert!(s.term().success());
    s = Server::start_with_grpc(dir.path(), &["--grpc-addr", &grpc, "--autoreg-grace", "2s"]);
    wait_for(
        "the agent to reconnect and refresh its entry",
        Duration::from_secs(30),
        || {
            let v = entry_json(&s);
            (v["status"]["lastSeen"] != seen_before).then_some(())
        },
    );
    let entries = s.ok(&["get", "workloads", "-n", "onprem"]);
    assert_eq!(
        entries.lines().filter(|l| l.contains("127.0.0.9")).count(),
        1,
        "{entries}"
    );

    // The control plane goes away: the agent keeps answering; restarted, it answers from disk.
    s.kill9();
    assert_eq!(
        dig_short(&dns, "ratings.bookinfo.svc.cluster.local"),
        ratings_vip
    );
    agent.stop();
    let agent = Agent::start(&ca_addr, host.path(), &[]);
    let dns = agent.endpoints["dns"].as_str().unwrap().to_string();
    assert_eq!(
        dig_short(&dns, "ratings.bookinfo.svc.cluster.local"),
        ratings_vip,
        "answered from the saved state"
    );
    let ready = format!(
        "{}/healthz/ready",
        agent.endpoints["readiness"].as_str().unwrap()
    );
    assert_eq!(
        http.get(&ready).send().await.unwrap().status(),
        503,
        "not ready without the control plane's first state"
    );
}

fn entry_json(s: &Server) -> serde_json::Value {
    serde_json::from_str(&s.ok(&["get", "we", "mysql-127-0-0-9", "-n", "onprem", "-o", "json"]))
        .unwrap()
}

fn vip(s: &Server, name: &str, ns: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "svc", name, "-n", ns, "-o", "json"])).unwrap();
    v["status"]["vip"].as_str().unwrap().to_string()
}

/// Runs a future to completion from sync code inside the multi-thread test runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
