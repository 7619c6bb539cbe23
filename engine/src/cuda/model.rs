//! The Llama forward on the GPU over the paged KV pool.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use cudarc::cublas::{result as br, sys as bsys, CudaBlas};
use cudarc::driver::{result as dr, sys as dsys, CudaGraph, CudaModule};

use super::gemm_tune::{GemmArgs, GemmOut, GemmSearchOptions, TableChoice, TunedGemm};
use super::pool::mib;
use super::{drv, legacy_stream_done, CudaError, DeviceBuffer, GpuDevice, GpuKvPool};
use crate::batch::{Logits, PagedModel, SeqStep};
use crate::config::{DType, KvLayout, ModelConfig};
use crate::weights::WeightSet;

const KERNEL_SOURCE: &str = include_str!("kernels.cu");
/// Most splits of one sequence's context in decode attention (flash-decoding).
const MAX_DECODE_SPLITS: usize = 32;
/// Query rows per prefill-attention tile (4 warps x 16 rows, see `attn_prefill`, v1-v3).
const PREFILL_TILE_ROWS: usize = 64;
/// Query rows per tile of `attn_prefill_v4` (4 warps x 32 rows).
const PREFILL_V4_TILE_ROWS: usize = 128;
/// Output rows per warp and threads per CTA of the batch-1 GEMV kernels (GEMV_R, GEMV_THREADS in
/// kernels.cu).
const GEMV_ROWS_PER_WARP: usize = 2;
const GEMV_THREADS: usize = 128;
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Prefill GEMMs with at least this many rows use the timed algorithm choice of gemm_tune.rs.
const TUNE_MIN_ROWS: usize = 512;
/// Dynamic shared memory of `attn_prefill_v6` (head_dim 128, fp16/bf16): Q tile 128 x 128, two
/// stages of 64-key K and V chunks, and 1 KiB to align the swizzled buffers.
const PREFILL_V6_SMEM_BYTES: usize = 128 * 128 * 2 + 2 * 2 * 64 * 128 * 2 + 1024;
/// Steps of at least this many tokens keep the residual stream in the weights' type (the steps
/// whose RMSNorm and residual epilogues move enough activation bytes to matter, the same size from
/// which RMSNorm runs `add_rmsnorm_rows`); smaller ones (decode batches, short chunks) keep the f32
/// stream, whose extra precision costs them nothing measurable (NOTES-cuda.md, Session 4).
const HALF_RESID_MIN_TOKENS: usize = 64;
/// Threads per CTA of `rope_kv_write` (one 16-byte item each).
const ROPE_KV_THREADS: usize = 128;
/// Dynamic shared memory of `attn_prefill_v7` with `stages` K/V stages (head_dim 128, fp16/bf16):
/// Q tile 128 x 128, per stage a 128-key K and V chunk, 1 KiB to align the swizzled buffers and
/// 128 bytes for the mbarriers (3 x 8 bytes per stage).
const fn prefill_v7_smem_bytes(stages: usize) -> usize {
    128 * 128 * 2 + stages * 2 * 128 * 128 * 2 + 1024 + 128
}
/// Keys per chunk of `attn_prefill_v7` (V7_KEYS in kernels.cu): whole KV blocks per chunk.
const PREFILL_V7_KEYS: usize = 128;
/// Prefill attention kernel numbers (`prefill_version`) of the wgmma kernels.
const PREFILL_V6: u8 = 9;
const PREFILL_V7: u8 = 10;
const PREFILL_V7_STAGES2: u8 = 11;
const PREFILL_V7_PINGPONG: u8 = 12;
/// `attn_prefill_v7p`: v7 (3 stages) on a persistent grid, one CTA per multiprocessor walking
/// (tile, head) items longest first (session 5).
const PREFILL_V7P: u8 = 13;
/// `attn_prefill_v7s3pp`: v7 with 3 stages and ping-pong between the consumer warpgroups.
const PREFILL_V7S3_PINGPONG: u8 = 14;
/// `attn_prefill_v7pl`: `attn_prefill_v7p` with the row max / row sum over 4 independent partials
/// each (shorter dependency chains; measured no faster), DJINN_CUDA_PREFILL_V7P_LEAN=1.
const PREFILL_V7PL: u8 = 15;

/// Dynamic shared memory of the own GEMM (`gemm_ws*`): 4 stages of a 128 x 64 A tile and a
/// 256 x 64 B tile (48 KiB), 1 KiB to align the swizzled tiles, the mbarriers.
/// Plus the SiLU mode's output staging (two 64 x 128 tiles).
const OWN_GEMM_SMEM_BYTES: usize = 4 * (128 + 256) * 64 * 2 + 2 * 64 * 128 * 2 + 1024 + 128;
/// Rows and columns of one tile of the own GEMM (GM_BM, GM_BN in kernels.cu).
const OWN_GEMM_TILE_M: usize = 128;
const OWN_GEMM_TILE_N: usize = 256;
/// Default: steps of at least this many tokens run gate_up + SiLU-mul as the own fused GEMM.
const OWN_GATE_UP_MIN_TOKENS: usize = 512;
/// Default: prefill steps of at least this many tokens run the qkv GEMM with RoPE + KV write fused
/// (`usize::MAX`: off by default; not faster than cuBLAS + rope_kv_write in session 5, see
/// NOTES-cuda.md "Session 5 (G9)"; DJINN_CUDA_OWN_QKV_MIN_TOKENS=512 turns it on).
const OWN_QKV_MIN_TOKENS: usize = usize::MAX;

/// A `CUtensorMap` (128 bytes, 64-byte aligned), passed by value to `attn_prefill_v7`.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TmaMap([u64; 16]);

/// Token count from which RMSNorm runs 256 threads per row (`add_rmsnorm_rows`).
const NORM_ROWS_MIN_TOKENS: usize = 64;
/// Left free after sizing everything: CUDA graphs, cuBLAS internals, module code.
const DEFAULT_RESERVE_BYTES: usize = 512 << 20;
/// A step that has not finished after this long is reported as hung.
const STEP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

fn trace_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("DJINN_CUDA_TRACE").is_some())
}

macro_rules! trace {
    ($($t:tt)*) => {
        if trace_on() {
            eprintln!("[cuda] {}", format!($($t)*));
        }
    };
}

/// Where the weights come from.
pub enum WeightSource<'a> {
    /// Host weights in HF names (f32), converted to the model dtype on upload.
    Host(&'a WeightSet),
    /// Seeded random weights generated on the GPU by a counter-based hash (for the 7B preset, which
    /// would take 27 GB as host f32). Linear weights are uniform with variance 1/in_features, norm
    /// weights uniform in [0.9, 1.1], embeddings with unit variance: activations keep unit scale
    /// through the layers and logits have unit spread, so many steps stay finite in fp16.
    DeviceRandom { config: ModelConfig, seed: u64 },
}

/// Sizes fixed at start-up (everything is allocated once).
#[derive(Clone, Debug)]
pub struct CudaModelOptions {
    /// F16 or Bf16 (weights and KV).
    pub dtype: DType,
    pub block_size_tokens: usize,
    /// KV pool blocks; `None` fills the free memory left after everything else (minus the reserve).
    pub num_kv_blocks: Option<usize>,
    /// Most new tokens in one forward (a prefill longer than this must be chunked).
    pub max_tokens_per_step: usize,
    /// Most sequences in one forward (also the largest decode graph bucket).
    pub max_seqs_per_step: usize,
    /// Width of the device block tables: the longest context is this many blocks.
    pub max_blocks_per_seq: usize,
    /// Device memory left unallocated for graphs and library internals.
    pub reserve_bytes: usize,
    /// Replay decode steps from captured CUDA graphs (off: launch every kernel each step).
    pub use_cuda_graphs: bool,
}

impl CudaModelOptions {
    pub fn for_config(config: &ModelConfig) -> Self {
        let block_size_tokens = 16;
        CudaModelOptions {
            dtype: DType::F16,
            block_size_tokens,
            num_kv_blocks: None,
            max_tokens_per_step: 4096,
            max_seqs_per_step: 256,
            max_blocks_per_seq: config.max_position_embeddings.div_ceil(block_size_tokens),
            reserve_bytes: DEFAULT_RESERVE_BYTES,
            use_cuda_graphs: true,
        }
    }
}

struct Kernels {
    _module: Arc<CudaModule>,
    random_fill: dsys::CUfunction,
    embed: dsys::CUfunction,
    add_rmsnorm: dsys::CUfunction,
    /// The same three kernels for a residual stream in the weights' type (`_h`).
    embed_h: dsys::CUfunction,
    add_rmsnorm_h: dsys::CUfunction,
    add_rmsnorm_rows_h: dsys::CUfunction,
    rope_kv_write: dsys::CUfunction,
    silu_mul: dsys::CUfunction,
    attn_decode: dsys::CUfunction,
    attn_decode_reduce: dsys::CUfunction,
    attn_prefill_v4: dsys::CUfunction,
    attn_prefill_v4k32: dsys::CUfunction,
    attn_prefill_v5: dsys::CUfunction,
    attn_prefill_v5k32: dsys::CUfunction,
    attn_prefill_v4lean: dsys::CUfunction,
    add_rmsnorm_rows: dsys::CUfunction,
    attn_prefill_v6: dsys::CUfunction,
    attn_prefill_v7: dsys::CUfunction,
    attn_prefill_v7s3: dsys::CUfunction,
    attn_prefill_v7pp: dsys::CUfunction,
    attn_prefill_v7s3pp: dsys::CUfunction,
    attn_prefill_v7p: dsys::CUfunction,
    attn_v7_trace_dump: dsys::CUfunction,
    attn_prefill_v7pl: dsys::CUfunction,
    attn_prefill: dsys::CUfunction,
    attn_prefill_v2: dsys::CUfunction,
    attn_prefill_v1: dsys::CUfunction,
    gemv: dsys::CUfunction,
    gemv_silu: dsys::CUfunction,
    gemv_rope: dsys::CUfunction,
    gemv_v1: dsys::CUfunction,
    argmax_rows: dsys::CUfunction,
    copy_words: dsys::CUfunction,
    /// Each sequence's last row (q and residual) into compact rows for the pruned last layer.
    gather_last_rows: dsys::CUfunction,
    /// Own warp-specialised wgmma GEMM (sm_90a): plain output, and gate_up with SiLU-mul fused.
    gemm_ws: dsys::CUfunction,
    gemm_ws_silu: dsys::CUfunction,
    /// `gemm_ws_silu` in clusters of two CTAs with the weight boxes multicast.
    gemm_ws_silu_c2: dsys::CUfunction,
    /// The qkv GEMM with RoPE (k) and the paged KV write in its epilogue (prefill, head_dim 128).
    gemm_ws_qkv: dsys::CUfunction,
}

/// Where o_proj, the post-attention RMSNorm and the MLP of one layer read and write
/// (`CudaModel::enqueue_layer_tail`).
struct LayerTail {
    /// Rows (tokens) the tail runs on.
    rows: usize,
    /// Their residual stream, normalised by the post-attention RMSNorm.
    resid: u64,
    /// o_proj's output (the residual, added by the epilogue, or fp16 `delta`) and its kind.
    o_out: u64,
    o_out_kind: GemmOut,
    /// fp16 layer output the RMSNorm adds first (0: none).
    post_norm_delta: u64,
    /// down_proj's output and its kind.
    layer_out: u64,
    layer_out_kind: GemmOut,
    norm_kernel: dsys::CUfunction,
    norm_threads: u32,
    /// One row: gate_up through the SiLU-fused GEMV.
    gemv: bool,
    /// Large prefill GEMMs: the timed cuBLASLt choice.
    tunable: bool,
}

/// Element offsets of one layer's tensors inside the weight buffer.
#[derive(Clone, Copy)]
struct LayerOffsets {
    qkv: usize,
    o: usize,
    gate_up: usize,
    down: usize,
    input_norm: usize,
    post_norm: usize,
}

/// Byte offsets (from the step-input buffer's start) of the per-step arrays; the same layout is
/// used in the pinned host staging buffer.
#[derive(Clone, Copy)]
struct StepLayout {
    tokens: usize,
    positions: usize,
    slots: usize,
    seq_lens: usize,
    last_rows: usize,
    block_tables: usize,
    tiles: usize,
    total: usize,
}

fn align256(x: usize) -> usize {
    x.div_ceil(256) * 256
}

impl StepLayout {
    fn new(max_tokens: usize, max_seqs: usize, table_stride: usize, max_tiles: usize) -> Self {
        let mut at = 0usize;
        let mut take = |bytes: usize| {
            let start = at;
            at = align256(at + bytes);
            start
        };
        let tokens = take(4 * max_tokens);
        let positions = take(4 * max_tokens);
        let slots = take(8 * max_tokens);
        let seq_lens = take(4 * max_seqs);
        let last_rows = take(4 * max_seqs);
        let block_tables = take(4 * max_seqs * table_stride);
        let tiles = take(16 * max_tiles);
        StepLayout {
            tokens,
            positions,
            slots,
            seq_lens,
            last_rows,
            block_tables,
            tiles,
            total: at,
        }
    }
}

/// Page-locked host memory (staging for step inputs and results), freed on drop. It is also
/// mapped into the device's address space, so kernels can read the step's inputs and write its
/// tokens directly: the step then needs no copy engine, and never queues behind KV swaps, which
/// keep both copy engines busy for tens of milliseconds (measured in engine/NOTES-swap.md: a
/// 32 KiB `cuMemcpyHtoDAsync` waited for the queued swaps, a mapped-memory kernel did not).
struct PinnedBuffer {
    ptr: *mut u8,
    /// The same memory as seen from the device.
    dev_ptr: u64,
    bytes: usize,
}

impl PinnedBuffer {
    fn new(bytes: usize) -> Result<Self, CudaError> {
        // SAFETY: page-locked allocation, CPU-readable (not write-combined) and mapped for the
        // device (CU_MEMHOSTALLOC_DEVICEMAP = 2).
        let ptr = drv("allocating pinned staging memory", unsafe {
            dr::malloc_host(bytes.max(1), 2)
        })? as *mut u8;
        unsafe { std::ptr::write_bytes(ptr, 0, bytes.max(1)) };
        let mut dev_ptr: dsys::CUdeviceptr = 0;
        // SAFETY: `ptr` was just allocated with the device-map flag.
        drv("mapping pinned staging memory for the device", unsafe {
            dsys::cuMemHostGetDevicePointer_v2(&mut dev_ptr, ptr as *mut c_void, 0).result()
        })?;
        Ok(PinnedBuffer {
            ptr,
            dev_ptr,
            bytes,
        })
    }

    fn slice_mut<T: Copy>(&mut self, byte_offset: usize, len: usize) -> &mut [T] {
        assert!(byte_offset + len * std::mem::size_of::<T>() <= self.bytes);
        assert_eq!(byte_offset % std::mem::align_of::<T>(), 0);
        // SAFETY: in bounds and aligned (checked above); T is plain data.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(byte_offset) as *mut T, len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = unsafe { dr::free_host(self.ptr as *mut c_void) };
    }
}

/// How attention runs in one enqueued forward.
#[derive(Clone, Copy)]
enum AttnMode {
    /// One new token per sequence (row b = sequence b), split-KV with `splits` splits.
    Decode { splits: usize },
    /// Any number of new tokens per sequence, `num_tiles` query tiles.
    Prefill { num_tiles: usize },
}

macro_rules! kargs {
    ($($x:expr),* $(,)?) => {
        &mut [$(&$x as *const _ as *mut c_void),*]
    };
}

/// A Llama model on the GPU: weights, activations, the KV pool and the decode graphs.
pub struct CudaModel {
    // Field order matters for drop: graphs before the buffers they reference.
    graphs: BTreeMap<usize, CudaGraph>,
    /// Per-layer readiness: events the next step's layer `l` waits for on the GPU (see
    /// [`CudaModel::gate_next_step_on_layers`]); empty: none. Taken by the next step.
    layer_gates: Vec<cudarc::driver::CudaEvent>,
    pub config: ModelConfig,
    pub options: CudaModelOptions,
    pub device: GpuDevice,
    blas: CudaBlas,
    kernels: Kernels,
    weights: DeviceBuffer,
    embed_off: usize,
    final_norm_off: usize,
    lm_head_off: usize,
    layers: Vec<LayerOffsets>,
    resid: DeviceBuffer,
    normed: DeviceBuffer,
    delta: DeviceBuffer,
    buf_a: DeviceBuffer,
    buf_b: DeviceBuffer,
    final_normed: DeviceBuffer,
    /// Compact rows of the pruned last layer: each sequence's rotated q (qkv stride) and its
    /// residual row (f32 or the weights' type, as the step's stream).
    last_q: DeviceBuffer,
    last_resid: DeviceBuffer,
    logits: DeviceBuffer,
    argmax: DeviceBuffer,
    part_out: DeviceBuffer,
    part_lse: DeviceBuffer,
    rope: DeviceBuffer,
    cublas_workspace: DeviceBuffer,
    step_dev: DeviceBuffer,
    step_host: PinnedBuffer,
    step_layout: StepLayout,
    logits_host: PinnedBuffer,
    pool: GpuKvPool,
    max_tiles: usize,
    /// Set while `profile_step` runs: an event after each kernel / GEMM, with its category.
    profiler: std::cell::RefCell<Option<Vec<(dsys::CUevent, &'static str)>>>,
    /// Dynamic shared memory of the double-buffered prefill attention kernel.
    prefill_smem_bytes: usize,
    /// Batch-1 GEMMs through the GEMV kernels (off with DJINN_CUDA_NO_GEMV=1: cuBLAS for all).
    use_gemv: bool,
    /// Smallest output width sent to the GEMV kernel: 0 (all batch-1 GEMMs) by default;
    /// DJINN_CUDA_GEMV_WIDE_ONLY=1 restores the earlier hybrid (GEMV only above 8192 outputs:
    /// qkv, gate/up, LM head; cuBLAS for o and down), see NOTES-cuda.md.
    gemv_min_n: usize,
    /// The first GEMV kernel (DJINN_CUDA_GEMV_V1=1), for A/B measurements.
    use_gemv_v1: bool,
    /// Batch-1 decode fuses RoPE + KV write into the qkv GEMV and SiLU-mul into the gate/up GEMV
    /// (off with DJINN_CUDA_NO_GEMV_FUSION=1: separate rope_kv_write / silu_mul kernels).
    fuse_gemv: bool,
    /// Programmatic dependent launch of our kernels (sm_90+; off with DJINN_CUDA_NO_PDL=1).
    use_pdl: bool,
    /// DJINN_CUDA_ATTN_TRACE=1: the diagnostic build of `attn_prefill_v7p` (per-phase clock sums of
    /// layer 0, printed by `attn_v7_trace_dump` after that layer's attention).
    attn_trace: bool,
    /// Prefill attention kernel: 13 (default on sm_90 with head_dim 128 and KV blocks of 8-128
    /// tokens dividing 128: `attn_prefill_v7p`, the kernel of 10 on a persistent grid; 15 with
    /// shorter softmax dependency chains, DJINN_CUDA_PREFILL_V7P_LEAN=1), 10
    /// (`attn_prefill_v7s3`, DJINN_CUDA_PREFILL_V7_OLD=1, FA3-style: TMA producer warpgroup, 3 K/V
    /// stages of 128 keys, two wgmma consumer warpgroups with the P V wgmma in flight during the
    /// next softmax; DJINN_CUDA_PREFILL_V4=1 turns the wgmma kernels off), 14 (10 with ping-pong,
    /// DJINN_CUDA_PREFILL_V7S3_PINGPONG=1), 9 (`attn_prefill_v6`, wgmma
    /// without warp specialisation: DJINN_CUDA_PREFILL_V6=1, and the default on sm_90 where v7
    /// cannot run), 11 / 12 (v7 with 2 stages, DJINN_CUDA_PREFILL_V7_STAGES2=1 / 2 stages and
    /// ping-pong between the consumer warpgroups, DJINN_CUDA_PREFILL_V7_PINGPONG=1), 4 (default for other head_dim <= 128:
    /// `attn_prefill_v4`, mma.sync, 64-key chunks), 5 (the same with 32-key chunks, DJINN_CUDA_PREFILL_V4_KEYS32=1), 6 / 7
    /// (`attn_prefill_v5` / `_v5k32`: 8 warps of 16 rows, DJINN_CUDA_PREFILL_V5=1 /
    /// DJINN_CUDA_PREFILL_V5_KEYS32=1), 8 (v4 with v5's lean softmax, DJINN_CUDA_PREFILL_V4_LEAN=1), 3
    /// (DJINN_CUDA_PREFILL_V3=1; the default for head_dim 256), 2 (DJINN_CUDA_PREFILL_V2=1) or 1
    /// (DJINN_CUDA_PREFILL_V1=1, single-buffered).
    prefill_version: u8,
    /// The wgmma kernel (`PREFILL_V6` or a v7 number) that `set_wgmma_prefill(true)` restores.
    wgmma_prefill_version: u8,
    /// Tensor map of the KV pool for `attn_prefill_v7` (`None` where v7 cannot run).
    kv_tma_map: Option<TmaMap>,
    /// Tensor maps of the own fused gate_up + SiLU-mul GEMM (`gemm_ws_silu`): `None` where it
    /// cannot run (not sm_90, f32 weights, intermediate size not a multiple of 128).
    own_gate_up: Option<OwnGateUpMaps>,
    /// Steps of at least this many tokens run gate_up + SiLU-mul as `gemm_ws_silu` instead of
    /// cuBLAS + `silu_mul` (`usize::MAX`: never; DJINN_CUDA_CUBLAS_GATE_UP=1;
    /// DJINN_CUDA_OWN_GATE_UP_MIN_TOKENS=N for another threshold).
    own_gate_up_min_tokens: usize,
    /// The fused gate_up GEMM runs in clusters of two CTAs with multicast weight boxes
    /// (`gemm_ws_silu_c2`, DJINN_CUDA_OWN_GEMM_CLUSTER=1; 1.6x slower than one CTA per tile,
    /// `gemm_ws_silu`, in session 5, so off by default).
    own_gemm_cluster: bool,
    /// Clusters of `gemm_ws_silu_c2` that fit on the device at once (its persistent grid).
    own_gemm_c2_clusters: usize,
    /// Tensor maps of each layer's qkv weight for `gemm_ws_qkv` (A is `own_gate_up`'s normed
    /// map): `None` where it cannot run (not sm_90, f32 weights, head_dim not 128).
    own_qkv: Option<OwnQkvMaps>,
    /// Prefill steps of at least this many tokens (with q rotated by the attention kernel) run
    /// the qkv GEMM with RoPE + KV write fused (`gemm_ws_qkv`) instead of cuBLAS + `rope_kv_write`
    /// (`usize::MAX`: never; DJINN_CUDA_CUBLAS_QKV=1; DJINN_CUDA_OWN_QKV_MIN_TOKENS=N).
    own_qkv_min_tokens: usize,
    /// Timed cuBLASLt algorithm choice for large prefill GEMMs (None: DJINN_CUDA_NO_GEMM_TUNE=1 or
    /// no libcublasLt; cublasGemmEx then).
    tuned_gemm: Option<TunedGemm>,
    /// Whether `tuned_gemm` is used (checks turn it off to compare against cublasGemmEx).
    use_gemm_tuning: bool,
    /// Dynamic shared memory of `attn_prefill_v4` / `attn_prefill_v4k32`.
    prefill_v4_smem_bytes: [usize; 2],
    /// Steps of at least this many tokens keep the residual stream in the weights' type
    /// (fp16/bf16, as HF's fp16 Llama does; each add is formed in f32 and rounded once), which
    /// halves the bytes RMSNorm reads and the o_proj / down_proj epilogues read and write; smaller
    /// steps keep it in f32. The stream lives for one step (`embed` starts it), so the choice is
    /// per step and fixed per decode graph bucket. DJINN_CUDA_F32_RESIDUAL=1: f32 for every step;
    /// DJINN_CUDA_HALF_RESIDUAL_MIN_TOKENS=N: another threshold (A/B).
    half_resid_min_tokens: usize,
    /// `rope_kv_write` (16-byte accesses, one item per thread) instead of `rope_kv_write_v1`
    /// (DJINN_CUDA_ROPE_KV_16B=1, for A/B; bit-identical results, no faster on the H100).
    rope_kv_16b: bool,
    /// o_proj and down_proj add their output straight into the residual stream (GEMM with
    /// beta = 1 / GEMV epilogue), so RMSNorm only reads the residual (off with
    /// DJINN_CUDA_NO_RESID_EPILOGUE=1: fp16 layer outputs added by `add_rmsnorm`).
    resid_epilogue: bool,
    /// With `resid_epilogue`: o_proj too (off with DJINN_CUDA_NO_RESID_EPILOGUE_O=1: only
    /// down_proj adds into the residual; o_proj writes fp16 that the next RMSNorm adds).
    resid_epilogue_o: bool,
    /// Steps of at least this many tokens normalise with `add_rmsnorm_rows` (256 threads per
    /// row, more rows in flight); DJINN_CUDA_NORM_1024=1: never (the 1024-thread kernel).
    norm_rows_min_tokens: usize,
    /// Prefill steps run the last layer's attention, o_proj and MLP on each sequence's last row
    /// only (the logits read nothing else; every row's KV is still written). Off with
    /// DJINN_CUDA_FULL_LAST_LAYER=1 (every row through the whole last layer, for A/B and checks).
    prune_last_layer: bool,
    /// Bytes allocated at start-up, by purpose (for reports).
    pub memory_breakdown: Vec<(String, usize)>,
}

/// Tensor map of the KV pool for `attn_prefill_v7`: the pool seen as a 5-D tensor
/// [block][layer * 2 + K|V][kv head][token in block][dim] (dims listed innermost first below), read
/// in boxes of one block's 64-dim panel (block_size x 64 elements, 128 bytes a row) with the
/// 128-byte swizzle that the kernel's wgmma descriptors expect. Block indices past `num_blocks`
/// read as zeros (the kernel asks for those past a sequence's end).
fn encode_kv_tma_map(
    pool: &GpuKvPool,
    config: &ModelConfig,
    options: &CudaModelOptions,
) -> Result<TmaMap, CudaError> {
    let hd = config.head_dim() as u64;
    let bs = options.block_size_tokens as u64;
    let nkv = config.num_key_value_heads as u64;
    let nl = config.num_hidden_layers as u64;
    let elem = 2u64;
    let dims: [u64; 5] = [hd, bs, nkv, 2 * nl, pool.num_blocks() as u64];
    // Byte strides of dims 1..4 (dim 0 is contiguous).
    let strides: [u64; 4] = [
        hd * elem,
        bs * hd * elem,
        nkv * bs * hd * elem,
        2 * nl * nkv * bs * hd * elem,
    ];
    let boxes: [u32; 5] = [64, bs as u32, 1, 1, 1];
    let element_strides: [u32; 5] = [1; 5];
    let data_type = match options.dtype {
        DType::Bf16 => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let mut map = dsys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array has the rank's length; the pool allocation outlives the model (and
    // so every launch that uses the map).
    drv(
        "encoding the KV pool's tensor map (prefill attention v7)",
        unsafe {
            dsys::cuTensorMapEncodeTiled(
                &mut map,
                data_type,
                5,
                pool.base_device_ptr() as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                dsys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                dsys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                dsys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
        },
    )?;
    Ok(TmaMap(map.opaque))
}

/// Tensor maps of the own gate_up GEMM: A over the normed activations ([max tokens, hidden]),
/// B over each layer's gate_up weight ([2 inter, hidden]), both in boxes of 128 rows x 64 elements;
/// the output over the activation buffer buf_b ([max tokens, inter], boxes of 64 x 64).
#[derive(Clone)]
struct OwnGateUpMaps {
    normed: TmaMap,
    gate_up: Vec<TmaMap>,
    act: TmaMap,
}

/// Tensor maps of the fused qkv GEMM: B over each layer's qkv weight ([(nh + 2 nkv) 128, hidden],
/// boxes of 128 x 64); the q output over buf_a ([max tokens, (nh + 2 nkv) 128], boxes of 64 x 64).
/// A is the gate_up GEMM's map of the normed activations.
#[derive(Clone)]
struct OwnQkvMaps {
    qkv: Vec<TmaMap>,
    out: TmaMap,
}

/// Tensor map of a row-major [rows, cols] fp16/bf16 matrix in boxes of `box_rows` rows x 64
/// columns (128 bytes a row) with the 128-byte swizzle the own GEMM's wgmma descriptors (and its
/// output staging) use. Loads past `rows` / `cols` read zeros; stores there are dropped.
fn encode_matrix_tma_map(
    ptr: u64,
    rows: usize,
    cols: usize,
    box_rows: u32,
    dtype: DType,
    what: &str,
) -> Result<TmaMap, CudaError> {
    let dims: [u64; 2] = [cols as u64, rows as u64];
    let strides: [u64; 1] = [cols as u64 * 2];
    let boxes: [u32; 2] = [64, box_rows];
    let element_strides: [u32; 2] = [1; 2];
    let data_type = match dtype {
        DType::Bf16 => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let mut map = dsys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array has the rank's length; the matrix's allocation outlives the model.
    drv(&format!("encoding the tensor map of {what}"), unsafe {
        dsys::cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            dsys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            dsys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            dsys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
    })?;
    Ok(TmaMap(map.opaque))
}

/// An A/B switch from the environment: set and not "0".
fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v != "0")
}

/// A step-size threshold from the environment: `usize::MAX` (never) when `off_flag` is set, else
/// `var` as a token count, else `default`; a value that is not a count is an error naming `var`.
fn step_threshold_from_env(off_flag: &str, var: &str, default: usize) -> Result<usize, CudaError> {
    if env_flag(off_flag) {
        return Ok(usize::MAX);
    }
    match std::env::var(var) {
        Ok(v) => v
            .parse::<usize>()
            .map_err(|_| CudaError::BadInput(format!("{var}={v}: expected a token count"))),
        Err(_) => Ok(default),
    }
}

/// Sets a step-size threshold and returns the previous one. Captured decode graphs are dropped when
/// it changes (they are recaptured on use), since each one fixed the path it took.
fn replace_step_threshold<G>(
    graphs: &mut BTreeMap<usize, G>,
    threshold: &mut usize,
    min_tokens: usize,
) -> usize {
    if min_tokens != *threshold {
        graphs.clear();
    }
    std::mem::replace(threshold, min_tokens)
}

fn dtype_elem(dtype: DType) -> Result<usize, CudaError> {
    match dtype {
        DType::F16 | DType::Bf16 => Ok(2),
        DType::F32 => Err(CudaError::Unsupported(
            "the CUDA backend stores weights and KV in fp16 or bf16, not f32".into(),
        )),
    }
}

impl CudaModel {
    /// Compiles the kernels, checks that everything fits, allocates all device memory, uploads or
    /// generates the weights.
    pub fn new(
        device: GpuDevice,
        source: WeightSource<'_>,
        options: CudaModelOptions,
    ) -> Result<CudaModel, CudaError> {
        let config = match &source {
            WeightSource::Host(ws) => {
                ws.validate(Path::new("<weights>"))
                    .map_err(|e| CudaError::Weights(e.to_string()))?;
                ws.config.clone()
            }
            WeightSource::DeviceRandom { config, .. } => config.clone(),
        };
        let elem = dtype_elem(options.dtype)?;
        let hd = config.head_dim();
        if config.hidden_size % config.num_attention_heads != 0
            || !matches!(hd, 16 | 32 | 64 | 128 | 256)
            || config.num_attention_heads % config.num_key_value_heads != 0
        {
            return Err(CudaError::Unsupported(format!(
                "{}: head_dim {hd} (need 16, 32, 64, 128 or 256) with {} query heads and {} KV heads",
                config.name, config.num_attention_heads, config.num_key_value_heads
            )));
        }
        if config.hidden_size % 8 != 0 || config.intermediate_size % 8 != 0 {
            return Err(CudaError::Unsupported(format!(
                "{}: hidden {} and MLP size {} must be multiples of 8 (16-byte vector kernels)",
                config.name, config.hidden_size, config.intermediate_size
            )));
        }
        let bs = options.block_size_tokens;
        if bs == 0 || bs > 256 {
            return Err(CudaError::Unsupported(format!(
                "block size {bs} tokens (need 1..=256)"
            )));
        }
        if options.max_tokens_per_step == 0
            || options.max_seqs_per_step == 0
            || options.max_blocks_per_seq == 0
        {
            return Err(CudaError::Unsupported(
                "max tokens, sequences and blocks per step must be positive".into(),
            ));
        }

        let kernel_defines = [
            // Diagnostic builds of attn_prefill_v7p: per-phase clock sums printed for layer 0;
            // the loop without its softmax (wrong results by design).
            (
                "V7_DIAG",
                if env_flag("DJINN_CUDA_ATTN_DIAG") {
                    "1"
                } else {
                    "0"
                }
                .to_string(),
            ),
            (
                "V7_TRACE",
                if env_flag("DJINN_CUDA_ATTN_TRACE") {
                    "1"
                } else {
                    "0"
                }
                .to_string(),
            ),
            // The 2-CTA own GEMM's peer releases with a cluster-scope fence (the session-5 form).
            (
                "GM_PEER_ARRIVE_CLUSTER",
                if env_flag("DJINN_CUDA_OWN_GEMM_PEER_ARRIVE_CLUSTER") {
                    "1"
                } else {
                    "0"
                }
                .to_string(),
            ),
            ("HEAD_DIM", hd.to_string()),
            ("BLOCK_SIZE", bs.to_string()),
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
        let module = device.compile(KERNEL_SOURCE, &kernel_defines)?;
        let f = |name: &str| {
            device
                .function(&module, name)
                .map(|func| func.cu_function())
        };
        // The `_h` kernels take a residual stream in the weights' type, the others an f32 one.
        let rope_kv_16b = env_flag("DJINN_CUDA_ROPE_KV_16B");
        // DJINN_CUDA_RMSNORM_V1=1: the two-pass RMSNorm (A/B).
        let norm_v1 = env_flag("DJINN_CUDA_RMSNORM_V1");
        let kernels = Kernels {
            random_fill: f("random_fill")?,
            embed: f("embed")?,
            add_rmsnorm: f(if norm_v1 {
                "add_rmsnorm_v1"
            } else {
                "add_rmsnorm"
            })?,
            embed_h: f("embed_h")?,
            add_rmsnorm_h: f(if norm_v1 {
                "add_rmsnorm_v1_h"
            } else {
                "add_rmsnorm_h"
            })?,
            // 16-byte accesses; DJINN_CUDA_NORM_ROWS_8B=1: the 8-byte form (A/B).
            add_rmsnorm_rows_h: f(if env_flag("DJINN_CUDA_NORM_ROWS_8B") {
                "add_rmsnorm_rows_h"
            } else {
                "add_rmsnorm_rows8_h"
            })?,
            // DJINN_CUDA_ROPE_KV_16B=1: 16-byte accesses, one item per thread (A/B; no faster).
            rope_kv_write: f(if rope_kv_16b {
                "rope_kv_write"
            } else {
                "rope_kv_write_v1"
            })?,
            silu_mul: f("silu_mul")?,
            attn_decode: f("attn_decode")?,
            attn_decode_reduce: f("attn_decode_reduce")?,
            attn_prefill_v4: f("attn_prefill_v4")?,
            attn_prefill_v4k32: f("attn_prefill_v4k32")?,
            attn_prefill_v5: f("attn_prefill_v5")?,
            attn_prefill_v5k32: f("attn_prefill_v5k32")?,
            attn_prefill_v4lean: f("attn_prefill_v4lean")?,
            add_rmsnorm_rows: f("add_rmsnorm_rows")?,
            attn_prefill_v6: f("attn_prefill_v6")?,
            attn_prefill_v7: f("attn_prefill_v7")?,
            attn_prefill_v7s3: f("attn_prefill_v7s3")?,
            attn_prefill_v7pp: f("attn_prefill_v7pp")?,
            attn_prefill_v7s3pp: f("attn_prefill_v7s3pp")?,
            attn_prefill_v7p: f("attn_prefill_v7p")?,
            attn_v7_trace_dump: f("attn_v7_trace_dump")?,
            attn_prefill_v7pl: f("attn_prefill_v7pl")?,
            attn_prefill: f("attn_prefill")?,
            attn_prefill_v2: f("attn_prefill_v2")?,
            attn_prefill_v1: f("attn_prefill_v1")?,
            gemv: f("gemv")?,
            gemv_silu: f("gemv_silu")?,
            gemv_rope: f("gemv_rope")?,
            gemv_v1: f("gemv_v1")?,
            argmax_rows: f("argmax_rows")?,
            copy_words: f("copy_words")?,
            gather_last_rows: f("gather_last_rows")?,
            gemm_ws: f("gemm_ws")?,
            gemm_ws_silu: f("gemm_ws_silu")?,
            gemm_ws_silu_c2: f("gemm_ws_silu_c2")?,
            gemm_ws_qkv: f("gemm_ws_qkv")?,
            _module: module,
        };

        let prefill_smem_bytes = 2 * 2 * PREFILL_TILE_ROWS * (hd + 8) * elem;
        let prefill_v4_smem = |keys: usize| (PREFILL_V4_TILE_ROWS + 2 * 2 * keys) * (hd + 8) * elem;
        for (kernel, bytes) in [
            (kernels.attn_prefill, prefill_smem_bytes),
            (kernels.attn_prefill_v2, prefill_smem_bytes),
            (kernels.attn_prefill_v4, prefill_v4_smem(64)),
            (kernels.attn_prefill_v4k32, prefill_v4_smem(32)),
            (kernels.attn_prefill_v5, prefill_v4_smem(64)),
            (kernels.attn_prefill_v5k32, prefill_v4_smem(32)),
            (kernels.attn_prefill_v4lean, prefill_v4_smem(64)),
            (kernels.attn_prefill_v6, PREFILL_V6_SMEM_BYTES),
            (kernels.attn_prefill_v7, prefill_v7_smem_bytes(2)),
            (kernels.attn_prefill_v7pp, prefill_v7_smem_bytes(2)),
            (kernels.attn_prefill_v7s3, prefill_v7_smem_bytes(3)),
            (kernels.attn_prefill_v7s3pp, prefill_v7_smem_bytes(3)),
            (kernels.attn_prefill_v7p, prefill_v7_smem_bytes(3)),
            (kernels.attn_prefill_v7pl, prefill_v7_smem_bytes(3)),
            (kernels.gemm_ws, OWN_GEMM_SMEM_BYTES),
            (kernels.gemm_ws_silu, OWN_GEMM_SMEM_BYTES),
            (kernels.gemm_ws_silu_c2, OWN_GEMM_SMEM_BYTES),
            (kernels.gemm_ws_qkv, OWN_GEMM_SMEM_BYTES),
        ] {
            drv("raising the prefill kernel's shared memory limit", unsafe {
                dr::function::set_function_attribute(
                    kernel,
                    dsys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            })?;
        }

        // ---- sizes
        let h = config.hidden_size;
        let inter = config.intermediate_size;
        let nh = config.num_attention_heads;
        let nkv = config.num_key_value_heads;
        let vocab = config.vocab_size;
        let qkv_width = (nh + 2 * nkv) * hd;
        let mut weight_elems = 0usize;
        let mut take = |elems: usize| {
            let start = weight_elems;
            weight_elems += elems.div_ceil(128) * 128; // 256-byte aligned tensors
            start
        };
        let embed_off = take(vocab * h);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            layers.push(LayerOffsets {
                qkv: take(qkv_width * h),
                o: take(h * nh * hd),
                gate_up: take(2 * inter * h),
                down: take(h * inter),
                input_norm: take(h),
                post_norm: take(h),
            });
        }
        let final_norm_off = take(h);
        let lm_head_off = if config.tie_word_embeddings {
            embed_off
        } else {
            take(vocab * h)
        };

        let max_t = options.max_tokens_per_step;
        let max_s = options.max_seqs_per_step;
        let table_stride = options.max_blocks_per_seq;
        let max_tiles = max_t.div_ceil(PREFILL_TILE_ROWS) + max_s;
        let step_layout = StepLayout::new(max_t, max_s, table_stride, max_tiles);
        let max_pos = config.max_position_embeddings.min(table_stride * bs);
        let mut plan: Vec<(String, usize)> = vec![
            ("weights".into(), weight_elems * elem),
            ("residual stream (f32)".into(), max_t * h * 4),
            ("normed activations".into(), max_t * h * elem),
            ("layer outputs".into(), max_t * h * elem),
            (
                "qkv / gate-up activations".into(),
                max_t * qkv_width.max(2 * inter) * elem,
            ),
            (
                "attention / MLP activations".into(),
                max_t * (nh * hd).max(inter) * elem,
            ),
            ("final norm rows".into(), max_s * h * elem),
            (
                "last-row q / residual (pruned last layer)".into(),
                max_s * (qkv_width * elem + h * 4),
            ),
            ("logits (f32)".into(), max_s * vocab * 4),
            ("argmax".into(), max_s * 4),
            (
                "decode split partials".into(),
                max_s * nh * MAX_DECODE_SPLITS * (hd + 1) * 4,
            ),
            ("RoPE table".into(), max_pos * hd * 4),
            ("cuBLAS workspace".into(), CUBLAS_WORKSPACE_BYTES),
            ("step inputs".into(), step_layout.total),
        ];
        let fixed_bytes: usize = plan.iter().map(|(_, b)| b).sum();
        let layout = KvLayout::new(&config, bs);
        let block_bytes = layout.block_elems() * elem;
        let (free, total) = device.mem_info()?;
        let available = free.saturating_sub(options.reserve_bytes);
        let breakdown = |plan: &[(String, usize)]| {
            plan.iter()
                .map(|(what, b)| format!("{what} {:.1} MiB", mib(*b)))
                .collect::<Vec<_>>()
                .join(", ")
                + &format!(", reserve {:.1} MiB", mib(options.reserve_bytes))
        };
        let num_blocks = match options.num_kv_blocks {
            Some(n) => n,
            None => available.saturating_sub(fixed_bytes) / block_bytes,
        };
        plan.push((
            format!(
                "KV pool ({num_blocks} blocks of {:.2} MiB)",
                mib(block_bytes)
            ),
            num_blocks * block_bytes,
        ));
        let needed: usize = plan.iter().map(|(_, b)| b).sum::<usize>() + options.reserve_bytes;
        if needed > free || num_blocks == 0 {
            return Err(CudaError::OutOfMemory {
                what: format!(
                    "{} ({:?}) with a {num_blocks}-block KV pool",
                    config.name, options.dtype
                ),
                requested_mib: mib(needed),
                free_mib: mib(free),
                total_mib: mib(total),
                breakdown: breakdown(&plan),
            });
        }

        let ctx = device.ctx.clone();
        let alloc = |bytes: usize, what: &str| DeviceBuffer::alloc(&ctx, bytes, what);
        let weights = alloc(weight_elems * elem, "weights")?;
        let resid = alloc(max_t * h * 4, "residual stream")?;
        let normed = alloc(max_t * h * elem, "normed activations")?;
        let delta = alloc(max_t * h * elem, "layer outputs")?;
        let buf_a = alloc(
            max_t * qkv_width.max(2 * inter) * elem,
            "qkv / gate-up activations",
        )?;
        let buf_b = alloc(
            max_t * (nh * hd).max(inter) * elem,
            "attention / MLP activations",
        )?;
        let final_normed = alloc(max_s * h * elem, "final norm rows")?;
        let last_q = alloc(max_s * qkv_width * elem, "last-row q")?;
        let last_resid = alloc(max_s * h * 4, "last-row residual")?;
        let logits = alloc(max_s * vocab * 4, "logits")?;
        let argmax = alloc(max_s * 4, "argmax")?;
        let part_out = alloc(
            max_s * nh * MAX_DECODE_SPLITS * hd * 4,
            "decode split partials",
        )?;
        let part_lse = alloc(max_s * nh * MAX_DECODE_SPLITS * 4, "decode split LSE")?;
        let rope = alloc(max_pos * hd * 4, "RoPE table")?;
        let cublas_workspace = alloc(CUBLAS_WORKSPACE_BYTES, "cuBLAS workspace")?;
        let step_dev = alloc(step_layout.total, "step inputs")?;
        let step_host = PinnedBuffer::new(step_layout.total)?;
        let logits_host = PinnedBuffer::new(max_s * vocab * 4)?;
        let pool = GpuKvPool::new(&ctx, layout, options.dtype, num_blocks)?;

        let blas = CudaBlas::new(device.stream.clone()).map_err(|e| CudaError::Cublas {
            context: "creating the cuBLAS handle".into(),
            message: format!("{e:?}"),
        })?;
        // A fixed workspace keeps cuBLAS from allocating during graph capture.
        unsafe {
            bsys::cublasSetWorkspace_v2(
                *blas.handle(),
                cublas_workspace.ptr() as *mut c_void,
                CUBLAS_WORKSPACE_BYTES,
            )
            .result()
            .map_err(|e| CudaError::Cublas {
                context: "setting the cuBLAS workspace".into(),
                message: format!("{e:?}"),
            })?;
        }

        // RoPE table in f64 on the host: cos/sin of pos * theta^(-2i/hd), interleaved.
        let mut table = vec![0f32; max_pos * hd];
        for pos in 0..max_pos {
            for i in 0..hd / 2 {
                let inv_freq = config.rope_theta.powf(-(2.0 * i as f64) / hd as f64);
                let angle = pos as f64 * inv_freq;
                table[pos * hd + 2 * i] = angle.cos() as f32;
                table[pos * hd + 2 * i + 1] = angle.sin() as f32;
            }
        }
        drv("binding the context", ctx.bind_to_thread())?;
        drv("uploading the RoPE table", unsafe {
            dr::memcpy_htod_sync(rope.ptr(), &table)
        })?;
        legacy_stream_done("uploading the RoPE table")?;

        let device_cc_major = device.compute_capability.0;
        // v7 reads whole KV blocks of 8..=128 tokens (whole 8-row swizzle atoms) per 128-key chunk.
        let bs_tok = options.block_size_tokens;
        let v7_possible = device.has_wgmma()
            && hd == 128
            && bs_tok.is_multiple_of(8)
            && PREFILL_V7_KEYS.is_multiple_of(bs_tok)
            && options.dtype != DType::F32;
        let kv_tma_map = if v7_possible {
            Some(encode_kv_tma_map(&pool, &config, &options)?)
        } else {
            None
        };
        // v7 (3 stages) is the default where it can run: verified on the H100 against v4 (prompt
        // and later turn, 7B and a GQA head_dim-128 model) and faster than v6 in the same call
        // (NOTES-cuda.md, Session 4). DJINN_CUDA_PREFILL_V6=1 brings back v6 for A/B.
        let wgmma_prefill_version = if !v7_possible || env_flag("DJINN_CUDA_PREFILL_V6") {
            PREFILL_V6
        } else if env_flag("DJINN_CUDA_PREFILL_V7_STAGES2") {
            PREFILL_V7_STAGES2
        } else if env_flag("DJINN_CUDA_PREFILL_V7_PINGPONG") {
            PREFILL_V7_PINGPONG
        } else if env_flag("DJINN_CUDA_PREFILL_V7S3_PINGPONG") {
            PREFILL_V7S3_PINGPONG
        } else if env_flag("DJINN_CUDA_PREFILL_V7_OLD") {
            PREFILL_V7
        } else if env_flag("DJINN_CUDA_PREFILL_V7P_LEAN") {
            PREFILL_V7PL
        } else {
            PREFILL_V7P
        };
        let device_has_wgmma = device.has_wgmma();
        // The own gate_up GEMM: sm_90a, fp16/bf16, whole 128-column blocks of the intermediate
        // size (one gate box and one up box per tile), rows of 16-byte multiples (TMA strides),
        // tensors at least one box (128 rows x 64 columns) large.
        let own_gate_up = if device_has_wgmma
            && options.dtype != DType::F32
            && inter.is_multiple_of(128)
            && h.is_multiple_of(8)
            && h >= 64
            && max_t >= OWN_GEMM_TILE_M
        {
            let elem_b = 2u64;
            let mut gate_up = Vec::with_capacity(layers.len());
            for (l, lw) in layers.iter().enumerate() {
                gate_up.push(encode_matrix_tma_map(
                    weights.ptr() + lw.gate_up as u64 * elem_b,
                    2 * inter,
                    h,
                    128,
                    options.dtype,
                    &format!("layer {l}'s gate_up weight"),
                )?);
            }
            Some(OwnGateUpMaps {
                normed: encode_matrix_tma_map(
                    normed.ptr(),
                    max_t,
                    h,
                    128,
                    options.dtype,
                    "the normed activations",
                )?,
                gate_up,
                act: encode_matrix_tma_map(
                    buf_b.ptr(),
                    max_t,
                    inter,
                    64,
                    options.dtype,
                    "the MLP activations",
                )?,
            })
        } else {
            None
        };
        // Co-resident 2-CTA clusters of gemm_ws_silu_c2 (GPC boundaries can leave SMs that no
        // cluster can use); half the SMs where the driver cannot say.
        let own_gemm_c2_clusters = if own_gate_up.is_some() {
            let mut config: dsys::CUlaunchConfig = unsafe { std::mem::zeroed() };
            config.gridDimX = device.num_sms as u32;
            config.gridDimY = 1;
            config.gridDimZ = 1;
            config.blockDimX = 384;
            config.blockDimY = 1;
            config.blockDimZ = 1;
            config.sharedMemBytes = OWN_GEMM_SMEM_BYTES as u32;
            let mut clusters: std::ffi::c_int = 0;
            // SAFETY: plain C data; the function is loaded and its cluster size is compiled in.
            let r = unsafe {
                dsys::cuOccupancyMaxActiveClusters(&mut clusters, kernels.gemm_ws_silu_c2, &config)
            };
            if r == dsys::CUresult::CUDA_SUCCESS && clusters > 0 {
                clusters as usize
            } else {
                device.num_sms / 2
            }
        } else {
            device.num_sms / 2
        };
        // The fused qkv GEMM: the own GEMM's conditions (A is the same normed map) and heads of
        // 128 (a tile is two whole heads, the RoPE pair d, d + 64 in one thread).
        let own_qkv = if own_gate_up.is_some() && hd == 128 {
            let elem_b = 2u64;
            let qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd;
            let mut maps = Vec::with_capacity(layers.len());
            for (l, lw) in layers.iter().enumerate() {
                maps.push(encode_matrix_tma_map(
                    weights.ptr() + lw.qkv as u64 * elem_b,
                    qkv_rows,
                    h,
                    128,
                    options.dtype,
                    &format!("layer {l}'s qkv weight"),
                )?);
            }
            Some(OwnQkvMaps {
                qkv: maps,
                out: encode_matrix_tma_map(
                    buf_a.ptr(),
                    max_t,
                    qkv_rows,
                    64,
                    options.dtype,
                    "the qkv output",
                )?,
            })
        } else {
            None
        };
        let own_qkv_min_tokens = step_threshold_from_env(
            "DJINN_CUDA_CUBLAS_QKV",
            "DJINN_CUDA_OWN_QKV_MIN_TOKENS",
            OWN_QKV_MIN_TOKENS,
        )?;
        let own_gate_up_min_tokens = step_threshold_from_env(
            "DJINN_CUDA_CUBLAS_GATE_UP",
            "DJINN_CUDA_OWN_GATE_UP_MIN_TOKENS",
            OWN_GATE_UP_MIN_TOKENS,
        )?;
        let tuned_gemm = if env_flag("DJINN_CUDA_NO_GEMM_TUNE") {
            None
        } else {
            // The searched table (gemm_tune.rs) only on request: DJINN_CUDA_GEMM_SEARCHED=1 (the
            // shipped table) or DJINN_CUDA_GEMM_TABLE=path. It measured no faster end to end than the
            // timed heuristic choice (NOTES-cuda.md, session 4), which stays the default;
            // DJINN_CUDA_GEMM_TUNE_V1=1 forces the latter whatever else is set.
            let use_table = (env_flag("DJINN_CUDA_GEMM_SEARCHED")
                || std::env::var_os("DJINN_CUDA_GEMM_TABLE").is_some())
                && !env_flag("DJINN_CUDA_GEMM_TUNE_V1");
            TunedGemm::new(&device.name, use_table)?
        };
        let mut model = CudaModel {
            graphs: BTreeMap::new(),
            layer_gates: Vec::new(),
            config,
            options,
            device,
            blas,
            kernels,
            weights,
            embed_off,
            final_norm_off,
            lm_head_off,
            layers,
            resid,
            normed,
            delta,
            buf_a,
            buf_b,
            final_normed,
            last_q,
            last_resid,
            logits,
            argmax,
            part_out,
            part_lse,
            rope,
            own_gate_up,
            own_gate_up_min_tokens,
            own_gemm_cluster: env_flag("DJINN_CUDA_OWN_GEMM_CLUSTER"),
            own_gemm_c2_clusters,
            own_qkv,
            own_qkv_min_tokens,
            cublas_workspace,
            step_dev,
            step_host,
            step_layout,
            logits_host,
            pool,
            max_tiles,
            profiler: std::cell::RefCell::new(None),
            prefill_smem_bytes,
            use_gemv: !env_flag("DJINN_CUDA_NO_GEMV"),
            gemv_min_n: if env_flag("DJINN_CUDA_GEMV_WIDE_ONLY") {
                8192
            } else {
                0
            },
            use_gemv_v1: env_flag("DJINN_CUDA_GEMV_V1"),
            fuse_gemv: !env_flag("DJINN_CUDA_NO_GEMV_FUSION") && !env_flag("DJINN_CUDA_GEMV_V1"),
            use_pdl: !env_flag("DJINN_CUDA_NO_PDL") && device_cc_major >= 9,
            attn_trace: env_flag("DJINN_CUDA_ATTN_TRACE"),
            prefill_version: if env_flag("DJINN_CUDA_PREFILL_V1") {
                1
            } else if env_flag("DJINN_CUDA_PREFILL_V2") {
                2
            } else if env_flag("DJINN_CUDA_PREFILL_V3") || hd > 128 {
                // v4 keeps 2 x head_dim / 8 x 4 accumulators per thread: too many for 256.
                3
            } else if env_flag("DJINN_CUDA_PREFILL_V4_KEYS32") {
                5
            } else if env_flag("DJINN_CUDA_PREFILL_V5") {
                6
            } else if env_flag("DJINN_CUDA_PREFILL_V5_KEYS32") {
                7
            } else if env_flag("DJINN_CUDA_PREFILL_V4_LEAN") {
                8
            } else if env_flag("DJINN_CUDA_PREFILL_V4") || hd != 128 || !device_has_wgmma {
                4
            } else {
                wgmma_prefill_version
            },
            wgmma_prefill_version,
            kv_tma_map,
            prefill_v4_smem_bytes: [prefill_v4_smem(64), prefill_v4_smem(32)],
            half_resid_min_tokens: step_threshold_from_env(
                "DJINN_CUDA_F32_RESIDUAL",
                "DJINN_CUDA_HALF_RESIDUAL_MIN_TOKENS",
                HALF_RESID_MIN_TOKENS,
            )?,
            rope_kv_16b,
            resid_epilogue: !env_flag("DJINN_CUDA_NO_RESID_EPILOGUE"),
            resid_epilogue_o: !env_flag("DJINN_CUDA_NO_RESID_EPILOGUE_O"),
            norm_rows_min_tokens: if env_flag("DJINN_CUDA_NORM_1024") {
                usize::MAX
            } else {
                NORM_ROWS_MIN_TOKENS
            },
            prune_last_layer: !env_flag("DJINN_CUDA_FULL_LAST_LAYER"),
            use_gemm_tuning: true,
            tuned_gemm,
            memory_breakdown: plan,
        };
        match source {
            WeightSource::Host(ws) => model.upload_weights(ws)?,
            WeightSource::DeviceRandom { seed, .. } => model.generate_random_weights(seed)?,
        }
        model.device.synchronize()?;
        Ok(model)
    }

    /// Whether prefill attention runs a wgmma kernel (`attn_prefill_v6` or `_v7*`).
    pub fn uses_wgmma_prefill(&self) -> bool {
        self.prefill_version >= PREFILL_V6
    }

    /// Name of the prefill attention kernel in use (for check and bench labels).
    pub fn prefill_attention_name(&self) -> &'static str {
        match self.prefill_version {
            PREFILL_V6 => "wgmma v6",
            PREFILL_V7 => "warp-specialised wgmma v7 (3 stages)",
            PREFILL_V7_STAGES2 => "warp-specialised wgmma v7 (2 stages)",
            PREFILL_V7_PINGPONG => "warp-specialised wgmma v7 (2 stages, ping-pong)",
            PREFILL_V7P => "warp-specialised wgmma v7, persistent (3 stages)",
            PREFILL_V7S3_PINGPONG => "warp-specialised wgmma v7 (3 stages, ping-pong)",
            PREFILL_V7PL => "warp-specialised wgmma v7, persistent (3 stages, lean softmax)",
            1..=3 => "mma.sync v1-v3",
            _ => "mma.sync v4/v5",
        }
    }

    /// Switches prefill attention between the wgmma kernel (v7 or v6, as chosen at start-up) and
    /// `attn_prefill_v4` (checks compare the two); returns whether the wgmma kernel was on. It is
    /// only turned on where it was selectable.
    pub fn set_wgmma_prefill(&mut self, on: bool) -> bool {
        let was = self.uses_wgmma_prefill();
        if on && !was && self.config.head_dim() == 128 && self.device.has_wgmma() {
            self.prefill_version = self.wgmma_prefill_version;
        } else if !on && was {
            self.prefill_version = 4;
        }
        was
    }

    /// Steps of at least this many tokens run with the residual stream in the weights' type
    /// (`usize::MAX`: never).
    pub fn half_residual_min_tokens(&self) -> usize {
        self.half_resid_min_tokens
    }

    /// Turns the pruned last layer of prefill steps on or off (checks compare both); returns
    /// the previous setting. Decode graphs are unaffected (decode steps never prune).
    pub fn set_prune_last_layer(&mut self, on: bool) -> bool {
        std::mem::replace(&mut self.prune_last_layer, on)
    }

    /// Sets the step size from which the residual stream is kept in the weights' type (checks
    /// compare it with the f32 stream); returns the previous value. Captured decode graphs are
    /// dropped when it changes (they are recaptured on use), since each one fixed its path.
    pub fn set_half_residual_min_tokens(&mut self, min_tokens: usize) -> usize {
        replace_step_threshold(
            &mut self.graphs,
            &mut self.half_resid_min_tokens,
            min_tokens,
        )
    }

    /// Whether large prefill GEMMs may use the timed cuBLASLt choice (see gemm_tune.rs).
    pub fn has_gemm_tuning(&self) -> bool {
        self.tuned_gemm.is_some()
    }

    /// Turns the timed cuBLASLt choice on or off (off: cublasGemmEx); returns the previous state.
    pub fn set_gemm_tuning(&mut self, on: bool) -> bool {
        std::mem::replace(&mut self.use_gemm_tuning, on)
    }

    /// Fewest rows of a prefill GEMM that takes the tuned choice.
    pub fn gemm_tuning_min_rows(&self) -> usize {
        TUNE_MIN_ROWS
    }

    /// What the prefill GEMM tuning measured and chose, one line per tuned shape.
    pub fn gemm_tuning_report(&self) -> Vec<String> {
        self.tuned_gemm
            .as_ref()
            .map(|t| t.report.borrow().clone())
            .unwrap_or_default()
    }

    /// Searches cuBLASLt configurations for the four prefill GEMMs of a `rows`-token prompt
    /// (layer 0's weights, the activations of a real prefill) and times the best hot (gemm_tune.rs).
    /// Returns (report lines, table lines for engine/data/gemm_configs.tsv). The search scribbles
    /// over activation buffers; later steps recompute them.
    pub fn gemm_search(
        &mut self,
        rows: usize,
        search: &GemmSearchOptions,
    ) -> Result<(Vec<String>, Vec<String>), CudaError> {
        if rows < TUNE_MIN_ROWS || rows > self.options.max_tokens_per_step {
            return Err(CudaError::BadInput(format!(
                "gemm search at {rows} rows: expected {TUNE_MIN_ROWS}..={} (the tuned prefill GEMM range of this model's step size)",
                self.options.max_tokens_per_step
            )));
        }
        let Some(tuned) = self.tuned_gemm.as_ref() else {
            return Err(CudaError::Unsupported(
                "the GEMM search needs libcublasLt and the tuned path (unset DJINN_CUDA_NO_GEMM_TUNE)"
                    .into(),
            ));
        };
        let _ = tuned;
        // A real prefill first, so every GEMM input holds realistic activations.
        let (table, prompt) = super::bench::synthetic_prompt(self, rows);
        self.forward_greedy(&[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &prompt,
        }])?;
        let c = &self.config;
        let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let qkv_width = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
        let lw = &self.layers[0];
        // The same output kind as the forward of a `rows`-token step (fp16/bf16 residual from
        // `half_resid_min_tokens` rows on, f32 below).
        let resid_out = if rows >= self.half_resid_min_tokens {
            GemmOut::AddHalf
        } else {
            GemmOut::AddF32
        };
        let (layer_out, layer_out_kind) = if self.resid_epilogue {
            (self.resid.ptr(), resid_out)
        } else {
            (self.delta.ptr(), GemmOut::Half)
        };
        let (o_out, o_kind) = if self.resid_epilogue_o {
            (layer_out, layer_out_kind)
        } else {
            (self.delta.ptr(), GemmOut::Half)
        };
        let shapes = [
            (
                "qkv",
                self.normed.ptr(),
                self.wptr(lw.qkv),
                self.buf_a.ptr(),
                qkv_width,
                h,
                GemmOut::Half,
            ),
            (
                "o",
                self.buf_b.ptr(),
                self.wptr(lw.o),
                o_out,
                h,
                c.num_attention_heads * hd,
                o_kind,
            ),
            (
                "gate_up",
                self.normed.ptr(),
                self.wptr(lw.gate_up),
                self.buf_a.ptr(),
                2 * inter,
                h,
                GemmOut::Half,
            ),
            (
                "down",
                self.buf_b.ptr(),
                self.wptr(lw.down),
                layer_out,
                h,
                inter,
                layer_out_kind,
            ),
        ];
        let tuned = self.tuned_gemm.as_ref().expect("checked above");
        let (mut report, mut lines) = (Vec::new(), Vec::new());
        let mut finalists = Vec::new();
        for (name, x, w, y, n, k, out) in shapes {
            let args = GemmArgs {
                x,
                w,
                y,
                m: rows,
                n,
                k,
                out,
                scratch: 0,
                bf16: self.options.dtype == DType::Bf16,
                workspace: self.cublas_workspace.ptr(),
                workspace_bytes: CUBLAS_WORKSPACE_BYTES,
                stream: self.device.stream.cu_stream(),
            };
            let gemm_ex = || self.gemm_ex(x, w, y, rows, n, k, out);
            let outcome = tuned.search(&args, &gemm_ex, search)?;
            for l in outcome.lines {
                report.push(format!("{name}: {l}"));
            }
            finalists.push((name, args, outcome.entry, outcome.arms));
        }
        self.device.synchronize()?;
        if search.in_forward_arms > 0 {
            // Inside back-to-back prefills the GEMMs share the power budget with attention and the
            // elementwise kernels, so the hot loop's winner need not win there: time the fastest
            // hot arms (and cublasGemmEx) inside real prefills, one shape at a time, the others
            // held at their hot winner, arms interleaved over rounds.
            for (_, args, entry, _) in &finalists {
                self.tuned_gemm
                    .as_ref()
                    .expect("checked above")
                    .force_choice(args, entry.choice)?;
            }
            let step = SeqStep {
                block_table: &table,
                context_len: 0,
                tokens: &prompt,
            };
            for (name, args, entry, arms) in finalists.iter_mut() {
                let mut candidates: Vec<(TableChoice, f64)> =
                    arms.iter().take(search.in_forward_arms).copied().collect();
                if let Some(ex) = arms.iter().find(|a| a.0 == TableChoice::GemmEx) {
                    if !candidates.iter().any(|c| c.0 == TableChoice::GemmEx) {
                        candidates.push(*ex);
                    }
                }
                let mut walls: Vec<Vec<f64>> = vec![Vec::new(); candidates.len()];
                for round in 0..search.in_forward_rounds {
                    for j in 0..candidates.len() {
                        let i = (j + round) % candidates.len();
                        self.tuned_gemm
                            .as_ref()
                            .expect("checked above")
                            .force_choice(args, candidates[i].0)?;
                        self.forward_greedy(&[step])?; // first call after a switch: untimed
                        let mut times = Vec::new();
                        for _ in 0..search.in_forward_reps {
                            let started = std::time::Instant::now();
                            self.forward_greedy(&[step])?;
                            times.push(started.elapsed().as_secs_f64() * 1e3);
                        }
                        times.sort_by(|a, b| a.total_cmp(b));
                        walls[i].push(times[times.len() / 2]);
                    }
                }
                let med = |v: &Vec<f64>| {
                    let mut v = v.clone();
                    v.sort_by(|a, b| a.total_cmp(b));
                    v[v.len() / 2]
                };
                let best = (0..candidates.len())
                    .min_by(|&a, &b| med(&walls[a]).total_cmp(&med(&walls[b])))
                    .expect("at least one arm");
                report.push(format!(
                    "{name}: in-forward (prefill {rows} p50 wall ms, median of {} rounds x {} prefills; the other GEMMs at their current choice):",
                    search.in_forward_rounds, search.in_forward_reps
                ));
                for (i, (choice, hot)) in candidates.iter().enumerate() {
                    report.push(format!(
                        "  {:<7} prefill {:.3} ms (rounds {})  hot-loop {hot:.4} ms/call  [{}]",
                        if i == best { "CHOSEN" } else { "" },
                        med(&walls[i]),
                        walls[i]
                            .iter()
                            .map(|w| format!("{w:.3}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        match choice {
                            TableChoice::GemmEx => "cublasGemmEx".to_string(),
                            TableChoice::Lt(cfg) => cfg.to_string(),
                        }
                    ));
                }
                let (choice, hot) = candidates[best];
                self.tuned_gemm
                    .as_ref()
                    .expect("checked above")
                    .force_choice(args, choice)?;
                entry.choice = choice;
                entry.hot_ms = hot;
            }
        }
        for (_, _, entry, _) in &finalists {
            lines.push(entry.to_line());
        }
        Ok((report, lines))
    }

    /// cuBLASLt's version (`cublasLtGetVersion`), if the tuned GEMM path is on.
    pub fn cublaslt_version(&self) -> Option<usize> {
        self.tuned_gemm.as_ref().map(|t| t.lt_version())
    }

    pub fn kv_pool(&self) -> &GpuKvPool {
        &self.pool
    }

    fn elem(&self) -> usize {
        self.options.dtype.size_bytes()
    }

    fn wptr(&self, elem_offset: usize) -> u64 {
        self.weights.ptr() + (elem_offset * self.elem()) as u64
    }

    /// Every HF-named tensor with its shape and element offset in the weight buffer (q/k/v and
    /// gate/up are stored fused; these are their parts).
    fn tensor_map(&self) -> Vec<(String, Vec<usize>, usize)> {
        let c = &self.config;
        let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (q_rows, kv_rows) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
            self.embed_off,
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h], l.input_norm));
            out.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![q_rows, h],
                l.qkv,
            ));
            out.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv_rows, h],
                l.qkv + q_rows * h,
            ));
            out.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv_rows, h],
                l.qkv + (q_rows + kv_rows) * h,
            ));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q_rows], l.o));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                l.post_norm,
            ));
            out.push((
                format!("{p}.mlp.gate_proj.weight"),
                vec![inter, h],
                l.gate_up,
            ));
            out.push((
                format!("{p}.mlp.up_proj.weight"),
                vec![inter, h],
                l.gate_up + inter * h,
            ));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, inter], l.down));
        }
        out.push((
            "model.norm.weight".to_string(),
            vec![h],
            self.final_norm_off,
        ));
        if !c.tie_word_embeddings {
            out.push((
                "lm_head.weight".to_string(),
                vec![c.vocab_size, h],
                self.lm_head_off,
            ));
        }
        out
    }

    fn upload_weights(&mut self, ws: &WeightSet) -> Result<(), CudaError> {
        for (name, shape, offset) in self.tensor_map() {
            let tensor = ws
                .get(&name)
                .ok_or_else(|| CudaError::Weights(format!("tensor `{name}` is missing")))?;
            if tensor.shape != shape {
                return Err(CudaError::Weights(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    tensor.shape
                )));
            }
            let bits: Vec<u16> = match self.options.dtype {
                DType::Bf16 => tensor
                    .data
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect(),
                _ => tensor
                    .data
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect(),
            };
            drv(&format!("uploading `{name}`"), unsafe {
                dr::memcpy_htod_sync(self.wptr(offset), &bits)
            })?;
        }
        legacy_stream_done("uploading the weights")
    }

    fn generate_random_weights(&mut self, seed: u64) -> Result<(), CudaError> {
        for (index, (name, shape, offset)) in self.tensor_map().into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let (scale, bias) = if shape.len() == 1 {
                (0.1f32, 1.0f32)
            } else if name == "model.embed_tokens.weight" {
                (3f32.sqrt(), 0.0)
            } else {
                ((3.0 / shape[1] as f32).sqrt(), 0.0)
            };
            let tensor_seed = splitmix64(seed ^ splitmix64(index as u64 + 1));
            let ptr = self.wptr(offset);
            let n64 = n as u64;
            let grid = (n.div_ceil(256).min(65536 * 4)) as u32;
            self.launch(
                self.kernels.random_fill,
                (grid, 1, 1),
                (256, 1, 1),
                kargs![ptr, n64, tensor_seed, scale, bias],
            )?;
        }
        Ok(())
    }

    fn launch(
        &self,
        f: dsys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        self.launch_smem(f, grid, block, 0, args)
    }

    fn launch_smem(
        &self,
        f: dsys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        // SAFETY: each kernel's argument list matches its signature in kernels.cu; all pointers are
        // into buffers this model owns, sized at start-up for the largest step.
        drv("launching a kernel", unsafe {
            dr::launch_kernel(
                f,
                grid,
                block,
                shared_mem_bytes,
                self.device.stream.cu_stream(),
                args,
            )
        })
    }

    /// Launches one of the forward's kernels with programmatic dependent launch (when enabled):
    /// it may start while the previous kernel still runs and waits for it in `pdl_wait()` (every
    /// kernel launched here calls it before touching activations; see kernels.cu). Inside a graph
    /// capture this becomes a programmatic edge, so a replayed step overlaps each kernel's launch
    /// and prologue (the GEMVs' first weight loads) with the tail of the previous one.
    fn launch_fwd(
        &self,
        f: dsys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        if !self.use_pdl {
            return self.launch_smem(f, grid, block, shared_mem_bytes, args);
        }
        // SAFETY: zeroed attribute, then the id and its value set; plain C data.
        let mut attr: dsys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = dsys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = dsys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: shared_mem_bytes,
            hStream: self.device.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as in `launch_smem`; `config` and `attr` outlive the call.
        drv(
            "launching a kernel (programmatic dependent launch)",
            unsafe {
                dsys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()).result()
            },
        )
    }

    /// The own warp-specialised wgmma GEMM (`gemm_ws`, sm_90a) on a persistent grid: `silu`
    /// false: out[m, n] = A B^T with B of n rows; true: out[m, inter] = silu(A Bg^T) * (A Bu^T)
    /// with B = [gate; up] of 2 `n` rows (`n` a multiple of 128), written through `o_map` (the
    /// activation buffer's map; `out` is unused). A is [m, k] through `a_map`.
    #[allow(clippy::too_many_arguments)]
    fn launch_own_gemm(
        &self,
        silu: bool,
        cluster: bool,
        a_map: TmaMap,
        b_map: TmaMap,
        o_map: TmaMap,
        out: u64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        let tiles_n = if silu {
            n / 128
        } else {
            n.div_ceil(OWN_GEMM_TILE_N)
        };
        let cluster = cluster && silu;
        let (f, grid) = if cluster {
            // Pairs of row tiles per cluster of two CTAs.
            let pairs = m.div_ceil(2 * OWN_GEMM_TILE_M) * tiles_n;
            (
                self.kernels.gemm_ws_silu_c2,
                2 * pairs.min(self.own_gemm_c2_clusters).max(1),
            )
        } else {
            let tiles = m.div_ceil(OWN_GEMM_TILE_M) * tiles_n;
            let f = if silu {
                self.kernels.gemm_ws_silu
            } else {
                self.kernels.gemm_ws
            };
            (f, tiles.min(self.device.num_sms).max(1))
        };
        let grid = grid as u32;
        let (m_i, n_i, k_i) = (m as i32, n as i32, k as i32);
        self.launch_fwd(
            f,
            (grid, 1, 1),
            (384, 1, 1),
            OWN_GEMM_SMEM_BYTES as u32,
            kargs![a_map, b_map, o_map, out, m_i, n_i, k_i],
        )
    }

    /// Whether the fused qkv + RoPE + KV-write GEMM can run on this model and device.
    pub fn has_own_qkv(&self) -> bool {
        self.own_qkv.is_some()
    }

    /// Sets the prefill step size from which the fused qkv GEMM runs (checks compare it with
    /// cuBLAS + rope_kv_write); returns the previous value.
    pub fn set_own_qkv_min_tokens(&mut self, min_tokens: usize) -> usize {
        replace_step_threshold(&mut self.graphs, &mut self.own_qkv_min_tokens, min_tokens)
    }

    /// Whether a prefill step of `n_tokens` runs the fused qkv GEMM (`gemm_ws_qkv`): its maps
    /// exist, q is rotated by the attention kernel (v4 and later) and the step is large enough.
    pub fn uses_own_qkv(&self, n_tokens: usize) -> bool {
        self.own_qkv.is_some() && self.prefill_version >= 4 && n_tokens >= self.own_qkv_min_tokens
    }

    /// Fills whole KV blocks (every layer, K and V) with 0xFF bytes (NaN in fp16 and bf16), so a
    /// slot that a step should write but does not shows up in [`CudaModel::download_kv_blocks`].
    pub fn poison_kv_blocks(&self, blocks: &[u32]) -> Result<(), CudaError> {
        self.device.synchronize()?;
        let bytes = self.pool.block_bytes();
        for &b in blocks {
            if b as usize >= self.pool.num_blocks() {
                return Err(CudaError::BadInput(format!(
                    "KV block {b}: the pool has {}",
                    self.pool.num_blocks()
                )));
            }
            // SAFETY: the block lies inside the pool's allocation (checked above).
            drv("poisoning a KV block", unsafe {
                dr::memset_d8_sync(self.pool.block_device_ptr(b), 0xFF, bytes)
            })?;
        }
        legacy_stream_done("poisoning KV blocks")
    }

    /// The raw 16-bit elements of whole KV blocks (every layer, K and V), in `blocks` order.
    pub fn download_kv_blocks(&self, blocks: &[u32]) -> Result<Vec<u16>, CudaError> {
        self.device.synchronize()?;
        let per_block = self.pool.block_bytes() / 2;
        let mut out = vec![0u16; per_block * blocks.len()];
        for (i, &b) in blocks.iter().enumerate() {
            if b as usize >= self.pool.num_blocks() {
                return Err(CudaError::BadInput(format!(
                    "KV block {b}: the pool has {}",
                    self.pool.num_blocks()
                )));
            }
            // SAFETY: the block lies inside the pool's allocation (checked above).
            drv("downloading a KV block", unsafe {
                dr::memcpy_dtoh_sync(
                    &mut out[i * per_block..(i + 1) * per_block],
                    self.pool.block_device_ptr(b),
                )
            })?;
        }
        Ok(out)
    }

    /// Whether the own fused gate_up + SiLU-mul GEMM can run on this model and device.
    pub fn has_own_gate_up(&self) -> bool {
        self.own_gate_up.is_some()
    }

    /// Steps of at least this many tokens run the own fused gate_up GEMM (`usize::MAX`: never).
    pub fn own_gate_up_min_tokens(&self) -> usize {
        self.own_gate_up_min_tokens
    }

    /// Sets the step size from which the own fused gate_up GEMM runs (checks compare it with
    /// cuBLAS + silu_mul); returns the previous value. Captured decode graphs are dropped when it
    /// changes, since each one fixed its path.
    pub fn set_own_gate_up_min_tokens(&mut self, min_tokens: usize) -> usize {
        replace_step_threshold(
            &mut self.graphs,
            &mut self.own_gate_up_min_tokens,
            min_tokens,
        )
    }

    /// Layer 0's gate_up on `rows` rows of seeded random activations: the own GEMM against cuBLAS
    /// (plain output [rows, 2 inter]) and the own fused SiLU-mul GEMM against cuBLAS + `silu_mul`
    /// (output [rows, inter]). Returns (check, max |diff|, max |reference|) per comparison and,
    /// with `timing_reps` > 0, report lines with ms per call and TFLOP/s of each arm (two
    /// alternated rounds; floor at 989 TFLOP/s dense fp16/bf16).
    #[allow(clippy::type_complexity)]
    pub fn own_gemm_check(
        &mut self,
        rows: usize,
        timing_reps: usize,
    ) -> Result<(Vec<(String, f32, f32)>, Vec<String>), CudaError> {
        let Some(maps) = self.own_gate_up.clone() else {
            return Err(CudaError::Unsupported(
                "the own wgmma GEMM needs sm_90, fp16/bf16 weights and an intermediate size that is a multiple of 128".into(),
            ));
        };
        if rows == 0 || rows > self.options.max_tokens_per_step {
            return Err(CudaError::BadInput(format!(
                "own GEMM check at {rows} rows: expected 1..={} (the model's step size)",
                self.options.max_tokens_per_step
            )));
        }
        let (h, inter) = (self.config.hidden_size, self.config.intermediate_size);
        let w = self.wptr(self.layers[0].gate_up);
        let (normed, buf_a, buf_b) = (self.normed.ptr(), self.buf_a.ptr(), self.buf_b.ptr());
        // Activations like a normed hidden state: uniform in [-1.5, 1.5].
        let (n, seed, scale, bias) = ((rows * h) as u64, 0x6a8u64, 1.5f32, 0.0f32);
        let grid = ((rows * h).div_ceil(256).min(65536 * 4)) as u32;
        self.launch(
            self.kernels.random_fill,
            (grid, 1, 1),
            (256, 1, 1),
            kargs![normed, n, seed, scale, bias],
        )?;
        let bf16 = self.options.dtype == DType::Bf16;
        let download = |ptr: u64, len: usize| -> Result<Vec<f32>, CudaError> {
            let mut host = vec![0u16; len];
            self.device.synchronize()?;
            drv("downloading a GEMM check output", unsafe {
                dr::memcpy_dtoh_sync(&mut host, ptr)
            })?;
            Ok(host
                .into_iter()
                .map(|b| {
                    if bf16 {
                        half::bf16::from_bits(b).to_f32()
                    } else {
                        half::f16::from_bits(b).to_f32()
                    }
                })
                .collect())
        };
        let compare = |name: String, cand: &[f32], reference: &[f32]| {
            let (mut max_diff, mut ref_max) = (0f32, 0f32);
            for (a, b) in cand.iter().zip(reference) {
                let d = if a.is_finite() {
                    (a - b).abs()
                } else {
                    f32::INFINITY
                };
                max_diff = max_diff.max(d);
                ref_max = ref_max.max(b.abs());
            }
            (name, max_diff, ref_max)
        };
        let cublas_plain = || {
            self.gemm(
                normed,
                w,
                buf_a,
                rows,
                2 * inter,
                h,
                GemmOut::Half,
                rows >= TUNE_MIN_ROWS,
            )
        };
        let silu = || {
            let total = (rows * inter) as u64;
            let inter_i = inter as i32;
            let grid = ((rows * inter).div_ceil(256)).min(self.device.num_sms * 16) as u32;
            self.launch_fwd(
                self.kernels.silu_mul,
                (grid, 1, 1),
                (256, 1, 1),
                0,
                kargs![buf_a, buf_b, inter_i, total],
            )
        };
        let own_plain = || {
            self.launch_own_gemm(
                false,
                false,
                maps.normed,
                maps.gate_up[0],
                maps.normed,
                buf_a,
                rows,
                2 * inter,
                h,
            )
        };
        let own_fused_on = |cluster: bool| {
            self.launch_own_gemm(
                true,
                cluster,
                maps.normed,
                maps.gate_up[0],
                maps.act,
                buf_b,
                rows,
                inter,
                h,
            )
        };
        let mut checks = Vec::new();
        cublas_plain()?;
        let ref_plain = download(buf_a, rows * 2 * inter)?;
        silu()?;
        let ref_act = download(buf_b, rows * inter)?;
        // NaN bytes (0xFF) in both outputs first, so an output the kernel does not write fails.
        let poison = |ptr: u64, bytes: usize| {
            self.device.synchronize()?;
            drv("poisoning a GEMM check output", unsafe {
                dr::memset_d8_sync(ptr, 0xFF, bytes)
            })?;
            legacy_stream_done("poisoning a GEMM check output")
        };
        poison(buf_a, rows * 2 * inter * 2)?;
        own_plain()?;
        let plain = download(buf_a, rows * 2 * inter)?;
        checks.push(compare(
            format!(
                "own wgmma GEMM == cuBLAS (gate_up, {rows} x {} x {h})",
                2 * inter
            ),
            &plain,
            &ref_plain,
        ));
        for cluster in [false, true] {
            poison(buf_b, rows * inter * 2)?;
            own_fused_on(cluster)?;
            let fused = download(buf_b, rows * inter)?;
            checks.push(compare(
                format!(
                    "own fused gate_up + SiLU-mul{} == cuBLAS + silu_mul ({rows} x {inter})",
                    if cluster { " (2-CTA clusters)" } else { "" }
                ),
                &fused,
                &ref_act,
            ));
        }
        let mut lines = vec![format!(
            "own gemm: {} SMs, {} co-resident 2-CTA clusters of gemm_ws_silu_c2",
            self.device.num_sms, self.own_gemm_c2_clusters
        )];
        if timing_reps > 0 {
            let stream = self.device.stream.cu_stream();
            let flop = 2.0 * rows as f64 * (2 * inter) as f64 * h as f64;
            let tflops = |ms: f64| flop / (ms * 1e-3) / 1e12;
            let floor_ms = flop / 989e12 * 1e3;
            for round in 1..=2 {
                let cb = TunedGemm::time_reps(stream, timing_reps, cublas_plain)?;
                let cs = TunedGemm::time_reps(stream, timing_reps, || {
                    cublas_plain()?;
                    silu()
                })?;
                let op = TunedGemm::time_reps(stream, timing_reps, own_plain)?;
                let of = TunedGemm::time_reps(stream, timing_reps, || own_fused_on(false))?;
                let oc = TunedGemm::time_reps(stream, timing_reps, || own_fused_on(true))?;
                lines.push(format!(
                    "own gemm {rows} x {} x {h} round {round} (ms per call, {timing_reps} reps; floor {floor_ms:.4} ms at 989 TFLOP/s): cuBLAS gate_up {cb:.4} ({:.0} TFLOP/s, x{:.2} floor), cuBLAS gate_up + silu_mul {cs:.4}, own gate_up {op:.4} ({:.0} TFLOP/s, x{:.2} floor), own fused gate_up + SiLU {of:.4} ({:.0} TFLOP/s, x{:.2} floor), the same in 2-CTA clusters {oc:.4} ({:.0} TFLOP/s, x{:.2} floor); fused / (cuBLAS + silu_mul) {:.3}, clusters {:.3}",
                    2 * inter,
                    tflops(cb),
                    cb / floor_ms,
                    tflops(op),
                    op / floor_ms,
                    tflops(of),
                    of / floor_ms,
                    tflops(oc),
                    oc / floor_ms,
                    of / cs,
                    oc / cs
                ));
            }
        }
        Ok((checks, lines))
    }

    /// Grid for the batch-1 GEMV kernels: one warp per `GEMV_ROWS_PER_WARP` output rows.
    fn gemv_grid(warps: usize) -> (u32, u32, u32) {
        ((warps * 32).div_ceil(GEMV_THREADS) as u32, 1, 1)
    }

    /// Row-major `y[m, n] = x[m, k] · w[n, k]^T` (PyTorch Linear layout), fp32 accumulate.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: u64,
        w: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        out: GemmOut,
        tunable: bool,
    ) -> Result<(), CudaError> {
        if m == 1 && self.use_gemv && k.is_multiple_of(8) && n > self.gemv_min_n {
            // Batch-1 decode: a streaming GEMV reads the weights closer to the bandwidth floor than
            // cuBLAS does for m = 1 (see NOTES-cuda.md).
            let (n_i, k_i, f32_i) = (n as i32, k as i32, out.gemv_code());
            if self.use_gemv_v1 {
                let warps = n.div_ceil(GEMV_ROWS_PER_WARP);
                let blocks = (warps * 32).div_ceil(256) as u32;
                return self.launch_fwd(
                    self.kernels.gemv_v1,
                    (blocks, 1, 1),
                    (256, 1, 1),
                    0,
                    kargs![w, x, y, n_i, k_i, f32_i],
                );
            }
            return self.launch_fwd(
                self.kernels.gemv,
                Self::gemv_grid(n.div_ceil(GEMV_ROWS_PER_WARP)),
                (GEMV_THREADS as u32, 1, 1),
                0,
                kargs![w, x, y, n_i, k_i, f32_i],
            );
        }
        let gemm_ex = || self.gemm_ex(x, w, y, m, n, k, out);
        if let (true, true, Some(tuned)) = (tunable, self.use_gemm_tuning, &self.tuned_gemm) {
            let args = GemmArgs {
                x,
                w,
                y,
                m,
                n,
                k,
                out,
                // buf_a (qkv / gate-up output) is consumed before o_proj and down_proj run.
                scratch: if self.buf_a.bytes() >= m * n * out.elem_bytes() {
                    self.buf_a.ptr()
                } else {
                    0
                },
                bf16: self.options.dtype == DType::Bf16,
                workspace: self.cublas_workspace.ptr(),
                workspace_bytes: CUBLAS_WORKSPACE_BYTES,
                stream: self.device.stream.cu_stream(),
            };
            return tuned.run(&args, &gemm_ex);
        }
        gemm_ex()
    }

    /// `gemm` through `cublasGemmEx` (cuBLAS's own algorithm choice).
    #[allow(clippy::too_many_arguments)]
    fn gemm_ex(
        &self,
        x: u64,
        w: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        out: GemmOut,
    ) -> Result<(), CudaError> {
        let dt = match self.options.dtype {
            DType::Bf16 => bsys::cudaDataType_t::CUDA_R_16BF,
            _ => bsys::cudaDataType_t::CUDA_R_16F,
        };
        let out_dt = if out.is_f32() {
            bsys::cudaDataType_t::CUDA_R_32F
        } else {
            dt
        };
        let (alpha, beta) = (1.0f32, out.beta());
        unsafe {
            br::gemm_ex(
                *self.blas.handle(),
                bsys::cublasOperation_t::CUBLAS_OP_T,
                bsys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                dt,
                k as i32,
                x as *const c_void,
                dt,
                k as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                out_dt,
                n as i32,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Cublas {
            context: format!("GEMM m={m} n={n} k={k}"),
            message: format!("{e:?}"),
        })
    }

    /// Records an event closing the work of `category` (profiling only; a no-op otherwise).
    fn mark(&self, category: &'static str) -> Result<(), CudaError> {
        if let Some(events) = self.profiler.borrow_mut().as_mut() {
            let event = drv(
                "creating a profiling event",
                dr::event::create(dsys::CUevent_flags::CU_EVENT_DEFAULT),
            )?;
            drv("recording a profiling event", unsafe {
                dr::event::record(event, self.device.stream.cu_stream())
            })?;
            events.push((event, category));
        }
        Ok(())
    }

    /// Runs one step with eager launches and an event after every kernel and GEMM; returns the GPU
    /// milliseconds spent per category (gemm_qkv, attention, ...) and in total.
    pub fn profile_step(&mut self, batch: &[SeqStep<'_>]) -> Result<Vec<(String, f64)>, CudaError> {
        let graphs = self.options.use_cuda_graphs;
        self.options.use_cuda_graphs = false;
        *self.profiler.borrow_mut() = Some(Vec::new());
        let ran = self
            .run_step(batch)
            .and_then(|_| self.wait("a profiled step"));
        self.options.use_cuda_graphs = graphs;
        let events = self.profiler.borrow_mut().take().unwrap_or_default();
        let mut totals: BTreeMap<&'static str, f64> = BTreeMap::new();
        let mut result = ran.map(|_| ());
        for pair in events.windows(2) {
            if result.is_ok() {
                match unsafe { dr::event::elapsed(pair[0].0, pair[1].0) } {
                    Ok(ms) => *totals.entry(pair[1].1).or_default() += ms as f64,
                    Err(e) => {
                        result = Err(CudaError::Driver {
                            context: "reading profiling events".into(),
                            message: format!("{e:?}"),
                        })
                    }
                }
            }
        }
        for (event, _) in events {
            let _ = unsafe { dr::event::destroy(event) };
        }
        result?;
        let total: f64 = totals.values().sum();
        let mut out: Vec<(String, f64)> = totals
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        out.push(("total".to_string(), total));
        Ok(out)
    }

    fn step_ptr(&self, byte_offset: usize) -> u64 {
        self.step_dev.ptr() + byte_offset as u64
    }

    /// Copies `bytes` (a multiple of 4) between device-visible addresses with a kernel on the
    /// compute stream (used with mapped pinned memory, so no copy engine is involved). With
    /// `DJINN_CUDA_COPY_ENGINE_STEP_IO=1` the step's inputs go through the copy engine instead
    /// (the old path, kept for A/B measurements).
    fn copy_on_stream(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        debug_assert_eq!(bytes % 4, 0);
        let words = (bytes / 4) as i32;
        if words == 0 {
            return Ok(());
        }
        let blocks = ((words as u32).div_ceil(256)).min(1024);
        self.launch(
            self.kernels.copy_words,
            (blocks, 1, 1),
            (256, 1, 1),
            kargs![dst, src, words],
        )
    }

    fn copy_engine_step_io() -> bool {
        std::env::var_os("DJINN_CUDA_COPY_ENGINE_STEP_IO").is_some_and(|v| v == "1")
    }

    /// Moves a staged input range from pinned host memory to the step buffer.
    fn upload_staged(&self, offset: usize, bytes: usize) -> Result<(), CudaError> {
        if Self::copy_engine_step_io() {
            // SAFETY: the pinned staging buffer outlives the copy (every step synchronises before
            // the staging buffer is written again).
            let src = unsafe { std::slice::from_raw_parts(self.step_host.ptr.add(offset), bytes) };
            return drv("copying step inputs", unsafe {
                dr::memcpy_htod_async(self.step_ptr(offset), src, self.device.stream.cu_stream())
            });
        }
        self.copy_on_stream(
            self.step_ptr(offset),
            self.step_host.dev_ptr + offset as u64,
            bytes,
        )
    }

    /// Paged decode attention of `n_seqs` sequences, one query row each (row s of `q`, qkv
    /// stride, rotated), over `seq_lens` tokens of the step's block tables; output in buf_b.
    fn launch_decode_attention(
        &self,
        q: u64,
        n_seqs: usize,
        splits: usize,
        layer: usize,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let (nh, nkv, nl) = (
            c.num_attention_heads as i32,
            c.num_key_value_heads as i32,
            c.num_hidden_layers as i32,
        );
        let (splits_i, layer_i) = (splits as i32, layer as i32);
        let scale = 1.0f32 / (c.head_dim() as f32).sqrt();
        let sl = self.step_layout;
        let (tables, seq_lens) = (self.step_ptr(sl.block_tables), self.step_ptr(sl.seq_lens));
        let table_stride = self.options.max_blocks_per_seq as i32;
        self.launch_fwd(
            self.kernels.attn_decode,
            (nh as u32, n_seqs as u32, splits as u32),
            (128, 1, 1),
            0,
            kargs![
                q,
                self.pool.base_device_ptr(),
                tables,
                table_stride,
                seq_lens,
                self.part_out.ptr(),
                self.part_lse.ptr(),
                self.buf_b.ptr(),
                layer_i,
                splits_i,
                scale,
                nh,
                nkv,
                nl
            ],
        )?;
        if splits > 1 {
            self.launch_fwd(
                self.kernels.attn_decode_reduce,
                (nh as u32, n_seqs as u32, 1),
                (c.head_dim() as u32, 1, 1),
                0,
                kargs![
                    self.part_out.ptr(),
                    self.part_lse.ptr(),
                    self.buf_b.ptr(),
                    splits_i,
                    nh
                ],
            )?;
        }
        Ok(())
    }

    /// o_proj, the post-attention RMSNorm and the MLP of one layer on `tail.rows` rows (the
    /// attention output in buf_b), adding into the residual rows at `tail.resid`.
    fn enqueue_layer_tail(
        &self,
        layer: usize,
        lw: &LayerOffsets,
        tail: &LayerTail,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (rows, tunable) = (tail.rows, tail.tunable);
        let (h_i, eps, null) = (h as i32, c.rms_norm_eps as f32, 0u64);
        self.gemm(
            self.buf_b.ptr(),
            self.wptr(lw.o),
            tail.o_out,
            rows,
            h,
            c.num_attention_heads * hd,
            tail.o_out_kind,
            tunable,
        )?;
        self.mark("gemm_o")?;
        self.launch_fwd(
            tail.norm_kernel,
            (rows as u32, 1, 1),
            (tail.norm_threads, 1, 1),
            0,
            kargs![
                tail.resid,
                tail.post_norm_delta,
                self.wptr(lw.post_norm),
                self.normed.ptr(),
                null,
                h_i,
                eps
            ],
        )?;
        self.mark("rmsnorm")?;
        if tail.gemv {
            let (inter_i, k_i, w) = (inter as i32, h as i32, self.wptr(lw.gate_up));
            self.launch_fwd(
                self.kernels.gemv_silu,
                Self::gemv_grid(inter),
                (GEMV_THREADS as u32, 1, 1),
                0,
                kargs![w, self.normed.ptr(), self.buf_b.ptr(), inter_i, k_i],
            )?;
            self.mark("gemv_gate_up_silu")?;
        } else if let Some(maps) = self
            .own_gate_up
            .as_ref()
            .filter(|_| rows >= self.own_gate_up_min_tokens)
        {
            // gate_up with SiLU-mul in the epilogue: the activation goes straight to buf_b.
            self.launch_own_gemm(
                true,
                self.own_gemm_cluster,
                maps.normed,
                maps.gate_up[layer],
                maps.act,
                self.buf_b.ptr(),
                rows,
                inter,
                h,
            )?;
            self.mark("gemm_gate_up_silu")?;
        } else {
            self.gemm(
                self.normed.ptr(),
                self.wptr(lw.gate_up),
                self.buf_a.ptr(),
                rows,
                2 * inter,
                h,
                GemmOut::Half,
                tunable,
            )?;
            self.mark("gemm_gate_up")?;
            let total = (rows * inter) as u64;
            let inter_i = inter as i32;
            let grid = ((rows * inter).div_ceil(256)).min(self.device.num_sms * 16) as u32;
            self.launch_fwd(
                self.kernels.silu_mul,
                (grid, 1, 1),
                (256, 1, 1),
                0,
                kargs![self.buf_a.ptr(), self.buf_b.ptr(), inter_i, total],
            )?;
            self.mark("silu_mul")?;
        }
        self.gemm(
            self.buf_b.ptr(),
            self.wptr(lw.down),
            tail.layer_out,
            rows,
            h,
            inter,
            tail.layer_out_kind,
            tunable,
        )?;
        self.mark("gemm_down")?;
        Ok(())
    }

    /// Enqueues one forward over `n_tokens` rows / `n_seqs` sequences whose inputs are already in
    /// the step buffer: logits of each sequence's last row in `logits`, argmax in `argmax`.
    fn enqueue_forward(
        &self,
        n_tokens: usize,
        n_seqs: usize,
        mode: AttnMode,
        layer_gates: &[cudarc::driver::CudaEvent],
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let (nh, nkv, nl) = (
            c.num_attention_heads as i32,
            c.num_key_value_heads as i32,
            c.num_hidden_layers as i32,
        );
        let qkv_width = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
        let eps = c.rms_norm_eps as f32;
        let scale = 1.0f32 / (hd as f32).sqrt();
        let sl = self.step_layout;
        let (tokens, positions, slots) = (
            self.step_ptr(sl.tokens),
            self.step_ptr(sl.positions),
            self.step_ptr(sl.slots),
        );
        let last_rows = self.step_ptr(sl.last_rows);
        let (tables, tiles) = (self.step_ptr(sl.block_tables), self.step_ptr(sl.tiles));
        let table_stride = self.options.max_blocks_per_seq as i32;
        let pool = self.pool.base_device_ptr();
        // add_rmsnorm handles 4 elements per thread.
        let norm_threads = ((h / 4).div_ceil(32) * 32).min(1024) as u32;
        let (h_i, null) = (h as i32, 0u64);
        let t = n_tokens as u32;

        // Batch 1: RoPE + KV write ride on the qkv GEMV, SiLU-mul on the gate/up GEMV.
        // Large prefill GEMMs take the algorithm cuBLASLt timing picked (gemm_tune.rs).
        let tunable = matches!(mode, AttnMode::Prefill { .. }) && n_tokens >= TUNE_MIN_ROWS;
        let fused_gemv = n_tokens == 1
            && self.use_gemv
            && self.fuse_gemv
            && matches!(mode, AttnMode::Decode { .. });
        // attn_prefill_v4 applies RoPE to q itself (rope_kv_write then only rotates k).
        let rotate_q =
            i32::from(matches!(mode, AttnMode::Decode { .. }) || self.prefill_version < 4);
        // o_proj / down_proj write: into the residual (added by the GEMM epilogue, RMSNorm then
        // only normalises) or an fp16 delta that add_rmsnorm adds.
        let half_resid = n_tokens >= self.half_resid_min_tokens;
        let resid_out = if half_resid {
            GemmOut::AddHalf
        } else {
            GemmOut::AddF32
        };
        let (layer_out, layer_out_kind, norm_delta) = if self.resid_epilogue {
            (self.resid.ptr(), resid_out, null)
        } else {
            (self.delta.ptr(), GemmOut::Half, self.delta.ptr())
        };
        let (o_out, o_out_kind, post_norm_delta) = if self.resid_epilogue_o {
            (layer_out, layer_out_kind, norm_delta)
        } else {
            (self.delta.ptr(), GemmOut::Half, self.delta.ptr())
        };
        // rope_kv_write: one thread per 8 rotation pairs of a head (q heads only with rotate_q),
        // grid (tokens, item blocks); the v1 form loops over a token's items in one CTA.
        let rope_shape = |rotate_q: i32| {
            let rope_heads = 2 * c.num_key_value_heads + c.num_attention_heads * rotate_q as usize;
            if !self.rope_kv_16b {
                ((t, 1, 1), 256)
            } else {
                let items = rope_heads * (hd / 16);
                (
                    (t, items.div_ceil(ROPE_KV_THREADS) as u32, 1),
                    ROPE_KV_THREADS as u32,
                )
            }
        };
        // A prefill step's logits read the last layer's output at each sequence's last token
        // only: that layer writes every row's KV, then runs attention (as a decode batch), o_proj
        // and the MLP on the last rows alone (3/4 of a layer's FLOPs, ~2.4% of prefill 2048).
        // The compact rows need the residual epilogues (no separate fp16 layer outputs).
        let prune_last = self.prune_last_layer
            && matches!(mode, AttnMode::Prefill { .. })
            && n_tokens > n_seqs
            && self.resid_epilogue
            && self.resid_epilogue_o;
        let k = &self.kernels;
        let (embed_kernel, final_norm_kernel) = if half_resid {
            (k.embed_h, k.add_rmsnorm_h)
        } else {
            (k.embed, k.add_rmsnorm)
        };
        let norm_for = |rows: usize| match (rows >= self.norm_rows_min_tokens, half_resid) {
            (true, true) => (k.add_rmsnorm_rows_h, 256),
            (true, false) => (k.add_rmsnorm_rows, 256),
            (false, true) => (k.add_rmsnorm_h, norm_threads),
            (false, false) => (k.add_rmsnorm, norm_threads),
        };
        let (norm_kernel, layer_norm_threads) = norm_for(n_tokens);
        self.mark("start")?;
        self.launch_fwd(
            embed_kernel,
            (t, 1, 1),
            (256, 1, 1),
            0,
            kargs![tokens, self.wptr(self.embed_off), self.resid.ptr(), h_i],
        )?;
        self.mark("embed")?;
        for (layer, lw) in self.layers.iter().enumerate() {
            if let Some(gate) = layer_gates.get(layer) {
                // This layer's KV may still be arriving (a layer-by-layer swap-in).
                drv(
                    "waiting for a layer's KV on the compute stream",
                    self.device.stream.wait(gate),
                )?;
            }
            let layer_i = layer as i32;
            let pruned = prune_last && layer + 1 == self.layers.len();
            // attn_decode reads q rotated: the pruned layer has rope_kv_write rotate it.
            let layer_rotate_q = if pruned { 1 } else { rotate_q };
            let prev_delta = if layer == 0 { null } else { norm_delta };
            self.launch_fwd(
                norm_kernel,
                (t, 1, 1),
                (layer_norm_threads, 1, 1),
                0,
                kargs![
                    self.resid.ptr(),
                    prev_delta,
                    self.wptr(lw.input_norm),
                    self.normed.ptr(),
                    null,
                    h_i,
                    eps
                ],
            )?;
            self.mark("rmsnorm")?;
            if fused_gemv {
                let (k_i, w) = (h as i32, self.wptr(lw.qkv));
                self.launch_fwd(
                    self.kernels.gemv_rope,
                    Self::gemv_grid(qkv_width / 2),
                    (GEMV_THREADS as u32, 1, 1),
                    0,
                    kargs![
                        w,
                        self.normed.ptr(),
                        self.buf_a.ptr(),
                        k_i,
                        positions,
                        slots,
                        self.rope.ptr(),
                        pool,
                        layer_i,
                        nh,
                        nkv,
                        nl
                    ],
                )?;
                self.mark("gemv_qkv_rope_kv")?;
            } else if let (Some(qkv_maps), Some(gate_up_maps)) = (
                self.own_qkv
                    .as_ref()
                    .filter(|_| layer_rotate_q == 0 && n_tokens >= self.own_qkv_min_tokens),
                self.own_gate_up.as_ref(),
            ) {
                // q to buf_a (rotated by the attention kernel on load), k rotated and v straight
                // into the pool: no rope_kv_write.
                let tiles =
                    n_tokens.div_ceil(OWN_GEMM_TILE_M) * qkv_width.div_ceil(OWN_GEMM_TILE_N);
                let grid = tiles.min(self.device.num_sms).max(1) as u32;
                let (m_i, n_i, k_i) = (n_tokens as i32, qkv_width as i32, h as i32);
                self.launch_fwd(
                    self.kernels.gemm_ws_qkv,
                    (grid, 1, 1),
                    (384, 1, 1),
                    OWN_GEMM_SMEM_BYTES as u32,
                    kargs![
                        gate_up_maps.normed,
                        qkv_maps.qkv[layer],
                        qkv_maps.out,
                        self.buf_a.ptr(),
                        m_i,
                        n_i,
                        k_i,
                        positions,
                        slots,
                        self.rope.ptr(),
                        pool,
                        layer_i,
                        nh,
                        nkv,
                        nl
                    ],
                )?;
                self.mark("gemm_qkv_rope_kv")?;
            } else {
                self.gemm(
                    self.normed.ptr(),
                    self.wptr(lw.qkv),
                    self.buf_a.ptr(),
                    n_tokens,
                    qkv_width,
                    h,
                    GemmOut::Half,
                    tunable,
                )?;
                self.mark("gemm_qkv")?;
                let (rope_grid, rope_threads) = rope_shape(layer_rotate_q);
                self.launch_fwd(
                    self.kernels.rope_kv_write,
                    rope_grid,
                    (rope_threads, 1, 1),
                    0,
                    kargs![
                        self.buf_a.ptr(),
                        positions,
                        slots,
                        self.rope.ptr(),
                        pool,
                        layer_i,
                        nh,
                        nkv,
                        nl,
                        layer_rotate_q
                    ],
                )?;
                self.mark("rope_kv_write")?;
            }
            match mode {
                AttnMode::Decode { splits } => {
                    self.launch_decode_attention(self.buf_a.ptr(), n_seqs, splits, layer)?
                }
                AttnMode::Prefill { .. } if pruned => {
                    let (q_width, qkv_width_i) = ((nh as usize * hd) as i32, qkv_width as i32);
                    let resid_row_bytes = (h * if half_resid { self.elem() } else { 4 }) as i32;
                    self.launch_fwd(
                        self.kernels.gather_last_rows,
                        (n_seqs as u32, 1, 1),
                        (256, 1, 1),
                        0,
                        kargs![
                            self.buf_a.ptr(),
                            self.resid.ptr(),
                            last_rows,
                            self.last_q.ptr(),
                            self.last_resid.ptr(),
                            q_width,
                            qkv_width_i,
                            resid_row_bytes
                        ],
                    )?;
                    self.mark("gather_last_rows")?;
                    self.launch_decode_attention(
                        self.last_q.ptr(),
                        n_seqs,
                        self.decode_splits(n_seqs),
                        layer,
                    )?
                }
                AttnMode::Prefill { num_tiles } => {
                    let tiles_i = num_tiles as i32;
                    // Named locals only: `args` holds pointers to them (no temporaries).
                    let (qkv_p, out_p) = (self.buf_a.ptr(), self.buf_b.ptr());
                    let args = kargs![
                        qkv_p,
                        pool,
                        tables,
                        table_stride,
                        tiles,
                        tiles_i,
                        out_p,
                        layer_i,
                        scale,
                        nh,
                        nkv,
                        nl
                    ];
                    let smem = self.prefill_smem_bytes as u32;
                    let rope_p = self.rope.ptr();
                    match self.prefill_version {
                        PREFILL_V7..=PREFILL_V7PL => {
                            let (kernel, bytes) = match self.prefill_version {
                                PREFILL_V7_STAGES2 => {
                                    (self.kernels.attn_prefill_v7, prefill_v7_smem_bytes(2))
                                }
                                PREFILL_V7_PINGPONG => {
                                    (self.kernels.attn_prefill_v7pp, prefill_v7_smem_bytes(2))
                                }
                                PREFILL_V7S3_PINGPONG => {
                                    (self.kernels.attn_prefill_v7s3pp, prefill_v7_smem_bytes(3))
                                }
                                PREFILL_V7P => {
                                    (self.kernels.attn_prefill_v7p, prefill_v7_smem_bytes(3))
                                }
                                PREFILL_V7PL => {
                                    (self.kernels.attn_prefill_v7pl, prefill_v7_smem_bytes(3))
                                }
                                _ => (self.kernels.attn_prefill_v7s3, prefill_v7_smem_bytes(3)),
                            };
                            // The persistent kernel: one CTA per multiprocessor (at most one
                            // per item); the others: one CTA per (head, tile).
                            let persistent =
                                matches!(self.prefill_version, PREFILL_V7P | PREFILL_V7PL);
                            let grid = if persistent {
                                (
                                    (num_tiles * nh as usize).min(self.device.num_sms) as u32,
                                    1,
                                    1,
                                )
                            } else {
                                (nh as u32, num_tiles as u32, 1)
                            };
                            let map = self.kv_tma_map.ok_or_else(|| {
                                CudaError::Unsupported(
                                    "prefill attention v7 without a KV tensor map".into(),
                                )
                            })?;
                            let num_blocks_i = self.pool.num_blocks() as i32;
                            self.launch_fwd(
                                kernel,
                                grid,
                                (384, 1, 1),
                                bytes as u32,
                                kargs![
                                    map,
                                    qkv_p,
                                    tables,
                                    table_stride,
                                    tiles,
                                    tiles_i,
                                    out_p,
                                    layer_i,
                                    scale,
                                    nh,
                                    nkv,
                                    rope_p,
                                    num_blocks_i
                                ],
                            )?;
                            if self.attn_trace && persistent && layer == 0 {
                                let ctas_i = grid.0 as i32;
                                self.launch_fwd(
                                    self.kernels.attn_v7_trace_dump,
                                    (1, 1, 1),
                                    (1, 1, 1),
                                    0,
                                    kargs![ctas_i],
                                )?;
                            }
                        }
                        4..=9 => {
                            let [smem64, smem32] = self.prefill_v4_smem_bytes;
                            // v5 (6, 7): the same tile on 8 warps of 16 rows.
                            let (kernel, bytes, threads) = match self.prefill_version {
                                4 => (self.kernels.attn_prefill_v4, smem64, 128),
                                5 => (self.kernels.attn_prefill_v4k32, smem32, 128),
                                6 => (self.kernels.attn_prefill_v5, smem64, 256),
                                7 => (self.kernels.attn_prefill_v5k32, smem32, 256),
                                8 => (self.kernels.attn_prefill_v4lean, smem64, 128),
                                _ => (self.kernels.attn_prefill_v6, PREFILL_V6_SMEM_BYTES, 256),
                            };
                            self.launch_fwd(
                                kernel,
                                (nh as u32, num_tiles as u32, 1),
                                (threads, 1, 1),
                                bytes as u32,
                                kargs![
                                    qkv_p,
                                    pool,
                                    tables,
                                    table_stride,
                                    tiles,
                                    tiles_i,
                                    out_p,
                                    layer_i,
                                    scale,
                                    nh,
                                    nkv,
                                    nl,
                                    rope_p
                                ],
                            )?
                        }
                        // v1 and v2 do not call pdl_wait(): plain launches.
                        1 => self.launch_smem(
                            self.kernels.attn_prefill_v1,
                            (num_tiles as u32, nh as u32, 1),
                            (128, 1, 1),
                            0,
                            args,
                        )?,
                        2 => self.launch_smem(
                            self.kernels.attn_prefill_v2,
                            (num_tiles as u32, nh as u32, 1),
                            (128, 1, 1),
                            smem,
                            args,
                        )?,
                        _ => self.launch_fwd(
                            self.kernels.attn_prefill,
                            (nh as u32, num_tiles as u32, 1),
                            (128, 1, 1),
                            smem,
                            args,
                        )?,
                    }
                }
            }
            self.mark("attention")?;
            let tail = if pruned {
                LayerTail {
                    rows: n_seqs,
                    resid: self.last_resid.ptr(),
                    o_out: self.last_resid.ptr(),
                    o_out_kind: resid_out,
                    post_norm_delta: null,
                    layer_out: self.last_resid.ptr(),
                    layer_out_kind: resid_out,
                    norm_kernel: norm_for(n_seqs).0,
                    norm_threads: norm_for(n_seqs).1,
                    gemv: n_seqs == 1 && self.use_gemv && self.fuse_gemv,
                    tunable: false,
                }
            } else {
                LayerTail {
                    rows: n_tokens,
                    resid: self.resid.ptr(),
                    o_out,
                    o_out_kind,
                    post_norm_delta,
                    layer_out,
                    layer_out_kind,
                    norm_kernel,
                    norm_threads: layer_norm_threads,
                    gemv: fused_gemv,
                    tunable,
                }
            };
            self.enqueue_layer_tail(layer, lw, &tail)?;
        }
        // The pruned last layer left its rows compact in last_resid.
        let (final_resid, final_rows) = if prune_last {
            (self.last_resid.ptr(), null)
        } else {
            (self.resid.ptr(), last_rows)
        };
        self.launch_fwd(
            final_norm_kernel,
            (n_seqs as u32, 1, 1),
            (norm_threads, 1, 1),
            0,
            kargs![
                final_resid,
                norm_delta,
                self.wptr(self.final_norm_off),
                self.final_normed.ptr(),
                final_rows,
                h_i,
                eps
            ],
        )?;
        self.mark("rmsnorm")?;
        self.gemm(
            self.final_normed.ptr(),
            self.wptr(self.lm_head_off),
            self.logits.ptr(),
            n_seqs,
            c.vocab_size,
            h,
            GemmOut::F32,
            false,
        )?;
        self.mark("lm_head")?;
        let vocab_i = c.vocab_size as i32;
        self.launch_fwd(
            self.kernels.argmax_rows,
            (n_seqs as u32, 1, 1),
            (1024, 1, 1),
            0,
            kargs![self.logits.ptr(), vocab_i, self.argmax.ptr()],
        )?;
        self.mark("argmax")?;
        Ok(())
    }

    /// Decode-attention splits for a bucket: enough CTAs to cover the SMs ~8 times over (small
    /// batches otherwise leave most SMs idle while a few CTAs walk long contexts).
    fn decode_splits(&self, bucket: usize) -> usize {
        let ctas = bucket * self.config.num_attention_heads;
        (8 * self.device.num_sms)
            .div_ceil(ctas)
            .clamp(1, MAX_DECODE_SPLITS)
    }

    /// Graph bucket for a decode batch of `n` sequences: 1, 2, 4, 8, then multiples of 8.
    fn bucket_for(&self, n: usize) -> usize {
        let b = if n <= 8 {
            n.next_power_of_two()
        } else {
            n.div_ceil(8) * 8
        };
        b.min(self.options.max_seqs_per_step)
    }

    /// Checks a batch against the model's limits and fills the host staging buffer. Returns
    /// (rows, sequences, attention mode, rows to copy, sequences to copy).
    fn stage(
        &mut self,
        batch: &[SeqStep<'_>],
        pad_decode: bool,
    ) -> Result<(usize, usize, AttnMode), CudaError> {
        let c = &self.config;
        let bs = self.options.block_size_tokens;
        let stride = self.options.max_blocks_per_seq;
        if batch.is_empty() {
            return Err(CudaError::BadInput("empty batch".into()));
        }
        if batch.len() > self.options.max_seqs_per_step {
            return Err(CudaError::BadInput(format!(
                "{} sequences in one step; the model was sized for at most {}",
                batch.len(),
                self.options.max_seqs_per_step
            )));
        }
        let n_tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if n_tokens > self.options.max_tokens_per_step {
            return Err(CudaError::BadInput(format!(
                "{n_tokens} new tokens in one step; the model was sized for at most {} (chunk the prefill)",
                self.options.max_tokens_per_step
            )));
        }
        let max_pos = (self.rope.bytes() / 4) / c.head_dim();
        for (i, s) in batch.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} has no new tokens"
                )));
            }
            let end = s.end_len();
            if end > max_pos {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} reaches position {end}, beyond the model's {max_pos} positions"
                )));
            }
            let needed = end.div_ceil(bs);
            if s.block_table.len() < needed || needed > stride {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} needs {needed} blocks for {end} tokens; its table has {} (device tables hold {stride})",
                    s.block_table.len()
                )));
            }
            if let Some(&bad) = s.block_table[..needed]
                .iter()
                .find(|&&b| b as usize >= self.pool.num_blocks())
            {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} names block {bad}, outside the pool of {} blocks",
                    self.pool.num_blocks()
                )));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(CudaError::BadInput(format!(
                    "sequence {i} has token {bad}, outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
        }
        let is_decode = batch.iter().all(|s| s.tokens.len() == 1);
        let (rows, seqs) = if is_decode && pad_decode {
            let b = self.bucket_for(batch.len());
            (b, b)
        } else {
            (n_tokens, batch.len())
        };
        let sl = self.step_layout;
        {
            let tokens = self.step_host.slice_mut::<u32>(sl.tokens, rows);
            let mut r = 0;
            for s in batch {
                tokens[r..r + s.tokens.len()].copy_from_slice(s.tokens);
                r += s.tokens.len();
            }
            tokens[r..].fill(0);
        }
        {
            let positions = self.step_host.slice_mut::<i32>(sl.positions, rows);
            let mut r = 0;
            for s in batch {
                for j in 0..s.tokens.len() {
                    positions[r] = (s.context_len + j) as i32;
                    r += 1;
                }
            }
            positions[r..].fill(0);
        }
        {
            let slots = self.step_host.slice_mut::<i64>(sl.slots, rows);
            let mut r = 0;
            for s in batch {
                for j in 0..s.tokens.len() {
                    let p = s.context_len + j;
                    slots[r] = s.block_table[p / bs] as i64 * bs as i64 + (p % bs) as i64;
                    r += 1;
                }
            }
            slots[r..].fill(-1);
        }
        {
            let seq_lens = self.step_host.slice_mut::<i32>(sl.seq_lens, seqs);
            for (i, s) in batch.iter().enumerate() {
                seq_lens[i] = s.end_len() as i32;
            }
            seq_lens[batch.len()..].fill(0);
        }
        {
            let last_rows = self.step_host.slice_mut::<i32>(sl.last_rows, seqs);
            let mut r = 0;
            for (i, s) in batch.iter().enumerate() {
                r += s.tokens.len();
                last_rows[i] = (r - 1) as i32;
            }
            for (i, v) in last_rows.iter_mut().enumerate().skip(batch.len()) {
                *v = i as i32;
            }
        }
        {
            let tables = self
                .step_host
                .slice_mut::<u32>(sl.block_tables, seqs * stride);
            tables.fill(0);
            for (i, s) in batch.iter().enumerate() {
                let n = s.end_len().div_ceil(bs);
                tables[i * stride..i * stride + n].copy_from_slice(&s.block_table[..n]);
            }
        }
        let mode = if is_decode {
            AttnMode::Decode {
                splits: self.decode_splits(seqs),
            }
        } else {
            let tile_rows = if self.prefill_version >= 4 {
                PREFILL_V4_TILE_ROWS
            } else {
                PREFILL_TILE_ROWS
            };
            let mut tile_list: Vec<[i32; 4]> = Vec::new();
            let mut row0 = 0usize;
            for (i, s) in batch.iter().enumerate() {
                let n = s.tokens.len();
                let mut q = 0;
                while q < n {
                    let rows_in_tile = (n - q).min(tile_rows);
                    tile_list.push([
                        i as i32,
                        (row0 + q) as i32,
                        rows_in_tile as i32,
                        (s.context_len + q) as i32,
                    ]);
                    q += rows_in_tile;
                }
                row0 += n;
            }
            if matches!(self.prefill_version, PREFILL_V7P | PREFILL_V7PL) {
                // The persistent kernels takes the tiles from the end of the list as the longest
                // (most keys) first; the others keep the sequence order.
                tile_list.sort_by_key(|t| t[3] + t[2]);
            }
            assert!(tile_list.len() <= self.max_tiles);
            let tiles = self
                .step_host
                .slice_mut::<[i32; 4]>(sl.tiles, tile_list.len());
            tiles.copy_from_slice(&tile_list);
            AttnMode::Prefill {
                num_tiles: tile_list.len(),
            }
        };
        // Copy the used part of each array to the device (stream-ordered before the forward).
        let stride_bytes = 4 * stride;
        let mut copies = vec![
            (sl.tokens, 4 * rows),
            (sl.positions, 4 * rows),
            (sl.slots, 8 * rows),
            (sl.seq_lens, 4 * seqs),
            (sl.last_rows, 4 * seqs),
            (sl.block_tables, stride_bytes * seqs),
        ];
        if let AttnMode::Prefill { num_tiles } = mode {
            copies.push((sl.tiles, 16 * num_tiles));
        }
        for (offset, bytes) in copies {
            self.upload_staged(offset, bytes)?;
        }
        Ok((rows, seqs, mode))
    }

    /// Runs one step on the GPU (graph replay for decode batches), leaving logits and argmax on
    /// the device. Returns the number of sequence rows computed (the bucket for decode).
    fn run_step(&mut self, batch: &[SeqStep<'_>]) -> Result<usize, CudaError> {
        // A gated step runs eagerly: its waits are not part of any captured graph.
        let layer_gates = std::mem::take(&mut self.layer_gates);
        let use_graph = self.options.use_cuda_graphs && layer_gates.is_empty();
        let (rows, seqs, mode) = self.stage(batch, use_graph)?;
        trace!(
            "step: {} seqs, {rows} rows, {seqs} padded seqs, {}",
            batch.len(),
            match mode {
                AttnMode::Decode { splits } => format!("decode with {splits} splits"),
                AttnMode::Prefill { num_tiles } => format!("prefill with {num_tiles} tiles"),
            }
        );
        match mode {
            AttnMode::Decode { .. } if use_graph => {
                if !self.graphs.contains_key(&seqs) {
                    self.capture_decode_graph(seqs, mode)?;
                }
                let graph = &self.graphs[&seqs];
                drv("replaying the decode graph", graph.launch())?;
            }
            _ => self.enqueue_forward(rows, seqs, mode, &layer_gates)?,
        }
        Ok(seqs)
    }

    fn capture_decode_graph(&mut self, bucket: usize, mode: AttnMode) -> Result<(), CudaError> {
        // An eager run first: cuBLAS picks its kernels (and loads them) outside the capture.
        trace!("capturing the decode graph of bucket {bucket}: eager warm-up");
        self.enqueue_forward(bucket, bucket, mode, &[])?;
        self.wait("the eager warm-up before a graph capture")?;
        trace!("capturing the decode graph of bucket {bucket}: capture");
        let stream = self.device.stream.clone();
        drv(
            "beginning graph capture",
            stream.begin_capture(dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
        )?;
        let enqueued = self.enqueue_forward(bucket, bucket, mode, &[]);
        let graph = stream.end_capture(dsys::CUgraphInstantiate_flags(0));
        enqueued?;
        let graph = drv("ending graph capture", graph)?.ok_or_else(|| CudaError::Driver {
            context: "graph capture".into(),
            message: "the capture produced no graph".into(),
        })?;
        drv("uploading the graph", graph.upload())?;
        trace!("captured the decode graph of bucket {bucket}");
        self.graphs.insert(bucket, graph);
        Ok(())
    }

    /// Captures the decode graphs of every bucket up to `max_batch` now (start-up), so no step pays
    /// for a capture later.
    pub fn capture_decode_graphs(&mut self, max_batch: usize) -> Result<(), CudaError> {
        let mut n = 1;
        while n <= max_batch.min(self.options.max_seqs_per_step) {
            let bucket = self.bucket_for(n);
            if !self.graphs.contains_key(&bucket) {
                // Inputs for the eager warm-up run: padding rows (no KV writes, empty contexts).
                self.stage_padding(bucket)?;
                let mode = AttnMode::Decode {
                    splits: self.decode_splits(bucket),
                };
                self.capture_decode_graph(bucket, mode)?;
            }
            n = bucket + 1;
        }
        self.device.synchronize()
    }

    fn stage_padding(&mut self, rows: usize) -> Result<(), CudaError> {
        let sl = self.step_layout;
        self.step_host.slice_mut::<u32>(sl.tokens, rows).fill(0);
        self.step_host.slice_mut::<i32>(sl.positions, rows).fill(0);
        self.step_host.slice_mut::<i64>(sl.slots, rows).fill(-1);
        self.step_host.slice_mut::<i32>(sl.seq_lens, rows).fill(0);
        for (i, v) in self
            .step_host
            .slice_mut::<i32>(sl.last_rows, rows)
            .iter_mut()
            .enumerate()
        {
            *v = i as i32;
        }
        for (offset, bytes) in [
            (sl.tokens, 4 * rows),
            (sl.positions, 4 * rows),
            (sl.slots, 8 * rows),
            (sl.seq_lens, 4 * rows),
            (sl.last_rows, 4 * rows),
        ] {
            self.upload_staged(offset, bytes)?;
        }
        Ok(())
    }

    /// Waits for the compute stream with a deadline, so a GPU fault or hang becomes an error naming
    /// the step instead of a process that never returns.
    pub fn wait(&self, what: &str) -> Result<(), CudaError> {
        let stream = self.device.stream.cu_stream();
        let started = std::time::Instant::now();
        loop {
            // SAFETY: querying a live stream.
            let status = unsafe { dsys::cuStreamQuery(stream) };
            match status {
                dsys::cudaError_enum::CUDA_SUCCESS => return Ok(()),
                dsys::cudaError_enum::CUDA_ERROR_NOT_READY => {
                    if started.elapsed() > STEP_DEADLINE {
                        return Err(CudaError::Timeout {
                            what: what.to_string(),
                            seconds: STEP_DEADLINE.as_secs_f64(),
                        });
                    }
                    std::hint::spin_loop();
                }
                other => {
                    return Err(CudaError::Driver {
                        context: format!("waiting for {what}"),
                        message: format!("{other:?}"),
                    })
                }
            }
        }
    }

    /// One step; returns the greedy (argmax) token of each sequence. Only `batch.len()` u32 come back
    /// from the device: this is the serving path.
    pub fn forward_greedy(&mut self, batch: &[SeqStep<'_>]) -> Result<Vec<u32>, CudaError> {
        self.run_step(batch)?;
        let n = batch.len();
        if Self::copy_engine_step_io() {
            let mut out = vec![0u32; n];
            drv("reading the greedy tokens", unsafe {
                dr::memcpy_dtoh_async(&mut out, self.argmax.ptr(), self.device.stream.cu_stream())
            })?;
            self.wait("a forward step (greedy)")?;
            return Ok(out);
        }
        // The tokens go to mapped pinned memory by a kernel (no copy engine: see PinnedBuffer).
        self.copy_on_stream(self.logits_host.dev_ptr, self.argmax.ptr(), 4 * n)?;
        self.wait("a forward step (greedy)")?;
        Ok(self.logits_host.slice_mut::<u32>(0, n).to_vec())
    }

    /// `forward_greedy` with timing (benchmarks: where the wall-vs-GPU gap goes): returns the
    /// tokens and (GPU ms from the first enqueued work to the last, host ms to enqueue the step).
    /// Timing events on the stream before and after the step; otherwise the serving path.
    pub fn forward_greedy_timed(
        &mut self,
        batch: &[SeqStep<'_>],
    ) -> Result<(Vec<u32>, f64, f64), CudaError> {
        let ev = || {
            drv(
                "creating a timing event",
                dr::event::create(dsys::CUevent_flags::CU_EVENT_DEFAULT),
            )
        };
        let (start, end) = (ev()?, ev()?);
        let stream = self.device.stream.cu_stream();
        let host_start = std::time::Instant::now();
        let result = (|| {
            drv("recording an event", unsafe {
                dr::event::record(start, stream)
            })?;
            self.run_step(batch)?;
            let n = batch.len();
            self.copy_on_stream(self.logits_host.dev_ptr, self.argmax.ptr(), 4 * n)?;
            let enqueue_ms = host_start.elapsed().as_secs_f64() * 1e3;
            drv("recording an event", unsafe {
                dr::event::record(end, stream)
            })?;
            self.wait("a forward step (greedy, timed)")?;
            let gpu_ms = drv("reading a timing event", unsafe {
                dr::event::elapsed(start, end)
            })? as f64;
            Ok((
                self.logits_host.slice_mut::<u32>(0, n).to_vec(),
                gpu_ms,
                enqueue_ms,
            ))
        })();
        unsafe {
            let _ = dr::event::destroy(start);
            let _ = dr::event::destroy(end);
        }
        result
    }

    /// One step; returns the f32 logits of each sequence's last new token.
    pub fn forward_logits(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, CudaError> {
        self.run_step(batch)?;
        let vocab = self.config.vocab_size;
        let n = batch.len() * vocab;
        {
            let dst = self.logits_host.slice_mut::<f32>(0, n);
            drv("reading the logits", unsafe {
                dr::memcpy_dtoh_async(dst, self.logits.ptr(), self.device.stream.cu_stream())
            })?;
        }
        self.wait("a forward step (logits)")?;
        let data = self.logits_host.slice_mut::<f32>(0, n).to_vec();
        Ok(Logits {
            rows: batch.len(),
            vocab,
            data,
        })
    }

    /// Fills the whole KV pool with seeded uniform values in [-scale, scale] (benchmarks: decode
    /// attention then reads realistic, non-zero data without a prefill per sequence).
    pub fn fill_kv_random(&mut self, seed: u64, scale: f32) -> Result<(), CudaError> {
        let n = (self.pool.total_bytes() / self.elem()) as u64;
        let ptr = self.pool.base_device_ptr();
        let grid = (self.device.num_sms * 32) as u32;
        let bias = 0.0f32;
        self.launch(
            self.kernels.random_fill,
            (grid, 1, 1),
            (256, 1, 1),
            kargs![ptr, n, seed, scale, bias],
        )?;
        self.device.synchronize()
    }

    /// Per-layer readiness: the next step's layer `l` waits on the GPU for `gates[l]` (one event per
    /// layer, e.g. from `CudaSwapEngine::submit_layered`), so a step over a context that is still
    /// being swapped in starts at once and each layer runs as soon as its KV has arrived. The gated
    /// step runs without a CUDA graph. Gates are used by exactly one step.
    pub fn gate_next_step_on_layers(
        &mut self,
        gates: Vec<cudarc::driver::CudaEvent>,
    ) -> Result<(), CudaError> {
        if gates.len() != self.config.num_hidden_layers {
            return Err(CudaError::Driver {
                context: "gating a step on per-layer events".into(),
                message: format!(
                    "{} events for a model of {} layers",
                    gates.len(),
                    self.config.num_hidden_layers
                ),
            });
        }
        self.layer_gates = gates;
        Ok(())
    }

    /// Enqueues a step without waiting for it (benchmarks time a stream of these with events).
    pub fn enqueue_step(&mut self, batch: &[SeqStep<'_>]) -> Result<(), CudaError> {
        self.run_step(batch).map(|_| ())
    }

    /// Writes the weights as an HF checkpoint (`config.json` + `model.safetensors`, fp16/bf16) so HF
    /// transformers can load exactly the weights this model runs.
    pub fn save_hf_checkpoint(&self, dir: &Path) -> Result<(), CudaError> {
        let io = |path: &Path, e: std::io::Error| CudaError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let c = &self.config;
        let dtype_name = if self.options.dtype == DType::Bf16 {
            "bfloat16"
        } else {
            "float16"
        };
        let config_json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim(),
            "vocab_size": c.vocab_size,
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.rms_norm_eps,
            "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": dtype_name,
        });
        let config_path = dir.join("config.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&config_json).expect("json"),
        )
        .map_err(|e| io(&config_path, e))?;

        let st_dtype = if self.options.dtype == DType::Bf16 {
            "BF16"
        } else {
            "F16"
        };
        let tensors = self.tensor_map();
        let mut header = serde_json::Map::new();
        let mut at = 0usize;
        for (name, shape, _) in &tensors {
            let bytes = shape.iter().product::<usize>() * 2;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": st_dtype, "shape": shape, "data_offsets": [at, at + bytes]}),
            );
            at += bytes;
        }
        let mut header_bytes =
            serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
        while !header_bytes.len().is_multiple_of(8) {
            header_bytes.push(b' ');
        }
        let path = dir.join("model.safetensors");
        let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        let mut w = std::io::BufWriter::with_capacity(64 << 20, file);
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())
            .map_err(|e| io(&path, e))?;
        w.write_all(&header_bytes).map_err(|e| io(&path, e))?;
        for (name, shape, offset) in &tensors {
            let n: usize = shape.iter().product();
            let mut host = vec![0u16; n];
            drv(&format!("downloading `{name}`"), unsafe {
                dr::memcpy_dtoh_sync(&mut host, self.wptr(*offset))
            })?;
            // SAFETY: u16 slice viewed as bytes (little-endian host, as safetensors requires).
            let bytes = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, n * 2) };
            w.write_all(bytes).map_err(|e| io(&path, e))?;
        }
        w.flush().map_err(|e| io(&path, e))?;
        Ok(())
    }
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        // Buffers are freed after this; nothing may still run on them.
        let _ = self.device.stream.synchronize();
        self.graphs.clear();
    }
}

impl PagedModel for CudaModel {
    type Error = CudaError;

    fn forward(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, CudaError> {
        self.forward_logits(batch)
    }

    fn forward_greedy(&mut self, batch: &[SeqStep<'_>]) -> Result<Vec<u32>, CudaError> {
        CudaModel::forward_greedy(self, batch)
    }

    fn block_size_tokens(&self) -> usize {
        self.options.block_size_tokens
    }

    fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
