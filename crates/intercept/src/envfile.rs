//! Istio's seed env files (`cluster.env`, `sidecar.env`): the subset of shell syntax they use.
//!
//! `KEY=VALUE` lines, `#` comments, blank lines, an optional `export ` prefix, values optionally
//! in single or double quotes. Every key is kept, known or not, in file order; a key set twice
//! takes its last value, as the shell that sources these files would.

use std::fmt;
use std::io;
use std::path::Path;

/// One parsed env file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFile {
    source: String,
    entries: Vec<Entry>,
    /// Read with [`EnvFile::read_optional`] and absent.
    missing: bool,
}

/// One `KEY=VALUE` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
    /// 1-based line number in the file.
    pub line: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    #[error("cannot read env file {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{file}:{line}: {problem}")]
    Syntax {
        file: String,
        line: usize,
        problem: SyntaxProblem,
    },
}

/// What is wrong with one line of an env file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyntaxProblem {
    NotUtf8,
    MissingEquals(String),
    BadKey(String),
    UnterminatedQuote(char),
    TrailingAfterQuote(String),
    UnquotedWhitespace(String),
}

impl fmt::Display for SyntaxProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUtf8 => write!(f, "the file is not UTF-8 text"),
            Self::MissingEquals(l) => write!(f, "expected KEY=VALUE, found {l:?}"),
            Self::BadKey(k) => write!(
                f,
                "{k:?} is not a variable name (letters, digits and _, not starting with a digit)"
            ),
            Self::UnterminatedQuote(q) => write!(f, "unterminated {q} quote"),
            Self::TrailingAfterQuote(t) => {
                write!(f, "unexpected {t:?} after the closing quote")
            }
            Self::UnquotedWhitespace(v) => {
                write!(f, "value {v:?} contains whitespace: put it in quotes")
            }
        }
    }
}

impl EnvFile {
    /// A file with no entries, for a seed file that is absent.
    pub fn empty(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            entries: Vec::new(),
            missing: false,
        }
    }

    /// Parse `text`; `source` names the file in errors.
    pub fn parse(source: impl Into<String>, text: &str) -> Result<Self, EnvFileError> {
        let source = source.into();
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            match parse_line(raw) {
                Ok(Some((key, value))) => entries.push(Entry { key, value, line }),
                Ok(None) => {}
                Err(problem) => {
                    return Err(EnvFileError::Syntax {
                        file: source,
                        line,
                        problem,
                    })
                }
            }
        }
        Ok(Self {
            source,
            entries,
            missing: false,
        })
    }

    /// Parse raw bytes (what an untrusted file holds).
    pub fn parse_bytes(source: impl Into<String>, bytes: &[u8]) -> Result<Self, EnvFileError> {
        let source = source.into();
        match std::str::from_utf8(bytes) {
            Ok(text) => Self::parse(source, text),
            Err(e) => {
                let line = 1 + bytes[..e.valid_up_to()]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count();
                Err(EnvFileError::Syntax {
                    file: source,
                    line,
                    problem: SyntaxProblem::NotUtf8,
                })
            }
        }
    }

    /// Read and parse a file.
    pub fn read(path: &Path) -> Result<Self, EnvFileError> {
        let bytes = std::fs::read(path).map_err(|source| EnvFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_bytes(path.display().to_string(), &bytes)
    }

    /// Read a file that may be absent (an absent file has no entries).
    pub fn read_optional(path: &Path) -> Result<Self, EnvFileError> {
        match Self::read(path) {
            Err(EnvFileError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(Self {
                    missing: true,
                    ..Self::empty(path.display().to_string())
                })
            }
            other => other,
        }
    }

    /// True for a file [`EnvFile::read_optional`] did not find.
    pub fn is_missing(&self) -> bool {
        self.missing
    }

    /// The file's name as given to [`EnvFile::parse`] or [`EnvFile::read`].
    pub fn source(&self) -> &str {
        &self.source
    }

    /// All entries in file order, repeats included.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry that sets `key` last.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().rev().find(|e| e.key == key)
    }

    /// The value `key` ends up with.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entry(key).map(|e| e.value.as_str())
    }
}

fn parse_line(raw: &str) -> Result<Option<(String, String)>, SyntaxProblem> {
    let line = raw.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let line = match line.strip_prefix("export") {
        Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
        _ => line,
    };
    let Some((key, value)) = line.split_once('=') else {
        return Err(SyntaxProblem::MissingEquals(line.to_string()));
    };
    let key = key.trim_end();
    if !is_name(key) {
        return Err(SyntaxProblem::BadKey(key.to_string()));
    }
    Ok(Some((key.to_string(), parse_value(value.trim())?)))
}

fn is_name(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn parse_value(value: &str) -> Result<String, SyntaxProblem> {
    let mut chars = value.char_indices();
    let quote = match chars.next() {
        None => return Ok(String::new()),
        Some((_, q @ ('"' | '\''))) => q,
        Some(_) => {
            // A shell comment needs whitespace before the `#`.
            let bare = match value.find([' ', '\t']) {
                Some(i) if value[i..].trim_start().starts_with('#') => value[..i].trim_end(),
                Some(_) => return Err(SyntaxProblem::UnquotedWhitespace(value.to_string())),
                None => value,
            };
            return Ok(bare.to_string());
        }
    };
    let mut out = String::new();
    let mut end = None;
    while let Some((i, c)) = chars.next() {
        if c == quote {
            end = Some(i + c.len_utf8());
            break;
        }
        // Inside double quotes the shell unescapes \" \\ \$ \`; anything else stays as is.
        if quote == '"' && c == '\\' {
            if let Some((_, n @ ('"' | '\\' | '$' | '`'))) = chars.clone().next() {
                out.push(n);
                chars.next();
                continue;
            }
        }
        out.push(c);
    }
    let Some(end) = end else {
        return Err(SyntaxProblem::UnterminatedQuote(quote));
    };
    let rest = &value[end..];
    let comment = rest.starts_with([' ', '\t']) && rest.trim_start().starts_with('#');
    if !rest.is_empty() && !comment {
        return Err(SyntaxProblem::TrailingAfterQuote(rest.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> EnvFile {
        EnvFile::parse("sidecar.env", text).unwrap()
    }

    fn problem(text: &str) -> (usize, SyntaxProblem, String) {
        match EnvFile::parse("sidecar.env", text).unwrap_err() {
            e @ EnvFileError::Syntax { line, .. } => {
                let msg = e.to_string();
                let EnvFileError::Syntax { problem, .. } = e else {
                    unreachable!()
                };
                (line, problem, msg)
            }
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn istio_seed_file() {
        let f = parse(
            "# generated by istioctl\n\
             ISTIO_SERVICE_CIDR=10.96.0.0/12,10.100.0.0/16\n\
             \n\
             export ISTIO_INBOUND_PORTS=\"3306,8080\"\n\
             ISTIO_CP_AUTH='MUTUAL_TLS'\n\
             ISTIO_META_DNS_CAPTURE=true # capture DNS\n\
             EMPTY=\n\
             SOMETHING_ELSE=kept\r\n",
        );
        assert_eq!(
            f.get("ISTIO_SERVICE_CIDR"),
            Some("10.96.0.0/12,10.100.0.0/16")
        );
        assert_eq!(f.get("ISTIO_INBOUND_PORTS"), Some("3306,8080"));
        assert_eq!(f.get("ISTIO_CP_AUTH"), Some("MUTUAL_TLS"));
        assert_eq!(f.get("ISTIO_META_DNS_CAPTURE"), Some("true"));
        assert_eq!(f.get("EMPTY"), Some(""));
        assert_eq!(f.get("SOMETHING_ELSE"), Some("kept"));
        assert_eq!(f.entry("ISTIO_INBOUND_PORTS").map(|e| e.line), Some(4));
        assert_eq!(f.entries().len(), 6);
        assert_eq!(f.get("MISSING"), None);
    }

    #[test]
    fn last_assignment_wins() {
        let f = parse("A=1\nA=2\n");
        assert_eq!(f.get("A"), Some("2"));
        assert_eq!(f.entries().len(), 2);
    }

    #[test]
    fn quoting() {
        let f = parse(
            "A=\"a b # not a comment\"\nB='x\\\"y'\nC=\"q\\\"q\\\\\"\nD=\"\"\nE=\"x\" # c\nexport=1\n",
        );
        assert_eq!(f.get("A"), Some("a b # not a comment"));
        assert_eq!(f.get("B"), Some("x\\\"y"));
        assert_eq!(f.get("C"), Some("q\"q\\"));
        assert_eq!(f.get("D"), Some(""));
        assert_eq!(f.get("E"), Some("x"));
        assert_eq!(f.get("export"), Some("1"));
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let (line, p, msg) = problem("A=1\nISTIO_INBOUND_PORTS\n");
        assert_eq!(line, 2);
        assert_eq!(
            p,
            SyntaxProblem::MissingEquals("ISTIO_INBOUND_PORTS".to_string())
        );
        assert_eq!(
            msg,
            "sidecar.env:2: expected KEY=VALUE, found \"ISTIO_INBOUND_PORTS\""
        );

        let (line, p, _) = problem("\n\n1BAD=x\n");
        assert_eq!((line, p), (3, SyntaxProblem::BadKey("1BAD".to_string())));
        let (_, p, _) = problem("A B=x");
        assert_eq!(p, SyntaxProblem::BadKey("A B".to_string()));
        let (_, p, msg) = problem("A=\"open");
        assert_eq!(p, SyntaxProblem::UnterminatedQuote('"'));
        assert_eq!(msg, "sidecar.env:1: unterminated \" quote");
        let (_, p, _) = problem("A='x'y");
        assert_eq!(p, SyntaxProblem::TrailingAfterQuote("y".to_string()));
        let (_, p, msg) = problem("ISTIO_SERVICE_CIDR=10.0.0.0/8, 10.1.0.0/16");
        assert_eq!(
            p,
            SyntaxProblem::UnquotedWhitespace("10.0.0.0/8, 10.1.0.0/16".to_string())
        );
        assert!(msg.contains("put it in quotes"), "{msg}");
    }

    #[test]
    fn not_utf8_names_the_line() {
        let e = EnvFile::parse_bytes("cluster.env", b"A=1\nB=\xff\n").unwrap_err();
        assert_eq!(e.to_string(), "cluster.env:2: the file is not UTF-8 text");
    }

    #[test]
    fn absent_optional_file_is_empty_but_absent_required_file_is_an_error() {
        let path = Path::new("/nonexistent/isthmus/sidecar.env");
        assert!(EnvFile::read_optional(path).unwrap().entries().is_empty());
        let e = EnvFile::read(path).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read env file /nonexistent/isthmus/sidecar.env: "),
            "{e}"
        );
    }
}
