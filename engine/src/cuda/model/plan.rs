//! The start-up memory plan: every device buffer sized for the largest step, checked against the
//! free memory before anything is allocated (running out is `CudaError::OutOfMemory` with the
//! breakdown), and the byte layout of the per-step inputs.

use std::ffi::c_void;

use cudarc::driver::{result as dr, sys as dsys};

use super::kernels::PREFILL_SMALL_TILE_ROWS;
use super::{
    drv, legacy_stream_done, CudaError, CudaModelOptions, DeviceBuffer, GpuDevice, GpuKvPool,
    CUBLAS_WORKSPACE_BYTES, MAX_DECODE_SPLITS,
};
use crate::config::{KvLayout, ModelConfig};
use crate::cuda::pool::mib;

/// Byte offsets (from the step-input buffer's start) of the per-step arrays; the same layout is
/// used in the pinned host staging buffer.
#[derive(Clone, Copy)]
pub(super) struct StepLayout {
    pub tokens: usize,
    pub positions: usize,
    pub slots: usize,
    pub seq_lens: usize,
    pub last_rows: usize,
    pub block_tables: usize,
    pub tiles: usize,
    pub total: usize,
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

/// Sizes derived from the model and the step limits.
pub(super) struct Sizes {
    pub step_layout: StepLayout,
    /// Most prefill attention tiles in one step (the smallest tile size bounds it).
    pub max_tiles: usize,
    /// Positions the RoPE table covers.
    pub max_pos: usize,
}

impl Sizes {
    pub(super) fn new(config: &ModelConfig, options: &CudaModelOptions) -> Sizes {
        let (max_t, max_s) = (options.max_tokens_per_step, options.max_seqs_per_step);
        let table_stride = options.max_blocks_per_seq;
        let max_tiles = max_t.div_ceil(PREFILL_SMALL_TILE_ROWS) + max_s;
        Sizes {
            step_layout: StepLayout::new(max_t, max_s, table_stride, max_tiles),
            max_tiles,
            max_pos: config
                .max_position_embeddings
                .min(table_stride * options.block_size_tokens),
        }
    }
}

/// The model's device buffers (all allocated at start-up).
pub(crate) struct Buffers {
    pub weights: DeviceBuffer,
    /// The residual stream (f32, or the weights' type for large steps).
    pub resid: DeviceBuffer,
    pub normed: DeviceBuffer,
    /// qkv / gate-up GEMM outputs.
    pub buf_a: DeviceBuffer,
    /// Attention output / MLP activation.
    pub buf_b: DeviceBuffer,
    pub final_normed: DeviceBuffer,
    /// Compact rows of the pruned last layer: each sequence's rotated q (qkv stride) and its
    /// residual row (f32 or the weights' type, as the step's stream).
    pub last_q: DeviceBuffer,
    pub last_resid: DeviceBuffer,
    pub logits: DeviceBuffer,
    pub argmax: DeviceBuffer,
    pub part_out: DeviceBuffer,
    pub part_lse: DeviceBuffer,
    pub rope: DeviceBuffer,
    pub cublas_workspace: DeviceBuffer,
    pub step_dev: DeviceBuffer,
}

/// The shapes every buffer is sized by.
struct Dims {
    elem: usize,
    h: usize,
    inter: usize,
    hd: usize,
    nh: usize,
    vocab: usize,
    qkv_width: usize,
    max_t: usize,
    max_s: usize,
}

impl Dims {
    fn new(config: &ModelConfig, options: &CudaModelOptions) -> Dims {
        let (nh, hd) = (config.num_attention_heads, config.head_dim());
        Dims {
            elem: options.dtype.size_bytes(),
            h: config.hidden_size,
            inter: config.intermediate_size,
            hd,
            nh,
            vocab: config.vocab_size,
            qkv_width: (nh + 2 * config.num_key_value_heads) * hd,
            max_t: options.max_tokens_per_step,
            max_s: options.max_seqs_per_step,
        }
    }
}

/// The memory plan on a card with `free` of `total` bytes free: every buffer's bytes by purpose,
/// the KV pool last, and the pool's block count; an error when the plan or the KV demand cannot
/// fit. Pure arithmetic, so the plan of a run can be checked without the card.
pub(super) fn memory_plan(
    config: &ModelConfig,
    options: &CudaModelOptions,
    sizes: &Sizes,
    weight_elems: usize,
    (free, total): (usize, usize),
) -> Result<(Vec<(String, usize)>, usize), CudaError> {
    let Dims {
        elem,
        h,
        inter,
        hd,
        nh,
        vocab,
        qkv_width,
        max_t,
        max_s,
    } = Dims::new(config, options);
    let mut plan: Vec<(String, usize)> = vec![
        ("weights".into(), weight_elems * elem),
        ("residual stream (f32)".into(), max_t * h * 4),
        ("normed activations".into(), max_t * h * elem),
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
        ("RoPE table".into(), sizes.max_pos * hd * 4),
        ("cuBLAS workspace".into(), CUBLAS_WORKSPACE_BYTES),
        ("step inputs".into(), sizes.step_layout.total),
    ];
    let fixed_bytes: usize = plan.iter().map(|(_, b)| b).sum();
    let layout = KvLayout::new(config, options.block_size_tokens);
    let block_bytes = layout.block_elems() * elem;
    let available = free.saturating_sub(options.reserve_bytes);
    let num_blocks = match options.num_kv_blocks {
        Some(n) => n,
        None => available.saturating_sub(fixed_bytes) / block_bytes,
    };
    plan.push((
        format!(
            "KV pool ({num_blocks} blocks of {:.2} MiB)",
            mib(block_bytes)
        ),
        num_blocks.saturating_mul(block_bytes),
    ));
    if let Some(refusal) =
        check_kv_demand(config, options, &plan, num_blocks, block_bytes, free, total)
    {
        return Err(refusal);
    }
    let needed = plan
        .iter()
        .fold(options.reserve_bytes, |sum, (_, b)| sum.saturating_add(*b));
    if needed > free || num_blocks == 0 {
        let breakdown = plan
            .iter()
            .map(|(what, b)| format!("{what} {:.1} MiB", mib(*b)))
            .collect::<Vec<_>>()
            .join(", ")
            + &format!(", reserve {:.1} MiB", mib(options.reserve_bytes));
        return Err(CudaError::OutOfMemory {
            what: format!(
                "{} ({:?}) with a {num_blocks}-block KV pool",
                config.name, options.dtype
            ),
            requested_mib: mib(needed),
            free_mib: mib(free),
            total_mib: mib(total),
            breakdown,
        });
    }
    Ok((plan, num_blocks))
}

/// Checks that the plan fits the free memory and allocates it. Returns the buffers, the KV pool
/// and the plan (bytes by purpose).
#[allow(clippy::type_complexity)]
pub(super) fn allocate(
    device: &GpuDevice,
    config: &ModelConfig,
    options: &CudaModelOptions,
    sizes: &Sizes,
    weight_elems: usize,
) -> Result<(Buffers, GpuKvPool, Vec<(String, usize)>), CudaError> {
    let (plan, num_blocks) = memory_plan(config, options, sizes, weight_elems, device.mem_info()?)?;
    let Dims {
        elem,
        h,
        inter,
        hd,
        nh,
        vocab,
        qkv_width,
        max_t,
        max_s,
    } = Dims::new(config, options);
    let layout = KvLayout::new(config, options.block_size_tokens);
    let ctx = device.ctx.clone();
    let alloc = |bytes: usize, what: &str| DeviceBuffer::alloc(&ctx, bytes, what);
    let buffers = Buffers {
        weights: alloc(weight_elems * elem, "weights")?,
        resid: alloc(max_t * h * 4, "residual stream")?,
        normed: alloc(max_t * h * elem, "normed activations")?,
        buf_a: alloc(
            max_t * qkv_width.max(2 * inter) * elem,
            "qkv / gate-up activations",
        )?,
        buf_b: alloc(
            max_t * (nh * hd).max(inter) * elem,
            "attention / MLP activations",
        )?,
        final_normed: alloc(max_s * h * elem, "final norm rows")?,
        last_q: alloc(max_s * qkv_width * elem, "last-row q")?,
        last_resid: alloc(max_s * h * 4, "last-row residual")?,
        logits: alloc(max_s * vocab * 4, "logits")?,
        argmax: alloc(max_s * 4, "argmax")?,
        part_out: alloc(
            max_s * nh * MAX_DECODE_SPLITS * hd * 4,
            "decode split partials",
        )?,
        part_lse: alloc(max_s * nh * MAX_DECODE_SPLITS * 4, "decode split LSE")?,
        rope: alloc(sizes.max_pos * hd * 4, "RoPE table")?,
        cublas_workspace: alloc(CUBLAS_WORKSPACE_BYTES, "cuBLAS workspace")?,
        step_dev: alloc(sizes.step_layout.total, "step inputs")?,
    };
    let pool = GpuKvPool::new(&ctx, layout, options.dtype, num_blocks)?;
    Ok((buffers, pool, plan))
}

/// The refusal when the pool of `num_blocks` cannot hold `options.kv_demand` (every sequence's
/// blocks at once), naming the demand, what else the card holds and its memory; None when it fits
/// or there is no demand. Arithmetic saturates: a demand from the command line may be absurd.
fn check_kv_demand(
    config: &ModelConfig,
    options: &CudaModelOptions,
    plan: &[(String, usize)],
    num_blocks: usize,
    block_bytes: usize,
    free: usize,
    total: usize,
) -> Option<CudaError> {
    let demand = options.kv_demand?;
    let blocks_each = demand
        .tokens_per_sequence
        .div_ceil(options.block_size_tokens);
    let blocks = blocks_each.saturating_mul(demand.sequences);
    if blocks <= num_blocks {
        return None;
    }
    let kv_bytes = blocks.saturating_mul(block_bytes);
    // Everything but the pool, then the demanded KV in its place.
    let others: usize = plan[..plan.len() - 1]
        .iter()
        .fold(0, |sum, (_, b)| sum.saturating_add(*b));
    let requested = others
        .saturating_add(kv_bytes)
        .saturating_add(options.reserve_bytes);
    let mut breakdown: Vec<String> = plan[..plan.len() - 1]
        .iter()
        .map(|(what, b)| format!("{what} {:.1} MiB", mib(*b)))
        .collect();
    breakdown.push(format!(
        "KV for {} x {} tokens ({blocks} blocks of {:.2} MiB) {:.1} MiB",
        demand.sequences,
        demand.tokens_per_sequence,
        mib(block_bytes),
        mib(kv_bytes)
    ));
    breakdown.push(format!("reserve {:.1} MiB", mib(options.reserve_bytes)));
    Some(CudaError::OutOfMemory {
        what: format!(
            "{} ({:?}): KV for {} sequences of {} tokens at once (the pool holds {num_blocks} blocks, {} tokens)",
            config.name,
            options.dtype,
            demand.sequences,
            demand.tokens_per_sequence,
            num_blocks.saturating_mul(options.block_size_tokens)
        ),
        requested_mib: mib(requested),
        free_mib: mib(free),
        total_mib: mib(total),
        breakdown: breakdown.join(", "),
    })
}

/// RoPE table computed in f64 on the host: cos/sin of pos * f_i, interleaved, with f_i the
/// (Llama-3-scaled where configured) inverse frequencies of `ModelConfig::rope_inv_freq`.
pub(super) fn upload_rope_table(
    device: &GpuDevice,
    config: &ModelConfig,
    rope: &DeviceBuffer,
    max_pos: usize,
) -> Result<(), CudaError> {
    let hd = config.head_dim();
    let inv_freq = config.rope_inv_freq();
    let mut table = vec![0f32; max_pos * hd];
    for pos in 0..max_pos {
        for (i, f) in inv_freq.iter().enumerate() {
            let angle = pos as f64 * f;
            table[pos * hd + 2 * i] = angle.cos() as f32;
            table[pos * hd + 2 * i + 1] = angle.sin() as f32;
        }
    }
    drv("binding the context", device.ctx.bind_to_thread())?;
    drv("uploading the RoPE table", unsafe {
        dr::memcpy_htod_sync(rope.ptr(), &table)
    })?;
    legacy_stream_done("uploading the RoPE table")
}

/// Page-locked host memory (staging for step inputs and results), freed on drop. It is also
/// mapped into the device's address space, so kernels can read the step's inputs and write its
/// tokens directly: the step then needs no copy engine, and never queues behind KV swaps, which
/// keep both copy engines busy for tens of milliseconds (a 32 KiB `cuMemcpyHtoDAsync` waited for
/// the queued swaps, a mapped-memory kernel did not; docs/engine-cuda.md).
pub(super) struct PinnedBuffer {
    ptr: *mut u8,
    /// The same memory as seen from the device.
    pub dev_ptr: u64,
    bytes: usize,
}

impl PinnedBuffer {
    pub(super) fn new(bytes: usize) -> Result<Self, CudaError> {
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

    pub(super) fn slice_mut<T: Copy>(&mut self, byte_offset: usize, len: usize) -> &mut [T] {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::model::WeightLayout;

    /// The options `djinn engine run --backend cuda --model llama3.1-8b` builds for a workload of
    /// 131,072-token contexts (fp16, 16-token blocks, 4,096-token steps, 256 sequences).
    fn engine_run_options(config: &ModelConfig) -> CudaModelOptions {
        let mut o = CudaModelOptions::for_config(config);
        o.block_size_tokens = 16;
        o.max_tokens_per_step = 4096;
        o.max_seqs_per_step = 256;
        o.max_blocks_per_seq = 131_073usize.div_ceil(16);
        o.kv_demand = Some(super::super::KvDemand {
            sequences: 1,
            tokens_per_sequence: 131_073,
        });
        o
    }

    #[test]
    fn llama3_8b_engine_run_plans_its_memory_on_an_h100() {
        let config = ModelConfig::llama3_1_8b();
        let options = engine_run_options(&config);
        let sizes = Sizes::new(&config, &options);
        let weights = WeightLayout::new(&config).total_elems;
        // An H100 80GB HBM3 reports 81,559 MiB; take 80,000 MiB free after the context.
        let mib_bytes = 1usize << 20;
        let (plan, blocks) = memory_plan(
            &config,
            &options,
            &sizes,
            weights,
            (80_000 * mib_bytes, 81_559 * mib_bytes),
        )
        .expect("llama3.1-8b fits an H100 with a 131k-token context");
        let kv_tokens = blocks * 16;
        let fixed: usize = plan[..plan.len() - 1].iter().map(|(_, b)| b).sum();
        eprintln!(
            "llama3.1-8b on 80,000 MiB free: {:.1} GiB besides the pool, KV pool {blocks} blocks = {kv_tokens} tokens",
            fixed as f64 / (1u64 << 30) as f64
        );
        // Weights (8.03 B parameters in fp16) dominate what is not KV.
        assert!((16.0e9..17.5e9).contains(&(fixed as f64)), "{fixed}");
        // Room for ten 42k-token contexts (5.25 GiB each) at once.
        assert!(kv_tokens >= 10 * 43_008, "{kv_tokens} tokens");
    }

    #[test]
    fn a_131k_context_beyond_a_small_card_is_refused_by_the_plan() {
        let config = ModelConfig::llama3_1_8b();
        let options = engine_run_options(&config);
        let sizes = Sizes::new(&config, &options);
        let weights = WeightLayout::new(&config).total_elems;
        let gib = 1usize << 30;
        let err = memory_plan(&config, &options, &sizes, weights, (24 * gib, 24 * gib))
            .unwrap_err()
            .to_string();
        assert!(err.contains("KV for 1 sequences of 131073 tokens"), "{err}");
    }
}
