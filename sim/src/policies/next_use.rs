//! `next-use` (KVFlow / Tokencake / CachedAttention style): the paused agent predicted to return
//! last is evicted first.
//!
//! - At pause start, offload (swap out) only if the predicted pause `d_hat > 2 T_swap(C) + eps`
//!   (eps = one iteration) and the host has room; otherwise keep.
//! - When waiting turns lack memory, evict paused agents furthest predicted return first (unknown
//!   = furthest): swap if the host has room, else drop.
//! - Prefetch an offloaded agent when its predicted return is within `T_swap(C)` + one iteration.
//! - Turns are admitted first come, first served by turn arrival.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::AgentId;
use crate::kv::{KvState, SwapDirection};
use crate::sched::{Phase, SchedEvent, SchedView, Scheduler, StepPlan};
use crate::time::SimTime;

use super::base::{Admission, Evict};
use super::predict::{PausePredictor, PredictorMode};

#[derive(Debug)]
pub struct NextUse {
    adm: Admission,
    predictor: PausePredictor,
    /// Predicted return of each paused agent (u64::MAX = unknown).
    predicted_return: BTreeMap<AgentId, u64>,
    by_return: BTreeSet<(u64, AgentId)>,
    fresh: Vec<AgentId>,
}

impl NextUse {
    pub fn new(mode: PredictorMode) -> Self {
        NextUse {
            adm: Admission::default(),
            predictor: PausePredictor::new(mode),
            predicted_return: BTreeMap::new(),
            by_return: BTreeSet::new(),
            fresh: Vec::new(),
        }
    }

    fn forget(&mut self, agent: AgentId) {
        if let Some(r) = self.predicted_return.remove(&agent) {
            self.by_return.remove(&(r, agent));
        }
    }
}

impl Scheduler for NextUse {
    fn name(&self) -> String {
        "next-use".into()
    }

    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, turn_index } => {
                if turn_index > 0 {
                    let a = view.agent(agent);
                    self.predictor
                        .observe(agent, a.turn_arrival - a.pause_started);
                    self.forget(agent);
                    self.fresh.retain(|&x| x != agent);
                }
                self.adm
                    .waiting
                    .push(agent, view.agent(agent).turn_arrival.as_nanos());
            }
            SchedEvent::TurnFinished { agent, pause, .. } => {
                self.adm.turn_finished(agent);
                if let Some(p) = pause {
                    let ret = self
                        .predictor
                        .predict(agent, p.hint_ns)
                        .map_or(u64::MAX, |d| view.now.as_nanos().saturating_add(d));
                    self.predicted_return.insert(agent, ret);
                    self.by_return.insert((ret, agent));
                    self.fresh.push(agent);
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
        let now = view.now.as_nanos();
        let t_iter = view.costs.decode_step_ns as u64;
        let mut budget = self.adm.budget(view);
        // 1. Offload at pause start when the pause hides a round trip.
        for agent in std::mem::take(&mut self.fresh) {
            if !Admission::paused_on_gpu(view, agent) {
                continue;
            }
            let ret = self
                .predicted_return
                .get(&agent)
                .copied()
                .unwrap_or(u64::MAX);
            let blocks = view.kv.blocks(agent);
            let t_swap = view
                .costs
                .swap_out_ns(blocks)
                .max(view.costs.swap_in_ns(blocks));
            if ret != u64::MAX
                && ret.saturating_sub(now) > 2 * t_swap + t_iter
                && blocks as i64 <= budget.host_free
            {
                self.adm
                    .evict(view, agent, Evict::Swap, blocks, plan, &mut budget);
            }
        }
        // 2. Evict furthest predicted return first while waiting turns lack memory.
        let total = view.kv.gpu_blocks_total() as i64;
        let committed_held: i64 = self
            .adm
            .committed
            .iter()
            .map(|&a| view.kv.gpu_blocks_held(a) as i64)
            .sum();
        let reserved = self.adm.reserved(view);
        let demand = self
            .adm
            .waiting_demand(view, total - committed_held - reserved);
        let deficit = demand - (budget.free - reserved) - budget.freeing;
        let victims: Vec<(AgentId, Evict)> = self
            .by_return
            .iter()
            .rev()
            .filter(|&&(_, a)| Admission::paused_on_gpu(view, a))
            .map(|&(_, a)| (a, Evict::Swap))
            .collect();
        if deficit > 0 {
            self.adm
                .evict_for(view, deficit, &victims, plan, &mut budget);
        }
        // 3. Prefetch offloaded agents whose predicted return is near, while memory is spare.
        let mut spare = budget.free - reserved - demand.max(0);
        for &(ret, agent) in &self.by_return {
            if ret == u64::MAX {
                break;
            }
            if view.agent(agent).phase != Phase::Paused || view.kv.state(agent) != KvState::Host {
                continue;
            }
            let blocks = (view.kv.blocks(agent) - view.kv.gpu_blocks_held(agent)) as i64;
            let start = ret.saturating_sub(view.costs.swap_in_ns(blocks as u32) + t_iter);
            if start > now {
                plan.wake_no_later_than(SimTime(start));
                break;
            }
            if blocks > spare {
                break;
            }
            spare -= blocks;
            budget.free -= blocks;
            plan.swap_in.push(agent);
        }
        self.adm.admit(view, plan, &mut budget, &victims);
    }
}
