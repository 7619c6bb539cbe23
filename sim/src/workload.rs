//! Turns a [`WorkloadSpec`] and a seed into concrete agent programs.
//!
//! Each agent draws from its own sub-stream (`agent`/id for lengths and pauses, `hint`/id for hint
//! noise, `arrival` for start times), so changing one agent's draws never shifts another's.

use rand::Rng;
use rand_distr::{Distribution as _, Exp, LogNormal, Normal};
use traces::workload::{Arrival, Distribution, HintSpec, WorkloadSpec};

use crate::ids::AgentId;
use crate::rng::{stream, SimRng};
use crate::time::SimTime;

mod compact;
pub use compact::{generate_compact, CompactWorkload};

/// The pause after a turn: its true length and what the scheduler is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PauseProgram {
    pub true_ns: u64,
    pub hint_ns: Option<u64>,
}

/// One turn of an agent program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TurnProgram {
    /// New tokens appended to the context at the start of this turn (prompt, tool output).
    pub new_tokens: u32,
    /// Tokens to generate (at least 1).
    pub generated_tokens: u32,
    /// The pause after this turn; `None` for the last turn.
    pub pause_after: Option<PauseProgram>,
    /// `Some(c)` when the agent rewrote its history before this turn (it compacted its
    /// context): the turn's input is `c` tokens, the first `c - new_tokens` tokens of the
    /// previous sequence followed by the new ones; the KV beyond that kept prefix is obsolete.
    /// Always below the previous sequence plus `new_tokens`. `None`: the previous sequence
    /// plus `new_tokens`, as for every generated workload.
    pub context_tokens: Option<u32>,
}

impl TurnProgram {
    /// The turn's input context given the sequence before it.
    pub fn input_tokens(&self, previous_sequence: u64) -> u64 {
        match self.context_tokens {
            Some(c) => c as u64,
            None => previous_sequence + self.new_tokens as u64,
        }
    }
}

/// The shared prefix an agent's first prompt starts with (its prefix group's system prompt and
/// tool schemas): the first `tokens` tokens of its sequence are the same in every agent of
/// `group`, so their KV may be held once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedPrefix {
    /// Index of the group in the spec's `[[prefix_groups]]`.
    pub group: u32,
    pub tokens: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentProgram {
    pub agent_id: AgentId,
    pub arrival: SimTime,
    pub turns: Vec<TurnProgram>,
    /// The shared prefix of its first prompt (included in the first turn's `new_tokens`).
    pub prefix: Option<SharedPrefix>,
}

impl AgentProgram {
    /// Tokens in the sequence after all turns (prompt, new and generated tokens, less what
    /// compactions cut).
    pub fn final_sequence_tokens(&self) -> u64 {
        self.turns.iter().fold(0, |sequence, t| {
            t.input_tokens(sequence) + t.generated_tokens as u64
        })
    }

    /// The largest sequence any turn reaches (the final one unless the agent compacted).
    pub fn peak_sequence_tokens(&self) -> u64 {
        let mut sequence = 0;
        let mut peak = 0;
        for t in &self.turns {
            sequence = t.input_tokens(sequence) + t.generated_tokens as u64;
            peak = peak.max(sequence);
        }
        peak
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub max_context_tokens: u32,
    pub agents: Vec<AgentProgram>,
}

impl Workload {
    pub fn turn_count(&self) -> u64 {
        self.agents.iter().map(|a| a.turns.len() as u64).sum()
    }
}

/// What the run loop reads of agent programs (agents are indexed by their position): a
/// [`Workload`], or the same programs in [`CompactWorkload`]'s flat arrays.
pub trait Programs {
    fn agent_count(&self) -> u32;
    fn arrival(&self, agent: AgentId) -> SimTime;
    fn prefix(&self, agent: AgentId) -> Option<SharedPrefix>;
    fn turn_count(&self, agent: AgentId) -> u32;
    /// Turn `index` of `agent` (both must exist: the run loop asks only for turns it reached).
    fn turn(&self, agent: AgentId, index: u32) -> TurnProgram;
    /// Turns of all programs.
    fn total_turns(&self) -> u64;
}

impl Programs for Workload {
    fn agent_count(&self) -> u32 {
        self.agents.len() as u32
    }
    fn arrival(&self, agent: AgentId) -> SimTime {
        self.agents[agent as usize].arrival
    }
    fn prefix(&self, agent: AgentId) -> Option<SharedPrefix> {
        self.agents[agent as usize].prefix
    }
    fn turn_count(&self, agent: AgentId) -> u32 {
        self.agents[agent as usize].turns.len() as u32
    }
    fn turn(&self, agent: AgentId, index: u32) -> TurnProgram {
        self.agents[agent as usize].turns[index as usize]
    }
    fn total_turns(&self) -> u64 {
        self.turn_count()
    }
}

/// Draws one value of `dist`.
pub fn sample(dist: &Distribution, rng: &mut SimRng) -> f64 {
    match dist {
        Distribution::Constant { value } => *value,
        Distribution::Uniform { low, high } => {
            if high > low {
                rng.gen_range(*low..*high)
            } else {
                *low
            }
        }
        Distribution::Exponential { mean } => {
            Exp::new(1.0 / mean).map(|d| d.sample(rng)).unwrap_or(*mean)
        }
        Distribution::LogNormal {
            median,
            sigma,
            p90,
            max,
        } => {
            let s = Distribution::lognormal_sigma(*median, *sigma, *p90);
            let v = LogNormal::new(median.ln(), s)
                .map(|d| d.sample(rng))
                .unwrap_or(*median);
            match max {
                Some(m) => v.min(*m),
                None => v,
            }
        }
        Distribution::Mixture { components } => {
            let total: f64 = components.iter().map(|c| c.weight).sum();
            let mut pick = rng.gen_range(0.0..total);
            for c in components {
                if pick < c.weight {
                    return sample(&c.dist, rng);
                }
                pick -= c.weight;
            }
            sample(&components[components.len() - 1].dist, rng)
        }
    }
}

fn tokens(value: f64, min: u32) -> u32 {
    (value.round().clamp(0.0, u32::MAX as f64) as u32).max(min)
}

/// Generates the programs of `agent_count` agents (explicit arrivals fix the count).
pub fn generate(spec: &WorkloadSpec, agent_count: u32, seed: u64) -> Workload {
    let agent_count = spec.agent_count(Some(agent_count));
    let arrivals = arrival_times(&spec.arrival, agent_count, seed);
    let prefixes = assign_prefix_groups(spec, agent_count, seed);
    let mut agents = Vec::with_capacity(agent_count as usize);
    for (index, arrival) in arrivals.into_iter().enumerate() {
        let prefix = prefixes.get(index).copied().flatten();
        let mut turns = Vec::new();
        draw_turns(spec, seed, index, prefix, &mut turns);
        agents.push(AgentProgram {
            agent_id: index as AgentId,
            arrival,
            turns,
            prefix: held_prefix(spec, prefix),
        });
    }
    Workload {
        name: spec.name.clone(),
        max_context_tokens: spec.max_context_tokens,
        agents,
    }
}

/// The prefix an agent's KV shares with its group: an unshared group's tokens stay in the prompt,
/// held per agent, so the agent holds no shared prefix.
pub(crate) fn held_prefix(
    spec: &WorkloadSpec,
    prefix: Option<SharedPrefix>,
) -> Option<SharedPrefix> {
    prefix.filter(|p| spec.prefix_groups[p.group as usize].shared)
}

/// Draws the turns of agent `index` (starting with `prefix`) into `turns`, from its own streams:
/// the same (spec, seed, index) always gives the same turns, whatever else is drawn.
pub(crate) fn draw_turns(
    spec: &WorkloadSpec,
    seed: u64,
    index: usize,
    prefix: Option<SharedPrefix>,
    turns: &mut Vec<TurnProgram>,
) {
    let mut rng = stream(seed, "agent", index as u64);
    let mut hint_rng = stream(seed, "hint", index as u64);
    let turn_count = tokens(sample(&spec.agent.turns, &mut rng), 1);
    turns.reserve(turn_count as usize);
    let mut context: u64 = 0;
    let window = spec.max_context_tokens as u64;
    for turn_index in 0..turn_count {
        let mut new_tokens = if turn_index == 0 {
            let own = tokens(sample(&spec.agent.first_prompt_tokens, &mut rng), 1);
            own.saturating_add(prefix.map_or(0, |p| p.tokens))
        } else {
            tokens(sample(&spec.agent.new_tokens, &mut rng), 0)
        };
        let mut generated_tokens = tokens(sample(&spec.agent.generated_tokens, &mut rng), 1);
        let pause_s = sample(&spec.agent.pause_s, &mut rng);
        let noise = match spec.hint {
            HintSpec::Noisy { sigma } => Normal::new(0.0, sigma)
                .map(|d| d.sample(&mut hint_rng))
                .unwrap_or(0.0),
            _ => 0.0,
        };
        if context + new_tokens as u64 + generated_tokens as u64 > window {
            if turn_index > 0 {
                // The model window is full: the agent's program ends with the previous turn.
                break;
            }
            // A first prompt longer than the window is cut to fit (as a client would truncate;
            // a shared prefix, at most half the window, survives the cut).
            generated_tokens = generated_tokens.min((window / 2) as u32).max(1);
            new_tokens = (window - generated_tokens as u64).max(1) as u32;
        }
        context += new_tokens as u64 + generated_tokens as u64;
        let true_ns = SimTime::from_secs_f64(pause_s.max(0.0)).as_nanos();
        let hint_ns = match spec.hint {
            HintSpec::Exact => Some(true_ns),
            HintSpec::Noisy { .. } => {
                Some(SimTime::from_secs_f64(pause_s.max(0.0) * noise.exp()).as_nanos())
            }
            HintSpec::None => None,
        };
        turns.push(TurnProgram {
            new_tokens,
            generated_tokens,
            pause_after: Some(PauseProgram { true_ns, hint_ns }),
            context_tokens: None,
        });
    }
    if let Some(last) = turns.last_mut() {
        last.pause_after = None;
    }
}

/// Which agents start with which group's prefix: each group gets `share` of the agents (rounded),
/// drawn by a seeded shuffle on a stream of its own (the other draws do not move). Empty when the
/// spec has no groups.
pub(crate) fn assign_prefix_groups(
    spec: &WorkloadSpec,
    agent_count: u32,
    seed: u64,
) -> Vec<Option<SharedPrefix>> {
    if spec.prefix_groups.is_empty() {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..agent_count as usize).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut stream(seed, "prefix_group", 0));
    let mut assigned = vec![None; agent_count as usize];
    let mut next = 0usize;
    for (group, g) in spec.prefix_groups.iter().enumerate() {
        let want = (g.share.unwrap_or(0.0) * agent_count as f64).round() as usize;
        let count = want.min(order.len() - next);
        for &agent in &order[next..next + count] {
            assigned[agent] = Some(SharedPrefix {
                group: group as u32,
                tokens: g.tokens,
            });
        }
        next += count;
    }
    assigned
}

pub(crate) fn arrival_times(arrival: &Arrival, agent_count: u32, seed: u64) -> Vec<SimTime> {
    let mut rng = stream(seed, "arrival", 0);
    match arrival {
        Arrival::Poisson { rate_per_s } => {
            let exp = Exp::new(*rate_per_s).expect("validated rate > 0");
            let mut t = 0.0f64;
            (0..agent_count)
                .map(|i| {
                    if i > 0 {
                        t += exp.sample(&mut rng);
                    }
                    SimTime::from_secs_f64(t)
                })
                .collect()
        }
        Arrival::Ramp { ramp_s } => {
            let mut times: Vec<SimTime> = (0..agent_count)
                .map(|_| {
                    if *ramp_s > 0.0 {
                        SimTime::from_secs_f64(rng.gen_range(0.0..*ramp_s))
                    } else {
                        SimTime::ZERO
                    }
                })
                .collect();
            // Agent ids follow arrival order, which keeps tables and traces readable.
            times.sort();
            times
        }
        Arrival::Explicit { times_s } => {
            let mut times: Vec<SimTime> =
                times_s.iter().map(|t| SimTime::from_secs_f64(*t)).collect();
            times.sort();
            times
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> WorkloadSpec {
        WorkloadSpec::from_toml_str(std::path::Path::new("test.toml"), text).unwrap()
    }

    const BASE: &str = r#"
schema_version = 1
name = "t"
agents = 50
max_context_tokens = 4096
[arrival]
kind = "poisson"
rate_per_s = 2.0
[agent]
turns = { kind = "constant", value = 3 }
first_prompt_tokens = { kind = "constant", value = 1000 }
new_tokens = { kind = "uniform", low = 10.0, high = 20.0 }
generated_tokens = { kind = "constant", value = 100 }
pause_s = { kind = "exponential", mean = 5.0 }
[hint]
kind = "exact"
"#;

    #[test]
    fn same_seed_same_programs_and_different_seed_differs() {
        let s = spec(BASE);
        assert_eq!(generate(&s, 50, 7), generate(&s, 50, 7));
        assert_ne!(generate(&s, 50, 7), generate(&s, 50, 8));
    }

    #[test]
    fn last_turn_has_no_pause_and_hints_are_exact() {
        let w = generate(&spec(BASE), 50, 1);
        for a in &w.agents {
            assert_eq!(a.turns.len(), 3);
            assert!(a.turns[2].pause_after.is_none());
            let p = a.turns[0].pause_after.unwrap();
            assert_eq!(p.hint_ns, Some(p.true_ns));
        }
        assert!(w.agents.windows(2).all(|p| p[0].arrival <= p[1].arrival));
    }

    #[test]
    fn programs_respect_the_window() {
        let text = BASE
            .replace("value = 3 }", "value = 100 }")
            .replace("value = 1000", "value = 3000");
        let w = generate(&spec(&text), 20, 3);
        for a in &w.agents {
            assert!(
                a.final_sequence_tokens() <= 4096,
                "{}",
                a.final_sequence_tokens()
            );
            assert!(a.turns.len() < 100);
        }
    }

    #[test]
    fn poisson_rate_is_about_right() {
        let text = BASE.replace("agents = 50", "agents = 4000");
        let w = generate(&spec(&text), 4000, 11);
        let span = w.agents.last().unwrap().arrival.as_secs_f64();
        let rate = 3999.0 / span;
        assert!((rate - 2.0).abs() < 0.15, "rate {rate}");
    }

    #[test]
    fn prefix_groups_get_their_share_of_agents_and_prefix_the_first_prompt() {
        let text = format!(
            "{BASE}\n[[prefix_groups]]\nname = \"a\"\ntokens = 512\nshare = 0.6\n[[prefix_groups]]\nname = \"b\"\ntokens = 100\nshare = 0.2\n"
        );
        let with = generate(&spec(&text), 50, 4);
        let without = generate(&spec(BASE), 50, 4);
        let count = |g: u32| {
            with.agents
                .iter()
                .filter(|a| a.prefix.map(|p| p.group) == Some(g))
                .count()
        };
        assert_eq!((count(0), count(1)), (30, 10));
        for (a, b) in with.agents.iter().zip(&without.agents) {
            let extra = a.prefix.map_or(0, |p| p.tokens);
            assert_eq!(a.turns[0].new_tokens, b.turns[0].new_tokens + extra);
            assert_eq!(a.turns[1..], b.turns[1..], "other draws do not move");
        }
        assert_eq!(with, generate(&spec(&text), 50, 4));
        assert_ne!(with, generate(&spec(&text), 50, 5));
        // Unshared groups: the very same programs, each agent holding its own copy.
        let own = generate(
            &spec(&text.replace("share = 0.6", "share = 0.6\nshared = false")),
            50,
            4,
        );
        for (a, b) in own.agents.iter().zip(&with.agents) {
            assert_eq!(a.turns, b.turns);
            assert_eq!(a.prefix, b.prefix.filter(|p| p.group == 1));
        }
    }
}
