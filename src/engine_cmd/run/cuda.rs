//! The CUDA engine of `djinn engine run`: the CUDA forward with its decode graphs and a prefill
//! warm-up, the pinned host pool and the GPU swap engine with its copy method and rate caps.

#[cfg(feature = "cuda")]
use std::time::Instant;

use anyhow::Result;
#[cfg(feature = "cuda")]
use anyhow::{bail, Context};
#[cfg(feature = "cuda")]
use engine::batch::PagedModel;
#[cfg(feature = "cuda")]
use engine::config::KvLayout;
#[cfg(feature = "cuda")]
use engine::swap::backend::EngineBackend;

use super::plan::RunPlan;
#[cfg(feature = "cuda")]
use super::plan::{pool_blocks, EngineInfo, GIB};
#[cfg(feature = "cuda")]
use super::policies::{run_policies, swap_estimate};
use super::RunArgs;
#[cfg(feature = "cuda")]
use super::SwapInCopy;

#[cfg(not(feature = "cuda"))]
pub fn run_cuda(_args: &RunArgs, _plan: &RunPlan) -> Result<()> {
    anyhow::bail!("this djinn was built without the CUDA backend; rebuild with `cargo build --release --features cuda`, or use --backend cpu with a tiny model")
}

#[cfg(feature = "cuda")]
pub fn run_cuda(args: &RunArgs, plan: &RunPlan) -> Result<()> {
    use engine::cuda::{CudaModel, CudaModelOptions, GpuDevice, WeightSource};
    use engine::swap::SwapDirection;

    let started = Instant::now();
    let mut device = GpuDevice::open(0)?;
    let device_name = device.name.clone();
    if args.swap_in_copy == SwapInCopy::Kernel {
        // The forward runs at the highest priority so the copy kernel's CTAs yield to it.
        device.stream = engine::swap::cuda::high_priority_stream(&device.ctx)
            .context("creating a high-priority compute stream")?;
    }
    let host_weights;
    let source = match &args.weights {
        Some(path) => {
            host_weights = engine::weights::WeightSet::load(path)
                .with_context(|| format!("reading the weights at {}", path.display()))?;
            WeightSource::Host(&host_weights)
        }
        None => WeightSource::DeviceRandom {
            config: plan.model_config.clone(),
            seed: args.seed,
        },
    };
    let mut options = CudaModelOptions::for_config(&plan.model_config);
    options.tuning = args.tuning.to_tuning()?;
    options.block_size_tokens = args.block_size as usize;
    options.max_tokens_per_step = args.max_batch_tokens as usize;
    options.max_seqs_per_step = args.max_batch_sequences as usize;
    options.max_blocks_per_seq = (plan.spec.max_context_tokens as usize + 1)
        .div_ceil(args.block_size as usize)
        .max(1);
    let block_bytes_expected = (KvLayout::new(&plan.model_config, args.block_size as usize)
        .block_elems()
        * options.dtype.size_bytes()) as u64;
    options.num_kv_blocks =
        pool_blocks(args.gpu_kv_gib, args.gpu_kv_blocks, block_bytes_expected).map(|b| b as usize);
    // The scheduler swaps agents out, but the longest context must fit the pool on its own.
    options.kv_demand = Some(engine::cuda::KvDemand {
        sequences: 1,
        tokens_per_sequence: plan.spec.max_context_tokens as usize + 1,
    });
    let mut model = CudaModel::new(device, source, options)?;
    let graphs = (plan.agents as usize).min(args.max_batch_sequences as usize);
    model.capture_decode_graphs(graphs)?;
    // One prefill per 512-row bucket before the clock starts: the first GEMM of a bucket times
    // cuBLASLt algorithms (30-70 ms per shape, engine/src/cuda/gemm_tune/), which inside a run
    // stalled every agent (a 513-token chunk took 89 ms instead of 15; docs/calibration.md).
    // The KV it writes lands in blocks no agent owns yet; every block is written before it is read.
    let warmup_started = Instant::now();
    let warmup_buckets = prefill_warmup(
        &mut model,
        args.max_batch_tokens as usize,
        args.block_size as usize,
    )?;
    let prefill_warmup_s = warmup_started.elapsed().as_secs_f64();
    let model_ready_s = started.elapsed().as_secs_f64();
    let block_bytes = model.kv_pool().block_bytes() as u64;
    let gpu_blocks = model.kv_pool().num_blocks() as u32;
    let host_blocks = pool_blocks(args.host_kv_gib, args.host_kv_blocks, block_bytes)
        .unwrap_or_else(|| (16.0 * GIB / block_bytes as f64) as u32);
    let (mut swap, epoch, pin_s) = swap_engine(&model, host_blocks, plan.agents as usize + 8)?;
    if args.swap_in_copy == SwapInCopy::Kernel {
        swap.enable_kernel_swap_in(&model.device)?;
    }
    swap.set_rate_cap(&model.device, args.swap_rate_cap_gbps)?;
    if let Some(cap) = args.swap_in_rate_cap_gbps {
        swap.set_direction_rate_cap(&model.device, SwapDirection::In, Some(cap))?;
    }
    if let Some(cap) = args.swap_out_rate_cap_gbps {
        swap.set_direction_rate_cap(&model.device, SwapDirection::Out, Some(cap))?;
    }
    let breakdown: Vec<String> = model
        .memory_breakdown
        .iter()
        .map(|(what, bytes)| format!("{what} {:.2} GiB", *bytes as f64 / GIB))
        .collect();
    let info = EngineInfo {
        backend: "cuda",
        device: device_name,
        block_bytes,
        kv_bytes_per_token: block_bytes / args.block_size as u64,
        gpu_blocks,
        host_blocks,
        notes: vec![
            ("model_ready_s".into(), format!("{model_ready_s:.2}")),
            ("host_pool_pin_s".into(), format!("{pin_s:.2}")),
            (
                "prefill_warmup".into(),
                format!("{warmup_buckets} prefills (512-row buckets) in {prefill_warmup_s:.2} s before the run clock"),
            ),
            ("decode_graphs_captured_up_to".into(), graphs.to_string()),
            ("device_memory".into(), breakdown.join(", ")),
            (
                "swap_in_copy".into(),
                format!("{:?}", args.swap_in_copy).to_lowercase(),
            ),
            (
                "swap_out_rate_cap_gbps".into(),
                swap.rate_cap_gb_per_s(SwapDirection::Out)
                    .map_or("none".into(), |cap| cap.to_string()),
            ),
            (
                "swap_in_rate_cap_gbps".into(),
                swap.rate_cap_gb_per_s(SwapDirection::In)
                    .map_or("none".into(), |cap| cap.to_string()),
            ),
        ],
    };
    let vocab = model.config.vocab_size as u32;
    let mut backend = EngineBackend::new(
        "cuda-engine",
        model,
        swap,
        vocab,
        block_bytes,
        args.seed,
        swap_estimate(&plan.base),
    );
    run_policies(args, plan, &mut backend, epoch, &info)
}

/// The pinned host pool of `host_blocks` blocks and the GPU swap engine copying between it and
/// `model`'s KV pool (batched DMA), with at most `max_swaps` in flight; also returns the clock's
/// epoch (taken once pinning is done) and the seconds pinning took. Shared with the profiling grid.
#[cfg(feature = "cuda")]
pub fn swap_engine(
    model: &engine::cuda::CudaModel,
    host_blocks: u32,
    max_swaps: usize,
) -> Result<(engine::swap::cuda::CudaSwapEngine, Instant, f64)> {
    use engine::swap::cuda::{CopyMethod, CudaSwapEngine, GpuKvPoolRef, PinnedHostPool};
    let pool = model.kv_pool();
    let block_bytes = pool.block_bytes() as u64;
    let pool_ref = GpuKvPoolRef {
        base: pool.base_device_ptr(),
        block_bytes: pool.block_bytes(),
        block_count: pool.num_blocks() as u32,
    };
    if host_blocks == 0 {
        bail!("the host KV pool must hold at least one block of {block_bytes} bytes");
    }
    let pin_started = Instant::now();
    // Pinned memory is host memory: an impossible host pool is refused before pinning starts.
    engine::cpu::check_pools_fit_in_memory(
        block_bytes,
        &[("the host KV pool", host_blocks.into())],
    )
    .context("sizing the host KV pool")?;
    let host_pool = PinnedHostPool::new(&model.device.ctx, block_bytes as usize, host_blocks)?;
    let pin_s = pin_started.elapsed().as_secs_f64();
    let epoch = Instant::now();
    let swap = CudaSwapEngine::new(
        &model.device.ctx,
        pool_ref,
        host_pool,
        Some(model.device.stream.clone()),
        CopyMethod::Batched,
        max_swaps,
        epoch,
    )?;
    Ok((swap, epoch, pin_s))
}

/// Runs one prefill of each 512-row bucket up to `max_tokens` (and `max_tokens` itself) from an
/// empty context; returns how many ran.
#[cfg(feature = "cuda")]
fn prefill_warmup(
    model: &mut engine::cuda::CudaModel,
    max_tokens: usize,
    block_size: usize,
) -> Result<usize> {
    let blocks_available = model.kv_pool().num_blocks();
    let vocab = model.config.vocab_size.max(1) as u32;
    let mut sizes: Vec<usize> = (512..=max_tokens).step_by(512).collect();
    if max_tokens >= 512 && max_tokens % 512 != 0 {
        sizes.push(max_tokens);
    }
    let mut ran = 0;
    for tokens in sizes {
        let blocks = tokens.div_ceil(block_size);
        if blocks > blocks_available {
            break;
        }
        let table: Vec<u32> = (0..blocks as u32).collect();
        let ids: Vec<u32> = (0..tokens as u32).map(|i| (i * 7 + 1) % vocab).collect();
        model
            .forward(&[engine::batch::SeqStep {
                block_table: &table,
                context_len: 0,
                tokens: &ids,
            }])
            .with_context(|| format!("warm-up prefill of {tokens} tokens"))?;
        ran += 1;
    }
    Ok(ran)
}
