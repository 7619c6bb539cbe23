//! The aggressors of the interference probe: what runs beside the victim (swap loads, SM kernels
//! writing or reading HBM, raw and staged DMA), each enqueued in timed units on low-priority
//! streams, and the bytes each moved.

use std::sync::Arc;

use cudarc::driver::{sys, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::super::decode::{SwapLoad, SwapPump};
use super::super::transfers::SwapTraffic;
use super::super::{driver, SwapBenchError};
use crate::cuda::{DeviceBuffer, GpuDevice};
use crate::swap::cuda::{CudaSwapEngine, GpuKvPoolRef, PinnedHostPool};
use crate::swap::{SwapDirection, SwapEngine, SwapRecord};

const AGGRESSOR_SOURCE: &str = r#"
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Moves `vecs` 16-byte vectors of `region` (`region_chunks` chunks, wrapping) starting at chunk
// `first_chunk`: writes (a pattern from
// registers, no source reads) or reads (xor-folded into a sink that is practically never written).
// Work is cut in chunks of blockDim.x * 8 vectors (64 KiB at 512 threads), chunk c to CTA
// c % gridDim.x; chunk c is released at t0 + (c - c % burst_chunks) * chunk_ns (chunk_ns = 0:
// unpaced), so the kernel moves bytes at a steady average rate whatever the number of CTAs, either
// smoothly (burst_chunks = 1) or in bursts of burst_chunks chunks moved as fast as the CTAs can. A warp's 8 accesses each cover
// 512 contiguous bytes: whole 128-byte lines.
extern "C" __global__ void paced_lines(uint4* __restrict__ region, unsigned long long region_chunks,
                                       unsigned long long first_chunk, unsigned long long vecs,
                                       unsigned long long chunk_ns, unsigned long long burst_chunks,
                                       int write, unsigned int* sink)
{
    __shared__ unsigned long long t0;
    if (threadIdx.x == 0) t0 = global_ns();
    __syncthreads();
    const unsigned long long chunk = (unsigned long long)blockDim.x * 8ull;
    const unsigned long long chunks = (vecs + chunk - 1) / chunk;
    unsigned int acc = 0;
    for (unsigned long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        if (chunk_ns != 0) {
            if (threadIdx.x == 0) {
                const unsigned long long release = t0 + (c - c % burst_chunks) * chunk_ns;
                while (global_ns() < release) __nanosleep(256);
            }
            __syncthreads();
        }
        const unsigned long long base = c * chunk;
        uint4* at = region + ((first_chunk + c) % region_chunks) * chunk;
        if (write) {
            #pragma unroll
            for (int j = 0; j < 8; j++) {
                const unsigned long long i = base + (unsigned long long)j * blockDim.x + threadIdx.x;
                if (i < vecs) {
                    at[j * blockDim.x + threadIdx.x] = make_uint4((unsigned int)i, (unsigned int)c, j, threadIdx.x);
                }
            }
        } else {
            uint4 v[8];
            #pragma unroll
            for (int j = 0; j < 8; j++) {
                const unsigned long long i = base + (unsigned long long)j * blockDim.x + threadIdx.x;
                v[j] = i < vecs ? __ldcs(at + j * blockDim.x + threadIdx.x) : make_uint4(0, 0, 0, 0);
            }
            #pragma unroll
            for (int j = 0; j < 8; j++) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
        }
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}

// One staged piece: `vecs` 16-byte vectors from the staging slot (just written by the copy
// engine, read at L2 with .cg loads) to the destination, whole lines per warp instruction.
extern "C" __global__ void stage_copy(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                      unsigned long long vecs)
{
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x * 8ull;
    for (unsigned long long base = (unsigned long long)blockIdx.x * blockDim.x * 8ull; base < vecs; base += step) {
        uint4 v[8];
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            const unsigned long long i = base + (unsigned long long)j * blockDim.x + threadIdx.x;
            if (i < vecs) v[j] = __ldcg(src + i);
        }
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            const unsigned long long i = base + (unsigned long long)j * blockDim.x + threadIdx.x;
            if (i < vecs) dst[i] = v[j];
        }
    }
}
"#;

pub(super) const AGGRESSOR_THREADS: u32 = 512;
/// Bytes of one `paced_lines` chunk (see the kernel).
pub(super) const LINE_CHUNK_BYTES: u64 = AGGRESSOR_THREADS as u64 * 8 * 16;

/// Bytes and times an aggressor moved during the busy phases of one arm.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Moved {
    bytes: u64,
    /// Sum of the units' own times (the rate while running).
    active_ns: u64,
    /// From the first unit's start to the last unit's end, per phase, summed.
    span_ns: u64,
}

impl Moved {
    pub(super) fn add(&mut self, other: Moved) {
        self.bytes += other.bytes;
        self.active_ns += other.active_ns;
        self.span_ns += other.span_ns;
    }
    pub(super) fn describe(&self) -> String {
        format!(
            "{:.2} GB moved at {:.1} GB/s while running, {:.1} GB/s over its busy spans",
            self.bytes as f64 / 1e9,
            self.bytes as f64 / self.active_ns.max(1) as f64,
            self.bytes as f64 / self.span_ns.max(1) as f64
        )
    }
}

/// Units of aggressor work on its stream(s), each timed by a start and an end event.
#[derive(Default)]
pub(super) struct Units {
    pending: Vec<(u64, CudaEvent, CudaEvent)>,
}

impl Units {
    fn in_flight(&self) -> Result<usize, SwapBenchError> {
        let mut n = 0;
        for (_, _, end) in &self.pending {
            if !end
                .try_is_complete()
                .map_err(driver("querying an aggressor event"))?
            {
                n += 1;
            }
        }
        Ok(n)
    }

    pub(super) fn drain(&mut self) -> Result<Moved, SwapBenchError> {
        let mut moved = Moved::default();
        let Some((_, first_start, _)) = self.pending.first() else {
            return Ok(moved);
        };
        let mut span_ms = 0.0f64;
        for (bytes, start, end) in &self.pending {
            end.synchronize()
                .map_err(driver("waiting for aggressor work"))?;
            let ms = start
                .elapsed_ms(end)
                .map_err(driver("timing aggressor work"))? as f64;
            moved.bytes += bytes;
            moved.active_ns += (ms * 1e6) as u64;
            span_ms = span_ms.max(
                first_start
                    .elapsed_ms(end)
                    .map_err(driver("timing aggressor work"))? as f64,
            );
        }
        moved.span_ns = (span_ms * 1e6) as u64;
        self.pending.clear();
        Ok(moved)
    }
}

fn timing_event(stream: &Arc<CudaStream>) -> Result<CudaEvent, SwapBenchError> {
    stream
        .context()
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver("creating an event"))
}

/// Device and host memory the aggressors may overwrite and read: `read_*` holds bytes nobody
/// needs, `write_*` may be overwritten (the upper half of the swap blocks, which swap-ins
/// overwrite anyway).
#[derive(Clone, Copy)]
pub(super) struct Scratch {
    device_read: u64,
    device_write: u64,
    device_bytes: u64,
    host_read: u64,
    host_bytes: u64,
}

pub(super) enum Aggressor {
    /// The swap engine with a load and per-direction caps (GB/s; None: full speed).
    Swaps {
        load: SwapLoad,
        out_cap: Option<f64>,
        in_cap: Option<f64>,
    },
    /// `paced_lines` with `ctas` CTAs at `gb_per_s`.
    Lines {
        write: bool,
        ctas: u32,
        gb_per_s: f64,
        /// Bytes released at once (LINE_CHUNK_BYTES: smooth).
        burst: u64,
    },
    /// Device->device DMA in `piece` byte copies, each behind a pace gate at `gb_per_s`.
    DeviceCopyPaced { piece: u64, gb_per_s: f64 },
    /// Host->device DMA in 64 MiB copies at full speed, destination offset by `dst_offset` bytes.
    HostCopy { dst_offset: u64 },
    /// DMA into a ring of `slots` x `piece` bytes, `ctas`-CTA copy kernel to the destination.
    Staged {
        slots: usize,
        piece: u64,
        ctas: u32,
        persisting: bool,
    },
}

impl Aggressor {
    pub(super) fn label(&self) -> String {
        match self {
            Aggressor::Swaps {
                load,
                out_cap,
                in_cap,
            } => {
                let cap = |c: &Option<f64>| c.map_or("full speed".to_string(), |g| format!("capped {g} GB/s"));
                format!(
                    "swap engine DMA: {} (out {}, in {})",
                    load.label(),
                    cap(out_cap),
                    cap(in_cap)
                )
            }
            Aggressor::Lines {
                write,
                ctas,
                gb_per_s,
                burst,
            } => format!(
                "SM kernel {} whole lines of HBM, {ctas} CTAs x {AGGRESSOR_THREADS} threads at the lowest priority, paced to {gb_per_s} GB/s{}",
                if *write { "WRITING (data from registers)" } else { "READING" },
                if *burst > LINE_CHUNK_BYTES {
                    format!(" in bursts of {} KiB", burst >> 10)
                } else {
                    " smoothly (64 KiB pieces)".into()
                }
            ),
            Aggressor::DeviceCopyPaced { piece, gb_per_s } => format!(
                "DMA device->device (reads + writes HBM), {} MiB copies paced to {gb_per_s} GB/s",
                piece >> 20
            ),
            Aggressor::HostCopy { dst_offset } => format!(
                "DMA host->device raw 64 MiB copies, full speed, destination offset {dst_offset} B"
            ),
            Aggressor::Staged {
                slots,
                piece,
                ctas,
                persisting,
            } => format!(
                "staged swap-in: DMA into a {slots} x {} KiB device ring, {ctas}-CTA copy kernel to the destination{}",
                piece >> 10,
                if *persisting { ", L2 persisting window on the ring" } else { "" }
            ),
        }
    }
}

/// The aggressors' kernels and streams.
pub(super) struct Kit {
    lines: CudaFunction,
    stage: CudaFunction,
    pace: CudaFunction,
    _modules: Vec<Arc<cudarc::driver::CudaModule>>,
    /// Lowest-priority streams for aggressor work (two: a DMA stream and a kernel stream).
    stream_a: Arc<CudaStream>,
    stream_b: Arc<CudaStream>,
    release_word: DeviceBuffer,
    sink: DeviceBuffer,
    ring: DeviceBuffer,
}

const RING_BYTES_MAX: usize = 16 << 20;

impl Kit {
    pub(super) fn new(device: &GpuDevice) -> Result<Self, SwapBenchError> {
        let module = device.compile(AGGRESSOR_SOURCE, &[])?;
        let lines = device.function(&module, "paced_lines")?;
        let stage = device.function(&module, "stage_copy")?;
        let pace_module = device.compile(crate::swap::cuda::PACE_SOURCE, &[])?;
        let pace = device.function(&pace_module, "pace_gate")?;
        let ctx = &device.ctx;
        let (least, _greatest) = cudarc::driver::result::stream::get_priority_range()
            .map_err(driver("reading the stream priority range"))?;
        let stream_a = ctx
            .new_stream_with_priority(least)
            .map_err(driver("creating an aggressor stream"))?;
        let stream_b = ctx
            .new_stream_with_priority(least)
            .map_err(driver("creating an aggressor stream"))?;
        let release_word = DeviceBuffer::alloc(ctx, 8, "the aggressor pace word")?;
        ctx.bind_to_thread()
            .map_err(driver("binding the context"))?;
        // A release time of 0 lets the first gate pass at once (later gates pace from there).
        unsafe { cudarc::driver::result::memset_d8_sync(release_word.ptr(), 0, 8) }
            .map_err(driver("clearing the pace word"))?;
        // A legacy-stream memset: finished before the aggressor streams read the word.
        crate::cuda::finish_legacy_stream().map_err(driver("clearing the pace word"))?;
        let sink = DeviceBuffer::alloc(ctx, 4, "the aggressor sink")?;
        let ring = DeviceBuffer::alloc(ctx, RING_BYTES_MAX, "the staging ring")?;
        ctx.bind_to_thread()
            .map_err(driver("binding the context"))?;
        Ok(Kit {
            lines,
            stage,
            pace,
            _modules: vec![module, pace_module],
            stream_a,
            stream_b,
            release_word,
            sink,
            ring,
        })
    }
}

/// Aggressor state for one arm.
pub(super) struct Running<'a> {
    kit: &'a Kit,
    scratch: Scratch,
    aggressor: &'a Aggressor,
    units: Units,
    /// Next byte offset within the write (or read) region.
    cursor: u64,
    pump: Option<SwapPump<'a>>,
    swap_records: Vec<SwapRecord>,
    staged_events: Vec<(CudaEvent, CudaEvent)>,
    staged_used: Vec<bool>,
    next_slot: usize,
}

/// Bytes per aggressor unit (launch or group of copies) and units kept queued.
const UNIT_BYTES: u64 = 256 << 20;
/// Bytes per `paced_lines` launch (~80 ms at 52 GB/s).
const LINE_UNIT_BYTES: u64 = 4 << 30;
const UNITS_QUEUED: usize = 2;

impl<'a> Running<'a> {
    pub(super) fn new(
        kit: &'a Kit,
        scratch: Scratch,
        aggressor: &'a Aggressor,
        traffic: &'a SwapTraffic,
    ) -> Result<Self, SwapBenchError> {
        let pump = match aggressor {
            Aggressor::Swaps { load, .. } => Some(SwapPump::new(traffic, *load)),
            _ => None,
        };
        let mut staged_events = Vec::new();
        let mut staged_used = Vec::new();
        if let Aggressor::Staged { slots, .. } = aggressor {
            let ctx = kit.stream_a.context();
            for _ in 0..*slots {
                staged_events.push((
                    ctx.new_event(None)
                        .map_err(driver("creating a staging event"))?,
                    ctx.new_event(None)
                        .map_err(driver("creating a staging event"))?,
                ));
                staged_used.push(false);
            }
        }
        Ok(Running {
            kit,
            scratch,
            aggressor,
            units: Units::default(),
            cursor: 0,
            pump,
            swap_records: Vec::new(),
            staged_events,
            staged_used,
            next_slot: 0,
        })
    }

    /// The next `bytes` of the scratch region (wrapping to its start).
    fn take(&mut self, bytes: u64) -> u64 {
        if self.cursor + bytes > self.scratch.device_bytes {
            self.cursor = 0;
        }
        let at = self.cursor;
        self.cursor += bytes;
        at
    }

    pub(super) fn top_up(&mut self, engine: &mut CudaSwapEngine) -> Result<(), SwapBenchError> {
        if let Some(pump) = self.pump.as_mut() {
            return pump.top_up(engine, &mut self.swap_records);
        }
        while self.units.in_flight()? < UNITS_QUEUED {
            self.enqueue_unit()?;
        }
        Ok(())
    }

    /// Enqueues one timed unit of the aggressor's work on its stream(s).
    fn enqueue_unit(&mut self) -> Result<(), SwapBenchError> {
        let kit = self.kit;
        let first_stream = &kit.stream_a;
        let start = timing_event(first_stream)?;
        start
            .record(first_stream)
            .map_err(driver("recording an event"))?;
        let (bytes, last_stream) = match *self.aggressor {
            Aggressor::Swaps { .. } => unreachable!("the swap pump drives swap loads"),
            Aggressor::Lines {
                write,
                ctas,
                gb_per_s,
                burst,
            } => (
                self.enqueue_lines(write, ctas, gb_per_s, burst)?,
                first_stream,
            ),
            Aggressor::DeviceCopyPaced { piece, gb_per_s } => {
                (self.enqueue_device_copy(piece, gb_per_s)?, first_stream)
            }
            Aggressor::HostCopy { dst_offset } => {
                (self.enqueue_host_copy(dst_offset)?, first_stream)
            }
            Aggressor::Staged {
                slots, piece, ctas, ..
            } => (self.enqueue_staged(slots, piece, ctas)?, &kit.stream_b),
        };
        let end = timing_event(last_stream)?;
        end.record(last_stream)
            .map_err(driver("recording an event"))?;
        self.units.pending.push((bytes, start, end));
        Ok(())
    }

    /// One long `paced_lines` launch (the region wraps inside the kernel): a launch waiting for
    /// SM slots behind a victim kernel would stall the aggressor, so there are few.
    fn enqueue_lines(
        &mut self,
        write: bool,
        ctas: u32,
        gb_per_s: f64,
        burst: u64,
    ) -> Result<u64, SwapBenchError> {
        let kit = self.kit;
        let first_stream = &kit.stream_a;
        let bytes = LINE_UNIT_BYTES;
        let region_chunks = self.scratch.device_bytes / LINE_CHUNK_BYTES;
        let first_chunk = self.cursor / LINE_CHUNK_BYTES % region_chunks;
        self.cursor = (first_chunk * LINE_CHUNK_BYTES + bytes) % (region_chunks * LINE_CHUNK_BYTES);
        let region = if write {
            self.scratch.device_write
        } else {
            self.scratch.device_read
        };
        let vecs = bytes / 16;
        let chunk_ns = (LINE_CHUNK_BYTES as f64 / gb_per_s).round() as u64;
        let burst_chunks = (burst / LINE_CHUNK_BYTES).max(1);
        let write_flag = write as i32;
        let sink = kit.sink.ptr();
        let mut launch = first_stream.launch_builder(&kit.lines);
        launch
            .arg(&region)
            .arg(&region_chunks)
            .arg(&first_chunk)
            .arg(&vecs)
            .arg(&chunk_ns)
            .arg(&burst_chunks)
            .arg(&write_flag)
            .arg(&sink);
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (ctas, 1, 1),
                block_dim: (AGGRESSOR_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(driver("launching the line aggressor"))?;
        Ok(bytes)
    }

    /// Device->device copies of `piece` bytes, each behind a pace gate.
    fn enqueue_device_copy(&mut self, piece: u64, gb_per_s: f64) -> Result<u64, SwapBenchError> {
        let kit = self.kit;
        let first_stream = &kit.stream_a;
        let at = self.take(UNIT_BYTES);
        let piece_ns = (piece as f64 / gb_per_s).round() as u64;
        let release = kit.release_word.ptr();
        let mut done = 0;
        while done < UNIT_BYTES {
            let mut launch = first_stream.launch_builder(&kit.pace);
            launch.arg(&release).arg(&piece_ns);
            unsafe {
                launch.launch(LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (1, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(driver("launching a pace gate"))?;
            unsafe {
                sys::cuMemcpyDtoDAsync_v2(
                    self.scratch.device_write + at + done,
                    self.scratch.device_read + at + done,
                    piece as usize,
                    first_stream.cu_stream(),
                )
                .result()
            }
            .map_err(driver("enqueueing a device->device copy"))?;
            done += piece;
        }
        Ok(UNIT_BYTES)
    }

    /// Raw host->device copies of 64 MiB at full speed.
    fn enqueue_host_copy(&mut self, dst_offset: u64) -> Result<u64, SwapBenchError> {
        const PIECE: u64 = 64 << 20;
        let first_stream = &self.kit.stream_a;
        let at = self.take(UNIT_BYTES + dst_offset);
        let host_at = at % (self.scratch.host_bytes - UNIT_BYTES);
        let mut done = 0;
        while done < UNIT_BYTES {
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    self.scratch.device_write + at + dst_offset + done,
                    (self.scratch.host_read + host_at + done) as *const _,
                    PIECE as usize,
                    first_stream.cu_stream(),
                )
                .result()
            }
            .map_err(driver("enqueueing a host->device copy"))?;
            done += PIECE;
        }
        Ok(UNIT_BYTES)
    }

    /// The staged swap-in: DMA into the ring on one stream, the copy kernel on the other.
    fn enqueue_staged(
        &mut self,
        slots: usize,
        piece: u64,
        ctas: u32,
    ) -> Result<u64, SwapBenchError> {
        let kit = self.kit;
        // Ordering, per piece in slot s: the DMA stream waits until the kernel stream has
        // consumed the slot's previous piece (event `consumed[s]`), copies host -> slot,
        // records `staged[s]`; the kernel stream waits for `staged[s]`, copies
        // slot -> destination, records `consumed[s]`. A stream wait binds to the event's
        // latest record at enqueue time, so one event pair per slot serves every round.
        let at = self.take(UNIT_BYTES);
        let host_at = at % (self.scratch.host_bytes - UNIT_BYTES);
        let dma = &kit.stream_a;
        let copier = &kit.stream_b;
        let mut done = 0;
        while done < UNIT_BYTES {
            let n = piece.min(UNIT_BYTES - done);
            let slot = self.next_slot;
            self.next_slot = (slot + 1) % slots;
            let (staged, consumed) = &self.staged_events[slot];
            let slot_ptr = kit.ring.ptr() + slot as u64 * piece;
            if self.staged_used[slot] {
                dma.wait(consumed)
                    .map_err(driver("waiting for a staging slot"))?;
            }
            self.staged_used[slot] = true;
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    slot_ptr,
                    (self.scratch.host_read + host_at + done) as *const _,
                    n as usize,
                    dma.cu_stream(),
                )
                .result()
            }
            .map_err(driver("enqueueing a staging copy"))?;
            staged
                .record(dma)
                .map_err(driver("recording a staging event"))?;
            copier
                .wait(staged)
                .map_err(driver("waiting for a staged piece"))?;
            let dst = self.scratch.device_write + at + done;
            let vecs = n / 16;
            let mut launch = copier.launch_builder(&kit.stage);
            launch.arg(&slot_ptr).arg(&dst).arg(&vecs);
            unsafe {
                launch.launch(LaunchConfig {
                    grid_dim: (ctas, 1, 1),
                    block_dim: (AGGRESSOR_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(driver("launching the staging copy kernel"))?;
            consumed
                .record(copier)
                .map_err(driver("recording a staging event"))?;
            done += n;
        }
        Ok(done)
    }

    /// Waits for everything the aggressor enqueued; what it moved.
    pub(super) fn drain(
        &mut self,
        engine: &mut CudaSwapEngine,
    ) -> Result<Vec<(String, Moved)>, SwapBenchError> {
        if self.pump.is_some() {
            let mut records = std::mem::take(&mut self.swap_records);
            records.extend(engine.wait_all()?);
            let mut out = Vec::new();
            for direction in [SwapDirection::Out, SwapDirection::In] {
                let rs: Vec<&SwapRecord> = records
                    .iter()
                    .filter(|r| r.direction == direction)
                    .collect();
                if rs.is_empty() {
                    continue;
                }
                let first = rs.iter().map(|r| r.start_ns).min().unwrap_or(0);
                let last = rs.iter().map(|r| r.end_ns).max().unwrap_or(0);
                out.push((
                    format!("swap-{}", direction.as_str()),
                    Moved {
                        bytes: rs.iter().map(|r| r.bytes).sum(),
                        active_ns: rs.iter().map(|r| r.end_ns - r.start_ns).sum(),
                        span_ns: last - first,
                    },
                ));
            }
            if let Some(pump) = self.pump.as_mut() {
                pump.forget_queued();
            }
            return Ok(out);
        }
        Ok(vec![("aggressor".into(), self.units.drain()?)])
    }
}

/// Sets an L2 persisting access-policy window over the ring on the copy-kernel stream (or
/// removes it). Returns why it could not, if it could not.
pub(super) fn set_persisting(kit: &Kit, on: bool) -> Result<(), String> {
    let bytes = if on { RING_BYTES_MAX } else { 0 };
    unsafe {
        if on {
            sys::cuCtxSetLimit(sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE, bytes)
                .result()
                .map_err(|e| format!("cuCtxSetLimit(PERSISTING_L2_CACHE_SIZE): {e:?}"))?;
        }
        let mut value: sys::CUstreamAttrValue = std::mem::zeroed();
        value.accessPolicyWindow = sys::CUaccessPolicyWindow {
            base_ptr: kit.ring.ptr() as *mut _,
            num_bytes: bytes,
            hitRatio: if on { 1.0 } else { 0.0 },
            hitProp: sys::CUaccessProperty::CU_ACCESS_PROPERTY_PERSISTING,
            missProp: sys::CUaccessProperty::CU_ACCESS_PROPERTY_STREAMING,
        };
        if !on {
            value.accessPolicyWindow.hitProp = sys::CUaccessProperty::CU_ACCESS_PROPERTY_NORMAL;
            value.accessPolicyWindow.missProp = sys::CUaccessProperty::CU_ACCESS_PROPERTY_NORMAL;
        }
        sys::cuStreamSetAttribute(
            kit.stream_b.cu_stream(),
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW,
            &value,
        )
        .result()
        .map_err(|e| format!("cuStreamSetAttribute(ACCESS_POLICY_WINDOW): {e:?}"))?;
        if !on {
            sys::cuCtxResetPersistingL2Cache()
                .result()
                .map_err(|e| format!("cuCtxResetPersistingL2Cache: {e:?}"))?;
            sys::cuCtxSetLimit(sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE, 0)
                .result()
                .map_err(|e| format!("cuCtxSetLimit(0): {e:?}"))?;
        }
    }
    Ok(())
}

/// Lower half of the swap blocks: read region; upper half: write region (swap-ins overwrite
/// those blocks anyway; the decode batch's blocks are never touched).
pub(super) fn scratch_of(
    pool: GpuKvPoolRef,
    first_block: u32,
    blocks: u32,
    host: &PinnedHostPool,
) -> Scratch {
    let half = blocks / 2;
    Scratch {
        device_read: pool.block_ptr(first_block),
        device_write: pool.block_ptr(first_block + half),
        device_bytes: half as u64 * pool.block_bytes as u64 - (1 << 20),
        host_read: host.block_addr(0),
        host_bytes: host.total_bytes(),
    }
}
