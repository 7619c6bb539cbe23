//! The cuBLASLt configuration search for one prefill GEMM shape (`djinn engine gemm-search`):
//! every algorithm id x tile x stage count that `AlgoCheck` accepts is screened on a cool card,
//! the best few are varied in swizzle, cluster shape and custom option, and the finalists are
//! timed hot (after a heat-soak, arms interleaved over rounds) against `cublasGemmEx` and the
//! heuristic-timed choice the engine makes by default (engine/src/cuda/gemm_tune/).

use std::collections::{BTreeMap, HashSet};
use std::ffi::c_void;

use cudarc::cublaslt::sys as lsys;

use crate::cuda::gemm_tune::{
    lt, AlgoConfig, GemmArgs, Plan, TableChoice, TableEntry, TunedGemm, CANDIDATES, CFG_CLUSTER,
    CFG_CUSTOM, CFG_SPLITK, CFG_STAGES, CFG_SWIZZLE, CFG_TILE, ROW_BUCKET,
};
use crate::cuda::CudaError;

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

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Makes `choice` the algorithm of `a`'s row bucket from now on (the in-forward comparison of the
/// search's finalists). Errors if the configuration does not pass `AlgoCheck`.
pub(crate) fn force_choice(
    tuned: &TunedGemm,
    a: &GemmArgs,
    choice: TableChoice,
) -> Result<(), CudaError> {
    let mut plan = tuned.make_plan(a)?;
    if let TableChoice::Lt(cfg) = choice {
        let algo = tuned
            .build_algo(a, &cfg)
            .filter(|algo| tuned.check(&plan, algo, a).is_some());
        match algo {
            Some(algo) => plan.algo = Some(algo),
            None => {
                TunedGemm::destroy_plan(&plan);
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
    tuned.set_bucket_plan(a, plan);
    Ok(())
}

/// A u32 array capability of an algorithm (tile ids, stage ids); empty if not reported.
fn cap_u32s(
    algo: &lsys::cublasLtMatmulAlgo_t,
    attr: lsys::cublasLtMatmulAlgoCapAttributes_t,
) -> Vec<u32> {
    let mut needed = 0usize;
    // SAFETY: a size query (no buffer), then a read into a buffer of that size.
    unsafe {
        if lsys::cublasLtMatmulAlgoCapGetAttribute(algo, attr, std::ptr::null_mut(), 0, &mut needed)
            != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
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
        if lsys::cublasLtMatmulAlgoCapGetAttribute(algo, attr, std::ptr::null_mut(), 0, &mut needed)
            != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
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
fn algo_ids(tuned: &TunedGemm, a: &GemmArgs) -> Result<Vec<i32>, CudaError> {
    let (dt, out_dt) = TunedGemm::types(a);
    let mut ids = vec![0i32; 512];
    let mut count = 0i32;
    // SAFETY: sized output array.
    lt("cublasLtMatmulAlgoGetIds", unsafe {
        lsys::cublasLtMatmulAlgoGetIds(
            tuned.handle(),
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
/// comment). Overwrites `a.y` (and adds into it for `GemmOut::AddF32` / `AddHalf`) many times: run
/// it on a model whose outputs are not needed afterwards. `gemm_ex` is the `cublasGemmEx` baseline.
pub(crate) fn search(
    tuned: &TunedGemm,
    a: &GemmArgs,
    gemm_ex: &dyn Fn() -> Result<(), CudaError>,
    o: &GemmSearchOptions,
) -> Result<SearchOutcome, CudaError> {
    let plan = tuned.make_plan(a)?;
    let result = ShapeSearch {
        tuned,
        plan: &plan,
        a,
        gemm_ex,
        o,
        seen: HashSet::new(),
        checks: 0,
    }
    .run();
    TunedGemm::destroy_plan(&plan);
    result
}

/// A configuration and the algorithm built from it.
type Built = (AlgoConfig, lsys::cublasLtMatmulAlgo_t);

/// What the enumeration found: configurations that pass `AlgoCheck`, how many of them came from
/// the heuristic, how many algorithm ids there are, and per id (swizzle support, custom option max).
struct Enumerated {
    survivors: Vec<Built>,
    heuristic_kept: usize,
    ids: usize,
    caps: BTreeMap<i32, (u64, u64)>,
}

/// One shape's search: its operands, and the configurations tried so far.
struct ShapeSearch<'a> {
    tuned: &'a TunedGemm,
    plan: &'a Plan,
    a: &'a GemmArgs,
    gemm_ex: &'a dyn Fn() -> Result<(), CudaError>,
    o: &'a GemmSearchOptions,
    seen: HashSet<AlgoConfig>,
    /// `AlgoCheck` calls made (the enumeration stops at `o.max_checks`).
    checks: usize,
}

impl ShapeSearch<'_> {
    fn run(mut self) -> Result<SearchOutcome, CudaError> {
        let started = std::time::Instant::now();
        let (tuned, a, o) = (self.tuned, self.a, self.o);
        let flops = 2.0 * (a.m * a.n * a.k) as f64;
        let tflops = |ms: f64| flops / ms / 1e9;
        let shape = format!("GEMM m={} n={} k={}{}", a.m, a.n, a.k, a.out.label());
        let mut lines = Vec::new();
        // 1. The engine's default choice: the heuristic's candidates timed cool against
        // cublasGemmEx.
        let (results, count) = tuned.heuristic(self.plan, a, CANDIDATES)?;
        let (baseline_ms, best, _) =
            tuned.time_candidates(a, self.gemm_ex, self.plan, &results, count)?;
        let timed_choice = match best {
            Some((ms, i)) if ms < 0.99 * baseline_ms => Some((
                TunedGemm::read_config(&results[i].algo),
                results[i].algo,
                ms,
            )),
            _ => None,
        };
        // 2. Enumerate every configuration AlgoCheck accepts.
        let found = self.enumerate(&results[..count.max(0) as usize])?;
        let enumerated = found.survivors.len();
        // 3. Screen (cool, 1 + 3 calls each): heuristic configurations first, then the rest.
        let mut screened: Vec<Candidate> = Vec::new();
        let first: Vec<Built> = found
            .survivors
            .iter()
            .take(o.max_screened)
            .copied()
            .collect();
        self.screen(&first, &mut screened);
        // 4. Vary swizzle, cluster shape and custom option of the best few.
        screened.sort_by(|x, y| x.cool_ms.total_cmp(&y.cool_ms));
        let expanded = self.expand(&screened, &found.caps);
        let n_expanded = expanded.len();
        self.screen(&expanded, &mut screened);
        screened.sort_by(|x, y| x.cool_ms.total_cmp(&y.cool_ms));
        lines.push(format!(
            "{shape}: {} algorithm ids, {} AlgoCheck calls, {enumerated} configurations passed ({} from the heuristic), {} screened cool + {n_expanded} swizzle/cluster/custom variants; cool: cublasGemmEx {baseline_ms:.4} ms, heuristic-timed {}, best screened {:.4} ms ({:.0} TFLOP/s); {:.1} s",
            found.ids,
            self.checks,
            found.heuristic_kept,
            first.len(),
            match &timed_choice {
                Some((cfg, _, ms)) => format!("{ms:.4} ms ({cfg})"),
                None => "cublasGemmEx".to_string(),
            },
            screened.first().map_or(f64::NAN, |c| c.cool_ms),
            screened.first().map_or(f64::NAN, |c| tflops(c.cool_ms)),
            started.elapsed().as_secs_f64()
        ));
        // 5. Hot timing: gemm_ex, the heuristic-timed choice and the finalists, interleaved,
        // after a heat-soak.
        let mut arms = self.arms(baseline_ms, &timed_choice, &screened);
        let heat_ms = self.time_hot(&mut arms, baseline_ms)?;
        Ok(self.outcome(&arms, heat_ms, &shape, lines))
    }

    /// Adds `cfg` to `out` if it was not tried before, builds and passes `AlgoCheck`.
    fn keep_if_valid(&mut self, cfg: AlgoConfig, out: &mut Vec<Built>) {
        if self.seen.contains(&cfg) {
            return;
        }
        self.checks += 1;
        if let Some(algo) = self.tuned.build_algo(self.a, &cfg) {
            if self.tuned.check(self.plan, &algo, self.a).is_some() {
                self.seen.insert(cfg);
                out.push((cfg, algo));
            }
        }
    }

    /// The heuristic's own configurations, then every algorithm id x tile x stage count (split-K
    /// 1, no swizzle, cluster auto, custom option 0), as long as the `AlgoCheck` budget lasts.
    fn enumerate(
        &mut self,
        heuristic: &[lsys::cublasLtMatmulHeuristicResult_t],
    ) -> Result<Enumerated, CudaError> {
        use lsys::cublasLtMatmulAlgoCapAttributes_t as Cap;
        let (tuned, a) = (self.tuned, self.a);
        let mut survivors: Vec<Built> = Vec::new();
        let mut heuristic_kept = 0usize;
        for r in heuristic {
            let cfg = TunedGemm::read_config(&r.algo);
            if let Some(algo) = tuned.build_algo(a, &cfg) {
                self.checks += 1;
                if tuned.check(self.plan, &algo, a).is_some() && self.seen.insert(cfg) {
                    survivors.push((cfg, algo));
                    heuristic_kept += 1;
                }
            }
        }
        let ids = algo_ids(tuned, a)?;
        let mut caps: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
        'ids: for &id in &ids {
            let mut probe = [0u32; 9];
            probe[0] = id as u32;
            let Some(base) = tuned.build_algo(a, &AlgoConfig(probe)) else {
                continue;
            };
            let mut tiles = cap_u32s(&base, Cap::CUBLASLT_ALGO_CAP_TILE_IDS);
            let mut stages = cap_u32s(&base, Cap::CUBLASLT_ALGO_CAP_STAGES_IDS);
            if tiles.is_empty() {
                tiles.push(0);
            }
            if stages.is_empty() {
                stages.push(0);
            }
            caps.insert(
                id,
                (
                    cap_scalar(&base, Cap::CUBLASLT_ALGO_CAP_CTA_SWIZZLING_SUPPORT),
                    cap_scalar(&base, Cap::CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX),
                ),
            );
            for &tile in &tiles {
                for &stage in &stages {
                    if self.checks >= self.o.max_checks {
                        break 'ids;
                    }
                    let mut cfg = probe;
                    cfg[CFG_TILE] = tile;
                    cfg[CFG_STAGES] = stage;
                    cfg[CFG_SPLITK] = 1;
                    self.keep_if_valid(AlgoConfig(cfg), &mut survivors);
                }
            }
        }
        Ok(Enumerated {
            survivors,
            heuristic_kept,
            ids: ids.len(),
            caps,
        })
    }

    /// Times each of `list` cool (1 + 3 calls); those that launch join `out`.
    fn screen(&self, list: &[Built], out: &mut Vec<Candidate>) {
        for (cfg, algo) in list {
            if let Ok(ms) =
                TunedGemm::time(self.a.stream, || self.tuned.launch(self.plan, algo, self.a))
            {
                out.push(Candidate {
                    cfg: *cfg,
                    algo: *algo,
                    cool_ms: ms,
                });
            }
        }
    }

    /// The swizzle / cluster shape / custom option variants of the `o.expand_top` fastest
    /// screened configurations (`screened` sorted fastest first) that pass `AlgoCheck`.
    fn expand(&mut self, screened: &[Candidate], caps: &BTreeMap<i32, (u64, u64)>) -> Vec<Built> {
        let mut expanded = Vec::new();
        let top: Vec<AlgoConfig> = screened
            .iter()
            .take(self.o.expand_top)
            .map(|c| c.cfg)
            .collect();
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
                        self.keep_if_valid(AlgoConfig(cfg), &mut expanded);
                    }
                }
            }
        }
        expanded
    }

    /// The arms of the hot timing: cublasGemmEx, the heuristic-timed choice (if not cublasGemmEx)
    /// and the fastest screened configurations, up to `o.hot_finalists` of them.
    fn arms(
        &self,
        baseline_ms: f64,
        timed_choice: &Option<(AlgoConfig, lsys::cublasLtMatmulAlgo_t, f64)>,
        screened: &[Candidate],
    ) -> Vec<Arm> {
        let mut arms = vec![Arm {
            label: "cublasGemmEx".into(),
            choice: TableChoice::GemmEx,
            algo: None,
            cool_ms: baseline_ms,
            hot_ms: Vec::new(),
        }];
        if let Some((cfg, algo, ms)) = timed_choice {
            arms.push(Arm {
                label: format!("heuristic-timed ({cfg})"),
                choice: TableChoice::Lt(*cfg),
                algo: Some(*algo),
                cool_ms: *ms,
                hot_ms: Vec::new(),
            });
        }
        for c in screened.iter() {
            if arms.len() >= self.o.hot_finalists + 2 {
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
        arms
    }

    /// Heat-soaks the card with `cublasGemmEx`, then times every arm `o.rounds` times (the order
    /// rotated every round) into its `hot_ms`. Returns the heat-soak's length in ms.
    fn time_hot(&self, arms: &mut [Arm], baseline_ms: f64) -> Result<f64, CudaError> {
        let (a, o, gemm_ex) = (self.a, self.o, self.gemm_ex);
        let run_arm = |arm: &Arm| -> Result<(), CudaError> {
            match &arm.algo {
                Some(algo) => self.tuned.launch(self.plan, algo, a),
                None => gemm_ex(),
            }
        };
        let heat_calls = ((o.heat_ms / baseline_ms).ceil() as usize).max(1);
        let heat_ms = TunedGemm::time_reps(a.stream, heat_calls, gemm_ex)? * heat_calls as f64;
        for round in 0..o.rounds {
            for j in 0..arms.len() {
                let i = (j + round) % arms.len();
                let calls = ((o.arm_ms / arms[i].cool_ms).ceil() as usize).max(3);
                let ms = TunedGemm::time_reps(a.stream, calls, || run_arm(&arms[i]))?;
                arms[i].hot_ms.push(ms);
            }
        }
        Ok(heat_ms)
    }

    /// The hot timing's report lines (appended to `lines`) and the fastest arm as a table entry.
    fn outcome(
        &self,
        arms: &[Arm],
        heat_ms: f64,
        shape: &str,
        mut lines: Vec<String>,
    ) -> SearchOutcome {
        let (a, o) = (self.a, self.o);
        let flops = 2.0 * (a.m * a.n * a.k) as f64;
        let tflops = |ms: f64| flops / ms / 1e9;
        let best = arms
            .iter()
            .min_by(|x, y| median(&x.hot_ms).total_cmp(&median(&y.hot_ms)))
            .expect("cublasGemmEx is always an arm");
        let base_hot = median(&arms[0].hot_ms);
        lines.push(format!(
            "{shape}: hot ({:.0} ms heat-soak, {} rounds of >= {} ms per arm, arms interleaved), median ms per call; floor {:.4} ms at 989 TFLOP/s:",
            heat_ms, o.rounds, o.arm_ms, flops / 989e12 * 1e3
        ));
        for arm in arms {
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
        SearchOutcome {
            arms: ranked,
            entry: TableEntry {
                gpu: self.tuned.gpu().to_string(),
                lt_version: self.tuned.lt_version(),
                bf16: a.bf16,
                m_bucket: a.m.div_ceil(ROW_BUCKET) * ROW_BUCKET,
                n: a.n,
                k: a.k,
                out: a.out,
                choice: best.choice,
                hot_ms: median(&best.hot_ms),
            },
            lines,
        }
    }
}
