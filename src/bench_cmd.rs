//! `djinn bench sim`: how fast the simulator runs (single thread, so the figure is per core).

use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sim::experiment::SimConfig;
use sim::PolicyKind;

use crate::runio::load_workload;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Simulator speed: agents-capacity with 10,000 agents (>= 10 turns each) and an open-loop
    /// stream of 10,000 Azure-conv-shaped requests at 8/s under vllm, on one thread.
    Sim(SimBenchArgs),
}

#[derive(Args, Debug)]
pub struct SimBenchArgs {
    /// Agents / requests per case.
    #[arg(long, default_value_t = 10_000)]
    pub agents: u32,
    /// Policies of the agents-capacity case (repeat the flag; default: djinn, swap, vllm). The step
    /// count, and so the wall time, depends on the policy's batches.
    #[arg(long = "policy")]
    pub policies: Vec<String>,
    /// Repetitions (the best wall time is reported, as usual for benchmarks).
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    #[command(flatten)]
    pub gpu: crate::runio::profile_args::ProfileArgs,
    /// Write the results as CSV to this file.
    #[arg(long)]
    pub csv: Option<std::path::PathBuf>,
}

#[derive(serde::Serialize)]
struct BenchRow {
    case: String,
    policy: String,
    agents: u32,
    turns: u64,
    wall_s_best: f64,
    sim_time_s: f64,
    steps: u64,
    events: u64,
    steps_per_s: f64,
    events_per_s: f64,
    target_wall_s: f64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Sim(a) => run_sim(a),
    }
}

fn run_sim(args: SimBenchArgs) -> Result<()> {
    // One thread: the targets are per core.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .context("building a 1-thread pool")?;
    let profile = args.gpu.resolve()?.profile;
    let names = if args.policies.is_empty() {
        vec!["djinn".to_string(), "swap".to_string(), "vllm".to_string()]
    } else {
        args.policies.clone()
    };
    let mut cases = Vec::new();
    for name in &names {
        cases.push(("agents-capacity", crate::runio::parse_policy(name)?, 2.0));
    }
    cases.push(("azure-conv-synth", PolicyKind::Vllm, 1.2));
    let mut rows = Vec::new();
    println!(
        "simulator speed, one thread, profile {} ({} repetitions, best shown)",
        profile.name, args.repeat
    );
    println!(
        "{:<18} {:<6} {:>7} {:>8} {:>8} {:>10} {:>9} {:>10} {:>12} {:>12} {:>8}",
        "case",
        "policy",
        "agents",
        "turns",
        "wall s",
        "sim s",
        "steps",
        "events",
        "steps/s",
        "events/s",
        "target"
    );
    for (name, policy, target) in cases {
        let spec = load_workload(name)?;
        crate::runio::profile_args::check_context(&profile, name, spec.max_context_tokens)?;
        let mut config = SimConfig::new(policy, profile.clone());
        config.seed = 0;
        let workload = sim::workload::generate(&spec, args.agents, 0);
        let min_turns = workload
            .agents
            .iter()
            .map(|a| a.turns.len())
            .min()
            .unwrap_or(0);
        let mut best = f64::INFINITY;
        let mut last = None;
        for _ in 0..args.repeat.max(1) {
            let started = Instant::now();
            let out = pool.install(|| sim::experiment::simulate_workload(&workload, &config))?;
            best = best.min(started.elapsed().as_secs_f64());
            last = Some(out);
        }
        let out = last.expect("at least one repetition");
        let steps = out.steps.len() as u64;
        let events = out.events_delivered;
        let row = BenchRow {
            case: name.into(),
            policy: policy.name().into(),
            agents: args.agents,
            turns: workload.turn_count(),
            wall_s_best: best,
            sim_time_s: out.end_time.as_secs_f64(),
            steps,
            events,
            steps_per_s: steps as f64 / best,
            events_per_s: events as f64 / best,
            target_wall_s: target,
        };
        println!(
            "{:<18} {:<6} {:>7} {:>8} {:>8.3} {:>10.1} {:>9} {:>10} {:>12.0} {:>12.0} {:>7.1}s {}",
            row.case,
            row.policy,
            row.agents,
            row.turns,
            row.wall_s_best,
            row.sim_time_s,
            row.steps,
            row.events,
            row.steps_per_s,
            row.events_per_s,
            target,
            if best <= target { "ok" } else { "MISSED" }
        );
        if name == "agents-capacity" {
            println!("  (every agent has >= {min_turns} turns)");
        }
        rows.push(row);
    }
    if let Some(path) = args.csv {
        traces::write_csv_atomic(&path, &rows)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
