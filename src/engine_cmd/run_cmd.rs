//! `djinn engine run`: a workload through the simulator's run loop (`sim::driver::run`) on the
//! real engine, with a wall clock, writing the same run directories as `djinn simulate`.
//!
//! This file holds the command's flags; its parts live under `run/`: `plan` (flag checks, the
//! model and workload), `cpu` and `cuda` (building each engine), `policies` (the policy loop and
//! the run directories it writes), `twin` (the simulated twin and the side-by-side table) and
//! `figures` (step and swap figures both sides are measured by).
//!
//! Steps are timed on the host around each forward (steps.csv), swaps by the copy engine's own
//! events (swaps.csv: bytes, copy start and end, direction and the swaps in flight when each
//! began). `--compare-sim` also simulates the same workload, seed, policy and pool sizes with a
//! GPU profile and prints real and simulated figures side by side: this is how real traces feed
//! calibration.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

// The parts of the command, one concern each.
#[path = "run/cpu.rs"]
mod cpu;
#[path = "run/cuda.rs"]
pub(crate) mod cuda;
#[path = "run/figures.rs"]
mod figures;
#[path = "run/plan.rs"]
mod plan;
#[path = "run/policies.rs"]
mod policies;
#[path = "run/twin.rs"]
mod twin;

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
    /// mapped device address (SM-driven; see docs/engine-swap.md for the measurements).
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
    /// Instead of --profile: the twin profile derived from the engine's --model (a shipped model
    /// description: llama2-7b, llama3.1-8b, qwen2.5-7b) on this card (h100-sxm, h200, gh200,
    /// b200, or a card TOML).
    #[arg(long, value_name = "NAME|PATH", conflicts_with_all = ["profile", "weights"])]
    pub card: Option<String>,
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
    /// decode step HBM bandwidth in proportion to their rate (docs/engine-swap.md); the default
    /// runs them at the link's full speed.
    #[arg(long)]
    pub swap_rate_cap_gbps: Option<f64>,
    /// Cap swap-ins only (overrides --swap-rate-cap-gbps for that direction; CUDA only). A swap-in
    /// writes HBM and costs a decode step ~3x more per byte than a swap-out, which reads it
    /// (docs/engine-swap.md): on the H100, swap-out at full speed with swap-in capped at 34 GB/s
    /// kept batch-32 decode within 5%.
    #[arg(long)]
    pub swap_in_rate_cap_gbps: Option<f64>,
    /// Cap swap-outs only (overrides --swap-rate-cap-gbps for that direction; CUDA only).
    #[arg(long)]
    pub swap_out_rate_cap_gbps: Option<f64>,
    /// Results folder: <out>/<workload>/ holds a run directory per policy (with --compare-sim
    /// also <policy>.sim/) and comparison.csv. A workload folder that already exists is never
    /// replaced silently: the command refuses (before the engine starts) unless --overwrite is
    /// given. The folder appears when every policy has run; an interrupted run leaves its
    /// finished run directories in a hidden `.<workload>.partial-*` folder beside it.
    #[arg(long, default_value = "runs/engine-run")]
    pub out: PathBuf,
    /// Replace an existing workload folder under --out as a whole.
    #[arg(long)]
    pub overwrite: bool,
    /// Do not write run directories, only print the tables.
    #[arg(long)]
    pub no_write: bool,
    /// CUDA forward options (`--backend cuda` only; the defaults are the measured-fastest path).
    #[command(flatten)]
    pub tuning: super::tuning_args::TuningArgs,
    /// Refuse to run unless FILE's content still has this SHA-256. A manifest's reproduce line
    /// carries one per input file (workload, profile, trace). Repeatable.
    #[arg(long = "expect-sha256", value_name = "FILE=SHA256")]
    pub expect_sha256: Vec<String>,
}

pub fn run(args: RunArgs) -> Result<()> {
    let plan = plan::validate(&args)?;
    match args.backend {
        EngineBackendKind::Cpu => cpu::run_cpu(&args, &plan),
        EngineBackendKind::Cuda => cuda::run_cuda(&args, &plan),
    }
}
