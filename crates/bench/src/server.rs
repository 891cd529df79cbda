//! Isthmus under test: the release binary as `isthmus server` on loopback ports the kernel
//! picks, and a client of its admin API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::procfs::ServerProcess;

/// How long the server may take to write its endpoints file and answer /readyz.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-request limit on admin calls, so one stuck request cannot hold the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `DIR/endpoints.json`, written by the server once it listens.
#[derive(Clone, Debug, Deserialize)]
pub struct Endpoints {
    pub admin: String,
    /// `https://127.0.0.1:PORT`: the certificate API (gRPC over TLS).
    pub grpc: String,
}

/// The admin API with its bearer token.
#[derive(Clone, Debug)]
pub struct Admin {
    pub client: reqwest::Client,
    pub base: String,
    pub token: String,
}

/// A running `isthmus server`.
pub struct Started {
    pub process: ServerProcess,
    pub endpoints: Endpoints,
    pub admin: Admin,
    pub data_dir: PathBuf,
}

/// Starts `bin server` with `dir/data` as its data directory and its output in
/// `dir/server.log`, and waits until it answers /readyz.
pub async fn start(bin: &Path, dir: &Path, client: reqwest::Client) -> anyhow::Result<Started> {
    start_with(bin, dir, client, &[]).await
}

/// Like [`start`], with `extra` arguments (a store, say).
pub async fn start_with(
    bin: &Path,
    dir: &Path,
    client: reqwest::Client,
    extra: &[String],
) -> anyhow::Result<Started> {
    let data = dir.join("data");
    let log = dir.join("server.log");
    let mut cmd = Command::new(bin);
    cmd.arg("server").arg("--data-dir").arg(&data).args([
        "--admin-addr",
        "127.0.0.1:0",
        "--registration-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--dns-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    cmd.args(extra);
    let mut process = ServerProcess::spawn("isthmus server", cmd, &log)?;
    let deadline = Instant::now() + START_TIMEOUT;
    let endpoints_file = data.join("endpoints.json");
    let endpoints: Endpoints = loop {
        process.check_alive(&log)?;
        // The file is written atomically, so a readable one is complete.
        if let Ok(bytes) = std::fs::read(&endpoints_file) {
            break serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not the endpoints file", endpoints_file.display())
            })?;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "isthmus server wrote no {} within {START_TIMEOUT:?}",
            endpoints_file.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let token_file = data.join("admin-token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("cannot read the admin token {}", token_file.display()))?
        .trim()
        .to_string();
    let base = endpoints.admin.clone();
    loop {
        process.check_alive(&log)?;
        let ready = client
            .get(format!("{base}/readyz"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "isthmus server at {base} not ready within {START_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Started {
        process,
        endpoints,
        admin: Admin {
            client,
            base,
            token,
        },
        data_dir: data,
    })
}

impl Admin {
    /// `GET path`, the body as text; fails on a non-2xx status.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::ensure!(status.is_success(), "GET {path} → HTTP {status}: {text}");
        Ok(text)
    }

    /// `GET path`, the body decoded from JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let text = self.get_text(path).await?;
        serde_json::from_str(&text).with_context(|| format!("GET {path}: unexpected body {text}"))
    }

    /// `POST path` with a JSON body, the answer decoded from JSON; fails on a non-2xx status.
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::ensure!(status.is_success(), "POST {path} → HTTP {status}: {text}");
        serde_json::from_str(&text).with_context(|| format!("POST {path}: unexpected body {text}"))
    }
}
