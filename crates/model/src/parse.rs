use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{validate, Kind, Object, Resource, ValidationError};

/// Why a document could not become a resource. Every variant names the document (1-based, in
/// file order) so a multi-document file's error points at the right place.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("document {doc}: not valid YAML or JSON: {message}")]
    Syntax { doc: usize, message: String },
    #[error("document {doc}: {field}: {message}")]
    Field {
        doc: usize,
        field: String,
        message: String,
    },
    #[error("document {doc}: {source}")]
    Invalid {
        doc: usize,
        #[source]
        source: ValidationError,
    },
    #[error("no resources found in the input")]
    Empty,
}

/// Parses a YAML stream (one or more `---`-separated documents; JSON is YAML too) into validated
/// resources. Empty documents are skipped. Nothing is returned unless every document is valid.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, ParseError> {
    check_flow_depth(text)?;
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let value = serde_json::Value::deserialize(de).map_err(|e| syntax(doc, e))?;
        if value.is_null() {
            continue;
        }
        out.push(from_value(doc, value)?);
    }
    if out.is_empty() {
        return Err(ParseError::Empty);
    }
    Ok(out)
}

/// Parses one JSON document (an admin API request body) into a validated resource.
pub fn parse_json(bytes: &[u8]) -> Result<Resource, ParseError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| syntax(1, e))?;
    from_value(1, value)
}

/// How deep documents may nest (serde_json's and serde_yaml_ng's recursion limit).
pub const MAX_DEPTH: usize = 128;

/// Refuses YAML whose flow collections (`{...}`, `[...]`) nest deeper than [`MAX_DEPTH`],
/// before the YAML scanner sees it: libyaml's scanner costs the nesting depth per token, so a
/// 1 MiB document 100,000 levels deep takes minutes, long before the deserializer's recursion
/// limit is reached. Brackets inside quoted scalars and comments are not counted; an estimate
/// that errs (a quote the scanner does not take as one) only ever makes it larger.
fn check_flow_depth(text: &str) -> Result<(), ParseError> {
    let bytes = text.as_bytes();
    let (mut depth, mut max) = (0usize, 0usize);
    let mut i = 0;
    // How the last whitespace-separated word started: a quote right after an anchor or tag
    // (`&a "x"`, `!!str "x"`) starts a quoted scalar too.
    let mut word_start: Option<u8> = None;
    let mut prev: Option<u8> = None;
    while i < bytes.len() {
        let c = bytes[i];
        let after_space = prev.is_none_or(|p| p == b' ' || p == b'\t' || p == b'\n' || p == b'\r');
        match c {
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'#' if after_space => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                prev = Some(b'\n');
                word_start = None;
                continue;
            }
            b'"' | b'\'' => {
                let scalar_start = match last_non_space(bytes, i) {
                    None => true,
                    Some(b) => {
                        matches!(b, b':' | b'-' | b'{' | b'[' | b',' | b'?' | b'\n')
                            || (after_space && matches!(word_start, Some(b'&' | b'!')))
                    }
                };
                if scalar_start {
                    i = skip_quoted(bytes, i);
                    prev = Some(c);
                    word_start = None;
                    continue;
                }
            }
            _ => {}
        }
        if !c.is_ascii_whitespace() && after_space {
            word_start = Some(c);
        }
        prev = Some(c);
        i += 1;
    }
    if max > MAX_DEPTH {
        return Err(ParseError::Syntax {
            doc: 1,
            message: format!(
                "collections nest {max} levels deep (documents may nest at most {MAX_DEPTH} levels deep)"
            ),
        });
    }
    Ok(())
}

/// The last character before `i` that is not a space or tab, on the same line (`\n` at a
/// line start after indentation, `None` at the start of the text).
fn last_non_space(bytes: &[u8], i: usize) -> Option<u8> {
    bytes[..i]
        .iter()
        .rev()
        .find(|b| **b != b' ' && **b != b'\t' && **b != b'\r')
        .copied()
}

/// The index after the quoted scalar starting at `i` (or the end of the text).
fn skip_quoted(bytes: &[u8], i: usize) -> usize {
    let quote = bytes[i];
    let mut j = i + 1;
    while j < bytes.len() {
        match bytes[j] {
            b'\\' if quote == b'"' => j += 2,
            b'\'' if quote == b'\'' && bytes.get(j + 1) == Some(&b'\'') => j += 2,
            b if b == quote => return j + 1,
            _ => j += 1,
        }
    }
    bytes.len()
}

/// A syntax error, saying which bound was hit when a parser's limit stopped it.
fn syntax(doc: usize, e: impl std::fmt::Display) -> ParseError {
    let mut message = e.to_string();
    if message.contains("recursion limit exceeded") {
        message.push_str(" (documents may nest at most 128 levels deep)");
    } else if message.contains("repetition limit exceeded") {
        message.push_str(
            " (YAML aliases may not repeat content more than serde_yaml_ng allows: is this an \
             alias bomb? write the repeated parts out)",
        );
    }
    ParseError::Syntax { doc, message }
}

fn from_value(doc: usize, mut value: serde_json::Value) -> Result<Resource, ParseError> {
    let field_err = |field: &str, message: String| ParseError::Field {
        doc,
        field: field.to_string(),
        message,
    };
    let obj = value.as_object_mut().ok_or_else(|| {
        field_err(
            "(document)",
            "expected a mapping with apiVersion, kind, metadata and spec".into(),
        )
    })?;
    let kind_str = match obj.get("kind") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => return Err(field_err("kind", format!("expected a string, got {other}"))),
        None => return Err(field_err("kind", "missing".into())),
    };
    // Only the exact kind names are accepted in documents; short names are for the CLI.
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.as_str() == kind_str)
        .ok_or_else(|| {
            field_err(
                "kind",
                format!(
                    "unknown kind {kind_str:?} (expected {})",
                    Kind::all_document_names()
                ),
            )
        })?;
    match obj.get("apiVersion") {
        Some(serde_json::Value::String(v))
            if kind.accepted_api_versions().contains(&v.as_str()) => {}
        Some(serde_json::Value::String(v)) => {
            return Err(field_err(
                "apiVersion",
                format!(
                    "{v:?} is not an apiVersion of {kind} (expected one of {})",
                    kind.accepted_api_versions().join(", ")
                ),
            ))
        }
        _ => return Err(field_err("apiVersion", "missing or not a string".into())),
    }
    // An empty group or policy (`spec: {}` — for a policy: allow nothing) may omit the spec.
    if !obj.contains_key("spec")
        && !matches!(
            kind,
            Kind::WorkloadGroup | Kind::AuthorizationPolicy | Kind::PeerAuthentication
        )
    {
        return Err(field_err("spec", "missing".into()));
    }
    let resource = match kind {
        Kind::Service => Resource::Service(typed(doc, value)?),
        Kind::WorkloadEntry => Resource::WorkloadEntry(typed(doc, value)?),
        Kind::WorkloadGroup => {
            if let Some(o) = value.as_object_mut() {
                o.entry("spec").or_insert_with(|| serde_json::json!({}));
            }
            Resource::WorkloadGroup(typed(doc, value)?)
        }
        Kind::AuthorizationPolicy => {
            if let Some(o) = value.as_object_mut() {
                o.entry("spec").or_insert_with(|| serde_json::json!({}));
            }
            Resource::AuthorizationPolicy(typed(doc, value)?)
        }
        Kind::PeerAuthentication => {
            if let Some(o) = value.as_object_mut() {
                o.entry("spec").or_insert_with(|| serde_json::json!({}));
            }
            Resource::PeerAuthentication(typed(doc, value)?)
        }
        Kind::VirtualService => Resource::VirtualService(typed(doc, value)?),
        Kind::DestinationRule => Resource::DestinationRule(typed(doc, value)?),
        Kind::HttpRoute => Resource::HttpRoute(typed(doc, value)?),
        Kind::GrpcRoute => Resource::GrpcRoute(typed(doc, value)?),
    };
    let mut resource = resource;
    if resource.meta().namespace.is_empty() {
        resource.meta_mut().namespace = crate::DEFAULT_NAMESPACE.to_string();
    }
    validate(&resource).map_err(|source| ParseError::Invalid { doc, source })?;
    Ok(resource)
}

fn typed<S: DeserializeOwned, St: DeserializeOwned + Default>(
    doc: usize,
    value: serde_json::Value,
) -> Result<Object<S, St>, ParseError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ParseError::Field {
            doc,
            field: if path == "." {
                "(document)".into()
            } else {
                path
            },
            message: e.into_inner().to_string(),
        }
    })
}

#[cfg(test)]
mod bounds {
    use super::*;

    /// The billion laughs: nine levels of aliases, each repeating the previous one nine times.
    pub fn alias_bomb() -> String {
        let mut doc = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            let refs = vec![format!("*{prev}"); 9].join(",");
            doc.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        doc
    }

    #[test]
    fn deep_nesting_and_alias_bombs_are_refused() {
        let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let err = parse_json(deep_json.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("at most 128 levels"), "{err}");
        let err = parse_documents(&deep_json).unwrap_err().to_string();
        assert!(err.contains("at most 128 levels"), "{err}");
        let deep_yaml = format!("{}{}", "{a: ".repeat(100_000), "}".repeat(100_000));
        let err = parse_documents(&deep_yaml).unwrap_err().to_string();
        assert!(err.contains("at most 128 levels"), "{err}");
        // Closing brackets in quotes or comments do not hide the depth.
        let hidden = format!(
            "{}{}",
            "{a: \"]\", # ]]\n b: &x \"]\", c: ".repeat(1000),
            "}".repeat(1000)
        );
        let err = parse_documents(&hidden).unwrap_err().to_string();
        assert!(err.contains("nest 1000 levels"), "{err}");
        // Brackets in strings of ordinary documents do not count.
        let doc = "kind: Service\nmetadata: {name: web, annotations: {a: \"[[[[\", b: '{{''{{'}}\n";
        assert!(check_flow_depth(&doc.repeat(200)).is_ok());
        let err = parse_documents(&alias_bomb()).unwrap_err().to_string();
        assert!(err.contains("repetition limit exceeded"), "{err}");
    }
}
