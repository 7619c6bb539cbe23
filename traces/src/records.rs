//! Per-turn, per-step and per-swap records (CSV, one row each). Simulated and real runs write the
//! same columns, so analysis and calibration never care where a trace came from.

use serde::{Deserialize, Serialize};

/// Where a turn's KV came from when it started.
pub const KV_SOURCES: [&str; 5] = [
    "new",
    "resident",
    "swapped_in",
    "recomputed",
    "partial_recompute",
];

/// One turn of one agent. Times are nanoseconds since the run started; an optional time is empty
/// in the CSV when the event never happened (e.g. no restore, or a rejected turn).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    pub agent_id: u32,
    pub turn_index: u32,
    /// When the turn's input was ready (agent arrived or came back from its pause).
    pub arrival_ns: u64,
    /// Start of the first engine step that computed for this turn.
    pub admitted_ns: Option<u64>,
    /// Swap-in that made the KV resident for this turn, if any.
    pub restore_start_ns: Option<u64>,
    pub restore_end_ns: Option<u64>,
    pub first_token_ns: Option<u64>,
    pub finished_ns: Option<u64>,
    /// Tokens whose KV was computed for the first time in this turn (prefill part).
    pub tokens_prefilled: u32,
    /// Tokens whose KV had been computed before, was dropped, and was computed again.
    pub tokens_recomputed: u32,
    pub tokens_generated: u32,
    pub tokens_generated_requested: u32,
    /// Context (tokens with KV) when the turn was admitted.
    pub context_tokens_at_admit: u32,
    /// One of [`KV_SOURCES`].
    pub kv_source: String,
    /// True when the turn was rejected (out of memory) and never ran.
    pub rejected: bool,
    /// Times the turn was preempted after admission: its KV dropped, released or moved off the
    /// GPU while the turn was unfinished, so it went back to wait for compute.
    #[serde(default)]
    pub preemptions: u32,
    /// Time from each preemption to the turn's next step, summed (part of its prefill or decode
    /// time in the latency decomposition, which starts at the first admission).
    #[serde(default)]
    pub requeued_ns: u64,
}

/// One engine step (one forward over a batch).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step_index: u64,
    pub start_ns: u64,
    pub duration_ns: u64,
    pub prefill_tokens: u32,
    pub prefill_sequences: u32,
    /// Prefill tokens x their attended context (the attention term of prefill cost).
    pub prefill_attention_pairs: u64,
    pub decode_batch: u32,
    /// Sum of the context lengths (tokens) of the decode batch.
    pub decode_context_tokens: u64,
    pub swap_in_bytes_started: u64,
    pub swap_out_bytes_started: u64,
    /// Agents whose KV (or part of it) was dropped by the plans since the last record, preemptions
    /// excluded (those are counted in `preemptions`).
    pub drops: u32,
    pub dropped_tokens: u64,
    /// Prefix-cache blocks reused for other data by this step's allocations (vllm policies).
    pub cache_evicted_blocks: u32,
    pub gpu_blocks_free: u32,
    pub host_blocks_free: u32,
    /// Admitted, unfinished turns sent back to wait by the plans since the last record.
    #[serde(default)]
    pub preemptions: u32,
}

/// One asynchronous KV copy between GPU and host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SwapRecord {
    pub swap_id: u64,
    pub agent_id: u32,
    /// "out" (GPU to host) or "in" (host to GPU).
    pub direction: String,
    pub block_count: u32,
    pub bytes: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Swaps in flight (both directions, this one included) when it started.
    pub concurrent_swaps_at_start: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{csv_bytes, parse_csv};
    use std::path::Path;

    #[test]
    fn turn_rows_round_trip_with_empty_optionals() {
        let row = TurnRecord {
            agent_id: 1,
            turn_index: 0,
            arrival_ns: 5,
            admitted_ns: None,
            restore_start_ns: None,
            restore_end_ns: None,
            first_token_ns: None,
            finished_ns: None,
            tokens_prefilled: 0,
            tokens_recomputed: 0,
            tokens_generated: 0,
            tokens_generated_requested: 3,
            context_tokens_at_admit: 0,
            kv_source: "new".into(),
            rejected: true,
            preemptions: 2,
            requeued_ns: 9,
        };
        let bytes = csv_bytes(&[row.clone()]).unwrap();
        let back: Vec<TurnRecord> = parse_csv(Path::new("t.csv"), &bytes).unwrap();
        assert_eq!(back, vec![row]);
    }

    #[test]
    fn turn_rows_without_preemption_columns_still_read() {
        let text = "agent_id,turn_index,arrival_ns,admitted_ns,restore_start_ns,restore_end_ns,first_token_ns,finished_ns,tokens_prefilled,tokens_recomputed,tokens_generated,tokens_generated_requested,context_tokens_at_admit,kv_source,rejected\n0,0,1,2,,,3,4,5,0,1,1,0,new,false\n";
        let back: Vec<TurnRecord> = parse_csv(Path::new("t.csv"), text.as_bytes()).unwrap();
        assert_eq!(
            (
                back[0].preemptions,
                back[0].requeued_ns,
                back[0].finished_ns
            ),
            (0, 0, Some(4))
        );
    }

    #[test]
    fn truncated_row_names_the_line() {
        let bytes = csv_bytes(&[SwapRecord {
            swap_id: 0,
            agent_id: 0,
            direction: "in".into(),
            block_count: 1,
            bytes: 8,
            start_ns: 0,
            end_ns: 1,
            concurrent_swaps_at_start: 1,
        }])
        .unwrap();
        let mut text = String::from_utf8(bytes).unwrap();
        text.push_str("1,2,out\n");
        let err = parse_csv::<SwapRecord>(Path::new("s.csv"), text.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.csv") && err.contains("line 3"), "{err}");
    }
}
