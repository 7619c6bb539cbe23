//! The real backend.
//!
//! Owns: the Llama-family model description, weight loading (seeded random, HF safetensors, GGUF),
//! the CPU reference forward (candle-core), the CUDA forward (cudarc, feature `cuda`), the GPU and
//! pinned-host KV block pools, the swap engine and the wall clock; and, apart from those, the
//! probes that measure and check them on a GPU (`probe`).
//!
//! Must never: allocate KV blocks on its own (it executes the block ids that `sim`'s shared KV
//! mechanism names in a plan), or make scheduling decisions. It is the only crate that reads the OS
//! clock.

pub mod batch;
pub mod clock;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod probe;
pub mod swap;
pub mod tokenizer;
pub mod weights;

pub use clock::WallClock;
