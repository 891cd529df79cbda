//! Discovery end to end: the real server on its gRPC/TLS port, the real agent-side client,
//! a join token to authenticate; auto-registration of a WorkloadGroup member.

mod common;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use isthmus_xds::{node_id, ClientConfig, EndpointConnector, State, XdsClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn client(
    s: &Server,
    root_pem: &str,
    token: Option<&str>,
    ns: &str,
    sa: &str,
    group: Option<&str>,
) -> XdsClient {
    client_at(s, "127.0.0.9", root_pem, token, ns, sa, group)
}

/// A discovery client for the host at `ip` (its node id's IP), connecting from `ip` (a
/// loopback address) as a real agent on that host would, so the server believes the claim.
fn client_at(
    s: &Server,
    ip: &str,
    root_pem: &str,
    token: Option<&str>,
    ns: &str,
    sa: &str,
    group: Option<&str>,
) -> XdsClient {
    discovery_client(s, ip, Some(ip), root_pem, token, ns, sa, group)
}

/// A discovery client whose node id claims `claim` while it connects from wherever the kernel
/// picks (127.0.0.1): what a client speaking for another host's address looks like.
fn client_claiming(
    s: &Server,
    claim: &str,
    root_pem: &str,
    token: Option<&str>,
    ns: &str,
    sa: &str,
    group: Option<&str>,
) -> XdsClient {
    discovery_client(s, claim, None, root_pem, token, ns, sa, group)
}

#[allow(clippy::too_many_arguments)]
fn discovery_client(
    s: &Server,
    ip: &str,
    source: Option<&str>,
    root_pem: &str,
    token: Option<&str>,
    ns: &str,
    sa: &str,
    group: Option<&str>,
) -> XdsClient {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name("istiod.istio-system.svc");
    let endpoint = Endpoint::from_shared(s.grpc.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let mut conn = EndpointConnector::new(endpoint);
    if let Some(src) = source {
        conn = conn.with_source(src.parse().unwrap());
    }
    if let Some(t) = token {
        conn = conn.with_bearer_token(t);
    }
    let mut cfg = ClientConfig::new(node_id(ip, "vm-1", ns, "cluster.local"));
    cfg.node_metadata.insert("NAMESPACE".into(), ns.into());
    cfg.node_metadata
        .insert("SERVICE_ACCOUNT".into(), sa.into());
    if let Some(g) = group {
        cfg.node_metadata
            .insert("AUTO_REGISTER_GROUP".into(), g.into());
    }
    cfg.backoff_max = Duration::from_millis(500);
    XdsClient::new(cfg, Arc::new(conn))
}

fn token(s: &Server, ns: &str, sa: &str) -> String {
    String::from_utf8(s.cli(&["token", "create", "-n", ns, "-s", sa]).stdout)
        .unwrap()
        .trim()
        .to_string()
}

fn root(s: &Server) -> String {
    let dir = tempfile::tempdir().unwrap();
    s.ok(&["vm", "certs", "-o", dir.path().to_str().unwrap()]);
    std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap()
}

async fn wait_state(
    rx: &mut tokio::sync::watch::Receiver<Arc<State>>,
    what: &str,
    f: impl Fn(&State) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_changes_reach_a_subscribed_host() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.ok(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    let vip: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "svc", "mysql", "-n", "onprem", "-o", "json"]))
            .unwrap();
    let vip: std::net::IpAddr = vip["status"]["vip"].as_str().unwrap().parse().unwrap();

    let c = client(
        &s,
        &root(&s),
        Some(&token(&s, "onprem", "db")),
        "onprem",
        "db",
        None,
    );
    let mut state = c.state();
    let mut ready = c.ready();
    let task = tokio::spawn(c.run());
    tokio::time::timeout(Duration::from_secs(20), ready.wait())
        .await
        .expect("ready after the first full state");
    let host = "mysql.onprem.svc.cluster.local";
    wait_state(&mut state, "the mysql service", |st| {
        st.service_by_hostname(host).is_some()
    })
    .await;
    {
        let st = state.borrow();
        let svc = st.service_by_hostname(host).unwrap();
        assert!(svc.vips.iter().any(|(_, ip)| *ip == vip), "{svc:?}");
        assert!(st
            .service_by_vip(std::net::SocketAddr::new(vip, 3306))
            .is_some());
        let ep = st
            .workload_by_address("10.0.0.5".parse().unwrap())
            .expect("the registered endpoint");
        assert_eq!(ep.namespace, "onprem");
    }

    // An incremental update, then a removal.
    s.ok(&["register", "web", "10.0.0.6", "http:8080", "-n", "onprem"]);
    wait_state(&mut state, "the web service", |st| {
        st.service_by_hostname("web.onprem.svc.cluster.local")
            .is_some()
    })
    .await;
    s.ok(&["deregister", "mysql", "10.0.0.5", "-n", "onprem"]);
    wait_state(&mut state, "mysql's removal", |st| {
        st.service_by_hostname(host).is_none()
            && st
                .workload_by_address("10.0.0.5".parse().unwrap())
                .is_none()
    })
    .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_hosts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let root = root(&s);
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client(&s, &root, None, "onprem", "db", None).run(),
    )
    .await
    .expect("the client gives up on Unauthenticated")
    .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("unauthenticated")
            || err.to_string().contains("no credentials"),
        "{err}"
    );

    // A token for one identity cannot claim another in its node.
    let t = token(&s, "onprem", "db");
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client(&s, &root, Some(&t), "other", "db", None).run(),
    )
    .await
    .expect("the client gives up on PermissionDenied")
    .unwrap_err();
    assert!(err.to_string().contains("claims namespace"), "{err}");

    // A revoked token gets nothing either.
    let list = s.ok(&["token", "list"]);
    let id = list
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    s.ok(&["token", "revoke", &id]);
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client(&s, &root, Some(&t), "onprem", "db", None).run(),
    )
    .await
    .expect("the client gives up")
    .unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_register_themselves_and_leave_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--autoreg-grace", "1s"]);
    let group = "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: mysql, namespace: onprem}\nspec:\n  metadata: {labels: {app: mysql}}\n  template: {serviceAccount: db, ports: {mysql: 3306}}\n";
    let out = s.cli_stdin(&["apply", "-f", "-"], Some(group));
    assert!(out.status.success(), "{out:?}");
    let root = root(&s);

    // Wrong identity for the group: refused, nothing registered.
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client(
            &s,
            &root,
            Some(&token(&s, "onprem", "web")),
            "onprem",
            "web",
            Some("mysql"),
        )
        .run(),
    )
    .await
    .expect("refused")
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("may not join WorkloadGroup onprem/mysql"),
        "{err}"
    );

    let c = client(
        &s,
        &root,
        Some(&token(&s, "onprem", "db")),
        "onprem",
        "db",
        Some("mysql"),
    );
    let task = tokio::spawn(c.run());
    let row = wait_for("the auto-registered entry", Duration::from_secs(20), || {
        s.ok(&["get", "workloads", "-n", "onprem"])
            .lines()
            .find(|l| l.starts_with("mysql-127-0-0-9"))
            .map(str::to_string)
    });
    assert!(
        row.contains("127.0.0.9")
            && row.contains("db")
            && row.contains("HEALTHY")
            && row.contains("ago"),
        "{row}"
    );
    let v: serde_json::Value = serde_json::from_str(&s.ok(&[
        "get",
        "we",
        "mysql-127-0-0-9",
        "-n",
        "onprem",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(v["spec"]["labels"]["app"], "mysql");
    assert_eq!(v["metadata"]["annotations"]["isthmus.io/agent"], "true");

    task.abort();
    wait_for(
        "removal after the grace period",
        Duration::from_secs(20),
        || {
            (!s.ok(&["get", "workloads", "-n", "onprem"])
                .contains("mysql-127-0-0-9"))
            .then_some(())
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_mark_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let group = "apiVersion: isthmus.io/v1\nkind: WorkloadGroup\nmetadata: {name: mysql, namespace: onprem}\nspec:\n  template: {serviceAccount: db}\n  probe: {periodSeconds: 2, tcpSocket: {port: 3306}}\n";
    assert!(s
        .cli_stdin(&["apply", "-f", "-"], Some(group))
        .status
        .success());
    let c = client(
        &s,
        &root(&s),
        Some(&token(&s, "onprem", "db")),
        "onprem",
        "db",
        Some("mysql"),
    );
    let health = c.health();
    let task = tokio::spawn(c.run());
    let entry = || {
        let out = s.cli(&["get", "we", "mysql-127-0-0-9", "-n", "onprem", "-o", "json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    };
    let v = wait_for("the entry", Duration::from_secs(20), entry);
    assert_eq!(
        v["status"]["health"], "UNHEALTHY",
        "a group with a probe starts unhealthy: {v}"
    );
    health.send_replace(Some(isthmus_xds::HealthReport {
        healthy: true,
        message: None,
    }));
    wait_for("HEALTHY", Duration::from_secs(20), || {
        entry().filter(|v| v["status"].get("health").is_none())
    });
    health.send_replace(Some(isthmus_xds::HealthReport {
        healthy: false,
        message: Some("connect to 127.0.0.1:3306 refused".into()),
    }));
    let v = wait_for("UNHEALTHY", Duration::from_secs(20), || {
        entry().filter(|v| v["status"]["health"] == "UNHEALTHY")
    });
    assert_eq!(v["status"]["message"], "connect to 127.0.0.1:3306 refused");
    task.abort();
}

/// Says so loudly when `dig` is not installed (the test then has nothing to run).
fn dig_missing() -> bool {
    let missing = std::process::Command::new("dig")
        .arg("-v")
        .output()
        .is_err();
    if missing {
        eprintln!("!!!! SKIP: dig not installed (scripts/setup.sh installs dnsutils) !!!!");
    }
    missing
}

fn dig(server: &str, args: &[&str]) -> Option<String> {
    let (ip, port) = server.rsplit_once(':').unwrap();
    let out = std::process::Command::new("dig")
        .arg(format!("@{ip}"))
        .args(["-p", port, "+tries=1", "+time=2"])
        .args(args)
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_dns_answers_mesh_names() {
    if dig_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--advertise-ip", "10.0.0.9"]);
    s.ok(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "svc", "mysql", "-n", "onprem", "-o", "json"]))
            .unwrap();
    let vip = v["status"]["vip"].as_str().unwrap().to_string();
    let answer = wait_for("the VIP in DNS", Duration::from_secs(20), || {
        dig(&s.dns, &["+short", "mysql.onprem.svc.cluster.local", "A"])
            .filter(|a| !a.trim().is_empty())
    });
    assert_eq!(answer.trim(), vip);
    let nx = dig(&s.dns, &["nope.onprem.svc.cluster.local"]).unwrap();
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let alias = dig(&s.dns, &["+short", "istio-pilot.istio-system"]).unwrap();
    assert_eq!(alias.trim(), "10.0.0.9");
    let other = dig(&s.dns, &["example.com"]).unwrap();
    assert!(
        other.contains("status: REFUSED"),
        "names outside the mesh are refused without --dns-upstream: {other}"
    );
    let tcp = dig(
        &s.dns,
        &["+tcp", "+short", "mysql.onprem.svc.cluster.local"],
    )
    .unwrap();
    assert_eq!(tcp.trim(), vip);
}

/// `isthmus register` answers once DNS serves the name (the API's `?wait=true`), so a `dig`
/// right after it, as the README runs them, finds it: checked for registrations one right
/// after another, where the informer publishes at most four snapshots a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_name_is_in_dns_when_register_returns() {
    if dig_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    for i in 0..8 {
        let svc = format!("db{i}");
        let ip = format!("10.0.1.{}", i + 1);
        s.ok(&["register", &svc, &ip, "5432", "-n", "onprem"]);
        let name = format!("{svc}.onprem.svc.cluster.local");
        let answer = dig(&s.dns, &[&name, "A"]).unwrap();
        assert!(
            answer.contains("status: NOERROR") && answer.contains("ANSWER: 1,"),
            "{name} was not in DNS right after `isthmus register` returned:\n{answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_reach_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.ok(&[
        "register",
        "mysql",
        "10.0.0.5",
        "3306",
        "-n",
        "onprem",
        "-l",
        "app=mysql",
    ]);
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: mysql-clients, namespace: onprem}\nspec:\n  selector: {matchLabels: {app: mysql}}\n  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [untrusted]}\n    to:\n    - operation: {ports: [\"3306\"]}\n";
    let out = s.cli_stdin(&["apply", "-f", "-"], Some(policy));
    assert!(out.status.success(), "{out:?}");
    let table = s.ok(&["get", "ap", "-n", "onprem"]);
    assert!(
        table.contains("mysql-clients") && table.contains("DENY") && table.contains("app=mysql"),
        "{table}"
    );

    let c = client(
        &s,
        &root(&s),
        Some(&token(&s, "onprem", "db")),
        "onprem",
        "db",
        None,
    );
    let mut state = c.state();
    let task = tokio::spawn(c.run());
    // The policy and the workload that lists it are two types, sent one after the other; the
    // debounced publication may also send the workload before the policy was applied.
    wait_state(
        &mut state,
        "the policy, and the workload listing it",
        |st| {
            st.authorization("onprem/mysql-clients").is_some()
                && st
                    .workload_by_address("10.0.0.5".parse().unwrap())
                    .is_some_and(|w| !w.authorization_policies.is_empty())
        },
    )
    .await;
    {
        let st = state.borrow();
        let a = st.authorization("onprem/mysql-clients").unwrap();
        assert_eq!(a.action, 1, "DENY");
        assert_eq!(a.scope, 2, "WORKLOAD_SELECTOR");
        assert_eq!(a.rules[0].clauses.len(), 2, "a from clause and a to clause");
        assert_eq!(a.rules[0].clauses[1].matches[0].destination_ports, [3306]);
        let w = st.workload_by_address("10.0.0.5".parse().unwrap()).unwrap();
        assert_eq!(
            w.authorization_policies,
            ["onprem/mysql-clients"],
            "listed on the workload it selects"
        );
    }
    s.ok(&["delete", "ap", "mysql-clients", "-n", "onprem"]);
    wait_state(&mut state, "the policy's removal", |st| {
        st.authorization("onprem/mysql-clients").is_none()
    })
    .await;
    task.abort();
}

/// An entry `register`ed at a host whose agent is connected is served as HBONE. The control
/// plane records that host, so after it is killed and restarted the entry is HBONE from the
/// first state it serves, before that host's agent is back; once the grace period passes
/// without the agent, the entry is plain TCP again, also after a further restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_hosts_stay_hbone_across_a_control_plane_restart() {
    use isthmus_xds::client::Tunnel;
    let vm: std::net::IpAddr = "127.0.0.9".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--autoreg-grace", "3s"];
    let mut s = Server::start_with(dir.path(), &args);
    s.ok(&[
        "register",
        "mysql",
        "127.0.0.9",
        "3306",
        "-n",
        "onprem",
        "-s",
        "db",
    ]);
    let root_pem = root(&s);
    let vm_token = token(&s, "onprem", "db");
    let other_token = token(&s, "onprem", "web");
    let tunnel_of = |st: &State| st.workload_by_address(vm).map(|w| w.tunnel);
    // Another host (127.0.0.8) watching; returns once it has its first full state.
    let observe = |s: &Server| {
        let observer = client_at(
            s,
            "127.0.0.8",
            &root_pem,
            Some(&other_token),
            "onprem",
            "web",
            None,
        );
        let seen = observer.state();
        let mut ready = observer.ready();
        let task = tokio::spawn(observer.run());
        async move {
            tokio::time::timeout(Duration::from_secs(20), ready.wait())
                .await
                .expect("the observer's first full state");
            (seen, task)
        }
    };

    // The VM's agent connects: its registered entry turns HBONE for everyone.
    let agent = client(&s, &root_pem, Some(&vm_token), "onprem", "db", None);
    let agent_task = tokio::spawn(agent.run());
    let (mut seen, observer_task) = observe(&s).await;
    wait_state(&mut seen, "the VM's entry served as HBONE", |st| {
        tunnel_of(st) == Some(Tunnel::Hbone)
    })
    .await;

    // The control plane dies and comes back; the VM's agent is not back yet.
    agent_task.abort();
    observer_task.abort();
    s.kill9();
    let mut s = Server::start_with(dir.path(), &args);
    let (mut seen, observer_task) = observe(&s).await;
    assert_eq!(
        tunnel_of(&seen.borrow()),
        Some(Tunnel::Hbone),
        "the restarted control plane served the agent host's entry as plain TCP"
    );

    // No agent from 127.0.0.9 within the grace period: plain TCP again.
    wait_state(&mut seen, "the entry to fall back to plain TCP", |st| {
        tunnel_of(st) == Some(Tunnel::None)
    })
    .await;
    observer_task.abort();

    // And the store forgot the host: a further restart serves it plain from the start.
    s.kill9();
    let s = Server::start_with(dir.path(), &args);
    let (seen, observer_task) = observe(&s).await;
    assert_eq!(tunnel_of(&seen.borrow()), Some(Tunnel::None));
    observer_task.abort();
}

/// Issue 14: a client authenticated as ns/adv/sa/a whose node id claims 10.0.0.5 (another
/// namespace's registered VM) while it connects from 127.0.0.1 changes nothing anyone else
/// sees: the VM stays plain TCP for other clients, status shows the claim only as unverified,
/// no agent host is recorded for it (a restart serves it plain from the start), `register` at
/// 10.0.0.5 does not take the attacker's service account, and auto-registration with that
/// claim is refused with the reason and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_node_id_changes_nothing_anyone_else_sees() {
    use isthmus_xds::client::Tunnel;
    let vm: std::net::IpAddr = "10.0.0.5".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--autoreg-grace", "30s"];
    let mut s = Server::start_with(dir.path(), &args);
    s.ok(&[
        "register", "mysql", "10.0.0.5", "3306", "-n", "onprem", "-s", "db",
    ]);
    let group = "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: a-group, namespace: adv}\nspec:\n  metadata: {labels: {app: a}}\n  template: {serviceAccount: a, ports: {http: 80}}\n";
    assert!(s
        .cli_stdin(&["apply", "-f", "-"], Some(group))
        .status
        .success());
    let root_pem = root(&s);
    let adv = token(&s, "adv", "a");
    let tunnel_of = |st: &State| st.workload_by_address(vm).map(|w| w.tunnel);

    // The attacker's stream is served (discovery is the same for everyone)...
    let attacker = client_claiming(&s, "10.0.0.5", &root_pem, Some(&adv), "adv", "a", None);
    let mut attacker_ready = attacker.ready();
    let attacker_task = tokio::spawn(attacker.run());
    tokio::time::timeout(Duration::from_secs(20), attacker_ready.wait())
        .await
        .expect("the attacker's stream is served");
    // ...but status shows its claim only as an unverified one.
    let listed = |s: &Server| -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&s.ok(&["status", "-o", "json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let p = wait_for("the attacker in status", Duration::from_secs(20), || {
        listed(&s)
            .into_iter()
            .find(|p| p["identity"] == "spiffe://cluster.local/ns/adv/sa/a")
    });
    assert!(p["ip"].is_null(), "an unverified claim is no address: {p}");
    assert_eq!(p["claimedIp"], "10.0.0.5", "{p}");
    let problem = p["claimProblem"].as_str().unwrap();
    assert!(
        problem.contains("the connection comes from 127.0.0.1")
            && problem.contains("register a WorkloadEntry for ns/adv/sa/a at 10.0.0.5"),
        "{problem}"
    );
    assert!(
        listed(&s).iter().all(|p| p["ip"] != "10.0.0.5"),
        "no stream speaks for 10.0.0.5"
    );

    // Another host's view of the VM: still plain TCP. A later change (a new service) is
    // waited for, so the view is one built after the attacker connected.
    let observer = client_at(
        &s,
        "127.0.0.8",
        &root_pem,
        Some(&token(&s, "onprem", "web")),
        "onprem",
        "web",
        None,
    );
    let mut seen = observer.state();
    let observer_task = tokio::spawn(observer.run());
    s.ok(&["register", "later", "10.0.0.6", "80", "-n", "onprem"]);
    wait_state(&mut seen, "a state with the later service", |st| {
        st.workload_by_address("10.0.0.6".parse().unwrap())
            .is_some()
    })
    .await;
    assert_eq!(tunnel_of(&seen.borrow()), Some(Tunnel::None));
    let w = seen.borrow().workload_by_address(vm).cloned().unwrap();
    assert_eq!(w.service_account, "db", "{w:?}");

    // `register` at 10.0.0.5 in the attacker's namespace does not take its service account.
    s.ok(&["register", "borrowed", "10.0.0.5", "80", "-n", "adv"]);
    let out = s.ok(&["get", "workloads", "-n", "adv", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let entries = v["items"].as_array().unwrap();
    assert!(!entries.is_empty(), "{out}");
    for e in entries {
        assert_ne!(e["spec"]["serviceAccount"], "a", "{e}");
    }

    // Auto-registration with the claim is refused, saying why and what to do.
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client_claiming(
            &s,
            "10.0.0.5",
            &root_pem,
            Some(&adv),
            "adv",
            "a",
            Some("a-group"),
        )
        .run(),
    )
    .await
    .expect("refused")
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("PermissionDenied")
            && err.contains("claims 10.0.0.5")
            && err.contains("no credential vouches for 10.0.0.5")
            && err.contains("run the agent on the host that owns 10.0.0.5"),
        "{err}"
    );
    assert!(
        !s.ok(&["get", "workloads", "-n", "adv"])
            .contains("a-group-"),
        "nothing auto-registered"
    );

    // No agent host was recorded for 10.0.0.5: restarted, the server serves it plain from the
    // first state (a recorded host would be HBONE until the 30 s grace ran out).
    attacker_task.abort();
    observer_task.abort();
    s.kill9();
    let s = Server::start_with(dir.path(), &args);
    let observer = client_at(
        &s,
        "127.0.0.8",
        &root_pem,
        Some(&token(&s, "onprem", "web")),
        "onprem",
        "web",
        None,
    );
    let seen = observer.state();
    let mut ready = observer.ready();
    let task = tokio::spawn(observer.run());
    tokio::time::timeout(Duration::from_secs(20), ready.wait())
        .await
        .expect("the observer's first full state");
    assert_eq!(tunnel_of(&seen.borrow()), Some(Tunnel::None));
    task.abort();
}
