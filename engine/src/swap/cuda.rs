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

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream, DriverError};

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

struct InFlightSwap {
    /// Host time of the submit call, on the run's clock.
    submit_ns: u64,
    agent_id: AgentId,
    direction: SwapDirection,
    pairs: Vec<BlockPair>,
    bytes: u64,
    start: CudaEvent,
    end: CudaEvent,
    anchor: Rc<ClockAnchor>,
}

/// Completed copies kept to count the swaps that overlapped a later one's start.
const HISTORY_LIMIT: usize = 4096;

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
        })
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
        let runs = coalesce_runs(pairs);
        self.enqueue_copies(&stream, direction, &runs)?;
        end.record(&stream)
            .map_err(driver("recording a swap's end event"))?;

        let swap_id = self.next_swap_id;
        self.next_swap_id += 1;
        self.busy.mark(swap_id, pairs);
        self.in_flight.insert(
            swap_id,
            InFlightSwap {
                submit_ns,
                agent_id,
                direction,
                pairs: pairs.to_vec(),
                bytes: pairs.len() as u64 * self.gpu_pool.block_bytes as u64,
                start,
                end,
                anchor: self.anchor.clone(),
            },
        );
        Ok(swap_id)
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
            self.scratch_dsts.push(dst);
            self.scratch_srcs.push(src);
            self.scratch_sizes
                .push(run.block_count as usize * block_bytes);
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
                        runs.len(),
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
                for i in 0..runs.len() {
                    let (dst, src, size) = (
                        self.scratch_dsts[i],
                        self.scratch_srcs[i],
                        self.scratch_sizes[i],
                    );
                    unsafe {
                        match direction {
                            SwapDirection::Out => sys::cuMemcpyDtoHAsync_v2(
                                dst as *mut _,
                                src,
                                size,
                                stream.cu_stream(),
                            ),
                            SwapDirection::In => sys::cuMemcpyHtoDAsync_v2(
                                dst,
                                src as *const _,
                                size,
                                stream.cu_stream(),
                            ),
                        }
                        .result()
                    }
                    .map_err(driver("enqueueing a swap copy (cuMemcpyAsync)"))?;
                }
            }
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
