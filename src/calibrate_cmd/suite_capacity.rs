//! Capacity at an SLO, real against simulated, for `djinn calibrate validate-suite
//! --capacity-agents`: one workload under each policy at a list of agent counts on the engine,
//! each run beside its simulated twin. A count passes when no turn was rejected and the P99 turn
//! latency is within the SLO; a policy's capacity is the largest listed count up to which every
//! count passes (the real and the simulated capacity read the same list, so they differ only
//! where a run and its twin disagree on one of the listed counts).

use std::fmt::Write as _;

use serde::Serialize;
use traces::RunSummary;

/// One agent count of one policy: the real run and its twin against the SLO.
#[derive(Clone, Debug, Serialize)]
pub struct CapacityRow {
    pub workload: String,
    pub policy: String,
    pub agents: u32,
    pub slo_ms: f64,
    pub latency_ms_p99_real: f64,
    pub latency_ms_p99_sim: f64,
    pub turns_rejected_real: u64,
    pub turns_rejected_sim: u64,
    pub passes_real: bool,
    pub passes_sim: bool,
    /// The real run directory.
    pub run_dir: String,
}

fn passes(s: &RunSummary, slo_ms: f64) -> bool {
    s.turns_rejected == 0 && s.turn_latency.p99_ns as f64 / 1e6 <= slo_ms
}

impl CapacityRow {
    pub fn new(real: &RunSummary, sim: &RunSummary, slo_ms: f64, run_dir: String) -> CapacityRow {
        CapacityRow {
            workload: real.workload.clone(),
            policy: real.policy.clone(),
            agents: real.agents,
            slo_ms,
            latency_ms_p99_real: real.turn_latency.p99_ns as f64 / 1e6,
            latency_ms_p99_sim: sim.turn_latency.p99_ns as f64 / 1e6,
            turns_rejected_real: real.turns_rejected,
            turns_rejected_sim: sim.turns_rejected,
            passes_real: passes(real, slo_ms),
            passes_sim: passes(sim, slo_ms),
            run_dir,
        }
    }
}

/// Per policy (in first-seen order): the real and the simulated capacity, 0 when even the
/// smallest listed count fails.
pub fn capacities(rows: &[CapacityRow]) -> Vec<(String, u32, u32)> {
    let mut policies: Vec<&str> = Vec::new();
    for r in rows {
        if !policies.contains(&r.policy.as_str()) {
            policies.push(&r.policy);
        }
    }
    policies
        .into_iter()
        .map(|p| {
            let mut of: Vec<&CapacityRow> = rows.iter().filter(|r| r.policy == p).collect();
            of.sort_by_key(|r| r.agents);
            let capacity = |pass: &dyn Fn(&CapacityRow) -> bool| {
                of.iter()
                    .take_while(|r| pass(r))
                    .last()
                    .map_or(0, |r| r.agents)
            };
            (
                p.to_string(),
                capacity(&|r| r.passes_real),
                capacity(&|r| r.passes_sim),
            )
        })
        .collect()
}

/// The capacity section of the suite's text: every count, then each policy's capacity.
pub fn capacity_text(rows: &[CapacityRow]) -> String {
    let mut s = String::new();
    let Some(first) = rows.first() else {
        return s;
    };
    let _ = writeln!(
        s,
        "\ncapacity of {} at P99 turn latency <= {:.0} ms (no turn rejected), real vs simulated",
        first.workload, first.slo_ms
    );
    let _ = writeln!(
        s,
        "{:<22} {:>19} {:>13}",
        "policy x agents", "P99 ms real/sim", "passes"
    );
    let yes = |b: bool| if b { "yes" } else { "no" };
    for r in rows {
        let _ = writeln!(
            s,
            "{:<22} {:>9.0}/{:<9.0} {:>6}/{:<6}",
            format!("{} x{}", r.policy, r.agents),
            r.latency_ms_p99_real,
            r.latency_ms_p99_sim,
            yes(r.passes_real),
            yes(r.passes_sim)
        );
    }
    let caps = capacities(rows);
    let same = caps.iter().filter(|(_, r, s)| r == s).count();
    for (policy, real, sim) in &caps {
        let _ = writeln!(
            s,
            "  {policy:<20} capacity real {real:>5}, simulated {sim:>5}{}",
            if real == sim { "" } else { "  (differs)" }
        );
    }
    let _ = writeln!(
        s,
        "capacity identical on {same}/{} policies (over the listed agent counts)",
        caps.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, agents: u32, real: bool, sim: bool) -> CapacityRow {
        CapacityRow {
            workload: "w".into(),
            policy: policy.into(),
            agents,
            slo_ms: 100.0,
            latency_ms_p99_real: 0.0,
            latency_ms_p99_sim: 0.0,
            turns_rejected_real: 0,
            turns_rejected_sim: 0,
            passes_real: real,
            passes_sim: sim,
            run_dir: String::new(),
        }
    }

    #[test]
    fn capacity_is_the_last_count_of_the_passing_prefix() {
        let rows = vec![
            row("a", 16, true, true),
            row("a", 8, true, true),
            row("a", 32, false, true),
            // A pass above a failure does not count: capacity stops at the first failure.
            row("a", 64, true, false),
            row("b", 8, false, false),
            row("b", 16, false, false),
        ];
        assert_eq!(
            capacities(&rows),
            vec![("a".to_string(), 16, 32), ("b".to_string(), 0, 0)]
        );
        let text = capacity_text(&rows);
        assert!(
            text.contains("capacity identical on 1/2 policies"),
            "{text}"
        );
        assert!(text.contains("(differs)"), "{text}");
    }
}
