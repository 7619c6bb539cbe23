//! The error table of `djinn calibrate validate-suite`: one row per real run beside its
//! simulation, whether each workload's policy ranking survives simulation, and the overall
//! verdict against the P50 / P99 targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use traces::{RunSummary, ValidationCell, ValidationSummary};

/// One real run beside its simulated twin. Latencies in ms, throughput in generated tokens/s.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteRow {
    pub workload: String,
    pub policy: String,
    pub agents: u32,
    pub latency_ms_p50_real: f64,
    pub latency_ms_p50_sim: f64,
    pub latency_ms_p99_real: f64,
    pub latency_ms_p99_sim: f64,
    pub ttft_ms_p50_real: f64,
    pub ttft_ms_p50_sim: f64,
    pub ttft_ms_p99_real: f64,
    pub ttft_ms_p99_sim: f64,
    pub throughput_tok_s_real: f64,
    pub throughput_tok_s_sim: f64,
    pub swaps_out_real: u64,
    pub swaps_out_sim: u64,
    pub swaps_in_real: u64,
    pub swaps_in_sim: u64,
    pub drops_real: u64,
    pub drops_sim: u64,
    /// (sim - real) / real of the P50 and P99 turn latency; empty where real is 0.
    pub p50_error: Option<f64>,
    pub p99_error: Option<f64>,
    /// Whether this run's workload ranks its policies the same in simulation (all its rows agree).
    pub ranking_identical: bool,
    /// The real run directory (reusable by `calibrate fit --check` and `calibrate validate`).
    pub run_dir: String,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Relative error of `sim` against `real`; none where `real` is not positive.
pub fn rel_err(sim: f64, real: f64) -> Option<f64> {
    let e = (sim - real) / real;
    (real > 0.0 && e.is_finite()).then_some(e)
}

impl SuiteRow {
    /// The row of a real run and its twin; `ranking_identical` is filled in by `rank_rows`.
    pub fn new(real: &RunSummary, sim: &RunSummary, run_dir: String) -> SuiteRow {
        let (p50r, p50s) = (ms(real.turn_latency.p50_ns), ms(sim.turn_latency.p50_ns));
        let (p99r, p99s) = (ms(real.turn_latency.p99_ns), ms(sim.turn_latency.p99_ns));
        SuiteRow {
            workload: real.workload.clone(),
            policy: real.policy.clone(),
            agents: real.agents,
            latency_ms_p50_real: p50r,
            latency_ms_p50_sim: p50s,
            latency_ms_p99_real: p99r,
            latency_ms_p99_sim: p99s,
            ttft_ms_p50_real: ms(real.ttft.p50_ns),
            ttft_ms_p50_sim: ms(sim.ttft.p50_ns),
            ttft_ms_p99_real: ms(real.ttft.p99_ns),
            ttft_ms_p99_sim: ms(sim.ttft.p99_ns),
            throughput_tok_s_real: real.throughput_tokens_per_s,
            throughput_tok_s_sim: sim.throughput_tokens_per_s,
            swaps_out_real: real.swaps_out,
            swaps_out_sim: sim.swaps_out,
            swaps_in_real: real.swaps_in,
            swaps_in_sim: sim.swaps_in,
            drops_real: real.drops,
            drops_sim: sim.drops,
            p50_error: rel_err(p50s, p50r),
            p99_error: rel_err(p99s, p99r),
            ranking_identical: false,
            run_dir,
        }
    }
}

/// How two policies compare on one figure (lower is better), with values within `tie` of each
/// other (relative) counted as equal.
fn order(a: f64, b: f64, tie: f64) -> std::cmp::Ordering {
    if (a - b).abs() <= tie * a.abs().max(b.abs()) {
        std::cmp::Ordering::Equal
    } else {
        a.total_cmp(&b)
    }
}

/// Whether real and simulated runs order every pair of policies alike on one figure. A tie on
/// one side against an order on the other is forgiven while the ordered side's gap is within
/// twice the tie band: measurement noise must not flip the verdict at the band's edge, but a
/// clear real difference the simulation misses (or invents) is a different ranking.
fn same_order(pairs: &[(f64, f64)], tie: f64) -> bool {
    use std::cmp::Ordering::Equal;
    for (i, &(ra, sa)) in pairs.iter().enumerate() {
        for &(rb, sb) in &pairs[i + 1..] {
            let (real, sim) = (order(ra, rb, tie), order(sa, sb, tie));
            let agree = match (real, sim) {
                (r, s) if r == s => true,
                (Equal, _) => order(sa, sb, 2.0 * tie) == Equal,
                (_, Equal) => order(ra, rb, 2.0 * tie) == Equal,
                _ => false,
            };
            if !agree {
                return false;
            }
        }
    }
    true
}

/// Sets each row's `ranking_identical`: the workload's policies ordered alike by real and
/// simulated P50 and by real and simulated P99 turn latency. Returns per workload the verdict.
pub fn rank_rows(rows: &mut [SuiteRow], tie: f64) -> BTreeMap<String, bool> {
    let mut by_workload: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_workload.entry(r.workload.clone()).or_default().push(i);
    }
    let mut verdicts = BTreeMap::new();
    for (workload, idx) in by_workload {
        let p50: Vec<(f64, f64)> = idx
            .iter()
            .map(|&i| (rows[i].latency_ms_p50_real, rows[i].latency_ms_p50_sim))
            .collect();
        let p99: Vec<(f64, f64)> = idx
            .iter()
            .map(|&i| (rows[i].latency_ms_p99_real, rows[i].latency_ms_p99_sim))
            .collect();
        let same = same_order(&p50, tie) && same_order(&p99, tie);
        for &i in &idx {
            rows[i].ranking_identical = same;
        }
        verdicts.insert(workload, same);
    }
    verdicts
}

/// The targets a run is held to: |P50 error| and |P99 error| at most these (fractions).
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    pub p50: f64,
    pub p99: f64,
}

/// Counts behind the overall line.
#[derive(Debug, PartialEq)]
pub struct Overall {
    pub runs: usize,
    pub p50_within: usize,
    pub p99_within: usize,
    pub worst_p50: f64,
    pub worst_p99: f64,
    pub workloads: usize,
    pub rankings_identical: usize,
}

impl Overall {
    pub fn of(rows: &[SuiteRow], verdicts: &BTreeMap<String, bool>, t: Targets) -> Overall {
        // A run without a figure (no completed turn) cannot be within the target.
        let within = |e: Option<f64>, target: f64| e.is_some_and(|e| e.abs() <= target);
        let worst = |f: &dyn Fn(&SuiteRow) -> Option<f64>| {
            rows.iter()
                .map(|r| f(r).map_or(f64::INFINITY, f64::abs))
                .fold(0.0f64, f64::max)
        };
        Overall {
            runs: rows.len(),
            p50_within: rows.iter().filter(|r| within(r.p50_error, t.p50)).count(),
            p99_within: rows.iter().filter(|r| within(r.p99_error, t.p99)).count(),
            worst_p50: worst(&|r| r.p50_error),
            worst_p99: worst(&|r| r.p99_error),
            workloads: verdicts.len(),
            rankings_identical: verdicts.values().filter(|v| **v).count(),
        }
    }

    pub fn met(&self) -> bool {
        self.runs > 0
            && self.p50_within == self.runs
            && self.p99_within == self.runs
            && self.rankings_identical == self.workloads
    }

    pub fn line(&self, t: Targets) -> String {
        format!(
            "overall: P50 within {:.0}% on {}/{} runs (worst {:.1}%), P99 within {:.0}% on {}/{} runs (worst {:.1}%), policy ranking identical on {}/{} workloads: {}",
            100.0 * t.p50,
            self.p50_within,
            self.runs,
            100.0 * self.worst_p50,
            100.0 * t.p99,
            self.p99_within,
            self.runs,
            100.0 * self.worst_p99,
            self.rankings_identical,
            self.workloads,
            if self.met() { "targets met" } else { "targets NOT met" }
        )
    }
}

fn pct(e: Option<f64>) -> String {
    e.map_or_else(|| "-".into(), |e| format!("{:+.1}%", 100.0 * e))
}

/// The text table: a line per run, a ranking line per workload, the overall line.
pub fn suite_text(
    header: &str,
    rows: &[SuiteRow],
    verdicts: &BTreeMap<String, bool>,
    t: Targets,
) -> String {
    let mut s = format!("{header}\n\n");
    let _ = writeln!(
        s,
        "{:<30} {:>19} {:>19} {:>17} {:>17} {:>15} {:>13} {:>11}",
        "workload/policy x agents",
        "P50 ms real/sim",
        "P99 ms real/sim",
        "TTFT P50 ms",
        "TTFT P99 ms",
        "tok/s",
        "swaps out",
        "drops"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<30} {:>7.0}/{:<5.0}{:>7} {:>7.0}/{:<5.0}{:>7} {:>8.0}/{:<8.0} {:>8.0}/{:<8.0} {:>7.0}/{:<7.0} {:>6}/{:<6} {:>5}/{:<5}",
            format!("{}/{} x{}", r.workload, r.policy, r.agents),
            r.latency_ms_p50_real,
            r.latency_ms_p50_sim,
            pct(r.p50_error),
            r.latency_ms_p99_real,
            r.latency_ms_p99_sim,
            pct(r.p99_error),
            r.ttft_ms_p50_real,
            r.ttft_ms_p50_sim,
            r.ttft_ms_p99_real,
            r.ttft_ms_p99_sim,
            r.throughput_tok_s_real,
            r.throughput_tok_s_sim,
            r.swaps_out_real,
            r.swaps_out_sim,
            r.drops_real,
            r.drops_sim,
        );
    }
    s += "\npolicy ranking by P50 and P99 turn latency, real vs simulated\n";
    for (workload, same) in verdicts {
        let _ = writeln!(
            s,
            "  {workload:<28} identical: {}",
            if *same { "yes" } else { "no" }
        );
    }
    let _ = writeln!(s, "\n{}", Overall::of(rows, verdicts, t).line(t));
    s
}

/// The compact table a profile records in `provenance.validation`; an error names a run
/// without a latency figure (no completed turn), which has no error to record.
pub fn summary(rows: &[SuiteRow], against: String) -> anyhow::Result<ValidationSummary> {
    let cells = rows
        .iter()
        .map(|r| match (r.p50_error, r.p99_error) {
            (Some(p50_error), Some(p99_error)) => Ok(ValidationCell {
                workload: r.workload.clone(),
                policy: r.policy.clone(),
                p50_error,
                p99_error,
            }),
            _ => Err(anyhow::anyhow!(
                "{}: no turn latency to compare (no completed turn), so no validation can be recorded",
                r.run_dir
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(ValidationSummary { against, cells })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(workload: &str, policy: &str, p50: (f64, f64), p99: (f64, f64)) -> SuiteRow {
        SuiteRow {
            workload: workload.into(),
            policy: policy.into(),
            agents: 4,
            latency_ms_p50_real: p50.0,
            latency_ms_p50_sim: p50.1,
            latency_ms_p99_real: p99.0,
            latency_ms_p99_sim: p99.1,
            ttft_ms_p50_real: 1.0,
            ttft_ms_p50_sim: 1.0,
            ttft_ms_p99_real: 2.0,
            ttft_ms_p99_sim: 2.0,
            throughput_tok_s_real: 10.0,
            throughput_tok_s_sim: 10.0,
            swaps_out_real: 0,
            swaps_out_sim: 0,
            swaps_in_real: 0,
            swaps_in_sim: 0,
            drops_real: 0,
            drops_sim: 0,
            p50_error: rel_err(p50.1, p50.0),
            p99_error: rel_err(p99.1, p99.0),
            ranking_identical: false,
            run_dir: String::new(),
        }
    }

    #[test]
    fn a_swapped_pair_is_a_different_ranking_and_noise_inside_the_band_is_not() {
        let mut rows = vec![
            // w1: djinn < swap < vllm on both sides.
            row("w1", "djinn", (100.0, 102.0), (200.0, 205.0)),
            row("w1", "swap", (150.0, 149.0), (300.0, 310.0)),
            row("w1", "vllm", (300.0, 290.0), (600.0, 590.0)),
            // w2: the simulation puts swap ahead of djinn on P99.
            row("w2", "djinn", (100.0, 100.0), (200.0, 260.0)),
            row("w2", "swap", (150.0, 150.0), (230.0, 220.0)),
            // w3: a real tie (0.5% apart) the simulation splits by 1.5%: within twice the band.
            row("w3", "djinn", (100.0, 100.0), (200.0, 200.0)),
            row("w3", "vllm", (100.5, 101.5), (200.0, 200.0)),
            // w4: a real tie the simulation splits by 10%: a ranking the run does not have.
            row("w4", "djinn", (100.0, 100.0), (200.0, 200.0)),
            row("w4", "vllm", (100.0, 110.0), (200.0, 200.0)),
        ];
        let verdicts = rank_rows(&mut rows, 0.01);
        assert_eq!(verdicts["w1"], true);
        assert_eq!(verdicts["w2"], false);
        assert_eq!(verdicts["w3"], true);
        assert_eq!(verdicts["w4"], false);
        assert!(rows[..3].iter().all(|r| r.ranking_identical));
        assert!(rows[3..5].iter().all(|r| !r.ranking_identical));
    }

    #[test]
    fn the_overall_line_counts_runs_within_the_targets() {
        let mut rows = vec![
            row("w1", "djinn", (100.0, 102.0), (200.0, 216.0)),
            row("w1", "vllm", (200.0, 190.0), (400.0, 410.0)),
        ];
        let verdicts = rank_rows(&mut rows, 0.01);
        let t = Targets {
            p50: 0.03,
            p99: 0.07,
        };
        let o = Overall::of(&rows, &verdicts, t);
        assert_eq!((o.runs, o.p50_within, o.p99_within), (2, 1, 1));
        assert!((o.worst_p50 - 0.05).abs() < 1e-12);
        assert!((o.worst_p99 - 0.08).abs() < 1e-12);
        assert_eq!((o.workloads, o.rankings_identical), (1, 1));
        assert!(!o.met());
        let text = suite_text("h", &rows, &verdicts, t);
        assert!(
            text.contains("P50 within 3% on 1/2 runs (worst 5.0%)"),
            "{text}"
        );
        assert!(
            text.contains("P99 within 7% on 1/2 runs (worst 8.0%)"),
            "{text}"
        );
        assert!(
            text.contains("w1                           identical: yes"),
            "{text}"
        );
        assert!(text.contains("targets NOT met"), "{text}");
        // A run with no completed turn has no figure and cannot pass.
        rows[1].p50_error = None;
        rows[0].p50_error = Some(0.0);
        rows[0].p99_error = Some(0.0);
        rows[1].p99_error = Some(0.0);
        let o = Overall::of(&rows, &verdicts, t);
        assert!(summary(&rows, "x".into()).is_err());
        assert_eq!(o.p50_within, 1);
        assert!(o.worst_p50.is_infinite() && !o.met());
        rows[1].p50_error = Some(-0.03);
        assert!(Overall::of(&rows, &verdicts, t).met());
        let s = summary(&rows, "x".into()).unwrap();
        assert_eq!(s.cells.len(), 2);
        assert_eq!(s.cells[1].p50_error, -0.03);
    }
}
