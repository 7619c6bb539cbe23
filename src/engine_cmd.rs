//! `djinn engine ...`: commands of the real engine.

use clap::{Args, Subcommand};

pub mod generate_cmd;

#[derive(Args)]
pub struct EngineArgs {
    #[command(subcommand)]
    pub command: EngineCommand,
}

#[derive(Subcommand)]
pub enum EngineCommand {
    /// Print the model presets and their KV footprint.
    Presets,
    /// Greedy continuation of a prompt with a GGUF model (e.g. SmolLM2-135M-Instruct).
    Generate(generate_cmd::GenerateArgs),
}

pub fn run(args: EngineArgs) -> anyhow::Result<()> {
    match args.command {
        EngineCommand::Generate(a) => generate_cmd::generate(a),
        EngineCommand::Presets => {
            for name in engine::config::ModelConfig::PRESET_NAMES {
                let config = engine::config::ModelConfig::preset(name).expect("listed preset exists");
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
