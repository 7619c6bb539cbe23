//! `djinn`: the command-line front of the toolkit.
//!
//! Subcommands for the simulator live in this file's modules; the real engine's commands live in
//! `engine_cmd.rs` (owned by the engine work), so the two can grow without touching each other.

mod bench_cmd;
mod calibrate_cmd;
mod capacity_cmd;
mod engine_cmd;
mod plot_cmd;
mod profiles_cmd;
mod runio;
mod simulate_cmd;
mod sweep_cmd;
mod trace_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "djinn",
    version,
    about = "Scheduling research for many concurrent LLM agents on one GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate workloads under scheduling policies on a simulated GPU and compare them
    /// (the default: the original Djinn experiment, seed-exp1 then seed-cliff, 80 agents, four policies).
    Simulate(simulate_cmd::SimulateArgs),
    /// Benchmarks (simulator speed; the engine's live under `djinn engine`).
    Bench(bench_cmd::BenchArgs),
    /// Run a sweep spec (policies x workloads x agent counts x seeds x overrides) in parallel,
    /// resumable and shardable; `djinn sweep merge` joins shards.
    Sweep(sweep_cmd::SweepArgs),
    /// Per policy, the largest number of agents served within a latency SLO.
    Capacity(capacity_cmd::CapacityArgs),
    /// The real engine: correctness checks, generation and benchmarks (GPU parts need `--features cuda`).
    Engine(engine_cmd::EngineArgs),
    /// Real traces feed the simulator: fit a GPU profile to real runs, and validate profiles by
    /// re-simulating real runs.
    Calibrate(calibrate_cmd::CalibrateArgs),
    /// Export a run directory as a timeline (Chrome trace-event JSON) for https://ui.perfetto.dev.
    Trace(trace_cmd::TraceArgs),
    /// The shipped models, cards and profiles (for --model, --card, --profile) and the KV pool of
    /// each model on each card.
    Profiles(profiles_cmd::ProfilesArgs),
    /// Line plot (SVG) of a result CSV: e.g. P99 turn latency vs agents per policy (the cliff).
    Plot(plot_cmd::PlotArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Simulate(args)) => simulate_cmd::run(args).map(|_| ()),
        Some(Command::Bench(args)) => bench_cmd::run(args),
        Some(Command::Sweep(args)) => sweep_cmd::run(args),
        Some(Command::Capacity(args)) => capacity_cmd::run(args),
        Some(Command::Engine(args)) => engine_cmd::run(args),
        Some(Command::Calibrate(args)) => calibrate_cmd::run(args),
        Some(Command::Trace(args)) => trace_cmd::run(args),
        Some(Command::Plot(args)) => plot_cmd::run(args),
        Some(Command::Profiles(args)) => profiles_cmd::run(args),
        None => simulate_cmd::run(simulate_cmd::SimulateArgs::default()).map(|_| ()),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
}
