//! `djinn engine swap-bench` and `djinn engine swap-check`: the GPU swap engine's benchmark and
//! correctness checks. Built without `--features cuda`, they exit with an error saying so.

use std::path::PathBuf;

use clap::Args;

#[derive(Args)]
pub struct SwapBenchArgs {
    /// Model preset whose KV block size is used (llama2-7b fp16: 8 MiB per 16-token block).
    #[arg(long, default_value = "llama2-7b")]
    pub model: String,
    /// Agents swapping in each direction at once.
    #[arg(long, default_value_t = 8)]
    pub agents: usize,
    /// Context of each of those agents, tokens.
    #[arg(long, default_value_t = 2048)]
    pub agent_context: usize,
    /// Timed repetitions of each transfer measurement (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Decode load for the slowdown measurement: engine, synthetic, both or none.
    #[arg(long, default_value = "both")]
    pub decode: String,
    #[arg(long, default_value_t = 32)]
    pub decode_batch: usize,
    #[arg(long, default_value_t = 2048)]
    pub decode_context: usize,
    /// Timed decode steps per phase (two quiet and two swapping phases).
    #[arg(long, default_value_t = 20)]
    pub decode_steps: usize,
    /// Directory for swap_bench.json, swap_bench.txt and swaps.csv.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the transfer sections; time the engine's decode step (no token read-back) while
    /// swapping with CUDA graphs on/off and copies ordered after the compute stream or not.
    #[arg(long)]
    pub diagnose_engine: bool,
    /// Run the interference probe instead of the transfer sections and the usual decode rows:
    /// each victim (synthetic reader, engine decode step) beside SM-kernel writers/readers, raw
    /// and staged DMA, and the swap engine at several operating points, this many rounds.
    #[arg(long, default_value_t = 0)]
    pub interference_rounds: usize,
    /// Arm sets of the interference probe, comma-separated: probe, burst, operating,
    /// operating-fine, crossing (the synthetic victim skips the operating and crossing sets).
    #[arg(long, default_value = "probe,operating", value_delimiter = ',')]
    pub interference_sets: Vec<String>,
    /// Measure per-layer readiness instead (swap-in of an --agent-context context and a 512-token
    /// prefill on it, gated per layer vs after the swap), this many repetitions; needs --decode
    /// engine (skips the other sections).
    #[arg(long, default_value_t = 0)]
    pub layered_readiness_reps: usize,
}

#[derive(Args)]
pub struct SwapCheckArgs {}

#[cfg(not(feature = "cuda"))]
pub fn swap_bench(_args: SwapBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("this djinn was built without the CUDA backend; rebuild with `cargo build --release --features cuda`")
}

#[cfg(not(feature = "cuda"))]
pub fn swap_check(_args: SwapCheckArgs) -> anyhow::Result<()> {
    anyhow::bail!("this djinn was built without the CUDA backend; rebuild with `cargo build --release --features cuda`")
}

#[cfg(feature = "cuda")]
pub use with_cuda::{swap_bench, swap_check};

#[cfg(feature = "cuda")]
mod with_cuda {
    use super::*;
    use anyhow::Context;
    use engine::swap::bench::{format_row, run, DecodeLoad, SwapBenchOptions};
    use std::io::Write;

    pub fn swap_bench(args: SwapBenchArgs) -> anyhow::Result<()> {
        let decode_load = match args.decode.as_str() {
            "engine" => DecodeLoad::Engine,
            "synthetic" => DecodeLoad::Synthetic,
            "both" => DecodeLoad::Both,
            "none" => DecodeLoad::None,
            other => anyhow::bail!("--decode {other}: expected engine, synthetic, both or none"),
        };
        let options = SwapBenchOptions {
            model: args.model,
            block_size_tokens: 16,
            agents_per_direction: args.agents,
            agent_context_tokens: args.agent_context,
            reps: args.reps,
            decode_load,
            decode_batch: args.decode_batch,
            decode_context_tokens: args.decode_context,
            decode_steps: args.decode_steps,
            seed: args.seed,
            diagnose_engine: args.diagnose_engine,
            interference_rounds: args.interference_rounds,
            interference_sets: args.interference_sets,
            layered_reps: args.layered_readiness_reps,
        };
        println!("swap-bench options: {}", serde_json::to_string(&options)?);
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        let text_path = args.out.join("swap_bench.txt");
        let mut text = std::fs::File::create(&text_path)
            .with_context(|| format!("creating {}", text_path.display()))?;
        let report = run(&options, |row| {
            let line = format_row(row);
            println!("{line}");
            let _ = writeln!(text, "{line}");
        })?;
        writeln!(
            text,
            "device: {} (driver {})",
            report.device, report.driver_version
        )?;
        let json_path = args.out.join("swap_bench.json");
        let mut summary = report.clone();
        summary.swap_records.clear();
        std::fs::write(&json_path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
        let csv_path = args.out.join("swaps.csv");
        let mut csv = String::from("swap_id,agent_id,direction,block_count,bytes,start_ns,end_ns,concurrent_swaps_at_start\n");
        for r in &report.swap_records {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                r.swap_id,
                r.agent_id,
                r.direction.as_str(),
                r.block_count,
                r.bytes,
                r.start_ns,
                r.end_ns,
                r.concurrent_swaps_at_start
            ));
        }
        std::fs::write(&csv_path, csv)
            .with_context(|| format!("writing {}", csv_path.display()))?;
        println!(
            "wrote {}, {}, {}",
            text_path.display(),
            json_path.display(),
            csv_path.display()
        );
        Ok(())
    }

    pub fn swap_check(_args: SwapCheckArgs) -> anyhow::Result<()> {
        let device = engine::swap::check::open_gpu()
            .map_err(|why| anyhow::anyhow!("no GPU for the swap checks: {why}"))?;
        println!("device: {}", device.name);
        let outcomes = engine::swap::check::run_all(device)?;
        let failed = outcomes.iter().filter(|o| !o.passed).count();
        for o in &outcomes {
            println!(
                "{} {} ({})",
                if o.passed { "PASS" } else { "FAIL" },
                o.name,
                o.detail
            );
        }
        anyhow::ensure!(
            failed == 0,
            "{failed} of {} swap checks failed",
            outcomes.len()
        );
        println!("all {} swap checks passed", outcomes.len());
        Ok(())
    }
}
