//! `offline`: the reference that knows the whole future of the workload ([`Future`]: every
//! agent's arrival, every turn's new and generated tokens and the true pause after it) and uses it
//! for every KV decision. No online policy can know this; it is the yardstick they are read
//! against.
//!
//! It is a heuristic on an NP-hard problem (placing variable-size KV in two memory tiers over
//! time, with copies that queue on two channels and recompute that costs GPU time), not a proof
//! of optimality. Where an online policy beats it in a cell, read that as a place where the
//! heuristic below is not optimal (a decision it prices wrongly), not as the online policy
//! exceeding what the hardware allows; the physical bounds are the hard ceiling.
//!
//! What it does, and why:
//!
//! 1. **Keep while memory is plentiful.** At pause start it keeps the KV when nothing waiting
//!    lacks memory and the known demand until the agent's true return fits: the waiting turns,
//!    the first turns of agents arriving before then and the next turns of agents returning before
//!    then (their KV off the GPU plus their growth). Memory is freed only by evictions and program
//!    ends, so if that fits, keeping costs nothing.
//! 2. **Otherwise swap ahead of need** when the round trip (out after the device-to-host backlog,
//!    then back by prefetch) fits before the true return and the host has room: the copy is
//!    free of GPU time and the KV is back when needed. It never drops ahead of need.
//! 3. **Under memory pressure evict the KV used furthest in the future** (Belady). Turns are
//!    admitted first come, first served by turn arrival, so a KV's next use is ordered by its
//!    owner's (next) turn arrival: a paused agent's true return, a waiting turn's arrival; every
//!    paused agent is used after every waiting one, and the head of the queue is never evicted.
//!    The same rule makes room for a prefetch: only KV used after the returning agent is evicted.
//! 4. **Move or drop by cost.** A victim is swapped when the host has room and its round trip
//!    fits before its next use, or the stall a late copy causes still costs less than recomputing
//!    it; otherwise dropped. With the host full, the host pool is treated as a cache too: host KV
//!    used after the victim is dropped (furthest first) to make room for it, since a slot that
//!    turns over sooner serves more evictions.
//! 5. **Prefetch** so every return finds its KV resident: the swap-in starts at true return -
//!    swap-in time - host-to-device backlog (this plan's copies included) - a margin.
//! 6. **Admission and batching** are the run's: the shared batch policy and the same first come,
//!    first served turn order as `djinn` ([`super::base::Admission`]), so it differs from the
//!    online policies only in KV decisions.

mod future;
mod plan;

use std::collections::{BTreeMap, BTreeSet};

pub use future::{Future, TurnFuture};

use crate::ids::AgentId;
use crate::kv::{KvState, SwapDirection};
use crate::sched::{Phase, SchedEvent, SchedView, Scheduler, StepPlan};

use super::base::Admission;

/// Fixed part of the prefetch margin (as `djinn`'s).
const PREFETCH_MARGIN_NS: u64 = 2_000_000;
/// Proportional part of the prefetch margin (of the swap-in time).
const PREFETCH_MARGIN_FRACTION: f64 = 0.1;
/// Prefetches looked at together when deciding when the copy channel must start.
const PREFETCH_LOOKAHEAD: usize = 64;
/// Weight of the newest admission in the queueing-delay average.
const QUEUE_WAIT_ALPHA: f64 = 0.05;

#[derive(Debug)]
pub struct Offline {
    future: Future,
    adm: Admission,
    /// True return of every paused agent, and the paused agents by it (wherever their KV is).
    return_at: BTreeMap<AgentId, u64>,
    by_return: BTreeSet<(u64, AgentId)>,
    /// Paused agents believed to have their KV on the GPU, by true return (checked when read).
    gpu_paused: BTreeSet<(u64, AgentId)>,
    /// Paused agents believed to have their KV on the host, by true return (checked when read).
    host_paused: BTreeSet<(u64, AgentId)>,
    /// Waiting agents believed to hold KV on the GPU, by turn arrival (checked when read).
    parked: BTreeSet<(u64, AgentId)>,
    /// Pauses whose start decision is still to take.
    fresh: Vec<AgentId>,
    /// Average queueing delay of admitted turns (arrival to commitment), measured in the run: how
    /// long after its arrival a waiting turn's KV is needed.
    queue_wait_ns: f64,
}

impl Offline {
    /// The reference, told the future of the workload it will run.
    pub fn new(future: Future) -> Self {
        Offline {
            future,
            adm: Admission::default(),
            return_at: BTreeMap::new(),
            by_return: BTreeSet::new(),
            gpu_paused: BTreeSet::new(),
            host_paused: BTreeSet::new(),
            parked: BTreeSet::new(),
            fresh: Vec::new(),
            queue_wait_ns: 0.0,
        }
    }

    fn prefetch_margin_ns(swap_in_ns: u64) -> u64 {
        PREFETCH_MARGIN_NS + (swap_in_ns as f64 * PREFETCH_MARGIN_FRACTION) as u64
    }

    fn forget_pause(&mut self, agent: AgentId) {
        if let Some(ret) = self.return_at.remove(&agent) {
            self.by_return.remove(&(ret, agent));
            self.gpu_paused.remove(&(ret, agent));
            self.host_paused.remove(&(ret, agent));
        }
        self.fresh.retain(|&a| a != agent);
    }
}

impl Scheduler for Offline {
    fn name(&self) -> String {
        "offline".into()
    }

    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, .. } => {
                self.forget_pause(agent);
                let arrival = view.agent(agent).turn_arrival.as_nanos();
                self.adm.waiting.push(agent, arrival);
                if view.kv.state(agent) == KvState::Gpu && view.kv.blocks(agent) > 0 {
                    self.parked.insert((arrival, agent));
                }
            }
            SchedEvent::TurnFinished {
                agent, turn_index, ..
            } => {
                self.adm.turn_finished(agent);
                // The pause comes from the future, not from the notice: the reference needs
                // nothing the run loop tells online policies beyond what happened.
                if let Some(pause) = self.future.pause_after(agent, turn_index) {
                    let ret = view.now.as_nanos().saturating_add(pause);
                    self.return_at.insert(agent, ret);
                    self.by_return.insert((ret, agent));
                    self.gpu_paused.insert((ret, agent));
                    self.fresh.push(agent);
                }
            }
            SchedEvent::SwapDone {
                agent, direction, ..
            } => {
                if direction == SwapDirection::Out {
                    self.adm.swap_out_done(agent);
                }
                let phase = view.agent(agent).phase;
                match (direction, phase, self.return_at.get(&agent).copied()) {
                    (SwapDirection::Out, Phase::Paused, Some(ret)) => {
                        self.host_paused.insert((ret, agent));
                    }
                    (SwapDirection::In, Phase::Paused, Some(ret)) => {
                        self.gpu_paused.insert((ret, agent));
                    }
                    (SwapDirection::In, Phase::Waiting, _) if self.adm.waiting.contains(agent) => {
                        let arrival = view.agent(agent).turn_arrival.as_nanos();
                        self.parked.insert((arrival, agent));
                    }
                    _ => {}
                }
            }
        }
    }

    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        let mut frame = self.plan_frame(view);
        // 1. Prefetches due now (they may evict KV used later than their return).
        let due = self.due_prefetches(view, plan);
        // 2. Pause-start decisions: keep while plentiful, else swap ahead when it is free.
        self.decide_pause_starts(view, &mut frame, plan);
        // 3. Evict furthest next use first for what the head of the queue needs.
        self.evict_for_waiting(view, &mut frame, plan);
        // 4. Prefetch, evicting KV used after the returning agent if memory is short.
        self.prefetch(view, &mut frame, &due, plan);
        // 5. Admission (first come, first served, growth reserved) and the shared batch.
        self.admit(view, &mut frame, plan);
    }
}
