//! What a run keeps of its turns, steps and swaps: every record (run directories, calibration,
//! twins), or only what summary figures need (benchmarks, capacity probes). A million-agent run
//! makes tens of millions of turn and step records, gigabytes that a capacity probe or a
//! benchmark then reduces to a few numbers.

use traces::{StepRecord, TurnRecord};

use super::{LoopState, RunOutput};
use crate::backend::StepBatch;
use crate::time::SimTime;

/// How much of a run [`RunOutput`] keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recording {
    /// Every turn, step and swap record.
    #[default]
    Full,
    /// Per finished turn its two latencies ([`RunOutput::turn_latencies`]); steps and swaps
    /// only as counts.
    Latencies,
    /// Counts only.
    Counts,
}

/// The latencies of finished (not rejected) turns, in finishing order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TurnLatencies {
    /// Arrival to last token, ns.
    pub turn_ns: Vec<u64>,
    /// Arrival to first token of turns after a pause (not first turns), ns.
    pub ttft_after_pause_ns: Vec<u64>,
}

/// The records of turns in progress. Under [`Recording::Full`] a record stays where it was
/// opened and ends in `RunOutput::turns` (in arrival order, as the run directory expects); under
/// [`Recording::Latencies`] a closed record's slot is reused, so memory follows the turns in
/// progress. Under [`Recording::Counts`] nothing of a record is read back but its rejection,
/// which is read as soon as it is set (the turn closes at once): every turn writes into one
/// scratch record (a record per turn in progress took 160 MB of a million-agent run).
pub(super) struct TurnBook {
    recording: Recording,
    /// Slots of closed records, for reuse (only under `Latencies`).
    free: Vec<usize>,
    /// Turns opened and not closed.
    open: usize,
}

impl TurnBook {
    pub(super) fn new(recording: Recording) -> Self {
        TurnBook {
            recording,
            free: Vec::new(),
            open: 0,
        }
    }

    pub(super) fn keeps_steps(&self) -> bool {
        self.recording == Recording::Full
    }

    /// Stores a new turn's record; returns its slot in `out.turns`.
    pub(super) fn open(&mut self, out: &mut RunOutput, record: TurnRecord) -> usize {
        self.open += 1;
        if self.recording == Recording::Counts {
            match out.turns.first_mut() {
                Some(scratch) => *scratch = record,
                None => out.turns.push(record),
            }
            return 0;
        }
        match self.free.pop() {
            Some(slot) => {
                out.turns[slot] = record;
                slot
            }
            None => {
                out.turns.push(record);
                out.turns.len() - 1
            }
        }
    }

    /// The turn of `slot` finished or was rejected: its record is final.
    pub(super) fn close(&mut self, out: &mut RunOutput, slot: usize) {
        self.open -= 1;
        let t = &mut out.turns[slot];
        out.turns_rejected += u64::from(t.rejected);
        match self.recording {
            Recording::Full => return,
            Recording::Counts => {
                // The scratch record is shared: the next turn to close is not rejected unless
                // it says so.
                t.rejected = false;
                return;
            }
            Recording::Latencies => {
                if let (false, Some(finished)) = (t.rejected, t.finished_ns) {
                    out.turn_latencies.turn_ns.push(finished - t.arrival_ns);
                    if let (true, Some(first)) = (t.turn_index > 0, t.first_token_ns) {
                        out.turn_latencies
                            .ttft_after_pause_ns
                            .push(first - t.arrival_ns);
                    }
                }
            }
        }
        self.free.push(slot);
    }

    /// Turns opened and never closed (the final check wants none).
    pub(super) fn open_turns(&self, out: &RunOutput) -> usize {
        match self.recording {
            Recording::Full => out
                .turns
                .iter()
                .filter(|t| !t.rejected && t.finished_ns.is_none())
                .count(),
            Recording::Latencies | Recording::Counts => self.open,
        }
    }

    /// Drops the slots of a summary recording from the output (their records are stale copies).
    pub(super) fn finish(&self, out: &mut RunOutput) {
        if self.recording != Recording::Full {
            out.turns = Vec::new();
        }
    }
}

impl LoopState<'_> {
    /// Records a step (under [`Recording::Full`]; counts it always) and resets what accumulated
    /// since the last one.
    pub(super) fn record_step(&mut self, now: SimTime, duration: u64, batch: &StepBatch) {
        let (swap_in_bytes, swap_out_bytes) = std::mem::take(&mut self.unreported_swap_bytes);
        let counters = std::mem::take(&mut self.kv.counters);
        let (preemptions, preemption_drops) = std::mem::take(&mut self.unreported_preemptions);
        self.out.steps_run += 1;
        if !self.book.keeps_steps() {
            return;
        }
        self.out.steps.push(StepRecord {
            step_index: self.step,
            start_ns: now.as_nanos(),
            duration_ns: duration,
            prefill_tokens: batch.prefill_tokens() as u32,
            prefill_sequences: batch.prefill.len() as u32,
            prefill_attention_pairs: batch.prefill_attention_pairs(),
            decode_batch: batch.decode.len() as u32,
            decode_context_tokens: batch.decode_context_tokens(),
            swap_in_bytes_started: swap_in_bytes,
            swap_out_bytes_started: swap_out_bytes,
            drops: counters.drops.saturating_sub(preemption_drops),
            dropped_tokens: counters.dropped_tokens,
            cache_evicted_blocks: counters.cache_evicted_blocks,
            gpu_blocks_free: self.kv.gpu_blocks_free(),
            host_blocks_free: self.kv.host_blocks_free(),
            preemptions,
        });
    }
}

/// Where a finished turn's KV came from (for the turn record).
pub(super) fn kv_source(rec: &TurnRecord, turn_index: u32) -> &'static str {
    if rec.tokens_recomputed > 0 {
        if rec.context_tokens_at_admit == 0 {
            "recomputed"
        } else {
            "partial_recompute"
        }
    } else if rec.restore_end_ns.is_some() {
        "swapped_in"
    } else if turn_index == 0 {
        "new"
    } else {
        "resident"
    }
}
