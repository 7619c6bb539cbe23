//! `djinn engine swap-bench`: swap bandwidth on the GPU, each figure beside the floor measured in
//! the same run (one large contiguous pinned copy per direction, and both at once).
//!
//! Sections:
//! 1. floors: 1 GiB contiguous device->host, host->device, and both directions at once;
//! 2. one agent's context (llama2-7b fp16: 2,048 tokens = 128 blocks = 1 GiB; 4,096 tokens = 2 GiB)
//!    swapped out and back in, with scattered block ids on both sides (the worst case: every block
//!    is its own 8 MiB copy), batched and per-run;
//! 3. many agents at once: N agents out while N others come in;
//! 4. decode steps (batch 32, context 2048) alone and while both directions swap at full speed,
//!    with the CUDA engine's real decode step and with a synthetic memory-bound kernel that reads
//!    the same bytes as that step (labelled as such).
//!
//! With `interference_rounds > 0` sections 2-4 are replaced by the interference probe
//! (`interference.rs`): what slows a decode step down while swaps run, and by how much at each
//! swap operating point.

use std::sync::Arc;
use std::time::Instant;

mod interference;

use cudarc::driver::{sys, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::cuda::{
    high_priority_stream, CopyMethod, CudaSwapEngine, GpuKvPoolRef, PinnedHostPool, SwapInPath,
};
use super::{BlockPair, SwapDirection, SwapEngine, SwapError, SwapRecord};
use crate::batch::SeqStep;
use crate::config::{DType, KvLayout, ModelConfig};
use crate::cuda::{CudaError, CudaModel, CudaModelOptions, DeviceBuffer, GpuDevice, WeightSource};

#[derive(Debug, thiserror::Error)]
pub enum SwapBenchError {
    #[error(transparent)]
    Swap(#[from] SwapError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("CUDA driver call failed while {during}: {detail}")]
    Driver {
        during: &'static str,
        detail: String,
    },
    #[error("invalid swap-bench option: {0}")]
    BadOption(String),
}

fn driver(during: &'static str) -> impl Fn(cudarc::driver::DriverError) -> SwapBenchError {
    move |error| SwapBenchError::Driver {
        during,
        detail: format!("{error:?}"),
    }
}

/// Which decode step runs during the slowdown measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeLoad {
    /// The CUDA engine's decode step (E2's `CudaModel`, random llama2-7b weights).
    Engine,
    /// A kernel that streams the same bytes a decode step reads (a stand-in).
    Synthetic,
    /// Both, synthetic first.
    Both,
    /// No decode measurement.
    None,
}

#[derive(Clone, Debug, Serialize)]
pub struct SwapBenchOptions {
    pub model: String,
    pub block_size_tokens: usize,
    /// Agents swapping in each direction at once (section 3 and the decode slowdown).
    pub agents_per_direction: usize,
    /// Context of each agent in section 3, tokens.
    pub agent_context_tokens: usize,
    pub reps: usize,
    pub decode_load: DecodeLoad,
    pub decode_batch: usize,
    pub decode_context_tokens: usize,
    pub decode_steps: usize,
    pub seed: u64,
    /// Skip the transfer sections and run the engine decode step under a matrix of variants
    /// (CUDA graphs on/off x copies ordered after the compute stream or not), to find what makes
    /// the step wait for the swaps.
    pub diagnose_engine: bool,
    /// Rounds of the interference probe (0: off). When on, the transfer sections are skipped and
    /// the decode section runs the probe's arms instead (see `interference`).
    pub interference_rounds: usize,
    /// The probe's arm sets (see `interference::arms_of`); the synthetic victim skips
    /// `operating*` sets.
    pub interference_sets: Vec<String>,
    /// Repetitions of the per-layer readiness measurement (0: off). When on, the transfer
    /// sections are skipped and the engine section measures only that (see `layered_readiness`).
    pub layered_reps: usize,
}

impl Default for SwapBenchOptions {
    fn default() -> Self {
        SwapBenchOptions {
            model: "llama2-7b".into(),
            block_size_tokens: 16,
            agents_per_direction: 8,
            agent_context_tokens: 2048,
            reps: 5,
            decode_load: DecodeLoad::Both,
            decode_batch: 32,
            decode_context_tokens: 2048,
            decode_steps: 20,
            seed: 0,
            diagnose_engine: false,
            interference_rounds: 0,
            interference_sets: vec!["probe".into(), "operating".into()],
            layered_reps: 0,
        }
    }
}

/// One printed figure.
#[derive(Clone, Debug, Serialize)]
pub struct SwapBenchRow {
    pub section: String,
    pub name: String,
    pub bytes: u64,
    pub ms_p50: f64,
    pub ms_min: f64,
    pub reps: usize,
    pub gb_per_s: f64,
    /// The measured floor this figure is compared with, GB/s (or ms for decode rows).
    pub floor: f64,
    pub floor_what: String,
    /// gb_per_s / floor (decode rows: ms_p50 / baseline).
    pub ratio: f64,
    pub target: String,
    pub meets_target: Option<bool>,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SwapBenchReport {
    pub device: String,
    pub driver_version: i32,
    pub host_mem_total_bytes: u64,
    pub options: SwapBenchOptions,
    pub block_bytes: usize,
    pub host_pool_bytes: u64,
    pub host_pool_pin_ms: f64,
    pub rows: Vec<SwapBenchRow>,
    /// Per-swap records of sections 2-4 (the calibration input), in completion order.
    pub swap_records: Vec<SwapRecord>,
}

fn percentile_50(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

fn min_of(values: &[f64]) -> f64 {
    values.iter().cloned().fold(f64::INFINITY, f64::min)
}

const GIB: u64 = 1 << 30;

/// Device memory for the swap pool when no engine model owns one.
struct OwnPool {
    buffer: DeviceBuffer,
    block_bytes: usize,
    block_count: u32,
}

impl OwnPool {
    fn pool_ref(&self) -> GpuKvPoolRef {
        GpuKvPoolRef {
            base: self.buffer.ptr(),
            block_bytes: self.block_bytes,
            block_count: self.block_count,
        }
    }
}

/// The bench, step by step; `on_row` sees each figure as it is measured.
pub fn run(
    options: &SwapBenchOptions,
    mut on_row: impl FnMut(&SwapBenchRow),
) -> Result<SwapBenchReport, SwapBenchError> {
    let config = ModelConfig::preset(&options.model).ok_or_else(|| {
        SwapBenchError::BadOption(format!("unknown model preset `{}`", options.model))
    })?;
    if options.interference_rounds > 0 {
        interference::check_sets(&options.interference_sets)?;
    }
    if options.agents_per_direction == 0 || options.reps == 0 || options.decode_steps == 0 {
        return Err(SwapBenchError::BadOption(
            "agents, reps and decode steps must be at least 1".into(),
        ));
    }
    let layout = KvLayout::new(&config, options.block_size_tokens);
    let block_bytes = layout.block_elems() * DType::F16.size_bytes();
    let blocks_per_agent = options
        .agent_context_tokens
        .div_ceil(options.block_size_tokens);
    let blocks_4k = 4096usize.div_ceil(options.block_size_tokens);
    // Device blocks: one set swapped out, one set swapped in, per agent; at least room for the
    // 4k-token agent's out and in blocks.
    let swap_blocks =
        (2 * options.agents_per_direction * blocks_per_agent).max(2 * blocks_4k) as u32;
    // Host blocks: the out-agents' destinations and the in-agents' sources.
    let host_blocks = swap_blocks;

    let mut device = GpuDevice::open(0)?;
    let ctx = device.ctx.clone();
    let mut driver_version = 0i32;
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(driver("reading the driver version"))?;
    let host_memory = super::host_pool::HostMemory::read();
    let epoch = Instant::now();
    let pin_start = Instant::now();
    let host_pool = PinnedHostPool::new(&ctx, block_bytes, host_blocks)?;
    let host_pool_pin_ms = pin_start.elapsed().as_secs_f64() * 1e3;
    let mut report = SwapBenchReport {
        device: device.name.clone(),
        driver_version,
        host_mem_total_bytes: host_memory.map(|m| m.mem_total_bytes).unwrap_or(0),
        options: options.clone(),
        block_bytes,
        host_pool_bytes: host_pool.total_bytes(),
        host_pool_pin_ms,
        rows: Vec::new(),
        swap_records: Vec::new(),
    };
    println!(
        "device {} (driver {}), block {} bytes ({} tokens of {}), pinned host pool {:.2} GiB pinned in {:.0} ms",
        report.device,
        driver_version,
        block_bytes,
        options.block_size_tokens,
        options.model,
        report.host_pool_bytes as f64 / GIB as f64,
        host_pool_pin_ms
    );
    let mut push = |report: &mut SwapBenchReport, row: SwapBenchRow| {
        on_row(&row);
        report.rows.push(row);
    };

    // ---- sections 1-3 on a device pool of our own --------------------------------------------
    let own = OwnPool {
        buffer: DeviceBuffer::alloc(
            &ctx,
            swap_blocks as usize * block_bytes,
            "the swap benchmark's device pool",
        )?,
        block_bytes,
        block_count: swap_blocks,
    };
    let mut engine = CudaSwapEngine::new(
        &ctx,
        own.pool_ref(),
        host_pool,
        None,
        CopyMethod::Batched,
        256,
        epoch,
    )?;

    let floors = measure_floors(&engine, options.reps)?;
    for row in floors.rows() {
        push(&mut report, row);
    }

    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let skip_transfers =
        options.diagnose_engine || options.interference_rounds > 0 || options.layered_reps > 0;
    let transfer_configs: &[(usize, CopyMethod)] = if skip_transfers {
        &[]
    } else {
        &[
            (2048usize, CopyMethod::Batched),
            (4096, CopyMethod::Batched),
            (2048, CopyMethod::PerRun),
        ]
    };
    for &(tokens, method) in transfer_configs {
        engine.set_copy_method(method);
        let blocks = tokens.div_ceil(options.block_size_tokens);
        for row in single_agent(
            &mut engine,
            &mut rng,
            blocks,
            tokens,
            options.reps,
            &floors,
            &mut report.swap_records,
        )? {
            push(&mut report, row);
        }
    }
    engine.set_copy_method(CopyMethod::Batched);
    let many_agent_rows = if skip_transfers {
        Vec::new()
    } else {
        many_agents(
            &mut engine,
            &mut rng,
            options,
            blocks_per_agent,
            &floors,
            &mut report.swap_records,
        )?
    };
    for row in many_agent_rows {
        push(&mut report, row);
    }

    // ---- section 4: decode slowdown -------------------------------------------------------------
    let plan = SwapTraffic::new(
        &mut rng,
        options.agents_per_direction,
        blocks_per_agent,
        0,
        swap_blocks,
    );
    if matches!(
        options.decode_load,
        DecodeLoad::Synthetic | DecodeLoad::Both
    ) {
        let decode_bytes =
            decode_step_bytes(&config, options.decode_batch, options.decode_context_tokens);
        if options.interference_rounds > 0 {
            // The victim at the greatest priority, as the engine's forward below.
            device.stream = high_priority_stream(&device.ctx)?;
            let setup = interference::InterferenceSetup {
                sets: &options.interference_sets,
                rounds: options.interference_rounds,
                steps: options.decode_steps,
                floors: &floors,
                step_bytes: decode_bytes,
            };
            interference::synthetic_victim(&setup, &device, &mut engine, &plan, &mut |row| {
                push(&mut report, row)
            })?;
        }
        if options.interference_rounds == 0 {
            let mut synthetic = SyntheticDecode::new(&device, decode_bytes)?;
            for load in SYNTHETIC_LOADS {
                let rows = decode_slowdown(
                    &mut engine,
                    &plan,
                    options,
                    &floors,
                    &mut report.swap_records,
                    "synthetic",
                    load,
                    || synthetic.step(),
                )?;
                for row in rows {
                    push(&mut report, row);
                }
            }
            drop(synthetic);
            for row in copy_engine_probe(&device, &mut engine, &plan, &mut report.swap_records)? {
                push(&mut report, row);
            }
        }
    }
    let host_pool = engine.into_host_pool()?;
    drop(own);

    if matches!(options.decode_load, DecodeLoad::Engine | DecodeLoad::Both) {
        let decode_blocks = options.decode_batch
            * options
                .decode_context_tokens
                .div_ceil(options.block_size_tokens);
        let mut model_options = CudaModelOptions::for_config(&config);
        model_options.block_size_tokens = options.block_size_tokens;
        model_options.num_kv_blocks = Some(decode_blocks + swap_blocks as usize);
        model_options.max_seqs_per_step = options.decode_batch.max(1);
        model_options.max_tokens_per_step = 512;
        // The forward at the greatest stream priority, so the swap-in gather kernel's CTAs (default,
        // lowest priority) yield SMs to it; the DMA rows run with the same stream (a copy engine
        // ignores stream priorities), so every row of this section compares like with like.
        device.stream = high_priority_stream(&device.ctx)?;
        let mut model = CudaModel::new(
            device,
            WeightSource::DeviceRandom {
                config: config.clone(),
                seed: options.seed,
            },
            model_options,
        )?;
        model.fill_kv_random(options.seed ^ 0x5eed, 1.0)?;
        model.capture_decode_graphs(options.decode_batch)?;
        let pool = model.kv_pool();
        assert_eq!(
            pool.block_bytes(),
            block_bytes,
            "the engine's KV blocks match the layout"
        );
        let pool_ref = GpuKvPoolRef {
            base: pool.base_device_ptr(),
            block_bytes,
            block_count: pool.num_blocks() as u32,
        };
        let compute = model.device.stream.clone();
        let ctx = model.device.ctx.clone();
        let mut engine = CudaSwapEngine::new(
            &ctx,
            pool_ref,
            host_pool,
            Some(compute),
            CopyMethod::Batched,
            256,
            epoch,
        )?;
        // Swap blocks sit after the decode batch's blocks in the same pool.
        let plan = SwapTraffic::new(
            &mut rng,
            options.agents_per_direction,
            blocks_per_agent,
            decode_blocks as u32,
            swap_blocks,
        );
        let mut decode =
            EngineDecode::new(&model, options.decode_batch, options.decode_context_tokens);
        if options.layered_reps > 0 {
            for row in layered_readiness(
                &mut model,
                &mut engine,
                options,
                decode_blocks as u32,
                swap_blocks,
                &floors,
                &mut report.swap_records,
            )? {
                push(&mut report, row);
            }
            engine.wait_all()?;
            return Ok(report);
        }
        if options.interference_rounds > 0 {
            let setup = interference::InterferenceSetup {
                sets: &options.interference_sets,
                rounds: options.interference_rounds,
                steps: options.decode_steps,
                floors: &floors,
                step_bytes: decode_step_bytes(
                    &config,
                    options.decode_batch,
                    options.decode_context_tokens,
                ),
            };
            interference::engine_victim(
                &setup,
                &mut model,
                &mut engine,
                &plan,
                decode_blocks as u32,
                swap_blocks,
                &mut decode,
                &mut |row| push(&mut report, row),
            )?;
            engine.wait_all()?;
            return Ok(report);
        }
        if options.diagnose_engine {
            let host_pool = engine.into_host_pool()?;
            diagnose_engine_step(
                &mut model,
                host_pool,
                pool_ref,
                &plan,
                options,
                &floors,
                &mut report,
                epoch,
                &mut decode,
                &mut push,
            )?;
            return Ok(report);
        }
        for variant in ENGINE_VARIANTS {
            engine.set_swap_in_path(&model.device, variant.swap_in)?;
            engine.set_dma_chunk_bytes(variant.dma_chunk_bytes);
            engine.set_rate_cap(
                &model.device,
                (variant.rate_cap_gbps > 0.0).then_some(variant.rate_cap_gbps),
            )?;
            let label = format!("engine [{}]", variant.describe());
            let rows = decode_slowdown(
                &mut engine,
                &plan,
                options,
                &floors,
                &mut report.swap_records,
                &label,
                variant.load,
                || decode.step(&mut model),
            )?;
            for row in rows {
                push(&mut report, row);
            }
        }
        engine.set_swap_in_path(&model.device, SwapInPath::Dma)?;
        engine.set_dma_chunk_bytes(0);
        engine.set_rate_cap(&model.device, None)?;
        drop(engine);
    }
    Ok(report)
}

/// The engine's step (no token read-back) while both directions swap, with CUDA graphs on and off
/// and with the copies ordered after the compute stream or not.
#[allow(clippy::too_many_arguments)]
fn diagnose_engine_step(
    model: &mut CudaModel,
    mut host_pool: PinnedHostPool,
    pool_ref: GpuKvPoolRef,
    plan: &SwapTraffic,
    options: &SwapBenchOptions,
    floors: &Floors,
    report: &mut SwapBenchReport,
    epoch: Instant,
    decode: &mut EngineDecode,
    push: &mut impl FnMut(&mut SwapBenchReport, SwapBenchRow),
) -> Result<(), SwapBenchError> {
    let ctx = model.device.ctx.clone();
    for (graphs, ordered) in [(true, false), (false, true), (false, false), (true, true)] {
        model.options.use_cuda_graphs = graphs;
        let order_after = if ordered {
            Some(model.device.stream.clone())
        } else {
            None
        };
        let mut engine = CudaSwapEngine::new(
            &ctx,
            pool_ref,
            host_pool,
            order_after,
            CopyMethod::Batched,
            256,
            epoch,
        )?;
        let label = format!(
            "engine-no-readback [graphs {}, copies ordered after compute {}]",
            if graphs { "on" } else { "off" },
            if ordered { "yes" } else { "no" }
        );
        let rows = decode_slowdown(
            &mut engine,
            plan,
            options,
            floors,
            &mut report.swap_records,
            &label,
            load(2, true, true, false),
            || decode.step_without_readback(model),
        )?;
        for row in rows {
            push(report, row);
        }
        host_pool = engine.into_host_pool()?;
    }
    model.options.use_cuda_graphs = true;
    Ok(())
}

/// New tokens of the prefill in the per-layer readiness measurement.
const LAYERED_PREFILL_TOKENS: usize = 512;

/// Per-layer readiness (issue 6's stretch goal): an agent's `agent_context_tokens` context comes
/// back from host memory and a prefill of `LAYERED_PREFILL_TOKENS` new tokens runs on it. Today's
/// run loop waits until the swap is reported complete, then runs the step; with a layer-by-layer
/// swap-in (`submit_layered`) and a step gated per layer (`gate_next_step_on_layers`) the step is
/// enqueued at once and each layer runs as soon as its KV has arrived. Host wall time from submit
/// to the step's tokens, arms alternated `layered_reps` times; also the swap and the prefill alone.
#[allow(clippy::too_many_arguments)]
fn layered_readiness(
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
        // Today: wait for the swap (one batched copy), then the step.
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
    let bytes = (blocks * engine.gpu_pool().block_bytes) as u64;
    let (p, s, w, l) = (
        percentile_50(&prefill_ms),
        percentile_50(&swap_ms),
        percentile_50(&whole_ms),
        percentile_50(&layered_ms),
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
    Ok(vec![
        row(
            format!("prefill {LAYERED_PREFILL_TOKENS} tokens on a resident {context}-token context"),
            &prefill_ms,
            p,
            "itself",
            what.clone(),
        ),
        row(
            format!("swap-in of the {context}-token context, layer by layer ({layers} batched copies)"),
            &swap_ms,
            bytes as f64 / (floors.in_gb_per_s * 1e6),
            "ms at the measured H2D floor",
            format!("{:.1} GB/s", bytes as f64 / (s * 1e6)),
        ),
        row(
            "swap-in then prefill: the step after the swap is reported (today's run loop)".into(),
            &whole_ms,
            s + p,
            "ms swap alone + prefill alone",
            what.clone(),
        ),
        row(
            "swap-in and prefill gated per layer (per-layer readiness)".into(),
            &layered_ms,
            ideal,
            "ms swap alone + prefill / layers (the last layer's share)",
            format!(
                "{:.2}x faster than waiting for the swap ({w:.2} ms); greedy tokens equal to the resident and the waited-for step: {tokens_agree}",
                w / l
            ),
        ),
    ])
}

/// Bytes a decode step reads at least: every weight but the embedding table, and the batch's KV.
pub fn decode_step_bytes(config: &ModelConfig, batch: usize, context_tokens: usize) -> u64 {
    let h = config.hidden_size;
    let kv_dim = config.num_key_value_heads * config.head_dim();
    let per_layer = h * h * 2 + 2 * h * kv_dim + 3 * h * config.intermediate_size + 2 * h;
    let lm_head = config.vocab_size * h;
    let weight_params = per_layer * config.num_hidden_layers + h + lm_head;
    (weight_params * 2 + batch * context_tokens * config.kv_bytes_per_token(DType::F16)) as u64
}

// ---- section 1: floors ----------------------------------------------------------------------

struct Floors {
    out_gb_per_s: f64,
    in_gb_per_s: f64,
    both_gb_per_s: f64,
    out_ms: Vec<f64>,
    in_ms: Vec<f64>,
    both_ms: Vec<f64>,
    bytes: u64,
}

impl Floors {
    fn rows(&self) -> Vec<SwapBenchRow> {
        let row = |name: &str, ms: &[f64], bytes: u64, gb: f64| SwapBenchRow {
            section: "floor".into(),
            name: name.into(),
            bytes,
            ms_p50: percentile_50(ms),
            ms_min: min_of(ms),
            reps: ms.len(),
            gb_per_s: gb,
            floor: 64.0,
            floor_what: "PCIe 5.0 x16 nominal, GB/s".into(),
            ratio: gb / 64.0,
            target: "-".into(),
            meets_target: None,
            note:
                "one contiguous cuMemcpyAsync per direction, raw driver call (not the swap engine)"
                    .into(),
        };
        vec![
            row(
                "pinned D2H 1 GiB contiguous",
                &self.out_ms,
                self.bytes,
                self.out_gb_per_s,
            ),
            row(
                "pinned H2D 1 GiB contiguous",
                &self.in_ms,
                self.bytes,
                self.in_gb_per_s,
            ),
            row(
                "pinned D2H + H2D 1 GiB each at once (aggregate)",
                &self.both_ms,
                2 * self.bytes,
                self.both_gb_per_s,
            ),
        ]
    }

    fn for_direction(&self, direction: SwapDirection) -> f64 {
        match direction {
            SwapDirection::Out => self.out_gb_per_s,
            SwapDirection::In => self.in_gb_per_s,
        }
    }
}

/// Timed raw copies of 1 GiB (or the pool, if smaller) between block 0 of each pool.
fn measure_floors(engine: &CudaSwapEngine, reps: usize) -> Result<Floors, SwapBenchError> {
    let gpu = engine.gpu_pool();
    let host = engine.host_pool();
    let bytes = (GIB as usize)
        .min(gpu.block_bytes * gpu.block_count as usize / 2)
        .min(host.total_bytes() as usize / 2);
    let device_a = gpu.block_ptr(0);
    let device_b = gpu.base + bytes as u64;
    let host_a = host.block_addr(0);
    let host_b = host_a + bytes as u64;
    let out_stream = engine.stream(SwapDirection::Out).clone();
    let in_stream = engine.stream(SwapDirection::In).clone();
    let ctx = out_stream.context().clone();
    let timed = |streams: &[(&Arc<CudaStream>, SwapDirection)]| -> Result<f64, SwapBenchError> {
        let mut pairs = Vec::new();
        for (stream, direction) in streams {
            let start = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver("creating an event"))?;
            let end = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver("creating an event"))?;
            start.record(stream).map_err(driver("recording an event"))?;
            unsafe {
                match direction {
                    SwapDirection::Out => sys::cuMemcpyDtoHAsync_v2(
                        host_a as *mut _,
                        device_a,
                        bytes,
                        stream.cu_stream(),
                    ),
                    SwapDirection::In => sys::cuMemcpyHtoDAsync_v2(
                        device_b,
                        host_b as *const _,
                        bytes,
                        stream.cu_stream(),
                    ),
                }
                .result()
            }
            .map_err(driver("enqueueing a floor copy"))?;
            end.record(stream).map_err(driver("recording an event"))?;
            pairs.push((start, end));
        }
        // Span from the first copy's start to the last copy's end (the aggregate's time).
        let mut last_ms = 0.0f64;
        for (_, end) in &pairs {
            end.synchronize()
                .map_err(driver("waiting for a floor copy"))?;
            last_ms = last_ms.max(
                pairs[0]
                    .0
                    .elapsed_ms(end)
                    .map_err(driver("timing a floor copy"))? as f64,
            );
        }
        Ok(last_ms)
    };
    let mut out_ms = Vec::new();
    let mut in_ms = Vec::new();
    let mut both_ms = Vec::new();
    // One warm-up of each, then the timed reps.
    for rep in 0..=reps {
        let o = timed(&[(&out_stream, SwapDirection::Out)])?;
        let i = timed(&[(&in_stream, SwapDirection::In)])?;
        let b = timed(&[
            (&out_stream, SwapDirection::Out),
            (&in_stream, SwapDirection::In),
        ])?;
        if rep > 0 {
            out_ms.push(o);
            in_ms.push(i);
            both_ms.push(b);
        }
    }
    let gb = |bytes: f64, ms: f64| bytes / (ms * 1e6);
    Ok(Floors {
        out_gb_per_s: gb(bytes as f64, percentile_50(&out_ms)),
        in_gb_per_s: gb(bytes as f64, percentile_50(&in_ms)),
        both_gb_per_s: gb(2.0 * bytes as f64, percentile_50(&both_ms)),
        out_ms,
        in_ms,
        both_ms,
        bytes: bytes as u64,
    })
}

// ---- section 2: one agent ---------------------------------------------------------------------

/// `count` distinct ids from `[first, first + range)` in seeded random order.
fn scattered(rng: &mut ChaCha8Rng, first: u32, range: u32, count: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (first..first + range).collect();
    ids.shuffle(rng);
    ids.truncate(count);
    ids
}

fn single_agent(
    engine: &mut CudaSwapEngine,
    rng: &mut ChaCha8Rng,
    blocks: usize,
    tokens: usize,
    reps: usize,
    floors: &Floors,
    records: &mut Vec<SwapRecord>,
) -> Result<Vec<SwapBenchRow>, SwapBenchError> {
    let gpu_blocks = engine.gpu_pool().block_count;
    let host_blocks = engine.host_pool().block_count();
    let half = gpu_blocks / 2;
    let method = engine.copy_method();
    let mut out_ms = Vec::new();
    let mut in_ms = Vec::new();
    let mut out_latency_ms = Vec::new();
    let mut in_latency_ms = Vec::new();
    let mut submit_us = Vec::new();
    for rep in 0..=reps {
        // Out from scattered blocks of the lower half, in to scattered blocks of the upper half.
        let gpu_out = scattered(rng, 0, half, blocks);
        let gpu_in = scattered(rng, half, gpu_blocks - half, blocks);
        let host = scattered(rng, 0, host_blocks, blocks);
        let out_pairs: Vec<BlockPair> = gpu_out
            .iter()
            .zip(&host)
            .map(|(&g, &h)| BlockPair {
                gpu_block: g,
                host_block: h,
            })
            .collect();
        let in_pairs: Vec<BlockPair> = gpu_in
            .iter()
            .zip(&host)
            .map(|(&g, &h)| BlockPair {
                gpu_block: g,
                host_block: h,
            })
            .collect();
        for (direction, pairs) in [
            (SwapDirection::Out, &out_pairs),
            (SwapDirection::In, &in_pairs),
        ] {
            let submitted = Instant::now();
            let id = engine.submit(rep as u32, direction, pairs)?;
            let submit_cost_us = submitted.elapsed().as_secs_f64() * 1e6;
            // Busy-poll like a run loop with nothing else to do: the latency the scheduler sees.
            let mut done = Vec::new();
            while done.is_empty() {
                done = engine.poll()?;
            }
            let latency_ms = submitted.elapsed().as_secs_f64() * 1e3;
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].swap_id, id);
            let record = done.pop().expect("one record");
            if rep > 0 {
                let ms = (record.end_ns - record.start_ns) as f64 / 1e6;
                match direction {
                    SwapDirection::Out => {
                        out_ms.push(ms);
                        out_latency_ms.push(latency_ms);
                    }
                    SwapDirection::In => {
                        in_ms.push(ms);
                        in_latency_ms.push(latency_ms);
                    }
                }
                submit_us.push(submit_cost_us);
                records.push(record);
            }
        }
    }
    let bytes = (blocks * engine.gpu_pool().block_bytes) as u64;
    let method_name = match method {
        CopyMethod::Batched => "batched (1 cuMemcpyBatchAsync_v2)",
        CopyMethod::PerRun => "per-run cuMemcpyAsync loop",
    };
    let mut rows = Vec::new();
    for (direction, ms, latency) in [
        (SwapDirection::Out, &out_ms, &out_latency_ms),
        (SwapDirection::In, &in_ms, &in_latency_ms),
    ] {
        let p50 = percentile_50(ms);
        let gb = bytes as f64 / (p50 * 1e6);
        let floor = floors.for_direction(direction);
        rows.push(SwapBenchRow {
            section: "one agent".into(),
            name: format!("swap-{} {tokens} tokens ({blocks} scattered blocks), {method_name}", direction.as_str()),
            bytes,
            ms_p50: p50,
            ms_min: min_of(ms),
            reps: ms.len(),
            gb_per_s: gb,
            floor,
            floor_what: format!("measured contiguous 1 GiB pinned {} GB/s", if direction == SwapDirection::Out { "D2H" } else { "H2D" }),
            ratio: gb / floor,
            target: ">= 45 GB/s".into(),
            meets_target: Some(gb >= 45.0),
            note: format!(
                "copy time from CUDA events; submit->poll latency p50 {:.2} ms; submit CPU cost p50 {:.0} us",
                percentile_50(latency),
                percentile_50(&submit_us)
            ),
        });
    }
    Ok(rows)
}

// ---- section 3: many agents at once ----------------------------------------------------------------

/// Block pairs of agents swapping out (device blocks `[first, first + n)`, host blocks
/// `[0, n)`) and agents swapping in (host blocks `[n, 2n)` to device blocks `[first + n, first + 2n)`),
/// scattered within each range.
struct SwapTraffic {
    out_agents: Vec<Vec<BlockPair>>,
    in_agents: Vec<Vec<BlockPair>>,
}

impl SwapTraffic {
    fn new(
        rng: &mut ChaCha8Rng,
        agents: usize,
        blocks_per_agent: usize,
        first_gpu_block: u32,
        swap_blocks: u32,
    ) -> Self {
        let half = swap_blocks / 2;
        let gpu_out = scattered(rng, first_gpu_block, half, agents * blocks_per_agent);
        let gpu_in = scattered(rng, first_gpu_block + half, half, agents * blocks_per_agent);
        let host_out = scattered(rng, 0, half, agents * blocks_per_agent);
        let host_in = scattered(rng, half, half, agents * blocks_per_agent);
        let split = |gpu: &[u32], host: &[u32]| -> Vec<Vec<BlockPair>> {
            gpu.chunks(blocks_per_agent)
                .zip(host.chunks(blocks_per_agent))
                .map(|(g, h)| {
                    g.iter()
                        .zip(h)
                        .map(|(&gpu_block, &host_block)| BlockPair {
                            gpu_block,
                            host_block,
                        })
                        .collect()
                })
                .collect()
        };
        SwapTraffic {
            out_agents: split(&gpu_out, &host_out),
            in_agents: split(&gpu_in, &host_in),
        }
    }
}

fn span_gb_per_s(records: &[SwapRecord]) -> (f64, f64, u64) {
    let start = records.iter().map(|r| r.start_ns).min().unwrap_or(0);
    let end = records.iter().map(|r| r.end_ns).max().unwrap_or(0);
    let bytes: u64 = records.iter().map(|r| r.bytes).sum();
    let ms = (end - start) as f64 / 1e6;
    (bytes as f64 / (ms * 1e6), ms, bytes)
}

fn many_agents(
    engine: &mut CudaSwapEngine,
    rng: &mut ChaCha8Rng,
    options: &SwapBenchOptions,
    blocks_per_agent: usize,
    floors: &Floors,
    records: &mut Vec<SwapRecord>,
) -> Result<Vec<SwapBenchRow>, SwapBenchError> {
    let agents = options.agents_per_direction;
    let mut both_gb = Vec::new();
    let mut both_ms = Vec::new();
    let mut out_gb = Vec::new();
    let mut in_gb = Vec::new();
    let mut out_only_gb = Vec::new();
    let mut out_only_ms = Vec::new();
    let mut in_only_gb = Vec::new();
    let mut in_only_ms = Vec::new();
    let mut max_concurrency = 0u32;
    let mut bytes_both = 0;
    let mut bytes_one = 0;
    for rep in 0..=options.reps {
        let traffic = SwapTraffic::new(
            rng,
            agents,
            blocks_per_agent,
            0,
            engine.gpu_pool().block_count,
        );
        // Both directions at once, submissions interleaved as a plan would list them.
        for k in 0..agents {
            engine.submit(k as u32, SwapDirection::Out, &traffic.out_agents[k])?;
            engine.submit(
                (agents + k) as u32,
                SwapDirection::In,
                &traffic.in_agents[k],
            )?;
        }
        let done = engine.wait_all()?;
        let outs: Vec<SwapRecord> = done
            .iter()
            .filter(|r| r.direction == SwapDirection::Out)
            .cloned()
            .collect();
        let ins: Vec<SwapRecord> = done
            .iter()
            .filter(|r| r.direction == SwapDirection::In)
            .cloned()
            .collect();
        let (gb_all, ms_all, bytes) = span_gb_per_s(&done);
        // One direction at a time: N agents queued on one stream.
        for k in 0..agents {
            engine.submit(k as u32, SwapDirection::Out, &traffic.out_agents[k])?;
        }
        let out_only = engine.wait_all()?;
        for k in 0..agents {
            engine.submit(
                (agents + k) as u32,
                SwapDirection::In,
                &traffic.in_agents[k],
            )?;
        }
        let in_only = engine.wait_all()?;
        if rep > 0 {
            both_gb.push(gb_all);
            both_ms.push(ms_all);
            bytes_both = bytes;
            out_gb.push(span_gb_per_s(&outs).0);
            in_gb.push(span_gb_per_s(&ins).0);
            let (g, m, b) = span_gb_per_s(&out_only);
            out_only_gb.push(g);
            out_only_ms.push(m);
            bytes_one = b;
            let (g, m, _) = span_gb_per_s(&in_only);
            in_only_gb.push(g);
            in_only_ms.push(m);
            max_concurrency = max_concurrency.max(
                done.iter()
                    .map(|r| r.concurrent_swaps_at_start)
                    .max()
                    .unwrap_or(0),
            );
            records.extend(done);
            records.extend(out_only);
            records.extend(in_only);
        }
    }
    let gib_each = (blocks_per_agent * engine.gpu_pool().block_bytes) as f64 / GIB as f64;
    let both_p50 = percentile_50(&both_gb);
    let mut rows = vec![SwapBenchRow {
        section: "many agents".into(),
        name: format!("{agents} agents out + {agents} agents in at once ({gib_each:.2} GiB each), aggregate"),
        bytes: bytes_both,
        ms_p50: percentile_50(&both_ms),
        ms_min: min_of(&both_ms),
        reps: both_ms.len(),
        gb_per_s: both_p50,
        floor: floors.both_gb_per_s,
        floor_what: "measured 1 GiB D2H + 1 GiB H2D at once, aggregate GB/s".into(),
        ratio: both_p50 / floors.both_gb_per_s,
        target: ">= 80 GB/s aggregate".into(),
        meets_target: Some(both_p50 >= 80.0),
        note: format!(
            "per direction while both busy: out {:.1} GB/s, in {:.1} GB/s; max concurrent_swaps_at_start {}",
            percentile_50(&out_gb),
            percentile_50(&in_gb),
            max_concurrency
        ),
    }];
    for (direction, gb, ms) in [
        (SwapDirection::Out, &out_only_gb, &out_only_ms),
        (SwapDirection::In, &in_only_gb, &in_only_ms),
    ] {
        let p50 = percentile_50(gb);
        let floor = floors.for_direction(direction);
        rows.push(SwapBenchRow {
            section: "many agents".into(),
            name: format!(
                "{agents} agents swap-{} queued on one stream ({gib_each:.2} GiB each)",
                direction.as_str()
            ),
            bytes: bytes_one,
            ms_p50: percentile_50(ms),
            ms_min: min_of(ms),
            reps: ms.len(),
            gb_per_s: p50,
            floor,
            floor_what: "measured contiguous 1 GiB pinned, same direction".into(),
            ratio: p50 / floor,
            target: ">= 45 GB/s".into(),
            meets_target: Some(p50 >= 45.0),
            note: String::new(),
        });
    }
    Ok(rows)
}

// ---- section 4: decode slowdown ---------------------------------------------------------------------

const SYNTHETIC_SOURCE: &str = r#"
extern "C" __global__ void stream_read(const uint4* __restrict__ data, unsigned long long count, unsigned int* sink) {
    unsigned int acc = 0;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    // Four independent 16-byte loads in flight per thread per iteration.
    for (; i + 3 * stride < count; i += 4 * stride) {
        uint4 a = data[i];
        uint4 b = data[i + stride];
        uint4 c = data[i + 2 * stride];
        uint4 d = data[i + 3 * stride];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < count; i += stride) {
        uint4 a = data[i];
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    // Practically never true; keeps the loads from being optimised away.
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
"#;

/// A memory-bound kernel reading as many bytes as a decode step (a labelled stand-in).
struct SyntheticDecode {
    stream: Arc<CudaStream>,
    function: CudaFunction,
    buffer: DeviceBuffer,
    sink: DeviceBuffer,
    grid: u32,
}

impl SyntheticDecode {
    fn new(device: &GpuDevice, bytes: u64) -> Result<Self, SwapBenchError> {
        let module = device.compile(SYNTHETIC_SOURCE, &[])?;
        let function = device.function(&module, "stream_read")?;
        let buffer = DeviceBuffer::alloc(
            &device.ctx,
            bytes as usize,
            "the synthetic decode step's buffer",
        )?;
        let sink = DeviceBuffer::alloc(&device.ctx, 4, "the synthetic kernel's sink")?;
        Ok(SyntheticDecode {
            stream: device.stream.clone(),
            function,
            buffer,
            sink,
            grid: (device.num_sms * 8) as u32,
        })
    }

    /// One step, timed by events on the compute stream (ms).
    fn step(&mut self) -> Result<f64, SwapBenchError> {
        let ctx = self.stream.context();
        let start = ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("creating an event"))?;
        let end = ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("creating an event"))?;
        let count = (self.buffer.bytes() / 16) as u64;
        let data = self.buffer.ptr();
        let sink = self.sink.ptr();
        start
            .record(&self.stream)
            .map_err(driver("recording an event"))?;
        let mut launch = self.stream.launch_builder(&self.function);
        launch.arg(&data).arg(&count).arg(&sink);
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (self.grid, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(driver("launching the synthetic decode kernel"))?;
        end.record(&self.stream)
            .map_err(driver("recording an event"))?;
        end.synchronize()
            .map_err(driver("waiting for the synthetic decode kernel"))?;
        Ok(start
            .elapsed_ms(&end)
            .map_err(driver("timing the synthetic decode kernel"))? as f64)
    }
}

/// The engine's decode step at batch `b`, context `c` (every sequence attends to `c` tokens).
struct EngineDecode {
    tables: Vec<Vec<u32>>,
    tokens: Vec<[u32; 1]>,
    context_tokens: usize,
}

impl EngineDecode {
    fn new(model: &CudaModel, batch: usize, context_tokens: usize) -> Self {
        let blocks = context_tokens.div_ceil(model.options.block_size_tokens);
        EngineDecode {
            tables: (0..batch)
                .map(|b| ((b * blocks) as u32..((b + 1) * blocks) as u32).collect())
                .collect(),
            tokens: (0..batch)
                .map(|b| [(b as u32 * 7919 + 1) % model.config.vocab_size as u32])
                .collect(),
            context_tokens,
        }
    }

    /// One serving-path step (stage, replay, read back the tokens), wall time in ms.
    fn step(&mut self, model: &mut CudaModel) -> Result<f64, SwapBenchError> {
        let steps: Vec<SeqStep<'_>> = self
            .tables
            .iter()
            .zip(&self.tokens)
            .map(|(table, token)| SeqStep {
                block_table: table,
                context_len: self.context_tokens - 1,
                tokens: token,
            })
            .collect();
        let start = Instant::now();
        let next = model.forward_greedy(&steps)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        for (token, n) in self.tokens.iter_mut().zip(next) {
            token[0] = n;
        }
        Ok(ms)
    }
}

impl EngineDecode {
    /// The step without reading the tokens back (enqueue, then wait for the compute stream); the
    /// same input tokens are fed every step.
    fn step_without_readback(&mut self, model: &mut CudaModel) -> Result<f64, SwapBenchError> {
        let steps: Vec<SeqStep<'_>> = self
            .tables
            .iter()
            .zip(&self.tokens)
            .map(|(table, token)| SeqStep {
                block_table: table,
                context_len: self.context_tokens - 1,
                tokens: token,
            })
            .collect();
        let start = Instant::now();
        model.enqueue_step(&steps)?;
        model.wait("a decode step of the swap benchmark")?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
}

const fn load(depth: usize, out: bool, into: bool, prefer_overlap_with_compute: bool) -> SwapLoad {
    SwapLoad {
        depth,
        out,
        into,
        prefer_overlap_with_compute,
    }
}

/// Swap loads beside the synthetic step: both directions (the target case), each direction alone
/// (which one costs HBM bandwidth), and a shallower queue.
const SYNTHETIC_LOADS: [SwapLoad; 4] = [
    load(2, true, true, false),
    load(2, true, false, false),
    load(2, false, true, false),
    load(1, true, true, false),
];

/// One A/B arm of the engine decode measurement: how swap-ins are copied, the per-direction rate
/// cap, and the swap load.
#[derive(Clone, Copy, Debug)]
struct EngineVariant {
    swap_in: SwapInPath,
    /// DMA copies split into pieces of at most this many bytes (0: one copy per run of blocks).
    dma_chunk_bytes: usize,
    /// Per-direction rate cap of the DMA swaps, GB/s (0: none, full link speed).
    rate_cap_gbps: f64,
    load: SwapLoad,
}

impl EngineVariant {
    fn describe(&self) -> String {
        let path = match self.swap_in {
            SwapInPath::Dma if self.dma_chunk_bytes > 0 => {
                format!("swap-in DMA in {} KiB pieces", self.dma_chunk_bytes >> 10)
            }
            SwapInPath::Dma => "swap-in DMA".into(),
            SwapInPath::Kernel { ctas } => format!("swap-in gather kernel, {ctas} CTAs"),
        };
        if self.rate_cap_gbps > 0.0 {
            format!("{path}, paced to {} GB/s per direction", self.rate_cap_gbps)
        } else {
            path
        }
    }
}

const fn variant(
    swap_in: SwapInPath,
    dma_chunk_bytes: usize,
    rate_cap_gbps: f64,
    load: SwapLoad,
) -> EngineVariant {
    EngineVariant {
        swap_in,
        dma_chunk_bytes,
        rate_cap_gbps,
        load,
    }
}

/// The engine's step (inputs and tokens through mapped pinned memory, so it uses no copy engine)
/// beside swaps at full link speed and paced to a per-direction cap, and swap-in alone. (The SM
/// gather kernel and 1 MiB DMA pieces were measured worse or equal in session 2, NOTES-swap.md;
/// they stay selectable but are not re-run here.)
const ENGINE_VARIANTS: [EngineVariant; 7] = [
    variant(SwapInPath::Dma, 0, 0.0, load(2, true, true, false)),
    variant(SwapInPath::Dma, 0, 50.0, load(2, true, true, false)),
    variant(SwapInPath::Dma, 0, 46.0, load(2, true, true, false)),
    variant(SwapInPath::Dma, 0, 43.0, load(2, true, true, false)),
    variant(SwapInPath::Dma, 0, 40.0, load(2, true, true, false)),
    variant(SwapInPath::Dma, 0, 0.0, load(1, true, true, false)),
    variant(SwapInPath::Dma, 0, 0.0, load(2, true, true, false)),
];

/// What runs on the copy streams during a decode measurement.
#[derive(Clone, Copy, Debug)]
struct SwapLoad {
    /// Swaps kept queued per enabled direction.
    depth: usize,
    out: bool,
    into: bool,
    prefer_overlap_with_compute: bool,
}

impl SwapLoad {
    fn label(&self) -> String {
        let directions = match (self.out, self.into) {
            (true, true) => "both directions",
            (true, false) => "swap-out only",
            (false, true) => "swap-in only",
            (false, false) => "no direction",
        };
        format!(
            "{directions}, {} x 1 GiB queued per direction{}",
            self.depth,
            if self.prefer_overlap_with_compute {
                ", PREFER_OVERLAP_WITH_COMPUTE"
            } else {
                ""
            }
        )
    }
}

/// Keeps the copy streams busy: before every step, each enabled direction gets swaps until
/// `depth` are queued, rotating over the traffic's agents.
struct SwapPump<'a> {
    traffic: &'a SwapTraffic,
    load: SwapLoad,
    next: [usize; 2],
    queued: [usize; 2],
}

impl SwapPump<'_> {
    fn top_up(
        &mut self,
        engine: &mut CudaSwapEngine,
        records: &mut Vec<SwapRecord>,
    ) -> Result<(), SwapBenchError> {
        for record in engine.poll()? {
            self.queued[(record.direction == SwapDirection::In) as usize] -= 1;
            records.push(record);
        }
        for (d, direction) in [SwapDirection::Out, SwapDirection::In]
            .into_iter()
            .enumerate()
        {
            let enabled = if d == 0 {
                self.load.out
            } else {
                self.load.into
            };
            if !enabled {
                continue;
            }
            let agents = if d == 0 {
                &self.traffic.out_agents
            } else {
                &self.traffic.in_agents
            };
            while self.queued[d] < self.load.depth {
                let k = self.next[d] % agents.len();
                // An agent whose previous swap is still unreported waits for the next top-up.
                if engine
                    .busy_swap_of_gpu_block(agents[k][0].gpu_block)
                    .is_some()
                {
                    break;
                }
                engine.submit((d * agents.len() + k) as u32, direction, &agents[k])?;
                self.next[d] += 1;
                self.queued[d] += 1;
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)] // a bench helper: the measurement's whole context
fn decode_slowdown(
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    options: &SwapBenchOptions,
    floors: &Floors,
    records: &mut Vec<SwapRecord>,
    label: &str,
    load: SwapLoad,
    mut step: impl FnMut() -> Result<f64, SwapBenchError>,
) -> Result<Vec<SwapBenchRow>, SwapBenchError> {
    engine.set_prefer_overlap_with_compute(load.prefer_overlap_with_compute);
    // Warm-up (graphs, clocks), then alternate quiet and swapping phases twice so slow drift
    // (clocks, temperature) hits both conditions alike.
    for _ in 0..5 {
        step()?;
    }
    let mut quiet_ms = Vec::new();
    let mut busy_ms = Vec::new();
    let mut busy_records = Vec::new();
    // (start, end) of the timed swapping phases, on the engine's clock.
    let mut busy_windows: Vec<(u64, u64)> = Vec::new();
    for _phase in 0..2 {
        for _ in 0..options.decode_steps {
            quiet_ms.push(step()?);
        }
        let mut pump = SwapPump {
            traffic,
            load,
            next: [0, 0],
            queued: [0, 0],
        };
        pump.top_up(engine, &mut busy_records)?;
        // Let both streams reach full speed before timing.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let window_start_ns = engine.now_ns();
        for _ in 0..options.decode_steps {
            pump.top_up(engine, &mut busy_records)?;
            busy_ms.push(step()?);
        }
        busy_windows.push((window_start_ns, engine.now_ns()));
        pump.top_up(engine, &mut busy_records)?;
        busy_records.extend(engine.wait_all()?);
    }
    let quiet = percentile_50(&quiet_ms);
    let busy = percentile_50(&busy_ms);
    let slowdown = busy / quiet - 1.0;
    let outs: Vec<SwapRecord> = busy_records
        .iter()
        .filter(|r| r.direction == SwapDirection::Out)
        .cloned()
        .collect();
    let ins: Vec<SwapRecord> = busy_records
        .iter()
        .filter(|r| r.direction == SwapDirection::In)
        .cloned()
        .collect();
    let copy_gb = |rs: &[SwapRecord]| -> f64 {
        let bytes: u64 = rs.iter().map(|r| r.bytes).sum();
        let ns: u64 = rs.iter().map(|r| r.end_ns - r.start_ns).sum();
        bytes as f64 / ns.max(1) as f64
    };
    // Bytes moved inside the timed windows (a swap's bytes spread evenly over its copy time)
    // per second of window: the rate the steps actually lived with, gaps between swaps included.
    let window_ns: u64 = busy_windows.iter().map(|(a, b)| b - a).sum();
    let window_gb = |rs: &[SwapRecord]| -> f64 {
        let mut bytes = 0.0;
        for r in rs {
            let copy_ns = (r.end_ns - r.start_ns).max(1) as f64;
            for &(a, b) in &busy_windows {
                let overlap = r.end_ns.min(b).saturating_sub(r.start_ns.max(a));
                bytes += r.bytes as f64 * overlap as f64 / copy_ns;
            }
        }
        bytes / window_ns.max(1) as f64
    };
    let decode_bytes = decode_step_bytes(
        &ModelConfig::preset(&options.model).expect("checked at start"),
        options.decode_batch,
        options.decode_context_tokens,
    );
    let what = match label {
        "synthetic" => format!(
            "SYNTHETIC STAND-IN: one memory-bound kernel reading {:.1} GB (the bytes of a llama2-7b decode step, batch {}, context {}), timed by events",
            decode_bytes as f64 / 1e9,
            options.decode_batch,
            options.decode_context_tokens
        ),
        label if label.starts_with("engine-no-readback") => format!(
            "CUDA engine decode step (llama2-7b random fp16, batch {}, context {}, CUDA graph) WITHOUT its D2H token copy (enqueue_step + stream wait): stands in for a step that writes its tokens to mapped pinned memory with a kernel (probe: ~0.08 ms while swapping)",
            options.decode_batch, options.decode_context_tokens
        ),
        _ => format!(
            "CUDA engine decode step (llama2-7b random fp16, batch {}, context {}, CUDA graph), wall time incl. staging and token read-back (forward_greedy)",
            options.decode_batch, options.decode_context_tokens
        ),
    };
    records.extend(busy_records.iter().cloned());
    Ok(vec![
        SwapBenchRow {
            section: "decode while swapping".into(),
            name: format!("{label} decode step, no swaps"),
            bytes: decode_bytes,
            ms_p50: quiet,
            ms_min: min_of(&quiet_ms),
            reps: quiet_ms.len(),
            gb_per_s: decode_bytes as f64 / (quiet * 1e6),
            floor: decode_bytes as f64 / 3.35e12 * 1e3,
            floor_what: "ms at 3.35 TB/s (datasheet HBM3) for the step's bytes".into(),
            ratio: quiet / (decode_bytes as f64 / 3.35e12 * 1e3),
            target: "-".into(),
            meets_target: None,
            note: what.clone(),
        },
        SwapBenchRow {
            section: "decode while swapping".into(),
            name: format!("{label} decode step while swapping ({})", load.label()),
            bytes: decode_bytes,
            ms_p50: busy,
            ms_min: min_of(&busy_ms),
            reps: busy_ms.len(),
            gb_per_s: decode_bytes as f64 / (busy * 1e6),
            floor: quiet,
            floor_what: "ms p50 of the same step without swaps".into(),
            ratio: busy / quiet,
            target: "<= 5% slower".into(),
            meets_target: Some(slowdown <= 0.05),
            note: format!(
                "slowdown {:+.2}%; swaps during it: {} out at {:.1} GB/s, {} in at {:.1} GB/s (copy-time weighted); averaged over the timed steps {:.1} out + {:.1} in = {:.1} GB/s aggregate (floors {:.1}/{:.1} GB/s)",
                slowdown * 100.0,
                outs.len(),
                copy_gb(&outs),
                ins.len(),
                copy_gb(&ins),
                window_gb(&outs),
                window_gb(&ins),
                window_gb(&outs) + window_gb(&ins),
                floors.out_gb_per_s,
                floors.in_gb_per_s
            ),
        },
    ])
}

const PROBE_SOURCE: &str = r#"
extern "C" __global__ void mapped_copy(const unsigned int* __restrict__ src, unsigned int* __restrict__ dst, unsigned int count) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
        dst[i] = src[i];
    }
}
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeMode {
    /// cuMemcpyHtoDAsync of 4 KiB from pinned memory on the compute stream.
    MemcpyH2dPinned,
    /// cuMemcpyDtoHAsync of 4 KiB into pinned memory on the compute stream.
    MemcpyD2hPinned,
    /// cuMemcpyDtoHAsync of 128 B into a pageable Vec (how a step reads 32 greedy tokens back).
    MemcpyD2hPageable,
    /// A kernel reading 4 KiB of mapped pinned memory and one writing 4 KiB to it.
    KernelMapped,
}

impl ProbeMode {
    fn describe(self) -> &'static str {
        match self {
            ProbeMode::MemcpyH2dPinned => {
                "cuMemcpyAsync 4 KiB pinned host->device on the compute stream"
            }
            ProbeMode::MemcpyD2hPinned => {
                "cuMemcpyAsync 4 KiB device->pinned host on the compute stream"
            }
            ProbeMode::MemcpyD2hPageable => {
                "cuMemcpyAsync 128 B device->pageable Vec on the compute stream"
            }
            ProbeMode::KernelMapped => {
                "kernels moving 4 KiB in and 4 KiB out over mapped pinned memory (no copy engine)"
            }
        }
    }
}

/// Why the engine's decode step slows down while swapping: a step's small input/output copies on
/// the compute stream share the copy engines with the swaps. Times (host wall clock, enqueue to
/// completion, as a run loop sees it) small transfers on the compute stream with the copy streams
/// idle and with both directions swapping, by copy-engine memcpys and by kernels over mapped
/// pinned memory.
fn copy_engine_probe(
    device: &GpuDevice,
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    records: &mut Vec<SwapRecord>,
) -> Result<Vec<SwapBenchRow>, SwapBenchError> {
    const BYTES: usize = 4096;
    let ctx = &device.ctx;
    let stream = &device.stream;
    let module = device.compile(PROBE_SOURCE, &[])?;
    let function = device.function(&module, "mapped_copy")?;
    let device_buffer = DeviceBuffer::alloc(ctx, BYTES, "the copy-engine probe's device buffer")?;
    ctx.bind_to_thread()
        .map_err(driver("binding the context"))?;
    // DEVICEMAP: kernels read and write this host memory over PCIe themselves.
    let host =
        unsafe { cudarc::driver::result::malloc_host(2 * BYTES, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(driver("allocating the probe's mapped host memory"))? as *mut u8;
    let mut host_device_ptr: sys::CUdeviceptr = 0;
    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut host_device_ptr, host as *mut _, 0) }
        .result()
        .map_err(driver("mapping the probe's host memory"))?;
    let count = (BYTES / 4) as u32;
    let dev = device_buffer.ptr();
    let host_in = host_device_ptr;
    let host_out = host_device_ptr + BYTES as u64;
    let mut pageable = vec![0u32; 32];
    let mut time_one = |mode: ProbeMode| -> Result<f64, SwapBenchError> {
        let started = Instant::now();
        match mode {
            ProbeMode::KernelMapped => {
                for (src, dst) in [(host_in, dev), (dev, host_out)] {
                    let mut launch = stream.launch_builder(&function);
                    launch.arg(&src).arg(&dst).arg(&count);
                    unsafe {
                        launch.launch(LaunchConfig {
                            grid_dim: (1, 1, 1),
                            block_dim: (256, 1, 1),
                            shared_mem_bytes: 0,
                        })
                    }
                    .map_err(driver("launching the mapped-copy kernel"))?;
                }
            }
            ProbeMode::MemcpyH2dPinned => unsafe {
                sys::cuMemcpyHtoDAsync_v2(dev, host as *const _, BYTES, stream.cu_stream())
                    .result()
                    .map_err(driver("probe H2D copy"))?
            },
            ProbeMode::MemcpyD2hPinned => unsafe {
                sys::cuMemcpyDtoHAsync_v2(host.add(BYTES) as *mut _, dev, BYTES, stream.cu_stream())
                    .result()
                    .map_err(driver("probe D2H copy"))?
            },
            ProbeMode::MemcpyD2hPageable => unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut pageable, dev, stream.cu_stream())
                    .map_err(driver("probe pageable D2H copy"))?
            },
        }
        stream
            .synchronize()
            .map_err(driver("waiting for the probe"))?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    };
    let reps = 20;
    let mut rows = Vec::new();
    for mode in [
        ProbeMode::MemcpyH2dPinned,
        ProbeMode::MemcpyD2hPinned,
        ProbeMode::MemcpyD2hPageable,
        ProbeMode::KernelMapped,
    ] {
        for _ in 0..3 {
            time_one(mode)?;
        }
        let quiet: Vec<f64> = (0..reps)
            .map(|_| time_one(mode))
            .collect::<Result<_, _>>()?;
        let mut pump = SwapPump {
            traffic,
            load: load(2, true, true, false),
            next: [0, 0],
            queued: [0, 0],
        };
        let mut busy = Vec::new();
        for _ in 0..reps {
            pump.top_up(engine, records)?;
            busy.push(time_one(mode)?);
            // Space the probes like decode steps, so the copy queues refill between them.
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        records.extend(engine.wait_all()?);
        let quiet_p50 = percentile_50(&quiet);
        let busy_p50 = percentile_50(&busy);
        rows.push(SwapBenchRow {
            section: "copy-engine probe".into(),
            name: format!(
                "{} while both directions swap (2 x 1 GiB queued each)",
                mode.describe()
            ),
            bytes: if mode == ProbeMode::MemcpyD2hPageable {
                128
            } else {
                BYTES as u64
            },
            ms_p50: busy_p50,
            ms_min: min_of(&busy),
            reps: busy.len(),
            gb_per_s: 0.0,
            floor: quiet_p50,
            floor_what: "ms p50 of the same with the copy streams idle (host wall clock)".into(),
            ratio: busy_p50 / quiet_p50,
            target: "-".into(),
            meets_target: None,
            note: format!(
                "max while swapping {:.3} ms",
                busy.iter().cloned().fold(0.0, f64::max)
            ),
        });
    }
    unsafe { cudarc::driver::result::free_host(host as *mut _) }
        .map_err(driver("freeing the probe's host memory"))?;
    Ok(rows)
}

/// One line per row: figure, floor, ratio, target.
pub fn format_row(row: &SwapBenchRow) -> String {
    let verdict = match row.meets_target {
        Some(true) => "MEETS",
        Some(false) => "MISSES",
        None => "",
    };
    format!(
        "[{}] {}: {:.3} ms p50 (min {:.3}, n={}), {:.1} GB/s | floor {:.2} ({}) ratio {:.3} | target {} {} | {}",
        row.section,
        row.name,
        row.ms_p50,
        row.ms_min,
        row.reps,
        row.gb_per_s,
        row.floor,
        row.floor_what,
        row.ratio,
        row.target,
        verdict,
        row.note
    )
}
