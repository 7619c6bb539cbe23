//! Agent programs from a `turns` trace: token and time scales, the model window, session start
//! times, hints, and cycling the sessions to reach any agent count.
//!
//! - Start times: from the spec's `[arrival]` when it has one (ramp, poisson or explicit), else
//!   each session's first `time_s`, shifted so the earliest session starts at 0.
//! - Cycling (`cycle = true`): agent `k` replays session slot `k mod M` of lap `k / M` (M
//!   sessions). Lap 0 is the file's order; every later lap is a fresh permutation drawn from the
//!   seeded stream `replay-cycle`/lap. With file times, a lap's slot keeps its start time plus
//!   lap x period, where the period is the span of the file's starts times M / (M - 1) (the
//!   file's session rate carries on); the session placed there is the permuted one.
//! - The window: as for generated workloads, a program ends before the turn whose input plus
//!   output would exceed `max_context_tokens`, and a first prompt longer than the window is cut
//!   to fit.

use std::path::Path;

use rand::seq::SliceRandom;
use traces::workload::{Arrival, ReplaySpec, WorkloadSpec};
use traces::TraceError;

use super::turns_file::{parse_turns, FileSession, Syntax};
use super::{hint_for, scaled, sort_and_renumber, trace_text};
use crate::ids::AgentId;
use crate::rng::stream;
use crate::time::SimTime;
use crate::workload::{arrival_times, AgentProgram, PauseProgram, TurnProgram, Workload};

/// The workload of a `[replay]` with a `turns` format.
pub fn turns_workload(
    spec: &WorkloadSpec,
    replay: &ReplaySpec,
    agents: u32,
    seed: u64,
) -> Result<Workload, TraceError> {
    let (file, text) = trace_text(&replay.path)?;
    let syntax = Syntax::of(&replay.format, &file)?;
    let sessions = parse_turns(&file, &text, syntax)?;
    let path = Path::new(&file);
    let m = sessions.len();
    let n = spec.agent_count(Some(agents)) as usize;
    if n > m && !replay.cycle {
        return Err(TraceError::invalid(
            path,
            "sessions",
            format!("{n} agents asked for, but the file holds {m} sessions: set cycle = true in [replay] to replay them again"),
        ));
    }
    let starts = start_times(spec, replay, &sessions, n, seed, path)?;
    let mut order: Vec<usize> = (0..m).collect();
    let mut programs = Vec::with_capacity(n);
    for (k, arrival) in starts.into_iter().enumerate() {
        let (lap, slot) = (k / m, k % m);
        if slot == 0 && lap > 0 {
            order = (0..m).collect();
            order.shuffle(&mut stream(seed, "replay-cycle", lap as u64));
        }
        programs.push(program(
            spec,
            replay,
            &sessions[order[slot]],
            k as AgentId,
            arrival,
            seed,
        ));
    }
    sort_and_renumber(&mut programs);
    Ok(Workload {
        name: spec.name.clone(),
        max_context_tokens: spec.max_context_tokens,
        agents: programs,
    })
}

/// The first arrival of each of the `n` agents, in agent order.
fn start_times(
    spec: &WorkloadSpec,
    replay: &ReplaySpec,
    sessions: &[FileSession],
    n: usize,
    seed: u64,
    path: &Path,
) -> Result<Vec<SimTime>, TraceError> {
    if spec.arrival != Arrival::missing() {
        return Ok(arrival_times(&spec.arrival, n as u32, seed));
    }
    let Some(base) = sessions[0].start_s else {
        return Err(TraceError::invalid(
            path,
            "time_s",
            "the file gives pauses, not times: add an [arrival] table (ramp, poisson or explicit) to the spec for the sessions' start times",
        ));
    };
    let m = sessions.len();
    let offset = |s: &FileSession| s.start_s.unwrap_or(base) - base;
    let span = offset(&sessions[m - 1]);
    let period = if m > 1 {
        span * m as f64 / (m - 1) as f64
    } else {
        0.0
    };
    Ok((0..n)
        .map(|k| {
            let s = offset(&sessions[k % m]) + (k / m) as f64 * period;
            SimTime::from_secs_f64(s * replay.time_scale)
        })
        .collect())
}

/// One session as the program of agent `agent_id`, scaled and fitted to the window.
fn program(
    spec: &WorkloadSpec,
    replay: &ReplaySpec,
    session: &FileSession,
    agent_id: AgentId,
    arrival: SimTime,
    seed: u64,
) -> AgentProgram {
    let window = spec.max_context_tokens as u64;
    let mut hint_rng = stream(seed, "hint", agent_id as u64);
    let mut turns: Vec<TurnProgram> = Vec::with_capacity(session.turns.len());
    let mut sequence: u64 = 0;
    for (k, t) in session.turns.iter().enumerate() {
        let mut new_tokens = scaled(t.new_tokens, replay.token_scale);
        if k == 0 {
            new_tokens = new_tokens.max(1);
        }
        let mut generated = scaled(t.output_tokens, replay.token_scale).max(1);
        let full = sequence + new_tokens as u64;
        // Rounding the scaled context must not let it claim more than the sequence holds.
        let mut input = match t.context_tokens {
            Some(c) if k > 0 => (scaled(c, replay.token_scale) as u64).clamp(new_tokens as u64, full),
            _ => full,
        };
        if input + generated as u64 > window {
            if k > 0 {
                break;
            }
            generated = generated.min((window / 2) as u32).max(1);
            new_tokens = (window - generated as u64).max(1) as u32;
            input = new_tokens as u64;
        }
        let pause_after = t.pause_s.map(|p| {
            let true_ns = SimTime::from_secs_f64(p * replay.time_scale).as_nanos();
            let hint_ns = match t.hint_s {
                Some(h) => Some(SimTime::from_secs_f64(h * replay.time_scale).as_nanos()),
                None => hint_for(&spec.hint, true_ns, &mut hint_rng),
            };
            PauseProgram { true_ns, hint_ns }
        });
        turns.push(TurnProgram {
            new_tokens,
            generated_tokens: generated,
            pause_after,
            context_tokens: (k > 0 && input < full).then_some(input as u32),
        });
        sequence = input + generated as u64;
    }
    if let Some(last) = turns.last_mut() {
        last.pause_after = None;
    }
    AgentProgram {
        agent_id,
        arrival,
        turns,
    }
}
