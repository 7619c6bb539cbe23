//! `swap`: always swap, no prefetch. At pause start the agent's KV is copied to the host (dropped
//! if the host pool is full); on return it is copied back before the turn runs, so the copy time
//! shows up as restore stall. Admission is first come, first served with growth reservation.

use crate::ids::AgentId;
use crate::kv::KvState;
use crate::sched::{Phase, SchedEvent, SchedView, Scheduler, StepPlan};

use super::common::{build_batch, commit_waiting, never_fits, reserved_growth, WaitQueue};

#[derive(Debug, Default)]
pub struct Swap {
    waiting: WaitQueue,
    committed: Vec<AgentId>,
    to_evict: Vec<AgentId>,
}

impl Scheduler for Swap {
    fn name(&self) -> String {
        "swap".into()
    }

    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, .. } => self
                .waiting
                .push(agent, view.agent(agent).turn_arrival.as_nanos()),
            SchedEvent::TurnFinished { agent, pause, .. } => {
                self.committed.retain(|&a| a != agent);
                if pause.is_some() {
                    self.to_evict.push(agent);
                }
            }
            SchedEvent::SwapDone { .. } => {}
        }
    }

    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        let mut host_free = view.kv.host_blocks_free();
        let mut freed_now = 0i64;
        let mut evicted: Vec<AgentId> = Vec::new();
        for agent in self.to_evict.drain(..) {
            // Always swap at turn end, even when the pause was zero and the agent is already back
            // (waiting). A returned agent that kept its KV outside the committed set held blocks
            // the head of the queue needed, and the head was rejected although the pool fits it
            // (found by the property tests).
            if !matches!(view.agent(agent).phase, Phase::Paused | Phase::Waiting)
                || view.kv.state(agent) != KvState::Gpu
            {
                continue;
            }
            evicted.push(agent);
            let blocks = view.kv.blocks(agent);
            if blocks <= host_free {
                host_free -= blocks;
                plan.swap_out.push((agent, blocks));
            } else {
                freed_now += blocks as i64;
                plan.drop.push((agent, 0));
            }
        }
        let reserved = reserved_growth(view, &self.committed) as i64;
        let mut avail = view.kv.gpu_blocks_free() as i64 + freed_now - reserved;
        if let Some((head, _)) = commit_waiting(
            view,
            &mut self.waiting,
            &mut self.committed,
            plan,
            &mut avail,
            true,
            &evicted,
        ) {
            let nothing_can_free = self.committed.is_empty()
                && view.kv.swaps_in_flight() == 0
                && plan.swap_out.is_empty();
            if never_fits(view, head) || nothing_can_free {
                self.waiting.remove(head);
                plan.reject.push(head);
            }
        }
        build_batch(view, &self.committed, plan, !self.waiting.is_empty());
    }
}
