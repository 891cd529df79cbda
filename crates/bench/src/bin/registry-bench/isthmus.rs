//! Isthmus under test: the release binary as `isthmus server`, driven through its admin API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use isthmus_bench::procfs::ServerProcess;
use isthmus_bench::server::{self, Admin};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::REQUEST_TIMEOUT;
use crate::driver::{address, entry_name, service, Many, Target, NAMESPACE};

pub struct Isthmus {
    admin: Admin,
    /// The etcd it stores in, kept running as long as the server (`--store etcd`).
    _etcd: Vec<ServerProcess>,
}

/// A service and a workload entry as Isthmus stores them for registration 0, so that etcd is
/// given values of the same shape and size.
#[derive(Clone, Debug)]
pub struct Templates {
    pub service: String,
    pub entry: String,
}

impl Templates {
    /// Only when Isthmus could not be asked: objects shaped like its own.
    pub fn fallback() -> Self {
        let (svc, ip, entry) = (service(0), address(0), entry_name(0));
        Templates {
            service: json!({
                "apiVersion": "isthmus.dev/v1alpha1", "kind": "Service",
                "metadata": {"name": svc, "namespace": NAMESPACE,
                    "annotations": {"isthmus.dev/created-by": "register"},
                    "uid": "00000000-0000-4000-8000-000000000000",
                    "creationTimestamp": "2025-01-01T00:00:00.000000000Z"},
                "spec": {"ports": [{"name": "http", "port": 8080, "protocol": "HTTP"}]},
                "status": {"vip": "10.96.0.1"}
            })
            .to_string(),
            entry: json!({
                "apiVersion": "isthmus.dev/v1alpha1", "kind": "WorkloadEntry",
                "metadata": {"name": entry, "namespace": NAMESPACE,
                    "uid": "00000000-0000-4000-8000-000000000000",
                    "creationTimestamp": "2025-01-01T00:00:00.000000000Z"},
                "spec": {"address": ip, "ports": {"http": 8080}, "serviceAccount": "default", "services": [svc]}
            })
            .to_string(),
        }
    }
}

/// Starts `isthmus server` with `dir/data` as its data directory and waits until it is ready.
pub async fn start(
    bin: PathBuf,
    dir: PathBuf,
    client: reqwest::Client,
) -> anyhow::Result<(Arc<Isthmus>, ServerProcess)> {
    let started = server::start(&bin, &dir, client).await?;
    Ok((
        Arc::new(Isthmus {
            admin: started.admin,
            _etcd: Vec::new(),
        }),
        started.process,
    ))
}

/// Starts a one-member etcd in `dir/etcd` and `isthmus server --store etcd` on it, as one
/// replica of several would run; the process measured is the server's.
pub async fn start_on_etcd(
    bin: PathBuf,
    etcd_bin: PathBuf,
    dir: PathBuf,
    client: reqwest::Client,
) -> anyhow::Result<(Arc<Isthmus>, ServerProcess)> {
    let (mut many, first) = replicas(bin, etcd_bin, dir, client, 1, 1).await?;
    let mut only = many.members.remove(0);
    // The etcd processes go with the one server.
    Arc::get_mut(&mut only)
        .expect("not shared yet")
        ._etcd
        .append(&mut many._keep);
    Ok((only, first))
}

/// `n` replicas on an `n`-member etcd: registrations round-robin over them.
pub async fn start_cluster(
    bin: PathBuf,
    etcd_bin: PathBuf,
    dir: PathBuf,
    client: reqwest::Client,
    n: usize,
) -> anyhow::Result<(Arc<Many<Isthmus>>, ServerProcess)> {
    let (many, first) = replicas(bin, etcd_bin, dir, client, n, n).await?;
    Ok((Arc::new(many), first))
}

async fn replicas(
    bin: PathBuf,
    etcd_bin: PathBuf,
    dir: PathBuf,
    client: reqwest::Client,
    members: usize,
    n: usize,
) -> anyhow::Result<(Many<Isthmus>, ServerProcess)> {
    let etcd_dir = dir.join("etcd");
    std::fs::create_dir_all(&etcd_dir)?;
    let (etcds, etcd_processes) = crate::etcd::start_cluster(
        etcd_bin,
        etcd_dir,
        client.clone(),
        Templates::fallback(),
        members,
    )
    .await?;
    let endpoints: Vec<&str> = etcds.iter().map(|e| e.base()).collect();
    let endpoints = endpoints.join(",");
    let seal = dir.join("seal.key");
    std::fs::write(&seal, "b7".repeat(32))?;
    std::fs::set_permissions(&seal, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mut servers = Vec::new();
    let mut keep = etcd_processes;
    let mut first = None;
    for k in 0..n {
        let replica_dir = if n == 1 {
            dir.clone()
        } else {
            dir.join(format!("r{k}"))
        };
        let data = replica_dir.join("data");
        std::fs::create_dir_all(&data)?;
        let token = data.join("admin-token");
        std::fs::write(&token, "registry-bench-admin-token")?;
        let extra = [
            "--store".to_string(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            endpoints.clone(),
            "--seal-key-file".into(),
            seal.display().to_string(),
            "--admin-token-file".into(),
            token.display().to_string(),
            "--replica-name".into(),
            format!("r{k}"),
        ];
        let started = server::start_with(&bin, &replica_dir, client.clone(), &extra).await?;
        servers.push(Arc::new(Isthmus {
            admin: started.admin,
            _etcd: Vec::new(),
        }));
        if first.is_none() {
            first = Some(started.process);
        } else {
            keep.push(started.process);
        }
    }
    let first = first.ok_or_else(|| anyhow::anyhow!("no replica"))?;
    Ok((
        Many {
            members: servers,
            _keep: keep,
        },
        first,
    ))
}

impl Isthmus {
    /// The stored service and workload entry of registration 0.
    pub async fn templates(&self) -> anyhow::Result<Templates> {
        let ns = NAMESPACE;
        Ok(Templates {
            service: self
                .admin
                .get_text(&format!("/api/v1/namespaces/{ns}/services/{}", service(0)))
                .await?,
            entry: self
                .admin
                .get_text(&format!(
                    "/api/v1/namespaces/{ns}/workloadentries/{}",
                    entry_name(0)
                ))
                .await?,
        })
    }
}

/// The object name in one server-sent event's `data:` lines.
fn sse_object_name(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n");
    if data.is_empty() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&data).ok()?;
    v.pointer("/object/metadata/name")?
        .as_str()
        .map(str::to_string)
}

impl Target for Isthmus {
    async fn register(&self, i: usize) -> anyhow::Result<()> {
        let body = json!({"service": service(i), "namespace": NAMESPACE, "ip": address(i), "ports": ["http:8080"]});
        let resp = self
            .admin
            .client
            .post(format!("{}/api/v1/register", self.admin.base))
            .bearer_auth(&self.admin.token)
            .json(&body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        let status = resp.status();
        // Read the body in full so the connection goes back to the pool.
        let bytes = resp.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "register {} → HTTP {status}: {}",
            service(i),
            String::from_utf8_lossy(&bytes)
        );
        Ok(())
    }

    fn watch_key(&self, i: usize) -> String {
        entry_name(i)
    }

    async fn watch(
        &self,
        events: mpsc::UnboundedSender<(String, Instant)>,
    ) -> anyhow::Result<JoinHandle<()>> {
        let resp = self
            .admin
            .client
            .get(format!(
                "{}/api/v1/watch?kind=workloadentries&namespace={NAMESPACE}",
                self.admin.base
            ))
            .bearer_auth(&self.admin.token)
            .send()
            .await?;
        let status = resp.status();
        anyhow::ensure!(
            status.is_success(),
            "watch → HTTP {status}: {}",
            resp.text().await.unwrap_or_default()
        );
        let mut body = resp.bytes_stream();
        Ok(tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(chunk)) = body.next().await {
                let at = Instant::now();
                buf.extend_from_slice(&chunk);
                // One pass over the buffer, one drain at the end: a chunk may hold thousands of
                // events (the initial state).
                let mut from = 0;
                while let Some(len) = buf[from..].windows(2).position(|w| w == b"\n\n") {
                    if let Some(name) = sse_object_name(&buf[from..from + len]) {
                        if events.send((name, at)).is_err() {
                            return;
                        }
                    }
                    from += len + 2;
                }
                buf.drain(..from);
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_name_from_an_sse_event() {
        let ev = b"event: ADDED\nid: 7\ndata: {\"type\":\"ADDED\",\"revision\":7,\"object\":{\"metadata\":{\"name\":\"svc-1-10-1-1-2\"}}}\n\n";
        assert_eq!(sse_object_name(ev).as_deref(), Some("svc-1-10-1-1-2"));
        assert_eq!(sse_object_name(b":\n\n"), None);
    }
}
