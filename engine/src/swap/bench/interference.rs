//! `djinn engine swap-bench --interference`: why swap-in costs a decode step more than swap-out,
//! and what the step's slowdown is at the operating points a scheduler can choose.
//!
//! A victim (the synthetic HBM reader, then the CUDA engine's decode step) runs alone and beside
//! one "aggressor" at a time; every arm alternates quiet and busy phases twice (as
//! `decode_slowdown` does), and the list of arms is repeated `rounds` times in the same order so
//! slow drift and run-to-run noise (~1 point) show up as spread between rounds.
//!
//! Aggressors:
//! - swap-engine loads (DMA swap-out, swap-in, both, with per-direction rate caps);
//! - an SM kernel of few CTAs at the lowest stream priority writing (or reading) whole 128-byte
//!   lines of HBM at a paced rate, data from registers (no source traffic at all): HBM write
//!   traffic without the copy engine;
//! - raw DMA: device->device copies paced like the swap pacer, and host->device copies with the
//!   destination aligned or offset by 16 bytes;
//! - a staged swap-in: DMA host->device into a small device ring, and a copy kernel moving each
//!   staged piece into its destination with whole-line stores (the ring should stay in L2, so HBM
//!   sees only the kernel's writes), optionally with an L2 persisting access-policy window on
//!   the ring.
//!
//! Arm sets (`--interference-sets`): `probe` (all of the above at ~the H2D floor's rate), `burst`
//! (the same write rate smoothly and in 1 or 16 MiB bursts; large device->device copies),
//! `operating`, `operating-fine`, `crossing` (swap-out at full speed with swap-in capped at several
//! rates; engine victim only). Results and what they mean: engine/NOTES-swap.md, "Session 3".

use std::sync::Arc;

use cudarc::driver::{sys, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::{
    driver, load, min_of, percentile_50, EngineDecode, Floors, SwapBenchError, SwapBenchRow,
    SwapLoad, SwapPump, SwapTraffic, SyntheticDecode,
};
use crate::cuda::{CudaModel, DeviceBuffer, GpuDevice};
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

const AGGRESSOR_THREADS: u32 = 512;
/// Bytes of one `paced_lines` chunk (see the kernel).
const LINE_CHUNK_BYTES: u64 = AGGRESSOR_THREADS as u64 * 8 * 16;

/// Bytes and times an aggressor moved during the busy phases of one arm.
#[derive(Clone, Copy, Debug, Default)]
struct Moved {
    bytes: u64,
    /// Sum of the units' own times (the rate while running).
    active_ns: u64,
    /// From the first unit's start to the last unit's end, per phase, summed.
    span_ns: u64,
}

impl Moved {
    fn add(&mut self, other: Moved) {
        self.bytes += other.bytes;
        self.active_ns += other.active_ns;
        self.span_ns += other.span_ns;
    }
    fn describe(&self) -> String {
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
struct Units {
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

    fn drain(&mut self) -> Result<Moved, SwapBenchError> {
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
struct Scratch {
    device_read: u64,
    device_write: u64,
    device_bytes: u64,
    host_read: u64,
    host_bytes: u64,
}

enum Aggressor {
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
    fn label(&self) -> String {
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
struct Kit {
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
    fn new(device: &GpuDevice) -> Result<Self, SwapBenchError> {
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
struct Running<'a> {
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
    fn new(
        kit: &'a Kit,
        scratch: Scratch,
        aggressor: &'a Aggressor,
        traffic: &'a SwapTraffic,
    ) -> Result<Self, SwapBenchError> {
        let pump = match aggressor {
            Aggressor::Swaps { load, .. } => Some(SwapPump {
                traffic,
                load: *load,
                next: [0, 0],
                queued: [0, 0],
            }),
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

    fn top_up(&mut self, engine: &mut CudaSwapEngine) -> Result<(), SwapBenchError> {
        if let Some(pump) = self.pump.as_mut() {
            return pump.top_up(engine, &mut self.swap_records);
        }
        while self.units.in_flight()? < UNITS_QUEUED {
            self.enqueue_unit()?;
        }
        Ok(())
    }

    fn enqueue_unit(&mut self) -> Result<(), SwapBenchError> {
        let kit = self.kit;
        let first_stream = &kit.stream_a;
        let start = timing_event(first_stream)?;
        start
            .record(first_stream)
            .map_err(driver("recording an event"))?;
        let mut last_stream = first_stream;
        let mut bytes = UNIT_BYTES;
        match *self.aggressor {
            Aggressor::Swaps { .. } => unreachable!("the swap pump drives swap loads"),
            Aggressor::Lines {
                write,
                ctas,
                gb_per_s,
                burst,
            } => {
                // One long launch per unit (the region wraps inside the kernel): a launch waiting
                // for SM slots behind a victim kernel would stall the aggressor, so there are few.
                bytes = LINE_UNIT_BYTES;
                let region_chunks = self.scratch.device_bytes / LINE_CHUNK_BYTES;
                let first_chunk = self.cursor / LINE_CHUNK_BYTES % region_chunks;
                self.cursor =
                    (first_chunk * LINE_CHUNK_BYTES + bytes) % (region_chunks * LINE_CHUNK_BYTES);
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
            }
            Aggressor::DeviceCopyPaced { piece, gb_per_s } => {
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
            }
            Aggressor::HostCopy { dst_offset } => {
                const PIECE: u64 = 64 << 20;
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
            }
            Aggressor::Staged {
                slots, piece, ctas, ..
            } => {
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
                last_stream = copier;
                bytes = done;
            }
        }
        let end = timing_event(last_stream)?;
        end.record(last_stream)
            .map_err(driver("recording an event"))?;
        self.units.pending.push((bytes, start, end));
        Ok(())
    }

    /// Waits for everything the aggressor enqueued; what it moved.
    fn drain(
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
                pump.queued = [0, 0];
            }
            return Ok(out);
        }
        Ok(vec![("aggressor".into(), self.units.drain()?)])
    }
}

/// The victim's quiet and busy step times and what the aggressor moved, for one arm.
struct ArmResult {
    quiet_ms: Vec<f64>,
    busy_ms: Vec<f64>,
    moved: Vec<(String, Moved)>,
}

fn measure_arm(
    engine: &mut CudaSwapEngine,
    running: &mut Running,
    steps: usize,
    mut step: impl FnMut() -> Result<f64, SwapBenchError>,
) -> Result<ArmResult, SwapBenchError> {
    for _ in 0..3 {
        step()?;
    }
    let mut quiet_ms = Vec::new();
    let mut busy_ms = Vec::new();
    let mut moved: Vec<(String, Moved)> = Vec::new();
    for _phase in 0..2 {
        for _ in 0..steps {
            quiet_ms.push(step()?);
        }
        running.top_up(engine)?;
        // Let the aggressor reach its rate before timing.
        std::thread::sleep(std::time::Duration::from_millis(5));
        for _ in 0..steps {
            running.top_up(engine)?;
            busy_ms.push(step()?);
        }
        for (name, m) in running.drain(engine)? {
            match moved.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) => total.add(m),
                None => moved.push((name, m)),
            }
        }
    }
    Ok(ArmResult {
        quiet_ms,
        busy_ms,
        moved,
    })
}

/// The aggressor arms run beside each victim.
fn probe_arms(in_gb_per_s: f64) -> Vec<Aggressor> {
    // The SM and device-copy aggressors move bytes at the H2D floor rounded down, so per byte
    // they compare with a full-speed swap-in.
    let rate = (in_gb_per_s.floor()).clamp(10.0, 60.0);
    vec![
        Aggressor::Swaps {
            load: load(2, false, true, false),
            out_cap: None,
            in_cap: None,
        },
        Aggressor::Swaps {
            load: load(2, true, false, false),
            out_cap: None,
            in_cap: None,
        },
        Aggressor::Lines {
            write: true,
            ctas: 2,
            gb_per_s: rate,
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::Lines {
            write: true,
            ctas: 2,
            gb_per_s: (rate / 2.0).round(),
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::Lines {
            write: false,
            ctas: 2,
            gb_per_s: rate,
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::DeviceCopyPaced {
            piece: 16 << 20,
            gb_per_s: rate,
        },
        Aggressor::HostCopy { dst_offset: 0 },
        Aggressor::HostCopy { dst_offset: 16 },
        Aggressor::Staged {
            slots: 4,
            piece: 4 << 20,
            ctas: 2,
            persisting: false,
        },
        Aggressor::Staged {
            slots: 4,
            piece: 1 << 20,
            ctas: 2,
            persisting: false,
        },
        Aggressor::Staged {
            slots: 4,
            piece: 4 << 20,
            ctas: 2,
            persisting: true,
        },
    ]
}

/// Whether HBM writes cost less per byte when they come in bursts (a memory controller drains
/// its write queue in batches; each switch between reading and writing costs bus time, so dense
/// bursts amortise it): the same average rate smoothly and in 16 MiB bursts, and device->device
/// DMA in large paced pieces.
fn burst_arms() -> Vec<Aggressor> {
    const RATE: f64 = 48.0;
    vec![
        Aggressor::Lines {
            write: true,
            ctas: 2,
            gb_per_s: RATE,
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::Lines {
            write: true,
            ctas: 16,
            gb_per_s: RATE,
            burst: LINE_CHUNK_BYTES,
        },
        Aggressor::Lines {
            write: true,
            ctas: 16,
            gb_per_s: RATE,
            burst: 16 << 20,
        },
        Aggressor::Lines {
            write: true,
            ctas: 16,
            gb_per_s: RATE,
            burst: 1 << 20,
        },
        Aggressor::DeviceCopyPaced {
            piece: 64 << 20,
            gb_per_s: RATE,
        },
    ]
}

/// Operating points a scheduler can choose: each direction alone at full speed, both at full
/// speed, and swap-in paced while swap-out runs at full speed.
fn operating_points(in_caps_gb_per_s: &[f64]) -> Vec<Aggressor> {
    let mut arms = vec![
        Aggressor::Swaps {
            load: load(2, false, true, false),
            out_cap: None,
            in_cap: None,
        },
        Aggressor::Swaps {
            load: load(2, true, false, false),
            out_cap: None,
            in_cap: None,
        },
        Aggressor::Swaps {
            load: load(2, true, true, false),
            out_cap: None,
            in_cap: None,
        },
    ];
    for &cap in in_caps_gb_per_s {
        arms.push(Aggressor::Swaps {
            load: load(2, true, true, false),
            out_cap: None,
            in_cap: Some(cap),
        });
    }
    arms
}

/// Sets an L2 persisting access-policy window over the ring on the copy-kernel stream (or
/// removes it). Returns why it could not, if it could not.
fn set_persisting(kit: &Kit, on: bool) -> Result<(), String> {
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

/// What runs on the compute stream and is timed.
trait Victim {
    fn device(&self) -> &GpuDevice;
    /// One step, in ms.
    fn step(&mut self) -> Result<f64, SwapBenchError>;
}

struct SyntheticVictim<'a> {
    device: &'a GpuDevice,
    synthetic: SyntheticDecode,
}

impl Victim for SyntheticVictim<'_> {
    fn device(&self) -> &GpuDevice {
        self.device
    }
    fn step(&mut self) -> Result<f64, SwapBenchError> {
        self.synthetic.step()
    }
}

struct EngineVictim<'a> {
    model: &'a mut CudaModel,
    decode: &'a mut EngineDecode,
}

impl Victim for EngineVictim<'_> {
    fn device(&self) -> &GpuDevice {
        &self.model.device
    }
    fn step(&mut self) -> Result<f64, SwapBenchError> {
        self.decode.step(self.model)
    }
}

/// Runs every arm `rounds` times beside one victim; one row per arm and round, then one summary
/// row per arm (median slowdown over rounds, and the spread).
#[allow(clippy::too_many_arguments)]
fn run_victim(
    victim_name: &str,
    victim: &mut dyn Victim,
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    scratch: Scratch,
    arms: &[Aggressor],
    rounds: usize,
    steps: usize,
    step_bytes: u64,
    push: &mut dyn FnMut(SwapBenchRow),
) -> Result<(), SwapBenchError> {
    let kit = Kit::new(victim.device())?;
    let mut slowdowns: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    let mut notes: Vec<String> = vec![String::new(); arms.len()];
    for round in 0..rounds {
        for (a, aggressor) in arms.iter().enumerate() {
            if let Aggressor::Swaps {
                out_cap, in_cap, ..
            } = aggressor
            {
                engine.set_direction_rate_cap(victim.device(), SwapDirection::Out, *out_cap)?;
                engine.set_direction_rate_cap(victim.device(), SwapDirection::In, *in_cap)?;
            }
            let persisting = matches!(
                aggressor,
                Aggressor::Staged {
                    persisting: true,
                    ..
                }
            );
            if persisting {
                if let Err(why) = set_persisting(&kit, true) {
                    notes[a] = format!("skipped: {why}");
                    let _ = set_persisting(&kit, false);
                    continue;
                }
            }
            let mut running = Running::new(&kit, scratch, aggressor, traffic)?;
            let result = measure_arm(engine, &mut running, steps, || victim.step());
            if persisting {
                set_persisting(&kit, false).map_err(|why| SwapBenchError::Driver {
                    during: "removing the L2 persisting window",
                    detail: why,
                })?;
            }
            engine.set_rate_cap(victim.device(), None)?;
            let result = result?;
            let quiet = percentile_50(&result.quiet_ms);
            let busy = percentile_50(&result.busy_ms);
            let slowdown = busy / quiet - 1.0;
            slowdowns[a].push(slowdown);
            let moved = result
                .moved
                .iter()
                .map(|(n, m)| format!("{n}: {}", m.describe()))
                .collect::<Vec<_>>()
                .join("; ");
            notes[a] = moved.clone();
            push(SwapBenchRow {
                section: "interference".into(),
                name: format!(
                    "{victim_name} | {} | round {}",
                    aggressor.label(),
                    round + 1
                ),
                bytes: step_bytes,
                ms_p50: busy,
                ms_min: min_of(&result.busy_ms),
                reps: result.busy_ms.len(),
                gb_per_s: step_bytes as f64 / (busy * 1e6),
                floor: quiet,
                floor_what: "ms p50 of the same step without the aggressor (same arm)".into(),
                ratio: busy / quiet,
                target: "<= 5% slower".into(),
                meets_target: Some(slowdown <= 0.05),
                note: format!("slowdown {:+.2}%; {moved}", slowdown * 100.0),
            });
        }
    }
    for (a, aggressor) in arms.iter().enumerate() {
        let s = &slowdowns[a];
        if s.is_empty() {
            push(SwapBenchRow {
                section: "interference summary".into(),
                name: format!("{victim_name} | {}", aggressor.label()),
                bytes: step_bytes,
                ms_p50: f64::NAN,
                ms_min: f64::NAN,
                reps: 0,
                gb_per_s: f64::NAN,
                floor: f64::NAN,
                floor_what: "-".into(),
                ratio: f64::NAN,
                target: "<= 5% slower".into(),
                meets_target: None,
                note: notes[a].clone(),
            });
            continue;
        }
        let median = percentile_50(s);
        let lo = s.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        push(SwapBenchRow {
            section: "interference summary".into(),
            name: format!("{victim_name} | {}", aggressor.label()),
            bytes: step_bytes,
            ms_p50: f64::NAN,
            ms_min: f64::NAN,
            reps: s.len(),
            gb_per_s: f64::NAN,
            floor: 1.0,
            floor_what: "slowdown ratio 1.0 = no slowdown".into(),
            ratio: 1.0 + median,
            target: "<= 5% slower".into(),
            meets_target: Some(median <= 0.05),
            note: format!(
                "median slowdown over {} rounds {:+.2}% (min {:+.2}%, max {:+.2}%); last round: {}",
                s.len(),
                median * 100.0,
                lo * 100.0,
                hi * 100.0,
                notes[a]
            ),
        });
    }
    Ok(())
}

/// The arms of the named sets, in order: `probe` (session 3 call 1: swap directions, SM line
/// writers and readers, raw and staged DMA), `burst` ([`burst_arms`]), `operating` (each
/// direction alone, both, swap-in capped at 40/30/20 GB/s), `operating-fine` (the same with
/// caps 40/37/34/30/25/20), `crossing` (both at full speed, swap-in capped at 36/34/32).
fn arms_of(sets: &[String], in_gb_per_s: f64) -> Result<Vec<Aggressor>, SwapBenchError> {
    let mut arms = Vec::new();
    for set in sets {
        match set.as_str() {
            "probe" => arms.extend(probe_arms(in_gb_per_s)),
            "burst" => arms.extend(burst_arms()),
            "operating" => arms.extend(operating_points(&[40.0, 30.0, 20.0])),
            "operating-fine" => {
                arms.extend(operating_points(&[40.0, 37.0, 34.0, 30.0, 25.0, 20.0]))
            }
            // Around the 5% crossing only: both at full speed, swap-in capped 36/34/32.
            "crossing" => arms.extend(
                operating_points(&[36.0, 34.0, 32.0])
                    .into_iter()
                    .skip(2),
            ),
            other => {
                return Err(SwapBenchError::BadOption(format!(
                    "unknown interference arm set `{other}` (expected probe, burst, operating, operating-fine, crossing)"
                )))
            }
        }
    }
    Ok(arms)
}

/// Checks the names of the arm sets (before any GPU work).
pub fn check_sets(sets: &[String]) -> Result<(), SwapBenchError> {
    arms_of(sets, 50.0).map(|_| ())
}

/// Context the bench's `run` hands over (its device, pools and options).
pub(super) struct InterferenceSetup<'a> {
    pub sets: &'a [String],
    pub rounds: usize,
    pub steps: usize,
    pub floors: &'a Floors,
    pub step_bytes: u64,
}

/// The synthetic victim over the bench's own pool: `engine` is the bench's swap engine.
pub(super) fn synthetic_victim(
    setup: &InterferenceSetup,
    device: &GpuDevice,
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    push: &mut dyn FnMut(SwapBenchRow),
) -> Result<(), SwapBenchError> {
    let scratch = scratch_of(
        engine.gpu_pool(),
        0,
        engine.gpu_pool().block_count,
        engine.host_pool(),
    );
    // Operating points are about the engine's real step; the stand-in runs the other sets.
    let synthetic_sets: Vec<String> = setup
        .sets
        .iter()
        .filter(|set| !set.starts_with("operating") && set.as_str() != "crossing")
        .cloned()
        .collect();
    let mut victim = SyntheticVictim {
        device,
        synthetic: SyntheticDecode::new(device, setup.step_bytes)?,
    };
    run_victim(
        "synthetic HBM reader (stand-in)",
        &mut victim,
        engine,
        traffic,
        scratch,
        &arms_of(&synthetic_sets, setup.floors.in_gb_per_s)?,
        setup.rounds,
        setup.steps,
        setup.step_bytes,
        push,
    )
}

/// The engine's decode step as the victim: the probe's arms, then the operating points.
#[allow(clippy::too_many_arguments)]
pub(super) fn engine_victim(
    setup: &InterferenceSetup,
    model: &mut CudaModel,
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    first_swap_block: u32,
    swap_blocks: u32,
    decode: &mut EngineDecode,
    push: &mut dyn FnMut(SwapBenchRow),
) -> Result<(), SwapBenchError> {
    let scratch = scratch_of(
        engine.gpu_pool(),
        first_swap_block,
        swap_blocks,
        engine.host_pool(),
    );
    let arms = arms_of(setup.sets, setup.floors.in_gb_per_s)?;
    let mut victim = EngineVictim { model, decode };
    run_victim(
        "engine decode (llama2-7b fp16, batch 32, ctx 2048, graph, forward_greedy)",
        &mut victim,
        engine,
        traffic,
        scratch,
        &arms,
        setup.rounds,
        setup.steps,
        setup.step_bytes,
        push,
    )
}

/// Lower half of the swap blocks: read region; upper half: write region (swap-ins overwrite
/// those blocks anyway; the decode batch's blocks are never touched).
fn scratch_of(pool: GpuKvPoolRef, first_block: u32, blocks: u32, host: &PinnedHostPool) -> Scratch {
    let half = blocks / 2;
    Scratch {
        device_read: pool.block_ptr(first_block),
        device_write: pool.block_ptr(first_block + half),
        device_bytes: half as u64 * pool.block_bytes as u64 - (1 << 20),
        host_read: host.block_addr(0),
        host_bytes: host.total_bytes(),
    }
}
