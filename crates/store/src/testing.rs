//! A real etcd cluster for tests (feature `test-etcd`): Debian's `etcd` binary, members on free
//! loopback ports with data in a temporary directory, killed, paused and restarted on demand,
//! and all stopped when the value is dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    extra: Vec<String>,
}

fn free_port() -> u16 {
    // Members are restarted on their ports: pick them below Linux's ephemeral range
    // (32768-60999) so that no client socket takes one while its member is down. Loopback only.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2654435761);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20000 + (seed.wrapping_add(n.wrapping_mul(7919)) % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Whether Debian's etcd is installed; prints the loud skip line when not.
pub fn etcd_available(test: &str) -> bool {
    let ok = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("!!!! SKIP WARNING: {test}: etcd is not installed (apt-get install etcd-server; scripts/setup.sh --test-tools does it) !!!!");
    }
    ok
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader. `None` (after a loud
    /// SKIP line) when etcd is not installed.
    pub fn start(n: usize, test: &str) -> Option<Self> {
        Self::start_with(n, test, &[])
    }

    /// As `start`, with extra etcd flags for every member (e.g. `--quota-backend-bytes=...`).
    pub fn start_with(n: usize, test: &str, extra: &[&str]) -> Option<Self> {
        if !etcd_available(test) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("isthmus-etcd-")
            .tempdir()
            .expect("temporary directory for etcd");
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            dir,
            members,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            cluster.spawn(i, "new");
        }
        cluster.wait_healthy(Duration::from_secs(30));
        Some(cluster)
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let data: PathBuf = self.dir.path().join(&m.name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log file");
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{}",
                m.client
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{}",
                m.client
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", m.peer))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                m.peer
            ))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-state={state}"))
            .arg("--initial-cluster-token=isthmus-test")
            // Fast elections keep fault tests short.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// Client URLs of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
    }

    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.members[i].child {
            let _ = Command::new("kill")
                .arg(sig)
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Waits until the running members answer `/health` as healthy (a leader exists).
    pub fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            loop {
                if health(m.client) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} not healthy within {limit:?}; log: {}",
                    m.name,
                    std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// etcd's `/health` over plain HTTP/1.0 on loopback: `{"health":"true"}` once the member has a
/// leader.
fn health(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.resume(i);
            self.kill(i);
        }
    }
}
