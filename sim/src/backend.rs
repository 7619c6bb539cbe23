//! The backend seam: what executes a step's compute and the swaps. `SimGpu` prices them from a
//! GPU profile; the engine's CUDA backend runs them for real. Both see the same block ids.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use traces::GpuProfile;

use crate::ids::{AgentId, SwapId};
use crate::kv::{KvManager, SwapDirection, SwapJob};
use crate::time::SimTime;

/// One sequence of a step's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSeq {
    pub agent: AgentId,
    /// Tokens whose KV is already in the cache (the attended context before this step).
    pub context_tokens: u32,
    /// New tokens computed this step (1 for a decode).
    pub tokens: u32,
}

/// The compute of one step, with block tables readable from the `KvManager` passed alongside.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub prefill: Vec<BatchSeq>,
    pub decode: Vec<BatchSeq>,
}

impl StepBatch {
    pub fn clear(&mut self) {
        self.prefill.clear();
        self.decode.clear();
    }
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill.iter().map(|s| s.tokens as u64).sum()
    }
    /// Query-key pairs of the causal prefill attention: each new token attends to the context
    /// and to the new tokens before it.
    pub fn prefill_attention_pairs(&self) -> u64 {
        self.prefill
            .iter()
            .map(|s| {
                s.tokens as u64 * s.context_tokens as u64
                    + s.tokens as u64 * (s.tokens as u64 + 1) / 2
            })
            .sum()
    }
    /// Context tokens the decode batch attends to (its KV reads).
    pub fn decode_context_tokens(&self) -> u64 {
        self.decode
            .iter()
            .map(|s| s.context_tokens as u64 + 1)
            .sum()
    }
}

/// A swap that finished, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwapCompletion {
    pub swap_id: SwapId,
    pub at: SimTime,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend failed: {0}")]
    Failed(String),
}

/// Executes steps and swaps.
pub trait Backend {
    fn name(&self) -> String;
    /// Runs the step's compute starting at `now`; returns its duration in nanoseconds.
    fn execute_step(
        &mut self,
        now: SimTime,
        batch: &StepBatch,
        kv: &KvManager,
    ) -> Result<u64, BackendError>;
    /// Starts an asynchronous swap at `now` on the channel of its direction.
    fn start_swap(
        &mut self,
        now: SimTime,
        job: &SwapJob,
        kv: &KvManager,
    ) -> Result<(), BackendError>;
    /// Appends the swaps complete by `now` (in completion order).
    fn poll_swaps(&mut self, now: SimTime, out: &mut Vec<SwapCompletion>);
    /// When the next swap in flight completes, if known (always known in simulation).
    fn next_swap_completion(&self) -> Option<SimTime>;
    /// Until when the channel of `direction` is busy with queued copies.
    fn channel_busy_until(&self, direction: SwapDirection) -> SimTime;
}

/// The simulated GPU: deterministic costs from a profile (see `traces::profile::CostModel`).
#[derive(Clone, Debug)]
pub struct SimGpu {
    profile: GpuProfile,
    block_bytes: u64,
    h2d_free_at: SimTime,
    d2h_free_at: SimTime,
    /// (completion time, swap id): ties broken by id, i.e. start order.
    pending: BinaryHeap<Reverse<(SimTime, SwapId)>>,
}

impl SimGpu {
    pub fn new(profile: GpuProfile, block_size_tokens: u32) -> Self {
        let block_bytes = profile.kv_bytes_per_token * block_size_tokens as u64;
        SimGpu {
            profile,
            block_bytes,
            h2d_free_at: SimTime::ZERO,
            d2h_free_at: SimTime::ZERO,
            pending: BinaryHeap::new(),
        }
    }

    /// The step time of a batch, in nanoseconds (the profile's cost form, `GpuProfile::step_ns`).
    pub fn step_ns(&self, batch: &StepBatch) -> u64 {
        self.profile.step_ns(&step_shape(batch)).round() as u64
    }

    pub fn swap_ns(&self, direction: SwapDirection, bytes: u64) -> u64 {
        let ch = match direction {
            SwapDirection::In => &self.profile.host_to_device,
            SwapDirection::Out => &self.profile.device_to_host,
        };
        // Saturating: a valid profile may have an absurd latency or a tiny bandwidth; the run then
        // ends at its time limit instead of overflowing (found by the robust-input tests).
        ch.latency_ns
            .saturating_add((bytes as f64 / ch.bandwidth_bytes_per_s * 1e9).round() as u64)
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }
}

impl Backend for SimGpu {
    fn name(&self) -> String {
        "sim".into()
    }

    fn execute_step(
        &mut self,
        _now: SimTime,
        batch: &StepBatch,
        _kv: &KvManager,
    ) -> Result<u64, BackendError> {
        Ok(self.step_ns(batch).max(1))
    }

    fn start_swap(
        &mut self,
        now: SimTime,
        job: &SwapJob,
        _kv: &KvManager,
    ) -> Result<(), BackendError> {
        let bytes = job.pairs.len() as u64 * self.block_bytes;
        let duration = self.swap_ns(job.direction, bytes);
        // One copy stream per direction: copies of a direction run one after another (FIFO).
        let free_at = match job.direction {
            SwapDirection::In => &mut self.h2d_free_at,
            SwapDirection::Out => &mut self.d2h_free_at,
        };
        let end = (*free_at).max(now) + duration;
        *free_at = end;
        self.pending.push(Reverse((end, job.id)));
        Ok(())
    }

    fn poll_swaps(&mut self, now: SimTime, out: &mut Vec<SwapCompletion>) {
        while let Some(Reverse((at, id))) = self.pending.peek().copied() {
            if at > now {
                break;
            }
            self.pending.pop();
            out.push(SwapCompletion { swap_id: id, at });
        }
    }

    fn next_swap_completion(&self) -> Option<SimTime> {
        self.pending.peek().map(|Reverse((at, _))| *at)
    }

    fn channel_busy_until(&self, direction: SwapDirection) -> SimTime {
        match direction {
            SwapDirection::In => self.h2d_free_at,
            SwapDirection::Out => self.d2h_free_at,
        }
    }
}

/// The cost model's view of a planned batch.
pub fn step_shape(batch: &StepBatch) -> traces::StepShape {
    traces::StepShape {
        prefill_tokens: batch.prefill_tokens() as f64,
        prefill_context_read_tokens: batch
            .prefill
            .iter()
            .map(|s| (s.context_tokens + s.tokens) as f64)
            .sum(),
        prefill_attention_pairs: batch.prefill_attention_pairs() as f64,
        decode_sequences: batch.decode.len() as f64,
        decode_context_tokens: batch.decode_context_tokens() as f64,
        sequences: (batch.prefill.len() + batch.decode.len()) as f64,
    }
}
