//! The CUDA forward (feature `cuda`): cudarc with dynamic loading, so it builds on machines without
//! a CUDA toolkit and fails with a clear error (never a panic) on machines without a GPU.
//!
//! - Kernels (embedding, fused residual-add + RMSNorm, RoPE + KV write into blocks, SiLU-gated MLP
//!   activation, paged split-KV decode attention, paged causal prefill attention on tensor cores,
//!   batch-1 GEMVs, greedy argmax) live in `kernels/*.cu` and are compiled at start-up by NVRTC for
//!   the device's architecture, specialised on head size, block size and element type.
//! - GEMMs go through cuBLAS (`cublasGemmEx`, fp16/bf16 in, fp32 accumulate) or, for prefill-sized
//!   steps, cuBLASLt with a timed algorithm choice, except gate_up of prefill-sized steps on sm_90:
//!   an own warp-specialised TMA + wgmma GEMM with SiLU-mul in its epilogue (`gemm_ws_silu`).
//! - The decode step of each batch-size bucket is captured once as a CUDA graph and replayed; per-step
//!   data (tokens, positions, slots, lengths, block tables) lives in fixed device buffers refreshed by
//!   small copies before each replay.
//! - All device memory (weights, activations, KV pool, workspaces) is allocated at start-up; running
//!   out there is `CudaError::OutOfMemory` with the numbers.
//! - The remaining choices are typed ([`EngineTuning`]); docs/engine-cuda.md records why each
//!   default won.
//!
//! Must never: read tuning choices from the environment (only `DJINN_CUDA_TRACE`, a debug trace,
//! and the toolkit location), or hold probes and benchmarks (those live in `crate::probe::forward`).
//!
//! Entry points: [`GpuDevice::open`], [`CudaModel::new`] (implements [`crate::batch::PagedModel`]),
//! [`GpuKvPool`] (base pointer and block bytes for the swap engine).

mod device;
pub(crate) mod gemm_tune;
mod model;
pub(crate) mod pool;
mod tuning;

pub use device::{cuda_include_dir, GpuDevice};
pub use gemm_tune::TABLE_HEADER as GEMM_TABLE_HEADER;
pub(crate) use model::{kargs, GemmPath, OwnGateUpMaps, CUBLAS_WORKSPACE_BYTES, TUNE_MIN_ROWS};
pub use model::{CudaModel, CudaModelOptions, KvDemand, WeightSource};
pub use pool::{DeviceBuffer, GpuKvPool};
pub use tuning::{
    DecodeAttention, DecodeGemm, EngineTuning, GemmTuning, PrefillAttention, BATCH_GEMV_MAX_ROWS,
    HALF_RESIDUAL_MIN_TOKENS, OWN_GATE_UP_MIN_TOKENS,
};

use std::path::PathBuf;

/// Why the CUDA backend could not start or run a step.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA library `{library}` was not found ({hint}); the CUDA backend needs an NVIDIA driver and the CUDA 13 runtime libraries")]
    LibraryMissing {
        library: &'static str,
        hint: &'static str,
    },
    #[error("no CUDA device could be opened: {0}")]
    NoDevice(String),
    #[error("CUDA headers (cuda_fp16.h) not found; looked in {tried:?}; set CUDA_HOME or CUDA_PATH to the toolkit root")]
    IncludeDirNotFound { tried: Vec<PathBuf> },
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    KernelCompile { arch: String, log: String },
    #[error("CUDA driver call failed while {context}: {message}")]
    Driver { context: String, message: String },
    #[error("cuBLAS call failed while {context}: {message}")]
    Cublas { context: String, message: String },
    #[error(
        "out of GPU memory at start-up: {what} needs {requested_mib:.1} MiB but only {free_mib:.1} MiB of {total_mib:.1} MiB are free ({breakdown})"
    )]
    OutOfMemory {
        what: String,
        requested_mib: f64,
        free_mib: f64,
        total_mib: f64,
        breakdown: String,
    },
    #[error("unsupported model for the CUDA backend: {0}")]
    Unsupported(String),
    #[error("invalid step input: {0}")]
    BadInput(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("the GPU did not finish {what} within {seconds} s (hung kernel or lost device)")]
    Timeout { what: String, seconds: f64 },
    #[error("I/O on {path}: {message}")]
    Io { path: PathBuf, message: String },
}

pub(crate) fn drv<T>(
    context: &str,
    r: Result<T, cudarc::driver::DriverError>,
) -> Result<T, CudaError> {
    r.map_err(|e| CudaError::Driver {
        context: context.to_string(),
        message: format!("{e:?}"),
    })
}

/// Waits until work on the legacy default stream is done. The blocking driver calls used at
/// start-up and by the checks (`cuMemsetD8`, `cuMemcpyHtoD` from pageable memory) may return
/// before the device finishes them, and the engine's streams are non-blocking (not ordered after
/// the legacy stream): without this, a kernel could read memory the memset or copy is still
/// writing (a poisoned KV block could be overwritten after the forward wrote it).
pub(crate) fn legacy_stream_done(context: &str) -> Result<(), CudaError> {
    drv(context, finish_legacy_stream())
}

/// [`legacy_stream_done`] with the driver's own error, for callers with their own error types (the
/// swap engine, its check and bench).
pub(crate) fn finish_legacy_stream() -> Result<(), cudarc::driver::DriverError> {
    cudarc::driver::result::ctx::synchronize()
}
