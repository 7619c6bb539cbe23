//! `infercept` (min-waste, InferCept ICML 2024) and `infercept-h` (static thresholds).
//!
//! `infercept`, each iteration, for each paused agent whose KV is on the GPU (context `C`, pause
//! started at `t0`, predicted pause `d_hat`):
//! - `W_preserve = (d_hat - (now - t0)) * C * M`: memory held idle for the rest of the pause;
//! - `W_discard`: memory held while the context is recomputed in chunks of `max(S - running, 1)`
//!   tokens per iteration (S = the batch size at which a step turns compute-bound), i.e.
//!   `ceil(C / chunk) * T_iter * C * M`;
//! - the per-iteration swap budget (blocks the device-to-host channel moves in one iteration) goes
//!   to the agents with the largest `min(W_preserve, W_discard)`, swapping from their tail blocks
//!   (an agent may go out over several iterations);
//! - the others are discarded if `W_discard < W_preserve`, else preserved.
//!
//! Without a prediction the remaining pause is taken to equal the time already paused. Returning
//! turns keep their agent's original arrival time (program-level FCFS).
//!
//! `infercept-h`: at pause start preserve if `d_hat < 4 s`, swap if `4 s <= d_hat < 7 s`, drop
//! otherwise (no prediction: preserve).
//!
//! Both evict preserved agents (furthest predicted return first) only when nothing runs and the
//! head turn does not fit (the stall rule of [`super::base`]).

use std::collections::BTreeMap;

use crate::ids::AgentId;
use crate::kv::{KvState, SwapDirection};
use crate::sched::{Phase, SchedEvent, SchedView, Scheduler, StepPlan};

use super::base::{Admission, Evict};
use super::predict::{PausePredictor, PredictorMode};

pub const HEURISTIC_PRESERVE_BELOW_NS: u64 = 4_000_000_000;
pub const HEURISTIC_SWAP_BELOW_NS: u64 = 7_000_000_000;

/// Wastes of one paused agent (ns x bytes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Wastes {
    pub preserve: f64,
    pub discard: f64,
}

#[derive(Debug)]
pub struct InferCept {
    heuristic: bool,
    adm: Admission,
    predictor: PausePredictor,
    /// Paused agents: predicted pause (None = unknown).
    paused: BTreeMap<AgentId, Option<u64>>,
    fresh: Vec<AgentId>,
}

impl InferCept {
    pub fn new(heuristic: bool, mode: PredictorMode) -> Self {
        InferCept {
            heuristic,
            adm: Admission::default(),
            predictor: PausePredictor::new(mode),
            paused: BTreeMap::new(),
            fresh: Vec::new(),
        }
    }

    /// The remaining pause believed now.
    fn remaining_ns(view: &SchedView, agent: AgentId, predicted: Option<u64>) -> u64 {
        let elapsed = view
            .now
            .saturating_sub(view.agent(agent).pause_started)
            .as_nanos();
        match predicted {
            Some(d) => d.saturating_sub(elapsed),
            None => elapsed,
        }
    }

    /// The min-waste quantities for a paused agent with `context` tokens.
    pub fn wastes(
        view: &SchedView,
        context: u32,
        remaining_ns: u64,
        running_tokens: u32,
    ) -> Wastes {
        let bytes = context as f64 * view.costs.kv_bytes_per_token as f64;
        let saturation =
            (view.costs.decode_step_ns / view.costs.prefill_ns_per_token.max(1e-9)).max(1.0) as u32;
        let chunk = saturation.saturating_sub(running_tokens).max(1);
        let iterations = context.div_ceil(chunk) as f64;
        Wastes {
            preserve: remaining_ns as f64 * bytes,
            discard: iterations * view.costs.decode_step_ns * bytes,
        }
    }

    fn plan_min_waste(
        &mut self,
        view: &SchedView,
        plan: &mut StepPlan,
        budget: &mut super::base::Budget,
    ) {
        let running_tokens: u32 = self
            .adm
            .committed
            .iter()
            .map(|&a| {
                if view.is_decoding(a) {
                    1
                } else {
                    view.pending_tokens(a)
                }
            })
            .sum();
        // Blocks the device-to-host channel can move within one iteration, less its backlog.
        let t_iter = view.costs.decode_step_ns;
        let backlog = view.swap_out_busy_until.saturating_sub(view.now).as_nanos() as f64;
        let budget_ns = (t_iter - backlog).max(0.0);
        let mut swap_blocks = (budget_ns * 1e-9 * view.costs.swap_out_bandwidth_bytes_per_s
            / view.costs.block_bytes as f64)
            .floor() as i64;
        let mut candidates: Vec<(f64, AgentId, Wastes)> = Vec::new();
        for (&agent, &predicted) in &self.paused {
            let on_gpu = view.kv.gpu_blocks_held(agent);
            let state = view.kv.state(agent);
            if view.agent(agent).phase != Phase::Paused
                || on_gpu == 0
                || !matches!(state, KvState::Gpu | KvState::Host)
            {
                continue;
            }
            let context = on_gpu * view.kv.block_size_tokens();
            let w = Self::wastes(
                view,
                context,
                Self::remaining_ns(view, agent, predicted),
                running_tokens,
            );
            candidates.push((w.preserve.min(w.discard), agent, w));
        }
        // Largest waste first; ties by agent id (deterministic).
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, agent, w) in candidates {
            let on_gpu = view.kv.gpu_blocks_held(agent);
            if swap_blocks > 0 && w.preserve > 0.0 && budget.host_free > 0 {
                let n = (on_gpu as i64).min(swap_blocks).min(budget.host_free) as u32;
                swap_blocks -= n as i64;
                self.adm.evict(view, agent, Evict::Swap, n, plan, budget);
            } else if w.discard < w.preserve && view.kv.state(agent) == KvState::Gpu {
                self.adm.evict(view, agent, Evict::Drop, 0, plan, budget);
            }
        }
    }

    fn plan_heuristic(
        &mut self,
        view: &SchedView,
        plan: &mut StepPlan,
        budget: &mut super::base::Budget,
    ) {
        for agent in std::mem::take(&mut self.fresh) {
            if !Admission::paused_on_gpu(view, agent) {
                continue;
            }
            match self.paused.get(&agent).copied().flatten() {
                Some(d) if d >= HEURISTIC_SWAP_BELOW_NS => {
                    self.adm.evict(view, agent, Evict::Drop, 0, plan, budget);
                }
                Some(d) if d >= HEURISTIC_PRESERVE_BELOW_NS => {
                    self.adm.evict(
                        view,
                        agent,
                        Evict::Swap,
                        view.kv.blocks(agent),
                        plan,
                        budget,
                    );
                }
                _ => {}
            }
        }
    }
}

impl Scheduler for InferCept {
    fn name(&self) -> String {
        if self.heuristic {
            "infercept-h"
        } else {
            "infercept"
        }
        .into()
    }

    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, turn_index } => {
                if turn_index > 0 {
                    let a = view.agent(agent);
                    self.predictor
                        .observe(agent, a.turn_arrival - a.pause_started);
                    self.paused.remove(&agent);
                    self.fresh.retain(|&x| x != agent);
                }
                self.adm
                    .waiting
                    .push(agent, view.agent(agent).first_arrival.as_nanos());
            }
            SchedEvent::TurnFinished { agent, pause, .. } => {
                self.adm.turn_finished(agent);
                if let Some(p) = pause {
                    self.paused
                        .insert(agent, self.predictor.predict(agent, p.hint_ns));
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
        let mut budget = self.adm.budget(view);
        if self.heuristic {
            self.plan_heuristic(view, plan, &mut budget);
        } else {
            self.plan_min_waste(view, plan, &mut budget);
        }
        // Stall rule victims: preserved agents, furthest predicted return first.
        let mut victims: Vec<(u64, AgentId)> = self
            .paused
            .iter()
            .filter(|&(&a, _)| Admission::paused_on_gpu(view, a))
            .map(|(&a, &p)| {
                (
                    p.map_or(u64::MAX, |d| {
                        view.agent(a).pause_started.as_nanos().saturating_add(d)
                    }),
                    a,
                )
            })
            .collect();
        victims.sort_unstable_by(|x, y| y.cmp(x));
        let victims: Vec<(AgentId, Evict)> =
            victims.into_iter().map(|(_, a)| (a, Evict::Swap)).collect();
        self.adm.admit(view, plan, &mut budget, &victims);
        // A returning agent partly on the host is swapped in when committed; min-waste works on
        // paused agents only, so a partly swapped agent that returned leaves the paused set above.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvManager;
    use crate::sched::{AgentRuntime, CostHints, SchedConfig};
    use crate::time::SimTime;

    #[test]
    fn wastes_favour_preserving_short_pauses_and_discarding_long_ones() {
        let kv = KvManager::new(16, 100, 100, 1);
        let agents: Vec<AgentRuntime> = Vec::new();
        let config = SchedConfig::default();
        let costs = CostHints {
            kv_bytes_per_token: 1 << 19,
            block_bytes: 1 << 23,
            swap_latency_ns: 10_000,
            swap_in_bandwidth_bytes_per_s: 55e9,
            swap_out_bandwidth_bytes_per_s: 55e9,
            prefill_ns_per_token: 20_000.0,
            decode_step_ns: 5_000_000.0,
            kv_read_ns_per_token: 170.0,
        };
        let view = SchedView {
            now: SimTime::ZERO,
            kv: &kv,
            agents: &agents,
            config: &config,
            costs: &costs,
            swap_out_busy_until: SimTime::ZERO,
            swap_in_busy_until: SimTime::ZERO,
        };
        // S = 5 ms / 20 us = 250 tokens per iteration; 2000 tokens = 8 iterations = 40 ms.
        let short = InferCept::wastes(&view, 2000, 10_000_000, 0);
        assert!(short.preserve < short.discard);
        let long = InferCept::wastes(&view, 2000, 10_000_000_000, 0);
        assert!(long.discard < long.preserve);
        // A busy batch leaves one token per iteration for recompute: discarding gets expensive.
        let busy = InferCept::wastes(&view, 2000, 10_000_000_000, 250);
        assert!(busy.discard > long.discard * 100.0);
    }
}
