//! Step and swap figures of a run, computed from its records so the real run and its simulated
//! twin are measured the same way.

use sim::time::SimTime;
use traces::{StepRecord, SwapRecord, TurnRecord};

/// Step and swap figures the comparison prints.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub step_ms_p50: f64,
    pub decode_step_ms_p50: f64,
    pub decode_batch_mean: f64,
    pub swap_out_gb_per_s: Option<f64>,
    pub swap_in_gb_per_s: Option<f64>,
    pub end_s: f64,
    /// First turns admitted with KV already covering some of their prompt: hits of a shared
    /// prefix (a first turn has no KV of its own yet), and the tokens those hits covered.
    pub prefix_hits: u64,
    pub prefix_hit_tokens: u64,
}

fn p50(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

/// Bytes over the time at least one swap of `direction` was between its start and its end. For
/// copies queued on one channel this is the channel's busy time, whether a record starts when the
/// copy began (the engine) or when it was queued (the simulator).
fn swap_gb_per_s(swaps: &[SwapRecord], direction: &str) -> Option<f64> {
    let mut spans: Vec<(u64, u64)> = swaps
        .iter()
        .filter(|s| s.direction == direction && s.end_ns > s.start_ns)
        .map(|s| (s.start_ns, s.end_ns))
        .collect();
    if spans.is_empty() {
        return None;
    }
    spans.sort();
    let mut busy_ns = 0u64;
    let (mut start, mut end) = spans[0];
    for &(s, e) in &spans[1..] {
        if s > end {
            busy_ns += end - start;
            start = s;
        }
        end = end.max(e);
    }
    busy_ns += end - start;
    let bytes: u64 = swaps
        .iter()
        .filter(|s| s.direction == direction && s.end_ns > s.start_ns)
        .map(|s| s.bytes)
        .sum();
    Some(bytes as f64 / busy_ns.max(1) as f64)
}

pub fn figures(
    turns: &[TurnRecord],
    steps: &[StepRecord],
    swaps: &[SwapRecord],
    end: SimTime,
) -> Figures {
    let hits: Vec<u64> = turns
        .iter()
        .filter(|t| t.turn_index == 0 && t.context_tokens_at_admit > 0)
        .map(|t| t.context_tokens_at_admit as u64)
        .collect();
    let mut all: Vec<f64> = steps.iter().map(|s| s.duration_ns as f64 / 1e6).collect();
    let decode: Vec<&StepRecord> = steps
        .iter()
        .filter(|s| s.prefill_tokens == 0 && s.decode_batch > 0)
        .collect();
    let mut decode_ms: Vec<f64> = decode.iter().map(|s| s.duration_ns as f64 / 1e6).collect();
    Figures {
        step_ms_p50: p50(&mut all),
        decode_step_ms_p50: p50(&mut decode_ms),
        decode_batch_mean: decode.iter().map(|s| s.decode_batch as f64).sum::<f64>()
            / decode.len().max(1) as f64,
        swap_out_gb_per_s: swap_gb_per_s(swaps, "out"),
        swap_in_gb_per_s: swap_gb_per_s(swaps, "in"),
        end_s: end.as_nanos() as f64 / 1e9,
        prefix_hits: hits.len() as u64,
        prefix_hit_tokens: hits.iter().sum(),
    }
}
