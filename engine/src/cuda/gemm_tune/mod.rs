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
//!
//! Searched configurations: `djinn engine gemm-search` (engine/src/probe/forward/gemm_search.rs,
//! lt_search.rs)
//! enumerates cuBLASLt configurations beyond the heuristic's candidates and times the best few hot
//! (the card at its power cap, as inside back-to-back prefills). Its winners go into a small table
//! (GPU name, cuBLASLt version, shape -> configuration), `engine/data/gemm_configs.tsv`, compiled
//! in and read at start-up with `--gemm-tuning table` (or `--gemm-table PATH`); an entry is used
//! only if it passes `AlgoCheck` on this machine, otherwise the shape falls back to the timed
//! heuristic choice with a printed line why. The table is not the default: it measured no faster
//! end to end than the timed heuristic choice (docs/engine-cuda.md).
//!
//! Files: this one holds the run-time choice (`TunedGemm::run`: table, else timing); `lt.rs` the
//! cuBLASLt calls (descriptors, algorithm configurations, `AlgoCheck`, the heuristic); `table.rs`
//! the configuration table's format.

mod lt;
mod table;

use std::cell::RefCell;
use std::collections::BTreeMap;

use cudarc::cublaslt::sys as lsys;
use cudarc::driver::{result as dr, sys as dsys};

use super::CudaError;
pub(crate) use lt::lt;
pub(crate) use lt::{
    AlgoConfig, Plan, CFG_CLUSTER, CFG_CUSTOM, CFG_SPLITK, CFG_STAGES, CFG_SWIZZLE, CFG_TILE,
};
pub use table::TABLE_HEADER;
pub(crate) use table::{TableChoice, TableEntry};

/// Algorithms asked from the heuristic per shape.
pub(crate) const CANDIDATES: usize = 12;
/// Timed calls per candidate (after one untimed call).
const TIMED_REPS: usize = 3;
/// Row counts tuned together (m rounded up to a multiple of this).
pub(crate) const ROW_BUCKET: usize = 512;

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
    /// How a report line names what the GEMM writes (nothing for a plain output).
    pub(crate) fn label(self) -> &'static str {
        match self {
            GemmOut::AddF32 => " (+= f32)",
            GemmOut::AddHalf => " (+= half)",
            _ => "",
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
    /// Searched configurations for this GPU and cuBLASLt version (empty unless a table was asked
    /// for).
    table: Vec<TableEntry>,
    /// The device's name (table key).
    gpu: String,
    /// `cublasLtGetVersion()` (table key).
    lt_version: usize,
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
    /// `None` where libcublasLt is missing (the caller keeps `cublasGemmEx`). `gpu` is the device
    /// name the configuration table is keyed by. `table`: `None` for the timed heuristic choice
    /// alone; `Some(None)` for the built-in searched table, `Some(Some(path))` for a table file
    /// (one that cannot be read or parsed is an error).
    pub(crate) fn new(
        gpu: &str,
        table: Option<Option<&std::path::Path>>,
    ) -> Result<Option<TunedGemm>, CudaError> {
        // SAFETY: only tries to load the library.
        if !unsafe { lsys::is_culib_present() } {
            return Ok(None);
        }
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a handle.
        lt("creating the cuBLASLt handle", unsafe {
            lsys::cublasLtCreate(&mut handle)
        })?;
        // SAFETY: plain query.
        let lt_version = unsafe { lsys::cublasLtGetVersion() };
        let mut tuned = TunedGemm {
            handle,
            plans: RefCell::new(BTreeMap::new()),
            choices: RefCell::new(BTreeMap::new()),
            report: RefCell::new(Vec::new()),
            table: Vec::new(),
            gpu: gpu.to_string(),
            lt_version,
        };
        if let Some(path) = table {
            let (usable, line) = table::load(path, gpu, lt_version)?;
            eprintln!("{line}");
            tuned.report.borrow_mut().push(line);
            tuned.table = usable;
        }
        Ok(Some(tuned))
    }

    /// Mean ms per call of `run` over `TIMED_REPS` calls after one warm-up (synchronises).
    pub(crate) fn time(
        stream: dsys::CUstream,
        run: impl FnMut() -> Result<(), CudaError>,
    ) -> Result<f64, CudaError> {
        Self::time_reps(stream, TIMED_REPS, run)
    }

    /// Mean ms per call of `run` over `reps` calls after one warm-up (synchronises).
    pub(crate) fn time_reps(
        stream: dsys::CUstream,
        reps: usize,
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
            for _ in 0..reps {
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
            Ok(ms as f64 / reps as f64)
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
                    let plan = match self.table_plan(a)? {
                        Some(plan) => plan,
                        None => self.tune(a, gemm_ex)?,
                    };
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

    /// The plan the configuration table prescribes for `a`, or `None` (with a printed line why)
    /// where the table has no usable entry (the caller then tunes by timing).
    fn table_plan(&self, a: &GemmArgs) -> Result<Option<Plan>, CudaError> {
        if self.table.is_empty() {
            return Ok(None);
        }
        let mut plan = self.make_plan(a)?;
        let what = format!("GEMM m={} n={} k={}{}", a.m, a.n, a.k, a.out.label());
        match self.table_choice(a, &plan) {
            Ok(algo) => {
                plan.algo = algo;
                self.report.borrow_mut().push(format!(
                    "{what}: searched table -> {}",
                    match algo {
                        Some(algo) => format!("cuBLASLt ({})", Self::read_config(&algo)),
                        None => "cublasGemmEx".to_string(),
                    }
                ));
                Ok(Some(plan))
            }
            Err(why) => {
                let line = format!("{what}: {why}; falling back to the timed heuristic choice");
                eprintln!("{line}");
                self.report.borrow_mut().push(line);
                Self::destroy_plan(&plan);
                Ok(None)
            }
        }
    }

    fn tune(
        &self,
        a: &GemmArgs,
        gemm_ex: &dyn Fn() -> Result<(), CudaError>,
    ) -> Result<Plan, CudaError> {
        let plan = self.make_plan(a)?;
        let (results, count) = self.heuristic(&plan, a, CANDIDATES)?;
        self.tune_with(a, gemm_ex, plan, results, count)
    }

    fn tune_with(
        &self,
        a: &GemmArgs,
        gemm_ex: &dyn Fn() -> Result<(), CudaError>,
        mut plan: Plan,
        results: Vec<lsys::cublasLtMatmulHeuristicResult_t>,
        count: i32,
    ) -> Result<Plan, CudaError> {
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
            a.out.label(),
            timed.join(", "),
            flops / best_ms / 1e9
        ));
        Ok(plan)
    }

    /// Times `cublasGemmEx` and every usable heuristic candidate: (baseline ms, best candidate
    /// (ms, index), the candidates' times as text).
    #[allow(clippy::type_complexity)]
    pub(crate) fn time_candidates(
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

    /// The cuBLASLt version this handle runs (table key).
    pub(crate) fn lt_version(&self) -> usize {
        self.lt_version
    }

    /// The device name this handle's table is keyed by.
    pub(crate) fn gpu(&self) -> &str {
        &self.gpu
    }

    /// The cuBLASLt handle (for the configuration search's own queries).
    pub(crate) fn handle(&self) -> lsys::cublasLtHandle_t {
        self.handle
    }

    /// Makes `plan` (with its algorithm) the choice of `a`'s row bucket and shape from now on,
    /// freeing the plan it replaces.
    pub(crate) fn set_bucket_plan(&self, a: &GemmArgs, plan: Plan) {
        let bucket = (a.m.div_ceil(ROW_BUCKET) * ROW_BUCKET, a.n, a.k, a.out);
        self.choices.borrow_mut().insert(bucket, plan.algo);
        if let Some(old) = self.plans.borrow_mut().insert((a.m, a.n, a.k, a.out), plan) {
            Self::destroy_plan(&old);
        }
    }
}

impl Drop for TunedGemm {
    fn drop(&mut self) {
        for plan in self.plans.borrow().values() {
            Self::destroy_plan(plan);
        }
        // SAFETY: the handle was created by this struct and is freed once.
        unsafe {
            lsys::cublasLtDestroy(self.handle);
        }
    }
}
