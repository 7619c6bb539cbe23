//! Shared prefix blocks on the CPU engine: the scenario of `shared_prefix` (shared vs unshared
//! agents, bit-identical logits through a hit, a swap, a drop and recompute and the end of the
//! agent that computed the prefix) on the candle forward and the CPU swap engine.

mod cpu_common;
mod shared_prefix;

use std::time::Instant;

use cpu_common::load_tiny;
use engine::cpu::CpuModel;
use engine::swap::cpu::CpuSwapEngine;
use shared_prefix::{run_scenario, Engine, BLOCK, GPU_BLOCKS, HOST_BLOCKS};

fn cpu_engine() -> Engine<CpuModel, CpuSwapEngine<f32>> {
    let weights = load_tiny("tiny-gqa");
    let model = CpuModel::new(&weights, GPU_BLOCKS as usize, BLOCK as usize).unwrap();
    let swap = CpuSwapEngine::<f32>::new(
        model.layout().block_elems(),
        GPU_BLOCKS,
        HOST_BLOCKS,
        4,
        Instant::now(),
    )
    .unwrap();
    Engine {
        model,
        swap,
        poison: |model, block| model.blocks_mut(block, 1).unwrap().fill(f32::NAN),
    }
}

#[test]
fn shared_prefix_blocks_give_the_logits_of_unshared_execution() {
    run_scenario(cpu_engine(), cpu_engine());
}
