//! How `offline` builds a step: the numbered steps of `Scheduler::plan_step`, all spending one
//! [`Frame`] of blocks and copy-channel time, so what an early step frees or takes is seen later.

use crate::ids::AgentId;
use crate::kv::KvState;
use crate::policies::base::{Admission, Budget, Evict};
use crate::policies::common::{ready_to_commit, COMMIT_SCAN_MAX};
use crate::sched::{Phase, SchedView, StepPlan};
use crate::time::SimTime;

use super::{Offline, PREFETCH_LOOKAHEAD, QUEUE_WAIT_ALPHA};

/// What a plan works with while it is built.
pub(super) struct Frame {
    budget: Budget,
    /// Blocks reserved for the growth of committed turns.
    reserved: i64,
    /// Blocks the turns at the head of the queue need (as many as could be admitted at once).
    waiting_demand: i64,
    /// The first waiting turn that could be committed: its KV is never evicted.
    head: Option<AgentId>,
    /// Until when (from now) the device-to-host channel is busy, with this plan's copies.
    out_backlog_ns: u64,
}

impl Offline {
    pub(super) fn plan_frame(&self, view: &SchedView) -> Frame {
        let kv = view.kv;
        let reserved = self.adm.reserved(view);
        let committed_held: i64 = self
            .adm
            .committed
            .iter()
            .map(|&a| kv.gpu_blocks_held(a) as i64)
            .sum();
        let cap = kv.gpu_blocks_total() as i64 - committed_held - reserved;
        Frame {
            budget: self.adm.budget(view),
            reserved,
            waiting_demand: self.adm.waiting_demand(view, cap),
            head: self
                .adm
                .waiting
                .iter()
                .take(COMMIT_SCAN_MAX)
                .find(|&a| ready_to_commit(view, a)),
            out_backlog_ns: view.swap_out_busy_until.saturating_sub(view.now).as_nanos(),
        }
    }

    /// True when `agent` is paused with its KV wholly on the host and `ret` is its return.
    fn on_host(&self, view: &SchedView, agent: AgentId, ret: u64) -> bool {
        view.agent(agent).phase == Phase::Paused
            && view.kv.state(agent) == KvState::Host
            && self.return_at.get(&agent) == Some(&ret)
    }

    /// Step 1: the paused agents on the host whose swap-in must start now so that each finds its
    /// KV resident at its true return. Copies queue on the host-to-device channel, so the first
    /// in line must start by the minimum over the next few of (return - margin - the copy time of
    /// everything up to and including them). Sets the wake-up for the next one.
    pub(super) fn due_prefetches(&mut self, view: &SchedView, plan: &mut StepPlan) -> Vec<AgentId> {
        let kv = view.kv;
        let mut line: Vec<(AgentId, i128, u64)> = Vec::new();
        let mut stale = Vec::new();
        for &(ret, agent) in &self.host_paused {
            if line.len() == PREFETCH_LOOKAHEAD {
                break;
            }
            if !self.on_host(view, agent, ret) {
                stale.push((ret, agent));
                continue;
            }
            let t_in = view
                .costs
                .swap_in_ns(kv.blocks(agent) - kv.gpu_blocks_held(agent));
            // A returning turn queues before it runs: its KV is needed the queueing delay after
            // its return (the EWMA of admitted turns' waits), not at the return itself.
            line.push((
                agent,
                (ret + self.queue_wait_ns as u64) as i128 - Self::prefetch_margin_ns(t_in) as i128,
                t_in,
            ));
        }
        for s in stale {
            self.host_paused.remove(&s);
        }
        // latest start of entry i = min over k >= i of (deadline_k - copy time of i..=k)
        //                         = min over k >= i of (deadline_k - C_k) + C_(i-1).
        let mut prefix = Vec::with_capacity(line.len());
        let mut c: i128 = 0;
        for &(_, _, t_in) in &line {
            c += t_in as i128;
            prefix.push(c);
        }
        let mut suffix_min = vec![i128::MAX; line.len() + 1];
        for i in (0..line.len()).rev() {
            suffix_min[i] = suffix_min[i + 1].min(line[i].1 - prefix[i]);
        }
        let now = view.now.as_nanos() as i128;
        let mut backlog = view.swap_in_busy_until.saturating_sub(view.now).as_nanos() as i128;
        let mut due = Vec::new();
        for i in 0..line.len() {
            let before = if i == 0 { 0 } else { prefix[i - 1] };
            let latest = suffix_min[i] + before;
            if now + backlog < latest {
                let wake = (latest - backlog).max(now + 1);
                plan.wake_no_later_than(SimTime(wake.min(u64::MAX as i128) as u64));
                break;
            }
            due.push(line[i].0);
            backlog += line[i].2 as i128;
        }
        due
    }

    /// Blocks the next turn of a paused agent will need on the GPU beyond what it holds there.
    fn next_turn_need(&self, view: &SchedView, agent: AgentId) -> i64 {
        let a = view.agent(agent);
        let Some(next) = self.future.turn(agent, a.turn_index + 1) else {
            return 0;
        };
        let final_tokens =
            a.seq_tokens as u64 + next.new_tokens as u64 + next.generated_tokens as u64;
        let blocks = view
            .kv
            .blocks_for(final_tokens.saturating_sub(1).min(u32::MAX as u64) as u32);
        blocks as i64 - view.kv.gpu_blocks_held(agent) as i64
    }

    /// Memory is plentiful until `until` when what is free (or freeing) covers the committed
    /// growth, the waiting turns, the first turns of agents arriving before then and the next
    /// turns of agents returning before then. Only evictions and program ends free memory, so if
    /// that fits, keeping the KV of a pause ending at `until` costs nothing.
    fn plentiful_until(&self, view: &SchedView, frame: &Frame, until: u64) -> bool {
        let kv = view.kv;
        let available = frame.budget.free + frame.budget.freeing - frame.reserved;
        let mut demand = frame.waiting_demand;
        if demand > available {
            return false;
        }
        for agent in self.future.arrivals_between(view.now, SimTime(until)) {
            if let Some(t) = self.future.turn(agent, 0) {
                let tokens = (t.new_tokens as u64 + t.generated_tokens as u64).saturating_sub(1);
                demand += kv.blocks_for(tokens.min(u32::MAX as u64) as u32) as i64;
                if demand > available {
                    return false;
                }
            }
        }
        for &(_, agent) in self.by_return.range(..(until, AgentId::MAX)) {
            demand += self.next_turn_need(view, agent).max(0);
            if demand > available {
                return false;
            }
        }
        true
    }

    /// Step 2: a fresh pause is kept while memory is plentiful until its true return; otherwise
    /// swapped out at once when the round trip fits before the return and the host has room (the
    /// copy costs no GPU time). Ahead of need nothing is dropped.
    pub(super) fn decide_pause_starts(
        &mut self,
        view: &SchedView,
        frame: &mut Frame,
        plan: &mut StepPlan,
    ) {
        for agent in std::mem::take(&mut self.fresh) {
            if !Admission::paused_on_gpu(view, agent) {
                continue;
            }
            let Some(&ret) = self.return_at.get(&agent) else {
                continue;
            };
            if self.plentiful_until(view, frame, ret) {
                continue;
            }
            let blocks = view.kv.blocks(agent);
            if blocks as i64 <= frame.budget.host_free
                && self.round_trip_ns(view, frame, blocks)
                    <= ret.saturating_sub(view.now.as_nanos())
            {
                self.gpu_paused.remove(&(ret, agent));
                self.swap_out(view, frame, plan, agent);
            }
        }
    }

    /// Out after the device-to-host backlog, then back with the prefetch margin.
    fn round_trip_ns(&self, view: &SchedView, frame: &Frame, blocks: u32) -> u64 {
        let t_in = view.costs.swap_in_ns(blocks);
        frame.out_backlog_ns
            + view.costs.swap_out_ns(blocks)
            + t_in
            + Self::prefetch_margin_ns(t_in)
    }

    fn swap_out(
        &mut self,
        view: &SchedView,
        frame: &mut Frame,
        plan: &mut StepPlan,
        agent: AgentId,
    ) {
        let blocks = view.kv.blocks(agent);
        frame.budget.host_free -= blocks as i64;
        frame.budget.freeing += blocks as i64;
        frame.out_backlog_ns += view.costs.swap_out_ns(blocks);
        self.adm.swapping_out.insert(agent, blocks);
        plan.swap_out.push((agent, blocks));
    }

    /// Step 3: what the head of the queue needs, beyond what is free or freeing, is evicted
    /// furthest next use first.
    pub(super) fn evict_for_waiting(
        &mut self,
        view: &SchedView,
        frame: &mut Frame,
        plan: &mut StepPlan,
    ) {
        let deficit =
            frame.waiting_demand - (frame.budget.free - frame.reserved) - frame.budget.freeing;
        if deficit > 0 {
            self.evict_furthest(view, frame, plan, deficit, None);
        }
    }

    /// Evicts resident KV, furthest next use first, until `deficit` blocks are freed or on their
    /// way. With `used_after`, only KV whose next use is later than that (a paused agent's true
    /// return). Under first come, first served admission every paused agent is used after every
    /// waiting turn; among paused agents the later return, among waiting turns the later arrival,
    /// is used later. Returns what is left of the deficit.
    fn evict_furthest(
        &mut self,
        view: &SchedView,
        frame: &mut Frame,
        plan: &mut StepPlan,
        mut deficit: i64,
        used_after: Option<u64>,
    ) -> i64 {
        let kv = view.kv;
        while deficit > 0 {
            let Some(&(ret, agent)) = self.gpu_paused.iter().next_back() else {
                break;
            };
            if used_after.is_some_and(|t| ret <= t) {
                return deficit;
            }
            self.gpu_paused.remove(&(ret, agent));
            if !Admission::paused_on_gpu(view, agent)
                || self.return_at.get(&agent) != Some(&ret)
                || acted_on(plan, agent)
            {
                continue;
            }
            deficit -= kv.gpu_blocks_held(agent) as i64;
            self.evict(view, frame, plan, agent, ret + self.queue_wait_ns as u64);
        }
        if used_after.is_some() {
            return deficit;
        }
        let wait = self.queue_wait_ns as u64;
        while deficit > 0 {
            let Some(&(arrival, agent)) = self.parked.iter().next_back() else {
                break;
            };
            let valid = self.adm.waiting.contains(agent)
                && view.agent(agent).turn_arrival.as_nanos() == arrival
                && kv.state(agent) == KvState::Gpu
                && kv.blocks(agent) > 0
                && !acted_on(plan, agent);
            if valid && Some(agent) == frame.head {
                // Every parked turn left arrived no later than the head.
                break;
            }
            self.parked.remove(&(arrival, agent));
            if !valid {
                continue;
            }
            deficit -= kv.blocks(agent) as i64;
            self.evict(view, frame, plan, agent, arrival.saturating_add(wait));
        }
        deficit
    }

    /// Takes a GPU-resident agent's KV off the GPU: a swap when the host has (or can be given)
    /// room and the round trip fits before `next_use`, or the stall a late copy causes still
    /// costs less than recomputing; otherwise a drop.
    fn evict(
        &mut self,
        view: &SchedView,
        frame: &mut Frame,
        plan: &mut StepPlan,
        agent: AgentId,
        next_use: u64,
    ) {
        let blocks = view.kv.blocks(agent);
        let slack = next_use.saturating_sub(view.now.as_nanos());
        let round_trip = self.round_trip_ns(view, frame, blocks);
        let recompute = view.costs.recompute_ns(view.kv.kv_tokens(agent));
        let swap_pays = round_trip <= slack || recompute >= round_trip - slack;
        if swap_pays && self.host_room(view, frame, plan, blocks, next_use) {
            self.swap_out(view, frame, plan, agent);
        } else {
            frame.budget.free += view.kv.gpu_blocks_held(agent) as i64;
            plan.drop.push((agent, 0));
        }
    }

    /// Makes `blocks` of host room for KV next used at `next_use`: the host pool is a cache too,
    /// so host KV used later than that is dropped, furthest first (a slot that turns over sooner
    /// serves more evictions). Drops nothing unless that makes enough room.
    fn host_room(
        &mut self,
        view: &SchedView,
        frame: &mut Frame,
        plan: &mut StepPlan,
        blocks: u32,
        next_use: u64,
    ) -> bool {
        let kv = view.kv;
        let mut room = frame.budget.host_free;
        if blocks as i64 <= room {
            return true;
        }
        let mut victims = Vec::new();
        for &(ret, agent) in self.host_paused.iter().rev() {
            if ret <= next_use || blocks as i64 <= room {
                break;
            }
            if self.on_host(view, agent, ret) && !acted_on(plan, agent) {
                room += (kv.blocks(agent) - kv.gpu_blocks_held(agent)) as i64;
                victims.push((ret, agent));
            }
        }
        if (blocks as i64) > room {
            return false;
        }
        for (ret, agent) in victims {
            self.host_paused.remove(&(ret, agent));
            frame.budget.free += kv.gpu_blocks_held(agent) as i64;
            plan.drop.push((agent, 0));
        }
        frame.budget.host_free = room;
        true
    }

    /// Step 4: issue the due prefetches in order. One that lacks memory evicts KV used after its
    /// return (furthest first); if memory is still short it and those behind it wait.
    pub(super) fn prefetch(
        &mut self,
        view: &SchedView,
        frame: &mut Frame,
        due: &[AgentId],
        plan: &mut StepPlan,
    ) {
        let kv = view.kv;
        for &agent in due {
            let Some(&ret) = self.return_at.get(&agent) else {
                continue;
            };
            if !self.on_host(view, agent, ret) || acted_on(plan, agent) {
                continue;
            }
            let blocks = (kv.blocks(agent) - kv.gpu_blocks_held(agent)) as i64;
            let spare = frame.budget.free - frame.reserved - frame.waiting_demand.max(0);
            if blocks > spare {
                let short = blocks - spare - frame.budget.freeing;
                if short > 0 {
                    self.evict_furthest(view, frame, plan, short, Some(ret));
                }
                let spare = frame.budget.free - frame.reserved - frame.waiting_demand.max(0);
                if blocks > spare {
                    break;
                }
            }
            self.host_paused.remove(&(ret, agent));
            frame.budget.free -= blocks;
            plan.swap_in.push(agent);
        }
    }

    /// Step 5: first come, first served admission with growth reserved (the same machinery and
    /// order as the online policies), then the run's batch. In a stall, paused agents are evicted
    /// furthest return first.
    pub(super) fn admit(&mut self, view: &SchedView, frame: &mut Frame, plan: &mut StepPlan) {
        let victims: Vec<(AgentId, Evict)> = if self.adm.committed.is_empty() {
            self.gpu_paused
                .iter()
                .rev()
                .filter(|&&(_, a)| Admission::paused_on_gpu(view, a))
                .map(|&(_, a)| (a, Evict::Swap))
                .collect()
        } else {
            Vec::new()
        };
        let before = self.adm.committed.len();
        self.adm.admit(view, plan, &mut frame.budget, &victims);
        for &agent in &self.adm.committed[before..] {
            let a = view.agent(agent);
            let waited = view.now.saturating_sub(a.turn_arrival).as_nanos() as f64;
            self.queue_wait_ns =
                QUEUE_WAIT_ALPHA * waited + (1.0 - QUEUE_WAIT_ALPHA) * self.queue_wait_ns;
            self.parked.remove(&(a.turn_arrival.as_nanos(), agent));
        }
    }
}

/// True when this plan already moves or drops the agent's KV.
fn acted_on(plan: &StepPlan, agent: AgentId) -> bool {
    plan.drop.iter().any(|d| d.0 == agent)
        || plan.swap_out.iter().any(|s| s.0 == agent)
        || plan.swap_in.contains(&agent)
        || plan.release.contains(&agent)
}
