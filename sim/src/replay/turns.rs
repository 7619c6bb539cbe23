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
//! - Prefix groups: a session naming a `[[prefix_groups]]` entry starts its first prompt with the
//!   group's `tokens` (in the spec's units: `token_scale` does not apply), followed by the file's
//!   `new_tokens`. The file's counts leave the prefix out, `context_tokens` included: a
//!   compaction keeps the prefix (an agent keeps its system prompt), so the prefix is added to it.

use std::path::Path;

use rand::seq::SliceRandom;
use traces::workload::{Arrival, ReplaySpec, WorkloadSpec};
use traces::TraceError;

use super::turns_file::{parse_turns, FileSession, Syntax};
use super::{hint_for, scaled, sort_and_renumber, trace_text};
use crate::ids::AgentId;
use crate::rng::stream;
use crate::time::SimTime;
use crate::workload::{
    arrival_times, AgentProgram, PauseProgram, SharedPrefix, TurnProgram, Workload,
};

/// The workload of a `[replay]` with a `turns` format.
pub fn turns_workload(
    spec: &WorkloadSpec,
    replay: &ReplaySpec,
    agents: u32,
    seed: u64,
) -> Result<Workload, TraceError> {
    let (file, text) = trace_text(&replay.path)?;
    let syntax = Syntax::of(&replay.format, &file)?;
    let groups: Vec<&str> = spec.prefix_groups.iter().map(|g| g.name.as_str()).collect();
    let sessions = parse_turns(&file, &text, syntax, &groups)?;
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
    let prefix = session.prefix_group.map(|group| SharedPrefix {
        group,
        tokens: spec.prefix_groups[group as usize].tokens,
    });
    let prefix_tokens = prefix.map_or(0, |p| p.tokens);
    let mut turns: Vec<TurnProgram> = Vec::with_capacity(session.turns.len());
    let mut sequence: u64 = 0;
    for (k, t) in session.turns.iter().enumerate() {
        let mut new_tokens = scaled(t.new_tokens, replay.token_scale);
        if k == 0 {
            new_tokens = new_tokens.max(1).saturating_add(prefix_tokens);
        }
        let mut generated = scaled(t.output_tokens, replay.token_scale).max(1);
        let full = sequence + new_tokens as u64;
        // Rounding the scaled context must not let it claim more than the sequence holds.
        let mut input = match t.context_tokens {
            Some(c) if k > 0 => (scaled(c, replay.token_scale) as u64 + prefix_tokens as u64)
                .clamp(new_tokens as u64, full),
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
        // An unshared group's tokens stay in the prompt, held per agent.
        prefix: prefix.filter(|p| spec.prefix_groups[p.group as usize].shared),
        arrival,
        turns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str, path: &str, cycle: bool) -> WorkloadSpec {
        let text = format!(
            "schema_version = 1\nname = \"t\"\nagents = 3\nmax_context_tokens = 4096\n{extra}\n\
             [replay]\nformat = \"turns\"\npath = {path:?}\ncycle = {cycle}\n[hint]\nkind = \"exact\"\n"
        );
        WorkloadSpec::from_toml_str(Path::new("t.toml"), &text).unwrap()
    }

    fn write(name: &str, text: &str) -> String {
        let dir = std::env::temp_dir().join(format!("sim-turns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }

    const TIMED: &str = "session,turn,new_tokens,output_tokens,time_s,hint_s,context_tokens\n\
                         s1,0,1000,10,100,,\n\
                         s1,1,50,10,104,9,\n\
                         s1,2,30,10,110,,300\n\
                         s2,0,500,20,101,,\n\
                         s3,0,700,20,102,,\n";

    #[test]
    fn file_times_start_sessions_and_laps_reshuffle_deterministically() {
        let path = write("timed.csv", TIMED);
        let s = spec("", &path, true);
        let w = turns_workload(&s, s.replay.as_ref().unwrap(), 9, 5).unwrap();
        assert_eq!(
            w,
            turns_workload(&s, s.replay.as_ref().unwrap(), 9, 5).unwrap()
        );
        let starts: Vec<f64> = w.agents.iter().map(|a| a.arrival.as_secs_f64()).collect();
        // Starts 0, 1, 2 s; the period is the span x 3/2 = 3 s.
        assert_eq!(starts, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let first = &w.agents[0];
        assert_eq!(first.turns.len(), 3);
        let p = first.turns[0].pause_after.unwrap();
        assert_eq!((p.true_ns, p.hint_ns), (4_000_000_000, Some(4_000_000_000)));
        // hint_s overrides [hint].
        assert_eq!(
            first.turns[1].pause_after.unwrap().hint_ns,
            Some(9_000_000_000)
        );
        // 1000 + 10 + 50 + 10 = 1070 before turn 2; its explicit context 300 compacts.
        assert_eq!(first.turns[2].context_tokens, Some(300));
        assert_eq!(first.final_sequence_tokens(), 310);
        assert_eq!(first.peak_sequence_tokens(), 1070);
        // Some lap differs from the file's order, and another seed orders laps differently.
        let order =
            |w: &Workload| -> Vec<u32> { w.agents.iter().map(|a| a.turns[0].new_tokens).collect() };
        let replay = s.replay.as_ref().unwrap();
        assert_eq!(order(&w)[..3], [1000, 500, 700]);
        let (five, six) = (
            order(&turns_workload(&s, replay, 30, 5).unwrap()),
            order(&turns_workload(&s, replay, 30, 6).unwrap()),
        );
        assert_eq!(five[..3], six[..3]);
        assert_ne!(five[3..], six[3..]);
        assert!(five.chunks(3).skip(1).any(|lap| lap != [1000, 500, 700]));
    }

    #[test]
    fn more_agents_than_sessions_needs_cycle_and_pauses_need_an_arrival() {
        let path = write("timed2.csv", TIMED);
        let s = spec("", &path, false);
        let e = turns_workload(&s, s.replay.as_ref().unwrap(), 4, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("timed2.csv") && e.contains("cycle = true"),
            "{e}"
        );
        let paused = write(
            "paused.csv",
            "session,turn,new_tokens,output_tokens,pause_s\na,0,5,1,\n",
        );
        let s = spec("", &paused, false);
        let e = turns_workload(&s, s.replay.as_ref().unwrap(), 1, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("paused.csv") && e.contains("[arrival]"), "{e}");
        let s = spec("[arrival]\nkind = \"ramp\"\nramp_s = 0.0", &paused, false);
        let w = turns_workload(&s, s.replay.as_ref().unwrap(), 1, 0).unwrap();
        assert_eq!(w.agents[0].arrival, SimTime::ZERO);
    }

    #[test]
    fn scaling_and_the_window_end_programs_as_for_generated_workloads() {
        let path = write(
            "big.csv",
            "session,turn,new_tokens,output_tokens,pause_s,context_tokens\n\
                                     a,0,60000,400,1,\n\
                                     a,1,8000,400,1,\n\
                                     a,2,8000,400,1,40000\n\
                                     a,3,30000,400,,\n",
        );
        let mut s = spec("[arrival]\nkind = \"ramp\"\nramp_s = 0.0", &path, false);
        s.replay.as_mut().unwrap().token_scale = 1.0 / 16.0;
        let w = turns_workload(&s, s.replay.as_ref().unwrap(), 1, 0).unwrap();
        let a = &w.agents[0];
        // 3750 + 25 | 500 + 25 (4300 > 4096: the program ends after the first turn).
        assert_eq!(a.turns.len(), 1);
        assert!(a.turns[0].pause_after.is_none());
        s.max_context_tokens = 8192;
        let w = turns_workload(&s, s.replay.as_ref().unwrap(), 1, 0).unwrap();
        let a = &w.agents[0];
        // 3775, 4300, then a compaction to 2500 (+25), then 2525 + 1875 + 25 = 4425.
        assert_eq!(a.turns.len(), 4);
        assert_eq!(a.turns[2].context_tokens, Some(2500));
        assert_eq!(a.final_sequence_tokens(), 4425);
        assert!(a.peak_sequence_tokens() <= 8192);
    }

    #[test]
    fn a_sessions_prefix_group_opens_its_first_prompt_and_survives_compaction() {
        let path = write(
            "grouped.csv",
            "session,turn,new_tokens,output_tokens,pause_s,context_tokens,prefix_group\n\
             a,0,800,10,1,,sys\n\
             a,1,40,10,1,,\n\
             a,2,40,10,,200,\n\
             b,0,800,10,,,\n",
        );
        let group = "[arrival]\nkind = \"ramp\"\nramp_s = 0.0\n\
                     [[prefix_groups]]\nname = \"other\"\ntokens = 50\n\
                     [[prefix_groups]]\nname = \"sys\"\ntokens = 1000";
        let mut s = spec(group, &path, true);
        s.replay.as_mut().unwrap().token_scale = 0.5;
        let w = turns_workload(&s, s.replay.as_ref().unwrap(), 4, 3).unwrap();
        for a in &w.agents {
            if a.turns.len() == 1 {
                assert_eq!(a.prefix, None);
                assert_eq!(a.turns[0].new_tokens, 400);
                continue;
            }
            // The prefix is not scaled; the file's tokens are.
            assert_eq!(
                a.prefix,
                Some(SharedPrefix {
                    group: 1,
                    tokens: 1000
                })
            );
            assert_eq!(a.turns[0].new_tokens, 1400);
            // The compacted context (100 scaled) keeps the prefix in front.
            assert_eq!(a.turns[2].context_tokens, Some(1100));
        }
        let unknown = write(
            "unknown.csv",
            "session,turn,new_tokens,output_tokens,pause_s,prefix_group\na,0,5,1,,tools\n",
        );
        let s = spec(group, &unknown, false);
        let e = turns_workload(&s, s.replay.as_ref().unwrap(), 1, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown.csv") && e.contains("line 2: column `prefix_group`"),
            "{e}"
        );
    }
}
