//! The engines `djinn calibrate profile` times: the CPU reference forward with the CPU swap
//! engine, and the CUDA forward with the GPU swap engine over pinned host memory (built as `djinn
//! engine run` builds them). Each first times a probe step to scale the analytic predictor to
//! the engine, then plans and runs the grid.

use std::time::Instant;

use anyhow::{Context, Result};
use engine::batch::PagedModel;
use engine::config::{KvLayout, ModelConfig};
use engine::probe::grid::{run_grid, GridPlan, GridRecords, GridShape, StepSpec};
use engine::swap::backend::SwapExecutor;
use traces::GpuProfile;

use super::profile::{plan_for, progress_line, EngineFacts, GridArgs};

/// Measured / predicted time of a batch-1 decode step and of a prefill (1 where one cannot be
/// measured): engines depart from the card's roofline differently in the two regimes.
fn probe_scale<M, S>(
    model: &mut M,
    swap: &mut S,
    vocab: u32,
    block_bytes: u64,
    facts: &EngineFacts,
    config: &ModelConfig,
    predict: &GpuProfile,
    args_tokens: u32,
    epoch: Instant,
) -> Result<[f64; 2]>
where
    M: PagedModel,
    S: SwapExecutor<Model = M>,
{
    let context = (config.max_position_embeddings as u32).clamp(1, 512);
    let mut scales = [1.0f64; 2];
    for (k, step) in [
        StepSpec::Decode { batch: 1, context },
        StepSpec::Prefill {
            chunk: context.min(args_tokens),
            cached: 0,
            seqs: 1,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let plan = GridPlan {
            shapes: vec![GridShape {
                step,
                swap_in_tokens: 0,
                swap_out_tokens: 0,
                level: 0,
            }],
            warmup: 2,
            reps: 5,
            skipped: vec![],
            predicted_s: 0.0,
        };
        let records = run_grid(
            model,
            swap,
            vocab,
            block_bytes,
            facts.host_blocks,
            &plan,
            epoch,
            |_, _, _| {},
        )
        .context("timing the probe steps")?;
        let mut d: Vec<u64> = records.steps.iter().map(|s| s.duration_ns).collect();
        d.sort_unstable();
        let predicted = predict.step_ns(&step.shape());
        if let Some(&ns) = d.get(d.len() / 2) {
            if predicted > 0.0 && ns > 0 {
                scales[k] = ns as f64 / predicted;
            }
        }
    }
    Ok(scales)
}

/// Times the probe steps, plans the grid from them and runs it on `model` and `swap`, whose
/// clock started at `epoch`.
fn plan_and_run<M, S>(
    args: &GridArgs,
    config: &ModelConfig,
    predict: &GpuProfile,
    facts: EngineFacts,
    (model, swap, epoch): (&mut M, &mut S, Instant),
) -> Result<(EngineFacts, GridPlan, GridRecords)>
where
    M: PagedModel,
    S: SwapExecutor<Model = M>,
{
    let vocab = config.vocab_size as u32;
    let block_bytes = facts.block_bytes;
    let scale = probe_scale(
        model,
        swap,
        vocab,
        block_bytes,
        &facts,
        config,
        predict,
        args.max_batch_tokens,
        epoch,
    )?;
    let plan = plan_for(args, config, &facts, predict, scale);
    eprintln!(
        "profiling {} on {}: {} shapes x ({} warm-up + {} reps), predicted {:.1} s of {:.0} (probe steps {:.2}x / {:.2}x the analytic {}'s decode / prefill), {} skipped",
        args.model,
        facts.device,
        plan.shapes.len(),
        plan.warmup,
        plan.reps,
        plan.predicted_s,
        args.budget_s,
        scale[0],
        scale[1],
        predict.name,
        plan.skipped.len()
    );
    let records = run_grid(
        model,
        swap,
        vocab,
        block_bytes,
        facts.host_blocks,
        &plan,
        epoch,
        progress_line(Instant::now()),
    )?;
    Ok((facts, plan, records))
}

pub fn run_cpu(
    args: &GridArgs,
    config: &ModelConfig,
    predict: &GpuProfile,
) -> Result<(EngineFacts, GridPlan, GridRecords)> {
    let weights = engine::weights::WeightSet::random(config, 0);
    let block_size = args.block_size as usize;
    let block_elems = KvLayout::new(config, block_size).block_elems();
    let block_bytes = (block_elems * 4) as u64;
    let gpu_blocks = args.gpu_kv_blocks.unwrap_or(4096);
    let pools = [
        ("the device KV pool", gpu_blocks.into()),
        ("the host KV pool", args.host_kv_blocks.into()),
    ];
    engine::cpu::check_pools_fit_in_memory(block_bytes, &pools).context("sizing the KV pools")?;
    let mut model = engine::cpu::CpuModel::new(&weights, gpu_blocks as usize, block_size)
        .context("building the CPU model")?;
    let epoch = Instant::now();
    let mut swap = engine::swap::cpu::CpuSwapEngine::<f32>::new(
        block_elems,
        gpu_blocks,
        args.host_kv_blocks,
        8,
        epoch,
    )
    .context("building the CPU swap engine")?;
    let facts = EngineFacts {
        device: "cpu (candle reference forward, f32)".into(),
        driver: String::new(),
        pool_blocks: gpu_blocks,
        host_blocks: args.host_kv_blocks,
        block_bytes,
    };
    plan_and_run(args, config, predict, facts, (&mut model, &mut swap, epoch))
}

#[cfg(not(feature = "cuda"))]
pub fn run_cuda(
    _args: &GridArgs,
    _config: &ModelConfig,
    _predict: &GpuProfile,
) -> Result<(EngineFacts, GridPlan, GridRecords)> {
    anyhow::bail!("this djinn was built without the CUDA backend; rebuild with `cargo build --release --features cuda`, or use --backend cpu with a tiny model")
}

#[cfg(feature = "cuda")]
pub fn run_cuda(
    args: &GridArgs,
    config: &ModelConfig,
    predict: &GpuProfile,
) -> Result<(EngineFacts, GridPlan, GridRecords)> {
    use engine::cuda::{CudaModel, CudaModelOptions, GpuDevice, WeightSource};

    let device = GpuDevice::open(0)?;
    let provenance =
        engine::probe::provenance::Provenance::collect(&device, &crate::runio::code_version());
    let mut options = CudaModelOptions::for_config(config);
    options.block_size_tokens = args.block_size as usize;
    options.max_tokens_per_step = args.max_batch_tokens as usize;
    options.max_seqs_per_step = args.max_batch_sequences as usize;
    options.max_blocks_per_seq = (config.max_position_embeddings + 1)
        .div_ceil(args.block_size as usize)
        .max(1);
    options.num_kv_blocks = args.gpu_kv_blocks.map(|b| b as usize);
    let source = WeightSource::DeviceRandom {
        config: config.clone(),
        seed: 0,
    };
    let mut model = CudaModel::new(device, source, options)?;
    model.capture_decode_graphs(args.max_batch_sequences as usize)?;
    // The pinned pool and swap engine `djinn engine run` builds, so grid copies time as runs do.
    let (mut swap, epoch, _) =
        crate::engine_cmd::run_cmd::cuda::swap_engine(&model, args.host_kv_blocks, 8)?;
    let facts = EngineFacts {
        device: provenance.device.clone(),
        driver: provenance.driver_version.clone(),
        pool_blocks: model.kv_pool().num_blocks() as u32,
        host_blocks: args.host_kv_blocks,
        block_bytes: model.kv_pool().block_bytes() as u64,
    };
    plan_and_run(args, config, predict, facts, (&mut model, &mut swap, epoch))
}
