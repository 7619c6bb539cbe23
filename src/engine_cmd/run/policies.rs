//! The policy loop of `djinn engine run`: each policy's run on the engine, the run directories
//! and manifests it writes, and the tables it prints.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use engine::batch::PagedModel;
use engine::swap::backend::{EngineBackend, SwapEstimate, SwapExecutor};
use engine::WallClock;
use sim::driver::{RunOutput, RunSettings};
use sim::experiment::SimConfig;
use sim::PolicyKind;
use traces::{RunSummary, SwapRecord};

use super::figures::{figures, Figures};
use super::plan::{EngineInfo, RunPlan, GIB};
use super::twin::{side_by_side, simulate_twin};
use super::RunArgs;
use crate::runio::inputs::{expect_flags, shell_word};
use crate::runio::outdir::Staging;
use crate::runio::{code_version, publish_workload};

pub fn swap_estimate(config: &SimConfig) -> SwapEstimate {
    let p = &config.profile;
    SwapEstimate {
        latency_ns: p.host_to_device.latency_ns.max(p.device_to_host.latency_ns),
        out_bytes_per_s: p.device_to_host.bandwidth_bytes_per_s,
        in_bytes_per_s: p.host_to_device.bandwidth_bytes_per_s,
    }
}

/// The run loop's settings on this engine: its pools, block size and the profile's cost hints
/// with the engine's real KV sizes.
pub fn settings(plan: &RunPlan, info: &EngineInfo) -> RunSettings {
    let mut settings = plan.base.settings();
    settings.gpu_blocks = info.gpu_blocks;
    settings.host_blocks = info.host_blocks;
    settings.costs.block_bytes = info.block_bytes;
    settings.costs.kv_bytes_per_token = info.kv_bytes_per_token;
    settings
}

/// The command line that reproduces one policy's run, its input files named with their hashes.
pub fn reproduce_line(
    args: &RunArgs,
    plan: &RunPlan,
    policy: PolicyKind,
    info: &EngineInfo,
) -> String {
    let model = match (&args.weights, &args.model) {
        (Some(path), _) => format!("--weights {}", shell_word(&path.display().to_string())),
        _ => format!("--model {}", plan.model_config.name),
    };
    let caps = [
        ("--swap-rate-cap-gbps", args.swap_rate_cap_gbps),
        ("--swap-in-rate-cap-gbps", args.swap_in_rate_cap_gbps),
        ("--swap-out-rate-cap-gbps", args.swap_out_rate_cap_gbps),
    ];
    format!(
        "djinn engine run --backend {} {model} --workload {} --policy {} --agents {} --seed {} --gpu-kv-blocks {} --host-kv-blocks {} --block-size {} --max-batch-tokens {} --max-batch-sequences {} {} --predictor {} --swap-in-copy {}{}{}",
        info.backend,
        shell_word(&args.workload),
        policy.name(),
        plan.agents,
        args.seed,
        info.gpu_blocks,
        info.host_blocks,
        args.block_size,
        args.max_batch_tokens,
        args.max_batch_sequences,
        match &args.card {
            Some(card) => format!("--card {}", shell_word(card)),
            None => format!("--profile {}", shell_word(&args.profile)),
        },
        args.predictor,
        format!("{:?}", args.swap_in_copy).to_lowercase(),
        caps.iter()
            .filter_map(|(flag, cap)| cap.map(|cap| format!(" {flag} {cap}")))
            .collect::<String>(),
        expect_flags(&plan.inputs)
    )
}

/// One policy's real run and (optionally) its simulated twin.
pub struct PolicyResult {
    pub real: RunSummary,
    pub real_figures: Figures,
    pub sim: Option<(RunSummary, Figures)>,
}

/// The engine's measured swap records as swaps.csv rows, checked against the run loop's own.
fn measured_swaps(
    output: &RunOutput,
    measured: &[engine::swap::SwapRecord],
) -> Result<Vec<SwapRecord>> {
    let mut rows: Vec<SwapRecord> = measured.iter().map(|r| r.to_trace()).collect();
    rows.sort_by_key(|r| r.swap_id);
    if rows.len() != output.swaps.len() {
        bail!(
            "the run loop started {} swaps but the swap engine reported {}",
            output.swaps.len(),
            rows.len()
        );
    }
    for (measured, planned) in rows.iter().zip(&output.swaps) {
        if measured.swap_id != planned.swap_id
            || measured.bytes != planned.bytes
            || measured.direction != planned.direction
            || measured.agent_id != planned.agent_id
        {
            bail!(
                "swap {} as measured ({} {} bytes, agent {}) differs from the run loop's record (swap {} {} {} bytes, agent {})",
                measured.swap_id,
                measured.direction,
                measured.bytes,
                measured.agent_id,
                planned.swap_id,
                planned.direction,
                planned.bytes,
                planned.agent_id
            );
        }
    }
    Ok(rows)
}

pub fn summary_inputs(
    args: &RunArgs,
    plan: &RunPlan,
    policy: PolicyKind,
    output: &RunOutput,
    info: &EngineInfo,
) -> analysis::SummaryInputs {
    analysis::SummaryInputs {
        policy: policy.name().into(),
        workload: plan.spec.name.clone(),
        agents: plan.agents,
        seed: args.seed,
        turns_planned: output.turns_planned,
        block_bytes: info.block_bytes,
        gpu_blocks_total: info.gpu_blocks,
        host_blocks_total: info.host_blocks,
        slo_ns: (args.slo_ms * 1e6) as u64,
    }
}

/// Runs every policy, one after another, on the engine; writes their run directories and
/// comparison.csv into the workload's results folder, published when all have run.
pub fn run_policies<M: PagedModel, S: SwapExecutor<Model = M>>(
    args: &RunArgs,
    plan: &RunPlan,
    backend: &mut EngineBackend<M, S>,
    engine_epoch: Instant,
    info: &EngineInfo,
) -> Result<()> {
    let settings = settings(plan, info);
    println!(
        "== engine run: {} ({}), {} agents, seed {}, backend {} on {}, model {}, GPU KV pool {} blocks x {} tokens ({:.2} GiB), host pool {} blocks ({:.2} GiB)",
        plan.spec.name,
        plan.spec.description,
        plan.agents,
        args.seed,
        info.backend,
        info.device,
        plan.model_label,
        info.gpu_blocks,
        args.block_size,
        info.gpu_blocks as f64 * info.block_bytes as f64 / GIB,
        info.host_blocks,
        info.host_blocks as f64 * info.block_bytes as f64 / GIB
    );
    for (key, value) in &info.notes {
        println!("   {key}: {value}");
    }
    let target = args.out.join(&plan.spec.name);
    // Real runs are costly: a failure keeps the finished ones (in the staging folder, named).
    let staging = (!args.no_write)
        .then(|| Staging::new(&target, true))
        .transpose()?;
    let staged = staging.as_ref().map(|s| s.path());
    let mut results = Vec::new();
    for &policy in &plan.policies {
        let real = run_policy(
            args,
            plan,
            backend,
            engine_epoch,
            info,
            &settings,
            policy,
            staged,
        )?;
        let sim = if args.compare_sim {
            Some(simulate_twin(args, plan, policy, info, &settings, staged)?)
        } else {
            None
        };
        results.push(PolicyResult { sim, ..real });
    }
    let summaries: Vec<RunSummary> = results.iter().map(|r| r.real.clone()).collect();
    print_tables(args, plan, info, &results, &summaries);
    if let Some(staging) = staging {
        publish_workload(staging, &summaries, args.overwrite)?;
        println!(
            "run directories and comparison.csv under {}",
            target.display()
        );
    }
    Ok(())
}

/// One policy on the engine: the run loop on the wall clock, its measured swaps checked against
/// the loop's own records, its run directory written under `staging` when given.
#[allow(clippy::too_many_arguments)]
fn run_policy<M: PagedModel, S: SwapExecutor<Model = M>>(
    args: &RunArgs,
    plan: &RunPlan,
    backend: &mut EngineBackend<M, S>,
    engine_epoch: Instant,
    info: &EngineInfo,
    settings: &RunSettings,
    policy: PolicyKind,
    staging: Option<&Path>,
) -> Result<PolicyResult> {
    // The offline reference is given the generated workload's future; no other policy is.
    let mut scheduler = policy.build_with(
        sim::policies::PolicyOptions {
            predictor: plan.base.predictor,
        },
        &plan.workload,
    );
    let run_epoch = Instant::now();
    backend
        .begin_run(
            run_epoch.duration_since(engine_epoch).as_nanos() as u64,
            &plan.workload,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut clock = WallClock::from_epoch(run_epoch);
    let reproduce = reproduce_line(args, plan, policy, info);
    let output = sim::driver::run(
        settings,
        &plan.workload,
        scheduler.as_mut(),
        backend,
        &mut clock,
    )
    .with_context(|| {
        format!(
            "{} / {} on the {} engine: reproduce with: {reproduce}",
            plan.spec.name,
            policy.name(),
            info.backend
        )
    })?;
    let swaps = measured_swaps(&output, backend.swap_records())?;
    let inputs = summary_inputs(args, plan, policy, &output, info);
    let summary = analysis::summarize(&inputs, &output.turns, &output.steps, &swaps);
    let real_figures = figures(&output.turns, &output.steps, &swaps, output.end_time);
    println!(
        "   {}: {} steps, {} swaps, {:.1} s wall",
        policy.name(),
        output.steps.len(),
        swaps.len(),
        real_figures.end_s
    );
    if let Some(staging) = staging {
        let manifest = real_manifest(plan, policy, info, reproduce);
        traces::write_run_dir(
            &staging.join(policy.name()),
            &manifest,
            &output.turns,
            &output.steps,
            &swaps,
            &summary,
        )?;
    }
    Ok(PolicyResult {
        real: summary,
        real_figures,
        sim: None,
    })
}

/// A real run's manifest: the simulator's, with the engine's device, model, pools and how its
/// times were measured.
fn real_manifest(
    plan: &RunPlan,
    policy: PolicyKind,
    info: &EngineInfo,
    reproduce: String,
) -> traces::RunManifest {
    let mut config = plan.base.clone();
    config.policy = policy;
    let mut manifest =
        sim::experiment::manifest(&plan.spec, plan.agents, &config, &code_version(), reproduce);
    manifest.backend = info.backend.into();
    manifest.device = info.device.clone();
    manifest.model = plan.model_label.clone();
    let o = &mut manifest.options;
    o.insert("gpu_blocks".into(), info.gpu_blocks.to_string());
    o.insert("host_blocks".into(), info.host_blocks.to_string());
    o.insert("block_bytes".into(), info.block_bytes.to_string());
    o.insert(
        "host_memory_bytes".into(),
        (info.host_blocks as u64 * info.block_bytes).to_string(),
    );
    o.remove("gpu_memory_utilization");
    o.insert("clock".into(), "wall (monotonic OS clock)".into());
    o.insert(
        "step_times".into(),
        "measured: host wall time of each forward, staging to greedy tokens".into(),
    );
    o.insert(
        "swap_times".into(),
        "measured: copy start/end from the swap engine's events, on the run clock".into(),
    );
    for (key, value) in &info.notes {
        o.insert(key.clone(), value.clone());
    }
    manifest
}

/// The real runs' comparison table and, with --compare-sim, the simulated one and both side by
/// side.
fn print_tables(
    args: &RunArgs,
    plan: &RunPlan,
    info: &EngineInfo,
    results: &[PolicyResult],
    summaries: &[RunSummary],
) {
    print!(
        "{}",
        analysis::comparison_table(
            &format!(
                "REAL ENGINE ({} on {}): turn latency (ms) and its P99 decomposition, {} agents",
                info.backend, info.device, plan.agents
            ),
            summaries
        )
    );
    if args.compare_sim {
        let sims: Vec<RunSummary> = results
            .iter()
            .filter_map(|r| r.sim.as_ref().map(|(s, _)| s.clone()))
            .collect();
        print!(
            "{}",
            analysis::comparison_table(
                &format!(
                    "SIMULATED ({}), same pools and seed: turn latency (ms) and its P99 decomposition",
                    plan.base.profile.name
                ),
                &sims
            )
        );
        print!("{}", side_by_side(results, &plan.base.profile.name));
    }
}
