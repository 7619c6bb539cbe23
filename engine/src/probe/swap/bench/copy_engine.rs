//! Why a decode step that stages its inputs and reads its tokens back with copy-engine memcpys
//! waits for queued swaps, and why the engine's step moves them with kernels over mapped pinned
//! memory instead: small transfers on the compute stream timed with the copy streams idle and
//! busy.

use std::time::Instant;

use cudarc::driver::{sys, LaunchConfig, PushKernelArg};

use super::decode::{load, SwapPump};
use super::transfers::SwapTraffic;
use super::{driver, SwapBenchError, SwapBenchRow};
use crate::cuda::{DeviceBuffer, GpuDevice};
use crate::probe::swap::{min_of, percentile_50};
use crate::swap::cuda::CudaSwapEngine;
use crate::swap::{SwapEngine, SwapRecord};

const PROBE_SOURCE: &str = r#"
extern "C" __global__ void mapped_copy(const unsigned int* __restrict__ src, unsigned int* __restrict__ dst, unsigned int count) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
        dst[i] = src[i];
    }
}
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeMode {
    /// cuMemcpyHtoDAsync of 4 KiB from pinned memory on the compute stream.
    MemcpyH2dPinned,
    /// cuMemcpyDtoHAsync of 4 KiB into pinned memory on the compute stream.
    MemcpyD2hPinned,
    /// cuMemcpyDtoHAsync of 128 B into a pageable Vec (how a step reads 32 greedy tokens back).
    MemcpyD2hPageable,
    /// A kernel reading 4 KiB of mapped pinned memory and one writing 4 KiB to it.
    KernelMapped,
}

impl ProbeMode {
    fn describe(self) -> &'static str {
        match self {
            ProbeMode::MemcpyH2dPinned => {
                "cuMemcpyAsync 4 KiB pinned host->device on the compute stream"
            }
            ProbeMode::MemcpyD2hPinned => {
                "cuMemcpyAsync 4 KiB device->pinned host on the compute stream"
            }
            ProbeMode::MemcpyD2hPageable => {
                "cuMemcpyAsync 128 B device->pageable Vec on the compute stream"
            }
            ProbeMode::KernelMapped => {
                "kernels moving 4 KiB in and 4 KiB out over mapped pinned memory (no copy engine)"
            }
        }
    }
}

/// Why the engine's decode step slows down while swapping: a step's small input/output copies on
/// the compute stream share the copy engines with the swaps. Times (host wall clock, enqueue to
/// completion, as a run loop sees it) small transfers on the compute stream with the copy streams
/// idle and with both directions swapping, by copy-engine memcpys and by kernels over mapped
/// pinned memory.
pub(super) fn copy_engine_probe(
    device: &GpuDevice,
    engine: &mut CudaSwapEngine,
    traffic: &SwapTraffic,
    records: &mut Vec<SwapRecord>,
) -> Result<Vec<SwapBenchRow>, SwapBenchError> {
    const BYTES: usize = 4096;
    let ctx = &device.ctx;
    let stream = &device.stream;
    let module = device.compile(PROBE_SOURCE, &[])?;
    let function = device.function(&module, "mapped_copy")?;
    let device_buffer = DeviceBuffer::alloc(ctx, BYTES, "the copy-engine probe's device buffer")?;
    ctx.bind_to_thread()
        .map_err(driver("binding the context"))?;
    // DEVICEMAP: kernels read and write this host memory over PCIe themselves.
    let host =
        unsafe { cudarc::driver::result::malloc_host(2 * BYTES, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(driver("allocating the probe's mapped host memory"))? as *mut u8;
    let mut host_device_ptr: sys::CUdeviceptr = 0;
    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut host_device_ptr, host as *mut _, 0) }
        .result()
        .map_err(driver("mapping the probe's host memory"))?;
    let count = (BYTES / 4) as u32;
    let dev = device_buffer.ptr();
    let host_in = host_device_ptr;
    let host_out = host_device_ptr + BYTES as u64;
    let mut pageable = vec![0u32; 32];
    let mut time_one = |mode: ProbeMode| -> Result<f64, SwapBenchError> {
        let started = Instant::now();
        match mode {
            ProbeMode::KernelMapped => {
                for (src, dst) in [(host_in, dev), (dev, host_out)] {
                    let mut launch = stream.launch_builder(&function);
                    launch.arg(&src).arg(&dst).arg(&count);
                    unsafe {
                        launch.launch(LaunchConfig {
                            grid_dim: (1, 1, 1),
                            block_dim: (256, 1, 1),
                            shared_mem_bytes: 0,
                        })
                    }
                    .map_err(driver("launching the mapped-copy kernel"))?;
                }
            }
            ProbeMode::MemcpyH2dPinned => unsafe {
                sys::cuMemcpyHtoDAsync_v2(dev, host as *const _, BYTES, stream.cu_stream())
                    .result()
                    .map_err(driver("probe H2D copy"))?
            },
            ProbeMode::MemcpyD2hPinned => unsafe {
                sys::cuMemcpyDtoHAsync_v2(host.add(BYTES) as *mut _, dev, BYTES, stream.cu_stream())
                    .result()
                    .map_err(driver("probe D2H copy"))?
            },
            ProbeMode::MemcpyD2hPageable => unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut pageable, dev, stream.cu_stream())
                    .map_err(driver("probe pageable D2H copy"))?
            },
        }
        stream
            .synchronize()
            .map_err(driver("waiting for the probe"))?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    };
    let reps = 20;
    let mut rows = Vec::new();
    for mode in [
        ProbeMode::MemcpyH2dPinned,
        ProbeMode::MemcpyD2hPinned,
        ProbeMode::MemcpyD2hPageable,
        ProbeMode::KernelMapped,
    ] {
        for _ in 0..3 {
            time_one(mode)?;
        }
        let quiet: Vec<f64> = (0..reps)
            .map(|_| time_one(mode))
            .collect::<Result<_, _>>()?;
        let mut pump = SwapPump::new(traffic, load(2, true, true));
        let mut busy = Vec::new();
        for _ in 0..reps {
            pump.top_up(engine, records)?;
            busy.push(time_one(mode)?);
            // Space the probes like decode steps, so the copy queues refill between them.
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        records.extend(engine.wait_all()?);
        let quiet_p50 = percentile_50(&quiet);
        let busy_p50 = percentile_50(&busy);
        rows.push(SwapBenchRow {
            section: "copy-engine probe".into(),
            name: format!(
                "{} while both directions swap (2 x 1 GiB queued each)",
                mode.describe()
            ),
            bytes: if mode == ProbeMode::MemcpyD2hPageable {
                128
            } else {
                BYTES as u64
            },
            ms_p50: busy_p50,
            ms_min: min_of(&busy),
            reps: busy.len(),
            gb_per_s: 0.0,
            floor: quiet_p50,
            floor_what: "ms p50 of the same with the copy streams idle (host wall clock)".into(),
            ratio: busy_p50 / quiet_p50,
            target: "-".into(),
            meets_target: None,
            note: format!(
                "max while swapping {:.3} ms",
                busy.iter().cloned().fold(0.0, f64::max)
            ),
        });
    }
    unsafe { cudarc::driver::result::free_host(host as *mut _) }
        .map_err(driver("freeing the probe's host memory"))?;
    Ok(rows)
}
