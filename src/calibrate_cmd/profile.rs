//! `djinn calibrate profile`: runs the profiling grid (engine::probe::grid) on the CUDA engine or
//! the CPU one and writes its folder: steps.csv and swaps.csv (the records of real runs) and
//! grid.json (card, driver, model, engine commit, shapes, what was skipped and why).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::config::ModelConfig;
use engine::probe::grid::{plan_grid, GridLimits, GridPlan, GridRecords};
use traces::{GpuProfile, GridManifest, StepShape};

use crate::runio::outdir::check_new_folder;

#[derive(Args, Debug)]
pub struct GridArgs {
    /// Engine model preset to profile: llama2-7b, llama3.1-8b, qwen2.5-7b, smollm2-135m, or a
    /// tiny test preset (tiny, tiny-gqa, ...) on the CPU backend. Weights are seeded random
    /// (step time does not depend on their values).
    #[arg(long, default_value = "llama2-7b")]
    pub model: String,
    /// Engine to time: `cuda` (the GPU) or `cpu` (the candle reference forward; tiny models).
    #[arg(long, default_value = "cuda", value_parser = ["cuda", "cpu"])]
    pub backend: String,
    /// Card whose analytic profile predicts step times for planning (scaled to the engine by a
    /// probe step): h100-sxm, h200, ... or a card TOML.
    #[arg(long, default_value = "h100-sxm", value_name = "NAME|PATH")]
    pub card: String,
    /// Seconds the grid may take (planned from predicted step times; shapes beyond it are
    /// skipped and listed in grid.json).
    #[arg(long, default_value_t = 300.0)]
    pub budget_s: f64,
    /// Timed repetitions per shape (fewer when the budget is short, at least 3).
    #[arg(long, default_value_t = 7)]
    pub reps: u32,
    /// Untimed repetitions before them (graph capture, algorithm selection, caches).
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
    /// KV blocks of the device pool (CPU default 4096; CUDA default: what the card leaves).
    #[arg(long)]
    pub gpu_kv_blocks: Option<u32>,
    /// KV blocks of the host pool the copies use.
    #[arg(long, default_value_t = 2048)]
    pub host_kv_blocks: u32,
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// Largest step (tokens) and decode batch the engine is built for.
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: u32,
    #[arg(long, default_value_t = 256)]
    pub max_batch_sequences: u32,
    /// Results folder (steps.csv, swaps.csv, grid.json); refused if it exists unless --overwrite.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
}

/// What an engine built for the grid tells the planner and the manifest.
pub struct EngineFacts {
    pub device: String,
    pub driver: String,
    pub pool_blocks: u32,
    pub host_blocks: u32,
    /// Bytes of one KV block (what a copy of a block moves).
    pub block_bytes: u64,
}

fn check(args: &GridArgs) -> Result<ModelConfig> {
    if !(args.budget_s.is_finite() && args.budget_s > 0.0 && args.budget_s <= 86_400.0) {
        bail!("--budget-s must be in (0, 86400], got {}", args.budget_s);
    }
    if args.reps == 0 || args.reps > 1000 || args.warmup > 100 {
        bail!("--reps must be in 1..=1000 and --warmup in 0..=100");
    }
    if args.block_size == 0 || args.block_size > 256 {
        bail!("--block-size must be in 1..=256, got {}", args.block_size);
    }
    if args.host_kv_blocks == 0 || args.gpu_kv_blocks == Some(0) {
        bail!("--host-kv-blocks and --gpu-kv-blocks must be at least 1");
    }
    if args.max_batch_tokens == 0 || args.max_batch_sequences == 0 {
        bail!("--max-batch-tokens and --max-batch-sequences must be at least 1");
    }
    ModelConfig::preset(&args.model).with_context(|| {
        format!(
            "--model: unknown preset `{}` (known: {})",
            args.model,
            ModelConfig::PRESET_NAMES.join(", ")
        )
    })
}

/// An analytic predictor for any engine preset: the card's derived profile for a shipped model,
/// else the card's rates with this model's sizes (2 FLOPs per weight per token, fp16).
pub fn predictor(config: &ModelConfig, card: &str) -> Result<GpuProfile> {
    fn choice<'a>(model: &'a str, card: &'a str) -> calibration::ProfileChoice<'a> {
        calibration::ProfileChoice {
            profile: None,
            model: Some(model),
            card: Some(card),
        }
    }
    if let Ok(p) = calibration::resolve_profile(choice(&config.name, card)) {
        return Ok(p);
    }
    let mut p = calibration::resolve_profile(choice(calibration::catalog::DEFAULT_MODEL, card))
        .map_err(|(_, e)| anyhow::anyhow!("--card: {e}"))?;
    let hd = config.head_dim();
    let per_layer =
        config.hidden_size * (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
            + config.hidden_size * config.num_attention_heads * hd
            + 3 * config.hidden_size * config.intermediate_size;
    let params = per_layer * config.num_hidden_layers + 2 * config.vocab_size * config.hidden_size;
    p.weight_bytes = 2 * params as u64;
    p.kv_bytes_per_token = config.kv_bytes_per_token(engine::config::DType::F16) as u64;
    p.max_context_tokens = config.max_position_embeddings as u32;
    p.cost.flops_per_token = 2.0 * params as f64;
    p.cost.attention_flops_per_pair =
        4.0 * (config.num_attention_heads * hd * config.num_hidden_layers) as f64;
    Ok(p)
}

/// The grid's plan for an engine whose decode-only steps run `scale[0]` times the predictor's
/// time and steps with a prefill `scale[1]` times.
pub fn plan_for(
    args: &GridArgs,
    config: &ModelConfig,
    facts: &EngineFacts,
    predict: &GpuProfile,
    scale: [f64; 2],
) -> GridPlan {
    let limits = GridLimits {
        max_context: config.max_position_embeddings as u32,
        kv_capacity_tokens: facts.pool_blocks as u64 * args.block_size as u64,
        host_capacity_tokens: facts.host_blocks as u64 * args.block_size as u64,
        max_step_tokens: args.max_batch_tokens,
        max_batch: args.max_batch_sequences,
        warmup: args.warmup,
        reps: args.reps,
        budget_s: args.budget_s,
        copy_ns_per_token: [&predict.host_to_device, &predict.device_to_host].map(|ch| {
            facts.block_bytes as f64 / args.block_size as f64 / ch.bandwidth_bytes_per_s * 1e9
        }),
    };
    plan_grid(&limits, &|s: &StepShape| {
        predict.step_ns(s)
            * if s.prefill_tokens > 0.0 {
                scale[1]
            } else {
                scale[0]
            }
    })
}

/// A plain progress line on stderr, rewritten in place.
pub fn progress_line(started: Instant) -> impl FnMut(usize, usize, &str) {
    move |done, total, label| {
        eprint!(
            "\r[{done:>4}/{total}] {:>6.1} s  {:<70}",
            started.elapsed().as_secs_f64(),
            label.chars().take(70).collect::<String>()
        );
        if done == total {
            eprintln!();
        }
    }
}

pub fn run_profile(args: GridArgs) -> Result<()> {
    let config = check(&args)?;
    check_new_folder(&args.out, args.overwrite)?;
    let predict = predictor(&config, &args.card)?;
    let started = Instant::now();
    let (facts, plan, records) = match args.backend.as_str() {
        "cpu" => super::profile_engines::run_cpu(&args, &config, &predict)?,
        _ => super::profile_engines::run_cuda(&args, &config, &predict)?,
    };
    let elapsed_s = started.elapsed().as_secs_f64();
    write_grid(&args, &facts, &plan, &records, elapsed_s)
}

fn write_grid(
    args: &GridArgs,
    facts: &EngineFacts,
    plan: &GridPlan,
    records: &GridRecords,
    elapsed_s: f64,
) -> Result<()> {
    use engine::probe::grid::StepSpec;
    let count = |f: &dyn Fn(&engine::probe::grid::GridShape) -> bool| {
        plan.shapes.iter().filter(|s| f(s)).count() as u32
    };
    let quiet =
        |s: &engine::probe::grid::GridShape| s.swap_in_tokens == 0 && s.swap_out_tokens == 0;
    let manifest = GridManifest {
        schema_version: traces::SCHEMA_VERSION,
        tool: "djinn calibrate profile".into(),
        backend: args.backend.clone(),
        device: facts.device.clone(),
        driver: facts.driver.clone(),
        model: args.model.clone(),
        engine_commit: crate::runio::code_version(),
        decode_shapes: count(&|s| quiet(s) && matches!(s.step, StepSpec::Decode { .. })),
        prefill_shapes: count(&|s| quiet(s) && matches!(s.step, StepSpec::Prefill { .. })),
        mixed_shapes: count(&|s| quiet(s) && matches!(s.step, StepSpec::Mixed { .. })),
        swap_shapes: count(&|s| !quiet(s)),
        skipped: plan
            .skipped
            .iter()
            .chain(&records.skipped)
            .cloned()
            .collect(),
        warmup_reps: plan.warmup,
        reps: plan.reps,
        budget_s: args.budget_s,
        elapsed_s: (elapsed_s * 10.0).round() / 10.0,
        reproduce: std::env::args().collect::<Vec<_>>().join(" "),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    // With a header even when empty (a grid that ran no copy), as a run directory's files.
    for (name, bytes) in [
        (
            "steps.csv",
            traces::io::csv_bytes_with_header(&records.steps),
        ),
        (
            "swaps.csv",
            traces::io::csv_bytes_with_header(&records.swaps),
        ),
    ] {
        let bytes = bytes.with_context(|| format!("formatting {name}"))?;
        traces::write_atomic(&args.out.join(name), &bytes)?;
    }
    traces::write_json_atomic(&args.out.join("grid.json"), &manifest)?;
    println!(
        "grid: {} shapes ({} steps, {} swaps) in {:.1} s (planned {:.1} s of {:.0}); {} skipped (grid.json says why)\nwrote {}",
        plan.shapes.len(),
        records.steps.len(),
        records.swaps.len(),
        elapsed_s,
        plan.predicted_s,
        args.budget_s,
        manifest.skipped.len(),
        args.out.display()
    );
    Ok(())
}
