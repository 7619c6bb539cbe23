//! `summary.json`: the metrics of one run, computed by `analysis` from the turn and step records.

use serde::{Deserialize, Serialize};

/// Percentiles of a latency in nanoseconds (zero when there were no samples).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    pub count: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// The decomposition of a set of turns' latency into its parts (mean over the set, nanoseconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyDecomposition {
    pub queue_wait_ns: u64,
    pub kv_restore_ns: u64,
    pub prefill_ns: u64,
    pub decode_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub schema_version: u32,
    pub policy: String,
    pub workload: String,
    pub agents: u32,
    pub seed: u64,
    pub turns_total: u64,
    pub turns_completed: u64,
    pub turns_rejected: u64,
    /// Turn latency: arrival (or return from pause) to last generated token.
    pub turn_latency: LatencyStats,
    /// Time to first token after arrival / return.
    pub ttft: LatencyStats,
    pub queue_wait: LatencyStats,
    pub kv_restore: LatencyStats,
    /// Mean decomposition over all completed turns.
    pub decomposition_mean: LatencyDecomposition,
    /// The P99 turn latency split into parts that sum to `turn_latency.p99_ns` exactly: the shares
    /// are those of the turns ranked between the 98.5th and 99.5th percentile of latency, so
    /// "P99 = queue + restore + prefill + decode" reads off the summary.
    pub decomposition_p99: LatencyDecomposition,
    pub swaps_out: u64,
    pub swaps_in: u64,
    pub swap_out_bytes: u64,
    pub swap_in_bytes: u64,
    /// KV drops (of paused or waiting agents' KV, or prefix-cache losses), preemptions excluded.
    pub drops: u64,
    pub dropped_tokens: u64,
    /// Admitted turns sent back to wait before finishing (sum of the turns' `preemptions`).
    #[serde(default)]
    pub preemptions: u64,
    /// Turns preempted at least once.
    #[serde(default)]
    pub turns_preempted: u64,
    /// Time preempted turns spent waiting to compute again, summed over turns.
    #[serde(default)]
    pub requeued_ns: u64,
    pub cache_evicted_blocks: u64,
    /// Turns whose KV came back from host memory.
    pub restores: u64,
    /// Turns that recomputed dropped KV (fully or partly).
    pub turns_with_recompute: u64,
    pub tokens_prefilled: u64,
    pub tokens_recomputed: u64,
    pub tokens_generated: u64,
    pub steps: u64,
    pub sim_time_ns: u64,
    pub throughput_tokens_per_s: f64,
    pub gpu_kv_bytes_peak: u64,
    pub host_kv_bytes_peak: u64,
    pub agents_alive_peak: u32,
    /// Fraction of completed turns whose latency is at most `slo_ns`.
    pub slo_ns: u64,
    pub slo_attainment: f64,
}
