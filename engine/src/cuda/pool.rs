//! Raw device allocations and the GPU KV block pool.

use std::sync::Arc;

use cudarc::driver::{result as dr, sys as dsys, CudaContext};

use super::{drv, CudaError};
use crate::config::{DType, KvLayout};

/// One device allocation (`cuMemAlloc`), freed on drop. Kernels take its raw pointer.
pub struct DeviceBuffer {
    ptr: dsys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceBuffer {
    /// Allocates `bytes` (at least 1). Out of memory is `CudaError::OutOfMemory` naming `what`.
    pub fn alloc(
        ctx: &Arc<CudaContext>,
        bytes: usize,
        what: &str,
    ) -> Result<DeviceBuffer, CudaError> {
        drv("binding the context", ctx.bind_to_thread())?;
        // SAFETY: plain allocation; the memory is uninitialised until written.
        match unsafe { dr::malloc_sync(bytes.max(1)) } {
            Ok(ptr) => Ok(DeviceBuffer {
                ptr,
                bytes,
                ctx: ctx.clone(),
            }),
            Err(e) => {
                let (free, total) = ctx.mem_get_info().unwrap_or((0, 0));
                if e.0 == dsys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                    Err(CudaError::OutOfMemory {
                        what: what.to_string(),
                        requested_mib: mib(bytes),
                        free_mib: mib(free),
                        total_mib: mib(total),
                        breakdown: "allocation failed".into(),
                    })
                } else {
                    Err(CudaError::Driver {
                        context: format!("allocating {what} ({bytes} bytes)"),
                        message: format!("{e:?}"),
                    })
                }
            }
        }
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: ptr came from cuMemAlloc and is freed once; work using it was synchronised
            // by the owner before drop (the model synchronises its stream in its own Drop).
            let _ = unsafe { dr::free_sync(self.ptr) };
        }
    }
}

pub(crate) fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The GPU KV cache: `num_blocks` blocks in ONE device allocation, block-major
/// (`[block][layer][K|V][kv_head][token_in_block][head_dim]`, see [`KvLayout`]), fp16 or bf16.
///
/// For the swap engine: block `id` occupies the byte range
/// `base_device_ptr() + id * block_bytes() .. + block_bytes()` — all layers, K and V, contiguous —
/// so a whole block moves with one copy, and a run of consecutive ids with one larger copy.
/// Block ids are the `u32` indices the block tables name. The forward only ever touches blocks
/// named in the step's block tables, on the model's compute stream ([`super::GpuDevice::stream`]);
/// a swap must be ordered against that stream (event recorded after the forward that last wrote
/// the block before copying it out; copy-in complete before the forward that reads it).
pub struct GpuKvPool {
    buffer: DeviceBuffer,
    layout: KvLayout,
    dtype: DType,
    num_blocks: usize,
}

impl GpuKvPool {
    pub(crate) fn new(
        ctx: &Arc<CudaContext>,
        layout: KvLayout,
        dtype: DType,
        num_blocks: usize,
    ) -> Result<Self, CudaError> {
        let bytes = num_blocks * layout.block_elems() * dtype.size_bytes();
        let buffer =
            DeviceBuffer::alloc(ctx, bytes, &format!("the KV pool ({num_blocks} blocks)"))?;
        // Zero it so a block read before it is written holds finite values.
        drv("binding the context", ctx.bind_to_thread())?;
        drv("zeroing the KV pool", unsafe {
            dr::memset_d8_sync(buffer.ptr(), 0, bytes)
        })?;
        super::legacy_stream_done("zeroing the KV pool")?;
        Ok(GpuKvPool {
            buffer,
            layout,
            dtype,
            num_blocks,
        })
    }

    /// Device address of block 0.
    pub fn base_device_ptr(&self) -> u64 {
        self.buffer.ptr()
    }

    /// Bytes of one block (all layers, K and V).
    pub fn block_bytes(&self) -> usize {
        self.layout.block_elems() * self.dtype.size_bytes()
    }

    /// Device address of block `id`.
    pub fn block_device_ptr(&self, id: u32) -> u64 {
        assert!(
            (id as usize) < self.num_blocks,
            "block {id} outside a pool of {}",
            self.num_blocks
        );
        self.base_device_ptr() + id as u64 * self.block_bytes() as u64
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn total_bytes(&self) -> usize {
        self.buffer.bytes()
    }
}
