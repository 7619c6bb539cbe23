//! GEMM dispatch and a layer's tail (o_proj, post-attention RMSNorm, MLP). Batch-1 steps use the
//! streaming GEMV kernels; decode steps of 2-32 rows the multi-row GEMV when
//! `DecodeGemm::Gemv` is chosen; prefill-sized GEMMs the tuned cuBLASLt choice; gate_up of large
//! steps on sm_90 the own warp-specialised wgmma GEMM with SiLU-mul in its epilogue; the rest
//! cuBLAS.

use std::ffi::c_void;

use cudarc::cublas::{result as br, sys as bsys};
use cudarc::driver::sys as dsys;

use super::kernels::{BATCH_GEMV_TILES, OWN_GEMM_SMEM_BYTES};
use super::tma::{TmaMap, OWN_GEMM_TILE_M};
use super::weights::LayerOffsets;
use super::{kargs, CudaError, CudaModel, CUBLAS_WORKSPACE_BYTES};
use crate::config::DType;
use crate::cuda::gemm_tune::{GemmArgs, GemmOut};
use crate::cuda::tuning::BATCH_GEMV_MAX_ROWS;

/// Output rows per warp and threads per CTA of the batch-1 GEMV kernels (GEMV_R, GEMV_THREADS in
/// gemv.cu).
const GEMV_ROWS_PER_WARP: usize = 2;
pub(crate) const GEMV_THREADS: usize = 128;
/// Weight rows per CTA and threads per CTA of the multi-row GEMV (gemv_batch.cu: 16 rows, the
/// SiLU variant 8 gate and 8 up rows; BG_THREADS).
const BATCH_GEMV_ROWS_PER_CTA: usize = 16;
const BATCH_GEMV_THREADS: u32 = 128;
/// x rows per tile of the multi-row GEMV (the mma's n dimension).
const BATCH_GEMV_TILE_ROWS: usize = 8;

/// How `CudaModel::gemm` runs a GEMM of more than one row (one row always takes the batch-1 GEMV).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmPath {
    /// `cublasGemmEx`.
    Cublas,
    /// Large prefill GEMMs: the tuned cuBLASLt choice where tuning is on.
    Tuned,
    /// Decode steps of 2 to `BATCH_GEMV_MAX_ROWS` rows: the multi-row GEMV (cuBLAS beyond).
    BatchGemv,
}

/// Whether the multi-row GEMV takes an `m`-row GEMM of inner size `k` (16-byte loads of each row).
pub(crate) fn batch_gemv_fits(m: usize, k: usize) -> bool {
    (2..=BATCH_GEMV_MAX_ROWS).contains(&m) && k.is_multiple_of(8)
}
/// Columns of one tile of the own GEMM (GM_BN in gemm_ws.cu).
const OWN_GEMM_TILE_N: usize = 256;

/// Where o_proj, the post-attention RMSNorm and the MLP of one layer read and write
/// (`CudaModel::enqueue_layer_tail`).
pub(super) struct LayerTail {
    /// Rows (tokens) the tail runs on.
    pub rows: usize,
    /// Their residual stream: o_proj and down_proj add into it (GEMM with beta = 1 / GEMV
    /// epilogue), the post-attention RMSNorm then only reads it.
    pub resid: u64,
    /// The residual's type (f32 or the weights' type) as a GEMM output kind.
    pub out_kind: GemmOut,
    pub norm_kernel: dsys::CUfunction,
    pub norm_threads: u32,
    /// One row: gate_up through the SiLU-fused GEMV.
    pub gemv: bool,
    /// How the GEMMs of more than one row run (`BatchGemv`: gate_up with SiLU-mul fused too).
    pub path: GemmPath,
}

impl CudaModel {
    /// Grid for the batch-1 GEMV kernels: one warp per `GEMV_ROWS_PER_WARP` output rows.
    pub(super) fn gemv_grid(warps: usize) -> (u32, u32, u32) {
        ((warps * 32).div_ceil(GEMV_THREADS) as u32, 1, 1)
    }

    /// Row-major `y[m, n] = x[m, k] · w[n, k]^T` (PyTorch Linear layout), fp32 accumulate.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        x: u64,
        w: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        out: GemmOut,
        path: GemmPath,
    ) -> Result<(), CudaError> {
        if path == GemmPath::BatchGemv && batch_gemv_fits(m, k) {
            return self.launch_batch_gemv(x, w, y, m, n, k, out);
        }
        if m == 1 && k.is_multiple_of(8) {
            // Batch-1 decode: a streaming GEMV reads the weights closer to the bandwidth floor than
            // cuBLAS does for m = 1 (docs/engine-cuda.md).
            let (n_i, k_i, f32_i) = (n as i32, k as i32, out.gemv_code());
            return self.launch_fwd(
                self.kernels.gemv,
                Self::gemv_grid(n.div_ceil(GEMV_ROWS_PER_WARP)),
                (GEMV_THREADS as u32, 1, 1),
                0,
                kargs![w, x, y, n_i, k_i, f32_i],
            );
        }
        let gemm_ex = || self.gemm_ex(x, w, y, m, n, k, out);
        if let (GemmPath::Tuned, true, Some(tuned)) = (path, self.use_gemm_tuning, &self.tuned_gemm)
        {
            let args = GemmArgs {
                x,
                w,
                y,
                m,
                n,
                k,
                out,
                // buf_a (qkv / gate-up output) is consumed before o_proj and down_proj run.
                scratch: if self.buf.buf_a.bytes() >= m * n * out.elem_bytes() {
                    self.buf.buf_a.ptr()
                } else {
                    0
                },
                bf16: self.options.dtype == DType::Bf16,
                workspace: self.buf.cublas_workspace.ptr(),
                workspace_bytes: CUBLAS_WORKSPACE_BYTES,
                stream: self.device.stream.cu_stream(),
            };
            return tuned.run(&args, &gemm_ex);
        }
        gemm_ex()
    }

    /// `y[m, n] = x[m, k] · w[n, k]^T` through the multi-row GEMV (`batch_gemv_fits(m, k)`; the
    /// caller checks): one CTA per 16 weight rows, the entry point for ceil(m / 8) x-row tiles.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_batch_gemv(
        &self,
        x: u64,
        w: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        out: GemmOut,
    ) -> Result<(), CudaError> {
        let f = self.kernels.gemv_batch[Self::batch_gemv_entry(m)];
        let (m_i, n_i, k_i, code) = (m as i32, n as i32, k as i32, out.gemv_code());
        self.launch_fwd(
            f,
            (n.div_ceil(BATCH_GEMV_ROWS_PER_CTA) as u32, 1, 1),
            (BATCH_GEMV_THREADS, 1, 1),
            0,
            kargs![w, x, y, m_i, n_i, k_i, code],
        )
    }

    /// gate_up with SiLU-mul fused through the multi-row GEMV: `act[rows, inter] =
    /// silu(x · gate^T) * (x · up^T)` with `w` = [gate; up] of `2 inter` rows
    /// (`batch_gemv_fits(rows, k)` and `inter` a multiple of 8; the caller checks). One CTA per 8
    /// outputs of a row.
    pub(crate) fn launch_batch_gemv_silu(
        &self,
        x: u64,
        w: u64,
        act: u64,
        rows: usize,
        inter: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        let f = self.kernels.gemv_batch_silu[Self::batch_gemv_entry(rows)];
        let (m_i, inter_i, k_i) = (rows as i32, inter as i32, k as i32);
        self.launch_fwd(
            f,
            ((inter / 8) as u32, 1, 1),
            (BATCH_GEMV_THREADS, 1, 1),
            0,
            kargs![w, x, act, m_i, inter_i, k_i],
        )
    }

    /// Index of the multi-row GEMV entry point for `m` x rows (ceil(m / 8) tiles).
    fn batch_gemv_entry(m: usize) -> usize {
        (m.div_ceil(BATCH_GEMV_TILE_ROWS).clamp(1, BATCH_GEMV_TILES)) - 1
    }

    /// `gemm` through `cublasGemmEx` (cuBLAS's own algorithm choice).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_ex(
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

    /// The own warp-specialised wgmma GEMM (`gemm_ws`, sm_90a) on a persistent grid: `silu`
    /// false: out[m, n] = A B^T with B of n rows; true: out[m, inter] = silu(A Bg^T) * (A Bu^T)
    /// with B = [gate; up] of 2 `n` rows (`n` a multiple of 128), written through `o_map` (the
    /// activation buffer's map; `out` is unused). A is [m, k] through `a_map`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_own_gemm(
        &self,
        silu: bool,
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
        let tiles = m.div_ceil(OWN_GEMM_TILE_M) * tiles_n;
        let f = if silu {
            self.kernels.gemm_ws_silu
        } else {
            self.kernels.gemm_ws
        };
        let grid = tiles.min(self.device.num_sms).max(1) as u32;
        let (m_i, n_i, k_i) = (m as i32, n as i32, k as i32);
        self.launch_fwd(
            f,
            (grid, 1, 1),
            (384, 1, 1),
            OWN_GEMM_SMEM_BYTES as u32,
            kargs![a_map, b_map, o_map, out, m_i, n_i, k_i],
        )
    }

    /// `silu_mul` over `rows` rows of buf_a's gate_up output into buf_b.
    pub(crate) fn launch_silu_mul(&self, rows: usize) -> Result<(), CudaError> {
        let inter = self.config.intermediate_size;
        let total = (rows * inter) as u64;
        let inter_i = inter as i32;
        let grid = ((rows * inter).div_ceil(256)).min(self.device.num_sms * 16) as u32;
        self.launch_fwd(
            self.kernels.silu_mul,
            (grid, 1, 1),
            (256, 1, 1),
            0,
            kargs![self.buf.buf_a.ptr(), self.buf.buf_b.ptr(), inter_i, total],
        )
    }

    /// o_proj, the post-attention RMSNorm and the MLP of one layer on `tail.rows` rows (the
    /// attention output in buf_b), adding into the residual rows at `tail.resid`.
    pub(super) fn enqueue_layer_tail(
        &self,
        layer: usize,
        lw: &LayerOffsets,
        tail: &LayerTail,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (rows, path) = (tail.rows, tail.path);
        let (h_i, eps, null) = (h as i32, c.rms_norm_eps as f32, 0u64);
        self.gemm(
            self.buf.buf_b.ptr(),
            self.wptr(lw.o),
            tail.resid,
            rows,
            h,
            c.num_attention_heads * hd,
            tail.out_kind,
            path,
        )?;
        self.mark("gemm_o")?;
        self.launch_fwd(
            tail.norm_kernel,
            (rows as u32, 1, 1),
            (tail.norm_threads, 1, 1),
            0,
            kargs![
                tail.resid,
                null,
                self.wptr(lw.post_norm),
                self.buf.normed.ptr(),
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
                kargs![w, self.buf.normed.ptr(), self.buf.buf_b.ptr(), inter_i, k_i],
            )?;
            self.mark("gemv_gate_up_silu")?;
        } else if path == GemmPath::BatchGemv && batch_gemv_fits(rows, h) {
            let (normed, act) = (self.buf.normed.ptr(), self.buf.buf_b.ptr());
            self.launch_batch_gemv_silu(normed, self.wptr(lw.gate_up), act, rows, inter, h)?;
            self.mark("gemv_gate_up_silu")?;
        } else if let Some(maps) = self
            .own_gate_up
            .as_ref()
            .filter(|_| rows >= self.own_gate_up_min_tokens)
        {
            // gate_up with SiLU-mul in the epilogue: the activation goes straight to buf_b.
            self.launch_own_gemm(
                true,
                maps.normed,
                maps.gate_up[layer],
                maps.act,
                self.buf.buf_b.ptr(),
                rows,
                inter,
                h,
            )?;
            self.mark("gemm_gate_up_silu")?;
        } else {
            self.gemm(
                self.buf.normed.ptr(),
                self.wptr(lw.gate_up),
                self.buf.buf_a.ptr(),
                rows,
                2 * inter,
                h,
                GemmOut::Half,
                path,
            )?;
            self.mark("gemm_gate_up")?;
            self.launch_silu_mul(rows)?;
            self.mark("silu_mul")?;
        }
        self.gemm(
            self.buf.buf_b.ptr(),
            self.wptr(lw.down),
            tail.resid,
            rows,
            h,
            inter,
            tail.out_kind,
            path,
        )?;
        self.mark("gemm_down")?;
        Ok(())
    }
}
