//! The two pools a swap moves blocks between: the device KV pool as the swap engine sees it
//! (a raw base pointer, block bytes and count) and the pinned host pool it owns.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

use super::driver;
use crate::swap::host_pool::HostMemory;
use crate::swap::SwapError;

/// The device KV pool as the swap engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuKvPoolRef {
    pub base: sys::CUdeviceptr,
    pub block_bytes: usize,
    pub block_count: u32,
}

impl GpuKvPoolRef {
    pub fn block_ptr(&self, block: u32) -> sys::CUdeviceptr {
        debug_assert!(block < self.block_count);
        self.base + block as u64 * self.block_bytes as u64
    }
}

/// Page-locked host memory in blocks of `block_bytes`, allocated once at start-up, so the DMA
/// engines read and write it directly at full PCIe rate (pageable memory is staged and
/// synchronous).
///
/// Ordinary pinned memory (flags 0), not write-combined: the host side of the KV may be read by
/// the CPU (tests, checkpoints), and both gave the same DMA rate on the H100 machines measured.
pub struct PinnedHostPool {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    block_bytes: usize,
    block_count: u32,
}

// The pool is plain memory; the raw pointer is only used under the engine's busy-block rules.
unsafe impl Send for PinnedHostPool {}

impl PinnedHostPool {
    /// Pins `block_count * block_bytes` bytes. Fails with the size and the host's memory when the
    /// request exceeds MemAvailable (pinning that much would push the host into swapping or the
    /// OOM killer) or when the driver refuses.
    pub fn new(
        ctx: &Arc<CudaContext>,
        block_bytes: usize,
        block_count: u32,
    ) -> Result<Self, SwapError> {
        if block_bytes == 0 || block_count == 0 {
            return Err(SwapError::InvalidPool(format!(
                "pinned host pool needs at least one block of at least one byte (got {block_count} x {block_bytes} bytes)"
            )));
        }
        let requested_bytes = (block_bytes as u64)
            .checked_mul(block_count as u64)
            .ok_or_else(|| {
                SwapError::InvalidPool(format!(
                    "{block_count} blocks of {block_bytes} bytes overflow"
                ))
            })?;
        let memory = HostMemory::read().unwrap_or(HostMemory {
            mem_total_bytes: 0,
            mem_available_bytes: 0,
        });
        let failure = |reason: String| SwapError::PinnedAllocFailed {
            requested_bytes,
            block_count,
            block_bytes: block_bytes as u64,
            mem_total_bytes: memory.mem_total_bytes,
            mem_available_bytes: memory.mem_available_bytes,
            reason,
        };
        if memory.mem_available_bytes != 0 && requested_bytes > memory.mem_available_bytes {
            return Err(failure(
                "the request exceeds MemAvailable; configure a smaller host pool".into(),
            ));
        }
        ctx.bind_to_thread()
            .map_err(driver("binding the context for the pinned allocation"))?;
        let ptr = unsafe { result::malloc_host(requested_bytes as usize, 0) }
            .map_err(|error| failure(format!("cuMemHostAlloc failed: {error:?}")))?;
        Ok(PinnedHostPool {
            ctx: ctx.clone(),
            ptr: ptr as *mut u8,
            block_bytes,
            block_count,
        })
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    pub fn block_count(&self) -> u32 {
        self.block_count
    }

    pub fn total_bytes(&self) -> u64 {
        self.block_bytes as u64 * self.block_count as u64
    }

    /// Host address of a block (as the CUDA unified address space sees it).
    pub fn block_addr(&self, block: u32) -> u64 {
        debug_assert!(block < self.block_count);
        self.ptr as u64 + block as u64 * self.block_bytes as u64
    }

    /// The bytes of one block.
    ///
    /// # Safety
    /// No copy into this block may be in flight (the swap engine's busy blocks say which are).
    pub unsafe fn block(&self, block: u32) -> &[u8] {
        assert!(
            block < self.block_count,
            "host block {block} out of range ({})",
            self.block_count
        );
        std::slice::from_raw_parts(
            self.ptr.add(block as usize * self.block_bytes),
            self.block_bytes,
        )
    }

    /// The bytes of one block, writable.
    ///
    /// # Safety
    /// No copy from or into this block may be in flight.
    pub unsafe fn block_mut(&mut self, block: u32) -> &mut [u8] {
        assert!(
            block < self.block_count,
            "host block {block} out of range ({})",
            self.block_count
        );
        std::slice::from_raw_parts_mut(
            self.ptr.add(block as usize * self.block_bytes),
            self.block_bytes,
        )
    }
}

impl Drop for PinnedHostPool {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        self.ctx
            .record_err(unsafe { result::free_host(self.ptr as _) });
    }
}
