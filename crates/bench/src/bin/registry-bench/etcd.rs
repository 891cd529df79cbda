//! etcd as the comparison: one member on loopback, driven through its v3 JSON gateway with the
//! same HTTP client. A registration is one transaction writing what Isthmus writes for it: the
//! service, the workload entry and the VIP bookkeeping key, guarded by create-revision compares.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::REQUEST_TIMEOUT;
use crate::driver::{address, entry_name, service, Target, NAMESPACE};
use crate::isthmus::Templates;
use isthmus_bench::procfs::ServerProcess;

const SERVICES: &str = "/registry/services/";
const ENTRIES: &str = "/registry/workloadentries/";
const VIPS: &str = "/registry/vips/";

pub struct Etcd {
    client: reqwest::Client,
    base: String,
    templates: Templates,
}

/// `etcd --version`'s version number, or why there is none.
pub fn version(bin: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (install Debian's etcd-server)",
                bin.display()
            )
        })?;
    anyhow::ensure!(
        out.status.success(),
        "{} --version failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("{} --version printed no version: {text}", bin.display()))
}

/// A port nobody listens on now; etcd binds it a moment later (loopback, so a clash is unlikely
/// and shows as a failed start).
/// Starts a one-member etcd with `dir/data` as its data directory and waits for /health.
pub async fn start(
    bin: PathBuf,
    dir: PathBuf,
    client: reqwest::Client,
    templates: Templates,
) -> anyhow::Result<(Arc<Etcd>, ServerProcess)> {
    let (mut members, mut processes) = start_cluster(bin, dir, client, templates, 1).await?;
    Ok((members.remove(0), processes.remove(0)))
}

/// Starts an `n`-member etcd cluster on loopback and waits until every member is healthy.
pub async fn start_cluster(
    bin: PathBuf,
    dir: PathBuf,
    client: reqwest::Client,
    templates: Templates,
    n: usize,
) -> anyhow::Result<(Vec<Arc<Etcd>>, Vec<ServerProcess>)> {
    let cluster = isthmus_bench::etcd::start_cluster(&bin, &dir, &client, n).await?;
    let members = cluster
        .bases
        .into_iter()
        .map(|base| {
            Arc::new(Etcd {
                client: client.clone(),
                base,
                templates: templates.clone(),
            })
        })
        .collect();
    Ok((members, cluster.processes))
}

impl Etcd {
    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn base(&self) -> &str {
        &self.base
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    if let Some(last) = bytes.last_mut() {
        // Every prefix here ends in '/', so this never overflows.
        *last += 1;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Etcd {
    /// The service and entry values of registration `i`: Isthmus's stored objects of
    /// registration 0 with the names and the address replaced.
    fn values(&self, i: usize) -> (String, String) {
        let quoted = |s: String| format!("\"{s}\"");
        let svc = self
            .templates
            .service
            .replace(&quoted(service(0)), &quoted(service(i)));
        let entry = self
            .templates
            .entry
            .replace(&entry_name(0), &entry_name(i))
            .replace(&address(0), &address(i))
            .replace(&quoted(service(0)), &quoted(service(i)));
        (svc, entry)
    }
}

fn event_keys(message: &Value) -> impl Iterator<Item = String> + '_ {
    message
        .pointer("/result/events")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.pointer("/kv/key")?.as_str())
        .filter_map(|k| String::from_utf8(B64.decode(k).ok()?).ok())
}

impl Target for Etcd {
    async fn register(&self, i: usize) -> anyhow::Result<()> {
        let svc_key = format!("{SERVICES}{NAMESPACE}/{}", service(i));
        let entry_key = format!("{ENTRIES}{NAMESPACE}/{}", entry_name(i));
        // A distinct VIP per registration, as Isthmus allocates one per new service.
        let vip_key = format!(
            "{VIPS}10.{}.{}.{}",
            96 + i / 65_536 % 16,
            i / 256 % 256,
            i % 256
        );
        let (svc, entry) = self.values(i);
        let create = |k: &str| json!({"key": b64(k), "target": "CREATE", "result": "EQUAL", "create_revision": "0"});
        let put = |k: &str, v: &str| json!({"request_put": {"key": b64(k), "value": b64(v)}});
        let body = json!({
            "compare": [create(&svc_key), create(&entry_key)],
            "success": [put(&svc_key, &svc), put(&entry_key, &entry), put(&vip_key, &svc_key)],
        });
        let resp = self
            .client
            .post(format!("{}/v3/kv/txn", self.base))
            .json(&body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "txn for {} → HTTP {status}: {}",
            service(i),
            String::from_utf8_lossy(&bytes)
        );
        // The gateway leaves out `succeeded` when it is false.
        let answer: Value =
            serde_json::from_slice(&bytes).context("etcd's txn answer is not JSON")?;
        anyhow::ensure!(
            answer["succeeded"] == json!(true),
            "txn for {} failed its compares: {answer}",
            service(i)
        );
        Ok(())
    }

    fn watch_key(&self, i: usize) -> String {
        format!("{ENTRIES}{NAMESPACE}/{}", entry_name(i))
    }

    async fn watch(
        &self,
        events: mpsc::UnboundedSender<(String, Instant)>,
    ) -> anyhow::Result<JoinHandle<()>> {
        let prefix = format!("{ENTRIES}{NAMESPACE}/");
        let body = json!({"create_request": {"key": b64(&prefix), "range_end": b64(&prefix_end(&prefix))}});
        let resp = self
            .client
            .post(format!("{}/v3/watch", self.base))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        anyhow::ensure!(
            status.is_success(),
            "watch → HTTP {status}: {}",
            resp.text().await.unwrap_or_default()
        );
        let mut stream = resp.bytes_stream();
        Ok(tokio::spawn(async move {
            // The gateway streams one JSON object per message, newline-separated.
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                let at = Instant::now();
                buf.extend_from_slice(&chunk);
                let mut from = 0;
                while let Some(len) = buf[from..].iter().position(|&b| b == b'\n') {
                    if let Ok(message) = serde_json::from_slice::<Value>(&buf[from..from + len]) {
                        for key in event_keys(&message) {
                            if events.send((key, at)).is_err() {
                                return;
                            }
                        }
                    }
                    from += len + 1;
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
    fn prefix_end_covers_the_prefix() {
        assert_eq!(
            prefix_end("/registry/workloadentries/bench/"),
            "/registry/workloadentries/bench0"
        );
    }

    #[test]
    fn reads_keys_from_a_watch_message() {
        let m: Value = serde_json::from_str(
            r#"{"result":{"header":{"revision":"2"},"events":[{"kv":{"key":"L3JlZ2lzdHJ5L2E=","value":"aGVsbG8="}}]}}"#,
        )
        .unwrap();
        assert_eq!(
            event_keys(&m).collect::<Vec<_>>(),
            vec!["/registry/a".to_string()]
        );
    }
}
