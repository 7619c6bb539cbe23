//! The CPU engine of `djinn engine run`: the candle reference forward and the CPU swap engine
//! (tiny models; what CI runs).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use engine::config::KvLayout;
use engine::swap::backend::EngineBackend;

use super::plan::{pool_blocks, EngineInfo, RunPlan};
use super::policies::{run_policies, swap_estimate};
use super::RunArgs;

pub fn run_cpu(args: &RunArgs, plan: &RunPlan) -> Result<()> {
    use engine::cpu::CpuModel;
    use engine::swap::cpu::CpuSwapEngine;
    let weights = match &args.weights {
        Some(path) => engine::weights::WeightSet::load(path)
            .with_context(|| format!("reading the weights at {}", path.display()))?,
        None => engine::weights::WeightSet::random(&plan.model_config, args.seed),
    };
    let block_size = args.block_size as usize;
    let block_elems = KvLayout::new(&weights.config, block_size).block_elems();
    let block_bytes = (block_elems * 4) as u64;
    let gpu_blocks = pool_blocks(args.gpu_kv_gib, args.gpu_kv_blocks, block_bytes).unwrap_or(256);
    let host_blocks =
        pool_blocks(args.host_kv_gib, args.host_kv_blocks, block_bytes).unwrap_or(1024);
    if gpu_blocks == 0 || host_blocks == 0 {
        bail!("the KV pools must hold at least one block of {block_bytes} bytes (GPU {gpu_blocks}, host {host_blocks})");
    }
    let pools = [
        ("the GPU KV pool", gpu_blocks.into()),
        ("the host KV pool", host_blocks.into()),
    ];
    engine::cpu::check_pools_fit_in_memory(block_bytes, &pools).context("sizing the KV pools")?;
    let model = CpuModel::new(&weights, gpu_blocks as usize, block_size)
        .context("building the CPU model")?;
    let epoch = Instant::now();
    let swap = CpuSwapEngine::<f32>::new(
        block_elems,
        gpu_blocks,
        host_blocks,
        plan.agents as usize + 8,
        epoch,
    )
    .context("building the CPU swap engine")?;
    let estimate = swap_estimate(&plan.base);
    let mut backend = EngineBackend::new(
        "cpu-engine",
        model,
        swap,
        weights.config.vocab_size as u32,
        block_bytes,
        args.seed,
        estimate,
    );
    let info = EngineInfo {
        backend: "cpu",
        device: "cpu (candle reference forward, f32)".into(),
        block_bytes,
        kv_bytes_per_token: block_bytes / block_size as u64,
        gpu_blocks,
        host_blocks,
        notes: vec![],
    };
    run_policies(args, plan, &mut backend, epoch, &info)
}
