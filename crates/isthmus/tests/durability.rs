//! The registry survives restarts and SIGKILL: every acknowledged write is there afterwards, and
//! no write is there in part.

mod common;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::*;
use rand::Rng;
use serde_json::Value;

async fn list(s: &Server, http: &reqwest::Client, plural: &str) -> Vec<Value> {
    let v: Value = http
        .get(s.url(&format!("/api/v1/{plural}")))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn restart_keeps_everything_and_vips_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    s.ok(&["register", "mysql", "10.0.0.5", "3306", "-n", "onprem"]);
    let before = s.ok(&["get", "svc", "mysql", "-n", "onprem", "-o", "json"]);
    // A clean stop on SIGTERM, with a watch open, exits 0.
    let mut watch = std::process::Command::new(BIN)
        .args(["get", "svc", "-A", "-w"])
        .env("ISTHMUS_SERVER", &s.admin)
        .env("ISTHMUS_TOKEN", &s.token)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.term().success());
    let _ = watch.kill();
    let _ = watch.wait();

    let s = Server::start(dir.path());
    let after = s.ok(&["get", "svc", "mysql", "-n", "onprem", "-o", "json"]);
    assert_eq!(
        before, after,
        "the service, its VIP, uid and resourceVersion are unchanged"
    );
    let http = reqwest::Client::new();
    let reg: Value = http
        .get(format!("{}/v1/registration", s.registration))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reg[0]["hosts"][0]["ip_address"], "10.0.0.5");

    for i in 0..50 {
        s.ok(&[
            "register",
            &format!("svc-{i}"),
            &format!("10.1.0.{i}"),
            "80",
        ]);
    }
    let vips: Vec<String> = list(&s, &http, "services")
        .await
        .iter()
        .map(|v| v["status"]["vip"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(vips.len(), 51);
    assert_eq!(
        vips.iter().collect::<HashSet<_>>().len(),
        51,
        "a VIP was handed out twice: {vips:?}"
    );
}

#[tokio::test]
async fn second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = Server::start(dir.path());
    let out = std::process::Command::new(BIN)
        .args(["server", "--data-dir"])
        .arg(dir.path())
        .args(ANY_PORTS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another process"), "{err}");
}

#[tokio::test]
async fn bad_server_flags_name_the_problem() {
    let out = std::process::Command::new(BIN)
        .args(["server", "--dev", "--service-cidr", "10.0.0.0/31"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--service-cidr 10.0.0.0/31 is too small")
    );
    let out = std::process::Command::new(BIN)
        .args(["server", "--dev", "--domain", "Bad_Domain"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--domain \"Bad_Domain\""));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["server", "--data-dir"])
        .arg(dir.path())
        .args([
            "--admin-addr",
            &addr,
            "--registration-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--dns-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr} for the admin API"))
            && err.contains("--admin-addr"),
        "{err}"
    );
}

/// Registers in a loop, SIGKILLs the server at a random moment, restarts it, and checks that
/// every acknowledged registration is complete and nothing is half there. Several rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_registration_and_leaves_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut acked: BTreeMap<String, String> = BTreeMap::new(); // service -> ip
    let mut next = 0usize;
    let rounds = 6;
    for round in 0..rounds {
        let mut s = Server::start(dir.path());
        // Everything acknowledged so far, in every earlier round, is there and whole.
        check(&s, &http, &acked).await;
        let kill_after = Duration::from_millis(rand::thread_rng().gen_range(30..400));
        let deadline = tokio::time::Instant::now() + kill_after;
        let url = s.url("/api/v1/register");
        let token = s.token.clone();
        // Four concurrent writers, so the kill lands in the middle of commits.
        let mut writers = Vec::new();
        for w in 0..4 {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            let base = next + w * 10_000;
            writers.push(tokio::spawn(async move {
                let mut done = Vec::new();
                for i in base.. {
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    let svc = format!("svc-{i}");
                    let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
                    let body = serde_json::json!({"service": svc, "namespace": "crash", "ip": ip, "ports": ["http:8080"]});
                    match http.post(&url).bearer_auth(&token).json(&body).send().await {
                        Ok(r) if r.status().is_success() => done.push((svc, ip)),
                        _ => break,
                    }
                }
                done
            }));
        }
        tokio::time::sleep_until(deadline).await;
        s.kill9();
        for w in writers {
            acked.extend(w.await.unwrap());
        }
        next += 40_000;
        eprintln!(
            "round {round}: {} acknowledged registrations so far",
            acked.len()
        );
    }
    let s = Server::start(dir.path());
    check(&s, &http, &acked).await;
    assert!(
        acked.len() > 20,
        "the test made too few registrations to mean anything: {}",
        acked.len()
    );
}

async fn check(s: &Server, http: &reqwest::Client, acked: &BTreeMap<String, String>) {
    let services = list(s, http, "services").await;
    let entries = list(s, http, "workloadentries").await;
    let svc_names: HashSet<String> = services
        .iter()
        .map(|v| v["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let entry_of: BTreeMap<String, String> = entries
        .iter()
        .map(|e| {
            (
                e["spec"]["services"][0].as_str().unwrap().to_string(),
                e["spec"]["address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (svc, ip) in acked {
        assert!(
            svc_names.contains(svc),
            "acknowledged service {svc} is missing after SIGKILL"
        );
        assert_eq!(
            entry_of.get(svc),
            Some(ip),
            "acknowledged endpoint {ip} of {svc} is missing"
        );
    }
    // No partial registration: each service has its entry and each entry its service, and
    // every service has its own VIP.
    for svc in &svc_names {
        assert!(
            entry_of.contains_key(svc),
            "service {svc} exists without its endpoint (partial write)"
        );
    }
    for svc in entry_of.keys() {
        assert!(
            svc_names.contains(svc),
            "endpoint of {svc} exists without its service (partial write)"
        );
    }
    let vips: HashSet<&str> = services
        .iter()
        .map(|v| v["status"]["vip"].as_str().unwrap())
        .collect();
    assert_eq!(vips.len(), services.len(), "two services share a VIP");
}

/// A tmpfs mounted on a temporary directory, unmounted on drop (after the server on it stops).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// Fills the filesystem of `path` with a file there, until the filesystem refuses.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    // The last bytes that fit.
    while f.write_all(&chunk[..512]).is_ok() {}
}

async fn readyz(s: &Server, http: &reqwest::Client) -> (u16, String) {
    let resp = http.get(s.url("/readyz")).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_costs_writes_only_for_as_long_as_it_lasts() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("!!!! SKIP a_full_disk_costs_writes_only_for_as_long_as_it_lasts: needs root (mounts a small tmpfs) !!!!");
        return;
    }
    let fs = Tmpfs::mount("8m");
    let s = Server::start(fs.0.path());
    let http = s.http();
    let mut acked = Vec::new();
    for i in 0..3 {
        let name = format!("before-{i}");
        s.ok(&["register", &name, &format!("10.2.0.{i}"), "80"]);
        acked.push(name);
    }
    let filler = fs.0.path().join("filler");
    fill(&filler);

    // Registrations go on while the store's file has room inside; then one fails, saying why.
    let mut refused = None;
    for i in 0..2000 {
        let name = format!("svc-{i}");
        let out = s.cli(&[
            "register",
            &name,
            &format!("10.3.{}.{}", i / 200, i % 200),
            "80",
        ]);
        if out.status.success() {
            acked.push(name);
        } else {
            refused = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let refused = refused.expect("the disk never filled up");
    for part in ["disk is full", "No space left on device", "free space"] {
        assert!(refused.contains(part), "{part:?} not in {refused:?}");
    }

    // Unready with the cause, counted, and reads still answer with every acknowledged write.
    let (code, body) = readyz(&s, &http).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk is full"), "{body}");
    let metrics = http
        .get(format!("{}/metrics", s.metrics))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"isthmus_store_errors_total{op="write",kind="disk_full"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("isthmus_store_write_failing 1"),
        "{metrics}"
    );
    let names: HashSet<String> = list(&s, &http, "services")
        .await
        .iter()
        .map(|v| v["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    for name in &acked {
        assert!(
            names.contains(name),
            "{name} missing while the disk is full"
        );
    }

    // Space returns: ready again without any write, then registrations succeed.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = readyz(&s, &http).await;
        if code == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still unready after space was freed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.ok(&["register", "after", "10.4.0.1", "80"]);
    acked.push("after".into());
    let names: HashSet<String> = list(&s, &http, "services")
        .await
        .iter()
        .map(|v| v["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    for name in &acked {
        assert!(names.contains(name), "{name} missing after recovery");
    }
}
