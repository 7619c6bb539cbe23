//! Per-direction rate caps: pace gates on the copy streams.

use std::sync::Arc;

use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};

use super::{direction_index, driver, CudaSwapEngine};
use crate::swap::{SwapDirection, SwapError};

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
/// proportion to the bytes moved (docs/engine-swap.md), so an operator can trade swap speed for step time.
pub(super) struct Pacer {
    _module: Arc<CudaModule>,
    function: CudaFunction,
    /// Two device words: the release time (globaltimer ns) of the out and the in stream.
    release_words: sys::CUdeviceptr,
    /// The cap of the out and the in direction (infinite: that direction is not paced).
    pub(super) bytes_per_s: [f64; 2],
    pub(super) piece_bytes: usize,
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
/// (8 MiB pieces capped at 42-50 GB/s all ran at ~33 GB/s, docs/engine-swap.md), so pieces are large
/// enough (1.2 ms at 55 GB/s) for the cap, not the hand-over, to set the rate.
pub const DEFAULT_PACE_PIECE_BYTES: usize = 64 << 20;

impl CudaSwapEngine {
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
    /// a scheduler can pace swap-ins (the direction that costs a decode step most, docs/engine-swap.md)
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
    /// The rate cap of one direction in GB/s, if that direction is paced.
    pub fn rate_cap_gb_per_s(&self, direction: SwapDirection) -> Option<f64> {
        self.pacer
            .as_ref()
            .map(|p| p.bytes_per_s[direction_index(direction)])
            .filter(|cap| cap.is_finite())
            .map(|cap| cap / 1e9)
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
    /// The pacer, if `direction` has a rate cap.
    pub(super) fn paced(&self, direction: SwapDirection) -> Option<&Pacer> {
        self.pacer
            .as_ref()
            .filter(|p| p.bytes_per_s[direction_index(direction)].is_finite())
    }
    /// The scratch copies in groups of at most `piece_bytes` (scattered blocks are one copy each),
    /// each group behind one pace gate on the same stream.
    pub(super) fn enqueue_paced(
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
            self.enqueue_each(stream, direction, first..group_end)?;
            first = group_end;
        }
        Ok(())
    }
}
