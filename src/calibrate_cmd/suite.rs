//! `djinn calibrate validate-suite`: workloads of different shapes, each under several policies,
//! run on the engine (`djinn engine run`, whose run directories it keeps) and beside each its
//! simulation under the profile being validated (`validate::simulate_twin`); writes the error
//! table (`suite_table`) and can record its summary into the profile.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};
use engine::config::ModelConfig;
use sim::PolicyKind;
use traces::{GpuProfile, WorkloadSpec};

use super::inputs::read_real_run;
use super::suite_capacity::{capacity_text, CapacityRow};
use super::suite_scale::{scaled_spec, Scale};
use super::suite_table::{rank_rows, suite_text, summary, Overall, SuiteRow, Targets};
use super::validate::simulate_twin;
use crate::engine_cmd::run_cmd::{self, EngineBackendKind, RunArgs};
use crate::runio::outdir::check_new_file;

#[derive(Args, Debug)]
pub struct SuiteArgs {
    /// The profile under test (a fitted profile's JSON, or a shipped name): the simulated GPU.
    #[arg(long, value_name = "NAME|PATH")]
    pub profile: String,
    /// Profile whose cost hints the policies plan with, on the engine and in simulation alike
    /// (default: --profile).
    #[arg(long, value_name = "NAME|PATH")]
    pub hints_profile: Option<String>,
    #[arg(long, value_enum, default_value_t = EngineBackendKind::Cuda)]
    pub backend: EngineBackendKind,
    /// Engine model preset (seeded random weights). Default: llama2-7b on cuda, tiny on cpu.
    #[arg(long)]
    pub model: Option<String>,
    /// Workloads (shipped names or TOML paths); repeatable. Default: seed-exp1, seed-cliff,
    /// swe-agent, coding-agent-small and chat, plus coding-agent where the model's window holds
    /// 128k tokens (llama3.1-8b).
    #[arg(long = "workload", short = 'w', value_name = "NAME|PATH")]
    pub workloads: Vec<String>,
    /// Policies, each run on every workload; repeatable. Default: djinn, vllm, swap.
    #[arg(long = "policy", short = 'p', value_name = "NAME")]
    pub policies: Vec<String>,
    /// Agents of every workload (default: each workload's own times --agents-scale).
    #[arg(long, conflicts_with = "agents_scale")]
    pub agents: Option<u32>,
    /// Multiplies each workload's own agent count (at least 1 agent).
    #[arg(long)]
    pub agents_scale: Option<f64>,
    /// Multiplies turns per agent, never below two where there were two or more (synthetic
    /// agent programs; a replayed trace keeps its own).
    #[arg(long, default_value_t = 1.0)]
    pub turns_scale: f64,
    /// Multiplies arrival times and pauses (0.1: the same programs in a tenth of the wall time).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Multiplies every token count and the context window (fits small test models).
    #[arg(long, default_value_t = 1.0)]
    pub token_scale: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Engine KV pools and batch limits (as for `djinn engine run`; its defaults otherwise).
    #[arg(long, conflicts_with = "gpu_kv_gib")]
    pub gpu_kv_blocks: Option<u32>,
    /// A smaller GPU KV pool than the card leaves puts the policies under memory pressure.
    #[arg(long)]
    pub gpu_kv_gib: Option<f64>,
    #[arg(long, conflicts_with = "host_kv_gib")]
    pub host_kv_blocks: Option<u32>,
    #[arg(long)]
    pub host_kv_gib: Option<f64>,
    #[arg(long)]
    pub max_batch_tokens: Option<u32>,
    #[arg(long)]
    pub max_batch_sequences: Option<u32>,
    /// A single run taking longer than this (wall clock) stops the suite with an error.
    #[arg(long, default_value_t = 600.0)]
    pub run_time_limit_s: f64,
    /// Targets: |sim - real| / real of P50 and P99 turn latency, percent.
    #[arg(long, default_value_t = 3.0)]
    pub p50_target_pct: f64,
    #[arg(long, default_value_t = 7.0)]
    pub p99_target_pct: f64,
    /// Two policies within this many percent of each other count as tied when rankings compare.
    #[arg(long, default_value_t = 1.0)]
    pub rank_tie_pct: f64,
    /// Results folder: validation-suite.csv and .txt, runs/<workload>/<policy>/ (real run
    /// directories), workloads/ (scaled specs). Refused if it exists unless --overwrite or
    /// --reuse-runs.
    #[arg(long, default_value = "runs/validation-suite")]
    pub out: PathBuf,
    /// Replace an existing results folder's files.
    #[arg(long)]
    pub overwrite: bool,
    /// Keep the real runs already under --out/runs (same workload, agents, seed and policies)
    /// and run only the missing ones: an interrupted suite resumes without repeating GPU work.
    #[arg(long)]
    pub reuse_runs: bool,
    /// Record the summary into this profile JSON's `provenance.validation`. It must be the
    /// profile under test; the file is rewritten with nothing else changed, and an existing
    /// validation is replaced only with --overwrite.
    #[arg(long, value_name = "PROFILE.json")]
    pub record_into: Option<PathBuf>,
    /// Also measure capacity at an SLO: --capacity-workload under every policy at each of these
    /// agent counts (comma-separated, e.g. 8,16,32), real beside simulated; written to
    /// capacity.csv and the text. Each count is a full engine run per policy: budget GPU time.
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    pub capacity_agents: Vec<u32>,
    /// The workload of the capacity measurement (scaled like the others).
    #[arg(long, default_value = "seed-cliff", value_name = "NAME|PATH")]
    pub capacity_workload: String,
    /// The SLO of the capacity measurement: P99 turn latency, ms.
    #[arg(long, default_value_t = 5000.0)]
    pub capacity_slo_ms: f64,
}

/// Wraps `djinn engine run`'s flags so one run of the suite parses exactly as that command does.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct EngineRunLine {
    #[command(flatten)]
    run: RunArgs,
}

const DEFAULT_WORKLOADS: [&str; 5] = [
    "seed-exp1",
    "seed-cliff",
    "swe-agent",
    "coding-agent-small",
    "chat",
];
const LONG_CONTEXT_WORKLOAD: &str = "coding-agent";

fn check(args: &SuiteArgs) -> Result<()> {
    crate::runio::check_agents_flag(args.agents)?;
    let factors = [
        ("--agents-scale", args.agents_scale.unwrap_or(1.0)),
        ("--turns-scale", args.turns_scale),
        ("--time-scale", args.time_scale),
        ("--token-scale", args.token_scale),
    ];
    for (flag, f) in factors {
        if !(f.is_finite() && f > 0.0 && f <= 100.0) {
            bail!("{flag} must be a number in (0, 100], got {f}");
        }
    }
    let bounded = [
        ("--run-time-limit-s", args.run_time_limit_s, 86_400.0),
        ("--p50-target-pct", args.p50_target_pct, 100.0),
        ("--p99-target-pct", args.p99_target_pct, 100.0),
        ("--rank-tie-pct", args.rank_tie_pct, 50.0),
    ];
    for (flag, v, max) in bounded {
        if !(v.is_finite() && v > 0.0 && v <= max) {
            bail!("{flag} must be a number in (0, {max}], got {v}");
        }
    }
    if args.capacity_agents.len() > 16 {
        bail!(
            "--capacity-agents: at most 16 counts (each is an engine run per policy), got {}",
            args.capacity_agents.len()
        );
    }
    for &n in &args.capacity_agents {
        crate::runio::check_agents_flag(Some(n)).context("--capacity-agents")?;
    }
    if !(args.capacity_slo_ms.is_finite()
        && args.capacity_slo_ms > 0.0
        && args.capacity_slo_ms <= 86_400_000.0)
    {
        bail!(
            "--capacity-slo-ms must be a number in (0, 86400000], got {}",
            args.capacity_slo_ms
        );
    }
    if args.out.exists() && !args.overwrite && !args.reuse_runs {
        bail!(
            "{}: already holds results (earlier results are never replaced silently); pass --reuse-runs to keep its runs and finish the suite, --overwrite to replace them, or choose another --out",
            args.out.display()
        );
    }
    Ok(())
}

fn model_name(args: &SuiteArgs) -> String {
    args.model.clone().unwrap_or_else(|| {
        match args.backend {
            EngineBackendKind::Cuda => "llama2-7b",
            EngineBackendKind::Cpu => "tiny",
        }
        .to_string()
    })
}

/// The workloads to run: the flags', or the default set for the model's window.
fn workload_names(args: &SuiteArgs, model: &str) -> Result<Vec<String>> {
    if !args.workloads.is_empty() {
        return Ok(args.workloads.clone());
    }
    let config = ModelConfig::preset(model).with_context(|| {
        format!(
            "--model: unknown preset `{model}` (known: {})",
            ModelConfig::PRESET_NAMES.join(", ")
        )
    })?;
    let mut names: Vec<String> = DEFAULT_WORKLOADS.iter().map(|s| s.to_string()).collect();
    if config.max_position_embeddings >= 131_072 {
        names.push(LONG_CONTEXT_WORKLOAD.into());
    }
    Ok(names)
}

/// The workload as the suite runs it: scaled, written under `<out>/workloads/` when scaling
/// changed it (the engine reads it from there and each manifest names it).
fn prepare_workload(args: &SuiteArgs, name: &str) -> Result<(WorkloadSpec, String)> {
    let (spec, _) = crate::runio::load_workload_with_inputs(name)?;
    let scale = Scale {
        tokens: args.token_scale,
        turns: args.turns_scale,
        time: args.time_scale,
    };
    let scaled = scaled_spec(&spec, scale)?;
    if scaled == spec {
        return Ok((spec, name.to_string()));
    }
    let dir = args.out.join("workloads");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.toml", scaled.name));
    traces::write_atomic(&path, scaled.to_toml_string().as_bytes())?;
    // Read back as the engine will: the written spec must be one the format accepts.
    let (reread, _) = crate::runio::load_workload_with_inputs(&path.display().to_string())
        .with_context(|| format!("the scaled workload `{}` is not valid", spec.name))?;
    Ok((reread, path.display().to_string()))
}

fn agents_for(args: &SuiteArgs, spec: &WorkloadSpec) -> u32 {
    match (args.agents, args.agents_scale) {
        (Some(n), _) => n,
        (None, Some(f)) => ((f64::from(spec.agent_count(None)) * f).round() as u32).max(1),
        (None, None) => spec.agent_count(None),
    }
}

/// `djinn engine run`'s command line for one workload under every policy.
fn engine_words(
    args: &SuiteArgs,
    model: &str,
    hints: &str,
    workload: &str,
    agents: u32,
    policies: &[PolicyKind],
    out: &Path,
) -> Vec<String> {
    let backend = match args.backend {
        EngineBackendKind::Cuda => "cuda",
        EngineBackendKind::Cpu => "cpu",
    };
    let mut w: Vec<String> = vec![
        "--backend".into(),
        backend.into(),
        "--model".into(),
        model.into(),
        "--workload".into(),
        workload.into(),
        "--agents".into(),
        agents.to_string(),
        "--seed".into(),
        args.seed.to_string(),
        "--profile".into(),
        hints.into(),
        "--time-limit-s".into(),
        args.run_time_limit_s.to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    for p in policies {
        w.extend(["--policy".into(), p.name().to_string()]);
    }
    let optional = [
        ("--gpu-kv-blocks", args.gpu_kv_blocks.map(|v| v.to_string())),
        ("--gpu-kv-gib", args.gpu_kv_gib.map(|v| v.to_string())),
        (
            "--host-kv-blocks",
            args.host_kv_blocks.map(|v| v.to_string()),
        ),
        ("--host-kv-gib", args.host_kv_gib.map(|v| v.to_string())),
        (
            "--max-batch-tokens",
            args.max_batch_tokens.map(|v| v.to_string()),
        ),
        (
            "--max-batch-sequences",
            args.max_batch_sequences.map(|v| v.to_string()),
        ),
    ];
    for (flag, value) in optional {
        if let Some(v) = value {
            w.extend([flag.to_string(), v]);
        }
    }
    if args.overwrite {
        w.push("--overwrite".into());
    }
    w
}

/// A kept run directory must be the run this suite would make, else its numbers mislead.
fn check_reused(dir: &Path, spec: &WorkloadSpec, agents: u32, seed: u64) -> Result<()> {
    let run = read_real_run(dir)?;
    let m = &run.manifest;
    if m.workload != *spec || m.agents != agents || m.seed != seed {
        bail!(
            "{}: a run of another workload, agent count or seed than this suite's (--reuse-runs keeps only matching runs; remove it or choose another --out)",
            dir.join("manifest.json").display()
        );
    }
    Ok(())
}

pub fn run_suite(args: SuiteArgs) -> Result<()> {
    check(&args)?;
    let model = model_name(&args);
    let profile = calibration::load_profile(&args.profile)?;
    let hints_name = args.hints_profile.clone().unwrap_or(args.profile.clone());
    let hints = calibration::load_profile(&hints_name)?;
    if let Some(path) = &args.record_into {
        recordable(path, &profile, args.overwrite)?;
    }
    let (csv, txt) = (
        args.out.join("validation-suite.csv"),
        args.out.join("validation-suite.txt"),
    );
    check_new_file(&csv, "--out", args.overwrite || args.reuse_runs)?;
    check_new_file(&txt, "--out", args.overwrite || args.reuse_runs)?;
    let policies = crate::runio::parse_policies(
        &args.policies,
        &[PolicyKind::Djinn, PolicyKind::Vllm, PolicyKind::Swap],
    )?;
    let names = workload_names(&args, &model)?;
    // Every workload is read, scaled and checked before the first engine starts.
    let mut prepared = Vec::new();
    for name in &names {
        let (spec, source) = prepare_workload(&args, name)?;
        if prepared
            .iter()
            .any(|(s, _, _): &(WorkloadSpec, _, _)| s.name == spec.name)
        {
            bail!(
                "two workloads are named `{}`: their runs would share one folder",
                spec.name
            );
        }
        let agents = agents_for(&args, &spec);
        prepared.push((spec, source, agents));
    }
    let capacity_csv = args.out.join("capacity.csv");
    if !args.capacity_agents.is_empty() {
        check_new_file(&capacity_csv, "--out", args.overwrite || args.reuse_runs)?;
    }
    let capacity_workload = if args.capacity_agents.is_empty() {
        None
    } else {
        Some(prepare_workload(&args, &args.capacity_workload)?)
    };
    let runner = Runner {
        args: &args,
        model: &model,
        hints_name: &hints_name,
        policies: &policies,
    };
    let mut rows = Vec::new();
    let mut device = String::new();
    for (spec, source, agents) in &prepared {
        let dirs = runner.run_or_reuse(spec, source, *agents, &args.out.join("runs"))?;
        for dir in &dirs {
            let run = read_real_run(dir)?;
            let sim = simulate_twin(&run, &profile, &hints)?.summary;
            device.clone_from(&run.manifest.device);
            rows.push(SuiteRow::new(&run.summary, &sim, dir.display().to_string()));
        }
    }
    let verdicts = rank_rows(&mut rows, args.rank_tie_pct / 100.0);
    let targets = Targets {
        p50: args.p50_target_pct / 100.0,
        p99: args.p99_target_pct / 100.0,
    };
    let against = format!(
        "validate-suite on {device}, {model}, {} workloads x {} policies (agents {}, turns x{}, time x{}, tokens x{}, seed {})",
        prepared.len(),
        policies.len(),
        args.agents.map_or_else(
            || format!("x{}", args.agents_scale.unwrap_or(1.0)),
            |n| n.to_string()
        ),
        args.turns_scale,
        args.time_scale,
        args.token_scale,
        args.seed
    );
    let header = format!(
        "VALIDATION SUITE: profile {} against real runs ({against}); policies plan with {}'s hints",
        profile.name, hints.name
    );
    let mut text = suite_text(&header, &rows, &verdicts, targets);
    if let Some((spec, source)) = &capacity_workload {
        let mut capacity_rows = Vec::new();
        for &n in &args.capacity_agents {
            let root = args.out.join("capacity").join(format!("agents-{n}"));
            for dir in runner.run_or_reuse(spec, source, n, &root)? {
                let run = read_real_run(&dir)?;
                let sim = simulate_twin(&run, &profile, &hints)?.summary;
                capacity_rows.push(CapacityRow::new(
                    &run.summary,
                    &sim,
                    args.capacity_slo_ms,
                    dir.display().to_string(),
                ));
            }
        }
        text += &capacity_text(&capacity_rows);
        traces::write_csv_atomic(&capacity_csv, &capacity_rows)?;
        println!("wrote {}", capacity_csv.display());
    }
    print!("{text}");
    traces::write_csv_atomic(&csv, &rows)?;
    traces::write_atomic(&txt, text.as_bytes())?;
    println!("wrote {} and {}", csv.display(), txt.display());
    if let Some(path) = &args.record_into {
        record(path, &profile, summary(&rows, against)?, args.overwrite)?;
        let o = Overall::of(&rows, &verdicts, targets);
        println!(
            "recorded the validation ({} runs) into {}",
            o.runs,
            path.display()
        );
    }
    Ok(())
}

/// What every engine run of the suite shares.
struct Runner<'a> {
    args: &'a SuiteArgs,
    model: &'a str,
    hints_name: &'a str,
    policies: &'a [PolicyKind],
}

impl Runner<'_> {
    /// Runs `spec` (read from `source`) with `agents` agents under every policy into
    /// `root/<workload>/<policy>/`, or keeps the runs already there (--reuse-runs); returns the
    /// run directories.
    fn run_or_reuse(
        &self,
        spec: &WorkloadSpec,
        source: &str,
        agents: u32,
        root: &Path,
    ) -> Result<Vec<PathBuf>> {
        let args = self.args;
        let folder = root.join(&spec.name);
        let dirs: Vec<PathBuf> = self
            .policies
            .iter()
            .map(|p| folder.join(p.name()))
            .collect();
        let kept = args.reuse_runs && dirs.iter().all(|d| d.join("manifest.json").is_file());
        if kept {
            for d in &dirs {
                check_reused(d, spec, agents, args.seed)?;
            }
            println!(
                "== {}: keeping the runs under {}",
                spec.name,
                folder.display()
            );
            return Ok(dirs);
        }
        let words = engine_words(
            args,
            self.model,
            self.hints_name,
            source,
            agents,
            self.policies,
            root,
        );
        let line = EngineRunLine::try_parse_from(&words)
            .map_err(|e| anyhow::anyhow!("the engine run of `{}`: {e}", spec.name))?;
        let mut run_args = line.run;
        // A partial folder left by an interrupted suite is replaced, not kept.
        run_args.overwrite |= args.reuse_runs;
        run_cmd::run(run_args).with_context(|| format!("the engine run of `{}`", spec.name))?;
        Ok(dirs)
    }
}

/// `path` must hold the profile under test (validation aside), and no validation unless
/// `overwrite`: recording is refused before any engine runs.
fn recordable(path: &Path, tested: &GpuProfile, overwrite: bool) -> Result<GpuProfile> {
    let on_disk = GpuProfile::read(path)?;
    let strip = |p: &GpuProfile| {
        let mut p = p.clone();
        p.provenance.validation = None;
        p
    };
    if strip(&on_disk) != strip(tested) {
        bail!(
            "--record-into {}: not the profile under test (--profile); a validation is recorded only into the profile it measured",
            path.display()
        );
    }
    if on_disk.provenance.validation.is_some() && !overwrite {
        bail!(
            "--record-into {}: provenance.validation is already set (earlier results are never replaced silently); pass --overwrite to replace it",
            path.display()
        );
    }
    Ok(on_disk)
}

fn record(
    path: &Path,
    tested: &GpuProfile,
    validation: traces::ValidationSummary,
    overwrite: bool,
) -> Result<()> {
    // Checked again: the file may have changed while the suite ran.
    let mut profile = recordable(path, tested, overwrite)?;
    profile.provenance.validation = Some(validation);
    traces::write_json_atomic(path, &profile)?;
    Ok(())
}
