//! `djinn calibrate`: real traces feed the simulator.
//!
//! `fit` fits a GPU profile's cost coefficients (calibration::fit) to the steps.csv and swaps.csv
//! of real engine runs (`djinn engine run`); `validate` replays each real run's workload, seed,
//! policy, pools and batch limits on the simulated GPU under one or more profiles and prints real
//! against simulated turn latency and step time, so a profile's error is a number, not a belief.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use calibration::fit::{self, FitReport, KindError, RunTraces, StepKind};
use clap::{Args, Subcommand};
use serde::Serialize;
use sim::driver::RunLimits;
use sim::experiment::SimConfig;
use traces::{GpuProfile, RunManifest, RunSummary, StepRecord, SwapRecord};

use crate::runio::outdir::check_new_file;

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(subcommand)]
    pub command: CalibrateCommand,
}

#[derive(Subcommand, Debug)]
pub enum CalibrateCommand {
    /// Fit a profile's step and copy coefficients to real runs and write it as JSON.
    Fit(FitArgs),
    /// Re-simulate real runs under profiles and print real vs simulated figures.
    Validate(ValidateArgs),
}

#[derive(Args, Debug)]
pub struct FitArgs {
    /// Real run directories (manifest.json, steps.csv, swaps.csv, as `djinn engine run` writes
    /// them), or folders holding such directories (e.g. <out>/seed-cliff: every real run under it;
    /// simulated twins `*.sim` are skipped).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// Also fit to an engine benchmark's rows (the JSON `djinn engine bench --json` writes, e.g.
    /// results/h100/engine-bench-llama2-7b.json): clean decode steps at batch 1-64 and contexts
    /// 512-2048 and prefills of 512-4096 tokens, the shapes a real run visits too rarely.
    #[arg(long = "bench", value_name = "FILE")]
    pub bench: Vec<PathBuf>,
    /// Also fit what copies cost a step running beside them, from a copy-interference measurement
    /// (the JSON `djinn engine swap-bench --interference-rounds N --json` writes, e.g.
    /// results/h100/swap-interference-swap-in-caps.json): the engine's decode step with swap-in,
    /// swap-out or both at measured rates, and its slowdown. Sets each channel's
    /// `step_memory_bytes_per_copied_byte`; without it they stay the base profile's.
    #[arg(long = "interference", value_name = "FILE")]
    pub interference: Vec<PathBuf>,
    /// Profile whose model facts (sizes, memory) and starting coefficients the fit keeps.
    #[arg(long, default_value = calibration::DEFAULT_PROFILE, value_name = "NAME|PATH")]
    pub base: String,
    /// Name written into the fitted profile (default: the base's name + "-fitted").
    #[arg(long)]
    pub name: Option<String>,
    /// Where to write the fitted profile (JSON); without it the fit is only printed. An existing
    /// file is never replaced silently: the command refuses (before fitting) unless --overwrite.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
}

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
    /// Replace an existing --csv file.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    match args.command {
        CalibrateCommand::Fit(a) => run_fit(a),
        CalibrateCommand::Validate(a) => run_validate(a),
    }
}

/// A real run directory, read and checked.
struct RealRun {
    dir: PathBuf,
    manifest: RunManifest,
    steps: Vec<StepRecord>,
    swaps: Vec<SwapRecord>,
    summary: RunSummary,
}

/// Expands folders of run directories and reads every real run.
fn real_runs(paths: &[PathBuf]) -> Result<Vec<RealRun>> {
    let mut dirs = Vec::new();
    for path in paths {
        if !path.is_dir() {
            bail!(
                "{}: not a directory (expected a run directory or a folder of them)",
                path.display()
            );
        }
        if path.join("manifest.json").is_file() {
            dirs.push(path.clone());
            continue;
        }
        let mut children: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("manifest.json").is_file())
            .filter(|p| !p.extension().is_some_and(|e| e == "sim"))
            .collect();
        children.sort();
        if children.is_empty() {
            bail!(
                "{}: no manifest.json here or in any sub-directory (not a run directory)",
                path.display()
            );
        }
        dirs.extend(children);
    }
    dirs.into_iter().map(|dir| read_real_run(&dir)).collect()
}

fn read_real_run(dir: &Path) -> Result<RealRun> {
    let manifest: RunManifest = traces::read_json(&dir.join("manifest.json"))?;
    if manifest.backend == "sim" {
        bail!(
            "{}: a simulated run (manifest backend \"sim\"); calibration needs real runs (`djinn engine run`)",
            dir.join("manifest.json").display()
        );
    }
    let steps_path = dir.join("steps.csv");
    let steps: Vec<StepRecord> = traces::read_csv(&steps_path)?;
    if steps.is_empty() {
        bail!(
            "{}: no steps (a header and no rows): a run without steps can be neither fitted nor validated",
            steps_path.display()
        );
    }
    let swaps: Vec<SwapRecord> = crate::runio::read_swaps(dir)?;
    let summary: RunSummary = traces::read_json(&dir.join("summary.json"))?;
    Ok(RealRun {
        dir: dir.to_path_buf(),
        manifest,
        steps,
        swaps,
        summary,
    })
}

fn run_fit(args: FitArgs) -> Result<()> {
    if let Some(out) = &args.out {
        check_new_file(out, "--out", args.overwrite)?;
    }
    let base = calibration::load_profile(&args.base)?;
    let runs = real_runs(&args.runs)?;
    let devices: Vec<&str> = {
        let mut d: Vec<&str> = runs.iter().map(|r| r.manifest.device.as_str()).collect();
        d.sort();
        d.dedup();
        d
    };
    if devices.len() > 1 {
        bail!(
            "the runs come from different devices ({}); fit one device at a time",
            devices.join(", ")
        );
    }
    let mut traces: Vec<RunTraces> = runs
        .iter()
        .map(|r| RunTraces {
            name: r.dir.display().to_string(),
            steps: r.steps.clone(),
            swaps: r.swaps.clone(),
        })
        .collect();
    for path in &args.bench {
        traces.push(RunTraces {
            name: path.display().to_string(),
            steps: bench_steps(path)?,
            swaps: Vec::new(),
        });
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-fitted", base.name.trim_end_matches("-analytic")));
    let source = format!(
        "Fitted by `djinn calibrate fit` (base profile {}) to {} engine benchmark file(s) [{}] and the steps.csv and swaps.csv of {} real run(s): {}",
        base.name,
        args.bench.len(),
        args.bench
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        runs.len(),
        runs.iter()
            .map(|r| format!(
                "{} [{}; {} steps]",
                r.dir.display(),
                r.manifest.reproduce,
                r.steps.len()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut report = fit::fit_profile(&base, &traces, &name, &source, devices[0])
        .context("fitting the step coefficients")?;
    print!("{}", fit_table(&base, &report, &runs));
    if !args.interference.is_empty() {
        let mut points = Vec::new();
        for path in &args.interference {
            points.extend(interference_points(path)?);
        }
        let profile = &mut report.profile;
        let fitted = fit::fit_copy_interference(
            &points,
            profile.cost.memory_bandwidth_bytes_per_s,
            profile.host_to_device.step_memory_bytes_per_copied_byte,
            profile.device_to_host.step_memory_bytes_per_copied_byte,
        )
        .context("the interference files have no point with copy traffic")?;
        profile.host_to_device.step_memory_bytes_per_copied_byte = fitted.h2d_cost;
        profile.device_to_host.step_memory_bytes_per_copied_byte = fitted.d2h_cost;
        profile.provenance.source.push_str(&format!(
            "; copy costs to steps fitted to {} interference point(s) of {}",
            points.len(),
            args.interference
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        print!("{}", interference_table(&fitted, profile));
    }
    if let Some(out) = &args.out {
        report
            .profile
            .validate(out)
            .context("the fitted profile failed its own validation")?;
        check_new_file(out, "--out", args.overwrite)?;
        traces::write_json_atomic(out, &report.profile)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// The `rows` array of a benchmark JSON file that `writer` (a djinn command) writes.
fn json_rows(path: &Path, writer: &str) -> Result<Vec<serde_json::Value>> {
    let mut json: serde_json::Value = traces::read_json(path)?;
    match json.get_mut("rows").map(serde_json::Value::take) {
        Some(serde_json::Value::Array(rows)) => Ok(rows),
        _ => bail!(
            "{}: no `rows` array (not a `{writer}` JSON file?)",
            path.display()
        ),
    }
}

/// The engine benchmark's own rows (system `djinn-cuda`) as step records: a decode row of batch b
/// at context n is b sequences attending to n tokens each; a prefill row of n tokens starts from
/// an empty cache.
fn bench_steps(path: &Path) -> Result<Vec<StepRecord>> {
    let rows = json_rows(path, "djinn engine bench")?;
    let mut steps = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if row.get("system").and_then(|s| s.as_str()) != Some("djinn-cuda") {
            continue;
        }
        let field = |name: &str| {
            row.get(name)
                .and_then(|v| v.as_f64())
                .filter(|v| v.is_finite() && *v > 0.0)
                .with_context(|| {
                    format!(
                        "{}: rows[{i}].{name} missing or not a positive number",
                        path.display()
                    )
                })
        };
        let (batch, tokens, ms) = (
            field("batch")? as u64,
            field("tokens")? as u64,
            field("ms_p50")?,
        );
        let duration_ns = (ms * 1e6).round() as u64;
        match row.get("kind").and_then(|k| k.as_str()) {
            Some("decode_step") => steps.push(StepRecord {
                decode_batch: batch as u32,
                decode_context_tokens: batch * tokens,
                duration_ns,
                ..StepRecord::default()
            }),
            Some("prefill") => steps.push(StepRecord {
                prefill_tokens: (batch * tokens) as u32,
                prefill_sequences: batch as u32,
                prefill_attention_pairs: batch * tokens * (tokens + 1) / 2,
                duration_ns,
                ..StepRecord::default()
            }),
            other => bail!(
                "{}: rows[{i}].kind = {other:?}, expected \"decode_step\" or \"prefill\"",
                path.display()
            ),
        }
    }
    if steps.is_empty() {
        bail!("{}: no djinn-cuda rows", path.display());
    }
    Ok(steps)
}

/// The swap engine's operating points of a copy-interference file: the `interference summary`
/// rows whose victim is the engine's decode step and whose aggressor is the swap engine. Each row's
/// `ratio` is the step's busy / quiet time (median over rounds); its note names each direction's
/// rate as `swap-out: <GB> GB moved at <rate> GB/s while running` (and `swap-in: ...`).
fn interference_points(path: &Path) -> Result<Vec<fit::InterferencePoint>> {
    let rows = json_rows(path, "djinn engine swap-bench")?;
    let mut points = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let text = |name: &str| row.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let row_name = text("name");
        if text("section") != "interference summary"
            || !row_name.starts_with("engine decode")
            || !row_name.contains("swap engine DMA")
        {
            continue;
        }
        let ratio = row
            .get("ratio")
            .and_then(|v| v.as_f64())
            .filter(|v| v.is_finite() && *v > 0.0)
            .with_context(|| {
                format!(
                    "{}: rows[{i}].ratio missing or not a positive number",
                    path.display()
                )
            })?;
        let note = text("note");
        let rate = |direction: &str| -> Result<f64> {
            let key = format!("swap-{direction}: ");
            let Some(at) = note.find(&key) else {
                return Ok(0.0);
            };
            let rest = &note[at + key.len()..];
            let parsed = rest
                .split_once(" GB moved at ")
                .and_then(|(_, r)| r.split_once(" GB/s"))
                .and_then(|(r, _)| r.trim().parse::<f64>().ok())
                .filter(|r| r.is_finite() && *r >= 0.0);
            parsed.map(|gbps| gbps * 1e9).with_context(|| {
                format!(
                    "{}: rows[{i}].note: expected `swap-{direction}: <GB> GB moved at <rate> GB/s` after `{key}`",
                    path.display()
                )
            })
        };
        // "swap engine DMA: both directions, 2 x 1 GiB queued ... (out full speed, in capped 34 GB/s)"
        // -> "<file>: both directions (out full speed, in capped 34 GB/s)".
        let aggressor = row_name
            .split('|')
            .nth(1)
            .unwrap_or(row_name)
            .trim()
            .trim_start_matches("swap engine DMA: ");
        let what = aggressor.split(',').next().unwrap_or(aggressor);
        let rates = aggressor.find(" (").map_or("", |at| &aggressor[at..]);
        let file = path
            .file_stem()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned());
        let label = format!("{file}: {what}{rates}");
        points.push(fit::InterferencePoint {
            label,
            h2d_bytes_per_s: rate("in")?,
            d2h_bytes_per_s: rate("out")?,
            slowdown: ratio - 1.0,
        });
    }
    if points.is_empty() {
        bail!(
            "{}: no `interference summary` rows of the engine decode step beside the swap engine (written by `djinn engine swap-bench --interference-rounds N`)",
            path.display()
        );
    }
    Ok(points)
}

fn interference_table(fitted: &fit::InterferenceFit, profile: &GpuProfile) -> String {
    let mut out = format!(
        "\ncopy costs to a step beside them (memory bytes per copied byte, at {:.0} GB/s): host->device {:.3}, device->host {:.3}\n",
        profile.cost.memory_bandwidth_bytes_per_s / 1e9,
        fitted.h2d_cost,
        fitted.d2h_cost
    );
    out.push_str(&format!(
        "{:<90} {:>8} {:>8} {:>9} {:>9}\n",
        "operating point (engine decode step beside the swap engine)",
        "in GB/s",
        "out GB/s",
        "measured",
        "model"
    ));
    for (p, predicted) in &fitted.predicted {
        out.push_str(&format!(
            "{:<90} {:>8.1} {:>8.1} {:>9} {:>9}\n",
            p.label.chars().take(90).collect::<String>(),
            p.h2d_bytes_per_s / 1e9,
            p.d2h_bytes_per_s / 1e9,
            format!("+{:.2}%", 100.0 * p.slowdown),
            format!("+{:.2}%", 100.0 * predicted)
        ));
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn kind_label(kind: &Option<StepKind>) -> &'static str {
    kind.map_or("all", StepKind::name)
}

fn fit_table(base: &GpuProfile, report: &FitReport, runs: &[RealRun]) -> String {
    let mut s = String::new();
    let b = &base.cost;
    let f = &report.profile.cost;
    s += &format!(
        "FIT: {} steps from {} real run(s) on {}\n\n",
        report.samples,
        runs.len(),
        report.profile.provenance.device
    );
    s += &format!("{:<34} {:>16} {:>16}\n", "coefficient", "base", "fitted");
    let rows: [(&str, f64, f64, f64, &str); 6] = [
        (
            "step overhead",
            b.step_overhead_ns,
            f.step_overhead_ns,
            1e-3,
            "us",
        ),
        (
            "per sequence",
            b.per_sequence_ns,
            f.per_sequence_ns,
            1e-3,
            "us",
        ),
        (
            "memory bandwidth",
            b.memory_bandwidth_bytes_per_s,
            f.memory_bandwidth_bytes_per_s,
            1e-12,
            "TB/s",
        ),
        (
            "matmul",
            b.matmul_flops_per_s,
            f.matmul_flops_per_s,
            1e-12,
            "TFLOP/s",
        ),
        (
            "attention",
            b.attention_flops_per_s,
            f.attention_flops_per_s,
            1e-12,
            "TFLOP/s",
        ),
        (
            "serial fraction",
            b.serial_fraction,
            f.serial_fraction,
            1.0,
            "",
        ),
    ];
    for (what, base_v, fit_v, scale, unit) in rows {
        s += &format!(
            "{:<34} {:>11.3} {:<4} {:>11.3} {:<4}\n",
            what,
            base_v * scale,
            unit,
            fit_v * scale,
            unit
        );
    }
    let channel =
        |label: &str, base_c: &traces::CopyChannel, fit_c: &Option<fit::ChannelFit>| match fit_c {
            Some(c) => format!(
                "{:<34} {:>11.2} GB/s {:>11.2} GB/s  ({} swaps, {:.1} GiB)\n",
                label,
                base_c.bandwidth_bytes_per_s / 1e9,
                c.bandwidth_bytes_per_s / 1e9,
                c.swaps,
                c.bytes as f64 / (1u64 << 30) as f64
            ),
            None => format!(
                "{:<34} {:>11.2} GB/s    (no swaps: kept)\n",
                label,
                base_c.bandwidth_bytes_per_s / 1e9
            ),
        };
    s += &channel(
        "swap in (host to device)",
        &base.host_to_device,
        &report.host_to_device,
    );
    s += &channel(
        "swap out (device to host)",
        &base.device_to_host,
        &report.device_to_host,
    );
    s += "\nstep-time error (MAPE = mean |sim - real| / real; ratio = median sim / real; outliers = real\n\
          more than 1.5x off the fit, e.g. first prefills of a shape bucket that time cuBLASLt algorithms)\n";
    s += &format!(
        "{:<8} {:>6} {:>12} {:>12} {:>12} {:>12} {:>10}\n",
        "steps", "n", "base MAPE", "base ratio", "fit MAPE", "fit ratio", "outliers"
    );
    for (kind, fitted) in &report.fitted_errors {
        let base_e = report.base_errors.get(kind).cloned().unwrap_or_default();
        s += &format!(
            "{:<8} {:>6} {:>12} {:>12.3} {:>12} {:>12.3} {:>10}\n",
            kind_label(kind),
            fitted.steps,
            pct(base_e.mape),
            base_e.ratio_p50,
            pct(fitted.mape),
            fitted.ratio_p50,
            fitted.outliers
        );
    }
    if !report.leave_one_run_out.is_empty() {
        s += "\nleave-one-run-out (fit on the other runs, error on this one)\n";
        for (run, errs) in &report.leave_one_run_out {
            let cells: Vec<String> = errs
                .iter()
                .map(|(k, e): (&Option<StepKind>, &KindError)| {
                    format!("{} {} (x{:.3})", kind_label(k), pct(e.mape), e.ratio_p50)
                })
                .collect();
            s += &format!("  {run}: {}\n", cells.join(", "));
        }
    }
    s += "\n";
    s
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

/// Simulates `run`'s workload with `profile`'s timing and `hints`' cost hints.
fn simulate_twin(
    run: &RealRun,
    profile: &GpuProfile,
    hints: &GpuProfile,
) -> Result<(RunSummary, Vec<StepRecord>)> {
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
    Ok((summary, output.steps))
}

fn run_validate(args: ValidateArgs) -> Result<()> {
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
    let mut rows = Vec::new();
    for run in &runs {
        for (name, profile) in &profiles {
            let (sim, sim_steps) = simulate_twin(run, profile, &hints)?;
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
                decode_step_ms_p50_sim: decode_step_ms_p50(&sim_steps),
                end_s_real: end_s(&run.steps),
                end_s_sim: end_s(&sim_steps),
                swaps_out_real: real.swaps_out,
                swaps_out_sim: sim.swaps_out,
                drops_real: real.drops,
                drops_sim: sim.drops,
            });
        }
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
