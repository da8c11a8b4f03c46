//! Label selectors written as text, the way `kubectl get -l` takes them:
//! `app=web,tier!=db`, `env in (prod,staging)`, `env notin (dev)`, `app`,
//! `!legacy` (requirements are ANDed; `==` is `=`).

use super::selector::{LabelSelector, Requirement, SelectorError};

/// Why a selector text does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorTextError {
    #[error("label selector {text:?}: empty requirement")]
    Empty { text: String },
    #[error("label selector {text:?}: unbalanced parentheses")]
    Parentheses { text: String },
    #[error("label selector {text:?}: cannot read requirement {requirement:?}")]
    Syntax { text: String, requirement: String },
    #[error("label selector {text:?}: {source}")]
    Requirement {
        text: String,
        #[source]
        source: SelectorError,
    },
}

/// Parses `text` (empty: the selector that matches everything).
pub fn parse_selector(text: &str) -> Result<LabelSelector, SelectorTextError> {
    if text.trim().is_empty() {
        return Ok(LabelSelector::everything());
    }
    let mut requirements = Vec::new();
    for part in split_top_level(text)? {
        requirements.push(requirement(text, part.trim())?);
    }
    Ok(LabelSelector::new(Default::default(), requirements))
}

/// Splits on the commas outside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, SelectorTextError> {
    let unbalanced = || SelectorTextError::Parentheses {
        text: text.to_owned(),
    };
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0u32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or_else(unbalanced)?,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(unbalanced());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn requirement(text: &str, part: &str) -> Result<Requirement, SelectorTextError> {
    let syntax = || SelectorTextError::Syntax {
        text: text.to_owned(),
        requirement: part.to_owned(),
    };
    let build = |key: &str, operator: &str, values: Vec<String>| {
        if !valid_key(key) {
            return Err(syntax());
        }
        Requirement::new(key, operator, values).map_err(|source| SelectorTextError::Requirement {
            text: text.to_owned(),
            source,
        })
    };
    if part.is_empty() {
        return Err(SelectorTextError::Empty {
            text: text.to_owned(),
        });
    }
    if let Some(key) = part.strip_prefix('!') {
        return build(key.trim(), "DoesNotExist", Vec::new());
    }
    for (op, operator) in [("!=", "NotIn"), ("==", "In"), ("=", "In")] {
        if let Some((key, value)) = part.split_once(op) {
            let value = value.trim();
            if value.contains(['=', '!', '(', ')', ' ']) {
                return Err(syntax());
            }
            return build(key.trim(), operator, vec![value.to_owned()]);
        }
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let list = part[open + 1..].strip_suffix(')').ok_or_else(syntax)?;
        let (key, operator) = if let Some(key) = head.strip_suffix(" notin") {
            (key, "NotIn")
        } else if let Some(key) = head.strip_suffix(" in") {
            (key, "In")
        } else {
            return Err(syntax());
        };
        let values: Vec<String> = list
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        return build(key.trim(), operator, values);
    }
    build(part, "Exists", Vec::new())
}

/// A label key: an optional DNS prefix and `/`, then a name of
/// alphanumerics, `-`, `_` and `.`.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn kubectl_forms_match_as_kubectl_does() {
        let web = labels(&[("app", "web"), ("tier", "front"), ("env", "prod")]);
        let db = labels(&[("app", "db"), ("tier", "db")]);
        let cases = [
            ("app=web", true, false),
            ("app==web", true, false),
            ("tier!=db", true, false),
            ("env", true, false),
            ("!env", false, true),
            ("env in (prod, staging)", true, false),
            ("env notin (prod)", false, true),
            ("app in (web,db),tier!=front", false, true),
            ("", true, true),
        ];
        for (text, on_web, on_db) in cases {
            let selector = parse_selector(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(selector.matches(&web), on_web, "{text} on web");
            assert_eq!(selector.matches(&db), on_db, "{text} on db");
        }
    }

    #[test]
    fn malformed_text_is_an_error() {
        for text in [
            "app=web,",
            "env in (a",
            "env in a)",
            "env within (a)",
            "a b",
            "app=we b",
            "env in ()",
            "=web",
        ] {
            assert!(parse_selector(text).is_err(), "{text:?} should not parse");
        }
    }
}
