//! Prefill GEMMs through cuBLASLt with the algorithm chosen by timing.
//!
//! `cublasGemmEx` takes cuBLAS's first heuristic choice. For the large prefill shapes (thousands of
//! rows) the first choice is not always the fastest: on the first GEMM of each shape this asks
//! cuBLASLt for up to `CANDIDATES` algorithms, times each on the real operands (and
//! `cublasGemmEx` itself), and keeps the fastest for every later call of that shape. The choice is
//! shared by every row count in the same `ROW_BUCKET` (n and k fixed), so a server that sees many
//! prompt lengths tunes once per bucket, not once per length. Only eager (never graph-captured)
//! prefill GEMMs come here; decode GEMMs stay on `cublasGemmEx`.
//!
//! A GEMM that adds into its output (`GemmOut::AddF32` / `GemmOut::AddHalf`: o_proj and
//! down_proj adding into the f32 or fp16/bf16 residual stream, beta = 1) is timed on the real
//! operands too, so the output is saved to a scratch buffer first and restored after the timing
//! runs.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::c_void;

use cudarc::cublaslt::sys as lsys;
use cudarc::driver::{result as dr, sys as dsys};

use super::CudaError;

/// Algorithms asked from the heuristic per shape.
const CANDIDATES: usize = 12;
/// Timed calls per candidate (after one untimed call).
const TIMED_REPS: usize = 3;
/// Row counts tuned together (m rounded up to a multiple of this).
const ROW_BUCKET: usize = 512;

fn lt(context: &str, status: lsys::cublasStatus_t) -> Result<(), CudaError> {
    if status == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Cublas {
            context: context.to_string(),
            message: format!("{status:?}"),
        })
    }
}

/// One GEMM shape: descriptors and the chosen algorithm (`None`: `cublasGemmEx` was fastest).
struct Plan {
    desc: lsys::cublasLtMatmulDesc_t,
    layouts: [lsys::cublasLtMatrixLayout_t; 3],
    algo: Option<lsys::cublasLtMatmulAlgo_t>,
}

/// What a GEMM writes: `y` in the weights' type, `y` in f32, `y += x · w^T` in f32 (beta = 1), or
/// `y += x · w^T` in the weights' type (beta = 1; the sum is formed in f32 and rounded once).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum GemmOut {
    Half,
    F32,
    AddF32,
    AddHalf,
}

impl GemmOut {
    pub(crate) fn is_f32(self) -> bool {
        matches!(self, GemmOut::F32 | GemmOut::AddF32)
    }
    /// Whether the GEMM adds into its output (beta = 1).
    pub(crate) fn accumulates(self) -> bool {
        matches!(self, GemmOut::AddF32 | GemmOut::AddHalf)
    }
    pub(crate) fn beta(self) -> f32 {
        if self.accumulates() {
            1.0
        } else {
            0.0
        }
    }
    /// Bytes of one output element (fp16 and bf16 are both 2 bytes).
    pub(crate) fn elem_bytes(self) -> usize {
        if self.is_f32() {
            4
        } else {
            2
        }
    }
    /// The `out_f32` argument of the GEMV kernels.
    pub(crate) fn gemv_code(self) -> i32 {
        match self {
            GemmOut::Half => 0,
            GemmOut::F32 => 1,
            GemmOut::AddF32 => 2,
            GemmOut::AddHalf => 3,
        }
    }
}

/// Shape key: (m, n, k, output kind).
type Shape = (usize, usize, usize, GemmOut);

pub(crate) struct TunedGemm {
    handle: lsys::cublasLtHandle_t,
    plans: RefCell<BTreeMap<Shape, Plan>>,
    /// The tuned choice per (row bucket, n, k, fp32 output).
    choices: RefCell<BTreeMap<Shape, Option<lsys::cublasLtMatmulAlgo_t>>>,
    /// One line per tuned shape: what was timed and what won.
    pub(crate) report: RefCell<Vec<String>>,
}

/// Operands of one row-major `y[m, n] = x[m, k] · w[n, k]^T`.
pub(crate) struct GemmArgs {
    pub x: u64,
    pub w: u64,
    pub y: u64,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub out: GemmOut,
    /// For an accumulating `out`: a device buffer of at least m * n * `out.elem_bytes()` bytes
    /// that is free during this GEMM (the output is saved there while candidates are timed); 0:
    /// such GEMMs are not tuned.
    pub scratch: u64,
    pub bf16: bool,
    pub workspace: u64,
    pub workspace_bytes: usize,
    pub stream: dsys::CUstream,
}

impl TunedGemm {
    /// `None` where libcublasLt is missing (the caller keeps `cublasGemmEx`).
    pub(crate) fn new() -> Result<Option<TunedGemm>, CudaError> {
        // SAFETY: only tries to load the library.
        if !unsafe { lsys::is_culib_present() } {
            return Ok(None);
        }
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a handle.
        lt("creating the cuBLASLt handle", unsafe {
            lsys::cublasLtCreate(&mut handle)
        })?;
        Ok(Some(TunedGemm {
            handle,
            plans: RefCell::new(BTreeMap::new()),
            choices: RefCell::new(BTreeMap::new()),
            report: RefCell::new(Vec::new()),
        }))
    }

    fn make_plan(&self, a: &GemmArgs) -> Result<Plan, CudaError> {
        use lsys::cudaDataType_t as D;
        let dt = if a.bf16 {
            D::CUDA_R_16BF
        } else {
            D::CUDA_R_16F
        };
        let out_dt = if a.out.is_f32() { D::CUDA_R_32F } else { dt };
        let mut desc = std::ptr::null_mut();
        // SAFETY: descriptor creation and attribute setting on plain values.
        unsafe {
            lt(
                "creating a cuBLASLt matmul descriptor",
                lsys::cublasLtMatmulDescCreate(
                    &mut desc,
                    lsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    D::CUDA_R_32F,
                ),
            )?;
            let trans_t: i32 = 1; // CUBLAS_OP_T
            lt(
                "setting TRANSA",
                lsys::cublasLtMatmulDescSetAttribute(
                    desc,
                    lsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &trans_t as *const i32 as *const c_void,
                    4,
                ),
            )?;
        }
        // Column-major view of the row-major Linear: A = w (k x n, ld k, transposed), B = x (k x m,
        // ld k), C = D = y (n x m, ld n).
        let mut layouts = [std::ptr::null_mut(); 3];
        for (i, (t, rows, cols, ld)) in [
            (dt, a.k, a.n, a.k),
            (dt, a.k, a.m, a.k),
            (out_dt, a.n, a.m, a.n),
        ]
        .into_iter()
        .enumerate()
        {
            // SAFETY: out-pointer to a layout.
            lt("creating a cuBLASLt matrix layout", unsafe {
                lsys::cublasLtMatrixLayoutCreate(
                    &mut layouts[i],
                    t,
                    rows as u64,
                    cols as u64,
                    ld as i64,
                )
            })?;
        }
        Ok(Plan {
            desc,
            layouts,
            algo: None,
        })
    }

    fn launch(
        &self,
        plan: &Plan,
        algo: &lsys::cublasLtMatmulAlgo_t,
        a: &GemmArgs,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, a.out.beta());
        // SAFETY: all pointers are device buffers sized for this shape by the model; descriptors
        // are live; the workspace is the model's fixed cuBLAS workspace (stream-ordered use).
        lt("cublasLtMatmul", unsafe {
            lsys::cublasLtMatmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                a.w as *const c_void,
                plan.layouts[0],
                a.x as *const c_void,
                plan.layouts[1],
                &beta as *const f32 as *const c_void,
                a.y as *const c_void,
                plan.layouts[2],
                a.y as *mut c_void,
                plan.layouts[2],
                algo,
                a.workspace as *mut c_void,
                a.workspace_bytes,
                a.stream as lsys::cudaStream_t,
            )
        })
    }

    /// Mean ms per call of `run` over `TIMED_REPS` calls after one warm-up (synchronises).
    fn time(
        stream: dsys::CUstream,
        mut run: impl FnMut() -> Result<(), CudaError>,
    ) -> Result<f64, CudaError> {
        let ev = |what| {
            super::drv(
                what,
                dr::event::create(dsys::CUevent_flags::CU_EVENT_DEFAULT),
            )
        };
        let (start, end) = (
            ev("creating a timing event")?,
            ev("creating a timing event")?,
        );
        let result = (|| {
            run()?;
            super::drv("recording an event", unsafe {
                dr::event::record(start, stream)
            })?;
            for _ in 0..TIMED_REPS {
                run()?;
            }
            super::drv("recording an event", unsafe {
                dr::event::record(end, stream)
            })?;
            super::drv("waiting for a timing event", unsafe {
                dr::event::synchronize(end)
            })?;
            let ms = super::drv("reading a timing event", unsafe {
                dr::event::elapsed(start, end)
            })?;
            Ok(ms as f64 / TIMED_REPS as f64)
        })();
        unsafe {
            let _ = dr::event::destroy(start);
            let _ = dr::event::destroy(end);
        }
        result
    }

    /// Runs the GEMM with the tuned choice for its shape, tuning first if the shape is new.
    /// `gemm_ex` enqueues the same GEMM through `cublasGemmEx` (the baseline and the fallback).
    pub(crate) fn run(
        &self,
        a: &GemmArgs,
        gemm_ex: &dyn Fn() -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let shape = (a.m, a.n, a.k, a.out);
        let bucket = (a.m.div_ceil(ROW_BUCKET) * ROW_BUCKET, a.n, a.k, a.out);
        if a.out.accumulates() && a.scratch == 0 {
            return gemm_ex();
        }
        if !self.plans.borrow().contains_key(&shape) {
            let known = self.choices.borrow().get(&bucket).copied();
            let plan = match known {
                Some(algo) => {
                    let mut plan = self.make_plan(a)?;
                    plan.algo = algo;
                    plan
                }
                None => {
                    let plan = self.tune(a, gemm_ex)?;
                    self.choices.borrow_mut().insert(bucket, plan.algo);
                    plan
                }
            };
            self.plans.borrow_mut().insert(shape, plan);
        }
        let mut plans = self.plans.borrow_mut();
        let plan = plans.get_mut(&shape).expect("inserted above");
        match plan.algo {
            Some(algo) => {
                if self.launch(plan, &algo, a).is_err() {
                    // The bucket's algorithm does not take this exact shape: cublasGemmEx from now on.
                    plan.algo = None;
                    return gemm_ex();
                }
                Ok(())
            }
            None => gemm_ex(),
        }
    }

    fn tune(
        &self,
        a: &GemmArgs,
        gemm_ex: &dyn Fn() -> Result<(), CudaError>,
    ) -> Result<Plan, CudaError> {
        let mut plan = self.make_plan(a)?;
        let mut pref = std::ptr::null_mut();
        let mut results: Vec<lsys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; CANDIDATES];
        let mut count = 0i32;
        // SAFETY: preference descriptor with the workspace cap; heuristic into a sized array.
        unsafe {
            lt(
                "creating a cuBLASLt preference",
                lsys::cublasLtMatmulPreferenceCreate(&mut pref),
            )?;
            let ws = a.workspace_bytes as u64;
            let status = lsys::cublasLtMatmulPreferenceSetAttribute(
                pref,
                lsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            );
            let status = if status == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                lsys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                    CANDIDATES as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
            } else {
                status
            };
            lsys::cublasLtMatmulPreferenceDestroy(pref);
            lt("cuBLASLt heuristic", status)?;
        }
        // Timing runs add into y again and again: save it (restored below, whatever happens).
        let y_bytes = a.m * a.n * a.out.elem_bytes();
        let accumulating = a.out.accumulates();
        if accumulating {
            super::drv("saving a GEMM output before tuning", unsafe {
                dr::memcpy_dtod_async(a.scratch, a.y, y_bytes, a.stream)
            })?;
        }
        let timed_result = self.time_candidates(a, gemm_ex, &plan, &results, count);
        if accumulating {
            super::drv("restoring a GEMM output after tuning", unsafe {
                dr::memcpy_dtod_async(a.y, a.scratch, y_bytes, a.stream)
            })?;
        }
        let (baseline_ms, best, timed) = timed_result?;
        // Keep cublasGemmEx unless a candidate beats it by more than the timing noise (1%).
        let chosen = match best {
            Some((ms, i)) if ms < 0.99 * baseline_ms => {
                plan.algo = Some(results[i].algo);
                format!("cuBLASLt candidate {i} ({ms:.3} ms)")
            }
            _ => "cublasGemmEx".to_string(),
        };
        let flops = 2.0 * (a.m * a.n * a.k) as f64;
        let best_ms = best.map_or(baseline_ms, |(ms, _)| ms.min(baseline_ms));
        self.report.borrow_mut().push(format!(
            "GEMM m={} n={} k={}{}: cublasGemmEx {baseline_ms:.3} ms, cuBLASLt candidates [{}] ms -> {chosen} ({:.0} TFLOP/s)",
            a.m,
            a.n,
            a.k,
            match a.out {
                GemmOut::AddF32 => " (+= f32)",
                GemmOut::AddHalf => " (+= half)",
                _ => "",
            },
            timed.join(", "),
            flops / best_ms / 1e9
        ));
        Ok(plan)
    }
}

impl TunedGemm {
    /// Times `cublasGemmEx` and every usable heuristic candidate: (baseline ms, best candidate
    /// (ms, index), the candidates' times as text).
    #[allow(clippy::type_complexity)]
    fn time_candidates(
        &self,
        a: &GemmArgs,
        gemm_ex: &dyn Fn() -> Result<(), CudaError>,
        plan: &Plan,
        results: &[lsys::cublasLtMatmulHeuristicResult_t],
        count: i32,
    ) -> Result<(f64, Option<(f64, usize)>, Vec<String>), CudaError> {
        let baseline_ms = Self::time(a.stream, gemm_ex)?;
        let mut best: Option<(f64, usize)> = None;
        let mut timed = Vec::new();
        for (i, r) in results.iter().take(count.max(0) as usize).enumerate() {
            if r.state != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                || r.workspaceSize > a.workspace_bytes
            {
                continue;
            }
            // A candidate that fails to launch is skipped, not fatal.
            if let Ok(ms) = Self::time(a.stream, || self.launch(plan, &r.algo, a)) {
                timed.push(format!("{ms:.3}"));
                if best.is_none_or(|(b, _)| ms < b) {
                    best = Some((ms, i));
                }
            }
        }
        Ok((baseline_ms, best, timed))
    }
}

impl Drop for TunedGemm {
    fn drop(&mut self) {
        // SAFETY: descriptors and the handle were created by this struct and are freed once.
        unsafe {
            for plan in self.plans.borrow().values() {
                for l in plan.layouts {
                    lsys::cublasLtMatrixLayoutDestroy(l);
                }
                lsys::cublasLtMatmulDescDestroy(plan.desc);
            }
            lsys::cublasLtDestroy(self.handle);
        }
    }
}
