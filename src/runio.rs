//! Resolving inputs (workloads, profiles, policies) and where results are written.

pub mod inputs;
pub mod outdir;
pub mod profile_args;

use std::path::Path;

use anyhow::{bail, Context, Result};
use sim::experiment::{shipped_workload, SHIPPED_WORKLOADS};
use sim::PolicyKind;
use traces::WorkloadSpec;

use inputs::Input;

/// A workload by shipped name or by path to a TOML spec.
pub fn load_workload(name_or_path: &str) -> Result<WorkloadSpec> {
    load_workload_with_inputs(name_or_path).map(|(spec, _)| spec)
}

/// A workload by shipped name or by path to a TOML spec, with the files it was made from (the
/// spec and any trace it replays, hashed). Trace paths in a spec file are relative to its folder.
pub fn load_workload_with_inputs(name_or_path: &str) -> Result<(WorkloadSpec, Vec<Input>)> {
    let (spec, input) = if let Some(text) = shipped_workload(name_or_path) {
        let file = format!("sim/workloads/{name_or_path}.toml");
        (
            WorkloadSpec::from_toml_str(Path::new(&file), text)?,
            Input::shipped("workload", name_or_path, text),
        )
    } else {
        let path = Path::new(name_or_path);
        if !path.exists() {
            let known: Vec<&str> = SHIPPED_WORKLOADS.iter().map(|(n, _)| *n).collect();
            bail!("unknown workload `{name_or_path}`: no such file, and not a shipped workload (known: {})", known.join(", "));
        }
        let mut spec = WorkloadSpec::read(path)?;
        sim::replay::resolve_trace_paths(&mut spec, path);
        (spec, Input::file("workload", name_or_path)?)
    };
    let mut all = vec![input];
    all.extend(inputs::trace_inputs(name_or_path, &spec)?);
    Ok((spec, all))
}

/// Loads several workloads; two with the same `name` would write the same results folder, so
/// that is an error naming both.
pub fn load_workloads(names: &[String]) -> Result<Vec<(WorkloadSpec, Vec<Input>)>> {
    let mut out: Vec<(WorkloadSpec, Vec<Input>)> = Vec::new();
    for name in names {
        let (spec, inputs) = load_workload_with_inputs(name)?;
        if let Some(j) = out.iter().position(|(s, _)| s.name == spec.name) {
            bail!(
                "workloads `{}` and `{name}` are both named `{}`: their results would share one folder (give one another `name`)",
                names[j],
                spec.name
            );
        }
        out.push((spec, inputs));
    }
    Ok(out)
}

pub fn parse_policy(name: &str) -> Result<PolicyKind> {
    PolicyKind::parse_explained(name).map_err(|e| anyhow::anyhow!(e))
}

/// The code version written into manifests: the crate version and the git commit it was built from.
pub fn code_version() -> String {
    format!(
        "{}+{}",
        env!("CARGO_PKG_VERSION"),
        option_env!("DJINN_GIT_COMMIT").unwrap_or("unknown")
    )
}

/// The rayon pool a parallel command runs on: `threads`, or one per available core.
pub fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("thread pool")
}

/// The policies named by a repeatable `--policy` flag: `all` means every policy, none means `default`.
pub fn parse_policies(names: &[String], default: &[PolicyKind]) -> Result<Vec<PolicyKind>> {
    if names.is_empty() {
        Ok(default.to_vec())
    } else if names.iter().any(|p| p == "all") {
        Ok(PolicyKind::ALL.to_vec())
    } else {
        names.iter().map(|p| parse_policy(p)).collect()
    }
}

/// Checks an `--agents` override against the workload format's range.
pub fn check_agents_flag(agents: Option<u32>) -> Result<()> {
    if let Some(n) = agents {
        if n == 0 || n > traces::workload::AGENTS_MAX {
            bail!(
                "--agents must be in 1..={}, got {n}",
                traces::workload::AGENTS_MAX
            );
        }
    }
    Ok(())
}

/// A run directory's swaps.csv, or no swaps when the file is absent (runs written before swap
/// records existed, or by tools that never swap).
pub fn read_swaps(run_dir: &Path) -> Result<Vec<traces::SwapRecord>> {
    let path = run_dir.join("swaps.csv");
    Ok(if path.is_file() {
        traces::read_csv(&path)?
    } else {
        Vec::new()
    })
}

/// Writes one run's directory at `dir` (never over an existing one) from its records.
pub fn write_run(
    dir: &Path,
    manifest: &traces::RunManifest,
    output: &sim::driver::RunOutput,
    summary: &traces::RunSummary,
) -> Result<()> {
    traces::write_run_dir(
        dir,
        manifest,
        &output.turns,
        &output.steps,
        &output.swaps,
        summary,
    )?;
    Ok(())
}

/// Completes a workload's results folder: its `comparison.csv` (one row per run, the runs whose
/// directories are staged beside it) goes in, then the whole folder is published.
pub fn publish_workload(
    staging: outdir::Staging,
    summaries: &[traces::RunSummary],
    overwrite: bool,
) -> Result<()> {
    let rows: Vec<analysis::table::SummaryRow> = summaries
        .iter()
        .map(analysis::table::SummaryRow::from)
        .collect();
    traces::write_csv_atomic(&staging.path().join("comparison.csv"), &rows)?;
    staging.publish(overwrite)
}
