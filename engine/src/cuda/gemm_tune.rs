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
//! Searched configurations: `djinn engine gemm-search` (engine/src/probe/forward/gemm_search.rs)
//! enumerates cuBLASLt configurations beyond the heuristic's candidates and times the best few hot
//! (the card at its power cap, as inside back-to-back prefills). Its winners go into a small table
//! (GPU name, cuBLASLt version, shape -> configuration), `engine/data/gemm_configs.tsv`, compiled
//! in and read at start-up with `--gemm-tuning table` (or `--gemm-table PATH`); an entry is used
//! only if it passes `AlgoCheck` on this machine, otherwise the shape falls back to the timed
//! heuristic choice with a printed line why. The table is not the default: it measured no faster
//! end to end than the timed heuristic choice (docs/engine-cuda.md).

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
    /// Searched configurations for this GPU and cuBLASLt version (empty unless a table was asked
    /// for).
    table: Vec<TableEntry>,
    /// The device's name (table key).
    gpu: String,
    /// `cublasLtGetVersion()` (table key).
    lt_version: usize,
}

/// The configuration attributes that define one cuBLASLt algorithm, in `AlgoConfig` order.
const CONFIG_ATTRS: [(lsys::cublasLtMatmulAlgoConfigAttributes_t, &str); 9] = {
    use lsys::cublasLtMatmulAlgoConfigAttributes_t as C;
    [
        (C::CUBLASLT_ALGO_CONFIG_ID, "algo"),
        (C::CUBLASLT_ALGO_CONFIG_TILE_ID, "tile"),
        (C::CUBLASLT_ALGO_CONFIG_STAGES_ID, "stages"),
        (C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM, "splitk"),
        (C::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, "reduction"),
        (C::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, "swizzle"),
        (C::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, "custom"),
        (C::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, "inner"),
        (C::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, "cluster"),
    ]
};
const CFG_TILE: usize = 1;
const CFG_STAGES: usize = 2;
const CFG_SPLITK: usize = 3;
const CFG_SWIZZLE: usize = 5;
const CFG_CUSTOM: usize = 6;
const CFG_CLUSTER: usize = 8;

/// One cuBLASLt algorithm configuration: the values of `CONFIG_ATTRS` (all fit in u32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct AlgoConfig(pub [u32; 9]);

impl std::fmt::Display for AlgoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = CONFIG_ATTRS
            .iter()
            .zip(self.0)
            .map(|((_, name), v)| format!("{name} {v}"))
            .collect();
        write!(f, "{}", parts.join(" "))
    }
}

/// What one table line prescribes for a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TableChoice {
    /// `cublasGemmEx` (it won the hot timing).
    GemmEx,
    Lt(AlgoConfig),
}

/// One line of the GEMM configuration table.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TableEntry {
    pub gpu: String,
    pub lt_version: usize,
    pub bf16: bool,
    /// Row bucket (m rounded up to `ROW_BUCKET`).
    pub m_bucket: usize,
    pub n: usize,
    pub k: usize,
    pub out: GemmOut,
    pub choice: TableChoice,
    /// Hot ms per call measured by the search (documentation; not used for the choice).
    pub hot_ms: f64,
}

/// The table shipped in the repository (written by `djinn engine gemm-search`).
const SHIPPED_TABLE: &str = include_str!("../../data/gemm_configs.tsv");
/// Column names of the table, in order.
pub const TABLE_HEADER: &str =
    "gpu\tcublaslt\tdtype\tm_bucket\tn\tk\tout\tchoice\talgo\ttile\tstages\tsplitk\treduction\tswizzle\tcustom\tinner\tcluster\thot_ms";

impl GemmOut {
    fn table_name(self) -> &'static str {
        match self {
            GemmOut::Half => "half",
            GemmOut::F32 => "f32",
            GemmOut::AddF32 => "add_f32",
            GemmOut::AddHalf => "add_half",
        }
    }
    /// How a report line names what the GEMM writes (nothing for a plain output).
    fn label(self) -> &'static str {
        match self {
            GemmOut::AddF32 => " (+= f32)",
            GemmOut::AddHalf => " (+= half)",
            _ => "",
        }
    }
    fn from_table_name(s: &str) -> Option<GemmOut> {
        match s {
            "half" => Some(GemmOut::Half),
            "f32" => Some(GemmOut::F32),
            "add_f32" => Some(GemmOut::AddF32),
            "add_half" => Some(GemmOut::AddHalf),
            _ => None,
        }
    }
}

impl TableEntry {
    pub(crate) fn to_line(&self) -> String {
        let (choice, cfg) = match self.choice {
            TableChoice::GemmEx => ("gemm_ex", [0u32; 9]),
            TableChoice::Lt(c) => ("lt", c.0),
        };
        let cfg: Vec<String> = cfg.iter().map(|v| v.to_string()).collect();
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.4}",
            self.gpu,
            self.lt_version,
            if self.bf16 { "bf16" } else { "f16" },
            self.m_bucket,
            self.n,
            self.k,
            self.out.table_name(),
            choice,
            cfg.join("\t"),
            self.hot_ms
        )
    }

    fn parse_line(line: &str) -> Result<TableEntry, String> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 18 {
            return Err(format!("{} tab-separated fields, expected 18", f.len()));
        }
        let num = |i: usize| -> Result<usize, String> {
            f[i].trim()
                .parse::<usize>()
                .map_err(|_| format!("field {} `{}` is not a number", i + 1, f[i]))
        };
        let bf16 = match f[2] {
            "f16" => false,
            "bf16" => true,
            other => return Err(format!("dtype `{other}`: expected f16 or bf16")),
        };
        let out = GemmOut::from_table_name(f[6])
            .ok_or_else(|| format!("out `{}`: expected half, f32 or add_f32", f[6]))?;
        let mut cfg = [0u32; 9];
        for (j, c) in cfg.iter_mut().enumerate() {
            *c = u32::try_from(num(8 + j)?).map_err(|_| format!("field {} too large", 9 + j))?;
        }
        let choice = match f[7] {
            "gemm_ex" => TableChoice::GemmEx,
            "lt" => TableChoice::Lt(AlgoConfig(cfg)),
            other => return Err(format!("choice `{other}`: expected gemm_ex or lt")),
        };
        let hot_ms = f[17]
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("hot_ms `{}` is not a number", f[17]))?;
        Ok(TableEntry {
            gpu: f[0].to_string(),
            lt_version: num(1)?,
            bf16,
            m_bucket: num(3)?,
            n: num(4)?,
            k: num(5)?,
            out,
            choice,
            hot_ms,
        })
    }
}

/// Parses a table (`#` comment lines, a header line starting with `gpu`, one entry per line).
pub(crate) fn parse_table(text: &str) -> Result<Vec<TableEntry>, String> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') || line.starts_with("gpu\t") {
            continue;
        }
        entries.push(TableEntry::parse_line(line).map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    Ok(entries)
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
            let (source, text) = match path {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| CudaError::Io {
                        path: path.to_path_buf(),
                        message: format!("reading the GEMM configuration table: {e}"),
                    })?;
                    (path.display().to_string(), text)
                }
                None => (
                    "engine/data/gemm_configs.tsv (built in)".to_string(),
                    SHIPPED_TABLE.to_string(),
                ),
            };
            let all = parse_table(&text).map_err(|e| {
                CudaError::BadInput(format!("GEMM configuration table {source}: {e}"))
            })?;
            let for_gpu: Vec<TableEntry> = all.into_iter().filter(|e| e.gpu == gpu).collect();
            let (usable, other_version): (Vec<TableEntry>, Vec<TableEntry>) = for_gpu
                .into_iter()
                .partition(|e| e.lt_version == lt_version);
            let line = if !usable.is_empty() {
                format!(
                    "GEMM table {source}: {} searched configurations for {gpu}, cuBLASLt {lt_version}",
                    usable.len()
                )
            } else if !other_version.is_empty() {
                format!(
                    "GEMM table {source}: its {} entries for {gpu} were searched with cuBLASLt {} but this is {lt_version}: every prefill GEMM shape falls back to the timed heuristic choice",
                    other_version.len(),
                    other_version[0].lt_version
                )
            } else {
                format!(
                    "GEMM table {source}: no entries for {gpu}: every prefill GEMM shape falls back to the timed heuristic choice"
                )
            };
            eprintln!("{line}");
            tuned.report.borrow_mut().push(line);
            tuned.table = usable;
        }
        Ok(Some(tuned))
    }

    /// The (compute, scale, A/B, C/D) types of a GEMM.
    fn types(a: &GemmArgs) -> (lsys::cudaDataType_t, lsys::cudaDataType_t) {
        use lsys::cudaDataType_t as D;
        let dt = if a.bf16 {
            D::CUDA_R_16BF
        } else {
            D::CUDA_R_16F
        };
        (dt, if a.out.is_f32() { D::CUDA_R_32F } else { dt })
    }

    /// Reads an algorithm's configuration.
    fn read_config(algo: &lsys::cublasLtMatmulAlgo_t) -> AlgoConfig {
        let mut cfg = [0u32; 9];
        for (j, (attr, _)) in CONFIG_ATTRS.iter().enumerate() {
            let mut buf = [0u8; 8];
            let mut written = 0usize;
            // SAFETY: reads at most 8 bytes into `buf`; an attribute this library lacks stays 0.
            let status = unsafe {
                lsys::cublasLtMatmulAlgoConfigGetAttribute(
                    algo,
                    *attr,
                    buf.as_mut_ptr() as *mut c_void,
                    Self::config_attr_size(*attr),
                    &mut written,
                )
            };
            if status == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                cfg[j] = u64::from_le_bytes(buf) as u32;
            }
        }
        AlgoConfig(cfg)
    }

    /// Byte size of a configuration attribute (cublasLt.h: inner and cluster shapes are uint16_t,
    /// the others 32-bit).
    fn config_attr_size(attr: lsys::cublasLtMatmulAlgoConfigAttributes_t) -> usize {
        use lsys::cublasLtMatmulAlgoConfigAttributes_t as C;
        match attr {
            C::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID | C::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID => 2,
            _ => 4,
        }
    }

    /// Builds the algorithm of `cfg` for `a`'s types (AlgoInit + every attribute); `None` if the
    /// library rejects the id or an attribute value.
    fn build_algo(&self, a: &GemmArgs, cfg: &AlgoConfig) -> Option<lsys::cublasLtMatmulAlgo_t> {
        let (dt, out_dt) = Self::types(a);
        // SAFETY: `algo` is an out-value; attribute buffers are plain integers of the right size.
        unsafe {
            let mut algo: lsys::cublasLtMatmulAlgo_t = std::mem::zeroed();
            let status = lsys::cublasLtMatmulAlgoInit(
                self.handle,
                lsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lsys::cudaDataType_t::CUDA_R_32F,
                dt,
                dt,
                out_dt,
                out_dt,
                cfg.0[0] as i32,
                &mut algo,
            );
            if status != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return None;
            }
            for (j, (attr, _)) in CONFIG_ATTRS.iter().enumerate().skip(1) {
                let size = Self::config_attr_size(*attr);
                let bytes = (cfg.0[j] as u64).to_le_bytes();
                let status = lsys::cublasLtMatmulAlgoConfigSetAttribute(
                    &mut algo,
                    *attr,
                    bytes.as_ptr() as *const c_void,
                    size,
                );
                // An attribute left at its default (0) may be unknown to this library.
                if status != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && cfg.0[j] != 0 {
                    return None;
                }
            }
            Some(algo)
        }
    }

    /// `cublasLtMatmulAlgoCheck` of `algo` on `plan`: the workspace it needs, or `None` if it does
    /// not run this shape (or needs more workspace than there is).
    fn check(&self, plan: &Plan, algo: &lsys::cublasLtMatmulAlgo_t, a: &GemmArgs) -> Option<usize> {
        // SAFETY: live descriptors; `result` is an out-value.
        unsafe {
            let mut result: lsys::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
            let status = lsys::cublasLtMatmulAlgoCheck(
                self.handle,
                plan.desc,
                plan.layouts[0],
                plan.layouts[1],
                plan.layouts[2],
                plan.layouts[2],
                algo,
                &mut result,
            );
            (status == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && result.state == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && result.workspaceSize <= a.workspace_bytes)
                .then_some(result.workspaceSize)
        }
    }

    /// The table's choice for `a`'s row bucket, verified on this machine: `Ok(Some(algo))` for a
    /// cuBLASLt configuration that passes `AlgoCheck`, `Ok(None)` for `cublasGemmEx`, `Err(why)`
    /// when there is no usable entry.
    fn table_choice(
        &self,
        a: &GemmArgs,
        plan: &Plan,
    ) -> Result<Option<lsys::cublasLtMatmulAlgo_t>, String> {
        let bucket = a.m.div_ceil(ROW_BUCKET) * ROW_BUCKET;
        let entry = self
            .table
            .iter()
            .find(|e| {
                e.bf16 == a.bf16
                    && e.m_bucket == bucket
                    && e.n == a.n
                    && e.k == a.k
                    && e.out == a.out
            })
            .ok_or_else(|| format!("no table entry for {} rows (bucket {bucket})", a.m))?;
        match entry.choice {
            TableChoice::GemmEx => Ok(None),
            TableChoice::Lt(cfg) => {
                let algo = self.build_algo(a, &cfg).ok_or_else(|| {
                    format!("this cuBLASLt rejects the table's configuration ({cfg})")
                })?;
                self.check(plan, &algo, a).ok_or_else(|| {
                    format!("the table's configuration ({cfg}) fails cublasLtMatmulAlgoCheck here")
                })?;
                Ok(Some(algo))
            }
        }
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
                // SAFETY: descriptors created by make_plan above and not used elsewhere.
                unsafe {
                    for l in plan.layouts {
                        lsys::cublasLtMatrixLayoutDestroy(l);
                    }
                    lsys::cublasLtMatmulDescDestroy(plan.desc);
                }
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

    /// Up to `wanted` heuristic candidates for `plan` (within the workspace cap), and their count.
    fn heuristic(
        &self,
        plan: &Plan,
        a: &GemmArgs,
        wanted: usize,
    ) -> Result<(Vec<lsys::cublasLtMatmulHeuristicResult_t>, i32), CudaError> {
        let mut pref = std::ptr::null_mut();
        let mut results: Vec<lsys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; wanted];
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
                    wanted as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
            } else {
                status
            };
            lsys::cublasLtMatmulPreferenceDestroy(pref);
            lt("cuBLASLt heuristic", status)?;
        }
        Ok((results, count))
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

/// Knobs of the configuration search (`djinn engine gemm-search`).
#[derive(Clone, Copy, Debug)]
pub struct GemmSearchOptions {
    /// Most `cublasLtMatmulAlgoCheck` calls per shape (the enumeration stops there).
    pub max_checks: usize,
    /// Most configurations screened (timed on a cool card, 1 + 3 calls) per shape.
    pub max_screened: usize,
    /// Screened configurations whose swizzle / cluster shape / custom option are varied next.
    pub expand_top: usize,
    /// Configurations timed hot per shape, besides `cublasGemmEx` and the heuristic timing's choice.
    pub hot_finalists: usize,
    /// Heat-soak before the hot timing: ms of back-to-back GEMMs.
    pub heat_ms: f64,
    /// At least this many ms of repeated calls per arm and round.
    pub arm_ms: f64,
    /// Rounds of the hot timing (all arms each round, the order rotated every round).
    pub rounds: usize,
    /// The fastest hot arms (plus cublasGemmEx) then timed inside real prefills, per shape; 0: the
    /// hot loop's winner is taken as is.
    pub in_forward_arms: usize,
    /// Rounds and timed prefills per arm and round of the in-forward comparison.
    pub in_forward_rounds: usize,
    pub in_forward_reps: usize,
}

impl Default for GemmSearchOptions {
    fn default() -> Self {
        GemmSearchOptions {
            max_checks: 60_000,
            max_screened: 400,
            expand_top: 6,
            hot_finalists: 8,
            heat_ms: 1500.0,
            arm_ms: 25.0,
            rounds: 5,
            in_forward_arms: 0,
            in_forward_rounds: 3,
            in_forward_reps: 9,
        }
    }
}

/// Cluster shapes tried (cublasLtClusterShape_t): auto, 1x1, 2x1, 1x2, 2x2, 4x1, 1x4.
const SEARCH_CLUSTERS: [u32; 7] = [0, 2, 3, 5, 6, 4, 8];
/// Custom options tried per configuration (0..=min(cap, this)).
const SEARCH_MAX_CUSTOM: u32 = 7;

/// One configuration that passed `AlgoCheck`, with its cool (screening) time.
struct Candidate {
    cfg: AlgoConfig,
    algo: lsys::cublasLtMatmulAlgo_t,
    cool_ms: f64,
}

/// One arm of the hot timing.
struct Arm {
    label: String,
    choice: TableChoice,
    algo: Option<lsys::cublasLtMatmulAlgo_t>,
    cool_ms: f64,
    hot_ms: Vec<f64>,
}

/// A search's result for one shape: the table entry and what was measured, as lines.
pub(crate) struct SearchOutcome {
    pub entry: TableEntry,
    pub lines: Vec<String>,
    /// Every hot arm: (choice, hot median ms per call), fastest first.
    pub arms: Vec<(TableChoice, f64)>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

impl TunedGemm {
    /// The cuBLASLt version this handle runs (table key).
    pub(crate) fn lt_version(&self) -> usize {
        self.lt_version
    }

    /// Makes `choice` the algorithm of `a`'s row bucket from now on (the in-forward comparison of
    /// the search's finalists). Errors if the configuration does not pass `AlgoCheck`.
    pub(crate) fn force_choice(&self, a: &GemmArgs, choice: TableChoice) -> Result<(), CudaError> {
        let mut plan = self.make_plan(a)?;
        if let TableChoice::Lt(cfg) = choice {
            let algo = self
                .build_algo(a, &cfg)
                .filter(|algo| self.check(&plan, algo, a).is_some());
            match algo {
                Some(algo) => plan.algo = Some(algo),
                None => {
                    Self::destroy_plan(&plan);
                    return Err(CudaError::Cublas {
                        context: format!(
                            "forcing a GEMM configuration for m={} n={} k={}",
                            a.m, a.n, a.k
                        ),
                        message: format!("({cfg}) does not pass cublasLtMatmulAlgoCheck"),
                    });
                }
            }
        }
        let bucket = (a.m.div_ceil(ROW_BUCKET) * ROW_BUCKET, a.n, a.k, a.out);
        self.choices.borrow_mut().insert(bucket, plan.algo);
        if let Some(old) = self.plans.borrow_mut().insert((a.m, a.n, a.k, a.out), plan) {
            Self::destroy_plan(&old);
        }
        Ok(())
    }

    fn destroy_plan(plan: &Plan) {
        // SAFETY: descriptors created by make_plan and used by nothing else.
        unsafe {
            for l in plan.layouts {
                lsys::cublasLtMatrixLayoutDestroy(l);
            }
            lsys::cublasLtMatmulDescDestroy(plan.desc);
        }
    }

    /// A u32 array capability of an algorithm (tile ids, stage ids); empty if not reported.
    fn cap_u32s(
        algo: &lsys::cublasLtMatmulAlgo_t,
        attr: lsys::cublasLtMatmulAlgoCapAttributes_t,
    ) -> Vec<u32> {
        let mut needed = 0usize;
        // SAFETY: a size query (no buffer), then a read into a buffer of that size.
        unsafe {
            if lsys::cublasLtMatmulAlgoCapGetAttribute(
                algo,
                attr,
                std::ptr::null_mut(),
                0,
                &mut needed,
            ) != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                || needed == 0
            {
                return Vec::new();
            }
            let mut v = vec![0u32; needed.div_ceil(4)];
            let mut written = 0usize;
            if lsys::cublasLtMatmulAlgoCapGetAttribute(
                algo,
                attr,
                v.as_mut_ptr() as *mut c_void,
                v.len() * 4,
                &mut written,
            ) != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            {
                return Vec::new();
            }
            v.truncate(written / 4);
            v
        }
    }

    /// A scalar (<= 8 bytes) capability; 0 if not reported.
    fn cap_scalar(
        algo: &lsys::cublasLtMatmulAlgo_t,
        attr: lsys::cublasLtMatmulAlgoCapAttributes_t,
    ) -> u64 {
        let mut needed = 0usize;
        let mut buf = [0u8; 8];
        // SAFETY: as in cap_u32s, with an 8-byte buffer.
        unsafe {
            if lsys::cublasLtMatmulAlgoCapGetAttribute(
                algo,
                attr,
                std::ptr::null_mut(),
                0,
                &mut needed,
            ) != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                || needed == 0
                || needed > 8
            {
                return 0;
            }
            let mut written = 0usize;
            if lsys::cublasLtMatmulAlgoCapGetAttribute(
                algo,
                attr,
                buf.as_mut_ptr() as *mut c_void,
                needed,
                &mut written,
            ) != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            {
                return 0;
            }
        }
        u64::from_le_bytes(buf)
    }

    /// Every algorithm id the library has for `a`'s types.
    fn algo_ids(&self, a: &GemmArgs) -> Result<Vec<i32>, CudaError> {
        let (dt, out_dt) = Self::types(a);
        let mut ids = vec![0i32; 512];
        let mut count = 0i32;
        // SAFETY: sized output array.
        lt("cublasLtMatmulAlgoGetIds", unsafe {
            lsys::cublasLtMatmulAlgoGetIds(
                self.handle,
                lsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lsys::cudaDataType_t::CUDA_R_32F,
                dt,
                dt,
                out_dt,
                out_dt,
                ids.len() as i32,
                ids.as_mut_ptr(),
                &mut count,
            )
        })?;
        ids.truncate(count.max(0) as usize);
        Ok(ids)
    }

    /// Searches cuBLASLt configurations for `a`'s shape and times the best few hot (see the module
    /// comment). Overwrites `a.y` (and adds into it for `GemmOut::AddF32` / `AddHalf`) many times: run it on a
    /// model whose outputs are not needed afterwards. `gemm_ex` is the `cublasGemmEx` baseline.
    pub(crate) fn search(
        &self,
        a: &GemmArgs,
        gemm_ex: &dyn Fn() -> Result<(), CudaError>,
        o: &GemmSearchOptions,
    ) -> Result<SearchOutcome, CudaError> {
        let plan = self.make_plan(a)?;
        let result = self.search_with(&plan, a, gemm_ex, o);
        Self::destroy_plan(&plan);
        result
    }

    fn search_with(
        &self,
        plan: &Plan,
        a: &GemmArgs,
        gemm_ex: &dyn Fn() -> Result<(), CudaError>,
        o: &GemmSearchOptions,
    ) -> Result<SearchOutcome, CudaError> {
        let started = std::time::Instant::now();
        let flops = 2.0 * (a.m * a.n * a.k) as f64;
        let tflops = |ms: f64| flops / ms / 1e9;
        let shape = format!("GEMM m={} n={} k={}{}", a.m, a.n, a.k, a.out.label());
        let mut lines = Vec::new();
        // 1. Today's choice (V1): the heuristic's candidates timed cool against cublasGemmEx.
        let (results, count) = self.heuristic(plan, a, CANDIDATES)?;
        let (baseline_ms, best, _) = self.time_candidates(a, gemm_ex, plan, &results, count)?;
        let v1 = match best {
            Some((ms, i)) if ms < 0.99 * baseline_ms => {
                Some((Self::read_config(&results[i].algo), results[i].algo, ms))
            }
            _ => None,
        };
        // 2. Enumerate: every algorithm id x tile x stage count (split-K 1, no swizzle, cluster
        // auto, custom option 0) that AlgoCheck accepts, plus the heuristic's own configurations.
        let mut seen: std::collections::HashSet<AlgoConfig> = std::collections::HashSet::new();
        let mut survivors: Vec<(AlgoConfig, lsys::cublasLtMatmulAlgo_t)> = Vec::new();
        let mut checks = 0usize;
        // A configuration not tried before that builds and passes `AlgoCheck` joins `out`.
        let keep_if_valid =
            |cfg: AlgoConfig,
             seen: &mut std::collections::HashSet<AlgoConfig>,
             checks: &mut usize,
             out: &mut Vec<(AlgoConfig, lsys::cublasLtMatmulAlgo_t)>| {
                if seen.contains(&cfg) {
                    return;
                }
                *checks += 1;
                if let Some(algo) = self.build_algo(a, &cfg) {
                    if self.check(plan, &algo, a).is_some() {
                        seen.insert(cfg);
                        out.push((cfg, algo));
                    }
                }
            };
        let mut heuristic_kept = 0usize;
        for r in results.iter().take(count.max(0) as usize) {
            let cfg = Self::read_config(&r.algo);
            if let Some(algo) = self.build_algo(a, &cfg) {
                checks += 1;
                if self.check(plan, &algo, a).is_some() && seen.insert(cfg) {
                    survivors.push((cfg, algo));
                    heuristic_kept += 1;
                }
            }
        }
        let ids = self.algo_ids(a)?;
        use lsys::cublasLtMatmulAlgoCapAttributes_t as Cap;
        let mut caps: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
        'ids: for &id in &ids {
            let mut probe = [0u32; 9];
            probe[0] = id as u32;
            let Some(base) = self.build_algo(a, &AlgoConfig(probe)) else {
                continue;
            };
            let mut tiles = Self::cap_u32s(&base, Cap::CUBLASLT_ALGO_CAP_TILE_IDS);
            let mut stages = Self::cap_u32s(&base, Cap::CUBLASLT_ALGO_CAP_STAGES_IDS);
            if tiles.is_empty() {
                tiles.push(0);
            }
            if stages.is_empty() {
                stages.push(0);
            }
            caps.insert(
                id,
                (
                    Self::cap_scalar(&base, Cap::CUBLASLT_ALGO_CAP_CTA_SWIZZLING_SUPPORT),
                    Self::cap_scalar(&base, Cap::CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX),
                ),
            );
            for &tile in &tiles {
                for &stage in &stages {
                    if checks >= o.max_checks {
                        break 'ids;
                    }
                    let mut cfg = probe;
                    cfg[CFG_TILE] = tile;
                    cfg[CFG_STAGES] = stage;
                    cfg[CFG_SPLITK] = 1;
                    keep_if_valid(AlgoConfig(cfg), &mut seen, &mut checks, &mut survivors);
                }
            }
        }
        let enumerated = survivors.len();
        // 3. Screen (cool, 1 + 3 calls each): heuristic configurations first, then the rest.
        let mut screened: Vec<Candidate> = Vec::new();
        let screen = |list: &[(AlgoConfig, lsys::cublasLtMatmulAlgo_t)],
                      out: &mut Vec<Candidate>| {
            for (cfg, algo) in list {
                if let Ok(ms) = Self::time(a.stream, || self.launch(plan, algo, a)) {
                    out.push(Candidate {
                        cfg: *cfg,
                        algo: *algo,
                        cool_ms: ms,
                    });
                }
            }
        };
        let first: Vec<_> = survivors.iter().take(o.max_screened).copied().collect();
        screen(&first, &mut screened);
        // 4. Vary swizzle, cluster shape and custom option of the best few.
        screened.sort_by(|x, y| x.cool_ms.total_cmp(&y.cool_ms));
        let mut expanded = Vec::new();
        let top: Vec<AlgoConfig> = screened.iter().take(o.expand_top).map(|c| c.cfg).collect();
        for base in top {
            let (swz, custom_max) = caps.get(&(base.0[0] as i32)).copied().unwrap_or((0, 0));
            let swizzles: Vec<u32> = if swz > 0 { vec![0, 1] } else { vec![0] };
            for &sw in &swizzles {
                for &cl in &SEARCH_CLUSTERS {
                    for cu in 0..=(custom_max as u32).min(SEARCH_MAX_CUSTOM) {
                        let mut cfg = base.0;
                        cfg[CFG_SWIZZLE] = sw;
                        cfg[CFG_CLUSTER] = cl;
                        cfg[CFG_CUSTOM] = cu;
                        keep_if_valid(AlgoConfig(cfg), &mut seen, &mut checks, &mut expanded);
                    }
                }
            }
        }
        let n_expanded = expanded.len();
        screen(&expanded, &mut screened);
        screened.sort_by(|x, y| x.cool_ms.total_cmp(&y.cool_ms));
        lines.push(format!(
            "{shape}: {} algorithm ids, {checks} AlgoCheck calls, {enumerated} configurations passed ({heuristic_kept} from the heuristic), {} screened cool + {n_expanded} swizzle/cluster/custom variants; cool: cublasGemmEx {baseline_ms:.4} ms, heuristic-timed (V1) {}, best screened {:.4} ms ({:.0} TFLOP/s); {:.1} s",
            ids.len(),
            first.len(),
            match &v1 {
                Some((cfg, _, ms)) => format!("{ms:.4} ms ({cfg})"),
                None => "cublasGemmEx".to_string(),
            },
            screened.first().map_or(f64::NAN, |c| c.cool_ms),
            screened.first().map_or(f64::NAN, |c| tflops(c.cool_ms)),
            started.elapsed().as_secs_f64()
        ));
        // 5. Hot timing: gemm_ex, the V1 choice and the finalists, interleaved, after a heat-soak.
        let mut arms = vec![Arm {
            label: "cublasGemmEx".into(),
            choice: TableChoice::GemmEx,
            algo: None,
            cool_ms: baseline_ms,
            hot_ms: Vec::new(),
        }];
        if let Some((cfg, algo, ms)) = &v1 {
            arms.push(Arm {
                label: format!("V1 heuristic-timed ({cfg})"),
                choice: TableChoice::Lt(*cfg),
                algo: Some(*algo),
                cool_ms: *ms,
                hot_ms: Vec::new(),
            });
        }
        for c in screened.iter() {
            if arms.len() >= o.hot_finalists + 2 {
                break;
            }
            if arms.iter().any(|arm| arm.choice == TableChoice::Lt(c.cfg)) {
                continue;
            }
            arms.push(Arm {
                label: format!("searched ({})", c.cfg),
                choice: TableChoice::Lt(c.cfg),
                algo: Some(c.algo),
                cool_ms: c.cool_ms,
                hot_ms: Vec::new(),
            });
        }
        let run_arm = |arm: &Arm| -> Result<(), CudaError> {
            match &arm.algo {
                Some(algo) => self.launch(plan, algo, a),
                None => gemm_ex(),
            }
        };
        let heat_calls = ((o.heat_ms / baseline_ms).ceil() as usize).max(1);
        let heat_ms = Self::time_reps(a.stream, heat_calls, gemm_ex)? * heat_calls as f64;
        for round in 0..o.rounds {
            for j in 0..arms.len() {
                let i = (j + round) % arms.len();
                let calls = ((o.arm_ms / arms[i].cool_ms).ceil() as usize).max(3);
                let ms = Self::time_reps(a.stream, calls, || run_arm(&arms[i]))?;
                arms[i].hot_ms.push(ms);
            }
        }
        let best = arms
            .iter()
            .min_by(|x, y| median(&x.hot_ms).total_cmp(&median(&y.hot_ms)))
            .expect("cublasGemmEx is always an arm");
        let base_hot = median(&arms[0].hot_ms);
        lines.push(format!(
            "{shape}: hot ({:.0} ms heat-soak, {} rounds of >= {} ms per arm, arms interleaved), median ms per call; floor {:.4} ms at 989 TFLOP/s:",
            heat_ms, o.rounds, o.arm_ms, flops / 989e12 * 1e3
        ));
        for arm in &arms {
            let hot = median(&arm.hot_ms);
            lines.push(format!(
                "  {:<7} hot {hot:.4} ms = {:.0} TFLOP/s (x{:.2} the 989 floor, {:+.1}% vs cublasGemmEx hot); cool {:.4} ms = {:.0} TFLOP/s  [{}]",
                if std::ptr::eq(arm, best) { "CHOSEN" } else { "" },
                tflops(hot),
                hot / (flops / 989e12 * 1e3),
                (hot / base_hot - 1.0) * 100.0,
                arm.cool_ms,
                tflops(arm.cool_ms),
                arm.label
            ));
        }
        let mut ranked: Vec<(TableChoice, f64)> =
            arms.iter().map(|a| (a.choice, median(&a.hot_ms))).collect();
        ranked.sort_by(|x, y| x.1.total_cmp(&y.1));
        Ok(SearchOutcome {
            arms: ranked,
            entry: TableEntry {
                gpu: self.gpu.clone(),
                lt_version: self.lt_version,
                bf16: a.bf16,
                m_bucket: a.m.div_ceil(ROW_BUCKET) * ROW_BUCKET,
                n: a.n,
                k: a.k,
                out: a.out,
                choice: best.choice,
                hot_ms: median(&best.hot_ms),
            },
            lines,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_parses_and_lines_round_trip() {
        let entries = parse_table(SHIPPED_TABLE).expect("the shipped table parses");
        assert!(!entries.is_empty(), "the shipped table has entries");
        for e in &entries {
            let again = TableEntry::parse_line(&e.to_line()).expect("a written line parses");
            assert_eq!(again.choice, e.choice);
            assert_eq!(
                (
                    again.m_bucket,
                    again.n,
                    again.k,
                    again.out,
                    again.bf16,
                    again.lt_version
                ),
                (e.m_bucket, e.n, e.k, e.out, e.bf16, e.lt_version)
            );
            assert_eq!(again.gpu, e.gpu);
        }
    }

    #[test]
    fn bad_table_lines_are_errors_naming_the_line() {
        let header = format!("# comment\n{TABLE_HEADER}\n");
        let short = format!("{header}NVIDIA X\t130100\tf16\t2048\n");
        assert!(parse_table(&short).unwrap_err().starts_with("line 3:"));
        let bad_choice = format!(
            "{header}NVIDIA X\t130100\tf16\t2048\t4096\t4096\thalf\tmaybe\t66\t23\t35\t1\t0\t0\t7\t0\t2\t0.1\n"
        );
        assert!(parse_table(&bad_choice)
            .unwrap_err()
            .contains("choice `maybe`"));
        let bad_out = bad_choice.replace("half\tmaybe", "f64\tlt");
        assert!(parse_table(&bad_out).unwrap_err().contains("out `f64`"));
        let ok = bad_choice.replace("maybe", "gemm_ex");
        let parsed = parse_table(&ok).expect("a valid line parses");
        assert_eq!(parsed[0].choice, TableChoice::GemmEx);
        assert_eq!(parsed[0].out, GemmOut::Half);
    }
}
