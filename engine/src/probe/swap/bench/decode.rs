//! Decode steps while swapping: the step alone and while the copy streams are kept busy, with
//! the CUDA engine's real decode step and with a synthetic memory-bound stand-in.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{sys, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::floors::Floors;
use super::transfers::SwapTraffic;
use super::{decode_step_bytes, driver, SwapBenchError, SwapBenchOptions, SwapBenchRow};
use crate::batch::SeqStep;
use crate::config::ModelConfig;
use crate::cuda::{CudaModel, DeviceBuffer, GpuDevice};
use crate::probe::swap::{min_of, percentile_50};
use crate::swap::cuda::CudaSwapEngine;
use crate::swap::{SwapDirection, SwapEngine, SwapRecord};

const SYNTHETIC_SOURCE: &str = r#"
extern "C" __global__ void stream_read(const uint4* __restrict__ data, unsigned long long count, unsigned int* sink) {
    unsigned int acc = 0;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    // Four independent 16-byte loads in flight per thread per iteration.
    for (; i + 3 * stride < count; i += 4 * stride) {
        uint4 a = data[i];
        uint4 b = data[i + stride];
        uint4 c = data[i + 2 * stride];
        uint4 d = data[i + 3 * stride];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < count; i += stride) {
        uint4 a = data[i];
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    // Practically never true; keeps the loads from being optimised away.
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
"#;

/// A memory-bound kernel reading as many bytes as a decode step (a labelled stand-in).
pub(super) struct SyntheticDecode {
    stream: Arc<CudaStream>,
    function: CudaFunction,
    buffer: DeviceBuffer,
    sink: DeviceBuffer,
    grid: u32,
}

impl SyntheticDecode {
    pub(super) fn new(device: &GpuDevice, bytes: u64) -> Result<Self, SwapBenchError> {
        let module = device.compile(SYNTHETIC_SOURCE, &[])?;
        let function = device.function(&module, "stream_read")?;
        let buffer = DeviceBuffer::alloc(
            &device.ctx,
            bytes as usize,
            "the synthetic decode step's buffer",
        )?;
        let sink = DeviceBuffer::alloc(&device.ctx, 4, "the synthetic kernel's sink")?;
        Ok(SyntheticDecode {
            stream: device.stream.clone(),
            function,
            buffer,
            sink,
            grid: (device.num_sms * 8) as u32,
        })
    }

    /// One step, timed by events on the compute stream (ms).
    pub(super) fn step(&mut self) -> Result<f64, SwapBenchError> {
        let ctx = self.stream.context();
        let start = ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("creating an event"))?;
        let end = ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("creating an event"))?;
        let count = (self.buffer.bytes() / 16) as u64;
        let data = self.buffer.ptr();
        let sink = self.sink.ptr();
        start
            .record(&self.stream)
            .map_err(driver("recording an event"))?;
        let mut launch = self.stream.launch_builder(&self.function);
        launch.arg(&data).arg(&count).arg(&sink);
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (self.grid, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(driver("launching the synthetic decode kernel"))?;
        end.record(&self.stream)
            .map_err(driver("recording an event"))?;
        end.synchronize()
            .map_err(driver("waiting for the synthetic decode kernel"))?;
        Ok(start
            .elapsed_ms(&end)
            .map_err(driver("timing the synthetic decode kernel"))? as f64)
    }
}

/// The engine's decode step at batch `b`, context `c` (every sequence attends to `c` tokens).
pub(super) struct EngineDecode {
    tables: Vec<Vec<u32>>,
    tokens: Vec<[u32; 1]>,
    context_tokens: usize,
}

impl EngineDecode {
    pub(super) fn new(model: &CudaModel, batch: usize, context_tokens: usize) -> Self {
        let blocks = context_tokens.div_ceil(model.options.block_size_tokens);
        EngineDecode {
            tables: (0..batch)
                .map(|b| ((b * blocks) as u32..((b + 1) * blocks) as u32).collect())
                .collect(),
            tokens: (0..batch)
                .map(|b| [(b as u32 * 7919 + 1) % model.config.vocab_size as u32])
                .collect(),
            context_tokens,
        }
    }

    /// One serving-path step (stage, replay, read back the tokens), wall time in ms.
    pub(super) fn step(&mut self, model: &mut CudaModel) -> Result<f64, SwapBenchError> {
        let steps: Vec<SeqStep<'_>> = self
            .tables
            .iter()
            .zip(&self.tokens)
            .map(|(table, token)| SeqStep {
                block_table: table,
                context_len: self.context_tokens - 1,
                tokens: token,
            })
            .collect();
        let start = Instant::now();
        let next = model.forward_greedy(&steps)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        for (token, n) in self.tokens.iter_mut().zip(next) {
            token[0] = n;
        }
        Ok(ms)
    }
}

pub(super) const fn load(depth: usize, out: bool, into: bool) -> SwapLoad {
    SwapLoad { depth, out, into }
}

/// Swap loads beside the synthetic step: both directions (the target case), each direction alone
/// (which one costs HBM bandwidth), and a shallower queue.
pub(super) const SYNTHETIC_LOADS: [SwapLoad; 4] = [
    load(2, true, true),
    load(2, true, false),
    load(2, false, true),
    load(1, true, true),
];

/// One arm of the engine decode measurement: the per-direction rate cap and the swap load.
#[derive(Clone, Copy, Debug)]
pub(super) struct EngineArm {
    /// Per-direction rate cap of the swaps, GB/s (None: full link speed).
    pub rate_cap_gbps: Option<f64>,
    pub load: SwapLoad,
}

impl EngineArm {
    pub(super) fn describe(&self) -> String {
        match self.rate_cap_gbps {
            Some(cap) => format!("swap-in DMA, paced to {cap} GB/s per direction"),
            None => "swap-in DMA".into(),
        }
    }
}

/// The engine's step (inputs and tokens through mapped pinned memory, so it uses no copy engine)
/// beside swaps at full link speed, paced to each of `caps_gbps` per direction, with one swap
/// queued per direction, and at full speed once more at the end (the spread between the first
/// and the last arm shows the drift within the run).
pub(super) fn engine_arms(caps_gbps: &[f64]) -> Vec<EngineArm> {
    let full = |depth| EngineArm {
        rate_cap_gbps: None,
        load: load(depth, true, true),
    };
    let mut arms = vec![full(2)];
    arms.extend(caps_gbps.iter().map(|&cap| EngineArm {
        rate_cap_gbps: Some(cap),
        load: load(2, true, true),
    }));
    arms.push(full(1));
    arms.push(full(2));
    arms
}

/// What runs on the copy streams during a decode measurement.
#[derive(Clone, Copy, Debug)]
pub(super) struct SwapLoad {
    /// Swaps kept queued per enabled direction.
    pub depth: usize,
    pub out: bool,
    pub into: bool,
}

impl SwapLoad {
    pub(super) fn label(&self) -> String {
        let directions = match (self.out, self.into) {
            (true, true) => "both directions",
            (true, false) => "swap-out only",
            (false, true) => "swap-in only",
            (false, false) => "no direction",
        };
        format!("{directions}, {} x 1 GiB queued per direction", self.depth)
    }
}

/// Keeps the copy streams busy: before every step, each enabled direction gets swaps until
/// `depth` are queued, rotating over the traffic's agents.
pub(super) struct SwapPump<'a> {
    traffic: &'a SwapTraffic,
    load: SwapLoad,
    next: [usize; 2],
    queued: [usize; 2],
}

impl<'a> SwapPump<'a> {
    pub(super) fn new(traffic: &'a SwapTraffic, load: SwapLoad) -> Self {
        SwapPump {
            traffic,
            load,
            next: [0, 0],
            queued: [0, 0],
        }
    }

    /// After the caller waited for every swap itself: nothing is queued any more.
    pub(super) fn forget_queued(&mut self) {
        self.queued = [0, 0];
    }

    pub(super) fn top_up(
        &mut self,
        engine: &mut CudaSwapEngine,
        records: &mut Vec<SwapRecord>,
    ) -> Result<(), SwapBenchError> {
        for record in engine.poll()? {
            self.queued[(record.direction == SwapDirection::In) as usize] -= 1;
            records.push(record);
        }
        for (d, direction) in [SwapDirection::Out, SwapDirection::In]
            .into_iter()
            .enumerate()
        {
            let enabled = if d == 0 {
                self.load.out
            } else {
                self.load.into
            };
            if !enabled {
                continue;
            }
            let agents = if d == 0 {
                &self.traffic.out_agents
            } else {
                &self.traffic.in_agents
            };
            while self.queued[d] < self.load.depth {
                let k = self.next[d] % agents.len();
                // An agent whose previous swap is still unreported waits for the next top-up.
                if engine
                    .busy_swap_of_gpu_block(agents[k][0].gpu_block)
                    .is_some()
                {
                    break;
                }
                engine.submit((d * agents.len() + k) as u32, direction, &agents[k])?;
                self.next[d] += 1;
                self.queued[d] += 1;
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)] // the measurement's whole context
pub(super) fn decode_slowdown(
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    options: &SwapBenchOptions,
    floors: &Floors,
    records: &mut Vec<SwapRecord>,
    label: &str,
    load: SwapLoad,
    mut step: impl FnMut() -> Result<f64, SwapBenchError>,
) -> Result<Vec<SwapBenchRow>, SwapBenchError> {
    // Warm-up (graphs, clocks), then alternate quiet and swapping phases twice so slow drift
    // (clocks, temperature) hits both conditions alike.
    for _ in 0..5 {
        step()?;
    }
    let mut quiet_ms = Vec::new();
    let mut busy_ms = Vec::new();
    let mut busy_records = Vec::new();
    // (start, end) of the timed swapping phases, on the engine's clock.
    let mut busy_windows: Vec<(u64, u64)> = Vec::new();
    for _phase in 0..2 {
        for _ in 0..options.decode_steps {
            quiet_ms.push(step()?);
        }
        let mut pump = SwapPump::new(traffic, load);
        pump.top_up(engine, &mut busy_records)?;
        // Let both streams reach full speed before timing.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let window_start_ns = engine.now_ns();
        for _ in 0..options.decode_steps {
            pump.top_up(engine, &mut busy_records)?;
            busy_ms.push(step()?);
        }
        busy_windows.push((window_start_ns, engine.now_ns()));
        pump.top_up(engine, &mut busy_records)?;
        busy_records.extend(engine.wait_all()?);
    }
    let quiet = percentile_50(&quiet_ms);
    let busy = percentile_50(&busy_ms);
    let slowdown = busy / quiet - 1.0;
    let outs: Vec<SwapRecord> = busy_records
        .iter()
        .filter(|r| r.direction == SwapDirection::Out)
        .cloned()
        .collect();
    let ins: Vec<SwapRecord> = busy_records
        .iter()
        .filter(|r| r.direction == SwapDirection::In)
        .cloned()
        .collect();
    let copy_gb = |rs: &[SwapRecord]| -> f64 {
        let bytes: u64 = rs.iter().map(|r| r.bytes).sum();
        let ns: u64 = rs.iter().map(|r| r.end_ns - r.start_ns).sum();
        bytes as f64 / ns.max(1) as f64
    };
    // Bytes moved inside the timed windows (a swap's bytes spread evenly over its copy time)
    // per second of window: the rate the steps actually lived with, gaps between swaps included.
    let window_ns: u64 = busy_windows.iter().map(|(a, b)| b - a).sum();
    let window_gb = |rs: &[SwapRecord]| -> f64 {
        let mut bytes = 0.0;
        for r in rs {
            let copy_ns = (r.end_ns - r.start_ns).max(1) as f64;
            for &(a, b) in &busy_windows {
                let overlap = r.end_ns.min(b).saturating_sub(r.start_ns.max(a));
                bytes += r.bytes as f64 * overlap as f64 / copy_ns;
            }
        }
        bytes / window_ns.max(1) as f64
    };
    let decode_bytes = decode_step_bytes(
        &ModelConfig::preset(&options.model).expect("checked at start"),
        options.decode_batch,
        options.decode_context_tokens,
    );
    let what = match label {
        "synthetic" => format!(
            "SYNTHETIC STAND-IN: one memory-bound kernel reading {:.1} GB (the bytes of a llama2-7b decode step, batch {}, context {}), timed by events",
            decode_bytes as f64 / 1e9,
            options.decode_batch,
            options.decode_context_tokens
        ),
        _ => format!(
            "CUDA engine decode step (llama2-7b random fp16, batch {}, context {}, CUDA graph), wall time incl. staging and token read-back (forward_greedy)",
            options.decode_batch, options.decode_context_tokens
        ),
    };
    records.extend(busy_records.iter().cloned());
    Ok(vec![
        SwapBenchRow {
            section: "decode while swapping".into(),
            name: format!("{label} decode step, no swaps"),
            bytes: decode_bytes,
            ms_p50: quiet,
            ms_min: min_of(&quiet_ms),
            reps: quiet_ms.len(),
            gb_per_s: decode_bytes as f64 / (quiet * 1e6),
            floor: decode_bytes as f64 / 3.35e12 * 1e3,
            floor_what: "ms at 3.35 TB/s (datasheet HBM3) for the step's bytes".into(),
            ratio: quiet / (decode_bytes as f64 / 3.35e12 * 1e3),
            target: "-".into(),
            meets_target: None,
            note: what.clone(),
        },
        SwapBenchRow {
            section: "decode while swapping".into(),
            name: format!("{label} decode step while swapping ({})", load.label()),
            bytes: decode_bytes,
            ms_p50: busy,
            ms_min: min_of(&busy_ms),
            reps: busy_ms.len(),
            gb_per_s: decode_bytes as f64 / (busy * 1e6),
            floor: quiet,
            floor_what: "ms p50 of the same step without swaps".into(),
            ratio: busy / quiet,
            target: "<= 5% slower".into(),
            meets_target: Some(slowdown <= 0.05),
            note: format!(
                "slowdown {:+.2}%; swaps during it: {} out at {:.1} GB/s, {} in at {:.1} GB/s (copy-time weighted); averaged over the timed steps {:.1} out + {:.1} in = {:.1} GB/s aggregate (floors {:.1}/{:.1} GB/s)",
                slowdown * 100.0,
                outs.len(),
                copy_gb(&outs),
                ins.len(),
                copy_gb(&ins),
                window_gb(&outs),
                window_gb(&ins),
                window_gb(&outs) + window_gb(&ins),
                floors.out_gb_per_s,
                floors.in_gb_per_s
            ),
        },
    ])
}
