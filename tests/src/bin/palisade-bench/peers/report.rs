//! Medians, ratios, the printed tables, the bar and the JSON figures.

use std::time::Duration;

use serde_json::{Value, json};

use super::workload::Sample;

/// What enforces policy during a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A: nothing.
    None,
    /// B: Palisade's classifier on both host veths.
    Palisade,
    /// C: iptables + ipset in kube-router's layout.
    Iptables,
}

impl Mode {
    /// The order of every round of turns.
    pub const ALL: [Mode; 3] = [Mode::None, Mode::Palisade, Mode::Iptables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "no filter",
            Mode::Palisade => "palisade",
            Mode::Iptables => "iptables",
        }
    }
}

/// The three measurements of one turn.
#[derive(Clone, Copy, Debug)]
pub struct Turn {
    pub policies: usize,
    pub mode: Mode,
    pub crr: Sample,
    pub rr: Sample,
    pub stream: Sample,
}

/// What installing one policy count cost each enforcer.
#[derive(Clone, Debug, Default)]
pub struct Setup {
    pub policies: usize,
    pub compile: Duration,
    pub map_write: Duration,
    pub policy_keys: usize,
    pub peer_ips: usize,
    pub generate: Duration,
    pub chains: usize,
    pub rules: usize,
    pub ipsets: usize,
    pub ipset_loads: Vec<Duration>,
    pub iptables_loads: Vec<Duration>,
    pub conntrack_peak: u64,
    pub flow_events: u64,
    pub events_lost: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians of one (policy count, mode).
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub policies: usize,
    pub mode: Mode,
    pub conn_per_s: f64,
    pub trans_per_s: f64,
    pub gbit_per_s: f64,
    /// Machine CPU µs per connection / per transaction, ms per GB.
    pub cpu_us_per_conn: f64,
    pub proc_us_per_conn: f64,
    pub cpu_us_per_trans: f64,
    pub cpu_ms_per_gb: f64,
    pub errors: u64,
    pub runs: usize,
}

fn per_op(s: &Sample, cpu: Duration, scale: f64) -> f64 {
    cpu.as_secs_f64() * scale / (s.ops.max(1) as f64)
}

pub fn summarize(turns: &[Turn], policies: usize, mode: Mode) -> Summary {
    let t: Vec<&Turn> = turns
        .iter()
        .filter(|t| t.policies == policies && t.mode == mode)
        .collect();
    let m = |f: &dyn Fn(&Turn) -> f64| median(t.iter().map(|x| f(x)).collect());
    Summary {
        policies,
        mode,
        conn_per_s: m(&|x| x.crr.rate()),
        trans_per_s: m(&|x| x.rr.rate()),
        gbit_per_s: m(&|x| x.stream.rate() / 1e9),
        cpu_us_per_conn: m(&|x| per_op(&x.crr, x.crr.cpu.machine, 1e6)),
        proc_us_per_conn: m(&|x| per_op(&x.crr, x.crr.cpu.process, 1e6)),
        cpu_us_per_trans: m(&|x| per_op(&x.rr, x.rr.cpu.machine, 1e6)),
        // ops are bits: per GB = per 8e9 bits.
        cpu_ms_per_gb: m(&|x| per_op(&x.stream, x.stream.cpu.machine, 1e3 * 8e9)),
        errors: t.iter().map(|x| x.crr.errors + x.rr.errors).sum(),
        runs: t.len(),
    }
}

/// Ratios of two summaries' rates (higher is better for `a`).
#[derive(Clone, Copy, Debug)]
pub struct Ratio {
    pub conn: f64,
    pub trans: f64,
    pub gbit: f64,
}

pub fn ratio(a: &Summary, b: &Summary) -> Ratio {
    Ratio {
        conn: a.conn_per_s / b.conn_per_s,
        trans: a.trans_per_s / b.trans_per_s,
        gbit: a.gbit_per_s / b.gbit_per_s,
    }
}

fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The main table: one row per (policy count, mode).
pub fn print_table(summaries: &[Summary]) {
    println!(
        "{:>8}  {:<9} {:>9} {:>6} {:>9} {:>6} {:>7} {:>6} {:>13} {:>9} {:>8}",
        "policies",
        "enforcer",
        "conn/s",
        "xA",
        "trans/s",
        "xA",
        "Gbit/s",
        "xA",
        "CPU us/conn",
        "us/trans",
        "ms/GB"
    );
    for s in summaries {
        let a = summaries
            .iter()
            .find(|x| x.policies == s.policies && x.mode == Mode::None)
            .unwrap_or(s);
        let r = ratio(s, a);
        println!(
            "{:>8}  {:<9} {:>9} {:>6.2} {:>9} {:>6.2} {:>7.1} {:>6.2} {:>6.1} /{:>5.1} {:>9.1} {:>8.1}{}",
            s.policies,
            s.mode.name(),
            thousands(s.conn_per_s),
            r.conn,
            thousands(s.trans_per_s),
            r.trans,
            s.gbit_per_s,
            r.gbit,
            s.cpu_us_per_conn,
            s.proc_us_per_conn,
            s.cpu_us_per_trans,
            s.cpu_ms_per_gb,
            if s.errors > 0 {
                format!("  ({} errors)", s.errors)
            } else {
                String::new()
            }
        );
    }
}

/// B/A, C/A and B/C per policy count.
pub fn ratios(summaries: &[Summary], counts: &[usize]) -> Vec<(usize, Ratio, Ratio, Ratio)> {
    let find = |n: usize, m: Mode| summaries.iter().find(|s| s.policies == n && s.mode == m);
    counts
        .iter()
        .filter_map(|&n| {
            let (a, b, c) = (
                find(n, Mode::None)?,
                find(n, Mode::Palisade)?,
                find(n, Mode::Iptables)?,
            );
            Some((n, ratio(b, a), ratio(c, a), ratio(b, c)))
        })
        .collect()
}

pub fn print_ratios(rows: &[(usize, Ratio, Ratio, Ratio)]) {
    println!(
        "{:>8}  {:>24}  {:>24}  {:>26}",
        "policies", "palisade/none (B/A)", "iptables/none (C/A)", "palisade/iptables (B/C)"
    );
    println!(
        "{:>8}  {:>8}{:>8}{:>8}  {:>8}{:>8}{:>8}  {:>9}{:>9}{:>8}",
        "", "conn", "trans", "Gbit", "conn", "trans", "Gbit", "conn", "trans", "Gbit"
    );
    for (n, ba, ca, bc) in rows {
        println!(
            "{n:>8}  {:>8.3}{:>8.3}{:>8.3}  {:>8.3}{:>8.3}{:>8.3}  {:>9.2}{:>9.2}{:>8.2}",
            ba.conn, ba.trans, ba.gbit, ca.conn, ca.trans, ca.gbit, bc.conn, bc.trans, bc.gbit
        );
    }
}

/// The bar at the largest policy count: Palisade ≥ 0.9 of no filter on new
/// connections, ≥ 0.95 on throughput, and at least twice the iptables
/// setup's new connections ("well ahead").
pub fn bar(rows: &[(usize, Ratio, Ratio, Ratio)]) -> Value {
    let Some((n, ba, _, bc)) = rows.iter().max_by_key(|r| r.0) else {
        return Value::Null;
    };
    let checks = [
        (
            "palisade/none new connections >= 0.90",
            ba.conn,
            ba.conn >= 0.90,
        ),
        ("palisade/none throughput >= 0.95", ba.gbit, ba.gbit >= 0.95),
        (
            "palisade/iptables new connections >= 2",
            bc.conn,
            bc.conn >= 2.0,
        ),
    ];
    println!("bar at {n} policies:");
    for (what, value, ok) in checks {
        println!(
            "  {:<44} {value:>8.3}  {}",
            what,
            if ok { "met" } else { "NOT met" }
        );
    }
    json!({
        "policies": n,
        "checks": checks.iter().map(|(w, v, ok)| json!({"check": w, "value": v, "met": ok})).collect::<Vec<_>>(),
        "met": checks.iter().all(|c| c.2),
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub fn summary_json(s: &Summary) -> Value {
    json!({
        "policies": s.policies, "enforcer": s.mode.name(), "runs": s.runs,
        "conn_per_s": s.conn_per_s, "trans_per_s": s.trans_per_s, "gbit_per_s": s.gbit_per_s,
        "cpu_us_per_conn_machine": s.cpu_us_per_conn, "cpu_us_per_conn_process": s.proc_us_per_conn,
        "cpu_us_per_trans_machine": s.cpu_us_per_trans, "cpu_ms_per_gb_machine": s.cpu_ms_per_gb,
        "errors": s.errors,
    })
}

pub fn turn_json(t: &Turn) -> Value {
    let sample = |s: &Sample| {
        json!({
            "ops": s.ops, "errors": s.errors, "seconds": secs(s.elapsed), "rate": s.rate(),
            "cpu_machine_s": secs(s.cpu.machine), "cpu_process_s": secs(s.cpu.process),
        })
    };
    json!({
        "policies": t.policies, "enforcer": t.mode.name(),
        "connections": sample(&t.crr), "transactions": sample(&t.rr), "stream_bits": sample(&t.stream),
    })
}

pub fn setup_json(s: &Setup) -> Value {
    json!({
        "policies": s.policies,
        "palisade": {
            "compile_s": secs(s.compile), "map_write_s": secs(s.map_write),
            "policy_keys": s.policy_keys, "peer_ips": s.peer_ips,
            "flow_events_read": s.flow_events, "flow_events_lost": s.events_lost,
        },
        "iptables": {
            "generate_s": secs(s.generate), "chains": s.chains, "rules": s.rules, "ipsets": s.ipsets,
            "ipset_restore_s": s.ipset_loads.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
            "iptables_restore_s": s.iptables_loads.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
            "conntrack_entries_peak": s.conntrack_peak,
        },
    })
}

pub fn ratios_json(rows: &[(usize, Ratio, Ratio, Ratio)]) -> Value {
    let r = |x: &Ratio| json!({"conn": x.conn, "trans": x.trans, "gbit": x.gbit});
    rows.iter()
        .map(|(n, ba, ca, bc)| json!({"policies": n, "palisade_over_none": r(ba), "iptables_over_none": r(ca), "palisade_over_iptables": r(bc)}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_thousands() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
