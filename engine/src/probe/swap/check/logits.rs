//! Checks on the CUDA engine's tiny model: logits after a swap round trip, after drop and
//! recompute, and with a step gated per layer on a swap-in still in flight.

use std::time::Instant;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{driver, outcome, pairs, CheckOutcome, SwapCheckError};
use crate::batch::{Logits, SeqStep};
use crate::config::ModelConfig;
use crate::cuda::{CudaError, CudaModel, CudaModelOptions, GpuDevice, WeightSource};
use crate::swap::cuda::{CopyMethod, CudaSwapEngine, GpuKvPoolRef, PinnedHostPool};
use crate::swap::{SwapDirection, SwapEngine};

/// Largest |a - b| relative to the largest |b| (same shapes).
pub(super) fn max_rel_diff(a: &Logits, b: &Logits) -> f32 {
    let scale = b.data.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.data
        .iter()
        .zip(&b.data)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// The tiny model on the CUDA engine; its pool is swapped by an engine ordered after its stream.
pub(super) fn logits_after_swap(device: GpuDevice) -> Result<Vec<CheckOutcome>, SwapCheckError> {
    let config = ModelConfig::tiny();
    let mut options = CudaModelOptions::for_config(&config);
    options.num_kv_blocks = Some(24);
    options.max_tokens_per_step = 256;
    options.max_seqs_per_step = 4;
    let mut model = CudaModel::new(
        device,
        WeightSource::DeviceRandom {
            config: config.clone(),
            seed: 11,
        },
        options,
    )?;
    let block_size = model.options.block_size_tokens;
    let pool = model.kv_pool();
    let pool_ref = GpuKvPoolRef {
        base: pool.base_device_ptr(),
        block_bytes: pool.block_bytes(),
        block_count: pool.num_blocks() as u32,
    };
    let ctx = model.device.ctx.clone();
    let host = PinnedHostPool::new(&ctx, pool_ref.block_bytes, 8)?;
    let compute = model.device.stream.clone();
    let mut engine = CudaSwapEngine::new(
        &ctx,
        pool_ref,
        host,
        Some(compute),
        CopyMethod::Batched,
        8,
        Instant::now(),
    )?;

    let prompt: Vec<u32> = (0..45u32)
        .map(|i| (i * 37 + 5) % config.vocab_size as u32)
        .collect();
    let next_token = [17u32];
    let blocks = (prompt.len() + 1).div_ceil(block_size);
    assert!(blocks <= 4);
    let table_first = [3u32, 7, 1, 9][..blocks].to_vec();
    let table_back = [10u32, 4, 12, 20][..blocks].to_vec();
    let table_recompute = [15u32, 16, 2, 18][..blocks].to_vec();
    let host_blocks = [6u32, 0, 3, 5][..blocks].to_vec();
    let prefill = |model: &mut CudaModel, table: &[u32]| -> Result<Logits, CudaError> {
        model.forward_logits(&[SeqStep {
            block_table: table,
            context_len: 0,
            tokens: &prompt,
        }])
    };
    let decode = |model: &mut CudaModel, table: &[u32]| -> Result<Logits, CudaError> {
        model.forward_logits(&[SeqStep {
            block_table: table,
            context_len: prompt.len(),
            tokens: &next_token,
        }])
    };

    // Never swapped.
    prefill(&mut model, &table_first)?;
    let reference = decode(&mut model, &table_first)?;

    // Same agent: prefill, swap out, let another agent overwrite its blocks, swap in elsewhere.
    prefill(&mut model, &table_first)?;
    let out = engine.submit(1, SwapDirection::Out, &pairs(&table_first, &host_blocks))?;
    engine.wait(out)?;
    let other_prompt: Vec<u32> = (0..45u32)
        .map(|i| (i * 11 + 3) % config.vocab_size as u32)
        .collect();
    model.forward_logits(&[SeqStep {
        block_table: &table_first,
        context_len: 0,
        tokens: &other_prompt,
    }])?;
    let back = engine.submit(1, SwapDirection::In, &pairs(&table_back, &host_blocks))?;
    engine.wait(back)?;
    let swapped = decode(&mut model, &table_back)?;

    // Dropped: nothing kept; recompute the whole context into fresh blocks, then decode.
    engine.check_drop(&table_back, &host_blocks)?;
    prefill(&mut model, &table_recompute)?;
    let recomputed = decode(&mut model, &table_recompute)?;

    let recompute_diff = max_rel_diff(&recomputed, &reference);
    let tolerance = 2e-3f32;

    let gated_outcomes = gated_step(
        &mut model,
        &mut engine,
        &GatedStep {
            blocks,
            host_blocks: &host_blocks,
            other_prompt: &other_prompt,
            context_len: prompt.len(),
            next_token,
            reference: &reference,
        },
    )?;
    Ok(vec![
        outcome(
            "logits after swap-out / swap-in into different blocks equal the never-swapped logits (bit-exact, CUDA tiny model)",
            swapped.data == reference.data,
            format!("max relative difference {:.3e}", max_rel_diff(&swapped, &reference)),
        ),
        outcome(
            "logits after drop and recompute match the never-swapped logits within the fp16 tolerance",
            recompute_diff <= tolerance,
            format!("max |diff| / max |logit| = {recompute_diff:.3e} (tolerance {tolerance:.0e})"),
        ),
    ]
    .into_iter()
    .chain(gated_outcomes)
    .collect())
}

/// What the per-layer gating check needs from the logits check.
struct GatedStep<'a> {
    blocks: usize,
    host_blocks: &'a [u32],
    /// Another agent's prompt, written into the target blocks first.
    other_prompt: &'a [u32],
    context_len: usize,
    next_token: [u32; 1],
    /// The never-swapped decode logits.
    reference: &'a Logits,
}

/// Per-layer readiness. The target blocks first hold another agent's KV; the swap-in stream is
/// held for HOLD_MS by a spinning kernel, so every layer's copy is still pending when the decode
/// step is enqueued; the step gated on the per-layer events must see the swapped-in KV (same
/// logits bit for bit), and the same step without the gates must not (it reads the other agent's
/// KV: this shows the check can fail).
fn gated_step(
    model: &mut CudaModel,
    engine: &mut CudaSwapEngine,
    setup: &GatedStep,
) -> Result<Vec<CheckOutcome>, SwapCheckError> {
    const HOLD_MS: u64 = 30;
    let reference = setup.reference;
    let host_blocks = setup.host_blocks;
    let table_layered = [13u32, 22, 0, 11][..setup.blocks].to_vec();
    let layers = model.config.num_hidden_layers;
    let hold = model.device.compile(HOLD_SOURCE, &[])?;
    let hold = model.device.function(&hold, "hold_stream")?;
    let decode = |model: &mut CudaModel, table: &[u32]| -> Result<Logits, CudaError> {
        model.forward_logits(&[SeqStep {
            block_table: table,
            context_len: setup.context_len,
            tokens: &setup.next_token,
        }])
    };
    let mut layered_run = |model: &mut CudaModel,
                           gated: bool|
     -> Result<(Logits, f64), SwapCheckError> {
        model.forward_logits(&[SeqStep {
            block_table: &table_layered,
            context_len: 0,
            tokens: setup.other_prompt,
        }])?;
        let in_stream = engine.stream(SwapDirection::In).clone();
        let hold_ns = HOLD_MS * 1_000_000;
        let mut launch = in_stream.launch_builder(&hold);
        launch.arg(&hold_ns);
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(driver("holding the swap-in stream"))?;
        let started = Instant::now();
        let (_, gates) = engine.submit_layered(1, &pairs(&table_layered, host_blocks), layers)?;
        if gated {
            model.gate_next_step_on_layers(gates)?;
        }
        let logits = decode(model, &table_layered)?;
        let step_ms = started.elapsed().as_secs_f64() * 1e3;
        engine.wait_all()?;
        Ok((logits, step_ms))
    };
    let (gated, gated_ms) = layered_run(model, true)?;
    let (ungated, ungated_ms) = layered_run(model, false)?;
    Ok(vec![
        outcome(
            "a step gated per layer on a layer-by-layer swap-in still in flight sees the swapped-in KV (bit-exact logits)",
            gated.data == reference.data && gated_ms >= HOLD_MS as f64 * 0.9,
            format!(
                "max relative difference {:.3e}; step returned {gated_ms:.1} ms after submit (swap-in stream held {HOLD_MS} ms), {layers} layers",
                max_rel_diff(&gated, reference)
            ),
        ),
        outcome(
            "the same step without the layer gates reads the blocks before the swap-in (so the gated check can fail)",
            ungated.data != reference.data,
            format!(
                "max relative difference {:.3e}; step returned {ungated_ms:.1} ms after submit",
                max_rel_diff(&ungated, reference)
            ),
        ),
    ])
}

const HOLD_SOURCE: &str = r#"
// Spins one thread for `ns` nanoseconds of %globaltimer: holds a stream so that later work on it
// is still pending (checks of GPU-side ordering).
extern "C" __global__ void hold_stream(unsigned long long ns)
{
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"#;
