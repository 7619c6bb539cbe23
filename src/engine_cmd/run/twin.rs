//! The simulated twin of a real run (same workload, seed, policy, pools and cost hints) and the
//! table that sets the two side by side: how real traces feed calibration.

use std::path::Path;

use anyhow::{Context, Result};
use sim::driver::{RunLimits, RunSettings};
use sim::PolicyKind;
use traces::RunSummary;

use super::figures::{figures, Figures};
use super::plan::{EngineInfo, RunPlan};
use super::policies::{reproduce_line, summary_inputs, PolicyResult};
use super::RunArgs;
use crate::runio::{code_version, write_run};

/// The simulator on the same workload, seed, policy, pools and cost hints; its run directory
/// (`<policy>.sim`) goes under `staging` when given.
pub fn simulate_twin(
    args: &RunArgs,
    plan: &RunPlan,
    policy: PolicyKind,
    info: &EngineInfo,
    settings: &RunSettings,
    staging: Option<&Path>,
) -> Result<(RunSummary, Figures)> {
    let mut config = plan.base.clone();
    config.policy = policy;
    let mut sim_settings = settings.clone();
    sim_settings.limits = RunLimits::default();
    let output =
        sim::experiment::simulate_with(&plan.workload, &config, &sim_settings, &config.profile)
            .with_context(|| format!("simulating {} / {}", plan.spec.name, policy.name()))?;
    let inputs = summary_inputs(args, plan, policy, &output, info);
    let summary = analysis::summarize(&inputs, &output.turns, &output.steps, &output.swaps);
    let figures = figures(&output.turns, &output.steps, &output.swaps, output.end_time);
    if let Some(staging) = staging {
        let mut manifest = sim::experiment::manifest(
            &plan.spec,
            plan.agents,
            &config,
            &code_version(),
            format!(
                "the simulated twin of: {}",
                reproduce_line(args, plan, policy, info)
            ),
        );
        manifest
            .options
            .insert("gpu_blocks".into(), settings.gpu_blocks.to_string());
        manifest
            .options
            .insert("host_blocks".into(), settings.host_blocks.to_string());
        manifest.options.remove("gpu_memory_utilization");
        write_run(
            &staging.join(format!("{}.sim", policy.name())),
            &manifest,
            &output,
            &summary,
        )?;
    }
    Ok((summary, figures))
}

pub fn side_by_side(results: &[PolicyResult], profile: &str) -> String {
    let ms = |ns: u64| format!("{:.1}", ns as f64 / 1e6);
    let gb = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let headers = [
        "policy",
        "source",
        "p50 ms",
        "p99 ms",
        "ttft p50",
        "step p50 ms",
        "decode step p50",
        "decode batch",
        "swap out GB/s",
        "swap in GB/s",
        "swaps out",
        "drops",
        "prefix hits",
        "run s",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for r in results {
        let Some((sim, sim_fig)) = &r.sim else {
            continue;
        };
        for (source, s, f) in [("real", &r.real, &r.real_figures), ("sim", sim, sim_fig)] {
            rows.push(vec![
                s.policy.clone(),
                source.to_string(),
                ms(s.turn_latency.p50_ns),
                ms(s.turn_latency.p99_ns),
                ms(s.ttft.p50_ns),
                format!("{:.2}", f.step_ms_p50),
                format!("{:.2}", f.decode_step_ms_p50),
                format!("{:.1}", f.decode_batch_mean),
                gb(f.swap_out_gb_per_s),
                gb(f.swap_in_gb_per_s),
                s.swaps_out.to_string(),
                s.drops.to_string(),
                format!("{} ({} tok)", f.prefix_hits, f.prefix_hit_tokens),
                format!("{:.1}", f.end_s),
            ]);
        }
        let ratio = |a: f64, b: f64| {
            if b > 0.0 && a.is_finite() && b.is_finite() {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        let opt_ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "-".into(),
        };
        rows.push(vec![
            r.real.policy.clone(),
            "real/sim".into(),
            ratio(
                r.real.turn_latency.p50_ns as f64,
                sim.turn_latency.p50_ns as f64,
            ),
            ratio(
                r.real.turn_latency.p99_ns as f64,
                sim.turn_latency.p99_ns as f64,
            ),
            ratio(r.real.ttft.p50_ns as f64, sim.ttft.p50_ns as f64),
            ratio(r.real_figures.step_ms_p50, sim_fig.step_ms_p50),
            ratio(
                r.real_figures.decode_step_ms_p50,
                sim_fig.decode_step_ms_p50,
            ),
            ratio(r.real_figures.decode_batch_mean, sim_fig.decode_batch_mean),
            opt_ratio(r.real_figures.swap_out_gb_per_s, sim_fig.swap_out_gb_per_s),
            opt_ratio(r.real_figures.swap_in_gb_per_s, sim_fig.swap_in_gb_per_s),
            ratio(r.real.swaps_out as f64, sim.swaps_out as f64),
            ratio(r.real.drops as f64, sim.drops as f64),
            ratio(
                r.real_figures.prefix_hit_tokens as f64,
                sim_fig.prefix_hit_tokens as f64,
            ),
            ratio(r.real_figures.end_s, sim_fig.end_s),
        ]);
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < 2 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = format!(
        "\nREAL vs SIMULATED ({profile}): swap GB/s = bytes / time a swap of that direction was in flight; step times from steps.csv\n"
    );
    out.push_str(&line(headers.iter().map(|h| h.to_string()).collect()));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}
