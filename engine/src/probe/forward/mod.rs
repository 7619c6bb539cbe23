//! Probes of the CUDA forward: `djinn engine bench` (decode and prefill timings beside their
//! floors, per-kernel profiles), `djinn engine check ...` (CUDA against the CPU reference, the
//! forward's self-consistency across its paths), `djinn engine gemm-search` (cuBLASLt
//! configuration search, the own wgmma GEMM's check and timing), the multi-row GEMV against cuBLAS.

pub mod batch_gemv;
pub mod bench;
pub mod check;
pub mod gemm_search;
pub mod lt_search;
pub mod own_gemm;
pub mod profile;
