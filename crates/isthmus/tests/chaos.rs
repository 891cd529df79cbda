//! Three replicas on a three-member etcd under faults, with a history check: clients register,
//! delete and read services through every replica while replicas and etcd members are
//! SIGKILLed and restarted or SIGSTOPped and resumed (at least 20 faults, quorum lost twice);
//! afterwards every service's history must be linearizable (no acknowledged write lost, no stale
//! read, no VIP changed under a service), and no two services may share a VIP. Loud SKIP when
//! etcd is not installed; CI installs it.

mod common;
#[path = "support/linearizability.rs"]
mod linearizability;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use isthmus_store::testing::EtcdCluster;
use linearizability::{check_at, Input, Operation, Output, Service};

const TOKEN: &str = "chaos-test-admin-token";
const KEYS: usize = 6;
const CLIENTS: usize = 6;
const FAULTS: usize = 24;

fn start_replica(dir: &Path, endpoints: &str, seal: &Path) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    let token = dir.join("admin-token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--data-dir"])
        .arg(dir)
        .args(ANY_PORTS)
        .args(["--store", "etcd", "--etcd-endpoints", endpoints])
        .args([
            "--etcd-prefix",
            "/isthmus/chaos",
            "--etcd-request-timeout",
            "2s",
        ])
        .args(["--lease-ttl", "2s"])
        .arg("--seal-key-file")
        .arg(seal)
        .arg("--admin-token-file")
        .arg(&token);
    Server::start_command(cmd, dir)
}

struct Replica {
    dir: PathBuf,
    server: Option<Server>,
}

/// Where the clients send requests: the admin URL of each replica that runs.
type Urls = Arc<Mutex<Vec<Option<String>>>>;

#[derive(Clone)]
struct Recorded {
    key: usize,
    op: Operation<Service>,
    /// Which replica answered and how (status or error), for the report of a failure.
    how: String,
}

fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// One request and what it says about the service: `Some(Some(out))` a definite answer,
/// `Some(None)` an unknown outcome (the write may have been applied), `None` nothing happened.
async fn request(
    http: &reqwest::Client,
    base: &str,
    key: usize,
    input: &Input,
    n: u64,
) -> (Option<Option<Output>>, String) {
    let name = format!("svc{key}");
    let url = format!("{base}/api/v1/namespaces/chaos/services/{name}");
    let sent = match input {
        Input::Register => {
            http.post(format!("{base}/api/v1/register"))
                .bearer_auth(TOKEN)
                .json(&serde_json::json!({
                    "service": name,
                    "namespace": "chaos",
                    "ip": format!("10.9.{}.{}", key, n % 250 + 1),
                    "ports": ["80"],
                }))
                .send()
                .await
        }
        Input::Delete => http.delete(&url).bearer_auth(TOKEN).send().await,
        Input::Get => http.get(&url).bearer_auth(TOKEN).send().await,
    };
    let resp = match sent {
        Ok(r) => r,
        // Never connected: nothing was sent, nothing happened.
        Err(e) if e.is_connect() => return (None, format!("{base}: not connected: {e}")),
        // Sent and no answer: a write may have been applied.
        Err(e) if matches!(input, Input::Get) => return (None, format!("{base}: {e}")),
        Err(e) => return (Some(None), format!("{base}: no answer: {e}")),
    };
    let status = resp.status().as_u16();
    let body = resp.bytes().await;
    // Who answered, the status, the revisions the answer names (the object's
    // resourceVersion, the write's revision) and the start of the body.
    let how = match &body {
        Ok(b) => {
            let v: serde_json::Value = serde_json::from_slice(b).unwrap_or_default();
            let rv = v["metadata"]["resourceVersion"]
                .as_str()
                .or(v["object"]["metadata"]["resourceVersion"].as_str())
                .unwrap_or("-")
                .to_string();
            format!(
                "{base}: {status} rv={rv} rev={} {}",
                v["revision"],
                String::from_utf8_lossy(&b[..b.len().min(160)])
            )
        }
        Err(e) => format!("{base}: {status} (body lost: {e})"),
    };
    let Ok(body) = body else {
        // The answer was cut off: a write's outcome is unknown.
        return (
            (!matches!(input, Input::Get) && status < 300).then_some(None),
            how,
        );
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let vip = |v: &serde_json::Value| v.as_str().map(|s| Output::Vip(s.to_string()));
    let outcome = match (input, status) {
        (Input::Register, 200 | 201) => Some(vip(&body["vip"])),
        (Input::Get, 200) => vip(&body["status"]["vip"]).map(Some),
        (Input::Get, 404) => Some(Some(Output::NotFound)),
        (Input::Delete, 200) => Some(Some(Output::Deleted(true))),
        (Input::Delete, 404) => Some(Some(Output::Deleted(false))),
        (Input::Get, _) => None,
        (_, _) => {
            let message = body.to_string().to_lowercase();
            // One transaction per request: refused before etcd had it, or it may have been
            // applied (etcd timed out after it was sent).
            message.contains("may have been applied").then_some(None)
        }
    };
    (outcome, how)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_and_etcd_members_fail_and_every_history_stays_linearizable() {
    let Some(etcd) = EtcdCluster::start(3, "replicas chaos") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let seal = tmp.path().join("seal.key");
    std::fs::write(&seal, "5a".repeat(32)).unwrap();
    std::fs::set_permissions(&seal, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let endpoints = etcd.endpoints().join(",");
    let replicas: Vec<Replica> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let dir = tmp.path().join(n);
            let server = start_replica(&dir, &endpoints, &seal);
            Replica {
                dir,
                server: Some(server),
            }
        })
        .collect();
    let urls: Urls = Arc::new(Mutex::new(
        replicas
            .iter()
            .map(|r| r.server.as_ref().map(|s| s.admin.clone()))
            .collect(),
    ));
    let start = Instant::now();
    let history: Arc<Mutex<Vec<Recorded>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(6))
        .build()
        .unwrap();

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (urls, history, stop, http) =
            (urls.clone(), history.clone(), stop.clone(), http.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let key = rand::random::<u32>() as usize % KEYS;
                let input = match rand::random::<u32>() % 10 {
                    0..=3 => Input::Register,
                    4..=5 => Input::Delete,
                    _ => Input::Get,
                };
                let live: Vec<String> = urls.lock().unwrap().iter().flatten().cloned().collect();
                if live.is_empty() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let base = &live[rand::random::<u32>() as usize % live.len()];
                let call = now_ns(start);
                let (outcome, how) =
                    request(&http, base, key, &input, n * CLIENTS as u64 + c as u64).await;
                let ret = now_ns(start);
                let failed = !matches!(outcome, Some(Some(_)));
                if outcome.is_none() {
                    // Taken as "nothing happened": kept for the report of a failure only.
                    history.lock().unwrap().push(Recorded {
                        key,
                        op: Operation {
                            call,
                            ret,
                            input: input.clone(),
                            output: None,
                        },
                        how: format!("NOT IN THE HISTORY (taken as not applied): {how}"),
                    });
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                if let Some(output) = outcome {
                    history.lock().unwrap().push(Recorded {
                        key,
                        op: Operation {
                            call,
                            ret,
                            input,
                            output,
                        },
                        how,
                    });
                }
                let pause = if failed { 200 } else { 10 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }

    // The faults, one every ~1.2 s, each undone before the next (so at most one replica and
    // one etcd member are down at a time, except the two quorum losses).
    let faults = tokio::task::spawn_blocking({
        let urls = urls.clone();
        move || {
            let mut replicas = replicas;
            let mut etcd = etcd;
            let mut log = Vec::new();
            for f in 0..FAULTS {
                std::thread::sleep(Duration::from_millis(600));
                let r = rand::random::<u32>() as usize % 3;
                let m = rand::random::<u32>() as usize % 3;
                match f % 6 {
                    0 => {
                        // A replica SIGKILLed, then started again on its data dir.
                        urls.lock().unwrap()[r] = None;
                        if let Some(mut s) = replicas[r].server.take() {
                            s.kill9();
                        }
                        std::thread::sleep(Duration::from_millis(600));
                        let s = start_replica(&replicas[r].dir, &endpoints, &seal);
                        urls.lock().unwrap()[r] = Some(s.admin.clone());
                        replicas[r].server = Some(s);
                        log.push(format!("replica {r} killed and restarted"));
                    }
                    1 => {
                        let pid = replicas[r].server.as_ref().unwrap().child.id() as i32;
                        let pid = nix::unistd::Pid::from_raw(pid);
                        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
                        std::thread::sleep(Duration::from_millis(2500));
                        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
                        log.push(format!("replica {r} paused past its lease and resumed"));
                    }
                    2 => {
                        etcd.kill(m);
                        std::thread::sleep(Duration::from_millis(800));
                        etcd.restart(m);
                        log.push(format!("etcd member {m} killed and restarted"));
                    }
                    3 => {
                        etcd.pause(m);
                        std::thread::sleep(Duration::from_millis(1500));
                        etcd.resume(m);
                        log.push(format!("etcd member {m} paused and resumed"));
                    }
                    4 if f < 12 => {
                        // Quorum lost: two members down.
                        let other = (m + 1) % 3;
                        etcd.kill(m);
                        etcd.kill(other);
                        std::thread::sleep(Duration::from_millis(1500));
                        etcd.restart(m);
                        etcd.restart(other);
                        log.push(format!("etcd quorum lost (members {m}, {other}) and back"));
                    }
                    _ => {
                        urls.lock().unwrap()[r] = None;
                        if let Some(mut s) = replicas[r].server.take() {
                            s.kill9();
                        }
                        etcd.kill(m);
                        std::thread::sleep(Duration::from_millis(800));
                        etcd.restart(m);
                        let s = start_replica(&replicas[r].dir, &endpoints, &seal);
                        urls.lock().unwrap()[r] = Some(s.admin.clone());
                        replicas[r].server = Some(s);
                        log.push(format!(
                            "replica {r} and etcd member {m} killed together, restarted"
                        ));
                    }
                }
                etcd.wait_healthy(Duration::from_secs(30));
            }
            (replicas, etcd, log)
        }
    });
    let (replicas, _etcd, log) = faults.await.unwrap();
    // Healed: let the clients run a little longer, then stop them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    // Final reads of every service through every replica, after everything settled.
    let live: Vec<String> = urls.lock().unwrap().iter().flatten().cloned().collect();
    for key in 0..KEYS {
        for base in &live {
            let call = now_ns(start);
            let (output, how) = request(&http, base, key, &Input::Get, 0).await;
            let output = output
                .flatten()
                .expect("a read after the faults is answered");
            history.lock().unwrap().push(Recorded {
                key,
                op: Operation {
                    call,
                    ret: now_ns(start),
                    input: Input::Get,
                    output: Some(output),
                },
                how,
            });
        }
    }

    // Linearizable reads that etcd answered from behind a revision the replica had seen
    // (etcd-io/etcd#20418, in etcd before 3.4.42), refused and asked again by the store: counted
    // by the replicas still running since their last start.
    let mut stale_reads = 0u64;
    for s in replicas.iter().filter_map(|r| r.server.as_ref()) {
        let text = http
            .get(format!("{}/metrics", s.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        stale_reads += text
            .lines()
            .filter(|l| {
                l.starts_with("isthmus_store_errors_total{") && l.contains("etcd_stale_read")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
    }
    eprintln!(
        "chaos: stale etcd reads refused and asked again by the running replicas: {stale_reads}"
    );

    let history = history.lock().unwrap().clone();
    let mut per_key: BTreeMap<usize, Vec<Operation<Service>>> = BTreeMap::new();
    let ignored = |r: &Recorded| r.how.starts_with("NOT IN THE HISTORY");
    for r in history.iter().filter(|r| !ignored(r)) {
        per_key.entry(r.key).or_default().push(r.op.clone());
    }
    let acknowledged = history.iter().filter(|r| r.op.output.is_some()).count();
    let unknown = history.iter().filter(|r| !ignored(r)).count() - acknowledged;
    eprintln!(
        "chaos: {} faults ({}), {} operations answered, {} with unknown outcome, over {:?}",
        log.len(),
        log.join("; "),
        acknowledged,
        unknown,
        start.elapsed()
    );
    assert!(log.len() >= 20, "at least 20 faults");
    assert!(
        acknowledged >= 200,
        "too few operations to judge: {acknowledged}"
    );
    for (key, ops) in per_key {
        let started = Instant::now();
        let n = ops.len();
        if let Err((e, at)) = check_at(Service::Absent, ops) {
            // Everything recorded for this service in the second before the first operation no
            // order explains, with who answered and how.
            let around: Vec<String> = history
                .iter()
                .filter(|r| r.key == key && r.op.call + 1_000_000_000 >= at && r.op.call <= at)
                .map(|r| {
                    format!(
                        "{:?}->{:?}@[{},{}] {}",
                        r.op.input, r.op.output, r.op.call, r.op.ret, r.how
                    )
                })
                .collect();
            panic!(
                "service svc{key}: {e}\nthe second before it:\n{}",
                around.join("\n")
            );
        }
        eprintln!(
            "svc{key}: {n} operations linearizable (checked in {:?})",
            started.elapsed()
        );
    }

    // No two services share a VIP.
    let any = replicas.iter().find_map(|r| r.server.as_ref()).unwrap();
    let list = any.ok(&["get", "services", "-n", "chaos", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let items = v["items"]
        .as_array()
        .or(v.as_array())
        .cloned()
        .unwrap_or_default();
    let mut vips: Vec<&str> = items
        .iter()
        .filter_map(|s| s["status"]["vip"].as_str())
        .collect();
    let n = vips.len();
    vips.sort();
    vips.dedup();
    assert_eq!(vips.len(), n, "two services share a VIP: {list}");
}
