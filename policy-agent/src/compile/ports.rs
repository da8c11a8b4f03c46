//! From a rule's `ports` to what one policy map value holds.
//!
//! A rule's ports become [`PortTarget`]s; the targets of every rule that
//! applies to one (endpoint, peer identity, direction, protocol) key are
//! gathered in a [`ValueBuilder`], which turns them into a [`PolicyValue`]:
//! an any-port rule, or at most [`MAX_PORT_RANGES`] port ranges, each naming
//! the rule that allows it.

use policy_common::{MAX_PORT_RANGES, PolicyValue, PortRule, proto};

use crate::model::{PortRef, Ports, Protocol};

/// What one entry of a rule's `ports` allows, before named ports are resolved.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortTarget {
    /// Every port of this IP protocol (including [`proto::OTHER`]).
    AnyPort(u8),
    /// Ports `first..=last` of a protocol.
    Range {
        /// The protocol.
        protocol: Protocol,
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// The destination pod's container port(s) of this name and protocol.
    Named {
        /// The protocol, which the container port must have too.
        protocol: Protocol,
        /// The port name.
        name: String,
    },
}

/// The targets of a rule's `ports`. An absent or empty list allows every port
/// of TCP, UDP and SCTP and every other protocol (which the classifier looks
/// up as [`proto::OTHER`]).
pub fn port_targets(ports: &Ports) -> Vec<PortTarget> {
    match ports {
        Ports::All => [proto::TCP, proto::UDP, proto::SCTP, proto::OTHER]
            .into_iter()
            .map(PortTarget::AnyPort)
            .collect(),
        Ports::Only(list) => list
            .iter()
            .filter_map(|p| match &p.port {
                None => Some(PortTarget::AnyPort(p.protocol.number())),
                Some(PortRef::Number(first)) => {
                    let last = p.end_port.unwrap_or(*first);
                    // A range that conversion would have rejected allows nothing.
                    (last >= *first && *first != 0).then_some(PortTarget::Range {
                        protocol: p.protocol,
                        first: *first,
                        last,
                    })
                }
                Some(PortRef::Named(name)) => Some(PortTarget::Named {
                    protocol: p.protocol,
                    name: name.clone(),
                }),
            })
            .collect(),
    }
}

/// How well the allowed ports of one key fit in a [`PolicyValue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Every port maps to the first rule (lowest id) that allows it.
    Exact,
    /// Ranges of different rules were merged to fit: every allowed port is
    /// still allowed and nothing else, but a port may be attributed to
    /// another rule of the merged range.
    Coalesced,
    /// Even merged, the ranges do not fit: these ranges (allowed by the
    /// spec) are left out and denied.
    Overflow(Vec<(u16, u16)>),
}

/// Gathers what the rules allow for one policy key.
#[derive(Clone, Debug, Default)]
pub struct ValueBuilder {
    any_port_rule: Option<u32>,
    ranges: Vec<PortRule>,
}

impl ValueBuilder {
    /// Rule `rule_id` allows every port.
    pub fn allow_any(&mut self, rule_id: u32) {
        self.any_port_rule = Some(self.any_port_rule.map_or(rule_id, |r| r.min(rule_id)));
    }

    /// Rule `rule_id` allows ports `first..=last`.
    pub fn allow_range(&mut self, first: u16, last: u16, rule_id: u32) {
        if first <= last {
            self.ranges.push(PortRule {
                first,
                last,
                rule_id,
            });
        }
    }

    /// The map value. With an any-port rule, that rule (the lowest id giving
    /// any port) decides alone. Otherwise ranges are ordered by rule id, so
    /// that the classifier's first match names the lowest rule allowing the
    /// port; ranges of one rule are merged and ranges fully covered by
    /// earlier ones dropped. If more than [`MAX_PORT_RANGES`] remain, all
    /// ranges are merged regardless of rule (keeping the lowest rule id of
    /// each merged range); if that is still too many, the ranges past the
    /// limit are reported in [`Fit::Overflow`].
    pub fn build(mut self) -> (PolicyValue, Fit) {
        let mut value = PolicyValue::default();
        if let Some(rule) = self.any_port_rule {
            value.any_port_rule = rule;
            return (value, Fit::Exact);
        }
        if let [only] = self.ranges[..] {
            // The common case: one range, nothing to merge.
            fill(&mut value, &[only]);
            return (value, Fit::Exact);
        }
        self.ranges.sort_by_key(|r| (r.rule_id, r.first, r.last));
        let by_rule = first_match_ranges(&self.ranges);
        if by_rule.len() <= MAX_PORT_RANGES {
            fill(&mut value, &by_rule);
            return (value, Fit::Exact);
        }
        let merged = merge_all(&self.ranges);
        if merged.len() <= MAX_PORT_RANGES {
            fill(&mut value, &merged);
            return (value, Fit::Coalesced);
        }
        fill(&mut value, &merged[..MAX_PORT_RANGES]);
        let left_out = merged[MAX_PORT_RANGES..]
            .iter()
            .map(|r| (r.first, r.last))
            .collect();
        (value, Fit::Overflow(left_out))
    }
}

fn fill(value: &mut PolicyValue, ranges: &[PortRule]) {
    for (slot, r) in value.ranges.iter_mut().zip(ranges) {
        *slot = *r;
    }
    // At most MAX_PORT_RANGES (16) entries, so the count fits.
    value.range_count = ranges.len().min(MAX_PORT_RANGES) as u32;
}

/// Whether `b` starts at most one past the end of `a` (they overlap or touch).
fn touches(a_last: u16, b_first: u16) -> bool {
    u32::from(b_first) <= u32::from(a_last) + 1
}

/// Ranges sorted by (rule, first): merges ranges of one rule and drops those
/// that earlier ranges cover entirely. First match still gives the lowest
/// rule id allowing each port.
fn first_match_ranges(sorted: &[PortRule]) -> Vec<PortRule> {
    let mut per_rule: Vec<PortRule> = Vec::new();
    for r in sorted {
        match per_rule.last_mut() {
            Some(cur) if cur.rule_id == r.rule_id && touches(cur.last, r.first) => {
                cur.last = cur.last.max(r.last);
            }
            _ => per_rule.push(*r),
        }
    }
    let mut covered: Vec<(u16, u16)> = Vec::new();
    let mut kept = Vec::new();
    for r in per_rule {
        if covered.iter().any(|&(f, l)| f <= r.first && r.last <= l) {
            continue;
        }
        kept.push(r);
        covered.push((r.first, r.last));
        covered = union(covered);
    }
    kept
}

/// Merges overlapping and touching intervals.
fn union(mut intervals: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    intervals.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(intervals.len());
    for (f, l) in intervals {
        match out.last_mut() {
            Some(cur) if touches(cur.1, f) => cur.1 = cur.1.max(l),
            _ => out.push((f, l)),
        }
    }
    out
}

/// All ranges merged regardless of rule, by port, each with the lowest rule id
/// among those merged into it.
fn merge_all(ranges: &[PortRule]) -> Vec<PortRule> {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| (r.first, r.last, r.rule_id));
    let mut out: Vec<PortRule> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(cur) if touches(cur.last, r.first) => {
                cur.last = cur.last.max(r.last);
                cur.rule_id = cur.rule_id.min(r.rule_id);
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PolicyPort;

    fn ranges(v: &PolicyValue) -> Vec<(u16, u16, u32)> {
        v.ranges[..v.range_count as usize]
            .iter()
            .map(|r| (r.first, r.last, r.rule_id))
            .collect()
    }

    #[test]
    fn empty_ports_allow_every_protocol() {
        let t = port_targets(&Ports::All);
        assert_eq!(
            t,
            vec![
                PortTarget::AnyPort(proto::TCP),
                PortTarget::AnyPort(proto::UDP),
                PortTarget::AnyPort(proto::SCTP),
                PortTarget::AnyPort(proto::OTHER),
            ]
        );
        assert!(port_targets(&Ports::Only(vec![])).is_empty());
    }

    #[test]
    fn port_entries_become_targets() {
        let mut range = PolicyPort::number(Protocol::Udp, 1000);
        range.end_port = Some(2000);
        let t = port_targets(&Ports::Only(vec![
            PolicyPort::any(Protocol::Sctp),
            PolicyPort::number(Protocol::Tcp, 80),
            range,
        ]));
        assert_eq!(
            t,
            vec![
                PortTarget::AnyPort(proto::SCTP),
                PortTarget::Range {
                    protocol: Protocol::Tcp,
                    first: 80,
                    last: 80
                },
                PortTarget::Range {
                    protocol: Protocol::Udp,
                    first: 1000,
                    last: 2000
                },
            ]
        );
    }

    #[test]
    fn any_port_takes_lowest_rule() {
        let mut b = ValueBuilder::default();
        b.allow_range(80, 80, 1);
        b.allow_any(7);
        b.allow_any(3);
        let (v, fit) = b.build();
        assert_eq!((v.any_port_rule, v.range_count, fit), (3, 0, Fit::Exact));
        assert_eq!(v.rule_for_port(9), Some(3));
    }

    #[test]
    fn ranges_merge_per_rule_and_keep_first_rule() {
        let mut b = ValueBuilder::default();
        b.allow_range(90, 100, 2);
        b.allow_range(80, 85, 2);
        b.allow_range(86, 89, 2);
        b.allow_range(95, 95, 5); // covered by rule 2: dropped
        b.allow_range(95, 120, 1);
        let (v, fit) = b.build();
        assert_eq!(fit, Fit::Exact);
        assert_eq!(ranges(&v), vec![(95, 120, 1), (80, 100, 2)]);
        assert_eq!(v.rule_for_port(96), Some(1));
        assert_eq!(v.rule_for_port(80), Some(2));
        assert_eq!(v.rule_for_port(121), None);
    }

    #[test]
    fn too_many_ranges_coalesce_then_overflow() {
        let mut b = ValueBuilder::default();
        // 20 ranges of 20 rules; each odd one touches the next: 11 merged ranges.
        for i in 0..20u16 {
            b.allow_range(i * 10, i * 10 + 4 + 5 * (i % 2), u32::from(i) + 1);
        }
        let (v, fit) = b.build();
        assert_eq!(fit, Fit::Coalesced);
        assert_eq!(v.range_count, 11);
        for port in 0..200u16 {
            let expected = port % 10 <= 4 || (port / 10) % 2 == 1;
            assert_eq!(v.rule_for_port(port).is_some(), expected, "port {port}");
        }

        let mut b = ValueBuilder::default();
        for i in 0..20u16 {
            b.allow_range(i * 10, i * 10, 1);
        }
        let (v, fit) = b.build();
        assert_eq!(v.range_count as usize, MAX_PORT_RANGES);
        assert_eq!(
            fit,
            Fit::Overflow(vec![(160, 160), (170, 170), (180, 180), (190, 190)])
        );
    }
}
