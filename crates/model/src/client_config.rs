//! The CLI's config file: where the admin API is and the token to use. `isthmus server --dev`
//! writes it for the local user; the CLI reads it when no flag or variable says otherwise.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConfig {
    /// Base URL of the admin API, e.g. `http://127.0.0.1:15080`.
    pub server: String,
    pub token: String,
}

/// `$ISTHMUS_CONFIG`, else `$XDG_CONFIG_HOME/isthmus/config.json`, else
/// `$HOME/.config/isthmus/config.json`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ISTHMUS_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("isthmus").join("config.json"))
}

/// What a running `isthmus server` records for the CLI of the same user, one file per server
/// (`<config dir>/servers/<pid>.json`), so the CLI finds the admin token of a server started
/// with any `--data-dir`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerRecord {
    /// Base URL of its admin API as bound, e.g. `http://127.0.0.1:15080`.
    pub admin: String,
    /// Its data directory: the admin token is `<data_dir>/admin-token`.
    pub data_dir: PathBuf,
    pub pid: u32,
}

/// `servers/` beside the config file ([`default_path`]).
pub fn servers_dir() -> Option<PathBuf> {
    Some(default_path()?.parent()?.join("servers"))
}
