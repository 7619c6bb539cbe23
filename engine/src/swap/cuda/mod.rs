//! The swap engine of the CUDA backend: a pinned host block pool, one copy stream per direction
//! (the H100 has separate copy engines for host->device and device->host, so both run at once),
//! one batched copy call per swap, completion by CUDA events that `poll` queries without waiting.
//!
//! The device pool is given as a raw `(base pointer, block bytes, block count)`
//! ([`GpuKvPoolRef`]): the GPU KV pool is one device allocation in block-major order, so block `i`
//! is the byte range `[base + i * block_bytes, base + (i + 1) * block_bytes)`.
//!
//! By concern: `pools` (the device pool reference and the pinned host pool), `clock` (event times
//! on the run's clock), `copies` (how a swap's copies are enqueued), `pace` (per-direction rate
//! caps), `gather` (the optional swap-in copy kernel); this file holds the engine's bookkeeping:
//! submit, busy blocks, completion polling and records.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DriverError,
};

use super::{
    coalesce_runs, validate_pairs, AgentId, BlockPair, BusyBlocks, SwapDirection, SwapEngine,
    SwapError, SwapId, SwapRecord,
};

mod clock;
mod copies;
mod gather;
mod pace;
mod pools;

use clock::{take_anchor, ClockAnchor};
pub use copies::CopyMethod;
use gather::GatherKernel;
pub use gather::{high_priority_stream, SwapInPath, DEFAULT_GATHER_CTAS};
use pace::Pacer;
pub use pace::DEFAULT_PACE_PIECE_BYTES;
pub(crate) use pace::PACE_SOURCE;
pub use pools::{GpuKvPoolRef, PinnedHostPool};

fn driver(during: &'static str) -> impl Fn(DriverError) -> SwapError {
    move |error| SwapError::Driver {
        during,
        detail: format!("{error:?}"),
    }
}

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
            swap_in_path: SwapInPath::Dma,
            gather: None,
            pacer: None,
        })
    }

    /// Nanoseconds since the engine's epoch (the clock of its records).
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
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
