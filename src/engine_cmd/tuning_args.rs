//! The CUDA forward's typed options as flags, shared by every `djinn engine` subcommand that builds
//! a CUDA model. Unset flags keep the engine's defaults (the measured-fastest path per card, see
//! docs/engine-cuda.md).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrefillAttentionArg {
    /// wgmma on sm_90 with head_dim 128, mma.sync elsewhere.
    Auto,
    /// Hopper wgmma kernels (an error on other cards or head sizes).
    Wgmma,
    /// mma.sync tensor-core kernels (any card).
    Mma,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecodeAttentionArg {
    /// Per KV head for grouped-query models (2-8 query heads per KV head, head_dim <= 128), per
    /// query head otherwise.
    Auto,
    /// One thread block per KV head runs all query heads of its group: the KV is read once per
    /// KV head (an error for more than 8 query heads per KV head).
    PerKvHead,
    /// One thread block per query head: the KV is read once per query head.
    PerQueryHead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GemmTuningArg {
    /// Time cuBLASLt's heuristic candidates on the first prefill GEMM of each shape; keep the
    /// fastest.
    Timed,
    /// The searched configurations (built-in engine/data/gemm_configs.tsv, or --gemm-table).
    Table,
    /// cublasGemmEx with cuBLAS's own choice.
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecodeGemmArg {
    /// cuBLAS GEMMs.
    Cublas,
    /// The multi-row streaming GEMV (each weight read once per step; gate_up with SiLU fused).
    Gemv,
}

#[derive(Args, Clone, Debug)]
pub struct TuningArgs {
    /// Prefill attention kernels.
    #[arg(long, value_enum, default_value_t = PrefillAttentionArg::Auto)]
    pub prefill_attention: PrefillAttentionArg,
    /// Decode attention kernels.
    #[arg(long, value_enum, default_value_t = DecodeAttentionArg::Auto)]
    pub decode_attention: DecodeAttentionArg,
    /// How prefill GEMMs (512 rows or more) choose their cuBLASLt algorithm.
    #[arg(long, value_enum, default_value_t = GemmTuningArg::Timed)]
    pub gemm_tuning: GemmTuningArg,
    /// A searched GEMM table file (written by `djinn engine gemm-search`); implies
    /// --gemm-tuning table.
    #[arg(long)]
    pub gemm_table: Option<PathBuf>,
    /// Steps of at least this many tokens run gate_up + SiLU-mul as the own wgmma GEMM (sm_90);
    /// `never`: cuBLAS + silu_mul. Default: the engine's measured crossover (512).
    #[arg(long, value_parser = parse_threshold)]
    pub own_gate_up_min_tokens: Option<usize>,
    /// Steps of at least this many tokens keep the residual stream in the weights' type; `never`:
    /// f32 for every step. Default: the engine's (64).
    #[arg(long, value_parser = parse_threshold)]
    pub half_residual_min_tokens: Option<usize>,
    /// Run a prefill's whole last layer on every row (default: attention, o_proj and the MLP of
    /// the last layer only on each sequence's last row, the one the logits read).
    #[arg(long)]
    pub whole_last_layer: bool,
    /// Launch kernels without programmatic dependent launch (it is only used on sm_90+ anyway).
    #[arg(long)]
    pub no_pdl: bool,
    /// Linear layers of decode steps of 2-32 sequences (batch 1 always runs the streaming GEMV,
    /// larger batches cuBLAS).
    #[arg(long, value_enum, default_value_t = DecodeGemmArg::Cublas)]
    pub decode_gemm: DecodeGemmArg,
}

/// A token count, or `never`.
fn parse_threshold(s: &str) -> Result<usize, String> {
    if s == "never" {
        return Ok(usize::MAX);
    }
    s.parse::<usize>()
        .map_err(|_| format!("`{s}`: expected a token count or `never`"))
}

#[cfg(feature = "cuda")]
impl TuningArgs {
    /// The engine's options these flags ask for.
    pub fn to_tuning(&self) -> anyhow::Result<engine::cuda::EngineTuning> {
        use engine::cuda::{DecodeAttention, EngineTuning, GemmTuning, PrefillAttention};
        let defaults = EngineTuning::default();
        if self.gemm_tuning == GemmTuningArg::Off && self.gemm_table.is_some() {
            anyhow::bail!("--gemm-table names a table but --gemm-tuning is off");
        }
        Ok(EngineTuning {
            prefill_attention: match self.prefill_attention {
                PrefillAttentionArg::Auto => PrefillAttention::Auto,
                PrefillAttentionArg::Wgmma => PrefillAttention::Wgmma,
                PrefillAttentionArg::Mma => PrefillAttention::Mma,
            },
            decode_attention: match self.decode_attention {
                DecodeAttentionArg::Auto => DecodeAttention::Auto,
                DecodeAttentionArg::PerKvHead => DecodeAttention::PerKvHead,
                DecodeAttentionArg::PerQueryHead => DecodeAttention::PerQueryHead,
            },
            gemm_tuning: match (self.gemm_tuning, &self.gemm_table) {
                (_, Some(path)) => GemmTuning::Table(Some(path.clone())),
                (GemmTuningArg::Table, None) => GemmTuning::Table(None),
                (GemmTuningArg::Timed, None) => GemmTuning::Timed,
                (GemmTuningArg::Off, None) => GemmTuning::Off,
            },
            own_gate_up_min_tokens: self
                .own_gate_up_min_tokens
                .unwrap_or(defaults.own_gate_up_min_tokens),
            half_residual_min_tokens: self
                .half_residual_min_tokens
                .unwrap_or(defaults.half_residual_min_tokens),
            prune_last_layer: !self.whole_last_layer,
            pdl: !self.no_pdl,
            decode_gemm: self.decode_gemm.to_engine(),
        })
    }
}

#[cfg(feature = "cuda")]
impl DecodeGemmArg {
    pub fn to_engine(self) -> engine::cuda::DecodeGemm {
        match self {
            DecodeGemmArg::Cublas => engine::cuda::DecodeGemm::Cublas,
            DecodeGemmArg::Gemv => engine::cuda::DecodeGemm::Gemv,
        }
    }
}
