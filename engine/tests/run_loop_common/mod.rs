//! Helpers of the tests that drive the real engine (CPU model and swap engine) through `sim`'s run
//! loop: the engine and the loop's settings for a tiny model.
#![allow(dead_code)]

use std::time::Instant;

use engine::config::{KvLayout, ModelConfig};
use engine::cpu::CpuModel;
use engine::swap::backend::{EngineBackend, SwapEstimate};
use engine::swap::cpu::CpuSwapEngine;
use engine::weights::WeightSet;
use sim::driver::{self, CheckLevel, RunLimits, RunSettings};
use sim::sched::{CostHints, SchedConfig};

pub type CpuBackend = EngineBackend<CpuModel, CpuSwapEngine<f32>>;

/// The CPU engine over pools of `gpu_blocks` and `host_blocks` blocks of `block_size` tokens;
/// input tokens seeded with 7.
pub fn backend(
    weights: &WeightSet,
    block_size: usize,
    gpu_blocks: u32,
    host_blocks: u32,
) -> CpuBackend {
    let model = CpuModel::new(weights, gpu_blocks as usize, block_size).unwrap();
    let block_elems = KvLayout::new(&weights.config, block_size).block_elems();
    let swap = CpuSwapEngine::<f32>::new(block_elems, gpu_blocks, host_blocks, 64, Instant::now())
        .unwrap();
    EngineBackend::new(
        "cpu-engine",
        model,
        swap,
        weights.config.vocab_size as u32,
        (block_elems * 4) as u64,
        7,
        SwapEstimate::h100_measured(),
    )
}

/// The run loop's settings for the engine of [`backend`]: its pools, f32 KV sizes and H100-like
/// cost hints, every check after every step.
pub fn settings(
    block_size: u32,
    gpu_blocks: u32,
    host_blocks: u32,
    config: &ModelConfig,
) -> RunSettings {
    let kv_bytes_per_token =
        (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim() * 4) as u64;
    RunSettings {
        seed: 0,
        block_size_tokens: block_size,
        gpu_blocks,
        host_blocks,
        sched: SchedConfig::default(),
        costs: CostHints {
            kv_bytes_per_token,
            block_bytes: kv_bytes_per_token * block_size as u64,
            swap_latency_ns: 20_000,
            swap_in_bandwidth_bytes_per_s: 55e9,
            swap_out_bandwidth_bytes_per_s: 55e9,
            prefill_ns_per_token: 20_000.0,
            decode_step_ns: 1_000_000.0,
            kv_read_ns_per_token: 170.0,
        },
        limits: RunLimits::default(),
        check: CheckLevel::Full,
        recording: driver::Recording::Full,
    }
}
