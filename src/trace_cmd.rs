//! `djinn trace`: a run directory (simulated or real) as a timeline for Perfetto / chrome://tracing.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use traces::{RunManifest, StepRecord, SwapRecord, TurnRecord};

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// A run directory (manifest.json, turns.csv, steps.csv, swaps.csv), as `djinn simulate
    /// --out`, `djinn sweep` with run directories, or `djinn engine run` write them.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Output file (default: RUN_DIR/trace.json).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Agent tracks for agents 0..N only (the engine's steps and swaps are always all there).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub agents: u32,
}

pub fn run(args: TraceArgs) -> Result<()> {
    let dir = &args.run_dir;
    if !dir.join("manifest.json").is_file() {
        bail!("{}: not a run directory (no manifest.json)", dir.display());
    }
    let manifest: RunManifest = traces::read_json(&dir.join("manifest.json"))?;
    let turns: Vec<TurnRecord> = traces::read_csv(&dir.join("turns.csv"))?;
    let steps: Vec<StepRecord> = traces::read_csv(&dir.join("steps.csv"))?;
    let swaps: Vec<SwapRecord> = crate::runio::read_swaps(dir)?;
    let options = analysis::timeline::TimelineOptions {
        max_agents: args.agents,
    };
    let trace = analysis::timeline::chrome_trace(&manifest, &turns, &steps, &swaps, &options);
    let out = args.out.clone().unwrap_or_else(|| dir.join("trace.json"));
    traces::write_json_atomic(&out, &trace)?;
    println!(
        "wrote {} ({} events: {} steps, {} swaps, {} agent tracks); open it in https://ui.perfetto.dev or chrome://tracing",
        out.display(),
        trace.trace_events.len(),
        steps.len(),
        swaps.len(),
        trace.other_data["agents_shown"]
    );
    Ok(())
}
