//! Several `isthmus server` replicas on one real etcd cluster (Debian's `etcd-server`): they
//! share one registry, one CA and one admin token; a write through one is seen by the others'
//! APIs and DNS; a lost etcd quorum fails writes fast with a 503 naming etcd while DNS keeps
//! answering, and everything resumes when quorum returns, with no restart; a killed replica
//! leaves the others serving. Loud SKIP when etcd is not installed; CI installs it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use isthmus_store::testing::EtcdCluster;

const TOKEN: &str = "replicas-test-admin-token";

fn replica(dir: &Path, etcd: &EtcdCluster, seal: &Path, extra: &[&str]) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    // Every replica gets the same admin token file; Server reads it from the data directory.
    let token = dir.join("admin-token");
    std::fs::write(&token, TOKEN).unwrap();
    let endpoints = etcd.endpoints().join(",");
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--data-dir"])
        .arg(dir)
        .args(ANY_PORTS)
        .args(["--store", "etcd", "--etcd-endpoints", &endpoints])
        .args([
            "--etcd-prefix",
            "/isthmus/test",
            "--etcd-request-timeout",
            "2s",
        ])
        .arg("--seal-key-file")
        .arg(seal)
        .arg("--admin-token-file")
        .arg(&token)
        .args(extra);
    Server::start_command(cmd, dir)
}

fn seal_key(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("seal.key");
    let key: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    std::fs::write(&path, key).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

fn dig(dns: &str, name: &str) -> Option<String> {
    let (host, port) = dns.rsplit_once(':').unwrap();
    let out = Command::new("dig")
        .args([
            "+short",
            "+time=1",
            "+tries=1",
            &format!("@{host}"),
            "-p",
            port,
            name,
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!text.is_empty() && !text.starts_with(';')).then_some(text)
}

fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--max-time",
            "10",
            url,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn replicas_share_registry_ca_and_token_and_ride_out_a_lost_quorum() {
    let Some(mut etcd) = EtcdCluster::start(3, "replicas") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let seal = seal_key(tmp.path());
    let a = replica(&tmp.path().join("a"), &etcd, &seal, &[]);
    let b = replica(&tmp.path().join("b"), &etcd, &seal, &[]);
    let mut c = replica(&tmp.path().join("c"), &etcd, &seal, &[]);

    // One CA: every replica hands out the same root, and signs with the same key.
    let root = |s: &Server| std::fs::read_to_string(s.dir.join("ca/root-cert.pem")).unwrap();
    assert_eq!(root(&a), root(&b));
    assert_eq!(root(&a), root(&c));
    assert_eq!(
        std::fs::read(a.dir.join("ca/ca-key.pem")).unwrap(),
        std::fs::read(c.dir.join("ca/ca-key.pem")).unwrap()
    );

    // A write through A is seen by B's registration API and C's DNS.
    let out = a.ok(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    assert!(out.contains("Service onprem/mysql created"), "{out}");
    let vip = wait_for(
        "C's DNS to answer for mysql",
        Duration::from_secs(10),
        || dig(&c.dns, "mysql.onprem.svc.cluster.local"),
    );
    assert!(vip.starts_with("10."), "{vip}");
    let (code, body) = get(&format!(
        "{}/v1/registration/mysql.onprem.svc.cluster.local%7Cmysql",
        b.registration
    ));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("10.0.0.5"), "{body}");

    // Registrations racing through all three replicas never share a VIP.
    let threads: Vec<_> = (0..12)
        .map(|i| {
            let (admin, home) = match i % 3 {
                0 => (a.admin.clone(), a.home.path().to_path_buf()),
                1 => (b.admin.clone(), b.home.path().to_path_buf()),
                _ => (c.admin.clone(), c.home.path().to_path_buf()),
            };
            std::thread::spawn(move || {
                let out = Command::new(BIN)
                    .args([
                        "register",
                        &format!("svc{i}"),
                        &format!("10.0.1.{i}"),
                        "80",
                        "-n",
                        "race",
                    ])
                    .env("ISTHMUS_SERVER", admin)
                    .env("ISTHMUS_TOKEN", TOKEN)
                    .env("XDG_CONFIG_HOME", home)
                    .env_remove("ISTHMUS_CONFIG")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let list = b.ok(&["get", "services", "-n", "race", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let items = v["items"].as_array().or(v.as_array()).unwrap();
    let mut vips: Vec<String> = items
        .iter()
        .map(|s| s["status"]["vip"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(vips.len(), 12, "{list}");
    vips.sort();
    vips.dedup();
    assert_eq!(vips.len(), 12, "two services share a VIP: {list}");

    // Quorum lost: writes fail fast with a 503 that names etcd, readiness says why, and DNS
    // keeps answering from the replica's last view.
    etcd.kill(1);
    etcd.kill(2);
    let err = wait_for("writes to fail", Duration::from_secs(30), || {
        let out = a.cli(&["register", "late", "10.0.0.9", "80", "-n", "onprem"]);
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).to_string())
    });
    assert!(err.contains("etcd"), "{err}");
    let (code, body) = get(&format!("{}/readyz", a.admin));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("etcd"), "{body}");
    assert_eq!(
        dig(&c.dns, "mysql.onprem.svc.cluster.local").as_deref(),
        Some(vip.as_str())
    );

    // Quorum back: writes and readiness resume with no replica restarted.
    etcd.restart(1);
    etcd.restart(2);
    etcd.wait_healthy(Duration::from_secs(30));
    wait_for("writes to resume", Duration::from_secs(30), || {
        a.cli(&["register", "late", "10.0.0.9", "80", "-n", "onprem"])
            .status
            .success()
            .then_some(())
    });
    wait_for("A ready again", Duration::from_secs(15), || {
        (get(&format!("{}/readyz", a.admin)).0 == 200).then_some(())
    });
    wait_for(
        "C's DNS to learn the late write",
        Duration::from_secs(15),
        || dig(&c.dns, "late.onprem.svc.cluster.local"),
    );

    // The replicas view: all three, one leader, whichever replica is asked.
    let out = b.ok(&["status", "--replicas", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["replicas"].as_array().map(Vec::len), Some(3), "{out}");
    let leaders = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["leader"] == true)
        .count();
    assert_eq!(leaders, 1, "{out}");
    let table = a.ok(&["status", "--replicas"]);
    assert!(
        table.contains("REPLICA") && table.contains("LEADER"),
        "{table}"
    );

    // A replica killed: the others keep taking writes and serving reads, it leaves the
    // replicas view within its lease TTL, and a CLI given every replica passes over it.
    c.kill9();
    b.ok(&["register", "after", "10.0.0.10", "80", "-n", "onprem"]);
    let out = a.ok(&["get", "services", "-n", "onprem"]);
    assert!(
        out.contains("after") && out.contains("late") && out.contains("mysql"),
        "{out}"
    );
    wait_for(
        "C to leave the replicas view",
        Duration::from_secs(20),
        || {
            let out = a.ok(&["status", "--replicas", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            (v["replicas"].as_array()?.len() == 2).then_some(())
        },
    );
    let listed = Command::new(BIN)
        .args(["get", "services", "-n", "onprem"])
        .env("ISTHMUS_SERVER", format!("{},{}", c.admin, b.admin))
        .env("ISTHMUS_TOKEN", TOKEN)
        .env("XDG_CONFIG_HOME", c.home.path())
        .env_remove("ISTHMUS_CONFIG")
        .output()
        .unwrap();
    assert!(
        listed.status.success() && String::from_utf8_lossy(&listed.stdout).contains("after"),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let all_down = Command::new(BIN)
        .args(["get", "services", "-n", "onprem"])
        .env(
            "ISTHMUS_SERVER",
            format!("{},{}", c.admin, c.admin.replace("127.0.0.1", "127.0.0.2")),
        )
        .env("ISTHMUS_TOKEN", TOKEN)
        .env("XDG_CONFIG_HOME", c.home.path())
        .env_remove("ISTHMUS_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&all_down.stderr);
    assert!(
        !all_down.status.success() && err.contains("none answered"),
        "{err}"
    );
}

#[test]
fn a_replica_that_disagrees_with_the_mesh_refuses_to_start_and_says_why() {
    let Some(etcd) = EtcdCluster::start(1, "replicas disagree") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let seal = seal_key(tmp.path());
    let first = replica(&tmp.path().join("a"), &etcd, &seal, &[]);

    let run = |name: &str, seal: &Path, extra: &[&str]| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("admin-token"), TOKEN).unwrap();
        let out = Command::new(BIN)
            .args(["server", "--data-dir"])
            .arg(&dir)
            .args(ANY_PORTS)
            .args([
                "--store",
                "etcd",
                "--etcd-endpoints",
                &etcd.endpoints().join(","),
            ])
            .args(["--etcd-prefix", "/isthmus/test"])
            .arg("--seal-key-file")
            .arg(seal)
            .arg("--admin-token-file")
            .arg(dir.join("admin-token"))
            .args(extra)
            .env("ISTHMUS_LOG", "warn")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run("cidr", &seal, &["--service-cidr", "10.100.0.0/16"]);
    assert!(
        err.contains("--service-cidr") && err.contains("10.100.0.0/16"),
        "{err}"
    );
    let other = tmp.path().join("other.key");
    std::fs::write(&other, "ab".repeat(32)).unwrap();
    let err = run("seal", &other, &[]);
    assert!(
        err.contains("is not the one this mesh's CA was sealed with"),
        "{err}"
    );
    std::fs::write(&other, "short").unwrap();
    let err = run("badseal", &other, &[]);
    assert!(err.contains("64 hex characters"), "{err}");
    // Nothing the refused replicas did reached the mesh: the first one still serves alone.
    first.ok(&["get", "services", "-A"]);
}

fn get_auth(url: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn issued(s: &Server) -> u64 {
    get(&format!("{}/metrics", s.metrics))
        .1
        .lines()
        .find(|l| l.starts_with("isthmus_ca_certificate_requests_total{outcome=\"issued\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// An agent given both replicas in CA_ADDR is served by one; when that one is SIGKILLed its
/// discovery stream is on the other within 10 s, new registrations reach it there, and its
/// certificate renews there, even after etcd lost its quorum.
#[test]
fn an_agent_moves_to_another_replica_when_its_own_is_killed() {
    let Some(mut etcd) = EtcdCluster::start(3, "replicas agent failover") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let seal = seal_key(tmp.path());
    let opts = ["--lease-ttl", "2s", "--autoreg-grace", "3s"];
    let a = replica(&tmp.path().join("a"), &etcd, &seal, &opts);
    let b = replica(&tmp.path().join("b"), &etcd, &seal, &opts);
    let host = tmp.path().join("host");
    a.ok(&["vm", "certs", "-o", host.join("certs").to_str().unwrap()]);
    let token = a.cli(&["token", "create", "-n", "onprem", "-s", "db", "--uses", "1"]);
    assert!(token.status.success());
    std::fs::write(host.join("token"), token.stdout).unwrap();
    a.ok(&["register", "first", "10.0.3.1", "80", "-n", "onprem"]);
    let group = "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: db, namespace: onprem}\nspec:\n  metadata: {labels: {app: db}}\n  template: {serviceAccount: db, ports: {pg: 5432}}\n";
    assert!(a
        .cli_stdin(&["apply", "-f", "-"], Some(group))
        .status
        .success());

    let ca_addr = format!("{},{}", a.grpc, b.grpc);
    let agent = Agent::start(
        &ca_addr,
        &host,
        &["--cert-lifetime", "10s", "--group", "db"],
    );
    let entry = "db-127-0-0-9";
    wait_for(
        "the agent's entry registered",
        Duration::from_secs(15),
        || {
            a.ok(&["get", "workloadentries", "-n", "onprem"])
                .contains(entry)
                .then_some(())
        },
    );
    let dns = agent.endpoints["dns"].as_str().unwrap().to_string();
    wait_for(
        "the agent's DNS to know first",
        Duration::from_secs(30),
        || dig(&dns, "first.onprem.svc.cluster.local"),
    );
    let holds = |s: &Server| get_auth(&format!("{}/api/v1/proxies", s.admin)).contains("127.0.0.9");
    let on_a = wait_for(
        "the agent's stream on a replica",
        Duration::from_secs(15),
        || {
            if holds(&a) {
                Some(true)
            } else if holds(&b) {
                Some(false)
            } else {
                None
            }
        },
    );
    let (mut dead, alive) = if on_a { (a, b) } else { (b, a) };
    // `isthmus status` on either replica lists the host, with the replica it is on.
    let dead_name = replicas_view(&dead)["this"].as_str().unwrap().to_string();
    for s in [&dead, &alive] {
        let out = s.ok(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let hosts = v.as_array().unwrap();
        assert_eq!(hosts.len(), 1, "{out}");
        assert_eq!(
            hosts[0]["replica"].as_str(),
            Some(dead_name.as_str()),
            "{out}"
        );
    }
    let issued_before = issued(&alive);
    dead.kill9();
    wait_for(
        "the stream on the surviving replica",
        Duration::from_secs(10),
        || holds(&alive).then_some(()),
    );
    // Past the dead replica's lease and the grace period: the auto-registered entry stays,
    // its agent being live through the survivor.
    std::thread::sleep(Duration::from_secs(6));
    let entries = alive.ok(&["get", "workloadentries", "-n", "onprem"]);
    assert!(
        entries.contains(entry),
        "the moved host's entry was removed: {entries}"
    );
    alive.ok(&["register", "second", "10.0.3.2", "80", "-n", "onprem"]);
    wait_for(
        "a registration through the survivor to reach the agent",
        Duration::from_secs(15),
        || dig(&dns, "second.onprem.svc.cluster.local"),
    );
    wait_for(
        "a certificate renewed through the survivor",
        Duration::from_secs(30),
        || (issued(&alive) > issued_before).then_some(()),
    );

    // etcd loses its quorum: certificates still renew (a renewal writes nothing) and the
    // agent's DNS still answers.
    etcd.kill(1);
    etcd.kill(2);
    // The metrics endpoint answers from memory: a scrape never waits on etcd.
    let asked = std::time::Instant::now();
    let (code, _) = get(&format!("{}/metrics", alive.metrics));
    assert_eq!(code, 200);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "/metrics took {:?} without an etcd quorum",
        asked.elapsed()
    );
    let during = issued(&alive);
    wait_for(
        "a renewal without an etcd quorum",
        Duration::from_secs(30),
        || (issued(&alive) > during).then_some(()),
    );
    assert!(dig(&dns, "second.onprem.svc.cluster.local").is_some());
    agent.stop();
}

/// The README's "Run several control planes": `scripts/replicas-demo.sh` as printed, then the
/// commands it prints, then Ctrl-C stops everything it started. It uses the fixed ports the
/// README shows (15012..., 23791...), which no other test uses.
#[test]
fn the_replicas_demo_script_runs_as_printed() {
    use std::io::BufRead;
    if !isthmus_store::testing::etcd_available("replicas demo script") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/replicas-demo.sh"
    );
    let mut demo = Command::new("bash")
        .arg(script)
        .env("ISTHMUS", BIN)
        .env("DEMO_DIR", tmp.path())
        .env("ISTHMUS_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !printed.contains("Ctrl-C stops everything") {
        assert!(
            std::time::Instant::now() < deadline,
            "demo not ready: {printed}"
        );
        match lines.next() {
            Some(Ok(l)) => printed.push_str(&format!("{l}\n")),
            _ => panic!("the demo ended early: {printed}"),
        }
    }
    assert!(printed.contains("replicas-demo: ready"), "{printed}");
    let token = std::fs::read_to_string(tmp.path().join("admin-token")).unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(tmp.path())
            .env("ISTHMUS_SERVER", "http://127.0.0.1:15080")
            .env("ISTHMUS_TOKEN", token.trim())
            .env("XDG_CONFIG_HOME", tmp.path())
            .env_remove("ISTHMUS_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = cli(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    assert!(out.contains("Service onprem/mysql created"), "{out}");
    let (code, body) =
        get("http://127.0.0.1:8180/v1/registration/mysql.onprem.svc.cluster.local%7Cmysql");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("10.0.0.5"), "{body}");
    wait_for("replica 2's DNS", Duration::from_secs(10), || {
        dig("127.0.0.1:15254", "mysql.onprem.svc.cluster.local")
    });
    cli(&["vm", "config", "-o", "./vm", "-n", "onprem"]);
    let env = std::fs::read_to_string(tmp.path().join("vm/cluster.env")).unwrap();
    let ca_addr = env.lines().find(|l| l.starts_with("CA_ADDR=")).unwrap();
    for port in [15012, 15112, 15212] {
        assert!(ca_addr.contains(&format!(":{port}")), "{ca_addr}");
    }

    // Ctrl-C: everything it started stops.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    wait_for("the demo to stop", Duration::from_secs(30), || {
        demo.try_wait().unwrap()
    });
    wait_for("every demo port closed", Duration::from_secs(20), || {
        [15080, 15180, 15280, 23791, 23792, 23793]
            .iter()
            .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_err())
            .then_some(())
    });
}

fn metric(s: &Server, name: &str) -> i64 {
    get(&format!("{}/metrics", s.metrics))
        .1
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1)
}

fn replicas_view(s: &Server) -> serde_json::Value {
    serde_json::from_str(&get_auth(&format!("{}/api/v1/replicas", s.admin))).unwrap_or_default()
}

/// Waits (5 s at most) until `s` says it leads; returns its name.
fn wait_to_lead(s: &Server, what: &str) -> String {
    let name = replicas_view(s)["this"].as_str().unwrap().to_string();
    wait_for(what, Duration::from_secs(5), || {
        (replicas_view(s)["leader"].as_str() == Some(name.as_str())).then_some(())
    });
    name
}

fn signal(s: &Server, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.child.id() as i32), sig).unwrap();
}

/// One leader runs the timed work. SIGSTOP it past its lease: the other replica leads within
/// the TTL and removes, after its own grace period, the orphaned workload the first had been
/// counting down; the first, resumed, finds its lease gone, leads no more and removes nothing
/// (its removal carries the fence). SIGKILL the leader: the other leads within the TTL.
#[test]
fn the_leader_fails_over_and_a_paused_one_writes_nothing() {
    let Some(etcd) = EtcdCluster::start(1, "replicas leader") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let seal = seal_key(tmp.path());
    let opts = ["--lease-ttl", "2s", "--autoreg-grace", "6s"];
    let a = replica(&tmp.path().join("a"), &etcd, &seal, &opts);
    let b = replica(&tmp.path().join("b"), &etcd, &seal, &opts);
    let leader_of = |s: &Server| {
        let v = replicas_view(s);
        let names: Vec<String> = v["replicas"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|x| x["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        (names.len() == 2)
            .then(|| v["leader"].as_str().map(String::from))
            .flatten()
    };
    let first = wait_for(
        "a leader among two replicas",
        Duration::from_secs(15),
        || leader_of(&a),
    );
    let view = replicas_view(&b);
    assert_eq!(view["leader"].as_str(), Some(first.as_str()), "{view}");
    let (mut old, new) = if replicas_view(&a)["this"] == first.as_str() {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(metric(&old, "isthmus_replica_leader"), 1);
    assert_eq!(metric(&new, "isthmus_replica_leader"), 0);

    // An auto-registered workload whose agent is gone: the leader starts counting its grace.
    new.cli_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: isthmus.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: gone-10-0-5-1\n  namespace: onprem\n  annotations: {isthmus.io/workload-group: gone}\nspec: {address: 10.0.5.1, serviceAccount: default}\n"),
    );
    new.ok(&["get", "workloadentries", "-n", "onprem"])
        .contains("gone-10-0-5-1")
        .then_some(())
        .expect("the entry was applied");
    std::thread::sleep(Duration::from_secs(2));

    signal(&old, nix::sys::signal::Signal::SIGSTOP);
    let paused = std::time::Instant::now();
    let new_name = wait_to_lead(&new, "the other replica to lead");
    eprintln!(
        "leader SIGSTOPped: another led after {:?} (lease TTL 2s)",
        paused.elapsed()
    );
    assert_eq!(metric(&new, "isthmus_replica_leader"), 1);
    // Resume the old leader once its own grace period for the workload has run out.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(paused.elapsed()));
    signal(&old, nix::sys::signal::Signal::SIGCONT);
    wait_for(
        "the resumed replica to find its lease lost",
        Duration::from_secs(10),
        || (metric(&old, "isthmus_replica_leases_lost_total") >= 1).then_some(()),
    );
    wait_for(
        "the workload removed by the new leader",
        Duration::from_secs(15),
        || {
            (!new
                .ok(&["get", "workloadentries", "-n", "onprem"])
                .contains("gone-10-0-5-1"))
            .then_some(())
        },
    );
    assert_eq!(
        metric(&new, "isthmus_replica_removed_total"),
        1,
        "the new leader removed it"
    );
    assert_eq!(
        metric(&old, "isthmus_replica_removed_total"),
        0,
        "the paused leader wrote after losing its lease"
    );
    assert_eq!(metric(&old, "isthmus_replica_leader"), 0);
    eprintln!(
        "resumed old leader: fenced writes {}, leases lost {}",
        metric(&old, "isthmus_replica_fenced_writes_total"),
        metric(&old, "isthmus_replica_leases_lost_total")
    );
    // It is a replica again, not the leader: both listed, one leader.
    wait_for(
        "both replicas listed again",
        Duration::from_secs(10),
        || leader_of(&old).filter(|l| *l == new_name),
    );

    // The leader SIGKILLed: the other leads within the TTL.
    let mut new = new;
    new.kill9();
    let killed = std::time::Instant::now();
    wait_to_lead(&old, "the survivor to lead");
    eprintln!(
        "leader SIGKILLed: the survivor led after {:?}",
        killed.elapsed()
    );
    let _ = old.term();
}

/// With `--max-stream-age`, a host's discovery stream is closed about that often and the agent
/// reconnects to the other replica: hosts spread over every replica, new ones included. Each
/// move resumes from the agent's versions, so its DNS keeps answering throughout.
#[test]
fn hosts_move_between_replicas_at_the_maximum_stream_age() {
    let Some(etcd) = EtcdCluster::start(1, "replicas rebalance") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let seal = seal_key(tmp.path());
    let opts = ["--max-stream-age", "2s"];
    let a = replica(&tmp.path().join("a"), &etcd, &seal, &opts);
    let b = replica(&tmp.path().join("b"), &etcd, &seal, &opts);
    let host = tmp.path().join("host");
    a.ok(&["vm", "certs", "-o", host.join("certs").to_str().unwrap()]);
    let token = a.cli(&["token", "create", "-n", "onprem", "-s", "db"]);
    assert!(token.status.success());
    std::fs::write(host.join("token"), token.stdout).unwrap();
    a.ok(&["register", "db", "10.0.4.1", "5432", "-n", "onprem"]);
    let agent = Agent::start(&format!("{},{}", a.grpc, b.grpc), &host, &[]);
    let dns = agent.endpoints["dns"].as_str().unwrap().to_string();
    let holds = |s: &Server| get_auth(&format!("{}/api/v1/proxies", s.admin)).contains("127.0.0.9");
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream did not move back and forth: {seen:?}"
        );
        let on = if holds(&a) {
            Some('a')
        } else if holds(&b) {
            Some('b')
        } else {
            None
        };
        if let Some(on) = on {
            if seen.last() != Some(&on) {
                seen.push(on);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        dig(&dns, "db.onprem.svc.cluster.local").is_some(),
        "the agent's DNS answers after the moves"
    );
    agent.stop();
}
