//! `djinn`: the semantic policy. It is told when a turn ends, that a pause starts, and (if the
//! workload gives one) the expected pause, and acts before memory runs out:
//!
//! 1. At pause start it prices keep / swap / drop. While memory is plentiful (projected use below
//!    `keep_below_pressure` of the pool) keeping costs nothing, so it keeps. Otherwise it swaps the
//!    KV out at once when the told pause hides the round trip (out, then back by prefetch) plus
//!    the device-to-host backlog, and the host has room; it keeps short pauses. Ahead of need it
//!    never drops (a drop buys recompute for memory nobody asked for yet), and it acts on told
//!    pauses only: a history average of bimodal pauses predicts neither mode.
//! 2. When memory falls short of what waiting turns need, it evicts paused agents ahead of need,
//!    the one predicted to return last first, then those without a prediction, longest away
//!    first (swap if the host has room; when the host is full, drop only for what the first
//!    waiting turn lacks). The host pool is a cache too: when KV must leave the GPU and the host
//!    is full, the host-resident KV predicted back furthest in the future (later than the agent
//!    being moved) is dropped to make room, instead of dropping the nearer one. On swe-agent
//!    with 340 agents (host full) this cut recomputed tokens from 5.50 M to 1.99 M and P99 turn
//!    latency from 4.19 s to 2.59 s; capacity at a 5 s P99 rose from 343 to 438 agents.
//! 3. Queue awareness: a returning agent first waits in the queue, so its KV is needed the
//!    expected queueing delay (EWMA of admitted turns' waits) after its return. Turns waiting
//!    beyond the head region (more than the free memory could admit) hold KV they will not use
//!    for at least that delay: they are swapped out, tail first, before the head waits for memory.
//!    On agents-capacity (200 agents, overloaded) this took P99 turn latency from 42.8 s to 11.3 s.
//!    When the host pool is full and the head lacks memory, such a parked turn is dropped instead
//!    if its recompute costs less than the queueing delay it would hold the memory for (under
//!    extreme overload, 3,000 agents, parked turns otherwise filled the GPU and batches shrank to
//!    a third). The parked turns are indexed by queue position, so this is O(log n) per turn.
//! 4. It prefetches: the swap-in starts at `predicted return - T_swap_in - margin - channel
//!    backlog`, so the KV is resident when the agent returns (no restore stall with exact hints).
//! 5. Waiting turns are committed first come, first served by turn arrival (program-level
//!    orders are available in [`TurnOrder`]; see there why they are not the default), and every
//!    committed turn's growth is reserved so nothing is preempted. How a step is filled is the
//!    run's batch policy (`super::batching`), shared with every other KV policy.
//! 6. Predictions come from a [`PausePredictor`]: the hint (exact or noisy), else the agent's own
//!    history (EWMA), else the workload's; or history only (`ewma`), or nothing (`none`).
//!
//! `djinn-true-pauses` is this machinery fed the true pauses ([`DjinnParams::knows_true_pauses`]):
//! a measure of what exact prediction buys djinn, not an upper bound.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::AgentId;
use crate::kv::{KvState, SwapDirection};
use crate::sched::{Phase, SchedEvent, SchedView, Scheduler, StepPlan};
use crate::time::SimTime;

use super::common::{build_batch, QueuePosition, WaitQueue};
use super::predict::{PausePredictor, PredictorMode};

mod plan;

/// Tunables of the semantic policy (defaults are what the shipped comparisons use).
#[derive(Clone, Debug, PartialEq)]
pub struct DjinnParams {
    /// Keep every pause while projected GPU use stays below this fraction of the pool.
    pub keep_below_pressure: f64,
    /// Free blocks kept in hand beyond known demand, as a fraction of the pool.
    pub watermark_fraction: f64,
    /// Fixed part of the prefetch margin.
    pub prefetch_margin_ns: u64,
    /// Proportional part of the prefetch margin (of the swap-in time).
    pub prefetch_margin_fraction: f64,
    /// What the policy does with pause hints (believe them, predict from history, or neither).
    pub predictor: PredictorMode,
    /// Read the true pause instead of predicting it (the `djinn-true-pauses` reference; never a
    /// real policy).
    pub knows_true_pauses: bool,
    /// Order in which waiting turns are committed.
    pub order: TurnOrder,
    /// Count the expected queueing delay into the time until a paused agent's KV is needed, and
    /// evict waiting turns parked at the queue tail (see `plan_step`).
    pub queue_aware: bool,
    /// With the host pool full, drop waiting turns parked beyond the head region (tail first)
    /// while the head lacks memory, when their recompute costs less than the expected queueing
    /// delay they would hold the memory for (rule 3).
    pub drop_parked_when_host_full: bool,
    /// Treat the host pool as a cache too: when KV must leave the GPU and the host is full, drop
    /// the host-resident KV whose owner is predicted back furthest in the future (later than the
    /// agent being moved) to make room, instead of dropping the nearer one (rule 2).
    pub host_as_cache: bool,
}

/// Admission order of waiting turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnOrder {
    /// First come, first served by the turn's arrival (the default: it bounds the tail).
    TurnArrival,
    /// Program-level first come, first served (the agent's first arrival). It finishes early
    /// agents' programs sooner but, under overload, starves late agents: on agents-capacity with
    /// 200 agents it gave P99 turn latency 88.9 s against 11-16 s for turn order.
    AgentArrival,
    /// Least attained service first (program-level, Autellix-style without promotion).
    LeastAttainedService,
}

impl Default for DjinnParams {
    fn default() -> Self {
        DjinnParams {
            keep_below_pressure: 0.5,
            watermark_fraction: 0.02,
            prefetch_margin_ns: 2_000_000,
            prefetch_margin_fraction: 0.1,
            predictor: PredictorMode::Hint,
            knows_true_pauses: false,
            queue_aware: true,
            order: TurnOrder::TurnArrival,
            drop_parked_when_host_full: true,
            host_as_cache: true,
        }
    }
}

/// Upper bound of waiting turns looked at per plan: more could never fit the pool at once, and
/// the bound keeps a plan O(batch) even with thousands of agents queued.
const WAITING_SCAN_MAX: usize = 512;

/// Weight of the newest admission in the queueing-delay EWMA.
const QUEUE_WAIT_ALPHA: f64 = 0.05;

/// Eviction keys of paused agents without a predicted return start here (see `return_key`).
const UNKNOWN_RETURN_KEY: u64 = 1 << 62;

/// Prefetches looked at together when deciding when the copy channel must start.
const PREFETCH_LOOKAHEAD: usize = 64;

#[derive(Debug)]
pub struct Djinn {
    params: DjinnParams,
    waiting: WaitQueue,
    committed: Vec<AgentId>,
    /// Predicted return of every paused agent (None when nothing predicts it).
    predicted_return: BTreeMap<AgentId, Option<SimTime>>,
    /// Pauses whose start decision is still to take.
    fresh: Vec<AgentId>,
    /// Paused agents whose KV is on the GPU, by predicted return (unknown = last).
    resident_paused: BTreeSet<(u64, AgentId)>,
    /// Paused agents whose KV is on the host, by the time their prefetch should start.
    prefetch_at: BTreeSet<(u64, AgentId)>,
    prefetch_key: BTreeMap<AgentId, u64>,
    /// Paused agents whose KV is wholly on the host, by eviction key (predicted return; unknown
    /// = last): the candidates for a drop that makes host room for KV needed sooner.
    host_paused: BTreeSet<(u64, AgentId)>,
    host_paused_key: BTreeMap<AgentId, u64>,
    /// Waiting (uncommitted) agents whose KV is on the GPU, by their queue position: they hold
    /// memory while they wait, so they may overtake a head that does not fit, and the last ones
    /// are the first to move out of the way.
    parked: BTreeSet<(QueuePosition, AgentId)>,
    parked_at: BTreeMap<AgentId, QueuePosition>,
    /// Waiting agents whose KV may be wholly on the GPU, by queue position: the only turns the
    /// resident-KV overtake can pick, so it reads these instead of testing the queue head's
    /// 512 states a step (almost all failing; a third of a large run's time). Entered where a
    /// waiting agent's KV can become resident (its turn arrives, a swap of it completes: the
    /// run loop changes a waiting agent's KV then only, after compacting it), left with the
    /// queue or on eviction; the overtake re-tests each entry it reads and forgets stale ones.
    resident_waiting: BTreeSet<(QueuePosition, AgentId)>,
    resident_waiting_at: BTreeMap<AgentId, QueuePosition>,
    /// Agents swapping out, with the GPU blocks the copy will free.
    swapping_out: BTreeMap<AgentId, u32>,
    predictor: PausePredictor,
    /// EWMA of the queueing delay of admitted turns (arrival to commitment).
    queue_wait_ns: f64,
}

impl Djinn {
    pub fn new(params: DjinnParams) -> Self {
        Djinn {
            waiting: WaitQueue::default(),
            committed: Vec::new(),
            predicted_return: BTreeMap::new(),
            fresh: Vec::new(),
            resident_paused: BTreeSet::new(),
            prefetch_at: BTreeSet::new(),
            prefetch_key: BTreeMap::new(),
            host_paused: BTreeSet::new(),
            host_paused_key: BTreeMap::new(),
            swapping_out: BTreeMap::new(),
            predictor: PausePredictor::new(params.predictor),
            queue_wait_ns: 0.0,
            parked: BTreeSet::new(),
            parked_at: BTreeMap::new(),
            resident_waiting: BTreeSet::new(),
            resident_waiting_at: BTreeMap::new(),
            params,
        }
    }

    fn prefetch_margin_ns(&self, swap_in_ns: u64) -> u64 {
        self.params.prefetch_margin_ns
            + (swap_in_ns as f64 * self.params.prefetch_margin_fraction) as u64
    }

    /// The eviction key of a paused agent: its predicted return; without a prediction, above
    /// every prediction and ordered by how long the agent has been away (the longest paused is
    /// evicted first: least recently used, and under long-tailed pauses the likeliest to stay
    /// away longest). Before, unpredicted agents tied and went by agent id.
    fn return_key(&self, view: &SchedView, agent: AgentId) -> u64 {
        match self.predicted_return.get(&agent).copied().flatten() {
            Some(t) => t.as_nanos().min(UNKNOWN_RETURN_KEY - 1),
            None => {
                let started = view.agent(agent).pause_started.as_nanos();
                UNKNOWN_RETURN_KEY + (UNKNOWN_RETURN_KEY - 1 - started.min(UNKNOWN_RETURN_KEY - 1))
            }
        }
    }

    fn park(&mut self, agent: AgentId) {
        if let Some(pos) = self.waiting.position(agent) {
            if let Some(old) = self.parked_at.remove(&agent) {
                self.parked.remove(&(old, agent));
            }
            self.parked.insert((pos, agent));
            self.parked_at.insert(agent, pos);
        }
    }

    /// Called wherever an agent leaves the queue or is evicted: it is no longer parked, nor a
    /// candidate to overtake.
    fn unpark(&mut self, agent: AgentId) {
        if let Some(pos) = self.parked_at.remove(&agent) {
            self.parked.remove(&(pos, agent));
        }
        self.forget_resident_waiting(agent);
    }

    /// Enters a waiting agent whose KV is on the GPU as a candidate to overtake.
    fn note_resident_waiting(&mut self, view: &SchedView, agent: AgentId) {
        let Some(pos) = self.waiting.position(agent) else {
            return;
        };
        if view.kv.state(agent) == KvState::Gpu && view.kv.blocks(agent) > 0 {
            self.forget_resident_waiting(agent);
            self.resident_waiting.insert((pos, agent));
            self.resident_waiting_at.insert(agent, pos);
        }
    }

    pub(super) fn forget_resident_waiting(&mut self, agent: AgentId) {
        if let Some(pos) = self.resident_waiting_at.remove(&agent) {
            self.resident_waiting.remove(&(pos, agent));
        }
    }

    pub(super) fn forget_host_paused(&mut self, agent: AgentId) {
        if let Some(key) = self.host_paused_key.remove(&agent) {
            self.host_paused.remove(&(key, agent));
        }
    }

    /// Registers a paused agent whose KV just landed on the host, for prefetch.
    fn schedule_prefetch(&mut self, view: &SchedView, agent: AgentId) {
        if let Some(Some(ret)) = self.predicted_return.get(&agent).copied() {
            let blocks = view.kv.blocks(agent) - view.kv.gpu_blocks_held(agent);
            let t_in = view.costs.swap_in_ns(blocks);
            let start = ret
                .as_nanos()
                .saturating_sub(t_in + self.prefetch_margin_ns(t_in));
            self.prefetch_at.insert((start, agent));
            self.prefetch_key.insert(agent, start);
        }
    }

    /// What a completed swap changes in the indexes of paused agents and parked turns.
    fn on_swap_done(&mut self, view: &SchedView, agent: AgentId, direction: SwapDirection) {
        match direction {
            SwapDirection::Out => {
                self.swapping_out.remove(&agent);
                if view.agent(agent).phase == Phase::Paused {
                    self.schedule_prefetch(view, agent);
                    self.forget_host_paused(agent);
                    let key = self.return_key(view, agent);
                    self.host_paused.insert((key, agent));
                    self.host_paused_key.insert(agent, key);
                }
            }
            SwapDirection::In => {
                if view.agent(agent).phase == Phase::Paused {
                    let key = self.return_key(view, agent);
                    self.resident_paused.insert((key, agent));
                } else if self.waiting.contains(agent) {
                    // Prefetched for a turn that arrived while the copy ran.
                    self.park(agent);
                }
            }
        }
    }
}

impl Default for Djinn {
    fn default() -> Self {
        Self::new(DjinnParams::default())
    }
}

impl Scheduler for Djinn {
    fn name(&self) -> String {
        if self.params.knows_true_pauses {
            "djinn-true-pauses"
        } else {
            "djinn"
        }
        .into()
    }

    fn on_event(&mut self, event: &SchedEvent, view: &SchedView) {
        match *event {
            SchedEvent::TurnArrived { agent, turn_index } => {
                if turn_index > 0 {
                    let key = self.return_key(view, agent);
                    self.resident_paused.remove(&(key, agent));
                    if let Some(start) = self.prefetch_key.remove(&agent) {
                        self.prefetch_at.remove(&(start, agent));
                    }
                    self.forget_host_paused(agent);
                    self.predicted_return.remove(&agent);
                    self.fresh.retain(|&a| a != agent);
                    let a = view.agent(agent);
                    self.predictor
                        .observe(agent, a.turn_arrival - a.pause_started);
                }
                let a = view.agent(agent);
                let key = match self.params.order {
                    TurnOrder::TurnArrival => a.turn_arrival.as_nanos(),
                    TurnOrder::AgentArrival => a.first_arrival.as_nanos(),
                    TurnOrder::LeastAttainedService => a.attained_service_ns,
                };
                self.waiting.push(agent, key);
                if view.kv.state(agent) == KvState::Gpu && view.kv.blocks(agent) > 0 {
                    self.park(agent);
                }
                self.note_resident_waiting(view, agent);
            }
            SchedEvent::TurnFinished { agent, pause, .. } => {
                self.committed.retain(|&a| a != agent);
                if let Some(p) = pause {
                    let predicted_ns = if self.params.knows_true_pauses {
                        Some(p.true_ns_reference_only)
                    } else {
                        self.predictor.predict(agent, p.hint_ns)
                    };
                    let predicted_return = predicted_ns.map(|d| view.now + d);
                    self.predicted_return.insert(agent, predicted_return);
                    let key = self.return_key(view, agent);
                    self.resident_paused.insert((key, agent));
                    // A pause-start swap is taken on a told pause only: a history average of
                    // bimodal pauses predicts neither mode, and acting on it swaps out agents
                    // back in milliseconds. Predictions from history still order evictions.
                    let told = self.params.knows_true_pauses
                        || (self.params.predictor == PredictorMode::Hint && p.hint_ns.is_some());
                    if told || !self.params.queue_aware {
                        self.fresh.push(agent);
                    }
                }
            }
            SchedEvent::SwapDone {
                agent, direction, ..
            } => {
                self.on_swap_done(view, agent, direction);
                self.note_resident_waiting(view, agent);
            }
        }
    }

    fn plan_step(&mut self, view: &SchedView, plan: &mut StepPlan) {
        self.repredict_overdue(view);
        let frame = self.plan_frame(view);
        let mut budget = self.plan_budget(view);
        // 1. Pause-start decisions.
        self.decide_pause_starts(view, &frame, plan, &mut budget);
        // 2. Evict ahead of need, for what waiting turns need.
        let evicted_waiting = self.evict_for_waiting(view, &frame, plan, &mut budget);
        // 3. Prefetch paused agents whose predicted return is near.
        self.prefetch_near_returns(view, &frame, plan, &mut budget);
        // 4. Commit waiting turns in order (or reject a hopeless head).
        self.commit_in_order(view, &frame, plan, &budget, &evicted_waiting);
        // 5. The batch.
        build_batch(view, &self.committed, plan, !self.waiting.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvManager;
    use crate::policies::BatchPolicy;
    use crate::sched::{AgentRuntime, CostHints, SchedConfig};

    /// The simulated H100 with Llama-2-7B, rounded (16-token blocks of 8 MiB).
    fn costs() -> CostHints {
        CostHints {
            kv_bytes_per_token: 1 << 19,
            block_bytes: 1 << 23,
            swap_latency_ns: 10_000,
            swap_in_bandwidth_bytes_per_s: 55e9,
            swap_out_bandwidth_bytes_per_s: 55e9,
            prefill_ns_per_token: 16_700.0,
            decode_step_ns: 4_800_000.0,
            kv_read_ns_per_token: 175.0,
        }
    }

    /// The scheduler's view at `now_s` with both copy channels idle.
    fn idle_copy_view<'a>(
        now_s: f64,
        kv: &'a KvManager,
        agents: &'a [AgentRuntime],
        config: &'a SchedConfig,
        costs: &'a CostHints,
    ) -> SchedView<'a> {
        SchedView {
            now: SimTime::from_secs_f64(now_s),
            kv,
            agents,
            config,
            costs,
            swap_out_busy_until: SimTime::ZERO,
            swap_in_busy_until: SimTime::ZERO,
        }
    }

    fn runtime(phase: Phase, turn_index: u32, arrival_s: f64, seq: u32, gen: u32) -> AgentRuntime {
        AgentRuntime {
            phase,
            first_arrival: SimTime::from_secs_f64(arrival_s),
            turn_index,
            turn_count: 2,
            turn_arrival: SimTime::from_secs_f64(arrival_s),
            seq_tokens: seq,
            generated: 0,
            generate_target: gen,
            pause_started: SimTime::from_secs_f64((arrival_s - 0.05).max(0.0)),
            pause_hint_ns: None,
            attained_service_ns: 0,
            admit_seq: 0,
        }
    }

    fn resident(kv: &mut KvManager, agent: AgentId, tokens: u32) {
        kv.ensure_capacity(agent, tokens).unwrap();
        kv.advance(agent, tokens).unwrap();
    }

    /// A queue of four turns on a 40-block pool: two new turns at the head (20 and 30 blocks,
    /// more than the pool can admit together) and two returned turns behind them whose KV
    /// (12 blocks each) stayed on the GPU; a running turn holds 4 blocks (so this is no stall).
    /// The head lacks 8 blocks. Returns what djinn plans.
    fn plan_with_parked_tail(params: DjinnParams, host_blocks: u32) -> StepPlan {
        let mut kv = KvManager::new(16, 40, host_blocks, 5);
        resident(&mut kv, 2, 192);
        resident(&mut kv, 3, 192);
        resident(&mut kv, 4, 63);
        let mut running = runtime(Phase::Running, 0, 1.0, 64, 2);
        running.generated = 1;
        let agents = vec![
            runtime(Phase::Waiting, 0, 9.0, 300, 20),
            runtime(Phase::Waiting, 0, 9.1, 460, 20),
            runtime(Phase::Waiting, 1, 9.2, 208, 16),
            runtime(Phase::Waiting, 1, 9.3, 208, 16),
            running,
        ];
        let (config, costs) = (SchedConfig::default(), costs());
        let view = idle_copy_view(10.0, &kv, &agents, &config, &costs);
        let mut djinn = Djinn::new(params);
        djinn.committed.push(4);
        for (agent, a) in agents.iter().enumerate().take(4) {
            let event = SchedEvent::TurnArrived {
                agent: agent as AgentId,
                turn_index: a.turn_index,
            };
            djinn.on_event(&event, &view);
        }
        // Turns have been waiting a second on average: the returned ones will wait as long.
        djinn.queue_wait_ns = 1e9;
        let mut plan = StepPlan::default();
        djinn.plan_step(&view, &mut plan);
        plan
    }

    #[test]
    fn host_full_drops_the_last_parked_turn_for_the_head_only() {
        let plan = plan_with_parked_tail(DjinnParams::default(), 0);
        // Recompute of 192 tokens (3 ms) is far below the second it would hold 12 blocks.
        assert_eq!(plan.drop, vec![(3, 0)], "the last parked turn, and only it");
        assert!(plan.swap_out.is_empty());
        assert_eq!(
            plan.prefill[0].agent, 0,
            "the head runs in the freed memory"
        );

        let kept = plan_with_parked_tail(
            DjinnParams {
                drop_parked_when_host_full: false,
                ..DjinnParams::default()
            },
            0,
        );
        assert!(kept.drop.is_empty() && kept.swap_out.is_empty());
        assert!(
            !kept.prefill.is_empty(),
            "a parked turn with resident KV runs past the head"
        );
        assert!(
            kept.prefill.iter().all(|p| p.agent == 2 || p.agent == 3),
            "without the drop the head waits: {:?}",
            kept.prefill.iter().map(|p| p.agent).collect::<Vec<_>>()
        );

        // With host room the parked tail is swapped out instead, for all the queue lacks.
        let swapped = plan_with_parked_tail(DjinnParams::default(), 100);
        assert!(swapped.drop.is_empty());
        assert_eq!(swapped.swap_out, vec![(3, 12), (2, 12)]);
    }

    #[test]
    fn without_predictions_the_longest_paused_agent_is_evicted_first() {
        // Agents 0 and 1 pause with no prediction (12 blocks each on a 40-block pool); agent 0
        // paused 5 s ago, agent 1 half a second ago. A new turn needs 20 blocks, 16 are free.
        let mut kv = KvManager::new(16, 40, 100, 3);
        resident(&mut kv, 0, 192);
        resident(&mut kv, 1, 192);
        let mut agents = vec![
            runtime(Phase::Paused, 0, 5.0, 192, 16),
            runtime(Phase::Paused, 0, 9.5, 192, 16),
            runtime(Phase::Waiting, 0, 9.9, 300, 20),
        ];
        for a in &mut agents[..2] {
            a.pause_started = a.turn_arrival;
        }
        let (config, costs) = (SchedConfig::default(), costs());
        let view = idle_copy_view(10.0, &kv, &agents, &config, &costs);
        let mut djinn = Djinn::new(DjinnParams {
            predictor: PredictorMode::Off,
            ..DjinnParams::default()
        });
        for agent in 0..2 {
            let pause = Some(crate::sched::PauseNotice {
                hint_ns: None,
                true_ns_reference_only: 60_000_000_000,
            });
            let event = SchedEvent::TurnFinished {
                agent,
                turn_index: 0,
                pause,
            };
            djinn.on_event(&event, &view);
        }
        let arrived = SchedEvent::TurnArrived {
            agent: 2,
            turn_index: 0,
        };
        djinn.on_event(&arrived, &view);
        let mut plan = StepPlan::default();
        djinn.plan_step(&view, &mut plan);
        assert_eq!(
            plan.swap_out,
            vec![(0, 12)],
            "the agent away longest goes first"
        );
    }

    #[test]
    fn host_full_drops_the_host_kv_needed_last_to_swap_a_nearer_one() {
        // A 40-block GPU and a 12-block host. Agent 0 is paused with its 12 blocks on the host,
        // back in 100 s; agent 1 is paused on the GPU (12 blocks), back in 5 s; agent 2's new
        // turn needs 36 blocks. Agent 1 must leave the GPU: with the host used as a cache,
        // agent 0's KV (needed later) is dropped and agent 1's swapped out; without, agent 1's
        // is dropped.
        let run = |host_as_cache: bool| {
            let mut kv = KvManager::new(16, 40, 12, 3);
            resident(&mut kv, 0, 192);
            let id = kv.start_swap_out(0, 12).unwrap();
            kv.complete_swap(id).unwrap();
            resident(&mut kv, 1, 192);
            let mut agents = vec![
                runtime(Phase::Paused, 0, 9.0, 192, 16),
                runtime(Phase::Paused, 0, 9.0, 192, 16),
                runtime(Phase::Waiting, 0, 9.9, 570, 20),
            ];
            for a in &mut agents[..2] {
                a.pause_started = SimTime::from_secs_f64(9.0);
            }
            let (config, costs) = (SchedConfig::default(), costs());
            let view = idle_copy_view(10.0, &kv, &agents, &config, &costs);
            let mut djinn = Djinn::new(DjinnParams {
                host_as_cache,
                ..DjinnParams::default()
            });
            for (agent, pause_s) in [(0, 100.0), (1, 5.0)] {
                let pause = Some(crate::sched::PauseNotice {
                    hint_ns: Some((pause_s * 1e9) as u64),
                    true_ns_reference_only: (pause_s * 1e9) as u64,
                });
                let event = SchedEvent::TurnFinished {
                    agent,
                    turn_index: 0,
                    pause,
                };
                djinn.on_event(&event, &view);
            }
            djinn.fresh.clear();
            let done = SchedEvent::SwapDone {
                agent: 0,
                swap_id: 0,
                direction: SwapDirection::Out,
            };
            djinn.on_event(&done, &view);
            let arrived = SchedEvent::TurnArrived {
                agent: 2,
                turn_index: 0,
            };
            djinn.on_event(&arrived, &view);
            let mut plan = StepPlan::default();
            djinn.plan_step(&view, &mut plan);
            plan
        };
        let cache = run(true);
        assert_eq!(cache.drop, vec![(0, 0)], "{cache:?}");
        assert_eq!(cache.swap_out, vec![(1, 12)], "{cache:?}");
        let no_cache = run(false);
        assert_eq!(no_cache.drop, vec![(1, 0)], "{no_cache:?}");
        assert!(no_cache.swap_out.is_empty(), "{no_cache:?}");
    }

    /// `decoders` committed agents decoding at `context` tokens each and one committed agent
    /// with 3,000 prompt tokens to prefill, batched under `batching`; returns the prefill chunk.
    fn prefill_chunk(batching: BatchPolicy, decoders: u32, context: u32, queued: bool) -> u32 {
        let n = decoders + 1;
        let mut kv = KvManager::new(16, 20_000, 0, n);
        let mut agents = Vec::new();
        for a in 0..decoders {
            resident(&mut kv, a, context);
            let mut rt = runtime(Phase::Running, 0, 0.0, context + 1, 100);
            rt.generated = 1;
            agents.push(rt);
        }
        kv.ensure_capacity(decoders, 3_000).unwrap();
        agents.push(runtime(Phase::Running, 0, 0.0, 3_000, 100));
        let config = SchedConfig {
            batching,
            ..SchedConfig::default()
        };
        let costs = costs();
        let view = idle_copy_view(1.0, &kv, &agents, &config, &costs);
        let committed: Vec<AgentId> = (0..n).collect();
        let mut plan = StepPlan::default();
        build_batch(&view, &committed, &mut plan, queued);
        assert_eq!(plan.decode.len() as u32, decoders);
        plan.prefill.iter().map(|p| p.tokens).sum()
    }

    #[test]
    fn each_batch_policy_sets_the_prefill_riding_along_decodes() {
        use BatchPolicy::*;
        // Without decodes the stall-free budget takes the whole prompt at once.
        assert_eq!(prefill_chunk(StallFree, 0, 0, true), 3_000);
        // One small decode leaves ~290 tokens of idle compute: the floor applies (1,024 while
        // turns queue, 2,048 while none does); fill takes the whole prompt, a chunk its size.
        assert_eq!(prefill_chunk(StallFree, 1, 1_000, true), 1_024);
        assert_eq!(prefill_chunk(StallFree, 1, 1_000, false), 2_048);
        assert_eq!(prefill_chunk(Fill, 1, 1_000, true), 3_000);
        assert_eq!(prefill_chunk(Chunk(512), 0, 0, false), 512);
        // 60 decodes of 3,000 tokens read 88 GiB of KV (31.5 ms at 3 TB/s plus the weights):
        // (36.3 ms - 60 x 16.7 us) / 16.7 us = 2,113 prefill tokens fit the idle compute.
        assert_eq!(prefill_chunk(StallFree, 60, 3_000, true), 2_113);
    }
}
