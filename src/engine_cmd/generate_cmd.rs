//! `djinn engine generate`: greedy continuation of a prompt with a GGUF model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use engine::batch::generate_greedy;
use engine::cpu::CpuModel;
use engine::tokenizer::{ChatMessage, Tokenizer};
use engine::weights::WeightSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GenerateBackend {
    /// The CPU reference forward (candle-core, f32).
    Cpu,
    /// The CUDA forward (fp16; needs a build with `--features cuda` and a GPU).
    Cuda,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// GGUF model file (llama architecture, byte-level BPE tokenizer), e.g. from
    /// engine/scripts/fetch_smollm2.sh.
    #[arg(long)]
    pub gguf: PathBuf,
    /// Prompt text; special tokens such as <|im_start|> written in it are honoured.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate (greedy); stops early at the end-of-sequence token.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    #[arg(long, value_enum, default_value_t = GenerateBackend::Cpu)]
    pub backend: GenerateBackend,
    /// Render the prompt as one user turn (after the --system message, if any) with the chat
    /// template the GGUF stores in `tokenizer.chat_template`, as HF transformers'
    /// apply_chat_template does (SmolLM2's adds its default system message when --system is not
    /// given). A GGUF without a template gets plain ChatML instead: `<|im_start|>`, the role, a
    /// newline, the text and `<|im_end|>` and a newline per message, then `<|im_start|>assistant`
    /// and a newline; no default system message.
    #[arg(long)]
    pub chat: bool,
    /// System message placed before the prompt (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// KV block size in tokens.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
}

/// The prompt as the model sees it: the text as given, or with `--chat` the conversation rendered
/// by the tokenizer's chat template.
pub fn prompt_text(args: &GenerateArgs, tokenizer: &Tokenizer) -> anyhow::Result<String> {
    if !args.chat {
        return Ok(args.prompt.clone());
    }
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", &args.prompt));
    Ok(tokenizer.apply_chat_template(&messages, true)?)
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(args.block_size > 0, "--block-size must be at least 1");
    let tokenizer = Tokenizer::from_gguf(&args.gguf).context("reading the tokenizer")?;
    let weights = WeightSet::from_gguf(&args.gguf).context("loading the weights")?;
    let prompt = prompt_text(&args, &tokenizer)?;
    let prompt_ids = tokenizer.encode(&prompt)?;
    anyhow::ensure!(!prompt_ids.is_empty(), "the prompt encodes to no tokens");
    let stop_tokens: Vec<u32> = tokenizer.eos_token_id.into_iter().collect();
    // The KV holds the prompt and every generated token but the last.
    let positions = weights.config.max_position_embeddings;
    let needed_tokens = prompt_ids
        .len()
        .checked_add(args.steps - 1)
        .filter(|tokens| *tokens <= positions)
        .with_context(|| {
            format!(
                "the prompt's {} tokens and --steps {} exceed the model's context of {positions} positions",
                prompt_ids.len(),
                args.steps
            )
        })?;
    let num_blocks = needed_tokens.div_ceil(args.block_size);
    println!(
        "model {} ({} layers, hidden {}, {} parameters) backend {:?}",
        weights.config.name,
        weights.config.num_hidden_layers,
        weights.config.hidden_size,
        weights.param_count(),
        args.backend
    );
    if args.chat {
        println!(
            "chat_template {}",
            tokenizer.effective_chat_template().origin()
        );
    }
    println!("prompt_tokens {} {:?}", prompt_ids.len(), prompt_ids);
    let started = Instant::now();
    let generated = match args.backend {
        GenerateBackend::Cpu => {
            let mut model = CpuModel::new(&weights, num_blocks, args.block_size)
                .with_context(|| format!("--block-size {}", args.block_size))?;
            generate_greedy(&mut model, &prompt_ids, args.steps, &stop_tokens)?
        }
        GenerateBackend::Cuda => super::gpu_cmd::generate_greedy_cuda(
            &weights,
            &prompt_ids,
            args.steps,
            &stop_tokens,
            args.block_size,
        )?,
    };
    let elapsed_s = started.elapsed().as_secs_f64();
    println!("generated_tokens {} {:?}", generated.len(), generated);
    println!(
        "wall_s {:.2} ({:.1} tokens/s including the prefill)",
        elapsed_s,
        generated.len() as f64 / elapsed_s
    );
    println!("---");
    println!("{}{}", prompt, tokenizer.decode(&generated)?);
    Ok(())
}
