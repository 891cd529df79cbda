//! A small client of the admin API with errors an operator can act on.

use std::path::Path;
use std::time::Duration;

use isthmus_model::client_config::{self, ClientConfig};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::args::Connection;

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
    #[error("no admin token: pass --token, set ISTHMUS_TOKEN, or run `isthmus server --dev`, which writes {config}")]
    NoToken { config: String },
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
    pub base: String,
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
    /// Resolves server and token from flags/env, then the config file, then the local server.
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
        let token = conn
            .token
            .clone()
            .or_else(|| file.as_ref().map(|f| f.token.clone()))
            .or_else(|| {
                SERVER_TOKEN_FILES.iter().find_map(|f| {
                    std::fs::read_to_string(Path::new(f))
                        .ok()
                        .map(|t| t.trim().to_string())
                })
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ClientError::NoToken {
                config: config_path.map_or_else(
                    || "~/.config/isthmus/config.json".into(),
                    |p| p.display().to_string(),
                ),
            })?;
        Ok(Client::new(&server, &token))
    }

    pub fn new(server: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Client {
            http,
            base: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some((ct, bytes)) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, ct).body(bytes);
        }
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            cause: root_cause(&e),
        })?;
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
        let url = self.url(path);
        let resp = self.send(method, path, body).await?;
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
