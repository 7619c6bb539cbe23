//! Per-layer readiness: a swapped-in context with the next step gated per layer on the copy,
//! against waiting for the whole swap.

use std::time::Instant;

use super::floors::Floors;
use super::{SwapBenchError, SwapBenchOptions, SwapBenchRow, GIB};
use crate::batch::SeqStep;
use crate::cuda::CudaModel;
use crate::probe::swap::{min_of, percentile_50};
use crate::swap::cuda::CudaSwapEngine;
use crate::swap::{BlockPair, SwapDirection, SwapRecord};

pub(super) const LAYERED_PREFILL_TOKENS: usize = 512;

/// Per-layer readiness: an agent's `agent_context_tokens` context comes
/// back from host memory and a prefill of `LAYERED_PREFILL_TOKENS` new tokens runs on it. The
/// run loop waits until the swap is reported complete, then runs the step; with a layer-by-layer
/// swap-in (`submit_layered`) and a step gated per layer (`gate_next_step_on_layers`) the step is
/// enqueued at once and each layer runs as soon as its KV has arrived. Host wall time from submit
/// to the step's tokens, arms alternated `layered_reps` times; also the swap and the prefill alone.
#[allow(clippy::too_many_arguments)]
pub(super) fn layered_readiness(
    model: &mut CudaModel,
    engine: &mut CudaSwapEngine,
    options: &SwapBenchOptions,
    first_swap_block: u32,
    swap_blocks: u32,
    floors: &Floors,
    records: &mut Vec<SwapRecord>,
) -> Result<Vec<SwapBenchRow>, SwapBenchError> {
    let bs = options.block_size_tokens;
    let context = options.agent_context_tokens;
    let blocks = context.div_ceil(bs);
    let extra = (context + LAYERED_PREFILL_TOKENS).div_ceil(bs) - blocks;
    if 2 * blocks + extra > swap_blocks as usize {
        return Err(SwapBenchError::BadOption(format!(
            "per-layer readiness needs {} swap blocks, the bench has {swap_blocks}",
            2 * blocks + extra
        )));
    }
    let layers = model.config.num_hidden_layers;
    let home: Vec<u32> = (0..blocks as u32).map(|b| first_swap_block + b).collect();
    let target: Vec<u32> = (0..(blocks + extra) as u32)
        .map(|b| first_swap_block + blocks as u32 + b)
        .collect();
    let host: Vec<u32> = (0..blocks as u32).collect();
    let pair_list = |gpu: &[u32]| -> Vec<BlockPair> {
        gpu.iter()
            .zip(&host)
            .map(|(&gpu_block, &host_block)| BlockPair {
                gpu_block,
                host_block,
            })
            .collect()
    };
    // The agent's context (random KV from fill_kv_random) goes to host memory once.
    let out = engine.submit(0, SwapDirection::Out, &pair_list(&home))?;
    records.extend(engine.wait(out)?);
    let new_tokens: Vec<u32> = (0..LAYERED_PREFILL_TOKENS as u32)
        .map(|i| (i * 7919 + 3) % model.config.vocab_size as u32)
        .collect();
    let in_pairs = pair_list(&target[..blocks]);
    let prefill = |model: &mut CudaModel| -> Result<Vec<u32>, SwapBenchError> {
        Ok(model.forward_greedy(&[SeqStep {
            block_table: &target,
            context_len: context,
            tokens: &new_tokens,
        }])?)
    };
    let mut prefill_ms = Vec::new();
    let mut swap_ms = Vec::new();
    let mut whole_ms = Vec::new();
    let mut layered_ms = Vec::new();
    let mut tokens_agree = true;
    for rep in 0..=options.layered_reps {
        // Prefill alone (the context already resident).
        let t = Instant::now();
        let alone = prefill(model)?;
        let p = t.elapsed().as_secs_f64() * 1e3;
        // Swap-in alone, layer by layer (what the gated arm copies), waited for by the host.
        let t = Instant::now();
        let (id, _) = engine.submit_layered(1, &in_pairs, layers)?;
        records.extend(engine.wait(id)?);
        let s = t.elapsed().as_secs_f64() * 1e3;
        // As the run loop does: wait for the swap (one batched copy), then the step.
        let t = Instant::now();
        let id = engine.submit(1, SwapDirection::In, &in_pairs)?;
        records.extend(engine.wait(id)?);
        let whole_tokens = prefill(model)?;
        let w = t.elapsed().as_secs_f64() * 1e3;
        // Per-layer readiness: the step enqueued at once, each layer gated on its KV.
        let t = Instant::now();
        let (id, gates) = engine.submit_layered(1, &in_pairs, layers)?;
        model.gate_next_step_on_layers(gates)?;
        let layered_tokens = prefill(model)?;
        let l = t.elapsed().as_secs_f64() * 1e3;
        records.extend(engine.wait(id)?);
        if rep > 0 {
            // (Rep 0's resident prefill ran before any swap-in filled the target blocks.)
            tokens_agree &= whole_tokens == layered_tokens && alone == whole_tokens;
            prefill_ms.push(p);
            swap_ms.push(s);
            whole_ms.push(w);
            layered_ms.push(l);
        }
    }
    let times = Times {
        prefill_ms,
        swap_ms,
        whole_ms,
        layered_ms,
    };
    let bytes = (blocks * engine.gpu_pool().block_bytes) as u64;
    let shape = Shape {
        bytes,
        blocks,
        context,
        layers,
    };
    Ok(readiness_rows(&times, &shape, floors, tokens_agree))
}

/// Host wall times of the four arms, one per repetition.
struct Times {
    prefill_ms: Vec<f64>,
    swap_ms: Vec<f64>,
    whole_ms: Vec<f64>,
    layered_ms: Vec<f64>,
}

/// The swapped context: bytes, blocks, tokens, and the model's layers.
struct Shape {
    bytes: u64,
    blocks: usize,
    context: usize,
    layers: usize,
}

fn readiness_rows(
    times: &Times,
    shape: &Shape,
    floors: &Floors,
    tokens_agree: bool,
) -> Vec<SwapBenchRow> {
    let &Shape {
        bytes,
        blocks,
        context,
        layers,
    } = shape;
    let Times {
        prefill_ms,
        swap_ms,
        whole_ms,
        layered_ms,
    } = times;
    let (p, s, w, l) = (
        percentile_50(prefill_ms),
        percentile_50(swap_ms),
        percentile_50(whole_ms),
        percentile_50(layered_ms),
    );
    let ideal = s + p / layers as f64;
    let row = |name: String, ms: &[f64], floor: f64, floor_what: &str, note: String| {
        let p50 = percentile_50(ms);
        SwapBenchRow {
            section: "per-layer readiness".into(),
            name,
            bytes,
            ms_p50: p50,
            ms_min: min_of(ms),
            reps: ms.len(),
            gb_per_s: bytes as f64 / (p50 * 1e6),
            floor,
            floor_what: floor_what.into(),
            ratio: p50 / floor,
            target: "-".into(),
            meets_target: None,
            note,
        }
    };
    let what = format!(
        "llama2-7b random fp16, {context}-token context ({blocks} blocks, {:.2} GiB) swapped in, prefill of {LAYERED_PREFILL_TOKENS} new tokens, host wall time",
        bytes as f64 / GIB as f64
    );
    vec![
        row(
            format!("prefill {LAYERED_PREFILL_TOKENS} tokens on a resident {context}-token context"),
            prefill_ms,
            p,
            "itself",
            what.clone(),
        ),
        row(
            format!("swap-in of the {context}-token context, layer by layer ({layers} batched copies)"),
            swap_ms,
            bytes as f64 / (floors.in_gb_per_s * 1e6),
            "ms at the measured H2D floor",
            format!("{:.1} GB/s", bytes as f64 / (s * 1e6)),
        ),
        row(
            "swap-in then prefill: the step after the swap is reported (as the run loop does)".into(),
            whole_ms,
            s + p,
            "ms swap alone + prefill alone",
            what.clone(),
        ),
        row(
            "swap-in and prefill gated per layer (per-layer readiness)".into(),
            layered_ms,
            ideal,
            "ms swap alone + prefill / layers (the last layer's share)",
            format!(
                "{:.2}x faster than waiting for the swap ({w:.2} ms); greedy tokens equal to the resident and the waited-for step: {tokens_agree}",
                w / l
            ),
        ),
    ]
}
