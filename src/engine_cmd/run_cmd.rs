//! `djinn engine run`: a workload through the simulator's run loop (`sim::driver::run`) on the
//! real engine, with a wall clock, writing the same run directories as `djinn simulate`.
//!
//! Steps are timed on the host around each forward (steps.csv), swaps by the copy engine's own
//! events (swaps.csv: bytes, copy start and end, direction and the swaps in flight when each
//! began). `--compare-sim` also simulates the same workload, seed, policy and pool sizes with a
//! GPU profile and prints real and simulated figures side by side: this is how real traces feed
//! calibration.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use engine::batch::PagedModel;
use engine::config::{KvLayout, ModelConfig};
use engine::swap::backend::{EngineBackend, SwapEstimate, SwapExecutor};
use engine::WallClock;
use sim::driver::{CheckLevel, RunLimits, RunOutput, RunSettings};
use sim::experiment::SimConfig;
use sim::time::SimTime;
use sim::workload::Workload;
use sim::PolicyKind;
use traces::{RunSummary, StepRecord, SwapRecord, WorkloadSpec};

use crate::runio::{code_version, load_workload, run_dir};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineBackendKind {
    /// The CPU reference forward (candle) and the CPU swap engine: tiny models, CI.
    Cpu,
    /// The CUDA forward and the GPU swap engine (pinned host pool, copy streams); needs `--features cuda`.
    Cuda,
}

/// How swap-ins are copied on the GPU (swap-outs always use the batched DMA copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SwapInCopy {
    /// One batched DMA call (`cuMemcpyBatchAsync`) per swap on the copy engine.
    Dma,
    /// A gather kernel on a low-priority stream reading the pinned host blocks through their
    /// mapped device address (SM-driven; see engine/NOTES-swap.md for the measurements).
    Kernel,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Workload: a shipped name (seed-cliff, seed-exp1, ...) or a path to a TOML spec.
    #[arg(
        long,
        short = 'w',
        default_value = "seed-cliff",
        value_name = "NAME|PATH"
    )]
    pub workload: String,
    /// Policy (any simulator policy: djinn, vllm, swap, pin, ...); repeat to run several one after
    /// another on the same engine. Default: djinn.
    #[arg(long = "policy", short = 'p', value_name = "NAME")]
    pub policies: Vec<String>,
    /// Number of agents (default: the workload's own).
    #[arg(long, short = 'n')]
    pub agents: Option<u32>,
    /// Root seed of the workload and of the input tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = EngineBackendKind::Cuda)]
    pub backend: EngineBackendKind,
    /// Model preset (llama2-7b, smollm2-135m, tiny, tiny-gqa) with seeded random weights (on the
    /// GPU for the CUDA backend). Default: llama2-7b on cuda, tiny on cpu.
    #[arg(long)]
    pub model: Option<String>,
    /// Real weights instead of a preset: an HF directory (config.json + safetensors) or a GGUF file.
    #[arg(long, conflicts_with = "model")]
    pub weights: Option<PathBuf>,
    /// GPU KV pool, GiB (default on cuda: all device memory left after weights, activations and
    /// a reserve; on cpu: 256 blocks).
    #[arg(long, conflicts_with = "gpu_kv_blocks")]
    pub gpu_kv_gib: Option<f64>,
    /// GPU KV pool, blocks.
    #[arg(long)]
    pub gpu_kv_blocks: Option<u32>,
    /// Host (pinned) KV pool for swapped-out KV, GiB (default on cuda: 16 GiB; pinning takes
    /// about 0.5 s per GiB; on cpu: 1024 blocks).
    #[arg(long, conflicts_with = "host_kv_blocks")]
    pub host_kv_gib: Option<f64>,
    /// Host KV pool, blocks.
    #[arg(long)]
    pub host_kv_blocks: Option<u32>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// Chunked-prefill token budget per step (also the engine's largest step).
    #[arg(long, default_value_t = 4096)]
    pub max_batch_tokens: u32,
    /// Most sequences in one step (also the largest decode graph).
    #[arg(long, default_value_t = 256)]
    pub max_batch_sequences: u32,
    /// GPU profile: the cost hints the policies plan with, and the simulated GPU of --compare-sim.
    #[arg(long, default_value = calibration::DEFAULT_PROFILE, value_name = "NAME|PATH")]
    pub profile: String,
    /// Also simulate the same workload, seed, policy and pool sizes and print real vs simulated.
    #[arg(long)]
    pub compare_sim: bool,
    /// What hint-using policies do with pause hints: hint, ewma or none.
    #[arg(long, default_value = "hint", value_parser = ["hint", "ewma", "none"])]
    pub predictor: String,
    /// Latency SLO (ms) whose attainment the summary reports.
    #[arg(long, default_value_t = 5000.0)]
    pub slo_ms: f64,
    /// A run taking longer than this (wall clock) stops with an error.
    #[arg(long, default_value_t = 1800.0)]
    pub time_limit_s: f64,
    /// How swap-ins are copied on the GPU.
    #[arg(long, value_enum, default_value_t = SwapInCopy::Dma)]
    pub swap_in_copy: SwapInCopy,
    /// Cap each copy direction at this many GB/s (paced DMA; CUDA only). Swaps cost a memory-bound
    /// decode step HBM bandwidth in proportion to their rate (engine/NOTES-swap.md); the default
    /// runs them at the link's full speed.
    #[arg(long)]
    pub swap_rate_cap_gbps: Option<f64>,
    /// Cap swap-ins only (overrides --swap-rate-cap-gbps for that direction; CUDA only). A swap-in
    /// writes HBM and costs a decode step ~3x more per byte than a swap-out, which reads it
    /// (NOTES-swap.md, session 3): on the H100, swap-out at full speed with swap-in capped at 34
    /// GB/s kept batch-32 decode within 5%.
    #[arg(long)]
    pub swap_in_rate_cap_gbps: Option<f64>,
    /// Cap swap-outs only (overrides --swap-rate-cap-gbps for that direction; CUDA only).
    #[arg(long)]
    pub swap_out_rate_cap_gbps: Option<f64>,
    /// Folder for the run directories (<out>/<workload>/<policy>/; with --compare-sim also
    /// <policy>.sim/) and comparison.csv.
    #[arg(long, default_value = "results/engine-run")]
    pub out: PathBuf,
    /// Do not write run directories, only print the tables.
    #[arg(long)]
    pub no_write: bool,
}

/// Validated inputs.
struct RunPlan {
    spec: WorkloadSpec,
    agents: u32,
    workload: Workload,
    policies: Vec<PolicyKind>,
    /// Profile, predictor, block size, batch limits (pool sizes come from the engine).
    base: SimConfig,
    model_config: ModelConfig,
    model_label: String,
}

/// What the engine was built with (for manifests and tables).
pub struct EngineInfo {
    pub backend: &'static str,
    pub device: String,
    pub block_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub gpu_blocks: u32,
    pub host_blocks: u32,
    /// Start-up notes printed and written to the manifest (pin time, memory breakdown).
    pub notes: Vec<(String, String)>,
}

const GIB: f64 = (1u64 << 30) as f64;

fn validate(args: &RunArgs) -> Result<RunPlan> {
    let spec = load_workload(&args.workload)?;
    let policies = crate::runio::parse_policies(&args.policies, &[PolicyKind::Djinn])?;
    crate::runio::check_agents_flag(args.agents)?;
    for (flag, value) in [
        ("--gpu-kv-gib", args.gpu_kv_gib),
        ("--host-kv-gib", args.host_kv_gib),
    ] {
        if let Some(v) = value {
            if !(v.is_finite() && v > 0.0 && v <= 65536.0) {
                bail!("{flag} must be a number in (0, 65536], got {v}");
            }
        }
    }
    for (flag, value) in [
        ("--gpu-kv-blocks", args.gpu_kv_blocks),
        ("--host-kv-blocks", args.host_kv_blocks),
    ] {
        if value == Some(0) {
            bail!("{flag} must be at least 1");
        }
    }
    if args.block_size == 0 || args.block_size > 256 {
        bail!("--block-size must be in 1..=256, got {}", args.block_size);
    }
    if args.max_batch_tokens == 0 || args.max_batch_tokens > 65536 {
        bail!(
            "--max-batch-tokens must be in 1..=65536, got {}",
            args.max_batch_tokens
        );
    }
    if args.max_batch_sequences == 0 || args.max_batch_sequences > 1024 {
        bail!(
            "--max-batch-sequences must be in 1..=1024, got {}",
            args.max_batch_sequences
        );
    }
    if !(args.slo_ms.is_finite() && args.slo_ms > 0.0) {
        bail!("--slo-ms must be a finite number > 0, got {}", args.slo_ms);
    }
    if !(args.time_limit_s.is_finite() && args.time_limit_s > 0.0) {
        bail!(
            "--time-limit-s must be a finite number > 0, got {}",
            args.time_limit_s
        );
    }
    if args.backend == EngineBackendKind::Cpu && args.swap_in_copy != SwapInCopy::Dma {
        bail!("--swap-in-copy kernel needs --backend cuda");
    }
    for (flag, cap) in [
        ("--swap-rate-cap-gbps", args.swap_rate_cap_gbps),
        ("--swap-in-rate-cap-gbps", args.swap_in_rate_cap_gbps),
        ("--swap-out-rate-cap-gbps", args.swap_out_rate_cap_gbps),
    ] {
        if let Some(cap) = cap {
            if !(cap.is_finite() && cap > 0.0) {
                bail!("{flag} must be a finite number of GB/s > 0, got {cap}");
            }
            if args.backend == EngineBackendKind::Cpu {
                bail!("{flag} needs --backend cuda");
            }
        }
    }
    let (model_config, model_label) = match (&args.weights, &args.model) {
        (Some(path), _) => (weights_config(path)?, path.display().to_string()),
        (None, model) => {
            let name = model.clone().unwrap_or_else(|| {
                match args.backend {
                    EngineBackendKind::Cuda => "llama2-7b",
                    EngineBackendKind::Cpu => "tiny",
                }
                .to_string()
            });
            let config = ModelConfig::preset(&name).with_context(|| {
                format!(
                    "unknown model preset `{name}` (known: {})",
                    ModelConfig::PRESET_NAMES.join(", ")
                )
            })?;
            (
                config,
                format!("{name} (random weights, seed {})", args.seed),
            )
        }
    };
    if args.backend == EngineBackendKind::Cpu && args.weights.is_none() {
        let params = engine::weights::WeightSet::expected_shapes(&model_config)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum::<usize>();
        if params > 1 << 30 {
            bail!(
                "--model {} has {:.1} B parameters: too large for the CPU backend's f32 reference forward; use --backend cuda or a tiny model",
                model_config.name,
                params as f64 / 1e9
            );
        }
    }
    if spec.max_context_tokens as usize > model_config.max_position_embeddings {
        bail!(
            "workload `{}` allows contexts of {} tokens but model {} has {} positions",
            spec.name,
            spec.max_context_tokens,
            model_config.name,
            model_config.max_position_embeddings
        );
    }
    let agents = spec.agent_count(args.agents);
    let workload = sim::replay::build_workload(&spec, agents, args.seed)?;
    let profile = calibration::load_profile(&args.profile)?;
    let mut base = SimConfig::new(PolicyKind::Djinn, profile);
    base.seed = args.seed;
    base.block_size_tokens = args.block_size;
    base.sched.max_batch_tokens = args.max_batch_tokens;
    base.sched.max_batch_sequences = args.max_batch_sequences;
    base.predictor = sim::policies::PredictorMode::parse(&args.predictor).context("--predictor")?;
    base.check = CheckLevel::Step {
        audit_interval_steps: 256,
    };
    base.limits = RunLimits {
        max_sim_time: SimTime::from_secs_f64(args.time_limit_s),
        ..RunLimits::default()
    };
    Ok(RunPlan {
        spec,
        agents,
        workload,
        policies,
        base,
        model_config,
        model_label,
    })
}

/// The model config of `--weights`: from `config.json` alone for an HF directory (a 7B checkpoint is
/// not read twice), else by loading the file (GGUF metadata and tensors).
fn weights_config(path: &std::path::Path) -> Result<ModelConfig> {
    let dir = if path.is_dir() {
        Some(path)
    } else {
        path.parent()
    };
    let is_gguf = path.extension().is_some_and(|ext| ext == "gguf");
    if let (false, Some(dir)) = (is_gguf, dir) {
        let config_path = dir.join("config.json");
        if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "weights".into());
            return Ok(engine::weights::config_from_hf_json(
                &json,
                &config_path,
                &name,
            )?);
        }
    }
    Ok(engine::weights::WeightSet::load(path)
        .with_context(|| format!("reading the weights at {}", path.display()))?
        .config)
}

/// Blocks of a pool given in GiB or blocks.
fn pool_blocks(gib: Option<f64>, blocks: Option<u32>, block_bytes: u64) -> Option<u32> {
    match (gib, blocks) {
        (_, Some(b)) => Some(b),
        (Some(g), None) => Some(
            ((g * GIB) / block_bytes as f64)
                .floor()
                .min(u32::MAX as f64) as u32,
        ),
        (None, None) => None,
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let plan = validate(&args)?;
    match args.backend {
        EngineBackendKind::Cpu => run_cpu(&args, &plan),
        EngineBackendKind::Cuda => run_cuda(&args, &plan),
    }
}

fn run_cpu(args: &RunArgs, plan: &RunPlan) -> Result<()> {
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

#[cfg(not(feature = "cuda"))]
fn run_cuda(_args: &RunArgs, _plan: &RunPlan) -> Result<()> {
    bail!("this djinn was built without the CUDA backend; rebuild with `cargo build --release --features cuda`, or use --backend cpu with a tiny model")
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &RunArgs, plan: &RunPlan) -> Result<()> {
    use engine::cuda::{CudaModel, CudaModelOptions, GpuDevice, WeightSource};
    use engine::swap::cuda::{CopyMethod, CudaSwapEngine, GpuKvPoolRef, PinnedHostPool};
    use engine::swap::SwapDirection;

    let started = Instant::now();
    let mut device = GpuDevice::open(0)?;
    let device_name = device.name.clone();
    if args.swap_in_copy == SwapInCopy::Kernel {
        // The forward runs at the highest priority so the copy kernel's CTAs yield to it.
        device.stream = engine::swap::cuda::high_priority_stream(&device.ctx)
            .context("creating a high-priority compute stream")?;
    }
    let ctx = device.ctx.clone();
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
    let mut model = CudaModel::new(device, source, options)?;
    let graphs = (plan.agents as usize).min(args.max_batch_sequences as usize);
    model.capture_decode_graphs(graphs)?;
    // One prefill per 512-row bucket before the clock starts: the first GEMM of a bucket times
    // cuBLASLt algorithms (30-70 ms per shape, engine/src/cuda/gemm_tune.rs), which inside a run
    // stalled every agent (a 513-token chunk took 89 ms instead of 15; calibration/NOTES.md).
    // The KV it writes lands in blocks no agent owns yet; every block is written before it is read.
    let warmup_started = Instant::now();
    let warmup_buckets = prefill_warmup(
        &mut model,
        args.max_batch_tokens as usize,
        args.block_size as usize,
    )?;
    let prefill_warmup_s = warmup_started.elapsed().as_secs_f64();
    let model_ready_s = started.elapsed().as_secs_f64();
    let pool = model.kv_pool();
    let block_bytes = pool.block_bytes() as u64;
    let gpu_blocks = pool.num_blocks() as u32;
    let pool_ref = GpuKvPoolRef {
        base: pool.base_device_ptr(),
        block_bytes: pool.block_bytes(),
        block_count: gpu_blocks,
    };
    let host_blocks = pool_blocks(args.host_kv_gib, args.host_kv_blocks, block_bytes)
        .unwrap_or_else(|| (16.0 * GIB / block_bytes as f64) as u32);
    if host_blocks == 0 {
        bail!("the host KV pool must hold at least one block of {block_bytes} bytes");
    }
    let pin_started = Instant::now();
    let host_pool = PinnedHostPool::new(&ctx, block_bytes as usize, host_blocks)?;
    let pin_s = pin_started.elapsed().as_secs_f64();
    let epoch = Instant::now();
    let mut swap = CudaSwapEngine::new(
        &ctx,
        pool_ref,
        host_pool,
        Some(model.device.stream.clone()),
        CopyMethod::Batched,
        plan.agents as usize + 8,
        epoch,
    )?;
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

fn swap_estimate(config: &SimConfig) -> SwapEstimate {
    let p = &config.profile;
    SwapEstimate {
        latency_ns: p.host_to_device.latency_ns.max(p.device_to_host.latency_ns),
        out_bytes_per_s: p.device_to_host.bandwidth_bytes_per_s,
        in_bytes_per_s: p.host_to_device.bandwidth_bytes_per_s,
    }
}

/// The run loop's settings on this engine: its pools, block size and the profile's cost hints
/// with the engine's real KV sizes.
fn settings(plan: &RunPlan, info: &EngineInfo) -> RunSettings {
    let mut settings = plan.base.settings();
    settings.gpu_blocks = info.gpu_blocks;
    settings.host_blocks = info.host_blocks;
    settings.costs.block_bytes = info.block_bytes;
    settings.costs.kv_bytes_per_token = info.kv_bytes_per_token;
    settings
}

fn reproduce_line(args: &RunArgs, plan: &RunPlan, policy: PolicyKind, info: &EngineInfo) -> String {
    let model = match (&args.weights, &args.model) {
        (Some(path), _) => format!("--weights {}", path.display()),
        _ => format!("--model {}", plan.model_config.name),
    };
    format!(
        "djinn engine run --backend {} {model} --workload {} --policy {} --agents {} --seed {} --gpu-kv-blocks {} --host-kv-blocks {} --block-size {} --max-batch-tokens {} --max-batch-sequences {} --profile {} --predictor {} --swap-in-copy {}{}{}{}",
        info.backend,
        args.workload,
        policy.name(),
        plan.agents,
        args.seed,
        info.gpu_blocks,
        info.host_blocks,
        args.block_size,
        args.max_batch_tokens,
        args.max_batch_sequences,
        args.profile,
        args.predictor,
        format!("{:?}", args.swap_in_copy).to_lowercase(),
        args.swap_rate_cap_gbps
            .map_or(String::new(), |cap| format!(" --swap-rate-cap-gbps {cap}")),
        args.swap_in_rate_cap_gbps
            .map_or(String::new(), |cap| format!(" --swap-in-rate-cap-gbps {cap}")),
        args.swap_out_rate_cap_gbps
            .map_or(String::new(), |cap| format!(" --swap-out-rate-cap-gbps {cap}"))
    )
}

/// One policy's real run and (optionally) its simulated twin.
struct PolicyResult {
    real: RunSummary,
    real_figures: Figures,
    sim: Option<(RunSummary, Figures)>,
}

/// Step and swap figures the comparison prints (from the records, so real and simulated runs are
/// measured the same way).
#[derive(Clone, Debug, Default)]
struct Figures {
    step_ms_p50: f64,
    decode_step_ms_p50: f64,
    decode_batch_mean: f64,
    swap_out_gb_per_s: Option<f64>,
    swap_in_gb_per_s: Option<f64>,
    end_s: f64,
}

fn p50(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

/// Bytes over the time at least one swap of `direction` was between its start and its end. For
/// copies queued on one channel this is the channel's busy time, whether a record starts when the
/// copy began (the engine) or when it was queued (the simulator).
fn swap_gb_per_s(swaps: &[SwapRecord], direction: &str) -> Option<f64> {
    let mut spans: Vec<(u64, u64)> = swaps
        .iter()
        .filter(|s| s.direction == direction && s.end_ns > s.start_ns)
        .map(|s| (s.start_ns, s.end_ns))
        .collect();
    if spans.is_empty() {
        return None;
    }
    spans.sort();
    let mut busy_ns = 0u64;
    let (mut start, mut end) = spans[0];
    for &(s, e) in &spans[1..] {
        if s > end {
            busy_ns += end - start;
            start = s;
        }
        end = end.max(e);
    }
    busy_ns += end - start;
    let bytes: u64 = swaps
        .iter()
        .filter(|s| s.direction == direction && s.end_ns > s.start_ns)
        .map(|s| s.bytes)
        .sum();
    Some(bytes as f64 / busy_ns.max(1) as f64)
}

fn figures(steps: &[StepRecord], swaps: &[SwapRecord], end: SimTime) -> Figures {
    let mut all: Vec<f64> = steps.iter().map(|s| s.duration_ns as f64 / 1e6).collect();
    let decode: Vec<&StepRecord> = steps
        .iter()
        .filter(|s| s.prefill_tokens == 0 && s.decode_batch > 0)
        .collect();
    let mut decode_ms: Vec<f64> = decode.iter().map(|s| s.duration_ns as f64 / 1e6).collect();
    Figures {
        step_ms_p50: p50(&mut all),
        decode_step_ms_p50: p50(&mut decode_ms),
        decode_batch_mean: decode.iter().map(|s| s.decode_batch as f64).sum::<f64>()
            / decode.len().max(1) as f64,
        swap_out_gb_per_s: swap_gb_per_s(swaps, "out"),
        swap_in_gb_per_s: swap_gb_per_s(swaps, "in"),
        end_s: end.as_nanos() as f64 / 1e9,
    }
}

/// The engine's measured swap records as swaps.csv rows, checked against the run loop's own.
fn measured_swaps(
    output: &RunOutput,
    measured: &[engine::swap::SwapRecord],
) -> Result<Vec<SwapRecord>> {
    let mut rows: Vec<SwapRecord> = measured.iter().map(|r| r.to_trace()).collect();
    rows.sort_by_key(|r| r.swap_id);
    if rows.len() != output.swaps.len() {
        bail!(
            "the run loop started {} swaps but the swap engine reported {}",
            output.swaps.len(),
            rows.len()
        );
    }
    for (measured, planned) in rows.iter().zip(&output.swaps) {
        if measured.swap_id != planned.swap_id
            || measured.bytes != planned.bytes
            || measured.direction != planned.direction
            || measured.agent_id != planned.agent_id
        {
            bail!(
                "swap {} as measured ({} {} bytes, agent {}) differs from the run loop's record (swap {} {} {} bytes, agent {})",
                measured.swap_id,
                measured.direction,
                measured.bytes,
                measured.agent_id,
                planned.swap_id,
                planned.direction,
                planned.bytes,
                planned.agent_id
            );
        }
    }
    Ok(rows)
}

fn summary_inputs(
    args: &RunArgs,
    plan: &RunPlan,
    policy: PolicyKind,
    output: &RunOutput,
    info: &EngineInfo,
) -> analysis::SummaryInputs {
    analysis::SummaryInputs {
        policy: policy.name().into(),
        workload: plan.spec.name.clone(),
        agents: plan.agents,
        seed: args.seed,
        turns_planned: output.turns_planned,
        block_bytes: info.block_bytes,
        gpu_blocks_total: info.gpu_blocks,
        host_blocks_total: info.host_blocks,
        slo_ns: (args.slo_ms * 1e6) as u64,
    }
}

fn run_policies<M: PagedModel, S: SwapExecutor<Model = M>>(
    args: &RunArgs,
    plan: &RunPlan,
    backend: &mut EngineBackend<M, S>,
    engine_epoch: Instant,
    info: &EngineInfo,
) -> Result<()> {
    let settings = settings(plan, info);
    println!(
        "== engine run: {} ({}), {} agents, seed {}, backend {} on {}, model {}, GPU KV pool {} blocks x {} tokens ({:.2} GiB), host pool {} blocks ({:.2} GiB)",
        plan.spec.name,
        plan.spec.description,
        plan.agents,
        args.seed,
        info.backend,
        info.device,
        plan.model_label,
        info.gpu_blocks,
        args.block_size,
        info.gpu_blocks as f64 * info.block_bytes as f64 / GIB,
        info.host_blocks,
        info.host_blocks as f64 * info.block_bytes as f64 / GIB
    );
    for (key, value) in &info.notes {
        println!("   {key}: {value}");
    }
    let mut results = Vec::new();
    for &policy in &plan.policies {
        let mut scheduler = policy.build_with(sim::policies::PolicyOptions {
            predictor: plan.base.predictor,
        });
        let run_epoch = Instant::now();
        backend
            .begin_run(run_epoch.duration_since(engine_epoch).as_nanos() as u64)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut clock = WallClock::from_epoch(run_epoch);
        let reproduce = reproduce_line(args, plan, policy, info);
        let output = sim::driver::run(
            &settings,
            &plan.workload,
            scheduler.as_mut(),
            backend,
            &mut clock,
        )
        .with_context(|| {
            format!(
                "{} / {} on the {} engine: reproduce with: {reproduce}",
                plan.spec.name,
                policy.name(),
                info.backend
            )
        })?;
        let swaps = measured_swaps(&output, backend.swap_records())?;
        let inputs = summary_inputs(args, plan, policy, &output, info);
        let summary = analysis::summarize(&inputs, &output.turns, &output.steps, &swaps);
        let real_figures = figures(&output.steps, &swaps, output.end_time);
        println!(
            "   {}: {} steps, {} swaps, {:.1} s wall",
            policy.name(),
            output.steps.len(),
            swaps.len(),
            real_figures.end_s
        );
        if !args.no_write {
            let mut config = plan.base.clone();
            config.policy = policy;
            let mut manifest = sim::experiment::manifest(
                &plan.spec,
                plan.agents,
                &config,
                &code_version(),
                reproduce.clone(),
            );
            manifest.backend = info.backend.into();
            manifest.device = info.device.clone();
            manifest.model = plan.model_label.clone();
            let o = &mut manifest.options;
            o.insert("gpu_blocks".into(), info.gpu_blocks.to_string());
            o.insert("host_blocks".into(), info.host_blocks.to_string());
            o.insert("block_bytes".into(), info.block_bytes.to_string());
            o.insert(
                "host_memory_bytes".into(),
                (info.host_blocks as u64 * info.block_bytes).to_string(),
            );
            o.remove("gpu_memory_utilization");
            o.insert("clock".into(), "wall (monotonic OS clock)".into());
            o.insert(
                "step_times".into(),
                "measured: host wall time of each forward, staging to greedy tokens".into(),
            );
            o.insert(
                "swap_times".into(),
                "measured: copy start/end from the swap engine's events, on the run clock".into(),
            );
            for (key, value) in &info.notes {
                o.insert(key.clone(), value.clone());
            }
            traces::write_run_dir(
                &run_dir(&args.out, &plan.spec.name, policy.name()),
                &manifest,
                &output.turns,
                &output.steps,
                &swaps,
                &summary,
            )?;
        }
        let sim = if args.compare_sim {
            Some(simulate(args, plan, policy, info, &settings)?)
        } else {
            None
        };
        results.push(PolicyResult {
            real: summary,
            real_figures,
            sim,
        });
    }
    let summaries: Vec<RunSummary> = results.iter().map(|r| r.real.clone()).collect();
    print!(
        "{}",
        analysis::comparison_table(
            &format!(
                "REAL ENGINE ({} on {}): turn latency (ms) and its P99 decomposition, {} agents",
                info.backend, info.device, plan.agents
            ),
            &summaries
        )
    );
    if args.compare_sim {
        let sims: Vec<RunSummary> = results
            .iter()
            .filter_map(|r| r.sim.as_ref().map(|(s, _)| s.clone()))
            .collect();
        print!(
            "{}",
            analysis::comparison_table(
                &format!(
                    "SIMULATED ({}), same pools and seed: turn latency (ms) and its P99 decomposition",
                    plan.base.profile.name
                ),
                &sims
            )
        );
        print!("{}", side_by_side(&results, &plan.base.profile.name));
    }
    if !args.no_write {
        let csv_path = args.out.join(&plan.spec.name).join("comparison.csv");
        let rows: Vec<analysis::table::SummaryRow> = summaries
            .iter()
            .map(analysis::table::SummaryRow::from)
            .collect();
        traces::write_csv_atomic(&csv_path, &rows)?;
        println!(
            "run directories and comparison.csv under {}",
            args.out.join(&plan.spec.name).display()
        );
    }
    Ok(())
}

/// The simulator on the same workload, seed, policy, pools and cost hints.
fn simulate(
    args: &RunArgs,
    plan: &RunPlan,
    policy: PolicyKind,
    info: &EngineInfo,
    settings: &RunSettings,
) -> Result<(RunSummary, Figures)> {
    let mut config = plan.base.clone();
    config.policy = policy;
    let mut sim_settings = settings.clone();
    sim_settings.limits = RunLimits::default();
    let output =
        sim::experiment::simulate_with(&plan.workload, &config, &sim_settings, &config.profile)
            .with_context(|| format!("simulating {} / {}", plan.spec.name, policy.name()))?;
    let inputs = summary_inputs(args, plan, policy, &output, info);
    let summary = analysis::summarize(&inputs, &output.turns, &output.steps, &output.swaps);
    let figures = figures(&output.steps, &output.swaps, output.end_time);
    if !args.no_write {
        let mut manifest = sim::experiment::manifest(
            &plan.spec,
            plan.agents,
            &config,
            &code_version(),
            format!(
                "the simulated twin of: {}",
                reproduce_line(args, plan, policy, info)
            ),
        );
        manifest
            .options
            .insert("gpu_blocks".into(), settings.gpu_blocks.to_string());
        manifest
            .options
            .insert("host_blocks".into(), settings.host_blocks.to_string());
        manifest.options.remove("gpu_memory_utilization");
        traces::write_run_dir(
            &run_dir(
                &args.out,
                &plan.spec.name,
                &format!("{}.sim", policy.name()),
            ),
            &manifest,
            &output.turns,
            &output.steps,
            &output.swaps,
            &summary,
        )?;
    }
    Ok((summary, figures))
}

fn side_by_side(results: &[PolicyResult], profile: &str) -> String {
    let ms = |ns: u64| format!("{:.1}", ns as f64 / 1e6);
    let gb = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let headers = [
        "policy",
        "source",
        "p50 ms",
        "p99 ms",
        "ttft p50",
        "step p50 ms",
        "decode step p50",
        "decode batch",
        "swap out GB/s",
        "swap in GB/s",
        "swaps out",
        "drops",
        "run s",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for r in results {
        let Some((sim, sim_fig)) = &r.sim else {
            continue;
        };
        for (source, s, f) in [("real", &r.real, &r.real_figures), ("sim", sim, sim_fig)] {
            rows.push(vec![
                s.policy.clone(),
                source.to_string(),
                ms(s.turn_latency.p50_ns),
                ms(s.turn_latency.p99_ns),
                ms(s.ttft.p50_ns),
                format!("{:.2}", f.step_ms_p50),
                format!("{:.2}", f.decode_step_ms_p50),
                format!("{:.1}", f.decode_batch_mean),
                gb(f.swap_out_gb_per_s),
                gb(f.swap_in_gb_per_s),
                s.swaps_out.to_string(),
                s.drops.to_string(),
                format!("{:.1}", f.end_s),
            ]);
        }
        let ratio = |a: f64, b: f64| {
            if b > 0.0 && a.is_finite() && b.is_finite() {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        let opt_ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "-".into(),
        };
        rows.push(vec![
            r.real.policy.clone(),
            "real/sim".into(),
            ratio(
                r.real.turn_latency.p50_ns as f64,
                sim.turn_latency.p50_ns as f64,
            ),
            ratio(
                r.real.turn_latency.p99_ns as f64,
                sim.turn_latency.p99_ns as f64,
            ),
            ratio(r.real.ttft.p50_ns as f64, sim.ttft.p50_ns as f64),
            ratio(r.real_figures.step_ms_p50, sim_fig.step_ms_p50),
            ratio(
                r.real_figures.decode_step_ms_p50,
                sim_fig.decode_step_ms_p50,
            ),
            ratio(r.real_figures.decode_batch_mean, sim_fig.decode_batch_mean),
            opt_ratio(r.real_figures.swap_out_gb_per_s, sim_fig.swap_out_gb_per_s),
            opt_ratio(r.real_figures.swap_in_gb_per_s, sim_fig.swap_in_gb_per_s),
            ratio(r.real.swaps_out as f64, sim.swaps_out as f64),
            ratio(r.real.drops as f64, sim.drops as f64),
            ratio(r.real_figures.end_s, sim_fig.end_s),
        ]);
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < 2 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = format!(
        "\nREAL vs SIMULATED ({profile}): swap GB/s = bytes / time a swap of that direction was in flight; step times from steps.csv\n"
    );
    out.push_str(&line(headers.iter().map(|h| h.to_string()).collect()));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}
