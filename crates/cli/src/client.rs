//! A small client of the admin API with errors an operator can act on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_model::client_config::{self, ClientConfig, ServerRecord};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::args::Connection;
use crate::tokenarg;

/// A server's admin token file, in its data directory.
const ADMIN_TOKEN_FILE: &str = "admin-token";

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:15080";
/// Where a local server keeps its admin token: the default data dir, then the Debian package's.
pub const SERVER_TOKEN_FILES: [&str; 2] = [
    "/var/lib/isthmus/admin-token",
    "/var/lib/isthmus-server/admin-token",
];

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the control plane at {url}: {cause}\nhint: is `isthmus server` running there? Point to it with --server or ISTHMUS_SERVER")]
    Unreachable { url: String, cause: String },
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    /// Says where the token could be and how to pass it (see `no_token`).
    #[error("{0}")]
    NoToken(String),
    #[error("{0}")]
    TokenArg(tokenarg::TokenArgError),
    #[error("the config file {path} is unreadable: {cause}")]
    Config { path: String, cause: String },
    #[error("unexpected answer from {url}: {cause}")]
    Protocol { url: String, cause: String },
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    /// The replica answering now (one of `bases`).
    pub base: String,
    /// Every admin URL given (`--server a,b,c`): when one cannot be reached, the next is tried.
    bases: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
    token: String,
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl Client {
    /// Resolves server and token from flags/env, then a running server of this user (its
    /// record, see `ServerRecord`), then the config file, then the local server's token file.
    pub fn from_connection(conn: &Connection) -> Result<Self, ClientError> {
        let config_path = conn.config.clone().or_else(client_config::default_path);
        let file: Option<ClientConfig> = match &config_path {
            Some(p) if p.exists() => {
                let err = |cause: String| ClientError::Config {
                    path: p.display().to_string(),
                    cause,
                };
                let text = std::fs::read_to_string(p).map_err(|e| err(e.to_string()))?;
                Some(serde_json::from_str(&text).map_err(|e| err(e.to_string()))?)
            }
            _ => None,
        };
        let server = conn
            .server
            .clone()
            .or_else(|| file.as_ref().map(|f| f.server.clone()))
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        if let Some(arg) = &conn.token {
            let token = tokenarg::read("--token", arg).map_err(ClientError::TokenArg)?;
            return Ok(Client::new(&server, &token));
        }
        // A server of this user answering at `server`: its token is in its data dir, which
        // beats a config file an earlier `--dev` run may have left.
        let first = server
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let recorded = running_server_at(&first);
        let mut unreadable = Vec::new();
        let mut read = |path: &Path| match std::fs::read_to_string(path) {
            Ok(t) => Some(t.trim().to_string()).filter(|t| !t.is_empty()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                unreadable.push(format!("{} ({e})", path.display()));
                None
            }
        };
        let token = recorded
            .as_ref()
            .and_then(|r| read(&r.data_dir.join(ADMIN_TOKEN_FILE)))
            .or_else(|| {
                file.as_ref()
                    .map(|f| f.token.trim().to_string())
                    .filter(|t| !t.is_empty())
            })
            .or_else(|| SERVER_TOKEN_FILES.iter().find_map(|f| read(Path::new(f))));
        if let Some(token) = token {
            return Ok(Client::new(&server, &token));
        }
        Err(no_token(
            config_path.as_deref(),
            recorded.as_ref().map(|r| r.data_dir.join(ADMIN_TOKEN_FILE)),
            &unreadable,
        ))
    }

    pub fn new(server: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let bases: Vec<String> = server
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Client {
            http,
            base: bases.first().cloned().unwrap_or_default(),
            bases,
            current: Default::default(),
            token: token.to_string(),
        }
    }

    /// The same credentials against another admin URL (another replica).
    pub fn at(&self, server: &str) -> Client {
        Client::new(server, &self.token)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_now())
    }

    fn base_now(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.bases.get(i).map_or(&self.base, |b| b.as_str())
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<reqwest::Response, ClientError> {
        // Several replicas: a request that could not connect (so did nothing) goes to the next.
        let start = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let n = self.bases.len().max(1);
        let mut failures = Vec::new();
        let mut answered = None;
        for k in 0..n {
            let i = (start + k) % n;
            let base = self.bases.get(i).map_or(self.base.as_str(), |b| b.as_str());
            let url = format!("{base}{path}");
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&self.token);
            if let Some((ct, bytes)) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, *ct)
                    .body(bytes.clone());
            }
            match req.send().await {
                Ok(resp) => {
                    self.current.store(i, std::sync::atomic::Ordering::Relaxed);
                    answered = Some(resp);
                    break;
                }
                // Connect failures only: a request that reached a server may have been applied.
                Err(e) if e.is_connect() && k + 1 < n => {
                    failures.push(format!("{base} ({})", root_cause(&e)));
                }
                Err(e) => {
                    failures.push(format!("{base} ({})", root_cause(&e)));
                    let (url, cause) = if failures.len() == 1 {
                        (base.to_string(), root_cause(&e))
                    } else {
                        (
                            self.bases.join(","),
                            format!("none answered: {}", failures.join("; ")),
                        )
                    };
                    return Err(ClientError::Unreachable { url, cause });
                }
            }
        }
        let Some(resp) = answered else {
            return Err(ClientError::Unreachable {
                url: self.bases.join(","),
                cause: "no server given".into(),
            });
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{status}: {}", text.trim()));
        Err(ClientError::Api { status, message })
    }

    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, body).await?;
        let url = self.url(path);
        let bytes = resp.bytes().await.map_err(|e| ClientError::Protocol {
            url: url.clone(),
            cause: root_cause(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            url,
            cause: e.to_string(),
        })
    }
}

/// The record of a running server of this user whose admin API is at `server`: same port,
/// and the same address or one of the two listening on every address.
fn running_server_at(server: &str) -> Option<ServerRecord> {
    let want = host_port(server)?;
    let dir = client_config::servers_dir()?;
    let mut found: Vec<ServerRecord> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .filter(|r: &ServerRecord| Path::new(&format!("/proc/{}", r.pid)).exists())
        .filter(|r| {
            host_port(&r.admin).is_some_and(|(ip, port)| {
                port == want.1 && (ip == want.0 || ip.is_unspecified() || want.0.is_unspecified())
            })
        })
        .collect();
    // The newest server (highest pid is a guess; ties are rare) wins.
    found.sort_by_key(|r| r.pid);
    found.pop()
}

/// `http://IP:PORT[/...]` to its address; `localhost` counts as 127.0.0.1.
fn host_port(url: &str) -> Option<(std::net::IpAddr, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let authority = authority.replace("localhost", "127.0.0.1");
    let a: std::net::SocketAddr = authority.parse().ok()?;
    Some((a.ip(), a.port()))
}

/// No token anywhere: where it could be, and the ways to pass it.
fn no_token(
    config: Option<&Path>,
    recorded: Option<PathBuf>,
    unreadable: &[String],
) -> ClientError {
    let config = config.map_or_else(
        || "~/.config/isthmus/config.json".into(),
        |p| p.display().to_string(),
    );
    let mut msg = String::from("no admin token");
    if !unreadable.is_empty() {
        msg.push_str(&format!(
            ": cannot read {} (run as the server's user, e.g. with sudo)",
            unreadable.join(", ")
        ));
    }
    let example = recorded.map_or_else(
        || "<data-dir>/admin-token".to_string(),
        |p| p.display().to_string(),
    );
    msg.push_str(&format!(
        ".\nhint: a server keeps its admin token in <data-dir>/admin-token (--data-dir, /var/lib/isthmus by default); pass it with --token @{example} or ISTHMUS_TOKEN=$(cat {example}), or run `isthmus server --dev`, which writes {config}"
    ));
    ClientError::NoToken(msg)
}

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
