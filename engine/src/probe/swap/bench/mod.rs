//! `djinn engine swap-bench`: swap bandwidth on the GPU, each figure beside the floor measured in
//! the same run (one large contiguous pinned copy per direction, and both at once).
//!
//! Sections, one file each:
//! 1. `floors`: 1 GiB contiguous device->host, host->device, and both directions at once;
//! 2. `transfers`: one agent's context (llama2-7b fp16: 2,048 tokens = 128 blocks = 1 GiB; 4,096
//!    tokens = 2 GiB) swapped out and back in with scattered block ids on both sides (the worst
//!    case: every block is its own 8 MiB copy), batched and per-run; then N agents out while N
//!    others come in;
//! 3. `decode`: decode steps (batch 32, context 2048) alone and while both directions swap, with
//!    the CUDA engine's real decode step and with a synthetic memory-bound kernel reading the same
//!    bytes (labelled as such); `copy_engine`: small copies on the compute stream while swapping.
//!
//! Two other measurements replace sections 2-3 when asked for: `interference` (what slows a
//! decode step down while swaps run, and by how much at each swap operating point) and `layered`
//! (per-layer readiness of a swapped-in context).

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

mod copy_engine;
mod decode;
mod floors;
pub mod interference;
mod layered;
mod transfers;

use decode::{EngineDecode, SyntheticDecode};
use floors::Floors;
pub use interference::ArmSet;
use transfers::SwapTraffic;

use super::{driver, Invocation, ProbeError, Provenance};
use crate::config::{DType, KvLayout, ModelConfig};
use crate::cuda::{CudaModel, CudaModelOptions, DeviceBuffer, GpuDevice, WeightSource};
use crate::swap::cuda::{
    high_priority_stream, CopyMethod, CudaSwapEngine, GpuKvPoolRef, PinnedHostPool,
};
use crate::swap::{SwapEngine, SwapRecord};

/// Errors of the bench.
pub type SwapBenchError = ProbeError;

/// Which decode step runs during the slowdown measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeLoad {
    /// The CUDA engine's decode step (`CudaModel`, random llama2-7b weights).
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
    /// Agents swapping in each direction at once (many-agent transfers and the decode load).
    pub agents_per_direction: usize,
    /// Context of each of those agents, tokens.
    pub agent_context_tokens: usize,
    pub reps: usize,
    pub decode_load: DecodeLoad,
    pub decode_batch: usize,
    pub decode_context_tokens: usize,
    pub decode_steps: usize,
    pub seed: u64,
    /// Per-direction rate caps (GB/s) of the paced arms of the engine decode measurement, each
    /// run beside both directions swapping (empty: no paced arms).
    pub decode_rate_caps_gbps: Vec<f64>,
    /// Rounds of the interference probe (0: off). When on, the transfer sections are skipped and
    /// the decode section runs the probe's arms instead (see `interference`).
    pub interference_rounds: usize,
    /// The probe's arm sets; the synthetic victim skips the operating-point sets.
    pub interference_sets: Vec<ArmSet>,
    /// Repetitions of the per-layer readiness measurement (0: off). When on, the transfer
    /// sections are skipped and the engine section measures only that (see `layered`).
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
            decode_rate_caps_gbps: vec![50.0, 46.0, 43.0, 40.0],
            interference_rounds: 0,
            interference_sets: vec![ArmSet::Probe, ArmSet::Operating],
            layered_reps: 0,
        }
    }
}

impl SwapBenchOptions {
    /// Checks every option before any GPU work; returns the model preset.
    fn validate(&self) -> Result<ModelConfig, SwapBenchError> {
        let config = ModelConfig::preset(&self.model).ok_or_else(|| {
            SwapBenchError::BadOption(format!("--model: unknown model preset `{}`", self.model))
        })?;
        for (flag, value) in [
            ("--agents", self.agents_per_direction),
            ("--agent-context", self.agent_context_tokens),
            ("--reps", self.reps),
            ("--decode-batch", self.decode_batch),
            ("--decode-context", self.decode_context_tokens),
            ("--decode-steps", self.decode_steps),
            ("block size", self.block_size_tokens),
        ] {
            if value == 0 {
                return Err(SwapBenchError::BadOption(format!(
                    "{flag} must be at least 1"
                )));
            }
        }
        if let Some(cap) = self
            .decode_rate_caps_gbps
            .iter()
            .find(|cap| !(cap.is_finite() && **cap > 0.0))
        {
            return Err(SwapBenchError::BadOption(format!(
                "--decode-rate-caps-gbps: {cap} is not a positive number of GB/s"
            )));
        }
        Ok(config)
    }

    /// Whether one of the measurements that replace the transfer sections was asked for.
    fn skips_transfers(&self) -> bool {
        self.interference_rounds > 0 || self.layered_reps > 0
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
    /// Command line, git commit, card and driver this report was measured with.
    pub provenance: Provenance,
    pub host_mem_total_bytes: u64,
    pub options: SwapBenchOptions,
    pub block_bytes: usize,
    pub host_pool_bytes: u64,
    pub host_pool_pin_ms: f64,
    pub rows: Vec<SwapBenchRow>,
    /// Per-swap records of the transfer and decode sections (the calibration input), in
    /// completion order.
    pub swap_records: Vec<SwapRecord>,
}

const GIB: u64 = 1 << 30;

/// The report being filled and the caller's per-row callback.
struct Rows<'a> {
    report: SwapBenchReport,
    on_row: &'a mut dyn FnMut(&SwapBenchRow),
}

impl Rows<'_> {
    fn push(&mut self, row: SwapBenchRow) {
        (self.on_row)(&row);
        self.report.rows.push(row);
    }

    fn extend(&mut self, rows: Vec<SwapBenchRow>) {
        for row in rows {
            self.push(row);
        }
    }

    fn records(&mut self) -> &mut Vec<SwapRecord> {
        &mut self.report.swap_records
    }
}

/// Block counts the bench works with, from the options.
#[derive(Clone, Copy)]
struct Geometry {
    block_bytes: usize,
    blocks_per_agent: usize,
    /// Device blocks swapped (one set out, one set in, per agent); the host pool has as many.
    swap_blocks: u32,
}

impl Geometry {
    fn new(config: &ModelConfig, options: &SwapBenchOptions) -> Result<Self, SwapBenchError> {
        let layout = KvLayout::new(config, options.block_size_tokens);
        let block_bytes = layout.block_elems() * DType::F16.size_bytes();
        let blocks_per_agent = options
            .agent_context_tokens
            .div_ceil(options.block_size_tokens);
        let blocks_4k = 4096usize.div_ceil(options.block_size_tokens);
        // At least room for the 4k-token agent's out and in blocks.
        let swap_blocks = options
            .agents_per_direction
            .checked_mul(2 * blocks_per_agent)
            .map(|n| n.max(2 * blocks_4k))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                SwapBenchError::BadOption(format!(
                    "--agents {} x --agent-context {} needs more blocks than a pool can number",
                    options.agents_per_direction, options.agent_context_tokens
                ))
            })?;
        Ok(Geometry {
            block_bytes,
            blocks_per_agent,
            swap_blocks,
        })
    }
}

/// The bench, step by step; `on_row` sees each figure as it is measured.
pub fn run(
    options: &SwapBenchOptions,
    invocation: Invocation,
    mut on_row: impl FnMut(&SwapBenchRow),
) -> Result<SwapBenchReport, SwapBenchError> {
    let config = options.validate()?;
    let geometry = Geometry::new(&config, options)?;
    let mut device = GpuDevice::open(0)?;
    let provenance = Provenance::of(&device, invocation);
    let host_memory = crate::swap::host_pool::HostMemory::read();
    let epoch = Instant::now();
    let pin_start = Instant::now();
    let host_pool = PinnedHostPool::new(&device.ctx, geometry.block_bytes, geometry.swap_blocks)?;
    let host_pool_pin_ms = pin_start.elapsed().as_secs_f64() * 1e3;
    println!(
        "device {} (driver {}, CUDA {}), block {} bytes ({} tokens of {}), pinned host pool {:.2} GiB pinned in {:.0} ms",
        provenance.device,
        provenance.driver_version,
        provenance.cuda_driver_api,
        geometry.block_bytes,
        options.block_size_tokens,
        options.model,
        host_pool.total_bytes() as f64 / GIB as f64,
        host_pool_pin_ms
    );
    let mut rows = Rows {
        report: SwapBenchReport {
            provenance,
            host_mem_total_bytes: host_memory.map(|m| m.mem_total_bytes).unwrap_or(0),
            options: options.clone(),
            block_bytes: geometry.block_bytes,
            host_pool_bytes: host_pool.total_bytes(),
            host_pool_pin_ms,
            rows: Vec::new(),
            swap_records: Vec::new(),
        },
        on_row: &mut on_row,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let own = OwnPoolRun {
        options,
        config: &config,
        geometry,
        epoch,
    };
    let (host_pool, floors) = own.run(&mut device, host_pool, &mut rng, &mut rows)?;
    if matches!(options.decode_load, DecodeLoad::Engine | DecodeLoad::Both) {
        let engine = EngineRun {
            options,
            config: &config,
            geometry,
            epoch,
            floors: &floors,
        };
        engine.run(device, host_pool, &mut rng, &mut rows)?;
    }
    Ok(rows.report)
}

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

/// The floors, transfers and synthetic decode rows, on a device pool of the bench's own.
struct OwnPoolRun<'a> {
    options: &'a SwapBenchOptions,
    config: &'a ModelConfig,
    geometry: Geometry,
    epoch: Instant,
}

impl OwnPoolRun<'_> {
    /// Returns the pinned pool (pinning is slow; the engine section reuses it) and the floors.
    fn run(
        &self,
        device: &mut GpuDevice,
        host_pool: PinnedHostPool,
        rng: &mut ChaCha8Rng,
        rows: &mut Rows,
    ) -> Result<(PinnedHostPool, Floors), SwapBenchError> {
        let options = self.options;
        let Geometry {
            block_bytes,
            blocks_per_agent,
            swap_blocks,
        } = self.geometry;
        let own = OwnPool {
            buffer: DeviceBuffer::alloc(
                &device.ctx,
                swap_blocks as usize * block_bytes,
                "the swap benchmark's device pool",
            )?,
            block_bytes,
            block_count: swap_blocks,
        };
        let mut engine = CudaSwapEngine::new(
            &device.ctx,
            own.pool_ref(),
            host_pool,
            None,
            CopyMethod::Batched,
            256,
            self.epoch,
        )?;
        let floors = floors::measure_floors(&engine, options.reps)?;
        rows.extend(floors.rows());
        if !options.skips_transfers() {
            for (tokens, method) in [
                (2048usize, CopyMethod::Batched),
                (4096, CopyMethod::Batched),
                (2048, CopyMethod::PerRun),
            ] {
                engine.set_copy_method(method);
                let blocks = tokens.div_ceil(options.block_size_tokens);
                let records = &mut rows.report.swap_records;
                let measured = transfers::single_agent(
                    &mut engine,
                    rng,
                    blocks,
                    tokens,
                    options.reps,
                    &floors,
                    records,
                )?;
                rows.extend(measured);
            }
            engine.set_copy_method(CopyMethod::Batched);
            let measured = transfers::many_agents(
                &mut engine,
                rng,
                options,
                blocks_per_agent,
                &floors,
                rows.records(),
            )?;
            rows.extend(measured);
        }
        let plan = SwapTraffic::new(
            rng,
            options.agents_per_direction,
            blocks_per_agent,
            0,
            swap_blocks,
        );
        if matches!(
            options.decode_load,
            DecodeLoad::Synthetic | DecodeLoad::Both
        ) {
            self.synthetic_decode(device, &mut engine, &plan, &floors, rows)?;
        }
        let host_pool = engine.into_host_pool()?;
        drop(own);
        Ok((host_pool, floors))
    }

    /// The synthetic stand-in beside the swap loads (or the interference arms), then the
    /// copy-engine probe.
    fn synthetic_decode(
        &self,
        device: &mut GpuDevice,
        engine: &mut CudaSwapEngine,
        plan: &SwapTraffic,
        floors: &Floors,
        rows: &mut Rows,
    ) -> Result<(), SwapBenchError> {
        let options = self.options;
        let decode_bytes = decode_step_bytes(
            self.config,
            options.decode_batch,
            options.decode_context_tokens,
        );
        if options.interference_rounds > 0 {
            // The victim at the greatest priority, as the engine's forward in the engine section.
            device.stream = high_priority_stream(&device.ctx)?;
            let setup = interference::InterferenceSetup {
                sets: &options.interference_sets,
                rounds: options.interference_rounds,
                steps: options.decode_steps,
                floors,
                step_bytes: decode_bytes,
            };
            return interference::synthetic_victim(&setup, device, engine, plan, &mut |row| {
                rows.push(row)
            });
        }
        let mut synthetic = SyntheticDecode::new(device, decode_bytes)?;
        for load in decode::SYNTHETIC_LOADS {
            let measured = decode::decode_slowdown(
                engine,
                plan,
                options,
                floors,
                rows.records(),
                "synthetic",
                load,
                || synthetic.step(),
            )?;
            rows.extend(measured);
        }
        drop(synthetic);
        let measured = copy_engine::copy_engine_probe(device, engine, plan, rows.records())?;
        rows.extend(measured);
        Ok(())
    }
}

/// The engine decode rows (or the interference probe, or per-layer readiness) on the CUDA
/// engine's own KV pool, with the swap blocks after the decode batch's blocks.
struct EngineRun<'a> {
    options: &'a SwapBenchOptions,
    config: &'a ModelConfig,
    geometry: Geometry,
    epoch: Instant,
    floors: &'a Floors,
}

impl EngineRun<'_> {
    fn run(
        &self,
        mut device: GpuDevice,
        host_pool: PinnedHostPool,
        rng: &mut ChaCha8Rng,
        rows: &mut Rows,
    ) -> Result<(), SwapBenchError> {
        let options = self.options;
        let Geometry {
            block_bytes,
            blocks_per_agent,
            swap_blocks,
        } = self.geometry;
        let decode_blocks = options.decode_batch
            * options
                .decode_context_tokens
                .div_ceil(options.block_size_tokens);
        let mut model_options = CudaModelOptions::for_config(self.config);
        model_options.block_size_tokens = options.block_size_tokens;
        model_options.num_kv_blocks = Some(decode_blocks + swap_blocks as usize);
        model_options.max_seqs_per_step = options.decode_batch;
        model_options.max_tokens_per_step = 512;
        // The forward at the greatest stream priority, as `djinn engine run` sets it up for the
        // gather kernel; a copy engine ignores stream priorities, so the DMA rows compare like
        // with like.
        device.stream = high_priority_stream(&device.ctx)?;
        let mut model = CudaModel::new(
            device,
            WeightSource::DeviceRandom {
                config: self.config.clone(),
                seed: options.seed,
            },
            model_options,
        )?;
        model.fill_kv_random(options.seed ^ 0x5eed, 1.0)?;
        model.capture_decode_graphs(options.decode_batch)?;
        let pool = model.kv_pool();
        if pool.block_bytes() != block_bytes {
            return Err(SwapBenchError::BadOption(format!(
                "the engine's KV blocks are {} bytes, the bench's layout says {block_bytes}",
                pool.block_bytes()
            )));
        }
        let pool_ref = GpuKvPoolRef {
            base: pool.base_device_ptr(),
            block_bytes,
            block_count: pool.num_blocks() as u32,
        };
        let ctx = model.device.ctx.clone();
        let mut engine = CudaSwapEngine::new(
            &ctx,
            pool_ref,
            host_pool,
            Some(model.device.stream.clone()),
            CopyMethod::Batched,
            256,
            self.epoch,
        )?;
        let plan = SwapTraffic::new(
            rng,
            options.agents_per_direction,
            blocks_per_agent,
            decode_blocks as u32,
            swap_blocks,
        );
        let mut decode =
            EngineDecode::new(&model, options.decode_batch, options.decode_context_tokens);
        if options.layered_reps > 0 {
            let measured = layered::layered_readiness(
                &mut model,
                &mut engine,
                options,
                decode_blocks as u32,
                swap_blocks,
                self.floors,
                rows.records(),
            )?;
            rows.extend(measured);
        } else if options.interference_rounds > 0 {
            let setup = interference::InterferenceSetup {
                sets: &options.interference_sets,
                rounds: options.interference_rounds,
                steps: options.decode_steps,
                floors: self.floors,
                step_bytes: decode_step_bytes(
                    self.config,
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
                &mut |row| rows.push(row),
            )?;
        } else {
            for arm in decode::engine_arms(&options.decode_rate_caps_gbps) {
                engine.set_rate_cap(&model.device, arm.rate_cap_gbps)?;
                let measured = decode::decode_slowdown(
                    &mut engine,
                    &plan,
                    options,
                    self.floors,
                    rows.records(),
                    &format!("engine [{}]", arm.describe()),
                    arm.load,
                    || decode.step(&mut model),
                )?;
                rows.extend(measured);
            }
            engine.set_rate_cap(&model.device, None)?;
        }
        engine.wait_all()?;
        Ok(())
    }
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
