//! The swap-in gather kernel: an alternative to the copy engine for host->device swaps, where a
//! few CTAs read the pinned host blocks through their mapped device address. Measured slower and
//! costlier to a concurrent decode step than DMA (docs/engine-swap.md); kept selectable for the
//! run loop (`djinn engine run --swap-in-copy kernel`) and checked bit-exact by `swap-check`.

use std::sync::Arc;

use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};

use super::{driver, CudaSwapEngine};
use crate::swap::{BlockPair, SwapError};

/// How swap-ins are copied (swap-outs always use the DMA path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SwapInPath {
    /// The copy engine (DMA), as `CopyMethod` says.
    Dma,
    /// The gather kernel: `ctas` thread blocks on the swap-in stream read the pinned host blocks
    /// through their mapped device address with 16-byte loads and write whole 128-byte lines of
    /// the device blocks (streaming stores). Its CTAs compete with the forward's kernels for SMs,
    /// so the forward's stream should have a higher priority ([`high_priority_stream`]).
    Kernel { ctas: u32 },
}

/// A non-blocking stream at the device's greatest priority (for the forward, so that the swap-in
/// gather kernel's CTAs, at the default lowest priority, yield SMs to it).
pub fn high_priority_stream(ctx: &Arc<CudaContext>) -> Result<Arc<CudaStream>, SwapError> {
    ctx.bind_to_thread()
        .map_err(driver("binding the context for a priority stream"))?;
    let (_least, greatest) = result::stream::get_priority_range()
        .map_err(driver("reading the stream priority range"))?;
    ctx.new_stream_with_priority(greatest)
        .map_err(driver("creating a high-priority stream"))
}

const GATHER_SOURCE: &str = r#"
// Copies pinned host blocks to device blocks: work item w = (pair w / chunks, chunk w % chunks);
// a persistent grid of few CTAs walks the items. Each warp loads 512 contiguous bytes per
// instruction (16 B per thread) from mapped host memory and stores them with evict-first stores.
extern "C" __global__ void gather_blocks(
    const unsigned int* __restrict__ pairs, unsigned int pair_count,
    const uint4* __restrict__ host_base, uint4* __restrict__ dev_base,
    unsigned long long block_vecs, unsigned int chunk_vecs)
{
    __shared__ unsigned int pair[2];
    const unsigned long long chunks = (block_vecs + chunk_vecs - 1) / chunk_vecs;
    const unsigned long long total = chunks * pair_count;
    for (unsigned long long w = blockIdx.x; w < total; w += gridDim.x) {
        const unsigned int p = (unsigned int)(w / chunks);
        const unsigned long long c = w % chunks;
        __syncthreads();
        if (threadIdx.x < 2) pair[threadIdx.x] = pairs[2 * p + threadIdx.x];
        __syncthreads();
        const unsigned long long first = c * chunk_vecs;
        const unsigned long long left = block_vecs - first;
        const unsigned long long n = left < chunk_vecs ? left : chunk_vecs;
        const uint4* src = host_base + (unsigned long long)pair[1] * block_vecs + first;
        uint4* dst = dev_base + (unsigned long long)pair[0] * block_vecs + first;
        for (unsigned long long i = threadIdx.x; i < n; i += 8ull * blockDim.x) {
            uint4 v[8];
            #pragma unroll
            for (int k = 0; k < 8; k++) {
                unsigned long long j = i + (unsigned long long)k * blockDim.x;
                if (j < n) v[k] = src[j];
            }
            #pragma unroll
            for (int k = 0; k < 8; k++) {
                unsigned long long j = i + (unsigned long long)k * blockDim.x;
                if (j < n) __stcs(dst + j, v[k]);
            }
        }
    }
}
"#;

/// Bytes of host blocks one gather work item copies.
const GATHER_CHUNK_BYTES: usize = 64 << 10;
const GATHER_THREADS: u32 = 256;
/// CTAs of the gather kernel by default: each keeps 32 KiB of PCIe reads in flight, so a few
/// cover the PCIe latency-bandwidth product (~100 KB); more only take SMs from the forward.
pub const DEFAULT_GATHER_CTAS: u32 = 16;

/// The swap-in gather kernel and its descriptor slots (block pairs in mapped pinned memory, one
/// slot per swap in flight, reused once the swap is reported).
pub(super) struct GatherKernel {
    _module: Arc<CudaModule>,
    function: CudaFunction,
    ctas: u32,
    host_base_dev: u64,
    descriptors: *mut u32,
    descriptors_dev: u64,
    slot_pairs: usize,
    pub(super) free_slots: Vec<usize>,
    ctx: Arc<CudaContext>,
}

impl Drop for GatherKernel {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        self.ctx
            .record_err(unsafe { result::free_host(self.descriptors as _) });
    }
}

impl CudaSwapEngine {
    /// Compiles the swap-in gather kernel and sets up its descriptor slots (once); later swap-ins
    /// use it (see [`SwapInPath::Kernel`]). The host pool's blocks are read through their device
    /// address (unified addressing maps all `cuMemHostAlloc` memory).
    pub fn enable_kernel_swap_in(
        &mut self,
        device: &crate::cuda::GpuDevice,
    ) -> Result<(), SwapError> {
        self.set_swap_in_path(
            device,
            SwapInPath::Kernel {
                ctas: DEFAULT_GATHER_CTAS,
            },
        )
    }

    /// Chooses how later swap-ins are copied; no swap may be in flight.
    pub fn set_swap_in_path(
        &mut self,
        device: &crate::cuda::GpuDevice,
        path: SwapInPath,
    ) -> Result<(), SwapError> {
        if !self.in_flight.is_empty() {
            return Err(SwapError::InvalidPool(
                "the swap-in path can only change while no swap is in flight".into(),
            ));
        }
        if let SwapInPath::Kernel { ctas } = path {
            if ctas == 0 {
                return Err(SwapError::InvalidPool(
                    "the gather kernel needs at least one CTA".into(),
                ));
            }
            if self.gpu_pool.block_bytes % 16 != 0 {
                return Err(SwapError::InvalidPool(format!(
                    "the gather kernel copies 16-byte vectors; blocks of {} bytes are not a multiple of 16",
                    self.gpu_pool.block_bytes
                )));
            }
            if self.gather.is_none() {
                self.gather = Some(self.build_gather(device)?);
            }
            self.gather.as_mut().expect("just built").ctas = ctas;
        }
        self.swap_in_path = path;
        Ok(())
    }

    pub fn swap_in_path(&self) -> SwapInPath {
        self.swap_in_path
    }
    fn build_gather(&self, device: &crate::cuda::GpuDevice) -> Result<GatherKernel, SwapError> {
        let (module, function) = self.load_swap_kernel(device, GATHER_SOURCE, "gather_blocks")?;
        let mut host_base_dev: sys::CUdeviceptr = 0;
        unsafe {
            sys::cuMemHostGetDevicePointer_v2(
                &mut host_base_dev,
                self.host_pool().block_addr(0) as *mut _,
                0,
            )
            .result()
        }
        .map_err(driver(
            "mapping the pinned host pool into the device address space",
        ))?;
        let slot_pairs = (self
            .gpu_pool
            .block_count
            .min(self.host_pool().block_count())) as usize;
        let slots = self.max_in_flight;
        let bytes = slots * slot_pairs * 2 * 4;
        let descriptors = unsafe { result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(driver("allocating the gather kernel's descriptor slots"))?
            as *mut u32;
        let mut descriptors_dev: sys::CUdeviceptr = 0;
        unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut descriptors_dev, descriptors as *mut _, 0)
                .result()
        }
        .map_err(driver("mapping the descriptor slots"))?;
        Ok(GatherKernel {
            _module: module,
            function,
            ctas: 1,
            host_base_dev,
            descriptors,
            descriptors_dev,
            slot_pairs,
            free_slots: (0..slots).rev().collect(),
            ctx: self.ctx.clone(),
        })
    }

    /// Enqueues the gather kernel for `pairs` on `stream` if the swap-in path says so and a slot
    /// is free; returns the slot used, or `None` when the DMA path must copy instead.
    pub(super) fn enqueue_gather(
        &mut self,
        stream: &CudaStream,
        pairs: &[BlockPair],
    ) -> Result<Option<usize>, SwapError> {
        let SwapInPath::Kernel { ctas } = self.swap_in_path else {
            return Ok(None);
        };
        let block_bytes = self.gpu_pool.block_bytes;
        let device_base = self.gpu_pool.base;
        let Some(gather) = self.gather.as_mut() else {
            return Ok(None);
        };
        if pairs.is_empty() || pairs.len() > gather.slot_pairs {
            return Ok(None);
        }
        let Some(slot) = gather.free_slots.pop() else {
            return Ok(None);
        };
        // SAFETY: the slot is free (its last swap was reported, so its kernel finished).
        let words = unsafe {
            std::slice::from_raw_parts_mut(
                gather.descriptors.add(slot * gather.slot_pairs * 2),
                pairs.len() * 2,
            )
        };
        for (i, pair) in pairs.iter().enumerate() {
            words[2 * i] = pair.gpu_block;
            words[2 * i + 1] = pair.host_block;
        }
        let descriptors = gather.descriptors_dev + (slot * gather.slot_pairs * 2 * 4) as u64;
        let pair_count = pairs.len() as u32;
        let block_vecs = (block_bytes / 16) as u64;
        let chunk_vecs = (GATHER_CHUNK_BYTES.min(block_bytes) / 16) as u32;
        let work = (block_vecs.div_ceil(chunk_vecs as u64)) * pair_count as u64;
        let grid = (ctas as u64).min(work).max(1) as u32;
        let mut launch = stream.launch_builder(&gather.function);
        launch
            .arg(&descriptors)
            .arg(&pair_count)
            .arg(&gather.host_base_dev)
            .arg(&device_base)
            .arg(&block_vecs)
            .arg(&chunk_vecs);
        let launched = unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (GATHER_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        };
        if let Err(e) = launched {
            gather.free_slots.push(slot);
            return Err(driver("launching the swap-in gather kernel")(e));
        }
        Ok(Some(slot))
    }
}
