//! The last-known-good state on disk: loaded at start so the agent can serve while the control
//! plane is unreachable, and sent back as `initial_resource_versions` on the first connect.
//!
//! Format: the line `isthmus-xds-cache v1`, then one length-delimited
//! `DeltaDiscoveryResponse` per type holding its resources as received. Loading validates
//! every resource exactly as the network path does.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

use super::state::{parse_resource, Origin, Raw, State};
use crate::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};

const MAGIC: &[u8] = b"isthmus-xds-cache v1\n";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read discovery cache {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write discovery cache {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an Isthmus discovery cache (delete it; it is rebuilt on the next connect)"
    )]
    NotACache { path: PathBuf },
    #[error("discovery cache {path} is corrupt ({reason}); delete it, it is rebuilt on the next connect")]
    Corrupt { path: PathBuf, reason: String },
}

/// Encodes the state's resources (sorted, so equal states give equal files).
pub fn encode(state: &State) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for (type_url, resources) in state.raw() {
        let mut names: Vec<&String> = resources.keys().collect();
        names.sort();
        let msg = DeltaDiscoveryResponse {
            type_url: type_url.clone(),
            resources: names
                .into_iter()
                .map(|n| Resource {
                    name: n.clone(),
                    version: resources[n].version.clone(),
                    resource: Some((*resources[n].any).clone()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        // Encoding into a Vec only fails for lack of capacity, which a Vec grows.
        let _ = msg.encode_length_delimited(&mut out);
    }
    out
}

/// Decodes a cache; every resource must validate.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<State, CacheError> {
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| CacheError::NotACache {
            path: path.to_owned(),
        })?;
    let corrupt = |reason: String| CacheError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let mut state = State::default();
    while !rest.is_empty() {
        let msg = DeltaDiscoveryResponse::decode_length_delimited(&mut rest)
            .map_err(|e| corrupt(e.to_string()))?;
        let mut upserts = Vec::with_capacity(msg.resources.len());
        for r in msg.resources {
            let any = r
                .resource
                .ok_or_else(|| corrupt(format!("resource {:?} has no body", r.name)))?;
            let item =
                parse_resource(&msg.type_url, &r.name, &any).map_err(|e| corrupt(e.to_string()))?;
            upserts.push((
                r.name,
                Raw {
                    version: r.version,
                    any: any.into(),
                    item,
                },
            ));
        }
        state = state.apply(&msg.type_url, upserts, &[], Origin::Cache);
    }
    Ok(state.with_origin(Origin::Cache))
}

/// Loads the cache at `path`; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<State>, CacheError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CacheError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, synced, then
/// renamed over the old one, so a crash leaves either the old or the new cache.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let err = |source| CacheError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "xds-cache".to_owned());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}
