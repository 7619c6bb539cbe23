//! The kernel table: the CUDA source, compiled at start-up by NVRTC for the device's architecture
//! (specialised on head size, block size and element type), and the prefill attention choice.
//!
//! Index of the source files (concatenated in this order; later files use earlier definitions):
//! - `common.cu`: element types, PDL helpers, `random_fill`.
//! - `norm.cu`: `embed`, `embed_h`, `add_rmsnorm`, `add_rmsnorm_h`, `add_rmsnorm_rows`,
//!   `add_rmsnorm_rows_h`, `gather_last_rows`.
//! - `rope_kv.cu`: `rope_kv_write`.
//! - `decode_attention.cu`: `attn_decode`, `attn_decode_gqa`, `attn_decode_reduce`.
//! - `prefill_attention_mma.cu`: `attn_prefill_mma64` (head_dim 256), `attn_prefill_mma`.
//! - `prefill_attention_wgmma.cu`: `attn_prefill_wgmma`.
//! - `prefill_attention_ws.cu`: `attn_prefill_wgmma_ws` (also defines `TmaMap`).
//! - `gemv.cu`: `gemv`, `gemv_silu`, `gemv_rope`.
//! - `gemv_batch.cu`: `gemv_batch{1..4}`, `gemv_batch_silu{1..4}` (decode batches of 2-32 rows).
//! - `misc.cu`: `silu_mul`, `argmax_rows`, `copy_words`.
//! - `gemm_ws.cu`: `gemm_ws`, `gemm_ws_silu`.

use std::sync::Arc;

use cudarc::driver::{result as dr, sys as dsys, CudaModule};

use super::super::tuning::{DecodeAttention, PrefillAttention};
use super::{drv, CudaError, CudaModelOptions, GpuDevice};
use crate::config::{DType, ModelConfig};

const KERNEL_SOURCE: &str = concat!(
    include_str!("../kernels/common.cu"),
    include_str!("../kernels/norm.cu"),
    include_str!("../kernels/rope_kv.cu"),
    include_str!("../kernels/decode_attention.cu"),
    include_str!("../kernels/prefill_attention_mma.cu"),
    include_str!("../kernels/prefill_attention_wgmma.cu"),
    include_str!("../kernels/prefill_attention_ws.cu"),
    include_str!("../kernels/gemv.cu"),
    include_str!("../kernels/gemv_batch.cu"),
    include_str!("../kernels/misc.cu"),
    include_str!("../kernels/gemm_ws.cu"),
);

/// Entry points of the multi-row GEMVs, one per tile count of 8 x rows (BG_MAX_TILES in
/// gemv_batch.cu): 32 rows at most.
pub(crate) const BATCH_GEMV_TILES: usize = 4;

/// Query rows per tile of `attn_prefill_mma64` (4 warps x 16 rows).
pub(super) const PREFILL_SMALL_TILE_ROWS: usize = 64;
/// Query rows per tile of the other prefill kernels.
pub(super) const PREFILL_TILE_ROWS: usize = 128;
/// Keys per chunk of `attn_prefill_wgmma_ws` (WS_KEYS in prefill_attention_ws.cu): whole KV blocks
/// per chunk.
const WS_KEYS: usize = 128;
/// Dynamic shared memory of `attn_prefill_wgmma` (head_dim 128, fp16/bf16): Q tile 128 x 128, two
/// stages of 64-key K and V chunks, and 1 KiB to align the swizzled buffers.
const WGMMA_SMEM_BYTES: usize = 128 * 128 * 2 + 2 * 2 * 64 * 128 * 2 + 1024;
/// Dynamic shared memory of `attn_prefill_wgmma_ws` (head_dim 128, 3 K/V stages): Q tile 128 x 128,
/// per stage a 128-key K and V chunk, 1 KiB to align the swizzled buffers and 128 bytes for the
/// mbarriers (3 x 8 bytes per stage).
const WS_SMEM_BYTES: usize = 128 * 128 * 2 + 3 * 2 * 128 * 128 * 2 + 1024 + 128;
/// Dynamic shared memory of the own GEMM (`gemm_ws*`): 4 stages of a 128 x 64 A tile and a
/// 256 x 64 B tile (48 KiB), 1 KiB to align the swizzled tiles, the mbarriers.
/// Plus the SiLU mode's output staging (two 64 x 128 tiles).
pub(super) const OWN_GEMM_SMEM_BYTES: usize =
    4 * (128 + 256) * 64 * 2 + 2 * 64 * 128 * 2 + 1024 + 128;

/// The prefill attention kernel a step launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrefillKernel {
    /// `attn_prefill_wgmma_ws`: TMA producer warpgroup, 3 K/V stages of 128 keys, two wgmma
    /// consumer warpgroups, persistent grid walking (tile, head) items longest first.
    WarpSpecialized,
    /// `attn_prefill_wgmma`: wgmma without warp specialisation (sm_90 where the KV block size
    /// does not fit the warp-specialised kernel's chunks).
    Wgmma,
    /// `attn_prefill_mma`: mma.sync, 128-row tiles, 64-key chunks (head_dim <= 128).
    Mma,
    /// `attn_prefill_mma64`: mma.sync, 64-row tiles (head_dim 256: the 128-row tile needs too
    /// many accumulators per thread).
    Mma64,
}

impl PrefillKernel {
    pub(crate) fn is_wgmma(self) -> bool {
        matches!(self, PrefillKernel::WarpSpecialized | PrefillKernel::Wgmma)
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            PrefillKernel::WarpSpecialized => "warp-specialised wgmma (persistent, 3 stages)",
            PrefillKernel::Wgmma => "wgmma",
            PrefillKernel::Mma => "mma.sync",
            PrefillKernel::Mma64 => "mma.sync (64-row tiles)",
        }
    }

    /// Query rows per tile of the step's tile list.
    pub(super) fn tile_rows(self) -> usize {
        match self {
            PrefillKernel::Mma64 => PREFILL_SMALL_TILE_ROWS,
            _ => PREFILL_TILE_ROWS,
        }
    }

    /// Whether the kernel rotates q itself when it loads its Q tile (`rope_kv_write` then only
    /// rotates k).
    pub(super) fn rotates_q(self) -> bool {
        !matches!(self, PrefillKernel::Mma64)
    }
}

/// Resolves the requested prefill attention for this card and model. Returns the kernel, the
/// wgmma kernel that checks may switch back to, and whether the warp-specialised kernel can run
/// (its KV tensor map is then encoded).
pub(super) fn choose_prefill(
    device: &GpuDevice,
    config: &ModelConfig,
    options: &CudaModelOptions,
    wanted: PrefillAttention,
) -> Result<(PrefillKernel, Option<PrefillKernel>, bool), CudaError> {
    let hd = config.head_dim();
    let bs = options.block_size_tokens;
    let wgmma = device.has_wgmma() && hd == 128;
    // The warp-specialised kernel reads whole KV blocks of 8..=128 tokens (whole 8-row swizzle
    // atoms) per 128-key chunk.
    let ws_possible =
        wgmma && bs.is_multiple_of(8) && WS_KEYS.is_multiple_of(bs) && options.dtype != DType::F32;
    let wgmma_kernel = match (wgmma, ws_possible) {
        (false, _) => None,
        (true, true) => Some(PrefillKernel::WarpSpecialized),
        (true, false) => Some(PrefillKernel::Wgmma),
    };
    let mma_kernel = if hd > 128 {
        PrefillKernel::Mma64
    } else {
        PrefillKernel::Mma
    };
    let kernel = match wanted {
        PrefillAttention::Auto => wgmma_kernel.unwrap_or(mma_kernel),
        PrefillAttention::Mma => mma_kernel,
        PrefillAttention::Wgmma => wgmma_kernel.ok_or_else(|| {
            CudaError::Unsupported(format!(
                "wgmma prefill attention needs an sm_90 card and head_dim 128 (this is {} sm_{}{}, head_dim {hd})",
                device.name, device.compute_capability.0, device.compute_capability.1
            ))
        })?,
    };
    Ok((kernel, wgmma_kernel, ws_possible))
}

/// Most query heads per KV head `attn_decode_gqa` runs (its registers hold a query, a running
/// max, sum and output slice per head of the group).
pub(super) const GQA_DECODE_MAX_GROUP: usize = 8;

/// Resolves the requested decode attention for this model: whether one thread block per KV head
/// runs (`attn_decode_gqa`).
pub(super) fn choose_decode(
    config: &ModelConfig,
    wanted: DecodeAttention,
) -> Result<bool, CudaError> {
    let group = config.num_attention_heads / config.num_key_value_heads;
    let fits = group <= GQA_DECODE_MAX_GROUP;
    match wanted {
        DecodeAttention::Auto => Ok(group > 1 && fits && config.head_dim() <= 128),
        DecodeAttention::PerQueryHead => Ok(false),
        DecodeAttention::PerKvHead if fits => Ok(true),
        DecodeAttention::PerKvHead => Err(CudaError::Unsupported(format!(
            "decode attention per KV head runs at most {GQA_DECODE_MAX_GROUP} query heads per KV head; {} has {group}",
            config.name
        ))),
    }
}

/// The compiled kernels of one model (element type, head and block size fixed at compile time).
pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    pub random_fill: dsys::CUfunction,
    /// Residual stream in f32 (`embed`, `add_rmsnorm*`) or in the weights' type (`_h`).
    pub embed: dsys::CUfunction,
    pub embed_h: dsys::CUfunction,
    pub add_rmsnorm: dsys::CUfunction,
    pub add_rmsnorm_h: dsys::CUfunction,
    pub add_rmsnorm_rows: dsys::CUfunction,
    pub add_rmsnorm_rows_h: dsys::CUfunction,
    pub rope_kv_write: dsys::CUfunction,
    pub silu_mul: dsys::CUfunction,
    pub attn_decode: dsys::CUfunction,
    pub attn_decode_gqa: dsys::CUfunction,
    pub attn_decode_reduce: dsys::CUfunction,
    pub attn_prefill_mma64: dsys::CUfunction,
    pub attn_prefill_mma: dsys::CUfunction,
    pub attn_prefill_wgmma: dsys::CUfunction,
    pub attn_prefill_wgmma_ws: dsys::CUfunction,
    pub gemv: dsys::CUfunction,
    pub gemv_silu: dsys::CUfunction,
    pub gemv_rope: dsys::CUfunction,
    /// Multi-row GEMVs (plain, gate_up with SiLU-mul fused); entry `i` takes up to 8 (i + 1) x rows.
    pub gemv_batch: [dsys::CUfunction; BATCH_GEMV_TILES],
    pub gemv_batch_silu: [dsys::CUfunction; BATCH_GEMV_TILES],
    pub argmax_rows: dsys::CUfunction,
    pub copy_words: dsys::CUfunction,
    /// Each sequence's last row (q and residual) into compact rows for the pruned last layer.
    pub gather_last_rows: dsys::CUfunction,
    /// Own warp-specialised wgmma GEMM (sm_90a): plain output, and gate_up with SiLU-mul fused.
    pub gemm_ws: dsys::CUfunction,
    pub gemm_ws_silu: dsys::CUfunction,
    /// Dynamic shared memory of `attn_prefill_mma64` and of `attn_prefill_mma`.
    pub mma64_smem_bytes: usize,
    pub mma_smem_bytes: usize,
}

impl Kernels {
    /// Compiles the source for this device and model and raises the dynamic shared memory limit
    /// of the kernels that need more than the default 48 KiB.
    pub(super) fn load(
        device: &GpuDevice,
        config: &ModelConfig,
        options: &CudaModelOptions,
    ) -> Result<Kernels, CudaError> {
        let hd = config.head_dim();
        let elem = options.dtype.size_bytes();
        let defines = [
            ("HEAD_DIM", hd.to_string()),
            ("BLOCK_SIZE", options.block_size_tokens.to_string()),
            // Query heads per KV head, at most GQA_DECODE_MAX_GROUP (attn_decode_gqa's registers).
            (
                "GQA_GROUP",
                (config.num_attention_heads / config.num_key_value_heads)
                    .clamp(1, GQA_DECODE_MAX_GROUP)
                    .to_string(),
            ),
            (
                "USE_BF16",
                if options.dtype == DType::Bf16 {
                    "1"
                } else {
                    "0"
                }
                .to_string(),
            ),
        ];
        let module = device.compile(KERNEL_SOURCE, &defines)?;
        let f = |name: &str| {
            device
                .function(&module, name)
                .map(|func| func.cu_function())
        };
        let kernels = Kernels {
            random_fill: f("random_fill")?,
            embed: f("embed")?,
            embed_h: f("embed_h")?,
            add_rmsnorm: f("add_rmsnorm")?,
            add_rmsnorm_h: f("add_rmsnorm_h")?,
            add_rmsnorm_rows: f("add_rmsnorm_rows")?,
            add_rmsnorm_rows_h: f("add_rmsnorm_rows_h")?,
            rope_kv_write: f("rope_kv_write")?,
            silu_mul: f("silu_mul")?,
            attn_decode: f("attn_decode")?,
            attn_decode_gqa: f("attn_decode_gqa")?,
            attn_decode_reduce: f("attn_decode_reduce")?,
            attn_prefill_mma64: f("attn_prefill_mma64")?,
            attn_prefill_mma: f("attn_prefill_mma")?,
            attn_prefill_wgmma: f("attn_prefill_wgmma")?,
            attn_prefill_wgmma_ws: f("attn_prefill_wgmma_ws")?,
            gemv: f("gemv")?,
            gemv_silu: f("gemv_silu")?,
            gemv_rope: f("gemv_rope")?,
            gemv_batch: [
                f("gemv_batch1")?,
                f("gemv_batch2")?,
                f("gemv_batch3")?,
                f("gemv_batch4")?,
            ],
            gemv_batch_silu: [
                f("gemv_batch_silu1")?,
                f("gemv_batch_silu2")?,
                f("gemv_batch_silu3")?,
                f("gemv_batch_silu4")?,
            ],
            argmax_rows: f("argmax_rows")?,
            copy_words: f("copy_words")?,
            gather_last_rows: f("gather_last_rows")?,
            gemm_ws: f("gemm_ws")?,
            gemm_ws_silu: f("gemm_ws_silu")?,
            // Two stages of (K, V) chunks of 64 keys, rows padded by 8 elements; the 128-row
            // kernel keeps its Q tile in shared memory too.
            mma64_smem_bytes: 2 * 2 * PREFILL_SMALL_TILE_ROWS * (hd + 8) * elem,
            mma_smem_bytes: (PREFILL_TILE_ROWS + 2 * 2 * 64) * (hd + 8) * elem,
            _module: module,
        };
        for (kernel, bytes) in [
            (kernels.attn_prefill_mma64, kernels.mma64_smem_bytes),
            (kernels.attn_prefill_mma, kernels.mma_smem_bytes),
            (kernels.attn_prefill_wgmma, WGMMA_SMEM_BYTES),
            (kernels.attn_prefill_wgmma_ws, WS_SMEM_BYTES),
            (kernels.gemm_ws, OWN_GEMM_SMEM_BYTES),
            (kernels.gemm_ws_silu, OWN_GEMM_SMEM_BYTES),
        ] {
            drv("raising a kernel's shared memory limit", unsafe {
                dr::function::set_function_attribute(
                    kernel,
                    dsys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            })?;
        }
        Ok(kernels)
    }

    /// Shared memory bytes and the kernel of a prefill attention launch.
    pub(super) fn prefill(&self, kernel: PrefillKernel) -> (dsys::CUfunction, usize) {
        match kernel {
            PrefillKernel::WarpSpecialized => (self.attn_prefill_wgmma_ws, WS_SMEM_BYTES),
            PrefillKernel::Wgmma => (self.attn_prefill_wgmma, WGMMA_SMEM_BYTES),
            PrefillKernel::Mma => (self.attn_prefill_mma, self.mma_smem_bytes),
            PrefillKernel::Mma64 => (self.attn_prefill_mma64, self.mma64_smem_bytes),
        }
    }
}
