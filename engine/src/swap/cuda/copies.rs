//! Handing a swap's copies to the copy engines: one batched call per swap (or per layer of a
//! layer-by-layer swap-in), or one call per run of blocks.

use cudarc::driver::{sys, CudaEvent, CudaStream};

use super::{driver, CudaSwapEngine};
use crate::swap::{BlockPair, BlockRun, SwapDirection, SwapError};

/// How a swap's runs are handed to the copy engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    /// One `cuMemcpyBatchAsync_v2` call for all runs of a swap (CUDA >= 12.8 driver).
    Batched,
    /// One `cuMemcpy{DtoH,HtoD}Async` per run (what vLLM V0 did); kept to measure the difference.
    PerRun,
}

/// One `cuMemcpyAsync` of a swap on `stream` (device -> host for Out, host -> device for In).
fn copy_async(
    direction: SwapDirection,
    dst: sys::CUdeviceptr,
    src: sys::CUdeviceptr,
    size: usize,
    stream: &CudaStream,
) -> Result<(), SwapError> {
    unsafe {
        match direction {
            SwapDirection::Out => {
                sys::cuMemcpyDtoHAsync_v2(dst as *mut _, src, size, stream.cu_stream())
            }
            SwapDirection::In => {
                sys::cuMemcpyHtoDAsync_v2(dst, src as *const _, size, stream.cu_stream())
            }
        }
        .result()
    }
    .map_err(driver("enqueueing a swap copy (cuMemcpyAsync)"))
}

impl CudaSwapEngine {
    /// Layer-major host->device copies of `pairs` (see [`Self::submit_layered`]), one batched
    /// copy and one recorded event per layer.
    pub(super) fn enqueue_layered(
        &mut self,
        stream: &CudaStream,
        pairs: &[BlockPair],
        layers: usize,
    ) -> Result<Vec<CudaEvent>, SwapError> {
        let slice_bytes = self.gpu_pool.block_bytes / layers;
        let mut events = Vec::with_capacity(layers);
        for layer in 0..layers {
            self.scratch_dsts.clear();
            self.scratch_srcs.clear();
            self.scratch_sizes.clear();
            let at = (layer * slice_bytes) as u64;
            for pair in pairs {
                self.scratch_dsts
                    .push(self.gpu_pool.block_ptr(pair.gpu_block) + at);
                self.scratch_srcs
                    .push(self.host_pool().block_addr(pair.host_block) + at);
                self.scratch_sizes.push(slice_bytes);
            }
            self.enqueue_scratch(stream, SwapDirection::In)?;
            let event = self
                .ctx
                .new_event(None)
                .map_err(driver("creating a layer-ready event"))?;
            event
                .record(stream)
                .map_err(driver("recording a layer-ready event"))?;
            events.push(event);
        }
        Ok(events)
    }

    pub(super) fn enqueue_copies(
        &mut self,
        stream: &CudaStream,
        direction: SwapDirection,
        runs: &[BlockRun],
    ) -> Result<(), SwapError> {
        if runs.is_empty() {
            return Ok(());
        }
        let block_bytes = self.gpu_pool.block_bytes;
        self.scratch_dsts.clear();
        self.scratch_srcs.clear();
        self.scratch_sizes.clear();
        for run in runs {
            let device = self.gpu_pool.block_ptr(run.gpu_first);
            let host = self.host_pool().block_addr(run.host_first);
            let (dst, src) = match direction {
                SwapDirection::Out => (host, device),
                SwapDirection::In => (device, host),
            };
            let size = run.block_count as usize * block_bytes;
            // A paced swap is cut into pieces the pace gates release one group at a time;
            // unpaced, one copy per run (cutting DMA into 1 MiB pieces changed nothing).
            let piece = self
                .paced(direction)
                .map_or(size, |pacer| pacer.piece_bytes);
            let mut at = 0;
            while at < size {
                let n = piece.min(size - at);
                self.scratch_dsts.push(dst + at as u64);
                self.scratch_srcs.push(src + at as u64);
                self.scratch_sizes.push(n);
                at += n;
            }
        }
        if let Some(pacer) = self.paced(direction) {
            let copies = self.scratch_sizes.len();
            return self.enqueue_paced(pacer, stream, direction, copies);
        }
        self.enqueue_scratch(stream, direction)
    }

    /// The scratch copies, unpaced, as the copy method says.
    pub(super) fn enqueue_scratch(
        &mut self,
        stream: &CudaStream,
        direction: SwapDirection,
    ) -> Result<(), SwapError> {
        let copies = self.scratch_sizes.len();
        if copies == 0 {
            return Ok(());
        }
        match self.copy_method {
            CopyMethod::Batched => {
                // Sources are read in stream order: a block being swapped out was written by
                // earlier work this stream was ordered after (CU_MEMCPY_SRC_ACCESS_ORDER_ANY would
                // be unsafe for that reason).
                let mut attributes: sys::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
                attributes.srcAccessOrder =
                    sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
                let mut attribute_indices = [0usize];
                unsafe {
                    sys::cuMemcpyBatchAsync_v2(
                        self.scratch_dsts.as_mut_ptr(),
                        self.scratch_srcs.as_mut_ptr(),
                        self.scratch_sizes.as_mut_ptr(),
                        copies,
                        &mut attributes,
                        attribute_indices.as_mut_ptr(),
                        1,
                        stream.cu_stream(),
                    )
                    .result()
                }
                .map_err(driver(
                    "enqueueing a batched swap copy (cuMemcpyBatchAsync_v2)",
                ))?;
            }
            CopyMethod::PerRun => self.enqueue_each(stream, direction, 0..copies)?,
        }
        Ok(())
    }

    /// The scratch copies in `range`, one `cuMemcpyAsync` each.
    pub(super) fn enqueue_each(
        &self,
        stream: &CudaStream,
        direction: SwapDirection,
        range: std::ops::Range<usize>,
    ) -> Result<(), SwapError> {
        for i in range {
            copy_async(
                direction,
                self.scratch_dsts[i],
                self.scratch_srcs[i],
                self.scratch_sizes[i],
                stream,
            )?;
        }
        Ok(())
    }
}
