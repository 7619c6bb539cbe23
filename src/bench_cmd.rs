//! `djinn bench sim`: how fast the simulator runs (single thread, so the figure is per core).

use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sim::driver::Recording;
use sim::experiment::SimConfig;
use sim::workload::Programs;
use sim::PolicyKind;
use traces::GpuProfile;

use crate::runio::load_workload;
use crate::runio::profile_args::ProfileArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Simulator speed on one thread: agents-capacity with 10,000 agents (>= 10 turns each), an
    /// open-loop stream of 10,000 Azure-conv-shaped requests at 8/s under vllm, coding-agent with
    /// 1,000 agents at real token counts on llama3.1-8b, and agents-capacity with 1,000,000 agents
    /// (time and peak memory). Runs keep summary counts only and audit the KV mechanism as
    /// `djinn simulate` does (incremental checks every step, full audits amortised).
    Sim(SimBenchArgs),
}

#[derive(Args, Debug)]
pub struct SimBenchArgs {
    /// Agents / requests of the agents-capacity and Azure cases.
    #[arg(long, default_value_t = 10_000)]
    pub agents: u32,
    /// Agents of the coding-agent case (on --model llama3.1-8b and --card, h100-sxm by default;
    /// 0 skips it).
    #[arg(long, default_value_t = 1_000)]
    pub coding_agents: u32,
    /// Agents of the large agents-capacity case, run once under the first policy, its peak
    /// memory measured (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub large_agents: u32,
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
    /// CPU time of the simulating thread in the best repetition (on a shared machine the wall
    /// time includes waiting for a core); empty where the system does not say.
    cpu_s_best: Option<f64>,
    sim_time_s: f64,
    steps: u64,
    events: u64,
    steps_per_s: f64,
    events_per_s: f64,
    target_wall_s: f64,
    /// Peak resident memory of the process during the case (workload included); empty where
    /// the system does not say.
    peak_rss_mb: Option<f64>,
    target_rss_mb: Option<f64>,
}

/// One benchmark case.
struct Case {
    workload: &'static str,
    policy: PolicyKind,
    agents: u32,
    profile: GpuProfile,
    repeat: u32,
    target_s: f64,
    target_mb: Option<f64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Sim(a) => run_sim(a),
    }
}

fn cases(args: &SimBenchArgs) -> Result<Vec<Case>> {
    let profile = args.gpu.resolve()?.profile;
    let names = if args.policies.is_empty() {
        vec!["djinn".to_string(), "swap".to_string(), "vllm".to_string()]
    } else {
        args.policies.clone()
    };
    let policies = names
        .iter()
        .map(|n| crate::runio::parse_policy(n))
        .collect::<Result<Vec<_>>>()?;
    let repeat = args.repeat.max(1);
    let case = |workload, policy, agents, profile: &GpuProfile, target_s| Case {
        workload,
        policy,
        agents,
        profile: profile.clone(),
        repeat,
        target_s,
        target_mb: None,
    };
    let mut cases = Vec::new();
    for &policy in &policies {
        cases.push(case("agents-capacity", policy, args.agents, &profile, 2.0));
    }
    cases.push(case(
        "azure-conv-synth",
        PolicyKind::Vllm,
        args.agents,
        &profile,
        1.2,
    ));
    if args.coding_agents > 0 {
        let long = ProfileArgs {
            profile: None,
            model: Some("llama3.1-8b".into()),
            card: args.gpu.card.clone(),
        }
        .resolve()?
        .profile;
        cases.push(case(
            "coding-agent",
            policies[0],
            args.coding_agents,
            &long,
            10.0,
        ));
    }
    // The large case last: the peak-memory mark is reset before each case, and memory the
    // allocator keeps after the large case would inflate the small ones.
    if args.large_agents > 0 {
        cases.push(Case {
            repeat: 1,
            target_mb: Some(1000.0),
            ..case(
                "agents-capacity",
                policies[0],
                args.large_agents,
                &profile,
                60.0,
            )
        });
    }
    Ok(cases)
}

fn run_sim(args: SimBenchArgs) -> Result<()> {
    // One thread: the targets are per core.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .context("building a 1-thread pool")?;
    let cases = cases(&args)?;
    let mut rows = Vec::new();
    println!(
        "simulator speed, one thread, profile {} ({} repetitions, best shown; summary recording, \
         incremental checks every step, full audits amortised; targets judged on the thread's \
         CPU time where known, else on wall time)",
        cases[0].profile.name, args.repeat
    );
    println!(
        "{:<18} {:<6} {:>7} {:>9} {:>8} {:>8} {:>10} {:>9} {:>10} {:>10} {:>10} {:>7} {:>8}",
        "case",
        "policy",
        "agents",
        "turns",
        "wall s",
        "cpu s",
        "sim s",
        "steps",
        "events",
        "steps/s",
        "events/s",
        "target",
        "peak MB"
    );
    for case in cases {
        let memory_tracked = reset_peak_rss();
        let row = run_case(&case, &pool)?;
        let peak_mb = if memory_tracked { peak_rss_mb() } else { None };
        let row = BenchRow {
            peak_rss_mb: peak_mb,
            ..row
        };
        let time_ok = row.cpu_s_best.unwrap_or(row.wall_s_best) <= case.target_s;
        let memory_ok = match (case.target_mb, peak_mb) {
            (Some(t), Some(m)) => m <= t,
            (Some(_), None) => false,
            (None, _) => true,
        };
        println!(
            "{:<18} {:<6} {:>7} {:>9} {:>8.3} {:>8} {:>10.1} {:>9} {:>10} {:>10.0} {:>10.0} {:>6.1}s {:>8} {}",
            row.case,
            row.policy,
            row.agents,
            row.turns,
            row.wall_s_best,
            row.cpu_s_best.map_or("-".to_string(), |c| format!("{c:.3}")),
            row.sim_time_s,
            row.steps,
            row.events,
            row.steps_per_s,
            row.events_per_s,
            case.target_s,
            peak_mb.map_or("-".to_string(), |m| format!("{m:.0}")),
            if time_ok && memory_ok { "ok" } else { "MISSED" }
        );
        if let Some(t) = case.target_mb {
            println!(
                "  (profile {}; memory target {t:.0} MB{})",
                case.profile.name,
                if memory_tracked {
                    ""
                } else {
                    ", not measurable here"
                }
            );
        } else if case.workload == "coding-agent" {
            println!("  (profile {})", case.profile.name);
        }
        rows.push(row);
    }
    if let Some(path) = args.csv {
        traces::write_csv_atomic(&path, &rows)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn run_case(case: &Case, pool: &rayon::ThreadPool) -> Result<BenchRow> {
    let spec = load_workload(case.workload)?;
    crate::runio::profile_args::check_context(
        &case.profile,
        case.workload,
        spec.max_context_tokens,
    )?;
    let mut config = SimConfig::new(case.policy, case.profile.clone());
    config.seed = 0;
    config.recording = Recording::Counts;
    // Compact programs: a million agents' turns in a `Workload` took 690 MB of the 1 GB target.
    let workload = sim::workload::generate_compact(&spec, case.agents, 0);
    let mut best = f64::INFINITY;
    let mut best_cpu = None;
    let mut last = None;
    for _ in 0..case.repeat {
        let started = Instant::now();
        let (out, cpu) = pool.install(|| {
            let cpu_before = thread_cpu_s();
            let out = sim::experiment::simulate_workload(&workload, &config);
            (out, thread_cpu_s().zip(cpu_before).map(|(a, b)| a - b))
        });
        let out = out?;
        let wall = started.elapsed().as_secs_f64();
        if wall < best {
            best = wall;
            best_cpu = cpu;
        }
        last = Some(out);
    }
    let out = last.expect("at least one repetition");
    Ok(BenchRow {
        case: case.workload.into(),
        policy: case.policy.name().into(),
        agents: case.agents,
        turns: workload.total_turns(),
        wall_s_best: best,
        cpu_s_best: best_cpu,
        sim_time_s: out.end_time.as_secs_f64(),
        steps: out.steps_run,
        events: out.events_delivered,
        steps_per_s: out.steps_run as f64 / best,
        events_per_s: out.events_delivered as f64 / best,
        target_wall_s: case.target_s,
        peak_rss_mb: None,
        target_rss_mb: case.target_mb,
    })
}

/// CPU time of the calling thread so far, in seconds (Linux scheduler statistics, ns).
fn thread_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// Resets the kernel's peak-RSS mark of this process (Linux); false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident memory of this process since the last reset, in MB of 10^6 bytes (Linux).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0 / 1e6)
}
