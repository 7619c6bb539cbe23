//! The whole future of a workload, as the `offline` reference is given it at construction: every
//! agent's first arrival and, per turn, the new and generated tokens and the true pause after it.
//! No other policy is built with it; the run loop never hands it out.

use crate::ids::AgentId;
use crate::time::SimTime;
use crate::workload::Programs;

/// One turn as it will happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TurnFuture {
    pub new_tokens: u32,
    pub generated_tokens: u32,
    /// The true pause after the turn; `None` after the last.
    pub pause_ns: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AgentFuture {
    arrival: SimTime,
    turns: Vec<TurnFuture>,
}

/// Every agent's program, indexed by agent id, and the first arrivals in time order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Future {
    agents: Vec<AgentFuture>,
    /// (first arrival ns, agent), ascending: the demand of agents not yet arrived.
    arrivals: Vec<(u64, AgentId)>,
}

impl Future {
    /// The future of `workload` (agents are indexed by their position, as the run loop does).
    pub fn of(workload: &dyn Programs) -> Future {
        let agents: Vec<AgentFuture> = (0..workload.agent_count())
            .map(|agent| AgentFuture {
                arrival: workload.arrival(agent),
                turns: (0..workload.turn_count(agent))
                    .map(|k| {
                        let t = workload.turn(agent, k);
                        TurnFuture {
                            new_tokens: t.new_tokens,
                            generated_tokens: t.generated_tokens,
                            pause_ns: t.pause_after.map(|p| p.true_ns),
                        }
                    })
                    .collect(),
            })
            .collect();
        let mut arrivals: Vec<(u64, AgentId)> = agents
            .iter()
            .enumerate()
            .map(|(i, a)| (a.arrival.as_nanos(), i as AgentId))
            .collect();
        arrivals.sort_unstable();
        Future { agents, arrivals }
    }

    /// Turn `turn` of `agent`, if the program has it.
    pub fn turn(&self, agent: AgentId, turn: u32) -> Option<TurnFuture> {
        self.agents
            .get(agent as usize)
            .and_then(|a| a.turns.get(turn as usize))
            .copied()
    }

    /// The true pause after turn `turn` of `agent` (`None` after the last turn).
    pub fn pause_after(&self, agent: AgentId, turn: u32) -> Option<u64> {
        self.turn(agent, turn).and_then(|t| t.pause_ns)
    }

    /// Agents whose first arrival falls in `(after, until]`, in arrival order.
    pub fn arrivals_between(
        &self,
        after: SimTime,
        until: SimTime,
    ) -> impl Iterator<Item = AgentId> + '_ {
        let start = self
            .arrivals
            .partition_point(|&(t, _)| t <= after.as_nanos());
        self.arrivals[start..]
            .iter()
            .take_while(move |&&(t, _)| t <= until.as_nanos())
            .map(|&(_, a)| a)
    }

    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{AgentProgram, PauseProgram, TurnProgram, Workload};

    #[test]
    fn the_future_is_the_workload_with_true_pauses_and_sorted_arrivals() {
        let turn = |pause: Option<u64>| TurnProgram {
            new_tokens: 100,
            generated_tokens: 10,
            pause_after: pause.map(|true_ns| PauseProgram {
                true_ns,
                hint_ns: Some(1),
            }),
            context_tokens: None,
        };
        let workload = Workload {
            name: "w".into(),
            max_context_tokens: 4096,
            agents: vec![
                AgentProgram {
                    agent_id: 0,
                    arrival: SimTime(30),
                    turns: vec![turn(Some(7)), turn(None)],
                    prefix: None,
                },
                AgentProgram {
                    agent_id: 1,
                    arrival: SimTime(10),
                    turns: vec![turn(None)],
                    prefix: None,
                },
            ],
        };
        let f = Future::of(&workload);
        assert_eq!(f.pause_after(0, 0), Some(7), "the true pause, not the hint");
        assert_eq!(f.pause_after(0, 1), None);
        assert_eq!(f.turn(2, 0), None);
        let all: Vec<_> = f.arrivals_between(SimTime(0), SimTime(100)).collect();
        assert_eq!(all, vec![1, 0]);
        let later: Vec<_> = f.arrivals_between(SimTime(10), SimTime(29)).collect();
        assert!(later.is_empty());
    }
}
