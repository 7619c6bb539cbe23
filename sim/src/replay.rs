//! Workloads replayed from public traces, and the one entry point that builds any workload.
//!
//! - `chat`: multi-turn sessions from a Mooncake-format JSONL trace. A request continues a session
//!   when an earlier request's prefix-block hash chain is a prefix of its own (the rule in the
//!   traces README), where the earlier chain is taken without its last block (a partial block:
//!   the next turn's text fills it further, so its hash changes) and must keep at least two blocks
//!   (every request shares block 0, the system prompt). The longest such chain wins. On the full
//!   trace this gives 33.0% continuing requests and 8,057 sessions, 25% multi-turn, median gap
//!   123 s (the README: 33%, 8,056, 25%, 126 s). A turn's new tokens are its input minus the
//!   session's context so far (input + output of the previous turn); the pause before it is the
//!   arrival-to-arrival gap (the trace has no completion times; service takes seconds against a
//!   median gap of ~2 minutes). Token counts are scaled by `token_scale` to fit the model window;
//!   a session ends where its context would overflow the window.
//! - `turns`: explicit per-session turn lists from a CSV or JSONL file (see [`turns_file`] for
//!   the columns and [`turns`] for scaling, start times and cycling).
//! - `background`: single-turn requests from an Azure-format CSV (arrival times, prompt and output
//!   lengths), mixed into any workload so that a given fraction of all turns is background. The
//!   trace's inter-arrival times are rescaled so the background spans the agent traffic.
//!
//! Readers return errors naming the file and line. Shipped sample traces resolve by file name
//! (embedded in the binary), so specs that name them work anywhere.

use std::collections::BTreeMap;
use std::path::Path;

use rand_distr::{Distribution as _, Normal};
use traces::workload::{HintSpec, WorkloadSpec};
use traces::TraceError;

use crate::ids::AgentId;
use crate::rng::stream;
use crate::time::SimTime;
use crate::workload::{generate, AgentProgram, PauseProgram, TurnProgram, Workload};

pub mod turns;
pub mod turns_file;

/// Sample traces shipped with the project (see `sim/workloads/traces/README.md`).
pub const SHIPPED_TRACES: [(&str, &str); 4] = [
    (
        "mooncake_conversation_sample.jsonl",
        include_str!("../workloads/traces/mooncake_conversation_sample.jsonl"),
    ),
    (
        "azure_conv_sample.csv",
        include_str!("../workloads/traces/azure_conv_sample.csv"),
    ),
    (
        "azure_code_sample.csv",
        include_str!("../workloads/traces/azure_code_sample.csv"),
    ),
    (
        "coding_agent_turns_synthetic.csv",
        include_str!("../workloads/traces/coding_agent_turns_synthetic.csv"),
    ),
];

/// The shipped sample a trace path names (by file name, or a path ending in
/// `workloads/traces/<name>`): its name and text.
pub fn shipped_trace(path: &str) -> Option<(&'static str, &'static str)> {
    SHIPPED_TRACES
        .iter()
        .find(|(n, _)| *n == path || path.ends_with(&format!("workloads/traces/{n}")))
        .copied()
}

/// The text of a trace: a shipped sample by file name, else the file at `path`.
pub fn trace_text(path: &str) -> Result<(String, String), TraceError> {
    if let Some((name, text)) = shipped_trace(path) {
        return Ok((format!("sim/workloads/traces/{name}"), text.to_string()));
    }
    let text = traces::io::read_text(Path::new(path))?;
    Ok((path.to_string(), text))
}

/// Makes the trace paths of a spec read from `spec_file` relative to that file's folder, as a
/// reader of the spec expects (the spec and its trace travel together), not to wherever the
/// command happens to run. Shipped sample names and absolute paths stay as they are.
pub fn resolve_trace_paths(spec: &mut WorkloadSpec, spec_file: &Path) {
    let Some(dir) = spec_file.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return;
    };
    let resolve = |path: &mut String| {
        if shipped_trace(path).is_none() && Path::new(path.as_str()).is_relative() {
            *path = dir.join(path.as_str()).to_string_lossy().into_owned();
        }
    };
    if let Some(r) = spec.replay.as_mut() {
        resolve(&mut r.path);
    }
    if let Some(b) = spec.background.as_mut() {
        resolve(&mut b.path);
    }
}

/// One Mooncake request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MooncakeRequest {
    pub timestamp_ms: u64,
    pub input_length: u32,
    pub output_length: u32,
    pub hash_ids: Vec<u64>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MooncakeLine {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// Parses Mooncake JSONL text (blank lines allowed). Errors name the file and line.
pub fn parse_mooncake(file: &str, text: &str) -> Result<Vec<MooncakeRequest>, TraceError> {
    let path = Path::new(file);
    let mut out = Vec::new();
    let mut last_ms = 0u64;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = format!("line {}", i + 1);
        let parsed: MooncakeLine = serde_json::from_str(line).map_err(|e| TraceError::Parse {
            path: path.to_path_buf(),
            location: location.clone(),
            message: e.to_string(),
        })?;
        if !parsed.timestamp.is_finite() || parsed.timestamp < 0.0 {
            return Err(TraceError::invalid(
                path,
                format!("{location}: timestamp"),
                format!("must be a finite number >= 0, got {}", parsed.timestamp),
            ));
        }
        let ts = parsed.timestamp as u64;
        if ts < last_ms {
            return Err(TraceError::invalid(
                path,
                format!("{location}: timestamp"),
                format!("must not decrease (previous {last_ms}, got {ts})"),
            ));
        }
        last_ms = ts;
        if parsed.input_length == 0 {
            return Err(TraceError::invalid(
                path,
                format!("{location}: input_length"),
                "must be > 0".to_string(),
            ));
        }
        out.push(MooncakeRequest {
            timestamp_ms: ts,
            input_length: parsed.input_length,
            output_length: parsed.output_length,
            hash_ids: parsed.hash_ids,
        });
    }
    if out.is_empty() {
        return Err(TraceError::invalid(path, "document", "no requests"));
    }
    Ok(out)
}

/// One Azure-format request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AzureRequest {
    /// Nanoseconds after the trace's first request.
    pub offset_ns: u64,
    pub context_tokens: u32,
    pub generated_tokens: u32,
}

/// Parses `YYYY-MM-DD HH:MM:SS[.fffffff]` into nanoseconds since the day's midnight plus days.
fn parse_timestamp_ns(s: &str) -> Option<u64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days since 1970-01-01 (civil-from-days inverse; proleptic Gregorian).
    let (yy, mm) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let (hms, frac) = match time.split_once('.') {
        Some((a, b)) => (a, b),
        None => (time, ""),
    };
    let mut t = hms.split(':');
    let (h, mi, sec): (u64, u64, u64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if t.next().is_some() || h > 23 || mi > 59 || sec > 60 || days < 0 {
        return None;
    }
    let mut frac_ns = 0u64;
    if !frac.is_empty() {
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        frac_ns = frac.parse::<u64>().ok()? * 10u64.pow(9 - frac.len() as u32);
    }
    Some(days as u64 * 86_400_000_000_000 + (h * 3600 + mi * 60 + sec) * 1_000_000_000 + frac_ns)
}

/// Parses an Azure-format CSV. Errors name the file and line.
pub fn parse_azure(file: &str, text: &str) -> Result<Vec<AzureRequest>, TraceError> {
    let path = Path::new(file);
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, h)| h.trim()).unwrap_or("");
    if header != "TIMESTAMP,ContextTokens,GeneratedTokens" {
        return Err(TraceError::invalid(
            path,
            "line 1",
            format!("expected header TIMESTAMP,ContextTokens,GeneratedTokens, got {header:?}"),
        ));
    }
    let mut out = Vec::new();
    let mut first: Option<u64> = None;
    let mut last = 0u64;
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let location = format!("line {}", i + 1);
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 3 {
            return Err(TraceError::invalid(
                path,
                &location,
                format!("expected 3 fields, got {}", fields.len()),
            ));
        }
        let t = parse_timestamp_ns(fields[0]).ok_or_else(|| {
            TraceError::invalid(
                path,
                format!("{location}: TIMESTAMP"),
                format!("not a YYYY-MM-DD HH:MM:SS.fffffff time: {:?}", fields[0]),
            )
        })?;
        let context: u32 = fields[1].trim().parse().map_err(|_| {
            TraceError::invalid(
                path,
                format!("{location}: ContextTokens"),
                format!("not a token count: {:?}", fields[1]),
            )
        })?;
        let generated: u32 = fields[2].trim().parse().map_err(|_| {
            TraceError::invalid(
                path,
                format!("{location}: GeneratedTokens"),
                format!("not a token count: {:?}", fields[2]),
            )
        })?;
        let base = *first.get_or_insert(t);
        if t < last {
            return Err(TraceError::invalid(
                path,
                format!("{location}: TIMESTAMP"),
                "must not decrease",
            ));
        }
        last = t;
        out.push(AzureRequest {
            offset_ns: t - base,
            context_tokens: context,
            generated_tokens: generated,
        });
    }
    if out.is_empty() {
        return Err(TraceError::invalid(path, "document", "no requests"));
    }
    Ok(out)
}

/// Shortest earlier chain (in blocks, after dropping its last block) that links two requests.
pub const MIN_CHAIN_BLOCKS: usize = 2;

/// Groups Mooncake requests into sessions (lists of request indices in arrival order).
pub fn sessions(requests: &[MooncakeRequest]) -> Vec<Vec<usize>> {
    // Rolling hashes of every request's full chain, mapped to the session that ended with it.
    fn mix(h: u64, x: u64) -> u64 {
        let mut z = h ^ x
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let mut chain_to_session: BTreeMap<(u64, usize), usize> = BTreeMap::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let mut prefixes = Vec::with_capacity(r.hash_ids.len());
        let mut h = 0u64;
        for &id in &r.hash_ids {
            h = mix(h, id);
            prefixes.push(h);
        }
        // The longest earlier chain that is a prefix of this one (key: hash and length).
        let found = (MIN_CHAIN_BLOCKS..=prefixes.len())
            .rev()
            .find_map(|len| chain_to_session.get(&(prefixes[len - 1], len)).copied());
        let session = match found {
            Some(s) => {
                out[s].push(i);
                s
            }
            None => {
                out.push(vec![i]);
                out.len() - 1
            }
        };
        // Register the chain without its partial last block.
        let kept = prefixes.len().saturating_sub(1);
        if kept >= MIN_CHAIN_BLOCKS {
            chain_to_session.insert((prefixes[kept - 1], kept), session);
        }
    }
    out
}

fn scaled(tokens: u32, scale: f64) -> u32 {
    (tokens as f64 * scale).round().clamp(0.0, u32::MAX as f64) as u32
}

fn hint_for(hint: &HintSpec, true_ns: u64, rng: &mut crate::rng::SimRng) -> Option<u64> {
    match hint {
        HintSpec::Exact => Some(true_ns),
        HintSpec::Noisy { sigma } => {
            let noise = Normal::new(0.0, *sigma)
                .map(|d| d.sample(rng))
                .unwrap_or(0.0);
            Some((true_ns as f64 * noise.exp()) as u64)
        }
        HintSpec::None => None,
    }
}

/// Agent programs of the first `agents` sessions (by first arrival) of a Mooncake trace.
pub fn chat_workload(
    name: &str,
    requests: &[MooncakeRequest],
    agents: u32,
    window: u32,
    token_scale: f64,
    time_scale: f64,
    hint: &HintSpec,
    seed: u64,
) -> Workload {
    let mut programs = Vec::new();
    for (index, session) in sessions(requests)
        .into_iter()
        .take(agents as usize)
        .enumerate()
    {
        let mut hint_rng = stream(seed, "hint", index as u64);
        let first = &requests[session[0]];
        let mut turns: Vec<TurnProgram> = Vec::new();
        let mut context: u64 = 0;
        let mut previous_arrival_ms = first.timestamp_ms;
        for &ri in &session {
            let r = &requests[ri];
            let input = scaled(r.input_length, token_scale).max(1) as u64;
            let generated = scaled(r.output_length, token_scale).max(1);
            let mut new_tokens = input.saturating_sub(context) as u32;
            if turns.is_empty() {
                new_tokens = new_tokens.max(1);
            }
            if context + new_tokens as u64 + generated as u64 > window as u64 {
                if turns.is_empty() {
                    // A first prompt longer than the window is cut to fit.
                    let g = generated.min(window / 2).max(1);
                    turns.push(TurnProgram {
                        new_tokens: window - g,
                        generated_tokens: g,
                        pause_after: None,
                        context_tokens: None,
                    });
                }
                break;
            }
            if let Some(last) = turns.last_mut() {
                let gap_ns =
                    ((r.timestamp_ms - previous_arrival_ms) as f64 * 1e6 * time_scale) as u64;
                last.pause_after = Some(PauseProgram {
                    true_ns: gap_ns,
                    hint_ns: hint_for(hint, gap_ns, &mut hint_rng),
                });
            }
            previous_arrival_ms = r.timestamp_ms;
            context += new_tokens as u64 + generated as u64;
            turns.push(TurnProgram {
                new_tokens,
                generated_tokens: generated,
                pause_after: None,
                context_tokens: None,
            });
        }
        let arrival = SimTime((first.timestamp_ms as f64 * 1e6 * time_scale) as u64);
        programs.push(AgentProgram {
            agent_id: index as AgentId,
            prefix: None,
            arrival,
            turns,
        });
    }
    sort_and_renumber(&mut programs);
    Workload {
        name: name.to_string(),
        max_context_tokens: window,
        agents: programs,
    }
}

fn sort_and_renumber(programs: &mut [AgentProgram]) {
    programs.sort_by_key(|a| (a.arrival, a.agent_id));
    for (i, a) in programs.iter_mut().enumerate() {
        a.agent_id = i as AgentId;
    }
}

/// Mixes background requests into `workload` so they make `fraction` of all turns. Background
/// arrivals keep the trace's relative spacing, rescaled to span the agent traffic's arrivals
/// plus its mean program length.
pub fn mix_background(
    workload: &mut Workload,
    requests: &[AzureRequest],
    fraction: f64,
    token_scale: f64,
) {
    if fraction <= 0.0 || requests.is_empty() {
        return;
    }
    let agent_turns = workload.turn_count() as f64;
    let count = ((fraction / (1.0 - fraction)) * agent_turns).round() as usize;
    if count == 0 {
        return;
    }
    // The span of the agent traffic: last first-arrival plus the sum of one program's pauses.
    let pause_sum = |a: &AgentProgram| {
        a.turns
            .iter()
            .filter_map(|t| t.pause_after)
            .map(|p| p.true_ns)
            .sum::<u64>()
    };
    let span_ns = workload
        .agents
        .iter()
        .map(|a| a.arrival.as_nanos() + pause_sum(a))
        .max()
        .unwrap_or(0)
        .max(1_000_000_000);
    // Repeat the trace if more requests are needed than it holds.
    let trace_span = requests.last().map(|r| r.offset_ns).unwrap_or(0).max(1);
    let window = workload.max_context_tokens;
    let mut next_id = workload.agents.len() as AgentId;
    for k in 0..count {
        let r = requests[k % requests.len()];
        let lap = (k / requests.len()) as u64;
        let offset = lap * trace_span + r.offset_ns;
        let total_span = trace_span * (count.div_ceil(requests.len()) as u64);
        let at = (offset as f64 / total_span as f64 * span_ns as f64) as u64;
        let generated = scaled(r.generated_tokens, token_scale).clamp(1, window / 2);
        let prompt = scaled(r.context_tokens, token_scale).clamp(1, window - generated);
        workload.agents.push(AgentProgram {
            agent_id: next_id,
            prefix: None,
            arrival: SimTime(at),
            turns: vec![TurnProgram {
                new_tokens: prompt,
                generated_tokens: generated,
                pause_after: None,
                context_tokens: None,
            }],
        });
        next_id += 1;
    }
    sort_and_renumber(&mut workload.agents);
}

/// Builds any workload: synthetic from its distributions, or replayed from its trace; then mixes
/// in background traffic if the spec asks for it. `agents` is the agent count (for a replay: the
/// first `agents` sessions; a cycling `turns` replay reuses its sessions beyond that).
pub fn build_workload(spec: &WorkloadSpec, agents: u32, seed: u64) -> Result<Workload, TraceError> {
    let mut workload = match &spec.replay {
        None => generate(spec, agents, seed),
        Some(r) if r.is_turns() => turns::turns_workload(spec, r, agents, seed)?,
        Some(r) => {
            let (file, text) = trace_text(&r.path)?;
            let requests = parse_mooncake(&file, &text)?;
            chat_workload(
                &spec.name,
                &requests,
                agents,
                spec.max_context_tokens,
                r.token_scale,
                r.time_scale,
                &spec.hint,
                seed,
            )
        }
    };
    if let Some(b) = &spec.background {
        let (file, text) = trace_text(&b.path)?;
        let requests = parse_azure(&file, &text)?;
        mix_background(&mut workload, &requests, b.fraction, b.token_scale);
    }
    Ok(workload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_follow_the_prefix_rule() {
        let r = |t: u64, ids: &[u64]| MooncakeRequest {
            timestamp_ms: t,
            input_length: 512 * ids.len() as u32,
            output_length: 10,
            hash_ids: ids.to_vec(),
        };
        let reqs = vec![
            r(0, &[0, 1, 2]),
            r(1, &[0, 5, 6]),
            r(2, &[0, 1, 7, 8]),
            r(3, &[0, 1, 7, 9]),
            r(4, &[0, 9]),
        ];
        // Request 0 registers [0, 1] (its partial last block dropped), a prefix of request 2,
        // which registers [0, 1, 7], the longest match of request 3. [0] alone links nothing.
        assert_eq!(sessions(&reqs), vec![vec![0, 2, 3], vec![1], vec![4]]);
    }

    #[test]
    fn readers_name_file_and_line() {
        let bad = "{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [1]}\n{\"timestamp\": 1, \"input_length\": \"x\"}\n";
        let e = parse_mooncake("t.jsonl", bad).unwrap_err().to_string();
        assert!(e.contains("t.jsonl") && e.contains("line 2"), "{e}");
        let bad = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47,12,oops\n";
        let e = parse_azure("a.csv", bad).unwrap_err().to_string();
        assert!(
            e.contains("a.csv") && e.contains("line 3") && e.contains("GeneratedTokens"),
            "{e}"
        );
        let e = parse_azure("a.csv", "time,a,b\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn trace_paths_resolve_against_the_spec_folder() {
        let text = crate::experiment::shipped_workload("agents-background").unwrap();
        let mut spec = WorkloadSpec::from_toml_str(Path::new("x.toml"), text).unwrap();
        spec.replay = Some(traces::workload::ReplaySpec {
            format: "mooncake".into(),
            path: "data/trace.jsonl".into(),
            token_scale: 1.0,
            time_scale: 1.0,
            cycle: false,
        });
        resolve_trace_paths(&mut spec, Path::new("specs/w.toml"));
        assert_eq!(
            Path::new(&spec.replay.as_ref().unwrap().path),
            Path::new("specs/data/trace.jsonl")
        );
        // The shipped sample the background names stays a shipped name.
        assert_eq!(
            spec.background.as_ref().unwrap().path,
            "azure_conv_sample.csv"
        );
        spec.replay.as_mut().unwrap().path = "/data/trace.jsonl".into();
        resolve_trace_paths(&mut spec, Path::new("specs/w.toml"));
        assert_eq!(spec.replay.as_ref().unwrap().path, "/data/trace.jsonl");
    }

    #[test]
    fn azure_sample_keeps_arrival_spacing() {
        let (file, text) = trace_text("azure_conv_sample.csv").unwrap();
        let reqs = parse_azure(&file, &text).unwrap();
        assert_eq!(reqs.len(), 2000);
        assert_eq!(reqs[0].offset_ns, 0);
        // 2023-11-16 18:15:46.6805900 -> 18:15:50.9951690
        assert_eq!(reqs[1].offset_ns, 4_314_579_000);
        assert_eq!(
            (reqs[0].context_tokens, reqs[0].generated_tokens),
            (374, 44)
        );
    }

    #[test]
    fn chat_sample_has_multi_turn_sessions_within_the_window() {
        let (file, text) = trace_text("mooncake_conversation_sample.jsonl").unwrap();
        let reqs = parse_mooncake(&file, &text).unwrap();
        let s = sessions(&reqs);
        let multi = s.iter().filter(|x| x.len() > 1).count();
        assert!(multi >= 20, "{multi} multi-turn sessions");
        let w = chat_workload(
            "chat",
            &reqs,
            500,
            4096,
            1.0 / 16.0,
            1.0,
            &HintSpec::Exact,
            1,
        );
        assert_eq!(w.agents.len(), 500);
        assert!(w.agents.iter().all(|a| a.final_sequence_tokens() <= 4096));
        assert!(w.agents.iter().any(|a| a.turns.len() > 1));
        for a in &w.agents {
            for t in &a.turns[..a.turns.len() - 1] {
                let p = t.pause_after.unwrap();
                assert_eq!(p.hint_ns, Some(p.true_ns));
            }
            assert!(a.turns.last().unwrap().pause_after.is_none());
        }
    }

    #[test]
    fn background_makes_the_requested_fraction_of_turns() {
        let (file, text) = trace_text("azure_conv_sample.csv").unwrap();
        let reqs = parse_azure(&file, &text).unwrap();
        let agent = AgentProgram {
            agent_id: 0,
            prefix: None,
            arrival: SimTime::ZERO,
            turns: vec![
                TurnProgram {
                    new_tokens: 10,
                    generated_tokens: 5,
                    pause_after: Some(PauseProgram {
                        true_ns: 60_000_000_000,
                        hint_ns: None
                    }),
                    context_tokens: None,
                };
                3
            ],
        };
        let mut w = Workload {
            name: "x".into(),
            max_context_tokens: 4096,
            agents: vec![agent; 100],
        };
        for a in w.agents.iter_mut() {
            a.turns[2].pause_after = None;
        }
        mix_background(&mut w, &reqs, 0.25, 1.0);
        let single = w.agents.iter().filter(|a| a.turns.len() == 1).count();
        assert_eq!(
            single, 100,
            "300 agent turns + 100 background = 25% background"
        );
        assert!(w.agents.windows(2).all(|p| p[0].arrival <= p[1].arrival));
        assert!(w
            .agents
            .iter()
            .enumerate()
            .all(|(i, a)| a.agent_id == i as u32));
    }
}
