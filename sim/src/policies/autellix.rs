//! `autellix`, `autellix-swap`, `autellix-continuum`: program-level attained-service ordering
//! (Autellix, 2025) combined with a KV placement policy.
//!
//! Order: an agent's priority is its cumulative attained service (GPU time over all its turns so
//! far). Waiting turns sit in K queues with doubling service ranges (`[0, q0)`, `[q0, 2 q0)`,
//! `[2 q0, 4 q0)`, ...), first come first served within a queue; a turn that has waited at least
//! `beta` times its agent's attained service is promoted to the top queue (anti-starvation).
//! Ordering applies at admission: a committed turn runs to its end (no mid-turn preemption).
//!
//! Placement: `vllm` releases the KV to the prefix cache at pause start and reclaims what
//! survives on return; `swap` copies it to the host at pause start (drop if the host is full) and
//! back on return; `continuum` pins it for the TTL of [`super::continuum::TtlPinner`].

use std::collections::BTreeMap;

use crate::ids::AgentId;
use crate::kv::SwapDirection;
use crate::sched::{Phase, SchedEvent, SchedView, Scheduler, StepPlan};

use super::base::{Admission, Evict};
use super::continuum::TtlPinner;

/// Where a paused agent's KV goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placement {
    Vllm,
    Swap,
    Continuum,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AutellixParams {
    /// Number of queues.
    pub queues: u32,
    /// Service range of the first queue; each later queue doubles it.
    pub first_queue_service_ns: u64,
    /// Promote to the top queue when wait >= beta x attained service.
    pub starvation_beta: f64,
}

impl Default for AutellixParams {
    fn default() -> Self {
        AutellixParams {
            queues: 8,
            first_queue_service_ns: 5_000_000,
            starvation_beta: 4.0,
        }
    }
}

#[derive(Debug)]
pub struct Autellix {
    params: AutellixParams,
    placement: Placement,
    adm: Admission,
    ttl: TtlPinner,
    /// Queue index of each waiting agent.
    queue_of: BTreeMap<AgentId, u32>,
    to_place: Vec<AgentId>,
}

impl Autellix {
    pub fn new(placement: Placement, params: AutellixParams) -> Self {
        Autellix {
            params,
            placement,
            adm: Admission::default(),
            ttl: TtlPinner::new(None),
            queue_of: BTreeMap::new(),
            to_place: Vec::new(),
        }
    }

    /// The queue of an agent with `service_ns` attained service.
    pub fn queue_index(&self, service_ns: u64) -> u32 {
        let q0 = self.params.first_queue_service_ns.max(1);
        if service_ns < q0 {
            return 0;
        }
        let doublings = 64 - (service_ns / q0).leading_zeros();
        doublings.min(self.params.queues - 1)
    }

    fn enqueue(&mut self, view: &SchedView, agent: AgentId, queue: u32, class_first: bool) {
        let a = view.agent(agent);
        self.queue_of.insert(agent, queue);
        // Class: pinned returns first (continuum placement), then the queue index.
        let class = if class_first {
            0
        } else {
            1 + queue.min(200) as u8
        };
        self.adm
            .waiting
            .push_class(agent, class, a.turn_arrival.as_nanos());
    }
}

impl Scheduler for Autellix {
    fn name(&self) -> String {
        match self.placement {
            Placement::Vllm => "autellix",
            Placement::Swap => "autellix-swap",
            Placement::Continuum => "autellix-continuum",
        }
        .into()
    }

    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, turn_index } => {
                let pinned = self.placement == Placement::Continuum
                    && turn_index > 0
                    && self.ttl.returned(view, agent);
                let q = self.queue_index(view.agent(agent).attained_service_ns);
                self.enqueue(view, agent, q, false);
                let _ = pinned;
            }
            SchedEvent::TurnFinished { agent, pause, .. } => {
                self.adm.turn_finished(agent);
                match pause {
                    Some(_) => match self.placement {
                        Placement::Continuum => {
                            self.ttl.pin(view, agent);
                        }
                        _ => self.to_place.push(agent),
                    },
                    None => self.ttl.program_done(view.agent(agent).turn_count),
                }
            }
            SchedEvent::SwapDone {
                agent,
                direction: SwapDirection::Out,
                ..
            } => self.adm.swap_out_done(agent),
            SchedEvent::SwapDone { .. } => {}
        }
    }

    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        let mut budget = self.adm.budget(view);
        for agent in std::mem::take(&mut self.to_place) {
            if !Admission::paused_on_gpu(view, agent) {
                continue;
            }
            let how = if self.placement == Placement::Swap {
                Evict::Swap
            } else {
                Evict::Release
            };
            self.adm
                .evict(view, agent, how, view.kv.blocks(agent), plan, &mut budget);
        }
        // Anti-starvation: promote turns that waited beta x their attained service.
        let now = view.now;
        let promote: Vec<AgentId> = self
            .queue_of
            .iter()
            .filter(|&(&a, &q)| {
                let rt = view.agent(a);
                q > 0
                    && rt.phase == Phase::Waiting
                    && (now.saturating_sub(rt.turn_arrival).as_nanos() as f64)
                        >= self.params.starvation_beta
                            * rt.attained_service_ns
                                .max(self.params.first_queue_service_ns)
                                as f64
            })
            .map(|(&a, _)| a)
            .collect();
        for agent in promote {
            if self.adm.waiting.contains(agent) {
                self.enqueue(view, agent, 0, false);
            }
        }
        let victims = if self.placement == Placement::Continuum {
            self.ttl.plan(view, &mut self.adm, plan, &mut budget);
            self.ttl.victims(view)
        } else {
            Vec::new()
        };
        let before = self.adm.committed.len();
        self.adm.admit(view, plan, &mut budget, &victims);
        for i in before..self.adm.committed.len() {
            let agent = self.adm.committed[i];
            self.queue_of.remove(&agent);
            self.ttl.committed(view, agent);
        }
        self.ttl.forget_evicted(plan);
        for &agent in &plan.reject {
            self.queue_of.remove(&agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_double() {
        let a = Autellix::new(
            Placement::Vllm,
            AutellixParams {
                queues: 4,
                first_queue_service_ns: 10,
                starvation_beta: 2.0,
            },
        );
        assert_eq!(a.queue_index(0), 0);
        assert_eq!(a.queue_index(9), 0);
        assert_eq!(a.queue_index(10), 1);
        assert_eq!(a.queue_index(19), 1);
        assert_eq!(a.queue_index(20), 2);
        assert_eq!(a.queue_index(39), 2);
        assert_eq!(a.queue_index(40), 3);
        assert_eq!(a.queue_index(1 << 40), 3);
    }
}
