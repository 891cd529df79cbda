//! `--token` values: the token itself, or `@FILE` to read it from FILE (keeps it out of `ps`).
//! Shared by the admin API's `--token`/`ISTHMUS_TOKEN` and `join --server --token`.

use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenArgError {
    #[error("{path}: {cause}")]
    Read { path: String, cause: String },
    #[error("{path} is empty")]
    EmptyFile { path: String },
    #[error("{flag} is empty")]
    Empty { flag: &'static str },
    /// Tokens (hex admin tokens, base64url JWTs) never hold a `/`: this is a path without `@`.
    #[error("{flag} {value:?} looks like a file, not a token: write {flag} @{value} to read the token from that file")]
    LooksLikePath { flag: &'static str, value: String },
}

/// The token `arg` gives for `flag`, trimmed: `arg` itself, or the contents of `@FILE`.
pub fn read(flag: &'static str, arg: &str) -> Result<String, TokenArgError> {
    let token = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| TokenArgError::Read {
            path: path.to_string(),
            cause: e.to_string(),
        })?,
        None if looks_like_path(arg) => {
            return Err(TokenArgError::LooksLikePath {
                flag,
                value: arg.to_string(),
            })
        }
        None => arg.to_string(),
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(match arg.strip_prefix('@') {
            Some(path) => TokenArgError::EmptyFile {
                path: path.to_string(),
            },
            None => TokenArgError::Empty { flag },
        });
    }
    Ok(token)
}

fn looks_like_path(arg: &str) -> bool {
    let arg = arg.trim();
    arg.contains('/') || arg.starts_with('~') || (!arg.is_empty() && Path::new(arg).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_itself_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "abc.def-_ghi\n").unwrap();
        assert_eq!(read("--token", " abc.def-_ghi ").unwrap(), "abc.def-_ghi");
        assert_eq!(
            read("--token", &format!("@{}", f.display())).unwrap(),
            "abc.def-_ghi"
        );
        std::fs::write(&f, "\n").unwrap();
        assert_eq!(
            read("--token", &format!("@{}", f.display()))
                .unwrap_err()
                .to_string(),
            format!("{} is empty", f.display())
        );
        assert!(read("--token", "@/nonexistent/token")
            .unwrap_err()
            .to_string()
            .starts_with("/nonexistent/token: "));
        assert_eq!(
            read("--token", " ").unwrap_err().to_string(),
            "--token is empty"
        );
    }

    #[test]
    fn a_path_without_at_suggests_at_file() {
        assert_eq!(
            read("--token", "./token").unwrap_err().to_string(),
            "--token \"./token\" looks like a file, not a token: write --token @./token to read the token from that file"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("admin-token");
        std::fs::write(&f, "0123abcd\n").unwrap();
        let e = read("--token", &f.display().to_string()).unwrap_err();
        assert!(
            e.to_string().ends_with(&format!(
                "write --token @{} to read the token from that file",
                f.display()
            )),
            "{e}"
        );
    }
}
