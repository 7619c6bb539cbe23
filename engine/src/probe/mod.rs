//! Probes and benchmarks of the engine: measurements and GPU checks of the CUDA forward and the swap
//! engine, reached through `djinn engine ...` commands and the GPU tests, and the profiling grid
//! of `djinn calibrate profile` (CPU or CUDA). The library's run path
//! never calls into this module: a probe may allocate its own pools, spin the GPU, and print; the
//! mechanisms it measures live elsewhere in the crate.

#[cfg(feature = "cuda")]
pub mod forward;
pub mod grid;
#[cfg(feature = "cuda")]
pub mod provenance;
#[cfg(feature = "cuda")]
pub mod swap;
