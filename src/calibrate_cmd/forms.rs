//! The two step forms side by side: in-sample, on held-out shapes of the fit's own inputs
//! (leave-shape-out folds), on steps beside swaps, and on real runs the fit never saw.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use calibration::fit::{step_samples, StepKind, StepSample};
use calibration::table::{self, Form, LogErrors};
use traces::{GpuProfile, StepRecord, StepShape};

use super::inputs::real_runs;

pub struct FormComparison {
    /// The printed comparison.
    pub table: String,
    /// The fitted roofline with its correction tables (form roofline-table-v1).
    pub table_profile: GpuProfile,
}

type Errors = BTreeMap<Option<StepKind>, LogErrors>;

/// |log ratio| of steps that started beside copies, priced as the simulator prices them: the
/// bytes each step started copying keep their channel busy for bytes / bandwidth.
fn beside_copy_errors(profile: &GpuProfile, steps: &[StepRecord]) -> LogErrors {
    let mut v = Vec::new();
    for s in steps.iter().filter(|s| s.duration_ns > 0) {
        let shape = StepShape::from_record(s);
        if StepKind::of(&shape).is_none() {
            continue;
        }
        let busy =
            |bytes: u64, ch: &traces::CopyChannel| bytes as f64 / ch.bandwidth_bytes_per_s * 1e9;
        let predicted = profile.step_ns_beside_copies(
            &shape,
            busy(s.swap_in_bytes_started, &profile.host_to_device),
            busy(s.swap_out_bytes_started, &profile.device_to_host),
        );
        v.push((predicted, s.duration_ns as f64));
    }
    table::LogErrors::of_pairs(&v)
}

fn cell(e: Option<&LogErrors>) -> String {
    match e {
        Some(e) if e.steps > 0 => format!(
            "{:>6.1}% {:>6.1}% {:>6.1}% {:>5.3}",
            100.0 * e.median,
            100.0 * e.p90,
            100.0 * e.p99,
            e.total_ratio
        ),
        _ => format!("{:>28}", "-"),
    }
}

fn section(title: &str, columns: &[(&str, &Errors)], beside: &[(&str, LogErrors)]) -> String {
    let mut s = format!("\n{title}\n{:<14} {:>7}", "steps", "n");
    for (name, _) in columns {
        s += &format!(" {:>28}", format!("{name} p50/p90/p99 sum"));
    }
    s.push('\n');
    let kinds = [
        Some(StepKind::Decode),
        Some(StepKind::Prefill),
        Some(StepKind::Mixed),
        None,
    ];
    for kind in kinds {
        let n = columns
            .first()
            .and_then(|(_, e)| e.get(&kind))
            .map_or(0, |e| e.steps);
        if n == 0 {
            continue;
        }
        s += &format!("{:<14} {:>7}", kind.map_or("all", StepKind::name), n);
        for (_, errs) in columns {
            s += &format!(" {}", cell(errs.get(&kind)));
        }
        s.push('\n');
    }
    if beside.iter().any(|(_, e)| e.steps > 0) {
        s += &format!("{:<14} {:>7}", "beside swaps", beside[0].1.steps);
        for (_, e) in beside {
            s += &format!(" {}", cell(Some(e)));
        }
        s.push('\n');
    }
    s
}

/// Compares the base, the fitted roofline (`fitted`, form roofline-v1 with its copy costs) and
/// the fitted table form on the fit's samples, on `folds` leave-shape-out folds, on the steps of
/// a grid that ran beside copies, and on the real runs in `check`.
pub fn compare_forms(
    base: &GpuProfile,
    fitted: &GpuProfile,
    samples: &[StepSample],
    beside_copies: &[StepRecord],
    check: &[PathBuf],
    folds: usize,
) -> Result<FormComparison> {
    let mut with_table = fitted.clone();
    if let Some(c) = table::fit_corrections(fitted, samples) {
        with_table.cost.form = Form::Table.name().into();
        with_table.cost.corrections = Some(c);
    }
    let names = ["base", Form::Roofline.name(), Form::Table.name()];
    let profiles = [base, fitted, &with_table];
    let mut out = String::from(
        "\nstep-time |ln(predicted / measured)| per kind: median, P90, P99 (0.01 = ~1%); sum = summed\n\
         predicted / summed measured time (below 1: the simulator is optimistic on these steps)\n",
    );
    let in_sample: Vec<Errors> = profiles
        .iter()
        .map(|p| table::log_errors(p, samples))
        .collect();
    let beside: Vec<(&str, LogErrors)> = names
        .iter()
        .zip(profiles)
        .map(|(n, p)| (*n, beside_copy_errors(p, beside_copies)))
        .collect();
    let cols: Vec<(&str, &Errors)> = names.iter().copied().zip(in_sample.iter()).collect();
    out += &section("in sample (the fit's own steps)", &cols, &beside);
    if folds > 0 {
        let held: Vec<Errors> = [Form::Roofline, Form::Table]
            .iter()
            .map(|f| table::held_out_errors(base, samples, *f, folds))
            .collect::<Result<_, _>>()
            .context("cross-validating the fit")?;
        let cols: Vec<(&str, &Errors)> = names[1..].iter().copied().zip(held.iter()).collect();
        out += &section(
            &format!("held out: {folds} leave-shape-out folds (every shape predicted by a fit that never saw it)"),
            &cols,
            &[],
        );
    }
    if !check.is_empty() {
        let runs = real_runs(check)?;
        let steps: Vec<StepRecord> = runs.iter().flat_map(|r| r.steps.clone()).collect();
        let check_samples: Vec<StepSample> = runs
            .iter()
            .flat_map(|r| step_samples(&r.dir.display().to_string(), &r.steps))
            .collect();
        let errs: Vec<Errors> = profiles
            .iter()
            .map(|p| table::log_errors(p, &check_samples))
            .collect();
        let beside: Vec<(&str, LogErrors)> = names
            .iter()
            .zip(profiles)
            .map(|(n, p)| {
                let with_copies: Vec<StepRecord> = steps
                    .iter()
                    .filter(|s| s.swap_in_bytes_started > 0 || s.swap_out_bytes_started > 0)
                    .cloned()
                    .collect();
                (*n, beside_copy_errors(p, &with_copies))
            })
            .collect();
        let cols: Vec<(&str, &Errors)> = names.iter().copied().zip(errs.iter()).collect();
        out += &section(
            &format!(
                "real runs the fit never saw ({} run(s), every step; beside swaps = steps that started copies)",
                runs.len()
            ),
            &cols,
            &beside,
        );
    }
    Ok(FormComparison {
        table: out,
        table_profile: with_table,
    })
}
