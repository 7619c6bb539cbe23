//! Run summaries computed from turn, step and swap records.

use traces::summary::{LatencyDecomposition, LatencyStats, RunSummary};
use traces::{StepRecord, SwapRecord, TurnRecord};

/// Nearest-rank percentile of sorted samples (`p` in 0..=100); 0 for no samples.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(mut samples: Vec<u64>) -> LatencyStats {
    samples.sort_unstable();
    if samples.is_empty() {
        return LatencyStats::default();
    }
    let sum: u128 = samples.iter().map(|&s| s as u128).sum();
    LatencyStats {
        count: samples.len() as u64,
        mean_ns: (sum / samples.len() as u128) as u64,
        p50_ns: percentile(&samples, 50.0),
        p90_ns: percentile(&samples, 90.0),
        p99_ns: percentile(&samples, 99.0),
        max_ns: *samples.last().expect("non-empty"),
    }
}

/// The parts of one completed turn's latency; they add up to `total_ns` exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TurnParts {
    pub total_ns: u64,
    pub queue_wait_ns: u64,
    pub kv_restore_ns: u64,
    pub prefill_ns: u64,
    pub decode_ns: u64,
    pub ttft_ns: u64,
}

/// Splits a completed turn's latency. KV restore is the part of the wait before admission during
/// which the turn's KV was being copied back (a prefetch that finished before the agent returned
/// costs nothing); queue wait is the rest of that wait; prefill runs from admission to the first
/// token, decode from there to the last.
pub fn decompose(t: &TurnRecord) -> Option<TurnParts> {
    let (admitted, first, finished) = (t.admitted_ns?, t.first_token_ns?, t.finished_ns?);
    let arrival = t.arrival_ns;
    let wait = admitted.saturating_sub(arrival);
    let restore = match (t.restore_start_ns, t.restore_end_ns) {
        (Some(start), Some(end)) if end > arrival => {
            end.min(admitted).saturating_sub(start.max(arrival))
        }
        _ => 0,
    }
    .min(wait);
    Some(TurnParts {
        total_ns: finished - arrival,
        queue_wait_ns: wait - restore,
        kv_restore_ns: restore,
        prefill_ns: first - admitted,
        decode_ns: finished - first,
        ttft_ns: first - arrival,
    })
}

fn mean_decomposition(parts: &[TurnParts]) -> LatencyDecomposition {
    if parts.is_empty() {
        return LatencyDecomposition::default();
    }
    let n = parts.len() as u128;
    let avg =
        |f: fn(&TurnParts) -> u64| (parts.iter().map(|p| f(p) as u128).sum::<u128>() / n) as u64;
    LatencyDecomposition {
        queue_wait_ns: avg(|p| p.queue_wait_ns),
        kv_restore_ns: avg(|p| p.kv_restore_ns),
        prefill_ns: avg(|p| p.prefill_ns),
        decode_ns: avg(|p| p.decode_ns),
    }
}

/// Nearest-rank bounds of the window of turns that explains the P99: ranks from the 98.5th to the
/// 99.5th percentile. The window always holds the P99 turn itself.
const P99_WINDOW: (f64, f64) = (98.5, 99.5);

/// The P99 split into parts that add up to it exactly. The parts' shares are those of the turns
/// ranked in [`P99_WINDOW`] (sorted by latency): a mean over every turn at or above the P99 can sum
/// to far more than the P99 when the last turns are outliers, which explained nothing.
fn p99_decomposition(by_total: &[TurnParts], p99: u64) -> LatencyDecomposition {
    let n = by_total.len();
    if n == 0 {
        return LatencyDecomposition::default();
    }
    let rank = |p: f64| (((p / 100.0) * n as f64).ceil() as usize).clamp(1, n);
    let window = &by_total[rank(P99_WINDOW.0) - 1..rank(P99_WINDOW.1)];
    let sum = |f: fn(&TurnParts) -> u64| window.iter().map(|p| f(p) as u128).sum::<u128>();
    let sums = [
        sum(|p| p.queue_wait_ns),
        sum(|p| p.kv_restore_ns),
        sum(|p| p.prefill_ns),
        sum(|p| p.decode_ns),
    ];
    let total: u128 = sums.iter().sum();
    let mut parts = [0u64; 4];
    if total > 0 {
        for (part, &s) in parts.iter_mut().zip(&sums) {
            // Exact in u128 for any realistic run; a product that overflows falls back to f64.
            *part = match s.checked_mul(p99 as u128) {
                Some(x) => (x / total) as u64,
                None => ((s as f64 / total as f64) * p99 as f64) as u64,
            }
            .min(p99);
        }
        // Rounding leftovers go to the largest part (the first on ties), so the sum is the P99.
        let largest = (0..4).fold(0, |best, i| if parts[i] > parts[best] { i } else { best });
        let rest: u64 = parts
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != largest)
            .map(|(_, &v)| v)
            .sum();
        parts[largest] = p99.saturating_sub(rest);
    }
    LatencyDecomposition {
        queue_wait_ns: parts[0],
        kv_restore_ns: parts[1],
        prefill_ns: parts[2],
        decode_ns: parts[3],
    }
}

/// What a summary needs besides the records.
#[derive(Clone, Debug, Default)]
pub struct SummaryInputs {
    pub policy: String,
    pub workload: String,
    pub agents: u32,
    pub seed: u64,
    pub turns_planned: u64,
    pub block_bytes: u64,
    pub gpu_blocks_total: u32,
    pub host_blocks_total: u32,
    pub slo_ns: u64,
}

pub fn summarize(
    inputs: &SummaryInputs,
    turns: &[TurnRecord],
    steps: &[StepRecord],
    swaps: &[SwapRecord],
) -> RunSummary {
    let parts: Vec<TurnParts> = turns.iter().filter_map(decompose).collect();
    let mut by_total = parts.clone();
    by_total.sort_by_key(|p| p.total_ns);
    let totals: Vec<u64> = by_total.iter().map(|p| p.total_ns).collect();
    let p99 = percentile(&totals, 99.0);
    let completed = parts.len() as u64;
    let within_slo = parts.iter().filter(|p| p.total_ns <= inputs.slo_ns).count() as u64;
    let end_ns = turns
        .iter()
        .filter_map(|t| t.finished_ns)
        .chain(steps.iter().map(|s| s.start_ns + s.duration_ns))
        .max()
        .unwrap_or(0);
    let tokens_generated: u64 = turns.iter().map(|t| t.tokens_generated as u64).sum();
    let gpu_free_min = steps
        .iter()
        .map(|s| s.gpu_blocks_free)
        .min()
        .unwrap_or(inputs.gpu_blocks_total);
    let host_free_min = steps
        .iter()
        .map(|s| s.host_blocks_free)
        .min()
        .unwrap_or(inputs.host_blocks_total);
    RunSummary {
        schema_version: traces::SCHEMA_VERSION,
        policy: inputs.policy.clone(),
        workload: inputs.workload.clone(),
        agents: inputs.agents,
        seed: inputs.seed,
        turns_total: inputs.turns_planned,
        turns_completed: completed,
        turns_rejected: turns.iter().filter(|t| t.rejected).count() as u64,
        turn_latency: stats(parts.iter().map(|p| p.total_ns).collect()),
        ttft: stats(parts.iter().map(|p| p.ttft_ns).collect()),
        queue_wait: stats(parts.iter().map(|p| p.queue_wait_ns).collect()),
        kv_restore: stats(parts.iter().map(|p| p.kv_restore_ns).collect()),
        decomposition_mean: mean_decomposition(&parts),
        decomposition_p99: p99_decomposition(&by_total, p99),
        swaps_out: swaps.iter().filter(|s| s.direction == "out").count() as u64,
        swaps_in: swaps.iter().filter(|s| s.direction == "in").count() as u64,
        swap_out_bytes: swaps
            .iter()
            .filter(|s| s.direction == "out")
            .map(|s| s.bytes)
            .sum(),
        swap_in_bytes: swaps
            .iter()
            .filter(|s| s.direction == "in")
            .map(|s| s.bytes)
            .sum(),
        drops: steps.iter().map(|s| s.drops as u64).sum(),
        dropped_tokens: steps.iter().map(|s| s.dropped_tokens).sum(),
        preemptions: turns.iter().map(|t| t.preemptions as u64).sum(),
        turns_preempted: turns.iter().filter(|t| t.preemptions > 0).count() as u64,
        requeued_ns: turns.iter().map(|t| t.requeued_ns).sum(),
        cache_evicted_blocks: steps.iter().map(|s| s.cache_evicted_blocks as u64).sum(),
        restores: turns.iter().filter(|t| t.kv_source == "swapped_in").count() as u64,
        turns_with_recompute: turns.iter().filter(|t| t.tokens_recomputed > 0).count() as u64,
        tokens_prefilled: turns.iter().map(|t| t.tokens_prefilled as u64).sum(),
        tokens_recomputed: turns.iter().map(|t| t.tokens_recomputed as u64).sum(),
        tokens_generated,
        steps: steps.len() as u64,
        sim_time_ns: end_ns,
        throughput_tokens_per_s: if end_ns > 0 {
            tokens_generated as f64 / (end_ns as f64 / 1e9)
        } else {
            0.0
        },
        // Saturating: inputs that understate the pools (a caller that only wants latencies) give 0.
        gpu_kv_bytes_peak: inputs.gpu_blocks_total.saturating_sub(gpu_free_min) as u64
            * inputs.block_bytes,
        host_kv_bytes_peak: inputs.host_blocks_total.saturating_sub(host_free_min) as u64
            * inputs.block_bytes,
        agents_alive_peak: agents_alive_peak(turns),
        slo_ns: inputs.slo_ns,
        slo_attainment: if completed > 0 {
            within_slo as f64 / completed as f64
        } else {
            0.0
        },
    }
}

/// Most agents alive at once: an agent is alive from its first turn's arrival to the end of its
/// last turn (finished or rejected).
pub fn agents_alive_peak(turns: &[TurnRecord]) -> u32 {
    let mut span: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
    for t in turns {
        let end = t.finished_ns.unwrap_or(t.arrival_ns);
        let e = span.entry(t.agent_id).or_insert((t.arrival_ns, end));
        e.0 = e.0.min(t.arrival_ns);
        e.1 = e.1.max(end);
    }
    // Ends sort before starts at the same instant (an agent that ends as another starts is not
    // counted twice).
    let mut edges: Vec<(u64, i32)> = span
        .values()
        .flat_map(|&(s, e)| [(s, 1), (e, -1)])
        .collect();
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut alive, mut peak) = (0i64, 0i64);
    for (_, d) in edges {
        alive += d as i64;
        peak = peak.max(alive);
    }
    peak as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(
        arrival: u64,
        restore: Option<(u64, u64)>,
        admitted: u64,
        first: u64,
        finished: u64,
    ) -> TurnRecord {
        TurnRecord {
            agent_id: 0,
            turn_index: 1,
            arrival_ns: arrival,
            admitted_ns: Some(admitted),
            restore_start_ns: restore.map(|r| r.0),
            restore_end_ns: restore.map(|r| r.1),
            first_token_ns: Some(first),
            finished_ns: Some(finished),
            tokens_prefilled: 0,
            tokens_recomputed: 0,
            tokens_generated: 1,
            tokens_generated_requested: 1,
            context_tokens_at_admit: 0,
            kv_source: "resident".into(),
            rejected: false,
            preemptions: 0,
            requeued_ns: 0,
        }
    }

    #[test]
    fn parts_add_up_and_a_hidden_prefetch_costs_nothing() {
        let p = decompose(&turn(100, Some((50, 90)), 120, 150, 400)).unwrap();
        assert_eq!(
            (p.kv_restore_ns, p.queue_wait_ns, p.prefill_ns, p.decode_ns),
            (0, 20, 30, 250)
        );
        let p = decompose(&turn(100, Some((110, 130)), 140, 150, 400)).unwrap();
        assert_eq!((p.kv_restore_ns, p.queue_wait_ns), (20, 20));
        assert_eq!(
            p.queue_wait_ns + p.kv_restore_ns + p.prefill_ns + p.decode_ns,
            p.total_ns
        );
    }

    /// 1,000 turns whose latency grows with rank (a tenth queue, the rest decode), the slowest
    /// three far above everything else: the mean over the turns at or above the P99 is far above
    /// the P99; the decomposition must still add up to the P99 and keep the turns' shares.
    #[test]
    fn p99_decomposition_adds_up_despite_outliers() {
        let turns: Vec<TurnRecord> = (1..=1000u64)
            .map(|i| {
                let total = if i > 997 { 1_000_000 * i } else { 1_000 * i };
                turn(0, None, total / 10, total / 10, total)
            })
            .collect();
        let s = summarize(&SummaryInputs::default(), &turns, &[], &[]);
        let d = &s.decomposition_p99;
        let sum = d.queue_wait_ns + d.kv_restore_ns + d.prefill_ns + d.decode_ns;
        assert_eq!(s.turn_latency.p99_ns, 990_000);
        assert_eq!(sum, s.turn_latency.p99_ns, "{d:?}");
        assert_eq!(
            (d.queue_wait_ns, d.kv_restore_ns, d.prefill_ns),
            (99_000, 0, 0)
        );
        // The old form (mean over turns at or above the P99) is far from the P99 here.
        let tail: Vec<TurnParts> = turns
            .iter()
            .filter_map(decompose)
            .filter(|p| p.total_ns >= 990_000)
            .collect();
        let old = mean_decomposition(&tail);
        assert!(old.queue_wait_ns + old.decode_ns > 20 * sum);
    }

    #[test]
    fn p99_decomposition_of_one_turn_is_that_turn() {
        let s = summarize(
            &SummaryInputs::default(),
            &[turn(0, Some((0, 7)), 10, 13, 20)],
            &[],
            &[],
        );
        let d = &s.decomposition_p99;
        assert_eq!(
            (d.queue_wait_ns, d.kv_restore_ns, d.prefill_ns, d.decode_ns),
            (3, 7, 3, 7)
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(
            (
                percentile(&v, 50.0),
                percentile(&v, 99.0),
                percentile(&v, 100.0)
            ),
            (50, 99, 100)
        );
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn alive_peak_counts_overlaps() {
        let mut a = turn(0, None, 0, 1, 10);
        let mut b = turn(5, None, 5, 6, 20);
        let mut c = turn(10, None, 10, 11, 30);
        a.agent_id = 0;
        b.agent_id = 1;
        c.agent_id = 2;
        assert_eq!(agents_alive_peak(&[a, b, c]), 2);
    }
}
