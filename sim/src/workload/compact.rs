//! Generated programs in flat arrays, for runs of a million agents. A [`Workload`] holds every
//! turn as a [`TurnProgram`] of 40 bytes in a vector of its own per agent: 690 MB for the
//! 15.5 million turns of a million agents of agents-capacity, most of a 1 GB budget. Here a turn
//! is 16 bytes in one array with per-agent ranges (the pause after the last turn, and hints that
//! equal the pause, are implied rather than stored), drawn from the same streams as
//! [`super::generate`], so the same seed gives the same programs.

use traces::workload::{HintSpec, WorkloadSpec};

use super::{
    arrival_times, assign_prefix_groups, draw_turns, held_prefix, AgentProgram, PauseProgram,
    Programs, SharedPrefix, TurnProgram, Workload,
};
use crate::ids::AgentId;
use crate::time::SimTime;

/// One turn: its tokens and the true pause after it (unused after an agent's last turn).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PackedTurn {
    new_tokens: u32,
    generated_tokens: u32,
    pause_ns: u64,
}

/// What the scheduler is told of each pause.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Hints {
    /// The true pause.
    Exact,
    /// Nothing.
    Absent,
    /// A hint per turn, parallel to the turns (unused after an agent's last turn).
    Each(Vec<u64>),
}

/// The programs of a generated workload, compactly (see the module doc). Generated programs
/// never compact their history, so no turn has an explicit context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactWorkload {
    pub name: String,
    pub max_context_tokens: u32,
    arrivals: Vec<SimTime>,
    /// Per agent, empty when the spec has no prefix groups.
    prefixes: Vec<Option<SharedPrefix>>,
    /// Agent `i`'s turns are `turns[starts[i]..starts[i + 1]]`.
    starts: Vec<u64>,
    turns: Vec<PackedTurn>,
    hints: Hints,
}

/// [`super::generate`]'s programs, compactly: `generate_compact(..).to_workload()` equals
/// `generate(..)` for the same arguments.
pub fn generate_compact(spec: &WorkloadSpec, agent_count: u32, seed: u64) -> CompactWorkload {
    let agent_count = spec.agent_count(Some(agent_count));
    let arrivals = arrival_times(&spec.arrival, agent_count, seed);
    let drawn_prefixes = assign_prefix_groups(spec, agent_count, seed);
    let mut prefixes = Vec::with_capacity(drawn_prefixes.len());
    let mut starts = Vec::with_capacity(agent_count as usize + 1);
    let mut turns = Vec::new();
    let mut hints = match spec.hint {
        HintSpec::Exact => Hints::Exact,
        HintSpec::None => Hints::Absent,
        HintSpec::Noisy { .. } => Hints::Each(Vec::new()),
    };
    let mut buffer: Vec<TurnProgram> = Vec::new();
    starts.push(0);
    for index in 0..agent_count as usize {
        buffer.clear();
        let prefix = drawn_prefixes.get(index).copied().flatten();
        draw_turns(spec, seed, index, prefix, &mut buffer);
        if !drawn_prefixes.is_empty() {
            prefixes.push(held_prefix(spec, prefix));
        }
        for t in &buffer {
            let pause = t.pause_after;
            turns.push(PackedTurn {
                new_tokens: t.new_tokens,
                generated_tokens: t.generated_tokens,
                pause_ns: pause.map_or(0, |p| p.true_ns),
            });
            if let Hints::Each(each) = &mut hints {
                each.push(pause.and_then(|p| p.hint_ns).unwrap_or(0));
            }
        }
        starts.push(turns.len() as u64);
    }
    turns.shrink_to_fit();
    if let Hints::Each(each) = &mut hints {
        each.shrink_to_fit();
    }
    CompactWorkload {
        name: spec.name.clone(),
        max_context_tokens: spec.max_context_tokens,
        arrivals,
        prefixes,
        starts,
        turns,
        hints,
    }
}

impl CompactWorkload {
    fn range(&self, agent: AgentId) -> (usize, usize) {
        let i = agent as usize;
        (self.starts[i] as usize, self.starts[i + 1] as usize)
    }

    /// The same programs as a [`Workload`] (for what reads whole programs, e.g. the `offline`
    /// reference policy).
    pub fn to_workload(&self) -> Workload {
        let agents = (0..self.agent_count())
            .map(|agent| AgentProgram {
                agent_id: agent,
                arrival: self.arrival(agent),
                turns: (0..self.turn_count(agent))
                    .map(|k| self.turn(agent, k))
                    .collect(),
                prefix: self.prefix(agent),
            })
            .collect();
        Workload {
            name: self.name.clone(),
            max_context_tokens: self.max_context_tokens,
            agents,
        }
    }
}

impl Programs for CompactWorkload {
    fn agent_count(&self) -> u32 {
        self.arrivals.len() as u32
    }
    fn arrival(&self, agent: AgentId) -> SimTime {
        self.arrivals[agent as usize]
    }
    fn prefix(&self, agent: AgentId) -> Option<SharedPrefix> {
        self.prefixes.get(agent as usize).copied().flatten()
    }
    fn turn_count(&self, agent: AgentId) -> u32 {
        let (start, end) = self.range(agent);
        (end - start) as u32
    }
    fn turn(&self, agent: AgentId, index: u32) -> TurnProgram {
        let (start, end) = self.range(agent);
        let i = start + index as usize;
        assert!(i < end, "agent {agent} has no turn {index}");
        let t = self.turns[i];
        let pause_after = (i + 1 < end).then(|| PauseProgram {
            true_ns: t.pause_ns,
            hint_ns: match &self.hints {
                Hints::Exact => Some(t.pause_ns),
                Hints::Absent => None,
                Hints::Each(each) => Some(each[i]),
            },
        });
        TurnProgram {
            new_tokens: t.new_tokens,
            generated_tokens: t.generated_tokens,
            pause_after,
            context_tokens: None,
        }
    }
    fn total_turns(&self) -> u64 {
        self.turns.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::super::generate;
    use super::*;

    fn spec(hint: &str, groups: Groups) -> WorkloadSpec {
        let mut text = format!(
            r#"
schema_version = 1
name = "t"
agents = 60
max_context_tokens = 2048
[arrival]
kind = "ramp"
ramp_s = 5.0
[agent]
turns = {{ kind = "uniform", low = 1.0, high = 30.0 }}
first_prompt_tokens = {{ kind = "lognormal", median = 600.0, p90 = 900.0 }}
new_tokens = {{ kind = "uniform", low = 0.0, high = 200.0 }}
generated_tokens = {{ kind = "lognormal", median = 80.0, p90 = 160.0 }}
pause_s = {{ kind = "exponential", mean = 3.0 }}
[hint]
{hint}
"#
        );
        if groups != Groups::None {
            text.push_str("[[prefix_groups]]\nname = \"g\"\ntokens = 300\nshare = 0.5\n");
        }
        if groups == Groups::Unshared {
            text.push_str("shared = false\n");
        }
        WorkloadSpec::from_toml_str(std::path::Path::new("t.toml"), &text).unwrap()
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Groups {
        None,
        Shared,
        Unshared,
    }

    #[test]
    fn compact_programs_are_the_generated_ones() {
        let hints = [
            "kind = \"exact\"",
            "kind = \"none\"",
            "kind = \"noisy\"\nsigma = 0.5",
        ];
        let kinds = [Groups::None, Groups::Shared, Groups::Unshared];
        for (hint, groups) in hints.iter().flat_map(|h| kinds.map(|g| (h, g))) {
            let s = spec(hint, groups);
            for seed in [0, 9] {
                let full = generate(&s, 60, seed);
                let compact = generate_compact(&s, 60, seed);
                assert_eq!(compact.to_workload(), full, "{hint}, groups {groups:?}");
                assert_eq!(compact.total_turns(), full.turn_count());
                assert!(full.agents.iter().any(|a| a.turns.len() > 1));
            }
        }
    }
}
