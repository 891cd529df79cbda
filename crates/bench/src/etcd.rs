//! Starting a real etcd cluster (Debian's `etcd-server`) on loopback for a benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::procfs::ServerProcess;
use crate::server::{REQUEST_TIMEOUT, START_TIMEOUT};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A started cluster: each member's client URL (`http://127.0.0.1:PORT`) and process.
pub struct Cluster {
    pub bases: Vec<String>,
    pub processes: Vec<ServerProcess>,
}

/// Starts an `n`-member etcd cluster on loopback (with one member, in `dir`; else member `k`
/// in `dir/m<k>`) and waits until every member reports healthy.
pub async fn start_cluster(
    bin: &Path,
    dir: &Path,
    client: &reqwest::Client,
    n: usize,
) -> anyhow::Result<Cluster> {
    let mut ports = Vec::new();
    for _ in 0..n {
        ports.push((free_port()?, free_port()?));
    }
    let cluster: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(k, (_, peer))| format!("m{k}=http://127.0.0.1:{peer}"))
        .collect();
    let cluster = cluster.join(",");
    let mut bases = Vec::new();
    let mut processes = Vec::new();
    let mut logs: Vec<PathBuf> = Vec::new();
    for (k, (client_port, peer_port)) in ports.iter().enumerate() {
        let base = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let member_dir = if n == 1 {
            dir.to_path_buf()
        } else {
            dir.join(format!("m{k}"))
        };
        std::fs::create_dir_all(&member_dir)?;
        let log = member_dir.join("etcd.log");
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg(format!("m{k}"))
            .arg("--data-dir")
            .arg(member_dir.join("data"))
            .args([
                "--listen-client-urls",
                &base,
                "--advertise-client-urls",
                &base,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &cluster])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ]);
        processes.push(ServerProcess::spawn("etcd", cmd, &log)?);
        logs.push(log);
        bases.push(base);
    }
    let deadline = Instant::now() + START_TIMEOUT;
    for ((base, process), log) in bases.iter().zip(processes.iter_mut()).zip(&logs) {
        loop {
            process.check_alive(log)?;
            let health = client
                .get(format!("{base}/health"))
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await;
            if let Ok(resp) = health {
                if resp.status().is_success()
                    && resp.text().await.is_ok_and(|t| t.contains("\"true\""))
                {
                    break;
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "etcd at {base} not healthy within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    Ok(Cluster { bases, processes })
}
