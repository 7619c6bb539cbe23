//! Measurements and GPU checks of the engine's mechanisms, reached through `djinn engine ...`
//! commands. The library's run path never calls into this module: a probe may allocate its own
//! pools, spin the GPU, and print; the mechanisms it measures live elsewhere in the crate.

#[cfg(feature = "cuda")]
pub mod swap;
