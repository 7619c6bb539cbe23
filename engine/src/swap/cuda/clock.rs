//! Converting CUDA event times to the run's clock.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

use super::driver;
use crate::swap::SwapError;

/// A host wall-clock time paired with a CUDA event recorded on an idle stream at that moment, so
/// event timestamps convert to the run's clock: `t(event) = wall_ns + elapsed(anchor, event)`.
/// Refreshed every second so the f32 milliseconds of `cuEventElapsedTime` stay precise (< 0.1 us).
pub(super) struct ClockAnchor {
    event: CudaEvent,
    wall_ns: u64,
    pub(super) taken_at: Instant,
}
impl ClockAnchor {
    pub(super) fn event_ns(&self, event: &CudaEvent) -> Result<u64, SwapError> {
        let elapsed_ms = unsafe { result::event::elapsed(self.event.cu_event(), event.cu_event()) }
            .map_err(driver("reading a swap event's time"))?;
        Ok((self.wall_ns as i64 + (elapsed_ms as f64 * 1e6).round() as i64).max(0) as u64)
    }
}

/// Records an anchor event on the idle `stream` and pairs it with the host time half-way between
/// the record call and its completion.
pub(super) fn take_anchor(
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
