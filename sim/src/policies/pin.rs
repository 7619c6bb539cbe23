//! `pin`: always preserve. A paused agent keeps its blocks on the GPU for the whole pause; a turn
//! is admitted (first come, first served) only when its whole turn fits; when the head turn does
//! not fit and nothing running or moving can free memory, it is rejected as out of memory. This is
//! what a naive HF-transformers server does, and the "cliff" of the original experiment.

use crate::ids::AgentId;
use crate::sched::{SchedEvent, SchedView, Scheduler, StepPlan};

use super::common::{build_batch, commit_waiting, never_fits, reserved_growth, WaitQueue};

#[derive(Debug, Default)]
pub struct Pin {
    waiting: WaitQueue,
    committed: Vec<AgentId>,
}

impl Scheduler for Pin {
    fn name(&self) -> String {
        "pin".into()
    }

    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, .. } => self
                .waiting
                .push(agent, view.agent(agent).turn_arrival.as_nanos()),
            SchedEvent::TurnFinished { agent, .. } => self.committed.retain(|&a| a != agent),
            SchedEvent::SwapDone { .. } => {}
        }
    }

    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        let reserved = reserved_growth(view, &self.committed) as i64;
        let mut avail = view.kv.gpu_blocks_free() as i64 - reserved;
        // Reject every head that cannot fit while nothing can free memory, in this one plan (one
        // rejection per plan made the run loop spin at one instant: 65 idle plans on seed-cliff
        // with 200 agents, seed 1). A rejected agent's KV is freed with it.
        while let Some((head, _need)) = commit_waiting(
            view,
            &mut self.waiting,
            &mut self.committed,
            plan,
            &mut avail,
            true,
            &[],
        ) {
            let nothing_can_free = self.committed.is_empty() && view.kv.swaps_in_flight() == 0;
            if !(never_fits(view, head) || nothing_can_free) {
                break;
            }
            self.waiting.remove(head);
            plan.reject.push(head);
            avail += view.kv.gpu_blocks_held(head) as i64;
        }
        build_batch(view, &self.committed, plan, !self.waiting.is_empty());
    }
}
