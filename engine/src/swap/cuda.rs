//! The swap engine of the CUDA backend: a pinned host block pool, one copy stream per direction
//! (the H100 has separate copy engines for host->device and device->host, so both run at once),
//! one batched copy call per swap, completion by CUDA events that `poll` queries without waiting.
//!
//! The device pool is given as a raw `(base pointer, block bytes, block count)`
//! ([`GpuKvPoolRef`]): the GPU KV pool is one device allocation in block-major order, so block `i`
//! is the byte range `[base + i * block_bytes, base + (i + 1) * block_bytes)`.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DriverError,
    LaunchConfig, PushKernelArg,
};

use super::host_pool::HostMemory;
use super::{
    coalesce_runs, validate_pairs, AgentId, BlockPair, BlockRun, BusyBlocks, SwapDirection,
    SwapEngine, SwapError, SwapId, SwapRecord,
};

fn driver(during: &'static str) -> impl Fn(DriverError) -> SwapError {
    move |error| SwapError::Driver {
        during,
        detail: format!("{error:?}"),
    }
}

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
/// the CPU (tests, checkpoints), and both gave the same DMA rate on our machines (GPU.md 3.7).
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

/// How a swap's runs are handed to the copy engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    /// One `cuMemcpyBatchAsync_v2` call for all runs of a swap (CUDA >= 12.8 driver).
    Batched,
    /// One `cuMemcpy{DtoH,HtoD}Async` per run (what vLLM V0 did); kept to measure the difference.
    PerRun,
}

/// A host wall-clock time paired with a CUDA event recorded on an idle stream at that moment, so
/// event timestamps convert to the run's clock: `t(event) = wall_ns + elapsed(anchor, event)`.
/// Refreshed every second so the f32 milliseconds of `cuEventElapsedTime` stay precise (< 0.1 us).
struct ClockAnchor {
    event: CudaEvent,
    wall_ns: u64,
    taken_at: Instant,
}

impl ClockAnchor {
    fn event_ns(&self, event: &CudaEvent) -> Result<u64, SwapError> {
        let elapsed_ms = unsafe { result::event::elapsed(self.event.cu_event(), event.cu_event()) }
            .map_err(driver("reading a swap event's time"))?;
        Ok((self.wall_ns as i64 + (elapsed_ms as f64 * 1e6).round() as i64).max(0) as u64)
    }
}

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
struct GatherKernel {
    _module: Arc<CudaModule>,
    function: CudaFunction,
    ctas: u32,
    host_base_dev: u64,
    descriptors: *mut u32,
    descriptors_dev: u64,
    slot_pairs: usize,
    free_slots: Vec<usize>,
    ctx: Arc<CudaContext>,
}

impl Drop for GatherKernel {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        self.ctx
            .record_err(unsafe { result::free_host(self.descriptors as _) });
    }
}

pub(crate) const PACE_SOURCE: &str = r#"
// Paces one copy stream. Launched before each piece of a paced swap on that direction's stream:
// waits until the direction's release time, then moves the release time on by the piece's time
// at the cap. Stream order serialises the gates of one direction, so the word needs no atomics.
// An idle gap gives no credit (a late gate starts from now), so the rate never exceeds the cap.
extern "C" __global__ void pace_gate(unsigned long long* release_ns, unsigned long long piece_ns)
{
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    unsigned long long release = *release_ns;
    if (release < now) release = now;
    while (now < release) {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    }
    *release_ns = release + piece_ns;
}
"#;

/// Caps each copy direction's rate: a paced swap is cut into `piece_bytes` pieces, each preceded
/// on its stream by a one-thread `pace_gate` kernel that holds it back until the direction's
/// budget allows it. Why: DMA traffic costs a memory-bound decode step HBM bandwidth in
/// proportion to the bytes moved (NOTES-swap.md), so an operator can trade swap speed for step time.
struct Pacer {
    _module: Arc<CudaModule>,
    function: CudaFunction,
    /// Two device words: the release time (globaltimer ns) of the out and the in stream.
    release_words: sys::CUdeviceptr,
    /// The cap of the out and the in direction (infinite: that direction is not paced).
    bytes_per_s: [f64; 2],
    piece_bytes: usize,
    ctx: Arc<CudaContext>,
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        self.ctx
            .record_err(unsafe { result::free_sync(self.release_words) });
    }
}

/// Piece size of a paced swap. Each gate -> copy hand-over on a stream costs ~100 us on the H100
/// (8 MiB pieces capped at 42-50 GB/s all ran at ~33 GB/s, NOTES-swap.md), so pieces are large
/// enough (1.2 ms at 55 GB/s) for the cap, not the hand-over, to set the rate.
pub const DEFAULT_PACE_PIECE_BYTES: usize = 64 << 20;

struct InFlightSwap {
    /// Host time of the submit call, on the run's clock.
    submit_ns: u64,
    /// The gather kernel's descriptor slot this swap uses, if it was copied by the kernel.
    gather_slot: Option<usize>,
    agent_id: AgentId,
    direction: SwapDirection,
    pairs: Vec<BlockPair>,
    bytes: u64,
    start: CudaEvent,
    end: CudaEvent,
    anchor: Rc<ClockAnchor>,
}

fn direction_index(direction: SwapDirection) -> usize {
    match direction {
        SwapDirection::Out => 0,
        SwapDirection::In => 1,
    }
}

/// Completed copies kept to count the swaps that overlapped a later one's start.
const HISTORY_LIMIT: usize = 4096;

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

pub struct CudaSwapEngine {
    ctx: Arc<CudaContext>,
    gpu_pool: GpuKvPoolRef,
    host_pool: Option<PinnedHostPool>,
    out_stream: Arc<CudaStream>,
    in_stream: Arc<CudaStream>,
    anchor_stream: Arc<CudaStream>,
    /// The compute stream whose earlier work every swap must follow (the step that last wrote the
    /// blocks being swapped out, or last read the blocks a swap-in overwrites), and a reusable
    /// event to express that.
    order_after: Option<(Arc<CudaStream>, CudaEvent)>,
    copy_method: CopyMethod,
    /// Sets `CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE` on batched copies (a driver hint).
    prefer_overlap_with_compute: bool,
    max_in_flight: usize,
    epoch: Instant,
    anchor: Rc<ClockAnchor>,
    next_swap_id: SwapId,
    in_flight: BTreeMap<SwapId, InFlightSwap>,
    busy: BusyBlocks,
    /// (submit_ns, end_ns) of recently reported swaps.
    history: VecDeque<(u64, u64)>,
    free_events: Vec<CudaEvent>,
    scratch_dsts: Vec<sys::CUdeviceptr>,
    scratch_srcs: Vec<sys::CUdeviceptr>,
    scratch_sizes: Vec<usize>,
    /// Split DMA copies into pieces of at most this many bytes (0: one copy per run).
    dma_chunk_bytes: usize,
    swap_in_path: SwapInPath,
    gather: Option<GatherKernel>,
    /// Per-direction rate cap (None: copies run at the link's full speed).
    pacer: Option<Pacer>,
}

impl CudaSwapEngine {
    /// Builds the engine over an existing device pool and a pinned host pool whose blocks have
    /// the same size. `order_after`: the compute stream (see the field); `None` when the caller
    /// orders copies itself (benchmarks on blocks no kernel touches). Times in the records are
    /// nanoseconds since `epoch`. Events for `max_in_flight` swaps are created here, once.
    pub fn new(
        ctx: &Arc<CudaContext>,
        gpu_pool: GpuKvPoolRef,
        host_pool: PinnedHostPool,
        order_after: Option<Arc<CudaStream>>,
        copy_method: CopyMethod,
        max_in_flight: usize,
        epoch: Instant,
    ) -> Result<Self, SwapError> {
        if gpu_pool.block_bytes != host_pool.block_bytes() {
            return Err(SwapError::InvalidPool(format!(
                "device blocks are {} bytes but host blocks are {} bytes; both pools must use the same KV layout",
                gpu_pool.block_bytes,
                host_pool.block_bytes()
            )));
        }
        if max_in_flight == 0 {
            return Err(SwapError::InvalidPool(
                "max_in_flight must be at least 1".into(),
            ));
        }
        let out_stream = ctx
            .new_stream()
            .map_err(driver("creating the swap-out stream"))?;
        let in_stream = ctx
            .new_stream()
            .map_err(driver("creating the swap-in stream"))?;
        let anchor_stream = ctx
            .new_stream()
            .map_err(driver("creating the clock-anchor stream"))?;
        let order_after = match order_after {
            Some(stream) => Some((
                stream,
                ctx.new_event(None)
                    .map_err(driver("creating the ordering event"))?,
            )),
            None => None,
        };
        let mut free_events = Vec::with_capacity(2 * max_in_flight);
        for _ in 0..2 * max_in_flight {
            free_events.push(
                ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(driver("creating swap timing events"))?,
            );
        }
        let anchor = Rc::new(take_anchor(ctx, &anchor_stream, epoch)?);
        Ok(CudaSwapEngine {
            ctx: ctx.clone(),
            gpu_pool,
            host_pool: Some(host_pool),
            out_stream,
            in_stream,
            anchor_stream,
            order_after,
            copy_method,
            prefer_overlap_with_compute: false,
            max_in_flight,
            epoch,
            anchor,
            next_swap_id: 0,
            in_flight: BTreeMap::new(),
            busy: BusyBlocks::default(),
            history: VecDeque::with_capacity(HISTORY_LIMIT),
            free_events,
            scratch_dsts: Vec::new(),
            scratch_srcs: Vec::new(),
            scratch_sizes: Vec::new(),
            dma_chunk_bytes: 0,
            swap_in_path: SwapInPath::Dma,
            gather: None,
            pacer: None,
        })
    }

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

    /// Splits later DMA copies into pieces of at most `bytes` (0: one copy per run of blocks).
    pub fn set_dma_chunk_bytes(&mut self, bytes: usize) {
        self.dma_chunk_bytes = bytes;
    }

    /// Caps later DMA swaps at `gb_per_s` (10^9 bytes/s) per direction, or lifts the cap (`None`).
    /// Swaps already queued keep how they were enqueued. The gather kernel path is not paced.
    pub fn set_rate_cap(
        &mut self,
        device: &crate::cuda::GpuDevice,
        gb_per_s: Option<f64>,
    ) -> Result<(), SwapError> {
        self.set_direction_rate_cap(device, SwapDirection::Out, gb_per_s)?;
        self.set_direction_rate_cap(device, SwapDirection::In, gb_per_s)
    }

    /// Caps later DMA swaps of one direction only (`None`: that direction at full link speed), so
    /// a scheduler can pace swap-ins (the direction that costs a decode step most, NOTES-swap.md)
    /// while swap-outs run at full speed.
    pub fn set_direction_rate_cap(
        &mut self,
        device: &crate::cuda::GpuDevice,
        direction: SwapDirection,
        gb_per_s: Option<f64>,
    ) -> Result<(), SwapError> {
        let index = direction_index(direction);
        let Some(gb_per_s) = gb_per_s else {
            if let Some(pacer) = self.pacer.as_mut() {
                pacer.bytes_per_s[index] = f64::INFINITY;
                if pacer.bytes_per_s.iter().all(|cap| cap.is_infinite()) {
                    self.pacer = None;
                }
            }
            return Ok(());
        };
        if !(gb_per_s.is_finite() && gb_per_s > 0.0) {
            return Err(SwapError::InvalidPool(format!(
                "the swap rate cap must be a positive number of GB/s, got {gb_per_s}"
            )));
        }
        if self.pacer.is_none() {
            self.pacer = Some(self.build_pacer(device)?);
        }
        self.pacer.as_mut().expect("just built").bytes_per_s[index] = gb_per_s * 1e9;
        Ok(())
    }

    /// Paced swaps move in groups of at most `bytes` behind one pace gate each (default
    /// [`DEFAULT_PACE_PIECE_BYTES`]); no effect without a rate cap.
    pub fn set_pace_piece_bytes(&mut self, bytes: usize) -> Result<(), SwapError> {
        if bytes == 0 {
            return Err(SwapError::InvalidPool(
                "the pace piece must be at least one byte".into(),
            ));
        }
        if let Some(pacer) = self.pacer.as_mut() {
            pacer.piece_bytes = bytes;
        }
        Ok(())
    }

    /// Nanoseconds since the engine's epoch (the clock of its records).
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The rate cap of one direction in GB/s, if that direction is paced.
    pub fn rate_cap_gb_per_s(&self, direction: SwapDirection) -> Option<f64> {
        self.pacer
            .as_ref()
            .map(|p| p.bytes_per_s[direction_index(direction)])
            .filter(|cap| cap.is_finite())
            .map(|cap| cap / 1e9)
    }

    /// Compiles one of the swap engine's own kernels (NVRTC) and binds the context for what follows.
    fn load_swap_kernel(
        &self,
        device: &crate::cuda::GpuDevice,
        source: &str,
        name: &str,
    ) -> Result<(Arc<CudaModule>, CudaFunction), SwapError> {
        let module = device
            .compile(source, &[])
            .map_err(|e| SwapError::InvalidPool(format!("compiling the `{name}` kernel: {e}")))?;
        let function = device
            .function(&module, name)
            .map_err(|e| SwapError::InvalidPool(format!("loading the `{name}` kernel: {e}")))?;
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        Ok((module, function))
    }

    fn build_pacer(&self, device: &crate::cuda::GpuDevice) -> Result<Pacer, SwapError> {
        let (module, function) = self.load_swap_kernel(device, PACE_SOURCE, "pace_gate")?;
        let release_words = unsafe { result::malloc_sync(16) }
            .map_err(driver("allocating the pace kernel's release words"))?;
        unsafe { result::memset_d8_sync(release_words, 0, 16) }
            .map_err(driver("clearing the pace kernel's release words"))?;
        // A legacy-stream memset: finished before any kernel reads the words.
        crate::cuda::finish_legacy_stream()
            .map_err(driver("clearing the pace kernel's release words"))?;
        Ok(Pacer {
            _module: module,
            function,
            release_words,
            bytes_per_s: [f64::INFINITY; 2],
            piece_bytes: DEFAULT_PACE_PIECE_BYTES,
            ctx: self.ctx.clone(),
        })
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
    fn enqueue_gather(
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

    pub fn gpu_pool(&self) -> GpuKvPoolRef {
        self.gpu_pool
    }

    pub fn host_pool(&self) -> &PinnedHostPool {
        self.host_pool
            .as_ref()
            .expect("the host pool lives as long as the engine")
    }

    /// The host pool, writable; only for blocks no swap holds (tests and checkpoint loading).
    pub fn host_pool_mut(&mut self) -> &mut PinnedHostPool {
        self.host_pool
            .as_mut()
            .expect("the host pool lives as long as the engine")
    }

    /// Waits for every copy, then hands the pinned pool back (pinning is slow: a benchmark moves
    /// one pool between engines over different device pools).
    pub fn into_host_pool(mut self) -> Result<PinnedHostPool, SwapError> {
        self.wait_all()?;
        Ok(self
            .host_pool
            .take()
            .expect("the host pool lives as long as the engine"))
    }

    pub fn copy_method(&self) -> CopyMethod {
        self.copy_method
    }

    /// Asks the driver (batched copies only) to prefer overlapping the copies with compute.
    pub fn set_prefer_overlap_with_compute(&mut self, prefer: bool) {
        self.prefer_overlap_with_compute = prefer;
    }

    /// Changes how later swaps are enqueued (benchmarks compare the two).
    pub fn set_copy_method(&mut self, copy_method: CopyMethod) {
        self.copy_method = copy_method;
    }

    pub fn stream(&self, direction: SwapDirection) -> &Arc<CudaStream> {
        match direction {
            SwapDirection::Out => &self.out_stream,
            SwapDirection::In => &self.in_stream,
        }
    }

    /// Enqueues the copies of one swap on its direction's stream and returns at once.
    pub fn submit(
        &mut self,
        agent_id: AgentId,
        direction: SwapDirection,
        pairs: &[BlockPair],
    ) -> Result<SwapId, SwapError> {
        self.submit_inner(agent_id, direction, pairs, None)
            .map(|(swap_id, _)| swap_id)
    }

    /// A swap-in copied layer by layer (per-layer readiness): every block is `layers` slices of
    /// `block_bytes / layers` bytes (the block-major KV layout keeps one layer's K and V of a
    /// block contiguous), and layer `l`'s slices of all blocks are copied before layer `l + 1`'s,
    /// one batched copy per layer. Returns the swap and one event per layer, recorded on the
    /// swap-in stream after that layer's copy: `CudaModel::gate_next_step_on_layers` makes a step
    /// wait for each layer's event on the GPU, so a prefill starts while later layers still arrive.
    /// The swap is reported complete (and its blocks released) as any other. DMA only: neither the
    /// gather kernel nor a swap-in rate cap applies.
    pub fn submit_layered(
        &mut self,
        agent_id: AgentId,
        pairs: &[BlockPair],
        layers: usize,
    ) -> Result<(SwapId, Vec<CudaEvent>), SwapError> {
        if layers == 0 || self.gpu_pool.block_bytes % layers != 0 {
            return Err(SwapError::InvalidPool(format!(
                "blocks of {} bytes cannot be cut into {layers} equal layer slices",
                self.gpu_pool.block_bytes
            )));
        }
        if self.swap_in_path != SwapInPath::Dma || self.paced(SwapDirection::In).is_some() {
            return Err(SwapError::InvalidPool(
                "a layer-by-layer swap-in needs the DMA swap-in path without a swap-in rate cap"
                    .into(),
            ));
        }
        self.submit_inner(agent_id, SwapDirection::In, pairs, Some(layers))
    }

    fn submit_inner(
        &mut self,
        agent_id: AgentId,
        direction: SwapDirection,
        pairs: &[BlockPair],
        layers: Option<usize>,
    ) -> Result<(SwapId, Vec<CudaEvent>), SwapError> {
        validate_pairs(
            pairs,
            self.gpu_pool.block_count,
            self.host_pool().block_count(),
        )?;
        self.busy.check_free(pairs)?;
        if self.in_flight.len() >= self.max_in_flight {
            return Err(SwapError::TooManyInFlight {
                limit: self.max_in_flight,
            });
        }
        if self.anchor.taken_at.elapsed() > Duration::from_secs(1) {
            // New swaps measure against a fresh anchor; swaps in flight keep theirs (Rc).
            self.anchor = Rc::new(take_anchor(&self.ctx, &self.anchor_stream, self.epoch)?);
        }
        let stream = match direction {
            SwapDirection::Out => self.out_stream.clone(),
            SwapDirection::In => self.in_stream.clone(),
        };
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        let submit_ns = self.epoch.elapsed().as_nanos() as u64;
        if let Some((compute, event)) = &self.order_after {
            event
                .record(compute)
                .map_err(driver("recording the compute-stream ordering event"))?;
            stream
                .wait(event)
                .map_err(driver("ordering the copy stream after the compute stream"))?;
        }
        let start = self
            .free_events
            .pop()
            .expect("two events per allowed in-flight swap");
        let end = self
            .free_events
            .pop()
            .expect("two events per allowed in-flight swap");
        start
            .record(&stream)
            .map_err(driver("recording a swap's start event"))?;
        let mut layer_events = Vec::new();
        let gather_slot = if direction == SwapDirection::In && layers.is_none() {
            self.enqueue_gather(&stream, pairs)?
        } else {
            None
        };
        if let Some(layers) = layers {
            layer_events = self.enqueue_layered(&stream, pairs, layers)?;
        } else if gather_slot.is_none() {
            let runs = coalesce_runs(pairs);
            self.enqueue_copies(&stream, direction, &runs)?;
        }
        end.record(&stream)
            .map_err(driver("recording a swap's end event"))?;

        let swap_id = self.next_swap_id;
        self.next_swap_id += 1;
        self.busy.mark(swap_id, pairs);
        self.in_flight.insert(
            swap_id,
            InFlightSwap {
                submit_ns,
                gather_slot,
                agent_id,
                direction,
                pairs: pairs.to_vec(),
                bytes: pairs.len() as u64 * self.gpu_pool.block_bytes as u64,
                start,
                end,
                anchor: self.anchor.clone(),
            },
        );
        Ok((swap_id, layer_events))
    }

    /// Layer-major host->device copies of `pairs` (see [`Self::submit_layered`]), one batched
    /// copy and one recorded event per layer.
    fn enqueue_layered(
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

    /// The pacer, if `direction` has a rate cap.
    fn paced(&self, direction: SwapDirection) -> Option<&Pacer> {
        self.pacer
            .as_ref()
            .filter(|p| p.bytes_per_s[direction_index(direction)].is_finite())
    }

    fn enqueue_copies(
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
            let paced = self.paced(direction);
            let piece = match (paced, self.dma_chunk_bytes) {
                (Some(pacer), _) => pacer.piece_bytes,
                (None, 0) => size,
                (None, chunk) => chunk,
            };
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
    fn enqueue_scratch(
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
                if self.prefer_overlap_with_compute {
                    attributes.flags =
                        sys::CUmemcpyFlags::CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE as u32;
                }
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
            CopyMethod::PerRun => {
                for i in 0..copies {
                    copy_async(
                        direction,
                        self.scratch_dsts[i],
                        self.scratch_srcs[i],
                        self.scratch_sizes[i],
                        stream,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The scratch copies in groups of at most `piece_bytes` (scattered blocks are one copy each),
    /// each group behind one pace gate on the same stream.
    fn enqueue_paced(
        &self,
        pacer: &Pacer,
        stream: &CudaStream,
        direction: SwapDirection,
        copies: usize,
    ) -> Result<(), SwapError> {
        let release_word = pacer.release_words
            + match direction {
                SwapDirection::Out => 0,
                SwapDirection::In => 8,
            };
        let mut first = 0;
        while first < copies {
            let mut group_end = first + 1;
            let mut group_bytes = self.scratch_sizes[first];
            while group_end < copies
                && group_bytes + self.scratch_sizes[group_end] <= pacer.piece_bytes
            {
                group_bytes += self.scratch_sizes[group_end];
                group_end += 1;
            }
            let group_ns = (group_bytes as f64 / pacer.bytes_per_s[direction_index(direction)]
                * 1e9)
                .round() as u64;
            let mut launch = stream.launch_builder(&pacer.function);
            launch.arg(&release_word).arg(&group_ns);
            unsafe {
                launch.launch(LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (1, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(driver("launching a swap pace gate"))?;
            for i in first..group_end {
                copy_async(
                    direction,
                    self.scratch_dsts[i],
                    self.scratch_srcs[i],
                    self.scratch_sizes[i],
                    stream,
                )?;
            }
            first = group_end;
        }
        Ok(())
    }

    /// Blocks until one swap's copies finished, then polls (returns every completion found).
    pub fn wait(&mut self, swap_id: SwapId) -> Result<Vec<SwapRecord>, SwapError> {
        match self.in_flight.get(&swap_id) {
            Some(swap) => swap
                .end
                .synchronize()
                .map_err(driver("waiting for a swap"))?,
            None if swap_id < self.next_swap_id => {}
            None => return Err(SwapError::UnknownSwap(swap_id)),
        }
        self.poll()
    }

    /// Swaps in flight when a copy began at `start_ns`, this one included (the definition of
    /// `traces::SwapRecord::concurrent_swaps_at_start`): every swap submitted by then whose copy
    /// had not ended, whatever its direction and whether it was copying or queued.
    fn concurrent_at(&self, swap_id: SwapId, start_ns: u64) -> Result<u32, SwapError> {
        let mut count = 1 + self
            .history
            .iter()
            .filter(|(submit, end)| *submit <= start_ns && start_ns < *end)
            .count();
        for (other_id, other) in &self.in_flight {
            if *other_id == swap_id || other.submit_ns > start_ns {
                continue;
            }
            let running = if other
                .end
                .try_is_complete()
                .map_err(driver("querying a swap event"))?
            {
                start_ns < other.anchor.event_ns(&other.end)?
            } else {
                true
            };
            count += running as usize;
        }
        Ok(count as u32)
    }
}

fn take_anchor(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    epoch: Instant,
) -> Result<ClockAnchor, SwapError> {
    let event = ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver("creating a clock-anchor event"))?;
    let before_ns = epoch.elapsed().as_nanos() as u64;
    event
        .record(stream)
        .map_err(driver("recording a clock-anchor event"))?;
    event
        .synchronize()
        .map_err(driver("waiting for a clock-anchor event"))?;
    let after_ns = epoch.elapsed().as_nanos() as u64;
    Ok(ClockAnchor {
        event,
        wall_ns: before_ns + (after_ns - before_ns) / 2,
        taken_at: Instant::now(),
    })
}

impl SwapEngine for CudaSwapEngine {
    fn is_complete(&mut self, swap_id: SwapId) -> Result<bool, SwapError> {
        match self.in_flight.get(&swap_id) {
            Some(swap) => swap
                .end
                .try_is_complete()
                .map_err(driver("querying a swap's end event")),
            None if swap_id < self.next_swap_id => Ok(true),
            None => Err(SwapError::UnknownSwap(swap_id)),
        }
    }

    fn poll(&mut self) -> Result<Vec<SwapRecord>, SwapError> {
        let mut done = Vec::new();
        for (swap_id, swap) in &self.in_flight {
            if swap
                .end
                .try_is_complete()
                .map_err(driver("querying a swap's end event"))?
            {
                done.push(*swap_id);
            }
        }
        let mut records = Vec::with_capacity(done.len());
        for swap_id in done {
            let (start_ns, end_ns) = {
                let swap = &self.in_flight[&swap_id];
                (
                    swap.anchor.event_ns(&swap.start)?,
                    swap.anchor.event_ns(&swap.end)?,
                )
            };
            let concurrent_swaps_at_start = self.concurrent_at(swap_id, start_ns)?;
            let swap = self.in_flight.remove(&swap_id).expect("listed above");
            self.busy.release(swap_id, &swap.pairs);
            if let (Some(slot), Some(gather)) = (swap.gather_slot, self.gather.as_mut()) {
                gather.free_slots.push(slot);
            }
            if self.history.len() == HISTORY_LIMIT {
                self.history.pop_front();
            }
            self.history.push_back((swap.submit_ns, end_ns));
            records.push(SwapRecord {
                swap_id,
                agent_id: swap.agent_id,
                direction: swap.direction,
                block_count: swap.pairs.len() as u32,
                bytes: swap.bytes,
                start_ns,
                end_ns,
                concurrent_swaps_at_start,
            });
            self.free_events.push(swap.start);
            self.free_events.push(swap.end);
        }
        Ok(records)
    }

    fn wait_all(&mut self) -> Result<Vec<SwapRecord>, SwapError> {
        self.out_stream
            .synchronize()
            .map_err(driver("waiting for the swap-out stream"))?;
        self.in_stream
            .synchronize()
            .map_err(driver("waiting for the swap-in stream"))?;
        let records = self.poll()?;
        debug_assert!(self.in_flight.is_empty());
        Ok(records)
    }

    fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    fn busy_swap_of_gpu_block(&self, gpu_block: u32) -> Option<SwapId> {
        self.busy.gpu_block_owner(gpu_block)
    }

    fn check_drop(&self, gpu_blocks: &[u32], host_blocks: &[u32]) -> Result<(), SwapError> {
        self.busy.check_gpu_free(gpu_blocks)?;
        self.busy.check_host_free(host_blocks)
    }
}

impl Drop for CudaSwapEngine {
    fn drop(&mut self) {
        // The host pool is freed after this; no DMA may still target it.
        self.ctx.record_err(self.out_stream.synchronize());
        self.ctx.record_err(self.in_stream.synchronize());
    }
}
