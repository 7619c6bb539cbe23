//! `djinn engine swap-bench` and `djinn engine swap-check`: the GPU swap engine's benchmark and
//! correctness checks (engine::probe::swap). Built without `--features cuda`, they exit with an
//! error saying so.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// Which decode step the slowdown measurement times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecodeArg {
    /// The CUDA engine's decode step (random weights of --model).
    Engine,
    /// A kernel reading as many bytes as that step (a stand-in).
    Synthetic,
    /// Both, synthetic first.
    Both,
    /// No decode measurement.
    None,
}

/// Arm sets of the interference probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ArmSetArg {
    /// Each swap direction alone, SM writers/readers, raw and staged DMA.
    Probe,
    /// One write rate smoothly and in 1 or 16 MiB bursts; large device->device copies.
    Burst,
    /// Each direction alone, both, swap-in capped at 40/30/20 GB/s (engine victim only).
    Operating,
    /// The same with swap-in caps 40/37/34/30/25/20 GB/s (engine victim only).
    OperatingFine,
    /// Both at full speed, swap-in capped at 36/34/32 GB/s (engine victim only).
    Crossing,
}

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
    /// Decode load for the slowdown measurement.
    #[arg(long, value_enum, default_value_t = DecodeArg::Both)]
    pub decode: DecodeArg,
    /// Sequences in the timed decode step.
    #[arg(long, default_value_t = 32)]
    pub decode_batch: usize,
    /// Context of each sequence of the timed decode step, tokens.
    #[arg(long, default_value_t = 2048)]
    pub decode_context: usize,
    /// Timed decode steps per phase (two quiet and two swapping phases).
    #[arg(long, default_value_t = 20)]
    pub decode_steps: usize,
    /// Per-direction rate caps (GB/s) of the paced arms of the engine decode measurement,
    /// comma-separated; given without values, no paced arms.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = [50.0, 46.0, 43.0, 40.0])]
    pub decode_rate_caps_gbps: Vec<f64>,
    /// Directory for swap_bench.json, swap_bench.txt and swaps.csv.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Seed of the scattered block ids and of the engine's random weights and KV.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run the interference probe instead of the transfer sections and the usual decode rows:
    /// each victim (synthetic reader, engine decode step) beside SM-kernel writers/readers, raw
    /// and staged DMA, and the swap engine at several operating points, this many rounds.
    #[arg(long, default_value_t = 0)]
    pub interference_rounds: usize,
    /// Arm sets of the interference probe, comma-separated (the synthetic victim skips the
    /// engine-only sets).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ArmSetArg::Probe, ArmSetArg::Operating])]
    pub interference_sets: Vec<ArmSetArg>,
    /// Measure per-layer readiness instead (swap-in of an --agent-context context and a 512-token
    /// prefill on it, gated per layer vs after the swap), this many repetitions; use with
    /// --decode engine (the transfer sections are skipped).
    #[arg(long, default_value_t = 0)]
    pub layered_readiness_reps: usize,
}

#[derive(Args)]
pub struct SwapCheckArgs {
    /// Also write the outcomes with their provenance (command line, git commit, card, driver)
    /// to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

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
    use engine::probe::swap::bench::{
        format_row, run, ArmSet, DecodeLoad, SwapBenchOptions, SwapBenchReport,
    };
    use engine::probe::swap::Invocation;
    use std::path::Path;

    /// The command line and the git commit this binary was built from (build.rs).
    fn invocation() -> Invocation {
        Invocation {
            command_line: std::env::args().collect(),
            git_commit: option_env!("DJINN_GIT_COMMIT")
                .unwrap_or("unknown")
                .to_string(),
        }
    }

    /// Writes `text` to `path` through a temporary file in the same directory, so a failed
    /// write never leaves a half-written result.
    fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    fn options_of(args: &SwapBenchArgs) -> SwapBenchOptions {
        SwapBenchOptions {
            model: args.model.clone(),
            block_size_tokens: 16,
            agents_per_direction: args.agents,
            agent_context_tokens: args.agent_context,
            reps: args.reps,
            decode_load: match args.decode {
                DecodeArg::Engine => DecodeLoad::Engine,
                DecodeArg::Synthetic => DecodeLoad::Synthetic,
                DecodeArg::Both => DecodeLoad::Both,
                DecodeArg::None => DecodeLoad::None,
            },
            decode_batch: args.decode_batch,
            decode_context_tokens: args.decode_context,
            decode_steps: args.decode_steps,
            seed: args.seed,
            decode_rate_caps_gbps: args.decode_rate_caps_gbps.clone(),
            interference_rounds: args.interference_rounds,
            interference_sets: args
                .interference_sets
                .iter()
                .map(|set| match set {
                    ArmSetArg::Probe => ArmSet::Probe,
                    ArmSetArg::Burst => ArmSet::Burst,
                    ArmSetArg::Operating => ArmSet::Operating,
                    ArmSetArg::OperatingFine => ArmSet::OperatingFine,
                    ArmSetArg::Crossing => ArmSet::Crossing,
                })
                .collect(),
            layered_reps: args.layered_readiness_reps,
        }
    }

    fn swaps_csv(report: &SwapBenchReport) -> String {
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
        csv
    }

    pub fn swap_bench(args: SwapBenchArgs) -> anyhow::Result<()> {
        let options = options_of(&args);
        println!("swap-bench options: {}", serde_json::to_string(&options)?);
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        let mut text = String::new();
        let report = run(&options, invocation(), |row| {
            let line = format_row(row);
            println!("{line}");
            text.push_str(&line);
            text.push('\n');
        })?;
        let provenance = &report.provenance;
        text.push_str(&format!(
            "device: {} (driver {}, CUDA {}); commit {}; command: {}\n",
            provenance.device,
            provenance.driver_version,
            provenance.cuda_driver_api,
            provenance.git_commit,
            provenance.command_line.join(" ")
        ));
        let text_path = args.out.join("swap_bench.txt");
        write_atomically(&text_path, &text)?;
        let json_path = args.out.join("swap_bench.json");
        let mut summary = report.clone();
        summary.swap_records.clear();
        write_atomically(&json_path, &serde_json::to_string_pretty(&summary)?)?;
        let csv_path = args.out.join("swaps.csv");
        write_atomically(&csv_path, &swaps_csv(&report))?;
        println!(
            "wrote {}, {}, {}",
            text_path.display(),
            json_path.display(),
            csv_path.display()
        );
        Ok(())
    }

    pub fn swap_check(args: SwapCheckArgs) -> anyhow::Result<()> {
        let device = engine::probe::swap::check::open_gpu()
            .map_err(|why| anyhow::anyhow!("no GPU for the swap checks: {why}"))?;
        println!("device: {}", device.name);
        let report = engine::probe::swap::check::run_all_with_provenance(device, invocation())?;
        for o in &report.outcomes {
            println!(
                "{} {} ({})",
                if o.passed { "PASS" } else { "FAIL" },
                o.name,
                o.detail
            );
        }
        if let Some(path) = &args.json {
            write_atomically(path, &serde_json::to_string_pretty(&report)?)?;
            println!("wrote {}", path.display());
        }
        anyhow::ensure!(
            report.failed == 0,
            "{} of {} swap checks failed",
            report.failed,
            report.outcomes.len()
        );
        println!("all {} swap checks passed", report.outcomes.len());
        Ok(())
    }
}
