//! Rule ids: the numbers policy map values carry to name the rule that
//! allowed a connection.
//!
//! An id is derived from the rule's coordinates (namespace, policy name,
//! direction, index) by a fixed hash (32-bit FNV-1a), so the same rule gets
//! the same id on every node, across agent restarts and while other policies
//! change; only a hash collision (resolved by taking the next free number in
//! (namespace, name, direction, index) order) moves an id. 0 is never used:
//! it means "no rule".

use std::collections::BTreeMap;

use policy_common::Direction;

use crate::model::{ObjectRef, Policy};

/// The rule a rule id stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy's name.
    pub policy: String,
    /// Ingress or egress.
    pub direction: Direction,
    /// The rule's index in the policy's `ingress` or `egress` list.
    pub index: usize,
}

/// Rule ids of a set of policies, both ways.
#[derive(Clone, Debug, Default)]
pub struct RuleIds {
    by_rule: BTreeMap<(ObjectRef, Direction, usize), u32>,
    by_id: BTreeMap<u32, RuleRef>,
}

fn fnv1a(parts: &[&[u8]]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for part in parts {
        for byte in *part {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    hash
}

/// The id a rule gets when it collides with no other.
pub fn preferred_rule_id(namespace: &str, policy: &str, direction: Direction, index: usize) -> u32 {
    let index = u64::try_from(index).unwrap_or(u64::MAX).to_le_bytes();
    let hash = fnv1a(&[
        namespace.as_bytes(),
        &[0],
        policy.as_bytes(),
        &[0],
        &[direction as u8],
        &index,
    ]);
    hash.max(1)
}

impl RuleIds {
    /// Ids for every rule of `policies`.
    pub fn assign<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Self {
        let mut rules: Vec<RuleRef> = Vec::new();
        for policy in policies {
            for direction in [Direction::Ingress, Direction::Egress] {
                for index in 0..policy.rules(direction).len() {
                    rules.push(RuleRef {
                        namespace: policy.namespace.clone(),
                        policy: policy.name.clone(),
                        direction,
                        index,
                    });
                }
            }
        }
        rules.sort();
        let mut this = Self::default();
        for rule in rules {
            let mut id =
                preferred_rule_id(&rule.namespace, &rule.policy, rule.direction, rule.index);
            while this.by_id.contains_key(&id) {
                id = id.checked_add(1).unwrap_or(1);
            }
            this.by_rule.insert(
                (
                    ObjectRef::new(&rule.namespace, &rule.policy),
                    rule.direction,
                    rule.index,
                ),
                id,
            );
            this.by_id.insert(id, rule);
        }
        this
    }

    /// The id of a rule.
    pub fn id(&self, policy: &ObjectRef, direction: Direction, index: usize) -> Option<u32> {
        self.by_rule
            .get(&(policy.clone(), direction, index))
            .copied()
    }

    /// Every id and its rule.
    pub fn map(&self) -> &BTreeMap<u32, RuleRef> {
        &self.by_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LabelSelector, Rule};

    fn policy(ns: &str, name: &str, ingress: usize, egress: usize) -> Policy {
        Policy {
            namespace: ns.into(),
            name: name.into(),
            pod_selector: LabelSelector::everything(),
            isolates_ingress: true,
            isolates_egress: true,
            ingress: vec![Rule::allow_all(); ingress],
            egress: vec![Rule::allow_all(); egress],
        }
    }

    #[test]
    fn ids_are_nonzero_unique_and_stable() {
        let a = policy("ns", "a", 2, 1);
        let b = policy("ns", "b", 1, 0);
        let ids = RuleIds::assign([&a, &b]);
        let a0 = ids.id(&a.object_ref(), Direction::Ingress, 0).expect("id");
        let map = ids.map();
        assert_eq!(map.len(), 4);
        assert!(!map.contains_key(&0));
        assert_eq!(map[&a0].index, 0);
        // Same id without policy b, and with an extra policy.
        let c = policy("other", "c", 3, 3);
        let again = RuleIds::assign([&a, &c]);
        assert_eq!(again.id(&a.object_ref(), Direction::Ingress, 0), Some(a0));
        assert_eq!(a0, preferred_rule_id("ns", "a", Direction::Ingress, 0));
    }
}
