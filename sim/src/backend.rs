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

    /// The step time of a batch with no copy running, in nanoseconds (the profile's cost form,
    /// `GpuProfile::step_ns`).
    pub fn step_ns(&self, batch: &StepBatch) -> u64 {
        self.profile.step_ns(&step_shape(batch)).round() as u64
    }

    /// The step time of a batch starting at `now`, beside the copies queued on the two channels by
    /// then (`GpuProfile::step_ns_beside_copies`; equal to `step_ns` when the profile's channels
    /// cost steps nothing, as in every analytic profile). Copies started during the step are not
    /// counted: the step's time is fixed when it starts, which keeps the run loop event-ordered.
    pub fn step_ns_at(&self, now: SimTime, batch: &StepBatch) -> u64 {
        let h2d_busy_ns = self.h2d_free_at.saturating_sub(now).as_nanos() as f64;
        let d2h_busy_ns = self.d2h_free_at.saturating_sub(now).as_nanos() as f64;
        self.profile
            .step_ns_beside_copies(&step_shape(batch), h2d_busy_ns, d2h_busy_ns)
            .round() as u64
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
        now: SimTime,
        batch: &StepBatch,
        _kv: &KvManager,
    ) -> Result<u64, BackendError> {
        Ok(self.step_ns_at(now, batch).max(1))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(copy_cost: f64) -> GpuProfile {
        let mut p: GpuProfile = serde_json::from_str(include_str!(
            "../../calibration/profiles/h100-llama2-7b.json"
        ))
        .unwrap();
        p.host_to_device.step_memory_bytes_per_copied_byte = copy_cost;
        p
    }

    /// Batch 32 at context 2048: a memory-bound decode step.
    fn decode_batch() -> StepBatch {
        StepBatch {
            prefill: vec![],
            decode: (0..32)
                .map(|agent| BatchSeq {
                    agent,
                    context_tokens: 2048,
                    tokens: 1,
                })
                .collect(),
        }
    }

    fn swap_in(gpu: &mut SimGpu, kv: &KvManager, at: SimTime, blocks: u32) -> u64 {
        let job = SwapJob {
            id: 0,
            agent: 0,
            direction: SwapDirection::In,
            pairs: (0..blocks).map(|b| (b, b)).collect(),
        };
        gpu.start_swap(at, &job, kv).unwrap();
        gpu.channel_busy_until(SwapDirection::In).as_nanos() - at.as_nanos()
    }

    #[test]
    fn a_step_beside_a_swap_in_slows_only_when_copies_cost_steps() {
        let kv = KvManager::new(16, 4096, 4096, 1);
        let batch = decode_batch();
        let start = SimTime::from_millis(1);
        // Free copies (the analytic profile): the same step time with or without a swap queued.
        let mut free = SimGpu::new(profile(0.0), 16);
        let quiet_ns = free.step_ns(&batch);
        swap_in(&mut free, &kv, start, 256);
        assert_eq!(free.execute_step(start, &batch, &kv).unwrap(), quiet_ns);
        // Costly copies: a 2 GiB swap-in outlasting the step slows it by cost x rate / bandwidth.
        let mut costly = SimGpu::new(profile(2.5), 16);
        let busy_ns = swap_in(&mut costly, &kv, start, 256);
        assert!(busy_ns > quiet_ns);
        let p = profile(2.5);
        let want =
            2.5 * p.host_to_device.bandwidth_bytes_per_s / p.cost.memory_bandwidth_bytes_per_s;
        let got = costly.execute_step(start, &batch, &kv).unwrap() as f64 / quiet_ns as f64 - 1.0;
        assert!((got - want).abs() < 1e-4, "slowdown {got}, want {want}");
        // After the swap has finished, steps are quiet again.
        let later = SimTime(start.as_nanos() + busy_ns);
        assert_eq!(costly.execute_step(later, &batch, &kv).unwrap(), quiet_ns);
    }
}
