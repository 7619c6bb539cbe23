//! GPU correctness checks of the CUDA swap engine, run by `djinn engine swap-check` on the GPU
//! machine and by `engine/tests/swap_cuda.rs` (which skips, saying why, where no GPU exists).
//!
//! - bit-exact round trip: blocks swapped out and back into different device blocks hold the same
//!   bytes; no other block changes (batched and per-run copies, both directions at once);
//! - busy blocks: a block named by an unreported swap is refused to another swap and to a drop;
//! - records: bytes, direction, block count and times are consistent;
//! - logits: an agent's next-token logits after swap-out / swap-in into different blocks equal
//!   (bit for bit) those of the same agent never swapped; after a drop, recomputing the context
//!   gives the same logits within the forward's fp16 tolerance; a step gated per layer on a
//!   layer-by-layer swap-in still in flight sees the swapped-in KV;
//! - pacing: swaps under a rate cap move at the cap and stay bit-exact.

use std::sync::Arc;

use cudarc::driver::{result, CudaContext};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{driver, Invocation, ProbeError, Provenance};
use crate::cuda::{DeviceBuffer, GpuDevice};
use crate::swap::cuda::{CopyMethod, GpuKvPoolRef, PinnedHostPool, SwapInPath};
use crate::swap::BlockPair;

mod copies;
mod logits;

/// Errors of the checks.
pub type SwapCheckError = ProbeError;

/// The outcome of one check: its name, whether it held, and what was seen.
#[derive(Clone, Debug, Serialize)]
pub struct CheckOutcome {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

fn outcome(name: &str, passed: bool, detail: String) -> CheckOutcome {
    CheckOutcome {
        name: name.into(),
        passed,
        detail,
    }
}

/// Opens the GPU, or says why there is none (the caller skips).
pub fn open_gpu() -> Result<GpuDevice, String> {
    GpuDevice::open(0).map_err(|error| error.to_string())
}

/// Runs every check; an error is a failure to run, a failed check is an outcome.
pub fn run_all(device: GpuDevice) -> Result<Vec<CheckOutcome>, SwapCheckError> {
    let mut outcomes = Vec::new();
    for method in [CopyMethod::Batched, CopyMethod::PerRun] {
        outcomes.extend(copies::round_trip(&device, method, SwapInPath::Dma)?);
    }
    // The SM gather kernel for swap-ins (3 CTAs: each walks several blocks and a partial chunk).
    outcomes.extend(copies::round_trip(
        &device,
        CopyMethod::Batched,
        SwapInPath::Kernel { ctas: 3 },
    )?);
    outcomes.extend(copies::paced_swaps(&device)?);
    outcomes.extend(copies::busy_blocks(&device.ctx)?);
    outcomes.extend(logits::logits_after_swap(device)?);
    Ok(outcomes)
}

/// What `djinn engine swap-check --json` writes: where the checks ran, and each outcome.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub provenance: Provenance,
    pub passed: usize,
    pub failed: usize,
    pub outcomes: Vec<CheckOutcome>,
}

/// [`run_all`], with the provenance of the run.
pub fn run_all_with_provenance(
    device: GpuDevice,
    invocation: Invocation,
) -> Result<CheckReport, SwapCheckError> {
    let provenance = Provenance::of(&device, invocation);
    let outcomes = run_all(device)?;
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    Ok(CheckReport {
        provenance,
        passed: outcomes.len() - failed,
        failed,
        outcomes,
    })
}

fn pool_bytes(ctx: &Arc<CudaContext>, pool: GpuKvPoolRef) -> Result<Vec<u8>, SwapCheckError> {
    let mut bytes = vec![0u8; pool.block_bytes * pool.block_count as usize];
    ctx.bind_to_thread()
        .map_err(driver("binding the context"))?;
    unsafe { result::memcpy_dtoh_sync(&mut bytes, pool.base) }
        .map_err(driver("reading the device pool"))?;
    Ok(bytes)
}

fn pairs(gpu: &[u32], host: &[u32]) -> Vec<BlockPair> {
    gpu.iter()
        .zip(host)
        .map(|(&gpu_block, &host_block)| BlockPair {
            gpu_block,
            host_block,
        })
        .collect()
}

/// The pools a copy check works on: a device pool of 64 blocks of 1 MiB + 4 KiB (an odd size on
/// purpose) filled with seeded random bytes (`original`), and a pinned host pool of 48 blocks.
struct CheckPools {
    /// Owns the device pool's memory; `pool` points into it.
    _buffer: DeviceBuffer,
    pool: GpuKvPoolRef,
    original: Vec<u8>,
    host: PinnedHostPool,
}

fn check_pools(ctx: &Arc<CudaContext>, seed: u64) -> Result<CheckPools, SwapCheckError> {
    let block_bytes = (1 << 20) + 4096;
    let gpu_blocks = 64u32;
    let buffer = DeviceBuffer::alloc(
        ctx,
        block_bytes * gpu_blocks as usize,
        "the swap check's device pool",
    )?;
    let pool = GpuKvPoolRef {
        base: buffer.ptr(),
        block_bytes,
        block_count: gpu_blocks,
    };
    let mut original = vec![0u8; block_bytes * gpu_blocks as usize];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut original);
    ctx.bind_to_thread()
        .map_err(driver("binding the context"))?;
    unsafe { result::memcpy_htod_sync(pool.base, &original) }
        .map_err(driver("filling the device pool"))?;
    // Legacy-stream work: done before the (non-blocking) swap streams touch the pool.
    crate::cuda::finish_legacy_stream().map_err(driver("filling the device pool"))?;
    let host = PinnedHostPool::new(ctx, block_bytes, 48)?;
    Ok(CheckPools {
        _buffer: buffer,
        pool,
        original,
        host,
    })
}
