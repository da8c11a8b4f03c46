//! Kubernetes label selectors (`metav1.LabelSelector`) and their matching.
//!
//! A selector is the AND of its `matchLabels` pairs and its `matchExpressions`
//! requirements; an empty selector matches every label set. The four operators
//! behave as in `k8s.io/apimachinery/pkg/labels`: `NotIn` and `DoesNotExist`
//! also match objects that lack the key.

use std::collections::{BTreeMap, BTreeSet};

/// A label set: key to value, ordered so that label sets compare and hash
/// deterministically.
pub type Labels = BTreeMap<String, String>;

/// Why a selector could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The operator is none of `In`, `NotIn`, `Exists`, `DoesNotExist`.
    #[error("selector requirement on key {key:?} has unknown operator {operator:?}")]
    UnknownOperator {
        /// The requirement's label key.
        key: String,
        /// The operator as written.
        operator: String,
    },
    /// `In` or `NotIn` without values.
    #[error("selector requirement on key {key:?}: operator {operator} needs at least one value")]
    MissingValues {
        /// The requirement's label key.
        key: String,
        /// The operator.
        operator: &'static str,
    },
    /// `Exists` or `DoesNotExist` with values.
    #[error("selector requirement on key {key:?}: operator {operator} takes no values")]
    UnexpectedValues {
        /// The requirement's label key.
        key: String,
        /// The operator.
        operator: &'static str,
    },
}

/// The operator of one `matchExpressions` requirement, with its values.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    /// The key is present and its value is one of these.
    In(BTreeSet<String>),
    /// The key is absent, or present with a value that is none of these.
    NotIn(BTreeSet<String>),
    /// The key is present, whatever its value.
    Exists,
    /// The key is absent.
    DoesNotExist,
}

impl Operator {
    /// The operator's name as the API spells it.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Operator::In(_) => "In",
            Operator::NotIn(_) => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        }
    }
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    /// The label key it tests.
    pub key: String,
    /// How it tests it.
    pub operator: Operator,
}

impl Requirement {
    /// Builds a requirement from the API's three fields, checking the operator
    /// and that values are given exactly when the operator takes them.
    pub fn new(
        key: impl Into<String>,
        operator: &str,
        values: impl IntoIterator<Item = String>,
    ) -> Result<Self, SelectorError> {
        let key = key.into();
        let values: BTreeSet<String> = values.into_iter().collect();
        let operator = match operator {
            "In" | "NotIn" if values.is_empty() => {
                let operator = if operator == "In" { "In" } else { "NotIn" };
                return Err(SelectorError::MissingValues { key, operator });
            }
            "In" => Operator::In(values),
            "NotIn" => Operator::NotIn(values),
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                let operator = if operator == "Exists" {
                    "Exists"
                } else {
                    "DoesNotExist"
                };
                return Err(SelectorError::UnexpectedValues { key, operator });
            }
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(SelectorError::UnknownOperator {
                    key,
                    operator: other.to_owned(),
                });
            }
        };
        Ok(Self { key, operator })
    }

    /// Whether a label set satisfies this requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| values.contains(v)),
            Operator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A validated label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSelector {
    match_labels: Labels,
    match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// The empty selector, which matches every label set.
    pub fn everything() -> Self {
        Self::default()
    }

    /// A selector from `matchLabels` and already validated requirements.
    pub fn new(match_labels: Labels, match_expressions: Vec<Requirement>) -> Self {
        Self {
            match_labels,
            match_expressions,
        }
    }

    /// A selector of `matchLabels` only.
    pub fn from_labels<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        Self::new(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            Vec::new(),
        )
    }

    /// Whether it has neither labels nor expressions (and so matches everything).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// The `matchLabels` pairs.
    pub fn match_labels(&self) -> &Labels {
        &self.match_labels
    }

    /// The `matchExpressions` requirements.
    pub fn match_expressions(&self) -> &[Requirement] {
        &self.match_expressions
    }

    /// Whether `labels` satisfies every pair and every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> Requirement {
        Requirement::new(key, op, values.iter().map(|v| (*v).to_owned()))
            .expect("valid requirement")
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::everything().matches(&Labels::new()));
        assert!(LabelSelector::everything().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_are_anded() {
        let s = LabelSelector::from_labels([("app", "web"), ("tier", "front")]);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn operator_in() {
        let r = req("env", "In", &["prod", "staging"]);
        assert!(r.matches(&labels(&[("env", "prod")])));
        assert!(!r.matches(&labels(&[("env", "dev")])));
        assert!(!r.matches(&Labels::new()));
    }

    #[test]
    fn operator_not_in_matches_missing_key() {
        let r = req("env", "NotIn", &["prod"]);
        assert!(r.matches(&labels(&[("env", "dev")])));
        assert!(r.matches(&Labels::new()));
        assert!(!r.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn operator_exists_and_does_not_exist() {
        let exists = req("env", "Exists", &[]);
        let absent = req("env", "DoesNotExist", &[]);
        let with = labels(&[("env", "")]);
        assert!(exists.matches(&with));
        assert!(!absent.matches(&with));
        assert!(!exists.matches(&Labels::new()));
        assert!(absent.matches(&Labels::new()));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = LabelSelector::new(labels(&[("app", "web")]), vec![req("env", "In", &["prod"])]);
        assert!(s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("env", "prod")])));
    }

    #[test]
    fn bad_requirements_are_errors() {
        let none: [String; 0] = [];
        assert!(matches!(
            Requirement::new("k", "Contains", none.clone()),
            Err(SelectorError::UnknownOperator { .. })
        ));
        assert!(matches!(
            Requirement::new("k", "in", none.clone()),
            Err(SelectorError::UnknownOperator { .. })
        ));
        assert!(matches!(
            Requirement::new("k", "In", none.clone()),
            Err(SelectorError::MissingValues { operator: "In", .. })
        ));
        assert!(matches!(
            Requirement::new("k", "NotIn", none),
            Err(SelectorError::MissingValues {
                operator: "NotIn",
                ..
            })
        ));
        assert!(matches!(
            Requirement::new("k", "Exists", ["v".to_owned()]),
            Err(SelectorError::UnexpectedValues {
                operator: "Exists",
                ..
            })
        ));
    }
}
