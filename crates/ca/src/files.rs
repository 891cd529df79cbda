//! Crash-safe writes of key and certificate files: a temp file in the same directory,
//! fsynced, then renamed over the target, so a reader sees the old file or the new one,
//! never half of one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode for private keys and directories holding them.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode for certificates, which are public.
pub const PUBLIC_FILE_MODE: u32 = 0o644;
/// Mode for the CA's own directory.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// A file-system operation that failed, with the path involved.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    fn new(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Creates `dir` (and parents) with `mode` if it is missing; leaves an existing one alone.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), FileError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| FileError::new("create directory", dir, e))?;
    // The umask may have narrowed `mode` further; set exactly what was asked.
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(|e| FileError::new("set permissions on", dir, e))
}

/// Replaces `path` with `contents` atomically; the file has exactly `mode` from its first byte.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| FileError::new("create a temporary file in", dir, e))?;
    let write = |tmp: &mut tempfile::NamedTempFile| -> std::io::Result<()> {
        // The umask applies at creation; force the exact mode before any content lands.
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))?;
        tmp.write_all(contents)?;
        tmp.as_file().sync_all()
    };
    write(&mut tmp).map_err(|e| FileError::new("write", tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| FileError::new("rename a temporary file onto", path, e.error))?;
    // The rename is durable only once the directory entry is on disk.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::new("sync directory", dir, e))
}

/// Reads a whole file as UTF-8 text.
pub fn read_text(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(|e| FileError::new("read", path, e))
}

/// The permission bits of `path`, if it exists.
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_with_exact_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        write_atomic(&p, b"one", PRIVATE_FILE_MODE).unwrap();
        assert_eq!(mode_of(&p), Some(0o600));
        write_atomic(&p, b"two", PUBLIC_FILE_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), Some(0o644));
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
