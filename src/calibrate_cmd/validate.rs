//! `djinn calibrate validate`: real runs re-simulated under profiles, real against simulated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use sim::driver::RunLimits;
use sim::experiment::SimConfig;
use traces::{GpuProfile, RunManifest, RunSummary, StepRecord};

use super::inputs::{real_runs, RealRun};
use crate::runio::outdir::{check_new_file, check_new_folder, Staging};

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// Real run directories, or folders holding them (as for `fit`).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// Profiles to simulate with (shipped names or JSON paths); repeat to compare several.
    /// Default: the analytic h100-llama2-7b and the fitted h100-llama2-7b-fitted.
    #[arg(long = "profile", value_name = "NAME|PATH")]
    pub profiles: Vec<String>,
    /// Profile whose cost hints the policies plan with: the real runs' own (their
    /// manifests' `--profile`), so only the simulated GPU's timing differs between profiles.
    #[arg(long, default_value = calibration::DEFAULT_PROFILE, value_name = "NAME|PATH")]
    pub hints_profile: String,
    /// Also write the comparison as CSV. An existing file is never replaced silently: the command
    /// refuses (before simulating) unless --overwrite.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Replace an existing --csv file (and existing twins under --twins-out).
    #[arg(long)]
    pub overwrite: bool,
    /// Also write every simulated twin as a run directory (manifest.json, turns.csv, steps.csv,
    /// swaps.csv, summary.json) under DIR/<workload>/<policy>-x<agents>-seed<seed>.<profile>.sim
    /// (numbered when real runs repeat), to set its turns and steps beside the real run's.
    #[arg(long, value_name = "DIR")]
    pub twins_out: Option<PathBuf>,
}

/// One row of `validate`: a real run against its simulated twin under one profile.
#[derive(Debug, Serialize)]
struct ValidationRow {
    run: String,
    workload: String,
    policy: String,
    agents: u32,
    profile: String,
    latency_ms_p50_real: f64,
    latency_ms_p50_sim: f64,
    latency_ms_p99_real: f64,
    latency_ms_p99_sim: f64,
    /// Empty when the run has no decode-only step.
    decode_step_ms_p50_real: Option<f64>,
    decode_step_ms_p50_sim: Option<f64>,
    end_s_real: f64,
    end_s_sim: f64,
    swaps_out_real: u64,
    swaps_out_sim: u64,
    drops_real: u64,
    drops_sim: u64,
}

fn option<'a>(manifest: &'a RunManifest, key: &str, dir: &Path) -> Result<&'a str> {
    manifest
        .options
        .get(key)
        .map(String::as_str)
        .with_context(|| {
            format!(
                "{}: option `{key}` missing (not written by `djinn engine run`?)",
                dir.join("manifest.json").display()
            )
        })
}

fn parse_option<T: std::str::FromStr>(manifest: &RunManifest, key: &str, dir: &Path) -> Result<T> {
    let text = option(manifest, key, dir)?;
    text.parse().map_err(|_| {
        anyhow::anyhow!(
            "{}: option `{key}` = `{text}` is not a valid value",
            dir.join("manifest.json").display()
        )
    })
}

/// Median decode-only step, ms; none when the run has no such step.
fn decode_step_ms_p50(steps: &[StepRecord]) -> Option<f64> {
    let mut d: Vec<u64> = steps
        .iter()
        .filter(|s| s.decode_batch > 0 && s.prefill_tokens == 0)
        .map(|s| s.duration_ns)
        .collect();
    if d.is_empty() {
        return None;
    }
    d.sort_unstable();
    Some(d[d.len() / 2] as f64 / 1e6)
}

fn end_s(steps: &[StepRecord]) -> f64 {
    steps
        .iter()
        .map(|s| s.start_ns + s.duration_ns)
        .max()
        .unwrap_or(0) as f64
        / 1e9
}

/// A simulated twin: its summary and everything the simulator recorded.
pub(super) struct Twin {
    pub summary: RunSummary,
    pub output: sim::driver::RunOutput,
}

/// Simulates `run`'s workload with `profile`'s timing and `hints`' cost hints.
pub(super) fn simulate_twin(
    run: &RealRun,
    profile: &GpuProfile,
    hints: &GpuProfile,
) -> Result<Twin> {
    let m = &run.manifest;
    let dir = &run.dir;
    let policy = crate::runio::parse_policy(&m.policy)?;
    let mut config = SimConfig::new(policy, hints.clone());
    config.seed = m.seed;
    config.block_size_tokens = parse_option(m, "block_size_tokens", dir)?;
    config.sched.max_batch_tokens = parse_option(m, "max_batch_tokens", dir)?;
    config.sched.max_batch_sequences = parse_option(m, "max_batch_sequences", dir)?;
    config.predictor = sim::policies::PredictorMode::parse(option(m, "predictor", dir)?)
        .with_context(|| {
            format!(
                "{}: option `predictor`",
                dir.join("manifest.json").display()
            )
        })?;
    let mut settings = config.settings();
    settings.gpu_blocks = parse_option(m, "gpu_blocks", dir)?;
    settings.host_blocks = parse_option(m, "host_blocks", dir)?;
    settings.limits = RunLimits::default();
    let block_bytes: u64 = parse_option(m, "block_bytes", dir)?;
    settings.costs.block_bytes = block_bytes;
    settings.costs.kv_bytes_per_token = block_bytes / u64::from(config.block_size_tokens.max(1));
    let workload = sim::replay::build_workload(&m.workload, m.agents, m.seed)?;
    let output = sim::experiment::simulate_with(&workload, &config, &settings, profile)
        .with_context(|| format!("simulating the twin of {}", dir.display()))?;
    let inputs = analysis::SummaryInputs {
        policy: m.policy.clone(),
        workload: m.workload.name.clone(),
        agents: m.agents,
        seed: m.seed,
        turns_planned: output.turns_planned,
        block_bytes,
        gpu_blocks_total: settings.gpu_blocks,
        host_blocks_total: settings.host_blocks,
        slo_ns: run.summary.slo_ns,
    };
    let summary = analysis::summarize(&inputs, &output.turns, &output.steps, &output.swaps);
    Ok(Twin { summary, output })
}

/// Writes `twin` to DIR/<workload>/<policy>-x<agents>-seed<seed>.<profile>.sim, with the real
/// run's manifest marked as simulated under `profile_name`.
fn write_twin(dir: &Path, run: &RealRun, profile_name: &str, twin: &Twin) -> Result<()> {
    let stem = Path::new(profile_name).file_stem().map_or_else(
        || profile_name.to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    let m = &run.manifest;
    let base = format!("{}-x{}-seed{}.{stem}", m.policy, m.agents, m.seed);
    // Two real runs alike in all of these (repeats) get numbered twins, never one merged folder.
    let workload_dir = dir.join(&m.workload.name);
    let out = (1..)
        .map(|n| {
            let name = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            workload_dir.join(format!("{name}.sim"))
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| workload_dir.join(format!("{base}.sim")));
    std::fs::create_dir_all(out.parent().unwrap_or(dir))
        .with_context(|| format!("creating {}", out.display()))?;
    let mut manifest = run.manifest.clone();
    manifest.backend = "sim".into();
    manifest.profile_name = profile_name.to_string();
    manifest.reproduce = format!(
        "the simulated twin of {} under {profile_name} (djinn calibrate validate --twins-out)",
        run.dir.display()
    );
    crate::runio::write_run(&out, &manifest, &twin.output, &twin.summary)
}

pub fn run_validate(args: ValidateArgs) -> Result<()> {
    if let Some(csv) = &args.csv {
        check_new_file(csv, "--csv", args.overwrite)?;
    }
    let runs = real_runs(&args.runs)?;
    let names = if args.profiles.is_empty() {
        vec![
            calibration::DEFAULT_PROFILE.to_string(),
            calibration::FITTED_PROFILE.to_string(),
        ]
    } else {
        args.profiles.clone()
    };
    let profiles: Vec<(String, GpuProfile)> = names
        .iter()
        .map(|n| Ok((n.clone(), calibration::load_profile(n)?)))
        .collect::<Result<_>>()?;
    let hints = calibration::load_profile(&args.hints_profile)?;
    let twins = match &args.twins_out {
        Some(dir) => {
            check_new_folder(dir, args.overwrite)?;
            Some(Staging::new(dir, false)?)
        }
        None => None,
    };
    let mut rows = Vec::new();
    for run in &runs {
        for (name, profile) in &profiles {
            let twin = simulate_twin(run, profile, &hints)?;
            if let Some(staging) = &twins {
                write_twin(staging.path(), run, name, &twin)?;
            }
            let (sim, sim_steps) = (&twin.summary, &twin.output.steps);
            let real = &run.summary;
            rows.push(ValidationRow {
                run: run.dir.display().to_string(),
                workload: run.manifest.workload.name.clone(),
                policy: run.manifest.policy.clone(),
                agents: run.manifest.agents,
                profile: name.clone(),
                latency_ms_p50_real: real.turn_latency.p50_ns as f64 / 1e6,
                latency_ms_p50_sim: sim.turn_latency.p50_ns as f64 / 1e6,
                latency_ms_p99_real: real.turn_latency.p99_ns as f64 / 1e6,
                latency_ms_p99_sim: sim.turn_latency.p99_ns as f64 / 1e6,
                decode_step_ms_p50_real: decode_step_ms_p50(&run.steps),
                decode_step_ms_p50_sim: decode_step_ms_p50(sim_steps),
                end_s_real: end_s(&run.steps),
                end_s_sim: end_s(sim_steps),
                swaps_out_real: real.swaps_out,
                swaps_out_sim: sim.swaps_out,
                drops_real: real.drops,
                drops_sim: sim.drops,
            });
        }
    }
    if let (Some(staging), Some(dir)) = (twins, &args.twins_out) {
        staging.publish(args.overwrite)?;
        println!("wrote the simulated twins under {}", dir.display());
    }
    print!("{}", validation_table(&runs, &rows, &hints));
    if let Some(csv) = &args.csv {
        check_new_file(csv, "--csv", args.overwrite)?;
        traces::write_csv_atomic(csv, &rows)?;
        println!("wrote {}", csv.display());
    }
    Ok(())
}

/// Relative error of `sim` against `real`; none where it means nothing (no real value, or zero).
fn err(sim: f64, real: f64) -> Option<f64> {
    let e = (sim - real) / real;
    (real > 0.0 && e.is_finite()).then_some(e)
}

fn opt_err(sim: Option<f64>, real: Option<f64>) -> Option<f64> {
    err(sim?, real?)
}

/// A percentage cell, `-` when there is no number.
fn pct_cell(e: Option<f64>, width: usize) -> String {
    e.map_or_else(
        || format!("{:>w$}", "-", w = width + 1),
        |e| format!("{:>+width$.0}%", 100.0 * e, width = width),
    )
}

fn validation_table(runs: &[RealRun], rows: &[ValidationRow], hints: &GpuProfile) -> String {
    let mut s = format!(
        "VALIDATION: {} real run(s) re-simulated (same workload, seed, policy, pools, batch limits; policies plan with {}'s hints)\n\n",
        runs.len(),
        hints.name
    );
    s += &format!(
        "{:<24} {:<22} {:>17} {:>17} {:>17} {:>13} {:>21}\n",
        "run",
        "profile",
        "p50 ms real/sim",
        "p99 ms real/sim",
        "decode step ms",
        "end s",
        "swaps out, drops"
    );
    for r in rows {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        s += &format!(
            "{:<24} {:<22} {:>6.0}/{:<5.0}{} {:>6.0}/{:<5.0}{} {:>6}/{:<5}{} {:>6.1}/{:<6.1} {:>21}\n",
            format!("{}/{} x{}", r.workload, r.policy, r.agents),
            r.profile,
            r.latency_ms_p50_real,
            r.latency_ms_p50_sim,
            pct_cell(err(r.latency_ms_p50_sim, r.latency_ms_p50_real), 5),
            r.latency_ms_p99_real,
            r.latency_ms_p99_sim,
            pct_cell(err(r.latency_ms_p99_sim, r.latency_ms_p99_real), 5),
            ms(r.decode_step_ms_p50_real),
            ms(r.decode_step_ms_p50_sim),
            pct_cell(opt_err(r.decode_step_ms_p50_sim, r.decode_step_ms_p50_real), 5),
            r.end_s_real,
            r.end_s_sim,
            format!(
                "{}, {} / {}, {}",
                r.swaps_out_real, r.drops_real, r.swaps_out_sim, r.drops_sim
            ),
        );
    }
    // Mean absolute error per profile over the runs that have the figure.
    let mut by_profile: BTreeMap<&str, Vec<&ValidationRow>> = BTreeMap::new();
    for r in rows {
        by_profile.entry(r.profile.as_str()).or_default().push(r);
    }
    s += "\nmean |sim - real| / real over the runs\n";
    for (profile, rs) in by_profile {
        let mean = |f: &dyn Fn(&ValidationRow) -> Option<f64>| {
            let errs: Vec<f64> = rs.iter().filter_map(|r| f(r)).map(f64::abs).collect();
            if errs.is_empty() {
                format!("{:>6}", "-")
            } else {
                format!(
                    "{:>5.1}%",
                    errs.iter().sum::<f64>() / errs.len() as f64 * 100.0
                )
            }
        };
        s += &format!(
            "  {:<24} p50 {}  p99 {}  decode step {}  end {}\n",
            profile,
            mean(&|r| err(r.latency_ms_p50_sim, r.latency_ms_p50_real)),
            mean(&|r| err(r.latency_ms_p99_sim, r.latency_ms_p99_real)),
            mean(&|r| opt_err(r.decode_step_ms_p50_sim, r.decode_step_ms_p50_real)),
            mean(&|r| err(r.end_s_sim, r.end_s_real)),
        );
    }
    s
}
