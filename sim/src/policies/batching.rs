//! Batch policies: how one step is filled with prefill once its decodes are in. A batch policy is
//! an axis of its own, separate from the KV policy (what stays, moves, drops, is admitted or is
//! prefetched): every KV policy runs under the batch policy of the run's `SchedConfig`, so a
//! comparison of KV policies never mixes in a difference in batching.
//!
//! Every batch policy puts the committed decodes first (one token each) and never exceeds the
//! step's token and sequence budgets; they differ only in the cap on the step's prefill tokens.

use crate::ids::AgentId;
use crate::sched::SchedView;

/// Prefill floor of [`BatchPolicy::StallFree`] while turns wait in the queue.
pub const STALL_FREE_FLOOR_TOKENS: u32 = 1024;
/// Prefill floor of [`BatchPolicy::StallFree`] while nothing waits (a larger chunk: no queue to
/// drain, so the prefilling turn's own latency counts more).
pub const STALL_FREE_IDLE_FLOOR_TOKENS: u32 = 2048;

/// How a step's prefill budget is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchPolicy {
    /// Prefill fills whatever the decodes leave of the step's token budget (vLLM's default).
    Fill,
    /// At most this many prefill tokens per step (a fixed chunk, whatever runs).
    Chunk(u32),
    /// Stall-free (SLO-aware) prefill: while decodes run, the step carries the prefill tokens its
    /// memory-bound decode leaves compute idle for, at least a floor (1,024 tokens while turns
    /// wait, 2,048 while none does); without decodes, the whole budget.
    StallFree,
}

/// The default batch policy of every KV policy: under it the capacity of djinn, vllm, swap and
/// next-use on seed-cliff, agents-capacity and swe-agent is the best or within 1.2% of the best of
/// the three batch policies (`fill` lost up to 56 agents, `stall-free` up to 13; the figures are in
/// docs/policies-and-workloads.md).
pub const DEFAULT_BATCHING: BatchPolicy = BatchPolicy::Chunk(1024);
/// [`DEFAULT_BATCHING`]'s name (command-line defaults).
pub const DEFAULT_BATCHING_NAME: &str = "chunk-1024";

impl Default for BatchPolicy {
    fn default() -> Self {
        DEFAULT_BATCHING
    }
}

impl BatchPolicy {
    /// The name used on the command line, in manifests and table headers.
    pub fn name(self) -> String {
        match self {
            BatchPolicy::Fill => "fill".into(),
            BatchPolicy::Chunk(n) => format!("chunk-{n}"),
            BatchPolicy::StallFree => "stall-free".into(),
        }
    }

    /// Parses `fill`, `chunk-N` (N from 1 to 65,536) or `stall-free`.
    pub fn parse(name: &str) -> Result<BatchPolicy, String> {
        match name {
            "fill" => Ok(BatchPolicy::Fill),
            "stall-free" => Ok(BatchPolicy::StallFree),
            _ => {
                let n = name
                    .strip_prefix("chunk-")
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|n| (1..=65_536).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "unknown batch policy `{name}`: expected fill, stall-free or chunk-N (N from 1 to 65536)"
                        )
                    })?;
                Ok(BatchPolicy::Chunk(n))
            }
        }
    }

    /// Most prefill tokens this step may carry (before the step's own token budget), given the
    /// agents decoding in it and whether turns wait for admission.
    pub fn prefill_cap(self, view: &SchedView, decoding: &[AgentId], queue_waiting: bool) -> u32 {
        match self {
            BatchPolicy::Fill => u32::MAX,
            BatchPolicy::Chunk(n) => n,
            BatchPolicy::StallFree => stall_free_cap(view, decoding, queue_waiting),
        }
    }
}

/// A decode step is memory-bound: it reads the weights and every cached token of every decoding
/// sequence, while its compute (one token per sequence) leaves the GPU's matrix units mostly
/// idle. Prefill tokens up to that idle compute ride along for free; more lengthen the step for
/// every decode in it.
fn stall_free_cap(view: &SchedView, decoding: &[AgentId], queue_waiting: bool) -> u32 {
    let costs = view.costs;
    if decoding.is_empty() || costs.kv_read_ns_per_token <= 0.0 {
        return u32::MAX;
    }
    let floor = if queue_waiting {
        STALL_FREE_FLOOR_TOKENS
    } else {
        STALL_FREE_IDLE_FLOOR_TOKENS
    };
    let ctx: u64 = decoding.iter().map(|&a| view.kv.kv_tokens(a) as u64).sum();
    let memory_ns = costs.decode_step_ns + ctx as f64 * costs.kv_read_ns_per_token;
    let compute_ns = decoding.len() as f64 * costs.prefill_ns_per_token;
    let idle_compute_tokens =
        ((memory_ns - compute_ns) / costs.prefill_ns_per_token.max(1e-9)).max(0.0);
    (idle_compute_tokens.min(u32::MAX as f64) as u32).max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_explained() {
        for p in [
            BatchPolicy::Fill,
            BatchPolicy::Chunk(1024),
            BatchPolicy::StallFree,
        ] {
            assert_eq!(BatchPolicy::parse(&p.name()), Ok(p));
        }
        assert_eq!(
            BatchPolicy::parse(DEFAULT_BATCHING_NAME),
            Ok(DEFAULT_BATCHING)
        );
        for bad in ["chunk-0", "chunk-", "chunk-x", "chunk-70000", "fil"] {
            let e = BatchPolicy::parse(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("stall-free"), "{e}");
        }
    }
}
