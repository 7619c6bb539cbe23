//! How `djinn` builds a step. `Scheduler::plan_step` runs the numbered steps below in order;
//! each is a method here, and all of them spend one [`PlanBudget`] of blocks, so a block freed
//! or taken by an early step is seen by the later ones.

use std::ops::Bound::{Excluded, Unbounded};

use crate::ids::AgentId;
use crate::kv::KvState;
use crate::policies::common::{
    commit_waiting, need_blocks, never_fits, ready_to_commit, QueuePosition,
};
use crate::sched::{Phase, SchedView, StepPlan};
use crate::time::SimTime;

use super::{Djinn, PREFETCH_LOOKAHEAD, QUEUE_WAIT_ALPHA, UNKNOWN_RETURN_KEY, WAITING_SCAN_MAX};

/// Block counts a plan works with while it is being built.
pub(super) struct PlanBudget {
    free: i64,
    host_free: i64,
    /// GPU blocks already on their way out (freed when the copies finish).
    freeing: i64,
    /// Until when (from now) the device-to-host channel is busy, with this plan's copies.
    out_backlog_ns: u64,
}

/// What every step of a plan reads, taken once at its start (before anything is evicted).
pub(super) struct PlanFrame {
    /// Blocks reserved for the growth of committed turns.
    reserved: i64,
    /// Free blocks kept in hand beyond known demand.
    watermark: i64,
    /// Blocks the turns that could be admitted next need.
    waiting_demand: i64,
    /// Queue position of the last waiting turn the current memory could serve (the head
    /// region); turns after it wait longer.
    head_region_end: Option<QueuePosition>,
    /// Projected GPU use (used, reserved and waiting demand) as a fraction of the pool.
    pressure: f64,
    /// When turns queue, a returning agent waits before it runs: its KV is needed that much
    /// later, so keeping it resident through the wait is wasted memory (0 unless queue-aware).
    queue_wait: u64,
}

/// How far memory falls short while evicting for waiting turns (step 2).
struct Shortfall {
    /// What the waiting turns need, plus the watermark, beyond what is free or freeing.
    deficit: i64,
    /// What the first waiting turn alone lacks: when the host is full an eviction is a drop
    /// (recompute later), worth it only for the turn that runs next.
    head_lack: i64,
}

impl Djinn {
    /// A paused agent still away after its predicted return was mispredicted (a noisy or
    /// missing hint). Left at its stale key it counted as "back sooner than a round trip"
    /// forever, was never evicted, and waiting turns stalled until its true return (minutes;
    /// found by the property tests). Predict again: away as long again as it has been so far.
    pub(super) fn repredict_overdue(&mut self, view: &SchedView) {
        let now = view.now;
        while let Some(&(key, agent)) = self.resident_paused.iter().next() {
            if key >= now.as_nanos() {
                break;
            }
            self.resident_paused.remove(&(key, agent));
            if view.agent(agent).phase != Phase::Paused || self.return_key(view, agent) != key {
                continue;
            }
            let elapsed = now - view.agent(agent).pause_started;
            let predicted = now + elapsed.max(1);
            self.predicted_return.insert(agent, Some(predicted));
            self.resident_paused.insert((predicted.as_nanos(), agent));
        }
    }

    /// The figures every step reads. The demand scan stops once the demand exceeds every block
    /// not held by a committed turn: eviction could not serve more, and the bound keeps a plan
    /// O(batch) with thousands of agents queued.
    pub(super) fn plan_frame(&self, view: &SchedView) -> PlanFrame {
        let kv = view.kv;
        let total = kv.gpu_blocks_total() as i64;
        let watermark = (total as f64 * self.params.watermark_fraction).ceil() as i64;
        // One pass over the committed turns for their reserved growth and held blocks.
        let mut reserved = 0u32;
        let mut committed_held = 0i64;
        for &a in &self.committed {
            reserved += view.growth_blocks_to_finish(a);
            committed_held += kv.gpu_blocks_held(a) as i64;
        }
        let reserved = reserved as i64;
        let demand_cap = total - committed_held - reserved;
        let mut waiting_demand: i64 = 0;
        let mut head_region_end: Option<QueuePosition> = None;
        for (pos, agent) in self.waiting.iter_positions().take(WAITING_SCAN_MAX) {
            head_region_end = Some(pos);
            if ready_to_commit(view, agent) {
                waiting_demand += need_blocks(view, agent) as i64;
                if waiting_demand > demand_cap {
                    break;
                }
            }
        }
        let pressure =
            (kv.gpu_blocks_used() as i64 + reserved + waiting_demand) as f64 / total.max(1) as f64;
        let queue_wait = if self.params.queue_aware {
            self.queue_wait_ns as u64
        } else {
            0
        };
        PlanFrame {
            reserved,
            watermark,
            waiting_demand,
            head_region_end,
            pressure,
            queue_wait,
        }
    }

    /// The blocks a plan starts with: free and freeing ones, host room, the copy backlog.
    pub(super) fn plan_budget(&self, view: &SchedView) -> PlanBudget {
        PlanBudget {
            free: view.kv.gpu_blocks_free() as i64,
            host_free: view.kv.host_blocks_free() as i64,
            freeing: self.swapping_out.values().map(|&b| b as i64).sum(),
            out_backlog_ns: if self.params.queue_aware {
                view.swap_out_busy_until.saturating_sub(view.now).as_nanos()
            } else {
                0
            },
        }
    }

    /// Host blocks that dropping host-resident KV needed later than `next_use` could free, up
    /// to `want` (0 unless the host is used as a cache).
    fn host_room_possible(&self, view: &SchedView, next_use: u64, want: i64) -> i64 {
        if !self.params.host_as_cache {
            return 0;
        }
        let mut room = 0i64;
        for &(key, agent) in self.host_paused.iter().rev() {
            if key <= next_use || room >= want {
                break;
            }
            if view.kv.state(agent) == KvState::Host {
                room += view.kv.host_blocks_held(agent) as i64;
            }
        }
        room
    }

    /// Makes room for `blocks` on the host by dropping the host-resident KV needed furthest in
    /// the future, all of it needed later than `next_use` (Belady on the host pool: a drop
    /// recomputes one context either way, so keep the ones needed sooner). False, dropping
    /// nothing, when that cannot free enough.
    fn make_host_room(
        &mut self,
        view: &SchedView,
        blocks: u32,
        next_use: u64,
        plan: &mut StepPlan,
        budget: &mut PlanBudget,
    ) -> bool {
        let lack = blocks as i64 - budget.host_free;
        if lack <= 0 {
            return true;
        }
        if self.host_room_possible(view, next_use, lack) < lack {
            return false;
        }
        while (blocks as i64) > budget.host_free {
            let Some(&(key, victim)) = self.host_paused.iter().next_back() else {
                return false;
            };
            self.host_paused.remove(&(key, victim));
            self.host_paused_key.remove(&victim);
            if view.kv.state(victim) != KvState::Host {
                continue;
            }
            if let Some(start) = self.prefetch_key.remove(&victim) {
                self.prefetch_at.remove(&(start, victim));
            }
            budget.host_free += view.kv.host_blocks_held(victim) as i64;
            plan.drop.push((victim, 0));
        }
        true
    }

    /// Takes a resident agent's KV off the GPU: swap if the host has room, or room can be made
    /// by dropping KV needed after `next_use` (and `drop` is not asked), else drop.
    fn evict(
        &mut self,
        view: &SchedView,
        agent: AgentId,
        next_use: u64,
        drop: bool,
        plan: &mut StepPlan,
        budget: &mut PlanBudget,
    ) {
        let blocks = view.kv.blocks(agent);
        let key = self.return_key(view, agent);
        self.resident_paused.remove(&(key, agent));
        self.unpark(agent);
        if !drop
            && (blocks as i64 <= budget.host_free
                || self.make_host_room(view, blocks, next_use, plan, budget))
        {
            budget.host_free -= blocks as i64;
            budget.freeing += blocks as i64;
            budget.out_backlog_ns += view.costs.swap_out_ns(blocks);
            self.swapping_out.insert(agent, blocks);
            plan.swap_out.push((agent, blocks));
        } else {
            budget.free += blocks as i64;
            plan.drop.push((agent, 0));
        }
    }

    /// Step 1, pause-start decisions: under pressure, swap out a freshly paused agent whose
    /// told pause hides the round trip and the device-to-host backlog (and the host has room).
    pub(super) fn decide_pause_starts(
        &mut self,
        view: &SchedView,
        frame: &PlanFrame,
        plan: &mut StepPlan,
        budget: &mut PlanBudget,
    ) {
        let kv = view.kv;
        let mut fresh = std::mem::take(&mut self.fresh);
        for &agent in &fresh {
            if frame.pressure < self.params.keep_below_pressure
                || view.agent(agent).phase != Phase::Paused
                || kv.state(agent) != KvState::Gpu
            {
                continue;
            }
            let blocks = kv.blocks(agent);
            if blocks == 0 {
                continue;
            }
            let round_trip = view.costs.swap_out_ns(blocks) + view.costs.swap_in_ns(blocks);
            if let Some(Some(ret)) = self.predicted_return.get(&agent).copied() {
                let remaining = ret.saturating_sub(view.now).as_nanos();
                // The copy starts only after the device-to-host backlog: a swap that cannot
                // finish and come back before the return only delays the agent.
                let swap_pays = remaining
                    >= round_trip
                        + self.prefetch_margin_ns(view.costs.swap_in_ns(blocks))
                        + budget.out_backlog_ns;
                let key = self.return_key(view, agent);
                let host_room = blocks as i64 <= budget.host_free;
                if swap_pays && (!self.params.queue_aware || host_room) {
                    // Ahead of need only a swap pays: a drop here would buy recompute for memory
                    // nobody asked for yet (the demand-driven step below may still drop).
                    self.evict(view, agent, key, false, plan, budget);
                }
            }
        }
        // Keep the buffer (nothing above adds fresh pauses): no allocation per plan.
        fresh.clear();
        if self.fresh.is_empty() {
            self.fresh = fresh;
        }
    }

    /// Step 2, evict ahead of need: free what waiting turns need (plus a watermark) from paused
    /// agents, then from turns parked at the queue tail, then, in a stall, from any parked turn.
    /// Returns the waiting agents evicted (they must not be committed in this plan).
    pub(super) fn evict_for_waiting(
        &mut self,
        view: &SchedView,
        frame: &PlanFrame,
        plan: &mut StepPlan,
        budget: &mut PlanBudget,
    ) -> Vec<AgentId> {
        let available = budget.free - frame.reserved + budget.freeing;
        let head_need = self
            .waiting
            .iter()
            .find(|&a| ready_to_commit(view, a))
            .map_or(0, |h| need_blocks(view, h) as i64);
        let mut short = Shortfall {
            deficit: frame.waiting_demand + frame.watermark - available,
            head_lack: head_need - available,
        };
        self.evict_paused_for_waiting(view, frame, &mut short, plan, budget);
        let mut evicted_waiting = Vec::new();
        if self.params.queue_aware && short.deficit > 0 {
            if let Some(boundary) = frame.head_region_end {
                evicted_waiting =
                    self.evict_parked_tail(view, frame, boundary, short, plan, budget);
            }
        }
        self.relieve_stall(view, frame, plan, budget, &mut evicted_waiting);
        evicted_waiting
    }

    /// Paused agents go first, furthest predicted return first. An agent predicted back sooner
    /// than its swap round trip is left alone: evicting it would only make it wait for its own
    /// KV (and thrash the copy engine).
    fn evict_paused_for_waiting(
        &mut self,
        view: &SchedView,
        frame: &PlanFrame,
        short: &mut Shortfall,
        plan: &mut StepPlan,
        budget: &mut PlanBudget,
    ) {
        let kv = view.kv;
        while short.deficit > 0 {
            let Some(&(key, agent)) = self.resident_paused.iter().next_back() else {
                break;
            };
            if view.agent(agent).phase != Phase::Paused
                || kv.state(agent) != KvState::Gpu
                || kv.blocks(agent) == 0
            {
                self.resident_paused.remove(&(key, agent));
                continue;
            }
            let blocks = kv.blocks(agent);
            let round_trip = view.costs.swap_out_ns(blocks) + view.costs.swap_in_ns(blocks);
            if key < UNKNOWN_RETURN_KEY
                && (key + frame.queue_wait).saturating_sub(view.now.as_nanos()) < round_trip
            {
                // Sorted by return: everyone left returns even sooner.
                break;
            }
            let lack = blocks as i64 - budget.host_free;
            if self.params.queue_aware
                && lack > 0
                && short.head_lack <= 0
                && self.host_room_possible(view, key, lack) < lack
            {
                break;
            }
            short.deficit -= blocks as i64;
            short.head_lack -= blocks as i64;
            self.evict(view, agent, key, false, plan, budget);
        }
    }

    /// Under a queue, turns parked beyond the head region hold KV they will not use for at
    /// least the queueing delay: move them out (tail first) before the head waits for memory.
    /// The parked index is ordered by queue position, so this costs O(log n) per turn moved.
    fn evict_parked_tail(
        &mut self,
        view: &SchedView,
        frame: &PlanFrame,
        boundary: QueuePosition,
        mut short: Shortfall,
        plan: &mut StepPlan,
        budget: &mut PlanBudget,
    ) -> Vec<AgentId> {
        let kv = view.kv;
        let mut evicted = Vec::new();
        while short.deficit > 0 {
            let Some(&(pos, agent)) = self
                .parked
                .range(((Excluded((boundary, AgentId::MAX))), Unbounded))
                .next_back()
            else {
                break;
            };
            if !self.waiting.contains(agent)
                || kv.state(agent) != KvState::Gpu
                || kv.blocks(agent) == 0
            {
                self.parked.remove(&(pos, agent));
                self.parked_at.remove(&agent);
                continue;
            }
            let blocks = kv.blocks(agent);
            if frame.queue_wait < view.costs.swap_out_ns(blocks) + view.costs.swap_in_ns(blocks) {
                break;
            }
            let next_use = view.now.as_nanos() + frame.queue_wait;
            let lack = blocks as i64 - budget.host_free;
            let drop = if lack > 0 && self.host_room_possible(view, next_use, lack) < lack {
                // Host full: dropping a turn that is about to run only moves work to recompute;
                // one that waits longer than its recompute takes, while the head lacks memory,
                // holds memory for nothing.
                if self.params.drop_parked_when_host_full
                    && short.head_lack > 0
                    && view.costs.recompute_ns(kv.kv_tokens(agent)) < frame.queue_wait
                {
                    short.head_lack -= blocks as i64;
                    true
                } else {
                    break;
                }
            } else {
                false
            };
            short.deficit -= blocks as i64;
            self.evict(view, agent, next_use, drop, plan, budget);
            evicted.push(agent);
        }
        evicted
    }

    /// A stall: nothing runs, and the first waiting turn cannot fit even counting what is
    /// already moving out. Then the GPU is held by waiting turns parked behind it; move the
    /// lowest-priority ones (latest in the queue) out of the way.
    fn relieve_stall(
        &mut self,
        view: &SchedView,
        frame: &PlanFrame,
        plan: &mut StepPlan,
        budget: &mut PlanBudget,
        evicted_waiting: &mut Vec<AgentId>,
    ) {
        let kv = view.kv;
        let head = self.waiting.iter().find(|&a| ready_to_commit(view, a));
        let head_deficit = head.map_or(0, |h| need_blocks(view, h) as i64)
            - (budget.free - frame.reserved)
            - budget.freeing;
        if head_deficit <= 0 || !self.committed.is_empty() {
            return;
        }
        let mut victims: Vec<AgentId> = Vec::new();
        let mut stale: Vec<(QueuePosition, AgentId)> = Vec::new();
        let mut freed = 0i64;
        for &(pos, a) in self.parked.iter().rev() {
            if freed >= head_deficit {
                break;
            }
            if Some(a) == head {
                continue;
            }
            if !self.waiting.contains(a) || kv.state(a) != KvState::Gpu || kv.blocks(a) == 0 {
                stale.push((pos, a));
                continue;
            }
            freed += kv.blocks(a) as i64;
            victims.push(a);
        }
        for (pos, a) in stale {
            self.parked.remove(&(pos, a));
            self.parked_at.remove(&a);
        }
        for agent in victims {
            let next_use = view.now.as_nanos() + frame.queue_wait;
            self.evict(view, agent, next_use, false, plan, budget);
            evicted_waiting.push(agent);
        }
    }

    /// Step 3, prefetch paused agents whose predicted return is near. Copies queue on the
    /// host-to-device channel, so a prefetch starts earlier by the backlog ahead of it,
    /// including the prefetches this plan issues; and a prefetch due later can force an earlier
    /// one to start sooner: the first in line must start by the minimum over the next few of
    /// (their deadline - margin - the copy time of everything up to and including them).
    pub(super) fn prefetch_near_returns(
        &mut self,
        view: &SchedView,
        frame: &PlanFrame,
        plan: &mut StepPlan,
        budget: &mut PlanBudget,
    ) {
        let kv = view.kv;
        let now = view.now;
        let mut spare = budget.free - frame.reserved - frame.waiting_demand - frame.watermark;
        let mut backlog = view.swap_in_busy_until.saturating_sub(now).as_nanos();
        loop {
            let Some(&(first_key, first)) = self.prefetch_at.iter().next() else {
                break;
            };
            if view.agent(first).phase != Phase::Paused || kv.state(first) != KvState::Host {
                self.prefetch_at.remove(&(first_key, first));
                self.prefetch_key.remove(&first);
                continue;
            }
            let latest_start = self.latest_prefetch_start(view);
            if now.as_nanos() + backlog < latest_start {
                plan.wake_no_later_than(SimTime(latest_start.saturating_sub(backlog)).max(now + 1));
                break;
            }
            let blocks = (kv.blocks(first) - kv.gpu_blocks_held(first)) as i64;
            if blocks > spare {
                // No room yet: try again after the next event (returns and finishes free memory).
                break;
            }
            self.prefetch_at.remove(&(first_key, first));
            self.prefetch_key.remove(&first);
            self.forget_host_paused(first);
            spare -= blocks;
            budget.free -= blocks;
            backlog += view.costs.swap_in_ns(blocks as u32);
            plan.swap_in.push(first);
        }
    }

    /// When the first prefetch in line must start, given the ones due after it.
    fn latest_prefetch_start(&self, view: &SchedView) -> u64 {
        let kv = view.kv;
        let mut cumulative_ns = 0u64;
        let mut latest_start = u64::MAX;
        for &(key, agent) in self.prefetch_at.iter().take(PREFETCH_LOOKAHEAD) {
            let t_in = view
                .costs
                .swap_in_ns(kv.blocks(agent).saturating_sub(kv.gpu_blocks_held(agent)));
            cumulative_ns += t_in;
            // key = deadline - t_in - margin, so deadline - margin - cumulative = key + t_in - cumulative.
            latest_start = latest_start.min((key + t_in).saturating_sub(cumulative_ns));
        }
        latest_start
    }

    /// Step 4, commit waiting turns in order. When the head does not fit and nothing is
    /// running, later turns that fit may overtake it (work conservation: e.g. agents back from
    /// a short pause whose KV is still resident need only their growth); while turns run, only
    /// those with resident KV may. A head that can never fit, or that nothing could make room
    /// for, is rejected.
    pub(super) fn commit_in_order(
        &mut self,
        view: &SchedView,
        frame: &PlanFrame,
        plan: &mut StepPlan,
        budget: &PlanBudget,
        evicted_waiting: &[AgentId],
    ) {
        let mut avail = budget.free - frame.reserved;
        let committed_before = self.committed.len();
        let mut blocked = commit_waiting(
            view,
            &mut self.waiting,
            &mut self.committed,
            plan,
            &mut avail,
            true,
            evicted_waiting,
        );
        if blocked.is_some() && self.committed.is_empty() {
            blocked = commit_waiting(
                view,
                &mut self.waiting,
                &mut self.committed,
                plan,
                &mut avail,
                false,
                evicted_waiting,
            )
            .or(blocked);
        }
        if blocked.is_some() && !self.committed.is_empty() {
            self.overtake_with_resident_kv(view, &mut avail, evicted_waiting);
        }
        for &agent in &self.committed[committed_before..] {
            let waited = view
                .now
                .saturating_sub(view.agent(agent).turn_arrival)
                .as_nanos() as f64;
            self.queue_wait_ns =
                QUEUE_WAIT_ALPHA * waited + (1.0 - QUEUE_WAIT_ALPHA) * self.queue_wait_ns;
        }
        if let Some((head, _)) = blocked {
            self.reject_if_hopeless(view, plan, head);
        }
        for i in committed_before..self.committed.len() {
            let agent = self.committed[i];
            self.unpark(agent);
        }
        for i in 0..plan.reject.len() {
            let agent = plan.reject[i];
            self.unpark(agent);
        }
    }

    /// While the head waits for memory behind running turns, waiting turns whose KV is on the
    /// GPU commit past it when their growth fits: they need no copy and no prefill of their
    /// history, and the head gains nothing by their waiting (what it waits for is freed by
    /// running turns ending or by evictions, not by the little these turns add). Without this,
    /// one long decode (outputs of thousands of tokens at real scale) kept every agent back from
    /// a short tool call queued behind a head that was swapped out.
    fn overtake_with_resident_kv(&mut self, view: &SchedView, avail: &mut i64, skip: &[AgentId]) {
        // Needs are never negative: once nothing is left, nothing can be picked.
        if *avail < 0 || self.resident_waiting.is_empty() {
            return;
        }
        // Only the first WAITING_SCAN_MAX waiting turns are looked at.
        let last = if self.waiting.len() > WAITING_SCAN_MAX {
            self.waiting
                .iter_positions()
                .nth(WAITING_SCAN_MAX - 1)
                .map(|(pos, _)| pos)
        } else {
            None
        };
        let kv = view.kv;
        let mut picked = Vec::new();
        let mut stale = Vec::new();
        for &(pos, agent) in &self.resident_waiting {
            if last.is_some_and(|last| pos > last) {
                break;
            }
            if self.waiting.position(agent) != Some(pos)
                || kv.state(agent) != KvState::Gpu
                || kv.blocks(agent) == 0
            {
                stale.push(agent);
                continue;
            }
            if skip.contains(&agent) {
                continue;
            }
            let need = need_blocks(view, agent) as i64;
            if need <= *avail {
                *avail -= need;
                picked.push(agent);
            }
        }
        for agent in stale {
            self.forget_resident_waiting(agent);
        }
        for agent in picked {
            self.waiting.remove(agent);
            self.committed.push(agent);
        }
    }

    /// Rejects a blocked head that can never fit the pool, or that nothing could make room for.
    fn reject_if_hopeless(&mut self, view: &SchedView, plan: &mut StepPlan, head: AgentId) {
        let kv = view.kv;
        let evictable = !self.resident_paused.is_empty();
        let nothing_can_free = self.committed.is_empty()
            && kv.swaps_in_flight() == 0
            && plan.swap_out.is_empty()
            && plan.drop.is_empty()
            && !evictable;
        // A head whose prefetch is still copying in cannot be freed yet: reject it once the
        // copy lands (rejecting it mid-copy asked the mechanism for the impossible; found by the
        // property tests).
        let moving = matches!(kv.state(head), KvState::SwappingIn | KvState::SwappingOut);
        if self.waiting.contains(head) && !moving && (never_fits(view, head) || nothing_can_free) {
            self.waiting.remove(head);
            plan.reject.push(head);
        }
    }
}
