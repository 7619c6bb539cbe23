//! The cuBLASLt calls of the tuned prefill GEMM: matmul descriptors and layouts (`Plan`),
//! algorithm configurations read from and built into `cublasLtMatmulAlgo_t`, `AlgoCheck`, the
//! heuristic's candidates and the launch itself.

use std::ffi::c_void;

use cudarc::cublaslt::sys as lsys;

use super::{GemmArgs, TunedGemm};
use crate::cuda::CudaError;

pub(crate) fn lt(context: &str, status: lsys::cublasStatus_t) -> Result<(), CudaError> {
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
pub(crate) struct Plan {
    pub(crate) desc: lsys::cublasLtMatmulDesc_t,
    pub(crate) layouts: [lsys::cublasLtMatrixLayout_t; 3],
    pub(crate) algo: Option<lsys::cublasLtMatmulAlgo_t>,
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
pub(crate) const CFG_TILE: usize = 1;
pub(crate) const CFG_STAGES: usize = 2;
pub(crate) const CFG_SPLITK: usize = 3;
pub(crate) const CFG_SWIZZLE: usize = 5;
pub(crate) const CFG_CUSTOM: usize = 6;
pub(crate) const CFG_CLUSTER: usize = 8;

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
impl TunedGemm {
    /// The (compute, scale, A/B, C/D) types of a GEMM.
    pub(crate) fn types(a: &GemmArgs) -> (lsys::cudaDataType_t, lsys::cudaDataType_t) {
        use lsys::cudaDataType_t as D;
        let dt = if a.bf16 {
            D::CUDA_R_16BF
        } else {
            D::CUDA_R_16F
        };
        (dt, if a.out.is_f32() { D::CUDA_R_32F } else { dt })
    }

    /// Reads an algorithm's configuration.
    pub(crate) fn read_config(algo: &lsys::cublasLtMatmulAlgo_t) -> AlgoConfig {
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
    pub(crate) fn build_algo(
        &self,
        a: &GemmArgs,
        cfg: &AlgoConfig,
    ) -> Option<lsys::cublasLtMatmulAlgo_t> {
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
    pub(crate) fn check(
        &self,
        plan: &Plan,
        algo: &lsys::cublasLtMatmulAlgo_t,
        a: &GemmArgs,
    ) -> Option<usize> {
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

    pub(crate) fn make_plan(&self, a: &GemmArgs) -> Result<Plan, CudaError> {
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

    pub(crate) fn launch(
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

    /// Up to `wanted` heuristic candidates for `plan` (within the workspace cap), and their count.
    pub(crate) fn heuristic(
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

    pub(crate) fn destroy_plan(plan: &Plan) {
        // SAFETY: descriptors created by make_plan and used by nothing else.
        unsafe {
            for l in plan.layouts {
                lsys::cublasLtMatrixLayoutDestroy(l);
            }
            lsys::cublasLtMatmulDescDestroy(plan.desc);
        }
    }
}
