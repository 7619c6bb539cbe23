//! `djinn simulate`: run workloads under policies on the simulated GPU and compare them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use sim::driver::CheckLevel;
use sim::experiment::SimConfig;
use sim::PolicyKind;
use traces::workload::{Distribution, HintSpec};
use traces::{RunSummary, WorkloadSpec};

use crate::runio::inputs::{check_expected, expect_flags, shell_word, Input};
use crate::runio::outdir::{check_new_folder, Staging};
use crate::runio::profile_args::{check_context, ProfileArgs};
use crate::runio::{code_version, load_workloads, publish_workload, write_run};

const DEFAULT_SLO_MS: f64 = 5000.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HintOverride {
    /// The true pause.
    Exact,
    /// The true pause times exp(N(0, sigma^2)); set sigma with --hint-sigma.
    Noisy,
    /// No hint: policies predict from history.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CheckOverride {
    /// Incremental checks after every step, a full KV recount every 1024 steps (further apart
    /// in large runs: at least (agents + blocks) / 8 steps) and at the end.
    Step,
    /// A full KV recount after every step (slow; for debugging a policy).
    Full,
}

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Workload: a shipped name (seed-exp1, seed-cliff, agents-capacity, swe-agent, swe-agent-shared, chat, agents-background,
    /// azure-conv-synth) or a
    /// path to a TOML spec. Repeat for several. Default: seed-exp1 then seed-cliff.
    #[arg(long = "workload", short = 'w', value_name = "NAME|PATH")]
    pub workloads: Vec<String>,
    /// Policy to run (djinn, vllm, vllm-noapc, pin, swap, infercept, infercept-h, continuum, continuum-fixed,
    /// autellix, autellix-swap, autellix-continuum, next-use, djinn-true-pauses, offline), or `all`. Repeat for several. Default: djinn, vllm, pin, swap.
    #[arg(long = "policy", short = 'p', value_name = "NAME")]
    pub policies: Vec<String>,
    /// Number of agents (default: the workload's own, 80 for the seed workloads).
    #[arg(long, short = 'n')]
    pub agents: Option<u32>,
    /// Root seed of every random stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub gpu: ProfileArgs,
    /// Results folder: <out>/<workload>/ holds one run directory per policy and comparison.csv.
    /// A workload folder that already exists is never replaced silently: the command refuses
    /// (before simulating) unless --overwrite is given.
    #[arg(long, default_value = "runs/simulate")]
    pub out: PathBuf,
    /// Replace existing workload folders under --out, each as a whole (no run directory of the
    /// earlier results survives beside the new comparison.csv).
    #[arg(long)]
    pub overwrite: bool,
    /// Do not write run directories, only print the tables.
    #[arg(long)]
    pub no_write: bool,
    /// Refuse to run unless FILE's content still has this SHA-256. A manifest's reproduce line
    /// carries one per input file (workload, profile, trace), so rerunning it on a changed file
    /// is an error, not a different run. Repeatable.
    #[arg(long = "expect-sha256", value_name = "FILE=SHA256")]
    pub expect_sha256: Vec<String>,
    /// Fraction of GPU memory the engine may use (weights + workspace + KV).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Host memory for swapped KV, GiB.
    #[arg(long, default_value_t = 128.0)]
    pub host_memory_gib: f64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// Chunked-prefill token budget per step.
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: u32,
    /// How every policy's steps are filled with prefill after their decodes: `fill` (the whole
    /// token budget, as vLLM), `chunk-N` (at most N prefill tokens per step) or `stall-free` (the
    /// compute a memory-bound decode step leaves idle, at least 1,024 tokens). One batch policy
    /// for all, so policies differ only in KV placement. Default chunk-1024: the capacity of djinn,
    /// vllm, swap and next-use on seed-cliff, agents-capacity and swe-agent is the best or within
    /// 1.2% of the best under it (docs/policies-and-workloads.md).
    #[arg(long, default_value = sim::policies::batching::DEFAULT_BATCHING_NAME, value_parser = sim::BatchPolicy::parse)]
    pub batching: sim::BatchPolicy,
    /// Override the pause distribution with uniform(pause-min-s, pause-max-s).
    #[arg(long, requires = "pause_max_s")]
    pub pause_min_s: Option<f64>,
    #[arg(long, requires = "pause_min_s")]
    pub pause_max_s: Option<f64>,
    /// Override what the scheduler is told about pauses.
    #[arg(long, value_enum)]
    pub hint: Option<HintOverride>,
    /// Log-normal sigma of the hint noise (implies --hint noisy when given alone).
    #[arg(long)]
    pub hint_sigma: Option<f64>,
    /// What hint-using policies (djinn, infercept, infercept-h, next-use) do with hints: `hint`
    /// believes them (exact or noisy as --hint says), `ewma` ignores them and predicts from each
    /// agent's own past pauses, `none` predicts nothing.
    #[arg(long, default_value = "hint", value_parser = ["hint", "ewma", "none"])]
    pub predictor: String,
    /// Latency SLO (ms) whose attainment the summary reports.
    #[arg(long, default_value_t = DEFAULT_SLO_MS)]
    pub slo_ms: f64,
    /// Also print the workload's physical bounds on N (docs/bounds.md) at this seed and SLO,
    /// scanned up to 1,024 agents or twice --agents.
    #[arg(long)]
    pub bounds: bool,
    /// Invariant checking level.
    #[arg(long, value_enum, default_value_t = CheckOverride::Step)]
    pub check: CheckOverride,
}

impl Default for SimulateArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: SimulateArgs,
        }
        Wrapper::parse_from(["djinn"]).args
    }
}

/// One workload to simulate: as named on the command line, loaded (overrides applied), and the
/// files it came from.
struct PlannedWorkload {
    arg: String,
    spec: WorkloadSpec,
    inputs: Vec<Input>,
}

/// Validated inputs of one simulate invocation.
struct Plan {
    workloads: Vec<PlannedWorkload>,
    policies: Vec<PolicyKind>,
    base: SimConfig,
    profile_inputs: Vec<Input>,
}

/// The hint a `--hint`/`--hint-sigma` pair asks for (`None`: keep the workload's own).
pub fn hint_override(hint: Option<HintOverride>, sigma: Option<f64>) -> Option<HintSpec> {
    match (hint, sigma) {
        (Some(HintOverride::Exact), _) => Some(HintSpec::Exact),
        (Some(HintOverride::None), _) => Some(HintSpec::None),
        (Some(HintOverride::Noisy), sigma) => Some(HintSpec::Noisy {
            sigma: sigma.unwrap_or(0.5),
        }),
        (None, Some(sigma)) => Some(HintSpec::Noisy { sigma }),
        (None, None) => None,
    }
}

fn apply_overrides(args: &SimulateArgs, spec: &mut WorkloadSpec) -> Result<()> {
    if let (Some(low), Some(high)) = (args.pause_min_s, args.pause_max_s) {
        spec.agent.pause_s = Distribution::Uniform { low, high };
    }
    if let Some(hint) = hint_override(args.hint, args.hint_sigma) {
        spec.hint = hint;
    }
    spec.validate(std::path::Path::new("command-line overrides"))
        .map_err(anyhow::Error::from)
}

fn validate(args: &SimulateArgs) -> Result<Plan> {
    check_expected(&args.expect_sha256)?;
    let workload_names = if args.workloads.is_empty() {
        vec!["seed-exp1".to_string(), "seed-cliff".to_string()]
    } else {
        args.workloads.clone()
    };
    let mut workloads = Vec::new();
    for (arg, (mut spec, inputs)) in workload_names.iter().zip(load_workloads(&workload_names)?) {
        apply_overrides(args, &mut spec)?;
        workloads.push(PlannedWorkload {
            arg: arg.clone(),
            spec,
            inputs,
        });
    }
    let policies = crate::runio::parse_policies(&args.policies, &PolicyKind::DEFAULT_SET)?;
    crate::runio::check_agents_flag(args.agents)?;
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        bail!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            args.gpu_memory_utilization
        );
    }
    if !(args.host_memory_gib.is_finite()
        && args.host_memory_gib >= 0.0
        && args.host_memory_gib <= 1048576.0)
    {
        bail!(
            "--host-memory-gib must be a finite number in [0, 1048576], got {}",
            args.host_memory_gib
        );
    }
    if args.block_size == 0 || args.block_size > 4096 {
        bail!("--block-size must be in 1..=4096, got {}", args.block_size);
    }
    if args.max_batch_tokens == 0 {
        bail!("--max-batch-tokens must be > 0");
    }
    if !(args.slo_ms.is_finite() && args.slo_ms > 0.0) {
        bail!("--slo-ms must be a finite number > 0, got {}", args.slo_ms);
    }
    let resolved = args.gpu.resolve()?;
    for w in &workloads {
        check_context(&resolved.profile, &w.arg, w.spec.max_context_tokens)?;
    }
    let mut base = SimConfig::new(PolicyKind::Djinn, resolved.profile);
    base.seed = args.seed;
    base.gpu_memory_utilization = args.gpu_memory_utilization;
    base.host_memory_bytes = (args.host_memory_gib * (1u64 << 30) as f64) as u64;
    base.block_size_tokens = args.block_size;
    base.sched.max_batch_tokens = args.max_batch_tokens;
    base.sched.batching = args.batching;
    base.predictor = sim::policies::PredictorMode::parse(&args.predictor).context("--predictor")?;
    base.check = match args.check {
        CheckOverride::Step => CheckLevel::Step {
            audit_interval_steps: 1024,
        },
        CheckOverride::Full => CheckLevel::Full,
    };
    if base.gpu_blocks() == 0 {
        bail!(
            "the GPU KV pool is empty: {} B x {} - weights {} B - workspace {} B leaves no block of {} B",
            base.profile.gpu_memory_bytes,
            base.gpu_memory_utilization,
            base.profile.weight_bytes,
            base.profile.workspace_reserve_bytes,
            base.block_bytes()
        );
    }
    if !args.no_write {
        for w in &workloads {
            check_new_folder(&args.out.join(&w.spec.name), args.overwrite)?;
        }
    }
    Ok(Plan {
        workloads,
        policies,
        base,
        profile_inputs: resolved.inputs,
    })
}

fn reproduce_line(
    args: &SimulateArgs,
    plan: &Plan,
    workload: &PlannedWorkload,
    policy: PolicyKind,
    agents: u32,
) -> String {
    let mut line = format!(
        "djinn simulate --workload {} --policy {} --agents {agents} --seed {}{} --gpu-memory-utilization {} --host-memory-gib {} --block-size {} --max-batch-tokens {}",
        shell_word(&workload.arg), policy.name(), args.seed, args.gpu.reproduce_flags(), args.gpu_memory_utilization, args.host_memory_gib, args.block_size, args.max_batch_tokens
    );
    if let (Some(a), Some(b)) = (args.pause_min_s, args.pause_max_s) {
        line.push_str(&format!(" --pause-min-s {a} --pause-max-s {b}"));
    }
    if let Some(h) = args.hint {
        line.push_str(&format!(" --hint {}", format!("{h:?}").to_lowercase()));
    }
    line.push_str(&format!(" --batching {}", args.batching.name()));
    if args.predictor != "hint" {
        line.push_str(&format!(" --predictor {}", args.predictor));
    }
    if let Some(s) = args.hint_sigma {
        line.push_str(&format!(" --hint-sigma {s}"));
    }
    if args.slo_ms != DEFAULT_SLO_MS {
        line.push_str(&format!(" --slo-ms {}", args.slo_ms));
    }
    let mut inputs = workload.inputs.clone();
    inputs.extend(plan.profile_inputs.iter().cloned());
    line.push_str(&expect_flags(&inputs));
    line
}

/// One finished simulated run.
pub struct RunResult {
    pub summary: RunSummary,
    pub wall_s: f64,
}

/// Simulates one policy on one workload; writes its run directory under `staging` when given.
fn run_policy(
    args: &SimulateArgs,
    plan: &Plan,
    workload: &PlannedWorkload,
    built: &sim::workload::Workload,
    policy: PolicyKind,
    staging: Option<&Path>,
) -> Result<RunResult> {
    let spec = &workload.spec;
    let agents = spec.agent_count(args.agents);
    let mut config = plan.base.clone();
    config.policy = policy;
    let started = Instant::now();
    let reproduce = reproduce_line(args, plan, workload, policy, agents);
    let output = sim::experiment::simulate_workload(built, &config).with_context(|| {
        format!(
            "{} / {}: reproduce with: {reproduce}",
            spec.name,
            policy.name()
        )
    })?;
    let wall_s = started.elapsed().as_secs_f64();
    let inputs = analysis::SummaryInputs {
        policy: policy.name().into(),
        workload: spec.name.clone(),
        agents,
        seed: args.seed,
        turns_planned: output.turns_planned,
        block_bytes: config.block_bytes(),
        gpu_blocks_total: config.gpu_blocks(),
        host_blocks_total: config.host_blocks(),
        slo_ns: (args.slo_ms * 1e6) as u64,
    };
    let summary = analysis::summarize(&inputs, &output.turns, &output.steps, &output.swaps);
    if let Some(staging) = staging {
        let manifest = sim::experiment::manifest(spec, agents, &config, &code_version(), reproduce);
        write_run(&staging.join(policy.name()), &manifest, &output, &summary)?;
    }
    Ok(RunResult { summary, wall_s })
}

pub fn run(args: SimulateArgs) -> Result<Vec<Vec<RunResult>>> {
    let plan = validate(&args)?;
    let mut all = Vec::new();
    for workload in &plan.workloads {
        let spec = &workload.spec;
        let agents = spec.agent_count(args.agents);
        println!(
            "== {} ({}): {} agents, seed {}, profile {} ({}), GPU KV pool {} blocks x {} tokens, host pool {} blocks",
            spec.name,
            spec.description,
            agents,
            args.seed,
            plan.base.profile.name,
            plan.base.profile.provenance.kind,
            plan.base.gpu_blocks(),
            plan.base.block_size_tokens,
            plan.base.host_blocks()
        );
        // How far to trust the simulated GPU's numbers: where the profile came from and the
        // held-out validation it achieved, if any.
        println!(
            "   profile {}: {}",
            plan.base.profile.name,
            plan.base.profile.provenance.trust_summary()
        );
        let built = sim::replay::build_workload(spec, agents, args.seed)?;
        let target = args.out.join(&spec.name);
        // Every file of the workload folder is staged and published together.
        let staging = (!args.no_write)
            .then(|| Staging::new(&target, false))
            .transpose()?;
        let staged = staging.as_ref().map(|s| s.path());
        let results: Vec<RunResult> = plan
            .policies
            .par_iter()
            .map(|&policy| run_policy(&args, &plan, workload, &built, policy, staged))
            .collect::<Result<_>>()?;
        let summaries: Vec<RunSummary> = results.iter().map(|r| r.summary.clone()).collect();
        print!(
            "{}",
            analysis::comparison_table(
                &format!(
                    "turn latency (ms) and its P99 decomposition, {} agents, batch policy {}",
                    agents,
                    plan.base.sched.batching.name()
                ),
                &summaries
            )
        );
        let wall: f64 = results.iter().map(|r| r.wall_s).sum();
        if let Some(staging) = staging {
            publish_workload(staging, &summaries, args.overwrite)?;
            println!(
                "run directories and comparison.csv under {} (simulated in {:.2} s of CPU)",
                target.display(),
                wall
            );
        }
        if args.bounds {
            print_bounds(&args, &plan.base, spec, agents)?;
        }
        println!();
        all.push(results);
    }
    Ok(all)
}

/// The bounds block of one workload at the run's seed and SLO, and where this run's N stands.
fn print_bounds(
    args: &SimulateArgs,
    base: &SimConfig,
    spec: &WorkloadSpec,
    agents: u32,
) -> Result<()> {
    let req = sim::bounds::BoundsRequest {
        slo_ms: args.slo_ms,
        first_seed: args.seed,
        seeds: 1,
        max_agents: agents.saturating_mul(2).max(1024),
    };
    let report = sim::bounds::compute(spec, base, &req)
        .with_context(|| format!("bounds of {}", spec.name))?;
    print!("{}", report.render());
    if let Some(b) = report.binding() {
        if !b.capped && agents > b.agents {
            println!(
                "  {agents} agents is above the binding bound: no policy keeps this P99 within {:.0} ms",
                args.slo_ms
            );
        }
    }
    Ok(())
}
