use std::collections::BTreeMap;
use std::fmt;

/// A Kubernetes-style equality-based label selector: `app=web,tier!=db,canary,!legacy`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    terms: Vec<Term>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid label selector term {term:?}: {reason} (expected key=value, key!=value, key or !key, separated by commas)")]
pub struct SelectorError {
    pub term: String,
    pub reason: &'static str,
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for raw in s.split(',').map(str::trim) {
            if raw.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(SelectorError {
                    term: raw.into(),
                    reason: "empty term",
                });
            }
            let err = |reason| SelectorError {
                term: raw.into(),
                reason,
            };
            let check_key = |k: &str| -> Result<String, SelectorError> {
                let k = k.trim();
                if crate::validate::label_key_problem(k).is_some() {
                    Err(err("bad key"))
                } else {
                    Ok(k.to_string())
                }
            };
            let check_val = |v: &str| -> Result<String, SelectorError> {
                let v = v.trim();
                if crate::validate::label_value_problem(v).is_some() {
                    Err(err("bad value"))
                } else {
                    Ok(v.to_string())
                }
            };
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEq(check_key(k)?, check_val(v)?)
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                Term::Eq(check_key(k)?, check_val(v)?)
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::NotExists(check_key(k)?)
            } else {
                Term::Exists(check_key(raw)?)
            };
            terms.push(term);
        }
        Ok(LabelSelector { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::NotEq(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .terms
            .iter()
            .map(|t| match t {
                Term::Eq(k, v) => format!("{k}={v}"),
                Term::NotEq(k, v) => format!("{k}!={v}"),
                Term::Exists(k) => k.clone(),
                Term::NotExists(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matches_each_term_kind() {
        let sel = LabelSelector::parse("app=web, tier!=db,canary,!legacy").unwrap();
        assert!(sel.matches(&labels(&[("app", "web"), ("canary", "")])));
        assert!(!sel.matches(&labels(&[("app", "web")])), "canary missing");
        assert!(!sel.matches(&labels(&[("app", "web"), ("canary", ""), ("tier", "db")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("canary", ""), ("legacy", "1")])));
        assert_eq!(sel.to_string(), "app=web,tier!=db,canary,!legacy");
        assert!(LabelSelector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn rejects_bad_terms_naming_them() {
        let e = LabelSelector::parse("app=web,,x").unwrap_err();
        assert_eq!(e.reason, "empty term");
        let e = LabelSelector::parse("a b=c").unwrap_err();
        assert_eq!(e.term, "a b=c");
        assert_eq!(e.reason, "bad key");
        let e = LabelSelector::parse("app=-bad-").unwrap_err();
        assert_eq!(e.reason, "bad value");
    }
}
