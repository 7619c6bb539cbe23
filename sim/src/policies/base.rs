//! The admission machinery the policy zoo shares: a waiting queue in a policy-chosen order, the
//! committed (running) turns with their growth reserved, eviction of paused agents (swap when the
//! host has room, else drop; or release to the prefix cache), and the stall rule (when nothing
//! runs or moves and the head turn does not fit, evict paused agents in the policy's victim order
//! before rejecting anything).
//!
//! Policies differ in what they do with a paused agent's KV and in their queue order; they all
//! admit a turn only when its whole turn fits (so nothing is preempted mid-turn), which keeps the
//! comparison about placement and order rather than about preemption mechanics.

use std::collections::BTreeMap;

use crate::ids::AgentId;
use crate::kv::KvState;
use crate::sched::{Phase, SchedView, StepPlan};

use super::common::{
    build_batch, need_blocks, never_fits, ready_to_commit, reserved_growth, WaitQueue,
    COMMIT_SCAN_MAX,
};

/// How a paused agent's KV leaves the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evict {
    /// Copy to the host (drop instead when the host pool is full).
    Swap,
    /// Drop; recompute on return.
    Drop,
    /// Release to the GPU prefix cache (vllm style); reclaim what survives on return.
    Release,
}

/// Block counts a plan works with while it is being built.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// GPU blocks free now (prefix-cached blocks count as free), plus what this plan drops.
    pub free: i64,
    pub host_free: i64,
    /// GPU blocks on their way out (swap-outs in flight or planned).
    pub freeing: i64,
}

#[derive(Clone, Debug, Default)]
pub struct Admission {
    pub waiting: WaitQueue,
    pub committed: Vec<AgentId>,
    /// Agents swapping out, with the GPU blocks the copy frees.
    pub swapping_out: BTreeMap<AgentId, u32>,
}

impl Admission {
    pub fn budget(&self, view: &SchedView) -> Budget {
        Budget {
            free: view.kv.gpu_blocks_free() as i64,
            host_free: view.kv.host_blocks_free() as i64,
            freeing: self.swapping_out.values().map(|&b| b as i64).sum(),
        }
    }

    pub fn turn_finished(&mut self, agent: AgentId) {
        self.committed.retain(|&a| a != agent);
    }

    pub fn swap_out_done(&mut self, agent: AgentId) {
        self.swapping_out.remove(&agent);
    }

    /// True when a paused agent's KV sits wholly on the GPU (keepable, evictable).
    pub fn paused_on_gpu(view: &SchedView, agent: AgentId) -> bool {
        view.agent(agent).phase == Phase::Paused
            && view.kv.state(agent) == KvState::Gpu
            && view.kv.blocks(agent) > 0
    }

    /// Takes the last `blocks` GPU blocks of a paused agent off the GPU (all for drop and
    /// release). Returns the way it actually went (a swap with no host room becomes a drop).
    pub fn evict(
        &mut self,
        view: &SchedView,
        agent: AgentId,
        how: Evict,
        blocks: u32,
        plan: &mut StepPlan,
        budget: &mut Budget,
    ) -> Evict {
        let on_gpu = view.kv.gpu_blocks_held(agent);
        match how {
            Evict::Swap if (blocks.min(on_gpu) as i64) <= budget.host_free && blocks > 0 => {
                let moved = blocks.min(on_gpu);
                budget.host_free -= moved as i64;
                budget.freeing += moved as i64;
                self.swapping_out.insert(agent, moved);
                plan.swap_out.push((agent, moved));
                Evict::Swap
            }
            Evict::Release => {
                budget.free += view.kv.blocks(agent) as i64;
                plan.release.push(agent);
                Evict::Release
            }
            _ => {
                // Host blocks of a partly swapped agent go too; only GPU blocks free GPU room.
                budget.free += on_gpu as i64;
                budget.host_free += (view.kv.blocks(agent) - on_gpu) as i64;
                plan.drop.push((agent, 0));
                Evict::Drop
            }
        }
    }

    /// Demand (blocks) of the waiting turns at the head of the queue, summed until it exceeds `cap`.
    pub fn waiting_demand(&self, view: &SchedView, cap: i64) -> i64 {
        let mut demand = 0i64;
        for agent in self.waiting.iter().take(COMMIT_SCAN_MAX) {
            if ready_to_commit(view, agent) {
                demand += need_blocks(view, agent) as i64;
                if demand > cap {
                    break;
                }
            }
        }
        demand
    }

    /// Blocks the committed turns will still allocate.
    pub fn reserved(&self, view: &SchedView) -> i64 {
        reserved_growth(view, &self.committed) as i64
    }

    /// Evicts paused agents from `victims` (in order) until `deficit` blocks are freed or on
    /// their way. Returns what is left of the deficit.
    pub fn evict_for(
        &mut self,
        view: &SchedView,
        mut deficit: i64,
        victims: &[(AgentId, Evict)],
        plan: &mut StepPlan,
        budget: &mut Budget,
    ) -> i64 {
        for &(agent, how) in victims {
            if deficit <= 0 {
                break;
            }
            if !Self::paused_on_gpu(view, agent)
                || plan.drop.iter().any(|d| d.0 == agent)
                || plan.swap_out.iter().any(|s| s.0 == agent)
                || plan.release.contains(&agent)
            {
                continue;
            }
            deficit -= view.kv.gpu_blocks_held(agent) as i64;
            self.evict(view, agent, how, view.kv.blocks(agent), plan, budget);
        }
        deficit
    }

    /// Commits waiting turns in queue order while their whole turn fits, then builds the batch.
    /// When the head does not fit and nothing runs or moves, paused agents are evicted in
    /// `victims` order (the stall rule); a head that still cannot fit is rejected.
    pub fn admit(
        &mut self,
        view: &SchedView,
        plan: &mut StepPlan,
        budget: &mut Budget,
        victims: &[(AgentId, Evict)],
    ) {
        let mut avail = budget.free - self.reserved(view);
        let mut blocked = self.commit(view, plan, &mut avail);
        if let Some((head, need)) = blocked {
            let nothing_moves = self.committed.is_empty()
                && view.kv.swaps_in_flight() == 0
                && plan.swap_out.is_empty();
            if nothing_moves && !never_fits(view, head) {
                let before = budget.free;
                let left = self.evict_for(view, need as i64 - avail, victims, plan, budget);
                avail += budget.free - before;
                if left <= 0 || !plan.swap_out.is_empty() {
                    blocked = self.commit(view, plan, &mut avail);
                }
            }
        }
        // Reject every head that cannot fit while nothing can free memory (all in this plan: one
        // rejection per plan would spin the run loop at one instant).
        while let Some((head, _)) = blocked {
            let nothing_can_free = self.committed.is_empty()
                && view.kv.swaps_in_flight() == 0
                && plan.swap_out.is_empty()
                && plan.drop.is_empty()
                && plan.release.is_empty();
            if !(self.waiting.contains(head) && (never_fits(view, head) || nothing_can_free)) {
                break;
            }
            self.waiting.remove(head);
            plan.reject.push(head);
            // A rejected returning agent's KV is freed with it.
            avail += view.kv.gpu_blocks_held(head) as i64;
            blocked = self.commit(view, plan, &mut avail);
        }
        build_batch(view, &self.committed, plan, !self.waiting.is_empty());
    }

    /// Strict in-order commit; returns the head that did not fit, with its need.
    fn commit(
        &mut self,
        view: &SchedView,
        plan: &mut StepPlan,
        avail: &mut i64,
    ) -> Option<(AgentId, u32)> {
        let mut skipped = 0usize;
        for _ in 0..COMMIT_SCAN_MAX {
            let Some(agent) = self.waiting.iter().nth(skipped) else {
                break;
            };
            let acted_on = plan.drop.iter().any(|d| d.0 == agent)
                || plan.swap_out.iter().any(|s| s.0 == agent)
                || plan.release.contains(&agent);
            if !ready_to_commit(view, agent) || acted_on {
                skipped += 1;
                continue;
            }
            let need = need_blocks(view, agent);
            if (need as i64) > *avail {
                return Some((agent, need));
            }
            *avail -= need as i64;
            match view.kv.state(agent) {
                KvState::Host => plan.swap_in.push(agent),
                KvState::Dropped
                    if view.kv.has_cached_prefix(agent) || view.kv.prefix_hit_blocks(agent) > 0 =>
                {
                    plan.reclaim.push(agent)
                }
                _ => {}
            }
            self.waiting.remove(agent);
            self.committed.push(agent);
        }
        None
    }
}
