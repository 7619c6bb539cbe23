//! The floors every transfer figure is compared with: raw contiguous pinned copies of 1 GiB in
//! each direction and in both at once, timed by events (not through the swap engine).

use std::sync::Arc;

use cudarc::driver::{sys, CudaStream};

use super::{driver, SwapBenchError, SwapBenchRow, GIB};
use crate::probe::swap::{min_of, percentile_50};
use crate::swap::cuda::CudaSwapEngine;
use crate::swap::SwapDirection;

pub(super) struct Floors {
    pub(super) out_gb_per_s: f64,
    pub(super) in_gb_per_s: f64,
    pub(super) both_gb_per_s: f64,
    pub(super) out_ms: Vec<f64>,
    pub(super) in_ms: Vec<f64>,
    pub(super) both_ms: Vec<f64>,
    pub(super) bytes: u64,
}

impl Floors {
    pub(super) fn rows(&self) -> Vec<SwapBenchRow> {
        let row = |name: &str, ms: &[f64], bytes: u64, gb: f64| SwapBenchRow {
            section: "floor".into(),
            name: name.into(),
            bytes,
            ms_p50: percentile_50(ms),
            ms_min: min_of(ms),
            reps: ms.len(),
            gb_per_s: gb,
            floor: 64.0,
            floor_what: "PCIe 5.0 x16 nominal, GB/s".into(),
            ratio: gb / 64.0,
            target: "-".into(),
            meets_target: None,
            note:
                "one contiguous cuMemcpyAsync per direction, raw driver call (not the swap engine)"
                    .into(),
        };
        vec![
            row(
                "pinned D2H 1 GiB contiguous",
                &self.out_ms,
                self.bytes,
                self.out_gb_per_s,
            ),
            row(
                "pinned H2D 1 GiB contiguous",
                &self.in_ms,
                self.bytes,
                self.in_gb_per_s,
            ),
            row(
                "pinned D2H + H2D 1 GiB each at once (aggregate)",
                &self.both_ms,
                2 * self.bytes,
                self.both_gb_per_s,
            ),
        ]
    }

    pub(super) fn for_direction(&self, direction: SwapDirection) -> f64 {
        match direction {
            SwapDirection::Out => self.out_gb_per_s,
            SwapDirection::In => self.in_gb_per_s,
        }
    }
}

/// Timed raw copies of 1 GiB (or the pool, if smaller) between block 0 of each pool.
pub(super) fn measure_floors(
    engine: &CudaSwapEngine,
    reps: usize,
) -> Result<Floors, SwapBenchError> {
    let gpu = engine.gpu_pool();
    let host = engine.host_pool();
    let bytes = (GIB as usize)
        .min(gpu.block_bytes * gpu.block_count as usize / 2)
        .min(host.total_bytes() as usize / 2);
    let device_a = gpu.block_ptr(0);
    let device_b = gpu.base + bytes as u64;
    let host_a = host.block_addr(0);
    let host_b = host_a + bytes as u64;
    let out_stream = engine.stream(SwapDirection::Out).clone();
    let in_stream = engine.stream(SwapDirection::In).clone();
    let ctx = out_stream.context().clone();
    let timed = |streams: &[(&Arc<CudaStream>, SwapDirection)]| -> Result<f64, SwapBenchError> {
        let mut pairs = Vec::new();
        for (stream, direction) in streams {
            let start = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver("creating an event"))?;
            let end = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver("creating an event"))?;
            start.record(stream).map_err(driver("recording an event"))?;
            unsafe {
                match direction {
                    SwapDirection::Out => sys::cuMemcpyDtoHAsync_v2(
                        host_a as *mut _,
                        device_a,
                        bytes,
                        stream.cu_stream(),
                    ),
                    SwapDirection::In => sys::cuMemcpyHtoDAsync_v2(
                        device_b,
                        host_b as *const _,
                        bytes,
                        stream.cu_stream(),
                    ),
                }
                .result()
            }
            .map_err(driver("enqueueing a floor copy"))?;
            end.record(stream).map_err(driver("recording an event"))?;
            pairs.push((start, end));
        }
        // Span from the first copy's start to the last copy's end (the aggregate's time).
        let mut last_ms = 0.0f64;
        for (_, end) in &pairs {
            end.synchronize()
                .map_err(driver("waiting for a floor copy"))?;
            last_ms = last_ms.max(
                pairs[0]
                    .0
                    .elapsed_ms(end)
                    .map_err(driver("timing a floor copy"))? as f64,
            );
        }
        Ok(last_ms)
    };
    let mut out_ms = Vec::new();
    let mut in_ms = Vec::new();
    let mut both_ms = Vec::new();
    // One warm-up of each, then the timed reps.
    for rep in 0..=reps {
        let o = timed(&[(&out_stream, SwapDirection::Out)])?;
        let i = timed(&[(&in_stream, SwapDirection::In)])?;
        let b = timed(&[
            (&out_stream, SwapDirection::Out),
            (&in_stream, SwapDirection::In),
        ])?;
        if rep > 0 {
            out_ms.push(o);
            in_ms.push(i);
            both_ms.push(b);
        }
    }
    let gb = |bytes: f64, ms: f64| bytes / (ms * 1e6);
    Ok(Floors {
        out_gb_per_s: gb(bytes as f64, percentile_50(&out_ms)),
        in_gb_per_s: gb(bytes as f64, percentile_50(&in_ms)),
        both_gb_per_s: gb(2.0 * bytes as f64, percentile_50(&both_ms)),
        out_ms,
        in_ms,
        both_ms,
        bytes: bytes as u64,
    })
}
