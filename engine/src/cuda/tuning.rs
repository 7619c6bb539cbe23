//! The forward's remaining choices, typed: which prefill and decode attention kernels, how prefill GEMMs pick
//! their algorithm, which kernel runs the linear layers of small decode batches, and the step-size thresholds of the paths whose winner depends on the step.
//! `EngineTuning::default()` is the measured-fastest path on every supported card (`Auto` resolves
//! per card at start-up); the other values exist for the consistency checks and benchmarks that
//! compare paths. docs/engine-cuda.md holds the measurements behind each default.

use std::path::PathBuf;

/// Prefill attention kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PrefillAttention {
    /// `Wgmma` where the card and model allow it (sm_90, head_dim 128), else `Mma`.
    #[default]
    Auto,
    /// Hopper wgmma kernels: the warp-specialised persistent kernel where the KV block size
    /// divides its 128-key chunks into whole swizzle atoms (8-128 tokens), else the plain wgmma
    /// kernel. An error at start-up on other cards or head sizes.
    Wgmma,
    /// mma.sync tensor-core kernels (any architecture, every supported head size).
    Mma,
}

/// Decode attention kernel: which thread block reads a KV head's blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DecodeAttention {
    /// `PerKvHead` for grouped-query models (2 to 8 query heads per KV head, head_dim up to
    /// 128), else `PerQueryHead` (for one query head per KV head the two are the same kernel
    /// work).
    #[default]
    Auto,
    /// One thread block per KV head runs every query head of its group over each KV block it
    /// loads: the KV is read once per KV head. An error at start-up for more than 8 query heads
    /// per KV head.
    PerKvHead,
    /// One thread block per query head: each reads its KV head's blocks itself (the KV is read
    /// once per query head).
    PerQueryHead,
}

/// How prefill-sized GEMMs (at least 512 rows) choose their cuBLASLt algorithm.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum GemmTuning {
    /// `cublasGemmEx` with cuBLAS's own heuristic choice.
    Off,
    /// The first GEMM of each shape times cuBLASLt's heuristic candidates and keeps the fastest.
    #[default]
    Timed,
    /// Searched configurations from a table (`djinn engine gemm-search`): the built-in
    /// `engine/data/gemm_configs.tsv` (`None`) or a file; shapes without a usable entry fall back
    /// to `Timed`.
    Table(Option<PathBuf>),
}

/// What runs the linear layers (qkv, o_proj, gate_up, down_proj, LM head) of decode steps of 2 to
/// `BATCH_GEMV_MAX_ROWS` sequences. Batch 1 always runs the streaming GEMV; larger steps cuBLAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DecodeGemm {
    /// cuBLAS (`cublasGemmEx`).
    #[default]
    Cublas,
    /// The multi-row streaming GEMV (`gemv_batch*`, tensor-core products, each weight read once
    /// per step), gate_up with SiLU-mul fused.
    Gemv,
}

impl DecodeGemm {
    /// The name `--decode-gemm` takes (and report rows carry).
    pub fn label(self) -> &'static str {
        match self {
            DecodeGemm::Cublas => "cublas",
            DecodeGemm::Gemv => "gemv",
        }
    }
}

/// Most rows (decode sequences) the multi-row GEMV takes.
pub const BATCH_GEMV_MAX_ROWS: usize = 32;

/// The typed options of the CUDA forward, parsed once (CLI flags of the `djinn engine`
/// subcommands) and carried in `CudaModelOptions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineTuning {
    pub prefill_attention: PrefillAttention,
    pub decode_attention: DecodeAttention,
    pub gemm_tuning: GemmTuning,
    /// Steps of at least this many tokens run gate_up + SiLU-mul as the own fused wgmma GEMM
    /// (sm_90a); `usize::MAX`: never (cuBLAS + `silu_mul`).
    pub own_gate_up_min_tokens: usize,
    /// Steps of at least this many tokens keep the residual stream in the weights' type;
    /// `usize::MAX`: f32 for every step.
    pub half_residual_min_tokens: usize,
    /// Prefill steps run the last layer's attention, o_proj and MLP on each sequence's last row
    /// only (false: every row through the whole last layer).
    pub prune_last_layer: bool,
    /// Programmatic dependent launch of the forward's kernels (sm_90+; ignored before).
    pub pdl: bool,
    /// Linear layers of decode steps of 2 to `BATCH_GEMV_MAX_ROWS` sequences.
    pub decode_gemm: DecodeGemm,
}

/// Default thresholds (the measured crossovers on the H100, docs/engine-cuda.md).
pub const OWN_GATE_UP_MIN_TOKENS: usize = 512;
pub const HALF_RESIDUAL_MIN_TOKENS: usize = 64;

impl Default for EngineTuning {
    fn default() -> Self {
        EngineTuning {
            prefill_attention: PrefillAttention::Auto,
            decode_attention: DecodeAttention::Auto,
            gemm_tuning: GemmTuning::Timed,
            own_gate_up_min_tokens: OWN_GATE_UP_MIN_TOKENS,
            half_residual_min_tokens: HALF_RESIDUAL_MIN_TOKENS,
            prune_last_layer: true,
            pdl: true,
            decode_gemm: DecodeGemm::Cublas,
        }
    }
}
