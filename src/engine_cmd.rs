//! `djinn engine ...`: commands of the real engine.

use clap::{Args, Subcommand};

pub mod generate_cmd;
pub mod gpu_cmd;
pub mod run_cmd;
pub mod swap_cmd;
pub mod tuning_args;

#[derive(Args)]
pub struct EngineArgs {
    #[command(subcommand)]
    pub command: EngineCommand,
}

#[derive(Subcommand)]
pub enum EngineCommand {
    /// Run a workload through the simulator's run loop on the real engine (wall clock), write the
    /// run directories like `djinn simulate`, optionally beside the simulated run (--compare-sim).
    Run(run_cmd::RunArgs),
    /// Print the model presets and their KV footprint.
    Presets,
    /// Greedy continuation of a prompt with a GGUF model (e.g. SmolLM2-135M-Instruct).
    Generate(generate_cmd::GenerateArgs),
    /// Benchmark the CUDA forward (llama2-7b fp16 by default): decode steps and prefills, each beside its floor.
    Bench(gpu_cmd::BenchArgs),
    /// GPU correctness checks of the CUDA forward.
    Check(gpu_cmd::CheckArgs),
    /// Search cuBLASLt configurations for the prefill GEMMs (timed hot, at the power cap) and write
    /// the table the engine reads at start-up (engine/data/gemm_configs.tsv).
    GemmSearch(gpu_cmd::GemmSearchArgs),
    /// Benchmark the GPU KV swap engine (pinned host pool, copy streams), each figure beside the measured PCIe floor.
    SwapBench(swap_cmd::SwapBenchArgs),
    /// GPU correctness checks of the swap engine (bit-exact round trips, busy blocks, logits after swap).
    SwapCheck(swap_cmd::SwapCheckArgs),
}

pub fn run(args: EngineArgs) -> anyhow::Result<()> {
    match args.command {
        EngineCommand::Run(a) => run_cmd::run(a),
        EngineCommand::Generate(a) => generate_cmd::generate(a),
        EngineCommand::Bench(a) => gpu_cmd::bench(a),
        EngineCommand::Check(a) => gpu_cmd::check(a),
        EngineCommand::GemmSearch(a) => gpu_cmd::gemm_search(a),
        EngineCommand::SwapBench(a) => swap_cmd::swap_bench(a),
        EngineCommand::SwapCheck(a) => swap_cmd::swap_check(a),
        EngineCommand::Presets => {
            for name in engine::config::ModelConfig::PRESET_NAMES {
                let config =
                    engine::config::ModelConfig::preset(name).expect("listed preset exists");
                println!(
                    "{name}: layers {} hidden {} heads {}/{} kv_bytes_per_token_fp16 {}",
                    config.num_hidden_layers,
                    config.hidden_size,
                    config.num_attention_heads,
                    config.num_key_value_heads,
                    config.kv_bytes_per_token(engine::config::DType::F16)
                );
            }
            Ok(())
        }
    }
}
