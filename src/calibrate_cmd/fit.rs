//! `djinn calibrate fit`: a profile's step and copy coefficients fitted to real runs, engine
//! benchmarks and copy-interference measurements.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use calibration::fit::{self, FitReport, KindError, RunTraces, StepKind};
use clap::Args;
use traces::GpuProfile;

use super::inputs::{bench_steps, interference_points, read_grid, real_runs, GridRun, RealRun};
use crate::runio::outdir::check_new_file;

#[derive(Args, Debug)]
pub struct FitArgs {
    /// Real run directories (manifest.json, steps.csv, swaps.csv, as `djinn engine run` writes
    /// them), or folders holding such directories (e.g. <out>/seed-cliff: every real run under it;
    /// simulated twins `*.sim` are skipped). Optional with --grid or --bench: a profile fitted
    /// from a profiling grid alone needs no workload run.
    #[arg(value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// Fit to a profiling grid (the folder `djinn calibrate profile` writes: grid.json,
    /// steps.csv, swaps.csv). Its steps beside swaps are not fitted as quiet steps: they are
    /// priced with the copy costs and reported as their own kind.
    #[arg(long = "grid", value_name = "DIR")]
    pub grid: Vec<PathBuf>,
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
    /// Real runs the fit does not see: their steps are predicted by the base, the fitted
    /// roofline and the fitted table form, and the |log ratio| distribution printed per kind.
    #[arg(long = "check", value_name = "RUN_DIR")]
    pub check: Vec<PathBuf>,
    /// Step form to write: `table` (roofline-table-v1: the roofline and its correction tables,
    /// the default: it wins on held-out shapes and real runs, docs/calibration.md) or `roofline`
    /// (roofline-v1 coefficients only).
    #[arg(long, default_value = "table", value_parser = ["table", "roofline"])]
    pub form: String,
    /// Folds of the leave-shape-out cross-validation printed for both forms (0: none).
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Profile whose model facts (sizes, memory) and starting coefficients the fit keeps (a
    /// shipped name or a JSON path); default h100-llama2-7b, or the profile --model/--card derive.
    #[arg(long, value_name = "NAME|PATH")]
    pub base: Option<String>,
    /// Model of the base profile (derived with --card, as `djinn simulate --model`).
    #[arg(long, value_name = "NAME|PATH")]
    pub model: Option<String>,
    /// Card of the base profile (derived with --model, as `djinn simulate --card`).
    #[arg(long, value_name = "NAME|PATH")]
    pub card: Option<String>,
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

pub fn run_fit(args: FitArgs) -> Result<()> {
    if let Some(out) = &args.out {
        check_new_file(out, "--out", args.overwrite)?;
    }
    if args.runs.is_empty() && args.grid.is_empty() && args.bench.is_empty() {
        bail!("nothing to fit: give real run directories, --grid DIR or --bench FILE");
    }
    let base = super::base_profile(args.base.as_deref(), &args.model, &args.card)?;
    let runs = real_runs(&args.runs)?;
    let grids = args
        .grid
        .iter()
        .map(|d| read_grid(d))
        .collect::<Result<Vec<_>>>()?;
    let mut devices: Vec<&str> = runs
        .iter()
        .map(|r| r.manifest.device.as_str())
        .chain(grids.iter().map(|g| g.manifest.device.as_str()))
        .collect();
    devices.sort();
    devices.dedup();
    if devices.len() > 1 {
        bail!(
            "the runs come from different devices ({}); fit one device at a time",
            devices.join(", ")
        );
    }
    let device = devices.first().copied().unwrap_or_default().to_string();
    let mut traces: Vec<RunTraces> = runs
        .iter()
        .map(|r| RunTraces {
            name: r.dir.display().to_string(),
            steps: r.steps.clone(),
            swaps: r.swaps.clone(),
        })
        .collect();
    let mut beside_copies = Vec::new();
    for g in &grids {
        let (quiet, beside): (Vec<_>, Vec<_>) = g
            .steps
            .iter()
            .cloned()
            .partition(|s| s.swap_in_bytes_started == 0 && s.swap_out_bytes_started == 0);
        beside_copies.extend(beside);
        traces.push(RunTraces {
            name: g.dir.display().to_string(),
            steps: quiet,
            swaps: g.swaps.clone(),
        });
    }
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
    let source = fit_source(&base, &args, &runs, &grids);
    let mut report = fit::fit_profile(&base, &traces, &name, &source, &device)
        .context("fitting the step coefficients")?;
    print!("{}", fit_table(&base, &report, runs.len() + grids.len()));
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
    let samples: Vec<fit::StepSample> = traces
        .iter()
        .flat_map(|t| fit::step_samples(&t.name, &t.steps))
        .collect();
    let forms = super::forms::compare_forms(
        &base,
        &report.profile,
        &samples,
        &beside_copies,
        &args.check,
        args.folds,
    )?;
    print!("{}", forms.table);
    if args.form == "table" {
        report.profile.cost.form = forms.table_profile.cost.form.clone();
        report.profile.cost.corrections = forms.table_profile.cost.corrections.clone();
    }
    if let Some(g) = grids.first() {
        report.profile.provenance.driver = g.manifest.driver.clone();
        report.profile.provenance.commit = g.manifest.engine_commit.clone();
        report.profile.provenance.fitted_from = Some(g.manifest.summary());
    }
    if let Some(out) = &args.out {
        report
            .profile
            .validate(out)
            .context("the fitted profile failed its own validation")?;
        check_new_file(out, "--out", args.overwrite)?;
        traces::write_json_atomic(out, &report.profile)?;
        println!(
            "wrote {} (form {})",
            out.display(),
            report.profile.cost.form
        );
    }
    Ok(())
}

fn fit_source(base: &GpuProfile, args: &FitArgs, runs: &[RealRun], grids: &[GridRun]) -> String {
    let list = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut source = format!(
        "Fitted by `djinn calibrate fit` (base profile {}) to {} engine benchmark file(s) [{}] and the steps.csv and swaps.csv of {} real run(s): {}",
        base.name,
        args.bench.len(),
        list(&args.bench),
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
    for g in grids {
        source.push_str(&format!(
            "; profiling grid {} [{}; {} steps]",
            g.dir.display(),
            g.manifest.reproduce,
            g.steps.len()
        ));
    }
    source
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

fn fit_table(base: &GpuProfile, report: &FitReport, inputs: usize) -> String {
    let mut s = String::new();
    let b = &base.cost;
    let f = &report.profile.cost;
    s += &format!(
        "FIT: {} steps from {} run(s) or grid(s) on {}\n\n",
        report.samples, inputs, report.profile.provenance.device
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
