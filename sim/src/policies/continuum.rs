//! `continuum` and `continuum-fixed`: KV time-to-live (Continuum, 2025).
//!
//! At the end of a turn that is not the agent's last, the KV stays pinned on the GPU for
//! `tau* = argmax over tau in {0} U {observed pauses} of F(tau) * B - tau`, with `F` the empirical
//! CDF of observed pauses and `B = Tq * eta + R(C)`: `Tq` the moving average of the queueing delay
//! that unpinned agents suffered on return, `eta` a turns-remaining weight and `R(C)` the
//! recompute time of the context. With few samples (cold start) an exponential prior with mean
//! 1 s gives `tau* = ln(B / 1 s)` when `B > 1 s`, else 0. When the TTL expires the KV is released
//! to the prefix cache (Continuum runs on vLLM), and what survives is reclaimed on return. Under
//! memory pressure the latest-arriving pinned agent is unpinned first. Queue order: agents whose
//! KV is still pinned when they return go first, then the others; program-level FCFS within.
//! `continuum-fixed` pins for a fixed 2 s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::ids::AgentId;
use crate::kv::SwapDirection;
use crate::sched::{Phase, SchedEvent, SchedView, Scheduler, StepPlan};
use crate::time::SimTime;

use super::base::{Admission, Budget, Evict};

/// Pause samples below this count use the exponential prior (cold start).
pub const COLD_START_SAMPLES: usize = 8;
/// Observed pauses kept for the empirical CDF (the most recent ones).
pub const SAMPLE_WINDOW: usize = 512;
/// Mean of the cold-start exponential prior.
pub const PRIOR_MEAN_NS: f64 = 1e9;
/// Weight of the newest queueing-delay observation in `Tq`.
const TQ_ALPHA: f64 = 0.2;

/// The TTL pinning machinery, shared by `continuum` and `autellix-continuum`.
#[derive(Clone, Debug, Default)]
pub struct TtlPinner {
    /// A fixed TTL (continuum-fixed), else the CDF rule.
    pub fixed_ttl_ns: Option<u64>,
    samples: VecDeque<u64>,
    tq_ns: f64,
    /// Pinned paused agents: expiry time.
    pinned: BTreeMap<AgentId, u64>,
    expiry: BTreeSet<(u64, AgentId)>,
    /// Agents unpinned during their current pause (their return's queueing delay feeds `Tq`).
    unpinned: BTreeSet<AgentId>,
    programs_done: u64,
    program_turns_done: u64,
}

impl TtlPinner {
    pub fn new(fixed_ttl_ns: Option<u64>) -> Self {
        TtlPinner {
            fixed_ttl_ns,
            ..Default::default()
        }
    }

    /// The TTL for a context of `context_tokens` of an agent at `turn_index`.
    pub fn ttl_ns(&self, view: &SchedView, context_tokens: u32, turn_index: u32) -> u64 {
        if let Some(t) = self.fixed_ttl_ns {
            return t;
        }
        let eta = if self.programs_done == 0 {
            1.0
        } else {
            let mean_turns = self.program_turns_done as f64 / self.programs_done as f64;
            1.0 + (mean_turns - (turn_index + 1) as f64).max(0.0) / mean_turns
        };
        let benefit_ns = self.tq_ns * eta + view.costs.recompute_ns(context_tokens) as f64;
        Self::best_ttl_ns(&self.samples, benefit_ns)
    }

    /// `argmax F(tau) * B - tau` over {0} and the samples; the exponential prior at cold start.
    pub fn best_ttl_ns(samples: &VecDeque<u64>, benefit_ns: f64) -> u64 {
        if samples.len() < COLD_START_SAMPLES {
            return if benefit_ns > PRIOR_MEAN_NS {
                ((benefit_ns / PRIOR_MEAN_NS).ln() * PRIOR_MEAN_NS) as u64
            } else {
                0
            };
        }
        let mut sorted: Vec<u64> = samples.iter().copied().collect();
        sorted.sort_unstable();
        let n = sorted.len() as f64;
        let (mut best_tau, mut best_value) = (0u64, 0.0f64);
        for (i, &tau) in sorted.iter().enumerate() {
            // F(tau) counts every sample <= tau: evaluate at the last of equal samples.
            if i + 1 < sorted.len() && sorted[i + 1] == tau {
                continue;
            }
            let value = (i + 1) as f64 / n * benefit_ns - tau as f64;
            if value > best_value {
                best_value = value;
                best_tau = tau;
            }
        }
        best_tau
    }

    pub fn is_pinned(&self, agent: AgentId) -> bool {
        self.pinned.contains_key(&agent)
    }

    /// Pins a pausing agent; returns its TTL.
    pub fn pin(&mut self, view: &SchedView, agent: AgentId) -> u64 {
        let a = view.agent(agent);
        let ttl = self.ttl_ns(view, view.kv.kv_tokens(agent), a.turn_index);
        let expire = (view.now + ttl).as_nanos();
        self.pinned.insert(agent, expire);
        self.expiry.insert((expire, agent));
        ttl
    }

    fn unpin(&mut self, agent: AgentId) {
        if let Some(e) = self.pinned.remove(&agent) {
            self.expiry.remove(&(e, agent));
        }
    }

    /// The agent's next turn arrived: learn the pause. Returns whether its KV was still pinned.
    pub fn returned(&mut self, view: &SchedView, agent: AgentId) -> bool {
        let a = view.agent(agent);
        self.samples.push_back(a.turn_arrival - a.pause_started);
        if self.samples.len() > SAMPLE_WINDOW {
            self.samples.pop_front();
        }
        let was_pinned = self.pinned.contains_key(&agent);
        self.unpin(agent);
        was_pinned
    }

    pub fn program_done(&mut self, turns: u32) {
        self.programs_done += 1;
        self.program_turns_done += turns as u64;
    }

    /// A turn was committed: a returning agent that lost its pin reports its queueing delay.
    pub fn committed(&mut self, view: &SchedView, agent: AgentId) {
        if self.unpinned.remove(&agent) {
            let q = view
                .now
                .saturating_sub(view.agent(agent).turn_arrival)
                .as_nanos() as f64;
            self.tq_ns = TQ_ALPHA * q + (1.0 - TQ_ALPHA) * self.tq_ns;
        }
    }

    /// Releases expired pins, then unpins latest-arriving agents while waiting turns lack memory.
    pub fn plan(
        &mut self,
        view: &SchedView,
        adm: &mut Admission,
        plan: &mut StepPlan,
        budget: &mut Budget,
    ) {
        let now = view.now.as_nanos();
        while let Some(&(expire, agent)) = self.expiry.iter().next() {
            if expire > now {
                plan.wake_no_later_than(SimTime(expire));
                break;
            }
            self.unpin(agent);
            if Admission::paused_on_gpu(view, agent) {
                adm.evict(view, agent, Evict::Release, 0, plan, budget);
                self.unpinned.insert(agent);
            }
        }
        if self.pinned.is_empty() || adm.waiting.is_empty() {
            return;
        }
        let total = view.kv.gpu_blocks_total() as i64;
        let committed_held: i64 = adm
            .committed
            .iter()
            .map(|&a| view.kv.gpu_blocks_held(a) as i64)
            .sum();
        let reserved = adm.reserved(view);
        let demand = adm.waiting_demand(view, total - committed_held - reserved);
        let deficit = demand - (budget.free - reserved) - budget.freeing;
        if deficit > 0 {
            let mut victims: Vec<(u64, AgentId)> = self
                .pinned
                .keys()
                .map(|&a| (view.agent(a).first_arrival.as_nanos(), a))
                .collect();
            victims.sort_unstable_by(|x, y| y.cmp(x));
            let victims: Vec<(AgentId, Evict)> = victims
                .into_iter()
                .map(|(_, a)| (a, Evict::Release))
                .collect();
            let before: Vec<AgentId> = plan.release.clone();
            adm.evict_for(view, deficit, &victims, plan, budget);
            for &a in plan.release.iter().filter(|a| !before.contains(a)) {
                self.unpin(a);
                self.unpinned.insert(a);
            }
        }
    }

    /// Victims for the stall rule: pinned agents, latest-arriving first.
    pub fn victims(&self, view: &SchedView) -> Vec<(AgentId, Evict)> {
        let mut v: Vec<(u64, AgentId)> = self
            .pinned
            .keys()
            .map(|&a| (view.agent(a).first_arrival.as_nanos(), a))
            .collect();
        v.sort_unstable_by(|x, y| y.cmp(x));
        v.into_iter().map(|(_, a)| (a, Evict::Release)).collect()
    }

    /// Forgets pins the stall rule (or anything else) took away this plan.
    pub fn forget_evicted(&mut self, plan: &StepPlan) {
        for &a in &plan.release {
            if self.pinned.contains_key(&a) {
                self.unpin(a);
                self.unpinned.insert(a);
            }
        }
    }
}

#[derive(Debug)]
pub struct Continuum {
    adm: Admission,
    ttl: TtlPinner,
    fixed: bool,
}

/// The TTL of `continuum-fixed`.
pub const FIXED_TTL_NS: u64 = 2_000_000_000;

impl Continuum {
    pub fn new(fixed: bool) -> Self {
        Continuum {
            adm: Admission::default(),
            ttl: TtlPinner::new(fixed.then_some(FIXED_TTL_NS)),
            fixed,
        }
    }
}

impl Scheduler for Continuum {
    fn name(&self) -> String {
        if self.fixed {
            "continuum-fixed"
        } else {
            "continuum"
        }
        .into()
    }

    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, turn_index } => {
                let was_pinned = turn_index > 0 && self.ttl.returned(view, agent);
                let class = if was_pinned { 0 } else { 1 };
                self.adm.waiting.push_class(
                    agent,
                    class,
                    view.agent(agent).first_arrival.as_nanos(),
                );
            }
            SchedEvent::TurnFinished { agent, pause, .. } => {
                self.adm.turn_finished(agent);
                match pause {
                    Some(_) => {
                        self.ttl.pin(view, agent);
                    }
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
        self.ttl.plan(view, &mut self.adm, plan, &mut budget);
        let victims = self.ttl.victims(view);
        let before = self.adm.committed.len();
        self.adm.admit(view, plan, &mut budget, &victims);
        self.ttl.forget_evicted(plan);
        for i in before..self.adm.committed.len() {
            let agent = self.adm.committed[i];
            self.ttl.committed(view, agent);
        }
        debug_assert!(self
            .adm
            .committed
            .iter()
            .all(|&a| view.agent(a).phase != Phase::Paused));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_start_uses_the_exponential_prior() {
        let none = VecDeque::new();
        assert_eq!(
            TtlPinner::best_ttl_ns(&none, 0.5e9),
            0,
            "B <= 1 s: do not pin"
        );
        let tau = TtlPinner::best_ttl_ns(&none, 3e9);
        assert!(
            (tau as f64 - 3f64.ln() * 1e9).abs() < 1e3,
            "tau = ln(3) s, got {tau}"
        );
    }

    #[test]
    fn cdf_rule_pins_through_the_short_mode_only() {
        // 80% of pauses are 0.1 s, 20% are 30 s: with B = 5 s pinning for 0.1 s is worth
        // 0.8 * 5 - 0.1 = 3.9 s, pinning for 30 s is worth 5 - 30 < 0.
        let mut s = VecDeque::new();
        for i in 0..100 {
            s.push_back(if i % 5 == 0 {
                30_000_000_000
            } else {
                100_000_000
            });
        }
        assert_eq!(TtlPinner::best_ttl_ns(&s, 5e9), 100_000_000);
        // With a huge B pinning through the long mode pays.
        assert_eq!(TtlPinner::best_ttl_ns(&s, 1000e9), 30_000_000_000);
        assert_eq!(TtlPinner::best_ttl_ns(&s, 0.05e9), 0);
    }
}
