//! The Llama forward on the GPU over the paged KV pool.
//!
//! - `plan`: sizes, the start-up memory plan and the device buffers, the step-input layout.
//! - `kernels`: the NVRTC kernel table and the prefill attention kernel choice.
//! - `tma`: tensor maps of the KV pool and the own GEMM's operands.
//! - `weights`: tensor offsets, upload, seeded random generation, HF checkpoint export.
//! - `launch`: kernel launches (with programmatic dependent launch).
//! - `attention`: decode and prefill attention launches.
//! - `mlp`: GEMM dispatch (GEMV, multi-row GEMV, tuned cuBLASLt, cuBLAS, own wgmma GEMM) and a
//!   layer's tail.
//! - `forward`: one step (staging, the layer loop, results).
//! - `graphs`: decode graph buckets and their capture.

use std::collections::BTreeMap;
use std::path::Path;

use cudarc::cublas::{sys as bsys, CudaBlas};
use cudarc::driver::{sys as dsys, CudaGraph};

use super::gemm_tune::TunedGemm;
use super::tuning::{DecodeAttention, DecodeGemm, EngineTuning, GemmTuning};
use super::{drv, legacy_stream_done, CudaError, DeviceBuffer, GpuDevice, GpuKvPool};
use crate::batch::{Logits, PagedModel, SeqStep};
use crate::config::{DType, ModelConfig};
use crate::weights::WeightSet;

mod attention;
mod forward;
mod graphs;
mod kernels;
mod launch;
mod mlp;
mod plan;
mod tma;
mod weights;

pub(crate) use kernels::Kernels;
pub(crate) use kernels::PrefillKernel;
pub(crate) use launch::kargs;
pub(crate) use mlp::{GemmPath, GEMV_THREADS};
pub(crate) use plan::Buffers;
use plan::{PinnedBuffer, StepLayout};
pub(crate) use tma::{OwnGateUpMaps, TmaMap};
pub(crate) use weights::WeightLayout;

/// Most splits of one sequence's context in decode attention (flash-decoding).
const MAX_DECODE_SPLITS: usize = 32;
pub(crate) const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Prefill GEMMs with at least this many rows use the tuned algorithm choice of gemm_tune/.
pub(crate) const TUNE_MIN_ROWS: usize = 512;
/// Token count from which RMSNorm runs 256 threads per row (`add_rmsnorm_rows`).
const NORM_ROWS_MIN_TOKENS: usize = 64;
/// Left free after sizing everything: CUDA graphs, cuBLAS internals, module code.
const DEFAULT_RESERVE_BYTES: usize = 512 << 20;

fn trace_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("DJINN_CUDA_TRACE").is_some())
}

macro_rules! trace {
    ($($t:tt)*) => {
        if $crate::cuda::model::trace_on() {
            eprintln!("[cuda] {}", format!($($t)*));
        }
    };
}
pub(crate) use trace;

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

/// Sizes fixed at start-up (everything is allocated once) and the forward's typed options.
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
    /// Kernel and GEMM choices (default: the measured-fastest path for the card).
    pub tuning: EngineTuning,
    /// KV the pool must hold at start-up (the longest context times the largest batch that must be
    /// resident at once); `None`: no demand. Planned with everything else: when weights, buffers
    /// and this KV cannot fit the card, start-up fails with `CudaError::OutOfMemory`.
    pub kv_demand: Option<KvDemand>,
}

/// Sequences that must fit the KV pool at once, each of up to `tokens_per_sequence` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvDemand {
    pub sequences: usize,
    pub tokens_per_sequence: usize,
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
            tuning: EngineTuning::default(),
            kv_demand: None,
        }
    }
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
    pub(crate) kernels: Kernels,
    pub(crate) layout: WeightLayout,
    pub(crate) buf: Buffers,
    step_host: PinnedBuffer,
    step_layout: StepLayout,
    logits_host: PinnedBuffer,
    pool: GpuKvPool,
    max_tiles: usize,
    /// Set while a profiling probe runs a step: an event after each kernel / GEMM, with its
    /// category.
    pub(crate) profiler: std::cell::RefCell<Option<Vec<(dsys::CUevent, &'static str)>>>,
    /// Programmatic dependent launch of the forward's kernels (sm_90+ and the option on).
    use_pdl: bool,
    /// Prefill attention kernel in use.
    prefill: PrefillKernel,
    /// Decode attention runs one thread block per KV head (`attn_decode_gqa`) instead of one per
    /// query head.
    decode_per_kv_head: bool,
    /// The wgmma kernel that `set_wgmma_prefill(true)` restores (`None`: the card or model has
    /// none).
    wgmma_prefill: Option<PrefillKernel>,
    /// Tensor map of the KV pool for the warp-specialised prefill attention (`None` where it
    /// cannot run).
    kv_tma_map: Option<TmaMap>,
    /// Tensor maps of the own fused gate_up + SiLU-mul GEMM (`gemm_ws_silu`): `None` where it
    /// cannot run (not sm_90, intermediate size not a multiple of 128, steps under one tile).
    pub(crate) own_gate_up: Option<OwnGateUpMaps>,
    /// Steps of at least this many tokens run gate_up + SiLU-mul as `gemm_ws_silu` instead of
    /// cuBLAS + `silu_mul` (`usize::MAX`: never).
    own_gate_up_min_tokens: usize,
    /// Tuned cuBLASLt algorithm choice for large prefill GEMMs (None: tuning off or no
    /// libcublasLt; cublasGemmEx then).
    pub(crate) tuned_gemm: Option<TunedGemm>,
    /// Whether `tuned_gemm` is used (checks turn it off to compare against cublasGemmEx).
    use_gemm_tuning: bool,
    /// Steps of at least this many tokens keep the residual stream in the weights' type
    /// (fp16/bf16, as HF's fp16 Llama does; each add is formed in f32 and rounded once), which
    /// halves the bytes RMSNorm reads and the o_proj / down_proj epilogues read and write; smaller
    /// steps keep it in f32. The stream lives for one step (`embed` starts it), so the choice is
    /// per step and fixed per decode graph bucket.
    pub(crate) half_resid_min_tokens: usize,
    /// Prefill steps run the last layer's attention, o_proj and MLP on each sequence's last row
    /// only (the logits read nothing else; every row's KV is still written).
    prune_last_layer: bool,
    /// What runs the linear layers of decode steps of 2 to `BATCH_GEMV_MAX_ROWS` sequences.
    decode_gemm: DecodeGemm,
    /// Bytes allocated at start-up, by purpose (for reports).
    pub memory_breakdown: Vec<(String, usize)>,
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

/// The model shapes and step sizes the kernels support.
fn check_supported(config: &ModelConfig, options: &CudaModelOptions) -> Result<(), CudaError> {
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
    Ok(())
}

/// cuBLAS handle on the compute stream with a fixed workspace (so cuBLAS never allocates during
/// graph capture).
fn create_blas(device: &GpuDevice, workspace: u64) -> Result<CudaBlas, CudaError> {
    let blas = CudaBlas::new(device.stream.clone()).map_err(|e| CudaError::Cublas {
        context: "creating the cuBLAS handle".into(),
        message: format!("{e:?}"),
    })?;
    // SAFETY: the workspace buffer outlives the handle (both owned by the model).
    unsafe {
        bsys::cublasSetWorkspace_v2(
            *blas.handle(),
            workspace as *mut std::ffi::c_void,
            CUBLAS_WORKSPACE_BYTES,
        )
        .result()
        .map_err(|e| CudaError::Cublas {
            context: "setting the cuBLAS workspace".into(),
            message: format!("{e:?}"),
        })?;
    }
    Ok(blas)
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
        dtype_elem(options.dtype)?;
        check_supported(&config, &options)?;
        let tuning = options.tuning.clone();
        let (prefill, wgmma_prefill, ws_possible) =
            kernels::choose_prefill(&device, &config, &options, tuning.prefill_attention)?;
        let decode_per_kv_head = kernels::choose_decode(&config, tuning.decode_attention)?;
        let kernels = Kernels::load(&device, &config, &options)?;
        let layout = WeightLayout::new(&config);
        let sized = plan::Sizes::new(&config, &options);
        let (buf, pool, memory_breakdown) =
            plan::allocate(&device, &config, &options, &sized, layout.total_elems)?;
        let blas = create_blas(&device, buf.cublas_workspace.ptr())?;
        plan::upload_rope_table(&device, &config, &buf.rope, sized.max_pos)?;
        let kv_tma_map = if ws_possible {
            Some(tma::encode_kv_tma_map(&pool, &config, &options)?)
        } else {
            None
        };
        let own_gate_up = tma::own_gate_up_maps(&device, &config, &options, &layout, &buf)?;
        let tuned_gemm = match &tuning.gemm_tuning {
            GemmTuning::Off => None,
            GemmTuning::Timed => TunedGemm::new(&device.name, None)?,
            GemmTuning::Table(path) => TunedGemm::new(&device.name, Some(path.as_deref()))?,
        };
        let step_host = PinnedBuffer::new(sized.step_layout.total)?;
        let logits_host = PinnedBuffer::new(options.max_seqs_per_step * config.vocab_size * 4)?;
        let mut model = CudaModel {
            graphs: BTreeMap::new(),
            layer_gates: Vec::new(),
            use_pdl: tuning.pdl && device.compute_capability.0 >= 9,
            config,
            options,
            device,
            blas,
            kernels,
            layout,
            buf,
            step_host,
            step_layout: sized.step_layout,
            logits_host,
            pool,
            max_tiles: sized.max_tiles,
            profiler: std::cell::RefCell::new(None),
            prefill,
            decode_per_kv_head,
            wgmma_prefill,
            kv_tma_map,
            own_gate_up,
            own_gate_up_min_tokens: tuning.own_gate_up_min_tokens,
            tuned_gemm,
            use_gemm_tuning: true,
            half_resid_min_tokens: tuning.half_residual_min_tokens,
            prune_last_layer: tuning.prune_last_layer,
            decode_gemm: tuning.decode_gemm,
            memory_breakdown,
        };
        match source {
            WeightSource::Host(ws) => model.upload_weights(ws)?,
            WeightSource::DeviceRandom { seed, .. } => model.generate_random_weights(seed)?,
        }
        model.device.synchronize()?;
        Ok(model)
    }

    /// Whether prefill attention runs a wgmma kernel.
    pub fn uses_wgmma_prefill(&self) -> bool {
        self.prefill.is_wgmma()
    }

    /// Name of the prefill attention kernel in use (for check and bench labels).
    pub fn prefill_attention_name(&self) -> &'static str {
        self.prefill.label()
    }

    /// Switches prefill attention between the wgmma kernel chosen at start-up and the mma.sync
    /// kernel (checks compare the two); returns whether the wgmma kernel was on. It is only turned
    /// on where the card and model have one.
    pub fn set_wgmma_prefill(&mut self, on: bool) -> bool {
        let was = self.uses_wgmma_prefill();
        match (on, was, self.wgmma_prefill) {
            (true, false, Some(k)) => self.prefill = k,
            (false, true, _) => self.prefill = PrefillKernel::Mma,
            _ => {}
        }
        was
    }

    /// Whether decode attention runs one thread block per KV head (`attn_decode_gqa`).
    pub fn decode_attention_per_kv_head(&self) -> bool {
        self.decode_per_kv_head
    }

    /// Switches decode attention between one thread block per KV head and one per query head
    /// (checks compare the two); returns the previous choice. Per KV head is only turned on where
    /// the model's group fits the kernel. Captured decode graphs are dropped on a change.
    pub fn set_decode_attention_per_kv_head(&mut self, on: bool) -> bool {
        let was = self.decode_per_kv_head;
        let possible = kernels::choose_decode(&self.config, DecodeAttention::PerKvHead).is_ok();
        let now = on && possible;
        if now != was {
            self.graphs.clear();
            self.decode_per_kv_head = now;
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

    /// Whether large prefill GEMMs may use the tuned cuBLASLt choice (see gemm_tune/).
    pub fn has_gemm_tuning(&self) -> bool {
        self.tuned_gemm.is_some()
    }

    /// Turns the tuned cuBLASLt choice on or off (off: cublasGemmEx); returns the previous state.
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

    /// cuBLASLt's version (`cublasLtGetVersion`), if the tuned GEMM path is on.
    pub fn cublaslt_version(&self) -> Option<usize> {
        self.tuned_gemm.as_ref().map(|t| t.lt_version())
    }

    pub fn kv_pool(&self) -> &GpuKvPool {
        &self.pool
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

    /// What runs the linear layers of decode steps of 2 to 32 sequences.
    pub fn decode_gemm(&self) -> DecodeGemm {
        self.decode_gemm
    }

    /// Switches the linear layers of decode steps of 2 to 32 sequences between cuBLAS and the
    /// multi-row GEMV (checks and benchmarks compare the two); returns the previous choice.
    /// Captured decode graphs are dropped on a change, since each one fixed its path.
    pub fn set_decode_gemm(&mut self, choice: DecodeGemm) -> DecodeGemm {
        if choice != self.decode_gemm {
            self.graphs.clear();
        }
        std::mem::replace(&mut self.decode_gemm, choice)
    }

    fn elem(&self) -> usize {
        self.options.dtype.size_bytes()
    }

    pub(crate) fn wptr(&self, elem_offset: usize) -> u64 {
        self.buf.weights.ptr() + (elem_offset * self.elem()) as u64
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
