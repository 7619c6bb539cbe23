//! A run directory as a timeline in the Chrome trace-event format (open in https://ui.perfetto.dev
//! or chrome://tracing): what the engine did step by step, what the copy engine moved, and what
//! each agent was waiting for, on one time axis.
//!
//! Tracks: process "engine" with a thread for steps (one slice per step: prefill, decode or mixed,
//! with its shape), one per copy direction (a slice per swap), and counters for free KV blocks and
//! the decode batch; process "agents" with a thread per agent (slices: queued, restore, prefill,
//! decode, pause). Times are the run's own nanoseconds, written as microseconds.

use serde::Serialize;
use serde_json::{json, Value};
use traces::{RunManifest, StepRecord, SwapRecord, TurnRecord};

/// What to include.
#[derive(Clone, Debug)]
pub struct TimelineOptions {
    /// Agent tracks for the agents with the smallest ids, at most this many (a 10,000-agent run
    /// would otherwise make a file no viewer opens).
    pub max_agents: u32,
}

impl Default for TimelineOptions {
    fn default() -> Self {
        TimelineOptions { max_agents: 64 }
    }
}

/// The trace file: `{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}`.
#[derive(Debug, Serialize)]
pub struct ChromeTrace {
    #[serde(rename = "traceEvents")]
    pub trace_events: Vec<Value>,
    #[serde(rename = "displayTimeUnit")]
    pub display_time_unit: &'static str,
    #[serde(rename = "otherData")]
    pub other_data: Value,
}

const ENGINE_PID: u32 = 1;
const AGENTS_PID: u32 = 2;
const STEPS_TID: u32 = 1;
const SWAP_IN_TID: u32 = 2;
const SWAP_OUT_TID: u32 = 3;

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn slice(name: &str, pid: u32, tid: u32, start_ns: u64, end_ns: u64, args: Value) -> Value {
    json!({
        "name": name,
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "ts": us(start_ns),
        "dur": us(end_ns.saturating_sub(start_ns)),
        "args": args,
    })
}

fn metadata(kind: &str, pid: u32, tid: Option<u32>, name: &str) -> Value {
    let mut v = json!({"name": kind, "ph": "M", "pid": pid, "args": {"name": name}});
    if let Some(tid) = tid {
        v["tid"] = json!(tid);
    }
    v
}

fn step_name(step: &StepRecord) -> String {
    match (step.prefill_tokens > 0, step.decode_batch > 0) {
        (true, true) => format!(
            "mixed: prefill {} + decode {}",
            step.prefill_tokens, step.decode_batch
        ),
        (true, false) => format!("prefill {}", step.prefill_tokens),
        (false, true) => format!("decode {}", step.decode_batch),
        (false, false) => "idle".to_string(),
    }
}

/// Builds the timeline of one run.
pub fn chrome_trace(
    manifest: &RunManifest,
    turns: &[TurnRecord],
    steps: &[StepRecord],
    swaps: &[SwapRecord],
    options: &TimelineOptions,
) -> ChromeTrace {
    let mut events = vec![
        metadata(
            "process_name",
            ENGINE_PID,
            None,
            &format!("engine ({})", manifest.backend),
        ),
        metadata("thread_name", ENGINE_PID, Some(STEPS_TID), "steps"),
        metadata(
            "thread_name",
            ENGINE_PID,
            Some(SWAP_IN_TID),
            "swap in (host to GPU)",
        ),
        metadata(
            "thread_name",
            ENGINE_PID,
            Some(SWAP_OUT_TID),
            "swap out (GPU to host)",
        ),
        metadata("process_name", AGENTS_PID, None, "agents"),
    ];
    push_steps(&mut events, steps);
    push_swaps(&mut events, swaps);
    let agents_shown = push_turns(&mut events, turns, options);
    ChromeTrace {
        trace_events: events,
        display_time_unit: "ms",
        other_data: json!({
            "workload": manifest.workload.name,
            "policy": manifest.policy,
            "agents": manifest.agents,
            "seed": manifest.seed,
            "backend": manifest.backend,
            "profile": manifest.profile_name,
            "device": manifest.device,
            "agents_shown": agents_shown,
            "reproduce": manifest.reproduce,
        }),
    }
}

/// The engine's steps as slices, with counters of free KV blocks and of the decode batch.
fn push_steps(events: &mut Vec<Value>, steps: &[StepRecord]) {
    for step in steps {
        let end = step.start_ns + step.duration_ns;
        events.push(slice(
            &step_name(step),
            ENGINE_PID,
            STEPS_TID,
            step.start_ns,
            end,
            json!({
                "step": step.step_index,
                "prefill_tokens": step.prefill_tokens,
                "prefill_sequences": step.prefill_sequences,
                "decode_batch": step.decode_batch,
                "decode_context_tokens": step.decode_context_tokens,
                "swap_in_bytes_started": step.swap_in_bytes_started,
                "swap_out_bytes_started": step.swap_out_bytes_started,
                "drops": step.drops,
            }),
        ));
        events.push(json!({
            "name": "KV blocks free", "ph": "C", "pid": ENGINE_PID, "ts": us(step.start_ns),
            "args": {"gpu": step.gpu_blocks_free, "host": step.host_blocks_free},
        }));
        events.push(json!({
            "name": "decode batch", "ph": "C", "pid": ENGINE_PID, "ts": us(step.start_ns),
            "args": {"sequences": step.decode_batch},
        }));
    }
}

/// Each swap as a slice on its copy channel's thread.
fn push_swaps(events: &mut Vec<Value>, swaps: &[SwapRecord]) {
    for swap in swaps {
        let (tid, what) = if swap.direction == "in" {
            (SWAP_IN_TID, "in")
        } else {
            (SWAP_OUT_TID, "out")
        };
        events.push(slice(
            &format!("agent {} {what}", swap.agent_id),
            ENGINE_PID,
            tid,
            swap.start_ns,
            swap.end_ns,
            json!({
                "swap": swap.swap_id,
                "agent": swap.agent_id,
                "blocks": swap.block_count,
                "bytes": swap.bytes,
                "gb_per_s": if swap.end_ns > swap.start_ns {
                    swap.bytes as f64 / (swap.end_ns - swap.start_ns) as f64
                } else {
                    0.0
                },
                "concurrent_swaps_at_start": swap.concurrent_swaps_at_start,
            }),
        ));
    }
}

/// Each shown agent's turns (queued, restore, prefill, decode, or rejected) and the pauses
/// between them; returns how many agents are shown.
fn push_turns(events: &mut Vec<Value>, turns: &[TurnRecord], options: &TimelineOptions) -> usize {
    let mut shown: Vec<&TurnRecord> = turns
        .iter()
        .filter(|t| t.agent_id < options.max_agents)
        .collect();
    shown.sort_by_key(|t| (t.agent_id, t.turn_index));
    let mut named = std::collections::BTreeSet::new();
    for (i, turn) in shown.iter().enumerate() {
        // Agents' tids start after the engine's so the two processes never share a tid number.
        let tid = turn.agent_id + 1;
        if named.insert(turn.agent_id) {
            events.push(metadata(
                "thread_name",
                AGENTS_PID,
                Some(tid),
                &format!("agent {}", turn.agent_id),
            ));
        }
        let args = json!({
            "turn": turn.turn_index,
            "kv_source": turn.kv_source,
            "context_tokens_at_admit": turn.context_tokens_at_admit,
            "tokens_prefilled": turn.tokens_prefilled,
            "tokens_recomputed": turn.tokens_recomputed,
            "tokens_generated": turn.tokens_generated,
        });
        if turn.rejected {
            events.push(json!({
                "name": "rejected", "ph": "i", "s": "t", "pid": AGENTS_PID, "tid": tid,
                "ts": us(turn.arrival_ns), "args": args,
            }));
            continue;
        }
        push_turn_phases(events, turn, tid, &args);
        // The pause until this agent's next turn.
        if let (Some(end), Some(next)) = (turn.finished_ns, shown.get(i + 1)) {
            if next.agent_id == turn.agent_id && next.arrival_ns > end {
                events.push(slice(
                    "pause",
                    AGENTS_PID,
                    tid,
                    end,
                    next.arrival_ns,
                    json!({}),
                ));
            }
        }
    }
    named.len()
}

/// The phases of one turn that was not rejected, on its agent's thread.
fn push_turn_phases(events: &mut Vec<Value>, turn: &TurnRecord, tid: u32, args: &Value) {
    let started = turn
        .restore_start_ns
        .into_iter()
        .chain(turn.admitted_ns)
        .min();
    if let Some(start) = started {
        if start > turn.arrival_ns {
            events.push(slice(
                "queued",
                AGENTS_PID,
                tid,
                turn.arrival_ns,
                start,
                args.clone(),
            ));
        }
    }
    if let (Some(a), Some(b)) = (turn.restore_start_ns, turn.restore_end_ns) {
        events.push(slice("restore", AGENTS_PID, tid, a, b, args.clone()));
    }
    if let (Some(a), Some(b)) = (turn.admitted_ns, turn.first_token_ns) {
        let name = if turn.tokens_recomputed > 0 {
            "prefill (with recompute)"
        } else {
            "prefill"
        };
        events.push(slice(
            name,
            AGENTS_PID,
            tid,
            a.max(turn.restore_end_ns.unwrap_or(0)),
            b,
            args.clone(),
        ));
    }
    if let (Some(a), Some(b)) = (turn.first_token_ns, turn.finished_ns) {
        events.push(slice("decode", AGENTS_PID, tid, a, b, args.clone()));
    }
}
