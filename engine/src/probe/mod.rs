//! Probes and benchmarks of the engine: code that measures or checks the product from outside
//! (behind the `djinn engine` commands and the GPU tests), never on a serving path.

#[cfg(feature = "cuda")]
pub mod forward;
